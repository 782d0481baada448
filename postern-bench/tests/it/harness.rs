//! What the tests drive: `postern-bench`, `postern-bench-sink` recording into a tempdir,
//! and a `postern serve` with fresh certificates and a `{PLAIN}` user. Every process
//! listens on a port the kernel picks and says which one, so tests never race for ports.

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The user postern knows, with a `{PLAIN}` secret so every mechanism can pass.
pub const USER: &str = "bench@example.test";
pub const PASSWORD: &str = "bench-secret";

/// How long postern may take to listen.
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

/// The `postern` binary of this workspace: cargo puts it next to `postern-bench`, but
/// builds it only when the `postern` package is built too (`cargo test` at the top).
fn postern_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_postern-bench"))
        .with_file_name(format!("postern{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: run the tests from the workspace root (`cargo test`), or \
         `cargo build -p postern` first",
        path.display()
    );
    path
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
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_postern-bench-sink"))
            .args(["--listen", "127.0.0.1:0", "--record"])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn postern-bench-sink");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let child = Running(child);
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("read the listening line");
        let addr = line
            .trim()
            .strip_prefix("postern-bench-sink listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
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

/// A running `postern serve` in front of a backend, killed on drop.
pub struct Postern {
    /// The `--listen` (STARTTLS) address.
    pub smtp: SocketAddr,
    /// The `--listen-tls` (implicit TLS) address.
    pub smtps: SocketAddr,
    /// The CA that signed postern's certificate, for `--ca`.
    pub ca: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    _child: Running,
    _dir: tempfile::TempDir,
}

impl Postern {
    pub fn start(backend: SocketAddr) -> Postern {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = Certs::generate();
        let path = |name: &str| dir.path().join(name);
        for (name, content) in [
            ("ca.pem", certs.ca),
            ("cert.pem", certs.cert),
            ("key.pem", certs.key),
            ("users", format!("{USER}:{{PLAIN}}{PASSWORD}\n")),
        ] {
            std::fs::write(path(name), content).expect("write postern's files");
        }
        let mut child = Command::new(postern_binary())
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--listen-tls", "127.0.0.1:0"])
            .args([
                "--backend",
                &backend.to_string(),
                "--hostname",
                "postern.test",
            ])
            .arg("--cert")
            .arg(path("cert.pem"))
            .arg("--key")
            .arg(path("key.pem"))
            .arg("--users")
            .arg(path("users"))
            .args(["--auth-mechanisms", "PLAIN,LOGIN,CRAM-MD5"])
            // The wrong-password test must not wait out the failure pacing.
            .args(["--auth-failure-delay", "0s"])
            .args(["--log-format", "json", "--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn postern");
        let stderr = child.stderr.take().expect("piped stderr");
        let child = Running(child);
        // Kept reading to the end, so postern never blocks on a full pipe, and kept for
        // failure messages.
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(listening) = listening(&line) {
                    let _ = tx.send(listening);
                }
                lines.lock().expect("log lock").push(line);
            }
        });
        let (mut smtp, mut smtps) = (None, None);
        let deadline = Instant::now() + STARTUP;
        while smtp.is_none() || smtps.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((kind, addr)) if kind == "starttls" => smtp = Some(addr),
                Ok((kind, addr)) if kind == "tls" => smtps = Some(addr),
                Ok(_) => {}
                Err(_) => panic!(
                    "postern did not listen within {STARTUP:?}:\n{}",
                    log.lock().expect("log lock").join("\n")
                ),
            }
        }
        Postern {
            smtp: smtp.expect("starttls listener"),
            smtps: smtps.expect("tls listener"),
            ca: path("ca.pem"),
            log,
            _child: child,
            _dir: dir,
        }
    }

    /// Everything postern logged so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }
}

/// `(listener, addr)` from postern's JSON `listening` log line.
fn listening(line: &str) -> Option<(String, SocketAddr)> {
    let event: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = event.get("fields")?;
    if fields.get("message")?.as_str()? != "listening" {
        return None;
    }
    let kind = fields.get("listener")?.as_str()?.to_owned();
    let addr = fields.get("addr")?.as_str()?.parse().ok()?;
    Some((kind, addr))
}
