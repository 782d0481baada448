//! One client connection: drives the sans-IO [`Session`] over a socket, performs the
//! actions it asks for (TLS, credential checks, backend dial) and hands the connection
//! to the [`relay`] once the client is authenticated.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tracing::{Instrument, info, info_span};

use crate::auth::{self, Authenticator, LoggedName};
use crate::backend::{self, BackendConn, BackendError, MxIdentity, Xclient};
use crate::limits::{AuthHistory, NetGrouping};
use crate::relay::{self, RelayEnd, RelayStats};
use crate::sasl::Mechanism;
use crate::session::{
    Action, ChallengeSource, ListenerKind, Rejection, Session, SessionLimits, SourceReply,
    SourceSasl, Verdict,
};
use crate::shutdown::Shutdown;
use crate::smtp::{Capabilities, Reply, canned};
use crate::tls::stream::ServerStream;
use crate::{metrics, tls};

/// What every connection uses and that outlives it: the settings of the session, the
/// backend and the relay, and the services a session calls on. Built once by the server.
pub struct Services {
    pub hostname: Arc<str>,
    /// `HOST:PORT` of the backend.
    pub backend: String,
    pub timeouts: Timeouts,
    /// The CSPRNG for CRAM-MD5 challenges.
    pub crypto: Arc<CryptoProvider>,
    pub session_limits: SessionLimits,
    pub auth: Arc<Authenticator>,
    /// How client addresses group into networks for the AUTH limits.
    pub grouping: NetGrouping,
    /// What the post-AUTH relay enforces: sending limits, --strict-data.
    pub relay: Arc<crate::relay::Policy>,
    pub xclient: bool,
    pub backend_proxy_protocol: Option<crate::proxy_proto::Version>,
    /// `Some` with an MX listener: how the backend learns who an anonymous client is.
    pub mx_identity: Option<MxIdentity>,
    /// The backend's capabilities as of the last successful probe.
    pub capabilities: watch::Receiver<Arc<Capabilities>>,
    /// One config for the process: a reload swaps a pair inside its certificate
    /// resolver, so sessions never see a half-loaded pair.
    pub tls: Arc<ServerConfig>,
    pub shutdown: Shutdown,
}

impl Services {
    /// The backend's capabilities as the relay should present them.
    pub fn capabilities(&self) -> Arc<Capabilities> {
        let capabilities = self.capabilities.borrow().clone();
        if self.relay.hide_chunking && capabilities.has("CHUNKING") {
            return Arc::new(capabilities.without("CHUNKING"));
        }
        capabilities
    }
}

/// Bytes asked of the socket per read before AUTH; commands are small.
const READ_CHUNK: usize = 4096;

/// How a session ended, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Quit,
    Relayed,
    RelayIdle,
    RelayError,
    ClientClosed,
    Timeout,
    TlsFailed,
    Refused,
    ShuttingDown,
    IoError,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Quit => "quit",
            Outcome::Relayed => "relayed",
            Outcome::RelayIdle => "relay_idle_timeout",
            Outcome::RelayError => "relay_error",
            Outcome::ClientClosed => "client_closed",
            Outcome::Timeout => "timeout",
            Outcome::TlsFailed => "tls_failed",
            Outcome::Refused => "closed_after_error",
            Outcome::ShuttingDown => "shutting_down",
            Outcome::IoError => "io_error",
        }
    }
}

/// What one phase of [`drive`] ended with.
enum Next {
    StartTls,
    Relay {
        backend: BackendConn,
        client_pending: Vec<u8>,
    },
    Closed(Outcome),
}

/// How the pre-AUTH phase handed the connection over.
///
/// The TLS stream is boxed once, right after the handshake: it is 1.3 KiB, and a value
/// moved from one future to the next is kept in each of them (rustc keeps an `async
/// fn`'s arguments twice), so every idle relayed session would carry several copies.
enum Handoff {
    Ended(Outcome),
    Plain(TcpStream, RelayJob),
    Tls(Box<ServerStream<TcpStream>>, RelayJob),
}

/// What the relay needs from the pre-AUTH phase: the `Session` and the rest of
/// [`Client`] are dropped before it starts.
struct RelayJob {
    backend: BackendConn,
    client_pending: Vec<u8>,
    tls: bool,
}

