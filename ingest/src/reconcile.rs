//! `ingest reconcile --since <RFC 3339 | 3d | 12h>` (SPEC §11): pages `GET /v1/events` from
//! that time on and appends every event's exact bytes with `stripe-source: events-api`. Events
//! that were delivered as webhooks too are duplicates the projector skips by event id, so
//! reconcile is safe to run as often as wanted: after an outage, or daily from cron.

use std::time::Instant;

use serde::Serialize;
use shared::envelope::scoped_key;
use shared::{EventEnvelope, EventSource};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::append::{AppendError, EventLog, Receipt, SourcedRecord};
use crate::backfill::{per_second, unix_now, unix_now_ms};
use crate::stripe_api::{StripeApiError, StripeClient};

/// Stripe keeps events for 30 days; an older `--since` reads no more than that.
pub const EVENT_RETENTION_SECS: i64 = 30 * 86_400;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SinceError {
    #[error(
        "`{0}` is neither an RFC 3339 time (2026-01-31T00:00:00Z) nor a duration (90m, 12h, 3d)"
    )]
    Unparsable(String),
    #[error("`{0}` is in the future")]
    Future(String),
}

/// The unix second `--since` names: an RFC 3339 time, or a duration before `now` with unit
/// `s`, `m`, `h`, `d` or `w`.
pub fn parse_since(value: &str, now: i64) -> Result<i64, SinceError> {
    let value = value.trim();
    let unparsable = || SinceError::Unparsable(value.to_owned());
    let since = if let Ok(time) = OffsetDateTime::parse(value, &Rfc3339) {
        time.unix_timestamp()
    } else {
        let split = value
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(unparsable)?;
        let (digits, unit) = value.split_at(split);
        let amount: i64 = digits.parse().map_err(|_| unparsable())?;
        let unit_secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            "w" => 604_800,
            _ => return Err(unparsable()),
        };
        now - amount.checked_mul(unit_secs).ok_or_else(unparsable)?
    };
    if since > now {
        return Err(SinceError::Future(value.to_owned()));
    }
    Ok(since)
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReconcileSummary {
    pub since: i64,
    pub events: u64,
    pub records_appended: u64,
    /// Events that are not envelopes we can route, sent to the dead-letter topic.
    pub dead_lettered: u64,
    pub requests: u64,
    pub retries: u64,
    pub duration_secs: f64,
    pub events_per_sec: f64,
}

impl ReconcileSummary {
    pub fn render(&self) -> String {
        format!(
            "reconcile: {} events since {} appended ({} dead-lettered) in {:.1}s ({:.0} events/s), {} API requests, {} retries\n",
            self.records_appended,
            OffsetDateTime::from_unix_timestamp(self.since)
                .ok()
                .and_then(|t| t.format(&Rfc3339).ok())
                .unwrap_or_else(|| self.since.to_string()),
            self.dead_lettered,
            self.duration_secs,
            self.events_per_sec,
            self.requests,
            self.retries
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("reading /v1/events failed: {0}")]
    Api(#[from] StripeApiError),
    #[error("appending to the log failed: {0}")]
    Append(#[from] AppendError),
}

impl ReconcileError {
    pub fn code(&self) -> &'static str {
        match self {
            ReconcileError::Api(e) => e.code(),
            ReconcileError::Append(_) => "append_failed",
        }
    }
}

pub async fn run(
    client: &StripeClient,
    log: &EventLog,
    since: i64,
) -> Result<ReconcileSummary, ReconcileError> {
    let started = Instant::now();
    if unix_now() - since > EVENT_RETENTION_SECS {
        tracing::warn!(
            since,
            "Stripe keeps events for 30 days: older changes need `ingest backfill`"
        );
    }
    let mut summary = ReconcileSummary {
        since,
        ..Default::default()
    };
    let mut pager = client.list(
        "/v1/events",
        vec![("created[gte]".into(), since.to_string())],
    );
    while let Some(page) = pager.next_page().await? {
        let received_at_ms = unix_now_ms();
        let appends = page.data.iter().map(|event| {
            append_event(
                log,
                client.account(),
                event.get().as_bytes(),
                received_at_ms,
            )
        });
        for appended in futures_util::future::join_all(appends).await {
            match appended? {
                Appended::Event => summary.records_appended += 1,
                Appended::DeadLetter => summary.dead_lettered += 1,
            }
        }
        summary.events += page.data.len() as u64;
        tracing::debug!(events = summary.events, "page appended");
    }
    let duration = started.elapsed();
    summary.requests = client.requests();
    summary.retries = client.retries();
    summary.duration_secs = duration.as_secs_f64();
    summary.events_per_sec = per_second(summary.records_appended, duration);
    Ok(summary)
}

enum Appended {
    Event,
    DeadLetter,
}

/// One event's exact bytes into the log. An event read for a connected account (`--account`)
/// that does not name the account itself is keyed and headed with the account read, so that
/// it lands with that account's other records.
async fn append_event(
    log: &EventLog,
    account: Option<&str>,
    body: &[u8],
    received_at_ms: i64,
) -> Result<Appended, AppendError> {
    let event = match EventEnvelope::parse(body) {
        Ok(event) => event,
        Err(e) => {
            tracing::warn!(error = %e, "an event from /v1/events is not an envelope; dead-lettered");
            let receipt = Receipt {
                signature: "",
                received_at_ms,
            };
            log.append_dead_letter(body, "invalid_payload", &e.to_string(), &receipt)
                .await?;
            return Ok(Appended::DeadLetter);
        }
    };
    let account = event.account.or(account);
    let key = scoped_key(account, event.customer().unwrap_or(event.id));
    let record = SourcedRecord {
        id: event.id,
        event_type: event.event_type,
        created: event.created,
        livemode: event.livemode,
        api_version: event.api_version,
        account,
        key: &key,
        body,
        source: EventSource::EventsApi,
    };
    log.append_sourced(&record, received_at_ms).await?;
    Ok(Appended::Event)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

    #[test]
    fn durations_count_back_from_now() {
        assert_eq!(parse_since("1h", NOW), Ok(NOW - 3_600));
        assert_eq!(parse_since("3d", NOW), Ok(NOW - 3 * 86_400));
        assert_eq!(parse_since("90m", NOW), Ok(NOW - 5_400));
        assert_eq!(parse_since("45s", NOW), Ok(NOW - 45));
        assert_eq!(parse_since("2w", NOW), Ok(NOW - 14 * 86_400));
        assert_eq!(parse_since("0s", NOW), Ok(NOW));
    }

    #[test]
    fn rfc3339_times_are_absolute() {
        assert_eq!(parse_since("2025-12-31T00:00:00Z", NOW), Ok(NOW - 86_400));
        assert_eq!(
            parse_since("2025-12-31T01:00:00+01:00", NOW),
            Ok(NOW - 86_400)
        );
    }

    #[test]
    fn nonsense_and_future_times_are_refused() {
        for bad in [
            "",
            "3",
            "d",
            "3 days",
            "3y",
            "-1h",
            "yesterday",
            "2025-12-31",
        ] {
            assert!(
                matches!(parse_since(bad, NOW), Err(SinceError::Unparsable(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_since("2026-02-01T00:00:00Z", NOW),
            Err(SinceError::Future("2026-02-01T00:00:00Z".into()))
        );
        assert!(
            parse_since("99999999999999999d", NOW).is_err(),
            "no overflow"
        );
    }
}
