//! `postern relay-out` end to end: legacy senders (swaks without TLS, Python smtplib,
//! a raw pipelining/BDAT client) → postern → a real Postfix submission service that
//! requires STARTTLS and AUTH through a real Dovecot (passwd-file for PLAIN/LOGIN, the
//! `oauth2` passdb introspecting tokens for XOAUTH2/OAUTHBEARER). Postfix's log says
//! which SASL user sent each message; `postcat` shows what arrived.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::common::submission::{self, Submission};
use crate::common::token_server::{MAILBOX, TokenServer};
use crate::common::tools::SmtplibSession;
use crate::common::{
    PASSWORD, STEP, SmtpClient, TestCerts, accepts, free_port, http_get, metric_sum, run,
    wait_until, within,
};

/// postern relay-out as a child process, killed on drop (its log printed if the test
/// failed).
struct RelayOut {
    child: Child,
    dir: TempDir,
    smtp: SocketAddr,
    admin: SocketAddr,
}

impl RelayOut {
    /// Starts it in front of `upstream` with the flags every test uses plus `extra`;
    /// on fresh ports again when another process took one first.
    fn start(upstream: &Submission, extra: &[&str]) -> RelayOut {
        for _attempt in 0..3 {
            if let Some(relay) = Self::try_start(upstream, extra) {
                return relay;
            }
        }
        panic!("postern relay-out lost the race for free ports three times");
    }

    fn try_start(upstream: &Submission, extra: &[&str]) -> Option<RelayOut> {
        let dir = tempfile::tempdir().expect("tempdir");
        let smtp = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = std::fs::File::create(dir.path().join("postern.log")).expect("log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern"));
        cmd.arg("relay-out")
            .args(["--listen", &smtp.to_string()])
            .args(["--metrics-listen", &admin.to_string()])
            .args(["--hostname", "relay.test"])
            .args(["--probe-interval", "1s"])
            .args(["--upstream-timeout", "10s"])
            .args(["--oauth2-timeout", "5s"])
            .args(extra);
        if !extra.contains(&"--upstream") {
            cmd.args(["--upstream", &format!("localhost:{}", upstream.port)]);
            cmd.args(["--upstream-tls", "starttls"]);
        }
        if !extra.contains(&"--allow-from") {
            cmd.args(["--allow-from", "127.0.0.0/8"]);
        }
        if !extra.contains(&"--upstream-ca") {
            cmd.arg("--upstream-ca").arg(upstream.ca_path());
        }
        // Environment of the test process must not configure postern.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("POSTERN_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn postern relay-out");
        let mut relay = RelayOut {
            child,
            dir,
            smtp,
            admin,
        };
        let up = wait_until(STEP, "postern relay-out to accept", || {
            if let Ok(Some(status)) = relay.child.try_wait() {
                let log = relay.log();
                if log.contains("Address already in use") {
                    return Some(false);
                }
                panic!("postern relay-out exited ({status}):\n{log}");
            }
            accepts(smtp).then_some(true)
        });
        up.then_some(relay)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postern.log")).unwrap_or_default()
    }
}

impl Drop for RelayOut {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- postern relay-out log -----\n{}", self.log());
        }
    }
}

/// A file in a fresh directory that outlives the call (for flags read at start-up).
fn secret_file(dir: &TempDir, name: &str, contents: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, contents).expect("write");
    path.display().to_string()
}

/// swaks as a legacy sender: no TLS, no AUTH.
fn swaks(to: SocketAddr, extra: &[&str]) -> crate::common::Output {
    let mut cmd = Command::new("swaks");
    cmd.args(["--server", &to.ip().to_string()])
        .args(["--port", &to.port().to_string()])
        .args(["--helo", "legacy.test"])
        .args([
            "--from",
            "scanner@legacy.test",
            "--to",
            "someone@example.org",
        ])
        .args(["--timeout", "20"])
        .args(extra);
    run(&mut cmd, b"", STEP * 2)
}

