//! postern's abuse limits with their real defaults (the rest of the suite relaxes them):
//! AUTH failures per connection, the failure delay, per-user lockout, per-IP
//! connections and the error budget.

use crate::common;

use std::time::{Duration, Instant};

use common::postern::USER;
use common::*;

#[tokio::test]
async fn third_auth_failure_closes_with_421_after_growing_delays() {
    let backend = RawBackend::start();
    let postern = Postern::builder(backend.addr).default_limits().start();
    let (mut c, _) = postern.implicit().await;
    let start = Instant::now();
    c.auth_plain(USER, "wrong", "535 5.7.8").await;
    let first = start.elapsed();
    assert!(
        first >= Duration::from_millis(900),
        "first failure answered after {first:?}"
    );
    c.auth_plain(USER, "wrong", "535 5.7.8").await;
    c.auth_plain(USER, "wrong", "421 4.7.0").await;
    c.expect_closed().await;
}

#[tokio::test]
async fn a_user_locked_out_after_repeated_failures_gets_454() {
    let backend = RawBackend::start();
    let postern = Postern::builder(backend.addr)
        .default_limits()
        .flag("--auth-failure-delay", "0s")
        .flag("--max-auth-failures-per-user", "4")
        .start();
    for _ in 0..2 {
        let (mut c, _) = postern.implicit().await;
        c.auth_plain(USER, "wrong", "535").await;
        c.auth_plain(USER, "wrong", "535").await;
    }
    let (mut c, _) = postern.implicit().await;
    // Even the right password is not checked now from the network that failed (other
    // networks are only slowed down: abuse.rs).
    c.auth_plain(USER, PASSWORD, "454 4.7.0").await;
    // Other users are unaffected.
    c.auth_plain("sha512", PASSWORD, "235").await;
}

#[tokio::test]
async fn connections_per_ip_are_capped() {
    let backend = RawBackend::start();
    let postern = Postern::builder(backend.addr)
        .default_limits()
        .flag("--max-connections-per-ip", "2")
        .start();
    // The harness's start-up probes (one connect per listener) hold slots until
    // postern sees them close: until then a client may get 421 too.
    let greeted = || async {
        let deadline = Instant::now() + STEP;
        loop {
            let mut client = postern.plain().await;
            let r = client.read_reply().await;
            if r.code == 220 {
                return client;
            }
            assert_eq!(r.code, 421, "{}", r.raw);
            assert!(Instant::now() < deadline, "slot never freed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let a = greeted().await;
    let mut b = greeted().await;
    let mut c = postern.plain().await;
    c.expect("421 4.7.0").await;
    drop(a);
    // A slot frees up once a connection closes.
    drop(greeted().await);
    b.cmd("QUIT", "221").await;
}

#[tokio::test]
async fn too_many_errors_close_the_session() {
    let backend = RawBackend::start();
    let postern = Postern::builder(backend.addr).default_limits().start();
    let mut c = postern.plain().await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    let mut closed_with_421 = false;
    for _ in 0..20 {
        c.line("MAIL FROM:<a@client.test>").await;
        let r = c.read_reply().await;
        if r.code == 421 {
            closed_with_421 = true;
            break;
        }
        assert_eq!(r.code, 530, "{}", r.raw);
    }
    assert!(closed_with_421, "no 421 after 20 errors:\n{}", c.transcript);
    c.expect_closed().await;
}
