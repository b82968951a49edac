//! The Stripe event envelope, parsed borrowed and only as deep as routing needs.

use serde::Deserialize;
use serde_json::value::RawValue;

/// Record header names of the raw log `stripe.events` (SPEC §5).
pub mod header {
    pub const EVENT_ID: &str = "stripe-event-id";
    pub const EVENT_TYPE: &str = "stripe-event-type";
    pub const CREATED: &str = "stripe-created";
    pub const LIVEMODE: &str = "stripe-livemode";
    pub const API_VERSION: &str = "stripe-api-version";
    pub const ACCOUNT: &str = "stripe-account";
    pub const SIGNATURE: &str = "stripe-signature";
    pub const RECEIVED_AT: &str = "received-at";
    /// Dead-letter records only: the stable reason code and a human message.
    pub const DLQ_REASON: &str = "dlq-reason";
    pub const DLQ_MESSAGE: &str = "dlq-message";
    /// Dead-letter records only: where the record came from (`topic/partition/offset`).
    pub const DLQ_SOURCE: &str = "dlq-source";
}

/// A Stripe event, borrowing from the request body. `data.object` stays raw so that each
/// consumer parses only the fields it needs.
#[derive(Debug, Clone)]
pub struct EventEnvelope<'a> {
    pub id: &'a str,
    pub event_type: &'a str,
    pub created: i64,
    pub livemode: bool,
    pub api_version: Option<&'a str>,
    /// The connected account for Connect events; `None` for the platform account.
    pub account: Option<&'a str>,
    pub object: &'a RawValue,
    /// The routing fields of `data.object`.
    pub object_ref: ObjectRef<'a>,
}

/// What is wrong with a payload that is not a Stripe event envelope.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("body is not a JSON object: {0}")]
    NotJson(String),
    #[error("field `{0}` is missing or has the wrong type")]
    Field(&'static str),
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(rename = "type", borrow)]
    event_type: Option<&'a RawValue>,
    created: Option<&'a RawValue>,
    #[serde(default)]
    livemode: Option<bool>,
    #[serde(default, borrow)]
    api_version: Option<&'a RawValue>,
    #[serde(default, borrow)]
    account: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<RawData<'a>>,
}

#[derive(Deserialize)]
struct RawData<'a> {
    #[serde(borrow)]
    object: Option<&'a RawValue>,
}

/// The fields of `data.object` that decide the partition key.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ObjectRef<'a> {
    #[serde(default, borrow)]
    pub object: Option<&'a str>,
    #[serde(default, borrow)]
    pub id: Option<&'a str>,
    #[serde(default, borrow)]
    pub customer: Option<CustomerRef<'a>>,
}

/// `customer` is an id, or an expanded customer object.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CustomerRef<'a> {
    Id(&'a str),
    Expanded {
        #[serde(borrow)]
        id: &'a str,
    },
}

impl<'a> CustomerRef<'a> {
    pub fn id(&self) -> &'a str {
        match self {
            CustomerRef::Id(id) | CustomerRef::Expanded { id } => id,
        }
    }
}

fn plain_str<'a>(raw: Option<&'a RawValue>, field: &'static str) -> Result<&'a str, EnvelopeError> {
    // Stripe ids and types never contain escapes, so a borrowed `&str` is enough; anything
    // else is not an envelope we can route.
    let raw = raw.ok_or(EnvelopeError::Field(field))?;
    let s: &'a str = serde_json::from_str(raw.get()).map_err(|_| EnvelopeError::Field(field))?;
    if s.is_empty() {
        return Err(EnvelopeError::Field(field));
    }
    Ok(s)
}

