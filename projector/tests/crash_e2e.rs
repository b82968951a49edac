//! Crash safety of `projector run` through both real binaries: a SIGKILL in the middle of
//! consumption loses nothing and applies nothing twice, and SIGTERM is a clean stop.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::json;

use common::events::*;
use common::workload::Story;
use common::*;

const CUSTOMERS: usize = 300;
const CONNECT_ACCOUNT: &str = "acct_crash";

struct Workload {
    /// Webhook bodies in sending order, redeliveries included.
    bodies: Vec<String>,
    /// Distinct event ids among them.
    event_ids: usize,
    customers: Vec<CustomerRef>,
}

/// A few thousand events over `CUSTOMERS` customers: Checkout, subscriptions moving through
/// statuses and items, invoices paid and failed, pauses, cancellations, Stripe entitlement
/// summaries, one-time purchases, deleted customers, Connect customers, an ignored type, both
/// API-version shapes, redeliveries, and a shuffled arrival order.
fn workload() -> Workload {
    let mut events: Vec<Event> = Vec::new();
    let mut customers = Vec::new();
    for i in 0..CUSTOMERS {
        let story = Story::new("crash", i);
        let (c, t) = (&story.customer, story.t);
        let account = (i % 10 == 3).then_some(CONNECT_ACCOUNT);
        customers.push(CustomerRef {
            account: account.map(str::to_owned),
            customer: c.clone(),
        });
        let sub_a = &story.sub_a;
        let mut mine = story.checkout_to_past_due(5);
        match i % 4 {
            0 => mine.extend(story.upgraded_and_paid()),
            1 => mine.extend(story.unpaid_then_canceled()),
            2 => mine.extend([
                (
                    "customer.subscription.paused",
                    t + 200,
                    story.sub(sub_a, "paused", &[PRO]),
                ),
                (
                    "customer.subscription.resumed",
                    t + 300,
                    story.sub(sub_a, "active", &[TEAM]),
                ),
            ]),
            _ => mine.extend([
                story.cancel_at_period_end(&[PRO]),
                (
                    "entitlements.active_entitlement_summary.updated",
                    t + 250,
                    entitlement_summary(c, &["beta", "support"]),
                ),
            ]),
        }
        if i % 3 == 0 {
            mine.push(story.second_subscription_trialing());
        }
        if i % 7 == 0 {
            mine.push((
                "checkout.session.completed",
                t + 400,
                checkout_session(
                    &format!("cs_crash_{i:05}_once"),
                    c,
                    None,
                    "payment",
                    "paid",
                    None,
                    json!({"product": "prod_pro"}),
                ),
            ));
        }
        if i % 5 == 0 {
            mine.push((
                "payment_intent.created",
                t + 7,
                json!({"id": format!("pi_crash_{i:05}"), "object": "payment_intent",
                       "customer": c, "amount": 2000, "currency": "usd", "livemode": false}),
            ));
        }
        if i % 23 == 0 {
            mine.push(("customer.deleted", t + 500, deleted_customer(c, false)));
        }
        for mut event in story.events(mine) {
            if let Some(account) = account {
                event = event.account(account);
            }
            events.push(event);
        }
    }
    let event_ids = events.len();
    let mut bodies: Vec<String> = events.iter().map(Event::body).collect();
    // Stripe redelivers: every eleventh event arrives twice, as a new record.
    let redeliveries: Vec<String> = bodies.iter().step_by(11).cloned().collect();
    bodies.extend(redeliveries);
    shuffle(&mut bodies, 0x5EED_CAFE_F00D_u64);
    Workload {
        bodies,
        event_ids,
        customers,
    }
}

/// Fisher–Yates with xorshift64: the same "random" arrival order on every run.
fn shuffle<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        items.swap(i, (seed % (i as u64 + 1)) as usize);
    }
}

