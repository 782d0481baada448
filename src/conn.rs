//! One client connection: drives the sans-IO [`Session`] over a socket, performs the
//! actions it asks for (TLS, credential checks, backend dial) and hands the connection
//! to the [`relay`] once the client is authenticated.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, info, info_span};

use crate::backend::{self, BackendConn, BackendError, Xclient};
use crate::limits::{Admission, AuthHistory, ClientNet};
use crate::relay::{self, RelayEnd, RelayStats};
use crate::sasl::{Credentials, Mechanism};
use crate::server::{MxIdentity, Shared};
use crate::session::{Action, ChallengeSource, ListenerKind, Rejection, Session, Verdict};
use crate::smtp::line::LineTooLong;
use crate::smtp::{LineBuffer, Reply, canned};
use crate::users::Check;
use crate::{metrics, tls};

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

/// What the session log line reports.
#[derive(Default)]
struct Summary {
    tls: Option<String>,
    user: Option<String>,
    mechanism: Option<Mechanism>,
    stats: RelayStats,
}

/// Serves one accepted connection to the end and logs one line about it.
pub async fn serve(tcp: TcpStream, addrs: ClientAddrs, kind: ListenerKind, shared: Arc<Shared>) {
    let span = info_span!("session", peer = %addrs.client, listener = kind.label());
    async move {
        let started = Instant::now();
        let _active = metrics::ActiveConnection::open(kind.label());
        let mut summary = Summary::default();
        let outcome = run(tcp, addrs, kind, &shared, &mut summary).await;
        let elapsed = started.elapsed();
        info!(
            tls = summary.tls.as_deref().unwrap_or("none"),
            user = summary
                .user
                .as_ref()
                .map(|u| Escaped(u))
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
    buf: LineBuffer,
    shutdown: watch::Receiver<bool>,
    addrs: ClientAddrs,
    auth_history: AuthHistory,
    /// When the session must have authenticated (or, on MX, sent MAIL) by.
    auth_deadline: tokio::time::Instant,
}

// The pre-AUTH phases (handshake, drive) are boxed: their futures hold read buffers and
// the backend dial, and a task cell is sized for its largest state, so unboxed they
// would stay allocated for the whole life of an idle relayed session.
async fn run(
    tcp: TcpStream,
    addrs: ClientAddrs,
    kind: ListenerKind,
    shared: &Shared,
    summary: &mut Summary,
) -> Outcome {
    // Every reply is small and answers a request: NODELAY keeps TLS handshakes and
    // pipelined replies from waiting on delayed ACKs.
    let _ = tcp.set_nodelay(true);
    let session = Session::new(
        kind,
        shared.hostname.clone(),
        shared.capabilities(),
        challenge_source(shared),
        shared.limits,
    )
    .with_mechanisms(&shared.mechanisms());
    let mut client = Client {
        session,
        buf: LineBuffer::new(),
        shutdown: shared.shutdown.clone(),
        addrs,
        auth_history: AuthHistory::default(),
        auth_deadline: tokio::time::Instant::now() + shared.timeouts.auth_deadline,
    };
    let first_wait = shared.timeouts.first_command;

    let next = match kind {
        ListenerKind::ImplicitTls => {
            let Some(mut stream) = Box::pin(handshake(tcp, shared, summary)).await else {
                return Outcome::TlsFailed;
            };
            if send(&mut stream, &client.session.greeting(), shared)
                .await
                .is_err()
            {
                return Outcome::IoError;
            }
            let next = Box::pin(drive(&mut stream, &mut client, shared, first_wait)).await;
            return finish(stream, next, &client.session, shared, summary).await;
        }
        ListenerKind::Submission | ListenerKind::Mx => {
            let mut tcp = tcp;
            if send(&mut tcp, &client.session.greeting(), shared)
                .await
                .is_err()
            {
                return Outcome::IoError;
            }
            let next = Box::pin(drive(&mut tcp, &mut client, shared, first_wait)).await;
            match next {
                Next::StartTls => tcp,
                other => return finish(tcp, other, &client.session, shared, summary).await,
            }
        }
    };

    // RFC 3207 §4.2, CVE-2011-0411: whatever the client pipelined after STARTTLS was
    // sent in plaintext and is never acted on. Bytes still in flight when the handshake
    // starts reach rustls, which rejects them as a malformed ClientHello.
    client.buf.discard();
    let Some(mut stream) = Box::pin(handshake(next, shared, summary)).await else {
        return Outcome::TlsFailed;
    };
    client.session.on_tls_established();
    let next = Box::pin(drive(
        &mut stream,
        &mut client,
        shared,
        shared.timeouts.command,
    ))
    .await;
    finish(stream, next, &client.session, shared, summary).await
}

/// Relays an authenticated session, or reports how the pre-AUTH phase ended.
async fn finish<S>(
    client: S,
    next: Next,
    session: &Session,
    shared: &Shared,
    summary: &mut Summary,
) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match next {
        Next::Closed(outcome) => outcome,
        // Only a client that is already in TLS can authenticate, so STARTTLS cannot
        // come back from a TLS phase; treat it as the protocol error it would be.
        Next::StartTls => Outcome::Refused,
        Next::Relay {
            backend,
            client_pending,
        } => {
            if let Some((user, mechanism)) = session.authenticated() {
                summary.user = Some(user.to_owned());
                summary.mechanism = Some(mechanism);
            }
            let capabilities = backend.capabilities;
            let context = relay::Context {
                user: session.authenticated().map(|(user, _)| user),
                tls: session.is_tls(),
                hostname: &shared.hostname,
                capabilities: &capabilities,
                policy: &shared.relay,
            };
            let (stats, end) = relay::relay(
                client,
                backend.stream,
                &client_pending,
                &backend.pending,
                shared.timeouts.relay_idle,
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
    }
}

/// Runs the session over `stream` until it needs TLS, is authenticated, or ends.
/// `first_wait` bounds the wait for the first line; each later line gets the command
/// timeout. The timer is not reset by partial lines, so a client trickling bytes
/// (slowloris) is cut off like a silent one.
async fn drive<S>(
    stream: &mut S,
    client: &mut Client,
    shared: &Shared,
    first_wait: Duration,
) -> Next
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Client {
        session,
        buf,
        shutdown,
        addrs,
        auth_history,
        auth_deadline,
    } = client;
    let auth_deadline = *auth_deadline;
    let mut deadline = tokio::time::Instant::now() + first_wait;
    let mut out = Vec::new();
    let mut actions = VecDeque::new();
    let mut backend_conn = None;
    let mut relay_first = Vec::new();
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        // Answer every complete line already received, in order (RFC 2920 pipelining).
        loop {
            if actions.is_empty() {
                match buf.next_line() {
                    Ok(Some(line)) => {
                        deadline = tokio::time::Instant::now() + shared.timeouts.command;
                        actions.extend(session.on_line(&line));
                    }
                    Ok(None) => break,
                    Err(LineTooLong) => actions.extend(session.on_line_too_long()),
                }
            }
            while let Some(action) = actions.pop_front() {
                match action {
                    Action::Reply(reply) => reply.encode(&mut out),
                    Action::StartTls => {
                        return match flush(stream, &mut out, shared).await {
                            Ok(()) => Next::StartTls,
                            Err(_) => Next::Closed(Outcome::IoError),
                        };
                    }
                    Action::Close => {
                        let _ = flush(stream, &mut out, shared).await;
                        // A TLS client deserves a close_notify, not a truncated stream.
                        let _ =
                            tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
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
                        // The client waits for this answer anyway; send what is queued
                        // so it is not held up behind a slow hash.
                        if flush(stream, &mut out, shared).await.is_err() {
                            return Next::Closed(Outcome::IoError);
                        }
                        let net = shared.grouping.net(addrs.client.ip());
                        let verdict = authenticate(
                            shared,
                            auth_history,
                            shutdown,
                            net,
                            mechanism,
                            credentials,
                        )
                        .await;
                        actions.extend(session.on_verified(verdict));
                    }
                    Action::ConnectBackend {
                        hello,
                        login,
                        first,
                    } => {
                        let introduction = backend::Introduction {
                            proxy: shared.backend_proxy_protocol,
                            xclient: xclient_use(shared, login.is_some()),
                            client: addrs.client,
                            local: addrs.local,
                            login: login.as_deref(),
                        };
                        let result = backend::connect(
                            &shared.backend,
                            &hello,
                            &introduction,
                            shared.timeouts.backend,
                        )
                        .await;
                        relay_first = first;
                        metrics::backend_connection(result.is_ok());
                        match result {
                            Ok(conn) => {
                                backend_conn = Some(conn);
                                actions.extend(session.on_backend_ready(true));
                            }
                            Err(BackendError::Unidentified) => {
                                tracing::warn!(
                                    backend = %shared.backend,
                                    "backend does not offer XCLIENT ADDR to postern; anonymous MX session refused at MAIL with 451 4.3.0 instead of relayed as postern's own address"
                                );
                                actions.extend(session.on_backend_unidentified());
                            }
                            Err(error) => {
                                tracing::warn!(backend = %shared.backend, %error, "backend unavailable");
                                actions.extend(session.on_backend_ready(false));
                            }
                        }
                    }
                    Action::Delay(delay) => {
                        if flush(stream, &mut out, shared).await.is_err() {
                            return Next::Closed(Outcome::IoError);
                        }
                        // A drain does not wait for a brute-force penalty to run out.
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            () = crate::server::stopping(shutdown) => {
                                let _ = send(stream, &canned::SHUTTING_DOWN.into(), shared).await;
                                return Next::Closed(Outcome::ShuttingDown);
                            }
                        }
                    }
                    Action::Relay => {
                        if flush(stream, &mut out, shared).await.is_err() {
                            return Next::Closed(Outcome::IoError);
                        }
                        return match backend_conn.take() {
                            Some(backend) => {
                                let mut client_pending = std::mem::take(&mut relay_first);
                                client_pending.extend_from_slice(&buf.take_pending());
                                Next::Relay {
                                    backend,
                                    client_pending,
                                }
                            }
                            None => Next::Closed(Outcome::Refused),
                        };
                    }
                }
            }
        }
        if flush(stream, &mut out, shared).await.is_err() {
            return Next::Closed(Outcome::IoError);
        }

        // A timeout polls its future first: a client that always has a byte ready would
        // never see the AUTH deadline pass, so it is checked before each read too.
        let read = if tokio::time::Instant::now() >= auth_deadline {
            None
        } else {
            tokio::select! {
                read = tokio::time::timeout_at(deadline.min(auth_deadline), stream.read(&mut chunk)) => read.ok(),
                () = crate::server::stopping(shutdown) => {
                    let _ = send(stream, &canned::SHUTTING_DOWN.into(), shared).await;
                    return Next::Closed(Outcome::ShuttingDown);
                }
            }
        };
        match read {
            Some(Ok(0)) => return Next::Closed(Outcome::ClientClosed),
            Some(Ok(n)) => buf.extend(&chunk[..n]),
            Some(Err(_)) => return Next::Closed(Outcome::IoError),
            None => {
                if tokio::time::Instant::now() >= auth_deadline {
                    metrics::connection_rejected(Rejection::AuthDeadline.label());
                    actions.extend(session.on_auth_deadline());
                } else {
                    actions.extend(session.on_timeout());
                }
                let mut timeout_reply = Vec::new();
                for action in actions.drain(..) {
                    if let Action::Reply(reply) = action {
                        reply.encode(&mut timeout_reply);
                    }
                }
                let _ = flush(stream, &mut timeout_reply, shared).await;
                return Next::Closed(Outcome::Timeout);
            }
        }
    }
}

