//! The server side of a TLS connection (RFC 8446, RFC 5246) as a tokio stream, on
//! rustls' unbuffered API: [`accept`] runs the handshake and gives a [`ServerStream`],
//! which reads and writes like `tokio_rustls::server::TlsStream` where postern relies on
//! it, with buffers this module owns and sizes.
//!
//! Why not the buffered `ServerConnection`: it keeps a 4 KiB receive buffer for every
//! session, idle or not, reads at most 4 KiB from the socket at a time, and queues what
//! it sends in `Vec`s of its own. Here every buffer is released when it empties (the
//! receive buffer when the socket has nothing more to give), so an idle session holds
//! none; the socket is read up to `MAX_READ` at once, starting at `FIRST_READ`;
//! encrypted records are written from one buffer, several per system call. Unlike
//! tokio-rustls, a write only queues its records until a flush, a shutdown or a full
//! queue (`AsyncWrite` allows it, and every writer in postern flushes), so the last
//! reply and the close_notify after it leave in one system call.
//!
//! What rustls 0.23 still does itself: `ReadTraffic::next_record` hands out each
//! decrypted record from a `Vec` it filled (the record is decrypted in place in
//! `Incoming`, then copied there), and `WriteTraffic::encrypt` seals each record in a
//! `Vec` of its own before copying it into `Outgoing`. The decrypted record is copied
//! once more, into the caller's buffer, or into `Plain` for what that buffer cannot
//! take.
//!
//! Measured against tokio-rustls' server stream (release build, one thread running a
//! tokio-rustls client and the server, 1 MiB transfers read 16 KiB at a time, CPU time
//! spent inside the server stream's poll methods, mean of 3 runs):
//!
//! | MiB per CPU-second        | in memory (duplex) | loopback TCP |
//! |---------------------------|--------------------|--------------|
//! | TLS 1.3, client to server | 5759 vs 5519       | 4645 vs 2863 |
//! | TLS 1.3, server to client | 5520 vs 7026       | 3880 vs 4213 |
//! | TLS 1.2, client to server | 5691 vs 5439       | 4633 vs 2414 |
//! | TLS 1.2, server to client | 5460 vs 7100       | 3527 vs 4067 |
//!
//! Reading gains from reads of up to 64 KiB (a quarter of the system calls, no
//! compaction after every record); writing loses the copy out of rustls' `Vec`, and
//! ~7 % more for releasing `Outgoing` whenever it empties (what keeping it would
//! buy). postern's bulk direction is the client's (DATA); its replies are small. An
//! idle TLS 1.3 session after traffic holds 2457 bytes (1296 of `ServerStream`, 1161
//! of rustls state on the heap) against 6553 (1200 + 5353, of which the 4096-byte
//! receive buffer).
//!
//! Sans-IO where it can be: the three buffers and the rustls calls live in
//! `ServerStream::process`, which touches no socket; the `poll_*` methods only move
//! bytes between the buffers and the transport.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::rustls::server::UnbufferedServerConnection;
use tokio_rustls::rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, UnbufferedStatus,
};
use tokio_rustls::rustls::{self, CommonState, ProtocolVersion, ServerConfig};

use crate::copy::copy_pieces;

/// A TLS record header: content type, legacy version, length (RFC 8446 §5.1).
const RECORD_HEADER: usize = 5;

/// The largest plaintext a record carries (RFC 8446 §5.1, RFC 5246 §6.2.1).
const MAX_FRAGMENT: usize = 16_384;

/// The largest record rustls accepts: 2^14 + 2048 bytes of ciphertext (RFC 5246
/// §6.2.3; TLS 1.3 allows less) after the header. rustls refuses a longer one as soon
/// as its header arrives.
const MAX_RECORD: usize = RECORD_HEADER + MAX_FRAGMENT + 2_048;

/// The largest handshake message rustls accepts (64 KiB of body and its 4-byte header),
/// with the headers of the five records that can carry it. rustls joins such a message
/// in the receive buffer: it stays there, whole, until it is processed.
const MAX_HANDSHAKE: usize = 4 + 0xffff + 5 * RECORD_HEADER;

/// The most received bytes ever held: a handshake message being joined and the start
/// of the record after it. More without rustls taking any is a peer sending
/// something rustls would refuse anyway.
const MAX_INCOMING: usize = MAX_HANDSHAKE + MAX_RECORD;

/// The first read after the receive buffer was released: an SMTP command, a
/// ClientHello and most handshake messages fit, and it is read into the stack, so an
/// idle session polled for input allocates nothing.
const FIRST_READ: usize = 4096;

/// The largest read from the socket: reads that fill what was offered double up to
/// this (four full records).
const MAX_READ: usize = 64 * 1024;

/// Encrypted bytes queued before [`ServerStream::poll_write`] waits for the socket:
/// four full records. A peer that stops reading holds at most this much of postern's
/// memory in application data.
const WRITE_QUEUE: usize = 64 * 1024;

/// The most encrypted bytes ever queued: [`WRITE_QUEUE`] of application data and the
/// records sealing it, plus what rustls sends on its own (handshake flights, alerts, a
/// refused TLS 1.2 renegotiation). Beyond it the peer is sending requests and not
/// reading the answers, and the connection fails.
const MAX_OUTGOING: usize = 2 * WRITE_QUEUE;

/// Bytes a sealed record adds to its plaintext, at most: the header, an explicit nonce
/// (TLS 1.2 AES-GCM), the inner content type (TLS 1.3) and the 16-byte tag.
const RECORD_OVERHEAD: usize = RECORD_HEADER + 8 + 1 + 16;

/// Room for an encrypted `close_notify` record: a 2-byte alert, sealed.
const CLOSE_NOTIFY: usize = 2 + RECORD_OVERHEAD;

/// Runs the server handshake over `io` and returns the stream once it is complete and
/// every flight the client waits for has been written and flushed. The TLS 1.3 session
/// tickets `config` asks for stay queued, and go out with the first write or flush.
///
/// Fails with `InvalidData` when the handshake fails (after sending the alert rustls
/// chose, when the socket takes it), `UnexpectedEof` when the client leaves
/// before the end, and `InvalidInput` for a config that accepts 0-RTT data, which this
/// stream does not read (postern's never does). Bound it with a timeout.
pub async fn accept<IO>(io: IO, config: Arc<ServerConfig>) -> io::Result<ServerStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    if config.max_early_data_size != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "this TLS stream does not accept 0-RTT data: set max_early_data_size to 0",
        ));
    }
    let mut stream = ServerStream::new(io, config)?;
    poll_fn(|cx| stream.poll_handshake(cx)).await?;
    Ok(stream)
}

/// A server TLS stream after the handshake: `AsyncRead` gives the client's plaintext,
/// `AsyncWrite` encrypts towards it.
///
/// - A read returns `Ok(0)` once the client's `close_notify` arrived and everything
///   before it was read; an end of the transport without one is `UnexpectedEof`, and
///   one inside a record or a handshake message fails the stream with it, for every
///   later call.
/// - A write of `n` bytes returns `Ok(n)` as soon as they are encrypted and queued;
///   `poll_flush` writes out everything queued and flushes the transport; a write waits
///   while 64 KiB are queued and the socket takes none.
/// - `poll_shutdown` sends `close_notify`, writes out what is queued and shuts down the
///   transport's writing half. Reading still works (half-close).
/// - A TLS failure (a bad record, an alert from the client) is `InvalidData`, and every
///   later read (once the data decrypted before it is read) and write fails the same
///   way; the alert rustls sends with it goes out when the socket takes it.
/// - A client's TLS 1.3 KeyUpdate is answered before the next record written (RFC 8446
///   §4.6.3); a TLS 1.2 renegotiation is refused with a warning sent the same way.
pub struct ServerStream<IO> {
    io: IO,
    conn: UnbufferedServerConnection,
    incoming: Incoming,
    outgoing: Outgoing,
    plain: Plain,
    /// The client's `close_notify` arrived: reads end once [`Plain`] is drained.
    peer_closed: bool,
    /// The transport has no more input.
    eof: bool,
    /// `close_notify` is queued or sent: no more writes.
    closing: bool,
    /// Why the stream failed, for every later call.
    failed: Option<Failure>,
    /// During the handshake: rustls has taken every whole record received and waits
    /// for more.
    awaiting_input: bool,
}

/// What [`ServerStream::process`] came to.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// rustls needs more input (or nothing is left to process).
    Input,
    /// rustls can encrypt; the [`Op`] asked for is done.
    Traffic,
    /// The caller's read buffer is full.
    Full,
    /// Both sides sent `close_notify`.
    Closed,
}

/// What [`ServerStream::process`] does once rustls can encrypt.
enum Op<'a> {
    Nothing,
    Encrypt(&'a [u8]),
    CloseNotify,
}

// === impl ServerStream ===

impl<IO> ServerStream<IO> {
    /// Before the handshake: [`accept`] runs it.
    fn new(io: IO, config: Arc<ServerConfig>) -> io::Result<Self> {
        Ok(Self {
            io,
            conn: UnbufferedServerConnection::new(config).map_err(io::Error::other)?,
            incoming: Incoming::default(),
            outgoing: Outgoing::default(),
            plain: Plain::default(),
            peer_closed: false,
            eof: false,
            closing: false,
            failed: None,
            awaiting_input: false,
        })
    }

    /// The transport, for the peer's address and socket options.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// The negotiated parameters: `protocol_version()`, `negotiated_cipher_suite()`,
    /// `handshake_kind()`, `alpn_protocol()`.
    pub fn connection(&self) -> &CommonState {
        &self.conn
    }

    /// Heap bytes held by this stream's own buffers (rustls' state aside): zero when
    /// the session is idle.
    pub fn buffer_capacity(&self) -> usize {
        self.incoming.buf.capacity() + self.outgoing.buf.capacity() + self.plain.buf.capacity()
    }