fn setup(lifetime: Duration) -> Option<(TokenServer, Submission)> {
    if !submission::available() || !crate::common::have("swaks") {
        return None;
    }
    let tokens = TokenServer::start(lifetime);
    let upstream = Submission::start(&tokens);
    Some((tokens, upstream))
}

fn password_flags(dir: &TempDir, mechanism: &'static str) -> Vec<String> {
    vec![
        "--upstream-auth".into(),
        mechanism.into(),
        "--upstream-user".into(),
        "alice".into(),
        "--upstream-password-file".into(),
        secret_file(dir, "password", &format!("{PASSWORD}\n")),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn legacy_senders_deliver_through_upstream_plain_and_login() {
    let Some((_tokens, upstream)) = setup(Duration::from_secs(3600)) else {
        return;
    };
    let secrets = tempfile::tempdir().expect("tempdir");
    let relay = RelayOut::start(&upstream, &strs(&password_flags(&secrets, "plain")));

    let out = swaks(relay.smtp, &["--header", "Subject: from swaks"]);
    out.assert_success("swaks without TLS through relay-out");
    let id = upstream.wait_held(1);
    let client = upstream.client_line(&id);
    assert!(client.contains("sasl_method=PLAIN"), "{client}");
    assert!(client.contains("sasl_username=alice"), "{client}");
    assert!(upstream.content(&id).contains("Subject: from swaks"));
    // The sender saw no STARTTLS (postern has no certificate) and no upstream AUTH.
    assert!(!out.stdout.contains("STARTTLS"), "{}", out.stdout);
    assert!(!out.stdout.contains("AUTH"), "{}", out.stdout);
    // After the login every reply is the upstream's own, a 5xx included.
    let refused = swaks(relay.smtp, &["--to", submission::REFUSED_RCPT]);
    assert!(
        refused.stdout.contains(
            "554 5.7.1 <nobody@example.org>: Recipient address rejected: No such user here"
        ),
        "{refused}"
    );
    assert_eq!(upstream.held().len(), 1);
    drop(relay);

    let relay = RelayOut::start(&upstream, &strs(&password_flags(&secrets, "login")));
    let report = SmtplibSession::new(relay.smtp)
        .ehlo("erp.legacy.test")
        .rcpt("someone@example.org")
        .run();
    assert_eq!(report.code("mail"), Some(250), "{}", report.raw);
    assert_eq!(report.code("data"), Some(250), "{}", report.raw);
    let id = upstream.wait_held(2);
    let client = upstream.client_line(&id);
    assert!(client.contains("sasl_method=LOGIN"), "{client}");
    assert!(client.contains("sasl_username=alice"), "{client}");
    assert!(
        !relay.log().contains(PASSWORD),
        "the password reached the log"
    );
}

#[test]
fn senders_outside_allow_from_are_refused() {
    let Some((_tokens, upstream)) = setup(Duration::from_secs(3600)) else {
        return;
    };
    let secrets = tempfile::tempdir().expect("tempdir");
    let mut flags = password_flags(&secrets, "plain");
    flags.extend(["--allow-from".into(), "127.0.0.2/32".into()]);
    let relay = RelayOut::start(&upstream, &strs(&flags));

    let refused = SmtplibSession::new(relay.smtp)
        .from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)))
        .rcpt("someone@example.org")
        .run();
    assert_eq!(refused.code("greeting"), Some(554), "{}", refused.raw);
    assert!(
        refused.text("greeting").contains("5.7.1"),
        "{}",
        refused.raw
    );

    let allowed = SmtplibSession::new(relay.smtp)
        .from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
        .rcpt("someone@example.org")
        .run();
    assert_eq!(allowed.code("data"), Some(250), "{}", allowed.raw);
    let id = upstream.wait_held(1);
    assert!(upstream.client_line(&id).contains("sasl_username=alice"));
    assert_eq!(
        upstream.held().len(),
        1,
        "only the allowed sender's message"
    );
}

