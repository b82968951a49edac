//! `outbox` rows as a batch writes them: in the transaction of the projection they announce,
//! published later by the relay (`crate::outbox`) in id order.

use sqlx::types::Json;
use sqlx::{Postgres, Transaction};

/// Rows for the outbox, as column arrays for one multi-row insert.
#[derive(Default)]
pub(crate) struct OutboxRows {
    pub(super) topic: Vec<String>,
    pub(super) key: Vec<Option<String>>,
    pub(super) payload: Vec<Vec<u8>>,
    pub(super) headers: Vec<Json<serde_json::Value>>,
}

/// The multi-row insert, also used inside the entitlements statement (`$1..$4` there too).
pub(super) const INSERT_OUTBOX: &str = "INSERT INTO outbox (topic, key, payload, headers)
     SELECT topic, key, payload, headers
     FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::jsonb[]) AS u(topic, key, payload, headers)";

impl OutboxRows {
    pub(crate) fn push(
        &mut self,
        topic: &str,
        key: Option<String>,
        payload: Vec<u8>,
        headers: serde_json::Value,
    ) {
        self.topic.push(topic.to_owned());
        self.key.push(key);
        self.payload.push(payload);
        self.headers.push(Json(headers));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.topic.is_empty()
    }

    pub(crate) async fn insert(
        &self,
        tx: &mut Transaction<'_, Postgres>,
    ) -> Result<(), sqlx::Error> {
        if self.is_empty() {
            return Ok(());
        }
        sqlx::query(INSERT_OUTBOX)
            .bind(&self.topic)
            .bind(&self.key)
            .bind(&self.payload)
            .bind(&self.headers)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}
