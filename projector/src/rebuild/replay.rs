//! Replaying the log into the fresh schema: the bulk load (set-based, no per-event round trip)
//! and the catch-up (ordinary rebuild batches).

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::postgres::PgPoolCopyExt;
use sqlx::{PgPool, Postgres, Row, Transaction};
use tokio::task::JoinSet;

use crate::config::Config;
use crate::projection::payload::project_payload;
use crate::projection::{
    compute, newer, CustomerKey, EntitlementPolicy, ObjectKey, ProjectedEvent, Snapshot,
};
use crate::store::{self, apply_batch, BatchContext, InputRecord};

use super::progress::Progress;
use super::{Phases, RebuildError, STALL};

/// Records decoded, coalesced and staged at a time. With [`PIPELINE_DEPTH`], [`DECODERS`] and
/// [`COPIES`], bounds the replay's memory whatever the size of the log: at most
/// `2 × PIPELINE_DEPTH + DECODERS + COPIES` chunks (payloads or their COPY text) at a time.
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

/// Customers whose entitlements are derived per round trip at the end of the bulk load; with
/// [`DERIVERS`] chunks in flight, the states held at a time.
const DERIVE_CHUNK: i64 = 1_000;

/// Reads the log partition by partition up to per-partition targets that may move forward
/// between calls (live keeps applying). Records read past a partition's current target are
/// held back, and the partition paused, until a later target covers them.
pub(super) struct LogReader {
    consumer: BaseConsumer,
    topic: String,
    /// Next offset to hand out per partition: everything below it was handed out.
    handed: BTreeMap<i32, i64>,
    /// Next offset expected from Kafka per partition; lower ones are redeliveries after a
    /// resume and are dropped.
    fetched: BTreeMap<i32, i64>,
    held: BTreeMap<i32, VecDeque<InputRecord>>,
    paused: BTreeSet<i32>,
}