impl RelayJob {
    fn from(next: Next, session: &Session, summary: &mut Summary) -> Result<RelayJob, Outcome> {
        match next {
            Next::Closed(outcome) => Err(outcome),
            // Only a client that is already in TLS can authenticate, so STARTTLS cannot
            // come back from a TLS phase; treat it as the protocol error it would be.
            Next::StartTls => Err(Outcome::Refused),
            Next::Relay {
                backend,
                client_pending,
            } => {
                if let Some((user, mechanism)) = session.authenticated() {
                    summary.user = Some(user.to_owned());
                    summary.mechanism = Some(mechanism);
                }
                Ok(RelayJob {
                    backend,
                    client_pending,
                    tls: session.is_tls(),
                })
            }
        }
    }
}

/// What the session log line reports.
#[derive(Default)]
struct Summary {
    tls: Option<String>,
    user: Option<String>,
    mechanism: Option<Mechanism>,
    stats: RelayStats,
}

/// Serves one accepted connection to the end and logs one line about it.
pub async fn serve(
    tcp: TcpStream,
    addrs: ClientAddrs,
    kind: ListenerKind,
    services: Arc<Services>,
) {
    let span = info_span!("session", peer = %addrs.client, listener = kind.label());
    async move {
        let started = Instant::now();
        let _active = metrics::ActiveConnection::open(kind.label());
        let mut summary = Summary::default();
        // Its own statement, so the finished pre-AUTH future is freed before the relay
        // starts (a match scrutinee's temporaries would live to the end of the match).
        let handoff = Box::pin(run(tcp, addrs, kind, &services, &mut summary)).await;
        let outcome = match handoff {
            Handoff::Ended(outcome) => outcome,
            Handoff::Plain(client, job) => finish(client, job, &services, &mut summary).await,
            Handoff::Tls(client, job) => finish(client, job, &services, &mut summary).await,
        };
        let elapsed = started.elapsed();
        info!(
            tls = summary.tls.as_deref().unwrap_or("none"),
            user = summary
                .user
                .as_ref()
                .map(|u| LoggedName(u))
                .map(tracing::field::debug),
            mechanism = summary.mechanism.map(Mechanism::label),
            bytes_in = summary.stats.client_to_backend,
            bytes_out = summary.stats.backend_to_client,
            messages = summary.stats.messages,
            recipients = summary.stats.recipients,
            duration_ms = elapsed.as_millis() as u64,
            result = outcome.label(),
            "session closed"
        );
    }
    .instrument(span)
    .await
}

/// The client's address and the address it connected to, from the socket or from a
/// trusted PROXY header.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddrs {
    pub client: SocketAddr,
    pub local: SocketAddr,
}

/// The pre-AUTH state of one connection, kept across the STARTTLS stream change.
struct Client {
    session: Session,
    shutdown: Shutdown,
    addrs: ClientAddrs,
    auth_history: AuthHistory,
    /// AUTH attempts so far (auth_http's `Auth-Login-Attempt`).
    auth_attempts: u32,
    /// When the session must have authenticated (or, on MX, sent MAIL) by.
    auth_deadline: tokio::time::Instant,
}

