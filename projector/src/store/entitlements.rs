//! `entitlements`: each touched customer's object recomputed from their whole state, written
//! with a new `version` and a change message in the outbox when it changed (the change model
//! itself, what counts as a change and what the message says, is `projection::change`).

use std::collections::HashMap;

use sqlx::types::Json;
use sqlx::{Postgres, Transaction};

use shared::Cause;

use crate::projection::{
    change_message, compute, same_entitlements, CoalescedBatch, CustomerKey, EntitlementView,
};

use super::load::{load_snapshots, KeyColumns, NEWEST_INVOICE_CREATED};
use super::objects::Won;
use super::outbox::{OutboxRows, INSERT_OUTBOX};
use super::BatchContext;

/// A touched customer's entitlements row as stored (all `None` but the key when there is none).
#[derive(sqlx::FromRow)]
struct StoredEntitlement {
    account: String,
    customer: String,
    version: Option<i64>,
    view: Option<Json<serde_json::Value>>,
    features: Option<Vec<String>>,
    /// The newest `created` among the customer's events as of the row's last write: its
    /// `updated_at`, which is the view's (SPEC §8). Without a row, the newest invoice's.
    last_event_created: Option<i64>,
}

/// Reads the touched customers' rows. No `FOR UPDATE`: every writer of a customer's row holds
/// that customer's advisory lock (`locks.rs`) for its whole transaction, so the row cannot
/// move under this one, and a row lock would cost a heap write and WAL per customer.
///
/// Invoices count towards `updated_at` but not towards features, and a customer's invoices
/// grow with their history: instead of aggregating them on every batch, the stored row's
/// `updated_at` carries their maximum forward, and the batch's own events are added in
/// memory. Only a customer without a row is aggregated (a first event, or a row a rebuild left
/// out).
async fn read_stored(
    tx: &mut Transaction<'_, Postgres>,
    touched: &[&CustomerKey],
) -> Result<HashMap<CustomerKey, StoredEntitlement>, sqlx::Error> {
    let keys = KeyColumns::of(touched);
    let sql = format!(
        "SELECT k.account, k.customer, e.version, e.view, e.features,
                COALESCE(extract(epoch FROM e.updated_at)::int8, {NEWEST_INVOICE_CREATED}) AS last_event_created
         FROM UNNEST($1::text[], $2::text[]) AS k(account, customer)
         LEFT JOIN entitlements e ON e.account = k.account AND e.customer = k.customer"
    );
    let rows: Vec<StoredEntitlement> = keys.bind(sqlx::query_as(&sql)).fetch_all(&mut **tx).await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let key = CustomerKey {
                account: row.account.clone(),
                customer: row.customer.clone(),
            };
            (key, row)
        })
        .collect())
}

/// The rows to upsert, one array per column.
#[derive(Default)]
struct EntitlementRows {
    account: Vec<String>,
    customer: Vec<String>,
    livemode: Vec<bool>,
    client_reference_id: Vec<Option<String>>,
    /// Joined by U+001F: a `text[][]` cannot be unnested row by row.
    features: Vec<String>,
    version: Vec<i64>,
    view: Vec<Json<serde_json::Value>>,
    updated_at: Vec<i64>,
}

impl EntitlementRows {
    fn push(
        &mut self,
        key: &CustomerKey,
        view: &EntitlementView,
        version: i64,
        json: serde_json::Value,
    ) {
        self.account.push(key.account.clone());
        self.customer.push(key.customer.clone());
        self.livemode.push(view.livemode);
        self.client_reference_id
            .push(view.client_reference_id.clone());
        self.features.push(view.features.join("\u{1f}"));
        self.version.push(version);
        self.view.push(Json(json));
        self.updated_at.push(view.updated_at_unix);
    }
}