    /// Runs rustls over the received bytes until it needs more, can encrypt (and then
    /// does `op`), or fills `into`. Decrypted data goes to `into` while it has room and
    /// to [`Plain`] after; what rustls sends goes to [`Outgoing`]. No IO.
    fn process(&mut self, mut into: Option<&mut ReadBuf<'_>>, op: Op<'_>) -> io::Result<Next> {
        if let Some(failure) = &self.failed {
            return Err(failure.to_io());
        }
        let mut op = Some(op);
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(self.incoming.unprocessed());
            let step: Result<Option<Next>, Failure> = match state {
                Err(error) => Err(Failure::Tls(error)),
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    let mut failed = None;
                    while let Some(record) = traffic.next_record() {
                        match record {
                            Ok(record) => {
                                discard += record.discard;
                                let mut payload = record.payload;
                                if let Some(into) = into.as_deref_mut() {
                                    let n = payload.len().min(into.remaining());
                                    copy_pieces(into.initialize_unfilled_to(n), &payload[..n]);
                                    into.advance(n);
                                    payload = &payload[n..];
                                }
                                self.plain.push(payload);
                            }
                            Err(error) => {
                                failed = Some(Failure::Tls(error));
                                break;
                            }
                        }
                    }
                    match (failed, &into) {
                        (Some(failure), _) => Err(failure),
                        (None, Some(into)) if into.remaining() == 0 => Ok(Some(Next::Full)),
                        (None, _) => Ok(None),
                    }
                }
                Ok(ConnectionState::EncodeTlsData(mut data)) => self
                    .outgoing
                    .append(0, |out| data.encode(out).map_err(Short::from))
                    .map(|_| None),
                // The encoded bytes are in `Outgoing`, which the poll methods write out.
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    Ok(None)
                }
                Ok(ConnectionState::BlockedHandshake) => Ok(Some(Next::Input)),
                Ok(ConnectionState::PeerClosed) => {
                    self.peer_closed = true;
                    Ok(None)
                }
                Ok(ConnectionState::Closed) => {
                    self.peer_closed = true;
                    Ok(Some(Next::Closed))
                }
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    let done = match op.take() {
                        Some(Op::Encrypt(bytes)) => {
                            let records = bytes.len().div_ceil(MAX_FRAGMENT);
                            let hint = bytes.len() + records * RECORD_OVERHEAD;
                            self.outgoing.append(hint, |out| {
                                traffic.encrypt(bytes, out).map_err(Short::from)
                            })
                        }
                        Some(Op::CloseNotify) => self.outgoing.append(CLOSE_NOTIFY, |out| {
                            traffic.queue_close_notify(out).map_err(Short::from)
                        }),
                        Some(Op::Nothing) | None => Ok(0),
                    };
                    done.map(|_| Some(Next::Traffic))
                }
                // Only with 0-RTT, which `accept` refuses to configure.
                Ok(ConnectionState::ReadEarlyData(_)) => Err(Failure::Io(
                    io::ErrorKind::InvalidData,
                    "0-RTT data on a stream that does not accept it",
                )),
                Ok(_) => Err(Failure::Io(
                    io::ErrorKind::Other,
                    "a TLS state this stream does not know",
                )),
            };
            self.incoming.discard(discard);
            if self.peer_closed {
                // "Any data received after a closure alert has been received MUST be
                // ignored" (RFC 8446 §6.1); rustls no longer reads it.
                self.incoming.release();
            }
            match step {
                Ok(Some(next)) => return Ok(next),
                Ok(None) => {}
                Err(failure) => return Err(self.fail(failure)),
            }
        }
    }

    /// Keeps `failure` for every later call, and queues the alert rustls chose for it:
    /// rustls hands over what it queued one record a call, before it looks at any
    /// input, and the alert can come second, behind the answer to a KeyUpdate the
    /// client asked for. It is only asked while a record is queued (`wants_write`): a
    /// call that reached the input again could fail once more, and rustls asserts
    /// that it sends one fatal alert.
    fn fail(&mut self, failure: Failure) -> io::Error {
        while self.conn.wants_write() {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(self.incoming.unprocessed());
            // Best effort: the connection is failing either way.
            let encoded = match state {
                Ok(ConnectionState::EncodeTlsData(mut data)) => self
                    .outgoing
                    .append(0, |out| data.encode(out).map_err(Short::from))
                    .is_ok(),
                _ => false,
            };
            self.incoming.discard(discard);
            if !encoded {
                break;
            }
        }
        // What was decrypted before the failure (a write can find it, behind data a
        // full read buffer left in `Plain`) is still read first.
        self.incoming.release();
        let error = failure.to_io();
        self.failed = Some(failure);
        error
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> ServerStream<IO> {
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if let Some(failure) = &self.failed {
                // Send the alert before giving up, if the client takes it.
                let error = failure.to_io();
                let _ = ready!(self.poll_write_out(cx));
                return Poll::Ready(Err(error));
            }
            // A flight goes out whole before the next one is read.
            ready!(self.poll_write_out(cx))?;
            if !self.awaiting_input {
                let next = match self.process(None, Op::Nothing) {
                    Ok(next) => next,
                    // Loop to send the alert.
                    Err(_) => continue,
                };
                if matches!(next, Next::Traffic | Next::Closed) && !self.conn.is_handshaking() {
                    if self.incoming.is_empty() {
                        self.incoming.release();
                    }
                    // What a TLS 1.3 server queues after the client's Finished is its
                    // session tickets, which the client does not wait for: they go out
                    // with the first write (the greeting or the reply to EHLO), one
                    // system call and one wake-up of the client fewer. A TLS 1.2
                    // server's last flight is awaited, and goes out now.
                    if self.conn.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
                        ready!(self.poll_write_out(cx))?;
                        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
                    }
                    return Poll::Ready(Ok(()));
                }
                // rustls took every whole record and waits for more. It is not called
                // again before more arrives: records it skips (rejected 0-RTT data) count
                // as taken only once a later record decrypts, so every call before that
                // would skip them again, out of a budget of 16 KiB.
                self.awaiting_input = true;
                continue;
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls handshake eof",
                )));
            }
            self.awaiting_input = false;
        }
    }

    /// Reads from the transport into [`Incoming`]: `Ok(0)` at its end. A released
    /// buffer is read into from the stack, so a poll that finds no input allocates
    /// nothing; a buffer found empty when the transport has nothing is released.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let n = if self.incoming.is_released() {
            let mut stack = [MaybeUninit::<u8>::uninit(); FIRST_READ];
            let mut read = ReadBuf::uninit(&mut stack);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut read))?;
            self.incoming.start_with(read.filled(), FIRST_READ);
            read.filled().len()
        } else {
            let Some(spare) = self.incoming.spare() else {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS peer sent more than a record or handshake message holds",
                )));
            };
            let offered = spare.len();
            let mut read = ReadBuf::new(spare);
            match Pin::new(&mut self.io).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {
                    if self.incoming.is_empty() {
                        self.incoming.release();
                    }
                    return Poll::Pending;
                }
            }
            let n = read.filled().len();
            self.incoming.filled(n, offered);
            n
        };
        if n == 0 {
            self.eof = true;
            if !self.incoming.is_empty() {
                // A record, or a handshake message rustls was joining, cut short.
                // rustls keeps offsets into the bytes of a message it joins, so it
                // must not be called again without them: the stream fails.
                let _ = self.fail(Failure::Io(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection in the middle of a TLS record",
                ));
            }
            self.incoming.release();
        }
        Poll::Ready(Ok(n))
    }

    /// Writes out everything queued; `Pending` with the rest queued when the transport
    /// takes no more.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outgoing.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, self.outgoing.queued()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing.sent(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for ServerStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // What a smaller buffer left of a record comes before anything newer.
        if !this.plain.is_empty() {
            this.plain.serve(buf);
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        loop {
            if this.peer_closed && this.failed.is_none() {
                return Poll::Ready(Ok(()));
            }
            match this.process(Some(buf), Op::Nothing) {
                Ok(Next::Full | Next::Closed) => return Poll::Ready(Ok(())),
                Ok(Next::Input | Next::Traffic) => {}
                // The data before the failure is read first; the next read fails.
                Err(_) if buf.filled().len() > before => return Poll::Ready(Ok(())),
                Err(error) => {
                    // The alert, if the socket takes it now (tokio-rustls does the same).
                    let _ = this.poll_write_out(cx);
                    return Poll::Ready(Err(error));
                }
            }
            if buf.filled().len() > before || this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                this.incoming.release();
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
            ready!(this.poll_fill(cx))?;
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ServerStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.closing {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after TLS close_notify",
            )));
        }
        // Room in the queue first: a client that does not read holds WRITE_QUEUE at most.
        while this.outgoing.len() >= WRITE_QUEUE {
            let n = ready!(Pin::new(&mut this.io).poll_write(cx, this.outgoing.queued()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            this.outgoing.sent(n);
        }
        let take = buf.len().min(WRITE_QUEUE - this.outgoing.len());
        let next = match this.process(None, Op::Encrypt(&buf[..take])) {
            Ok(next) => next,
            Err(error) => {
                // Failed on what was received: the alert, if the socket takes it now,
                // as a read does.
                let _ = this.poll_write_out(cx);
                return Poll::Ready(Err(error));
            }
        };
        match next {
            Next::Traffic => {}
            Next::Closed => {
                this.closing = true;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "write after TLS close_notify",
                )));
            }
            Next::Input | Next::Full => {
                return Poll::Ready(Err(io::Error::other("TLS handshake not complete")));
            }
        }
        // Queued until a flush, a shutdown or a full queue: a writer's replies and the
        // close_notify after its last one leave in one write.
        Poll::Ready(Ok(take))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing && this.failed.is_none() {
            this.closing = true;
            match this.process(None, Op::CloseNotify) {
                Ok(Next::Traffic | Next::Closed) => {}
                Ok(Next::Input | Next::Full) => {
                    return Poll::Ready(Err(io::Error::other("TLS handshake not complete")));
                }
                // Failed while reading what was received: the alert replaces close_notify.
                Err(_) => {}
            }
        }
        ready!(this.poll_write_out(cx))?;
        match ready!(Pin::new(&mut this.io).poll_shutdown(cx)) {
            // Not connected any more is as shut as it gets (tokio-rustls agrees).
            Err(error) if error.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            done => Poll::Ready(done),
        }
    }
}

/// Why the stream failed.
#[derive(Debug, Clone)]
enum Failure {
    /// rustls refused what the peer sent, or failed itself.
    Tls(rustls::Error),
    /// A bound of this module, or a rustls answer it cannot use.
    Io(io::ErrorKind, &'static str),
}

impl Failure {
    /// As `tokio_rustls` reports it: a rustls error is `InvalidData` wrapping it.
    fn to_io(&self) -> io::Error {
        match self {
            Self::Tls(error) => io::Error::new(io::ErrorKind::InvalidData, error.clone()),
            Self::Io(kind, why) => io::Error::new(*kind, *why),
        }
    }
}

/// Why a write into [`Outgoing`] did not fit.
enum Short {
    /// The whole output needs this many bytes.
    Needs(usize),
    Failed(Failure),
}

impl From<EncryptError> for Short {
    fn from(error: EncryptError) -> Self {
        match error {
            EncryptError::InsufficientSize(short) => Self::Needs(short.required_size),
            // TLS 1.2 keys used for 2^64 records, or more than AEAD limits allow.
            EncryptError::EncryptExhausted => {
                Self::Failed(Failure::Tls(rustls::Error::EncryptError))
            }
        }
    }
}

impl From<EncodeError> for Short {
    fn from(error: EncodeError) -> Self {
        match error {
            EncodeError::InsufficientSize(short) => Self::Needs(short.required_size),
            EncodeError::AlreadyEncoded => Self::Failed(Failure::Io(
                io::ErrorKind::Other,
                "rustls record encoded twice",
            )),
        }
    }
}

// === impl Incoming ===

/// Received TLS bytes rustls has not discarded yet: `buf[start..end]`. rustls decrypts
/// records and joins handshake messages in place, so the storage is initialised
/// memory: `buf.len()` is what was allocated and zeroed, not what is used.
#[derive(Debug)]
struct Incoming {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// What the next read offers, at least: doubles after a read that filled its
    /// offer, back to [`FIRST_READ`] when the buffer is released.
    read_size: usize,
}

impl Default for Incoming {
    fn default() -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            end: 0,
            read_size: FIRST_READ,
        }
    }
}

impl Incoming {
    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn unprocessed(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    fn discard(&mut self, n: usize) {
        debug_assert!(
            n <= self.end - self.start,
            "rustls discards what it was given"
        );
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Frees the storage and forgets what it held.
    fn release(&mut self) {
        *self = Self::default();
    }

    /// Whether there is no storage (nothing is held either).
    fn is_released(&self) -> bool {
        self.buf.is_empty()
    }

    /// Starts a released buffer with `bytes`, read elsewhere into an offer of
    /// `offered` bytes: with room for the rest of a record they begin, and for a
    /// larger next read if they filled the offer.
    fn start_with(&mut self, bytes: &[u8], offered: usize) {
        debug_assert!(self.is_released());
        if bytes.is_empty() {
            return;
        }
        let mut want = Self::shortfall(bytes);
        if bytes.len() == offered {
            self.read_size = (self.read_size * 2).min(MAX_READ);
            want = want.max(self.read_size);
        }
        let len = (bytes.len() + want).min(MAX_INCOMING);
        let mut buf = Vec::with_capacity(len);
        buf.extend_from_slice(bytes);
        buf.resize(len, 0);
        self.buf = buf;
        self.start = 0;
        self.end = bytes.len();
    }

    /// Bytes still missing from the record that `held` starts with, if its header
    /// arrived. Only a size hint: rustls checks the header.
    fn shortfall(held: &[u8]) -> usize {
        match held {
            [_, _, _, hi, lo, ..] => {
                let record = RECORD_HEADER + usize::from(u16::from_be_bytes([*hi, *lo]));
                record.min(MAX_RECORD).saturating_sub(held.len())
            }
            _ => 0,
        }
    }

    /// Room for the next read: at least `read_size`, or the rest of a record that
    /// arrived in part, within [`MAX_INCOMING`] held. `None` when that much is held.
    fn spare(&mut self) -> Option<&mut [u8]> {
        let held = self.end - self.start;
        let room = MAX_INCOMING.saturating_sub(held);
        if room == 0 {
            return None;
        }
        let want = self
            .read_size
            .max(Self::shortfall(&self.buf[self.start..self.end]))
            .min(room);
        if self.buf.len() - self.end < want {
            // Move the unprocessed bytes to the front rather than grow, when that is
            // enough: rustls only knows offsets from the start of what it is given.
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.start = 0;
                self.end = held;
            }
            if self.buf.len() - self.end < want {
                self.buf.reserve_exact(self.end + want - self.buf.len());
                self.buf.resize(self.end + want, 0);
            }
        }
        let end = self.buf.len().min(self.start + MAX_INCOMING);
        Some(&mut self.buf[self.end..end])
    }

    /// A read put `n` bytes into the `offered` that [`Incoming::spare`] gave.
    fn filled(&mut self, n: usize, offered: usize) {
        self.end += n;
        if n == offered {
            self.read_size = (self.read_size * 2).min(MAX_READ);
        }
    }
}

// === impl Outgoing ===

/// Encoded TLS bytes not yet written: `buf[start..end]`, with `buf.len()` the zeroed
/// storage (rustls encodes into a `&mut [u8]`). Released as soon as it is all written.
#[derive(Debug, Default)]
struct Outgoing {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Outgoing {
    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn queued(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn sent(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.is_empty() {
            *self = Self::default();
        }
    }

    /// Appends what `fill` writes into the spare storage, given room for `hint` bytes
    /// first, and again with the room `fill` says it needs.
    fn append(
        &mut self,
        hint: usize,
        mut fill: impl FnMut(&mut [u8]) -> Result<usize, Short>,
    ) -> Result<usize, Failure> {
        self.reserve(hint)?;
        let written = match fill(&mut self.buf[self.end..]) {
            Ok(n) => n,
            Err(Short::Needs(needed)) => {
                self.reserve(needed)?;
                match fill(&mut self.buf[self.end..]) {
                    Ok(n) => n,
                    Err(Short::Needs(_)) => {
                        return Err(Failure::Io(
                            io::ErrorKind::Other,
                            "rustls asked for more room than it said it needs",
                        ));
                    }
                    Err(Short::Failed(failure)) => return Err(failure),
                }
            }
            Err(Short::Failed(failure)) => return Err(failure),
        };
        self.end += written;
        Ok(written)
    }

    /// Spare storage for at least `n` more bytes, within [`MAX_OUTGOING`].
    fn reserve(&mut self, n: usize) -> Result<(), Failure> {
        if self.len() + n > MAX_OUTGOING {
            return Err(Failure::Io(
                io::ErrorKind::InvalidData,
                "TLS peer is not reading what it asks for",
            ));
        }
        if self.buf.len() - self.end >= n {
            return Ok(());
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < n {
            self.buf.reserve_exact(self.end + n - self.buf.len());
            self.buf.resize(self.end + n, 0);
        }
        Ok(())
    }
}

// === impl Plain ===

/// Decrypted bytes a read had no room for: `buf[start..]`, served before anything
/// else. Only filled from records already received, so never more than
/// [`MAX_INCOMING`] holds.
#[derive(Debug, Default)]
struct Plain {
    buf: Vec<u8>,
    start: usize,
}

impl Plain {
    fn is_empty(&self) -> bool {
        self.start == self.buf.len()
    }

    fn push(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(bytes.len());
        }
        self.buf.extend_from_slice(bytes);
    }

    fn serve(&mut self, into: &mut ReadBuf<'_>) {
        let n = into.remaining().min(self.buf.len() - self.start);
        into.put_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        if self.is_empty() {
            self.release();
        }
    }

    fn release(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::rustls::pki_types::ServerName;
    use tokio_rustls::rustls::{
        ClientConfig, HandshakeKind, RootCertStore, SupportedProtocolVersion, version,
    };
    use tokio_rustls::{TlsAcceptor, TlsConnector, client};

    use super::*;
    use crate::tls;

    /// Every await in these tests: a hang fails instead of stalling the run.
    async fn within<T>(future: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), future)
            .await
            .expect("timed out")
    }

