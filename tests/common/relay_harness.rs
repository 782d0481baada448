//! A checking driver for the relayed session: it drives the real
//! [`postern::relay::tracker::Tracker`] the way `relay.rs` does (bytes in and out of its
//! buffers, store answers, write acknowledgements, half-closes) against a *model
//! backend* that reads what postern forwards the way a strict SMTP server does, and
//! checks after every step that a lenient server would read the same thing.
//!
//! Shared by `tests/it/relay_properties.rs` (proptest), `tests/it/relay_fuzz_seeds.rs`
//! (the seed smoke test) and `fuzz/fuzz_targets/relay.rs` (libFuzzer, through `#[path]`).
//! It panics on the first broken invariant:
//! - every byte written to the backend is a byte the client sent, in order;
//! - every command line the backend reads (lines end at CRLF only) has no control
//!   octet but HT, and is not AUTH, STARTTLS, XCLIENT or XFORWARD; the unfinished tail
//!   of the command stream never holds an LF (a reader that ends lines at LF would act
//!   on it); a MAIL or RCPT that needs a reservation got one;
//! - a BDAT the backend reads has a size it can read only one way (digits, at most its
//!   SIZE, CHUNKING offered), and its chunk is exactly that many octets;
//! - a DATA body ends, for the strict reader (`<CRLF>.<CRLF>`), a reader that ends lines
//!   at LF (Postfix before 3.9, OpenSMTPD 6.8: `<LF>.<LF>`, `<LF>.<CRLF>`,
//!   `<CRLF>.<LF>`) and a reader that ends lines at CR or LF, at the same dot; with
//!   `--strict-data`, it holds no bare CR or LF at all;
//! - the backend never accepts more recipients in one transaction than the
//!   per-message limit;
//! - the queues stay bounded; notices never give back more than was reserved, and at
//!   the end everything reserved was given back but the slots of messages the backend
//!   may have accepted;
//! - postern's rewritten EHLO replies never pass on the backend's STARTTLS, XCLIENT or
//!   AUTH lines.
//!
//! Raw backend bytes (`Op::RawBackend`) and a 354 to anything but DATA put the run in
//! *chaos*: the model no longer knows which command a reply answers, so only the
//! invariants that hold for any backend are checked from then on (no panic, the
//! subsequence, bounded queues, no double release).

#![allow(dead_code)]

use std::collections::VecDeque;

use postern::relay::pump::{Io, Pump, Pumped, Sides};
use postern::relay::tracker::{
    Claim, Event, Limit, Limits, MAX_BUFFER, MAX_CHUNK, Notice, Reservation, Settings, Tracker,
};

/// The most either queue may hold: what was read while it had room, plus one read.
pub const QUEUE_BOUND: usize = 4 * MAX_BUFFER;

/// What a session is set up with (the fuzz input's first two bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    pub strict_data: bool,
    pub chunking: bool,
    /// The backend advertises `SIZE 1000` (else no SIZE: chunks up to [`MAX_CHUNK`]).
    pub small_size: bool,
    pub authenticated: bool,
    pub tls: bool,
    pub limits: Limits,
}

impl Setup {
    pub fn from_bytes(flags: u8, extra: u8) -> Setup {
        let bit = |n: u8| flags & (1 << n) != 0;
        Setup {
            strict_data: bit(0),
            chunking: bit(1),
            small_size: bit(7),
            authenticated: bit(2),
            tls: bit(3),
            limits: Limits {
                messages_per_user: bit(4).then_some(u64::from(extra & 3) + 1),
                recipients_per_user: bit(5).then_some(u64::from((extra >> 2) & 7) + 1),
                recipients_per_message: bit(6).then_some(u32::from(extra >> 5) + 1),
            },
        }
    }

    pub fn max_chunk(&self) -> u64 {
        if self.small_size { 1000 } else { MAX_CHUNK }
    }

    pub fn settings(&self) -> Settings {
        Settings {
            hostname: "postern.test".into(),
            authenticated: self.authenticated,
            tls: self.tls,
            chunking: self.chunking,
            max_chunk: self.max_chunk(),
            hide_chunking: false,
            strict_data: self.strict_data,
            limits: self.limits,
        }
    }

    fn reserves(&self, claim: Claim) -> bool {
        self.authenticated
            && match claim {
                Claim::Message => self.limits.messages_per_user.is_some(),
                Claim::Recipient => self.limits.recipients_per_user.is_some(),
            }
    }
}

