//! Telling the backend who the client really is: XCLIENT (`--xclient`), PROXY protocol
//! to the backend (`--backend-proxy-protocol`) and from a load balancer
//! (`--proxy-protocol --proxy-protocol-from`).

use crate::common;

use common::postern::USER;
use common::raw_backend::PROXY_V2_SIGNATURE;
use common::*;

const XCLIENT_CAPS: &[&str] = &[
    "PIPELINING",
    "XCLIENT NAME ADDR PORT PROTO HELO LOGIN",
    "8BITMIME",
];

/// The backend's first connection that carried a MAIL for `tag`.
fn session_for(backend: &RawBackend, tag: &str) -> Vec<u8> {
    backend
        .session_containing(format!("MAIL FROM:<{tag}@client.test>").as_bytes())
        .received
}

#[tokio::test]
async fn xclient_carries_address_helo_and_login() {
    let backend = RawBackend::with_capabilities(XCLIENT_CAPS);
    let postern = Postern::builder(backend.addr)
        .flag("--xclient", "true")
        .start();
    let mut c = postern.authenticated(true).await;
    c.cmd("MAIL FROM:<x@client.test>", "250").await;
    c.cmd("QUIT", "221").await;
    let received = session_for(&backend, "x");
    let text = String::from_utf8_lossy(&received);
    let lines: Vec<&str> = text.split("\r\n").collect();
    assert_eq!(lines[0], "EHLO client.test", "{text}");
    let xclient: Vec<&&str> = lines.iter().filter(|l| l.starts_with("XCLIENT ")).collect();
    assert!(!xclient.is_empty(), "no XCLIENT sent: {text}");
    let all = xclient
        .iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    for attr in [
        "ADDR=127.0.0.1",
        "HELO=client.test",
        &format!("LOGIN={USER}"),
        "PROTO=ESMTP",
    ] {
        assert!(all.contains(attr), "{attr} missing: {text}");
    }
    // After XCLIENT's fresh 220, EHLO again, then the client's bytes verbatim.
    let mail = text.find("MAIL FROM:<x@client.test>").unwrap();
    let last_xclient = text.rfind("XCLIENT ").unwrap();
    assert!(
        text[last_xclient..mail].contains("\r\nEHLO client.test\r\n"),
        "no EHLO between XCLIENT and MAIL: {text}"
    );
    assert!(
        text.ends_with("MAIL FROM:<x@client.test>\r\nQUIT\r\n"),
        "{text}"
    );
}

#[tokio::test]
async fn no_xclient_unless_asked_or_offered() {
    // Offered but not enabled.
    let backend = RawBackend::with_capabilities(XCLIENT_CAPS);
    let postern = Postern::start(backend.addr);
    let mut c = postern.authenticated(true).await;
    c.cmd("MAIL FROM:<off@client.test>", "250").await;
    assert!(!contains(&session_for(&backend, "off"), b"XCLIENT"));

    // Enabled but not offered.
    let backend = RawBackend::start();
    let postern = Postern::builder(backend.addr)
        .flag("--xclient", "true")
        .start();
    let mut c = postern.authenticated(true).await;
    c.cmd("MAIL FROM:<none@client.test>", "250").await;
    assert!(!contains(&session_for(&backend, "none"), b"XCLIENT"));
}

#[tokio::test]
async fn backend_proxy_protocol_v1_header_comes_first() {
    let backend = RawBackend::start();
    let postern = Postern::builder(backend.addr)
        .flag("--backend-proxy-protocol", "v1")
        .start();
    let mut c = postern.authenticated(false).await;
    c.cmd("MAIL FROM:<p1@client.test>", "250").await;
    let received = session_for(&backend, "p1");
    let text = String::from_utf8_lossy(&received);
    assert!(
        text.starts_with("PROXY TCP4 127.0.0.1 127.0.0.1 "),
        "{text}"
    );
    let header_end = text.find("\r\n").unwrap() + 2;
    assert!(
        text[header_end..].starts_with("EHLO client.test\r\n"),
        "{text}"
    );
    // The header names postern's listener as the destination.
    let fields: Vec<&str> = text[..header_end - 2].split(' ').collect();
    assert_eq!(fields.len(), 6, "{text}");
    assert_eq!(fields[5], postern.smtp.port().to_string(), "{text}");
}

