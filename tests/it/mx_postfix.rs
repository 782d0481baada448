//! `--listen-mx` (port 25 style) in front of a real Postfix: STARTTLS and AUTH offered
//! but not required; an anonymous session goes to Postfix at its first MAIL and Postfix
//! decides which recipients it takes; an authenticated one is relayed as on `--listen`.
//! With `--xclient`, an anonymous session that Postfix would only see as postern's own
//! address (postern not in `smtpd_authorized_xclient_hosts`) is refused at MAIL instead.

use crate::common;

use std::process::Command;
use std::time::Duration;

use common::postern::{Postern, USER, log_field as field};
use common::postfix::{self, Postfix, PostfixOptions};
use common::tools::SmtplibSession;
use common::{CLIENT_V4, PASSWORD, STEP, SmtpClient, V4, V6, have, run};

fn tools() -> bool {
    have("python3") && postfix::available()
}

/// postern in front of `backend` with `--listen-mx` on `ip` and the `extra` flags.
fn mx_postern(
    backend: std::net::SocketAddr,
    ip: std::net::IpAddr,
    extra: &[(&str, &str)],
) -> Postern {
    let mut builder = postfix::postern(backend)
        .listen("--listen-mx", ip)
        .wait_for_backend();
    for (name, value) in extra {
        builder = builder.flag(name, *value);
    }
    builder.start()
}

#[test]
fn anonymous_session_is_handed_to_postfix_which_decides_the_recipients() {
    if !tools() {
        return;
    }
    let postfix = Postfix::start(PostfixOptions::default());
    let mut postern = mx_postern(postfix.addr(V4), V4, &[("--xclient", "true")]);
    let run = SmtplibSession::new(postern.addr("--listen-mx"))
        .from(CLIENT_V4)
        .rcpt("someone@local.test")
        .rcpt("someone@outside.example")
        .run();
    let ehlo = run.text("ehlo");
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    assert!(!ehlo.contains("AUTH"), "AUTH offered before TLS: {ehlo}");
    assert_eq!(run.code("mail"), Some(250), "{}", run.raw);
    // Postfix's own answers: local domain accepted, relay refused.
    assert_eq!(run.rcpt_codes(), [250, 554], "{}", run.raw);
    assert!(run.raw.contains("Relay access denied"), "{}", run.raw);
    assert_eq!(run.code("data"), Some(250), "{}", run.raw);
    assert!(run.text("data").contains("queued as"), "{}", run.raw);

    let client = run.local();
    let lines = postfix.session_lines("127.0.0.2", client.port());
    // XCLIENT without LOGIN: the real client, and no SASL user.
    let client_line = format!("client=unknown[127.0.0.2]:{}", client.port());
    let queued = lines
        .iter()
        .find(|l| l.contains(&client_line))
        .unwrap_or_else(|| panic!("no {client_line} in {lines:#?}"));
    assert!(queued.trim_end().ends_with(&client_line), "{queued}");
    assert!(!lines.concat().contains("sasl_username"), "{lines:#?}");
    postfix.wait_line(&["to=<someone@local.test>", "status=sent"]);

    let closed = postern.wait_session_closed(client);
    assert_eq!(field(&closed, "result"), "relayed", "{closed}");
    assert_eq!(field(&closed, "tls"), "none", "{closed}");
    assert!(field(&closed, "user").is_null(), "{closed}");
}

#[test]
fn starttls_without_auth_is_accepted_and_auth_is_offered_after_tls() {
    if !tools() {
        return;
    }
    let postfix = Postfix::start(PostfixOptions::default());
    let mut postern = mx_postern(postfix.addr(V4), V4, &[("--xclient", "true")]);
    let run = SmtplibSession::new(postern.addr("--listen-mx"))
        .from(CLIENT_V4)
        .starttls()
        .rcpt("someone@local.test")
        .run();
    assert_eq!(run.code("starttls"), Some(220), "{}", run.raw);
    assert!(run.text("ehlo_tls").contains("AUTH"), "{}", run.raw);
    assert!(!run.text("ehlo_tls").contains("STARTTLS"), "{}", run.raw);
    assert_eq!(run.rcpt_codes(), [250], "{}", run.raw);
    assert_eq!(run.code("data"), Some(250), "{}", run.raw);
    let closed = postern.wait_session_closed(run.local());
    assert_ne!(field(&closed, "tls"), "none", "{closed}");
    assert_eq!(field(&closed, "result"), "relayed", "{closed}");
}

