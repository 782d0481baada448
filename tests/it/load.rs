//! Load: 1000 concurrent STARTTLS sessions authenticate and each send one message through
//! postern into the real smtp-sink. Every message must arrive intact, no session may
//! fail, and connections and memory must return to baseline afterwards.
//!
//! The clients are `postern-bench` (a separate process, so its handshakes do not compete
//! with the test's runtime for the same threads).

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::postern::USER;
use common::*;

const SESSIONS: usize = 1000;
/// The whole run, handshakes included, in a debug build on 2 cores.
const BENCH_LIMIT: Duration = Duration::from_secs(120);
/// How far postern's RSS may stay above its pre-load baseline once the load is gone.
const RSS_SLACK_KIB: u64 = 64 * 1024;

/// `postern-bench`, the load generator of the workspace's other crate: cargo builds it
/// next to postern when the tests run from the workspace root (`cargo test`).
fn bench_command() -> Command {
    let path = Path::new(env!("CARGO_BIN_EXE_postern"))
        .with_file_name(format!("postern-bench{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: run the tests from the workspace root (`cargo test`), or \
         `cargo build -p postern-bench` first",
        path.display()
    );
    Command::new(path)
}

/// The message as smtp-sink dumps it: CRLF turned into LF and dot-stuffing undone.
fn as_dumped(stuffed: &[u8]) -> String {
    let text = String::from_utf8_lossy(stuffed);
    let mut out = String::new();
    for line in text.split_inclusive("\r\n") {
        let line = line.strip_suffix("\r\n").unwrap_or(line);
        out.push_str(line.strip_prefix('.').unwrap_or(line));
        out.push('\n');
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_tls_sessions_each_deliver_one_message() {
    let sink = SmtpSink::start_with_backlog(&[], 2048);
    let postern = Postern::builder(sink.addr)
        .listen("--metrics-listen", V4)
        .flag("--max-connections-per-ip", "2000")
        // Debug-level logging of 1000 handshakes costs more CPU than the handshakes.
        .flag("--log-level", "info")
        .start();
    let admin = postern.addr("--metrics-listen");

    // Baseline: one full session first, so lazily built state (TLS config, backend
    // probe, allocator arenas) is part of it.
    {
        let mut c = postern.authenticated(false).await;
        c.cmd("QUIT", "221").await;
    }
    wait_metric(admin, "postern_connections_active", 0.0, STEP).await;
    let baseline = postern.rss_kib();

    let dir = tempfile::tempdir().expect("tempdir");
    let sent_path = dir.path().join("sent");
    let target = postern.smtp.to_string();
    let sessions = SESSIONS.to_string();
    let mut cmd = bench_command();
    cmd.args(["--target", &target, "--mode", "starttls", "--ca"])
        .arg(&postern.paths.ca)
        .args(["-c", &sessions, "--sessions", &sessions])
        .args(["--messages-per-conn", "1", "--size", "2048", "-d", "110"])
        // A step may wait behind up to 999 handshakes on 2 cores in a debug build.
        .args(["--timeout", "90s"])
        .args(["--json", "--quiet", "--dump-message"])
        .arg(&sent_path)
        .env("POSTERN_BENCH_AUTH", format!("{USER}:{PASSWORD}"));
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || run(&mut cmd, b"", BENCH_LIMIT))
        .await
        .expect("bench thread");
    let took = started.elapsed();
    eprintln!(
        "postern-bench: {SESSIONS} sessions in {took:?}\n{}",
        out.stdout
    );
    out.assert_success("postern-bench");
    for field in [
        format!("\"sessions\":{SESSIONS},"),
        format!("\"messages\":{SESSIONS},"),
        "\"errors_total\":0,".to_string(),
    ] {
        assert!(out.stdout.contains(&field), "{field} missing: {out}");
    }

    // Every message arrived, with exactly the body that was sent.
    let sent = std::fs::read(&sent_path).expect("read --dump-message");
    let body = as_dumped(sent.strip_suffix(b".\r\n").expect("ends with the dot line"));
    let sink_thread = std::thread::spawn(move || {
        let msgs = sink.wait_for_messages(SESSIONS);
        (sink, msgs)
    });
    let (_sink, msgs) = within_for(
        Duration::from_secs(60),
        "smtp-sink to dump every message",
        async {
            loop {
                if sink_thread.is_finished() {
                    break sink_thread.join().expect("sink thread");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    assert_eq!(msgs.len(), SESSIONS, "messages in smtp-sink's dump");
    for (i, m) in msgs.iter().enumerate() {
        assert!(
            m.trim_end().ends_with(body.trim_end()),
            "message {i} differs from what was sent:\n{}\n--- sent ---\n{}",
            m.escape_debug(),
            body.escape_debug()
        );
    }

    // Back to baseline: no session left, memory within a sane bound.
    wait_metric(admin, "postern_connections_active", 0.0, STEP).await;
    let after = postern.rss_kib();
    eprintln!("postern RSS: baseline {baseline} KiB, after the load {after} KiB");
    assert!(
        after < baseline + RSS_SLACK_KIB,
        "RSS {after} KiB after the load, baseline {baseline} KiB"
    );
    // And it still serves.
    let mut c = postern.authenticated(true).await;
    c.cmd("QUIT", "221").await;
}
