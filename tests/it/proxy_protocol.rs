//! PROXY protocol: from real HAProxy (`send-proxy`, `send-proxy-v2`) into postern, and
//! from postern (`--backend-proxy-protocol v1|v2`) into a real Postfix with
//! `smtpd_upstream_proxy_protocol = haproxy`. The client connects from 127.0.0.2 (or
//! [::1] with its own port), so its address is told apart from every hop's own.

use crate::common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::haproxy::{Haproxy, Route};
use common::postern::{Postern, USER, json_lines, log_field as field, log_message, span_field};
use common::postfix::{self, Postfix, PostfixOptions};
use common::tools::SmtplibSession;
use common::{CLIENT_V4, PASSWORD, SmtpClient, V4, V6, free_addr, have, within_for};

const TRUSTED: &str = "127.0.0.1/32,::1/128";

fn tools(postfix: bool) -> bool {
    have("python3") && have("haproxy") && (!postfix || postfix::available())
}

/// PROXY v2 header for a TCP4 connection from `src` to `dst`.
fn v2_tcp4(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0x00, 12]);
    h.extend_from_slice(&src.0.octets());
    h.extend_from_slice(&dst.0.octets());
    h.extend_from_slice(&src.1.to_be_bytes());
    h.extend_from_slice(&dst.1.to_be_bytes());
    h
}

/// HAProxy in front of postern, postern's XCLIENT into Postfix: postern's log and
/// Postfix's both name the real client, for `send-proxy` and `send-proxy-v2`.
#[test]
fn haproxy_v1_and_v2_client_address_reaches_postern_logs_and_postfix_xclient() {
    if !tools(true) {
        return;
    }
    let postfix = Postfix::start(PostfixOptions::default());
    let mut postern = postfix::postern(postfix.addr(V4))
        .flag("--xclient", "true")
        .flag("--proxy-protocol", "true")
        .flag("--proxy-protocol-from", TRUSTED)
        .wait_for_backend()
        .start();
    let listen = postern.addr("--listen");
    let haproxy = Haproxy::start(&[
        Route {
            ip: V4,
            server: listen,
            option: "send-proxy",
        },
        Route {
            ip: V4,
            server: listen,
            option: "send-proxy-v2",
        },
    ]);
    for frontend in haproxy.frontends.clone() {
        let run = SmtplibSession::new(frontend)
            .from(CLIENT_V4)
            .starttls()
            .login(USER, PASSWORD)
            .rcpt("someone@outside.example")
            .run();
        assert_eq!(run.code("auth"), Some(235), "{}", run.raw);
        assert_eq!(run.rcpt_codes(), [250], "{}", run.raw);
        assert_eq!(run.code("data"), Some(250), "{}", run.raw);
        let client = run.local();
        assert_eq!(client.ip(), CLIENT_V4);

        let closed = postern.wait_session_closed(client);
        assert_eq!(field(&closed, "result"), "relayed", "{closed}");
        assert_eq!(field(&closed, "user"), USER, "{closed}");

        let lines = postfix.session_lines("127.0.0.2", client.port()).join("\n");
        assert!(
            lines.contains(&format!(
                "client=unknown[127.0.0.2]:{}, sasl_method=XCLIENT, sasl_username={USER}",
                client.port()
            )),
            "{lines}"
        );
    }
}

/// HAProxy on [::1] in front of postern on [::1].
#[test]
fn haproxy_over_ipv6_client_address_reaches_postern_logs() {
    if !tools(true) {
        return;
    }
    let postfix = Postfix::start(PostfixOptions::default());
    let mut postern = postfix::postern(postfix.addr(V6))
        .on_ipv6_loopback()
        .flag("--xclient", "true")
        .flag("--proxy-protocol", "true")
        .flag("--proxy-protocol-from", TRUSTED)
        .wait_for_backend()
        .start();
    let haproxy = Haproxy::start(&[Route {
        ip: V6,
        server: postern.addr("--listen"),
        option: "send-proxy-v2",
    }]);
    let run = SmtplibSession::new(haproxy.frontends[0])
        .from(V6)
        .starttls()
        .login(USER, PASSWORD)
        .rcpt("someone@outside.example")
        .run();
    assert_eq!(run.code("auth"), Some(235), "{}", run.raw);
    assert_eq!(run.rcpt_codes(), [250], "{}", run.raw);
    let client = run.local();
    let closed = postern.wait_session_closed(client);
    assert_eq!(field(&closed, "result"), "relayed", "{closed}");
    let lines = postfix.session_lines("::1", client.port()).join("\n");
    assert!(
        lines.contains(&format!("client=unknown[::1]:{}", client.port())),
        "{lines}"
    );
}

