//! `postern bench` against a real postern and the recording backend: the load generator's
//! sessions are valid SMTP, every stage and mechanism works, the counts in its JSON are
//! right, and its messages arrive byte for byte.

mod common;

use std::time::Duration;

use common::postern::{USER, command};
use common::{PASSWORD, Postern, RawBackend, run};

/// Bench runs here are tiny; this only stops a hung run from stalling the suite.
const LIMIT: Duration = Duration::from_secs(60);

/// Runs `postern bench --json` against `postern` with `args` and returns (stdout, stderr).
fn bench(postern: &Postern, port_of: fn(&Postern) -> u16, args: &[&str]) -> (String, String) {
    let target = format!("127.0.0.1:{}", port_of(postern));
    let mut cmd = command();
    cmd.arg("bench")
        .args(["--target", &target, "--json", "--quiet", "--ca"])
        .arg(&postern.paths.ca)
        .env("POSTERN_BENCH_AUTH", format!("{USER}:{PASSWORD}"))
        .args(args);
    let out = run(&mut cmd, b"", LIMIT);
    out.assert_success("postern bench");
    (out.stdout, out.stderr)
}

fn smtp(p: &Postern) -> u16 {
    p.smtp.port()
}

fn smtps(p: &Postern) -> u16 {
    p.smtps.port()
}

#[track_caller]
fn assert_json_has(json: &str, fields: &[&str]) {
    for field in fields {
        assert!(json.contains(field), "{field} missing in {json}");
    }
}

#[test]
fn starttls_sessions_arrive_byte_for_byte() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let dir = tempfile::tempdir().expect("tempdir");
    let sent_path = dir.path().join("sent");
    let (json, _) = bench(
        &postern,
        smtp,
        &[
            "--sessions",
            "3",
            "--messages-per-conn",
            "2",
            "--size",
            "5000",
            "--dump-message",
            sent_path.to_str().expect("utf-8 temp path"),
        ],
    );
    assert_json_has(
        &json,
        &[
            "\"mode\":\"starttls\"",
            "\"sessions\":3,",
            "\"messages\":6,",
            "\"bytes\":30000,",
            "\"errors_total\":0,",
            "\"tls\":\"TLSv1_3 ",
        ],
    );

    // The dump is the stuffed message plus ".\r\n"; the backend records up to the CRLF
    // before the dot.
    let sent = std::fs::read(&sent_path).expect("read --dump-message");
    let expected = sent
        .strip_suffix(b".\r\n")
        .expect("dump ends with the end-of-data line");
    let with_mail: Vec<_> = backend
        .sessions()
        .into_iter()
        .filter(|s| !s.messages.is_empty())
        .collect();
    assert_eq!(with_mail.len(), 3, "relayed sessions");
    for session in with_mail {
        assert_eq!(session.messages.len(), 2);
        for message in &session.messages {
            assert!(
                message.as_slice() == expected,
                "message differs from what was sent"
            );
        }
        // The post-AUTH stream is exactly the client's commands and data.
        let mail = common::find(&session.received, b"MAIL FROM:").expect("MAIL");
        let mut stream = Vec::new();
        for _ in 0..2 {
            stream.extend_from_slice(
                b"MAIL FROM:<bench@example.test>\r\nRCPT TO:<sink@example.test>\r\nDATA\r\n",
            );
            stream.extend_from_slice(&sent);
        }
        stream.extend_from_slice(b"QUIT\r\n");
        assert!(
            session.received[mail..] == stream[..],
            "relayed stream differs: {}",
            common::show(&session.received[mail..])
        );
    }
}

#[test]
fn implicit_tls_with_every_mechanism() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    for mechanism in ["plain", "login", "cram-md5"] {
        let (json, _) = bench(
            &postern,
            smtps,
            &["--mode", "tls", "--mechanism", mechanism, "--sessions", "2"],
        );
        assert_json_has(
            &json,
            &["\"mode\":\"tls\"", "\"sessions\":2,", "\"errors_total\":0,"],
        );
    }
}

#[test]
fn wrong_password_is_counted_at_the_auth_stage() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let target = format!("127.0.0.1:{}", postern.smtp.port());
    let mut cmd = command();
    cmd.arg("bench")
        .args([
            "--target",
            &target,
            "--json",
            "--quiet",
            "--sessions",
            "2",
            "--ca",
        ])
        .arg(&postern.paths.ca)
        .env("POSTERN_BENCH_AUTH", format!("{USER}:wrong"));
    let out = run(&mut cmd, b"", LIMIT);
    // Nothing succeeded: the summary is still printed, and the exit status says so.
    assert!(!out.status.success(), "{out}");
    assert!(out.stderr.contains("nothing succeeded"), "{out}");
    assert_json_has(
        &out.stdout,
        &[
            "\"sessions\":0,",
            "\"auth\":2,",
            "\"errors_total\":2,",
            "535 5.7.8",
        ],
    );
}

#[test]
fn idle_holds_authenticated_sessions() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let (json, stderr) = bench(&postern, smtp, &["--idle", "5", "-c", "2", "-d", "0.5"]);
    assert!(
        stderr.contains("idle: 5 sessions established, 0 failed"),
        "{stderr}"
    );
    assert_json_has(
        &json,
        &[
            "\"idle_established\":5,",
            "\"sessions\":5,",
            "\"errors_total\":0,",
        ],
    );
}
