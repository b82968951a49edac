//! With the real broker stopped, webhooks get 503 and never 200; once it is back, Stripe's
//! retry of the same request gets 200. Alone in its own test binary because it stops the
//! shared broker (cargo runs test binaries one at a time).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn stack(command: &str) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/stack");
    let status = Command::new(script)
        .arg(command)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "scripts/stack {command} failed");
}

/// Starts the broker again when an assertion fails mid-outage, so later tests have a broker.
/// Never panics: a panic while unwinding would abort the test binary.
struct BrokerBack {
    armed: bool,
}

impl Drop for BrokerBack {
    fn drop(&mut self) {
        if self.armed {
            let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/stack");
            let _ = Command::new(script)
                .arg("kafka-start")
                .stdout(std::process::Stdio::null())
                .status();
        }
    }
}

#[tokio::test]
async fn requests_get_503_while_the_broker_is_down_and_200_once_it_is_back() {
    let ingest = Ingest::start(&[("APPEND_TIMEOUT_MS", "2000")]);
    let client = reqwest::Client::new();
    let body = customer_created("evt_outage", "cus_o");
    assert_eq!(
        post_signed(&client, &ingest, &body).await.status(),
        200,
        "healthy before the outage"
    );

    let mut guard = BrokerBack { armed: true };
    stack("kafka-stop");
    for attempt in 0..3 {
        let response = post_signed(&client, &ingest, &body).await;
        assert_eq!(
            response.status(),
            503,
            "attempt {attempt} while the broker is down"
        );
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(answer["error"], "unavailable");
    }
    assert_eq!(ingest.status_of(&client, "/readyz").await, 503);

    stack("kafka-start");
    guard.armed = false;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = post_signed(&client, &ingest, &body).await.status();
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "only 503 or 200 are acceptable answers");
        assert!(
            Instant::now() < deadline,
            "still no 200 90 s after the broker came back"
        );
    }
    // Every 200 is in the log: the one before the outage and the one after.
    let records = read_records(&ingest.events_topic, 2, Duration::from_secs(30));
    assert!(records.len() >= 2, "got {} records", records.len());
    assert!(records.iter().all(|r| payload_str(r) == body));
}
