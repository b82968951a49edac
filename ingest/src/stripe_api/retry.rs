//! When to retry a Stripe API request and how long to wait first. Pure functions, so the
//! policy is tested without a server.

use std::time::{Duration, SystemTime};

/// Retries with capped exponential backoff and full jitter; `Retry-After` wins when longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (>= 1).
    pub max_attempts: u32,
    /// The backoff ceiling of the first retry; doubled for every further one.
    pub base: Duration,
    /// No computed backoff exceeds this.
    pub cap: Duration,
    /// A server's `Retry-After` is honoured up to this, so a bogus header cannot park the
    /// backfill for hours.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// The backoff after failed attempt `attempt` (1-based) with `jitter` in [0, 1]: a uniform
    /// draw below `min(cap, base * 2^(attempt-1))` ("full jitter"), so that many clients that
    /// failed together do not retry together.
    pub fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(30);
        let ceiling = self
            .base
            .checked_mul(1u32 << exponent)
            .unwrap_or(self.cap)
            .min(self.cap);
        ceiling.mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// How long to wait before the next attempt: at least the server's `Retry-After` (capped),
    /// and at least the jittered backoff.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let backoff = self.backoff(attempt, jitter);
        match retry_after {
            Some(wait) => wait.min(self.max_retry_after).max(backoff),
            None => backoff,
        }
    }

    /// Whether another attempt is allowed after `attempt` attempts.
    pub fn allows_another(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }
}

/// Whether a response status is worth retrying: 429 and every 5xx. Stripe's own
/// `Stripe-Should-Retry` header, when present, overrides the status (it says `true` for a 409
/// lock timeout and `false` for errors that would fail again).
pub fn retryable_status(status: u16, stripe_should_retry: Option<&str>) -> bool {
    match stripe_should_retry.map(str::trim) {
        Some("true") => true,
        Some("false") => false,
        _ => status == 429 || (500..=599).contains(&status),
    }
}

/// Parses `Retry-After`: delta-seconds (what Stripe sends) or an HTTP-date (RFC 9110 §10.2.3).
/// A date in the past means "now"; anything unparsable is ignored.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    // Some servers send fractional seconds; accept them rather than fall back to guessing.
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(60),
        }
    }

    #[test]
    fn backoff_doubles_per_attempt_up_to_the_cap() {
        let p = policy();
        assert_eq!(p.backoff(1, 1.0), Duration::from_millis(100));
        assert_eq!(p.backoff(2, 1.0), Duration::from_millis(200));
        assert_eq!(p.backoff(4, 1.0), Duration::from_millis(800));
        assert_eq!(p.backoff(5, 1.0), Duration::from_secs(1));
        assert_eq!(p.backoff(40, 1.0), Duration::from_secs(1), "no overflow");
    }

    #[test]
    fn backoff_is_a_fraction_of_the_ceiling_given_by_the_jitter() {
        let p = policy();
        assert_eq!(p.backoff(2, 0.0), Duration::ZERO);
        assert_eq!(p.backoff(2, 0.5), Duration::from_millis(100));
        assert_eq!(p.backoff(2, 7.0), Duration::from_millis(200), "clamped");
    }

    #[test]
    fn retry_after_is_honoured_when_longer_than_the_backoff_and_capped() {
        let p = policy();
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(2)), 1.0),
            Duration::from_secs(2)
        );
        assert_eq!(
            p.delay(5, Some(Duration::ZERO), 1.0),
            Duration::from_secs(1),
            "the backoff when Retry-After is shorter"
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3600)), 0.0),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn attempts_are_bounded() {
        let p = policy();
        assert!(p.allows_another(4));
        assert!(!p.allows_another(5));
    }

    #[test]
    fn rate_limits_and_server_errors_are_retried_client_errors_are_not() {
        for status in [429, 500, 502, 503, 504] {
            assert!(retryable_status(status, None), "{status}");
        }
        for status in [400, 401, 403, 404, 409] {
            assert!(!retryable_status(status, None), "{status}");
        }
    }

    #[test]
    fn stripe_should_retry_overrides_the_status() {
        assert!(retryable_status(409, Some("true")));
        assert!(!retryable_status(500, Some("false")));
        assert!(retryable_status(503, Some("maybe")));
    }

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("1.5", now),
            Some(Duration::from_millis(1500))
        );
        // 784111777 is Sun, 06 Nov 1994 08:49:37 GMT (RFC 9110's example).
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO),
            "a past date means now"
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }
}
