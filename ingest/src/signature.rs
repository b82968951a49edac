//! Stripe webhook signature verification, exactly Stripe's scheme and in stripe-python's order
//! of checks: parse the header, require a `v1` signature, compare, then check the timestamp.
//!
//! `Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>…][,v0=…]`; the expected signature is
//! `hex(HMAC-SHA256(secret, "<t>.<raw body>"))`. Any `v1` matching any secret passes; other
//! schemes are ignored so that nobody can downgrade to them.

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

/// The only scheme we accept.
pub const SCHEME: &str = "v1";
/// Stripe's default tolerance for the signed timestamp, in seconds.
pub const DEFAULT_TOLERANCE_SECS: u64 = 300;
/// More candidate signatures than this in one header is not something Stripe sends.
pub const MAX_SIGNATURES: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Stripe-Signature header could not be parsed, or it has no `t` or no `v1`")]
    Malformed,
    #[error("no v1 signature matches any configured webhook secret")]
    Mismatch,
    #[error("the signed timestamp is outside the tolerance")]
    TimestampOutOfTolerance,
}

impl SignatureError {
    /// The stable error code of the HTTP response.
    pub fn code(&self) -> &'static str {
        match self {
            SignatureError::Malformed => "malformed_signature",
            SignatureError::Mismatch => "signature_mismatch",
            SignatureError::TimestampOutOfTolerance => "timestamp_out_of_tolerance",
        }
    }
}

/// The parsed header: the first `t` and every `v1` candidate.
#[derive(Debug, PartialEq, Eq)]
pub struct SignatureHeader<'a> {
    pub timestamp: i64,
    pub signatures: Vec<&'a str>,
}

/// Parses the header as stripe-python does: items split on `,`, each item `key=value`; the
/// first `t` is the timestamp; every `v1` is a candidate. Keys are not trimmed, so `" v1=…"`
/// is an unknown scheme, as for Stripe's own libraries.
pub fn parse_header(header: &str) -> Result<SignatureHeader<'_>, SignatureError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for item in header.split(',') {
        let mut parts = item.splitn(2, '=');
        let key = parts.next().unwrap_or_default();
        let value = parts.next();
        match key {
            "t" => {
                // stripe-python reads the value of every `t` item but parses only the first.
                let value = value.ok_or(SignatureError::Malformed)?;
                if timestamp.is_none() {
                    timestamp = Some(parse_timestamp(value)?);
                }
            }
            SCHEME => {
                // stripe-python splits on at most two `=`; the value is what is between the
                // first and the second.
                let value = value.ok_or(SignatureError::Malformed)?;
                let value = value.split('=').next().unwrap_or_default();
                if signatures.len() < MAX_SIGNATURES {
                    signatures.push(value);
                }
            }
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    Ok(SignatureHeader {
        timestamp,
        signatures,
    })
}

fn parse_timestamp(value: &str) -> Result<i64, SignatureError> {
    // The value ends at a second `=`, as in stripe-python.
    let value = value.split('=').next().unwrap_or_default();
    let digits = value.strip_prefix('-').unwrap_or(value);
    if digits.is_empty() || digits.len() > 18 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SignatureError::Malformed);
    }
    value.parse().map_err(|_| SignatureError::Malformed)
}

/// Verifies `payload` against `header` with any of `secrets`, at time `now` (unix seconds).
/// Returns the signed timestamp.
pub fn verify(
    payload: &[u8],
    header: &str,
    secrets: &[SecretString],
    tolerance_secs: u64,
    now: i64,
) -> Result<i64, SignatureError> {
    let parsed = parse_header(header)?;
    let timestamp_text = parsed.timestamp.to_string();
    let matched = secrets.iter().any(|secret| {
        let expected = sign(secret.expose_secret().as_bytes(), &timestamp_text, payload);
        parsed
            .signatures
            .iter()
            .any(|candidate| constant_time_eq(expected.as_bytes(), candidate.as_bytes()))
    });
    if !matched {
        return Err(SignatureError::Mismatch);
    }
    if parsed.timestamp < now.saturating_sub(tolerance_secs as i64) {
        return Err(SignatureError::TimestampOutOfTolerance);
    }
    Ok(parsed.timestamp)
}

