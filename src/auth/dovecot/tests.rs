//! The async [`Client`] against a scripted stand-in for Dovecot on a UNIX socket: what
//! it writes, how it multiplexes, and how each way of failing surfaces. The real
//! Dovecot is in `tests/it/dovecot_auth.rs`.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::UnixListener;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::*;

/// Bounds every await of the stand-in, so a bug fails instead of hanging.
const STEP: Duration = Duration::from_secs(5);

/// A short client timeout for the tests that wait for it to expire.
const SHORT: Duration = Duration::from_millis(300);

const HANDSHAKE: &str = "VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n\
MECH\tCRAM-MD5\tdictionary\tactive\nMECH\tAPOP\tprivate\nSPID\t42\nCUID\t1\nCOOKIE\tab\nDONE\n";

/// A listening socket standing in for Dovecot's `auth-client`.
struct Fake {
    _dir: tempfile::TempDir,
    listener: UnixListener,
    target: Target,
}

/// One accepted connection, seen from the server.
struct Peer {
    lines: Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

impl Fake {
    fn new() -> Fake {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("auth-client");
        let listener = UnixListener::bind(&path).expect("bind");
        Fake {
            _dir: dir,
            listener,
            target: Target::Unix(path),
        }
    }

    fn client(&self, timeout: Duration) -> Client {
        Client::new(
            self.target.clone(),
            Options {
                timeout,
                no_penalty: false,
            },
        )
    }

    async fn accept(&self) -> Peer {
        let (stream, _) = tokio::time::timeout(STEP, self.listener.accept())
            .await
            .expect("a connection")
            .expect("accept");
        let (read, write) = stream.into_split();
        Peer {
            lines: BufReader::new(read).lines(),
            write,
        }
    }

    /// Accepts and answers the handshake.
    async fn accept_ready(&self) -> Peer {
        let mut peer = self.accept().await;
        assert_eq!(peer.line().await, "VERSION\t1\t2");
        assert!(peer.line().await.starts_with("CPID\t"));
        peer.send(HANDSHAKE).await;
        peer
    }

    /// Whether a client connects within `wait`.
    async fn connects_within(&self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.listener.accept())
            .await
            .is_ok()
    }
}

impl Peer {
    async fn line(&mut self) -> String {
        tokio::time::timeout(STEP, self.lines.next_line())
            .await
            .expect("a line in time")
            .expect("read")
            .expect("a line, not EOF")
    }

    async fn send(&mut self, text: &str) {
        self.write.write_all(text.as_bytes()).await.expect("send");
    }

    /// Whether the client closed the connection (EOF within `wait`).
    async fn closed_within(&mut self, wait: Duration) -> bool {
        matches!(
            tokio::time::timeout(wait, self.lines.next_line()).await,
            Ok(Ok(None) | Err(_))
        )
    }
}

fn spawn_start(
    client: &Client,
    mechanism: &'static str,
    initial: Option<&'static [u8]>,
) -> tokio::task::JoinHandle<Result<(Exchange, Step), Error>> {
    let client = client.clone();
    tokio::spawn(async move {
        client
            .start(mechanism, initial, &ClientInfo::default())
            .await
    })
}

async fn join<T>(task: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(STEP, task)
        .await
        .expect("the client finishes")
        .expect("no panic")
}

fn success(user: &str) -> Step {
    Step::Success { user: user.into() }
}

