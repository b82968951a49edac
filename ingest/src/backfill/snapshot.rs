//! A fetched Stripe object as a `*.backfilled` snapshot record of the raw log (SPEC §11): an
//! event envelope around the object's exact bytes. Pure, so every rule is unit-tested.
//!
//! The event id is a hash, not a random id, and that is what makes a backfill idempotent:
//! `evt_bf_` + the first 32 hex digits of SHA-256 over (account, object type, object id, the
//! object's canonical JSON). Re-fetching an unchanged object yields the same id, which the
//! projector already holds and skips as a duplicate, so a second run changes no projection and
//! publishes no change message. A changed object yields a new id, and its `created` (the
//! second it was fetched) ranks it above every event the projector saw before (SPEC §6).
//! The one case the hash cannot tell apart is an object that went A → B → A while the webhook
//! for the return to A was lost: the second A has the first A's id and is skipped. That loss
//! is what `ingest reconcile` repairs, since the event itself is in `/v1/events`.

use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use shared::envelope::{backfilled_event_type, scoped_key, ObjectRef};

/// The prefix of every backfill snapshot's event id, so that a reader of the log sees at once
/// which records did not come from Stripe's event stream.
pub const ID_PREFIX: &str = "evt_bf_";

/// A snapshot record, ready for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    /// `<object type>.backfilled`, e.g. `customer.subscription.backfilled`.
    pub event_type: String,
    /// The second the object was fetched.
    pub created: i64,
    pub livemode: bool,
    pub account: Option<String>,
    /// SPEC §5: the customer, `account/`-prefixed for Connect; the event id without a customer.
    pub key: String,
    /// The event envelope; `data.object` holds the object's bytes exactly as fetched.
    pub body: Vec<u8>,
    /// The object's `object` field, e.g. `subscription`, for the summary.
    pub object_type: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("the object is not JSON: {0}")]
    NotJson(String),
    #[error("the object has no `object` field naming its type")]
    NoType,
    #[error("the object has no `id`")]
    NoId,
}

#[derive(Deserialize)]
struct Livemode {
    #[serde(default)]
    livemode: Option<bool>,
}

/// Wraps `object` (exact bytes) in a snapshot envelope fetched at `fetched_at` (unix seconds).
/// An entitlement summary has no `id` of its own and is identified by its customer.
pub fn snapshot(
    object: &RawValue,
    account: Option<&str>,
    fetched_at: i64,
) -> Result<Snapshot, SnapshotError> {
    let refs: ObjectRef<'_> =
        serde_json::from_str(object.get()).map_err(|e| SnapshotError::NotJson(e.to_string()))?;
    let object_type = refs.object.ok_or(SnapshotError::NoType)?;
    let customer = if object_type == "customer" {
        refs.id
    } else {
        refs.customer.as_ref().map(|c| c.id())
    };
    let object_id = match object_type {
        ENTITLEMENT_SUMMARY => customer,
        _ => refs.id,
    }
    .ok_or(SnapshotError::NoId)?;
    let livemode = serde_json::from_str::<Livemode>(object.get())
        .ok()
        .and_then(|l| l.livemode)
        .unwrap_or(false);
    let canonical = canonical_json(object)?;
    let id = snapshot_id(account, object_type, object_id, &canonical);
    let event_type = backfilled_event_type(object_type);
    let key = scoped_key(account, customer.unwrap_or(&id));
    let body = envelope(&id, &event_type, fetched_at, livemode, account, object);
    Ok(Snapshot {
        id,
        event_type,
        created: fetched_at,
        livemode,
        account: account.map(str::to_owned),
        key,
        body,
        object_type: object_type.to_owned(),
    })
}

/// `evt_bf_` + 32 hex digits of SHA-256 over the length-prefixed fields, so that no two
/// different inputs concatenate to the same bytes.
pub fn snapshot_id(
    account: Option<&str>,
    object_type: &str,
    object_id: &str,
    canonical: &[u8],
) -> String {
    let mut hash = Sha256::new();
    for field in [
        account.unwrap_or("").as_bytes(),
        object_type.as_bytes(),
        object_id.as_bytes(),
        canonical,
    ] {
        hash.update((field.len() as u64).to_be_bytes());
        hash.update(field);
    }
    let digest = hash.finalize();
    let mut id = String::with_capacity(ID_PREFIX.len() + 32);
    id.push_str(ID_PREFIX);
    for byte in &digest[..16] {
        id.push_str(&format!("{byte:02x}"));
    }
    id
}

