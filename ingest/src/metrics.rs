//! Ingest's metrics: requests by outcome, append latency, producer queue, related-object
//! fetches after thin events.

use std::sync::Arc;

use shared::metrics::{self, latency_histogram, CounterVec, Gauge, Histogram, Registry};

pub struct Metrics {
    pub requests: CounterVec,
    pub append_latency: Histogram,
    /// Shared with the background fetch, which counts what it did.
    pub related_object_fetches: Arc<CounterVec>,
    /// Sampled from the producer at each scrape.
    producer_queue: Gauge,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = CounterVec::new(
            "ingest_requests_total",
            "Webhook requests by outcome (`ok` or the error code).",
            "outcome",
        );
        requests.register(&mut registry);
        let append_latency = latency_histogram();
        metrics::register(
            &mut registry,
            "ingest_append_latency_seconds",
            "Time from produce to the broker's acknowledgement of a raw event.",
            append_latency.clone(),
        );
        let related_object_fetches = crate::related_fetch::fetch_counter();
        related_object_fetches.register(&mut registry);
        let producer_queue = Gauge::default();
        metrics::register(
            &mut registry,
            "ingest_producer_queue_messages",
            "Records handed to the producer and not yet acknowledged.",
            producer_queue.clone(),
        );
        Metrics {
            requests,
            append_latency,
            related_object_fetches: Arc::new(related_object_fetches),
            producer_queue,
            registry,
        }
    }
}

impl Metrics {
    /// The text of `GET /metrics`, in [`shared::metrics::CONTENT_TYPE`].
    pub fn render(&self, producer_queue: i32) -> String {
        self.producer_queue.set(i64::from(producer_queue));
        metrics::render(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_of_the_spec_is_rendered_with_help_and_type() {
        let metrics = Metrics::default();
        metrics.requests.inc("ok");
        metrics.append_latency.observe(0.002);
        metrics.related_object_fetches.inc("queued");

        let text = metrics.render(3);

        for described in [
            "# TYPE ingest_requests_total counter\n",
            "# TYPE ingest_append_latency_seconds histogram\n",
            "# TYPE ingest_related_object_fetches_total counter\n",
            "# TYPE ingest_producer_queue_messages gauge\n",
        ] {
            assert!(text.contains(described), "no `{described}` in\n{text}");
        }
        assert!(text.contains("ingest_requests_total{outcome=\"ok\"} 1\n"));
        assert!(text.contains("ingest_append_latency_seconds_count 1\n"));
        assert!(text.contains("ingest_related_object_fetches_total{outcome=\"queued\"} 1\n"));
        assert!(
            text.contains("ingest_producer_queue_messages 3\n"),
            "{text}"
        );
        assert_eq!(metrics::undescribed_families(&text), Vec::<&str>::new());
    }
}
