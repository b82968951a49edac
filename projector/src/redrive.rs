//! `projector redrive`: re-applies dead letters after a fix (new code or corrected data).

use std::collections::HashSet;

use sqlx::{PgPool, Row};

use crate::config::Config;
use crate::store::{apply_batch, BatchContext, BatchMode, InputRecord};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct RedriveReport {
    /// Dead letters applied now (including those whose event had meanwhile been applied).
    pub applied: Vec<i64>,
    /// Dead letters that still cannot be used; they stay for another try.
    pub still_failing: Vec<i64>,
}

/// Re-applies the pending dead letters with `ids` (all pending ones when empty).
pub async fn redrive(
    pool: &PgPool,
    config: &Config,
    ids: &[i64],
) -> Result<RedriveReport, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, partition, \"offset\", payload FROM dead_letters
         WHERE redriven_at IS NULL AND topic = $1 AND (cardinality($2::int8[]) = 0 OR id = ANY($2))
         ORDER BY partition, \"offset\"",
    )
    .bind(&config.events_topic)
    .bind(ids)
    .fetch_all(pool)
    .await?;
    let mut report = RedriveReport::default();
    if rows.is_empty() {
        return Ok(report);
    }
    let mut records = Vec::with_capacity(rows.len());
    let mut dead_ids = Vec::with_capacity(rows.len());
    for row in rows {
        dead_ids.push(row.try_get::<i64, _>("id")?);
        records.push(InputRecord {
            partition: row.try_get("partition")?,
            offset: row.try_get("offset")?,
            payload: Some(row.try_get("payload")?),
        });
    }
    let no_gaps = HashSet::new();
    let ctx = BatchContext {
        events_topic: &config.events_topic,
        entitlements_topic: &config.entitlements_topic,
        dlq_topic: &config.dlq_topic,
        policy: &config.policy,
        mode: BatchMode::Redrive,
        accept_gaps: &no_gaps,
    };
    let outcome = apply_batch(pool, &ctx, &records).await?;
    let failing: HashSet<(i32, i64)> = outcome.dead_positions.into_iter().collect();
    for (id, record) in dead_ids.into_iter().zip(&records) {
        if failing.contains(&(record.partition, record.offset)) {
            report.still_failing.push(id);
        } else {
            report.applied.push(id);
        }
    }
    sqlx::query("UPDATE dead_letters SET redriven_at = now() WHERE id = ANY($1)")
        .bind(&report.applied)
        .execute(pool)
        .await?;
    Ok(report)
}
