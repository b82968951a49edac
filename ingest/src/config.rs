//! Ingest configuration: read from the environment once at start-up, validated, typed.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;
pub use shared::config::ConfigError;
use shared::config::{err, num, topic};
use shared::kafka::KafkaSettings;

use crate::signature::DEFAULT_TOLERANCE_SECS;

#[derive(Debug, Clone)]
pub struct Config {
    /// `KAFKA_BROKERS`, `KAFKA_CLIENT_PROPERTIES` and the `KAFKA_*` security overrides: how
    /// every Kafka client of this service connects (secrets redacted in Debug).
    pub kafka: KafkaSettings,
    /// `STRIPE_WEBHOOK_SECRETS`: comma-separated `whsec_…`; a signature by any of them passes.
    pub webhook_secrets: Vec<SecretString>,
    /// `SIGNATURE_TOLERANCE_SECS`: max age of the signed timestamp, seconds, > 0.
    pub signature_tolerance_secs: u64,
    /// `MAX_BODY_BYTES`: larger bodies get 413 without being read whole.
    pub max_body_bytes: usize,
    /// `INGEST_ADDR`: listen address.
    pub addr: SocketAddr,
    /// `STRIPE_EVENTS_TOPIC`: the raw log.
    pub events_topic: String,
    /// `DLQ_TOPIC`: verified payloads that are not Stripe events.
    pub dlq_topic: String,
    /// `STRIPE_EVENTS_PARTITIONS`: partitions of the raw log when ingest creates it.
    pub events_partitions: i32,
    /// `APPEND_TIMEOUT_MS`: how long a request waits for the broker's acknowledgement before
    /// answering 503, milliseconds.
    pub append_timeout: Duration,
    /// `HTTP_HEAD_TIMEOUT_MS`: how long a connection may take to send a request's head (request
    /// line and headers) before it gets 408 and is closed, milliseconds. Bounds slow-loris
    /// headers.
    pub head_read_timeout: Duration,
    /// `HTTP_BODY_TIMEOUT_MS`: how long a request may take to send its body once its head is
    /// in, milliseconds; then it gets 408 `request_timeout`. Bounds slow-loris bodies.
    pub body_read_timeout: Duration,
    /// `HTTP_KEEP_ALIVE_SECS`: how long an idle connection is kept open between requests.
    pub keep_alive: Duration,
    /// `STRIPE_API_KEY` and friends: when set, ingest fetches the object a thin event names.
    pub stripe_api: Option<ApiConfig>,
}

/// The Stripe API settings of `backfill`, `reconcile` and the fetch after a thin event.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// `STRIPE_API_KEY`: a secret (`sk_…`) or restricted (`rk_…`) key with read access.
    pub api_key: SecretString,
    /// `STRIPE_API_BASE`: where the API is, default `https://api.stripe.com`.
    pub api_base: reqwest::Url,
    /// `STRIPE_API_TIMEOUT_SECS`: the deadline of one request attempt, seconds, > 0.
    pub timeout: Duration,
}

impl ApiConfig {
    /// `None` when `STRIPE_API_KEY` is unset.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let Some(key) = get("STRIPE_API_KEY") else {
            return Ok(None);
        };
        let key = key.trim();
        // The message never echoes the value: it is a secret even when it is the wrong one.
        let known = ["sk_test_", "sk_live_", "rk_test_", "rk_live_"];
        if !known
            .iter()
            .any(|p| key.starts_with(p) && key.len() > p.len())
        {
            return Err(err(
                "STRIPE_API_KEY",
                "does not look like a Stripe secret or restricted key (sk_… or rk_…)",
            ));
        }
        let base = get("STRIPE_API_BASE").unwrap_or_else(|| "https://api.stripe.com".into());
        let api_base = reqwest::Url::parse(base.trim())
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                err(
                    "STRIPE_API_BASE",
                    format!("expected an http(s) URL, got `{base}`"),
                )
            })?;
        let timeout_secs: u64 = num(
            get("STRIPE_API_TIMEOUT_SECS"),
            "STRIPE_API_TIMEOUT_SECS",
            30,
        )?;
        if timeout_secs == 0 {
            return Err(err("STRIPE_API_TIMEOUT_SECS", "must be at least 1"));
        }
        Ok(Some(ApiConfig {
            api_key: SecretString::from(key.to_owned()),
            api_base,
            timeout: Duration::from_secs(timeout_secs),
        }))
    }
}

