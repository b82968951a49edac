//! Record sizes, aligned end to end. A body that ingest accepts must fit the producer's
//! `message.max.bytes` and the topic's `max.message.bytes`; otherwise the broker refuses a
//! verified event, ingest answers 503, and Stripe retries it for three days and gives up.
//!
//! The bound is computed from what a record can hold, never guessed from typical sizes:
//!
//! - the value is the request body, at most `MAX_BODY_BYTES`;
//! - the key and the headers taken from the body (event id, type, API version, account, the
//!   dead-letter message quoting a field) are disjoint pieces of the body: at most the body again;
//! - the `stripe-signature` header as received is bounded by the HTTP server's limit on the whole
//!   request head, [`HTTP_HEAD_MAX_BYTES`] (larger heads get 431 before any handler runs);
//! - header names, fixed-size values (`received-at`, `stripe-source`, …) and Kafka's record and
//!   batch framing fit in [`RECORD_FRAMING_BYTES`];
//! - lz4 can grow incompressible bytes by 1/255 plus 16 bytes per block.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::ClientContext;

/// actix-http's limit on a request head (request line and every header): its HTTP/1 decoder
/// answers 431 once it has buffered this much without finding the end of the head.
pub const HTTP_HEAD_MAX_BYTES: usize = 131_072;

/// Header names, fixed-size header values and Kafka's record and batch framing.
pub const RECORD_FRAMING_BYTES: usize = 16 * 1024;

/// SPEC §3's default for `MAX_BODY_BYTES`.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1_048_576;

/// The largest entitlement change message (SPEC §9) the outbox relay publishes: the §8 object
/// lists every subscription of a customer the projection knows, ended ones included, so it
/// grows with a customer's history. 8 MiB holds tens of thousands of subscriptions; a row larger
/// than this is parked by the relay rather than blocking the rows after it.
pub const ENTITLEMENT_CHANGE_MAX_BYTES: usize = 8 * 1024 * 1024;

/// Kafka's own producer default for `batch.size`; kept unless the record limit is smaller.
const DEFAULT_BATCH_BYTES: usize = 1_000_000;

/// The largest record ingest writes, to the raw log or to the dead-letter topic, for bodies of
/// at most `max_body_bytes` (see the module documentation for the sum).
pub fn ingest_record_max_bytes(max_body_bytes: usize) -> usize {
    let content = max_body_bytes
        .saturating_mul(2)
        .saturating_add(HTTP_HEAD_MAX_BYTES);
    content
        .saturating_add(lz4_worst_case_growth(content))
        .saturating_add(RECORD_FRAMING_BYTES)
}

/// The largest record the projector writes: an entitlement change, or a dead letter carrying a
/// raw-log record of the default body limit.
pub fn projector_record_max_bytes() -> usize {
    ENTITLEMENT_CHANGE_MAX_BYTES.max(ingest_record_max_bytes(DEFAULT_MAX_BODY_BYTES))
}

/// The producer's `batch.size` for records of at most `max_record_bytes`: a batch of several
/// records must fit the same topic limit as one record does.
pub fn producer_batch_bytes(max_record_bytes: usize) -> usize {
    DEFAULT_BATCH_BYTES.min(max_record_bytes)
}

fn lz4_worst_case_growth(bytes: usize) -> usize {
    bytes / 255 + 16
}

/// An existing topic that cannot hold the records a service writes to it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "topic {topic} holds records of at most {max_message_bytes} bytes (its max.message.bytes), \
     but records of up to {required} bytes are written to it"
)]
pub struct TopicTooSmall {
    pub topic: String,
    pub max_message_bytes: usize,
    pub required: usize,
}

/// What a topic must hold, checked at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordLimit<'a> {
    pub topic: &'a str,
    pub required: usize,
}

