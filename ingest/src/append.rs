//! The durable append: raw request bytes into the log with acks from every in-sync replica, by
//! an idempotent producer. A request is answered 2xx only after the delivery report says the
//! record is written.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use shared::envelope::header;
use shared::kafka::{durable_producer_config, KafkaSettings};
use shared::{EventEnvelope, EventSource};

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("the broker did not acknowledge the append within {0:?}")]
    Timeout(Duration),
    #[error("the producer queue is full")]
    QueueFull,
    #[error("the append failed: {0}")]
    Kafka(#[from] KafkaError),
}

/// Where a record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub partition: i32,
    pub offset: i64,
}

/// What travels with the body of a verified request.
#[derive(Debug, Clone)]
pub struct Receipt<'a> {
    /// The `Stripe-Signature` header as received, so anyone holding the secret can re-verify.
    pub signature: &'a str,
    /// Unix milliseconds at which the request arrived.
    pub received_at_ms: i64,
}

/// A record ingest writes on its own (backfill, reconcile, the fetch after a thin event): no
/// signature, since no request was signed, and a `stripe-source` header instead.
#[derive(Debug, Clone)]
pub struct SourcedRecord<'a> {
    pub id: &'a str,
    pub event_type: &'a str,
    pub created: i64,
    pub livemode: bool,
    pub api_version: Option<&'a str>,
    pub account: Option<&'a str>,
    /// SPEC §5's partition key.
    pub key: &'a str,
    pub body: &'a [u8],
    /// `backfill` or `events-api`.
    pub source: EventSource,
}

/// Who is told how long each append to the raw log took: the HTTP service's metrics. The log
/// reports through this and knows nothing of the service around it; `backfill`, `reconcile` and
/// the fetch after a thin event have no one watching.
pub trait AppendObserver: Send + Sync {
    /// An event was acknowledged, or failed, `elapsed` after it was handed to the producer.
    fn appended(&self, elapsed: Duration);
}

pub struct EventLog {
    producer: FutureProducer,
    events_topic: String,
    dlq_topic: String,
    timeout: Duration,
    observer: Option<Arc<dyn AppendObserver>>,
}

impl EventLog {
    pub fn new(
        kafka: &KafkaSettings,
        events_topic: &str,
        dlq_topic: &str,
        timeout: Duration,
        max_record_bytes: usize,
    ) -> Result<Self, KafkaError> {
        let producer: FutureProducer =
            durable_producer_config(kafka, timeout, max_record_bytes).create()?;
        Ok(EventLog {
            producer,
            events_topic: events_topic.to_owned(),
            dlq_topic: dlq_topic.to_owned(),
            timeout,
            observer: None,
        })
    }

    /// Reports every append of an event (not of a dead letter) to `observer`.
    pub fn observed_by(mut self, observer: Arc<dyn AppendObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Appends a verified Stripe event (snapshot or thin) to the raw log, keyed and with the
    /// headers of SPEC §5.
    pub async fn append_event(
        &self,
        event: &EventEnvelope<'_>,
        body: &[u8],
        receipt: &Receipt<'_>,
    ) -> Result<Appended, AppendError> {
        let received_at = receipt.received_at_ms.to_string();
        let headers = event_headers(EventHeaders {
            id: event.id,
            event_type: event.event_type,
            created: event.created,
            livemode: event.livemode,
            api_version: event.api_version,
            account: event.account,
        })
        .insert(h(header::SIGNATURE, receipt.signature))
        .insert(h(header::RECEIVED_AT, &received_at))
        .insert(h(header::SOURCE, EventSource::Webhook.as_str()));
        let key = event.partition_key();
        let record = FutureRecord::to(&self.events_topic)
            .key(&key)
            .payload(body)
            .headers(headers);
        self.deliver_observed(record).await
    }

    /// Appends a record ingest read from the Stripe API, keyed and with the headers of SPEC §5.
    pub async fn append_sourced(
        &self,
        record: &SourcedRecord<'_>,
        received_at_ms: i64,
    ) -> Result<Appended, AppendError> {
        let received_at = received_at_ms.to_string();
        let headers = event_headers(EventHeaders {
            id: record.id,
            event_type: record.event_type,
            created: record.created,
            livemode: record.livemode,
            api_version: record.api_version,
            account: record.account,
        })
        .insert(h(header::RECEIVED_AT, &received_at))
        .insert(h(header::SOURCE, record.source.as_str()));
        let record = FutureRecord::to(&self.events_topic)
            .key(record.key)
            .payload(record.body)
            .headers(headers);
        self.deliver_observed(record).await
    }

    /// Appends a verified payload that is not a Stripe event to the dead-letter topic, with the
    /// reason, so that nothing verified is ever dropped.
    pub async fn append_dead_letter(
        &self,
        body: &[u8],
        reason: &str,
        message: &str,
        receipt: &Receipt<'_>,
    ) -> Result<Appended, AppendError> {
        let received_at = receipt.received_at_ms.to_string();
        let headers = OwnedHeaders::new_with_capacity(5)
            .insert(h(header::DLQ_REASON, reason))
            .insert(h(header::DLQ_MESSAGE, message))
            .insert(h(header::DLQ_SOURCE, "ingest"))
            .insert(h(header::SIGNATURE, receipt.signature))
            .insert(h(header::RECEIVED_AT, &received_at));
        let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.dlq_topic)
            .payload(body)
            .headers(headers);
        self.deliver(record).await
    }

