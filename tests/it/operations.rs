//! Running postern: `/healthz`, `/readyz` and `/metrics`, graceful drain on SIGTERM,
//! and reloading the users file on SIGHUP.

use crate::common;

use std::time::{Duration, Instant};

use common::postern::USER;
use common::*;

fn with_admin(backend: &RawBackend) -> (Postern, std::net::SocketAddr) {
    let postern = Postern::builder(backend.addr)
        .listen("--metrics-listen", V4)
        .flag("--probe-interval", "200ms")
        .start();
    let admin = postern.addr("--metrics-listen");
    (postern, admin)
}

/// Polls `path` until it answers `status`.
#[tokio::test]
async fn health_and_readiness_follow_the_backend() {
    let backend = RawBackend::start();
    let (postern, admin) = with_admin(&backend);
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    wait_status(admin, "/readyz", 200).await;

    backend.set_fault(Fault::Refuse);
    wait_status(admin, "/readyz", 503).await;
    assert_eq!(
        http_get(admin, "/healthz").await.0,
        200,
        "alive while not ready"
    );

    backend.set_fault(Fault::None);
    wait_status(admin, "/readyz", 200).await;
    assert_eq!(http_get(admin, "/nope").await.0, 404);
    drop(postern);
}

/// Every counter series postern can emit, as `name{labels}` (labels in the order postern
/// writes them). Written out here rather than taken from the crate, so a renamed or
/// dropped label value fails this test.
fn every_counter_series() -> Vec<String> {
    let mut series = Vec::new();
    let mut add = |name: &str, labels: &[(&str, &[&str])]| {
        let mut sets = vec![String::new()];
        for (key, values) in labels {
            sets = sets
                .iter()
                .flat_map(|set| {
                    values.iter().map(move |v| {
                        let sep = if set.is_empty() { "" } else { "," };
                        format!("{set}{sep}{key}=\"{v}\"")
                    })
                })
                .collect();
        }
        for set in sets {
            series.push(if set.is_empty() {
                name.to_owned()
            } else {
                format!("{name}{{{set}}}")
            });
        }
    };
    let ok_error: &[&str] = &["ok", "error"];
    add(
        "postern_connections_total",
        &[("listener", &["starttls", "tls", "mx"])],
    );
    add(
        "postern_tls_handshakes_total",
        &[
            ("result", &["ok"]),
            ("version", &["TLSv1_2", "TLSv1_3", "unknown"]),
        ],
    );
    add(
        "postern_tls_handshakes_total",
        &[("result", &["error"]), ("version", &["none"])],
    );
    add(
        "postern_auth_attempts_total",
        &[
            ("mechanism", &["plain", "login", "cram-md5"]),
            ("result", &["success", "failure"]),
        ],
    );
    add("postern_backend_connections_total", &[("result", ok_error)]);
    add("postern_reloads_total", &[("result", ok_error)]);
    add(
        "postern_bytes_total",
        &[("direction", &["client_to_backend", "backend_to_client"])],
    );
    add(
        "postern_auth_throttled_total",
        &[(
            "scope",
            &[
                "ip",
                "wide_prefix",
                "user",
                "connection",
                "verifier",
                "network_verifications",
            ],
        )],
    );
    add(
        "postern_connections_rejected_total",
        &[(
            "reason",
            &[
                "max_connections",
                "max_connections_per_ip",
                "max_connections_per_wide_prefix",
                "proxy_untrusted",
                "proxy_invalid",
                "junk_commands",
                "auth_deadline",
            ],
        )],
    );
    add(
        "postern_messages_total",
        &[(
            "result",
            &[
                "accepted",
                "rejected_backend",
                "rejected_limit",
                "rejected_strict_data",
                "rejected_smuggling",
                "unanswered",
            ],
        )],
    );
    add("postern_recipients_total", &[]);
    add(
        "postern_limit_rejections_total",
        &[(
            "limit",
            &[
                "messages_per_user",
                "recipients_per_user",
                "recipients_per_message",
                "store_unavailable",
            ],
        )],
    );
    add(
        "postern_limits_store_errors_total",
        &[("operation", &["reserve", "release"])],
    );
    series
}

#[tokio::test]
async fn every_counter_exists_at_zero_from_start_up() {
    let backend = RawBackend::start();
    let (_postern, admin) = with_admin(&backend);
    let body = wait_status(admin, "/metrics", 200).await;
    // The harness's readiness probe opens one connection per listener and drops it
    // before TLS, so those two families may have moved; every other series is at 0.
    let probed = [
        "postern_connections_total{",
        "postern_tls_handshakes_total{",
    ];
    let mut missing = Vec::new();
    for series in every_counter_series() {
        let present = body.lines().any(|line| {
            line.strip_prefix(series.as_str())
                .and_then(|value| value.strip_prefix(' '))
                .and_then(|value| value.parse::<f64>().ok())
                .is_some_and(|value| value == 0.0 || probed.iter().any(|p| series.starts_with(p)))
        });
        if !present {
            missing.push(series);
        }
    }
    assert!(
        missing.is_empty(),
        "missing or not at 0: {missing:#?}\n{body}"
    );
    // Every counter family postern writes is one listed above, with its HELP text.
    let families: std::collections::BTreeSet<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let listed = every_counter_series();
    for family in &families {
        assert!(
            listed
                .iter()
                .any(|s| s == family || s.starts_with(&format!("{family}{{"))),
            "{family} is not listed in this test"
        );
        assert!(
            body.lines()
                .any(|l| l.starts_with(&format!("# HELP {family} "))),
            "{family} has no HELP"
        );
    }
    let expected: std::collections::BTreeSet<&str> = listed
        .iter()
        .map(|s| s.split('{').next().unwrap_or(s))
        .collect();
    assert_eq!(families, expected, "counter families on /metrics");
}

