//! The event-id dedupe table, bounded: ids older than the redelivery window are deleted.
//!
//! Forgetting an id is safe because dedupe is only the first guard. An event applied again
//! after its id was pruned carries the same rank as the snapshot it put in place (or a lower
//! one, when a later event has replaced it), and every upsert requires a strictly greater
//! rank, so re-applying it changes no row, and the recomputed entitlements equal the stored
//! ones, so no change message is written.

use std::time::Duration;

use sqlx::PgPool;

/// Deletes up to `limit` ids processed more than `window` ago, oldest first; returns how many.
/// `SKIP LOCKED` lets several instances prune at once without waiting on one another.
pub async fn prune_processed_events(
    pool: &PgPool,
    window: Duration,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let window_secs = i64::try_from(window.as_secs()).unwrap_or(i64::MAX);
    let deleted = sqlx::query(
        "DELETE FROM processed_events WHERE event_id IN (
             SELECT event_id FROM processed_events
             WHERE processed_at < now() - make_interval(secs => $1)
             ORDER BY processed_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind(window_secs as f64)
    .bind(limit)
    .execute(pool)
    .await?;
    Ok(deleted.rows_affected())
}
