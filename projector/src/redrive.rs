//! `projector redrive`: re-applies dead letters after a fix (new code or corrected data).

use std::collections::HashSet;

use sqlx::PgPool;
use tokio::sync::watch;

use crate::config::Config;
use crate::isolation::apply_isolating;
use crate::metrics::Metrics;
use crate::store::{BatchContext, BatchMode, DecodedRecord, InputRecord};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct RedriveReport {
    /// Dead letters applied now (including those whose event had meanwhile been applied).
    pub applied: Vec<i64>,
    /// Dead letters that still cannot be used; they stay for another try.
    pub still_failing: Vec<i64>,
}

/// A pending dead letter, as stored.
#[derive(sqlx::FromRow)]
struct PendingDeadLetter {
    id: i64,
    partition: i32,
    offset: i64,
    payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    #[error("postgres: {0}")]
    Database(#[from] sqlx::Error),
    #[error("interrupted while retrying; nothing after the last committed part was applied")]
    Interrupted,
}

/// Re-applies the pending dead letters with `ids` (all pending ones when empty).
///
/// One batch, applied like a live one: it waits while a rebuild swaps (the shared rebuild
/// lock) and takes each customer's lock before reading their state, so a redrive racing the
/// live projector on the same customers commits wholly before or after each live batch. Like a
/// live batch it goes through [`apply_isolating`]: a record Postgres still refuses is found by
/// bisection and stays a pending dead letter (its reason and SQLSTATE updated), and every other
/// one is applied. Transient failures are retried with capped backoff until `shutdown` fires.
pub async fn redrive(
    pool: &PgPool,
    config: &Config,
    ids: &[i64],
    shutdown: &mut watch::Receiver<bool>,
) -> Result<RedriveReport, RedriveError> {
    let pending: Vec<PendingDeadLetter> = sqlx::query_as(
        "SELECT id, partition, \"offset\", payload FROM dead_letters
         WHERE redriven_at IS NULL AND topic = $1 AND (cardinality($2::int8[]) = 0 OR id = ANY($2))
         ORDER BY partition, \"offset\"",
    )
    .bind(&config.events_topic)
    .bind(ids)
    .fetch_all(pool)
    .await?;
    let mut report = RedriveReport::default();
    if pending.is_empty() {
        return Ok(report);
    }
    let records: Vec<DecodedRecord> = pending
        .iter()
        .map(|dead| {
            DecodedRecord::new(InputRecord {
                partition: dead.partition,
                offset: dead.offset,
                payload: Some(dead.payload.clone()),
            })
        })
        .collect();
    let no_gaps = HashSet::new();
    let ctx = BatchContext {
        events_topic: &config.events_topic,
        entitlements_topic: &config.entitlements_topic,
        dlq_topic: &config.dlq_topic,
        policy: &config.policy,
        mode: BatchMode::Redrive,
        accept_gaps: &no_gaps,
    };
    // A one-off command: its counters are not served anywhere.
    let metrics = Metrics::default();
    let outcome = apply_isolating(pool, &ctx, &records, &metrics, shutdown)
        .await
        .ok_or(RedriveError::Interrupted)?;
    let failing: HashSet<(i32, i64)> = outcome.dead_positions.into_iter().collect();
    for dead in &pending {
        if failing.contains(&(dead.partition, dead.offset)) {
            report.still_failing.push(dead.id);
        } else {
            report.applied.push(dead.id);
        }
    }
    sqlx::query("UPDATE dead_letters SET redriven_at = now() WHERE id = ANY($1)")
        .bind(&report.applied)
        .execute(pool)
        .await?;
    Ok(report)
}
