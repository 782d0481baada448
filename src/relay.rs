//! The post-AUTH relay: bytes go verbatim both ways, counted as they flow, while the
//! sans-IO [`tracker::Tracker`] follows the SMTP state of the stream (RFC 5321, RFC
//! 2920 pipelining, RFC 3030 BDAT) so postern can answer what it must answer itself
//! (a second AUTH, STARTTLS, a sending limit, `--strict-data`), rewrite a post-login
//! EHLO reply, and count messages and recipients as the backend accepts them.
//!
//! One task, one loop: read whichever side has bytes into its 64 KiB buffer, let the
//! tracker split them into verbatim ranges and postern's own replies, write those with
//! `write_all`, and keep only what the tracker could not take yet (a partial command
//! line, the bytes after a DATA until the backend's 354). A half-close on one side is
//! passed on to the other once nothing of that side is held back.

pub mod tracker;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{info, warn};

use crate::config::ServeArgs;
use crate::metrics::{self as m, Direction, MessageResult, bytes_counter};
use crate::quota::{Quota, QuotaConfig, StoreFailure};
use crate::smtp::Capabilities;
use tracker::{Event, Limit, Lookup, Op, Output, Settings, Tracker, Usage, Wants};

/// A read buffer starts this small, so an idle session costs little memory (nginx's
/// mail proxy holds ~24 KiB per idle session; tokio's copy_bidirectional 128 KiB)...
const MIN_BUFFER: usize = 2 * 1024;
/// ...and doubles up to this while reads fill it, so bulk DATA moves in few syscalls
/// and TLS records are full.
const MAX_BUFFER: usize = 64 * 1024;

/// How long closing a side may take before the relay gives up on it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Bytes moved each way and mail the backend accepted, for the session log line.
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
    /// long, an unusable BDAT, a `--strict-data` refusal).
    Refused,
    Error(io::Error),
}

/// What the relay enforces, from the command line; shared by all sessions.
#[derive(Debug)]
pub struct Policy {
    /// `--strict-data`: refuse DATA bodies with a bare CR or LF (SMTP smuggling).
    pub strict_data: bool,
    pub quota: Quota,
}

impl Policy {
    pub fn from_args(args: &ServeArgs) -> Result<Policy, String> {
        let quota = Quota::new(&QuotaConfig {
            messages_per_user: args.max_messages_per_user,
            recipients_per_user: args.max_recipients_per_user,
            recipients_per_message: args.max_recipients_per_message,
            store: args.limits_store.clone(),
            failure: args.limits_store_failure,
            timeout: args.limits_store_timeout,
        })?;
        Ok(Policy {
            strict_data: args.strict_data,
            quota,
        })
    }

    /// Observe and count only: no limits, no strict DATA.
    pub fn observe_only() -> Policy {
        Policy {
            strict_data: false,
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
    /// The backend's capabilities on this connection (CHUNKING decides whether BDAT can
    /// be followed); a post-login EHLO replaces them with the live answer.
    pub capabilities: &'a Capabilities,
    pub policy: &'a Policy,
}

/// Relays `client_pending` (what the client pipelined behind its AUTH) and
/// `backend_pending` first, then everything else both ways until both sides are done,
/// nothing moves for `idle`, or postern closes the session.
pub async fn relay<C, B>(
    mut client: C,
    mut backend: B,
    client_pending: &[u8],
    backend_pending: &[u8],
    idle: Duration,
    context: Context<'_>,
) -> (RelayStats, RelayEnd)
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut relay = Relay::new(context, idle);
    let end = relay
        .run(&mut client, &mut backend, client_pending, backend_pending)
        .await;
    (relay.stats, end)
}

/// Where the bytes a tracker call looked at came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Backend,
}

/// Whether the relay goes on after performing a batch of ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

struct Relay<'a> {
    context: Context<'a>,
    tracker: Tracker,
    out: Output,
    idle: Duration,
    stats: RelayStats,
    client_bytes: Counter,
    backend_bytes: Counter,
    /// Accepted mail not yet added to the limits store.
    unrecorded_messages: u32,
    unrecorded_recipients: u32,
    /// postern closed the backend (`--strict-data`): nothing more is read from it.
    backend_closed: bool,
    client_dirty: bool,
    backend_dirty: bool,
}

