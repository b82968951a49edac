//! Kafka client settings and topic settings shared by both services.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::types::RDKafkaErrorCode as Code;

/// Settings of a producer whose acknowledged writes are durable and never duplicated by its own
/// retries: acks from every in-sync replica, idempotence on, and a short linger so that
/// concurrent requests share one broker round trip.
pub fn durable_producer_config(brokers: &str, delivery_timeout: Duration) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
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
        .set("socket.keepalive.enable", "true");
    config
}

/// How a topic is created when it is missing.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub config: Vec<(&'static str, String)>,
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
        }
    }

    /// Dead letters: kept forever too; they are evidence.
    pub fn dead_letters(name: &str) -> Self {
        TopicSpec {
            name: name.to_owned(),
            partitions: 1,
            config: vec![("retention.ms", "-1".into())],
        }
    }

    /// Entitlement changes: compacted, so the latest message per customer is its current state.
    pub fn compacted(name: &str, partitions: i32) -> Self {
        TopicSpec {
            name: name.to_owned(),
            partitions,
            config: vec![("cleanup.policy", "compact".into())],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("cannot create topic {topic}: {code}")]
    Create {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("kafka admin request failed: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// Creates the topics that are missing; existing topics are left as they are, so a cluster
/// whose topics are provisioned by its operators needs no admin rights.
pub async fn ensure_topics(
    brokers: &str,
    topics: &[TopicSpec],
    timeout: Duration,
) -> Result<(), TopicError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let existing: Vec<String> = {
        let metadata = admin.inner().fetch_metadata(None, timeout)?;
        metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| t.name().to_owned())
            .collect()
    };
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
