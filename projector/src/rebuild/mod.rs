//! `projector rebuild`: replays `stripe.events` from offset 0 into a fresh schema while the live
//! projector keeps serving, then swaps by renaming and announces only the net differences.
//!
//! 1. [`replay`], bulk: every partition from its beginning up to the offsets live has applied,
//!    read, decoded and coalesced per chunk and COPYed into unlogged staging tables by
//!    overlapping stages, folded by rank once per table (tables concurrently, indexes built
//!    after the load) and the entitlements derived per customer at the end. No lock.
//! 2. [`replay`], catch-up: what live applied meanwhile, in ordinary rebuild batches, round
//!    after round until what remains takes under [`LOCK_BUDGET`] to apply. No lock.
//! 3. [`diff`], reconcile: versions carried over from a copy of live's entitlements and every
//!    changed customer's message built, so that under the lock only what moved during the last
//!    stretch is redone.
//! 4. Under the rebuild lock (live pauses between batches): the last stretch up to exactly
//!    live's offsets, the customers it touched reconciled, the net differences moved into the
//!    outbox at `old.version + 1` in one statement, and [`swap`] renames the tables in constant
//!    time.
//! 5. The retired tables and the scaffolding are dropped after the lock is released.
//!
//! Dead letters, their redrive state, `processed_events`, the outbox and the consumer offsets
//! stay as live has them: the rebuild reaches exactly live's offsets, and the rank maximum
//! makes re-applying an event a no-op, so none of them needs rebuilding.

mod diff;
mod progress;
mod replay;
mod swap;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Acquire, PgPool};

use crate::config::Config;
use crate::projection::CustomerKey;
use crate::store::{self, BatchContext, BatchMode, REBUILD_LOCK};

use progress::Progress;
use replay::LogReader;

/// Every schema a rebuild creates starts with this.
const SCHEMA_PREFIX: &str = "rebuild_";

/// The rebuild takes the lock once it expects to apply what remains within this (at the rate
/// its last catch-up round reached), so that live pauses well under the 2 s target (issue 10).
const LOCK_BUDGET: Duration = Duration::from_millis(250);

/// Records still to apply at which the rebuild takes the lock whatever its rate.
const LOCK_LAG: i64 = 50;

/// Catch-up rounds before the rebuild takes the lock whatever the lag: live keeps appending, and
/// a log that grows faster than a rebuild applies must still end.
const MAX_CATCH_UP_ROUNDS: usize = 20;

/// Differences kept for the report; the rest are counted (the outbox gets them all).
const MAX_REPORTED: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("another rebuild is running on this database")]
    AlreadyRunning,
    #[error("topic {0} has no partitions (does it exist?)")]
    NoPartitions(String),
    #[error("no record from Kafka for {secs} s while partition {partition} has more up to offset {target}")]
    Stalled {
        partition: i32,
        target: i64,
        secs: u64,
    },
    #[error("offsets out of order while replaying: {0:?}")]
    OutOfOrder(Vec<(i32, i64)>),
    #[error("encoding a change message: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("a rebuilt customer's version was not reconciled: {0}")]
    Unreconciled(String),
}

/// One customer whose entitlement object differs between the live and the rebuilt projection.
#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    pub account: Option<String>,
    pub customer: String,
    /// `None` when live did not know the customer.
    pub features_before: Option<Vec<String>>,
    pub features_after: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// The version the swap gives it (and its message carries).
    pub version: i64,
}

/// Seconds spent per phase.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Phases {
    /// Reading, decoding and staging the log (bulk).
    pub replay_secs: f64,
    /// Folding the staged snapshots by rank into the fresh tables.
    pub fold_secs: f64,
    /// Deriving every customer's entitlements.
    pub derive_secs: f64,
    /// Catch-up rounds, without the lock.
    pub catch_up_secs: f64,
    /// Carrying versions over from live, without the lock.
    pub reconcile_secs: f64,
    /// The last stretch, the diff, the outbox and the swap, under the lock.
    pub locked_secs: f64,
    /// Of which: applying the last stretch.
    pub locked_apply_secs: f64,
    /// Of which: reconciling the customers that moved since the carry-over.
    pub locked_reconcile_secs: f64,
    /// Of which: streaming the differences into the outbox.
    pub locked_outbox_secs: f64,
    /// Of which: renaming the tables and committing.
    pub locked_swap_secs: f64,
}

