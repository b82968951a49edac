//! The sample Checkout → subscription flow through both real binaries.

mod common;

use common::events::*;
use common::*;

#[tokio::test]
async fn checkout_then_subscription_grants_features_visible_in_api_and_topic() {
    let mut pipeline = Pipeline::start(Options::default()).await;
    let t = 1_767_225_600;
    pipeline
        .apply(&[
            customer_created("evt_s1", t, "cus_smoke"),
            Event::new(
                "evt_s2",
                "checkout.session.completed",
                t + 10,
                checkout_session(
                    "cs_smoke",
                    "cus_smoke",
                    Some("user_42"),
                    "subscription",
                    "paid",
                    Some("sub_smoke"),
                    serde_json::json!({}),
                ),
            )
            .body(),
            Event::new(
                "evt_s3",
                "customer.subscription.created",
                t + 10,
                subscription(
                    "sub_smoke",
                    "cus_smoke",
                    "active",
                    &[("price_pro_month", "prod_pro", None)],
                    t + 2_592_000,
                    true,
                ),
            )
            .body(),
        ])
        .await;

    let view = pipeline.entitlements("cus_smoke", None).await;
    assert_eq!(view["features"], serde_json::json!(["api", "pro"]));
    assert_eq!(view["client_reference_id"], "user_42");
    assert_eq!(view["subscriptions"][0]["status"], "active");
    let (status, by_reference) = pipeline
        .get("/v1/entitlements?client_reference_id=user_42")
        .await;
    assert_eq!(status, 200);
    assert_eq!(by_reference, view);
    let (_, feature) = pipeline
        .get("/v1/customers/cus_smoke/entitlements/pro")
        .await;
    assert_eq!(
        feature,
        serde_json::json!({"feature": "pro", "granted": true})
    );

    let changes = pipeline.changes();
    let last = &changes.last().expect("change messages").1;
    assert_eq!(last["type"], "entitlements.changed");
    assert_eq!(last["features"], serde_json::json!(["api", "pro"]));
    assert_eq!(last["version"], view["version"]);
    assert!(changes
        .iter()
        .all(|(key, _)| key.as_deref() == Some("cus_smoke")));
}
