//! Certificates the way operators run them (issue 15): several names by SNI, each pair
//! reloaded on its own, expiry in metrics and logs, `postern check` naming the usual
//! mistakes, TLS 1.2 in the server's cipher order, and the expiry alert under promtool.
//! Every certificate is made with the openssl command line (`tests/openssl_ca`); every
//! client is a real one: `openssl s_client`, Python's `ssl`, swaks.

use crate::common;
use crate::common::openssl_ca;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::postern::{USER, command};
use common::*;
use openssl_ca::{Ca, KeyType, Leaf, Validity, enddate_unix, first_pem};

/// Three pairs for three names, the first the default.
struct Site {
    _dir: tempfile::TempDir,
    ca: Ca,
    /// mx.example.test: the first pair, so the default.
    mx: Leaf,
    /// *.example.org and example.org.
    org: Leaf,
    /// smtp.example.net, expiring in 10 days.
    net: Leaf,
}

fn site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let mx = ca.leaf(
        "mx",
        &["mx.example.test"],
        KeyType::EcdsaP256,
        Validity::NORMAL,
    );
    let org = ca.leaf(
        "org",
        &["*.example.org", "example.org"],
        KeyType::Rsa(2048),
        Validity {
            from_days: -1,
            to_days: 200,
        },
    );
    let net = ca.leaf(
        "net",
        &["smtp.example.net"],
        KeyType::EcdsaP256,
        Validity {
            from_days: -80,
            to_days: 10,
        },
    );
    Site {
        _dir: dir,
        ca,
        mx,
        org,
        net,
    }
}

