//! End to end: the real `ingest backfill` and `ingest reconcile` binaries against the real
//! Kafka broker, and either the real local Stripe API server (`scripts/localstripe`) or, for
//! faults, a tiny HTTP stub that answers 429 then 500 then success.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::message::OwnedMessage;
use serde_json::{json, Value};
use testkit::localstripe::{self, LocalStripe};

const WAIT: Duration = Duration::from_secs(30);

/// Runs `ingest <args>` to completion against `api_base`, appending to `topic`.
fn ingest_command(args: &[&str], api_base: &str, topic: &str) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_ingest"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KAFKA_BROKERS", brokers())
        .env("STRIPE_EVENTS_TOPIC", topic)
        .env("STRIPE_EVENTS_PARTITIONS", "3")
        .env("STRIPE_API_KEY", localstripe::API_KEY)
        .env("STRIPE_API_BASE", api_base)
        .env("RUST_LOG", "info")
        .output()
        .expect("run ingest");
    if std::env::var_os("TEST_LOG").is_some() {
        eprintln!(
            "[ingest {args:?}] {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    output
}

fn summary(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "ingest failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("--json summary on stdout")
}

fn body_json(record: &OwnedMessage) -> Value {
    serde_json::from_str(&payload_str(record)).unwrap()
}

/// Every record of `topic` (from the beginning) whose data.object concerns one of `ids`.
fn records_about(records: &[OwnedMessage], ids: &BTreeSet<String>) -> Vec<OwnedMessage> {
    records
        .iter()
        .filter(|r| {
            let body = body_json(r);
            let object = &body["data"]["object"];
            [&object["id"], &object["customer"]]
                .iter()
                .any(|v| v.as_str().is_some_and(|id| ids.contains(id)))
        })
        .cloned()
        .collect()
}

/// Runs a plain `backfill` that must fail with exit status 1 and the stable `code` on stderr;
/// returns that stderr.
#[track_caller]
fn backfill_failing_with(api_base: &str, topic: &str, code: &str) -> String {
    let state = state_dir().display().to_string();
    let output = ingest_command(&["backfill", "--state-dir", &state], api_base, topic);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(stderr.contains(code), "{stderr}");
    stderr
}

fn state_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(unique("backfill-state"))
}

