//! The read API (SPEC §8), health and metrics.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use rdkafka::consumer::Consumer;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sqlx::PgPool;
use subtle::ConstantTimeEq;

use crate::consumer::LogConsumer;
use crate::metrics::Metrics;
use crate::store::read;

pub struct ApiState {
    pub pool: PgPool,
    pub api_token: Option<SecretString>,
    pub metrics: Arc<Metrics>,
    pub consumer: Option<Arc<LogConsumer>>,
    pub events_topic: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("a valid bearer token is required")]
    Unauthorized,
    #[error("no such customer")]
    NotFound,
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("internal error")]
    Internal(#[from] sqlx::Error),
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let code = match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound => "not_found",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Internal(e) => {
                // The cause is logged, never sent.
                tracing::error!(error = %e, "read API query failed");
                "internal"
            }
        };
        let mut response = HttpResponse::build(self.status_code());
        if let ApiError::Unauthorized = self {
            response.insert_header(("WWW-Authenticate", "Bearer"));
        }
        response.json(serde_json::json!({"error": code, "message": self.to_string()}))
    }
}

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route(
            "/v1/customers/{customer}/entitlements",
            web::get().to(customer_entitlements),
        )
        .route(
            "/v1/customers/{customer}/entitlements/{feature}",
            web::get().to(customer_feature),
        )
        .route("/v1/entitlements", web::get().to(entitlements_by_reference))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics));
}

fn authorize(request: &HttpRequest, state: &ApiState) -> Result<(), ApiError> {
    let Some(expected) = &state.api_token else {
        return Ok(());
    };
    let presented = request
        .headers()
        .get("Authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::Unauthorized)?;
    // A token of the wrong length fails at once: the length is not the secret, the bytes are.
    let matches: bool = presented
        .as_bytes()
        .ct_eq(expected.expose_secret().as_bytes())
        .into();
    if matches {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

#[derive(Deserialize)]
struct AccountQuery {
    account: Option<String>,
}

#[derive(Deserialize)]
struct ReferenceQuery {
    client_reference_id: Option<String>,
    account: Option<String>,
}

/// Bounds what reaches a query: Stripe ids are short.
fn checked_id<'a>(value: &'a str, what: &'static str) -> Result<&'a str, ApiError> {
    if value.is_empty() || value.len() > 255 {
        return Err(ApiError::BadRequest(what));
    }
    Ok(value)
}

fn account(query: &AccountQuery) -> Result<&str, ApiError> {
    match query.account.as_deref() {
        None => Ok(""),
        Some(a) => checked_id(a, "account must be 1–255 characters"),
    }
}

async fn customer_entitlements(
    request: HttpRequest,
    path: web::Path<String>,
    query: web::Query<AccountQuery>,
    state: web::Data<ApiState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&request, &state)?;
    let customer = checked_id(&path, "customer must be 1–255 characters")?;
    let view = read::entitlements_by_customer(&state.pool, account(&query)?, customer)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(HttpResponse::Ok().json(view))
}

async fn customer_feature(
    request: HttpRequest,
    path: web::Path<(String, String)>,
    query: web::Query<AccountQuery>,
    state: web::Data<ApiState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&request, &state)?;
    let (customer, feature) = path.into_inner();
    let customer = checked_id(&customer, "customer must be 1–255 characters")?;
    let view = read::entitlements_by_customer(&state.pool, account(&query)?, customer)
        .await?
        .ok_or(ApiError::NotFound)?;
    let granted = view["features"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x.as_str() == Some(feature.as_str())));
    Ok(HttpResponse::Ok().json(serde_json::json!({"feature": feature, "granted": granted})))
}

async fn entitlements_by_reference(
    request: HttpRequest,
    query: web::Query<ReferenceQuery>,
    state: web::Data<ApiState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&request, &state)?;
    let reference = query
        .client_reference_id
        .as_deref()
        .ok_or(ApiError::BadRequest("client_reference_id is required"))?;
    let reference = checked_id(reference, "client_reference_id must be 1–255 characters")?;
    let account = match query.account.as_deref() {
        None => "",
        Some(a) => checked_id(a, "account must be 1–255 characters")?,
    };
    let view = read::entitlements_by_client_reference(&state.pool, account, reference)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(HttpResponse::Ok().json(view))
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// Postgres answers and Kafka serves the raw log.
async fn readyz(state: web::Data<ApiState>) -> HttpResponse {
    let postgres = sqlx::query("SELECT 1").execute(&state.pool).await.is_ok();
    let kafka = match &state.consumer {
        None => true,
        Some(consumer) => {
            let consumer = consumer.clone();
            let topic = state.events_topic.clone();
            tokio::task::spawn_blocking(move || {
                consumer
                    .fetch_metadata(Some(&topic), Duration::from_secs(2))
                    .map(|m| m.topics().iter().any(|t| t.error().is_none()))
                    .unwrap_or(false)
            })
            .await
            .unwrap_or(false)
        }
    };
    let body = serde_json::json!({"postgres": postgres, "kafka": kafka});
    if postgres && kafka {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn metrics(state: web::Data<ApiState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(shared::metrics::CONTENT_TYPE)
        .body(state.metrics.render())
}
