//! Builds `projector run`: database, topics, consumer, outbox relay, read API.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::{web, App, HttpServer};
use rdkafka::producer::FutureProducer;
use shared::kafka::{
    check_cluster, durable_producer_config, ensure_topics, KafkaUnreachable, TopicError, TopicSpec,
    PREFLIGHT_DEADLINE,
};
use shared::limits::{self, TopicTooSmall};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::consumer::{create_consumer, watch_lag, ConsumeLoop, LogConsumer};
use crate::metrics::Metrics;
use crate::outbox::Relay;
use crate::pruning::prune_periodically;
use crate::store;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// Already names the broker and the cause: `kafka 127.0.0.1:9093: SASL authentication …`.
    #[error("{0}")]
    KafkaUnreachable(#[from] KafkaUnreachable),
    #[error("cannot connect to Postgres: {0}")]
    Database(#[from] sqlx::Error),
    #[error("cannot migrate the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(
        "{0}; raise the topic's max.message.bytes to at least {required} (the largest entitlement \
         change the relay publishes)",
        required = .0.required
    )]
    TopicTooSmall(TopicTooSmall),
    #[error("cannot create the Kafka topics: {0}")]
    Topics(#[source] TopicError),
    #[error("cannot create a Kafka client: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

impl StartupError {
    /// Stable code of the failure, logged with it (the text may change, the code does not).
    pub fn code(&self) -> &'static str {
        match self {
            StartupError::KafkaUnreachable(_) => "kafka_unreachable",
            StartupError::Database(_) => "database_unreachable",
            StartupError::Migrate(_) => "migration_failed",
            StartupError::TopicTooSmall(_) => "topic_too_small",
            StartupError::Topics(_) => "topic_setup_failed",
            StartupError::Kafka(_) => "kafka_client",
            StartupError::Listen { .. } => "listen_failed",
        }
    }
}

impl From<TopicError> for StartupError {
    fn from(error: TopicError) -> Self {
        match error {
            TopicError::TooSmall(too_small) => StartupError::TopicTooSmall(too_small),
            other => StartupError::Topics(other),
        }
    }
}

pub struct Application {
    port: u16,
    server: Server,
    config: Arc<Config>,
    pool: PgPool,
    consumer: Arc<LogConsumer>,
    producer: FutureProducer,
    metrics: Arc<Metrics>,
}

/// Opens the database and applies the migrations.
pub async fn database(config: &Config) -> Result<PgPool, StartupError> {
    let pool = store::connect(&config.database_url, 8).await?;
    store::migrate(&pool).await?;
    Ok(pool)
}

/// The start-up check of every command that uses Kafka: stops within seconds, with one line,
/// on a wrong credential, a TLS mismatch or an unreachable broker.
pub async fn kafka_reachable(config: &Config) -> Result<(), StartupError> {
    Ok(check_cluster(&config.kafka, PREFLIGHT_DEADLINE).await?)
}

/// Creates the missing topics, and refuses an existing change topic that cannot hold the
/// largest change message: the relay would park every message above its limit, so customers'
/// changes would silently stop reaching downstream systems.
pub async fn topics(config: &Config) -> Result<(), StartupError> {
    ensure_topics(
        &config.kafka,
        &[
            // Sized as ingest creates them with the default MAX_BODY_BYTES. Ingest, which writes
            // the raw log and the DLQ, checks existing ones against its own MAX_BODY_BYTES: the
            // projector only reads the log, and its dead letters are records of that log (one
            // too large for the DLQ is parked by the relay, with a reason and a metric).
            TopicSpec::event_log(&config.events_topic, config.events_partitions)
                .created_holding(ingest_record_bytes()),
            TopicSpec::compacted(&config.entitlements_topic, config.entitlements_partitions)
                .holding(limits::ENTITLEMENT_CHANGE_MAX_BYTES),
            TopicSpec::dead_letters(&config.dlq_topic).created_holding(ingest_record_bytes()),
        ],
        Duration::from_secs(30),
    )
    .await?;
    Ok(())
}

