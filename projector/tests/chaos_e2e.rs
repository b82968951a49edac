//! The chaos harness (`scripts/chaos`): a Stripe-like sender delivers a scripted population of
//! lifecycle events, with redeliveries and out-of-order arrival, retrying every non-2xx with
//! backoff; meanwhile the broker, two `projector run` instances, ingest and Postgres are each
//! SIGKILLed and restarted at random moments. The population includes poison: events Postgres
//! refuses (a CHECK constraint made on purpose, in the oracle's database too) and events carrying
//! a NUL, which the projector must escape and project. At the end every acknowledged event must be
//! in the log, the projections must equal an oracle, the folded change topic must equal the read
//! API, the DLQ must hold exactly the refused events' records and the NUL events are projected.
//!
//! It kills the broker and Postgres, so it runs only against a stack instance of its own:
//! `#[ignore]`d, run by `scripts/chaos`, which starts that instance and sets `CHAOS_STACK_DIR`.
//! The comparisons are pure functions, each shown able to fail by the unit tests at the end,
//! which run in every `cargo test`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use rdkafka::message::Message;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};

use common::events::*;
use common::workload::Story;
use common::*;

const IN_FLIGHT: usize = 16;
/// Stripe's retry schedule is hours long; here the first retry comes after 100 ms and the gap
/// doubles up to 2 s, so an outage of a few seconds costs a few retries.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// An event still without a 2xx after this long counts as lost.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(600);
const SETTLE_DEADLINE: Duration = Duration::from_secs(300);

/// The constraint made on purpose in both databases: Postgres refuses a customer with this email,
/// deterministically, wherever and however often the record is applied.
const REFUSED_EMAIL: &str = "refused@example.com";
const REFUSE_EMAIL: &str = "ALTER TABLE customers ADD CONSTRAINT chaos_refused_email
     CHECK (email IS DISTINCT FROM 'refused@example.com')";
/// The metadata of a NUL-carrying event, and what the projection stores for it.
const NUL_NOTE: &str = "before\u{0}after";
const NUL_NOTE_STORED: &str = "before\u{fffd}after";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Broker,
    ProjectorA,
    ProjectorB,
    Ingest,
    Postgres,
}

const FAULTS: [Fault; 5] = [
    Fault::Broker,
    Fault::ProjectorA,
    Fault::ProjectorB,
    Fault::Ingest,
    Fault::Postgres,
];

struct Settings {
    seed: u64,
    customers: usize,
    rounds: usize,
    stack_dir: PathBuf,
}

