//! Logging set-up: `RUST_LOG` filters (default `info`), `LOG_FORMAT=json` for structured logs.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Returns an error message naming the variable when
/// `LOG_FORMAT` is neither `text` nor `json`.
pub fn init() -> Result<(), String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let format = std::env::var("LOG_FORMAT").unwrap_or_else(|_| "text".into());
    // Colours only on a terminal: piped logs are read by programs.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format.as_str() {
        "text" | "" => builder.try_init().map_err(|e| e.to_string()),
        "json" => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
            .map_err(|e| e.to_string()),
        other => Err(format!(
            "LOG_FORMAT: expected `text` or `json`, got `{other}`"
        )),
    }
}

/// For tests: logs only when `TEST_LOG` is set, and never fails when called twice.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}
