//! Issue 12, the abuse defences, against the real binary with postern's default limits:
//! no remote lockout of a user name, attempts counted before they are hashed,
//! failures that take the same time whatever the user, pre-AUTH budgets, bounded logs,
//! an empty users file refused, and the mechanisms EHLO offers.
//!
//! Client networks are told apart with PROXY headers from the trusted loopback
//! (`--proxy-protocol --proxy-protocol-from 127.0.0.1/32`), one address per attempt.

use crate::common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::postern::{PosternBuilder, USER};
use common::*;

/// Taken by the tests that measure time under a load they make themselves (the floods,
/// the failure medians): run together on a small machine, each would measure the other.
static TIMED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// postern with its default limits, `/metrics`, and PROXY headers believed from loopback.
fn behind_proxy(configure: impl FnOnce(PosternBuilder) -> PosternBuilder) -> (Postern, SocketAddr) {
    let backend = RawBackend::start();
    let builder = Postern::builder(backend.addr)
        .default_limits()
        .listen("--metrics-listen", V4)
        .flag("--proxy-protocol", "true")
        .flag("--proxy-protocol-from", "127.0.0.1/32");
    let postern = configure(builder).start();
    let admin = postern.addr("--metrics-listen");
    // The backend must outlive the test: leak it with the postern that uses it.
    std::mem::forget(backend);
    (postern, admin)
}

/// An implicit-TLS session from `client`, IPv4 or IPv6 (a PROXY v1 header), greeted and
/// past EHLO.
async fn from(postern: &Postern, client: &str) -> SmtpClient {
    let mut c = SmtpClient::connect(postern.smtps).await;
    let (family, to) = if client.contains(':') {
        ("TCP6", "::1")
    } else {
        ("TCP4", "127.0.0.1")
    };
    let header = format!(
        "PROXY {family} {client} {to} 40000 {}\r\n",
        postern.smtps.port()
    );
    c.send(header.as_bytes()).await;
    c.upgrade(postern.tls_config()).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    c
}

/// A users file whose costliest hash is sha512-crypt, so that a burst of verifications
/// finishes well within the verifier queue's timeout and every admitted attempt is
/// really hashed (none held back by --max-verifications-per-network); no failure delay.
fn cheap_hashes(builder: PosternBuilder) -> PosternBuilder {
    let sha512 = common::postern::FIXTURE_USERS[0];
    builder
        .flag("--max-verifications-per-network", "1000")
        .users_file(&[
            &format!("{USER}:{{PLAIN}}{PASSWORD}"),
            &format!("{}:{}", sha512.0, sha512.1),
        ])
        .flag("--auth-failure-delay", "0s")
}

// ---- 1. No remote lockout ---------------------------------------------------------------

/// Wrong passwords for alice from many networks: those networks are refused for alice
/// (even with the right password), a fresh network is slowed but gets in, with PLAIN and
/// CRAM-MD5, and a network that logged in before the attack is neither refused nor slowed.
#[tokio::test]
async fn failures_for_a_user_refuse_only_the_networks_that_failed() {
    let (postern, _) = behind_proxy(|b| {
        b.flag("--max-auth-failures-per-user", "3")
            .flag("--auth-failure-delay", "100ms")
    });
    let mut home = from(&postern, "192.0.2.1").await;
    home.auth_plain(USER, PASSWORD, "235").await;
    drop(home);

    for i in 1..=6 {
        let mut c = from(&postern, &format!("198.51.100.{i}")).await;
        c.auth_plain(USER, "wrong", "535 5.7.8").await;
    }
    for i in 1..=6 {
        let mut c = from(&postern, &format!("198.51.100.{i}")).await;
        c.auth_plain(USER, PASSWORD, "454 4.7.0").await;
    }

    let start = Instant::now();
    let mut home = from(&postern, "192.0.2.1").await;
    home.auth_plain(USER, PASSWORD, "235").await;
    let home_took = start.elapsed();
    assert!(
        home_took < Duration::from_millis(500),
        "home slowed: {home_took:?}"
    );

    // Six failures over a limit of three: the name now waits 100 ms × 2^3.
    let start = Instant::now();
    let mut fresh = from(&postern, "203.0.113.7").await;
    fresh.auth_plain(USER, PASSWORD, "235").await;
    let fresh_took = start.elapsed();
    assert!(
        fresh_took >= Duration::from_millis(700),
        "fresh network not slowed: {fresh_took:?}"
    );

    let mut cram = from(&postern, "203.0.113.8").await;
    let r = cram.cmd("AUTH CRAM-MD5", "334").await;
    cram.cmd(&cram_md5_response(USER, PASSWORD, &r.lines[0]), "235")
        .await;
    let log = postern.log();
    assert!(
        log.contains("scope=\"user\"") || log.contains("scope=user"),
        "{log}"
    );
}

