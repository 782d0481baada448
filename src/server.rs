//! `postern serve`: loads the configuration, starts the backend probe and the
//! listeners, and stops on SIGTERM/SIGINT.

use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tracing::{info, warn};

use crate::tls::Certificates;

use crate::config::{DEFAULT_LISTEN, DEFAULT_LISTEN_TLS, ServeArgs};
use crate::conn::Timeouts;
use crate::limits::{
    AuthGate, AuthLimits, FailurePace, NetGrouping, PerNetSlots, THROTTLE_LOG_INTERVAL, ThrottleLog,
};
use crate::sasl::Mechanism;
use crate::session::{Limits as SessionLimits, ListenerKind};
use crate::smtp::{Capabilities, xclient};
use crate::users::UserDb;
use ipnet::IpNet;

use crate::{admin, backend, listener, metrics, proxy_proto, reload, tls};

/// Everything connections share. Certificates and users sit behind locks so a reload
/// can swap them for new sessions while running sessions keep their `Arc`.
pub struct Shared {
    pub hostname: Arc<str>,
    pub backend: String,
    pub timeouts: Timeouts,
    pub crypto: Arc<CryptoProvider>,
    /// Bounds concurrent password hash verifications (argon2 uses 64 MiB each).
    pub verify_slots: Semaphore,
    /// Verifications running or queued per client network
    /// (`--max-verifications-per-network`), so one network cannot take the whole pool.
    pub verifications_per_net: Arc<PerNetSlots>,
    pub shutdown: watch::Receiver<bool>,
    pub limits: SessionLimits,
    /// AUTH failures per client network and per user name (hashed, so a flood of long
    /// names cannot grow the table's memory).
    pub auth_gate: Arc<AuthGate>,
    /// How long a failed AUTH takes at least (the costliest hash's time).
    pub failure_pace: Arc<FailurePace>,
    /// Throttle log lines held back per network.
    pub throttle_log: ThrottleLog,
    /// `--auth-mechanisms`, if given; see [`Shared::mechanisms`].
    pub auth_mechanisms: Option<Vec<Mechanism>>,
    pub per_net: Arc<PerNetSlots>,
    /// How client addresses group into networks for every per-network limit.
    pub grouping: NetGrouping,
    /// Refused connections still waiting for their 421 (see
    /// [`listener::MAX_PENDING_REFUSALS`]).
    pub refusal_slots: Arc<Semaphore>,
    /// What the post-AUTH relay enforces: sending limits, --strict-data.
    pub relay: Arc<crate::relay::Policy>,
    pub xclient: bool,
    pub backend_proxy_protocol: Option<proxy_proto::Version>,
    /// `Some` with an MX listener: how the backend learns who an anonymous client is.
    pub mx_identity: Option<MxIdentity>,
    /// `Some` with `--proxy-protocol`: the networks whose PROXY headers are believed.
    pub proxy_protocol_from: Option<Vec<IpNet>>,
    user_hasher: RandomState,
    capabilities: watch::Receiver<Arc<Capabilities>>,
    /// One config for the process: a reload swaps a pair inside `certificates`, which
    /// is its certificate resolver.
    tls: Arc<ServerConfig>,
    pub certificates: Arc<Certificates>,
    users: RwLock<Arc<UserDb>>,
}

impl Shared {
    /// The failure-table key of a user name.
    pub fn user_key(&self, username: &str) -> u64 {
        self.user_hasher.hash_one(username)
    }

    /// The SASL mechanisms a new session offers: `--auth-mechanisms`, or PLAIN and LOGIN,
    /// with CRAM-MD5 only while every user of the current file can pass it.
    pub fn mechanisms(&self) -> Vec<Mechanism> {
        match &self.auth_mechanisms {
            Some(chosen) => chosen.clone(),
            None => default_mechanisms(&self.users()),
        }
    }

    /// The backend's capabilities as of the last successful probe.
    pub fn capabilities(&self) -> Arc<Capabilities> {
        let capabilities = self.capabilities.borrow().clone();
        if self.relay.hide_chunking && capabilities.has("CHUNKING") {
            return Arc::new(capabilities.without("CHUNKING"));
        }
        capabilities
    }

    pub fn tls_config(&self) -> Arc<ServerConfig> {
        self.tls.clone()
    }

