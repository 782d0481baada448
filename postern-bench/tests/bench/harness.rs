//! What the tests drive: `postern-bench`, `postern-bench-sink` recording into a tempdir,
//! and postern's server, in process, with fresh certificates and a `{PLAIN}` user.
//! Everything listens on a port the kernel picks and says which one, so tests never race
//! for ports.

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use clap::Parser as _;
use postern::session::ListenerKind;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The user postern knows, with a `{PLAIN}` secret so every mechanism can pass.
pub const USER: &str = "bench@example.test";
pub const PASSWORD: &str = "bench-secret";

/// How long postern may take to be ready.
const STARTUP: Duration = Duration::from_secs(20);

/// A child process killed on drop, pass or fail.
pub struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `postern-bench`, with the password in the environment as the README advises.
pub fn bench_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern-bench"));
    cmd.env("POSTERN_BENCH_AUTH", format!("{USER}:{PASSWORD}"));
    cmd
}

/// What a finished process printed.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
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

/// Runs `cmd` to its end, killing it and failing the test after `limit`.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let read_all = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = read_all(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {limit:?}: {cmd:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Spawns `cmd` (a tool started with `--listen 127.0.0.1:0`) and reads the address from
/// its first line, `NAME listening on ADDR`. The stdout pipe is returned to be held open:
/// the tool must not get EPIPE for its stdout.
fn listening(cmd: &mut Command, name: &str) -> (SocketAddr, Running, BufReader<ChildStdout>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let child = Running(child);
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("read the listening line");
    let addr = line
        .trim()
        .strip_prefix(&format!("{name} listening on "))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    (addr, child, stdout)
}

/// `postern-bench-forward` in front of `to`, on a port the kernel picked.
pub struct Forward {
    pub addr: SocketAddr,
    _child: Running,
    _stdout: BufReader<ChildStdout>,
}

impl Forward {
    pub fn start(to: SocketAddr, flags: &[&str]) -> Forward {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern-bench-forward"));
        cmd.args(["--listen", "127.0.0.1:0", "--to", &to.to_string()])
            .args(flags);
        let (addr, child, stdout) = listening(&mut cmd, "postern-bench-forward");
        Forward {
            addr,
            _child: child,
            _stdout: stdout,
        }
    }
}

/// `postern-bench-sink --record`, on a port the kernel picked.
pub struct Sink {
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    _child: Running,
    // Held open: the sink must not get EPIPE for its stdout.
    _stdout: BufReader<ChildStdout>,
}

impl Sink {
    pub fn start() -> Sink {
        Sink::start_with(&[])
    }

    /// [`Sink::start`] with these flags added.
    pub fn start_with(flags: &[&str]) -> Sink {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern-bench-sink"));
        cmd.args(["--listen", "127.0.0.1:0", "--record"])
            .arg(dir.path())
            .args(flags);
        let (addr, child, stdout) = listening(&mut cmd, "postern-bench-sink");
        Sink {
            addr,
            dir,
            _child: child,
            _stdout: stdout,
        }
    }

    /// The recorded files whose names start with `prefix` and end with `suffix`, in
    /// name order.
    fn recorded(&self, prefix: &str, suffix: &str) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(self.dir.path())
            .expect("read the record directory")
            .map(|entry| entry.expect("directory entry").path())
            .filter_map(|path| {
                let name = path.file_name()?.to_str()?.to_owned();
                (name.starts_with(prefix) && name.ends_with(suffix)).then_some(name)
            })
            .map(|name| {
                let bytes = std::fs::read(self.dir.path().join(&name)).expect("read record");
                (name, bytes)
            })
            .collect();
        files.sort();
        files
    }

    /// Every message received, exactly as it arrived after the 354, end line included.
    pub fn messages(&self) -> Vec<Vec<u8>> {
        let messages = self.recorded("conn-", ".data");
        messages.into_iter().map(|(_, bytes)| bytes).collect()
    }

    /// Everything each connection sent, by connection number.
    pub fn connections(&self) -> Vec<Vec<u8>> {
        let raw = self.recorded("conn-", ".raw");
        raw.into_iter().map(|(_, bytes)| bytes).collect()
    }
}

