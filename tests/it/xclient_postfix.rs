//! `--xclient` against a real Postfix: after a valid AUTH postern tells Postfix who the
//! client is (address, port, HELO, login) with XCLIENT, and Postfix — which knows of no
//! authenticated client any other way — relays to an outside domain only when XCLIENT
//! LOGIN reached it.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use common::postern::{Postern, USER};
use common::postfix::{self, Postfix, PostfixOptions, XTEXT_USER, long_user};
use common::tools::{SmtplibReport, SmtplibSession};
use common::{CLIENT_V4, PASSWORD, V4, V6, have};

fn postfix_running(options: PostfixOptions) -> Option<Postfix> {
    if !postfix::available() || !have("python3") {
        return None;
    }
    Some(Postfix::start(options))
}

/// postern with `--xclient` in front of `backend`, on `--listen`.
fn xclient_postern(backend: SocketAddr) -> Postern {
    postfix::postern(backend)
        .flag("--xclient", "true")
        .wait_for_backend()
        .start()
}

/// Submission with STARTTLS and AUTH PLAIN through postern to an outside recipient.
fn submit(postern: SocketAddr, source: std::net::IpAddr) -> SmtplibReport {
    SmtplibSession::new(postern)
        .from(source)
        .starttls()
        .login(USER, PASSWORD)
        .rcpt("someone@outside.example")
        .run()
}

#[test]
fn xclient_login_reaches_postfix_which_relays_and_logs_the_real_client() {
    let Some(postfix) = postfix_running(PostfixOptions::default()) else {
        return;
    };
    let postern = xclient_postern(postfix.addr(V4));
    let run = submit(postern.addr("--listen"), CLIENT_V4);
    assert_eq!(run.code("auth"), Some(235), "{}", run.raw);
    assert_eq!(run.rcpt_codes(), [250], "{}", run.raw);
    assert_eq!(run.code("data"), Some(250), "{}", run.raw);

    let client = run.local();
    assert_eq!(client.ip(), CLIENT_V4);
    let lines = postfix.session_lines("127.0.0.2", client.port()).join("\n");
    // The connection itself came from postern...
    assert!(
        lines.contains("connect from unknown[127.0.0.1]:"),
        "{lines}"
    );
    // ...and XCLIENT made Postfix see the real client, its port and its login.
    assert!(
        lines.contains(&format!(
            "client=unknown[127.0.0.2]:{}, sasl_method=XCLIENT, sasl_username={USER}",
            client.port()
        )),
        "{lines}"
    );
    postfix.wait_line(&["to=<someone@outside.example>", "status=sent"]);
}

#[test]
fn without_xclient_postfix_sees_postern_and_refuses_to_relay() {
    let Some(postfix) = postfix_running(PostfixOptions::default()) else {
        return;
    };
    let postern = postfix::postern(postfix.addr(V4))
        .wait_for_backend()
        .start();
    let run = submit(postern.addr("--listen"), CLIENT_V4);
    assert_eq!(run.code("auth"), Some(235), "{}", run.raw);
    assert_eq!(run.rcpt_codes(), [554], "{}", run.raw);
    assert!(run.raw.contains("Relay access denied"), "{}", run.raw);
    let line = postfix.wait_line(&["NOQUEUE: reject: RCPT", "outside.example"]);
    assert!(line.contains("from unknown[127.0.0.1]:"), "{line}");
    let disconnect = postfix.wait_line(&["disconnect from unknown[127.0.0.1]"]);
    assert!(!disconnect.contains("xclient"), "{disconnect}");
}

#[test]
fn xclient_is_not_sent_when_postfix_does_not_advertise_it() {
    // Postfix lists XCLIENT in its EHLO reply only to authorized hosts.
    let Some(postfix) = postfix_running(PostfixOptions {
        xclient_hosts: "192.0.2.1".into(),
    }) else {
        return;
    };
    let postern = xclient_postern(postfix.addr(V4));
    let run = submit(postern.addr("--listen"), CLIENT_V4);
    assert_eq!(run.code("auth"), Some(235), "{}", run.raw);
    assert_eq!(run.rcpt_codes(), [554], "{}", run.raw);
    let disconnect = postfix.wait_line(&["disconnect from unknown[127.0.0.1]"]);
    // Postfix counts every XCLIENT it receives, refused ones included.
    assert!(!disconnect.contains("xclient"), "{disconnect}");
}

#[test]
fn xclient_over_ipv6_tags_the_address_and_postfix_logs_it() {
    let Some(postfix) = postfix_running(PostfixOptions::default()) else {
        return;
    };
    let postern = postfix::postern(postfix.addr(V6))
        .on_ipv6_loopback()
        .flag("--xclient", "true")
        .wait_for_backend()
        .start();
    let run = submit(postern.addr("--listen"), V6);
    assert_eq!(run.code("auth"), Some(235), "{}", run.raw);
    assert_eq!(run.rcpt_codes(), [250], "{}", run.raw);
    assert_eq!(run.code("data"), Some(250), "{}", run.raw);
    let client = run.local();
    let lines = postfix.session_lines("::1", client.port()).join("\n");
    assert!(
        lines.contains(&format!(
            "client=unknown[::1]:{}, sasl_method=XCLIENT, sasl_username={USER}",
            client.port()
        )),
        "{lines}"
    );
}

