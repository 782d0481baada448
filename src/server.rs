//! `postern serve`: turns the command line into each layer's settings, wires the
//! layers together and serves listeners its caller bound until its caller asks it to
//! stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot, watch};
use tracing::{info, warn};

use crate::auth::{self, Authenticator};
use crate::backend::{MxIdentity, xclient_gap};
use crate::config::{DEFAULT_LISTEN, DEFAULT_LISTEN_TLS, ServeArgs};
use crate::conn::{Services, Timeouts};
use crate::limits::{AuthLimits, NetGrouping, PerNetSlots};
use crate::listener::ConnectionLimits;
use crate::session::{ListenerKind, SessionLimits};
use crate::shutdown::{Drain, StopRequests};
use crate::smtp::Capabilities;
use crate::store::LimitsStore;

use crate::{admin, backend, listener, metrics, proxy_proto, reload, tls};

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
    /// Where credentials are checked.
    pub source: auth::source::Config,
    pub hostname: String,
    pub timeouts: Timeouts,
    pub probe_interval: Duration,
    pub metrics_listen: Option<SocketAddr>,
    pub shutdown_grace: Duration,
    pub max_connections: u32,
    pub max_connections_per_ip: u32,
    pub max_connections_per_wide_prefix: u32,
    /// `--ipv6-prefix` and `--ipv6-prefix-wide`.
    pub grouping: NetGrouping,
    pub session_limits: SessionLimits,
    /// The AUTH failure windows, the verifier share and the mechanisms offered.
    pub auth: auth::Settings,
    pub relay: Arc<crate::relay::Policy>,
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
        let backend = args.backend.clone().unwrap_or_default();
        if backend
            .rsplit_once(':')
            .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        {
            return Err(format!("--backend {backend:?}: expected HOST:PORT"));
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
        let store = LimitsStore::open(
            &args.limits_store,
            args.limits_store_failure,
            args.limits_store_timeout,
        )?;
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
            backend,
            certs: pairs(&args.cert, &args.key)?,
            source: source_config(args)?,
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
            session_limits: SessionLimits {
                max_errors: args.max_errors,
                max_auth_failures: args.max_auth_failures,
                auth_failure_delay: args.auth_failure_delay,
                max_junk_commands: args.max_junk_commands,
            },
            auth: auth::Settings {
                failures: AuthLimits {
                    per_net: args.max_auth_failures_per_ip,
                    per_site: args
                        .max_auth_failures_per_wide_prefix
                        .unwrap_or(args.max_auth_failures_per_ip.saturating_mul(4)),
                    per_user: args.max_auth_failures_per_user,
                    window: args.auth_failure_window,
                    user_delay: args.auth_failure_delay,
                },
                store: store.clone(),
                verifications_per_network: args.max_verifications_per_network,
                mechanisms: (!args.auth_mechanisms.is_empty())
                    .then(|| args.auth_mechanisms.clone()),
                cache_ttl: args.auth_cache_ttl.filter(|ttl| !ttl.is_zero()),
                backend_allow: args.backend_allow.clone(),
            },
            relay: Arc::new(relay_policy(args, store)),
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

/// The users file when no source is named.
const DEFAULT_USERS: &str = "/etc/postern/users";

/// The one credential source the flags name, or the default users file.
fn source_config(args: &ServeArgs) -> Result<auth::source::Config, String> {
    let given: Vec<&str> = [
        (args.users.is_some(), "--users"),
        (args.dovecot_auth.is_some(), "--dovecot-auth"),
        (args.ldap_url.is_some(), "--ldap-url"),
        (args.auth_http.is_some(), "--auth-http"),
    ]
    .into_iter()
    .filter_map(|(given, flag)| given.then_some(flag))
    .collect();
    if given.len() > 1 {
        return Err(format!(
            "{} given: postern checks credentials with exactly one source (--users, --dovecot-auth, --ldap-url or --auth-http)",
            given.join(" and ")
        ));
    }
    let ldap_flags_without_url = args.ldap_url.is_none()
        && (args.ldap_user_dn.is_some()
            || args.ldap_search_base.is_some()
            || args.ldap_bind_dn.is_some()
            || args.ldap_bind_password_file.is_some()
            || args.ldap_starttls);
    if ldap_flags_without_url {
        return Err("--ldap-* flags given without --ldap-url".into());
    }
    if let Some(target) = &args.dovecot_auth {
        return Ok(auth::source::Config::Dovecot {
            target: target.clone(),
            timeout: args.auth_source_timeout,
        });
    }
    if let Some(url) = &args.ldap_url {
        let flags = auth::ldap::Flags {
            url: url.clone(),
            user_dn: args.ldap_user_dn.clone(),
            search_base: args.ldap_search_base.clone(),
            search_filter: args.ldap_search_filter.clone(),
            bind_dn: args.ldap_bind_dn.clone(),
            bind_password_file: args.ldap_bind_password_file.clone(),
            starttls: args.ldap_starttls,
            ca: args.ldap_ca.clone(),
            timeout: args.ldap_timeout,
            pool_size: args.ldap_pool_size,
        };
        let settings = auth::ldap::Settings::from_flags(&flags).map_err(|e| e.to_string())?;
        return Ok(auth::source::Config::Ldap(settings));
    }
    if let Some(url) = &args.auth_http {
        return Ok(auth::source::Config::Http {
            url: url.clone(),
            timeout: args.auth_source_timeout,
        });
    }
    Ok(auth::source::Config::File(
        args.users
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_USERS)),
    ))
}