/// Reads the effective `max.message.bytes` of each topic (its own setting, or the broker's
/// `message.max.bytes` it inherits) and refuses one that is smaller than required. A cluster
/// that does not let this client describe configs is not refused: the limit is then unknown,
/// and a warning says so.
///
/// The request goes to `broker` (one that just answered a metadata request) when given, not to
/// the controller, which librdkafka picks by default: any broker describes a topic's configs,
/// and a cluster whose controller is unknown to the client (librdkafka's mock cluster always,
/// a real one during an election) would otherwise hold start-up for the whole `timeout`.
pub async fn check_topics<C: ClientContext + 'static>(
    admin: &AdminClient<C>,
    broker: Option<i32>,
    limits: &[RecordLimit<'_>],
    timeout: Duration,
) -> Result<(), TopicTooSmall> {
    if limits.is_empty() {
        return Ok(());
    }
    let resources: Vec<ResourceSpecifier<'_>> = limits
        .iter()
        .map(|l| ResourceSpecifier::Topic(l.topic))
        .collect();
    let options = AdminOptions::new()
        .request_timeout(Some(timeout))
        .broker_id(broker);
    let results = match admin.describe_configs(&resources, &options).await {
        Ok(results) => results,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the topics' max.message.bytes; not checked");
            return Ok(());
        }
    };
    for (limit, result) in limits.iter().zip(results) {
        let value = match &result {
            Ok(resource) => resource
                .get("max.message.bytes")
                .and_then(|entry| entry.value.as_deref())
                .and_then(|v| v.parse::<usize>().ok()),
            Err(code) => {
                tracing::warn!(topic = limit.topic, error = %code, "cannot read max.message.bytes; not checked");
                None
            }
        };
        if let Some(max_message_bytes) = value {
            check_one(limit, max_message_bytes)?;
        }
    }
    Ok(())
}

fn check_one(limit: &RecordLimit<'_>, max_message_bytes: usize) -> Result<(), TopicTooSmall> {
    if max_message_bytes < limit.required {
        return Err(TopicTooSmall {
            topic: limit.topic.to_owned(),
            max_message_bytes,
            required: limit.required,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_body_limit_needs_more_than_the_kafka_defaults_hold() {
        // librdkafka's message.max.bytes and the broker's default are both about 1 MB: the
        // very reason a body just under 1 MiB used to get 503 forever.
        let needed = ingest_record_max_bytes(DEFAULT_MAX_BODY_BYTES);
        assert!(needed > 1_048_588, "{needed}");
        assert!(needed >= 2 * DEFAULT_MAX_BODY_BYTES + HTTP_HEAD_MAX_BYTES);
        assert!(
            needed < 3 * DEFAULT_MAX_BODY_BYTES,
            "{needed} is not extravagant"
        );
    }

    #[test]
    fn the_record_limit_grows_with_the_body_limit_and_never_overflows() {
        assert!(ingest_record_max_bytes(10_000_000) > ingest_record_max_bytes(1_000_000));
        assert_eq!(ingest_record_max_bytes(usize::MAX), usize::MAX);
    }

    #[test]
    fn a_batch_never_exceeds_the_record_limit() {
        assert_eq!(producer_batch_bytes(200_000), 200_000);
        assert_eq!(producer_batch_bytes(5_000_000), DEFAULT_BATCH_BYTES);
    }

    #[test]
    fn the_projector_holds_entitlement_changes_and_ingest_dead_letters() {
        assert!(projector_record_max_bytes() >= ENTITLEMENT_CHANGE_MAX_BYTES);
        assert!(projector_record_max_bytes() >= ingest_record_max_bytes(DEFAULT_MAX_BODY_BYTES));
    }

    #[test]
    fn a_topic_smaller_than_required_is_refused_and_names_both_numbers() {
        let limit = RecordLimit {
            topic: "stripe.events",
            required: 2_000_000,
        };
        assert_eq!(check_one(&limit, 2_000_000), Ok(()));
        let e = check_one(&limit, 1_048_588).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("stripe.events") && text.contains("1048588"),
            "{text}"
        );
        assert!(text.contains("2000000"), "{text}");
    }
}
