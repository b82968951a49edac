//! The projector's metrics: events by type, duplicates, dead letters, lag, batch latency.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use shared::metrics::{self, latency_histogram, CounterVec, Histogram, Registry};

pub struct Metrics {
    pub events: CounterVec,
    pub ignored: CounterVec,
    pub thin_events: CounterVec,
    pub duplicates: CounterVec,
    /// By the dead letter's stable reason code (`empty_record`, `invalid_envelope`,
    /// `unexpected_shape`, `database_rejected`): count through [`Metrics::dead_lettered`].
    pub dead_letters: CounterVec,
    pub changes: CounterVec,
    pub batch_latency: Histogram,
    pub published: CounterVec,
    /// Outbox rows the broker can never take (too large, invalid), set aside by reason.
    pub parked: CounterVec,
    /// Whether this instance holds the relay leader lock and so relays the outbox, as last
    /// confirmed by the lock connection.
    pub relay_leader: Arc<LeaderLease>,
    /// Offset gaps accepted because retention removed the records, by partition.
    pub offset_gaps: CounterVec,
    /// Failed batch transactions: `transient` (retried) or `data` (the batch was bisected).
    pub batch_failures: CounterVec,
    /// Consumer lag per partition, refreshed periodically.
    pub lag: Arc<Mutex<BTreeMap<i32, i64>>>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let mut counter = |name, help, label| {
            let family = CounterVec::new(name, help, label);
            family.register(&mut registry);
            family
        };
        let events = counter(
            "projector_events_applied_total",
            "New events applied, by Stripe event type.",
            "type",
        );
        let ignored = counter(
            "projector_events_ignored_total",
            "New events of types the projection ignores.",
            "type",
        );
        let thin_events = counter(
            "projector_thin_events_total",
            "New thin events (v2.core.event), by type: kept in the log, not projected; \
             ingest appends their related object as a backfill snapshot.",
            "type",
        );
        let duplicates = counter(
            "projector_duplicates_total",
            "Records skipped as already applied.",
            "kind",
        );
        let dead_letters = counter(
            "projector_dead_letters_total",
            "Records sent to the dead-letter queue, by reason.",
            "reason",
        );
        let changes = counter(
            "projector_entitlement_changes_total",
            "Entitlement change messages written.",
            "topic",
        );
        let published = counter(
            "projector_outbox_published_total",
            "Outbox messages acknowledged by Kafka.",
            "topic",
        );
        let parked = counter(
            "projector_outbox_parked_total",
            "Outbox messages set aside because Kafka can never take them, by reason.",
            "reason",
        );
        let offset_gaps = counter(
            "projector_offset_gaps_total",
            "Offset gaps accepted because the records were below the log's low watermark (removed by retention).",
            "partition",
        );
        let batch_failures = counter(
            "projector_batch_failures_total",
            "Failed batch transactions, by kind: transient (retried with backoff) or data (bisected to the refused record).",
            "kind",
        );
        let batch_latency = latency_histogram();
        metrics::register(
            &mut registry,
            "projector_batch_seconds",
            "Time to apply one batch in Postgres.",
            batch_latency.clone(),
        );
        let sampled = Sampled::default();
        registry.register_collector(Box::new(sampled.clone()));
        Metrics {
            events,
            ignored,
            thin_events,
            duplicates,
            dead_letters,
            changes,
            batch_latency,
            published,
            parked,
            relay_leader: sampled.relay_leader,
            offset_gaps,
            batch_failures,
            lag: sampled.lag,
            registry,
        }
    }
}

impl Metrics {
    /// Counts `n` records dead-lettered with the stable `reason` code their row and DLQ
    /// header carry.
    pub fn dead_lettered(&self, reason: &'static str, n: u64) {
        self.dead_letters.add(reason, n);
    }

    /// The text of `GET /metrics`, in [`shared::metrics::CONTENT_TYPE`].
    pub fn render(&self) -> String {
        metrics::render(&self.registry)
    }
}

