//! `projector rebuild` and `projector history` through both real binaries against the local
//! Kafka and Postgres (SPEC §10, DESIGN-NOTES "Rebuild without downtime"): a rebuild while
//! `projector run` is live reproduces the live projections, keeps up with events arriving
//! meanwhile, repairs a corrupted row with one message, applies a changed mapping to exactly the
//! customers it affects; `history` replays one customer's timeline from the log.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use rdkafka::Message;
use serde_json::{json, Value};

use common::events::*;
use common::*;
use testkit::kafka::produce_all;

/// Webhook requests in flight at once: ingest answers after a durable append, so sending one at
/// a time would spend the test waiting for acks.
const IN_FLIGHT: usize = 16;

const CONNECT_ACCOUNT: &str = "acct_rebuild";

// ---------------------------------------------------------------------------------------------
// The scenario set
// ---------------------------------------------------------------------------------------------

/// A customer of the scenario set and the features the SPEC §7 mapping gives them at the end.
struct Expected {
    account: Option<&'static str>,
    customer: &'static str,
    features: &'static [&'static str],
}

impl Expected {
    fn key(&self) -> String {
        message_key(self.account, self.customer)
    }
}

fn message_key(account: Option<&str>, customer: &str) -> String {
    match account {
        Some(account) => format!("{account}/{customer}"),
        None => customer.to_owned(),
    }
}

/// Several customers through the lifecycles SPEC §6 handles, with a redelivery, an ignored
/// event type and out-of-order arrivals.
fn scenario() -> (Vec<Event>, Vec<Expected>) {
    let sub = |id: &str, customer: &str, status: &str, items: &[Item<'_>]| {
        subscription(id, customer, status, items, T0 + MONTH, true)
    };
    let mut events = vec![
        // Checkout → trial → active → paid.
        Event::new(
            "evt_trial_1",
            "customer.created",
            T0,
            customer("cus_trial", false),
        ),
        Event::new(
            "evt_trial_2",
            "checkout.session.completed",
            T0 + 10,
            checkout_session(
                "cs_trial",
                "cus_trial",
                Some("user_trial"),
                "subscription",
                "paid",
                Some("sub_trial"),
                json!({}),
            ),
        ),
        Event::new(
            "evt_trial_3",
            "customer.subscription.created",
            T0 + 10,
            sub("sub_trial", "cus_trial", "trialing", &[PRO]),
        ),
        Event::new(
            "evt_trial_4",
            "customer.subscription.updated",
            T0 + 14 * DAY,
            sub("sub_trial", "cus_trial", "active", &[PRO]),
        ),
        Event::new(
            "evt_trial_5",
            "invoice.paid",
            T0 + 14 * DAY,
            invoice(
                "in_trial",
                "cus_trial",
                "sub_trial",
                "paid",
                1,
                None,
                T0 + 14 * DAY + MONTH,
                true,
            ),
        ),
        // Dunning: a failed payment, past_due keeps access under the default policy.
        Event::new(
            "evt_dunning_1",
            "customer.subscription.created",
            T0,
            sub("sub_dunning", "cus_dunning", "active", &[TEAM]),
        ),
        Event::new(
            "evt_dunning_2",
            "invoice.payment_failed",
            T0 + MONTH,
            invoice(
                "in_dunning",
                "cus_dunning",
                "sub_dunning",
                "open",
                1,
                Some(T0 + MONTH + 3 * DAY),
                T0 + 2 * MONTH,
                true,
            ),
        ),
        Event::new(
            "evt_dunning_3",
            "customer.subscription.updated",
            T0 + MONTH,
            sub("sub_dunning", "cus_dunning", "past_due", &[TEAM]),
        ),
        // Canceled, delivered before its creation.
        Event::new(
            "evt_cancel_2",
            "customer.subscription.deleted",
            T0 + 20 * DAY,
            sub("sub_cancel", "cus_cancel", "canceled", &[PRO]),
        ),
        Event::new(
            "evt_cancel_1",
            "customer.subscription.created",
            T0,
            sub("sub_cancel", "cus_cancel", "active", &[PRO]),
        ),
        // Paused, then resumed.
        Event::new(
            "evt_pause_1",
            "customer.subscription.created",
            T0,
            sub("sub_pause", "cus_pause", "active", &[PRO]),
        ),
        Event::new(
            "evt_pause_2",
            "customer.subscription.paused",
            T0 + 5 * DAY,
            sub("sub_pause", "cus_pause", "paused", &[PRO]),
        ),
        Event::new(
            "evt_pause_3",
            "customer.subscription.resumed",
            T0 + 9 * DAY,
            sub("sub_pause", "cus_pause", "active", &[PRO]),
        ),
        // A one-time purchase, named by its metadata.
        Event::new(
            "evt_once_1",
            "customer.created",
            T0,
            customer("cus_once", false),
        ),
        Event::new(
            "evt_once_2",
            "checkout.session.completed",
            T0 + 60,
            checkout_session(
                "cs_once",
                "cus_once",
                Some("user_once"),
                "payment",
                "paid",
                None,
                json!({"product": "prod_pro"}),
            ),
        ),
        // Kept in the log and ignored.
        Event::new(
            "evt_once_3",
            "charge.succeeded",
            T0 + 61,
            json!({"id": "ch_once", "object": "charge", "customer": "cus_once", "amount": 2000,
                   "livemode": false}),
        ),
        // Stripe's own entitlement summary.
        Event::new(
            "evt_summary_1",
            "entitlements.active_entitlement_summary.updated",
            T0 + DAY,
            entitlement_summary("cus_summary", &["beta", "priority_support"]),
        ),
        // A Connect account's customer, and the platform's customer of the same id.
        Event::new(
            "evt_connect_1",
            "customer.created",
            T0,
            customer("cus_connect", false),
        )
        .account(CONNECT_ACCOUNT),
        Event::new(
            "evt_connect_2",
            "customer.subscription.created",
            T0 + 30,
            sub("sub_connect", "cus_connect", "active", &[ENTERPRISE]),
        )
        .account(CONNECT_ACCOUNT),
        Event::new(
            "evt_connect_3",
            "customer.created",
            T0,
            customer("cus_connect", false),
        ),
        // Deleted: revokes everything.
        Event::new(
            "evt_gone_1",
            "customer.subscription.created",
            T0,
            sub("sub_gone", "cus_gone", "active", &[PRO]),
        ),
        Event::new(
            "evt_gone_2",
            "customer.deleted",
            T0 + 15 * DAY,
            deleted_customer("cus_gone", false),
        ),
        // The pre-basil shape, with two items.
        Event::new(
            "evt_legacy_1",
            "customer.subscription.created",
            T0,
            subscription(
                "sub_legacy",
                "cus_legacy",
                "active",
                &[PRO, TEAM],
                T0 + MONTH,
                false,
            ),
        )
        .legacy_api(),
    ];
    // Stripe redelivers.
    let redelivered = events[3].clone();
    events.push(redelivered);
    let expected = vec![
        Expected {
            account: None,
            customer: "cus_trial",
            features: &["api", "pro"],
        },
        Expected {
            account: None,
            customer: "cus_dunning",
            features: &["team"],
        },
        Expected {
            account: None,
            customer: "cus_cancel",
            features: &[],
        },
        Expected {
            account: None,
            customer: "cus_pause",
            features: &["api", "pro"],
        },
        Expected {
            account: None,
            customer: "cus_once",
            features: &["api", "pro"],
        },
        Expected {
            account: None,
            customer: "cus_summary",
            features: &["beta", "priority_support"],
        },
        Expected {
            account: Some(CONNECT_ACCOUNT),
            customer: "cus_connect",
            features: &["audit", "sso"],
        },
        Expected {
            account: None,
            customer: "cus_connect",
            features: &[],
        },
        Expected {
            account: None,
            customer: "cus_gone",
            features: &[],
        },
        Expected {
            account: None,
            customer: "cus_legacy",
            features: &["api", "pro", "team"],
        },
    ];
    (events, expected)
}

