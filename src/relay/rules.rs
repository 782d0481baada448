//! The SMTP rules of the relayed stream after AUTH (RFC 5321 §3.3, §4.1.1.4 and
//! §4.5.2, RFC 2920 pipelining, RFC 3030 BDAT). [`Rules`] reads slices and says what
//! to do with them ([`Op`]s); [`super::tracker::Tracker`] owns the buffers around it.
//!
//! The one guarantee: **the backend never acts on anything postern has not classified
//! the same way the backend will**, and where postern cannot know how the backend will
//! read something, it refuses it.
//! - Command lines are forwarded only once complete (CRLF) and classified with the
//!   same [`Verb::split`] as before login: a line with a control octet is answered
//!   `500 5.5.2` and never forwarded; a second `AUTH`, `STARTTLS`, `XCLIENT`/`XFORWARD`
//!   and a MAIL or RCPT over a limit are answered by postern.
//! - The backend's replies are matched in order to a queue of outstanding commands, so
//!   postern's own replies wait for the replies to what was pipelined before them (RFC
//!   2920 §3.1), and the transaction follows what the *backend* did: MAIL, RSET, EHLO
//!   and HELO start a new transaction only when answered 2xx (Postfix refuses a nested
//!   MAIL, `RSET x` and a bare `EHLO` and keeps the open transaction).
//! - DATA bodies run from the backend's 354 to CRLF.CRLF ([`BodyScanner`]); a body
//!   with an end-of-data lookalike (or, with `--strict-data`, any bare CR or LF) is
//!   cut before it: the backend connection is closed before any final dot, so it drops
//!   the message, and the client gets `550 5.6.0` at its own end of data.
//! - BDAT chunks are skipped by their announced size, which must fit the backend's
//!   SIZE (and 31 bits): Exim reads the size with `%u`, so `BDAT 4294967306` is a
//!   10-octet chunk to it.
//! - Sending limits are reserved in the store before a MAIL or RCPT is forwarded
//!   ([`Wants::Reservation`]) and given back ([`Op::Release`]) when the backend refuses
//!   it or the transaction is abandoned; see `Ledger`.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use memchr::memchr;

pub use crate::quota::{Limit, Limits, Usage};
use crate::smtp::command::{CommandError, Verb};
use crate::smtp::data::{BodyRule, BodyScanner, BodyStep};
use crate::smtp::ehlo::AUTH_LINE;
use crate::smtp::line::{MAX_RELAYED_LINE, find_crlf};
use crate::smtp::reply::reply_code;
use crate::smtp::{BackendReply, Canned, Capabilities, Reply, canned};

/// Most commands sent to the backend and not yet answered. A client that pipelines
/// more is not read until replies come back, which bounds the queue, and also the
/// replies the backend may have to buffer while the relay is busy writing to it.
pub const MAX_PENDING: usize = 100;

/// Most bytes of an EHLO or HELO reply held back to be rewritten; a longer one (no
/// real server sends one) is passed through verbatim.
pub const MAX_EHLO_REPLY: usize = 32 * 1024;

/// The largest BDAT chunk announced to a backend that advertises no SIZE: 2^31-1, so
/// that no backend's integer parsing can wrap it.
pub const MAX_CHUNK: u64 = (1 << 31) - 1;

/// What the rules need to know about the session.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Postern's name, first line of a rewritten EHLO reply.
    pub hostname: Arc<str>,
    /// An authenticated client (not an anonymous MX session): per-user limits apply and
    /// EHLO keeps offering AUTH, as it did before login.
    pub authenticated: bool,
    /// TLS is active on the client connection.
    pub tls: bool,
    /// The backend offers CHUNKING. Without it a backend would read a BDAT chunk as
    /// commands while postern skips it, so BDAT is refused instead.
    pub chunking: bool,
    /// The largest chunk a BDAT may announce: the backend's SIZE, at most [`MAX_CHUNK`].
    pub max_chunk: u64,
    /// `--hide-chunking`: CHUNKING is never offered, so BDAT is refused.
    pub hide_chunking: bool,
    /// `--strict-data`: refuse DATA bodies with any bare CR or LF.
    pub strict_data: bool,
    pub limits: Limits,
}

impl Settings {
    /// Takes CHUNKING and SIZE from the backend's capabilities.
    pub fn with_capabilities(mut self, capabilities: &Capabilities) -> Self {
        self.chunking = capabilities.has("CHUNKING") && !self.hide_chunking;
        self.max_chunk = chunk_limit(capabilities);
        self
    }
}

/// The largest BDAT chunk postern forwards to a backend with these capabilities.
pub fn chunk_limit(capabilities: &Capabilities) -> u64 {
    let size = capabilities
        .line("SIZE")
        .and_then(|line| line.split_ascii_whitespace().nth(1))
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|&n| n > 0);
    size.map_or(MAX_CHUNK, |n| n.min(MAX_CHUNK))
}

