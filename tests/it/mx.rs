//! The `--listen-mx` port (port 25 style): TLS and AUTH offered, neither required; an
//! anonymous session is handed to the backend at its first MAIL, and only when the
//! backend can learn who the client is (or the operator accepted that it cannot).

use crate::common;

use common::postern::USER;
use common::*;

/// The raw backend cannot be told the client's address, so these sessions run with
/// `--allow-mx-open-relay`: what they test is the hand-off, not the identity.
fn with_mx(backend: &RawBackend) -> (Postern, std::net::SocketAddr) {
    with_mx_flags(backend, &[("--allow-mx-open-relay", "true")])
}

fn with_mx_flags(backend: &RawBackend, flags: &[(&str, &str)]) -> (Postern, std::net::SocketAddr) {
    let mut builder = Postern::builder(backend.addr).listen("--listen-mx", V4);
    for (name, value) in flags {
        builder = builder.flag(name, *value);
    }
    let postern = builder.start();
    let mx = postern.addr("--listen-mx");
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

/// The start-up refusal, as `serve` and `check` print it.
const NO_IDENTITY: &str = "postern: --listen-mx without --xclient or --backend-proxy-protocol: \
the backend would see every MX client as postern's own address";

#[test]
fn mx_without_client_identity_refuses_to_start_and_names_the_fix() {
    let backend = RawBackend::start();
    let mx = || {
        Postern::builder(backend.addr)
            .env("RUST_BACKTRACE", "1")
            .flag("--listen-mx", free_addr().to_string())
    };
    for (what, out) in [("serve", mx().run_to_exit()), ("check", mx().check())] {
        assert_eq!(out.status.code(), Some(1), "{what}: {out}");
        assert!(out.stderr.starts_with(NO_IDENTITY), "{what}: {out}");
        for fix in [
            "Add --xclient",
            "smtpd_authorized_xclient_hosts",
            "--backend-proxy-protocol",
            "--allow-mx-open-relay",
        ] {
            assert!(out.stderr.contains(fix), "{what} should name {fix}: {out}");
        }
        assert!(!out.stderr.contains("panicked"), "{what}: {out}");
    }
    assert!(
        backend.sessions().is_empty(),
        "a refused start probed the backend"
    );

    // The permission, from the environment like every flag, makes check pass and say so.
    let out = mx().env("POSTERN_ALLOW_MX_OPEN_RELAY", "true").check();
    out.assert_success("check --allow-mx-open-relay");
    assert!(
        out.stdout.contains(
            "warning: --allow-mx-open-relay: the backend sees every MX client as postern's own address"
        ),
        "{out}"
    );
    // check also says when --xclient is set but the backend does not offer it.
    let out = mx().flag("--xclient", "true").check();
    out.assert_success("check --xclient");
    assert!(
        out.stdout.contains(
            "warning: --xclient is set but the backend does not offer XCLIENT to postern"
        ) && out
            .stdout
            .contains("anonymous MX sessions get 451 4.3.0 at MAIL"),
        "{out}"
    );
}

#[test]
fn allow_mx_open_relay_starts_and_warns_once_at_start_up() {
    let backend = RawBackend::start();
    let (postern, _mx) = with_mx(&backend);
    // Logged before the listeners are bound, so before start() saw them accept.
    let log = postern.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("--allow-mx-open-relay"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("the backend sees every MX client as postern's own address"),
        "{log}"
    );
}

/// A backend whose XCLIENT cannot take ADDR: a real Postfix always offers ADDR to the
/// hosts it authorizes, so only a scripted backend can show this case.
#[tokio::test]
async fn xclient_without_addr_gets_451_at_mail_and_nothing_is_relayed() {
    let backend = RawBackend::with_capabilities(&["PIPELINING", "XCLIENT NAME HELO LOGIN"]);
    let postern = Postern::builder(backend.addr)
        .listen("--listen-mx", V4)
        .listen("--metrics-listen", V4)
        .flag("--xclient", "true")
        .start();
    let (mx, admin) = (
        postern.addr("--listen-mx"),
        postern.addr("--metrics-listen"),
    );
    wait_until(STEP, "the start-up XCLIENT warning", || {
        postern
            .log()
            .contains("--xclient is set but the backend's XCLIENT does not take ADDR")
            .then_some(())
    });

    let mut c = SmtpClient::connect(mx).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    let refused = c
        .cmd(
            "MAIL FROM:<mx@remote.test>",
            "451 4.3.0 Backend cannot identify the client, try again later",
        )
        .await;
    assert_eq!(refused.raw.lines().count(), 1, "{}", refused.raw);
    // The session goes on: another MAIL is another try, refused the same way.
    c.cmd("MAIL FROM:<mx@remote.test>", "451 4.3.0").await;
    c.cmd("QUIT", "221").await;
    wait_metric(admin, "postern_backend_connections_total", 2.0, STEP).await;

    // Each try reached the backend, asked, and left: no MAIL, no XCLIENT, a QUIT.
    let tries = wait_until(STEP, "both tries to end", || {
        let tries: Vec<_> = backend
            .sessions()
            .into_iter()
            .filter(|s| s.received.starts_with(b"EHLO client.test\r\n"))
            .collect();
        (tries.len() == 2 && tries.iter().all(|s| s.closed)).then_some(tries)
    });
    for s in &tries {
        assert_eq!(
            s.received,
            b"EHLO client.test\r\nQUIT\r\n",
            "{}",
            show(&s.received)
        );
    }
    assert!(!contains(&backend.all_received(), b"MAIL FROM"));
    let log = postern.log();
    assert_eq!(
        log.matches("anonymous MX session refused at MAIL with 451 4.3.0")
            .count(),
        2,
        "{log}"
    );

    // An authenticated session on the same listener is relayed as before: it has a
    // login the backend can hold it to, with or without XCLIENT ADDR.
    let (mut c, _) = SmtpClient::connect_starttls(mx, postern.tls_config()).await;
    c.auth_plain(USER, PASSWORD, "235").await;
    c.cmd("MAIL FROM:<authed@client.test>", "250").await;
    c.cmd("QUIT", "221").await;
    backend.session_containing(b"MAIL FROM:<authed@client.test>");
}
