//! Helpers for the XCLIENT, PROXY protocol and MX tests: postern, a private Postfix
//! instance, HAProxy and real clients (smtplib, swaks), each run as a child process.
//!
//! Everything listens on loopback ports picked at random, every wait has a deadline, and
//! every process is stopped on drop, so tests can run beside other people's.

// Each test file uses a different part of these helpers.
#![allow(dead_code)]

pub mod postfix;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

pub use postfix::Postfix;

/// The longest any single wait (a port, a log line, a child process) may take.
pub const STEP: Duration = Duration::from_secs(20);

pub const USER: &str = "alice";
/// A user name with the characters xtext must encode (`+`, `=`).
pub const XTEXT_USER: &str = "bob+tag=x@example.com";
pub const PASSWORD: &str = "secret";

pub const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
pub const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
/// A second loopback address for clients, so the real client (127.0.0.2) and postern
/// (127.0.0.1) are told apart in every log. Linux routes all of 127/8 to `lo`.
pub const CLIENT_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Whether `program` can be run; tests skip (with a message) when it cannot.
pub fn have(program: &str) -> bool {
    let found = if program.contains('/') {
        Path::new(program).exists()
    } else {
        std::env::var_os("PATH").is_some_and(|paths| {
            std::env::split_paths(&paths).any(|dir| dir.join(program).is_file())
        })
    };
    if !found {
        // Skipping is for a machine without the tool; CI installs them all.
        eprintln!("SKIP: {program} is not installed");
        assert!(
            std::env::var_os("CI").is_none(),
            "{program} must be installed in CI (.ci/run)"
        );
    }
    found
}

/// A port free on `ip` right now.
pub fn free_addr(ip: IpAddr) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).expect("bind a free port");
    listener.local_addr().expect("local addr")
}

/// Waits until `addr` accepts a TCP connection.
pub fn wait_accepting(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + STEP;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} never accepted on {addr}");
}

/// Runs a command to completion with a deadline, killing it if it overruns.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    // Drain pipes on threads so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

// ---------------------------------------------------------------------------------------
// postern

/// A running `postern serve`, logging JSON to a file; killed on drop.
pub struct Postern {
    child: Child,
    dir: TempDir,
    log: PathBuf,
    /// Listener addresses by flag (`--listen`, `--listen-mx`, ...).
    pub listeners: Vec<(String, SocketAddr)>,
}

pub struct PosternOptions {
    pub backend: String,
    /// `(flag, address)` pairs: `("--listen", addr)`, `("--listen-mx", addr)`.
    pub listeners: Vec<(&'static str, SocketAddr)>,
    /// Further flags, e.g. `["--xclient"]`, `["--backend-proxy-protocol", "v2"]`.
    pub args: Vec<String>,
    /// Wait for a successful backend probe before returning.
    pub wait_backend: bool,
}

impl PosternOptions {
    pub fn new(backend: impl ToString) -> Self {
        PosternOptions {
            backend: backend.to_string(),
            listeners: Vec::new(),
            args: Vec::new(),
            wait_backend: true,
        }
    }

    pub fn listen(mut self, flag: &'static str, addr: SocketAddr) -> Self {
        self.listeners.push((flag, addr));
        self
    }

    pub fn arg(mut self, arg: impl ToString) -> Self {
        self.args.push(arg.to_string());
        self
    }
}

impl Postern {
    pub fn start(options: PosternOptions) -> Postern {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("self-signed certificate");
        let cert = dir.path().join("tls.crt");
        let key_path = dir.path().join("tls.key");
        std::fs::write(&cert, key.cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.signing_key.serialize_pem()).expect("write key");
        let users = dir.path().join("users");
        std::fs::write(
            &users,
            format!(
                "{USER}:{{PLAIN}}{PASSWORD}\n{}:{{PLAIN}}{PASSWORD}\n\
                 {XTEXT_USER}:{{PLAIN}}{PASSWORD}\n",
                long_user()
            ),
        )
        .expect("write users");
        let log = dir.path().join("postern.log");
        let log_file = std::fs::File::create(&log).expect("create log");

        let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern"));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("POSTERN_") || key == "RUST_LOG" {
                cmd.env_remove(key);
            }
        }
        cmd.arg("serve")
            .arg("--backend")
            .arg(&options.backend)
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key_path)
            .arg("--users")
            .arg(&users)
            .args(["--hostname", "postern.test", "--log-format", "json"])
            .args(["--log-level", "debug", "--probe-interval", "1s"])
            .args(["--auth-failure-delay", "0s"]);
        for (flag, addr) in &options.listeners {
            cmd.arg(flag).arg(addr.to_string());
        }
        cmd.args(&options.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = cmd.spawn().expect("spawn postern");
        let mut postern = Postern {
            child,
            dir,
            log,
            listeners: options
                .listeners
                .iter()
                .map(|(f, a)| (f.to_string(), *a))
                .collect(),
        };
        let want = options.listeners.len();
        postern.wait_log("postern listening", |line| {
            (postern_logs_count(line, "listening") >= want).then_some(())
        });
        if options.wait_backend {
            postern.wait_log("a successful backend probe", |line| {
                (postern_logs_count(line, "backend probe succeeded") >= 1).then_some(())
            });
        }
        postern
    }

    /// The address of the first listener given with `flag`.
    pub fn addr(&self, flag: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(f, _)| f == flag)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no {flag} listener"))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `check`, given the whole log text, says yes.
    pub fn wait_log<T>(&mut self, what: &str, mut check: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + STEP;
        loop {
            let text = self.log_text();
            if let Some(v) = check(&text) {
                return v;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("postern exited ({status}) before {what}; log:\n{text}");
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; postern log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the `session closed` line of the session whose client address is
    /// `peer`, and returns it.
    pub fn wait_session_closed(&mut self, peer: SocketAddr) -> Value {
        let peer = peer.to_string();
        self.wait_log(&format!("the session of {peer} to close"), |text| {
            text.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| message(v) == "session closed" && span_field(v, "peer") == peer)
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postern {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- postern log -----\n{}", self.log_text());
        }
    }
}

fn postern_logs_count(text: &str, msg: &str) -> usize {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| message(v) == msg)
        .count()
}

/// A JSON log line's message.
pub fn message(line: &Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or("")
}

/// A field of the line's own event.
pub fn field<'a>(line: &'a Value, name: &str) -> &'a Value {
    &line["fields"][name]
}