/// What a reservation asks the store for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// One message, for a MAIL (`--max-messages-per-user`).
    Message,
    /// One recipient, for a RCPT (`--max-recipients-per-user`).
    Recipient,
}

/// The answer to [`Wants::Reservation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Go on. `held` is false when the store failed open: nothing was taken, so
    /// nothing is given back later.
    Granted { held: bool },
    /// The limit is reached, or the store is down and fails closed
    /// ([`Limit::StoreUnavailable`]): the command gets `451`.
    Refused(Limit),
}

/// Something the driver counts or logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The backend accepted a RCPT.
    RecipientAccepted,
    /// The backend accepted a message (250 after end of data or BDAT LAST).
    MessageAccepted { recipients: u32 },
    /// The backend refused a message at its end.
    MessageRejected,
    /// The session ended after a message's end was forwarded and before the backend
    /// answered it. Its slots stay taken.
    MessageUnanswered { recipients: u32 },
    /// postern refused a MAIL or RCPT with 451.
    LimitReached(Limit),
    /// A DATA body was cut before something a lenient backend could read two ways:
    /// an end-of-data lookalike, or (`strict`) any bare CR or LF.
    BodyRefused { strict: bool },
}

/// One step for the driver, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Send `input[range]` verbatim to the other peer (client bytes to the backend,
    /// backend bytes to the client).
    Forward(Range<usize>),
    /// Send `Output::replies[range]` to the client: a reply postern makes itself.
    Reply(Range<usize>),
    Event(Event),
    /// Give slots back to the limits store.
    Release {
        messages: u32,
        recipients: u32,
    },
    /// Close the backend connection now, before it sees the end of the current message.
    CloseBackend,
    /// Flush what is queued for the client, then end the session.
    Close,
}

/// The ops of one call, and the bytes of postern's own replies they refer to. Reused
/// across calls: clear it, pass it in, perform its ops.
#[derive(Debug, Default)]
pub struct Output {
    pub ops: Vec<Op>,
    pub replies: Vec<u8>,
    /// How many bytes the `Forward` ops pass on.
    forwarded: usize,
}

impl Output {
    pub fn clear(&mut self) {
        self.ops.clear();
        self.replies.clear();
        self.forwarded = 0;
    }

    /// Forwards a range, merged into the previous op when contiguous so a bulk read
    /// becomes one write.
    fn forward(&mut self, range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        self.forwarded += range.len();
        if let Some(Op::Forward(last)) = self.ops.last_mut()
            && last.end == range.start
        {
            last.end = range.end;
            return;
        }
        self.ops.push(Op::Forward(range));
    }

    fn reply(&mut self, reply: &Reply) {
        let start = self.replies.len();
        reply.encode(&mut self.replies);
        self.ops.push(Op::Reply(start..self.replies.len()));
    }

    fn event(&mut self, event: Event) {
        self.ops.push(Op::Event(event));
    }

    fn release(&mut self, messages: u32, recipients: u32) {
        if messages > 0 || recipients > 0 {
            self.ops.push(Op::Release {
                messages,
                recipients,
            });
        }
    }
}

/// What the rules need before they can take more client bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wants {
    /// More client bytes (everything given was taken, or a partial line is held).
    Input,
    /// A backend reply first: to DATA, to a full pipeline, to a reset whose outcome
    /// decides a limit, or to the commands before a reply that closes the session.
    Backend,
    /// A slot in the limits store, through [`Rules::on_reservation`].
    Reservation(Claim),
}

/// A command sent to the backend, or a reply of postern's own waiting for its turn.
/// `txn` is the client-side transaction the command was sent in (see [`Ledger`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Ehlo {
        txn: u32,
    },
    Helo {
        txn: u32,
    },
    Rset {
        txn: u32,
    },
    Mail {
        txn: u32,
        reserved: bool,
    },
    Rcpt {
        txn: u32,
        reserved: bool,
    },
    Data,
    /// The end of a DATA body; `ends_at` is the backend stream's length once its final
    /// dot is in it.
    EndOfData {
        ends_at: u64,
    },
    /// `ends_at`: the backend stream's length once the chunk is in it.
    Bdat {
        last: bool,
        ends_at: u64,
    },
    Quit,
    Other,
    Local {
        reply: Canned,
        close: bool,
    },
}

