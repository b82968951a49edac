//! Subscription lifecycles end to end (SPEC §6–§9): Stripe events signed and POSTed to the real
//! `ingest`, projected by the projector's application (in process), observed through the read
//! API, the projection tables and the `entitlements.changes` topic.
//!
//! Each scenario is a function returning its events in the order Stripe created them. A test
//! delivers them in that order to one pipeline, one event at a time (each applied before the
//! next, so every change message is attributable to one event), asserting along the way; then
//! [`Scenario::assert_converges_when_reversed_and_duplicated`] delivers the same events to a
//! second pipeline reversed, every event twice and interleaved, all at once (so batches coalesce
//! differently), and requires the same API objects and projection tables. Same-second events
//! (equal `created`) are in the scenarios on purpose: only the rank's tie-breaks (type, status,
//! event id) can order them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::events::*;
use common::*;

/// Matched by its price's lookup_key only.
const ENTERPRISE: Item<'static> = (
    "price_enterprise_seat_year",
    "prod_enterprise",
    Some("enterprise"),
);

// ---------------------------------------------------------------------------------------------
// The scenarios: each a function of its events, in the order Stripe created them.

const CHECKOUT_CUSTOMER: &str = "cus_RkCheckout8412";
const CHECKOUT_SUB: &str = "sub_1RkCheckout8412";
const CHECKOUT_REFERENCE: &str = "user_8412";

/// Checkout creates the subscription `incomplete` and activates it in the same second; the
/// session completes in that second too, and the first invoice is paid.
fn checkout_subscription_events() -> Vec<Event> {
    let (c, s) = (CHECKOUT_CUSTOMER, CHECKOUT_SUB);
    vec![
        Event::new("evt_1RkCk01", "customer.created", T0, customer(c, false)),
        Event::new(
            "evt_1RkCk02",
            "customer.subscription.created",
            T0 + 6,
            subscription(s, c, "incomplete", &[PRO], T0 + 6 + MONTH, true),
        ),
        Event::new(
            "evt_1RkCk03",
            "customer.subscription.updated",
            T0 + 6,
            subscription(s, c, "active", &[PRO], T0 + 6 + MONTH, true),
        ),
        Event::new(
            "evt_1RkCk04",
            "checkout.session.completed",
            T0 + 6,
            checkout_session(
                "cs_test_a1RkCheckout8412",
                c,
                Some(CHECKOUT_REFERENCE),
                "subscription",
                "paid",
                Some(s),
                json!({}),
            ),
        ),
        Event::new(
            "evt_1RkCk05",
            "invoice.paid",
            T0 + 6,
            invoice(
                "in_1RkCheckout8412",
                c,
                s,
                "paid",
                1,
                None,
                T0 + 6 + MONTH,
                true,
            ),
        ),
    ]
}

const TRIAL_CUSTOMER: &str = "cus_RkTrial2207";
const TRIAL_SUB: &str = "sub_1RkTrial2207";

/// A 14-day trial that converts. At conversion a stale `trialing` update shares the second of
/// the `active` one and arrives after it (with a greater event id): the status rank decides.
fn trial_events() -> Vec<Event> {
    let (c, s) = (TRIAL_CUSTOMER, TRIAL_SUB);
    let trial_end = T0 + 14 * DAY;
    let trialing = with(
        subscription(s, c, "trialing", &[PRO], trial_end, true),
        "trial_end",
        json!(trial_end),
    );
    vec![
        Event::new(
            "evt_1RkTr01",
            "customer.subscription.created",
            T0,
            trialing.clone(),
        ),
        Event::new(
            "evt_1RkTr02",
            "customer.subscription.trial_will_end",
            trial_end - 3 * DAY,
            trialing.clone(),
        ),
        Event::new(
            "evt_1RkTr03",
            "invoice.paid",
            trial_end,
            invoice(
                "in_1RkTrial2207",
                c,
                s,
                "paid",
                1,
                None,
                trial_end + MONTH,
                true,
            ),
        ),
        Event::new(
            "evt_1RkTr04",
            "customer.subscription.updated",
            trial_end,
            with(
                subscription(s, c, "active", &[PRO], trial_end + MONTH, true),
                "trial_end",
                json!(trial_end),
            ),
        ),
        Event::new(
            "evt_1RkTr05",
            "customer.subscription.updated",
            trial_end,
            trialing,
        ),
    ]
}

const PLAN_CUSTOMER: &str = "cus_RkPlans3310";
const PLAN_SUB: &str = "sub_1RkPlans3310";