#[test]
fn wrong_upstream_certificate_is_a_4xx_and_nothing_is_sent() {
    let Some((_tokens, upstream)) = setup(Duration::from_secs(3600)) else {
        return;
    };
    let secrets = tempfile::tempdir().expect("tempdir");
    let other_ca = TestCerts::generate();
    let ca = secret_file(&secrets, "other-ca.pem", &other_ca.ca_pem);
    let mut flags = password_flags(&secrets, "plain");
    flags.extend(["--upstream-ca".into(), ca]);
    let relay = RelayOut::start(&upstream, &strs(&flags));

    let out = swaks(relay.smtp, &[]);
    assert!(!out.status.success(), "{out}");
    assert!(out.stdout.contains("451 4.4.2"), "{out}");
    std::thread::sleep(Duration::from_millis(300));
    let log = upstream.log_text();
    assert!(!log.contains("sasl_username"), "{log}");
    assert!(upstream.held().is_empty());
    within("metrics", async {
        let failed = metric_sum(
            relay.admin,
            "postern_upstream_sessions_total{result=\"tls_failed\"}",
        )
        .await
        .unwrap_or(0.0);
        assert!(failed >= 1.0, "tls_failed = {failed}");
        let (status, body) = http_get(relay.admin, "/readyz").await;
        assert_eq!(status, 503, "{body}");
    })
    .await_blocking();
}

/// XOAUTH2 with the client-credentials grant: a token that expires mid-run is replaced
/// before the next session needs it, the token endpoint going down gives 454 4.7.0,
/// and its return brings delivery back.
#[test]
fn oauth2_token_expiry_endpoint_down_and_recovery() {
    let lifetime = Duration::from_secs(4);
    let Some((tokens, upstream)) = setup(lifetime) else {
        return;
    };
    let secrets = tempfile::tempdir().expect("tempdir");
    let url = tokens.token_url();
    let client_secret = secret_file(&secrets, "client-secret", "app-secret\n");
    let relay = RelayOut::start(
        &upstream,
        &[
            "--upstream-auth",
            "xoauth2",
            "--upstream-user",
            MAILBOX,
            "--oauth2-token-url",
            &url,
            "--oauth2-client-id",
            "postern-test",
            "--oauth2-client-secret-file",
            &client_secret,
            "--oauth2-scope",
            "https://outlook.office365.com/.default",
        ],
    );

    swaks(relay.smtp, &[]).assert_success("first message");
    let id = upstream.wait_held(1);
    let client = upstream.client_line(&id);
    assert!(client.contains("sasl_method=XOAUTH2"), "{client}");
    assert!(
        client.contains(&format!("sasl_username={MAILBOX}")),
        "{client}"
    );
    let first = tokens.introspected().last().cloned().expect("introspected");

    // Past the first token's life: Dovecot would refuse it now.
    std::thread::sleep(lifetime + Duration::from_millis(500));
    swaks(relay.smtp, &[]).assert_success("message after the first token expired");
    upstream.wait_held(2);
    let second = tokens.introspected().last().cloned().expect("introspected");
    assert_ne!(first, second, "the second session used a refreshed token");
    assert!(tokens.issued() >= 2);
    assert!(tokens.grants().iter().all(|g| g == "client_credentials"));

    // The token endpoint goes down; once the cached token is past its renewal time the
    // sender is told to come back later, and nothing reaches the upstream.
    tokens.set_down(true);
    std::thread::sleep(lifetime + Duration::from_millis(500));
    let out = swaks(relay.smtp, &[]);
    assert!(out.stdout.contains("454 4.7.0"), "{out}");
    assert_eq!(upstream.held().len(), 2);
    within("readiness while the token endpoint is down", async {
        let (status, body) = http_get(relay.admin, "/readyz").await;
        assert_eq!(status, 503, "{body}");
        let errors = metric_sum(
            relay.admin,
            "postern_oauth2_token_refreshes_total{result=\"error\"}",
        )
        .await
        .unwrap_or(0.0);
        assert!(errors >= 1.0);
    })
    .await_blocking();

    tokens.set_down(false);
    swaks(relay.smtp, &[]).assert_success("message after the token endpoint came back");
    upstream.wait_held(3);
    within("readiness after recovery", async {
        let (status, body) = http_get(relay.admin, "/readyz").await;
        assert_eq!(status, 200, "{body}");
        let expiry = metric_sum(relay.admin, "postern_oauth2_token_expiry_timestamp_seconds")
            .await
            .unwrap_or(0.0);
        assert!(expiry > 1.7e9, "expiry gauge {expiry}");
    })
    .await_blocking();
    assert!(!relay.log().contains("tok-"), "a token reached the log");
    assert!(
        !relay.log().contains("app-secret"),
        "the client secret reached the log"
    );
}

