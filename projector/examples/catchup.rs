//! Catch-up benchmark for the projector: produces N Stripe events over many customers straight
//! into a fresh topic, starts `projector run` on a fresh database and measures until every
//! record is applied and every change message published; then (unless `no-rebuild`) measures
//! `projector rebuild` over the same log. Reports the projector's peak RSS (`VmHWM`). Used by
//! `scripts/bench`.
//!
//! Workloads:
//! - `change-heavy`: each customer walks through subscription states and plans, one event per
//!   step, so nearly every event changes entitlements and writes a change message;
//! - `realistic`: what a live account sends: after a subscription is created, mostly
//!   `invoice.paid` (a new invoice each month) and `customer.updated`, now and then a renewal
//!   (`customer.subscription.updated` moving the period) and rarely a plan or status change.
//!   About one event in ten changes the entitlement object.
//!
//! ```text
//! cargo run --release -p projector --example catchup -- \
//!     [events=100000] [customers=10000] [change-heavy|realistic] [rebuild|no-rebuild]
//! ```

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, Producer};
use sqlx::{Connection, PgConnection};
use support::{peak_rss_kib, BenchRun, PRODUCTS, STATUSES};

#[tokio::main]
async fn main() {
    let events: u64 = support::arg(1, 100_000);
    let customers: u64 = support::arg(2, 10_000);
    let args: Vec<String> = std::env::args().collect();
    let workload = match args.get(3).map(String::as_str) {
        None | Some("change-heavy") => Workload::ChangeHeavy,
        Some("realistic") => Workload::Realistic,
        Some(other) => panic!("unknown workload {other}: change-heavy or realistic"),
    };
    let rebuild = args.get(4).map(String::as_str) != Some("no-rebuild");
    let bench = BenchRun::create("bench", 6).await;
    let (run, topic, kafka) = (&bench.run, &bench.topic, &bench.kafka);
    let brokers = kafka.brokers().to_owned();
    let database_url = bench.database_url.clone();

    // Produce: each customer walks through statuses and plans, one event per step.
    let producer: FutureProducer = shared::kafka::durable_producer_config(
        kafka,
        Duration::from_secs(60),
        shared::limits::ingest_record_max_bytes(shared::limits::DEFAULT_MAX_BODY_BYTES),
    )
    .set("linger.ms", "20")
    .set("batch.num.messages", "10000")
    .create()
    .unwrap();
    let produce_started = Instant::now();
    let base = 1_767_225_600i64;
    let mut deliveries = Vec::with_capacity(events as usize);
    for i in 0..events {
        let c = i % customers;
        let step = i / customers;
        let created = base + step as i64 * 3600;
        let body = match workload {
            Workload::ChangeHeavy => change_heavy(run, i, c, step, created),
            Workload::Realistic => realistic(run, i, c, step, created),
        };
        deliveries.push(support::send(&producer, topic, &format!("cus_{c}"), &body));
    }
    for d in deliveries {
        d.await.unwrap().unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let produce_secs = produce_started.elapsed().as_secs_f64();

    let mapping = std::env::temp_dir().join(format!("{run}.toml"));
    std::fs::write(&mapping, "[[grant]]\nproduct = \"prod_pro\"\nfeatures = [\"pro\", \"api\"]\n\n[[grant]]\nprice = \"price_team_month\"\nfeatures = [\"team\"]\n").unwrap();
    let projector =
        std::env::var("PROJECTOR_BIN").unwrap_or_else(|_| "target/release/projector".into());
    // Batch settings pass through, so that they can be compared run against run; unset, the
    // projector's own default applies.
    let batch_max = std::env::var("BATCH_MAX_EVENTS").unwrap_or_else(|_| "default".into());
    let mut env = vec![
        ("KAFKA_BROKERS", brokers.clone()),
        ("DATABASE_URL", database_url.clone()),
        ("STRIPE_EVENTS_TOPIC", topic.clone()),
        ("ENTITLEMENTS_TOPIC", format!("{run}.changes")),
        ("DLQ_TOPIC", format!("{run}.dlq")),
        ("PROJECTOR_GROUP", format!("{run}-projector")),
        ("PROJECTOR_ADDR", "127.0.0.1:0".into()),
        ("ENTITLEMENTS_CONFIG", mapping.display().to_string()),
        ("API_AUTH", "disabled".into()),
        // `BENCH_PROJECTOR_LOG=sqlx::query=debug` shows every statement with its time.
        (
            "RUST_LOG",
            std::env::var("BENCH_PROJECTOR_LOG").unwrap_or_else(|_| "warn".into()),
        ),
    ];
    if let Ok(max) = std::env::var("BATCH_MAX_EVENTS") {
        env.push(("BATCH_MAX_EVENTS", max));
    }
    // The allocator settings the Dockerfile ships (a fixed mmap threshold, two arenas), unless
    // set here already; `BENCH_MALLOC_DEFAULTS=1` measures glibc's defaults instead.
    if std::env::var_os("BENCH_MALLOC_DEFAULTS").is_none() {
        for (name, value) in [
            ("MALLOC_MMAP_THRESHOLD_", "131072"),
            ("MALLOC_ARENA_MAX", "2"),
        ] {
            if std::env::var_os(name).is_none() {
                env.push((name, value.into()));
            }
        }
    }
    let started = Instant::now();
    let mut child = Command::new(&projector)
        .arg("run")
        .envs(env.iter().cloned())
        .stdout(if std::env::var_os("BENCH_PROJECTOR_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .unwrap();
    let mut db = loop {
        if let Ok(c) = PgConnection::connect(&database_url).await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut applied_at = None;
    loop {
        let applied: i64 =
            sqlx::query_scalar("SELECT COALESCE(sum(next_offset), 0)::int8 FROM consumer_offsets")
                .fetch_one(&mut db)
                .await
                .unwrap_or(0);
        if applied as u64 >= events && applied_at.is_none() {
            applied_at = Some(started.elapsed().as_secs_f64());
        }
        // Asked only once everything is applied, and as the relay defines pending (its partial
        // index answers it): `published_at IS NULL` alone made this a scan of the whole outbox
        // every 50 ms, a cost of the bench itself that grew with the log.
        if applied_at.is_some() {
            let pending: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL AND parked_at IS NULL",
            )
            .fetch_one(&mut db)
            .await
            .unwrap_or(1);
            if pending == 0 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "catch-up did not finish in 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let published_secs = started.elapsed().as_secs_f64();
    let applied_secs = applied_at.unwrap();
    let changes: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&mut db)
        .await
        .unwrap();

    let peak_rss_catchup = peak_rss_kib(child.id());
    println!("produce: {events} events ({workload:?}) over {customers} customers into 6 partitions in {produce_secs:.1}s ({:.0} events/s)", events as f64 / produce_secs);
    println!(
        "projector catch-up ({workload:?}, batches of up to {batch_max}): {events} events applied in {applied_secs:.1}s ({:.0} events/s, process start included); {changes} change messages published after {published_secs:.1}s; projector peak RSS {} MiB",
        events as f64 / applied_secs,
        peak_rss_catchup / 1024
    );
    if !rebuild {
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(mapping);
        bench.remove().await;
        return;
    }

    // Rebuild the same log while `run` keeps serving.
    let rebuild_started = Instant::now();
    let output = Command::new(&projector)
        .arg("rebuild")
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    let rebuild_secs = rebuild_started.elapsed().as_secs_f64();
    assert!(
        output.status.success(),
        "rebuild failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = child.kill();
    let _ = child.wait();

    println!("projector rebuild: {events} events replayed and swapped in {rebuild_secs:.1}s ({:.0} events/s, whole command)", events as f64 / rebuild_secs);
    println!(
        "rebuild says: {}",
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .last()
            .unwrap_or("")
    );
    let _ = std::fs::remove_file(mapping);
    bench.remove().await;
}

#[derive(Debug, Clone, Copy)]
enum Workload {
    ChangeHeavy,
    Realistic,
}

/// A customer's subscription walking through statuses and plans: nearly every step changes
/// what the customer is entitled to.
fn change_heavy(run: &str, i: u64, c: u64, step: u64, created: i64) -> String {
    let status = STATUSES[(step as usize) % STATUSES.len()];
    let (price, product) = PRODUCTS[((step / 2) as usize + c as usize) % PRODUCTS.len()];
    let event_type = if step == 0 {
        "customer.subscription.created"
    } else {
        "customer.subscription.updated"
    };
    subscription_event(run, i, c, event_type, status, price, product, created)
}

/// A live account's traffic: per customer, a subscription created once, then a month's cycle
/// of invoices, profile updates and a renewal; every 25th step a plan change.
fn realistic(run: &str, i: u64, c: u64, step: u64, created: i64) -> String {
    const CYCLE: &[&str] = &[
        "invoice.paid",
        "customer.updated",
        "invoice.paid",
        "invoice.paid",
        "customer.updated",
        "invoice.paid",
        "customer.subscription.updated",
        "invoice.paid",
        "customer.updated",
        "invoice.paid",
    ];
    let plan = (step / 25) as usize + c as usize;
    let (price, product) = PRODUCTS[plan % PRODUCTS.len()];
    if step == 0 {
        return subscription_event(
            run,
            i,
            c,
            "customer.subscription.created",
            "active",
            price,
            product,
            created,
        );
    }
    match CYCLE[(step as usize) % CYCLE.len()] {
        "invoice.paid" => format!(
            r#"{{"id":"evt_{run}_{i}","object":"event","api_version":"2025-03-31.basil","created":{created},"livemode":false,"pending_webhooks":1,"request":{{"id":null,"idempotency_key":null}},"type":"invoice.paid","data":{{"object":{{"id":"in_{c}_{step}","object":"invoice","customer":"cus_{c}","status":"paid","amount_due":4900,"amount_paid":4900,"amount_remaining":0,"attempt_count":1,"attempted":true,"billing_reason":"subscription_cycle","collection_method":"charge_automatically","currency":"usd","livemode":false,"metadata":{{}},"next_payment_attempt":null,"parent":{{"type":"subscription_details","subscription_details":{{"subscription":"sub_{c}","metadata":{{}}}}}},"lines":{{"object":"list","data":[{{"id":"il_{c}_{step}","object":"line_item","amount":4900,"currency":"usd","period":{{"start":{created},"end":{end}}},"pricing":{{"type":"price_details","price_details":{{"price":"{price}","product":"{product}"}}}},"quantity":1}}],"has_more":false}},"period_start":{created},"period_end":{end},"total":4900}}}}}}"#,
            end = created + 2_592_000
        ),
        "customer.updated" => format!(
            r#"{{"id":"evt_{run}_{i}","object":"event","api_version":"2025-03-31.basil","created":{created},"livemode":false,"pending_webhooks":1,"request":{{"id":null,"idempotency_key":null}},"type":"customer.updated","data":{{"object":{{"id":"cus_{c}","object":"customer","address":null,"balance":0,"created":1767225600,"currency":"usd","delinquent":false,"description":null,"email":"user{c}+{step}@example.com","invoice_prefix":"A{c}","livemode":false,"metadata":{{"seen":"{step}"}},"name":"Customer {c}","phone":null,"preferred_locales":[],"tax_exempt":"none"}},"previous_attributes":{{"email":"user{c}@example.com"}}}}}}"#
        ),
        _ => subscription_event(
            run,
            i,
            c,
            "customer.subscription.updated",
            "active",
            price,
            product,
            created,
        ),
    }
}

#[allow(clippy::too_many_arguments)]
fn subscription_event(
    run: &str,
    i: u64,
    c: u64,
    event_type: &str,
    status: &str,
    price: &str,
    product: &str,
    created: i64,
) -> String {
    format!(
        r#"{{"id":"evt_{run}_{i}","object":"event","api_version":"2025-03-31.basil","created":{created},"livemode":false,"pending_webhooks":1,"request":{{"id":null,"idempotency_key":null}},"type":"{event_type}","data":{{"object":{{"id":"sub_{c}","object":"subscription","customer":"cus_{c}","status":"{status}","cancel_at_period_end":false,"collection_method":"charge_automatically","currency":"usd","livemode":false,"metadata":{{}},"items":{{"object":"list","data":[{{"id":"si_{c}","object":"subscription_item","price":{{"id":"{price}","object":"price","product":"{product}","lookup_key":null,"recurring":{{"interval":"month"}}}},"quantity":1,"current_period_start":{created},"current_period_end":{end}}}],"has_more":false}}}}}}}}"#,
        end = created + 2_592_000
    )
}
