//! End to end: a thin event through the real `ingest` with the Stripe API configured (the real
//! local Stripe API server, `scripts/localstripe`): it is answered 200 and appended, then its
//! related object is fetched and appended as a `backfill` snapshot.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use testkit::localstripe::{LocalStripe, API_KEY};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const WAIT: Duration = Duration::from_secs(30);

fn thin_event(id: &str, related_url: &str, related_id: &str) -> String {
    json!({
        "id": id,
        "object": "v2.core.event",
        "type": "v1.customer.updated",
        "livemode": false,
        "created": OffsetDateTime::now_utc().format(&Rfc3339).unwrap(),
        "related_object": {"id": related_id, "type": "customer", "url": related_url},
        "reason": null,
    })
    .to_string()
}

/// Polls `/metrics` until the fetch counter of `outcome` reaches `at_least`.
async fn wait_for_fetch_count(
    client: &reqwest::Client,
    ingest: &Ingest,
    outcome: &str,
    at_least: u64,
) {
    let line = format!("ingest_related_object_fetches_total{{outcome=\"{outcome}\"}} ");
    let deadline = Instant::now() + WAIT;
    loop {
        let metrics = ingest.metrics(client).await;
        let count = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if count >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{outcome} stayed at {count}:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn thin_event_is_appended_then_its_related_object_is_fetched_and_appended_as_a_snapshot() {
    // Arrange
    let stripe = LocalStripe::connect().await;
    let customer = stripe.customer("pm_card_visa").await;
    let ingest = Ingest::start(&[
        ("STRIPE_API_KEY", API_KEY),
        ("STRIPE_API_BASE", &stripe.base),
    ]);
    let client = reqwest::Client::new();
    let body = thin_event(
        "evt_thin_fetch",
        &format!("/v1/customers/{customer}"),
        &customer,
    );

    // Act
    let response = post_signed(&client, &ingest, &body).await;

    // Assert: answered first, the thin event in the log, then the object's snapshot.
    assert_eq!(response.status(), 200);
    wait_for_fetch_count(&client, &ingest, "fetched", 1).await;
    let records = read_records(&ingest.events_topic, 2, WAIT);
    assert_eq!(records.len(), 2);
    let thin = records
        .iter()
        .find(|r| header_value(r, "stripe-event-id").as_deref() == Some("evt_thin_fetch"))
        .expect("the thin event");
    assert_eq!(payload_str(thin), body);
    let snapshot = records
        .iter()
        .find(|r| header_value(r, "stripe-source").as_deref() == Some("backfill"))
        .expect("the related object's snapshot");
    assert_headers(
        snapshot,
        &[
            ("stripe-event-type", Some("customer.backfilled")),
            ("stripe-signature", None),
        ],
    );
    assert_eq!(key_str(snapshot).as_deref(), Some(customer.as_str()));
    let envelope: Value = serde_json::from_str(&payload_str(snapshot)).unwrap();
    let (status, on_server) = stripe
        .get_status(&format!("/v1/customers/{customer}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        envelope["data"]["object"], on_server,
        "the object as the API has it"
    );
}

#[tokio::test]
async fn a_related_object_that_cannot_be_fetched_is_counted_and_the_thin_event_still_lands() {
    // Arrange: the related object does not exist on the server.
    let stripe = LocalStripe::connect().await;
    let ingest = Ingest::start(&[
        ("STRIPE_API_KEY", API_KEY),
        ("STRIPE_API_BASE", &stripe.base),
    ]);
    let client = reqwest::Client::new();
    let body = thin_event(
        "evt_thin_missing",
        "/v1/customers/cus_missing",
        "cus_missing",
    );

    // Act
    let response = post_signed(&client, &ingest, &body).await;

    // Assert
    assert_eq!(response.status(), 200);
    wait_for_fetch_count(&client, &ingest, "failed", 1).await;
    let records = read_records(&ingest.events_topic, 1, WAIT);
    assert_eq!(records.len(), 1);
    assert_eq!(payload_str(&records[0]), body);
}