fn bodies(events: &[Event]) -> Vec<String> {
    events.iter().map(Event::body).collect()
}

fn distinct_ids(bodies: &[String]) -> usize {
    bodies
        .iter()
        .map(|b| serde_json::from_str::<Value>(b).unwrap()["id"].to_string())
        .collect::<HashSet<_>>()
        .len()
}

/// Sends the scenario set, waits until it is applied and checks it did what the scenario says.
async fn run_scenario(pipeline: &mut Pipeline) -> Vec<Expected> {
    let (events, expected) = scenario();
    pipeline.apply(&bodies(&events)).await;
    for e in &expected {
        let view = pipeline.entitlements(e.customer, e.account).await;
        assert_eq!(
            view["features"],
            json!(e.features),
            "scenario: features of {}",
            e.key()
        );
    }
    expected
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A subcommand run longer than this is taken to hang (a rebuild waiting forever on the lock).
const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

/// Runs `command` to completion; SIGKILLs it and fails the test after `COMMAND_DEADLINE`.
fn output_within_deadline(command: Command) -> Output {
    testkit::output_within_deadline(command, COMMAND_DEADLINE)
}

fn succeeded(what: &str, output: &Output) -> String {
    testkit::process::succeeded(&format!("projector {what}"), output)
}

/// Runs `projector rebuild --json [args]` to completion; prints its summary (the rebuild rate,
/// how long live was paused) and returns the `--json` report.
fn rebuild(pipeline: &Pipeline, args: &[&str]) -> Value {
    let mut command = vec!["rebuild", "--json"];
    command.extend(args);
    let started = Instant::now();
    let output = output_within_deadline(pipeline.projector_cli(&command));
    let stdout = succeeded(&command.join(" "), &output);
    rebuild_report(&command.join(" "), &stdout, started.elapsed())
}

/// The `--json` report `projector rebuild` printed, after printing its figures.
fn rebuild_report(what: &str, stdout: &str, took: Duration) -> Value {
    let report: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("projector {what} printed no JSON report ({e}): {stdout}"));
    // The summary's figures, as `--json` states them: whole numbers where they count, and
    // `changed` the number of differences listed (all of them, unless truncated).
    for count in ["events", "changed", "dead_letters", "locked_events"] {
        assert!(report[count].is_u64(), "{what}: {count} in {report}");
    }
    for figure in ["events_per_sec", "lock_held_ms", "seconds"] {
        assert!(
            report[figure].as_f64().is_some_and(|f| f >= 0.0),
            "{what}: {figure} in {report}"
        );
    }
    if report["differences_truncated"] == false {
        assert_eq!(
            report["changed"].as_u64(),
            report["differences"].as_array().map(|d| d.len() as u64),
            "{what}: changed vs differences in {report}"
        );
    }
    println!(
        "projector {what}: {} events, {:.0} events/s, live paused {:.1} ms, {} customers changed \
         [process wall time {:.2}s]",
        report["events"],
        report["events_per_sec"].as_f64().unwrap_or_default(),
        report["lock_held_ms"].as_f64().unwrap_or_default(),
        report["changed"],
        took.as_secs_f64()
    );
    report
}

/// The customers a report lists as changed, as message keys (`account/customer` or `customer`).
fn changed_keys(report: &Value) -> Vec<String> {
    report["differences"]
        .as_array()
        .expect("differences")
        .iter()
        .map(|d| message_key(d["account"].as_str(), d["customer"].as_str().unwrap()))
        .collect()
}

/// The entitlement rows by message key (`account/customer` or `customer`).
fn entitlements_by_key(tables: &BTreeMap<&'static str, Vec<Value>>) -> BTreeMap<String, Value> {
    tables["entitlements"]
        .iter()
        .map(|row| {
            let account = row["account"].as_str().unwrap();
            let customer = row["customer"].as_str().unwrap();
            (
                message_key((!account.is_empty()).then_some(account), customer),
                row.clone(),
            )
        })
        .collect()
}

/// The change messages in `after` that were not in `before`, as (key, message). The topic has
/// several partitions, so a read returns them grouped by partition, not in publishing order.
fn new_changes(
    before: &[(Option<String>, Value)],
    after: &[(Option<String>, Value)],
) -> Vec<(String, Value)> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (key, message) in before {
        *seen.entry(format!("{key:?} {message}")).or_default() += 1;
    }
    let mut new = Vec::new();
    for (key, message) in after {
        match seen.get_mut(&format!("{key:?} {message}")) {
            Some(n) if *n > 0 => *n -= 1,
            _ => new.push((
                key.clone().expect("change messages are keyed"),
                message.clone(),
            )),
        }
    }
    new
}