impl LogReader {
    pub(super) fn open(config: &Config, schema: &str) -> Result<Self, RebuildError> {
        let consumer: BaseConsumer = config
            .kafka
            .client_config()
            .set("group.id", format!("{}-{schema}", config.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("fetch.max.bytes", "16777216")
            // The prefetch queue is the replay's largest buffer: bounded, whatever the log.
            .set("queued.max.messages.kbytes", "16384")
            .create()?;
        let topic = config.events_topic.clone();
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let mut handed = BTreeMap::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                let (low, _high) =
                    consumer.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))?;
                handed.insert(p.id(), low);
            }
        }
        if handed.is_empty() {
            return Err(RebuildError::NoPartitions(topic));
        }
        let mut assignment = TopicPartitionList::new();
        for partition in handed.keys() {
            assignment.add_partition_offset(&topic, *partition, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        Ok(LogReader {
            consumer,
            topic,
            fetched: handed.clone(),
            handed,
            held: BTreeMap::new(),
            paused: BTreeSet::new(),
        })
    }

    pub(super) fn partitions(&self) -> impl Iterator<Item = i32> + '_ {
        self.handed.keys().copied()
    }

    /// Records between what was handed out and `targets`.
    pub(super) fn lag(&self, targets: &BTreeMap<i32, i64>) -> i64 {
        targets
            .iter()
            .map(|(p, target)| (target - self.handed.get(p).copied().unwrap_or(0)).max(0))
            .sum()
    }

    /// The next offset per partition: after a completed read, the targets.
    pub(super) fn positions(&self) -> &BTreeMap<i32, i64> {
        &self.handed
    }

    /// Up to `max` records below `targets`, in offset order per partition; empty once every
    /// partition has reached its target.
    pub(super) fn read(
        &mut self,
        targets: &BTreeMap<i32, i64>,
        max: usize,
    ) -> Result<Vec<InputRecord>, RebuildError> {
        let mut out = Vec::with_capacity(max.min(CHUNK));
        // Held records first: they are the oldest of their partitions.
        let mut resume = TopicPartitionList::new();
        for (partition, held) in &mut self.held {
            let target = targets.get(partition).copied().unwrap_or(0);
            while out.len() < max && held.front().is_some_and(|r| r.offset < target) {
                if let Some(record) = held.pop_front() {
                    self.handed.insert(*partition, record.offset + 1);
                    out.push(record);
                }
            }
            if held.is_empty() && self.paused.remove(partition) {
                resume.add_partition(&self.topic, *partition);
            }
        }
        if resume.count() > 0 {
            self.consumer.resume(&resume)?;
        }
        let mut waiting_since = Instant::now();
        while out.len() < max && self.lag(targets) > 0 {
            // Block only while this call has nothing to return yet.
            let timeout = if out.is_empty() {
                Duration::from_millis(100)
            } else {
                Duration::ZERO
            };
            let message = match tokio::task::block_in_place(|| self.consumer.poll(timeout)) {
                Some(message) => message?,
                None if !out.is_empty() => break,
                None => {
                    if waiting_since.elapsed() >= STALL {
                        let (partition, target) = targets
                            .iter()
                            .find(|(p, t)| self.handed.get(p).copied().unwrap_or(0) < **t)
                            .map(|(p, t)| (*p, *t))
                            .unwrap_or_default();
                        return Err(RebuildError::Stalled {
                            partition,
                            target,
                            secs: STALL.as_secs(),
                        });
                    }
                    continue;
                }
            };
            waiting_since = Instant::now();
            let partition = message.partition();
            let offset = message.offset();
            let expected = self.fetched.entry(partition).or_insert(0);
            if offset < *expected {
                continue;
            }
            // The log is kept forever and written without transactions: its offsets are dense,
            // and a hole means records were lost on the way (a resume that skipped), never
            // something to step over.
            if offset > *expected {
                return Err(RebuildError::OutOfOrder(vec![(partition, *expected)]));
            }
            *expected = offset + 1;
            let record = InputRecord {
                partition,
                offset,
                payload: message.payload().map(<[u8]>::to_vec),
            };
            let held = self.held.entry(partition).or_default();
            if offset < targets.get(&partition).copied().unwrap_or(0) && held.is_empty() {
                self.handed.insert(partition, offset + 1);
                out.push(record);
            } else {
                held.push_back(record);
                if self.paused.insert(partition) {
                    let mut pause = TopicPartitionList::new();
                    pause.add_partition(&self.topic, partition);
                    self.consumer.pause(&pause)?;
                }
            }
        }
        Ok(out)
    }
}

/// What a replay step applied.
#[derive(Debug, Default)]
pub(super) struct Applied {
    pub records: u64,
    pub dead_letters: u64,
}

/// Staging tables: one per projection table, unlogged and without indexes, so that COPY only
/// appends. `snapshot` (and `items`, `lookup_keys`) stay text: only a fold winner is parsed
/// into jsonb.
const STAGING: &[(&str, &str)] = &[
    (
        "customers",
        "account text, id text, livemode bool, email text, name text, deleted bool",
    ),
    (
        "subscriptions",
        "account text, id text, livemode bool, customer text, status text, current_period_end int8, \
         cancel_at_period_end bool, items text",
    ),
    (
        "invoices",
        "account text, id text, livemode bool, customer text, subscription text, status text, paid bool, \
         amount_paid int8, attempt_count int8, next_payment_attempt int8, paid_through int8",
    ),
    (
        "checkout_sessions",
        "account text, id text, livemode bool, customer text, client_reference_id text, mode text, \
         status text, payment_status text, subscription text, metadata_price text, metadata_product text",
    ),
    (
        "entitlement_summaries",
        "account text, customer text, livemode bool, lookup_keys text",
    ),
];

/// The columns every staging table ends with, in COPY order.
const RANK_COLUMNS: &str = "rank_created int8, rank_type int2, rank_status int2, \
     rank_event_id text COLLATE \"C\", event_type text, snapshot text";

