//! Stripe event payloads for the end-to-end scenarios, shaped like Stripe's own objects (API
//! 2022-11-15 from the public fixtures, and 2025-03-31.basil where the shapes moved).

use serde_json::{json, Value};

/// An event envelope around `object`.
#[derive(Clone, Debug)]
pub struct Event {
    pub id: String,
    pub event_type: String,
    pub created: i64,
    pub livemode: bool,
    pub account: Option<String>,
    pub api_version: &'static str,
    pub object: Value,
}

impl Event {
    pub fn new(id: &str, event_type: &str, created: i64, object: Value) -> Event {
        let livemode = object["livemode"].as_bool().unwrap_or(false);
        Event {
            id: id.to_owned(),
            event_type: event_type.to_owned(),
            created,
            livemode,
            account: None,
            api_version: "2025-03-31.basil",
            object,
        }
    }

    pub fn account(mut self, account: &str) -> Event {
        self.account = Some(account.to_owned());
        self
    }

    pub fn legacy_api(mut self) -> Event {
        self.api_version = "2022-11-15";
        self
    }

    pub fn body(&self) -> String {
        let mut envelope = json!({
            "id": self.id,
            "object": "event",
            "api_version": self.api_version,
            "created": self.created,
            "livemode": self.livemode,
            "pending_webhooks": 1,
            "request": {"id": null, "idempotency_key": null},
            "type": self.event_type,
            "data": {"object": self.object},
        });
        if let Some(account) = &self.account {
            envelope["account"] = json!(account);
        }
        envelope.to_string()
    }
}

pub fn customer(id: &str, livemode: bool) -> Value {
    json!({
        "id": id, "object": "customer", "created": 1_700_000_000, "email": format!("{id}@example.com"),
        "livemode": livemode, "metadata": {}, "name": "Test Customer", "balance": 0, "currency": "usd",
        "delinquent": false, "invoice_prefix": "ABC123"
    })
}

pub fn deleted_customer(id: &str, livemode: bool) -> Value {
    json!({"id": id, "object": "customer", "deleted": true, "livemode": livemode})
}

/// A subscription item: (price, product, lookup_key).
pub type Item<'a> = (&'a str, &'a str, Option<&'a str>);

/// A subscription in the basil shape (periods on the items) or the 2022-11-15 shape (periods on
/// the subscription).
pub fn subscription(
    id: &str,
    customer: &str,
    status: &str,
    items: &[Item<'_>],
    period_end: i64,
    basil: bool,
) -> Value {
    let data: Vec<Value> = items
        .iter()
        .enumerate()
        .map(|(i, (price, product, lookup_key))| {
            let mut item = json!({
                "id": format!("si_{id}_{i}"), "object": "subscription_item", "created": 1_700_000_000,
                "metadata": {}, "quantity": 1, "subscription": id, "tax_rates": [],
                "price": {"id": price, "object": "price", "active": true, "currency": "usd",
                          "lookup_key": lookup_key, "product": product, "type": "recurring",
                          "recurring": {"interval": "month", "interval_count": 1}, "unit_amount": 2000}
            });
            if basil {
                item["current_period_start"] = json!(period_end - 2_592_000);
                item["current_period_end"] = json!(period_end);
            }
            item
        })
        .collect();
    let mut subscription = json!({
        "id": id, "object": "subscription", "customer": customer, "status": status,
        "cancel_at_period_end": false, "canceled_at": null, "collection_method": "charge_automatically",
        "created": 1_700_000_000, "currency": "usd", "livemode": false, "metadata": {},
        "pause_collection": null, "trial_end": null,
        "items": {"object": "list", "data": data, "has_more": false, "url": format!("/v1/subscription_items?subscription={id}")}
    });
    if !basil {
        subscription["current_period_start"] = json!(period_end - 2_592_000);
        subscription["current_period_end"] = json!(period_end);
    }
    subscription
}

pub fn with(mut object: Value, field: &str, value: Value) -> Value {
    object[field] = value;
    object
}

#[allow(clippy::too_many_arguments)]
/// An invoice of a subscription, in the basil shape (`parent.subscription_details`) or the
/// 2022-11-15 shape (`subscription`, `paid`).
pub fn invoice(
    id: &str,
    customer: &str,
    subscription: &str,
    status: &str,
    attempt_count: i64,
    next_payment_attempt: Option<i64>,
    period_end: i64,
    basil: bool,
) -> Value {
    let mut invoice = json!({
        "id": id, "object": "invoice", "customer": customer, "status": status,
        "amount_due": 2000, "amount_paid": if status == "paid" { 2000 } else { 0 },
        "attempt_count": attempt_count, "attempted": attempt_count > 0,
        "next_payment_attempt": next_payment_attempt, "livemode": false, "currency": "usd",
        "period_end": period_end - 2_592_000, "period_start": period_end - 5_184_000,
        "lines": {"object": "list", "has_more": false, "data": [
            {"id": format!("il_{id}"), "object": "line_item", "amount": 2000,
             "period": {"start": period_end - 2_592_000, "end": period_end}}
        ]}
    });
    if basil {
        invoice["parent"] = json!({"type": "subscription_details", "subscription_details": {"subscription": subscription}});
    } else {
        invoice["subscription"] = json!(subscription);
        invoice["paid"] = json!(status == "paid");
    }
    invoice
}

pub fn checkout_session(
    id: &str,
    customer: &str,
    client_reference_id: Option<&str>,
    mode: &str,
    payment_status: &str,
    subscription: Option<&str>,
    metadata: Value,
) -> Value {
    json!({
        "id": id, "object": "checkout.session", "customer": customer,
        "client_reference_id": client_reference_id, "mode": mode, "payment_status": payment_status,
        "status": "complete", "subscription": subscription, "metadata": metadata,
        "livemode": false, "currency": "usd", "amount_total": 2000, "created": 1_700_000_000,
        "url": null, "success_url": "https://example.com/success"
    })
}

pub fn entitlement_summary(customer: &str, lookup_keys: &[&str]) -> Value {
    let data: Vec<Value> = lookup_keys
        .iter()
        .enumerate()
        .map(|(i, key)| json!({"id": format!("ent_{i}"), "object": "entitlements.active_entitlement",
                               "feature": format!("feat_{i}"), "livemode": false, "lookup_key": key}))
        .collect();
    json!({
        "object": "entitlements.active_entitlement_summary", "customer": customer, "livemode": false,
        "entitlements": {"object": "list", "data": data, "has_more": false,
                         "url": format!("/v1/customer/{customer}/entitlements")}
    })
}
