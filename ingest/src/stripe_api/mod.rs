//! A small client for the few Stripe API reads that backfill, reconcile and thin events need.
//!
//! reqwest + serde rather than an SDK such as async-stripe: the log stores every object exactly
//! as the API returned it, which typed SDK structs would re-serialise, and five GET endpoints do
//! not warrant a crate that generates types for the whole API. The client adds what Stripe asks
//! of well-behaved integrations: list pagination, `Stripe-Account` for Connect, retries on 429
//! and 5xx honouring `Retry-After` with capped, jittered backoff, a client-side rate limit and
//! timeouts.

pub mod rate;
pub mod retry;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::value::RawValue;

use rate::RateLimiter;
use retry::{parse_retry_after, retryable_status, RetryPolicy};

/// Stripe's page size maximum; fewer round trips for the same rate limit.
pub const PAGE_LIMIT: u32 = 100;
/// A list page of 100 large objects is a few MB; anything far beyond is not a Stripe answer.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// Error bodies are read only to find Stripe's error code and message.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// Why a Stripe API read failed. Messages name the path and status, never the key.
#[derive(Debug, thiserror::Error)]
pub enum StripeApiError {
    #[error("the Stripe API refused the key (401): {message}")]
    Unauthorized { message: String },
    #[error("the key may not read {path} (403): {message}")]
    PermissionDenied { path: String, message: String },
    #[error("{path} was not found (404): {message}")]
    NotFound {
        path: String,
        /// Stripe's `error.code`, e.g. `resource_missing`.
        code: Option<String>,
        /// Stripe's `error.param`: which parameter named the missing object, if any.
        param: Option<String>,
        message: String,
    },
    #[error("{path} was still rate limited (429) after {attempts} attempts")]
    RateLimited { path: String, attempts: u32 },
    #[error("{path} answered {status} after {attempts} attempt(s): {message}")]
    Status {
        path: String,
        status: u16,
        attempts: u32,
        message: String,
    },
    #[error("{path} could not be reached after {attempts} attempt(s): {source}")]
    Transport {
        path: String,
        attempts: u32,
        #[source]
        source: reqwest::Error,
    },
    #[error("{path} answered something that is not a Stripe response: {problem}")]
    InvalidResponse { path: String, problem: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("invalid client setting: {0}")]
    Setting(&'static str),
}

impl StripeApiError {
    /// A stable code for logs, summaries and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            StripeApiError::Unauthorized { .. } => "stripe_unauthorized",
            StripeApiError::PermissionDenied { .. } => "stripe_permission_denied",
            StripeApiError::NotFound { .. } => "stripe_not_found",
            StripeApiError::RateLimited { .. } => "stripe_rate_limited",
            StripeApiError::Status { .. } => "stripe_error_status",
            StripeApiError::Transport { .. } => "stripe_unreachable",
            StripeApiError::InvalidResponse { .. } => "stripe_invalid_response",
            StripeApiError::Client(_) | StripeApiError::Setting(_) => "stripe_client",
        }
    }

    /// The server does not offer this resource to this key: an unknown route (404 without a
    /// `param`, e.g. a Stripe-compatible server without the endpoint, or a feature the account
    /// does not have) or no permission (403, a restricted key without that read).
    pub fn resource_unavailable(&self) -> bool {
        match self {
            StripeApiError::PermissionDenied { .. } => true,
            StripeApiError::NotFound { param, .. } => param.is_none(),
            _ => false,
        }
    }
}

/// How the client reaches Stripe.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// `STRIPE_API_BASE`, e.g. `https://api.stripe.com`.
    pub api_base: Url,
    /// `STRIPE_API_KEY`.
    pub api_key: SecretString,
    /// `--account acct_…`: read a connected account (the `Stripe-Account` header).
    pub account: Option<String>,
    /// Requests per second, all requests of this client together.
    pub rate: f64,
    /// The whole-request deadline of one attempt.
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

/// One page of a Stripe list: the objects' exact bytes and whether more follow.
#[derive(Debug, Deserialize)]
pub struct ListPage {
    pub data: Vec<Box<RawValue>>,
    #[serde(default)]
    pub has_more: bool,
}

#[derive(Deserialize)]
struct ObjectId<'a> {
    #[serde(borrow)]
    id: Option<&'a str>,
}

