//! The relay tracker end to end: the real binary, a recording fake backend on
//! loopback, a raw TLS line client, and (when installed) a real `redis-server` started
//! on a free loopback port by the test itself.
//!
//! - a second AUTH and a STARTTLS after login get 503 5.5.1 and never reach the backend;
//! - EHLO after login is rewritten as before login;
//! - a user over the message limit gets 451 4.7.1 on the next MAIL, another user not;
//! - `--strict-data` refuses the smuggling sequences, and without it they are relayed
//!   verbatim;
//! - two postern processes sharing one Redis enforce one limit, and a Redis stopped
//!   mid-run follows `--limits-store-failure`.

#![cfg(unix)]

use crate::common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

use common::free_port;
use common::redis::Redis;

const WAIT: Duration = Duration::from_secs(10);
/// AUTH PLAIN initial responses for alice/secret and bob/secret.
const ALICE: &str = "AGFsaWNlAHNlY3JldA==";
const BOB: &str = "AGJvYgBzZWNyZXQ=";

/// Kills the child when the test ends, pass or fail.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Certificate, key and users file in a temporary directory.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(
            dir.path().join("users"),
            "alice:{PLAIN}secret\nbob:{PLAIN}secret\n",
        )
        .unwrap();
        Files { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// What the fake backend received, per connection, and how many messages it took.
#[derive(Default)]
struct Received {
    connections: Vec<Vec<u8>>,
    messages: usize,
}

/// A recording SMTP server: enough of RFC 5321 to take mail, lenient about line
/// endings in DATA like the legacy servers postern fronts (a lone LF ends a line).
struct Backend {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
}

impl Backend {
    async fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Received::default()));
        let shared = received.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let received = shared.clone();
                tokio::spawn(async move {
                    let _ = serve_backend(stream, received).await;
                });
            }
        });
        Backend { addr, received }
    }

    fn all_bytes(&self) -> Vec<u8> {
        self.received.lock().unwrap().connections.concat()
    }

    fn messages(&self) -> usize {
        self.received.lock().unwrap().messages
    }
}

async fn serve_backend(stream: TcpStream, received: Arc<Mutex<Received>>) -> std::io::Result<()> {
    let index = {
        let mut r = received.lock().unwrap();
        r.connections.push(Vec::new());
        r.connections.len() - 1
    };
    let record = |line: &[u8]| {
        received.lock().unwrap().connections[index].extend_from_slice(line);
    };
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    write.write_all(b"220 backend ESMTP\r\n").await?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if read.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        record(&line);
        let upper = String::from_utf8_lossy(&line).to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            b"250-backend\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-XCLIENT NAME ADDR\r\n250 8BITMIME\r\n"
        } else if upper.starts_with("DATA") {
            write.write_all(b"354 go ahead\r\n").await?;
            // A lenient legacy server: "." alone on a line ends the message, whatever
            // ends the lines around it.
            loop {
                line.clear();
                if read.read_until(b'\n', &mut line).await? == 0 {
                    return Ok(());
                }
                record(&line);
                if line == b".\r\n" || line == b".\n" {
                    break;
                }
            }
            received.lock().unwrap().messages += 1;
            b"250 2.0.0 queued\r\n"
        } else if upper.starts_with("QUIT") {
            write.write_all(b"221 2.0.0 bye\r\n").await?;
            return Ok(());
        } else if upper.starts_with("AUTH") || upper.starts_with("STARTTLS") {
            b"502 5.5.1 not here\r\n"
        } else {
            b"250 2.0.0 ok\r\n"
        };
        write.write_all(reply).await?;
    }
}

/// One postern process on an implicit-TLS port.
struct Postern {
    addr: SocketAddr,
    metrics: SocketAddr,
    /// postern's self-signed certificate, which the test client trusts.
    cert: PathBuf,
    _child: Running,
}

impl Postern {
    async fn start(files: &Files, backend: SocketAddr, extra: &[&str]) -> Postern {
        // A port picked now can be taken before postern binds it; postern then exits at
        // start-up (its error is on stderr) and new ports are tried.
        for _attempt in 0..3 {
            if let Some(postern) = Self::try_start(files, backend, extra).await {
                return postern;
            }
        }
        panic!("postern exited at start-up three times");
    }