/// Opens the source and checks `--auth-mechanisms` against what it can verify.
fn open_source(config: &Config) -> Result<auth::source::Source, String> {
    let source = auth::source::Source::open(&config.source)?;
    if let Some(chosen) = &config.auth.mechanisms {
        let unverifiable: Vec<&str> = chosen
            .iter()
            .filter(|m| !source.can_verify(**m))
            .map(|m| m.name())
            .collect();
        if !unverifiable.is_empty() {
            return Err(format!(
                "--auth-mechanisms {}: the {} cannot verify it",
                unverifiable.join(","),
                config.source.describe()
            ));
        }
    }
    Ok(source)
}

/// The start-up warning of [`MxIdentity::Unidentified`].
const MX_UNIDENTIFIED: &str = "--allow-mx-open-relay: the backend sees every MX client as \
postern's own address; it must not trust that address to relay (Postfix: keep it out of \
mynetworks)";

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

/// The relay's policy from the command line: the relay itself never reads flags.
fn relay_policy(args: &ServeArgs, store: LimitsStore) -> crate::relay::Policy {
    let quota = crate::quota::Quota::new(&crate::quota::QuotaConfig {
        messages_per_user: args.max_messages_per_user,
        recipients_per_user: args.max_recipients_per_user,
        recipients_per_message: args.max_recipients_per_message,
        store,
    });
    crate::relay::Policy {
        strict_data: args.strict_data,
        hide_chunking: args.hide_chunking,
        quota,
    }
}

/// How long the start-up probe and `postern check` wait for the backend.
const STARTUP_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The sockets [`run`] serves, bound by its caller: a caller that binds can report a
/// busy port before anything starts, and tests can serve on ports they already hold.
pub struct Listeners {
    pub smtp: Vec<(TcpListener, ListenerKind)>,
    /// The `/metrics`, `/healthz` and `/readyz` endpoint, and the recorder it renders.
    pub admin: Option<(TcpListener, PrometheusHandle)>,
}

impl Listeners {
    /// Binds every address of `config`; the admin endpoint (if configured) renders the
    /// process's recorder, installed here if it is not yet. Warns first about a
    /// configuration that is allowed but risky.
    pub async fn bind(config: &Config) -> Result<Listeners, String> {
        // Said before anything listens, so nobody reaches an MX listener unwarned.
        if config.mx_identity == Some(MxIdentity::Unidentified) {
            warn!("{MX_UNIDENTIFIED}");
        }
        let mut smtp = Vec::new();
        for (addr, kind) in config.listeners() {
            let listener = listener::bind(addr).map_err(|e| format!("binding {addr}: {e}"))?;
            smtp.push((listener, kind));
        }
        let admin = match config.metrics_listen {
            Some(addr) => Some((admin::bind(addr).await?, metrics::recorder()?)),
            None => None,
        };
        Ok(Listeners { smtp, admin })
    }
}

/// What [`run`] reports once it accepts clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// Whether the first backend probe succeeded.
    pub backend_up: bool,
}

