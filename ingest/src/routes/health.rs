use std::time::Duration;

use actix_web::{web, HttpResponse};

use crate::startup::AppState;

/// The process is alive.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// Kafka is reachable and the raw log exists.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    if state.log.reachable(Duration::from_secs(2)).await {
        HttpResponse::Ok().json(serde_json::json!({"status": "ready"}))
    } else {
        HttpResponse::ServiceUnavailable().json(serde_json::json!({
            "error": "unavailable",
            "message": "Kafka is not reachable or the events topic is missing",
        }))
    }
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(shared::metrics::CONTENT_TYPE)
        .body(state.metrics.render(state.log.queue_len()))
}
