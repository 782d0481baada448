//! SMTP AUTH (RFC 4954): PLAIN (RFC 4616), LOGIN, CRAM-MD5 (RFC 2195), every password
//! scheme of the users file, and every way an exchange can go wrong.

use crate::common;

use common::postern::{FIXTURE_USERS, USER};
use common::tools::{Listener, hash_password, htpasswd_bcrypt, openssl_sha512, smtplib, swaks};
use common::*;

/// Implicit TLS and EHLO done; ready for AUTH.
async fn ready(postern: &Postern) -> SmtpClient {
    postern.implicit().await.0
}

/// After a 235 the session is relayed: the backend must see the MAIL.
async fn relayed(c: &mut SmtpClient, backend: &RawBackend, tag: &str) {
    c.cmd(&format!("MAIL FROM:<{tag}@client.test>"), "250")
        .await;
    c.cmd("QUIT", "221").await;
    backend.session_containing(format!("MAIL FROM:<{tag}@client.test>").as_bytes());
}

#[tokio::test]
async fn plain_with_initial_response() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = ready(&postern).await;
    c.auth_plain(USER, PASSWORD, "235 2.7.0").await;
    relayed(&mut c, &backend, "plain-ir").await;
}

#[tokio::test]
async fn plain_without_initial_response() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = ready(&postern).await;
    let r = c.cmd("AUTH PLAIN", "334").await;
    assert_eq!(r.lines, vec![String::new()], "empty challenge: {:?}", r.raw);
    c.cmd(&plain_response(USER, PASSWORD), "235 2.7.0").await;
    relayed(&mut c, &backend, "plain-noir").await;
}

#[tokio::test]
async fn plain_with_authzid_equal_to_user() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = ready(&postern).await;
    let ir = b64(format!("{USER}\0{USER}\0{PASSWORD}"));
    c.cmd(&format!("AUTH PLAIN {ir}"), "235").await;
}

#[tokio::test]
async fn login_without_initial_response() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = ready(&postern).await;
    let r = c.cmd("AUTH LOGIN", "334").await;
    assert_eq!(unb64(&r.lines[0]), b"Username:");
    let r = c.cmd(&b64(USER), "334").await;
    assert_eq!(unb64(&r.lines[0]), b"Password:");
    c.cmd(&b64(PASSWORD), "235 2.7.0").await;
    relayed(&mut c, &backend, "login").await;
}

#[tokio::test]
async fn login_with_initial_response() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = ready(&postern).await;
    let r = c.cmd(&format!("AUTH LOGIN {}", b64(USER)), "334").await;
    assert_eq!(unb64(&r.lines[0]), b"Password:");
    c.cmd(&b64(PASSWORD), "235 2.7.0").await;
    relayed(&mut c, &backend, "login-ir").await;
}

#[tokio::test]
async fn cram_md5_for_a_plain_user() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = ready(&postern).await;
    let r = c.cmd("AUTH CRAM-MD5", "334").await;
    let challenge = String::from_utf8(unb64(&r.lines[0])).expect("challenge is text");
    assert!(
        challenge.starts_with('<') && challenge.ends_with('>') && challenge.contains('@'),
        "RFC 2195 challenge looks like a msg-id: {challenge:?}"
    );
    c.cmd(&cram_md5_response(USER, PASSWORD, &r.lines[0]), "235 2.7.0")
        .await;
    relayed(&mut c, &backend, "cram").await;
}

#[tokio::test]
async fn cram_md5_challenges_are_not_reused() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..3 {
        let mut c = ready(&postern).await;
        let r = c.cmd("AUTH CRAM-MD5", "334").await;
        assert!(
            seen.insert(r.lines[0].clone()),
            "challenge repeated: {}",
            r.raw
        );
        c.cmd("*", "501").await;
    }
}

#[tokio::test]
async fn cram_md5_cannot_pass_for_hashed_users() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    for (user, _) in FIXTURE_USERS {
        let mut c = ready(&postern).await;
        let r = c.cmd("AUTH CRAM-MD5", "334").await;
        c.cmd(&cram_md5_response(user, PASSWORD, &r.lines[0]), "535 5.7.8")
            .await;
    }
}

