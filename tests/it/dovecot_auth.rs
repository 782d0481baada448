//! postern's Dovecot auth client (`postern::auth::dovecot`) against a real Dovecot 2.3
//! (Debian `dovecot-core`), started privately by each test with a generated
//! configuration: the auth service only, on a UNIX socket in a temporary directory and
//! on a loopback TCP port, with a passwd-file passdb (one `{PLAIN}`, one
//! `{SHA512-CRYPT}` and one `{CRAM-MD5}` user, one with `nologin`) and a checkpassword
//! passdb that always fails temporarily, for one user name.
//!
//! Covered: the handshake's mechanisms, PLAIN, LOGIN, CRAM-MD5 and SCRAM-SHA-256
//! relayed through Dovecot, wrong passwords and unknown users (failures, not
//! temporary), `nologin`, a passdb failing temporarily, what reaches Dovecot about the
//! client, many exchanges at once, and Dovecot killed, stopped and restarted mid-run.
//!
//! Without Dovecot (or root) each test skips loudly, unless `CI` is set: then it fails,
//! since `.ci/run` installs `dovecot-core`.

use crate::common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{KeyInit, Mac};
use sha2::Digest;

use common::dovecot::{Dovecot, MECHANISMS};
use common::{PASSWORD, STEP, within};
use postern::auth::dovecot::{
    Client, ClientInfo, Error, Exchange, Options, ProtocolError, Step, Target,
};

// === helpers ===

fn client(target: Target) -> Client {
    client_with(target, STEP)
}

fn client_with(target: Target, timeout: Duration) -> Client {
    Client::new(
        target,
        Options {
            timeout,
            // Dovecot's per-address penalty would slow every failure after the first.
            no_penalty: true,
        },
    )
}

fn plain(user: &str, password: &str) -> Vec<u8> {
    format!("\0{user}\0{password}").into_bytes()
}

fn success(user: &str) -> Step {
    Step::Success { user: user.into() }
}

fn failure(user: Option<&str>) -> Step {
    Step::Failure {
        temporary: false,
        reason: None,
        user: user.map(Into::into),
    }
}

async fn start(
    client: &Client,
    mechanism: &str,
    initial: Option<&[u8]>,
) -> Result<(Exchange, Step), Error> {
    within(
        &format!("AUTH {mechanism}"),
        client.start(mechanism, initial, &ClientInfo::default()),
    )
    .await
}

/// The step an exchange starting with `AUTH <mechanism> <initial>` ends on.
async fn one_shot(client: &Client, mechanism: &str, initial: &[u8]) -> Step {
    match start(client, mechanism, Some(initial)).await {
        Ok((_, step)) => step,
        Err(error) => panic!("AUTH {mechanism}: {error}"),
    }
}

async fn step(exchange: &mut Exchange, response: &[u8]) -> Step {
    match within("step", exchange.step(response)).await {
        Ok(step) => step,
        Err(error) => panic!("step: {error}"),
    }
}

fn challenge(step: Step) -> Vec<u8> {
    match step {
        Step::Challenge(challenge) => challenge,
        other => panic!("expected a challenge, got {other:?}"),
    }
}

/// LOGIN: user name and password, each after its prompt.
async fn login(client: &Client, user: &str, password: &str) -> Step {
    let (mut exchange, first) = start(client, "LOGIN", None).await.expect("AUTH LOGIN");
    assert_eq!(challenge(first), b"Username:");
    assert_eq!(
        challenge(step(&mut exchange, user.as_bytes()).await),
        b"Password:"
    );
    step(&mut exchange, password.as_bytes()).await
}

/// CRAM-MD5 (RFC 2195): `user SP hex(HMAC-MD5(password, challenge))`.
async fn cram_md5(client: &Client, user: &str, password: &str) -> Step {
    let (mut exchange, first) = start(client, "CRAM-MD5", None)
        .await
        .expect("AUTH CRAM-MD5");
    let nonce = challenge(first);
    assert!(
        nonce.starts_with(b"<") && nonce.ends_with(b">"),
        "{nonce:?}"
    );
    let mut mac = hmac::Hmac::<md5::Md5>::new_from_slice(password.as_bytes()).expect("any key");
    mac.update(&nonce);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    step(&mut exchange, format!("{user} {hex}").as_bytes()).await
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

pub(crate) fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(key).expect("any key");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// PBKDF2-HMAC-SHA-256 for one 32-byte block (RFC 8018 §5.2), SCRAM's `Hi()`.
pub(crate) fn hi(password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
    let mut u = hmac_sha256(password, &[salt, &1u32.to_be_bytes()].concat());
    let mut out = u.clone();
    for _ in 1..iterations {
        u = hmac_sha256(password, &u);
        out.iter_mut().zip(&u).for_each(|(o, b)| *o ^= b);
    }
    out
}

/// The value of attribute `name` in a SCRAM message (`r=...,s=...,i=...`).
pub(crate) fn scram_attribute<'a>(message: &'a str, name: &str) -> &'a str {
    message
        .split(',')
        .find_map(|part| part.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in {message:?}"))
}

