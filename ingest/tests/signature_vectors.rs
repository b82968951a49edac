//! Our verifier agrees with Stripe's own library on every committed vector
//! (`tests/vectors/generate.py`, stripe-python).

use ingest::signature::verify;
use secrecy::SecretString;
use serde::Deserialize;

#[derive(Deserialize)]
struct Vector {
    name: String,
    secrets: Vec<String>,
    now: i64,
    tolerance: u64,
    body: String,
    header: String,
    expected: String,
}

#[test]
fn verifier_agrees_with_stripe_python_on_every_vector() {
    let text = include_str!("vectors/stripe_signature_vectors.json");
    let vectors: Vec<Vector> = serde_json::from_str(text).expect("vectors parse");
    assert!(
        vectors.len() >= 40,
        "expected the full vector set, got {}",
        vectors.len()
    );
    let mut disagreements = Vec::new();
    for v in &vectors {
        let secrets: Vec<SecretString> = v
            .secrets
            .iter()
            .map(|s| SecretString::from(s.clone()))
            .collect();
        let got = match verify(v.body.as_bytes(), &v.header, &secrets, v.tolerance, v.now) {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        if got != v.expected {
            disagreements.push(format!(
                "{}: expected {}, got {} (header {:?})",
                v.name, v.expected, got, v.header
            ));
        }
    }
    assert!(
        disagreements.is_empty(),
        "disagreements with stripe-python:\n{}",
        disagreements.join("\n")
    );
}
