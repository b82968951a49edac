//! End to end: the real `ingest` binary, the real Kafka broker.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

fn subscription(customer: &str) -> Value {
    json!({"id": "sub_1", "object": "subscription", "customer": customer, "status": "active"})
}

#[tokio::test]
async fn valid_event_is_acknowledged_and_lands_byte_for_byte_with_key_and_headers() {
    let ingest = Ingest::start(&[]);
    let client = reqwest::Client::new();
    let body = event(
        "evt_e2e_valid",
        "customer.subscription.updated",
        subscription("cus_42"),
    );
    let header = ingest::signature::header_for(SECRET, now(), body.as_bytes());

    let response = post_with_header(&client, &ingest, &body, Some(&header)).await;

    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer, json!({"received": true, "id": "evt_e2e_valid"}));
    let records = read_records(&ingest.events_topic, 1, WAIT);
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(
        payload_str(record),
        body,
        "the exact request bytes are stored"
    );
    assert_eq!(key_str(record).as_deref(), Some("cus_42"));
    assert_headers(
        record,
        &[
            ("stripe-event-id", Some("evt_e2e_valid")),
            ("stripe-event-type", Some("customer.subscription.updated")),
            ("stripe-livemode", Some("false")),
            ("stripe-api-version", Some("2025-03-31.basil")),
        ],
    );
    assert_eq!(
        header_value(record, "stripe-signature").as_deref(),
        Some(header.as_str())
    );
    assert_headers(
        record,
        &[("stripe-account", None), ("stripe-source", Some("webhook"))],
    );
    let created: i64 = header_value(record, "stripe-created")
        .unwrap()
        .parse()
        .unwrap();
    assert!((created - now()).abs() < 60);
    let received_at: i64 = header_value(record, "received-at")
        .unwrap()
        .parse()
        .unwrap();
    assert!((received_at / 1000 - now()).abs() < 60);
}

#[tokio::test]
async fn connect_event_is_keyed_by_account_and_customer_and_carries_the_account_header() {
    let ingest = Ingest::start(&[]);
    let client = reqwest::Client::new();
    let mut body: Value = serde_json::from_str(&event(
        "evt_connect",
        "invoice.paid",
        json!({
            "id": "in_1", "object": "invoice", "customer": "cus_7"
        }),
    ))
    .unwrap();
    body["account"] = json!("acct_123");
    let body = body.to_string();

    assert_eq!(post_signed(&client, &ingest, &body).await.status(), 200);

    let records = read_records(&ingest.events_topic, 1, WAIT);
    assert_eq!(key_str(&records[0]).as_deref(), Some("acct_123/cus_7"));
    assert_eq!(
        header_value(&records[0], "stripe-account").as_deref(),
        Some("acct_123")
    );
}

#[tokio::test]
async fn redelivered_event_is_acknowledged_again_and_the_log_keeps_both() {
    let ingest = Ingest::start(&[]);
    let client = reqwest::Client::new();
    let body = customer_created("evt_dup", "cus_dup");

    assert_eq!(post_signed(&client, &ingest, &body).await.status(), 200);
    assert_eq!(post_signed(&client, &ingest, &body).await.status(), 200);

    let records = read_records(&ingest.events_topic, 2, WAIT);
    assert_eq!(records.len(), 2);
    assert!(records
        .iter()
        .all(|r| key_str(r).as_deref() == Some("cus_dup")));
}

