//! SPEC §12 against the secured endpoints `scripts/stack` serves: Kafka over SASL_SSL with
//! SCRAM-SHA-512 and Postgres over TLS with `sslmode=verify-full`, both with the local CA. The
//! real binaries; the variables come from `scripts/stack up` (scripts/test exports them).

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::events::{customer, subscription, with, Event, Item, DAY, PRO, T0, TEAM};
use common::{binary, unique, Endpoints, Options, Pipeline};
use serde_json::json;

/// How long a misconfigured service may take to give up (SPEC §12: "within seconds").
const FAIL_FAST: Duration = Duration::from_secs(15);

fn secured() -> Endpoints {
    Endpoints::secured()
}

/// The secured Kafka variables with the password replaced by `password`.
fn kafka_env_with_password(password: &str) -> Vec<(String, String)> {
    let mut env = secured().kafka_env;
    env.push(("KAFKA_SASL_PASSWORD".to_owned(), password.to_owned()));
    env
}

/// Runs a binary that must refuse to start; returns its stderr once it has exited, or fails
/// the test if it is still running after `FAIL_FAST`.
fn run_until_it_gives_up(name: &str, args: &[&str], env: &[(String, String)]) -> String {
    let mut child = Command::new(binary(name))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > FAIL_FAST {
            let _ = child.kill();
            let _ = child.wait();
            let mut stderr = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
            panic!("{name} still starting after {FAIL_FAST:?}:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "{name} exited 0:\n{stderr}");
    stderr
}

fn ingest_env(kafka_env: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut env = kafka_env;
    env.extend([
        (
            "STRIPE_WEBHOOK_SECRETS".to_owned(),
            "whsec_secure_e2e".to_owned(),
        ),
        ("INGEST_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        ("STRIPE_EVENTS_TOPIC".to_owned(), unique("secure.events")),
        ("DLQ_TOPIC".to_owned(), unique("secure.dlq")),
    ]);
    env
}

fn projector_env(kafka_env: Vec<(String, String)>, database_url: &str) -> Vec<(String, String)> {
    let mut env = kafka_env;
    env.extend([
        ("DATABASE_URL".to_owned(), database_url.to_owned()),
        ("PROJECTOR_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        ("API_AUTH".to_owned(), "disabled".to_owned()),
        ("STRIPE_EVENTS_TOPIC".to_owned(), unique("secure.events")),
        ("ENTITLEMENTS_TOPIC".to_owned(), unique("secure.changes")),
        ("DLQ_TOPIC".to_owned(), unique("secure.dlq")),
    ]);
    env
}

/// The single line that explains the failure: the one naming Kafka or Postgres.
fn failure_line<'a>(stderr: &'a str, needle: &str) -> &'a str {
    stderr
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with `{needle}` in:\n{stderr}"))
}

#[tokio::test]
async fn a_subscription_lifecycle_converges_over_sasl_ssl_kafka_and_tls_postgres() {
    let mut pipeline = Pipeline::start(Options {
        endpoints: secured(),
        ..Options::default()
    })
    .await;
    let (c, s) = ("cus_secure1", "sub_secure1");
    let sub =
        |status: &str, items: &[Item<'_>]| subscription(s, c, status, items, T0 + 30 * DAY, true);
    let events = [
        Event::new("evt_sec_1", "customer.created", T0, customer(c, false)),
        Event::new(
            "evt_sec_2",
            "customer.subscription.created",
            T0 + 1,
            sub("active", &[PRO]),
        ),
        Event::new(
            "evt_sec_3",
            "customer.subscription.updated",
            T0 + DAY,
            sub("active", &[TEAM]),
        ),
        Event::new(
            "evt_sec_4",
            "customer.subscription.deleted",
            T0 + 2 * DAY,
            with(sub("canceled", &[TEAM]), "canceled_at", json!(T0 + 2 * DAY)),
        ),
    ];

    // One at a time, so that each step is its own batch and its own change message.
    let mut features = Vec::new();
    for event in &events {
        pipeline.apply(&[event.body()]).await;
        features.push(pipeline.entitlements(c, None).await["features"].clone());
    }
    assert_eq!(
        features,
        [json!([]), json!(["api", "pro"]), json!(["team"]), json!([])],
        "features after each event"
    );

    // The customer with nothing, pro+api, team instead, nothing again: one message each.
    let changes: Vec<serde_json::Value> = pipeline
        .changes()
        .into_iter()
        .filter(|(key, _)| key.as_deref() == Some(c))
        .map(|(_, body)| body["features"].clone())
        .collect();
    assert_eq!(
        changes,
        [json!([]), json!(["api", "pro"]), json!(["team"]), json!([])],
        "change messages"
    );

    // The projector's own connections to its database are TLS ones.
    let mut db = pipeline.db().await;
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut db)
        .await
        .unwrap();
    let plaintext: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = $1 AND a.pid <> pg_backend_pid() AND NOT s.ssl",
    )
    .bind(&database)
    .fetch_one(&mut db)
    .await
    .unwrap();
    let encrypted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = $1 AND a.pid <> pg_backend_pid() AND s.ssl",
    )
    .bind(&database)
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(plaintext, 0, "plaintext connections to {database}");
    assert!(
        encrypted > 0,
        "no TLS connection of the projector to {database}"
    );
}