impl<'a> Relay<'a> {
    fn new(context: Context<'a>, idle: Duration) -> Self {
        let policy = context.policy;
        let tracker = Tracker::new(Settings {
            hostname: context.hostname.clone(),
            authenticated: context.user.is_some(),
            tls: context.tls,
            chunking: context.capabilities.has("CHUNKING"),
            strict_data: policy.strict_data,
            limits: policy.quota.limits(),
        });
        Relay {
            context,
            tracker,
            out: Output::default(),
            idle,
            stats: RelayStats::default(),
            client_bytes: bytes_counter(Direction::ClientToBackend),
            backend_bytes: bytes_counter(Direction::BackendToClient),
            unrecorded_messages: 0,
            unrecorded_recipients: 0,
            backend_closed: false,
            client_dirty: false,
            backend_dirty: false,
        }
    }

    async fn run<C, B>(
        &mut self,
        client: &mut C,
        backend: &mut B,
        client_pending: &[u8],
        backend_pending: &[u8],
    ) -> RelayEnd
    where
        C: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        let mut from_client = Buffer::new(client_pending);
        let mut from_backend = Buffer::new(backend_pending);
        self.count(Side::Client, client_pending.len());
        self.count(Side::Backend, backend_pending.len());
        let mut client_eof = false;
        let mut backend_eof = false;
        let mut backend_shut = false;
        let mut client_shut = false;
        let deadline = tokio::time::sleep(self.idle);
        tokio::pin!(deadline);
        loop {
            match self
                .pump(client, backend, &mut from_client, &mut from_backend)
                .await
            {
                Ok(Flow::Continue) => {}
                Ok(Flow::Close) => return RelayEnd::Refused,
                Err(error) => return ended_by(error),
            }
            // A side's EOF is passed on once the tracker has taken what it can. What it
            // holds back is an unfinished line, which is never forwarded: unchecked, it
            // could carry commands separated by bare LF past every rule the tracker
            // applies (limits, AUTH/STARTTLS/XCLIENT interception, --strict-data), and a
            // line without its CRLF is no command anyway. Likewise an unfinished backend
            // reply (e.g. half an EHLO reply not yet rewritten) is not passed to the client.
            if client_eof && !backend_shut && self.tracker.wants() == Wants::Input {
                backend_shut = true;
                from_client.consume(from_client.data().len());
                if !self.backend_closed {
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, backend.shutdown()).await;
                }
            }
            if backend_eof && !client_shut {
                client_shut = true;
                from_backend.consume(from_backend.data().len());
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, client.shutdown()).await;
            }
            let read_client = !client_eof && self.tracker.wants() == Wants::Input;
            let read_backend = !backend_eof && !self.backend_closed;
            if backend_eof || ((client_eof || !read_client) && !read_backend) {
                // Nothing can move any more: the backend closed (after 221, or 421), so
                // nothing the client sends could be delivered, or the client waits on a
                // backend that is gone. Ending here also lets a drain finish without
                // waiting for clients that keep the socket open after QUIT.
                return RelayEnd::Closed;
            }
            from_client.make_room();
            from_backend.make_room();
            let read_client = read_client && from_client.has_room();
            let read_backend = read_backend && from_backend.has_room();
            tokio::select! {
                read = client.read(from_client.spare()), if read_client => match read {
                    Ok(0) => client_eof = true,
                    Ok(n) => {
                        from_client.filled(n);
                        self.count(Side::Client, n);
                        deadline.as_mut().reset(tokio::time::Instant::now() + self.idle);
                    }
                    // A TLS client that drops TCP without close_notify has still ended.
                    Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => client_eof = true,
                    Err(error) => return ended_by(error),
                },
                read = backend.read(from_backend.spare()), if read_backend => match read {
                    Ok(0) => backend_eof = true,
                    Ok(n) => {
                        from_backend.filled(n);
                        self.count(Side::Backend, n);
                        deadline.as_mut().reset(tokio::time::Instant::now() + self.idle);
                    }
                    Err(error) => return ended_by(error),
                },
                () = &mut deadline => return RelayEnd::Idle,
            }
        }
    }

    /// Feeds the tracker everything it can take now and performs what it asks for,
    /// until nothing moves; then flushes what was written.
    async fn pump<C, B>(
        &mut self,
        client: &mut C,
        backend: &mut B,
        from_client: &mut Buffer,
        from_backend: &mut Buffer,
    ) -> io::Result<Flow>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            let mut progress = false;
            if !from_backend.is_empty() && !self.backend_closed {
                let mut out = std::mem::take(&mut self.out);
                out.clear();
                let taken = self.tracker.backend_bytes(from_backend.data(), &mut out);
                progress |= taken > 0 || !out.ops.is_empty();
                let flow = self
                    .perform(&out, Side::Backend, from_backend.data(), client, backend)
                    .await;
                self.out = out;
                from_backend.consume(taken);
                if flow? == Flow::Close {
                    return Ok(Flow::Close);
                }
            }
            match self.tracker.wants() {
                Wants::Lookup => {
                    let lookup = self.lookup().await;
                    self.tracker.on_lookup(lookup);
                    progress = true;
                }
                Wants::Input if !from_client.is_empty() => {
                    let mut out = std::mem::take(&mut self.out);
                    out.clear();
                    let taken = self.tracker.client_bytes(from_client.data(), &mut out);
                    progress |=
                        taken > 0 || !out.ops.is_empty() || self.tracker.wants() == Wants::Lookup;
                    let flow = self
                        .perform(&out, Side::Client, from_client.data(), client, backend)
                        .await;
                    self.out = out;
                    from_client.consume(taken);
                    if flow? == Flow::Close {
                        return Ok(Flow::Close);
                    }
                }
                Wants::Input | Wants::Backend => {}
            }
            if !progress {
                break;
            }
        }
        if std::mem::take(&mut self.client_dirty) {
            self.flush(client).await?;
        }
        if std::mem::take(&mut self.backend_dirty) && !self.backend_closed {
            self.flush(backend).await?;
        }
        Ok(Flow::Continue)
    }

    /// Performs one call's ops in order. `input` is what the tracker was given.
    async fn perform<C, B>(
        &mut self,
        out: &Output,
        side: Side,
        input: &[u8],
        client: &mut C,
        backend: &mut B,
    ) -> io::Result<Flow>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        for op in &out.ops {
            match op {
                Op::Forward(range) => {
                    let bytes = input.get(range.clone()).unwrap_or_default();
                    match side {
                        Side::Client => {
                            self.write(backend, bytes).await?;
                            self.backend_dirty = true;
                        }
                        Side::Backend => {
                            self.write(client, bytes).await?;
                            self.client_dirty = true;
                        }
                    }
                }
                Op::Reply(range) => {
                    let bytes = out.replies.get(range.clone()).unwrap_or_default();
                    self.write(client, bytes).await?;
                    self.client_dirty = true;
                }
                Op::Event(event) => self.on_event(*event),
                Op::CloseBackend => {
                    // Ending the connection mid-DATA makes the backend drop the message.
                    self.backend_closed = true;
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, backend.shutdown()).await;
                }
                Op::Close => {
                    self.flush(client).await?;
                    // A TLS client deserves a close_notify, not a truncated stream.
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, client.shutdown()).await;
                    return Ok(Flow::Close);
                }
            }
        }
        self.record().await;
        Ok(Flow::Continue)
    }

    fn on_event(&mut self, event: Event) {
        // Client-supplied text for logs: control characters escaped.
        let user = || {
            self.context
                .user
                .map(|u| tracing::field::display(u.escape_debug()))
        };
        match event {
            Event::RecipientAccepted => {
                self.stats.recipients += 1;
                self.unrecorded_recipients += 1;
                m::recipients_accepted(1);
            }
            Event::MessageAccepted { .. } => {
                self.stats.messages += 1;
                self.unrecorded_messages += 1;
                m::message(MessageResult::Accepted);
            }
            Event::MessageRejected => m::message(MessageResult::RejectedByBackend),
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
            Event::BareLineEnding => {
                m::message(MessageResult::RejectedStrictData);
                info!(
                    user = user(),
                    "message refused: bare CR or LF in DATA (--strict-data)"
                );
            }
        }
    }

    /// The user's usage for the tracker, with the configured failure mode applied.
    async fn lookup(&mut self) -> Lookup {
        let quota = &self.context.policy.quota;
        let Some(user) = self.context.user else {
            return Lookup::Usage(Usage::default());
        };
        match quota.usage(user).await {
            Ok(usage) => Lookup::Usage(usage),
            Err(error) => {
                m::limits_store_error("usage");
                warn!(%error, failure = ?quota.failure(), "limits store unavailable");
                match quota.failure() {
                    StoreFailure::Open => Lookup::Usage(Usage::default()),
                    StoreFailure::Closed => Lookup::Unavailable,
                }
            }
        }
    }

    /// Adds accepted mail to the store, so the next MAIL of any session (on any replica
    /// sharing the store) sees it. A failed update is counted and logged, never retried:
    /// the mail was accepted either way.
    async fn record(&mut self) {
        let messages = std::mem::take(&mut self.unrecorded_messages);
        let recipients = std::mem::take(&mut self.unrecorded_recipients);
        let quota = &self.context.policy.quota;
        let Some(user) = self.context.user else {
            return;
        };
        if (messages == 0 && recipients == 0) || !quota.per_user() {
            return;
        }
        if let Err(error) = quota.record(user, messages, recipients).await {
            m::limits_store_error("record");
            warn!(%error, messages, recipients, "limits store update failed");
        }
    }

    fn count(&mut self, side: Side, n: usize) {
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

    /// Writes all of `bytes`. A peer that stops reading cannot hold the session longer
    /// than the idle timeout.
    async fn write<S: AsyncWrite + Unpin>(&self, stream: &mut S, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        tokio::time::timeout(self.idle, stream.write_all(bytes))
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
    }

    async fn flush<S: AsyncWrite + Unpin>(&self, stream: &mut S) -> io::Result<()> {
        tokio::time::timeout(self.idle, stream.flush())
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
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

/// One direction's read buffer: bytes read but not yet taken by the tracker sit at
/// `start..end` and are moved to the front before the next read. It grows while reads
/// fill it and shrinks back when it empties after a small read, so an idle session
/// holds [`MIN_BUFFER`] and a bulk one [`MAX_BUFFER`].
struct Buffer {
    bytes: Vec<u8>,
    start: usize,
    end: usize,
    /// The last read filled all the space it was given: traffic is heavy.
    last_read_filled: bool,
}

impl Buffer {
    fn new(initial: &[u8]) -> Self {
        let mut bytes = vec![0; MIN_BUFFER.max(initial.len())];
        bytes[..initial.len()].copy_from_slice(initial);
        Buffer {
            bytes,
            start: 0,
            end: initial.len(),
            last_read_filled: false,
        }
    }

    fn data(&self) -> &[u8] {
        &self.bytes[self.start..self.end]
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if !self.last_read_filled && self.bytes.len() > MIN_BUFFER {
                self.bytes = vec![0; MIN_BUFFER];
            }
        }
    }

    fn make_room(&mut self) {
        if self.start > 0 {
            self.bytes.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.bytes.len() && self.bytes.len() < MAX_BUFFER {
            let grown = (self.bytes.len() * 2).clamp(MIN_BUFFER, MAX_BUFFER);
            self.bytes.resize(grown, 0);
        }
    }

    fn has_room(&self) -> bool {
        self.end < self.bytes.len()
    }

    fn spare(&mut self) -> &mut [u8] {
        &mut self.bytes[self.end..]
    }

    fn filled(&mut self, n: usize) {
        self.last_read_filled = self.end + n >= self.bytes.len();
        if self.last_read_filled && self.bytes.len() < MAX_BUFFER {
            // Grow before the next read rather than after a compaction finds it full.
            let grown = (self.bytes.len() * 2).clamp(MIN_BUFFER, MAX_BUFFER);
            self.end = (self.end + n).min(self.bytes.len());
            self.bytes.resize(grown, 0);
            return;
        }
        self.end = (self.end + n).min(self.bytes.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::Rate;
    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream, duplex};

    const WAIT: Duration = Duration::from_secs(5);

    #[test]
    fn buffers_grow_under_bulk_and_shrink_back_when_traffic_is_light() {
        let mut buf = Buffer::new(b"");
        assert_eq!(buf.bytes.len(), MIN_BUFFER);
        // Reads that fill the buffer double it, up to the maximum.
        for _ in 0..10 {
            buf.make_room();
            let n = buf.spare().len();
            buf.filled(n);
            buf.consume(n);
        }
        assert_eq!(buf.bytes.len(), MAX_BUFFER);
        // A small read that empties the buffer gives the memory back.
        buf.make_room();
        buf.spare()[..6].copy_from_slice(b"QUIT\r\n");
        buf.filled(6);
        assert_eq!(buf.data(), b"QUIT\r\n");
        buf.consume(6);
        assert_eq!(buf.bytes.len(), MIN_BUFFER);
        // Pending bytes larger than the minimum are kept whole.
        let big = vec![b'x'; MIN_BUFFER * 3];
        assert_eq!(Buffer::new(&big).data(), &big[..]);
    }

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
            .write_all(b"RCPT TO:<b>\r\n\xff\r\nNOOP")
            .await
            .unwrap();
        client_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend_peer.read_to_end(&mut got).await.unwrap();
        // The unfinished "NOOP" is not a command: it is dropped, not forwarded.
        assert_eq!(got, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\n\xff\r\n");

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
        assert_eq!(stats.client_to_backend, 15 + 20);
        assert_eq!(stats.backend_to_client, 26);
        assert_eq!(stats.recipients, 1);
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
            quota: Quota::new(&QuotaConfig {
                messages_per_user: Some(Rate {
                    count: 1,
                    window: Duration::from_secs(3600),
                }),
                recipients_per_user: None,
                recipients_per_message: None,
                store: "memory".into(),
                failure: StoreFailure::Open,
                timeout: Duration::from_millis(100),
            })
            .unwrap(),
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