/// How the model backend answers the oldest command it has not answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 354 to DATA, the capability list to EHLO, 250 to anything else.
    Positive,
    /// 250 even to DATA.
    Ok,
    /// A multi-line 250.
    MultiLine,
    /// 250 ended by a bare LF.
    BareLf,
    Refused550,
    Temp451,
    Sequence503,
    /// 354 to whatever it is (to anything but DATA: a backend that read it as DATA).
    Go354,
    Closing421,
}

impl Answer {
    pub fn from_byte(b: u8) -> Answer {
        match b % 12 {
            0..=3 => Answer::Positive,
            4 => Answer::Ok,
            5 => Answer::MultiLine,
            6 => Answer::BareLf,
            7 => Answer::Refused550,
            8 => Answer::Temp451,
            9 => Answer::Sequence503,
            10 => Answer::Go354,
            _ => Answer::Closing421,
        }
    }
}

/// One step of the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// The client sends bytes (they wait until the tracker has room).
    Client(Vec<u8>),
    /// The tracker reads waiting client bytes, at most `n` per read, while it has room.
    ReadClient(usize),
    /// The backend takes up to `n` bytes of `to_backend` (0: all).
    WriteBackend(usize),
    /// The client takes up to `n` bytes of `to_client` (0: all).
    WriteClient(usize),
    /// The model answers its oldest unanswered command.
    Answer(Answer),
    /// The tracker reads what the model sent, at most `n` per read.
    ReadBackend(usize),
    /// The store answers the reservation in flight.
    Store(u8),
    /// The backend sends bytes of its own (chaos).
    RawBackend(Vec<u8>),
    ClientEof,
    BackendEof,
    BackendWriteFailed,
    /// Everything moves, the model answering `Positive`, until nothing does.
    Pump,
}

impl Op {
    /// Decodes a fuzz input after the two setup bytes into steps.
    pub fn decode(mut data: &[u8]) -> Vec<Op> {
        let mut ops = Vec::new();
        let take = |data: &mut &[u8]| -> u8 {
            let (&first, rest) = data.split_first().unwrap_or((&0, &[]));
            *data = rest;
            first
        };
        while !data.is_empty() {
            let op = take(&mut data);
            let arg = take(&mut data);
            let op = match op % 16 {
                0..=2 => {
                    let n = usize::from(arg).min(data.len());
                    let (bytes, rest) = data.split_at(n);
                    data = rest;
                    Op::Client(bytes.to_vec())
                }
                3 => {
                    // A run of the same bytes, to reach the buffer limits.
                    let n = usize::from(take(&mut data) % 32).min(data.len());
                    let (bytes, rest) = data.split_at(n);
                    data = rest;
                    Op::Client(bytes.repeat(usize::from(arg) * 8 + 1))
                }
                4 => Op::ReadClient(usize::from(arg) * 64 + 1),
                5 => Op::WriteBackend(usize::from(arg) * 16),
                6 => Op::WriteClient(usize::from(arg) * 16),
                7 | 8 => Op::Answer(Answer::from_byte(arg)),
                9 => Op::ReadBackend(usize::from(arg) + 1),
                10 => Op::Store(arg),
                11 => {
                    let n = usize::from(arg % 32).min(data.len());
                    let (bytes, rest) = data.split_at(n);
                    data = rest;
                    Op::RawBackend(bytes.to_vec())
                }
                12 => match arg % 8 {
                    0 => Op::ClientEof,
                    1 => Op::BackendEof,
                    2 => Op::BackendWriteFailed,
                    _ => Op::Pump,
                },
                _ => Op::Pump,
            };
            ops.push(op);
        }
        ops
    }
}

/// Runs a fuzz input: two setup bytes, then steps; a final pump and `finish`.
pub fn run_fuzz(data: &[u8]) {
    let Some((&[flags, extra], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let mut harness = Harness::new(Setup::from_bytes(flags, extra));
    for op in Op::decode(rest) {
        harness.step(op);
    }
    harness.step(Op::Pump);
    harness.finish();
}

/// What the model backend was sent and has not answered yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Hello { extended: bool },
    Rset,
    Mail { held: bool },
    Rcpt { held: bool },
    Data,
    EndOfData,
    Bdat { last: bool },
    Quit,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    Command,
    /// A DATA line was read and not answered yet: nothing after it is read until then.
    AwaitingData,
    /// Inside a DATA body; `body` holds it from the CRLF of the DATA line on.
    Data {
        body: Vec<u8>,
    },
    Chunk {
        remaining: u64,
        last: bool,
    },
}

/// What the backend read, in order: the commands and where each message ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    Command(Vec<u8>),
    /// A DATA body of this many octets (terminator included) ended.
    Body(usize),
    /// A BDAT chunk of this many octets was read.
    Chunk(u64),
}