    async fn deliver_observed(
        &self,
        record: FutureRecord<'_, impl rdkafka::message::ToBytes + ?Sized, [u8]>,
    ) -> Result<Appended, AppendError> {
        let started = Instant::now();
        let result = self.deliver(record).await;
        if let Some(observer) = &self.observer {
            observer.appended(started.elapsed());
        }
        result
    }

    async fn deliver(
        &self,
        record: FutureRecord<'_, impl rdkafka::message::ToBytes + ?Sized, [u8]>,
    ) -> Result<Appended, AppendError> {
        let delivery = match self.producer.send_result(record) {
            Ok(delivery) => delivery,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                return Err(AppendError::QueueFull)
            }
            Err((e, _)) => return Err(AppendError::Kafka(e)),
        };
        match tokio::time::timeout(self.timeout, delivery).await {
            Err(_) => Err(AppendError::Timeout(self.timeout)),
            // The producer outlives every request, so a cancelled report means shutdown.
            Ok(Err(_canceled)) => Err(AppendError::Kafka(KafkaError::Canceled)),
            Ok(Ok(Err((e, _)))) => Err(AppendError::Kafka(e)),
            Ok(Ok(Ok(delivery))) => Ok(Appended {
                partition: delivery.partition,
                offset: delivery.offset,
            }),
        }
    }

    /// Records not yet acknowledged by the broker.
    pub fn queue_len(&self) -> i32 {
        self.producer.in_flight_count()
    }

    /// Whether the broker answers a metadata request for the raw log within `timeout`.
    pub async fn reachable(&self, timeout: Duration) -> bool {
        let producer = self.producer.clone();
        let topic = self.events_topic.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), timeout)
                .map(|m| {
                    m.topics()
                        .iter()
                        .any(|t| t.error().is_none() && !t.partitions().is_empty())
                })
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false)
    }

    /// Waits for every queued record to be acknowledged, or `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}

/// What SPEC §5's headers say about the event itself, whoever wrote the record.
struct EventHeaders<'a> {
    id: &'a str,
    event_type: &'a str,
    created: i64,
    livemode: bool,
    api_version: Option<&'a str>,
    account: Option<&'a str>,
}

/// The event's own headers (SPEC §5); each writer adds where the record came from.
fn event_headers(event: EventHeaders<'_>) -> OwnedHeaders {
    let created = event.created.to_string();
    let mut headers = OwnedHeaders::new_with_capacity(9)
        .insert(h(header::EVENT_ID, event.id))
        .insert(h(header::EVENT_TYPE, event.event_type))
        .insert(h(header::CREATED, &created))
        .insert(h(
            header::LIVEMODE,
            if event.livemode { "true" } else { "false" },
        ));
    if let Some(version) = event.api_version {
        headers = headers.insert(h(header::API_VERSION, version));
    }
    if let Some(account) = event.account {
        headers = headers.insert(h(header::ACCOUNT, account));
    }
    headers
}

fn h<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}
