//! Live reload as Kubernetes does it: the certificate and the users file change on disk
//! (a Secret update swaps a `..data` symlink), with no signal. New sessions use the new
//! files, sessions already open are untouched, and a broken file is refused while the
//! old one keeps working. Also: the session gauge returns to zero.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::postern::USER;
use common::*;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::ServerName;

/// A directory laid out like a mounted Secret: `tls.crt`, `tls.key` and `users` are
/// symlinks into `..data`, itself a symlink to a versioned directory.
struct SecretDir {
    root: tempfile::TempDir,
    version: u32,
}

impl SecretDir {
    fn new(cert: &str, key: &str, users: &str) -> SecretDir {
        let root = tempfile::tempdir().unwrap();
        let mut dir = SecretDir { root, version: 0 };
        dir.update(cert, key, users);
        for name in ["tls.crt", "tls.key", "users"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.path(name)).unwrap();
        }
        dir
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.root.path().join(name)
    }

    /// Writes a new version and swaps `..data` to it atomically (rename over the link),
    /// as the kubelet does.
    fn update(&mut self, cert: &str, key: &str, users: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        let dir = self.root.path().join(&version);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("tls.crt"), cert).unwrap();
        std::fs::write(dir.join("tls.key"), key).unwrap();
        std::fs::write(dir.join("users"), users).unwrap();
        let tmp = self.root.path().join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.root.path().join("..data")).unwrap();
    }
}

fn start(secret: &SecretDir, backend: &RawBackend) -> (Postern, std::net::SocketAddr) {
    let postern = Postern::builder(backend.addr)
        .flag("--cert", secret.path("tls.crt").display().to_string())
        .flag("--key", secret.path("tls.key").display().to_string())
        .flag("--users", secret.path("users").display().to_string())
        .listen("--metrics-listen", V4)
        .start();
    let admin = postern.addr("--metrics-listen");
    (postern, admin)
}

/// Whether a TLS handshake with the implicit-TLS port succeeds when trusting `config`.
async fn handshake_ok(addr: std::net::SocketAddr, config: Arc<ClientConfig>) -> bool {
    let tcp = within("connect", tokio::net::TcpStream::connect(addr))
        .await
        .unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    within("handshake", TlsConnector::from(config).connect(name, tcp))
        .await
        .is_ok()
}

async fn metric(admin: std::net::SocketAddr, line_start: &str) -> Option<f64> {
    let (_, body) = http_get(admin, "/metrics").await;
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn users_line(user: &str) -> String {
    format!("{user}:{{PLAIN}}{PASSWORD}\n")
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
async fn a_certificate_swapped_on_disk_is_served_to_new_clients_and_a_broken_one_is_refused() {
    let old = TestCerts::generate();
    let new = TestCerts::generate();
    let mut secret = SecretDir::new(&old.cert_pem, &old.key_pem, &users_line(USER));
    let backend = RawBackend::start();
    let (postern, admin) = start(&secret, &backend);
    assert!(handshake_ok(postern.smtps, old.client_config()).await);

    // A session relaying under the old certificate.
    let mut live =
        SmtpClient::authenticated(postern.smtps, true, old.client_config(), USER, PASSWORD).await;

    secret.update(&new.cert_pem, &new.key_pem, &users_line(USER));
    eventually("the new certificate to be served", || {
        handshake_ok(postern.smtps, new.client_config())
    })
    .await;
    assert!(!handshake_ok(postern.smtps, old.client_config()).await);
    live.cmd("MAIL FROM:<still@client.test>", "250").await;

    // The new certificate with a key that does not match it: refused, counted, and the
    // certificate in use stays the new one.
    secret.update(&new.cert_pem, &old.key_pem, &users_line(USER));
    eventually("the broken reload to be counted", || async {
        metric(admin, "postern_reloads_total{result=\"error\"}").await >= Some(1.0)
    })
    .await;
    assert!(handshake_ok(postern.smtps, new.client_config()).await);
    assert!(
        postern.log().contains("certificate reload refused"),
        "{}",
        postern.log()
    );
    live.cmd("RCPT TO:<b@backend.test>", "250").await;
    live.cmd("QUIT", "221").await;
}

#[tokio::test]
async fn a_user_removed_on_disk_cannot_log_in_again_but_keeps_the_session_it_has() {
    let certs = TestCerts::generate();
    let mut secret = SecretDir::new(
        &certs.cert_pem,
        &certs.key_pem,
        &(users_line(USER) + &users_line("bob")),
    );
    let backend = RawBackend::start();
    let (postern, admin) = start(&secret, &backend);
    let config = certs.client_config();
    let mut live =
        SmtpClient::authenticated(postern.smtps, true, config.clone(), USER, PASSWORD).await;

    secret.update(&certs.cert_pem, &certs.key_pem, &users_line("bob"));
    eventually("alice to be removed", || {
        let config = config.clone();
        async move {
            let (mut c, _) = SmtpClient::connect_implicit(postern.smtps, config).await;
            let reply = c
                .cmd(
                    &format!("AUTH PLAIN {}", plain_response(USER, PASSWORD)),
                    "",
                )
                .await;
            reply.code == 535
        }
    })
    .await;
    // bob, added before, still logs in; alice's open session still relays.
    SmtpClient::authenticated(postern.smtps, true, config.clone(), "bob", PASSWORD).await;
    live.cmd("MAIL FROM:<alice@client.test>", "250").await;
    live.cmd("QUIT", "221").await;
    drop(live);

    // Every session is over: the gauge is back to zero and relayed bytes were counted.
    eventually("postern_connections_active to return to 0", || async {
        metric(admin, "postern_connections_active").await == Some(0.0)
    })
    .await;
    let to_backend = metric(
        admin,
        "postern_bytes_total{direction=\"client_to_backend\"}",
    )
    .await;
    assert!(to_backend.unwrap_or(0.0) > 0.0, "{to_backend:?}");
    assert!(metric(admin, "postern_reloads_total{result=\"ok\"}").await >= Some(1.0));
}
