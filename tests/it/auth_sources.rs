//! The credential sources through the real `postern` binary, with real clients:
//!
//! - `--dovecot-auth`: a private Dovecot 2.3 (`tests/common/dovecot.rs`); swaks with
//!   PLAIN, LOGIN and CRAM-MD5, and a SCRAM-SHA-256 client written here (no packaged
//!   client speaks SCRAM over SMTP), a wrong password, Dovecot killed mid-run (454,
//!   `/readyz` 503) and back.
//! - `--auth-http`: an nginx-style auth server written here (one thread, the protocol
//!   as nginx documents it): OK, a refusal with `Auth-Wait`, routing to a second backend
//!   with `Auth-Server`/`Auth-Port`, a backend outside `--backend-allow`, a server
//!   slower than `--auth-source-timeout`, and the headers it receives.
//! - Exactly one source per process, and `postern check` per source.
//!
//! The LDAP source through postern is in `tests/it/ldap_auth.rs`, next to its slapd.

use crate::common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha2::Digest;

use common::dovecot::Dovecot;
use common::postern::log_field;
use common::tools::{Listener, swaks};
use common::*;

use crate::dovecot_auth::{hi, hmac_sha256, scram_attribute};

/// postern with `flags` as its source instead of the harness's users file.
fn postern_with_source(backend: SocketAddr, flags: &[(&str, String)]) -> Postern {
    let mut builder = Postern::builder(backend)
        .without_flag("--users")
        .without_flag("--auth-mechanisms")
        .listen("--metrics-listen", V4);
    for (name, value) in flags {
        builder = builder.flag(name, value.clone());
    }
    builder.start()
}

fn dovecot_flag(dovecot: &Dovecot) -> (&'static str, String) {
    (
        "--dovecot-auth",
        format!("unix:{}", dovecot.socket().display()),
    )
}

fn swaks_auth(postern: &Postern, mechanism: &str, user: &str, password: &str) -> String {
    let out = swaks(
        postern,
        Listener::Implicit,
        &[
            "--auth",
            mechanism,
            "--auth-user",
            user,
            "--auth-password",
            password,
        ],
    );
    format!("{}{}", out.stdout, out.stderr)
}

/// SCRAM-SHA-256 (RFC 5802, RFC 7677) through postern: returns the final reply, after
/// checking the server's signature (Dovecot's, passed through unchanged).
async fn scram_through(client: &mut SmtpClient, user: &str, password: &str) -> Reply {
    let nonce = "fyko+d2lbbFgONRv9qkxdawL";
    let first_bare = format!("n={user},r={nonce}");
    let reply = client
        .cmd(
            &format!("AUTH SCRAM-SHA-256 {}", b64(format!("n,,{first_bare}"))),
            "334",
        )
        .await;
    let server_first = String::from_utf8(unb64(&reply.lines[0])).expect("UTF-8");
    let combined = scram_attribute(&server_first, "r");
    assert!(combined.starts_with(nonce), "{server_first}");
    let salt = STANDARD
        .decode(scram_attribute(&server_first, "s"))
        .expect("salt");
    let iterations: u32 = scram_attribute(&server_first, "i").parse().expect("i");
    let salted = hi(password.as_bytes(), &salt, iterations);
    let client_key = hmac_sha256(&salted, b"Client Key");
    let stored_key = sha2::Sha256::digest(&client_key);
    let without_proof = format!("c=biws,r={combined}");
    let auth_message = format!("{first_bare},{server_first},{without_proof}");
    let signature = hmac_sha256(&stored_key, auth_message.as_bytes());
    let proof: Vec<u8> = client_key
        .iter()
        .zip(&signature)
        .map(|(k, s)| k ^ s)
        .collect();
    client
        .line(&b64(format!(
            "{without_proof},p={}",
            STANDARD.encode(proof)
        )))
        .await;
    let reply = client.read_reply().await;
    if reply.code != 334 {
        return reply;
    }
    let server_final = String::from_utf8(unb64(&reply.lines[0])).expect("UTF-8");
    let server_key = hmac_sha256(&salted, b"Server Key");
    let expected = hmac_sha256(&server_key, auth_message.as_bytes());
    assert_eq!(
        server_final,
        format!("v={}", STANDARD.encode(expected)),
        "the server proves it knows the password"
    );
    client.line("").await;
    client.read_reply().await
}

