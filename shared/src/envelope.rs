//! The Stripe event envelope, parsed borrowed and only as deep as routing needs.
//!
//! Two kinds of envelope reach the log: snapshot events (`"object":"event"`, the object as it
//! was in `data.object`; webhooks, `GET /v1/events`, and the backfill's own records) and thin
//! events (`"object":"v2.core.event"`, a `related_object` reference and no snapshot). Both are
//! routed alike; only a snapshot can be projected.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::Deserialize;
use serde_json::value::RawValue;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

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
    /// Where the record came from: an [`super::EventSource`] (SPEC §5, §11).
    pub const SOURCE: &str = "stripe-source";
    /// Dead-letter records only: the stable reason code and a human message.
    pub const DLQ_REASON: &str = "dlq-reason";
    pub const DLQ_MESSAGE: &str = "dlq-message";
    /// Dead-letter records only: where the record came from (`topic/partition/offset`).
    pub const DLQ_SOURCE: &str = "dlq-source";
}

/// Where a record of the raw log came from: the value of [`header::SOURCE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EventSource {
    /// Delivered by Stripe to `POST /webhooks/stripe`. Also what an absent header means: the
    /// log was written without the header before backfill and reconcile existed.
    #[default]
    Webhook,
    /// Fetched from a list or retrieve endpoint by `ingest backfill` (or after a thin event)
    /// and wrapped as a `<object type>.backfilled` snapshot event.
    Backfill,
    /// Paged from `GET /v1/events` by `ingest reconcile`: a Stripe event as it would have been
    /// delivered.
    EventsApi,
}

impl EventSource {
    pub const ALL: [EventSource; 3] = [
        EventSource::Webhook,
        EventSource::Backfill,
        EventSource::EventsApi,
    ];

    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            EventSource::Webhook => "webhook",
            EventSource::Backfill => "backfill",
            EventSource::EventsApi => "events-api",
        }
    }

    /// The source of a record given its header value; `None` (no header) is a webhook.
    pub fn from_header(value: Option<&[u8]>) -> Result<EventSource, UnknownEventSource> {
        match value {
            None => Ok(EventSource::Webhook),
            Some(bytes) => std::str::from_utf8(bytes)
                .map_err(|_| UnknownEventSource(String::from_utf8_lossy(bytes).into_owned()))?
                .parse(),
        }
    }
}

impl fmt::Display for EventSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventSource {
    type Err = UnknownEventSource;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        EventSource::ALL
            .into_iter()
            .find(|source| source.as_str() == value)
            .ok_or_else(|| UnknownEventSource(value.to_owned()))
    }
}

/// A `stripe-source` header value this version does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown stripe-source {0:?}: expected webhook, backfill or events-api")]
pub struct UnknownEventSource(pub String);

/// The suffix of the event types the backfill writes (SPEC §11).
pub const BACKFILLED_SUFFIX: &str = ".backfilled";

/// The event type of a backfill snapshot of an object whose `object` field is `object_type`:
/// `<type>.backfilled`, named like Stripe's own events of that object, so that a subscription
/// (`"object":"subscription"`) gives `customer.subscription.backfilled`.
pub fn backfilled_event_type(object_type: &str) -> String {
    match object_type {
        "subscription" => format!("customer.subscription{BACKFILLED_SUFFIX}"),
        other => format!("{other}{BACKFILLED_SUFFIX}"),
    }
}

/// The `object` value of a thin event envelope.
pub const THIN_EVENT_OBJECT: &str = "v2.core.event";

/// A Stripe event, borrowing from the request body. `data.object` stays raw so that each
/// consumer parses only the fields it needs.
#[derive(Debug, Clone)]
pub struct EventEnvelope<'a> {
    pub id: &'a str,
    pub event_type: &'a str,
    /// Unix seconds; a thin event's RFC 3339 `created`, truncated to the second.
    pub created: i64,
    pub livemode: bool,
    pub api_version: Option<&'a str>,
    /// The connected account for Connect events (a thin event's `context`); `None` for the
    /// platform account.
    pub account: Option<&'a str>,
    pub body: EventBody<'a>,
}