#[test]
fn long_helo_and_login_split_xclient_and_postfix_still_gets_the_login() {
    let Some(postfix) = postfix_running(PostfixOptions::default()) else {
        return;
    };
    let postern = xclient_postern(postfix.addr(V4));
    // 4 labels of 60: 243 octets, a valid host name; with the 220-octet login the
    // attributes need more than one 512-octet XCLIENT line.
    let helo = vec!["h".repeat(60); 4].join(".") + ".test";
    let user = long_user();
    let run = SmtplibSession::new(postern.addr("--listen"))
        .from(CLIENT_V4)
        .ehlo(&helo)
        .starttls()
        .login(&user, PASSWORD)
        .rcpt("someone@outside.example")
        .run();
    assert_eq!(run.code("auth"), Some(235), "{}", run.raw);
    assert_eq!(run.rcpt_codes(), [250], "{}", run.raw);
    let client = run.local();
    let lines = postfix.session_lines("127.0.0.2", client.port()).join("\n");
    assert!(
        lines.contains(&format!("sasl_method=XCLIENT, sasl_username={user}")),
        "{lines}"
    );
}

/// An EHLO name longer than Postfix takes in XCLIENT (255 octets) is left out of it,
/// not sent for Postfix to refuse with 501, which failed the client's AUTH with 454.
#[test]
fn an_ehlo_name_too_long_for_xclient_is_left_out_and_the_login_still_reaches_postfix() {
    let Some(postfix) = postfix_running(PostfixOptions::default()) else {
        return;
    };
    let postern = xclient_postern(postfix.addr(V4));
    let helo = vec!["h".repeat(63); 4].join(".") + ".test";
    assert_eq!(helo.len(), 260);
    let run = SmtplibSession::new(postern.addr("--listen"))
        .from(CLIENT_V4)
        .ehlo(&helo)
        .starttls()
        .login(USER, PASSWORD)
        .rcpt("someone@outside.example")
        .run();
    assert_eq!(run.code("auth"), Some(235), "{}", run.raw);
    assert_eq!(run.rcpt_codes(), [250], "{}", run.raw);
    let lines = postfix
        .session_lines("127.0.0.2", run.local().port())
        .join("\n");
    assert!(
        lines.contains(&format!("sasl_method=XCLIENT, sasl_username={USER}")),
        "{lines}"
    );
}

/// `+` and `=` in the login travel xtext-encoded and Postfix decodes them back.
#[test]
fn login_with_plus_and_equals_reaches_postfix_decoded() {
    let Some(postfix) = postfix_running(PostfixOptions::default()) else {
        return;
    };
    let postern = xclient_postern(postfix.addr(V4));
    let run = SmtplibSession::new(postern.addr("--listen"))
        .from(CLIENT_V4)
        .starttls()
        .login(XTEXT_USER, PASSWORD)
        .rcpt("someone@outside.example")
        .run();
    assert_eq!(run.code("auth"), Some(235), "{}", run.raw);
    assert_eq!(run.rcpt_codes(), [250], "{}", run.raw);
    let lines = postfix
        .session_lines("127.0.0.2", run.local().port())
        .join("\n");
    assert!(
        lines.contains(&format!("sasl_method=XCLIENT, sasl_username={XTEXT_USER}")),
        "{lines}"
    );
}

/// A backend that offers XCLIENT and refuses it: the client gets a 4xx, never a 235.
/// (Postfix refuses XCLIENT only from unlisted hosts, to which it does not offer it, so
/// this one backend is scripted.)
#[test]
fn a_refused_xclient_fails_auth_with_4xx_not_235() {
    if !have("python3") {
        return;
    }
    let backend = TcpListener::bind((V4, 0)).expect("bind");
    let backend_addr = backend.local_addr().expect("addr");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let seen_by_backend = seen.clone();
    std::thread::spawn(move || {
        for conn in backend.incoming() {
            let Ok(mut conn) = conn else { return };
            let seen = seen_by_backend.clone();
            std::thread::spawn(move || {
                conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
                let _ = conn.write_all(b"220 scripted.test ESMTP\r\n");
                let mut buf = [0u8; 4096];
                let mut pending = Vec::new();
                loop {
                    let n = match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.windows(2).position(|w| w == b"\r\n") {
                        let line = String::from_utf8_lossy(&pending[..end]).into_owned();
                        pending.drain(..end + 2);
                        seen.lock().unwrap().push_str(&format!("{line}\n"));
                        let reply: &[u8] = if line.starts_with("EHLO") {
                            b"250-scripted.test\r\n250-XCLIENT NAME ADDR PORT PROTO HELO LOGIN\r\n250 8BITMIME\r\n"
                        } else if line.starts_with("XCLIENT") {
                            b"550 5.7.0 Error: insufficient authorization\r\n"
                        } else if line.starts_with("QUIT") {
                            b"221 bye\r\n"
                        } else {
                            b"250 ok\r\n"
                        };
                        let _ = conn.write_all(reply);
                    }
                }
            });
        }
    });
    let postern = xclient_postern(backend_addr);
    let run = submit(postern.addr("--listen"), V4);
    let code = run.code("auth").unwrap_or(0);
    assert!(
        (400..500).contains(&code),
        "AUTH answered {code}: {}",
        run.raw
    );
    let seen = seen.lock().unwrap().clone();
    assert!(seen.contains("XCLIENT ADDR=127.0.0.1 PORT="), "{seen}");
    assert!(seen.contains(&format!("LOGIN={USER}")), "{seen}");
}
