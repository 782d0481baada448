//! Starting the binary: configuration from `POSTERN_*` environment variables,
//! `hash-password`, and start-up errors that exit non-zero with a clear message and
//! never a panic. (`--help` and the flag/env-var tables are checked in `cli.rs`.)

use crate::common;

use std::net::TcpListener;

use common::postern::{USER, command};
use common::*;

#[test]
fn hash_password_prints_a_users_file_scheme_for_each_scheme() {
    for (scheme, prefix) in [
        ("argon2id", "{ARGON2ID}$argon2id$"),
        ("sha512-crypt", "{SHA512-CRYPT}$6$"),
        ("bcrypt", "{BLF-CRYPT}$2"),
    ] {
        let line = common::tools::hash_password(scheme, PASSWORD);
        assert!(line.starts_with(prefix), "{scheme}: {line}");
        assert!(
            !line.contains(PASSWORD),
            "{scheme} leaked the password: {line}"
        );
    }
    // The default scheme is argon2id.
    let out = run(command().arg("hash-password"), b"secret\n", STEP);
    out.assert_success("hash-password");
    assert!(out.stdout.trim().starts_with("{ARGON2ID}"), "{out}");
    // Two hashes of one password differ (random salt).
    assert_ne!(
        common::tools::hash_password("sha512-crypt", PASSWORD),
        common::tools::hash_password("sha512-crypt", PASSWORD)
    );
}

#[tokio::test]
async fn every_setting_can_come_from_the_environment() {
    let backend = RawBackend::start();
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::generate();
    let paths = certs.write_to(dir.path());
    let users = dir.path().join("users");
    std::fs::write(&users, format!("{USER}:{{PLAIN}}{PASSWORD}\n")).unwrap();
    let (smtp, smtps) = (free_addr(), free_addr());
    let log = dir.path().join("log");
    let mut cmd = command();
    cmd.arg("serve")
        .env("POSTERN_LISTEN", smtp.to_string())
        .env("POSTERN_LISTEN_TLS", smtps.to_string())
        .env("POSTERN_BACKEND", backend.addr.to_string())
        .env("POSTERN_CERT", &paths.cert)
        .env("POSTERN_KEY", &paths.key)
        .env("POSTERN_USERS", &users)
        .env("POSTERN_HOSTNAME", "env.test")
        .env("POSTERN_COMMAND_TIMEOUT", "30s")
        .env("POSTERN_TLS_HANDSHAKE_TIMEOUT", "5s")
        .env("POSTERN_BACKEND_TIMEOUT", "5s")
        .env("POSTERN_RELAY_IDLE_TIMEOUT", "1m")
        .env("POSTERN_PROBE_INTERVAL", "1s")
        .env("POSTERN_LOG_FORMAT", "json")
        .env("POSTERN_LOG_LEVEL", "info")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("err")).unwrap());
    let mut child = cmd.spawn().unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let guard = Kill(&mut child);
    wait_until(STEP, "postern configured from env to listen", || {
        (accepts(smtp) && accepts(smtps)).then_some(())
    });
    let mut c = SmtpClient::connect_tls(smtps, certs.client_config()).await;
    let greeting = c.expect("220").await;
    assert!(
        greeting.last().starts_with("220 env.test ESMTP"),
        "{}",
        greeting.raw
    );
    c.cmd("EHLO client.test", "250").await;
    c.auth_plain(USER, PASSWORD, "235").await;
    c.cmd("QUIT", "221").await;
    drop(guard);
    // POSTERN_LOG_FORMAT=json: every log line is a JSON object.
    let text = std::fs::read_to_string(&log).unwrap()
        + &std::fs::read_to_string(dir.path().join("err")).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log output");
    for line in lines {
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "not JSON: {line}"
        );
        assert!(
            !line.contains(&plain_response(USER, PASSWORD)),
            "AUTH payload logged"
        );
    }
}

