//! Builds the application: the producer, the topics, the listener, the routes.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{web, App, HttpServer};
use shared::kafka::{
    check_cluster, ensure_topics, KafkaUnreachable, TopicError, TopicSpec, PREFLIGHT_DEADLINE,
};
use shared::limits::{ingest_record_max_bytes, TopicTooSmall};

use crate::append::{AppendObserver, EventLog};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::related_fetch;
use crate::routes::{self, RelatedObjectFetch};

/// What every request handler shares.
pub struct AppState {
    pub config: Config,
    pub log: EventLog,
    /// Shared with the log, which reports its append latency to it.
    pub metrics: Arc<Metrics>,
    /// Where a durable thin event's related object is handed for fetching (SPEC §11); `None`
    /// when no `STRIPE_API_KEY` is configured, and the thin event is then only logged.
    pub related_objects: Option<Arc<dyn RelatedObjectFetch>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// Already names the broker and the cause: `kafka 127.0.0.1:9093: SASL authentication …`.
    #[error("{0}")]
    KafkaUnreachable(#[from] KafkaUnreachable),
    #[error(
        "MAX_BODY_BYTES={max_body_bytes} needs Kafka records of up to {} bytes, but {source}; \
         raise the topic's max.message.bytes to at least {} or lower MAX_BODY_BYTES",
        source.required, source.required
    )]
    RecordLimit {
        max_body_bytes: usize,
        source: TopicTooSmall,
    },
    #[error("cannot create the Kafka topics: {0}")]
    Topics(#[source] TopicError),
    #[error("cannot create the Kafka producer: {0}")]
    Producer(#[from] rdkafka::error::KafkaError),
    #[error("cannot build the Stripe API client: {0}")]
    StripeApi(#[from] crate::stripe_api::StripeApiError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// The service's metrics watch the log's appends.
impl AppendObserver for Metrics {
    fn appended(&self, elapsed: Duration) {
        self.append_latency.observe(elapsed.as_secs_f64());
    }
}

pub struct Application {
    port: u16,
    server: Server,
    state: web::Data<AppState>,
}

/// How long shutdown waits for in-flight requests and queued records.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);
/// How long a connection lingers after a response that left its body unread (413, 408):
/// actix discards what still arrives, so that the client reads the answer rather than a reset,
/// then closes.
const CLIENT_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        check_cluster(&config.kafka, PREFLIGHT_DEADLINE).await?;
        // Both topics take records of a body up to MAX_BODY_BYTES with its headers: a verified
        // event goes to the log, a verified invalid payload to the DLQ.
        let record_bytes = ingest_record_max_bytes(config.max_body_bytes);
        ensure_topics(
            &config.kafka,
            &[
                TopicSpec::event_log(&config.events_topic, config.events_partitions)
                    .holding(record_bytes),
                TopicSpec::dead_letters(&config.dlq_topic).holding(record_bytes),
            ],
            Duration::from_secs(30),
        )
        .await
        .map_err(|e| match e {
            TopicError::TooSmall(source) => StartupError::RecordLimit {
                max_body_bytes: config.max_body_bytes,
                source,
            },
            other => StartupError::Topics(other),
        })?;
        let metrics = Arc::new(Metrics::default());
        let log = EventLog::new(
            &config.kafka,
            &config.events_topic,
            &config.dlq_topic,
            config.append_timeout,
            record_bytes,
        )?
        .observed_by(metrics.clone());
        let listener = TcpListener::bind(config.addr).map_err(|source| StartupError::Listen {
            addr: config.addr,
            source,
        })?;
        let port = listener
            .local_addr()
            .map_err(|source| StartupError::Listen {
                addr: config.addr,
                source,
            })?
            .port();
        let related_objects = match &config.stripe_api {
            Some(api) => Some(related_fetch::start(
                api,
                &config,
                metrics.related_object_fetches.clone(),
            )?),
            None => None,
        };
        let state = web::Data::new(AppState {
            config,
            log,
            metrics,
            related_objects,
        });
        let app_state = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(app_state.clone())
                .route("/webhooks/stripe", web::post().to(routes::stripe_webhook))
                .route("/healthz", web::get().to(routes::healthz))
                .route("/readyz", web::get().to(routes::readyz))
                .route("/metrics", web::get().to(routes::metrics))
        })
        // Longer than the usual client and load-balancer idle timeouts (default 75 s), so that
        // a pooled connection is not closed under a request that is being sent on it.
        .keep_alive(state.config.keep_alive)
        // A head that trickles in gets 408 and the connection is closed (slow loris); the body
        // has its own deadline in the handler, which actix does not provide.
        .client_request_timeout(state.config.head_read_timeout)
        .client_disconnect_timeout(CLIENT_DISCONNECT_TIMEOUT)
        .shutdown_timeout(SHUTDOWN_GRACE.as_secs())
        .listen(listener)
        .map_err(|source| StartupError::Listen {
            addr: state.config.addr,
            source,
        })?
        .run();
        Ok(Application {
            port,
            server,
            state,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until SIGINT/SIGTERM (actix stops accepting and drains in-flight requests), then
    /// flushes the producer.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await?;
        if let Err(e) = self.state.log.flush(SHUTDOWN_GRACE) {
            tracing::error!(error = %e, "records were still queued at shutdown");
        }
        tracing::info!("ingest stopped");
        Ok(())
    }
}
