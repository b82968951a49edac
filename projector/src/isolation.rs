//! Applying a batch so that no record can stop the others: transient failures are retried
//! with capped backoff and skip nothing; a record whose data Postgres refuses is found by
//! bisecting the batch and becomes a dead letter, and the rest of the batch is applied.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::store::error::{classify, DataError, Failure};
use crate::store::{
    apply_batch, dead_letter_rejected, BatchContext, BatchOutcome, DecodedRecord, InputRecord,
};

/// Retries of a failing transaction back off up to this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Applies `records` (per partition in offset order). `None` when `shutdown` arrives while
/// waiting to retry; everything committed until then stays committed, and the stored offsets
/// say where to resume.
///
/// Halves are applied in order, first before second, so each partition's records still commit
/// in offset order. A batch with one bad record among n costs about 2·log2(n) extra
/// transactions, paid only when a record is bad.
pub async fn apply_isolating(
    pool: &PgPool,
    ctx: &BatchContext<'_>,
    records: &[DecodedRecord],
    metrics: &Metrics,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<BatchOutcome> {
    let mut total = BatchOutcome::default();
    // Slices still to apply, the next one last.
    let mut pending: Vec<&[DecodedRecord]> = vec![records];
    let mut backoff = FIRST_BACKOFF;
    while let Some(slice) = pending.pop() {
        if slice.is_empty() {
            continue;
        }
        let span = tracing::info_span!(
            "batch",
            records = slice.len(),
            first_partition = slice[0].partition,
            first_offset = slice[0].offset
        );
        let error = match apply_batch(pool, ctx, slice).instrument(span.clone()).await {
            Ok(outcome) => {
                total.absorb(outcome);
                backoff = FIRST_BACKOFF;
                continue;
            }
            Err(e) => e,
        };
        match classify(&error) {
            Failure::Transient => {
                metrics.batch_failures.inc("transient");
                span.in_scope(|| {
                    tracing::error!(error = %error, retry_in_ms = backoff.as_millis() as u64, "batch failed; retrying");
                });
                pending.push(slice);
                wait(&mut backoff, shutdown).await?;
            }
            Failure::Data(data) if slice.len() > 1 => {
                metrics.batch_failures.inc("data");
                span.in_scope(|| {
                    tracing::warn!(error = %data.describe(), "a record was refused; bisecting the batch to find it");
                });
                let (first, second) = slice.split_at(slice.len() / 2);
                pending.push(second);
                pending.push(first);
            }
            Failure::Data(data) => {
                metrics.batch_failures.inc("data");
                let outcome =
                    dead_letter_with_retry(pool, ctx, &slice[0], &data, &mut backoff, shutdown)
                        .instrument(span)
                        .await?;
                total.absorb(outcome);
            }
        }
    }
    Some(total)
}

async fn dead_letter_with_retry(
    pool: &PgPool,
    ctx: &BatchContext<'_>,
    record: &InputRecord,
    data: &DataError,
    backoff: &mut Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<BatchOutcome> {
    loop {
        match dead_letter_rejected(pool, ctx, record, data).await {
            Ok(outcome) => return Some(outcome),
            // Even a refused dead letter is retried: the record must not be skipped unrecorded.
            Err(e) => {
                tracing::error!(error = %e, partition = record.partition, offset = record.offset,
                    retry_in_ms = backoff.as_millis() as u64, "writing the dead letter failed; retrying");
                wait(backoff, shutdown).await?;
            }
        }
    }
}

/// Sleeps `backoff` (then doubles it up to `MAX_BACKOFF`); `None` if shutdown comes first.
async fn wait(backoff: &mut Duration, shutdown: &mut watch::Receiver<bool>) -> Option<()> {
    tokio::select! {
        _ = shutdown.changed() => return None,
        _ = tokio::time::sleep(*backoff) => {}
    }
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    Some(())
}

impl BatchOutcome {
    /// Adds what a later part of the same batch did.
    pub fn absorb(&mut self, other: BatchOutcome) {
        // Destructured whole, so that a new field of the outcome cannot be forgotten here.
        let BatchOutcome {
            events_by_type,
            ignored,
            thin,
            duplicates,
            replayed,
            dead_letters,
            dead_letter_reasons,
            changes,
            gaps,
            next_offsets,
            applied_ids,
            dead_positions,
        } = other;
        for (counts, more) in [
            (&mut self.events_by_type, events_by_type),
            (&mut self.ignored, ignored),
            (&mut self.thin, thin),
        ] {
            for (event_type, n) in more {
                *counts.entry(event_type).or_default() += n;
            }
        }
        self.duplicates += duplicates;
        self.replayed += replayed;
        self.dead_letters += dead_letters;
        for (reason, n) in dead_letter_reasons {
            *self.dead_letter_reasons.entry(reason).or_default() += n;
        }
        self.changes += changes;
        for (partition, next) in gaps {
            if !self.gaps.iter().any(|(p, _)| *p == partition) {
                self.gaps.push((partition, next));
            }
        }
        for (partition, next) in next_offsets {
            match self.next_offsets.iter_mut().find(|(p, _)| *p == partition) {
                Some((_, stored)) => *stored = (*stored).max(next),
                None => self.next_offsets.push((partition, next)),
            }
        }
        self.applied_ids.extend(applied_ids);
        self.dead_positions.extend(dead_positions);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absorbing_sums_counts_and_keeps_the_furthest_offset_per_partition() {
        let mut total = BatchOutcome {
            duplicates: 1,
            next_offsets: vec![(0, 5), (1, 3)],
            gaps: vec![(2, 7)],
            ..Default::default()
        };
        total.events_by_type.insert("invoice.paid".into(), 2);
        let mut later = BatchOutcome {
            duplicates: 2,
            dead_letters: 1,
            next_offsets: vec![(0, 9), (2, 1)],
            gaps: vec![(2, 7)],
            dead_positions: vec![(0, 8)],
            ..Default::default()
        };
        later.events_by_type.insert("invoice.paid".into(), 3);
        total.dead_letter_reasons.insert("empty_record", 2);
        later.dead_letter_reasons.insert("database_rejected", 1);
        later.dead_letter_reasons.insert("empty_record", 1);

        total.absorb(later);

        assert_eq!(total.duplicates, 3);
        assert_eq!(total.dead_letters, 1);
        assert_eq!(
            total.dead_letter_reasons,
            [("database_rejected", 1), ("empty_record", 3)].into()
        );
        assert_eq!(total.events_by_type["invoice.paid"], 5);
        assert_eq!(total.next_offsets, [(0, 9), (1, 3), (2, 1)]);
        assert_eq!(total.gaps, [(2, 7)]);
        assert_eq!(total.dead_positions, [(0, 8)]);
    }
}
