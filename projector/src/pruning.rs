//! The periodic task that keeps `processed_events` within the redelivery window.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;

use crate::store::prune_processed_events;

/// Rows deleted per statement: small enough that one batch holds its locks for milliseconds
/// and never competes with the consumer's transactions for long.
pub const PRUNE_BATCH_ROWS: i64 = 5_000;

/// Every `interval`, deletes the ids older than `window`, batch by batch, until none is left.
pub async fn prune_periodically(
    pool: PgPool,
    window: Duration,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let mut total = 0u64;
        loop {
            match prune_processed_events(&pool, window, PRUNE_BATCH_ROWS).await {
                Ok(deleted) => {
                    total += deleted;
                    if deleted < PRUNE_BATCH_ROWS as u64 || *shutdown.borrow() {
                        break;
                    }
                }
                Err(e) => {
                    // The next round tries again; nothing depends on pruning promptly.
                    tracing::warn!(error = %e, "pruning processed_events failed");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(
                deleted = total,
                window_secs = window.as_secs(),
                "pruned processed_events beyond the dedupe window"
            );
        }
    }
}
