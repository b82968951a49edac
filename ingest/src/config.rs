//! Ingest configuration: read from the environment once at start-up, validated, typed.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;
pub use shared::config::ConfigError;
use shared::config::{err, num, topic};

use crate::signature::DEFAULT_TOLERANCE_SECS;

#[derive(Debug, Clone)]
pub struct Config {
    /// `KAFKA_BROKERS`: bootstrap servers.
    pub kafka_brokers: String,
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
            kafka_brokers: get("KAFKA_BROKERS").unwrap_or_else(|| "127.0.0.1:9092".into()),
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
        assert_eq!(c.kafka_brokers, "127.0.0.1:9092");
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
            ("HTTP_HEAD_TIMEOUT_MS", "0"),
            ("HTTP_BODY_TIMEOUT_MS", "soon"),
            ("HTTP_KEEP_ALIVE_SECS", "0"),
        ] {
            let e = config(&[("STRIPE_WEBHOOK_SECRETS", "whsec_a"), (var, value)]).unwrap_err();
            assert_eq!(e.var, var, "{var}={value}");
        }
    }
}
