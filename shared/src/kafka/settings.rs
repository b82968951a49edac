//! `KafkaSettings`: where the cluster is and how to authenticate to it, read once at start-up
//! from `KAFKA_BROKERS`, `KAFKA_CLIENT_PROPERTIES` and the `KAFKA_*` overrides (SPEC §3), and
//! applied to every Kafka client of every command.

use std::fmt;
use std::path::Path;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use secrecy::{ExposeSecret, SecretString};

use super::properties::{parse_jaas, parse_properties, Property};
use crate::config::{err, ConfigError};

pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";

const FILE_VAR: &str = "KAFKA_CLIENT_PROPERTIES";

/// The environment variables that override the file, with the librdkafka key each sets.
pub const OVERRIDES: [(&str, &str); 5] = [
    ("KAFKA_SECURITY_PROTOCOL", "security.protocol"),
    ("KAFKA_SASL_MECHANISM", "sasl.mechanism"),
    ("KAFKA_SASL_USERNAME", "sasl.username"),
    ("KAFKA_SASL_PASSWORD", "sasl.password"),
    ("KAFKA_SSL_CA_LOCATION", "ssl.ca.location"),
];

/// What happens to a key of a client properties file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRule {
    /// Handed to librdkafka under another name (the Java key differs).
    Rename(&'static str),
    /// Read by this module and turned into librdkafka settings.
    Interpreted,
    /// Meaningful only to Java clients or to tools we do not run: logged and ignored.
    JavaOnly(&'static str),
    /// Would weaken security or cannot work here: start-up stops.
    Refused(&'static str),
}

/// Keys of provider files that librdkafka does not take as they are. Every other key is handed
/// to librdkafka, which refuses the ones it does not know.
pub const KEY_RULES: &[(&str, KeyRule)] = &[
    ("bootstrap.servers", KeyRule::Interpreted),
    ("security.protocol", KeyRule::Interpreted),
    ("sasl.mechanism", KeyRule::Interpreted),
    ("sasl.mechanisms", KeyRule::Interpreted),
    ("sasl.username", KeyRule::Interpreted),
    ("sasl.password", KeyRule::Interpreted),
    ("sasl.jaas.config", KeyRule::Interpreted),
    ("ssl.ca.location", KeyRule::Interpreted),
    ("ssl.truststore.location", KeyRule::Interpreted),
    ("ssl.truststore.type", KeyRule::Interpreted),
    ("ssl.truststore.password", KeyRule::Interpreted),
    ("ssl.endpoint.identification.algorithm", KeyRule::Interpreted),
    ("enable.ssl.certificate.verification", KeyRule::Interpreted),
    ("ssl.truststore.certificates", KeyRule::Rename("ssl.ca.pem")),
    ("ssl.keystore.certificate.chain", KeyRule::Rename("ssl.certificate.pem")),
    ("ssl.keystore.key", KeyRule::Rename("ssl.key.pem")),
    ("ssl.keystore.type", KeyRule::Interpreted),
    ("ssl.protocol", KeyRule::JavaOnly("librdkafka negotiates TLS 1.2 or newer")),
    ("ssl.enabled.protocols", KeyRule::JavaOnly("librdkafka negotiates TLS 1.2 or newer")),
    ("ssl.provider", KeyRule::JavaOnly("a JVM security provider")),
    ("ssl.trustmanager.algorithm", KeyRule::JavaOnly("a JVM trust manager")),
    ("ssl.keymanager.algorithm", KeyRule::JavaOnly("a JVM key manager")),
    ("ssl.secure.random.implementation", KeyRule::JavaOnly("a JVM random source")),
    ("key.serializer", KeyRule::JavaOnly("Java serializer classes")),
    ("value.serializer", KeyRule::JavaOnly("Java serializer classes")),
    ("key.deserializer", KeyRule::JavaOnly("Java deserializer classes")),
    ("value.deserializer", KeyRule::JavaOnly("Java deserializer classes")),
    ("schema.registry.url", KeyRule::JavaOnly("no schema registry is used")),
    ("basic.auth.credentials.source", KeyRule::JavaOnly("no schema registry is used")),
    ("basic.auth.user.info", KeyRule::JavaOnly("no schema registry is used")),
    ("sasl.login.refresh.window.factor", KeyRule::JavaOnly("Java token refresh")),
    ("sasl.login.refresh.window.jitter", KeyRule::JavaOnly("Java token refresh")),
    ("sasl.login.refresh.min.period.seconds", KeyRule::JavaOnly("Java token refresh")),
    ("sasl.login.refresh.buffer.seconds", KeyRule::JavaOnly("Java token refresh")),
    (
        "sasl.login.callback.handler.class",
        KeyRule::Refused("a Java login callback (e.g. MSK IAM) cannot run in a librdkafka client; MSK IAM authentication is not supported: use SASL/SCRAM"),
    ),
    (
        "sasl.client.callback.handler.class",
        KeyRule::Refused("a Java client callback (e.g. MSK IAM) cannot run in a librdkafka client; MSK IAM authentication is not supported: use SASL/SCRAM"),
    ),
];

/// Keys whose values are secrets: kept in `SecretString`, never shown.
fn is_secret_key(key: &str) -> bool {
    key.contains("password")
        || key.contains("secret")
        || key == "sasl.jaas.config"
        || key == "ssl.key.pem"
        || key == "basic.auth.user.info"
        || key == "sasl.oauthbearer.config"
}

fn rule_of(key: &str) -> Option<KeyRule> {
    KEY_RULES.iter().find(|(k, _)| *k == key).map(|(_, r)| *r)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_uppercase().as_str() {
            "PLAINTEXT" => Some(Self::Plaintext),
            "SSL" => Some(Self::Ssl),
            "SASL_PLAINTEXT" => Some(Self::SaslPlaintext),
            "SASL_SSL" => Some(Self::SaslSsl),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "PLAINTEXT",
            Self::Ssl => "SSL",
            Self::SaslPlaintext => "SASL_PLAINTEXT",
            Self::SaslSsl => "SASL_SSL",
        }
    }

    pub fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    pub fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

/// Kafka client settings shared by every client: producers, consumers, the admin client, the
/// history and rebuild readers. Commands add their own keys (group id, acks, …) on top of
/// `client_config()`, so a provider file cannot weaken e.g. a producer's durability.
#[derive(Clone)]
pub struct KafkaSettings {
    brokers: String,
    protocol: SecurityProtocol,
    /// librdkafka properties that are not secrets, sorted by key.
    properties: Vec<(String, String)>,
    /// librdkafka properties that are secrets (`sasl.password`, key passwords, …).
    secrets: Vec<(String, SecretString)>,
    /// Keys that were ignored or that deserve a warning, one sentence each, without values.
    notes: Vec<String>,
}

impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secrets: Vec<String> = self
            .secrets
            .iter()
            .map(|(k, _)| format!("{k}=[redacted]"))
            .collect();
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("security_protocol", &self.protocol.as_str())
            .field("properties", &self.properties)
            .field("secrets", &secrets)
            .finish()
    }
}