#[test]
fn authenticated_session_relays_to_an_outside_domain_with_xclient_login() {
    if !tools() {
        return;
    }
    let postfix = Postfix::start(PostfixOptions::default());
    let postern = mx_postern(postfix.addr(V4), V4, &[("--xclient", "true")]);
    let run = SmtplibSession::new(postern.addr("--listen-mx"))
        .from(CLIENT_V4)
        .starttls()
        .login(USER, PASSWORD)
        .rcpt("someone@outside.example")
        .run();
    assert_eq!(run.code("auth"), Some(235), "{}", run.raw);
    assert_eq!(run.rcpt_codes(), [250], "{}", run.raw);
    assert_eq!(run.code("data"), Some(250), "{}", run.raw);
    let client = run.local();
    let lines = postfix.session_lines("127.0.0.2", client.port()).join("\n");
    assert!(
        lines.contains(&format!(
            "client=unknown[127.0.0.2]:{}, sasl_method=XCLIENT, sasl_username={USER}",
            client.port()
        )),
        "{lines}"
    );
}

/// MX on [::1] with PROXY v2 to Postfix on [::1]: Postfix sees the client's port.
#[test]
fn ipv6_anonymous_session_with_backend_proxy_protocol() {
    if !tools() {
        return;
    }
    let postfix = Postfix::start(PostfixOptions::default());
    let postern = mx_postern(
        postfix.proxy_addr(V6),
        V6,
        &[("--backend-proxy-protocol", "v2")],
    );
    let run = SmtplibSession::new(postern.addr("--listen-mx"))
        .from(V6)
        .rcpt("someone@local.test")
        .run();
    assert_eq!(run.rcpt_codes(), [250], "{}", run.raw);
    assert_eq!(run.code("data"), Some(250), "{}", run.raw);
    let client = run.local();
    let lines = postfix.session_lines("::1", client.port()).join("\n");
    assert!(
        lines.contains(&format!("connect from unknown[::1]:{}", client.port())),
        "{lines}"
    );
}