/// How this session uses XCLIENT. An anonymous (MX) session must be introduced when
/// XCLIENT is the only way the backend can learn its address (see
/// [`crate::server::MxIdentity`]); an authenticated one goes on without, as it always did.
fn xclient_use(shared: &Shared, authenticated: bool) -> Xclient {
    if !shared.xclient {
        Xclient::Off
    } else if !authenticated && shared.mx_identity == Some(MxIdentity::Xclient) {
        Xclient::Required
    } else {
        Xclient::IfOffered
    }
}

async fn handshake(
    tcp: TcpStream,
    shared: &Shared,
    summary: &mut Summary,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let acceptor = TlsAcceptor::from(shared.tls_config());
    match tokio::time::timeout(shared.timeouts.tls_handshake, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => {
            let (_, conn) = stream.get_ref();
            let version = conn
                .protocol_version()
                .and_then(|v| v.as_str())
                .unwrap_or(metrics::label::tls_version::UNKNOWN);
            metrics::tls_handshake(true, version);
            summary.tls = Some(tls::describe(conn));
            Some(stream)
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

/// How long an AUTH may wait for a free verifier before it gets `454 4.7.0`.
const VERIFY_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);

/// Applies the failure limits, checks the credentials, and records the outcome.
async fn authenticate(
    shared: &Shared,
    history: &mut AuthHistory,
    shutdown: &mut watch::Receiver<bool>,
    client: ClientNet,
    mechanism: Mechanism,
    credentials: Credentials,
) -> Verdict {
    let username = credentials.username().to_owned();
    let user_key = shared.user_key(&username);
    let (ticket, delay) = match shared.auth_gate.admit(client, user_key, Instant::now()) {
        Admission::Verify { ticket, delay } => (ticket, delay),
        Admission::Refused(refusal) => {
            let scope = refusal.label();
            metrics::auth_throttled(scope);
            // A refused run repeats fast: one line per network and interval, counted.
            if let Some(events) = shared.throttle_log.note(client, Instant::now()) {
                info!(net = %client, events, user = ?Escaped(&username), mechanism = mechanism.label(), scope, "authentication throttled");
            }
            return Verdict::Throttled;
        }
    };
    if !delay.is_zero() {
        // The name is over its failure limit: slowed down from networks that have not
        // failed it, so its owner can still log in. A drain does not wait for it.
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = crate::server::stopping(shutdown) => return Verdict::Throttled,
        }
    }
    // A flood from one network queues at most this many for the verifier pool: the
    // rest is refused here, before it can crowd out other networks' logins.
    let Ok(verifying) = shared.verifications_per_net.try_acquire(client, None) else {
        metrics::auth_throttled(metrics::label::throttle_scope::NETWORK_VERIFICATIONS);
        if let Some(events) = shared.throttle_log.note(client, Instant::now()) {
            info!(net = %client, events, user = ?Escaped(&username), mechanism = mechanism.label(), scope = metrics::label::throttle_scope::NETWORK_VERIFICATIONS, "authentication throttled");
        }
        return Verdict::Throttled;
    };
    let verified = verify(shared, credentials).await;
    // Given back with the verifier, not after the failure pacing below: the cap is on
    // hashing, and a paced failure holds no CPU.
    drop(verifying);
    let Some((check, took)) = verified else {
        metrics::auth_throttled(metrics::label::throttle_scope::VERIFIER);
        return Verdict::Throttled;
    };
    let valid = check.valid;
    metrics::auth_attempt(mechanism.label(), valid);
    let now = Instant::now();
    if valid {
        ticket.succeeded(now);
        let forgiven = history.succeeded(user_key, mechanism);
        if forgiven > 0 {
            shared.auth_gate.forgive(client, user_key, forgiven, now);
            tracing::debug!(
                forgiven,
                mechanism = mechanism.label(),
                "earlier failures with another mechanism not counted against the user"
            );
        }
        return Verdict::Valid;
    }
    ticket.failed(now);
    history.failed(user_key, mechanism);
    // Every failure answers after the costliest hash's time, so response times tell
    // neither which names exist nor how each is stored (the verifier slot is free again:
    // this waits without holding CPU).
    shared.failure_pace.observe(took, check.decoy_work);
    tokio::select! {
        () = tokio::time::sleep(shared.failure_pace.pad(took)) => {}
        () = crate::server::stopping(shutdown) => {}
    }
    // One line per failure, with the name tried, for fail2ban-style tooling.
    info!(user = ?Escaped(&username), mechanism = mechanism.label(), result = "failure", "authentication failed");
    Verdict::Invalid
}

/// Checks credentials on the blocking pool: a KDF takes ~100 ms of CPU and must not
/// stall the reactor. The semaphore bounds how many run at once; `None` if none was
/// free in time. Also returns how long the check itself took (not the queue).
async fn verify(shared: &Shared, credentials: Credentials) -> Option<(Check, Duration)> {
    let users = shared.users();
    let permit = tokio::time::timeout(VERIFY_QUEUE_TIMEOUT, shared.verify_slots.acquire()).await;
    let Ok(Ok(_permit)) = permit else {
        return None;
    };
    let check = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let check = match &credentials {
            Credentials::Password { username, password } => {
                users.check_password(username, password)
            }
            Credentials::CramMd5 {
                username,
                challenge,
                digest,
            } => Check {
                valid: users.verify_cram_md5(username, challenge, digest),
                decoy_work: false,
            },
        };
        (check, started.elapsed())
    });
    let failed = (
        Check {
            valid: false,
            decoy_work: false,
        },
        Duration::ZERO,
    );
    Some(check.await.unwrap_or(failed))
}

