//! A record Postgres refused, written as a dead letter in a transaction of its own, so that its
//! partition flows on and every other record of its batch is applied.

use shared::EventEnvelope;
use sqlx::PgPool;

use super::dead_letters::{write_dead_letters, DeadLetter};
use super::error::DataError;
use super::offsets::{advance_offsets, lock_offsets};
use super::text::storable_json;
use super::{BatchContext, BatchMode, BatchOutcome, InputRecord, REBUILD_LOCK};

/// Reason code of a dead letter whose record Postgres refused; the SQLSTATE and Postgres'
/// message come with it.
pub const DATABASE_REJECTED: &str = "database_rejected";

/// Dead-letters `record` with `error`, and moves its partition's stored offset past it. A record
/// already behind the stored offset (another instance got there first) is only counted as
/// replayed; one ahead of it is reported as a gap, as by `apply_batch`.
pub async fn dead_letter_rejected(
    pool: &PgPool,
    ctx: &BatchContext<'_>,
    record: &InputRecord,
    error: &DataError,
) -> Result<BatchOutcome, sqlx::Error> {
    let mut outcome = BatchOutcome::default();
    let mut tx = pool.begin().await?;
    if ctx.mode == BatchMode::Live {
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(REBUILD_LOCK)
            .execute(&mut *tx)
            .await?;
    }
    if ctx.mode.tracks_offsets() {
        let stored = lock_offsets(&mut tx, ctx.events_topic, &[record]).await?;
        let next = stored.get(&record.partition).copied().unwrap_or(0);
        if record.offset < next {
            outcome.replayed = 1;
            return Ok(outcome);
        }
        if record.offset > next && !ctx.accept_gaps.contains(&record.partition) {
            outcome.gaps.push((record.partition, next));
            return Ok(outcome);
        }
    }
    let envelope = record.payload.as_deref().map(storable_json);
    let envelope = envelope
        .as_deref()
        .and_then(|bytes| EventEnvelope::parse(bytes).ok());
    let dead = DeadLetter {
        record,
        event_id: envelope.as_ref().map(|e| e.id.to_owned()),
        event_type: envelope.as_ref().map(|e| e.event_type.to_owned()),
        reason: DATABASE_REJECTED,
        message: error.describe(),
        sqlstate: error.sqlstate.clone(),
    };
    write_dead_letters(&mut tx, ctx, std::slice::from_ref(&dead)).await?;
    let mut next = std::collections::BTreeMap::new();
    if ctx.mode.tracks_offsets() {
        next.insert(record.partition, record.offset + 1);
    }
    let notify = ctx.mode == BatchMode::Live;
    if !next.is_empty() || notify {
        advance_offsets(&mut tx, ctx.events_topic, &next, notify).await?;
    }
    outcome.next_offsets = next.into_iter().collect();
    tx.commit().await?;
    outcome.dead_letters = 1;
    outcome.dead_letter_reasons.insert(DATABASE_REJECTED, 1);
    outcome.dead_positions = vec![(record.partition, record.offset)];
    Ok(outcome)
}