    /// postern's own server config (one TLS 1.3 ticket, aws-lc-rs, its suite order) for
    /// a throw-away certificate, and the roots a client trusts it with.
    struct Setup {
        server: Arc<ServerConfig>,
        roots: RootCertStore,
        _dir: tempfile::TempDir,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(made.cert.der().clone()).unwrap();
        Setup {
            server: tls::load_server_config(&cert, &key).unwrap(),
            roots,
            _dir: dir,
        }
    }

    const TLS13: &SupportedProtocolVersion = &version::TLS13;
    const TLS12: &SupportedProtocolVersion = &version::TLS12;

    /// A client config for one version; sharing it between connections shares its
    /// session store, so the second one can resume.
    fn client_config(
        setup: &Setup,
        version: &'static SupportedProtocolVersion,
    ) -> Arc<ClientConfig> {
        Arc::new(
            ClientConfig::builder_with_provider(tls::provider())
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(setup.roots.clone())
                .with_no_client_auth(),
        )
    }

    async fn connect<IO>(config: Arc<ClientConfig>, io: IO) -> io::Result<client::TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = ServerName::try_from("localhost").unwrap();
        TlsConnector::from(config).connect(name, io).await
    }

    async fn pair_over<IO>(
        setup: &Setup,
        config: Arc<ClientConfig>,
        (client_io, server_io): (IO, IO),
    ) -> (client::TlsStream<IO>, ServerStream<IO>)
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let (client, server) = within(async {
            tokio::join!(
                connect(config, client_io),
                accept(server_io, setup.server.clone())
            )
        })
        .await;
        (client.unwrap(), server.unwrap())
    }

    async fn duplex_pair(
        setup: &Setup,
        config: Arc<ClientConfig>,
    ) -> (client::TlsStream<DuplexStream>, ServerStream<DuplexStream>) {
        pair_over(setup, config, duplex(64 * 1024)).await
    }

