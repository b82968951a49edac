//! Setup the projector's benchmarks share: a run's own topic and database on the dev stack,
//! removed afterwards, and the Stripe catalogue the generated events walk through.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use sqlx::{Connection, PgConnection};

/// The statuses a generated subscription walks through, in order.
pub const STATUSES: &[&str] = &[
    "trialing", "active", "active", "past_due", "active", "canceled",
];

/// The (price, product) pairs a generated subscription moves between.
pub const PRODUCTS: &[(&str, &str)] = &[
    ("price_pro_month", "prod_pro"),
    ("price_team_month", "prod_team"),
    ("price_basic", "prod_basic"),
];

/// The `index`-th command-line argument, parsed, or `default`.
pub fn arg<T: std::str::FromStr>(index: usize, default: T) -> T {
    std::env::args()
        .nth(index)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

/// A benchmark run's own topic (`<run>.events`) and database (`<run>`); [`BenchRun::remove`]
/// drops both, with the `.changes` and `.dlq` topics the projector creates beside it.
pub struct BenchRun {
    pub run: String,
    pub topic: String,
    pub kafka: shared::kafka::KafkaSettings,
    /// The run's database.
    pub database_url: String,
    admin: AdminClient<DefaultClientContext>,
    db: PgConnection,
}

impl BenchRun {
    /// Creates `<prefix>_<pid>.events` with `partitions`, kept forever, and the database.
    pub async fn create(prefix: &str, partitions: i32) -> BenchRun {
        let kafka = shared::kafka::KafkaSettings::from_env().expect("Kafka settings");
        let admin_url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://stripe:stripe@127.0.0.1:5432/stripe_pipeline".into());
        let run = format!("{prefix}_{}", std::process::id());
        let topic = format!("{run}.events");
        let admin: AdminClient<DefaultClientContext> =
            kafka.client_config().create().expect("admin client");
        let new_topic =
            NewTopic::new(&topic, partitions, TopicReplication::Fixed(1)).set("retention.ms", "-1");
        admin
            .create_topics(&[new_topic], &AdminOptions::new())
            .await
            .expect("create topic");
        let mut db = PgConnection::connect(&admin_url).await.expect("Postgres");
        sqlx::query(&format!("CREATE DATABASE {run}"))
            .execute(&mut db)
            .await
            .expect("create database");
        // Same server and options (sslmode, sslrootcert), another database.
        let (base, query) = admin_url.split_once('?').unwrap_or((&admin_url, ""));
        let database_url = format!(
            "{}/{run}{}{query}",
            &base[..base.rfind('/').unwrap()],
            if query.is_empty() { "" } else { "?" }
        );
        BenchRun {
            run,
            topic,
            kafka,
            database_url,
            admin,
            db,
        }
    }

    /// Drops the database and deletes the topics (a benchmark log is hundreds of MB on a shared
    /// disk); `KEEP_BENCH_DATA=1` keeps them for a look afterwards.
    pub async fn remove(mut self) {
        if std::env::var_os("KEEP_BENCH_DATA").is_some() {
            return;
        }
        let _ = sqlx::query(&format!("DROP DATABASE {} WITH (FORCE)", self.run))
            .execute(&mut self.db)
            .await;
        let run = &self.run;
        let _ = self
            .admin
            .delete_topics(
                &[
                    &self.topic,
                    &format!("{run}.changes"),
                    &format!("{run}.dlq"),
                ],
                &AdminOptions::new(),
            )
            .await;
    }
}

/// Queues one record, waiting for room in the producer's queue when it is full.
pub fn send(producer: &FutureProducer, topic: &str, key: &str, body: &str) -> DeliveryFuture {
    loop {
        match producer.send_result(FutureRecord::to(topic).key(key).payload(body)) {
            Ok(delivery) => return delivery,
            Err(_) => producer.poll(Duration::from_millis(10)),
        }
    }
}

/// Peak resident set of a process, KiB (`VmHWM` in /proc), 0 when unreadable. (The rebuild bench
/// reads the rebuild's own report instead; each example compiles this module on its own.)
#[allow(dead_code)]
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
