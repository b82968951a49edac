//! The five projection tables (`customers`, `subscriptions`, `invoices`, `checkout_sessions`,
//! `entitlement_summaries`): one multi-row upsert per table and batch. Each row keeps the rank
//! of the snapshot it holds, and the upsert replaces a row only with a strictly greater rank —
//! in SQL, the same rule as `projection::newer` in memory (migrations/0001_projections.sql).

use std::collections::HashSet;

use serde::Serialize;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};

use crate::projection::{
    CheckoutSessionSnapshot, CoalescedBatch, CustomerKey, CustomerSnapshot, InvoiceSnapshot,
    ObjectKey, ObjectKind, ProjectedEvent, Snapshot, SubscriptionSnapshot,
};

/// The objects whose snapshot in the batch won its upsert: the row now holds exactly the
/// batch's snapshot, so the recomputation takes it from memory instead of reading it back.
pub(super) type Won = HashSet<ObjectKey>;

/// One item of `subscriptions.items`: what the read side and the entitlements need of it.
#[derive(Serialize)]
struct StoredItem<'a> {
    id: &'a str,
    price: Option<&'a str>,
    product: Option<&'a str>,
    lookup_key: Option<&'a str>,
    quantity: Option<i64>,
    current_period_end: Option<i64>,
}

fn stored_items(s: &SubscriptionSnapshot) -> Json<Vec<StoredItem<'_>>> {
    Json(
        s.items
            .iter()
            .map(|i| StoredItem {
                id: &i.id,
                price: i.price.as_deref(),
                product: i.product.as_deref(),
                lookup_key: i.lookup_key.as_deref(),
                quantity: i.quantity,
                current_period_end: i.current_period_end,
            })
            .collect(),
    )
}

/// The `subscriptions.items` column of a snapshot as JSON text (the rebuild's COPY writes it).
pub(crate) fn subscription_items_json(s: &SubscriptionSnapshot) -> String {
    // Serialising plain structs of strings and integers cannot fail.
    serde_json::to_string(&stored_items(s).0).unwrap_or_else(|_| "[]".to_owned())
}

/// The columns every projection table has, one array per column (`$1..$9`).
#[derive(Default)]
struct CommonColumns<'a> {
    account: Vec<&'a str>,
    id: Vec<&'a str>,
    livemode: Vec<bool>,
    rank_created: Vec<i64>,
    rank_type: Vec<i16>,
    rank_status: Vec<i16>,
    rank_event_id: Vec<&'a str>,
    event_type: Vec<&'a str>,
    /// The exact JSON text of `data.object`: sent as text and parsed once by Postgres, where
    /// `Json` would serialise it again.
    snapshot: Vec<&'a str>,
}

impl<'a> CommonColumns<'a> {
    fn push(&mut self, event: &'a ProjectedEvent, snapshot: &'a Snapshot) {
        self.account.push(&event.account);
        self.id.push(snapshot.object_id());
        self.livemode.push(snapshot.livemode());
        self.rank_created.push(event.rank.created);
        self.rank_type.push(event.rank.type_rank);
        self.rank_status.push(event.rank.status_rank);
        self.rank_event_id.push(&event.rank.event_id);
        self.event_type.push(&event.event_type);
        self.snapshot.push(snapshot.raw());
    }

    /// In the order of [`COMMON_COLUMNS`], whose `snapshot` is cast from text.
    fn columns(&self) -> [Column<'_, 'a>; 9] {
        [
            Column::Text(&self.account),
            Column::Text(&self.id),
            Column::Bool(&self.livemode),
            Column::Int(&self.rank_created),
            Column::SmallInt(&self.rank_type),
            Column::SmallInt(&self.rank_status),
            Column::Text(&self.rank_event_id),
            Column::Text(&self.event_type),
            Column::Text(&self.snapshot),
        ]
    }
}

