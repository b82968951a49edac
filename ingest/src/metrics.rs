//! Ingest's metrics: requests by outcome, append latency, producer queue, related-object
//! fetches after thin events.

use std::sync::Arc;

use shared::metrics::{render_gauge, CounterVec, Histogram, LATENCY_BUCKETS};

pub struct Metrics {
    pub requests: CounterVec,
    pub append_latency: Histogram,
    /// Shared with the background fetch, which counts what it did.
    pub related_object_fetches: Arc<CounterVec>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: CounterVec::new(
                "ingest_requests_total",
                "Webhook requests by outcome (`ok` or the error code).",
                "outcome",
            ),
            append_latency: Histogram::new(
                "ingest_append_latency_seconds",
                "Time from produce to the broker's acknowledgement of a raw event.",
                LATENCY_BUCKETS,
            ),
            related_object_fetches: Arc::new(crate::related_fetch::fetch_counter()),
        }
    }
}

impl Metrics {
    pub fn render(&self, producer_queue: i32) -> String {
        let mut out = String::with_capacity(2048);
        self.requests.render(&mut out);
        self.append_latency.render(&mut out);
        self.related_object_fetches.render(&mut out);
        render_gauge(
            &mut out,
            "ingest_producer_queue_messages",
            "Records handed to the producer and not yet acknowledged.",
            producer_queue,
        );
        out
    }
}