/// The envelope, written by hand around the raw object so that its bytes stay exactly as
/// fetched (serde would re-serialise them).
fn envelope(
    id: &str,
    event_type: &str,
    created: i64,
    livemode: bool,
    account: Option<&str>,
    object: &RawValue,
) -> Vec<u8> {
    let mut body = String::with_capacity(object.get().len() + 256);
    body.push_str(r#"{"id":"#);
    body.push_str(&json_string(id));
    body.push_str(r#","object":"event","type":"#);
    body.push_str(&json_string(event_type));
    body.push_str(&format!(
        r#","created":{created},"livemode":{livemode},"api_version":null"#
    ));
    if let Some(account) = account {
        body.push_str(r#","account":"#);
        body.push_str(&json_string(account));
    }
    body.push_str(r#","data":{"object":"#);
    body.push_str(object.get());
    body.push_str("}}");
    body.into_bytes()
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// The object as compact JSON with every object's keys sorted: the same content gives the same
/// bytes whatever whitespace or key order the server used.
pub fn canonical_json(object: &RawValue) -> Result<Vec<u8>, SnapshotError> {
    let value: serde_json::Value =
        serde_json::from_str(object.get()).map_err(|e| SnapshotError::NotJson(e.to_string()))?;
    let mut out = Vec::with_capacity(object.get().len());
    write_canonical(&value, &mut out);
    Ok(out)
}

fn write_canonical(value: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(json_string(key).as_bytes());
                out.push(b':');
                write_canonical(value, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

/// Stripe's object type of the active-entitlement summary.
pub const ENTITLEMENT_SUMMARY: &str = "entitlements.active_entitlement_summary";

/// The summary object Stripe sends in `entitlements.active_entitlement_summary.updated`, built
/// from a customer's `GET /v1/entitlements/active_entitlements` (every page), so the projector
/// reads a backfilled summary exactly like the webhook's.
pub fn entitlement_summary(
    customer: &str,
    livemode: bool,
    entitlements: &[Box<RawValue>],
) -> Box<RawValue> {
    let mut body =
        String::from(r#"{"object":"entitlements.active_entitlement_summary","customer":"#);
    body.push_str(&json_string(customer));
    body.push_str(&format!(
        r#","livemode":{livemode},"entitlements":{{"object":"list","data":["#
    ));
    for (i, entitlement) in entitlements.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(entitlement.get());
    }
    body.push_str(r#"],"has_more":false}}"#);
    // Every piece is JSON already, so this cannot fail; the fallback keeps the type total.
    RawValue::from_string(body)
        .unwrap_or_else(|_| RawValue::from_string("{}".to_owned()).expect("`{}` is JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::EventEnvelope;

    fn raw(s: &str) -> Box<RawValue> {
        serde_json::from_str(s).unwrap()
    }

    const SUB: &str = "{\n  \"customer\": \"cus_1\",\n  \"id\": \"sub_1\",\n  \"livemode\": false,\n  \"object\": \"subscription\",\n  \"status\": \"active\"\n}";

    #[test]
    fn a_subscription_becomes_a_customer_subscription_backfilled_envelope_around_its_exact_bytes() {
        let s = snapshot(&raw(SUB), None, 1_767_225_600).unwrap();
        assert_eq!(s.event_type, "customer.subscription.backfilled");
        assert_eq!(s.key, "cus_1");
        assert_eq!(s.created, 1_767_225_600);
        assert!(
            s.id.starts_with("evt_bf_") && s.id.len() == 7 + 32,
            "{}",
            s.id
        );
        let body = String::from_utf8(s.body.clone()).unwrap();
        assert!(body.contains(SUB), "the object bytes are kept exactly");
        let envelope = EventEnvelope::parse(&s.body).unwrap();
        assert_eq!(envelope.id, s.id);
        assert_eq!(envelope.event_type, "customer.subscription.backfilled");
        assert_eq!(envelope.created, 1_767_225_600);
        assert_eq!(envelope.api_version, None);
        assert_eq!(envelope.account, None);
        assert_eq!(envelope.partition_key(), "cus_1");
        let value: serde_json::Value = serde_json::from_slice(&s.body).unwrap();
        assert_eq!(value["object"], "event");
        assert_eq!(value["api_version"], serde_json::Value::Null);
        assert!(value.get("account").is_none());
    }

    #[test]
    fn types_keep_their_object_name_except_subscriptions() {
        let type_of = |object: &str| {
            let raw = raw(&format!(
                r#"{{"id":"x_1","object":"{object}","customer":"cus_1"}}"#
            ));
            snapshot(&raw, None, 1).unwrap().event_type
        };
        assert_eq!(type_of("customer"), "customer.backfilled");
        assert_eq!(type_of("checkout.session"), "checkout.session.backfilled");
        assert_eq!(
            type_of(ENTITLEMENT_SUMMARY),
            "entitlements.active_entitlement_summary.backfilled"
        );
    }

    #[test]
    fn a_customer_is_keyed_by_its_own_id_and_connect_records_carry_the_account() {
        let customer = raw(r#"{"id":"cus_7","object":"customer","livemode":true}"#);
        let s = snapshot(&customer, Some("acct_9"), 5).unwrap();
        assert_eq!(s.key, "acct_9/cus_7");
        assert!(s.livemode);
        let envelope = EventEnvelope::parse(&s.body).unwrap();
        assert_eq!(envelope.account, Some("acct_9"));
        assert!(envelope.livemode);
        assert_eq!(envelope.partition_key(), "acct_9/cus_7");
    }

    #[test]
    fn a_session_without_customer_is_keyed_by_its_event_id() {
        let session = raw(r#"{"id":"cs_1","object":"checkout.session","customer":null}"#);
        let s = snapshot(&session, None, 5).unwrap();
        assert_eq!(s.key, s.id);
    }

    #[test]
    fn the_same_content_refetched_later_has_the_same_id() {
        let first = snapshot(&raw(SUB), None, 100).unwrap();
        let compact = raw(
            r#"{"status":"active","object":"subscription","livemode":false,"id":"sub_1","customer":"cus_1"}"#,
        );
        let again = snapshot(&compact, None, 200).unwrap();
        assert_eq!(
            first.id, again.id,
            "whitespace, key order and fetch time do not matter"
        );
        assert_ne!(first.body, again.body);
    }

    #[test]
    fn changed_content_or_another_account_gives_another_id() {
        let first = snapshot(&raw(SUB), None, 100).unwrap();
        let canceled = raw(&SUB.replace("\"active\"", "\"canceled\""));
        assert_ne!(snapshot(&canceled, None, 100).unwrap().id, first.id);
        assert_ne!(
            snapshot(&raw(SUB), Some("acct_1"), 100).unwrap().id,
            first.id
        );
    }

    #[test]
    fn length_prefixes_keep_field_boundaries() {
        assert_ne!(
            snapshot_id(None, "ab", "c", b"{}"),
            snapshot_id(None, "a", "bc", b"{}")
        );
    }

    #[test]
    fn objects_without_type_or_id_are_refused() {
        assert_eq!(
            snapshot(&raw(r#"{"id":"x"}"#), None, 1),
            Err(SnapshotError::NoType)
        );
        assert_eq!(
            snapshot(&raw(r#"{"object":"customer"}"#), None, 1),
            Err(SnapshotError::NoId)
        );
    }

    #[test]
    fn an_entitlement_summary_is_built_like_stripes_and_keyed_by_customer() {
        let entitlements = vec![raw(
            r#"{"id":"ent_1","object":"entitlements.active_entitlement","feature":"feat_1","livemode":false,"lookup_key":"sso"}"#,
        )];
        let summary = entitlement_summary("cus_5", false, &entitlements);
        let value: serde_json::Value = serde_json::from_str(summary.get()).unwrap();
        assert_eq!(value["object"], ENTITLEMENT_SUMMARY);
        assert_eq!(value["customer"], "cus_5");
        assert_eq!(value["entitlements"]["data"][0]["lookup_key"], "sso");
        assert_eq!(value["entitlements"]["has_more"], false);
        let s = snapshot(&summary, None, 9).unwrap();
        assert_eq!(
            s.event_type,
            "entitlements.active_entitlement_summary.backfilled"
        );
        assert_eq!(s.key, "cus_5");
        let empty = entitlement_summary("cus_5", false, &[]);
        assert_ne!(snapshot(&empty, None, 9).unwrap().id, s.id);
    }

    #[test]
    fn canonical_json_sorts_nested_keys_and_drops_whitespace() {
        let a = canonical_json(&raw(
            r#"{"b": {"d": 1, "c": [2, {"z": null, "y": "é"}]}, "a": true}"#,
        ))
        .unwrap();
        assert_eq!(
            String::from_utf8(a).unwrap(),
            r#"{"a":true,"b":{"c":[2,{"y":"é","z":null}],"d":1}}"#
        );
    }
}
