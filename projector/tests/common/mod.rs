//! End-to-end support: the real `ingest` and `projector` binaries against the local Kafka and
//! Postgres (`scripts/stack up`), each test with its own topics, consumer group and database.
// Each test binary uses a part of it.
#![allow(dead_code, unused_imports)]

pub mod app;
pub mod events;
pub mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rdkafka::message::Message;
use serde_json::Value;
use sqlx::{Connection, PgConnection};

pub use testkit::kafka::header;
pub use testkit::projections::{
    assert_same_projections, without_version, Snapshot, BOOKKEEPING, PROJECTIONS,
};
pub use testkit::{
    admin_database_url, brokers, database_url_for, kafka_settings, now, read_topic,
    read_topic_to_end, signature_header, unique, Service, TestDatabase,
};

pub const SECRET: &str = "whsec_projector_e2e";
pub const TOKEN: &str = "e2e-token-0123456789abcdef";

/// The mapping the scenarios use (SPEC §7's example).
pub const ENTITLEMENTS: &str = testkit::spec_entitlements!();

/// POSTs to ingest with the pipeline's secret, asserting 200 (the event is durable).
pub async fn post_signed(client: &reqwest::Client, url: &str, body: &str) {
    testkit::signing::post_signed_ok(client, url, SECRET, body).await;
}

pub fn binary(name: &str) -> PathBuf {
    // Both binaries live in the same target directory; `cargo test --workspace` builds them.
    let projector = PathBuf::from(env!("CARGO_BIN_EXE_projector"));
    let path = projector.with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first",
        path.display()
    );
    path
}

#[derive(Clone)]
pub struct Options {
    pub entitlements: String,
    pub extra_env: Vec<(String, String)>,
    pub endpoints: Endpoints,
}

/// Where the services find Kafka and Postgres: the plaintext endpoints, or the secured ones
/// `scripts/stack` also serves (SPEC §12).
#[derive(Clone, Debug)]
pub struct Endpoints {
    /// `KAFKA_BROKERS` and, when secured, `KAFKA_CLIENT_PROPERTIES` for both services.
    pub kafka_env: Vec<(String, String)>,
    /// A database URL on the server where test databases are created (its query is kept).
    pub admin_database_url: String,
}

impl Default for Endpoints {
    fn default() -> Self {
        Endpoints {
            kafka_env: vec![("KAFKA_BROKERS".to_owned(), brokers())],
            admin_database_url: admin_database_url(),
        }
    }
}

impl Endpoints {
    /// `KAFKA_SECURE_BROKERS` with `KAFKA_SECURE_CLIENT_PROPERTIES` and `DATABASE_URL_TLS`,
    /// from `scripts/stack up` (scripts/test exports them).
    pub fn secured() -> Self {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is unset: run under scripts/test or eval \"$(scripts/stack env)\"")
            })
        };
        Endpoints {
            kafka_env: vec![
                ("KAFKA_BROKERS".to_owned(), var("KAFKA_SECURE_BROKERS")),
                (
                    "KAFKA_CLIENT_PROPERTIES".to_owned(),
                    var("KAFKA_SECURE_CLIENT_PROPERTIES"),
                ),
            ],
            admin_database_url: var("DATABASE_URL_TLS"),
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            entitlements: ENTITLEMENTS.to_owned(),
            extra_env: Vec::new(),
            endpoints: Endpoints::default(),
        }
    }
}

impl Options {
    pub fn past_due_revoke() -> Self {
        Options {
            entitlements: ENTITLEMENTS.replace(r#"past_due = "grant""#, r#"past_due = "revoke""#),
            ..Default::default()
        }
    }
}

pub use app::TestApp;
use events::Event;

/// Ingest + projector with their own topics, group and database (dropped with the pipeline).
/// The projector is the `projector run` binary ([`Pipeline::start`]) or the same application
/// inside the test process ([`Pipeline::in_process`]).
pub struct Pipeline {
    pub ingest: Service,
    pub projector: Option<Service>,
    /// The in-process projector of [`Pipeline::in_process`].
    pub app: Option<TestApp>,
    pub events_topic: String,
    pub changes_topic: String,
    pub dlq_topic: String,
    pub group: String,
    pub database_url: String,
    pub entitlements_path: PathBuf,
    pub options: Options,
    pub client: reqwest::Client,
    /// Records the log holds (every 200 from ingest).
    pub appended: u64,
    /// Declared after the services: they are killed before their database is dropped.
    pub database: TestDatabase,
}

impl Pipeline {
    /// With the `projector run` binary: for tests of the process (crash, signals, CLI, chaos).
    pub async fn start(options: Options) -> Pipeline {
        let mut pipeline = Pipeline::without_projector(options).await;
        pipeline.start_projector();
        pipeline
    }