impl<'a> EventEnvelope<'a> {
    /// Parses a body as a Stripe event: a JSON object with a string `id` and `type`, an integer
    /// `created` and an object `data.object`.
    pub fn parse(body: &'a [u8]) -> Result<Self, EnvelopeError> {
        let raw: RawEnvelope<'a> =
            serde_json::from_slice(body).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
        let id = plain_str(raw.id, "id")?;
        let event_type = plain_str(raw.event_type, "type")?;
        let created: i64 = raw
            .created
            .and_then(|c| serde_json::from_str(c.get()).ok())
            .ok_or(EnvelopeError::Field("created"))?;
        let object = raw
            .data
            .and_then(|d| d.object)
            .ok_or(EnvelopeError::Field("data.object"))?;
        if !object.get().starts_with('{') {
            return Err(EnvelopeError::Field("data.object"));
        }
        let object_ref: ObjectRef<'a> = serde_json::from_str(object.get()).unwrap_or_default();
        Ok(EventEnvelope {
            id,
            event_type,
            created,
            livemode: raw.livemode.unwrap_or(false),
            api_version: raw.api_version.and_then(borrowed),
            account: raw.account.and_then(borrowed).filter(|a| !a.is_empty()),
            object,
            object_ref,
        })
    }

    /// The customer this event concerns: `data.object.customer`, or the object's own id when
    /// the object is a customer.
    pub fn customer(&self) -> Option<&'a str> {
        if self.object_ref.object == Some("customer") {
            return self.object_ref.id;
        }
        self.object_ref.customer.as_ref().map(CustomerRef::id)
    }

    /// The partition key of the raw log (SPEC §5): same customer, same partition; Connect
    /// events are prefixed with `account/`; the event id when there is no customer.
    pub fn partition_key(&self) -> String {
        let base = self.customer().unwrap_or(self.id);
        scoped_key(self.account, base)
    }
}

/// `acct_…/cus_…` for Connect accounts, the bare id for the platform.
pub fn scoped_key(account: Option<&str>, id: &str) -> String {
    match account {
        Some(account) => format!("{account}/{id}"),
        None => id.to_owned(),
    }
}

