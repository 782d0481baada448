//! `postern relay-out`: the other direction. Legacy senders that speak only plain SMTP
//! (an old MTA, a scanner, an ERP) reach a modern submission service (Microsoft 365,
//! Google Workspace...) that requires TLS 1.2+ and AUTH, OAuth2 included.
//!
//! A sender from `--allow-from` gets postern's own greeting and EHLO (the upstream's
//! extensions as the last probe saw them, without its STARTTLS and AUTH). Its session
//! is the same sans-IO [`Session`] as an inbound MX session: at its first MAIL (or
//! after an optional AUTH over STARTTLS with `--users`) postern dials the upstream
//! ([`upstream`]): TLS, EHLO, AUTH with a password or an OAuth2 token ([`oauth2`]),
//! driven by the sans-IO [`handshake`]. Only an upstream that accepted postern's login
//! is handed the MAIL line; from there the session runs through the same
//! [`relay::relay`] and tracker as inbound mail (verbatim bytes, every framing rule).
//! Anything that stops the login is answered `451 4.4.x` or `454 4.7.0`, so the sender's
//! queue retries: nothing is dropped silently, and a 5xx of the upstream in the relayed
//! part passes through as it is.

pub mod handshake;
pub mod oauth2;
pub mod secret;
pub mod upstream;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use ipnet::IpNet;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::rustls::ServerConfig;
use tracing::{Instrument, info, info_span, warn};

use crate::config::relay_out::{RelayOutArgs, UpstreamAuth};
use crate::relay::{self, RelayEnd};
use crate::sasl::{Credentials, Mechanism};
use crate::session::{
    Action, ListenerKind, Session, SessionLimits, SourceReply, SourceSasl, Verdict,
};
use crate::shutdown::{Drain, Shutdown, StopRequests};
use crate::smtp::{Canned, Capabilities, Reply, canned};
use crate::users::UserDb;
use crate::{admin, listener, metrics, tls};
use handshake::Login;
use oauth2::TokenSource;
use secret::Secret;
use upstream::{Connected, DialError, Upstream};

/// Bytes asked of the socket per read before the relay; commands are small.
const READ_CHUNK: usize = 4096;

/// From connect to MAIL (or a successful AUTH): a sender that only greets and resets
/// lets its connection slot go after this, whatever the per-command timeout.
const MAIL_DEADLINE: Duration = Duration::from_secs(300);

/// Password checks that may run at once (see [`Shared::verifiers`]).
const VERIFIERS: usize = 2;

/// How long a refused sender's connection is given to take its 554.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);

/// A sender outside `--allow-from`.
const NOT_ALLOWED: Canned = Canned::new(554, "5.7.1 Relaying not permitted from this address");

/// STARTTLS from a sender when postern has no certificate (`--cert`).
const NO_STARTTLS: Canned = Canned::new(502, "5.5.1 STARTTLS not offered");

/// No OAuth2 token could be had: the login cannot even be tried.
const TOKEN_UNAVAILABLE: &str = "4.7.0 Upstream credentials unavailable, try again later";

/// What postern logs in to the upstream with.
#[derive(Clone)]
pub enum UpstreamCredentials {
    /// Replaced on SIGHUP.
    Password {
        password: Arc<RwLock<Secret>>,
    },
    OAuth2 {
        source: Arc<TokenSource>,
    },
}

/// The files a SIGHUP reads again.
#[derive(Debug, Clone, Default)]
pub struct Files {
    pub cert_key: Option<(PathBuf, PathBuf)>,
    pub users: Option<PathBuf>,
    pub password: Option<PathBuf>,
    pub client_secret: Option<PathBuf>,
    pub refresh_token: Option<PathBuf>,
}

/// A value a reload may replace, read without holding the lock.
fn current<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read().unwrap_or_else(PoisonError::into_inner).clone()
}

fn replace<T>(lock: &RwLock<T>, value: T) {
    *lock.write().unwrap_or_else(PoisonError::into_inner) = value;
}

/// The validated configuration of `relay-out`.
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub allow_from: Vec<IpNet>,
    /// STARTTLS towards senders (`--cert`/`--key`).
    pub tls: Option<Arc<ServerConfig>>,
    /// Senders that may log in (`--users`); `None`: AUTH is not offered.
    pub users: Option<Arc<UserDb>>,
    /// `--upstream-user-map`: sender login → upstream account.
    pub user_map: HashMap<String, String>,
    pub hostname: String,
    pub upstream: Upstream,
    pub mechanism: UpstreamAuth,
    pub upstream_user: String,
    pub credentials: UpstreamCredentials,
    pub first_command_timeout: Duration,
    pub command_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub relay_idle_timeout: Duration,
    pub probe_interval: Duration,
    pub max_connections: u32,
    pub shutdown_grace: Duration,
    pub metrics_listen: Option<SocketAddr>,
    /// What SIGHUP reloads.
    pub files: Files,
}