async fn count(pipeline: &Pipeline, sql: &str) -> i64 {
    let mut db = pipeline.db().await;
    sqlx::query_scalar(sql).fetch_one(&mut db).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// Rebuild equals live
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn rebuild_while_live_reproduces_every_projection_and_publishes_nothing() {
    // Arrange: the scenario set applied live.
    let mut pipeline = Pipeline::start(Options::default()).await;
    let expected = run_scenario(&mut pipeline).await;
    let before = pipeline.projections().await;
    let processed_before = count(&pipeline, "SELECT count(*) FROM processed_events").await;
    let messages_before = pipeline.changes();
    let mut views_before = Vec::new();
    for e in &expected {
        views_before.push(pipeline.entitlements(e.customer, e.account).await);
    }

    // Act: rebuild from offset 0 while `projector run` keeps serving.
    let report = rebuild(&pipeline, &[]);
    pipeline.settle().await;

    // Assert: identical tables (entitlements to the last column: version and updated_at
    // included), the same API answers, and nothing published.
    assert_eq!(report["swapped"], true, "{report}");
    assert_eq!(
        report["events"], pipeline.appended,
        "the rebuild replays every record live applied: {report}"
    );
    assert_eq!(
        report["changed"], 0,
        "rebuild reported differences: {report}"
    );
    assert_eq!(report["differences"], json!([]), "{report}");
    let after = pipeline.projections().await;
    assert_same_projections("live (left) vs rebuilt (right)", &before, &after);
    assert_eq!(
        count(&pipeline, "SELECT count(*) FROM processed_events").await,
        processed_before
    );
    for (e, view) in expected.iter().zip(&views_before) {
        assert_eq!(
            &pipeline.entitlements(e.customer, e.account).await,
            view,
            "API object of {} after the rebuild",
            e.key()
        );
    }
    assert_eq!(
        new_changes(&messages_before, &pipeline.changes()),
        vec![],
        "a rebuild without differences published change messages"
    );
    // Live processing carries on on the swapped tables.
    pipeline
        .apply(&[Event::new(
            "evt_after_rebuild",
            "customer.subscription.updated",
            T0 + 2 * MONTH,
            subscription(
                "sub_trial",
                "cus_trial",
                "unpaid",
                &[PRO],
                T0 + 2 * MONTH,
                true,
            ),
        )
        .body()])
        .await;
    let view = pipeline.entitlements("cus_trial", None).await;
    assert_eq!(view["features"], json!([]));
    assert_eq!(
        view["version"],
        views_before[0]["version"].as_i64().unwrap() + 1
    );
}

// ---------------------------------------------------------------------------------------------
// Rebuild under load
// ---------------------------------------------------------------------------------------------

/// Fewest load events, and the most: the sender keeps going until the rebuild has finished.
const LOAD_MIN: usize = 300;
const LOAD_MAX: usize = 3000;
const LOAD_CHUNK: usize = 20;
/// Customers in the log before the load starts, so the rebuild has something to catch up on.
const PRELOAD: usize = 400;

/// The load event of customer `i`: each one creates a distinct customer; every tenth is
/// redelivered.
fn load_bodies(i: usize) -> Vec<String> {
    let customer_id = format!("cus_load_{i}");
    let event_id = format!("evt_load_{i}");
    let created = T0 + 3 * MONTH + i as i64;
    let event = match i % 3 {
        0 => Event::new(
            &event_id,
            "customer.subscription.created",
            created,
            subscription(
                &format!("sub_load_{i}"),
                &customer_id,
                "active",
                &[PRO],
                created + MONTH,
                true,
            ),
        ),
        1 => Event::new(
            &event_id,
            "customer.created",
            created,
            customer(&customer_id, false),
        ),
        _ => Event::new(
            &event_id,
            "checkout.session.completed",
            created,
            checkout_session(
                &format!("cs_load_{i}"),
                &customer_id,
                Some(&format!("user_load_{i}")),
                "payment",
                "paid",
                None,
                json!({"price": "price_team_month"}),
            ),
        ),
    };
    let body = event.body();
    if i.is_multiple_of(10) {
        vec![body.clone(), body]
    } else {
        vec![body]
    }
}

fn load_features(i: usize) -> Value {
    match i % 3 {
        0 => json!(["api", "pro"]),
        1 => json!([]),
        _ => json!(["team"]),
    }
}

/// Sends load chunks until the rebuild is done and at least `LOAD_MIN` customers were sent;
/// returns the bodies sent and how many customers they were.
async fn send_load(
    client: reqwest::Client,
    url: String,
    sent: Arc<AtomicU64>,
    rebuild_done: Arc<AtomicBool>,
) -> (Vec<String>, usize) {
    let mut all = Vec::new();
    let mut customers = 0;
    while customers < LOAD_MAX && !(customers >= LOAD_MIN && rebuild_done.load(Ordering::SeqCst)) {
        let chunk: Vec<String> = (customers..customers + LOAD_CHUNK)
            .flat_map(load_bodies)
            .collect();
        stream::iter(&chunk)
            .for_each_concurrent(IN_FLIGHT, |body| {
                let (client, url, sent) = (&client, &url, &sent);
                async move {
                    post_signed(client, url, body).await;
                    sent.fetch_add(1, Ordering::SeqCst);
                }
            })
            .await;
        customers += LOAD_CHUNK;
        all.extend(chunk);
    }
    (all, customers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuild_under_load_reflects_every_event_exactly_once() {
    // Arrange: the scenario set and some preloaded customers, applied live.
    let mut pipeline = Pipeline::start(Options::default()).await;
    let (events, _) = scenario();
    let mut log = bodies(&events);
    log.extend((0..PRELOAD).map(|i| {
        customer_created(
            &format!("evt_pre_{i}"),
            T0 + i as i64,
            &format!("cus_pre_{i}"),
        )
    }));
    pipeline.send_concurrently(&log).await;
    pipeline.settle().await;
    let messages_before = pipeline.changes();

    // Act: load through ingest, and a rebuild once the load is flowing.
    let sent = Arc::new(AtomicU64::new(0));
    let rebuild_done = Arc::new(AtomicBool::new(false));
    let sender = tokio::spawn(send_load(
        pipeline.client.clone(),
        pipeline.ingest_url(),
        sent.clone(),
        rebuild_done.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while sent.load(Ordering::SeqCst) < 50 {
        assert!(Instant::now() < deadline, "the load did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let command = pipeline.projector_cli(&["rebuild", "--json"]);
    let rebuild_run = tokio::task::spawn_blocking({
        let (sent, rebuild_done) = (sent.clone(), rebuild_done.clone());
        move || {
            let at_start = sent.load(Ordering::SeqCst);
            let started = Instant::now();
            let output = output_within_deadline(command);
            let took = started.elapsed();
            let at_end = sent.load(Ordering::SeqCst);
            rebuild_done.store(true, Ordering::SeqCst);
            (output, at_start, at_end, took)
        }
    });
    let (output, at_start, at_end, took) = rebuild_run.await.unwrap();
    let (load, load_customers) = sender.await.unwrap();
    let stdout = succeeded("rebuild", &output);
    let report = rebuild_report("rebuild (under load)", &stdout, took);
    let differences = changed_keys(&report);
    println!(
        "rebuild under load: {} load records, {} of them accepted by ingest while the rebuild ran",
        load.len(),
        at_end - at_start
    );
    assert!(
        at_end > at_start,
        "no load event arrived while the rebuild ran: the test did not test anything"
    );
    pipeline.appended += load.len() as u64;
    pipeline.settle().await;

    // Assert: every load customer is served, once.
    let customers: Vec<usize> = (0..load_customers).collect();
    let served = &pipeline;
    let failures: Vec<String> = stream::iter(&customers)
        .map(|&i| async move {
            let (status, body) = served
                .get(&format!("/v1/customers/cus_load_{i}/entitlements"))
                .await;
            let ok = status == 200 && body["features"] == load_features(i) && body["version"] == 1;
            (!ok).then(|| format!("cus_load_{i}: {status} {body}"))
        })
        .buffer_unordered(IN_FLIGHT)
        .filter_map(|failure| async move { failure })
        .collect()
        .await;
    assert!(
        failures.is_empty(),
        "{} load customers are not served as sent, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let all_bodies: Vec<String> = log.iter().chain(&load).cloned().collect();
    assert_eq!(
        count(&pipeline, "SELECT count(*) FROM processed_events").await as usize,
        distinct_ids(&all_bodies),
        "processed_events must hold every distinct event id once"
    );
    let new_messages = new_changes(&messages_before, &pipeline.changes());
    let mut per_load_customer: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for (key, message) in &new_messages {
        assert!(
            key.starts_with("cus_load_"),
            "a message for {key}, which the load did not touch: {message}"
        );
        per_load_customer.entry(key).or_default().push(message);
    }
    assert_eq!(
        per_load_customer.len(),
        load_customers,
        "one message per load customer"
    );
    for (key, messages) in &per_load_customer {
        assert_eq!(
            messages.len(),
            1,
            "{key} was announced more than once: {messages:?}"
        );
        assert_eq!(messages[0]["version"], 1, "{key}: {}", messages[0]);
    }
    let by_rebuild = new_messages
        .iter()
        .filter(|(_, m)| m["cause"]["event_type"] == "projector.rebuild")
        .count();
    println!(
        "rebuild under load: {by_rebuild} load customers announced by the swap, {} by live batches \
         ({} difference lines)",
        new_messages.len() - by_rebuild,
        differences.len()
    );
    assert_eq!(
        by_rebuild,
        differences.len(),
        "the swap announces exactly the differences it reported"
    );

    // The same log, applied by a fresh pipeline without a rebuild, gives the same projections.
    let mut fresh = Pipeline::start(Options::default()).await;
    fresh.send_concurrently(&all_bodies).await;
    fresh.settle().await;
    assert_same_projections(
        "rebuilt under load (left) vs never rebuilt (right)",
        &without_version(pipeline.projections().await),
        &without_version(fresh.projections().await),
    );
}

// ---------------------------------------------------------------------------------------------
// Repair
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn rebuild_repairs_a_corrupted_row_with_one_message_and_dry_run_only_reports_it() {
    // Arrange: the scenario set, then one entitlement row corrupted by hand.
    let mut pipeline = Pipeline::start(Options::default()).await;
    run_scenario(&mut pipeline).await;
    let healthy = entitlements_by_key(&pipeline.projections().await);
    let version = healthy["cus_trial"]["version"].as_i64().unwrap();
    let mut db = pipeline.db().await;
    let corrupted = sqlx::query(
        "UPDATE entitlements SET features = '{}', view = jsonb_set(view, '{features}', '[]')
         WHERE account = '' AND customer = 'cus_trial'",
    )
    .execute(&mut db)
    .await
    .unwrap();
    assert_eq!(corrupted.rows_affected(), 1);
    let corrupt = entitlements_by_key(&pipeline.projections().await);
    let messages_before = pipeline.changes();

    // Act 1: a dry run.
    let report = rebuild(&pipeline, &["--dry-run"]);

    // Assert 1: exactly that customer reported, nothing swapped, nothing published.
    assert_eq!(report["swapped"], false, "{report}");
    assert_eq!(report["changed"], 1, "{report}");
    assert_eq!(changed_keys(&report), vec!["cus_trial"], "{report}");
    let difference = &report["differences"][0];
    assert_eq!(difference["features_before"], json!([]), "{difference}");
    assert_eq!(
        difference["features_after"],
        json!(["api", "pro"]),
        "{difference}"
    );
    assert_eq!(difference["version"], version + 1, "{difference}");
    pipeline.settle().await;
    assert_eq!(
        entitlements_by_key(&pipeline.projections().await),
        corrupt,
        "a dry run changed the entitlements"
    );
    assert_eq!(
        new_changes(&messages_before, &pipeline.changes()),
        vec![],
        "a dry run published"
    );

    // Act 2: the real rebuild.
    let report = rebuild(&pipeline, &[]);
    pipeline.settle().await;

    // Assert 2: the row is repaired with one message; nobody else changed.
    assert_eq!(report["swapped"], true, "{report}");
    assert_eq!(report["changed"], 1, "{report}");
    assert_eq!(changed_keys(&report), vec!["cus_trial"], "{report}");
    let new_messages = new_changes(&messages_before, &pipeline.changes());
    assert_eq!(new_messages.len(), 1, "{new_messages:?}");
    let (key, message) = &new_messages[0];
    assert_eq!(key, "cus_trial");
    assert_eq!(message["type"], "entitlements.changed");
    assert_eq!(message["version"], version + 1);
    assert_eq!(message["cause"]["event_type"], "projector.rebuild");
    assert_eq!(message["features"], json!(["api", "pro"]));
    assert_eq!(message["added"], json!(["api", "pro"]));
    assert_eq!(message["removed"], json!([]));
    let repaired = entitlements_by_key(&pipeline.projections().await);
    for (key, row) in &healthy {
        if key == "cus_trial" {
            let mut expected = row.clone();
            expected["version"] = json!(version + 1);
            assert_eq!(&repaired[key], &expected, "cus_trial repaired");
        } else {
            assert_eq!(&repaired[key], row, "{key} changed");
        }
    }
    assert_eq!(repaired.len(), healthy.len());
    let view = pipeline.entitlements("cus_trial", None).await;
    assert_eq!(view["features"], json!(["api", "pro"]));
    assert_eq!(view["version"], version + 1);
}

// ---------------------------------------------------------------------------------------------
// Changed mapping
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn rebuild_after_a_mapping_change_changes_exactly_the_affected_customers() {
    // Arrange: the scenario set under SPEC §7's mapping.
    let mut pipeline = Pipeline::start(Options::default()).await;
    run_scenario(&mut pipeline).await;
    let before = entitlements_by_key(&pipeline.projections().await);
    let messages_before = pipeline.changes();

    // Act: prod_pro grants one more feature, the `enterprise` lookup key nothing any more.
    let mapping = ENTITLEMENTS
        .replace(
            r#"features = ["pro", "api"]"#,
            r#"features = ["pro", "api", "export"]"#,
        )
        .replace(
            "[[grant]]\nlookup_key = \"enterprise\"\nfeatures = [\"sso\", \"audit\"]\n",
            "",
        );
    assert!(mapping.contains("export") && !mapping.contains("enterprise"));
    std::fs::write(&pipeline.entitlements_path, mapping).unwrap();
    let report = rebuild(&pipeline, &[]);
    pipeline.settle().await;

    // Assert: one message for each affected customer, none for anyone else.
    let gain_export = ["cus_legacy", "cus_once", "cus_pause", "cus_trial"];
    let lose_enterprise = format!("{CONNECT_ACCOUNT}/cus_connect");
    let mut affected: BTreeSet<String> = gain_export.iter().map(|c| c.to_string()).collect();
    affected.insert(lose_enterprise.clone());
    assert_eq!(
        changed_keys(&report).into_iter().collect::<BTreeSet<_>>(),
        affected,
        "{report}"
    );
    assert_eq!(report["changed"], 5, "{report}");
    let changes = new_changes(&messages_before, &pipeline.changes());
    let new_messages: BTreeMap<String, &Value> =
        changes.iter().map(|(k, m)| (k.clone(), m)).collect();
    assert_eq!(
        changes.len(),
        new_messages.len(),
        "one message per customer"
    );
    assert_eq!(
        new_messages.keys().cloned().collect::<BTreeSet<_>>(),
        affected
    );
    let after = entitlements_by_key(&pipeline.projections().await);
    for (key, old) in &before {
        let row = &after[key];
        let Some(message) = new_messages.get(key) else {
            assert_eq!(row, old, "{key} is not affected by the mapping change");
            continue;
        };
        let old_features: Vec<String> = serde_json::from_value(old["features"].clone()).unwrap();
        let (added, removed) = if *key == lose_enterprise {
            (json!([]), json!(["audit", "sso"]))
        } else {
            (json!(["export"]), json!([]))
        };
        let mut features: BTreeSet<String> = old_features.into_iter().collect();
        features.extend(serde_json::from_value::<Vec<String>>(added.clone()).unwrap());
        for f in removed.as_array().unwrap() {
            features.remove(f.as_str().unwrap());
        }
        let features = json!(features);
        assert_eq!(row["features"], features, "{key}");
        assert_eq!(
            row["version"],
            old["version"].as_i64().unwrap() + 1,
            "{key}"
        );
        assert_eq!(message["version"], row["version"], "{key}");
        assert_eq!(message["features"], features, "{key}");
        assert_eq!(message["added"], added, "{key}");
        assert_eq!(message["removed"], removed, "{key}");
        assert_eq!(message["cause"]["event_type"], "projector.rebuild", "{key}");
    }
    assert_eq!(after.len(), before.len());
    let view = pipeline.entitlements("cus_trial", None).await;
    assert_eq!(view["features"], json!(["api", "export", "pro"]));
    let view = pipeline
        .entitlements("cus_connect", Some(CONNECT_ACCOUNT))
        .await;
    assert_eq!(view["features"], json!([]));
}

// ---------------------------------------------------------------------------------------------
// History
// ---------------------------------------------------------------------------------------------

const HIST_CREATED: i64 = T0 - 60; // 2025-12-31T23:59:00Z
const HIST_TRIAL: i64 = T0; // 2026-01-01T00:00:00Z
const HIST_ACTIVE: i64 = T0 + 14 * DAY; // 2026-01-15T00:00:00Z
const HIST_PAID: i64 = HIST_ACTIVE + 60; // 2026-01-15T00:01:00Z
const HIST_FAILED: i64 = T0 + 44 * DAY; // 2026-02-14T00:00:00Z
const HIST_PAST_DUE: i64 = HIST_FAILED + 60; // 2026-02-14T00:01:00Z
const HIST_CANCELED: i64 = T0 + 60 * DAY; // 2026-03-02T00:00:00Z

fn history_log() -> Vec<Event> {
    let sub = |status: &str| subscription("sub_hist", "cus_hist", status, &[PRO], T0 + MONTH, true);
    let trial = Event::new(
        "evt_hist_2",
        "customer.subscription.created",
        HIST_TRIAL,
        sub("trialing"),
    );
    vec![
        Event::new(
            "evt_hist_1",
            "customer.created",
            HIST_CREATED,
            customer("cus_hist", false),
        ),
        trial.clone(),
        // Another customer in between: not part of cus_hist's history.
        Event::new(
            "evt_other_1",
            "customer.subscription.created",
            HIST_TRIAL + 5,
            subscription(
                "sub_other",
                "cus_other",
                "active",
                &[TEAM],
                T0 + MONTH,
                true,
            ),
        ),
        // The same customer id in a Connect account: not part of the platform's history.
        Event::new(
            "evt_hist_connect_1",
            "customer.subscription.created",
            HIST_TRIAL + DAY,
            subscription(
                "sub_hist_connect",
                "cus_hist",
                "active",
                &[ENTERPRISE],
                T0 + MONTH,
                true,
            ),
        )
        .account("acct_hist"),
        Event::new(
            "evt_hist_3",
            "customer.subscription.updated",
            HIST_ACTIVE,
            sub("active"),
        ),
        Event::new(
            "evt_hist_4",
            "invoice.paid",
            HIST_PAID,
            invoice(
                "in_hist_1",
                "cus_hist",
                "sub_hist",
                "paid",
                1,
                None,
                HIST_ACTIVE + MONTH,
                true,
            ),
        ),
        Event::new(
            "evt_hist_5",
            "invoice.payment_failed",
            HIST_FAILED,
            invoice(
                "in_hist_2",
                "cus_hist",
                "sub_hist",
                "open",
                1,
                Some(HIST_FAILED + 3 * DAY),
                HIST_FAILED + MONTH,
                true,
            ),
        ),
        Event::new(
            "evt_hist_6",
            "customer.subscription.updated",
            HIST_PAST_DUE,
            sub("past_due"),
        ),
        Event::new(
            "evt_hist_7",
            "customer.subscription.deleted",
            HIST_CANCELED,
            sub("canceled"),
        ),
        // A late redelivery changes nothing.
        trial,
    ]
}

fn history(pipeline: &Pipeline, args: &[&str]) -> Value {
    let mut command = vec!["history"];
    command.extend(args);
    let output = output_within_deadline(pipeline.projector_cli(&command));
    let stdout = succeeded(&command.join(" "), &output);
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("projector {}: not JSON ({e}):\n{stdout}", command.join(" ")))
}

#[tokio::test]
async fn history_and_at_replay_a_scripted_lifecycle_from_the_log() {
    // Arrange: trial → active → (paid) → (payment failed) → past_due → canceled.
    let mut pipeline = Pipeline::start(Options::default()).await;
    pipeline.apply(&bodies(&history_log())).await;

    // Act
    let timeline = history(&pipeline, &["cus_hist", "--json"]);

    // Assert: one entry per change of the entitlement object, in order, with its cause;
    // invoices and the redelivery change nothing, other customers and accounts do not appear.
    let entry = |at: &str,
                 id: &str,
                 kind: &str,
                 added: Value,
                 removed: Value,
                 features: Value,
                 subs: Value| {
        json!({"at": at, "event_id": id, "event_type": kind, "added": added, "removed": removed,
               "features": features, "subscriptions": subs})
    };
    let pro = || json!(["api", "pro"]);
    let none = || json!([]);
    assert_eq!(
        timeline,
        json!([
            entry(
                "2025-12-31T23:59:00Z",
                "evt_hist_1",
                "customer.created",
                none(),
                none(),
                none(),
                none()
            ),
            entry(
                "2026-01-01T00:00:00Z",
                "evt_hist_2",
                "customer.subscription.created",
                pro(),
                none(),
                pro(),
                json!(["sub_hist=trialing"])
            ),
            entry(
                "2026-01-15T00:00:00Z",
                "evt_hist_3",
                "customer.subscription.updated",
                none(),
                none(),
                pro(),
                json!(["sub_hist=active"])
            ),
            entry(
                "2026-02-14T00:01:00Z",
                "evt_hist_6",
                "customer.subscription.updated",
                none(),
                none(),
                pro(),
                json!(["sub_hist=past_due"])
            ),
            entry(
                "2026-03-02T00:00:00Z",
                "evt_hist_7",
                "customer.subscription.deleted",
                none(),
                pro(),
                none(),
                json!(["sub_hist=canceled"])
            ),
        ]),
        "timeline of cus_hist:\n{}",
        serde_json::to_string_pretty(&timeline).unwrap()
    );
    let connect = history(&pipeline, &["cus_hist", "--account", "acct_hist", "--json"]);
    assert_eq!(
        connect,
        json!([entry(
            "2026-01-02T00:00:00Z",
            "evt_hist_connect_1",
            "customer.subscription.created",
            json!(["audit", "sso"]),
            none(),
            json!(["audit", "sso"]),
            json!(["sub_hist_connect=active"])
        )])
    );
    let text = succeeded(
        "history cus_hist",
        &output_within_deadline(pipeline.projector_cli(&["history", "cus_hist"])),
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert!(lines[4].starts_with("2026-03-02T00:00:00Z") && lines[4].contains("-api -pro"));

    // --at: the object as of an instant (inclusive), offsets honoured.
    let at = |instant: &str| history(&pipeline, &["cus_hist", "--at", instant]);
    let active = at("2026-01-20T00:00:00Z");
    assert_eq!(active["customer"], "cus_hist");
    assert_eq!(active["account"], Value::Null);
    assert_eq!(active["features"], pro());
    assert_eq!(active["subscriptions"][0]["status"], "active");
    // As the live projection served it then: `updated_at` is Stripe's time of the newest event
    // reflected, here the paid invoice a minute after the activation (which changed nothing).
    assert_eq!(active["updated_at"], "2026-01-15T00:01:00Z");
    let past_due = at("2026-02-14T00:01:00Z");
    assert_eq!(past_due["features"], pro());
    assert_eq!(past_due["subscriptions"][0]["status"], "past_due");
    let just_before_cancel = at("2026-03-02T00:59:59+01:00");
    assert_eq!(just_before_cancel["subscriptions"][0]["status"], "past_due");
    let canceled = at("2026-03-02T00:00:00Z");
    assert_eq!(canceled["features"], none());
    assert_eq!(canceled["subscriptions"][0]["status"], "canceled");
    let trialing = at("2026-01-01T00:00:00.5Z");
    assert_eq!(trialing["subscriptions"][0]["status"], "trialing");
    let mut now = at("2100-01-01T00:00:00Z");
    let mut live = pipeline.entitlements("cus_hist", None).await;
    live.as_object_mut().unwrap().remove("version");
    now.as_object_mut().unwrap().remove("version");
    assert_eq!(
        now, live,
        "history's object as of now vs the live projection"
    );
    let before_anything = output_within_deadline(pipeline.projector_cli(&[
        "history",
        "cus_hist",
        "--at",
        "2025-12-01T00:00:00Z",
    ]));
    assert!(!before_anything.status.success());
    assert!(String::from_utf8_lossy(&before_anything.stderr).contains("no events of cus_hist"));
    let not_an_instant = output_within_deadline(pipeline.projector_cli(&[
        "history",
        "cus_hist",
        "--at",
        "yesterday",
    ]));
    assert!(!not_an_instant.status.success());
}

#[tokio::test]
async fn customer_unknown_to_the_replay_is_emptied_with_one_message_not_dropped() {
    // Arrange: the scenario set, plus an entitlement row no event in the log supports (as if a
    // projection fix moved its events to another customer).
    let mut pipeline = Pipeline::start(Options::default()).await;
    run_scenario(&mut pipeline).await;
    let ghost_view = json!({"customer": "cus_ghost", "account": null, "livemode": false,
        "client_reference_id": "user_ghost", "features": ["pro"], "subscriptions": [],
        "updated_at": "2026-01-01T00:00:00Z"});
    let mut db = pipeline.db().await;
    sqlx::query(
        "INSERT INTO entitlements (account, customer, livemode, client_reference_id, features, version, view, updated_at)
         VALUES ('', 'cus_ghost', false, 'user_ghost', '{pro}', 3, $1::jsonb, now())",
    )
    .bind(ghost_view.to_string())
    .execute(&mut db)
    .await
    .unwrap();
    let messages_before = pipeline.changes();

    // Act
    let dry_run = rebuild(&pipeline, &["--dry-run"])["differences"].clone();
    let differences = rebuild(&pipeline, &[])["differences"].clone();
    pipeline.settle().await;

    // Assert: reported, kept with no features at the next version, announced once.
    assert_eq!(dry_run.as_array().map(Vec::len), Some(1), "{dry_run}");
    assert_eq!(dry_run[0]["customer"], "cus_ghost", "{dry_run}");
    assert_eq!(dry_run[0]["removed"], json!(["pro"]), "{dry_run}");
    assert_eq!(differences, dry_run);
    let view = pipeline.entitlements("cus_ghost", None).await;
    assert_eq!(view["features"], json!([]));
    assert_eq!(view["client_reference_id"], Value::Null);
    assert_eq!(view["version"], 4);
    let new_messages = new_changes(&messages_before, &pipeline.changes());
    assert_eq!(new_messages.len(), 1, "{new_messages:?}");
    assert_eq!(new_messages[0].0, "cus_ghost");
    assert_eq!(new_messages[0].1["removed"], json!(["pro"]));
    assert_eq!(new_messages[0].1["version"], 4);
}

// ---------------------------------------------------------------------------------------------
// Dead letters stay as live has them
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn dead_letters_and_their_redrive_state_survive_a_rebuild_untouched() {
    // Arrange: a malformed event live dead-letters (pending), and a dead letter of a valid
    // event in the log, as an older projector version recorded it, redriven since.
    let mut pipeline = Pipeline::start(Options::default()).await;
    let valid = Event::new(
        "evt_dl_2",
        "customer.subscription.created",
        T0 + 10,
        subscription("sub_dl", "cus_dl", "active", &[PRO], T0 + MONTH, true),
    )
    .body();
    let mut malformed = subscription("sub_dl", "cus_dl", "active", &[PRO], T0 + MONTH, true);
    malformed.as_object_mut().unwrap().remove("status");
    let malformed = Event::new(
        "evt_dl_3",
        "customer.subscription.updated",
        T0 + 20,
        malformed,
    );
    pipeline
        .apply(&[
            customer_created("evt_dl_1", T0, "cus_dl"),
            valid.clone(),
            malformed.body(),
        ])
        .await;
    let record = read_topic_to_end(&pipeline.events_topic)
        .into_iter()
        .find(|m| m.payload() == Some(valid.as_bytes()))
        .expect("the valid event is in the log");
    let mut db = pipeline.db().await;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO dead_letters (event_id, event_type, topic, partition, \"offset\", reason, message, payload)
         VALUES ('evt_dl_2', 'customer.subscription.created', $1, $2, $3, 'unexpected_shape',
                 'rejected by an older projector version', $4) RETURNING id",
    )
    .bind(&pipeline.events_topic)
    .bind(record.partition())
    .bind(record.offset())
    .bind(valid.as_bytes())
    .fetch_one(&mut db)
    .await
    .unwrap();
    let redrive = pipeline.projector_command(&["redrive", "--id", &id.to_string()]);
    assert!(redrive.status.success(), "{redrive:?}");
    pipeline.settle().await;
    let dead_letters_sql = "SELECT id, event_id, partition, \"offset\", reason, redriven_at FROM dead_letters ORDER BY id";
    let before = pipeline.table(dead_letters_sql).await;
    assert_eq!(before.len(), 2, "{before:?}");
    assert!(before
        .iter()
        .any(|d| d["event_id"] == "evt_dl_2" && !d["redriven_at"].is_null()));
    assert!(before
        .iter()
        .any(|d| d["event_id"] == "evt_dl_3" && d["redriven_at"].is_null()));
    let dlq_before = read_topic_to_end(&pipeline.dlq_topic).len();

    // Act
    let report = rebuild(&pipeline, &[]);
    pipeline.settle().await;

    // Assert: the same rows, redrive state included; the replay met the malformed record but
    // neither recorded nor published it again; nothing else changed.
    assert_eq!(pipeline.table(dead_letters_sql).await, before);
    assert_eq!(report["dead_letters"], 1, "{report}");
    assert_eq!(read_topic_to_end(&pipeline.dlq_topic).len(), dlq_before);
    assert_eq!(report["changed"], 0, "{report}");
    assert_eq!(
        pipeline.entitlements("cus_dl", None).await["features"],
        json!(["api", "pro"])
    );
}

// ---------------------------------------------------------------------------------------------
// A large log: a crashed rebuild, then one that does not stop the world
// ---------------------------------------------------------------------------------------------

/// Customers of the large log, and events per customer: 300,000 events.
const LARGE_CUSTOMERS: usize = 30_000;
const LARGE_STEPS: usize = 10;

/// Event `step` of large-log customer `c`: created, then a subscription's life with invoices.
/// Customers of the same parity differ only in their number.
fn large_event(c: usize, step: usize) -> String {
    let customer_id = format!("cus_big_{c}");
    let subscription_id = format!("sub_big_{c}");
    let id = format!("evt_big_{c}_{step}");
    let created = T0 + (step as i64) * DAY;
    let statuses = ["trialing", "active", "past_due", "canceled", "active"];
    let items: &[Item<'_>] = if c.is_multiple_of(2) { &[PRO] } else { &[TEAM] };
    let event = match step {
        0 => Event::new(
            &id,
            "customer.created",
            created,
            customer(&customer_id, false),
        ),
        s if s % 2 == 0 => Event::new(
            &id,
            "invoice.paid",
            created,
            invoice(
                &format!("in_big_{c}_{s}"),
                &customer_id,
                &subscription_id,
                "paid",
                1,
                None,
                created + MONTH,
                true,
            ),
        ),
        s => Event::new(
            &id,
            if s == 1 {
                "customer.subscription.created"
            } else {
                "customer.subscription.updated"
            },
            created,
            subscription(
                &subscription_id,
                &customer_id,
                statuses[(s / 2) % statuses.len()],
                items,
                created + MONTH,
                true,
            ),
        ),
    };
    event.body()
}

/// [`large_event`] for every customer: built once per step and parity through the payload
/// builders, then given each customer's number (building 300,000 payloads through `serde_json`
/// at debug speed would take minutes).
fn large_log() -> impl Iterator<Item = (String, String)> {
    const PLACEHOLDER: usize = 999_999_990;
    (0..LARGE_STEPS).flat_map(|step| {
        let templates = [
            large_event(PLACEHOLDER, step),
            large_event(PLACEHOLDER + 1, step),
        ];
        (0..LARGE_CUSTOMERS).map(move |c| {
            let template = &templates[c % 2];
            let number = (PLACEHOLDER + c % 2).to_string();
            (
                format!("cus_big_{c}"),
                template.replace(&number, &c.to_string()),
            )
        })
    })
}

/// A producer straight to the log (not through ingest): the large log is for the rebuild, and
/// signing and POSTing 300,000 webhooks would take most of the test's time.
fn log_producer() -> rdkafka::producer::FutureProducer {
    shared::kafka::durable_producer_config(
        &kafka_settings(),
        Duration::from_secs(60),
        shared::limits::ingest_record_max_bytes(shared::limits::DEFAULT_MAX_BODY_BYTES),
    )
    .set("linger.ms", "20")
    .set("batch.num.messages", "10000")
    .create()
    .expect("producer")
}

/// `projector rebuild --json` on a blocking thread, so the test's monitors keep running.
async fn rebuild_within(pipeline: &Pipeline, deadline: Duration, what: &'static str) -> Value {
    let command = pipeline.projector_cli(&["rebuild", "--json"]);
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let output = testkit::output_within_deadline(command, deadline);
        let stdout = succeeded("rebuild", &output);
        rebuild_report(what, &stdout, started.elapsed())
    })
    .await
    .unwrap()
}

/// The end (high watermark) of every partition of `topic`.
fn log_ends(topic: &str) -> Vec<(i32, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("e2e-watermarks"))
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .expect("watermarks");
            (p.id(), high)
        })
        .collect()
}

/// Live's stored offsets summed: the records it has applied.
async fn applied(db: &mut sqlx::PgConnection, topic: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(sum(next_offset), 0)::int8 FROM consumer_offsets WHERE topic = $1",
    )
    .bind(topic)
    .fetch_one(db)
    .await
    .unwrap()
}

/// The names of the schemas rebuilds created and did not drop.
async fn rebuild_schemas(db: &mut sqlx::PgConnection) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'rebuild\\_%' ORDER BY 1",
    )
    .fetch_all(db)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_rebuild_after_a_crashed_one_pauses_live_under_2_s_and_the_api_under_1_s() {
    // Arrange: 300,000 events in the log, projected by a first rebuild. Live's own catch-up
    // of them would take minutes at debug speed, so live is stopped, its offsets are set to the
    // end of the log (as if it had applied it and lost its tables) and the rebuild builds the
    // projections, announcing every customer; then live runs again.
    let mut pipeline = Pipeline::start(Options::default()).await;
    pipeline.projector.take();
    let producer = log_producer();
    let topic = pipeline.events_topic.clone();
    let started = Instant::now();
    pipeline.appended += produce_all(&producer, &topic, large_log()).await;
    let produced = started.elapsed();
    let mut db = pipeline.db().await;
    for (partition, end) in log_ends(&topic) {
        sqlx::query(
            "INSERT INTO consumer_offsets (topic, partition, next_offset) VALUES ($1, $2, $3)
             ON CONFLICT (topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset",
        )
        .bind(&topic)
        .bind(partition)
        .bind(end)
        .execute(&mut db)
        .await
        .unwrap();
    }
    let first = rebuild_within(
        &pipeline,
        Duration::from_secs(600),
        "first rebuild (300k events)",
    )
    .await;
    assert_eq!(first["events"], 300_000, "{first}");
    assert_eq!(first["changed"], LARGE_CUSTOMERS, "{first}");
    pipeline.start_projector();
    pipeline.settle().await;
    println!(
        "large log: {} events produced in {:.1}s, projected and announced after {:.1}s",
        pipeline.appended,
        produced.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let messages_before = pipeline.changes();

    // Measure, from here to the end: live's longest stall while records wait for it (a
    // trickle of new customers keeps it busy), and the read API's longest answer.
    let done = Arc::new(AtomicBool::new(false));
    let trickled = Arc::new(AtomicU64::new(0));
    let trickle = tokio::spawn({
        let (done, trickled, producer, topic) = (
            done.clone(),
            trickled.clone(),
            producer.clone(),
            topic.clone(),
        );
        async move {
            let mut n = 0;
            while !done.load(Ordering::SeqCst) {
                let customer_id = format!("cus_trickle_{n}");
                let event_id = format!("evt_trickle_{n}");
                let body = customer_created(&event_id, T0 + MONTH, &customer_id);
                produce_all(&producer, &topic, std::iter::once((customer_id, body))).await;
                n += 1;
                trickled.store(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let base = pipeline.appended as i64;
    let stall_monitor = tokio::spawn({
        let (done, trickled, topic) = (done.clone(), trickled.clone(), topic.clone());
        let mut db = pipeline.db().await;
        async move {
            let mut longest = Duration::ZERO;
            let mut last = (applied(&mut db, &topic).await, Instant::now());
            while !done.load(Ordering::SeqCst) {
                let now = applied(&mut db, &topic).await;
                if now > last.0 {
                    last = (now, Instant::now());
                } else if base + (trickled.load(Ordering::SeqCst) as i64) > now {
                    longest = longest.max(last.1.elapsed());
                } else {
                    last.1 = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            longest
        }
    });
    let prober = tokio::spawn({
        let (done, client, url) = (
            done.clone(),
            pipeline.client.clone(),
            pipeline.api_url("/v1/customers/cus_big_7/entitlements"),
        );
        async move {
            let (mut longest, mut answers) = (Duration::ZERO, 0u64);
            while !done.load(Ordering::SeqCst) {
                let asked = Instant::now();
                let response = client
                    .get(&url)
                    .bearer_auth(TOKEN)
                    .send()
                    .await
                    .expect("GET");
                assert_eq!(response.status(), 200);
                longest = longest.max(asked.elapsed());
                answers += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (longest, answers)
        }
    });

    // Act 1: a rebuild SIGKILLed while it replays.
    let mut crashed = pipeline
        .projector_cli(&["rebuild", "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start rebuild");
    let deadline = Instant::now() + Duration::from_secs(120);
    let leftover = loop {
        assert!(
            Instant::now() < deadline,
            "the rebuild never started replaying"
        );
        assert!(
            crashed.try_wait().unwrap().is_none(),
            "the rebuild ended before it was killed"
        );
        if let Some(schema) = rebuild_schemas(&mut db).await.into_iter().next() {
            let staged: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM (SELECT 1 FROM {schema}.stage_subscriptions LIMIT 1) s"
            ))
            .fetch_one(&mut db)
            .await
            .ok();
            if staged == Some(1) {
                break schema;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    crashed.kill().unwrap();
    crashed.wait().unwrap();
    assert_eq!(rebuild_schemas(&mut db).await, vec![leftover.clone()]);

    // Act 2: the next rebuild, to completion.
    let report = rebuild_within(&pipeline, Duration::from_secs(600), "rebuild (300k events)").await;
    done.store(true, Ordering::SeqCst);
    trickle.await.unwrap();
    let longest_stall = stall_monitor.await.unwrap();
    let (longest_answer, answers) = prober.await.unwrap();
    pipeline.appended += trickled.load(Ordering::SeqCst);
    pipeline.settle().await;
    println!(
        "during the rebuilds: read API longest answer {:.1} ms over {answers} answers; live's longest stall {:.1} ms; \
         lock held {:.1} ms for {} records; phases {}",
        longest_answer.as_secs_f64() * 1e3,
        longest_stall.as_secs_f64() * 1e3,
        report["lock_held_ms"].as_f64().unwrap(),
        report["locked_events"],
        report["phases"]
    );

    // Assert: leftovers reused, everything replayed, nothing changed, targets met.
    assert_eq!(report["leftovers_removed"], json!([leftover]), "{report}");
    assert_eq!(rebuild_schemas(&mut db).await, Vec::<String>::new());
    assert!(report["events"].as_u64().unwrap() >= 300_000, "{report}");
    assert_eq!(
        report["changed"], 0,
        "the rebuilt entitlements differ from live's: {report}"
    );
    let new_messages = new_changes(&messages_before, &pipeline.changes());
    assert_eq!(
        new_messages.len() as u64,
        trickled.load(Ordering::SeqCst),
        "one message per new customer from live, none from the rebuild"
    );
    assert!(new_messages
        .iter()
        .all(|(_, m)| m["cause"]["event_type"] == "customer.created"));
    assert!(
        report["lock_held_ms"].as_f64().unwrap() < 2_000.0,
        "{report}"
    );
    assert!(
        longest_stall < Duration::from_secs(2),
        "live stalled {longest_stall:?}"
    );
    assert!(
        longest_answer < Duration::from_secs(1),
        "the API took {longest_answer:?}"
    );
    let trickle_rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM entitlements WHERE customer LIKE 'cus\\_trickle\\_%'",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(trickle_rows as u64, trickled.load(Ordering::SeqCst));
    let view = pipeline.entitlements("cus_big_7", None).await;
    assert_eq!(view["features"], json!(["team"]), "{view}");
}