#[tokio::test]
async fn every_rejection_gets_its_status_and_code_and_lands_nothing() {
    let ingest = Ingest::start(&[("MAX_BODY_BYTES", "2048")]);
    let client = reqwest::Client::new();
    let body = customer_created("evt_rejected", "cus_r");
    let t = now();
    let good = ingest::signature::header_for(SECRET, t, body.as_bytes());
    let stale = ingest::signature::header_for(SECRET, t - 301, body.as_bytes());
    let wrong_secret = ingest::signature::header_for("whsec_not_ours", t, body.as_bytes());
    let only_v0 = good.replace("v1=", "v0=");
    let big = "x".repeat(4096);
    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        (
            "missing header",
            body.clone(),
            None,
            400,
            "missing_signature",
        ),
        (
            "garbage header",
            body.clone(),
            Some("garbage".into()),
            400,
            "malformed_signature",
        ),
        (
            "empty header",
            body.clone(),
            Some(String::new()),
            400,
            "malformed_signature",
        ),
        (
            "no t",
            body.clone(),
            Some(good.split(',').nth(1).unwrap().to_owned()),
            400,
            "malformed_signature",
        ),
        (
            "only v0",
            body.clone(),
            Some(only_v0),
            400,
            "malformed_signature",
        ),
        (
            "wrong secret",
            body.clone(),
            Some(wrong_secret),
            400,
            "signature_mismatch",
        ),
        (
            "tampered body",
            body.replace("cus_r", "cus_x"),
            Some(good.clone()),
            400,
            "signature_mismatch",
        ),
        (
            "stale",
            body.clone(),
            Some(stale),
            400,
            "timestamp_out_of_tolerance",
        ),
        (
            "too large",
            big.clone(),
            Some(ingest::signature::header_for(SECRET, t, big.as_bytes())),
            413,
            "payload_too_large",
        ),
    ];

    for (name, body, header, status, code) in &cases {
        let response = post_with_header(&client, &ingest, body, header.as_deref()).await;
        assert_eq!(response.status().as_u16(), *status, "{name}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"], *code, "{name}");
        assert!(
            answer["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}"
        );
    }

    // A chunked body has no length to refuse by; it is cut off while streaming.
    let chunks: Vec<Result<String, std::io::Error>> =
        vec![Ok("x".repeat(1500)), Ok("y".repeat(1500))];
    let response = client
        .post(ingest.url("/webhooks/stripe"))
        .header("Stripe-Signature", &good)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);

    // Then one accepted event and one dead letter: each topic must hold exactly that one.
    assert_eq!(
        post_with_header(&client, &ingest, &body, Some(&good))
            .await
            .status(),
        200
    );
    let not_an_event = r#"{"hello":"world"}"#;
    assert_eq!(
        post_signed(&client, &ingest, not_an_event).await.status(),
        400
    );
    let events = read_records(&ingest.events_topic, 2, Duration::from_secs(5));
    assert_eq!(events.len(), 1, "only the valid event is in the log");
    assert_eq!(payload_str(&events[0]), body);
    let dead = read_records(&ingest.dlq_topic, 2, Duration::from_secs(5));
    assert_eq!(
        dead.len(),
        1,
        "only the verified non-envelope is in the DLQ"
    );
    assert_eq!(payload_str(&dead[0]), not_an_event);
}

#[tokio::test]
async fn verified_non_envelope_is_refused_and_lands_in_the_dlq_only_with_its_reason() {
    let ingest = Ingest::start(&[]);
    let client = reqwest::Client::new();
    let body = r#"{"id":"evt_x","type":"invoice.paid","created":"yesterday","data":{"object":{}}}"#;
    let header = ingest::signature::header_for(SECRET, now(), body.as_bytes());

    let response = post_with_header(&client, &ingest, body, Some(&header)).await;

    assert_eq!(response.status(), 400);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"], "invalid_payload");
    assert!(answer["message"].as_str().unwrap().contains("created"));
    let dead = read_records(&ingest.dlq_topic, 1, WAIT);
    assert_eq!(dead.len(), 1);
    assert_eq!(payload_str(&dead[0]), body);
    assert_eq!(
        header_value(&dead[0], "dlq-reason").as_deref(),
        Some("invalid_payload")
    );
    assert_eq!(
        header_value(&dead[0], "stripe-signature").as_deref(),
        Some(header.as_str())
    );
    // Sentinel so that "nothing in the log" is observed, not assumed.
    let sentinel = customer_created("evt_sentinel", "cus_s");
    assert_eq!(post_signed(&client, &ingest, &sentinel).await.status(), 200);
    let events = read_records(&ingest.events_topic, 2, Duration::from_secs(5));
    assert_eq!(events.len(), 1);
    assert_eq!(
        header_value(&events[0], "stripe-event-id").as_deref(),
        Some("evt_sentinel")
    );
}