/// The MAIL line and everything pipelined after it reach Postfix verbatim, and the
/// replies are Postfix's.
#[tokio::test]
async fn mail_line_and_pipelined_commands_reach_postfix_verbatim() {
    if !postfix::available() {
        return;
    }
    let postfix = Postfix::start(PostfixOptions::default());
    let postern = mx_postern(postfix.addr(V4), V4, &[("--xclient", "true")]);
    let addr = postern.addr("--listen-mx");

    // AUTH is neither offered nor accepted before TLS.
    let mut s = SmtpClient::connect(addr).await;
    s.expect("220 postern.test").await;
    let ehlo = s.cmd("EHLO raw.example", "250").await;
    assert!(ehlo.raw.contains("PIPELINING"), "{}", ehlo.raw);
    s.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==", "538 5.7.11").await;
    // RCPT before MAIL is postern's to refuse: there is no backend session yet.
    s.cmd("RCPT TO:<someone@local.test>", "503").await;

    // A SIZE over Postfix's limit: only Postfix knows it, so the line went through.
    s.cmd("MAIL FROM:<big@client.example> SIZE=999999999", "552 5.3.4")
        .await;
    // Postfix keeps that SIZE for the next MAIL until RSET.
    s.cmd("RSET", "250").await;

    // MAIL, RCPT, DATA in one write (RFC 2920): Postfix answers each.
    s.send(b"MAIL FROM:<a@client.example> BODY=8BITMIME\r\nRCPT TO:<b@local.test>\r\nDATA\r\n")
        .await;
    s.expect("250 2.1.0 Ok").await;
    s.expect("250 2.1.5 Ok").await;
    s.expect("354 End data").await;
    s.send(b"Subject: pipelined\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        .await;
    s.expect("250 2.0.0 Ok: queued as").await;
    s.expect("221 2.0.0").await;
    postfix.wait_line(&["to=<b@local.test>", "status=sent"]);
    let line = postfix.wait_line(&["from=<big@client.example>", "552"]);
    assert!(line.contains("SIZE") || line.contains("size"), "{line}");
}

/// swaks, as a sending MTA would: plain, no AUTH, to a local domain.
#[test]
fn swaks_delivers_anonymously_through_the_mx_listener() {
    if !have("swaks") || !postfix::available() {
        return;
    }
    let postfix = Postfix::start(PostfixOptions::default());
    let postern = mx_postern(postfix.addr(V4), V4, &[("--xclient", "true")]);
    let server = postern.addr("--listen-mx").to_string();
    let out = run(
        Command::new("swaks").args([
            "--server",
            &server,
            "--from",
            "sender@client.example",
            "--to",
            "someone@local.test",
            "--helo",
            "mta.client.example",
            "--local-interface",
            "127.0.0.2",
            "--timeout",
            "20",
        ]),
        b"",
        STEP + Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(0), "{out}");
    assert!(
        out.stdout.contains("queued as") || out.stderr.contains("queued as"),
        "{out}"
    );
    let line = postfix.wait_line(&["client=unknown[127.0.0.2]"]);
    assert!(!line.contains("sasl_username"), "{line}");
}

/// An MTA that greets with HELO (no ESMTP) still gets introduced with XCLIENT
/// (PROTO=SMTP): otherwise the backend would take postern's own address for the client.
#[test]
fn helo_client_is_introduced_with_xclient_too() {
    if !tools() {
        return;
    }
    let postfix = Postfix::start(PostfixOptions::default());
    let postern = mx_postern(postfix.addr(V4), V4, &[("--xclient", "true")]);
    let run = SmtplibSession::new(postern.addr("--listen-mx"))
        .from(CLIENT_V4)
        .helo()
        .ehlo("old-mta.example")
        .rcpt("someone@local.test")
        .run();
    assert_eq!(run.code("ehlo"), Some(250), "{}", run.raw);
    assert_eq!(run.rcpt_codes(), [250], "{}", run.raw);
    assert_eq!(run.code("data"), Some(250), "{}", run.raw);
    let client = run.local();
    let line = postfix.wait_line(&["disconnect from", &format!("[127.0.0.2]:{}", client.port())]);
    // The backend session stays a HELO one, as the client asked.
    assert!(line.contains(" helo=1 "), "{line}");
}

/// Postfix does not list postern in `smtpd_authorized_xclient_hosts`, so it offers
/// postern no XCLIENT and would take every MX client for postern itself (127.0.0.1, in
/// its mynetworks). postern says so at start-up and refuses anonymous MAIL with 451
/// rather than relay it; authenticated sessions go on as before.
#[test]
fn xclient_not_authorized_anonymous_mail_gets_451_and_postfix_sees_no_message() {
    if !tools() {
        return;
    }
    let postfix = Postfix::start(PostfixOptions {
        xclient_hosts: "192.0.2.1".into(),
    });
    let mut postern = mx_postern(postfix.addr(V4), V4, &[("--xclient", "true")]);
    postern.wait_log("the start-up XCLIENT warning", |text| {
        text.contains("--xclient is set but the backend does not offer XCLIENT to postern")
            .then_some(())
    });

    let run = SmtplibSession::new(postern.addr("--listen-mx"))
        .from(CLIENT_V4)
        .rcpt("someone@local.test")
        .run();
    assert_eq!(run.code("mail"), Some(451), "{}", run.raw);
    assert_eq!(
        run.text("mail"),
        "4.3.0 Backend cannot identify the client, try again later",
        "{}",
        run.raw
    );
    assert!(run.rcpt_codes().is_empty(), "{}", run.raw);
    let closed = postern.wait_session_closed(run.local());
    assert_ne!(field(&closed, "result"), "relayed", "{closed}");
    let refusals = postern
        .log()
        .matches("anonymous MX session refused at MAIL")
        .count();
    assert_eq!(refusals, 1, "{}", postern.log());

    // Postfix saw postern connect, EHLO and QUIT (like a probe), and no mail at all.
    let text = postfix.log_text();
    for never in ["mail=", "client=", "from=<", "NOQUEUE", "XCLIENT"] {
        assert!(!text.contains(never), "Postfix logged {never:?}:\n{text}");
    }

    // Authenticated on the same listener: relayed without XCLIENT, as Postfix's client
    // postern (the login is postern's to check, and Postfix is not told it).
    let run = SmtplibSession::new(postern.addr("--listen-mx"))
        .from(CLIENT_V4)
        .starttls()
        .login(USER, PASSWORD)
        .rcpt("someone@local.test")
        .run();
    assert_eq!(run.code("auth"), Some(235), "{}", run.raw);
    assert_eq!(run.code("mail"), Some(250), "{}", run.raw);
    assert_eq!(run.rcpt_codes(), [250], "{}", run.raw);
    assert_eq!(run.code("data"), Some(250), "{}", run.raw);
    postfix.wait_line(&["client=unknown[127.0.0.1]"]);
    postfix.wait_line(&["to=<someone@local.test>", "status=sent"]);
}
