//! The `--listen` port: RFC 3207 STARTTLS and everything postern refuses before it.

use crate::common;

use std::time::Duration;

use common::postern::HOSTNAME;
use common::tools::{Listener, s_client};
use common::*;

#[tokio::test]
async fn greeting_and_pre_tls_ehlo() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = postern.plain().await;
    let greeting = c.expect("220").await;
    assert!(
        greeting
            .last()
            .starts_with(&format!("220 {HOSTNAME} ESMTP")),
        "greeting: {:?}",
        greeting.raw
    );
    let ehlo = c.cmd("EHLO client.test", "250").await;
    assert!(ehlo.lines[0].starts_with(HOSTNAME), "{}", ehlo.raw);
    assert!(ehlo.has_keyword("STARTTLS"), "{}", ehlo.raw);
    assert!(
        !ehlo.has_keyword("AUTH"),
        "no AUTH before TLS: {}",
        ehlo.raw
    );
    // The backend's own capabilities pass through.
    for cap in ["PIPELINING", "SIZE 10240000", "8BITMIME"] {
        assert!(
            ehlo.lines.iter().any(|l| l == cap),
            "{cap} missing: {}",
            ehlo.raw
        );
    }
    c.cmd("QUIT", "221").await;
}

#[tokio::test]
async fn everything_but_ehlo_and_starttls_is_refused_before_tls() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = postern.plain().await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    let plain = plain_response(common::postern::USER, PASSWORD);
    c.cmd(&format!("AUTH PLAIN {plain}"), "538 5.7.11").await;
    c.cmd("AUTH LOGIN", "538 5.7.11").await;
    for cmd in [
        "MAIL FROM:<a@client.test>",
        "RCPT TO:<b@backend.test>",
        "DATA",
    ] {
        let r = c.cmd(cmd, "530 5.7.0").await;
        assert!(
            r.last().contains("Must issue a STARTTLS command first"),
            "{cmd}: {}",
            r.raw
        );
    }
    c.cmd("NOOP", "250").await;
    c.cmd("QUIT", "221").await;
    c.expect_closed().await;
    assert!(
        !contains(&backend.all_received(), b"a@client.test"),
        "nothing may reach the backend before AUTH"
    );
}

#[tokio::test]
async fn starttls_then_auth_is_offered_and_starttls_is_not() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = postern.plain().await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    c.line("STARTTLS").await;
    let r = c.expect("220 2.0.0").await;
    assert!(r.last().contains("Ready to start TLS"), "{}", r.raw);
    c.upgrade(postern.tls_config()).await;
    let ehlo = c.cmd("EHLO client.test", "250").await;
    assert!(!ehlo.has_keyword("STARTTLS"), "{}", ehlo.raw);
    assert!(
        ehlo.lines.iter().any(|l| l == "AUTH PLAIN LOGIN CRAM-MD5"),
        "{}",
        ehlo.raw
    );
    assert!(
        ehlo.lines.iter().any(|l| l == "SIZE 10240000"),
        "{}",
        ehlo.raw
    );
    // MAIL before AUTH, now over TLS.
    c.cmd(
        "MAIL FROM:<a@client.test>",
        "530 5.7.0 Authentication required",
    )
    .await;
    // A second STARTTLS inside TLS must not be accepted (RFC 3207 §4.2).
    let again = c.cmd("STARTTLS", "5").await;
    assert!(again.code >= 500, "{}", again.raw);
    c.auth_plain(common::postern::USER, PASSWORD, "235 2.7.0")
        .await;
    c.cmd("MAIL FROM:<a@client.test>", "250").await;
    c.cmd("QUIT", "221").await;
}

/// CVE-2011-0411: a command pipelined after STARTTLS in the same plaintext packet must
/// be thrown away, never executed inside the TLS session.
#[tokio::test]
async fn plaintext_pipelined_after_starttls_is_discarded() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = postern.plain().await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    c.send(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<evil@x>\r\n")
        .await;
    c.expect("220 2.0.0").await;
    // starttls() semantics: nothing else may follow the 220 in plaintext.
    c.upgrade(postern.tls_config()).await;
    // The first reply inside TLS must be the EHLO's, not an answer to the injected MAIL.
    let ehlo = c.cmd("EHLO client.test", "250").await;
    assert!(ehlo.has_keyword("AUTH"), "{}", ehlo.raw);
    c.auth_plain(common::postern::USER, PASSWORD, "235").await;
    c.cmd("MAIL FROM:<good@client.test>", "250").await;
    c.cmd("RCPT TO:<b@backend.test>", "250").await;
    c.cmd("QUIT", "221").await;
    let s = backend.session_containing(b"MAIL FROM:<good@client.test>");
    assert!(
        !contains(&backend.all_received(), b"evil"),
        "injected command reached the backend: {}",
        show(&s.received)
    );
    let server_said: Vec<&str> = c
        .transcript
        .lines()
        .filter(|l| l.starts_with("S: "))
        .collect();
    assert!(
        !server_said
            .iter()
            .any(|l| l.contains("evil") || l.starts_with("S: 530")),
        "server answered the injected commands:\n{}",
        c.transcript
    );
}

/// The injection must also be dropped when the plaintext arrives after the 220 but
/// before the ClientHello, i.e. in its own packet.
#[tokio::test]
async fn plaintext_sent_after_starttls_reply_breaks_only_the_handshake() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = postern.plain().await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd("STARTTLS", "220").await;
    c.send(b"MAIL FROM:<evil@x>\r\n").await;
    // postern now expects a TLS ClientHello; it must not answer in plaintext SMTP.
    let mut leftover = Vec::new();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(3), c.read_line())
        .await
        .ok()
        .flatten()
    {
        leftover.extend_from_slice(line.as_bytes());
    }
    assert!(
        !String::from_utf8_lossy(&leftover).contains("250"),
        "postern answered plaintext after STARTTLS: {}",
        show(&leftover)
    );
    assert!(!contains(&backend.all_received(), b"evil"));
}

#[test]
fn openssl_s_client_starttls_session() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let plain = plain_response(common::postern::USER, PASSWORD);
    let script = format!(
        "EHLO client.test\r\nAUTH PLAIN {plain}\r\nMAIL FROM:<ossl@client.test>\r\n\
         RCPT TO:<b@backend.test>\r\nDATA\r\nSubject: s_client\r\n\r\nvia openssl\r\n.\r\nQUIT\r\n"
    );
    let out = s_client(&postern, Listener::StartTls, script.as_bytes());
    out.assert_success("openssl s_client -starttls smtp");
    assert!(out.stdout.contains("235 2.7.0"), "{out}");
    assert!(out.stdout.contains("250 2.0.0 Ok: queued"), "{out}");
    assert!(out.stdout.contains("221"), "{out}");
    let s = backend.session_with_messages(1);
    assert_eq!(
        s.messages[0],
        b"Subject: s_client\r\n\r\nvia openssl\r\n".to_vec()
    );
    assert!(
        s.received.starts_with(b"EHLO client.test\r\n"),
        "{}",
        show(&s.received)
    );
}

#[tokio::test]
async fn idle_client_is_dropped_after_command_timeout() {
    let backend = RawBackend::start();
    let postern = Postern::builder(backend.addr)
        .flag("--command-timeout", "1s")
        .start();
    let mut c = postern.plain().await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    // Whatever postern says on the way out (a 421 is polite), it must close.
    let start = std::time::Instant::now();
    while c.read_line().await.is_some() {}
    assert!(start.elapsed() < Duration::from_secs(10));
}
