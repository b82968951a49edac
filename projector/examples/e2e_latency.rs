//! End-to-end latency: from the moment ingest answers a webhook 200 to the moment the change
//! message it caused is on `entitlements.changes`. Starts the real `ingest` and `projector run`
//! binaries on fresh topics and a fresh database, sends signed webhooks open loop at a fixed
//! rate (each a new customer with a subscription, so each causes exactly one message), consumes
//! the changes topic and matches messages by `cause.event_id`. Latencies go to an HDR histogram.
//!
//!   cargo run --release -p projector --example e2e_latency -- [rate=500] [events=10000]
//!
//! Environment: KAFKA_BROKERS, DATABASE_URL (a database the role may create others from),
//! INGEST_BIN, PROJECTOR_BIN (default target/release/{ingest,projector}).

// The payload templates are large `json!` literals.
#![recursion_limit = "256"]

#[allow(dead_code)]
#[path = "../../ingest/examples/support/payloads.rs"]
mod payloads;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use hmac::{Hmac, Mac};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sha2::Sha256;
use sqlx::{Connection, PgConnection};
use tokio::sync::Semaphore;

/// Per event: whichever of the answer and the message was seen first.
enum Stamp {
    Answered(Instant),
    Published(Instant),
}

struct Matcher {
    stamps: HashMap<String, Stamp>,
    measured: Histogram<u64>,
    /// Event ids of the warm-up, not measured.
    warmup_left: usize,
    matched: u64,
}

impl Matcher {
    fn answered(&mut self, id: String, at: Instant, measured: bool) {
        match self.stamps.remove(&id) {
            Some(Stamp::Published(published)) => self.matched(at, published, measured),
            _ => {
                self.stamps.insert(id, Stamp::Answered(at));
            }
        }
    }

    fn published(&mut self, id: String, at: Instant, measured: bool) {
        match self.stamps.remove(&id) {
            // Published before the answer reached us: the pipeline was faster than the HTTP
            // round trip, which counts as zero.
            Some(Stamp::Answered(answered)) => self.matched(answered, at, measured),
            _ => {
                self.stamps.insert(id, Stamp::Published(at));
            }
        }
    }

    fn matched(&mut self, answered: Instant, published: Instant, measured: bool) {
        if measured {
            let micros = published.saturating_duration_since(answered).as_micros() as u64;
            self.measured.saturating_record(micros.max(1));
            self.matched += 1;
        } else {
            self.warmup_left = self.warmup_left.saturating_sub(1);
        }
    }
}

fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={timestamp},v1={hex}")
}

/// Starts `bin`, waits for the log line that names its port, keeps draining its log.
fn spawn_logged(bin: &str, args: &[&str], env: &[(&str, String)], listening: &str) -> (Child, u16) {
    let mut child = Command::new(bin)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.clone())))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
    let port = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("{bin} exited before listening"))
            .expect("a log line");
        if line.contains(listening) {
            if let Some(port) = line
                .split("port=")
                .nth(1)
                .and_then(|p| p.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|p| p.parse().ok())
            {
                break port;
            }
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, port)
}