/// The relay lead as a scrape reports it: from a moment set when the lock is taken, until a
/// moment that each confirmation of the lock moves on. A leader whose confirmations stop (its
/// lock session was cut, the process is starved) stops reporting the lead when the last one runs
/// out, even before its own heartbeat notices.
///
/// A confirmation counts from when its query was *sent*, which precedes the server's answer and
/// so any successor's taking of the lock; and a fresh leader reports only once its predecessor's
/// last confirmation has surely run out (see `outbox::leader::QUIET`). So no two instances
/// report the lead at one moment, whatever their clocks say, as long as they run at one rate.
#[derive(Debug, Default)]
pub struct LeaderLease {
    term: Mutex<Term>,
}

/// The bounds of the reported lead; no lead while `until` is `None`.
#[derive(Debug, Default, Clone, Copy)]
struct Term {
    from: Option<Instant>,
    until: Option<Instant>,
}

impl LeaderLease {
    /// The lock was taken (its answer arrived) at `taken`: the lead counts from `quiet` later
    /// on, for as long as confirmations keep it.
    pub fn begin(&self, taken: Instant, quiet: Duration) {
        let mut term = self.term();
        term.from = Some(taken + quiet);
        term.until = None;
    }

    /// The lock session answered a query sent at `sent`: the lead counts until `valid_for`
    /// after it.
    pub fn confirm(&self, sent: Instant, valid_for: Duration) {
        let until = sent + valid_for;
        let mut term = self.term();
        term.until = Some(term.until.map_or(until, |u| u.max(until)));
    }

    /// The lead ended.
    pub fn end(&self) {
        *self.term() = Term::default();
    }

    pub fn holds(&self) -> bool {
        let Term { from, until } = *self.term();
        let now = Instant::now();
        from.is_some_and(|from| from <= now) && until.is_some_and(|until| now < until)
    }

    fn term(&self) -> std::sync::MutexGuard<'_, Term> {
        self.term.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Values other tasks keep (the relay's leadership, the lag watcher's last reading), read at
/// each scrape rather than copied into gauges as they change.
#[derive(Debug, Clone, Default)]
struct Sampled {
    relay_leader: Arc<LeaderLease>,
    lag: Arc<Mutex<BTreeMap<i32, i64>>>,
}

impl Collector for Sampled {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let leader = ConstGauge::new(i64::from(self.relay_leader.holds()));
        leader.encode(encoder.encode_descriptor(
            "projector_relay_leader",
            "1 while this instance is the one relaying the outbox, else 0.",
            None,
            MetricType::Gauge,
        )?)?;

