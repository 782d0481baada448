//! PROXY protocol: from real HAProxy (`send-proxy`, `send-proxy-v2`) into postern, and
//! from postern (`--backend-proxy-protocol v1|v2`) into a real Postfix with
//! `smtpd_upstream_proxy_protocol = haproxy`. The client connects from 127.0.0.2 (or
//! [::1] with its own port), so its address is told apart from every hop's own.

mod support_issue5;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use support_issue5::postfix::{self, PostfixOptions};
use support_issue5::{
    CLIENT_V4, Haproxy, PASSWORD, Postern, PosternOptions, Postfix, Smtplib, USER, V4, V6, connect,
    field, free_addr, read_reply, read_until_close, send,
};

const TRUSTED: &str = "127.0.0.1/32,::1/128";

fn tools(postfix: bool) -> bool {
    support_issue5::have("python3")
        && support_issue5::have("haproxy")
        && (!postfix || postfix::available())
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
    let mut postern = Postern::start(
        PosternOptions::new(postfix.addr(V4))
            .listen("--listen", free_addr(V4))
            .arg("--xclient")
            .arg("--proxy-protocol")
            .arg("--proxy-protocol-from")
            .arg(TRUSTED),
    );
    let (fe_v1, fe_v2) = (free_addr(V4), free_addr(V4));
    let listen = postern.addr("--listen");
    let _haproxy = Haproxy::start(&[
        (fe_v1, listen, "send-proxy"),
        (fe_v2, listen, "send-proxy-v2"),
    ]);
    for frontend in [fe_v1, fe_v2] {
        let run = Smtplib::new(frontend)
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
    let mut postern = Postern::start(
        PosternOptions::new(postfix.addr(V6))
            .listen("--listen", free_addr(V6))
            .arg("--xclient")
            .arg("--proxy-protocol")
            .arg("--proxy-protocol-from")
            .arg(TRUSTED),
    );
    let fe = free_addr(V6);
    let _haproxy = Haproxy::start(&[(fe, postern.addr("--listen"), "send-proxy-v2")]);
    let run = Smtplib::new(fe)
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
        let postern = Postern::start(
            PosternOptions::new(postfix.proxy_addr(backend))
                .listen("--listen", free_addr(ip))
                .arg("--backend-proxy-protocol")
                .arg(version),
        );
        let run = Smtplib::new(postern.addr("--listen"))
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
    let postern = Postern::start(
        PosternOptions::new(postfix.proxy_addr(V4))
            .listen("--listen", free_addr(V4))
            .arg("--xclient")
            .arg("--backend-proxy-protocol")
            .arg("v2")
            .arg("--proxy-protocol")
            .arg("--proxy-protocol-from")
            .arg(TRUSTED),
    );
    let fe = free_addr(V4);
    let _haproxy = Haproxy::start(&[(fe, postern.addr("--listen"), "send-proxy")]);
    let run = Smtplib::new(fe)
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

fn postern_expecting_proxy(from: &str, extra: &[&str]) -> Postern {
    let mut options = PosternOptions::new(free_addr(V4))
        .listen("--listen", free_addr(V4))
        .arg("--proxy-protocol")
        .arg("--proxy-protocol-from")
        .arg(from);
    options.wait_backend = false;
    for a in extra {
        options = options.arg(a);
    }
    Postern::start(options)
}

/// Asserts the connection is closed without a byte of greeting within `limit`.
fn closed_silently(stream: &mut std::net::TcpStream, limit: Duration, what: &str) {
    let (got, closed) = read_until_close(stream, limit);
    assert!(closed, "{what}: still open after {limit:?}");
    assert!(
        got.is_empty(),
        "{what}: got {:?}",
        String::from_utf8_lossy(&got)
    );
}

#[test]
fn proxy_header_from_an_unlisted_source_is_refused() {
    let postern = postern_expecting_proxy("192.0.2.0/24", &[]);
    let mut stream = connect(postern.addr("--listen"));
    stream
        .write_all(b"PROXY TCP4 192.0.2.9 127.0.0.1 40000 25\r\n")
        .expect("write");
    closed_silently(&mut stream, Duration::from_secs(3), "unlisted source");
}

#[test]
fn malformed_oversized_or_missing_headers_close_without_a_greeting() {
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
        let mut stream = connect(addr);
        let _ = stream.write_all(bytes);
        closed_silently(&mut stream, Duration::from_secs(3), what);
    }

    // Nothing at all: closed after the header timeout (a few seconds), still silent.
    let started = Instant::now();
    let mut stream = connect(addr);
    closed_silently(&mut stream, Duration::from_secs(15), "no header");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited <= Duration::from_secs(10),
        "closed after {waited:?}"
    );
}

