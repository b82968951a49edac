//! Minimal Prometheus text exposition: labelled counters and fixed-bucket histograms over
//! atomics. Both services need only these two shapes, which does not warrant a metrics stack.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A counter family with one label; label values are created on first use.
#[derive(Debug)]
pub struct CounterVec {
    name: &'static str,
    help: &'static str,
    label: &'static str,
    values: Mutex<BTreeMap<String, u64>>,
}

impl CounterVec {
    pub const fn new(name: &'static str, help: &'static str, label: &'static str) -> Self {
        CounterVec {
            name,
            help,
            label,
            values: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn inc(&self, label_value: &str) {
        self.add(label_value, 1);
    }

    pub fn add(&self, label_value: &str, n: u64) {
        let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        match values.get_mut(label_value) {
            Some(v) => *v += n,
            None => {
                values.insert(label_value.to_owned(), n);
            }
        }
    }

    pub fn get(&self, label_value: &str) -> u64 {
        let values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        values.get(label_value).copied().unwrap_or(0)
    }

    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP {} {}\n# TYPE {} counter",
            self.name, self.help, self.name
        );
        let values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        for (label, value) in values.iter() {
            let _ = writeln!(
                out,
                "{}{{{}=\"{}\"}} {}",
                self.name,
                self.label,
                escape(label),
                value
            );
        }
    }
}

/// A histogram with fixed upper bounds in seconds.
#[derive(Debug)]
pub struct Histogram {
    name: &'static str,
    help: &'static str,
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// Latency buckets from 1 ms to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Histogram {
    pub fn new(name: &'static str, help: &'static str, bounds: &'static [f64]) -> Self {
        Histogram {
            name,
            help,
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        if let Some(i) = self.bounds.iter().position(|b| seconds <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP {} {}\n# TYPE {} histogram",
            self.name, self.help, self.name
        );
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{}_bucket{{le=\"{}\"}} {}",
                self.name, bound, cumulative
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{}_bucket{{le=\"+Inf\"}} {}", self.name, count);
        let _ = writeln!(
            out,
            "{}_sum {}\n{}_count {}",
            self.name, sum, self.name, count
        );
    }
}

/// A single gauge line.
pub fn render_gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let c = CounterVec::new("requests_total", "Requests.", "outcome");
        c.inc("ok");
        c.add("ok", 2);
        c.inc("bad\"one");
        let h = Histogram::new("latency_seconds", "Latency.", &[0.01, 0.1]);
        h.observe(0.005);
        h.observe(0.05);
        h.observe(3.0);
        let mut out = String::new();
        c.render(&mut out);
        h.render(&mut out);
        assert!(out.contains("requests_total{outcome=\"ok\"} 3\n"));
        assert!(out.contains("requests_total{outcome=\"bad\\\"one\"} 1\n"));
        assert!(out.contains("latency_seconds_bucket{le=\"0.01\"} 1\n"));
        assert!(out.contains("latency_seconds_bucket{le=\"0.1\"} 2\n"));
        assert!(out.contains("latency_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(out.contains("latency_seconds_count 3\n"));
    }
}
