//! The read API contract (SPEC §8) of the projector's application (in process, `TestApp`),
//! fed through the real `ingest`; the start-up refusals run the real binary.

mod common;

use std::process::Command;

use serde_json::{json, Value};
use sqlx::Connection;

use common::events::*;
use common::*;

/// GET without any token, or with the given `Authorization` header value.
async fn get_with_authorization(
    pipeline: &Pipeline,
    path: &str,
    authorization: Option<&str>,
) -> reqwest::Response {
    let mut request = pipeline.client.get(pipeline.api_url(path));
    if let Some(value) = authorization {
        request = request.header("Authorization", value);
    }
    request.send().await.expect("GET")
}

/// A customer with an active `prod_pro` subscription, linked to `user_42` by Checkout.
fn subscribed_customer_events(customer_id: &str) -> Vec<String> {
    vec![
        customer_created(&format!("evt_{customer_id}_1"), T0, customer_id),
        Event::new(
            &format!("evt_{customer_id}_2"),
            "checkout.session.completed",
            T0 + 10,
            checkout_session(
                &format!("cs_{customer_id}"),
                customer_id,
                Some("user_42"),
                "subscription",
                "paid",
                Some(&format!("sub_{customer_id}")),
                json!({}),
            ),
        )
        .body(),
        Event::new(
            &format!("evt_{customer_id}_3"),
            "customer.subscription.created",
            T0 + 10,
            subscription(
                &format!("sub_{customer_id}"),
                customer_id,
                "active",
                &[PRO],
                T0 + MONTH,
                true,
            ),
        )
        .body(),
    ]
}

