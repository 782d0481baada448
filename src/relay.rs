//! The post-AUTH relay: bytes go verbatim both ways while the sans-IO
//! [`tracker::Tracker`] follows the SMTP state of the stream (RFC 5321, RFC 2920
//! pipelining, RFC 3030 BDAT), so postern can answer what it must answer itself (a
//! second AUTH, STARTTLS, a sending limit, a body a lenient backend could end early),
//! rewrite a post-login EHLO or HELO reply, and count what the backend accepts.
//!
//! This file is only the shell: it reads into the space the tracker offers, writes
//! what it queued, shuts a side down when it says so, and asks the limits store what
//! it wants to know. Each direction makes progress on its own (a client that stops
//! reading stalls only the replies to it), bytes are counted when they are written,
//! and when a write to the backend fails, what the backend sent before (a 552 before
//! it hung up) still reaches the client.

pub mod pump;
pub mod rules;
pub mod tracker;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tracing::{info, warn};

use crate::metrics::{self as m, Direction, MessageResult, bytes_counter};
use crate::quota::{self, Quota};
use crate::smtp::Capabilities;
use crate::store::StoreFailure;
use pump::{Io, Pump, Pumped, Sides};
use tracker::{Claim, Event, Limit, Notice, Reservation, Settings, Tracker};

/// How long closing a side may take before the relay gives up on it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a client that stopped sending is still waited for after postern closed its
/// side: closing a socket with unread input sends a reset, which can destroy the last
/// reply before the client reads it (Apache's "lingering close"). An idle time, not a
/// total: a client still uploading a large body on a busy machine must get its reply
/// as surely as one on an idle machine.
const LINGER: Duration = Duration::from_secs(2);

/// The longest lingering lasts, however steadily the client sends.
const LINGER_MAX: Duration = Duration::from_secs(30);

/// The most bytes read and dropped while lingering.
const LINGER_BYTES: usize = 16 * 1024 * 1024;

/// The read size while lingering.
const LINGER_CHUNK: usize = 16 * 1024;

/// Bytes written each way, and the messages the backend accepted with their
/// recipients, for the session log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayStats {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    pub messages: u64,
    pub recipients: u64,
}

/// How the relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both sides closed their write halves.
    Closed,
    /// Nothing moved for the idle timeout.
    Idle,
    /// postern ended the session itself after a closing reply (a command line too
    /// long, an unusable BDAT, a refused body).
    Refused,
    Error(io::Error),
}

/// What the relay enforces, from the command line; shared by all sessions.
#[derive(Debug)]
pub struct Policy {
    /// `--strict-data`: refuse DATA bodies with a bare CR or LF (SMTP smuggling).
    pub strict_data: bool,
    /// `--hide-chunking`: the backend's CHUNKING is never offered, so BDAT never passes.
    pub hide_chunking: bool,
    pub quota: Quota,
}

impl Policy {
    /// Observe and count only: no limits, no strict DATA.
    pub fn observe_only() -> Policy {
        Policy {
            strict_data: false,
            hide_chunking: false,
            quota: Quota::unlimited(),
        }
    }
}

/// What the relay knows about the session it relays.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The authenticated user; `None` for an anonymous MX session.
    pub user: Option<&'a str>,
    /// TLS is active on the client connection.
    pub tls: bool,
    /// Postern's name, first line of a rewritten EHLO reply.
    pub hostname: &'a Arc<str>,
    /// The backend's capabilities on this connection (CHUNKING and SIZE decide how
    /// BDAT is followed); a post-login EHLO replaces them with the live answer.
    pub capabilities: &'a Capabilities,
    pub policy: &'a Policy,
}