/// What an envelope carries about its object.
#[derive(Debug, Clone)]
pub enum EventBody<'a> {
    /// A snapshot event: the object as it was when the event happened.
    Snapshot(ObjectSnapshot<'a>),
    /// A thin event: a reference to the object, which must be fetched to be known.
    Thin(ThinEvent<'a>),
}

/// `data.object` of a snapshot event.
#[derive(Debug, Clone)]
pub struct ObjectSnapshot<'a> {
    pub object: &'a RawValue,
    /// The routing fields of `data.object`.
    pub object_ref: ObjectRef<'a>,
}

/// What a thin event (`"object":"v2.core.event"`) says beyond the common envelope fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinEvent<'a> {
    /// The object the event is about; Stripe omits it for events that concern none.
    pub related_object: Option<RelatedObject<'a>>,
}

/// A thin event's `related_object`: what to fetch, and where.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RelatedObject<'a> {
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    /// The object's type, e.g. `customer`, `billing.meter`.
    #[serde(rename = "type", borrow)]
    pub object_type: Cow<'a, str>,
    /// The API path of the object, e.g. `/v1/billing/meters/mtr_…`.
    #[serde(borrow)]
    pub url: Cow<'a, str>,
}

impl RelatedObject<'_> {
    pub fn into_owned(self) -> RelatedObject<'static> {
        RelatedObject {
            id: Cow::Owned(self.id.into_owned()),
            object_type: Cow::Owned(self.object_type.into_owned()),
            url: Cow::Owned(self.url.into_owned()),
        }
    }
}

/// What is wrong with a payload that is not a Stripe event envelope.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("body is not a JSON object: {0}")]
    NotJson(String),
    #[error("field `{0}` is missing or has the wrong type")]
    Field(&'static str),
    #[error("field `created` of a thin event is not an RFC 3339 date-time ({value:?}): {reason}")]
    Created { value: String, reason: String },
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(default, borrow)]
    object: Option<&'a RawValue>,
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
    /// Thin events only.
    #[serde(default, borrow)]
    related_object: Option<&'a RawValue>,
    /// Thin events only: the account, for Connect.
    #[serde(default, borrow)]
    context: Option<&'a RawValue>,
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
    /// Parses a body as a Stripe event. A snapshot event is a JSON object with a string `id`
    /// and `type`, an integer `created` and an object `data.object`; a thin event
    /// (`"object":"v2.core.event"`) has `created` as an RFC 3339 string and an optional
    /// `related_object` instead of `data`.
    pub fn parse(body: &'a [u8]) -> Result<Self, EnvelopeError> {
        Self::parse_with(body, |_| true)
    }

    /// [`EventEnvelope::parse`], reading the routing fields of a snapshot event's `data.object`
    /// ([`ObjectSnapshot::object_ref`], a second scan of the object) only when
    /// `routing(event_type)` says so; otherwise they are left empty. Accepts and rejects
    /// exactly the bodies `parse` does, with the same errors.
    pub fn parse_with(
        body: &'a [u8],
        routing: impl FnOnce(&str) -> bool,
    ) -> Result<Self, EnvelopeError> {
        let raw: RawEnvelope<'a> =
            serde_json::from_slice(body).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
        let id = plain_str(raw.id, "id")?;
        let event_type = plain_str(raw.event_type, "type")?;
        let is_thin = raw.object.and_then(borrowed) == Some(THIN_EVENT_OBJECT);
        let (created, body, account) = if is_thin {
            (
                thin_created(raw.created)?,
                EventBody::Thin(ThinEvent {
                    related_object: related_object(raw.related_object)?,
                }),
                raw.context,
            )
        } else {
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
            let object_ref: ObjectRef<'a> = if routing(event_type) {
                serde_json::from_str(object.get()).unwrap_or_default()
            } else {
                ObjectRef::default()
            };
            let snapshot = ObjectSnapshot { object, object_ref };
            (created, EventBody::Snapshot(snapshot), raw.account)
        };
        Ok(EventEnvelope {
            id,
            event_type,
            created,
            livemode: raw.livemode.unwrap_or(false),
            api_version: raw.api_version.and_then(borrowed),
            account: account.and_then(borrowed).filter(|a| !a.is_empty()),
            body,
        })
    }

    /// `data.object` of a snapshot event; `None` for a thin event.
    pub fn object(&self) -> Option<&'a RawValue> {
        match &self.body {
            EventBody::Snapshot(snapshot) => Some(snapshot.object),
            EventBody::Thin(_) => None,
        }
    }

    /// The thin event's fields; `None` for a snapshot event.
    pub fn thin(&self) -> Option<&ThinEvent<'a>> {
        match &self.body {
            EventBody::Thin(thin) => Some(thin),
            EventBody::Snapshot(_) => None,
        }
    }

    /// The thin event's `related_object`, when it is a thin event that has one.
    pub fn related_object(&self) -> Option<&RelatedObject<'a>> {
        self.thin().and_then(|thin| thin.related_object.as_ref())
    }

    /// The customer this event concerns: `data.object.customer`, or the object's own id when
    /// the object is a customer (for a thin event: when the related object is a customer).
    pub fn customer(&self) -> Option<&str> {
        match &self.body {
            EventBody::Snapshot(ObjectSnapshot { object_ref, .. }) => {
                if object_ref.object == Some("customer") {
                    return object_ref.id;
                }
                object_ref.customer.as_ref().map(CustomerRef::id)
            }
            EventBody::Thin(thin) => thin
                .related_object
                .as_ref()
                .filter(|related| related.object_type == "customer")
                .map(|related| related.id.as_ref()),
        }
    }

    /// The partition key of the raw log (SPEC §5): same customer, same partition; Connect
    /// events are prefixed with `account/`; the event id when there is no customer.
    pub fn partition_key(&self) -> String {
        let base = self.customer().unwrap_or(self.id);
        scoped_key(self.account, base)
    }
}

