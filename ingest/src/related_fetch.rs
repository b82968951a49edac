//! The fetch after a thin event (SPEC §11): once the thin event is durable and answered, its
//! `related_object` is read from the Stripe API and appended as a `backfill` snapshot, so the
//! projector sees the object's state although the event carried none.
//!
//! It runs off the request path, bounded twice: a queue of `capacity` pending fetches (a full
//! queue drops the fetch and counts it; the thin event itself is already in the log, and
//! `ingest reconcile` or `ingest backfill` recovers the object) and `concurrency` fetches at
//! once. Each fetch goes through the API client, which spaces requests under the rate limit and
//! retries 429/5xx with backoff.

use std::sync::Arc;

use serde_json::value::RawValue;
use shared::metrics::CounterVec;
use shared::EventSource;
use tokio::sync::{mpsc, Semaphore};

use secrecy::ExposeSecret;

use crate::append::{EventLog, SourcedRecord};
use crate::backfill::snapshot;
use crate::backfill::{unix_now, unix_now_ms};
use crate::config::{ApiConfig, Config};
use crate::routes::{RelatedObjectFetch, RelatedObjectRequest};
use crate::startup::StartupError;
use crate::stripe_api::rate::default_rate;
use crate::stripe_api::retry::RetryPolicy;
use crate::stripe_api::{ClientSettings, StripeClient};

/// Outcomes counted in `ingest_related_object_fetches_total`.
pub mod outcome {
    pub const QUEUED: &str = "queued";
    pub const FETCHED: &str = "fetched";
    pub const FAILED: &str = "failed";
    pub const DROPPED: &str = "dropped";
}

/// The counter family, owned by [`crate::metrics::Metrics`] and shared with the fetcher.
pub fn fetch_counter() -> CounterVec {
    CounterVec::new(
        "ingest_related_object_fetches_total",
        "Related objects of thin events: queued, fetched (and appended), failed, dropped when the queue was full.",
        "outcome",
    )
}

/// Pending fetches; beyond this a fetch is dropped and counted (the thin event is in the log).
pub const QUEUE_CAPACITY: usize = 1_000;
/// Fetches in flight at once; the API client's rate limit spaces them further.
pub const CONCURRENCY: usize = 4;

/// The fetch of a serving ingest: its own API client and producer (the same durable settings
/// as the webhook appends), on the current runtime.
pub fn start(
    api: &ApiConfig,
    config: &Config,
    counts: Arc<CounterVec>,
) -> Result<Arc<dyn RelatedObjectFetch>, StartupError> {
    let client = StripeClient::new(ClientSettings {
        api_base: api.api_base.clone(),
        api_key: api.api_key.clone(),
        account: None,
        rate: default_rate(api.api_key.expose_secret()),
        timeout: api.timeout,
        retry: RetryPolicy::default(),
    })?;
    let log = EventLog::new(
        &config.kafka,
        &config.events_topic,
        &config.dlq_topic,
        config.append_timeout,
        shared::limits::ingest_record_max_bytes(config.max_body_bytes),
    )?;
    tracing::info!(api_base = %api.api_base, "thin events: related objects are fetched");
    Ok(Arc::new(RelatedObjectFetcher::spawn(
        Arc::new(client),
        Arc::new(log),
        counts,
        QUEUE_CAPACITY,
        CONCURRENCY,
    )))
}

/// Hands thin events' related objects to the background fetch.
pub struct RelatedObjectFetcher {
    queue: mpsc::Sender<RelatedObjectRequest>,
    counts: Arc<CounterVec>,
}

impl RelatedObjectFetcher {
    /// Starts the dispatcher on the current Tokio runtime.
    pub fn spawn(
        client: Arc<StripeClient>,
        log: Arc<EventLog>,
        counts: Arc<CounterVec>,
        capacity: usize,
        concurrency: usize,
    ) -> Self {
        let (queue, mut pending) = mpsc::channel::<RelatedObjectRequest>(capacity.max(1));
        let slots = Arc::new(Semaphore::new(concurrency.max(1)));
        let worker_counts = counts.clone();
        tokio::spawn(async move {
            while let Some(request) = pending.recv().await {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (client, log, counts) = (client.clone(), log.clone(), worker_counts.clone());
                tokio::spawn(async move {
                    let outcome = fetch_and_append(&client, &log, &request).await;
                    counts.inc(outcome);
                    drop(slot);
                });
            }
        });
        RelatedObjectFetcher { queue, counts }
    }
}

impl RelatedObjectFetch for RelatedObjectFetcher {
    fn enqueue(&self, request: RelatedObjectRequest) {
        match self.queue.try_send(request) {
            Ok(()) => self.counts.inc(outcome::QUEUED),
            Err(e) => {
                let request = match &e {
                    mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
                };
                tracing::warn!(
                    event_id = %request.event_id,
                    related_object = %request.related_object.id,
                    "the related-object queue is full; fetch dropped (reconcile or backfill recovers it)"
                );
                self.counts.inc(outcome::DROPPED);
            }
        }
    }
}

/// Fetches one related object and appends its snapshot; returns the outcome to count.
async fn fetch_and_append(
    client: &StripeClient,
    log: &EventLog,
    request: &RelatedObjectRequest,
) -> &'static str {
    let account = request.account.as_deref();
    let body = match client.get_as(&request.related_object.url, account).await {
        Ok(body) => body,
        Err(e) => {
            tracing::warn!(
                event_id = %request.event_id,
                related_object = %request.related_object.id,
                code = e.code(),
                error = %e,
                "related object not fetched"
            );
            return outcome::FAILED;
        }
    };
    let fetched_at = unix_now();
    let snapshot = match serde_json::from_slice::<Box<RawValue>>(&body)
        .map_err(|e| e.to_string())
        .and_then(|object| {
            snapshot::snapshot(&object, account, fetched_at).map_err(|e| e.to_string())
        }) {
        Ok(snapshot) => snapshot,
        Err(problem) => {
            tracing::warn!(event_id = %request.event_id, %problem, "related object is not a Stripe object");
            return outcome::FAILED;
        }
    };
    let record = SourcedRecord {
        id: &snapshot.id,
        event_type: &snapshot.event_type,
        created: snapshot.created,
        livemode: snapshot.livemode,
        api_version: None,
        account,
        key: &snapshot.key,
        body: &snapshot.body,
        source: EventSource::Backfill,
    };
    match log.append_sourced(&record, unix_now_ms()).await {
        Ok(_) => {
            tracing::info!(
                event_id = %request.event_id,
                snapshot_id = %snapshot.id,
                event_type = %snapshot.event_type,
                "related object appended"
            );
            outcome::FETCHED
        }
        Err(e) => {
            tracing::warn!(event_id = %request.event_id, error = %e, "related object not appended");
            outcome::FAILED
        }
    }
}