    pub fn users(&self) -> Arc<UserDb> {
        match self.users.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// New verifications use `users`; a verification already running keeps its copy.
    pub fn replace_users(&self, users: UserDb) {
        let users = Arc::new(users);
        // A costlier decoy in the new file must pace failures from the first one on.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (pace, users) = (self.failure_pace.clone(), users.clone());
            runtime.spawn_blocking(move || pace.seed(users.time_decoy()));
        }
        match self.users.write() {
            Ok(mut guard) => *guard = users,
            Err(poisoned) => *poisoned.into_inner() = users,
        }
    }
}

/// The validated configuration of `serve`.
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub listen_tls: Vec<SocketAddr>,
    pub listen_mx: Vec<SocketAddr>,
    pub xclient: bool,
    pub backend_proxy_protocol: Option<proxy_proto::Version>,
    /// `Some` when there is an MX listener.
    pub mx_identity: Option<MxIdentity>,
    pub proxy_protocol_from: Option<Vec<IpNet>>,
    pub backend: String,
    /// `--cert`/`--key` pairs in order; the first is served when no SNI name matches.
    pub certs: Vec<tls::Pair>,
    pub users: PathBuf,
    pub hostname: String,
    pub timeouts: Timeouts,
    pub probe_interval: Duration,
    pub metrics_listen: Option<SocketAddr>,
    pub shutdown_grace: Duration,
    pub max_connections: u32,
    pub max_connections_per_ip: u32,
    pub max_connections_per_wide_prefix: u32,
    pub max_verifications_per_network: u32,
    /// `--ipv6-prefix` and `--ipv6-prefix-wide`.
    pub grouping: NetGrouping,
    pub session_limits: SessionLimits,
    pub max_auth_failures_per_ip: u32,
    pub max_auth_failures_per_user: u32,
    pub auth_failure_window: Duration,
    pub relay: Arc<crate::relay::Policy>,
    /// `--auth-mechanisms`, if given.
    pub auth_mechanisms: Option<Vec<Mechanism>>,
}

impl Config {
    pub fn from_args(args: &ServeArgs) -> Result<Config, String> {
        let (listen, listen_tls) =
            if args.listen.is_empty() && args.listen_tls.is_empty() && args.listen_mx.is_empty() {
                let parse = |a: &str| {
                    a.parse::<SocketAddr>()
                        .map_err(|e| format!("default address {a}: {e}"))
                };
                (
                    vec![parse(DEFAULT_LISTEN)?],
                    vec![parse(DEFAULT_LISTEN_TLS)?],
                )
            } else {
                (args.listen.clone(), args.listen_tls.clone())
            };
        if args
            .backend
            .rsplit_once(':')
            .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        {
            return Err(format!("--backend {:?}: expected HOST:PORT", args.backend));
        }
        let hostname = match &args.hostname {
            Some(name) => name.clone(),
            None => gethostname::gethostname().to_string_lossy().into_owned(),
        };
        if hostname.is_empty()
            || hostname
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "--hostname {hostname:?}: must be one word without control characters"
            ));
        }
        let proxy_protocol_from = match (args.proxy_protocol, args.proxy_protocol_from.is_empty()) {
            (true, true) => {
                return Err("--proxy-protocol needs --proxy-protocol-from: trusting PROXY headers from anyone lets any client claim any address".into());
            }
            (true, false) => Some(args.proxy_protocol_from.clone()),
            (false, _) => None,
        };
        if args.ipv6_prefix_wide > args.ipv6_prefix {
            return Err(format!(
                "--ipv6-prefix-wide {} is longer than --ipv6-prefix {}: the wide network must contain the narrow one",
                args.ipv6_prefix_wide, args.ipv6_prefix
            ));
        }
        let grouping = NetGrouping {
            v6_prefix: args.ipv6_prefix,
            v6_wide_prefix: args.ipv6_prefix_wide,
        };
        let mx_identity = if args.listen_mx.is_empty() {
            None
        } else {
            Some(MxIdentity::choose(
                args.xclient,
                args.backend_proxy_protocol,
                args.allow_mx_open_relay,
            )?)
        };
        Ok(Config {
            listen,
            listen_tls,
            listen_mx: args.listen_mx.clone(),
            xclient: args.xclient,
            backend_proxy_protocol: args.backend_proxy_protocol,
            mx_identity,
            proxy_protocol_from,
            backend: args.backend.clone(),
            certs: pairs(&args.cert, &args.key)?,
            users: args.users.clone(),
            hostname,
            timeouts: Timeouts {
                tls_handshake: args.tls_handshake_timeout,
                first_command: args.first_command_timeout,
                command: args.command_timeout,
                backend: args.backend_timeout,
                relay_idle: args.relay_idle_timeout,
                auth_deadline: args.auth_deadline,
            },
            probe_interval: args.probe_interval,
            metrics_listen: args.metrics_listen,
            shutdown_grace: args.shutdown_grace,
            max_connections: args.max_connections,
            max_connections_per_ip: args.max_connections_per_ip,
            max_connections_per_wide_prefix: args
                .max_connections_per_wide_prefix
                .unwrap_or(args.max_connections_per_ip.saturating_mul(4)),
            grouping,
            max_verifications_per_network: args.max_verifications_per_network,
            session_limits: SessionLimits {
                max_errors: args.max_errors,
                max_auth_failures: args.max_auth_failures,
                auth_failure_delay: args.auth_failure_delay,
                max_junk_commands: args.max_junk_commands,
            },
            max_auth_failures_per_ip: args.max_auth_failures_per_ip,
            max_auth_failures_per_user: args.max_auth_failures_per_user,
            auth_failure_window: args.auth_failure_window,
            relay: Arc::new(relay_policy(args)?),
            auth_mechanisms: (!args.auth_mechanisms.is_empty())
                .then(|| args.auth_mechanisms.clone()),
        })
    }

    fn listeners(&self) -> impl Iterator<Item = (SocketAddr, ListenerKind)> + '_ {
        let plain = self.listen.iter().map(|a| (*a, ListenerKind::Submission));
        let tls = self
            .listen_tls
            .iter()
            .map(|a| (*a, ListenerKind::ImplicitTls));
        let mx = self.listen_mx.iter().map(|a| (*a, ListenerKind::Mx));
        plain.chain(tls).chain(mx)
    }
}

