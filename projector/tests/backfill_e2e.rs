//! Adopting an existing account (SPEC §11), end to end: the real `ingest` (webhooks, `backfill`,
//! `reconcile`) binary and the projector's application (in process), the real Kafka and Postgres, and a real stateful
//! Stripe API server this project did not write (localstripe, `scripts/localstripe`). Each
//! scenario compares the read API with the server's own state for every customer it made.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use serde_json::Value;
use testkit::localstripe::{LocalStripe, API_KEY, PRO_PLAN, TEAM_PLAN};

/// The features SPEC §7 grants for a server-side subscription under the e2e mapping
/// (`prod_pro` → api, pro; `price_team_month` → team), `past_due` granting.
fn features_of(subscriptions: &[Value]) -> BTreeSet<String> {
    let mut features = BTreeSet::new();
    for sub in subscriptions {
        if !matches!(
            sub["status"].as_str(),
            Some("active" | "trialing" | "past_due")
        ) {
            continue;
        }
        for item in sub["items"]["data"].as_array().into_iter().flatten() {
            let plan = &item["plan"];
            if plan["product"] == "prod_pro" {
                features.extend(["api".to_owned(), "pro".to_owned()]);
            }
            if plan["id"] == "price_team_month" {
                features.insert("team".to_owned());
            }
        }
    }
    features
}

