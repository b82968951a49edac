#!/usr/bin/env python3
"""Generate Stripe webhook signature test vectors with Stripe's official Python library.

Pinned library version: stripe==16.1.0 (PyPI).

Why: the Rust verifier in `ingest` must agree with Stripe's reference
implementation. Every `expected` value in the output is computed by the
library itself, never hand-written; the generator only chooses the inputs.

Library API used (both directions go through stripe-python):
  * signing:   stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp)
               -> "t=<timestamp>,v1=<hex hmac-sha256(secret, f'{timestamp}.{payload}')>"
               Headers with several signatures / other schemes are assembled from
               the `v1=<hex>` parts that this function returns.
  * verifying: stripe.WebhookSignature.verify_header(payload, header, secret, tolerance)
               with `time.time` patched to the vector's fixed `now`.

Mapping of stripe.SignatureVerificationError messages to our error codes:
  "Unable to extract timestamp and signatures from header" -> malformed_signature
  "No signatures found with expected scheme"               -> malformed_signature
  "No signatures found matching the expected signature"    -> signature_mismatch
  "Timestamp outside the tolerance zone"                   -> timestamp_out_of_tolerance
  "No Stripe-Signature header value was provided"          -> malformed_signature
      (only raised for the empty header "": stripe-python treats "" like a
      missing header; our spec calls a header without `t` malformed)
Any other message, or any other exception type, aborts the generator.

Several configured secrets: verify_header is called once per secret.
  ok if any secret passes; otherwise parse errors must be identical for every
  secret (asserted); otherwise timestamp_out_of_tolerance if some secret's
  signature matched but the timestamp is stale; otherwise signature_mismatch.

Each vector also carries an `intent` used only inside this script: if the
library's answer differs from what the vector was designed to exercise, the
generator fails loudly instead of silently recording a mislabelled vector.
The `intent` is NOT written to the JSON; `expected` always comes from the library.

Regenerate (from the repository root):
  python3 -m venv /tmp/v && /tmp/v/bin/pip install stripe==16.1.0 \
    && /tmp/v/bin/python ingest/tests/vectors/generate.py

The Stripe fixture body is read from ../shared/stripe/fixtures3.json relative
to the repository root (override with STRIPE_FIXTURES=/path/to/fixtures3.json).
Output: ingest/tests/vectors/stripe_signature_vectors.json (deterministic).
"""

import json
import os
import random
import sys
import time
import unicodedata
from pathlib import Path
from unittest import mock

import stripe

PINNED_STRIPE_VERSION = "16.1.0"

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]
OUT_PATH = HERE / "stripe_signature_vectors.json"
FIXTURES_PATH = Path(
    os.environ.get(
        "STRIPE_FIXTURES", REPO_ROOT.parent / "shared" / "stripe" / "fixtures3.json"
    )
)

OK = "ok"
MALFORMED = "malformed_signature"
MISMATCH = "signature_mismatch"
STALE = "timestamp_out_of_tolerance"

MESSAGE_MAP = [
    ("Unable to extract timestamp and signatures from header", MALFORMED),
    ("No signatures found with expected scheme", MALFORMED),
    ("No signatures found matching the expected signature", MISMATCH),
    ("Timestamp outside the tolerance zone", STALE),
    ("No Stripe-Signature header value was provided", MALFORMED),
]
PARSE_ERRORS = {MALFORMED}

NOW = 1_700_000_000
TOL = 300

rng = random.Random(20240601)
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def make_secret():
    return "whsec_" + "".join(rng.choice(_ALNUM) for _ in range(32))


SECRET_A = make_secret()
SECRET_B = make_secret()
SECRET_C = make_secret()
SECRET_OLD = make_secret()
SECRET_NEW = make_secret()
SECRET_UNRELATED = make_secret()


# ---------------------------------------------------------------- library glue


def header(body, secret, ts):
    """Full header from the library: 't=<ts>,v1=<hex>'."""
    return stripe.WebhookSignature.generate_signature_header(body, secret, timestamp=ts)


def v1(body, secret, ts):
    """Just the hex signature, taken from the library-generated header."""
    h = header(body, secret, ts)
    prefix = "t=%s,v1=" % (ts,)
    assert h.startswith(prefix), h
    sig = h[len(prefix):]
    assert len(sig) == 64 and all(c in "0123456789abcdef" for c in sig), sig
    return sig


def map_error(err):
    msg = str(err)
    for prefix, code in MESSAGE_MAP:
        if msg.startswith(prefix):
            return code
    raise SystemExit("unknown SignatureVerificationError message: %r" % msg)


