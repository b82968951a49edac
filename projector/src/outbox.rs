//! The outbox relay: publishes rows written with the projection, in id order, with the
//! idempotent producer; marks them only after the broker acknowledged them. A crash between
//! the acknowledgement and the mark republishes: duplicates are possible and recognisable by
//! (customer, version); losses are not.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Row};
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Rows published per round.
const BATCH: i64 = 1000;
/// How often the relay looks even without a notification.
const POLL: Duration = Duration::from_secs(1);
/// Published rows are kept this long for inspection, then deleted.
const KEEP_PUBLISHED: &str = "1 day";

pub struct Relay {
    pub pool: PgPool,
    pub producer: FutureProducer,
    pub metrics: Arc<Metrics>,
}

struct OutboxRow {
    id: i64,
    topic: String,
    key: Option<String>,
    payload: Vec<u8>,
    headers: serde_json::Map<String, serde_json::Value>,
}

impl Relay {
    /// Publishes until `shutdown`, then drains what is pending once more.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut listener = match PgListener::connect_with(&self.pool).await {
            Ok(mut l) => match l.listen("outbox").await {
                Ok(()) => Some(l),
                Err(_) => None,
            },
            Err(_) => None,
        };
        let mut backoff = Duration::from_millis(100);
        let mut rounds: u64 = 0;
        loop {
            match self.publish_pending().await {
                Ok(n) => {
                    backoff = Duration::from_millis(100);
                    if n as i64 == BATCH {
                        continue; // more are waiting
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "outbox publish failed");
                    tokio::select! {
                        _ = shutdown.changed() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
            rounds += 1;
            if rounds.is_multiple_of(600) {
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
        if let Err(e) = self.publish_pending().await {
            tracing::warn!(error = %e, "outbox rows left unpublished at shutdown; they go out at the next start");
        }
        tracing::info!("outbox relay stopped");
    }

    /// Publishes one round; returns how many rows it took.
    async fn publish_pending(&self) -> Result<usize, RelayError> {
        let rows = sqlx::query(
            "SELECT id, topic, key, payload, headers::text AS headers FROM outbox
             WHERE published_at IS NULL ORDER BY id LIMIT $1",
        )
        .bind(BATCH)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let rows: Vec<OutboxRow> = rows
            .into_iter()
            .map(|r| {
                let headers: String = r.try_get("headers")?;
                Ok(OutboxRow {
                    id: r.try_get("id")?,
                    topic: r.try_get("topic")?,
                    key: r.try_get("key")?,
                    payload: r.try_get("payload")?,
                    headers: serde_json::from_str(&headers).unwrap_or_default(),
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
        let taken = rows.len();
        let mut deliveries = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut headers = OwnedHeaders::new_with_capacity(row.headers.len());
            for (k, v) in &row.headers {
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
            match self.producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((e, _)) => {
                    // Stop here; what was handed over is still awaited below.
                    tracing::warn!(error = %e, "producer refused an outbox row");
                    break;
                }
            }
        }
        let results = join_all(deliveries).await;
        // Mark only the acknowledged prefix: a later row must not be marked before an earlier
        // one, or a retry could put an older version last in the compacted topic.
        let mut acknowledged = Vec::new();
        for (row, result) in rows.iter().zip(results) {
            match result {
                Ok(Ok(_)) => acknowledged.push(row.id),
                Ok(Err((e, _))) => {
                    tracing::warn!(error = %e, outbox_id = row.id, "outbox delivery failed");
                    break;
                }
                Err(_) => break,
            }
        }
        if !acknowledged.is_empty() {
            sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
                .bind(&acknowledged)
                .execute(&self.pool)
                .await?;
            for row in rows.iter().take(acknowledged.len()) {
                self.metrics.published.inc(&row.topic);
            }
        }
        if acknowledged.len() < taken {
            return Err(RelayError::Delivery);
        }
        Ok(taken)
    }
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("not every message was acknowledged")]
    Delivery,
}
