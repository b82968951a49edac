//! Queries of the read API.

use sqlx::{PgPool, Row};

/// A customer's entitlement object (SPEC §8) with its version, as stored.
pub async fn entitlements_by_customer(
    pool: &PgPool,
    account: &str,
    customer: &str,
) -> Result<Option<serde_json::Value>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT view::text AS view, version FROM entitlements WHERE account = $1 AND customer = $2",
    )
    .bind(account)
    .bind(customer)
    .fetch_optional(pool)
    .await?;
    row.map(with_version).transpose()
}

/// The entitlement object of the customer linked to `client_reference_id` by Checkout (the most
/// recently updated one if several customers share it).
pub async fn entitlements_by_client_reference(
    pool: &PgPool,
    account: &str,
    client_reference_id: &str,
) -> Result<Option<serde_json::Value>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT view::text AS view, version FROM entitlements WHERE account = $1 AND client_reference_id = $2
         ORDER BY updated_at DESC, customer LIMIT 1",
    )
    .bind(account)
    .bind(client_reference_id)
    .fetch_optional(pool)
    .await?;
    row.map(with_version).transpose()
}

fn with_version(row: sqlx::postgres::PgRow) -> Result<serde_json::Value, sqlx::Error> {
    let text: String = row.try_get("view")?;
    let mut view: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    let version: i64 = row.try_get("version")?;
    if let Some(object) = view.as_object_mut() {
        object.insert("version".into(), version.into());
    }
    Ok(view)
}