#[tokio::test]
async fn signed_thin_event_is_acknowledged_and_lands_with_its_type_and_never_in_the_dlq() {
    // Arrange: a thin event of a connected account, as an event destination sends it.
    let ingest = Ingest::start(&[]);
    let client = reqwest::Client::new();
    let body = json!({
        "id": "evt_test_65RM8sQb",
        "object": "v2.core.event",
        "type": "v1.billing.meter.error_report_triggered",
        "livemode": false,
        "created": "2026-03-01T10:20:30.456+01:00",
        "context": "acct_1Thin",
        "related_object": {
            "id": "mtr_test_61RM8sQb",
            "type": "billing.meter",
            "url": "/v1/billing/meters/mtr_test_61RM8sQb"
        },
        "reason": {"type": "request", "request": {"id": "req_1", "idempotency_key": "k_1"}}
    })
    .to_string();

    // Act
    let response = post_signed(&client, &ingest, &body).await;

    // Assert: 200, and the exact bytes in the log with the thin type and unix-second created.
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer, json!({"received": true, "id": "evt_test_65RM8sQb"}));
    let records = read_records(&ingest.events_topic, 1, WAIT);
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(payload_str(record), body);
    assert_eq!(
        key_str(record).as_deref(),
        Some("acct_1Thin/evt_test_65RM8sQb")
    );
    assert_headers(
        record,
        &[
            (
                "stripe-event-type",
                Some("v1.billing.meter.error_report_triggered"),
            ),
            // 2026-03-01T09:20:30Z
            ("stripe-created", Some("1772356830")),
            ("stripe-account", Some("acct_1Thin")),
            ("stripe-source", Some("webhook")),
            ("stripe-api-version", None),
        ],
    );
    assert!(header_value(record, "stripe-signature").is_some());
    // The DLQ has one partition and ingest answers only after a dead letter is durable, so
    // if the thin event had gone there it would come before this later sentinel.
    let sentinel = r#"{"id":"evt_sentinel","type":"invoice.paid","created":1}"#;
    assert_eq!(post_signed(&client, &ingest, sentinel).await.status(), 400);
    let dead = read_records(&ingest.dlq_topic, 1, WAIT);
    assert_eq!(dead.len(), 1);
    assert_eq!(payload_str(&dead[0]), sentinel);
    let metrics = ingest.metrics(&client).await;
    assert!(
        metrics.contains("ingest_requests_total{outcome=\"ok\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served() {
    let ingest = Ingest::start(&[]);
    let client = reqwest::Client::new();
    let body = customer_created("evt_metrics", "cus_m");
    assert_eq!(post_signed(&client, &ingest, &body).await.status(), 200);
    assert_eq!(
        post_with_header(&client, &ingest, &body, None)
            .await
            .status(),
        400
    );

    assert_eq!(ingest.status_of(&client, "/healthz").await, 200);
    assert_eq!(ingest.status_of(&client, "/readyz").await, 200);
    let metrics = ingest.metrics(&client).await;

    assert!(
        metrics.contains("ingest_requests_total{outcome=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ingest_requests_total{outcome=\"missing_signature\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ingest_append_latency_seconds_count 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ingest_producer_queue_messages"),
        "{metrics}"
    );
    assert!(!metrics.contains(SECRET));
}

#[tokio::test]
async fn secrets_never_reach_the_logs() {
    let ingest = Ingest::start(&[("RUST_LOG", "debug")]);
    let client = reqwest::Client::new();
    let body = customer_created("evt_log", "cus_l");
    assert_eq!(post_signed(&client, &ingest, &body).await.status(), 200);
    assert_eq!(
        post_with_header(&client, &ingest, &body, Some("t=1,v1=00"))
            .await
            .status(),
        400
    );

    let logs = ingest.logs_until("webhook rejected").join("\n");
    assert!(!logs.contains(SECRET), "a webhook secret reached the logs");
}

#[test]
fn invalid_configuration_stops_start_up_with_one_line_naming_the_variable() {
    for (var, value) in [
        ("SIGNATURE_TOLERANCE_SECS", "0"),
        ("STRIPE_WEBHOOK_SECRETS", "not_a_whsec_secret"),
        ("MAX_BODY_BYTES", "lots"),
        ("LOG_FORMAT", "xml"),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_ingest"))
            .env_clear()
            .env("STRIPE_WEBHOOK_SECRETS", SECRET)
            .env(var, value)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{var}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{var}: {stderr}");
        assert!(lines[0].contains(var), "{var}: {stderr}");
        assert!(
            !stderr.contains("not_a_whsec_secret"),
            "the value of a secret was echoed"
        );
    }
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let mut ingest = Ingest::start(&[]);
    let client = reqwest::Client::new();
    let body = customer_created("evt_term", "cus_t");
    assert_eq!(post_signed(&client, &ingest, &body).await.status(), 200);

    let status = ingest.service.terminate();

    assert_eq!(status.code(), Some(0));
}
