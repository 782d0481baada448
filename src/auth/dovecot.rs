//! A client of Dovecot's authentication protocol: the one Postfix speaks with
//! `smtpd_sasl_type = dovecot`, so that postern can check SMTP AUTH against the users a
//! site's Dovecot already serves, with whatever mechanisms that Dovecot offers.
//!
//! postern does not run the SASL mechanism itself: it relays the exchange. The client's
//! `AUTH` starts a request here ([`Client::start`]), each `334` challenge is Dovecot's
//! and each client line goes back to Dovecot ([`Exchange::step`]) until Dovecot says
//! `OK` or `FAIL`. So CRAM-MD5 and SCRAM work whenever Dovecot can do them.
//!
//! - [`protocol`]: the wire format (sans-IO): framing, tab-escaping, the handshake,
//!   `AUTH`/`CONT`/`CANCEL`, `OK`/`CONT`/`FAIL`, and which mechanisms are usable.
//! - [`connection`]: one connection's state (sans-IO): the handshake, then requests
//!   multiplexed under their ids.
//! - This module: [`Target`] (`unix:PATH`, `inet:HOST:PORT`) and the async [`Client`]:
//!   one shared connection, opened on demand and again after Dovecot went away, with a
//!   timeout on connecting, on the handshake and on every reply.
//!
//! Every exchange shares one connection, each under its own request id, so an SMTP
//! client that takes minutes to answer a challenge holds an id, not a connection:
//! Dovecot's `client_limit` is never the limit. A connection that breaks (Dovecot
//! killed or restarted, a protocol error) fails the exchanges waiting on it with
//! [`Error::Unavailable`] or [`Error::Protocol`], and the next request opens a new one.
//! A reply that does not come in time gives [`Error::Timeout`], and new requests go to
//! a new connection (a connection that stops answering may be half-open). Those three
//! are [`Error::is_source_down`]: answer `454 4.7.0` and count the source as down.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use postern::auth::dovecot::{Client, ClientInfo, Options, Step};
//!
//! let target = "unix:/run/dovecot/auth-client".parse()?;
//! let client = Client::new(target, Options::default());
//! let handshake = client.probe().await?;
//! let offered: Vec<&str> = handshake.usable_mechanisms().map(|m| m.name()).collect();
//! let (mut exchange, mut step) = client.start("LOGIN", None, &ClientInfo::default()).await?;
//! while let Step::Challenge(challenge) = step {
//!     // Send `334 <base64 of challenge>`, read the client's line, decode it.
//!     let response = b"alice";
//!     step = exchange.step(response).await?;
//! }
//! # Ok(()) }
//! ```

pub mod connection;
pub mod protocol;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;
use tokio::time::{Instant, timeout_at};
use tracing::debug;

use connection::{Connection, Event, RequestError};
pub use protocol::{ClientInfo, Handshake, Mechanism, MechanismFlags, ProtocolError, Reply, Step};

/// How many bytes one read takes from the connection. Lines may be longer; the line
/// buffer bounds them (see [`protocol::MAX_LINE`]).
const READ_CHUNK: usize = 4096;

// === target ===

/// Where Dovecot's auth service listens: its `unix_listener` or `inet_listener` in
/// `service auth`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `unix:PATH`: a UNIX socket (e.g. Postfix's `/var/spool/postfix/private/auth`).
    Unix(PathBuf),
    /// `inet:HOST:PORT`: TCP; an IPv6 host goes in brackets (`inet:[::1]:12345`).
    Inet {
        /// A name or an address, without brackets.
        host: String,
        /// Never 0.
        port: u16,
    },
}

/// A `--dovecot-auth` value that is neither `unix:PATH` nor `inet:HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetError {
    input: String,
    problem: &'static str,
}

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?}: {} (expected unix:PATH or inet:HOST:PORT)",
            self.input, self.problem
        )
    }
}

