//! The net differences between live's entitlements and the rebuilt ones, set-based: versions
//! carried over, changed customers found in SQL and streamed into the outbox a chunk at a time.
//!
//! The rule is the change model's (`projection::change::same_entitlements`): two objects are
//! the same entitlement state when they are equal but for `updated_at`. In SQL that is
//! `(a - 'updated_at') = (b - 'updated_at')` on jsonb ([`DIFFERENT`]); the rebuild tests hold the two
//! together (a rebuild of what live applied reports no difference).
//!
//! Versions: a rebuilt customer gets live's version and live's stored object when nothing but
//! `updated_at` differs (readers see no change at all), live's version + 1 when it changed (and
//! one message), 1 when live did not know it. A customer live knew and the replay does not is
//! kept with an emptied object ([`change::vanished`]) and announced as a change.

use std::collections::HashSet;

use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Row, Transaction};

use shared::Cause;

use crate::projection::{change, change_message, CustomerKey};

use super::{customer_keys, Difference, RebuildError};

/// Rows fetched from the change cursor at a time: the memory the diff holds.
const DIFF_CHUNK: usize = 1_000;

/// Copies live's entitlements into the fresh schema (`carried`) and reconciles every rebuilt
/// customer against that copy, without the lock. Under the lock only what changed since is
/// reconciled again ([`reconcile_dirty`]).
pub(super) async fn carry_over(fresh: &PgPool, schema: &str) -> Result<(), RebuildError> {
    let mut tx = fresh.begin().await?;
    // One statement: one consistent snapshot of live's table, while live keeps writing.
    sqlx::query("CREATE UNLOGGED TABLE carried AS SELECT * FROM public.entitlements")
        .execute(&mut *tx)
        .await?;
    sqlx::query("ALTER TABLE carried ADD PRIMARY KEY (account, customer)")
        .execute(&mut *tx)
        .await?;
    sqlx::query("CREATE UNLOGGED TABLE dirty (account text, customer text, PRIMARY KEY (account, customer))")
        .execute(&mut *tx)
        .await?;
    reconcile(&mut tx, schema, &format!("{schema}.carried"), false).await?;
    // The differences as of the copy; under the lock only the dirty customers' are redone.
    sqlx::query(&format!(
        "CREATE UNLOGGED TABLE changed AS
         SELECT n.account, n.customer FROM entitlements n
         LEFT JOIN carried o ON o.account = n.account AND o.customer = n.customer
         WHERE o.customer IS NULL OR {DIFFERENT}"
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query("ALTER TABLE changed ADD PRIMARY KEY (account, customer)")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    for table in ["carried", "changed", "entitlements"] {
        sqlx::query(&format!("ANALYZE {table}"))
            .execute(fresh)
            .await?;
    }
    Ok(())
}

/// The change model's rule in SQL, for a rebuilt row `n` and a live row `o`.
const DIFFERENT: &str = "(n.view - 'updated_at') IS DISTINCT FROM (o.view - 'updated_at')";

/// Under the lock: the customers whose live row moved since [`carry_over`] copied it (live
/// batches, a redrive) and those the last stretch touched are reconciled against live itself.
pub(super) async fn reconcile_dirty(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
    touched: &[CustomerKey],
) -> Result<(), RebuildError> {
    sqlx::query(&format!(
        "INSERT INTO {schema}.dirty (account, customer)
         SELECT o.account, o.customer FROM public.entitlements o
         LEFT JOIN {schema}.carried c ON c.account = o.account AND c.customer = o.customer
         WHERE (o.version, o.updated_at) IS DISTINCT FROM (c.version, c.updated_at)
         ON CONFLICT DO NOTHING"
    ))
    .execute(&mut **tx)
    .await?;
    sqlx::query(&format!(
        "INSERT INTO {schema}.dirty (account, customer)
         SELECT * FROM UNNEST($1::text[], $2::text[]) ON CONFLICT DO NOTHING"
    ))
    .bind(
        touched
            .iter()
            .map(|k| k.account.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        touched
            .iter()
            .map(|k| k.customer.as_str())
            .collect::<Vec<_>>(),
    )
    .execute(&mut **tx)
    .await?;
    sqlx::query(&format!("ANALYZE {schema}.dirty"))
        .execute(&mut **tx)
        .await?;
    reconcile(tx, schema, "public.entitlements", true).await?;
    sqlx::query(&format!(
        "DELETE FROM {schema}.changed c USING {schema}.dirty d
         WHERE c.account = d.account AND c.customer = d.customer"
    ))
    .execute(&mut **tx)
    .await?;
    sqlx::query(&format!(
        "INSERT INTO {schema}.changed (account, customer)
         SELECT n.account, n.customer FROM {schema}.dirty d
         JOIN {schema}.entitlements n ON n.account = d.account AND n.customer = d.customer
         LEFT JOIN public.entitlements o ON o.account = n.account AND o.customer = n.customer
         WHERE o.customer IS NULL OR {DIFFERENT}"
    ))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Sets the rebuilt customers' versions (and unchanged customers' objects) from `source`, a
/// copy of live's entitlements or live's table itself; `only_dirty` restricts it to the
/// customers in `dirty`.
async fn reconcile(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
    source: &str,
    only_dirty: bool,
) -> Result<(), RebuildError> {
    // Restricted to `dirty` (small under the lock) by joining it first, so that the lookups go
    // through the primary keys instead of scanning every customer.
    let dirty = |alias: &str| {
        if only_dirty {
            format!(
                "AND ({alias}.account, {alias}.customer) IN (SELECT d.account, d.customer FROM {schema}.dirty d)"
            )
        } else {
            String::new()
        }
    };
    let n = format!("{schema}.entitlements");
    // Known live, unknown to the replay: an emptied object, versioned by the rules below.
    let vanished = sqlx::query(&format!(
        "SELECT o.account, o.customer, o.livemode, extract(epoch FROM o.updated_at)::int8 AS updated_at
         FROM {source} o
         WHERE NOT EXISTS (SELECT 1 FROM {n} n WHERE n.account = o.account AND n.customer = o.customer) {}",
        dirty("o")
    ))
    .fetch_all(&mut **tx)
    .await?;
    if !vanished.is_empty() {
        let mut account = Vec::with_capacity(vanished.len());
        let mut customer = Vec::with_capacity(vanished.len());
        let mut livemode = Vec::with_capacity(vanished.len());
        let mut view = Vec::with_capacity(vanished.len());
        for row in &vanished {
            let a: String = row.try_get("account")?;
            let c: String = row.try_get("customer")?;
            let l: bool = row.try_get("livemode")?;
            let emptied = change::vanished(&a, &c, l, row.try_get("updated_at")?);
            view.push(Json(emptied));
            account.push(a);
            customer.push(c);
            livemode.push(l);
        }
        tracing::warn!(
            customers = vanished.len(),
            "customers known live are unknown to the replay; they keep an emptied object"
        );
        sqlx::query(&format!(
            "INSERT INTO {n} (account, customer, livemode, client_reference_id, features, version, view, updated_at)
             SELECT u.account, u.customer, u.livemode, NULL, '{{}}', 0, u.view, o.updated_at
             FROM UNNEST($1::text[], $2::text[], $3::bool[], $4::jsonb[]) AS u(account, customer, livemode, view)
             JOIN {source} o ON o.account = u.account AND o.customer = u.customer"
        ))
        .bind(&account)
        .bind(&customer)
        .bind(&livemode)
        .bind(&view)
        .execute(&mut **tx)
        .await?;
    }
    let same = "(n.view - 'updated_at') = (o.view - 'updated_at')";
    sqlx::query(&format!(
        "UPDATE {n} n SET version = o.version, view = o.view, updated_at = o.updated_at
         FROM {source} o
         WHERE n.account = o.account AND n.customer = o.customer AND {same} {}",
        dirty("n")
    ))
    .execute(&mut **tx)
    .await?;
    sqlx::query(&format!(
        "UPDATE {n} n SET version = o.version + 1
         FROM {source} o
         WHERE n.account = o.account AND n.customer = o.customer AND NOT {same} {}",
        dirty("n")
    ))
    .execute(&mut **tx)
    .await?;
    sqlx::query(&format!(
        "UPDATE {n} n SET version = 1
         WHERE NOT EXISTS (SELECT 1 FROM {source} o WHERE o.account = n.account AND o.customer = n.customer) {}",
        dirty("n")
    ))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Which changed customers [`write_messages`] writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Every changed customer, against the copy of live's entitlements (before the lock).
    All,
    /// The dirty ones, against live itself (under the lock).
    Dirty,
}

/// Builds the change message of every changed customer in `scope` into `pending_outbox`, a
/// chunk at a time from a cursor, so memory stays bounded however many changed. Returns the
/// first `max_reported` differences.
async fn write_messages(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
    entitlements_topic: &str,
    scope: Scope,
    max_reported: usize,
) -> Result<Vec<Difference>, RebuildError> {
    let (source, dirty) = match scope {
        Scope::All => (format!("{schema}.carried"), String::new()),
        Scope::Dirty => (
            "public.entitlements".to_owned(),
            format!("JOIN {schema}.dirty d ON d.account = c.account AND d.customer = c.customer"),
        ),
    };
    sqlx::query(&format!(
        "DECLARE changes NO SCROLL CURSOR FOR
         SELECT n.account, n.customer, n.version, n.view, n.features,
                o.features AS features_before, o.version AS version_before
         FROM {schema}.changed c {dirty}
         JOIN {schema}.entitlements n ON n.account = c.account AND n.customer = c.customer
         LEFT JOIN {source} o ON o.account = n.account AND o.customer = n.customer
         ORDER BY n.account, n.customer"
    ))
    .execute(&mut **tx)
    .await?;
    let mut reported = Vec::new();
    loop {
        let rows = sqlx::query(&format!("FETCH {DIFF_CHUNK} FROM changes"))
            .fetch_all(&mut **tx)
            .await?;
        if rows.is_empty() {
            break;
        }
        if scope == Scope::Dirty {
            let keys = customer_keys(&rows)?;
            lock_customers(tx, &keys).await?;
        }
        let mut pending = PendingMessages::default();
        for row in &rows {
            let account: String = row.try_get("account")?;
            let customer: String = row.try_get("customer")?;
            let version: i64 = row.try_get("version")?;
            let version_before: Option<i64> = row.try_get("version_before")?;
            let features: Vec<String> = row.try_get("features")?;
            let features_before: Option<Vec<String>> = row.try_get("features_before")?;
            if version != version_before.unwrap_or(0) + 1 {
                return Err(RebuildError::Unreconciled(format!(
                    "{account}/{customer}: version {version} after {version_before:?}"
                )));
            }
            let before = features_before.as_deref().unwrap_or_default();
            let Json(object): Json<serde_json::Value> = row.try_get("view")?;
            let message = change_message(object, version, before, &features, Cause::rebuild());
            pending.key.push(shared::envelope::scoped_key(
                (!account.is_empty()).then_some(account.as_str()),
                &customer,
            ));
            pending.payload.push(serde_json::to_vec(&message)?);
            if reported.len() < max_reported {
                reported.push(Difference {
                    account: (!account.is_empty()).then(|| account.clone()),
                    customer: customer.clone(),
                    features_before,
                    features_after: features,
                    added: message.added.clone(),
                    removed: message.removed.clone(),
                    version,
                });
            }
            pending.account.push(account);
            pending.customer.push(customer);
        }
        sqlx::query(&format!(
            "INSERT INTO {schema}.pending_outbox (account, customer, topic, key, payload)
             SELECT account, customer, $5, key, payload
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[]) AS u(account, customer, key, payload)"
        ))
        .bind(&pending.account)
        .bind(&pending.customer)
        .bind(&pending.key)
        .bind(&pending.payload)
        .bind(entitlements_topic)
        .execute(&mut **tx)
        .await?;
    }
    sqlx::query("CLOSE changes").execute(&mut **tx).await?;
    Ok(reported)
}

#[derive(Default)]
struct PendingMessages {
    account: Vec<String>,
    customer: Vec<String>,
    key: Vec<String>,
    payload: Vec<Vec<u8>>,
}

/// Before the lock: every changed customer's message, built into `pending_outbox`.
pub(super) async fn prepare_messages(
    fresh: &PgPool,
    schema: &str,
    entitlements_topic: &str,
    max_reported: usize,
) -> Result<Vec<Difference>, RebuildError> {
    let mut tx = fresh.begin().await?;
    // The last scaffolding commit before the lock waits for the WAL: it flushes everything the
    // asynchronous commits before it wrote, so that the swap's commit under the lock does not.
    sqlx::query("SET LOCAL synchronous_commit = on")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "CREATE UNLOGGED TABLE pending_outbox (account text NOT NULL, customer text NOT NULL,
             topic text NOT NULL, key text NOT NULL, payload bytea NOT NULL,
             PRIMARY KEY (account, customer))",
    )
    .execute(&mut *tx)
    .await?;
    let reported = write_messages(
        &mut tx,
        schema,
        entitlements_topic,
        Scope::All,
        max_reported,
    )
    .await?;
    tx.commit().await?;
    Ok(reported)
}

