//! The projection's test payloads: testkit's Stripe builders (real Stripe object shapes, the
//! one envelope), run through the real parser and projection.

use serde_json::Value;
use shared::EventEnvelope;
pub use testkit::stripe::reference::{
    checkout_session, customer, entitlement_summary, invoice, subscription, CUSTOMER,
};
pub use testkit::stripe::{fixture, set, Api, Item, T0};

use super::policy::EntitlementPolicy;
use super::{project, ProjectedEvent, ProjectionError};

/// The entitlements.toml most tests run against: SPEC §7's example and two one-time grants.
pub const POLICY: &str = concat!(
    testkit::spec_entitlements!(),
    r#"
[[grant]]
price = "price_lifetime"
features = ["lifetime"]

[[grant]]
product = "prod_ebook"
features = ["ebook"]
"#
);

pub fn policy(toml: &str) -> EntitlementPolicy {
    EntitlementPolicy::from_toml_str(toml).expect("a valid policy")
}

/// testkit's event envelope, which this crate can also project.
#[derive(Debug, Clone)]
pub struct Event(testkit::stripe::Event);

/// An event of the 2022-11-15 API at [`T0`] with an id derived from its content.
pub fn event(event_type: &str, object: Value) -> Event {
    Event(testkit::stripe::event(event_type, object))
}

impl Event {
    pub fn id(self, id: &str) -> Self {
        Event(self.0.id(id))
    }

    pub fn created(self, created: i64) -> Self {
        Event(self.0.created(created))
    }

    pub fn account(self, account: &str) -> Self {
        Event(self.0.account(account))
    }

    pub fn livemode(self, livemode: bool) -> Self {
        Event(self.0.livemode(livemode))
    }

    pub fn api(self, api: Api) -> Self {
        Event(self.0.api(api))
    }

    pub fn body(&self) -> String {
        self.0.body()
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
