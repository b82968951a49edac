//! The swap: live's projection tables move out to a retired schema and the rebuilt ones move
//! into `public`, by renaming (`ALTER TABLE … SET SCHEMA`), in constant time whatever the size.
//!
//! Statements prepared by live and the read API before the swap keep working: PostgreSQL
//! invalidates a cached plan when a relation it uses is altered and re-resolves the names of
//! the statement's text on the next execution, which now finds the rebuilt tables (the tables
//! have the same columns, so result types do not change). `rebuild_e2e` checks it: live keeps
//! writing, and the API keeps answering, on the swapped tables.

use sqlx::{PgConnection, Postgres, Row, Transaction};

use super::RebuildError;

/// The projection tables a swap replaces. Everything else stays as live has it: the outbox
/// (owed to downstream), dead letters and their redrive state, `processed_events` (the rank
/// maximum makes re-applying an event a no-op) and `consumer_offsets` (the rebuild ends at
/// exactly live's offsets).
pub(super) const SWAPPED_TABLES: &[&str] = &[
    "customers",
    "subscriptions",
    "invoices",
    "checkout_sessions",
    "entitlement_summaries",
    "entitlements",
];

/// Renames in the caller's transaction; the `ACCESS EXCLUSIVE` locks it takes on live's tables
/// are held only from here to the commit, so readers wait milliseconds, not the whole diff.
pub(super) async fn rename(
    tx: &mut Transaction<'_, Postgres>,
    fresh: &str,
    retired: &str,
) -> Result<(), RebuildError> {
    // Views follow their tables' identity, not their names: keep their definitions, as text
    // with unqualified names, to point them at the rebuilt tables after the move.
    let views = sqlx::query(
        "SELECT viewname, definition FROM pg_views WHERE schemaname = 'public' ORDER BY viewname",
    )
    .fetch_all(&mut **tx)
    .await?;
    sqlx::query(&format!("CREATE SCHEMA {retired}"))
        .execute(&mut **tx)
        .await?;
    for table in SWAPPED_TABLES {
        sqlx::query(&format!("ALTER TABLE public.{table} SET SCHEMA {retired}"))
            .execute(&mut **tx)
            .await?;
        sqlx::query(&format!("ALTER TABLE {fresh}.{table} SET SCHEMA public"))
            .execute(&mut **tx)
            .await?;
    }
    for view in views {
        let name: String = view.try_get("viewname")?;
        let definition: String = view.try_get("definition")?;
        sqlx::query(&format!(
            "CREATE OR REPLACE VIEW public.{name} AS {definition}"
        ))
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Drops the schemas an interrupted rebuild left (the caller holds the one-rebuild lock, so
/// no running rebuild owns them); returns their names.
pub(super) async fn drop_leftovers(
    conn: &mut PgConnection,
    prefix: &str,
) -> Result<Vec<String>, RebuildError> {
    let pattern = format!("{}%", prefix.replace('_', "\\_"));
    let leftovers: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE $1 ORDER BY 1",
    )
    .bind(&pattern)
    .fetch_all(&mut *conn)
    .await?;
    for schema in &leftovers {
        tracing::warn!(schema, "dropping what an interrupted rebuild left");
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&mut *conn)
            .await?;
    }
    Ok(leftovers)
}