/// What `projector rebuild` did; `--json` prints it as is.
#[derive(Debug, Serialize)]
pub struct RebuildReport {
    pub swapped: bool,
    /// Records replayed (every record up to live's offsets).
    pub events: u64,
    pub seconds: f64,
    pub events_per_sec: f64,
    /// Records the replay could not use; live holds them as dead letters already.
    pub dead_letters: u64,
    /// Customers whose entitlements changed (each got one message when swapped).
    pub changed: u64,
    /// The first [`MAX_REPORTED`] of them.
    pub differences: Vec<Difference>,
    pub differences_truncated: bool,
    /// How long live was paused: the exclusive rebuild lock's hold time.
    pub lock_held_ms: f64,
    /// Records applied under the lock.
    pub locked_events: u64,
    pub catch_up_rounds: usize,
    /// Leftover schemas of interrupted rebuilds removed at the start.
    pub leftovers_removed: Vec<String>,
    pub phases: Phases,
    /// The process's peak resident set size, from `/proc/self/status` (Linux; 0 elsewhere).
    pub peak_rss_kib: u64,
}

/// What the caller asks of a rebuild.
#[derive(Debug, Clone, Copy, Default)]
pub struct RebuildOptions {
    /// Report the differences, swap nothing, publish nothing.
    pub dry_run: bool,
}

pub async fn rebuild(
    config: &Config,
    options: RebuildOptions,
) -> Result<RebuildReport, RebuildError> {
    let started = Instant::now();
    let live = store::connect(&config.database_url, 4).await?;
    store::migrate(&live).await?;
    // The session that holds the rebuild's locks and runs the swap.
    let mut control = live.acquire().await?.detach();
    let running: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(crate::store::REBUILD_RUNNING_LOCK)
        .fetch_one(&mut control)
        .await?;
    if !running {
        return Err(RebuildError::AlreadyRunning);
    }
    let leftovers_removed = swap::drop_leftovers(&mut control, SCHEMA_PREFIX).await?;
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let fresh_schema = format!("{SCHEMA_PREFIX}{unix_ms}");
    let retired_schema = format!("{SCHEMA_PREFIX}retired_{unix_ms}");
    sqlx::query(&format!("CREATE SCHEMA {fresh_schema}"))
        .execute(&mut control)
        .await?;
    let result = rebuild_into(
        config,
        &live,
        &mut control,
        &fresh_schema,
        &retired_schema,
        options,
    )
    .await;
    // Scaffolding either way: after a swap the fresh schema holds only staging tables and the
    // retired one live's old tables.
    for schema in [&fresh_schema, &retired_schema] {
        if let Err(e) = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(&mut control)
            .await
        {
            tracing::warn!(schema, error = %e, "could not drop a rebuild schema; the next rebuild will");
        }
    }
    let mut report = result?;
    report.leftovers_removed = leftovers_removed;
    report.seconds = started.elapsed().as_secs_f64();
    report.events_per_sec = if report.seconds > 0.0 {
        report.events as f64 / report.seconds
    } else {
        0.0
    };
    report.peak_rss_kib = peak_rss_kib();
    Ok(report)
}