/// How the backend learns who an anonymous `--listen-mx` client is. Without one of
/// these it sees postern's own address, and a backend that trusts that address (the
/// usual sidecar: Postfix `permit_mynetworks` with postern on loopback) relays mail from
/// anyone to anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MxIdentity {
    /// A PROXY header on every backend connection (`--backend-proxy-protocol`).
    ProxyHeader,
    /// XCLIENT ADDR (`--xclient`): a backend connection that does not offer it gets the
    /// client `451 4.3.0` at MAIL instead of a relay.
    Xclient,
    /// Neither, and the operator said so (`--allow-mx-open-relay`).
    Unidentified,
}

/// Why `--listen-mx` will not start as configured.
const MX_OPEN_RELAY: &str = "--listen-mx without --xclient or --backend-proxy-protocol: \
the backend would see every MX client as postern's own address and, if it trusts that \
address (Postfix mynetworks, loopback), relay mail from anyone to anywhere. Add --xclient \
(and postern's address to the backend's smtpd_authorized_xclient_hosts) or \
--backend-proxy-protocol; or, if the backend does not trust postern's address, \
--allow-mx-open-relay";

/// The start-up warning of [`MxIdentity::Unidentified`].
const MX_UNIDENTIFIED: &str = "--allow-mx-open-relay: the backend sees every MX client as \
postern's own address; it must not trust that address to relay (Postfix: keep it out of \
mynetworks)";

impl MxIdentity {
    /// The identity the flags give, or the error that names the fix. With both flags
    /// PROXY wins: it already carries the address, so XCLIENT is then only a bonus.
    pub fn choose(
        xclient: bool,
        proxy: Option<proxy_proto::Version>,
        allow_open_relay: bool,
    ) -> Result<MxIdentity, String> {
        match (proxy, xclient, allow_open_relay) {
            (Some(_), _, _) => Ok(MxIdentity::ProxyHeader),
            (None, true, _) => Ok(MxIdentity::Xclient),
            (None, false, true) => Ok(MxIdentity::Unidentified),
            (None, false, false) => Err(MX_OPEN_RELAY.to_owned()),
        }
    }
}

