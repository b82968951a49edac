//! The test's own Kafka clients: an admin for topics, and readers of what the services wrote.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::names::unique;

pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The settings the test's own Kafka clients use: the same variables as the services.
pub fn kafka_settings() -> shared::kafka::KafkaSettings {
    shared::kafka::KafkaSettings::from_env().expect("KAFKA_* settings")
}

/// An admin client on the same cluster as the services.
pub fn admin() -> AdminClient<DefaultClientContext> {
    kafka_settings()
        .client_config()
        .create()
        .expect("Kafka admin client")
}

/// Creates `topic` with `partitions` and the given topic configs; panics unless it is created.
pub async fn create_topic(topic: &str, partitions: i32, configs: &[(&str, &str)]) {
    let mut new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for (key, value) in configs {
        new_topic = new_topic.set(key, value);
    }
    let results = admin()
        .create_topics(&[new_topic], &AdminOptions::new())
        .await
        .expect("create_topics");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
}

/// A consumer in a group of its own that never commits: reading leaves no trace.
fn reader() -> BaseConsumer {
    kafka_settings()
        .client_config()
        .set("group.id", unique("e2e_reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}

fn partition_count(consumer: &BaseConsumer, topic: &str) -> i32 {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    metadata
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len() as i32)
}

/// Reads a topic from the beginning of every partition until `count` records have arrived or
/// `deadline` has passed (then it returns what it has); waits for the topic to exist.
pub fn read_topic(topic: &str, count: usize, deadline: Duration) -> Vec<OwnedMessage> {
    let consumer = reader();
    let end = Instant::now() + deadline;
    let partitions = loop {
        let n = partition_count(&consumer, topic);
        if n > 0 {
            break n;
        }
        assert!(Instant::now() < end, "topic {topic} does not exist");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .expect("a partition offset");
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

/// Reads every record a topic holds now: from the beginning to each partition's high watermark.
pub fn read_topic_to_end(topic: &str) -> Vec<OwnedMessage> {
    let consumer = reader();
    let mut assignment = TopicPartitionList::new();
    let mut remaining = 0;
    for p in 0..partition_count(&consumer, topic) {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .expect("watermarks");
        if high > low {
            remaining += (high - low) as usize;
            assignment
                .add_partition_offset(topic, p, Offset::Beginning)
                .expect("a partition offset");
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

/// Asserts the value of each named header, `None` for an absent one.
#[track_caller]
pub fn assert_headers(message: &OwnedMessage, expected: &[(&str, Option<&str>)]) {
    for (name, value) in expected {
        assert_eq!(
            header_value(message, name).as_deref(),
            *value,
            "header {name}"
        );
    }
}

pub fn header_value(message: &OwnedMessage, name: &str) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A header's value as text, borrowed from the message.
pub fn header<'m>(message: &'m OwnedMessage, name: &str) -> Option<&'m str> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| std::str::from_utf8(v).expect("a UTF-8 header"))
}

pub fn payload_str(message: &OwnedMessage) -> String {
    String::from_utf8(message.payload().unwrap_or_default().to_vec()).expect("a UTF-8 payload")
}

pub fn key_str(message: &OwnedMessage) -> Option<String> {
    message
        .key()
        .map(|k| String::from_utf8(k.to_vec()).expect("a UTF-8 key"))
}

/// Queues one record, serving the producer's callbacks while its queue is full; the future
/// resolves once the broker has acknowledged it.
pub fn enqueue(producer: &FutureProducer, topic: &str, key: &str, payload: &str) -> DeliveryFuture {
    let mut record = FutureRecord::to(topic).key(key).payload(payload);
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return delivery,
            Err((_, returned)) => {
                record = returned;
                producer.poll(Duration::from_millis(10));
            }
        }
    }
}

/// Appends `(key, payload)` records to `topic` in order, bypassing ingest (to build a large log
/// fast), and waits for every acknowledgement. Returns how many it appended.
pub async fn produce_all(
    producer: &FutureProducer,
    topic: &str,
    records: impl IntoIterator<Item = (String, String)>,
) -> u64 {
    let deliveries: Vec<DeliveryFuture> = records
        .into_iter()
        .map(|(key, payload)| enqueue(producer, topic, &key, &payload))
        .collect();
    let appended = deliveries.len() as u64;
    for delivery in deliveries {
        delivery.await.expect("delivery").expect("delivered");
    }
    appended
}
