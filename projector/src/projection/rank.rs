//! The deterministic total order over snapshots of one object (SPEC §6).
//!
//! Stripe delivers out of order and `created` has one-second resolution, so the projection keeps,
//! per object, the snapshot whose event has the greatest [`Rank`]. Every field is computed from the
//! event alone, so any permutation or duplication of the same events picks the same winner.

use serde::{Deserialize, Serialize};

use super::snapshot::ObjectKind;

/// Where an event's snapshot sits in the order of its object's snapshots.
///
/// The derived `Ord` compares fields in declaration order: `created`, then `type_rank`, then
/// `status_rank`, then `event_id` bytewise (`String`'s `Ord` is bytewise, which is what Postgres
/// does with `COLLATE "C"`, so memory and database agree).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Rank {
    /// The event's `created` (unix seconds).
    pub created: i64,
    /// [`type_rank`] of the event type.
    pub type_rank: i16,
    /// [`status_rank`] of the snapshot's status.
    pub status_rank: i16,
    /// The Stripe event id: the last resort that makes the order total.
    pub event_id: String,
}

impl Rank {
    /// The rank of an event given the status rank of its snapshot.
    pub fn of(event_type: &str, created: i64, status_rank: i16, event_id: &str) -> Rank {
        Rank {
            created,
            type_rank: type_rank(event_type),
            status_rank,
            event_id: event_id.to_owned(),
        }
    }
}

/// `*.created` < every other type < `*.deleted`: within one second, creation happened first and
/// deletion last, whatever order the events arrive in.
pub fn type_rank(event_type: &str) -> i16 {
    if event_type.ends_with(".created") {
        0
    } else if event_type.ends_with(".deleted") {
        2
    } else {
        1
    }
}

/// The status rank of a snapshot of `kind`; kinds without a lifecycle rank 0.
pub fn status_rank(kind: ObjectKind, status: Option<&str>) -> i16 {
    let Some(status) = status else { return 0 };
    match kind {
        ObjectKind::Subscription => subscription_status_rank(status),
        ObjectKind::Invoice => invoice_status_rank(status),
        ObjectKind::CheckoutSession => checkout_session_status_rank(status),
        ObjectKind::Customer | ObjectKind::EntitlementSummary => 0,
    }
}

/// Follows the direction a subscription moves in within one second: it can leave `incomplete`
/// or `trialing` for `active`, fall into dunning, and end; it never comes back from an end.
/// Unknown statuses rank lowest so that a known later state is never hidden by one.
pub fn subscription_status_rank(status: &str) -> i16 {
    match status {
        "incomplete" => 0,
        "trialing" => 1,
        "active" => 2,
        "past_due" => 3,
        "unpaid" => 4,
        "paused" => 5,
        "canceled" | "incomplete_expired" => 6,
        _ => 0,
    }
}

/// draft < open < paid = uncollectible < void: an invoice is finalized before it is settled,
/// and voiding is final.
pub fn invoice_status_rank(status: &str) -> i16 {
    match status {
        "draft" => 0,
        "open" => 1,
        "paid" | "uncollectible" => 2,
        "void" => 3,
        _ => 0,
    }
}