impl Config {
    pub fn from_args(args: &RelayOutArgs) -> Result<Config, String> {
        if args.allow_from.is_empty() {
            return Err("--allow-from: at least one network is required".into());
        }
        let (host, port) = args
            .upstream
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
            .filter(|(host, _)| !host.is_empty())
            .ok_or_else(|| format!("--upstream {:?}: expected HOST:PORT", args.upstream))?;
        // SNI and the certificate check use the bare name, without IPv6 brackets.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let hostname = match &args.hostname {
            Some(name) => name.clone(),
            None => gethostname::gethostname().to_string_lossy().into_owned(),
        };
        let tls = match (&args.cert, &args.key) {
            (Some(cert), Some(key)) => Some(tls::load_server_config(cert, key)?),
            _ => None,
        };
        let users = match &args.users {
            Some(path) => Some(Arc::new(UserDb::load(path).map_err(|e| e.to_string())?)),
            None => None,
        };
        let user_map = match &args.upstream_user_map {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("reading --upstream-user-map {}: {e}", path.display()))?;
                parse_user_map(&text)
                    .map_err(|e| format!("--upstream-user-map {}: {e}", path.display()))?
            }
            None => HashMap::new(),
        };
        let upstream_tls = upstream::client_config("--upstream-ca", args.upstream_ca.as_deref())?;
        let credentials = if args.upstream_auth.is_oauth2() {
            let url = args.oauth2_token_url.clone().ok_or_else(|| {
                "--upstream-auth xoauth2/oauthbearer needs --oauth2-token-url".to_owned()
            })?;
            let client_id = args
                .oauth2_client_id
                .clone()
                .ok_or("--upstream-auth xoauth2/oauthbearer needs --oauth2-client-id")?;
            let client_secret = match &args.oauth2_client_secret_file {
                Some(path) => Some(secret::read_file("--oauth2-client-secret-file", path)?),
                None => None,
            };
            if client_secret.is_none() && args.oauth2_refresh_token_file.is_none() {
                return Err("OAuth2 needs --oauth2-client-secret-file (client credentials) or --oauth2-refresh-token-file (or both)".into());
            }
            // The token endpoint is checked against the system's roots: it is the
            // provider's public web endpoint, not the upstream (which --upstream-ca
            // may pin). A plain http:// one (a local token broker) needs none.
            let token_tls = if url.starts_with("https://") {
                upstream::client_config("--oauth2-token-url", None)?
            } else {
                tracing::warn!(
                    url,
                    "--oauth2-token-url is not https: the client secret and tokens travel unencrypted"
                );
                upstream_tls.clone()
            };
            let source = TokenSource::new(oauth2::Settings {
                url,
                grant: oauth2::Grant {
                    client_id,
                    client_secret,
                    scope: args.oauth2_scope.clone(),
                },
                refresh_token_file: args.oauth2_refresh_token_file.clone(),
                timeout: args.oauth2_timeout,
                tls: token_tls,
            })?;
            UpstreamCredentials::OAuth2 {
                source: Arc::new(source),
            }
        } else {
            let path = args.upstream_password_file.as_ref().ok_or_else(|| {
                "--upstream-auth plain/login needs --upstream-password-file".to_owned()
            })?;
            UpstreamCredentials::Password {
                password: Arc::new(RwLock::new(secret::read_file(
                    "--upstream-password-file",
                    path,
                )?)),
            }
        };
        Ok(Config {
            listen: args.listen.clone(),
            allow_from: args.allow_from.clone(),
            tls,
            users,
            user_map,
            upstream: Upstream {
                addr: args.upstream.clone(),
                host,
                port,
                mode: args.upstream_tls,
                tls: upstream_tls,
                hostname: hostname.clone(),
                timeout: args.upstream_timeout,
            },
            hostname,
            mechanism: args.upstream_auth,
            upstream_user: args.upstream_user.clone(),
            credentials,
            first_command_timeout: args.first_command_timeout,
            command_timeout: args.command_timeout,
            tls_handshake_timeout: args.tls_handshake_timeout,
            relay_idle_timeout: args.relay_idle_timeout,
            probe_interval: args.probe_interval,
            max_connections: args.max_connections,
            shutdown_grace: args.shutdown_grace,
            metrics_listen: args.metrics_listen,
            files: Files {
                cert_key: args.cert.clone().zip(args.key.clone()),
                users: args.users.clone(),
                password: args.upstream_password_file.clone(),
                client_secret: args.oauth2_client_secret_file.clone(),
                refresh_token: args.oauth2_refresh_token_file.clone(),
            },
        })
    }
}