// === Dovecot ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_checks_every_mechanism_it_offers_through_postern() {
    let Some(dovecot) = Dovecot::start() else {
        return;
    };
    let backend = RawBackend::start();
    let postern = postern_with_source(backend.addr, &[dovecot_flag(&dovecot)]);

    // EHLO offers what Dovecot lists as usable over TLS, in its order.
    let (mut client, ehlo) =
        SmtpClient::connect_implicit(postern.addr("--listen-tls"), postern.tls_config()).await;
    assert!(
        ehlo.lines
            .iter()
            .any(|l| l == "AUTH PLAIN LOGIN CRAM-MD5 SCRAM-SHA-256"),
        "{}",
        ehlo.raw
    );
    // SCRAM-SHA-256 relayed step by step, Dovecot's signature checked by the client.
    let done = scram_through(&mut client, "alice", PASSWORD).await;
    assert_eq!(done.code, 235, "{}", done.raw);
    client.cmd("MAIL FROM:<alice@client.test>", "250").await;
    client.cmd("QUIT", "221").await;

    // swaks, a real client, with each mechanism it speaks; bob's password is a
    // SHA512-CRYPT hash only Dovecot checks.
    for (mechanism, user) in [
        ("PLAIN", "alice"),
        ("LOGIN", "alice"),
        ("CRAM-MD5", "carol"),
        ("PLAIN", "bob"),
    ] {
        let out = swaks_auth(&postern, mechanism, user, PASSWORD);
        assert!(out.contains("235 2.7.0"), "{mechanism} {user}:\n{out}");
    }
    let relayed: usize = backend.sessions().iter().map(|s| s.messages.len()).sum();
    assert_eq!(relayed, 4, "one message per swaks run");
    for (mechanism, user) in [
        ("PLAIN", "alice"),
        ("CRAM-MD5", "carol"),
        ("LOGIN", "nobody"),
    ] {
        let out = swaks_auth(&postern, mechanism, user, "wrong");
        assert!(out.contains("535 5.7.8"), "{mechanism} {user}:\n{out}");
    }
    // A wrong SCRAM proof is a 535 too.
    let (mut client, _) =
        SmtpClient::connect_implicit(postern.addr("--listen-tls"), postern.tls_config()).await;
    let refused = scram_through(&mut client, "alice", "wrong").await;
    assert_eq!(refused.code, 535, "{}", refused.raw);

    // Dovecot learnt who the client is and that it came over TLS, for the SMTP service.
    let log = dovecot.log();
    assert!(log.contains("service=smtp"), "{log}");
    assert!(log.contains("secured"), "{log}");
    assert!(log.contains("rip=127.0.0.1"), "{log}");
    // Counted per source and result.
    let (_, metrics) = http_get(postern.addr("--metrics-listen"), "/metrics").await;
    for needle in [
        r#"postern_auth_source_requests_total{source="dovecot",result="valid"}"#,
        r#"postern_auth_source_requests_total{source="dovecot",result="invalid"}"#,
        r#"postern_auth_source_up{source="dovecot"} 1"#,
        r#"postern_auth_source_duration_seconds_bucket{source="dovecot""#,
    ] {
        assert!(metrics.contains(needle), "{needle} missing:\n{metrics}");
    }
}

/// Dovecot checks one account for `alice`, `ALICE` and `Alice` (its default
/// `auth_username_format = %Lu`): the session goes on under the name Dovecot settled on,
/// so every spelling shares the account's sending budget and is logged as the account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_spellings_of_one_account_share_its_sending_budget() {
    let Some(dovecot) = Dovecot::start() else {
        return;
    };
    let backend = RawBackend::start();
    let mut postern = postern_with_source(
        backend.addr,
        &[
            dovecot_flag(&dovecot),
            ("--max-messages-per-user", "1/1h".into()),
            ("--log-format", "json".into()),
        ],
    );
    let listen = postern.addr("--listen-tls");
    let (mut first, _) = SmtpClient::connect_implicit(listen, postern.tls_config()).await;
    first.auth_plain("alice", PASSWORD, "235").await;
    first.send_one_and_quit("alice@client.test").await;
    for spelling in ["ALICE", "Alice"] {
        let (mut client, _) = SmtpClient::connect_implicit(listen, postern.tls_config()).await;
        client.auth_plain(spelling, PASSWORD, "235").await;
        client
            .cmd("MAIL FROM:<alice@client.test>", "451 4.7.1")
            .await;
        client.cmd("QUIT", "221").await;
        let closed = postern.wait_session_closed(client.local_addr());
        assert_eq!(log_field(&closed, "user"), "alice", "{closed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_gone_gives_454_and_unready_and_its_return_is_noticed() {
    let Some(mut dovecot) = Dovecot::start() else {
        return;
    };
    let backend = RawBackend::start();
    let postern = postern_with_source(
        backend.addr,
        &[
            dovecot_flag(&dovecot),
            ("--auth-source-timeout", "1s".into()),
        ],
    );
    let admin = postern.addr("--metrics-listen");
    wait_status(admin, "/readyz", 200).await;
    let (mut client, _) =
        SmtpClient::connect_implicit(postern.addr("--listen-tls"), postern.tls_config()).await;
    client.auth_plain("alice", PASSWORD, "235").await;

    dovecot.kill();
    for (line, mechanism) in [
        (
            format!("AUTH PLAIN {}", plain_response("alice", PASSWORD)),
            "PLAIN",
        ),
        ("AUTH CRAM-MD5".to_owned(), "CRAM-MD5"),
    ] {
        let (mut client, _) =
            SmtpClient::connect_implicit(postern.addr("--listen-tls"), postern.tls_config()).await;
        let started = Instant::now();
        let reply = client.cmd(&line, "454 4.7.0").await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{mechanism}: {:?} for {}",
            started.elapsed(),
            reply.raw
        );
    }
    let body = wait_status(admin, "/readyz", 503).await;
    assert!(body.contains("credential source"), "{body}");
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert!(
        metrics.contains(
            r#"postern_auth_source_requests_total{source="dovecot",result="unavailable"}"#
        ),
        "{metrics}"
    );

    dovecot.restart();
    wait_status(admin, "/readyz", 200).await;
    let (mut client, _) =
        SmtpClient::connect_implicit(postern.addr("--listen-tls"), postern.tls_config()).await;
    client.auth_plain("alice", PASSWORD, "235").await;
}

