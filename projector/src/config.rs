//! Projector configuration: read from the environment once at start-up, validated, typed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
pub use shared::config::ConfigError;
use shared::config::{err, num, topic};
use shared::kafka::KafkaSettings;

use crate::projection::EntitlementPolicy;

#[derive(Debug, Clone)]
pub struct Config {
    /// `KAFKA_BROKERS`, `KAFKA_CLIENT_PROPERTIES` and the `KAFKA_*` security overrides: how
    /// every Kafka client of this service connects (secrets redacted in Debug).
    pub kafka: KafkaSettings,
    /// `DATABASE_URL`: the projections database (contains a password: a secret).
    pub database_url: SecretString,
    /// `PROJECTOR_ADDR`: read API, health and metrics.
    pub addr: SocketAddr,
    /// `STRIPE_EVENTS_TOPIC`: the raw log.
    pub events_topic: String,
    /// `ENTITLEMENTS_TOPIC`: downstream change messages.
    pub entitlements_topic: String,
    /// `DLQ_TOPIC`: records the projector cannot use.
    pub dlq_topic: String,
    /// `ENTITLEMENTS_CONFIG`: the product/price → features mapping, loaded.
    pub policy: EntitlementPolicy,
    /// Where the policy came from, for logs (`None`: the default file is absent).
    pub policy_path: Option<PathBuf>,
    /// `API_TOKEN`: bearer token of the read API; `None` only with `API_AUTH=disabled`.
    pub api_token: Option<SecretString>,
    /// `PROJECTOR_GROUP`: the Kafka consumer group.
    pub group_id: String,
    /// `BATCH_MAX_EVENTS`: most records applied in one transaction (default 5000: a batch's
    /// fixed costs, its round trips and commit, spread over more events; BENCHMARKS.md).
    pub batch_max_events: usize,
    /// `BATCH_LINGER_MS`: how long a batch waits for more records after its first, ms.
    pub batch_linger: Duration,
    /// `STRIPE_EVENTS_PARTITIONS`: partitions of the raw log when the projector creates it
    /// (ingest usually does first).
    pub events_partitions: i32,
    /// `ENTITLEMENTS_PARTITIONS`: partitions of the change topic when the projector creates it.
    pub entitlements_partitions: i32,
    /// `DEDUPE_WINDOW_SECS`: how long an applied event id is kept for dedupe, seconds (default
    /// three days, Stripe's retry horizon). Older ids are pruned; an event re-delivered after
    /// that is re-applied as a no-op by the rank guard.
    pub dedupe_window: Duration,
    /// `DEDUPE_PRUNE_INTERVAL_SECS`: how often the pruning runs, seconds.
    pub dedupe_prune_interval: Duration,
}

