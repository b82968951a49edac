//! Order-insensitivity, checked as a property: Stripe-like event histories applied in order and
//! in any arrival order with redeliveries end in the same state, whose every object holds the
//! snapshot of its max-rank event (SPEC §6). Backfills mixed into such histories (SPEC §11)
//! keep that, and end in the state of the webhooks alone.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use serde_json::json;
use shared::envelope::backfilled_event_type;

use super::entitlements::{compute, EntitlementView};
use super::policy::EntitlementPolicy;
use super::rank::Rank;
use super::snapshot::Snapshot;
use super::state::{coalesce, CustomerState};
use super::testing::{self, event, policy, set, Api, Item, CUSTOMER, POLICY, T0};
use super::ProjectedEvent;

const STATUSES: [&str; 8] = [
    "incomplete",
    "trialing",
    "active",
    "past_due",
    "unpaid",
    "paused",
    "canceled",
    "incomplete_expired",
];

const PLANS: [Item<'static>; 4] = [
    ("price_pro_month", "prod_pro", None),
    ("price_team_month", "prod_team", None),
    ("price_ent_year", "prod_ent", Some("enterprise")),
    ("price_basic", "prod_basic", None),
];

/// One generated event, before it is rendered as a Stripe payload.
#[derive(Debug, Clone)]
struct Step {
    family: Family,
    /// Which of up to three objects of the family.
    object: usize,
    status: usize,
    plan: usize,
    /// Seconds since the previous event: mostly 0, since same-second ties are where ordering
    /// bugs hide.
    gap: i64,
    /// Randomises the event id so that id order is unrelated to history order.
    salt: u32,
    api: Api,
    flag: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Subscription,
    Invoice,
    CheckoutSession,
    Summary,
    Customer,
}

fn gap() -> impl Strategy<Value = i64> {
    prop_oneof![4 => Just(0_i64), 2 => Just(1_i64), 1 => 2_i64..3_600]
}

fn api() -> impl Strategy<Value = Api> {
    prop_oneof![Just(Api::Legacy), Just(Api::Basil)]
}

fn step(family: impl Strategy<Value = Family>, objects: usize) -> impl Strategy<Value = Step> {
    (
        family,
        0..objects,
        0..STATUSES.len(),
        0..PLANS.len(),
        gap(),
        any::<u32>(),
        api(),
        any::<bool>(),
    )
        .prop_map(
            |(family, object, status, plan, gap, salt, api, flag)| Step {
                family,
                object,
                status,
                plan,
                gap,
                salt,
                api,
                flag,
            },
        )
}

/// Renders steps as events with non-decreasing `created` and distinct ids.
fn history(steps: Vec<Step>) -> Vec<ProjectedEvent> {
    let mut created = T0;
    let mut seen = BTreeMap::new();
    steps
        .into_iter()
        .enumerate()
        .map(|(index, step)| {
            created += step.gap;
            let first = seen.insert((step.family as u8, step.object), ()).is_none();
            let id = format!("evt_{:08x}{index:03}", step.salt);
            render(&step, first)
                .id(&id)
                .created(created)
                .api(step.api)
                .project()
        })
        .collect()
}

fn render(step: &Step, first: bool) -> testing::Event {
    match step.family {
        Family::Subscription => {
            let id = format!("sub_{}", step.object);
            let status = STATUSES[step.status];
            // A plan change now and then, and a second item sometimes.
            let mut items = vec![PLANS[step.plan]];
            if step.flag {
                items.push(PLANS[(step.plan + 1) % PLANS.len()]);
            }
            let event_type = match status {
                _ if first => "customer.subscription.created",
                "canceled" | "incomplete_expired" if step.flag => "customer.subscription.deleted",
                "paused" => "customer.subscription.paused",
                "active" if step.flag => "customer.subscription.resumed",
                _ => "customer.subscription.updated",
            };
            event(
                event_type,
                testing::subscription(step.api, &id, status, &items),
            )
        }
        Family::Invoice => {
            let statuses = ["draft", "open", "paid", "uncollectible", "void"];
            let status = statuses[step.status % statuses.len()];
            let mut object = testing::invoice(step.api, &format!("in_{}", step.object), status);
            set(&mut object, "/attempt_count", json!(step.status));
            let event_type = match status {
                "paid" => "invoice.paid",
                "open" if step.flag => "invoice.payment_failed",
                "void" => "invoice.voided",
                _ if first => "invoice.created",
                _ => "invoice.updated",
            };
            event(event_type, object)
        }
        Family::CheckoutSession => {
            let statuses = ["open", "complete", "expired"];
            let status = statuses[step.status % statuses.len()];
            let paid = if step.flag { "paid" } else { "unpaid" };
            let mut object =
                testing::checkout_session(&format!("cs_{}", step.object), "payment", paid);
            // A session's own creation time is fixed for the object, whatever its events.
            set(
                &mut object,
                "/created",
                json!(T0 - 600 + step.object as i64),
            );
            set(&mut object, "/status", json!(status));
            set(&mut object, "/metadata/price", json!("price_lifetime"));
            set(
                &mut object,
                "/client_reference_id",
                json!(format!("user_{}", step.plan)),
            );
            let event_type = match (status, step.flag) {
                ("expired", _) => "checkout.session.expired",
                ("complete", true) => "checkout.session.async_payment_succeeded",
                _ => "checkout.session.completed",
            };
            event(event_type, object)
        }
        Family::Summary => {
            let keys: Vec<&str> = ["sso", "beta", "audit"][..step.plan % 4].to_vec();
            event(
                "entitlements.active_entitlement_summary.updated",
                testing::entitlement_summary(CUSTOMER, &keys),
            )
        }
        Family::Customer => {
            let event_type = match step.status % 4 {
                _ if first => "customer.created",
                0 => "customer.deleted",
                _ => "customer.updated",
            };
            let mut object = testing::customer(CUSTOMER);
            set(
                &mut object,
                "/email",
                json!(format!("user{}@example.com", step.plan)),
            );
            event(event_type, object)
        }
    }
}

