//! The pure projection core: Stripe event → typed snapshot with its [`Rank`] → per-customer
//! state → entitlements. No I/O and no clock: the store and the consumer only move data, so
//! everything here is tested given/when/then without a database.
//!
//! The flow: [`project`] turns an envelope into a [`ProjectedEvent`]; [`state::coalesce`] keeps
//! the max-rank snapshot per object of a batch (what the store upserts, under the same
//! `incoming > stored` rule); [`state::CustomerState::apply`] does the same in memory; and
//! [`entitlements::compute`] derives a customer's features from their current snapshots.

pub mod change;
pub mod entitlements;
pub mod payload;
pub mod policy;
pub mod rank;
pub mod snapshot;
pub mod state;

#[cfg(test)]
mod backfill;
#[cfg(test)]
mod properties;
#[cfg(test)]
pub(crate) mod testing;

use shared::EventEnvelope;

pub use change::{change_message, same_entitlements, FeatureDiff};
pub use entitlements::{compute, features_granted, EntitlementView, ItemView, SubscriptionView};
pub use policy::{EntitlementPolicy, Grant, Matcher, PastDue, PolicyError};
pub use rank::Rank;
pub use snapshot::{
    CheckoutSessionSnapshot, CustomerSnapshot, EntitlementSummarySnapshot, InvoiceSnapshot,
    ObjectKind, Snapshot, SubscriptionItem, SubscriptionSnapshot,
};
pub use state::{
    coalesce, keep_max_rank, newer, CoalescedBatch, CustomerKey, CustomerState, CustomerTouch,
    ObjectKey,
};

/// An event reduced to what the projection needs, owned so it can outlive the consumed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectedEvent {
    pub event_id: String,
    pub event_type: String,
    pub created: i64,
    pub livemode: bool,
    /// The Connect account, `""` for the platform: every projection is keyed by
    /// (account, customer), and an empty string keeps that key a plain column.
    pub account: String,
    /// The customer the event concerns, when it names one.
    pub customer: Option<String>,
    pub rank: Rank,
    /// `None` for event types the projection ignores and for thin events (kept in the log,
    /// counted by the caller).
    pub snapshot: Option<Snapshot>,
    /// A thin event (`v2.core.event`): a reference to an object, never a snapshot of it.
    pub thin: bool,
}

/// Why an event of a handled type cannot be projected. It would fail the same way on every
/// retry, so it goes to the dead-letter queue; the message depends only on the event's bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProjectionError {
    #[error("{event_type} event has an unexpected data.object shape: {reason}")]
    Shape { event_type: String, reason: String },
}

/// Whether the projection keeps state for events of this type.
pub fn is_handled(event_type: &str) -> bool {
    ObjectKind::for_event_type(event_type).is_some()
}

