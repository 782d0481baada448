//! The `--listen-tls` port: RFC 8314 implicit TLS.

use crate::common;

use std::time::Duration;

use common::postern::HOSTNAME;
use common::tools::{Listener, lettre_message, lettre_send, lettre_transport, s_client, swaks};
use common::*;
use lettre::transport::smtp::authentication::Mechanism;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn greeting_and_ehlo_over_tls() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = SmtpClient::connect_tls(postern.smtps, postern.tls_config()).await;
    let greeting = c.expect("220").await;
    assert!(
        greeting
            .last()
            .starts_with(&format!("220 {HOSTNAME} ESMTP")),
        "{}",
        greeting.raw
    );
    let ehlo = c.cmd("EHLO client.test", "250").await;
    assert!(!ehlo.has_keyword("STARTTLS"), "{}", ehlo.raw);
    assert!(
        ehlo.lines.iter().any(|l| l == "AUTH PLAIN LOGIN CRAM-MD5"),
        "{}",
        ehlo.raw
    );
    assert!(ehlo.lines.iter().any(|l| l == "8BITMIME"), "{}", ehlo.raw);
    c.cmd(
        "MAIL FROM:<a@client.test>",
        "530 5.7.0 Authentication required",
    )
    .await;
    let r = c.cmd("STARTTLS", "5").await;
    assert!(r.code >= 500, "STARTTLS inside implicit TLS: {}", r.raw);
    c.auth_plain(common::postern::USER, PASSWORD, "235 2.7.0")
        .await;
    c.cmd("MAIL FROM:<a@client.test>", "250").await;
    c.cmd("QUIT", "221").await;
}

#[tokio::test]
async fn plaintext_smtp_on_the_tls_port_gets_no_smtp() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut s = within("connect", TcpStream::connect(postern.smtps))
        .await
        .unwrap();
    within("write", s.write_all(b"EHLO client.test\r\n"))
        .await
        .unwrap();
    let mut got = Vec::new();
    // postern must close (bad ClientHello) without ever speaking plaintext SMTP.
    let _ = within("postern to close", s.read_to_end(&mut got)).await;
    assert!(
        !String::from_utf8_lossy(&got).contains("220"),
        "plaintext SMTP on the implicit-TLS port: {}",
        show(&got)
    );
}

#[tokio::test]
async fn stalled_handshake_is_dropped_after_tls_handshake_timeout() {
    let backend = RawBackend::start();
    let postern = Postern::builder(backend.addr)
        .flag("--tls-handshake-timeout", "1s")
        .start();
    let mut s = within("connect", TcpStream::connect(postern.smtps))
        .await
        .unwrap();
    let start = std::time::Instant::now();
    let mut got = Vec::new();
    let _ = within("postern to close", s.read_to_end(&mut got)).await;
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn swaks_tls_on_connect() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let out = swaks(
        &postern,
        Listener::Implicit,
        &[
            "--auth",
            "PLAIN",
            "--auth-user",
            common::postern::USER,
            "--auth-password",
            PASSWORD,
        ],
    );
    out.assert_success("swaks --tlsc");
    let s = backend.session_with_messages(1);
    assert!(contains(&s.received, b"MAIL FROM:<sender@client.test>"));
}

#[test]
fn smtplib_smtp_ssl() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let msg = b"Subject: smtplib over SMTP_SSL\r\n\r\nbody\r\n";
    let out = common::tools::smtplib(
        &postern,
        Listener::Implicit,
        common::postern::USER,
        PASSWORD,
        "PLAIN",
        msg,
    );
    out.assert_success("smtplib SMTP_SSL");
    assert!(!out.stdout.contains("'starttls'"), "{out}");
    let s = backend.session_with_messages(1);
    assert_eq!(s.messages[0], msg.to_vec());
}

#[test]
fn openssl_s_client_implicit_session() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let plain = plain_response(common::postern::USER, PASSWORD);
    let script = format!(
        "EHLO client.test\r\nAUTH PLAIN {plain}\r\nMAIL FROM:<ossl@client.test>\r\n\
         RCPT TO:<b@backend.test>\r\nDATA\r\nSubject: implicit\r\n\r\nhi\r\n.\r\nQUIT\r\n"
    );
    let out = s_client(&postern, Listener::Implicit, script.as_bytes());
    out.assert_success("openssl s_client");
    assert!(out.stdout.starts_with("220 "), "{out}");
    assert!(out.stdout.contains("235 2.7.0"), "{out}");
    let s = backend.session_with_messages(1);
    assert_eq!(s.messages[0], b"Subject: implicit\r\n\r\nhi\r\n".to_vec());
}

#[tokio::test]
async fn lettre_wrapper_tls_with_login() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let transport = lettre_transport(
        &postern,
        Listener::Implicit,
        common::postern::USER,
        PASSWORD,
        Mechanism::Login,
    );
    let response = lettre_send(&transport, lettre_message("lettre implicit", "hello"))
        .await
        .expect("lettre over implicit TLS");
    assert!(response.is_positive());
    let s = backend.session_with_messages(1);
    assert!(contains(&s.messages[0], b"Subject: lettre implicit"));
}
