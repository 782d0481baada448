//! After `235`: the backend connection, the replayed EHLO, byte-exact relaying both
//! ways, pipelining across the AUTH boundary, and the backend failing.

use crate::common;

use std::time::{Duration, Instant};

use common::postern::USER;
use common::*;

/// A message body exercising what a relay must not touch: 8-bit bytes (Latin-1 and
/// UTF-8), dot-stuffed lines, a bare LF and CR, trailing spaces, a long line.
fn tricky_body() -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(
        b"Subject: =?utf-8?q?caf=C3=A9?=\r\nContent-Type: text/plain; charset=utf-8\r\n",
    );
    m.extend_from_slice(b"Content-Transfer-Encoding: 8bit\r\n\r\n");
    m.extend_from_slice("caf\u{e9} \u{1F4EC} na\u{ef}ve\r\n".as_bytes());
    m.extend_from_slice(b"latin-1: \xe9\xe8\xff\x80\r\n");
    m.extend_from_slice(b"..a dot-stuffed line\r\n");
    m.extend_from_slice(b"..\r\n");
    m.extend_from_slice(b"...\r\n");
    m.extend_from_slice(b"bare\nlf and bare\rcr\r\n");
    m.extend_from_slice(b"trailing spaces   \r\n");
    m.extend_from_slice(&[b'x'; 998]);
    m.extend_from_slice(b"\r\n");
    m.extend_from_slice(b"\r\n");
    m
}

/// `size` bytes of CRLF lines with dot-stuffed and 8-bit lines mixed in.
fn big_body(size: usize) -> Vec<u8> {
    let mut m = b"Subject: big\r\n\r\n".to_vec();
    let mut i = 0u64;
    while m.len() < size {
        match i % 7 {
            0 => m.extend_from_slice(format!("..line {i} starts with a dot\r\n").as_bytes()),
            3 => {
                m.extend_from_slice(format!("line {i} \u{e9}\u{e8} utf-8, latin-1 ").as_bytes());
                m.extend_from_slice(b"\xe9\xff\x80\r\n");
            }
            _ => m.extend_from_slice(
                format!(
                    "line {i:08} abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ\r\n"
                )
                .as_bytes(),
            ),
        }
        i += 1;
    }
    m
}

/// The bytes the backend received after postern's replayed EHLO line.
fn after_ehlo(received: &[u8]) -> &[u8] {
    assert!(
        received.starts_with(b"EHLO client.test\r\n"),
        "postern must replay the client's EHLO first: {}",
        show(received)
    );
    &received[b"EHLO client.test\r\n".len()..]
}

#[tokio::test]
async fn bytes_after_auth_arrive_exactly() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = postern.authenticated(true).await;
    let mut sent = Vec::new();
    for (line, reply) in [
        ("MAIL FROM:<a@client.test> BODY=8BITMIME", "250 2.1.0 Ok"),
        ("RCPT TO:<b@backend.test>", "250 2.1.5 Ok"),
        ("DATA", "354 End data"),
    ] {
        c.cmd(line, reply).await;
        sent.extend_from_slice(format!("{line}\r\n").as_bytes());
    }
    let body = tricky_body();
    let mut data = body.clone();
    data.extend_from_slice(b".\r\n");
    c.send(&data).await;
    sent.extend_from_slice(&data);
    // The backend's reply comes back verbatim.
    let r = c.expect("250").await;
    assert_eq!(r.raw, "250 2.0.0 Ok: queued\r\n");
    c.line("QUIT").await;
    sent.extend_from_slice(b"QUIT\r\n");
    assert_eq!(c.expect("221").await.raw, "221 2.0.0 Bye\r\n");
    c.expect_closed().await;

    let s = backend.session_with_messages(1);
    assert_eq!(s.messages[0], body, "message body altered in transit");
    let relayed = after_ehlo(&s.received);
    assert_eq!(show(relayed), show(&sent));
    assert_eq!(relayed, &sent[..]);
    // No credentials leak to the backend.
    assert!(!contains(&s.received, b"AUTH"), "{}", show(&s.received));
}

#[tokio::test]
async fn five_mib_message_arrives_exactly() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = postern.authenticated(false).await;
    c.cmd("MAIL FROM:<big@client.test> SIZE=5242880", "250")
        .await;
    c.cmd("RCPT TO:<b@backend.test>", "250").await;
    c.cmd("DATA", "354").await;
    let body = big_body(5 * 1024 * 1024);
    let start = Instant::now();
    let mut data = body.clone();
    data.extend_from_slice(b".\r\n");
    c.send(&data).await;
    c.expect("250 2.0.0").await;
    c.cmd("QUIT", "221").await;
    let s = backend.session_with_messages(1);
    assert_eq!(s.messages[0].len(), body.len());
    assert!(s.messages[0] == body, "5 MiB body altered in transit");
    eprintln!("5 MiB relayed in {:?}", start.elapsed());
}

