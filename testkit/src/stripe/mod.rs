//! Stripe payloads for tests: one event envelope, and objects in the shapes Stripe sends
//! (API 2022-11-15 and 2025-03-31.basil, where the shapes moved).
//!
//! Two kinds of object builders, for two kinds of test:
//! - [`reference`]: Stripe's own API-reference examples with per-test overrides, so that a
//!   pure-function test sees every field Stripe sends;
//! - the builders at this level: complete but compact objects whose customer, period and
//!   livemode a scenario sets, for end-to-end runs that span many customers and months.

use std::sync::OnceLock;

use serde_json::{json, Value};

pub mod reference;

/// A plausible `created` for test events.
pub const T0: i64 = 1_700_000_000;

const LEGACY: &str = include_str!("../../fixtures/stripe-2022-11-15.json");
const BASIL: &str = include_str!("../../fixtures/stripe-2025-03-31.basil.json");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// 2022-11-15: periods on the subscription, `invoice.subscription`, `invoice.paid`.
    Legacy,
    /// 2025-03-31.basil: periods on the items, `invoice.parent`, no `invoice.paid`.
    Basil,
}

impl Api {
    pub fn version(self) -> &'static str {
        match self {
            Api::Legacy => "2022-11-15",
            Api::Basil => "2025-03-31.basil",
        }
    }
}

/// A fixture object by its Stripe name (`subscription`, `invoice`, `checkout.session`, …).
pub fn fixture(api: Api, name: &str) -> Value {
    static LEGACY_FIXTURES: OnceLock<Value> = OnceLock::new();
    static BASIL_FIXTURES: OnceLock<Value> = OnceLock::new();
    let all = match api {
        Api::Legacy => LEGACY_FIXTURES.get_or_init(|| serde_json::from_str(LEGACY).expect("JSON")),
        Api::Basil => BASIL_FIXTURES.get_or_init(|| serde_json::from_str(BASIL).expect("JSON")),
    };
    all.get(name)
        .cloned()
        .unwrap_or_else(|| panic!("no fixture {name:?} for {api:?}"))
}

/// Sets the member at a JSON pointer, creating objects along the way (over `null`s too, as
/// Stripe renders absent sub-objects).
pub fn set(target: &mut Value, pointer: &str, value: Value) {
    let parts: Vec<&str> = pointer.split('/').skip(1).collect();
    let (last, parents) = parts.split_last().expect("a non-empty pointer");
    let mut node = target;
    for part in parents {
        node = child(node, part);
    }
    if node.is_null() {
        *node = json!({});
    }
    match node {
        Value::Object(map) => {
            map.insert((*last).to_owned(), value);
        }
        Value::Array(items) => items[last.parse::<usize>().expect("an index")] = value,
        other => panic!("cannot set {pointer} inside {other}"),
    }
}

fn child<'v>(node: &'v mut Value, part: &str) -> &'v mut Value {
    if node.is_null() {
        *node = json!({});
    }
    match node {
        Value::Object(map) => map.entry(part.to_owned()).or_insert(Value::Null),
        Value::Array(items) => &mut items[part.parse::<usize>().expect("an index")],
        other => panic!("cannot descend into {other}"),
    }
}

/// `object` with its top-level `field` replaced.
pub fn with(mut object: Value, field: &str, value: Value) -> Value {
    object[field] = value;
    object
}

/// A subscription item: (price id, product id, price lookup_key).
pub type Item<'a> = (&'a str, &'a str, Option<&'a str>);

/// An event envelope around an object, as Stripe POSTs it.
#[derive(Clone, Debug)]
pub struct Event {
    pub id: String,
    pub event_type: String,
    pub created: i64,
    pub livemode: bool,
    /// The connected account (`account` in the envelope), none for the platform.
    pub account: Option<String>,
    pub api: Api,
    pub object: Value,
    /// Whether `id` was derived from the content, to be derived again when that changes.
    derived_id: bool,
}

impl Event {
    /// An event of the basil API with its id and time; livemode as the object's.
    pub fn new(id: &str, event_type: &str, created: i64, object: Value) -> Event {
        let livemode = object["livemode"].as_bool().unwrap_or(false);
        Event {
            id: id.to_owned(),
            event_type: event_type.to_owned(),
            created,
            livemode,
            account: None,
            api: Api::Basil,
            object,
            derived_id: false,
        }
    }