/// A carrier's address shared by a user and a guesser: the guesser's failures use up
/// the address's failure window, and other names get 454 from it, but the user who
/// logged in from it within the window keeps logging in.
#[tokio::test]
async fn a_user_who_logged_in_keeps_logging_in_past_a_guesser_on_the_same_address() {
    let (postern, _) = behind_proxy(|b| {
        b.flag("--max-auth-failures-per-ip", "3")
            .flag("--auth-failure-delay", "0s")
    });
    let carrier = "198.51.100.7";
    let mut alice = from(&postern, carrier).await;
    alice.auth_plain(USER, PASSWORD, "235").await;
    drop(alice);
    for guess in ["root", "admin", "info"] {
        let mut c = from(&postern, carrier).await;
        c.auth_plain(guess, "guess", "535 5.7.8").await;
    }
    let mut other = from(&postern, carrier).await;
    other.auth_plain("sha512", PASSWORD, "454 4.7.0").await;
    let mut alice = from(&postern, carrier).await;
    alice.auth_plain(USER, PASSWORD, "235").await;
}

/// The trust a login earns counts the user's failures from that address, those before
/// the login included: a guesser sharing it gets --max-auth-failures-per-user tries at
/// the user's password in all, not that many again on the trust.
#[tokio::test]
async fn a_guesser_sharing_the_address_gets_no_more_tries_through_the_trust() {
    let (postern, _) = behind_proxy(|b| {
        b.flag("--max-auth-failures-per-user", "3")
            .flag("--auth-failure-delay", "0s")
    });
    let carrier = "198.51.100.7";
    for _ in 0..2 {
        let mut guesser = from(&postern, carrier).await;
        guesser.auth_plain(USER, "guess", "535 5.7.8").await;
    }
    let mut alice = from(&postern, carrier).await;
    alice.auth_plain(USER, PASSWORD, "235").await;
    drop(alice);
    let mut guesser = from(&postern, carrier).await;
    guesser.auth_plain(USER, "guess", "535 5.7.8").await;
    let mut guesser = from(&postern, carrier).await;
    guesser.auth_plain(USER, "guess", "454 4.7.0").await;
    // The user is refused there now too, not elsewhere.
    let mut elsewhere = from(&postern, "203.0.113.9").await;
    elsewhere.auth_plain(USER, PASSWORD, "235").await;
}

/// A switch of mechanism is forgiven for the very name typed only: the owner of
/// `jurgen`, whose name shares `jürgen`'s failure window, cannot wipe out guesses at
/// `jürgen`'s password by logging in as herself on the same connection.
#[tokio::test]
async fn logging_in_as_a_lookalike_name_forgives_no_guesses_at_another() {
    let (postern, _) = behind_proxy(|b| {
        b.users_file(&[
            &format!("jürgen:{{PLAIN}}{PASSWORD}"),
            "jurgen:{PLAIN}jurgens-own",
        ])
        .flag("--max-auth-failures-per-user", "3")
        .flag("--auth-failure-delay", "0s")
    });
    let mut c = from(&postern, "198.51.100.7").await;
    login_guess(&mut c, "jürgen", "535 5.7.8").await;
    login_guess(&mut c, "jürgen", "535 5.7.8").await;
    c.auth_plain("jurgen", "jurgens-own", "235").await;
    let mut c = from(&postern, "198.51.100.7").await;
    login_guess(&mut c, "jürgen", "535 5.7.8").await;
    login_guess(&mut c, "jürgen", "454 4.7.0").await;
}

/// A wrong password for `user` with AUTH LOGIN, answered with `expect`.
async fn login_guess(c: &mut SmtpClient, user: &str, expect: &str) {
    c.cmd("AUTH LOGIN", "334").await;
    c.cmd(&b64(user), "334").await;
    c.cmd(&b64("wrong"), expect).await;
}

// ---- 2. Count before you hash ---------------------------------------------------------