/// open < complete < expired.
pub fn checkout_session_status_rank(status: &str) -> i16 {
    match status {
        "open" => 0,
        "complete" => 1,
        "expired" => 2,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(event_type: &str, created: i64, status_rank: i16, event_id: &str) -> Rank {
        Rank::of(event_type, created, status_rank, event_id)
    }

    #[test]
    fn later_second_wins_over_every_other_field() {
        // Arrange
        let earlier = rank("customer.subscription.deleted", 100, 6, "evt_z");
        let later = rank("customer.subscription.created", 101, 0, "evt_a");

        // Act / Assert
        assert!(later > earlier);
    }

    #[test]
    fn same_second_created_ranks_below_updated_below_deleted() {
        let created = rank("customer.subscription.created", 100, 6, "evt_z");
        let updated = rank("customer.subscription.updated", 100, 0, "evt_y");
        let deleted = rank("customer.subscription.deleted", 100, 0, "evt_a");

        assert!(created < updated);
        assert!(updated < deleted);
    }

    #[test]
    fn within_each_object_family_creation_ranks_first_and_deletion_last() {
        for family in [
            "customer",
            "customer.subscription",
            "invoice",
            "checkout.session",
            "entitlements.active_entitlement_summary",
        ] {
            let created = type_rank(&format!("{family}.created"));
            let deleted = type_rank(&format!("{family}.deleted"));
            for middle in [
                "updated",
                "paused",
                "resumed",
                "paid",
                "completed",
                "finalized",
            ] {
                let other = type_rank(&format!("{family}.{middle}"));
                assert!(created < other, "{family}.created < {family}.{middle}");
                assert!(other < deleted, "{family}.{middle} < {family}.deleted");
            }
        }
    }

    #[test]
    fn every_type_that_is_neither_creation_nor_deletion_ranks_alike() {
        let updated = type_rank("customer.subscription.updated");

        for other in [
            "customer.subscription.paused",
            "invoice.paid",
            "checkout.session.completed",
            "entitlements.active_entitlement_summary.updated",
        ] {
            assert_eq!(type_rank(other), updated, "{other} vs an update");
        }
    }

    #[test]
    fn same_second_same_type_breaks_ties_by_status() {
        let active = rank(
            "customer.subscription.updated",
            100,
            subscription_status_rank("active"),
            "evt_z",
        );
        let past_due = rank(
            "customer.subscription.updated",
            100,
            subscription_status_rank("past_due"),
            "evt_a",
        );

        assert!(past_due > active);
    }

    #[test]
    fn full_tie_is_broken_by_event_id_bytewise() {
        let lower = rank("invoice.paid", 100, 2, "evt_1A");
        let upper = rank("invoice.paid", 100, 2, "evt_1a");
        // Bytewise: 'A' (0x41) < 'a' (0x61), unlike a case-insensitive collation.
        assert!(upper > lower);
        assert!(rank("invoice.paid", 100, 2, "evt_Z") < rank("invoice.paid", 100, 2, "evt_a"));
    }

    #[test]
    fn subscription_statuses_follow_the_spec_order() {
        let order = [
            "incomplete",
            "trialing",
            "active",
            "past_due",
            "unpaid",
            "paused",
            "canceled",
        ];
        for pair in order.windows(2) {
            assert!(
                subscription_status_rank(pair[0]) < subscription_status_rank(pair[1]),
                "{} < {}",
                pair[0],
                pair[1]
            );
        }
        assert_eq!(
            subscription_status_rank("incomplete_expired"),
            subscription_status_rank("canceled")
        );
        for known in order {
            assert!(
                subscription_status_rank("something_new") <= subscription_status_rank(known),
                "an unknown status must not hide {known}"
            );
        }
    }

    #[test]
    fn invoice_statuses_follow_the_spec_order() {
        assert!(invoice_status_rank("draft") < invoice_status_rank("open"));
        assert!(invoice_status_rank("open") < invoice_status_rank("paid"));
        assert_eq!(
            invoice_status_rank("paid"),
            invoice_status_rank("uncollectible")
        );
        assert!(invoice_status_rank("paid") < invoice_status_rank("void"));
        for known in ["draft", "open", "paid", "uncollectible", "void"] {
            assert!(
                invoice_status_rank("something_new") <= invoice_status_rank(known),
                "an unknown status must not hide {known}"
            );
        }
    }

    #[test]
    fn checkout_session_statuses_follow_the_spec_order() {
        assert!(checkout_session_status_rank("open") < checkout_session_status_rank("complete"));
        assert!(checkout_session_status_rank("complete") < checkout_session_status_rank("expired"));
    }

    #[test]
    fn status_rank_orders_each_kind_by_its_own_lifecycle() {
        let subscription = |s| status_rank(ObjectKind::Subscription, Some(s));
        let invoice = |s| status_rank(ObjectKind::Invoice, Some(s));
        let session = |s| status_rank(ObjectKind::CheckoutSession, Some(s));

        assert!(subscription("active") < subscription("paused"));
        assert!(subscription("paused") < subscription("canceled"));
        assert!(invoice("open") < invoice("void"));
        assert!(session("complete") < session("expired"));
        // "paid" is not a subscription status: it must not take an invoice's place.
        assert!(subscription("paid") < subscription("active"));
    }

    #[test]
    fn kinds_without_a_lifecycle_and_snapshots_without_a_status_never_outrank_one_with_a_status() {
        for status in [None, Some("active"), Some("canceled"), Some("void")] {
            for kind in [ObjectKind::Customer, ObjectKind::EntitlementSummary] {
                assert_eq!(
                    status_rank(kind, status),
                    status_rank(ObjectKind::Customer, None),
                    "{kind:?} {status:?}"
                );
            }
        }
        for (kind, lowest) in [
            (ObjectKind::Subscription, "incomplete"),
            (ObjectKind::Invoice, "draft"),
            (ObjectKind::CheckoutSession, "open"),
        ] {
            assert!(
                status_rank(kind, None) <= status_rank(kind, Some(lowest)),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn rank_round_trips_through_serde() {
        let original = rank("invoice.paid", 1_700_000_000, 2, "evt_1");
        let json = serde_json::to_string(&original).expect("serializes");
        let back: Rank = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, original);
    }
}
