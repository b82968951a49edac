//! The entitlement change message of `entitlements.changes` (SPEC §9): one wire type for every
//! writer (live batches, redrive, the rebuild swap) and every reader (tests, downstream).

use serde::{Deserialize, Serialize};

/// `type` of every change message.
pub const ENTITLEMENTS_CHANGED: &str = "entitlements.changed";

/// `cause.event_type` of the messages a rebuild swap writes: no single event caused them.
pub const REBUILD_CAUSE: &str = "projector.rebuild";

/// One change of a customer's entitlement object: the SPEC §8 object (`object`, flattened, so
/// its fields sit at the top level beside these), its new `version`, the feature difference to
/// the previous version and what caused it. `(customer, version)` identifies a message, so a
/// duplicate delivery is recognisable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeMessage<O = serde_json::Value> {
    /// Always [`ENTITLEMENTS_CHANGED`].
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(flatten)]
    pub object: O,
    /// Strictly increasing per customer.
    pub version: i64,
    /// Features granted now and not by the previous version, sorted.
    pub added: Vec<String>,
    /// Features granted by the previous version and not now, sorted.
    pub removed: Vec<String>,
    pub cause: Cause,
}

/// What made the object change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cause {
    /// The id of the newest event of the batch that changed the customer (live and redrive);
    /// `null` when no single event did (a rebuild swap, `event_type` [`REBUILD_CAUSE`]).
    pub event_id: Option<String>,
    /// That event's type, or [`REBUILD_CAUSE`].
    pub event_type: String,
}

impl Cause {
    /// A change caused by one event.
    pub fn event(event_id: impl Into<String>, event_type: impl Into<String>) -> Self {
        Cause {
            event_id: Some(event_id.into()),
            event_type: event_type.into(),
        }
    }

    /// A change a rebuild found between the state before and after it.
    pub fn rebuild() -> Self {
        Cause {
            event_id: None,
            event_type: REBUILD_CAUSE.to_owned(),
        }
    }
}

impl<O> ChangeMessage<O> {
    pub fn new(
        object: O,
        version: i64,
        added: Vec<String>,
        removed: Vec<String>,
        cause: Cause,
    ) -> Self {
        ChangeMessage {
            kind: ENTITLEMENTS_CHANGED.to_owned(),
            object,
            version,
            added,
            removed,
            cause,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn message_serialises_the_object_fields_beside_its_own() {
        let object = json!({"customer": "cus_1", "account": null, "features": ["pro"]});

        let message = ChangeMessage::new(object, 7, vec!["pro".into()], vec![], Cause::rebuild());

        assert_eq!(
            serde_json::to_value(&message).unwrap(),
            json!({"type": "entitlements.changed", "customer": "cus_1", "account": null,
                   "features": ["pro"], "version": 7, "added": ["pro"], "removed": [],
                   "cause": {"event_id": null, "event_type": "projector.rebuild"}})
        );
    }

    #[test]
    fn message_reads_back_what_it_wrote() {
        let message = ChangeMessage::new(
            json!({"customer": "cus_1", "features": []}),
            2,
            vec![],
            vec!["api".into()],
            Cause::event("evt_1", "customer.subscription.deleted"),
        );

        let text = serde_json::to_string(&message).unwrap();
        let read: ChangeMessage = serde_json::from_str(&text).unwrap();

        assert_eq!(read, message);
        assert_eq!(read.object["customer"], "cus_1");
        assert!(
            read.object.get("version").is_none(),
            "version is the message's own field"
        );
    }
}