/// The sending-limit slots of the backend's open transaction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Slots {
    pub message: u64,
    pub recipients: u64,
}

/// A strict SMTP server, fed the bytes postern writes to it. It answers only when told
/// to ([`Op::Answer`]), so the tests decide what each command gets.
#[derive(Debug)]
pub struct Backend {
    setup: Setup,
    /// Everything received.
    pub received: Vec<u8>,
    pos: usize,
    mode: Mode,
    unanswered: VecDeque<Cmd>,
    /// What it sent that postern has not read yet.
    pub outbox: Vec<u8>,
    pub log: Vec<Read>,
    /// Reservations granted with `held` for MAIL and RCPT lines not yet received.
    grants_message: VecDeque<bool>,
    grants_recipient: VecDeque<bool>,
    /// The open transaction's slots and accepted recipients.
    txn: Slots,
    txn_recipients: u32,
    /// Slots of messages it accepted: the most postern may keep.
    pub kept: Slots,
    pub accepted_messages: usize,
    /// No more bytes reach it.
    pub cut: bool,
    /// How much it had received when it answered QUIT 2xx (a real server closes then).
    pub said_goodbye_at: Option<usize>,
}

impl Backend {
    fn new(setup: Setup) -> Backend {
        Backend {
            setup,
            received: Vec::new(),
            pos: 0,
            mode: Mode::Command,
            unanswered: VecDeque::new(),
            outbox: Vec::new(),
            log: Vec::new(),
            grants_message: VecDeque::new(),
            grants_recipient: VecDeque::new(),
            txn: Slots::default(),
            txn_recipients: 0,
            kept: Slots::default(),
            accepted_messages: 0,
            cut: false,
            said_goodbye_at: None,
        }
    }

    fn receive(&mut self, bytes: &[u8]) {
        assert!(!self.cut, "bytes written to a backend that was cut off");
        self.received.extend_from_slice(bytes);
        self.parse();
    }

    /// Reads what it can of what it received.
    fn parse(&mut self) {
        loop {
            let rest = &self.received[self.pos..];
            match &mut self.mode {
                Mode::AwaitingData => return,
                Mode::Command => {
                    let Some(end) = find(rest, b"\r\n") else {
                        assert!(
                            !rest.contains(&b'\n'),
                            "an unfinished command line holds an LF: {:?}",
                            String::from_utf8_lossy(rest)
                        );
                        return;
                    };
                    let line = rest[..end].to_vec();
                    self.pos += end + 2;
                    self.command(line);
                }
                Mode::Data { body } => {
                    if rest.is_empty() {
                        return;
                    }
                    // Only the new octets and the four before them can start an end.
                    let from = body.len().saturating_sub(4);
                    body.extend_from_slice(rest);
                    self.pos += rest.len();
                    let found = check_body(body, from, self.setup.strict_data);
                    if let Some(len) = found {
                        let body_len = body.len();
                        // Bytes after the end are commands again.
                        let extra = body_len - len;
                        self.pos -= extra;
                        self.mode = Mode::Command;
                        // The leading CRLF belongs to the DATA line.
                        self.log.push(Read::Body(len - 2));
                        self.unanswered.push_back(Cmd::EndOfData);
                    }
                }
                Mode::Chunk { remaining, last } => {
                    let take = (rest.len() as u64).min(*remaining);
                    self.pos += take as usize;
                    *remaining -= take;
                    if *remaining > 0 {
                        return;
                    }
                    let last = *last;
                    self.mode = Mode::Command;
                    self.unanswered.push_back(Cmd::Bdat { last });
                }
            }
        }
    }