/// What [`publish_changes`] found.
pub(super) struct Changes {
    pub changed: u64,
    pub reported: Vec<Difference>,
}

/// Under the lock, after [`reconcile_dirty`]: the dirty customers' messages rebuilt against
/// live, then every pending message moved into the outbox in one statement (unless
/// `dry_run`), in customer order.
pub(super) async fn publish_changes(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
    entitlements_topic: &str,
    dry_run: bool,
    prepared: Vec<Difference>,
    max_reported: usize,
) -> Result<Changes, RebuildError> {
    sqlx::query(&format!(
        "DELETE FROM {schema}.pending_outbox p USING {schema}.dirty d
         WHERE p.account = d.account AND p.customer = d.customer"
    ))
    .execute(&mut **tx)
    .await?;
    let dirty: Vec<(String, String)> =
        sqlx::query_as(&format!("SELECT account, customer FROM {schema}.dirty"))
            .fetch_all(&mut **tx)
            .await?;
    let dirty: HashSet<(String, String)> = dirty.into_iter().collect();
    let redone = write_messages(tx, schema, entitlements_topic, Scope::Dirty, max_reported).await?;
    let mut reported: Vec<Difference> = prepared
        .into_iter()
        .filter(|d| !dirty.contains(&(d.account.clone().unwrap_or_default(), d.customer.clone())))
        .chain(redone)
        .collect();
    reported.sort_by(|a, b| (&a.account, &a.customer).cmp(&(&b.account, &b.customer)));
    reported.truncate(max_reported);
    let changed: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {schema}.pending_outbox"))
        .fetch_one(&mut **tx)
        .await?;
    if !dry_run {
        sqlx::query(&format!(
            "INSERT INTO public.outbox (topic, key, payload)
             SELECT topic, key, payload FROM {schema}.pending_outbox ORDER BY account, customer"
        ))
        .execute(&mut **tx)
        .await?;
    }
    Ok(Changes {
        changed: changed as u64,
        reported,
    })
}

/// SPEC §12: every transaction that recomputes a customer holds that customer's lock. Live
/// batches and redrives are already kept out by the exclusive rebuild lock; the customer locks
/// state the rule where it is decided, and are taken only for the few customers that moved
/// since the replay (a mass change would overflow Postgres's lock table, and needs none).
async fn lock_customers(
    tx: &mut Transaction<'_, Postgres>,
    customers: &[CustomerKey],
) -> Result<(), RebuildError> {
    crate::store::lock_customers(tx, customers).await?;
    Ok(())
}
