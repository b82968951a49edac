//! `checkout.session.*`: the session that bought a subscription or a one-time purchase.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::decode::{decode, expect_object, required, required_id, Reference};
use super::ObjectKind;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutSessionSnapshot {
    pub id: String,
    /// When the session was created: which of a customer's sessions is the latest must not
    /// depend on when its events were sent or a backfill fetched it.
    pub created: Option<i64>,
    pub customer: Option<String>,
    pub client_reference_id: Option<String>,
    pub mode: String,
    pub status: Option<String>,
    pub payment_status: String,
    pub subscription: Option<String>,
    /// `metadata.price`: what a one-time purchase bought (the event carries no line items).
    pub metadata_price: Option<String>,
    /// `metadata.product`: as `metadata_price`, by product.
    pub metadata_product: Option<String>,
    pub livemode: bool,
    pub raw: String,
}

/// The members of a checkout session the projection reads.
#[derive(Deserialize)]
struct CheckoutSession {
    object: Option<String>,
    id: Option<String>,
    created: Option<i64>,
    customer: Option<Reference>,
    client_reference_id: Option<String>,
    mode: Option<String>,
    status: Option<String>,
    payment_status: Option<String>,
    subscription: Option<Reference>,
    metadata: Option<Metadata>,
    livemode: Option<bool>,
}

#[derive(Deserialize)]
struct Metadata {
    price: Option<String>,
    product: Option<String>,
}

impl CheckoutSessionSnapshot {
    pub(super) fn parse(object: &RawValue, livemode: bool) -> Result<Self, String> {
        let c: CheckoutSession = decode(object)?;
        expect_object(c.object.as_deref(), ObjectKind::CheckoutSession)?;
        let (metadata_price, metadata_product) = match c.metadata {
            Some(m) => (m.price, m.product),
            None => (None, None),
        };
        Ok(CheckoutSessionSnapshot {
            id: required_id(c.id, &"id")?,
            created: c.created,
            customer: c.customer.map(Reference::into_id),
            client_reference_id: c.client_reference_id,
            mode: required(c.mode, &"mode")?,
            status: c.status,
            payment_status: required(c.payment_status, &"payment_status")?,
            subscription: c.subscription.map(Reference::into_id),
            metadata_price,
            metadata_product,
            livemode: c.livemode.unwrap_or(livemode),
            raw: object.get().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::{parse, shape_error, without};
    use super::super::Snapshot;
    use super::*;
    use crate::projection::testing::{self, set, Api};

    #[test]
    fn checkout_session_reads_the_purchase_metadata() {
        let mut object = testing::fixture(Api::Legacy, "checkout.session");
        set(
            &mut object,
            "/metadata",
            json!({"price": "price_lifetime", "product": "prod_book", "other": "x"}),
        );
        set(
            &mut object,
            "/customer",
            json!({"id": "cus_9", "object": "customer"}),
        );
        set(&mut object, "/client_reference_id", json!("user_42"));

        let s = match parse(
            ObjectKind::CheckoutSession,
            "checkout.session.completed",
            &object,
        ) {
            Ok(Snapshot::CheckoutSession(s)) => s,
            other => panic!("expected a session, got {other:?}"),
        };

        assert_eq!(s.customer.as_deref(), Some("cus_9"));
        assert_eq!(s.client_reference_id.as_deref(), Some("user_42"));
        assert_eq!(s.mode, "payment");
        assert_eq!(s.status.as_deref(), Some("open"));
        assert_eq!(s.payment_status, "unpaid");
        assert_eq!(s.metadata_price.as_deref(), Some("price_lifetime"));
        assert_eq!(s.metadata_product.as_deref(), Some("prod_book"));
    }

    #[test]
    fn session_without_mode_is_rejected_with_the_field_at_fault() {
        let object = without(testing::fixture(Api::Legacy, "checkout.session"), "mode");

        assert_eq!(
            shape_error(
                ObjectKind::CheckoutSession,
                "checkout.session.completed",
                &object
            ),
            "`data.object.mode` is missing or null"
        );
    }
}
