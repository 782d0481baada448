//! Real clients (swaks, Python smtplib, openssl s_client, lettre) through postern into
//! the real Postfix `smtp-sink`, which dumps each message it accepts.

use crate::common;

use common::postern::{FIXTURE_USERS, USER};
use common::tools::{
    Listener, lettre_message, lettre_send, lettre_transport, s_client, smtplib, swaks,
};
use common::*;
use lettre::transport::smtp::authentication::Mechanism;

fn swaks_auth(postern: &Postern, listener: Listener, mech: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "--auth",
        mech,
        "--auth-user",
        USER,
        "--auth-password",
        PASSWORD,
    ];
    args.extend_from_slice(extra);
    swaks(postern, listener, &args)
}

#[test]
fn swaks_through_postern_into_smtp_sink() {
    let sink = SmtpSink::start();
    let postern = Postern::start(sink.addr);
    let mut n = 0;
    for (listener, mech) in [
        (Listener::StartTls, "PLAIN"),
        (Listener::StartTls, "LOGIN"),
        (Listener::StartTls, "CRAM-MD5"),
        (Listener::Implicit, "PLAIN"),
        (Listener::Implicit, "LOGIN"),
        (Listener::Implicit, "CRAM-MD5"),
    ] {
        let header = format!("X-Test: {listener:?} {mech}");
        let out = swaks_auth(&postern, listener, mech, &["--add-header", &header]);
        out.assert_success(&format!("swaks {listener:?} {mech} via smtp-sink"));
        n += 1;
        let msgs = sink.wait_for_messages(n);
        let msg = msgs
            .iter()
            .find(|m| m.contains(&header))
            .unwrap_or_else(|| panic!("no dumped message has {header:?}: {msgs:?}"));
        assert!(msg.contains("X-Mail-Args: <sender@client.test>"), "{msg}");
        assert!(msg.contains("X-Rcpt-Args: <rcpt@backend.test>"), "{msg}");
        // postern replays the client's EHLO to the backend.
        assert!(msg.contains("X-Helo-Args: client.test"), "{msg}");
    }
}

/// smtp-sink advertises AUTH, XCLIENT, XFORWARD and ends its EHLO reply with an empty
/// `250 ` line; swaks must see postern's AUTH only and complete normally.
#[test]
fn smtp_sink_capabilities_are_rewritten() {
    let sink = SmtpSink::start();
    let postern = Postern::start(sink.addr);
    let out = swaks_auth(
        &postern,
        Listener::StartTls,
        "PLAIN",
        &["--quit-after", "AUTH"],
    );
    out.assert_success("swaks --quit-after AUTH");
    let server_lines: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("<~") || l.starts_with("<-"))
        .collect();
    let text = server_lines.join("\n");
    assert!(text.contains("250-8BITMIME"), "{}", out.stdout);
    assert!(text.contains("AUTH PLAIN LOGIN CRAM-MD5"), "{}", out.stdout);
    assert!(!text.contains("XCLIENT"), "{}", out.stdout);
    assert!(!text.contains("XFORWARD"), "{}", out.stdout);
    assert!(
        !server_lines.iter().any(|l| l.ends_with("AUTH PLAIN LOGIN")),
        "smtp-sink's own AUTH leaked: {}",
        out.stdout
    );
}

#[test]
fn dot_stuffing_survives_end_to_end() {
    let sink = SmtpSink::start();
    let postern = Postern::start(sink.addr);
    let out = swaks_auth(
        &postern,
        Listener::Implicit,
        "PLAIN",
        &["--body", "first\n.leading dot\n..two dots\n.\nlast"],
    );
    out.assert_success("swaks with dot lines");
    let msg = &sink.wait_for_messages(1)[0];
    // swaks stuffs, smtp-sink unstuffs: the body comes out as written.
    assert!(
        msg.contains("\nfirst\n.leading dot\n..two dots\n.\nlast\n"),
        "{msg}"
    );
}

