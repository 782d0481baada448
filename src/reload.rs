//! Live reload of the certificate/key and the users file, on SIGHUP and when the files
//! change on disk. Kubernetes updates a mounted Secret by swapping a symlink, so files
//! are compared by what their path resolves to now (inode, size, mtime), polled.
//! A bad new file is refused and the old one stays in use.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{error, info};

use crate::server::Shared;
use crate::users::UserDb;
use crate::{metrics, tls};

/// How often the files are checked for changes.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The files to watch.
pub struct Paths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub users: PathBuf,
}

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
pub async fn watch(shared: Arc<Shared>, paths: Paths) {
    let mut hangup = hangup_signal();
    let tls_print = |p: &Paths| (Fingerprint::of(&p.cert), Fingerprint::of(&p.key));
    let mut tls_seen = tls_print(&paths);
    let mut users_seen = Fingerprint::of(&paths.users);
    loop {
        let forced = tokio::select! {
            () = tokio::time::sleep(POLL_INTERVAL) => false,
            () = hangup.recv() => true,
        };
        if forced {
            info!("SIGHUP: reloading certificate and users");
        }
        let tls_now = tls_print(&paths);
        if forced || tls_now != tls_seen {
            tls_seen = tls_now;
            reload_tls(&shared, &paths);
        }
        let users_now = Fingerprint::of(&paths.users);
        if forced || users_now != users_seen {
            users_seen = users_now;
            reload_users(&shared, &paths.users);
        }
    }
}

fn reload_tls(shared: &Shared, paths: &Paths) {
    match tls::load_server_config(&paths.cert, &paths.key) {
        Ok(config) => {
            shared.replace_tls(config);
            metrics::reload(true);
            info!(cert = %paths.cert.display(), "certificate reloaded");
        }
        Err(message) => {
            metrics::reload(false);
            error!(error = %message, "certificate reload refused; the previous certificate stays in use");
        }
    }
}

fn reload_users(shared: &Shared, path: &Path) {
    match UserDb::load(path) {
        Ok(users) => {
            let count = users.len();
            shared.replace_users(users);
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