    /// With the projector's [`TestApp`] in this process: for tests of what it serves and
    /// projects, where a real process is not the point.
    pub async fn in_process(options: Options) -> Pipeline {
        let mut pipeline = Pipeline::without_projector(options).await;
        pipeline.app = Some(TestApp::start(&pipeline.projector_env()));
        pipeline
    }

    async fn without_projector(options: Options) -> Pipeline {
        let name = unique("e2e");
        let database = TestDatabase::create(&options.endpoints.admin_database_url).await;
        let entitlements_path = std::env::temp_dir().join(format!("{name}.toml"));
        std::fs::write(&entitlements_path, &options.entitlements).unwrap();
        let events_topic = format!("{name}.events");
        let changes_topic = format!("{name}.changes");
        let dlq_topic = format!("{name}.dlq");
        let ingest = spawn_ingest(&options.endpoints.kafka_env, &events_topic, &dlq_topic);
        Pipeline {
            ingest,
            projector: None,
            app: None,
            events_topic,
            changes_topic,
            dlq_topic,
            group: format!("{name}-projector"),
            database_url: database.url.clone(),
            entitlements_path,
            options,
            client: reqwest::Client::new(),
            appended: 0,
            database,
        }
    }

    /// Starts ingest again on the same topics (after `ingest.kill()`, or to restart it); the
    /// new process listens on a new port.
    pub fn restart_ingest(&mut self) {
        self.ingest.kill();
        self.ingest = spawn_ingest(
            &self.options.endpoints.kafka_env,
            &self.events_topic,
            &self.dlq_topic,
        );
    }

    fn ingest_env(&self) -> Vec<(String, String)> {
        ingest_env(
            &self.options.endpoints.kafka_env,
            &self.events_topic,
            &self.dlq_topic,
        )
    }

    /// Runs an `ingest` subcommand (`backfill`, `reconcile`) to completion against this
    /// pipeline's log, with `extra_env` (the Stripe API settings).
    pub fn ingest_command(
        &self,
        args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> std::process::Output {
        let extra = extra_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()));
        testkit::process::command(
            &binary("ingest"),
            args,
            self.ingest_env().into_iter().chain(extra),
        )
        .output()
        .unwrap()
    }

    pub fn projector_env(&self) -> Vec<(String, String)> {
        let mut env = self.options.endpoints.kafka_env.clone();
        env.extend([
            ("DATABASE_URL".to_owned(), self.database_url.clone()),
            ("PROJECTOR_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
            ("STRIPE_EVENTS_TOPIC".to_owned(), self.events_topic.clone()),
            ("STRIPE_EVENTS_PARTITIONS".to_owned(), "3".to_owned()),
            ("ENTITLEMENTS_TOPIC".to_owned(), self.changes_topic.clone()),
            ("DLQ_TOPIC".to_owned(), self.dlq_topic.clone()),
            (
                "ENTITLEMENTS_CONFIG".to_owned(),
                self.entitlements_path.display().to_string(),
            ),
            ("API_TOKEN".to_owned(), TOKEN.to_owned()),
            ("PROJECTOR_GROUP".to_owned(), self.group.clone()),
        ]);
        env.extend(self.options.extra_env.iter().cloned());
        env
    }

    pub fn start_projector(&mut self) {
        assert!(
            self.projector.is_none() && self.app.is_none(),
            "projector already running"
        );
        self.projector = Some(self.spawn_projector());
    }

    /// One more `projector run` instance in the same group and database.
    pub fn spawn_projector(&self) -> Service {
        Service::spawn(
            "projector",
            binary("projector"),
            &["run"],
            &self.projector_env(),
            "projector listening",
        )
    }

    /// `projector <args>` with the pipeline's environment, to run or spawn.
    pub fn projector_cli(&self, args: &[&str]) -> Command {
        testkit::process::command(&binary("projector"), args, self.projector_env())
    }

    /// Runs a projector subcommand to completion (e.g. `redrive`).
    pub fn projector_command(&self, args: &[&str]) -> std::process::Output {
        self.projector_cli(args).output().unwrap()
    }

    /// Runs `projector redrive <args>`, then settles what it applied; asserts its exit status
    /// and that stdout reports `summary` (`redriven: 1 applied, 0 still failing`). Returns stdout.
    pub async fn redrive(&self, args: &[&str], exit: i32, summary: &str) -> String {
        let output = self.projector_command(&[&["redrive"], args].concat());
        self.settle().await;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(exit), "{stdout} / {stderr}");
        assert!(stdout.contains(summary), "{stdout} / {stderr}");
        stdout
    }