    pub fn id(mut self, id: &str) -> Self {
        self.id = id.to_owned();
        self.derived_id = false;
        self
    }

    pub fn created(mut self, created: i64) -> Self {
        self.created = created;
        if self.derived_id {
            self.id = derived_id(&self.event_type, created, &self.object);
        }
        self
    }

    pub fn account(mut self, account: &str) -> Self {
        self.account = Some(account.to_owned());
        self
    }

    pub fn livemode(mut self, livemode: bool) -> Self {
        self.livemode = livemode;
        self
    }

    pub fn api(mut self, api: Api) -> Self {
        self.api = api;
        self
    }

    pub fn legacy_api(self) -> Self {
        self.api(Api::Legacy)
    }

    /// The request body.
    pub fn body(&self) -> String {
        let mut envelope = json!({
            "id": self.id,
            "object": "event",
            "api_version": self.api.version(),
            "created": self.created,
            "data": {"object": self.object},
            "livemode": self.livemode,
            "pending_webhooks": 1,
            "request": {"id": null, "idempotency_key": null},
            "type": self.event_type,
        });
        if let Some(account) = &self.account {
            envelope["account"] = json!(account);
        }
        envelope.to_string()
    }
}

/// An event of the 2022-11-15 API at [`T0`] whose id is derived from its content, so that
/// tests stay deterministic without naming every event.
pub fn event(event_type: &str, object: Value) -> Event {
    Event {
        id: derived_id(event_type, T0, &object),
        event_type: event_type.to_owned(),
        created: T0,
        livemode: false,
        account: None,
        api: Api::Legacy,
        object,
        derived_id: true,
    }
}

fn derived_id(event_type: &str, created: i64, object: &Value) -> String {
    let object_id = object["id"].as_str().unwrap_or("none");
    let status = object["status"].as_str().unwrap_or("none");
    format!("evt_{created}_{event_type}_{object_id}_{status}")
}

pub fn customer(id: &str, livemode: bool) -> Value {
    json!({
        "id": id, "object": "customer", "created": T0, "email": format!("{id}@example.com"),
        "livemode": livemode, "metadata": {}, "name": "Test Customer", "balance": 0, "currency": "usd",
        "delinquent": false, "invoice_prefix": "ABC123"
    })
}

pub fn deleted_customer(id: &str, livemode: bool) -> Value {
    json!({"id": id, "object": "customer", "deleted": true, "livemode": livemode})
}

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
                "id": format!("si_{id}_{i}"), "object": "subscription_item", "created": T0,
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
        "created": T0, "currency": "usd", "livemode": false, "metadata": {},
        "pause_collection": null, "trial_end": null,
        "items": {"object": "list", "data": data, "has_more": false, "url": format!("/v1/subscription_items?subscription={id}")}
    });
    if !basil {
        subscription["current_period_start"] = json!(period_end - 2_592_000);
        subscription["current_period_end"] = json!(period_end);
    }
    subscription
}

/// An invoice of a subscription, in the basil shape (`parent.subscription_details`) or the
/// 2022-11-15 shape (`subscription`, `paid`).
#[allow(clippy::too_many_arguments)]
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
        "livemode": false, "currency": "usd", "amount_total": 2000, "created": T0,
        "url": null, "success_url": "https://example.com/success"
    })
}

/// An `entitlements.active_entitlement_summary` granting the given feature lookup keys.
pub fn entitlement_summary(customer: &str, lookup_keys: &[&str]) -> Value {
    let mut object = reference::entitlement_summary(customer, lookup_keys);
    set(&mut object, "/livemode", json!(false));
    object
}

/// The entitlements.toml of SPEC §7's example, as a literal so that a suite can extend it with
/// `concat!`.
#[macro_export]
macro_rules! spec_entitlements {
    () => {
        r#"
[policy]
past_due = "grant"

[[grant]]
product = "prod_pro"
features = ["pro", "api"]

[[grant]]
price = "price_team_month"
features = ["team"]

[[grant]]
lookup_key = "enterprise"
features = ["sso", "audit"]
"#
    };
}
