//! Hostile input against the real `ingest` binary and the real Kafka broker: bodies over the
//! limit (declared, streamed, 100 MB), slow-loris heads and bodies, huge and repeated headers,
//! non-UTF-8 bytes, deeply nested JSON, replayed and transplanted signatures, and a flood of bad
//! requests while good ones keep being stored. Every rejection has its stable code, and the
//! server keeps serving after each.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::Message;
use rdkafka::ClientConfig;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_BODY_BYTES: usize = 1_048_576;

/// A response read off a raw connection.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    body: String,
}

impl RawResponse {
    fn error_code(&self) -> Option<String> {
        serde_json::from_str::<Value>(&self.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
    }
}

fn addr(ingest: &Ingest) -> String {
    ingest.base_url.trim_start_matches("http://").to_owned()
}

fn connect(ingest: &Ingest) -> TcpStream {
    let stream = TcpStream::connect(addr(ingest)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

/// Reads one response (head and a body of `Content-Length`, or up to EOF).
fn read_response(stream: &mut TcpStream) -> std::io::Result<RawResponse> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(end) = find(&buffer, b"\r\n\r\n") {
            break end + 4;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                format!(
                    "closed before a response head; got {:?}",
                    String::from_utf8_lossy(&buffer)
                ),
            ));
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let length = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())
            .flatten()
    });
    let mut body = buffer[head_end..].to_vec();
    match length {
        Some(length) => {
            while body.len() < length {
                let n = stream.read(&mut chunk)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        }
        None => {
            let _ = stream.read_to_end(&mut body);
        }
    }
    Ok(RawResponse {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// POSTs `body` with `headers` on a fresh connection and reads the answer.
fn raw_post(ingest: &Ingest, headers: &[(&str, &str)], body: &[u8]) -> RawResponse {
    let mut stream = connect(ingest);
    let mut head = format!(
        "POST /webhooks/stripe HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        addr(ingest),
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("write head");
    // The server may answer and close before it has read everything (that is the point of
    // several tests): a failed write is then expected, the answer is what counts.
    let _ = stream.write_all(body);
    read_response(&mut stream).expect("response")
}

fn signed(body: &[u8]) -> String {
    ingest::signature::header_for(SECRET, now(), body)
}

fn good_event(id: &str) -> String {
    customer_created(id, &format!("cus_{id}"))
}

/// A good request must still be stored: signed, 200, with its id.
fn assert_good_request_is_stored(ingest: &Ingest, id: &str) {
    let body = good_event(id);
    let signature = signed(body.as_bytes());
    let response = raw_post(ingest, &[("Stripe-Signature", &signature)], body.as_bytes());
    assert_eq!(response.status, 200, "{response:?}");
    assert!(response.body.contains(id), "{response:?}");
}

/// Hex digits from a fixed-seed generator: incompressible enough that lz4 cannot hide a record
/// size problem, and reproducible.
fn incompressible(len: usize) -> String {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(b"0123456789abcdef"[(state % 16) as usize])
        })
        .collect()
}

/// A customer event of exactly `len` bytes, padded in its metadata.
fn event_of_size(id: &str, len: usize) -> String {
    let without_pad = event(
        id,
        "customer.created",
        json!({"id": "cus_big", "object": "customer", "metadata": {"pad": ""}}),
    );
    let pad = incompressible(len - without_pad.len());
    let body = event(
        id,
        "customer.created",
        json!({"id": "cus_big", "object": "customer", "metadata": {"pad": pad}}),
    );
    assert_eq!(body.len(), len, "the clock ticked while building the body");
    body
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

// ---------------------------------------------------------------------------------------------
// Sizes

#[tokio::test]
async fn a_verified_event_64_bytes_under_the_default_limit_is_stored_byte_for_byte() {
    let ingest = Ingest::start(&[]);
    let client = reqwest::Client::new();
    let body = event_of_size("evt_just_under", DEFAULT_MAX_BODY_BYTES - 64);

    let response = post_signed(&client, &ingest, &body).await;

    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let records = read_records(&ingest.events_topic, 1, WAIT);
    assert_eq!(records.len(), 1);
    assert!(
        records[0].payload() == Some(body.as_bytes()),
        "the stored value differs from the {} request bytes",
        body.len()
    );
}

#[tokio::test]
async fn one_byte_over_the_default_limit_gets_413_declared_or_chunked() {
    let ingest = Ingest::start(&[]);
    let body = event_of_size("evt_just_over", DEFAULT_MAX_BODY_BYTES + 1);
    let signature = signed(body.as_bytes());

    let declared = raw_post(
        &ingest,
        &[("Stripe-Signature", &signature)],
        body.as_bytes(),
    );

    assert_eq!(declared.status, 413, "{declared:?}");
    assert_eq!(declared.error_code().as_deref(), Some("payload_too_large"));

    // Without a length the body is counted while it is read.
    let client = reqwest::Client::new();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body
        .as_bytes()
        .chunks(64 * 1024)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let chunked = client
        .post(ingest.url("/webhooks/stripe"))
        .header("Stripe-Signature", &signature)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .expect("chunked request");
    assert_eq!(chunked.status(), 413);
    let answer: Value = chunked.json().await.unwrap();
    assert_eq!(answer["error"], "payload_too_large");
    assert!(read_records(&ingest.events_topic, 1, Duration::from_secs(2)).is_empty());
}

#[test]
fn an_existing_topic_too_small_for_max_body_bytes_stops_start_up_naming_the_variable() {
    let topic = unique("e2e-small-topic");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()
            .unwrap();
        let new_topic = NewTopic::new(&topic, 1, TopicReplication::Fixed(1))
            .set("max.message.bytes", "1000000");
        let results = admin
            .create_topics(&[new_topic], &AdminOptions::new())
            .await
            .unwrap();
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    });

    let output = Command::new(env!("CARGO_BIN_EXE_ingest"))
        .env_clear()
        .env("KAFKA_BROKERS", brokers())
        .env("STRIPE_WEBHOOK_SECRETS", SECRET)
        .env("INGEST_ADDR", "127.0.0.1:0")
        .env("STRIPE_EVENTS_TOPIC", &topic)
        .env("DLQ_TOPIC", unique("e2e-dlq"))
        .env("RUST_LOG", "off")
        .stdout(Stdio::null())
        .output()
        .expect("run ingest");

    assert!(
        !output.status.success(),
        "ingest started on a topic too small"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("MAX_BODY_BYTES"))
        .unwrap_or_else(|| panic!("no line names MAX_BODY_BYTES: {stderr}"));
    assert!(line.contains(&topic) && line.contains("1000000"), "{line}");
}

#[test]
fn a_100_mb_streamed_body_is_refused_quickly_and_never_buffered() {
    let ingest = Ingest::start(&[]);
    let pid = ingest.pid();
    assert_good_request_is_stored(&ingest, "evt_warm_up");
    let rss_before = vm_rss_kib(pid);
    const TOTAL: usize = 100 * 1024 * 1024;
    let mut stream = connect(&ingest);
    let head = format!(
        "POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nStripe-Signature: t={},v1={}\r\n\
         Transfer-Encoding: chunked\r\n\r\n",
        now(),
        "0".repeat(64)
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let started = Instant::now();
    let sender = std::thread::spawn(move || {
        let chunk = vec![b'a'; 64 * 1024];
        let framed = [
            format!("{:x}\r\n", chunk.len()).into_bytes(),
            chunk,
            b"\r\n".to_vec(),
        ]
        .concat();
        let mut sent = 0usize;
        while sent < TOTAL {
            if writer.write_all(&framed).is_err() {
                break;
            }
            sent += 64 * 1024;
        }
        (sent, started.elapsed())
    });

    let response = read_response(&mut stream).expect("a response before the body ends");
    let answered_in = started.elapsed();
    drop(stream);
    let (sent, closed_after) = sender.join().unwrap();
    let rss_after = vm_rss_kib(pid);

    println!(
        "100 MB streamed body: {} answered in {answered_in:?}; {} MiB written before the server \
         closed the connection after {closed_after:?}; VmRSS {rss_before} -> {rss_after} KiB",
        response.status,
        sent / (1024 * 1024)
    );
    assert_eq!(response.status, 413, "{response:?}");
    assert_eq!(response.error_code().as_deref(), Some("payload_too_large"));
    assert!(answered_in < Duration::from_secs(10), "{answered_in:?}");
    // actix-http 3.20 discards the rest of a chunked body whose handler gave up on it (to keep
    // the connection), at the client's pace and without buffering it: the memory bound above
    // is what matters, and the handler never sees more than MAX_BODY_BYTES.
    assert!(
        rss_after < rss_before + 32 * 1024,
        "the server's memory grew by {} KiB",
        rss_after - rss_before
    );
    assert_good_request_is_stored(&ingest, "evt_after_100mb");
}

#[test]
fn a_declared_100_mb_body_is_refused_before_any_of_it_is_sent() {
    let ingest = Ingest::start(&[]);
    let mut stream = connect(&ingest);
    let head = format!(
        "POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nStripe-Signature: t={},v1={}\r\n\
         Content-Length: {}\r\n\r\n",
        now(),
        "0".repeat(64),
        100 * 1024 * 1024
    );
    stream.write_all(head.as_bytes()).unwrap();
    let started = Instant::now();

    let response = read_response(&mut stream).expect("response");

    assert_eq!(response.status, 413, "{response:?}");
    assert_eq!(response.error_code().as_deref(), Some("payload_too_large"));
    assert!(started.elapsed() < Duration::from_secs(5));
}

// ---------------------------------------------------------------------------------------------
// Slow loris

/// Sends `bytes` one at a time every `every` until the server closes or answers; returns when
/// and what it answered (`None` when it closed without an answer).
fn trickle(
    mut stream: TcpStream,
    bytes: &[u8],
    every: Duration,
) -> (Duration, Option<RawResponse>) {
    let started = Instant::now();
    stream.set_nonblocking(false).unwrap();
    let mut reader = stream.try_clone().unwrap();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done_writing = done.clone();
    let bytes = bytes.to_vec();
    let writer = std::thread::spawn(move || {
        for b in bytes.iter().cycle() {
            if done_writing.load(std::sync::atomic::Ordering::Relaxed)
                || stream.write_all(&[*b]).is_err()
            {
                return;
            }
            std::thread::sleep(every);
        }
    });
    let response = read_response(&mut reader).ok();
    let elapsed = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = reader.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    (elapsed, response)
}

#[test]
fn a_head_that_trickles_is_cut_within_the_head_timeout_while_good_requests_pass() {
    let ingest = Ingest::start(&[("HTTP_HEAD_TIMEOUT_MS", "1000")]);
    let head = b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaa";
    let stream = connect(&ingest);
    let slow = std::thread::spawn(move || trickle(stream, head, Duration::from_millis(100)));
    assert_good_request_is_stored(&ingest, "evt_during_slow_head");

    let (cut_after, response) = slow.join().unwrap();

    println!("slow head cut after {cut_after:?}: {response:?}");
    assert!(cut_after < Duration::from_secs(4), "{cut_after:?}");
    if let Some(response) = response {
        assert_eq!(response.status, 408, "{response:?}");
    }
}

#[test]
fn a_body_that_trickles_gets_408_request_timeout_within_the_body_timeout() {
    let ingest = Ingest::start(&[("HTTP_BODY_TIMEOUT_MS", "1500")]);
    let body = good_event("evt_slow_body");
    let mut stream = connect(&ingest);
    let head = format!(
        "POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nStripe-Signature: {}\r\n\
         Content-Length: {}\r\n\r\n",
        signed(body.as_bytes()),
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let slow =
        std::thread::spawn(move || trickle(stream, body.as_bytes(), Duration::from_millis(100)));
    assert_good_request_is_stored(&ingest, "evt_during_slow_body");

    let (cut_after, response) = slow.join().unwrap();

    println!("slow body cut after {cut_after:?}: {response:?}");
    let response = response.expect("a 408 answer");
    assert_eq!(response.status, 408, "{response:?}");
    assert_eq!(response.error_code().as_deref(), Some("request_timeout"));
    assert!(cut_after < Duration::from_secs(5), "{cut_after:?}");
}

// ---------------------------------------------------------------------------------------------
// Headers

#[test]
fn huge_and_repeated_headers_get_431_and_the_server_keeps_serving() {
    let ingest = Ingest::start(&[]);
    let body = good_event("evt_headers");
    let signature = signed(body.as_bytes());

    let huge_value = "a".repeat(200 * 1024);
    let huge = raw_post(
        &ingest,
        &[("Stripe-Signature", &signature), ("X-Huge", &huge_value)],
        body.as_bytes(),
    );
    let huge_signature = format!("{signature},{}", "v0=00,".repeat(30_000));
    let huge_sig = raw_post(
        &ingest,
        &[("Stripe-Signature", &huge_signature)],
        body.as_bytes(),
    );
    let mut repeated: Vec<(&str, &str)> = vec![("Stripe-Signature", &signature)];
    repeated.extend(std::iter::repeat_n(("X-Repeated", "1"), 200));
    let many = raw_post(&ingest, &repeated, body.as_bytes());

    for (what, response) in [
        ("huge header", &huge),
        ("huge signature", &huge_sig),
        ("200 headers", &many),
    ] {
        assert_eq!(response.status, 431, "{what}: {response:?}");
    }
    assert_good_request_is_stored(&ingest, "evt_after_headers");
    assert_eq!(read_records(&ingest.events_topic, 2, WAIT).len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Bodies that verify but are not events

#[tokio::test]
async fn non_utf8_bytes_are_invalid_payload_and_go_to_the_dlq_as_they_came() {
    let ingest = Ingest::start(&[]);
    let mut body = good_event("evt_latin1").into_bytes();
    let at = find(&body, b"cus_").unwrap();
    body.splice(at..at, [0xff, 0xfe, 0xc3]);
    let signature = signed(&body);

    let response = raw_post(&ingest, &[("Stripe-Signature", &signature)], &body);

    assert_eq!(response.status, 400, "{response:?}");
    assert_eq!(response.error_code().as_deref(), Some("invalid_payload"));
    let dead = read_records(&ingest.dlq_topic, 1, WAIT);
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].payload() == Some(&body[..]),
        "the DLQ keeps the exact bytes"
    );
    assert_eq!(
        header_value(&dead[0], "dlq-reason").as_deref(),
        Some("invalid_payload")
    );
}

#[test]
fn json_nested_10000_deep_is_a_clear_400_and_no_crash() {
    let ingest = Ingest::start(&[]);
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let signature = signed(deep.as_bytes());

    let response = raw_post(
        &ingest,
        &[("Stripe-Signature", &signature)],
        deep.as_bytes(),
    );

    assert_eq!(response.status, 400, "{response:?}");
    assert_eq!(response.error_code().as_deref(), Some("invalid_payload"));
    assert_eq!(read_records(&ingest.dlq_topic, 1, WAIT).len(), 1);
    assert_good_request_is_stored(&ingest, "evt_after_deep");
}

#[test]
fn an_event_whose_object_nests_10000_deep_is_stored_as_it_came() {
    // The envelope is well formed and verified, and ingest reads only its routing fields: the
    // event is kept (never dropped), and the projector's bounded parser decides what it is
    // worth (fuzz/regressions covers that side).
    let ingest = Ingest::start(&[]);
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let body = format!(
        r#"{{"id":"evt_deep","object":"event","type":"customer.created","created":{},"data":{{"object":{{"id":"cus_deep","object":"customer","metadata":{deep}}}}}}}"#,
        now()
    );
    let signature = signed(body.as_bytes());

    let response = raw_post(
        &ingest,
        &[("Stripe-Signature", &signature)],
        body.as_bytes(),
    );

    assert_eq!(response.status, 200, "{response:?}");
    let records = read_records(&ingest.events_topic, 1, WAIT);
    assert!(records[0].payload() == Some(body.as_bytes()));
    assert_eq!(key_str(&records[0]).as_deref(), Some("cus_deep"));
}

// ---------------------------------------------------------------------------------------------
// Signatures

#[test]
fn an_old_signature_replayed_is_timestamp_out_of_tolerance() {
    let ingest = Ingest::start(&[]);
    let body = good_event("evt_replayed");
    let old = ingest::signature::header_for(SECRET, now() - 301, body.as_bytes());

    let response = raw_post(&ingest, &[("Stripe-Signature", &old)], body.as_bytes());

    assert_eq!(response.status, 400, "{response:?}");
    assert_eq!(
        response.error_code().as_deref(),
        Some("timestamp_out_of_tolerance")
    );
}

#[test]
fn a_signature_made_for_another_body_is_signature_mismatch() {
    let ingest = Ingest::start(&[]);
    let signed_body = good_event("evt_signed");
    let other_body = good_event("evt_other");
    let signature = signed(signed_body.as_bytes());

    let response = raw_post(
        &ingest,
        &[("Stripe-Signature", &signature)],
        other_body.as_bytes(),
    );

    assert_eq!(response.status, 400, "{response:?}");
    assert_eq!(response.error_code().as_deref(), Some("signature_mismatch"));
    assert!(read_records(&ingest.events_topic, 1, Duration::from_secs(2)).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Flood

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn good_requests(
    client: &reqwest::Client,
    ingest: &Ingest,
    prefix: &str,
    count: usize,
) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(count);
    for i in 0..count {
        let body = good_event(&format!("evt_{prefix}_{i}"));
        let started = Instant::now();
        let response = post_signed(client, ingest, &body).await;
        let latency = started.elapsed();
        assert_eq!(response.status(), 200, "good request {prefix} #{i}");
        latencies.push(latency);
    }
    latencies.sort();
    latencies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_bad_requests_does_not_keep_good_ones_from_being_stored() {
    const BAD: usize = 4_000;
    const CONCURRENCY: usize = 400;
    const GOOD: usize = 60;
    let ingest = Ingest::start(&[]);
    let client = reqwest::Client::new();
    let quiet = good_requests(&client, &ingest, "quiet", GOOD).await;

    let flood = {
        let url = ingest.url("/webhooks/stripe");
        tokio::spawn(async move {
            let bad_client = reqwest::Client::builder()
                .pool_max_idle_per_host(CONCURRENCY)
                .build()
                .unwrap();
            let body = good_event("evt_forged");
            let forged = format!("t={},v1={}", now(), "0".repeat(64));
            let started = Instant::now();
            let codes: Vec<Option<String>> =
                futures_util::StreamExt::collect(futures_util::StreamExt::buffer_unordered(
                    futures_util::stream::iter((0..BAD).map(|_| {
                        let request = bad_client
                            .post(&url)
                            .header("Stripe-Signature", &forged)
                            .body(body.clone());
                        async move {
                            let response = request.send().await.ok()?;
                            let answer: Value = response.json().await.ok()?;
                            answer["error"].as_str().map(str::to_owned)
                        }
                    })),
                    CONCURRENCY,
                ))
                .await;
            (codes, started.elapsed())
        })
    };
    let during = good_requests(&client, &ingest, "flood", GOOD).await;
    let (codes, flood_took) = flood.await.unwrap();

    let mismatches = codes
        .iter()
        .filter(|c| c.as_deref() == Some("signature_mismatch"))
        .count();
    println!(
        "flood: {BAD} forged requests, {CONCURRENCY} at a time, took {flood_took:?}, \
         {mismatches} answered signature_mismatch; good requests p50/p99: quiet {:?}/{:?}, \
         during the flood {:?}/{:?}",
        percentile(&quiet, 0.5),
        percentile(&quiet, 0.99),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
    );
    assert_eq!(mismatches, BAD, "every forged request gets its code");
    assert!(
        percentile(&during, 1.0) < Duration::from_secs(5),
        "a good request took {:?} during the flood",
        percentile(&during, 1.0)
    );
    let stored = read_records(&ingest.events_topic, 2 * GOOD, WAIT);
    assert_eq!(stored.len(), 2 * GOOD, "every good request is in the log");
}