#[tokio::test]
async fn backend_proxy_protocol_v2_header_comes_first() {
    let backend = RawBackend::start();
    let postern = Postern::builder(backend.addr)
        .flag("--backend-proxy-protocol", "v2")
        .start();
    let mut c = postern.authenticated(true).await;
    c.cmd("MAIL FROM:<p2@client.test>", "250").await;
    let received = session_for(&backend, "p2");
    assert!(
        received.starts_with(PROXY_V2_SIGNATURE),
        "{}",
        show(&received)
    );
    assert_eq!(received[12], 0x21, "v2 PROXY command");
    assert_eq!(received[13], 0x11, "TCP over IPv4");
    let len = u16::from_be_bytes([received[14], received[15]]) as usize;
    assert!(len >= 12);
    assert_eq!(&received[16..20], &[127, 0, 0, 1], "source address");
    let dst_port = u16::from_be_bytes([received[26], received[27]]);
    assert_eq!(dst_port, postern.smtps.port());
    assert!(received[16 + len..].starts_with(b"EHLO client.test\r\n"));
}

/// A load balancer in front of postern sends PROXY v1; with XCLIENT the backend learns
/// the address the load balancer saw, not the load balancer's.
#[tokio::test]
async fn inbound_proxy_header_is_believed_from_trusted_networks() {
    let backend = RawBackend::with_capabilities(XCLIENT_CAPS);
    let postern = Postern::builder(backend.addr)
        .flag("--proxy-protocol", "true")
        .flag("--proxy-protocol-from", "127.0.0.0/8")
        .flag("--xclient", "true")
        .start();
    let mut c = SmtpClient::connect(postern.smtps).await;
    c.send(
        format!(
            "PROXY TCP4 203.0.113.7 127.0.0.1 40000 {}\r\n",
            postern.smtps.port()
        )
        .as_bytes(),
    )
    .await;
    c.upgrade(postern.tls_config()).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    c.auth_plain(USER, PASSWORD, "235").await;
    c.cmd("MAIL FROM:<lb@client.test>", "250").await;
    let text = String::from_utf8_lossy(&session_for(&backend, "lb")).into_owned();
    assert!(text.contains("ADDR=203.0.113.7"), "{text}");
}

#[tokio::test]
async fn inbound_proxy_header_is_required_and_only_from_trusted_networks() {
    let backend = RawBackend::start();
    // Trusted: 127.0.0.0/8, but no header sent: postern must not greet.
    let postern = Postern::builder(backend.addr)
        .flag("--proxy-protocol", "true")
        .flag("--proxy-protocol-from", "127.0.0.0/8")
        .start();
    let mut c = postern.plain().await;
    c.send(b"EHLO client.test\r\n").await;
    let mut got = String::new();
    while let Some(l) = c.read_line().await {
        got.push_str(&l);
    }
    assert!(
        !got.contains("250"),
        "accepted SMTP without a PROXY header: {got}"
    );

    // Header from an untrusted network (we connect from 127.0.0.1): closed.
    let postern = Postern::builder(backend.addr)
        .flag("--proxy-protocol", "true")
        .flag("--proxy-protocol-from", "192.0.2.0/24")
        .start();
    let mut c = postern.plain().await;
    c.send(
        format!(
            "PROXY TCP4 203.0.113.7 127.0.0.1 40000 {}\r\n",
            postern.smtp.port()
        )
        .as_bytes(),
    )
    .await;
    let mut got = String::new();
    while let Some(l) = c.read_line().await {
        got.push_str(&l);
    }
    assert!(
        !got.contains("220"),
        "greeted a PROXY header from an untrusted peer: {got}"
    );
}