/// Relays `client_pending` (what the client pipelined behind its AUTH) and
/// `backend_pending` first, then everything else both ways until both sides are done,
/// nothing moves for `idle`, or postern closes the session.
///
/// Not an `async fn`: rustc keeps each argument of one twice in its future (the
/// argument, and the local it is moved into; measured here with a 4,000-byte client
/// stream: 9,048 bytes as an `async fn`, 4,872 as this), and the client's TLS stream
/// is 1.2 KiB that every idle session would hold twice. The async block below uses the
/// captured streams in place.
pub fn relay<'a, C, B>(
    mut client: C,
    mut backend: B,
    client_pending: &[u8],
    backend_pending: &[u8],
    idle: Duration,
    context: Context<'a>,
) -> impl Future<Output = (RelayStats, RelayEnd)> + 'a
where
    C: AsyncRead + AsyncWrite + Unpin + 'a,
    B: AsyncRead + AsyncWrite + Unpin + 'a,
{
    let policy = context.policy;
    let settings = Settings {
        hostname: context.hostname.clone(),
        authenticated: context.user.is_some(),
        tls: context.tls,
        chunking: false,
        max_chunk: 0,
        hide_chunking: policy.hide_chunking,
        strict_data: policy.strict_data,
        limits: policy.quota.limits(),
    }
    .with_capabilities(context.capabilities);
    let mut shell = Shell {
        context,
        tracker: Tracker::new(settings, client_pending, backend_pending),
        idle,
        stats: RelayStats::default(),
        client_bytes: bytes_counter(Direction::ClientToBackend),
        backend_bytes: bytes_counter(Direction::BackendToClient),
        store_call: None,
        unreleased: (0, 0),
        pump: Pump::default(),
    };
    async move {
        let end = shell.run(&mut client, &mut backend).await;
        // Boxed: a future's size is that of its largest state, and these run once, at
        // the end; inline, a limits store call's future would be held by every idle
        // session.
        Box::pin(async {
            shell.settle_store_call().await;
            shell.tracker.finish();
            shell.take_notices();
            shell.release_rest().await;
        })
        .await;
        (shell.stats, end)
    }
}

/// A call to the limits store in flight.
type StoreCall<'a> = Pin<Box<dyn Future<Output = StoreAnswer> + Send + 'a>>;

enum StoreAnswer {
    Reservation(Reservation),
    Released,
}

/// What one poll of both sides came to.
enum Step {
    /// Something moved: look again.
    Progress,
    Store(StoreAnswer),
    Idle,
    End(RelayEnd),
}

struct Shell<'a> {
    context: Context<'a>,
    tracker: Tracker,
    idle: Duration,
    stats: RelayStats,
    client_bytes: Counter,
    backend_bytes: Counter,
    store_call: Option<StoreCall<'a>>,
    /// Slots to give back to the store once it is free.
    unreleased: (u32, u32),
    pump: Pump,
}

