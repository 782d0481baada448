//! Hostile clients: STARTTLS injection, pre-AUTH BDAT/DATA, over-long and malformed
//! lines, control characters, protocol confusion, AUTH state confusion, early talkers and
//! old TLS versions. After each: the replies are right (or the connection closes
//! cleanly), `postern_connections_active` returns to 0, a normal client still completes
//! AUTH and a message, nothing from the hostile client reached the backend, postern has
//! not panicked and its log holds no raw control characters.

use crate::common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::postern::USER;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// postern (relaxed limits unless `default_limits`) with `/metrics`, in front of a
/// recording backend.
struct Env {
    backend: RawBackend,
    postern: Postern,
    admin: SocketAddr,
}

impl Env {
    fn start() -> Env {
        Self::with(|b| b)
    }

    fn with(
        configure: impl FnOnce(common::postern::PosternBuilder) -> common::postern::PosternBuilder,
    ) -> Env {
        let backend = RawBackend::start();
        let postern =
            configure(Postern::builder(backend.addr).listen("--metrics-listen", V4)).start();
        let admin = postern.addr("--metrics-listen");
        Env {
            backend,
            postern,
            admin,
        }
    }

    /// No backend session got past postern's capability probe (EHLO/QUIT).
    fn assert_nothing_relayed(&self) {
        for s in self.backend.sessions() {
            for verb in [&b"MAIL"[..], b"RCPT", b"DATA", b"AUTH", b"evil"] {
                assert!(
                    !contains(&s.received, verb),
                    "the backend received {}: {}",
                    String::from_utf8_lossy(verb),
                    show(&s.received)
                );
            }
        }
    }

    /// The checks every test ends with (see the module doc).
    async fn assert_healthy(&self) {
        wait_metric(self.admin, "postern_connections_active", 0.0, STEP).await;
        // Nothing a hostile client sent may have reached the backend.
        let received = self.backend.all_received();
        assert!(
            !contains(&received, b"evil"),
            "hostile input reached the backend: {}",
            show(&received)
        );
        // A normal client: full AUTH and a message.
        let mut c = self.postern.authenticated(false).await;
        c.cmd("MAIL FROM:<good@client.test>", "250").await;
        c.cmd("RCPT TO:<b@backend.test>", "250").await;
        c.cmd("DATA", "354").await;
        c.send(b"Subject: fine\r\n\r\nstill works\r\n.\r\n").await;
        c.expect("250").await;
        c.cmd("QUIT", "221").await;
        c.expect_closed().await;
        wait_metric(self.admin, "postern_connections_active", 0.0, STEP).await;
        let log = self.postern.log();
        assert!(!log.contains("panicked"), "postern panicked:\n{log}");
        let raw = log
            .chars()
            .find(|&c| c.is_control() && c != '\n' && c != '\t');
        assert!(
            raw.is_none(),
            "raw control character {raw:?} in postern's log:\n{}",
            log.escape_debug()
        );
    }
}

/// A plain client that has read the greeting and had its EHLO answered.
async fn greeted(env: &Env) -> SmtpClient {
    let mut c = env.postern.plain().await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    c
}

/// A TLS (implicit) client after EHLO, not authenticated.
async fn tls_greeted(env: &Env) -> SmtpClient {
    env.postern.implicit().await.0
}

