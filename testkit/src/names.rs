//! Names no other test (or earlier run) uses, and the wall clock as Stripe states it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// `{prefix}_{pid}_{n}_{nanos}`: unique across the tests of one process (`n`), across processes
/// running at once (`pid`) and across runs (`nanos`). Only `[a-z0-9_]` besides the prefix, so it
/// is a valid Postgres database name, Kafka topic and consumer group as it is.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos();
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos % 1_000_000_000
    )
}

/// Now, in unix seconds, as Stripe's `t=` and `created` carry it.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_names_with_one_prefix_differ_and_are_valid_database_names() {
        let (a, b) = (unique("e2e"), unique("e2e"));

        assert_ne!(a, b);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
    }
}
