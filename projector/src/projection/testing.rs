//! Payload builders for the projection's tests: real Stripe object shapes (copies of Stripe's
//! API-reference examples for 2022-11-15, and the same objects in the 2025-03-31.basil shapes)
//! with per-test overrides, wrapped in event envelopes and run through the real parser.

use std::sync::OnceLock;

use serde_json::{json, Value};
use shared::EventEnvelope;

use super::policy::EntitlementPolicy;
use super::{project, ProjectedEvent, ProjectionError};

const LEGACY: &str = include_str!("fixtures/stripe-2022-11-15.json");
const BASIL: &str = include_str!("fixtures/stripe-2025-03-31.basil.json");

/// The customer every fixture object belongs to.
pub const CUSTOMER: &str = "cus_NZbFQAsc0ptasX";
/// A plausible `created` for test events.
pub const T0: i64 = 1_700_000_000;

/// The entitlements.toml most tests run against.
pub const POLICY: &str = r#"
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

[[grant]]
price = "price_lifetime"
features = ["lifetime"]

[[grant]]
product = "prod_ebook"
features = ["ebook"]
"#;

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

pub fn policy(toml: &str) -> EntitlementPolicy {
    EntitlementPolicy::from_toml_str(toml).expect("a valid policy")
}

/// A subscription item: (price id, product id, price lookup_key).
pub type Item<'a> = (&'a str, &'a str, Option<&'a str>);

/// The fixture subscription of [`CUSTOMER`] with the given id, status and items.
pub fn subscription(api: Api, id: &str, status: &str, items: &[Item<'_>]) -> Value {
    let mut object = fixture(api, "subscription");
    set(&mut object, "/id", json!(id));
    set(&mut object, "/customer", json!(CUSTOMER));
    set(&mut object, "/status", json!(status));
    let template = object["items"]["data"][0].clone();
    let data: Vec<Value> = items
        .iter()
        .enumerate()
        .map(|(index, (price, product, lookup_key))| {
            let mut item = template.clone();
            set(&mut item, "/id", json!(format!("si_{id}_{index}")));
            set(&mut item, "/subscription", json!(id));
            set(&mut item, "/price/id", json!(price));
            set(&mut item, "/price/product", json!(product));
            set(&mut item, "/price/lookup_key", json!(lookup_key));
            item
        })
        .collect();
    set(&mut object, "/items/data", Value::Array(data));
    object
}

/// The fixture invoice of [`CUSTOMER`].
pub fn invoice(api: Api, id: &str, status: &str) -> Value {
    let mut object = fixture(api, "invoice");
    set(&mut object, "/id", json!(id));
    set(&mut object, "/customer", json!(CUSTOMER));
    set(&mut object, "/status", json!(status));
    object
}

/// The fixture checkout session, completed by [`CUSTOMER`] in `mode`.
pub fn checkout_session(id: &str, mode: &str, payment_status: &str) -> Value {
    let mut object = fixture(Api::Legacy, "checkout.session");
    set(&mut object, "/id", json!(id));
    set(&mut object, "/customer", json!(CUSTOMER));
    set(&mut object, "/mode", json!(mode));
    set(&mut object, "/status", json!("complete"));
    set(&mut object, "/payment_status", json!(payment_status));
    object
}

pub fn customer(id: &str) -> Value {
    let mut object = fixture(Api::Legacy, "customer");
    set(&mut object, "/id", json!(id));
    object
}

/// An `entitlements.active_entitlement_summary` granting the given feature lookup keys.
pub fn entitlement_summary(customer: &str, lookup_keys: &[&str]) -> Value {
    let mut object = fixture(Api::Basil, "entitlements.active_entitlement_summary");
    set(&mut object, "/customer", json!(customer));
    let template = object["entitlements"]["data"][0].clone();
    let data: Vec<Value> = lookup_keys
        .iter()
        .enumerate()
        .map(|(index, key)| {
            let mut entitlement = template.clone();
            set(&mut entitlement, "/id", json!(format!("ent_test_{index}")));
            set(&mut entitlement, "/lookup_key", json!(key));
            entitlement
        })
        .collect();
    set(&mut object, "/entitlements/data", Value::Array(data));
    object
}

/// An event envelope around an object, as Stripe would POST it.
#[derive(Debug, Clone)]
pub struct Event {
    id: Option<String>,
    event_type: String,
    created: i64,
    livemode: bool,
    account: Option<String>,
    api: Api,
    object: Value,
}

pub fn event(event_type: &str, object: Value) -> Event {
    Event {
        id: None,
        event_type: event_type.to_owned(),
        created: T0,
        livemode: false,
        account: None,
        api: Api::Legacy,
        object,
    }
}

impl Event {
    pub fn id(mut self, id: &str) -> Self {
        self.id = Some(id.to_owned());
        self
    }

    pub fn created(mut self, created: i64) -> Self {
        self.created = created;
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

    /// The request body. Without an explicit id, the id is derived from the event's content so
    /// that tests stay deterministic.
    pub fn body(&self) -> String {
        let id = self.id.clone().unwrap_or_else(|| {
            let object_id = self.object["id"].as_str().unwrap_or("none");
            let status = self.object["status"].as_str().unwrap_or("none");
            format!(
                "evt_{}_{}_{object_id}_{status}",
                self.created, self.event_type
            )
        });
        let mut body = json!({
            "id": id,
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
            set(&mut body, "/account", json!(account));
        }
        body.to_string()
    }

    pub fn try_project(&self) -> Result<ProjectedEvent, ProjectionError> {
        let body = self.body();
        let envelope = EventEnvelope::parse(body.as_bytes()).expect("a valid envelope");
        project(&envelope)
    }

    pub fn project(&self) -> ProjectedEvent {
        self.try_project().expect("the event projects")
    }
}
