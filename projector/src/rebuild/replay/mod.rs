//! Replaying the log into the fresh schema. The bulk load is set-based, with no per-event round
//! trip, in stages that overlap:
//!
//! 1. [`reader`]: the log, partition by partition, up to live's offsets;
//! 2. [`stage`]: each chunk decoded, coalesced per object and COPYed into unlogged staging tables;
//! 3. [`fold`]: each staging table folded by rank into its projection table;
//! 4. [`derive`]: every customer's entitlements derived from the folded tables.
//!
//! The catch-up after it applies what live applied meanwhile in ordinary rebuild batches.

mod copy_binary;
mod copy_text;
mod derive;
mod fold;
mod indexes;
mod reader;
mod stage;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::projection::payload::project_payload;
use crate::projection::CustomerKey;
use crate::store::{self, apply_batch, BatchContext, InputRecord};

use super::progress::Progress;
use super::{Phases, RebuildError};

pub(super) use reader::LogReader;
use stage::StagedChunk;

/// Records decoded, coalesced and staged at a time. With [`PIPELINE_DEPTH`], [`DECODERS`] and
/// [`COPIES`], bounds the replay's memory whatever the size of the log: at most
/// `2 × PIPELINE_DEPTH + DECODERS + COPIES` chunks (payloads or their COPY rows) at a time.
const CHUNK: usize = 2_500;

/// Chunks waiting between two stages of the bulk load.
const PIPELINE_DEPTH: usize = 1;

/// Threads decoding and coalescing chunks during the bulk load: JSON parsing is the replay's
/// largest cost in the Rust process.
const DECODERS: usize = 1;

/// COPY streams staging chunks at a time, each on its own connection.
const COPIES: usize = 2;

/// Records per catch-up transaction: larger than live batches, nobody waits on them.
const CATCH_UP_BATCH: usize = 5_000;

/// What a replay step applied.
#[derive(Debug, Default)]
pub(super) struct Applied {
    pub records: u64,
    pub dead_letters: u64,
}

/// The bulk load: every record up to `targets`, then the fold and the entitlements. Takes the
/// reader to its own thread for the load and hands it back for the catch-up.
///
/// Three stages overlap, each bounded by a channel of [`PIPELINE_DEPTH`] chunks: a thread reads
/// chunks of the log, [`DECODERS`] threads decode and coalesce them into binary COPY rows, and up to
/// [`COPIES`] COPY streams stage them, each on its own connection.
pub(super) async fn bulk(
    fresh: &PgPool,
    schema: &str,
    reader: LogReader,
    targets: &BTreeMap<i32, i64>,
    config: &Config,
    progress: &mut Progress,
    phases: &mut Phases,
) -> Result<(LogReader, Applied), RebuildError> {
    let started = Instant::now();
    stage::create_tables(fresh).await?;
    let (read_tx, read_rx) = std::sync::mpsc::sync_channel::<Vec<InputRecord>>(PIPELINE_DEPTH);
    let reading = {
        let targets = targets.clone();
        tokio::task::spawn_blocking(move || -> Result<LogReader, RebuildError> {
            let mut reader = reader;
            loop {
                let records = reader.read(&targets, CHUNK)?;
                // Nothing left, or the decoders stopped (the caller reports why).
                if records.is_empty() || read_tx.send(records).is_err() {
                    return Ok(reader);
                }
            }
        })
    };
    let read_rx = Arc::new(Mutex::new(read_rx));
    let (staged_tx, mut staged_rx) = tokio::sync::mpsc::channel::<StagedChunk>(PIPELINE_DEPTH);
    let decoders: Vec<_> = (0..DECODERS)
        .map(|_| {
            let read_rx = Arc::clone(&read_rx);
            let staged_tx = staged_tx.clone();
            tokio::task::spawn_blocking(move || loop {
                // One decoder at a time waits for the next chunk; a poisoned lock means another
                // decoder panicked, and its join reports it.
                let next = match read_rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                let Ok(records) = next else { return };
                let chunk = StagedChunk::encode(&records);
                drop(records);
                if staged_tx.blocking_send(chunk).is_err() {
                    return;
                }
            })
        })
        .collect();
    drop(staged_tx);

    let mut applied = Applied::default();
    let mut copies: JoinSet<Result<(), sqlx::Error>> = JoinSet::new();
    while let Some(chunk) = staged_rx.recv().await {
        applied.records += chunk.records;
        applied.dead_letters += chunk.unusable;
        progress.advance(chunk.records);
        while copies.len() >= COPIES {
            if let Some(copied) = copies.join_next().await {
                copied.map_err(join_error)??;
            }
        }
        copies.spawn(chunk.copy(fresh.clone()));
    }
    while let Some(copied) = copies.join_next().await {
        copied.map_err(join_error)??;
    }
    for decoder in decoders {
        decoder.await.map_err(join_error)?;
    }
    let reader = reading.await.map_err(join_error)??;
    phases.replay_secs = started.elapsed().as_secs_f64();

    let started = Instant::now();
    fold::fold(fresh, schema).await?;
    let positions: Vec<(i32, i64)> = reader.positions().iter().map(|(p, o)| (*p, *o)).collect();
    sqlx::query(
        "INSERT INTO consumer_offsets (topic, partition, next_offset)
         SELECT $1, p, o FROM UNNEST($2::int4[], $3::int8[]) AS u(p, o)",
    )
    .bind(&config.events_topic)
    .bind(positions.iter().map(|(p, _)| *p).collect::<Vec<_>>())
    .bind(positions.iter().map(|(_, o)| *o).collect::<Vec<_>>())
    .execute(fresh)
    .await?;
    phases.fold_secs = started.elapsed().as_secs_f64();

    let started = Instant::now();
    derive::derive_entitlements(fresh, schema, &config.policy).await?;
    phases.derive_secs = started.elapsed().as_secs_f64();
    Ok((reader, applied))
}