/// The history, and an arrival of it: shuffled, with some events redelivered.
fn arrivals(
    history: impl Strategy<Value = Vec<ProjectedEvent>>,
) -> impl Strategy<Value = (Vec<ProjectedEvent>, Vec<ProjectedEvent>)> {
    history.prop_flat_map(|events| (Just(events.clone()), arrival(events)))
}

/// `events` shuffled, with some of them redelivered.
fn arrival(events: Vec<ProjectedEvent>) -> impl Strategy<Value = Vec<ProjectedEvent>> {
    let n = events.len();
    prop::collection::vec(0..n, 0..=n).prop_flat_map(move |redelivered| {
        let mut arrival = events.clone();
        arrival.extend(redelivered.iter().map(|&i| events[i].clone()));
        Just(arrival).prop_shuffle()
    })
}

fn subscription_lifecycles() -> impl Strategy<Value = Vec<ProjectedEvent>> {
    (1..=3_usize)
        .prop_flat_map(|subscriptions| {
            prop::collection::vec(step(Just(Family::Subscription), subscriptions), 1..24)
        })
        .prop_map(history)
}

fn any_family() -> impl Strategy<Value = Family> {
    prop_oneof![
        4 => Just(Family::Subscription),
        2 => Just(Family::Invoice),
        2 => Just(Family::CheckoutSession),
        1 => Just(Family::Summary),
        1 => Just(Family::Customer),
    ]
}

fn mixed_histories() -> impl Strategy<Value = Vec<ProjectedEvent>> {
    prop::collection::vec(step(any_family(), 2), 1..24).prop_map(history)
}

/// A webhook history, and the same history with backfills run in between.
#[derive(Debug, Clone)]
struct Backfilled {
    webhooks: Vec<ProjectedEvent>,
    /// `webhooks` with each backfill's snapshots where it ran.
    mixed: Vec<ProjectedEvent>,
}

/// Each backfill runs after one event of the history and fetches every object seen so far:
/// its current snapshot (the max-rank one), as the API would answer then, in the second after
/// that event. The next event comes at least a second after the fetch, so no webhook shares
/// the backfill's second, where the type rank alone would decide between the two.
fn backfilled_histories() -> impl Strategy<Value = Backfilled> {
    (
        prop::collection::vec(step(any_family(), 2), 1..24),
        prop::collection::vec(any::<prop::sample::Index>(), 1..4),
    )
        .prop_map(|(mut steps, points)| {
            let points: BTreeSet<usize> = points.iter().map(|p| p.index(steps.len())).collect();
            for &point in &points {
                if let Some(next) = steps.get_mut(point + 1) {
                    next.gap = next.gap.max(2);
                }
            }
            let webhooks = history(steps);
            let mut mixed = Vec::new();
            for (index, webhook) in webhooks.iter().enumerate() {
                mixed.push(webhook.clone());
                if points.contains(&index) {
                    mixed.extend(backfill(&webhooks[..=index], index, webhook.created + 1));
                }
            }
            Backfilled { webhooks, mixed }
        })
}

/// The backfill records of every object in `seen`, fetched at `fetched_at`. Stripe's list
/// endpoints leave deleted customers out.
fn backfill(seen: &[ProjectedEvent], run: usize, fetched_at: i64) -> Vec<ProjectedEvent> {
    truth(seen)
        .into_values()
        .filter(|(_, snapshot)| !matches!(snapshot, Snapshot::Customer(c) if c.deleted))
        .map(|(_, snapshot)| {
            let object: serde_json::Value =
                serde_json::from_str(snapshot.raw()).expect("the snapshot's own JSON");
            let kind = snapshot.kind();
            event(&backfilled_event_type(kind.stripe_object()), object)
                .id(&format!("evt_bf_{run}_{kind}_{}", snapshot.object_id()))
                .created(fetched_at)
                .project()
        })
        .collect()
}

