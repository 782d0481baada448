//! The `postern` binary under test, run as a child process.

use clap::Parser as _;
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use super::certs::{CertPaths, TestCerts};
use super::client::{Reply, SmtpClient};
use super::{Output, STEP, accepts, free_addr, free_addr_on, run};

/// The `{PLAIN}` user: the only kind that can pass CRAM-MD5.
pub const USER: &str = "alice";

/// Users whose hashes were made by Dovecot's `doveadm pw` (DEPENDENCIES.md), all with the
/// password [`super::PASSWORD`].
pub const FIXTURE_USERS: &[(&str, &str)] = &[
    (
        "sha512",
        "{SHA512-CRYPT}$6$lRIUi9jdcFZ6nFOD$hPrIV2Ds4Jf.dNbalhcRaBBCV.9BRXWpP1DDrxJs50x2o.EIkJxrSc0982QPgbx.kKYv7QQIOkPTbs8owfYZl1",
    ),
    (
        "bcrypt",
        "{BLF-CRYPT}$2y$05$9IoBKkFUzKc3D5KkeRvJ6OYtvf/dCmzNy1TY7g9mdvyXnWBRT7TZ.",
    ),
    (
        "argon2",
        "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$x8cApe1EfAGc4ozjzjYR0w$ahZZ0PtVJTaYwSnOF4ddxA0Mtn0ETmK8ya2o0VecKx4",
    ),
];

/// The name postern is told to use in its greeting and EHLO reply.
pub const HOSTNAME: &str = "postern.test";

/// The path of the binary cargo built for these tests.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_postern")
}

