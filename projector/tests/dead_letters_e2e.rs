//! Poison events through the real `ingest` and the projector's application (in process;
//! `redrive` is the real binary): what the projector cannot use goes to the `dead_letters` table
//! and the DLQ topic with its exact bytes while the partition keeps flowing; `projector redrive`
//! re-applies dead letters; unknown types and thin events are counted and ignored, not
//! dead-lettered.

mod common;

use rdkafka::message::Message;
use serde_json::json;
use sqlx::Row;

use common::events::*;
use common::*;

/// An active subscription to pro, for a month from `created`.
fn active_pro(subscription_id: &str, customer: &str, created: i64) -> serde_json::Value {
    subscription(
        subscription_id,
        customer,
        "active",
        &[PRO],
        created + MONTH,
        true,
    )
}

/// A `customer.subscription.updated` whose subscription has no `status`.
fn update_without_status(id: &str, subscription_id: &str, customer: &str, created: i64) -> String {
    let mut object = active_pro(subscription_id, customer, created);
    object.as_object_mut().unwrap().remove("status");
    Event::new(id, "customer.subscription.updated", created, object).body()
}

/// A `customer.subscription.updated` whose `items` is a string instead of a list object.
fn update_with_string_items(
    id: &str,
    subscription_id: &str,
    customer: &str,
    created: i64,
) -> String {
    let object = with(
        active_pro(subscription_id, customer, created),
        "items",
        json!("si_1,si_2"),
    );
    Event::new(id, "customer.subscription.updated", created, object).body()
}

struct DeadLetterRow {
    id: i64,
    event_id: Option<String>,
    event_type: Option<String>,
    topic: String,
    partition: i32,
    offset: i64,
    reason: String,
    message: String,
    payload: Vec<u8>,
    redriven_at: Option<String>,
}

async fn dead_letters(pipeline: &Pipeline) -> Vec<DeadLetterRow> {
    let mut db = pipeline.db().await;
    sqlx::query(
        "SELECT id, event_id, event_type, topic, partition, \"offset\", reason, message, payload,
                redriven_at::text AS redriven_at
         FROM dead_letters ORDER BY partition, \"offset\"",
    )
    .fetch_all(&mut db)
    .await
    .unwrap()
    .into_iter()
    .map(|r| DeadLetterRow {
        id: r.get("id"),
        event_id: r.get("event_id"),
        event_type: r.get("event_type"),
        topic: r.get("topic"),
        partition: r.get("partition"),
        offset: r.get("offset"),
        reason: r.get("reason"),
        message: r.get("message"),
        payload: r.get("payload"),
        redriven_at: r.get("redriven_at"),
    })
    .collect()
}

/// (partition, next_offset) of every partition the projector has stored progress for.
async fn stored_offsets(pipeline: &Pipeline) -> Vec<(i32, i64)> {
    let mut db = pipeline.db().await;
    sqlx::query_as(
        "SELECT partition, next_offset FROM consumer_offsets WHERE topic = $1 ORDER BY partition",
    )
    .bind(&pipeline.events_topic)
    .fetch_all(&mut db)
    .await
    .unwrap()
}