/// Polls the stored offsets and SIGKILLs the projector once it has applied between 30 % and
/// 80 % of `total` records; returns how many it had applied.
async fn kill_projector_midway(pipeline: &mut Pipeline, total: u64) -> u64 {
    let mut db = pipeline.db().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let applied = applied_records(&mut db, &pipeline.events_topic).await;
        if applied * 10 >= total * 3 && applied * 5 <= total * 4 {
            pipeline.projector.as_mut().unwrap().kill();
            return applied;
        }
        assert!(
            applied * 5 < total * 4,
            "the projector applied {applied} of {total} records before it could be killed \
             midway: lower BATCH_MAX_EVENTS"
        );
        assert!(
            Instant::now() < deadline,
            "the projector applied only {applied} of {total} records within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn count(pipeline: &Pipeline, sql: &str) -> i64 {
    let mut db = pipeline.db().await;
    sqlx::query_scalar(sql).fetch_one(&mut db).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_consumption_then_restart_equals_an_uninterrupted_run() {
    // Arrange: the same log for two pipelines; small batches make the crashed one's
    // consumption long enough to be interrupted.
    let workload = workload();
    let total = workload.bodies.len() as u64;
    let crashed_options = Options {
        extra_env: vec![("BATCH_MAX_EVENTS".to_owned(), "50".to_owned())],
        ..Options::default()
    };
    let (mut crashed, mut uninterrupted) = tokio::join!(
        Pipeline::start(crashed_options),
        Pipeline::start(Options::default())
    );
    let client = reqwest::Client::new();
    let (crashed_url, uninterrupted_url) = (crashed.ingest_url(), uninterrupted.ingest_url());

    // Act: SIGKILL the projector while it is consuming, restart it, let both settle.
    let (sent_crashed, sent_uninterrupted, applied_at_kill) = tokio::join!(
        send_concurrently(&client, &crashed_url, &workload.bodies),
        send_concurrently(&client, &uninterrupted_url, &workload.bodies),
        kill_projector_midway(&mut crashed, total),
    );
    eprintln!("SIGKILLed the projector after {applied_at_kill} of {total} records");
    crashed.appended = sent_crashed;
    uninterrupted.appended = sent_uninterrupted;
    crashed.projector = None;
    crashed.start_projector();
    tokio::join!(crashed.settle(), uninterrupted.settle());

    // Assert: identical projections.
    assert!(applied_at_kill < total);
    let (a, b) = tokio::join!(crashed.projections(), uninterrupted.projections());
    assert_same_projections(
        "crashed vs uninterrupted run",
        &without_version(a),
        &without_version(b),
    );
    assert_eq!(
        crashed.table(PROJECTIONS[0].1).await.len(),
        CUSTOMERS,
        "every customer is projected"
    );
    for pipeline in [&crashed, &uninterrupted] {
        assert_eq!(
            count(pipeline, "SELECT count(*) FROM processed_events").await,
            workload.event_ids as i64,
            "each distinct event is applied exactly once"
        );
        assert_eq!(
            count(pipeline, "SELECT count(*) FROM dead_letters").await,
            0
        );
    }

    // Assert: the crashed run's change topic has no gaps and ends on the API's state.
    let changes = crashed.changes();
    let last = last_change_per_key(&changes);
    let expected_keys: BTreeSet<String> = workload.customers.iter().map(CustomerRef::key).collect();
    assert_eq!(
        last.keys().cloned().collect::<BTreeSet<_>>(),
        expected_keys,
        "every customer has change messages"
    );
    for customer in &workload.customers {
        let (status, view) = crashed.get(&customer.path()).await;
        assert_eq!(status, 200, "GET {}: {view}", customer.path());
        let mut message = last[&customer.key()].clone();
        // `updated_at` follows every event (an invoice moves it) without a new version.
        for field in ["type", "added", "removed", "cause", "updated_at"] {
            message.as_object_mut().unwrap().remove(field);
        }
        let mut view = view;
        view.as_object_mut().unwrap().remove("updated_at");
        assert_eq!(
            message,
            view,
            "the last change message of {} is not the API's object",
            customer.key()
        );
    }
}

#[tokio::test]
async fn sigterm_stops_the_projector_cleanly_with_exit_code_0() {
    // Arrange
    let mut pipeline = Pipeline::start(Options::default()).await;
    let t = T0;
    pipeline
        .apply(&[
            customer_created("evt_term_1", t, "cus_term"),
            Event::new(
                "evt_term_2",
                "customer.subscription.created",
                t + 10,
                subscription("sub_term", "cus_term", "active", &[PRO], t + MONTH, true),
            )
            .body(),
        ])
        .await;

    // Act
    let status = pipeline.projector.as_mut().unwrap().terminate();

    // Assert
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    assert_eq!(
        count(
            &pipeline,
            "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        )
        .await,
        0,
        "a clean stop leaves no change message unpublished"
    );
}

#[tokio::test]
async fn a_restarted_projector_resumes_from_the_offsets_in_postgres_not_from_kafkas_commits() {
    // Arrange: a few customers applied; Kafka's group offsets now point at the end of the log.
    let mut pipeline = Pipeline::start(Options::default()).await;
    let mut bodies = Vec::new();
    for i in 0..6 {
        let customer = format!("cus_resume_{i}");
        bodies.push(
            Event::new(
                &format!("evt_resume_{i}"),
                "customer.subscription.created",
                T0 + i,
                subscription(
                    &format!("sub_resume_{i}"),
                    &customer,
                    "active",
                    &[("price_pro_month", "prod_pro", None)],
                    T0 + 2_592_000,
                    true,
                ),
            )
            .body(),
        );
    }
    pipeline.apply(&bodies).await;
    let before = pipeline
        .table("SELECT customer, features FROM entitlements ORDER BY customer")
        .await;
    assert_eq!(before.len(), 6);
    assert_eq!(
        pipeline.projector.as_mut().unwrap().terminate().code(),
        Some(0)
    );
    pipeline.projector = None;

    // The database goes back to before any of it (as after a restore from an older backup),
    // while Kafka's committed offsets stay at the end.
    let mut db = pipeline.db().await;
    sqlx::query(
        "TRUNCATE customers, subscriptions, invoices, checkout_sessions, entitlement_summaries,
                  entitlements, processed_events",
    )
    .execute(&mut db)
    .await
    .unwrap();
    sqlx::query("UPDATE consumer_offsets SET next_offset = 0")
        .execute(&mut db)
        .await
        .unwrap();

    // Act
    pipeline.start_projector();
    pipeline.settle().await;

    // Assert: everything after the stored offsets was applied again.
    let after = pipeline
        .table("SELECT customer, features FROM entitlements ORDER BY customer")
        .await;
    assert_eq!(after, before);
}
