//! Backfill snapshots and the API's other shapes, specified as tests: `ingest backfill` (and
//! the fetch after a thin event) appends each object read from Stripe's API as an event of
//! type `<object type>.backfilled` whose `created` is the second it was fetched (SPEC §11).
//!
//! The projection needs no code of its own for them. [`ObjectKind::for_event_type`] puts
//! each type in its object's family, so it parses exactly like Stripe's own events of that
//! object, and [`Rank`] gives `.backfilled` the type rank of "other" types: a snapshot
//! fetched at T ranks above every event created before T, below every event created after
//! it, and within T as `*.created` < other < `*.deleted` says.

use serde_json::{json, Value};
use shared::envelope::backfilled_event_type;

use super::entitlements::compute;
use super::snapshot::{ObjectKind, Snapshot};
use super::state::CustomerState;
use super::testing::{self, event, policy, set, Api, CUSTOMER, POLICY, T0};
use super::{EntitlementView, ProjectedEvent, Rank};

const LOCALSTRIPE: &str = include_str!("fixtures/localstripe-1.15.10.json");

/// The second the backfill fetched its objects.
const FETCHED_AT: i64 = T0 + 600;

const PRO: testing::Item<'static> = ("price_pro_month", "prod_pro", None);

fn view(events: &[ProjectedEvent]) -> EntitlementView {
    let customer = events
        .iter()
        .find_map(|e| e.customer.clone())
        .unwrap_or_else(|| CUSTOMER.to_owned());
    let mut state = CustomerState::new("", customer);
    for e in events {
        state.apply(e);
    }
    compute(&state, &policy(POLICY))
}

fn features(view: &EntitlementView) -> Vec<&str> {
    view.features.iter().map(String::as_str).collect()
}

fn backfilled(object: Value) -> testing::Event {
    let object_type = object["object"]
        .as_str()
        .expect("an object type")
        .to_owned();
    event(&backfilled_event_type(&object_type), object).created(FETCHED_AT)
}

fn subscription(status: &str) -> Value {
    testing::subscription(Api::Legacy, "sub_1", status, &[PRO])
}

#[test]
fn backfilled_types_belong_to_their_objects_family() {
    let cases = [
        ("customer", ObjectKind::Customer),
        ("subscription", ObjectKind::Subscription),
        ("invoice", ObjectKind::Invoice),
        ("checkout.session", ObjectKind::CheckoutSession),
        (
            "entitlements.active_entitlement_summary",
            ObjectKind::EntitlementSummary,
        ),
    ];
    for (object_type, kind) in cases {
        let event_type = backfilled_event_type(object_type);
        assert_eq!(
            ObjectKind::for_event_type(&event_type),
            Some(kind),
            "{event_type}"
        );
        assert_eq!(kind.stripe_object(), object_type);
    }
}

#[test]
fn each_backfilled_type_projects_like_the_matching_snapshot_event() {
    let mut session = testing::checkout_session("cs_1", "payment", "paid");
    set(&mut session, "/metadata/price", json!("price_lifetime"));
    set(&mut session, "/client_reference_id", json!("user_42"));
    let cases = [
        ("customer.updated", testing::customer(CUSTOMER)),
        ("customer.subscription.updated", subscription("active")),
        ("invoice.paid", testing::invoice(Api::Basil, "in_1", "paid")),
        ("checkout.session.completed", session),
        (
            "entitlements.active_entitlement_summary.updated",
            testing::entitlement_summary(CUSTOMER, &["sso"]),
        ),
    ];
    for (webhook_type, object) in cases {
        let webhook = event(webhook_type, object.clone())
            .created(FETCHED_AT)
            .project();

        let snapshot = backfilled(object).project();

        assert!(snapshot.event_type.ends_with(".backfilled"));
        assert!(snapshot.snapshot.is_some(), "{webhook_type}");
        assert_eq!(snapshot.snapshot, webhook.snapshot, "{webhook_type}");
        assert_eq!(snapshot.customer, webhook.customer, "{webhook_type}");
        assert_eq!(snapshot.rank.type_rank, webhook.rank.type_rank);
        assert_eq!(snapshot.rank.status_rank, webhook.rank.status_rank);
        assert!(!snapshot.thin);
        assert_eq!(view(&[snapshot]), view(&[webhook]), "{webhook_type}");
    }
}

