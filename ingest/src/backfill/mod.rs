//! `ingest backfill` (SPEC §11): pages through an account's customers, subscriptions (every
//! status), checkout sessions and each customer's active entitlements, and appends every object
//! to the raw log as a `*.backfilled` snapshot with `stripe-source: backfill`. The projector
//! reads these like the matching webhook snapshots, so the log stays the one source of truth.

pub mod checkpoint;
pub mod snapshot;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::stream::{self, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use shared::EventSource;

use crate::append::{AppendError, EventLog, SourcedRecord};
use crate::stripe_api::{ListPage, StripeApiError, StripeClient};
use checkpoint::{Checkpoint, CheckpointError};
use snapshot::{entitlement_summary, Snapshot, SnapshotError};

/// What a backfill reads, in the order it reads them: customers first, so that every later
/// snapshot's customer is known.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    Customers,
    Subscriptions,
    CheckoutSessions,
    Entitlements,
}

impl Resource {
    pub const ALL: [Resource; 4] = [
        Resource::Customers,
        Resource::Subscriptions,
        Resource::CheckoutSessions,
        Resource::Entitlements,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Resource::Customers => "customers",
            Resource::Subscriptions => "subscriptions",
            Resource::CheckoutSessions => "checkout_sessions",
            Resource::Entitlements => "entitlements",
        }
    }

    /// The list endpoint paged for this resource. Entitlements are read per customer, so their
    /// pages are pages of customers.
    fn list_path(self) -> &'static str {
        match self {
            Resource::Customers | Resource::Entitlements => "/v1/customers",
            Resource::Subscriptions => "/v1/subscriptions",
            Resource::CheckoutSessions => "/v1/checkout/sessions",
        }
    }

    fn filters(self) -> Vec<(String, String)> {
        match self {
            // Without it Stripe lists only live subscriptions, and canceled ones would keep
            // whatever the projection last knew.
            Resource::Subscriptions => vec![("status".into(), "all".into())],
            _ => Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BackfillOptions {
    /// Continue after the checkpoint's last object instead of starting over.
    pub resume: bool,
    /// Where the checkpoint file lives.
    pub state_dir: PathBuf,
    /// What to read (default: everything, in [`Resource::ALL`] order).
    pub resources: Vec<Resource>,
    /// Customers whose entitlements are fetched at once (the rate limit still applies).
    pub entitlement_concurrency: usize,
}

/// A resource the server does not offer to this key, skipped with a warning.
#[derive(Debug, Clone, Serialize)]
pub struct SkippedResource {
    pub resource: Resource,
    pub code: &'static str,
    pub message: String,
}

/// What a backfill did, for the end-of-run report (`--json` prints it as is).
#[derive(Debug, Clone, Default, Serialize)]
pub struct BackfillSummary {
    /// Objects appended, by their Stripe object type.
    pub objects: BTreeMap<String, u64>,
    pub records_appended: u64,
    pub skipped: Vec<SkippedResource>,
    /// HTTP requests to the API, retries included.
    pub requests: u64,
    pub retries: u64,
    pub resumed: bool,
    pub duration_secs: f64,
    pub objects_per_sec: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("reading {resource:?} failed: {source}")]
    Api {
        resource: Resource,
        #[source]
        source: StripeApiError,
    },
    #[error("an object of {resource:?} cannot be a snapshot: {source}")]
    Snapshot {
        resource: Resource,
        #[source]
        source: SnapshotError,
    },
    #[error("appending to the log failed: {0}")]
    Append(#[from] AppendError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

impl BackfillError {
    pub fn code(&self) -> &'static str {
        match self {
            BackfillError::Api { source, .. } => source.code(),
            BackfillError::Snapshot { .. } => "invalid_object",
            BackfillError::Append(_) => "append_failed",
            BackfillError::Checkpoint(e) => e.code(),
        }
    }
}

/// Runs a backfill into `topic` through `log`.
pub async fn run(
    client: &StripeClient,
    log: &EventLog,
    topic: &str,
    options: &BackfillOptions,
) -> Result<BackfillSummary, BackfillError> {
    let started = Instant::now();
    let account = client.account();
    let path = checkpoint::path_for(&options.state_dir, account, topic);
    let mut checkpoint = match options.resume {
        true => checkpoint::load(&path)?.unwrap_or_else(|| Checkpoint::new(account, topic)),
        false => Checkpoint::new(account, topic),
    };
    let mut summary = BackfillSummary {
        resumed: options.resume,
        ..Default::default()
    };
    let mut progress = Progress::new();
    let mut resources = options.resources.clone();
    resources.sort();
    resources.dedup();
    for resource in resources {
        let appended_before = summary.records_appended;
        let Some(cursor) = checkpoint.resume_point(resource) else {
            tracing::info!(
                resource = resource.name(),
                "already complete in the checkpoint"
            );
            continue;
        };
        if let Some(after) = &cursor {
            tracing::info!(resource = resource.name(), starting_after = %after, "resuming");
        }
        let mut pager = client
            .list(resource.list_path(), resource.filters())
            .starting_after(cursor);
        loop {
            let page = match pager.next_page().await {
                Ok(Some(page)) => page,
                Ok(None) => break,
                Err(e) if e.resource_unavailable() => {
                    skip(&mut summary, resource, &e);
                    break;
                }
                Err(source) => return Err(BackfillError::Api { resource, source }),
            };
            let snapshots = match resource {
                Resource::Entitlements => {
                    match entitlement_snapshots(client, &page, options.entitlement_concurrency)
                        .await
                    {
                        Ok(snapshots) => snapshots,
                        Err(e) if e.resource_unavailable() => {
                            skip(&mut summary, resource, &e);
                            break;
                        }
                        Err(source) => return Err(BackfillError::Api { resource, source }),
                    }
                }
                _ => {
                    let fetched_at = unix_now();
                    page.data
                        .iter()
                        .map(|object| snapshot::snapshot(object, account, fetched_at))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|source| BackfillError::Snapshot { resource, source })?
                }
            };
            append_all(log, &snapshots).await?;
            for s in &snapshots {
                *summary.objects.entry(s.object_type.clone()).or_default() += 1;
            }
            summary.records_appended += snapshots.len() as u64;
            checkpoint.advance(resource, pager.cursor(), unix_now());
            checkpoint::store(&path, &checkpoint)?;
            progress.update(resource, summary.records_appended);
        }
        // A skipped resource counts as done: a resumed run would only be refused again.
        checkpoint.complete(resource, unix_now());
        checkpoint::store(&path, &checkpoint)?;
        tracing::info!(
            resource = resource.name(),
            records = summary.records_appended - appended_before,
            "resource done"
        );
    }
    progress.finish();
    let duration = started.elapsed();
    summary.requests = client.requests();
    summary.retries = client.retries();
    summary.duration_secs = duration.as_secs_f64();
    summary.objects_per_sec = per_second(summary.records_appended, duration);
    Ok(summary)
}

fn skip(summary: &mut BackfillSummary, resource: Resource, error: &StripeApiError) {
    tracing::warn!(
        resource = resource.name(),
        code = error.code(),
        error = %error,
        "the server does not offer this resource to this key; skipped"
    );
    summary.skipped.push(SkippedResource {
        resource,
        code: error.code(),
        message: error.to_string(),
    });
}

/// One summary snapshot per customer of `page`, fetched `concurrency` at a time.
async fn entitlement_snapshots(
    client: &StripeClient,
    page: &ListPage,
    concurrency: usize,
) -> Result<Vec<Snapshot>, StripeApiError> {
    let customers: Vec<CustomerRef> = page
        .data
        .iter()
        .filter_map(|c| serde_json::from_str::<CustomerRef>(c.get()).ok())
        .filter(|c| !c.deleted)
        .collect();
    let results: Vec<Option<Snapshot>> = stream::iter(customers)
        .map(|customer| async move { customer_entitlements(client, customer).await })
        .buffered(concurrency.max(1))
        .try_collect()
        .await?;
    Ok(results.into_iter().flatten().collect())
}

#[derive(Deserialize)]
struct CustomerRef {
    id: String,
    #[serde(default)]
    livemode: bool,
    #[serde(default)]
    deleted: bool,
}

/// The customer's active entitlements as a summary snapshot; `None` when the customer was
/// deleted between listing and fetching.
async fn customer_entitlements(
    client: &StripeClient,
    customer: CustomerRef,
) -> Result<Option<Snapshot>, StripeApiError> {
    let mut pager = client.list(
        "/v1/entitlements/active_entitlements",
        vec![("customer".into(), customer.id.clone())],
    );
    let mut entitlements: Vec<Box<RawValue>> = Vec::new();
    loop {
        match pager.next_page().await {
            Ok(Some(page)) => entitlements.extend(page.data),
            Ok(None) => break,
            Err(StripeApiError::NotFound { param: Some(_), .. }) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    let fetched_at = unix_now();
    let summary = entitlement_summary(&customer.id, customer.livemode, &entitlements);
    // The summary is built from JSON pieces that were just parsed, so it always has a type
    // and a customer; a failure here would be a bug, reported as an invalid response.
    snapshot::snapshot(&summary, client.account(), fetched_at)
        .map(Some)
        .map_err(|e| StripeApiError::InvalidResponse {
            path: "/v1/entitlements/active_entitlements".into(),
            problem: e.to_string(),
        })
}

/// Appends a page's snapshots concurrently: the producer batches them into a few broker round
/// trips, and the page counts as written only when every one is acknowledged.
async fn append_all(log: &EventLog, snapshots: &[Snapshot]) -> Result<(), AppendError> {
    let received_at_ms = unix_now_ms();
    let appends = snapshots.iter().map(|s| {
        let record = SourcedRecord {
            id: &s.id,
            event_type: &s.event_type,
            created: s.created,
            livemode: s.livemode,
            api_version: None,
            account: s.account.as_deref(),
            key: &s.key,
            body: &s.body,
            source: EventSource::Backfill,
        };
        async move { log.append_sourced(&record, received_at_ms).await }
    });
    for result in futures_util::future::join_all(appends).await {
        result?;
    }
    Ok(())
}

/// A progress line on a terminal (rewritten in place), log lines otherwise.
pub struct Progress {
    tty: bool,
    started: Instant,
    last: Instant,
}

impl Progress {
    const TTY_EVERY: Duration = Duration::from_millis(200);
    const LOG_EVERY: Duration = Duration::from_secs(5);

    pub fn new() -> Self {
        let now = Instant::now();
        Progress {
            tty: std::io::stderr().is_terminal(),
            started: now,
            last: now,
        }
    }

    pub fn update(&mut self, resource: Resource, objects: u64) {
        let every = if self.tty {
            Self::TTY_EVERY
        } else {
            Self::LOG_EVERY
        };
        if self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let rate = per_second(objects, self.started.elapsed());
        if self.tty {
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r\x1b[2K{}: {objects} objects, {rate:.0} objects/s",
                resource.name()
            );
            let _ = err.flush();
        } else {
            tracing::info!(
                resource = resource.name(),
                objects,
                objects_per_sec = rate.round(),
                "progress"
            );
        }
    }

    pub fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl BackfillSummary {
    /// The human summary printed at the end of a run.
    pub fn render(&self) -> String {
        let mut out = format!(
            "backfill: {} records appended in {:.1}s ({:.0} objects/s), {} API requests, {} retries\n",
            self.records_appended,
            self.duration_secs,
            self.objects_per_sec,
            self.requests,
            self.retries
        );
        for (object_type, count) in &self.objects {
            out.push_str(&format!("  {object_type}: {count}\n"));
        }
        for skipped in &self.skipped {
            out.push_str(&format!(
                "  skipped {}: {} ({})\n",
                skipped.resource.name(),
                skipped.message,
                skipped.code
            ));
        }
        out
    }
}
