//! `postern-bench-floor`: every measurement runs (a handshake that fails, or a resumed
//! one that does not resume, is an error) and reports a rate, for each key exchange.
//! The rates themselves depend on the machine and are not checked.

use std::time::Duration;

use crate::harness::{run, write_certificate};

/// A few milliseconds of work per measurement; this only stops a hang.
const LIMIT: Duration = Duration::from_secs(60);

const FIGURES: [&str; 6] = [
    "full_handshakes_per_cpu_s",
    "resumed_handshakes_per_cpu_s",
    "open_mb_per_cpu_s",
    "seal_mb_per_cpu_s",
    "aead_open_mb_per_cpu_s",
    "aead_seal_mb_per_cpu_s",
];

fn figure(json: &str, key: &str) -> f64 {
    let at = json
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("{key} missing from {json}"));
    let rest = &json[at + key.len() + 3..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {json}"))
}

#[test]
fn every_figure_is_measured_for_each_key_exchange() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = write_certificate(dir.path());
    for kx in ["x25519", "p256", "x25519mlkem768"] {
        let out = run(
            std::process::Command::new(env!("CARGO_BIN_EXE_postern-bench-floor"))
                .arg("--cert")
                .arg(&cert)
                .arg("--key")
                .arg(&key)
                .args(["--kx", kx, "-d", "0.02", "--json"]),
            LIMIT,
        );
        assert!(out.status.success(), "{kx}: {out}");
        for key in FIGURES {
            assert!(figure(&out.stdout, key) > 0.0, "{kx}: {key} in {out}");
        }
    }
}

#[test]
fn a_missing_key_is_an_error_not_a_figure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, _) = write_certificate(dir.path());
    let out = run(
        std::process::Command::new(env!("CARGO_BIN_EXE_postern-bench-floor"))
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(dir.path().join("absent.pem")),
        LIMIT,
    );
    assert!(!out.status.success(), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
}