/// `login upstream-user` per line; `#` comments and blank lines ignored.
pub fn parse_user_map(text: &str) -> Result<HashMap<String, String>, String> {
    let mut map = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        match (fields.next(), fields.next(), fields.next()) {
            (Some(login), Some(upstream), None) => {
                if map.insert(login.to_owned(), upstream.to_owned()).is_some() {
                    return Err(format!("line {}: {login:?} mapped twice", n + 1));
                }
            }
            _ => return Err(format!("line {}: expected `login upstream-user`", n + 1)),
        }
    }
    Ok(map)
}

/// What every sender session uses.
struct Shared {
    hostname: Arc<str>,
    upstream: Upstream,
    mechanism: UpstreamAuth,
    upstream_user: String,
    user_map: HashMap<String, String>,
    credentials: UpstreamCredentials,
    /// Sender logins (`--users`); replaced on SIGHUP.
    users: RwLock<Option<Arc<UserDb>>>,
    /// STARTTLS towards senders (`--cert`/`--key`); replaced on SIGHUP.
    tls: RwLock<Option<Arc<ServerConfig>>>,
    allow_from: Vec<IpNet>,
    capabilities: watch::Receiver<Arc<Capabilities>>,
    first_command_timeout: Duration,
    command_timeout: Duration,
    tls_handshake_timeout: Duration,
    relay_idle_timeout: Duration,
    policy: relay::Policy,
    /// Password checks running at once: a hash can take 64 MiB and 100 ms (argon2).
    verifiers: Semaphore,
    shutdown: Shutdown,
}

/// Why a session could not be given an upstream.
#[derive(Debug)]
enum UpstreamError {
    Token(oauth2::TokenError),
    Dial(DialError),
}

impl UpstreamError {
    fn label(&self) -> &'static str {
        match self {
            UpstreamError::Token(_) => metrics::upstream_result::TOKEN_FAILED,
            UpstreamError::Dial(error) => error.label(),
        }
    }

    fn reply(&self) -> Reply {
        match self {
            UpstreamError::Token(_) => Reply::new(454, TOKEN_UNAVAILABLE),
            UpstreamError::Dial(error) => error.reply(),
        }
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Token(error) => write!(f, "{error}"),
            UpstreamError::Dial(error) => write!(f, "{error}"),
        }
    }
}

impl Shared {
    /// The upstream account for a sender: its mapped one, else `--upstream-user`.
    fn account(&self, sender: Option<&str>) -> &str {
        sender
            .and_then(|login| self.user_map.get(login))
            .map_or(self.upstream_user.as_str(), String::as_str)
    }

    async fn login(&self, sender: Option<&str>) -> Result<Login, UpstreamError> {
        login(&self.credentials, self.mechanism, self.account(sender)).await
    }

    /// A logged-in upstream connection for one sender session.
    async fn connect(&self, sender: Option<&str>) -> Result<Connected, UpstreamError> {
        let login = self.login(sender).await?;
        let token = match &login {
            Login::Xoauth2 { token, .. } | Login::Oauthbearer { token, .. } => Some(token.clone()),
            _ => None,
        };
        let result = self.upstream.connect(login).await;
        if let (Err(DialError::Handshake(handshake::Failure::AuthRefused { .. })), Some(token)) =
            (&result, &token)
            && let UpstreamCredentials::OAuth2 { source } = &self.credentials
        {
            // Revoked or expired early on the provider's side: the next session must
            // not fail with the same token.
            source.forget(token).await;
        }
        result.map_err(UpstreamError::Dial)
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        self.allow_from.iter().any(|net| net.contains(&ip))
    }
}

/// The credentials for one upstream login as `user`: the password, or a token that is
/// not about to expire.
async fn login(
    credentials: &UpstreamCredentials,
    mechanism: UpstreamAuth,
    user: &str,
) -> Result<Login, UpstreamError> {
    let user = user.to_owned();
    Ok(match (credentials, mechanism) {
        (UpstreamCredentials::Password { password }, UpstreamAuth::Login) => Login::Login {
            user,
            password: current(password),
        },
        (UpstreamCredentials::Password { password }, _) => Login::Plain {
            user,
            password: current(password),
        },
        (UpstreamCredentials::OAuth2 { source }, mechanism) => {
            let token = source.token().await.map_err(UpstreamError::Token)?;
            match mechanism {
                UpstreamAuth::Oauthbearer => Login::Oauthbearer { user, token },
                _ => Login::Xoauth2 { user, token },
            }
        }
    })
}

