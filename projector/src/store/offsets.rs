//! `consumer_offsets`: the next offset to apply per partition, written in the same transaction
//! as the projection writes it covers. The truth for where to resume; Kafka's commits only show
//! lag.

use std::collections::{BTreeMap, HashMap};

use sqlx::{Postgres, Transaction};

use super::InputRecord;

/// One partition's stored progress.
#[derive(Debug, sqlx::FromRow)]
struct StoredOffset {
    partition: i32,
    next_offset: i64,
}

/// Locks the stored offsets of the partitions in `records` (creating them at 0 the first time),
/// so that two projectors racing over a rebalance serialise here; returns them.
pub(super) async fn lock_offsets(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    records: &[&InputRecord],
) -> Result<HashMap<i32, i64>, sqlx::Error> {
    let mut partitions: Vec<i32> = records.iter().map(|r| r.partition).collect();
    partitions.sort_unstable();
    partitions.dedup();
    let select = "SELECT partition, next_offset FROM consumer_offsets WHERE topic = $1 AND partition = ANY($2)
         ORDER BY partition FOR UPDATE";
    let mut rows: Vec<StoredOffset> = sqlx::query_as(select)
        .bind(topic)
        .bind(&partitions)
        .fetch_all(&mut **tx)
        .await?;
    // A partition's row is created once in its life: only then a second round trip.
    if rows.len() < partitions.len() {
        sqlx::query(
            "INSERT INTO consumer_offsets (topic, partition, next_offset) SELECT $1, p, 0 FROM UNNEST($2::int4[]) AS p
             ON CONFLICT DO NOTHING",
        )
        .bind(topic)
        .bind(&partitions)
        .execute(&mut **tx)
        .await?;
        rows = sqlx::query_as(select)
            .bind(topic)
            .bind(&partitions)
            .fetch_all(&mut **tx)
            .await?;
    }
    Ok(rows
        .into_iter()
        .map(|row| (row.partition, row.next_offset))
        .collect())
}

/// Moves each partition's stored offset forward to `next` (never back), and wakes the outbox
/// relay when `notify`: one round trip for the end of every batch.
pub(super) async fn advance_offsets(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    next: &BTreeMap<i32, i64>,
    notify: bool,
) -> Result<(), sqlx::Error> {
    let partitions: Vec<i32> = next.keys().copied().collect();
    let offsets: Vec<i64> = next.values().copied().collect();
    // A data-modifying WITH runs to completion whether or not the outer query reads it.
    sqlx::query(
        "WITH moved AS (
             UPDATE consumer_offsets o SET next_offset = GREATEST(o.next_offset, n.next_offset)
             FROM UNNEST($2::int4[], $3::int8[]) AS n(partition, next_offset)
             WHERE o.topic = $1 AND o.partition = n.partition)
         SELECT CASE WHEN $4 THEN pg_notify('outbox', '') END",
    )
    .bind(topic)
    .bind(&partitions)
    .bind(&offsets)
    .bind(notify)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