#[tokio::test]
async fn backfill_appends_every_object_as_a_keyed_snapshot_and_a_second_run_repeats_its_ids() {
    // Arrange: customers with active, declined, canceled and several subscriptions.
    let stripe = LocalStripe::connect().await;
    let active = stripe.customer("pm_card_visa").await;
    let active_sub = stripe.subscribe(&active, localstripe::PRO_PLAN, None).await;
    let declined = stripe.customer("pm_card_chargeCustomerFail").await;
    let declined_sub = stripe
        .subscribe(&declined, localstripe::PRO_PLAN, None)
        .await;
    let several = stripe.customer("pm_card_visa").await;
    let first = stripe
        .subscribe(&several, localstripe::PRO_PLAN, None)
        .await;
    let second = stripe
        .subscribe(&several, localstripe::TEAM_PLAN, None)
        .await;
    stripe.cancel(first["id"].as_str().unwrap()).await;
    let ours: BTreeSet<String> = [&active, &declined, &several].map(|c| c.clone()).into();
    let topic = unique("e2e-backfill");
    let state = state_dir();
    let state_arg = state.display().to_string();

    // Act
    let run = summary(&ingest_command(
        &["backfill", "--json", "--state-dir", &state_arg],
        &stripe.base,
        &topic,
    ));

    // Assert: what the summary says matches what the log holds.
    let appended = run["records_appended"].as_u64().unwrap() as usize;
    assert!(appended >= 7, "{run}");
    let all = read_records(&topic, appended, WAIT);
    assert_eq!(all.len(), appended, "every appended record is in the log");
    let skipped: Vec<&str> = run["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["resource"].as_str().unwrap())
        .collect();
    assert_eq!(
        skipped,
        ["checkout_sessions", "entitlements"],
        "localstripe has neither: skipped, not failed"
    );
    let mine = records_about(&all, &ours);
    let mut by_object: BTreeMap<String, Value> = BTreeMap::new();
    for record in &mine {
        let body = body_json(record);
        let object = body["data"]["object"].clone();
        let customer = object["customer"]
            .as_str()
            .or(object["id"].as_str())
            .unwrap()
            .to_owned();
        assert_eq!(key_str(record).as_deref(), Some(customer.as_str()));
        assert_eq!(
            header_value(record, "stripe-source").as_deref(),
            Some("backfill")
        );
        assert_eq!(
            header_value(record, "stripe-signature"),
            None,
            "nothing was signed"
        );
        let event_type = header_value(record, "stripe-event-type").unwrap();
        assert_eq!(body["type"], event_type);
        assert_eq!(
            header_value(record, "stripe-event-id").as_deref(),
            body["id"].as_str()
        );
        assert!(body["id"].as_str().unwrap().starts_with("evt_bf_"));
        assert_eq!(body["api_version"], Value::Null);
        assert!((body["created"].as_i64().unwrap() - now()).abs() < 120);
        by_object.insert(object["id"].as_str().unwrap().to_owned(), body);
    }
    for customer in &ours {
        assert_eq!(by_object[customer]["type"], "customer.backfilled");
    }
    for (sub, status) in [
        (&active_sub, "active"),
        (&declined_sub, "incomplete"),
        (&first, "canceled"),
        (&second, "active"),
    ] {
        let body = &by_object[sub["id"].as_str().unwrap()];
        assert_eq!(body["type"], "customer.subscription.backfilled");
        assert_eq!(
            body["data"]["object"]["status"], status,
            "canceled ones too"
        );
    }
    assert_eq!(mine.len(), 7);

    // Act again: the same objects, fetched later, give the same event ids.
    let again = summary(&ingest_command(
        &["backfill", "--json", "--state-dir", &state_arg],
        &stripe.base,
        &topic,
    ));
    let total = appended + again["records_appended"].as_u64().unwrap() as usize;
    let all = read_records(&topic, total, WAIT);
    let ids: Vec<String> = records_about(&all, &ours)
        .iter()
        .map(|r| header_value(r, "stripe-event-id").unwrap())
        .collect();
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), 14, "both runs appended our 7 objects");
    assert_eq!(
        distinct.len(),
        7,
        "an unchanged object has the same snapshot id"
    );
    std::fs::remove_dir_all(state).ok();
}