/// The role's listeners and its metrics endpoint, bound by the caller.
pub struct Listeners {
    pub smtp: Vec<TcpListener>,
    pub admin: Option<(TcpListener, PrometheusHandle)>,
}

impl Listeners {
    pub async fn bind(config: &Config) -> Result<Listeners, String> {
        let mut smtp = Vec::new();
        for addr in &config.listen {
            smtp.push(listener::bind(*addr).map_err(|e| format!("binding --listen {addr}: {e}"))?);
        }
        let admin = match config.metrics_listen {
            Some(addr) => Some((admin::bind(addr).await?, metrics::recorder()?)),
            None => None,
        };
        Ok(Listeners { smtp, admin })
    }
}

/// Serves senders until the first stop request, then drains like `serve`.
pub async fn run(
    config: Config,
    listeners: Listeners,
    mut stop: StopRequests,
) -> Result<(), String> {
    metrics::relay_out_series(matches!(
        config.credentials,
        UpstreamCredentials::OAuth2 { .. }
    ));
    let drain = Drain::new();
    let mut tasks = Vec::new();

    // The first probe runs before accepting, so the first sender already sees the
    // upstream's extensions when it is up.
    let initial = config.upstream.probe().await;
    let (up_tx, up_rx) = watch::channel(initial.is_ok());
    let (caps_tx, caps_rx) = watch::channel(Arc::new(match &initial {
        Ok(capabilities) => capabilities.clone(),
        Err(error) => {
            warn!(upstream = %config.upstream.addr, %error, "upstream probe failed");
            Capabilities::unknown()
        }
    }));
    tasks.push(tokio::spawn(probe_forever(
        config.upstream.clone(),
        config.probe_interval,
        caps_tx,
        up_tx,
    )));
    let token_ok = match &config.credentials {
        UpstreamCredentials::OAuth2 { source } => {
            tasks.push(tokio::spawn(source.clone().keep_fresh()));
            Some(source.healthy())
        }
        UpstreamCredentials::Password { .. } => None,
    };
    if let Some((listener, handle)) = listeners.admin {
        let (ready_tx, ready_rx) = watch::channel(false);
        tasks.push(tokio::spawn(readiness(up_rx, token_ok, ready_tx)));
        let readiness = admin::Readiness {
            backend_up: ready_rx,
            backend_down: "upstream login or OAuth2 token unavailable",
            // Senders are checked against relay-out's own users file, which is loaded.
            source_up: watch::channel(true).1,
            draining: drain.subscribe(),
        };
        tasks.push(tokio::spawn(admin::serve(listener, handle, readiness)));
    }

    let mechanisms: &[Mechanism] = if config.users.is_some() {
        &[Mechanism::Plain, Mechanism::Login]
    } else {
        &[]
    };
    let shared = Arc::new(Shared {
        hostname: config.hostname.into(),
        upstream: config.upstream,
        mechanism: config.mechanism,
        upstream_user: config.upstream_user,
        user_map: config.user_map,
        credentials: config.credentials,
        users: RwLock::new(config.users),
        tls: RwLock::new(config.tls),
        allow_from: config.allow_from,
        capabilities: caps_rx,
        first_command_timeout: config.first_command_timeout,
        command_timeout: config.command_timeout,
        tls_handshake_timeout: config.tls_handshake_timeout,
        relay_idle_timeout: config.relay_idle_timeout,
        policy: relay::Policy::observe_only(),
        verifiers: Semaphore::new(VERIFIERS),
        shutdown: drain.subscribe(),
    });
    tasks.push(tokio::spawn(reload_on_hangup(shared.clone(), config.files)));
    let total = Arc::new(Semaphore::new(config.max_connections as usize));
    for listener in listeners.smtp {
        tasks.push(tokio::spawn(accept_loop(
            listener,
            shared.clone(),
            mechanisms,
            total.clone(),
            drain.subscribe(),
        )));
    }

    stop.next().await;
    info!(grace = ?config.shutdown_grace, "shutting down: no new connections; relayed sessions may finish");
    drain.begin();
    let all_closed = total.acquire_many(config.max_connections);
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

/// `postern relay-out --check`: the configuration (done by [`Config::from_args`]), a
/// token fetch, and a full login to the upstream (TLS, EHLO, AUTH), then QUIT.
pub async fn check(config: Config) -> Result<(), String> {
    let login = login(&config.credentials, config.mechanism, &config.upstream_user)
        .await
        .map_err(|e| match e {
            UpstreamError::Token(e) => format!("OAuth2 token: {e}"),
            other => other.to_string(),
        })?;
    if login.is_oauth2() {
        println!("OAuth2 token obtained from the token endpoint");
    }
    let mechanism = login.mechanism();
    let mut connected = config
        .upstream
        .connect(login)
        .await
        .map_err(|e| format!("upstream {}: {e}", config.upstream.addr))?;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        connected.stream.write_all(b"QUIT\r\n").await?;
        connected.stream.shutdown().await
    })
    .await;
    println!(
        "upstream {}: TLS and AUTH {mechanism} as {} accepted",
        config.upstream.addr, config.upstream_user
    );
    Ok(())
}