/// `$1..$9` of every upsert.
const COMMON_COLUMNS: &[&str] = &[
    "account",
    "id",
    "livemode",
    "rank_created",
    "rank_type",
    "rank_status",
    "rank_event_id",
    "event_type",
    "snapshot",
];

/// One column's values for `UNNEST`; the variant gives the array's SQL type.
enum Column<'c, 'a> {
    Text(&'c Vec<&'a str>),
    OptText(&'c Vec<Option<&'a str>>),
    Int(&'c Vec<i64>),
    OptInt(&'c Vec<Option<i64>>),
    SmallInt(&'c Vec<i16>),
    Bool(&'c Vec<bool>),
    Items(&'c Vec<Json<Vec<StoredItem<'a>>>>),
}

impl<'c, 'a> Column<'c, 'a> {
    fn sql_type(&self) -> &'static str {
        match self {
            Column::Text(_) | Column::OptText(_) => "text[]",
            Column::Int(_) | Column::OptInt(_) => "int8[]",
            Column::SmallInt(_) => "int2[]",
            Column::Bool(_) => "bool[]",
            Column::Items(_) => "jsonb[]",
        }
    }

    fn bind(self, query: Query<'c, Postgres, PgArguments>) -> Query<'c, Postgres, PgArguments> {
        match self {
            Column::Text(v) => query.bind(v),
            Column::OptText(v) => query.bind(v),
            Column::Int(v) => query.bind(v),
            Column::OptInt(v) => query.bind(v),
            Column::SmallInt(v) => query.bind(v),
            Column::Bool(v) => query.bind(v),
            Column::Items(v) => query.bind(v),
        }
    }
}

/// A projection table's rows of one batch: the common columns and the table's own.
trait TableRows<'a> {
    const TABLE: &'static str;
    const KIND: ObjectKind;
    fn common(&self) -> &CommonColumns<'a>;
    /// The table's own columns (`$10…`), by name.
    fn own_columns(&self) -> Vec<(&'static str, Column<'_, 'a>)>;
}

#[derive(Default)]
struct CustomerRows<'a> {
    common: CommonColumns<'a>,
    email: Vec<Option<&'a str>>,
    name: Vec<Option<&'a str>>,
}

impl<'a> CustomerRows<'a> {
    fn push(&mut self, event: &'a ProjectedEvent, snapshot: &'a Snapshot, s: &'a CustomerSnapshot) {
        self.common.push(event, snapshot);
        self.email.push(s.email.as_deref());
        self.name.push(s.name.as_deref());
    }
}

impl<'a> TableRows<'a> for CustomerRows<'a> {
    const TABLE: &'static str = "customers";
    const KIND: ObjectKind = ObjectKind::Customer;
    fn common(&self) -> &CommonColumns<'a> {
        &self.common
    }
    fn own_columns(&self) -> Vec<(&'static str, Column<'_, 'a>)> {
        vec![
            ("email", Column::OptText(&self.email)),
            ("name", Column::OptText(&self.name)),
        ]
    }
}

#[derive(Default)]
struct SubscriptionRows<'a> {
    common: CommonColumns<'a>,
    customer: Vec<&'a str>,
    status: Vec<&'a str>,
    current_period_end: Vec<Option<i64>>,
    cancel_at_period_end: Vec<bool>,
    items: Vec<Json<Vec<StoredItem<'a>>>>,
}

impl<'a> SubscriptionRows<'a> {
    fn push(
        &mut self,
        event: &'a ProjectedEvent,
        snapshot: &'a Snapshot,
        s: &'a SubscriptionSnapshot,
    ) {
        self.common.push(event, snapshot);
        self.customer.push(&s.customer);
        self.status.push(&s.status);
        self.current_period_end.push(s.current_period_end);
        self.cancel_at_period_end.push(s.cancel_at_period_end);
        self.items.push(stored_items(s));
    }
}