/// The bulk load: every record up to `targets`, then the fold and the entitlements. Takes the
/// reader to its own thread for the load and hands it back for the catch-up.
///
/// Three stages overlap, each bounded by a channel of [`PIPELINE_DEPTH`] chunks: a thread reads
/// chunks of the log, [`DECODERS`] threads decode and coalesce them into COPY text, and up to
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
    for (table, columns) in STAGING {
        sqlx::query(&format!(
            "CREATE UNLOGGED TABLE stage_{table} ({columns}, {RANK_COLUMNS})"
        ))
        .execute(fresh)
        .await?;
    }
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
    fold(fresh, schema).await?;
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
    derive_entitlements(fresh, schema, &config.policy).await?;
    phases.derive_secs = started.elapsed().as_secs_f64();
    Ok((reader, applied))
}

fn join_error(e: tokio::task::JoinError) -> RebuildError {
    RebuildError::Database(sqlx::Error::Protocol(format!("staging task failed: {e}")))
}

/// One chunk's max-rank snapshots, as COPY text per staging table.
struct StagedChunk {
    records: u64,
    /// Records without a usable event (live dead-lettered them).
    unusable: u64,
    tables: Vec<(&'static str, CopyText)>,
}

impl StagedChunk {
    fn encode(records: &[InputRecord]) -> StagedChunk {
        let mut unusable = 0;
        let mut chunk = ChunkObjects::default();
        for record in records {
            match record.payload.as_deref().map(project_payload) {
                Some(Ok(event)) => chunk.push(event),
                _ => unusable += 1,
            }
        }
        let mut customers = CopyText::default();
        let mut subscriptions = CopyText::default();
        let mut invoices = CopyText::default();
        let mut sessions = CopyText::default();
        let mut summaries = CopyText::default();
        for (key, event) in &chunk.objects {
            let Some(snapshot) = &event.snapshot else {
                continue;
            };
            match snapshot {
                Snapshot::Customer(s) => {
                    let deleted = chunk.deleted.contains(&(key.account.clone(), s.id.clone()));
                    customers
                        .text(&event.account)
                        .text(&s.id)
                        .bool(s.livemode)
                        .opt_text(s.email.as_deref())
                        .opt_text(s.name.as_deref())
                        .bool(deleted);
                    customers.rank_columns(event, snapshot);
                }
                Snapshot::Subscription(s) => {
                    subscriptions
                        .text(&event.account)
                        .text(&s.id)
                        .bool(s.livemode)
                        .text(&s.customer)
                        .text(&s.status)
                        .opt_int(s.current_period_end)
                        .bool(s.cancel_at_period_end)
                        .text(&store::subscription_items_json(s));
                    subscriptions.rank_columns(event, snapshot);
                }
                Snapshot::Invoice(s) => {
                    invoices
                        .text(&event.account)
                        .text(&s.id)
                        .bool(s.livemode)
                        .opt_text(s.customer.as_deref())
                        .opt_text(s.subscription.as_deref())
                        .opt_text(s.status.as_deref())
                        .bool(s.paid)
                        .int(s.amount_paid)
                        .int(s.attempt_count)
                        .opt_int(s.next_payment_attempt)
                        .opt_int(s.paid_through);
                    invoices.rank_columns(event, snapshot);
                }
                Snapshot::CheckoutSession(s) => {
                    sessions
                        .text(&event.account)
                        .text(&s.id)
                        .bool(s.livemode)
                        .opt_text(s.customer.as_deref())
                        .opt_text(s.client_reference_id.as_deref())
                        .text(&s.mode)
                        .opt_text(s.status.as_deref())
                        .text(&s.payment_status)
                        .opt_text(s.subscription.as_deref())
                        .opt_text(s.metadata_price.as_deref())
                        .opt_text(s.metadata_product.as_deref());
                    sessions.rank_columns(event, snapshot);
                }
                Snapshot::EntitlementSummary(s) => {
                    let lookup_keys =
                        serde_json::to_string(&s.lookup_keys).unwrap_or_else(|_| "[]".into());
                    summaries
                        .text(&event.account)
                        .text(&s.customer)
                        .bool(s.livemode)
                        .text(&lookup_keys);
                    summaries.rank_columns(event, snapshot);
                }
            }
        }
        StagedChunk {
            records: records.len() as u64,
            unusable,
            tables: vec![
                ("customers", customers),
                ("subscriptions", subscriptions),
                ("invoices", invoices),
                ("checkout_sessions", sessions),
                ("entitlement_summaries", summaries),
            ],
        }
    }