// === auth_http ===

/// What the test auth server answers for each user name; everyone else is refused.
#[derive(Clone)]
enum Behaviour {
    /// `Auth-Status: OK` when the password is [`PASSWORD`].
    Ok,
    /// OK, naming this backend.
    Route(SocketAddr),
    /// OK, naming the account (`Auth-User`).
    Account(&'static str),
    /// Answers after this long.
    Slow(Duration),
}

/// An nginx `auth_http` server: one thread, one request per connection, as nginx
/// sends them. Records each request's headers.
struct AuthServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<HashMap<String, String>>>>,
}

impl AuthServer {
    fn start(users: &[(&str, Behaviour)]) -> AuthServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind auth server");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let users: HashMap<String, Behaviour> = users
            .iter()
            .map(|(u, b)| (u.to_string(), b.clone()))
            .collect();
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let users = users.clone();
                let seen = seen.clone();
                std::thread::spawn(move || serve_one(stream, &users, &seen));
            }
        });
        AuthServer { addr, requests }
    }

    fn url(&self) -> String {
        format!("http://{}/auth", self.addr)
    }

    fn requests(&self) -> Vec<HashMap<String, String>> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve_one(
    stream: std::net::TcpStream,
    users: &HashMap<String, Behaviour>,
    seen: &Mutex<Vec<HashMap<String, String>>>,
) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut headers = HashMap::new();
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return;
    }
    headers.insert("request-line".to_owned(), first.trim_end().to_owned());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.trim_end().split_once(": ") {
            headers.insert(name.to_ascii_lowercase(), value.to_owned());
        }
    }
    seen.lock().unwrap().push(headers.clone());
    let user = headers.get("auth-user").cloned().unwrap_or_default();
    // nginx url-encodes the password; a space is %20.
    let pass = headers
        .get("auth-pass")
        .map(|p| p.replace("%20", " ").replace("%25", "%"))
        .unwrap_or_default();
    let good = pass == PASSWORD;
    let answer = match users.get(&user) {
        Some(Behaviour::Ok) if good => "Auth-Status: OK\r\n".to_owned(),
        Some(Behaviour::Route(to)) if good => format!(
            "Auth-Status: OK\r\nAuth-Server: {}\r\nAuth-Port: {}\r\n",
            to.ip(),
            to.port()
        ),
        Some(Behaviour::Account(name)) if good => {
            format!("Auth-Status: OK\r\nAuth-User: {name}\r\n")
        }
        Some(Behaviour::Slow(delay)) => {
            std::thread::sleep(*delay);
            "Auth-Status: OK\r\n".to_owned()
        }
        _ => "Auth-Status: Invalid login or password\r\nAuth-Wait: 2\r\n".to_owned(),
    };
    let mut stream = stream;
    let _ = stream
        .write_all(format!("HTTP/1.0 200 OK\r\n{answer}Content-Length: 0\r\n\r\n").as_bytes());
}

