//! A fresh table's indexes, dropped for a bulk load and built again after it: one sort per
//! index instead of a B-tree insert per row.

use sqlx::{Postgres, Transaction};

use crate::rebuild::RebuildError;

/// An index of a fresh table, dropped for a bulk load and created again after it.
#[derive(sqlx::FromRow)]
pub(super) struct IndexDefinition {
    index: String,
    /// The constraint the index enforces (a primary key), if any.
    constraint: Option<String>,
    /// `CREATE INDEX …`, or the constraint's definition (`PRIMARY KEY (…)`).
    definition: String,
}

/// Drops every index of `schema.table` (a fresh, not yet visible table) and returns their
/// definitions, whatever the migrations made them. Indexes a foreign key depends on stay.
pub(super) async fn drop_indexes(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
    table: &str,
) -> Result<Vec<IndexDefinition>, RebuildError> {
    let indexes: Vec<IndexDefinition> = sqlx::query_as(
        "SELECT ci.relname::text AS index, c.conname::text AS constraint,
                CASE WHEN c.conname IS NULL THEN pg_get_indexdef(i.indexrelid)
                     ELSE pg_get_constraintdef(c.oid) END AS definition
         FROM pg_index i
         JOIN pg_class ci ON ci.oid = i.indexrelid
         LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid
         WHERE i.indrelid = to_regclass($1)
           AND NOT EXISTS (SELECT 1 FROM pg_constraint f WHERE f.contype = 'f' AND f.conindid = i.indexrelid)
         ORDER BY ci.relname",
    )
    .bind(format!("{schema}.{table}"))
    .fetch_all(&mut **tx)
    .await?;
    for index in &indexes {
        let statement = match &index.constraint {
            Some(constraint) => {
                format!("ALTER TABLE {schema}.{table} DROP CONSTRAINT {constraint}")
            }
            None => format!("DROP INDEX {schema}.{}", index.index),
        };
        sqlx::query(&statement).execute(&mut **tx).await?;
    }
    Ok(indexes)
}

pub(super) async fn restore_indexes(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
    table: &str,
    indexes: Vec<IndexDefinition>,
) -> Result<(), RebuildError> {
    sqlx::query("SET LOCAL maintenance_work_mem = '128MB'")
        .execute(&mut **tx)
        .await?;
    for index in indexes {
        let statement = match &index.constraint {
            Some(constraint) => format!(
                "ALTER TABLE {schema}.{table} ADD CONSTRAINT {constraint} {}",
                index.definition
            ),
            None => index.definition,
        };
        sqlx::query(&statement).execute(&mut **tx).await?;
    }
    Ok(())
}
