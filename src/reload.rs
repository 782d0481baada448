//! Live reload of the certificate/key pairs and the users file, on SIGHUP and when the
//! files change on disk. Kubernetes updates a mounted Secret by swapping a symlink, so
//! files are compared by what their path resolves to now (inode, size, mtime), polled.
//! Each pair reloads on its own: a bad new file is refused, that pair keeps its old
//! version, and the other pairs are not touched.
//!
//! Once a day, a certificate under 30 days from its end is logged as a warning: an
//! expiry nobody reads in metrics still shows up in the logs.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{error, info, warn};

use crate::auth::Authenticator;
use crate::metrics;
use crate::tls::{self, Certificates, check};
use crate::users::UserDb;

/// How often the files are checked for changes.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// How often certificates close to their end are logged.
const EXPIRY_LOG_INTERVAL: Duration = Duration::from_secs(86_400);

/// What identifies a file's current content without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint(Option<(u64, u64, SystemTime)>);

impl Fingerprint {
    fn of(path: &Path) -> Self {
        Fingerprint(fs::metadata(path).ok().map(|m| {
            #[cfg(unix)]
            let inode = std::os::unix::fs::MetadataExt::ino(&m);
            #[cfg(not(unix))]
            let inode = 0;
            (
                inode,
                m.len(),
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            )
        }))
    }
}

/// Watches for SIGHUP and file changes until the process exits.
/// `users` is the users file of a file source; with another source a SIGHUP drops the
/// cached logins (`--auth-cache-ttl`) instead.
pub async fn watch(
    certificates: Arc<Certificates>,
    auth: Arc<Authenticator>,
    users: Option<PathBuf>,
) {
    let mut hangup = hangup_signal();
    let pair_print = |pair: &tls::Pair| (Fingerprint::of(&pair.cert), Fingerprint::of(&pair.key));
    let mut pairs_seen: Vec<_> = certificates.pairs().map(pair_print).collect();
    let mut users_seen = users.as_deref().map(Fingerprint::of);
    // Start-up already logged what expires soon; the next look is a day later.
    let mut daily = tokio::time::interval_at(
        tokio::time::Instant::now() + EXPIRY_LOG_INTERVAL,
        EXPIRY_LOG_INTERVAL,
    );
    loop {
        let forced = tokio::select! {
            () = tokio::time::sleep(POLL_INTERVAL) => false,
            () = hangup.recv() => true,
            _ = daily.tick() => {
                log_expiring(&certificates);
                continue;
            }
        };
        if forced {
            info!("SIGHUP: reloading certificates and users");
        }
        for (index, pair) in certificates.pairs().enumerate() {
            let now = pair_print(pair);
            if let Some(seen) = pairs_seen.get_mut(index)
                && (forced || *seen != now)
            {
                *seen = now;
                reload_pair(&certificates, index, pair);
            }
        }
        match &users {
            Some(path) => {
                let users_now = Some(Fingerprint::of(path));
                if forced || users_now != users_seen {
                    users_seen = users_now;
                    reload_users(&auth, path);
                }
            }
            None if forced => auth.forget(),
            None => {}
        }
    }
}

/// Sets the expiry gauge of every pair.
pub fn publish_expiry(certificates: &Certificates) {
    for index in 0..certificates.pairs().count() {
        if let Some(current) = certificates.current(index) {
            metrics::certificate_expiry(&current.leaf.label, current.leaf.not_after);
        }
    }
}

fn reload_pair(certificates: &Certificates, index: usize, pair: &tls::Pair) {
    match tls::load_pair(pair, check::now()) {
        Ok(accepted) => {
            for warning in &accepted.warnings {
                warn!(cert = %pair.cert.display(), "{warning}");
            }
            let leaf = accepted.loaded.leaf.clone();
            certificates.replace(index, accepted.loaded);
            metrics::certificate_expiry(&leaf.label, leaf.not_after);
            metrics::reload(true);
            info!(cert = %pair.cert.display(), name = %leaf.label, expires = %check::date(leaf.not_after), "certificate reloaded");
        }
        Err(errors) => {
            metrics::reload(false);
            error!(cert = %pair.cert.display(), error = %errors.join("; "), "certificate reload refused; the previous certificate stays in use");
        }
    }
}

fn log_expiring(certificates: &Certificates) {
    let now = check::now();
    for (index, pair) in certificates.pairs().enumerate() {
        if let Some(current) = certificates.current(index)
            && let Some(text) =
                check::expiry_warning(&pair.cert.display().to_string(), &current.leaf, now)
        {
            warn!(cert = %pair.cert.display(), "{text}");
        }
    }
}

fn reload_users(auth: &Authenticator, path: &Path) {
    match UserDb::load(path) {
        Ok(users) => {
            let count = users.len();
            auth.replace_users(users);
            metrics::reload(true);
            info!(users = count, "users file reloaded");
        }
        Err(e) => {
            metrics::reload(false);
            error!(error = %e, "users file reload refused; the previous users stay in use");
        }
    }
}

/// SIGHUP as a stream of `()`; on platforms without it, never.
struct Hangup(#[cfg(unix)] Option<tokio::signal::unix::Signal>);

impl Hangup {
    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = self.0.as_mut()
            && signal.recv().await.is_some()
        {
            return;
        }
        std::future::pending::<()>().await
    }
}

fn hangup_signal() -> Hangup {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        Hangup(signal(SignalKind::hangup()).ok())
    }
    #[cfg(not(unix))]
    {
        Hangup()
    }
}
