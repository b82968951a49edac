//! One batch of consumed records → one Postgres transaction, in this order: progress lock,
//! decode, dedupe, customer locks, projection upserts, entitlement recomputation with outbox
//! rows, dead letters, and the consumed offsets. The order and what each [`BatchMode`] writes
//! live here; each table's statements live in the module named after it.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

use sqlx::PgPool;

use shared::Cause;

use crate::projection::{coalesce, CustomerKey, EntitlementPolicy, ProjectedEvent};

use super::dead_letters::{write_dead_letters, DeadLetter};
use super::decode::{BatchRecord, Decoded};
use super::entitlements::write_entitlement_changes;
use super::locks::lock_customers;
use super::objects::{mark_deleted, upsert_objects};
use super::offsets::{advance_offsets, lock_offsets};
use super::{dedupe, InputRecord};

/// Who applies the batch, which decides what it writes besides the projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchMode {
    /// `projector run`: offsets, change messages and dead letters to the outbox; pauses while a
    /// rebuild swaps (shared side of the rebuild lock).
    Live,
    /// `projector rebuild` into a fresh schema: offsets, but no messages (history is not
    /// re-announced; the swap emits the net differences).
    Rebuild,
    /// `projector redrive`: dead letters re-applied outside the log's order; change messages,
    /// no offsets, no second trip to the DLQ topic.
    Redrive,
}

impl BatchMode {
    pub(super) fn tracks_offsets(self) -> bool {
        matches!(self, BatchMode::Live | BatchMode::Rebuild)
    }

    pub(super) fn emits(self) -> bool {
        matches!(self, BatchMode::Live | BatchMode::Redrive)
    }

    /// Whether the batch writes the live tables, which others write concurrently: it then takes
    /// the rebuild lock shared (to wait while a rebuild swaps them) and the customers' locks.
    /// A rebuild's own batches write a schema nobody else writes.
    fn writes_live_tables(self) -> bool {
        matches!(self, BatchMode::Live | BatchMode::Redrive)
    }
}

/// Key of the advisory lock that a rebuild holds exclusively while it swaps; live batches and
/// redrives take it shared, so they pause between batches and resume on the swapped tables.
pub const REBUILD_LOCK: i64 = 0x5354_5249_5045_0001;

/// What a batch needs besides its records.
pub struct BatchContext<'a> {
    pub events_topic: &'a str,
    pub entitlements_topic: &'a str,
    pub dlq_topic: &'a str,
    pub policy: &'a EntitlementPolicy,
    pub mode: BatchMode,
    /// Partitions where a gap between the stored offset and the first record is accepted:
    /// the consumer already sought back once and the log starts later.
    pub accept_gaps: &'a HashSet<i32>,
}

#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// New events by type (handled or not).
    pub events_by_type: BTreeMap<String, u64>,
    /// New events whose type the projection ignores, by type.
    pub ignored: BTreeMap<String, u64>,
    /// New thin events, by type: kept in the log, never projected and never dead letters.
    pub thin: BTreeMap<String, u64>,
    /// Records skipped because their event id was applied before.
    pub duplicates: u64,
    /// Records below the stored offset (re-deliveries after a rebalance or restart).
    pub replayed: u64,
    pub dead_letters: u64,
    /// The same records by their stable reason code (`dead_letters.reason`, the DLQ's
    /// `dlq-reason`), for `projector_dead_letters_total{reason}`.
    pub dead_letter_reasons: BTreeMap<&'static str, u64>,
    /// Change messages written to the outbox.
    pub changes: u64,
    /// Partitions whose stored offset is ahead of this batch's first record: the consumer must
    /// seek there. Their records were not applied.
    pub gaps: Vec<(i32, i64)>,
    /// Next offset per partition after this batch, for the (informational) Kafka commit.
    pub next_offsets: Vec<(i32, i64)>,
    /// Event ids applied, in batch order (redrive reports them).
    pub applied_ids: Vec<String>,
    /// (partition, offset) of the records that became dead letters.
    pub dead_positions: Vec<(i32, i64)>,
}

