//! One bad record never stops the others, through both real binaries: a string Postgres cannot
//! store is escaped and projected; a record Postgres refuses becomes a dead letter with its
//! SQLSTATE while the rest of its batch and its partition flow on; an event re-delivered after
//! its id was pruned from the dedupe table changes nothing.

mod common;

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};
use sqlx::Row;

use common::events::*;
use common::*;

fn subscription_created(n: usize, customer: &str) -> String {
    Event::new(
        &format!("evt_rb_sub_{n}"),
        "customer.subscription.created",
        T0 + n as i64,
        subscription(
            &format!("sub_rb_{n}"),
            customer,
            "active",
            &[PRO],
            T0 + MONTH,
            true,
        ),
    )
    .body()
}

/// One sample of the projector's `/metrics` (0 when absent).
async fn metric(pipeline: &Pipeline, sample: &str) -> f64 {
    let text = pipeline.metrics().await;
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Polls the read API until `customer` has `features`, or panics after `within`.
async fn wait_for_features(pipeline: &Pipeline, customer: &str, features: Value, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = pipeline
            .get(&format!("/v1/customers/{customer}/entitlements"))
            .await;
        if status == 200 && body["features"] == features {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{customer} not projected with {features} within {within:?}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_event_with_a_nul_in_its_metadata_is_projected_and_later_customers_follow_within_seconds(
) {
    // Arrange: a NUL in a subscription's metadata, which Postgres' jsonb refuses as-is.
    let mut pipeline = Pipeline::start(Options::default()).await;
    let mut object = subscription("sub_nul", "cus_nul", "active", &[PRO], T0 + MONTH, true);
    object["metadata"] = json!({"note": "before\u{0}after", "plan\u{0}": "x", "half": "SURROGATE"});
    // An unpaired surrogate escape, which no Rust string can hold, jsonb refuses as well.
    let poison = Event::new("evt_nul", "customer.subscription.created", T0, object)
        .body()
        .replace("SURROGATE", r"\ud800");
    assert!(
        poison.contains(r"before\u0000after"),
        "the body carries the NUL escape"
    );
    assert!(
        poison.contains(r#""half":"\ud800""#),
        "and the lone surrogate"
    );
    let others: Vec<String> = (0..30)
        .map(|n| subscription_created(n, &format!("cus_after_nul_{n}")))
        .collect();

    // Act
    pipeline.send(&poison).await;
    pipeline.send_all(&others).await;
    let sent = Instant::now();

    // Assert: every customer sent after it is projected within seconds.
    for n in 0..30 {
        let customer = format!("cus_after_nul_{n}");
        let left = Duration::from_secs(15).saturating_sub(sent.elapsed());
        wait_for_features(&pipeline, &customer, json!(["api", "pro"]), left).await;
    }
    println!(
        "30 customers sent after the NUL event projected {} ms after the last send",
        sent.elapsed().as_millis()
    );
    // Assert: the event itself is projected, the NUL replaced by U+FFFD in the stored snapshot.
    pipeline.settle().await;
    let view = pipeline.entitlements("cus_nul", None).await;
    assert_eq!(view["features"], json!(["api", "pro"]));
    let mut db = pipeline.db().await;
    let metadata: String = sqlx::query_scalar(
        "SELECT (snapshot -> 'metadata')::text FROM subscriptions WHERE id = 'sub_nul'",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    let metadata: Value = serde_json::from_str(&metadata).unwrap();
    assert_eq!(
        metadata,
        json!({"note": "before\u{fffd}after", "plan\u{fffd}": "x", "half": "\u{fffd}"})
    );
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(dead, 0, "nothing was dead-lettered");
    // Assert: the log keeps the original bytes.
    let log = read_topic_to_end(&pipeline.events_topic);
    assert!(
        log.iter().any(|m| m.payload() == Some(poison.as_bytes())),
        "the log holds the event byte for byte"
    );
}

#[tokio::test]
async fn a_record_postgres_refuses_becomes_a_dead_letter_with_its_sqlstate_and_its_batch_and_partition_flow_on(
) {
    // Arrange: a constraint made on purpose, so Postgres refuses one customer update. The
    // projector is stopped while the events are sent, so that they arrive in one batch and
    // the refused record has to be found inside it.
    let mut pipeline = Pipeline::start(Options::default()).await;
    let mut db = pipeline.db().await;
    sqlx::query(
        "ALTER TABLE customers ADD CONSTRAINT e2e_refused_email
         CHECK (email IS DISTINCT FROM 'refused@example.com')",
    )
    .execute(&mut db)
    .await
    .unwrap();
    pipeline.projector.take().unwrap().terminate();
    let mut refused = customer("cus_pg", false);
    refused["email"] = json!("refused@example.com");
    let poison = Event::new("evt_pg_2", "customer.updated", T0 + 10, refused).body();
    let mut bodies = vec![
        customer_created("evt_pg_1", T0, "cus_pg"),
        poison.clone(),
        Event::new(
            "evt_pg_3",
            "customer.subscription.created",
            T0 + 20,
            subscription("sub_pg", "cus_pg", "active", &[PRO], T0 + MONTH, true),
        )
        .body(),
    ];
    bodies.extend((0..20).map(|n| subscription_created(n, &format!("cus_pg_other_{n}"))));
    pipeline.send_all(&bodies).await;

    // Act
    pipeline.start_projector();
    pipeline.settle().await;

    // Assert: everything but the refused record is applied, its own customer included.
    let view = pipeline.entitlements("cus_pg", None).await;
    assert_eq!(view["features"], json!(["api", "pro"]));
    for n in 0..20 {
        let view = pipeline
            .entitlements(&format!("cus_pg_other_{n}"), None)
            .await;
        assert_eq!(view["features"], json!(["api", "pro"]), "cus_pg_other_{n}");
    }
    let email: String = sqlx::query_scalar("SELECT email FROM customers WHERE id = 'cus_pg'")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(
        email, "cus_pg@example.com",
        "the refused update is not applied"
    );

    // Assert: one dead letter, naming the SQLSTATE and the constraint, with the exact bytes.
    let rows = sqlx::query(
        "SELECT event_id, event_type, reason, sqlstate, message, payload, partition, \"offset\"
         FROM dead_letters",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1, "only the refused record");
    let row = &rows[0];
    assert_eq!(
        row.get::<Option<String>, _>("event_id").as_deref(),
        Some("evt_pg_2")
    );
    assert_eq!(
        row.get::<Option<String>, _>("event_type").as_deref(),
        Some("customer.updated")
    );
    assert_eq!(row.get::<String, _>("reason"), "database_rejected");
    assert_eq!(
        row.get::<Option<String>, _>("sqlstate").as_deref(),
        Some("23514")
    );
    let message: String = row.get("message");
    assert!(
        message.starts_with("SQLSTATE 23514: ") && message.contains("e2e_refused_email"),
        "{message}"
    );
    assert_eq!(row.get::<Vec<u8>, _>("payload"), poison.as_bytes());

    // Assert: its partition moved past it (its customer's three records are 0, 1, 2 there).
    let partition: i32 = row.get("partition");
    let offset: i64 = row.get("offset");
    assert_eq!(offset, 1);
    let next: i64 = sqlx::query_scalar(
        "SELECT next_offset FROM consumer_offsets WHERE topic = $1 AND partition = $2",
    )
    .bind(&pipeline.events_topic)
    .bind(partition)
    .fetch_one(&mut db)
    .await
    .unwrap();
    let in_partition = read_topic_to_end(&pipeline.events_topic)
        .iter()
        .filter(|m| m.partition() == partition)
        .count() as i64;
    assert_eq!(
        next, in_partition,
        "every record of the partition is behind the stored offset"
    );

    // Assert: and in the DLQ topic, with the reason and the SQLSTATE.
    let published = read_topic_to_end(&pipeline.dlq_topic);
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].payload(), Some(poison.as_bytes()));
    assert_eq!(
        header(&published[0], "dlq-reason"),
        Some("database_rejected")
    );
    assert_eq!(header(&published[0], "dlq-sqlstate"), Some("23514"));
    assert!(metric(&pipeline, "projector_batch_failures_total{kind=\"data\"}").await >= 2.0);
    assert_eq!(
        metric(
            &pipeline,
            "projector_dead_letters_total{reason=\"database_rejected\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn an_old_event_redelivered_after_its_id_was_pruned_changes_nothing() {
    // Arrange: a one-second dedupe window, pruned every second.
    let options = Options {
        extra_env: vec![
            ("DEDUPE_WINDOW_SECS".into(), "1".into()),
            ("DEDUPE_PRUNE_INTERVAL_SECS".into(), "1".into()),
        ],
        ..Default::default()
    };
    let mut pipeline = Pipeline::start(options).await;
    let created = Event::new(
        "evt_pr_1",
        "customer.subscription.created",
        T0,
        subscription("sub_pr", "cus_pr", "active", &[PRO], T0 + MONTH, true),
    )
    .body();
    let canceled = Event::new(
        "evt_pr_2",
        "customer.subscription.deleted",
        T0 + 10,
        subscription("sub_pr", "cus_pr", "canceled", &[PRO], T0 + MONTH, true),
    )
    .body();
    pipeline.apply(&[&created, &canceled]).await;
    let changes_before = pipeline.changes().len();
    assert!(changes_before >= 1);
    assert_eq!(
        pipeline.entitlements("cus_pr", None).await["features"],
        json!([])
    );
    let projections_before = pipeline.projections().await;
    let mut db = pipeline.db().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events")
            .fetch_one(&mut db)
            .await
            .unwrap();
        if kept == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{kept} ids not pruned within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Act: Stripe redelivers both, the older one last, after their ids were forgotten.
    pipeline.apply(&[&canceled, &created]).await;

    // Assert: both were applied again, not deduped (pruning may forget them again at once, so
    // the projector's counters say it rather than the table), as no-ops.
    assert_eq!(
        metric(
            &pipeline,
            "projector_events_applied_total{type=\"customer.subscription.created\"}"
        )
        .await,
        2.0
    );
    assert_eq!(
        metric(
            &pipeline,
            "projector_events_applied_total{type=\"customer.subscription.deleted\"}"
        )
        .await,
        2.0
    );
    assert_eq!(
        metric(&pipeline, "projector_duplicates_total{kind=\"event_id\"}").await,
        0.0
    );
    assert_eq!(
        pipeline.changes().len(),
        changes_before,
        "no change message"
    );
    assert_eq!(
        pipeline.entitlements("cus_pr", None).await["features"],
        json!([]),
        "the old grant does not come back"
    );
    assert_same_projections(
        "after re-applying pruned events",
        &projections_before,
        &pipeline.projections().await,
    );
}

fn customer_update(customer_id: &str, n: i64) -> String {
    let mut object = customer(customer_id, false);
    object["name"] = json!(format!("Name {n}"));
    Event::new(
        &format!("evt_{customer_id}_{n}"),
        "customer.updated",
        T0 + n,
        object,
    )
    .body()
}

/// The partition and stored next offset of the only partition with progress.
async fn only_partition(pipeline: &Pipeline) -> (i32, i64) {
    let mut db = pipeline.db().await;
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM consumer_offsets WHERE topic = $1 AND next_offset > 0",
    )
    .bind(&pipeline.events_topic)
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1, "one customer, one partition: {rows:?}");
    rows[0]
}

async fn latest_event_of(pipeline: &Pipeline, customer_id: &str) -> String {
    let mut db = pipeline.db().await;
    sqlx::query_scalar("SELECT rank_event_id FROM customers WHERE id = $1")
        .bind(customer_id)
        .fetch_one(&mut db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_gap_of_records_removed_by_retention_is_accepted_logged_and_counted() {
    // Arrange: three records applied, then three more while the projector is down, and the
    // log's start moved past the first two of those (what retention does).
    let mut pipeline = Pipeline::start(Options::default()).await;
    pipeline
        .apply(
            &(0..3)
                .map(|n| customer_update("cus_gap", n))
                .collect::<Vec<_>>(),
        )
        .await;
    let (partition, next) = only_partition(&pipeline).await;
    assert_eq!(next, 3);
    pipeline.projector.take().unwrap().terminate();
    pipeline
        .send_all(
            &(3..6)
                .map(|n| customer_update("cus_gap", n))
                .collect::<Vec<_>>(),
        )
        .await;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let mut before = TopicPartitionList::new();
    before
        .add_partition_offset(&pipeline.events_topic, partition, Offset::Offset(5))
        .unwrap();
    admin
        .delete_records(&before, &AdminOptions::new())
        .await
        .expect("delete records below offset 5");
    // The records below the new start can no longer be read.
    pipeline.appended -= 2;

    // Act
    pipeline.start_projector();
    pipeline.settle().await;

    // Assert: the partition went on from the log's start, and said so.
    assert_eq!(only_partition(&pipeline).await, (partition, 6));
    assert_eq!(latest_event_of(&pipeline, "cus_gap").await, "evt_cus_gap_5");
    assert_eq!(
        metric(
            &pipeline,
            &format!("projector_offset_gaps_total{{partition=\"{partition}\"}}")
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn a_gap_over_records_the_log_still_holds_is_read_again_never_skipped() {
    // Arrange: six records applied; then Postgres' stored offset is set back to 3, as if the
    // batch of 3..6 had never committed, while the consumer has read on.
    let mut pipeline = Pipeline::start(Options::default()).await;
    pipeline
        .apply(
            &(0..6)
                .map(|n| customer_update("cus_hole", n))
                .collect::<Vec<_>>(),
        )
        .await;
    let (partition, _) = only_partition(&pipeline).await;
    let mut db = pipeline.db().await;
    sqlx::query("DELETE FROM processed_events WHERE event_id = 'evt_cus_hole_4'")
        .execute(&mut db)
        .await
        .unwrap();
    sqlx::query("UPDATE consumer_offsets SET next_offset = 3 WHERE topic = $1 AND partition = $2")
        .bind(&pipeline.events_topic)
        .bind(partition)
        .execute(&mut db)
        .await
        .unwrap();

    // Act: the next record (offset 6) finds the stored offset behind it.
    pipeline.apply(&[customer_update("cus_hole", 6)]).await;

    // Assert: 3..6 were read again rather than skipped (4, whose id was forgotten, applied
    // anew; 3 and 5 recognised as applied), and no gap was accepted.
    assert_eq!(only_partition(&pipeline).await, (partition, 7));
    assert_eq!(
        latest_event_of(&pipeline, "cus_hole").await,
        "evt_cus_hole_6"
    );
    assert_eq!(
        metric(
            &pipeline,
            "projector_events_applied_total{type=\"customer.updated\"}"
        )
        .await,
        8.0
    );
    assert_eq!(
        metric(&pipeline, "projector_duplicates_total{kind=\"event_id\"}").await,
        2.0
    );
    assert_eq!(
        metric(
            &pipeline,
            &format!("projector_offset_gaps_total{{partition=\"{partition}\"}}")
        )
        .await,
        0.0
    );
}

#[tokio::test]
async fn a_missing_table_is_retried_until_it_is_back_and_nothing_is_dead_lettered_or_skipped() {
    // Arrange: the deployment is wrong (a table the binary needs is gone), not the record.
    let mut pipeline = Pipeline::start(Options::default()).await;
    let mut db = pipeline.db().await;
    sqlx::query("ALTER TABLE customers RENAME TO customers_away")
        .execute(&mut db)
        .await
        .unwrap();

    // Act: an event arrives while it is missing; then the table comes back.
    pipeline
        .send(&customer_created("evt_away_1", T0, "cus_away"))
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(
        &pipeline,
        "projector_batch_failures_total{kind=\"transient\"}",
    )
    .await
        < 2.0
    {
        assert!(Instant::now() < deadline, "the batch was not retried");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::query("ALTER TABLE customers_away RENAME TO customers")
        .execute(&mut db)
        .await
        .unwrap();
    pipeline.settle().await;

    // Assert
    let (status, _) = pipeline.get("/v1/customers/cus_away/entitlements").await;
    assert_eq!(status, 200, "the event was applied once the table was back");
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(dead, 0);
    assert_eq!(
        metric(&pipeline, "projector_batch_failures_total{kind=\"data\"}").await,
        0.0
    );
}