/// v2 LOCAL (a load balancer's health check) and v1 UNKNOWN keep the TCP peer address.
#[test]
fn v2_local_and_v1_unknown_keep_the_peer_address() {
    let mut postern = postern_expecting_proxy(TRUSTED, &[]);
    let addr = postern.addr("--listen");
    let mut local_v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local_v2.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    for header in [local_v2, b"PROXY UNKNOWN\r\n".to_vec()] {
        let mut stream = connect(addr);
        let me = stream.local_addr().expect("local addr");
        stream.write_all(&header).expect("write");
        let greeting = read_reply(&mut stream);
        assert!(greeting.starts_with("220 postern.test"), "{greeting}");
        send(&mut stream, "EHLO health.example");
        assert!(read_reply(&mut stream).starts_with("250"));
        send(&mut stream, "QUIT");
        assert!(read_reply(&mut stream).starts_with("221"));
        let closed = postern.wait_session_closed(me);
        assert_eq!(field(&closed, "result"), "quit", "{closed}");
    }
}

/// The header's source is the client address for the per-IP connection limit.
#[test]
fn per_ip_limit_counts_the_address_from_the_header() {
    let mut postern = postern_expecting_proxy(TRUSTED, &["--max-connections-per-ip", "1"]);
    let addr = postern.addr("--listen");
    let dst = (Ipv4Addr::LOCALHOST, addr.port());
    let a = Ipv4Addr::new(192, 0, 2, 10);
    let b = Ipv4Addr::new(192, 0, 2, 11);

    let mut first = connect(addr);
    first.write_all(&v2_tcp4((a, 40001), dst)).expect("write");
    assert!(read_reply(&mut first).starts_with("220 "));

    // Same header source, different TCP source port: over the limit.
    let mut second = connect(addr);
    second.write_all(&v2_tcp4((a, 40002), dst)).expect("write");
    let refused = read_reply(&mut second);
    assert!(refused.starts_with("421 4.7.0"), "{refused}");

    // Another header source from the same TCP peer: its own budget.
    let mut third = connect(addr);
    third
        .write_all(b"PROXY TCP4 192.0.2.11 127.0.0.1 40003 25\r\n")
        .expect("write");
    assert!(read_reply(&mut third).starts_with("220 "));
    send(&mut third, "QUIT");
    assert!(read_reply(&mut third).starts_with("221"));
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
    let fe = free_addr(V4);
    let haproxy = Haproxy::start(&[(
        fe,
        postern.addr("--listen"),
        "send-proxy-v2 check check-send-proxy inter 300ms\n    option smtpchk EHLO haproxy.test",
    )]);
    let checks = postern.wait_log("three HAProxy health checks", |text| {
        let quits: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| support_issue5::message(v) == "session closed")
            .filter(|v| field(v, "result") == "quit")
            .collect();
        (quits.len() >= 3).then_some(quits)
    });
    for check in checks {
        let peer: SocketAddr = support_issue5::span_field(&check, "peer")
            .parse()
            .expect("peer");
        assert_eq!(peer.ip(), V4, "{check}");
    }
    assert!(
        !haproxy.log_text().contains("DOWN"),
        "{}",
        haproxy.log_text()
    );
}