/// Bytes pipelined after the AUTH line in the same write go to the backend first
/// (RFC 4954 forbids pipelining AUTH with what follows, but postern must not lose them).
#[tokio::test]
async fn mail_pipelined_after_auth_reaches_backend() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let (mut c, _) = postern.implicit().await;
    let ir = plain_response(USER, PASSWORD);
    c.send(format!("AUTH PLAIN {ir}\r\nMAIL FROM:<a@b>\r\n").as_bytes())
        .await;
    c.expect("235 2.7.0").await;
    c.expect("250 2.1.0").await;
    c.cmd("QUIT", "221").await;
    let s = backend.session_containing(b"MAIL FROM:<a@b>");
    assert_eq!(after_ehlo(&s.received), b"MAIL FROM:<a@b>\r\nQUIT\r\n");
}

#[tokio::test]
async fn whole_transaction_pipelined_after_auth() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let (mut c, _) = postern.starttls().await;
    let ir = plain_response(USER, PASSWORD);
    let after = b"MAIL FROM:<p@client.test>\r\nRCPT TO:<b@backend.test>\r\nDATA\r\n\
Subject: pipelined\r\n\r\n..dot\r\n.\r\nQUIT\r\n";
    let mut all = format!("AUTH PLAIN {ir}\r\n").into_bytes();
    all.extend_from_slice(after);
    c.send(&all).await;
    for code in ["235", "250", "250", "354", "250", "221"] {
        c.expect(code).await;
    }
    c.expect_closed().await;
    let s = backend.session_with_messages(1);
    assert_eq!(
        s.messages[0],
        b"Subject: pipelined\r\n\r\n..dot\r\n".to_vec()
    );
    assert_eq!(after_ehlo(&s.received), &after[..]);
}

#[tokio::test]
async fn several_messages_in_one_session() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = postern.authenticated(true).await;
    for i in 0..3 {
        c.cmd(&format!("MAIL FROM:<m{i}@client.test>"), "250").await;
        c.cmd("RCPT TO:<b@backend.test>", "250").await;
        c.cmd("DATA", "354").await;
        c.send(format!("Subject: {i}\r\n\r\nmessage {i}\r\n.\r\n").as_bytes())
            .await;
        c.expect("250").await;
        c.cmd("RSET", "250").await;
    }
    c.cmd("QUIT", "221").await;
    let s = backend.session_with_messages(3);
    assert_eq!(s.messages[2], b"Subject: 2\r\n\r\nmessage 2\r\n".to_vec());
}

/// Backend advertises AUTH, STARTTLS, XCLIENT, XFORWARD: none of those may reach the
/// client; SIZE and 8BITMIME pass verbatim.
#[tokio::test]
async fn ehlo_rewrite_hides_backend_auth_starttls_xclient() {
    let backend = RawBackend::with_capabilities(&[
        "PIPELINING",
        "AUTH PLAIN",
        "AUTH=PLAIN",
        "STARTTLS",
        "XCLIENT NAME ADDR PROTO HELO",
        "XFORWARD NAME ADDR PROTO HELO",
        "SIZE 1000000",
        "8BITMIME",
        "X-CUSTOM-EXT foo",
    ]);
    let postern = Postern::start(backend.addr);

    let mut c = postern.plain().await;
    c.expect("220").await;
    let pre = c.cmd("EHLO client.test", "250").await;
    let expect_kept = ["PIPELINING", "SIZE 1000000", "8BITMIME", "X-CUSTOM-EXT foo"];
    for kept in expect_kept {
        assert!(pre.lines.iter().any(|l| l == kept), "{kept}: {}", pre.raw);
    }
    assert_eq!(
        pre.lines
            .iter()
            .filter(|l| l.eq_ignore_ascii_case("STARTTLS"))
            .count(),
        1,
        "exactly one STARTTLS (postern's): {}",
        pre.raw
    );
    for gone in ["AUTH", "XCLIENT", "XFORWARD"] {
        assert!(
            !pre.has_keyword(gone),
            "{gone} leaked before TLS: {}",
            pre.raw
        );
    }

    let (_c, post) = postern.starttls().await;
    for kept in expect_kept {
        assert!(post.lines.iter().any(|l| l == kept), "{kept}: {}", post.raw);
    }
    assert!(!post.has_keyword("STARTTLS"), "{}", post.raw);
    assert!(!post.has_keyword("XCLIENT"), "{}", post.raw);
    assert!(!post.has_keyword("XFORWARD"), "{}", post.raw);
    let auth: Vec<&String> = post
        .lines
        .iter()
        .filter(|l| l.to_ascii_uppercase().starts_with("AUTH"))
        .collect();
    assert_eq!(auth, vec!["AUTH PLAIN LOGIN CRAM-MD5"], "{}", post.raw);

    let (_c, implicit) = postern.implicit().await;
    assert_eq!(
        implicit.lines[1..],
        post.lines[1..],
        "same EHLO on both listeners"
    );
}