    async fn copy(self, fresh: PgPool) -> Result<(), sqlx::Error> {
        for (table, text) in self.tables {
            if text.rows == 0 {
                continue;
            }
            let mut copy = fresh
                .copy_in_raw(&format!("COPY stage_{table} FROM STDIN"))
                .await?;
            copy.send(text.text.into_bytes()).await?;
            copy.finish().await?;
        }
        Ok(())
    }
}

/// A chunk coalesced per object to its max-rank snapshot, under the projection's rule
/// ([`newer`]), as [`crate::projection::coalesce`] does for live batches. Hashed rather than
/// ordered: the staging order does not matter, and the ordered map's key comparisons were the
/// largest cost of the replay in the profile.
#[derive(Default)]
struct ChunkObjects {
    objects: HashMap<ObjectKey, ProjectedEvent>,
    /// (account, customer) of every deleted customer snapshot: a deletion sticks (`deleted` is
    /// an OR over every snapshot of the customer, whichever outranks it).
    deleted: HashSet<(String, String)>,
}

impl ChunkObjects {
    fn push(&mut self, event: ProjectedEvent) {
        let Some(snapshot) = &event.snapshot else {
            return;
        };
        if let Snapshot::Customer(c) = snapshot {
            if c.deleted {
                self.deleted.insert((event.account.clone(), c.id.clone()));
            }
        }
        let key = ObjectKey {
            account: event.account.clone(),
            kind: snapshot.kind(),
            id: snapshot.object_id().to_owned(),
        };
        match self.objects.entry(key) {
            Entry::Occupied(mut held) => {
                if newer(Some(&held.get().rank), &event.rank) {
                    held.insert(event);
                }
            }
            Entry::Vacant(slot) => {
                slot.insert(event);
            }
        }
    }
}

/// Rows in PostgreSQL's COPY text format: tab-separated, `\N` for NULL, backslash escapes.
#[derive(Default)]
struct CopyText {
    text: String,
    rows: usize,
    /// Whether the current row has a field yet (the next one needs a tab first).
    in_row: bool,
}

impl CopyText {
    fn separator(&mut self) {
        if self.in_row {
            self.text.push('\t');
        }
        self.in_row = true;
    }

    fn text(&mut self, value: &str) -> &mut Self {
        self.separator();
        // Runs without a reserved byte are copied whole; the four reserved ones are ASCII, so
        // splitting at them keeps UTF-8 intact.
        let mut rest = value;
        while let Some(at) = rest
            .bytes()
            .position(|b| matches!(b, b'\\' | b'\n' | b'\r' | b'\t'))
        {
            self.text.push_str(&rest[..at]);
            self.text.push_str(match rest.as_bytes()[at] {
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                _ => "\\t",
            });
            rest = &rest[at + 1..];
        }
        self.text.push_str(rest);
        self
    }

    fn opt_text(&mut self, value: Option<&str>) -> &mut Self {
        match value {
            Some(value) => self.text(value),
            None => self.null(),
        }
    }

    fn null(&mut self) -> &mut Self {
        self.separator();
        self.text.push_str("\\N");
        self
    }

    fn int(&mut self, value: i64) -> &mut Self {
        self.separator();
        let _ = write!(self.text, "{value}");
        self
    }

    fn opt_int(&mut self, value: Option<i64>) -> &mut Self {
        match value {
            Some(value) => self.int(value),
            None => self.null(),
        }
    }

    fn bool(&mut self, value: bool) -> &mut Self {
        self.separator();
        self.text.push(if value { 't' } else { 'f' });
        self
    }