/// Recomputes the entitlements of every customer `batch` touched; a change gets a version and
/// (when the mode emits) a change message caused by `causes[customer]`. Returns the changes.
pub(super) async fn write_entitlement_changes(
    tx: &mut Transaction<'_, Postgres>,
    ctx: &BatchContext<'_>,
    batch: &CoalescedBatch<'_>,
    won: &Won,
    causes: &HashMap<CustomerKey, Cause>,
) -> Result<u64, sqlx::Error> {
    // In key order: a batch's messages are written in a deterministic order.
    let touched = batch.sorted_customers();
    if touched.is_empty() {
        return Ok(0);
    }
    let mut states = load_snapshots(tx, &touched, won, &batch.objects).await?;
    let stored = read_stored(tx, &touched).await?;

    let mut upsert = EntitlementRows::default();
    let mut outbox = OutboxRows::default();
    let mut changes = 0u64;
    for key in touched {
        let Some(state) = states.get_mut(key) else {
            continue;
        };
        let stored = stored.get(key);
        let batch_created = batch.customers.get(key).map_or(0, |t| t.last_event_created);
        state.last_event_created = state
            .last_event_created
            .max(batch_created)
            .max(stored.and_then(|s| s.last_event_created).unwrap_or(0));
        let view: EntitlementView = compute(state, ctx.policy);
        let value = serde_json::to_value(&view).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        let previous = stored.and_then(|s| Some((s.version?, &s.view.as_ref()?.0, &s.features)));
        let (version, old_features): (i64, &[String]) = match previous {
            // Only `updated_at` moved (an invoice, a profile update): the stored object follows
            // so that it depends on the events alone, not on how they were batched, but no
            // version and no message, since nothing downstream acts on changed.
            Some((version, old_view, _)) if same_entitlements(old_view, &value) => {
                if *old_view != value {
                    upsert.push(key, &view, version, value);
                }
                continue;
            }
            Some((version, _, features)) => (version + 1, features.as_deref().unwrap_or(&[])),
            None => (1, &[]),
        };
        changes += 1;
        // A rebuild counts versions but announces nothing: the swap emits the net differences.
        if ctx.mode.emits() {
            // Every touched customer has a cause: touched means a new event with a snapshot.
            let cause = causes.get(key).cloned().unwrap_or_else(|| Cause {
                event_id: None,
                event_type: String::new(),
            });
            let message = change_message(&value, version, old_features, &view.features, cause);
            let payload =
                serde_json::to_vec(&message).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
            let message_key = shared::envelope::scoped_key(view.account.as_deref(), &view.customer);
            outbox.push(
                ctx.entitlements_topic,
                Some(message_key),
                payload,
                serde_json::json!({}),
            );
        }
        upsert.push(key, &view, version, value);
    }
    if upsert.customer.is_empty() {
        return Ok(changes);
    }
    // The upsert and the messages in one statement (a data-modifying WITH runs to completion).
    sqlx::query(&format!(
        "WITH written AS (
             INSERT INTO entitlements (account, customer, livemode, client_reference_id, features, version, view, updated_at)
             SELECT account, customer, livemode, client_reference_id,
                    CASE WHEN features = '' THEN '{{}}'::text[] ELSE string_to_array(features, E'\\x1f') END,
                    version, view, to_timestamp(updated_at)
             FROM UNNEST($5::text[], $6::text[], $7::bool[], $8::text[], $9::text[], $10::int8[], $11::jsonb[], $12::int8[])
               AS u(account, customer, livemode, client_reference_id, features, version, view, updated_at)
             ON CONFLICT (account, customer) DO UPDATE SET livemode = EXCLUDED.livemode,
                 client_reference_id = EXCLUDED.client_reference_id, features = EXCLUDED.features,
                 version = EXCLUDED.version, view = EXCLUDED.view, updated_at = EXCLUDED.updated_at)
         {INSERT_OUTBOX}"
    ))
    .bind(&outbox.topic)
    .bind(&outbox.key)
    .bind(&outbox.payload)
    .bind(&outbox.headers)
    .bind(&upsert.account)
    .bind(&upsert.customer)
    .bind(&upsert.livemode)
    .bind(&upsert.client_reference_id)
    .bind(&upsert.features)
    .bind(&upsert.version)
    .bind(&upsert.view)
    .bind(&upsert.updated_at)
    .execute(&mut **tx)
    .await?;
    Ok(changes)
}