#[tokio::test]
async fn resume_continues_after_the_last_object_of_the_checkpoint() {
    // Arrange: three subscriptions; a checkpoint that says customers are done and
    // subscriptions were written up to the second one.
    let stripe = LocalStripe::connect().await;
    let customer = stripe.customer("pm_card_visa").await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        let sub = stripe
            .subscribe(&customer, localstripe::PRO_PLAN, None)
            .await;
        subs.push(sub["id"].as_str().unwrap().to_owned());
    }
    let topic = unique("e2e-resume");
    let state = state_dir();
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        state.join(format!("backfill-platform-{topic}.json")),
        json!({"format": 1, "account": null, "topic": topic, "completed": ["customers"],
               "current": "subscriptions", "starting_after": subs[1], "updated_at": 0})
        .to_string(),
    )
    .unwrap();

    // Act
    let run = summary(&ingest_command(
        &[
            "backfill",
            "--resume",
            "--json",
            "--resources",
            "customers,subscriptions",
            "--state-dir",
            &state.display().to_string(),
        ],
        &stripe.base,
        &topic,
    ));

    // Assert: no customers (done), and only the subscription after the cursor.
    assert_eq!(run["resumed"], true);
    assert!(run["objects"].get("customer").is_none(), "{run}");
    let appended = run["records_appended"].as_u64().unwrap() as usize;
    let records = read_records(&topic, appended, WAIT);
    let ids: BTreeSet<String> = records
        .iter()
        .map(|r| {
            body_json(r)["data"]["object"]["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(ids.contains(&subs[2]));
    assert!(!ids.contains(&subs[0]) && !ids.contains(&subs[1]));
    let checkpoint: Value = serde_json::from_slice(
        &std::fs::read(state.join(format!("backfill-platform-{topic}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        checkpoint["completed"],
        json!(["customers", "subscriptions"])
    );
    std::fs::remove_dir_all(state).ok();
}

#[tokio::test]
async fn reconcile_appends_the_events_api_events_byte_for_byte() {
    // Arrange: a customer and a subscription make events on the server.
    let stripe = LocalStripe::connect().await;
    let customer = stripe.customer("pm_card_visa").await;
    let sub = stripe
        .subscribe(&customer, localstripe::PRO_PLAN, None)
        .await;
    let topic = unique("e2e-reconcile");

    // Act
    let run = summary(&ingest_command(
        &["reconcile", "--since", "1h", "--json"],
        &stripe.base,
        &topic,
    ));

    // Assert
    let appended = run["records_appended"].as_u64().unwrap() as usize;
    let records = read_records(&topic, appended, WAIT);
    assert_eq!(records.len(), appended);
    let created = records
        .iter()
        .find(|r| {
            let body = body_json(r);
            body["type"] == "customer.subscription.created"
                && body["data"]["object"]["id"] == sub["id"]
        })
        .expect("the subscription's creation event");
    assert_eq!(key_str(created).as_deref(), Some(customer.as_str()));
    assert_headers(
        created,
        &[
            ("stripe-source", Some("events-api")),
            ("stripe-api-version", Some("2017-08-15")),
        ],
    );
    let id = header_value(created, "stripe-event-id").unwrap();
    let (status, from_api) = stripe.get_status(&format!("/v1/events/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(
        body_json(created),
        from_api,
        "the event as the API returned it"
    );
}

/// One scripted HTTP answer.
#[derive(Clone)]
struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
}

/// What the stub saw: each request's path, its `Stripe-Account` header and when it arrived.
#[derive(Default)]
struct Seen {
    requests: Vec<(String, Option<String>, Instant)>,
}

/// A minimal HTTP/1.1 server on port 0: answers `/v1/customers` from `script` in order (the
/// last answer repeats), and every other path with `other(path)`.
fn stub(script: Vec<Answer>, other: fn(&str) -> Answer) -> (String, Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut served = 0;
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut account = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(value) = line
                    .to_ascii_lowercase()
                    .strip_prefix("stripe-account:")
                    .map(|v| v.trim().to_owned())
                {
                    account = Some(value);
                }
            }
            let target = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .to_owned();
            let path = target.split('?').next().unwrap_or("/").to_owned();
            log.lock()
                .unwrap()
                .requests
                .push((path.clone(), account, Instant::now()));
            let answer = match script.get(served.min(script.len().saturating_sub(1))) {
                Some(answer) if path == "/v1/customers" => {
                    served += 1;
                    answer.clone()
                }
                _ => other(&path),
            };
            let mut response = format!(
                "HTTP/1.1 {} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
                answer.status,
                answer.body.len()
            );
            for (name, value) in &answer.headers {
                response.push_str(&format!("{name}: {value}\r\n"));
            }
            response.push_str("\r\n");
            response.push_str(&answer.body);
            let _ = stream.write_all(response.as_bytes());
            let _ = stream.flush();
            let mut rest = [0u8; 1];
            let _ = stream.set_read_timeout(Some(Duration::from_millis(10)));
            let _ = stream.read(&mut rest);
        }
    });
    (base, seen)
}

fn empty_list(_path: &str) -> Answer {
    Answer {
        status: 200,
        headers: vec![],
        body: r#"{"object":"list","data":[],"has_more":false}"#.into(),
    }
}

#[tokio::test]
async fn backfill_waits_out_429_with_retry_after_then_retries_500_and_completes() {
    // Arrange: 429 (Retry-After: 2), then 500, then two customers.
    let customers = json!({"object": "list", "has_more": false, "data": [
        {"id": "cus_stub1", "object": "customer", "livemode": false},
        {"id": "cus_stub2", "object": "customer", "livemode": false}
    ]});
    let (base, seen) = stub(
        vec![
            Answer {
                status: 429,
                headers: vec![("Retry-After", "2".into())],
                body: r#"{"error":{"type":"rate_limit_error","message":"Too many requests"}}"#
                    .into(),
            },
            Answer {
                status: 500,
                headers: vec![],
                body: r#"{"error":{"type":"api_error","message":"boom"}}"#.into(),
            },
            Answer {
                status: 200,
                headers: vec![],
                body: customers.to_string(),
            },
        ],
        empty_list,
    );
    let topic = unique("e2e-faults");
    let state = state_dir();

    // Act
    let output = ingest_command(
        &[
            "backfill",
            "--json",
            "--account",
            "acct_stub",
            "--state-dir",
            &state.display().to_string(),
        ],
        &base,
        &topic,
    );

    // Assert: it completed, and the retry after the 429 came no sooner than Retry-After.
    let run = summary(&output);
    let requests = seen.lock().unwrap().requests.clone();
    let customers_requests: Vec<&(String, Option<String>, Instant)> = requests
        .iter()
        .filter(|(path, _, _)| path == "/v1/customers")
        .collect();
    assert!(customers_requests.len() >= 3, "{requests:?}");
    let waited = customers_requests[1].2 - customers_requests[0].2;
    assert!(
        waited >= Duration::from_secs(2),
        "retried after {waited:?}, before Retry-After"
    );
    assert!(
        requests
            .iter()
            .all(|(_, account, _)| account.as_deref() == Some("acct_stub")),
        "every request carries Stripe-Account"
    );
    assert!(run["retries"].as_u64().unwrap() >= 2, "{run}");
    assert_eq!(run["objects"]["customer"], 2, "{run}");
    let records = read_records(&topic, 4, WAIT);
    let customer_records: Vec<&OwnedMessage> = records
        .iter()
        .filter(|r| header_value(r, "stripe-event-type").as_deref() == Some("customer.backfilled"))
        .collect();
    assert_eq!(customer_records.len(), 2);
    for record in customer_records {
        let body = body_json(record);
        assert_eq!(body["account"], "acct_stub");
        assert_eq!(
            header_value(record, "stripe-account").as_deref(),
            Some("acct_stub")
        );
        let key = key_str(record).unwrap();
        assert_eq!(
            key,
            format!(
                "acct_stub/{}",
                body["data"]["object"]["id"].as_str().unwrap()
            )
        );
    }
    // Active entitlements were read for each customer (empty summaries are state too).
    assert_eq!(
        run["objects"]["entitlements.active_entitlement_summary"], 2,
        "{run}"
    );
    std::fs::remove_dir_all(state).ok();
}

#[tokio::test]
async fn backfill_gives_up_on_a_refused_key_with_a_stable_code_and_no_secret_in_output() {
    // Arrange: every request answers 401.
    fn unauthorized(_path: &str) -> Answer {
        Answer {
            status: 401,
            headers: vec![],
            body:
                r#"{"error":{"type":"invalid_request_error","message":"Invalid API Key provided"}}"#
                    .into(),
        }
    }
    let (base, seen) = stub(vec![], unauthorized);
    let topic = unique("e2e-unauthorized");

    // Act
    let stderr = backfill_failing_with(&base, &topic, "stripe_unauthorized");

    // Assert
    assert!(!stderr.contains(localstripe::API_KEY), "{stderr}");
    assert_eq!(
        seen.lock().unwrap().requests.len(),
        1,
        "a 401 is not retried"
    );
}

#[tokio::test]
async fn a_server_whose_cursor_does_not_move_fails_the_backfill_instead_of_paging_forever() {
    // Arrange: every page says has_more with the same last object.
    let page = json!({"object": "list", "has_more": true,
                      "data": [{"id": "cus_loop", "object": "customer"}]});
    let (base, seen) = stub(
        vec![Answer {
            status: 200,
            headers: vec![],
            body: page.to_string(),
        }],
        empty_list,
    );
    let topic = unique("e2e-loop");

    // Act
    backfill_failing_with(&base, &topic, "stripe_invalid_response");

    // Assert
    let requests = seen.lock().unwrap().requests.len();
    assert!(
        (2..=3).contains(&requests),
        "stopped at the repeated cursor, after {requests} requests"
    );
}
