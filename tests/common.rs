//! The test harness for postern (STYLE.md §12): the one support tree of the integration
//! tests (`tests/it/`).
//!
//! Every black-box test runs the real `postern` binary as a child process in front of a
//! backend it can inspect:
//!
//! - [`certs`]: an rcgen CA and a `localhost` server certificate, and a rustls client
//!   config that trusts the CA.
//! - [`postern`]: [`Postern`] writes a users file and the certificates into a tempdir,
//!   starts `postern serve` on free ports, waits until both ports accept and kills the
//!   process on drop (printing its log if the test failed).
//! - [`raw_backend`]: [`RawBackend`], an in-process SMTP server that records every byte it
//!   receives and can refuse, greet 421 or stall.
//! - [`mta`]: [`mta::Mta`], a private Postfix, Exim or OpenSMTPD behind a recording
//!   forwarder, and the messages its log says it accepted.
//! - [`postfix`]: [`postfix::Postfix`], a private Postfix that learns of authenticated
//!   clients only through XCLIENT, with a second service behind a PROXY header.
//! - [`haproxy`]: [`haproxy::Haproxy`], a real HAProxy in TCP mode in front of postern.
//! - [`sink`]: [`SmtpSink`], the real Postfix `smtp-sink`, dumping each message to a file.
//! - [`client`]: [`SmtpClient`], a raw line client (plain, STARTTLS or implicit TLS) with
//!   `expect("235")` style helpers.
//! - [`tools`]: swaks, Python smtplib, `openssl s_client` and lettre, driven the way a
//!   person would drive them.
//! - [`dovecot`]: [`dovecot::Dovecot`], a private Dovecot auth service (passwd-file users).
//! - [`redis`]: [`redis::Redis`], a private `redis-server` for the shared limits store.
//! - [`submission`]: [`submission::Submission`], a private Postfix submission service
//!   requiring STARTTLS and AUTH through Dovecot (passwords and OAuth2), the upstream of
//!   `postern relay-out`; [`token_server`]: the OAuth2 token and introspection endpoints.
//! - [`openssl_ca`]: certificates made with the openssl command line, chain mistakes
//!   included.
//!
//! The property tests drive postern's cores through its library instead, with checking
//! drivers that the fuzz targets (`fuzz/`) include by `#[path]`:
//!
//! - [`session_driver`]: a `Session` from raw client bytes, with the pre-AUTH invariants
//!   checked after every action.
//! - [`relay_harness`]: the post-AUTH `Tracker` against a strict model backend.
//!
//! Every await is bounded by [`within`] and every child process by [`run`], so a hang
//! fails the test after [`STEP`] instead of stalling CI.

// Each test module uses a different part of the harness.
#![allow(dead_code, unused_imports)]

pub mod certs;
pub mod client;
pub mod dovecot;
pub mod haproxy;
pub mod mta;
pub mod openssl_ca;
pub mod postern;
pub mod postfix;
pub mod raw_backend;
pub mod redis;
pub mod relay_harness;
pub mod session_driver;
pub mod sink;
pub mod submission;
pub mod token_server;
pub mod tools;

use std::collections::HashSet;
use std::future::Future;
use std::io::{Read, Seek, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use certs::TestCerts;
pub use client::{Reply, SmtpClient};
pub use postern::Postern;
pub use raw_backend::{Fault, RawBackend};
pub use sink::SmtpSink;

/// The longest any single step (an await, a child process, a port coming up) may take.
pub const STEP: Duration = Duration::from_secs(20);

/// The password every test user has, whatever the scheme.
pub const PASSWORD: &str = "secret";

/// The IPv4 loopback address, where postern and the servers behind it listen.
pub const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// The IPv6 loopback address.
pub const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
/// A second loopback address for clients, so the real client (127.0.0.2) and postern
/// (127.0.0.1) are told apart in every log. Linux routes all of 127/8 to `lo`.
pub const CLIENT_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Awaits `fut`, failing the test with `what` if it takes longer than [`STEP`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    within_for(STEP, what, fut).await
}

/// Like [`within`] with an explicit limit.
pub async fn within_for<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Ports handed out by [`free_port`] in this process, so two parallel tests never get the
/// same one between our probe and the child's bind (every integration test is a thread
/// of one process).
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback port that was free a moment ago and that this process has not handed out
/// before. A child process can still lose the race for it; [`Postern`] and [`SmtpSink`]
/// retry with fresh ports when that happens.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        let mut guard = HANDED_OUT.lock().unwrap();
        if guard.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

/// Marks `port`, bound by this process some other way, as never to be offered by
/// [`free_port`]: for a listener that closes and binds the same port again.
pub fn keep_port(port: u16) {
    let mut guard = HANDED_OUT.lock().unwrap();
    guard.get_or_insert_with(HashSet::new).insert(port);
}

/// A fresh loopback address (see [`free_port`]).
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A fresh port (see [`free_port`]) on the loopback address `ip`; for `::1` it was only
/// probed on 127.0.0.1, so the caller must retry when the bind fails.
pub fn free_addr_on(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, free_port())
}

