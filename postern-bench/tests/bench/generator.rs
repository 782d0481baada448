//! `postern-bench` against a real postern in front of the recording sink: the load
//! generator's sessions are valid SMTP, every stage and mechanism works, the counts in
//! its JSON are right, and its messages arrive byte for byte.

use std::net::SocketAddr;
use std::time::Duration;

use crate::harness::{Postern, Sink, USER, bench_command, run};

/// Bench runs here are tiny; this only stops a hung run from stalling the suite.
const LIMIT: Duration = Duration::from_secs(60);

/// Runs `postern-bench --json` against `target` with `args`; returns (stdout, stderr).
fn bench(postern: &Postern, target: SocketAddr, args: &[&str]) -> (String, String) {
    let mut cmd = bench_command();
    cmd.args(["--target", &target.to_string(), "--json", "--quiet", "--ca"])
        .arg(&postern.ca)
        .args(args);
    let out = run(&mut cmd, LIMIT);
    assert!(out.status.success(), "postern-bench failed: {out}");
    (out.stdout, out.stderr)
}

#[track_caller]
fn assert_json_has(json: &str, fields: &[&str]) {
    for field in fields {
        assert!(json.contains(field), "{field} missing in {json}");
    }
}

#[test]
fn starttls_sessions_arrive_byte_for_byte() {
    let sink = Sink::start();
    let postern = Postern::start(sink.addr);
    let dir = tempfile::tempdir().expect("tempdir");
    let sent_path = dir.path().join("sent");
    let (json, _) = bench(
        &postern,
        postern.smtp,
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

    // The dump is the stuffed message plus ".\r\n", which is what the sink records.
    let sent = std::fs::read(&sent_path).expect("read --dump-message");
    let messages = sink.messages();
    assert_eq!(messages.len(), 6, "messages at the sink");
    for message in &messages {
        assert!(message == &sent, "a message differs from what was sent");
    }
    // The post-AUTH stream is exactly the client's commands and data. The backend
    // probes (EHLO, QUIT) carry no mail.
    let mut expected = Vec::new();
    for _ in 0..2 {
        expected.extend_from_slice(
            b"MAIL FROM:<bench@example.test>\r\nRCPT TO:<sink@example.test>\r\nDATA\r\n",
        );
        expected.extend_from_slice(&sent);
    }
    expected.extend_from_slice(b"QUIT\r\n");
    let relayed: Vec<Vec<u8>> = sink
        .connections()
        .into_iter()
        .filter_map(|raw| {
            let mail = memchr::memmem::find(&raw, b"MAIL FROM:")?;
            Some(raw[mail..].to_vec())
        })
        .collect();
    assert_eq!(relayed.len(), 3, "relayed sessions");
    for stream in relayed {
        assert!(
            stream == expected,
            "relayed stream differs: {:?}",
            String::from_utf8_lossy(&stream)
        );
    }
}

#[test]
fn implicit_tls_with_every_mechanism() {
    let sink = Sink::start();
    let postern = Postern::start(sink.addr);
    for mechanism in ["plain", "login", "cram-md5"] {
        let (json, _) = bench(
            &postern,
            postern.smtps,
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
    let sink = Sink::start();
    let postern = Postern::start(sink.addr);
    let mut cmd = bench_command();
    cmd.args(["--target", &postern.smtp.to_string()])
        .args(["--json", "--quiet", "--sessions", "2", "--ca"])
        .arg(&postern.ca)
        .env("POSTERN_BENCH_AUTH", format!("{USER}:wrong"));
    let out = run(&mut cmd, LIMIT);
    // Nothing succeeded: the summary is still printed, and the exit status says so.
    assert!(!out.status.success(), "{out}");
    assert!(
        out.stderr.contains("postern-bench: nothing succeeded"),
        "{out}"
    );
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
    let sink = Sink::start();
    let postern = Postern::start(sink.addr);
    let (json, stderr) = bench(
        &postern,
        postern.smtp,
        &["--idle", "5", "-c", "2", "-d", "0.5"],
    );
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
