//! Typed snapshots of an event's `data.object`: only the fields the projection queries, parsed
//! from both API shapes (before and since 2025-03-31.basil), plus the exact JSON text so the
//! store can keep the whole snapshot beside its columns.
//!
//! Parsing goes in two steps: a borrowed struct picks the needed members out of the object as
//! `&RawValue` (unknown members are skipped without allocating), then each member is decoded on
//! its own. That costs nothing extra and lets every error name the field at fault, which is what
//! an operator reads in the dead-letter queue. Errors depend only on the bytes, never on the
//! time or the order of arrival, so a redrive of the same bytes fails the same way.

use std::fmt::{self, Display};
use std::marker::PhantomData;

use serde::de::{self, value::MapAccessDeserializer, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::rank;

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerSnapshot {
    pub id: String,
    pub livemode: bool,
    pub email: Option<String>,
    pub name: Option<String>,
    /// The event is `customer.deleted`, or the object says `deleted: true`.
    pub deleted: bool,
    /// The exact JSON text of `data.object`.
    pub raw: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionSnapshot {
    pub id: String,
    pub customer: String,
    pub status: String,
    pub livemode: bool,
    pub cancel_at_period_end: bool,
    /// The subscription's own `current_period_end` (before basil), else the latest of its
    /// items' (basil and later, where the period moved to the items).
    pub current_period_end: Option<i64>,
    pub items: Vec<SubscriptionItem>,
    pub raw: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionItem {
    pub id: String,
    /// From `price`, falling back to the legacy `plan`.
    pub price: Option<String>,
    pub product: Option<String>,
    pub lookup_key: Option<String>,
    pub quantity: Option<i64>,
    pub current_period_end: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceSnapshot {
    pub id: String,
    pub customer: Option<String>,
    /// `subscription` (before basil) or `parent.subscription_details.subscription`.
    pub subscription: Option<String>,
    pub status: Option<String>,
    /// `paid` (before basil) or `status == "paid"` (basil removed the flag).
    pub paid: bool,
    pub amount_paid: i64,
    pub attempt_count: i64,
    pub next_payment_attempt: Option<i64>,
    /// The latest `lines.data[].period.end`, falling back to `period_end`.
    pub paid_through: Option<i64>,
    pub livemode: bool,
    pub raw: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutSessionSnapshot {
    pub id: String,
    /// When the session was created: which of a customer's sessions is the latest must not
    /// depend on when its events were sent or a backfill fetched it.
    pub created: Option<i64>,
    pub customer: Option<String>,
    pub client_reference_id: Option<String>,
    pub mode: String,
    pub status: Option<String>,
    pub payment_status: String,
    pub subscription: Option<String>,
    /// `metadata.price`: what a one-time purchase bought (the event carries no line items).
    pub metadata_price: Option<String>,
    /// `metadata.product`: as `metadata_price`, by product.
    pub metadata_product: Option<String>,
    pub livemode: bool,
    pub raw: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntitlementSummarySnapshot {
    pub customer: String,
    /// `entitlements.data[].lookup_key`, sorted and deduplicated.
    pub lookup_keys: Vec<String>,
    pub livemode: bool,
    pub raw: String,
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

// ---------------------------------------------------------------------------------------------
// Members of `data.object`, kept raw until decoded one by one.

const ROOT: &str = "data.object";

#[derive(Deserialize)]
struct CustomerMembers<'a> {
    #[serde(borrow)]
    object: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    livemode: Option<&'a RawValue>,
    #[serde(borrow)]
    email: Option<&'a RawValue>,
    #[serde(borrow)]
    name: Option<&'a RawValue>,
    #[serde(borrow)]
    deleted: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct SubscriptionMembers<'a> {
    #[serde(borrow)]
    object: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    customer: Option<&'a RawValue>,
    #[serde(borrow)]
    status: Option<&'a RawValue>,
    #[serde(borrow)]
    livemode: Option<&'a RawValue>,
    #[serde(borrow)]
    cancel_at_period_end: Option<&'a RawValue>,
    #[serde(borrow)]
    current_period_end: Option<&'a RawValue>,
    #[serde(borrow)]
    items: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct SubscriptionItemMembers<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    price: Option<&'a RawValue>,
    #[serde(borrow)]
    plan: Option<&'a RawValue>,
    #[serde(borrow)]
    quantity: Option<&'a RawValue>,
    #[serde(borrow)]
    current_period_end: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct InvoiceMembers<'a> {
    #[serde(borrow)]
    object: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    customer: Option<&'a RawValue>,
    #[serde(borrow)]
    subscription: Option<&'a RawValue>,
    #[serde(borrow)]
    parent: Option<&'a RawValue>,
    #[serde(borrow)]
    status: Option<&'a RawValue>,
    #[serde(borrow)]
    paid: Option<&'a RawValue>,
    #[serde(borrow)]
    amount_paid: Option<&'a RawValue>,
    #[serde(borrow)]
    attempt_count: Option<&'a RawValue>,
    #[serde(borrow)]
    next_payment_attempt: Option<&'a RawValue>,
    #[serde(borrow)]
    lines: Option<&'a RawValue>,
    #[serde(borrow)]
    period_end: Option<&'a RawValue>,
    #[serde(borrow)]
    livemode: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct CheckoutSessionMembers<'a> {
    #[serde(borrow)]
    object: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    created: Option<&'a RawValue>,
    #[serde(borrow)]
    customer: Option<&'a RawValue>,
    #[serde(borrow)]
    client_reference_id: Option<&'a RawValue>,
    #[serde(borrow)]
    mode: Option<&'a RawValue>,
    #[serde(borrow)]
    status: Option<&'a RawValue>,
    #[serde(borrow)]
    payment_status: Option<&'a RawValue>,
    #[serde(borrow)]
    subscription: Option<&'a RawValue>,
    #[serde(borrow)]
    metadata: Option<&'a RawValue>,
    #[serde(borrow)]
    livemode: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct EntitlementSummaryMembers<'a> {
    #[serde(borrow)]
    object: Option<&'a RawValue>,
    #[serde(borrow)]
    customer: Option<&'a RawValue>,
    #[serde(borrow)]
    entitlements: Option<&'a RawValue>,
    #[serde(borrow)]
    livemode: Option<&'a RawValue>,
}

/// A Stripe list object, `{"object":"list","data":[…],"has_more":…}`.
#[derive(Deserialize)]
struct ListMembers<'a> {
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// The price of a subscription item (or its legacy `plan`, which has the same `id` and
/// `product` and no `lookup_key`).
#[derive(Deserialize)]
struct PriceFields {
    id: String,
    #[serde(default)]
    product: Option<Expandable<IdOnly>>,
    #[serde(default)]
    lookup_key: Option<String>,
}

/// Any expanded Stripe object, of which only the id is needed.
#[derive(Deserialize)]
struct IdOnly {
    id: String,
}

/// Basil's `invoice.parent`.
#[derive(Deserialize)]
struct InvoiceParent {
    #[serde(default)]
    subscription_details: Option<SubscriptionDetails>,
}

#[derive(Deserialize)]
struct SubscriptionDetails {
    #[serde(default)]
    subscription: Option<Expandable<IdOnly>>,
}

#[derive(Deserialize)]
struct InvoiceLine {
    #[serde(default)]
    period: Option<Period>,
}

#[derive(Deserialize)]
struct Period {
    #[serde(default)]
    end: Option<i64>,
}

#[derive(Deserialize)]
struct CheckoutMetadata {
    #[serde(default)]
    price: Option<String>,
    #[serde(default)]
    product: Option<String>,
}

#[derive(Deserialize)]
struct ActiveEntitlementMembers<'a> {
    #[serde(borrow)]
    lookup_key: Option<&'a RawValue>,
}

/// A reference Stripe renders as an id string, or as the whole object when it was expanded.
enum Expandable<T> {
    Id(String),
    Object(T),
}

impl Expandable<IdOnly> {
    fn into_id(self) -> String {
        match self {
            Expandable::Id(id) | Expandable::Object(IdOnly { id }) => id,
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Expandable<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ExpandableVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for ExpandableVisitor<T> {
            type Value = Expandable<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an id string or an expanded object")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Expandable::Id(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Expandable::Id(v))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(Expandable::Object)
            }
        }

        deserializer.deserialize_any(ExpandableVisitor(PhantomData))
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding one member, with the field's path in every error.

/// serde_json's message without its "at line … column …" suffix: the position inside one
/// member's text says nothing the field path does not.
fn message(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.rfind(" at line ") {
        Some(end) => text[..end].to_owned(),
        None => text,
    }
}

/// The needed members of a JSON object.
fn members<'a, T: Deserialize<'a>>(raw: &'a RawValue, path: &dyn Display) -> Result<T, String> {
    // Checked first because a derived struct would also accept an array, positionally.
    if !raw.get().starts_with('{') {
        return Err(format!("`{path}` is not an object"));
    }
    serde_json::from_str(raw.get()).map_err(|e| format!("`{path}`: {}", message(&e)))
}

/// An optional member: absent and `null` are both `None`.
fn optional<'a, T: Deserialize<'a>>(
    raw: Option<&'a RawValue>,
    path: &dyn Display,
) -> Result<Option<T>, String> {
    match raw {
        None => Ok(None),
        Some(raw) => serde_json::from_str::<Option<T>>(raw.get())
            .map_err(|e| format!("`{path}`: {}", message(&e))),
    }
}

fn required<'a, T: Deserialize<'a>>(
    raw: Option<&'a RawValue>,
    path: &dyn Display,
) -> Result<T, String> {
    optional(raw, path)?.ok_or_else(|| format!("`{path}` is missing or null"))
}

/// A required id, which Stripe never sends empty.
fn required_id(raw: Option<&RawValue>, path: &dyn Display) -> Result<String, String> {
    let id: String = required(raw, path)?;
    if id.is_empty() {
        return Err(format!("`{path}` is empty"));
    }
    Ok(id)
}

/// An optional reference to another object: its id, whether or not it was expanded.
fn optional_ref(raw: Option<&RawValue>, path: &dyn Display) -> Result<Option<String>, String> {
    Ok(optional::<Expandable<IdOnly>>(raw, path)?.map(Expandable::into_id))
}

fn required_ref(raw: Option<&RawValue>, path: &dyn Display) -> Result<String, String> {
    let id = optional_ref(raw, path)?.ok_or_else(|| format!("`{path}` is missing or null"))?;
    if id.is_empty() {
        return Err(format!("`{path}` is empty"));
    }
    Ok(id)
}

/// The elements of a Stripe list object, still raw.
fn list<'a>(raw: &'a RawValue, path: &dyn Display) -> Result<Vec<&'a RawValue>, String> {
    if !raw.get().starts_with('{') {
        return Err(format!("`{path}` is not a list object"));
    }
    let list: ListMembers<'a> = members(raw, path)?;
    let data = list
        .data
        .ok_or_else(|| format!("`{path}.data` is missing or null"))?;
    if !data.get().starts_with('[') {
        return Err(format!("`{path}.data` is not an array"));
    }
    serde_json::from_str(data.get()).map_err(|e| format!("`{path}.data`: {}", message(&e)))
}

/// The family check: an event type promises an object type, and a mismatch means the event
/// cannot be trusted for either.
fn expect_object(raw: Option<&RawValue>, kind: ObjectKind) -> Result<(), String> {
    let path = at("object");
    let expected = kind.stripe_object();
    match optional::<String>(raw, &path)? {
        Some(found) if found == expected => Ok(()),
        Some(found) => Err(format!("`{path}` is {found:?}, expected {expected:?}")),
        None => Err(format!(
            "`{path}` is missing or null, expected {expected:?}"
        )),
    }
}

/// The path of a top-level member of `data.object`, rendered only when an error names it.
struct Member<'a>(&'a str);

impl Display for Member<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ROOT}.{}", self.0)
    }
}

fn at(member: &str) -> Member<'_> {
    Member(member)
}

