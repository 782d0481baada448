//! Follows the SMTP state of the relayed stream after AUTH, without altering what it
//! relays (RFC 5321 §3.3, §4.1.1.4 and §4.5.2, RFC 2920 pipelining, RFC 3030 BDAT).
//!
//! The relay hands every byte it reads to [`Tracker::client_bytes`] or
//! [`Tracker::backend_bytes`] and performs the [`Op`]s that come back: forward a range
//! of the input verbatim, send one of postern's own replies to the client, count an
//! event, close. Nothing here touches a socket, a clock or the limits store; a per-user
//! limit check is asked for with [`Wants::Lookup`] and answered with
//! [`Tracker::on_lookup`].
//!
//! What the tracker follows:
//! - the command phase, one CRLF-terminated line at a time. A line is forwarded only
//!   once complete, so a command postern answers itself never reaches the backend:
//!   a second `AUTH` (RFC 4954 §4), `STARTTLS` once relayed (RFC 3207 §4.2), a MAIL or
//!   RCPT over a sending limit, and a line with a bare CR or LF that a lenient backend
//!   could read as two commands;
//! - the backend's replies, matched in order to a queue of outstanding commands, so a
//!   reply postern injects waits for the backend's replies to the commands pipelined
//!   before it (RFC 2920 §3.1);
//! - DATA from the backend's 354 to CRLF.CRLF, scanned with `memchr::memmem` only, and
//!   BDAT chunks by their announced size;
//! - `250` to RCPT and to the end of a message, as recipient and message events.
//!
//! `--strict-data` uses the same body scan: a bare CR or LF in a DATA body (the
//! `<LF>.<LF>` family of SMTP smuggling, CVE-2023-51764/51765/51766) stops forwarding
//! at once and closes the backend connection before any final dot, so the backend
//! discards the partial message. The rest of the body is read and dropped up to
//! CRLF.CRLF, and the client gets `550 5.6.0` in sync and is disconnected. BDAT is
//! exempt: a chunk is counted, not scanned for a terminator, so there is nothing to
//! smuggle, and RFC 3030 BINARYMIME bodies may carry bare CR and LF legitimately.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, LazyLock};

use memchr::{memchr, memchr2, memmem};

use crate::smtp::ehlo::AUTH_LINE;
use crate::smtp::line::MAX_LINE;
use crate::smtp::{BackendReply, Canned, Capabilities, Reply, canned};

/// Most commands sent to the backend and not yet answered. A client that pipelines
/// more is not read until replies come back, which bounds the queue, and also the
/// replies the backend may have to buffer while the relay is busy writing to it.
pub const MAX_PENDING: usize = 100;

/// Most bytes of an EHLO reply held back to be rewritten; a longer one (no real server
/// sends one) is passed through verbatim.
pub const MAX_EHLO_REPLY: usize = 32 * 1024;

/// End of DATA (RFC 5321 §4.1.1.4); the CRLF that ends the DATA command line counts as
/// the first two octets for an empty body.
const END_OF_DATA: &[u8] = b"\r\n.\r\n";

static END_OF_DATA_FINDER: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(END_OF_DATA));

/// What a session is allowed to send. Windows live in the limits store; the tracker
/// only compares counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub messages_per_user: Option<u64>,
    pub recipients_per_user: Option<u64>,
    pub recipients_per_message: Option<u32>,
}

impl Limits {
    /// Whether MAIL needs the user's usage from the store.
    fn per_user(&self) -> bool {
        self.messages_per_user.is_some() || self.recipients_per_user.is_some()
    }
}

/// What the tracker needs to know about the session.
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
    /// `--strict-data`: refuse DATA bodies with a bare CR or LF.
    pub strict_data: bool,
    pub limits: Limits,
}

/// A user's sending so far, as the limits store estimates it for the current window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub messages: u64,
    pub recipients: u64,
}

/// The answer to [`Wants::Lookup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Usage(Usage),
    /// The store could not answer and the configured failure mode is closed: the MAIL
    /// gets `451 4.3.0`. (Failing open is `Usage(Usage::default())`.)
    Unavailable,
}

/// Which sending limit refused a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    MessagesPerUser,
    RecipientsPerUser,
    RecipientsPerMessage,
    /// The store was unavailable and the failure mode is closed.
    StoreUnavailable,
}

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Limit::MessagesPerUser => "messages_per_user",
            Limit::RecipientsPerUser => "recipients_per_user",
            Limit::RecipientsPerMessage => "recipients_per_message",
            Limit::StoreUnavailable => "store_unavailable",
        }
    }
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
    /// postern refused a MAIL or RCPT with 451.
    LimitReached(Limit),
    /// `--strict-data` refused a DATA body.
    BareLineEnding,
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
}

