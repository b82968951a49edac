//! Ingest's metrics: requests by outcome, append latency, producer queue.

use shared::metrics::{render_gauge, CounterVec, Histogram, LATENCY_BUCKETS};

pub struct Metrics {
    pub requests: CounterVec,
    pub append_latency: Histogram,
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
        }
    }
}

impl Metrics {
    pub fn render(&self, producer_queue: i32) -> String {
        let mut out = String::with_capacity(2048);
        self.requests.render(&mut out);
        self.append_latency.render(&mut out);
        render_gauge(
            &mut out,
            "ingest_producer_queue_messages",
            "Records handed to the producer and not yet acknowledged.",
            producer_queue,
        );
        out
    }
}
