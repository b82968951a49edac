//! Deletes the topics a `scripts/bench` run created, so that the shared disk does not fill
//! with benchmark records (a 60,000-request run is ~250 MB in the log).
//!
//!   cargo run --release -p ingest --example drop_topics -- <prefix>
//!
//! Deletes every topic whose name starts with `<prefix>`; the prefix must start with `bench_`,
//! so that a mistyped argument cannot reach the real topics. Environment: KAFKA_BROKERS.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use shared::kafka::KafkaSettings;

#[tokio::main]
async fn main() {
    let prefix = std::env::args().nth(1).unwrap_or_default();
    if !prefix.starts_with("bench_") {
        eprintln!("usage: drop_topics bench_<run> (only benchmark topics are deleted)");
        std::process::exit(2);
    }
    let settings = KafkaSettings::from_env().expect("Kafka settings");
    let admin: AdminClient<DefaultClientContext> =
        settings.client_config().create().expect("an admin client");
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("the cluster's topics");
    let names: Vec<&str> = metadata
        .topics()
        .iter()
        .map(|t| t.name())
        .filter(|name| name.starts_with(&prefix))
        .collect();
    if names.is_empty() {
        return;
    }
    match admin.delete_topics(&names, &AdminOptions::new()).await {
        Ok(results) => {
            for result in results {
                match result {
                    Ok(name) => eprintln!("deleted {name}"),
                    Err((name, e)) => eprintln!("could not delete {name}: {e}"),
                }
            }
        }
        Err(e) => eprintln!("could not delete the topics: {e}"),
    }
}