/// Where `backfill` and `reconcile` append: the raw log, with the service's own settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub kafka: KafkaSettings,
    pub events_topic: String,
    pub dlq_topic: String,
    pub events_partitions: i32,
    pub append_timeout: Duration,
    /// The largest record the log must take (`MAX_BODY_BYTES` with its headers), as for
    /// webhooks: an object fetched from the API is appended like an event of that size.
    pub record_bytes: usize,
}

impl LogConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        // The same variables, defaults and checks as the webhook service; only the webhook
        // secrets are not needed.
        let config = Config::from_lookup(|name| match name {
            "STRIPE_WEBHOOK_SECRETS" => Some("whsec_unused".to_owned()),
            "STRIPE_API_KEY" => None,
            other => lookup(other),
        })?;
        Ok(LogConfig {
            kafka: config.kafka,
            events_topic: config.events_topic,
            dlq_topic: config.dlq_topic,
            events_partitions: config.events_partitions,
            append_timeout: config.append_timeout,
            record_bytes: shared::limits::ingest_record_max_bytes(config.max_body_bytes),
        })
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads configuration through `lookup`, so that tests need not touch the process env.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let secrets_raw = get("STRIPE_WEBHOOK_SECRETS").ok_or_else(|| {
            err(
                "STRIPE_WEBHOOK_SECRETS",
                "required: comma-separated whsec_… secrets",
            )
        })?;
        let webhook_secrets = parse_secrets(&secrets_raw)?;
        let signature_tolerance_secs = num(
            get("SIGNATURE_TOLERANCE_SECS"),
            "SIGNATURE_TOLERANCE_SECS",
            DEFAULT_TOLERANCE_SECS,
        )?;
        if signature_tolerance_secs == 0 {
            return Err(err(
                "SIGNATURE_TOLERANCE_SECS",
                "must be at least 1 (0 would disable replay protection)",
            ));
        }
        let max_body_bytes: usize = num(get("MAX_BODY_BYTES"), "MAX_BODY_BYTES", 1_048_576)?;
        if max_body_bytes == 0 {
            return Err(err("MAX_BODY_BYTES", "must be at least 1"));
        }
        let addr = get("INGEST_ADDR").unwrap_or_else(|| "127.0.0.1:8080".into());
        let addr = addr
            .parse()
            .map_err(|_| err("INGEST_ADDR", format!("expected host:port, got `{addr}`")))?;
        let events_partitions: i32 = num(
            get("STRIPE_EVENTS_PARTITIONS"),
            "STRIPE_EVENTS_PARTITIONS",
            6,
        )?;
        if events_partitions < 1 {
            return Err(err("STRIPE_EVENTS_PARTITIONS", "must be at least 1"));
        }
        let append_timeout_ms: u64 = num(get("APPEND_TIMEOUT_MS"), "APPEND_TIMEOUT_MS", 10_000)?;
        if append_timeout_ms < 100 {
            return Err(err("APPEND_TIMEOUT_MS", "must be at least 100"));
        }
        let head_read_timeout = millis(get("HTTP_HEAD_TIMEOUT_MS"), "HTTP_HEAD_TIMEOUT_MS", 5_000)?;
        let body_read_timeout =
            millis(get("HTTP_BODY_TIMEOUT_MS"), "HTTP_BODY_TIMEOUT_MS", 10_000)?;
        let keep_alive_secs: u64 = num(get("HTTP_KEEP_ALIVE_SECS"), "HTTP_KEEP_ALIVE_SECS", 75)?;
        if keep_alive_secs == 0 {
            return Err(err("HTTP_KEEP_ALIVE_SECS", "must be at least 1"));
        }
        Ok(Config {
            kafka: KafkaSettings::from_lookup(&lookup)?,
            webhook_secrets,
            signature_tolerance_secs,
            max_body_bytes,
            addr,
            events_topic: topic(
                get("STRIPE_EVENTS_TOPIC"),
                "STRIPE_EVENTS_TOPIC",
                "stripe.events",
            )?,
            dlq_topic: topic(get("DLQ_TOPIC"), "DLQ_TOPIC", "stripe.events.dlq")?,
            events_partitions,
            append_timeout: Duration::from_millis(append_timeout_ms),
            stripe_api: ApiConfig::from_lookup(get)?,
            head_read_timeout,
            body_read_timeout,
            keep_alive: Duration::from_secs(keep_alive_secs),
        })
    }
}