/// The pre-AUTH phase: greeting, STARTTLS, AUTH and the backend dial. Its future is
/// boxed by [`serve`] and freed before the relay starts: it holds the session, read
/// buffers and the dial, and a task cell is sized for its largest state, so otherwise
/// they would stay allocated for the whole life of an idle relayed session.
async fn run(
    tcp: TcpStream,
    addrs: ClientAddrs,
    kind: ListenerKind,
    services: &Services,
    summary: &mut Summary,
) -> Handoff {
    // Every reply is small and answers a request: NODELAY keeps TLS handshakes and
    // pipelined replies from waiting on delayed ACKs.
    let _ = tcp.set_nodelay(true);
    let mechanisms = services.auth.mechanisms();
    let relayed: Vec<Mechanism> = mechanisms
        .iter()
        .copied()
        .filter(|m| services.auth.relays(*m))
        .collect();
    let session = Session::new(
        kind,
        services.hostname.clone(),
        services.capabilities(),
        challenge_source(services),
        services.session_limits,
    )
    .with_mechanisms(&mechanisms)
    .with_relayed(&relayed);
    let mut client = Client {
        session,
        shutdown: services.shutdown.clone(),
        addrs,
        auth_history: AuthHistory::default(),
        auth_attempts: 0,
        auth_deadline: tokio::time::Instant::now() + services.timeouts.auth_deadline,
    };
    let first_wait = services.timeouts.first_command;

    let next = match kind {
        ListenerKind::ImplicitTls => {
            let Some(mut stream) = Box::pin(handshake(tcp, services, summary)).await else {
                return Handoff::Ended(Outcome::TlsFailed);
            };
            if send(&mut stream, &client.session.greeting(), services)
                .await
                .is_err()
            {
                return Handoff::Ended(Outcome::IoError);
            }
            let next = Box::pin(drive(&mut stream, &mut client, services, first_wait)).await;
            return match RelayJob::from(next, &client.session, summary) {
                Ok(job) => Handoff::Tls(stream, job),
                Err(outcome) => Handoff::Ended(outcome),
            };
        }
        ListenerKind::Submission | ListenerKind::Mx => {
            let mut tcp = tcp;
            if send(&mut tcp, &client.session.greeting(), services)
                .await
                .is_err()
            {
                return Handoff::Ended(Outcome::IoError);
            }
            let next = Box::pin(drive(&mut tcp, &mut client, services, first_wait)).await;
            match next {
                Next::StartTls => tcp,
                other => {
                    return match RelayJob::from(other, &client.session, summary) {
                        Ok(job) => Handoff::Plain(tcp, job),
                        Err(outcome) => Handoff::Ended(outcome),
                    };
                }
            }
        }
    };

    // The session dropped what was pipelined after STARTTLS (RFC 3207 §4.2). Bytes still
    // in flight when the handshake starts reach rustls, which rejects them as a
    // malformed ClientHello.
    let Some(mut stream) = Box::pin(handshake(next, services, summary)).await else {
        return Handoff::Ended(Outcome::TlsFailed);
    };
    client.session.on_tls_established();
    let next = Box::pin(drive(
        &mut stream,
        &mut client,
        services,
        services.timeouts.command,
    ))
    .await;
    match RelayJob::from(next, &client.session, summary) {
        Ok(job) => Handoff::Tls(stream, job),
        Err(outcome) => Handoff::Ended(outcome),
    }
}

/// Relays an authenticated session.
async fn finish<S>(client: S, job: RelayJob, services: &Services, summary: &mut Summary) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let RelayJob {
        backend,
        client_pending,
        tls,
    } = job;
    let context = relay::Context {
        user: summary.user.as_deref(),
        tls,
        hostname: &services.hostname,
        capabilities: &backend.capabilities,
        policy: &services.relay,
    };
    let (stats, end) = relay::relay(
        client,
        backend.stream,
        &client_pending,
        &backend.pending,
        services.timeouts.relay_idle,
        context,
    )
    .await;
    summary.stats = stats;
    match end {
        RelayEnd::Closed => Outcome::Relayed,
        RelayEnd::Idle => Outcome::RelayIdle,
        RelayEnd::Refused => Outcome::Refused,
        RelayEnd::Error(error) => {
            tracing::debug!(%error, kind = ?error.kind(), "relay ended with an error");
            Outcome::RelayError
        }
    }
}