/// What is wrong with the backend's XCLIENT offer when `--xclient` is set, in words
/// for the start-up log and `postern check`; `None` if ADDR is offered or not needed.
/// The probe connects from postern's address as sessions do, so its EHLO shows what
/// `smtpd_authorized_xclient_hosts` grants postern.
pub fn xclient_gap(
    xclient: bool,
    mx_identity: Option<MxIdentity>,
    capabilities: &Capabilities,
) -> Option<String> {
    if !xclient {
        return None;
    }
    let problem = match xclient::offered_attributes(capabilities) {
        None => {
            "--xclient is set but the backend does not offer XCLIENT to postern \
                 (Postfix: add postern's address to smtpd_authorized_xclient_hosts)"
        }
        Some(offered) if !offered.iter().any(|a| a == "ADDR") => {
            "--xclient is set but the backend's XCLIENT does not take ADDR"
        }
        Some(_) => return None,
    };
    let consequence = if mx_identity == Some(MxIdentity::Xclient) {
        "anonymous MX sessions get 451 4.3.0 at MAIL until it does"
    } else {
        "sessions reach it without the client's address"
    };
    Some(format!("{problem}; {consequence}"))
}

/// `--cert` and `--key` paired in order; both default to one file, so a different count
/// means a flag was forgotten.
fn pairs(certs: &[PathBuf], keys: &[PathBuf]) -> Result<Vec<tls::Pair>, String> {
    if certs.len() != keys.len() {
        let times = |n: usize| {
            if n == 1 {
                "once".to_owned()
            } else {
                format!("{n} times")
            }
        };
        return Err(format!(
            "--cert given {} but --key {}: give one --key per --cert, in the same order \
             (POSTERN_CERT and POSTERN_KEY: comma-separated lists of equal length)",
            times(certs.len()),
            times(keys.len())
        ));
    }
    Ok(certs
        .iter()
        .zip(keys)
        .map(|(cert, key)| tls::Pair {
            cert: cert.clone(),
            key: key.clone(),
        })
        .collect())
}

/// PLAIN and LOGIN, and CRAM-MD5 when every user has a `{PLAIN}` secret: offering it to
/// a hashed user only earns that client a 535 (and smtplib tries it first).
fn default_mechanisms(users: &UserDb) -> Vec<Mechanism> {
    let mut mechanisms = vec![Mechanism::Plain, Mechanism::Login];
    if users.all_plain() {
        mechanisms.push(Mechanism::CramMd5);
    }
    mechanisms
}

/// Says at start-up which mechanisms are offered and why.
fn log_mechanisms(chosen: Option<&[Mechanism]>, users: &UserDb) {
    let hashed = users.hashed();
    match chosen {
        Some(chosen) => {
            let names: Vec<&str> = chosen.iter().map(|m| m.name()).collect();
            info!(mechanisms = %names.join(" "), "AUTH mechanisms from --auth-mechanisms");
            if chosen.contains(&Mechanism::CramMd5) && hashed > 0 {
                warn!(
                    hashed,
                    "--auth-mechanisms offers CRAM-MD5, which users with a hashed password cannot pass"
                );
            }
        }
        None if hashed == 0 => info!(
            "AUTH PLAIN LOGIN CRAM-MD5: every user has a {{PLAIN}} secret, so CRAM-MD5 is offered"
        ),
        None => info!(
            hashed,
            "AUTH PLAIN LOGIN: CRAM-MD5 is not offered because users with a hashed password cannot pass it (--auth-mechanisms to choose)"
        ),
    }
}

/// The relay's policy from the command line: the relay itself never reads flags.
fn relay_policy(args: &ServeArgs) -> Result<crate::relay::Policy, String> {
    let quota = crate::quota::Quota::new(&crate::quota::QuotaConfig {
        messages_per_user: args.max_messages_per_user,
        recipients_per_user: args.max_recipients_per_user,
        recipients_per_message: args.max_recipients_per_message,
        store: args.limits_store.clone(),
        failure: args.limits_store_failure,
        timeout: args.limits_store_timeout,
    })?;
    Ok(crate::relay::Policy {
        strict_data: args.strict_data,
        hide_chunking: args.hide_chunking,
        quota,
    })
}