/// `--backend-proxy-protocol v1|v2` into Postfix's `smtpd_upstream_proxy_protocol =
/// haproxy` service: Postfix's `connect from` names the real client, over IPv4 and
/// IPv6, and the message is accepted.
#[test]
fn backend_proxy_protocol_v1_and_v2_into_postfix() {
    if !tools(true) {
        return;
    }
    let postfix = Postfix::start(PostfixOptions::default());
    // (version, postern's listener, backend address family, client, as Postfix logs it)
    for (version, ip, backend, source, logged) in [
        ("v1", V4, V4, CLIENT_V4, "127.0.0.2"),
        ("v2", V4, V4, CLIENT_V4, "127.0.0.2"),
        ("v1", V6, V6, V6, "::1"),
        ("v2", V6, V6, V6, "::1"),
        // An IPv4 client to an IPv6 backend: sent as IPv4-mapped IPv6.
        ("v1", V4, V6, CLIENT_V4, "127.0.0.2"),
        ("v2", V4, V6, CLIENT_V4, "127.0.0.2"),
    ] {
        let mut builder = postfix::postern(postfix.proxy_addr(backend))
            .flag("--backend-proxy-protocol", version)
            .wait_for_backend();
        if ip == V6 {
            builder = builder.on_ipv6_loopback();
        }
        let postern = builder.start();
        let run = SmtplibSession::new(postern.addr("--listen"))
            .from(source)
            .starttls()
            .login(USER, PASSWORD)
            .rcpt("someone@local.test")
            .run();
        assert_eq!(run.code("auth"), Some(235), "{version} {ip}: {}", run.raw);
        assert_eq!(run.rcpt_codes(), [250], "{version} {ip}: {}", run.raw);
        assert_eq!(run.code("data"), Some(250), "{version} {ip}: {}", run.raw);
        let client = run.local();
        let lines = postfix.session_lines(logged, client.port()).join("\n");
        assert!(
            lines.contains(&format!("connect from unknown[{logged}]:{}", client.port())),
            "{version} {ip}: {lines}"
        );
        assert!(lines.contains("proxied/smtpd"), "{lines}");
        assert!(
            lines.contains(&format!("client=unknown[{logged}]")),
            "{lines}"
        );
    }
}

/// The whole chain: HAProxy → postern → Postfix, with PROXY on both hops and XCLIENT
/// (Postfix authorizes XCLIENT by the proxied address, so the client's network is listed).
#[test]
fn haproxy_postern_postfix_chain_with_proxy_both_ways_and_xclient() {
    if !tools(true) {
        return;
    }
    let postfix = Postfix::start(PostfixOptions {
        xclient_hosts: "127.0.0.0/8 [::1]".into(),
    });
    let postern = postfix::postern(postfix.proxy_addr(V4))
        .flag("--xclient", "true")
        .flag("--backend-proxy-protocol", "v2")
        .flag("--proxy-protocol", "true")
        .flag("--proxy-protocol-from", TRUSTED)
        .wait_for_backend()
        .start();
    let haproxy = Haproxy::start(&[Route {
        ip: V4,
        server: postern.addr("--listen"),
        option: "send-proxy",
    }]);
    let run = SmtplibSession::new(haproxy.frontends[0])
        .from(CLIENT_V4)
        .starttls()
        .login(USER, PASSWORD)
        .rcpt("someone@outside.example")
        .run();
    assert_eq!(run.code("auth"), Some(235), "{}", run.raw);
    assert_eq!(run.rcpt_codes(), [250], "{}", run.raw);
    let client = run.local();
    let lines = postfix.session_lines("127.0.0.2", client.port()).join("\n");
    assert!(
        lines.contains(&format!(
            "connect from unknown[127.0.0.2]:{}",
            client.port()
        )),
        "{lines}"
    );
    assert!(
        lines.contains(&format!(
            "client=unknown[127.0.0.2]:{}, sasl_method=XCLIENT, sasl_username={USER}",
            client.port()
        )),
        "{lines}"
    );
}

/// postern expecting a PROXY header from `from`, in front of a backend that is not
/// there (nothing here gets as far as the backend).
fn postern_expecting_proxy(from: &str, extra: &[(&str, &str)]) -> Postern {
    let mut builder = postfix::postern(free_addr())
        .flag("--proxy-protocol", "true")
        .flag("--proxy-protocol-from", from);
    for (name, value) in extra {
        builder = builder.flag(name, *value);
    }
    builder.start()
}

/// Asserts the connection is closed without a byte of greeting within `limit`.
async fn closed_silently(client: &mut SmtpClient, limit: Duration, what: &str) {
    within_for(
        limit,
        &format!("{what}: the connection to close"),
        client.expect_closed(),
    )
    .await;
}

#[tokio::test]
async fn proxy_header_from_an_unlisted_source_is_refused() {
    let postern = postern_expecting_proxy("192.0.2.0/24", &[]);
    let mut client = postern.plain().await;
    client
        .send(b"PROXY TCP4 192.0.2.9 127.0.0.1 40000 25\r\n")
        .await;
    closed_silently(&mut client, Duration::from_secs(3), "unlisted source").await;
}

