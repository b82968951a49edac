//! `projector rebuild`: replays `stripe.events` from offset 0 into a fresh schema while the live
//! projector keeps serving, then swaps atomically and emits only the net differences.
//!
//! 1. Catch up: a fresh schema `rebuild_<unix>` with the same migrations; every partition from
//!    its beginning, applied in batches without change messages.
//! 2. Pause live: take the rebuild lock exclusively (live batches take it shared, so they wait
//!    between batches), then apply up to at least the live projector's stored offsets.
//! 3. Swap in one transaction: the live tables' contents are replaced by the rebuilt ones
//!    (readers see the old or the new state, never a mix); versions carry on from the old
//!    ones; each customer whose entitlement object differs gets one message in the outbox.
//! 4. Release the lock: live resumes from the swapped offsets.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use sqlx::{Acquire, PgPool, Row};

use crate::config::Config;
use crate::store::{
    self, apply_batch, same_entitlements, BatchContext, BatchMode, InputRecord, REBUILD_LOCK,
};

/// Tables replaced by a swap, in an order that needs no deferred constraints. The outbox stays:
/// its unpublished rows are still owed to downstream.
const SWAPPED_TABLES: &[&str] = &[
    "customers",
    "subscriptions",
    "invoices",
    "checkout_sessions",
    "entitlement_summaries",
    "entitlements",
    "processed_events",
    "consumer_offsets",
    "dead_letters",
];

/// Records per rebuild transaction: larger than live batches, nobody waits on them.
const REBUILD_BATCH: usize = 5000;

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0}")]
    Other(String),
}

/// One customer whose entitlement object differs between the live and the rebuilt projection.
#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    pub account: Option<String>,
    pub customer: String,
    pub before: Option<serde_json::Value>,
    pub after: serde_json::Value,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Known live, absent from the replay: kept with an emptied object.
    pub vanished: bool,
}

#[derive(Debug)]
pub struct RebuildReport {
    pub events: u64,
    pub seconds: f64,
    pub differences: Vec<Difference>,
    pub swapped: bool,
}

impl RebuildReport {
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.events as f64 / self.seconds
        } else {
            0.0
        }
    }
}

pub async fn rebuild(config: &Config, dry_run: bool) -> Result<RebuildReport, RebuildError> {
    let live = store::connect(&config.database_url, 4).await?;
    store::migrate(&live).await?;
    let schema = format!(
        "rebuild_{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&live)
        .await?;
    let result = rebuild_into(config, &live, &schema, dry_run).await;
    // The fresh schema is scaffolding either way: swapped contents were copied out of it.
    if let Err(e) = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&live)
        .await
    {
        tracing::warn!(schema, error = %e, "could not drop the rebuild schema");
    }
    result
}

async fn rebuild_into(
    config: &Config,
    live: &PgPool,
    schema: &str,
    dry_run: bool,
) -> Result<RebuildReport, RebuildError> {
    let fresh = store::connect_in(&config.database_url, 4, Some(schema)).await?;
    store::migrate(&fresh).await?;
    let consumer: StreamConsumer = config
        .kafka
        .client_config()
        .set("group.id", format!("{}-{schema}", config.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.max.bytes", "52428800")
        .create()?;
    let topic = config.events_topic.clone();
    let ends = {
        let consumer_ref = &consumer;
        let metadata = consumer_ref.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let mut ends = BTreeMap::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                let (low, high) =
                    consumer_ref.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))?;
                ends.insert(p.id(), (low, high));
            }
        }
        ends
    };
    if ends.is_empty() {
        return Err(RebuildError::Other(format!(
            "topic {topic} has no partitions (does it exist?)"
        )));
    }
    let mut assignment = TopicPartitionList::new();
    for partition in ends.keys() {
        assignment.add_partition_offset(&topic, *partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let total: i64 = ends.values().map(|(low, high)| high - low).sum();
    let started = Instant::now();
    let mut progress = Progress::new(total.max(0) as u64);
    let mut applier = Applier {
        config,
        fresh: &fresh,
        consumer: &consumer,
        next: BTreeMap::new(),
        applied: 0,
    };

    // 1. Catch up to where the log ended when we started.
    let targets: BTreeMap<i32, i64> = ends.iter().map(|(p, (_, high))| (*p, *high)).collect();
    applier.apply_until(&targets, &mut progress).await?;

    // 2. Pause the live projector between batches, then meet its offsets.
    let mut lock_conn = live.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(REBUILD_LOCK)
        .execute(&mut *lock_conn)
        .await?;
    let outcome = async {
        let live_offsets: Vec<(i32, i64)> =
            sqlx::query_as("SELECT partition, next_offset FROM consumer_offsets WHERE topic = $1")
                .bind(&topic)
                .fetch_all(&mut *lock_conn)
                .await?;
        applier
            .apply_until(&live_offsets.into_iter().collect(), &mut progress)
            .await?;
        progress.finish();
        let differences = differences(&mut lock_conn, schema).await?;
        if !dry_run {
            swap(&mut lock_conn, schema, config, &differences).await?;
        }
        Ok::<_, RebuildError>(differences)
    }
    .await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(REBUILD_LOCK)
        .execute(&mut *lock_conn)
        .await;
    let differences = outcome?;
    unlocked?;
    Ok(RebuildReport {
        events: applier.applied,
        seconds: started.elapsed().as_secs_f64(),
        differences,
        swapped: !dry_run,
    })
}

struct Applier<'a> {
    config: &'a Config,
    fresh: &'a PgPool,
    consumer: &'a StreamConsumer,
    /// Next offset applied per partition.
    next: BTreeMap<i32, i64>,
    applied: u64,
}

