//! Several `projector run` instances on one database and consumer group, through the real
//! binaries (SPEC §12): one outbox relay leader at a time, instances SIGKILLed and restarted
//! while changes stream in, redrive racing live on the same customers, and a row Kafka can never
//! take parked while the rows behind it flow.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use sqlx::PgConnection;

use common::events::*;
use common::*;

const T0: i64 = 1_767_225_600;
const MONTH: i64 = 2_592_000;
const PRO: Item<'static> = ("price_pro_month", "prod_pro", None);
const TEAM: Item<'static> = ("price_team_month", "prod_team", None);

/// Polls until the stored offsets cover `records` records.
async fn wait_until_applied(pipeline: &Pipeline, records: u64, within: Duration) {
    let mut db = pipeline.db().await;
    let deadline = Instant::now() + within;
    loop {
        let applied = applied_records(&mut db, &pipeline.events_topic).await;
        if applied >= records {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {applied} of {records} records applied within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One instance's `projector_relay_leader` gauge; `None` when it does not answer.
async fn relay_leader(client: &reqwest::Client, instance: &Service) -> Option<bool> {
    let text = client
        .get(format!("http://127.0.0.1:{}/metrics", instance.port))
        .bearer_auth(TOKEN)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let line = text
        .lines()
        .find(|l| l.starts_with("projector_relay_leader "))?;
    Some(line.ends_with(" 1"))
}

/// Polls the instances until exactly one reports itself the relay leader; returns its index.
/// At no sample do two lead at once.
async fn the_leader(client: &reqwest::Client, instances: &[Service], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let mut leaders = Vec::new();
        for (i, instance) in instances.iter().enumerate() {
            if relay_leader(client, instance).await == Some(true) {
                leaders.push(i);
            }
        }
        assert!(
            leaders.len() <= 1,
            "instances {leaders:?} all relay the outbox"
        );
        if let [leader] = leaders[..] {
            return leader;
        }
        assert!(
            Instant::now() < deadline,
            "no instance took the relay lead within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Queues an outbox row for `topic` directly, as a projection would; returns its id. Queued
/// after a leader's death, only its successor can publish it.
async fn queue_outbox_row(db: &mut PgConnection, topic: &str, key: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO outbox (topic, key, payload) VALUES ($1, $2, '{}'::bytea) RETURNING id",
    )
    .bind(topic)
    .bind(key)
    .fetch_one(db)
    .await
    .unwrap()
}

/// How long the relay took over from a SIGKILLed leader: until another session held the lock,
/// and until a row queued after the death was published.
struct Takeover {
    lock: Duration,
    published: Duration,
}

/// Polls, from `killed` on, until a lock session other than `dead` holds the relay lock and
/// outbox row `row` is published.
async fn takeover(
    db: &mut PgConnection,
    dead: Option<i32>,
    row: i64,
    killed: Instant,
    within: Duration,
) -> Takeover {
    let mut lock = None;
    loop {
        if lock.is_none() && lock_holder(&mut *db).await.is_some_and(|h| Some(h) != dead) {
            lock = Some(killed.elapsed());
        }
        let published: bool =
            sqlx::query_scalar("SELECT published_at IS NOT NULL FROM outbox WHERE id = $1")
                .bind(row)
                .fetch_one(&mut *db)
                .await
                .unwrap();
        if published {
            let published = killed.elapsed();
            return Takeover {
                // Taken between two polls at the latest.
                lock: lock.unwrap_or(published),
                published,
            };
        }
        assert!(
            killed.elapsed() < within,
            "no other instance published a row within {within:?} of the leader's death \
             (lock taken after {lock:?})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts that the last change message of each customer is the API's object.
async fn last_messages_equal_the_api(
    pipeline: &Pipeline,
    last: &BTreeMap<String, Value>,
    customers: &[String],
) {
    for customer in customers {
        let mut view = pipeline.entitlements(customer, None).await;
        let mut message = last
            .get(customer)
            .unwrap_or_else(|| panic!("no change message for {customer}"))
            .clone();
        // `updated_at` follows every event without a new version.
        for field in ["type", "added", "removed", "cause", "updated_at"] {
            message.as_object_mut().unwrap().remove(field);
        }
        view.as_object_mut().unwrap().remove("updated_at");
        assert_eq!(
            message, view,
            "the last change message of {customer} is not the API's object"
        );
    }
}

/// Features of one subscription in `status` with `items` under the scenarios' mapping (SPEC §7,
/// `past_due = "grant"`).
fn features_of(status: &str, items: &[Item<'_>]) -> Vec<&'static str> {
    if !matches!(status, "active" | "trialing" | "past_due") {
        return Vec::new();
    }
    let mut features = BTreeSet::new();
    for (price, product, _) in items {
        if *product == "prod_pro" {
            features.extend(["api", "pro"]);
        }
        if *price == "price_team_month" {
            features.insert("team");
        }
    }
    features.into_iter().collect()
}

const CHAOS_CUSTOMERS: usize = 120;
const CHAOS_STEPS: usize = 12;
const CHAOS_WAVES: usize = 3;

/// Step `step` of customer `i`: every step changes the features or the status.
fn chaos_step(i: usize, step: usize) -> (&'static str, Vec<Item<'static>>) {
    let items = match step % 3 {
        0 => vec![PRO],
        1 => vec![TEAM],
        _ => vec![PRO, TEAM],
    };
    let status = if step + 1 == CHAOS_STEPS {
        ["active", "canceled", "trialing"][i % 3]
    } else {
        ["active", "past_due", "active", "unpaid"][step % 4]
    };
    (status, items)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_killed_and_restarted_converge_and_end_each_key_on_its_newest_version() {
    // Arrange: three instances in one group; small batches keep consumption going while
    // instances die.
    let options = Options {
        extra_env: vec![("BATCH_MAX_EVENTS".to_owned(), "20".to_owned())],
        ..Options::default()
    };
    let mut pipeline = Pipeline::start(options).await;
    let first = pipeline.projector.take().expect("projector started");
    let mut instances = vec![
        first,
        pipeline.spawn_projector(),
        pipeline.spawn_projector(),
    ];
    let client = reqwest::Client::new();
    let customers: Vec<String> = (0..CHAOS_CUSTOMERS)
        .map(|i| format!("cus_chaos_{i:03}"))
        .collect();
    // Waves of steps: wave w carries steps [w*S/W, (w+1)*S/W) of every customer, so every
    // customer keeps changing while instances die.
    let mut waves: Vec<Vec<String>> = vec![Vec::new(); CHAOS_WAVES];
    for (i, customer_id) in customers.iter().enumerate() {
        waves[0].push(
            Event::new(
                &format!("evt_chaos_{i:03}_c"),
                "customer.created",
                T0,
                customer(customer_id, false),
            )
            .body(),
        );
        for step in 0..CHAOS_STEPS {
            let (status, items) = chaos_step(i, step);
            let object = subscription(
                &format!("sub_chaos_{i:03}"),
                customer_id,
                status,
                &items,
                T0 + MONTH,
                true,
            );
            let event_type = if step == 0 {
                "customer.subscription.created"
            } else {
                "customer.subscription.updated"
            };
            waves[step * CHAOS_WAVES / CHAOS_STEPS].push(
                Event::new(
                    &format!("evt_chaos_{i:03}_{step:02}"),
                    event_type,
                    T0 + 10 + step as i64 * 10,
                    object,
                )
                .body(),
            );
        }
    }
    let total: u64 = waves.iter().map(|w| w.len() as u64).sum();
    let url = pipeline.ingest_url();
    let mut db = pipeline.db().await;

    // Act: each wave streams in; while the log is being consumed, one instance is SIGKILLed
    // (the relay leader on the even waves) and a fresh one started in its place.
    let mut sent = 0u64;
    let mut takeovers = Vec::new();
    for (w, wave) in waves.iter().enumerate() {
        let kill_at = sent + wave.len() as u64 / 3;
        let (sent_now, ()) = tokio::join!(send_concurrently(&client, &url, wave), async {
            wait_until_applied(&pipeline, kill_at, Duration::from_secs(40)).await;
            let leader = the_leader(&client, &instances, Duration::from_secs(10)).await;
            let victim = if w % 2 == 0 {
                leader
            } else {
                (leader + 1) % instances.len()
            };
            let dead = lock_holder(&mut db).await;
            let killed = Instant::now();
            instances[victim].kill();
            if victim == leader {
                // A row of the DLQ topic (not asserted below): the changes themselves may stall
                // for the consumer group's session timeout (10 s) when the dead instance's
                // partitions hold the only events left, which is no measure of the relay.
                let row = queue_outbox_row(&mut db, &pipeline.dlq_topic, "takeover").await;
                takeovers.push(takeover(&mut db, dead, row, killed, Duration::from_secs(15)).await);
            }
            instances[victim] = tokio::task::block_in_place(|| pipeline.spawn_projector());
        });
        sent += sent_now;
    }
    pipeline.appended = sent;
    pipeline.settle().await;

    // Assert: exactly one leader among the instances now running.
    the_leader(&client, &instances, Duration::from_secs(10)).await;
    pipeline.projector = Some(instances.remove(0));
    for takeover in &takeovers {
        eprintln!(
            "relay takeover: leader SIGKILLed -> lock taken by another instance in {} ms, \
             a row queued after the death published in {} ms",
            takeover.lock.as_millis(),
            takeover.published.as_millis()
        );
    }
    assert_eq!(total, sent);
    assert_eq!(takeovers.len(), CHAOS_WAVES.div_ceil(2));
    // Postgres ends the killed leader's session when its socket closes, and a follower retries
    // every second: about a second, with room for a loaded machine.
    for takeover in &takeovers {
        assert!(
            takeover.published < Duration::from_secs(5),
            "takeover took {:?} (lock after {:?})",
            takeover.published,
            takeover.lock
        );
    }

    // Assert: the API holds each customer's last step.
    for (i, customer_id) in customers.iter().enumerate() {
        let (status, items) = chaos_step(i, CHAOS_STEPS - 1);
        let view = pipeline.entitlements(customer_id, None).await;
        assert_eq!(
            view["features"],
            json!(features_of(status, &items)),
            "{customer_id}"
        );
        assert_eq!(view["subscriptions"][0]["status"], status, "{customer_id}");
    }

    // Assert: the change topic ends every key on the newest version, which is the API's object,
    // and no (customer, version) carries two objects.
    let last = last_change_per_key(&pipeline.changes());
    assert_eq!(
        last.keys().cloned().collect::<BTreeSet<_>>(),
        customers.iter().cloned().collect::<BTreeSet<_>>()
    );
    last_messages_equal_the_api(&pipeline, &last, &customers).await;
}

const RACE_ROUNDS: usize = 6;
const RACE_CUSTOMERS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redrive_racing_live_on_the_same_customers_leaves_no_stale_features_and_no_duplicate_version(
) {
    // Arrange: small live batches, so live is mid-transaction on these customers most of the
    // time the redrive runs.
    let options = Options {
        extra_env: vec![("BATCH_MAX_EVENTS".to_owned(), "4".to_owned())],
        ..Options::default()
    };
    let mut pipeline = Pipeline::start(options).await;
    let client = reqwest::Client::new();
    let url = pipeline.ingest_url();
    let mut all_customers = Vec::new();
    let mut expected: BTreeMap<String, Value> = BTreeMap::new();
    for round in 0..RACE_ROUNDS {
        let t = T0 + round as i64 * 1_000;
        // Half the customers hold a team subscription already; the other half are new (no
        // entitlements row yet).
        let existing: Vec<String> = (0..RACE_CUSTOMERS)
            .map(|i| format!("cus_race_{round}_{i:02}_old"))
            .collect();
        let fresh: Vec<String> = (0..RACE_CUSTOMERS)
            .map(|i| format!("cus_race_{round}_{i:02}_new"))
            .collect();
        let setup: Vec<String> = existing
            .iter()
            .map(|c| {
                Event::new(
                    &format!("evt_setup_{c}"),
                    "customer.subscription.created",
                    t,
                    subscription(&format!("sub_{c}"), c, "active", &[TEAM], t + MONTH, true),
                )
                .body()
            })
            .collect();
        pipeline.appended += send_concurrently(&client, &url, &setup).await;
        pipeline.settle().await;

        // Dead letters, as an older projector version would have recorded them: a paid one-time
        // purchase of pro for every customer of the round.
        let mut db = pipeline.db().await;
        for (n, c) in existing.iter().chain(&fresh).enumerate() {
            let body = Event::new(
                &format!("evt_once_{c}"),
                "checkout.session.completed",
                t + 5,
                checkout_session(
                    &format!("cs_once_{c}"),
                    c,
                    None,
                    "payment",
                    "paid",
                    None,
                    json!({"product": "prod_pro"}),
                ),
            )
            .body();
            sqlx::query(
                "INSERT INTO dead_letters (event_id, event_type, topic, partition, \"offset\", reason, message, payload)
                 VALUES ($1, 'checkout.session.completed', $2, 0, $3, 'unexpected_shape',
                         'rejected by an older projector version', $4)",
            )
            .bind(format!("evt_once_{c}"))
            .bind(&pipeline.events_topic)
            .bind(1_000_000 + (round * 1_000 + n) as i64)
            .bind(body.as_bytes())
            .execute(&mut db)
            .await
            .unwrap();
        }
        // Live, at the same time: the existing subscriptions are cancelled, the new customers
        // subscribe to team.
        let mut live: Vec<String> = Vec::new();
        for (old, new) in existing.iter().zip(&fresh) {
            live.push(
                Event::new(
                    &format!("evt_cancel_{old}"),
                    "customer.subscription.deleted",
                    t + 10,
                    subscription(
                        &format!("sub_{old}"),
                        old,
                        "canceled",
                        &[TEAM],
                        t + MONTH,
                        true,
                    ),
                )
                .body(),
            );
            live.push(
                Event::new(
                    &format!("evt_join_{new}"),
                    "customer.subscription.created",
                    t + 10,
                    subscription(
                        &format!("sub_{new}"),
                        new,
                        "active",
                        &[TEAM],
                        t + MONTH,
                        true,
                    ),
                )
                .body(),
            );
            expected.insert(old.clone(), json!(["api", "pro"]));
            expected.insert(new.clone(), json!(["api", "pro", "team"]));
        }

        // Act: the redrive starts once live has applied a fifth of the round's events.
        let start_redrive_at = pipeline.appended + live.len() as u64 / 5;
        let (sent, output) = tokio::join!(send_concurrently(&client, &url, &live), async {
            wait_until_applied(&pipeline, start_redrive_at, Duration::from_secs(30)).await;
            tokio::task::block_in_place(|| pipeline.projector_command(&["redrive"]))
        });
        assert!(
            output.status.success(),
            "redrive failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        pipeline.appended += sent;
        pipeline.settle().await;
        all_customers.extend(existing);
        all_customers.extend(fresh);
    }

    // Assert: nobody keeps the cancelled team, nobody lost the purchase or the new subscription.
    let mut wrong = Vec::new();
    for customer in &all_customers {
        let view = pipeline.entitlements(customer, None).await;
        if view["features"] != expected[customer] {
            wrong.push(format!(
                "{customer}: {} instead of {}",
                view["features"], expected[customer]
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} customers hold stale features:\n{}",
        wrong.len(),
        all_customers.len(),
        wrong.join("\n")
    );
    // Assert: every version issued once, the last message of each key its newest version.
    let last = last_change_per_key(&pipeline.changes());
    last_messages_equal_the_api(&pipeline, &last, &all_customers).await;
}

/// Random base64-ish text that compression cannot shrink much (xorshift64, fixed seed).
fn incompressible(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ALPHABET[(seed % 64) as usize] as char
        })
        .collect()
}

/// A `customer.subscription.updated` whose subscription has no `status` (a dead letter),
/// padded with `padding` bytes of metadata.
fn dead_letter_body(id: &str, customer: &str, padding: usize) -> String {
    let mut object = subscription(
        &format!("sub_{customer}"),
        customer,
        "active",
        &[PRO],
        T0 + MONTH,
        true,
    );
    object.as_object_mut().unwrap().remove("status");
    object["metadata"] = json!({"note": incompressible(padding)});
    Event::new(id, "customer.subscription.updated", T0 + 20, object).body()
}

#[tokio::test]
async fn an_outbox_row_too_large_for_the_topic_is_parked_and_the_rows_behind_it_are_published() {
    // Arrange: the DLQ topic takes at most 20 kB per message.
    let mut pipeline = Pipeline::start(Options::default()).await;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let limit = AlterConfig::new(ResourceSpecifier::Topic(&pipeline.dlq_topic))
        .set("max.message.bytes", "20000");
    let results = admin
        .alter_configs(&[limit], &AdminOptions::new())
        .await
        .unwrap();
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");

    // Act: a 60 kB dead letter, then a small one and a real change.
    pipeline
        .send_all(&[
            dead_letter_body("evt_big", "cus_park", 60_000),
            dead_letter_body("evt_small", "cus_park", 10),
            Event::new(
                "evt_sub",
                "customer.subscription.created",
                T0 + 30,
                subscription("sub_ok", "cus_park", "active", &[PRO], T0 + MONTH, true),
            )
            .body(),
        ])
        .await;
    pipeline.settle().await;

    // Assert: the large row is parked with its reason and counted; the rest went out.
    let parked = pipeline
        .table("SELECT key, park_reason FROM outbox WHERE parked_at IS NOT NULL ORDER BY id")
        .await;
    assert_eq!(
        parked,
        vec![json!({"key": "evt_big", "park_reason": "message_too_large"})]
    );
    let dlq: Vec<String> = read_topic(&pipeline.dlq_topic, 1, Duration::from_secs(20))
        .iter()
        .map(|m| {
            use rdkafka::message::Message;
            String::from_utf8(m.key().unwrap_or_default().to_vec()).unwrap()
        })
        .collect();
    assert_eq!(dlq, vec!["evt_small".to_owned()]);
    assert_eq!(
        pipeline.entitlements("cus_park", None).await["features"],
        json!(["api", "pro"])
    );
    let changes = pipeline.changes();
    assert_eq!(changes.len(), 1, "{changes:?}");
    let metrics = pipeline.metrics().await;
    assert!(
        metrics.contains("projector_outbox_parked_total{reason=\"message_too_large\"} 1"),
        "{metrics}"
    );
}

/// The backend pid of the relay leader's lock connection in this pipeline's database.
async fn lock_holder(db: &mut PgConnection) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()
           AND a.application_name = 'projector-relay-leader'",
    )
    .fetch_optional(db)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lock_connection_is_cut_hands_over_and_messages_keep_flowing() {
    // Arrange: two instances, one of them leading.
    let mut pipeline = Pipeline::start(Options::default()).await;
    let other = pipeline.spawn_projector();
    let client = reqwest::Client::new();
    let mut db = pipeline.db().await;
    let instances = [pipeline.projector.take().unwrap(), other];
    the_leader(&client, &instances, Duration::from_secs(10)).await;
    let first = lock_holder(&mut db).await.expect("a leader holds the lock");

    // Act: Postgres ends the leader's lock session (a failover, a network cut, an admin).
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(first)
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert!(terminated);

    // Assert: a new lock session leads within seconds, and never two at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    let second = loop {
        if let Some(pid) = lock_holder(&mut db).await.filter(|pid| *pid != first) {
            break pid;
        }
        assert!(Instant::now() < deadline, "nobody took the lead again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_ne!(first, second);
    the_leader(&client, &instances, Duration::from_secs(10)).await;
    let [one, two] = instances;
    pipeline.projector = Some(one);
    pipeline
        .send(
            &Event::new(
                "evt_after_cut",
                "customer.subscription.created",
                T0,
                subscription("sub_cut", "cus_cut", "active", &[PRO], T0 + MONTH, true),
            )
            .body(),
        )
        .await;
    pipeline.settle().await;
    let changes = pipeline.changes();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].1["features"], json!(["api", "pro"]));
    drop(two);
}

/// Sends a signal to a service's process.
fn signal(instance: &Service, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &instance.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_loses_the_lead_to_another_instance_and_steps_down_when_it_resumes() {
    // Arrange: two instances, one of them leading.
    let mut pipeline = Pipeline::start(Options::default()).await;
    let other = pipeline.spawn_projector();
    let client = reqwest::Client::new();
    let mut instances = vec![pipeline.projector.take().unwrap(), other];
    let frozen = the_leader(&client, &instances, Duration::from_secs(10)).await;
    let successor = 1 - frozen;

    // Act: the leader stops answering anything (SIGSTOP: a stuck VM, a long pause), its
    // sockets stay open, so only the lease can free the lock.
    signal(&instances[frozen], "STOP");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(25);
    while relay_leader(&client, &instances[successor]).await != Some(true) {
        assert!(
            Instant::now() < deadline,
            "the other instance did not take the lead from a frozen leader"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "relay takeover from a frozen leader: {} ms",
        started.elapsed().as_millis()
    );
    signal(&instances[frozen], "CONT");

    // Assert: the resumed instance follows, and exactly one leads.
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay_leader(&client, &instances[frozen]).await != Some(false) {
        assert!(
            Instant::now() < deadline,
            "the resumed ex-leader still claims the lead"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        the_leader(&client, &instances, Duration::from_secs(5)).await,
        successor
    );
    pipeline.projector = Some(instances.remove(successor));
    pipeline
        .send(
            &Event::new(
                "evt_after_freeze",
                "customer.subscription.created",
                T0,
                subscription(
                    "sub_freeze",
                    "cus_freeze",
                    "active",
                    &[TEAM],
                    T0 + MONTH,
                    true,
                ),
            )
            .body(),
        )
        .await;
    pipeline.settle().await;
    let changes = pipeline.changes();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].1["features"], json!(["team"]));
}
