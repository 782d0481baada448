//! `certs/mkcerts.sh`: makes a CA and a localhost certificate postern can serve, for
//! each key type; idempotent; never leaves a key where git would commit it.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;

fn mkcerts(args: &[&str]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/mkcerts.sh");
    run(Command::new("bash").arg(script).args(args), b"", STEP * 2)
}

fn check_dir(dir: &Path) {
    for f in ["ca.pem", "ca.key", "server.pem", "server.key"] {
        assert!(dir.join(f).is_file(), "{f} missing in {}", dir.display());
    }
    for key in ["ca.key", "server.key"] {
        let mode = std::fs::metadata(dir.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{key} readable by others: {mode:o}");
    }
    let out = run(
        Command::new("openssl")
            .args([
                "verify",
                "-verify_hostname",
                "localhost",
                "-verify_ip",
                "127.0.0.1",
            ])
            .arg("-CAfile")
            .arg(dir.join("ca.pem"))
            .arg(dir.join("server.pem")),
        b"",
        STEP,
    );
    out.assert_success("openssl verify of mkcerts output");
}

async fn postern_serves(dir: &Path) {
    let backend = RawBackend::start();
    let certs = TestCerts::from_mkcerts_dir(dir);
    let postern = Postern::builder(backend.addr).certs(certs).start();
    let mut c = postern.authenticated(true).await;
    c.cmd("QUIT", "221").await;
    let mut c = postern.authenticated(false).await;
    c.cmd("QUIT", "221").await;
}

#[tokio::test]
async fn every_algorithm_makes_certificates_postern_serves() {
    let tmp = tempfile::tempdir().unwrap();
    for algo in ["ecdsa", "rsa", "ed25519"] {
        let dir = tmp.path().join(algo);
        let dir_s = dir.display().to_string();
        let out = mkcerts(&["--algo", algo, &dir_s]);
        out.assert_success(&format!("mkcerts.sh --algo {algo}"));
        assert!(out.stdout.contains("made  server.pem"), "{out}");
        check_dir(&dir);
        postern_serves(&dir).await;

        // Idempotent: a second run keeps every file byte for byte.
        let before = std::fs::read(dir.join("server.pem")).unwrap();
        let out = mkcerts(&["--algo", algo, &dir_s]);
        out.assert_success("second mkcerts.sh run");
        assert!(
            !out.stdout.contains("made"),
            "second run remade files: {out}"
        );
        assert_eq!(before, std::fs::read(dir.join("server.pem")).unwrap());
    }
}

#[test]
fn ecdsa_p256_is_the_default_and_force_remakes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let dir_s = dir.display().to_string();
    mkcerts(&[&dir_s]).assert_success("mkcerts.sh");
    let text = run(
        Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(dir.join("server.pem")),
        b"",
        STEP,
    );
    assert!(
        text.stdout.contains("prime256v1") || text.stdout.contains("P-256"),
        "{text}"
    );
    assert!(text.stdout.contains("DNS:localhost"), "{text}");
    assert!(text.stdout.contains("IP Address:127.0.0.1"), "{text}");

    let before = std::fs::read(dir.join("ca.pem")).unwrap();
    let out = mkcerts(&["--force", &dir_s]);
    out.assert_success("mkcerts.sh --force");
    assert_ne!(before, std::fs::read(dir.join("ca.pem")).unwrap());
    check_dir(&dir);

    // A server key that no longer matches is detected and remade.
    std::fs::write(dir.join("server.key"), "garbage").unwrap();
    let out = mkcerts(&[&dir_s]);
    out.assert_success("mkcerts.sh repair");
    assert!(out.stdout.contains("made  server.pem"), "{out}");
    check_dir(&dir);
}

#[test]
fn bad_option_is_refused() {
    let out = mkcerts(&["--algo", "dsa"]);
    assert!(!out.status.success(), "{out}");
    assert!(out.stderr.contains("ecdsa, rsa or ed25519"), "{out}");
}

#[test]
fn default_output_directory_is_git_ignored() {
    let root = env!("CARGO_MANIFEST_DIR");
    if !Path::new(root).join(".git").exists() {
        eprintln!("not a git checkout; skipping");
        return;
    }
    for f in ["certs/dev/ca.key", "certs/dev/server.key"] {
        let out = run(
            Command::new("git").args(["-C", root, "check-ignore", "-q", f]),
            b"",
            STEP,
        );
        assert!(out.status.success(), "{f} is not git-ignored: {out}");
    }
}
