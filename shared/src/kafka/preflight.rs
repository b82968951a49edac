//! The start-up check of every command: one metadata request with a short deadline. librdkafka
//! retries a wrong password, a TLS failure or an unreachable broker forever and only logs it;
//! here its error callbacks are captured so that start-up stops within seconds with one line
//! naming the broker and the cause.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::KafkaSettings;

/// How long the start-up check waits for a broker to answer.
pub const PREFLIGHT_DEADLINE: Duration = Duration::from_secs(10);

/// Kafka could not be used: which broker, and why, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kafka {broker}: {cause}")]
pub struct KafkaUnreachable {
    pub broker: String,
    pub cause: String,
}

/// Asks the cluster for its metadata, waiting at most `deadline`. Logs the settings' notes
/// (ignored keys) once, as every command calls this first.
pub async fn check_cluster(
    settings: &KafkaSettings,
    deadline: Duration,
) -> Result<(), KafkaUnreachable> {
    for note in settings.notes() {
        tracing::warn!("{note}");
    }
    let settings = settings.clone();
    tokio::task::spawn_blocking(move || check_blocking(&settings, deadline))
        .await
        .unwrap_or_else(|_| {
            Err(KafkaUnreachable {
                broker: "?".into(),
                cause: "the start-up check panicked".into(),
            })
        })
}

fn check_blocking(settings: &KafkaSettings, deadline: Duration) -> Result<(), KafkaUnreachable> {
    let probe = Probe::default();
    let seen = probe.seen.clone();
    let unreachable = |cause: String| KafkaUnreachable {
        broker: settings.brokers().to_owned(),
        cause,
    };
    let mut config = settings.client_config();
    config
        .set("socket.connection.setup.timeout.ms", "5000")
        // librdkafka would otherwise keep reconnecting quickly and report each failure.
        .set("reconnect.backoff.ms", "200")
        // Info too: some causes (a plaintext client on a TLS listener) only reach the log.
        .set_log_level(RDKafkaLogLevel::Info);
    let consumer: BaseConsumer<Probe> = config
        .create_with_context(probe)
        .map_err(|e| unreachable(format!("cannot create a client: {}", redacted(&e))))?;
    let started = Instant::now();
    loop {
        let left = deadline.saturating_sub(started.elapsed());
        let attempt = left.min(Duration::from_secs(1));
        match consumer.fetch_metadata(None, attempt) {
            Ok(metadata) if !metadata.brokers().is_empty() => return Ok(()),
            Ok(_) | Err(_) => {}
        }
        // librdkafka hands its error events to the context only while the client is polled.
        let _ = consumer.poll(Duration::from_millis(100));
        let captured = seen.lock().map(|s| s.clone()).unwrap_or_default();
        if let Some(decisive) = captured.iter().find_map(|c| c.decisive()) {
            return Err(decisive.with_default_broker(settings.brokers()));
        }
        if started.elapsed() >= deadline {
            // "1/1 brokers are down" says less than the failure that took the broker down.
            let telling = captured
                .iter()
                .rev()
                .find(|c| c.code != Some(RDKafkaErrorCode::AllBrokersDown))
                .or(captured.last());
            return Err(match telling {
                Some(last) => last.classify().with_default_broker(settings.brokers()),
                None => unreachable(format!("no broker answered within {}s", deadline.as_secs())),
            });
        }
    }
}

/// A KafkaError's text without a configuration value (which may be a secret).
fn redacted(error: &KafkaError) -> String {
    match error {
        KafkaError::ClientConfig(_, _, key, _) => format!("invalid setting `{key}`"),
        other => other.to_string(),
    }
}

/// An error librdkafka reported through its error callback.
#[derive(Debug, Clone)]
struct Captured {
    code: Option<RDKafkaErrorCode>,
    reason: String,
}

struct Verdict {
    broker: Option<String>,
    cause: String,
    /// Retrying cannot help (wrong credentials, TLS): stop now rather than at the deadline.
    decisive: bool,
}