/// How long the start-up probe and `postern check` wait for the backend.
const STARTUP_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the proxy until SIGTERM or SIGINT, then drains.
pub async fn run(config: Config) -> Result<(), String> {
    // Every certificate mistake at once, each naming its fix: one line per error.
    let certs = tls::load_all(&config.certs, &config.hostname, tls::check::now())
        .map_err(|errors| errors.join("\n"))?;
    for warning in &certs.warnings {
        warn!("{warning}");
    }
    let certificates = certs.certificates;
    let tls = tls::server_config(certificates.clone())?;
    let users = Arc::new(UserDb::load(&config.users).map_err(|e| e.to_string())?);
    info!(users = users.len(), "users loaded");
    log_mechanisms(config.auth_mechanisms.as_deref(), &users);
    let failure_pace = Arc::new(FailurePace::default());
    let decoy = users.clone();
    if let Ok(took) = tokio::task::spawn_blocking(move || decoy.time_decoy()).await {
        failure_pace.seed(took);
    }
    if config.mx_identity == Some(MxIdentity::Unidentified) {
        warn!("{MX_UNIDENTIFIED}");
    }
    let prometheus = match config.metrics_listen {
        Some(addr) => Some((metrics::install()?, admin::bind(addr).await?)),
        None => None,
    };
    // After install: gauges set before the recorder exists go nowhere.
    reload::publish_expiry(&certificates);

    let mut bound = Vec::new();
    for (addr, kind) in config.listeners() {
        let listener = listener::bind(addr).map_err(|e| format!("binding {addr}: {e}"))?;
        bound.push((listener, kind));
    }

    let hostname: Arc<str> = config.hostname.into();
    // The first probe runs before accepting, so the first client already sees the
    // backend's real capability list when the backend is up.
    let initial = backend::probe(
        &config.backend,
        &hostname,
        config.backend_proxy_protocol,
        STARTUP_PROBE_TIMEOUT,
    )
    .await;
    let up = initial.is_ok();
    match &initial {
        Ok(capabilities) => {
            info!(backend = %config.backend, "backend probe succeeded");
            if let Some(gap) = xclient_gap(config.xclient, config.mx_identity, capabilities) {
                warn!(backend = %config.backend, "{gap}");
            }
        }
        Err(error) => {
            warn!(backend = %config.backend, %error, "backend probe failed; offering a minimal capability list until it succeeds")
        }
    }
    metrics::backend_up(up);
    let (caps_tx, caps_rx) = watch::channel(Arc::new(
        initial.unwrap_or_else(|_| Capabilities::unknown()),
    ));
    let (up_tx, mut up_rx) = watch::channel(up);
    let backend_up = up_rx.clone();
    tokio::spawn(backend::probe_forever(
        config.backend.clone(),
        hostname.clone(),
        config.probe_interval,
        config.backend_proxy_protocol,
        caps_tx,
        up_tx,
    ));
    tokio::spawn(async move {
        while up_rx.changed().await.is_ok() {
            metrics::backend_up(*up_rx.borrow());
        }
    });

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        hostname,
        backend: config.backend,
        timeouts: config.timeouts,
        crypto: tls::provider(),
        verify_slots: Semaphore::new(verify_concurrency()),
        verifications_per_net: PerNetSlots::new(config.max_verifications_per_network, u32::MAX),
        shutdown: shutdown_rx.clone(),
        limits: config.session_limits,
        auth_gate: AuthGate::new(AuthLimits {
            per_net: config.max_auth_failures_per_ip,
            per_user: config.max_auth_failures_per_user,
            window: config.auth_failure_window,
            user_delay: config.session_limits.auth_failure_delay,
        }),
        failure_pace,
        throttle_log: ThrottleLog::new(THROTTLE_LOG_INTERVAL),
        auth_mechanisms: config.auth_mechanisms,
        per_net: PerNetSlots::new(
            config.max_connections_per_ip,
            config.max_connections_per_wide_prefix,
        ),
        grouping: config.grouping,
        refusal_slots: Arc::new(Semaphore::new(listener::MAX_PENDING_REFUSALS)),
        relay: config.relay,
        user_hasher: RandomState::new(),
        xclient: config.xclient,
        backend_proxy_protocol: config.backend_proxy_protocol,
        mx_identity: config.mx_identity,
        proxy_protocol_from: config.proxy_protocol_from,
        capabilities: caps_rx,
        tls,
        certificates,
        users: RwLock::new(users),
    });
    if let Some((handle, listener)) = prometheus {
        let readiness = admin::Readiness {
            backend_up,
            draining: shutdown_rx,
        };
        tokio::spawn(admin::serve(listener, handle, readiness));
    }
    tokio::spawn(reload::watch(shared.clone(), config.users));
    tokio::spawn(crate::conn::report_throttles(shared.clone()));

    let slots = Arc::new(Semaphore::new(config.max_connections as usize));
    for (listener, kind) in bound {
        tokio::spawn(listener::accept_loop(
            listener,
            kind,
            shared.clone(),
            slots.clone(),
        ));
    }

    let mut signals = Signals::new()?;
    signals.recv().await;
    info!(grace = ?config.shutdown_grace, "shutting down: no new connections; sessions before AUTH get 421, relayed sessions may finish");
    shutdown_tx.send_replace(true);
    let all_closed = slots.acquire_many(config.max_connections);
    tokio::select! {
        _ = all_closed => info!("all sessions finished"),
        () = tokio::time::sleep(config.shutdown_grace) => warn!("shutdown grace expired; closing remaining sessions"),
        () = signals.recv() => warn!("second signal; exiting now"),
    }
    Ok(())
}

