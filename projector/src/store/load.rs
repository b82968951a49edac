//! Loads the current snapshots of customers into the pure `CustomerState`, in one query over
//! the projection tables that decide entitlements.

use std::collections::{BTreeMap, HashMap};

use serde_json::value::RawValue;
use sqlx::postgres::PgArguments;
use sqlx::query::QueryAs;
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};

use crate::projection::{
    CustomerKey, CustomerState, ObjectKey, ObjectKind, ProjectedEvent, Rank, Snapshot,
};

use super::objects::Won;

/// Every table that holds a snapshot belonging to a customer, with the column naming the
/// customer; a row's `source` is its index here. Invoices do not decide entitlements, so they
/// are not loaded: they count only towards `last_event_created`, which the live batch reads
/// from the customer's entitlements row (see `entitlements.rs`) and [`load_states`] aggregates.
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

/// One stored snapshot of a customer.
#[derive(sqlx::FromRow)]
struct StoredSnapshot {
    /// Index into [`SOURCES`].
    source: i16,
    account: String,
    customer: String,
    id: String,
    event_type: String,
    livemode: bool,
    rank_created: i64,
    rank_type: i16,
    rank_status: i16,
    rank_event_id: String,
    deleted: bool,
    /// `NULL` when the row holds the snapshot the batch just wrote (taken from memory).
    snapshot: Option<Json<Box<RawValue>>>,
}

/// The query over every source: `$1`/`$2` the customers, `$3..$5` the won objects (source,
/// account, id) whose snapshot is not sent back.
fn load_sql() -> String {
    let branches: Vec<String> = SOURCES
        .iter()
        .enumerate()
        .map(|(source, (kind, table, customer_column))| {
            let (id, deleted) = match kind {
                ObjectKind::Customer => ("t.id", "t.deleted"),
                ObjectKind::EntitlementSummary => ("t.customer", "false"),
                _ => ("t.id", "false"),
            };
            format!(
                "SELECT {source}::int2 AS source, t.account, t.{customer_column} AS customer, {id} AS id,
                        t.event_type, t.livemode, t.rank_created, t.rank_type, t.rank_status, t.rank_event_id,
                        {deleted} AS deleted,
                        CASE WHEN (t.account, {id}) IN (SELECT w.account, w.id FROM won w WHERE w.source = {source})
                             THEN NULL ELSE t.snapshot END AS snapshot
                 FROM {table} t JOIN k ON t.account = k.account AND t.{customer_column} = k.customer"
            )
        })
        .collect();
    format!(
        "WITH k AS MATERIALIZED (SELECT * FROM UNNEST($1::text[], $2::text[]) AS k(account, customer)),
              won AS MATERIALIZED (SELECT * FROM UNNEST($3::int2[], $4::text[], $5::text[]) AS w(source, account, id))
         {}",
        branches.join("\n UNION ALL ")
    )
}

/// The state of each customer in `keys`, built from the stored snapshots (re-parsed with the
/// same code that parsed the events, so stored and in-memory state cannot drift apart),
/// including the newest `created` of their invoices. For the rebuild's derivation.
pub async fn load_states(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[CustomerKey],
) -> Result<BTreeMap<CustomerKey, CustomerState>, sqlx::Error> {
    let keys: Vec<&CustomerKey> = keys.iter().collect();
    let mut states = load_snapshots(tx, &keys, &Won::new(), &HashMap::new()).await?;
    for newest in newest_invoices(tx, &keys).await? {
        if let Some(state) = states.get_mut(&newest.key) {
            state.last_event_created = state.last_event_created.max(newest.created);
        }
    }
    Ok(states.into_iter().collect())
}

/// The newest `created` among the invoices of the customer `k` (`NULL` without any), as a
/// scalar subquery over `k(account, customer)`. It grows with a customer's history, so a live
/// batch asks it only for customers without an entitlements row (`entitlements.rs`).
pub(super) const NEWEST_INVOICE_CREATED: &str = "(SELECT max(i.rank_created) FROM invoices i
     WHERE i.account = k.account AND i.customer = k.customer)";

/// A customer's newest invoice `created`.
struct NewestInvoice {
    key: CustomerKey,
    created: i64,
}

#[derive(sqlx::FromRow)]
struct NewestInvoiceRow {
    account: String,
    customer: String,
    created: i64,
}