    async fn try_start(files: &Files, backend: SocketAddr, extra: &[&str]) -> Option<Postern> {
        let port = free_port();
        let metrics_port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_postern"))
            .arg("serve")
            .args(["--listen-tls", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(["--backend", &backend.to_string()])
            .arg("--cert")
            .arg(files.path("cert.pem"))
            .arg("--key")
            .arg(files.path("key.pem"))
            .arg("--users")
            .arg(files.path("users"))
            .args(["--hostname", "postern.test", "--auth-failure-delay", "0s"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut child = Running(child);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(addr).await.is_err() {
            if child.0.try_wait().unwrap().is_some() {
                return None;
            }
            assert!(Instant::now() < deadline, "nothing listens on {addr}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(Postern {
            addr,
            metrics: format!("127.0.0.1:{metrics_port}").parse().unwrap(),
            cert: files.path("cert.pem"),
            _child: child,
        })
    }

    /// A TLS client that has greeted and authenticated as `auth`.
    async fn login(&self, auth: &str) -> Client {
        let mut client = Client::connect(self.addr, &self.cert).await;
        client.expect("220").await;
        client.send("EHLO client.test").await;
        client.expect("250").await;
        client.send(&format!("AUTH PLAIN {auth}")).await;
        client.expect("235").await;
        client
    }

    async fn metrics(&self) -> String {
        let mut stream = TcpStream::connect(self.metrics).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut body))
            .await
            .unwrap()
            .unwrap();
        body
    }
}

/// A raw SMTP line client over TLS.
struct Client {
    stream: BufReader<TlsStream<TcpStream>>,
}

impl Client {
    async fn connect(addr: SocketAddr, cert: &Path) -> Client {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(cert).unwrap())
            .unwrap();
        // aws-lc-rs, the provider of the whole build (two in one build make rustls panic).
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        Client {
            stream: BufReader::new(tls),
        }
    }

    async fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\r\n").as_bytes()).await;
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.get_mut().write_all(bytes).await.unwrap();
        self.stream.get_mut().flush().await.unwrap();
    }