async fn rebuild_into(
    config: &Config,
    live: &PgPool,
    control: &mut sqlx::PgConnection,
    fresh_schema: &str,
    retired_schema: &str,
    options: RebuildOptions,
) -> Result<RebuildReport, RebuildError> {
    let fresh = scaffolding_pool(&config.database_url, fresh_schema).await?;
    store::migrate(&fresh).await?;
    let mut phases = Phases::default();
    let reader = LogReader::open(config, fresh_schema)?;

    // 1. Bulk, up to what live had applied when the rebuild started.
    let targets = live_offsets(live, &config.events_topic, &reader).await?;
    let mut progress = Progress::new(reader.lag(&targets).max(0) as u64);
    let (mut reader, bulk) = replay::bulk(
        &fresh,
        fresh_schema,
        reader,
        &targets,
        config,
        &mut progress,
        &mut phases,
    )
    .await?;
    let mut events = bulk.records;
    let mut dead_letters = bulk.dead_letters;

    // 2. Catch up on what live applied meanwhile, without the lock.
    let no_gaps = Default::default();
    let ctx = BatchContext {
        events_topic: &config.events_topic,
        entitlements_topic: &config.entitlements_topic,
        dlq_topic: &config.dlq_topic,
        policy: &config.policy,
        mode: BatchMode::Rebuild,
        accept_gaps: &no_gaps,
    };
    let catch_up_started = Instant::now();
    let mut rounds = 0;
    // Records per second of the last round; none before the first.
    let mut rate: Option<f64> = None;
    loop {
        let targets = live_offsets(live, &config.events_topic, &reader).await?;
        let lag = reader.lag(&targets);
        let expected = rate.map(|rate| Duration::from_secs_f64(lag as f64 / rate.max(1.0)));
        if lag <= LOCK_LAG
            || expected.is_some_and(|expected| expected <= LOCK_BUDGET)
            || rounds == MAX_CATCH_UP_ROUNDS
        {
            break;
        }
        rounds += 1;
        let round_started = Instant::now();
        let applied =
            replay::catch_up(&fresh, &ctx, &mut reader, &targets, &mut progress, None).await?;
        rate = Some(applied.records as f64 / round_started.elapsed().as_secs_f64().max(1e-3));
        events += applied.records;
        dead_letters += applied.dead_letters;
    }
    phases.catch_up_secs = catch_up_started.elapsed().as_secs_f64();

    // 3. Carry versions over from a copy of live's entitlements, without the lock.
    let reconcile_started = Instant::now();
    diff::carry_over(&fresh, fresh_schema).await?;
    let prepared = diff::prepare_messages(
        &fresh,
        fresh_schema,
        &config.entitlements_topic,
        MAX_REPORTED,
    )
    .await?;
    phases.reconcile_secs = reconcile_started.elapsed().as_secs_f64();

    // 4. Pause live between batches and finish under the lock.
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(REBUILD_LOCK)
        .execute(&mut *control)
        .await?;
    let locked_at = Instant::now();
    let outcome = finish_locked(
        config,
        live,
        &fresh,
        &ctx,
        &mut reader,
        &mut progress,
        control,
        fresh_schema,
        retired_schema,
        options,
        prepared,
    )
    .await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(REBUILD_LOCK)
        .execute(&mut *control)
        .await;
    let lock_held = locked_at.elapsed();
    phases.locked_secs = lock_held.as_secs_f64();
    let locked = outcome?;
    unlocked?;
    phases.locked_apply_secs = locked.timings[0];
    phases.locked_reconcile_secs = locked.timings[1];
    phases.locked_outbox_secs = locked.timings[2];
    phases.locked_swap_secs = locked.timings[3];
    progress.finish();
    tracing::info!(
        lock_held_ms = lock_held.as_secs_f64() * 1e3,
        locked_events = locked.records,
        changed = locked.changed,
        "rebuild finished under the lock"
    );
    fresh.close().await;
    Ok(RebuildReport {
        swapped: !options.dry_run,
        events: events + locked.records,
        seconds: 0.0,
        events_per_sec: 0.0,
        dead_letters: dead_letters + locked.dead_letters,
        changed: locked.changed,
        differences_truncated: locked.changed > locked.differences.len() as u64,
        differences: locked.differences,
        lock_held_ms: lock_held.as_secs_f64() * 1e3,
        locked_events: locked.records,
        catch_up_rounds: rounds,
        leftovers_removed: Vec::new(),
        phases,
        peak_rss_kib: 0,
    })
}

struct LockedOutcome {
    /// Seconds of: the last stretch, the reconcile, the outbox, the swap.
    timings: [f64; 4],
    records: u64,
    dead_letters: u64,
    changed: u64,
    differences: Vec<Difference>,
}

