//! Typed snapshots of an event's `data.object`: only the fields the projection queries, parsed
//! from both API shapes (before and since 2025-03-31.basil), plus the exact JSON text so the
//! store can keep the whole snapshot beside its columns.
//!
//! One file per Stripe object: its snapshot type, the members it reads and the rules that turn
//! one into the other. [`decode`] is how every one of them names the field at fault.

use std::fmt::{self, Display};

use serde_json::value::RawValue;

use super::rank;

mod checkout;
mod customer;
mod decode;
mod entitlement_summary;
mod invoice;
mod subscription;

pub use checkout::CheckoutSessionSnapshot;
pub use customer::CustomerSnapshot;
pub use entitlement_summary::EntitlementSummarySnapshot;
pub use invoice::InvoiceSnapshot;
pub use subscription::{SubscriptionItem, SubscriptionSnapshot};

/// The object families the projection keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    Customer,
    Subscription,
    Invoice,
    CheckoutSession,
    EntitlementSummary,
}

impl ObjectKind {
    /// The family an event type belongs to, or `None` when the projection ignores that type.
    /// A backfill snapshot (`<object type>.backfilled`, SPEC §11) belongs to its object's
    /// family like Stripe's own events of it.
    pub fn for_event_type(event_type: &str) -> Option<ObjectKind> {
        match event_type {
            "customer.created"
            | "customer.updated"
            | "customer.deleted"
            | "customer.backfilled" => Some(ObjectKind::Customer),
            "entitlements.active_entitlement_summary.updated"
            | "entitlements.active_entitlement_summary.backfilled" => {
                Some(ObjectKind::EntitlementSummary)
            }
            // A preview of the next invoice: it has no id and is not a state of any real
            // invoice, so keeping it would only fail or mislead.
            "invoice.upcoming" => None,
            t if t.starts_with("customer.subscription.") => Some(ObjectKind::Subscription),
            t if t.starts_with("invoice.") => Some(ObjectKind::Invoice),
            t if t.starts_with("checkout.session.") => Some(ObjectKind::CheckoutSession),
            _ => None,
        }
    }

    /// The value of `data.object.object` that events of this family carry.
    pub fn stripe_object(self) -> &'static str {
        match self {
            ObjectKind::Customer => "customer",
            ObjectKind::Subscription => "subscription",
            ObjectKind::Invoice => "invoice",
            ObjectKind::CheckoutSession => "checkout.session",
            ObjectKind::EntitlementSummary => "entitlements.active_entitlement_summary",
        }
    }

    /// A stable snake_case name for columns, metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Customer => "customer",
            ObjectKind::Subscription => "subscription",
            ObjectKind::Invoice => "invoice",
            ObjectKind::CheckoutSession => "checkout_session",
            ObjectKind::EntitlementSummary => "entitlement_summary",
        }
    }
}

impl Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The snapshot an event carries, by family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Snapshot {
    Customer(CustomerSnapshot),
    Subscription(SubscriptionSnapshot),
    Invoice(InvoiceSnapshot),
    CheckoutSession(CheckoutSessionSnapshot),
    EntitlementSummary(EntitlementSummarySnapshot),
}

impl Snapshot {
    pub fn kind(&self) -> ObjectKind {
        match self {
            Snapshot::Customer(_) => ObjectKind::Customer,
            Snapshot::Subscription(_) => ObjectKind::Subscription,
            Snapshot::Invoice(_) => ObjectKind::Invoice,
            Snapshot::CheckoutSession(_) => ObjectKind::CheckoutSession,
            Snapshot::EntitlementSummary(_) => ObjectKind::EntitlementSummary,
        }
    }

    /// The id the object is kept under. A customer has one entitlement summary and Stripe
    /// gives it no id of its own, so it is kept under the customer's id.
    pub fn object_id(&self) -> &str {
        match self {
            Snapshot::Customer(s) => &s.id,
            Snapshot::Subscription(s) => &s.id,
            Snapshot::Invoice(s) => &s.id,
            Snapshot::CheckoutSession(s) => &s.id,
            Snapshot::EntitlementSummary(s) => &s.customer,
        }
    }

    /// The customer the object belongs to, when it names one.
    pub fn customer(&self) -> Option<&str> {
        match self {
            Snapshot::Customer(s) => Some(&s.id),
            Snapshot::Subscription(s) => Some(&s.customer),
            Snapshot::Invoice(s) => s.customer.as_deref(),
            Snapshot::CheckoutSession(s) => s.customer.as_deref(),
            Snapshot::EntitlementSummary(s) => Some(&s.customer),
        }
    }