/// An auth server that names the account (`Auth-User`, which nginx gives the backend as
/// the login): the session goes on as that account, so the spellings it accepts share
/// the account's sending budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_http_auth_user_names_the_account_the_session_goes_on_as() {
    let backend = RawBackend::start();
    let server = AuthServer::start(&[
        ("Alice", Behaviour::Account("alice")),
        ("ALICE", Behaviour::Account("alice")),
    ]);
    let mut postern = postern_with_source(
        backend.addr,
        &[
            ("--auth-http", server.url()),
            ("--max-messages-per-user", "1/1h".into()),
            ("--log-format", "json".into()),
        ],
    );
    let listen = postern.addr("--listen-tls");
    let (mut first, _) = SmtpClient::connect_implicit(listen, postern.tls_config()).await;
    first.auth_plain("Alice", PASSWORD, "235").await;
    first.send_one_and_quit("alice@client.test").await;
    let closed = postern.wait_session_closed(first.local_addr());
    assert_eq!(log_field(&closed, "user"), "alice", "{closed}");
    let (mut second, _) = SmtpClient::connect_implicit(listen, postern.tls_config()).await;
    second.auth_plain("ALICE", PASSWORD, "235").await;
    second
        .cmd("MAIL FROM:<alice@client.test>", "451 4.7.1")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_http_answers_route_and_refuse_as_nginx_documents() {
    let home = RawBackend::start();
    let second = RawBackend::start();
    let server = AuthServer::start(&[
        ("alice", Behaviour::Ok),
        ("routed", Behaviour::Route(second.addr)),
        (
            "elsewhere",
            Behaviour::Route("127.0.0.9:25".parse().unwrap()),
        ),
        ("slow", Behaviour::Slow(Duration::from_secs(4))),
    ]);
    let postern = postern_with_source(
        home.addr,
        &[
            ("--auth-http", server.url()),
            ("--auth-source-timeout", "1s".into()),
            ("--backend-allow", format!("{}", second.addr.ip())),
        ],
    );
    let tls = postern.tls_config();
    let listen = postern.addr("--listen-tls");

    // OK: the session goes to the configured backend.
    let (mut client, ehlo) = SmtpClient::connect_implicit(listen, tls.clone()).await;
    assert!(
        ehlo.lines.iter().any(|l| l == "AUTH PLAIN LOGIN"),
        "{}",
        ehlo.raw
    );
    client.auth_plain("alice", PASSWORD, "235").await;
    client.cmd("MAIL FROM:<alice@home.test>", "250").await;
    client.cmd("QUIT", "221").await;
    home.session_containing(b"MAIL FROM:<alice@home.test>");

    // Auth-Server/Auth-Port in --backend-allow: that backend gets the session.
    let (mut client, _) = SmtpClient::connect_implicit(listen, tls.clone()).await;
    client.auth_plain("routed", PASSWORD, "235").await;
    client.cmd("MAIL FROM:<routed@second.test>", "250").await;
    client.cmd("QUIT", "221").await;
    second.session_containing(b"MAIL FROM:<routed@second.test>");
    assert!(
        !home.all_received().windows(6).any(|w| w == b"routed"),
        "the routed session reached the default backend"
    );

    // A backend outside --backend-allow: 454, and nothing is relayed anywhere.
    let (mut client, _) = SmtpClient::connect_implicit(listen, tls.clone()).await;
    client.auth_plain("elsewhere", PASSWORD, "454 4.7.0").await;

    // A refusal with Auth-Wait: 535, no sooner than the wait.
    let (mut client, _) = SmtpClient::connect_implicit(listen, tls.clone()).await;
    let started = Instant::now();
    client.auth_plain("alice", "wrong", "535 5.7.8").await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "Auth-Wait not honoured: {:?}",
        started.elapsed()
    );

    // A server slower than --auth-source-timeout: 454 at the timeout, not a hang.
    let (mut client, _) = SmtpClient::connect_implicit(listen, tls.clone()).await;
    let started = Instant::now();
    client.auth_plain("slow", PASSWORD, "454 4.7.0").await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    // The request headers, as nginx sends them for SMTP.
    let requests = server.requests();
    let alice = requests
        .iter()
        .find(|r| r.get("auth-user").map(String::as_str) == Some("alice"))
        .expect("a request for alice");
    for (name, value) in [
        ("auth-method", "plain"),
        ("auth-pass", PASSWORD),
        ("auth-protocol", "smtp"),
        ("auth-login-attempt", "1"),
        ("client-ip", "127.0.0.1"),
        ("auth-smtp-helo", "client.test"),
    ] {
        assert_eq!(
            alice.get(name).map(String::as_str),
            Some(value),
            "{name}: {alice:?}"
        );
    }
    assert!(
        alice["request-line"].starts_with("GET /auth HTTP/1.1"),
        "{alice:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_auth_http_server_is_454_and_unready() {
    let backend = RawBackend::start();
    let nowhere = free_addr();
    let postern = postern_with_source(
        backend.addr,
        &[
            ("--auth-http", format!("http://{nowhere}/auth")),
            ("--auth-source-timeout", "1s".into()),
        ],
    );
    let (mut client, _) =
        SmtpClient::connect_implicit(postern.addr("--listen-tls"), postern.tls_config()).await;
    client.auth_plain("alice", PASSWORD, "454 4.7.0").await;
    let body = wait_status(postern.addr("--metrics-listen"), "/readyz", 503).await;
    assert!(body.contains("credential source"), "{body}");
}

// === one source, and postern check ===

#[test]
fn two_sources_are_refused_at_start_up() {
    let out = Postern::builder("127.0.0.1:25")
        .flag("--auth-http", "http://127.0.0.1:1/auth")
        .run_to_exit();
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("--users and --auth-http given"),
        "{}",
        out.stderr
    );
}