/// Reads every file of [`Files`] again on each SIGHUP: a renewed certificate, a
/// changed users file, a rotated password or client secret, a refresh token obtained
/// again. All or nothing: a file that does not load keeps every previous value.
async fn reload_on_hangup(shared: Arc<Shared>, files: Files) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => hangup,
        Err(error) => {
            warn!(%error, "SIGHUP cannot be caught: files are read at start-up only");
            return;
        }
    };
    while hangup.recv().await.is_some() {
        match Loaded::read(&files) {
            Ok(loaded) => {
                shared.install(loaded).await;
                metrics::reload(true);
                info!("relay-out files reloaded");
            }
            Err(error) => {
                metrics::reload(false);
                warn!(%error, "reload failed; the previous files stay in use");
            }
        }
    }
}

/// What [`Files`] held at one reload.
struct Loaded {
    tls: Option<Arc<ServerConfig>>,
    users: Option<Arc<UserDb>>,
    password: Option<Secret>,
    client_secret: Option<Secret>,
    refresh_token: Option<Secret>,
}

impl Loaded {
    fn read(files: &Files) -> Result<Loaded, String> {
        let secret = |flag, path: &Option<PathBuf>| {
            path.as_deref()
                .map(|p| secret::read_file(flag, p))
                .transpose()
        };
        Ok(Loaded {
            tls: match &files.cert_key {
                Some((cert, key)) => Some(tls::load_server_config(cert, key)?),
                None => None,
            },
            users: match &files.users {
                Some(path) => Some(Arc::new(UserDb::load(path).map_err(|e| e.to_string())?)),
                None => None,
            },
            password: secret("--upstream-password-file", &files.password)?,
            client_secret: secret("--oauth2-client-secret-file", &files.client_secret)?,
            refresh_token: secret("--oauth2-refresh-token-file", &files.refresh_token)?,
        })
    }
}

impl Shared {
    async fn install(&self, loaded: Loaded) {
        replace(&self.tls, loaded.tls);
        replace(&self.users, loaded.users);
        match &self.credentials {
            UpstreamCredentials::Password { password } => {
                if let Some(new) = loaded.password {
                    replace(password, new);
                }
            }
            UpstreamCredentials::OAuth2 { source } => {
                source
                    .replace_credentials(loaded.client_secret, loaded.refresh_token)
                    .await;
            }
        }
    }
}