impl<'a> Shell<'a> {
    async fn run<C, B>(&mut self, client: &mut C, backend: &mut B) -> RelayEnd
    where
        C: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        let deadline = tokio::time::sleep(self.idle);
        tokio::pin!(deadline);
        loop {
            self.take_notices();
            self.start_store_call();
            if self.tracker.is_done() && self.tracker.to_client().is_empty() {
                // Boxed for the same reason as the end of `relay`: run once, its timers
                // and lingering would otherwise be part of every session's future.
                let shut_backend = self.tracker.backend_abandoned() && !self.pump.backend_shut();
                let linger = self.tracker.ends_with_client_sending();
                Box::pin(close(client, backend, shut_backend, linger)).await;
                return self.end_reason();
            }
            let step = std::future::poll_fn(|cx| {
                self.poll_step(
                    cx,
                    Pin::new(&mut *client),
                    Pin::new(&mut *backend),
                    deadline.as_mut(),
                )
            })
            .await;
            match step {
                Step::Progress => {
                    deadline
                        .as_mut()
                        .reset(tokio::time::Instant::now() + self.idle);
                }
                Step::Store(StoreAnswer::Reservation(reservation)) => {
                    self.tracker.on_reservation(reservation);
                }
                Step::Store(StoreAnswer::Released) => {}
                Step::Idle => return RelayEnd::Idle,
                Step::End(end) => return end,
            }
        }
    }

    fn end_reason(&self) -> RelayEnd {
        if self.tracker.closed_by_postern() {
            RelayEnd::Refused
        } else {
            RelayEnd::Closed
        }
    }

    /// Moves what can move now on both sides (in [`Pump`]'s order). Registers for
    /// wake-ups on everything that could not move, so `Pending` means nothing can
    /// until one of them does.
    fn poll_step<C, B>(
        &mut self,
        cx: &mut TaskContext<'_>,
        client: Pin<&mut C>,
        backend: Pin<&mut B>,
        deadline: Pin<&mut tokio::time::Sleep>,
    ) -> Poll<Step>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        let mut sides = PollSides {
            cx,
            client,
            backend,
        };
        let pumped = self.pump.step(&mut self.tracker, &mut sides);
        let (to_backend, to_client) = self.pump.take_moved();
        self.count(Side::Client, to_backend);
        self.count(Side::Backend, to_client);
        let progress = match pumped {
            Pumped::Progress => true,
            Pumped::Stalled => false,
            Pumped::ClientGone(None) => return Poll::Ready(Step::End(RelayEnd::Closed)),
            Pumped::ClientGone(Some(error)) => return Poll::Ready(Step::End(ended_by(error))),
        };
        let cx = sides.cx;

        if let Some(call) = self.store_call.as_mut()
            && let Poll::Ready(answer) = call.as_mut().poll(cx)
        {
            self.store_call = None;
            return Poll::Ready(Step::Store(answer));
        }
        if progress {
            return Poll::Ready(Step::Progress);
        }
        if deadline.poll(cx).is_ready() {
            return Poll::Ready(Step::Idle);
        }
        Poll::Pending
    }

    /// Starts the store call the tracker waits for, or a release, one at a time.
    fn start_store_call(&mut self) {
        if self.store_call.is_some() {
            return;
        }
        let Some(user) = self.context.user else {
            return;
        };
        let quota = &self.context.policy.quota;
        if let Some(claim) = self.tracker.wants_reservation() {
            let (messages, recipients) = match claim {
                Claim::Message => (1, 0),
                Claim::Recipient => (0, 1),
            };
            self.store_call = Some(Box::pin(async move {
                StoreAnswer::Reservation(reserve(quota, user, messages, recipients).await)
            }));
        } else if self.unreleased != (0, 0) {
            let (messages, recipients) = std::mem::take(&mut self.unreleased);
            self.store_call = Some(Box::pin(async move {
                release(quota, user, messages, recipients).await;
                StoreAnswer::Released
            }));
        }
    }

    /// Waits for a store call still in flight when the session ended: a slot it took
    /// belongs to the tracker, which gives it back when it finishes.
    async fn settle_store_call(&mut self) {
        if let Some(call) = self.store_call.take()
            && let StoreAnswer::Reservation(reservation) = call.await
            && self.tracker.wants_reservation_answer()
        {
            self.tracker.on_reservation(reservation);
        }
    }

    /// Gives back what the session still held, once it is over.
    async fn release_rest(&mut self) {
        let (messages, recipients) = std::mem::take(&mut self.unreleased);
        if let Some(user) = self.context.user
            && (messages, recipients) != (0, 0)
        {
            release(&self.context.policy.quota, user, messages, recipients).await;
        }
    }

    fn take_notices(&mut self) {
        while let Some(notice) = self.tracker.next_notice() {
            match notice {
                Notice::Event(event) => self.on_event(event),
                Notice::Release {
                    messages,
                    recipients,
                } => {
                    self.unreleased.0 += messages;
                    self.unreleased.1 += recipients;
                }
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        // Client-supplied text for logs: control characters escaped.
        let user = || {
            self.context
                .user
                .map(|u| tracing::field::display(u.escape_debug()))
        };
        match event {
            // Recipients count with their message: one the backend never took (the
            // session ended mid-DATA, the message was refused) was not sent to anyone.
            Event::RecipientAccepted => {}
            Event::MessageAccepted { recipients } => {
                self.stats.messages += 1;
                self.stats.recipients += u64::from(recipients);
                m::message(MessageResult::Accepted);
                m::recipients_accepted(u64::from(recipients));
            }
            Event::MessageRejected => m::message(MessageResult::RejectedByBackend),
            Event::MessageUnanswered { recipients } => {
                m::message(MessageResult::Unanswered);
                info!(
                    user = user(),
                    recipients,
                    "session ended before the backend answered a message's end: \
                     counted against the sender's limits"
                );
            }
            Event::LimitReached(limit) => {
                m::limit_rejection(limit.label());
                if matches!(limit, Limit::MessagesPerUser | Limit::StoreUnavailable) {
                    m::message(MessageResult::RejectedByLimit);
                }
                info!(
                    user = user(),
                    limit = limit.label(),
                    "sending limit reached"
                );
            }
            Event::BodyRefused { strict: true } => {
                m::message(MessageResult::RejectedStrictData);
                info!(
                    user = user(),
                    "message refused: bare CR or LF in DATA (--strict-data)"
                );
            }
            Event::BodyRefused { strict: false } => {
                m::message(MessageResult::RejectedSmuggling);
                info!(
                    user = user(),
                    "message refused: end-of-data lookalike in DATA (SMTP smuggling)"
                );
            }
        }
    }

    fn count(&mut self, side: Side, n: usize) {
        if n == 0 {
            return;
        }
        let n = n as u64;
        match side {
            Side::Client => {
                self.stats.client_to_backend += n;
                self.client_bytes.increment(n);
            }
            Side::Backend => {
                self.stats.backend_to_client += n;
                self.backend_bytes.increment(n);
            }
        }
    }
}

/// Where bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Backend,
}

