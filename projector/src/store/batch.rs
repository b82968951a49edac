//! One batch of consumed records → one Postgres transaction: dedupe, projection upserts,
//! entitlement recomputation with outbox rows, dead letters, and the consumed offsets.

use std::collections::{BTreeMap, HashMap, HashSet};

use sqlx::{PgPool, Postgres, Row, Transaction};

use shared::envelope::header;
use shared::{Cause, EventEnvelope};

use crate::projection::{
    change_message, coalesce, compute, project, same_entitlements, CustomerKey, EntitlementPolicy,
    EntitlementView, ObjectKind, ProjectedEvent, Snapshot, SubscriptionSnapshot,
};

use super::load_states;
use super::locks::lock_customers;
use super::text::storable_json;

/// DLQ header of a record Postgres refused: its SQLSTATE.
pub const DLQ_SQLSTATE: &str = "dlq-sqlstate";

/// A record as consumed: where it is and its bytes.
#[derive(Debug, Clone)]
pub struct InputRecord {
    pub partition: i32,
    pub offset: i64,
    pub payload: Option<Vec<u8>>,
}

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

/// A record that could not be used, and why (stable reason code + message).
pub(super) struct DeadLetter<'r> {
    pub(super) record: &'r InputRecord,
    pub(super) event_id: Option<String>,
    pub(super) event_type: Option<String>,
    pub(super) reason: &'static str,
    pub(super) message: String,
    /// When Postgres refused the record: its SQLSTATE.
    pub(super) sqlstate: Option<String>,
}