#[tokio::test]
async fn metrics_count_auth_and_never_name_users() {
    let backend = RawBackend::start();
    let (postern, admin) = with_admin(&backend);
    let (mut c, _) = postern.implicit().await;
    c.auth_plain(USER, "wrong", "535").await;
    c.auth_plain(USER, PASSWORD, "235").await;
    c.cmd("QUIT", "221").await;
    let body = wait_status(admin, "/metrics", 200).await;
    for name in [
        "postern_connections_total",
        "postern_auth_attempts_total",
        "postern_backend_up",
        "postern_session_duration_seconds",
    ] {
        assert!(body.contains(name), "{name} missing:\n{body}");
    }
    let auth: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("postern_auth_attempts_total{"))
        .collect();
    assert!(auth.iter().any(|l| l.contains("success")), "{auth:?}");
    assert!(auth.iter().any(|l| l.contains("fail")), "{auth:?}");
    assert!(!body.contains(USER), "a user name in /metrics:\n{body}");
    assert!(
        !body.contains("127.0.0.1"),
        "an address in /metrics:\n{body}"
    );
}

#[tokio::test]
async fn sigterm_drains_idle_sessions_and_lets_relayed_ones_finish() {
    let backend = RawBackend::start();
    let mut postern = Postern::builder(backend.addr)
        .flag("--shutdown-grace", "10s")
        .start();
    let mut idle = postern.plain().await;
    idle.expect("220").await;
    idle.cmd("EHLO client.test", "250").await;
    let mut relayed = postern.authenticated(true).await;
    relayed.cmd("MAIL FROM:<drain@client.test>", "250").await;
    relayed.cmd("RCPT TO:<b@backend.test>", "250").await;
    relayed.cmd("DATA", "354").await;
    relayed
        .send(b"Subject: in flight\r\n\r\nsent across SIGTERM\r\n")
        .await;

    postern.signal("TERM");
    idle.expect("421 4.3.2").await;
    idle.expect_closed().await;
    // New connections are no longer accepted.
    wait_until(STEP, "listeners to close", || {
        (!accepts(postern.smtp)).then_some(())
    });
    // The relayed session, in the middle of DATA, carries on until it ends by itself,
    // and its message arrives at the backend.
    relayed.send(b"second half\r\n").await;
    relayed.cmd(".", "250").await;
    relayed.cmd("QUIT", "221").await;
    assert!(
        contains(
            &backend.all_received(),
            b"sent across SIGTERM\r\nsecond half\r\n.\r\n"
        ),
        "{}",
        show(&backend.all_received())
    );
    relayed.expect_closed().await;
    drop(relayed);
    let t = Instant::now();
    let status = postern.wait_exit(STEP);
    // Well before --shutdown-grace: nothing is left to wait for.
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "drain took {:?}",
        t.elapsed()
    );
    assert!(status.success(), "exit after drain: {status}");
}

#[tokio::test]
async fn sighup_reloads_the_users_file_and_keeps_the_old_one_if_broken() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);
    let (mut c, _) = postern.implicit().await;
    c.auth_plain("newbie", PASSWORD, "535").await;

    std::fs::write(
        postern.users_path(),
        format!("{USER}:{{PLAIN}}{PASSWORD}\nnewbie:{{PLAIN}}{PASSWORD}\n"),
    )
    .unwrap();
    postern.signal("HUP");
    let deadline = Instant::now() + STEP;
    loop {
        let (mut c, _) = postern.implicit().await;
        let r = c
            .cmd(
                &format!("AUTH PLAIN {}", plain_response("newbie", PASSWORD)),
                "",
            )
            .await;
        if r.code == 235 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "users file not reloaded: {}",
            r.raw
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A broken file is refused; the users loaded before stay valid.
    std::fs::write(postern.users_path(), "newbie:{NOSUCH}x\n").unwrap();
    postern.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut c, _) = postern.implicit().await;
    c.auth_plain("newbie", PASSWORD, "235").await;
    assert!(
        postern.log().to_lowercase().contains("nosuch"),
        "reload error not logged"
    );
}

#[tokio::test]
async fn a_second_signal_exits_at_once_without_waiting_for_the_grace() {
    let backend = RawBackend::start();
    let mut postern = Postern::builder(backend.addr)
        .flag("--shutdown-grace", "60s")
        .start();
    let mut relayed = postern.authenticated(true).await;
    relayed.cmd("MAIL FROM:<slow@client.test>", "250").await;

    postern.signal("TERM");
    wait_until(STEP, "listeners to close", || {
        (!accepts(postern.smtp)).then_some(())
    });
    assert!(
        postern.is_running(),
        "the relayed session holds the drain open"
    );
    let t = Instant::now();
    postern.signal("INT");
    let status = postern.wait_exit(STEP);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(status.success(), "{status}");
    drop(relayed);
}
