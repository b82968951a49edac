//! The outbox relay: publishes rows written with the projection, in id order, with the
//! idempotent producer; marks them only after the broker acknowledged them. A crash between
//! the acknowledgement and the mark republishes: duplicates are possible and recognisable by
//! (customer, version); losses are not.
//!
//! Only the leader relays (see [`leader`]): two relays reading the same pending rows would each
//! publish them, and one could put a customer's v4 after another's v5, leaving the compacted
//! topic on the older version. A row Kafka can never take is parked with its reason and the
//! relay moves on; any other failure is retried with capped backoff, in order.

mod leader;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer, PurgeConfig};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::store::RELAY_LEADER_LOCK;
pub use leader::{LeaderLock, CONFIRMED_FOR, FOLLOWER_RETRY, HEARTBEAT, QUIET};

/// Rows published per round.
const BATCH: i64 = 1000;
/// How often the relay looks even without a notification.
const POLL: Duration = Duration::from_secs(1);
/// Backoff after a failed round, doubled per failure up to the cap.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Published rows are kept this long for inspection, then deleted.
const KEEP_PUBLISHED: &str = "1 day";
/// Rounds between two deletions of old published rows (about ten minutes when idle).
const PRUNE_EVERY: u64 = 600;

pub struct Relay {
    pub pool: PgPool,
    pub producer: FutureProducer,
    pub metrics: Arc<Metrics>,
}

/// One pending outbox row.
#[derive(sqlx::FromRow)]
struct OutboxRow {
    id: i64,
    topic: String,
    key: Option<String>,
    payload: Vec<u8>,
    headers: sqlx::types::Json<serde_json::Map<String, serde_json::Value>>,
}

/// What became of a row handed to the producer.
enum Sent {
    /// Handed over; the delivery report is awaited.
    Handed(DeliveryFuture),
    /// Refused before it left the process, for a reason that will not change.
    Refused(KafkaError),
}

/// A row set aside for good, and why.
struct ParkedRow {
    id: i64,
    topic: String,
    reason: &'static str,
    message: String,
}

/// The result of one round.
#[derive(Debug, Default, PartialEq, Eq)]
struct Round {
    /// Rows read from the outbox.
    taken: usize,
    /// Rows acknowledged by Kafka and marked.
    published: usize,
    /// Rows parked.
    parked: usize,
}

/// How a leader's term ended.
enum TermEnd {
    Stopped,
    LostLock,
}

impl Relay {
    /// Relays while this instance leads, follows otherwise, until `shutdown`. On a clean stop
    /// the leader drains what is pending once more, then releases the lock for the next one.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut lock = LeaderLock::new(&self.pool);
        loop {
            if *shutdown.borrow() {
                break;
            }
            let sent = Instant::now();
            match lock.try_acquire().await {
                Ok(true) => {}
                Ok(false) => {
                    if stopped_within(&mut shutdown, FOLLOWER_RETRY).await {
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach Postgres for the relay lock");
                    if stopped_within(&mut shutdown, FOLLOWER_RETRY).await {
                        break;
                    }
                    continue;
                }
            }
            let Some(holder) = lock.holder() else {
                continue;
            };
            self.metrics.relay_leader.begin(Instant::now(), QUIET);
            self.metrics.relay_leader.confirm(sent, CONFIRMED_FOR);
            tracing::info!(
                lock_session = holder,
                "this instance leads the outbox relay"
            );
            let end = tokio::select! {
                () = self.lead(holder, &mut shutdown) => TermEnd::Stopped,
                () = lock.lost(|sent| self.metrics.relay_leader.confirm(sent, CONFIRMED_FOR)) => TermEnd::LostLock,
            };
            self.metrics.relay_leader.end();
            match end {
                TermEnd::Stopped => {
                    lock.release().await;
                    break;
                }
                TermEnd::LostLock => {
                    // Another instance may lead by now: what this one still holds must not
                    // reach the topic after the new leader's messages. The new leader
                    // publishes every unmarked row again.
                    self.producer
                        .purge(PurgeConfig::default().queue().inflight());
                    tracing::warn!("stopped relaying the outbox: the leader lock may be lost");
                }
            }
        }
        tracing::info!("outbox relay stopped");
    }