#[test]
fn target_syntax() {
    for (input, target) in [
        (
            "unix:/run/dovecot/auth-client",
            Target::Unix("/run/dovecot/auth-client".into()),
        ),
        ("unix:private/auth", Target::Unix("private/auth".into())),
        (
            "inet:127.0.0.1:12345",
            Target::Inet {
                host: "127.0.0.1".into(),
                port: 12345,
            },
        ),
        (
            "inet:auth.example:24",
            Target::Inet {
                host: "auth.example".into(),
                port: 24,
            },
        ),
        (
            "inet:[::1]:12345",
            Target::Inet {
                host: "::1".into(),
                port: 12345,
            },
        ),
    ] {
        assert_eq!(input.parse::<Target>().as_ref(), Ok(&target), "{input}");
        assert_eq!(target.to_string(), input, "display {input}");
    }
    for (input, problem) in [
        ("", "unknown kind"),
        ("/run/dovecot/auth-client", "unknown kind"),
        ("tcp:127.0.0.1:1", "unknown kind"),
        ("unix:", "empty path"),
        ("inet:127.0.0.1", "no port"),
        ("inet:127.0.0.1:", "bad port"),
        ("inet:127.0.0.1:0", "bad port"),
        ("inet:127.0.0.1:65536", "bad port"),
        ("inet:127.0.0.1:+1", "bad port"),
        ("inet::24", "bad host"),
        ("inet:::1:24", "an IPv6 host needs brackets"),
        ("inet:[::1:24", "unclosed '['"),
        ("inet:[]:24", "bad host"),
        ("inet:a b:24", "bad host"),
    ] {
        match input.parse::<Target>() {
            Ok(target) => panic!("{input:?} parsed as {target:?}"),
            Err(error) => assert_eq!(error.problem, problem, "{input:?}"),
        }
    }
}

#[tokio::test]
async fn relays_a_login_exchange_and_reuses_the_connection() {
    let fake = Fake::new();
    let client = fake.client(STEP);
    assert!(client.handshake().is_none());
    let task = tokio::spawn({
        let client = client.clone();
        async move {
            let info = ClientInfo {
                remote: Some("192.0.2.7:5000".parse().unwrap()),
                ..ClientInfo::default()
            };
            let (mut exchange, step) = client.start("login", None, &info).await?;
            assert_eq!(step, Step::Challenge(b"Username:".to_vec()));
            assert_eq!(
                exchange.step(b"alice").await?,
                Step::Challenge(b"Password:".to_vec())
            );
            let done = exchange.step(b"secret").await?;
            assert!(matches!(exchange.step(b"more").await, Err(Error::Finished)));
            Ok::<_, Error>(done)
        }
    });
    let mut peer = fake.accept_ready().await;
    assert_eq!(
        peer.line().await,
        "AUTH\t1\tLOGIN\tservice=smtp\tsecured=tls\trip=192.0.2.7\trport=5000"
    );
    peer.send("CONT\t1\tVXNlcm5hbWU6\n").await;
    assert_eq!(peer.line().await, "CONT\t1\tYWxpY2U=");
    peer.send("CONT\t1\tUGFzc3dvcmQ6\n").await;
    assert_eq!(peer.line().await, "CONT\t1\tc2VjcmV0");
    peer.send("OK\t1\tuser=alice\n").await;
    assert_eq!(join(task).await.unwrap(), success("alice"));

    let handshake = client.handshake().expect("handshake kept");
    let names: Vec<&str> = handshake.usable_mechanisms().map(|m| m.name()).collect();
    assert_eq!(names, ["PLAIN", "LOGIN", "CRAM-MD5"]);

    // The next exchange goes over the same connection, under the next id.
    let task = spawn_start(&client, "PLAIN", Some(b"\0alice\0wrong"));
    assert_eq!(
        peer.line().await,
        "AUTH\t2\tPLAIN\tservice=smtp\tsecured=tls\tresp=AGFsaWNlAHdyb25n"
    );
    peer.send("FAIL\t2\tuser=alice\n").await;
    let (_, step) = join(task).await.unwrap();
    assert_eq!(
        step,
        Step::Failure {
            temporary: false,
            reason: None,
            user: Some("alice".into())
        }
    );
    assert!(!fake.connects_within(Duration::from_millis(100)).await);
}

#[tokio::test]
async fn concurrent_exchanges_share_one_connection() {
    let fake = Fake::new();
    let client = fake.client(STEP);
    let probe = tokio::spawn({
        let client = client.clone();
        async move { client.probe().await }
    });
    let mut peer = fake.accept_ready().await;
    join(probe).await.expect("probe");
    let first = spawn_start(&client, "PLAIN", Some(b"\0a\0x"));
    let first_line = peer.line().await;
    let second = spawn_start(&client, "PLAIN", Some(b"\0b\0y"));
    let second_line = peer.line().await;
    assert!(first_line.starts_with("AUTH\t1\t"), "{first_line}");
    assert!(second_line.starts_with("AUTH\t2\t"), "{second_line}");
    // Answered in the other order, in one write.
    peer.send("OK\t2\tuser=b\nOK\t1\tuser=a\n").await;
    assert_eq!(join(second).await.unwrap().1, success("b"));
    assert_eq!(join(first).await.unwrap().1, success("a"));
    assert!(!fake.connects_within(Duration::from_millis(100)).await);
}

