//! A client-side rate limit: requests are spaced evenly at `rate` per second, so a backfill
//! stays under Stripe's limits (100 reads/s live, 25 in test mode) instead of finding them
//! through 429s.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The default reads per second for a key: safely under Stripe's limit for its mode.
pub fn default_rate(api_key: &str) -> f64 {
    if api_key.starts_with("sk_live_") || api_key.starts_with("rk_live_") {
        80.0
    } else {
        20.0
    }
}

/// Spaces acquisitions `1/rate` apart. Shared by every task of one client.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    next_slot: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// `rate` requests per second; must be positive and finite (checked at configuration).
    pub fn new(rate: f64) -> Self {
        RateLimiter {
            interval: interval_for(rate),
            next_slot: Mutex::new(None),
        }
    }

    /// Waits for this caller's slot.
    pub async fn acquire(&self) {
        let slot = {
            let mut next = self.next_slot.lock().unwrap_or_else(|e| e.into_inner());
            reserve(&mut next, Instant::now(), self.interval)
        };
        tokio::time::sleep_until(slot.into()).await;
    }
}

/// The time between two requests at `rate` per second.
pub fn interval_for(rate: f64) -> Duration {
    Duration::from_secs_f64(1.0 / rate)
}

/// Reserves the next free slot at or after `now` and moves the schedule one interval on. An
/// idle limiter does not bank unused slots: a burst after a pause is still spaced.
pub fn reserve(next_slot: &mut Option<Instant>, now: Instant, interval: Duration) -> Instant {
    let slot = match *next_slot {
        Some(next) if next > now => next,
        _ => now,
    };
    *next_slot = Some(slot + interval);
    slot
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_keys_default_under_25_reads_per_second_and_live_keys_under_100() {
        assert!(default_rate("sk_test_abc") < 25.0);
        assert!(default_rate("rk_test_abc") < 25.0);
        assert!(default_rate("sk_live_abc") < 100.0);
        assert!(default_rate("rk_live_abc") > 25.0);
    }

    #[test]
    fn consecutive_reservations_are_one_interval_apart() {
        let t0 = Instant::now();
        let interval = interval_for(20.0);
        assert_eq!(interval, Duration::from_millis(50));
        let mut next = None;
        let slots: Vec<Instant> = (0..4).map(|_| reserve(&mut next, t0, interval)).collect();
        assert_eq!(
            slots,
            vec![t0, t0 + interval, t0 + interval * 2, t0 + interval * 3]
        );
    }

    #[test]
    fn n_requests_take_at_least_n_minus_one_intervals() {
        let t0 = Instant::now();
        let interval = interval_for(25.0);
        let mut next = None;
        let last = (0..100)
            .map(|_| reserve(&mut next, t0, interval))
            .last()
            .unwrap();
        assert!(last - t0 >= interval * 99);
    }

    #[test]
    fn an_idle_limiter_does_not_bank_slots() {
        let t0 = Instant::now();
        let interval = Duration::from_millis(100);
        let mut next = None;
        reserve(&mut next, t0, interval);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(reserve(&mut next, later, interval), later);
        assert_eq!(reserve(&mut next, later, interval), later + interval);
    }
}