/// OAUTHBEARER with the refresh-token grant; the server rotates the refresh token and
/// postern writes the new one back to its file.
#[test]
fn oauthbearer_with_a_rotated_refresh_token() {
    let Some((tokens, upstream)) = setup(Duration::from_secs(3600)) else {
        return;
    };
    {
        let mut state = tokens.state.lock().unwrap();
        state.refresh_token = Some("rt-0".into());
        state.rotate = true;
    }
    let secrets = tempfile::tempdir().expect("tempdir");
    let refresh = secret_file(&secrets, "refresh-token", "rt-0\n");
    let url = tokens.token_url();
    let relay = RelayOut::start(
        &upstream,
        &[
            "--upstream-auth",
            "oauthbearer",
            "--upstream-user",
            MAILBOX,
            "--oauth2-token-url",
            &url,
            "--oauth2-client-id",
            "postern-test",
            "--oauth2-refresh-token-file",
            &refresh,
        ],
    );
    swaks(relay.smtp, &[]).assert_success("message over OAUTHBEARER");
    let id = upstream.wait_held(1);
    let client = upstream.client_line(&id);
    assert!(client.contains("sasl_method=OAUTHBEARER"), "{client}");
    assert_eq!(tokens.grants(), vec!["refresh_token".to_owned()]);
    wait_until(STEP, "the rotated refresh token in its file", || {
        (std::fs::read_to_string(&refresh).ok()?.trim() == "rt-1").then_some(())
    });
    assert!(
        !relay.log().contains("rt-1"),
        "the refresh token reached the log"
    );
}