/// Reads until the server closes; returns everything it sent.
async fn drain(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match within("the server to close", s.read(&mut chunk)).await {
            Ok(0) | Err(_) => return all,
            Ok(n) => all.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Writes `bytes`, ignoring errors (the server may close before reading them all).
async fn write_ignoring_errors(s: &mut TcpStream, bytes: &[u8]) {
    let _ = within("write", s.write_all(bytes)).await;
}

/// The reply lines in `bytes`.
fn reply_lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

// ---- STARTTLS injection --------------------------------------------------------------

/// Commands pipelined after STARTTLS in the same segment (AUTH with valid credentials,
/// then MAIL) are discarded; inside TLS postern knows neither EHLO nor AUTH.
#[tokio::test]
async fn starttls_injection_in_the_same_segment_is_never_executed_and_state_is_fresh() {
    let env = Env::start();
    let mut c = env.postern.plain().await;
    c.expect("220").await;
    let auth = plain_response(USER, PASSWORD);
    c.send(
        format!(
            "EHLO client.test\r\nSTARTTLS\r\nAUTH PLAIN {auth}\r\nMAIL FROM:<evil@x>\r\n\
             RCPT TO:<evil@x>\r\n"
        )
        .as_bytes(),
    )
    .await;
    c.expect("250").await;
    c.expect("220 2.0.0").await;
    c.upgrade(env.postern.tls_config()).await;
    // The first reply inside TLS answers our first TLS command: no AUTH survived.
    c.cmd("MAIL FROM:<evil@x>", "530 5.7.0 Authentication required")
        .await;
    // No EHLO survived either: AUTH before the post-TLS EHLO is refused.
    let r = c.cmd(&format!("AUTH PLAIN {auth}"), "503").await;
    assert!(r.last().starts_with("503 5.5.1"), "{}", r.raw);
    let ehlo = c.cmd("EHLO client.test", "250").await;
    assert!(ehlo.has_keyword("AUTH"), "{}", ehlo.raw);
    c.cmd("QUIT", "221").await;
    env.assert_nothing_relayed();
    env.assert_healthy().await;
}

/// The injected bytes arrive in their own segment after the 220 but before the
/// ClientHello: they are taken as a (bad) ClientHello, never as SMTP.
#[tokio::test]
async fn starttls_injection_in_a_later_segment_only_breaks_the_handshake() {
    let env = Env::start();
    let auth = plain_response(USER, PASSWORD);
    for injected in [
        format!("AUTH PLAIN {auth}\r\n"),
        "MAIL FROM:<evil@x>\r\nRCPT TO:<evil@x>\r\nDATA\r\n".to_string(),
    ] {
        let mut s = within("connect", TcpStream::connect(env.postern.smtp))
            .await
            .expect("connect");
        // A raw stream, so a close by postern never panics a write.
        let mut greeting = [0u8; 512];
        let n = within("greeting", s.read(&mut greeting)).await.unwrap();
        assert!(greeting[..n].starts_with(b"220 "));
        write_ignoring_errors(&mut s, b"EHLO client.test\r\n").await;
        let mut ehlo = Vec::new();
        while !ehlo.windows(4).any(|w| w == b"250 ") {
            let n = within("EHLO reply", s.read(&mut greeting)).await.unwrap();
            assert!(n > 0, "closed after EHLO");
            ehlo.extend_from_slice(&greeting[..n]);
        }
        write_ignoring_errors(&mut s, b"STARTTLS\r\n").await;
        let n = within("STARTTLS reply", s.read(&mut greeting))
            .await
            .unwrap();
        assert!(
            greeting[..n].starts_with(b"220 2.0.0"),
            "{}",
            show(&greeting[..n])
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        write_ignoring_errors(&mut s, injected.as_bytes()).await;
        let after = drain(&mut s).await;
        // Whatever comes back is a TLS alert at most: never an SMTP reply.
        for code in [&b"235"[..], b"250", b"354", b"530", b"500"] {
            assert!(
                !contains(&after, code),
                "postern answered injected plaintext: {}",
                show(&after)
            );
        }
    }
    env.assert_nothing_relayed();
    env.assert_healthy().await;
}

// ---- Pre-AUTH BDAT and DATA ---------------------------------------------------------

/// BDAT before AUTH is refused with 530 and the connection closes, so the chunk (SMTP
/// commands here) is never read as commands, before and after TLS.
#[tokio::test]
async fn pre_auth_bdat_chunk_is_never_read_as_commands() {
    let env = Env::start();
    let auth = plain_response(USER, PASSWORD);
    let chunk = format!("AUTH PLAIN {auth}\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<evil@x>\r\n");
    let bdat = format!("BDAT {} LAST\r\n{chunk}", chunk.len());

    let mut c = greeted(&env).await;
    c.send(bdat.as_bytes()).await;
    c.expect("530 5.7.0 Must issue a STARTTLS command first")
        .await;
    c.expect_closed().await;

    let mut c = tls_greeted(&env).await;
    c.send(bdat.as_bytes()).await;
    c.expect("530 5.7.0").await;
    c.expect_closed().await;
    env.assert_nothing_relayed();
    env.assert_healthy().await;
}

/// DATA before AUTH is refused; a client that sends its body anyway gets every line
/// refused (none is accepted as a command that does anything), and nothing reaches the
/// backend.
#[tokio::test]
async fn pre_auth_data_body_is_never_accepted() {
    let env = Env::start();
    let body = "From: evil@x\r\nSubject: evil\r\n\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<evil@x>\r\n\
                DATA\r\nevil text\r\n.\r\n";
    for tls in [false, true] {
        let mut c = if tls {
            tls_greeted(&env).await
        } else {
            greeted(&env).await
        };
        c.send(format!("DATA\r\n{body}").as_bytes()).await;
        c.expect("530 5.7.0").await;
        for _ in body.split_inclusive("\r\n") {
            let r = c.read_reply().await;
            assert!(
                r.code >= 500,
                "a body line was accepted: {}\n{}",
                r.raw,
                c.transcript
            );
        }
        c.cmd("NOOP", "250").await;
        c.cmd("QUIT", "221").await;
    }
    env.assert_nothing_relayed();
    env.assert_healthy().await;
}

// ---- Over-long and malformed lines ----------------------------------------------------

/// A command over 512 octets gets `500 5.5.2` and the session goes on.
#[tokio::test]
async fn over_long_command_is_refused() {
    let env = Env::start();
    let mut c = greeted(&env).await;
    c.cmd(&format!("NOOP {}", "x".repeat(600)), "500 5.5.2")
        .await;
    c.cmd("NOOP", "250").await;
    c.cmd("QUIT", "221").await;
    env.assert_healthy().await;
}

/// An AUTH response over 12288 octets gets `500 5.5.6` and the connection closes.
#[tokio::test]
async fn over_long_auth_response_closes_with_500_5_5_6() {
    let env = Env::start();
    let mut c = tls_greeted(&env).await;
    c.cmd("AUTH PLAIN", "334").await;
    c.send(format!("{}\r\n", "A".repeat(13_000)).as_bytes())
        .await;
    c.expect("500 5.5.6").await;
    c.expect_closed().await;
    env.assert_healthy().await;
}

/// An unterminated 1 MiB line: postern answers once it passes 12288 octets and closes
/// without buffering the rest.
#[tokio::test]
async fn unterminated_one_mib_line_closes() {
    let env = Env::start();
    for in_auth in [false, true] {
        let mut s = within("connect", TcpStream::connect(env.postern.smtp))
            .await
            .expect("connect");
        let prefix: &[u8] = if in_auth {
            b"EHLO client.test\r\nAUTH LOGIN\r\n"
        } else {
            b"EHLO client.test\r\n"
        };
        write_ignoring_errors(&mut s, prefix).await;
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            let line = vec![b'A'; 1 << 20];
            let _ = within("write 1 MiB", w.write_all(&line)).await;
            w
        });
        let mut got = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match within("postern to close", r.read(&mut chunk)).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = within("writer", writer).await;
        let lines = reply_lines(&got);
        let last = lines.last().cloned().unwrap_or_default();
        // Before TLS AUTH is 538, so the long line is a command line there: 500 5.5.2.
        assert!(
            last.starts_with("500 5.5.2") || last.starts_with("500 5.5.6"),
            "in_auth={in_auth}: {lines:?}"
        );
    }
    // The same inside an AUTH exchange over TLS: 500 5.5.6.
    let mut c = tls_greeted(&env).await;
    c.cmd("AUTH LOGIN", "334").await;
    // 20 000 octets without CRLF: small enough to be written before postern closes.
    c.send(&[b'A'; 20_000]).await;
    c.expect("500 5.5.6").await;
    c.expect_closed().await;
    env.assert_healthy().await;
}

/// Bare LF, bare CR and NUL inside a command: `500 5.5.2`, before and after TLS, and a
/// command hidden behind the bare LF is not executed.
#[tokio::test]
async fn bare_cr_lf_and_nul_in_commands_are_refused() {
    let env = Env::start();
    for tls in [false, true] {
        let mut c = if tls {
            tls_greeted(&env).await
        } else {
            greeted(&env).await
        };
        for bad in [
            &b"NOOP\nMAIL FROM:<evil@x>\r\n"[..],
            b"NOOP\rMAIL FROM:<evil@x>\r\n",
            b"NO\0OP\r\n",
            b"EHLO a\nb\r\n",
            b"QUIT\n\r\n",
        ] {
            c.send(bad).await;
            c.expect("500 5.5.2").await;
        }
        c.cmd("NOOP", "250").await;
        c.cmd("QUIT", "221").await;
    }
    env.assert_healthy().await;
}

/// EHLO names with control characters or invalid UTF-8 get `501 5.5.4`; they are never
/// logged raw and never reach the backend (neither in EHLO nor in XCLIENT).
#[tokio::test]
async fn bad_ehlo_names_are_refused_and_never_echoed_raw() {
    let env = Env::with(|b| b.flag("--xclient", "true"));
    let mut c = tls_greeted(&env).await;
    // A control octet anywhere in a line is refused as such (500 5.5.2), the same
    // way before and after login; other bad names are a syntax error.
    for (bad, reply) in [
        (&b"EHLO evil\x1b[31mname\r\n"[..], "500 5.5.2"),
        (b"EHLO evil\xff\xfename\r\n", "501 5.5.4"),
        (b"HELO evil\x07bell\r\n", "500 5.5.2"),
        (b"EHLO evil\x7fdel\r\n", "500 5.5.2"),
        (b"EHLO\r\n", "501 5.5.4"),
    ] {
        c.send(bad).await;
        c.expect(reply).await;
    }
    c.cmd("EHLO client.test", "250").await;
    c.auth_plain(USER, PASSWORD, "235").await;
    c.cmd("QUIT", "221").await;
    let s = env.backend.session_containing(b"EHLO client.test\r\n");
    assert!(
        !s.received
            .iter()
            .any(|&b| b == 0x1b || b == 0x07 || b >= 0x7f),
        "{}",
        show(&s.received)
    );
    env.assert_healthy().await;
}

/// User names with ESC, CR, LF, NUL and invalid UTF-8 in PLAIN and LOGIN: refused, and
/// the log shows them escaped, never raw.
#[tokio::test]
async fn control_characters_in_user_names_are_logged_escaped() {
    let env = Env::start();
    let mut c = tls_greeted(&env).await;
    let users: [&[u8]; 3] = [b"evil\x1b[2Jname", b"evil\rInjected: line", b"evil\xff\xfe"];
    for user in users {
        let mut plain = b"\0".to_vec();
        plain.extend_from_slice(user);
        plain.extend_from_slice(b"\0secret");
        // Invalid UTF-8 cannot be a user name: 501 5.5.2; the others are unknown users.
        let want = if std::str::from_utf8(user).is_ok() {
            "535 5.7.8"
        } else {
            "501 5.5.2"
        };
        c.cmd(&format!("AUTH PLAIN {}", b64(&plain)), want).await;
        c.cmd("AUTH LOGIN", "334").await;
        let r = c.cmd(&b64(user), "").await;
        if r.code == 334 {
            c.cmd(&b64("secret"), want).await;
        } else {
            assert!(r.last().starts_with(want), "{}", r.raw);
        }
    }
    c.cmd("QUIT", "221").await;
    wait_metric(env.admin, "postern_connections_active", 0.0, STEP).await;
    let log = env.postern.log();
    assert!(
        log.contains("evil\\u{1b}[2Jname") || log.contains("evil\\x1b[2Jname"),
        "ESC not escaped in the log:\n{}",
        log.escape_debug()
    );
    assert!(
        log.contains("evil\\rInjected"),
        "CR not escaped in the log:\n{}",
        log.escape_debug()
    );
    assert!(!log.contains("\nInjected: line"), "{log}");
    env.assert_healthy().await;
}

// ---- The wrong protocol -----------------------------------------------------------------

/// An HTTP request to the plaintext port: every line is refused, nothing is executed,
/// and the connection ends.
#[tokio::test]
async fn http_request_to_the_plaintext_port() {
    let env = Env::start();
    let mut s = within("connect", TcpStream::connect(env.postern.smtp))
        .await
        .expect("connect");
    write_ignoring_errors(
        &mut s,
        b"GET / HTTP/1.1\r\nHost: evil\r\nUser-Agent: evil\r\nConnection: close\r\n\r\n",
    )
    .await;
    let _ = within("shutdown", s.shutdown()).await;
    let got = drain(&mut s).await;
    let lines = reply_lines(&got);
    assert!(lines[0].starts_with("220 "), "{lines:?}");
    for l in &lines[1..] {
        assert!(l.starts_with('5'), "an HTTP line was accepted: {lines:?}");
    }
    env.assert_healthy().await;
}

/// A TLS ClientHello on the plaintext port: the TLS client fails (it gets a plaintext
/// greeting), postern refuses the bytes and the connection ends.
#[tokio::test]
async fn tls_client_hello_to_the_plaintext_port() {
    let env = Env::start();
    let tcp = within("connect", TcpStream::connect(env.postern.smtp))
        .await
        .expect("connect");
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let result = within(
        "TLS handshake against the plaintext port",
        tokio_rustls::TlsConnector::from(env.postern.tls_config()).connect(name, tcp),
    )
    .await;
    assert!(
        result.is_err(),
        "TLS handshake on the plaintext port succeeded"
    );
    env.assert_healthy().await;
}

/// Garbage instead of a ClientHello, on the implicit TLS port and after STARTTLS:
/// the connection closes without a plaintext SMTP reply.
#[tokio::test]
async fn garbage_instead_of_a_client_hello() {
    let env = Env::start();
    let garbage: &[&[u8]] = &[
        b"EHLO evil\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
        b"\x16\x03\x01\xff\xff\x01\x00\x00\x00garbage",
        &[0u8; 4096],
    ];
    for g in garbage {
        let mut s = within("connect", TcpStream::connect(env.postern.smtps))
            .await
            .expect("connect");
        write_ignoring_errors(&mut s, g).await;
        let got = drain(&mut s).await;
        assert!(
            !contains(&got, b"220 ") && !contains(&got, b"235"),
            "{}",
            show(&got)
        );

        let mut s = within("connect", TcpStream::connect(env.postern.smtp))
            .await
            .expect("connect");
        write_ignoring_errors(&mut s, b"EHLO client.test\r\nSTARTTLS\r\n").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        write_ignoring_errors(&mut s, g).await;
        let got = drain(&mut s).await;
        // After the 220 only a TLS alert may come, no SMTP reply.
        let at = find(&got, b"220 2.0.0").expect("STARTTLS accepted");
        let after = reply_lines(&got[at..]);
        assert!(
            after[1..]
                .iter()
                .all(|l| !l.as_bytes().first().is_some_and(u8::is_ascii_digit)),
            "{after:?}"
        );
        assert!(!contains(&got, b"235"), "{}", show(&got));
    }
    env.assert_healthy().await;
}

/// Clients that vanish mid-handshake, mid-AUTH and mid-DATA leave no session behind,
/// and a half-sent message is not delivered.
#[tokio::test]
async fn clients_closing_mid_handshake_auth_and_data() {
    let env = Env::start();
    // Mid-handshake: the first bytes of a ClientHello, then gone.
    for addr in [env.postern.smtps, env.postern.smtp] {
        let mut s = within("connect", TcpStream::connect(addr))
            .await
            .expect("connect");
        if addr == env.postern.smtp {
            write_ignoring_errors(&mut s, b"EHLO client.test\r\nSTARTTLS\r\n").await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        write_ignoring_errors(&mut s, b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03").await;
        drop(s);
    }
    // Mid-AUTH, in each mechanism.
    for mech in ["LOGIN", "PLAIN", "CRAM-MD5"] {
        let mut c = tls_greeted(&env).await;
        c.cmd(&format!("AUTH {mech}"), "334").await;
        drop(c);
    }
    let mut c = tls_greeted(&env).await;
    c.cmd("AUTH LOGIN", "334").await;
    c.cmd(&b64(USER), "334").await;
    drop(c);
    // Mid-DATA, after AUTH (the backend session is open).
    let mut c = env.postern.authenticated(true).await;
    c.cmd("MAIL FROM:<evil@client.test>", "250").await;
    c.cmd("RCPT TO:<b@backend.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(b"Subject: half\r\n\r\nhalf a mess").await;
    drop(c);
    wait_metric(env.admin, "postern_connections_active", 0.0, STEP).await;
    let s = env
        .backend
        .session_containing(b"MAIL FROM:<evil@client.test>");
    wait_until(STEP, "the backend session to end", || {
        env.backend
            .sessions()
            .into_iter()
            .any(|x| x.received == s.received && x.closed)
            .then_some(())
    });
    assert!(
        env.backend.sessions().iter().all(|x| x.messages.is_empty()),
        "a half-sent message was delivered"
    );
    // assert_healthy checks "evil" never reached the backend; this one did, by design.
    wait_metric(env.admin, "postern_connections_active", 0.0, STEP).await;
    let mut ok = env.postern.authenticated(false).await;
    ok.cmd("QUIT", "221").await;
    wait_metric(env.admin, "postern_connections_active", 0.0, STEP).await;
    assert!(!env.postern.log().contains("panicked"));
}

// ---- AUTH state confusion ---------------------------------------------------------------

/// `*` cancels an exchange at any step with `501 5.7.0`; the next AUTH starts fresh.
#[tokio::test]
async fn star_cancels_mid_exchange() {
    let env = Env::start();
    let mut c = tls_greeted(&env).await;
    c.cmd("AUTH PLAIN", "334").await;
    c.cmd("*", "501 5.7.0").await;
    c.cmd("AUTH LOGIN", "334").await;
    c.cmd("*", "501 5.7.0").await;
    c.cmd("AUTH LOGIN", "334").await;
    c.cmd(&b64(USER), "334").await;
    c.cmd("*", "501 5.7.0").await;
    c.cmd("AUTH CRAM-MD5", "334").await;
    c.cmd("*", "501 5.7.0").await;
    c.cmd("MAIL FROM:<evil@x>", "530 5.7.0").await;
    c.auth_plain(USER, PASSWORD, "235").await;
    c.cmd("QUIT", "221").await;
    env.assert_healthy().await;
}

/// LOGIN aborted after the user name, then PLAIN as someone else: the first name is
/// forgotten (a wrong password for the second user fails, the right one logs in as the
/// second user).
#[tokio::test]
async fn aborted_login_then_plain_as_someone_else() {
    let env = Env::start();
    let mut c = tls_greeted(&env).await;
    c.cmd("AUTH LOGIN", "334").await;
    c.cmd(&b64(USER), "334").await;
    c.cmd("*", "501 5.7.0").await;
    c.auth_plain("sha512", "wrong", "535 5.7.8").await;
    // A new AUTH command sent where LOGIN expects the password is a (bad) password.
    c.cmd("AUTH LOGIN", "334").await;
    c.cmd(&b64(USER), "334").await;
    let r = c
        .cmd(
            &format!("AUTH PLAIN {}", plain_response("sha512", PASSWORD)),
            "5",
        )
        .await;
    assert!(r.code == 501 || r.code == 535, "{}", r.raw);
    c.auth_plain("sha512", PASSWORD, "235").await;
    c.cmd("QUIT", "221").await;
    wait_metric(env.admin, "postern_connections_active", 0.0, STEP).await;
    let log = env.postern.log();
    let closed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("session closed") && l.contains("result=\"relayed\""))
        .collect();
    assert!(
        closed.len() == 1 && closed[0].contains("user=sha512"),
        "{closed:?}"
    );
    env.assert_healthy().await;
}

/// Switching mechanisms mid-exchange: the AUTH line is taken as the response of the
/// running exchange and fails; nothing authenticates until a clean exchange.
#[tokio::test]
async fn switching_mechanisms_mid_exchange() {
    let env = Env::start();
    let mut c = tls_greeted(&env).await;
    let plain = plain_response(USER, PASSWORD);
    c.cmd("AUTH CRAM-MD5", "334").await;
    let r = c.cmd(&format!("AUTH PLAIN {plain}"), "5").await;
    assert!(r.code == 501 || r.code == 535, "{}", r.raw);
    c.cmd("AUTH PLAIN", "334").await;
    let r = c.cmd("AUTH LOGIN", "5").await;
    assert!(r.code == 501 || r.code == 535, "{}", r.raw);
    c.cmd("MAIL FROM:<evil@x>", "530 5.7.0").await;
    c.cmd("AUTH LOGIN", "334").await;
    c.cmd(&b64(USER), "334").await;
    c.cmd(&b64(PASSWORD), "235").await;
    // And a second AUTH after success is refused.
    c.cmd(&format!("AUTH PLAIN {plain}"), "503").await;
    c.cmd("QUIT", "221").await;
    env.assert_healthy().await;
}

/// A CRAM-MD5 response replayed in a new session fails: every challenge is fresh.
#[tokio::test]
async fn replayed_cram_md5_response_fails() {
    let env = Env::start();
    let mut first = tls_greeted(&env).await;
    let challenge = first.cmd("AUTH CRAM-MD5", "334").await.lines[0].clone();
    let response = cram_md5_response(USER, PASSWORD, &challenge);
    first.cmd(&response, "235").await;
    first.cmd("QUIT", "221").await;

    let mut second = tls_greeted(&env).await;
    let again = second.cmd("AUTH CRAM-MD5", "334").await.lines[0].clone();
    assert_ne!(challenge, again, "challenge reused");
    second.cmd(&response, "535 5.7.8").await;
    // The live challenge still works.
    second.cmd("AUTH CRAM-MD5", "334").await;
    second.cmd("*", "501 5.7.0").await;
    second.cmd("QUIT", "221").await;
    env.assert_healthy().await;
}

/// PLAIN with an authzid: refused unless empty or equal to the authcid.
#[tokio::test]
async fn plain_authzid_must_be_empty_or_equal() {
    let env = Env::start();
    let mut c = tls_greeted(&env).await;
    for foreign in ["sha512", "postmaster", "ALICE"] {
        let ir = b64(format!("{foreign}\0{USER}\0{PASSWORD}"));
        c.cmd(&format!("AUTH PLAIN {ir}"), "535 5.7.8").await;
    }
    let ir = b64(format!("{USER}\0{USER}\0{PASSWORD}"));
    c.cmd(&format!("AUTH PLAIN {ir}"), "235").await;
    c.cmd("QUIT", "221").await;
    env.assert_healthy().await;
}

// ---- Early talker -------------------------------------------------------------------------

/// Bytes sent before the greeting are handled in order after it.
#[tokio::test]
async fn early_talker_is_handled_in_order() {
    let env = Env::start();
    let mut s = within("connect", TcpStream::connect(env.postern.smtp))
        .await
        .expect("connect");
    write_ignoring_errors(
        &mut s,
        b"EHLO client.test\r\nNOOP\r\nMAIL FROM:<evil@x>\r\nQUIT\r\n",
    )
    .await;
    let got = drain(&mut s).await;
    let lines = reply_lines(&got);
    let finals: Vec<&String> = lines
        .iter()
        .filter(|l| l.as_bytes().get(3) == Some(&b' '))
        .collect();
    assert_eq!(finals.len(), 5, "{lines:?}");
    assert!(finals[0].starts_with("220 "), "{lines:?}");
    assert!(finals[1].starts_with("250 "), "{lines:?}");
    assert!(finals[2].starts_with("250 2.0.0"), "{lines:?}");
    assert!(finals[3].starts_with("530 5.7.0"), "{lines:?}");
    assert!(finals[4].starts_with("221 "), "{lines:?}");
    env.assert_healthy().await;
}

/// An early talker that pipelines STARTTLS and then AUTH/MAIL before the greeting: the
/// commands after STARTTLS are discarded by the handshake, never executed inside TLS.
#[tokio::test]
async fn early_talker_commands_after_starttls_are_never_executed() {
    let env = Env::start();
    let mut c = env.postern.plain().await;
    let auth = plain_response(USER, PASSWORD);
    c.send(
        format!("EHLO client.test\r\nSTARTTLS\r\nAUTH PLAIN {auth}\r\nMAIL FROM:<evil@x>\r\n")
            .as_bytes(),
    )
    .await;
    c.expect("220 ").await;
    c.expect("250").await;
    c.expect("220 2.0.0").await;
    c.upgrade(env.postern.tls_config()).await;
    c.cmd("MAIL FROM:<evil@x>", "530 5.7.0 Authentication required")
        .await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd("QUIT", "221").await;
    env.assert_nothing_relayed();
    env.assert_healthy().await;
}

/// After ten error replies postern says `421 4.7.0` and closes (its default budget).
#[tokio::test]
async fn error_budget_closes_with_421() {
    let env = Env::with(|b| b.flag("--max-errors", "10"));
    let mut c = greeted(&env).await;
    for _ in 0..9 {
        c.cmd("MAIL FROM:<evil@x>", "530").await;
    }
    c.cmd("MAIL FROM:<evil@x>", "530").await;
    c.expect("421 4.7.0").await;
    c.expect_closed().await;
    env.assert_healthy().await;
}

// ---- TLS versions -----------------------------------------------------------------------------

fn s_client_version(addr: SocketAddr, starttls: bool, version: &str) -> Output {
    let mut cmd = Command::new("openssl");
    cmd.arg("s_client")
        .args(["-connect", &addr.to_string(), "-servername", "localhost"])
        .arg(version)
        .args(["-cipher", "DEFAULT@SECLEVEL=0"]);
    if starttls {
        cmd.args(["-starttls", "smtp"]);
    }
    run(&mut cmd, b"QUIT\r\n", STEP)
}

/// Only TLS 1.2 and 1.3: an openssl client limited to TLS 1.0 or 1.1 fails the
/// handshake on both listeners, and postern stays healthy.
#[tokio::test]
async fn only_tls_1_2_and_1_3_are_accepted() {
    let env = Env::start();
    let (smtp, smtps) = (env.postern.smtp, env.postern.smtps);
    let outs = tokio::task::spawn_blocking(move || {
        let mut outs = Vec::new();
        for (addr, starttls) in [(smtps, false), (smtp, true)] {
            for v in ["-tls1", "-tls1_1", "-tls1_2", "-tls1_3"] {
                outs.push((v, starttls, s_client_version(addr, starttls, v)));
            }
        }
        outs
    });
    let outs = within("openssl s_client runs", outs).await.expect("thread");
    for (v, starttls, out) in outs {
        let established =
            out.stdout.contains("Cipher is ") && !out.stdout.contains("Cipher is (NONE)");
        if v == "-tls1_2" || v == "-tls1_3" {
            assert!(established, "{v} starttls={starttls} refused: {out}");
            let want = if v == "-tls1_2" { "TLSv1.2" } else { "TLSv1.3" };
            assert!(out.stdout.contains(want), "{out}");
        } else {
            assert!(!established, "{v} starttls={starttls} accepted: {out}");
            assert!(!out.status.success(), "{v}: {out}");
        }
    }
    env.assert_healthy().await;
}
