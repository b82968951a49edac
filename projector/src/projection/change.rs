//! The one entitlement change model: when a customer's entitlement object has changed, what
//! the feature difference is, and the change message that announces it. Live batches, redrive,
//! history and the rebuild swap all decide and describe a change here.

use std::collections::BTreeSet;

use shared::{Cause, ChangeMessage};

use super::entitlements::EntitlementView;

/// Whether two stored entitlement objects are the same entitlement state. `updated_at` alone
/// changing (an invoice, a profile update) is not a change downstream needs to hear about.
///
/// The rebuild's set-based diff (`rebuild::diff`) states the same rule in SQL, as
/// `(a - 'updated_at') IS DISTINCT FROM (b - 'updated_at')`.
pub fn same_entitlements(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => {
            a.len() == b.len()
                && a.iter()
                    .all(|(k, v)| k == "updated_at" || b.get(k) == Some(v))
        }
        _ => a == b,
    }
}

/// The features a change grants and takes away, each sorted and without duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeatureDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

impl FeatureDiff {
    pub fn between<B, A>(before: &[B], after: &[A]) -> Self
    where
        B: AsRef<str>,
        A: AsRef<str>,
    {
        let before: BTreeSet<&str> = before.iter().map(AsRef::as_ref).collect();
        let after: BTreeSet<&str> = after.iter().map(AsRef::as_ref).collect();
        FeatureDiff {
            added: after.difference(&before).map(|f| (*f).to_owned()).collect(),
            removed: before.difference(&after).map(|f| (*f).to_owned()).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// The change message for a customer whose object is now `object` at `version`, having
/// granted `features_before` until now.
pub fn change_message<O, B: AsRef<str>, A: AsRef<str>>(
    object: O,
    version: i64,
    features_before: &[B],
    features_after: &[A],
    cause: Cause,
) -> ChangeMessage<O> {
    let diff = FeatureDiff::between(features_before, features_after);
    ChangeMessage::new(object, version, diff.added, diff.removed, cause)
}

/// The object of a customer the projection knew and a replay no longer knows (a fix moved
/// their events elsewhere, say): kept, with nothing granted, so downstream hears of the loss.
pub fn vanished(
    account: &str,
    customer: &str,
    livemode: bool,
    updated_at_unix: i64,
) -> EntitlementView {
    EntitlementView {
        customer: customer.to_owned(),
        account: (!account.is_empty()).then(|| account.to_owned()),
        livemode,
        client_reference_id: None,
        features: Vec::new(),
        subscriptions: Vec::new(),
        updated_at_unix,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn feature_diff_lists_what_was_granted_and_what_was_taken_away() {
        let diff = FeatureDiff::between(&["api", "pro", "sso"], &["team", "api", "audit"]);

        assert_eq!(diff.added, vec!["audit", "team"]);
        assert_eq!(diff.removed, vec!["pro", "sso"]);
        assert!(!diff.is_empty());
        assert!(FeatureDiff::between(&["a"], &["a"]).is_empty());
    }

    #[test]
    fn updated_at_alone_is_not_a_change() {
        let a =
            json!({"customer": "cus_1", "features": ["pro"], "updated_at": "2026-01-01T00:00:00Z"});
        let b =
            json!({"customer": "cus_1", "features": ["pro"], "updated_at": "2026-02-01T00:00:00Z"});
        let c = json!({"customer": "cus_1", "features": [], "updated_at": "2026-01-01T00:00:00Z"});
        let d = json!({"customer": "cus_1", "features": ["pro"]});

        assert!(same_entitlements(&a, &b));
        assert!(!same_entitlements(&a, &c));
        assert!(!same_entitlements(&a, &d), "a missing field is a change");
    }

    #[test]
    fn change_message_carries_the_diff_and_the_cause() {
        let message = change_message(
            json!({"customer": "cus_1"}),
            3,
            &["api".to_owned()],
            &["pro".to_owned()],
            Cause::event("evt_9", "invoice.paid"),
        );

        assert_eq!(message.version, 3);
        assert_eq!(message.added, vec!["pro"]);
        assert_eq!(message.removed, vec!["api"]);
        assert_eq!(message.cause.event_id.as_deref(), Some("evt_9"));
        assert_eq!(message.kind, shared::change::ENTITLEMENTS_CHANGED);
    }

    #[test]
    fn vanished_customer_keeps_its_identity_and_loses_everything() {
        let view = vanished("acct_1", "cus_1", true, 1_767_225_600);

        let value = serde_json::to_value(&view).unwrap();

        assert_eq!(
            value,
            json!({"customer": "cus_1", "account": "acct_1", "livemode": true,
                   "client_reference_id": null, "features": [], "subscriptions": [],
                   "updated_at": "2026-01-01T00:00:00Z"})
        );
    }
}