/// A pipelined DATA transaction and a BDAT one, sent by a raw client, arrive byte for
/// byte (as Postfix stored them).
#[test]
fn pipelined_and_bdat_messages_arrive_intact() {
    let Some((_tokens, upstream)) = setup(Duration::from_secs(3600)) else {
        return;
    };
    let secrets = tempfile::tempdir().expect("tempdir");
    let relay = RelayOut::start(&upstream, &strs(&password_flags(&secrets, "plain")));

    let data_body = "Subject: pipelined\r\n\r\nline one\r\n..dot-stuffed line\r\nlast line\r\n";
    let bdat_body = "Subject: chunked\r\n\r\nfirst chunk\r\n.a line with a dot\r\nsecond chunk\r\n";
    let (first, second) = bdat_body.split_at(30);
    within("pipelined and BDAT transactions", async {
        let mut c = SmtpClient::connect(relay.smtp).await;
        c.expect("220").await;
        let ehlo = c.cmd("EHLO legacy.test", "250").await;
        assert!(ehlo.has_keyword("PIPELINING"), "{ehlo:?}");
        assert!(ehlo.has_keyword("CHUNKING"), "{ehlo:?}");
        assert!(!ehlo.has_keyword("STARTTLS") && !ehlo.has_keyword("AUTH"), "{ehlo:?}");
        // RFC 2920: MAIL, RCPT and DATA in one write.
        c.send(b"MAIL FROM:<a@legacy.test>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
            .await;
        c.expect("250").await;
        c.expect("250").await;
        c.expect("354").await;
        c.send(format!("{data_body}.\r\n").as_bytes()).await;
        c.expect("250").await;
        // RFC 3030: two chunks, the commands pipelined with them.
        c.send(
            format!(
                "MAIL FROM:<a@legacy.test>\r\nRCPT TO:<b@example.org>\r\nBDAT {}\r\n{first}BDAT {} LAST\r\n{second}",
                first.len(),
                second.len()
            )
            .as_bytes(),
        )
        .await;
        for _ in 0..4 {
            c.expect("250").await;
        }
        c.cmd("QUIT", "221").await;
    })
    .await_blocking();
    let data_id = upstream.wait_held(1);
    let bdat_id = upstream.wait_held(2);
    let data = upstream.content(&data_id);
    let bdat = upstream.content(&bdat_id);
    // postcat prints lines without CRLF and no blank line between header and body;
    // Postfix adds Received (and, as a submission service, Message-Id, Date, From)
    // headers. The body, unstuffed, must be exactly what the sender wrote.
    let data = data.replace("\r\n", "\n");
    assert!(data.contains("Subject: pipelined\n"), "{data}");
    assert!(
        data.ends_with("\nline one\n.dot-stuffed line\nlast line\n"),
        "{data}"
    );
    let bdat = bdat.replace("\r\n", "\n");
    assert!(bdat.contains("Subject: chunked\n"), "{bdat}");
    assert!(
        bdat.ends_with("\nfirst chunk\n.a line with a dot\nsecond chunk\n"),
        "{bdat}"
    );
}

/// `postern relay-out --check` logs in upstream (and fetches a token with OAuth2),
/// and fails with a message when it cannot.
#[test]
fn check_proves_the_token_and_the_upstream_login() {
    let Some((tokens, upstream)) = setup(Duration::from_secs(3600)) else {
        return;
    };
    let secrets = tempfile::tempdir().expect("tempdir");
    let client_secret = secret_file(&secrets, "client-secret", "app-secret\n");
    let ca = upstream.ca_path();
    // `postern check relay-out ...` and `postern relay-out --check ...` are one check.
    let check_as = |how: [&str; 2], url: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern"));
        cmd.args(how)
            .args(["--allow-from", "127.0.0.1/32"])
            .args(["--upstream", &format!("localhost:{}", upstream.port)])
            .arg("--upstream-ca")
            .arg(&ca)
            .args(["--upstream-auth", "xoauth2", "--upstream-user", MAILBOX])
            .args([
                "--oauth2-token-url",
                url,
                "--oauth2-client-id",
                "postern-test",
            ])
            .args(["--oauth2-client-secret-file", &client_secret]);
        run(&mut cmd, b"", STEP)
    };
    let check = |url: &str| check_as(["relay-out", "--check"], url);
    let ok = check(&tokens.token_url());
    ok.assert_success("relay-out --check");
    assert!(ok.stdout.contains("AUTH XOAUTH2"), "{ok}");
    assert!(tokens.issued() >= 1);
    let ok = check_as(["check", "relay-out"], &tokens.token_url());
    ok.assert_success("check relay-out");
    assert!(ok.stdout.contains("AUTH XOAUTH2"), "{ok}");

    tokens.set_down(true);
    let down = check(&tokens.token_url());
    assert_eq!(down.status.code(), Some(1), "{down}");
    assert!(down.stderr.contains("OAuth2 token"), "{down}");
}

/// Runs an async block to completion on a fresh runtime (the tests above are
/// synchronous: child processes and blocking tools).
trait AwaitBlocking: std::future::Future + Sized {
    fn await_blocking(self) -> Self::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(self)
    }
}

impl<F: std::future::Future> AwaitBlocking for F {}