impl<'a> TableRows<'a> for SubscriptionRows<'a> {
    const TABLE: &'static str = "subscriptions";
    const KIND: ObjectKind = ObjectKind::Subscription;
    fn common(&self) -> &CommonColumns<'a> {
        &self.common
    }
    fn own_columns(&self) -> Vec<(&'static str, Column<'_, 'a>)> {
        vec![
            ("customer", Column::Text(&self.customer)),
            ("status", Column::Text(&self.status)),
            (
                "current_period_end",
                Column::OptInt(&self.current_period_end),
            ),
            (
                "cancel_at_period_end",
                Column::Bool(&self.cancel_at_period_end),
            ),
            ("items", Column::Items(&self.items)),
        ]
    }
}

#[derive(Default)]
struct InvoiceRows<'a> {
    common: CommonColumns<'a>,
    customer: Vec<Option<&'a str>>,
    subscription: Vec<Option<&'a str>>,
    status: Vec<Option<&'a str>>,
    paid: Vec<bool>,
    amount_paid: Vec<i64>,
    attempt_count: Vec<i64>,
    next_payment_attempt: Vec<Option<i64>>,
    paid_through: Vec<Option<i64>>,
}

impl<'a> InvoiceRows<'a> {
    fn push(&mut self, event: &'a ProjectedEvent, snapshot: &'a Snapshot, s: &'a InvoiceSnapshot) {
        self.common.push(event, snapshot);
        self.customer.push(s.customer.as_deref());
        self.subscription.push(s.subscription.as_deref());
        self.status.push(s.status.as_deref());
        self.paid.push(s.paid);
        self.amount_paid.push(s.amount_paid);
        self.attempt_count.push(s.attempt_count);
        self.next_payment_attempt.push(s.next_payment_attempt);
        self.paid_through.push(s.paid_through);
    }
}

impl<'a> TableRows<'a> for InvoiceRows<'a> {
    const TABLE: &'static str = "invoices";
    const KIND: ObjectKind = ObjectKind::Invoice;
    fn common(&self) -> &CommonColumns<'a> {
        &self.common
    }
    fn own_columns(&self) -> Vec<(&'static str, Column<'_, 'a>)> {
        vec![
            ("customer", Column::OptText(&self.customer)),
            ("subscription", Column::OptText(&self.subscription)),
            ("status", Column::OptText(&self.status)),
            ("paid", Column::Bool(&self.paid)),
            ("amount_paid", Column::Int(&self.amount_paid)),
            ("attempt_count", Column::Int(&self.attempt_count)),
            (
                "next_payment_attempt",
                Column::OptInt(&self.next_payment_attempt),
            ),
            ("paid_through", Column::OptInt(&self.paid_through)),
        ]
    }
}

#[derive(Default)]
struct CheckoutSessionRows<'a> {
    common: CommonColumns<'a>,
    customer: Vec<Option<&'a str>>,
    client_reference_id: Vec<Option<&'a str>>,
    mode: Vec<&'a str>,
    status: Vec<Option<&'a str>>,
    payment_status: Vec<&'a str>,
    subscription: Vec<Option<&'a str>>,
    metadata_price: Vec<Option<&'a str>>,
    metadata_product: Vec<Option<&'a str>>,
}

impl<'a> CheckoutSessionRows<'a> {
    fn push(
        &mut self,
        event: &'a ProjectedEvent,
        snapshot: &'a Snapshot,
        s: &'a CheckoutSessionSnapshot,
    ) {
        self.common.push(event, snapshot);
        self.customer.push(s.customer.as_deref());
        self.client_reference_id
            .push(s.client_reference_id.as_deref());
        self.mode.push(&s.mode);
        self.status.push(s.status.as_deref());
        self.payment_status.push(&s.payment_status);
        self.subscription.push(s.subscription.as_deref());
        self.metadata_price.push(s.metadata_price.as_deref());
        self.metadata_product.push(s.metadata_product.as_deref());
    }
}

