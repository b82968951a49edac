//! A customer's entitlements, derived from their current snapshots (SPEC §7) and shaped as the
//! read API and the change messages report them (SPEC §8).
//!
//! Always recomputed from the whole state, never patched per event: the result then depends
//! only on which snapshots are current, which is order-insensitive by construction.

use std::collections::BTreeSet;

use serde::{Serialize, Serializer};

use super::policy::{EntitlementPolicy, Matcher};
use super::rank::Rank;
use super::snapshot::{CheckoutSessionSnapshot, SubscriptionItem};
use super::state::CustomerState;

/// The SPEC §8 entitlement object, without `version` (a store counter, not derived state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntitlementView {
    pub customer: String,
    /// `None` (JSON `null`) for the platform account.
    pub account: Option<String>,
    pub livemode: bool,
    pub client_reference_id: Option<String>,
    /// Sorted and deduplicated.
    pub features: Vec<String>,
    /// Every subscription the projection knows, ended ones included, sorted by id.
    pub subscriptions: Vec<SubscriptionView>,
    /// The `created` of the customer's latest event rather than a wall-clock time, so that a
    /// rebuild reproduces the same object. Serialized as §8's `updated_at` (RFC 3339, UTC).
    #[serde(rename = "updated_at", serialize_with = "serialize_rfc3339")]
    pub updated_at_unix: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubscriptionView {
    pub id: String,
    pub status: String,
    pub items: Vec<ItemView>,
    pub current_period_end: Option<i64>,
    pub cancel_at_period_end: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ItemView {
    pub price: Option<String>,
    pub product: Option<String>,
}

impl EntitlementView {
    /// `updated_at` as §8 reports it.
    pub fn updated_at(&self) -> String {
        rfc3339(self.updated_at_unix)
    }
}

/// Whether the view grants `feature`.
pub fn features_granted(view: &EntitlementView, feature: &str) -> bool {
    view.features.iter().any(|f| f == feature)
}

/// Derives a customer's entitlements from their state under a policy.
pub fn compute(state: &CustomerState, policy: &EntitlementPolicy) -> EntitlementView {
    let mut features = BTreeSet::new();
    // A deleted customer keeps nothing, whatever their subscriptions still say (Stripe cancels
    // them too, but those events may arrive later or never be applied).
    if !state.deleted {
        for (_, subscription) in state.subscriptions.values() {
            if !policy.grants_access(&subscription.status) {
                continue;
            }
            for item in &subscription.items {
                for grant in &policy.grants {
                    if matches_item(&grant.matcher, item) {
                        features.extend(grant.features.iter().cloned());
                    }
                }
            }
        }
        if let Some((_, summary)) = &state.summary {
            features.extend(summary.lookup_keys.iter().cloned());
        }
        for (_, session) in state.checkout_sessions.values() {
            if !is_paid_one_time_purchase(session) {
                continue;
            }
            for grant in &policy.grants {
                if matches_purchase(&grant.matcher, session) {
                    features.extend(grant.features.iter().cloned());
                }
            }
        }
    }

    // The latest session by its own creation time; the rank only breaks ties, since a
    // backfill gives every session it fetches the same second.
    let client_reference_id = state
        .checkout_sessions
        .values()
        .filter_map(|(rank, s)| {
            s.client_reference_id
                .as_ref()
                .map(|id| ((s.created, rank), id))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, id)| id.clone());

    EntitlementView {
        customer: state.customer.clone(),
        account: (!state.account.is_empty()).then(|| state.account.clone()),
        livemode: latest_livemode(state),
        client_reference_id,
        features: features.into_iter().collect(),
        subscriptions: state
            .subscriptions
            .values()
            .map(|(_, s)| SubscriptionView {
                id: s.id.clone(),
                status: s.status.clone(),
                items: s
                    .items
                    .iter()
                    .map(|i| ItemView {
                        price: i.price.clone(),
                        product: i.product.clone(),
                    })
                    .collect(),
                current_period_end: s.current_period_end,
                cancel_at_period_end: s.cancel_at_period_end,
            })
            .collect(),
        updated_at_unix: state.last_event_created,
    }
}

fn matches_item(matcher: &Matcher, item: &SubscriptionItem) -> bool {
    match matcher {
        Matcher::Product(product) => item.product.as_ref() == Some(product),
        Matcher::Price(price) => item.price.as_ref() == Some(price),
        Matcher::LookupKey(key) => item.lookup_key.as_ref() == Some(key),
    }
}

/// Stripe's checkout events carry no line items, so a one-time purchase names what was bought
/// in its metadata; a lookup key cannot be named that way.
fn matches_purchase(matcher: &Matcher, session: &CheckoutSessionSnapshot) -> bool {
    match matcher {
        Matcher::Product(product) => session.metadata_product.as_ref() == Some(product),
        Matcher::Price(price) => session.metadata_price.as_ref() == Some(price),
        Matcher::LookupKey(_) => false,
    }
}

/// A completed Checkout in `payment` mode whose money arrived: for delayed methods that is
/// `async_payment_succeeded`, not `completed`.
fn is_paid_one_time_purchase(session: &CheckoutSessionSnapshot) -> bool {
    session.mode == "payment"
        && session.payment_status == "paid"
        && session
            .status
            .as_deref()
            .is_none_or(|status| status == "complete")
}

/// The livemode of the customer's most recently ranked object.
fn latest_livemode(state: &CustomerState) -> bool {
    let profile = state.profile.iter().map(|(r, s)| (r, s.livemode));
    let subscriptions = state.subscriptions.values().map(|(r, s)| (r, s.livemode));
    let invoices = state.invoices.values().map(|(r, s)| (r, s.livemode));
    let sessions = state
        .checkout_sessions
        .values()
        .map(|(r, s)| (r, s.livemode));
    let summary = state.summary.iter().map(|(r, s)| (r, s.livemode));
    profile
        .chain(subscriptions)
        .chain(invoices)
        .chain(sessions)
        .chain(summary)
        .max_by(|a: &(&Rank, bool), b| a.0.cmp(b.0))
        .is_some_and(|(_, livemode)| livemode)
}

fn serialize_rfc3339<S: Serializer>(unix: &i64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&rfc3339(*unix))
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(unix: i64) -> String {
    // Clamped to years 0001..=9999: RFC 3339 has four-digit years, whatever `created` a
    // payload claimed.
    const MIN: i64 = -62_135_596_800; // 0001-01-01T00:00:00Z
    const MAX: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    time::OffsetDateTime::from_unix_timestamp(unix.clamp(MIN, MAX))
        .ok()
        .and_then(|instant| {
            instant
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        // Unreachable within the clamp; an empty string rather than a panic in a serializer.
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::projection::testing::{self, event, policy, set, Api, CUSTOMER, POLICY, T0};
    use crate::projection::ProjectedEvent;

    const PRO: testing::Item<'static> = ("price_pro_month", "prod_pro", None);
    const TEAM: testing::Item<'static> = ("price_team_month", "prod_team", None);
    const ENTERPRISE: testing::Item<'static> = ("price_ent_year", "prod_ent", Some("enterprise"));
    const BASIC: testing::Item<'static> = ("price_basic", "prod_basic", None);

    fn view(events: &[ProjectedEvent]) -> EntitlementView {
        view_under(events, POLICY)
    }

    fn view_under(events: &[ProjectedEvent], toml: &str) -> EntitlementView {
        let mut state = CustomerState::new("", CUSTOMER);
        for e in events {
            state.apply(e);
        }
        compute(&state, &policy(toml))
    }

    fn sub(
        event_type: &str,
        id: &str,
        status: &str,
        items: &[testing::Item<'_>],
        created: i64,
    ) -> ProjectedEvent {
        event(
            event_type,
            testing::subscription(Api::Legacy, id, status, items),
        )
        .created(created)
        .project()
    }

    fn features(view: &EntitlementView) -> Vec<&str> {
        view.features.iter().map(String::as_str).collect()
    }

    #[test]
    fn active_subscription_grants_the_features_of_its_product() {
        // Arrange
        let created = sub(
            "customer.subscription.created",
            "sub_1",
            "active",
            &[PRO],
            T0,
        );

        // Act
        let view = view(&[created]);

        // Assert
        assert_eq!(features(&view), ["api", "pro"]);
        assert!(features_granted(&view, "pro"));
        assert!(!features_granted(&view, "team"));
    }

    #[test]
    fn grants_match_by_product_price_and_lookup_key() {
        let created = sub(
            "customer.subscription.created",
            "sub_1",
            "active",
            &[PRO, TEAM, ENTERPRISE, BASIC],
            T0,
        );

        assert_eq!(
            features(&view(&[created])),
            ["api", "audit", "pro", "sso", "team"]
        );
    }

    #[test]
    fn features_are_the_sorted_union_over_subscriptions() {
        let a = sub(
            "customer.subscription.created",
            "sub_a",
            "active",
            &[PRO],
            T0,
        );
        let b = sub(
            "customer.subscription.created",
            "sub_b",
            "trialing",
            &[PRO, TEAM],
            T0,
        );

        assert_eq!(features(&view(&[a, b])), ["api", "pro", "team"]);
    }

    #[test]
    fn trialing_subscription_grants_features_and_keeps_them_when_active() {
        let trial = sub(
            "customer.subscription.created",
            "sub_1",
            "trialing",
            &[PRO],
            T0,
        );
        let active = sub(
            "customer.subscription.updated",
            "sub_1",
            "active",
            &[PRO],
            T0 + 3_600,
        );

        let during_trial = view(std::slice::from_ref(&trial));
        let after_trial = view(&[active, trial]);

        assert_eq!(features(&during_trial), ["api", "pro"]);
        assert_eq!(features(&after_trial), ["api", "pro"]);
        assert_eq!(after_trial.subscriptions[0].status, "active");
    }

    #[test]
    fn past_due_subscription_keeps_access_when_policy_grants() {
        let past_due = sub(
            "customer.subscription.updated",
            "sub_1",
            "past_due",
            &[PRO],
            T0,
        );

        assert_eq!(features(&view(&[past_due])), ["api", "pro"]);
    }

    #[test]
    fn past_due_subscription_loses_access_when_policy_revokes() {
        let past_due = sub(
            "customer.subscription.updated",
            "sub_1",
            "past_due",
            &[PRO],
            T0,
        );
        let revoking = POLICY.replace("past_due = \"grant\"", "past_due = \"revoke\"");

        let view = view_under(&[past_due], &revoking);

        assert!(view.features.is_empty());
        assert_eq!(view.subscriptions[0].status, "past_due");
    }

    #[test]
    fn statuses_without_access_grant_nothing() {
        for status in [
            "unpaid",
            "paused",
            "canceled",
            "incomplete",
            "incomplete_expired",
        ] {
            let s = sub(
                "customer.subscription.updated",
                "sub_1",
                status,
                &[PRO, ENTERPRISE],
                T0,
            );

            let view = view(&[s]);

            assert!(
                view.features.is_empty(),
                "{status} granted {:?}",
                view.features
            );
            assert_eq!(view.subscriptions.len(), 1, "{status}");
        }
    }

    #[test]
    fn paused_subscription_loses_access_until_resumed() {
        let active = sub(
            "customer.subscription.created",
            "sub_1",
            "active",
            &[PRO],
            T0,
        );
        let paused = sub(
            "customer.subscription.paused",
            "sub_1",
            "paused",
            &[PRO],
            T0 + 10,
        );
        let resumed = sub(
            "customer.subscription.resumed",
            "sub_1",
            "active",
            &[PRO],
            T0 + 20,
        );

        let while_paused = view(&[active.clone(), paused.clone()]);
        let after_resume = view(&[resumed, paused, active]);

        assert!(while_paused.features.is_empty());
        assert_eq!(features(&after_resume), ["api", "pro"]);
    }

    #[test]
    fn deleted_subscription_revokes_its_features_and_stays_listed() {
        let active = sub(
            "customer.subscription.created",
            "sub_1",
            "active",
            &[PRO],
            T0,
        );
        let deleted = sub(
            "customer.subscription.deleted",
            "sub_1",
            "canceled",
            &[PRO],
            T0 + 60,
        );

        let view = view(&[deleted, active]);

        assert!(view.features.is_empty());
        assert_eq!(view.subscriptions.len(), 1);
        assert_eq!(view.subscriptions[0].status, "canceled");
    }

    #[test]
    fn upgrade_and_downgrade_change_features() {
        let basic = sub(
            "customer.subscription.created",
            "sub_1",
            "active",
            &[BASIC],
            T0,
        );
        let upgraded = sub(
            "customer.subscription.updated",
            "sub_1",
            "active",
            &[ENTERPRISE],
            T0 + 10,
        );
        let downgraded = sub(
            "customer.subscription.updated",
            "sub_1",
            "active",
            &[TEAM],
            T0 + 20,
        );

        assert!(view(std::slice::from_ref(&basic)).features.is_empty());
        assert_eq!(
            features(&view(&[basic.clone(), upgraded.clone()])),
            ["audit", "sso"]
        );
        assert_eq!(features(&view(&[downgraded, basic, upgraded])), ["team"]);
    }

    #[test]
    fn checkout_completed_links_the_customer_to_its_client_reference_id() {
        let mut session = testing::checkout_session("cs_1", "subscription", "paid");
        set(&mut session, "/client_reference_id", json!("user_42"));
        set(&mut session, "/subscription", json!("sub_1"));
        let completed = event("checkout.session.completed", session).project();

        let view = view(&[completed]);

        assert_eq!(view.client_reference_id.as_deref(), Some("user_42"));
        // The redirect is UX; access follows the subscription, which has not arrived yet.
        assert!(view.features.is_empty());
    }

    #[test]
    fn client_reference_id_comes_from_the_latest_session_that_has_one() {
        let with_ref = |id: &str, reference: Option<&str>, created: i64| {
            let mut session = testing::checkout_session(id, "subscription", "paid");
            set(&mut session, "/client_reference_id", json!(reference));
            event("checkout.session.completed", session)
                .created(created)
                .project()
        };
        let old = with_ref("cs_old", Some("user_old"), T0);
        let new = with_ref("cs_new", Some("user_new"), T0 + 10);
        let newest_without = with_ref("cs_anon", None, T0 + 20);

        let view = view(&[newest_without, new, old]);

        assert_eq!(view.client_reference_id.as_deref(), Some("user_new"));
    }

    #[test]
    fn paid_one_time_purchase_grants_by_price_or_product_metadata() {
        let mut by_price = testing::checkout_session("cs_1", "payment", "paid");
        set(&mut by_price, "/metadata/price", json!("price_lifetime"));
        let mut by_product = testing::checkout_session("cs_2", "payment", "paid");
        set(&mut by_product, "/metadata/product", json!("prod_ebook"));

        let view = view(&[
            event("checkout.session.completed", by_price).project(),
            event("checkout.session.completed", by_product).project(),
        ]);

        assert_eq!(features(&view), ["ebook", "lifetime"]);
    }

    #[test]
    fn one_time_purchase_grants_only_once_the_payment_succeeded() {
        let mut session = testing::checkout_session("cs_1", "payment", "unpaid");
        set(&mut session, "/metadata/price", json!("price_lifetime"));
        let completed = event("checkout.session.completed", session.clone())
            .created(T0)
            .project();
        set(&mut session, "/payment_status", json!("paid"));
        let succeeded = event("checkout.session.async_payment_succeeded", session)
            .created(T0 + 300)
            .project();

        assert!(view(std::slice::from_ref(&completed)).features.is_empty());
        assert_eq!(features(&view(&[succeeded, completed])), ["lifetime"]);
    }

    #[test]
    fn purchase_metadata_grants_nothing_outside_payment_mode_or_when_expired() {
        let mut subscription_mode = testing::checkout_session("cs_1", "subscription", "paid");
        set(
            &mut subscription_mode,
            "/metadata/price",
            json!("price_lifetime"),
        );
        let mut expired = testing::checkout_session("cs_2", "payment", "paid");
        set(&mut expired, "/metadata/price", json!("price_lifetime"));
        set(&mut expired, "/status", json!("expired"));
        let mut lookup_only = testing::checkout_session("cs_3", "payment", "paid");
        set(&mut lookup_only, "/metadata/price", json!("enterprise"));

        let view = view(&[
            event("checkout.session.completed", subscription_mode).project(),
            event("checkout.session.expired", expired).project(),
            event("checkout.session.completed", lookup_only).project(),
        ]);

        assert!(view.features.is_empty());
    }

    #[test]
    fn paid_purchase_without_a_status_still_grants() {
        let mut session = testing::checkout_session("cs_1", "payment", "paid");
        set(&mut session, "/metadata/price", json!("price_lifetime"));
        set(&mut session, "/status", json!(null));

        let view = view(&[event("checkout.session.completed", session).project()]);

        assert_eq!(features(&view), ["lifetime"]);
    }

    #[test]
    fn entitlement_summary_lookup_keys_are_features() {
        let summary = event(
            "entitlements.active_entitlement_summary.updated",
            testing::entitlement_summary(CUSTOMER, &["beta", "sso"]),
        )
        .project();
        let active = sub(
            "customer.subscription.created",
            "sub_1",
            "active",
            &[PRO],
            T0,
        );

        assert_eq!(
            features(&view(&[summary, active])),
            ["api", "beta", "pro", "sso"]
        );
    }

    #[test]
    fn latest_entitlement_summary_replaces_the_previous_one() {
        let summary = |keys: &[&str], created: i64| {
            event(
                "entitlements.active_entitlement_summary.updated",
                testing::entitlement_summary(CUSTOMER, keys),
            )
            .created(created)
            .project()
        };

        let view = view(&[summary(&[], T0 + 5), summary(&["beta"], T0)]);

        assert!(view.features.is_empty());
    }

    #[test]
    fn customer_deleted_revokes_everything() {
        let mut purchase = testing::checkout_session("cs_1", "payment", "paid");
        set(&mut purchase, "/metadata/price", json!("price_lifetime"));
        set(&mut purchase, "/client_reference_id", json!("user_42"));
        let events = [
            sub(
                "customer.subscription.created",
                "sub_1",
                "active",
                &[PRO],
                T0,
            ),
            event("checkout.session.completed", purchase).project(),
            event(
                "entitlements.active_entitlement_summary.updated",
                testing::entitlement_summary(CUSTOMER, &["beta"]),
            )
            .project(),
            event("customer.deleted", testing::customer(CUSTOMER))
                .created(T0 + 60)
                .project(),
        ];

        let view = view(&events);

        assert!(view.features.is_empty());
        assert_eq!(view.subscriptions.len(), 1);
        assert_eq!(view.client_reference_id.as_deref(), Some("user_42"));
    }

    #[test]
    fn customer_known_only_from_a_customer_event_has_no_features() {
        let created = event("customer.created", testing::customer(CUSTOMER))
            .created(T0)
            .project();

        let view = view(&[created]);

        assert!(view.features.is_empty());
        assert!(view.subscriptions.is_empty());
        assert_eq!(view.client_reference_id, None);
        assert_eq!(view.updated_at_unix, T0);
    }

    #[test]
    fn basil_subscription_reports_the_item_period() {
        let object = testing::subscription(Api::Basil, "sub_1", "active", &[PRO]);
        let created = event("customer.subscription.created", object)
            .api(Api::Basil)
            .project();

        let view = view(&[created]);

        assert_eq!(features(&view), ["api", "pro"]);
        assert_eq!(
            view.subscriptions[0].current_period_end,
            Some(1_746_057_600)
        );
    }

    #[test]
    fn both_api_shapes_give_the_same_entitlements() {
        let legacy = event(
            "customer.subscription.updated",
            testing::subscription(Api::Legacy, "sub_1", "active", &[PRO, ENTERPRISE]),
        )
        .project();
        let basil = event(
            "customer.subscription.updated",
            testing::subscription(Api::Basil, "sub_1", "active", &[PRO, ENTERPRISE]),
        )
        .api(Api::Basil)
        .project();

        assert_eq!(view(&[legacy]).features, view(&[basil]).features);
    }

    #[test]
    fn livemode_is_that_of_the_latest_object() {
        let test_mode = event(
            "customer.subscription.created",
            testing::subscription(Api::Legacy, "sub_1", "active", &[]),
        )
        .created(T0)
        .project();
        let mut live_object = testing::invoice(Api::Legacy, "in_1", "paid");
        set(&mut live_object, "/livemode", json!(true));
        let live = event("invoice.paid", live_object)
            .livemode(true)
            .created(T0 + 1)
            .project();

        assert!(!view(std::slice::from_ref(&test_mode)).livemode);
        assert!(view(&[live, test_mode]).livemode);
    }

    #[test]
    fn connect_customer_reports_its_account() {
        let object = testing::subscription(Api::Legacy, "sub_1", "active", &[PRO]);
        let connect = event("customer.subscription.created", object)
            .account("acct_9")
            .project();
        let mut state = CustomerState::new("acct_9", CUSTOMER);
        state.apply(&connect);

        let view = compute(&state, &policy(POLICY));

        assert_eq!(view.account.as_deref(), Some("acct_9"));
        assert_eq!(features(&view), ["api", "pro"]);
    }

    #[test]
    fn view_serializes_with_the_spec_field_names() {
        let mut object = testing::subscription(Api::Legacy, "sub_1", "active", &[PRO]);
        set(&mut object, "/current_period_end", json!(1_767_225_600));
        let created = event("customer.subscription.created", object)
            .created(1_767_225_599)
            .project();

        let json = serde_json::to_value(view(&[created])).expect("serializes");

        assert_eq!(
            json,
            json!({
                "customer": CUSTOMER,
                "account": null,
                "livemode": false,
                "client_reference_id": null,
                "features": ["api", "pro"],
                "subscriptions": [{
                    "id": "sub_1",
                    "status": "active",
                    "items": [{"price": "price_pro_month", "product": "prod_pro"}],
                    "current_period_end": 1_767_225_600,
                    "cancel_at_period_end": false
                }],
                "updated_at": "2025-12-31T23:59:59Z"
            })
        );
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_600), "2026-01-01T00:00:00Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(i64::MIN), "0001-01-01T00:00:00Z");
    }
}