/// With --cert and --users a sender may STARTTLS and log in to postern; a mapped login
/// is relayed as its own upstream account, an anonymous sender as --upstream-user.
#[test]
fn senders_logging_in_use_their_mapped_upstream_account() {
    let Some((_tokens, upstream)) = setup(Duration::from_secs(3600)) else {
        return;
    };
    let secrets = tempfile::tempdir().expect("tempdir");
    let own = TestCerts::generate().write_to(secrets.path());
    let users = secret_file(
        &secrets,
        "users",
        &format!("printer1:{{PLAIN}}{PASSWORD}\n"),
    );
    let map = secret_file(&secrets, "map", "printer1 bob\n");
    let mut flags = password_flags(&secrets, "plain");
    flags.extend([
        "--cert".into(),
        own.cert.display().to_string(),
        "--key".into(),
        own.key.display().to_string(),
        "--users".into(),
        users,
        "--upstream-user-map".into(),
        map,
    ]);
    let relay = RelayOut::start(&upstream, &strs(&flags));

    let report = SmtplibSession::new(relay.smtp)
        .starttls()
        .login("printer1", PASSWORD)
        .rcpt("someone@example.org")
        .run();
    assert!(report.text("ehlo").contains("STARTTLS"), "{}", report.raw);
    assert!(!report.text("ehlo").contains("AUTH"), "{}", report.raw);
    assert!(
        report.text("ehlo_tls").contains("AUTH PLAIN LOGIN"),
        "{}",
        report.raw
    );
    assert!(
        !report.text("ehlo_tls").contains("STARTTLS"),
        "{}",
        report.raw
    );
    assert_eq!(report.code("auth"), Some(235), "{}", report.raw);
    assert_eq!(report.code("data"), Some(250), "{}", report.raw);
    let id = upstream.wait_held(1);
    assert!(upstream.client_line(&id).contains("sasl_username=bob"));
    wait_until(STEP, "the session's log line naming both accounts", || {
        let log = relay.log();
        log.lines()
            .any(|l| l.contains("user=printer1") && l.contains("upstream_user=bob"))
            .then_some(())
    });

    let wrong = SmtplibSession::new(relay.smtp)
        .starttls()
        .login("printer1", "wrong")
        .rcpt("someone@example.org")
        .run();
    assert_eq!(wrong.code("auth"), Some(535), "{}", wrong.raw);

    let anonymous = SmtplibSession::new(relay.smtp)
        .rcpt("someone@example.org")
        .run();
    assert_eq!(anonymous.code("data"), Some(250), "{}", anonymous.raw);
    let id = upstream.wait_held(2);
    assert!(upstream.client_line(&id).contains("sasl_username=alice"));
}

/// `--upstream-tls implicit` (465 style): TLS from the first byte, then EHLO and AUTH.
#[test]
fn implicit_tls_upstream() {
    let Some((_tokens, upstream)) = setup(Duration::from_secs(3600)) else {
        return;
    };
    let secrets = tempfile::tempdir().expect("tempdir");
    let mut flags = password_flags(&secrets, "plain");
    flags.extend([
        "--upstream".into(),
        format!("localhost:{}", upstream.smtps_port),
        "--upstream-tls".into(),
        "implicit".into(),
    ]);
    let relay = RelayOut::start(&upstream, &strs(&flags));
    swaks(relay.smtp, &[]).assert_success("swaks through an implicit-TLS upstream");
    let id = upstream.wait_held(1);
    let client = upstream.client_line(&id);
    // Postfix counts the commands of each session: TLS came without STARTTLS.
    let session = upstream.wait_line(&["disconnect from", "auth=1"]);
    assert!(!session.contains("starttls"), "{session}");
    assert!(client.contains("sasl_username=alice"), "{client}");
}