#[tokio::test]
async fn requests_without_or_with_a_wrong_token_are_401_with_www_authenticate() {
    // Arrange
    let mut pipeline = Pipeline::in_process(Options::default()).await;
    pipeline
        .apply(&[customer_created("evt_auth_1", T0, "cus_auth")])
        .await;
    let wrong_same_length = format!("Bearer {}", "x".repeat(TOKEN.len()));
    let token_as_basic = format!("Basic {TOKEN}");
    let token_with_suffix = format!("Bearer {TOKEN}0");

    for path in [
        "/v1/customers/cus_auth/entitlements",
        "/v1/customers/cus_auth/entitlements/pro",
        "/v1/entitlements?client_reference_id=user_42",
    ] {
        for authorization in [
            None,
            Some("Bearer wrong-token-0123456789"),
            Some(wrong_same_length.as_str()),
            Some(token_as_basic.as_str()),
            Some(token_with_suffix.as_str()),
            Some("Bearer "),
        ] {
            // Act
            let response = get_with_authorization(&pipeline, path, authorization).await;

            // Assert
            assert_eq!(response.status(), 401, "{path} with {authorization:?}");
            let challenge = response
                .headers()
                .get("WWW-Authenticate")
                .map(|v| v.to_str().unwrap().to_owned());
            assert!(
                challenge
                    .as_deref()
                    .is_some_and(|c| c.starts_with("Bearer")),
                "{path} with {authorization:?}: WWW-Authenticate {challenge:?}"
            );
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"], "unauthorized", "{path}");
            assert!(
                !body.to_string().contains(TOKEN),
                "the token is never echoed"
            );
        }
    }
    // The same request with the right token is answered.
    let response = get_with_authorization(
        &pipeline,
        "/v1/customers/cus_auth/entitlements",
        Some(&format!("Bearer {TOKEN}")),
    )
    .await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn never_seen_customer_is_404_not_found() {
    let pipeline = Pipeline::in_process(Options::default()).await;

    let (status, body) = pipeline.get("/v1/customers/cus_never/entitlements").await;
    let (feature_status, feature_body) = pipeline
        .get("/v1/customers/cus_never/entitlements/pro")
        .await;

    assert_eq!(status, 404);
    assert_eq!(body["error"], "not_found", "{body}");
    assert_eq!(feature_status, 404);
    assert_eq!(feature_body["error"], "not_found", "{feature_body}");
}

#[tokio::test]
async fn customer_known_only_from_customer_created_is_200_with_no_features() {
    // Arrange
    let mut pipeline = Pipeline::in_process(Options::default()).await;

    // Act
    pipeline
        .apply(&[customer_created("evt_only_1", T0, "cus_only")])
        .await;

    // Assert
    let (status, view) = pipeline.get("/v1/customers/cus_only/entitlements").await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["customer"], "cus_only");
    assert_eq!(view["account"], Value::Null);
    assert_eq!(view["livemode"], false);
    assert_eq!(view["client_reference_id"], Value::Null);
    assert_eq!(view["features"], json!([]));
    assert_eq!(view["subscriptions"], json!([]));
    assert!(view["version"].as_i64().is_some_and(|v| v >= 1), "{view}");
    assert!(
        view["updated_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{view}"
    );
    let (_, feature) = pipeline
        .get("/v1/customers/cus_only/entitlements/pro")
        .await;
    assert_eq!(feature, json!({"feature": "pro", "granted": false}));
}

#[tokio::test]
async fn feature_endpoint_answers_granted_true_or_false() {
    // Arrange
    let mut pipeline = Pipeline::in_process(Options::default()).await;
    pipeline
        .apply(&subscribed_customer_events("cus_feat"))
        .await;

    // Act
    let (pro_status, pro) = pipeline
        .get("/v1/customers/cus_feat/entitlements/pro")
        .await;
    let (sso_status, sso) = pipeline
        .get("/v1/customers/cus_feat/entitlements/sso")
        .await;

    // Assert
    assert_eq!(pro_status, 200);
    assert_eq!(pro, json!({"feature": "pro", "granted": true}));
    assert_eq!(sso_status, 200);
    assert_eq!(sso, json!({"feature": "sso", "granted": false}));
}

#[tokio::test]
async fn account_parameter_selects_the_connect_accounts_customer() {
    // Arrange: the same customer id on the platform (no subscription) and on a Connect account
    // (an active pro subscription).
    let mut pipeline = Pipeline::in_process(Options::default()).await;
    pipeline
        .apply(&[
            customer_created("evt_pf_1", T0, "cus_same"),
            Event::new(
                "evt_ac_1",
                "customer.created",
                T0,
                customer("cus_same", false),
            )
            .account("acct_alpha")
            .body(),
            Event::new(
                "evt_ac_2",
                "customer.subscription.created",
                T0 + 10,
                subscription("sub_ac", "cus_same", "active", &[PRO], T0 + MONTH, true),
            )
            .account("acct_alpha")
            .body(),
        ])
        .await;

    // Act
    let platform = pipeline.entitlements("cus_same", None).await;
    let connected = pipeline.entitlements("cus_same", Some("acct_alpha")).await;
    let (other_status, other) = pipeline
        .get("/v1/customers/cus_same/entitlements?account=acct_other")
        .await;
    let (_, connected_pro) = pipeline
        .get("/v1/customers/cus_same/entitlements/pro?account=acct_alpha")
        .await;
    let (_, platform_pro) = pipeline
        .get("/v1/customers/cus_same/entitlements/pro")
        .await;

    // Assert
    assert_eq!(platform["account"], Value::Null);
    assert_eq!(platform["features"], json!([]));
    assert_eq!(platform["subscriptions"], json!([]));
    assert_eq!(connected["account"], "acct_alpha");
    assert_eq!(connected["features"], json!(["api", "pro"]));
    assert_eq!(connected["subscriptions"][0]["id"], "sub_ac");
    assert_eq!(other_status, 404);
    assert_eq!(other["error"], "not_found");
    assert_eq!(connected_pro["granted"], true);
    assert_eq!(platform_pro["granted"], false);
}

#[tokio::test]
async fn lookup_by_client_reference_id_answers_the_customers_object_404_or_400() {
    // Arrange
    let mut pipeline = Pipeline::in_process(Options::default()).await;
    pipeline.apply(&subscribed_customer_events("cus_ref")).await;
    let by_customer = pipeline.entitlements("cus_ref", None).await;

    // Act
    let (found_status, found) = pipeline
        .get("/v1/entitlements?client_reference_id=user_42")
        .await;
    let (unknown_status, unknown) = pipeline
        .get("/v1/entitlements?client_reference_id=user_nobody")
        .await;
    let (missing_status, missing) = pipeline.get("/v1/entitlements").await;

    // Assert
    assert_eq!(found_status, 200, "{found}");
    assert_eq!(found, by_customer);
    assert_eq!(found["client_reference_id"], "user_42");
    assert_eq!(found["features"], json!(["api", "pro"]));
    assert_eq!(unknown_status, 404);
    assert_eq!(unknown["error"], "not_found");
    assert_eq!(missing_status, 400, "{missing}");
    assert!(missing["error"].is_string(), "{missing}");
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served_without_leaking_the_token() {
    // Arrange
    let mut pipeline = Pipeline::in_process(Options::default()).await;
    pipeline.apply(&subscribed_customer_events("cus_obs")).await;

    // Act
    let healthz = get_with_authorization(&pipeline, "/healthz", None).await;
    let readyz = get_with_authorization(&pipeline, "/readyz", None).await;
    let bearer = format!("Bearer {TOKEN}");
    let metrics = get_with_authorization(&pipeline, "/metrics", Some(&bearer)).await;

    // Assert
    assert_eq!(healthz.status(), 200);
    assert_eq!(readyz.status(), 200, "{:?}", readyz.text().await);
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    for line in [
        "projector_events_applied_total{type=\"customer.created\"} 1",
        "projector_events_applied_total{type=\"checkout.session.completed\"} 1",
        "projector_events_applied_total{type=\"customer.subscription.created\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in\n{text}"
        );
    }
    let batches: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("projector_batch_seconds_count "))
        .unwrap_or_else(|| panic!("projector_batch_seconds_count in\n{text}"))
        .parse()
        .unwrap();
    assert!(batches >= 1, "batches observed: {batches}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("projector_batch_seconds_bucket{")),
        "{text}"
    );
    let lag: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("projector_consumer_lag "))
        .unwrap_or_else(|| panic!("projector_consumer_lag in\n{text}"))
        .parse()
        .unwrap();
    assert!(lag >= 0);
    assert!(!text.contains(TOKEN), "the API token appears in /metrics");
    assert!(
        !text.contains(&pipeline.database_url),
        "the database URL appears in /metrics"
    );
}