    /// The rank, event type and snapshot every staging row ends with; ends the row.
    fn rank_columns(&mut self, event: &ProjectedEvent, snapshot: &Snapshot) {
        self.int(event.rank.created)
            .int(i64::from(event.rank.type_rank))
            .int(i64::from(event.rank.status_rank))
            .text(&event.rank.event_id)
            .text(&event.event_type)
            .text(snapshot.raw());
        self.text.push('\n');
        self.in_row = false;
        self.rows += 1;
    }
}

/// Per staged table, the usually largest first, the fold: the max-rank row per key (SPEC §6
/// order, as `Rank` orders it), found by a sort of the narrow key and rank columns only, then
/// the winners' wide rows fetched by `ctid` and their snapshots parsed into jsonb once.
const FOLDS: &[(&str, &str, &str, &str)] = &[
    (
        "subscriptions",
        "account, id",
        "account, id, livemode, customer, status, current_period_end, cancel_at_period_end, items, rank_created, rank_type, rank_status, rank_event_id, event_type, snapshot",
        "s.account, s.id, s.livemode, s.customer, s.status, s.current_period_end, s.cancel_at_period_end, s.items::jsonb, s.rank_created, s.rank_type, s.rank_status, s.rank_event_id, s.event_type, s.snapshot::jsonb",
    ),
    (
        "invoices",
        "account, id",
        "account, id, livemode, customer, subscription, status, paid, amount_paid, attempt_count, next_payment_attempt, paid_through, rank_created, rank_type, rank_status, rank_event_id, event_type, snapshot",
        "s.account, s.id, s.livemode, s.customer, s.subscription, s.status, s.paid, s.amount_paid, s.attempt_count, s.next_payment_attempt, s.paid_through, s.rank_created, s.rank_type, s.rank_status, s.rank_event_id, s.event_type, s.snapshot::jsonb",
    ),
    (
        "customers",
        "account, id",
        "account, id, livemode, email, name, deleted, rank_created, rank_type, rank_status, rank_event_id, event_type, snapshot",
        "s.account, s.id, s.livemode, s.email, s.name, w.deleted, s.rank_created, s.rank_type, s.rank_status, s.rank_event_id, s.event_type, s.snapshot::jsonb",
    ),
    (
        "checkout_sessions",
        "account, id",
        "account, id, livemode, customer, client_reference_id, mode, status, payment_status, subscription, metadata_price, metadata_product, rank_created, rank_type, rank_status, rank_event_id, event_type, snapshot",
        "s.account, s.id, s.livemode, s.customer, s.client_reference_id, s.mode, s.status, s.payment_status, s.subscription, s.metadata_price, s.metadata_product, s.rank_created, s.rank_type, s.rank_status, s.rank_event_id, s.event_type, s.snapshot::jsonb",
    ),
    (
        "entitlement_summaries",
        "account, customer",
        "account, customer, livemode, lookup_keys, rank_created, rank_type, rank_status, rank_event_id, event_type, snapshot",
        "s.account, s.customer, s.livemode, ARRAY(SELECT jsonb_array_elements_text(s.lookup_keys::jsonb)), s.rank_created, s.rank_type, s.rank_status, s.rank_event_id, s.event_type, s.snapshot::jsonb",
    ),
];

/// Tables folded at a time, each on its own connection (largest first, in [`FOLDS`] order):
/// the fold is Postgres's work, and on its own one backend leaves the other core idle.
const FOLD_CONCURRENCY: usize = 3;

async fn fold(fresh: &PgPool, schema: &str) -> Result<(), RebuildError> {
    let mut folds =
        futures_util::stream::iter(FOLDS.iter().map(|(table, key, columns, select)| {
            fold_table(fresh, schema, table, key, columns, select)
        }))
        .buffer_unordered(FOLD_CONCURRENCY);
    while let Some(folded) = folds.next().await {
        folded?;
    }
    Ok(())
}

async fn fold_table(
    fresh: &PgPool,
    schema: &str,
    table: &str,
    key: &str,
    columns: &str,
    select: &str,
) -> Result<(), RebuildError> {
    let mut tx = fresh.begin().await?;
    // The narrow sort fits in memory; the staged rows themselves are read once.
    sqlx::query("SET LOCAL work_mem = '256MB'")
        .execute(&mut *tx)
        .await?;
    // Loaded first, indexed after: one sort per index instead of a B-tree insert per row.
    let indexes = drop_indexes(&mut tx, schema, table).await?;
    // A customer's deletion sticks whatever outranks it (`deleted` is an OR over them all).
    let deleted = if table == "customers" {
        format!(", bool_or(deleted) OVER (PARTITION BY {key}) AS deleted")
    } else {
        String::new()
    };
    sqlx::query(&format!(
        "INSERT INTO {table} ({columns})
         SELECT {select}
         FROM (SELECT DISTINCT ON ({key}) ctid AS row{deleted}
               FROM stage_{table}
               ORDER BY {key}, rank_created DESC, rank_type DESC, rank_status DESC, rank_event_id DESC) w
         JOIN stage_{table} s ON s.ctid = w.row"
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query(&format!("DROP TABLE stage_{table}"))
        .execute(&mut *tx)
        .await?;
    restore_indexes(&mut tx, schema, table, indexes).await?;
    tx.commit().await?;
    sqlx::query(&format!("ANALYZE {table}"))
        .execute(fresh)
        .await?;
    Ok(())
}

/// An index of a fresh table, dropped for a bulk load and created again after it.
#[derive(sqlx::FromRow)]
struct IndexDefinition {
    index: String,
    /// The constraint the index enforces (a primary key), if any.
    constraint: Option<String>,
    /// `CREATE INDEX …`, or the constraint's definition (`PRIMARY KEY (…)`).
    definition: String,
}

/// Drops every index of `schema.table` (a fresh, not yet visible table) and returns their
/// definitions, whatever the migrations made them. Indexes a foreign key depends on stay.
async fn drop_indexes(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
    table: &str,
) -> Result<Vec<IndexDefinition>, RebuildError> {
    let indexes: Vec<IndexDefinition> = sqlx::query_as(
        "SELECT ci.relname::text AS index, c.conname::text AS constraint,
                CASE WHEN c.conname IS NULL THEN pg_get_indexdef(i.indexrelid)
                     ELSE pg_get_constraintdef(c.oid) END AS definition
         FROM pg_index i
         JOIN pg_class ci ON ci.oid = i.indexrelid
         LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid
         WHERE i.indrelid = to_regclass($1)
           AND NOT EXISTS (SELECT 1 FROM pg_constraint f WHERE f.contype = 'f' AND f.conindid = i.indexrelid)
         ORDER BY ci.relname",
    )
    .bind(format!("{schema}.{table}"))
    .fetch_all(&mut **tx)
    .await?;
    for index in &indexes {
        let statement = match &index.constraint {
            Some(constraint) => {
                format!("ALTER TABLE {schema}.{table} DROP CONSTRAINT {constraint}")
            }
            None => format!("DROP INDEX {schema}.{}", index.index),
        };
        sqlx::query(&statement).execute(&mut **tx).await?;
    }
    Ok(indexes)
}

async fn restore_indexes(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
    table: &str,
    indexes: Vec<IndexDefinition>,
) -> Result<(), RebuildError> {
    sqlx::query("SET LOCAL maintenance_work_mem = '128MB'")
        .execute(&mut **tx)
        .await?;
    for index in indexes {
        let statement = match &index.constraint {
            Some(constraint) => format!(
                "ALTER TABLE {schema}.{table} ADD CONSTRAINT {constraint} {}",
                index.definition
            ),
            None => index.definition,
        };
        sqlx::query(&statement).execute(&mut **tx).await?;
    }
    Ok(())
}

/// Every customer any projected object names, whose entitlement object live would hold.
const CUSTOMER_KEYS: &str = "SELECT account, id AS customer FROM customers
     UNION SELECT account, customer FROM subscriptions
     UNION SELECT account, customer FROM invoices WHERE customer IS NOT NULL
     UNION SELECT account, customer FROM checkout_sessions WHERE customer IS NOT NULL
     UNION SELECT account, customer FROM entitlement_summaries";

/// Chunks of customers derived at a time, each on its own connection.
const DERIVERS: usize = 2;

/// Derives every customer's entitlement object from the folded tables, a chunk of customers per
/// round trip, with the same state loading and the same `compute` as live batches. Versions are
/// 0 here: [`super::diff`] carries them over from live. One connection reads the customers'
/// keys from a cursor, [`DERIVERS`] others derive and COPY chunks of them; the entitlements'
/// indexes are built after.
async fn derive_entitlements(
    fresh: &PgPool,
    schema: &str,
    policy: &EntitlementPolicy,
) -> Result<(), RebuildError> {
    // Committed on its own: dropping an index locks the table until the end of the
    // transaction, and the derivers write it from other connections.
    let mut tx = fresh.begin().await?;
    let indexes = drop_indexes(&mut tx, schema, "entitlements").await?;
    tx.commit().await?;
    let mut tx = fresh.begin().await?;
    sqlx::query(&format!(
        "DECLARE customer_keys NO SCROLL CURSOR FOR {CUSTOMER_KEYS}"
    ))
    .execute(&mut *tx)
    .await?;
    let policy = Arc::new(policy.clone());
    let mut chunks: JoinSet<Result<(), RebuildError>> = JoinSet::new();
    loop {
        let rows = sqlx::query(&format!("FETCH {DERIVE_CHUNK} FROM customer_keys"))
            .fetch_all(&mut *tx)
            .await?;
        if rows.is_empty() {
            break;
        }
        let keys = rows
            .iter()
            .map(|row| {
                Ok(CustomerKey {
                    account: row.try_get("account")?,
                    customer: row.try_get("customer")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        while chunks.len() >= DERIVERS {
            if let Some(derived) = chunks.join_next().await {
                derived.map_err(join_error)??;
            }
        }
        chunks.spawn(derive_chunk(fresh.clone(), Arc::clone(&policy), keys));
    }
    while let Some(derived) = chunks.join_next().await {
        derived.map_err(join_error)??;
    }
    sqlx::query("CLOSE customer_keys").execute(&mut *tx).await?;
    tx.commit().await?;
    let mut tx = fresh.begin().await?;
    restore_indexes(&mut tx, schema, "entitlements", indexes).await?;
    tx.commit().await?;
    sqlx::query("ANALYZE entitlements").execute(fresh).await?;
    Ok(())
}

/// One chunk of customers: their states loaded, their entitlements computed and COPYed.
async fn derive_chunk(
    fresh: PgPool,
    policy: Arc<EntitlementPolicy>,
    keys: Vec<CustomerKey>,
) -> Result<(), RebuildError> {
    let mut tx = fresh.begin().await?;
    let states = store::load_states(&mut tx, &keys).await?;
    let mut text = CopyText::default();
    for (key, state) in &states {
        let view = compute(state, &policy);
        let json = serde_json::to_string(&view)?;
        text.text(&key.account)
            .text(&key.customer)
            .bool(view.livemode)
            .opt_text(view.client_reference_id.as_deref())
            .text(&text_array(&view.features))
            .int(0)
            .text(&json)
            .text(&view.updated_at());
        text.text.push('\n');
        text.in_row = false;
        text.rows += 1;
    }
    let mut copy = tx
        .copy_in_raw(
            "COPY entitlements (account, customer, livemode, client_reference_id, features, version, view, updated_at) FROM STDIN",
        )
        .await?;
    copy.send(text.text.into_bytes()).await?;
    copy.finish().await?;
    tx.commit().await?;
    Ok(())
}

/// A `text[]` literal: every element quoted, quotes and backslashes escaped.
fn text_array(values: &[String]) -> String {
    let mut literal = String::from("{");
    for (i, value) in values.iter().enumerate() {
        if i > 0 {
            literal.push(',');
        }
        literal.push('"');
        for c in value.chars() {
            if c == '"' || c == '\\' {
                literal.push('\\');
            }
            literal.push(c);
        }
        literal.push('"');
    }
    literal.push('}');
    literal
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_what_the_format_reserves() {
        let mut text = CopyText::default();
        text.text("a\tb\\c\nd\re").opt_text(None).int(-4).bool(true);
        text.text.push('\n');

        assert_eq!(text.text, "a\\tb\\\\c\\nd\\re\t\\N\t-4\tt\n");
    }

    #[test]
    fn text_array_quotes_every_element() {
        let literal = text_array(&["pro".into(), "a\"b".into(), "c\\d".into()]);

        assert_eq!(literal, r#"{"pro","a\"b","c\\d"}"#);
        assert_eq!(text_array(&[]), "{}");
    }
}