fn list(paths: &[&Path]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// postern serving `pairs` (chain, key) in order, with /metrics.
fn serve(backend: &RawBackend, pairs: &[(&Path, &Path)]) -> (Postern, SocketAddr) {
    let certs: Vec<&Path> = pairs.iter().map(|p| p.0).collect();
    let keys: Vec<&Path> = pairs.iter().map(|p| p.1).collect();
    let postern = Postern::builder(backend.addr)
        // --cert a,b on the command line splits like POSTERN_CERT=a,b.
        .flag("--cert", list(&certs))
        .flag("--key", list(&keys))
        .flag("--hostname", "mx.example.test")
        .listen("--metrics-listen", V4)
        .start();
    let admin = postern.addr("--metrics-listen");
    (postern, admin)
}

/// What `openssl s_client` is served on implicit TLS: the leaf's PEM (normalised) and
/// s_client's whole output. With `sni`, the name is also verified against the root.
fn s_client(addr: SocketAddr, sni: Option<&str>, root: &Path) -> (String, String) {
    let mut cmd = Command::new("openssl");
    cmd.arg("s_client")
        .args(["-connect", &addr.to_string()])
        .arg("-CAfile")
        .arg(root)
        .arg("-verify_return_error");
    match sni {
        Some(name) => cmd.args(["-servername", name, "-verify_hostname", name]),
        None => cmd.arg("-noservername"),
    };
    let out = run(&mut cmd, b"", STEP);
    let all = format!("{}{}", out.stdout, out.stderr);
    let pem = first_pem(&out.stdout).unwrap_or_else(|| panic!("no certificate: {all}"));
    assert!(all.contains("Verify return code: 0 (ok)"), "{all}");
    (pem, all)
}

fn pem_of(path: &Path) -> String {
    first_pem(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn real_clients_get_the_certificate_for_the_name_they_ask_for() {
    let started = Instant::now();
    let site = site();
    let backend = RawBackend::start();
    let (postern, _) = serve(
        &backend,
        &[
            (&site.mx.chain, &site.mx.key),
            (&site.org.chain, &site.org.key),
            (&site.net.chain, &site.net.key),
        ],
    );
    let root = &site.ca.root;
    // openssl s_client: each name, a wildcard, the default without SNI or on no match.
    for (sni, want) in [
        (Some("mx.example.test"), &site.mx),
        (Some("smtp.example.org"), &site.org),
        (Some("example.org"), &site.org),
        (Some("SMTP.EXAMPLE.NET"), &site.net),
        (None, &site.mx),
    ] {
        let (served, _) = s_client(postern.smtps, sni, root);
        assert_eq!(served, pem_of(&want.cert), "SNI {sni:?}");
    }
    // A name nobody covers, or one label too deep for the wildcard: the first pair,
    // which then fails the client's own name check.
    for sni in ["other.test", "a.b.example.org"] {
        let out = run(
            Command::new("openssl")
                .args(["s_client", "-connect", &postern.smtps.to_string()])
                .args(["-servername", sni]),
            b"",
            STEP,
        );
        assert_eq!(first_pem(&out.stdout), Some(pem_of(&site.mx.cert)), "{sni}");
    }

    // Python's ssl, verifying the name against the root, on implicit TLS.
    let script = "import socket, ssl, sys\n\
        ctx = ssl.create_default_context(cafile=sys.argv[3])\n\
        with socket.create_connection(('127.0.0.1', int(sys.argv[2])), timeout=10) as s:\n\
        \x20   with ctx.wrap_socket(s, server_hostname=sys.argv[1]) as t:\n\
        \x20       cert = t.getpeercert()\n\
        \x20       print(dict(x[0] for x in cert['subject'])['commonName'])\n\
        \x20       print(t.version(), t.cipher()[0])\n";
    for (name, cn) in [
        ("mail.example.org", "*.example.org"),
        ("smtp.example.net", "smtp.example.net"),
        ("mx.example.test", "mx.example.test"),
    ] {
        let out = run(
            Command::new("python3")
                .args(["-c", script, name, &postern.smtps.port().to_string()])
                .arg(root),
            b"",
            STEP,
        );
        out.assert_success(&format!("python ssl {name}"));
        assert_eq!(out.stdout.lines().next(), Some(cn), "{out}");
    }
    // And one that asks for a name with no certificate is refused by Python itself.
    let out = run(
        Command::new("python3")
            .args([
                "-c",
                script,
                "other.test",
                &postern.smtps.port().to_string(),
            ])
            .arg(root),
        b"",
        STEP,
    );
    assert!(
        !out.status.success() && out.stderr.contains("CERTIFICATE_VERIFY_FAILED"),
        "{out}"
    );

    // swaks over STARTTLS with SNI and AUTH: the peer certificate it saved is the one
    // for that name.
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("peer.pem");
    let out = run(
        Command::new("swaks")
            .args(["--server", "127.0.0.1", "--port"])
            .arg(postern.smtp.port().to_string())
            .args([
                "--tls",
                "--tls-sni",
                "smtp.example.org",
                "--tls-get-peer-cert",
            ])
            .arg(&saved)
            .args(["--helo", "client.test", "--quit-after", "AUTH"])
            .args([
                "--auth",
                "PLAIN",
                "--auth-user",
                USER,
                "--auth-password",
                PASSWORD,
            ])
            .args(["--timeout", "20"]),
        b"",
        STEP * 2,
    );
    out.assert_success("swaks --tls-sni");
    assert_eq!(
        first_pem(&std::fs::read_to_string(&saved).unwrap()),
        Some(pem_of(&site.org.cert)),
        "{out}"
    );
    assert!(out.stdout.contains("235 "), "{out}");
    eprintln!("real clients: {:?}", started.elapsed());
}

async fn expiry_gauges(admin: SocketAddr) -> Vec<(String, f64)> {
    let (_, body) = http_get(admin, "/metrics").await;
    body.lines()
        .filter_map(|l| l.strip_prefix("postern_certificate_expiry_timestamp_seconds{name=\""))
        .filter_map(|rest| {
            let (name, value) = rest.split_once("\"} ")?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

async fn gauge(admin: SocketAddr, name: &str) -> Option<f64> {
    expiry_gauges(admin)
        .await
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
}

#[tokio::test]
async fn the_expiry_gauge_is_openssl_enddate_and_a_soon_expiry_is_logged() {
    let site = site();
    let backend = RawBackend::start();
    let (postern, admin) = serve(
        &backend,
        &[
            (&site.mx.chain, &site.mx.key),
            (&site.org.chain, &site.org.key),
            (&site.net.chain, &site.net.key),
        ],
    );
    let mut got = expiry_gauges(admin).await;
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let want = |leaf: &Leaf| enddate_unix(&leaf.cert) as f64;
    assert_eq!(
        got,
        [
            ("*.example.org".to_owned(), want(&site.org)),
            ("mx.example.test".to_owned(), want(&site.mx)),
            ("smtp.example.net".to_owned(), want(&site.net)),
        ]
    );
    // net ends in 10 days: one warning at start-up, naming it; the others are quiet.
    let log = postern.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("expires on"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("(smtp.example.net): expires on") && warnings[0].contains("renew it"),
        "{log}"
    );
}

/// Overwrites a pair's files in place (as certbot's deploy hook or a `cp` would).
fn replace(target: &Leaf, with: &Leaf) {
    std::fs::copy(&with.chain, &target.chain).unwrap();
    std::fs::copy(&with.key, &target.key).unwrap();
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + STEP;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn reloading_one_pair_leaves_the_other_untouched() {
    let site = site();
    let backend = RawBackend::start();
    let (postern, admin) = serve(
        &backend,
        &[
            (&site.mx.chain, &site.mx.key),
            (&site.org.chain, &site.org.key),
        ],
    );
    let root = site.ca.root.clone();
    let served = |name: &'static str| {
        let root = root.clone();
        let addr = postern.smtps;
        async move {
            tokio::task::spawn_blocking(move || s_client(addr, Some(name), &root).0)
                .await
                .unwrap()
        }
    };
    let mx_before = served("mx.example.test").await;
    assert_eq!(mx_before, pem_of(&site.mx.cert));

    // A renewed org certificate, later end date: served for org, counted, gauge moved.
    let renewed = site.ca.leaf(
        "org-renewed",
        &["*.example.org", "example.org"],
        KeyType::EcdsaP256,
        Validity {
            from_days: -1,
            to_days: 300,
        },
    );
    replace(&site.org, &renewed);
    let want = pem_of(&renewed.cert);
    eventually("the renewed org certificate", || {
        let want = want.clone();
        let served = served("smtp.example.org");
        async move { served.await == want }
    })
    .await;
    assert_eq!(served("mx.example.test").await, mx_before);
    assert_eq!(
        gauge(admin, "*.example.org").await,
        Some(enddate_unix(&renewed.cert) as f64)
    );
    assert_eq!(
        gauge(admin, "mx.example.test").await,
        Some(enddate_unix(&site.mx.cert) as f64)
    );

    // A broken org (intermediate first): refused with the reason, org keeps the
    // renewed version, mx is untouched. SIGHUP reloads every pair; only org fails.
    std::fs::copy(&renewed.reversed, &site.org.chain).unwrap();
    postern.signal("HUP");
    eventually("the refused reload to be counted", || async {
        metric_sum(admin, "postern_reloads_total{result=\"error\"}").await >= Some(1.0)
    })
    .await;
    assert_eq!(served("smtp.example.org").await, want);
    assert_eq!(served("mx.example.test").await, mx_before);
    let log = postern.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("certificate reload refused"))
        .collect();
    assert!(
        !refused.is_empty()
            && refused
                .iter()
                .all(|l| l.contains("org.chain.pem") && l.contains("wrong order")),
        "{log}"
    );
}

/// (case, cert, key, --hostname, exit 0?, texts expected on stdout or stderr)
type CheckCase<'a> = (
    &'a str,
    &'a PathBuf,
    &'a PathBuf,
    &'a str,
    bool,
    Vec<&'a str>,
);

/// `postern check` on one pair plus the default harness settings.
fn check(backend: &RawBackend, cert: &Path, key: &Path, hostname: &str) -> Output {
    Postern::builder(backend.addr)
        .flag("--cert", cert.display().to_string())
        .flag("--key", key.display().to_string())
        .flag("--hostname", hostname)
        .check()
}

#[test]
fn check_names_each_usual_mistake_and_its_fix() {
    let site = site();
    let backend = RawBackend::start();
    let ca = &site.ca;
    let expired = ca.leaf(
        "expired",
        &["mx.example.test"],
        KeyType::EcdsaP256,
        Validity {
            from_days: -100,
            to_days: -3,
        },
    );
    let future = ca.leaf(
        "future",
        &["mx.example.test"],
        KeyType::EcdsaP256,
        Validity {
            from_days: 5,
            to_days: 100,
        },
    );
    let small = ca.leaf(
        "small",
        &["mx.example.test"],
        KeyType::Rsa(1024),
        Validity::NORMAL,
    );
    let mx = &site.mx;
    let cases: Vec<CheckCase> = vec![
        (
            "a full chain in order",
            &mx.chain,
            &mx.key,
            "mx.example.test",
            true,
            vec!["ok: certificate", "(names: mx.example.test; expires 20"],
        ),
        (
            "intermediate first",
            &mx.reversed,
            &mx.key,
            "mx.example.test",
            false,
            vec![
                "postern: certificate ",
                "mx.reversed.pem: wrong order: the certificate for key ",
                "(CN=mx.example.test) is number 2 in the file, but the server certificate \
                 must come first: reorder the file as server certificate, then \
                 intermediate(s)",
            ],
        ),
        (
            "the leaf alone",
            &mx.cert,
            &mx.key,
            "mx.example.test",
            false,
            vec![
                "mx.pem: missing intermediate: the file has no certificate for the issuer \
                 CN=postern test intermediate and clients will refuse the chain (\"unable to \
                 verify the first certificate\"): append the intermediate certificate(s) after \
                 the server certificate (with ACME clients, use fullchain.pem, not cert.pem)",
            ],
        ),
        (
            "expired",
            &expired.chain,
            &expired.key,
            "mx.example.test",
            false,
            vec!["expired.chain.pem: expired on 20", "(3 days ago): renew it"],
        ),
        (
            "not yet valid",
            &future.chain,
            &future.key,
            "mx.example.test",
            false,
            vec![
                "future.chain.pem: not valid before 20",
                "check this machine's clock, or keep the previous certificate until then",
            ],
        ),
        (
            "RSA 1024",
            &small.chain,
            &small.key,
            "mx.example.test",
            false,
            vec![
                "small.chain.pem: its RSA key has 1024 bits; clients refuse keys under 2048 \
                 bits: get a new certificate with an RSA key of at least 2048 bits or an \
                 ECDSA key",
            ],
        ),
        (
            "hostname not covered: a warning",
            &mx.chain,
            &mx.key,
            "mail.other.test",
            true,
            vec![
                "warning: --hostname mail.other.test is not among the certificates' names \
                 (mx.example.test): clients that connect to mail.other.test will refuse the \
                 certificate: add it to a certificate's names, or set --hostname to one of \
                 them",
                "configuration ok",
            ],
        ),
        (
            "expiring in 10 days: a warning",
            &site.net.chain,
            &site.net.key,
            "smtp.example.net",
            true,
            vec![
                "warning: certificate ",
                "net.chain.pem (smtp.example.net): expires on 20",
                "days: renew it",
            ],
        ),
        (
            "a key for another certificate",
            &mx.chain,
            &site.net.key,
            "mx.example.test",
            false,
            vec!["net.key does not match any of the 2 certificates in "],
        ),
    ];
    for (case, cert, key, hostname, ok, texts) in cases {
        let out = check(&backend, cert, key, hostname);
        assert_eq!(out.status.success(), ok, "{case}: {out}");
        let all = format!("{}{}", out.stdout, out.stderr);
        for text in texts {
            assert!(all.contains(text), "{case}: {text:?} missing from\n{out}");
        }
        if ok {
            assert!(!all.contains("error"), "{case}: {out}");
        } else {
            assert!(
                !out.stdout.contains("configuration ok"),
                "{case}: check passed: {out}"
            );
        }
    }

    // serve refuses to start on the same errors, with the same words.
    let out = Postern::builder(backend.addr)
        .flag("--cert", mx.reversed.display().to_string())
        .flag("--key", mx.key.display().to_string())
        .run_to_exit();
    assert!(!out.status.success(), "{out}");
    assert!(out.stderr.contains("wrong order"), "{out}");
}

#[test]
fn pairs_come_as_repeated_flags_or_comma_separated_environment_lists() {
    let site = site();
    let backend = RawBackend::start();
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(&users, format!("{USER}:{{PLAIN}}{PASSWORD}\n")).unwrap();
    let base = |cmd: &mut Command| {
        cmd.arg("check")
            .args(["--backend", &backend.addr.to_string()])
            .arg("--users")
            .arg(&users)
            .args(["--listen", &free_addr().to_string()])
            .args(["--hostname", "mx.example.test"]);
    };
    // Repeated flags, every pair checked: the second is broken.
    let mut cmd = command();
    base(&mut cmd);
    cmd.arg("--cert")
        .arg(&site.mx.chain)
        .arg("--key")
        .arg(&site.mx.key);
    cmd.arg("--cert")
        .arg(&site.org.reversed)
        .arg("--key")
        .arg(&site.org.key);
    let out = run(&mut cmd, b"", STEP);
    assert!(!out.status.success(), "{out}");
    assert!(
        out.stderr.contains("org.reversed.pem: wrong order"),
        "{out}"
    );

    // POSTERN_CERT / POSTERN_KEY lists: both pairs reported.
    let mut cmd = command();
    base(&mut cmd);
    cmd.env("POSTERN_CERT", list(&[&site.mx.chain, &site.org.chain]))
        .env("POSTERN_KEY", list(&[&site.mx.key, &site.org.key]));
    let out = run(&mut cmd, b"", STEP);
    out.assert_success("check with POSTERN_CERT lists");
    assert!(
        out.stdout.contains("(names: mx.example.test;")
            && out.stdout.contains("(names: *.example.org, example.org;"),
        "{out}"
    );

    // Unequal counts name the fix.
    let mut cmd = command();
    base(&mut cmd);
    cmd.arg("--cert")
        .arg(&site.mx.chain)
        .arg("--cert")
        .arg(&site.org.chain);
    cmd.arg("--key").arg(&site.mx.key);
    let out = run(&mut cmd, b"", STEP);
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(
        out.stderr
            .contains("--cert given 2 times but --key once: give one --key per --cert"),
        "{out}"
    );
}

#[test]
fn tls12_follows_the_server_cipher_order() {
    let site = site();
    let backend = RawBackend::start();
    let (postern, _) = serve(
        &backend,
        &[
            (&site.mx.chain, &site.mx.key),
            (&site.org.chain, &site.org.key),
        ],
    );
    let negotiated = |sni: &str, version: &str, offer: (&str, &str)| {
        let out = run(
            Command::new("openssl")
                .args(["s_client", "-connect", &postern.smtps.to_string()])
                .args(["-servername", sni, version, offer.0, offer.1]),
            b"",
            STEP,
        );
        out.stdout
            .lines()
            .find_map(|l| l.split_once("Cipher is ").map(|(_, c)| c.trim().to_owned()))
            .unwrap_or_else(|| panic!("no cipher: {out}"))
    };
    // The client lists AES-128 first; the server's order wins.
    let weak_first = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:\
                      ECDHE-ECDSA-AES256-GCM-SHA384";
    assert_eq!(
        negotiated("mx.example.test", "-tls1_2", ("-cipher", weak_first)),
        "ECDHE-ECDSA-AES256-GCM-SHA384"
    );
    assert_eq!(
        negotiated(
            "mx.example.test",
            "-tls1_2",
            (
                "-cipher",
                "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305"
            )
        ),
        "ECDHE-ECDSA-CHACHA20-POLY1305"
    );
    // The RSA pair, by SNI, follows the same order.
    assert_eq!(
        negotiated(
            "smtp.example.org",
            "-tls1_2",
            (
                "-cipher",
                "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384"
            )
        ),
        "ECDHE-RSA-AES256-GCM-SHA384"
    );
    // TLS 1.3 keeps rustls's own order.
    assert_eq!(
        negotiated(
            "mx.example.test",
            "-tls1_3",
            (
                "-ciphersuites",
                "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"
            )
        ),
        "TLS_AES_256_GCM_SHA384"
    );
}

#[test]
fn the_expiry_alert_passes_promtool() {
    let promtool = Command::new("promtool").arg("--version").output();
    if promtool.is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is missing in CI: .ci/run installs the prometheus package"
        );
        eprintln!(
            "SKIPPED the_expiry_alert_passes_promtool: promtool not installed \
             (apt-get install prometheus)"
        );
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    let out = run(
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(dir.join("postern-alerts.yaml")),
        b"",
        STEP,
    );
    out.assert_success("promtool check rules");
    let out = run(
        Command::new("promtool")
            .args(["test", "rules"])
            .arg(dir.join("postern-alerts.test.yaml")),
        b"",
        STEP,
    );
    out.assert_success("promtool test rules");
    let rules = std::fs::read_to_string(dir.join("postern-alerts.yaml")).unwrap();
    assert!(
        rules.contains("alert: PosternCertificateExpiresSoon")
            && rules.contains("postern_certificate_expiry_timestamp_seconds"),
        "{rules}"
    );
}