/// The `id` of a raw Stripe object, when it has one.
pub fn object_id(object: &RawValue) -> Option<String> {
    serde_json::from_str::<ObjectId<'_>>(object.get())
        .ok()
        .and_then(|o| o.id.map(str::to_owned))
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    param: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

pub struct StripeClient {
    http: reqwest::Client,
    api_base: Url,
    limiter: RateLimiter,
    retry: RetryPolicy,
    account: Option<String>,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl std::fmt::Debug for StripeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeClient")
            .field("api_base", &self.api_base.as_str())
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl StripeClient {
    pub fn new(settings: ClientSettings) -> Result<Self, StripeApiError> {
        let mut headers = HeaderMap::new();
        let mut auth =
            HeaderValue::from_str(&format!("Bearer {}", settings.api_key.expose_secret()))
                .map_err(|_| StripeApiError::Setting("the API key is not a valid header value"))?;
        // Sensitive: reqwest and hyper leave it out of Debug output and HPACK tables.
        auth.set_sensitive(true);
        headers.insert(AUTHORIZATION, auth);
        if let Some(account) = &settings.account {
            // Sent per request (a thin event may name another account); checked here once.
            HeaderValue::from_str(account).map_err(|_| {
                StripeApiError::Setting("the account id is not a valid header value")
            })?;
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(concat!(
                "stripe-pipeline-ingest/",
                env!("CARGO_PKG_VERSION")
            ))
            .connect_timeout(Duration::from_secs(10).min(settings.timeout))
            .timeout(settings.timeout)
            .build()
            .map_err(StripeApiError::Client)?;
        Ok(StripeClient {
            http,
            api_base: settings.api_base,
            limiter: RateLimiter::new(settings.rate),
            retry: settings.retry,
            account: settings.account,
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        })
    }

    /// The connected account this client reads, if any.
    pub fn account(&self) -> Option<&str> {
        self.account.as_deref()
    }

    /// HTTP requests sent so far, retries included.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Retries so far (429, 5xx, transport errors).
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// A list endpoint, paged with `limit=100` and `starting_after`.
    pub fn list(&self, path: &str, query: Vec<(String, String)>) -> Pager<'_> {
        Pager {
            client: self,
            path: path.to_owned(),
            query,
            starting_after: None,
            done: false,
        }
    }

    /// GETs `path` (plus query) and returns the body bytes of the 2xx answer, retrying what is
    /// worth retrying.
    pub async fn get(
        &self,
        path: &str,
        query: &[(String, String)],
    ) -> Result<Vec<u8>, StripeApiError> {
        let url = build_url(&self.api_base, path, query)?;
        self.get_url(url, self.account.as_deref()).await
    }

    /// GETs `path` as `account` (a thin event names the connected account it concerns),
    /// whatever account the client was built for.
    pub async fn get_as(
        &self,
        path: &str,
        account: Option<&str>,
    ) -> Result<Vec<u8>, StripeApiError> {
        let url = build_url(&self.api_base, path, &[])?;
        self.get_url(url, account).await
    }

    async fn get_url(&self, url: Url, account: Option<&str>) -> Result<Vec<u8>, StripeApiError> {
        let path = url.path().to_owned();
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.limiter.acquire().await;
            self.requests.fetch_add(1, Ordering::Relaxed);
            let mut request = self.http.get(url.clone());
            if let Some(account) = account {
                request = request.header("Stripe-Account", account);
            }
            let wait = match request.send().await {
                Err(source) => {
                    // Timeouts and refused connections are transient; a malformed request is not.
                    if !(source.is_timeout() || source.is_connect() || source.is_request())
                        || !self.retry.allows_another(attempt)
                    {
                        return Err(StripeApiError::Transport {
                            path,
                            attempts: attempt,
                            source,
                        });
                    }
                    tracing::warn!(path = %path, attempt, error = %source, "Stripe API unreachable; retrying");
                    self.retry.delay(attempt, None, fastrand::f64())
                }
                Ok(response) if response.status().is_success() => {
                    return read_limited(response, MAX_RESPONSE_BYTES)
                        .await
                        .map_err(|problem| StripeApiError::InvalidResponse {
                            path: path.clone(),
                            problem,
                        });
                }
                Ok(response) => {
                    let status = response.status();
                    let headers = response.headers().clone();
                    let should_retry = headers
                        .get("Stripe-Should-Retry")
                        .and_then(|v| v.to_str().ok());
                    let retryable = retryable_status(status.as_u16(), should_retry);
                    if !retryable || !self.retry.allows_another(attempt) {
                        let body = read_limited(response, MAX_ERROR_BODY_BYTES)
                            .await
                            .unwrap_or_default();
                        return Err(classify(status, &path, attempt, &body));
                    }
                    let retry_after = headers
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| parse_retry_after(v, SystemTime::now()));
                    let wait = self.retry.delay(attempt, retry_after, fastrand::f64());
                    tracing::warn!(
                        path = %path,
                        status = status.as_u16(),
                        attempt,
                        wait_ms = wait.as_millis() as u64,
                        "Stripe API asked to retry"
                    );
                    wait
                }
            };
            self.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
        }
    }
}