#[test]
fn check_tries_the_dovecot_source() {
    let Some(dovecot) = Dovecot::start() else {
        return;
    };
    let backend = RawBackend::start();
    let (name, value) = dovecot_flag(&dovecot);
    let out = Postern::builder(backend.addr)
        .without_flag("--users")
        .without_flag("--auth-mechanisms")
        .flag(name, value)
        .check();
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("Dovecot auth at unix:")
            && out
                .stdout
                .contains("mechanisms usable over TLS: PLAIN LOGIN CRAM-MD5 SCRAM-SHA-256"),
        "{}",
        out.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_reuses_a_success_for_the_same_password_until_a_reload() {
    let backend = RawBackend::start();
    let server = AuthServer::start(&[("alice", Behaviour::Ok)]);
    let postern = postern_with_source(
        backend.addr,
        &[
            ("--auth-http", server.url()),
            ("--auth-cache-ttl", "10m".into()),
        ],
    );
    let asked = || {
        server
            .requests()
            .iter()
            .filter(|r| r.get("auth-user").map(String::as_str) == Some("alice"))
            .count()
    };
    let login = |password: &'static str, expected: &'static str| {
        let postern = &postern;
        async move {
            let (mut client, _) =
                SmtpClient::connect_implicit(postern.addr("--listen-tls"), postern.tls_config())
                    .await;
            client.auth_plain("alice", password, expected).await;
        }
    };
    login(PASSWORD, "235").await;
    login(PASSWORD, "235").await;
    assert_eq!(asked(), 1, "the second login came from the cache");
    // Another password is never answered from the cache.
    login("wrong", "535").await;
    assert_eq!(asked(), 2);
    // SIGHUP drops every entry: the source decides again.
    postern.signal("HUP");
    let deadline = Instant::now() + STEP;
    loop {
        login(PASSWORD, "235").await;
        if asked() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the cache survived SIGHUP");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// === attacks on the sources (review of issue 13) ===

/// postern in front of `dovecot` with `limits` instead of the harness's relaxed ones.
fn postern_with_dovecot_limits(
    backend: SocketAddr,
    dovecot: &Dovecot,
    limits: &[(&str, &str)],
) -> Postern {
    let mut flags = vec![dovecot_flag(dovecot)];
    flags.extend(limits.iter().map(|(n, v)| (*n, v.to_string())));
    postern_with_source(backend, &flags)
}

async fn connect(postern: &Postern) -> SmtpClient {
    SmtpClient::connect_implicit(postern.addr("--listen-tls"), postern.tls_config())
        .await
        .0
}

/// Attack: the per-user failure window is keyed by the name exactly as the client typed
/// it, but Dovecot (`auth_username_format = %Lu`, its default) and LDAP (`uid` is
/// caseIgnoreMatch, insignificant spaces) check the same account for `ALICE`, `Alice`,
/// ` alice`... A network that postern already refuses for `alice` keeps guessing her
/// password under another spelling, each with a fresh window: the per-user limit, the
/// defence against guessing spread over many networks, is void for these sources.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_window_cannot_be_dodged_by_spelling_the_name_differently() {
    let Some(dovecot) = Dovecot::start() else {
        return;
    };
    let backend = RawBackend::start();
    let postern = postern_with_dovecot_limits(
        backend.addr,
        &dovecot,
        &[("--max-auth-failures-per-user", "2")],
    );
    for _ in 0..2 {
        connect(&postern)
            .await
            .auth_plain("alice", "wrong", "535 5.7.8")
            .await;
    }
    // This network failed alice to her limit: refused for her, whatever the password.
    connect(&postern)
        .await
        .auth_plain("alice", PASSWORD, "454 4.7.0")
        .await;
    for spelling in ["ALICE", "Alice", " alice", "alice "] {
        let reply = connect(&postern)
            .await
            .auth_plain(spelling, PASSWORD, "")
            .await;
        assert!(
            reply.raw.starts_with("454 4.7.0"),
            "{spelling:?} reached Dovecot past alice's window: {}",
            reply.raw
        );
    }
}

/// Attack: a client makes Dovecot fail a request for a reason that says nothing about
/// Dovecot (here: LOGIN credentials too long for one Dovecot request line), and postern
/// counts the source as down: `/readyz` answers 503 and a load balancer takes this
/// replica (or, with every replica probed alike, all of them) out of service. One
/// unauthenticated connection every few seconds keeps it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_make_the_dovecot_source_look_down() {
    let Some(dovecot) = Dovecot::start() else {
        return;
    };
    let backend = RawBackend::start();
    let postern = postern_with_source(backend.addr, &[dovecot_flag(&dovecot)]);
    let admin = postern.addr("--metrics-listen");
    wait_status(admin, "/readyz", 200).await;
    let mut client = connect(&postern).await;
    client.cmd("AUTH LOGIN", "334").await;
    client.cmd(&b64("u".repeat(9000)), "334").await;
    let reply = client.cmd(&b64("p".repeat(9000)), "").await;
    assert!(!reply.raw.starts_with("235"), "{}", reply.raw);
    let (status, body) = http_get(admin, "/readyz").await;
    assert_eq!(
        status, 200,
        "one client's long LOGIN made postern unready: {body}"
    );
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert!(
        metrics.contains(r#"postern_auth_source_up{source="dovecot"} 1"#),
        "{metrics}"
    );
}

/// Attack: `relayed::claimed_name` reads the SCRAM client-first message only when the
/// whole message is UTF-8, and a message it cannot read goes to Dovecot unchecked: the
/// windows meet it only once Dovecot answers. Dovecot ignores SCRAM extensions after
/// the nonce, so `n=alice,r=...,x=<non-UTF-8>` is alice's attempt to Dovecot and
/// nobody's to postern. With a right proof Dovecot answers with its server signature
/// (`334 v=...`), which reaches the client before any window is met: a network that
/// postern refuses outright still learns whether each guess was right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scram_message_postern_cannot_read_never_reaches_dovecot() {
    let Some(dovecot) = Dovecot::start() else {
        return;
    };
    let backend = RawBackend::start();
    let postern = postern_with_dovecot_limits(
        backend.addr,
        &dovecot,
        &[("--max-auth-failures-per-ip", "1")],
    );
    connect(&postern)
        .await
        .auth_plain("alice", "wrong", "535 5.7.8")
        .await;
    // The network is over its limit: a readable SCRAM attempt is refused unchecked.
    let mut client = connect(&postern).await;
    let refused = client
        .cmd(
            &format!("AUTH SCRAM-SHA-256 {}", b64("n,,n=alice,r=abcdefgh")),
            "",
        )
        .await;
    assert!(refused.raw.starts_with("454 4.7.0"), "{}", refused.raw);
    for first_bare in [
        b"n=alice,r=fyko+d2lbbFgONRv9qkxdawL,x=\xff".to_vec(),
        b"n=alice,r=fyko+d2lbbFgONRv9qkxdawL\xff".to_vec(),
    ] {
        let mut client = connect(&postern).await;
        let reply = scram_bytes(&mut client, &first_bare, PASSWORD).await;
        assert!(
            reply.code != 334 && reply.code != 235,
            "{:?}: Dovecot checked the proof for a refused network: {}",
            String::from_utf8_lossy(&first_bare),
            reply.raw
        );
    }
}

/// SCRAM-SHA-256 with a client-first-message-bare given as bytes: the reply to the
/// client-final message (`334 v=...` when Dovecot accepted the proof).
async fn scram_bytes(client: &mut SmtpClient, first_bare: &[u8], password: &str) -> Reply {
    let first = [b"n,,".as_slice(), first_bare].concat();
    let reply = client
        .cmd(
            &format!("AUTH SCRAM-SHA-256 {}", STANDARD.encode(&first)),
            "",
        )
        .await;
    if reply.code != 334 {
        return reply;
    }
    let server_first = unb64(&reply.lines[0]);
    let text = String::from_utf8_lossy(&server_first).into_owned();
    let salt = STANDARD.decode(scram_attribute(&text, "s")).expect("salt");
    let iterations: u32 = scram_attribute(&text, "i").parse().expect("i");
    // The combined nonce, as bytes (it may carry the client's non-UTF-8 octet).
    let start = server_first
        .windows(2)
        .position(|w| w == b"r=")
        .expect("r=")
        + 2;
    let end = server_first[start..]
        .iter()
        .position(|&b| b == b',')
        .map_or(server_first.len(), |e| start + e);
    let combined = &server_first[start..end];
    let salted = hi(password.as_bytes(), &salt, iterations);
    let client_key = hmac_sha256(&salted, b"Client Key");
    let stored_key = sha2::Sha256::digest(&client_key);
    let without_proof = [b"c=biws,r=".as_slice(), combined].concat();
    let auth_message = [first_bare, b",", &server_first, b",", &without_proof].concat();
    let signature = hmac_sha256(&stored_key, &auth_message);
    let proof: Vec<u8> = client_key
        .iter()
        .zip(&signature)
        .map(|(k, s)| k ^ s)
        .collect();
    let last = [
        without_proof.as_slice(),
        b",p=",
        STANDARD.encode(proof).as_bytes(),
    ]
    .concat();
    client.line(&STANDARD.encode(last)).await;
    client.read_reply().await
}

/// Attack: a relayed exchange takes one of its network's verification slots
/// (`--max-verifications-per-network`) at `AUTH` and keeps it until the exchange ends,
/// across the client's round trips: a client that answers no challenge holds the slot
/// until its command timeout. A few idle `AUTH CRAM-MD5` connections refuse every
/// login from their network (a NAT, an office, an IPv6 /64), PLAIN included, without
/// one failure being counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_challenge_holds_no_verification_slot() {
    let Some(dovecot) = Dovecot::start() else {
        return;
    };
    let backend = RawBackend::start();
    let postern = postern_with_dovecot_limits(
        backend.addr,
        &dovecot,
        &[("--max-verifications-per-network", "1")],
    );
    let mut idle = connect(&postern).await;
    idle.cmd("AUTH CRAM-MD5", "334").await;
    // A neighbour on the same network logs in while the first client thinks.
    connect(&postern)
        .await
        .auth_plain("alice", PASSWORD, "235")
        .await;
    drop(idle);
}

