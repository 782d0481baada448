//! `postern demo` as a person would use it: start the binary, read the banner, run the
//! smtplib command it prints (STARTTLS + AUTH with the printed credentials), see the
//! stand-in backend print the mail, stop with SIGINT and expect a clean exit.

#![cfg(unix)]

use crate::common;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Kills the child if the test fails half-way, so no demo outlives its test.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Free loopback ports ([`common::free_port`]). Another process could take one before
/// the demo binds it; the demo then fails with "binding ...", which the test reports.
fn free_ports<const N: usize>() -> [u16; N] {
    std::array::from_fn(|_| common::free_port())
}

/// Stdout lines, read on a thread so every wait can have a deadline.
fn lines_of(child: &mut Child) -> Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Collects lines until one contains `needle`; panics with everything seen on timeout.
fn read_until(rx: &Receiver<String>, needle: &str, seen: &mut Vec<String>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(needle);
                seen.push(line);
                if found {
                    return;
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                panic!(
                    "no line with {needle:?} within {timeout:?}; stdout:\n{}",
                    seen.join("\n")
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!(
                    "stdout closed before {needle:?}; stdout:\n{}",
                    seen.join("\n")
                )
            }
        }
    }
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Runs `command` with `sh -c` as the banner tells a person to, with a deadline.
fn run_shell(command: &str, timeout: Duration) -> ExitStatus {
    let mut child = Command::new("sh").arg("-c").arg(command).spawn().unwrap();
    match wait_with_timeout(&mut child, timeout) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            panic!("{command:?} did not finish within {timeout:?}");
        }
    }
}

/// The value after `label` on a banner line such as `  password      abc`.
fn field<'a>(banner: &'a [String], label: &str) -> &'a str {
    banner
        .iter()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .map(|rest| rest.split_whitespace().next().unwrap_or(""))
        .unwrap_or_else(|| panic!("no {label:?} in banner:\n{}", banner.join("\n")))
}

#[test]
fn demo_relays_a_mail_and_stops_on_sigint() {
    let [listen, listen_tls, metrics, sink] = free_ports::<4>();
    let child = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["demo", "--log-level", "warn"])
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .args(["--listen-tls", &format!("127.0.0.1:{listen_tls}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        .args(["--sink", &format!("127.0.0.1:{sink}")])
        // Settings meant for a real deployment must not leak into the demo: either of
        // these would make it fail or relay somewhere else.
        .env("POSTERN_BACKEND", "192.0.2.1:25")
        .env("POSTERN_MAX_CONNECTIONS", "not-a-number")
        .env("POSTERN_LISTEN", "0.0.0.0:1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut demo = Running(child);
    let rx = lines_of(&mut demo.0);

    let mut banner = Vec::new();
    read_until(
        &rx,
        "Waiting for mail.",
        &mut banner,
        Duration::from_secs(30),
    );
    let password = field(&banner, "password");
    let cert = field(&banner, "certificate");
    assert_eq!(field(&banner, "user"), "demo");
    assert_eq!(password.len(), 16, "{password:?}");
    assert!(std::path::Path::new(cert).exists(), "{cert}");
    assert!(
        banner
            .iter()
            .any(|l| l.contains(&format!("http://127.0.0.1:{metrics}/metrics"))),
        "metrics endpoint not in banner"
    );
    assert!(
        banner.iter().any(|l| l.contains("[legacy-sink]")),
        "sink not labelled"
    );

    // The printed one-liner, verbatim: STARTTLS verified against cert.pem, AUTH with
    // the printed credentials, one message.
    let python = banner
        .iter()
        .find_map(|l| l.trim_start().strip_prefix("python3 -c ").map(|_| l.trim()))
        .expect("a python3 -c line in the banner");
    assert!(python.contains(&format!("{listen}")) && python.contains(password));
    let status = run_shell(python, Duration::from_secs(30));
    assert!(
        status.success(),
        "the printed smtplib command failed: {status}"
    );

    let mut received = Vec::new();
    read_until(
        &rx,
        "[legacy-sink] message",
        &mut received,
        Duration::from_secs(10),
    );
    let report = received.last().unwrap();
    assert!(
        report.contains("from <demo@example.test> to <you@example.test>")
            && report.contains("Subject: hello from postern"),
        "{report}"
    );

    // Ctrl-C: drain, remove the temporary files, exit 0.
    let killed = Command::new("kill")
        .args(["-INT", &demo.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = wait_with_timeout(&mut demo.0, Duration::from_secs(20))
        .expect("the demo did not exit within 20 s of SIGINT");
    assert_eq!(status.code(), Some(0), "{status}");
    let mut rest = Vec::new();
    read_until(&rx, "stopped; removed", &mut rest, Duration::from_secs(5));
    assert!(!std::path::Path::new(cert).exists(), "{cert} left behind");
}

#[test]
fn demo_refuses_to_bind_beyond_loopback() {
    let output = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["demo", "--listen", "0.0.0.0:2587"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("only binds loopback"), "{stderr}");
    assert!(
        output.stdout.is_empty(),
        "banner printed for a refused demo"
    );
}