impl std::error::Error for TargetError {}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(input: &str) -> Result<Target, TargetError> {
        let error = |problem| TargetError {
            input: input.to_owned(),
            problem,
        };
        if let Some(path) = input.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(error("empty path"));
            }
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        let Some(rest) = input.strip_prefix("inet:") else {
            return Err(error("unknown kind"));
        };
        let Some((host, port)) = rest.rsplit_once(':') else {
            return Err(error("no port"));
        };
        let host = match host.strip_prefix('[') {
            Some(bracketed) => bracketed
                .strip_suffix(']')
                .ok_or_else(|| error("unclosed '['"))?,
            // "inet:::1:24" could be host "::1" or host "::" with port 1:24.
            None if host.contains(':') => return Err(error("an IPv6 host needs brackets")),
            None => host,
        };
        if host.is_empty() || host.contains(['[', ']', '/']) || host.contains(char::is_whitespace) {
            return Err(error("bad host"));
        }
        // u16's parser takes a leading '+'; a port is digits only.
        let digits = port.bytes().all(|b| b.is_ascii_digit());
        let port = match port.parse::<u16>() {
            Ok(port) if digits && port != 0 => port,
            _ => return Err(error("bad port")),
        };
        Ok(Target::Inet {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
            Target::Inet { host, port } if host.contains(':') => write!(f, "inet:[{host}]:{port}"),
            Target::Inet { host, port } => write!(f, "inet:{host}:{port}"),
        }
    }
}

// === errors ===

/// Why an exchange could not go on. Only [`Step::Failure`] means "wrong credentials";
/// these mean Dovecot could not say, or the caller asked something impossible.
#[derive(Debug, Clone)]
pub enum Error {
    /// Dovecot cannot be reached, or the connection broke before its reply: it is down
    /// or restarting.
    Unavailable(Arc<io::Error>),
    /// No answer within [`Options::timeout`]: connecting, the handshake, or a reply.
    Timeout,
    /// Dovecot sent something that breaks the protocol (or is not Dovecot at all).
    Protocol(ProtocolError),
    /// The mechanism is not one Dovecot offers over TLS (its configuration changed since
    /// EHLO was built, or the caller did not check): answer `504 5.5.4`.
    MechanismNotOffered,
    /// The client's response would make a line longer than Dovecot accepts
    /// ([`protocol::MAX_LINE`]); nothing was sent. Answer `500 5.5.6`.
    ResponseTooLong,
    /// [`Exchange::step`] after the exchange ended (a caller bug).
    Finished,
}

impl Error {
    /// Whether this says Dovecot is down or unusable (answer `454 4.7.0`, count the
    /// source down) rather than something about this one client.
    pub fn is_source_down(&self) -> bool {
        matches!(
            self,
            Error::Unavailable(_) | Error::Timeout | Error::Protocol(_)
        )
    }

    fn unavailable(error: io::Error) -> Error {
        Error::Unavailable(Arc::new(error))
    }

    fn closed() -> Error {
        Error::unavailable(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed by the auth service",
        ))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unavailable(error) => write!(f, "auth service unavailable: {error}"),
            Error::Timeout => f.write_str("auth service did not answer in time"),
            Error::Protocol(error) => write!(f, "auth service protocol error: {error}"),
            Error::MechanismNotOffered => f.write_str("mechanism not offered by the auth service"),
            Error::ResponseTooLong => f.write_str("response too long for the auth service"),
            Error::Finished => f.write_str("exchange already finished"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Unavailable(error) => Some(error.as_ref()),
            Error::Protocol(error) => Some(error),
            _ => None,
        }
    }
}

impl From<RequestError> for Error {
    fn from(error: RequestError) -> Error {
        match error {
            RequestError::MechanismNotOffered => Error::MechanismNotOffered,
            RequestError::TooLong => Error::ResponseTooLong,
            RequestError::NotChallenged => Error::Finished,
            RequestError::NotReady | RequestError::Closed | RequestError::IdsExhausted => {
                Error::closed()
            }
        }
    }
}

// === client ===

/// How the [`Client`] talks to Dovecot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The longest wait for connecting plus the handshake, and for each reply. Dovecot
    /// holds every failure back by `auth_failure_delay` (2 s by default) before it
    /// answers, and its passdb may be slow, so keep this well above both. Postfix waits
    /// 10 s (`AUTH_TIMEOUT` in `xsasl_dovecot_server.c`).
    pub timeout: Duration,
    /// Send `no-penalty` with each request, turning off Dovecot's own failure delay per
    /// client address (`auth_penalty`, up to 15 s) for postern's requests. Off by
    /// default, like Postfix; worth turning on when postern's own failure windows
    /// stand in front, as a penalty delay longer than `timeout` looks like an outage.
    pub no_penalty: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: Duration::from_secs(10),
            no_penalty: false,
        }
    }
}