/// Applies `records` (one partition's records in offset order; several partitions allowed) in
/// one transaction.
pub async fn apply_batch(
    pool: &PgPool,
    ctx: &BatchContext<'_>,
    records: &[InputRecord],
) -> Result<BatchOutcome, sqlx::Error> {
    let mut outcome = BatchOutcome::default();
    let mut tx = pool.begin().await?;
    if ctx.mode.writes_live_tables() {
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(REBUILD_LOCK)
            .execute(&mut *tx)
            .await?;
    }

    // 1. Progress: lock this batch's partitions' offsets, so that two projectors racing over
    //    a rebalance serialise here, and drop what was applied already.
    let records: Vec<&InputRecord> = if ctx.mode.tracks_offsets() {
        let stored = lock_offsets(&mut tx, ctx.events_topic, records).await?;
        let mut first_seen: HashMap<i32, i64> = HashMap::new();
        let mut keep = Vec::with_capacity(records.len());
        for record in records {
            let next = stored.get(&record.partition).copied().unwrap_or(0);
            let first = *first_seen.entry(record.partition).or_insert(record.offset);
            if record.offset < next {
                outcome.replayed += 1;
            } else if first > next && !ctx.accept_gaps.contains(&record.partition) {
                if !outcome.gaps.iter().any(|(p, _)| *p == record.partition) {
                    outcome.gaps.push((record.partition, next));
                }
            } else {
                keep.push(record);
            }
        }
        keep
    } else {
        records.iter().collect()
    };

    // 2. Parse and project; what cannot be used becomes a dead letter.
    let mut projected: Vec<(ProjectedEvent, &InputRecord)> = Vec::with_capacity(records.len());
    let mut dead: Vec<DeadLetter<'_>> = Vec::new();
    for record in &records {
        let Some(payload) = record.payload.as_deref() else {
            dead.push(DeadLetter {
                record,
                event_id: None,
                event_type: None,
                reason: "empty_record",
                message: "the record has no value".into(),
                sqlstate: None,
            });
            continue;
        };
        // What Postgres cannot store (a NUL in metadata) is replaced, so the event is projected.
        let payload = storable_json(payload);
        match EventEnvelope::parse(&payload) {
            Err(e) => dead.push(DeadLetter {
                record,
                event_id: None,
                event_type: None,
                reason: "invalid_envelope",
                message: e.to_string(),
                sqlstate: None,
            }),
            Ok(envelope) => match project(&envelope) {
                Ok(event) => projected.push((event, record)),
                Err(e) => dead.push(DeadLetter {
                    record,
                    event_id: Some(envelope.id.to_owned()),
                    event_type: Some(envelope.event_type.to_owned()),
                    reason: "unexpected_shape",
                    message: e.to_string(),
                    sqlstate: None,
                }),
            },
        }
    }

    // 3. Dedupe by event id: within the batch, then against everything applied before.
    let mut seen = HashSet::new();
    projected.retain(|(event, _)| {
        let first = seen.insert(event.event_id.clone());
        if !first {
            outcome.duplicates += 1;
        }
        first
    });
    let ids: Vec<&str> = projected.iter().map(|(e, _)| e.event_id.as_str()).collect();
    let fresh: HashSet<String> = sqlx::query_scalar(
        "INSERT INTO processed_events (event_id) SELECT * FROM UNNEST($1::text[]) ON CONFLICT DO NOTHING RETURNING event_id",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let before = projected.len();
    projected.retain(|(event, _)| fresh.contains(&event.event_id));
    outcome.duplicates += (before - projected.len()) as u64;

    // 4. The cause of each customer's change: their last new event in this batch.
    let mut causes: HashMap<CustomerKey, (String, String)> = HashMap::new();
    for (event, _) in &projected {
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
            causes.insert(key, (event.event_id.clone(), event.event_type.clone()));
        }
    }

    // 5. Lock every touched customer before anything of theirs is written or read, so that a
    //    concurrent batch or redrive of the same customer commits entirely before or after
    //    this one. Then upsert the newest snapshot per object, guarded by rank in SQL as well.
    let batch = coalesce(projected.into_iter().map(|(e, _)| e));
    if ctx.mode.writes_live_tables() {
        lock_customers(&mut tx, batch.customers.keys()).await?;
    }
    upsert_objects(&mut tx, &batch.objects).await?;
    let deleted: Vec<&CustomerKey> = batch
        .customers
        .iter()
        .filter(|(_, t)| t.deleted)
        .map(|(k, _)| k)
        .collect();
    if !deleted.is_empty() {
        sqlx::query(
            "UPDATE customers c SET deleted = true FROM UNNEST($1::text[], $2::text[]) AS k(account, id)
             WHERE c.account = k.account AND c.id = k.id",
        )
        .bind(deleted.iter().map(|k| k.account.as_str()).collect::<Vec<_>>())
        .bind(deleted.iter().map(|k| k.customer.as_str()).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }

    // 6. Recompute the touched customers' entitlements; a change gets a version and a message.
    let touched: Vec<CustomerKey> = batch.customers.keys().cloned().collect();
    if !touched.is_empty() {
        outcome.changes = write_entitlement_changes(&mut tx, ctx, &touched, &causes).await?;
    }

    // 7. Dead letters: kept in a table for redrive and published to the DLQ topic.
    outcome.dead_letters = dead.len() as u64;
    outcome.dead_positions = dead
        .iter()
        .map(|d| (d.record.partition, d.record.offset))
        .collect();
    if !dead.is_empty() {
        write_dead_letters(&mut tx, ctx, &dead).await?;
    }

    // 8. Progress, in the same transaction as everything it covers.
    if ctx.mode.tracks_offsets() {
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        for record in &records {
            let entry = next.entry(record.partition).or_insert(record.offset + 1);
            *entry = (*entry).max(record.offset + 1);
        }
        if !next.is_empty() {
            let partitions: Vec<i32> = next.keys().copied().collect();
            let offsets: Vec<i64> = next.values().copied().collect();
            sqlx::query(
                "UPDATE consumer_offsets o SET next_offset = GREATEST(o.next_offset, n.next_offset)
                 FROM UNNEST($2::int4[], $3::int8[]) AS n(partition, next_offset)
                 WHERE o.topic = $1 AND o.partition = n.partition",
            )
            .bind(ctx.events_topic)
            .bind(&partitions)
            .bind(&offsets)
            .execute(&mut *tx)
            .await?;
            outcome.next_offsets = next.into_iter().collect();
        }
    }
    // Wake the relay only when this batch wrote outbox rows (a rebuild writes none).
    if ctx.mode.emits() && (outcome.changes > 0 || outcome.dead_letters > 0) {
        sqlx::query("SELECT pg_notify('outbox', '')")
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(outcome)
}

pub(super) async fn lock_offsets(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    records: &[InputRecord],
) -> Result<HashMap<i32, i64>, sqlx::Error> {
    let mut partitions: Vec<i32> = records.iter().map(|r| r.partition).collect();
    partitions.sort_unstable();
    partitions.dedup();
    sqlx::query(
        "INSERT INTO consumer_offsets (topic, partition, next_offset) SELECT $1, p, 0 FROM UNNEST($2::int4[]) AS p
         ON CONFLICT DO NOTHING",
    )
    .bind(topic)
    .bind(&partitions)
    .execute(&mut **tx)
    .await?;
    let rows = sqlx::query(
        "SELECT partition, next_offset FROM consumer_offsets WHERE topic = $1 AND partition = ANY($2)
         ORDER BY partition FOR UPDATE",
    )
    .bind(topic)
    .bind(&partitions)
    .fetch_all(&mut **tx)
    .await?;
    rows.into_iter()
        .map(|r| Ok((r.try_get("partition")?, r.try_get("next_offset")?)))
        .collect()
}

/// Column arrays for one kind's multi-row upsert.
#[derive(Default)]
struct Common<'a> {
    account: Vec<&'a str>,
    id: Vec<&'a str>,
    livemode: Vec<bool>,
    rank_created: Vec<i64>,
    rank_type: Vec<i16>,
    rank_status: Vec<i16>,
    rank_event_id: Vec<&'a str>,
    event_type: Vec<&'a str>,
    snapshot: Vec<&'a str>,
}

impl<'a> Common<'a> {
    fn push(&mut self, event: &'a ProjectedEvent, snapshot: &'a Snapshot) {
        self.account.push(&event.account);
        self.id.push(snapshot.object_id());
        self.livemode.push(snapshot.livemode());
        self.rank_created.push(event.rank.created);
        self.rank_type.push(event.rank.type_rank);
        self.rank_status.push(event.rank.status_rank);
        self.rank_event_id.push(&event.rank.event_id);
        self.event_type.push(&event.event_type);
        self.snapshot.push(snapshot.raw());
    }

    fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(&self.account)
            .bind(&self.id)
            .bind(&self.livemode)
            .bind(&self.rank_created)
            .bind(&self.rank_type)
            .bind(&self.rank_status)
            .bind(&self.rank_event_id)
            .bind(&self.event_type)
            .bind(&self.snapshot)
    }
}

