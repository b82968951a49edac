//! Strings Postgres cannot store as-is, made storable before a record is projected.
//!
//! Postgres refuses the NUL character in `text` and `jsonb` (SQLSTATE 22P05/22021), and an
//! unpaired UTF-16 surrogate escape in `jsonb`; Stripe relays whatever a merchant put in
//! metadata, so one such string would otherwise make the whole event unusable. Each is
//! replaced by U+FFFD REPLACEMENT CHARACTER, Unicode's own "a character that could not be
//! represented": one character, valid everywhere, and impossible to confuse with text a
//! merchant actually wrote, as an escaped form like `\u0000` spelled out would be. Only the
//! stored snapshot and the columns taken from it change; the log keeps the original bytes,
//! so the information is never lost and a rebuild makes the same replacement.

use std::borrow::Cow;

/// `\ufffd` as a JSON escape: the replacement, ASCII like what it replaces.
const REPLACEMENT: &[u8] = br"\ufffd";

/// The JSON document `json` with every `\u0000` escape and every unpaired surrogate escape
/// replaced by `\ufffd`; borrowed, without copying, when there is none (the usual case).
///
/// Exact without a full parse: in a valid JSON text a backslash only occurs inside a string,
/// where it starts an escape, and a raw NUL is not allowed at all, so the characters Postgres
/// refuses can only arrive as these escapes. Invalid JSON passes through for the envelope
/// parser to reject.
pub fn storable_json(json: &[u8]) -> Cow<'_, [u8]> {
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < json.len() {
        if json[i] != b'\\' {
            i += 1;
            continue;
        }
        if json.get(i + 1) != Some(&b'u') {
            // `\"`, `\\`, `\n` …: skip both bytes, so an escaped backslash is never read as
            // the start of another escape.
            i += 2;
            continue;
        }
        let Some(unit) = code_unit(json, i) else {
            i += 2;
            continue;
        };
        let keep = match unit {
            0 => 0,
            0xD800..=0xDBFF => match code_unit(json, i + 6) {
                Some(0xDC00..=0xDFFF) => 12,
                _ => 0,
            },
            0xDC00..=0xDFFF => 0,
            _ => 6,
        };
        if keep > 0 {
            i += keep;
            continue;
        }
        let buffer = out.get_or_insert_with(|| Vec::with_capacity(json.len()));
        buffer.extend_from_slice(&json[copied..i]);
        buffer.extend_from_slice(REPLACEMENT);
        i += 6;
        copied = i;
    }
    match out {
        None => Cow::Borrowed(json),
        Some(mut buffer) => {
            buffer.extend_from_slice(&json[copied..]);
            Cow::Owned(buffer)
        }
    }
}

/// The code unit of the `\uXXXX` escape starting at `at`, if there is one.
fn code_unit(json: &[u8], at: usize) -> Option<u16> {
    let escape = json.get(at..at + 6)?;
    if escape[0] != b'\\' || escape[1] != b'u' {
        return None;
    }
    let hex = std::str::from_utf8(&escape[2..]).ok()?;
    u16::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storable(json: &str) -> String {
        String::from_utf8(storable_json(json.as_bytes()).into_owned()).unwrap()
    }

    #[test]
    fn a_nul_escape_becomes_the_replacement_character() {
        let json = r#"{"metadata":{"note":"a\u0000b","k\u0000":"\u0000"}}"#;
        let stored = storable(json);
        assert_eq!(
            stored,
            r#"{"metadata":{"note":"a\ufffdb","k\ufffd":"\ufffd"}}"#
        );
        let value: serde_json::Value = serde_json::from_str(&stored).unwrap();
        assert_eq!(value["metadata"]["note"], "a\u{fffd}b");
    }

    #[test]
    fn documents_without_such_strings_are_borrowed_unchanged() {
        let json = r#"{"a":"\"\\u0000 is text here\\","b":"\u00e9\ud83d\ude00\n","c":1}"#;
        assert!(matches!(
            storable_json(json.as_bytes()),
            Cow::Borrowed(b) if b == json.as_bytes()
        ));
    }

    #[test]
    fn an_escaped_backslash_before_u0000_is_text_not_an_escape() {
        let json = r#"["\\u0000","\\\u0000"]"#;
        assert_eq!(storable(json), r#"["\\u0000","\\\ufffd"]"#);
    }

    #[test]
    fn unpaired_surrogates_are_replaced_and_pairs_kept() {
        assert_eq!(
            storable(r#"["\ud83d","\ude00x","\ud83d\ude00","\uD83D\u0041"]"#),
            r#"["\ufffd","\ufffdx","\ud83d\ude00","\ufffd\u0041"]"#
        );
    }

    #[test]
    fn truncated_or_invalid_escapes_pass_through_for_the_parser_to_reject() {
        for json in [r#""\u00"#, r#""\u00zz""#, "\"\\", r#""\"#] {
            assert_eq!(storable(json), json);
        }
    }

    proptest::proptest! {
        #[test]
        fn every_string_round_trips_with_only_unstorable_characters_replaced(
            text in "\\PC*|[\u{0}a\\\\\"]{0,12}"
        ) {
            let json = serde_json::to_string(&text).unwrap();
            let stored: String = serde_json::from_slice(&storable_json(json.as_bytes())).unwrap();
            proptest::prop_assert_eq!(stored, text.replace('\u{0}', "\u{fffd}"));
        }
    }
}
