//! The ceiling that ingest is measured against: actix-web, Stripe signature verification,
//! envelope parse and an acknowledged produce with the same producer settings as ingest
//! (`shared::kafka::durable_producer_config`), and nothing else: no metrics, no tracing span,
//! no record headers, no body limit checks. `scripts/bench` runs it in the same run as the real
//! ingest, with the same load.
//!
//! Options switch single costs back on, to measure each one alone:
//!
//!   cargo run --release -p ingest --example ceiling -- [options]
//!     --workers N        actix workers (default: actix's, one per core)
//!     --headers          build the record headers of SPEC §5, as ingest does
//!     --span             a tracing span per request, as ingest has (with a subscriber at warn)
//!     --set key=value    a producer setting over the shared ones (e.g. linger.ms=0); repeatable
//!     --no-produce       answer after verify and parse, without Kafka: the floor of HTTP and
//!                        scheduling on this machine, under which neither program can go
//!     --nodelay          TCP_NODELAY on the accepted connections
//!
//! Environment: KAFKA_BROKERS, STRIPE_WEBHOOK_SECRETS (one secret), CEILING_ADDR
//! (default 127.0.0.1:0; the bound port is printed), CEILING_TOPIC (default bench_ceiling).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use secrecy::SecretString;
use shared::kafka::{durable_producer_config, ensure_topics, TopicSpec};
use shared::EventEnvelope;

struct Ceiling {
    producer: FutureProducer,
    topic: String,
    secrets: Vec<SecretString>,
    headers: bool,
    span: bool,
    produce: bool,
}

async fn webhook(
    request: HttpRequest,
    body: web::Bytes,
    state: web::Data<Ceiling>,
) -> HttpResponse {
    let span = state
        .span
        .then(|| tracing::info_span!("webhook", event_id = tracing::field::Empty).entered());
    let Some(Ok(header)) = request
        .headers()
        .get("Stripe-Signature")
        .map(|h| h.to_str())
    else {
        return HttpResponse::BadRequest().finish();
    };
    let received_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    if ingest::signature::verify(&body, header, &state.secrets, 300, received_at / 1000).is_err() {
        return HttpResponse::BadRequest().finish();
    }
    let Ok(event) = EventEnvelope::parse(&body) else {
        return HttpResponse::BadRequest().finish();
    };
    let key = event.partition_key();
    let mut record = FutureRecord::to(&state.topic).key(&key).payload(&body[..]);
    if state.headers {
        let created = event.created.to_string();
        let received = received_at.to_string();
        let h = |key, value| Header {
            key,
            value: Some(value),
        };
        let mut headers = OwnedHeaders::new_with_capacity(9)
            .insert(h("stripe-event-id", event.id))
            .insert(h("stripe-event-type", event.event_type))
            .insert(h("stripe-created", &created))
            .insert(h(
                "stripe-livemode",
                if event.livemode { "true" } else { "false" },
            ));
        if let Some(version) = event.api_version {
            headers = headers.insert(h("stripe-api-version", version));
        }
        headers = headers
            .insert(h("stripe-signature", header))
            .insert(h("received-at", &received))
            .insert(h("stripe-source", "webhook"));
        record = record.headers(headers);
    }
    let id = event.id.to_owned();
    drop(span);
    if !state.produce {
        return HttpResponse::Ok().json(serde_json::json!({"received": true, "id": id}));
    }
    match state.producer.send(record, Duration::from_secs(10)).await {
        Ok(_) => HttpResponse::Ok().json(serde_json::json!({"received": true, "id": id})),
        Err(_) => HttpResponse::ServiceUnavailable().finish(),
    }
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let mut workers = None;
    let mut headers = false;
    let mut span = false;
    let mut produce = true;
    let mut nodelay = false;
    let mut overrides = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--workers" => workers = args.next().and_then(|w| w.parse::<usize>().ok()),
            "--headers" => headers = true,
            "--span" => span = true,
            "--no-produce" => produce = false,
            "--nodelay" => nodelay = true,
            "--set" => {
                let setting = args.next().unwrap_or_default();
                let (k, v) = setting.split_once('=').expect("--set key=value");
                overrides.push((k.to_owned(), v.to_owned()));
            }
            other => panic!("unknown option {other}"),
        }
    }
    if span {
        tracing_subscriber_init();
    }
    let kafka = shared::kafka::KafkaSettings::from_env().expect("Kafka settings");
    let record_bytes =
        shared::limits::ingest_record_max_bytes(shared::limits::DEFAULT_MAX_BODY_BYTES);
    let secret = std::env::var("STRIPE_WEBHOOK_SECRETS").expect("STRIPE_WEBHOOK_SECRETS");
    let addr = std::env::var("CEILING_ADDR").unwrap_or_else(|_| "127.0.0.1:0".into());
    let topic = std::env::var("CEILING_TOPIC").unwrap_or_else(|_| "bench_ceiling".into());
    ensure_topics(
        &kafka,
        &[TopicSpec::event_log(&topic, 6)],
        Duration::from_secs(30),
    )
    .await
    .expect("the ceiling's topic");
    let mut config = durable_producer_config(&kafka, Duration::from_secs(10), record_bytes);
    for (k, v) in &overrides {
        config.set(k, v);
    }
    let state = web::Data::new(Ceiling {
        producer: config.create().expect("a producer"),
        topic,
        secrets: vec![SecretString::from(secret)],
        headers,
        span,
        produce,
    });
    let listener = std::net::TcpListener::bind(&addr)?;
    println!("ceiling listening on {}", listener.local_addr()?);
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/webhooks/stripe", web::post().to(webhook))
    })
    .keep_alive(Duration::from_secs(75));
    if let Some(workers) = workers {
        server = server.workers(workers);
    }
    if nodelay {
        server = server.tcp_nodelay(true);
    }
    server.listen(listener)?.run().await
}

/// The same subscriber ingest installs (`RUST_LOG`, default `info`), so that a span costs what
/// it costs there.
fn tracing_subscriber_init() {
    if let Err(e) = shared::telemetry::init() {
        eprintln!("ceiling: {e}");
    }
}
