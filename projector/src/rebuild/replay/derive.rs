//! Every customer's entitlements, derived from the folded tables.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::task::JoinSet;

use crate::projection::{compute, CustomerKey, EntitlementPolicy};
use crate::rebuild::RebuildError;
use crate::store;

use super::copy_text::CopyText;
use super::fold::analyze;
use super::indexes::{drop_indexes, restore_indexes};
use super::join_error;
use crate::rebuild::customer_keys;

/// Customers whose entitlements are derived per round trip at the end of the bulk load; with
/// [`DERIVERS`] chunks in flight, the states held at a time.
const DERIVE_CHUNK: i64 = 1_000;

/// Every customer any projected object names, whose entitlement object live would hold.
const CUSTOMER_KEYS: &str = "SELECT account, id AS customer FROM customers
     UNION SELECT account, customer FROM subscriptions
     UNION SELECT account, customer FROM invoices WHERE customer IS NOT NULL
     UNION SELECT account, customer FROM checkout_sessions WHERE customer IS NOT NULL
     UNION SELECT account, customer FROM entitlement_summaries";

/// The entitlements' columns, in COPY order.
const ENTITLEMENT_COLUMNS: &str =
    "account, customer, livemode, client_reference_id, features, version, view, updated_at";

/// Chunks of customers derived at a time, each on its own connection.
const DERIVERS: usize = 2;

/// Derives every customer's entitlement object from the folded tables, a chunk of customers per
/// round trip, with the same state loading and the same `compute` as live batches. Versions are
/// 0 here: [`crate::rebuild::diff`] carries them over from live. One connection reads the customers'
/// keys from a cursor, [`DERIVERS`] others derive and COPY chunks of them; the entitlements'
/// indexes are built after.
pub(super) async fn derive_entitlements(
    fresh: &PgPool,
    schema: &str,
    policy: &EntitlementPolicy,
) -> Result<(), RebuildError> {
    // Committed on its own: dropping an index locks the table until the end of the
    // transaction, and the derivers write it from other connections.
    let mut tx = fresh.begin().await?;
    let indexes = drop_indexes(&mut tx, schema, "entitlements").await?;
    tx.commit().await?;
    let mut tx = fresh.begin().await?;
    sqlx::query(&format!(
        "DECLARE customer_keys NO SCROLL CURSOR FOR {CUSTOMER_KEYS}"
    ))
    .execute(&mut *tx)
    .await?;
    let policy = Arc::new(policy.clone());
    let mut chunks: JoinSet<Result<(), RebuildError>> = JoinSet::new();
    loop {
        let rows = sqlx::query(&format!("FETCH {DERIVE_CHUNK} FROM customer_keys"))
            .fetch_all(&mut *tx)
            .await?;
        if rows.is_empty() {
            break;
        }
        let keys = customer_keys(&rows)?;
        while chunks.len() >= DERIVERS {
            if let Some(derived) = chunks.join_next().await {
                derived.map_err(join_error)??;
            }
        }
        chunks.spawn(derive_chunk(fresh.clone(), Arc::clone(&policy), keys));
    }
    while let Some(derived) = chunks.join_next().await {
        derived.map_err(join_error)??;
    }
    sqlx::query("CLOSE customer_keys").execute(&mut *tx).await?;
    tx.commit().await?;
    let mut tx = fresh.begin().await?;
    restore_indexes(&mut tx, schema, "entitlements", indexes).await?;
    tx.commit().await?;
    sqlx::query(&analyze("entitlements", ENTITLEMENT_COLUMNS))
        .execute(fresh)
        .await?;
    Ok(())
}

/// One chunk of customers: their states loaded, their entitlements computed and COPYed.
async fn derive_chunk(
    fresh: PgPool,
    policy: Arc<EntitlementPolicy>,
    keys: Vec<CustomerKey>,
) -> Result<(), RebuildError> {
    let mut tx = fresh.begin().await?;
    let states = store::load_states(&mut tx, &keys).await?;
    let mut text = CopyText::default();
    for (key, state) in &states {
        let view = compute(state, &policy);
        let json = serde_json::to_string(&view)?;
        text.text(&key.account)
            .text(&key.customer)
            .bool(view.livemode)
            .opt_text(view.client_reference_id.as_deref())
            .text(&text_array(&view.features))
            .int(0)
            .text(&json)
            .text(&view.updated_at())
            .end_row();
    }
    let mut copy = tx
        .copy_in_raw(&format!(
            "COPY entitlements ({ENTITLEMENT_COLUMNS}) FROM STDIN"
        ))
        .await?;
    copy.send(text.text.into_bytes()).await?;
    copy.finish().await?;
    tx.commit().await?;
    Ok(())
}

/// A `text[]` literal: every element quoted, quotes and backslashes escaped.
fn text_array(values: &[String]) -> String {
    let mut literal = String::from("{");
    for (i, value) in values.iter().enumerate() {
        if i > 0 {
            literal.push(',');
        }
        literal.push('"');
        for c in value.chars() {
            if c == '"' || c == '\\' {
                literal.push('\\');
            }
            literal.push(c);
        }
        literal.push('"');
    }
    literal.push('}');
    literal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_array_quotes_every_element() {
        let literal = text_array(&["pro".into(), "a\"b".into(), "c\\d".into()]);

        assert_eq!(literal, r#"{"pro","a\"b","c\\d"}"#);
        assert_eq!(text_array(&[]), "{}");
    }
}