    /// A complete command line, CRLF removed.
    fn command(&mut self, line: Vec<u8>) {
        let text = String::from_utf8_lossy(&line).into_owned();
        assert!(
            !line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f),
            "a command line with a control octet reached the backend: {text:?}"
        );
        // Strict reader: the verb ends at SP or HT. Lenient reader (Postfix): the line
        // ends at LF and words split on isspace(), VT and FF included. With no control
        // octet in the line both must find the same verb; checked anyway.
        let strict = verb(&line, |b| b == b' ' || b == b'\t');
        let lenient = verb(&line, |b| b.is_ascii_whitespace() || b == 0x0b);
        assert_eq!(strict, lenient, "readers disagree on the verb of {text:?}");
        assert!(
            !matches!(
                strict.as_slice(),
                b"AUTH" | b"STARTTLS" | b"XCLIENT" | b"XFORWARD"
            ),
            "{text:?} reached the backend"
        );
        self.log.push(Read::Command(line.clone()));
        let cmd = match strict.as_slice() {
            b"EHLO" => Cmd::Hello { extended: true },
            b"HELO" => Cmd::Hello { extended: false },
            b"RSET" => Cmd::Rset,
            b"MAIL" => Cmd::Mail {
                held: self.grant(Claim::Message, &text),
            },
            b"RCPT" => Cmd::Rcpt {
                held: self.grant(Claim::Recipient, &text),
            },
            b"DATA" => {
                self.mode = Mode::AwaitingData;
                Cmd::Data
            }
            b"BDAT" => {
                let (size, last) = self.bdat(&line, &text);
                self.log.push(Read::Chunk(size));
                if size > 0 {
                    self.mode = Mode::Chunk {
                        remaining: size,
                        last,
                    };
                    return; // answered once the chunk is in
                }
                Cmd::Bdat { last }
            }
            b"QUIT" => Cmd::Quit,
            _ => Cmd::Other,
        };
        self.unanswered.push_back(cmd);
    }

    /// The reservation that let this MAIL or RCPT through, if one was needed.
    fn grant(&mut self, claim: Claim, text: &str) -> bool {
        if !self.setup.reserves(claim) {
            return false;
        }
        let queue = match claim {
            Claim::Message => &mut self.grants_message,
            Claim::Recipient => &mut self.grants_recipient,
        };
        queue
            .pop_front()
            .unwrap_or_else(|| panic!("{text:?} reached the backend without a reservation"))
    }

    /// A BDAT line as a strict server reads it; it must be one every server reads alike.
    fn bdat(&self, line: &[u8], text: &str) -> (u64, bool) {
        assert!(
            self.setup.chunking,
            "BDAT reached a backend without CHUNKING: {text:?}"
        );
        let words: Vec<&[u8]> = line
            .split(|&b| b == b' ' || b == b'\t')
            .filter(|w| !w.is_empty())
            .collect();
        let (size, last) = match words.as_slice() {
            [_, size] => (*size, false),
            [_, size, last] if last.eq_ignore_ascii_case(b"LAST") => (*size, true),
            _ => panic!("a malformed BDAT reached the backend: {text:?}"),
        };
        assert!(
            !size.is_empty() && size.iter().all(u8::is_ascii_digit),
            "a BDAT size read differently by different servers: {text:?}"
        );
        // A 32-bit `%u` and a 64-bit parse must agree.
        let size: u64 = std::str::from_utf8(size)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("a BDAT size that does not fit 64 bits: {text:?}"));
        assert!(
            size <= self.setup.max_chunk() && size <= u64::from(u32::MAX >> 1),
            "a BDAT chunk over the backend's limit: {text:?}"
        );
        assert!(size > 0 || last, "BDAT 0 without LAST reached the backend");
        (size, last)
    }

    /// Answers the oldest command; returns whether the run is now in chaos.
    fn answer(&mut self, answer: Answer) -> bool {
        let Some(cmd) = self.unanswered.pop_front() else {
            return false;
        };
        let (code, mut text): (u16, Vec<u8>) = match (answer, cmd) {
            (Answer::Positive, Cmd::Data) => (354, b"354 go ahead\r\n".to_vec()),
            (Answer::Positive, Cmd::Hello { extended: true }) => (250, self.capabilities()),
            (Answer::Positive, Cmd::Hello { extended: false }) => {
                (250, b"250 backend.test\r\n".to_vec())
            }
            (Answer::Positive | Answer::Ok, _) => (250, b"250 2.0.0 ok\r\n".to_vec()),
            (Answer::MultiLine, _) => (250, b"250-2.0.0 first\r\n250 2.0.0 ok\r\n".to_vec()),
            (Answer::BareLf, _) => (250, b"250 2.0.0 bare\n".to_vec()),
            (Answer::Refused550, _) => (550, b"550 5.7.1 no\r\n".to_vec()),
            (Answer::Temp451, _) => (451, b"451 4.3.0 later\r\n".to_vec()),
            (Answer::Sequence503, _) => (503, b"503 5.5.1 sequence\r\n".to_vec()),
            (Answer::Go354, _) => (354, b"354 go ahead\r\n".to_vec()),
            (Answer::Closing421, _) => (421, b"421 4.4.2 closing\r\n".to_vec()),
        };
        let positive = (200..300).contains(&code);
        let mut chaos = false;
        match cmd {
            Cmd::Data => {
                self.mode = if code == 354 {
                    Mode::Data {
                        body: b"\r\n".to_vec(),
                    }
                } else {
                    Mode::Command
                };
            }
            _ if code == 354 => {
                // This backend read the line as DATA: its reading and postern's part.
                chaos = true;
            }
            Cmd::Hello { .. } | Cmd::Rset if positive => self.abandon(),
            Cmd::Mail { held } if positive => {
                self.abandon();
                self.txn.message = u64::from(held);
            }
            Cmd::Rcpt { held } if positive => {
                self.txn.recipients += u64::from(held);
                self.txn_recipients += 1;
                if let Some(max) = self.setup.limits.recipients_per_message {
                    assert!(
                        self.txn_recipients <= max,
                        "the backend accepted {} recipients for one message (limit {max})",
                        self.txn_recipients
                    );
                }
            }
            Cmd::Quit if positive => {
                self.said_goodbye_at.get_or_insert(self.received.len());
            }
            Cmd::EndOfData | Cmd::Bdat { last: true } => {
                if positive {
                    self.kept.message += self.txn.message;
                    self.kept.recipients += self.txn.recipients;
                    self.accepted_messages += 1;
                }
                self.abandon();
            }
            _ => {}
        }
        self.outbox.append(&mut text);
        self.parse();
        chaos
    }

    fn abandon(&mut self) {
        self.txn = Slots::default();
        self.txn_recipients = 0;
    }

    /// An EHLO reply with the extensions postern must hide.
    fn capabilities(&self) -> Vec<u8> {
        let mut reply = b"250-backend.test Hello\r\n250-PIPELINING\r\n".to_vec();
        if self.setup.chunking {
            reply.extend_from_slice(b"250-CHUNKING\r\n");
        }
        if self.setup.small_size {
            reply.extend_from_slice(b"250-SIZE 1000\r\n");
        }
        reply.extend_from_slice(
            b"250-STARTTLS\r\n250-AUTH GSSAPI-HOSTILE\r\n250-XCLIENT NAME ADDR\r\n250 8BITMIME\r\n",
        );
        reply
    }
}

