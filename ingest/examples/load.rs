//! Load for ingest: signed webhook POSTs from N concurrent clients, bounded in count and time.
//! Prints requests/s and latency percentiles. Used by `scripts/bench`.
//!
//!   cargo run --release -p ingest --example load -- <url> <whsec_…> [requests] [concurrency]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: load <url> <whsec_…> [requests=20000] [concurrency=64]");
        std::process::exit(2);
    }
    let url = args[1].clone();
    let secret = args[2].clone();
    let requests: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let concurrency: u64 = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(64);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency as usize)
        .build()
        .unwrap();
    let next = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(120);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, url, secret, next, failures) = (
            client.clone(),
            url.clone(),
            secret.clone(),
            next.clone(),
            failures.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests || Instant::now() > deadline {
                    break;
                }
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
                let body = format!(
                    r#"{{"id":"evt_load_{i}","object":"event","api_version":"2025-03-31.basil","created":{now},"livemode":false,"type":"customer.subscription.updated","data":{{"object":{{"id":"sub_{c}","object":"subscription","customer":"cus_load_{c}","status":"active","cancel_at_period_end":false,"items":{{"object":"list","data":[{{"id":"si_{c}","object":"subscription_item","price":{{"id":"price_pro","object":"price","product":"prod_pro","lookup_key":null}},"quantity":1,"current_period_end":{end}}}]}}}}}}}}"#,
                    c = i % 5000,
                    end = now + 2_592_000
                );
                let header = ingest::signature::header_for(&secret, now, body.as_bytes());
                let sent = Instant::now();
                let ok = client
                    .post(&url)
                    .header("Stripe-Signature", header)
                    .body(body)
                    .send()
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false);
                latencies.push(sent.elapsed());
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| {
        latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64()
            * 1000.0
    };
    println!(
        "ingest: {} requests, {} concurrent, {:.1}s: {:.0} req/s; latency ms p50 {:.1} p90 {:.1} p99 {:.1} max {:.1}; failures {}",
        latencies.len(),
        concurrency,
        elapsed,
        latencies.len() as f64 / elapsed,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0),
        failures.load(Ordering::Relaxed)
    );
}
