//! The five projection tables (`customers`, `subscriptions`, `invoices`, `checkout_sessions`,
//! `entitlement_summaries`): one multi-row upsert per table and batch. Each row keeps the rank
//! of the snapshot it holds, and the upsert replaces a row only with a strictly greater rank —
//! in SQL, the same rule as `projection::newer` in memory (migrations/0001_projections.sql).

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};

use crate::projection::{
    CustomerKey, ObjectKey, ObjectKind, ProjectedEvent, Snapshot, SubscriptionSnapshot,
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

    fn is_empty(&self) -> bool {
        self.id.is_empty()
    }

    fn bind<'q>(
        &'q self,
        query: Query<'q, Postgres, PgArguments>,
    ) -> Query<'q, Postgres, PgArguments> {
        query
            .bind(&self.account)
            .bind(&self.id)
            .bind(&self.livemode)
            .bind(&self.rank_created)
            .bind(&self.rank_type)
            .bind(&self.rank_status)
            .bind(&self.rank_event_id)
            .bind(&self.event_type)
            .bind(&self.snapshot)
    }
}

#[derive(Default)]
struct CustomerColumns<'a> {
    common: CommonColumns<'a>,
    email: Vec<Option<&'a str>>,
    name: Vec<Option<&'a str>>,
}

#[derive(Default)]
struct SubscriptionColumns<'a> {
    common: CommonColumns<'a>,
    customer: Vec<&'a str>,
    status: Vec<&'a str>,
    current_period_end: Vec<Option<i64>>,
    cancel_at_period_end: Vec<bool>,
    items: Vec<Json<Vec<StoredItem<'a>>>>,
}

#[derive(Default)]
struct InvoiceColumns<'a> {
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

#[derive(Default)]
struct CheckoutSessionColumns<'a> {
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

/// `$1..$9` are the common columns; kind-specific ones follow from `$10`.
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
const COMMON_UNNEST: &str =
    "$1::text[], $2::text[], $3::bool[], $4::int8[], $5::int2[], $6::int2[], $7::text[], $8::text[], $9::text[]";

fn upsert_sql(table: &str, extra_columns: &[(&str, &str)]) -> String {
    let mut all: Vec<&str> = COMMON_COLUMNS.to_vec();
    all.extend(extra_columns.iter().map(|(name, _)| *name));
    let extra_unnest: Vec<String> = extra_columns
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| format!(", ${}::{ty}", i + 10))
        .collect();
    let select: Vec<String> = all
        .iter()
        .map(|c| match *c {
            "snapshot" => "snapshot::jsonb".to_owned(),
            other => other.to_owned(),
        })
        .collect();
    let updates: Vec<String> = all
        .iter()
        .filter(|c| !matches!(**c, "account" | "id"))
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect();
    format!(
        "INSERT INTO {table} ({cols})
         SELECT {select} FROM UNNEST({COMMON_UNNEST}{extra})
             AS u({cols})
         ON CONFLICT (account, id) DO UPDATE SET {updates}
         WHERE (EXCLUDED.rank_created, EXCLUDED.rank_type, EXCLUDED.rank_status, EXCLUDED.rank_event_id)
             > ({table}.rank_created, {table}.rank_type, {table}.rank_status, {table}.rank_event_id)
         RETURNING account, id",
        cols = all.join(", "),
        select = select.join(", "),
        extra = extra_unnest.concat(),
        updates = updates.join(", "),
    )
}