#[test]
fn backfilled_snapshot_ranks_above_every_event_of_the_second_before() {
    let snapshot = backfilled(subscription("active")).project();

    for (event_type, status) in [
        ("customer.subscription.created", "incomplete"),
        ("customer.subscription.updated", "canceled"),
        ("customer.subscription.deleted", "canceled"),
    ] {
        let webhook = event(event_type, subscription(status))
            .created(FETCHED_AT - 1)
            .project();
        assert!(snapshot.rank > webhook.rank, "{event_type}");
    }
}

#[test]
fn backfilled_snapshot_ranks_below_every_event_of_the_second_after() {
    let snapshot = backfilled(subscription("canceled")).project();

    for (event_type, status) in [
        ("customer.subscription.created", "incomplete"),
        ("customer.subscription.updated", "incomplete"),
        ("customer.subscription.deleted", "canceled"),
    ] {
        let webhook = event(event_type, subscription(status))
            .created(FETCHED_AT + 1)
            .project();
        assert!(snapshot.rank < webhook.rank, "{event_type}");
    }
}

#[test]
fn within_the_same_second_the_type_rank_decides() {
    let snapshot = backfilled(subscription("active")).project();
    let at_fetch = |event_type: &str, status: &str| {
        event(event_type, subscription(status))
            .created(FETCHED_AT)
            .project()
    };

    // Created ranks below, whatever its status; deleted ranks above.
    assert!(at_fetch("customer.subscription.created", "canceled").rank < snapshot.rank);
    assert!(at_fetch("customer.subscription.deleted", "incomplete").rank > snapshot.rank);
    // Another "other" type ties on the type rank: the status rank decides, as between two
    // webhooks of that second.
    assert!(at_fetch("customer.subscription.updated", "past_due").rank > snapshot.rank);
    assert!(at_fetch("customer.subscription.updated", "trialing").rank < snapshot.rank);
    let same_status = at_fetch("customer.subscription.updated", "active");
    assert_eq!(
        (
            same_status.rank.created,
            same_status.rank.type_rank,
            same_status.rank.status_rank
        ),
        (
            snapshot.rank.created,
            snapshot.rank.type_rank,
            snapshot.rank.status_rank
        )
    );
    assert_ne!(
        same_status.rank, snapshot.rank,
        "the event id breaks the tie"
    );
}

#[test]
fn backfill_after_the_webhooks_keeps_the_newer_state_and_a_later_webhook_replaces_it() {
    // Arrange: the customer's webhooks, then a backfill that saw the cancellation, then a
    // resubscription.
    let created = event("customer.subscription.created", subscription("active"))
        .created(T0)
        .project();
    let snapshot = backfilled(subscription("canceled")).project();
    let later = event("customer.subscription.updated", subscription("active"))
        .created(FETCHED_AT + 1)
        .project();

    // Act / Assert: in any order.
    for events in [
        vec![created.clone(), snapshot.clone()],
        vec![snapshot.clone(), created.clone()],
    ] {
        let v = view(&events);
        assert_eq!(v.subscriptions[0].status, "canceled");
        assert!(v.features.is_empty());
    }
    for events in [
        vec![created.clone(), snapshot.clone(), later.clone()],
        vec![later.clone(), snapshot.clone(), created.clone()],
    ] {
        let v = view(&events);
        assert_eq!(v.subscriptions[0].status, "active");
        assert_eq!(features(&v), ["api", "pro"]);
    }
}

#[test]
fn backfilled_subscriptions_grant_by_status_like_webhooks() {
    for (status, granted) in [
        ("active", true),
        ("trialing", true),
        ("past_due", true),
        ("canceled", false),
        ("incomplete", false),
        ("incomplete_expired", false),
        ("unpaid", false),
        ("paused", false),
    ] {
        let v = view(&[backfilled(subscription(status)).project()]);
        assert_eq!(!v.features.is_empty(), granted, "{status}");
        assert_eq!(v.subscriptions[0].status, status);
    }
}