#[test]
fn five_mib_message_from_swaks() {
    let sink = SmtpSink::start();
    let postern = Postern::start(sink.addr);
    let mut data = String::from("Subject: big via swaks\n\n");
    let mut i = 0;
    while data.len() < 5 * 1024 * 1024 {
        data.push_str(&format!(
            "{i:08} the quick brown fox jumps over the lazy dog 0123456789\n"
        ));
        i += 1;
    }
    let path = postern.dir().join("big.eml");
    std::fs::write(&path, &data).unwrap();
    let data_arg = format!("@{}", path.display());
    let out = swaks_auth(
        &postern,
        Listener::StartTls,
        "PLAIN",
        &["--data", &data_arg, "--suppress-data"],
    );
    out.assert_success("swaks 5 MiB");
    let msg = &sink.wait_for_messages(1)[0];
    let body_start = msg
        .find("Subject: big via swaks\n")
        .expect("subject in dump");
    let dumped = &msg[body_start..];
    assert!(
        dumped.starts_with(&data),
        "dump differs (len {} vs {})",
        dumped.len(),
        data.len()
    );
}

#[test]
fn smtplib_8bit_message_into_smtp_sink() {
    let sink = SmtpSink::start();
    let postern = Postern::start(sink.addr);
    let msg = "Subject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\n\
               Content-Transfer-Encoding: 8bit\r\n\r\ncaf\u{e9} \u{263A}\r\n";
    for user in std::iter::once(USER).chain(FIXTURE_USERS.iter().map(|(u, _)| *u)) {
        smtplib(
            &postern,
            Listener::StartTls,
            user,
            PASSWORD,
            "auto",
            msg.as_bytes(),
        )
        .assert_success(&format!("smtplib as {user}"));
    }
    let msgs = sink.wait_for_messages(1 + FIXTURE_USERS.len());
    for m in msgs {
        assert!(m.contains("caf\u{e9} \u{263A}\n"), "{m}");
    }
}

#[test]
fn openssl_s_client_into_smtp_sink() {
    let sink = SmtpSink::start();
    let postern = Postern::start(sink.addr);
    let script = format!(
        "EHLO client.test\r\nAUTH PLAIN {}\r\nMAIL FROM:<ossl@client.test>\r\n\
         RCPT TO:<rcpt@backend.test>\r\nDATA\r\nSubject: s_client\r\n\r\nhello sink\r\n.\r\nQUIT\r\n",
        plain_response(USER, PASSWORD)
    );
    let out = s_client(&postern, Listener::StartTls, script.as_bytes());
    out.assert_success("s_client -starttls smtp");
    assert!(out.stdout.contains("235 2.7.0"), "{out}");
    let msg = &sink.wait_for_messages(1)[0];
    assert!(msg.contains("X-Mail-Args: <ossl@client.test>"), "{msg}");
    assert!(msg.contains("hello sink"), "{msg}");
}

#[tokio::test]
async fn lettre_into_smtp_sink_both_listeners_both_mechanisms() {
    let sink = SmtpSink::start();
    let postern = Postern::start(sink.addr);
    let mut n = 0;
    for listener in [Listener::StartTls, Listener::Implicit] {
        for mech in [Mechanism::Plain, Mechanism::Login] {
            let transport = lettre_transport(&postern, listener, USER, PASSWORD, mech);
            assert!(
                within("lettre test_connection", transport.test_connection())
                    .await
                    .expect("test_connection")
            );
            let subject = format!("lettre {listener:?} {mech:?}");
            lettre_send(&transport, lettre_message(&subject, "hi from lettre"))
                .await
                .unwrap_or_else(|e| panic!("{subject}: {e}"));
            n += 1;
            let msgs = sink.wait_for_messages(n);
            assert!(msgs.iter().any(|m| m.contains(&subject)), "{msgs:?}");
        }
    }
}

#[tokio::test]
async fn lettre_with_wrong_password_is_refused() {
    let sink = SmtpSink::start();
    let postern = Postern::start(sink.addr);
    let transport = lettre_transport(
        &postern,
        Listener::StartTls,
        USER,
        "wrong",
        Mechanism::Plain,
    );
    let err = lettre_send(&transport, lettre_message("nope", "x"))
        .await
        .expect_err("wrong password must fail");
    assert!(
        err.to_string().contains("535") || err.is_permanent(),
        "{err}"
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(sink.messages().is_empty());
}