/// Upserts the newest snapshot per object of a batch; returns the objects whose row now holds
/// the batch's snapshot.
pub(super) async fn upsert_objects(
    tx: &mut Transaction<'_, Postgres>,
    objects: &BTreeMap<ObjectKey, ProjectedEvent>,
) -> Result<Won, sqlx::Error> {
    let mut customers = CustomerColumns::default();
    let mut subscriptions = SubscriptionColumns::default();
    let mut invoices = InvoiceColumns::default();
    let mut sessions = CheckoutSessionColumns::default();
    let mut summaries: Vec<SummaryRow<'_>> = Vec::new();
    for event in objects.values() {
        let Some(snapshot) = &event.snapshot else {
            continue;
        };
        match snapshot {
            Snapshot::Customer(s) => {
                customers.common.push(event, snapshot);
                customers.email.push(s.email.as_deref());
                customers.name.push(s.name.as_deref());
            }
            Snapshot::Subscription(s) => {
                subscriptions.common.push(event, snapshot);
                subscriptions.customer.push(&s.customer);
                subscriptions.status.push(&s.status);
                subscriptions.current_period_end.push(s.current_period_end);
                subscriptions
                    .cancel_at_period_end
                    .push(s.cancel_at_period_end);
                subscriptions.items.push(stored_items(s));
            }
            Snapshot::Invoice(s) => {
                invoices.common.push(event, snapshot);
                invoices.customer.push(s.customer.as_deref());
                invoices.subscription.push(s.subscription.as_deref());
                invoices.status.push(s.status.as_deref());
                invoices.paid.push(s.paid);
                invoices.amount_paid.push(s.amount_paid);
                invoices.attempt_count.push(s.attempt_count);
                invoices.next_payment_attempt.push(s.next_payment_attempt);
                invoices.paid_through.push(s.paid_through);
            }
            Snapshot::CheckoutSession(s) => {
                sessions.common.push(event, snapshot);
                sessions.customer.push(s.customer.as_deref());
                sessions
                    .client_reference_id
                    .push(s.client_reference_id.as_deref());
                sessions.mode.push(&s.mode);
                sessions.status.push(s.status.as_deref());
                sessions.payment_status.push(&s.payment_status);
                sessions.subscription.push(s.subscription.as_deref());
                sessions.metadata_price.push(s.metadata_price.as_deref());
                sessions
                    .metadata_product
                    .push(s.metadata_product.as_deref());
            }
            Snapshot::EntitlementSummary(s) => summaries.push(SummaryRow {
                event,
                snapshot,
                lookup_keys: &s.lookup_keys,
            }),
        }
    }

    let mut won = Won::new();
    if !customers.common.is_empty() {
        let sql = upsert_sql("customers", &[("email", "text[]"), ("name", "text[]")]);
        let c = &customers;
        let query = c
            .common
            .bind(sqlx::query(&sql))
            .bind(&c.email)
            .bind(&c.name);
        collect_won(tx, query, ObjectKind::Customer, &mut won).await?;
    }
    if !subscriptions.common.is_empty() {
        let sql = upsert_sql(
            "subscriptions",
            &[
                ("customer", "text[]"),
                ("status", "text[]"),
                ("current_period_end", "int8[]"),
                ("cancel_at_period_end", "bool[]"),
                ("items", "jsonb[]"),
            ],
        );
        let s = &subscriptions;
        let query = s
            .common
            .bind(sqlx::query(&sql))
            .bind(&s.customer)
            .bind(&s.status)
            .bind(&s.current_period_end)
            .bind(&s.cancel_at_period_end)
            .bind(&s.items);
        collect_won(tx, query, ObjectKind::Subscription, &mut won).await?;
    }
    if !invoices.common.is_empty() {
        let sql = upsert_sql(
            "invoices",
            &[
                ("customer", "text[]"),
                ("subscription", "text[]"),
                ("status", "text[]"),
                ("paid", "bool[]"),
                ("amount_paid", "int8[]"),
                ("attempt_count", "int8[]"),
                ("next_payment_attempt", "int8[]"),
                ("paid_through", "int8[]"),
            ],
        );
        let i = &invoices;
        let query = i
            .common
            .bind(sqlx::query(&sql))
            .bind(&i.customer)
            .bind(&i.subscription)
            .bind(&i.status)
            .bind(&i.paid)
            .bind(&i.amount_paid)
            .bind(&i.attempt_count)
            .bind(&i.next_payment_attempt)
            .bind(&i.paid_through);
        collect_won(tx, query, ObjectKind::Invoice, &mut won).await?;
    }
    if !sessions.common.is_empty() {
        let sql = upsert_sql(
            "checkout_sessions",
            &[
                ("customer", "text[]"),
                ("client_reference_id", "text[]"),
                ("mode", "text[]"),
                ("status", "text[]"),
                ("payment_status", "text[]"),
                ("subscription", "text[]"),
                ("metadata_price", "text[]"),
                ("metadata_product", "text[]"),
            ],
        );
        let s = &sessions;
        let query = s
            .common
            .bind(sqlx::query(&sql))
            .bind(&s.customer)
            .bind(&s.client_reference_id)
            .bind(&s.mode)
            .bind(&s.status)
            .bind(&s.payment_status)
            .bind(&s.subscription)
            .bind(&s.metadata_price)
            .bind(&s.metadata_product);
        collect_won(tx, query, ObjectKind::CheckoutSession, &mut won).await?;
    }
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
