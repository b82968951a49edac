//! A customer's projected state, and the batch coalescing the store relies on.
//!
//! Per object the state keeps the snapshot with the greatest [`Rank`], replacing it only with a
//! strictly greater one. That is a max over a total order, so applying any permutation of a set
//! of events, with any duplicates, converges to the same state (see `properties.rs`).

use std::borrow::Borrow;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};

use super::rank::Rank;
use super::snapshot::{
    CheckoutSessionSnapshot, CustomerSnapshot, EntitlementSummarySnapshot, InvoiceSnapshot,
    ObjectKind, Snapshot, SubscriptionSnapshot,
};
use super::ProjectedEvent;

/// Everything the projection knows about one customer of one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerState {
    /// The Connect account, `""` for the platform.
    pub account: String,
    pub customer: String,
    pub profile: Option<(Rank, CustomerSnapshot)>,
    /// Sticky: once a deleted customer snapshot is seen, a deleted Stripe customer cannot come
    /// back, so no later or reordered event may resurrect its access.
    pub deleted: bool,
    pub subscriptions: BTreeMap<String, (Rank, SubscriptionSnapshot)>,
    pub invoices: BTreeMap<String, (Rank, InvoiceSnapshot)>,
    pub checkout_sessions: BTreeMap<String, (Rank, CheckoutSessionSnapshot)>,
    pub summary: Option<(Rank, EntitlementSummarySnapshot)>,
    /// The greatest `created` among the events applied (0 before any): a deterministic
    /// "updated at", equal after a replay.
    pub last_event_created: i64,
}

impl CustomerState {
    pub fn new(account: impl Into<String>, customer: impl Into<String>) -> Self {
        CustomerState {
            account: account.into(),
            customer: customer.into(),
            profile: None,
            deleted: false,
            subscriptions: BTreeMap::new(),
            invoices: BTreeMap::new(),
            checkout_sessions: BTreeMap::new(),
            summary: None,
            last_event_created: 0,
        }
    }

    /// Applies one event. Events without a snapshot, and events of another (account, customer),
    /// leave the state untouched: a misrouted event must never leak into another customer's or
    /// another Connect account's entitlements.
    pub fn apply(&mut self, event: &ProjectedEvent) {
        let Some(snapshot) = &event.snapshot else {
            return;
        };
        if event.account != self.account || event.customer.as_deref() != Some(&self.customer) {
            return;
        }
        self.last_event_created = self.last_event_created.max(event.created);
        let rank = &event.rank;
        match snapshot {
            Snapshot::Customer(s) => {
                self.deleted |= s.deleted;
                keep_newer(&mut self.profile, rank, s);
            }
            Snapshot::Subscription(s) => keep_newer_in(&mut self.subscriptions, &s.id, rank, s),
            Snapshot::Invoice(s) => keep_newer_in(&mut self.invoices, &s.id, rank, s),
            Snapshot::CheckoutSession(s) => {
                keep_newer_in(&mut self.checkout_sessions, &s.id, rank, s)
            }
            Snapshot::EntitlementSummary(s) => keep_newer(&mut self.summary, rank, s),
        }
    }

    /// Whether any snapshot of this customer has been applied.
    pub fn is_known(&self) -> bool {
        self.profile.is_some()
            || self.deleted
            || !self.subscriptions.is_empty()
            || !self.invoices.is_empty()
            || !self.checkout_sessions.is_empty()
            || self.summary.is_some()
    }
}

/// The rule the whole projection (and the store's upsert) follows: take the incoming snapshot
/// only if nothing is held yet or its rank is strictly greater. Equal ranks are the same event
/// again, so keeping the held one makes redelivery a no-op.
pub fn newer(current: Option<&Rank>, incoming: &Rank) -> bool {
    current.is_none_or(|current| incoming > current)
}

