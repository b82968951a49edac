//! Load generator for ingest (or the `ceiling` example): realistic signed Stripe webhooks,
//! 2-8 KB (subscriptions with items, invoices with lines), each with a fresh event id and signed
//! with the current time, as Stripe signs. Bounded in count and in time; only 127.0.0.1.
//!
//! - closed loop: `--connections N` senders, each sends its next request when the previous one
//!   is answered;
//! - open loop: `--rate R` requests/s on a fixed schedule, whatever the answers do; latency is
//!   measured from the *intended* send time, so a stall is not hidden by requests that were
//!   never sent during it (coordinated omission). `--connections` then caps the requests in
//!   flight; a request waiting for a connection is late, and its latency says so.
//!
//! Latencies go to an HDR histogram (1 µs .. 60 s, 3 significant digits); every answer that is
//! not 2xx is counted by status code, every transport failure by kind.
//!
//!   cargo run --release -p ingest --example load -- [options] <url> <whsec_…>
//!     --connections N   closed-loop senders, or the in-flight cap when open loop (default 64)
//!     --requests N      requests measured (default 20000)
//!     --rate R          open loop at R requests/s (default: closed loop)
//!     --max-secs S      stop measuring after S seconds whatever the count (default 120)
//!     --warmup N        requests sent and not measured first (default 500); open loop: on
//!                       the same schedule as the measured ones, which follow without a pause
//!     --timeline MS     also print p99 and max latency of every MS milliseconds of the run
//!     --customers N     distinct customers, so partition keys spread (default 5000)
//!     --label TEXT      printed first on the result line, for A/B runs

// The payload templates are large `json!` literals.
#![recursion_limit = "256"]

#[path = "support/payloads.rs"]
mod payloads;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use payloads::Template;
use tokio::sync::Semaphore;

struct Options {
    url: String,
    secret: String,
    connections: usize,
    requests: u64,
    rate: Option<f64>,
    max_secs: u64,
    warmup: u64,
    customers: u64,
    label: String,
    /// Milliseconds per slot of the timeline, when one is printed.
    timeline: Option<u64>,
}

fn usage() -> ! {
    eprintln!(
        "usage: load [--connections N] [--requests N] [--rate R] [--max-secs S] [--warmup N] \
         [--customers N] [--label TEXT] [--timeline MS] <url> <whsec_…>"
    );
    std::process::exit(2)
}

fn options() -> Options {
    let mut positional = Vec::new();
    let mut o = Options {
        url: String::new(),
        secret: String::new(),
        connections: 64,
        requests: 20_000,
        rate: None,
        max_secs: 120,
        warmup: 500,
        customers: 5000,
        label: String::new(),
        timeline: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--connections" => o.connections = value().parse().unwrap_or_else(|_| usage()),
            "--requests" => o.requests = value().parse().unwrap_or_else(|_| usage()),
            "--rate" => o.rate = Some(value().parse().unwrap_or_else(|_| usage())),
            "--max-secs" => o.max_secs = value().parse().unwrap_or_else(|_| usage()),
            "--warmup" => o.warmup = value().parse().unwrap_or_else(|_| usage()),
            "--customers" => o.customers = value().parse().unwrap_or_else(|_| usage()),
            "--label" => o.label = value(),
            "--timeline" => o.timeline = Some(value().parse().unwrap_or_else(|_| usage())),
            flag if flag.starts_with("--") => usage(),
            _ => positional.push(arg),
        }
    }
    let [url, secret] = <[String; 2]>::try_from(positional).unwrap_or_else(|_| usage());
    // A load generator aimed elsewhere by mistake is an attack; this one only loads this host.
    let host_ok = ["http://127.0.0.1:", "http://localhost:"]
        .iter()
        .any(|p| url.starts_with(p));
    if !host_ok {
        eprintln!("load: only http://127.0.0.1:<port>/… targets are allowed, got {url}");
        std::process::exit(2);
    }
    if o.connections == 0 || o.requests == 0 || o.customers == 0 {
        usage();
    }
    o.url = url;
    o.secret = secret;
    o
}

/// What every request shares: the bodies, the client, the tallies.
struct Load {
    client: reqwest::Client,
    url: String,
    secret: String,
    templates: Vec<Template>,
    customers: u64,
    run: u32,
    sequence: AtomicU64,
    tally: Mutex<Tally>,
}