/// The two sockets as [`Sides`]: `WouldBlock` is a `Pending` poll, which registered
/// the task for a wake-up.
struct PollSides<'a, 'c, C, B> {
    cx: &'a mut TaskContext<'c>,
    client: Pin<&'a mut C>,
    backend: Pin<&'a mut B>,
}

fn io_of<T>(poll: Poll<io::Result<T>>, done: impl FnOnce(T) -> usize) -> Io {
    match poll {
        Poll::Ready(Ok(value)) => Io::Done(done(value)),
        Poll::Ready(Err(error)) => Io::Failed(error),
        Poll::Pending => Io::WouldBlock,
    }
}

fn poll_read_into<R: AsyncRead + ?Sized>(
    reader: Pin<&mut R>,
    cx: &mut TaskContext<'_>,
    into: &mut [u8],
) -> Io {
    let mut buf = ReadBuf::new(into);
    let poll = reader.poll_read(cx, &mut buf);
    let n = buf.filled().len();
    io_of(poll, |()| n)
}

impl<C, B> Sides for PollSides<'_, '_, C, B>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    fn write_backend(&mut self, bytes: &[u8]) -> Io {
        io_of(self.backend.as_mut().poll_write(self.cx, bytes), |n| n)
    }

    fn flush_backend(&mut self) -> Io {
        io_of(self.backend.as_mut().poll_flush(self.cx), |()| 0)
    }

    fn shutdown_backend(&mut self) -> Io {
        io_of(self.backend.as_mut().poll_shutdown(self.cx), |()| 0)
    }

    fn write_client(&mut self, bytes: &[u8]) -> Io {
        io_of(self.client.as_mut().poll_write(self.cx, bytes), |n| n)
    }

    fn flush_client(&mut self) -> Io {
        io_of(self.client.as_mut().poll_flush(self.cx), |()| 0)
    }

    fn read_client(&mut self, into: &mut [u8]) -> Io {
        poll_read_into(self.client.as_mut(), self.cx, into)
    }

    fn read_backend(&mut self, into: &mut [u8]) -> Io {
        poll_read_into(self.backend.as_mut(), self.cx, into)
    }
}