pub const DEFAULT_DATABASE_URL: &str = "postgres://stripe:stripe@127.0.0.1:5432/stripe_pipeline";

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let database_url = get("DATABASE_URL").unwrap_or_else(|| DEFAULT_DATABASE_URL.into());
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            // Never echo the value: it carries a password.
            return Err(err("DATABASE_URL", "expected a postgres:// URL"));
        }
        let addr = get("PROJECTOR_ADDR").unwrap_or_else(|| "127.0.0.1:8081".into());
        let addr = addr.parse().map_err(|_| {
            err(
                "PROJECTOR_ADDR",
                format!("expected host:port, got `{addr}`"),
            )
        })?;

        let (policy, policy_path) = match get("ENTITLEMENTS_CONFIG") {
            Some(path) => (load_policy(&path)?, Some(PathBuf::from(path))),
            // The default file is optional: without it only Stripe's own entitlement
            // summaries grant features.
            None if std::path::Path::new("entitlements.toml").exists() => (
                load_policy("entitlements.toml")?,
                Some(PathBuf::from("entitlements.toml")),
            ),
            None => (EntitlementPolicy::default(), None),
        };

        let api_token = match (get("API_TOKEN"), get("API_AUTH").as_deref()) {
            (_, Some("disabled")) => None,
            (Some(token), None | Some("enabled")) => {
                if token.len() < 16 {
                    return Err(err("API_TOKEN", "must be at least 16 characters"));
                }
                Some(SecretString::from(token))
            }
            (None, None | Some("enabled")) => {
                return Err(err(
                    "API_TOKEN",
                    "required (or set API_AUTH=disabled to serve the read API without auth)",
                ))
            }
            (_, Some(other)) => {
                return Err(err(
                    "API_AUTH",
                    format!("expected `enabled` or `disabled`, got `{other}`"),
                ))
            }
        };

        let batch_max_events: usize = num(get("BATCH_MAX_EVENTS"), "BATCH_MAX_EVENTS", 5000)?;
        if !(1..=50_000).contains(&batch_max_events) {
            return Err(err("BATCH_MAX_EVENTS", "must be between 1 and 50000"));
        }
        let linger_ms: u64 = num(get("BATCH_LINGER_MS"), "BATCH_LINGER_MS", 20)?;
        if linger_ms > 10_000 {
            return Err(err("BATCH_LINGER_MS", "must be at most 10000"));
        }
        let events_partitions: i32 = num(
            get("STRIPE_EVENTS_PARTITIONS"),
            "STRIPE_EVENTS_PARTITIONS",
            6,
        )?;
        if events_partitions < 1 {
            return Err(err("STRIPE_EVENTS_PARTITIONS", "must be at least 1"));
        }
        let entitlements_partitions: i32 =
            num(get("ENTITLEMENTS_PARTITIONS"), "ENTITLEMENTS_PARTITIONS", 6)?;
        if entitlements_partitions < 1 {
            return Err(err("ENTITLEMENTS_PARTITIONS", "must be at least 1"));
        }
        let dedupe_window_secs: u64 =
            num(get("DEDUPE_WINDOW_SECS"), "DEDUPE_WINDOW_SECS", 3 * 86_400)?;
        if dedupe_window_secs == 0 {
            return Err(err("DEDUPE_WINDOW_SECS", "must be at least 1"));
        }
        let prune_interval_secs: u64 = num(
            get("DEDUPE_PRUNE_INTERVAL_SECS"),
            "DEDUPE_PRUNE_INTERVAL_SECS",
            600,
        )?;
        if !(1..=86_400).contains(&prune_interval_secs) {
            return Err(err(
                "DEDUPE_PRUNE_INTERVAL_SECS",
                "must be between 1 and 86400",
            ));
        }
        Ok(Config {
            kafka: KafkaSettings::from_lookup(&lookup)?,
            database_url: SecretString::from(database_url),
            addr,
            events_topic: topic(
                get("STRIPE_EVENTS_TOPIC"),
                "STRIPE_EVENTS_TOPIC",
                "stripe.events",
            )?,
            entitlements_topic: topic(
                get("ENTITLEMENTS_TOPIC"),
                "ENTITLEMENTS_TOPIC",
                "entitlements.changes",
            )?,
            dlq_topic: topic(get("DLQ_TOPIC"), "DLQ_TOPIC", "stripe.events.dlq")?,
            policy,
            policy_path,
            api_token,
            group_id: get("PROJECTOR_GROUP").unwrap_or_else(|| "projector".into()),
            batch_max_events,
            batch_linger: Duration::from_millis(linger_ms),
            events_partitions,
            entitlements_partitions,
            dedupe_window: Duration::from_secs(dedupe_window_secs),
            dedupe_prune_interval: Duration::from_secs(prune_interval_secs),
        })
    }
}

fn load_policy(path: &str) -> Result<EntitlementPolicy, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| err("ENTITLEMENTS_CONFIG", format!("cannot read `{path}`: {e}")))?;
    EntitlementPolicy::from_toml_str(&text)
        .map_err(|e| err("ENTITLEMENTS_CONFIG", format!("`{path}`: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    const TOKEN: (&str, &str) = ("API_TOKEN", "0123456789abcdef0123");

    #[test]
    fn defaults_apply_with_a_token() {
        let c = config(&[TOKEN, ("ENTITLEMENTS_CONFIG", "../entitlements.toml")]).unwrap();
        assert_eq!(c.addr.to_string(), "127.0.0.1:8081");
        assert_eq!(c.events_topic, "stripe.events");
        assert_eq!(c.entitlements_topic, "entitlements.changes");
        assert_eq!(c.dlq_topic, "stripe.events.dlq");
        assert!(c.api_token.is_some());
        assert_eq!(c.dedupe_window, Duration::from_secs(259_200));
        assert_eq!(c.batch_max_events, 5000);
        assert_eq!(c.batch_linger, Duration::from_millis(20));
    }

    #[test]
    fn refuses_to_start_without_a_token_unless_auth_is_disabled() {
        assert_eq!(config(&[]).unwrap_err().var, "API_TOKEN");
        assert!(config(&[("API_AUTH", "disabled")])
            .unwrap()
            .api_token
            .is_none());
        assert_eq!(
            config(&[("API_AUTH", "maybe")]).unwrap_err().var,
            "API_AUTH"
        );
    }

    #[test]
    fn bad_values_name_their_variable_and_never_echo_the_database_url() {
        let e = config(&[TOKEN, ("DATABASE_URL", "mysql://u:hunter2@x/db")]).unwrap_err();
        assert_eq!(e.var, "DATABASE_URL");
        assert!(!e.to_string().contains("hunter2"));
        for (var, value) in [
            ("PROJECTOR_ADDR", "nowhere"),
            ("ENTITLEMENTS_CONFIG", "/does/not/exist.toml"),
            ("BATCH_MAX_EVENTS", "0"),
            ("STRIPE_EVENTS_PARTITIONS", "0"),
            ("ENTITLEMENTS_TOPIC", "a b"),
            ("API_TOKEN", "short"),
            ("DEDUPE_WINDOW_SECS", "0"),
            ("DEDUPE_WINDOW_SECS", "3d"),
            ("DEDUPE_PRUNE_INTERVAL_SECS", "0"),
        ] {
            assert_eq!(
                config(&[TOKEN, (var, value)]).unwrap_err().var,
                var,
                "{var}"
            );
        }
    }
}
