//! Projecting a log record's payload for the rebuild's bulk replay, scanning `data.object` one
//! time fewer than `project(&EventEnvelope::parse(payload)?)`.
//!
//! `EventEnvelope::parse` reads the routing fields of `data.object` (`ObjectRef`) eagerly, for
//! ingest's partition key: a full scan of the object. [`project`] does not need them when the
//! event's type is one the projection keeps (the snapshot's own reading of the customer is
//! authoritative), so here they are read only for the other types. The result is the same
//! [`ProjectedEvent`], or an error exactly when the two-step path fails; the tests hold the two
//! together.

use shared::EventEnvelope;

use super::{project, ObjectKind, ProjectedEvent, ProjectionError};

/// Why a payload gives no projected event: not an envelope, or an envelope whose object cannot
/// be projected. Live holds every such record as a dead letter.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error(transparent)]
    Envelope(#[from] shared::envelope::EnvelopeError),
    #[error(transparent)]
    Projection(#[from] ProjectionError),
}

/// `project(&EventEnvelope::parse(payload)?)`, with one scan of `data.object` fewer for the
/// event types the projection keeps.
pub fn project_payload(payload: &[u8]) -> Result<ProjectedEvent, PayloadError> {
    // Only an event of a type without a snapshot takes its customer from the routing fields.
    let envelope = EventEnvelope::parse_with(payload, |event_type| {
        ObjectKind::for_event_type(event_type).is_none()
    })?;
    Ok(project(&envelope)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two paths agree: the same event, or both an error.
    fn assert_same(payload: &[u8]) {
        let two_step = EventEnvelope::parse(payload)
            .map_err(PayloadError::from)
            .and_then(|envelope| Ok(project(&envelope)?));
        let one_step = project_payload(payload);
        match (&two_step, &one_step) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{}", String::from_utf8_lossy(payload)),
            (Err(_), Err(_)) => {}
            _ => panic!(
                "paths disagree on {}: {two_step:?} / {one_step:?}",
                String::from_utf8_lossy(payload)
            ),
        }
    }

    #[test]
    fn agrees_with_envelope_then_project_on_every_family_and_api_shape() {
        use super::super::testing::{self, event, Api, CUSTOMER};
        let cases = [
            ("customer.created", testing::customer(CUSTOMER)),
            ("customer.deleted", testing::customer(CUSTOMER)),
            (
                "customer.subscription.updated",
                testing::subscription(Api::Legacy, "sub_1", "active", &[]),
            ),
            (
                "customer.subscription.created",
                testing::subscription(Api::Basil, "sub_1", "trialing", &[]),
            ),
            ("invoice.paid", testing::invoice(Api::Basil, "in_1", "paid")),
            (
                "invoice.payment_failed",
                testing::invoice(Api::Legacy, "in_1", "open"),
            ),
            (
                "checkout.session.completed",
                testing::checkout_session("cs_1", "subscription", "paid"),
            ),
            (
                "entitlements.active_entitlement_summary.updated",
                testing::entitlement_summary(CUSTOMER, &["sso"]),
            ),
            ("invoiceitem.created", testing::customer(CUSTOMER)),
        ];
        for (event_type, object) in cases {
            assert_same(event(event_type, object.clone()).body().as_bytes());
            assert_same(
                event(event_type, object)
                    .account("acct_1")
                    .livemode(true)
                    .body()
                    .as_bytes(),
            );
        }
    }

    /// The real-world payloads (`STRIPE_REALWORLD_DIR`, default `shared/stripe/realworld`
    /// beside the repository) when they are there.
    #[test]
    fn agrees_with_envelope_then_project_on_real_world_payloads() {
        let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = std::env::var_os("STRIPE_REALWORLD_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| here.join("../../shared/stripe/realworld"));
        let mut seen = 0;
        let mut stack = vec![dir];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "json") {
                    let bytes = std::fs::read(&path).expect("read payload");
                    assert_same(&bytes);
                    seen += 1;
                }
            }
        }
        println!("{seen} real-world payloads compared");
    }

    #[test]
    fn agrees_on_malformed_and_edge_envelopes() {
        let cases: &[&str] = &[
            "",
            "[]",
            "null",
            "{}",
            r#"{"id":"evt_1","type":"invoice.paid","created":1}"#,
            r#"{"id":"evt_1","type":"invoice.paid","created":1,"data":{"object":[]}}"#,
            r#"{"id":"evt_1","type":"invoice.paid","created":"1","data":{"object":{}}}"#,
            r#"{"id":"","type":"invoice.paid","created":1,"data":{"object":{}}}"#,
            r#"{"id":"evt_1","type":"invoice.paid","created":1,"livemode":"yes","data":{"object":{}}}"#,
            r#"{"id":"evt_1","type":"invoice.paid","created":1,"data":{"object":{"object":"invoice","id":"in_1","customer":"cus_1","status":"paid"}}}"#,
            r#"{"id":"evt_1","type":"payment_intent.succeeded","created":1,"data":{"object":{"object":"payment_intent","id":"pi_1","customer":{"id":"cus_9"}}}}"#,
            r#"{"id":"evt_1","type":"customer.created","created":1,"account":"acct_1","data":{"object":{"object":"customer","id":"cus_1"}}}"#,
            r#"{"id":"evt_1","type":"customer.created","created":1,"account":"","data":{"object":{"object":"customer","id":"cus_1"}}}"#,
            r#"{"id":"evt_1","object":"v2.core.event","type":"v1.billing.meter.error_report_triggered","created":"2025-01-01T00:00:00Z","related_object":{"id":"mtr_1","type":"billing.meter","url":"/v1/billing/meters/mtr_1"}}"#,
            r#"{"id":"evt_1","object":"v2.core.event","type":"x","created":"not a date"}"#,
            r#"{"id":"evt_1","type":"customer.subscription.updated","created":1,"data":{"object":{"object":"invoice","id":"in_1"}}}"#,
        ];
        for case in cases {
            assert_same(case.as_bytes());
        }
    }
}