/// `postern check`: everything `serve` would load or reach, without serving.
pub async fn check(config: Config) -> Result<(), String> {
    let certs = tls::load_all(&config.certs, &config.hostname, tls::check::now())
        .map_err(|errors| errors.join("\n"))?;
    for (index, pair) in certs.certificates.pairs().enumerate() {
        let Some(current) = certs.certificates.current(index) else {
            continue;
        };
        let leaf = &current.leaf;
        println!(
            "ok: certificate {} and key {} (names: {}; expires {})",
            pair.cert.display(),
            pair.key.display(),
            if leaf.dns_names.is_empty() {
                leaf.label.clone()
            } else {
                leaf.dns_names.join(", ")
            },
            tls::check::date(leaf.not_after)
        );
    }
    for warning in &certs.warnings {
        println!("warning: {warning}");
    }
    let users = UserDb::load(&config.users).map_err(|e| e.to_string())?;
    println!(
        "ok: users file {} ({} users)",
        config.users.display(),
        users.len()
    );
    for (addr, kind) in config
        .listeners()
        .chain(config.metrics_listen.map(|a| (a, ListenerKind::Submission)))
    {
        drop(
            TcpListener::bind(addr)
                .await
                .map_err(|e| format!("binding {addr}: {e}"))?,
        );
        let _ = kind;
        println!("ok: can bind {addr}");
    }
    let capabilities = backend::probe(
        &config.backend,
        &config.hostname,
        config.backend_proxy_protocol,
        STARTUP_PROBE_TIMEOUT,
    )
    .await
    .map_err(|e| format!("backend {}: {e}", config.backend))?;
    let offered: Vec<&str> = capabilities.for_clients().collect();
    println!(
        "ok: backend {} answers EHLO; clients will see: {}",
        config.backend,
        offered.join(", ")
    );
    if let Some(gap) = xclient_gap(config.xclient, config.mx_identity, &capabilities) {
        println!("warning: {gap}");
    }
    if config.mx_identity == Some(MxIdentity::Unidentified) {
        println!("warning: {MX_UNIDENTIFIED}");
    }
    Ok(())
}

/// Resolves once shutdown has begun.
pub async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stopping| *stopping).await;
}

/// Hash verifications at once: one per core keeps argon2's memory bounded while using
/// the machine.
fn verify_concurrency() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2)
}

