//! The consume loop: batches of records from `stripe.events` → one transaction each. Offsets
//! follow the data: Postgres holds them; Kafka's commit (after the database commit) only shows
//! lag to Kafka tooling.
//!
//! Pipelined, one batch ahead: a fetcher task reads and decodes the next batch while the
//! current one's transaction runs, and waits for that batch to be taken before it reads
//! another. Seeks (after a gap) are made by the fetcher between two batches, so every batch is
//! wholly read before or wholly after a seek, and the loop drops what a batch read before a
//! seek holds of the partition it moved.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::Instrument;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::{mpsc, watch, Notify};

use crate::config::Config;
use crate::isolation::apply_isolating;
use crate::metrics::Metrics;
use crate::projection::EntitlementPolicy;
use crate::store::{self, BatchContext, BatchMode, BatchOutcome, DecodedRecord, InputRecord};

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
        // librdkafka fills its prefetch queue per partition, so the defaults (100,000 records)
        // and 128 MiB here let a catch-up hold most of the log in memory: peak RSS grew with
        // the log, 160 MiB at 100k events, 275 MiB at 200k. Bounded per partition instead:
        // 2 MiB per partition: the fetcher's batch read ahead holds what the prefetch used to,
        // and 8 MiB cost 66 MiB more peak RSS at the same rate (BENCHMARKS.md, "Catch-up").
        .set("queued.min.messages", "2000")
        .set("queued.max.messages.kbytes", "2048")
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

/// What to do when a partition's stored next offset is below the first record consumed from
/// it (the records in between were not seen).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapAction {
    /// Every missing offset is below the partition's low watermark: retention removed those
    /// records, no read can return them, so the consumer goes on from the first record.
    Accept,
    /// Some missing record is still in the log (a rebalance or a seek skipped it): read again
    /// from this offset. Never skipped, however often it happens.
    SeekTo(i64),
}

/// Decides a gap on a partition: `stored_next` from Postgres, `first_consumed` the first
/// record this batch holds, `low_watermark` the partition's first offset the log still holds.
pub fn on_gap(stored_next: i64, first_consumed: i64, low_watermark: i64) -> GapAction {
    if first_consumed <= low_watermark {
        GapAction::Accept
    } else {
        // Below the low watermark nothing can be read; seeking there would only be reset.
        GapAction::SeekTo(stored_next.max(low_watermark))
    }
}

/// Seeks the loop asks for, made by the fetcher before it reads its next batch.
#[derive(Default)]
struct SeekRequests {
    /// The number of requests so far, and those not yet made (one per partition).
    pending: Mutex<(u64, Vec<(i32, i64)>)>,
    /// Wakes a fetcher waiting for records, so a seek is never held up by an idle log.
    wake: Notify,
}

impl SeekRequests {
    /// Asks for `partition` to be read again from `offset`; returns the request's number.
    fn request(&self, partition: i32, offset: i64) -> u64 {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.0 += 1;
        pending.1.retain(|(p, _)| *p != partition);
        pending.1.push((partition, offset));
        self.wake.notify_one();
        pending.0
    }

    /// The requests not yet made, and the number of the last request they include.
    fn take(&self) -> (u64, Vec<(i32, i64)>) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        (pending.0, std::mem::take(&mut pending.1))
    }
}

/// A batch read and decoded ahead.
struct Fetched {
    records: Vec<DecodedRecord>,
    /// Every seek request up to this number was made before the batch was read.
    seeks_made: u64,
}

/// Reads and decodes batches ahead of the loop: at most one batch waits to be applied.
struct Fetcher {
    config: Arc<Config>,
    consumer: Arc<LogConsumer>,
    seeks: Arc<SeekRequests>,
}

impl Fetcher {
    async fn run(self, batches: mpsc::Sender<Fetched>, mut shutdown: watch::Receiver<bool>) {
        loop {
            // The slot first: a batch is read only when the previous one has been taken.
            let permit = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return,
                permit = batches.reserve() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let (seeks_made, seeks) = self.seeks.take();
            for (partition, offset) in seeks {
                if let Err(e) = self.consumer.seek(
                    &self.config.events_topic,
                    partition,
                    Offset::Offset(offset),
                    Duration::from_secs(5),
                ) {
                    tracing::warn!(partition, error = %e, "seek failed; the records will be re-checked");
                }
            }
            let Some(records) = self.next_batch(&mut shutdown).await else {
                return;
            };
            // Parsing is CPU work: off the runtime's workers, which serve the transaction.
            let records = match tokio::task::spawn_blocking(move || {
                records.into_iter().map(DecodedRecord::new).collect()
            })
            .await
            {
                Ok(records) => records,
                Err(e) => {
                    tracing::error!(error = %e, "decoding a batch failed");
                    return;
                }
            };
            permit.send(Fetched {
                records,
                seeks_made,
            });
        }
    }