async fn newest_invoices(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[&CustomerKey],
) -> Result<Vec<NewestInvoice>, sqlx::Error> {
    let keys = KeyColumns::of(keys);
    let sql = format!(
        "SELECT account, customer, created FROM (
             SELECT k.account, k.customer, {NEWEST_INVOICE_CREATED} AS created
             FROM UNNEST($1::text[], $2::text[]) AS k(account, customer)) n
         WHERE created IS NOT NULL"
    );
    let rows: Vec<NewestInvoiceRow> = keys.bind(sqlx::query_as(&sql)).fetch_all(&mut **tx).await?;
    Ok(rows
        .into_iter()
        .map(|row| NewestInvoice {
            key: CustomerKey {
                account: row.account,
                customer: row.customer,
            },
            created: row.created,
        })
        .collect())
}

/// Customer keys as the two arrays `UNNEST($1::text[], $2::text[])` takes.
pub(super) struct KeyColumns<'a> {
    pub account: Vec<&'a str>,
    pub customer: Vec<&'a str>,
}

impl<'a> KeyColumns<'a> {
    pub fn of(keys: &[&'a CustomerKey]) -> Self {
        KeyColumns {
            account: keys.iter().map(|k| k.account.as_str()).collect(),
            customer: keys.iter().map(|k| k.customer.as_str()).collect(),
        }
    }

    /// Binds the two arrays as `$1` and `$2`.
    pub fn bind<'q, O>(
        &'q self,
        query: QueryAs<'q, Postgres, O, PgArguments>,
    ) -> QueryAs<'q, Postgres, O, PgArguments> {
        query.bind(&self.account).bind(&self.customer)
    }
}

/// The state of each customer in `keys` from the snapshot tables. The objects in `won` hold
/// exactly the snapshot of their event in `objects` (the batch just wrote it), so that one is
/// taken from memory instead of being sent back and parsed again: it was parsed from the same
/// bytes by the same code.
pub(super) async fn load_snapshots(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[&CustomerKey],
    won: &Won,
    objects: &HashMap<ObjectKey, &ProjectedEvent>,
) -> Result<HashMap<CustomerKey, CustomerState>, sqlx::Error> {
    let key_columns = KeyColumns::of(keys);
    let mut won_source = Vec::new();
    let mut won_account = Vec::new();
    let mut won_id = Vec::new();
    for key in won {
        if let Some(source) = SOURCES.iter().position(|(kind, _, _)| *kind == key.kind) {
            won_source.push(source as i16);
            won_account.push(key.account.as_str());
            won_id.push(key.id.as_str());
        }
    }
    let mut states: HashMap<CustomerKey, CustomerState> = keys
        .iter()
        .map(|k| {
            (
                (*k).clone(),
                CustomerState::new(k.account.clone(), k.customer.clone()),
            )
        })
        .collect();
    let sql = load_sql();
    let rows: Vec<StoredSnapshot> = key_columns
        .bind(sqlx::query_as(&sql))
        .bind(&won_source)
        .bind(&won_account)
        .bind(&won_id)
        .fetch_all(&mut **tx)
        .await?;
    let mut from_memory: HashMap<(ObjectKind, &str, &str), &Snapshot> = HashMap::new();
    for (key, event) in objects {
        if let Some(snapshot) = &event.snapshot {
            from_memory.insert((key.kind, &key.account, &key.id), snapshot);
        }
    }
    for row in rows {
        let key = CustomerKey {
            account: row.account,
            customer: row.customer,
        };
        let Some(state) = states.get_mut(&key) else {
            continue;
        };
        let Some((kind, table, _)) = SOURCES.get(row.source as usize) else {
            return Err(sqlx::Error::Decode(
                format!("unknown snapshot source {}", row.source).into(),
            ));
        };
        let snapshot = match &row.snapshot {
            // What was stored parsed once already; a failure here means the code changed
            // under stored data, which must stop the projector rather than be skipped.
            Some(Json(raw)) => {
                Snapshot::parse(*kind, &row.event_type, raw, row.livemode).map_err(|reason| {
                    sqlx::Error::Decode(format!("stored {table} snapshot: {reason}").into())
                })?
            }
            None => from_memory
                .get(&(*kind, key.account.as_str(), row.id.as_str()))
                .map(|snapshot| (*snapshot).clone())
                .ok_or_else(|| {
                    sqlx::Error::Decode(
                        format!("{table} {} won its upsert but is not in the batch", row.id).into(),
                    )
                })?,
        };
        let rank = Rank {
            created: row.rank_created,
            type_rank: row.rank_type,
            status_rank: row.rank_status,
            event_id: row.rank_event_id,
        };
        state.last_event_created = state.last_event_created.max(rank.created);
        if row.deleted {
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
    Ok(states)
}
