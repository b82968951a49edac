//! Stripe's API-reference example objects (the fixtures), each with the overrides a test names.

use serde_json::{json, Value};

use super::{fixture, set, Api, Item};

/// The customer every fixture object belongs to.
pub const CUSTOMER: &str = "cus_NZbFQAsc0ptasX";

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