/// The first-word verb of a line, uppercased, words split by `blank`.
/// The model client and backend as the relay's [`Pump`] sees them: both always read;
/// what they send waits in queues; an end of stream is read once.
struct Peers<'a> {
    backend: &'a mut Backend,
    client_waiting: &'a mut VecDeque<u8>,
    client_read: &'a mut Vec<u8>,
    matched: &'a mut usize,
    to_client: &'a mut Vec<u8>,
    client_eof: bool,
    client_eof_read: &'a mut bool,
    backend_eof: bool,
    backend_eof_read: &'a mut bool,
}

impl Sides for Peers<'_> {
    fn write_backend(&mut self, bytes: &[u8]) -> Io {
        check_subsequence(self.client_read, self.matched, bytes);
        self.backend.receive(bytes);
        Io::Done(bytes.len())
    }
    fn flush_backend(&mut self) -> Io {
        Io::Done(0)
    }
    fn shutdown_backend(&mut self) -> Io {
        Io::Done(0)
    }
    fn write_client(&mut self, bytes: &[u8]) -> Io {
        self.to_client.extend_from_slice(bytes);
        Io::Done(bytes.len())
    }
    fn flush_client(&mut self) -> Io {
        Io::Done(0)
    }
    fn read_client(&mut self, into: &mut [u8]) -> Io {
        if self.client_waiting.is_empty() {
            if self.client_eof && !*self.client_eof_read {
                *self.client_eof_read = true;
                return Io::Done(0);
            }
            return Io::WouldBlock;
        }
        let n = into.len().min(self.client_waiting.len());
        for (slot, byte) in into[..n].iter_mut().zip(self.client_waiting.drain(..n)) {
            *slot = byte;
            self.client_read.push(byte);
        }
        Io::Done(n)
    }
    fn read_backend(&mut self, into: &mut [u8]) -> Io {
        if self.backend.outbox.is_empty() {
            if self.backend_eof && !*self.backend_eof_read {
                *self.backend_eof_read = true;
                return Io::Done(0);
            }
            return Io::WouldBlock;
        }
        let n = into.len().min(self.backend.outbox.len());
        into[..n].copy_from_slice(&self.backend.outbox[..n]);
        self.backend.outbox.drain(..n);
        Io::Done(n)
    }
}

/// Panics unless `bytes` is a subsequence of what the client sent after `matched`.
fn check_subsequence(client_read: &[u8], matched: &mut usize, bytes: &[u8]) {
    for &b in bytes {
        let found = client_read[*matched..]
            .iter()
            .position(|&c| c == b)
            .unwrap_or_else(|| {
                panic!(
                    "the backend got {:?}, which the client did not send",
                    String::from_utf8_lossy(bytes)
                )
            });
        *matched += found + 1;
    }
}