/// Flushes and closes both sides once the session is over: the backend's write side
/// only if postern cut it off (otherwise the pump shut it down already, or the backend
/// ended the session), and lingering for a client that may still be sending.
async fn close<C, B>(client: &mut C, backend: &mut B, shut_backend: bool, then_linger: bool)
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    if shut_backend {
        // The client's last reply first: closing the backend may take CLOSE_TIMEOUT.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, client.flush()).await;
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, backend.shutdown()).await;
    }
    // A TLS client deserves a close_notify, not a truncated stream. A shutdown flushes
    // first, so the last reply and the close_notify leave in one write.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, client.shutdown()).await;
    if then_linger {
        linger(client).await;
    }
}

/// Reads and drops what the client still sends, until it closes, sends nothing for
/// [`LINGER`], [`LINGER_MAX`] passes or [`LINGER_BYTES`] were read.
async fn linger<C: AsyncRead + Unpin>(client: &mut C) {
    use tokio::io::AsyncReadExt as _;
    let end = tokio::time::Instant::now() + LINGER_MAX;
    // On the heap and only now: a buffer in the future would cost every session.
    let mut chunk = vec![0u8; LINGER_CHUNK];
    let mut left = LINGER_BYTES;
    while left > 0 {
        let idle = (tokio::time::Instant::now() + LINGER).min(end);
        match tokio::time::timeout_at(idle, client.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => return,
        }
    }
}

/// Takes a slot for `user`, with the configured failure mode applied.
async fn reserve(quota: &Quota, user: &str, messages: u32, recipients: u32) -> Reservation {
    match quota.reserve(user, messages, recipients).await {
        Ok(quota::Reservation::Granted) => Reservation::Granted { held: true },
        Ok(quota::Reservation::Refused(limit)) => Reservation::Refused(limit),
        Err(error) => {
            m::limits_store_error(m::label::store_operation::RESERVE);
            warn!(%error, failure = ?quota.failure(), "limits store unavailable");
            match quota.failure() {
                StoreFailure::Open => Reservation::Granted { held: false },
                StoreFailure::Closed => Reservation::Refused(Limit::StoreUnavailable),
            }
        }
    }
}

/// Gives slots back. A failed call is counted and logged, never retried: the slots
/// age out with their window.
async fn release(quota: &Quota, user: &str, messages: u32, recipients: u32) {
    if let Err(error) = quota.release(user, messages, recipients).await {
        m::limits_store_error(m::label::store_operation::RELEASE);
        warn!(%error, messages, recipients, "limits store release failed");
    }
}