    /// Up to `batch_max_events` records: waits for the first, then at most `batch_linger` for
    /// more; returns early when a seek is requested. `None` on shutdown.
    async fn next_batch(&self, shutdown: &mut watch::Receiver<bool>) -> Option<Vec<InputRecord>> {
        let first = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return None,
            _ = self.seeks.wake.notified() => return Some(Vec::new()),
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
            let message = tokio::select! {
                _ = self.seeks.wake.notified() => break,
                message = tokio::time::timeout_at(deadline, self.consumer.recv()) => message,
            };
            match message {
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
}

impl ConsumeLoop {
    /// Runs until `shutdown` turns true; a batch in flight is finished first.
    pub async fn run(
        self,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), rdkafka::error::KafkaError> {
        self.consumer.subscribe(&[&self.config.events_topic])?;
        let mut policy = LivePolicy::new(&self.config);
        tracing::info!(topic = %self.config.events_topic, group = %self.config.group_id, "consuming");
        // Batches get a connection of their own: a connection keeps its buffers at the size of
        // the largest message it carried (megabytes for a batch of 5,000 snapshots), and the
        // shared pool hands out each of its connections in turn, so every one of them grew to
        // that size (peak RSS 379 MiB at 1M events instead of a batch's worth).
        let batches_pool = match store::connect(&self.config.database_url, 1).await {
            Ok(pool) => pool,
            Err(e) => {
                tracing::warn!(error = %e, "no connection of its own for batches; sharing the pool");
                self.pool.clone()
            }
        };
        let seeks = Arc::new(SeekRequests::default());
        let (batches, mut fetched) = mpsc::channel::<Fetched>(1);
        let fetcher = Fetcher {
            config: self.config.clone(),
            consumer: self.consumer.clone(),
            seeks: seeks.clone(),
        };
        let fetcher = tokio::spawn(
            fetcher
                .run(batches, shutdown.clone())
                .instrument(tracing::info_span!("fetcher")),
        );
        // Seeks requested and not known to be made before the batch at hand was read.
        let mut sought: Vec<(u64, i32)> = Vec::new();
        loop {
            let batch = tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => break,
                batch = fetched.recv() => batch,
            };
            let Some(Fetched {
                mut records,
                seeks_made,
            }) = batch
            else {
                break;
            };
            sought.retain(|(request, _)| *request > seeks_made);
            if !sought.is_empty() {
                // Read before the seek: the partition is read again from where it was sought.
                records.retain(|r| !sought.iter().any(|(_, p)| *p == r.partition));
            }
            if records.is_empty() {
                continue;
            }
            policy.refresh();
            let started = Instant::now();
            let Some(mut outcome) = self
                .apply(
                    &batches_pool,
                    &records,
                    &HashSet::new(),
                    &policy.policy,
                    &mut shutdown,
                )
                .await
            else {
                break;
            };
            let gaps = std::mem::take(&mut outcome.gaps);
            let accepted = self.handle_gaps(&records, &gaps, &seeks, &mut sought).await;
            if !accepted.is_empty() {
                // The records of an accepted gap's partition were not applied above: apply them
                // now, before anything later of that partition is read.
                let again: Vec<DecodedRecord> = records
                    .iter()
                    .filter(|r| accepted.contains(&r.partition))
                    .cloned()
                    .collect();
                let Some(rest) = self
                    .apply(
                        &batches_pool,
                        &again,
                        &accepted,
                        &policy.policy,
                        &mut shutdown,
                    )
                    .await
                else {
                    break;
                };
                outcome.absorb(rest);
            }
            self.metrics
                .batch_latency
                .observe(started.elapsed().as_secs_f64());
            tracing::debug!(
                records = records.len(),
                changes = outcome.changes,
                "batch applied"
            );
            self.consumer.context().remember(&outcome.next_offsets);
            self.record(&outcome);
            self.commit_to_kafka(&outcome);
        }
        drop(fetched);
        fetcher.abort();
        tracing::info!("consumer stopped");
        Ok(())
    }

    async fn apply(
        &self,
        pool: &PgPool,
        records: &[DecodedRecord],
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
        apply_isolating(pool, &ctx, records, &self.metrics, shutdown).await
    }

    /// Seeks back where records were skipped, and returns the partitions whose gap lies wholly
    /// below the log's start (to be accepted).
    async fn handle_gaps(
        &self,
        records: &[DecodedRecord],
        gaps: &[(i32, i64)],
        seeks: &SeekRequests,
        sought: &mut Vec<(u64, i32)>,
    ) -> HashSet<i32> {
        let mut accepted = HashSet::new();
        for &(partition, stored_next) in gaps {
            let Some(first_consumed) = records
                .iter()
                .find(|r| r.partition == partition)
                .map(|r| r.offset)
            else {
                continue;
            };
            let action = match self.low_watermark(partition).await {
                Some(low) => on_gap(stored_next, first_consumed, low),
                // Unknown start: never assume the records are gone.
                None => GapAction::SeekTo(stored_next),
            };
            match action {
                GapAction::Accept => {
                    tracing::warn!(
                        partition,
                        stored_next_offset = stored_next,
                        first_offset = first_consumed,
                        missing = first_consumed - stored_next,
                        "records below the log's start were removed by retention; going on from its start"
                    );
                    self.metrics.offset_gaps.add(&partition.to_string(), 1);
                    accepted.insert(partition);
                }
                GapAction::SeekTo(offset) => {
                    tracing::warn!(
                        partition,
                        stored_next_offset = stored_next,
                        first_offset = first_consumed,
                        seek_to = offset,
                        "records ahead of the stored offset; seeking back"
                    );
                    sought.push((seeks.request(partition, offset), partition));
                }
            }
        }
        accepted
    }

    /// The first offset the log still holds for `partition`; `None` if the broker does not say.
    async fn low_watermark(&self, partition: i32) -> Option<i64> {
        let consumer = self.consumer.clone();
        let topic = self.config.events_topic.clone();
        let watermarks = tokio::task::spawn_blocking(move || {
            consumer.fetch_watermarks(&topic, partition, Duration::from_secs(5))
        })
        .await
        .ok()?;
        match watermarks {
            Ok((low, _high)) => Some(low),
            Err(e) => {
                tracing::warn!(partition, error = %e, "cannot read the partition's low watermark");
                None
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
        for (event_type, n) in &outcome.thin {
            self.metrics.thin_events.add(event_type, *n);
        }
        if outcome.duplicates > 0 {
            self.metrics.duplicates.add("event_id", outcome.duplicates);
        }
        if outcome.replayed > 0 {
            self.metrics.duplicates.add("offset", outcome.replayed);
        }
        for (reason, n) in &outcome.dead_letter_reasons {
            self.metrics.dead_lettered(reason, *n);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seek_requests_are_numbered_and_the_latest_per_partition_is_made() {
        let seeks = SeekRequests::default();
        assert_eq!(seeks.take(), (0, vec![]));
        assert_eq!(seeks.request(1, 10), 1);
        assert_eq!(seeks.request(2, 5), 2);
        assert_eq!(seeks.request(1, 7), 3);
        // A batch read after this take was read after requests 1..=3.
        assert_eq!(seeks.take(), (3, vec![(2, 5), (1, 7)]));
        assert_eq!(seeks.take(), (3, vec![]));
    }

    #[test]
    fn a_gap_wholly_below_the_low_watermark_is_accepted() {
        // Stored 10; retention removed 0..40; the first record read is the log's first.
        assert_eq!(on_gap(10, 40, 40), GapAction::Accept);
        // Retention moved on further while we read.
        assert_eq!(on_gap(10, 40, 55), GapAction::Accept);
    }

    #[test]
    fn a_gap_over_records_the_log_still_holds_is_never_accepted() {
        // Nothing was removed: 10..40 are there, read them.
        assert_eq!(on_gap(10, 40, 0), GapAction::SeekTo(10));
        // Retention removed 0..20, but 20..40 are there: from the log's start, not 10.
        assert_eq!(on_gap(10, 40, 20), GapAction::SeekTo(20));
        // However often it happens: the decision depends on the log alone.
        for _ in 0..10 {
            assert_eq!(on_gap(10, 11, 10), GapAction::SeekTo(10));
        }
    }
}
