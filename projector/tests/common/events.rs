//! Stripe event payloads for the end-to-end scenarios: testkit's, under the names the
//! scenarios import.
#![allow(unused_imports)]

pub use testkit::stripe::{
    checkout_session, customer, deleted_customer, entitlement_summary, invoice, subscription, with,
    Api, Event, Item,
};