/// 50 parallel wrong passwords from one address, each for its own name: no more than
/// --max-auth-failures-per-ip (20) are ever hashed; the rest get 454 at once.
#[tokio::test]
async fn a_parallel_burst_from_one_network_verifies_no_more_than_the_limit() {
    let (postern, admin) =
        behind_proxy(|b| cheap_hashes(b).flag("--max-connections-per-ip", "200"));
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(from(&postern, "198.51.100.50").await);
    }
    let mut tasks = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            c.line(&format!(
                "AUTH PLAIN {}",
                plain_response(&format!("guess{i}"), "x")
            ))
            .await;
            c.read_reply().await.code
        }));
    }
    let mut codes = Vec::new();
    for task in tasks {
        codes.push(within("burst reply", task).await.expect("task"));
    }
    let failed = codes.iter().filter(|&&c| c == 535).count();
    let throttled = codes.iter().filter(|&&c| c == 454).count();
    assert_eq!(failed + throttled, 50, "{codes:?}");
    assert_eq!(failed, 20, "{codes:?}");
    let verified = metric_sum(admin, "postern_auth_attempts_total")
        .await
        .unwrap_or(0.0);
    assert_eq!(verified, 20.0);
}

/// The same burst for one name: no more than --max-auth-failures-per-user (10).
#[tokio::test]
async fn a_parallel_burst_for_one_name_verifies_no_more_than_the_user_limit() {
    let (postern, admin) =
        behind_proxy(|b| cheap_hashes(b).flag("--max-connections-per-ip", "200"));
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(from(&postern, "198.51.100.60").await);
    }
    let mut tasks = Vec::new();
    for mut c in clients {
        tasks.push(tokio::spawn(async move {
            c.line(&format!("AUTH PLAIN {}", plain_response("sha512", "x")))
                .await;
            c.read_reply().await.code
        }));
    }
    let mut failed = 0;
    for task in tasks {
        if within("burst reply", task).await.expect("task") == 535 {
            failed += 1;
        }
    }
    assert_eq!(failed, 10);
    let verified = metric_sum(admin, "postern_auth_attempts_total")
        .await
        .unwrap_or(0.0);
    assert_eq!(verified, 10.0);
}

// ---- 6. Users file ----------------------------------------------------------------------

/// A users file with comments only: `serve` and `check` refuse it and say why.
#[test]
fn a_users_file_without_users_is_refused_at_start_up_and_by_check() {
    for (what, out) in [
        (
            "serve",
            Postern::builder(free_addr())
                .users_file(&["# nobody yet", ""])
                .run_to_exit(),
        ),
        (
            "check",
            Postern::builder(free_addr())
                .users_file(&["# nobody yet", ""])
                .check(),
        ),
    ] {
        assert_eq!(out.status.code(), Some(1), "{what}: {out}");
        assert!(
            out.stderr
                .contains("no users: the file must name at least one user"),
            "{what}: {out}"
        );
    }
}

