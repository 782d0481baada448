//! The `--listen-mx` port (port 25 style): TLS and AUTH offered, neither required; an
//! anonymous session is handed to the backend at its first MAIL.

mod common;

use common::postern::USER;
use common::*;

fn with_mx(backend: &RawBackend) -> (Postern, std::net::SocketAddr) {
    let mx = free_addr();
    let postern = Postern::builder(backend.addr)
        .flag("--listen-mx", mx.to_string())
        .start();
    wait_until(STEP, "MX listener to accept", || accepts(mx).then_some(()));
    (postern, mx)
}

#[tokio::test]
async fn anonymous_plaintext_mail_is_relayed_verbatim() {
    let backend = RawBackend::start();
    let (_postern, mx) = with_mx(&backend);
    let mut c = SmtpClient::connect(mx).await;
    c.expect("220").await;
    let ehlo = c.cmd("EHLO client.test", "250").await;
    assert!(ehlo.has_keyword("STARTTLS"), "{}", ehlo.raw);
    let after = b"MAIL FROM:<mx@remote.test>\r\nRCPT TO:<b@backend.test>\r\nDATA\r\nSubject: mx\r\n\r\n\xe9..\r\n.\r\nQUIT\r\n";
    c.send(after).await;
    for code in ["250", "250", "354", "250", "221"] {
        c.expect(code).await;
    }
    let s = backend.session_with_messages(1);
    assert!(
        s.received.starts_with(b"EHLO client.test\r\n"),
        "{}",
        show(&s.received)
    );
    assert!(s.received.ends_with(after), "{}", show(&s.received));
}

#[tokio::test]
async fn starttls_and_auth_still_work_on_mx() {
    let backend = RawBackend::start();
    let (postern, mx) = with_mx(&backend);
    let (mut c, ehlo) = SmtpClient::connect_starttls(mx, postern.tls_config()).await;
    assert!(!ehlo.has_keyword("STARTTLS"), "{}", ehlo.raw);
    assert!(ehlo.has_keyword("AUTH"), "{}", ehlo.raw);
    c.auth_plain(USER, PASSWORD, "235").await;
    c.cmd("MAIL FROM:<authed@client.test>", "250").await;
    c.cmd("QUIT", "221").await;

    // Anonymous after STARTTLS too.
    let (mut c, _) = SmtpClient::connect_starttls(mx, postern.tls_config()).await;
    c.cmd("MAIL FROM:<anon@remote.test>", "250").await;
    c.cmd("QUIT", "221").await;
    backend.session_containing(b"MAIL FROM:<anon@remote.test>");
}

#[tokio::test]
async fn submission_ports_still_require_auth_when_mx_is_on() {
    let backend = RawBackend::start();
    let (postern, _mx) = with_mx(&backend);
    let (mut c, _) = postern.implicit().await;
    c.cmd("MAIL FROM:<a@client.test>", "530 5.7.0").await;
}