fn verb(line: &[u8], blank: impl Fn(u8) -> bool) -> Vec<u8> {
    let start = line.iter().position(|&b| !blank(b)).unwrap_or(line.len());
    let rest = &line[start..];
    let end = rest.iter().position(|&b| blank(b)).unwrap_or(rest.len());
    rest[..end].to_ascii_uppercase()
}

/// The last octets of a long buffer, for a panic message.
fn show(bytes: &[u8]) -> String {
    let tail = &bytes[bytes.len().saturating_sub(200)..];
    format!("…{:?}", String::from_utf8_lossy(tail))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Where a DATA body (starting with the DATA line's CRLF) ends, terminator included,
/// for the strict reader; panics if a lenient reader would end it elsewhere first, or
/// (`strict_data`) if it holds a bare CR or LF.
fn check_body(body: &[u8], from: usize, strict_data: bool) -> Option<usize> {
    let strict = find(&body[from..], b"\r\n.\r\n").map(|at| from + at + 2);
    let dot_end = strict.map_or(body.len(), |dot| dot + 3);
    let eol = |b: u8| b == b'\r' || b == b'\n';
    // Lines end at LF; a trailing CR is stripped; a line "." ends the body.
    let lf_reader = (from.max(1)..body.len()).find(|&i| {
        body[i] == b'.'
            && body[i - 1] == b'\n'
            && (body.get(i + 1) == Some(&b'\n') || body.get(i + 1..i + 3) == Some(b"\r\n"))
    });
    // Lines end at CR, LF or CRLF.
    let cr_reader = (from.max(1)..body.len())
        .find(|&i| body[i] == b'.' && eol(body[i - 1]) && body.get(i + 1).is_some_and(|&b| eol(b)));
    for (name, dot) in [("LF", lf_reader), ("CR-or-LF", cr_reader)] {
        if let Some(dot) = dot {
            assert!(
                Some(dot) == strict || dot > dot_end,
                "a {name} reader ends the message at {dot}, the strict reader at {strict:?}: {}",
                show(body)
            );
        }
    }
    if strict_data {
        let upto = &body[..dot_end.min(body.len())];
        for (i, &b) in upto.iter().enumerate().skip(from) {
            let bare = match b {
                b'\r' => upto.get(i + 1).is_some_and(|&n| n != b'\n'),
                b'\n' => i == 0 || upto[i - 1] != b'\r',
                _ => false,
            };
            assert!(
                !bare,
                "a bare CR or LF reached the backend under --strict-data: {}",
                show(upto)
            );
        }
    }
    strict.map(|dot| dot + 3)
}

/// The driver: the tracker, a client, the model backend and the limits store.
#[derive(Debug)]
pub struct Harness {
    pub setup: Setup,
    pub tracker: Tracker,
    pub backend: Backend,
    /// Client bytes the tracker has not read yet.
    client_waiting: VecDeque<u8>,
    /// Client bytes the tracker read, and how far the backend's bytes matched them.
    pub client_read: Vec<u8>,
    matched: usize,
    pub to_client: Vec<u8>,
    pub events: Vec<Event>,
    client_eof: bool,
    client_eof_read: bool,
    backend_eof: bool,
    backend_eof_read: bool,
    /// The reservation asked for and not answered yet.
    store_call: Option<Claim>,
    granted: Slots,
    released: Slots,
    /// Granted after the tracker stopped asking (it is closing, or a write to the
    /// backend failed): the driver still hands such an answer in.
    late_grants: Slots,
    /// How much of `to_client` was searched for hidden extensions.
    searched: usize,
    pub chaos: bool,
    finished: bool,
    /// The relay's schedule, as production runs it.
    relay_pump: Pump,
}

impl Harness {
    pub fn new(setup: Setup) -> Harness {
        let mut harness = Harness {
            setup,
            tracker: Tracker::new(setup.settings(), b"", b""),
            backend: Backend::new(setup),
            client_waiting: VecDeque::new(),
            client_read: Vec::new(),
            matched: 0,
            to_client: Vec::new(),
            events: Vec::new(),
            client_eof: false,
            client_eof_read: false,
            backend_eof: false,
            backend_eof_read: false,
            store_call: None,
            granted: Slots::default(),
            released: Slots::default(),
            late_grants: Slots::default(),
            searched: 0,
            chaos: false,
            finished: false,
            relay_pump: Pump::default(),
        };
        harness.after_step();
        harness
    }

    /// Whether the relay's loop would have ended: postern or a side is done and all
    /// that was for the client is written.
    pub fn over(&self) -> bool {
        self.tracker.is_done() && self.tracker.to_client().is_empty()
    }

    pub fn step(&mut self, op: Op) {
        if self.over() {
            return;
        }
        match op {
            Op::Client(bytes) => {
                if !self.client_eof {
                    self.client_waiting.extend(bytes);
                }
            }
            Op::ReadClient(n) => {
                self.read_client(n);
            }
            Op::WriteBackend(n) => {
                self.write_backend(n);
            }
            Op::WriteClient(n) => {
                self.write_client(n);
            }
            Op::Answer(answer) => {
                if !self.backend.cut {
                    self.chaos |= self.backend.answer(answer);
                }
            }
            Op::ReadBackend(n) => {
                self.read_backend(n);
            }
            Op::Store(answer) => self.store(answer),
            Op::RawBackend(bytes) => {
                if !bytes.is_empty() && !self.backend_eof {
                    self.chaos = true;
                    self.backend.outbox.extend_from_slice(&bytes);
                }
            }
            Op::ClientEof => self.client_eof = true,
            Op::BackendEof => self.backend_eof = true,
            Op::BackendWriteFailed => {
                if !self.backend.cut {
                    self.tracker.backend_write_failed();
                    self.backend.cut = true;
                }
            }
            Op::Pump => self.pump(),
        }
        self.after_step();
    }

    /// Moves everything that can move in the relay's own order ([`Pump`]), the backend
    /// answering every command the way a lenient server that accepts everything would,
    /// until nothing moves.
    pub fn pump(&mut self) {
        for _ in 0..100_000 {
            if self.over() {
                return;
            }
            let mut progress = false;
            while !self.backend.cut && !self.backend.unanswered.is_empty() {
                self.chaos |= self.backend.answer(Answer::Positive);
                progress = true;
            }
            if self.store_call.is_some() {
                // A store that grants and holds, up to the user's limits.
                self.store(0);
                progress = true;
            }
            let mut peers = Peers {
                backend: &mut self.backend,
                client_waiting: &mut self.client_waiting,
                client_read: &mut self.client_read,
                matched: &mut self.matched,
                to_client: &mut self.to_client,
                client_eof: self.client_eof,
                client_eof_read: &mut self.client_eof_read,
                backend_eof: self.backend_eof,
                backend_eof_read: &mut self.backend_eof_read,
            };
            match self.relay_pump.step(&mut self.tracker, &mut peers) {
                Pumped::Progress => progress = true,
                Pumped::Stalled => {}
                Pumped::ClientGone(error) => panic!("the model client always reads: {error:?}"),
            }
            self.after_step();
            if !progress {
                return;
            }
        }
        panic!("the relay never settles");
    }

    fn read_client(&mut self, per_read: usize) -> bool {
        let mut progress = false;
        loop {
            if self.client_waiting.is_empty() {
                if self.client_eof && !self.client_eof_read && self.tracker.client_space().is_some()
                {
                    self.client_eof_read = true;
                    self.tracker.client_read(0);
                    progress = true;
                }
                return progress;
            }
            let Some(space) = self.tracker.client_space() else {
                return progress;
            };
            let n = space.len().min(per_read).min(self.client_waiting.len());
            assert!(n > 0, "the tracker offered no room");
            for (slot, byte) in space[..n].iter_mut().zip(self.client_waiting.drain(..n)) {
                *slot = byte;
                self.client_read.push(byte);
            }
            self.tracker.client_read(n);
            progress = true;
            self.check_queues();
        }
    }

    fn read_backend(&mut self, per_read: usize) -> bool {
        let mut progress = false;
        loop {
            if self.backend.outbox.is_empty() {
                if self.backend_eof
                    && !self.backend_eof_read
                    && self.tracker.backend_space().is_some()
                {
                    self.backend_eof_read = true;
                    self.tracker.backend_read(0);
                    progress = true;
                }
                return progress;
            }
            let Some(space) = self.tracker.backend_space() else {
                return progress;
            };
            let n = space.len().min(per_read).min(self.backend.outbox.len());
            assert!(n > 0, "the tracker offered no room");
            space[..n].copy_from_slice(&self.backend.outbox[..n]);
            self.backend.outbox.drain(..n);
            self.tracker.backend_read(n);
            progress = true;
            self.check_queues();
        }
    }

    fn write_backend(&mut self, max: usize) -> bool {
        let pending = self.tracker.to_backend();
        if pending.is_empty() {
            return false;
        }
        let n = if max == 0 {
            pending.len()
        } else {
            max.min(pending.len())
        };
        let bytes = pending[..n].to_vec();
        // A subsequence of what the client sent.
        check_subsequence(&self.client_read, &mut self.matched, &bytes);
        self.backend.receive(&bytes);
        self.tracker.backend_written(n);
        true
    }

    fn write_client(&mut self, max: usize) -> bool {
        let pending = self.tracker.to_client();
        if pending.is_empty() {
            return false;
        }
        let n = if max == 0 {
            pending.len()
        } else {
            max.min(pending.len())
        };
        self.to_client.extend_from_slice(&pending[..n]);
        self.tracker.client_written(n);
        true
    }

    fn store(&mut self, answer: u8) {
        let Some(claim) = self.store_call.take() else {
            return;
        };
        let reservation = match answer % 8 {
            0..=3 => Reservation::Granted { held: true },
            4 | 5 => Reservation::Granted { held: false },
            6 => Reservation::Refused(match claim {
                Claim::Message => Limit::MessagesPerUser,
                Claim::Recipient => Limit::RecipientsPerUser,
            }),
            _ => Reservation::Refused(Limit::StoreUnavailable),
        };
        let late = self.tracker.wants_reservation().is_none();
        if let Reservation::Granted { held } = reservation {
            let (slot, late_slot, queue) = match claim {
                Claim::Message => (
                    &mut self.granted.message,
                    &mut self.late_grants.message,
                    &mut self.backend.grants_message,
                ),
                Claim::Recipient => (
                    &mut self.granted.recipients,
                    &mut self.late_grants.recipients,
                    &mut self.backend.grants_recipient,
                ),
            };
            *slot += u64::from(held);
            if late {
                *late_slot += u64::from(held);
            }
            queue.push_back(held);
        }
        self.tracker.on_reservation(reservation);
    }

    /// What the driver does after every step: takes notices, asks the store.
    fn after_step(&mut self) {
        while let Some(notice) = self.tracker.next_notice() {
            match notice {
                Notice::Event(event) => self.events.push(event),
                Notice::Release {
                    messages,
                    recipients,
                } => {
                    self.released.message += u64::from(messages);
                    self.released.recipients += u64::from(recipients);
                    assert!(
                        self.released.message <= self.granted.message
                            && self.released.recipients <= self.granted.recipients,
                        "gave back {:?}, but only {:?} were reserved",
                        self.released,
                        self.granted
                    );
                }
            }
        }
        if self.store_call.is_none() && !self.over() {
            self.store_call = self.tracker.wants_reservation();
        }
        if self.tracker.backend_abandoned() {
            self.backend.cut = true;
        }
        self.check_queues();
        if !self.chaos {
            if let Some(at) = self.backend.said_goodbye_at {
                assert_eq!(
                    self.backend.received.len(),
                    at,
                    "bytes reached the backend after it accepted QUIT"
                );
            }
            for hidden in [&b"STARTTLS\r\n"[..], b"GSSAPI-HOSTILE", b"XCLIENT NAME"] {
                assert!(
                    find(&self.to_client, hidden).is_none(),
                    "the client was offered {:?}",
                    String::from_utf8_lossy(hidden)
                );
            }
        }
    }

    fn check_queues(&mut self) {
        let (b, c) = (
            self.tracker.to_backend().len(),
            self.tracker.to_client().len(),
        );
        assert!(b <= QUEUE_BOUND, "to_backend holds {b} octets");
        assert!(c <= QUEUE_BOUND, "to_client holds {c} octets");
    }

    /// Ends the session as the relay does, and checks the slots.
    pub fn finish(&mut self) {
        assert!(!self.finished);
        self.finished = true;
        self.tracker.finish();
        self.after_step();
        if !self.chaos {
            let kept = Slots {
                message: self.granted.message - self.released.message,
                recipients: self.granted.recipients - self.released.recipients,
            };
            let allowed = self.backend.kept;
            assert!(
                kept.message <= allowed.message && kept.recipients <= allowed.recipients,
                "postern kept {kept:?} of {:?} reserved slots; the backend accepted messages \
                 holding only {:?}",
                self.granted,
                self.backend.kept
            );
        }
    }

    /// Bytes written to the model backend behind postern's back, to test the model.
    pub fn backend_receive_for_test(&mut self, bytes: &[u8]) {
        self.backend.receive(bytes);
    }

    /// The client's view: every reply it got, as text.
    pub fn client_text(&self) -> String {
        String::from_utf8_lossy(&self.to_client).into_owned()
    }
}