/// Runs the session over `stream` until it needs TLS, is authenticated, or ends: hands
/// the session what the client sends and performs the actions it returns. `first_wait`
/// bounds the wait for the first line; each later line gets the command timeout. The
/// timer is not reset by partial lines, so a client trickling bytes (slowloris) is cut
/// off like a silent one.
async fn drive<S>(
    stream: &mut S,
    client: &mut Client,
    services: &Services,
    first_wait: Duration,
) -> Next
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Client {
        session,
        shutdown,
        addrs,
        auth_history,
        auth_attempts,
        auth_deadline,
    } = client;
    let auth_deadline = *auth_deadline;
    let mut deadline = tokio::time::Instant::now() + first_wait;
    let mut lines_read = session.lines_read();
    let mut out = Vec::new();
    let mut backend_conn = None;
    // Where the credential source sent this user, if it chose a backend.
    let mut route: Option<SocketAddr> = None;
    // An exchange the credential source runs, between two client lines.
    let mut relayed: Option<auth::Relayed> = None;
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        // Answer every complete line already received, in order (RFC 2920 pipelining).
        while let Some(action) = session.next_action() {
            if session.lines_read() != lines_read {
                lines_read = session.lines_read();
                deadline = tokio::time::Instant::now() + services.timeouts.command;
            }
            match action {
                Action::Reply(reply) => reply.encode(&mut out),
                Action::StartTls => {
                    return match flush(stream, &mut out, services).await {
                        Ok(()) => Next::StartTls,
                        Err(_) => Next::Closed(Outcome::IoError),
                    };
                }
                Action::Close => {
                    let _ = flush(stream, &mut out, services).await;
                    // A TLS client deserves a close_notify, not a truncated stream.
                    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
                    if session.auth_failures_exhausted() {
                        metrics::auth_throttled(metrics::label::throttle_scope::CONNECTION);
                    }
                    if let Some(rejection) = session.rejection() {
                        metrics::connection_rejected(rejection.label());
                    }
                    return Next::Closed(if session.quit() {
                        Outcome::Quit
                    } else {
                        Outcome::Refused
                    });
                }
                Action::Verify {
                    mechanism,
                    credentials,
                } => {
                    // The client waits for this answer anyway; send what is queued so it
                    // is not held up behind a slow hash.
                    if flush(stream, &mut out, services).await.is_err() {
                        return Next::Closed(Outcome::IoError);
                    }
                    *auth_attempts += 1;
                    let who = auth_client(addrs, services, session, *auth_attempts);
                    let decision = services
                        .auth
                        .authenticate(auth_history, shutdown, who, mechanism, credentials)
                        .await;
                    route = decision.route;
                    session.on_verified(decision.verdict, decision.user);
                }
                Action::SourceSasl(step) => {
                    if !matches!(step, SourceSasl::Cancel)
                        && flush(stream, &mut out, services).await.is_err()
                    {
                        return Next::Closed(Outcome::IoError);
                    }
                    if matches!(step, SourceSasl::Start { .. }) {
                        *auth_attempts += 1;
                    }
                    let who = auth_client(addrs, services, session, *auth_attempts);
                    let (next, reply) = match step {
                        SourceSasl::Start { mechanism, initial } => {
                            services
                                .auth
                                .relay_start(auth_history, shutdown, who, mechanism, initial)
                                .await
                        }
                        SourceSasl::Step(response) => match relayed.take() {
                            Some(exchange) => {
                                services
                                    .auth
                                    .relay_step(exchange, auth_history, shutdown, who, response)
                                    .await
                            }
                            None => (None, SourceReply::Done(Verdict::Unavailable, None)),
                        },
                        SourceSasl::Cancel => {
                            // Dropping the exchange cancels it at the source.
                            relayed = None;
                            continue;
                        }
                    };
                    relayed = next;
                    session.on_source_reply(reply);
                }
                Action::ConnectBackend { hello, login } => {
                    let introduction = backend::Introduction {
                        proxy: services.backend_proxy_protocol,
                        xclient: xclient_use(services, login.is_some()),
                        client: addrs.client,
                        local: addrs.local,
                        login: login.as_deref(),
                    };
                    let target = route.map(|r| r.to_string());
                    let target = target.as_deref().unwrap_or(&services.backend);
                    let result =
                        backend::connect(target, &hello, &introduction, services.timeouts.backend)
                            .await;
                    metrics::backend_connection(result.is_ok());
                    match result {
                        Ok(conn) => {
                            backend_conn = Some(conn);
                            session.on_backend_ready(true);
                        }
                        Err(BackendError::Unidentified) => {
                            tracing::warn!(
                                backend = %services.backend,
                                "backend does not offer XCLIENT ADDR to postern; anonymous MX session refused at MAIL with 451 4.3.0 instead of relayed as postern's own address"
                            );
                            session.on_backend_unidentified();
                        }
                        Err(error) => {
                            tracing::warn!(backend = %target, %error, "backend unavailable");
                            session.on_backend_ready(false);
                        }
                    }
                }
                Action::Delay(delay) => {
                    if flush(stream, &mut out, services).await.is_err() {
                        return Next::Closed(Outcome::IoError);
                    }
                    // A drain does not wait for a brute-force penalty to run out.
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.stopping() => {
                            let _ = send(stream, &canned::SHUTTING_DOWN.into(), services).await;
                            return Next::Closed(Outcome::ShuttingDown);
                        }
                    }
                }
                Action::Relay { pending } => {
                    if flush(stream, &mut out, services).await.is_err() {
                        return Next::Closed(Outcome::IoError);
                    }
                    return match backend_conn.take() {
                        Some(backend) => Next::Relay {
                            backend,
                            client_pending: pending,
                        },
                        None => Next::Closed(Outcome::Refused),
                    };
                }
            }
        }
        if flush(stream, &mut out, services).await.is_err() {
            return Next::Closed(Outcome::IoError);
        }

        // A timeout polls its future first: a client that always has a byte ready would
        // never see the AUTH deadline pass, so it is checked before each read too.
        let read = if tokio::time::Instant::now() >= auth_deadline {
            None
        } else {
            tokio::select! {
                read = tokio::time::timeout_at(deadline.min(auth_deadline), stream.read(&mut chunk)) => read.ok(),
                () = shutdown.stopping() => {
                    let _ = send(stream, &canned::SHUTTING_DOWN.into(), services).await;
                    return Next::Closed(Outcome::ShuttingDown);
                }
            }
        };
        match read {
            Some(Ok(0)) => return Next::Closed(Outcome::ClientClosed),
            Some(Ok(n)) => session.receive(&chunk[..n]),
            Some(Err(_)) => return Next::Closed(Outcome::IoError),
            None => {
                if tokio::time::Instant::now() >= auth_deadline {
                    metrics::connection_rejected(Rejection::AuthDeadline.label());
                    session.on_auth_deadline();
                } else {
                    session.on_timeout();
                }
                let mut timeout_reply = Vec::new();
                while let Some(action) = session.next_action() {
                    if let Action::Reply(reply) = action {
                        reply.encode(&mut timeout_reply);
                    }
                }
                let _ = flush(stream, &mut timeout_reply, services).await;
                return Next::Closed(Outcome::Timeout);
            }
        }
    }
}