#[tokio::test]
async fn nothing_listening_is_unavailable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = Client::new(Target::Unix(dir.path().join("missing")), Options::default());
    let error = client.probe().await.expect_err("nothing there");
    assert!(matches!(error, Error::Unavailable(_)), "{error:?}");
    assert!(error.is_source_down());
    assert!(error.to_string().contains("connecting to unix:"), "{error}");
    let error = client
        .start("PLAIN", Some(b""), &ClientInfo::default())
        .await
        .expect_err("nothing there");
    assert!(matches!(error, Error::Unavailable(_)), "{error:?}");
}

#[tokio::test]
async fn a_silent_server_times_out_in_the_handshake() {
    let fake = Fake::new();
    let client = fake.client(SHORT);
    let started = Instant::now();
    let task = tokio::spawn({
        let client = client.clone();
        async move { client.probe().await }
    });
    let _peer = fake.accept().await;
    let error = join(task).await.expect_err("no handshake");
    assert!(matches!(error, Error::Timeout), "{error:?}");
    assert!(error.is_source_down());
    assert!(started.elapsed() < SHORT + Duration::from_secs(1));
}

#[tokio::test]
async fn an_unanswered_request_times_out_and_new_requests_use_a_new_connection() {
    let fake = Fake::new();
    let client = fake.client(SHORT);
    let task = spawn_start(&client, "PLAIN", Some(b"\0a\0b"));
    let mut stuck = fake.accept_ready().await;
    assert!(stuck.line().await.starts_with("AUTH\t1\t"));
    let error = join(task).await.expect_err("no reply");
    assert!(matches!(error, Error::Timeout), "{error:?}");

    let task = spawn_start(&client, "PLAIN", Some(b"\0a\0b"));
    let mut fresh = fake.accept_ready().await;
    assert!(fresh.line().await.starts_with("AUTH\t1\t"));
    fresh.send("OK\t1\tuser=a\n").await;
    assert_eq!(join(task).await.unwrap().1, success("a"));
    // The old connection is closed once nothing uses it (a late answer on it would
    // reach nobody: see `connection`'s tests).
    assert!(stuck.closed_within(STEP).await);
}

#[tokio::test]
async fn a_server_going_away_fails_waiting_exchanges_then_the_next_request_reconnects() {
    let fake = Fake::new();
    let client = fake.client(STEP);
    let task = spawn_start(&client, "LOGIN", None);
    let mut peer = fake.accept_ready().await;
    assert!(peer.line().await.starts_with("AUTH\t1\tLOGIN\t"));
    drop(peer);
    let error = join(task).await.expect_err("connection gone");
    assert!(matches!(error, Error::Unavailable(_)), "{error:?}");
    assert!(error.is_source_down());

    let task = spawn_start(&client, "PLAIN", Some(b"\0a\0b"));
    let mut peer = fake.accept_ready().await;
    assert!(peer.line().await.starts_with("AUTH\t1\tPLAIN\t"));
    peer.send("OK\t1\tuser=a\n").await;
    assert_eq!(join(task).await.unwrap().1, success("a"));
}

#[tokio::test]
async fn a_hangup_between_requests_is_noticed_before_the_next_one() {
    let fake = Fake::new();
    let client = fake.client(STEP);
    let probe = tokio::spawn({
        let client = client.clone();
        async move { client.probe().await }
    });
    let peer = fake.accept_ready().await;
    join(probe).await.expect("probe");
    drop(peer);
    // Give the reader a moment to see the EOF.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let task = spawn_start(&client, "PLAIN", Some(b"\0a\0b"));
    let mut peer = fake.accept_ready().await;
    assert!(peer.line().await.starts_with("AUTH\t1\t"));
    peer.send("OK\t1\tuser=a\n").await;
    assert_eq!(join(task).await.unwrap().1, success("a"));
}