/// SCRAM-SHA-256 (RFC 5802, RFC 7677) without channel binding, checking the server's
/// signature too. Over SMTP the server's final message is a challenge the client
/// answers with an empty line (RFC 4954 has no "additional data with success").
async fn scram_sha_256(client: &Client, user: &str, password: &str) -> Step {
    let client_nonce = "rOprNGfwEbeRWgbNEkqO";
    let first_bare = format!("n={user},r={client_nonce}");
    let (mut exchange, first) = start(
        client,
        "SCRAM-SHA-256",
        Some(format!("n,,{first_bare}").as_bytes()),
    )
    .await
    .expect("AUTH SCRAM-SHA-256");
    let server_first = String::from_utf8(challenge(first)).expect("UTF-8");
    let nonce = scram_attribute(&server_first, "r");
    assert!(nonce.starts_with(client_nonce), "{server_first}");
    let salt = STANDARD
        .decode(scram_attribute(&server_first, "s"))
        .expect("salt");
    let iterations: u32 = scram_attribute(&server_first, "i").parse().expect("i");
    let salted = hi(password.as_bytes(), &salt, iterations);
    let client_key = hmac_sha256(&salted, b"Client Key");
    let stored_key = sha2::Sha256::digest(&client_key);
    let without_proof = format!("c=biws,r={nonce}");
    let auth_message = format!("{first_bare},{server_first},{without_proof}");
    let signature = hmac_sha256(&stored_key, auth_message.as_bytes());
    let proof: Vec<u8> = client_key
        .iter()
        .zip(&signature)
        .map(|(k, s)| k ^ s)
        .collect();
    let client_final = format!("{without_proof},p={}", STANDARD.encode(proof));
    match step(&mut exchange, client_final.as_bytes()).await {
        Step::Challenge(server_final) => {
            let server_key = hmac_sha256(&salted, b"Server Key");
            let expected = hmac_sha256(&server_key, auth_message.as_bytes());
            assert_eq!(
                String::from_utf8_lossy(&server_final),
                format!("v={}", STANDARD.encode(expected)),
                "the server proves it knows the password"
            );
            step(&mut exchange, b"").await
        }
        done => done,
    }
}

