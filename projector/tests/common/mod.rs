//! End-to-end support: the real `ingest` and `projector` binaries against the local Kafka and
//! Postgres (`scripts/stack up`), each test with its own topics, consumer group and database.
#![allow(dead_code)]

pub mod events;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use sqlx::{Connection, PgConnection};

pub const SECRET: &str = "whsec_projector_e2e";
pub const TOKEN: &str = "e2e-token-0123456789abcdef";

/// The mapping the scenarios use (SPEC §7's example).
pub const ENTITLEMENTS: &str = r#"
[policy]
past_due = "grant"

[[grant]]
product = "prod_pro"
features = ["pro", "api"]

[[grant]]
price = "price_team_month"
features = ["team"]

[[grant]]
lookup_key = "enterprise"
features = ["sso", "audit"]
"#;

pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The settings the test's own Kafka clients use: the same variables as the services.
pub fn kafka_settings() -> shared::kafka::KafkaSettings {
    shared::kafka::KafkaSettings::from_env().expect("KAFKA_* settings")
}

pub fn admin_database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://stripe:stripe@127.0.0.1:5432/stripe_pipeline".into())
}

pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos % 1_000_000_000
    )
}

/// `t=<t>,v1=hex(HMAC-SHA256(secret, "<t>.<body>"))`, as Stripe signs.
pub fn signature_header(secret: &str, t: i64, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={t},v1={hex}")
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A running service binary; killed on drop.
pub struct Service {
    pub child: Child,
    pub port: u16,
    pub name: &'static str,
}

impl Service {
    pub fn spawn(
        name: &'static str,
        binary: PathBuf,
        args: &[&str],
        env: &[(String, String)],
        ready_marker: &str,
    ) -> Service {
        let mut command = Command::new(&binary);
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let marker = ready_marker.to_owned();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("TEST_LOG").is_some() {
                    eprintln!("[{name}] {line}");
                }
                if !sent && line.contains(&marker) {
                    if let Some(port) = line
                        .split("port=")
                        .nth(1)
                        .and_then(|p| p.split_whitespace().next())
                    {
                        let _ = tx.send(port.parse::<u16>().ok());
                        sent = true;
                    }
                }
            }
            if !sent {
                let _ = tx.send(None);
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(90))
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("{name} did not start (set TEST_LOG=1 to see its log)"));
        Service { child, port, name }
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop within 30 s of SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// `url` with its database replaced, keeping the options (`?sslmode=…&sslrootcert=…`).
pub fn database_url_for(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let server = &base[..base.rfind('/').expect("a database URL with a path")];
    match query {
        Some(query) => format!("{server}/{database}?{query}"),
        None => format!("{server}/{database}"),
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

/// Ingest + projector with their own topics, group and database.
pub struct Pipeline {
    pub ingest: Service,
    pub projector: Option<Service>,
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
}

impl Pipeline {
    pub async fn start(options: Options) -> Pipeline {
        let name = unique("e2e");
        let database = name.to_lowercase();
        let mut admin = PgConnection::connect(&options.endpoints.admin_database_url)
            .await
            .expect("connect to Postgres (scripts/stack up)");
        sqlx::query(&format!("CREATE DATABASE {database}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let database_url = database_url_for(&options.endpoints.admin_database_url, &database);
        let entitlements_path = std::env::temp_dir().join(format!("{name}.toml"));
        std::fs::write(&entitlements_path, &options.entitlements).unwrap();
        let events_topic = format!("{name}.events");
        let changes_topic = format!("{name}.changes");
        let dlq_topic = format!("{name}.dlq");
        let ingest = Service::spawn(
            "ingest",
            binary("ingest"),
            &[],
            &ingest_env(&options.endpoints.kafka_env, &events_topic, &dlq_topic),
            "ingest listening",
        );
        let mut pipeline = Pipeline {
            ingest,
            projector: None,
            events_topic,
            changes_topic,
            dlq_topic,
            group: format!("{name}-projector"),
            database_url,
            entitlements_path,
            options,
            client: reqwest::Client::new(),
            appended: 0,
        };
        pipeline.start_projector();
        pipeline
    }

    /// Starts ingest again on the same topics (after `ingest.kill()`, or to restart it); the
    /// new process listens on a new port.
    pub fn restart_ingest(&mut self) {
        self.ingest.kill();
        self.ingest = Service::spawn(
            "ingest",
            binary("ingest"),
            &[],
            &ingest_env(
                &self.options.endpoints.kafka_env,
                &self.events_topic,
                &self.dlq_topic,
            ),
            "ingest listening",
        );
    }

    /// Runs an `ingest` subcommand (`backfill`, `reconcile`) to completion against this
    /// pipeline's log, with `extra_env` (the Stripe API settings).
    pub fn ingest_command(
        &self,
        args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> std::process::Output {
        let mut command = Command::new(binary("ingest"));
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in ingest_env(
            &self.options.endpoints.kafka_env,
            &self.events_topic,
            &self.dlq_topic,
        ) {
            command.env(k, v);
        }
        for (k, v) in extra_env {
            command.env(k, v);
        }
        command.output().unwrap()
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
        assert!(self.projector.is_none(), "projector already running");
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

    /// Runs a projector subcommand to completion (e.g. `redrive`).
    pub fn projector_command(&self, args: &[&str]) -> std::process::Output {
        let mut command = Command::new(binary("projector"));
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in self.projector_env() {
            command.env(k, v);
        }
        command.output().unwrap()
    }

    pub fn ingest_url(&self) -> String {
        format!("http://127.0.0.1:{}/webhooks/stripe", self.ingest.port)
    }

    pub fn api_url(&self, path: &str) -> String {
        let port = self.projector.as_ref().expect("projector running").port;
        format!("http://127.0.0.1:{port}{path}")
    }

    /// Signs and POSTs one event body; asserts 200.
    pub async fn send(&mut self, body: &str) {
        let header = signature_header(SECRET, now(), body.as_bytes());
        let response = self
            .client
            .post(self.ingest_url())
            .header("Stripe-Signature", header)
            .body(body.to_owned())
            .send()
            .await
            .expect("POST to ingest");
        let status = response.status();
        assert_eq!(
            status,
            200,
            "ingest answered {status}: {}",
            response.text().await.unwrap_or_default()
        );
        self.appended += 1;
    }

    pub async fn send_all<S: AsRef<str>>(&mut self, bodies: &[S]) {
        for body in bodies {
            self.send(body.as_ref()).await;
        }
    }

    pub async fn db(&self) -> PgConnection {
        PgConnection::connect(&self.database_url).await.unwrap()
    }

    /// Barrier: every appended record is applied (stored offsets cover the log) and every
    /// outbox row is published. Polls with a deadline; no sleeps as synchronisation.
    pub async fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut db = self.db().await;
        loop {
            let applied: Option<i64> = sqlx::query_scalar(
                "SELECT sum(next_offset)::int8 FROM consumer_offsets WHERE topic = $1",
            )
            .bind(&self.events_topic)
            .fetch_one(&mut db)
            .await
            .unwrap_or(None);
            let pending: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL AND parked_at IS NULL",
            )
            .fetch_one(&mut db)
            .await
            .unwrap_or(1);
            if applied.unwrap_or(0) as u64 >= self.appended && pending == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not settled within 90 s: applied {applied:?} of {} records, {pending} outbox rows pending",
                self.appended
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

    /// Every row of a projection table as JSON, ordered, for whole-state comparisons.
    pub async fn table(&self, sql: &str) -> Vec<Value> {
        let mut db = self.db().await;
        let wrapped = format!("SELECT to_jsonb(t)::text FROM ({sql}) t");
        let rows: Vec<String> = sqlx::query_scalar(&wrapped)
            .fetch_all(&mut db)
            .await
            .unwrap();
        rows.into_iter()
            .map(|r| serde_json::from_str(&r).unwrap())
            .collect()
    }
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

/// Every projection table, each ordered by its key, so two snapshots compare row by row.
pub const PROJECTIONS: &[(&str, &str)] = &[
    ("customers", "SELECT * FROM customers ORDER BY account, id"),
    (
        "subscriptions",
        "SELECT * FROM subscriptions ORDER BY account, id",
    ),
    ("invoices", "SELECT * FROM invoices ORDER BY account, id"),
    (
        "checkout_sessions",
        "SELECT * FROM checkout_sessions ORDER BY account, id",
    ),
    (
        "entitlement_summaries",
        "SELECT * FROM entitlement_summaries ORDER BY account, customer",
    ),
    (
        "entitlements",
        "SELECT * FROM entitlements ORDER BY account, customer",
    ),
];

impl Pipeline {
    /// Every projection table's rows as JSON.
    pub async fn projections(&self) -> BTreeMap<&'static str, Vec<Value>> {
        let mut tables = BTreeMap::new();
        for (table, sql) in PROJECTIONS {
            tables.insert(*table, self.table(sql).await);
        }
        tables
    }
}

/// The projections without `entitlements.version`: it counts changes, and how many changes a
/// log makes depends on how its events were batched. Everything else depends on the events
/// alone.
pub fn without_version(
    mut tables: BTreeMap<&'static str, Vec<Value>>,
) -> BTreeMap<&'static str, Vec<Value>> {
    for row in tables.get_mut("entitlements").into_iter().flatten() {
        row.as_object_mut().unwrap().remove("version");
    }
    tables
}

/// Asserts two projection snapshots are identical, table by table, row by row.
pub fn assert_same_projections(
    context: &str,
    left: &BTreeMap<&'static str, Vec<Value>>,
    right: &BTreeMap<&'static str, Vec<Value>>,
) {
    for (table, _) in PROJECTIONS {
        let (a, b) = (&left[table], &right[table]);
        for (row, (a, b)) in a.iter().zip(b).enumerate() {
            assert_eq!(a, b, "{context}: {table} row {row} differs");
        }
        assert_eq!(
            a.len(),
            b.len(),
            "{context}: {table} has {} rows on the left, {} on the right",
            a.len(),
            b.len()
        );
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.entitlements_path);
    }
}

/// Reads every record a topic holds now: from the beginning to each partition's high watermark.
pub fn read_topic_to_end(topic: &str) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = kafka_settings()
        .client_config()
        .set("group.id", unique("e2e-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0) as i32;
    let mut assignment = TopicPartitionList::new();
    let mut remaining = 0;
    for p in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .expect("watermarks");
        if high > low {
            remaining += (high - low) as usize;
            assignment
                .add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
    }
    let mut records = Vec::with_capacity(remaining);
    if remaining == 0 {
        return records;
    }
    consumer.assign(&assignment).expect("assign");
    let end = Instant::now() + Duration::from_secs(60);
    while records.len() < remaining {
        assert!(
            Instant::now() < end,
            "read {} of {remaining} records of {topic}",
            records.len()
        );
        if let Some(result) = consumer.poll(Duration::from_millis(100)) {
            records.push(result.expect("consume").detach());
        }
    }
    records
}

/// Reads a topic from the beginning of every partition until `count` records or the deadline.
pub fn read_topic(topic: &str, count: usize, deadline: Duration) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = kafka_settings()
        .client_config()
        .set("group.id", unique("e2e-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let end = Instant::now() + deadline;
    let partitions = loop {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let n = metadata
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        if n > 0 {
            break n as i32;
        }
        assert!(Instant::now() < end, "topic {topic} does not exist");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).expect("assign");
    let mut records = Vec::new();
    while records.len() < count && Instant::now() < end {
        if let Some(result) = consumer.poll(Duration::from_millis(100)) {
            records.push(result.expect("consume").detach());
        }
    }
    records
}

/// Webhook requests in flight at once in the concurrent senders.
pub const IN_FLIGHT: usize = 32;

/// Signs and POSTs every body with `IN_FLIGHT` requests at a time; asserts each is a 200.
pub async fn send_concurrently(client: &reqwest::Client, url: &str, bodies: &[String]) -> u64 {
    let statuses: Vec<(u16, String)> = futures_util::stream::iter(bodies)
        .map(|body| async move {
            let header = signature_header(SECRET, now(), body.as_bytes());
            let response = client
                .post(url)
                .header("Stripe-Signature", header)
                .body(body.clone())
                .send()
                .await
                .expect("POST to ingest");
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    for (status, body) in &statuses {
        assert_eq!(*status, 200, "ingest answered {status}: {body}");
    }
    statuses.len() as u64
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