/// Emptied on disk, the users file is refused: the old users keep working, the error is
/// counted and logged.
#[tokio::test]
async fn a_users_file_emptied_on_disk_is_refused_and_the_old_users_stay() {
    let (postern, admin) = behind_proxy(|b| b);
    // A served session means the file watcher (started before the accept loops) has
    // taken the file's first fingerprint.
    let mut c = from(&postern, "192.0.2.9").await;
    c.auth_plain(USER, PASSWORD, "235").await;
    std::fs::write(postern.users_path(), "# emptied by mistake\n").expect("write users");
    postern.signal("HUP");
    let deadline = Instant::now() + STEP;
    loop {
        let (_, body) = http_get(admin, "/metrics").await;
        let errors = body
            .lines()
            .find_map(|l| l.strip_prefix("postern_reloads_total{result=\"error\"} "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if errors >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reload error counted:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = postern.log();
    assert!(
        log.contains("users file reload refused") && log.contains("no users"),
        "{log}"
    );
    let mut c = from(&postern, "192.0.2.9").await;
    c.auth_plain(USER, PASSWORD, "235").await;
}

// ---- 3. Constant-time failures ----------------------------------------------------------

/// A wrong password for an unknown name, a `{PLAIN}` user, sha512-crypt at its default and
/// at `rounds=10000`, and argon2id (the costliest): medians over 30 tries each, taken in
/// turn, differ by less than 5 ms.
#[tokio::test]
async fn failures_take_the_same_time_whatever_the_user() {
    let _alone = TIMED.lock().await;
    let backend = RawBackend::start();
    let sha512 = common::postern::FIXTURE_USERS[0];
    // argon2id at 4 MiB (the fixture's argon2 CLI hash) rather than 64 MiB keeps the test
    // short; it is still the costliest hash here, and so the decoy.
    let postern = Postern::builder(backend.addr)
        .users_file(&[
            &format!("{USER}:{{PLAIN}}{PASSWORD}"),
            &format!("{}:{}", sha512.0, sha512.1),
            "rounds:{SHA512-CRYPT}$6$rounds=10000$abc$3DDOWZMNRRKDT142bUtYQRY52ycK/xshRXOQgIyt2QRXzLDnoPq6v4lO9bA3f/JhGz1mHrAh.QUDGHmaE5RxP.",
            "argon2:{ARGON2ID}$argon2id$v=19$m=4096,t=3,p=1$c29tZXNhbHQ$JSTtCfuzyWAVVZF1mjNyip+A7CCi5xkKhBoPdXSPbqs",
        ])
        .flag("--auth-failure-delay", "0s")
        .start();
    let users = ["nobody-such", USER, "sha512", "rounds", "argon2"];
    let (mut c, _) = postern.implicit().await;
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); users.len()];
    for round in 0..32 {
        for (i, user) in users.iter().enumerate() {
            let start = Instant::now();
            c.auth_plain(user, "wrong", "535 5.7.8").await;
            // Two rounds to settle the pacing before measuring.
            if round >= 2 {
                times[i].push(start.elapsed());
            }
        }
    }
    let medians: Vec<Duration> = times
        .iter_mut()
        .map(|t| {
            t.sort();
            t[t.len() / 2]
        })
        .collect();
    let (min, max) = (
        medians.iter().min().copied().unwrap_or_default(),
        medians.iter().max().copied().unwrap_or_default(),
    );
    let report: Vec<String> = users
        .iter()
        .zip(&medians)
        .map(|(u, m)| format!("{u}: {m:?}"))
        .collect();
    eprintln!("failure medians: {}", report.join(", "));
    assert!(
        max - min < Duration::from_millis(5),
        "medians differ by {:?}: {}",
        max - min,
        report.join(", ")
    );
}

// ---- 4. Pre-AUTH budgets --------------------------------------------------------------

/// Sum of `postern_connections_rejected_total{reason="<reason>"}`.
async fn rejected(admin: SocketAddr, reason: &str) -> f64 {
    let (_, body) = http_get(admin, "/metrics").await;
    let prefix = format!("postern_connections_rejected_total{{reason=\"{reason}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A client that keeps talking but never logs in is closed at --auth-deadline, even
/// while every command is answered in time; so is an MX client that never sends MAIL.
#[tokio::test]
async fn the_auth_deadline_closes_a_session_that_never_logs_in() {
    let backend = RawBackend::start();
    let postern = Postern::builder(backend.addr)
        .default_limits()
        .listen("--metrics-listen", V4)
        .flag("--auth-deadline", "1500ms")
        .listen("--listen-mx", V4)
        .flag("--xclient", "true")
        .start();
    let (admin, mx) = (
        postern.addr("--metrics-listen"),
        postern.addr("--listen-mx"),
    );
    let start = Instant::now();
    let (mut c, _) = postern.implicit().await;
    loop {
        c.line("NOOP").await;
        let r = c.read_reply().await;
        if r.code == 421 {
            assert!(
                r.raw
                    .starts_with("421 4.7.0 Too long without authentication"),
                "{}",
                r.raw
            );
            break;
        }
        assert_eq!(r.code, 250, "{}", r.raw);
        assert!(start.elapsed() < Duration::from_secs(5), "no deadline");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        start.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        start.elapsed()
    );
    c.expect_closed().await;

    let mut m = SmtpClient::connect(mx).await;
    m.expect("220").await;
    m.cmd("EHLO peer.test", "250").await;
    m.expect("421 4.7.0").await;
    m.expect_closed().await;
    assert_eq!(rejected(admin, "auth_deadline").await, 2.0);
}

/// The 101st junk command before AUTH gets 421 4.7.0 and a close.
#[tokio::test]
async fn junk_commands_before_auth_are_limited() {
    let backend = RawBackend::start();
    let postern = Postern::builder(backend.addr)
        .default_limits()
        .listen("--metrics-listen", V4)
        .start();
    let admin = postern.addr("--metrics-listen");
    let (mut c, _) = postern.implicit().await; // its EHLO is the first
    // VRFY, HELP and unknown verbs are errors too (530, 500): a few, under --max-errors.
    for i in 1..100 {
        let line = match i {
            10 => "VRFY root",
            20 => "HELP",
            30 => "XYZZY",
            _ => ["NOOP", "RSET", "HELO c", "EHLO c"][i % 4],
        };
        c.cmd(line, "").await;
    }
    c.cmd("NOOP", "421 4.7.0 Too many commands without authentication")
        .await;
    c.expect_closed().await;
    assert_eq!(rejected(admin, "junk_commands").await, 1.0);
    // AUTH still works for a fresh connection from the same address.
    let (mut ok, _) = postern.implicit().await;
    ok.auth_plain(USER, PASSWORD, "235").await;
}

// ---- 5. Bounded logs --------------------------------------------------------------------

/// A 9000-octet user name (the longest whose PLAIN response fits the 12288-octet AUTH
/// line; a 12 KB one gets 500 5.5.6 and is never logged) is logged cut to 256 octets
/// with a marker; 30 throttled attempts from one network make one "authentication
/// throttled" line, not 30.
#[tokio::test]
async fn log_lines_stay_bounded() {
    let (postern, _) = behind_proxy(|b| {
        b.flag("--auth-failure-delay", "0s")
            .flag("--max-auth-failures", "1000")
            .flag("--max-auth-failures-per-ip", "1")
    });
    let long = "n".repeat(9000);
    let mut c = from(&postern, "198.51.100.77").await;
    for expected in std::iter::once("535").chain(std::iter::repeat_n("454 4.7.0", 30)) {
        c.cmd("AUTH PLAIN", "334").await;
        c.cmd(&plain_response(&long, "x"), expected).await;
    }
    let mut huge = from(&postern, "198.51.100.78").await;
    huge.cmd("AUTH PLAIN", "334").await;
    huge.cmd(&plain_response(&"n".repeat(12 * 1024), "x"), "500 5.5.6")
        .await;
    let log = postern.log();
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 1024, "a log line of {longest} octets");
    let marker = format!("{}…[+{} octets]", "n".repeat(256), 9000 - 256);
    assert!(log.contains(&marker), "{log}");
    let throttled: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("authentication throttled"))
        .collect();
    assert_eq!(throttled.len(), 1, "{throttled:#?}");
    assert!(
        throttled[0].contains("net=198.51.100.77"),
        "{}",
        throttled[0]
    );
}

// ---- 7. Mechanisms that can work ---------------------------------------------------------

/// By default CRAM-MD5 is offered only when every user is `{PLAIN}`, and start-up says
/// why; `--auth-mechanisms` chooses explicitly.
#[tokio::test]
async fn cram_md5_is_offered_only_when_every_user_can_pass_it() {
    let backend = RawBackend::start();
    let mixed = Postern::builder(backend.addr)
        .without_flag("--auth-mechanisms")
        .start();
    let (mut c, ehlo) = mixed.implicit().await;
    assert!(
        ehlo.raw.contains("250 AUTH PLAIN LOGIN\r\n"),
        "{}",
        ehlo.raw
    );
    c.cmd("AUTH CRAM-MD5", "504 5.5.4").await;
    assert!(
        mixed
            .log()
            .contains("CRAM-MD5 is not offered because users with a hashed password"),
        "{}",
        mixed.log()
    );

    let plain = Postern::builder(backend.addr)
        .without_flag("--auth-mechanisms")
        .users_file(&[&format!("{USER}:{{PLAIN}}{PASSWORD}")])
        .start();
    let (_, ehlo) = plain.implicit().await;
    assert!(
        ehlo.raw.contains("250 AUTH PLAIN LOGIN CRAM-MD5\r\n"),
        "{}",
        ehlo.raw
    );
    assert!(
        plain.log().contains("so CRAM-MD5 is offered"),
        "{}",
        plain.log()
    );

    let chosen = Postern::builder(backend.addr)
        .flag("--auth-mechanisms", "login,CRAM-MD5")
        .start();
    let (mut c, ehlo) = chosen.implicit().await;
    assert!(
        ehlo.raw.contains("250 AUTH LOGIN CRAM-MD5\r\n"),
        "{}",
        ehlo.raw
    );
    c.auth_plain(USER, PASSWORD, "504 5.5.4").await;

    let bad = Postern::builder(backend.addr)
        .flag("--auth-mechanisms", "PLAIN,GSSAPI")
        .run_to_exit();
    assert_eq!(bad.status.code(), Some(2), "{bad}");
    // SCRAM is known but only a source that runs it (Dovecot) can verify it.
    let unverifiable = Postern::builder(backend.addr)
        .flag("--auth-mechanisms", "PLAIN,SCRAM-SHA-256")
        .run_to_exit();
    assert_eq!(unverifiable.status.code(), Some(1), "{unverifiable}");
    assert!(
        unverifiable
            .stderr
            .contains("--auth-mechanisms SCRAM-SHA-256: the users file"),
        "{unverifiable}"
    );
    assert!(
        bad.stderr
            .contains("expected PLAIN, LOGIN, CRAM-MD5, SCRAM-SHA-1 or SCRAM-SHA-256"),
        "{bad}"
    );
}

/// smtplib tries CRAM-MD5 first; a hashed user fails it and logs in with PLAIN. Those
/// CRAM-MD5 failures do not count against the user: after three such logins (the
/// per-user limit is 2) a wrong then a right password from another network still get
/// 535 and 235, where counted failures would have refused that network with 454.
#[tokio::test]
async fn smtplib_falling_back_from_cram_md5_is_not_counted_as_failures() {
    use common::tools::{Listener, smtplib};
    let backend = RawBackend::start();
    let postern = Postern::builder(backend.addr)
        .default_limits()
        .flag("--auth-failure-delay", "0s")
        .flag("--max-auth-failures-per-user", "2")
        .start();
    for _ in 0..3 {
        let out = smtplib(
            &postern,
            Listener::Implicit,
            "sha512",
            PASSWORD,
            "auto",
            b"Subject: fallback\r\n\r\nx\r\n",
        );
        out.assert_success("smtplib falling back from CRAM-MD5");
    }
    assert_eq!(
        postern
            .log()
            .matches("authentication failed user=sha512 mechanism=\"cram-md5\"")
            .count(),
        3,
        "{}",
        postern.log()
    );
    // Another network: 127.0.0.2 (all of 127/8 is loopback).
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.2:0".parse().expect("addr"))
        .expect("bind 127.0.0.2");
    let tcp = within("connect", socket.connect(postern.smtps))
        .await
        .expect("connect");
    let mut c = SmtpClient::from_tcp(tcp);
    c.upgrade(postern.tls_config()).await;
    c.expect("220").await;
    c.cmd("EHLO other.test", "250").await;
    c.auth_plain("sha512", "wrong", "535 5.7.8").await;
    c.auth_plain("sha512", PASSWORD, "235").await;
}

// ---- 8. IPv6 aggregation (issue 12, point 6) --------------------------------------------

/// A plain session from IPv6 `client` (a PROXY v1 header sent by `::1`), answered with
/// `expect`.
async fn from_v6(postern: &Postern, client: &str, expect: &str) -> SmtpClient {
    let mut c = SmtpClient::connect(postern.smtp).await;
    let header = format!("PROXY TCP6 {client} ::1 40000 {}\r\n", postern.smtp.port());
    c.send(header.as_bytes()).await;
    c.expect(expect).await;
    c
}

/// Each /64 has its own per-IP cap, and the /48 around them a second, larger one: a
/// client cannot get past the per-IP limit by walking through the /64s of its site.
#[tokio::test]
async fn ipv6_connections_are_capped_per_64_and_per_48() {
    let backend = RawBackend::start();
    let postern = Postern::builder(backend.addr)
        .default_limits()
        .on_ipv6_loopback()
        .listen("--metrics-listen", V4)
        .flag("--proxy-protocol", "true")
        .flag("--proxy-protocol-from", "::1/128")
        .flag("--max-connections-per-ip", "2")
        .flag("--max-connections-per-wide-prefix", "3")
        .start();
    let admin = postern.addr("--metrics-listen");
    // Two addresses of one /64 fill its cap; a third address in it is refused.
    let _a1 = from_v6(&postern, "2001:db8:1:1::1", "220").await;
    let _a2 = from_v6(&postern, "2001:db8:1:1::2", "220").await;
    from_v6(&postern, "2001:db8:1:1::3", "421 4.7.0").await;
    // A second /64 of the same /48 brings it to its cap of 3...
    let _b = from_v6(&postern, "2001:db8:1:2::1", "220").await;
    // ...so a fresh /64 in it is refused, while another /48 is not.
    from_v6(&postern, "2001:db8:1:3::1", "421 4.7.0").await;
    let _c = from_v6(&postern, "2001:db8:2:1::1", "220").await;
    assert_eq!(rejected(admin, "max_connections_per_ip").await, 1.0);
    assert_eq!(
        rejected(admin, "max_connections_per_wide_prefix").await,
        1.0
    );
}

/// Wrong passwords for a name from two /64s of one /48 put it over its limit: every /64
/// of that site is refused for it, even with the right password, so one customer cannot
/// walk its 65,536 /64s for one more guess each. Another site still logs in.
#[tokio::test]
async fn failures_for_a_user_refuse_every_64_of_the_failing_site() {
    let (postern, _) = behind_proxy(|b| {
        b.flag("--max-auth-failures-per-user", "2")
            .flag("--auth-failure-delay", "0s")
    });
    for failing in ["2001:db8:a:1::1", "2001:db8:a:2::1"] {
        let mut c = from(&postern, failing).await;
        c.auth_plain(USER, "wrong", "535 5.7.8").await;
    }
    for fresh in ["2001:db8:a:3::1", "2001:db8:a:ffff::9"] {
        let mut c = from(&postern, fresh).await;
        c.auth_plain(USER, PASSWORD, "454 4.7.0").await;
    }
    let mut other_site = from(&postern, "2001:db8:b::1").await;
    other_site.auth_plain(USER, PASSWORD, "235").await;
}

/// Guesses for many names from the /64s of one /48 meet the site's own failure limit
/// (--max-auth-failures-per-wide-prefix), past which every AUTH from the site gets 454.
#[tokio::test]
async fn failures_from_many_64s_meet_the_site_limit() {
    let (postern, admin) = behind_proxy(|b| {
        b.flag("--max-auth-failures-per-ip", "1")
            .flag("--max-auth-failures-per-wide-prefix", "2")
            .flag("--auth-failure-delay", "0s")
    });
    for (failing, name) in [("2001:db8:a:1::1", "alice"), ("2001:db8:a:2::1", "bob")] {
        let mut c = from(&postern, failing).await;
        c.auth_plain(name, "guess", "535 5.7.8").await;
    }
    let mut c = from(&postern, "2001:db8:a:3::1").await;
    c.auth_plain(USER, PASSWORD, "454 4.7.0").await;
    let mut other_site = from(&postern, "2001:db8:b::1").await;
    other_site.auth_plain(USER, PASSWORD, "235").await;
    // A user who logged in from a /64 of the site before it filled is not refused there.
    let (postern, _) = behind_proxy(|b| {
        b.flag("--max-auth-failures-per-ip", "1")
            .flag("--max-auth-failures-per-wide-prefix", "2")
            .flag("--auth-failure-delay", "0s")
    });
    let home = "2001:db8:a:100::1";
    let mut c = from(&postern, home).await;
    c.auth_plain(USER, PASSWORD, "235").await;
    for (failing, name) in [("2001:db8:a:1::1", "alice"), ("2001:db8:a:2::1", "bob")] {
        let mut c = from(&postern, failing).await;
        c.auth_plain(name, "guess", "535 5.7.8").await;
    }
    let mut c = from(&postern, home).await;
    c.auth_plain("sha512", PASSWORD, "454 4.7.0").await;
    let mut c = from(&postern, home).await;
    c.auth_plain(USER, PASSWORD, "235").await;
    let throttled = metric_sum(admin, "postern_auth_throttled_total{scope=\"wide_prefix\"}").await;
    assert_eq!(throttled, Some(1.0));
}

// ---- 9. A fair share of hashing (issue 12, point 4) ---------------------------------------

/// One network floods AUTH over many connections against a costly argon2id hash; it
/// gets at most --max-verifications-per-network (2) verifications at once, the rest 454
/// without a check, so a user from another network still logs in within a second.
#[tokio::test]
async fn a_flood_from_one_network_leaves_the_verifiers_to_others() {
    let _alone = TIMED.lock().await;
    let (postern, admin) = behind_proxy(|b| {
        b.flag("--max-connections-per-ip", "200")
            .flag("--max-auth-failures-per-ip", "100000")
            .flag("--max-auth-failures-per-user", "100000")
            .flag("--max-auth-failures", "1000")
            .flag("--auth-failure-delay", "0s")
    });
    let mut flood = Vec::new();
    for _ in 0..40 {
        flood.push(from(&postern, "198.51.100.80").await);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for mut c in flood {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.line(&format!("AUTH PLAIN {}", plain_response("argon2", "wrong")))
                    .await;
                let code = c.read_reply().await.code;
                codes.push(code);
                if code == 454 {
                    // As a client would before trying again; without a pause the TLS
                    // round trips starve the verifiers on a small machine.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            codes
        }));
    }
    // Let the flood fill whatever it can.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut user = from(&postern, "203.0.113.9").await;
    let started = Instant::now();
    user.auth_plain(USER, PASSWORD, "235").await;
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut codes = Vec::new();
    for task in tasks {
        codes.extend(within("flood replies", task).await.expect("task"));
    }
    assert!(took < Duration::from_secs(1), "the user waited {took:?}");
    assert!(
        codes.contains(&454),
        "the flood was never held back: {codes:?}"
    );
    assert!(
        codes.contains(&535),
        "the flood was never verified: {codes:?}"
    );
    let throttled = metric_sum(
        admin,
        "postern_auth_throttled_total{scope=\"network_verifications\"}",
    )
    .await
    .unwrap_or(0.0);
    assert!(throttled > 0.0);
}