fn peak_rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rate: f64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(500.0);
    let events: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let warmup = 200usize;
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://stripe:stripe@127.0.0.1:5432/stripe_pipeline".into());
    let ingest_bin = std::env::var("INGEST_BIN").unwrap_or_else(|_| "target/release/ingest".into());
    let projector_bin =
        std::env::var("PROJECTOR_BIN").unwrap_or_else(|_| "target/release/projector".into());
    let run = format!("bench_e2e_{}", std::process::id());
    let secret = format!("whsec_{run}");

    let mut db = PgConnection::connect(&admin_url).await.expect("Postgres");
    sqlx::query(&format!("CREATE DATABASE {run}"))
        .execute(&mut db)
        .await
        .expect("a fresh database");
    let database_url = format!(
        "{}/{run}",
        &admin_url[..admin_url.rfind('/').expect("a URL")]
    );
    let mapping = std::env::temp_dir().join(format!("{run}.toml"));
    std::fs::write(
        &mapping,
        "[[grant]]\nproduct = \"prod_pro\"\nfeatures = [\"pro\", \"api\"]\n",
    )
    .expect("the mapping file");

    let events_topic = format!("{run}.events");
    let changes_topic = format!("{run}.changes");
    let common = [
        ("KAFKA_BROKERS", brokers.clone()),
        ("STRIPE_EVENTS_TOPIC", events_topic.clone()),
        ("DLQ_TOPIC", format!("{run}.dlq")),
        ("RUST_LOG", "warn,ingest=info,projector=info".into()),
    ];
    let mut ingest_env = common.to_vec();
    ingest_env.extend([
        ("STRIPE_WEBHOOK_SECRETS", secret.clone()),
        ("INGEST_ADDR", "127.0.0.1:0".into()),
    ]);
    let (mut ingest, ingest_port) = spawn_logged(&ingest_bin, &[], &ingest_env, "ingest listening");
    let mut projector_env = common.to_vec();
    projector_env.extend([
        ("DATABASE_URL", database_url.clone()),
        ("ENTITLEMENTS_TOPIC", changes_topic.clone()),
        ("PROJECTOR_GROUP", format!("{run}-projector")),
        ("PROJECTOR_ADDR", "127.0.0.1:0".into()),
        ("ENTITLEMENTS_CONFIG", mapping.display().to_string()),
        ("API_AUTH", "disabled".into()),
    ]);
    let mut projector = Command::new(&projector_bin)
        .arg("run")
        .envs(projector_env.iter().map(|(k, v)| (*k, v.clone())))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("projector");

    // Read the changes topic from its beginning: it is this run's own.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("{run}-reader"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()
        .expect("a consumer");
    let partitions = loop {
        let found = consumer
            .fetch_metadata(Some(&changes_topic), Duration::from_secs(2))
            .ok()
            .and_then(|m| m.topics().first().map(|t| t.partitions().len()))
            .unwrap_or(0);
        if found > 0 {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(&changes_topic, p as i32, Offset::Beginning)
            .expect("a partition");
    }
    consumer.assign(&assignment).expect("the assignment");

    let matcher = Arc::new(Mutex::new(Matcher {
        stamps: HashMap::new(),
        measured: Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds"),
        warmup_left: warmup,
        matched: 0,
    }));
    let reader = {
        let matcher = matcher.clone();
        tokio::spawn(async move {
            loop {
                let Ok(message) = consumer.recv().await else {
                    continue;
                };
                let at = Instant::now();
                let Some(value) = message.payload() else {
                    continue;
                };
                let Ok(change) = serde_json::from_slice::<serde_json::Value>(value) else {
                    continue;
                };
                let Some(id) = change["cause"]["event_id"].as_str() else {
                    continue;
                };
                let measured = !id.contains("_warm_");
                matcher.lock().unwrap_or_else(|p| p.into_inner()).published(
                    id.to_owned(),
                    at,
                    measured,
                );
            }
        })
    };

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client");
    let url = format!("http://127.0.0.1:{ingest_port}/webhooks/stripe");
    let templates: Vec<payloads::Template> = payloads::templates()
        .into_iter()
        .filter(|t| t.event_type == "customer.subscription.updated")
        .collect();
    let in_flight = Arc::new(Semaphore::new(64));
    let failures = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
    let send = |n: u64, intended: Instant, measured: bool| {
        let (client, url, secret, matcher, in_flight, failures) = (
            client.clone(),
            url.clone(),
            secret.clone(),
            matcher.clone(),
            in_flight.clone(),
            failures.clone(),
        );
        let template = &templates[(n % templates.len() as u64) as usize];
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let id = if measured {
            format!("evt_{run}_{n}")
        } else {
            format!("evt_{run}_warm_{n}")
        };
        let mut body = Vec::new();
        template.render(&mut body, &id, now, &format!("cus_{run}_{n}"));
        let signature = sign(&secret, now, &body);
        async move {
            let _permit = in_flight.acquire_owned().await;
            tokio::time::sleep_until(intended.into()).await;
            let result = client
                .post(&url)
                .header("Stripe-Signature", signature)
                .body(body)
                .send()
                .await;
            match result {
                Ok(r) if r.status().is_success() => matcher
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .answered(id, Instant::now(), measured),
                Ok(r) => {
                    *failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(r.status().as_u16().to_string())
                        .or_default() += 1
                }
                Err(_) => {
                    *failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry("transport".into())
                        .or_default() += 1
                }
            }
        }
    };

    // Warm-up: the projector joins its group and catches these up; then measure.
    let warm: Vec<_> = (0..warmup as u64)
        .map(|n| tokio::spawn(send(n, Instant::now(), false)))
        .collect();
    for w in warm {
        let _ = w.await;
    }
    let warm_deadline = Instant::now() + Duration::from_secs(120);
    while matcher
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .warmup_left
        > 0
    {
        assert!(
            Instant::now() < warm_deadline,
            "the warm-up's change messages did not arrive in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let started = Instant::now();
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut tasks = Vec::new();
    for n in 0..events {
        let intended = started + period.mul_f64(n as f64);
        tokio::time::sleep_until(intended.into()).await;
        tasks.push(tokio::spawn(send(warmup as u64 + n, intended, true)));
    }
    for t in tasks {
        let _ = t.await;
    }
    let sent_secs = started.elapsed().as_secs_f64();
    let answered = events
        - failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum::<u64>();
    let deadline = Instant::now() + Duration::from_secs(120);
    while matcher.lock().unwrap_or_else(|p| p.into_inner()).matched < answered
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reader.abort();
    let ingest_rss = peak_rss_mib(ingest.id());
    let projector_rss = peak_rss_mib(projector.id());
    let _ = ingest.kill();
    let _ = projector.kill();
    let _ = ingest.wait();
    let _ = projector.wait();
    let _ = std::fs::remove_file(&mapping);
    // The run's database and topics are dropped: they are hundreds of MB on a shared disk.
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {run} WITH (FORCE)"))
        .execute(&mut db)
        .await;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("an admin client");
    let topics = [
        events_topic.clone(),
        changes_topic.clone(),
        format!("{run}.dlq"),
    ];
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&names, &AdminOptions::new()).await;

    let m = matcher.lock().unwrap_or_else(|p| p.into_inner());
    let h = &m.measured;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "end to end (answered -> on {changes_topic}): {events} webhooks open loop at {rate} req/s in {sent_secs:.1}s; \
         {} of {answered} answered matched; latency ms p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}; \
         failures {:?}; peak RSS ingest {ingest_rss} MiB, projector {projector_rss} MiB",
        m.matched,
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0,
        failures.lock().unwrap_or_else(|p| p.into_inner()),
    );
}