#[test]
fn backfilled_completed_checkout_links_and_grants_like_checkout_completed() {
    let mut session = testing::checkout_session("cs_1", "payment", "paid");
    set(&mut session, "/metadata/price", json!("price_lifetime"));
    set(&mut session, "/client_reference_id", json!("user_42"));

    let from_backfill = view(&[backfilled(session.clone()).project()]);
    let from_webhook = view(&[event("checkout.session.completed", session).project()]);

    assert_eq!(
        from_backfill.client_reference_id.as_deref(),
        Some("user_42")
    );
    assert_eq!(features(&from_backfill), ["lifetime"]);
    assert_eq!(
        from_backfill.updated_at_unix - from_webhook.updated_at_unix,
        FETCHED_AT - T0
    );
    assert_eq!(
        EntitlementView {
            updated_at_unix: 0,
            ..from_backfill
        },
        EntitlementView {
            updated_at_unix: 0,
            ..from_webhook
        }
    );
}

#[test]
fn backfilled_open_or_expired_checkout_grants_nothing() {
    for status in ["open", "expired"] {
        for payment_status in ["unpaid", "paid"] {
            let mut session = testing::checkout_session("cs_1", "payment", payment_status);
            set(&mut session, "/status", json!(status));
            set(&mut session, "/metadata/price", json!("price_lifetime"));

            let v = view(&[backfilled(session).project()]);

            assert!(v.features.is_empty(), "{status} {payment_status}");
        }
    }
}

#[test]
fn backfilled_completed_checkout_keeps_a_later_purchase_of_the_same_session_granted() {
    // A backfill that fetched the session while it was open must not undo the completion
    // webhook that followed it.
    let mut open = testing::checkout_session("cs_1", "payment", "unpaid");
    set(&mut open, "/status", json!("open"));
    set(&mut open, "/metadata/price", json!("price_lifetime"));
    let mut complete = open.clone();
    set(&mut complete, "/status", json!("complete"));
    set(&mut complete, "/payment_status", json!("paid"));
    let snapshot = backfilled(open).project();
    let completed = event("checkout.session.completed", complete)
        .created(FETCHED_AT + 1)
        .project();

    let v = view(&[completed, snapshot]);

    assert_eq!(features(&v), ["lifetime"]);
}

#[test]
fn backfill_of_several_sessions_keeps_the_link_of_the_latest_created_one() {
    // Arrange: the older session's record outranks the newer one's (expired ranks above
    // complete in the same second), as any two records of one backfill second may.
    let session = |id: &str, reference: &str, created: i64, status: &str| {
        let mut session = testing::checkout_session(id, "subscription", "paid");
        set(&mut session, "/client_reference_id", json!(reference));
        set(&mut session, "/created", json!(created));
        set(&mut session, "/status", json!(status));
        backfilled(session).project()
    };
    let older = session("cs_old", "user_old", T0 - 100, "expired");
    let newer = session("cs_new", "user_new", T0 - 50, "complete");
    assert!(older.rank > newer.rank);

    // Act
    let v = view(&[older, newer]);

    // Assert
    assert_eq!(v.client_reference_id.as_deref(), Some("user_new"));
}

#[test]
fn backfilled_entitlement_summary_grants_its_lookup_keys() {
    let summary = testing::entitlement_summary(CUSTOMER, &["sso", "beta"]);

    let v = view(&[backfilled(summary).project()]);

    assert_eq!(features(&v), ["beta", "sso"]);
}

#[test]
fn backfilled_deleted_customer_revokes_everything() {
    // What `GET /v1/customers/{id}` answers for a deleted customer.
    let stub = testing::fixture(Api::Legacy, "deleted_customer");
    let active = backfilled(subscription("active")).created(T0).project();

    let deleted = backfilled(stub).project();

    assert!(matches!(&deleted.snapshot, Some(Snapshot::Customer(c)) if c.deleted));
    assert!(view(&[active, deleted]).features.is_empty());
}