pub fn producer(config: &Config) -> Result<FutureProducer, StartupError> {
    Ok(durable_producer_config(
        &config.kafka,
        Duration::from_secs(30),
        limits::projector_record_max_bytes(),
    )
    .create()?)
}

fn ingest_record_bytes() -> usize {
    limits::ingest_record_max_bytes(limits::DEFAULT_MAX_BODY_BYTES)
}

/// What stops [`Application::run_until_stopped`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOn {
    /// SIGINT or SIGTERM, and the [`Application::handle`]: the `projector run` process.
    Signal,
    /// Only the [`Application::handle`]: an application embedded in a test process, whose
    /// Ctrl-C must still end the test run.
    Handle,
}

impl Application {
    /// `projector run`'s application, stopped by SIGINT/SIGTERM.
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        Self::build_stopped_on(config, StopOn::Signal).await
    }

    pub async fn build_stopped_on(config: Config, stop_on: StopOn) -> Result<Self, StartupError> {
        let config = Arc::new(config);
        kafka_reachable(&config).await?;
        let pool = database(&config).await?;
        topics(&config).await?;
        let stored: Vec<(i32, i64)> =
            sqlx::query_as("SELECT partition, next_offset FROM consumer_offsets WHERE topic = $1")
                .bind(&config.events_topic)
                .fetch_all(&pool)
                .await?;
        let consumer = Arc::new(create_consumer(&config, stored)?);
        let producer = producer(&config)?;
        let metrics = Arc::new(Metrics::default());
        let listener = TcpListener::bind(config.addr).map_err(|source| StartupError::Listen {
            addr: config.addr,
            source,
        })?;
        let addr = config.addr;
        let port = listener
            .local_addr()
            .map_err(|source| StartupError::Listen { addr, source })?
            .port();
        let state = web::Data::new(ApiState {
            pool: pool.clone(),
            api_token: config.api_token.clone(),
            metrics: metrics.clone(),
            consumer: Some(consumer.clone()),
            events_topic: config.events_topic.clone(),
        });
        let mut server =
            HttpServer::new(move || App::new().app_data(state.clone()).configure(api::routes))
                .keep_alive(Duration::from_secs(75))
                .shutdown_timeout(10);
        if stop_on == StopOn::Handle {
            server = server.disable_signals();
        }
        let server = server
            .listen(listener)
            .map_err(|source| StartupError::Listen { addr, source })?
            .run();
        Ok(Application {
            port,
            server,
            config,
            pool,
            consumer,
            producer,
            metrics,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the application as a signal does: `handle().stop(true)` makes
    /// [`run_until_stopped`](Self::run_until_stopped) finish the batch in flight and the
    /// pending outbox rows, then return.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Runs the consumer, the relay and the API until stopped (see [`StopOn`]); the batch in flight is
    /// finished and pending outbox rows are published before it returns.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let (stop, shutdown) = watch::channel(false);
        let consume = ConsumeLoop {
            config: self.config.clone(),
            pool: self.pool.clone(),
            consumer: self.consumer.clone(),
            metrics: self.metrics.clone(),
        };
        let consumer_task = tokio::spawn(consume.run(shutdown.clone()));
        let relay = Relay {
            pool: self.pool.clone(),
            producer: self.producer.clone(),
            metrics: self.metrics.clone(),
        };
        let relay_task = tokio::spawn(relay.run(shutdown.clone()));
        let prune_task = tokio::spawn(prune_periodically(
            self.pool.clone(),
            self.config.dedupe_window,
            self.config.dedupe_prune_interval,
            shutdown.clone(),
        ));
        let lag_task = tokio::spawn(watch_lag(
            self.config.clone(),
            self.pool.clone(),
            self.consumer.clone(),
            self.metrics.clone(),
            shutdown,
        ));
        let served = self.server.await;
        let _ = stop.send(true);
        match consumer_task.await {
            Ok(Err(e)) => tracing::error!(error = %e, "consumer failed"),
            Err(e) => tracing::error!(error = %e, "consumer task panicked"),
            Ok(Ok(())) => {}
        }
        let _ = relay_task.await;
        let _ = lag_task.await;
        let _ = prune_task.await;
        tracing::info!("projector stopped");
        served
    }
}