/// `$1..$9` are the common columns; kind-specific ones follow from `$10`.
const COMMON_COLUMNS: &str = "account, id, livemode, rank_created, rank_type, rank_status, rank_event_id, event_type, snapshot";
const COMMON_UNNEST: &str =
    "$1::text[], $2::text[], $3::bool[], $4::int8[], $5::int2[], $6::int2[], $7::text[], $8::text[], $9::text[]";

fn upsert_sql(table: &str, extra_columns: &[(&str, &str)]) -> String {
    let extra_names: Vec<&str> = extra_columns.iter().map(|(name, _)| *name).collect();
    let extra_unnest: Vec<String> = extra_columns
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| format!("${}::{ty}", i + 10))
        .collect();
    let mut all: Vec<&str> = COMMON_COLUMNS.split(", ").collect();
    all.extend(&extra_names);
    let select: Vec<String> = all
        .iter()
        .map(|c| {
            if *c == "snapshot" {
                "snapshot::jsonb".to_owned()
            } else if *c == "items" {
                "items::jsonb".to_owned()
            } else {
                (*c).to_owned()
            }
        })
        .collect();
    let updates: Vec<String> = all
        .iter()
        .filter(|c| !matches!(**c, "account" | "id"))
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect();
    format!(
        "INSERT INTO {table} ({cols})
         SELECT {select} FROM UNNEST({COMMON_UNNEST}{comma}{extra})
             AS u({cols})
         ON CONFLICT (account, id) DO UPDATE SET {updates}
         WHERE (EXCLUDED.rank_created, EXCLUDED.rank_type, EXCLUDED.rank_status, EXCLUDED.rank_event_id)
             > ({table}.rank_created, {table}.rank_type, {table}.rank_status, {table}.rank_event_id)",
        cols = all.join(", "),
        select = select.join(", "),
        comma = if extra_unnest.is_empty() { "" } else { ", " },
        extra = extra_unnest.join(", "),
        updates = updates.join(", "),
    )
}