/// The settings as read, before they are checked as a whole: each key remembers which variable
/// it came from, so that an error names the variable to fix.
#[derive(Default)]
struct Draft {
    brokers: Option<(String, &'static str)>,
    values: Vec<DraftValue>,
    notes: Vec<String>,
}

struct DraftValue {
    key: String,
    value: SecretString,
    source: &'static str,
}

impl Draft {
    fn set(&mut self, key: &str, value: String, source: &'static str) {
        self.values.retain(|v| v.key != key);
        self.values.push(DraftValue {
            key: key.to_owned(),
            value: SecretString::from(value),
            source,
        });
    }

    fn get(&self, key: &str) -> Option<&DraftValue> {
        self.values.iter().find(|v| v.key == key)
    }

    fn take(&mut self, key: &str) -> Option<DraftValue> {
        let index = self.values.iter().position(|v| v.key == key)?;
        Some(self.values.remove(index))
    }
}

impl KafkaSettings {
    /// Plaintext, no authentication: the local stack and tests.
    pub fn plaintext(brokers: impl Into<String>) -> Self {
        KafkaSettings {
            brokers: brokers.into(),
            protocol: SecurityProtocol::Plaintext,
            properties: Vec::new(),
            secrets: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads `KAFKA_BROKERS`, the `KAFKA_CLIENT_PROPERTIES` file and the overrides through
    /// `lookup` (blank values count as unset).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let mut draft = Draft::default();
        if let Some(path) = get(FILE_VAR) {
            read_file(Path::new(path.trim()), &mut draft)?;
        }
        if let Some(brokers) = get("KAFKA_BROKERS") {
            draft.brokers = Some((brokers.trim().to_owned(), "KAFKA_BROKERS"));
        }
        for (var, key) in OVERRIDES {
            if let Some(value) = lookup(var).filter(|v| !v.trim().is_empty()) {
                // A password keeps its spaces; the other overrides are names and paths.
                let value = if key == "sasl.password" {
                    value
                } else {
                    value.trim().to_owned()
                };
                draft.set(key, value, var);
            }
        }
        Self::check(draft)
    }

    /// The cross-key rules: a protocol that matches the credentials given, a supported SASL
    /// mechanism, a CA file that is PEM, no verification switched off.
    fn check(mut draft: Draft) -> Result<Self, ConfigError> {
        let mut notes = std::mem::take(&mut draft.notes);
        let brokers = draft
            .brokers
            .take()
            .map(|(b, _)| b)
            .unwrap_or_else(|| DEFAULT_BROKERS.to_owned());

        let protocol = match draft.take("security.protocol") {
            None => None,
            Some(v) => Some(SecurityProtocol::parse(v.value.expose_secret()).ok_or_else(|| {
                err(
                    v.source,
                    format!(
                        "security.protocol must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL, got `{}`",
                        v.value.expose_secret()
                    ),
                )
            })?),
        };
        let has_credentials =
            draft.get("sasl.username").is_some() || draft.get("sasl.password").is_some();
        let protocol = match protocol {
            Some(p) => p,
            // The Java default is PLAINTEXT too, but credentials without a protocol would then
            // be dropped silently: say so instead.
            None if has_credentials => {
                return Err(err(
                    "KAFKA_SECURITY_PROTOCOL",
                    "SASL credentials are set but security.protocol is not; set it to SASL_SSL",
                ))
            }
            None => SecurityProtocol::Plaintext,
        };
        if has_credentials && !protocol.uses_sasl() {
            let source = draft
                .get("sasl.username")
                .or_else(|| draft.get("sasl.password"))
                .map_or(FILE_VAR, |v| v.source);
            return Err(err(
                source,
                format!(
                    "SASL credentials are set but security.protocol is {}, which would connect without them; use SASL_SSL",
                    protocol.as_str()
                ),
            ));
        }
        if let Some(ca) = draft.get("ssl.ca.location") {
            if !protocol.uses_tls() {
                return Err(err(
                    ca.source,
                    format!(
                        "a CA is set but security.protocol is {}, which would not use TLS; use SASL_SSL or SSL",
                        protocol.as_str()
                    ),
                ));
            }
            check_pem_file(ca.value.expose_secret(), ca.source)?;
        }
        if protocol.uses_sasl() {
            let mechanism = draft.get("sasl.mechanism").ok_or_else(|| {
                err(
                    "KAFKA_SASL_MECHANISM",
                    "required with SASL: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
                )
            })?;
            let name = mechanism.value.expose_secret().trim().to_ascii_uppercase();
            match name.as_str() {
                "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512" => {}
                "OAUTHBEARER" => {
                    return Err(err(
                        mechanism.source,
                        "SASL/OAUTHBEARER (e.g. MSK IAM) needs a token provider, which is not supported; use PLAIN or SCRAM",
                    ))
                }
                "GSSAPI" => {
                    return Err(err(
                        mechanism.source,
                        "SASL/GSSAPI (Kerberos) is not supported by this build; use PLAIN or SCRAM",
                    ))
                }
                _ => {
                    return Err(err(
                        mechanism.source,
                        format!("unknown SASL mechanism `{name}`: expected PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"),
                    ))
                }
            }
            let source = mechanism.source;
            draft.set("sasl.mechanism", name, source);
            for key in ["sasl.username", "sasl.password"] {
                if draft.get(key).is_none() {
                    return Err(err(
                        if key == "sasl.username" {
                            "KAFKA_SASL_USERNAME"
                        } else {
                            "KAFKA_SASL_PASSWORD"
                        },
                        format!("required with security.protocol={}", protocol.as_str()),
                    ));
                }
            }
            if protocol == SecurityProtocol::SaslPlaintext {
                notes.push(
                    "security.protocol=SASL_PLAINTEXT: credentials and data travel unencrypted; use SASL_SSL outside a trusted network"
                        .into(),
                );
            }
        } else if let Some(mechanism) = draft.take("sasl.mechanism") {
            notes.push(format!(
                "sasl.mechanism (from {}) is ignored: security.protocol is {}",
                mechanism.source,
                protocol.as_str()
            ));
        }

        let mut properties = vec![("security.protocol".to_owned(), protocol.as_str().to_owned())];
        let mut secrets = Vec::new();
        for v in draft.values {
            if is_secret_key(&v.key) {
                secrets.push((v.key, v.value));
            } else {
                properties.push((v.key, v.value.expose_secret().to_owned()));
            }
        }
        properties.sort();
        secrets.sort_by(|a, b| a.0.cmp(&b.0));
        let settings = KafkaSettings {
            brokers,
            protocol,
            properties,
            secrets,
            notes,
        };
        settings.check_with_librdkafka()?;
        Ok(settings)
    }

    /// librdkafka refuses unknown keys and bad values; ask it now, so that the error names the
    /// variable, and never echoes a secret value (its own message does).
    fn check_with_librdkafka(&self) -> Result<(), ConfigError> {
        match self.client_config().create_native_config() {
            Ok(_) => Ok(()),
            Err(KafkaError::ClientConfig(_, description, key, _)) => {
                let problem = if is_secret_key(&key) {
                    format!("librdkafka refuses the value of `{key}`")
                } else {
                    format!("`{key}`: {description}")
                };
                let var = OVERRIDES
                    .iter()
                    .find(|(_, k)| *k == key)
                    .map_or(FILE_VAR, |(var, _)| *var);
                Err(err(var, problem))
            }
            Err(_) => Err(err(FILE_VAR, "librdkafka refuses these settings")),
        }
    }

    /// The bootstrap servers, as given.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    pub fn security_protocol(&self) -> SecurityProtocol {
        self.protocol
    }