def verify_one(body, hdr, secret, now, tolerance):
    with mock.patch("time.time", return_value=float(now)):
        assert time.time() == float(now)
        try:
            stripe.WebhookSignature.verify_header(body, hdr, secret, tolerance)
            return OK
        except stripe.SignatureVerificationError as err:
            return map_error(err)
        # any other exception propagates and aborts generation


def library_outcome(body, hdr, secrets, now, tolerance):
    results = [verify_one(body, hdr, s, now, tolerance) for s in secrets]
    if OK in results:
        return OK
    if any(r in PARSE_ERRORS for r in results):
        assert len(set(results)) == 1, ("parse error differs per secret", results)
        return results[0]
    if STALE in results:
        return STALE
    assert set(results) == {MISMATCH}, results
    return MISMATCH


# ---------------------------------------------------------------- vectors

VECTORS = []


def vec(name, secrets, body, hdr, intent, now=NOW, tolerance=TOL):
    assert tolerance > 0, "tolerance 0 is refused by the service; not a vector"
    assert isinstance(body, str) and isinstance(hdr, str)
    # header must be transportable as an HTTP header value
    assert all(0x20 <= ord(c) < 0x7F for c in hdr), (name, hdr)
    assert hdr == hdr.strip(), (name, "leading/trailing whitespace is stripped by HTTP")
    expected = library_outcome(body, hdr, secrets, now, tolerance)
    if expected != intent:
        raise SystemExit(
            "vector %r: library says %r but the vector was designed for %r"
            % (name, expected, intent)
        )
    VECTORS.append(
        {
            "name": name,
            "secrets": list(secrets),
            "now": now,
            "tolerance": tolerance,
            "body": body,
            "header": hdr,
            "expected": expected,
        }
    )


def build_event_body():
    resources = json.loads(FIXTURES_PATH.read_text(encoding="utf-8"))["resources"]
    sub = resources["subscription"]
    event = {
        "id": "evt_1OaB2cLgUG5tbmjcQ3xYzW9k",
        "object": "event",
        "api_version": "2023-10-16",
        "created": NOW - 5,
        "data": {
            "object": sub,
            "previous_attributes": {"cancel_at_period_end": True},
        },
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": "req_9f2ZyXwVuT8sRq", "idempotency_key": None},
        "type": "customer.subscription.updated",
    }
    # Stripe delivers pretty-printed JSON with 2-space indentation.
    return json.dumps(event, indent=2)


