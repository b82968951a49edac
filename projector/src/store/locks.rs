//! Advisory locks that serialise writers across transactions, commands and instances.
//!
//! Every transaction that recomputes a customer's entitlements (a live batch, a redrive, a
//! rebuild's swap) takes [`lock_customers`] for every customer it touches BEFORE it reads their
//! state. Two such transactions then cannot interleave: the second one reads the state only after
//! the first has committed, so it never recomputes from stale snapshots and never issues a
//! version the first one issued. The lock exists whether or not the customer has an
//! `entitlements` row yet, which a `SELECT … FOR UPDATE` could not give.

use sha2::{Digest, Sha256};
use sqlx::{Postgres, Transaction};

use crate::projection::CustomerKey;

/// Key of the session-level advisory lock that the outbox relay leader holds (one relay at a
/// time across every `projector run` instance on the database).
pub const RELAY_LEADER_LOCK: i64 = 0x5354_5249_5045_0002;

/// Key of the session-level advisory lock held for a whole `projector rebuild`: one rebuild at a
/// time, so that a rebuild finding `rebuild_*` schemas knows they are an interrupted run's
/// leftovers and may drop them. Every fixed lock key lives in this file, so none is used twice
/// (see the test): the rebuild lock of live batches is `store::REBUILD_LOCK`, `…_0001`.
pub const REBUILD_RUNNING_LOCK: i64 = 0x5354_5249_5045_0003;

/// The advisory-lock key of one customer: the first 8 bytes of SHA-256 over (account,
/// customer). Stable across processes, versions and machines, which `Hash` is not. A collision
/// only makes two customers wait for each other, never lets two writers of one customer in.
pub fn customer_lock_key(key: &CustomerKey) -> i64 {
    let mut hasher = Sha256::new();
    // Length-prefixed, so ("a", "bc") and ("ab", "c") differ.
    hasher.update((key.account.len() as u64).to_be_bytes());
    hasher.update(key.account.as_bytes());
    hasher.update(key.customer.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// The lock keys of `customers`, sorted and without repeats: every transaction takes its locks
/// in this one global order, so two transactions can wait for each other only one way round
/// (no deadlock).
pub fn customer_lock_keys<'a>(customers: impl IntoIterator<Item = &'a CustomerKey>) -> Vec<i64> {
    let mut keys: Vec<i64> = customers.into_iter().map(customer_lock_key).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Takes the transaction-scoped lock of every customer in `customers` (released at commit or
/// rollback). Waits while another transaction holds one of them.
pub async fn lock_customers<'a>(
    tx: &mut Transaction<'_, Postgres>,
    customers: impl IntoIterator<Item = &'a CustomerKey>,
) -> Result<(), sqlx::Error> {
    let keys = customer_lock_keys(customers);
    if keys.is_empty() {
        return Ok(());
    }
    // One round trip: UNNEST yields the sorted array in order, and the calls run row by row.
    sqlx::query("SELECT count(pg_advisory_xact_lock(k)) FROM UNNEST($1::int8[]) AS k")
        .bind(&keys)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(account: &str, customer: &str) -> CustomerKey {
        CustomerKey {
            account: account.to_owned(),
            customer: customer.to_owned(),
        }
    }

    #[test]
    fn the_lock_key_is_pinned_so_every_build_agrees_on_it() {
        // Instances of different builds run side by side during a deploy; F's rebuild swap and
        // redrive take the same keys. Values: SHA-256(len(account) as u64 BE ‖ account ‖
        // customer), first 8 bytes, big-endian.
        assert_eq!(
            customer_lock_key(&key("", "cus_1")),
            324_028_403_491_313_774
        );
        assert_eq!(
            customer_lock_key(&key("acct_1", "cus_1")),
            4_353_389_159_212_059_587
        );
    }

    #[test]
    fn account_and_customer_do_not_run_together() {
        assert_ne!(
            customer_lock_key(&key("acct_a", "bc")),
            customer_lock_key(&key("acct_ab", "c"))
        );
        assert_ne!(
            customer_lock_key(&key("", "cus_1")),
            customer_lock_key(&key("acct_1", "cus_1"))
        );
    }

    #[test]
    fn keys_are_sorted_and_unique_whatever_the_input_order() {
        let a = key("", "cus_a");
        let b = key("", "cus_b");
        let c = key("acct_1", "cus_a");
        let forward = customer_lock_keys([&a, &b, &c, &a]);
        let backward = customer_lock_keys([&c, &b, &a]);
        assert_eq!(forward, backward);
        assert_eq!(forward.len(), 3);
        assert!(forward.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn fixed_lock_keys_are_distinct() {
        let keys = [
            super::super::REBUILD_LOCK,
            RELAY_LEADER_LOCK,
            REBUILD_RUNNING_LOCK,
        ];
        let unique: std::collections::HashSet<i64> = keys.into_iter().collect();
        assert_eq!(
            unique.len(),
            keys.len(),
            "two advisory locks share a key: {keys:x?}"
        );
    }
}
