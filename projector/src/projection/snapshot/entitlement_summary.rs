//! `entitlements.active_entitlement_summary.*`: the features Stripe says a customer has.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::decode::{decode, expect_object, required, required_ref, List, Reference};
use super::ObjectKind;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntitlementSummarySnapshot {
    pub customer: String,
    /// `entitlements.data[].lookup_key`, sorted and deduplicated.
    pub lookup_keys: Vec<String>,
    pub livemode: bool,
    pub raw: String,
}

/// The members of an active entitlement summary the projection reads.
#[derive(Deserialize)]
struct EntitlementSummary {
    object: Option<String>,
    customer: Option<Reference>,
    entitlements: Option<List<ActiveEntitlement>>,
    livemode: Option<bool>,
}

#[derive(Deserialize)]
struct ActiveEntitlement {
    lookup_key: Option<String>,
}

impl EntitlementSummarySnapshot {
    pub(super) fn parse(object: &RawValue, livemode: bool) -> Result<Self, String> {
        let s: EntitlementSummary = decode(object)?;
        expect_object(s.object.as_deref(), ObjectKind::EntitlementSummary)?;
        let customer = required_ref(s.customer, &"customer")?;
        // Unlike a subscription's items, the list is the whole point of the object.
        let List(entitlements) = required(s.entitlements, &"entitlements")?;
        let mut lookup_keys = entitlements
            .into_iter()
            .enumerate()
            .map(|(index, entitlement)| {
                required(
                    entitlement.lookup_key,
                    &format_args!("entitlements.data[{index}].lookup_key"),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        lookup_keys.sort_unstable();
        lookup_keys.dedup();
        Ok(EntitlementSummarySnapshot {
            customer,
            lookup_keys,
            livemode: s.livemode.unwrap_or(livemode),
            raw: object.get().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::{parse, shape_error, with, without};
    use super::super::Snapshot;
    use super::*;
    use crate::projection::testing;

    const EVENT: &str = "entitlements.active_entitlement_summary.updated";

    #[test]
    fn entitlement_summary_lookup_keys_are_sorted_and_deduplicated() {
        let object = testing::entitlement_summary("cus_1", &["sso", "audit", "sso"]);

        let s = match parse(ObjectKind::EntitlementSummary, EVENT, &object) {
            Ok(Snapshot::EntitlementSummary(s)) => s,
            other => panic!("expected a summary, got {other:?}"),
        };

        assert_eq!(s.customer, "cus_1");
        assert_eq!(s.lookup_keys, vec!["audit".to_owned(), "sso".to_owned()]);
    }

    #[test]
    fn malformed_summaries_are_rejected_with_the_field_at_fault() {
        let summary = || testing::entitlement_summary("cus_1", &["sso"]);
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                without(summary(), "entitlements"),
                "`data.object.entitlements` is missing or null",
            ),
            (
                with(summary(), "/entitlements/data/0/lookup_key", json!(null)),
                "`data.object.entitlements.data[0].lookup_key` is missing or null",
            ),
        ];
        for (object, expected) in cases {
            assert_eq!(
                shape_error(ObjectKind::EntitlementSummary, EVENT, &object),
                expected
            );
        }
    }
}