impl Output {
    pub fn clear(&mut self) {
        self.ops.clear();
        self.replies.clear();
    }

    /// Forwards a range, merged into the previous op when contiguous so a bulk read
    /// becomes one write.
    fn forward(&mut self, range: Range<usize>) {
        if range.is_empty() {
            return;
        }
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
}

/// What the tracker needs before it can take more client bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wants {
    /// More client bytes (everything given was taken, or a partial line is held).
    Input,
    /// A backend reply first: to DATA, to a full pipeline, or to the commands before a
    /// reply that closes the session.
    Backend,
    /// The user's usage from the limits store, through [`Tracker::on_lookup`].
    Lookup,
}

/// A command sent to the backend, or a reply of postern's own waiting for its turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Ehlo,
    Helo,
    Mail,
    /// `txn` is the client-side transaction the RCPT belongs to.
    Rcpt {
        txn: u32,
    },
    Rset,
    Data,
    EndOfData,
    Bdat {
        last: bool,
    },
    Other,
    Local {
        reply: Canned,
        close: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    Command,
    /// DATA was forwarded; what follows is a body only if the backend says 354.
    AwaitingData,
    Data(BodyScan),
    Bdat {
        remaining: u64,
    },
    /// `--strict-data` refused the body: drop client bytes up to CRLF.CRLF.
    Discarding(Terminator),
    /// No more client bytes are read (a closing reply is queued or was sent).
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyScan {
    Lenient(Terminator),
    Strict(StrictBody),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LookupState {
    Idle,
    Wanted,
    Ready(Lookup),
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

/// The session's SMTP state as seen on the relayed stream.
#[derive(Debug)]
pub struct Tracker {
    settings: Settings,
    client: ClientState,
    pending: VecDeque<Pending>,
    reply: ReplyScan,
    lookup: LookupState,
    /// Code of the current reply (from its first line).
    reply_code: u16,
    /// Set when a reply lets the client go on (the answer to DATA), so the driver
    /// handles client bytes before the backend's next replies.
    client_resumed: bool,
    /// The transaction as the client's commands define it: a number bumped by every
    /// MAIL, RSET, EHLO and HELO forwarded, and its recipients accepted and still
    /// unanswered. With pipelining these run ahead of the replies.
    txn: u32,
    txn_accepted: u32,
    txn_outstanding: u32,
    /// Recipients accepted by the replies since the last MAIL reply: the recipients
    /// of the message whose end is answered next (replies come in command order).
    message_recipients: u32,
    /// RCPTs forwarded and not yet answered, in any transaction.
    outstanding_recipients: u32,
    /// Ends of message forwarded and not yet answered.
    outstanding_messages: u32,
    /// Recipients the store counted at the last lookup, and those accepted since.
    base_recipients: u64,
    recipients_since_lookup: u64,
}

impl Tracker {
    pub fn new(settings: Settings) -> Self {
        Tracker {
            settings,
            client: ClientState::Command,
            pending: VecDeque::with_capacity(16),
            reply: ReplyScan::default(),
            lookup: LookupState::Idle,
            reply_code: 0,
            client_resumed: false,
            txn: 0,
            txn_accepted: 0,
            txn_outstanding: 0,
            message_recipients: 0,
            outstanding_recipients: 0,
            outstanding_messages: 0,
            base_recipients: 0,
            recipients_since_lookup: 0,
        }
    }

    /// What must happen before more client bytes can be taken.
    pub fn wants(&self) -> Wants {
        match self.client {
            _ if self.lookup == LookupState::Wanted => Wants::Lookup,
            ClientState::AwaitingData | ClientState::Closed => Wants::Backend,
            ClientState::Command if self.pending.len() >= MAX_PENDING => Wants::Backend,
            _ => Wants::Input,
        }
    }

    /// The answer to [`Wants::Lookup`].
    pub fn on_lookup(&mut self, lookup: Lookup) {
        self.lookup = LookupState::Ready(lookup);
    }

    /// Takes bytes the client sent; returns how many were taken. The rest (a partial
    /// command line, or bytes after a point where the tracker must wait, see
    /// [`Tracker::wants`]) must be passed again, with more after them.
    pub fn client_bytes(&mut self, input: &[u8], out: &mut Output) -> usize {
        let mut pos = 0;
        while pos < input.len() {
            let rest = &input[pos..];
            match self.client {
                ClientState::Command => {
                    if self.pending.len() >= MAX_PENDING || self.lookup == LookupState::Wanted {
                        break;
                    }
                    let Some(end) = find_crlf(rest) else {
                        if rest.len() > MAX_LINE + 1 {
                            self.local(canned::LINE_TOO_LONG, true, out);
                        }
                        break;
                    };
                    if end > MAX_LINE {
                        self.local(canned::LINE_TOO_LONG, true, out);
                        break;
                    }
                    if !self.on_command(&rest[..end], pos..pos + end + 2, out) {
                        break;
                    }
                    pos += end + 2;
                }
                ClientState::Data(scan) => {
                    let (scan, step) = scan.scan(rest);
                    match step {
                        BodyStep::More(used) => {
                            self.client = ClientState::Data(scan);
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
                            self.outstanding_messages += 1;
                            self.pending.push_back(Pending::EndOfData);
                        }
                        BodyStep::BareLineEnding(at) => {
                            // Nothing more reaches the backend: closing it before the
                            // final dot makes it discard the message.
                            out.ops.push(Op::CloseBackend);
                            out.event(Event::BareLineEnding);
                            self.client = ClientState::Discarding(Terminator::default());
                            pos += at;
                        }
                    }
                }
                ClientState::Discarding(mut terminator) => match terminator.scan(rest) {
                    Some(used) => {
                        pos += used;
                        self.pending.clear();
                        self.local(canned::BARE_LINE_ENDING, true, out);
                    }
                    None => {
                        self.client = ClientState::Discarding(terminator);
                        pos = input.len();
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
                ClientState::AwaitingData | ClientState::Closed => break,
            }
        }
        pos
    }

    /// Acts on one complete command line (`line` without CRLF, `range` with it).
    /// Returns false if the line was not taken (a lookup is needed first).
    fn on_command(&mut self, line: &[u8], range: Range<usize>, out: &mut Output) -> bool {
        // A lenient backend may end a line at a bare LF (or CR): forwarding such a line
        // would let it carry a command postern never saw.
        if memchr2(b'\r', b'\n', line).is_some() {
            self.local(canned::BARE_CR_LF, false, out);
            return true;
        }
        let (verb, args) = split_verb(line);
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
                if self.settings.authenticated && self.settings.limits.per_user() {
                    let lookup = match self.lookup {
                        LookupState::Ready(lookup) => lookup,
                        _ => {
                            self.lookup = LookupState::Wanted;
                            return false;
                        }
                    };
                    self.lookup = LookupState::Idle;
                    if let Some(limit) = self.mail_refusal(lookup) {
                        out.event(Event::LimitReached(limit));
                        self.local(limit_reply(limit), false, out);
                        return true;
                    }
                }
                self.new_transaction();
                Pending::Mail
            }
            Verb::Rcpt => {
                if let Some(limit) = self.rcpt_refusal() {
                    out.event(Event::LimitReached(limit));
                    self.local(limit_reply(limit), false, out);
                    return true;
                }
                self.outstanding_recipients += 1;
                self.txn_outstanding += 1;
                Pending::Rcpt { txn: self.txn }
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
                if size > 0 {
                    self.client = ClientState::Bdat { remaining: size };
                }
                if last {
                    self.outstanding_messages += 1;
                }
                Pending::Bdat { last }
            }
            Verb::Rset => {
                self.new_transaction();
                Pending::Rset
            }
            Verb::Ehlo => {
                self.new_transaction();
                Pending::Ehlo
            }
            Verb::Helo => {
                self.new_transaction();
                Pending::Helo
            }
            Verb::Other => Pending::Other,
        };
        out.forward(range);
        self.pending.push_back(pending);
        true
    }

    fn new_transaction(&mut self) {
        self.txn = self.txn.wrapping_add(1);
        self.txn_accepted = 0;
        self.txn_outstanding = 0;
    }

    fn mail_refusal(&mut self, lookup: Lookup) -> Option<Limit> {
        let usage = match lookup {
            Lookup::Usage(usage) => usage,
            Lookup::Unavailable => return Some(Limit::StoreUnavailable),
        };
        let limits = self.settings.limits;
        // A message whose end is still unanswered will likely count too.
        let messages = usage.messages + u64::from(self.outstanding_messages);
        if limits.messages_per_user.is_some_and(|max| messages >= max) {
            return Some(Limit::MessagesPerUser);
        }
        self.base_recipients = usage.recipients;
        self.recipients_since_lookup = 0;
        None
    }

    fn rcpt_refusal(&self) -> Option<Limit> {
        let limits = self.settings.limits;
        let in_message = self.txn_accepted + self.txn_outstanding;
        if limits
            .recipients_per_message
            .is_some_and(|max| in_message >= max)
        {
            return Some(Limit::RecipientsPerMessage);
        }
        if self.settings.authenticated
            && limits.recipients_per_user.is_some_and(|max| {
                self.base_recipients
                    + self.recipients_since_lookup
                    + u64::from(self.outstanding_recipients)
                    >= max
            })
        {
            return Some(Limit::RecipientsPerUser);
        }
        None
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
                    if !self.reply.in_reply && self.pending.front() == Some(&Pending::Ehlo) {
                        match BackendReply::parse(rest) {
                            Ok(Some((reply, used))) => {
                                if reply.code == 250 {
                                    out.reply(&self.ehlo_reply(&reply));
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
        // A reply with nothing outstanding (a 421 before closing) is only relayed.
        if let Some(pending) = self.pending.pop_front() {
            match pending {
                Pending::Rcpt { txn } => {
                    self.outstanding_recipients = self.outstanding_recipients.saturating_sub(1);
                    if txn == self.txn {
                        self.txn_outstanding = self.txn_outstanding.saturating_sub(1);
                        self.txn_accepted += u32::from(positive);
                    }
                    if positive {
                        self.message_recipients += 1;
                        self.recipients_since_lookup += 1;
                        out.event(Event::RecipientAccepted);
                    }
                }
                Pending::EndOfData | Pending::Bdat { last: true } => {
                    self.outstanding_messages = self.outstanding_messages.saturating_sub(1);
                    out.event(if positive {
                        Event::MessageAccepted {
                            recipients: self.message_recipients,
                        }
                    } else {
                        Event::MessageRejected
                    });
                    self.message_recipients = 0;
                }
                Pending::Mail | Pending::Rset | Pending::Ehlo | Pending::Helo => {
                    self.message_recipients = 0;
                }
                Pending::Local { reply, close } => emit_local(reply, close, out),
                Pending::Data | Pending::Bdat { last: false } | Pending::Other => {}
            }
            if pending == Pending::Data && self.client == ClientState::AwaitingData {
                self.client = if code == 354 {
                    ClientState::Data(self.body_scan())
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
                emit_local(canned::RELAY_OUT_OF_STEP, true, out);
                return;
            }
        }
        while let Some(&Pending::Local { reply, close }) = self.pending.front() {
            self.pending.pop_front();
            emit_local(reply, close, out);
        }
    }

    fn body_scan(&self) -> BodyScan {
        if self.settings.strict_data {
            BodyScan::Strict(StrictBody::default())
        } else {
            BodyScan::Lenient(Terminator::after_command_line())
        }
    }

    /// The backend's EHLO reply rewritten as before login: postern's name, the
    /// backend's extensions minus the ones postern handles itself, and AUTH for an
    /// authenticated client (answered with 503 by then, as Postfix does).
    fn ehlo_reply(&mut self, backend: &BackendReply) -> Reply {
        let capabilities = Capabilities::from_ehlo_reply(&backend.lines);
        // The live answer is the truth for this session, whatever the probe saw.
        self.settings.chunking = capabilities.has("CHUNKING");
        let mut lines: Vec<Cow<'static, str>> = vec![self.settings.hostname.to_string().into()];
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
    let digits = &head[..end.min(3)];
    let code = if digits.len() == 3 && digits.iter().all(u8::is_ascii_digit) {
        digits
            .iter()
            .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'))
    } else {
        0
    };
    Some(LineHead {
        code,
        more: end >= 4 && head[3] == b'-',
    })
}

/// Offset of the first CRLF.
fn find_crlf(bytes: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(lf) = memchr(b'\n', &bytes[from..]) {
        let at = from + lf;
        if at > 0 && bytes[at - 1] == b'\r' {
            return Some(at - 1);
        }
        from = at + 1;
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Ehlo,
    Helo,
    Mail,
    Rcpt,
    Data,
    Bdat,
    Rset,
    Auth,
    StartTls,
    /// XCLIENT and XFORWARD: meant for postern's own use towards the backend.
    ProxyOnly,
    Other,
}

/// The verb as a backend reads it: leading blanks skipped, ended by a space or a tab.
fn split_verb(line: &[u8]) -> (Verb, &[u8]) {
    let line = line.trim_ascii_start();
    let end = line
        .iter()
        .position(|&b| b == b' ' || b == b'\t')
        .unwrap_or(line.len());
    let (word, args) = line.split_at(end);
    let verb = match word.len() {
        4 => {
            let mut upper = [0u8; 4];
            upper.copy_from_slice(word);
            upper.make_ascii_uppercase();
            match &upper {
                b"EHLO" => Verb::Ehlo,
                b"HELO" => Verb::Helo,
                b"MAIL" => Verb::Mail,
                b"RCPT" => Verb::Rcpt,
                b"DATA" => Verb::Data,
                b"BDAT" => Verb::Bdat,
                b"RSET" => Verb::Rset,
                b"AUTH" => Verb::Auth,
                _ => Verb::Other,
            }
        }
        8 if word.eq_ignore_ascii_case(b"STARTTLS") => Verb::StartTls,
        7 if word.eq_ignore_ascii_case(b"XCLIENT") => Verb::ProxyOnly,
        8 if word.eq_ignore_ascii_case(b"XFORWARD") => Verb::ProxyOnly,
        _ => Verb::Other,
    };
    (verb, args)
}

/// `BDAT chunk-size [LAST]` (RFC 3030 §2): the size and the LAST flag.
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

/// How much of CRLF.CRLF the bytes so far end with: a KMP automaton over the five
/// octets, used only at chunk edges; the middle of a chunk is searched with memmem.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Terminator(u8);

impl Terminator {
    /// Right after the DATA line: its CRLF is the terminator's first two octets.
    fn after_command_line() -> Self {
        Terminator(2)
    }

    fn step(self, byte: u8) -> Self {
        Terminator(match (self.0, byte) {
            (3, b'\r') => 4,
            (4, b'\n') => 5,
            (1, b'\n') => 2,
            (2, b'.') => 3,
            (_, b'\r') => 1,
            _ => 0,
        })
    }

    /// Returns the offset just past the terminator if it ends in `bytes`.
    fn scan(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        while self.0 != 0 && i < bytes.len() {
            *self = self.step(bytes[i]);
            i += 1;
            if self.0 == 5 {
                return Some(i);
            }
        }
        if i == bytes.len() {
            return None;
        }
        if let Some(at) = END_OF_DATA_FINDER.find(&bytes[i..]) {
            return Some(i + at + END_OF_DATA.len());
        }
        // No match: the state is the longest suffix that starts the terminator, which
        // lies within the last four octets (and after `i`, where the state was empty).
        *self = Terminator(0);
        for &byte in &bytes[bytes.len().saturating_sub(4).max(i)..] {
            *self = self.step(byte);
        }
        None
    }
}

/// `--strict-data` body scan: every CR must be followed by LF and every LF preceded by
/// CR; a line that is exactly "." ends the body. A CR at the end of the input is kept
/// back until its next octet shows whether it is bare, so not even that CR reaches the
/// backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StrictBody {
    line: LineSoFar,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineSoFar {
    Empty,
    Dot,
    Other,
}

impl Default for StrictBody {
    fn default() -> Self {
        StrictBody {
            line: LineSoFar::Empty,
        }
    }
}

enum BodyStep {
    /// The body goes on past the first this many bytes; the rest (a CR whose LF is
    /// not in yet) must be passed again.
    More(usize),
    /// The body ends this many octets in.
    End(usize),
    /// A bare CR or LF at this offset.
    BareLineEnding(usize),
}

impl BodyScan {
    fn scan(self, bytes: &[u8]) -> (BodyScan, BodyStep) {
        match self {
            BodyScan::Lenient(mut terminator) => {
                let step = match terminator.scan(bytes) {
                    Some(end) => BodyStep::End(end),
                    None => BodyStep::More(bytes.len()),
                };
                (BodyScan::Lenient(terminator), step)
            }
            BodyScan::Strict(mut body) => {
                let step = body.scan(bytes);
                (BodyScan::Strict(body), step)
            }
        }
    }
}

impl StrictBody {
    fn scan(&mut self, bytes: &[u8]) -> BodyStep {
        let mut i = 0;
        loop {
            let hit = memchr2(b'\r', b'\n', &bytes[i..]).map(|h| i + h);
            let text_end = hit.unwrap_or(bytes.len());
            if text_end > i {
                self.line = match (self.line, &bytes[i..text_end]) {
                    (LineSoFar::Empty, b".") => LineSoFar::Dot,
                    _ => LineSoFar::Other,
                };
            }
            let Some(at) = hit else {
                return BodyStep::More(bytes.len());
            };
            if bytes[at] == b'\n' {
                // A CR always takes its LF with it, so this LF is bare.
                return BodyStep::BareLineEnding(at);
            }
            match bytes.get(at + 1) {
                None => return BodyStep::More(at),
                Some(b'\n') => {}
                Some(_) => return BodyStep::BareLineEnding(at),
            }
            if self.line == LineSoFar::Dot {
                return BodyStep::End(at + 2);
            }
            self.line = LineSoFar::Empty;
            i = at + 2;
        }
    }
}

#[cfg(test)]
mod tests;