/// Everything done while live is paused; the caller releases the lock whatever happens.
#[allow(clippy::too_many_arguments)]
async fn finish_locked(
    config: &Config,
    live: &PgPool,
    fresh: &PgPool,
    ctx: &BatchContext<'_>,
    reader: &mut LogReader,
    progress: &mut Progress,
    control: &mut sqlx::PgConnection,
    fresh_schema: &str,
    retired_schema: &str,
    options: RebuildOptions,
    prepared: Vec<Difference>,
) -> Result<LockedOutcome, RebuildError> {
    let mut step = Instant::now();
    let mut lap = || {
        let seconds = step.elapsed().as_secs_f64();
        step = Instant::now();
        seconds
    };
    // Live is paused between batches, so its offsets stand still: meet them exactly.
    let targets = live_offsets(live, &config.events_topic, reader).await?;
    let mut touched: Vec<CustomerKey> = Vec::new();
    let applied =
        replay::catch_up(fresh, ctx, reader, &targets, progress, Some(&mut touched)).await?;

    let apply = lap();
    let mut tx = control.begin().await?;
    diff::reconcile_dirty(&mut tx, fresh_schema, &touched).await?;
    let reconcile = lap();
    let diffs = diff::publish_changes(
        &mut tx,
        fresh_schema,
        &config.entitlements_topic,
        options.dry_run,
        prepared,
        MAX_REPORTED,
    )
    .await?;
    let outbox = lap();
    if options.dry_run {
        tx.rollback().await?;
    } else {
        swap::rename(&mut tx, fresh_schema, retired_schema).await?;
        sqlx::query("SELECT pg_notify('outbox', '')")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(LockedOutcome {
        timings: [apply, reconcile, outbox, lap()],
        records: applied.records,
        dead_letters: applied.dead_letters,
        changed: diffs.changed,
        differences: diffs.reported,
    })
}

/// Connections to the fresh schema: the bulk load's COPY streams, the concurrent folds and
/// derivations, and the cursor that feeds them.
const SCAFFOLDING_CONNECTIONS: u32 = 4;

/// The pool that writes the fresh schema, with `synchronous_commit = off`: its commits do not
/// wait for the WAL to reach the disk. That is safe for everything written before the swap:
///
/// - a crash before the swap loses at most the last commits of a schema that nobody reads and
///   the next rebuild drops ([`swap::drop_leftovers`]);
/// - the swap's transaction runs on the control session, a live connection with the server's
///   own (synchronous) setting, and a commit flushes the WAL *up to its own commit record*,
///   which includes every earlier asynchronous commit's changes: once the swap is durable, so
///   is every row of the tables it brings in. Asynchronous commit can lose the latest
///   transactions, never reorder them, so no crash leaves a swapped schema without its rows.
async fn scaffolding_pool(url: &SecretString, schema: &str) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = url.expose_secret().parse()?;
    PgPoolOptions::new()
        .max_connections(SCAFFOLDING_CONNECTIONS)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options.options([
            ("search_path", schema),
            ("synchronous_commit", "off"),
            // The fold's and the derivation's statements are large enough in cost for JIT
            // compilation with inlining and optimisation, spent before their first row on plans
            // whose time goes to sorting, fetching tuples and parsing jsonb.
            ("jit", "off"),
        ]))
        .await
}

/// Live's stored next offset per partition of the log (0 where it has none yet).
async fn live_offsets(
    live: &PgPool,
    topic: &str,
    reader: &LogReader,
) -> Result<BTreeMap<i32, i64>, RebuildError> {
    let stored: Vec<(i32, i64)> =
        sqlx::query_as("SELECT partition, next_offset FROM consumer_offsets WHERE topic = $1")
            .bind(topic)
            .fetch_all(live)
            .await?;
    let stored: BTreeMap<i32, i64> = stored.into_iter().collect();
    Ok(reader
        .partitions()
        .map(|p| (p, stored.get(&p).copied().unwrap_or(0)))
        .collect())
}

/// The `(account, customer)` columns of rows, as keys.
fn customer_keys(rows: &[sqlx::postgres::PgRow]) -> Result<Vec<CustomerKey>, sqlx::Error> {
    use sqlx::Row;
    rows.iter()
        .map(|row| {
            Ok(CustomerKey {
                account: row.try_get("account")?,
                customer: row.try_get("customer")?,
            })
        })
        .collect()
}

/// `VmHWM` of `/proc/self/status`, in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// How long the log reader waits for a record it knows exists before it gives up.
const STALL: Duration = Duration::from_secs(30);