impl Applier<'_> {
    /// Applies records until every partition in `targets` has reached its target offset.
    async fn apply_until(
        &mut self,
        targets: &BTreeMap<i32, i64>,
        progress: &mut Progress,
    ) -> Result<(), RebuildError> {
        let no_gaps = HashSet::new();
        let ctx = BatchContext {
            events_topic: &self.config.events_topic,
            entitlements_topic: &self.config.entitlements_topic,
            dlq_topic: &self.config.dlq_topic,
            policy: &self.config.policy,
            mode: BatchMode::Rebuild,
            accept_gaps: &no_gaps,
        };
        let behind = |next: &BTreeMap<i32, i64>| {
            targets
                .iter()
                .any(|(p, t)| next.get(p).copied().unwrap_or(0) < *t)
        };
        while behind(&self.next) {
            let mut records = Vec::with_capacity(REBUILD_BATCH);
            let first = tokio::time::timeout(Duration::from_secs(30), self.consumer.recv())
                .await
                .map_err(|_| {
                    RebuildError::Other(
                        "no record from Kafka for 30 s while the log has more".into(),
                    )
                })??;
            records.push(record(&first));
            while records.len() < REBUILD_BATCH {
                match tokio::time::timeout(Duration::from_millis(5), self.consumer.recv()).await {
                    Ok(Ok(m)) => records.push(record(&m)),
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => break,
                }
            }
            for r in &records {
                let next = self.next.entry(r.partition).or_insert(0);
                *next = (*next).max(r.offset + 1);
            }
            let outcome = apply_with_retry(self.fresh, &ctx, &records).await?;
            if !outcome.gaps.is_empty() {
                return Err(RebuildError::Other(format!(
                    "offsets out of order while replaying: {:?}",
                    outcome.gaps
                )));
            }
            self.applied += records.len() as u64;
            progress.advance(records.len() as u64);
        }
        Ok(())
    }
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

fn record(message: &rdkafka::message::BorrowedMessage<'_>) -> InputRecord {
    InputRecord {
        partition: message.partition(),
        offset: message.offset(),
        payload: message.payload().map(<[u8]>::to_vec),
    }
}

