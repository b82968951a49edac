//! Reading environment variables once at start-up: typed, validated, and every failure names
//! the variable (and never echoes a secret's value).

/// A bad variable, named, with what was expected.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct ConfigError {
    pub var: &'static str,
    pub problem: String,
}

pub fn err(var: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        problem: problem.into(),
    }
}

/// A non-negative integer, or `default` when unset.
pub fn num<T: std::str::FromStr>(
    value: Option<String>,
    var: &'static str,
    default: T,
) -> Result<T, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| err(var, format!("expected a non-negative integer, got `{v}`"))),
    }
}

/// A Kafka topic name (1–249 characters of `[a-zA-Z0-9._-]`), or `default` when unset.
pub fn topic(
    value: Option<String>,
    var: &'static str,
    default: &str,
) -> Result<String, ConfigError> {
    let name = value.unwrap_or_else(|| default.to_owned());
    let valid = !name.is_empty()
        && name.len() <= 249
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if valid {
        Ok(name)
    } else {
        Err(err(
            var,
            format!("`{name}` is not a valid Kafka topic name"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_default_when_unset_and_name_the_variable_when_bad() {
        assert_eq!(num::<u64>(None, "X", 7).unwrap(), 7);
        assert_eq!(num::<u64>(Some(" 12 ".into()), "X", 7).unwrap(), 12);
        assert_eq!(num::<u64>(Some("-1".into()), "X", 7).unwrap_err().var, "X");
    }

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert_eq!(topic(None, "T", "stripe.events").unwrap(), "stripe.events");
        assert!(topic(Some("a-b_c.d".into()), "T", "x").is_ok());
        for bad in ["", "a b", "a/b", &"x".repeat(250)] {
            assert_eq!(
                topic(Some(bad.to_owned()), "T", "x").unwrap_err().var,
                "T",
                "{bad:?}"
            );
        }
    }
}