impl<'a> TableRows<'a> for CheckoutSessionRows<'a> {
    const TABLE: &'static str = "checkout_sessions";
    const KIND: ObjectKind = ObjectKind::CheckoutSession;
    fn common(&self) -> &CommonColumns<'a> {
        &self.common
    }
    fn own_columns(&self) -> Vec<(&'static str, Column<'_, 'a>)> {
        vec![
            ("customer", Column::OptText(&self.customer)),
            (
                "client_reference_id",
                Column::OptText(&self.client_reference_id),
            ),
            ("mode", Column::Text(&self.mode)),
            ("status", Column::OptText(&self.status)),
            ("payment_status", Column::Text(&self.payment_status)),
            ("subscription", Column::OptText(&self.subscription)),
            ("metadata_price", Column::OptText(&self.metadata_price)),
            ("metadata_product", Column::OptText(&self.metadata_product)),
        ]
    }
}

/// Entitlement summaries are one per customer and rare: written a row at a time, which keeps
/// their `text[]` column simple.
struct SummaryRow<'a> {
    event: &'a ProjectedEvent,
    snapshot: &'a Snapshot,
    lookup_keys: &'a [String],
}

/// A row `RETURNING` names: it was inserted or its rank won.
#[derive(sqlx::FromRow)]
struct WonRow {
    account: String,
    id: String,
}

/// The multi-row upsert of `table` from one array per column (`columns`: name and array type,
/// the common ones first), replacing a row only with a strictly greater rank.
fn upsert_sql(table: &str, columns: &[(&str, &str)]) -> String {
    let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
    let unnest: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| format!("${}::{ty}", i + 1))
        .collect();
    let select: Vec<String> = names
        .iter()
        .map(|c| match *c {
            "snapshot" => "snapshot::jsonb".to_owned(),
            other => other.to_owned(),
        })
        .collect();
    let updates: Vec<String> = names
        .iter()
        .filter(|c| !matches!(**c, "account" | "id"))
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect();
    format!(
        "INSERT INTO {table} ({cols})
         SELECT {select} FROM UNNEST({unnest})
             AS u({cols})
         ON CONFLICT (account, id) DO UPDATE SET {updates}
         WHERE (EXCLUDED.rank_created, EXCLUDED.rank_type, EXCLUDED.rank_status, EXCLUDED.rank_event_id)
             > ({table}.rank_created, {table}.rank_type, {table}.rank_status, {table}.rank_event_id)
         RETURNING account, id",
        cols = names.join(", "),
        select = select.join(", "),
        unnest = unnest.join(", "),
        updates = updates.join(", "),
    )
}

/// Upserts one table's rows of a batch; adds those whose row now holds the batch's snapshot.
async fn upsert_table<'a, T: TableRows<'a>>(
    tx: &mut Transaction<'_, Postgres>,
    rows: &T,
    won: &mut Won,
) -> Result<(), sqlx::Error> {
    if rows.common().id.is_empty() {
        return Ok(());
    }
    let columns: Vec<(&str, Column<'_, 'a>)> = COMMON_COLUMNS
        .iter()
        .copied()
        .zip(rows.common().columns())
        .chain(rows.own_columns())
        .collect();
    let described: Vec<(&str, &str)> = columns
        .iter()
        .map(|(name, column)| (*name, column.sql_type()))
        .collect();
    let sql = upsert_sql(T::TABLE, &described);
    let query = columns
        .into_iter()
        .fold(sqlx::query(&sql), |query, (_, column)| column.bind(query));
    collect_won(tx, query, T::KIND, won).await
}

