//! `projector history --at` through the real binary: a value that is not an RFC 3339 instant
//! is refused by the argument parser with a clear message and exit code 2, never a panic.
//! Needs no stack: arguments are parsed before any configuration is read.

use std::process::Command;

fn history_at(at: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_projector"))
        .args(["history", "cus_1", "--at", at])
        .env_clear()
        .output()
        .expect("run projector")
}

#[test]
fn an_impossible_date_is_refused_by_the_argument_parser() {
    let output = history_at("2026-02-31T00:00:00Z");

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid value '2026-02-31T00:00:00Z' for '--at <AT>'"),
        "{stderr}"
    );
    assert!(stderr.contains("expected an RFC 3339 instant"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_date_without_a_time_is_refused() {
    let output = history_at("2026-02-31");

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("expected an RFC 3339 instant"), "{stderr}");
}

#[test]
fn non_ascii_arguments_are_refused_without_a_panic() {
    for at in [
        "2026-01-0é",
        "２０２６-01-04T00:00:00Z",
        "2026-01-04T00:00:00−01:00",
        "ééééééééééééééééééééé",
    ] {
        let output = history_at(at);

        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{at}: {stderr}");
        assert!(
            stderr.contains("expected an RFC 3339 instant"),
            "{at}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{at}: {stderr}");
    }
}
