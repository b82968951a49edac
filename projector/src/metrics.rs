//! The projector's metrics: events by type, duplicates, dead letters, lag, batch latency.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use shared::metrics::{render_gauge, CounterVec, Histogram, LATENCY_BUCKETS};

pub struct Metrics {
    pub events: CounterVec,
    pub ignored: CounterVec,
    pub thin_events: CounterVec,
    pub duplicates: CounterVec,
    pub dead_letters: CounterVec,
    pub changes: CounterVec,
    pub batch_latency: Histogram,
    pub published: CounterVec,
    /// Outbox rows the broker can never take (too large, invalid), set aside by reason.
    pub parked: CounterVec,
    /// Whether this instance holds the relay leader lock and so relays the outbox.
    pub relay_leader: AtomicBool,
    /// Offset gaps accepted because retention removed the records, by partition.
    pub offset_gaps: CounterVec,
    /// Failed batch transactions: `transient` (retried) or `data` (the batch was bisected).
    pub batch_failures: CounterVec,
    /// Consumer lag per partition, refreshed periodically.
    pub lag: Mutex<BTreeMap<i32, i64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            events: CounterVec::new(
                "projector_events_applied_total",
                "New events applied, by Stripe event type.",
                "type",
            ),
            ignored: CounterVec::new(
                "projector_events_ignored_total",
                "New events of types the projection ignores.",
                "type",
            ),
            thin_events: CounterVec::new(
                "projector_thin_events_total",
                "New thin events (v2.core.event), by type: kept in the log, not projected; \
                 ingest appends their related object as a backfill snapshot.",
                "type",
            ),
            duplicates: CounterVec::new(
                "projector_duplicates_total",
                "Records skipped as already applied.",
                "kind",
            ),
            dead_letters: CounterVec::new(
                "projector_dead_letters_total",
                "Records sent to the dead-letter queue.",
                "reason",
            ),
            changes: CounterVec::new(
                "projector_entitlement_changes_total",
                "Entitlement change messages written.",
                "topic",
            ),
            batch_latency: Histogram::new(
                "projector_batch_seconds",
                "Time to apply one batch in Postgres.",
                LATENCY_BUCKETS,
            ),
            published: CounterVec::new(
                "projector_outbox_published_total",
                "Outbox messages acknowledged by Kafka.",
                "topic",
            ),
            parked: CounterVec::new(
                "projector_outbox_parked_total",
                "Outbox messages set aside because Kafka can never take them, by reason.",
                "reason",
            ),
            relay_leader: AtomicBool::new(false),
            offset_gaps: CounterVec::new(
                "projector_offset_gaps_total",
                "Offset gaps accepted because the records were below the log's low watermark (removed by retention).",
                "partition",
            ),
            batch_failures: CounterVec::new(
                "projector_batch_failures_total",
                "Failed batch transactions, by kind: transient (retried with backoff) or data (bisected to the refused record).",
                "kind",
            ),
            lag: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        self.events.render(&mut out);
        self.ignored.render(&mut out);
        self.thin_events.render(&mut out);
        self.duplicates.render(&mut out);
        self.dead_letters.render(&mut out);
        self.changes.render(&mut out);
        self.published.render(&mut out);
        self.parked.render(&mut out);
        render_gauge(
            &mut out,
            "projector_relay_leader",
            "1 while this instance is the one relaying the outbox, else 0.",
            u8::from(self.relay_leader.load(Ordering::Relaxed)),
        );
        self.offset_gaps.render(&mut out);
        self.batch_failures.render(&mut out);
        self.batch_latency.render(&mut out);
        let lag = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        render_gauge(
            &mut out,
            "projector_consumer_lag",
            "Records behind the end of the log, all partitions.",
            lag.values().sum::<i64>(),
        );
        for (partition, value) in lag.iter() {
            out.push_str(&format!(
                "projector_consumer_lag_partition{{partition=\"{partition}\"}} {value}\n"
            ));
        }
        out
    }
}