/// Runs a `serve` that must fail at start-up and checks the failure is clean.
#[track_caller]
fn assert_clean_startup_error(out: &Output, must_mention: &[&str]) {
    assert!(!out.status.success(), "expected a start-up failure: {out}");
    let all = format!("{}{}", out.stdout, out.stderr);
    for word in must_mention {
        assert!(all.contains(word), "error should mention {word:?}: {out}");
    }
    for bad in ["panicked", "stack backtrace", "RUST_BACKTRACE"] {
        assert!(!all.contains(bad), "start-up error must not panic: {out}");
    }
}

#[test]
fn missing_certificate_file() {
    let out = Postern::builder(free_addr())
        .env("RUST_BACKTRACE", "1")
        .flag("--cert", "/nonexistent/postern/cert.pem")
        .run_to_exit();
    assert_clean_startup_error(&out, &["/nonexistent/postern/cert.pem"]);
}

#[test]
fn certificate_file_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a PEM file\n").unwrap();
    let out = Postern::builder(free_addr())
        .env("RUST_BACKTRACE", "1")
        .flag("--cert", empty.display().to_string())
        .run_to_exit();
    assert_clean_startup_error(&out, &[&empty.display().to_string()]);
}

#[test]
fn key_not_matching_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let other = TestCerts::generate().write_to(dir.path());
    let out = Postern::builder(free_addr())
        .env("RUST_BACKTRACE", "1")
        .flag("--key", other.key.display().to_string())
        .run_to_exit();
    assert_clean_startup_error(&out, &[&other.key.display().to_string()]);
}

#[test]
fn missing_key_file() {
    let out = Postern::builder(free_addr())
        .env("RUST_BACKTRACE", "1")
        .flag("--key", "/nonexistent/postern/key.pem")
        .run_to_exit();
    assert_clean_startup_error(&out, &["/nonexistent/postern/key.pem"]);
}

#[test]
fn unreadable_users_file() {
    let out = Postern::builder(free_addr())
        .env("RUST_BACKTRACE", "1")
        .flag("--users", "/nonexistent/postern/users")
        .run_to_exit();
    assert_clean_startup_error(&out, &["/nonexistent/postern/users"]);

    // A directory is not a users file either (root can read any file, so "unreadable"
    // is tested with a path that cannot be read as a file).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().display().to_string();
    let out = Postern::builder(free_addr())
        .env("RUST_BACKTRACE", "1")
        .flag("--users", path.clone())
        .run_to_exit();
    assert_clean_startup_error(&out, &[&path]);
}

#[test]
fn users_file_with_an_unknown_scheme_names_the_line() {
    let out = Postern::builder(free_addr())
        .env("RUST_BACKTRACE", "1")
        .users_file(&["good:{PLAIN}secret", "bad:{FOO}bar"])
        .run_to_exit();
    assert_clean_startup_error(&out, &["line 2", "{FOO}"]);
}

#[test]
fn bad_listen_address() {
    let out = Postern::builder(free_addr())
        .env("RUST_BACKTRACE", "1")
        .flag("--listen", "not-an-address")
        .run_to_exit();
    assert_clean_startup_error(&out, &["--listen", "not-an-address"]);
}

#[test]
fn bad_backend_address() {
    let out = Postern::builder("no-port-here")
        .env("RUST_BACKTRACE", "1")
        .run_to_exit();
    assert_clean_startup_error(&out, &["--backend", "no-port-here"]);
}

#[test]
fn bad_duration() {
    let out = Postern::builder(free_addr())
        .env("RUST_BACKTRACE", "1")
        .flag("--command-timeout", "forever")
        .run_to_exit();
    assert_clean_startup_error(&out, &["--command-timeout", "forever"]);
}

#[test]
fn listen_address_already_in_use() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Postern::builder(free_addr())
        .env("RUST_BACKTRACE", "1")
        .flag("--listen", addr.clone())
        .run_to_exit();
    assert_clean_startup_error(&out, &[&addr]);
}