/// Attack: CRAM-MD5 is server-first, and Dovecot ignores an initial response to it; but
/// postern read the user name from that initial response and met the windows under it.
/// `AUTH CRAM-MD5 <"decoy 00...">` is counted against `decoy`, and the real response
/// (`alice <digest>`) goes to Dovecot unchecked: alice's window, and a refusal of this
/// network for her, never apply. Each guess can name a fresh decoy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cram_md5_initial_response_cannot_stand_in_for_the_real_name() {
    let Some(dovecot) = Dovecot::start() else {
        return;
    };
    let backend = RawBackend::start();
    let postern = postern_with_dovecot_limits(
        backend.addr,
        &dovecot,
        &[("--max-auth-failures-per-user", "1")],
    );
    connect(&postern)
        .await
        .auth_plain("carol", "wrong", "535 5.7.8")
        .await;
    connect(&postern)
        .await
        .auth_plain("carol", PASSWORD, "454 4.7.0")
        .await;
    let mut client = connect(&postern).await;
    let decoy = b64(format!("decoy {}", "0".repeat(32)));
    let reply = client.cmd(&format!("AUTH CRAM-MD5 {decoy}"), "").await;
    if reply.code != 334 {
        // Refused outright: nothing reached Dovecot.
        return;
    }
    let challenge = unb64(&reply.lines[0]);
    let mut mac =
        <hmac::Hmac<md5::Md5> as hmac::KeyInit>::new_from_slice(PASSWORD.as_bytes()).unwrap();
    hmac::Mac::update(&mut mac, &challenge);
    let digest: String = hmac::Mac::finalize(mac)
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let done = client.cmd(&b64(format!("carol {digest}")), "").await;
    assert!(
        !done.raw.starts_with("235"),
        "carol's password was checked for a network refused for her: {}",
        done.raw
    );
}