/// Clients commonly drop TCP right after QUIT, without a TLS close_notify or before
/// ours arrives. The backend decides what was delivered, so an abrupt close loses
/// nothing that a clean one would keep.
fn ended_by(error: io::Error) -> RelayEnd {
    match error.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe => RelayEnd::Closed,
        _ => RelayEnd::Error(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::{QuotaConfig, Rate};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, DuplexStream, duplex};

    const WAIT: Duration = Duration::from_secs(5);

    fn context<'a>(
        user: Option<&'a str>,
        hostname: &'a Arc<str>,
        capabilities: &'a Capabilities,
        policy: &'a Policy,
    ) -> Context<'a> {
        Context {
            user,
            tls: true,
            hostname,
            capabilities,
            policy,
        }
    }

    /// Runs a relay with `policy` on duplex pipes; returns the client's and the
    /// backend's ends and the relay task.
    fn start(
        user: Option<&'static str>,
        policy: Policy,
        client_pending: &'static [u8],
    ) -> (
        DuplexStream,
        DuplexStream,
        tokio::task::JoinHandle<(RelayStats, RelayEnd)>,
    ) {
        let (client, client_peer) = duplex(64 * 1024);
        let (backend, backend_peer) = duplex(64 * 1024);
        let task = tokio::spawn(async move {
            let hostname: Arc<str> = "postern.test".into();
            let capabilities = Capabilities::from_ehlo_reply(&[
                "backend".into(),
                "PIPELINING".into(),
                "CHUNKING".into(),
            ]);
            relay(
                client,
                backend,
                client_pending,
                b"",
                WAIT,
                context(user, &hostname, &capabilities, &policy),
            )
            .await
        });
        (client_peer, backend_peer, task)
    }

    async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> String {
        let mut line = String::new();
        tokio::time::timeout(WAIT, reader.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        line
    }

    #[tokio::test]
    async fn pending_bytes_go_first_then_everything_verbatim_and_half_closes_propagate() {
        let (mut client_peer, mut backend_peer, task) =
            start(Some("tim"), Policy::observe_only(), b"MAIL FROM:<a>\r\n");
        client_peer
            .write_all(b"RCPT TO:<b>\r\nNOOP \xff\r\nNOOP")
            .await
            .unwrap();
        client_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend_peer.read_to_end(&mut got).await.unwrap();
        // The unfinished "NOOP" is not a command: it is dropped, not forwarded.
        assert_eq!(got, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nNOOP \xff\r\n");

        backend_peer
            .write_all(b"250 ok\r\n250 ok\r\n500 what\r\n")
            .await
            .unwrap();
        backend_peer.shutdown().await.unwrap();
        let mut back = Vec::new();
        client_peer.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"250 ok\r\n250 ok\r\n500 what\r\n");

        let (stats, end) = task.await.unwrap();
        assert!(matches!(end, RelayEnd::Closed), "{end:?}");
        // Counted as written: the unfinished "NOOP" never went.
        assert_eq!(stats.client_to_backend, 15 + 13 + 8);
        assert_eq!(stats.backend_to_client, 26);
        // A recipient of a message that was never sent is no recipient.
        assert_eq!((stats.messages, stats.recipients), (0, 0));
    }

    #[tokio::test]
    async fn a_half_close_cannot_slip_unchecked_commands_to_the_backend() {
        // Commands separated by bare LF, without a final CRLF, then EOF: a lenient
        // backend would run them all if the unfinished line were flushed at EOF.
        let (mut client_peer, mut backend_peer, task) =
            start(Some("tim"), Policy::observe_only(), b"");
        client_peer
            .write_all(b"MAIL FROM:<a>\nRCPT TO:<b>\nAUTH PLAIN x\nXCLIENT ADDR=127.0.0.1\nDATA\n")
            .await
            .unwrap();
        client_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"");
        drop(backend_peer);
        let _ = task.await.unwrap();
    }

    #[tokio::test]
    async fn xclient_and_xforward_from_the_client_never_reach_the_backend() {
        let (client_peer, mut backend_peer, task) = start(Some("tim"), Policy::observe_only(), b"");
        let mut client = BufReader::new(client_peer);
        client
            .get_mut()
            .write_all(b"XCLIENT ADDR=127.0.0.1 LOGIN=root\r\nXFORWARD ADDR=192.0.2.1\r\n")
            .await
            .unwrap();
        assert!(read_line(&mut client).await.starts_with("502 5.5.1"));
        assert!(read_line(&mut client).await.starts_with("502 5.5.1"));
        client.get_mut().shutdown().await.unwrap();
        let mut got = Vec::new();
        backend_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"");
        drop(backend_peer);
        let _ = task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn idle_relay_ends() {
        let (_client_peer, _backend_peer, task) = start(None, Policy::observe_only(), b"");
        let (_, end) = task.await.unwrap();
        assert!(matches!(end, RelayEnd::Idle), "{end:?}");
    }

    #[tokio::test]
    async fn a_second_auth_is_answered_in_order_and_ehlo_is_rewritten() {
        let (client_peer, backend_peer, task) = start(Some("tim"), Policy::observe_only(), b"");
        let mut client = BufReader::new(client_peer);
        let mut backend = BufReader::new(backend_peer);
        client
            .write_all(b"NOOP\r\nAUTH PLAIN AHRpbQBzZWNyZXQ=\r\nEHLO c\r\n")
            .await
            .unwrap();
        assert_eq!(read_line(&mut backend).await, "NOOP\r\n");
        assert_eq!(read_line(&mut backend).await, "EHLO c\r\n");
        backend
            .write_all(b"250 noop\r\n250-backend\r\n250-XCLIENT ADDR\r\n250 SIZE 99\r\n")
            .await
            .unwrap();
        for expected in [
            "250 noop\r\n",
            "503 5.5.1 Already authenticated\r\n",
            "250-postern.test\r\n",
            "250-SIZE 99\r\n",
            "250 AUTH PLAIN LOGIN CRAM-MD5\r\n",
        ] {
            assert_eq!(read_line(&mut client).await, expected);
        }
        drop(client);
        drop(backend);
        let (_, end) = task.await.unwrap();
        assert!(!matches!(end, RelayEnd::Idle), "{end:?}");
    }

    #[tokio::test]
    async fn strict_data_closes_the_backend_before_the_final_dot() {
        let policy = Policy {
            strict_data: true,
            hide_chunking: false,
            quota: Quota::unlimited(),
        };
        let (client_peer, backend_peer, task) = start(Some("tim"), policy, b"");
        let mut client = BufReader::new(client_peer);
        let mut backend = BufReader::new(backend_peer);
        client.write_all(b"DATA\r\n").await.unwrap();
        assert_eq!(read_line(&mut backend).await, "DATA\r\n");
        backend.write_all(b"354 go\r\n").await.unwrap();
        assert_eq!(read_line(&mut client).await, "354 go\r\n");
        client
            .write_all(b"Subject: a\r\n\r\nx\n.\nMAIL FROM:<evil>\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        tokio::time::timeout(WAIT, backend.read_to_end(&mut seen))
            .await
            .unwrap()
            .unwrap();
        assert!(b"Subject: a\r\n\r\nx".starts_with(&seen), "{seen:?}");
        client.write_all(b"more\r\n.\r\n").await.unwrap();
        assert_eq!(
            read_line(&mut client).await,
            "550 5.6.0 Bare CR or LF in message, closing connection\r\n"
        );
        let (_, end) = task.await.unwrap();
        assert!(matches!(end, RelayEnd::Refused), "{end:?}");
    }

    #[tokio::test]
    async fn the_message_limit_refuses_the_next_mail() {
        let policy = Policy {
            strict_data: false,
            hide_chunking: false,
            quota: Quota::new(&QuotaConfig {
                messages_per_user: Some(Rate {
                    count: 1,
                    window: Duration::from_secs(3600),
                }),
                recipients_per_user: None,
                recipients_per_message: None,
                store: crate::store::LimitsStore::memory(),
            }),
        };
        let (client_peer, backend_peer, task) = start(Some("tim"), policy, b"");
        let mut client = BufReader::new(client_peer);
        let mut backend = BufReader::new(backend_peer);
        client
            .write_all(b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n")
            .await
            .unwrap();
        for _ in 0..3 {
            read_line(&mut backend).await;
        }
        backend
            .write_all(b"250 ok\r\n250 ok\r\n354 go\r\n")
            .await
            .unwrap();
        for _ in 0..3 {
            read_line(&mut client).await;
        }
        client.write_all(b"hi\r\n.\r\n").await.unwrap();
        assert_eq!(read_line(&mut backend).await, "hi\r\n");
        assert_eq!(read_line(&mut backend).await, ".\r\n");
        backend.write_all(b"250 queued\r\n").await.unwrap();
        assert_eq!(read_line(&mut client).await, "250 queued\r\n");
        client
            .write_all(b"MAIL FROM:<a>\r\nQUIT\r\n")
            .await
            .unwrap();
        assert_eq!(
            read_line(&mut client).await,
            "451 4.7.1 Message limit for this user reached, try again later\r\n"
        );
        assert_eq!(read_line(&mut backend).await, "QUIT\r\n");
        backend.write_all(b"221 bye\r\n").await.unwrap();
        backend.shutdown().await.unwrap();
        assert_eq!(read_line(&mut client).await, "221 bye\r\n");
        client.shutdown().await.unwrap();
        let (stats, end) = task.await.unwrap();
        assert!(matches!(end, RelayEnd::Closed), "{end:?}");
        assert_eq!((stats.messages, stats.recipients), (1, 1));
    }
}