/// A JSON string without escapes, borrowed; `None` for null, other types or escaped strings
/// (Stripe never escapes account ids or API versions).
fn borrowed(raw: &RawValue) -> Option<&str> {
    serde_json::from_str(raw.get()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(object: &str) -> String {
        format!(
            r#"{{"id":"evt_1","object":"event","type":"customer.subscription.updated","created":1700000000,"livemode":true,"api_version":"2025-03-31.basil","data":{{"object":{object}}}}}"#
        )
    }

    #[test]
    fn parses_the_routing_fields_of_an_envelope() {
        let body = event(r#"{"object":"subscription","id":"sub_1","customer":"cus_1"}"#);
        let e = EventEnvelope::parse(body.as_bytes()).unwrap();
        assert_eq!(e.id, "evt_1");
        assert_eq!(e.event_type, "customer.subscription.updated");
        assert_eq!(e.created, 1_700_000_000);
        assert!(e.livemode);
        assert_eq!(e.api_version, Some("2025-03-31.basil"));
        assert_eq!(e.account, None);
        assert_eq!(e.customer(), Some("cus_1"));
    }

    #[test]
    fn key_is_the_customer_field() {
        let body = event(r#"{"object":"invoice","id":"in_1","customer":"cus_9"}"#);
        assert_eq!(
            EventEnvelope::parse(body.as_bytes())
                .unwrap()
                .partition_key(),
            "cus_9"
        );
    }

    #[test]
    fn key_is_the_expanded_customer_id() {
        let body = event(
            r#"{"object":"invoice","id":"in_1","customer":{"id":"cus_7","object":"customer"}}"#,
        );
        assert_eq!(
            EventEnvelope::parse(body.as_bytes())
                .unwrap()
                .partition_key(),
            "cus_7"
        );
    }

    #[test]
    fn key_is_the_object_id_for_a_customer_object() {
        let body = event(r#"{"object":"customer","id":"cus_3","email":null}"#);
        assert_eq!(
            EventEnvelope::parse(body.as_bytes())
                .unwrap()
                .partition_key(),
            "cus_3"
        );
    }

    #[test]
    fn key_has_the_account_prefix_for_connect_events() {
        let body = r#"{"id":"evt_2","type":"invoice.paid","created":1,"account":"acct_42","data":{"object":{"object":"invoice","customer":"cus_1"}}}"#;
        let e = EventEnvelope::parse(body.as_bytes()).unwrap();
        assert_eq!(e.account, Some("acct_42"));
        assert_eq!(e.partition_key(), "acct_42/cus_1");
    }

    #[test]
    fn key_falls_back_to_the_event_id() {
        let body = event(r#"{"object":"product","id":"prod_1"}"#);
        assert_eq!(
            EventEnvelope::parse(body.as_bytes())
                .unwrap()
                .partition_key(),
            "evt_1"
        );
        let null_customer = event(r#"{"object":"checkout.session","id":"cs_1","customer":null}"#);
        assert_eq!(
            EventEnvelope::parse(null_customer.as_bytes())
                .unwrap()
                .partition_key(),
            "evt_1"
        );
    }

    #[test]
    fn connect_event_without_customer_is_keyed_by_account_and_event() {
        let body = r#"{"id":"evt_5","type":"product.created","created":1,"account":"acct_1","data":{"object":{"object":"product","id":"prod_1"}}}"#;
        assert_eq!(
            EventEnvelope::parse(body.as_bytes())
                .unwrap()
                .partition_key(),
            "acct_1/evt_5"
        );
    }

    #[test]
    fn rejects_what_is_not_an_envelope() {
        let cases: &[(&str, EnvelopeError)] = &[
            ("", EnvelopeError::NotJson(String::new())),
            ("[]", EnvelopeError::NotJson(String::new())),
            ("not json", EnvelopeError::NotJson(String::new())),
            (
                r#"{"type":"a","created":1,"data":{"object":{}}}"#,
                EnvelopeError::Field("id"),
            ),
            (
                r#"{"id":"","type":"a","created":1,"data":{"object":{}}}"#,
                EnvelopeError::Field("id"),
            ),
            (
                r#"{"id":5,"type":"a","created":1,"data":{"object":{}}}"#,
                EnvelopeError::Field("id"),
            ),
            (
                r#"{"id":"evt","created":1,"data":{"object":{}}}"#,
                EnvelopeError::Field("type"),
            ),
            (
                r#"{"id":"evt","type":"a","data":{"object":{}}}"#,
                EnvelopeError::Field("created"),
            ),
            (
                r#"{"id":"evt","type":"a","created":"1","data":{"object":{}}}"#,
                EnvelopeError::Field("created"),
            ),
            (
                r#"{"id":"evt","type":"a","created":1.5,"data":{"object":{}}}"#,
                EnvelopeError::Field("created"),
            ),
            (
                r#"{"id":"evt","type":"a","created":1}"#,
                EnvelopeError::Field("data.object"),
            ),
            (
                r#"{"id":"evt","type":"a","created":1,"data":{}}"#,
                EnvelopeError::Field("data.object"),
            ),
            (
                r#"{"id":"evt","type":"a","created":1,"data":{"object":[1]}}"#,
                EnvelopeError::Field("data.object"),
            ),
            (
                r#"{"id":"evt","type":"a","created":1,"data":{"object":null}}"#,
                EnvelopeError::Field("data.object"),
            ),
        ];
        for (body, expected) in cases {
            let err = EventEnvelope::parse(body.as_bytes()).unwrap_err();
            match (expected, &err) {
                (EnvelopeError::NotJson(_), EnvelopeError::NotJson(_)) => {}
                _ => assert_eq!(&err, expected, "body {body}"),
            }
        }
    }

    #[test]
    fn parses_the_fixture_event() {
        let body = r#"{"api_version":"2022-11-15","created":1234567890,"data":{"object":{"customer":null,"id":"pi_1","object":"payment_intent"}},"id":"evt_1MoS6tLgUG5tbmjchDsX6fiT","livemode":false,"object":"event","pending_webhooks":0,"request":{"id":null,"idempotency_key":null},"type":"payment_intent.created"}"#;
        let e = EventEnvelope::parse(body.as_bytes()).unwrap();
        assert_eq!(e.partition_key(), "evt_1MoS6tLgUG5tbmjchDsX6fiT");
        assert!(!e.livemode);
    }
}