impl Verdict {
    fn with_default_broker(self, brokers: &str) -> KafkaUnreachable {
        KafkaUnreachable {
            broker: self.broker.unwrap_or_else(|| brokers.to_owned()),
            cause: self.cause,
        }
    }
}

impl Captured {
    fn decisive(&self) -> Option<Verdict> {
        let verdict = self.classify();
        verdict.decisive.then_some(verdict)
    }

    /// librdkafka reasons look like
    /// `sasl_ssl://127.0.0.1:9093/bootstrap: SASL authentication error: … (after 3ms in state AUTH_REQ)`.
    fn classify(&self) -> Verdict {
        let (broker, detail) = split_broker(&self.reason);
        let detail = strip_timing(detail);
        let lower = detail.to_ascii_lowercase();
        let (cause, decisive) = if self.code == Some(RDKafkaErrorCode::Authentication)
            || lower.contains("sasl authentication")
            || lower.contains("authentication failed")
        {
            (
                "SASL authentication failed (check KAFKA_SASL_USERNAME/KAFKA_SASL_PASSWORD or the credentials in KAFKA_CLIENT_PROPERTIES)".to_owned(),
                true,
            )
        } else if lower.contains("incorrect security.protocol")
            || lower.contains("connecting to a ssl listener")
            // A TLS listener drops a plaintext client's first request (ApiVersion) unanswered.
            || (lower.contains("disconnected") && self.reason.contains("in state APIVERSION_QUERY"))
        {
            (
                "the broker closed the connection during the handshake: it is probably a TLS listener (check KAFKA_SECURITY_PROTOCOL, e.g. SASL_SSL)".to_owned(),
                true,
            )
        } else if lower.contains("plaintext broker listener")
            || lower.contains("wrong version number")
            || lower.contains("packet length too long")
        {
            (
                "TLS handshake failed: the listener does not speak TLS (check KAFKA_SECURITY_PROTOCOL and KAFKA_BROKERS)".to_owned(),
                true,
            )
        } else if self.code == Some(RDKafkaErrorCode::SSL) || lower.contains("ssl handshake") {
            (
                format!("TLS handshake failed: {detail} (check KAFKA_SSL_CA_LOCATION and that the broker's certificate names this host)"),
                true,
            )
        } else if self.code == Some(RDKafkaErrorCode::UnsupportedSASLMechanism)
            || lower.contains("mechanism")
        {
            (format!("{detail} (check KAFKA_SASL_MECHANISM)"), true)
        } else if self.code == Some(RDKafkaErrorCode::Resolve) || lower.contains("resolve") {
            (
                format!("cannot resolve the broker's address: {detail}"),
                false,
            )
        } else {
            (format!("cannot connect: {detail}"), false)
        };
        Verdict {
            broker,
            cause,
            decisive,
        }
    }
}

fn split_broker(reason: &str) -> (Option<String>, &str) {
    // Log lines start with the thread: `[thrd:127.0.0.1:9093/bootstrap]: `.
    let reason = match reason.strip_prefix("[thrd:") {
        Some(rest) => rest.split_once("]: ").map_or(reason, |(_, r)| r),
        None => reason,
    };
    let Some((prefix, rest)) = reason.split_once(": ") else {
        return (None, reason);
    };
    // `sasl_ssl://host:port/bootstrap` or `host:port/1`.
    let address = prefix.split_once("://").map_or(prefix, |(_, a)| a);
    match address.split_once('/') {
        Some((host_port, _)) if host_port.contains(':') && !host_port.contains(' ') => {
            (Some(host_port.to_owned()), rest)
        }
        _ => (None, reason),
    }
}

fn strip_timing(detail: &str) -> &str {
    match detail.rfind(" (after ") {
        Some(at) if detail.ends_with(')') => detail[..at].trim_end(),
        _ => detail.trim_end(),
    }
}

#[derive(Default)]
struct Probe {
    seen: Arc<Mutex<Vec<Captured>>>,
}

