//! The fuzz targets' bodies, one function per target. The libFuzzer binaries in
//! `fuzz_targets/` call them, and `tests/corpus.rs` replays the seed corpus and every
//! regression through them in a plain `cargo test`, so a crash once found stays fixed.
//!
//! Each function must never panic on any input; where a property holds for every input, it is
//! asserted, so that the fuzzer reports a wrong answer as it reports a crash.
#![forbid(unsafe_code)]

use ingest::signature::{self, SignatureError};
use projector::projection::{self, CustomerState, EntitlementPolicy, ObjectKind, Snapshot};
use secrecy::SecretString;
use serde_json::value::RawValue;
use shared::EventEnvelope;

const SECRET: &str = "whsec_fuzz_secret";
const NOW: i64 = 1_700_000_000;
const TOLERANCE_SECS: u64 = 300;

/// `Stripe-Signature` parser and verifier. The input is `<header>\n<payload>`: any header
/// against any payload. Properties: a header signed with the secret for this payload always
/// verifies; a header that verifies carries the expected signature, so no input forges one.
pub fn signature(data: &[u8]) {
    let (header, payload) = match data.iter().position(|b| *b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &b""[..]),
    };
    let secrets = [SecretString::from(SECRET.to_owned())];
    if let Ok(header) = std::str::from_utf8(header) {
        let _ = signature::parse_header(header);
        if let Ok(timestamp) = signature::verify(payload, header, &secrets, TOLERANCE_SECS, NOW) {
            let expected = signature::sign(SECRET.as_bytes(), &timestamp.to_string(), payload);
            assert!(
                header.contains(&expected),
                "{header:?} verified without the signature"
            );
        }
    }
    let good = signature::header_for(SECRET, NOW, payload);
    assert_eq!(
        signature::verify(payload, &good, &secrets, TOLERANCE_SECS, NOW),
        Ok(NOW)
    );
    let stale = signature::header_for(SECRET, NOW - TOLERANCE_SECS as i64 - 1, payload);
    assert_eq!(
        signature::verify(payload, &stale, &secrets, TOLERANCE_SECS, NOW),
        Err(SignatureError::TimestampOutOfTolerance)
    );
}

/// The envelope parser (`shared::envelope`): any bytes; an envelope it accepts has a routable,
/// non-empty partition key and parses the same way twice.
pub fn envelope(data: &[u8]) {
    let Ok(event) = EventEnvelope::parse(data) else {
        return;
    };
    assert!(!event.id.is_empty() && !event.event_type.is_empty());
    assert!(!event.partition_key().is_empty());
    let _ = event.customer();
    let _ = event.object();
    let _ = event.related_object();
    let again = EventEnvelope::parse(data).expect("parses twice");
    assert_eq!(again.partition_key(), event.partition_key());
}

/// Snapshot decoding and `apply`, the projector's pure core: any bytes as `data.object` of
/// every object family, and any bytes as an event through `project` and
/// `CustomerState::apply`. Properties: applying an event twice equals applying it once (Stripe
/// redelivers), and the entitlements of the result can be computed.
pub fn projection(data: &[u8]) {
    if let Ok(object) = serde_json::from_slice::<&RawValue>(data) {
        for kind in [
            ObjectKind::Customer,
            ObjectKind::Subscription,
            ObjectKind::Invoice,
            ObjectKind::CheckoutSession,
            ObjectKind::EntitlementSummary,
        ] {
            let event_type = format!("{}.updated", kind.stripe_object());
            let _ = Snapshot::parse(kind, &event_type, object, false);
        }
    }
    let Ok(envelope) = EventEnvelope::parse(data) else {
        return;
    };
    let Ok(event) = projection::project(&envelope) else {
        return;
    };
    let mut state = CustomerState::new(
        event.account.clone(),
        event.customer.clone().unwrap_or_default(),
    );
    state.apply(&event);
    let once = state.clone();
    state.apply(&event);
    assert_eq!(
        state, once,
        "applying {} twice changed the state",
        event.event_id
    );
    let _ = projection::compute(&state, &EntitlementPolicy::default());
}

/// The Kafka client properties parser (`shared::kafka::properties`, issue 9): any text as a
/// properties file and as a `sasl.jaas.config` value.
#[cfg(feature = "kafka-properties")]
pub fn kafka_properties(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = shared::kafka::properties::parse_properties(text);
    let _ = shared::kafka::properties::parse_jaas(text);
}
