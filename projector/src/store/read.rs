//! Queries of the read API.

use sqlx::types::Json;
use sqlx::PgPool;

/// A customer's stored entitlement object and its version.
#[derive(sqlx::FromRow)]
struct StoredView {
    view: Json<serde_json::Value>,
    version: i64,
}

impl StoredView {
    /// The SPEC §8 object: the stored view with its `version`.
    fn with_version(self) -> serde_json::Value {
        let Json(mut view) = self.view;
        if let Some(object) = view.as_object_mut() {
            object.insert("version".into(), self.version.into());
        }
        view
    }
}

/// A customer's entitlement object (SPEC §8) with its version, as stored.
pub async fn entitlements_by_customer(
    pool: &PgPool,
    account: &str,
    customer: &str,
) -> Result<Option<serde_json::Value>, sqlx::Error> {
    let row: Option<StoredView> = sqlx::query_as(
        "SELECT view, version FROM entitlements WHERE account = $1 AND customer = $2",
    )
    .bind(account)
    .bind(customer)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(StoredView::with_version))
}

/// The entitlement object of the customer linked to `client_reference_id` by Checkout (the most
/// recently updated one if several customers share it).
pub async fn entitlements_by_client_reference(
    pool: &PgPool,
    account: &str,
    client_reference_id: &str,
) -> Result<Option<serde_json::Value>, sqlx::Error> {
    let row: Option<StoredView> = sqlx::query_as(
        "SELECT view, version FROM entitlements WHERE account = $1 AND client_reference_id = $2
         ORDER BY updated_at DESC, customer LIMIT 1",
    )
    .bind(account)
    .bind(client_reference_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(StoredView::with_version))
}