    /// The leader's loop: rounds until `shutdown`, woken by `NOTIFY outbox` or the poll.
    /// `holder` is the backend pid of the session holding the leader lock.
    async fn lead(&self, holder: i32, shutdown: &mut watch::Receiver<bool>) {
        let mut listener = match PgListener::connect_with(&self.pool).await {
            Ok(mut listener) => match listener.listen("outbox").await {
                Ok(()) => Some(listener),
                Err(_) => None,
            },
            Err(_) => None,
        };
        let mut backoff = MIN_BACKOFF;
        let mut rounds: u64 = 0;
        loop {
            match self.publish_round(holder).await {
                Ok(round) => {
                    backoff = MIN_BACKOFF;
                    if round.taken as i64 == BATCH || round.published + round.parked < round.taken {
                        continue; // more are waiting
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "outbox publish failed");
                    if stopped_within(shutdown, backoff).await {
                        break;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
            rounds += 1;
            if rounds.is_multiple_of(PRUNE_EVERY) {
                let _ = sqlx::query(&format!(
                    "DELETE FROM outbox WHERE published_at < now() - interval '{KEEP_PUBLISHED}'"
                ))
                .execute(&self.pool)
                .await;
            }
            let wait = async {
                match listener.as_mut() {
                    Some(l) => {
                        let _ = tokio::time::timeout(POLL, l.recv()).await;
                    }
                    None => tokio::time::sleep(POLL).await,
                }
            };
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = wait => {}
            }
        }
        // Last round so that a clean stop leaves nothing behind.
        if let Err(e) = self.publish_round(holder).await {
            tracing::warn!(error = %e, "outbox rows left unpublished at shutdown; they go out at the next start");
        }
    }

    /// Publishes one round of pending rows in id order and marks what Kafka acknowledged (a
    /// prefix, so a retry never puts an older version after a newer one) and what it can never
    /// take.
    ///
    /// Rows are read only while the lock session `holder` still holds the leader lock: a leader
    /// that was frozen past its lease, and resumes before its heartbeat notices, reads nothing
    /// instead of publishing after its successor.
    async fn publish_round(&self, holder: i32) -> Result<Round, RelayError> {
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT id, topic, key, payload, headers FROM outbox
             WHERE published_at IS NULL AND parked_at IS NULL
               AND EXISTS (SELECT 1 FROM pg_locks
                           WHERE locktype = 'advisory' AND granted AND pid = $2
                             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                             AND classid::int8 = $3 >> 32 AND objid::int8 = $3 & 4294967295
                             AND objsubid = 1)
             ORDER BY id LIMIT $1",
        )
        .bind(BATCH)
        .bind(holder)
        .bind(RELAY_LEADER_LOCK)
        .fetch_all(&self.pool)
        .await?;
        let mut round = Round {
            taken: rows.len(),
            ..Round::default()
        };
        if rows.is_empty() {
            return Ok(round);
        }
        let mut sent = Vec::with_capacity(rows.len());
        for row in &rows {
            match self.producer.send_result(record(row)) {
                Ok(delivery) => sent.push(Sent::Handed(delivery)),
                Err((e, _)) if park_reason(&e).is_some() => sent.push(Sent::Refused(e)),
                Err((e, _)) => {
                    // Queue full or similar: stop here; what was handed over is awaited below.
                    tracing::warn!(error = %e, outbox_id = row.id, "producer refused an outbox row");
                    break;
                }
            }
        }
        let mut published = Vec::new();
        let mut parked = Vec::new();
        let mut failure = None;
        for (row, sent) in rows.iter().zip(sent) {
            let result = match sent {
                Sent::Handed(delivery) => delivered(delivery).await,
                Sent::Refused(e) => Err(e),
            };
            let error = match result {
                Ok(()) => {
                    published.push(row.id);
                    continue;
                }
                Err(error) => error,
            };
            if park_reason(&error).is_none() {
                failure = Some(RelayError::Delivery(error));
                break;
            }
            // The broker rejects a whole request at once: the row may only have shared it with
            // the culprit. Alone, it either goes through or is the culprit itself.
            match delivered_alone(&self.producer, row).await {
                Ok(()) => {
                    // Rows after it went out before it: they must be published again after it,
                    // so the prefix ends here.
                    published.push(row.id);
                    break;
                }
                Err(e) => match park_reason(&e) {
                    Some(reason) => parked.push(ParkedRow {
                        id: row.id,
                        topic: row.topic.clone(),
                        reason,
                        message: e.to_string(),
                    }),
                    None => {
                        failure = Some(RelayError::Delivery(e));
                        break;
                    }
                },
            }
        }
        self.mark(&published, &parked, &rows).await?;
        round.published = published.len();
        round.parked = parked.len();
        match failure {
            Some(e) if published.is_empty() && parked.is_empty() => Err(e),
            Some(e) => {
                // Progress was made; the failing row is tried again at once, and backs off if it
                // keeps failing.
                tracing::debug!(error = %e, "outbox round ended early");
                Ok(round)
            }
            None => Ok(round),
        }
    }

    async fn mark(
        &self,
        published: &[i64],
        parked: &[ParkedRow],
        rows: &[OutboxRow],
    ) -> Result<(), RelayError> {
        if !published.is_empty() {
            sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
                .bind(published)
                .execute(&self.pool)
                .await?;
            for row in rows.iter().filter(|r| published.contains(&r.id)) {
                self.metrics.published.inc(&row.topic);
            }
        }
        if !parked.is_empty() {
            let ids: Vec<i64> = parked.iter().map(|p| p.id).collect();
            let reasons: Vec<&str> = parked.iter().map(|p| p.reason).collect();
            let messages: Vec<&str> = parked.iter().map(|p| p.message.as_str()).collect();
            sqlx::query(
                "UPDATE outbox o SET parked_at = now(), park_reason = p.reason, park_message = p.message
                 FROM UNNEST($1::int8[], $2::text[], $3::text[]) AS p(id, reason, message)
                 WHERE o.id = p.id",
            )
            .bind(&ids)
            .bind(&reasons)
            .bind(&messages)
            .execute(&self.pool)
            .await?;
            for p in parked {
                tracing::error!(outbox_id = p.id, topic = %p.topic, reason = p.reason, message = %p.message,
                    "outbox row parked: Kafka will never take it");
                self.metrics.parked.inc(p.reason);
            }
        }
        Ok(())
    }
}

/// The Kafka record of an outbox row.
fn record(row: &OutboxRow) -> FutureRecord<'_, String, Vec<u8>> {
    let mut headers = OwnedHeaders::new_with_capacity(row.headers.len());
    for (k, v) in row.headers.iter() {
        let value = v
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string());
        headers = headers.insert(Header {
            key: k,
            value: Some(&value),
        });
    }
    let mut record = FutureRecord::to(&row.topic)
        .payload(&row.payload)
        .headers(headers);
    if let Some(key) = &row.key {
        record = record.key(key);
    }
    record
}