/// Attack: a source that answers "try later" for one user (Dovecot's temporary failure
/// from a passdb for that user, an auth_http server's `Auth-Error-Code: 4xx` for a
/// rate-limited name) is counted as down: `/readyz` turns 503 until the next probe, for
/// everyone. Any client that knows such a name flips readiness at will, and one attempt
/// per probe interval keeps a load balancer draining the replica. The source answered:
/// it is up; only the probe and transport failures (no connection, no answer in time,
/// protocol errors) should say otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_temporary_failure_does_not_make_postern_unready() {
    let Some(dovecot) = Dovecot::start() else {
        return;
    };
    let backend = RawBackend::start();
    let postern = postern_with_source(backend.addr, &[dovecot_flag(&dovecot)]);
    let admin = postern.addr("--metrics-listen");
    wait_status(admin, "/readyz", 200).await;
    // `broken`'s passdb always fails temporarily; alice's works.
    connect(&postern)
        .await
        .auth_plain("broken", PASSWORD, "454 4.7.0")
        .await;
    let (status, body) = http_get(admin, "/readyz").await;
    assert_eq!(
        status, 200,
        "one user's temporary failure made postern unready: {body}"
    );
    connect(&postern)
        .await
        .auth_plain("alice", PASSWORD, "235")
        .await;
}

/// Attack: relayed SCRAM tells which names exist. Dovecot looks the user up at the
/// client-first message and fails at once for a name it does not know (or one without
/// SCRAM credentials), while a known name gets its salt and iteration count in a 334;
/// the client then cancels with `*`, which gives the attempt back to the windows. So a
/// client lists valid accounts, each probe of a real one costing nothing, where PLAIN
/// pads every failure so that response times tell no names apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_scram_does_not_tell_which_users_exist() {
    let Some(dovecot) = Dovecot::start() else {
        return;
    };
    let backend = RawBackend::start();
    let postern = postern_with_source(backend.addr, &[dovecot_flag(&dovecot)]);
    let mut codes = Vec::new();
    for user in ["alice", "nobody"] {
        let mut client = connect(&postern).await;
        let reply = client
            .cmd(
                &format!(
                    "AUTH SCRAM-SHA-256 {}",
                    b64(format!("n,,n={user},r=abcdefgh"))
                ),
                "",
            )
            .await;
        codes.push((user, reply.code));
    }
    assert_eq!(
        codes[0].1, codes[1].1,
        "the first reply tells an existing user from an unknown one: {codes:?}"
    );
}