#[derive(Default)]
struct Tally {
    latency: Option<Histogram<u64>>,
    /// From the intended send time to the request handed to the client (a connection permit,
    /// rendering, signing): the generator's own lateness. When its tail is as long as the
    /// latency's, the tail is the machine's scheduling, not the server.
    lateness: Option<Histogram<u64>>,
    ok: u64,
    by_status: BTreeMap<u16, u64>,
    by_error: BTreeMap<&'static str, u64>,
    /// The latency of the requests of each slot of the run (by intended send time), to tell
    /// a stall (a few bad slots) from a cost every request pays.
    by_slot: Vec<Histogram<u64>>,
    /// The first non-2xx answer's body, to say why.
    first_rejection: Option<String>,
    body_bytes: u64,
}

/// 1 µs .. 60 s, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Warm-up as fast as the connections allow: they open and the producer gets its id; nothing
/// is measured.
async fn burst_warmup(load: &Arc<Load>, in_flight: &Arc<Semaphore>, requests: u64) {
    let mut warmers = Vec::new();
    for _ in 0..requests {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let load = load.clone();
        warmers.push(tokio::spawn(async move {
            load.send(Instant::now(), None).await;
            drop(permit);
        }));
    }
    for w in warmers {
        let _ = w.await;
    }
}

/// This process's user + system CPU time so far, from /proc (Linux), so that a run can say
/// how much of the machine the generator itself took.
fn own_cpu_ms() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may contain spaces; the fields after its closing parenthesis do not.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of proc(5), 12 and 13 after the name; clock ticks
    // of 10 ms on Linux (USER_HZ = 100).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) * 10)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Load {
    /// Sends one fresh, freshly signed event; records its latency from `intended` when
    /// `measured`, in the run's histogram and in that of its timeline slot.
    async fn send(&self, intended: Instant, measured: Option<usize>) {
        let n = self.sequence.fetch_add(1, Ordering::Relaxed);
        let template = &self.templates[(n % self.templates.len() as u64) as usize];
        let now = unix_now();
        let mut body = Vec::with_capacity(template.approx_len + 64);
        template.render(
            &mut body,
            &format!("evt_load{}_{n}", self.run),
            now,
            &format!("cus_load{}", n % self.customers),
        );
        let signature = ingest::signature::header_for(&self.secret, now, &body);
        let length = body.len() as u64;
        let late = intended.elapsed();
        let result = self
            .client
            .post(&self.url)
            .header("Stripe-Signature", signature)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await;
        // Read the answer whole, so the connection goes back to the pool.
        let status = match result {
            Ok(response) => {
                let status = response.status().as_u16();
                match response.bytes().await {
                    Ok(body) if !(200..300).contains(&status) => {
                        let mut tally = self.tally.lock().unwrap_or_else(|p| p.into_inner());
                        tally
                            .first_rejection
                            .get_or_insert_with(|| String::from_utf8_lossy(&body).into_owned());
                        Ok(status)
                    }
                    Ok(_) => Ok(status),
                    Err(_) => Err("body"),
                }
            }
            Err(e) if e.is_timeout() => Err("timeout"),
            Err(e) if e.is_connect() => Err("connect"),
            Err(_) => Err("request"),
        };
        let elapsed = intended.elapsed();
        let Some(slot) = measured else {
            return;
        };
        let micros = (elapsed.as_micros() as u64).max(1);
        let mut tally = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = tally.latency.as_mut() {
            h.saturating_record(micros);
        }
        if tally.by_slot.len() <= slot {
            tally.by_slot.resize_with(slot + 1, new_histogram);
        }
        tally.by_slot[slot].saturating_record(micros);
        if let Some(h) = tally.lateness.as_mut() {
            h.saturating_record((late.as_micros() as u64).max(1));
        }
        tally.body_bytes += length;
        match status {
            Ok(s) if (200..300).contains(&s) => tally.ok += 1,
            Ok(s) => *tally.by_status.entry(s).or_default() += 1,
            Err(kind) => *tally.by_error.entry(kind).or_default() += 1,
        }
    }
}