/// Whether something accepts TCP connections on `addr` right now.
pub fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Whether this process runs as root (smtp-sink then needs `-u`).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Whether `program` (a name looked up in `PATH`, or a path) can be run. Without it a test
/// skips with a message, unless `CI` is set: CI installs everything (`.ci/run`).
pub fn have(program: &str) -> bool {
    let found = if program.contains('/') {
        Path::new(program).exists()
    } else {
        std::env::var_os("PATH").is_some_and(|paths| {
            std::env::split_paths(&paths).any(|dir| dir.join(program).is_file())
        })
    };
    if !found {
        eprintln!("SKIP: {program} is not installed");
        assert!(
            std::env::var_os("CI").is_none(),
            "{program} must be installed in CI (.ci/run)"
        );
    }
    found
}

/// What a finished child process left behind.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Panics with both streams unless the process exited 0.
    #[track_caller]
    pub fn assert_success(&self, what: &str) -> &Self {
        assert!(self.status.success(), "{what} failed: {self}");
        self
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion with `stdin` as its input, killing it and failing the test if
/// it outlives `limit`. Output goes through files, so a chatty child (swaks echoing a
/// 5 MiB message) can never block on a full pipe.
pub fn run(cmd: &mut Command, stdin: &[u8], limit: Duration) -> Output {
    let mut out = tempfile::tempfile().expect("tempfile");
    let mut err = tempfile::tempfile().expect("tempfile");
    let mut input = tempfile::tempfile().expect("tempfile");
    input.write_all(stdin).expect("write stdin file");
    input.rewind().expect("rewind stdin file");
    let mut child = cmd
        .stdin(Stdio::from(input))
        .stdout(Stdio::from(out.try_clone().expect("dup")))
        .stderr(Stdio::from(err.try_clone().expect("dup")))
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let (o, e) = (read_all(&mut out), read_all(&mut err));
            panic!(
                "{cmd:?} still running after {limit:?}\n--- stdout ---\n{o}\n--- stderr ---\n{e}"
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: read_all(&mut out),
        stderr: read_all(&mut err),
    }
}

fn read_all(f: &mut std::fs::File) -> String {
    let mut buf = Vec::new();
    f.rewind().expect("rewind");
    f.read_to_end(&mut buf).expect("read output");
    String::from_utf8_lossy(&buf).into_owned()
}

/// Polls `probe` every 20 ms until it returns `Some`, failing with `what` after `limit`.
#[track_caller]
pub fn wait_until<T>(limit: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `haystack` contains `needle` as a byte substring.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// Position of the first `needle` in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Base64 (standard alphabet, padded), for SASL payloads.
pub fn b64(data: impl AsRef<[u8]>) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Decodes base64 (standard alphabet).
pub fn unb64(data: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .unwrap_or_else(|e| panic!("bad base64 {data:?}: {e}"))
}

/// The SASL PLAIN initial response `\0user\0password`, base64.
pub fn plain_response(user: &str, password: &str) -> String {
    b64(format!("\0{user}\0{password}"))
}

/// The CRAM-MD5 (RFC 2195) response to a `334 <base64 challenge>` for `user`/`password`.
pub fn cram_md5_response(user: &str, password: &str, challenge_b64: &str) -> String {
    use hmac::{KeyInit, Mac};
    let challenge = unb64(challenge_b64);
    let mut mac =
        hmac::Hmac::<md5::Md5>::new_from_slice(password.as_bytes()).expect("any key size");
    mac.update(&challenge);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    b64(format!("{user} {hex}"))
}

/// The debug-printable form of raw SMTP bytes, for assertion messages.
pub fn show(bytes: &[u8]) -> String {
    const SHOWN: usize = 4000;
    if bytes.len() > SHOWN {
        format!(
            "{}...[{} bytes in all]",
            String::from_utf8_lossy(&bytes[..SHOWN]),
            bytes.len()
        )
    } else {
        String::from_utf8_lossy(bytes).into_owned()
    }
}

/// `GET path` over HTTP/1.1 with `Connection: close`; returns status code and body.
/// Polls `path` on the operations endpoint until it answers `status` (within [`STEP`]);
/// returns the body.
pub async fn wait_status(admin: SocketAddr, path: &str, status: u16) -> String {
    let deadline = Instant::now() + STEP;
    loop {
        let (code, body) = http_get(admin, path).await;
        if code == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} stayed {code} (wanted {status}): {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = within("connect to admin", tokio::net::TcpStream::connect(addr))
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    within("send request", s.write_all(req.as_bytes()))
        .await
        .expect("write request");
    let mut resp = Vec::new();
    within("read response", s.read_to_end(&mut resp))
        .await
        .expect("read response");
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {resp:?}"));
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The sum of every sample of metric `name` (all label sets) on `/metrics`; `None` if the
/// metric is absent.
pub async fn metric_sum(admin: SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = http_get(admin, "/metrics").await;
    let mut found = None;
    for line in body.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Polls `/metrics` until the samples of `name` add up to `value` (an absent metric
/// counts as 0), failing after `limit`.
pub async fn wait_metric(admin: SocketAddr, name: &str, value: f64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let got = metric_sum(admin, name).await.unwrap_or(0.0);
        if got == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {got} (wanted {value}) for {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