        let lag = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        ConstGauge::new(lag.values().sum::<i64>()).encode(encoder.encode_descriptor(
            "projector_consumer_lag",
            "Records behind the end of the log, all partitions.",
            None,
            MetricType::Gauge,
        )?)?;
        let mut by_partition = encoder.encode_descriptor(
            "projector_consumer_lag_partition",
            "Records behind the end of the log, by partition.",
            None,
            MetricType::Gauge,
        )?;
        for (partition, behind) in lag.iter() {
            let labels = [("partition", partition.to_string())];
            ConstGauge::new(*behind).encode(by_partition.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_lead_counts_only_while_recently_confirmed() {
        let lease = LeaderLease::default();
        assert!(!lease.holds(), "no lead before a confirmation");
        lease.begin(Instant::now(), Duration::ZERO);
        lease.confirm(Instant::now(), Duration::from_secs(60));
        assert!(lease.holds());
        lease.end();
        assert!(!lease.holds());
        lease.begin(Instant::now(), Duration::ZERO);
        lease.confirm(Instant::now(), Duration::ZERO);
        assert!(!lease.holds(), "a confirmation that has run out is no lead");
    }

    #[test]
    fn a_confirmation_counts_from_when_its_query_was_sent() {
        let lease = LeaderLease::default();
        lease.begin(Instant::now(), Duration::ZERO);
        // A ping sent two seconds ago (its answer delayed, or the process frozen meanwhile).
        let sent = Instant::now().checked_sub(Duration::from_secs(2)).unwrap();
        lease.confirm(sent, Duration::from_secs(1));
        assert!(!lease.holds(), "a stale answer extends nothing");
        lease.confirm(Instant::now(), Duration::from_secs(60));
        assert!(lease.holds());
    }

    #[test]
    fn a_fresh_leader_reports_the_lead_only_after_its_quiet_time() {
        let lease = LeaderLease::default();
        lease.begin(Instant::now(), Duration::from_secs(60));
        lease.confirm(Instant::now(), Duration::from_secs(120));
        assert!(
            !lease.holds(),
            "a predecessor's confirmation may not have run out yet"
        );
        lease.end();
        let taken = Instant::now().checked_sub(Duration::from_secs(2)).unwrap();
        lease.begin(taken, Duration::from_secs(1));
        lease.confirm(Instant::now(), Duration::from_secs(60));
        assert!(lease.holds(), "the quiet time is over");
    }

    #[test]
    fn every_family_of_the_spec_is_rendered_with_help_and_type() {
        // Arrange: a family is rendered once it has a sample.
        let metrics = Metrics::default();
        metrics.events.add("customer.created", 2);
        metrics.ignored.inc("payment_intent.created");
        metrics
            .thin_events
            .inc("v1.billing.meter.error_report_triggered");
        metrics.duplicates.inc("event_id");
        metrics.dead_lettered("unexpected_shape", 1);
        metrics.changes.inc("entitlements.changes");
        metrics.published.inc("entitlements.changes");
        metrics.parked.inc("message_too_large");
        metrics.offset_gaps.inc("0");
        metrics.batch_failures.inc("transient");
        metrics.batch_latency.observe(0.02);
        metrics.relay_leader.begin(Instant::now(), Duration::ZERO);
        metrics
            .relay_leader
            .confirm(Instant::now(), Duration::from_secs(60));
        *metrics.lag.lock().unwrap() = BTreeMap::from([(0, 3), (1, 4)]);

        // Act
        let text = metrics.render();

        // Assert
        for (family, kind) in [
            ("projector_events_applied_total", "counter"),
            ("projector_events_ignored_total", "counter"),
            ("projector_thin_events_total", "counter"),
            ("projector_duplicates_total", "counter"),
            ("projector_dead_letters_total", "counter"),
            ("projector_entitlement_changes_total", "counter"),
            ("projector_outbox_published_total", "counter"),
            ("projector_outbox_parked_total", "counter"),
            ("projector_offset_gaps_total", "counter"),
            ("projector_batch_failures_total", "counter"),
            ("projector_batch_seconds", "histogram"),
            ("projector_relay_leader", "gauge"),
            ("projector_consumer_lag", "gauge"),
            ("projector_consumer_lag_partition", "gauge"),
        ] {
            let described = format!("# TYPE {family} {kind}\n");
            assert!(text.contains(&described), "no `{described}` in\n{text}");
        }
        for sample in [
            "projector_events_applied_total{type=\"customer.created\"} 2",
            "projector_dead_letters_total{reason=\"unexpected_shape\"} 1",
            "projector_batch_seconds_count 1",
            "projector_relay_leader 1",
            "projector_consumer_lag 7",
            "projector_consumer_lag_partition{partition=\"0\"} 3",
            "projector_consumer_lag_partition{partition=\"1\"} 4",
        ] {
            assert!(
                text.lines().any(|l| l == sample),
                "no `{sample}` in\n{text}"
            );
        }
        assert_eq!(metrics::undescribed_families(&text), Vec::<&str>::new());
    }

    #[test]
    fn the_lag_of_a_partition_no_longer_assigned_disappears() {
        let metrics = Metrics::default();
        *metrics.lag.lock().unwrap() = BTreeMap::from([(0, 3), (1, 4)]);
        let _ = metrics.render();

        *metrics.lag.lock().unwrap() = BTreeMap::from([(1, 0)]);
        let text = metrics.render();

        assert!(!text.contains("partition=\"0\""), "{text}");
        assert!(text.contains("projector_consumer_lag 0\n"), "{text}");
    }
}
