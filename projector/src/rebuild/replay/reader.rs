//! The log, read partition by partition up to targets that move forward between reads.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::rebuild::{RebuildError, STALL};
use crate::store::InputRecord;

use super::CHUNK;

/// Reads the log partition by partition up to per-partition targets that may move forward
/// between calls (live keeps applying). Records read past a partition's current target are
/// held back, and the partition paused, until a later target covers them.
pub(in crate::rebuild) struct LogReader {
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
    pub(in crate::rebuild) fn open(config: &Config, schema: &str) -> Result<Self, RebuildError> {
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

    pub(in crate::rebuild) fn partitions(&self) -> impl Iterator<Item = i32> + '_ {
        self.handed.keys().copied()
    }

    /// Records between what was handed out and `targets`.
    pub(in crate::rebuild) fn lag(&self, targets: &BTreeMap<i32, i64>) -> i64 {
        targets
            .iter()
            .map(|(p, target)| (target - self.handed.get(p).copied().unwrap_or(0)).max(0))
            .sum()
    }

    /// The next offset per partition: after a completed read, the targets.
    pub(in crate::rebuild) fn positions(&self) -> &BTreeMap<i32, i64> {
        &self.handed
    }

    /// Up to `max` records below `targets`, in offset order per partition; empty once every
    /// partition has reached its target.
    pub(in crate::rebuild) fn read(
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