/// SIGTERM and SIGINT.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, String> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let term = signal(SignalKind::terminate())
                .map_err(|e| format!("installing SIGTERM handler: {e}"))?;
            let int = signal(SignalKind::interrupt())
                .map_err(|e| format!("installing SIGINT handler: {e}"))?;
            Ok(Signals { term, int })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::config::{Cli, Command};
    use crate::proxy_proto::Version;

    /// `postern serve` with `extra` after the flags every run needs.
    fn from_flags(extra: &[&str]) -> Result<Config, String> {
        let base = ["postern", "serve", "--backend", "127.0.0.1:25"];
        let base = base.iter().chain(["--hostname", "mx.test"].iter());
        let cli = Cli::try_parse_from(base.chain(extra)).map_err(|e| e.to_string())?;
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        Config::from_args(&args)
    }

    #[test]
    fn ipv6_grouping_flags_and_the_wide_cap_default() {
        let config = from_flags(&[]).unwrap();
        assert_eq!(config.grouping, NetGrouping::default());
        assert_eq!(config.max_connections_per_wide_prefix, 4 * 50);
        let config = from_flags(&["--max-connections-per-ip", "7", "--ipv6-prefix", "56"]).unwrap();
        assert_eq!(config.max_connections_per_wide_prefix, 28);
        assert_eq!(config.grouping.v6_prefix, 56);
        let error = from_flags(&["--ipv6-prefix", "48", "--ipv6-prefix-wide", "56"])
            .err()
            .unwrap();
        assert!(error.contains("--ipv6-prefix-wide 56"), "{error}");
        assert!(from_flags(&["--ipv6-prefix", "129"]).is_err());
    }

    #[test]
    fn mx_identity_needs_a_way_to_name_the_client_or_an_explicit_risk() {
        use MxIdentity::*;
        let v2 = Some(Version::V2);
        // (xclient, proxy, allow_open_relay) -> identity
        for (name, xclient, proxy, allow, want) in [
            ("proxy alone", false, v2, false, Some(ProxyHeader)),
            ("proxy beats xclient", true, v2, false, Some(ProxyHeader)),
            (
                "allow is moot with proxy",
                false,
                v2,
                true,
                Some(ProxyHeader),
            ),
            ("xclient alone", true, None, false, Some(Xclient)),
            (
                "allow is moot with xclient",
                true,
                None,
                true,
                Some(Xclient),
            ),
            ("explicit risk", false, None, true, Some(Unidentified)),
            ("nothing: open relay", false, None, false, None),
        ] {
            let got = MxIdentity::choose(xclient, proxy, allow);
            assert_eq!(got.as_ref().ok().copied(), want, "{name}: {got:?}");
        }
        let error = MxIdentity::choose(false, None, false).unwrap_err();
        for fix in [
            "--xclient",
            "--backend-proxy-protocol",
            "--allow-mx-open-relay",
        ] {
            assert!(error.contains(fix), "{error}");
        }
    }

    #[test]
    fn listen_mx_refuses_to_start_without_client_identity() {
        let mx = ["--listen-mx", "127.0.0.1:25"];
        let error = from_flags(&mx).err().expect("open relay accepted");
        assert!(
            error.starts_with("--listen-mx without --xclient"),
            "{error}"
        );

        let with = |extra: &[&str]| {
            let flags: Vec<&str> = mx.iter().chain(extra).copied().collect();
            from_flags(&flags).map(|c| c.mx_identity)
        };
        assert_eq!(with(&["--xclient"]), Ok(Some(MxIdentity::Xclient)));
        assert_eq!(
            with(&["--backend-proxy-protocol", "v1"]),
            Ok(Some(MxIdentity::ProxyHeader))
        );
        assert_eq!(
            with(&["--allow-mx-open-relay"]),
            Ok(Some(MxIdentity::Unidentified))
        );
        // Boolish like --xclient: an explicit false is no permission.
        assert!(with(&["--allow-mx-open-relay=false"]).is_err());
        // Submission listeners alone have no anonymous sessions to worry about.
        assert_eq!(
            from_flags(&["--listen", "127.0.0.1:587"]).map(|c| c.mx_identity),
            Ok(None)
        );
    }

    #[test]
    fn xclient_gap_names_what_the_backend_lacks_and_what_follows() {
        let caps = |lines: &[&str]| {
            let lines: Vec<String> = ["backend.test"]
                .iter()
                .chain(lines)
                .map(|l| l.to_string())
                .collect();
            Capabilities::from_ehlo_reply(&lines)
        };
        let mx = Some(MxIdentity::Xclient);
        let none = caps(&["PIPELINING"]);
        let no_addr = caps(&["XCLIENT NAME HELO LOGIN"]);
        let full = caps(&["XCLIENT NAME ADDR PORT PROTO HELO LOGIN"]);
        for (name, xclient, identity, capabilities, want) in [
            ("not asked", false, mx, &none, None),
            ("offered", true, mx, &full, None),
            (
                "not offered, MX",
                true,
                mx,
                &none,
                Some("does not offer XCLIENT to postern"),
            ),
            (
                "no ADDR, MX",
                true,
                mx,
                &no_addr,
                Some("XCLIENT does not take ADDR"),
            ),
            (
                "not offered, submission only",
                true,
                None,
                &none,
                Some("sessions reach it without the client's address"),
            ),
        ] {
            let got = xclient_gap(xclient, identity, capabilities);
            match (want, &got) {
                (None, None) => {}
                (Some(part), Some(text)) if text.contains(part) => {}
                _ => panic!("{name}: {got:?}"),
            }
        }
        let mx_gap = xclient_gap(true, mx, &none).unwrap_or_default();
        assert!(
            mx_gap.contains("451 4.3.0") && mx_gap.contains("smtpd_authorized_xclient_hosts"),
            "{mx_gap}"
        );
    }
}