#[tokio::test]
async fn backend_down_at_auth_time_gives_454() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    backend.set_fault(Fault::Refuse);
    let (mut c, _) = postern.implicit().await;
    c.auth_plain(USER, PASSWORD, "454 4.7.0").await;
    drop(c);

    // And it recovers when the backend is back.
    backend.set_fault(Fault::None);
    let mut c = postern.authenticated(true).await;
    c.cmd("MAIL FROM:<back@client.test>", "250").await;
}

#[tokio::test]
async fn backend_greeting_421_gives_454() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    backend.set_fault(Fault::Greet421);
    let (mut c, _) = postern.starttls().await;
    c.auth_plain(USER, PASSWORD, "454 4.7.0").await;
}

#[tokio::test]
async fn backend_closing_at_once_gives_454() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    backend.set_fault(Fault::Close);
    let (mut c, _) = postern.implicit().await;
    c.auth_plain(USER, PASSWORD, "454 4.7.0").await;
}

#[tokio::test]
async fn stalled_backend_gives_454_after_backend_timeout() {
    let backend = RawBackend::start();
    let postern = Postern::builder(backend.addr)
        .flag("--backend-timeout", "1s")
        .start();
    backend.set_fault(Fault::Stall);
    let (mut c, _) = postern.implicit().await;
    let start = Instant::now();
    c.auth_plain(USER, PASSWORD, "454 4.7.0").await;
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "--backend-timeout 1s took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn wrong_password_never_contacts_the_backend() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let (mut c, _) = postern.implicit().await;
    let before = backend.sessions().len();
    c.auth_plain(USER, "wrong", "535").await;
    c.cmd("QUIT", "221").await;
    let after: Vec<_> = backend.sessions().into_iter().skip(before).collect();
    assert!(
        after.iter().all(|s| !contains(&s.received, b"client.test")),
        "backend contacted for a failed AUTH"
    );
}

#[tokio::test]
async fn backend_closing_closes_the_client() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = postern.authenticated(true).await;
    // RawBackend answers QUIT with 221 and closes; postern must pass both on.
    c.cmd("QUIT", "221").await;
    c.expect_closed().await;
}

#[tokio::test]
async fn client_closing_closes_the_backend() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = postern.authenticated(true).await;
    c.cmd("MAIL FROM:<gone@client.test>", "250").await;
    c.shutdown().await;
    drop(c);
    wait_until(STEP, "backend connection to close", || {
        backend
            .sessions()
            .into_iter()
            .find(|s| contains(&s.received, b"gone@client.test") && s.closed)
    });
}

#[tokio::test]
async fn idle_relay_is_closed_after_relay_idle_timeout() {
    let backend = RawBackend::start();
    let postern = Postern::builder(backend.addr)
        .flag("--relay-idle-timeout", "1s")
        .start();
    let mut c = postern.authenticated(true).await;
    c.cmd("MAIL FROM:<idle@client.test>", "250").await;
    let start = Instant::now();
    while c.read_line().await.is_some() {}
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    wait_until(STEP, "backend side closed too", || {
        backend
            .sessions()
            .into_iter()
            .find(|s| contains(&s.received, b"idle@client.test") && s.closed)
    });
}

/// A backend that refuses a message mid-body and hangs up: postern's writes to it fail,
/// and the backend's last reply still reaches the client.
#[tokio::test]
async fn a_backend_that_hangs_up_mid_body_still_has_its_reply_relayed() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    backend.set_fault(Fault::RefuseBodyAndHangUp);
    let mut c = postern.authenticated(false).await;
    c.cmd("MAIL FROM:<big@client.test>", "250").await;
    c.cmd("RCPT TO:<b@backend.test>", "250").await;
    c.cmd("DATA", "354").await;
    let mut data = big_body(8 * 1024 * 1024);
    data.extend_from_slice(b".\r\n");
    c.send(&data).await;
    c.expect("552 5.3.4").await;
    c.expect_closed().await;
    assert!(backend.sessions().iter().all(|s| s.messages.is_empty()));
}
