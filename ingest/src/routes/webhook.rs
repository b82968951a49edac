use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::http::header::CONTENT_LENGTH;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use shared::{EventEnvelope, RelatedObject};

use crate::append::Receipt;
use crate::error::IngestError;
use crate::signature;
use crate::startup::AppState;

/// What ingest does with a thin event once it is durable in the log: fetch its related object
/// and append it as a `backfill` snapshot (SPEC §11). Plugged into [`AppState`] when a
/// `STRIPE_API_KEY` is configured.
pub trait RelatedObjectFetch: Send + Sync {
    /// Takes the fetch over. It runs on the request path, after the append and before the
    /// answer, so it must only hand the request to bounded background work and return.
    fn enqueue(&self, request: RelatedObjectRequest);
}

/// A thin event's related object to fetch, with what the snapshot record needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelatedObjectRequest {
    /// The thin event that named the object, for logs.
    pub event_id: String,
    pub event_type: String,
    /// The thin event's `context`: the `Stripe-Account` to fetch as.
    pub account: Option<String>,
    pub livemode: bool,
    pub related_object: RelatedObject<'static>,
}

/// `POST /webhooks/stripe`: verify, then append the exact bytes, then answer.
#[tracing::instrument(name = "webhook", skip_all, fields(event_id = tracing::field::Empty, outcome = tracing::field::Empty))]
pub async fn stripe_webhook(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, IngestError> {
    let result = handle(&request, payload, &state).await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.code(),
    };
    state.metrics.requests.inc(outcome);
    tracing::Span::current().record("outcome", outcome);
    match &result {
        Err(e @ IngestError::Unavailable(cause)) => {
            tracing::warn!(error = %e, cause = %cause, "append failed")
        }
        Err(e) => tracing::info!(error = %e, "webhook rejected"),
        Ok(_) => tracing::debug!("event appended"),
    }
    result
}

async fn handle(
    request: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
) -> Result<HttpResponse, IngestError> {
    let received_at_ms = now_millis();
    let limit = state.config.max_body_bytes;
    // Refuse by the declared length before reading anything.
    if let Some(length) = request.headers().get(CONTENT_LENGTH) {
        let declared = length.to_str().ok().and_then(|l| l.parse::<u64>().ok());
        if declared.is_some_and(|l| l > limit as u64) {
            return Err(IngestError::PayloadTooLarge { limit });
        }
    }
    let signature_header = match request.headers().get("Stripe-Signature") {
        None => return Err(IngestError::MissingSignature),
        // Non-ASCII header bytes cannot be a Stripe signature.
        Some(value) => value
            .to_str()
            .map_err(|_| signature::SignatureError::Malformed)?,
    };
    // actix bounds the head's arrival but not the body's: a body that trickles would hold a
    // connection and its buffer for as long as the client likes.
    let deadline = state.config.body_read_timeout;
    let body = tokio::time::timeout(deadline, read_body(payload, limit))
        .await
        .map_err(|_| IngestError::BodyTimeout(deadline))??;

    let now = (received_at_ms / 1000) as i64;
    signature::verify(
        &body,
        signature_header,
        &state.config.webhook_secrets,
        state.config.signature_tolerance_secs,
        now,
    )?;

    let receipt = Receipt {
        signature: signature_header,
        received_at_ms: received_at_ms as i64,
    };
    let event = match EventEnvelope::parse(&body) {
        Ok(event) => event,
        Err(e) => {
            let message = e.to_string();
            // Verified bytes are never dropped: if the dead letter cannot be stored, Stripe
            // must retry, so the answer is 503 rather than 400.
            state
                .log
                .append_dead_letter(&body, "invalid_payload", &message, &receipt)
                .await
                .map_err(IngestError::Unavailable)?;
            return Err(IngestError::InvalidPayload(message));
        }
    };
    tracing::Span::current().record("event_id", event.id);
    state
        .log
        .append_event(&event, &body, &receipt)
        .await
        .map_err(IngestError::Unavailable)?;
    if event.thin().is_some() {
        follow_thin_event(&event, state);
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({"received": true, "id": event.id})))
}

/// A thin event is durable in the log; its related object, if any, goes to the fetch.
fn follow_thin_event(event: &EventEnvelope<'_>, state: &AppState) {
    let Some(related) = event.related_object() else {
        tracing::info!(
            event_type = event.event_type,
            "thin event without a related object appended"
        );
        return;
    };
    match &state.related_objects {
        None => tracing::info!(
            event_type = event.event_type,
            related_object = %related.id,
            "thin event appended; its related object is not fetched (no STRIPE_API_KEY)"
        ),
        Some(fetch) => fetch.enqueue(RelatedObjectRequest {
            event_id: event.id.to_owned(),
            event_type: event.event_type.to_owned(),
            account: event.account.map(str::to_owned),
            livemode: event.livemode,
            related_object: related.clone().into_owned(),
        }),
    }
}

/// Reads the body, stopping as soon as it exceeds `limit` (chunked bodies have no length).
async fn read_body(mut payload: web::Payload, limit: usize) -> Result<web::Bytes, IngestError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| IngestError::BodyRead)?;
        if body.len() + chunk.len() > limit {
            return Err(IngestError::PayloadTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

fn now_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}