/// A `postern` command with no inherited `POSTERN_*` variables.
pub fn command() -> Command {
    let mut cmd = Command::new(binary());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("POSTERN_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// How to start postern; see [`Postern::builder`].
pub struct PosternBuilder {
    backend: String,
    users: Vec<String>,
    certs: TestCerts,
    flags: Vec<(String, String)>,
    env: Vec<(String, String)>,
    relaxed_limits: bool,
    /// Harness flags [`Self::without_flag`] removed.
    removed: Vec<String>,
    /// Listen on `::1` instead of `127.0.0.1` ([`Self::on_ipv6_loopback`]).
    ipv6: bool,
    /// Further listener flags and the address each listens on ([`Self::listen`]).
    listeners: Vec<(String, IpAddr)>,
    /// Wait for the first successful backend probe ([`Self::wait_for_backend`]).
    wait_backend: bool,
}

/// Abuse limits the harness relaxes by default, so that protocol tests can fail AUTH
/// repeatedly, from one IP, without waiting out the failure delay. `tests/it/limits.rs`
/// runs with postern's real defaults ([`PosternBuilder::default_limits`]).
pub const RELAXED_LIMITS: &[(&str, &str)] = &[
    ("--max-auth-failures", "1000"),
    ("--auth-failure-delay", "0s"),
    ("--max-auth-failures-per-ip", "100000"),
    ("--max-auth-failures-per-user", "100000"),
    ("--max-errors", "1000"),
    ("--max-junk-commands", "100000"),
    ("--max-connections-per-ip", "10000"),
    ("--max-verifications-per-network", "10000"),
];

impl PosternBuilder {
    /// Listens on `[::1]` instead of `127.0.0.1` (a port free on one is taken on the
    /// other only by chance, which `start` retries).
    pub fn on_ipv6_loopback(mut self) -> Self {
        self.ipv6 = true;
        self
    }

    /// Adds a listener flag (`--listen-mx`, `--metrics-listen`) on a port of `ip` that
    /// the harness picks afresh at every start attempt, so a lost port race is retried
    /// like that of `--listen`; [`Postern::addr`] tells where it went.
    pub fn listen(mut self, flag: &str, ip: IpAddr) -> Self {
        self.listeners.push((flag.to_string(), ip));
        self
    }

    /// Makes [`Self::start`] also wait until postern has logged a successful backend
    /// probe, for tests whose first client must meet a backend postern knows is up.
    pub fn wait_for_backend(mut self) -> Self {
        self.wait_backend = true;
        self
    }

    /// Keeps postern's own defaults for the abuse limits instead of [`RELAXED_LIMITS`].
    pub fn default_limits(mut self) -> Self {
        self.relaxed_limits = false;
        self
    }

    /// Adds a users-file line (`name:{SCHEME}data`).
    pub fn user_line(mut self, line: impl Into<String>) -> Self {
        self.users.push(line.into());
        self
    }

    /// Replaces the whole users file content.
    pub fn users_file(mut self, lines: &[&str]) -> Self {
        self.users = lines.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Serves these certificates instead of freshly generated ones.
    pub fn certs(mut self, certs: TestCerts) -> Self {
        self.certs = certs;
        self
    }

    /// Sets `--name value`, replacing the harness default for that flag if there is one.
    pub fn flag(mut self, name: &str, value: impl Into<String>) -> Self {
        let value = value.into();
        match self.flags.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => self.flags.push((name.to_string(), value)),
        }
        self
    }

    /// Removes a flag the harness would otherwise pass.
    pub fn without_flag(mut self, name: &str) -> Self {
        self.flags.retain(|(n, _)| n != name);
        self.removed.push(name.to_string());
        self
    }

    /// Sets an environment variable for the child.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_string(), value.into()));
        self
    }

    /// Writes the users file and certificates into `dir` and builds the `subcommand`
    /// (`serve` or `check`) command line. `--listen`/`--listen-tls` get fresh ports
    /// unless set with [`Self::flag`], and so does every [`Self::listen`] flag.
    fn prepare(&self, dir: &Path, subcommand: &str) -> Prepared {
        let paths = self.certs.write_to(dir);
        let users = dir.join("users");
        let mut content = self.users.join("\n");
        content.push('\n');
        std::fs::write(&users, content).expect("write users file");

        let mut flags: Vec<(String, String)> = vec![
            ("--backend".into(), self.backend.clone()),
            ("--cert".into(), paths.cert.display().to_string()),
            ("--key".into(), paths.key.display().to_string()),
            ("--users".into(), users.display().to_string()),
            ("--hostname".into(), HOSTNAME.into()),
            ("--log-level".into(), "debug".into()),
            // The suite's users mix {PLAIN} and hashes, which by default hides CRAM-MD5;
            // the protocol tests exercise all three (tests/it/abuse.rs tests the default).
            ("--auth-mechanisms".into(), "PLAIN,LOGIN,CRAM-MD5".into()),
        ];
        if self.relaxed_limits {
            flags.extend(
                RELAXED_LIMITS
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_string())),
            );
        }
        flags.retain(|(n, _)| !self.removed.contains(n));
        let mut smtp = None;
        let mut smtps = None;
        let free_addr = || {
            let a = free_addr();
            if self.ipv6 {
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
            } else {
                a
            }
        };
        if !self.flags.iter().any(|(n, _)| n == "--listen") {
            let a = free_addr();
            smtp = Some(a);
            flags.push(("--listen".into(), a.to_string()));
        }
        if !self.flags.iter().any(|(n, _)| n == "--listen-tls") {
            let a = free_addr();
            smtps = Some(a);
            flags.push(("--listen-tls".into(), a.to_string()));
        }
        let mut listeners = Vec::new();
        for (name, ip) in &self.listeners {
            let a = free_addr_on(*ip);
            listeners.push((name.clone(), a));
            flags.push((name.clone(), a.to_string()));
        }
        for (name, value) in &self.flags {
            match flags.iter_mut().find(|(n, _)| n == name) {
                Some(slot) => slot.1 = value.clone(),
                None => flags.push((name.clone(), value.clone())),
            }
        }

        let mut cmd = command();
        cmd.arg(subcommand);
        for (name, value) in flags {
            cmd.arg(name).arg(value);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        Prepared {
            cmd,
            paths,
            smtp,
            smtps,
            listeners,
        }
    }

    /// Runs postern with this configuration expecting it to exit by itself (a startup
    /// error); fails the test if it is still running after [`STEP`].
    pub fn run_to_exit(self) -> Output {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut prepared = self.prepare(dir.path(), "serve");
        run(&mut prepared.cmd, b"", STEP)
    }

    /// Runs `postern check` with this configuration instead of `serve`.
    pub fn check(self) -> Output {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut prepared = self.prepare(dir.path(), "check");
        run(&mut prepared.cmd, b"", STEP)
    }

    /// Starts postern and waits until every listener accepts connections.
    pub fn start(self) -> Postern {
        // A port picked by free_addr() can be taken by another process before postern
        // binds it; try again with new ports in that case.
        for _attempt in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let Prepared {
                mut cmd,
                paths,
                smtp,
                smtps,
                listeners,
            } = self.prepare(dir.path(), "serve");
            let log_path = dir.path().join("postern.log");
            let log = File::create(&log_path).expect("create log");
            cmd.stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup log"))
                .stderr(log);
            let child = cmd.spawn().expect("spawn postern");
            let mut postern = Postern {
                child,
                smtp: smtp.expect("harness-chosen --listen"),
                smtps: smtps.expect("harness-chosen --listen-tls"),
                listeners,
                certs: self.certs.clone(),
                paths,
                log_path,
                dir,
            };
            let start = Instant::now();
            loop {
                if let Some(status) = postern.child.try_wait().expect("try_wait") {
                    let log = postern.log();
                    if log.contains("in use") {
                        break; // lost a port race: next attempt
                    }
                    panic!("postern exited during startup with {status}\n--- log ---\n{log}");
                }
                if accepts(postern.smtp)
                    && accepts(postern.smtps)
                    && postern.listeners.iter().all(|(_, a)| accepts(*a))
                {
                    if self.wait_backend {
                        postern.wait_log("a successful backend probe", |log| {
                            log.contains("backend probe succeeded").then_some(())
                        });
                    }
                    return postern;
                }
                if start.elapsed() > STEP {
                    panic!(
                        "postern did not accept on {}, {} and {:?} within {STEP:?}\n--- log ---\n{}",
                        postern.smtp,
                        postern.smtps,
                        postern.listeners,
                        postern.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("postern lost the race for free ports three times");
    }
}

impl PosternBuilder {
    /// Runs the server inside the test process instead of the binary, on listeners
    /// bound to port 0 by the server's own `Listeners::bind` (no port can be lost to
    /// another process), and returns once it accepts clients. Nothing is logged: use
    /// [`Self::start`] for tests that read postern's log.
    pub async fn start_in_process(self) -> InProcess {
        assert!(
            self.env.is_empty(),
            "environment variables are process-wide"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = self.certs.clone();
        let prepared = self
            .flag("--listen", "127.0.0.1:0")
            .flag("--listen-tls", "127.0.0.1:0")
            .prepare(dir.path(), "serve");
        let argv: Vec<std::ffi::OsString> = std::iter::once("postern".into())
            .chain(prepared.cmd.get_args().map(Into::into))
            .collect();
        let cli = postern::config::Cli::try_parse_from(argv).expect("serve flags");
        let postern::config::Command::Serve(args) = cli.command else {
            panic!("not serve");
        };
        let config = postern::server::Config::from_args(&args).expect("configuration");
        let listeners = postern::server::Listeners::bind(&config)
            .await
            .expect("bind");
        let bound: Vec<SocketAddr> = listeners
            .smtp
            .iter()
            .map(|(listener, _)| listener.local_addr().expect("local_addr"))
            .collect();
        let (stop, requests) = postern::shutdown::channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(postern::server::run(
            config,
            listeners,
            requests,
            Some(ready_tx),
        ));
        let ready = super::within("the in-process server to be ready", ready_rx)
            .await
            .expect("the server ended before it was ready");
        InProcess {
            // Config::listeners orders submission, then implicit TLS.
            smtp: bound[0],
            smtps: bound[1],
            backend_up: ready.backend_up,
            certs,
            stop,
            server,
            _dir: dir,
        }
    }
}

/// A server run by [`PosternBuilder::start_in_process`]; stopped (abruptly) on drop.
pub struct InProcess {
    pub smtp: SocketAddr,
    pub smtps: SocketAddr,
    /// Whether the first backend probe succeeded.
    pub backend_up: bool,
    certs: TestCerts,
    stop: postern::shutdown::StopHandle,
    server: tokio::task::JoinHandle<Result<(), String>>,
    _dir: tempfile::TempDir,
}

impl InProcess {
    pub fn tls_config(&self) -> std::sync::Arc<tokio_rustls::rustls::ClientConfig> {
        self.certs.client_config()
    }

    /// Asks the server to stop as SIGTERM would, and waits for its drain to end.
    pub async fn stop(mut self) -> Result<(), String> {
        self.stop.stop();
        let server = &mut self.server;
        super::within("the in-process server to stop", server)
            .await
            .expect("server task")
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// What [`PosternBuilder::prepare`] made: the command line and where it listens.
struct Prepared {
    cmd: Command,
    paths: CertPaths,
    smtp: Option<SocketAddr>,
    smtps: Option<SocketAddr>,
    listeners: Vec<(String, SocketAddr)>,
}

/// A running `postern serve`, killed on drop.
pub struct Postern {
    child: Child,
    /// The `--listen` (STARTTLS) address.
    pub smtp: SocketAddr,
    /// The `--listen-tls` (implicit TLS) address.
    pub smtps: SocketAddr,
    /// The [`PosternBuilder::listen`] flags and their addresses.
    listeners: Vec<(String, SocketAddr)>,
    pub certs: TestCerts,
    pub paths: CertPaths,
    log_path: PathBuf,
    dir: TempDir,
}

impl Postern {
    /// postern in front of `backend` with fresh certificates, [`USER`] (`{PLAIN}`) and
    /// the [`FIXTURE_USERS`].
    pub fn builder(backend: impl ToString) -> PosternBuilder {
        let mut users = vec![format!("{USER}:{{PLAIN}}{}", super::PASSWORD)];
        users.extend(FIXTURE_USERS.iter().map(|(u, h)| format!("{u}:{h}")));
        PosternBuilder {
            backend: backend.to_string(),
            users,
            certs: TestCerts::generate(),
            flags: Vec::new(),
            env: Vec::new(),
            relaxed_limits: true,
            removed: Vec::new(),
            ipv6: false,
            listeners: Vec::new(),
            wait_backend: false,
        }
    }

    /// [`Self::builder`] with the defaults, started.
    pub fn start(backend: impl ToString) -> Postern {
        Self::builder(backend).start()
    }

    /// Everything postern has logged so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The address of the listener given with `flag`: `--listen`, `--listen-tls` or one
    /// added with [`PosternBuilder::listen`].
    pub fn addr(&self, flag: &str) -> SocketAddr {
        match flag {
            "--listen" => self.smtp,
            "--listen-tls" => self.smtps,
            _ => self
                .listeners
                .iter()
                .find(|(f, _)| f == flag)
                .map(|(_, a)| *a)
                .unwrap_or_else(|| panic!("no {flag} listener")),
        }
    }

    /// Waits until `check`, given the whole log so far, returns `Some`; fails the test if
    /// postern exits first or [`STEP`] passes.
    #[track_caller]
    pub fn wait_log<T>(&mut self, what: &str, mut check: impl FnMut(&str) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            let log = self.log();
            if let Some(v) = check(&log) {
                return v;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("postern exited ({status}) before {what}\n--- log ---\n{log}");
            }
            assert!(
                start.elapsed() < STEP,
                "timed out after {STEP:?} waiting for {what}\n--- log ---\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// With `--log-format json`: waits for the `session closed` line of the session whose
    /// client address is `peer`, and returns it.
    #[track_caller]
    pub fn wait_session_closed(&mut self, peer: SocketAddr) -> Value {
        let peer = peer.to_string();
        self.wait_log(&format!("the session of {peer} to close"), |log| {
            json_lines(log)
                .find(|v| log_message(v) == "session closed" && span_field(v, "peer") == peer)
        })
    }

    /// The tempdir holding the users file, certificates and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The users file postern was started with (rewrite it to test reloads).
    pub fn users_path(&self) -> PathBuf {
        self.dir.path().join("users")
    }

    /// Sends `signal` (`"TERM"`, `"HUP"`, ...) to the process with kill(1).
    pub fn signal(&self, signal: &str) {
        let out = run(
            Command::new("kill").args([format!("-{signal}"), self.child.id().to_string()]),
            b"",
            STEP,
        );
        out.assert_success("kill");
    }

    /// Waits for the process to exit by itself and returns its status.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        super::wait_until(limit, "postern to exit", || {
            self.child.try_wait().expect("try_wait")
        })
    }

    /// The process id (for `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The resident set size from `/proc/<pid>/status` (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in {status}"))
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Shortcuts to connect the raw line client to this postern.
impl Postern {
    /// A rustls client config trusting this postern's CA.
    pub fn tls_config(&self) -> std::sync::Arc<tokio_rustls::rustls::ClientConfig> {
        self.certs.client_config()
    }

    /// Plain connection to `--listen`; the greeting is not read yet.
    pub async fn plain(&self) -> SmtpClient {
        SmtpClient::connect(self.smtp).await
    }

    /// `--listen` after greeting, EHLO, STARTTLS and EHLO; with the post-TLS EHLO reply.
    pub async fn starttls(&self) -> (SmtpClient, Reply) {
        SmtpClient::connect_starttls(self.smtp, self.tls_config()).await
    }

    /// `--listen-tls` after greeting and EHLO; with the EHLO reply.
    pub async fn implicit(&self) -> (SmtpClient, Reply) {
        SmtpClient::connect_implicit(self.smtps, self.tls_config()).await
    }

    /// A session authenticated as [`USER`] (235 seen), over implicit TLS or STARTTLS.
    pub async fn authenticated(&self, implicit: bool) -> SmtpClient {
        let addr = if implicit { self.smtps } else { self.smtp };
        SmtpClient::authenticated(addr, implicit, self.tls_config(), USER, super::PASSWORD).await
    }
}

impl Drop for Postern {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- postern log ({}) ---\n{}", self.smtp, self.log());
        }
    }
}

/// The lines of a `--log-format json` log that parse as JSON.
pub fn json_lines(log: &str) -> impl Iterator<Item = Value> + '_ {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
}

/// A JSON log line's message.
pub fn log_message(line: &Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or("")
}

/// A field of a JSON log line's own event.
pub fn log_field<'a>(line: &'a Value, name: &str) -> &'a Value {
    &line["fields"][name]
}

/// A field of the innermost span of a JSON log line (e.g. the session span's `peer`).
pub fn span_field(line: &Value, name: &str) -> String {
    match &line["span"][name] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}