/// RFC 2195 challenge `<random.timestamp@hostname>`, fresh from the CSPRNG each time.
fn challenge_source(shared: &Shared) -> ChallengeSource {
    let provider = shared.crypto.clone();
    let hostname = shared.hostname.clone();
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
    shared: &Shared,
) -> std::io::Result<()> {
    let mut out = Vec::new();
    reply.encode(&mut out);
    flush(stream, &mut out, shared).await
}

/// Writes and empties `out`. A client that stops reading cannot hold the task: the
/// write shares the command timeout.
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
    let result = tokio::time::timeout(shared.timeouts.command, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
    out.clear();
    result
}

/// Logs the throttle events held back by [`Shared::throttle_log`] once their network's
/// interval is over, until the process exits.
pub async fn report_throttles(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(crate::limits::THROTTLE_LOG_INTERVAL / 4);
    loop {
        tick.tick().await;
        for (net, events) in shared.throttle_log.due(Instant::now()) {
            info!(net = %net, events, "authentication throttled");
        }
    }
}

/// Most octets of a client-supplied string that a log line carries: AUTH lines may be
/// 12 KB, and a name that long, logged per attempt, would flood the log.
const MAX_LOGGED: usize = 256;

/// Client-supplied text for logs: control characters (CR/LF above all) escaped, so a
/// user name cannot forge log lines, and cut to [`MAX_LOGGED`] octets with a marker
/// saying how many were left out.
struct Escaped<'a>(&'a str);

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0;
        if text.len() <= MAX_LOGGED {
            return write!(f, "{}", text.escape_debug());
        }
        let mut cut = MAX_LOGGED;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let (kept, left) = text.split_at(cut);
        write!(f, "{}…[+{} octets]", kept.escape_debug(), left.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_names_are_escaped_and_cut() {
        for (name, expected) in [
            ("alice".to_owned(), "alice".to_owned()),
            ("a\r\nb".to_owned(), "a\\r\\nb".to_owned()),
            ("x".repeat(256), "x".repeat(256)),
            (
                "x".repeat(12_288),
                format!("{}…[+12032 octets]", "x".repeat(256)),
            ),
            // Never cut inside a character: é is two octets, the cut falls back one.
            (
                format!("{}é{}", "x".repeat(255), "y".repeat(10)),
                format!("{}…[+12 octets]", "x".repeat(255)),
            ),
        ] {
            assert_eq!(format!("{:?}", Escaped(&name)), expected);
        }
    }
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
