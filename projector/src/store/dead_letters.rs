//! `dead_letters`: records the projector could not use, with a stable reason code, kept for
//! `projector redrive`; a live batch also publishes each one to the DLQ topic via the outbox.

use shared::envelope::header;
use sqlx::{Postgres, Transaction};

use super::outbox::OutboxRows;
use super::{BatchContext, BatchMode, InputRecord};

/// DLQ header of a record Postgres refused: its SQLSTATE.
pub const DLQ_SQLSTATE: &str = "dlq-sqlstate";

/// A record that could not be used, and why (stable reason code + message).
pub(super) struct DeadLetter<'r> {
    pub(super) record: &'r InputRecord,
    pub(super) event_id: Option<String>,
    pub(super) event_type: Option<String>,
    pub(super) reason: &'static str,
    pub(super) message: String,
    /// When Postgres refused the record: its SQLSTATE.
    pub(super) sqlstate: Option<String>,
}

pub(super) async fn write_dead_letters(
    tx: &mut Transaction<'_, Postgres>,
    ctx: &BatchContext<'_>,
    dead: &[DeadLetter<'_>],
) -> Result<(), sqlx::Error> {
    let mut outbox = OutboxRows::default();
    for d in dead {
        let payload = d.record.payload.clone().unwrap_or_default();
        let source = format!(
            "{}/{}/{}",
            ctx.events_topic, d.record.partition, d.record.offset
        );
        tracing::warn!(
            partition = d.record.partition,
            offset = d.record.offset,
            event_id = d.event_id.as_deref().unwrap_or(""),
            reason = d.reason,
            message = %d.message,
            "dead letter"
        );
        sqlx::query(
            "INSERT INTO dead_letters (event_id, event_type, topic, partition, \"offset\", reason, message, payload, sqlstate)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (topic, partition, \"offset\") DO UPDATE SET reason = EXCLUDED.reason,
                 message = EXCLUDED.message, sqlstate = EXCLUDED.sqlstate, redriven_at = NULL",
        )
        .bind(&d.event_id)
        .bind(&d.event_type)
        .bind(ctx.events_topic)
        .bind(d.record.partition)
        .bind(d.record.offset)
        .bind(d.reason)
        .bind(&d.message)
        .bind(&payload)
        .bind(&d.sqlstate)
        .execute(&mut **tx)
        .await?;
        let mut headers = serde_json::json!({
            header::DLQ_REASON: d.reason,
            header::DLQ_MESSAGE: d.message,
            header::DLQ_SOURCE: source,
        });
        if let Some(sqlstate) = &d.sqlstate {
            headers[DLQ_SQLSTATE] = serde_json::json!(sqlstate);
        }
        // A redriven record that fails again is already in the DLQ topic; a rebuild's were
        // published when live processing met them.
        if ctx.mode == BatchMode::Live {
            outbox.push(ctx.dlq_topic, d.event_id.clone(), payload, headers);
        }
    }
    outbox.insert(tx).await
}
