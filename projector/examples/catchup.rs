//! Catch-up benchmark for the projector: produces N Stripe events (subscription lifecycles over
//! many customers) straight into a fresh topic, starts `projector run` on a fresh database and
//! measures until every record is applied and every change message published; then measures
//! `projector rebuild` over the same log. Used by `scripts/bench`.
//!
//!   cargo run --release -p projector --example catchup -- [events=100000] [customers=10000]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sqlx::{Connection, PgConnection};

const STATUSES: &[&str] = &[
    "trialing", "active", "active", "past_due", "active", "canceled",
];
const PRODUCTS: &[(&str, &str)] = &[
    ("price_pro_month", "prod_pro"),
    ("price_team_month", "prod_team"),
    ("price_basic", "prod_basic"),
];

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let events: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let customers: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let kafka = shared::kafka::KafkaSettings::from_env().unwrap();
    let brokers = kafka.brokers().to_owned();
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://stripe:stripe@127.0.0.1:5432/stripe_pipeline".into());
    let run = format!("bench_{}", std::process::id());
    let topic = format!("{run}.events");

    let admin: AdminClient<DefaultClientContext> = kafka.client_config().create().unwrap();
    let new_topic = NewTopic::new(&topic, 6, TopicReplication::Fixed(1)).set("retention.ms", "-1");
    admin
        .create_topics(&[new_topic], &AdminOptions::new())
        .await
        .unwrap();
    let mut db = PgConnection::connect(&admin_url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {run}"))
        .execute(&mut db)
        .await
        .unwrap();
    // Same server and options (sslmode, sslrootcert), another database.
    let (base, query) = admin_url.split_once('?').unwrap_or((&admin_url, ""));
    let database_url = format!(
        "{}/{run}{}{query}",
        &base[..base.rfind('/').unwrap()],
        if query.is_empty() { "" } else { "?" }
    );

    // Produce: each customer walks through statuses and plans, one event per step.
    let producer: FutureProducer = shared::kafka::durable_producer_config(
        &kafka,
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
        let status = STATUSES[(step as usize) % STATUSES.len()];
        let (price, product) = PRODUCTS[((step / 2) as usize + c as usize) % PRODUCTS.len()];
        let event_type = if step == 0 {
            "customer.subscription.created"
        } else {
            "customer.subscription.updated"
        };
        let created = base + step as i64 * 3600;
        let body = format!(
            r#"{{"id":"evt_{run}_{i}","object":"event","api_version":"2025-03-31.basil","created":{created},"livemode":false,"pending_webhooks":1,"request":{{"id":null,"idempotency_key":null}},"type":"{event_type}","data":{{"object":{{"id":"sub_{c}","object":"subscription","customer":"cus_{c}","status":"{status}","cancel_at_period_end":false,"collection_method":"charge_automatically","currency":"usd","livemode":false,"metadata":{{}},"items":{{"object":"list","data":[{{"id":"si_{c}","object":"subscription_item","price":{{"id":"{price}","object":"price","product":"{product}","lookup_key":null,"recurring":{{"interval":"month"}}}},"quantity":1,"current_period_start":{created},"current_period_end":{end}}}],"has_more":false}}}}}}}}"#,
            end = created + 2_592_000
        );
        let key = format!("cus_{c}");
        loop {
            match producer.send_result(FutureRecord::to(&topic).key(&key).payload(&body)) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err(_) => producer.poll(Duration::from_millis(10)),
            }
        }
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
    let env = [
        ("KAFKA_BROKERS", brokers.clone()),
        ("DATABASE_URL", database_url.clone()),
        ("STRIPE_EVENTS_TOPIC", topic.clone()),
        ("ENTITLEMENTS_TOPIC", format!("{run}.changes")),
        ("DLQ_TOPIC", format!("{run}.dlq")),
        ("PROJECTOR_GROUP", format!("{run}-projector")),
        ("PROJECTOR_ADDR", "127.0.0.1:0".into()),
        ("ENTITLEMENTS_CONFIG", mapping.display().to_string()),
        ("API_AUTH", "disabled".into()),
        ("RUST_LOG", "warn".into()),
    ];
    let started = Instant::now();
    let mut child = Command::new(&projector)
        .arg("run")
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
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
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(&mut db)
                .await
                .unwrap_or(1);
        if applied_at.is_some() && pending == 0 {
            break;
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

    println!("produce: {events} events over {customers} customers into 6 partitions in {produce_secs:.1}s ({:.0} events/s)", events as f64 / produce_secs);
    println!(
        "projector catch-up: {events} events applied in {applied_secs:.1}s ({:.0} events/s, process start included); {changes} change messages published after {published_secs:.1}s",
        events as f64 / applied_secs
    );
    println!("projector rebuild: {events} events replayed and swapped in {rebuild_secs:.1}s ({:.0} events/s, whole command)", events as f64 / rebuild_secs);
    println!(
        "rebuild says: {}",
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .last()
            .unwrap_or("")
    );
    let _ = std::fs::remove_file(mapping);
}