fn join_error(e: tokio::task::JoinError) -> RebuildError {
    RebuildError::Database(sqlx::Error::Protocol(format!("staging task failed: {e}")))
}

/// Applies records up to `targets` in ordinary rebuild batches (incremental upserts under the
/// rank rule, touched customers recomputed). With `touched`, also collects the customers the
/// records concern, for the reconcile under the lock.
pub(super) async fn catch_up(
    fresh: &PgPool,
    ctx: &BatchContext<'_>,
    reader: &mut LogReader,
    targets: &BTreeMap<i32, i64>,
    progress: &mut Progress,
    mut touched: Option<&mut Vec<CustomerKey>>,
) -> Result<Applied, RebuildError> {
    let mut applied = Applied::default();
    loop {
        let records = reader.read(targets, CATCH_UP_BATCH)?;
        if records.is_empty() {
            return Ok(applied);
        }
        if let Some(touched) = touched.as_deref_mut() {
            touched.extend(records.iter().filter_map(customer_of));
        }
        let outcome = apply_with_retry(fresh, ctx, &records).await?;
        if !outcome.gaps.is_empty() {
            return Err(RebuildError::OutOfOrder(outcome.gaps));
        }
        applied.records += records.len() as u64;
        applied.dead_letters += outcome.dead_letters;
        progress.advance(records.len() as u64);
    }
}

/// The customer a record's event concerns, when it projects to a snapshot of one.
fn customer_of(record: &InputRecord) -> Option<CustomerKey> {
    let event = project_payload(record.payload.as_deref()?).ok()?;
    event.snapshot.as_ref()?;
    Some(CustomerKey {
        account: event.account,
        customer: event.customer?,
    })
}

async fn apply_with_retry(
    pool: &PgPool,
    ctx: &BatchContext<'_>,
    records: &[InputRecord],
) -> Result<store::BatchOutcome, RebuildError> {
    /// A rebuild is not the live path: after this many failures it stops and says why.
    const ATTEMPTS: u32 = 8;
    let mut backoff = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match apply_batch(pool, ctx, records).await {
            Ok(outcome) => return Ok(outcome),
            Err(e) if attempt < ATTEMPTS => {
                tracing::warn!(error = %e, attempt, "rebuild batch failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}
