//! Whole-state snapshots of the projection tables, for "these two runs projected the same"
//! comparisons (rebuilt vs live, reordered vs in order, chaos vs oracle).

use std::collections::BTreeMap;

use serde_json::Value;
use sqlx::PgConnection;

/// Rows of each table, as JSON objects, in key order.
pub type Snapshot = BTreeMap<&'static str, Vec<Value>>;

/// Every projection table, each ordered by its key, so two snapshots compare row by row.
pub const PROJECTIONS: &[(&str, &str)] = &[
    ("customers", "SELECT * FROM customers ORDER BY account, id"),
    (
        "subscriptions",
        "SELECT * FROM subscriptions ORDER BY account, id",
    ),
    ("invoices", "SELECT * FROM invoices ORDER BY account, id"),
    (
        "checkout_sessions",
        "SELECT * FROM checkout_sessions ORDER BY account, id",
    ),
    (
        "entitlement_summaries",
        "SELECT * FROM entitlement_summaries ORDER BY account, customer",
    ),
    (
        "entitlements",
        "SELECT * FROM entitlements ORDER BY account, customer",
    ),
];

/// What the consumer keeps besides the projections: which customer a Checkout reference names,
/// which event ids it has applied, how many records it dead-lettered. Equal between two runs
/// of the same events, whatever their order or duplication.
pub const BOOKKEEPING: &[(&str, &str)] = &[
    (
        "customer_links",
        "SELECT * FROM customer_links ORDER BY account, customer",
    ),
    (
        "processed_events",
        "SELECT event_id FROM processed_events ORDER BY event_id",
    ),
    (
        "dead_letters",
        "SELECT count(*) AS dead_letters FROM dead_letters",
    ),
];

/// Every row `sql` returns, as JSON.
pub async fn rows(db: &mut PgConnection, sql: &str) -> Vec<Value> {
    let wrapped = format!("SELECT to_jsonb(t)::text FROM ({sql}) t");
    let rows: Vec<String> = sqlx::query_scalar(&wrapped)
        .fetch_all(db)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter()
        .map(|r| serde_json::from_str(r).expect("a JSON row"))
        .collect()
}

/// The rows of each named table.
pub async fn snapshot(db: &mut PgConnection, tables: &[(&'static str, &str)]) -> Snapshot {
    let mut snapshot = Snapshot::new();
    for (table, sql) in tables {
        snapshot.insert(*table, rows(db, sql).await);
    }
    snapshot
}

/// The snapshot without `entitlements.version`: it counts changes, and how many changes a log
/// makes depends on how its events were batched. Everything else depends on the events alone.
pub fn without_version(mut tables: Snapshot) -> Snapshot {
    for row in tables.get_mut("entitlements").into_iter().flatten() {
        row.as_object_mut()
            .expect("an entitlements row is an object")
            .remove("version");
    }
    tables
}

/// Asserts two snapshots hold the same tables with identical rows, naming the first
/// difference.
#[track_caller]
pub fn assert_same_projections(context: &str, left: &Snapshot, right: &Snapshot) {
    assert_eq!(
        left.keys().collect::<Vec<_>>(),
        right.keys().collect::<Vec<_>>(),
        "{context}: different tables"
    );
    for (table, a) in left {
        let b = &right[table];
        for (row, (a, b)) in a.iter().zip(b).enumerate() {
            assert_eq!(a, b, "{context}: {table} row {row} differs");
        }
        assert_eq!(
            a.len(),
            b.len(),
            "{context}: {table} has {} rows on the left, {} on the right",
            a.len(),
            b.len()
        );
    }
}