/// What the read API says about `customer`, in the server's terms: features and each
/// subscription's status. `None` for a customer the projection never saw.
async fn projected(
    pipeline: &Pipeline,
    customer: &str,
) -> Option<(BTreeSet<String>, BTreeSet<(String, String)>)> {
    let (status, view) = pipeline
        .get(&format!("/v1/customers/{customer}/entitlements"))
        .await;
    if status == 404 {
        return None;
    }
    assert_eq!(status, 200, "{view}");
    let features = view["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect();
    let subscriptions = view["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_owned(),
                s["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    Some((features, subscriptions))
}

/// The server's view of `customer` in the same terms.
async fn on_server(
    stripe: &LocalStripe,
    customer: &str,
) -> (BTreeSet<String>, BTreeSet<(String, String)>) {
    let subscriptions = stripe.subscriptions_of(customer).await;
    let statuses = subscriptions
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_owned(),
                s["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    (features_of(&subscriptions), statuses)
}

/// Differences between the read API and the server, one line per customer that differs.
async fn differences(
    pipeline: &Pipeline,
    stripe: &LocalStripe,
    customers: &[String],
) -> Vec<String> {
    let mut diffs = Vec::new();
    for customer in customers {
        let server = on_server(stripe, customer).await;
        let exists = stripe.customer_exists(customer).await;
        match projected(pipeline, customer).await {
            Some(view) if view == server => {}
            // A deleted customer the log never mentioned is unknown, as the server says.
            None if !exists && server.1.is_empty() => {}
            view => diffs.push(format!("{customer}: api {view:?}, server {server:?}")),
        }
    }
    diffs
}

/// Polls until the read API equals the server for every customer, or fails with the
/// differences after `within`.
async fn assert_converges(
    pipeline: &Pipeline,
    stripe: &LocalStripe,
    customers: &[String],
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let diffs = differences(pipeline, stripe, customers).await;
        if diffs.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the projection did not converge to the server's state:\n{}",
            diffs.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Records the raw log holds now (sum of the partitions' high watermarks).
fn log_size(topic: &str) -> u64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions = metadata.topics()[0].partitions().len() as i32;
    (0..partitions)
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap();
            (high - low) as u64
        })
        .sum()
}

fn api_env(stripe: &LocalStripe) -> Vec<(&'static str, String)> {
    vec![
        ("STRIPE_API_KEY", API_KEY.to_owned()),
        ("STRIPE_API_BASE", stripe.base.clone()),
        ("RUST_LOG", "warn".to_owned()),
    ]
}

/// Runs `ingest backfill` to completion; returns its `--json` summary.
fn backfill(pipeline: &Pipeline, stripe: &LocalStripe, state_dir: &str) -> Value {
    let env = api_env(stripe);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let output = pipeline.ingest_command(
        &[
            "backfill",
            "--json",
            "--rate",
            "200",
            "--state-dir",
            state_dir,
        ],
        &env,
    );
    assert!(
        output.status.success(),
        "backfill failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Change messages about `customers`.
fn changes_of(pipeline: &Pipeline, customers: &BTreeSet<String>) -> usize {
    pipeline
        .changes()
        .iter()
        .filter(|(key, _)| key.as_ref().is_some_and(|k| customers.contains(k)))
        .count()
}

/// Every projection row about `customers` (by `customer`, or `id` for the customers table).
async fn projections_of(
    pipeline: &Pipeline,
    customers: &BTreeSet<String>,
) -> std::collections::BTreeMap<&'static str, Vec<Value>> {
    let mut tables = pipeline.projections().await;
    for rows in tables.values_mut() {
        rows.retain(|row| {
            [&row["customer"], &row["id"]]
                .iter()
                .any(|v| v.as_str().is_some_and(|c| customers.contains(c)))
        });
    }
    tables
}

/// The scenario account: every kind of customer the issue names.
struct Account {
    customers: Vec<String>,
}

async fn build_history(stripe: &LocalStripe) -> Account {
    let mut customers = Vec::new();
    // Active.
    let active = stripe.customer("pm_card_visa").await;
    stripe.subscribe(&active, PRO_PLAN, None).await;
    customers.push(active);
    // A trial (localstripe keeps trials `incomplete`: the server's word is what we compare).
    let trial = stripe.customer("pm_card_visa").await;
    stripe.subscribe(&trial, TEAM_PLAN, Some(14)).await;
    customers.push(trial);
    // Canceled.
    let canceled = stripe.customer("pm_card_visa").await;
    let sub = stripe.subscribe(&canceled, PRO_PLAN, None).await;
    stripe.cancel(sub["id"].as_str().unwrap()).await;
    customers.push(canceled);
    // Several: one canceled, two live.
    let several = stripe.customer("pm_card_visa").await;
    let old = stripe.subscribe(&several, PRO_PLAN, None).await;
    stripe.subscribe(&several, TEAM_PLAN, None).await;
    stripe.subscribe(&several, PRO_PLAN, None).await;
    stripe.cancel(old["id"].as_str().unwrap()).await;
    customers.push(several);
    // Declined: the first invoice's charge fails, the subscription stays incomplete.
    let declined = stripe.customer("pm_card_chargeCustomerFail").await;
    stripe.subscribe(&declined, PRO_PLAN, None).await;
    customers.push(declined);
    // Deleted, after having paid: its subscription is canceled and the customer gone.
    let deleted = stripe.customer("pm_card_visa").await;
    stripe.subscribe(&deleted, PRO_PLAN, None).await;
    stripe.delete_customer(&deleted).await;
    customers.push(deleted);
    // Deleted without ever subscribing: the server forgets it entirely.
    let gone = stripe.customer("pm_card_visa").await;
    stripe.delete_customer(&gone).await;
    customers.push(gone);
    Account { customers }
}

fn state_dir() -> String {
    std::env::temp_dir()
        .join(unique("backfill-state"))
        .display()
        .to_string()
}

#[tokio::test]
async fn backfill_of_an_existing_account_matches_the_server_and_a_second_run_changes_nothing() {
    // Arrange: an account's history that no webhook ever reported.
    let stripe = LocalStripe::connect().await;
    let account = build_history(&stripe).await;
    let mut pipeline = Pipeline::in_process(Options::default()).await;
    let state = state_dir();

    // Act
    let first = backfill(&pipeline, &stripe, &state);
    pipeline.appended = log_size(&pipeline.events_topic);
    pipeline.settle().await;

    // Assert: every customer as the server has it.
    let diffs = differences(&pipeline, &stripe, &account.customers).await;
    assert!(
        diffs.is_empty(),
        "after the backfill:\n{}",
        diffs.join("\n")
    );
    let active = projected(&pipeline, &account.customers[0]).await.unwrap();
    assert_eq!(
        active.0,
        BTreeSet::from(["api".to_owned(), "pro".to_owned()]),
        "the comparison is not vacuous"
    );
    assert!(first["records_appended"].as_u64().unwrap() >= 14, "{first}");
    // localstripe is shared with tests running at the same time, and the backfill reads their
    // objects too: the assertions are about this test's customers.
    let ours: BTreeSet<String> = account.customers.iter().cloned().collect();
    let changes = changes_of(&pipeline, &ours);
    assert!(changes > 0, "the first backfill announced our customers");
    let tables = projections_of(&pipeline, &ours).await;

    // Act again: nothing changed on the server.
    let second = backfill(&pipeline, &stripe, &state);
    pipeline.appended = log_size(&pipeline.events_topic);
    pipeline.settle().await;

    // Assert: no change message, no projection row changed.
    assert!(
        second["records_appended"].as_u64().unwrap() >= 14,
        "{second}"
    );
    assert_eq!(
        changes_of(&pipeline, &ours),
        changes,
        "a second backfill publishes no change message"
    );
    assert_same_projections(
        "second backfill",
        &projections_of(&pipeline, &ours).await,
        &tables,
    );
}

/// localstripe delivers every event to every registered webhook; this one stops when the
/// test ends (it cannot be removed, only silenced).
struct Webhook<'a> {
    stripe: &'a LocalStripe,
    id: String,
}

impl<'a> Webhook<'a> {
    async fn register(stripe: &'a LocalStripe, pipeline: &Pipeline) -> Webhook<'a> {
        let id = unique("wh");
        stripe
            .register_webhook(&id, &pipeline.ingest_url(), SECRET)
            .await;
        Webhook { stripe, id }
    }

    async fn silence(self) {
        self.stripe.silence_webhook(&self.id).await;
    }
}

fn spawn_backfill(pipeline: &Pipeline, stripe: &LocalStripe, state_dir: &str) -> Child {
    // The same environment as `Pipeline::ingest_command`, in the background; the binary sits
    // beside the projector's.
    let ingest = std::path::PathBuf::from(env!("CARGO_BIN_EXE_projector")).with_file_name("ingest");
    Command::new(ingest)
        .args([
            "backfill",
            "--json",
            "--rate",
            "40",
            "--state-dir",
            state_dir,
        ])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KAFKA_BROKERS", brokers())
        .env("STRIPE_EVENTS_TOPIC", &pipeline.events_topic)
        .env("STRIPE_EVENTS_PARTITIONS", "3")
        .env("STRIPE_API_KEY", API_KEY)
        .env("STRIPE_API_BASE", &stripe.base)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn backfill_while_webhooks_flow_ends_in_the_servers_state() {
    // Arrange: webhooks from the server reach ingest from now on; some history exists.
    let stripe = LocalStripe::connect().await;
    let pipeline = Pipeline::in_process(Options::default()).await;
    let webhook = Webhook::register(&stripe, &pipeline).await;
    let account = build_history(&stripe).await;
    let mut customers = account.customers.clone();
    let mut live = Vec::new();
    for _ in 0..3 {
        let customer = stripe.customer("pm_card_visa").await;
        live.push(stripe.subscribe(&customer, PRO_PLAN, None).await);
        customers.push(customer);
    }

    // Act: the backfill runs while subscriptions change and their webhooks arrive.
    let state = state_dir();
    let backfill = spawn_backfill(&pipeline, &stripe, &state);
    for sub in &live[..2] {
        stripe.cancel(sub["id"].as_str().unwrap()).await;
    }
    let late = stripe.customer("pm_card_visa").await;
    stripe.subscribe(&late, TEAM_PLAN, None).await;
    stripe
        .subscribe(live[2]["customer"].as_str().unwrap(), TEAM_PLAN, None)
        .await;
    customers.push(late);
    let output = backfill.wait_with_output().unwrap();
    assert!(output.status.success());

    // Assert: the end state is the server's, whatever interleaving happened.
    assert_converges(&pipeline, &stripe, &customers, Duration::from_secs(60)).await;
    webhook.silence().await;
}

#[tokio::test]
async fn reconcile_after_an_outage_converges_the_projection() {
    // Arrange: webhooks reach ingest, and a customer is known.
    let stripe = LocalStripe::connect().await;
    let mut pipeline = Pipeline::in_process(Options::default()).await;
    let webhook = Webhook::register(&stripe, &pipeline).await;
    let before = stripe.customer("pm_card_visa").await;
    let sub = stripe.subscribe(&before, PRO_PLAN, None).await;
    assert_converges(
        &pipeline,
        &stripe,
        std::slice::from_ref(&before),
        Duration::from_secs(30),
    )
    .await;

    // Act: ingest is down while things change (the server's deliveries fail) ...
    pipeline.ingest.kill();
    stripe.cancel(sub["id"].as_str().unwrap()).await;
    let during = stripe.customer("pm_card_visa").await;
    stripe.subscribe(&during, TEAM_PLAN, None).await;
    let customers = vec![before.clone(), during.clone()];
    // ... the server gave up on those deliveries by the time ingest is back:
    let diffs = differences(&pipeline, &stripe, &customers).await;
    assert!(!diffs.is_empty(), "the outage lost nothing? {diffs:?}");
    pipeline.restart_ingest();
    webhook.silence().await;
    let webhook = Webhook::register(&stripe, &pipeline).await;
    let env = api_env(&stripe);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let output = pipeline.ingest_command(&["reconcile", "--since", "1h", "--json"], &env);
    assert!(
        output.status.success(),
        "reconcile failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(summary["records_appended"].as_u64().unwrap() > 0);

    // Assert
    assert_converges(&pipeline, &stripe, &customers, Duration::from_secs(60)).await;
    webhook.silence().await;
}
