//! Plain HTTP reads of a service's own pages.

/// The text of a page that must answer 2xx (e.g. `/metrics`), with a bearer token if given.
pub async fn page(client: &reqwest::Client, url: &str, token: Option<&str>) -> String {
    let mut request = client.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(
        response.status().is_success(),
        "GET {url}: {}",
        response.status()
    );
    response.text().await.expect("a text page")
}
