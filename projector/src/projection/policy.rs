//! `entitlements.toml` (SPEC §7): what was bought → which features it grants.
//!
//! Parsed strictly, once, at start-up: a typo in a key would otherwise silently grant nothing,
//! so unknown keys are rejected and every error names the grant it is about.

use serde::Deserialize;

/// Whether a subscription in dunning (`past_due`) keeps its features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PastDue {
    /// Keep access while Stripe retries the payment (Stripe's own default behaviour).
    #[default]
    Grant,
    Revoke,
}

/// What a grant matches on a subscription item or a one-time purchase.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Matcher {
    Product(String),
    Price(String),
    /// A price's `lookup_key`.
    LookupKey(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub matcher: Matcher,
    /// Never empty.
    pub features: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EntitlementPolicy {
    pub past_due: PastDue,
    pub grants: Vec<Grant>,
}

/// Why an `entitlements.toml` was refused; each renders as one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("entitlements policy is not valid TOML or has an unknown key: {0}")]
    Syntax(String),
    #[error("entitlements policy grant[{index}] (the {ordinal} [[grant]]): {reason}", ordinal = ordinal(*.index + 1))]
    Grant { index: usize, reason: String },
}

fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    policy: Option<PolicySection>,
    /// Kept as raw tables so that errors inside a grant can name it by index.
    #[serde(default)]
    grant: Vec<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicySection {
    #[serde(default)]
    past_due: Option<PastDueSetting>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum PastDueSetting {
    Grant,
    Revoke,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantEntry {
    #[serde(default)]
    product: Option<String>,
    #[serde(default)]
    price: Option<String>,
    #[serde(default)]
    lookup_key: Option<String>,
    #[serde(default)]
    features: Option<Vec<String>>,
}

impl EntitlementPolicy {
    pub fn from_toml_str(text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
        let past_due = match file.policy.and_then(|p| p.past_due) {
            None | Some(PastDueSetting::Grant) => PastDue::Grant,
            Some(PastDueSetting::Revoke) => PastDue::Revoke,
        };
        let grants = file
            .grant
            .into_iter()
            .enumerate()
            .map(|(index, value)| {
                parse_grant(value).map_err(|reason| PolicyError::Grant { index, reason })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(EntitlementPolicy { past_due, grants })
    }

    /// Whether a subscription in `status` grants its features (SPEC §7).
    pub fn grants_access(&self, status: &str) -> bool {
        match status {
            "active" | "trialing" => true,
            "past_due" => self.past_due == PastDue::Grant,
            _ => false,
        }
    }
}

/// toml's own message spans several lines (with a source excerpt); start-up errors are one
/// line, so keep the message and point at the line instead.
fn syntax_error(text: &str, error: &toml::de::Error) -> PolicyError {
    let message = error.message().trim().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            PolicyError::Syntax(format!("line {line}: {message}"))
        }
        None => PolicyError::Syntax(message),
    }
}

fn parse_grant(value: toml::Value) -> Result<Grant, String> {
    let entry = GrantEntry::deserialize(value).map_err(|e| e.message().trim().to_owned())?;
    let matcher = match (entry.product, entry.price, entry.lookup_key) {
        (Some(product), None, None) => Matcher::Product(non_empty("product", product)?),
        (None, Some(price), None) => Matcher::Price(non_empty("price", price)?),
        (None, None, Some(key)) => Matcher::LookupKey(non_empty("lookup_key", key)?),
        (None, None, None) => {
            return Err("needs one of `product`, `price` or `lookup_key`".to_owned())
        }
        _ => {
            return Err(
                "has more than one of `product`, `price` and `lookup_key`; use one per grant"
                    .to_owned(),
            )
        }
    };
    let features = entry
        .features
        .ok_or_else(|| "needs `features`, a non-empty list of feature names".to_owned())?;
    if features.is_empty() {
        return Err("`features` is empty; a grant must grant something".to_owned());
    }
    if features.iter().any(|f| f.trim().is_empty()) {
        return Err("`features` contains an empty feature name".to_owned());
    }
    Ok(Grant { matcher, features })
}

fn non_empty(key: &str, value: String) -> Result<String, String> {
    if value.trim().is_empty() {
        return Err(format!("`{key}` is empty"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::testing::POLICY;

    #[test]
    fn spec_example_parses_into_grants() {
        // Arrange / Act
        let policy = EntitlementPolicy::from_toml_str(POLICY).expect("valid");

        // Assert
        assert_eq!(policy.past_due, PastDue::Grant);
        assert_eq!(
            policy.grants[..3],
            [
                Grant {
                    matcher: Matcher::Product("prod_pro".into()),
                    features: vec!["pro".into(), "api".into()],
                },
                Grant {
                    matcher: Matcher::Price("price_team_month".into()),
                    features: vec!["team".into()],
                },
                Grant {
                    matcher: Matcher::LookupKey("enterprise".into()),
                    features: vec!["sso".into(), "audit".into()],
                },
            ]
        );
    }

    #[test]
    fn past_due_defaults_to_grant() {
        let policy = EntitlementPolicy::from_toml_str("").expect("valid");

        assert_eq!(policy, EntitlementPolicy::default());
        assert_eq!(policy.past_due, PastDue::Grant);
        assert!(policy.grants.is_empty());
        assert_eq!(
            EntitlementPolicy::from_toml_str("[policy]\n")
                .expect("valid")
                .past_due,
            PastDue::Grant
        );
    }

    #[test]
    fn past_due_can_be_revoked() {
        let policy =
            EntitlementPolicy::from_toml_str("[policy]\npast_due = \"revoke\"\n").expect("valid");

        assert_eq!(policy.past_due, PastDue::Revoke);
        assert!(!policy.grants_access("past_due"));
        assert!(policy.grants_access("active"));
    }

    #[test]
    fn only_active_trialing_and_granted_past_due_give_access() {
        let policy = EntitlementPolicy::default();

        for status in ["active", "trialing", "past_due"] {
            assert!(policy.grants_access(status), "{status}");
        }
        for status in [
            "unpaid",
            "paused",
            "canceled",
            "incomplete",
            "incomplete_expired",
            "new",
        ] {
            assert!(!policy.grants_access(status), "{status}");
        }
    }

    #[test]
    fn grant_with_two_matchers_is_rejected_with_its_index() {
        let text = r#"
[[grant]]
product = "prod_a"
features = ["a"]

[[grant]]
product = "prod_b"
price = "price_b"
features = ["b"]
"#;

        let error = EntitlementPolicy::from_toml_str(text).unwrap_err();

        assert_eq!(
            error,
            PolicyError::Grant {
                index: 1,
                reason:
                    "has more than one of `product`, `price` and `lookup_key`; use one per grant"
                        .into()
            }
        );
        assert_eq!(
            error.to_string(),
            "entitlements policy grant[1] (the 2nd [[grant]]): has more than one of `product`, \
             `price` and `lookup_key`; use one per grant"
        );
    }

    #[test]
    fn grant_without_matcher_is_rejected() {
        let error =
            EntitlementPolicy::from_toml_str("[[grant]]\nfeatures = [\"a\"]\n").unwrap_err();

        assert_eq!(
            error.to_string(),
            "entitlements policy grant[0] (the 1st [[grant]]): needs one of `product`, `price` or `lookup_key`"
        );
    }

    #[test]
    fn grant_without_features_is_rejected() {
        let missing = EntitlementPolicy::from_toml_str("[[grant]]\nprice = \"p\"\n").unwrap_err();
        let empty = EntitlementPolicy::from_toml_str("[[grant]]\nprice = \"p\"\nfeatures = []\n")
            .unwrap_err();
        let blank =
            EntitlementPolicy::from_toml_str("[[grant]]\nprice = \"p\"\nfeatures = [\" \"]\n")
                .unwrap_err();

        assert!(
            matches!(missing, PolicyError::Grant { index: 0, ref reason } if reason.contains("needs `features`"))
        );
        assert!(
            matches!(empty, PolicyError::Grant { index: 0, ref reason } if reason.contains("`features` is empty"))
        );
        assert!(
            matches!(blank, PolicyError::Grant { index: 0, ref reason } if reason.contains("empty feature name"))
        );
    }

    #[test]
    fn empty_matcher_value_is_rejected() {
        let error =
            EntitlementPolicy::from_toml_str("[[grant]]\nproduct = \"\"\nfeatures = [\"a\"]\n")
                .unwrap_err();

        assert_eq!(
            error,
            PolicyError::Grant {
                index: 0,
                reason: "`product` is empty".into()
            }
        );
    }

    #[test]
    fn unknown_key_in_a_grant_is_rejected_with_its_index() {
        let text = "[[grant]]\nproduct = \"a\"\nfeatures = [\"a\"]\n\n[[grant]]\nprodcut = \"b\"\nfeatures = [\"b\"]\n";

        let error = EntitlementPolicy::from_toml_str(text).unwrap_err();

        match error {
            PolicyError::Grant { index, reason } => {
                assert_eq!(index, 1);
                assert!(reason.contains("unknown field `prodcut`"), "{reason}");
            }
            other => panic!("expected a grant error, got {other:?}"),
        }
    }

    #[test]
    fn unknown_top_level_or_policy_key_is_rejected() {
        let top = EntitlementPolicy::from_toml_str("[grants]\nx = 1\n").unwrap_err();
        let policy =
            EntitlementPolicy::from_toml_str("[policy]\npastdue = \"grant\"\n").unwrap_err();

        assert!(
            matches!(top, PolicyError::Syntax(ref m) if m.contains("unknown field `grants`")),
            "{top}"
        );
        assert!(
            matches!(policy, PolicyError::Syntax(ref m) if m.contains("unknown field `pastdue`")),
            "{policy}"
        );
    }

    #[test]
    fn invalid_past_due_value_is_rejected_on_one_line() {
        let error =
            EntitlementPolicy::from_toml_str("[policy]\npast_due = \"sometimes\"\n").unwrap_err();

        let message = error.to_string();
        assert!(message.contains("line 2"), "{message}");
        assert!(message.contains("sometimes"), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn ordinals_read_naturally() {
        let rendered: Vec<String> = [1, 2, 3, 4, 11, 12, 13, 21, 22, 101].map(ordinal).to_vec();
        assert_eq!(
            rendered,
            ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st"]
        );
    }
}
