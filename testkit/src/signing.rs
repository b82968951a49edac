//! Signing webhooks as Stripe does, with ingest's own function: a test that signed with a copy
//! would keep passing if the two drifted apart.

use crate::names::now;

/// `t=<t>,v1=hex(HMAC-SHA256(secret, "<t>.<body>"))`.
pub use ingest::signature::header_for as signature_header;

/// POSTs `body` to `url` signed with `secret` at the current time (or unsigned with
/// `header: None` through [`post_with_header`]).
pub async fn post_signed(
    client: &reqwest::Client,
    url: &str,
    secret: &str,
    body: &str,
) -> reqwest::Response {
    let header = signature_header(secret, now(), body.as_bytes());
    post_with_header(client, url, body, Some(&header)).await
}

/// POSTs `body` to `url` with `header` as `Stripe-Signature`, or none.
pub async fn post_with_header(
    client: &reqwest::Client,
    url: &str,
    body: &str,
    header: Option<&str>,
) -> reqwest::Response {
    let mut request = client.post(url).body(body.to_owned());
    if let Some(header) = header {
        request = request.header("Stripe-Signature", header);
    }
    request.send().await.expect("POST to ingest")
}

/// [`post_signed`], asserting ingest answered 200 (the event is durable in the log).
pub async fn post_signed_ok(client: &reqwest::Client, url: &str, secret: &str, body: &str) {
    let response = post_signed(client, url, secret, body).await;
    let status = response.status();
    assert_eq!(
        status,
        200,
        "ingest answered {status}: {}",
        response.text().await.unwrap_or_default()
    );
}
