//! Fault injection with librdkafka's mock cluster: produce errors and broker timeouts become
//! 503, never 200, and the service recovers when the broker does.

use std::collections::HashMap;
use std::time::Duration;

use ingest::config::Config;
use ingest::startup::Application;
use rdkafka::mocking::MockCluster;
use rdkafka::types::RDKafkaApiKey;
use rdkafka::types::RDKafkaRespErr;

const SECRET: &str = "whsec_mock_secret";

fn config(brokers: &str) -> Config {
    let vars: HashMap<&str, String> = HashMap::from([
        ("KAFKA_BROKERS", brokers.to_owned()),
        ("STRIPE_WEBHOOK_SECRETS", SECRET.to_owned()),
        ("INGEST_ADDR", "127.0.0.1:0".to_owned()),
        ("STRIPE_EVENTS_TOPIC", "stripe.events".to_owned()),
        ("APPEND_TIMEOUT_MS", "1500".to_owned()),
    ]);
    Config::from_lookup(|name| vars.get(name).cloned()).unwrap()
}

fn body() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    format!(
        r#"{{"id":"evt_mock","type":"customer.created","created":{now},"data":{{"object":{{"object":"customer","id":"cus_1"}}}}}}"#
    )
}

async fn post(client: &reqwest::Client, port: u16) -> u16 {
    let body = body();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let header = ingest::signature::header_for(SECRET, now, body.as_bytes());
    client
        .post(format!("http://127.0.0.1:{port}/webhooks/stripe"))
        .header("Stripe-Signature", header)
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn start(mock: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>) -> u16 {
    mock.create_topic("stripe.events", 3, 1).unwrap();
    mock.create_topic("stripe.events.dlq", 1, 1).unwrap();
    let app = Application::build(config(&mock.bootstrap_servers()))
        .await
        .unwrap();
    let port = app.port();
    tokio::spawn(app.run_until_stopped());
    port
}

#[tokio::test]
async fn produce_errors_give_503_then_200_when_they_stop() {
    let mock = MockCluster::new(1).unwrap();
    let port = start(&mock).await;
    let client = reqwest::Client::new();
    assert_eq!(post(&client, port).await, 200, "healthy mock broker");

    // Every produce request fails with a retriable error until the delivery deadline.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 500],
    );
    assert_eq!(post(&client, port).await, 503);

    mock.clear_request_errors(RDKafkaApiKey::Produce);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match post(&client, port).await {
            200 => break,
            503 => assert!(
                std::time::Instant::now() < deadline,
                "no recovery after errors cleared"
            ),
            other => panic!("unexpected status {other}"),
        }
    }
}

#[tokio::test]
async fn non_retriable_produce_error_gives_503() {
    let mock = MockCluster::new(1).unwrap();
    let port = start(&mock).await;
    let client = reqwest::Client::new();
    assert_eq!(post(&client, port).await, 200);

    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 5],
    );

    assert_eq!(post(&client, port).await, 503);
}

#[tokio::test]
async fn broker_slower_than_the_append_deadline_gives_503() {
    let mock = MockCluster::new(1).unwrap();
    let port = start(&mock).await;
    let client = reqwest::Client::new();
    assert_eq!(post(&client, port).await, 200);

    mock.broker_round_trip_time(1, Duration::from_secs(5))
        .unwrap();
    assert_eq!(post(&client, port).await, 503);
}

#[tokio::test]
async fn broker_down_gives_503() {
    let mock = MockCluster::new(1).unwrap();
    let port = start(&mock).await;
    let client = reqwest::Client::new();
    assert_eq!(post(&client, port).await, 200);

    mock.broker_down(1).unwrap();
    assert_eq!(post(&client, port).await, 503);
    mock.broker_up(1).unwrap();
}
