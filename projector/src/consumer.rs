//! The consume loop: batches of records from `stripe.events` → one transaction each. Offsets
//! follow the data: Postgres holds them; Kafka's commit (after the database commit) only shows
//! lag to Kafka tooling.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::projection::EntitlementPolicy;
use crate::store::{apply_batch, BatchContext, BatchMode, BatchOutcome, InputRecord};

/// Retries of a failing batch back off up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A partition whose stored offset is ahead of the log after this many seeks is taken to start
/// later (records deleted by an operator); the gap is logged and accepted.
const MAX_GAP_SEEKS: u32 = 3;

/// The consumer of the raw log, whose context seeks every assigned partition to the offset
/// Postgres holds for it.
pub type LogConsumer = StreamConsumer<SeekToStored>;

/// Next offsets per partition as last committed to Postgres by this process (loaded at start,
/// updated after each batch). On assignment the consumer starts there rather than at Kafka's
/// committed offset, which trails the database. Another instance may have gone further since;
/// then the records below its offsets are re-read and skipped, and a gap is sought back to.
pub struct SeekToStored {
    topic: String,
    stored: Mutex<HashMap<i32, i64>>,
}

impl SeekToStored {
    pub fn remember(&self, offsets: &[(i32, i64)]) {
        let mut stored = self.stored.lock().unwrap_or_else(|e| e.into_inner());
        for (partition, next) in offsets {
            let entry = stored.entry(*partition).or_insert(*next);
            *entry = (*entry).max(*next);
        }
    }
}

impl ClientContext for SeekToStored {}

impl ConsumerContext for SeekToStored {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let stored = self
                    .stored
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                for (partition, next) in &stored {
                    if tpl.find_partition(&self.topic, *partition).is_some() {
                        let _ = tpl.set_partition_offset(
                            &self.topic,
                            *partition,
                            Offset::Offset(*next),
                        );
                    }
                }
                tracing::info!(
                    partitions = tpl.count(),
                    from_postgres = stored.len(),
                    "partitions assigned"
                );
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(partitions = tpl.count(), "partitions revoked");
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::warn!(error = ?other, "rebalance error");
                if cooperative {
                    Ok(())
                } else {
                    consumer.unassign()
                }
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "applying the rebalance failed");
        }
    }
}

/// Creates the consumer; `stored` are the next offsets Postgres holds for the raw log.
pub fn create_consumer(
    config: &Config,
    stored: Vec<(i32, i64)>,
) -> Result<LogConsumer, rdkafka::error::KafkaError> {
    let context = SeekToStored {
        topic: config.events_topic.clone(),
        stored: Mutex::new(stored.into_iter().collect()),
    };
    config
        .kafka
        .client_config()
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // A restarted projector gets its partitions back quickly.
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.max.bytes", "52428800")
        .set("queued.max.messages.kbytes", "131072")
        .create_with_context(context)
}

/// The entitlement policy, reloaded when its file changes, so that a new mapping applies to the
/// customers touched from then on (and `projector rebuild` applies it to everyone).
struct LivePolicy {
    policy: EntitlementPolicy,
    path: Option<std::path::PathBuf>,
    modified: Option<std::time::SystemTime>,
}

impl LivePolicy {
    fn new(config: &Config) -> Self {
        let path = config.policy_path.clone();
        let modified = path
            .as_ref()
            .and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        LivePolicy {
            policy: config.policy.clone(),
            path,
            modified,
        }
    }

    fn refresh(&mut self) {
        let Some(path) = &self.path else { return };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if modified == self.modified {
            return;
        }
        self.modified = modified;
        match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| EntitlementPolicy::from_toml_str(&text).map_err(|e| e.to_string()))
        {
            Ok(policy) => {
                tracing::info!(path = %path.display(), "entitlements mapping reloaded");
                self.policy = policy;
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "entitlements mapping not reloaded; keeping the previous one")
            }
        }
    }
}

pub struct ConsumeLoop {
    pub config: Arc<Config>,
    pub pool: PgPool,
    pub consumer: Arc<LogConsumer>,
    pub metrics: Arc<Metrics>,
}

impl ConsumeLoop {
    /// Runs until `shutdown` turns true; a batch in flight is finished first.
    pub async fn run(
        self,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), rdkafka::error::KafkaError> {
        self.consumer.subscribe(&[&self.config.events_topic])?;
        let mut gap_seeks: HashMap<(i32, i64), u32> = HashMap::new();
        let mut accept_gaps: HashSet<i32> = HashSet::new();
        let mut policy = LivePolicy::new(&self.config);
        tracing::info!(topic = %self.config.events_topic, group = %self.config.group_id, "consuming");
        loop {
            let Some(records) = self.next_batch(&mut shutdown).await else {
                break;
            };
            if records.is_empty() {
                continue;
            }
            policy.refresh();
            let outcome = match self
                .apply_with_retry(&records, &accept_gaps, &policy.policy, &mut shutdown)
                .await
            {
                Some(outcome) => outcome,
                None => break,
            };
            accept_gaps.clear();
            for (partition, next) in &outcome.gaps {
                let seeks = gap_seeks.entry((*partition, *next)).or_default();
                *seeks += 1;
                if *seeks > MAX_GAP_SEEKS {
                    tracing::error!(
                        partition,
                        next_offset = next,
                        "the log starts after the stored offset; accepting the gap"
                    );
                    accept_gaps.insert(*partition);
                    continue;
                }
                tracing::warn!(
                    partition,
                    next_offset = next,
                    "records ahead of the stored offset; seeking back"
                );
                if let Err(e) = self.consumer.seek(
                    &self.config.events_topic,
                    *partition,
                    Offset::Offset(*next),
                    Duration::from_secs(5),
                ) {
                    tracing::warn!(partition, error = %e, "seek failed; the records will be re-checked");
                }
            }
            self.consumer.context().remember(&outcome.next_offsets);
            self.record(&outcome);
            self.commit_to_kafka(&outcome);
        }
        tracing::info!("consumer stopped");
        Ok(())
    }

