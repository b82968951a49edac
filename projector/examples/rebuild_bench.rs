//! Rebuild benchmark: produces N Stripe events (customers, subscription lifecycles, invoices)
//! straight into a fresh topic, records the log as applied by live (its offsets at the log's
//! end, its projections empty, so the swap announces every customer: the worst case for the
//! diff), runs `projector rebuild --json` and prints events/s, the phases and peak RSS. The
//! topic and the database are removed afterwards.
//!
//!   cargo build --release -p projector
//!   cargo run --release -p projector --example rebuild_bench -- [events=200000] [customers=events/10]
//!
//! `REBUILD_PERF=/tmp/rebuild.perf` records the rebuild with `perf record -g`.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, Producer};
use sqlx::{Connection, PgConnection};

use support::{BenchRun, PRODUCTS, STATUSES};

const PARTITIONS: i32 = 6;

#[tokio::main]
async fn main() {
    let events: u64 = support::arg(1, 200_000);
    let customers: u64 = support::arg(2, (events / 10).max(1));
    let bench = BenchRun::create("rebuild_bench", PARTITIONS).await;
    let (kafka, run, topic) = (&bench.kafka, &bench.run, &bench.topic);
    let database_url = bench.database_url.clone();

    let produce_started = Instant::now();
    let bytes = produce(kafka, topic, events, customers, run).await;
    let produce_secs = produce_started.elapsed().as_secs_f64();

    let mapping = std::env::temp_dir().join(format!("{run}.toml"));
    std::fs::write(&mapping, "[[grant]]\nproduct = \"prod_pro\"\nfeatures = [\"pro\", \"api\"]\n\n[[grant]]\nprice = \"price_team_month\"\nfeatures = [\"team\"]\n").unwrap();
    let projector =
        std::env::var("PROJECTOR_BIN").unwrap_or_else(|_| "target/release/projector".into());
    let env = [
        ("KAFKA_BROKERS", kafka.brokers().to_owned()),
        ("DATABASE_URL", database_url.clone()),
        ("STRIPE_EVENTS_TOPIC", topic.clone()),
        ("ENTITLEMENTS_TOPIC", format!("{run}.changes")),
        ("DLQ_TOPIC", format!("{run}.dlq")),
        ("PROJECTOR_GROUP", format!("{run}-projector")),
        ("ENTITLEMENTS_CONFIG", mapping.display().to_string()),
        ("API_AUTH", "disabled".into()),
        ("RUST_LOG", "warn".into()),
    ];
    let migrated = Command::new(&projector)
        .arg("migrate")
        .envs(env.iter().cloned())
        .output()
        .expect("run projector migrate");
    assert!(migrated.status.success(), "projector migrate failed");

    // Live's offsets at the end of the log: the rebuild replays all of it.
    let watermarks: BaseConsumer = kafka
        .client_config()
        .set("group.id", format!("{run}-watermarks"))
        .create()
        .expect("consumer");
    let mut live = PgConnection::connect(&database_url)
        .await
        .expect("bench db");
    for partition in 0..PARTITIONS {
        let (_, high) = watermarks
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .expect("watermarks");
        sqlx::query(
            "INSERT INTO consumer_offsets (topic, partition, next_offset) VALUES ($1, $2, $3)",
        )
        .bind(topic)
        .bind(partition)
        .bind(high)
        .execute(&mut live)
        .await
        .expect("seed offsets");
    }

    // REBUILD_PERF=<file>: record the rebuild with `perf record -g` (Debian's linux-perf).
    let mut command = match std::env::var("REBUILD_PERF") {
        Ok(file) => {
            let mut perf = Command::new("perf");
            perf.args([
                "record",
                "-F",
                "499",
                "--call-graph",
                "dwarf,16384",
                "-o",
                &file,
                "--",
                &projector,
            ]);
            perf
        }
        Err(_) => Command::new(&projector),
    };
    let started = Instant::now();
    let output = command
        .args(["rebuild", "--json"])
        .envs(env.iter().cloned())
        .output()
        .expect("run projector rebuild");
    let wall = started.elapsed().as_secs_f64();
    assert!(
        output.status.success(),
        "rebuild failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("rebuild --json report");

    println!(
        "produce: {events} events ({:.0} MB) over {customers} customers into {PARTITIONS} partitions in {produce_secs:.1}s",
        bytes as f64 / 1e6
    );
    println!(
        "projector rebuild: {} events in {:.2}s = {:.0} events/s (whole command: {wall:.2}s = {:.0} events/s)",
        report["events"],
        report["seconds"].as_f64().unwrap_or_default(),
        report["events_per_sec"].as_f64().unwrap_or_default(),
        events as f64 / wall
    );
    println!(
        "peak RSS: {:.0} MB; live paused {:.0} ms; {} customers announced",
        report["peak_rss_kib"].as_f64().unwrap_or_default() / 1024.0,
        report["lock_held_ms"].as_f64().unwrap_or_default(),
        report["changed"]
    );
    println!("phases (s): {}", report["phases"]);

    let _ = std::fs::remove_file(mapping);
    drop(live);
    bench.remove().await;
}

/// Each customer: `customer.created`, then a subscription walking through statuses and plans,
/// with an `invoice.paid` per period and the odd `customer.updated`. Returns the bytes produced.
async fn produce(
    kafka: &shared::kafka::KafkaSettings,
    topic: &str,
    events: u64,
    customers: u64,
    run: &str,
) -> u64 {
    let producer: FutureProducer = shared::kafka::durable_producer_config(
        kafka,
        Duration::from_secs(60),
        shared::limits::ingest_record_max_bytes(shared::limits::DEFAULT_MAX_BODY_BYTES),
    )
    .set("linger.ms", "20")
    .set("batch.num.messages", "10000")
    .create()
    .expect("producer");
    let base = 1_767_225_600i64;
    let mut bytes = 0u64;
    let mut deliveries = Vec::with_capacity(events as usize);
    for i in 0..events {
        let c = i % customers;
        let step = i / customers;
        let created = base + step as i64 * 3600;
        let id = format!("evt_{run}_{i}");
        let body = match step {
            0 => customer_event(&id, "customer.created", created, c),
            _ if step % 4 == 2 => invoice_event(&id, created, c),
            _ if step % 8 == 7 => customer_event(&id, "customer.updated", created, c),
            _ => subscription_event(&id, step, created, c),
        };
        bytes += body.len() as u64;
        deliveries.push(support::send(&producer, topic, &format!("cus_{c}"), &body));
    }
    for d in deliveries {
        d.await.expect("delivery").expect("delivered");
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
    bytes
}

fn customer_event(id: &str, event_type: &str, created: i64, c: u64) -> String {
    format!(
        r#"{{"id":"{id}","object":"event","api_version":"2025-03-31.basil","created":{created},"livemode":false,"pending_webhooks":1,"request":{{"id":null,"idempotency_key":null}},"type":"{event_type}","data":{{"object":{{"id":"cus_{c}","object":"customer","address":null,"balance":0,"created":{created},"currency":"usd","default_source":null,"delinquent":false,"description":null,"email":"customer{c}@example.com","invoice_prefix":"B{c:X}","invoice_settings":{{"custom_fields":null,"default_payment_method":null,"footer":null,"rendering_options":null}},"livemode":false,"metadata":{{"user":"user_{c}"}},"name":"Customer {c}","phone":null,"preferred_locales":[],"shipping":null,"tax_exempt":"none","test_clock":null}}}}}}"#
    )
}

fn subscription_event(id: &str, step: u64, created: i64, c: u64) -> String {
    let status = STATUSES[(step as usize) % STATUSES.len()];
    let (price, product) = PRODUCTS[((step / 2) as usize + c as usize) % PRODUCTS.len()];
    let event_type = if step == 1 {
        "customer.subscription.created"
    } else {
        "customer.subscription.updated"
    };
    format!(
        r#"{{"id":"{id}","object":"event","api_version":"2025-03-31.basil","created":{created},"livemode":false,"pending_webhooks":1,"request":{{"id":null,"idempotency_key":null}},"type":"{event_type}","data":{{"object":{{"id":"sub_{c}","object":"subscription","application":null,"automatic_tax":{{"enabled":false,"liability":null}},"billing_cycle_anchor":{created},"cancel_at":null,"cancel_at_period_end":false,"canceled_at":null,"collection_method":"charge_automatically","created":{created},"currency":"usd","customer":"cus_{c}","default_payment_method":null,"description":null,"discounts":[],"ended_at":null,"latest_invoice":"in_{c}_{step}","livemode":false,"metadata":{{}},"status":"{status}","items":{{"object":"list","data":[{{"id":"si_{c}","object":"subscription_item","created":{created},"metadata":{{}},"price":{{"id":"{price}","object":"price","active":true,"billing_scheme":"per_unit","currency":"usd","product":"{product}","lookup_key":null,"recurring":{{"interval":"month","interval_count":1,"usage_type":"licensed"}},"type":"recurring","unit_amount":2000}},"quantity":1,"subscription":"sub_{c}","current_period_start":{created},"current_period_end":{end}}}],"has_more":false,"total_count":1,"url":"/v1/subscription_items?subscription=sub_{c}"}}}}}}}}"#,
        end = created + 2_592_000
    )
}

fn invoice_event(id: &str, created: i64, c: u64) -> String {
    format!(
        r#"{{"id":"{id}","object":"event","api_version":"2025-03-31.basil","created":{created},"livemode":false,"pending_webhooks":1,"request":{{"id":null,"idempotency_key":null}},"type":"invoice.paid","data":{{"object":{{"id":"in_{c}_{created}","object":"invoice","account_country":"US","amount_due":2000,"amount_paid":2000,"amount_remaining":0,"attempt_count":1,"attempted":true,"billing_reason":"subscription_cycle","collection_method":"charge_automatically","created":{created},"currency":"usd","customer":"cus_{c}","customer_email":"customer{c}@example.com","livemode":false,"metadata":{{}},"next_payment_attempt":null,"number":"B{c:X}-0001","parent":{{"type":"subscription_details","subscription_details":{{"metadata":{{}},"subscription":"sub_{c}"}}}},"period_end":{created},"period_start":{start},"status":"paid","subtotal":2000,"total":2000,"lines":{{"object":"list","data":[{{"id":"il_{c}_{created}","object":"line_item","amount":2000,"currency":"usd","description":"1 × Pro (at $20.00 / month)","period":{{"end":{end},"start":{created}}},"quantity":1}}],"has_more":false,"total_count":1}}}}}}}}"#,
        start = created - 2_592_000,
        end = created + 2_592_000
    )
}