/// `/readyz` is ready while the upstream probe passes and (with OAuth2) the last token
/// fetch did.
async fn readiness(
    mut up: watch::Receiver<bool>,
    token: Option<watch::Receiver<bool>>,
    ready: watch::Sender<bool>,
) {
    let mut token = token;
    loop {
        let token_ok = token.as_ref().is_none_or(|t| *t.borrow());
        ready.send_replace(*up.borrow() && token_ok);
        match token.as_mut() {
            Some(t) => tokio::select! {
                changed = up.changed() => if changed.is_err() { return },
                changed = t.changed() => if changed.is_err() { return },
            },
            None => {
                if up.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn probe_forever(
    upstream: Upstream,
    interval: Duration,
    capabilities: watch::Sender<Arc<Capabilities>>,
    up: watch::Sender<bool>,
) {
    loop {
        tokio::time::sleep(interval).await;
        match upstream.probe().await {
            Ok(found) => {
                if !*up.borrow() {
                    info!(upstream = %upstream.addr, "upstream probe succeeds again");
                }
                up.send_replace(true);
                capabilities.send_if_modified(|current| {
                    let changed = **current != found;
                    if changed {
                        *current = Arc::new(found);
                    }
                    changed
                });
            }
            Err(error) => {
                if *up.borrow() {
                    warn!(upstream = %upstream.addr, %error, "upstream probe failed");
                }
                up.send_replace(false);
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mechanisms: &'static [Mechanism],
    total: Arc<Semaphore>,
    mut shutdown: Shutdown,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "relay-out listening");
    }
    let mut backoff = Duration::from_millis(5);
    let refusals = Arc::new(Semaphore::new(listener::MAX_PENDING_REFUSALS));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.stopping() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(5);
                pair
            }
            Err(error) => {
                warn!(%error, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let permit = total.clone().try_acquire_owned();
        let allowed = shared.allowed(peer.ip());
        if permit.is_err() || !allowed {
            // Refusals wait for their reply in bounded numbers; past that the
            // connection is simply closed, so a flood costs no more than the bound.
            let Ok(slot) = refusals.clone().try_acquire_owned() else {
                continue;
            };
            if !allowed {
                info!(%peer, "sender outside --allow-from refused");
            }
            let reply = if allowed {
                canned::TOO_MANY_CONNECTIONS.into()
            } else {
                NOT_ALLOWED.into()
            };
            tokio::spawn(async move {
                refuse(tcp, reply).await;
                drop(slot);
            });
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve(tcp, peer, shared, mechanisms).await;
        });
    }
}

/// Answers before any greeting (RFC 5321 §3.1: a 554 greeting refuses the session).
async fn refuse(mut tcp: TcpStream, reply: Reply) {
    let mut out = Vec::new();
    reply.encode(&mut out);
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
        tcp.write_all(&out).await?;
        tcp.shutdown().await
    })
    .await;
}

/// How the pre-relay phase ended.
enum Next {
    StartTls,
    Relay {
        upstream: Box<Connected>,
        pending: Vec<u8>,
    },
    Closed(&'static str),
}

async fn serve(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>, mechanisms: &[Mechanism]) {
    let span = info_span!("session", %peer, listener = "relay-out");
    async move {
        let _ = tcp.set_nodelay(true);
        let session = Session::new(
            ListenerKind::Mx,
            shared.hostname.clone(),
            shared.capabilities.borrow().clone(),
            // No CRAM-MD5 is offered, so no challenge is ever made.
            Box::new(String::new),
            SessionLimits::default(),
        )
        .with_mechanisms(mechanisms);
        let mut driver = Driver {
            session,
            shared: &shared,
            override_reply: None,
            mail_deadline: tokio::time::Instant::now() + MAIL_DEADLINE,
        };
        let result = driver.run(tcp).await;
        info!(result, "session closed");
    }
    .instrument(span)
    .await
}

struct Driver<'a> {
    session: Session,
    shared: &'a Shared,
    /// The reply that replaces the session's generic one after a failed upstream
    /// login: it says which failure (451 4.4.x, 454 4.7.0).
    override_reply: Option<Reply>,
    /// When the sender must have sent MAIL (or logged in) by.
    mail_deadline: tokio::time::Instant,
}

impl Driver<'_> {
    async fn run(&mut self, mut tcp: TcpStream) -> &'static str {
        if send(&mut tcp, &self.session.greeting(), self.shared)
            .await
            .is_err()
        {
            return "io_error";
        }
        let first = self.shared.first_command_timeout;
        match self.drive(&mut tcp, first).await {
            Next::StartTls => {}
            Next::Closed(outcome) => return outcome,
            Next::Relay { upstream, pending } => return self.relay(tcp, upstream, pending).await,
        }
        let Some(config) = current(&self.shared.tls) else {
            return "closed_after_error";
        };
        let accepted = tokio::time::timeout(
            self.shared.tls_handshake_timeout,
            crate::tls::stream::accept(tcp, config),
        )
        .await;
        let mut stream = match accepted {
            Ok(Ok(stream)) => stream,
            _ => return "tls_failed",
        };
        self.session.on_tls_established();
        match self.drive(&mut stream, self.shared.command_timeout).await {
            Next::Closed(outcome) => outcome,
            // STARTTLS inside TLS is refused by the session itself.
            Next::StartTls => "closed_after_error",
            Next::Relay { upstream, pending } => self.relay(stream, upstream, pending).await,
        }
    }

    async fn relay<S>(&self, client: S, upstream: Box<Connected>, pending: Vec<u8>) -> &'static str
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let user = self.session.authenticated().map(|(user, _)| user);
        let upstream = *upstream;
        let context = relay::Context {
            user,
            tls: self.session.is_tls(),
            hostname: &self.shared.hostname,
            capabilities: &upstream.capabilities,
            policy: &self.shared.policy,
        };
        let (stats, end) = relay::relay(
            client,
            upstream.stream,
            &pending,
            &upstream.pending,
            self.shared.relay_idle_timeout,
            context,
        )
        .await;
        // Which account the provider saw the mail from: the audit trail an operator
        // needs when the provider asks. Sender logins are client-supplied: escaped.
        info!(
            user = user.map(|u| tracing::field::display(u.escape_debug())),
            upstream_user = %self.shared.account(user).escape_debug(),
            bytes_in = stats.client_to_backend,
            bytes_out = stats.backend_to_client,
            messages = stats.messages,
            recipients = stats.recipients,
            "relayed"
        );
        match end {
            RelayEnd::Closed => "relayed",
            RelayEnd::Idle => "relay_idle_timeout",
            RelayEnd::Refused => "closed_after_error",
            RelayEnd::Error(_) => "relay_error",
        }
    }

    /// Answers the sender until it needs TLS, has an upstream, or ends. Each line waits
    /// at most the command timeout (the first `first_wait`), trickled bytes included.
    async fn drive<S>(&mut self, stream: &mut S, first_wait: Duration) -> Next
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut deadline = tokio::time::Instant::now() + first_wait;
        let mut lines_read = self.session.lines_read();
        let mut out = Vec::new();
        let mut upstream = None;
        let mut chunk = [0u8; READ_CHUNK];
        let mut shutdown = self.shared.shutdown.clone();
        loop {
            while let Some(action) = self.session.next_action() {
                if self.session.lines_read() != lines_read {
                    lines_read = self.session.lines_read();
                    deadline = tokio::time::Instant::now() + self.shared.command_timeout;
                }
                match action {
                    Action::Reply(reply) => self.reply(reply).encode(&mut out),
                    // Without --cert the 220 was already turned into a refusal.
                    Action::StartTls if current(&self.shared.tls).is_none() => {}
                    Action::StartTls => {
                        return match flush(stream, &mut out, self.shared).await {
                            Ok(()) => Next::StartTls,
                            Err(_) => Next::Closed("io_error"),
                        };
                    }
                    Action::Close => {
                        let _ = flush(stream, &mut out, self.shared).await;
                        let _ =
                            tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
                        return Next::Closed(if self.session.quit() {
                            "quit"
                        } else {
                            "closed_after_error"
                        });
                    }
                    Action::Verify {
                        mechanism: _,
                        credentials,
                    } => {
                        if flush(stream, &mut out, self.shared).await.is_err() {
                            return Next::Closed("io_error");
                        }
                        let verdict = self.verify(credentials).await;
                        self.session.on_verified(verdict, None);
                    }
                    // relay-out checks senders against its own users file and runs no
                    // mechanism through a source, so no step is ever asked for; one
                    // would be answered as a source that cannot say.
                    Action::SourceSasl(SourceSasl::Cancel) => {}
                    Action::SourceSasl(_) => {
                        debug_assert!(false, "relay-out relays no SASL exchange");
                        self.session
                            .on_source_reply(SourceReply::Done(Verdict::Unavailable, None));
                    }
                    Action::ConnectBackend { hello: _, login } => {
                        if flush(stream, &mut out, self.shared).await.is_err() {
                            return Next::Closed("io_error");
                        }
                        match self.shared.connect(login.as_deref()).await {
                            Ok(connected) => {
                                metrics::upstream_session(metrics::upstream_result::OK);
                                upstream = Some(connected);
                                self.session.on_backend_ready(true);
                            }
                            Err(error) => {
                                metrics::upstream_session(error.label());
                                warn!(upstream = %self.shared.upstream.addr, %error, "upstream login failed");
                                // An AUTH answer stays the session's 454 4.7.0.
                                if login.is_none() {
                                    self.override_reply = Some(error.reply());
                                }
                                self.session.on_backend_ready(false);
                            }
                        }
                    }
                    Action::Delay(delay) => {
                        if flush(stream, &mut out, self.shared).await.is_err() {
                            return Next::Closed("io_error");
                        }
                        tokio::time::sleep(delay).await;
                    }
                    Action::Relay { pending } => {
                        if flush(stream, &mut out, self.shared).await.is_err() {
                            return Next::Closed("io_error");
                        }
                        return match upstream.take() {
                            Some(upstream) => Next::Relay {
                                upstream: Box::new(upstream),
                                pending,
                            },
                            None => Next::Closed("closed_after_error"),
                        };
                    }
                }
            }
            if flush(stream, &mut out, self.shared).await.is_err() {
                return Next::Closed("io_error");
            }
            // Checked before each read too: a sender that always has a byte ready would
            // never let the timeout below fire.
            let now = tokio::time::Instant::now();
            let read = if now >= self.mail_deadline {
                None
            } else {
                tokio::select! {
                read = tokio::time::timeout_at(deadline.min(self.mail_deadline), stream.read(&mut chunk)) => read.ok(),
                () = shutdown.stopping() => {
                    let _ = send(stream, &canned::SHUTTING_DOWN.into(), self.shared).await;
                    return Next::Closed("shutting_down");
                }
                }
            };
            match read {
                Some(Ok(0)) => return Next::Closed("client_closed"),
                Some(Ok(n)) => self.session.receive(&chunk[..n]),
                Some(Err(_)) => return Next::Closed("io_error"),
                None => {
                    if tokio::time::Instant::now() >= self.mail_deadline {
                        self.session.on_auth_deadline();
                    } else {
                        self.session.on_timeout();
                    }
                    let mut timeout_reply = Vec::new();
                    while let Some(action) = self.session.next_action() {
                        if let Action::Reply(reply) = action {
                            reply.encode(&mut timeout_reply);
                        }
                    }
                    let _ = flush(stream, &mut timeout_reply, self.shared).await;
                    return Next::Closed("timeout");
                }
            }
        }
    }

    /// The session's reply as this role gives it: a failed upstream login says what
    /// failed, and STARTTLS is offered only when it can be started.
    fn reply(&mut self, reply: Reply) -> Reply {
        if let Some(specific) = self.override_reply.take() {
            return specific;
        }
        let starttls = current(&self.shared.tls).is_some() && !self.session.is_tls();
        present(reply, starttls)
    }

    /// Checks a sender's password against `--users`, off the reactor (hashes are slow
    /// on purpose).
    async fn verify(&self, credentials: Credentials) -> Verdict {
        let Some(users) = current(&self.shared.users) else {
            return Verdict::Invalid;
        };
        let Credentials::Password { username, password } = credentials else {
            return Verdict::Invalid;
        };
        let Ok(_permit) = self.shared.verifiers.acquire().await else {
            return Verdict::Throttled;
        };
        let checked =
            crate::auth::hashing::run(move || users.verify_password(&username, &password)).await;
        match checked {
            Ok(true) => Verdict::Valid,
            _ => Verdict::Invalid,
        }
    }
}