/// A read deadline in milliseconds: at least 100, because 0 would switch actix's deadline off.
fn millis(value: Option<String>, var: &'static str, default: u64) -> Result<Duration, ConfigError> {
    let ms: u64 = num(value, var, default)?;
    if ms < 100 {
        return Err(err(
            var,
            "must be at least 100 (0 would disable the deadline)",
        ));
    }
    Ok(Duration::from_millis(ms))
}

fn parse_secrets(raw: &str) -> Result<Vec<SecretString>, ConfigError> {
    let mut secrets = Vec::new();
    for (i, secret) in raw.split(',').map(str::trim).enumerate() {
        // The message names the position, never the value.
        if !secret.starts_with("whsec_") || secret.len() <= "whsec_".len() {
            return Err(err(
                "STRIPE_WEBHOOK_SECRETS",
                format!(
                    "secret #{} does not look like a webhook signing secret (whsec_…)",
                    i + 1
                ),
            ));
        }
        secrets.push(SecretString::from(secret.to_owned()));
    }
    Ok(secrets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_apply_when_only_the_secret_is_set() {
        let c = config(&[("STRIPE_WEBHOOK_SECRETS", "whsec_a")]).unwrap();
        assert_eq!(c.kafka.brokers(), "127.0.0.1:9092");
        assert_eq!(c.signature_tolerance_secs, 300);
        assert_eq!(c.max_body_bytes, 1_048_576);
        assert_eq!(c.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.events_topic, "stripe.events");
        assert_eq!(c.dlq_topic, "stripe.events.dlq");
        assert_eq!(c.append_timeout, Duration::from_secs(10));
        assert_eq!(c.head_read_timeout, Duration::from_secs(5));
        assert_eq!(c.body_read_timeout, Duration::from_secs(10));
        assert_eq!(c.keep_alive, Duration::from_secs(75));
    }

    #[test]
    fn several_secrets_are_split_and_trimmed() {
        let c = config(&[("STRIPE_WEBHOOK_SECRETS", "whsec_a, whsec_b")]).unwrap();
        let got: Vec<&str> = c
            .webhook_secrets
            .iter()
            .map(|s| s.expose_secret())
            .collect();
        assert_eq!(got, ["whsec_a", "whsec_b"]);
    }

    #[test]
    fn kafka_security_comes_from_the_kafka_variables_and_debug_hides_the_password() {
        let c = config(&[
            ("STRIPE_WEBHOOK_SECRETS", "whsec_a"),
            ("KAFKA_BROKERS", "b1:9093"),
            ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("KAFKA_SASL_USERNAME", "svc"),
            ("KAFKA_SASL_PASSWORD", "pa55-word-xyz"),
        ])
        .unwrap();
        let client = c.kafka.client_config();
        assert_eq!(client.get("bootstrap.servers"), Some("b1:9093"));
        assert_eq!(client.get("sasl.password"), Some("pa55-word-xyz"));
        let shown = format!("{c:?}");
        assert!(!shown.contains("pa55-word-xyz"), "{shown}");
        assert!(!shown.contains("whsec_a"), "{shown}");
        let e = config(&[
            ("STRIPE_WEBHOOK_SECRETS", "whsec_a"),
            ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
        ])
        .unwrap_err();
        assert_eq!(e.var, "KAFKA_SASL_MECHANISM");
    }

    #[test]
    fn missing_secrets_name_the_variable() {
        let e = config(&[]).unwrap_err();
        assert_eq!(e.var, "STRIPE_WEBHOOK_SECRETS");
    }

    #[test]
    fn a_bad_secret_is_refused_without_echoing_it() {
        let e = config(&[("STRIPE_WEBHOOK_SECRETS", "whsec_ok,sk_live_leaky")]).unwrap_err();
        assert_eq!(e.var, "STRIPE_WEBHOOK_SECRETS");
        assert!(!e.to_string().contains("leaky"), "{e}");
        assert!(e.to_string().contains("#2"), "{e}");
    }

    #[test]
    fn the_api_is_optional_and_defaults_to_stripe() {
        let c = config(&[("STRIPE_WEBHOOK_SECRETS", "whsec_a")]).unwrap();
        assert!(c.stripe_api.is_none());
        let c = config(&[
            ("STRIPE_WEBHOOK_SECRETS", "whsec_a"),
            ("STRIPE_API_KEY", "rk_test_abc"),
        ])
        .unwrap();
        let api = c.stripe_api.unwrap();
        assert_eq!(api.api_base.as_str(), "https://api.stripe.com/");
        assert_eq!(api.timeout, Duration::from_secs(30));
        assert_eq!(api.api_key.expose_secret(), "rk_test_abc");
    }

    #[test]
    fn a_bad_api_key_is_refused_without_echoing_it() {
        let e = config(&[
            ("STRIPE_WEBHOOK_SECRETS", "whsec_a"),
            ("STRIPE_API_KEY", "whsec_leakyvalue"),
        ])
        .unwrap_err();
        assert_eq!(e.var, "STRIPE_API_KEY");
        assert!(!e.to_string().contains("leaky"), "{e}");
        assert!(!format!("{e:?}").contains("leaky"), "{e:?}");
    }

    #[test]
    fn a_bad_api_base_or_timeout_names_its_variable() {
        for (var, value) in [
            ("STRIPE_API_BASE", "ftp://x"),
            ("STRIPE_API_BASE", "not a url"),
            ("STRIPE_API_TIMEOUT_SECS", "0"),
        ] {
            let e = config(&[
                ("STRIPE_WEBHOOK_SECRETS", "whsec_a"),
                ("STRIPE_API_KEY", "sk_test_a"),
                (var, value),
            ])
            .unwrap_err();
            assert_eq!(e.var, var, "{var}={value}");
        }
    }

    #[test]
    fn the_log_settings_need_no_webhook_secret() {
        let log = LogConfig::from_lookup(|name| {
            (name == "STRIPE_EVENTS_TOPIC").then(|| "custom.events".to_owned())
        })
        .unwrap();
        assert_eq!(log.events_topic, "custom.events");
        assert_eq!(log.kafka.brokers(), "127.0.0.1:9092");
    }

    #[test]
    fn zero_tolerance_is_refused() {
        let e = config(&[
            ("STRIPE_WEBHOOK_SECRETS", "whsec_a"),
            ("SIGNATURE_TOLERANCE_SECS", "0"),
        ])
        .unwrap_err();
        assert_eq!(e.var, "SIGNATURE_TOLERANCE_SECS");
    }

    #[test]
    fn unparsable_numbers_and_addresses_name_their_variable() {
        for (var, value) in [
            ("SIGNATURE_TOLERANCE_SECS", "-5"),
            ("MAX_BODY_BYTES", "1MB"),
            ("MAX_BODY_BYTES", "0"),
            ("INGEST_ADDR", "localhost"),
            ("STRIPE_EVENTS_TOPIC", "bad topic"),
            ("DLQ_TOPIC", "x/y"),
            ("STRIPE_EVENTS_PARTITIONS", "0"),
            ("APPEND_TIMEOUT_MS", "5"),
            ("STRIPE_API_KEY", "pk_test_publishable"),
            ("HTTP_HEAD_TIMEOUT_MS", "0"),
            ("HTTP_BODY_TIMEOUT_MS", "soon"),
            ("HTTP_KEEP_ALIVE_SECS", "0"),
        ] {
            let e = config(&[("STRIPE_WEBHOOK_SECRETS", "whsec_a"), (var, value)]).unwrap_err();
            assert_eq!(e.var, var, "{var}={value}");
        }
    }
}