/// Projects one event: parses its snapshot (for handled types) and ranks it. A thin event has
/// no snapshot to parse, whatever its type: it is kept in the log and counted, and ingest
/// appends its related object as a separate backfill snapshot.
pub fn project(envelope: &EventEnvelope<'_>) -> Result<ProjectedEvent, ProjectionError> {
    let snapshot = match (
        ObjectKind::for_event_type(envelope.event_type),
        envelope.object(),
    ) {
        (Some(kind), Some(object)) => Some(
            Snapshot::parse(kind, envelope.event_type, object, envelope.livemode).map_err(
                |reason| ProjectionError::Shape {
                    event_type: envelope.event_type.to_owned(),
                    reason,
                },
            )?,
        ),
        _ => None,
    };
    // The snapshot's reading is authoritative where there is one: it accepts escaped and
    // expanded forms that the envelope's borrowed routing fields give up on.
    let customer = match &snapshot {
        Some(snapshot) => snapshot.customer(),
        None => envelope.customer(),
    }
    .map(str::to_owned);
    let status_rank = snapshot.as_ref().map_or(0, Snapshot::status_rank);
    Ok(ProjectedEvent {
        event_id: envelope.id.to_owned(),
        event_type: envelope.event_type.to_owned(),
        created: envelope.created,
        livemode: envelope.livemode,
        account: envelope.account.unwrap_or_default().to_owned(),
        customer,
        rank: Rank::of(
            envelope.event_type,
            envelope.created,
            status_rank,
            envelope.id,
        ),
        thin: envelope.thin().is_some(),
        snapshot,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::testing::{self, event, set, Api, CUSTOMER, T0};
    use super::*;

    #[test]
    fn subscription_event_projects_to_a_ranked_subscription_snapshot() {
        // Arrange
        let object = testing::subscription(Api::Legacy, "sub_1", "past_due", &[]);

        // Act
        let projected = event("customer.subscription.updated", object)
            .id("evt_1")
            .created(T0)
            .project();

        // Assert
        assert_eq!(projected.event_id, "evt_1");
        assert_eq!(projected.event_type, "customer.subscription.updated");
        assert_eq!(projected.created, T0);
        assert_eq!(projected.account, "");
        assert_eq!(projected.customer.as_deref(), Some(CUSTOMER));
        assert_eq!(
            projected.rank,
            Rank {
                created: T0,
                type_rank: 1,
                status_rank: 3,
                event_id: "evt_1".into()
            }
        );
        assert!(
            matches!(projected.snapshot, Some(Snapshot::Subscription(ref s)) if s.id == "sub_1")
        );
    }

    #[test]
    fn connect_event_keeps_its_account() {
        let object = testing::subscription(Api::Legacy, "sub_1", "active", &[]);

        let projected = event("customer.subscription.created", object)
            .account("acct_42")
            .project();

        assert_eq!(projected.account, "acct_42");
    }

    #[test]
    fn each_handled_family_projects_to_its_snapshot() {
        let cases = [
            (
                "customer.created",
                testing::customer(CUSTOMER),
                ObjectKind::Customer,
            ),
            (
                "customer.deleted",
                testing::customer(CUSTOMER),
                ObjectKind::Customer,
            ),
            (
                "customer.subscription.resumed",
                testing::subscription(Api::Basil, "sub_1", "active", &[]),
                ObjectKind::Subscription,
            ),
            (
                "invoice.payment_failed",
                testing::invoice(Api::Basil, "in_1", "open"),
                ObjectKind::Invoice,
            ),
            (
                "checkout.session.async_payment_succeeded",
                testing::checkout_session("cs_1", "payment", "paid"),
                ObjectKind::CheckoutSession,
            ),
            (
                "entitlements.active_entitlement_summary.updated",
                testing::entitlement_summary(CUSTOMER, &["sso"]),
                ObjectKind::EntitlementSummary,
            ),
        ];
        for (event_type, object, kind) in cases {
            let projected = event(event_type, object).project();
            let snapshot = projected.snapshot.expect("a snapshot");
            assert_eq!(snapshot.kind(), kind, "{event_type}");
            assert_eq!(
                projected.customer.as_deref(),
                Some(CUSTOMER),
                "{event_type}"
            );
        }
    }

    #[test]
    fn customer_deleted_event_marks_the_snapshot_deleted() {
        let projected = event("customer.deleted", testing::customer(CUSTOMER)).project();

        assert!(matches!(projected.snapshot, Some(Snapshot::Customer(ref c)) if c.deleted));
        assert_eq!(projected.rank.type_rank, 2);
    }

    #[test]
    fn unhandled_event_type_is_ranked_but_has_no_snapshot() {
        let mut object = testing::fixture(Api::Legacy, "invoice");
        set(&mut object, "/object", json!("invoiceitem"));

        let projected = event("invoiceitem.created", object).project();

        assert_eq!(projected.snapshot, None);
        assert_eq!(projected.customer.as_deref(), Some(CUSTOMER));
        assert!(!is_handled("invoiceitem.created"));
        assert!(!is_handled("payment_intent.succeeded"));
        assert!(is_handled("invoice.paid"));
    }

    #[test]
    fn snapshot_livemode_falls_back_to_the_envelope() {
        let mut object = testing::subscription(Api::Legacy, "sub_1", "active", &[]);
        object.as_object_mut().expect("object").remove("livemode");

        let projected = event("customer.subscription.updated", object)
            .livemode(true)
            .project();

        assert!(projected.livemode);
        assert!(projected.snapshot.expect("a snapshot").livemode());
    }

    #[test]
    fn object_of_another_family_is_a_shape_error() {
        let object = testing::invoice(Api::Legacy, "in_1", "paid");

        let error = event("customer.subscription.updated", object)
            .try_project()
            .unwrap_err();

        assert_eq!(
            error,
            ProjectionError::Shape {
                event_type: "customer.subscription.updated".into(),
                reason: "`data.object.object` is \"invoice\", expected \"subscription\"".into(),
            }
        );
        assert_eq!(
            error.to_string(),
            "customer.subscription.updated event has an unexpected data.object shape: \
             `data.object.object` is \"invoice\", expected \"subscription\""
        );
    }

    #[test]
    fn subscription_without_status_is_a_shape_error() {
        let mut object = testing::subscription(Api::Legacy, "sub_1", "active", &[]);
        object.as_object_mut().expect("object").remove("status");

        let error = event("customer.subscription.created", object)
            .try_project()
            .unwrap_err();

        assert_eq!(
            error.to_string(),
            "customer.subscription.created event has an unexpected data.object shape: \
             `data.object.status` is missing or null"
        );
    }
}