/// The path of an element of a list member (`data.object.items.data[0]`), or of a member of
/// that element; rendered only when an error names it.
struct Element {
    list: &'static str,
    index: usize,
    member: Option<&'static str>,
}

impl Element {
    fn of(list: &'static str, index: usize) -> Element {
        Element {
            list,
            index,
            member: None,
        }
    }

    fn member(&self, member: &'static str) -> Element {
        Element {
            member: Some(member),
            ..*self
        }
    }
}

impl Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ROOT}.{}.data[{}]", self.list, self.index)?;
        match self.member {
            Some(member) => write!(f, ".{member}"),
            None => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------------

impl CustomerSnapshot {
    fn parse(event_type: &str, object: &RawValue, livemode: bool) -> Result<Self, String> {
        let m: CustomerMembers = members(object, &ROOT)?;
        expect_object(m.object, ObjectKind::Customer)?;
        let flagged_deleted: Option<bool> = optional(m.deleted, &at("deleted"))?;
        Ok(CustomerSnapshot {
            id: required_id(m.id, &at("id"))?,
            livemode: optional(m.livemode, &at("livemode"))?.unwrap_or(livemode),
            email: optional(m.email, &at("email"))?,
            name: optional(m.name, &at("name"))?,
            deleted: event_type == "customer.deleted" || flagged_deleted == Some(true),
            raw: object.get().to_owned(),
        })
    }
}

impl SubscriptionSnapshot {
    fn parse(object: &RawValue, livemode: bool) -> Result<Self, String> {
        let m: SubscriptionMembers = members(object, &ROOT)?;
        expect_object(m.object, ObjectKind::Subscription)?;
        let id = required_id(m.id, &at("id"))?;
        let customer = required_ref(m.customer, &at("customer"))?;
        let status: String = required(m.status, &at("status"))?;
        // Stripe always sends `items`; tolerate its absence as "no items" but not a wrong type.
        let items = match m.items {
            None => Vec::new(),
            Some(raw) => list(raw, &at("items"))?
                .into_iter()
                .enumerate()
                .map(|(index, item)| SubscriptionItem::parse(item, index))
                .collect::<Result<Vec<_>, _>>()?,
        };
        let current_period_end = match optional(m.current_period_end, &at("current_period_end"))? {
            Some(end) => Some(end),
            None => items.iter().filter_map(|i| i.current_period_end).max(),
        };
        Ok(SubscriptionSnapshot {
            id,
            customer,
            status,
            livemode: optional(m.livemode, &at("livemode"))?.unwrap_or(livemode),
            cancel_at_period_end: optional(m.cancel_at_period_end, &at("cancel_at_period_end"))?
                .unwrap_or(false),
            current_period_end,
            items,
            raw: object.get().to_owned(),
        })
    }
}

impl SubscriptionItem {
    fn parse(raw: &RawValue, index: usize) -> Result<Self, String> {
        let item = Element::of("items", index);
        let m: SubscriptionItemMembers = members(raw, &item)?;
        let price = match optional::<Expandable<PriceFields>>(m.price, &item.member("price"))? {
            Some(price) => Some(price),
            None => optional(m.plan, &item.member("plan"))?,
        };
        let (price, product, lookup_key) = match price {
            None => (None, None, None),
            Some(Expandable::Id(id)) => (Some(id), None, None),
            Some(Expandable::Object(p)) => {
                (Some(p.id), p.product.map(Expandable::into_id), p.lookup_key)
            }
        };
        Ok(SubscriptionItem {
            id: required_id(m.id, &item.member("id"))?,
            price,
            product,
            lookup_key,
            quantity: optional(m.quantity, &item.member("quantity"))?,
            current_period_end: optional(m.current_period_end, &item.member("current_period_end"))?,
        })
    }
}

impl InvoiceSnapshot {
    fn parse(object: &RawValue, livemode: bool) -> Result<Self, String> {
        let m: InvoiceMembers = members(object, &ROOT)?;
        expect_object(m.object, ObjectKind::Invoice)?;
        let id = required_id(m.id, &at("id"))?;
        let status: Option<String> = optional(m.status, &at("status"))?;
        let subscription = match optional_ref(m.subscription, &at("subscription"))? {
            Some(subscription) => Some(subscription),
            None => optional::<InvoiceParent>(m.parent, &at("parent"))?
                .and_then(|p| p.subscription_details)
                .and_then(|d| d.subscription)
                .map(Expandable::into_id),
        };
        let line_end = match m.lines {
            None => None,
            Some(raw) => {
                let mut latest = None;
                for (index, line) in list(raw, &at("lines"))?.into_iter().enumerate() {
                    let line: InvoiceLine = members(line, &Element::of("lines", index))?;
                    latest = latest.max(line.period.and_then(|p| p.end));
                }
                latest
            }
        };
        let paid_flag: Option<bool> = optional(m.paid, &at("paid"))?;
        Ok(InvoiceSnapshot {
            id,
            customer: optional_ref(m.customer, &at("customer"))?,
            subscription,
            paid: paid_flag == Some(true) || status.as_deref() == Some("paid"),
            status,
            amount_paid: optional(m.amount_paid, &at("amount_paid"))?.unwrap_or(0),
            attempt_count: optional(m.attempt_count, &at("attempt_count"))?.unwrap_or(0),
            next_payment_attempt: optional(m.next_payment_attempt, &at("next_payment_attempt"))?,
            paid_through: match line_end {
                Some(end) => Some(end),
                None => optional(m.period_end, &at("period_end"))?,
            },
            livemode: optional(m.livemode, &at("livemode"))?.unwrap_or(livemode),
            raw: object.get().to_owned(),
        })
    }
}

impl CheckoutSessionSnapshot {
    fn parse(object: &RawValue, livemode: bool) -> Result<Self, String> {
        let m: CheckoutSessionMembers = members(object, &ROOT)?;
        expect_object(m.object, ObjectKind::CheckoutSession)?;
        let metadata: Option<CheckoutMetadata> = optional(m.metadata, &at("metadata"))?;
        let (metadata_price, metadata_product) = match metadata {
            Some(m) => (m.price, m.product),
            None => (None, None),
        };
        Ok(CheckoutSessionSnapshot {
            id: required_id(m.id, &at("id"))?,
            created: optional(m.created, &at("created"))?,
            customer: optional_ref(m.customer, &at("customer"))?,
            client_reference_id: optional(m.client_reference_id, &at("client_reference_id"))?,
            mode: required(m.mode, &at("mode"))?,
            status: optional(m.status, &at("status"))?,
            payment_status: required(m.payment_status, &at("payment_status"))?,
            subscription: optional_ref(m.subscription, &at("subscription"))?,
            metadata_price,
            metadata_product,
            livemode: optional(m.livemode, &at("livemode"))?.unwrap_or(livemode),
            raw: object.get().to_owned(),
        })
    }
}

impl EntitlementSummarySnapshot {
    fn parse(object: &RawValue, livemode: bool) -> Result<Self, String> {
        let m: EntitlementSummaryMembers = members(object, &ROOT)?;
        expect_object(m.object, ObjectKind::EntitlementSummary)?;
        let customer = required_ref(m.customer, &at("customer"))?;
        // Unlike a subscription's items, the list is the whole point of the object.
        let entitlements = m
            .entitlements
            .ok_or_else(|| format!("`{ROOT}.entitlements` is missing or null"))?;
        let mut lookup_keys = list(entitlements, &at("entitlements"))?
            .into_iter()
            .enumerate()
            .map(|(index, raw)| {
                let path = Element::of("entitlements", index);
                let entitlement: ActiveEntitlementMembers = members(raw, &path)?;
                required::<String>(entitlement.lookup_key, &path.member("lookup_key"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        lookup_keys.sort_unstable();
        lookup_keys.dedup();
        Ok(EntitlementSummarySnapshot {
            customer,
            lookup_keys,
            livemode: optional(m.livemode, &at("livemode"))?.unwrap_or(livemode),
            raw: object.get().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::projection::testing::{self, set, Api};

    fn parse(
        kind: ObjectKind,
        event_type: &str,
        object: &serde_json::Value,
    ) -> Result<Snapshot, String> {
        let text = object.to_string();
        let raw: Box<RawValue> = serde_json::from_str(&text).expect("valid JSON");
        Snapshot::parse(kind, event_type, &raw, false)
    }

    fn subscription(object: &serde_json::Value) -> SubscriptionSnapshot {
        match parse(
            ObjectKind::Subscription,
            "customer.subscription.updated",
            object,
        ) {
            Ok(Snapshot::Subscription(s)) => s,
            other => panic!("expected a subscription, got {other:?}"),
        }
    }

    fn invoice(object: &serde_json::Value) -> InvoiceSnapshot {
        match parse(ObjectKind::Invoice, "invoice.paid", object) {
            Ok(Snapshot::Invoice(s)) => s,
            other => panic!("expected an invoice, got {other:?}"),
        }
    }

    fn shape_error(kind: ObjectKind, event_type: &str, object: &serde_json::Value) -> String {
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

    #[test]
    fn legacy_subscription_reads_period_from_the_subscription() {
        // Arrange
        let object = testing::fixture(Api::Legacy, "subscription");

        // Act
        let s = subscription(&object);

        // Assert
        assert_eq!(s.id, "sub_1MoqxHLgUG5tbmjcG8lOfx2N");
        assert_eq!(s.customer, "cus_NZbFQAsc0ptasX");
        assert_eq!(s.status, "active");
        assert!(!s.livemode);
        assert!(!s.cancel_at_period_end);
        assert_eq!(s.current_period_end, Some(1_234_567_890));
        assert_eq!(
            s.items,
            vec![SubscriptionItem {
                id: "si_Na0zOJYhm6UPMj".into(),
                price: Some("price_1MoS37LgUG5tbmjcCA3GTNX8".into()),
                product: Some("prod_NZbFOV0OmNHxwl".into()),
                lookup_key: None,
                quantity: Some(1),
                current_period_end: None,
            }]
        );
        assert_eq!(s.raw, object.to_string());
    }

    #[test]
    fn basil_subscription_reads_period_from_the_latest_item() {
        let mut object = testing::fixture(Api::Basil, "subscription");
        let mut second = object["items"]["data"][0].clone();
        set(&mut second, "/id", json!("si_second"));
        set(&mut second, "/current_period_end", json!(1_800_000_000));
        set(&mut second, "/price/lookup_key", json!("team_monthly"));
        object["items"]["data"]
            .as_array_mut()
            .expect("array")
            .push(second);

        let s = subscription(&object);

        assert_eq!(s.current_period_end, Some(1_800_000_000));
        assert_eq!(s.items[0].current_period_end, Some(1_746_057_600));
        assert_eq!(s.items[1].lookup_key.as_deref(), Some("team_monthly"));
    }

    #[test]
    fn expanded_customer_and_product_are_read_by_id() {
        let mut object = testing::fixture(Api::Legacy, "subscription");
        set(
            &mut object,
            "/customer",
            testing::fixture(Api::Legacy, "customer"),
        );
        set(
            &mut object,
            "/items/data/0/price/product",
            json!({"id": "prod_expanded", "object": "product", "name": "Pro", "deleted": null}),
        );

        let s = subscription(&object);

        assert_eq!(s.customer, "cus_NZbFQAsc0ptasX");
        assert_eq!(s.items[0].product.as_deref(), Some("prod_expanded"));
    }

    #[test]
    fn item_without_price_falls_back_to_the_legacy_plan() {
        let mut object = testing::fixture(Api::Legacy, "subscription");
        set(&mut object, "/items/data/0/price", json!(null));
        set(
            &mut object,
            "/items/data/0/plan",
            json!({"id": "plan_legacy", "object": "plan", "product": "prod_legacy"}),
        );

        let s = subscription(&object);

        assert_eq!(s.items[0].price.as_deref(), Some("plan_legacy"));
        assert_eq!(s.items[0].product.as_deref(), Some("prod_legacy"));
        assert_eq!(s.items[0].lookup_key, None);
    }

    #[test]
    fn nulls_and_missing_optional_fields_are_tolerated() {
        let object = json!({
            "object": "subscription", "id": "sub_1", "customer": "cus_1", "status": "active",
            "livemode": null, "cancel_at_period_end": null, "current_period_end": null,
            "items": {"object": "list", "data": [{"id": "si_1", "price": "price_1", "quantity": null}]}
        });

        let s = subscription(&object);

        assert!(!s.cancel_at_period_end);
        assert_eq!(s.current_period_end, None);
        assert_eq!(s.items[0].price.as_deref(), Some("price_1"));
        assert_eq!(s.items[0].product, None);
    }

    #[test]
    fn legacy_invoice_reads_subscription_paid_flag_and_line_periods() {
        let mut object = testing::fixture(Api::Legacy, "invoice");
        set(&mut object, "/subscription", json!("sub_legacy"));
        set(&mut object, "/paid", json!(true));
        set(&mut object, "/status", json!("paid"));
        set(&mut object, "/amount_paid", json!(2000));

        let i = invoice(&object);

        assert_eq!(i.id, "in_1MoqxGLgUG5tbmjcJeILGSau");
        assert_eq!(i.customer.as_deref(), Some("cus_NZbFQAsc0ptasX"));
        assert_eq!(i.subscription.as_deref(), Some("sub_legacy"));
        assert!(i.paid);
        assert_eq!(i.amount_paid, 2000);
        assert_eq!(i.attempt_count, 0);
        assert_eq!(i.next_payment_attempt, Some(1_234_567_890));
        assert_eq!(i.paid_through, Some(1_679_588_731));
    }

    #[test]
    fn basil_invoice_reads_subscription_from_parent_and_paid_from_status() {
        let mut object = testing::fixture(Api::Basil, "invoice");
        set(&mut object, "/status", json!("paid"));

        let i = invoice(&object);

        assert_eq!(
            i.subscription.as_deref(),
            Some("sub_1MoqxHLgUG5tbmjcG8lOfx2N")
        );
        assert!(i.paid);
    }

    #[test]
    fn unpaid_basil_invoice_is_not_paid() {
        let object = testing::fixture(Api::Basil, "invoice");

        let i = invoice(&object);

        assert_eq!(i.status.as_deref(), Some("draft"));
        assert!(!i.paid);
    }

    #[test]
    fn invoice_without_lines_falls_back_to_period_end() {
        let mut object = testing::fixture(Api::Legacy, "invoice");
        set(&mut object, "/lines/data", json!([]));
        set(&mut object, "/period_end", json!(1_700_000_000));

        assert_eq!(invoice(&object).paid_through, Some(1_700_000_000));
    }

    #[test]
    fn invoice_paid_through_is_the_latest_line_period_end() {
        let mut object = testing::fixture(Api::Legacy, "invoice");
        let mut later = object["lines"]["data"][0].clone();
        set(&mut later, "/period/end", json!(1_900_000_000));
        object["lines"]["data"]
            .as_array_mut()
            .expect("array")
            .insert(0, later);

        assert_eq!(invoice(&object).paid_through, Some(1_900_000_000));
    }

    #[test]
    fn checkout_session_reads_the_purchase_metadata() {
        let mut object = testing::fixture(Api::Legacy, "checkout.session");
        set(
            &mut object,
            "/metadata",
            json!({"price": "price_lifetime", "product": "prod_book", "other": "x"}),
        );
        set(
            &mut object,
            "/customer",
            json!({"id": "cus_9", "object": "customer"}),
        );
        set(&mut object, "/client_reference_id", json!("user_42"));

        let s = match parse(
            ObjectKind::CheckoutSession,
            "checkout.session.completed",
            &object,
        ) {
            Ok(Snapshot::CheckoutSession(s)) => s,
            other => panic!("expected a session, got {other:?}"),
        };

        assert_eq!(s.customer.as_deref(), Some("cus_9"));
        assert_eq!(s.client_reference_id.as_deref(), Some("user_42"));
        assert_eq!(s.mode, "payment");
        assert_eq!(s.status.as_deref(), Some("open"));
        assert_eq!(s.payment_status, "unpaid");
        assert_eq!(s.metadata_price.as_deref(), Some("price_lifetime"));
        assert_eq!(s.metadata_product.as_deref(), Some("prod_book"));
    }

    #[test]
    fn entitlement_summary_lookup_keys_are_sorted_and_deduplicated() {
        let object = testing::entitlement_summary("cus_1", &["sso", "audit", "sso"]);

        let s = match parse(
            ObjectKind::EntitlementSummary,
            "entitlements.active_entitlement_summary.updated",
            &object,
        ) {
            Ok(Snapshot::EntitlementSummary(s)) => s,
            other => panic!("expected a summary, got {other:?}"),
        };

        assert_eq!(s.customer, "cus_1");
        assert_eq!(s.lookup_keys, vec!["audit".to_owned(), "sso".to_owned()]);
    }

    #[test]
    fn deleted_customer_stub_is_read_as_deleted() {
        let object = testing::fixture(Api::Legacy, "deleted_customer");

        let s = match parse(ObjectKind::Customer, "customer.updated", &object) {
            Ok(Snapshot::Customer(s)) => s,
            other => panic!("expected a customer, got {other:?}"),
        };

        assert!(s.deleted);
        assert_eq!(s.email, None);
    }

    #[test]
    fn malformed_objects_are_rejected_with_the_field_at_fault() {
        let sub = || testing::fixture(Api::Legacy, "subscription");
        let cases: Vec<(ObjectKind, serde_json::Value, &str)> = vec![
            (ObjectKind::Subscription, without(sub(), "id"), "`data.object.id` is missing or null"),
            (
                ObjectKind::Subscription,
                without(sub(), "customer"),
                "`data.object.customer` is missing or null",
            ),
            (
                ObjectKind::Subscription,
                with(sub(), "/status", json!(null)),
                "`data.object.status` is missing or null",
            ),
            (
                ObjectKind::Subscription,
                with(sub(), "/status", json!(5)),
                "`data.object.status`: invalid type: integer `5`, expected a string",
            ),
            (
                ObjectKind::Subscription,
                with(sub(), "/id", json!("")),
                "`data.object.id` is empty",
            ),
            (
                ObjectKind::Subscription,
                with(sub(), "/items", json!([])),
                "`data.object.items` is not a list object",
            ),
            (
                ObjectKind::Subscription,
                with(sub(), "/items/data", json!({})),
                "`data.object.items.data` is not an array",
            ),
            (
                ObjectKind::Subscription,
                with(sub(), "/items/data/0", json!("si_1")),
                "`data.object.items.data[0]` is not an object",
            ),
            (
                ObjectKind::Subscription,
                with(sub(), "/items/data/0/price", json!(7)),
                "`data.object.items.data[0].price`: invalid type: integer `7`, expected an id string or an expanded object",
            ),
            (
                ObjectKind::Subscription,
                with(sub(), "/customer", json!({"object": "customer"})),
                "`data.object.customer`: missing field `id`",
            ),
            (
                ObjectKind::Subscription,
                with(sub(), "/object", json!("invoice")),
                "`data.object.object` is \"invoice\", expected \"subscription\"",
            ),
            (
                ObjectKind::Subscription,
                without(sub(), "object"),
                "`data.object.object` is missing or null, expected \"subscription\"",
            ),
            (
                ObjectKind::Invoice,
                without(testing::fixture(Api::Legacy, "invoice"), "id"),
                "`data.object.id` is missing or null",
            ),
            (
                ObjectKind::Invoice,
                with(testing::fixture(Api::Legacy, "invoice"), "/lines", json!("nope")),
                "`data.object.lines` is not a list object",
            ),
            (
                ObjectKind::CheckoutSession,
                without(testing::fixture(Api::Legacy, "checkout.session"), "mode"),
                "`data.object.mode` is missing or null",
            ),
            (
                ObjectKind::EntitlementSummary,
                without(testing::entitlement_summary("cus_1", &["sso"]), "entitlements"),
                "`data.object.entitlements` is missing or null",
            ),
            (
                ObjectKind::EntitlementSummary,
                with(
                    testing::entitlement_summary("cus_1", &["sso"]),
                    "/entitlements/data/0/lookup_key",
                    json!(null),
                ),
                "`data.object.entitlements.data[0].lookup_key` is missing or null",
            ),
            (
                ObjectKind::Customer,
                with(testing::fixture(Api::Legacy, "customer"), "/email", json!(["a"])),
                "`data.object.email`: invalid type: sequence, expected a string",
            ),
        ];
        for (kind, object, expected) in cases {
            let event_type = format!("{}.updated", kind.stripe_object());
            assert_eq!(shape_error(kind, &event_type, &object), expected);
        }
    }

    #[test]
    fn the_same_bytes_fail_with_the_same_reason() {
        let object = with(
            testing::fixture(Api::Legacy, "subscription"),
            "/items",
            json!(3),
        );

        let first = shape_error(
            ObjectKind::Subscription,
            "customer.subscription.updated",
            &object,
        );
        let second = shape_error(
            ObjectKind::Subscription,
            "customer.subscription.updated",
            &object,
        );

        assert_eq!(first, second);
    }

    fn with(
        mut object: serde_json::Value,
        pointer: &str,
        value: serde_json::Value,
    ) -> serde_json::Value {
        set(&mut object, pointer, value);
        object
    }

    fn without(mut object: serde_json::Value, key: &str) -> serde_json::Value {
        object.as_object_mut().expect("object").remove(key);
        object
    }
}
