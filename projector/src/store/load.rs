//! Loads the current snapshots of customers into the pure `CustomerState`.

use std::collections::BTreeMap;

use serde_json::value::RawValue;
use sqlx::{Postgres, Row, Transaction};

use crate::projection::{CustomerKey, CustomerState, ObjectKind, Rank, Snapshot};

/// Every table that holds a snapshot belonging to a customer, with the column naming the
/// customer. Invoices do not decide entitlements; see below.
const SOURCES: &[(ObjectKind, &str, &str)] = &[
    (ObjectKind::Customer, "customers", "id"),
    (ObjectKind::Subscription, "subscriptions", "customer"),
    (ObjectKind::CheckoutSession, "checkout_sessions", "customer"),
    (
        ObjectKind::EntitlementSummary,
        "entitlement_summaries",
        "customer",
    ),
];

/// The state of each customer in `keys`, built from the stored snapshots (re-parsed with the
/// same code that parsed the events, so stored and in-memory state cannot drift apart).
pub async fn load_states(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[CustomerKey],
) -> Result<BTreeMap<CustomerKey, CustomerState>, sqlx::Error> {
    let accounts: Vec<&str> = keys.iter().map(|k| k.account.as_str()).collect();
    let customers: Vec<&str> = keys.iter().map(|k| k.customer.as_str()).collect();
    let mut states: BTreeMap<CustomerKey, CustomerState> = keys
        .iter()
        .map(|k| {
            (
                k.clone(),
                CustomerState::new(k.account.clone(), k.customer.clone()),
            )
        })
        .collect();
    for (kind, table, customer_column) in SOURCES {
        let deleted = if *kind == ObjectKind::Customer {
            "deleted"
        } else {
            "false"
        };
        let sql = format!(
            "SELECT t.account, t.{customer_column} AS customer, t.event_type, t.livemode, t.snapshot::text AS snapshot,
                    t.rank_created, t.rank_type, t.rank_status, t.rank_event_id, {deleted} AS deleted
             FROM {table} t
             JOIN UNNEST($1::text[], $2::text[]) AS k(account, customer)
               ON t.account = k.account AND t.{customer_column} = k.customer"
        );
        let rows = sqlx::query(&sql)
            .bind(&accounts)
            .bind(&customers)
            .fetch_all(&mut **tx)
            .await?;
        for row in rows {
            let key = CustomerKey {
                account: row.try_get("account")?,
                customer: row.try_get("customer")?,
            };
            let Some(state) = states.get_mut(&key) else {
                continue;
            };
            let event_type: String = row.try_get("event_type")?;
            let text: String = row.try_get("snapshot")?;
            let rank = Rank {
                created: row.try_get("rank_created")?,
                type_rank: row.try_get("rank_type")?,
                status_rank: row.try_get("rank_status")?,
                event_id: row.try_get("rank_event_id")?,
            };
            let raw: Box<RawValue> =
                serde_json::from_str(&text).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            // What was stored parsed once already; a failure here means the code changed
            // under stored data, which must stop the projector rather than be skipped.
            let snapshot = Snapshot::parse(*kind, &event_type, &raw, row.try_get("livemode")?)
                .map_err(|reason| {
                    sqlx::Error::Decode(format!("stored {table} snapshot: {reason}").into())
                })?;
            state.last_event_created = state.last_event_created.max(rank.created);
            if row.try_get::<bool, _>("deleted")? {
                state.deleted = true;
            }
            match snapshot {
                Snapshot::Customer(s) => state.profile = Some((rank, s)),
                Snapshot::Subscription(s) => {
                    state.subscriptions.insert(s.id.clone(), (rank, s));
                }
                Snapshot::CheckoutSession(s) => {
                    state.checkout_sessions.insert(s.id.clone(), (rank, s));
                }
                Snapshot::EntitlementSummary(s) => state.summary = Some((rank, s)),
                Snapshot::Invoice(_) => {}
            }
        }
    }
    // Invoices count towards the customer's latest event time (`updated_at`) but not their
    // features, so only their newest `created` is read.
    let rows = sqlx::query(
        "SELECT t.account, t.customer, max(t.rank_created) AS created
         FROM invoices t
         JOIN UNNEST($1::text[], $2::text[]) AS k(account, customer)
           ON t.account = k.account AND t.customer = k.customer
         GROUP BY t.account, t.customer",
    )
    .bind(&accounts)
    .bind(&customers)
    .fetch_all(&mut **tx)
    .await?;
    for row in rows {
        let key = CustomerKey {
            account: row.try_get("account")?,
            customer: row.try_get("customer")?,
        };
        if let Some(state) = states.get_mut(&key) {
            state.last_event_created = state
                .last_event_created
                .max(row.try_get::<i64, _>("created")?);
        }
    }
    Ok(states)
}