/// Attack: postern never lets one user act as another (a PLAIN authzid other than the
/// user is refused, `sasl::plain`), but a relayed SCRAM client-first message carries
/// its authzid (`a=`) to Dovecot untouched. Where Dovecot has master users (common, for
/// IMAP administration), `n,a=alice,n=admin,...` with admin's password logs in as
/// alice, and the session goes to the backend as her (XCLIENT LOGIN=alice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scram_authzid_cannot_act_as_another_user() {
    let masters = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        masters.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let file = masters.path().join("masters");
    std::fs::write(&file, format!("admin:{{PLAIN}}{PASSWORD}\n")).expect("masters");
    let Some(dovecot) = Dovecot::start_with(common::dovecot::Settings {
        extra: format!(
            "passdb {{\n  driver = passwd-file\n  args = {}\n  master = yes\n}}\n",
            file.display()
        ),
        ..Default::default()
    }) else {
        return;
    };
    let backend = RawBackend::start();
    let postern = postern_with_source(backend.addr, &[dovecot_flag(&dovecot)]);
    let mut client = connect(&postern).await;
    let reply = scram_with_authzid(&mut client, "alice", "admin", PASSWORD).await;
    assert!(
        reply.code != 334 && reply.code != 235,
        "admin acted as alice through a relayed authzid: {}",
        reply.raw
    );
}

/// SCRAM-SHA-256 as `user` asking to act as `authzid`: the reply to the client-final
/// message.
async fn scram_with_authzid(
    client: &mut SmtpClient,
    authzid: &str,
    user: &str,
    password: &str,
) -> Reply {
    let nonce = "fyko+d2lbbFgONRv9qkxdawL";
    let first_bare = format!("n={user},r={nonce}");
    let reply = client
        .cmd(
            &format!(
                "AUTH SCRAM-SHA-256 {}",
                b64(format!("n,a={authzid},{first_bare}"))
            ),
            "",
        )
        .await;
    if reply.code != 334 {
        return reply;
    }
    let server_first = String::from_utf8(unb64(&reply.lines[0])).expect("UTF-8");
    let combined = scram_attribute(&server_first, "r");
    let salt = STANDARD
        .decode(scram_attribute(&server_first, "s"))
        .expect("salt");
    let iterations: u32 = scram_attribute(&server_first, "i").parse().expect("i");
    let salted = hi(password.as_bytes(), &salt, iterations);
    let client_key = hmac_sha256(&salted, b"Client Key");
    let stored_key = sha2::Sha256::digest(&client_key);
    // The channel binding repeats the GS2 header, authzid included.
    let without_proof = format!("c={},r={combined}", b64(format!("n,a={authzid},")));
    let auth_message = format!("{first_bare},{server_first},{without_proof}");
    let signature = hmac_sha256(&stored_key, auth_message.as_bytes());
    let proof: Vec<u8> = client_key
        .iter()
        .zip(&signature)
        .map(|(k, s)| k ^ s)
        .collect();
    client
        .cmd(
            &b64(format!("{without_proof},p={}", STANDARD.encode(proof))),
            "",
        )
        .await
}

/// Attack, continued: probing a real account by cancelling after its challenge is not
/// free (each costs a failure of that name from that network), and an unknown name's
/// made-up challenge ends, at the proof, in the 535 a wrong password gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_probes_cost_failures_and_a_made_up_challenge_ends_in_535() {
    let Some(dovecot) = Dovecot::start() else {
        return;
    };
    let backend = RawBackend::start();
    let postern = postern_with_source(
        backend.addr,
        &[
            dovecot_flag(&dovecot),
            ("--max-auth-failures-per-ip", "2".into()),
        ],
    );
    let first = |user: &str| {
        format!(
            "AUTH SCRAM-SHA-256 {}",
            b64(format!("n,,n={user},r=abcdefgh"))
        )
    };
    // An unknown name: a challenge like any other, then 535 at the proof.
    let mut client = connect(&postern).await;
    let challenge = client.cmd(&first("nobody"), "334").await;
    let server_first = String::from_utf8(unb64(&challenge.lines[0])).expect("UTF-8");
    assert!(server_first.starts_with("r=abcdefgh"), "{server_first}");
    client
        .cmd(&b64("c=biws,r=abcdefgh,p=AAAA"), "535 5.7.8")
        .await;
    // A real name, challenged, then cancelled: the second failure of this network.
    let mut client = connect(&postern).await;
    client.cmd(&first("alice"), "334").await;
    client.cmd("*", "501").await;
    // The network is now over its limit: refused unchecked, even with the password.
    let mut client = connect(&postern).await;
    client
        .cmd(
            &format!("AUTH PLAIN {}", plain_response("alice", PASSWORD)),
            "454 4.7.0",
        )
        .await;
}