/// The view without `updated_at`, which is the latest `created` applied and so moves with a
/// backfill's fetch time.
fn view_content(state: &CustomerState, policy: &EntitlementPolicy) -> EntitlementView {
    EntitlementView {
        updated_at_unix: 0,
        ..compute(state, policy)
    }
}

/// Every object's current snapshot, without the rank it came with.
fn contents(state: &CustomerState) -> BTreeMap<(u8, String), Snapshot> {
    held(state)
        .into_iter()
        .map(|(key, (_, snapshot))| (key, snapshot))
        .collect()
}

fn replay(events: &[ProjectedEvent]) -> CustomerState {
    let mut state = CustomerState::new("", CUSTOMER);
    for e in events {
        state.apply(e);
    }
    state
}

/// Per object, the snapshot of its max-rank event: what Stripe's current state was.
fn truth(events: &[ProjectedEvent]) -> BTreeMap<(u8, String), (Rank, Snapshot)> {
    let mut truth: BTreeMap<(u8, String), (Rank, Snapshot)> = BTreeMap::new();
    for e in events {
        let snapshot = e.snapshot.clone().expect("generated events have snapshots");
        let key = (snapshot.kind() as u8, snapshot.object_id().to_owned());
        let beaten = truth.get(&key).is_none_or(|(rank, _)| e.rank > *rank);
        if beaten {
            truth.insert(key, (e.rank.clone(), snapshot));
        }
    }
    truth
}

/// Every object of the state, in the shape of [`truth`].
fn held(state: &CustomerState) -> BTreeMap<(u8, String), (Rank, Snapshot)> {
    let mut held = BTreeMap::new();
    let mut put = |snapshot: Snapshot, rank: &Rank| {
        held.insert(
            (snapshot.kind() as u8, snapshot.object_id().to_owned()),
            (rank.clone(), snapshot),
        );
    };
    if let Some((rank, s)) = &state.profile {
        put(Snapshot::Customer(s.clone()), rank);
    }
    for (rank, s) in state.subscriptions.values() {
        put(Snapshot::Subscription(s.clone()), rank);
    }
    for (rank, s) in state.invoices.values() {
        put(Snapshot::Invoice(s.clone()), rank);
    }
    for (rank, s) in state.checkout_sessions.values() {
        put(Snapshot::CheckoutSession(s.clone()), rank);
    }
    if let Some((rank, s)) = &state.summary {
        put(Snapshot::EntitlementSummary(s.clone()), rank);
    }
    held
}

fn policies() -> [EntitlementPolicy; 2] {
    [
        policy(POLICY),
        policy(&POLICY.replace("past_due = \"grant\"", "past_due = \"revoke\"")),
    ]
}

fn assert_converges(history: &[ProjectedEvent], arrival: &[ProjectedEvent]) {
    let in_order = replay(history);
    let shuffled = replay(arrival);
    let coalesced = replay(
        &coalesce(arrival)
            .objects
            .into_values()
            .cloned()
            .collect::<Vec<_>>(),
    );

    assert_eq!(in_order, shuffled);
    assert_eq!(held(&in_order), truth(history));
    for policy in policies() {
        assert_eq!(compute(&in_order, &policy), compute(&shuffled, &policy));
    }
    // The store writes only the coalesced snapshots; with the sticky deletion reported apart
    // (see `CoalescedBatch::customers`), that loses nothing.
    assert_eq!(held(&coalesced), held(&in_order));
    assert_eq!(coalesced.last_event_created, in_order.last_event_created);
    let deleted_in_batch = coalesce(arrival).customers.values().any(|t| t.deleted);
    assert_eq!(coalesced.deleted || deleted_in_batch, in_order.deleted);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn backfills_mixed_into_webhooks_converge_to_the_webhooks_state(
        (history, arrival) in backfilled_histories().prop_flat_map(|h| {
            let mixed = h.mixed.clone();
            (Just(h), arrival(mixed))
        })
    ) {
        assert_converges(&history.mixed, &arrival);
        let webhooks = replay(&history.webhooks);
        let mixed = replay(&arrival);
        assert_eq!(contents(&mixed), contents(&webhooks));
        assert_eq!(mixed.deleted, webhooks.deleted);
        for policy in policies() {
            assert_eq!(view_content(&mixed, &policy), view_content(&webhooks, &policy));
        }
    }

    #[test]
    fn subscription_lifecycles_converge_under_any_arrival_order(
        (history, arrival) in arrivals(subscription_lifecycles())
    ) {
        assert_converges(&history, &arrival);
    }

    #[test]
    fn mixed_histories_converge_under_any_arrival_order(
        (history, arrival) in arrivals(mixed_histories())
    ) {
        assert_converges(&history, &arrival);
    }
}