/// A fresh certificate for `localhost` (P-256 ECDSA, as compare.sh makes) and its key,
/// written into `dir` as `cert.pem` and `key.pem`.
pub fn write_certificate(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let certs = Certs::generate();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certs.cert).expect("write cert.pem");
    std::fs::write(&key, certs.key).expect("write key.pem");
    (cert, key)
}

/// A CA, and a certificate it signed for `localhost` and `127.0.0.1`, as PEM.
struct Certs {
    ca: String,
    cert: String,
    key: String,
}

impl Certs {
    fn generate() -> Certs {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.distinguished_name
            .push(DnType::CommonName, "postern-bench test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ca_cert = ca.self_signed(&ca_key).expect("CA self-sign");
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("server key");
        let mut server = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("server params");
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = server.signed_by(&key, &issuer).expect("sign server cert");
        Certs {
            ca: ca_cert.pem(),
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// `postern serve` in front of a backend, run in this process on its own runtime (the
/// library's `server::run` on listeners bound here), stopped on drop.
pub struct Postern {
    /// The `--listen` (STARTTLS) address.
    pub smtp: SocketAddr,
    /// The `--listen-tls` (implicit TLS) address.
    pub smtps: SocketAddr,
    /// The CA that signed postern's certificate, for `--ca`.
    pub ca: PathBuf,
    runtime: Option<tokio::runtime::Runtime>,
    _stop: postern::shutdown::StopHandle,
    _dir: tempfile::TempDir,
}

impl Postern {
    pub fn start(backend: SocketAddr) -> Postern {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = Certs::generate();
        let path = |name: &str| dir.path().join(name).display().to_string();
        for (name, content) in [
            ("ca.pem", certs.ca),
            ("cert.pem", certs.cert),
            ("key.pem", certs.key),
            ("users", format!("{USER}:{{PLAIN}}{PASSWORD}\n")),
        ] {
            std::fs::write(path(name), content).expect("write postern's files");
        }
        let (cert, key, users, backend) = (
            path("cert.pem"),
            path("key.pem"),
            path("users"),
            backend.to_string(),
        );
        let argv = [
            "postern",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--listen-tls",
            "127.0.0.1:0",
            "--backend",
            &backend,
            "--hostname",
            "postern.test",
            "--cert",
            &cert,
            "--key",
            &key,
            "--users",
            &users,
            "--auth-mechanisms",
            "PLAIN,LOGIN,CRAM-MD5",
            // The wrong-password test must not wait out the failure pacing.
            "--auth-failure-delay",
            "0s",
        ];
        let cli = postern::config::Cli::try_parse_from(argv).expect("serve flags");
        let postern::config::Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        let config = postern::server::Config::from_args(&args).expect("configuration");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("postern's runtime");
        let (smtp, smtps, stop) = runtime.block_on(async {
            let listeners = postern::server::Listeners::bind(&config)
                .await
                .expect("bind");
            let bound = |kind: ListenerKind| {
                let (listener, _) = listeners.smtp.iter().find(|(_, k)| *k == kind)?;
                listener.local_addr().ok()
            };
            let smtp = bound(ListenerKind::Submission).expect("--listen");
            let smtps = bound(ListenerKind::ImplicitTls).expect("--listen-tls");
            let (stop, requests) = postern::shutdown::channel();
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(postern::server::run(
                config,
                listeners,
                requests,
                Some(ready_tx),
            ));
            tokio::time::timeout(STARTUP, ready_rx)
                .await
                .expect("postern ready in time")
                .expect("postern ended before it was ready");
            (smtp, smtps, stop)
        });
        Postern {
            smtp,
            smtps,
            ca: dir.path().join("ca.pem"),
            runtime: Some(runtime),
            _stop: stop,
            _dir: dir,
        }
    }
}

impl Drop for Postern {
    fn drop(&mut self) {
        // Without waiting for sessions or password checks still in flight.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