/// A client of one Dovecot auth service. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    target: Target,
    options: Options,
    /// The connection new requests go to; replaced when it breaks or times out.
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    /// The last handshake seen, kept while Dovecot is away so EHLO stays stable.
    handshake: Mutex<Option<Arc<Handshake>>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("target", &self.inner.target)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `target`. Nothing is connected until the first request or
    /// [`probe`](Self::probe).
    pub fn new(target: Target, options: Options) -> Client {
        Client {
            inner: Arc::new(Inner {
                target,
                options,
                link: tokio::sync::Mutex::new(None),
                handshake: Mutex::new(None),
            }),
        }
    }

    /// Where this client connects.
    pub fn target(&self) -> &Target {
        &self.inner.target
    }

    /// The options it was made with.
    pub fn options(&self) -> &Options {
        &self.inner.options
    }

    /// The handshake of the last connection that completed one, if any: what EHLO
    /// should offer ([`Handshake::usable_mechanisms`]). It survives Dovecot going away.
    pub fn handshake(&self) -> Option<Arc<Handshake>> {
        lock(&self.inner.handshake).clone()
    }

    /// Makes sure a connection is up (opening one if needed, within the timeout) and
    /// returns its handshake: for start-up, `postern check` and readiness.
    pub async fn probe(&self) -> Result<Arc<Handshake>, Error> {
        let deadline = Instant::now() + self.inner.options.timeout;
        let link = self.link(deadline).await?;
        Ok(link.handshake.clone())
    }

    /// Starts a SASL exchange for an SMTP `AUTH <mechanism> [initial-response]`, and
    /// returns it with Dovecot's first answer.
    ///
    /// `mechanism` is matched without case against the usable mechanisms of the
    /// connection's handshake; `initial_response` is decoded (`Some(b"")` for SMTP's
    /// `=`). A [`Step::Challenge`] goes to the client; its answer goes to
    /// [`Exchange::step`].
    pub async fn start(
        &self,
        mechanism: &str,
        initial_response: Option<&[u8]>,
        client: &ClientInfo,
    ) -> Result<(Exchange, Step), Error> {
        let deadline = Instant::now() + self.inner.options.timeout;
        let mut retried = false;
        loop {
            let link = self.link(deadline).await?;
            let (sender, receiver) = oneshot::channel();
            let started = link.state().start(
                mechanism,
                initial_response,
                client,
                self.inner.options.no_penalty,
                sender,
            );
            match started {
                Ok((id, line)) => {
                    let mut exchange = Exchange {
                        client: self.clone(),
                        link,
                        id,
                        finished: false,
                    };
                    let step = exchange.round(&line, receiver, deadline).await?;
                    return Ok((exchange, step));
                }
                // It broke between being handed out and being used: one more try on a
                // new connection.
                Err(RequestError::Closed | RequestError::IdsExhausted) if !retried => {
                    self.retire(&link);
                    retried = true;
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// The connection to use, opening one if there is none or the last one broke.
    async fn link(&self, deadline: Instant) -> Result<Arc<Link>, Error> {
        let opened = timeout_at(deadline, async {
            // Held while connecting, so a burst of requests after an outage opens one
            // connection, not one each; every waiter still stops at its own deadline.
            let mut slot = self.inner.link.lock().await;
            if let Some(link) = slot.as_ref().filter(|link| link.is_open()) {
                return Ok(link.clone());
            }
            *slot = None;
            let link = Link::open(&self.inner.target).await?;
            *lock(&self.inner.handshake) = Some(link.handshake.clone());
            *slot = Some(link.clone());
            Ok(link)
        })
        .await;
        opened.unwrap_or(Err(Error::Timeout))
    }

    /// Sends new requests elsewhere than `link`. Exchanges already on it carry on.
    fn retire(&self, link: &Arc<Link>) {
        // Locked only while a connection is being opened, when `link` is not in the
        // slot any more.
        if let Ok(mut slot) = self.inner.link.try_lock()
            && slot
                .as_ref()
                .is_some_and(|current| Arc::ptr_eq(current, link))
        {
            *slot = None;
        }
    }
}

/// One SASL exchange in progress. Dropping it before it finished cancels it.
pub struct Exchange {
    client: Client,
    link: Arc<Link>,
    id: u32,
    finished: bool,
}

impl fmt::Debug for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exchange")
            .field("id", &self.id)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl Exchange {
    /// Passes the client's answer to the last challenge (decoded) and returns Dovecot's
    /// next step. Any error ends the exchange.
    pub async fn step(&mut self, response: &[u8]) -> Result<Step, Error> {
        if self.finished {
            return Err(Error::Finished);
        }
        let deadline = Instant::now() + self.client.inner.options.timeout;
        let (sender, receiver) = oneshot::channel();
        let responded = self.link.state().respond(self.id, response, sender);
        match responded {
            Ok(line) => self.round(&line, receiver, deadline).await,
            Err(error) => {
                self.abandon();
                Err(error.into())
            }
        }
    }

    /// Ends the exchange because the client gave up (SMTP `*`, RFC 4954 §4), telling
    /// Dovecot so the connection stays clean.
    pub async fn cancel(mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let line = self.link.state().cancel(self.id);
        if let Some(line) = line {
            let deadline = Instant::now() + self.client.inner.options.timeout;
            // A failed write already broke the link for everyone; nothing to add.
            let _ = self.link.write(&line, deadline).await;
        }
    }

    /// Writes one request line and waits for its reply.
    async fn round(
        &mut self,
        line: &[u8],
        receiver: oneshot::Receiver<Result<Reply, Error>>,
        deadline: Instant,
    ) -> Result<Step, Error> {
        let reply = match self.link.write(line, deadline).await {
            Ok(()) => match timeout_at(deadline, receiver).await {
                Ok(Ok(reply)) => reply,
                // The connection went away without a word for this request.
                Ok(Err(_)) => Err(Error::closed()),
                Err(_) => Err(Error::Timeout),
            },
            Err(error) => Err(error),
        };
        match reply {
            Ok(reply) => {
                let step = reply.into_step();
                self.finished = !matches!(step, Step::Challenge(_));
                Ok(step)
            }
            Err(error) => {
                self.abandon();
                if matches!(error, Error::Timeout) {
                    self.client.retire(&self.link);
                }
                Err(error)
            }
        }
    }

    /// Ends the exchange on our side; a late reply to it is dropped.
    fn abandon(&mut self) {
        self.finished = true;
        let _ = self.link.state().cancel(self.id);
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // The SMTP session ended mid-exchange. Tell Dovecot if a runtime is at hand
        // (otherwise it forgets the request when the connection closes).
        let Some(line) = self.link.state().cancel(self.id) else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let link = self.link.clone();
            let deadline = Instant::now() + self.client.inner.options.timeout;
            runtime.spawn(async move {
                let _ = link.write(&line, deadline).await;
            });
        }
    }
}

// === one connection ===

/// The token a request waits on: its reply, or why none will come.
type Waiter = oneshot::Sender<Result<Reply, Error>>;
type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// One connection after its handshake: a task reads and hands replies to their
/// exchanges; exchanges write their own lines.
struct Link {
    state: Mutex<Connection<Waiter>>,
    /// Whole lines only: a writer holds this for all of one line. `None` once the link
    /// failed, so the socket closes even while exchanges still hold the link.
    writer: tokio::sync::Mutex<Option<WriteHalf>>,
    handshake: Arc<Handshake>,
    /// The reading task, stopped when the link is dropped or fails.
    reader: OnceLock<AbortHandle>,
}

impl Link {
    /// Connects and does the handshake (the caller bounds the time).
    async fn open(target: &Target) -> Result<Arc<Link>, Error> {
        let context = |error: io::Error| {
            Error::unavailable(io::Error::new(
                error.kind(),
                format!("connecting to {target}: {error}"),
            ))
        };
        let (mut read, mut write): (ReadHalf, WriteHalf) = match target {
            Target::Unix(path) => {
                let (read, write) = UnixStream::connect(path)
                    .await
                    .map_err(context)?
                    .into_split();
                (Box::new(read), Box::new(write))
            }
            Target::Inet { host, port } => {
                let stream = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(context)?;
                // One short line each way per step: no Nagle delay.
                stream.set_nodelay(true).map_err(context)?;
                let (read, write) = stream.into_split();
                (Box::new(read), Box::new(write))
            }
        };
        write
            .write_all(&protocol::client_handshake(std::process::id()))
            .await
            .map_err(Error::unavailable)?;
        let mut state = Connection::new();
        let mut buf = vec![0; READ_CHUNK];
        loop {
            let n = read.read(&mut buf).await.map_err(Error::unavailable)?;
            if n == 0 {
                return Err(Error::closed());
            }
            state.receive(&buf[..n]);
            if let Some(Event::Ready) = state.poll().map_err(Error::Protocol)? {
                break;
            }
        }
        // Anything after DONE in the same read would be a reply to no request.
        state.poll().map_err(Error::Protocol)?;
        let Some(handshake) = state.handshake().cloned() else {
            return Err(Error::closed());
        };
        let handshake = Arc::new(handshake);
        debug!(
            dovecot = %target,
            mechanisms = handshake.mechanisms.len(),
            "dovecot auth: connected"
        );
        let link = Arc::new(Link {
            state: Mutex::new(state),
            writer: tokio::sync::Mutex::new(Some(write)),
            handshake,
            reader: OnceLock::new(),
        });
        let task = tokio::spawn(read_replies(
            Arc::downgrade(&link),
            read,
            target.to_string(),
        ));
        let _ = link.reader.set(task.abort_handle());
        Ok(link)
    }

    fn state(&self) -> MutexGuard<'_, Connection<Waiter>> {
        lock(&self.state)
    }

    fn is_open(&self) -> bool {
        self.state().is_open()
    }

    /// Ends the link: every exchange waiting on it gets `error`, and new requests are
    /// refused (the client opens another connection).
    fn fail(&self, error: Error) {
        let waiters = self.state().close();
        for waiter in waiters {
            let _ = waiter.send(Err(error.clone()));
        }
        if let Some(reader) = self.reader.get() {
            reader.abort();
        }
        // A writer busy right now fails on its own and leaves the half to the drop.
        if let Ok(mut writer) = self.writer.try_lock() {
            writer.take();
        }
    }

    /// Writes one whole line by `deadline`.
    async fn write(&self, line: &[u8], deadline: Instant) -> Result<(), Error> {
        let written = timeout_at(deadline, async {
            match self.writer.lock().await.as_mut() {
                Some(writer) => writer.write_all(line).await,
                None => Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "connection failed",
                )),
            }
        })
        .await;
        let error = match written {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(error)) => Error::unavailable(error),
            Err(_) => Error::Timeout,
        };
        // Part of the line may be out: nothing else can go on this connection.
        self.fail(error.clone());
        Err(error)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.get() {
            reader.abort();
        }
    }
}