/// prod_pro → price_team_month → prod_pro → prod_pro plus an enterprise seat. Two same-second
/// pairs: an enterprise seat attached in the second the subscription was created, whose event id
/// happens to sort first (only the type rank, `created` < `updated`, puts it after the creation);
/// and a final update of the same second and status as the add-on whose smaller event id makes
/// it lose although it arrives last.
fn plan_change_events() -> Vec<Event> {
    let (c, s) = (PLAN_CUSTOMER, PLAN_SUB);
    let period_end = T0 + MONTH;
    let sub =
        |status: &str, items: &[Item<'_>]| subscription(s, c, status, items, period_end, true);
    vec![
        Event::new(
            "evt_1RkPl01",
            "customer.subscription.created",
            T0,
            sub("active", &[PRO]),
        ),
        Event::new(
            "evt_1RkPl00",
            "customer.subscription.updated",
            T0,
            sub("active", &[PRO, ENTERPRISE]),
        ),
        Event::new(
            "evt_1RkPl02",
            "customer.subscription.updated",
            T0 + 10 * DAY,
            sub("active", &[TEAM]),
        ),
        Event::new(
            "evt_1RkPl03",
            "customer.subscription.updated",
            T0 + 20 * DAY,
            sub("active", &[PRO]),
        ),
        Event::new(
            "evt_1RkPl05",
            "customer.subscription.updated",
            T0 + 25 * DAY,
            sub("active", &[PRO, ENTERPRISE]),
        ),
        Event::new(
            "evt_1RkPl04",
            "customer.subscription.updated",
            T0 + 25 * DAY,
            sub("active", &[PRO]),
        ),
    ]
}

const DUNNING_CUSTOMER: &str = "cus_RkDunning5120";
const DUNNING_SUB: &str = "sub_1RkDunning5120";
const DUNNING_INVOICE: &str = "in_1RkDunning5120";

/// The renewal payment fails twice (the subscription goes `past_due` in the second of the first
/// failure), then succeeds (it goes `active` again in the second of the payment).
fn dunning_events() -> Vec<Event> {
    let (c, s, i) = (DUNNING_CUSTOMER, DUNNING_SUB, DUNNING_INVOICE);
    let renewal = T0 + MONTH;
    let next_period_end = T0 + 2 * MONTH;
    vec![
        Event::new(
            "evt_1RkDn01",
            "customer.subscription.created",
            T0,
            subscription(s, c, "active", &[PRO], renewal, true),
        ),
        Event::new(
            "evt_1RkDn02",
            "invoice.payment_failed",
            renewal,
            invoice(
                i,
                c,
                s,
                "open",
                1,
                Some(renewal + 3 * DAY),
                next_period_end,
                true,
            ),
        ),
        Event::new(
            "evt_1RkDn03",
            "customer.subscription.updated",
            renewal,
            subscription(s, c, "past_due", &[PRO], next_period_end, true),
        ),
        Event::new(
            "evt_1RkDn04",
            "invoice.payment_failed",
            renewal + 3 * DAY,
            invoice(
                i,
                c,
                s,
                "open",
                2,
                Some(renewal + 8 * DAY),
                next_period_end,
                true,
            ),
        ),
        Event::new(
            "evt_1RkDn05",
            "invoice.paid",
            renewal + 5 * DAY,
            invoice(i, c, s, "paid", 3, None, next_period_end, true),
        ),
        Event::new(
            "evt_1RkDn06",
            "customer.subscription.updated",
            renewal + 5 * DAY,
            subscription(s, c, "active", &[PRO], next_period_end, true),
        ),
    ]
}

const CANCEL_CUSTOMER: &str = "cus_RkCancel6604";
const CANCEL_SUB: &str = "sub_1RkCancel6604";

/// Cancellation scheduled for the period end; at the period end an `updated` (still active) and
/// the `deleted` share a second: `*.deleted` ranks last.
fn cancel_at_period_end_events() -> Vec<Event> {
    let (c, s) = (CANCEL_CUSTOMER, CANCEL_SUB);
    let period_end = T0 + MONTH;
    let cancelling = |status: &str| {
        let sub = subscription(s, c, status, &[PRO], period_end, true);
        let sub = with(sub, "cancel_at_period_end", json!(true));
        with(sub, "cancel_at", json!(period_end))
    };
    vec![
        Event::new(
            "evt_1RkCa01",
            "customer.subscription.created",
            T0,
            subscription(s, c, "active", &[PRO], period_end, true),
        ),
        Event::new(
            "evt_1RkCa02",
            "customer.subscription.updated",
            T0 + 10 * DAY,
            cancelling("active"),
        ),
        Event::new(
            "evt_1RkCa03",
            "customer.subscription.updated",
            period_end,
            cancelling("active"),
        ),
        Event::new(
            "evt_1RkCa04",
            "customer.subscription.deleted",
            period_end,
            with(cancelling("canceled"), "canceled_at", json!(period_end)),
        ),
    ]
}

const PAUSE_CUSTOMER: &str = "cus_RkPause7781";
const PAUSE_SUB: &str = "sub_1RkPause7781";

/// Paused and resumed; Stripe sends `customer.subscription.updated` in the same second as each.
fn pause_events() -> Vec<Event> {
    let (c, s) = (PAUSE_CUSTOMER, PAUSE_SUB);
    let paused_at = T0 + MONTH;
    let resumed_at = paused_at + 10 * DAY;
    let paused = subscription(s, c, "paused", &[PRO], paused_at, true);
    let resumed = subscription(s, c, "active", &[PRO], resumed_at + MONTH, true);
    vec![
        Event::new(
            "evt_1RkPa01",
            "customer.subscription.created",
            T0,
            subscription(s, c, "active", &[PRO], paused_at, true),
        ),
        Event::new(
            "evt_1RkPa02",
            "customer.subscription.paused",
            paused_at,
            paused.clone(),
        ),
        Event::new(
            "evt_1RkPa03",
            "customer.subscription.updated",
            paused_at,
            paused,
        ),
        Event::new(
            "evt_1RkPa04",
            "customer.subscription.resumed",
            resumed_at,
            resumed.clone(),
        ),
        Event::new(
            "evt_1RkPa05",
            "customer.subscription.updated",
            resumed_at,
            resumed,
        ),
    ]
}

const DELETED_CUSTOMER: &str = "cus_RkDeleted9034";
const DELETED_SUB: &str = "sub_1RkDeleted9034";

/// Access from a subscription, a Stripe entitlement summary and a one-time purchase; then the
/// customer is deleted (an `updated` in the same second) while the subscription stays active.
fn customer_deleted_events() -> Vec<Event> {
    let c = DELETED_CUSTOMER;
    let deleted_at = T0 + DAY;
    vec![
        Event::new("evt_1RkDe01", "customer.created", T0, customer(c, false)),
        Event::new(
            "evt_1RkDe02",
            "customer.subscription.created",
            T0 + 10,
            subscription(DELETED_SUB, c, "active", &[PRO], T0 + MONTH, true),
        ),
        Event::new(
            "evt_1RkDe03",
            "entitlements.active_entitlement_summary.updated",
            T0 + 20,
            entitlement_summary(c, &["sso"]),
        ),
        Event::new(
            "evt_1RkDe04",
            "checkout.session.completed",
            T0 + 30,
            checkout_session(
                "cs_test_a1RkDeleted9034",
                c,
                None,
                "payment",
                "paid",
                None,
                json!({"price": "price_team_month"}),
            ),
        ),
        Event::new(
            "evt_1RkDe05",
            "customer.updated",
            deleted_at,
            with(customer(c, false), "email", json!("gone@example.com")),
        ),
        Event::new(
            "evt_1RkDe06",
            "customer.deleted",
            deleted_at,
            deleted_customer(c, false),
        ),
    ]
}

const SUMMARY_CUSTOMER: &str = "cus_RkSummary4478";

/// Stripe entitlement summaries replace each other; two share a second (the event id decides);
/// a subscription adds its own features to the summary's.
fn entitlement_summary_events() -> Vec<Event> {
    let c = SUMMARY_CUSTOMER;
    let summary = |keys: &[&str]| entitlement_summary(c, keys);
    let updated = "entitlements.active_entitlement_summary.updated";
    vec![
        Event::new("evt_1RkSu01", "customer.created", T0, customer(c, false)),
        Event::new("evt_1RkSu02", updated, T0 + 10, summary(&["sso", "audit"])),
        Event::new(
            "evt_1RkSu03",
            updated,
            T0 + 20,
            summary(&["audit", "priority_support"]),
        ),
        Event::new("evt_1RkSu04a", updated, T0 + 30, summary(&["audit"])),
        Event::new(
            "evt_1RkSu04b",
            updated,
            T0 + 30,
            summary(&["priority_support", "sso", "audit"]),
        ),
        Event::new(
            "evt_1RkSu05",
            "customer.subscription.created",
            T0 + 40,
            subscription(
                "sub_1RkSummary4478",
                c,
                "active",
                &[ENTERPRISE, TEAM],
                T0 + 40 + MONTH,
                true,
            ),
        ),
    ]
}

const BUYER_PAID: &str = "cus_RkBuyerPaid01";
const BUYER_DELAYED: &str = "cus_RkBuyerAsync02";
const BUYER_BY_PRICE: &str = "cus_RkBuyerPrice03";
const BUYER_SUBSCRIPTION_MODE: &str = "cus_RkBuyerSubMode04";

/// One-time purchases: paid at once (by product, by price), paid later by a delayed method,
/// and a subscription-mode session whose subscription never became active.
fn one_time_purchase_events() -> Vec<Event> {
    let session = |id: &str, customer: &str, mode: &str, paid: &str, metadata: Value| {
        checkout_session(id, customer, None, mode, paid, None, metadata)
    };
    let pro = || json!({"product": "prod_pro"});
    vec![
        Event::new(
            "evt_1RkOt01",
            "checkout.session.completed",
            T0,
            session("cs_test_a1RkPaid01", BUYER_PAID, "payment", "paid", pro()),
        ),
        Event::new(
            "evt_1RkOt02",
            "checkout.session.completed",
            T0 + 60,
            session(
                "cs_test_a1RkAsync02",
                BUYER_DELAYED,
                "payment",
                "unpaid",
                pro(),
            ),
        ),
        Event::new(
            "evt_1RkOt03",
            "checkout.session.completed",
            T0 + 120,
            session(
                "cs_test_a1RkPrice03",
                BUYER_BY_PRICE,
                "payment",
                "paid",
                json!({"price": "price_team_month"}),
            ),
        ),
        Event::new(
            "evt_1RkOt04",
            "checkout.session.completed",
            T0 + 180,
            with(
                session(
                    "cs_test_a1RkSubMode04",
                    BUYER_SUBSCRIPTION_MODE,
                    "subscription",
                    "paid",
                    pro(),
                ),
                "subscription",
                json!("sub_1RkNeverActive04"),
            ),
        ),
        Event::new(
            "evt_1RkOt05",
            "checkout.session.async_payment_succeeded",
            T0 + 3 * DAY,
            session(
                "cs_test_a1RkAsync02",
                BUYER_DELAYED,
                "payment",
                "paid",
                pro(),
            ),
        ),
    ]
}

const LIVE_CUSTOMER: &str = "cus_RkLive1001";
const TEST_CUSTOMER: &str = "cus_RkTest1002";

/// A live-mode and a test-mode customer, each subscribed.
fn livemode_events() -> Vec<Event> {
    let live_sub = with(
        subscription(
            "sub_1RkLive1001",
            LIVE_CUSTOMER,
            "active",
            &[PRO],
            T0 + MONTH,
            true,
        ),
        "livemode",
        json!(true),
    );
    vec![
        Event::new(
            "evt_1RkLm01",
            "customer.created",
            T0,
            customer(LIVE_CUSTOMER, true),
        ),
        Event::new(
            "evt_1RkLm02",
            "customer.subscription.created",
            T0 + 5,
            live_sub,
        ),
        Event::new(
            "evt_1RkLm03",
            "customer.created",
            T0 + 10,
            customer(TEST_CUSTOMER, false),
        ),
        Event::new(
            "evt_1RkLm04",
            "customer.subscription.created",
            T0 + 15,
            subscription(
                "sub_1RkTest1002",
                TEST_CUSTOMER,
                "active",
                &[TEAM],
                T0 + MONTH,
                true,
            ),
        ),
    ]
}

const SHARED_CUSTOMER: &str = "cus_shared";
const ACCOUNT_ALPHA: &str = "acct_1RkConnectAlpha";
const ACCOUNT_BRAVO: &str = "acct_1RkConnectBravo";
const ALPHA_REFERENCE: &str = "user_alpha_7";

/// The same customer id on the platform and in two Connect accounts, each with its own plan;
/// Alpha's comes through Checkout; Bravo's customer is deleted.
fn connect_events() -> Vec<Event> {
    let c = SHARED_CUSTOMER;
    vec![
        Event::new("evt_1RkCn01", "customer.created", T0, customer(c, false)),
        Event::new("evt_1RkCn02", "customer.created", T0, customer(c, false))
            .account(ACCOUNT_ALPHA),
        Event::new("evt_1RkCn03", "customer.created", T0, customer(c, false))
            .account(ACCOUNT_BRAVO),
        Event::new(
            "evt_1RkCn04",
            "customer.subscription.created",
            T0 + 10,
            subscription(
                "sub_1RkPlatformShared",
                c,
                "active",
                &[ENTERPRISE],
                T0 + MONTH,
                true,
            ),
        ),
        Event::new(
            "evt_1RkCn05",
            "customer.subscription.created",
            T0 + 10,
            subscription("sub_1RkAlphaShared", c, "active", &[PRO], T0 + MONTH, true),
        )
        .account(ACCOUNT_ALPHA),
        Event::new(
            "evt_1RkCn06",
            "customer.subscription.created",
            T0 + 10,
            subscription("sub_1RkBravoShared", c, "active", &[TEAM], T0 + MONTH, true),
        )
        .account(ACCOUNT_BRAVO),
        Event::new(
            "evt_1RkCn07",
            "checkout.session.completed",
            T0 + 10,
            checkout_session(
                "cs_test_a1RkAlphaShared",
                c,
                Some(ALPHA_REFERENCE),
                "subscription",
                "paid",
                Some("sub_1RkAlphaShared"),
                json!({}),
            ),
        )
        .account(ACCOUNT_ALPHA),
        Event::new(
            "evt_1RkCn08",
            "customer.deleted",
            T0 + DAY,
            deleted_customer(c, false),
        )
        .account(ACCOUNT_BRAVO),
    ]
}

const SHAPES_CUSTOMER: &str = "cus_RkShapes2718";
const SHAPES_SUB: &str = "sub_1RkShapes2718";

/// Subscribe, renew with one failed attempt, recover, schedule cancellation — in the basil
/// shapes (periods on the items, invoice `parent.subscription_details`) or the 2022-11-15 ones
/// (period on the subscription, invoice `subscription` and `paid`).
fn renewal_events(basil: bool) -> Vec<Event> {
    let (c, s) = (SHAPES_CUSTOMER, SHAPES_SUB);
    let renewal = T0 + MONTH;
    let next_end = T0 + 2 * MONTH;
    let sub = |status: &str, period_end: i64| subscription(s, c, status, &[PRO], period_end, basil);
    let events = vec![
        Event::new(
            "evt_1RkSh01",
            "customer.subscription.created",
            T0,
            sub("incomplete", renewal),
        ),
        Event::new(
            "evt_1RkSh02",
            "customer.subscription.updated",
            T0,
            sub("active", renewal),
        ),
        Event::new(
            "evt_1RkSh03",
            "invoice.paid",
            T0,
            invoice("in_1RkShapesFirst", c, s, "paid", 1, None, renewal, basil),
        ),
        Event::new(
            "evt_1RkSh04",
            "invoice.payment_failed",
            renewal,
            invoice(
                "in_1RkShapesRenew",
                c,
                s,
                "open",
                1,
                Some(renewal + 3 * DAY),
                next_end,
                basil,
            ),
        ),
        Event::new(
            "evt_1RkSh05",
            "customer.subscription.updated",
            renewal,
            sub("past_due", next_end),
        ),
        Event::new(
            "evt_1RkSh06",
            "invoice.paid",
            renewal + 3 * DAY,
            invoice("in_1RkShapesRenew", c, s, "paid", 2, None, next_end, basil),
        ),
        Event::new(
            "evt_1RkSh07",
            "customer.subscription.updated",
            renewal + 3 * DAY,
            with(sub("active", next_end), "cancel_at_period_end", json!(true)),
        ),
    ];
    if basil {
        events
    } else {
        events.into_iter().map(Event::legacy_api).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[tokio::test]
async fn checkout_with_client_reference_id_links_the_customer_and_grants_the_subscription() {
    // Arrange
    let events = checkout_subscription_events();
    let mut run = Scenario::start(Options::default()).await;
    let key = CHECKOUT_CUSTOMER;

    // Act / Assert: the customer is known before anything is bought.
    let first = only(run.deliver(&events[..1]).await);
    assert_change(&first, key, &events[0], "");
    assert_eq!(first.body["version"], 1);
    let view = run.view(key, None).await;
    assert_eq!(view["features"], json!([]));
    assert_eq!(view["client_reference_id"], Value::Null);

    // An incomplete subscription is listed and grants nothing.
    let incomplete = only(run.deliver(&events[1..2]).await);
    assert_change(&incomplete, key, &events[1], "");
    assert_eq!(statuses(&incomplete.body), [(CHECKOUT_SUB, "incomplete")]);

    // Activated in the same second: `updated` outranks `created`.
    let active = only(run.deliver(&events[2..3]).await);
    assert_change(&active, key, &events[2], "api pro +api +pro");
    assert_eq!(statuses(&active.body), [(CHECKOUT_SUB, "active")]);

    // Checkout links the customer to the app's user.
    let linked = only(run.deliver(&events[3..4]).await);
    assert_change(&linked, key, &events[3], "api pro");
    assert_eq!(linked.body["client_reference_id"], CHECKOUT_REFERENCE);

    // A paid invoice changes neither features nor a status: no message.
    let after_invoice = run.deliver(&events[4..]).await;
    assert!(after_invoice.is_empty(), "{after_invoice:?}");

    let view = run.view(key, None).await;
    assert_eq!(view["features"], json!(["api", "pro"]));
    assert_eq!(view["client_reference_id"], CHECKOUT_REFERENCE);
    assert_eq!(view["account"], Value::Null);
    assert_eq!(
        view["subscriptions"][0]["current_period_end"],
        T0 + 6 + MONTH
    );
    let (status, by_reference) = run
        .in_order
        .get(&format!(
            "/v1/entitlements?client_reference_id={CHECKOUT_REFERENCE}"
        ))
        .await;
    assert_eq!(status, 200, "{by_reference}");
    assert_eq!(by_reference, view);
    let (status, _) = run
        .in_order
        .get("/v1/entitlements?client_reference_id=user_unknown")
        .await;
    assert_eq!(status, 404);
    assert!(feature_granted(&run.in_order, key, None, "pro").await);
    assert!(!feature_granted(&run.in_order, key, None, "team").await);

    run.assert_converges_when_reversed_and_duplicated(&events)
        .await;
}

#[tokio::test]
async fn trial_grants_access_that_stays_when_it_converts_and_the_status_change_is_reported() {
    let events = trial_events();
    let mut run = Scenario::start(Options::default()).await;
    let key = TRIAL_CUSTOMER;

    let trialing = only(run.deliver(&events[..1]).await);
    assert_change(&trialing, key, &events[0], "api pro +api +pro");
    assert_eq!(statuses(&trialing.body), [(TRIAL_SUB, "trialing")]);

    // trial_will_end and the invoice change neither features nor the status.
    let quiet = run.deliver(&events[1..3]).await;
    assert!(quiet.is_empty(), "{quiet:?}");

    let converted = only(run.deliver(&events[3..4]).await);
    assert_change(&converted, key, &events[3], "api pro");
    assert_eq!(statuses(&converted.body), [(TRIAL_SUB, "active")]);
    assert_eq!(
        converted.body["subscriptions"][0]["current_period_end"],
        T0 + 14 * DAY + MONTH
    );

    // A trialing snapshot of the same second, delivered later with a greater event id, must
    // not take the status back: active ranks above trialing.
    let stale = run.deliver(&events[4..]).await;
    assert!(stale.is_empty(), "{stale:?}");
    let view = run.view(key, None).await;
    assert_eq!(view["features"], json!(["api", "pro"]));
    assert_eq!(statuses(&view), [(TRIAL_SUB, "active")]);

    run.assert_converges_when_reversed_and_duplicated(&events)
        .await;
}

#[tokio::test]
async fn upgrade_and_downgrade_swap_features_with_exact_added_and_removed() {
    let events = plan_change_events();
    let mut run = Scenario::start(Options::default()).await;
    let key = PLAN_CUSTOMER;

    let changes = run.deliver(&events).await;

    let everything: &[&str] = &["api", "audit", "pro", "sso"];
    assert_eq!(changes.len(), 5, "{changes:#?}");
    assert_change(&changes[0], key, &events[0], "api pro +api +pro");
    // The add-on of the creation's second applies although its event id sorts first.
    assert_change(
        &changes[1],
        key,
        &events[1],
        "api audit pro sso +audit +sso",
    );
    // To the team price: everything else goes, team comes.
    assert_change(
        &changes[2],
        key,
        &events[2],
        "team +team -api -audit -pro -sso",
    );
    assert_eq!(
        changes[2].body["subscriptions"][0]["items"],
        json!([{"price": "price_team_month", "product": "prod_team"}])
    );
    // And back.
    assert_change(&changes[3], key, &events[3], "api pro +api +pro -team");
    // An enterprise seat adds what its lookup_key grants.
    assert_change(
        &changes[4],
        key,
        &events[4],
        "api audit pro sso +audit +sso",
    );
    // The last update shares the add-on's second and status; its smaller event id loses, so
    // it changed nothing although it arrived last.
    let view = run.view(key, None).await;
    assert_eq!(view["features"], json!(everything));
    assert_eq!(view["version"], 5);

    run.assert_converges_when_reversed_and_duplicated(&events)
        .await;
}

#[tokio::test]
async fn past_due_keeps_access_when_policy_grants_and_loses_it_when_it_revokes() {
    tokio::join!(
        past_due_lifecycle(Options::default(), PastDuePolicy::Grant),
        past_due_lifecycle(Options::past_due_revoke(), PastDuePolicy::Revoke),
    );
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum PastDuePolicy {
    Grant,
    Revoke,
}

async fn past_due_lifecycle(options: Options, policy: PastDuePolicy) {
    let events = dunning_events();
    let mut run = Scenario::start(options).await;
    let key = DUNNING_CUSTOMER;
    let pro: &[&str] = &["api", "pro"];

    let subscribed = only(run.deliver(&events[..1]).await);
    assert_change(&subscribed, key, &events[0], "api pro +api +pro");

    // The failed payment alone changes nothing the customer is told about.
    let failed = run.deliver(&events[1..2]).await;
    assert!(failed.is_empty(), "{policy:?}: {failed:?}");

    let past_due = only(run.deliver(&events[2..3]).await);
    assert_eq!(statuses(&past_due.body), [(DUNNING_SUB, "past_due")]);
    match policy {
        PastDuePolicy::Grant => assert_change(&past_due, key, &events[2], "api pro"),
        PastDuePolicy::Revoke => assert_change(&past_due, key, &events[2], "-api -pro"),
    }
    assert_eq!(
        feature_granted(&run.in_order, key, None, "pro").await,
        policy == PastDuePolicy::Grant
    );

    // Dunning: the second attempt failed, the next is scheduled.
    let retried = run.deliver(&events[3..4]).await;
    assert!(retried.is_empty(), "{policy:?}: {retried:?}");
    assert_eq!(
        run.in_order.table(INVOICE_DUNNING).await,
        [
            json!({"id": DUNNING_INVOICE, "status": "open", "attempt_count": 2,
                "next_payment_attempt": T0 + MONTH + 8 * DAY, "paid_through": T0 + 2 * MONTH})
        ],
        "{policy:?}"
    );

    // Recovered: the invoice is paid and the subscription is active in the same second.
    let paid = run.deliver(&events[4..5]).await;
    assert!(paid.is_empty(), "{policy:?}: {paid:?}");
    let recovered = only(run.deliver(&events[5..]).await);
    assert_eq!(statuses(&recovered.body), [(DUNNING_SUB, "active")]);
    match policy {
        PastDuePolicy::Grant => assert_change(&recovered, key, &events[5], "api pro"),
        PastDuePolicy::Revoke => assert_change(&recovered, key, &events[5], "api pro +api +pro"),
    }
    assert_eq!(
        run.in_order.table(INVOICE_DUNNING).await,
        [
            json!({"id": DUNNING_INVOICE, "status": "paid", "attempt_count": 3,
                "next_payment_attempt": null, "paid_through": T0 + 2 * MONTH})
        ],
        "{policy:?}"
    );
    assert_eq!(run.view(key, None).await["features"], json!(pro));

    run.assert_converges_when_reversed_and_duplicated(&events)
        .await;
}

const INVOICE_DUNNING: &str =
    "SELECT id, status, attempt_count, next_payment_attempt, paid_through FROM invoices ORDER BY id";

#[tokio::test]
async fn cancel_at_period_end_keeps_access_until_the_subscription_is_deleted() {
    let events = cancel_at_period_end_events();
    let mut run = Scenario::start(Options::default()).await;
    let key = CANCEL_CUSTOMER;

    only(run.deliver(&events[..1]).await);

    // Scheduled: still active, still granted, and the schedule is reported.
    let scheduled = only(run.deliver(&events[1..2]).await);
    assert_change(&scheduled, key, &events[1], "api pro");
    assert_eq!(statuses(&scheduled.body), [(CANCEL_SUB, "active")]);
    assert_eq!(
        scheduled.body["subscriptions"][0]["cancel_at_period_end"],
        true
    );
    assert!(feature_granted(&run.in_order, key, None, "pro").await);

    // At the period end: an `updated` of the same second changes nothing, `deleted` ends it.
    let quiet = run.deliver(&events[2..3]).await;
    assert!(quiet.is_empty(), "{quiet:?}");
    let deleted = only(run.deliver(&events[3..]).await);
    assert_change(&deleted, key, &events[3], "-api -pro");
    let view = run.view(key, None).await;
    assert_eq!(view["features"], json!([]));
    assert_eq!(statuses(&view), [(CANCEL_SUB, "canceled")]);
    assert!(!feature_granted(&run.in_order, key, None, "pro").await);

    run.assert_converges_when_reversed_and_duplicated(&events)
        .await;
}

#[tokio::test]
async fn paused_subscription_grants_nothing_until_it_is_resumed() {
    let events = pause_events();
    let mut run = Scenario::start(Options::default()).await;
    let key = PAUSE_CUSTOMER;
    let pro: &[&str] = &["api", "pro"];

    only(run.deliver(&events[..1]).await);

    let paused = run.deliver(&events[1..3]).await;
    let paused = only(paused);
    assert_change(&paused, key, &events[1], "-api -pro");
    assert_eq!(statuses(&paused.body), [(PAUSE_SUB, "paused")]);

    let resumed = only(run.deliver(&events[3..]).await);
    assert_change(&resumed, key, &events[3], "api pro +api +pro");
    assert_eq!(statuses(&resumed.body), [(PAUSE_SUB, "active")]);
    assert_eq!(run.view(key, None).await["features"], json!(pro));

    run.assert_converges_when_reversed_and_duplicated(&events)
        .await;
}

#[tokio::test]
async fn customer_deleted_revokes_everything_although_a_subscription_is_still_active() {
    let events = customer_deleted_events();
    let mut run = Scenario::start(Options::default()).await;
    let key = DELETED_CUSTOMER;

    let before = run.deliver(&events[..4]).await;
    assert_eq!(before.len(), 4, "{before:#?}");
    assert_change(&before[1], key, &events[1], "api pro +api +pro");
    assert_change(&before[2], key, &events[2], "api pro sso +sso");
    assert_change(&before[3], key, &events[3], "api pro sso team +team");

    // A profile update changes no entitlement; the deletion in the same second takes all.
    let deletion = only(run.deliver(&events[4..]).await);
    assert_change(&deletion, key, &events[5], "-api -pro -sso -team");
    let view = run.view(key, None).await;
    assert_eq!(view["features"], json!([]));
    assert_eq!(statuses(&view), [(DELETED_SUB, "active")]);
    assert!(!feature_granted(&run.in_order, key, None, "api").await);
    assert_eq!(
        run.in_order
            .table("SELECT id, deleted FROM customers ORDER BY id")
            .await,
        [json!({"id": key, "deleted": true})]
    );

    run.assert_converges_when_reversed_and_duplicated(&events)
        .await;
}

#[tokio::test]
async fn entitlement_summary_lookup_keys_are_features_and_a_newer_summary_replaces_them() {
    let events = entitlement_summary_events();
    let mut run = Scenario::start(Options::default()).await;
    let key = SUMMARY_CUSTOMER;

    let changes = run.deliver(&events).await;

    assert_eq!(changes.len(), 6, "{changes:#?}");
    assert_change(&changes[0], key, &events[0], "");
    assert_change(&changes[1], key, &events[1], "audit sso +audit +sso");
    assert_change(
        &changes[2],
        key,
        &events[2],
        "audit priority_support +priority_support -sso",
    );
    // Two summaries in one second: the greater event id is the newer one, whatever the order.
    assert_change(&changes[3], key, &events[3], "audit -priority_support");
    assert_change(
        &changes[4],
        key,
        &events[4],
        "audit priority_support sso +priority_support +sso",
    );
    // A subscription's features join the summary's; sso and audit are not added twice.
    assert_change(
        &changes[5],
        key,
        &events[5],
        "audit priority_support sso team +team",
    );

    run.assert_converges_when_reversed_and_duplicated(&events)
        .await;
}

#[tokio::test]
async fn paid_one_time_purchase_grants_its_product_and_an_unpaid_one_only_once_paid() {
    let events = one_time_purchase_events();
    let mut run = Scenario::start(Options::default()).await;
    let pro: &[&str] = &["api", "pro"];

    let changes = run.deliver(&events[..4]).await;

    assert_eq!(changes.len(), 4, "{changes:#?}");
    let by_key: BTreeMap<&str, &Change> = changes.iter().map(|c| (c.key.as_str(), c)).collect();
    assert_change(
        by_key[BUYER_PAID],
        BUYER_PAID,
        &events[0],
        "api pro +api +pro",
    );
    assert_change(by_key[BUYER_DELAYED], BUYER_DELAYED, &events[1], "");
    assert_change(
        by_key[BUYER_BY_PRICE],
        BUYER_BY_PRICE,
        &events[2],
        "team +team",
    );
    // Access follows the subscription, never the paid Checkout of a subscription.
    assert_change(
        by_key[BUYER_SUBSCRIPTION_MODE],
        BUYER_SUBSCRIPTION_MODE,
        &events[3],
        "",
    );

    let paid_later = only(run.deliver(&events[4..]).await);
    assert_change(&paid_later, BUYER_DELAYED, &events[4], "api pro +api +pro");
    assert_eq!(run.view(BUYER_DELAYED, None).await["features"], json!(pro));
    assert_eq!(run.view(BUYER_PAID, None).await["features"], json!(pro));
    assert_eq!(
        run.view(BUYER_SUBSCRIPTION_MODE, None).await["features"],
        json!([])
    );

    run.assert_converges_when_reversed_and_duplicated(&events)
        .await;
}

#[tokio::test]
async fn livemode_is_stored_with_every_object_and_reported() {
    let events = livemode_events();
    let mut run = Scenario::start(Options::default()).await;

    let changes = run.deliver(&events).await;

    let last = |customer: &str| -> Value {
        changes
            .iter()
            .rev()
            .find(|c| c.key == customer)
            .unwrap_or_else(|| panic!("no change for {customer}: {changes:#?}"))
            .body
            .clone()
    };
    assert_eq!(last(LIVE_CUSTOMER)["livemode"], true);
    assert_eq!(last(LIVE_CUSTOMER)["features"], json!(["api", "pro"]));
    assert_eq!(last(TEST_CUSTOMER)["livemode"], false);
    assert_eq!(run.view(LIVE_CUSTOMER, None).await["livemode"], true);
    assert_eq!(run.view(TEST_CUSTOMER, None).await["livemode"], false);
    assert_eq!(
        run.in_order
            .table("SELECT id, livemode FROM customers ORDER BY id")
            .await,
        [
            json!({"id": LIVE_CUSTOMER, "livemode": true}),
            json!({"id": TEST_CUSTOMER, "livemode": false}),
        ]
    );
    assert_eq!(
        run.in_order
            .table("SELECT customer, livemode FROM subscriptions ORDER BY customer")
            .await,
        [
            json!({"customer": LIVE_CUSTOMER, "livemode": true}),
            json!({"customer": TEST_CUSTOMER, "livemode": false}),
        ]
    );
    assert_eq!(
        run.in_order
            .table("SELECT customer, livemode FROM entitlements ORDER BY customer")
            .await,
        [
            json!({"customer": LIVE_CUSTOMER, "livemode": true}),
            json!({"customer": TEST_CUSTOMER, "livemode": false}),
        ]
    );

    run.assert_converges_when_reversed_and_duplicated(&events)
        .await;
}

#[tokio::test]
async fn connect_accounts_and_the_platform_keep_the_same_customer_id_apart() {
    let events = connect_events();
    let mut run = Scenario::start(Options::default()).await;
    let c = SHARED_CUSTOMER;
    let alpha_key = format!("{ACCOUNT_ALPHA}/{c}");
    let bravo_key = format!("{ACCOUNT_BRAVO}/{c}");

    let changes = run.deliver(&events[..7]).await;

    let last = |key: &str| -> &Change {
        changes
            .iter()
            .rev()
            .find(|ch| ch.key == key)
            .unwrap_or_else(|| panic!("no change for {key}: {changes:#?}"))
    };
    assert_change(last(c), c, &events[3], "audit sso +audit +sso");
    assert_eq!(last(c).body["account"], Value::Null);
    assert_change(last(&alpha_key), &alpha_key, &events[6], "api pro");
    assert_eq!(last(&alpha_key).body["account"], ACCOUNT_ALPHA);
    assert_eq!(
        last(&alpha_key).body["client_reference_id"],
        ALPHA_REFERENCE
    );
    assert_change(last(&bravo_key), &bravo_key, &events[5], "team +team");
    assert_eq!(last(&bravo_key).body["account"], ACCOUNT_BRAVO);
    let keys: BTreeSet<&str> = changes.iter().map(|ch| ch.key.as_str()).collect();
    assert_eq!(
        keys,
        BTreeSet::from([c, alpha_key.as_str(), bravo_key.as_str()])
    );

    // Deleting Bravo's customer touches nobody else.
    let deletion = only(run.deliver(&events[7..]).await);
    assert_change(&deletion, &bravo_key, &events[7], "-team");

    let platform = run.view(c, None).await;
    let alpha = run.view(c, Some(ACCOUNT_ALPHA)).await;
    let bravo = run.view(c, Some(ACCOUNT_BRAVO)).await;
    assert_eq!(platform["features"], json!(["audit", "sso"]));
    assert_eq!(platform["client_reference_id"], Value::Null);
    assert_eq!(statuses(&platform), [("sub_1RkPlatformShared", "active")]);
    assert_eq!(alpha["features"], json!(["api", "pro"]));
    assert_eq!(alpha["account"], ACCOUNT_ALPHA);
    assert_eq!(statuses(&alpha), [("sub_1RkAlphaShared", "active")]);
    assert_eq!(bravo["features"], json!([]));
    assert_eq!(bravo["account"], ACCOUNT_BRAVO);
    assert_eq!(statuses(&bravo), [("sub_1RkBravoShared", "active")]);
    assert!(feature_granted(&run.in_order, c, Some(ACCOUNT_ALPHA), "pro").await);
    assert!(!feature_granted(&run.in_order, c, None, "pro").await);
    let (status, _) = run
        .in_order
        .get(&format!(
            "/v1/customers/{c}/entitlements?account=acct_1RkUnknown"
        ))
        .await;
    assert_eq!(status, 404);
    // The Checkout link belongs to Alpha only.
    let (status, by_reference) = run
        .in_order
        .get(&format!(
            "/v1/entitlements?client_reference_id={ALPHA_REFERENCE}&account={ACCOUNT_ALPHA}"
        ))
        .await;
    assert_eq!(status, 200, "{by_reference}");
    assert_eq!(by_reference, alpha);
    let (status, _) = run
        .in_order
        .get(&format!(
            "/v1/entitlements?client_reference_id={ALPHA_REFERENCE}"
        ))
        .await;
    assert_eq!(status, 404);

    run.assert_converges_when_reversed_and_duplicated(&events)
        .await;
}

#[tokio::test]
async fn legacy_and_basil_api_shapes_project_the_same_lifecycle_identically() {
    let basil_events = renewal_events(true);
    let legacy_events = renewal_events(false);
    let mut run = Scenario::start(Options::default()).await;
    let mut basil = Pipeline::in_process(Options::default()).await;

    let legacy_changes = run.deliver(&legacy_events).await;
    let basil_changes = deliver_each(&mut basil, &mut BTreeMap::new(), &basil_events).await;

    // The period end comes from the subscription (2022-11-15) or from its items (basil), the
    // invoice's subscription from `subscription` or `parent.subscription_details`.
    let legacy_view = run.view(SHAPES_CUSTOMER, None).await;
    let basil_view = basil.entitlements(SHAPES_CUSTOMER, None).await;
    assert_eq!(
        legacy_view["subscriptions"][0]["current_period_end"],
        T0 + 2 * MONTH
    );
    assert_eq!(
        legacy_view["subscriptions"][0]["cancel_at_period_end"],
        true
    );
    assert_eq!(legacy_view["features"], json!(["api", "pro"]));
    assert_eq!(legacy_view, basil_view);
    let paid_invoices = "SELECT id, subscription, status, paid, attempt_count, paid_through FROM invoices ORDER BY id";
    let expected_invoices = [
        json!({"id": "in_1RkShapesFirst", "subscription": SHAPES_SUB, "status": "paid", "paid": true,
               "attempt_count": 1, "paid_through": T0 + MONTH}),
        json!({"id": "in_1RkShapesRenew", "subscription": SHAPES_SUB, "status": "paid", "paid": true,
               "attempt_count": 2, "paid_through": T0 + 2 * MONTH}),
    ];
    assert_eq!(run.in_order.table(paid_invoices).await, expected_invoices);
    assert_eq!(basil.table(paid_invoices).await, expected_invoices);
    // The shapes really differ where they should: only basil items carry a period.
    let item_period = "SELECT items->0->'current_period_end' AS item_period FROM subscriptions";
    assert_eq!(
        basil.table(item_period).await,
        [json!({"item_period": T0 + 2 * MONTH})]
    );
    assert_eq!(
        run.in_order.table(item_period).await,
        [json!({"item_period": null})]
    );
    // Everything but the raw snapshots (and the item periods above) is the same.
    for sql in SHAPE_INDEPENDENT_TABLES {
        assert_eq!(
            run.in_order.table(sql).await,
            basil.table(sql).await,
            "{sql}"
        );
    }
    let bodies = |changes: &[Change]| -> Vec<(String, Value)> {
        changes
            .iter()
            .map(|c| (c.key.clone(), c.body.clone()))
            .collect()
    };
    assert_eq!(legacy_changes.len(), 4, "{legacy_changes:#?}");
    assert_eq!(bodies(&legacy_changes), bodies(&basil_changes));

    run.assert_converges_when_reversed_and_duplicated(&legacy_events)
        .await;
}

/// The projection columns, without the raw snapshot (whose shape differs by API version) and
/// without the per-item period (on the items only in basil).
const SHAPE_INDEPENDENT_TABLES: &[&str] = &[
    "SELECT account, id, customer, status, livemode, current_period_end, cancel_at_period_end,
            (SELECT jsonb_agg(i - 'current_period_end') FROM jsonb_array_elements(items) i) AS items,
            rank_created, rank_type, rank_status, rank_event_id, event_type
     FROM subscriptions ORDER BY account, id",
    "SELECT account, id, customer, subscription, status, paid, amount_paid, attempt_count,
            next_payment_attempt, paid_through, livemode, rank_created, rank_type, rank_status,
            rank_event_id, event_type
     FROM invoices ORDER BY account, id",
    "SELECT account, customer, livemode, client_reference_id, features, version, view
     FROM entitlements ORDER BY account, customer",
];

// ---------------------------------------------------------------------------------------------
// The harness of a scenario: an in-order pipeline and a reversed-and-duplicated one.

/// One change message of `entitlements.changes`.
#[derive(Clone, Debug)]
struct Change {
    key: String,
    body: Value,
}

impl Change {
    fn version(&self) -> i64 {
        self.body["version"]
            .as_i64()
            .unwrap_or_else(|| panic!("change without a numeric version: {}", self.body))
    }
}

struct Scenario {
    /// Gets the events in order, one applied before the next.
    in_order: Pipeline,
    /// Gets them reversed and each twice, all at once.
    shuffled: Pipeline,
    /// The last change version reported per key of the in-order run.
    seen: BTreeMap<String, i64>,
    /// What the in-order run was given so far.
    delivered: Vec<String>,
}

impl Scenario {
    async fn start(options: Options) -> Scenario {
        let in_order = Pipeline::in_process(options.clone()).await;
        let shuffled = Pipeline::in_process(options).await;
        Scenario {
            in_order,
            shuffled,
            seen: BTreeMap::new(),
            delivered: Vec::new(),
        }
    }

    /// Delivers `events` to the in-order pipeline one at a time, each applied and its change
    /// messages published before the next is sent; returns the new change messages.
    async fn deliver(&mut self, events: &[Event]) -> Vec<Change> {
        self.delivered.extend(events.iter().map(|e| e.id.clone()));
        deliver_each(&mut self.in_order, &mut self.seen, events).await
    }

    /// The in-order run's entitlement object of a customer.
    async fn view(&self, customer: &str, account: Option<&str>) -> Value {
        self.in_order.entitlements(customer, account).await
    }

    /// Delivers `events` reversed, each twice and interleaved, to the second pipeline and
    /// requires the same API objects and projection tables as the in-order run, a change log
    /// that ends at the API object in both, and every duplicate counted.
    async fn assert_converges_when_reversed_and_duplicated(mut self, events: &[Event]) {
        let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        assert_eq!(
            self.delivered, ids,
            "the in-order run must be given exactly the scenario, in order"
        );
        let shuffled: Vec<String> = reversed_and_duplicated(events)
            .iter()
            .map(|e| e.body())
            .collect();
        self.shuffled.send_all(&shuffled).await;
        self.shuffled.settle().await;

        let customers: BTreeSet<CustomerRef> = events.iter().map(CustomerRef::of).collect();
        for customer in &customers {
            let (status_in_order, in_order) = self.in_order.get(&customer.path()).await;
            let (status_shuffled, shuffled) = self.shuffled.get(&customer.path()).await;
            assert_eq!(status_in_order, 200, "{customer:?}: {in_order}");
            assert_eq!(status_shuffled, 200, "{customer:?}: {shuffled}");
            assert_eq!(
                comparable(&in_order),
                comparable(&shuffled),
                "{customer:?}: in order vs reversed and duplicated"
            );
        }
        for (account, reference) in client_references(events) {
            let path = match &account {
                Some(a) => format!("/v1/entitlements?client_reference_id={reference}&account={a}"),
                None => format!("/v1/entitlements?client_reference_id={reference}"),
            };
            let (status_in_order, in_order) = self.in_order.get(&path).await;
            let (status_shuffled, shuffled) = self.shuffled.get(&path).await;
            assert_eq!((status_in_order, status_shuffled), (200, 200), "{path}");
            assert_eq!(comparable(&in_order), comparable(&shuffled), "{path}");
        }
        // `entitlements.version` counts changes (fewer when events coalesce in a batch), so it
        // depends on how events were batched; everything else may not.
        let in_order = without_version(self.in_order.snapshot_with_bookkeeping().await);
        let shuffled = without_version(self.shuffled.snapshot_with_bookkeeping().await);
        assert_same_projections(
            "in order (left) vs reversed and duplicated (right)",
            &in_order,
            &shuffled,
        );
        assert_eq!(
            in_order["dead_letters"],
            [json!({"dead_letters": 0})],
            "no scenario event is unusable"
        );

        assert_change_log_ends_at_the_api_object(&self.in_order, &customers, events).await;
        assert_change_log_ends_at_the_api_object(&self.shuffled, &customers, events).await;

        assert_eq!(
            duplicates_counted(&self.shuffled, events.len() as u64).await,
            events.len() as u64,
            "projector_duplicates_total counts every redelivered event once"
        );
        // The in-order run saw each event once, so its counter is 0; it could only read so
        // because nothing was counted yet, so one deliberate redelivery must make it exactly 1
        // (a duplicate counted by mistake earlier, even late, makes it 2).
        let first = events.first().expect("a scenario has events");
        self.in_order.send(&first.body()).await;
        self.in_order.settle().await;
        assert_eq!(
            duplicates_counted(&self.in_order, 1).await,
            1,
            "the in-order run counted a duplicate it was never sent"
        );
    }
}

/// Sends each event and waits until it is applied and its changes are published; returns the
/// change messages with a version above `seen` (per key), by key and version.
async fn deliver_each(
    pipeline: &mut Pipeline,
    seen: &mut BTreeMap<String, i64>,
    events: &[Event],
) -> Vec<Change> {
    for event in events {
        pipeline.apply(&[event.body()]).await;
    }
    let mut new = Vec::new();
    for (key, changes) in change_log(pipeline) {
        let last = seen.get(&key).copied().unwrap_or(0);
        for change in changes {
            if change.version() > last {
                seen.insert(key.clone(), change.version());
                new.push(change);
            }
        }
    }
    new
}

/// The change topic per key, in publication order, with republished copies of a version
/// removed. Checks what holds of any change log: a copy is identical to its original, and
/// versions run 1, 2, 3… per key.
fn change_log(pipeline: &Pipeline) -> BTreeMap<String, Vec<Change>> {
    let mut log: BTreeMap<String, Vec<Change>> = BTreeMap::new();
    for (key, body) in pipeline.changes() {
        let key = key.unwrap_or_else(|| panic!("change message without a key: {body}"));
        let change = Change { key, body };
        let changes = log.entry(change.key.clone()).or_default();
        let version = change.version();
        if let Some(original) = changes.iter().find(|c| c.version() == version) {
            assert_eq!(
                original.body, change.body,
                "two different messages with version {version} for {}",
                change.key
            );
            continue;
        }
        let expected = changes.len() as i64 + 1;
        assert_eq!(
            version, expected,
            "{}: versions must run 1, 2, 3… in publication order: {}",
            change.key, change.body
        );
        changes.push(change);
    }
    log
}

/// Any run's change log: one key per customer, `added`/`removed` the differences between
/// consecutive messages, causes that are the customer's own events, and a last message equal
/// to what the read API serves (a consumer can bootstrap from the topic alone).
async fn assert_change_log_ends_at_the_api_object(
    pipeline: &Pipeline,
    customers: &BTreeSet<CustomerRef>,
    events: &[Event],
) {
    let log = change_log(pipeline);
    let keys: BTreeSet<String> = customers.iter().map(CustomerRef::key).collect();
    assert_eq!(log.keys().cloned().collect::<BTreeSet<_>>(), keys);
    for customer in customers {
        let changes = &log[&customer.key()];
        let mut previous: BTreeSet<String> = BTreeSet::new();
        for change in changes {
            let body = &change.body;
            assert_eq!(body["type"], "entitlements.changed", "{body}");
            assert_eq!(body["customer"], customer.customer.as_str(), "{body}");
            assert_eq!(body["account"], json!(customer.account), "{body}");
            let features = strings(&body["features"]);
            assert_eq!(
                strings(&body["added"]),
                &features - &previous,
                "added: {body}"
            );
            assert_eq!(
                strings(&body["removed"]),
                &previous - &features,
                "removed: {body}"
            );
            let cause = events
                .iter()
                .find(|e| body["cause"]["event_id"] == e.id.as_str())
                .unwrap_or_else(|| panic!("cause is not an event of the scenario: {body}"));
            assert_eq!(
                body["cause"]["event_type"],
                cause.event_type.as_str(),
                "{body}"
            );
            assert_eq!(
                &CustomerRef::of(cause),
                customer,
                "cause of another customer: {body}"
            );
            previous = features;
        }
        let mut last = changes.last().expect("a change per customer").body.clone();
        if let Some(object) = last.as_object_mut() {
            for field in ["type", "added", "removed", "cause"] {
                object.remove(field);
            }
        }
        let (status, view) = pipeline.get(&customer.path()).await;
        assert_eq!(status, 200, "{customer:?}: {view}");
        assert_eq!(last, view, "{customer:?}: last change message vs read API");
    }
}

/// `projector_duplicates_total{kind="event_id"}` once it reaches `expected` (the counter moves
/// just after the batch commits, so right after `settle` it may lag), or its value after a
/// deadline.
async fn duplicates_counted(pipeline: &Pipeline, expected: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = pipeline.metrics().await;
        let counted = text
            .lines()
            .find_map(|line| line.strip_prefix("projector_duplicates_total{kind=\"event_id\"} "))
            .map(|value| value.trim().parse::<u64>().expect("a counter value"))
            .unwrap_or(0);
        if counted >= expected || Instant::now() > deadline {
            return counted;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The events reversed, each sent twice with its copy after the next event:
/// e_n, e_n-1, e_n, e_n-2, e_n-1, …, e_1, e_2, e_1.
fn reversed_and_duplicated(events: &[Event]) -> Vec<Event> {
    let reversed: Vec<&Event> = events.iter().rev().collect();
    let mut out = Vec::with_capacity(events.len() * 2);
    for (i, event) in reversed.iter().enumerate() {
        out.push((*event).clone());
        if i > 0 {
            out.push(reversed[i - 1].clone());
        }
    }
    if let Some(last) = reversed.last() {
        out.push((*last).clone());
    }
    out
}

/// (account, client_reference_id) of every Checkout of the scenario that names one.
fn client_references(events: &[Event]) -> BTreeSet<(Option<String>, String)> {
    events
        .iter()
        .filter_map(|e| {
            let reference = e.object["client_reference_id"].as_str()?;
            Some((e.account.clone(), reference.to_owned()))
        })
        .collect()
}

/// An entitlement object without what depends on batching (`version`).
fn comparable(view: &Value) -> Value {
    let mut view = view.clone();
    if let Some(object) = view.as_object_mut() {
        object.remove("version");
    }
    view
}

fn strings(value: &Value) -> BTreeSet<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("expected an array, got {value}"))
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect()
}

/// (id, status) of each subscription of an entitlement object or change message.
fn statuses(view: &Value) -> Vec<(&str, &str)> {
    view["subscriptions"]
        .as_array()
        .unwrap_or_else(|| panic!("no subscriptions: {view}"))
        .iter()
        .map(|s| {
            (
                s["id"].as_str().expect("subscription id"),
                s["status"].as_str().expect("subscription status"),
            )
        })
        .collect()
}

async fn feature_granted(
    pipeline: &Pipeline,
    customer: &str,
    account: Option<&str>,
    feature: &str,
) -> bool {
    let query = account.map(|a| format!("?account={a}")).unwrap_or_default();
    let (status, body) = pipeline
        .get(&format!(
            "/v1/customers/{customer}/entitlements/{feature}{query}"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["feature"], feature, "{body}");
    body["granted"]
        .as_bool()
        .unwrap_or_else(|| panic!("granted is not a bool: {body}"))
}

#[track_caller]
fn only(changes: Vec<Change>) -> Change {
    assert_eq!(
        changes.len(),
        1,
        "expected exactly one change: {changes:#?}"
    );
    changes.into_iter().next().expect("one change")
}

/// A change message: its key, the event that caused it, and its features with the exact
/// `added`/`removed`, written `"api pro +pro -team"`: the features in order, `+` an added
/// one, `-` a removed one.
#[track_caller]
fn assert_change(change: &Change, key: &str, cause: &Event, expected: &str) {
    let body = &change.body;
    let (mut features, mut added, mut removed) = (Vec::new(), BTreeSet::new(), BTreeSet::new());
    for word in expected.split_whitespace() {
        if let Some(name) = word.strip_prefix('+') {
            added.insert(name.to_owned());
        } else if let Some(name) = word.strip_prefix('-') {
            removed.insert(name.to_owned());
        } else {
            features.push(word);
        }
    }
    assert_eq!(change.key, key, "key: {body}");
    assert_eq!(body["type"], "entitlements.changed", "{body}");
    assert_eq!(body["features"], json!(features), "features: {body}");
    assert_eq!(strings(&body["added"]), added, "added: {body}");
    assert_eq!(strings(&body["removed"]), removed, "removed: {body}");
    let cause_of = |field: &str| body["cause"][field].clone();
    assert_eq!(cause_of("event_id"), cause.id.as_str(), "cause: {body}");
    assert_eq!(
        cause_of("event_type"),
        cause.event_type.as_str(),
        "cause: {body}"
    );
}