/// Upserts the newest snapshot per object of a batch, in key order (one order of row locks for
/// every writer); returns the objects whose row now holds the batch's snapshot.
pub(super) async fn upsert_objects(
    tx: &mut Transaction<'_, Postgres>,
    batch: &CoalescedBatch<'_>,
) -> Result<Won, sqlx::Error> {
    let mut customers = CustomerRows::default();
    let mut subscriptions = SubscriptionRows::default();
    let mut invoices = InvoiceRows::default();
    let mut sessions = CheckoutSessionRows::default();
    let mut summaries: Vec<SummaryRow<'_>> = Vec::new();
    for (_, event) in batch.sorted_objects() {
        let Some(snapshot) = &event.snapshot else {
            continue;
        };
        match snapshot {
            Snapshot::Customer(s) => customers.push(event, snapshot, s),
            Snapshot::Subscription(s) => subscriptions.push(event, snapshot, s),
            Snapshot::Invoice(s) => invoices.push(event, snapshot, s),
            Snapshot::CheckoutSession(s) => sessions.push(event, snapshot, s),
            Snapshot::EntitlementSummary(s) => summaries.push(SummaryRow {
                event,
                snapshot,
                lookup_keys: &s.lookup_keys,
            }),
        }
    }

    let mut won = Won::new();
    upsert_table(tx, &customers, &mut won).await?;
    upsert_table(tx, &subscriptions, &mut won).await?;
    upsert_table(tx, &invoices, &mut won).await?;
    upsert_table(tx, &sessions, &mut won).await?;
    for row in &summaries {
        let query = sqlx::query(
            "INSERT INTO entitlement_summaries (account, customer, livemode, rank_created, rank_type, rank_status,
                 rank_event_id, event_type, snapshot, lookup_keys)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10)
             ON CONFLICT (account, customer) DO UPDATE SET livemode = EXCLUDED.livemode,
                 rank_created = EXCLUDED.rank_created, rank_type = EXCLUDED.rank_type,
                 rank_status = EXCLUDED.rank_status, rank_event_id = EXCLUDED.rank_event_id,
                 event_type = EXCLUDED.event_type, snapshot = EXCLUDED.snapshot, lookup_keys = EXCLUDED.lookup_keys
             WHERE (EXCLUDED.rank_created, EXCLUDED.rank_type, EXCLUDED.rank_status, EXCLUDED.rank_event_id)
                 > (entitlement_summaries.rank_created, entitlement_summaries.rank_type,
                    entitlement_summaries.rank_status, entitlement_summaries.rank_event_id)
             RETURNING account, customer AS id",
        )
        .bind(&row.event.account)
        .bind(row.snapshot.object_id())
        .bind(row.snapshot.livemode())
        .bind(row.event.rank.created)
        .bind(row.event.rank.type_rank)
        .bind(row.event.rank.status_rank)
        .bind(&row.event.rank.event_id)
        .bind(&row.event.event_type)
        .bind(row.snapshot.raw())
        .bind(row.lookup_keys);
        collect_won(tx, query, ObjectKind::EntitlementSummary, &mut won).await?;
    }
    Ok(won)
}

async fn collect_won(
    tx: &mut Transaction<'_, Postgres>,
    query: Query<'_, Postgres, PgArguments>,
    kind: ObjectKind,
    won: &mut Won,
) -> Result<(), sqlx::Error> {
    for row in query.fetch_all(&mut **tx).await? {
        let row: WonRow = sqlx::FromRow::from_row(&row)?;
        won.insert(ObjectKey {
            account: row.account,
            kind,
            id: row.id,
        });
    }
    Ok(())
}

/// Marks `deleted` customers: sticky, whatever snapshot won (a later `customer.updated` can
/// out-rank the deletion in the batch while the deletion must still stick).
pub(super) async fn mark_deleted(
    tx: &mut Transaction<'_, Postgres>,
    deleted: &[&CustomerKey],
) -> Result<(), sqlx::Error> {
    if deleted.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE customers c SET deleted = true FROM UNNEST($1::text[], $2::text[]) AS k(account, id)
         WHERE c.account = k.account AND c.id = k.id",
    )
    .bind(deleted.iter().map(|k| k.account.as_str()).collect::<Vec<_>>())
    .bind(deleted.iter().map(|k| k.customer.as_str()).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
}