def main():
    if stripe.VERSION != PINNED_STRIPE_VERSION:
        raise SystemExit(
            "stripe %s installed; vectors are pinned to stripe==%s"
            % (stripe.VERSION, PINNED_STRIPE_VERSION)
        )

    body = '{"id":"evt_test_webhook","object":"event","type":"invoice.paid"}'
    ts = NOW - 10
    good = v1(body, SECRET_A, ts)
    bad1 = v1(body, SECRET_UNRELATED, ts)
    bad2 = v1(body + " ", SECRET_A, ts)
    bad3 = v1(body, SECRET_A, ts + 1)
    v0sig = good  # a v0 value that *looks* valid: the correct HMAC, wrong scheme

    # --- valid -------------------------------------------------------------
    vec("valid_single_v1", [SECRET_A], body, header(body, SECRET_A, ts), OK)
    vec("valid_v1_first_of_three", [SECRET_A], body,
        f"t={ts},v1={good},v1={bad1},v1={bad2}", OK)
    vec("valid_v1_middle_of_three", [SECRET_A], body,
        f"t={ts},v1={bad1},v1={good},v1={bad2}", OK)
    vec("valid_v1_last_of_three", [SECRET_A], body,
        f"t={ts},v1={bad1},v1={bad2},v1={good}", OK)
    vec("valid_v1_last_of_ten", [SECRET_A], body,
        f"t={ts}," + ",".join(f"v1={v1(body, make_secret(), ts)}" for _ in range(9))
        + f",v1={good}", OK)
    vec("valid_same_v1_repeated", [SECRET_A], body, f"t={ts},v1={good},v1={good}", OK)
    vec("valid_v1_before_t", [SECRET_A], body, f"v1={good},t={ts}", OK)

    # --- several configured secrets / rotation ----------------------------
    vec("first_configured_secret_signs", [SECRET_A, SECRET_B], body,
        header(body, SECRET_A, ts), OK)
    vec("second_configured_secret_signs", [SECRET_A, SECRET_B], body,
        header(body, SECRET_B, ts), OK)
    vec("third_of_three_configured_secrets_signs", [SECRET_A, SECRET_B, SECRET_C], body,
        header(body, SECRET_C, ts), OK)
    vec("no_configured_secret_signs", [SECRET_A, SECRET_B, SECRET_C], body,
        header(body, SECRET_UNRELATED, ts), MISMATCH)
    vec("signed_with_unconfigured_secret", [SECRET_A], body,
        header(body, SECRET_UNRELATED, ts), MISMATCH)
    rot = f"t={ts},v1={v1(body, SECRET_OLD, ts)},v1={v1(body, SECRET_NEW, ts)}"
    vec("rotation_header_both_secrets_configured", [SECRET_OLD, SECRET_NEW], body, rot, OK)
    vec("rotation_header_only_new_configured", [SECRET_NEW], body, rot, OK)
    vec("rotation_header_only_old_configured", [SECRET_OLD], body, rot, OK)
    vec("rotation_header_neither_configured", [SECRET_A, SECRET_B], body, rot, MISMATCH)
    vec("secret_used_without_whsec_prefix_as_key", [SECRET_A], body,
        header(body, SECRET_A[len("whsec_"):], ts), MISMATCH)

    # --- schemes ------------------------------------------------------------
    vec("only_v0_present", [SECRET_A], body, f"t={ts},v0={v0sig}", MALFORMED)
    vec("v0_valid_looking_and_wrong_v1", [SECRET_A], body,
        f"t={ts},v1={bad1},v0={v0sig}", MISMATCH)
    vec("v0_and_valid_v1", [SECRET_A], body, f"t={ts},v0={v0sig},v1={good}", OK)
    vec("unknown_scheme_v2_ignored", [SECRET_A], body,
        f"t={ts},v1={good},v2={bad1}", OK)
    vec("only_unknown_scheme_v2", [SECRET_A], body, f"t={ts},v2={good}", MALFORMED)
    vec("unknown_keys_ignored", [SECRET_A], body,
        f"t={ts},foo=bar,v1={good},baz=1", OK)
    vec("uppercase_scheme_key_V1", [SECRET_A], body, f"t={ts},V1={good}", MALFORMED)

    # --- header structure ---------------------------------------------------
    vec("missing_t", [SECRET_A], body, f"v1={good}", MALFORMED)
    vec("missing_t_with_v0", [SECRET_A], body, f"v1={good},v0={v0sig}", MALFORMED)
    vec("non_numeric_t", [SECRET_A], body, f"t=12a,v1={good}", MALFORMED)
    vec("empty_t_value", [SECRET_A], body, f"t=,v1={good}", MALFORMED)
    vec("decimal_t", [SECRET_A], body, f"t={ts}.0,v1={good}", MALFORMED)
    vec("uppercase_t_key", [SECRET_A], body, f"T={ts},v1={good}", MALFORMED)
    vec("missing_v1_only_t", [SECRET_A], body, f"t={ts}", MALFORMED)
    vec("empty_header", [SECRET_A], body, "", MALFORMED)
    vec("garbage_header", [SECRET_A], body, "garbage", MALFORMED)
    vec("garbage_header_punctuation", [SECRET_A], body,
        "not a stripe signature; foo=bar", MALFORMED)
    vec("spaces_after_commas", [SECRET_A], body, f"t={ts}, v1={good}", MALFORMED)
    vec("spaces_after_commas_several_v1", [SECRET_A], body,
        f"t={ts}, v1={bad1}, v1={good}", MALFORMED)
    vec("spaces_after_commas_first_v1_unspaced", [SECRET_A], body,
        f"t={ts},v1={good}, v1={bad1}", OK)
    vec("space_before_t_key", [SECRET_A], body, f"v1={good}, t={ts}", MALFORMED)
    vec("space_after_v1_value", [SECRET_A], body, f"t={ts},v1={good} ,v0={v0sig}", MISMATCH)
    vec("duplicate_t_first_is_signed", [SECRET_A], body,
        f"t={ts},t={ts + 100},v1={good}", OK)
    vec("duplicate_t_second_is_signed", [SECRET_A], body,
        f"t={ts},t={ts + 100},v1={v1(body, SECRET_A, ts + 100)}", MISMATCH)
    vec("duplicate_t_second_non_numeric", [SECRET_A], body,
        f"t={ts},t=abc,v1={good}", OK)
    vec("duplicate_t_first_non_numeric", [SECRET_A], body,
        f"t=abc,t={ts},v1={good}", MALFORMED)
    vec("trailing_comma", [SECRET_A], body, f"t={ts},v1={good},", OK)
    vec("empty_element_between", [SECRET_A], body, f"t={ts},,v1={good}", OK)
    vec("bare_unknown_element_without_equals", [SECRET_A], body,
        f"t={ts},foo,v1={good}", OK)
    vec("empty_v1_value", [SECRET_A], body, f"t={ts},v1=", MISMATCH)
    vec("bare_v1_without_equals", [SECRET_A], body, f"t={ts},v1", MALFORMED)
    vec("bare_v1_without_equals_plus_valid_v1", [SECRET_A], body,
        f"t={ts},v1={good},v1", MALFORMED)
    vec("bare_t_without_equals_plus_valid_t", [SECRET_A], body,
        f"t={ts},t,v1={good}", MALFORMED)
    vec("v1_value_with_extra_equals_suffix", [SECRET_A], body,
        f"t={ts},v1={good}=junk", OK)
    vec("t_value_with_extra_equals_suffix", [SECRET_A], body,
        f"t={ts}=junk,v1={good}", OK)
    vec("t_leading_zero_signed_over_normalized_t", [SECRET_A], body,
        f"t=0{ts},v1={good}", OK)
    vec("t_leading_zero_signed_over_raw_t", [SECRET_A], body,
        f"t=0{ts},v1={v1(body, SECRET_A, '0' + str(ts))}", MISMATCH)

    # --- signature value ----------------------------------------------------
    vec("uppercase_hex_signature", [SECRET_A], body, f"t={ts},v1={good.upper()}", MISMATCH)
    vec("truncated_signature", [SECRET_A], body, f"t={ts},v1={good[:-1]}", MISMATCH)
    vec("signature_with_extra_hex_digit", [SECRET_A], body, f"t={ts},v1={good}0", MISMATCH)
    vec("signature_for_other_timestamp", [SECRET_A], body, f"t={ts},v1={bad3}", MISMATCH)
    vec("timestamp_altered_after_signing", [SECRET_A], body,
        f"t={ts + 1},v1={good}", MISMATCH)

    # --- timestamps / tolerance ----------------------------------------------
    vec("fresh_timestamp_equals_now", [SECRET_A], body, header(body, SECRET_A, NOW), OK)
    vec("fresh_timestamp_one_second_old", [SECRET_A], body,
        header(body, SECRET_A, NOW - 1), OK)
    vec("timestamp_exactly_at_tolerance_boundary", [SECRET_A], body,
        header(body, SECRET_A, NOW - TOL), OK)
    vec("timestamp_one_second_past_tolerance", [SECRET_A], body,
        header(body, SECRET_A, NOW - TOL - 1), STALE)
    vec("timestamp_very_stale", [SECRET_A], body,
        header(body, SECRET_A, NOW - 86400 * 30), STALE)
    vec("timestamp_zero_epoch", [SECRET_A], body, header(body, SECRET_A, 0), STALE)
    vec("future_timestamp_one_hour", [SECRET_A], body,
        header(body, SECRET_A, NOW + 3600), OK)
    vec("future_timestamp_ten_years", [SECRET_A], body,
        header(body, SECRET_A, NOW + 10 * 365 * 86400), OK)
    vec("stale_timestamp_with_wrong_signature", [SECRET_A], body,
        header(body, SECRET_UNRELATED, NOW - TOL - 1), MISMATCH)
    vec("stale_timestamp_without_v1", [SECRET_A], body,
        f"t={NOW - TOL - 1},v0={v1(body, SECRET_A, NOW - TOL - 1)}", MALFORMED)
    vec("stale_timestamp_second_secret_signs", [SECRET_A, SECRET_B], body,
        header(body, SECRET_B, NOW - TOL - 1), STALE)
    vec("tolerance_1_at_boundary", [SECRET_A], body,
        header(body, SECRET_A, NOW - 1), OK, tolerance=1)
    vec("tolerance_1_past_boundary", [SECRET_A], body,
        header(body, SECRET_A, NOW - 2), STALE, tolerance=1)
    vec("tolerance_one_day_hour_old", [SECRET_A], body,
        header(body, SECRET_A, NOW - 3600), OK, tolerance=86400)
    vec("tolerance_one_day_past_boundary", [SECRET_A], body,
        header(body, SECRET_A, NOW - 86401), STALE, tolerance=86400)
    vec("other_now_fresh", [SECRET_A], body,
        header(body, SECRET_A, 1_735_689_600 - 60), OK, now=1_735_689_600)

    # --- bodies -------------------------------------------------------------
    vec("tampered_body_one_byte", [SECRET_A], body.replace("invoice.paid", "invoice.paie"),
        header(body, SECRET_A, ts), MISMATCH)
    vec("empty_body", [SECRET_A], "", header("", SECRET_A, ts), OK)
    vec("empty_body_signature_of_nonempty_body", [SECRET_A], "", header(body, SECRET_A, ts),
        MISMATCH)
    uni = '{"name":"Zoë Ångström","city":"東京","note":"naïve café 💳€"}'
    vec("unicode_body_multibyte_utf8", [SECRET_A], uni, header(uni, SECRET_A, ts), OK)
    uni_nfd = unicodedata.normalize("NFD", uni)
    assert uni_nfd != uni
    vec("unicode_body_nfd_delivered_nfc_signed", [SECRET_A], uni_nfd,
        header(uni, SECRET_A, ts), MISMATCH)
    ctrl = '{"a":"tab\tnul\u0000bell\u0007del\u007f"}'
    vec("body_with_control_chars_and_nul", [SECRET_A], ctrl, header(ctrl, SECRET_A, ts), OK)
    nl = body + "\n"
    vec("body_trailing_newline_signed_with_it", [SECRET_A], nl, header(nl, SECRET_A, ts), OK)
    vec("body_trailing_newline_added_after_signing", [SECRET_A], nl,
        header(body, SECRET_A, ts), MISMATCH)
    vec("body_trailing_newline_removed_after_signing", [SECRET_A], body,
        header(nl, SECRET_A, ts), MISMATCH)
    lf = '{\n  "id": "evt_lf",\n  "object": "event"\n}'
    crlf = lf.replace("\n", "\r\n")
    vec("body_crlf_signed_with_crlf", [SECRET_A], crlf, header(crlf, SECRET_A, ts), OK)
    vec("body_crlf_delivered_lf_signed", [SECRET_A], crlf, header(lf, SECRET_A, ts), MISMATCH)
    big = "".join(rng.choice(_ALNUM + " {}[]:,.\"") for _ in range(16384))
    vec("large_body_16k", [SECRET_A], big, header(big, SECRET_A, ts), OK)

    # --- real-looking Stripe event (subscription fixture) ----------------
    ev = build_event_body()
    ev_ts = NOW - 5
    vec("event_subscription_updated_three_secrets_second_signs",
        [SECRET_A, SECRET_B, SECRET_C], ev, header(ev, SECRET_B, ev_ts), OK)
    vec("event_subscription_updated_rotation_header",
        [SECRET_NEW, SECRET_UNRELATED], ev,
        f"t={ev_ts},v1={v1(ev, SECRET_OLD, ev_ts)},v1={v1(ev, SECRET_NEW, ev_ts)}", OK)
    tampered = ev.replace('"cancel_at_period_end": false', '"cancel_at_period_end": true', 1)
    assert tampered != ev
    vec("event_subscription_updated_tampered", [SECRET_A, SECRET_B, SECRET_C], tampered,
        header(ev, SECRET_B, ev_ts), MISMATCH)
    compact = json.dumps(json.loads(ev), separators=(",", ":"))
    vec("event_subscription_updated_reserialized_compact", [SECRET_A, SECRET_B], compact,
        header(ev, SECRET_A, ev_ts), MISMATCH)
    vec("event_subscription_updated_stale", [SECRET_A, SECRET_B, SECRET_C], ev,
        header(ev, SECRET_C, NOW - TOL - 60), STALE)
    vec("event_subscription_updated_no_secret_matches", [SECRET_A, SECRET_B], ev,
        header(ev, SECRET_UNRELATED, ev_ts), MISMATCH)

    names = [v["name"] for v in VECTORS]
    assert len(names) == len(set(names)), "duplicate vector names"

    text = json.dumps(VECTORS, indent=2, ensure_ascii=False) + "\n"
    OUT_PATH.write_text(text, encoding="utf-8", newline="\n")

    counts = {}
    for v in VECTORS:
        counts[v["expected"]] = counts.get(v["expected"], 0) + 1
    print("stripe %s: wrote %d vectors to %s" % (stripe.VERSION, len(VECTORS), OUT_PATH),
          file=sys.stderr)
    for k in sorted(counts):
        print("  %-28s %d" % (k, counts[k]), file=sys.stderr)


if __name__ == "__main__":
    main()
