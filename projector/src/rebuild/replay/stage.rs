//! Staging: a chunk of the log decoded, coalesced per object to its max-rank snapshot and
//! COPYed into unlogged staging tables, one per projection table.

use std::collections::{HashMap, HashSet};

use sqlx::postgres::PgPoolCopyExt;
use sqlx::PgPool;

use crate::projection::payload::project_payload;
use crate::projection::{keep_max_rank, ObjectKey, ProjectedEvent, Snapshot};
use crate::store::{self, InputRecord};

use super::copy_binary::CopyBinary;

/// Staging tables: one per projection table, unlogged and without indexes, so that COPY only
/// appends. `snapshot` (and `items`, `lookup_keys`) stay text: only a fold winner is parsed
/// into jsonb.
const STAGING: &[(&str, &str)] = &[
    (
        "customers",
        "account text, id text, livemode bool, email text, name text, deleted bool",
    ),
    (
        "subscriptions",
        "account text, id text, livemode bool, customer text, status text, current_period_end int8, \
         cancel_at_period_end bool, items text",
    ),
    (
        "invoices",
        "account text, id text, livemode bool, customer text, subscription text, status text, paid bool, \
         amount_paid int8, attempt_count int8, next_payment_attempt int8, paid_through int8",
    ),
    (
        "checkout_sessions",
        "account text, id text, livemode bool, customer text, client_reference_id text, mode text, \
         status text, payment_status text, subscription text, metadata_price text, metadata_product text",
    ),
    (
        "entitlement_summaries",
        "account text, customer text, livemode bool, lookup_keys text",
    ),
];

/// The columns every staging table ends with, in COPY order.
const RANK_COLUMNS: &str = "rank_created int8, rank_type int2, rank_status int2, \
     rank_event_id text COLLATE \"C\", event_type text, snapshot text";

/// Creates the staging tables in the fresh schema (the pool's search path).
pub(super) async fn create_tables(fresh: &PgPool) -> Result<(), sqlx::Error> {
    for (table, columns) in STAGING {
        sqlx::query(&format!(
            "CREATE UNLOGGED TABLE stage_{table} ({columns}, {RANK_COLUMNS})"
        ))
        .execute(fresh)
        .await?;
    }
    Ok(())
}

/// One chunk's max-rank snapshots, as binary COPY rows per staging table.
pub(super) struct StagedChunk {
    pub(super) records: u64,
    /// Records without a usable event (live dead-lettered them).
    pub(super) unusable: u64,
    tables: Vec<(&'static str, CopyBinary)>,
}

impl StagedChunk {
    pub(super) fn encode(records: &[InputRecord]) -> StagedChunk {
        let mut unusable = 0;
        let mut chunk = ChunkObjects::default();
        for record in records {
            match record.payload.as_deref().map(project_payload) {
                Some(Ok(event)) => chunk.push(event),
                _ => unusable += 1,
            }
        }
        let mut customers = CopyBinary::default();
        let mut subscriptions = CopyBinary::default();
        let mut invoices = CopyBinary::default();
        let mut sessions = CopyBinary::default();
        let mut summaries = CopyBinary::default();
        for (key, event) in &chunk.objects {
            let Some(snapshot) = &event.snapshot else {
                continue;
            };
            // Every staging row starts with the object's key and mode, ends with its rank.
            let row = |copy: &'_ mut CopyBinary, id: &str, livemode: bool| {
                copy.text(&event.account).text(id).bool(livemode);
            };
            let copy = match snapshot {
                Snapshot::Customer(s) => {
                    let deleted = chunk.deleted.contains(&(key.account.clone(), s.id.clone()));
                    row(&mut customers, &s.id, s.livemode);
                    customers
                        .opt_text(s.email.as_deref())
                        .opt_text(s.name.as_deref())
                        .bool(deleted)
                }
                Snapshot::Subscription(s) => {
                    row(&mut subscriptions, &s.id, s.livemode);
                    subscriptions
                        .text(&s.customer)
                        .text(&s.status)
                        .opt_int(s.current_period_end)
                        .bool(s.cancel_at_period_end)
                        .text(&store::subscription_items_json(s))
                }
                Snapshot::Invoice(s) => {
                    row(&mut invoices, &s.id, s.livemode);
                    invoices
                        .opt_text(s.customer.as_deref())
                        .opt_text(s.subscription.as_deref())
                        .opt_text(s.status.as_deref())
                        .bool(s.paid)
                        .int(s.amount_paid)
                        .int(s.attempt_count)
                        .opt_int(s.next_payment_attempt)
                        .opt_int(s.paid_through)
                }
                Snapshot::CheckoutSession(s) => {
                    row(&mut sessions, &s.id, s.livemode);
                    sessions
                        .opt_text(s.customer.as_deref())
                        .opt_text(s.client_reference_id.as_deref())
                        .text(&s.mode)
                        .opt_text(s.status.as_deref())
                        .text(&s.payment_status)
                        .opt_text(s.subscription.as_deref())
                        .opt_text(s.metadata_price.as_deref())
                        .opt_text(s.metadata_product.as_deref())
                }
                Snapshot::EntitlementSummary(s) => {
                    let lookup_keys =
                        serde_json::to_string(&s.lookup_keys).unwrap_or_else(|_| "[]".into());
                    row(&mut summaries, &s.customer, s.livemode);
                    summaries.text(&lookup_keys)
                }
            };
            copy.int(event.rank.created)
                .small_int(event.rank.type_rank)
                .small_int(event.rank.status_rank)
                .text(&event.rank.event_id)
                .text(&event.event_type)
                .text(snapshot.raw())
                .end_row();
        }
        StagedChunk {
            records: records.len() as u64,
            unusable,
            tables: vec![
                ("customers", customers),
                ("subscriptions", subscriptions),
                ("invoices", invoices),
                ("checkout_sessions", sessions),
                ("entitlement_summaries", summaries),
            ],
        }
    }

    pub(super) async fn copy(self, fresh: PgPool) -> Result<(), sqlx::Error> {
        for (table, rows) in self.tables {
            if rows.rows == 0 {
                continue;
            }
            let mut copy = fresh
                .copy_in_raw(&format!("COPY stage_{table} FROM STDIN (FORMAT binary)"))
                .await?;
            copy.send(rows.finish()).await?;
            copy.finish().await?;
        }
        Ok(())
    }
}

/// A chunk coalesced per object to its max-rank snapshot, under the projection's rule
/// ([`newer`]), as [`crate::projection::coalesce`] does for live batches. Hashed rather than
/// ordered: the staging order does not matter, and the ordered map's key comparisons were the
/// largest cost of the replay in the profile.
#[derive(Default)]
struct ChunkObjects {
    objects: HashMap<ObjectKey, ProjectedEvent>,
    /// (account, customer) of every deleted customer snapshot: a deletion sticks (`deleted` is
    /// an OR over every snapshot of the customer, whichever outranks it).
    deleted: HashSet<(String, String)>,
}

impl ChunkObjects {
    fn push(&mut self, event: ProjectedEvent) {
        let Some(snapshot) = &event.snapshot else {
            return;
        };
        if let Snapshot::Customer(c) = snapshot {
            if c.deleted {
                self.deleted.insert((event.account.clone(), c.id.clone()));
            }
        }
        let key = ObjectKey::of(&event, snapshot);
        keep_max_rank(&mut self.objects, key, event);
    }
}