/// `hex(HMAC-SHA256(secret, "<t>.<payload>"))`, lower case.
pub fn sign(secret: &[u8], timestamp: &str, payload: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(payload);
    to_hex(&mac.finalize().into_bytes())
}

/// A complete header for `payload`, as Stripe would send it. Used by tests, the sample command
/// of `scripts/run` and the benchmarks.
pub fn header_for(secret: &str, timestamp: i64, payload: &[u8]) -> String {
    format!(
        "t={timestamp},v1={}",
        sign(secret.as_bytes(), &timestamp.to_string(), payload)
    )
}

fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 0xf) as usize] as char);
    }
    out
}

/// Compares in time that depends only on the lengths, which are public (64 hex digits).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test_secret";
    const OTHER: &str = "whsec_other_secret";
    const NOW: i64 = 1_700_000_000;
    const BODY: &[u8] = br#"{"id":"evt_1","type":"customer.created"}"#;

    fn secrets(list: &[&str]) -> Vec<SecretString> {
        list.iter()
            .map(|s| SecretString::from(s.to_string()))
            .collect()
    }

    fn sig(secret: &str, t: i64, body: &[u8]) -> String {
        sign(secret.as_bytes(), &t.to_string(), body)
    }

    fn check(header: &str, body: &[u8], configured: &[&str]) -> Result<i64, SignatureError> {
        verify(
            body,
            header,
            &secrets(configured),
            DEFAULT_TOLERANCE_SECS,
            NOW,
        )
    }

    #[test]
    fn valid_signature_is_accepted() {
        let header = header_for(SECRET, NOW, BODY);
        assert_eq!(check(&header, BODY, &[SECRET]), Ok(NOW));
    }

    #[test]
    fn one_valid_signature_among_several_v1_is_accepted() {
        let header = format!(
            "t={NOW},v1={},v1={},v1={}",
            "0".repeat(64),
            sig(SECRET, NOW, BODY),
            "f".repeat(64)
        );
        assert_eq!(check(&header, BODY, &[SECRET]), Ok(NOW));
    }

    #[test]
    fn signature_by_the_second_configured_secret_is_accepted() {
        let header = header_for(OTHER, NOW, BODY);
        assert_eq!(check(&header, BODY, &[SECRET, OTHER]), Ok(NOW));
    }

    #[test]
    fn only_v0_is_malformed_because_other_schemes_are_ignored() {
        let header = format!("t={NOW},v0={}", sig(SECRET, NOW, BODY));
        assert_eq!(
            check(&header, BODY, &[SECRET]),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn valid_v0_with_wrong_v1_is_a_mismatch() {
        let header = format!(
            "t={NOW},v1={},v0={}",
            "0".repeat(64),
            sig(SECRET, NOW, BODY)
        );
        assert_eq!(
            check(&header, BODY, &[SECRET]),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn missing_timestamp_is_malformed() {
        let header = format!("v1={}", sig(SECRET, NOW, BODY));
        assert_eq!(
            check(&header, BODY, &[SECRET]),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn non_numeric_timestamp_is_malformed() {
        for t in ["12a", "", "abc", "1.5", " 1"] {
            let header = format!("t={t},v1={}", sig(SECRET, NOW, BODY));
            assert_eq!(
                check(&header, BODY, &[SECRET]),
                Err(SignatureError::Malformed),
                "t={t:?}"
            );
        }
    }

    #[test]
    fn stale_timestamp_is_rejected_after_the_signature_matches() {
        let t = NOW - DEFAULT_TOLERANCE_SECS as i64 - 1;
        let header = header_for(SECRET, t, BODY);
        assert_eq!(
            check(&header, BODY, &[SECRET]),
            Err(SignatureError::TimestampOutOfTolerance)
        );
    }

    #[test]
    fn timestamp_exactly_at_the_tolerance_is_accepted() {
        let t = NOW - DEFAULT_TOLERANCE_SECS as i64;
        assert_eq!(check(&header_for(SECRET, t, BODY), BODY, &[SECRET]), Ok(t));
    }

    #[test]
    fn stale_timestamp_with_wrong_signature_is_a_mismatch() {
        let t = NOW - 10_000;
        let header = format!("t={t},v1={}", "0".repeat(64));
        assert_eq!(
            check(&header, BODY, &[SECRET]),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn future_timestamp_is_accepted_like_stripe_libraries_do() {
        let t = NOW + 3600;
        assert_eq!(check(&header_for(SECRET, t, BODY), BODY, &[SECRET]), Ok(t));
    }

    #[test]
    fn tampered_body_is_a_mismatch() {
        let header = header_for(SECRET, NOW, BODY);
        let mut tampered = BODY.to_vec();
        tampered[5] ^= 1;
        assert_eq!(
            check(&header, &tampered, &[SECRET]),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn empty_body_verifies_when_signed() {
        let header = header_for(SECRET, NOW, b"");
        assert_eq!(check(&header, b"", &[SECRET]), Ok(NOW));
        assert_eq!(
            check(&header, b" ", &[SECRET]),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn malformed_headers_are_malformed() {
        for header in [
            "",
            "garbage",
            ",,,",
            "t",
            "t=",
            "v1",
            &format!("t={NOW},v1"),
        ] {
            assert_eq!(
                check(header, BODY, &[SECRET]),
                Err(SignatureError::Malformed),
                "{header:?}"
            );
        }
    }

    #[test]
    fn wrong_secret_is_a_mismatch() {
        let header = header_for(OTHER, NOW, BODY);
        assert_eq!(
            check(&header, BODY, &[SECRET]),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn upper_case_hex_is_a_mismatch_as_in_stripe_libraries() {
        let header = format!("t={NOW},v1={}", sig(SECRET, NOW, BODY).to_uppercase());
        assert_eq!(
            check(&header, BODY, &[SECRET]),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn signature_covers_the_raw_bytes_not_a_reserialisation() {
        let spaced = br#"{ "id" : "evt_1" }"#;
        let header = header_for(SECRET, NOW, spaced);
        assert_eq!(check(&header, spaced, &[SECRET]), Ok(NOW));
        assert_eq!(
            check(&header, br#"{"id":"evt_1"}"#, &[SECRET]),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn error_codes_are_stable() {
        assert_eq!(SignatureError::Malformed.code(), "malformed_signature");
        assert_eq!(SignatureError::Mismatch.code(), "signature_mismatch");
        assert_eq!(
            SignatureError::TimestampOutOfTolerance.code(),
            "timestamp_out_of_tolerance"
        );
    }

    #[test]
    fn known_stripe_signature_matches() {
        // Vector `valid_single_v1` of tests/vectors/stripe_signature_vectors.json: the header
        // stripe-python 16.1.0's `WebhookSignature.generate_signature_header` produced for this
        // secret, timestamp and payload (Python's hmac.new(secret, b"1699999990." + payload,
        // sha256) gives the same hex).
        let secret = "whsec_hDAEYqL62pBum9BIy2ewA5s02KGvdiP4";
        let payload = br#"{"id":"evt_test_webhook","object":"event","type":"invoice.paid"}"#;

        let header = header_for(secret, 1_699_999_990, payload);

        assert_eq!(
            header,
            "t=1699999990,v1=a9d4b14f011d954d43e7ecd317d165dfaa5314d5f5296851612b5dd49b4458f4"
        );
    }
}
