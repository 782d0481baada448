//! `postern-bench-forward`, the relay floor: plain sessions through it reach the sink
//! byte for byte, with small and large buffers, so the floor compare.sh measures is the
//! cost of a real relay of the same load, not of a forwarder that drops or mangles it.

use std::time::Duration;

use crate::harness::{Forward, Sink, bench_command, run};

/// Bench runs here are tiny; this only stops a hung run from stalling the suite.
const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn plain_sessions_pass_through_byte_for_byte() {
    for buffer in ["8192", "65483"] {
        let sink = Sink::start();
        let forward = Forward::start(sink.addr, &["--buffer", buffer]);
        let dir = tempfile::tempdir().expect("tempdir");
        let sent_path = dir.path().join("sent");
        // No AUTH: the sink does not offer it, and the floor has no credential store.
        let mut cmd = bench_command();
        cmd.env_remove("POSTERN_BENCH_AUTH")
            .args(["--target", &forward.addr.to_string(), "--mode", "plain"])
            .args(["--json", "--quiet", "-c", "2", "--sessions", "4"])
            .args(["--messages-per-conn", "2", "--size", "70001"])
            .arg("--dump-message")
            .arg(&sent_path);
        let out = run(&mut cmd, LIMIT);
        assert!(out.status.success(), "buffer {buffer}: {out}");
        for field in ["\"sessions\":4,", "\"messages\":8,", "\"errors_total\":0,"] {
            assert!(
                out.stdout.contains(field),
                "buffer {buffer}: {field} in {out}"
            );
        }
        let sent = std::fs::read(&sent_path).expect("read --dump-message");
        let messages = sink.messages();
        assert_eq!(messages.len(), 8, "buffer {buffer}: messages at the sink");
        assert!(
            messages.iter().all(|m| m == &sent),
            "buffer {buffer}: a message differs from what was sent"
        );
    }
}
