//! Drives the local Stripe API server (`scripts/localstripe`, the PyPI `localstripe` package)
//! over plain HTTP, as a test sets up an account's history. Shared by the ingest and projector
//! end-to-end tests.
//!
//! localstripe is one server for every test running at once, so tests never flush it; each
//! test tracks the ids of the objects it created and asserts about those only.

use std::process::Command;
use std::sync::OnceLock;

use serde_json::{json, Value};

/// Any `sk_test_` key works with localstripe.
pub const API_KEY: &str = "sk_test_e2e_localstripe";

/// The product/plan the scenarios subscribe to; `prod_pro` grants `pro` and `api` in the
/// projector e2e mapping.
pub const PRO_PRODUCT: &str = "prod_pro";
pub const PRO_PLAN: &str = "price_pro_month";
pub const TEAM_PRODUCT: &str = "prod_team";
pub const TEAM_PLAN: &str = "price_team_month";

/// `STRIPE_API_BASE`, or `scripts/localstripe up` (idempotent) when unset.
pub fn base_url() -> String {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| {
        if let Ok(base) = std::env::var("STRIPE_API_BASE") {
            return base;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/localstripe");
        let output = Command::new(script)
            .arg("up")
            .output()
            .expect("run scripts/localstripe up");
        assert!(
            output.status.success(),
            "scripts/localstripe up failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let line = String::from_utf8(output.stdout).unwrap();
        line.trim()
            .strip_prefix("export STRIPE_API_BASE=")
            .expect("export line")
            .to_owned()
    })
    .clone()
}

pub struct LocalStripe {
    pub base: String,
    client: reqwest::Client,
}

impl LocalStripe {
    pub async fn connect() -> LocalStripe {
        let stripe = LocalStripe {
            base: base_url(),
            client: reqwest::Client::new(),
        };
        stripe.ensure_plans().await;
        stripe
    }

    /// Sends `request` with the API key; returns status and JSON body (`null` when none).
    async fn answer(&self, request: reqwest::RequestBuilder, what: &str) -> (u16, Value) {
        let response = request
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what} at localstripe: {e}"));
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POST with a JSON body (localstripe reads JSON as well as forms); returns status and body.
    pub async fn post_status(&self, path: &str, body: Value) -> (u16, Value) {
        let request = self.client.post(self.url(path)).json(&body);
        self.answer(request, "POST").await
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        let (status, answer) = self.post_status(path, body.clone()).await;
        assert!(
            (200..300).contains(&status),
            "POST {path} {body} answered {status}: {answer}"
        );
        answer
    }

    pub async fn get_status(&self, path: &str) -> (u16, Value) {
        self.answer(self.client.get(self.url(path)), "GET").await
    }

    pub async fn delete(&self, path: &str) -> Value {
        let (status, answer) = self
            .answer(self.client.delete(self.url(path)), "DELETE")
            .await;
        assert!((200..300).contains(&status), "DELETE {path}: {status}");
        assert!(!answer.is_null(), "DELETE {path} answered no JSON");
        answer
    }

    /// The products and plans every scenario uses; created once, 409 when another test did.
    async fn ensure_plans(&self) {
        for (product, plan, amount) in [
            (PRO_PRODUCT, PRO_PLAN, 1000),
            (TEAM_PRODUCT, TEAM_PLAN, 5000),
        ] {
            let (status, body) = self
                .post_status("/v1/products", json!({"id": product, "name": product}))
                .await;
            assert!(status == 200 || status == 409, "product: {status} {body}");
            let (status, body) = self
                .post_status(
                    "/v1/plans",
                    json!({"id": plan, "product": product, "amount": amount,
                           "currency": "usd", "interval": "month"}),
                )
                .await;
            assert!(status == 200 || status == 409, "plan: {status} {body}");
        }
    }

    /// A customer paying with `card` (a localstripe test payment method such as
    /// `pm_card_visa`, or `pm_card_chargeCustomerFail` whose charges are declined).
    pub async fn customer(&self, card: &str) -> String {
        let customer = self
            .post(
                "/v1/customers",
                json!({"email": "e2e@example.com", "payment_method": card,
                       "invoice_settings": {"default_payment_method": card}}),
            )
            .await;
        customer["id"].as_str().unwrap().to_owned()
    }

    /// Subscribes `customer` to `plan`; `trial_days` makes a trial (which localstripe reports
    /// as `incomplete`, it has no `trialing`).
    pub async fn subscribe(&self, customer: &str, plan: &str, trial_days: Option<u32>) -> Value {
        let mut body = json!({"customer": customer, "items": [{"plan": plan}]});
        if let Some(days) = trial_days {
            body["trial_period_days"] = json!(days);
        }
        self.post("/v1/subscriptions", body).await
    }

    /// Cancels now (localstripe's DELETE /v1/subscriptions/{id}).
    pub async fn cancel(&self, subscription: &str) -> Value {
        self.delete(&format!("/v1/subscriptions/{subscription}"))
            .await
    }

    /// Deletes a customer after canceling their subscriptions, as Stripe does.
    pub async fn delete_customer(&self, customer: &str) {
        for sub in self.subscriptions_of(customer).await {
            if sub["status"] != "canceled" {
                self.cancel(sub["id"].as_str().unwrap()).await;
            }
        }
        self.delete(&format!("/v1/customers/{customer}")).await;
    }

    /// Every subscription of `customer`, canceled ones included, as the server holds them.
    pub async fn subscriptions_of(&self, customer: &str) -> Vec<Value> {
        let (status, list) = self
            .get_status(&format!(
                "/v1/subscriptions?customer={customer}&status=all&limit=100"
            ))
            .await;
        if status == 404 {
            // A deleted customer: localstripe answers 404 for the filter; list them all.
            return self
                .all_subscriptions()
                .await
                .into_iter()
                .filter(|s| s["customer"] == customer)
                .collect();
        }
        assert_eq!(status, 200, "{list}");
        list["data"].as_array().unwrap().clone()
    }

    async fn all_subscriptions(&self) -> Vec<Value> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut path = "/v1/subscriptions?status=all&limit=100".to_owned();
            if let Some(a) = &after {
                path.push_str(&format!("&starting_after={a}"));
            }
            let (_, page) = self.get_status(&path).await;
            let data = page["data"].as_array().unwrap().clone();
            after = data.last().map(|s| s["id"].as_str().unwrap().to_owned());
            all.extend(data);
            if page["has_more"] != true {
                return all;
            }
        }
    }

    /// Whether the server still has the customer.
    pub async fn customer_exists(&self, customer: &str) -> bool {
        let (status, _) = self.get_status(&format!("/v1/customers/{customer}")).await;
        status == 200
    }

    /// Has localstripe sign every event with `secret` and POST it to `url`.
    pub async fn register_webhook(&self, id: &str, url: &str, secret: &str) {
        let (status, body) = self
            .post_status(
                &format!("/_config/webhooks/{id}"),
                json!({"url": url, "secret": secret}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    /// localstripe cannot remove a webhook; an empty event filter silences it.
    pub async fn silence_webhook(&self, id: &str) {
        let _ = self
            .post_status(
                &format!("/_config/webhooks/{id}"),
                json!({"url": "http://127.0.0.1:9/", "secret": "whsec_silenced", "events": []}),
            )
            .await;
    }
}