/// Who is trying to log in, as the Authenticator needs it.
fn auth_client<'a>(
    addrs: &ClientAddrs,
    services: &Services,
    session: &'a Session,
    attempt: u32,
) -> auth::Client<'a> {
    auth::Client {
        addr: addrs.client,
        local: addrs.local,
        origin: services.grouping.origin(addrs.client.ip()),
        helo: session.hello_name(),
        attempt,
    }
}

/// How this session uses XCLIENT. An anonymous (MX) session must be introduced when
/// XCLIENT is the only way the backend can learn its address (see
/// [`MxIdentity`]); an authenticated one goes on without, as it always did.
fn xclient_use(services: &Services, authenticated: bool) -> Xclient {
    if !services.xclient {
        Xclient::Off
    } else if !authenticated && services.mx_identity == Some(MxIdentity::Xclient) {
        Xclient::Required
    } else {
        Xclient::IfOffered
    }
}

async fn handshake(
    tcp: TcpStream,
    services: &Services,
    summary: &mut Summary,
) -> Option<Box<ServerStream<TcpStream>>> {
    let accept = tls::stream::accept(tcp, services.tls.clone());
    match tokio::time::timeout(services.timeouts.tls_handshake, accept).await {
        Ok(Ok(stream)) => {
            let conn = stream.connection();
            let version = conn
                .protocol_version()
                .and_then(|v| v.as_str())
                .unwrap_or(metrics::label::tls_version::UNKNOWN);
            metrics::tls_handshake(true, version);
            summary.tls = Some(tls::describe(conn));
            Some(Box::new(stream))
        }
        Ok(Err(error)) => {
            metrics::tls_handshake(false, metrics::label::tls_version::NONE);
            tracing::debug!(%error, "TLS handshake failed");
            None
        }
        Err(_) => {
            metrics::tls_handshake(false, metrics::label::tls_version::NONE);
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

/// RFC 2195 challenge `<random.timestamp@hostname>`, fresh from the CSPRNG each time.
fn challenge_source(services: &Services) -> ChallengeSource {
    let provider = services.crypto.clone();
    let hostname = services.hostname.clone();
    Box::new(move || {
        let mut random = [0u8; 8];
        // A failing system RNG leaves zeros; the timestamp still varies, and a
        // predictable challenge only weakens replay protection of CRAM-MD5 itself.
        let _ = provider.secure_random.fill(&mut random);
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format!("<{}.{timestamp}@{hostname}>", u64::from_be_bytes(random))
    })
}

async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    reply: &Reply,
    services: &Services,
) -> std::io::Result<()> {
    let mut out = Vec::new();
    reply.encode(&mut out);
    flush(stream, &mut out, services).await
}

/// Writes and empties `out`. A client that stops reading cannot hold the task: the
/// write shares the command timeout.
async fn flush<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut Vec<u8>,
    services: &Services,
) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let write = async {
        stream.write_all(out).await?;
        stream.flush().await
    };
    let result = tokio::time::timeout(services.timeouts.command, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
    out.clear();
    result
}

/// Phase time limits.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub tls_handshake: Duration,
    pub first_command: Duration,
    pub command: Duration,
    pub backend: Duration,
    pub relay_idle: Duration,
    /// From connect to a successful AUTH (an MX session: to its first MAIL).
    pub auth_deadline: Duration,
}