    /// Up to `batch_max_events` records: waits for the first, then at most `batch_linger` for
    /// more. `None` on shutdown.
    async fn next_batch(&self, shutdown: &mut watch::Receiver<bool>) -> Option<Vec<InputRecord>> {
        let first = tokio::select! {
            _ = shutdown.changed() => return None,
            message = self.consumer.recv() => message,
        };
        let mut records = Vec::with_capacity(self.config.batch_max_events);
        match first {
            Ok(m) => records.push(to_record(&m)),
            Err(e) => {
                tracing::warn!(error = %e, "consume error");
                tokio::time::sleep(Duration::from_millis(200)).await;
                return Some(records);
            }
        }
        let deadline = tokio::time::Instant::now() + self.config.batch_linger;
        while records.len() < self.config.batch_max_events {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Err(_) => break,
                Ok(Ok(m)) => records.push(to_record(&m)),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "consume error");
                    break;
                }
            }
        }
        Some(records)
    }

    /// Applies the batch, retrying transient failures (Postgres down, serialisation) with capped
    /// backoff: a batch is never skipped. `None` when shutdown arrives while retrying.
    async fn apply_with_retry(
        &self,
        records: &[InputRecord],
        accept_gaps: &HashSet<i32>,
        policy: &EntitlementPolicy,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<BatchOutcome> {
        let ctx = BatchContext {
            events_topic: &self.config.events_topic,
            entitlements_topic: &self.config.entitlements_topic,
            dlq_topic: &self.config.dlq_topic,
            policy,
            mode: BatchMode::Live,
            accept_gaps,
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            let span = tracing::info_span!(
                "batch",
                records = records.len(),
                first_partition = records[0].partition,
                first_offset = records[0].offset
            );
            let result = {
                let _entered = span.enter();
                apply_batch(&self.pool, &ctx, records).await
            };
            match result {
                Ok(outcome) => {
                    self.metrics
                        .batch_latency
                        .observe(started.elapsed().as_secs_f64());
                    tracing::debug!(
                        records = records.len(),
                        changes = outcome.changes,
                        "batch applied"
                    );
                    return Some(outcome);
                }
                Err(e) => {
                    tracing::error!(error = %e, retry_in_ms = backoff.as_millis() as u64, "batch failed; retrying");
                    tokio::select! {
                        _ = shutdown.changed() => return None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn record(&self, outcome: &BatchOutcome) {
        for (event_type, n) in &outcome.events_by_type {
            self.metrics.events.add(event_type, *n);
        }
        for (event_type, n) in &outcome.ignored {
            self.metrics.ignored.add(event_type, *n);
        }
        if outcome.duplicates > 0 {
            self.metrics.duplicates.add("event_id", outcome.duplicates);
        }
        if outcome.replayed > 0 {
            self.metrics.duplicates.add("offset", outcome.replayed);
        }
        if outcome.dead_letters > 0 {
            self.metrics.dead_letters.add("all", outcome.dead_letters);
        }
        if outcome.changes > 0 {
            self.metrics
                .changes
                .add(&self.config.entitlements_topic, outcome.changes);
        }
    }

    fn commit_to_kafka(&self, outcome: &BatchOutcome) {
        if outcome.next_offsets.is_empty() {
            return;
        }
        let mut list = TopicPartitionList::new();
        for (partition, next) in &outcome.next_offsets {
            let _ = list.add_partition_offset(
                &self.config.events_topic,
                *partition,
                Offset::Offset(*next),
            );
        }
        // Informational only (lag in Kafka tooling); Postgres holds the truth.
        if let Err(e) = self.consumer.commit(&list, CommitMode::Async) {
            tracing::debug!(error = %e, "offset commit to Kafka failed");
        }
    }
}

fn to_record(message: &rdkafka::message::BorrowedMessage<'_>) -> InputRecord {
    InputRecord {
        partition: message.partition(),
        offset: message.offset(),
        payload: message.payload().map(<[u8]>::to_vec),
    }
}

/// Refreshes the lag gauge: end of each partition minus the next offset stored in Postgres.
pub async fn watch_lag(
    config: Arc<Config>,
    pool: PgPool,
    consumer: Arc<LogConsumer>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        let stored: Vec<(i32, i64)> = match sqlx::query_as(
            "SELECT partition, next_offset FROM consumer_offsets WHERE topic = $1",
        )
        .bind(&config.events_topic)
        .fetch_all(&pool)
        .await
        {
            Ok(rows) => rows,
            Err(_) => continue,
        };
        let consumer = consumer.clone();
        let topic = config.events_topic.clone();
        let lag = tokio::task::spawn_blocking(move || {
            let mut lag = std::collections::BTreeMap::new();
            let Ok(metadata) = consumer.fetch_metadata(Some(&topic), Duration::from_secs(2)) else {
                return lag;
            };
            for t in metadata.topics() {
                for p in t.partitions() {
                    if let Ok((_, high)) =
                        consumer.fetch_watermarks(&topic, p.id(), Duration::from_secs(2))
                    {
                        let next = stored
                            .iter()
                            .find(|(sp, _)| *sp == p.id())
                            .map(|(_, o)| *o)
                            .unwrap_or(0);
                        lag.insert(p.id(), (high - next).max(0));
                    }
                }
            }
            lag
        })
        .await
        .unwrap_or_default();
        *metrics.lag.lock().unwrap_or_else(|e| e.into_inner()) = lag;
    }
}