/// Without `--cert` there is no STARTTLS to offer or start, and over TLS none to offer
/// again (the MX session lists it whenever no AUTH is offered).
fn present(reply: Reply, starttls: bool) -> Reply {
    if starttls {
        return reply;
    }
    match reply.code {
        // The session's only 220 after the greeting is its answer to STARTTLS, and over
        // TLS it answers STARTTLS with 503 itself.
        220 => NO_STARTTLS.into(),
        250 if reply.lines.len() > 1 => Reply {
            code: 250,
            lines: reply
                .lines
                .into_iter()
                .filter(|line| !line.eq_ignore_ascii_case("STARTTLS"))
                .collect(),
        },
        _ => reply,
    }
}

async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    reply: &Reply,
    shared: &Shared,
) -> std::io::Result<()> {
    let mut out = Vec::new();
    reply.encode(&mut out);
    flush(stream, &mut out, shared).await
}

/// Writes and empties `out`, within the command timeout: a sender that stops reading
/// cannot hold the task.
async fn flush<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut Vec<u8>,
    shared: &Shared,
) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let write = async {
        stream.write_all(out).await?;
        stream.flush().await
    };
    let result = tokio::time::timeout(shared.command_timeout, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
    out.clear();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ehlo() -> Reply {
        Reply {
            code: 250,
            lines: ["relay.test", "PIPELINING", "STARTTLS"]
                .map(|l| std::borrow::Cow::Owned(l.to_owned()))
                .to_vec(),
        }
    }

    #[test]
    fn starttls_only_where_it_can_start() {
        let kept = present(ehlo(), true);
        assert_eq!(kept.lines.len(), 3);
        let stripped = present(ehlo(), false);
        assert_eq!(
            stripped
                .lines
                .iter()
                .map(|l| l.as_ref())
                .collect::<Vec<_>>(),
            ["relay.test", "PIPELINING"]
        );
        let ready: Reply = canned::READY_FOR_TLS.into();
        assert_eq!(present(ready.clone(), true).code, 220);
        assert_eq!(
            present(ready, false).first_line(),
            "502 5.5.1 STARTTLS not offered"
        );
        let other: Reply = canned::OK.into();
        assert_eq!(present(other, false).code, 250);
    }

    #[test]
    fn user_map() {
        let map =
            parse_user_map("# printers\nprinter1 scans@example.com\n\n erp  erp@example.com \n")
                .expect("parses");
        assert_eq!(
            map.get("printer1").map(String::as_str),
            Some("scans@example.com")
        );
        assert_eq!(map.get("erp").map(String::as_str), Some("erp@example.com"));
        assert!(parse_user_map("a b c").is_err());
        assert!(parse_user_map("lonely").is_err());
        assert!(parse_user_map("a x\na y").is_err());
    }
}