    /// The object's lifecycle status, for the kinds that have one.
    pub fn status(&self) -> Option<&str> {
        match self {
            Snapshot::Subscription(s) => Some(&s.status),
            Snapshot::Invoice(s) => s.status.as_deref(),
            Snapshot::CheckoutSession(s) => s.status.as_deref(),
            Snapshot::Customer(_) | Snapshot::EntitlementSummary(_) => None,
        }
    }

    /// [`rank::status_rank`] of this snapshot.
    pub fn status_rank(&self) -> i16 {
        rank::status_rank(self.kind(), self.status())
    }

    pub fn livemode(&self) -> bool {
        match self {
            Snapshot::Customer(s) => s.livemode,
            Snapshot::Subscription(s) => s.livemode,
            Snapshot::Invoice(s) => s.livemode,
            Snapshot::CheckoutSession(s) => s.livemode,
            Snapshot::EntitlementSummary(s) => s.livemode,
        }
    }

    /// The exact JSON text of `data.object`.
    pub fn raw(&self) -> &str {
        match self {
            Snapshot::Customer(s) => &s.raw,
            Snapshot::Subscription(s) => &s.raw,
            Snapshot::Invoice(s) => &s.raw,
            Snapshot::CheckoutSession(s) => &s.raw,
            Snapshot::EntitlementSummary(s) => &s.raw,
        }
    }

    /// Parses `data.object` of an event of family `kind`. `livemode` is the envelope's, used
    /// when the object does not say. The error is the reason, naming the field at fault.
    pub fn parse(
        kind: ObjectKind,
        event_type: &str,
        object: &RawValue,
        livemode: bool,
    ) -> Result<Snapshot, String> {
        Ok(match kind {
            ObjectKind::Customer => {
                Snapshot::Customer(CustomerSnapshot::parse(event_type, object, livemode)?)
            }
            ObjectKind::Subscription => {
                Snapshot::Subscription(SubscriptionSnapshot::parse(object, livemode)?)
            }
            ObjectKind::Invoice => Snapshot::Invoice(InvoiceSnapshot::parse(object, livemode)?),
            ObjectKind::CheckoutSession => {
                Snapshot::CheckoutSession(CheckoutSessionSnapshot::parse(object, livemode)?)
            }
            ObjectKind::EntitlementSummary => {
                Snapshot::EntitlementSummary(EntitlementSummarySnapshot::parse(object, livemode)?)
            }
        })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::projection::testing::set;

    /// `object` parsed as the `data.object` of an event of `event_type`.
    pub(crate) fn parse(
        kind: ObjectKind,
        event_type: &str,
        object: &serde_json::Value,
    ) -> Result<Snapshot, String> {
        let text = object.to_string();
        let raw: Box<RawValue> = serde_json::from_str(&text).expect("valid JSON");
        Snapshot::parse(kind, event_type, &raw, false)
    }

    pub(crate) fn shape_error(
        kind: ObjectKind,
        event_type: &str,
        object: &serde_json::Value,
    ) -> String {
        match parse(kind, event_type, object) {
            Err(reason) => reason,
            Ok(s) => panic!("expected a shape error, got {s:?}"),
        }
    }

    #[test]
    fn event_types_map_to_their_families() {
        let cases = [
            ("customer.created", Some(ObjectKind::Customer)),
            ("customer.updated", Some(ObjectKind::Customer)),
            ("customer.deleted", Some(ObjectKind::Customer)),
            (
                "customer.subscription.created",
                Some(ObjectKind::Subscription),
            ),
            (
                "customer.subscription.trial_will_end",
                Some(ObjectKind::Subscription),
            ),
            (
                "customer.subscription.paused",
                Some(ObjectKind::Subscription),
            ),
            ("invoice.paid", Some(ObjectKind::Invoice)),
            ("invoice.payment_failed", Some(ObjectKind::Invoice)),
            (
                "checkout.session.completed",
                Some(ObjectKind::CheckoutSession),
            ),
            (
                "checkout.session.async_payment_succeeded",
                Some(ObjectKind::CheckoutSession),
            ),
            (
                "entitlements.active_entitlement_summary.updated",
                Some(ObjectKind::EntitlementSummary),
            ),
            ("invoice.upcoming", None),
            ("invoiceitem.created", None),
            ("invoice_payment.paid", None),
            ("customer.discount.created", None),
            ("customer.source.created", None),
            ("payment_intent.succeeded", None),
        ];
        for (event_type, expected) in cases {
            assert_eq!(
                ObjectKind::for_event_type(event_type),
                expected,
                "{event_type}"
            );
        }
    }

    pub(crate) fn with(
        mut object: serde_json::Value,
        pointer: &str,
        value: serde_json::Value,
    ) -> serde_json::Value {
        set(&mut object, pointer, value);
        object
    }

    pub(crate) fn without(mut object: serde_json::Value, key: &str) -> serde_json::Value {
        object.as_object_mut().expect("object").remove(key);
        object
    }
}