impl Settings {
    fn from_env() -> Settings {
        let number = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .map(|v| v.parse::<u64>().unwrap_or_else(|_| panic!("{name}={v}")))
                .unwrap_or(default)
        };
        Settings {
            seed: number("CHAOS_SEED", fastrand::u64(..)),
            customers: number("CHAOS_CUSTOMERS", 30) as usize,
            rounds: number("CHAOS_ROUNDS", 1) as usize,
            stack_dir: PathBuf::from(
                std::env::var("CHAOS_STACK_DIR").expect("CHAOS_STACK_DIR: run scripts/chaos"),
            ),
        }
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

struct Workload {
    /// Webhook bodies in sending order, redeliveries included.
    bodies: Vec<String>,
    /// Distinct events among them.
    events: usize,
    customers: Vec<String>,
    /// Ids of the events Postgres refuses: every record of them must be a dead letter.
    refused: BTreeSet<String>,
    /// Customers whose newest event carries a NUL in its metadata.
    nul: BTreeSet<String>,
}

/// Per customer: a customer, a Checkout with `client_reference_id`, a subscription moving
/// through statuses and items, invoices paid and failed, and for some a cancellation, a second
/// subscription, or a deleted customer. Every tenth customer's newest event is refused by
/// Postgres, and another tenth's carries a NUL; each is the customer's newest snapshot, so that it
/// is applied (and refused) whatever order the records arrive in. Every ninth event is
/// redelivered; the arrival order is shuffled with the run's seed.
fn workload(customers: usize, rng: &mut fastrand::Rng) -> Workload {
    let mut events: Vec<Event> = Vec::new();
    let mut ids = Vec::new();
    let mut refused = BTreeSet::new();
    let mut nul = BTreeSet::new();
    for i in 0..customers {
        let story = Story::new("chaos", i);
        let (c, t) = (&story.customer, story.t);
        ids.push(c.clone());
        let mut mine = story.checkout_to_past_due(6);
        match i % 3 {
            0 => mine.extend(story.upgraded_and_paid()),
            1 => mine.extend(story.unpaid_then_canceled()),
            _ => mine.push(story.cancel_at_period_end(&[TEAM])),
        }
        if i % 4 == 0 {
            mine.push(story.second_subscription_trialing());
        }
        if i % 17 == 0 {
            mine.push(("customer.deleted", t + 500, deleted_customer(c, false)));
        }
        let poison = if i % 10 == 3 && i % 17 != 0 {
            mine.push((
                "customer.updated",
                t + 1_000,
                with(customer(c, false), "email", json!(REFUSED_EMAIL)),
            ));
            Some(mine.len() - 1)
        } else {
            if i % 10 == 7 && i % 17 != 0 {
                mine.push((
                    "customer.updated",
                    t + 1_000,
                    with(customer(c, false), "metadata", json!({ "note": NUL_NOTE })),
                ));
                nul.insert(c.clone());
            }
            None
        };
        if let Some(n) = poison {
            refused.insert(story.event_id(n));
        }
        events.extend(story.events(mine));
    }
    let mut bodies: Vec<String> = events.iter().map(Event::body).collect();
    let redeliveries: Vec<String> = bodies.iter().step_by(9).cloned().collect();
    bodies.extend(redeliveries);
    rng.shuffle(&mut bodies);
    Workload {
        bodies,
        events: events.len(),
        customers: ids,
        refused,
        nul,
    }
}

/// What the sender saw.
#[derive(Default)]
struct Delivery {
    /// Event ids that got a 2xx.
    acknowledged: BTreeSet<String>,
    /// Bodies never acknowledged within `DELIVERY_DEADLINE`.
    undelivered: usize,
    retries: u64,
}

/// Delivers like Stripe: signed with the time of each attempt, `IN_FLIGHT` at a time, every
/// non-2xx and every connection error retried with a doubling backoff. Chunk `k` starts once
/// `k` faults have begun, so deliveries and faults interleave however long either takes.
async fn deliver(
    bodies: Vec<String>,
    ingest_url: Arc<RwLock<String>>,
    faults_begun: Arc<AtomicUsize>,
    chunks: usize,
) -> Delivery {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTP client");
    let retries = Arc::new(AtomicU64::new(0));
    let mut delivery = Delivery::default();
    let chunk_len = bodies.len().div_ceil(chunks).max(1);
    for (k, chunk) in bodies.chunks(chunk_len).enumerate() {
        while faults_begun.load(Ordering::SeqCst) < k {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Owned clones: a future borrowing the chunk is not `Send` for every lifetime, which
        // `tokio::spawn` needs.
        let outcomes: Vec<Option<String>> = stream::iter(chunk.to_vec())
            .map(|body| {
                let (client, url, retries) = (client.clone(), ingest_url.clone(), retries.clone());
                async move { deliver_one(&client, &url, &body, &retries).await }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        for outcome in outcomes {
            match outcome {
                Some(id) => {
                    delivery.acknowledged.insert(id);
                }
                None => delivery.undelivered += 1,
            }
        }
    }
    delivery.retries = retries.load(Ordering::SeqCst);
    delivery
}

/// The event id once ingest answered 2xx; `None` past the deadline.
async fn deliver_one(
    client: &reqwest::Client,
    ingest_url: &RwLock<String>,
    body: &str,
    retries: &AtomicU64,
) -> Option<String> {
    let id = serde_json::from_str::<Value>(body).expect("a JSON body")["id"]
        .as_str()
        .expect("an event id")
        .to_owned();
    let deadline = Instant::now() + DELIVERY_DEADLINE;
    let mut backoff = BACKOFF_FIRST;
    loop {
        let url = ingest_url.read().expect("url lock").clone();
        let header = signature_header(SECRET, now(), body.as_bytes());
        let answer = client
            .post(&url)
            .header("Stripe-Signature", header)
            .body(body.to_owned())
            .send()
            .await;
        if let Ok(response) = answer {
            if response.status().is_success() {
                return Some(id);
            }
        }
        if Instant::now() + backoff > deadline {
            return None;
        }
        retries.fetch_add(1, Ordering::Relaxed);
        let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The services under fault, and the stack instance whose broker and Postgres get killed.
struct Chaos {
    pipeline: Pipeline,
    /// The second `projector run` instance (the pipeline's own is the first).
    second: Service,
    ingest_url: Arc<RwLock<String>>,
    stack_dir: PathBuf,
    /// Service processes found dead at a check (not killed by the harness), by name.
    died: BTreeMap<&'static str, u32>,
}

impl Chaos {
    fn pid_in(&self, file: &str) -> u32 {
        let text = std::fs::read_to_string(self.stack_dir.join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid in {file}"))
    }

    fn sigkill(pid: u32) {
        let status = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -KILL {pid}");
        let gone = Instant::now() + Duration::from_secs(30);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            // A zombie has no cmdline; it is gone for our purposes once its parent reaps it.
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if state.contains(") Z ") {
                break;
            }
            assert!(Instant::now() < gone, "pid {pid} still alive after SIGKILL");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `scripts/stack <command>` on the chaos instance, retried until it succeeds: right after
    /// a SIGKILL, Postgres may refuse to start while orphaned backends still hold its memory.
    fn stack(&self, command: &str) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let output = Command::new(repo_root().join("scripts/stack"))
                .arg(command)
                .env("STACK_DIR", &self.stack_dir)
                .output()
                .expect("scripts/stack");
            if output.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "scripts/stack {command} kept failing: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn kill(&mut self, fault: Fault) {
        match fault {
            Fault::Broker => Self::sigkill(self.pid_in("kafka.pid")),
            Fault::Postgres => Self::sigkill(self.pid_in("postgres/postmaster.pid")),
            Fault::ProjectorA => self
                .pipeline
                .projector
                .as_mut()
                .expect("projector A")
                .kill(),
            Fault::ProjectorB => self.second.kill(),
            Fault::Ingest => self.pipeline.ingest.kill(),
        }
    }

    fn restart(&mut self, fault: Fault) {
        match fault {
            Fault::Broker => self.stack("kafka-start"),
            Fault::Postgres => self.stack("up"),
            Fault::ProjectorA => {
                self.pipeline.projector = None;
                self.pipeline.start_projector();
            }
            Fault::ProjectorB => self.second = self.pipeline.spawn_projector(),
            Fault::Ingest => {
                self.pipeline.restart_ingest();
                *self.ingest_url.write().expect("url lock") = self.pipeline.ingest_url();
            }
        }
    }

    /// Restarts any service that exited by itself (e.g. on losing Postgres), and counts it.
    fn revive(&mut self) {
        let exited = |service: &mut Service| service.child.try_wait().ok().flatten().is_some();
        if exited(self.pipeline.projector.as_mut().expect("projector A")) {
            *self.died.entry("projector A").or_default() += 1;
            self.restart(Fault::ProjectorA);
        }
        if exited(&mut self.second) {
            *self.died.entry("projector B").or_default() += 1;
            self.restart(Fault::ProjectorB);
        }
        if exited(&mut self.pipeline.ingest) {
            *self.died.entry("ingest").or_default() += 1;
            self.restart(Fault::Ingest);
        }
    }
}

async fn projections_at(database_url: &str) -> BTreeMap<&'static str, Vec<Value>> {
    let mut db = PgConnection::connect(database_url).await.expect("connect");
    let mut tables = BTreeMap::new();
    for (table, sql) in PROJECTIONS {
        let wrapped = format!("SELECT to_jsonb(t)::text FROM ({sql}) t");
        let rows: Vec<String> = sqlx::query_scalar(&wrapped)
            .fetch_all(&mut db)
            .await
            .expect("projection rows");
        tables.insert(
            *table,
            rows.iter()
                .map(|r| serde_json::from_str(r).expect("JSON row"))
                .collect(),
        );
    }
    tables
}

/// Mismatches, each described; the harness prints them and fails if there is one.
#[derive(Default)]
struct Mismatches(Vec<String>);

impl Mismatches {
    fn add(&mut self, what: String) {
        self.0.push(what);
    }
}

/// Rows of each projection that differ between the chaos run and the oracle.
fn compare_projections(
    chaos: &BTreeMap<&'static str, Vec<Value>>,
    oracle: &BTreeMap<&'static str, Vec<Value>>,
    mismatches: &mut Mismatches,
) {
    for (table, _) in PROJECTIONS {
        let (a, b) = (&chaos[table], &oracle[table]);
        if a.len() != b.len() {
            mismatches.add(format!(
                "{table}: {} rows, the oracle {} rows",
                a.len(),
                b.len()
            ));
        }
        for (row, (a, b)) in a.iter().zip(b).enumerate() {
            if a != b {
                mismatches.add(format!("{table} row {row}: {a} vs the oracle's {b}"));
            }
        }
    }
}

/// The last change message per key, checking the versions have no gaps and the last message
/// in log order is the newest (what compaction keeps).
fn fold_changes(
    changes: &[(Option<String>, Value)],
    mismatches: &mut Mismatches,
) -> BTreeMap<String, Value> {
    let mut versions: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    let mut last: BTreeMap<String, Value> = BTreeMap::new();
    for (key, message) in changes {
        let Some(key) = key.clone() else {
            mismatches.add(format!("an unkeyed change message: {message}"));
            continue;
        };
        versions
            .entry(key.clone())
            .or_default()
            .insert(message["version"].as_i64().unwrap_or(-1));
        last.insert(key, message.clone());
    }
    for (key, seen) in &versions {
        let newest = *seen.iter().next_back().expect("one version at least");
        if seen.iter().copied().ne(1..=newest) {
            mismatches.add(format!("{key}: change versions {seen:?} have gaps"));
        }
        if last[key]["version"] != newest {
            mismatches.add(format!("{key}: the last change is not version {newest}"));
        }
    }
    last
}

/// Every event that got a 2xx is in the log.
fn check_acknowledged_logged(
    acknowledged: &BTreeSet<String>,
    logged: &BTreeSet<String>,
    mismatches: &mut Mismatches,
) {
    for id in acknowledged.difference(logged) {
        mismatches.add(format!("{id} got a 2xx but is not in the log"));
    }
}

/// What the read API answered for a customer.
struct ApiView {
    status: u16,
    body: Value,
}

/// The folded change topic equals the read API for every customer.
fn compare_changes_with_api(
    customers: &[String],
    folded: &BTreeMap<String, Value>,
    views: &BTreeMap<String, ApiView>,
    mismatches: &mut Mismatches,
) {
    for customer in customers {
        let Some(mut message) = folded.get(customer).cloned() else {
            mismatches.add(format!("{customer}: no change message"));
            continue;
        };
        let Some(view) = views.get(customer) else {
            mismatches.add(format!("{customer}: not asked of the API"));
            continue;
        };
        if view.status != 200 {
            mismatches.add(format!("{customer}: the API answered {}", view.status));
            continue;
        }
        let mut body = view.body.clone();
        // `updated_at` follows every event (an invoice moves it) without a new version.
        if let Some(message) = message.as_object_mut() {
            for field in ["type", "added", "removed", "cause", "updated_at"] {
                message.remove(field);
            }
        }
        if let Some(body) = body.as_object_mut() {
            body.remove("updated_at");
        }
        if message != body {
            mismatches.add(format!("{customer}: folded change {message} vs API {body}"));
        }
    }
}

/// A record's place in the raw log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Position {
    partition: i32,
    offset: i64,
}

/// `dlq-source` of a projector dead letter: `<topic>/<partition>/<offset>`.
fn dlq_source_position(source: &str) -> Option<Position> {
    let mut parts = source.rsplitn(3, '/');
    let offset = parts.next()?.parse().ok()?;
    let partition = parts.next()?.parse().ok()?;
    parts.next()?;
    Some(Position { partition, offset })
}

/// A row of `dead_letters`.
struct DeadLetterRow {
    position: Position,
    reason: String,
}

/// The DLQ topic and the `dead_letters` table hold exactly the records of the refused events,
/// no more and no fewer. The topic may hold a record twice (the relay publishes at least once),
/// so positions are compared as sets; a record without a readable `dlq-source` is not the
/// projector's and counts as one too many.
fn compare_dead_letters(
    expected: &BTreeSet<Position>,
    dlq_sources: &[Option<String>],
    table: &[DeadLetterRow],
    mismatches: &mut Mismatches,
) {
    let mut in_topic = BTreeSet::new();
    for source in dlq_sources {
        match source.as_deref().and_then(dlq_source_position) {
            Some(position) => {
                in_topic.insert(position);
            }
            None => mismatches.add(format!("a DLQ record with dlq-source {source:?}")),
        }
    }
    let in_table: BTreeSet<Position> = table.iter().map(|row| row.position).collect();
    for (place, held) in [("the DLQ topic", &in_topic), ("dead_letters", &in_table)] {
        for missing in expected.difference(held) {
            mismatches.add(format!("{place} lacks the refused record at {missing:?}"));
        }
        for extra in held.difference(expected) {
            mismatches.add(format!(
                "{place} holds {extra:?}, which is no refused record"
            ));
        }
    }
    for row in table {
        if row.reason != "database_rejected" {
            mismatches.add(format!(
                "dead letter at {:?} has reason {}",
                row.position, row.reason
            ));
        }
    }
}

/// Each NUL-carrying customer is projected, the NUL escaped in the stored snapshot.
fn check_nul_projected(
    nul: &BTreeSet<String>,
    stored_notes: &BTreeMap<String, String>,
    mismatches: &mut Mismatches,
) {
    for customer in nul {
        match stored_notes.get(customer) {
            Some(note) if note == NUL_NOTE_STORED => {}
            Some(note) => mismatches.add(format!("{customer}: metadata note {note:?} stored")),
            None => mismatches.add(format!("{customer}: the NUL event is not projected")),
        }
    }
}

/// Runs a `projector` subcommand with `env` to completion; panics if it fails.
fn projector_command(env: &[(String, String)], args: &[&str]) {
    let mut command = testkit::process::command(&binary("projector"), args, env.iter().cloned());
    let output = command.output().expect("run projector");
    testkit::process::succeeded(&format!("projector {args:?}"), &output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "kills the broker and Postgres: run by scripts/chaos on its own stack instance"]
async fn chaos() {
    let settings = Settings::from_env();
    let started = Instant::now();
    eprintln!(
        "chaos: seed {} ({} customers, {} faults of each kind)",
        settings.seed, settings.customers, settings.rounds
    );
    let mut rng = fastrand::Rng::with_seed(settings.seed);
    let workload = workload(settings.customers, &mut rng);
    let mut plan: Vec<Fault> = Vec::new();
    for _ in 0..settings.rounds {
        let mut round = FAULTS.to_vec();
        rng.shuffle(&mut round);
        plan.extend(round);
    }

    let pipeline = Pipeline::start(Options::default()).await;
    // Projector A has migrated the database; the constraint comes before any event does.
    sqlx::query(REFUSE_EMAIL)
        .execute(&mut pipeline.db().await)
        .await
        .expect("the refusing constraint");
    let second = pipeline.spawn_projector();
    let ingest_url = Arc::new(RwLock::new(pipeline.ingest_url()));
    let mut chaos = Chaos {
        pipeline,
        second,
        ingest_url: ingest_url.clone(),
        stack_dir: settings.stack_dir.clone(),
        died: BTreeMap::new(),
    };
    let faults_begun = Arc::new(AtomicUsize::new(0));
    let sender = tokio::spawn(deliver(
        workload.bodies.clone(),
        ingest_url,
        faults_begun.clone(),
        plan.len() + 1,
    ));

    // Faults, one at a time at random moments: a random wait, SIGKILL, a random time down,
    // restart (which waits for the service to be ready), then revive whatever died of it.
    let mut injected: BTreeMap<Fault, u32> = BTreeMap::new();
    let plan_len = plan.len();
    let fault_loop = tokio::task::spawn_blocking(move || {
        for fault in plan {
            std::thread::sleep(Duration::from_millis(rng.u64(200..2_000)));
            faults_begun.fetch_add(1, Ordering::SeqCst);
            chaos.kill(fault);
            eprintln!("chaos: SIGKILL {fault:?} at {:?}", started.elapsed());
            std::thread::sleep(Duration::from_millis(rng.u64(0..3_000)));
            chaos.restart(fault);
            chaos.revive();
            *injected.entry(fault).or_default() += 1;
        }
        (chaos, injected)
    });
    let (mut chaos, injected) = fault_loop.await.expect("fault loop");
    let delivery = sender.await.expect("sender");
    chaos.revive();
    eprintln!(
        "chaos: {plan_len} faults and {} deliveries done at {:?}",
        workload.bodies.len(),
        started.elapsed()
    );

    let mut mismatches = Mismatches::default();
    if delivery.undelivered > 0 {
        mismatches.add(format!(
            "{} deliveries never got a 2xx",
            delivery.undelivered
        ));
    }

    // Every acknowledged event is in the log.
    let pipeline = &chaos.pipeline;
    let log = read_topic_to_end(&pipeline.events_topic);
    let mut logged = BTreeSet::new();
    let mut refused_positions = BTreeSet::new();
    for record in &log {
        let Some(id) = record
            .payload()
            .and_then(|p| serde_json::from_slice::<Value>(p).ok())
            .and_then(|body| body["id"].as_str().map(str::to_owned))
        else {
            continue;
        };
        if workload.refused.contains(&id) {
            refused_positions.insert(Position {
                partition: record.partition(),
                offset: record.offset(),
            });
        }
        logged.insert(id);
    }
    check_acknowledged_logged(&delivery.acknowledged, &logged, &mut mismatches);
    let records = log.len() as u64;
    settle_database(
        &pipeline.database_url,
        &pipeline.events_topic,
        records,
        SETTLE_DEADLINE,
    )
    .await;

    // The oracle: a projector that never saw a fault, on a fresh database and group, consuming
    // the same log. It sees exactly the records the chaos run saw (redeliveries, and appends
    // whose 2xx was lost with a killed ingest), which an in-process replay of the sent events
    // could not know. Its database refuses the same records.
    let oracle_db = unique("chaos_oracle").to_lowercase();
    let mut admin = PgConnection::connect(&admin_database_url())
        .await
        .expect("connect");
    sqlx::query(&format!("CREATE DATABASE {oracle_db}"))
        .execute(&mut admin)
        .await
        .expect("create the oracle database");
    let oracle_url = database_url_for(&admin_database_url(), &oracle_db);
    let mut oracle_env = pipeline.projector_env();
    for (name, value) in &mut oracle_env {
        match name.as_str() {
            "DATABASE_URL" => *value = oracle_url.clone(),
            "PROJECTOR_GROUP" => *value = format!("{oracle_db}-group"),
            "ENTITLEMENTS_TOPIC" => *value = format!("{oracle_db}.changes"),
            "DLQ_TOPIC" => *value = format!("{oracle_db}.dlq"),
            _ => {}
        }
    }
    projector_command(&oracle_env, &["migrate"]);
    sqlx::query(REFUSE_EMAIL)
        .execute(&mut PgConnection::connect(&oracle_url).await.expect("connect"))
        .await
        .expect("the refusing constraint in the oracle");
    let _oracle = Service::spawn(
        "oracle projector",
        binary("projector"),
        &["run"],
        &oracle_env,
        "projector listening",
    );
    settle_database(
        &oracle_url,
        &pipeline.events_topic,
        records,
        SETTLE_DEADLINE,
    )
    .await;
    let projected = projections_at(&pipeline.database_url).await;
    // Two empty projections would compare equal: every customer must be there.
    if projected["customers"].len() != workload.customers.len() {
        mismatches.add(format!(
            "{} customers projected of {}",
            projected["customers"].len(),
            workload.customers.len()
        ));
    }
    compare_projections(
        &without_version(projected),
        &without_version(projections_at(&oracle_url).await),
        &mut mismatches,
    );

    // The folded change topic equals the read API for every customer.
    let folded = fold_changes(&pipeline.changes(), &mut mismatches);
    let mut views = BTreeMap::new();
    for customer in &workload.customers {
        let (status, body) = pipeline
            .get(&format!("/v1/customers/{customer}/entitlements"))
            .await;
        views.insert(customer.clone(), ApiView { status, body });
    }
    compare_changes_with_api(&workload.customers, &folded, &views, &mut mismatches);

    // The DLQ holds exactly the refused events' records; the NUL events are projected.
    let dlq_sources: Vec<Option<String>> = read_topic_to_end(&pipeline.dlq_topic)
        .iter()
        .map(|m| {
            use rdkafka::message::Headers;
            m.headers()?
                .iter()
                .find(|h| h.key == shared::envelope::header::DLQ_SOURCE)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        })
        .collect();
    let mut db = pipeline.db().await;
    let table: Vec<DeadLetterRow> = sqlx::query_as::<_, (i32, i64, String)>(
        "SELECT partition, \"offset\", reason FROM dead_letters",
    )
    .fetch_all(&mut db)
    .await
    .expect("dead letters")
    .into_iter()
    .map(|(partition, offset, reason)| DeadLetterRow {
        position: Position { partition, offset },
        reason,
    })
    .collect();
    compare_dead_letters(&refused_positions, &dlq_sources, &table, &mut mismatches);
    let stored_notes: BTreeMap<String, String> = sqlx::query_as(
        "SELECT id, snapshot -> 'metadata' ->> 'note' FROM customers
         WHERE snapshot -> 'metadata' ? 'note'",
    )
    .fetch_all(&mut db)
    .await
    .expect("stored notes")
    .into_iter()
    .collect();
    check_nul_projected(&workload.nul, &stored_notes, &mut mismatches);

    for m in &mismatches.0 {
        eprintln!("chaos: MISMATCH {m}");
    }
    let kinds: Vec<String> = injected.iter().map(|(k, n)| format!("{k:?} {n}")).collect();
    eprintln!(
        "chaos: seed {} | events {} distinct ({} refused by Postgres, {} with a NUL), {} \
         deliveries | acknowledged {} | retries {} | log records {} | dead letters {} | faults: {} \
         | died on their own: {:?} | mismatches {} | {:?}",
        settings.seed,
        workload.events,
        workload.refused.len(),
        workload.nul.len(),
        workload.bodies.len(),
        delivery.acknowledged.len(),
        delivery.retries,
        records,
        refused_positions.len(),
        kinds.join(", "),
        chaos.died,
        mismatches.0.len(),
        started.elapsed()
    );
    assert_eq!(mismatches.0.len(), 0, "mismatches (seed {})", settings.seed);
}

/// Each check of the harness fed a right and a deliberately wrong state: a check that cannot
/// fail proves nothing. These run in every `cargo test` (the harness itself is ignored).
mod the_checks_can_fail {
    use super::*;

    fn ids(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_acknowledged_event_missing_from_the_log_is_a_mismatch() {
        let mut right = Mismatches::default();
        check_acknowledged_logged(
            &ids(&["evt_1", "evt_2"]),
            &ids(&["evt_1", "evt_2", "evt_3"]),
            &mut right,
        );
        assert!(right.0.is_empty(), "{:?}", right.0);

        let mut wrong = Mismatches::default();
        check_acknowledged_logged(&ids(&["evt_1", "evt_2"]), &ids(&["evt_1"]), &mut wrong);
        assert_eq!(wrong.0, ["evt_2 got a 2xx but is not in the log"]);
    }

    fn tables(customers: Vec<Value>) -> BTreeMap<&'static str, Vec<Value>> {
        PROJECTIONS
            .iter()
            .map(|(table, _)| {
                (
                    *table,
                    if *table == "customers" {
                        customers.clone()
                    } else {
                        Vec::new()
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_projection_row_that_differs_from_the_oracle_or_is_missing_is_a_mismatch() {
        let oracle = tables(vec![
            json!({"id": "cus_1", "email": "a@x"}),
            json!({"id": "cus_2"}),
        ]);
        let mut right = Mismatches::default();
        compare_projections(&oracle.clone(), &oracle, &mut right);
        assert!(right.0.is_empty(), "{:?}", right.0);

        let changed = tables(vec![
            json!({"id": "cus_1", "email": "b@x"}),
            json!({"id": "cus_2"}),
        ]);
        let mut wrong = Mismatches::default();
        compare_projections(&changed, &oracle, &mut wrong);
        assert_eq!(wrong.0.len(), 1, "{:?}", wrong.0);
        assert!(wrong.0[0].starts_with("customers row 0"), "{:?}", wrong.0);

        let missing = tables(vec![json!({"id": "cus_1", "email": "a@x"})]);
        let mut wrong = Mismatches::default();
        compare_projections(&missing, &oracle, &mut wrong);
        assert_eq!(wrong.0, ["customers: 1 rows, the oracle 2 rows"]);
    }

    fn change(version: i64, features: &[&str]) -> Value {
        json!({"type": "entitlements.changed", "customer": "cus_1", "version": version,
               "features": features, "added": [], "removed": [], "cause": {}, "updated_at": "t"})
    }

    #[test]
    fn change_versions_with_a_gap_or_an_older_last_message_are_mismatches() {
        let key = Some("cus_1".to_owned());
        let mut right = Mismatches::default();
        let folded = fold_changes(
            &[
                (key.clone(), change(1, &[])),
                (key.clone(), change(2, &["pro"])),
                (key.clone(), change(2, &["pro"])),
            ],
            &mut right,
        );
        assert!(right.0.is_empty(), "{:?}", right.0);
        assert_eq!(folded["cus_1"]["version"], 2);

        let mut gap = Mismatches::default();
        fold_changes(
            &[
                (key.clone(), change(1, &[])),
                (key.clone(), change(3, &["pro"])),
            ],
            &mut gap,
        );
        assert_eq!(gap.0, ["cus_1: change versions {1, 3} have gaps"]);

        let mut reordered = Mismatches::default();
        fold_changes(
            &[
                (key.clone(), change(2, &["pro"])),
                (key.clone(), change(1, &[])),
            ],
            &mut reordered,
        );
        assert_eq!(reordered.0, ["cus_1: the last change is not version 2"]);

        let mut unkeyed = Mismatches::default();
        fold_changes(&[(None, change(1, &[]))], &mut unkeyed);
        assert_eq!(unkeyed.0.len(), 1, "{:?}", unkeyed.0);
    }

    #[test]
    fn a_folded_change_that_differs_from_the_read_api_is_a_mismatch() {
        let customers = vec!["cus_1".to_owned()];
        let mut folded = BTreeMap::new();
        folded.insert("cus_1".to_owned(), change(2, &["pro"]));
        let view = |features: &[&str], status: u16| {
            let mut views = BTreeMap::new();
            views.insert(
                "cus_1".to_owned(),
                ApiView {
                    status,
                    body: json!({"customer": "cus_1", "version": 2, "features": features, "updated_at": "u"}),
                },
            );
            views
        };
        let mut right = Mismatches::default();
        compare_changes_with_api(&customers, &folded, &view(&["pro"], 200), &mut right);
        assert!(right.0.is_empty(), "{:?}", right.0);

        let mut wrong = Mismatches::default();
        compare_changes_with_api(
            &customers,
            &folded,
            &view(&["pro", "team"], 200),
            &mut wrong,
        );
        assert_eq!(wrong.0.len(), 1, "{:?}", wrong.0);
        assert!(
            wrong.0[0].starts_with("cus_1: folded change"),
            "{:?}",
            wrong.0
        );

        let mut failed = Mismatches::default();
        compare_changes_with_api(&customers, &folded, &view(&["pro"], 503), &mut failed);
        assert_eq!(failed.0, ["cus_1: the API answered 503"]);

        let mut silent = Mismatches::default();
        compare_changes_with_api(
            &customers,
            &BTreeMap::new(),
            &view(&["pro"], 200),
            &mut silent,
        );
        assert_eq!(silent.0, ["cus_1: no change message"]);
    }

    fn at(partition: i32, offset: i64) -> Position {
        Position { partition, offset }
    }

    fn row(partition: i32, offset: i64, reason: &str) -> DeadLetterRow {
        DeadLetterRow {
            position: at(partition, offset),
            reason: reason.to_owned(),
        }
    }

    fn source(partition: i32, offset: i64) -> Option<String> {
        Some(format!("e2e_1.events/{partition}/{offset}"))
    }

    #[test]
    fn a_dlq_with_one_record_more_or_fewer_than_the_refused_ones_is_a_mismatch() {
        let expected: BTreeSet<Position> = [at(0, 4), at(2, 7)].into();
        let table = [
            row(0, 4, "database_rejected"),
            row(2, 7, "database_rejected"),
        ];
        let mut right = Mismatches::default();
        // The relay publishes at least once: a record twice in the topic is no mismatch.
        compare_dead_letters(
            &expected,
            &[source(0, 4), source(2, 7), source(2, 7)],
            &table,
            &mut right,
        );
        assert!(right.0.is_empty(), "{:?}", right.0);

        let mut fewer = Mismatches::default();
        compare_dead_letters(&expected, &[source(0, 4)], &table, &mut fewer);
        assert_eq!(
            fewer.0,
            ["the DLQ topic lacks the refused record at Position { partition: 2, offset: 7 }"]
        );

        let mut more = Mismatches::default();
        let extra = [
            row(0, 4, "database_rejected"),
            row(2, 7, "database_rejected"),
            row(1, 0, "unexpected_shape"),
        ];
        compare_dead_letters(&expected, &[source(0, 4), source(2, 7)], &extra, &mut more);
        assert_eq!(more.0.len(), 2, "{:?}", more.0);
        assert!(
            more.0[0].starts_with("dead_letters holds Position { partition: 1, offset: 0 }"),
            "{:?}",
            more.0
        );
        assert!(
            more.0[1].contains("has reason unexpected_shape"),
            "{:?}",
            more.0
        );

        let mut foreign = Mismatches::default();
        compare_dead_letters(
            &expected,
            &[source(0, 4), source(2, 7), None],
            &table,
            &mut foreign,
        );
        assert_eq!(foreign.0, ["a DLQ record with dlq-source None"]);
    }

    #[test]
    fn a_nul_event_not_projected_or_stored_unescaped_is_a_mismatch() {
        let nul = ids(&["cus_7"]);
        let stored = |note: &str| BTreeMap::from([("cus_7".to_owned(), note.to_owned())]);
        let mut right = Mismatches::default();
        check_nul_projected(&nul, &stored(NUL_NOTE_STORED), &mut right);
        assert!(right.0.is_empty(), "{:?}", right.0);

        let mut missing = Mismatches::default();
        check_nul_projected(&nul, &BTreeMap::new(), &mut missing);
        assert_eq!(missing.0, ["cus_7: the NUL event is not projected"]);

        let mut unescaped = Mismatches::default();
        check_nul_projected(&nul, &stored("before"), &mut unescaped);
        assert_eq!(unescaped.0.len(), 1, "{:?}", unescaped.0);
    }

    #[test]
    fn the_workload_holds_refused_and_nul_events_and_they_are_each_customers_newest() {
        let workload = workload(30, &mut fastrand::Rng::with_seed(1));
        // Customers 3, 13 and 23.
        assert_eq!(workload.refused.len(), 3, "{:?}", workload.refused);
        // Customers 7 and 27; 17 is a deleted customer, left out of both.
        assert_eq!(workload.nul.len(), 2, "{:?}", workload.nul);
        for body in &workload.bodies {
            let event: Value = serde_json::from_str(body).unwrap();
            let id = event["id"].as_str().unwrap();
            if workload.refused.contains(id) {
                assert_eq!(event["data"]["object"]["email"], REFUSED_EMAIL);
            }
            let is_nul = event["data"]["object"]["metadata"]["note"] == NUL_NOTE;
            let customer = event["data"]["object"]["id"].as_str().unwrap_or_default();
            assert!(!is_nul || workload.nul.contains(customer), "{body}");
        }
        assert!(workload
            .bodies
            .iter()
            .any(|b| b.contains(r"before\u0000after")));
    }
}