/// Applies `records` (one partition's records in offset order; several partitions allowed) in
/// one transaction. Records may come decoded already ([`super::DecodedRecord`]).
pub async fn apply_batch<R: BatchRecord>(
    pool: &PgPool,
    ctx: &BatchContext<'_>,
    records: &[R],
) -> Result<BatchOutcome, sqlx::Error> {
    let mut outcome = BatchOutcome::default();
    let mut tx = pool.begin().await?;
    if ctx.mode.writes_live_tables() {
        // A statement of its own: the next statement's snapshot is then taken after a swap
        // this waited for, so it reads the swapped tables.
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(REBUILD_LOCK)
            .execute(&mut *tx)
            .await?;
    }

    // 1. Progress: lock this batch's partitions' offsets, so that two projectors racing over
    //    a rebalance serialise here, and drop what was applied already.
    let records: Vec<&R> = if ctx.mode.tracks_offsets() {
        let positions: Vec<&InputRecord> = records.iter().map(BatchRecord::record).collect();
        let stored = lock_offsets(&mut tx, ctx.events_topic, &positions).await?;
        let mut first_seen: HashMap<i32, i64> = HashMap::new();
        let mut keep = Vec::with_capacity(records.len());
        for record in records {
            let position = record.record();
            let next = stored.get(&position.partition).copied().unwrap_or(0);
            let first = *first_seen
                .entry(position.partition)
                .or_insert(position.offset);
            if position.offset < next {
                outcome.replayed += 1;
            } else if first > next && !ctx.accept_gaps.contains(&position.partition) {
                if !outcome.gaps.iter().any(|(p, _)| *p == position.partition) {
                    outcome.gaps.push((position.partition, next));
                }
            } else {
                keep.push(record);
            }
        }
        keep
    } else {
        records.iter().collect()
    };

    // 2. Decode (done ahead by the consumer, and then borrowed, not copied); what cannot be
    //    used becomes a dead letter.
    let decoded: Vec<(&InputRecord, Cow<'_, Decoded>)> = records
        .iter()
        .map(|record| (record.record(), record.decoded()))
        .collect();
    let mut projected: Vec<&ProjectedEvent> = Vec::with_capacity(decoded.len());
    let mut dead: Vec<DeadLetter<'_>> = Vec::new();
    for (record, decoded) in &decoded {
        match decoded.as_ref() {
            Decoded::Event(event) => projected.push(event),
            Decoded::Rejected(rejection) => dead.push(DeadLetter {
                record,
                event_id: rejection.event_id.clone(),
                event_type: rejection.event_type.clone(),
                reason: rejection.reason,
                message: rejection.message.clone(),
                sqlstate: None,
            }),
        }
    }

    // 3. Dedupe by event id: within the batch, then against everything applied before.
    let mut seen = HashSet::new();
    projected.retain(|event| {
        let first = seen.insert(event.event_id.as_str());
        if !first {
            outcome.duplicates += 1;
        }
        first
    });
    let ids: Vec<&str> = projected.iter().map(|e| e.event_id.as_str()).collect();
    let fresh = dedupe::claim_fresh(&mut tx, &ids).await?;
    let before = projected.len();
    projected.retain(|event| fresh.contains(&event.event_id));
    outcome.duplicates += (before - projected.len()) as u64;

    // 4. The cause of each customer's change: their last new event in this batch.
    let mut causes: HashMap<CustomerKey, Cause> = HashMap::new();
    for event in &projected {
        *outcome
            .events_by_type
            .entry(event.event_type.clone())
            .or_default() += 1;
        outcome.applied_ids.push(event.event_id.clone());
        if event.thin {
            *outcome.thin.entry(event.event_type.clone()).or_default() += 1;
            continue;
        }
        if event.snapshot.is_none() {
            *outcome.ignored.entry(event.event_type.clone()).or_default() += 1;
            continue;
        }
        if let Some(customer) = &event.customer {
            let key = CustomerKey {
                account: event.account.clone(),
                customer: customer.clone(),
            };
            causes.insert(key, Cause::event(&event.event_id, &event.event_type));
        }
    }

    // 5. Lock every touched customer before anything of theirs is written or read, so that a
    //    concurrent batch or redrive of the same customer commits entirely before or after
    //    this one. Then upsert the newest snapshot per object, guarded by rank in SQL as well.
    let batch = coalesce(projected.iter().copied());
    if ctx.mode.writes_live_tables() {
        lock_customers(&mut tx, batch.customers.keys()).await?;
    }
    let won = upsert_objects(&mut tx, &batch).await?;
    let mut deleted: Vec<&CustomerKey> = batch
        .customers
        .iter()
        .filter(|(_, t)| t.deleted)
        .map(|(k, _)| k)
        .collect();
    deleted.sort_unstable();
    mark_deleted(&mut tx, &deleted).await?;

    // 6. Recompute the touched customers' entitlements; a change gets a version and a message.
    outcome.changes = write_entitlement_changes(&mut tx, ctx, &batch, &won, &causes).await?;

    // 7. Dead letters: kept in a table for redrive and published to the DLQ topic.
    outcome.dead_letters = dead.len() as u64;
    for letter in &dead {
        *outcome
            .dead_letter_reasons
            .entry(letter.reason)
            .or_default() += 1;
    }
    outcome.dead_positions = dead
        .iter()
        .map(|d| (d.record.partition, d.record.offset))
        .collect();
    if !dead.is_empty() {
        write_dead_letters(&mut tx, ctx, &dead).await?;
    }

    // 8. Progress, in the same transaction as everything it covers; the relay is woken only
    //    when this batch wrote outbox rows (a rebuild writes none).
    let notify = ctx.mode.emits() && (outcome.changes > 0 || outcome.dead_letters > 0);
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    if ctx.mode.tracks_offsets() {
        for record in &records {
            let position = record.record();
            let entry = next
                .entry(position.partition)
                .or_insert(position.offset + 1);
            *entry = (*entry).max(position.offset + 1);
        }
    }
    if !next.is_empty() || notify {
        advance_offsets(&mut tx, ctx.events_topic, &next, notify).await?;
    }
    outcome.next_offsets = next.into_iter().collect();
    tx.commit().await?;
    Ok(outcome)
}