/// A thin event's `created`: RFC 3339 with any offset and fraction, as unix seconds. The
/// fraction is dropped, as snapshot events have whole seconds and the rank compares those.
fn thin_created(raw: Option<&RawValue>) -> Result<i64, EnvelopeError> {
    let raw = raw.ok_or(EnvelopeError::Field("created"))?;
    let text: Cow<'_, str> =
        serde_json::from_str(raw.get()).map_err(|_| EnvelopeError::Field("created"))?;
    OffsetDateTime::parse(&text, &Rfc3339)
        .map(OffsetDateTime::unix_timestamp)
        .map_err(|e| EnvelopeError::Created {
            value: text.into_owned(),
            reason: e.to_string(),
        })
}

/// `related_object`: absent or `null` is `None`; anything else must have string `id`, `type`
/// and `url`, because ingest fetches the object by them.
fn related_object(raw: Option<&RawValue>) -> Result<Option<RelatedObject<'_>>, EnvelopeError> {
    match raw {
        None => Ok(None),
        Some(raw) => {
            serde_json::from_str(raw.get()).map_err(|_| EnvelopeError::Field("related_object"))
        }
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
    fn parse_with_skips_only_the_routing_fields_it_is_told_to() {
        let body = event(r#"{"object":"subscription","id":"sub_1","customer":"cus_1"}"#);
        let mut asked = None;
        let lazy = EventEnvelope::parse_with(body.as_bytes(), |event_type| {
            asked = Some(event_type.to_owned());
            false
        })
        .unwrap();
        let eager = EventEnvelope::parse(body.as_bytes()).unwrap();

        assert_eq!(asked.as_deref(), Some("customer.subscription.updated"));
        assert_eq!(lazy.customer(), None);
        assert_eq!(eager.customer(), Some("cus_1"));
        assert_eq!(
            (lazy.id, lazy.event_type, lazy.created),
            (eager.id, eager.event_type, eager.created)
        );
        assert_eq!(
            lazy.object().map(RawValue::get),
            eager.object().map(RawValue::get)
        );
        for bad in [
            r#"{"id":"evt_1"}"#,
            "[]",
            r#"{"id":"","type":"x","created":1,"data":{"object":{}}}"#,
        ] {
            assert_eq!(
                EventEnvelope::parse_with(bad.as_bytes(), |_| false).err(),
                EventEnvelope::parse(bad.as_bytes()).err()
            );
        }
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

    /// A thin event as Stripe's event destinations deliver it (shape of the v2 Event object in
    /// Stripe's API reference and SDKs).
    fn thin(created: &str, extra: &str) -> String {
        format!(
            r#"{{"id":"evt_test_65R9Ijk8dVGkaSBIZT1","object":"v2.core.event","type":"v1.billing.meter.error_report_triggered","livemode":false,"created":{created},"related_object":{{"id":"mtr_test_61R9IkSZ","type":"billing.meter","url":"/v1/billing/meters/mtr_test_61R9IkSZ"}},"reason":{{"type":"request","request":{{"id":"req_1","idempotency_key":"k"}}}}{extra}}}"#
        )
    }

    #[test]
    fn thin_event_parses_as_a_thin_envelope() {
        let body = thin(r#""2024-09-17T06:20:52.246Z""#, "");

        let e = EventEnvelope::parse(body.as_bytes()).unwrap();

        assert_eq!(e.id, "evt_test_65R9Ijk8dVGkaSBIZT1");
        assert_eq!(e.event_type, "v1.billing.meter.error_report_triggered");
        // 2024-09-17T06:20:52Z, the fraction dropped.
        assert_eq!(e.created, 1_726_554_052);
        assert!(!e.livemode);
        assert_eq!(e.api_version, None);
        assert_eq!(e.account, None);
        assert!(e.object().is_none());
        assert_eq!(
            e.related_object(),
            Some(&RelatedObject {
                id: "mtr_test_61R9IkSZ".into(),
                object_type: "billing.meter".into(),
                url: "/v1/billing/meters/mtr_test_61R9IkSZ".into(),
            })
        );
        assert_eq!(e.partition_key(), "evt_test_65R9Ijk8dVGkaSBIZT1");
    }

    #[test]
    fn thin_event_created_honours_the_offset() {
        let cases = [
            (r#""2024-09-17T06:20:52Z""#, 1_726_554_052),
            (r#""2024-09-17T08:20:52+02:00""#, 1_726_554_052),
            (r#""2024-09-17T00:50:52.999999-05:30""#, 1_726_554_052),
            (r#""2024-09-17T06:20:52.000+00:00""#, 1_726_554_052),
        ];
        for (created, unix) in cases {
            let body = thin(created, "");
            let e = EventEnvelope::parse(body.as_bytes()).unwrap();
            assert_eq!(e.created, unix, "{created}");
        }
    }

    #[test]
    fn thin_event_with_a_bad_date_is_rejected_with_the_value() {
        for created in [
            r#""2024-13-01T00:00:00Z""#,
            r#""2024-09-17T06:20:52""#,
            r#""2024-09-17""#,
            r#""yesterday""#,
            r#""""#,
        ] {
            let body = thin(created, "");
            let error = EventEnvelope::parse(body.as_bytes()).unwrap_err();
            let value: String = serde_json::from_str(created).unwrap();
            assert!(
                matches!(&error, EnvelopeError::Created { value: v, .. } if *v == value),
                "{created}: {error:?}"
            );
            let message = error.to_string();
            assert!(message.contains("RFC 3339"), "{message}");
            assert!(message.contains(&format!("{value:?}")), "{message}");
        }
        for created in ["1726554052", "null", r#"{"s":1}"#] {
            let body = thin(created, "");
            assert_eq!(
                EventEnvelope::parse(body.as_bytes()).unwrap_err(),
                EnvelopeError::Field("created"),
                "{created}"
            );
        }
        let missing = r#"{"id":"evt_1","object":"v2.core.event","type":"v1.x"}"#;
        assert_eq!(
            EventEnvelope::parse(missing.as_bytes()).unwrap_err(),
            EnvelopeError::Field("created")
        );
    }

    #[test]
    fn thin_event_of_a_connected_account_is_keyed_by_its_context() {
        let body = thin(
            r#""2024-09-17T06:20:52Z""#,
            r#","context":"acct_1Nv0FGQ9RKHgCVdK""#,
        );

        let e = EventEnvelope::parse(body.as_bytes()).unwrap();

        assert_eq!(e.account, Some("acct_1Nv0FGQ9RKHgCVdK"));
        assert_eq!(
            e.partition_key(),
            "acct_1Nv0FGQ9RKHgCVdK/evt_test_65R9Ijk8dVGkaSBIZT1"
        );
    }

    #[test]
    fn thin_event_about_a_customer_is_keyed_by_the_customer() {
        let body = r#"{"id":"evt_1","object":"v2.core.event","type":"v1.customer.updated","created":"2025-01-01T00:00:00Z","related_object":{"id":"cus_9","type":"customer","url":"\/v1\/customers\/cus_9"}}"#;

        let e = EventEnvelope::parse(body.as_bytes()).unwrap();

        assert_eq!(e.customer(), Some("cus_9"));
        assert_eq!(e.partition_key(), "cus_9");
        // Escaped JSON strings are read too: the fetch needs the exact path.
        assert_eq!(e.related_object().unwrap().url, "/v1/customers/cus_9");
    }

    #[test]
    fn thin_event_without_a_related_object_is_accepted() {
        for related in ["", r#","related_object":null"#] {
            let body = format!(
                r#"{{"id":"evt_1","object":"v2.core.event","type":"v2.core.event_destination.ping","created":"2025-01-01T00:00:00Z","livemode":true{related}}}"#
            );
            let e = EventEnvelope::parse(body.as_bytes()).unwrap();
            assert!(e.thin().is_some());
            assert_eq!(e.related_object(), None);
            assert!(e.livemode);
        }
    }

    #[test]
    fn thin_event_with_a_malformed_related_object_is_rejected() {
        for related in [
            r#""mtr_1""#,
            r#"{"id":"mtr_1","type":"billing.meter"}"#,
            "[]",
        ] {
            let body = format!(
                r#"{{"id":"evt_1","object":"v2.core.event","type":"v1.x","created":"2025-01-01T00:00:00Z","related_object":{related}}}"#
            );
            assert_eq!(
                EventEnvelope::parse(body.as_bytes()).unwrap_err(),
                EnvelopeError::Field("related_object"),
                "{related}"
            );
        }
    }

    #[test]
    fn snapshot_event_has_its_object_and_no_related_object() {
        let body = event(r#"{"object":"subscription","id":"sub_1","customer":"cus_1"}"#);

        let e = EventEnvelope::parse(body.as_bytes()).unwrap();

        assert_eq!(
            e.object().map(RawValue::get),
            Some(r#"{"object":"subscription","id":"sub_1","customer":"cus_1"}"#)
        );
        assert!(e.thin().is_none());
        assert_eq!(e.related_object(), None);
    }

    #[test]
    fn event_source_round_trips_through_its_header_value() {
        for source in EventSource::ALL {
            assert_eq!(source.as_str().parse::<EventSource>(), Ok(source));
            assert_eq!(
                EventSource::from_header(Some(source.as_str().as_bytes())),
                Ok(source)
            );
        }
        assert_eq!(EventSource::from_header(None), Ok(EventSource::Webhook));
        assert_eq!(EventSource::default(), EventSource::Webhook);
        assert_eq!(EventSource::EventsApi.to_string(), "events-api");
        assert_eq!(
            EventSource::from_header(Some(b"cron")),
            Err(UnknownEventSource("cron".into()))
        );
        assert_eq!(
            "Webhook".parse::<EventSource>(),
            Err(UnknownEventSource("Webhook".into()))
        );
    }

    #[test]
    fn backfilled_event_types_are_named_like_stripes_events() {
        assert_eq!(backfilled_event_type("customer"), "customer.backfilled");
        assert_eq!(
            backfilled_event_type("subscription"),
            "customer.subscription.backfilled"
        );
        assert_eq!(
            backfilled_event_type("checkout.session"),
            "checkout.session.backfilled"
        );
        assert_eq!(
            backfilled_event_type("entitlements.active_entitlement_summary"),
            "entitlements.active_entitlement_summary.backfilled"
        );
        assert_eq!(backfilled_event_type("invoice"), "invoice.backfilled");
    }

    #[test]
    fn parses_the_fixture_event() {
        let body = r#"{"api_version":"2022-11-15","created":1234567890,"data":{"object":{"customer":null,"id":"pi_1","object":"payment_intent"}},"id":"evt_1MoS6tLgUG5tbmjchDsX6fiT","livemode":false,"object":"event","pending_webhooks":0,"request":{"id":null,"idempotency_key":null},"type":"payment_intent.created"}"#;
        let e = EventEnvelope::parse(body.as_bytes()).unwrap();
        assert_eq!(e.partition_key(), "evt_1MoS6tLgUG5tbmjchDsX6fiT");
        assert!(!e.livemode);
    }
}
