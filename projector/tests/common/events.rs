//! Stripe event payloads for the end-to-end scenarios: testkit's, under the names the
//! scenarios import, with the times and prices they share.
#![allow(unused_imports)]

use serde_json::Value;

pub use testkit::stripe::{
    checkout_session, customer, deleted_customer, entitlement_summary, invoice, subscription, with,
    Api, Event, Item,
};

/// 2026-01-01T00:00:00Z, where the scenarios' clocks start.
pub const T0: i64 = 1_767_225_600;
pub const DAY: i64 = 86_400;
pub const MONTH: i64 = 30 * DAY;

/// The prices of SPEC §7's example mapping (`ENTITLEMENTS`): by product, by price, by lookup key.
pub const PRO: Item<'static> = ("price_pro_month", "prod_pro", None);
pub const TEAM: Item<'static> = ("price_team_month", "prod_team", None);
pub const ENTERPRISE: Item<'static> = ("price_ent_year", "prod_ent", Some("enterprise"));

/// The webhook body of a `customer.created` of test-mode customer `customer_id`.
pub fn customer_created(event_id: &str, created: i64, customer_id: &str) -> String {
    Event::new(
        event_id,
        "customer.created",
        created,
        customer(customer_id, false),
    )
    .body()
}
