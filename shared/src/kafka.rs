//! Kafka client settings and topic settings shared by both services.

mod preflight;
pub mod properties;
mod settings;

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::types::RDKafkaErrorCode as Code;

pub use preflight::{check_cluster, KafkaUnreachable, PREFLIGHT_DEADLINE};
pub use settings::{
    KafkaSettings, KeyRule, SecurityProtocol, DEFAULT_BROKERS, KEY_RULES, OVERRIDES,
};

use crate::limits::{self, RecordLimit, TopicTooSmall};

/// Settings of a producer whose acknowledged writes are durable and never duplicated by its own
/// retries: acks from every in-sync replica, idempotence on, and a short linger so that
/// concurrent requests share one broker round trip. `max_record_bytes` is the largest record it
/// must take (see [`crate::limits`]); librdkafka's default, about 1 MB, is not enough.
pub fn durable_producer_config(
    settings: &KafkaSettings,
    delivery_timeout: Duration,
    max_record_bytes: usize,
) -> ClientConfig {
    let mut config = settings.client_config();
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // 1 ms, not 5: every request waits for its delivery report, so the linger is paid per
        // request; at 32 connections 5 ms capped ingest at ~4,200 req/s, 1 ms reached ~8-10k
        // while still batching what is in flight (BENCHMARKS.md, "linger.ms").
        .set("linger.ms", "1")
        .set("compression.type", "lz4")
        // librdkafka gives up on a message at this deadline, so a record we answered 503 for
        // does not linger in the queue for minutes.
        .set(
            "message.timeout.ms",
            delivery_timeout.as_millis().to_string(),
        )
        .set("queue.buffering.max.messages", "100000")
        .set("queue.buffering.max.kbytes", "262144")
        .set("socket.keepalive.enable", "true")
        .set("message.max.bytes", max_record_bytes.to_string())
        .set(
            "batch.size",
            limits::producer_batch_bytes(max_record_bytes).to_string(),
        );
    config
}

/// How a topic is created when it is missing.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub config: Vec<(&'static str, String)>,
    /// The `max.message.bytes` an existing topic must have; checked at start-up.
    pub required_record_bytes: Option<usize>,
}

impl TopicSpec {
    /// The raw log: kept forever.
    pub fn event_log(name: &str, partitions: i32) -> Self {
        TopicSpec {
            name: name.to_owned(),
            partitions,
            config: vec![
                ("retention.ms", "-1".into()),
                ("retention.bytes", "-1".into()),
            ],
            required_record_bytes: None,
        }
    }

    /// Dead letters: kept forever too; they are evidence.
    pub fn dead_letters(name: &str) -> Self {
        TopicSpec {
            name: name.to_owned(),
            partitions: 1,
            config: vec![("retention.ms", "-1".into())],
            required_record_bytes: None,
        }
    }

    /// Entitlement changes: compacted, so the latest message per customer is its current state.
    pub fn compacted(name: &str, partitions: i32) -> Self {
        TopicSpec {
            name: name.to_owned(),
            partitions,
            config: vec![("cleanup.policy", "compact".into())],
            required_record_bytes: None,
        }
    }

    /// Created with `max.message.bytes` = `bytes`; an existing topic is left as it is.
    pub fn created_holding(mut self, bytes: usize) -> Self {
        self.config.retain(|(k, _)| *k != "max.message.bytes");
        self.config.push(("max.message.bytes", bytes.to_string()));
        self
    }

    /// Created holding records of `bytes`, and an existing topic that cannot hold them stops
    /// start-up: for the topics a service writes to.
    pub fn holding(self, bytes: usize) -> Self {
        let mut spec = self.created_holding(bytes);
        spec.required_record_bytes = Some(bytes);
        spec
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("cannot create topic {topic}: {code}")]
    Create {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error(transparent)]
    TooSmall(#[from] TopicTooSmall),
    #[error("kafka admin request failed: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// Creates the topics that are missing; existing topics are left as they are, so a cluster
/// whose topics are provisioned by its operators needs no admin rights.
pub async fn ensure_topics(
    settings: &KafkaSettings,
    topics: &[TopicSpec],
    timeout: Duration,
) -> Result<(), TopicError> {
    let admin: AdminClient<DefaultClientContext> = settings.client_config().create()?;
    let metadata = admin.inner().fetch_metadata(None, timeout)?;
    let existing: Vec<String> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| t.name().to_owned())
        .collect();
    // The broker that answered, or (answered by a bootstrap address, id unknown) any listed one.
    let answering_broker = Some(metadata.orig_broker_id())
        .filter(|id| *id >= 0)
        .or_else(|| metadata.brokers().first().map(|b| b.id()));
    drop(metadata);
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .filter(|t| !existing.contains(&t.name))
        .map(|t| {
            let mut topic = NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(-1));
            for (k, v) in &t.config {
                topic = topic.set(k, v);
            }
            topic
        })
        .collect();
    let required: Vec<RecordLimit<'_>> = topics
        .iter()
        .filter(|t| existing.contains(&t.name))
        .filter_map(|t| {
            t.required_record_bytes.map(|required| RecordLimit {
                topic: &t.name,
                required,
            })
        })
        .collect();
    limits::check_topics(&admin, answering_broker, &required, timeout).await?;
    if new_topics.is_empty() {
        return Ok(());
    }
    let options = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(_) | Err((_, Code::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(TopicError::Create { topic, code }),
        }
    }
    Ok(())
}
