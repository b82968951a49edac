//! `processed_events`, the event-id dedupe table, bounded: ids older than the redelivery
//! window are deleted.
//!
//! Forgetting an id is safe because dedupe is only the first guard. An event applied again
//! after its id was pruned carries the same rank as the snapshot it put in place (or a lower
//! one, when a later event has replaced it), and every upsert requires a strictly greater
//! rank, so re-applying it changes no row, and the recomputed entitlements equal the stored
//! ones, so no change message is written.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction};

/// Records `ids` as applied; returns those that were not already (the batch applies only
/// these). The ids of one batch are distinct.
pub(super) async fn claim_fresh(
    tx: &mut Transaction<'_, Postgres>,
    ids: &[&str],
) -> Result<HashSet<String>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    let fresh: Vec<String> = sqlx::query_scalar(
        "INSERT INTO processed_events (event_id) SELECT * FROM UNNEST($1::text[])
         ON CONFLICT DO NOTHING RETURNING event_id",
    )
    .bind(ids)
    .fetch_all(&mut **tx)
    .await?;
    Ok(fresh.into_iter().collect())
}

/// Deletes up to `limit` ids processed more than `window` ago, oldest first; returns how many.
/// `SKIP LOCKED` lets several instances prune at once without waiting on one another.
pub async fn prune_processed_events(
    pool: &PgPool,
    window: Duration,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let window_secs = i64::try_from(window.as_secs()).unwrap_or(i64::MAX);
    let deleted = sqlx::query(
        "DELETE FROM processed_events WHERE event_id IN (
             SELECT event_id FROM processed_events
             WHERE processed_at < now() - make_interval(secs => $1)
             ORDER BY processed_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind(window_secs as f64)
    .bind(limit)
    .execute(pool)
    .await?;
    Ok(deleted.rows_affected())
}

#[cfg(test)]
mod tests {
    use crate::projection::testing::{self, event, Api, T0};
    use crate::projection::{compute, CustomerState, ProjectedEvent};

    /// One customer's lifecycle, in log order: trial, paid, dunning, canceled.
    fn lifecycle() -> Vec<ProjectedEvent> {
        let pro = [("price_pro_month", "prod_pro", None)];
        let sub = |event_type: &str, status: &str, created: i64| {
            event(
                event_type,
                testing::subscription(Api::Basil, "sub_1", status, &pro),
            )
            .api(Api::Basil)
            .created(created)
            .project()
        };
        vec![
            event("customer.created", testing::customer(testing::CUSTOMER)).project(),
            sub("customer.subscription.created", "trialing", T0),
            sub("customer.subscription.updated", "active", T0 + 10),
            event("invoice.paid", testing::invoice(Api::Basil, "in_1", "paid"))
                .api(Api::Basil)
                .created(T0 + 20)
                .project(),
            sub("customer.subscription.updated", "past_due", T0 + 30),
            sub("customer.subscription.deleted", "canceled", T0 + 40),
        ]
    }

    fn state_after<'a>(events: impl IntoIterator<Item = &'a ProjectedEvent>) -> CustomerState {
        let mut state = CustomerState::new("", testing::CUSTOMER);
        for e in events {
            state.apply(e);
        }
        state
    }

    #[test]
    fn an_old_grant_redelivered_after_its_id_was_pruned_does_not_come_back() {
        let log = lifecycle();
        let policy = testing::policy(testing::POLICY);
        let before = state_after(&log);
        assert!(compute(&before, &policy).features.is_empty());

        let after = state_after(log.iter().chain([&log[2]]));

        assert_eq!(after, before);
        assert_eq!(compute(&after, &policy), compute(&before, &policy));
    }

    proptest::proptest! {
        /// What pruning relies on: once an event id is forgotten, any event of the log may be
        /// applied again, any number of times, in any order, and nothing changes.
        #[test]
        fn re_applying_any_pruned_events_changes_nothing(
            redelivered in proptest::collection::vec(0usize..6, 1..24)
        ) {
            let log = lifecycle();
            let policy = testing::policy(testing::POLICY);
            let before = state_after(&log);

            let after = state_after(log.iter().chain(redelivered.iter().map(|&i| &log[i])));

            proptest::prop_assert_eq!(&after, &before);
            proptest::prop_assert_eq!(compute(&after, &policy), compute(&before, &policy));
        }
    }
}