    pub fn ingest_url(&self) -> String {
        self.ingest.url("/webhooks/stripe")
    }

    pub fn api_url(&self, path: &str) -> String {
        match (&self.projector, &self.app) {
            (Some(service), _) => service.url(path),
            (None, Some(app)) => app.url(path),
            (None, None) => panic!("no projector running"),
        }
    }

    /// Signs and POSTs one event body; asserts 200.
    pub async fn send(&mut self, body: &str) {
        post_signed(&self.client, &self.ingest_url(), body).await;
        self.appended += 1;
    }

    pub async fn send_all<S: AsRef<str>>(&mut self, bodies: &[S]) {
        for body in bodies {
            self.send(body.as_ref()).await;
        }
    }

    /// Sends the bodies in order and waits until they are applied: [`send_all`](Self::send_all)
    /// then [`settle`](Self::settle).
    pub async fn apply<S: AsRef<str>>(&mut self, bodies: &[S]) {
        self.send_all(bodies).await;
        self.settle().await;
    }

    /// Signs and POSTs every body, `IN_FLIGHT` at a time, and counts them as appended.
    pub async fn send_concurrently(&mut self, bodies: &[String]) {
        self.appended += send_concurrently(&self.client, &self.ingest_url(), bodies).await;
    }

    pub async fn db(&self) -> PgConnection {
        PgConnection::connect(&self.database_url).await.unwrap()
    }

    /// Barrier: every appended record is applied (stored offsets cover the log) and every
    /// outbox row is published. Polls with a deadline; no sleeps as synchronisation.
    pub async fn settle(&self) {
        settle_database(
            &self.database_url,
            &self.events_topic,
            self.appended,
            Duration::from_secs(90),
        )
        .await;
    }

    /// GET an API path with the token; returns status and JSON body.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .client
            .get(self.api_url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("GET");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The projector's `/metrics` page.
    pub async fn metrics(&self) -> String {
        testkit::http::page(&self.client, &self.api_url("/metrics"), Some(TOKEN)).await
    }

    /// The customer's entitlement object (platform account unless `account`); panics unless 200.
    pub async fn entitlements(&self, customer: &str, account: Option<&str>) -> Value {
        let path = match account {
            Some(a) => format!("/v1/customers/{customer}/entitlements?account={a}"),
            None => format!("/v1/customers/{customer}/entitlements"),
        };
        let (status, body) = self.get(&path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// Every message of the change topic so far: after `settle`, that is every change.
    pub fn changes(&self) -> Vec<(Option<String>, Value)> {
        read_topic_to_end(&self.changes_topic)
            .into_iter()
            .map(|m| {
                let key = m.key().map(|k| String::from_utf8(k.to_vec()).unwrap());
                let value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
                (key, value)
            })
            .collect()
    }

    /// Every row of a query as JSON, for whole-state comparisons.
    pub async fn table(&self, sql: &str) -> Vec<Value> {
        testkit::projections::rows(&mut self.db().await, sql).await
    }

    /// Every projection table's rows as JSON.
    pub async fn projections(&self) -> Snapshot {
        testkit::projections::snapshot(&mut self.db().await, PROJECTIONS).await
    }

    /// The projections and the consumer's bookkeeping (links, applied ids, dead letters).
    pub async fn snapshot_with_bookkeeping(&self) -> Snapshot {
        let tables: Vec<(&'static str, &'static str)> =
            PROJECTIONS.iter().chain(BOOKKEEPING).copied().collect();
        testkit::projections::snapshot(&mut self.db().await, &tables).await
    }
}

fn spawn_ingest(kafka_env: &[(String, String)], events_topic: &str, dlq_topic: &str) -> Service {
    Service::spawn(
        "ingest",
        binary("ingest"),
        &[],
        &ingest_env(kafka_env, events_topic, dlq_topic),
        "ingest listening",
    )
}

/// The ingest environment of a pipeline: its Kafka endpoint (plain or secured) and topics.
fn ingest_env(
    kafka_env: &[(String, String)],
    events_topic: &str,
    dlq_topic: &str,
) -> Vec<(String, String)> {
    let mut env = kafka_env.to_vec();
    env.extend([
        ("STRIPE_WEBHOOK_SECRETS".to_owned(), SECRET.to_owned()),
        ("INGEST_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        ("STRIPE_EVENTS_TOPIC".to_owned(), events_topic.to_owned()),
        ("DLQ_TOPIC".to_owned(), dlq_topic.to_owned()),
        ("STRIPE_EVENTS_PARTITIONS".to_owned(), "3".to_owned()),
    ]);
    env
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.entitlements_path);
    }
}

/// A customer as the read API and the change topic address it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CustomerRef {
    pub account: Option<String>,
    pub customer: String,
}

impl CustomerRef {
    pub fn of(event: &Event) -> CustomerRef {
        let object = &event.object;
        let customer = if object["object"] == "customer" {
            &object["id"]
        } else {
            &object["customer"]
        };
        CustomerRef {
            account: event.account.clone(),
            customer: customer
                .as_str()
                .unwrap_or_else(|| panic!("event {} names no customer", event.id))
                .to_owned(),
        }
    }

