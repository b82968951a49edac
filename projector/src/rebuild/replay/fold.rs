//! The fold: per staging table, the max-rank row of every object into its projection table.

use futures_util::StreamExt;
use sqlx::PgPool;

use crate::rebuild::RebuildError;

use super::indexes::{drop_indexes, restore_indexes};

/// Per staged table, the usually largest first, the fold: the max-rank row per key (SPEC §6
/// order, as `Rank` orders it), found by a sort of the narrow key and rank columns only, then
/// the winners' wide rows fetched by `ctid` and their snapshots parsed into jsonb once.
///
/// The key is sorted id first: `account` is the same (empty) for every platform event, so a
/// sort that starts with it compares every pair on all its columns, where the id's
/// abbreviated key settles most comparisons at once (1M synthetic staged rows: 1.5 s instead
/// of 3.3 s for the sort).
const FOLDS: &[(&str, &str, &str, &str)] = &[
    (
        "subscriptions",
        "id, account",
        "account, id, livemode, customer, status, current_period_end, cancel_at_period_end, items, rank_created, rank_type, rank_status, rank_event_id, event_type, snapshot",
        "s.account, s.id, s.livemode, s.customer, s.status, s.current_period_end, s.cancel_at_period_end, s.items::jsonb, s.rank_created, s.rank_type, s.rank_status, s.rank_event_id, s.event_type, s.snapshot::jsonb",
    ),
    (
        "invoices",
        "id, account",
        "account, id, livemode, customer, subscription, status, paid, amount_paid, attempt_count, next_payment_attempt, paid_through, rank_created, rank_type, rank_status, rank_event_id, event_type, snapshot",
        "s.account, s.id, s.livemode, s.customer, s.subscription, s.status, s.paid, s.amount_paid, s.attempt_count, s.next_payment_attempt, s.paid_through, s.rank_created, s.rank_type, s.rank_status, s.rank_event_id, s.event_type, s.snapshot::jsonb",
    ),
    (
        "customers",
        "id, account",
        "account, id, livemode, email, name, deleted, rank_created, rank_type, rank_status, rank_event_id, event_type, snapshot",
        "s.account, s.id, s.livemode, s.email, s.name, w.deleted, s.rank_created, s.rank_type, s.rank_status, s.rank_event_id, s.event_type, s.snapshot::jsonb",
    ),
    (
        "checkout_sessions",
        "id, account",
        "account, id, livemode, customer, client_reference_id, mode, status, payment_status, subscription, metadata_price, metadata_product, rank_created, rank_type, rank_status, rank_event_id, event_type, snapshot",
        "s.account, s.id, s.livemode, s.customer, s.client_reference_id, s.mode, s.status, s.payment_status, s.subscription, s.metadata_price, s.metadata_product, s.rank_created, s.rank_type, s.rank_status, s.rank_event_id, s.event_type, s.snapshot::jsonb",
    ),
    (
        "entitlement_summaries",
        "customer, account",
        "account, customer, livemode, lookup_keys, rank_created, rank_type, rank_status, rank_event_id, event_type, snapshot",
        "s.account, s.customer, s.livemode, ARRAY(SELECT jsonb_array_elements_text(s.lookup_keys::jsonb)), s.rank_created, s.rank_type, s.rank_status, s.rank_event_id, s.event_type, s.snapshot::jsonb",
    ),
];

/// Tables folded at a time, each on its own connection (largest first, in [`FOLDS`] order):
/// the fold is Postgres's work, and on its own one backend leaves the other core idle.
const FOLD_CONCURRENCY: usize = 3;

/// Columns whose statistics the planner never uses (no query filters or joins on a snapshot or
/// a view): the widest values, which `ANALYZE` would detoast and compare for every sampled row.
const UNANALYZED: &[&str] = &["snapshot", "items", "view"];

/// `ANALYZE table (columns)` without the [`UNANALYZED`] ones.
pub(super) fn analyze(table: &str, columns: &str) -> String {
    let analyzed: Vec<&str> = columns
        .split(',')
        .map(str::trim)
        .filter(|c| !UNANALYZED.contains(c))
        .collect();
    format!("ANALYZE {table} ({})", analyzed.join(", "))
}

pub(super) async fn fold(fresh: &PgPool, schema: &str) -> Result<(), RebuildError> {
    let mut folds =
        futures_util::stream::iter(FOLDS.iter().map(|(table, key, columns, select)| {
            fold_table(fresh, schema, table, key, columns, select)
        }))
        .buffer_unordered(FOLD_CONCURRENCY);
    while let Some(folded) = folds.next().await {
        folded?;
    }
    Ok(())
}

async fn fold_table(
    fresh: &PgPool,
    schema: &str,
    table: &str,
    key: &str,
    columns: &str,
    select: &str,
) -> Result<(), RebuildError> {
    let mut tx = fresh.begin().await?;
    // The narrow sort fits in memory; the staged rows themselves are read once, the winners
    // by `ctid` (a nested loop over a TID scan). The staging tables have no statistics, and
    // without them the planner hashed every wide staged row instead (at 200k events: 312 MB
    // of hash table, twice the time), or would sort them for a merge join.
    for setting in [
        "SET LOCAL work_mem = '256MB'",
        "SET LOCAL enable_hashjoin = off",
        "SET LOCAL enable_mergejoin = off",
    ] {
        sqlx::query(setting).execute(&mut *tx).await?;
    }
    // Loaded first, indexed after: one sort per index instead of a B-tree insert per row.
    let indexes = drop_indexes(&mut tx, schema, table).await?;
    // A customer's deletion sticks whatever outranks it (`deleted` is an OR over them all).
    let deleted = if table == "customers" {
        format!(", bool_or(deleted) OVER (PARTITION BY {key}) AS deleted")
    } else {
        String::new()
    };
    sqlx::query(&format!(
        "INSERT INTO {table} ({columns})
         SELECT {select}
         FROM (SELECT DISTINCT ON ({key}) ctid AS row{deleted}
               FROM stage_{table}
               ORDER BY {key}, rank_created DESC, rank_type DESC, rank_status DESC, rank_event_id DESC) w
         JOIN stage_{table} s ON s.ctid = w.row"
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query(&format!("DROP TABLE stage_{table}"))
        .execute(&mut *tx)
        .await?;
    restore_indexes(&mut tx, schema, table, indexes).await?;
    tx.commit().await?;
    sqlx::query(&analyze(table, columns)).execute(fresh).await?;
    Ok(())
}