#[tokio::test]
async fn malformed_oversized_or_missing_headers_close_without_a_greeting() {
    let postern = postern_expecting_proxy(TRUSTED, &[]);
    let addr = postern.addr("--listen");
    let mut oversized_v1 = b"PROXY TCP4 ".to_vec();
    oversized_v1.resize(200, b'1');
    let mut oversized_v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    oversized_v2.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    oversized_v2.resize(2000, 0);
    let cases: [(&str, &[u8]); 6] = [
        ("SMTP instead of PROXY", b"EHLO client.example\r\n"),
        ("bad v1 address", b"PROXY TCP4 300.1.1.1 127.0.0.1 1 25\r\n"),
        ("v1 without CRLF in 107 bytes", &oversized_v1),
        ("v2 longer than allowed", &oversized_v2),
        (
            "TLS ClientHello",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ),
        ("QUIT instead of PROXY", b"QUIT\r\n"),
    ];
    for (what, bytes) in cases {
        let mut client = SmtpClient::connect(addr).await;
        client.send(bytes).await;
        closed_silently(&mut client, Duration::from_secs(3), what).await;
    }

    // Nothing at all: closed after the header timeout (a few seconds), still silent.
    let started = Instant::now();
    let mut client = SmtpClient::connect(addr).await;
    closed_silently(&mut client, Duration::from_secs(15), "no header").await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited <= Duration::from_secs(10),
        "closed after {waited:?}"
    );
}

/// v2 LOCAL (a load balancer's health check) and v1 UNKNOWN keep the TCP peer address.
#[tokio::test]
async fn v2_local_and_v1_unknown_keep_the_peer_address() {
    let mut postern = postern_expecting_proxy(TRUSTED, &[]);
    let mut local_v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local_v2.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    for header in [local_v2, b"PROXY UNKNOWN\r\n".to_vec()] {
        let mut client = postern.plain().await;
        let me = client.local_addr();
        client.send(&header).await;
        client.expect("220 postern.test").await;
        client.cmd("EHLO health.example", "250").await;
        client.cmd("QUIT", "221").await;
        let closed = postern.wait_session_closed(me);
        assert_eq!(field(&closed, "result"), "quit", "{closed}");
    }
}

/// The header's source is the client address for the per-IP connection limit.
#[tokio::test]
async fn per_ip_limit_counts_the_address_from_the_header() {
    let mut postern = postern_expecting_proxy(TRUSTED, &[("--max-connections-per-ip", "1")]);
    let addr = postern.addr("--listen");
    let dst = (Ipv4Addr::LOCALHOST, addr.port());
    let a = Ipv4Addr::new(192, 0, 2, 10);
    let b = Ipv4Addr::new(192, 0, 2, 11);

    let mut first = SmtpClient::connect(addr).await;
    first.send(&v2_tcp4((a, 40001), dst)).await;
    first.expect("220 ").await;

    // Same header source, different TCP source port: over the limit.
    let mut second = SmtpClient::connect(addr).await;
    second.send(&v2_tcp4((a, 40002), dst)).await;
    second.expect("421 4.7.0").await;

    // Another header source from the same TCP peer: its own budget.
    let mut third = SmtpClient::connect(addr).await;
    third
        .send(b"PROXY TCP4 192.0.2.11 127.0.0.1 40003 25\r\n")
        .await;
    third.expect("220 ").await;
    third.cmd("QUIT", "221").await;
    let closed = postern.wait_session_closed(SocketAddr::new(IpAddr::V4(b), 40003));
    assert_eq!(field(&closed, "result"), "quit", "{closed}");
    drop(first);
}

/// HAProxy's own health checks with `check-send-proxy` on a `send-proxy-v2` server
/// (PROXY v2 LOCAL): postern greets them and logs HAProxy's own address as the peer.
#[test]
fn haproxy_v2_health_checks_are_served_with_the_peer_address() {
    if !tools(false) {
        return;
    }
    let mut postern = postern_expecting_proxy(TRUSTED, &[]);
    let haproxy = Haproxy::start(&[Route {
        ip: V4,
        server: postern.addr("--listen"),
        option: "send-proxy-v2 check check-send-proxy inter 300ms\n    option smtpchk EHLO haproxy.test",
    }]);
    let checks = postern.wait_log("three HAProxy health checks", |text| {
        let quits: Vec<serde_json::Value> = json_lines(text)
            .filter(|v| log_message(v) == "session closed")
            .filter(|v| field(v, "result") == "quit")
            .collect();
        (quits.len() >= 3).then_some(quits)
    });
    for check in checks {
        let peer: SocketAddr = span_field(&check, "peer").parse().expect("peer");
        assert_eq!(peer.ip(), V4, "{check}");
    }
    assert!(
        !haproxy.log_text().contains("DOWN"),
        "{}",
        haproxy.log_text()
    );
}
