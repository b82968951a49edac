//! What both services' `GET /metrics` are built from: a `prometheus-client` registry (the
//! Prometheus project's own Rust client), rendered in the Prometheus text format 0.0.4.
//!
//! The library owns the exposition (HELP and TYPE for every family, escaping, cumulative
//! buckets); this module adds only the one shape both services count with, a counter family
//! with a single label whose values (an outcome, an event type) are known only at run time.

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::Histogram;
pub use prometheus_client::registry::Registry;

/// The `Content-Type` of [`render`]'s text: Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Latency buckets from 1 ms to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram over [`LATENCY_BUCKETS`], in seconds.
pub fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS.iter().copied())
}

/// One label of a [`CounterVec`] sample: its name (fixed per family) and value.
type LabelSet = [(&'static str, String); 1];

/// A counter family with one label, such as `ingest_requests_total{outcome="ok"}`; a label
/// value's counter is created on first use. Clones count into the same family.
#[derive(Debug, Clone)]
pub struct CounterVec {
    name: &'static str,
    help: &'static str,
    label: &'static str,
    family: Family<LabelSet, Counter>,
}

impl CounterVec {
    /// `name` is the sample name the SPEC gives, ending in `_total`; `help` is one sentence.
    pub fn new(name: &'static str, help: &'static str, label: &'static str) -> Self {
        debug_assert!(
            name.ends_with("_total"),
            "counter {name} must end in _total"
        );
        CounterVec {
            name,
            help,
            label,
            family: Family::default(),
        }
    }

    pub fn inc(&self, label_value: &str) {
        self.add(label_value, 1);
    }

    pub fn add(&self, label_value: &str, n: u64) {
        self.family
            .get_or_create(&self.labels(label_value))
            .inc_by(n);
    }

    pub fn get(&self, label_value: &str) -> u64 {
        self.family
            .get(&self.labels(label_value))
            .map_or(0, |counter| counter.get())
    }

    /// Adds the family to `registry`, which renders it.
    pub fn register(&self, registry: &mut Registry) {
        // The library appends `_total` to a counter's samples, as the text format requires.
        let family_name = self.name.strip_suffix("_total").unwrap_or(self.name);
        registry.register(family_name, sentence(self.help), self.family.clone());
    }

    fn labels(&self, label_value: &str) -> LabelSet {
        [(self.label, label_value.to_owned())]
    }
}

/// Adds a histogram or gauge to `registry` under its full sample name.
pub fn register(
    registry: &mut Registry,
    name: &'static str,
    help: &'static str,
    metric: impl prometheus_client::registry::Metric,
) {
    registry.register(name, sentence(help), metric);
}

/// The registry in the Prometheus text format 0.0.4 ([`CONTENT_TYPE`]).
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(4096);
    // Every error the encoder can return comes from the writer, and a String takes every write.
    if let Err(error) = prometheus_text::encode(&mut out, registry) {
        tracing::error!(%error, "metrics could not be rendered");
    }
    out
}

/// The library ends every HELP text with a full stop of its own.
fn sentence(help: &'static str) -> &'static str {
    help.strip_suffix('.').unwrap_or(help)
}

/// The families of `text` (rendered by [`render`]) that have a sample but no HELP or no TYPE
/// line; the services' tests assert there are none.
pub fn undescribed_families(text: &str) -> Vec<&str> {
    let mut undescribed = Vec::new();
    for sample in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = sample.split(['{', ' ']).next().unwrap_or(sample);
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                text.contains(&format!("# TYPE {base} histogram\n"))
                    .then_some(base)
            })
            .unwrap_or(name);
        let described = text.contains(&format!("# HELP {family} "))
            && text.contains(&format!("# TYPE {family} "));
        if !described && !undescribed.contains(&family) {
            undescribed.push(family);
        }
    }
    undescribed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets_in_the_text_format() {
        let mut registry = Registry::default();
        let requests = CounterVec::new("requests_total", "Requests.", "outcome");
        requests.register(&mut registry);
        let latency = Histogram::new([0.01, 0.1]);
        register(
            &mut registry,
            "latency_seconds",
            "Latency.",
            latency.clone(),
        );

        requests.inc("ok");
        requests.add("ok", 2);
        requests.inc("bad\"one");
        latency.observe(0.005);
        latency.observe(0.05);
        latency.observe(3.0);
        let out = render(&registry);

        assert!(out.contains("# HELP requests_total Requests.\n# TYPE requests_total counter\n"));
        assert!(out.contains("requests_total{outcome=\"ok\"} 3\n"), "{out}");
        assert!(
            out.contains("requests_total{outcome=\"bad\\\"one\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("# TYPE latency_seconds histogram\n"), "{out}");
        assert!(
            out.contains("latency_seconds_bucket{le=\"0.01\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("latency_seconds_bucket{le=\"0.1\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("latency_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("latency_seconds_count 3\n"), "{out}");
        assert_eq!(requests.get("ok"), 3);
        assert_eq!(requests.get("never"), 0);
        assert_eq!(undescribed_families(&out), Vec::<&str>::new());
    }

    #[test]
    fn a_sample_without_help_or_type_is_found() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\na_total 1\nlag{partition=\"0\"} 3\n";

        assert_eq!(undescribed_families(text), vec!["lag"]);
    }

    #[test]
    fn clones_count_into_the_same_family() {
        let mut registry = Registry::default();
        let fetches = CounterVec::new("fetches_total", "Fetches.", "outcome");
        fetches.register(&mut registry);

        fetches.clone().inc("fetched");

        assert!(render(&registry).contains("fetches_total{outcome=\"fetched\"} 1\n"));
    }
}
