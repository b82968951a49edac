//! Test support: the real `ingest` binary against the local stack (`scripts/stack up`), a
//! unique topic per test, signed requests, and a reader of what landed in Kafka (testkit's,
//! under the names these tests import).
// Each test binary uses a part of it.
#![allow(dead_code, unused_imports)]

use std::path::Path;
use std::time::Duration;

use rdkafka::message::OwnedMessage;

pub use testkit::kafka::{assert_headers, header_value, key_str, payload_str};
pub use testkit::signing::post_with_header as post_url_with_header;
pub use testkit::stripe::Event;
pub use testkit::{brokers, kafka_settings, now, unique, Service};

pub const SECRET: &str = "whsec_e2e_test_secret";

/// A running `ingest` process with its own topics; killed on drop.
pub struct Ingest {
    pub service: Service,
    pub base_url: String,
    pub events_topic: String,
    pub dlq_topic: String,
}

impl Ingest {
    /// Starts the binary with its own topics and any extra variables.
    pub fn start(extra_env: &[(&str, &str)]) -> Ingest {
        let events_topic = unique("e2e_events");
        let dlq_topic = unique("e2e_dlq");
        let mut env: Vec<(String, String)> = vec![
            ("KAFKA_BROKERS".into(), brokers()),
            ("STRIPE_WEBHOOK_SECRETS".into(), SECRET.into()),
            ("INGEST_ADDR".into(), "127.0.0.1:0".into()),
            ("STRIPE_EVENTS_TOPIC".into(), events_topic.clone()),
            ("DLQ_TOPIC".into(), dlq_topic.clone()),
            ("STRIPE_EVENTS_PARTITIONS".into(), "3".into()),
        ];
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let service = Service::spawn(
            "ingest",
            Path::new(env!("CARGO_BIN_EXE_ingest")),
            &[],
            &env,
            "ingest listening",
        );
        Ingest {
            base_url: service.url(""),
            service,
            events_topic,
            dlq_topic,
        }
    }

    pub fn url(&self, path: &str) -> String {
        self.service.url(path)
    }

    /// The `/metrics` page.
    pub async fn metrics(&self, client: &reqwest::Client) -> String {
        testkit::http::page(client, &self.url("/metrics"), None).await
    }

    pub fn pid(&self) -> u32 {
        self.service.child.id()
    }

    /// The status of a GET of `path` (`/healthz`, `/readyz`).
    pub async fn status_of(&self, client: &reqwest::Client, path: &str) -> u16 {
        let response = client.get(self.url(path)).send().await;
        response
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .status()
            .as_u16()
    }

    /// Stderr lines since start-up up to the first containing `pattern` (10 s deadline).
    pub fn logs_until(&self, pattern: &str) -> Vec<String> {
        self.service.logs_until(pattern)
    }
}

/// POSTs `body` signed with `SECRET` at the current time.
pub async fn post_signed(
    client: &reqwest::Client,
    ingest: &Ingest,
    body: &str,
) -> reqwest::Response {
    testkit::signing::post_signed(client, &ingest.url("/webhooks/stripe"), SECRET, body).await
}

pub async fn post_with_header(
    client: &reqwest::Client,
    ingest: &Ingest,
    body: &str,
    header: Option<&str>,
) -> reqwest::Response {
    post_url_with_header(client, &ingest.url("/webhooks/stripe"), body, header).await
}

/// A Stripe event envelope around `object`, created now.
pub fn event(id: &str, event_type: &str, object: serde_json::Value) -> String {
    Event::new(id, event_type, now(), object).body()
}

/// A `customer.created` event of a bare customer object, created now: the smallest valid event.
pub fn customer_created(id: &str, customer: &str) -> String {
    event(
        id,
        "customer.created",
        serde_json::json!({"id": customer, "object": "customer"}),
    )
}

/// Reads records from every partition of `topic` from the beginning until `count` have arrived,
/// or the deadline passes (then returns what it has).
pub fn read_records(topic: &str, count: usize, deadline: Duration) -> Vec<OwnedMessage> {
    testkit::read_topic(topic, count, deadline)
}