/// The `subscriptions.items` column of a snapshot, as live batches and the rebuild store it.
pub(crate) fn subscription_items_json(s: &SubscriptionSnapshot) -> String {
    let items: Vec<serde_json::Value> = s
        .items
        .iter()
        .map(|i| {
            serde_json::json!({"id": i.id, "price": i.price, "product": i.product, "lookup_key": i.lookup_key,
                               "quantity": i.quantity, "current_period_end": i.current_period_end})
        })
        .collect();
    serde_json::Value::Array(items).to_string()
}

async fn upsert_objects(
    tx: &mut Transaction<'_, Postgres>,
    objects: &BTreeMap<crate::projection::ObjectKey, ProjectedEvent>,
) -> Result<(), sqlx::Error> {
    let mut customers = (Common::default(), Vec::new(), Vec::new());
    let mut subscriptions = (
        Common::default(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let mut invoices = (
        Common::default(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let mut sessions = (
        Common::default(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let mut summaries: (Common<'_>, Vec<Vec<String>>) = (Common::default(), Vec::new());
    for (key, event) in objects {
        let Some(snapshot) = &event.snapshot else {
            continue;
        };
        match snapshot {
            Snapshot::Customer(s) => {
                customers.0.push(event, snapshot);
                customers.1.push(s.email.as_deref());
                customers.2.push(s.name.as_deref());
            }
            Snapshot::Subscription(s) => {
                subscriptions.0.push(event, snapshot);
                subscriptions.1.push(s.customer.as_str());
                subscriptions.2.push(s.status.as_str());
                subscriptions.3.push(s.current_period_end);
                subscriptions.4.push(s.cancel_at_period_end);
                subscriptions.5.push(subscription_items_json(s));
            }
            Snapshot::Invoice(s) => {
                invoices.0.push(event, snapshot);
                invoices.1.push(s.customer.as_deref());
                invoices.2.push(s.subscription.as_deref());
                invoices.3.push(s.status.as_deref());
                invoices.4.push(s.paid);
                invoices.5.push(s.amount_paid);
                invoices.6.push(s.attempt_count);
                invoices.7.push(s.next_payment_attempt);
                invoices.8.push(s.paid_through);
            }
            Snapshot::CheckoutSession(s) => {
                sessions.0.push(event, snapshot);
                sessions.1.push(s.customer.as_deref());
                sessions.2.push(s.client_reference_id.as_deref());
                sessions.3.push(s.mode.as_str());
                sessions.4.push(s.status.as_deref());
                sessions.5.push(s.payment_status.as_str());
                sessions.6.push(s.subscription.as_deref());
                sessions.7.push(s.metadata_price.as_deref());
                sessions.8.push(s.metadata_product.as_deref());
            }
            Snapshot::EntitlementSummary(s) => {
                debug_assert_eq!(key.kind, ObjectKind::EntitlementSummary);
                summaries.0.push(event, snapshot);
                summaries.1.push(s.lookup_keys.clone());
            }
        }
    }
    if !customers.0.id.is_empty() {
        let sql = upsert_sql("customers", &[("email", "text[]"), ("name", "text[]")]);
        customers
            .0
            .bind(sqlx::query(&sql))
            .bind(&customers.1)
            .bind(&customers.2)
            .execute(&mut **tx)
            .await?;
    }
    if !subscriptions.0.id.is_empty() {
        let sql = upsert_sql(
            "subscriptions",
            &[
                ("customer", "text[]"),
                ("status", "text[]"),
                ("current_period_end", "int8[]"),
                ("cancel_at_period_end", "bool[]"),
                ("items", "text[]"),
            ],
        );
        let s = &subscriptions;
        s.0.bind(sqlx::query(&sql))
            .bind(&s.1)
            .bind(&s.2)
            .bind(&s.3)
            .bind(&s.4)
            .bind(&s.5)
            .execute(&mut **tx)
            .await?;
    }
    if !invoices.0.id.is_empty() {
        let sql = upsert_sql(
            "invoices",
            &[
                ("customer", "text[]"),
                ("subscription", "text[]"),
                ("status", "text[]"),
                ("paid", "bool[]"),
                ("amount_paid", "int8[]"),
                ("attempt_count", "int8[]"),
                ("next_payment_attempt", "int8[]"),
                ("paid_through", "int8[]"),
            ],
        );
        let s = &invoices;
        s.0.bind(sqlx::query(&sql))
            .bind(&s.1)
            .bind(&s.2)
            .bind(&s.3)
            .bind(&s.4)
            .bind(&s.5)
            .bind(&s.6)
            .bind(&s.7)
            .bind(&s.8)
            .execute(&mut **tx)
            .await?;
    }
    if !sessions.0.id.is_empty() {
        let sql = upsert_sql(
            "checkout_sessions",
            &[
                ("customer", "text[]"),
                ("client_reference_id", "text[]"),
                ("mode", "text[]"),
                ("status", "text[]"),
                ("payment_status", "text[]"),
                ("subscription", "text[]"),
                ("metadata_price", "text[]"),
                ("metadata_product", "text[]"),
            ],
        );
        let s = &sessions;
        s.0.bind(sqlx::query(&sql))
            .bind(&s.1)
            .bind(&s.2)
            .bind(&s.3)
            .bind(&s.4)
            .bind(&s.5)
            .bind(&s.6)
            .bind(&s.7)
            .bind(&s.8)
            .execute(&mut **tx)
            .await?;
    }
    // Summaries are one per customer and rare: a row at a time keeps their text[] column simple.
    for (i, lookup_keys) in summaries.1.iter().enumerate() {
        let c = &summaries.0;
        sqlx::query(
            "INSERT INTO entitlement_summaries (account, customer, livemode, rank_created, rank_type, rank_status,
                 rank_event_id, event_type, snapshot, lookup_keys)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10)
             ON CONFLICT (account, customer) DO UPDATE SET livemode = EXCLUDED.livemode,
                 rank_created = EXCLUDED.rank_created, rank_type = EXCLUDED.rank_type,
                 rank_status = EXCLUDED.rank_status, rank_event_id = EXCLUDED.rank_event_id,
                 event_type = EXCLUDED.event_type, snapshot = EXCLUDED.snapshot, lookup_keys = EXCLUDED.lookup_keys
             WHERE (EXCLUDED.rank_created, EXCLUDED.rank_type, EXCLUDED.rank_status, EXCLUDED.rank_event_id)
                 > (entitlement_summaries.rank_created, entitlement_summaries.rank_type,
                    entitlement_summaries.rank_status, entitlement_summaries.rank_event_id)",
        )
        .bind(c.account[i])
        .bind(c.id[i])
        .bind(c.livemode[i])
        .bind(c.rank_created[i])
        .bind(c.rank_type[i])
        .bind(c.rank_status[i])
        .bind(c.rank_event_id[i])
        .bind(c.event_type[i])
        .bind(c.snapshot[i])
        .bind(lookup_keys)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn write_entitlement_changes(
    tx: &mut Transaction<'_, Postgres>,
    ctx: &BatchContext<'_>,
    touched: &[CustomerKey],
    causes: &HashMap<CustomerKey, (String, String)>,
) -> Result<u64, sqlx::Error> {
    let states = load_states(tx, touched).await?;
    let accounts: Vec<&str> = touched.iter().map(|k| k.account.as_str()).collect();
    let customers: Vec<&str> = touched.iter().map(|k| k.customer.as_str()).collect();
    let rows = sqlx::query(
        "SELECT e.account, e.customer, e.version, e.view::text AS view, e.features
         FROM entitlements e JOIN UNNEST($1::text[], $2::text[]) AS k(account, customer)
           ON e.account = k.account AND e.customer = k.customer
         ORDER BY e.account, e.customer
         FOR UPDATE OF e",
    )
    .bind(&accounts)
    .bind(&customers)
    .fetch_all(&mut **tx)
    .await?;
    let mut stored: HashMap<CustomerKey, (i64, serde_json::Value, Vec<String>)> = HashMap::new();
    for row in rows {
        let key = CustomerKey {
            account: row.try_get("account")?,
            customer: row.try_get("customer")?,
        };
        let view: String = row.try_get("view")?;
        let view = serde_json::from_str(&view).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        stored.insert(
            key,
            (row.try_get("version")?, view, row.try_get("features")?),
        );
    }

    let mut upsert = EntitlementRows::default();
    let mut outbox = OutboxRows::default();
    let mut changes = 0u64;
    for (key, state) in &states {
        let view: EntitlementView = compute(state, ctx.policy);
        let value = serde_json::to_value(&view).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        let (version, old_features) = match stored.get(key) {
            // Only `updated_at` moved (an invoice, a profile update): the stored object follows
            // so that it depends on the events alone, not on how they were batched, but no
            // version and no message, since nothing downstream acts on changed.
            Some((version, old_view, _)) if same_entitlements(old_view, &value) => {
                if *old_view != value {
                    upsert.push(key, &view, *version, value.to_string());
                }
                continue;
            }
            Some((version, _, features)) => (version + 1, features.clone()),
            None => (1, Vec::new()),
        };
        changes += 1;
        upsert.push(key, &view, version, value.to_string());
        // A rebuild counts versions but announces nothing: the swap emits the net differences.
        if !ctx.mode.emits() {
            continue;
        }
        // Every touched customer has a cause: touched means a new event with a snapshot.
        let cause = causes
            .get(key)
            .map(|(id, event_type)| Cause::event(id.as_str(), event_type.as_str()))
            .unwrap_or_else(|| Cause {
                event_id: None,
                event_type: String::new(),
            });
        let message = change_message(&value, version, &old_features, &view.features, cause);
        let payload = serde_json::to_vec(&message).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        let message_key = shared::envelope::scoped_key(view.account.as_deref(), &view.customer);
        outbox.push(
            ctx.entitlements_topic,
            Some(message_key),
            payload,
            serde_json::json!({}),
        );
    }
    if !upsert.customer.is_empty() {
        sqlx::query(
            "INSERT INTO entitlements (account, customer, livemode, client_reference_id, features, version, view, updated_at)
             SELECT account, customer, livemode, client_reference_id,
                    CASE WHEN features = '' THEN '{}'::text[] ELSE string_to_array(features, E'\\x1f') END,
                    version, view::jsonb, to_timestamp(updated_at)
             FROM UNNEST($1::text[], $2::text[], $3::bool[], $4::text[], $5::text[], $6::int8[], $7::text[], $8::int8[])
               AS u(account, customer, livemode, client_reference_id, features, version, view, updated_at)
             ON CONFLICT (account, customer) DO UPDATE SET livemode = EXCLUDED.livemode,
                 client_reference_id = EXCLUDED.client_reference_id, features = EXCLUDED.features,
                 version = EXCLUDED.version, view = EXCLUDED.view, updated_at = EXCLUDED.updated_at",
        )
        .bind(&upsert.account)
        .bind(&upsert.customer)
        .bind(&upsert.livemode)
        .bind(&upsert.client_reference_id)
        .bind(&upsert.features)
        .bind(&upsert.version)
        .bind(&upsert.view)
        .bind(&upsert.updated_at)
        .execute(&mut **tx)
        .await?;
        outbox.insert(tx).await?;
    }
    Ok(changes)
}

#[derive(Default)]
struct EntitlementRows {
    account: Vec<String>,
    customer: Vec<String>,
    livemode: Vec<bool>,
    client_reference_id: Vec<Option<String>>,
    features: Vec<String>,
    version: Vec<i64>,
    view: Vec<String>,
    updated_at: Vec<i64>,
}

impl EntitlementRows {
    fn push(&mut self, key: &CustomerKey, view: &EntitlementView, version: i64, json: String) {
        self.account.push(key.account.clone());
        self.customer.push(key.customer.clone());
        self.livemode.push(view.livemode);
        self.client_reference_id
            .push(view.client_reference_id.clone());
        self.features.push(view.features.join("\u{1f}"));
        self.version.push(version);
        self.view.push(json);
        self.updated_at.push(view.updated_at_unix);
    }
}

/// Rows for the outbox, written with one multi-row insert.
#[derive(Default)]
pub(crate) struct OutboxRows {
    topic: Vec<String>,
    key: Vec<Option<String>>,
    payload: Vec<Vec<u8>>,
    headers: Vec<String>,
}

impl OutboxRows {
    pub(crate) fn push(
        &mut self,
        topic: &str,
        key: Option<String>,
        payload: Vec<u8>,
        headers: serde_json::Value,
    ) {
        self.topic.push(topic.to_owned());
        self.key.push(key);
        self.payload.push(payload);
        self.headers.push(headers.to_string());
    }

    pub(crate) async fn insert(
        &self,
        tx: &mut Transaction<'_, Postgres>,
    ) -> Result<(), sqlx::Error> {
        if self.topic.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO outbox (topic, key, payload, headers)
             SELECT topic, key, payload, headers::jsonb
             FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::text[]) AS u(topic, key, payload, headers)",
        )
        .bind(&self.topic)
        .bind(&self.key)
        .bind(&self.payload)
        .bind(&self.headers)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

pub(super) async fn write_dead_letters(
    tx: &mut Transaction<'_, Postgres>,
    ctx: &BatchContext<'_>,
    dead: &[DeadLetter<'_>],
) -> Result<(), sqlx::Error> {
    let mut outbox = OutboxRows::default();
    for d in dead {
        let payload = d.record.payload.clone().unwrap_or_default();
        let source = format!(
            "{}/{}/{}",
            ctx.events_topic, d.record.partition, d.record.offset
        );
        tracing::warn!(
            partition = d.record.partition,
            offset = d.record.offset,
            event_id = d.event_id.as_deref().unwrap_or(""),
            reason = d.reason,
            message = %d.message,
            "dead letter"
        );
        sqlx::query(
            "INSERT INTO dead_letters (event_id, event_type, topic, partition, \"offset\", reason, message, payload, sqlstate)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (topic, partition, \"offset\") DO UPDATE SET reason = EXCLUDED.reason,
                 message = EXCLUDED.message, sqlstate = EXCLUDED.sqlstate, redriven_at = NULL",
        )
        .bind(&d.event_id)
        .bind(&d.event_type)
        .bind(ctx.events_topic)
        .bind(d.record.partition)
        .bind(d.record.offset)
        .bind(d.reason)
        .bind(&d.message)
        .bind(&payload)
        .bind(&d.sqlstate)
        .execute(&mut **tx)
        .await?;
        let mut headers = serde_json::json!({
            header::DLQ_REASON: d.reason,
            header::DLQ_MESSAGE: d.message,
            header::DLQ_SOURCE: source,
        });
        if let Some(sqlstate) = &d.sqlstate {
            headers[DLQ_SQLSTATE] = serde_json::json!(sqlstate);
        }
        // A redriven record that fails again is already in the DLQ topic; a rebuild's were
        // published when live processing met them.
        if ctx.mode == BatchMode::Live {
            outbox.push(ctx.dlq_topic, d.event_id.clone(), payload, headers);
        }
    }
    outbox.insert(tx).await
}