    async fn tcp() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) =
            within(async { tokio::join!(TcpStream::connect(addr), listener.accept()) }).await;
        (client.unwrap(), server.unwrap().0)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// Reads exactly `len` bytes from the server with reads of `chunk` bytes.
    async fn server_read<IO>(server: &mut ServerStream<IO>, len: usize, chunk: usize) -> Vec<u8>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let mut got = Vec::with_capacity(len);
        let mut buf = vec![0; chunk];
        while got.len() < len {
            let n = server.read(&mut buf).await.unwrap();
            assert_ne!(n, 0, "end of stream after {} of {len} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    /// `len` bytes each way: the client writes while the server reads in `chunk`s, then
    /// the server writes them back in one `write_all` while the client reads.
    async fn echo<IO>(
        client: &mut client::TlsStream<IO>,
        server: &mut ServerStream<IO>,
        len: usize,
        chunk: usize,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let sent = pattern(len);
        let (wrote, got) = within(async {
            tokio::join!(
                async {
                    client.write_all(&sent).await?;
                    client.flush().await
                },
                server_read(server, len, chunk)
            )
        })
        .await;
        wrote.unwrap();
        assert!(got == sent, "client to server, {len} bytes read by {chunk}");

        let mut back = vec![0; len];
        let (wrote, read) = within(async {
            tokio::join!(
                async {
                    server.write_all(&got).await?;
                    server.flush().await
                },
                client.read_exact(&mut back)
            )
        })
        .await;
        wrote.unwrap();
        read.unwrap();
        assert!(back == sent, "server to client, {len} bytes");
    }

    /// Polls a read once: `None` if it is pending.
    async fn read_now<IO>(
        server: &mut ServerStream<IO>,
        buf: &mut [u8],
    ) -> Option<io::Result<usize>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        poll_fn(|cx| {
            let mut read = ReadBuf::new(buf);
            Poll::Ready(match Pin::new(&mut *server).poll_read(cx, &mut read) {
                Poll::Ready(result) => Some(result.map(|()| read.filled().len())),
                Poll::Pending => None,
            })
        })
        .await
    }

    const SIZES: [usize; 6] = [0, 1, 16_383, 16_384, 16_385, 1 << 20];

    #[tokio::test]
    async fn handshakes_and_echoes_every_size_over_duplex() {
        let setup = setup();
        for (version, described) in [
            (TLS13, "TLSv1_3/TLS13_AES_256_GCM_SHA384"),
            (TLS12, "TLSv1_2/TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"),
        ] {
            for chunk in [1, 64 * 1024] {
                let (mut client, mut server) =
                    duplex_pair(&setup, client_config(&setup, version)).await;
                assert_eq!(tls::describe(server.connection()), described);
                for len in SIZES {
                    echo(&mut client, &mut server, len, chunk).await;
                }
            }
        }
    }

    #[tokio::test]
    async fn handshakes_and_echoes_over_tcp() {
        let setup = setup();
        for version in [TLS13, TLS12] {
            let (mut client, mut server) =
                pair_over(&setup, client_config(&setup, version), tcp().await).await;
            assert_eq!(
                server.get_ref().peer_addr().unwrap(),
                client.get_ref().0.local_addr().unwrap()
            );
            assert_eq!(
                server.connection().protocol_version(),
                client.get_ref().1.protocol_version()
            );
            for len in SIZES {
                echo(&mut client, &mut server, len, 16 * 1024).await;
            }
            echo(&mut client, &mut server, 100_000, 1).await;
        }
    }

    #[tokio::test]
    async fn small_writes_each_go_out_as_a_record() {
        let setup = setup();
        let (mut client, mut server) = duplex_pair(&setup, client_config(&setup, TLS13)).await;
        for byte in 0..=255u8 {
            assert_eq!(within(server.write(&[byte])).await.unwrap(), 1);
        }
        within(server.flush()).await.unwrap();
        let mut got = [0; 256];
        within(client.read_exact(&mut got)).await.unwrap();
        assert!(got.iter().enumerate().all(|(i, &b)| usize::from(b) == i));
        assert_eq!(within(server.write(&[])).await.unwrap(), 0);
    }

    /// Data the client sends right behind its Finished arrives while `accept` still
    /// runs; the first read gets it.
    #[tokio::test]
    async fn data_behind_the_handshake_reaches_the_first_read() {
        let setup = setup();
        for version in [TLS13, TLS12] {
            let (client_io, server_io) = duplex(64 * 1024);
            let config = client_config(&setup, version);
            let (client, server) = within(async {
                tokio::join!(
                    async {
                        let mut client = connect(config, client_io).await?;
                        client.write_all(b"EHLO client.example\r\n").await?;
                        client.flush().await?;
                        Ok::<_, io::Error>(client)
                    },
                    accept(server_io, setup.server.clone())
                )
            })
            .await;
            let (_client, mut server) = (client.unwrap(), server.unwrap());
            let got = within(server_read(&mut server, 21, 5)).await;
            assert_eq!(got, b"EHLO client.example\r\n");
        }
    }

    #[tokio::test]
    async fn close_notify_ends_reads_and_shutdown_sends_one() {
        let setup = setup();
        for version in [TLS13, TLS12] {
            let (mut client, mut server) =
                duplex_pair(&setup, client_config(&setup, version)).await;
            within(async {
                client.write_all(b"QUIT\r\n").await?;
                client.shutdown().await
            })
            .await
            .unwrap();
            // Everything before close_notify, then the end, read by the byte.
            assert_eq!(within(server_read(&mut server, 6, 1)).await, b"QUIT\r\n");
            let mut buf = [0; 8];
            assert_eq!(within(server.read(&mut buf)).await.unwrap(), 0);
            assert_eq!(within(server.read(&mut buf)).await.unwrap(), 0);

            // Half-closed: the server still answers, then closes its side.
            within(server.write_all(b"221 bye\r\n")).await.unwrap();
            within(server.shutdown()).await.unwrap();
            let mut reply = Vec::new();
            within(client.read_to_end(&mut reply)).await.unwrap();
            assert_eq!(reply, b"221 bye\r\n");
            let error = within(server.write(b"more")).await.unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
            assert_eq!(server.buffer_capacity(), 0);
        }
    }

    /// The client reads to the end after the server's shutdown, while the server's
    /// read side still works until the client closes too.
    #[tokio::test]
    async fn server_shutdown_first_leaves_reading_open() {
        let setup = setup();
        let (mut client, mut server) = duplex_pair(&setup, client_config(&setup, TLS13)).await;
        within(server.shutdown()).await.unwrap();
        let mut rest = Vec::new();
        within(client.read_to_end(&mut rest)).await.unwrap();
        assert!(rest.is_empty());
        within(async {
            client.write_all(b"late\r\n").await?;
            client.shutdown().await
        })
        .await
        .unwrap();
        assert_eq!(within(server_read(&mut server, 6, 64)).await, b"late\r\n");
        let mut buf = [0; 8];
        assert_eq!(within(server.read(&mut buf)).await.unwrap(), 0);
    }

    /// The transport ends without close_notify: the same error kind tokio-rustls gives
    /// (a truncation attack must not look like the end of the data).
    #[tokio::test]
    async fn eof_without_close_notify_is_unexpected_eof_like_tokio_rustls() {
        let setup = setup();
        // tokio-rustls' server stream, for reference.
        let (client_io, server_io) = duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(setup.server.clone());
        let (client, server) = within(async {
            tokio::join!(
                connect(client_config(&setup, TLS13), client_io),
                acceptor.accept(server_io)
            )
        })
        .await;
        let (mut client, mut reference) = (client.unwrap(), server.unwrap());
        within(client.get_mut().0.shutdown()).await.unwrap();
        let mut buf = [0; 8];
        let want = within(reference.read(&mut buf)).await.unwrap_err().kind();
        assert_eq!(want, io::ErrorKind::UnexpectedEof);

        for version in [TLS13, TLS12] {
            let (mut client, mut server) =
                duplex_pair(&setup, client_config(&setup, version)).await;
            within(client.write_all(b"DATA\r\n")).await.unwrap();
            within(client.flush()).await.unwrap();
            within(client.get_mut().0.shutdown()).await.unwrap();
            assert_eq!(within(server_read(&mut server, 6, 64)).await, b"DATA\r\n");
            assert_eq!(
                within(server.read(&mut buf)).await.unwrap_err().kind(),
                want
            );
            assert_eq!(
                within(server.read(&mut buf)).await.unwrap_err().kind(),
                want
            );

            let (mut client, mut server) =
                pair_over(&setup, client_config(&setup, version), tcp().await).await;
            // Out with the TLS 1.3 ticket, held for the first write.
            within(server.flush()).await.unwrap();
            within(client.get_mut().0.shutdown()).await.unwrap();
            assert_eq!(
                within(server.read(&mut buf)).await.unwrap_err().kind(),
                want
            );
            assert_eq!(server.buffer_capacity(), 0);
        }
    }

    /// A client KeyUpdate asking for one back (RFC 8446 §4.6.3): the server's answer
    /// goes before its next record, or the client could not read that record.
    #[tokio::test]
    async fn client_key_updates_are_answered() {
        let setup = setup();
        for transport in ["duplex", "tcp"] {
            let config = client_config(&setup, TLS13);
            let (mut client, mut server) = match transport {
                "duplex" => {
                    let (client, server) = duplex_pair(&setup, config).await;
                    (Box::new(client) as Box<dyn ClientSide>, server_box(server))
                }
                _ => {
                    let (client, server) = pair_over(&setup, config, tcp().await).await;
                    (Box::new(client) as Box<dyn ClientSide>, server_box(server))
                }
            };
            for round in 0..3 {
                client.refresh_keys();
                let len = 20_000 * (round + 1);
                let sent = pattern(len);
                let (wrote, got) = within(async {
                    tokio::join!(
                        async {
                            client.write_all(&sent).await?;
                            client.flush().await
                        },
                        async {
                            let mut got = vec![0; len];
                            server.read_exact(&mut got).await.map(|_| got)
                        }
                    )
                })
                .await;
                wrote.unwrap();
                let got = got.unwrap();
                assert!(got == sent, "{transport} round {round}");
                let mut back = vec![0; len];
                let (wrote, read) = within(async {
                    tokio::join!(
                        async {
                            server.write_all(&got).await?;
                            server.flush().await
                        },
                        client.read_exact(&mut back)
                    )
                })
                .await;
                wrote.unwrap();
                read.unwrap();
                assert!(back == sent, "{transport} round {round}");
            }
        }
    }

    /// A tokio-rustls client stream over either transport, boxed for one test loop.
    trait ClientSide: AsyncRead + AsyncWrite + Unpin {
        fn refresh_keys(&mut self);
    }

    impl<IO: AsyncRead + AsyncWrite + Unpin> ClientSide for client::TlsStream<IO> {
        fn refresh_keys(&mut self) {
            self.get_mut().1.refresh_traffic_keys().unwrap();
        }
    }

    type BoxedServer = ServerStream<Box<dyn Transport>>;

    trait Transport: AsyncRead + AsyncWrite + Unpin {}
    impl<T: AsyncRead + AsyncWrite + Unpin> Transport for T {}

    /// Moves an accepted stream onto a boxed transport (tests only: the fields are
    /// private to this module).
    fn server_box<IO: Transport + 'static>(server: ServerStream<IO>) -> BoxedServer {
        ServerStream {
            io: Box::new(server.io),
            conn: server.conn,
            incoming: server.incoming,
            outgoing: server.outgoing,
            plain: server.plain,
            peer_closed: server.peer_closed,
            eof: server.eof,
            closing: server.closing,
            failed: server.failed,
            awaiting_input: server.awaiting_input,
        }
    }

    /// The ticket postern's config asks for goes out with the server's first write
    /// (TLS 1.3) or before `accept` returns (TLS 1.2), and a second connection from the
    /// same client resumes with it.
    #[tokio::test]
    async fn sessions_resume_with_the_ticket() {
        let setup = setup();
        for version in [TLS13, TLS12] {
            let config = client_config(&setup, version);
            let (mut client, mut server) = duplex_pair(&setup, config.clone()).await;
            assert_eq!(
                client.get_ref().1.handshake_kind(),
                Some(HandshakeKind::Full)
            );
            // A TLS 1.3 ticket is held back until the server's first write, and arrives
            // with it, in the same read.
            let mut buf = [0; 16];
            let polled = poll_fn(|cx| {
                let mut read = ReadBuf::new(&mut buf);
                Poll::Ready(Pin::new(&mut client).poll_read(cx, &mut read).is_pending())
            });
            assert!(
                within(polled).await,
                "nothing to read before the server writes"
            );
            assert_eq!(client.get_ref().1.tls13_tickets_received(), 0);
            within(server.write_all(b"220 ready\r\n")).await.unwrap();
            within(server.flush()).await.unwrap();
            assert_eq!(within(client.read(&mut buf)).await.unwrap(), 11);
            if version == TLS13 {
                assert_eq!(client.get_ref().1.tls13_tickets_received(), 1);
            }
            within(client.shutdown()).await.unwrap();

            let (mut client, mut server) = duplex_pair(&setup, config).await;
            assert_eq!(
                client.get_ref().1.handshake_kind(),
                Some(HandshakeKind::Resumed),
                "{version:?}"
            );
            assert_eq!(
                server.connection().handshake_kind(),
                Some(HandshakeKind::Resumed)
            );
            echo(&mut client, &mut server, 10, 64).await;
        }
    }

    /// A client that never reads: writes wait once the transport and WRITE_QUEUE are
    /// full, and the queue stays bounded; everything arrives once the client reads.
    #[tokio::test]
    async fn a_client_that_does_not_read_makes_writes_wait() {
        let setup = setup();
        let pipe = 64 * 1024;
        let (mut client, mut server) = duplex_pair(&setup, client_config(&setup, TLS13)).await;
        let chunk = 10_000;
        // A write may take part of a chunk: the next one goes on from there.
        let stream = pattern((16 << 20) + 2 * chunk);
        let mut accepted = 0;
        let waited = within(poll_fn(|cx| {
            loop {
                let next = &stream[accepted..accepted + chunk];
                match Pin::new(&mut server).poll_write(cx, next) {
                    Poll::Ready(Ok(n)) => accepted += n,
                    Poll::Ready(Err(error)) => panic!("{error}"),
                    Poll::Pending => return Poll::Ready(true),
                }
                if accepted > 16 << 20 {
                    return Poll::Ready(false);
                }
            }
        }))
        .await;
        assert!(waited, "{accepted} bytes taken without waiting");
        assert!(accepted <= pipe + WRITE_QUEUE, "{accepted}");
        // WRITE_QUEUE of plaintext, sealed.
        let sealed = WRITE_QUEUE + WRITE_QUEUE.div_ceil(chunk) * RECORD_OVERHEAD;
        assert!(server.outgoing.len() <= sealed, "{}", server.outgoing.len());
        assert!(server.buffer_capacity() <= MAX_OUTGOING);
        // Still pending: nothing moved.
        let next = &stream[accepted..accepted + chunk];
        let again =
            poll_fn(|cx| Poll::Ready(Pin::new(&mut server).poll_write(cx, next).is_pending()));
        assert!(within(again).await);

        let mut got = vec![0; accepted];
        let (flushed, read) =
            within(async { tokio::join!(server.flush(), client.read_exact(&mut got)) }).await;
        flushed.unwrap();
        read.unwrap();
        assert!(got == stream[..accepted]);
        assert_eq!(server.buffer_capacity(), 0);
    }

    /// After traffic, a session waiting for its client holds no buffer at all.
    #[tokio::test]
    async fn an_idle_session_holds_no_buffer() {
        let setup = setup();
        for version in [TLS13, TLS12] {
            let (mut client, mut server) =
                duplex_pair(&setup, client_config(&setup, version)).await;
            echo(&mut client, &mut server, 300_000, 1000).await;
            let mut buf = [0; 4096];
            assert!(read_now(&mut server, &mut buf).await.is_none());
            assert_eq!(server.buffer_capacity(), 0);
            // A record arriving in part is held, then released once read.
            within(client.write_all(b"RSET\r\n")).await.unwrap();
            within(client.flush()).await.unwrap();
            assert_eq!(within(server.read(&mut buf[..2])).await.unwrap(), 2);
            assert!(
                server.buffer_capacity() > 0,
                "the rest of the record is kept"
            );
            assert_eq!(within(server.read(&mut buf)).await.unwrap(), 4);
            assert!(read_now(&mut server, &mut buf).await.is_none());
            assert_eq!(server.buffer_capacity(), 0);
        }
    }

    /// The handshake over a raw transport, for bytes no TLS client would send.
    async fn raw_accept(setup: &Setup, input: &[u8], then_close: bool) -> (io::Error, Vec<u8>) {
        let (mut peer, server_io) = duplex(256 * 1024);
        within(peer.write_all(input)).await.unwrap();
        if then_close {
            within(peer.shutdown()).await.unwrap();
        }
        let error = within(accept(server_io, setup.server.clone()))
            .await
            .err()
            .expect("handshake refused");
        let mut answer = Vec::new();
        within(peer.read_to_end(&mut answer)).await.unwrap();
        (error, answer)
    }

    /// A fatal alert record in plaintext: level 2, `description`.
    fn alert(description: u8) -> Vec<u8> {
        vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description]
    }

    #[tokio::test]
    async fn garbage_instead_of_a_client_hello_fails_with_an_alert() {
        const DECODE_ERROR: u8 = 50;
        const UNEXPECTED_MESSAGE: u8 = 10;
        let setup = setup();
        let too_long = [&[0x16, 0x03, 0x01, 0xff, 0xff][..], &[0; 100]].concat();
        for (name, input, kind, answer) in [
            (
                "an SMTP command",
                &b"EHLO client.example\r\n"[..],
                io::ErrorKind::InvalidData,
                alert(DECODE_ERROR),
            ),
            (
                "a record longer than TLS allows",
                &too_long[..],
                io::ErrorKind::InvalidData,
                alert(DECODE_ERROR),
            ),
            (
                "a handshake message that is not a ClientHello",
                &[0x16, 0x03, 0x01, 0x00, 0x04, 0x14, 0x00, 0x00, 0x00][..],
                io::ErrorKind::InvalidData,
                alert(UNEXPECTED_MESSAGE),
            ),
            ("nothing", &[][..], io::ErrorKind::UnexpectedEof, vec![]),
            (
                "half a record header",
                &[0x16, 0x03][..],
                io::ErrorKind::UnexpectedEof,
                vec![],
            ),
            (
                "a ClientHello cut short",
                &[
                    0x16, 0x03, 0x01, 0x01, 0x00, 0x01, 0x00, 0x00, 0xfc, 0x03, 0x03,
                ][..],
                io::ErrorKind::UnexpectedEof,
                vec![],
            ),
        ] {
            let (error, got) = raw_accept(&setup, input, true).await;
            assert_eq!(error.kind(), kind, "{name}: {error}");
            assert_eq!(got, answer, "{name}");
        }
    }

    /// A handshake message rustls joins from several records stays in the receive
    /// buffer until it is whole: the buffer grows to hold it, and no further.
    #[tokio::test]
    async fn a_large_handshake_message_is_held_within_bounds() {
        let setup = setup();
        let (mut peer, server_io) = duplex(256 * 1024);
        let mut server = ServerStream::new(server_io, setup.server.clone()).unwrap();
        // A ClientHello of 0xffff bytes, the most rustls takes, in records of 16 KiB,
        // all but its last byte.
        let mut message = vec![0x01, 0x00, 0xff, 0xff];
        message.resize(4 + 0xffff - 1, 0);
        for fragment in message.chunks(MAX_FRAGMENT) {
            let len = u16::try_from(fragment.len()).unwrap().to_be_bytes();
            within(peer.write_all(&[0x16, 0x03, 0x01, len[0], len[1]]))
                .await
                .unwrap();
            within(peer.write_all(fragment)).await.unwrap();
        }
        let pending = poll_fn(|cx| Poll::Ready(server.poll_handshake(cx).is_pending()));
        assert!(within(pending).await);
        let held = server.incoming.end - server.incoming.start;
        assert!(held >= message.len(), "{held}");
        assert!(
            server.buffer_capacity() <= MAX_INCOMING,
            "{}",
            server.buffer_capacity()
        );

        // The last byte completes a ClientHello rustls cannot parse.
        within(peer.write_all(&[0x16, 0x03, 0x01, 0x00, 0x01, 0x00]))
            .await
            .unwrap();
        let error = within(poll_fn(|cx| server.poll_handshake(cx)))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        assert_eq!(server.buffer_capacity(), 0);
    }

    /// Bytes that are no TLS record in the middle of a session: the read fails, the
    /// client gets the alert, and the stream stays failed.
    #[tokio::test]
    async fn garbage_mid_stream_fails_the_stream_and_alerts_the_client() {
        let setup = setup();
        for version in [TLS13, TLS12] {
            let (mut client, mut server) =
                duplex_pair(&setup, client_config(&setup, version)).await;
            echo(&mut client, &mut server, 100, 100).await;
            within(
                client
                    .get_mut()
                    .0
                    .write_all(b"MAIL FROM:<x@example.com>\r\n"),
            )
            .await
            .unwrap();
            let mut buf = [0; 64];
            let error = within(server.read(&mut buf)).await.unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
            let again = within(server.read(&mut buf)).await.unwrap_err();
            assert_eq!(again.kind(), io::ErrorKind::InvalidData);
            let write = within(server.write(b"250 OK\r\n")).await.unwrap_err();
            assert_eq!(write.kind(), io::ErrorKind::InvalidData);
            within(server.shutdown()).await.unwrap();
            let refused = within(client.read(&mut buf)).await.unwrap_err();
            assert!(refused.to_string().contains("DecodeError"), "{refused}");
        }
    }

    /// conn.rs spawns a task per connection: the stream and the handshake must be Send.
    #[test]
    fn the_stream_and_the_handshake_can_move_between_threads() {
        fn send<T: Send + Unpin>(_: &T) {}
        fn future_send<F: Future + Send>(_: &F) {}
        let setup = setup();
        let (_peer, io) = duplex(1024);
        let handshake = accept(io, setup.server.clone());
        future_send(&handshake);
        let (_peer, io) = duplex(1024);
        send(&ServerStream::new(io, setup.server.clone()).unwrap());
    }

    #[tokio::test]
    async fn a_config_with_0_rtt_is_refused() {
        let setup = setup();
        let mut config = (*setup.server).clone();
        config.max_early_data_size = 16_384;
        let (_peer, server_io) = duplex(1024);
        let error = within(accept(server_io, Arc::new(config)))
            .await
            .err()
            .unwrap();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn the_first_read_sizes_the_buffer_for_the_record_it_starts() {
        for (name, bytes, offered, want_len, want_read_size) in [
            (
                "a whole small record",
                vec![0x17, 3, 3, 0, 1, 9],
                FIRST_READ,
                6,
                FIRST_READ,
            ),
            (
                "a header announcing 16 KiB",
                vec![0x17, 3, 3, 0x40, 0x11],
                FIRST_READ,
                5 + 0x4011,
                FIRST_READ,
            ),
            (
                "a full first read",
                vec![0x17; FIRST_READ],
                FIRST_READ,
                FIRST_READ + 2 * FIRST_READ,
                2 * FIRST_READ,
            ),
            (
                "a length beyond any record",
                vec![0x17, 3, 3, 0xff, 0xff],
                FIRST_READ,
                MAX_RECORD,
                FIRST_READ,
            ),
            ("half a header", vec![0x16, 3], FIRST_READ, 2, FIRST_READ),
        ] {
            let mut incoming = Incoming::default();
            incoming.start_with(&bytes, offered);
            assert_eq!(incoming.buf.len(), want_len, "{name}");
            assert_eq!(incoming.read_size, want_read_size, "{name}");
            assert_eq!(incoming.unprocessed(), &bytes[..], "{name}");
        }
    }

    #[test]
    fn reads_grow_while_they_fill_and_stay_within_max_incoming() {
        let mut incoming = Incoming::default();
        incoming.start_with(&[0x17; FIRST_READ], FIRST_READ);
        // rustls takes everything: each read that fills its offer doubles the next
        // (the first offer is all the storage the stack read left room for).
        let mut sizes = Vec::new();
        for _ in 0..6 {
            incoming.discard(incoming.end - incoming.start);
            let offered = incoming.spare().unwrap().len();
            sizes.push(offered);
            incoming.filled(offered, offered);
        }
        assert_eq!(
            sizes,
            [
                3 * FIRST_READ,
                4 * FIRST_READ,
                8 * FIRST_READ,
                MAX_READ,
                MAX_READ,
                MAX_READ
            ]
        );
        // rustls takes nothing: reads go on up to MAX_INCOMING held, and no further.
        while let Some(spare) = incoming.spare() {
            let offered = spare.len();
            incoming.filled(offered, offered);
        }
        assert_eq!(incoming.end - incoming.start, MAX_INCOMING);
        assert!(incoming.buf.len() <= MAX_INCOMING);

        // Discarding from the front makes room by moving, not growing.
        incoming.discard(MAX_INCOMING - 10);
        let len = incoming.buf.len();
        assert!(incoming.spare().is_some());
        assert_eq!(incoming.start, 0);
        assert_eq!(incoming.buf.len(), len);
        incoming.discard(10);
        assert!(incoming.is_empty());
    }

    /// What a client that does not play by the rules sends: records no TLS library
    /// writes, flights rewritten on the way, early data, a peer that stops halfway.
    mod attacks {
        use std::io::Write as _;

        use tokio_rustls::rustls::crypto::aws_lc_rs::cipher_suite;
        use tokio_rustls::rustls::crypto::cipher::{
            AeadKey, Iv, MessageEncrypter, OutboundChunks, OutboundPlainMessage,
        };
        use tokio_rustls::rustls::{
            ClientConnection, ConnectionTrafficSecrets, ContentType, ProtocolVersion,
            SupportedCipherSuite,
        };

        use super::*;

        /// A client's traffic keys, taken after the handshake, to seal records as the
        /// client: what the holder of a session can send.
        struct Forger {
            tls13: bool,
            key: [u8; 32],
            iv: Iv,
            seq: u64,
        }

        impl Forger {
            /// A session whose client gave up its keys: the forger, the client's end of
            /// the transport, and the server. postern's suites for a client that offers
            /// them all are AES-256-GCM.
            async fn new(
                setup: &Setup,
                version: &'static SupportedProtocolVersion,
            ) -> (Self, DuplexStream, ServerStream<DuplexStream>) {
                let mut config = (*client_config(setup, version)).clone();
                config.enable_secret_extraction = true;
                let (client, server) = duplex_pair(setup, Arc::new(config)).await;
                let (io, conn) = client.into_inner();
                let secrets = conn.dangerous_extract_secrets().unwrap();
                let (seq, ConnectionTrafficSecrets::Aes256Gcm { key, iv }) = secrets.tx else {
                    panic!("not AES-256-GCM");
                };
                let forger = Self {
                    tls13: version == TLS13,
                    key: key.as_ref().try_into().unwrap(),
                    iv,
                    seq,
                };
                (forger, io, server)
            }

            /// A new encrypter for every record: aws-lc wants the nonces one sealing
            /// key sees to count up from the first, and a TLS 1.2 session's count
            /// starts at 1 (its Finished was 0).
            fn encrypter(&self) -> Box<dyn MessageEncrypter> {
                let key = AeadKey::from(self.key);
                if self.tls13 {
                    let suite = cipher_suite::TLS13_AES_256_GCM_SHA384.tls13().unwrap();
                    suite.aead_alg.encrypter(key, Iv::copy(self.iv.as_ref()))
                } else {
                    let SupportedCipherSuite::Tls12(suite) =
                        cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
                    else {
                        panic!("a TLS 1.2 suite");
                    };
                    // The salt, then the explicit part of the nonce.
                    let (salt, explicit) = self.iv.as_ref().split_at(4);
                    suite.aead_alg.encrypter(key, salt, explicit)
                }
            }

            fn record(&mut self, typ: ContentType, payload: &[u8]) -> Vec<u8> {
                let message = OutboundPlainMessage {
                    typ,
                    version: ProtocolVersion::TLSv1_2,
                    payload: OutboundChunks::Single(payload),
                };
                let sealed = self.encrypter().encrypt(message, self.seq).unwrap();
                self.seq += 1;
                sealed.encode()
            }

            fn data(&mut self, payload: &[u8]) -> Vec<u8> {
                self.record(ContentType::ApplicationData, payload)
            }
        }

        /// Runs a rustls client by hand over `io` until its handshake is done, passing
        /// each flight it sends through `rewrite` with the flight's number (0 is the
        /// ClientHello).
        async fn drive_client(
            conn: &mut ClientConnection,
            io: &mut DuplexStream,
            mut rewrite: impl FnMut(usize, Vec<u8>) -> Vec<u8>,
        ) -> io::Result<()> {
            let mut flight = 0;
            loop {
                if conn.wants_write() {
                    let out = client_queued(conn)?;
                    io.write_all(&rewrite(flight, out)).await?;
                    flight += 1;
                }
                if !conn.is_handshaking() {
                    return Ok(());
                }
                if client_receive(conn, io).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
        }

        /// The TLS bytes the client has queued.
        fn client_queued(conn: &mut ClientConnection) -> io::Result<Vec<u8>> {
            let mut out = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut out)?;
            }
            Ok(out)
        }

        /// One read from `io` into the client, processed: the bytes read, 0 at the end.
        async fn client_receive(
            conn: &mut ClientConnection,
            io: &mut DuplexStream,
        ) -> io::Result<usize> {
            let mut buf = vec![0; 64 * 1024];
            let n = io.read(&mut buf).await?;
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                conn.read_tls(&mut rest)?;
                conn.process_new_packets().map_err(io::Error::other)?;
            }
            Ok(n)
        }

        /// Sends what the client has queued (application data written through
        /// `conn.writer()`) over `io`.
        async fn client_send(conn: &mut ClientConnection, io: &mut DuplexStream) {
            let out = client_queued(conn).unwrap();
            within(io.write_all(&out)).await.unwrap();
        }

        fn new_client(config: Arc<ClientConfig>) -> ClientConnection {
            ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap()
        }

        /// Plaintext records (a first flight) framed again with at most `size` bytes of
        /// payload each.
        fn fragment(records: &[u8], size: usize) -> Vec<u8> {
            let mut out = Vec::new();
            let mut rest = records;
            while rest.len() >= RECORD_HEADER {
                let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
                let (record, after) = rest.split_at(RECORD_HEADER + len);
                for piece in record[RECORD_HEADER..].chunks(size) {
                    out.extend_from_slice(&record[..3]);
                    out.extend_from_slice(&u16::try_from(piece.len()).unwrap().to_be_bytes());
                    out.extend_from_slice(piece);
                }
                rest = after;
            }
            assert!(rest.is_empty());
            out
        }

        const CCS: [u8; 6] = [0x14, 0x03, 0x03, 0x00, 0x01, 0x01];
        const USER_CANCELED: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x01, 90];

        /// The handshake with a client whose flights are rewritten: what `accept` says.
        async fn accept_rewritten(
            setup: &Setup,
            version: &'static SupportedProtocolVersion,
            rewrite: impl FnMut(usize, Vec<u8>) -> Vec<u8>,
        ) -> io::Result<(ClientConnection, DuplexStream, ServerStream<DuplexStream>)> {
            let mut conn = new_client(client_config(setup, version));
            let (mut client_io, server_io) = duplex(256 * 1024);
            let (driven, accepted) = within(async {
                tokio::join!(
                    drive_client(&mut conn, &mut client_io, rewrite),
                    accept(server_io, setup.server.clone())
                )
            })
            .await;
            let server = accepted?;
            driven.unwrap();
            Ok((conn, client_io, server))
        }

        /// Handshake messages split into 1-byte records, and the records TLS allows
        /// between them (a plaintext warning before the ClientHello, the TLS 1.3
        /// middlebox ChangeCipherSpec, twice at most) or forbids (anything inside a
        /// message being joined).
        #[tokio::test]
        async fn fragmented_and_interleaved_first_flights() {
            let setup = setup();
            for version in [TLS13, TLS12] {
                let (mut conn, mut io, mut server) =
                    accept_rewritten(&setup, version, |flight, bytes| match flight {
                        0 => fragment(&bytes, 1),
                        _ => bytes,
                    })
                    .await
                    .unwrap();
                conn.writer().write_all(b"EHLO client.example\r\n").unwrap();
                client_send(&mut conn, &mut io).await;
                assert_eq!(
                    within(server_read(&mut server, 21, 7)).await,
                    b"EHLO client.example\r\n"
                );

                let warned = accept_rewritten(&setup, version, |flight, bytes| match flight {
                    0 => [&USER_CANCELED[..], &fragment(&bytes, 100)[..]].concat(),
                    _ => bytes,
                })
                .await;
                assert!(warned.is_ok(), "{version:?}: {:?}", warned.err());

                let interleaved = accept_rewritten(&setup, version, |flight, bytes| match flight {
                    0 => {
                        let pieces = fragment(&bytes, 50);
                        [&pieces[..55], &CCS[..], &pieces[55..]].concat()
                    }
                    _ => bytes,
                })
                .await;
                let error = interleaved
                    .err()
                    .expect("a record inside a handshake message");
                assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
            }

            // rustls' TLS 1.3 client sends one ChangeCipherSpec before its second
            // flight; one more is still allowed, a third is not.
            let second = accept_rewritten(&setup, TLS13, |flight, bytes| match flight {
                1 => [&CCS[..], &bytes[..]].concat(),
                _ => bytes,
            })
            .await;
            assert!(second.is_ok(), "{:?}", second.err());
            let third = accept_rewritten(&setup, TLS13, |flight, bytes| match flight {
                1 => [&CCS[..], &CCS[..], &bytes[..]].concat(),
                _ => bytes,
            })
            .await;
            let error = third.err().expect("three ChangeCipherSpec records");
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
            // A ChangeCipherSpec before any ClientHello.
            let early_ccs = accept_rewritten(&setup, TLS13, |flight, bytes| match flight {
                0 => [&CCS[..], &bytes[..]].concat(),
                _ => bytes,
            })
            .await;
            let error = early_ccs.err().expect("a ChangeCipherSpec first");
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        }

        /// A whole ClientHello, then the end of the transport: the server's flight goes
        /// out, and `accept` ends with `UnexpectedEof`.
        #[tokio::test]
        async fn eof_right_after_the_client_hello() {
            let setup = setup();
            for version in [TLS13, TLS12] {
                let mut conn = new_client(client_config(&setup, version));
                let mut hello = Vec::new();
                conn.write_tls(&mut hello).unwrap();
                let (error, answer) = raw_accept(&setup, &hello, true).await;
                assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{error}");
                assert_eq!(answer[..3], [0x16, 0x03, 0x03], "a ServerHello record");
            }
        }

        /// A record that arrives a byte at a time: every poll before its last byte is
        /// pending (never an empty read), and the last byte wakes the reader. A peer
        /// that leaves inside a record, or inside a record header, is `UnexpectedEof`,
        /// every time it is asked, with nothing held.
        #[tokio::test]
        async fn records_in_pieces_and_eof_inside_a_record() {
            let setup = setup();
            for version in [TLS13, TLS12] {
                for cut in [None, Some(3), Some(RECORD_HEADER), Some(RECORD_HEADER + 4)] {
                    let (mut client, mut server) =
                        duplex_pair(&setup, client_config(&setup, version)).await;
                    let record = {
                        let (_, conn) = client.get_mut();
                        conn.writer().write_all(b"EHLO client.example\r\n").unwrap();
                        let mut out = Vec::new();
                        conn.write_tls(&mut out).unwrap();
                        out
                    };
                    let mut buf = [0; 64];
                    let Some(cut) = cut else {
                        let (last, head) = record.split_last().unwrap();
                        for (i, byte) in head.iter().enumerate() {
                            within(client.get_mut().0.write_all(&[*byte]))
                                .await
                                .unwrap();
                            assert!(read_now(&mut server, &mut buf).await.is_none(), "{i}");
                        }
                        let (read, wrote) = within(async {
                            tokio::join!(server.read(&mut buf), async {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                client.get_mut().0.write_all(&[*last]).await
                            })
                        })
                        .await;
                        wrote.unwrap();
                        assert_eq!(read.unwrap(), 21);
                        assert_eq!(&buf[..21], b"EHLO client.example\r\n");
                        continue;
                    };
                    within(client.get_mut().0.write_all(&record[..cut]))
                        .await
                        .unwrap();
                    assert!(read_now(&mut server, &mut buf).await.is_none());
                    within(client.get_mut().0.shutdown()).await.unwrap();
                    for _ in 0..2 {
                        let error = within(server.read(&mut buf)).await.unwrap_err();
                        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{error}");
                    }
                    assert_eq!(server.buffer_capacity(), 0);
                }
            }
        }

        /// A little deterministic PRNG (xorshift64*), so a failure replays.
        fn next(state: &mut u64) -> u64 {
            *state ^= *state >> 12;
            *state ^= *state << 25;
            *state ^= *state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// Random sizes: mostly small, sometimes up to `max`.
        fn size(rng: &mut u64, max: u64) -> usize {
            let bound = if next(rng).is_multiple_of(2) {
                100
            } else {
                max
            };
            usize::try_from(1 + next(rng) % bound).unwrap()
        }

        /// A transport that gives at most `cap` bytes a read: records arrive in
        /// pieces, down to a byte at a time, without holding up the writer.
        struct Trickle {
            io: DuplexStream,
            cap: usize,
        }

        impl AsyncRead for Trickle {
            fn poll_read(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                let cap = self.cap.min(buf.remaining());
                let n = {
                    let mut limited = ReadBuf::new(&mut buf.initialize_unfilled()[..cap]);
                    ready!(Pin::new(&mut self.io).poll_read(cx, &mut limited))?;
                    limited.filled().len()
                };
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
        }

        impl AsyncWrite for Trickle {
            fn poll_write(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.io).poll_write(cx, buf)
            }

            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.io).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut self.io).poll_shutdown(cx)
            }
        }

        /// Plaintext comes out exactly as the client wrote it, whatever the record
        /// sizes (the client's writes), the transport's chunking (down to a byte a
        /// read) and the reader's buffer sizes: three random sessions for each
        /// chunking, in each version.
        #[tokio::test]
        async fn plaintext_arrives_exactly_for_random_records_transports_and_reads() {
            let setup = setup();
            let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
            for version in [TLS13, TLS12] {
                for (cap, most) in [
                    (1, 20_000),
                    (5, 40_000),
                    (300, 100_000),
                    (4096, 200_000),
                    (17_000, 300_000),
                    (1 << 20, 300_000),
                ]
                .repeat(3)
                {
                    let (client_io, server_io) = duplex(64 * 1024);
                    let server_io = Trickle { io: server_io, cap };
                    let config = client_config(&setup, version);
                    let (client, server) = within(async {
                        tokio::join!(
                            connect(config, client_io),
                            accept(server_io, setup.server.clone())
                        )
                    })
                    .await;
                    let (mut client, mut server) = (client.unwrap(), server.unwrap());
                    let total = size(&mut rng, most);
                    let sent: Vec<u8> = (0..total).map(|_| next(&mut rng) as u8).collect();
                    let mut writes = Vec::new();
                    let mut left = total;
                    while left > 0 {
                        let n = size(&mut rng, 40_000).min(left);
                        writes.push(n);
                        left -= n;
                    }
                    let reads: Vec<usize> = (0..97).map(|_| size(&mut rng, 70_000)).collect();
                    let (wrote, got) = within(async {
                        tokio::join!(
                            async {
                                let mut at = 0;
                                for n in &writes {
                                    client.write_all(&sent[at..at + n]).await?;
                                    client.flush().await?;
                                    at += n;
                                }
                                Ok::<_, io::Error>(())
                            },
                            async {
                                let mut got = Vec::with_capacity(total);
                                let mut buf = vec![0; 70_000];
                                let mut i = 0;
                                while got.len() < total {
                                    let want = reads[i % reads.len()];
                                    i += 1;
                                    let n = server.read(&mut buf[..want]).await.unwrap();
                                    assert_ne!(n, 0, "end after {} of {total}", got.len());
                                    got.extend_from_slice(&buf[..n]);
                                }
                                got
                            }
                        )
                    })
                    .await;
                    wrote.unwrap();
                    assert!(
                        got == sent,
                        "{version:?} cap {cap}: {total} bytes in {writes:?}"
                    );
                    let mut buf = [0; 16];
                    assert!(read_now(&mut server, &mut buf).await.is_none());
                }
            }
        }

        /// The client's close_notify ends the data; records and bytes after it are
        /// never read (RFC 8446 §6.1), and writing still works.
        #[tokio::test]
        async fn what_follows_close_notify_is_ignored() {
            let setup = setup();
            let (mut forger, mut io, mut server) = Forger::new(&setup, TLS13).await;
            let bytes = [
                forger.data(b"QUIT\r\n"),
                forger.record(ContentType::Alert, &[1, 0]),
                forger.data(b"MAIL FROM:<after@example.com>\r\n"),
                b"not even TLS".to_vec(),
            ]
            .concat();
            within(io.write_all(&bytes)).await.unwrap();
            assert_eq!(within(server_read(&mut server, 6, 1)).await, b"QUIT\r\n");
            let mut buf = [0; 64];
            assert_eq!(within(server.read(&mut buf)).await.unwrap(), 0);
            within(io.write_all(&forger.data(b"RSET\r\n")))
                .await
                .unwrap();
            within(io.write_all(&[0x17; 1000])).await.unwrap();
            assert_eq!(within(server.read(&mut buf)).await.unwrap(), 0);
            within(server.write_all(b"221 bye\r\n")).await.unwrap();
            within(server.shutdown()).await.unwrap();
            assert_eq!(server.buffer_capacity(), 0);
            let mut answer = Vec::new();
            within(io.read_to_end(&mut answer)).await.unwrap();
            assert!(
                answer.len() > 9 + RECORD_OVERHEAD,
                "the reply and close_notify"
            );
        }

        /// Empty application-data records are no data and no end: a read skips them.
        /// rustls refuses more than 32 in a row.
        #[tokio::test]
        async fn empty_records_are_skipped_and_a_flood_of_them_fails() {
            let setup = setup();
            let (mut forger, mut io, mut server) = Forger::new(&setup, TLS13).await;
            let mut bytes = Vec::new();
            for _ in 0..32 {
                bytes.extend(forger.data(b""));
            }
            bytes.extend(forger.data(b"x"));
            within(io.write_all(&bytes)).await.unwrap();
            let mut buf = [0; 16];
            assert_eq!(within(server.read(&mut buf)).await.unwrap(), 1);
            for _ in 0..8 {
                within(io.write_all(&forger.data(b""))).await.unwrap();
                assert!(read_now(&mut server, &mut buf).await.is_none());
            }
            let mut flood = Vec::new();
            for _ in 0..30 {
                flood.extend(forger.data(b""));
            }
            within(io.write_all(&flood)).await.unwrap();
            let error = within(server.read(&mut buf)).await.unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
            assert!(
                error.to_string().contains("TooManyEmptyFragments"),
                "{error}"
            );
        }

        /// Bytes a test seals with a session's keys.
        type Forge = fn(&mut Forger) -> Vec<u8>;

        /// Records TLS forbids after the handshake: one longer than 2^14 bytes of
        /// plaintext, another record inside a handshake message being joined, an
        /// unexpected handshake message, a TLS 1.3 warning alert. Each fails the read,
        /// and the stream stays failed.
        #[tokio::test]
        async fn forbidden_records_fail_the_stream() {
            let setup = setup();
            let cases: [(&str, Forge); 4] = [
                ("oversized", |f: &mut Forger| {
                    f.data(&[b'x'; MAX_FRAGMENT + 1])
                }),
                ("interleaved", |f: &mut Forger| {
                    [f.record(ContentType::Handshake, &[24, 0]), f.data(b"x")].concat()
                }),
                ("a client NewSessionTicket", |f: &mut Forger| {
                    f.record(ContentType::Handshake, &[4, 0, 0, 0])
                }),
                ("a warning alert", |f: &mut Forger| {
                    f.record(ContentType::Alert, &[1, 40])
                }),
            ];
            for (name, forge) in cases {
                let (mut forger, mut io, mut server) = Forger::new(&setup, TLS13).await;
                within(io.write_all(&forger.data(b"NOOP\r\n")))
                    .await
                    .unwrap();
                within(io.write_all(&forge(&mut forger))).await.unwrap();
                let mut buf = [0; 64];
                assert_eq!(within(server.read(&mut buf)).await.unwrap(), 6, "{name}");
                let error = within(server.read(&mut buf)).await.unwrap_err();
                assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{name}: {error}");
                let again = within(server.write(b"250 OK\r\n")).await.unwrap_err();
                assert_eq!(again.kind(), io::ErrorKind::InvalidData, "{name}");
                within(server.shutdown()).await.unwrap();
            }
        }

        /// KeyUpdate requests while the server only reads: rustls keeps one answer
        /// queued, not one per request; it goes out before the next reply. 32 requests
        /// with no data between them are refused.
        #[tokio::test]
        async fn key_update_requests_queue_one_answer() {
            let setup = setup();
            let (mut client, mut server) = duplex_pair(&setup, client_config(&setup, TLS13)).await;
            let ticket = server.outgoing.len();
            let rounds = 200;
            within(async {
                for _ in 0..rounds {
                    client.get_mut().1.refresh_traffic_keys().unwrap();
                    client.write_all(b"x").await?;
                }
                client.flush().await
            })
            .await
            .unwrap();
            assert_eq!(
                within(server_read(&mut server, rounds, 1000)).await,
                vec![b'x'; rounds]
            );
            assert!(
                server.outgoing.len() < ticket + 64,
                "{} queued, {ticket} of them the session ticket",
                server.outgoing.len()
            );
            within(async {
                server.write_all(b"250 OK\r\n").await?;
                server.flush().await
            })
            .await
            .unwrap();
            let mut reply = [0; 8];
            within(client.read_exact(&mut reply)).await.unwrap();
            assert_eq!(&reply, b"250 OK\r\n");

            within(async {
                for _ in 0..40 {
                    client.get_mut().1.refresh_traffic_keys().unwrap();
                }
                client.flush().await
            })
            .await
            .unwrap();
            let mut buf = [0; 16];
            let error = within(server.read(&mut buf)).await.unwrap_err();
            assert!(
                error.to_string().contains("TooManyKeyUpdateRequests"),
                "{error}"
            );
            assert!(server.buffer_capacity() < MAX_OUTGOING);
        }

        /// A TLS 1.3 client holding a ticket that allows 0-RTT data: from a server
        /// configured to issue one (postern's never is), for the same name.
        async fn client_with_early_data_ticket(setup: &Setup) -> ClientConnection {
            let mut generous = ServerConfig::builder_with_provider(tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(setup.server.cert_resolver.clone());
            generous.max_early_data_size = 16_384;
            generous.send_tls13_tickets = 1;
            let mut config = (*client_config(setup, TLS13)).clone();
            config.enable_early_data = true;
            let config = Arc::new(config);

            let (client_io, server_io) = duplex(64 * 1024);
            let (client, server) = within(async {
                tokio::join!(
                    connect(config.clone(), client_io),
                    TlsAcceptor::from(Arc::new(generous)).accept(server_io)
                )
            })
            .await;
            let (mut client, _server) = (client.unwrap(), server.unwrap());
            let mut buf = [0; 16];
            let polled = poll_fn(|cx| {
                let mut read = ReadBuf::new(&mut buf);
                Poll::Ready(Pin::new(&mut client).poll_read(cx, &mut read).is_pending())
            });
            assert!(within(polled).await);
            assert_eq!(client.get_ref().1.tls13_tickets_received(), 1);

            new_client(config)
        }

        /// 0-RTT data from a client holding a ticket that allows it (from another
        /// server for the same name: postern's own tickets never do, rustls allows
        /// 0-RTT only with stateful resumption) is skipped: the first read gets what the
        /// client sent after the handshake, never the early data.
        #[tokio::test]
        async fn early_data_is_skipped_never_read() {
            let setup = setup();
            let mut conn = client_with_early_data_ticket(&setup).await;
            conn.early_data()
                .expect("the ticket allows early data")
                .write_all(b"MAIL FROM:<early@example.com>\r\n")
                .unwrap();
            let (mut client_io, server_io) = duplex(64 * 1024);
            let (driven, accepted) = within(async {
                tokio::join!(
                    drive_client(&mut conn, &mut client_io, |_, bytes| bytes),
                    accept(server_io, setup.server.clone())
                )
            })
            .await;
            driven.unwrap();
            let mut server = accepted.unwrap();
            assert!(!conn.is_early_data_accepted());
            assert_eq!(
                server.connection().handshake_kind(),
                Some(HandshakeKind::Full)
            );
            conn.writer().write_all(b"NOOP\r\n").unwrap();
            client_send(&mut conn, &mut client_io).await;
            assert_eq!(within(server_read(&mut server, 6, 64)).await, b"NOOP\r\n");
            let mut buf = [0; 64];
            assert!(read_now(&mut server, &mut buf).await.is_none());
        }

        /// Rejected 0-RTT data is skipped by trial decryption, which rustls gives
        /// 16384 bytes of ciphertext. It spends them again on every call while the
        /// skipped records wait for the next one that decrypts, so the handshake calls
        /// rustls once per arrival of input, and the early data is skipped once per
        /// arrival: after the ClientHello and with each piece of the client's Finished.
        /// When the Finished comes in one read, up to 8 KiB is skipped, as tokio-rustls'
        /// stream does (9000 bytes fail both; smaller reads: see
        /// `early_data_of_6000_bytes_over_small_reads`). No client sends
        /// postern 0-RTT data with a ticket postern issued (they never allow it); only
        /// one holding another server's ticket for the same name.
        #[tokio::test]
        async fn early_data_of_6000_bytes_is_skipped_too() {
            let setup = setup();
            let mut conn = client_with_early_data_ticket(&setup).await;
            conn.early_data()
                .expect("the ticket allows early data")
                .write_all(&[b'e'; 6000])
                .unwrap();
            let (mut client_io, server_io) = duplex(64 * 1024);
            let (driven, accepted) = within(async {
                tokio::join!(
                    drive_client(&mut conn, &mut client_io, |_, bytes| bytes),
                    accept(server_io, setup.server.clone())
                )
            })
            .await;
            let mut server = accepted.unwrap();
            driven.unwrap();
            conn.writer().write_all(b"NOOP\r\n").unwrap();
            client_send(&mut conn, &mut client_io).await;
            assert_eq!(within(server_read(&mut server, 6, 64)).await, b"NOOP\r\n");
        }

        /// TLS 1.2 renegotiation (a ClientHello inside the session) while the server
        /// only reads: the first is refused with a warning, which waits in the queue for
        /// the next write; the second fails the stream.
        #[tokio::test]
        async fn tls12_renegotiation_is_refused_then_fails() {
            let setup = setup();
            let (mut forger, mut io, mut server) = Forger::new(&setup, TLS12).await;
            let mut first_flight = Vec::new();
            new_client(client_config(&setup, TLS12))
                .write_tls(&mut first_flight)
                .unwrap();
            let hello = first_flight[RECORD_HEADER..].to_vec();
            let bytes = [
                forger.record(ContentType::Handshake, &hello),
                forger.data(b"NOOP\r\n"),
            ]
            .concat();
            within(io.write_all(&bytes)).await.unwrap();
            assert_eq!(within(server_read(&mut server, 6, 64)).await, b"NOOP\r\n");
            let queued = server.outgoing.len();
            assert!(queued > 0 && queued < 64, "{queued}");
            within(io.write_all(&forger.record(ContentType::Handshake, &hello)))
                .await
                .unwrap();
            let mut buf = [0; 64];
            let error = within(server.read(&mut buf)).await.unwrap_err();
            assert!(
                error.to_string().contains("TooManyRenegotiationRequests"),
                "{error}"
            );
        }

        /// A handshake message begun (its first two bytes) when the transport ends:
        /// that read is `UnexpectedEof`, so is every later call, and nothing panics.
        /// rustls keeps offsets into the bytes of a message it joins; releasing them at
        /// the end of the transport had its next call slice an empty buffer at those
        /// offsets.
        #[tokio::test]
        async fn eof_inside_a_handshake_message_fails_without_panicking() {
            let setup = setup();
            for version in [TLS13, TLS12] {
                let (mut forger, mut io, mut server) = Forger::new(&setup, version).await;
                let bytes = [
                    forger.data(b"NOOP\r\n"),
                    forger.record(ContentType::Handshake, &[24, 0]),
                ]
                .concat();
                within(io.write_all(&bytes)).await.unwrap();
                within(io.shutdown()).await.unwrap();
                let mut buf = [0; 64];
                assert_eq!(within(server.read(&mut buf)).await.unwrap(), 6);
                for _ in 0..2 {
                    let error = within(server.read(&mut buf)).await.unwrap_err();
                    assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{error}");
                }
                let error = within(server.write(b"221 bye\r\n")).await.unwrap_err();
                assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{error}");
                within(server.shutdown()).await.unwrap();
                assert_eq!(server.buffer_capacity(), 0);
            }
        }

        /// A KeyUpdate request, then a record no key opens: rustls queues the KeyUpdate
        /// it owes ahead of its bad_record_mac alert, and both go out.
        #[tokio::test]
        async fn the_alert_goes_out_behind_a_key_update_answer() {
            let setup = setup();
            let (mut client, mut server) = duplex_pair(&setup, client_config(&setup, TLS13)).await;
            client.get_mut().1.refresh_traffic_keys().unwrap();
            within(client.flush()).await.unwrap();
            let mut forged = vec![0x17, 0x03, 0x03, 0x00, 0x20];
            forged.resize(RECORD_HEADER + 0x20, 0);
            within(client.get_mut().0.write_all(&forged)).await.unwrap();
            let mut buf = [0; 64];
            let error = within(server.read(&mut buf)).await.unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
            within(server.shutdown()).await.unwrap();
            let refused = within(client.read(&mut buf)).await.unwrap_err();
            assert!(refused.to_string().contains("BadRecordMac"), "{refused}");
        }

        /// A session whose client sends a record and then bytes that are no record,
        /// read into a 2-byte buffer: the read takes 2 bytes and leaves the rest of the
        /// record and the bad bytes unprocessed, for the write after it to find.
        async fn bad_bytes_behind_a_record(
            setup: &Setup,
            version: &'static SupportedProtocolVersion,
        ) -> (client::TlsStream<DuplexStream>, ServerStream<DuplexStream>) {
            let (mut client, mut server) = duplex_pair(setup, client_config(setup, version)).await;
            within(async {
                client.write_all(b"HELLO").await?;
                client.flush().await
            })
            .await
            .unwrap();
            within(
                client
                    .get_mut()
                    .0
                    .write_all(b"MAIL FROM:<x@example.com>\r\n"),
            )
            .await
            .unwrap();
            let mut buf = [0; 2];
            assert_eq!(within(server.read(&mut buf)).await.unwrap(), 2);
            assert_eq!(&buf, b"HE");
            let error = within(server.write(b"250 OK\r\n")).await.unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
            (client, server)
        }

        /// The write that comes upon a bad record fails and sends the alert, without
        /// waiting for a flush or a shutdown that a failing session may never make.
        #[tokio::test]
        async fn a_failure_a_write_finds_still_alerts_the_client() {
            let setup = setup();
            for version in [TLS13, TLS12] {
                let (mut client, server) = bad_bytes_behind_a_record(&setup, version).await;
                drop(server);
                let mut buf = [0; 64];
                let refused = within(client.read(&mut buf)).await.unwrap_err();
                assert!(
                    refused.to_string().contains("DecodeError"),
                    "{version:?}: {refused}"
                );
            }
        }

        /// What a read left of a record before a bad one is still read when a write
        /// came upon the bad record first, as when a read finds it; the read after
        /// that fails.
        #[tokio::test]
        async fn data_before_a_failure_a_write_finds_is_still_read() {
            let setup = setup();
            for version in [TLS13, TLS12] {
                let (_client, mut server) = bad_bytes_behind_a_record(&setup, version).await;
                assert_eq!(within(server_read(&mut server, 3, 64)).await, b"LLO");
                let mut buf = [0; 64];
                let error = within(server.read(&mut buf)).await.unwrap_err();
                assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
                assert_eq!(server.buffer_capacity(), 0);
            }
        }

        /// The handshake under hostile timing and framing: a HelloRetryRequest, reads
        /// and pipes of a few bytes, an end at every byte of the last flight, spurious
        /// `Pending` in every branch, and what rides with the client's Finished.
        mod handshake_timing {
            use tokio_rustls::rustls::NamedGroup;
            use tokio_rustls::rustls::client::{
                ClientSessionMemoryCache, ClientSessionStore, Resumption, Tls12ClientSessionValue,
                Tls13ClientSessionValue,
            };

            use super::*;

            /// A session store that always hints secp384r1: the client sends only a
            /// secp384r1 key share while listing X25519 (and the hybrid) first, so the
            /// server (which picks by the client's list) answers with a
            /// HelloRetryRequest.
            #[derive(Debug)]
            struct Secp384Hint(ClientSessionMemoryCache);

            impl ClientSessionStore for Secp384Hint {
                fn set_kx_hint(&self, _: ServerName<'static>, _: NamedGroup) {}
                fn kx_hint(&self, _: &ServerName<'_>) -> Option<NamedGroup> {
                    Some(NamedGroup::secp384r1)
                }
                fn set_tls12_session(&self, n: ServerName<'static>, v: Tls12ClientSessionValue) {
                    self.0.set_tls12_session(n, v)
                }
                fn tls12_session(&self, n: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
                    self.0.tls12_session(n)
                }
                fn remove_tls12_session(&self, n: &ServerName<'static>) {
                    self.0.remove_tls12_session(n)
                }
                fn insert_tls13_ticket(&self, n: ServerName<'static>, v: Tls13ClientSessionValue) {
                    self.0.insert_tls13_ticket(n, v)
                }
                fn take_tls13_ticket(
                    &self,
                    n: &ServerName<'static>,
                ) -> Option<Tls13ClientSessionValue> {
                    self.0.take_tls13_ticket(n)
                }
            }

            fn hrr_config(setup: &Setup) -> Arc<ClientConfig> {
                let mut config = (*client_config(setup, TLS13)).clone();
                config.resumption =
                    Resumption::store(Arc::new(Secp384Hint(ClientSessionMemoryCache::new(8))));
                Arc::new(config)
            }

            /// Handshake over a server transport that gives `cap` bytes a read and a
            /// duplex of `buffer` bytes (writes pend until the peer reads); then the
            /// server's first write carries the TLS 1.3 ticket.
            async fn session(
                setup: &Setup,
                config: Arc<ClientConfig>,
                buffer: usize,
                cap: usize,
            ) -> HandshakeKind {
                let (client_io, server_io) = duplex(buffer);
                let server_io = Trickle { io: server_io, cap };
                let (client, server) = within(async {
                    tokio::join!(
                        connect(config, client_io),
                        accept(server_io, setup.server.clone())
                    )
                })
                .await;
                let (mut client, mut server) = (client.unwrap(), server.unwrap());
                let kind = server.connection().handshake_kind().unwrap();
                assert_eq!(client.get_ref().1.handshake_kind(), Some(kind));
                let mut buf = [0; 11];
                let (wrote, read) = within(async {
                    tokio::join!(
                        async {
                            server.write_all(b"220 ready\r\n").await?;
                            server.flush().await
                        },
                        client.read_exact(&mut buf)
                    )
                })
                .await;
                wrote.unwrap();
                read.unwrap();
                assert_eq!(&buf, b"220 ready\r\n");
                if server.connection().protocol_version() == Some(ProtocolVersion::TLSv1_3) {
                    assert_eq!(client.get_ref().1.tls13_tickets_received(), 1);
                }
                let (shut, eof) =
                    within(async { tokio::join!(server.shutdown(), client.read(&mut buf)) }).await;
                shut.unwrap();
                assert_eq!(eof.unwrap(), 0);
                kind
            }

            const TRANSPORTS: [(usize, usize); 5] =
                [(16, 1), (17, 3), (64 * 1024, 1), (16, 64 * 1024), (100, 17)];

            #[tokio::test]
            async fn hello_retry_over_trickles_and_tiny_buffers() {
                let setup = setup();
                for (buffer, cap) in TRANSPORTS {
                    let config = hrr_config(&setup);
                    assert_eq!(
                        session(&setup, config.clone(), buffer, cap).await,
                        HandshakeKind::FullWithHelloRetryRequest,
                        "{buffer} {cap}"
                    );
                    assert_eq!(
                        session(&setup, config, buffer, cap).await,
                        HandshakeKind::Resumed,
                        "{buffer} {cap}"
                    );
                }
            }

            #[tokio::test]
            async fn full_and_resumed_over_trickles_and_tiny_buffers() {
                let setup = setup();
                for version in [TLS13, TLS12] {
                    for (buffer, cap) in TRANSPORTS {
                        let config = client_config(&setup, version);
                        assert_eq!(
                            session(&setup, config.clone(), buffer, cap).await,
                            HandshakeKind::Full
                        );
                        assert_eq!(
                            session(&setup, config, buffer, cap).await,
                            HandshakeKind::Resumed
                        );
                    }
                }
            }

            /// The client's flights, recorded from one handshake against `accept`.
            async fn flights(
                setup: &Setup,
                version: &'static SupportedProtocolVersion,
            ) -> Vec<Vec<u8>> {
                let mut recorded = Vec::new();
                accept_rewritten(setup, version, |_, bytes| {
                    recorded.push(bytes.clone());
                    bytes
                })
                .await
                .unwrap();
                recorded
            }

            /// Drives the client until flight `last`, of which only `cut` bytes go, and
            /// the transport's end.
            async fn drive_cut(
                conn: &mut ClientConnection,
                io: &mut DuplexStream,
                last: usize,
                cut: usize,
            ) {
                let mut flight = 0;
                loop {
                    if conn.wants_write() {
                        let out = client_queued(conn).unwrap();
                        if flight == last {
                            io.write_all(&out[..cut]).await.unwrap();
                            io.shutdown().await.unwrap();
                            return;
                        }
                        io.write_all(&out).await.unwrap();
                        flight += 1;
                    }
                    assert_ne!(client_receive(conn, io).await.unwrap(), 0);
                }
            }

            /// The client's last flight cut at every byte, then EOF (or the peer just
            /// stalling): `accept` fails with UnexpectedEof, never hangs nor succeeds.
            #[tokio::test]
            async fn eof_at_every_byte_of_the_last_flight() {
                let setup = setup();
                for version in [TLS13, TLS12] {
                    let recorded = flights(&setup, version).await;
                    let last_len = recorded.last().unwrap().len();
                    for cut in 0..last_len {
                        let mut conn = new_client(client_config(&setup, version));
                        let (mut client_io, server_io) = duplex(256 * 1024);
                        let server_io = Trickle {
                            io: server_io,
                            cap: 1,
                        };
                        let last = recorded.len() - 1;
                        let (driven, accepted) = within(async {
                            tokio::join!(
                                drive_cut(&mut conn, &mut client_io, last, cut),
                                accept(server_io, setup.server.clone())
                            )
                        })
                        .await;
                        let () = driven;
                        let error = accepted.err().unwrap_or_else(|| panic!("{cut}"));
                        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{cut} {error}");
                    }
                }
            }

            /// Runs the client's handshake; once it is done, `then` queues more in the
            /// same flight as its Finished.
            async fn drive_then(
                conn: &mut ClientConnection,
                io: &mut DuplexStream,
                then: impl FnOnce(&mut ClientConnection),
            ) {
                let mut then = Some(then);
                loop {
                    if !conn.is_handshaking()
                        && let Some(then) = then.take()
                    {
                        then(conn);
                    }
                    io.write_all(&client_queued(conn).unwrap()).await.unwrap();
                    if !conn.is_handshaking() {
                        return;
                    }
                    assert_ne!(client_receive(conn, io).await.unwrap(), 0);
                }
            }

            /// Reads what the server sent into `conn`, until the transport ends.
            async fn client_take(conn: &mut ClientConnection, io: &mut DuplexStream) -> Vec<u8> {
                let mut got = Vec::new();
                while within(client_receive(conn, io)).await.unwrap() > 0 {
                    let ready = conn
                        .process_new_packets()
                        .unwrap()
                        .plaintext_bytes_to_read();
                    let mut plain = vec![0; ready];
                    std::io::Read::read_exact(&mut conn.reader(), &mut plain).unwrap();
                    got.extend_from_slice(&plain);
                }
                got
            }

            /// Finished + KeyUpdate request + data, and Finished + close_notify, in one
            /// flight: the ticket goes before the KeyUpdate answer and the reply (the
            /// client reads all three); after close_notify it goes before the server's.
            #[tokio::test]
            async fn finished_with_key_update_or_close_notify_in_the_same_flight() {
                let setup = setup();
                for version in [TLS13, TLS12] {
                    for close in [false, true] {
                        let mut conn = new_client(client_config(&setup, version));
                        let (mut client_io, server_io) = duplex(256 * 1024);
                        let (_, accepted) = within(async {
                            tokio::join!(
                                drive_then(&mut conn, &mut client_io, |conn| {
                                    if close {
                                        conn.send_close_notify();
                                    } else {
                                        if version == TLS13 {
                                            conn.refresh_traffic_keys().unwrap();
                                        }
                                        conn.writer().write_all(b"EHLO x\r\n").unwrap();
                                    }
                                }),
                                accept(server_io, setup.server.clone())
                            )
                        })
                        .await;
                        let mut server = accepted.unwrap();
                        let mut buf = [0; 64];
                        if close {
                            assert_eq!(within(server.read(&mut buf)).await.unwrap(), 0);
                        } else {
                            assert_eq!(
                                within(server_read(&mut server, 8, 64)).await,
                                b"EHLO x\r\n"
                            );
                            within(server.write_all(b"250 OK\r\n")).await.unwrap();
                        }
                        within(server.shutdown()).await.unwrap();
                        drop(server);
                        let got = client_take(&mut conn, &mut client_io).await;
                        assert_eq!(got, if close { &b""[..] } else { &b"250 OK\r\n"[..] });
                        if version == TLS13 {
                            assert_eq!(conn.tls13_tickets_received(), 1, "{close}");
                        }
                    }
                }
            }

            /// A transport whose every other poll is a spurious Pending (it wakes the
            /// task at once): every branch of `poll_handshake` is re-entered.
            struct Jittery {
                io: Trickle,
                flip: bool,
            }

            impl Jittery {
                fn jitter(&mut self, cx: &mut Context<'_>) -> bool {
                    self.flip = !self.flip;
                    if self.flip {
                        cx.waker().wake_by_ref();
                    }
                    self.flip
                }
            }

            impl AsyncRead for Jittery {
                fn poll_read(
                    mut self: Pin<&mut Self>,
                    cx: &mut Context<'_>,
                    buf: &mut ReadBuf<'_>,
                ) -> Poll<io::Result<()>> {
                    if self.jitter(cx) {
                        return Poll::Pending;
                    }
                    Pin::new(&mut self.io).poll_read(cx, buf)
                }
            }

            impl AsyncWrite for Jittery {
                fn poll_write(
                    mut self: Pin<&mut Self>,
                    cx: &mut Context<'_>,
                    buf: &[u8],
                ) -> Poll<io::Result<usize>> {
                    if self.jitter(cx) {
                        return Poll::Pending;
                    }
                    let n = buf.len().min(self.io.cap);
                    Pin::new(&mut self.io).poll_write(cx, &buf[..n])
                }
                fn poll_flush(
                    mut self: Pin<&mut Self>,
                    cx: &mut Context<'_>,
                ) -> Poll<io::Result<()>> {
                    if self.jitter(cx) {
                        return Poll::Pending;
                    }
                    Pin::new(&mut self.io).poll_flush(cx)
                }
                fn poll_shutdown(
                    mut self: Pin<&mut Self>,
                    cx: &mut Context<'_>,
                ) -> Poll<io::Result<()>> {
                    Pin::new(&mut self.io).poll_shutdown(cx)
                }
            }

            /// Spurious Pendings everywhere (reads, writes of `cap` bytes, flushes):
            /// full, resumed and HelloRetryRequest handshakes complete, and rejected
            /// 0-RTT data of 6000 bytes is still skipped (re-entry does not call rustls
            /// again without new input).
            #[tokio::test]
            async fn spurious_pendings_in_every_branch() {
                let setup = setup();
                for cap in [1, 1460] {
                    for config in [
                        client_config(&setup, TLS13),
                        client_config(&setup, TLS12),
                        hrr_config(&setup),
                    ] {
                        for _ in 0..2 {
                            let (client_io, server_io) = duplex(64 * 1024);
                            let server_io = Jittery {
                                io: Trickle { io: server_io, cap },
                                flip: false,
                            };
                            let (client, server) = within(async {
                                tokio::join!(
                                    connect(config.clone(), client_io),
                                    accept(server_io, setup.server.clone())
                                )
                            })
                            .await;
                            let (mut client, mut server) = (client.unwrap(), server.unwrap());
                            let mut buf = [0; 5];
                            within(async {
                                server.write_all(b"220\r\n").await?;
                                server.flush().await
                            })
                            .await
                            .unwrap();
                            within(client.read_exact(&mut buf)).await.unwrap();
                        }
                    }
                }
                let mut conn = client_with_early_data_ticket(&setup).await;
                conn.early_data().unwrap().write_all(&[b'e'; 6000]).unwrap();
                let (mut client_io, server_io) = duplex(64 * 1024);
                let server_io = Jittery {
                    io: Trickle {
                        io: server_io,
                        cap: 1460,
                    },
                    flip: false,
                };
                let (driven, accepted) = within(async {
                    tokio::join!(
                        drive_client(&mut conn, &mut client_io, |_, bytes| bytes),
                        accept(server_io, setup.server.clone())
                    )
                })
                .await;
                driven.unwrap();
                accepted.unwrap();
            }

            /// The client's Finished and then garbage, or a fatal alert instead of
            /// the Finished: `accept` fails (no success with the garbage pending, no
            /// panic), and the alert goes out.
            #[tokio::test]
            async fn garbage_behind_finished_or_an_alert_instead() {
                let setup = setup();
                for version in [TLS13, TLS12] {
                    for instead in [false, true] {
                        let result =
                            accept_rewritten(&setup, version, |flight, bytes| match flight {
                                1 if instead => vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 40],
                                1 => [&bytes[..], &[0xff; 10][..]].concat(),
                                _ => bytes,
                            })
                            .await;
                        let error = result.err().expect("accept fails");
                        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
                    }
                }
            }

            /// The 6000 bytes of rejected 0-RTT data of `early_data_of_6000_bytes_is_skipped_too`,
            /// with the server's reads `cap` bytes at most; `reference` runs
            /// tokio-rustls' acceptor instead.
            async fn early_data_over(cap: usize, reference: bool) -> io::Result<()> {
                let setup = setup();
                let mut conn = client_with_early_data_ticket(&setup).await;
                conn.early_data().unwrap().write_all(&[b'e'; 6000]).unwrap();
                let (mut client_io, server_io) = duplex(64 * 1024);
                let server_io = Trickle { io: server_io, cap };
                let (_, accepted) = within(async {
                    tokio::join!(
                        drive_client(&mut conn, &mut client_io, |_, bytes| bytes),
                        async {
                            if reference {
                                TlsAcceptor::from(setup.server.clone())
                                    .accept(server_io)
                                    .await
                                    .map(drop)
                            } else {
                                accept(server_io, setup.server.clone()).await.map(drop)
                            }
                        }
                    )
                })
                .await;
                accepted
            }

            /// rustls skips the early data again on every arrival until the Finished
            /// decrypts, so a Finished that arrives in small pieces fails the handshake,
            /// here as with tokio-rustls; one in a TCP segment does not.
            #[tokio::test]
            async fn early_data_of_6000_bytes_over_small_reads() {
                for cap in [1, 16, 1460] {
                    let ours = early_data_over(cap, false).await;
                    let theirs = early_data_over(cap, true).await;
                    assert_eq!(ours.is_ok(), theirs.is_ok(), "cap {cap}");
                    assert_eq!(ours.is_ok(), cap >= 1460, "cap {cap}");
                }
            }
        }
    }
}