/// The sum of every sample of a counter family in the projector's `/metrics`.
async fn metric_total(pipeline: &Pipeline, family: &str) -> f64 {
    let text = pipeline.metrics().await;
    text.lines()
        .filter(|line| {
            line.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// No dead letter: none counted, none in the table, none on the DLQ topic.
async fn assert_nothing_dead_lettered(pipeline: &Pipeline) {
    assert_eq!(
        metric_total(pipeline, "projector_dead_letters_total").await,
        0.0
    );
    assert!(dead_letters(pipeline).await.is_empty());
    assert!(read_topic_to_end(&pipeline.dlq_topic).is_empty());
}

#[tokio::test]
async fn malformed_subscription_updates_are_dead_lettered_with_their_exact_bytes_while_later_events_apply(
) {
    // Arrange: poison in the middle of one customer's events (same key, same partition).
    let mut pipeline = Pipeline::in_process(Options::default()).await;
    let poison_status = update_without_status("evt_dl_3", "sub_dl", "cus_dl", T0 + 20);
    let poison_items = update_with_string_items("evt_dl_4", "sub_dl", "cus_dl", T0 + 30);
    let bodies = [
        customer_created("evt_dl_1", T0, "cus_dl"),
        Event::new(
            "evt_dl_2",
            "customer.subscription.created",
            T0 + 10,
            subscription("sub_dl", "cus_dl", "active", &[PRO], T0 + MONTH, true),
        )
        .body(),
        poison_status.clone(),
        poison_items.clone(),
        Event::new(
            "evt_dl_5",
            "customer.subscription.updated",
            T0 + 40,
            subscription(
                "sub_dl",
                "cus_dl",
                "active",
                &[PRO, TEAM],
                T0 + 40 + MONTH,
                true,
            ),
        )
        .body(),
    ];

    // Act
    pipeline.apply(&bodies).await;

    // Assert: the later update is applied and the partition moved past the poison.
    let view = pipeline.entitlements("cus_dl", None).await;
    assert_eq!(view["features"], json!(["api", "pro", "team"]));
    assert_eq!(
        view["subscriptions"][0]["items"].as_array().unwrap().len(),
        2
    );
    let offsets = stored_offsets(&pipeline).await;
    assert_eq!(offsets.len(), 1, "one customer, one partition: {offsets:?}");
    let (partition, next_offset) = offsets[0];
    assert_eq!(next_offset, bodies.len() as i64);

    // Assert: both poison events are in the table, byte for byte, with the reason.
    let dead = dead_letters(&pipeline).await;
    assert_eq!(dead.len(), 2);
    let expected = [
        ("evt_dl_3", &poison_status, 2, "`data.object.status`"),
        ("evt_dl_4", &poison_items, 3, "`data.object.items`"),
    ];
    for (row, (event_id, body, offset, field)) in dead.iter().zip(expected) {
        assert_eq!(row.event_id.as_deref(), Some(event_id));
        assert_eq!(
            row.event_type.as_deref(),
            Some("customer.subscription.updated")
        );
        assert_eq!(row.reason, "unexpected_shape");
        assert!(
            row.message.contains(field),
            "{event_id}: the message names {field}: {}",
            row.message
        );
        assert_eq!(row.payload, body.as_bytes(), "{event_id}: the exact bytes");
        assert_eq!(
            (row.topic.as_str(), row.partition, row.offset),
            (pipeline.events_topic.as_str(), partition, offset)
        );
        assert_eq!(row.redriven_at, None);
    }

    // Assert: and in the DLQ topic, with the reason header.
    let published = read_topic_to_end(&pipeline.dlq_topic);
    assert_eq!(published.len(), 2, "exactly the two poison events");
    for (message, (event_id, body, offset, _)) in published.iter().zip(expected) {
        assert_eq!(message.payload(), Some(body.as_bytes()), "{event_id}");
        assert_eq!(header(message, "dlq-reason"), Some("unexpected_shape"));
        assert_eq!(
            header(message, "dlq-source"),
            Some(format!("{}/{partition}/{offset}", pipeline.events_topic).as_str())
        );
    }
    assert_eq!(
        metric_total(&pipeline, "projector_dead_letters_total").await,
        2.0
    );
}

#[tokio::test]
async fn redrive_of_a_still_malformed_event_reports_it_failing_with_exit_code_1() {
    // Arrange
    let mut pipeline = Pipeline::in_process(Options::default()).await;
    pipeline
        .apply(&[
            customer_created("evt_rf_1", T0, "cus_rf"),
            update_without_status("evt_rf_2", "sub_rf", "cus_rf", T0 + 10),
        ])
        .await;
    let before = dead_letters(&pipeline).await;
    assert_eq!(before.len(), 1);

    // Act: the code has not changed, so the event fails the same way.
    let stdout = pipeline
        .redrive(&[], 1, "redriven: 0 applied, 1 still failing")
        .await;

    // Assert
    assert!(
        stdout.contains(&format!("still failing: dead letter {}", before[0].id)),
        "{stdout}"
    );
    let after = dead_letters(&pipeline).await;
    assert_eq!(after.len(), 1, "no second row for the same record");
    assert_eq!(after[0].id, before[0].id);
    assert_eq!(after[0].redriven_at, None, "still pending");
    assert_eq!(after[0].payload, before[0].payload);
    pipeline.settle().await;
    assert_eq!(
        read_topic_to_end(&pipeline.dlq_topic).len(),
        1,
        "a failing redrive does not publish the record to the DLQ topic again"
    );
    let view = pipeline.entitlements("cus_rf", None).await;
    assert_eq!(view["subscriptions"], json!([]));
}

#[tokio::test]
async fn redrive_applies_a_dead_letter_the_current_code_accepts_and_marks_it_redriven_once() {
    // Arrange: a known customer, and a dead letter of a valid event, as an older projector
    // version that rejected this shape would have recorded it.
    let mut pipeline = Pipeline::in_process(Options::default()).await;
    pipeline
        .apply(&[customer_created("evt_rd_1", T0, "cus_rd")])
        .await;
    assert_eq!(
        pipeline.entitlements("cus_rd", None).await["features"],
        json!([])
    );
    let (partition, _) = stored_offsets(&pipeline).await[0];
    let body = Event::new(
        "evt_rd_2",
        "customer.subscription.updated",
        T0 + 10,
        subscription("sub_rd", "cus_rd", "active", &[PRO], T0 + MONTH, true),
    )
    .body();
    let mut db = pipeline.db().await;
    sqlx::query(
        "INSERT INTO dead_letters (event_id, event_type, topic, partition, \"offset\", reason, message, payload)
         VALUES ('evt_rd_2', 'customer.subscription.updated', $1, $2, 1000000, 'unexpected_shape',
                 'rejected by an older projector version', $3)",
    )
    .bind(&pipeline.events_topic)
    .bind(partition)
    .bind(body.as_bytes())
    .execute(&mut db)
    .await
    .unwrap();
    let changes_before = pipeline.changes().len();

    // Act
    pipeline
        .redrive(&[], 0, "redriven: 1 applied, 0 still failing")
        .await;

    // Assert: applied, visible in the API and downstream, marked redriven.
    let view = pipeline.entitlements("cus_rd", None).await;
    assert_eq!(view["features"], json!(["api", "pro"]));
    assert_eq!(view["subscriptions"][0]["id"], "sub_rd");
    let changes = pipeline.changes();
    assert_eq!(changes.len(), changes_before + 1);
    let (key, message) = changes.last().unwrap();
    assert_eq!(key.as_deref(), Some("cus_rd"));
    assert_eq!(message["cause"]["event_id"], "evt_rd_2");
    assert_eq!(message["added"], json!(["api", "pro"]));
    assert_eq!(message["version"], view["version"]);
    let redriven = dead_letters(&pipeline).await;
    assert_eq!(redriven.len(), 1);
    let redriven_at = redriven[0].redriven_at.clone().expect("redriven_at is set");

    // Act: again.
    pipeline
        .redrive(&[], 0, "redriven: 0 applied, 0 still failing")
        .await;

    // Assert: nothing pending, nothing re-applied.
    assert_eq!(
        dead_letters(&pipeline).await[0].redriven_at.as_deref(),
        Some(redriven_at.as_str())
    );
    assert_eq!(pipeline.entitlements("cus_rd", None).await, view);
    assert_eq!(pipeline.changes().len(), changes_before + 1);
}

#[tokio::test]
async fn unknown_event_type_is_counted_and_ignored_not_dead_lettered() {
    // Arrange
    let mut pipeline = Pipeline::in_process(Options::default()).await;
    let payment_intent = json!({
        "id": "pi_unknown", "object": "payment_intent", "customer": "cus_pi", "amount": 2000,
        "currency": "usd", "status": "requires_payment_method", "livemode": false
    });

    // Act
    pipeline
        .apply(&[Event::new("evt_pi_1", "payment_intent.created", T0, payment_intent).body()])
        .await;

    // Assert
    assert_eq!(
        metric_total(&pipeline, "projector_events_ignored_total").await,
        1.0
    );
    assert_nothing_dead_lettered(&pipeline).await;
    let (status, body) = pipeline.get("/v1/customers/cus_pi/entitlements").await;
    assert_eq!(status, 404, "an ignored event projects nothing: {body}");
    assert!(pipeline.changes().is_empty());
}

#[tokio::test]
async fn thin_event_is_counted_not_dead_lettered_and_its_partition_flows_on() {
    // Arrange: a thin event about a customer (so keyed, and partitioned, by that customer),
    // then a backfill snapshot and an older webhook of the same customer behind it.
    let mut pipeline = Pipeline::in_process(Options::default()).await;
    let thin = json!({
        "id": "evt_test_thin_1",
        "object": "v2.core.event",
        "type": "v1.customer.updated",
        "livemode": false,
        "created": "2026-01-01T01:00:00.250+01:00",
        "related_object": {"id": "cus_thin", "type": "customer", "url": "/v1/customers/cus_thin"}
    })
    .to_string();
    let active = subscription("sub_thin", "cus_thin", "active", &[PRO], T0 + MONTH, true);
    let canceled = with(active.clone(), "status", json!("canceled"));
    let backfilled = Event::new(
        "evt_bf_thin_sub",
        "customer.subscription.backfilled",
        T0 + 60,
        active,
    );
    // Created the second before the fetch: the backfilled snapshot already reflects it.
    let older_webhook = Event::new(
        "evt_thin_sub_updated",
        "customer.subscription.updated",
        T0 + 59,
        canceled,
    );

    // Act
    pipeline.send(&thin).await;
    pipeline.send(&backfilled.body()).await;
    pipeline.apply(&[older_webhook.body()]).await;

    // Assert: counted as a thin event, nothing dead-lettered, and the records behind it applied.
    assert_eq!(
        metric_total(
            &pipeline,
            "projector_thin_events_total{type=\"v1.customer.updated\"}"
        )
        .await,
        1.0
    );
    assert_nothing_dead_lettered(&pipeline).await;
    let view = pipeline.entitlements("cus_thin", None).await;
    assert_eq!(view["features"], json!(["api", "pro"]), "{view}");
    assert_eq!(view["subscriptions"][0]["status"], "active", "{view}");
    let offsets = stored_offsets(&pipeline).await;
    assert_eq!(offsets.iter().map(|(_, next)| next).sum::<i64>(), 3);
}