#[tokio::test]
async fn the_in_process_projector_stops_when_its_pipeline_is_dropped_and_its_database_goes_too() {
    // Arrange
    let mut pipeline = Pipeline::in_process(Options::default()).await;
    pipeline
        .apply(&[customer_created("evt_drop_1", T0, "cus_drop")])
        .await;
    let healthz = pipeline.api_url("/healthz");
    let database = pipeline.database.name.clone();
    assert_eq!(reqwest::get(&healthz).await.unwrap().status(), 200);

    // Act
    drop(pipeline);

    // Assert
    assert!(
        reqwest::get(&healthz).await.is_err(),
        "the API still answers"
    );
    let mut admin = sqlx::PgConnection::connect(&admin_database_url())
        .await
        .unwrap();
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&database)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert!(!exists, "{database} outlived its pipeline");
}

#[test]
fn projector_refuses_to_start_without_api_token_with_exit_code_2_naming_it() {
    // Arrange: a complete configuration except the token; nothing needs to be reachable, the
    // configuration is refused before any connection.
    let directory = std::env::temp_dir();
    let mut command = Command::new(env!("CARGO_BIN_EXE_projector"));
    command
        .arg("run")
        .current_dir(&directory)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", admin_database_url())
        .env("KAFKA_BROKERS", brokers())
        .env("PROJECTOR_ADDR", "127.0.0.1:0");

    for token in [None, Some("")] {
        if let Some(token) = token {
            command.env("API_TOKEN", token);
        }

        // Act
        let output = command.output().unwrap();

        // Assert
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(
            output.status.code(),
            Some(2),
            "API_TOKEN={token:?}: {stderr}"
        );
        assert_eq!(lines.len(), 1, "one line on stderr, got:\n{stderr}");
        assert!(lines[0].contains("API_TOKEN"), "{}", lines[0]);
    }
}