#[tokio::test]
async fn protocol_errors_fail_the_connection() {
    for (name, wire, expected) in [
        (
            "reply to an id never sent",
            "OK\t9\tuser=x\n",
            ProtocolError::UnknownId(9),
        ),
        ("unknown reply", "BYE\n", ProtocolError::UnknownReply),
        ("bad base64", "CONT\t1\t***\n", ProtocolError::Base64),
    ] {
        let fake = Fake::new();
        let client = fake.client(STEP);
        let task = spawn_start(&client, "PLAIN", Some(b"\0a\0b"));
        let mut peer = fake.accept_ready().await;
        peer.line().await;
        peer.send(wire).await;
        match join(task).await {
            Err(Error::Protocol(error)) => assert_eq!(error, expected, "{name}"),
            other => panic!("{name}: {other:?}"),
        }
        assert!(peer.closed_within(STEP).await, "{name}");
    }
    // A handshake from something else entirely.
    let fake = Fake::new();
    let client = fake.client(STEP);
    let task = tokio::spawn({
        let client = client.clone();
        async move { client.probe().await }
    });
    let mut peer = fake.accept().await;
    peer.send("220 smtp.example ESMTP\r\n").await;
    let error = join(task).await.expect_err("not Dovecot");
    assert!(
        matches!(error, Error::Protocol(ProtocolError::ExpectedVersion)),
        "{error:?}"
    );
}

#[tokio::test]
async fn mechanisms_not_offered_are_refused_without_touching_the_connection() {
    let fake = Fake::new();
    let client = fake.client(STEP);
    let probe = tokio::spawn({
        let client = client.clone();
        async move { client.probe().await }
    });
    let mut peer = fake.accept_ready().await;
    join(probe).await.expect("probe");
    for mechanism in ["APOP", "DIGEST-MD5", "SCRAM-SHA-256"] {
        let error = client
            .start(mechanism, None, &ClientInfo::default())
            .await
            .expect_err(mechanism);
        assert!(matches!(error, Error::MechanismNotOffered), "{error:?}");
        assert!(!error.is_source_down());
    }
    let huge = vec![b'x'; protocol::MAX_LINE];
    let error = client
        .start("PLAIN", Some(&huge), &ClientInfo::default())
        .await
        .expect_err("too long");
    assert!(matches!(error, Error::ResponseTooLong), "{error:?}");
    let task = spawn_start(&client, "CRAM-MD5", None);
    assert!(peer.line().await.starts_with("AUTH\t1\tCRAM-MD5\t"));
    peer.send("FAIL\t1\n").await;
    join(task).await.expect("answered");
}

#[tokio::test]
async fn cancelling_and_dropping_an_exchange_tell_dovecot() {
    let fake = Fake::new();
    let client = fake.client(STEP);
    let task = spawn_start(&client, "LOGIN", None);
    let mut peer = fake.accept_ready().await;
    peer.line().await;
    peer.send("CONT\t1\tVXNlcm5hbWU6\n").await;
    let (exchange, _) = join(task).await.expect("challenge");
    exchange.cancel().await;
    assert_eq!(peer.line().await, "CANCEL\t1");

    let task = spawn_start(&client, "LOGIN", None);
    peer.line().await;
    peer.send("CONT\t2\tVXNlcm5hbWU6\n").await;
    let (exchange, _) = join(task).await.expect("challenge");
    drop(exchange);
    assert_eq!(peer.line().await, "CANCEL\t2");

    // A finished exchange sends nothing when dropped; the connection carries on.
    let task = spawn_start(&client, "PLAIN", Some(b"\0a\0b"));
    assert!(peer.line().await.starts_with("AUTH\t3\t"));
    peer.send("OK\t3\tuser=a\n").await;
    let (exchange, _) = join(task).await.expect("ok");
    drop(exchange);
    let task = spawn_start(&client, "PLAIN", Some(b"\0a\0b"));
    assert!(peer.line().await.starts_with("AUTH\t4\t"));
    peer.send("FAIL\t4\tcode=temp_fail\n").await;
    let (_, step) = join(task).await.expect("fail");
    assert!(matches!(
        step,
        Step::Failure {
            temporary: true,
            ..
        }
    ));
}