/// Reads replies until the connection ends, handing each to the exchange waiting for
/// it. Holds the link only while handling what one read brought.
async fn read_replies(link: Weak<Link>, mut read: ReadHalf, target: String) {
    let mut buf = vec![0; READ_CHUNK];
    loop {
        let read_result = read.read(&mut buf).await;
        let Some(link) = link.upgrade() else {
            return;
        };
        let n = match read_result {
            Ok(0) => {
                debug!(dovecot = %target, "dovecot auth: connection closed by the server");
                link.fail(Error::closed());
                return;
            }
            Ok(n) => n,
            Err(error) => {
                debug!(dovecot = %target, %error, "dovecot auth: connection lost");
                link.fail(Error::unavailable(error));
                return;
            }
        };
        let mut state = link.state();
        state.receive(&buf[..n]);
        loop {
            match state.poll() {
                Ok(Some(Event::Reply { reply, token })) => {
                    // The exchange may have given up meanwhile; then nobody listens.
                    let _ = token.send(Ok(reply));
                }
                Ok(Some(Event::Ready)) => {}
                Ok(None) => break,
                Err(error) => {
                    drop(state);
                    debug!(dovecot = %target, %error, "dovecot auth: protocol error");
                    link.fail(Error::Protocol(error));
                    return;
                }
            }
        }
    }
}

/// Locks `mutex`, going on after a panic elsewhere: every value here is valid between
/// statements.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests;