impl Pending {
    /// A command that ends the backend's transaction if, and only if, it is answered 2xx.
    fn reset_txn(self) -> Option<u32> {
        match self {
            Pending::Ehlo { txn }
            | Pending::Helo { txn }
            | Pending::Rset { txn }
            | Pending::Mail { txn, .. } => Some(txn),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    Command,
    /// DATA was forwarded; what follows is a body only if the backend says 354.
    AwaitingData,
    Data(BodyScanner),
    Bdat {
        remaining: u64,
    },
    /// A body was refused (`strict`: for a bare CR or LF under `--strict-data`): drop
    /// client bytes up to the client's end of data.
    Discarding {
        scanner: BodyScanner,
        strict: bool,
    },
    /// QUIT was forwarded: nothing more is taken until the backend answers it (RFC 2920
    /// lets QUIT only end a pipelined group).
    Quitting,
    /// The backend answered QUIT 2xx: the session is over, and what the client sent
    /// after QUIT is never forwarded.
    Ended,
    /// No more client bytes are read (a closing reply is queued or was sent).
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReservationState {
    Idle,
    Wanted(Claim),
    Answered(Claim, Reservation),
}

/// Where the backend's reply stream stands.
#[derive(Debug, Clone, Copy, Default)]
struct ReplyScan {
    /// Inside a line whose head was read: `more` if it is a `DDD-` continuation line.
    in_line: Option<LineHead>,
    /// A line of the current reply was seen (the next line is not a reply's first).
    in_reply: bool,
}

#[derive(Debug, Clone, Copy)]
struct LineHead {
    code: u16,
    more: bool,
}

/// The sending-limit bookkeeping of one session.
///
/// Two views are kept. The *client-side transaction* (`txn`) is what the per-message
/// recipient limit counts: the recipients accepted since the backend last confirmed a
/// reset, plus those still unanswered. A refused MAIL, RSET, EHLO or HELO resets
/// nothing; an end of data always ends the transaction (RFC 5321 §4.1.1.4), so it
/// starts the next one at once. The *held slots* are what the store holds for the
/// backend's open transaction: given back when it is abandoned (a 2xx reset, a
/// refused message, the end of the session), kept when the message is accepted.
#[derive(Debug, Default)]
struct Ledger {
    txn: u32,
    txn_accepted: u32,
    txn_outstanding: u32,
    /// Recipients the backend accepted in its open transaction (for the log and the
    /// `MessageAccepted` event).
    message_recipients: u32,
    held_message: bool,
    held_recipients: u32,
    /// Reserved slots of commands not yet answered.
    unanswered_messages: u32,
    unanswered_recipients: u32,
}

impl Ledger {
    /// An end of data was forwarded: whatever the backend answers, the transaction ends
    /// there, and the recipients pipelined after it belong to the next one.
    fn end_of_message(&mut self) {
        self.txn = self.txn.wrapping_add(1);
        self.txn_accepted = 0;
        self.txn_outstanding = 0;
    }

    /// The backend answered a reset 2xx: its transaction is gone.
    fn reset(&mut self, txn: u32, later_recipients: u32, out: &mut Output) {
        if txn == self.txn {
            self.txn_accepted = 0;
            self.txn_outstanding = later_recipients;
        }
        self.abandon(out);
    }

    /// Gives back what the backend's abandoned transaction held.
    fn abandon(&mut self, out: &mut Output) {
        out.release(
            u32::from(std::mem::take(&mut self.held_message)),
            std::mem::take(&mut self.held_recipients),
        );
        self.message_recipients = 0;
    }

    /// Everything still held or reserved, for the end of the session.
    fn finish(&mut self, out: &mut Output) {
        let messages = u32::from(std::mem::take(&mut self.held_message))
            + std::mem::take(&mut self.unanswered_messages);
        let recipients = std::mem::take(&mut self.held_recipients)
            + std::mem::take(&mut self.unanswered_recipients);
        out.release(messages, recipients);
    }
}

/// The session's SMTP state as seen on the relayed stream.
#[derive(Debug)]
pub struct Rules {
    settings: Settings,
    client: ClientState,
    pending: VecDeque<Pending>,
    reply: ReplyScan,
    reservation: ReservationState,
    /// Code of the current reply (from its first line).
    reply_code: u16,
    /// Set when a reply lets the client go on (the answer to DATA, or a reset whose
    /// outcome a RCPT waits for), so the driver handles client bytes before the
    /// backend's next replies.
    client_resumed: bool,
    /// A RCPT waits for the backend's answer to a reset before the per-message limit
    /// can be decided.
    awaiting_reset: bool,
    /// A non-LAST BDAT was forwarded and its message is not finished: only BDAT, NOOP
    /// and QUIT may follow. Exim (bdat_getc) answers anything else with 503 and then
    /// refuses the next BDAT without reading its chunk, which it reads as commands; an
    /// RSET there leaves it reading the following commands as a DATA body. Each command
    /// is also answered before the next is taken ([`Rules::between_chunks_unanswered`]).
    bdat_open: bool,
    ledger: Ledger,
    /// Bytes forwarded to the backend by earlier calls: where in its stream a message
    /// ends, to tell at the end of a session whether the backend ever got that end.
    forwarded: u64,
    /// The current call's output's `forwarded` when the call began.
    call_base: usize,
}

impl Rules {
    pub fn new(settings: Settings) -> Self {
        Rules {
            settings,
            client: ClientState::Command,
            pending: VecDeque::with_capacity(16),
            reply: ReplyScan::default(),
            reservation: ReservationState::Idle,
            reply_code: 0,
            client_resumed: false,
            awaiting_reset: false,
            bdat_open: false,
            ledger: Ledger::default(),
            forwarded: 0,
            call_base: 0,
        }
    }

    /// What must happen before more client bytes can be taken.
    pub fn wants(&self) -> Wants {
        if let ReservationState::Wanted(claim) = self.reservation {
            return Wants::Reservation(claim);
        }
        match self.client {
            ClientState::AwaitingData
            | ClientState::Quitting
            | ClientState::Ended
            | ClientState::Closed => Wants::Backend,
            ClientState::Command
                if self.pending.len() >= MAX_PENDING
                    || self.awaiting_reset
                    || self.between_chunks_unanswered() =>
            {
                Wants::Backend
            }
            _ => Wants::Input,
        }
    }

    /// No more client bytes will ever be taken.
    pub fn is_closed(&self) -> bool {
        matches!(self.client, ClientState::Closed | ClientState::Ended)
    }

    /// Inside a chunked message, a command is unanswered: nothing more is taken until
    /// its reply, which must be 2xx. Exim without PIPELINING answers input pipelined
    /// behind a chunk with 554, and a NOOP or QUIT it does not take as one (`QUIT x`,
    /// the eleventh NOOP) with 503, both leaving it in the state `bdat_open` avoids.
    fn between_chunks_unanswered(&self) -> bool {
        self.bdat_open && !self.pending.is_empty()
    }

    /// The backend answered QUIT 2xx: nothing either side sends after it matters, so
    /// the session can close without waiting for the backend's end of stream.
    pub fn has_ended(&self) -> bool {
        self.client == ClientState::Ended
    }

    /// Inside a DATA body or BDAT chunk (an unfinished one at EOF loses the message).
    pub fn in_message(&self) -> bool {
        matches!(
            self.client,
            ClientState::Data(_) | ClientState::Bdat { .. } | ClientState::AwaitingData
        )
    }

    /// The answer to [`Wants::Reservation`].
    pub fn on_reservation(&mut self, reservation: Reservation) {
        match self.reservation {
            ReservationState::Wanted(claim) => {
                self.reservation = ReservationState::Answered(claim, reservation);
            }
            _ => debug_assert!(false, "a reservation answer nobody asked for"),
        }
    }

    /// The session is over: what is still held or reserved is given back, including a
    /// slot granted for a command that was never sent.
    /// Ends the session: what is still held or reserved is given back, but for the
    /// messages whose end the backend got (`delivered`: the bytes written to it).
    pub fn finish(&mut self, out: &mut Output, delivered: u64) {
        if let ReservationState::Answered(claim, Reservation::Granted { held: true }) =
            std::mem::replace(&mut self.reservation, ReservationState::Idle)
        {
            match claim {
                Claim::Message => self.ledger.unanswered_messages += 1,
                Claim::Recipient => self.ledger.unanswered_recipients += 1,
            }
        }
        self.keep_unanswered_messages(out, delivered);
        self.ledger.finish(out);
    }

    /// Keeps the slots of every message whose end was forwarded but never answered:
    /// Postfix and OpenSMTPD deliver a message whose client is gone once they have its
    /// end, so giving its slots back would let a client that resets right after the
    /// final dot send without limit. Exim drops such a message: counting it errs toward
    /// the limit, as a store answer that never came does. A message whose end never got
    /// to the backend (queued behind a client that reset) was not sent: its slots go back.
    fn keep_unanswered_messages(&mut self, out: &mut Output, delivered: u64) {
        let ledger = &mut self.ledger;
        let (mut messages, mut recipients, mut unanswered_rcpts) = (0, 0, 0);
        for pending in &self.pending {
            match *pending {
                Pending::Mail { reserved, .. } => messages += u32::from(reserved),
                Pending::Rcpt { reserved, .. } => {
                    recipients += u32::from(reserved);
                    unanswered_rcpts += 1;
                }
                Pending::EndOfData { ends_at }
                | Pending::Bdat {
                    last: true,
                    ends_at,
                } => {
                    if ends_at > delivered {
                        // Nor any later one: the stream goes in order.
                        break;
                    }
                    out.event(Event::MessageUnanswered {
                        recipients: ledger.message_recipients + unanswered_rcpts,
                    });
                    ledger.held_message = false;
                    ledger.held_recipients = 0;
                    ledger.message_recipients = 0;
                    ledger.unanswered_messages =
                        ledger.unanswered_messages.saturating_sub(messages);
                    ledger.unanswered_recipients =
                        ledger.unanswered_recipients.saturating_sub(recipients);
                    (messages, recipients, unanswered_rcpts) = (0, 0, 0);
                }
                _ => {}
            }
        }
    }

    /// Takes bytes the client sent; returns how many were taken. The rest (a partial
    /// command line, or bytes after a point where the rules must wait, see
    /// [`Rules::wants`]) must be passed again, with more after them.
    pub fn client_bytes(&mut self, input: &[u8], out: &mut Output) -> usize {
        self.call_base = out.forwarded;
        let taken = self.take_client_bytes(input, out);
        self.forwarded = self.forwarded_with(out);
        taken
    }

    /// The length of the backend's stream once the current call's forwards are in it.
    fn forwarded_with(&self, out: &Output) -> u64 {
        self.forwarded + out.forwarded.saturating_sub(self.call_base) as u64
    }

    fn take_client_bytes(&mut self, input: &[u8], out: &mut Output) -> usize {
        let mut pos = 0;
        while pos < input.len() {
            let rest = &input[pos..];
            match self.client {
                ClientState::Command => {
                    if self.wants() != Wants::Input {
                        break;
                    }
                    let Some(end) = find_crlf(rest) else {
                        if rest.len() > MAX_RELAYED_LINE + 1 {
                            self.local(canned::LINE_TOO_LONG, true, out);
                        }
                        break;
                    };
                    if end > MAX_RELAYED_LINE {
                        self.local(canned::LINE_TOO_LONG, true, out);
                        break;
                    }
                    if !self.on_command(&rest[..end], pos..pos + end + 2, out) {
                        break;
                    }
                    pos += end + 2;
                }
                ClientState::Data(mut scanner) => match scanner.scan(rest) {
                    BodyStep::More(used) => {
                        self.client = ClientState::Data(scanner);
                        out.forward(pos..pos + used);
                        pos += used;
                        if pos < input.len() {
                            break;
                        }
                    }
                    BodyStep::End(used) => {
                        out.forward(pos..pos + used);
                        pos += used;
                        self.client = ClientState::Command;
                        self.ledger.end_of_message();
                        let ends_at = self.forwarded_with(out);
                        self.pending.push_back(Pending::EndOfData { ends_at });
                    }
                    BodyStep::Ambiguous(at) => {
                        out.forward(pos..pos + at);
                        // Nothing more reaches the backend: closing it before any
                        // final dot makes it discard the message.
                        out.ops.push(Op::CloseBackend);
                        let strict = scanner.rule() == BodyRule::Strict;
                        out.event(Event::BodyRefused { strict });
                        self.client = ClientState::Discarding {
                            scanner: scanner.discard_from(rest, at),
                            strict,
                        };
                        pos += at;
                    }
                },
                ClientState::Discarding {
                    mut scanner,
                    strict,
                } => match scanner.scan(rest) {
                    BodyStep::End(used) => {
                        pos += used;
                        // The backend is gone: nothing it owes will come.
                        self.pending.clear();
                        let reply = if strict {
                            canned::BARE_LINE_ENDING
                        } else {
                            canned::AMBIGUOUS_END_OF_DATA
                        };
                        self.local(reply, true, out);
                    }
                    BodyStep::More(used) | BodyStep::Ambiguous(used) => {
                        self.client = ClientState::Discarding { scanner, strict };
                        pos += used;
                        break;
                    }
                },
                ClientState::Bdat { remaining } => {
                    let take = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(rest.len());
                    out.forward(pos..pos + take);
                    pos += take;
                    let remaining = remaining - take as u64;
                    self.client = if remaining == 0 {
                        ClientState::Command
                    } else {
                        ClientState::Bdat { remaining }
                    };
                }
                ClientState::AwaitingData
                | ClientState::Quitting
                | ClientState::Ended
                | ClientState::Closed => break,
            }
        }
        pos
    }

    /// Acts on one complete command line (`line` without CRLF, `range` with it).
    /// Returns false if the line was not taken (a reservation or a reply is needed
    /// first).
    fn on_command(&mut self, line: &[u8], range: Range<usize>, out: &mut Output) -> bool {
        let (verb, args) = match Verb::split(line) {
            Ok(split) => split,
            Err(error) => {
                let reply = match error {
                    CommandError::AmbiguousVerb => canned::AMBIGUOUS_VERB,
                    _ => canned::CONTROL_CHARACTER,
                };
                self.local(reply, false, out);
                return true;
            }
        };
        if self.bdat_open && !matches!(verb, Verb::Bdat | Verb::Noop | Verb::Quit) {
            self.local(canned::BDAT_SEQUENCE, true, out);
            return true;
        }
        let pending = match verb {
            Verb::Auth => {
                let reply = if self.settings.authenticated {
                    canned::ALREADY_AUTHENTICATED
                } else {
                    canned::AUTH_NOT_NOW
                };
                self.local(reply, false, out);
                return true;
            }
            // The backend may trust postern's address for these (smtpd_authorized_
            // xclient_hosts): forwarded, a client could claim any address or login.
            // They are hidden from EHLO, so a well-behaved client never sends them.
            Verb::ProxyOnly => {
                self.local(canned::NOT_IMPLEMENTED, false, out);
                return true;
            }
            Verb::StartTls => {
                let reply = if self.settings.tls {
                    canned::TLS_ALREADY_ACTIVE
                } else {
                    canned::STARTTLS_NOT_NOW
                };
                self.local(reply, false, out);
                return true;
            }
            Verb::Mail => {
                let reserved = if self.settings.limits.messages_per_user.is_some() {
                    match self.reserve(Claim::Message, out) {
                        Some(Ok(held)) => held,
                        Some(Err(())) => return true,
                        None => return false,
                    }
                } else {
                    false
                };
                self.ledger.unanswered_messages += u32::from(reserved);
                Pending::Mail {
                    txn: self.ledger.txn,
                    reserved,
                }
            }
            Verb::Rcpt => {
                if self.reservation == ReservationState::Idle
                    && let Some(max) = self.settings.limits.recipients_per_message
                    && self.ledger.txn_accepted + self.ledger.txn_outstanding >= max
                {
                    if self.reset_in_flight() {
                        // A reset before this RCPT may still be accepted and make room:
                        // decide once the backend has answered it.
                        self.awaiting_reset = true;
                        return false;
                    }
                    out.event(Event::LimitReached(Limit::RecipientsPerMessage));
                    self.local(limit_reply(Limit::RecipientsPerMessage), false, out);
                    return true;
                }
                let reserved = if self.settings.limits.recipients_per_user.is_some() {
                    match self.reserve(Claim::Recipient, out) {
                        Some(Ok(held)) => held,
                        Some(Err(())) => return true,
                        None => return false,
                    }
                } else {
                    false
                };
                self.ledger.unanswered_recipients += u32::from(reserved);
                self.ledger.txn_outstanding += 1;
                Pending::Rcpt {
                    txn: self.ledger.txn,
                    reserved,
                }
            }
            Verb::Data => {
                self.client = ClientState::AwaitingData;
                Pending::Data
            }
            Verb::Bdat => {
                if !self.settings.chunking {
                    self.local(canned::BDAT_NOT_OFFERED, true, out);
                    return true;
                }
                let Some((size, last)) = parse_bdat(args) else {
                    // The chunk follows unannounced: with its size unknown the only way
                    // not to read it as commands is to stop.
                    self.local(canned::BDAT_SYNTAX, true, out);
                    return true;
                };
                if size > self.settings.max_chunk {
                    // A size the backend may parse differently (a 32-bit `%u` wraps
                    // 4294967306 to 10) would make its chunk end elsewhere than ours.
                    self.local(canned::CHUNK_TOO_BIG, true, out);
                    return true;
                }
                if size == 0 && !last {
                    self.local(canned::EMPTY_CHUNK, true, out);
                    return true;
                }
                if size > 0 {
                    self.client = ClientState::Bdat { remaining: size };
                }
                if last {
                    self.ledger.end_of_message();
                }
                self.bdat_open = !last;
                let ends_at = self.forwarded_with(out) + range.len() as u64 + size;
                Pending::Bdat { last, ends_at }
            }
            Verb::Rset => Pending::Rset {
                txn: self.ledger.txn,
            },
            Verb::Ehlo => Pending::Ehlo {
                txn: self.ledger.txn,
            },
            Verb::Helo => Pending::Helo {
                txn: self.ledger.txn,
            },
            Verb::Quit => {
                self.client = ClientState::Quitting;
                Pending::Quit
            }
            Verb::Noop | Verb::Known | Verb::Other => Pending::Other,
        };
        out.forward(range);
        self.pending.push_back(pending);
        true
    }

    /// Asks for a slot, or takes the answer: `None` while the store is asked,
    /// `Some(Ok(held))` to forward, `Some(Err(()))` when the command was answered 451.
    fn reserve(&mut self, claim: Claim, out: &mut Output) -> Option<Result<bool, ()>> {
        if !self.settings.authenticated {
            return Some(Ok(false));
        }
        match std::mem::replace(&mut self.reservation, ReservationState::Idle) {
            ReservationState::Answered(_, Reservation::Granted { held }) => Some(Ok(held)),
            ReservationState::Answered(_, Reservation::Refused(limit)) => {
                out.event(Event::LimitReached(limit));
                self.local(limit_reply(limit), false, out);
                Some(Err(()))
            }
            ReservationState::Idle | ReservationState::Wanted(_) => {
                self.reservation = ReservationState::Wanted(claim);
                None
            }
        }
    }

    /// Whether a MAIL, RSET, EHLO or HELO of the current transaction is unanswered.
    fn reset_in_flight(&self) -> bool {
        self.pending
            .iter()
            .any(|p| p.reset_txn() == Some(self.ledger.txn))
    }

    /// Answers the client now if nothing is outstanding, else after the backend's
    /// replies to what was pipelined before.
    fn local(&mut self, reply: Canned, close: bool, out: &mut Output) {
        if close {
            self.client = ClientState::Closed;
        }
        if self.pending.is_empty() {
            emit_local(reply, close, out);
        } else {
            self.pending.push_back(Pending::Local { reply, close });
        }
    }

    /// Takes bytes the backend sent; returns how many were taken. The rest (the start
    /// of a reply line, or an EHLO reply being collected) must be passed again, with
    /// more after them.
    pub fn backend_bytes(&mut self, input: &[u8], out: &mut Output) -> usize {
        let mut pos = 0;
        while pos < input.len() {
            let rest = &input[pos..];
            let head = match self.reply.in_line {
                Some(head) => head,
                None => {
                    let hello = match self.pending.front() {
                        Some(Pending::Ehlo { .. }) => Some(true),
                        Some(Pending::Helo { .. }) => Some(false),
                        _ => None,
                    };
                    if !self.reply.in_reply
                        && let Some(extended) = hello
                    {
                        match BackendReply::parse(rest) {
                            Ok(Some((reply, used))) => {
                                if reply.code == 250 {
                                    out.reply(&self.hello_reply(&reply, extended));
                                } else {
                                    out.forward(pos..pos + used);
                                }
                                pos += used;
                                self.reply_code = reply.code;
                                self.on_reply(out);
                                continue;
                            }
                            Ok(None) if rest.len() < MAX_EHLO_REPLY => break,
                            // Too long or malformed: relayed as it is.
                            _ => {}
                        }
                    }
                    let Some(head) = line_head(rest) else { break };
                    if !self.reply.in_reply {
                        self.reply_code = head.code;
                    }
                    head
                }
            };
            match memchr(b'\n', rest) {
                Some(lf) => {
                    out.forward(pos..pos + lf + 1);
                    pos += lf + 1;
                    self.reply.in_line = None;
                    self.reply.in_reply = head.more;
                    if !head.more {
                        self.on_reply(out);
                        if std::mem::take(&mut self.client_resumed) {
                            break;
                        }
                    }
                }
                None => {
                    out.forward(pos..input.len());
                    pos = input.len();
                    self.reply.in_line = Some(head);
                }
            }
        }
        pos
    }

    /// A complete backend reply: it answers the oldest outstanding command.
    fn on_reply(&mut self, out: &mut Output) {
        let code = self.reply_code;
        let positive = (200..300).contains(&code);
        if std::mem::take(&mut self.awaiting_reset) {
            self.client_resumed = true;
        }
        // A reply with nothing outstanding (a 421 before closing) is only relayed.
        if let Some(pending) = self.pending.pop_front() {
            self.settle(pending, positive, out);
            // Inside a chunked message nothing is taken while a command is unanswered,
            // so the reply that empties the queue answers the last one: a non-final
            // BDAT, or a NOOP or QUIT between chunks.
            if self.bdat_open && self.pending.is_empty() {
                self.client_resumed = true;
                if !positive {
                    // The backend refused a chunk, or a NOOP or QUIT between chunks:
                    // whether it reads the next chunk as data or as commands is its
                    // own business (Exim: as commands), so nothing more is sent, and
                    // closing the backend makes it drop the message.
                    self.client = ClientState::Closed;
                    self.pending.clear();
                    out.ops.push(Op::CloseBackend);
                    emit_local(canned::REFUSED_BETWEEN_CHUNKS, true, out);
                    return;
                }
            }
            if pending == Pending::Data && self.client == ClientState::AwaitingData {
                self.client = if code == 354 {
                    ClientState::Data(BodyScanner::new(if self.settings.strict_data {
                        BodyRule::Strict
                    } else {
                        BodyRule::Guarded
                    }))
                } else {
                    ClientState::Command
                };
                self.client_resumed = true;
            } else if code == 354 {
                // The backend took some other line as DATA: its reading and ours have
                // parted, and lines already forwarded as commands may be body lines to
                // it. Nothing after this can be trusted to be checked or answered in
                // order, so both sides are closed; the backend drops the open message.
                self.client = ClientState::Closed;
                self.pending.clear();
                // What is still queued for the backend would be body to it now.
                out.ops.push(Op::CloseBackend);
                emit_local(canned::RELAY_OUT_OF_STEP, true, out);
                return;
            } else if pending == Pending::Quit && self.client == ClientState::Quitting {
                self.client = if positive {
                    ClientState::Ended
                } else {
                    ClientState::Command
                };
                self.client_resumed = true;
            }
        }
        while let Some(&Pending::Local { reply, close }) = self.pending.front() {
            self.pending.pop_front();
            emit_local(reply, close, out);
        }
    }

    /// What the backend's answer to `pending` does to the transaction and the ledger.
    fn settle(&mut self, pending: Pending, positive: bool, out: &mut Output) {
        let ledger = &mut self.ledger;
        match pending {
            Pending::Rcpt { txn, reserved } => {
                ledger.unanswered_recipients -= u32::from(reserved);
                if txn == ledger.txn {
                    ledger.txn_outstanding = ledger.txn_outstanding.saturating_sub(1);
                    ledger.txn_accepted += u32::from(positive);
                }
                if positive {
                    ledger.message_recipients += 1;
                    ledger.held_recipients += u32::from(reserved);
                    out.event(Event::RecipientAccepted);
                } else {
                    out.release(0, u32::from(reserved));
                }
            }
            Pending::Mail { txn, reserved } => {
                ledger.unanswered_messages -= u32::from(reserved);
                if positive {
                    let later = self.later_recipients(txn);
                    self.ledger.reset(txn, later, out);
                    self.ledger.held_message = reserved;
                } else {
                    out.release(u32::from(reserved), 0);
                }
            }
            Pending::Rset { txn } | Pending::Ehlo { txn } | Pending::Helo { txn } => {
                if positive {
                    let later = self.later_recipients(txn);
                    self.ledger.reset(txn, later, out);
                }
            }
            Pending::EndOfData { .. } | Pending::Bdat { last: true, .. } => {
                if positive {
                    out.event(Event::MessageAccepted {
                        recipients: ledger.message_recipients,
                    });
                    ledger.held_message = false;
                    ledger.held_recipients = 0;
                    ledger.message_recipients = 0;
                } else {
                    out.event(Event::MessageRejected);
                    ledger.abandon(out);
                }
            }
            Pending::Local { reply, close } => emit_local(reply, close, out),
            Pending::Data | Pending::Bdat { last: false, .. } | Pending::Quit | Pending::Other => {}
        }
    }

    /// RCPTs of transaction `txn` still unanswered (all sent after the command whose
    /// reply is being handled, since replies come in order).
    fn later_recipients(&self, txn: u32) -> u32 {
        self.pending
            .iter()
            .filter(|p| matches!(p, Pending::Rcpt { txn: t, .. } if *t == txn))
            .count() as u32
    }

    /// The backend's EHLO or HELO reply rewritten as before login: postern's name
    /// (the backend's own stays inside), and for EHLO the backend's extensions minus
    /// the ones postern handles itself, and AUTH for an authenticated client (answered
    /// with 503 by then, as Postfix does).
    fn hello_reply(&mut self, backend: &BackendReply, extended: bool) -> Reply {
        let mut lines: Vec<Cow<'static, str>> = vec![self.settings.hostname.to_string().into()];
        if !extended {
            return Reply { code: 250, lines };
        }
        let mut capabilities = Capabilities::from_ehlo_reply(&backend.lines);
        if self.settings.hide_chunking {
            capabilities = capabilities.without("CHUNKING");
        }
        // The live answer is the truth for this session, whatever the probe saw.
        self.settings = self.settings.clone().with_capabilities(&capabilities);
        lines.extend(
            capabilities
                .for_clients()
                .map(|line| Cow::Owned(line.to_owned())),
        );
        if self.settings.authenticated {
            lines.push(AUTH_LINE.into());
        }
        Reply { code: 250, lines }
    }
}

fn emit_local(reply: Canned, close: bool, out: &mut Output) {
    out.reply(&reply.into());
    if close {
        out.ops.push(Op::Close);
    }
}

fn limit_reply(limit: Limit) -> Canned {
    match limit {
        Limit::MessagesPerUser => canned::MESSAGE_LIMIT,
        Limit::RecipientsPerUser => canned::RECIPIENT_LIMIT,
        Limit::RecipientsPerMessage => canned::RECIPIENTS_PER_MESSAGE,
        Limit::StoreUnavailable => canned::LIMITS_UNAVAILABLE,
    }
}

/// The code and continuation mark of a reply line, once its first four octets (or a
/// shorter line's LF) are in. A line that is not `DDD-`/`DDD ` counts as a last line
/// with code 0: relayed, never acted on.
fn line_head(rest: &[u8]) -> Option<LineHead> {
    let head = &rest[..rest.len().min(4)];
    let end = memchr(b'\n', head).unwrap_or(head.len());
    if end < 4 && end == head.len() {
        return None;
    }
    let code = reply_code(&head[..end.min(3)]).unwrap_or(0);
    Some(LineHead {
        code,
        more: end >= 4 && head[3] == b'-',
    })
}

/// `BDAT chunk-size [LAST]` (RFC 3030 §2): the size and the LAST flag. Digits only
/// (no sign, no blanks inside), so every backend reads the same number.
fn parse_bdat(args: &[u8]) -> Option<(u64, bool)> {
    let mut words = args
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|w| !w.is_empty());
    let size = words.next()?;
    if size.is_empty() || size.len() > 19 || !size.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let size = std::str::from_utf8(size).ok()?.parse().ok()?;
    let last = match words.next() {
        None => false,
        Some(word) if word.eq_ignore_ascii_case(b"LAST") => true,
        Some(_) => return None,
    };
    words.next().is_none().then_some((size, last))
}