/// Customers whose entitlement object (ignoring `version` and `updated_at`) differs.
async fn differences(
    conn: &mut sqlx::PgConnection,
    schema: &str,
) -> Result<Vec<Difference>, RebuildError> {
    let load = |table: String| {
        format!("SELECT account, customer, view::text AS view, features FROM {table}")
    };
    let mut before: HashMap<(String, String), (serde_json::Value, Vec<String>)> = HashMap::new();
    for row in sqlx::query(&load("public.entitlements".into()))
        .fetch_all(&mut *conn)
        .await?
    {
        let view: String = row.try_get("view")?;
        before.insert(
            (row.try_get("account")?, row.try_get("customer")?),
            (
                serde_json::from_str(&view).unwrap_or_default(),
                row.try_get("features")?,
            ),
        );
    }
    let mut differences = Vec::new();
    for row in sqlx::query(&load(format!("{schema}.entitlements")))
        .fetch_all(&mut *conn)
        .await?
    {
        let key: (String, String) = (row.try_get("account")?, row.try_get("customer")?);
        let view: String = row.try_get("view")?;
        let after: serde_json::Value = serde_json::from_str(&view).unwrap_or_default();
        let features: Vec<String> = row.try_get("features")?;
        let old = before.get(&key);
        if old.is_some_and(|(v, _)| same_entitlements(v, &after)) {
            continue;
        }
        let old_features = old.map(|(_, f)| f.clone()).unwrap_or_default();
        differences.push(Difference {
            account: (!key.0.is_empty()).then(|| key.0.clone()),
            customer: key.1.clone(),
            before: old.map(|(v, _)| v.clone()),
            added: features
                .iter()
                .filter(|f| !old_features.contains(f))
                .cloned()
                .collect(),
            removed: old_features
                .iter()
                .filter(|f| !features.contains(f))
                .cloned()
                .collect(),
            after,
            vanished: false,
        });
    }
    // Customers the replay no longer knows (a fix moved their events elsewhere, say) keep an
    // entitlement object, emptied, so that downstream hears they lost everything.
    let rebuilt: std::collections::HashSet<(Option<String>, String)> = differences
        .iter()
        .map(|d| (d.account.clone(), d.customer.clone()))
        .collect();
    let still_there: std::collections::HashSet<(String, String)> = sqlx::query_as(&format!(
        "SELECT account, customer FROM {schema}.entitlements"
    ))
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    for ((account, customer), (view, features)) in &before {
        let key = (
            (!account.is_empty()).then(|| account.clone()),
            customer.clone(),
        );
        if rebuilt.contains(&key) || still_there.contains(&(account.clone(), customer.clone())) {
            continue;
        }
        let mut after = view.clone();
        if let Some(object) = after.as_object_mut() {
            object.insert("features".into(), serde_json::json!([]));
            object.insert("subscriptions".into(), serde_json::json!([]));
            object.insert("client_reference_id".into(), serde_json::Value::Null);
        }
        differences.push(Difference {
            account: key.0,
            customer: key.1,
            before: Some(view.clone()),
            after,
            added: Vec::new(),
            removed: features.clone(),
            vanished: true,
        });
    }
    differences.sort_by(|a, b| (&a.account, &a.customer).cmp(&(&b.account, &b.customer)));
    Ok(differences)
}