    /// The change topic's key (SPEC §9).
    pub fn key(&self) -> String {
        match &self.account {
            Some(account) => format!("{account}/{}", self.customer),
            None => self.customer.clone(),
        }
    }

    pub fn path(&self) -> String {
        match &self.account {
            Some(account) => format!(
                "/v1/customers/{}/entitlements?account={account}",
                self.customer
            ),
            None => format!("/v1/customers/{}/entitlements", self.customer),
        }
    }
}

/// Checks a change topic as a consumer relies on it: per key, versions 1..=N all present, a
/// (key, version) only ever with one payload, and the last message in log order the newest
/// (what compaction keeps). Returns that last message per key.
pub fn last_change_per_key(changes: &[(Option<String>, Value)]) -> BTreeMap<String, Value> {
    let mut versions: BTreeMap<String, BTreeMap<i64, &Value>> = BTreeMap::new();
    let mut last: BTreeMap<String, Value> = BTreeMap::new();
    for (key, message) in changes {
        let key = key.clone().expect("change messages are keyed");
        assert_eq!(message["type"], "entitlements.changed", "{message}");
        let version = message["version"]
            .as_i64()
            .unwrap_or_else(|| panic!("a version in {message}"));
        let seen = versions.entry(key.clone()).or_default();
        if let Some(earlier) = seen.insert(version, message) {
            assert_eq!(
                earlier, message,
                "{key} version {version} was published twice with different payloads"
            );
        }
        last.insert(key, message.clone());
    }
    for (key, seen) in &versions {
        let newest = *seen.keys().next_back().expect("a version per key");
        let present: Vec<i64> = seen.keys().copied().collect();
        assert_eq!(
            present,
            (1..=newest).collect::<Vec<_>>(),
            "versions of {key} have gaps"
        );
        assert_eq!(
            last[key]["version"], newest,
            "the last message of {key} in the topic is not its newest version, so the \
             compacted topic would keep a stale state"
        );
    }
    last
}

/// Webhook requests in flight at once in the concurrent senders.
pub const IN_FLIGHT: usize = 32;

/// Signs and POSTs every body with `IN_FLIGHT` requests at a time; asserts each is a 200.
pub async fn send_concurrently(client: &reqwest::Client, url: &str, bodies: &[String]) -> u64 {
    futures_util::stream::iter(bodies)
        .for_each_concurrent(IN_FLIGHT, |body| post_signed(client, url, body))
        .await;
    bodies.len() as u64
}

pub async fn applied_records(db: &mut PgConnection, topic: &str) -> u64 {
    let applied: Option<i64> =
        sqlx::query_scalar("SELECT sum(next_offset)::int8 FROM consumer_offsets WHERE topic = $1")
            .bind(topic)
            .fetch_one(db)
            .await
            .unwrap();
    applied.unwrap_or(0) as u64
}

/// Polls until the stored offsets in `database_url` cover `records` records of `topic` and its
/// outbox is published. A database that does not answer (restarting, in the chaos test) is
/// polled again until `within` runs out.
pub async fn settle_database(database_url: &str, topic: &str, records: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(mut db) = PgConnection::connect(database_url).await {
            let applied: Option<i64> = sqlx::query_scalar(
                "SELECT sum(next_offset)::int8 FROM consumer_offsets WHERE topic = $1",
            )
            .bind(topic)
            .fetch_one(&mut db)
            .await
            .unwrap_or(None);
            let pending: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL AND parked_at IS NULL",
            )
            .fetch_one(&mut db)
            .await
            .unwrap_or(1);
            if applied.unwrap_or(0) as u64 >= records && pending == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not settled within {within:?}: applied {applied:?} of {records} records, {pending} outbox rows pending"
            );
        }
        assert!(
            Instant::now() < deadline,
            "Postgres unreachable while settling"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
