//! A consumed record's bytes → the projected event, or the reason it cannot be used. Pure: no
//! database, so the consumer runs it for the next batch while the current one's transaction is
//! in flight, and `apply_batch` runs it in place for callers that do not (redrive, rebuild).
//! What a Stripe object means is decided in `projection`; this only wraps it per record.

use std::borrow::Cow;
use std::ops::Deref;

use shared::EventEnvelope;

use crate::projection::{project, ProjectedEvent};

use super::text::storable_json;

/// A record as consumed: where it is and its bytes.
#[derive(Debug, Clone)]
pub struct InputRecord {
    pub partition: i32,
    pub offset: i64,
    pub payload: Option<Vec<u8>>,
}

/// What a record decodes to.
#[derive(Debug, Clone)]
pub enum Decoded {
    Event(Box<ProjectedEvent>),
    /// The record becomes a dead letter: it would fail the same way on every retry.
    Rejected(Rejection),
}

/// Why a record cannot be projected (a stable reason code and a message).
#[derive(Debug, Clone)]
pub struct Rejection {
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub reason: &'static str,
    pub message: String,
}

/// A record decoded ahead of its batch.
#[derive(Debug, Clone)]
pub struct DecodedRecord {
    pub record: InputRecord,
    pub decoded: Decoded,
}

impl DecodedRecord {
    pub fn new(record: InputRecord) -> Self {
        let decoded = decode(&record);
        DecodedRecord { record, decoded }
    }
}

/// A decoded record is still the record: its position and bytes (what retries, bisection and
/// dead letters need) read through.
impl Deref for DecodedRecord {
    type Target = InputRecord;
    fn deref(&self) -> &InputRecord {
        &self.record
    }
}

/// What `apply_batch` accepts: records, decoded now or already.
pub trait BatchRecord {
    fn record(&self) -> &InputRecord;
    fn decoded(&self) -> Cow<'_, Decoded>;
}

impl BatchRecord for InputRecord {
    fn record(&self) -> &InputRecord {
        self
    }
    fn decoded(&self) -> Cow<'_, Decoded> {
        Cow::Owned(decode(self))
    }
}

impl BatchRecord for DecodedRecord {
    fn record(&self) -> &InputRecord {
        &self.record
    }
    fn decoded(&self) -> Cow<'_, Decoded> {
        Cow::Borrowed(&self.decoded)
    }
}

/// Parses and projects one record.
pub fn decode(record: &InputRecord) -> Decoded {
    let Some(payload) = record.payload.as_deref() else {
        return Decoded::Rejected(Rejection {
            event_id: None,
            event_type: None,
            reason: "empty_record",
            message: "the record has no value".into(),
        });
    };
    // What Postgres cannot store (a NUL in metadata) is replaced, so the event is projected.
    let payload = storable_json(payload);
    match EventEnvelope::parse(&payload) {
        Err(e) => Decoded::Rejected(Rejection {
            event_id: None,
            event_type: None,
            reason: "invalid_envelope",
            message: e.to_string(),
        }),
        Ok(envelope) => match project(&envelope) {
            Ok(event) => Decoded::Event(Box::new(event)),
            Err(e) => Decoded::Rejected(Rejection {
                event_id: Some(envelope.id.to_owned()),
                event_type: Some(envelope.event_type.to_owned()),
                reason: "unexpected_shape",
                message: e.to_string(),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: Option<&[u8]>) -> InputRecord {
        InputRecord {
            partition: 0,
            offset: 7,
            payload: payload.map(<[u8]>::to_vec),
        }
    }

    fn reason(decoded: Decoded) -> &'static str {
        match decoded {
            Decoded::Rejected(r) => r.reason,
            Decoded::Event(e) => panic!("decoded {}", e.event_id),
        }
    }

    #[test]
    fn records_that_cannot_be_projected_name_their_reason() {
        assert_eq!(reason(decode(&record(None))), "empty_record");
        assert_eq!(
            reason(decode(&record(Some(b"{not json")))),
            "invalid_envelope"
        );
    }

    #[test]
    fn decoding_ahead_gives_what_decoding_in_place_gives() {
        let ahead = DecodedRecord::new(record(None));
        assert_eq!(ahead.offset, 7);
        assert_eq!(
            reason(ahead.decoded().into_owned()),
            reason(ahead.record().decoded().into_owned())
        );
    }
}