/// The error for a final non-2xx answer, with Stripe's own code and message when the body has
/// them.
fn classify(status: StatusCode, path: &str, attempts: u32, body: &[u8]) -> StripeApiError {
    let error = serde_json::from_slice::<ErrorEnvelope>(body)
        .ok()
        .map(|e| e.error);
    let message = error
        .as_ref()
        .and_then(|e| e.message.clone())
        .unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("unexpected status")
                .to_owned()
        });
    let path = path.to_owned();
    match status.as_u16() {
        401 => StripeApiError::Unauthorized { message },
        403 => StripeApiError::PermissionDenied { path, message },
        404 => StripeApiError::NotFound {
            path,
            code: error.as_ref().and_then(|e| e.code.clone()),
            param: error.and_then(|e| e.param),
            message,
        },
        429 => StripeApiError::RateLimited { path, attempts },
        status => StripeApiError::Status {
            path,
            status,
            attempts,
            message,
        },
    }
}

async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err(format!("the body is larger than {limit} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > limit {
            return Err(format!("the body is larger than {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `base` + `path` + `query`. `path` is absolute (`/v1/customers`); a base with a path prefix
/// (a proxy at `https://host/stripe`) keeps it.
pub fn build_url(
    base: &Url,
    path: &str,
    query: &[(String, String)],
) -> Result<Url, StripeApiError> {
    let invalid = |problem: &str| StripeApiError::InvalidResponse {
        path: path.to_owned(),
        problem: problem.to_owned(),
    };
    if !path.starts_with('/') || path.starts_with("//") || path.contains("..") {
        return Err(invalid("not an absolute API path"));
    }
    let mut url = base.clone();
    let prefix = base.path().trim_end_matches('/');
    url.set_path(&format!("{prefix}{path}"));
    url.set_query(None);
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(query);
    }
    Ok(url)
}

/// The query of one list page: the caller's filters, `limit=100`, and the cursor.
pub fn page_query(
    filters: &[(String, String)],
    starting_after: Option<&str>,
) -> Vec<(String, String)> {
    let mut query = filters.to_vec();
    query.push(("limit".into(), PAGE_LIMIT.to_string()));
    if let Some(cursor) = starting_after {
        query.push(("starting_after".into(), cursor.to_owned()));
    }
    query
}

/// Walks a list endpoint page by page.
pub struct Pager<'c> {
    client: &'c StripeClient,
    path: String,
    query: Vec<(String, String)>,
    starting_after: Option<String>,
    done: bool,
}

impl Pager<'_> {
    /// Continues after `id` (a resumed backfill's checkpoint).
    pub fn starting_after(mut self, id: Option<String>) -> Self {
        self.starting_after = id;
        self
    }

    /// The cursor of the next page: the id of the last object returned so far.
    pub fn cursor(&self) -> Option<&str> {
        self.starting_after.as_deref()
    }

    /// The next page, or `None` after the last one.
    pub async fn next_page(&mut self) -> Result<Option<ListPage>, StripeApiError> {
        if self.done {
            return Ok(None);
        }
        let query = page_query(&self.query, self.starting_after.as_deref());
        let body = self.client.get(&self.path, &query).await?;
        let page: ListPage =
            serde_json::from_slice(&body).map_err(|e| StripeApiError::InvalidResponse {
                path: self.path.clone(),
                problem: format!("not a list: {e}"),
            })?;
        let last_id = page.data.last().and_then(|o| object_id(o));
        if page.has_more {
            match last_id {
                // A server that repeats the cursor would page forever.
                Some(id) if Some(id.as_str()) != self.starting_after.as_deref() => {
                    self.starting_after = Some(id)
                }
                _ => {
                    return Err(StripeApiError::InvalidResponse {
                        path: self.path.clone(),
                        problem: "has_more is true but the page gives no new cursor".into(),
                    })
                }
            }
        } else {
            if let Some(id) = last_id {
                self.starting_after = Some(id);
            }
            self.done = true;
        }
        Ok(Some(page))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn urls_join_base_path_and_encoded_query() {
        let base = Url::parse("https://api.stripe.com").unwrap();
        let url = build_url(&base, "/v1/subscriptions", &q(&[("status", "all")])).unwrap();
        assert_eq!(
            url.as_str(),
            "https://api.stripe.com/v1/subscriptions?status=all"
        );
        let url = build_url(&base, "/v1/events", &q(&[("created[gte]", "17")])).unwrap();
        assert_eq!(
            url.as_str(),
            "https://api.stripe.com/v1/events?created%5Bgte%5D=17"
        );
    }

    #[test]
    fn a_base_with_a_path_prefix_keeps_it() {
        let base = Url::parse("http://127.0.0.1:8420/stripe/").unwrap();
        let url = build_url(&base, "/v1/customers", &[]).unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:8420/stripe/v1/customers");
    }

    #[test]
    fn only_absolute_api_paths_are_accepted() {
        let base = Url::parse("https://api.stripe.com").unwrap();
        for path in ["v1/customers", "//evil.example/v1", "/v1/../admin"] {
            assert!(build_url(&base, path, &[]).is_err(), "{path}");
        }
    }

    #[test]
    fn page_queries_ask_for_100_and_carry_the_cursor() {
        let filters = q(&[("status", "all")]);
        assert_eq!(
            page_query(&filters, None),
            q(&[("status", "all"), ("limit", "100")])
        );
        assert_eq!(
            page_query(&filters, Some("sub_9")),
            q(&[
                ("status", "all"),
                ("limit", "100"),
                ("starting_after", "sub_9")
            ])
        );
    }

    #[test]
    fn errors_keep_stripes_code_and_param() {
        let body = br#"{"error":{"code":"resource_missing","param":"customer","message":"No such customer: 'cus_x'","type":"invalid_request_error"}}"#;
        let e = classify(StatusCode::NOT_FOUND, "/v1/x", 1, body);
        assert_eq!(e.code(), "stripe_not_found");
        assert!(
            !e.resource_unavailable(),
            "a missing customer is not a missing endpoint"
        );
        assert!(e.to_string().contains("No such customer"), "{e}");
    }

    #[test]
    fn unknown_routes_and_forbidden_reads_are_unavailable_resources() {
        let e = classify(
            StatusCode::NOT_FOUND,
            "/v1/checkout/sessions",
            1,
            b"404: Not Found",
        );
        assert!(e.resource_unavailable());
        let e = classify(StatusCode::FORBIDDEN, "/v1/checkout/sessions", 1, b"{}");
        assert!(e.resource_unavailable());
        assert_eq!(e.code(), "stripe_permission_denied");
        let e = classify(StatusCode::UNAUTHORIZED, "/v1/customers", 1, b"");
        assert!(!e.resource_unavailable());
        assert_eq!(e.code(), "stripe_unauthorized");
        let e = classify(StatusCode::TOO_MANY_REQUESTS, "/v1/customers", 8, b"");
        assert_eq!(e.code(), "stripe_rate_limited");
    }

    #[test]
    fn object_ids_are_read_from_raw_objects() {
        let raw: Box<RawValue> =
            serde_json::from_str(r#"{"id":"cus_1","object":"customer"}"#).unwrap();
        assert_eq!(object_id(&raw).as_deref(), Some("cus_1"));
        let raw: Box<RawValue> = serde_json::from_str(r#"{"object":"x"}"#).unwrap();
        assert_eq!(object_id(&raw), None);
    }

    #[test]
    fn the_client_debug_output_never_shows_the_key() {
        let client = StripeClient::new(ClientSettings {
            api_base: Url::parse("http://127.0.0.1:1").unwrap(),
            api_key: SecretString::from("sk_test_supersecret".to_owned()),
            account: None,
            rate: 10.0,
            timeout: Duration::from_secs(1),
            retry: RetryPolicy::default(),
        })
        .unwrap();
        assert!(!format!("{client:?}").contains("supersecret"));
    }
}