impl ClientContext for Probe {
    // The check reports one summary line; librdkafka's own lines would repeat it, so they are
    // kept for the verdict and logged at debug level only.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        tracing::debug!(target: "librdkafka", ?level, fac, message, "start-up check");
        if fac == "FAIL" || matches!(level, RDKafkaLogLevel::Error) {
            self.capture(None, message);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.capture(error.rdkafka_error_code(), reason);
    }
}

impl Probe {
    fn capture(&self, code: Option<RDKafkaErrorCode>, reason: &str) {
        if let Ok(mut seen) = self.seen.lock() {
            // Bounded: a flapping connection reports the same failures over and over.
            if seen.len() < 64 {
                seen.push(Captured {
                    code,
                    reason: reason.to_owned(),
                });
            }
        }
    }
}

impl ConsumerContext for Probe {}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(code: Option<RDKafkaErrorCode>, reason: &str) -> (Option<String>, String, bool) {
        let v = Captured {
            code,
            reason: reason.to_owned(),
        }
        .classify();
        (v.broker, v.cause, v.decisive)
    }

    #[test]
    fn a_wrong_password_names_the_broker_and_the_variables() {
        let (broker, cause, decisive) = verdict(
            Some(RDKafkaErrorCode::Authentication),
            "sasl_ssl://127.0.0.1:9093/bootstrap: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512 (after 5ms in state AUTH_REQ)",
        );
        assert_eq!(broker.as_deref(), Some("127.0.0.1:9093"));
        assert!(cause.starts_with("SASL authentication failed"), "{cause}");
        assert!(cause.contains("KAFKA_SASL_PASSWORD"), "{cause}");
        assert!(decisive);
    }

    #[test]
    fn a_plaintext_client_on_a_tls_listener_is_told_to_check_the_protocol() {
        let (broker, cause, decisive) = verdict(
            Some(RDKafkaErrorCode::BrokerTransportFailure),
            "127.0.0.1:9093/bootstrap: Disconnected while requesting ApiVersion: might be caused by incorrect security.protocol configuration (connecting to a SSL listener?) or broker version is < 0.10 (see api.version.request) (after 1ms in state APIVERSION_QUERY)",
        );
        assert_eq!(broker.as_deref(), Some("127.0.0.1:9093"));
        assert!(cause.contains("KAFKA_SECURITY_PROTOCOL"), "{cause}");
        assert!(decisive);
    }

    #[test]
    fn an_untrusted_certificate_is_a_tls_failure_without_timing_noise() {
        let (_, cause, decisive) = verdict(
            Some(RDKafkaErrorCode::SSL),
            "ssl://localhost:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified (after 4ms in state SSL_HANDSHAKE)",
        );
        assert!(cause.starts_with("TLS handshake failed: "), "{cause}");
        assert!(cause.contains("certificate verify failed"), "{cause}");
        assert!(!cause.contains("after 4ms"), "{cause}");
        assert!(decisive);
    }

    #[test]
    fn a_connection_dropped_at_the_first_request_points_at_a_tls_listener() {
        let (broker, cause, decisive) = verdict(
            None,
            "[thrd:127.0.0.1:9093/bootstrap]: 127.0.0.1:9093/bootstrap: Disconnected: connection closed by peer: receive 0 after POLLIN (after 1ms in state APIVERSION_QUERY)",
        );
        assert_eq!(broker.as_deref(), Some("127.0.0.1:9093"));
        assert!(cause.contains("TLS listener"), "{cause}");
        assert!(decisive);
    }

    #[test]
    fn a_refused_connection_is_retried_until_the_deadline() {
        let (broker, cause, decisive) = verdict(
            Some(RDKafkaErrorCode::BrokerTransportFailure),
            "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused (after 0ms in state CONNECT, 1 identical error(s) suppressed)",
        );
        assert_eq!(broker.as_deref(), Some("127.0.0.1:1"));
        assert_eq!(
            cause,
            "cannot connect: Connect to ipv4#127.0.0.1:1 failed: Connection refused"
        );
        assert!(!decisive);
    }
}