async fn delivered(delivery: DeliveryFuture) -> Result<(), KafkaError> {
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e),
        // The producer went away with the message: retried like any transient failure.
        Err(_) => Err(KafkaError::Canceled),
    }
}

async fn delivered_alone(producer: &FutureProducer, row: &OutboxRow) -> Result<(), KafkaError> {
    match producer.send_result(record(row)) {
        Ok(delivery) => delivered(delivery).await,
        Err((e, _)) => Err(e),
    }
}

/// The stable reason a row can never be published, or `None` when a retry may succeed (a broker
/// away, a timeout, a full queue, missing permissions that an operator can grant).
fn park_reason(error: &KafkaError) -> Option<&'static str> {
    use RDKafkaErrorCode as Code;
    match error.rdkafka_error_code()? {
        Code::MessageSizeTooLarge | Code::MessageBatchTooLarge => Some("message_too_large"),
        Code::InvalidRecord | Code::BadMessage => Some("invalid_record"),
        Code::InvalidTopic => Some("invalid_topic"),
        Code::PolicyViolation => Some("policy_violation"),
        _ => None,
    }
}

/// Waits `duration`; true when `shutdown` came first.
async fn stopped_within(shutdown: &mut watch::Receiver<bool>, duration: Duration) -> bool {
    tokio::select! {
        _ = shutdown.changed() => true,
        _ = tokio::time::sleep(duration) => false,
    }
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("delivery: {0}")]
    Delivery(KafkaError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn produce_error(code: RDKafkaErrorCode) -> KafkaError {
        KafkaError::MessageProduction(code)
    }

    #[test]
    fn a_message_too_large_for_the_topic_is_parked() {
        assert_eq!(
            park_reason(&produce_error(RDKafkaErrorCode::MessageSizeTooLarge)),
            Some("message_too_large")
        );
        assert_eq!(
            park_reason(&produce_error(RDKafkaErrorCode::MessageBatchTooLarge)),
            Some("message_too_large")
        );
    }

    #[test]
    fn invalid_records_and_topics_are_parked() {
        assert_eq!(
            park_reason(&produce_error(RDKafkaErrorCode::InvalidRecord)),
            Some("invalid_record")
        );
        assert_eq!(
            park_reason(&produce_error(RDKafkaErrorCode::InvalidTopic)),
            Some("invalid_topic")
        );
    }

    #[test]
    fn transient_failures_are_retried_not_parked() {
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::NotEnoughReplicas,
            RDKafkaErrorCode::LeaderNotAvailable,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ] {
            assert_eq!(park_reason(&produce_error(code)), None, "{code:?}");
        }
        assert_eq!(park_reason(&KafkaError::Canceled), None);
    }
}