#[test]
fn a_wrong_kafka_password_stops_ingest_and_the_projector_within_seconds_without_printing_it() {
    let password = format!("wrong-{}", unique("pw"));
    for (name, args, env) in [
        (
            "ingest",
            &[][..],
            ingest_env(kafka_env_with_password(&password)),
        ),
        (
            "projector",
            &["run"][..],
            projector_env(
                kafka_env_with_password(&password),
                &secured().admin_database_url,
            ),
        ),
    ] {
        let stderr = run_until_it_gives_up(name, args, &env);
        let line = failure_line(&stderr, "SASL authentication failed");
        let broker = std::env::var("KAFKA_SECURE_BROKERS").unwrap();
        assert!(line.contains(&format!("kafka {broker}")), "{name}: {line}");
        assert!(line.contains("KAFKA_SASL_PASSWORD"), "{name}: {line}");
        assert!(
            !stderr.contains(&password),
            "{name} printed the password:\n{stderr}"
        );
    }
}

#[test]
fn a_plaintext_client_on_the_tls_listener_stops_within_seconds_naming_the_protocol() {
    let plaintext = vec![(
        "KAFKA_BROKERS".to_owned(),
        std::env::var("KAFKA_SECURE_BROKERS").unwrap(),
    )];
    for (name, args, env) in [
        ("ingest", &[][..], ingest_env(plaintext.clone())),
        (
            "projector",
            &["run"][..],
            projector_env(plaintext.clone(), &secured().admin_database_url),
        ),
    ] {
        let stderr = run_until_it_gives_up(name, args, &env);
        let line = failure_line(&stderr, "KAFKA_SECURITY_PROTOCOL");
        assert!(line.contains("TLS listener"), "{name}: {line}");
    }
}

#[test]
fn postgres_with_verify_full_and_a_wrong_ca_stops_the_projector_without_printing_the_url() {
    // A CA of our own that did not sign the server's certificate.
    let dir = std::env::temp_dir().join(unique("wrong-ca"));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-days", "1",
        ])
        .args(["-subj", "/CN=not the stack's CA", "-keyout"])
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(&ca)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(made.success(), "openssl could not make a CA");
    let tls_url = secured().admin_database_url;
    let (base, _) = tls_url.split_once('?').unwrap();
    let wrong = format!("{base}?sslmode=verify-full&sslrootcert={}", ca.display());

    let stderr = run_until_it_gives_up(
        "projector",
        &["run"],
        &projector_env(secured().kafka_env, &wrong),
    );
    let line = failure_line(&stderr, "Postgres");
    assert!(line.contains("certificate"), "{line}");
    assert!(
        !stderr.contains("postgres://"),
        "the URL (with its password) was printed:\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