#[test]
fn backfilled_invoice_records_what_was_paid_like_invoice_paid() {
    let mut invoice = testing::invoice(Api::Legacy, "in_1", "paid");
    set(&mut invoice, "/paid", json!(true));

    let snapshot = backfilled(invoice).project();

    match snapshot.snapshot {
        Some(Snapshot::Invoice(i)) => {
            assert!(i.paid);
            assert_eq!(i.paid_through, Some(1_679_588_731));
        }
        other => panic!("expected an invoice, got {other:?}"),
    }
}

fn localstripe(name: &str) -> Value {
    let all: Value = serde_json::from_str(LOCALSTRIPE).expect("JSON");
    all[name].clone()
}

#[test]
fn localstripe_subscription_with_plans_and_no_prices_reads_price_and_product_from_the_plan() {
    // Arrange: a subscription exactly as localstripe 1.15.10 renders it (the old API shape:
    // `plan` on the subscription and on each item, no `price`).
    let object = localstripe("subscription");
    assert!(object["items"]["data"][0].get("price").is_none());

    // Act
    let projected = backfilled(object.clone()).project();

    // Assert
    let Some(Snapshot::Subscription(s)) = &projected.snapshot else {
        panic!("expected a subscription, got {:?}", projected.snapshot);
    };
    assert_eq!(s.id, object["id"]);
    assert_eq!(s.customer, object["customer"]);
    assert_eq!(s.status, "active");
    assert_eq!(s.current_period_end, object["current_period_end"].as_i64());
    assert_eq!(s.items.len(), 1);
    assert_eq!(s.items[0].price.as_deref(), Some("plan_pro_month"));
    assert_eq!(
        s.items[0].product.as_deref(),
        object["plan"]["product"].as_str()
    );
    assert_eq!(s.items[0].quantity, Some(1));
    assert_eq!(s.items[0].lookup_key, None);
    // The plan's product grants like a price's would.
    let product = object["plan"]["product"].as_str().expect("a product id");
    let toml = format!("[[grant]]\nproduct = \"{product}\"\nfeatures = [\"pro\"]\n");
    let mut state = CustomerState::new("", s.customer.clone());
    state.apply(&projected);
    assert_eq!(compute(&state, &policy(&toml)).features, ["pro"]);
}

#[test]
fn localstripe_customer_and_invoice_project() {
    let customer = backfilled(localstripe("customer")).project();
    let invoice = backfilled(localstripe("invoice")).project();

    assert!(matches!(&customer.snapshot, Some(Snapshot::Customer(c)) if !c.deleted));
    assert_eq!(
        customer.customer,
        localstripe("customer")["id"].as_str().map(str::to_owned)
    );
    match invoice.snapshot {
        Some(Snapshot::Invoice(i)) => {
            assert_eq!(
                i.subscription.as_deref(),
                localstripe("subscription")["id"].as_str()
            );
            assert!(i.paid, "status paid without the legacy flag");
        }
        other => panic!("expected an invoice, got {other:?}"),
    }
}

#[test]
fn thin_event_has_no_snapshot_even_with_a_handled_type() {
    // A thin event of a v1 type: its type alone must not make the projection expect a
    // `data.object` (which it does not have).
    let body = json!({
        "id": "evt_thin_1",
        "object": "v2.core.event",
        "type": "v1.customer.subscription.updated",
        "created": "2025-06-01T12:00:00.120Z",
        "related_object": {"id": "sub_1", "type": "subscription", "url": "/v1/subscriptions/sub_1"},
    })
    .to_string();
    let envelope = shared::EventEnvelope::parse(body.as_bytes()).expect("a thin envelope");

    let projected = super::project(&envelope).expect("thin events always project");

    assert!(projected.thin);
    assert_eq!(projected.snapshot, None);
    assert_eq!(projected.created, 1_748_779_200);
    assert_eq!(projected.customer, None);
    assert_eq!(
        projected.rank,
        Rank::of(
            "v1.customer.subscription.updated",
            1_748_779_200,
            0,
            "evt_thin_1"
        )
    );

    let handled_type = body.replace(
        "v1.customer.subscription.updated",
        "customer.subscription.updated",
    );
    let envelope = shared::EventEnvelope::parse(handled_type.as_bytes()).expect("a thin envelope");
    let projected = super::project(&envelope).expect("thin events always project");
    assert!(projected.thin);
    assert_eq!(projected.snapshot, None);
}
