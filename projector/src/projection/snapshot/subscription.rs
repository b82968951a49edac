//! `customer.subscription.*`: the subscription, its status and its items.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::decode::{
    decode, expect_object, required, required_id, required_ref, Expandable, List, Reference,
};
use super::ObjectKind;

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

/// The members of a subscription the projection reads.
#[derive(Deserialize)]
struct Subscription {
    object: Option<String>,
    id: Option<String>,
    customer: Option<Reference>,
    status: Option<String>,
    livemode: Option<bool>,
    cancel_at_period_end: Option<bool>,
    current_period_end: Option<i64>,
    items: Option<List<Item>>,
}

#[derive(Deserialize)]
struct Item {
    id: Option<String>,
    price: Option<Expandable<Price>>,
    plan: Option<Expandable<Price>>,
    quantity: Option<i64>,
    current_period_end: Option<i64>,
}

/// The price of a subscription item (or its legacy `plan`, which has the same `id` and
/// `product` and no `lookup_key`).
#[derive(Deserialize)]
struct Price {
    id: String,
    product: Option<Reference>,
    lookup_key: Option<String>,
}

impl SubscriptionSnapshot {
    pub(super) fn parse(object: &RawValue, livemode: bool) -> Result<Self, String> {
        let s: Subscription = decode(object)?;
        expect_object(s.object.as_deref(), ObjectKind::Subscription)?;
        let id = required_id(s.id, &"id")?;
        let customer = required_ref(s.customer, &"customer")?;
        let status = required(s.status, &"status")?;
        // Stripe always sends `items`; its absence reads as "no items", a wrong type does not.
        let items = match s.items {
            None => Vec::new(),
            Some(List(items)) => items
                .into_iter()
                .enumerate()
                .map(|(index, item)| SubscriptionItem::from_item(item, index))
                .collect::<Result<Vec<_>, _>>()?,
        };
        let current_period_end = s
            .current_period_end
            .or_else(|| items.iter().filter_map(|i| i.current_period_end).max());
        Ok(SubscriptionSnapshot {
            id,
            customer,
            status,
            livemode: s.livemode.unwrap_or(livemode),
            cancel_at_period_end: s.cancel_at_period_end.unwrap_or(false),
            current_period_end,
            items,
            raw: object.get().to_owned(),
        })
    }
}

impl SubscriptionItem {
    fn from_item(item: Item, index: usize) -> Result<Self, String> {
        let (price, product, lookup_key) = match item.price.or(item.plan) {
            None => (None, None, None),
            Some(Expandable::Id(id)) => (Some(id), None, None),
            Some(Expandable::Object(p)) => {
                (Some(p.id), p.product.map(Reference::into_id), p.lookup_key)
            }
        };
        Ok(SubscriptionItem {
            id: required_id(item.id, &format_args!("items.data[{index}].id"))?,
            price,
            product,
            lookup_key,
            quantity: item.quantity,
            current_period_end: item.current_period_end,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::{parse, shape_error, with, without};
    use super::super::Snapshot;
    use super::*;
    use crate::projection::testing::{self, set, Api};

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
    fn malformed_subscriptions_are_rejected_with_the_field_at_fault() {
        let sub = || testing::fixture(Api::Legacy, "subscription");
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (without(sub(), "id"), "`data.object.id` is missing or null"),
            (
                without(sub(), "customer"),
                "`data.object.customer` is missing or null",
            ),
            (
                with(sub(), "/status", json!(null)),
                "`data.object.status` is missing or null",
            ),
            (
                with(sub(), "/status", json!(5)),
                "`data.object.status`: invalid type: integer `5`, expected a string",
            ),
            (with(sub(), "/id", json!("")), "`data.object.id` is empty"),
            (
                with(sub(), "/items", json!([])),
                "`data.object.items`: invalid type: sequence, expected a list object",
            ),
            (
                with(sub(), "/items/data", json!({})),
                "`data.object.items.data`: invalid type: map, expected a sequence",
            ),
            (
                with(sub(), "/items/data/0", json!("si_1")),
                "`data.object.items.data[0]`: invalid type: string \"si_1\", expected an object",
            ),
            (
                with(sub(), "/items/data/0/id", json!(null)),
                "`data.object.items.data[0].id` is missing or null",
            ),
            (
                with(sub(), "/items/data/0/price", json!(7)),
                "`data.object.items.data[0].price`: invalid type: integer `7`, expected an id string or an expanded object",
            ),
            (
                with(sub(), "/customer", json!({"object": "customer"})),
                "`data.object.customer`: missing field `id`",
            ),
            (
                with(sub(), "/object", json!("invoice")),
                "`data.object.object` is \"invoice\", expected \"subscription\"",
            ),
            (
                without(sub(), "object"),
                "`data.object.object` is missing or null, expected \"subscription\"",
            ),
            (
                json!(["subscription", "sub_1"]),
                "`data.object`: invalid type: sequence, expected an object",
            ),
        ];
        for (object, expected) in cases {
            assert_eq!(
                shape_error(
                    ObjectKind::Subscription,
                    "customer.subscription.updated",
                    &object
                ),
                expected
            );
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
}
