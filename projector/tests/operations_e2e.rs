//! What an operator meets, through the real binaries: a redrive where one record is still
//! refused applies the others and keeps only that one pending; an existing change topic too
//! small for the largest change message stops `projector run` at start-up with a stable code.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde_json::json;
use sqlx::Row;

use common::events::*;
use common::*;

fn email_update(id: &str, customer_id: &str, email: &str, created: i64) -> String {
    let object = with(customer(customer_id, false), "email", json!(email));
    Event::new(id, "customer.updated", created, object).body()
}

#[tokio::test]
async fn a_redrive_with_one_record_still_refused_applies_the_others_and_keeps_only_that_one_pending(
) {
    // Arrange: two constraints made on purpose refuse one update each; both become dead letters.
    let mut pipeline = Pipeline::start(Options::default()).await;
    let mut db = pipeline.db().await;
    for (name, email) in [
        ("e2e_refused_first", "first@example.com"),
        ("e2e_refused_second", "second@example.com"),
    ] {
        sqlx::query(&format!(
            "ALTER TABLE customers ADD CONSTRAINT {name} CHECK (email IS DISTINCT FROM '{email}')"
        ))
        .execute(&mut db)
        .await
        .unwrap();
    }
    let mut bodies = Vec::new();
    for n in 0..6 {
        let id = format!("cus_redrive_{n}");
        bodies.push(customer_created(&format!("evt_rd_c{n}"), T0, &id));
    }
    bodies.push(email_update(
        "evt_rd_first",
        "cus_redrive_0",
        "first@example.com",
        T0 + 10,
    ));
    bodies.push(email_update(
        "evt_rd_second",
        "cus_redrive_1",
        "second@example.com",
        T0 + 10,
    ));
    // More dead letters the fix makes applicable, so that the redriven batch has several
    // records besides the refused one.
    for n in 2..6 {
        bodies.push(email_update(
            &format!("evt_rd_more{n}"),
            &format!("cus_redrive_{n}"),
            "first@example.com",
            T0 + 10,
        ));
    }
    pipeline.apply(&bodies).await;
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dead_letters WHERE redriven_at IS NULL")
            .fetch_one(&mut db)
            .await
            .unwrap();
    assert_eq!(pending, 6, "every refused update is a dead letter");

    // Act: the fix lifts the first constraint only; then redrive everything pending.
    sqlx::query("ALTER TABLE customers DROP CONSTRAINT e2e_refused_first")
        .execute(&mut db)
        .await
        .unwrap();
    pipeline
        .redrive(&[], 1, "redriven: 5 applied, 1 still failing")
        .await;

    // Assert: the five fixed ones are applied, the one still refused stays pending.
    let rows = sqlx::query(
        "SELECT event_id, redriven_at IS NOT NULL AS redriven, sqlstate, message
         FROM dead_letters ORDER BY event_id",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(
        rows.len(),
        6,
        "no dead letter is added or lost by the redrive"
    );
    for row in &rows {
        let event_id: String = row.get("event_id");
        let redriven: bool = row.get("redriven");
        if event_id == "evt_rd_second" {
            assert!(!redriven, "the still refused record stays pending");
            assert_eq!(
                row.get::<Option<String>, _>("sqlstate").as_deref(),
                Some("23514")
            );
            let message: String = row.get("message");
            assert!(message.contains("e2e_refused_second"), "{message}");
        } else {
            assert!(redriven, "{event_id} is applied and marked redriven");
        }
    }
    let emails: Vec<(String, String)> =
        sqlx::query_as("SELECT id, email FROM customers ORDER BY id")
            .fetch_all(&mut db)
            .await
            .unwrap();
    let expected: Vec<(String, String)> = (0..6)
        .map(|n| {
            let id = format!("cus_redrive_{n}");
            let email = match n {
                1 => format!("{id}@example.com"),
                _ => "first@example.com".to_owned(),
            };
            (id, email)
        })
        .collect();
    assert_eq!(emails, expected);
}

#[tokio::test]
async fn an_existing_change_topic_too_small_for_the_largest_change_stops_start_up_with_its_code() {
    // Arrange: a change topic an operator made with the broker's default record limit.
    let pipeline = Pipeline::start(Options::default()).await;
    let small = unique("e2e-small-changes");
    let admin: AdminClient<DefaultClientContext> =
        kafka_settings().client_config().create().unwrap();
    let topic = NewTopic::new(&small, 1, TopicReplication::Fixed(1))
        .set("cleanup.policy", "compact")
        .set("max.message.bytes", "1000000");
    let created = admin
        .create_topics(&[topic], &AdminOptions::new())
        .await
        .unwrap();
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    let mut env = pipeline.projector_env();
    for (name, value) in &mut env {
        if name == "ENTITLEMENTS_TOPIC" {
            *value = small.clone();
        }
    }

    // Act
    let mut child = Command::new(binary("projector"))
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("projector run kept running on a change topic too small");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().unwrap();

    // Assert: a failure naming the code, the topic, its limit and what it must hold.
    assert!(!status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("projector failed to start"))
        .unwrap_or_else(|| panic!("no start-up failure line: {stderr}"));
    assert!(line.contains("(topic_too_small)"), "{line}");
    assert!(line.contains(&small) && line.contains("1000000"), "{line}");
    let required = shared::limits::ENTITLEMENT_CHANGE_MAX_BYTES.to_string();
    assert!(line.contains(&required), "{line}");
}