/// A flood from 40 networks, each at its --max-verifications-per-network (2), keeps every
/// verifier busy with an argon2id hash and the queue full. The verifier queue is served
/// by share, not in arrival order: a user from a network that was quiet until now waits
/// for the next free verifier, not behind the flood (in arrival order: 78 hashes, over
/// 2 s on two cores), and logs in within a second, three times over; the flooding
/// networks, the busiest, are the ones refused.
#[tokio::test]
async fn a_flood_from_many_networks_leaves_a_verifier_for_a_real_user() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let _alone = TIMED.lock().await;
    let (postern, admin) = behind_proxy(|b| {
        // argon2id at 32 MiB, of no known password (the flood only ever fails): half the
        // fixture's cost keeps a busy test machine's hashes well under the second.
        b.users_file(&[
            &format!("{USER}:{{PLAIN}}{PASSWORD}"),
            "flood:{ARGON2ID}$argon2id$v=19$m=32768,t=3,p=1$x8cApe1EfAGc4ozjzjYR0w$ahZZ0PtVJTaYwSnOF4ddxA0Mtn0ETmK8ya2o0VecKx4",
        ])
        .flag("--max-auth-failures-per-ip", "100000")
        .flag("--max-auth-failures-per-user", "100000")
        .flag("--max-auth-failures", "100000")
        .flag("--auth-failure-delay", "0s")
    });
    let mut flood = Vec::new();
    for net in 0..40 {
        for _ in 0..2 {
            flood.push(from(&postern, &format!("198.51.100.{}", 100 + net)).await);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for mut c in flood {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                c.line(&format!("AUTH PLAIN {}", plain_response("flood", "wrong")))
                    .await;
                let code = c.read_reply().await.code;
                codes.push(code);
                if code == 454 {
                    // As a client would before trying again; without a pause the TLS
                    // round trips starve the verifiers on a small machine.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            codes
        }));
    }
    // Long enough for every flooding network to have brought attempts before: a
    // network's very first attempt is indistinguishable from a user's.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut waits = Vec::new();
    for user_net in ["203.0.113.10", "203.0.113.11", "203.0.113.12"] {
        let mut user = from(&postern, user_net).await;
        let started = Instant::now();
        user.auth_plain(USER, PASSWORD, "235").await;
        waits.push(started.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    let mut codes = Vec::new();
    for task in tasks {
        codes.extend(within("flood replies", task).await.expect("task"));
    }
    let verified = codes.iter().filter(|&&c| c == 535).count();
    let refused = codes.iter().filter(|&&c| c == 454).count();
    eprintln!(
        "user waits {waits:?}; flood: {verified} verified, {refused} refused of {}",
        codes.len()
    );
    for took in &waits {
        assert!(*took < Duration::from_secs(1), "a user waited {waits:?}");
    }
    assert!(verified > 0, "the flood was never verified");
    let queue_refusals = metric_sum(
        admin,
        "postern_auth_throttled_total{scope=\"verifier_queue\"}",
    )
    .await
    .unwrap_or(0.0);
    assert!(queue_refusals > 0.0, "the flood was never refused by share");
}