#[tokio::test]
async fn wrong_password_and_unknown_user_get_535() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = ready(&postern).await;
    c.auth_plain(USER, "wrong", "535 5.7.8").await;
    c.auth_plain("nobody-such", PASSWORD, "535 5.7.8").await;
    c.cmd("AUTH LOGIN", "334").await;
    c.cmd(&b64(USER), "334").await;
    c.cmd(&b64("wrong"), "535 5.7.8").await;
    let r = c.cmd("AUTH CRAM-MD5", "334").await;
    c.cmd(&cram_md5_response(USER, "wrong", &r.lines[0]), "535 5.7.8")
        .await;
    // Still unauthenticated: no mail transaction.
    c.cmd("MAIL FROM:<a@client.test>", "530 5.7.0").await;
    // A later correct attempt on the same connection succeeds.
    c.auth_plain(USER, PASSWORD, "235").await;
    relayed(&mut c, &backend, "retry").await;
}

#[tokio::test]
async fn malformed_base64_gets_501() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = ready(&postern).await;
    c.cmd("AUTH PLAIN !!!notbase64!!!", "501 5.5.2").await;
    c.cmd("AUTH PLAIN", "334").await;
    c.cmd("@@@", "501 5.5.2").await;
    c.cmd("AUTH LOGIN", "334").await;
    c.cmd("%%%", "501 5.5.2").await;
    c.cmd("AUTH CRAM-MD5", "334").await;
    c.cmd("not base64 at all", "501 5.5.2").await;
    // PLAIN that decodes but lacks the NUL separators is malformed too.
    let r = c
        .cmd(&format!("AUTH PLAIN {}", b64("no-separators")), "5")
        .await;
    assert!(r.code == 501 || r.code == 535, "{}", r.raw);
    c.auth_plain(USER, PASSWORD, "235").await;
}

#[tokio::test]
async fn star_cancels_every_mechanism() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = ready(&postern).await;
    c.cmd("AUTH PLAIN", "334").await;
    c.cmd("*", "501 5.7.0").await;
    c.cmd("AUTH LOGIN", "334").await;
    c.cmd("*", "501 5.7.0").await;
    c.cmd("AUTH LOGIN", "334").await;
    c.cmd(&b64(USER), "334").await;
    c.cmd("*", "501 5.7.0").await;
    c.cmd("AUTH CRAM-MD5", "334").await;
    c.cmd("*", "501 5.7.0").await;
    c.cmd("MAIL FROM:<a@client.test>", "530").await;
    c.auth_plain(USER, PASSWORD, "235").await;
}

#[tokio::test]
async fn unknown_mechanism_gets_504() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = ready(&postern).await;
    c.cmd("AUTH DIGEST-MD5", "504 5.5.4").await;
    c.cmd("AUTH XOAUTH2 dGVzdA==", "504 5.5.4").await;
    c.cmd("AUTH GSSAPI", "504 5.5.4").await;
    c.auth_plain(USER, PASSWORD, "235").await;
}

#[tokio::test]
async fn mechanism_names_are_case_insensitive() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut c = ready(&postern).await;
    c.cmd(
        &format!("auth plain {}", plain_response(USER, PASSWORD)),
        "235",
    )
    .await;
}

/// PLAIN as each fixture user (hashes from Dovecot's `doveadm pw`).
#[tokio::test]
async fn every_fixture_scheme_verifies() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    for (user, _) in FIXTURE_USERS {
        let mut c = ready(&postern).await;
        c.auth_plain(user, "wrong", "535 5.7.8").await;
        c.auth_plain(user, PASSWORD, "235 2.7.0").await;
        relayed(&mut c, &backend, user).await;
    }
}

/// Hashes made at test time by the real tools a person would use: `openssl passwd -6`,
/// `htpasswd -B`, and postern's own `hash-password` for every scheme it offers. Also
/// Dovecot's extra `:uid:gid:...` fields and a `{CLEAR}` alias.
#[tokio::test]
async fn hashes_from_real_tools_verify() {
    let users = vec![
        ("openssl6".to_string(), openssl_sha512(PASSWORD)),
        ("htpasswd".to_string(), htpasswd_bcrypt(PASSWORD)),
        ("pargon".to_string(), hash_password("argon2id", PASSWORD)),
        ("psha".to_string(), hash_password("sha512-crypt", PASSWORD)),
        ("pbcrypt".to_string(), hash_password("bcrypt", PASSWORD)),
    ];
    assert!(
        users[2].1.starts_with("{ARGON2ID}$argon2id$"),
        "{}",
        users[2].1
    );
    assert!(
        users[3].1.starts_with("{SHA512-CRYPT}$6$"),
        "{}",
        users[3].1
    );
    assert!(users[4].1.starts_with("{BLF-CRYPT}$2"), "{}", users[4].1);
    let backend = RawBackend::start();
    let mut builder = Postern::builder(backend.addr)
        .user_line("# a comment line")
        .user_line("")
        .user_line(format!("dove:{{PLAIN}}{PASSWORD}:1000:1000::/home/dove::"));
    for (user, hash) in &users {
        builder = builder.user_line(format!("{user}:{hash}"));
    }
    let postern = builder.start();
    for user in users.iter().map(|(u, _)| u.as_str()).chain(["dove"]) {
        let mut c = ready(&postern).await;
        c.auth_plain(user, "not-the-password", "535 5.7.8").await;
        c.auth_plain(user, PASSWORD, "235 2.7.0").await;
        relayed(&mut c, &backend, user).await;
    }
}