fn keep_newer<T: Clone>(slot: &mut Option<(Rank, T)>, rank: &Rank, snapshot: &T) {
    if newer(slot.as_ref().map(|(held, _)| held), rank) {
        *slot = Some((rank.clone(), snapshot.clone()));
    }
}

fn keep_newer_in<T: Clone>(
    objects: &mut BTreeMap<String, (Rank, T)>,
    id: &str,
    rank: &Rank,
    snapshot: &T,
) {
    if newer(objects.get(id).map(|(held, _)| held), rank) {
        objects.insert(id.to_owned(), (rank.clone(), snapshot.clone()));
    }
}

/// One projected object: Stripe ids are unique per account and kind.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub account: String,
    pub kind: ObjectKind,
    pub id: String,
}

impl ObjectKey {
    /// The object `snapshot` (of `event`) is a snapshot of.
    pub fn of(event: &ProjectedEvent, snapshot: &Snapshot) -> Self {
        ObjectKey {
            account: event.account.clone(),
            kind: snapshot.kind(),
            id: snapshot.object_id().to_owned(),
        }
    }
}

/// Keeps in `objects[key]` whichever of the held event and `event` has the greater rank, under
/// [`newer`]: what every coalescing of a batch or a chunk does per object.
pub fn keep_max_rank<E: Borrow<ProjectedEvent>>(
    objects: &mut HashMap<ObjectKey, E>,
    key: ObjectKey,
    event: E,
) {
    match objects.entry(key) {
        Entry::Occupied(mut held) => {
            if newer(Some(&held.get().borrow().rank), &event.borrow().rank) {
                held.insert(event);
            }
        }
        Entry::Vacant(slot) => {
            slot.insert(event);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CustomerKey {
    pub account: String,
    pub customer: String,
}

/// What a batch changes for one customer besides its objects' snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CustomerTouch {
    /// The greatest `created` of the batch's events for the customer.
    pub last_event_created: i64,
    /// A deleted customer snapshot was in the batch. Reported apart from the snapshots
    /// because a later `customer.updated` can out-rank the deletion in `objects` while the
    /// deletion must still stick (`deleted = deleted OR this`).
    pub deleted: bool,
}

/// A batch reduced to what the store must write.
///
/// Hashed, not ordered: the ordered maps' key comparisons (`memcmp` over account, kind and id)
/// were the largest item of the projector's profile during a catch-up (BENCHMARKS.md,
/// "Catch-up"). Where the order is observable (the rows' order in an upsert, the order of a
/// batch's change messages) the store sorts once, with [`CoalescedBatch::sorted_objects`] and
/// [`CoalescedBatch::sorted_customers`].
/// It borrows the batch's events: a batch of 5,000 snapshots is not copied again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CoalescedBatch<'e> {
    /// Per object, the event carrying its max-rank snapshot; the store upserts only these,
    /// each under the same `incoming > stored` rule as [`newer`].
    pub objects: HashMap<ObjectKey, &'e ProjectedEvent>,
    /// Every customer the batch touched, whose entitlements must be recomputed.
    pub customers: HashMap<CustomerKey, CustomerTouch>,
}

impl<'e> CoalescedBatch<'e> {
    /// Adds one event; events without a snapshot change nothing.
    pub fn push(&mut self, event: &'e ProjectedEvent) {
        let Some(snapshot) = &event.snapshot else {
            return;
        };
        if let Some(customer) = &event.customer {
            let key = CustomerKey {
                account: event.account.clone(),
                customer: customer.clone(),
            };
            let deleted = matches!(snapshot, Snapshot::Customer(c) if c.deleted);
            self.customers
                .entry(key)
                .and_modify(|touch| {
                    touch.last_event_created = touch.last_event_created.max(event.created);
                    touch.deleted |= deleted;
                })
                .or_insert(CustomerTouch {
                    last_event_created: event.created,
                    deleted,
                });
        }
        keep_max_rank(&mut self.objects, ObjectKey::of(event, snapshot), event);
    }

    /// The objects in key order: one order for every writer of the same rows.
    pub fn sorted_objects(&self) -> Vec<(&ObjectKey, &'e ProjectedEvent)> {
        let mut objects: Vec<_> = self.objects.iter().map(|(k, e)| (k, *e)).collect();
        objects.sort_unstable_by(|a, b| a.0.cmp(b.0));
        objects
    }

    /// The touched customers in key order: a batch's change messages are written in this
    /// deterministic order.
    pub fn sorted_customers(&self) -> Vec<&CustomerKey> {
        let mut customers: Vec<_> = self.customers.keys().collect();
        customers.sort_unstable();
        customers
    }
}

/// Coalesces a batch: per (account, object kind, object id) only the max-rank snapshot.
pub fn coalesce<'e>(events: impl IntoIterator<Item = &'e ProjectedEvent>) -> CoalescedBatch<'e> {
    let mut batch = CoalescedBatch::default();
    for event in events {
        batch.push(event);
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::testing::{self, event, Api, CUSTOMER, T0};

    fn subscription_event(
        event_type: &str,
        status: &str,
        created: i64,
        id: &str,
    ) -> ProjectedEvent {
        let object = testing::subscription(Api::Legacy, "sub_1", status, &[]);
        event(event_type, object).created(created).id(id).project()
    }

    fn state_after(events: &[ProjectedEvent]) -> CustomerState {
        let mut state = CustomerState::new("", CUSTOMER);
        for e in events {
            state.apply(e);
        }
        state
    }

    fn held_status(state: &CustomerState) -> &str {
        &state.subscriptions["sub_1"].1.status
    }

    #[test]
    fn newer_takes_only_a_strictly_greater_rank() {
        let low = Rank::of("invoice.paid", T0, 2, "evt_a");
        let high = Rank::of("invoice.paid", T0, 2, "evt_b");

        assert!(newer(None, &low));
        assert!(newer(Some(&low), &high));
        assert!(!newer(Some(&high), &low));
        assert!(!newer(Some(&low), &low));
    }

    #[test]
    fn later_snapshot_replaces_an_earlier_one_in_either_order() {
        // Arrange
        let created =
            subscription_event("customer.subscription.created", "incomplete", T0, "evt_1");
        let updated =
            subscription_event("customer.subscription.updated", "active", T0 + 5, "evt_2");

        // Act
        let in_order = state_after(&[created.clone(), updated.clone()]);
        let reversed = state_after(&[updated, created]);

        // Assert
        assert_eq!(held_status(&in_order), "active");
        assert_eq!(in_order, reversed);
    }

    #[test]
    fn same_second_deleted_wins_over_updated_and_created() {
        let created = subscription_event("customer.subscription.created", "active", T0, "evt_c");
        let updated = subscription_event("customer.subscription.updated", "past_due", T0, "evt_b");
        let deleted = subscription_event("customer.subscription.deleted", "canceled", T0, "evt_a");

        let state = state_after(&[deleted, updated, created]);

        assert_eq!(held_status(&state), "canceled");
    }

    #[test]
    fn same_second_created_loses_to_updated_even_with_a_higher_status() {
        // The created event carries a later-looking status, but the type rank decides first.
        let created = subscription_event("customer.subscription.created", "past_due", T0, "evt_z");
        let updated = subscription_event("customer.subscription.updated", "active", T0, "evt_a");

        let state = state_after(&[updated, created]);

        assert_eq!(held_status(&state), "active");
    }

    #[test]
    fn same_second_same_type_is_broken_by_status() {
        let active = subscription_event("customer.subscription.updated", "active", T0, "evt_z");
        let past_due = subscription_event("customer.subscription.updated", "past_due", T0, "evt_a");

        assert_eq!(
            held_status(&state_after(&[past_due.clone(), active.clone()])),
            "past_due"
        );
        assert_eq!(held_status(&state_after(&[active, past_due])), "past_due");
    }

    #[test]
    fn full_tie_is_broken_by_event_id() {
        let mut a = subscription_event("customer.subscription.updated", "active", T0, "evt_a");
        let mut b = subscription_event("customer.subscription.updated", "active", T0, "evt_b");
        // Same rank but the event ids; tell the snapshots apart by a field the rank ignores.
        if let Some(Snapshot::Subscription(s)) = &mut a.snapshot {
            s.cancel_at_period_end = false;
        }
        if let Some(Snapshot::Subscription(s)) = &mut b.snapshot {
            s.cancel_at_period_end = true;
        }

        let state = state_after(&[b.clone(), a.clone()]);

        assert!(state.subscriptions["sub_1"].1.cancel_at_period_end);
        assert_eq!(state, state_after(&[a, b]));
    }

    #[test]
    fn duplicate_event_is_a_no_op() {
        let updated = subscription_event("customer.subscription.updated", "active", T0, "evt_1");
        let once = state_after(std::slice::from_ref(&updated));

        let twice = state_after(&[updated.clone(), updated]);

        assert_eq!(once, twice);
    }

    #[test]
    fn events_of_another_customer_or_account_are_ignored() {
        let mut state = CustomerState::new("", CUSTOMER);
        let connect = event(
            "customer.subscription.created",
            testing::subscription(Api::Legacy, "sub_1", "active", &[]),
        )
        .account("acct_1")
        .project();
        let mut other = testing::subscription(Api::Legacy, "sub_2", "active", &[]);
        testing::set(&mut other, "/customer", serde_json::json!("cus_other"));
        let other = event("customer.subscription.created", other).project();

        state.apply(&connect);
        state.apply(&other);

        assert_eq!(state, CustomerState::new("", CUSTOMER));
        assert!(!state.is_known());
    }

    #[test]
    fn events_without_snapshot_are_ignored() {
        let mut state = CustomerState::new("", CUSTOMER);
        let mut object = testing::fixture(Api::Legacy, "invoice");
        testing::set(&mut object, "/object", serde_json::json!("invoiceitem"));
        let ignored = event("invoiceitem.created", object)
            .created(T0 + 99)
            .project();

        state.apply(&ignored);

        assert_eq!(state.last_event_created, 0);
    }

    #[test]
    fn customer_deletion_is_sticky_against_a_later_update() {
        let deleted = event("customer.deleted", testing::customer(CUSTOMER))
            .created(T0)
            .project();
        let updated = event("customer.updated", testing::customer(CUSTOMER))
            .created(T0 + 10)
            .project();

        let state = state_after(&[deleted, updated]);

        assert!(state.deleted);
        assert!(!state.profile.as_ref().expect("profile").1.deleted);
    }

    #[test]
    fn last_event_created_is_the_max_created_seen() {
        let late = subscription_event("customer.subscription.updated", "active", T0 + 7, "evt_2");
        let early = subscription_event("customer.subscription.created", "active", T0, "evt_1");

        let state = state_after(&[late, early]);

        assert_eq!(state.last_event_created, T0 + 7);
    }

    #[test]
    fn invoice_paid_records_paid_through() {
        let mut object = testing::invoice(Api::Legacy, "in_1", "paid");
        testing::set(&mut object, "/paid", serde_json::json!(true));
        testing::set(
            &mut object,
            "/lines/data/0/period/end",
            serde_json::json!(T0 + 2_592_000),
        );

        let state = state_after(&[event("invoice.paid", object).project()]);

        let (_, invoice) = &state.invoices["in_1"];
        assert!(invoice.paid);
        assert_eq!(invoice.paid_through, Some(T0 + 2_592_000));
    }

    #[test]
    fn invoice_payment_failed_records_dunning() {
        let mut object = testing::invoice(Api::Basil, "in_1", "open");
        testing::set(&mut object, "/attempt_count", serde_json::json!(2));
        testing::set(
            &mut object,
            "/next_payment_attempt",
            serde_json::json!(T0 + 86_400),
        );
        let failed = event("invoice.payment_failed", object)
            .created(T0)
            .project();
        let finalized = event(
            "invoice.finalized",
            testing::invoice(Api::Basil, "in_1", "open"),
        )
        .created(T0 - 60)
        .project();

        let state = state_after(&[failed, finalized]);

        let (_, invoice) = &state.invoices["in_1"];
        assert!(!invoice.paid);
        assert_eq!(invoice.attempt_count, 2);
        assert_eq!(invoice.next_payment_attempt, Some(T0 + 86_400));
        assert_eq!(
            invoice.subscription.as_deref(),
            Some("sub_1MoqxHLgUG5tbmjcG8lOfx2N")
        );
    }

    #[test]
    fn coalesce_keeps_the_max_rank_snapshot_per_object() {
        let a1 = subscription_event("customer.subscription.created", "incomplete", T0, "evt_1");
        let a2 = subscription_event("customer.subscription.updated", "active", T0 + 1, "evt_2");
        let a0 = subscription_event("customer.subscription.updated", "trialing", T0 - 5, "evt_0");
        let inv = event(
            "invoice.paid",
            testing::invoice(Api::Legacy, "in_1", "paid"),
        )
        .created(T0 + 3)
        .project();

        let batch = coalesce([&a1, &a2, &a0, &inv]);

        assert_eq!(batch.objects.len(), 2);
        let sub_key = ObjectKey {
            account: String::new(),
            kind: ObjectKind::Subscription,
            id: "sub_1".into(),
        };
        assert_eq!(batch.objects[&sub_key], &a2);
        let inv_key = ObjectKey {
            account: String::new(),
            kind: ObjectKind::Invoice,
            id: "in_1".into(),
        };
        assert_eq!(batch.objects[&inv_key], &inv);
        let customer = CustomerKey {
            account: String::new(),
            customer: CUSTOMER.into(),
        };
        assert_eq!(
            batch.customers[&customer],
            CustomerTouch {
                last_event_created: T0 + 3,
                deleted: false
            }
        );
    }

    #[test]
    fn coalesce_reports_a_deletion_outranked_by_a_later_update() {
        let deleted = event("customer.deleted", testing::customer(CUSTOMER))
            .created(T0)
            .project();
        let updated = event("customer.updated", testing::customer(CUSTOMER))
            .created(T0 + 1)
            .project();

        let batch = coalesce([&deleted, &updated]);

        let key = ObjectKey {
            account: String::new(),
            kind: ObjectKind::Customer,
            id: CUSTOMER.into(),
        };
        assert_eq!(batch.objects[&key], &updated);
        let customer = CustomerKey {
            account: String::new(),
            customer: CUSTOMER.into(),
        };
        assert!(batch.customers[&customer].deleted);
    }

    #[test]
    fn coalesce_keeps_connect_accounts_apart() {
        let object = || testing::subscription(Api::Legacy, "sub_1", "active", &[]);
        let platform = event("customer.subscription.created", object()).project();
        let connect = event("customer.subscription.created", object())
            .account("acct_1")
            .project();

        let batch = coalesce([&platform, &connect]);

        assert_eq!(batch.objects.len(), 2);
        assert_eq!(batch.customers.len(), 2);
    }

    #[test]
    fn coalesce_keys_the_entitlement_summary_by_customer() {
        let old = event(
            "entitlements.active_entitlement_summary.updated",
            testing::entitlement_summary(CUSTOMER, &["a"]),
        )
        .created(T0)
        .project();
        let new = event(
            "entitlements.active_entitlement_summary.updated",
            testing::entitlement_summary(CUSTOMER, &["b"]),
        )
        .created(T0 + 1)
        .project();

        let batch = coalesce([&new, &old]);

        let key = ObjectKey {
            account: String::new(),
            kind: ObjectKind::EntitlementSummary,
            id: CUSTOMER.into(),
        };
        assert_eq!(batch.objects[&key], &new);
    }
}
