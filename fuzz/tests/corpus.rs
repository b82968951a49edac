//! Replays every fuzz target's inputs through its function in a plain `cargo test`: the
//! committed regressions (`regressions/<target>/`, one file per crash or hostile case found),
//! the seed corpus when `scripts/fuzz` has copied it in (`corpus/<target>/`), and the real-world
//! Stripe payloads (`STRIPE_REALWORLD_DIR`, default `../shared/stripe/realworld` beside the
//! repository) when they are there.

use std::path::{Path, PathBuf};

/// Every file under `dir`; only `.json` ones when `json_only` (the real-world folders also hold
/// licences and notes).
fn files_under(dir: &Path, json_only: bool, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, json_only, out);
        } else if !json_only || path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
}

fn inputs(target: &str) -> (usize, Vec<PathBuf>) {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut regressions = Vec::new();
    files_under(
        &here.join("regressions").join(target),
        false,
        &mut regressions,
    );
    let count = regressions.len();
    let mut all = regressions;
    files_under(&here.join("corpus").join(target), false, &mut all);
    let realworld = std::env::var_os("STRIPE_REALWORLD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| here.join("../../shared/stripe/realworld"));
    files_under(&realworld, true, &mut all);
    (count, all)
}

fn replay(target: &str, run: fn(&[u8])) {
    let (regressions, files) = inputs(target);
    assert!(regressions > 0, "no regressions/{target}/ inputs");
    for file in &files {
        let data = std::fs::read(file).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{target} panicked on {}", file.display());
    }
    println!(
        "{target}: {} inputs replayed ({regressions} regressions)",
        files.len()
    );
}

#[test]
fn signature_inputs_never_panic_and_never_forge() {
    replay("signature", stripe_pipeline_fuzz::signature);
}

#[test]
fn envelope_inputs_never_panic() {
    replay("envelope", stripe_pipeline_fuzz::envelope);
}

#[test]
fn projection_inputs_never_panic_and_apply_is_idempotent() {
    replay("projection", stripe_pipeline_fuzz::projection);
}

#[cfg(feature = "kafka-properties")]
#[test]
fn kafka_properties_inputs_never_panic() {
    replay("kafka_properties", stripe_pipeline_fuzz::kafka_properties);
}