fn usable(client: &Client) -> Vec<String> {
    client
        .handshake()
        .expect("a handshake")
        .usable_mechanisms()
        .map(|m| m.name().to_owned())
        .collect()
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_lists_the_mechanisms_over_unix_and_tcp() {
    let Some(dovecot) = Dovecot::start() else {
        return;
    };
    for target in [dovecot.unix(), dovecot.inet()] {
        let client = client(target.clone());
        let handshake = within("probe", client.probe())
            .await
            .unwrap_or_else(|e| panic!("{target}: {e}"));
        assert_eq!(handshake.minor_version, 2, "{target}");
        assert!(handshake.server_pid.is_some(), "{target}");
        assert_eq!(usable(&client), MECHANISMS, "{target}");
        let flags = |name: &str| {
            handshake
                .mechanisms
                .iter()
                .find(|m| m.name() == name)
                .map(|m| m.flags())
                .unwrap_or_else(|| panic!("{name} listed"))
        };
        assert!(flags("PLAIN").plaintext && flags("LOGIN").plaintext);
        assert!(flags("CRAM-MD5").dictionary && flags("CRAM-MD5").active);
        assert!(flags("SCRAM-SHA-256").mutual_auth);
        assert!(!flags("SCRAM-SHA-256").private);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_checks_every_password_scheme() {
    let Some(dovecot) = Dovecot::start() else {
        return;
    };
    for target in [dovecot.unix(), dovecot.inet()] {
        let client = client(target.clone());
        for user in ["alice", "bob", "carol"] {
            assert_eq!(
                one_shot(&client, "PLAIN", &plain(user, PASSWORD)).await,
                success(user),
                "{target} {user}"
            );
        }
        // Mechanism names match without case; Dovecot gets its own spelling.
        assert_eq!(
            one_shot(&client, "plain", &plain("alice", PASSWORD)).await,
            success("alice")
        );
        for (user, password) in [("alice", "wrong"), ("bob", "Secret"), ("carol", "")] {
            assert_eq!(
                one_shot(&client, "PLAIN", &plain(user, password)).await,
                failure(Some(user)),
                "{target} {user} with a wrong password"
            );
        }
        assert_eq!(
            one_shot(&client, "PLAIN", &plain("nobody", PASSWORD)).await,
            failure(Some("nobody")),
            "{target} unknown user"
        );
        // An empty initial response (SMTP `AUTH PLAIN =`) is an empty message.
        assert_eq!(one_shot(&client, "PLAIN", b"").await, failure(None));
        // Without one, PLAIN asks for the message with an empty challenge.
        let (mut exchange, first) = start(&client, "PLAIN", None).await.expect("AUTH PLAIN");
        assert_eq!(challenge(first), b"");
        assert_eq!(
            step(&mut exchange, &plain("bob", PASSWORD)).await,
            success("bob")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_takes_two_challenges() {
    let Some(dovecot) = Dovecot::start() else {
        return;
    };
    let client = client(dovecot.unix());
    assert_eq!(login(&client, "alice", PASSWORD).await, success("alice"));
    assert_eq!(login(&client, "bob", PASSWORD).await, success("bob"));
    assert_eq!(login(&client, "bob", "wrong").await, failure(Some("bob")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cram_md5_is_relayed_to_dovecot() {
    let Some(dovecot) = Dovecot::start() else {
        return;
    };
    let client = client(dovecot.inet());
    assert_eq!(cram_md5(&client, "alice", PASSWORD).await, success("alice"));
    assert_eq!(cram_md5(&client, "carol", PASSWORD).await, success("carol"));
    assert_eq!(
        cram_md5(&client, "carol", "wrong").await,
        failure(Some("carol"))
    );
    // A SHA512-CRYPT hash cannot answer a CRAM-MD5 challenge: a plain failure.
    assert_eq!(
        cram_md5(&client, "bob", PASSWORD).await,
        failure(Some("bob"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_256_is_relayed_to_dovecot() {
    let Some(dovecot) = Dovecot::start() else {
        return;
    };
    let client = client(dovecot.unix());
    assert_eq!(
        scram_sha_256(&client, "alice", PASSWORD).await,
        success("alice")
    );
    assert_eq!(
        scram_sha_256(&client, "alice", "wrong").await,
        failure(Some("alice"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nologin_and_a_temporary_passdb_failure() {
    let Some(dovecot) = Dovecot::start() else {
        return;
    };
    let client = client(dovecot.unix());
    // Right password, but the passdb says `nologin`: Dovecot answers OK, postern must not.
    assert_eq!(
        one_shot(&client, "PLAIN", &plain("dave", PASSWORD)).await,
        Step::Failure {
            temporary: false,
            reason: Some("Moved".into()),
            user: Some("dave".into())
        }
    );
    assert_eq!(
        one_shot(&client, "PLAIN", &plain("broken", PASSWORD)).await,
        Step::Failure {
            temporary: true,
            reason: None,
            user: Some("broken".into())
        }
    );
    assert!(dovecot.log().contains("exited with status 111"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_dovecot_learns_about_the_client() {
    let Some(dovecot) = Dovecot::start() else {
        return;
    };
    let client = client(dovecot.unix());
    let info = ClientInfo {
        remote: Some("[::ffff:192.0.2.55]:40000".parse().expect("addr")),
        local: Some("198.51.100.1:587".parse().expect("addr")),
        local_name: Some("mail.example".into()),
        session: Some("postern-test-1".into()),
    };
    let step = within(
        "AUTH PLAIN",
        client.start("PLAIN", Some(&plain("alice", "wrong")), &info),
    )
    .await
    .expect("AUTH PLAIN")
    .1;
    assert_eq!(step, failure(Some("alice")));
    let log = dovecot.log();
    let request = log
        .lines()
        .find(|l| l.contains("client in: AUTH"))
        .unwrap_or_else(|| panic!("no request logged:\n{log}"));
    for field in [
        "\tPLAIN\t",
        "\tservice=smtp",
        "\tsecured=tls",
        "\tno-penalty",
        "\tsession=postern-test-1",
        "\tlip=198.51.100.1",
        "\trip=192.0.2.55",
        "\tlport=587",
        "\trport=40000",
        "\tlocal_name=mail.example",
        "\tresp=<hidden>",
    ] {
        assert!(
            request.contains(field),
            "{field:?} missing from {request:?}"
        );
    }
    // Dovecot's own account of the failure names the client's address and session.
    assert!(
        log.contains("passwd-file(alice,192.0.2.55,<postern-test-1>): Password mismatch"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_exchanges_at_once_each_get_their_own_answer() {
    let Some(dovecot) = Dovecot::start() else {
        return;
    };
    let client = client(dovecot.unix());
    let mut tasks = Vec::new();
    for i in 0..30 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let (user, right) = [("alice", true), ("bob", false), ("carol", true)][i % 3];
            let password = if right { PASSWORD } else { "wrong" };
            let step = match i % 2 {
                0 => login(&client, user, password).await,
                _ => one_shot(&client, "PLAIN", &plain(user, password)).await,
            };
            let expected = if right {
                success(user)
            } else {
                failure(Some(user))
            };
            assert_eq!(step, expected, "exchange {i}");
        }));
    }
    for task in tasks {
        within("exchange", task).await.expect("no panic");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_failure_delay_fits_the_default_timeout() {
    let Some(dovecot) = Dovecot::start_with_failure_delay("2 secs") else {
        return;
    };
    let client = Client::new(dovecot.unix(), Options::default());
    let started = Instant::now();
    assert_eq!(
        one_shot(&client, "PLAIN", &plain("alice", "wrong")).await,
        failure(Some("alice"))
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "failure came after {took:?}"
    );
    assert!(
        took < Options::default().timeout,
        "failure came after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_dovecot_is_down_at_once_and_a_restarted_one_works_again() {
    let Some(mut dovecot) = Dovecot::start() else {
        return;
    };
    let timeout = Duration::from_secs(5);
    let clients = [
        client_with(dovecot.unix(), timeout),
        client_with(dovecot.inet(), timeout),
    ];
    // Each mid-exchange (after LOGIN's first challenge) when Dovecot dies.
    let mut exchanges = Vec::new();
    for client in &clients {
        let (exchange, first) = start(client, "LOGIN", None).await.expect("AUTH LOGIN");
        assert_eq!(challenge(first), b"Username:");
        exchanges.push(exchange);
    }
    dovecot.kill();
    for (client, mut exchange) in clients.iter().zip(exchanges) {
        let target = client.target();
        let started = Instant::now();
        let error = within("step", exchange.step(b"alice"))
            .await
            .expect_err("Dovecot is gone");
        assert!(
            matches!(error, Error::Unavailable(_)),
            "{target}: {error:?}"
        );
        assert!(error.is_source_down(), "{target}");
        // Nothing listens: new requests fail as fast, without waiting for the timeout.
        let error = start(client, "PLAIN", Some(&plain("alice", PASSWORD)))
            .await
            .expect_err("Dovecot is gone");
        assert!(
            matches!(error, Error::Unavailable(_)),
            "{target}: {error:?}"
        );
        let error = within("probe", client.probe()).await.expect_err("gone");
        assert!(error.is_source_down(), "{target}: {error:?}");
        assert!(
            started.elapsed() < timeout,
            "{target}: {:?}",
            started.elapsed()
        );
        // The mechanisms are still known, for EHLO.
        assert_eq!(usable(client), MECHANISMS, "{target}");
    }
    dovecot.restart();
    for client in &clients {
        assert_eq!(
            one_shot(client, "PLAIN", &plain("alice", PASSWORD)).await,
            success("alice"),
            "{} after the restart",
            client.target()
        );
        assert_eq!(login(client, "bob", PASSWORD).await, success("bob"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_dovecot_times_out_and_recovers_when_it_continues() {
    let Some(dovecot) = Dovecot::start() else {
        return;
    };
    let timeout = Duration::from_secs(1);
    let client = client_with(dovecot.unix(), timeout);
    assert_eq!(
        one_shot(&client, "PLAIN", &plain("alice", PASSWORD)).await,
        success("alice")
    );
    dovecot.signal("STOP");
    // On the open connection: the reply never comes.
    let started = Instant::now();
    let error = start(&client, "PLAIN", Some(&plain("alice", PASSWORD)))
        .await
        .expect_err("Dovecot is stopped");
    assert!(matches!(error, Error::Timeout), "{error:?}");
    assert!(error.is_source_down());
    let took = started.elapsed();
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(2),
        "{took:?}"
    );
    // On a new connection: the kernel accepts it, the handshake never comes.
    let started = Instant::now();
    let error = within("probe", client.probe()).await.expect_err("stopped");
    assert!(matches!(error, Error::Timeout), "{error:?}");
    assert!(started.elapsed() < timeout + Duration::from_secs(2));
    dovecot.signal("CONT");
    assert_eq!(
        one_shot(&client, "PLAIN", &plain("alice", PASSWORD)).await,
        success("alice")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn something_that_is_not_dovecot_is_a_protocol_error() {
    // A --dovecot-auth pointing at the wrong port: something that greets like an MTA.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        use std::io::Write;
        let (mut stream, _) = listener.accept().expect("accept");
        let _ = stream.write_all(b"220 mx.example ESMTP\r\n");
        std::thread::sleep(Duration::from_secs(1));
    });
    let client = client(format!("inet:{addr}").parse().expect("target"));
    let error = within("probe", client.probe())
        .await
        .expect_err("not Dovecot");
    assert!(
        matches!(error, Error::Protocol(ProtocolError::ExpectedVersion)),
        "{error:?}"
    );
    assert!(error.is_source_down());
    server.join().expect("server thread");
}