#[tokio::main]
async fn main() {
    let o = options();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(o.connections)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client");
    let templates = payloads::templates();
    let sizes: Vec<String> = templates
        .iter()
        .map(|t| format!("{} {} B", t.event_type, t.approx_len))
        .collect();
    eprintln!("load: payloads cycle through {}", sizes.join(", "));
    let load = Arc::new(Load {
        client,
        url: o.url.clone(),
        secret: o.secret.clone(),
        templates,
        customers: o.customers,
        run: std::process::id(),
        sequence: AtomicU64::new(0),
        tally: Mutex::new(Tally {
            latency: Some(new_histogram()),
            lateness: Some(new_histogram()),
            ..Tally::default()
        }),
    });

    let in_flight = Arc::new(Semaphore::new(o.connections));
    let slot_ms = o.timeline.unwrap_or(1000).max(1);
    let mut tasks = Vec::new();
    let (started, mode) = match o.rate {
        None => {
            burst_warmup(&load, &in_flight, o.warmup).await;
            let started = Instant::now();
            let deadline = started + Duration::from_secs(o.max_secs);
            let next = Arc::new(AtomicU64::new(0));
            for _ in 0..o.connections {
                let (load, next, requests) = (load.clone(), next.clone(), o.requests);
                tasks.push(tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < requests
                        && Instant::now() < deadline
                    {
                        let now = Instant::now();
                        let slot = ((now - started).as_millis() as u64 / slot_ms) as usize;
                        load.send(now, Some(slot)).await;
                    }
                }));
            }
            (
                started,
                format!("closed loop, {} connections", o.connections),
            )
        }
        Some(rate) => {
            // The warm-up runs on the same schedule as the measurement and flows into it, so
            // that what is measured is the steady state at this rate, not the wake of a burst.
            let warmup = o.warmup;
            let period = Duration::from_secs_f64(1.0 / rate);
            let schedule = Instant::now();
            let started = schedule + period.mul_f64(warmup as f64);
            let deadline = started + Duration::from_secs(o.max_secs);
            for i in 0..warmup + o.requests {
                let intended = schedule + period.mul_f64(i as f64);
                if intended > deadline {
                    break;
                }
                tokio::time::sleep_until(intended.into()).await;
                let measured = (i >= warmup)
                    .then(|| ((intended - started).as_millis() as u64 / slot_ms) as usize);
                let (load, in_flight) = (load.clone(), in_flight.clone());
                tasks.push(tokio::spawn(async move {
                    let Ok(_permit) = in_flight.acquire_owned().await else {
                        return;
                    };
                    load.send(intended, measured).await;
                }));
            }
            (
                started,
                format!(
                    "open loop at {rate} req/s, at most {} in flight",
                    o.connections
                ),
            )
        }
    };
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64();

    let tally = load.tally.lock().unwrap_or_else(|p| p.into_inner());
    let h = tally.latency.as_ref().expect("histogram");
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let late = tally.lateness.as_ref().expect("histogram");
    let late_ms = |q: f64| late.value_at_quantile(q) as f64 / 1000.0;
    let sent = h.len();
    println!(
        "{}{mode}: {sent} requests in {elapsed:.2}s = {:.0} req/s ({:.0} 2xx/s), mean body {} B; \
         latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}; \
         generator late ms p99 {:.2} max {:.2}; 2xx {}; non-2xx {:?}; errors {:?}",
        if o.label.is_empty() {
            String::new()
        } else {
            format!("[{}] ", o.label)
        },
        sent as f64 / elapsed,
        tally.ok as f64 / elapsed,
        tally.body_bytes / sent.max(1),
        ms(0.50),
        ms(0.90),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0,
        late_ms(0.99),
        late.max() as f64 / 1000.0,
        tally.ok,
        tally.by_status,
        tally.by_error,
    );
    if let Some(slot_ms) = o.timeline {
        let slots: Vec<String> = tally
            .by_slot
            .iter()
            .map(|h| {
                format!(
                    "{:.0}/{:.0}",
                    h.value_at_quantile(0.99) as f64 / 1000.0,
                    h.max() as f64 / 1000.0
                )
            })
            .collect();
        println!("every {slot_ms} ms, p99/max ms: {}", slots.join(" "));
    }
    if let Some(cpu_ms) = own_cpu_ms() {
        println!(
            "generator CPU: {cpu_ms} ms in all, {:.0} µs per request (warm-up included)",
            cpu_ms as f64 * 1000.0 / (sent + o.warmup).max(1) as f64
        );
    }
    if let Some(body) = &tally.first_rejection {
        println!("first rejection: {body}");
    }
}