    /// Reads one whole reply and checks that it starts with `prefix`; returns it.
    async fn expect(&mut self, prefix: &str) -> String {
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(WAIT, self.stream.read_line(&mut line))
                .await
                .unwrap_or_else(|_| panic!("no reply; expected {prefix}, got {reply:?}"))
                .unwrap();
            assert!(n > 0, "closed; expected {prefix}, got {reply:?}");
            reply.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                break;
            }
        }
        assert!(
            reply.starts_with(prefix),
            "expected {prefix}, got {reply:?}"
        );
        reply
    }

    async fn send_message(&mut self, from: &str) {
        self.send(&format!("MAIL FROM:<{from}>")).await;
        self.expect("250").await;
        self.send("RCPT TO:<rcpt@example.test>").await;
        self.expect("250").await;
        self.send("DATA").await;
        self.expect("354").await;
        self.send_raw(b"Subject: test\r\n\r\nhello\r\n.\r\n").await;
        self.expect("250").await;
    }

    /// Whether the server closed the connection (EOF or a reset) within the wait.
    async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, self.stream.read_to_end(&mut rest))
            .await
            .is_ok()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn auth_and_starttls_after_login_never_reach_the_backend_and_ehlo_is_rewritten() {
    let files = Files::new();
    let backend = Backend::start().await;
    let postern = Postern::start(&files, backend.addr, &[]).await;
    let mut client = postern.login(ALICE).await;

    client.send("AUTH PLAIN AGJvYgBzZWNyZXQ=").await;
    client.expect("503 5.5.1").await;
    client.send("STARTTLS").await;
    client.expect("503 5.5.1").await;
    // Pipelined: the 503 comes after the backend's reply to the NOOP before it.
    client.send_raw(b"NOOP\r\nAUTH LOGIN\r\nNOOP\r\n").await;
    client.expect("250").await;
    client.expect("503 5.5.1").await;
    client.expect("250").await;

    client.send("EHLO again.test").await;
    let ehlo = client.expect("250").await;
    assert_eq!(
        ehlo,
        "250-postern.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n\
         250 AUTH PLAIN LOGIN CRAM-MD5\r\n"
    );
    client.send_message("alice@example.test").await;
    client.send("QUIT").await;
    client.expect("221").await;

    let seen = backend.all_bytes();
    assert!(
        !contains(&seen, b"AUTH"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    assert!(!contains(&seen, b"STARTTLS"));
    assert!(contains(&seen, b"EHLO again.test\r\n"));
    assert_eq!(backend.messages(), 1);
}

#[tokio::test]
async fn a_user_over_the_message_limit_gets_451_and_another_user_does_not() {
    let files = Files::new();
    let backend = Backend::start().await;
    let postern = Postern::start(
        &files,
        backend.addr,
        &[
            "--max-messages-per-user",
            "2/1h",
            "--max-recipients-per-message",
            "2",
        ],
    )
    .await;
    let mut alice = postern.login(ALICE).await;
    alice.send_message("alice@example.test").await;
    alice.send_message("alice@example.test").await;
    alice.send("MAIL FROM:<alice@example.test>").await;
    alice.expect("451 4.7.1").await;

    // A new session of the same user is over the limit too; another user is not.
    let mut again = postern.login(ALICE).await;
    again.send("MAIL FROM:<alice@example.test>").await;
    again.expect("451 4.7.1").await;
    let mut bob = postern.login(BOB).await;
    bob.send("MAIL FROM:<bob@example.test>").await;
    bob.expect("250").await;
    bob.send_raw(b"RCPT TO:<1@x.test>\r\nRCPT TO:<2@x.test>\r\nRCPT TO:<3@x.test>\r\n")
        .await;
    bob.expect("250").await;
    bob.expect("250").await;
    bob.expect("451 4.7.1").await;

    let metrics = postern.metrics().await;
    for line in [
        "postern_limit_rejections_total{limit=\"messages_per_user\"} 2",
        "postern_limit_rejections_total{limit=\"recipients_per_message\"} 1",
        "postern_messages_total{result=\"accepted\"} 2",
        "postern_messages_total{result=\"rejected_limit\"} 2",
        "postern_recipients_total 2",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
    assert_eq!(backend.messages(), 2);
}

/// A message whose body hides a second one behind a bare line ending.
fn smuggling_body(sequence: &[u8]) -> Vec<u8> {
    let mut body = b"Subject: first\r\n\r\nhello".to_vec();
    body.extend_from_slice(sequence);
    body.extend_from_slice(
        b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@x.test>\r\nDATA\r\n\
          Subject: smuggled\r\n\r\nevil\r\n.\r\n",
    );
    body
}

#[tokio::test]
async fn smuggling_is_refused_by_default_and_with_strict_data() {
    let files = Files::new();
    for sequence in [&b"\n.\n"[..], b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"] {
        for flags in [&["--strict-data"][..], &[]] {
            let backend = Backend::start().await;
            let postern = Postern::start(&files, backend.addr, flags).await;
            let mut client = postern.login(ALICE).await;
            client.send("MAIL FROM:<a@x.test>").await;
            client.expect("250").await;
            client.send("RCPT TO:<b@x.test>").await;
            client.expect("250").await;
            client.send("DATA").await;
            client.expect("354").await;
            client.send_raw(&smuggling_body(sequence)).await;
            client.expect("550 5.6.0").await;
            assert!(client.closed().await);
            // The backend never completed a message and never saw the smuggled one.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let seen = backend.all_bytes();
            assert_eq!(backend.messages(), 0, "{sequence:?} {flags:?}");
            assert!(!contains(&seen, b"evil"), "{sequence:?} {flags:?}");
        }
    }

    // By default bare LFs that are not around a dot line pass unchanged.
    let backend = Backend::start().await;
    let postern = Postern::start(&files, backend.addr, &[]).await;
    let mut client = postern.login(ALICE).await;
    client.send("MAIL FROM:<a@x.test>").await;
    client.expect("250").await;
    client.send("RCPT TO:<b@x.test>").await;
    client.expect("250").await;
    client.send("DATA").await;
    client.expect("354").await;
    let body = b"Subject: old device\n\nline one\nline two\n..dot\r\n.\r\n";
    client.send_raw(body).await;
    client.expect("250").await;
    client.send("QUIT").await;
    let deadline = Instant::now() + WAIT;
    while !contains(&backend.all_bytes(), b"QUIT\r\n") {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(contains(&backend.all_bytes(), body));
}

#[tokio::test]
async fn two_replicas_share_one_limit_in_redis_and_follow_the_failure_mode() {
    let Some(mut redis) = Redis::start("the Redis case of relay_tracking") else {
        return;
    };
    let files = Files::new();
    let backend = Backend::start().await;
    let url = redis.url();
    let shared = [
        "--limits-store",
        url.as_str(),
        "--max-messages-per-user",
        "3/1h",
        "--limits-store-timeout",
        "300ms",
    ];
    let closed_args: Vec<&str> = shared
        .iter()
        .copied()
        .chain(["--limits-store-failure", "closed"])
        .collect();
    let a = Postern::start(&files, backend.addr, &closed_args).await;
    let b = Postern::start(&files, backend.addr, &shared).await;

    let mut on_a = a.login(ALICE).await;
    let mut on_b = b.login(ALICE).await;
    on_a.send_message("alice@example.test").await;
    on_b.send_message("alice@example.test").await;
    on_a.send_message("alice@example.test").await;
    // Three in the shared window, whichever replica took them.
    on_b.send("MAIL FROM:<alice@example.test>").await;
    on_b.expect("451 4.7.1").await;
    on_a.send("MAIL FROM:<alice@example.test>").await;
    on_a.expect("451 4.7.1").await;
    let mut bob = b.login(BOB).await;
    bob.send_message("bob@example.test").await;
    // Logged in before the outage: failing closed refuses AUTH too (its failure windows
    // live in the store), which tests/auth_replicas.rs covers.
    let mut bob_on_a = a.login(BOB).await;

    // Redis goes away: replica A fails closed, replica B (the default) fails open.
    redis.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    on_a.send("RSET").await;
    on_a.expect("250").await;
    bob_on_a.send("MAIL FROM:<bob@example.test>").await;
    bob_on_a.expect("451 4.3.0").await;
    bob.send_message("bob@example.test").await;
    assert!(started.elapsed() < Duration::from_secs(5));

    let metrics = a.metrics().await;
    assert!(
        metrics.contains("postern_limit_rejections_total{limit=\"store_unavailable\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("postern_limits_store_errors_total{operation=\"reserve\"}"));
}