    /// Ignored keys and warnings from reading the settings, for the start-up log.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// A fresh librdkafka configuration with the brokers and the security settings; the
    /// caller adds its own keys.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        for (key, value) in &self.secrets {
            config.set(key, value.expose_secret());
        }
        config
    }
}

fn read_file(path: &Path, draft: &mut Draft) -> Result<(), ConfigError> {
    let shown = path.display();
    let metadata = std::fs::metadata(path)
        .map_err(|e| err(FILE_VAR, format!("cannot read `{shown}`: {e}")))?;
    if metadata.len() > super::properties::MAX_PROPERTIES_BYTES as u64 {
        return Err(err(
            FILE_VAR,
            format!("`{shown}` is too large for a client properties file"),
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(FILE_VAR, format!("cannot read `{shown}`: {e}")))?;
    let entries = parse_properties(&text).map_err(|e| err(FILE_VAR, format!("`{shown}`: {e}")))?;
    // The truststore's type decides how its location is read, whatever the order of lines.
    let truststore_type = entries
        .iter()
        .find(|p| p.key == "ssl.truststore.type")
        .map(|p| p.value.trim().to_ascii_uppercase());
    for property in entries {
        apply_property(property, truststore_type.as_deref(), draft)
            .map_err(|problem| err(FILE_VAR, format!("`{shown}` line {problem}")))?;
    }
    Ok(())
}

/// Maps one file entry onto librdkafka keys. The error text starts with the line number.
fn apply_property(
    property: Property,
    truststore_type: Option<&str>,
    draft: &mut Draft,
) -> Result<(), String> {
    let Property { key, value, line } = property;
    let at = |problem: String| format!("{line}, `{key}`: {problem}");
    match rule_of(&key) {
        Some(KeyRule::JavaOnly(why)) => {
            draft
                .notes
                .push(format!("{FILE_VAR}: `{key}` ignored (Java-only: {why})"));
            return Ok(());
        }
        Some(KeyRule::Refused(why)) => return Err(at(why.to_owned())),
        Some(KeyRule::Rename(to)) => {
            draft.set(to, value, FILE_VAR);
            return Ok(());
        }
        Some(KeyRule::Interpreted) | None => {}
    }
    match key.as_str() {
        "bootstrap.servers" => draft.brokers = Some((value.trim().to_owned(), FILE_VAR)),
        "sasl.mechanism" | "sasl.mechanisms" => draft.set("sasl.mechanism", value, FILE_VAR),
        "sasl.jaas.config" => {
            let jaas = parse_jaas(&value).map_err(|e| at(e.to_string()))?;
            let class = jaas.module.rsplit('.').next().unwrap_or_default();
            match class {
                "PlainLoginModule" | "ScramLoginModule" => {}
                "IAMLoginModule" => {
                    return Err(at(
                        "MSK IAM authentication needs an OAUTHBEARER token provider, which is not supported; use SASL/SCRAM".into(),
                    ))
                }
                "OAuthBearerLoginModule" => {
                    return Err(at("SASL/OAUTHBEARER is not supported; use PLAIN or SCRAM".into()))
                }
                _ => {
                    return Err(at(format!(
                        "login module `{}` is not supported; use PlainLoginModule or ScramLoginModule",
                        jaas.module
                    )))
                }
            }
            for option in jaas.options.iter().map(|(k, _)| k.as_str()) {
                if !matches!(option, "username" | "password") {
                    return Err(at(format!(
                        "option `{option}` of {class} is not supported (only username and password)"
                    )));
                }
            }
            match (jaas.option("username"), jaas.option("password")) {
                (Some(username), Some(password)) => {
                    draft.set("sasl.username", username.to_owned(), FILE_VAR);
                    draft.set("sasl.password", password.to_owned(), FILE_VAR);
                }
                _ => return Err(at("needs both username=\"…\" and password=\"…\"".into())),
            }
        }
        "ssl.truststore.location" => {
            let is_pem = match truststore_type {
                Some("PEM") => true,
                Some(other) => return Err(at(format!(
                    "a {other} truststore cannot be read by librdkafka: convert it to PEM (keytool -exportcert -rfc -keystore <file> -alias <ca> > ca.pem, or openssl pkcs12 -in <file> -nokeys -out ca.pem) and set ssl.ca.location"
                ))),
                None => {
                    let bytes = std::fs::read(value.trim())
                        .map_err(|e| at(format!("cannot read `{}`: {e}", value.trim())))?;
                    String::from_utf8_lossy(&bytes).contains("-----BEGIN CERTIFICATE-----")
                }
            };
            if !is_pem {
                return Err(at(
                    "not a PEM file (a JKS or PKCS12 truststore?): librdkafka reads PEM only; convert it (keytool -exportcert -rfc …, or openssl pkcs12 -nokeys …) and set ssl.ca.location".into(),
                ));
            }
            draft.set("ssl.ca.location", value.trim().to_owned(), FILE_VAR);
        }
        "ssl.truststore.type" => {}
        "ssl.truststore.password" => draft.notes.push(format!(
            "{FILE_VAR}: `ssl.truststore.password` ignored (a PEM CA file has no password)"
        )),
        "ssl.keystore.type" => match value.trim().to_ascii_uppercase().as_str() {
            // librdkafka's ssl.keystore.location reads PKCS#12.
            "PKCS12" => {}
            other => {
                return Err(at(format!(
                    "a {other} keystore cannot be read by librdkafka: convert it to PKCS12 (keytool -importkeystore -deststoretype PKCS12 …)"
                )))
            }
        },
        "ssl.endpoint.identification.algorithm" => {
            let algorithm = value.trim().to_ascii_lowercase();
            if algorithm != "https" {
                return Err(at(
                    "switching off broker hostname verification is refused: it lets anyone with any certificate from the CA pose as the broker".into(),
                ));
            }
            draft.set(&key, algorithm, FILE_VAR);
        }
        "enable.ssl.certificate.verification" => {
            if !value.trim().eq_ignore_ascii_case("true") {
                return Err(at("switching off certificate verification is refused".into()));
            }
        }
        _ => draft.set(&key, value, FILE_VAR),
    }
    Ok(())
}

/// A CA given by path must exist and be PEM: librdkafka would otherwise fail later with a
/// message that does not say which setting is wrong.
fn check_pem_file(path: &str, var: &'static str) -> Result<(), ConfigError> {
    let text = std::fs::read(path)
        .map_err(|e| err(var, format!("cannot read the CA file `{path}`: {e}")))?;
    if String::from_utf8_lossy(&text).contains("-----BEGIN CERTIFICATE-----") {
        Ok(())
    } else {
        Err(err(
            var,
            format!("`{path}` holds no PEM certificate (-----BEGIN CERTIFICATE-----); convert a JKS/PKCS12 truststore to PEM first"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const PASSWORD: &str = "hunter2-Pa$$";

    /// A file in the temp dir, unique per call; removed with the guard.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(contents: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "kafka-settings-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, contents).unwrap();
            TempFile(path)
        }

        fn path(&self) -> String {
            self.0.display().to_string()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn ca_file() -> TempFile {
        TempFile::new("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    }

    fn settings(vars: &[(&str, &str)]) -> Result<KafkaSettings, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        KafkaSettings::from_lookup(|name| map.get(name).cloned())
    }

    fn with_file(text: &str, vars: &[(&str, &str)]) -> Result<KafkaSettings, ConfigError> {
        let file = TempFile::new(text);
        let path = file.path();
        let mut all = vec![("KAFKA_CLIENT_PROPERTIES", path.as_str())];
        all.extend_from_slice(vars);
        settings(&all)
    }

    fn value(settings: &KafkaSettings, key: &str) -> Option<String> {
        settings.client_config().get(key).map(str::to_owned)
    }

    #[test]
    fn without_variables_the_local_plaintext_broker_is_used() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.brokers(), DEFAULT_BROKERS);
        assert_eq!(s.security_protocol(), SecurityProtocol::Plaintext);
        assert_eq!(
            value(&s, "bootstrap.servers").as_deref(),
            Some(DEFAULT_BROKERS)
        );
        assert_eq!(value(&s, "sasl.username"), None);
    }

    #[test]
    fn a_confluent_cloud_file_gives_brokers_protocol_and_credentials() {
        let s = with_file(
            &format!(
                "bootstrap.servers=pkc-1.aws.confluent.cloud:9092\nsecurity.protocol=SASL_SSL\nsasl.mechanisms=PLAIN\n\
                 sasl.username=APIKEY\nsasl.password={PASSWORD}\nsession.timeout.ms=45000\nclient.dns.lookup=use_all_dns_ips\n\
                 key.serializer=org.apache.kafka.common.serialization.StringSerializer\nacks=all\n"
            ),
            &[],
        )
        .unwrap();
        assert_eq!(s.brokers(), "pkc-1.aws.confluent.cloud:9092");
        assert_eq!(s.security_protocol(), SecurityProtocol::SaslSsl);
        assert_eq!(value(&s, "sasl.mechanism").as_deref(), Some("PLAIN"));
        assert_eq!(value(&s, "sasl.username").as_deref(), Some("APIKEY"));
        assert_eq!(value(&s, "sasl.password").as_deref(), Some(PASSWORD));
        assert_eq!(value(&s, "session.timeout.ms").as_deref(), Some("45000"));
        assert_eq!(
            value(&s, "client.dns.lookup").as_deref(),
            Some("use_all_dns_ips")
        );
        assert_eq!(
            value(&s, "key.serializer"),
            None,
            "Java-only: not passed on"
        );
        assert!(
            s.notes().iter().any(|n| n.contains("key.serializer")),
            "{:?}",
            s.notes()
        );
    }

    #[test]
    fn a_java_jaas_config_gives_the_scram_credentials() {
        let ca = ca_file();
        let s = with_file(
            &format!(
                "security.protocol=SASL_SSL\r\nsasl.mechanism=SCRAM-SHA-512\r\n\
                 sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required \\\r\n  username=\"alice\" \\\r\n  password=\"{PASSWORD}\";\r\n\
                 ssl.truststore.type=PEM\r\nssl.truststore.location={}\r\n",
                ca.path()
            ),
            &[("KAFKA_BROKERS", "b-1.msk:9096,b-2.msk:9096")],
        )
        .unwrap();
        assert_eq!(s.brokers(), "b-1.msk:9096,b-2.msk:9096");
        assert_eq!(value(&s, "sasl.username").as_deref(), Some("alice"));
        assert_eq!(value(&s, "sasl.password").as_deref(), Some(PASSWORD));
        assert_eq!(value(&s, "ssl.ca.location"), Some(ca.path()));
        assert_eq!(value(&s, "sasl.jaas.config"), None);
    }

    #[test]
    fn variables_override_the_file() {
        let ca = ca_file();
        let ca_path = ca.path();
        let s = with_file(
            "bootstrap.servers=file:9092\nsecurity.protocol=SASL_PLAINTEXT\nsasl.mechanism=PLAIN\n\
             sasl.jaas.config=x.PlainLoginModule required username=\"file-user\" password=\"file-pass\";\n",
            &[
                ("KAFKA_BROKERS", "env:9093"),
                ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
                ("KAFKA_SASL_MECHANISM", "scram-sha-256"),
                ("KAFKA_SASL_USERNAME", "env-user"),
                ("KAFKA_SASL_PASSWORD", PASSWORD),
                ("KAFKA_SSL_CA_LOCATION", &ca_path),
            ],
        )
        .unwrap();
        assert_eq!(s.brokers(), "env:9093");
        assert_eq!(s.security_protocol(), SecurityProtocol::SaslSsl);
        assert_eq!(value(&s, "security.protocol").as_deref(), Some("SASL_SSL"));
        assert_eq!(
            value(&s, "sasl.mechanism").as_deref(),
            Some("SCRAM-SHA-256")
        );
        assert_eq!(value(&s, "sasl.username").as_deref(), Some("env-user"));
        assert_eq!(value(&s, "sasl.password").as_deref(), Some(PASSWORD));
        assert_eq!(value(&s, "ssl.ca.location"), Some(ca_path));
        assert!(s.notes().is_empty(), "{:?}", s.notes());
    }

    #[test]
    fn variables_alone_configure_sasl_ssl() {
        let s = settings(&[
            ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("KAFKA_SASL_USERNAME", "u"),
            ("KAFKA_SASL_PASSWORD", PASSWORD),
        ])
        .unwrap();
        assert_eq!(value(&s, "sasl.password").as_deref(), Some(PASSWORD));
    }

    #[test]
    fn debug_output_redacts_every_secret() {
        let s = with_file(
            &format!(
                "security.protocol=SASL_SSL\nsasl.mechanism=PLAIN\nsasl.username=u\nsasl.password={PASSWORD}\n\
                 ssl.key.password=keypass-{PASSWORD}\n"
            ),
            &[],
        )
        .unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains(PASSWORD), "{shown}");
        assert!(shown.contains("sasl.password=[redacted]"), "{shown}");
        assert!(shown.contains("ssl.key.password=[redacted]"), "{shown}");
        assert!(shown.contains("SASL_SSL"), "{shown}");
        // rdkafka's own Debug of the built config leaves the password out too.
        let config = format!("{:?}", s.client_config());
        assert!(!config.contains(PASSWORD), "{config}");
    }

    #[test]
    fn credentials_that_would_be_dropped_are_refused() {
        let e = settings(&[
            ("KAFKA_SASL_USERNAME", "u"),
            ("KAFKA_SASL_PASSWORD", PASSWORD),
        ])
        .unwrap_err();
        assert_eq!(e.var, "KAFKA_SECURITY_PROTOCOL");
        let e = settings(&[
            ("KAFKA_SECURITY_PROTOCOL", "SSL"),
            ("KAFKA_SASL_USERNAME", "u"),
            ("KAFKA_SASL_PASSWORD", PASSWORD),
        ])
        .unwrap_err();
        assert_eq!(e.var, "KAFKA_SASL_USERNAME");
        assert!(!e.to_string().contains(PASSWORD), "{e}");
    }

    #[test]
    fn a_ca_without_tls_is_refused() {
        let ca = ca_file();
        let e = settings(&[("KAFKA_SSL_CA_LOCATION", &ca.path())]).unwrap_err();
        assert_eq!(e.var, "KAFKA_SSL_CA_LOCATION");
        assert!(e.problem.contains("PLAINTEXT"), "{e}");
    }

    #[test]
    fn sasl_needs_a_supported_mechanism_and_both_credentials() {
        let base = [
            ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_SASL_USERNAME", "u"),
            ("KAFKA_SASL_PASSWORD", PASSWORD),
        ];
        assert_eq!(settings(&base).unwrap_err().var, "KAFKA_SASL_MECHANISM");
        for mechanism in ["OAUTHBEARER", "GSSAPI", "SCRAM-SHA-1"] {
            let mut vars = base.to_vec();
            vars.push(("KAFKA_SASL_MECHANISM", mechanism));
            let e = settings(&vars).unwrap_err();
            assert_eq!(e.var, "KAFKA_SASL_MECHANISM", "{mechanism}");
        }
        let e = settings(&[
            ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_SASL_MECHANISM", "PLAIN"),
            ("KAFKA_SASL_USERNAME", "u"),
        ])
        .unwrap_err();
        assert_eq!(e.var, "KAFKA_SASL_PASSWORD");
        assert_eq!(
            settings(&[("KAFKA_SECURITY_PROTOCOL", "TLS")])
                .unwrap_err()
                .var,
            "KAFKA_SECURITY_PROTOCOL"
        );
    }

    #[test]
    fn msk_iam_and_other_java_login_code_is_refused_with_the_reason() {
        for text in [
            "security.protocol=SASL_SSL\nsasl.mechanism=AWS_MSK_IAM\nsasl.jaas.config=software.amazon.msk.auth.iam.IAMLoginModule required;\n",
            "security.protocol=SASL_SSL\nsasl.client.callback.handler.class=software.amazon.msk.auth.iam.IAMClientCallbackHandler\n",
        ] {
            let e = with_file(text, &[]).unwrap_err();
            assert_eq!(e.var, "KAFKA_CLIENT_PROPERTIES");
            assert!(e.problem.contains("MSK IAM"), "{e}");
        }
        let e = with_file(
            "sasl.jaas.config=com.sun.security.auth.module.Krb5LoginModule required useKeyTab=true;\n",
            &[],
        )
        .unwrap_err();
        assert!(e.problem.contains("Krb5LoginModule"), "{e}");
    }

    #[test]
    fn a_jks_truststore_is_refused_with_how_to_convert_it() {
        let e = with_file(
            "security.protocol=SSL\nssl.truststore.location=/etc/kafka/truststore.jks\nssl.truststore.type=JKS\n",
            &[],
        )
        .unwrap_err();
        assert!(e.problem.contains("convert it to PEM"), "{e}");
        let binary = TempFile::new("\u{fe}\u{ed}\u{fe}\u{ed}not pem");
        let e = with_file(
            &format!(
                "security.protocol=SSL\nssl.truststore.location={}\n",
                binary.path()
            ),
            &[],
        )
        .unwrap_err();
        assert!(e.problem.contains("not a PEM file"), "{e}");
    }

    #[test]
    fn switching_off_verification_is_refused() {
        for line in [
            "ssl.endpoint.identification.algorithm=",
            "ssl.endpoint.identification.algorithm=none",
            "enable.ssl.certificate.verification=false",
        ] {
            let e = with_file(&format!("security.protocol=SSL\n{line}\n"), &[]).unwrap_err();
            assert!(e.problem.contains("refused"), "{line}: {e}");
        }
        let s = with_file(
            "security.protocol=SSL\nssl.endpoint.identification.algorithm=HTTPS\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            value(&s, "ssl.endpoint.identification.algorithm").as_deref(),
            Some("https")
        );
    }

    #[test]
    fn unknown_keys_are_named_and_secret_values_never_echoed() {
        let e = with_file("securty.protocol=SASL_SSL\n", &[]).unwrap_err();
        assert_eq!(e.var, "KAFKA_CLIENT_PROPERTIES");
        assert!(e.problem.contains("securty.protocol"), "{e}");
        let e = with_file(&format!("socket.timeout.ms={PASSWORD}\n"), &[]).unwrap_err();
        assert!(e.problem.contains("socket.timeout.ms"), "{e}");
        let e = settings(&[("KAFKA_CLIENT_PROPERTIES", "/does/not/exist.properties")]).unwrap_err();
        assert_eq!(e.var, "KAFKA_CLIENT_PROPERTIES");
    }

    #[test]
    fn java_only_keys_are_unknown_to_librdkafka_and_renames_are_known() {
        for (key, rule) in KEY_RULES {
            let known = |key: &str| {
                let mut config = ClientConfig::new();
                config.set(key, "x");
                !matches!(
                    config.create_native_config(),
                    Err(KafkaError::ClientConfig(
                        rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN,
                        ..
                    ))
                )
            };
            match rule {
                KeyRule::JavaOnly(_) | KeyRule::Refused(_) => {
                    assert!(!known(key), "{key} is a librdkafka key: pass it on")
                }
                KeyRule::Rename(to) => assert!(known(to), "{key} -> {to}: unknown to librdkafka"),
                KeyRule::Interpreted => {}
            }
        }
    }
}