/// Serves `listeners` until the first stop request, then drains: no new connections,
/// sessions before AUTH get 421, relayed sessions may finish within the grace period
/// (or until a second request). `ready` hears once clients are being accepted.
pub async fn run(
    config: Config,
    listeners: Listeners,
    mut stop: StopRequests,
    ready: Option<oneshot::Sender<Ready>>,
) -> Result<(), String> {
    // Every certificate mistake at once, each naming its fix: one line per error.
    let certs = tls::load_all(&config.certs, &config.hostname, tls::check::now())
        .map_err(|errors| errors.join("\n"))?;
    for warning in &certs.warnings {
        warn!("{warning}");
    }
    let certificates = certs.certificates;
    let tls = tls::server_config(certificates.clone())?;
    let source = open_source(&config)?;
    let auth = Authenticator::start(config.auth.clone(), source).await;
    reload::publish_expiry(&certificates);

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
    let probe = tokio::spawn(backend::probe_forever(
        config.backend.clone(),
        hostname.clone(),
        config.probe_interval,
        config.backend_proxy_protocol,
        caps_tx,
        up_tx,
    ));
    let up_gauge = tokio::spawn(async move {
        while up_rx.changed().await.is_ok() {
            metrics::backend_up(*up_rx.borrow());
        }
    });

    let drain = Drain::new();
    let services = Arc::new(Services {
        hostname,
        backend: config.backend,
        timeouts: config.timeouts,
        crypto: tls::provider(),
        session_limits: config.session_limits,
        auth: auth.clone(),
        grouping: config.grouping,
        relay: config.relay,
        xclient: config.xclient,
        backend_proxy_protocol: config.backend_proxy_protocol,
        mx_identity: config.mx_identity,
        capabilities: caps_rx,
        tls,
        shutdown: drain.subscribe(),
    });
    let limits = Arc::new(ConnectionLimits {
        total: Arc::new(Semaphore::new(config.max_connections as usize)),
        per_net: PerNetSlots::new(
            config.max_connections_per_ip,
            config.max_connections_per_wide_prefix,
        ),
        grouping: config.grouping,
        refusals: Arc::new(Semaphore::new(listener::MAX_PENDING_REFUSALS)),
        proxy_protocol_from: config.proxy_protocol_from,
    });
    // Side tasks end with the server, so a server run in-process leaves nothing behind.
    let mut tasks = vec![probe, up_gauge];
    if let Some((listener, handle)) = listeners.admin {
        let readiness = admin::Readiness {
            backend_up,
            backend_down: "backend probe failing",
            source_up: auth.source_up(),
            draining: drain.subscribe(),
        };
        tasks.push(tokio::spawn(admin::serve(listener, handle, readiness)));
    }
    let users_file = match &config.source {
        auth::source::Config::File(path) => Some(path.clone()),
        _ => None,
    };
    tasks.push(tokio::spawn(reload::watch(
        certificates,
        auth.clone(),
        users_file,
    )));
    tasks.push(tokio::spawn(auth.clone().watch_source()));
    tasks.push(tokio::spawn(auth.report_throttles()));
    for (listener, kind) in listeners.smtp {
        tokio::spawn(listener::accept_loop(
            listener,
            kind,
            limits.clone(),
            services.clone(),
            drain.subscribe(),
        ));
    }
    if let Some(ready) = ready {
        let _ = ready.send(Ready { backend_up: up });
    }

    stop.next().await;
    info!(grace = ?config.shutdown_grace, "shutting down: no new connections; sessions before AUTH get 421, relayed sessions may finish");
    drain.begin();
    let all_closed = limits.total.acquire_many(config.max_connections);
    tokio::select! {
        _ = all_closed => info!("all sessions finished"),
        () = tokio::time::sleep(config.shutdown_grace) => warn!("shutdown grace expired; closing remaining sessions"),
        () = stop.next() => warn!("second signal; exiting now"),
    }
    for task in tasks {
        task.abort();
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
    let source = open_source(&config)?;
    match source.probe().await {
        Ok(found) => println!("ok: {}: {found}", config.source.describe()),
        Err(error) => return Err(format!("{}: {error}", config.source.describe())),
    }
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

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::config::{Cli, Command};

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
        assert_eq!(config.auth.failures.per_site, 4 * 20);
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
}