/// The same exchanges through STARTTLS instead of implicit TLS.
#[tokio::test]
async fn all_mechanisms_after_starttls() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let (mut c, _) = postern.starttls().await;
    c.auth_plain(USER, PASSWORD, "235").await;
    relayed(&mut c, &backend, "st-plain").await;

    let (mut c, _) = postern.starttls().await;
    c.cmd("AUTH LOGIN", "334").await;
    c.cmd(&b64(USER), "334").await;
    c.cmd(&b64(PASSWORD), "235").await;
    relayed(&mut c, &backend, "st-login").await;

    let (mut c, _) = postern.starttls().await;
    let r = c.cmd("AUTH CRAM-MD5", "334").await;
    c.cmd(&cram_md5_response(USER, PASSWORD, &r.lines[0]), "235")
        .await;
    relayed(&mut c, &backend, "st-cram").await;
}

fn swaks_auth(postern: &Postern, listener: Listener, mech: &str, user: &str, pw: &str) -> Output {
    swaks(
        postern,
        listener,
        &["--auth", mech, "--auth-user", user, "--auth-password", pw],
    )
}

#[test]
fn swaks_every_mechanism_on_both_listeners() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let mut sent = 0;
    for listener in [Listener::StartTls, Listener::Implicit] {
        for mech in ["PLAIN", "LOGIN", "CRAM-MD5"] {
            let out = swaks_auth(&postern, listener, mech, USER, PASSWORD);
            out.assert_success(&format!("swaks {listener:?} {mech}"));
            assert!(out.stdout.contains("235 2.7.0"), "{out}");
            sent += 1;
        }
    }
    let messages: usize = backend.sessions().iter().map(|s| s.messages.len()).sum();
    assert_eq!(messages, sent);
}

#[test]
fn swaks_with_wrong_password_fails() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let out = swaks_auth(&postern, Listener::StartTls, "PLAIN", USER, "wrong");
    assert!(!out.status.success(), "{out}");
    assert!(out.stdout.contains("535 5.7.8"), "{out}");
    assert!(!contains(&backend.all_received(), b"MAIL FROM"));
}

#[test]
fn swaks_every_scheme() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    for (user, _) in FIXTURE_USERS {
        for mech in ["PLAIN", "LOGIN"] {
            swaks_auth(&postern, Listener::StartTls, mech, user, PASSWORD)
                .assert_success(&format!("swaks {mech} as {user}"));
        }
    }
}

/// smtplib's `login()` tries CRAM-MD5 first when offered; for hashed users that must
/// fail with 535 and smtplib then falls back to PLAIN, which must succeed.
#[test]
fn smtplib_login_as_every_user() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let users: Vec<&str> = std::iter::once(USER)
        .chain(FIXTURE_USERS.iter().map(|(u, _)| *u))
        .collect();
    for user in users {
        let msg = format!("Subject: smtplib as {user}\r\n\r\nhello\r\n");
        let out = smtplib(
            &postern,
            Listener::StartTls,
            user,
            PASSWORD,
            "auto",
            msg.as_bytes(),
        );
        out.assert_success(&format!("smtplib login as {user}"));
        assert!(out.stdout.contains("auth: PLAIN LOGIN CRAM-MD5"), "{out}");
    }
    for mech in ["PLAIN", "LOGIN", "CRAM-MD5"] {
        let out = smtplib(
            &postern,
            Listener::Implicit,
            USER,
            PASSWORD,
            mech,
            b"Subject: m\r\n\r\nx\r\n",
        );
        out.assert_success(&format!("smtplib {mech}"));
    }
    let out = smtplib(
        &postern,
        Listener::StartTls,
        USER,
        "wrong",
        "PLAIN",
        b"x\r\n",
    );
    assert_eq!(out.status.code(), Some(2), "{out}");
    assert!(out.stdout.contains("535"), "{out}");
}
