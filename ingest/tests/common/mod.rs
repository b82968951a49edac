//! Test support: the real `ingest` binary against the local stack (`scripts/stack up`), a
//! unique topic per test, signed requests, and a reader of what landed in Kafka.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

pub const SECRET: &str = "whsec_e2e_test_secret";

pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The settings the test's own Kafka clients use: the same variables as the services.
pub fn kafka_settings() -> shared::kafka::KafkaSettings {
    shared::kafka::KafkaSettings::from_env().expect("KAFKA_* settings")
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos % 1_000_000_000
    )
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A running `ingest` process; killed on drop.
pub struct Ingest {
    pub child: Child,
    pub base_url: String,
    pub events_topic: String,
    pub dlq_topic: String,
    stderr_lines: mpsc::Receiver<String>,
}

impl Ingest {
    /// Starts the binary with its own topics and any extra variables.
    pub fn start(extra_env: &[(&str, &str)]) -> Ingest {
        let events_topic = unique("e2e-events");
        let dlq_topic = unique("e2e-dlq");
        let mut command = Command::new(env!("CARGO_BIN_EXE_ingest"));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KAFKA_BROKERS", brokers())
            .env("STRIPE_WEBHOOK_SECRETS", SECRET)
            .env("INGEST_ADDR", "127.0.0.1:0")
            .env("STRIPE_EVENTS_TOPIC", &events_topic)
            .env("DLQ_TOPIC", &dlq_topic)
            .env("STRIPE_EVENTS_PARTITIONS", "3")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in extra_env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("start ingest");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("TEST_LOG").is_some() {
                    eprintln!("[ingest] {line}");
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let port = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(remaining) {
                Ok(line) => {
                    if let Some(port) = line
                        .split("port=")
                        .nth(1)
                        .filter(|_| line.contains("ingest listening"))
                    {
                        break port.trim().parse::<u16>().expect("port");
                    }
                }
                Err(_) => panic!("ingest did not start listening within 60 s"),
            }
        };
        Ingest {
            child,
            base_url: format!("http://127.0.0.1:{port}"),
            events_topic,
            dlq_topic,
            stderr_lines: rx,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// Stderr lines printed since start-up, up to and including the first that contains
    /// `pattern`; panics when none does within 10 s.
    pub fn logs_until(&self, pattern: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut lines = Vec::new();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(remaining) {
                Ok(line) => {
                    let found = line.contains(pattern);
                    lines.push(line);
                    if found {
                        return lines;
                    }
                }
                Err(_) => panic!("no log line containing {pattern:?}; got {lines:#?}"),
            }
        }
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// POSTs `body` signed with `SECRET` at the current time.
pub async fn post_signed(
    client: &reqwest::Client,
    ingest: &Ingest,
    body: &str,
) -> reqwest::Response {
    let header = ingest::signature::header_for(SECRET, now(), body.as_bytes());
    post_with_header(client, ingest, body, Some(&header)).await
}

pub async fn post_with_header(
    client: &reqwest::Client,
    ingest: &Ingest,
    body: &str,
    header: Option<&str>,
) -> reqwest::Response {
    let mut request = client
        .post(ingest.url("/webhooks/stripe"))
        .body(body.to_owned());
    if let Some(header) = header {
        request = request.header("Stripe-Signature", header);
    }
    request.send().await.expect("request")
}

/// A Stripe event envelope around `object`.
pub fn event(id: &str, event_type: &str, object: serde_json::Value) -> String {
    serde_json::json!({
        "id": id,
        "object": "event",
        "api_version": "2025-03-31.basil",
        "created": now(),
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": event_type,
        "data": {"object": object},
    })
    .to_string()
}

/// Reads records from every partition of `topic` from the beginning until `count` have arrived,
/// or the deadline passes (then returns what it has).
pub fn read_records(topic: &str, count: usize, deadline: Duration) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = kafka_settings()
        .client_config()
        .set("group.id", unique("e2e-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions = metadata.topics()[0].partitions().len() as i32;
    assert!(partitions > 0, "topic {topic} has no partitions");
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).expect("assign");
    let end = Instant::now() + deadline;
    let mut records = Vec::new();
    while records.len() < count && Instant::now() < end {
        if let Some(result) = consumer.poll(Duration::from_millis(100)) {
            records.push(result.expect("consume").detach());
        }
    }
    records
}

pub fn header_value(message: &OwnedMessage, name: &str) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

pub fn payload_str(message: &OwnedMessage) -> String {
    String::from_utf8(message.payload().unwrap_or_default().to_vec()).unwrap()
}

pub fn key_str(message: &OwnedMessage) -> Option<String> {
    message
        .key()
        .map(|k| String::from_utf8(k.to_vec()).unwrap())
}