/// A field of the innermost span of the line (e.g. the session span's `peer`).
pub fn span_field(line: &Value, name: &str) -> String {
    match &line["span"][name] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A 220-byte user name: with a long EHLO name it pushes XCLIENT past one line.
pub fn long_user() -> String {
    format!("{}@example.com", "u".repeat(208))
}

// ---------------------------------------------------------------------------------------
// Clients

/// What `tests/scripts/issue5_client.py` (smtplib) reported.
#[derive(Debug)]
pub struct ClientRun {
    pub json: Value,
    pub raw: String,
}

impl ClientRun {
    /// The reply code of a step (`greeting`, `ehlo`, `starttls`, `auth`, `mail`, `data`).
    pub fn code(&self, step: &str) -> Option<u64> {
        self.json["steps"][step][0].as_u64()
    }

    pub fn text(&self, step: &str) -> String {
        self.json["steps"][step][1]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Reply codes of the RCPT commands, in order.
    pub fn rcpt_codes(&self) -> Vec<u64> {
        self.json["steps"]["rcpt"]
            .as_array()
            .map(|a| a.iter().filter_map(|r| r[0].as_u64()).collect())
            .unwrap_or_default()
    }

    /// The client's own address, as postern and the backend saw it.
    pub fn local(&self) -> SocketAddr {
        let ip: IpAddr = self.json["local"]["ip"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no local address in {}", self.raw));
        let port = self.json["local"]["port"].as_u64().expect("local port") as u16;
        SocketAddr::new(ip, port)
    }
}

/// Options of one smtplib run.
#[derive(Debug, Clone)]
pub struct Smtplib {
    pub to: SocketAddr,
    pub source: Option<IpAddr>,
    pub ehlo: String,
    pub starttls: bool,
    /// Greet with HELO instead of EHLO.
    pub helo: bool,
    pub login: Option<(String, String)>,
    pub rcpt: Vec<String>,
}

impl Smtplib {
    pub fn new(to: SocketAddr) -> Self {
        Smtplib {
            to,
            source: None,
            ehlo: "client.example".into(),
            starttls: false,
            helo: false,
            login: None,
            rcpt: Vec::new(),
        }
    }

    pub fn from(mut self, source: IpAddr) -> Self {
        self.source = Some(source);
        self
    }

    pub fn starttls(mut self) -> Self {
        self.starttls = true;
        self
    }

    pub fn helo(mut self) -> Self {
        self.helo = true;
        self
    }

    pub fn login(mut self, user: &str, password: &str) -> Self {
        self.login = Some((user.into(), password.into()));
        self
    }

    pub fn ehlo(mut self, name: &str) -> Self {
        self.ehlo = name.into();
        self
    }

    pub fn rcpt(mut self, rcpt: &str) -> Self {
        self.rcpt.push(rcpt.into());
        self
    }

    pub fn run(&self) -> ClientRun {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/issue5_client.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .arg("--host")
            .arg(self.to.ip().to_string())
            .arg("--port")
            .arg(self.to.port().to_string())
            .arg("--ehlo")
            .arg(&self.ehlo);
        if let Some(source) = self.source {
            cmd.arg("--source").arg(source.to_string());
        }
        if self.helo {
            cmd.arg("--helo");
        }
        if self.starttls {
            cmd.arg("--starttls");
        }
        if let Some((user, password)) = &self.login {
            cmd.arg("--user").arg(user).arg("--password").arg(password);
        }
        for r in &self.rcpt {
            cmd.arg("--rcpt").arg(r);
        }
        let out = run(&mut cmd, STEP + Duration::from_secs(10));
        let raw = String::from_utf8_lossy(&out.stdout).into_owned();
        let json = serde_json::from_str(raw.trim()).unwrap_or_else(|e| {
            panic!(
                "smtplib client printed no JSON ({e}): {raw}\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        ClientRun { json, raw }
    }
}

/// Runs swaks with `args`; returns its exit code and transcript.
pub fn swaks(args: &[&str]) -> (i32, String) {
    let mut cmd = Command::new("swaks");
    cmd.args(args).args(["--timeout", "20"]);
    let out = run(&mut cmd, STEP + Duration::from_secs(10));
    let transcript = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), transcript)
}

/// Opens a raw TCP connection to `to`.
pub fn connect(to: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&to, STEP).expect("connect");
    stream.set_read_timeout(Some(STEP)).expect("read timeout");
    stream
}

/// Reads until EOF or `limit`; returns the bytes and whether the peer closed.
pub fn read_until_close(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    stream.set_read_timeout(Some(limit)).expect("read timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return (got, false);
            }
            // A reset is a close too.
            Err(_) => return (got, true),
        }
    }
}

/// Reads one SMTP reply (all its lines) from a raw connection.
pub fn read_reply(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    let deadline = Instant::now() + STEP;
    loop {
        assert!(Instant::now() < deadline, "no complete reply: {got:?}");
        match stream.read(&mut byte) {
            Ok(0) => panic!(
                "closed before a complete reply: {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(_) => got.push(byte[0]),
            Err(e) => panic!("read: {e}; got {:?}", String::from_utf8_lossy(&got)),
        }
        if got.ends_with(b"\r\n") {
            let text = String::from_utf8_lossy(&got).into_owned();
            let last = text.trim_end().lines().last().unwrap_or("").to_owned();
            if last.len() < 4 || last.as_bytes()[3] == b' ' {
                return text;
            }
        }
    }
}

pub fn send(stream: &mut TcpStream, line: &str) {
    stream
        .write_all(format!("{line}\r\n").as_bytes())
        .expect("write");
}

// ---------------------------------------------------------------------------------------
// HAProxy

const HAPROXY_DEFAULTS: &str = "global\n    maxconn 200\n\
     defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n";

/// A HAProxy in TCP mode (`haproxy -f CFG -db`, foreground), killed on drop.
pub struct Haproxy {
    child: Child,
    _dir: TempDir,
    log: PathBuf,
}

impl Haproxy {
    /// One frontend per `(bind, server, option)`: connections to `bind` go to `server`
    /// with `option` (`send-proxy` or `send-proxy-v2`).
    pub fn start(routes: &[(SocketAddr, SocketAddr, &str)]) -> Haproxy {
        let mut cfg = String::from(HAPROXY_DEFAULTS);
        for (i, (bind, server, option)) in routes.iter().enumerate() {
            cfg.push_str(&format!(
                "frontend fe{i}\n    bind {bind}\n    default_backend be{i}\n\
                 backend be{i}\n    server postern {server} {option}\n"
            ));
        }
        let binds: Vec<SocketAddr> = routes.iter().map(|(bind, _, _)| *bind).collect();
        Haproxy::run(cfg, &binds)
    }

    /// One frontend on `bind` spreading connections over `servers` in turn (`balance
    /// roundrobin`), each with `option`: replicas behind a load balancer.
    pub fn balance(bind: SocketAddr, servers: &[SocketAddr], option: &str) -> Haproxy {
        let mut cfg = String::from(HAPROXY_DEFAULTS);
        cfg.push_str(&format!(
            "frontend fe\n    bind {bind}\n    default_backend replicas\n\
             backend replicas\n    balance roundrobin\n"
        ));
        for (i, server) in servers.iter().enumerate() {
            cfg.push_str(&format!("    server replica{i} {server} {option}\n"));
        }
        Haproxy::run(cfg, &[bind])
    }

    fn run(cfg: String, binds: &[SocketAddr]) -> Haproxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &cfg).expect("write haproxy.cfg");
        let log = dir.path().join("haproxy.log");
        let log_file = std::fs::File::create(&log).expect("haproxy log");
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup"))
            .stderr(log_file)
            .spawn()
            .expect("spawn haproxy");
        let mut haproxy = Haproxy {
            child,
            _dir: dir,
            log,
        };
        for bind in binds {
            let deadline = Instant::now() + STEP;
            while TcpStream::connect_timeout(bind, Duration::from_millis(200)).is_err() {
                if let Ok(Some(status)) = haproxy.child.try_wait() {
                    panic!("haproxy exited ({status}):\n{}\n{cfg}", haproxy.log_text());
                }
                assert!(Instant::now() < deadline, "haproxy never bound {bind}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        haproxy
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- haproxy output -----\n{}", self.log_text());
        }
    }
}