/// SIGHUP reads the files again: a rotated upstream password is used from the next
/// session on (a wrong one gives 454 4.7.0, never a lost message).
#[test]
fn sighup_reloads_the_upstream_password() {
    let Some((_tokens, upstream)) = setup(Duration::from_secs(3600)) else {
        return;
    };
    let secrets = tempfile::tempdir().expect("tempdir");
    let relay = RelayOut::start(&upstream, &strs(&password_flags(&secrets, "plain")));
    let password_file = secrets.path().join("password");
    let reloaded = |n: usize| {
        let pid = relay.child.id().to_string();
        run(Command::new("kill").args(["-HUP", &pid]), b"", STEP).assert_success("kill -HUP");
        wait_until(STEP, "postern to reload", || {
            (relay.log().matches("relay-out files reloaded").count() >= n).then_some(())
        });
    };

    swaks(relay.smtp, &[]).assert_success("with the first password");
    upstream.wait_held(1);

    std::fs::write(&password_file, "not-the-password\n").expect("write");
    reloaded(1);
    let out = swaks(relay.smtp, &[]);
    assert!(out.stdout.contains("454 4.7.0"), "{out}");
    assert_eq!(upstream.held().len(), 1);

    std::fs::write(&password_file, format!("{PASSWORD}\n")).expect("write");
    reloaded(2);
    swaks(relay.smtp, &[]).assert_success("with the password restored");
    upstream.wait_held(2);
    within("metrics", async {
        let failed = metric_sum(
            relay.admin,
            "postern_upstream_sessions_total{result=\"auth_failed\"}",
        )
        .await
        .unwrap_or(0.0);
        assert_eq!(failed, 1.0);
    })
    .await_blocking();
}

/// A token the provider revoked before its time: Dovecot's SASL error challenge is
/// answered, the sender gets 454 4.7.0, and the next session fetches a new token.
#[test]
fn a_revoked_token_is_replaced_after_one_refusal() {
    let Some((tokens, upstream)) = setup(Duration::from_secs(3600)) else {
        return;
    };
    let secrets = tempfile::tempdir().expect("tempdir");
    let url = tokens.token_url();
    let client_secret = secret_file(&secrets, "client-secret", "app-secret\n");
    let relay = RelayOut::start(
        &upstream,
        &[
            "--upstream-auth",
            "oauthbearer",
            "--upstream-user",
            MAILBOX,
            "--oauth2-token-url",
            &url,
            "--oauth2-client-id",
            "postern-test",
            "--oauth2-client-secret-file",
            &client_secret,
        ],
    );
    swaks(relay.smtp, &[]).assert_success("with the first token");
    upstream.wait_held(1);
    assert_eq!(tokens.issued(), 1);

    tokens.revoke_all();
    let out = swaks(relay.smtp, &[]);
    assert!(out.stdout.contains("454 4.7.0"), "{out}");
    assert_eq!(upstream.held().len(), 1);
    assert!(
        relay.log().contains("invalid_token"),
        "the SASL error challenge is logged:\n{}",
        relay.log()
    );

    swaks(relay.smtp, &[]).assert_success("with a new token");
    upstream.wait_held(2);
    assert_eq!(tokens.issued(), 2);
}

/// The relay's framing rules hold in this direction too: a body with an end-of-data
/// lookalike (SMTP smuggling) never reaches the upstream.
#[test]
fn smuggling_attempts_stop_at_postern() {
    let Some((_tokens, upstream)) = setup(Duration::from_secs(3600)) else {
        return;
    };
    let secrets = tempfile::tempdir().expect("tempdir");
    let relay = RelayOut::start(&upstream, &strs(&password_flags(&secrets, "plain")));
    within("a smuggling attempt", async {
        let mut c = SmtpClient::connect(relay.smtp).await;
        c.expect("220").await;
        c.cmd("EHLO legacy.test", "250").await;
        c.cmd("MAIL FROM:<a@legacy.test>", "250").await;
        c.cmd("RCPT TO:<b@example.org>", "250").await;
        c.cmd("DATA", "354").await;
        c.send(
            b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@legacy.test>\r\nRCPT TO:<c@example.org>\r\nDATA\r\nsmuggled\r\n.\r\n",
        )
        .await;
        c.expect("550 5.6.0").await;
    })
    .await_blocking();
    std::thread::sleep(Duration::from_millis(500));
    assert!(upstream.held().is_empty(), "{}", upstream.log_text());
}