/// Replaces the live tables' contents with the rebuilt ones and writes the net differences to
/// the outbox, in one transaction.
async fn swap(
    conn: &mut sqlx::PgConnection,
    schema: &str,
    config: &Config,
    differences: &[Difference],
) -> Result<(), RebuildError> {
    let mut tx = conn.begin().await?;
    // Versions carry on: unchanged customers keep theirs (and their stored object, so readers
    // see no difference at all); changed ones get the next (1 when new).
    let changed_accounts: Vec<String> = differences
        .iter()
        .map(|d| d.account.clone().unwrap_or_default())
        .collect();
    let changed_customers: Vec<String> = differences.iter().map(|d| d.customer.clone()).collect();
    let vanished: Vec<&Difference> = differences.iter().filter(|d| d.vanished).collect();
    if !vanished.is_empty() {
        sqlx::query(&format!(
            "INSERT INTO {schema}.entitlements (account, customer, livemode, client_reference_id, features, version, view, updated_at)
             SELECT o.account, o.customer, o.livemode, NULL, '{{}}', 0, k.view::jsonb, o.updated_at
             FROM UNNEST($1::text[], $2::text[], $3::text[]) AS k(account, customer, view)
             JOIN public.entitlements o ON o.account = k.account AND o.customer = k.customer"
        ))
        .bind(vanished.iter().map(|d| d.account.clone().unwrap_or_default()).collect::<Vec<_>>())
        .bind(vanished.iter().map(|d| d.customer.clone()).collect::<Vec<_>>())
        .bind(vanished.iter().map(|d| d.after.to_string()).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(&format!(
        "UPDATE {schema}.entitlements n SET version = o.version, view = o.view, updated_at = o.updated_at
         FROM public.entitlements o
         WHERE n.account = o.account AND n.customer = o.customer
           AND NOT EXISTS (SELECT 1 FROM UNNEST($1::text[], $2::text[]) AS k(account, customer)
                           WHERE k.account = n.account AND k.customer = n.customer)"
    ))
    .bind(&changed_accounts)
    .bind(&changed_customers)
    .execute(&mut *tx)
    .await?;
    sqlx::query(&format!(
        "UPDATE {schema}.entitlements n
         SET version = COALESCE((SELECT o.version FROM public.entitlements o
                                 WHERE o.account = n.account AND o.customer = n.customer), 0) + 1
         FROM UNNEST($1::text[], $2::text[]) AS k(account, customer)
         WHERE n.account = k.account AND n.customer = k.customer"
    ))
    .bind(&changed_accounts)
    .bind(&changed_customers)
    .execute(&mut *tx)
    .await?;
    let tables = SWAPPED_TABLES
        .iter()
        .map(|t| format!("public.{t}"))
        .collect::<Vec<_>>()
        .join(", ");
    sqlx::query(&format!("TRUNCATE {tables}"))
        .execute(&mut *tx)
        .await?;
    for table in SWAPPED_TABLES {
        sqlx::query(&format!(
            "INSERT INTO public.{table} SELECT * FROM {schema}.{table}"
        ))
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("SELECT setval('public.dead_letters_id_seq', GREATEST((SELECT max(id) FROM public.dead_letters), 1))")
        .execute(&mut *tx)
        .await?;
    // One message per changed customer, with the version it now has.
    let rows = sqlx::query(
        "SELECT e.account, e.customer, e.version, e.view::text AS view FROM public.entitlements e
         JOIN UNNEST($1::text[], $2::text[]) AS k(account, customer) ON e.account = k.account AND e.customer = k.customer",
    )
    .bind(&changed_accounts)
    .bind(&changed_customers)
    .fetch_all(&mut *tx)
    .await?;
    let by_key: HashMap<(String, String), &Difference> = differences
        .iter()
        .map(|d| {
            (
                (d.account.clone().unwrap_or_default(), d.customer.clone()),
                d,
            )
        })
        .collect();
    for row in rows {
        let account: String = row.try_get("account")?;
        let customer: String = row.try_get("customer")?;
        let version: i64 = row.try_get("version")?;
        let view: String = row.try_get("view")?;
        let mut message: serde_json::Value = serde_json::from_str(&view).unwrap_or_default();
        let difference = by_key.get(&(account.clone(), customer.clone()));
        if let Some(object) = message.as_object_mut() {
            object.insert("type".into(), "entitlements.changed".into());
            object.insert("version".into(), version.into());
            object.insert(
                "added".into(),
                serde_json::json!(difference.map(|d| d.added.clone()).unwrap_or_default()),
            );
            object.insert(
                "removed".into(),
                serde_json::json!(difference.map(|d| d.removed.clone()).unwrap_or_default()),
            );
            object.insert(
                "cause".into(),
                serde_json::json!({"event_id": null, "event_type": "projector.rebuild"}),
            );
        }
        let key = shared::envelope::scoped_key(
            (!account.is_empty()).then_some(account.as_str()),
            &customer,
        );
        sqlx::query("INSERT INTO public.outbox (topic, key, payload) VALUES ($1, $2, $3)")
            .bind(&config.entitlements_topic)
            .bind(key)
            .bind(serde_json::to_vec(&message).unwrap_or_default())
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("SELECT pg_notify('outbox', '')")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Progress on a terminal (one rewritten line) or as periodic log lines.
struct Progress {
    total: u64,
    done: u64,
    started: Instant,
    last: Instant,
    tty: bool,
}

impl Progress {
    fn new(total: u64) -> Self {
        let now = Instant::now();
        Progress {
            total,
            done: 0,
            started: now,
            last: now,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn advance(&mut self, n: u64) {
        self.done += n;
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        if self.last.elapsed() >= every {
            self.last = Instant::now();
            self.report(false);
        }
    }

    fn report(&self, last: bool) {
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = self.done as f64 / elapsed;
        let remaining = self.total.saturating_sub(self.done) as f64 / rate.max(1.0);
        if self.tty {
            let width = 30usize;
            let filled = if self.total == 0 {
                width
            } else {
                ((self.done.min(self.total) as f64 / self.total as f64) * width as f64) as usize
            };
            let mut err = std::io::stderr();
            let _ = write!(
                err,
                "\r[{}{}] {}/{} events  {:.0}/s  ETA {:.0}s   ",
                "#".repeat(filled),
                "-".repeat(width - filled),
                self.done,
                self.total,
                rate,
                remaining
            );
            if last {
                let _ = writeln!(err);
            }
        } else {
            tracing::info!(
                done = self.done,
                total = self.total,
                events_per_sec = rate as u64,
                eta_secs = remaining as u64,
                "rebuild progress"
            );
        }
    }

    fn finish(&self) {
        self.report(true);
    }
}
