//! The relayed session, sans-IO: [`Tracker`] owns both directions' buffers, feeds them
//! through the SMTP [`Rules`], and tells its driver what to write, what to read and
//! when to close, as rustls' `Connection` does (`read_tls` / `process_new_packets` /
//! `write_tls` / `wants_read`). The driver ([`super::relay`]) only moves bytes and
//! talks to the limits store; the tests and the fuzz target drive this same type.
//!
//! Each direction moves on its own: bytes from the client wait in `to_backend` until
//! the backend takes them, replies wait in `to_client` until the client does, and a
//! side is read only while what it sends has room on the other side. A side that
//! stops reading therefore stalls only what is sent to it.

use std::collections::VecDeque;
use std::ops::Range;

pub use super::rules::{
    Claim, Event, Limit, Limits, MAX_CHUNK, MAX_EHLO_REPLY, MAX_PENDING, Reservation, Settings,
    Usage, Wants, chunk_limit,
};
use super::rules::{Op, Output, Rules};
use crate::copy::copy_pieces;

/// A read buffer starts this small, so an idle session costs little memory (nginx's
/// mail proxy holds ~24 KiB per idle session; tokio's copy_bidirectional 128 KiB): a
/// pipelined MAIL, RCPT and DATA fit, and a read that fills it doubles it...
pub const MIN_BUFFER: usize = 512;
/// ...and doubles up to this while reads fill it, so bulk DATA moves in few syscalls
/// and TLS records are full. A side is read only while what waits to be written to the
/// other is below it, so a queue holds at most about twice this; the pump caps each
/// write below the loopback MSS (65,483 octets with TCP timestamps on a 64 KiB MTU),
/// where a sidecar's backend sits. A 64 KiB buffer, whose writes crossed the MSS and
/// left a tail of a few octets as a segment of its own, cost a fifth of the relay's CPU
/// per MB (benches/README.md).
pub const MAX_BUFFER: usize = 32 * 1024;

/// Something for the driver to count, log or tell the limits store, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    Event(Event),
    /// Give slots back to the limits store.
    Release {
        messages: u32,
        recipients: u32,
    },
}

/// The relayed session's state and buffers.
#[derive(Debug)]
pub struct Tracker {
    rules: Rules,
    scratch: Output,
    from_client: InBuffer,
    from_backend: InBuffer,
    to_client: OutQueue,
    to_backend: OutQueue,
    notices: VecDeque<Notice>,
    client_eof: bool,
    backend_eof: bool,
    /// postern cut the backend off mid-message: nothing more is written to it or read
    /// from it.
    backend_abandoned: bool,
    /// A write to the backend failed: nothing more is written to it, but what it sent
    /// before (a 552 before it hung up) is still read and passed on.
    backend_write_failed: bool,
    /// postern's closing reply is queued: once it is written, the session ends.
    closing: bool,
    finished: bool,
    /// Bytes written to the backend.
    delivered: u64,
}

impl Tracker {
    /// A session whose client pipelined `client_pending` behind its AUTH, and whose
    /// backend sent `backend_pending` after the EHLO postern replayed.
    pub fn new(settings: Settings, client_pending: &[u8], backend_pending: &[u8]) -> Self {
        let mut tracker = Tracker {
            rules: Rules::new(settings),
            scratch: Output::default(),
            from_client: InBuffer::new(client_pending),
            from_backend: InBuffer::new(backend_pending),
            to_client: OutQueue::default(),
            to_backend: OutQueue::default(),
            notices: VecDeque::new(),
            client_eof: false,
            backend_eof: false,
            backend_abandoned: false,
            backend_write_failed: false,
            closing: false,
            finished: false,
            delivered: 0,
        };
        tracker.process();
        tracker
    }

    /// Room for bytes from the client, or `None` when none may be read now (the backend
    /// has not taken what was sent, or the read-ahead buffer is full). Bytes are read
    /// ahead while the rules wait for the backend, so what the client pipelined is
    /// there to be read in order the moment the backend answers.
    pub fn client_space(&mut self) -> Option<&mut [u8]> {
        // A client that sends commands postern answers itself and never reads the
        // answers would otherwise grow `to_client` without bound.
        let wanted = !self.client_eof
            && !self.closing
            && !self.backend_write_failed
            && self.to_backend.len() < MAX_BUFFER
            && self.to_client.len() < MAX_BUFFER;
        if wanted {
            self.from_client.space()
        } else {
            None
        }
    }

    /// `n` bytes were read into [`Tracker::client_space`]; 0 means the client closed.
    pub fn client_read(&mut self, n: usize) {
        if n == 0 {
            self.client_eof = true;
        } else {
            self.from_client.filled(n);
        }
        self.process();
    }

    /// Room for bytes from the backend, or `None` when none may be read now.
    pub fn backend_space(&mut self) -> Option<&mut [u8]> {
        let wanted = !self.backend_eof
            && !self.backend_abandoned
            && !self.closing
            && !self.rules.has_ended()
            && self.to_client.len() < MAX_BUFFER;
        if wanted {
            self.from_backend.space()
        } else {
            None
        }
    }

    /// `n` bytes were read into [`Tracker::backend_space`]; 0 means the backend closed.
    pub fn backend_read(&mut self, n: usize) {
        if n == 0 {
            self.backend_eof = true;
        } else {
            self.from_backend.filled(n);
        }
        self.process();
    }

    /// Writing to the backend failed (it hung up or reset): what it already sent is
    /// still relayed, nothing more goes to it.
    pub fn backend_write_failed(&mut self) {
        self.backend_write_failed = true;
        self.to_backend.clear();
    }

    /// What the limits store must answer before the client's next command can go on.
    pub fn wants_reservation(&self) -> Option<Claim> {
        match self.rules.wants() {
            Wants::Reservation(claim) if !self.closing && !self.backend_write_failed => Some(claim),
            _ => None,
        }
    }

    /// Whether a reservation was asked for and not answered yet (also once the session
    /// is closing, when [`Tracker::wants_reservation`] no longer asks for new ones).
    pub fn wants_reservation_answer(&self) -> bool {
        matches!(self.rules.wants(), Wants::Reservation(_))
    }

    /// The store's answer to [`Tracker::wants_reservation`].
    pub fn on_reservation(&mut self, reservation: Reservation) {
        self.rules.on_reservation(reservation);
        self.process();
    }

    /// Bytes to write to the backend next.
    pub fn to_backend(&self) -> &[u8] {
        self.to_backend.pending()
    }

    pub fn backend_written(&mut self, n: usize) {
        self.to_backend.written(n);
        self.delivered += n as u64;
        if self.to_backend.is_empty() {
            // Room again for the client's bytes that were waiting in the kernel.
            self.process();
        }
    }

    /// Bytes to write to the client next.
    pub fn to_client(&self) -> &[u8] {
        self.to_client.pending()
    }

    pub fn client_written(&mut self, n: usize) {
        self.to_client.written(n);
        if self.to_client.is_empty() {
            self.process();
        }
    }

    /// The next thing to count, log or give back to the store.
    pub fn next_notice(&mut self) -> Option<Notice> {
        self.notices.pop_front()
    }

    /// Whether the backend's write side should be shut down now: postern cut it off
    /// mid-message (so it drops the message), or the client closed and everything it
    /// sent that may pass has been written. An unfinished command line at the client's
    /// EOF is never forwarded: a line without its CRLF is no command, and unchecked it
    /// could carry commands separated by bare LF past every rule.
    pub fn backend_done(&self) -> bool {
        self.backend_abandoned
            || self.backend_write_failed
            || (self.client_eof && self.rules.wants() == Wants::Input && self.to_backend.is_empty())
    }

    /// Whether the session ends while the client may still be sending (postern refused
    /// it, the backend answered QUIT, or it hung up, perhaps mid-body): its bytes should be read and
    /// dropped for a moment after the close, so that the last reply is not lost to a
    /// reset. Whether a write to the closed backend failed yet is a race, so a backend
    /// hang-up counts whether or not one did.
    pub fn ends_with_client_sending(&self) -> bool {
        !self.client_eof
            && (self.closing
                || self.rules.has_ended()
                || self.backend_eof
                || self.backend_write_failed
                || self.backend_abandoned)
    }

    /// Whether postern ended the session with a closing reply of its own.
    pub fn closed_by_postern(&self) -> bool {
        self.closing
    }

    /// Whether the backend should be read no more and closed at once (postern cut it).
    pub fn backend_abandoned(&self) -> bool {
        self.backend_abandoned
    }

    /// Whether the session is over once `to_client` is written: postern sent its
    /// closing reply, the backend answered QUIT or closed (nothing the client sends
    /// could be delivered), or the client closed after postern cut the backend off.
    pub fn is_done(&self) -> bool {
        self.closing
            || self.rules.has_ended()
            || self.backend_eof
            || (self.client_eof && (self.backend_abandoned || self.rules.is_closed()))
    }

    /// The session ends: what is still held or reserved in the limits store is given
    /// back (the open transaction was never completed). Call once.
    pub fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        self.rules.finish(&mut out, self.delivered);
        self.apply(&out, Side::Client, Forwarding::Copied);
        self.scratch = out;
    }

    /// Lets the rules take everything they can, until nothing moves.
    fn process(&mut self) {
        loop {
            let mut progress = false;
            if !self.from_backend.is_empty() && !self.backend_abandoned && !self.closing {
                let mut out = std::mem::take(&mut self.scratch);
                out.clear();
                let taken = self.rules.backend_bytes(self.from_backend.data(), &mut out);
                progress |= taken > 0 || !out.ops.is_empty();
                self.apply(&out, Side::Backend, Forwarding::Copied);
                self.from_backend.consume(taken);
                self.scratch = out;
            }
            let client_ready = !self.from_client.is_empty()
                && !self.closing
                && !self.backend_write_failed
                && self.rules.wants() == Wants::Input;
            if client_ready {
                let mut out = std::mem::take(&mut self.scratch);
                out.clear();
                let taken = self.rules.client_bytes(self.from_client.data(), &mut out);
                progress |= taken > 0
                    || !out.ops.is_empty()
                    || matches!(self.rules.wants(), Wants::Reservation(_));
                match self.handover(&out) {
                    Some(forward) => {
                        self.apply(&out, Side::Client, Forwarding::HandedOver);
                        self.from_client
                            .hand_over(forward, taken, &mut self.to_backend);
                    }
                    None => {
                        self.apply(&out, Side::Client, Forwarding::Copied);
                        self.from_client.consume(taken);
                    }
                }
                self.scratch = out;
            }
            if !progress {
                break;
            }
        }
    }

    /// The client bytes `out` forwards, when the read buffer holding them can become the
    /// backend's queue as it is instead of being copied into it: the queue is empty, they
    /// are one range worth a buffer, and nothing in `out` cuts the backend off or closes.
    /// Under bulk DATA this saves a copy of every relayed byte (glibc's `memcpy` can
    /// also be many times slower for some distances between two buffers, which a
    /// long-lived pair of them keeps hitting: benches/README.md).
    fn handover(&self, out: &Output) -> Option<Range<usize>> {
        if !self.to_backend.is_empty()
            || self.backend_abandoned
            || self.backend_write_failed
            || self.closing
        {
            return None;
        }
        let mut forward = None;
        for op in &out.ops {
            match op {
                Op::Forward(range) if forward.is_none() => forward = Some(range.clone()),
                Op::Forward(_) | Op::CloseBackend | Op::Close => return None,
                Op::Reply(_) | Op::Event(_) | Op::Release { .. } => {}
            }
        }
        forward
            .filter(|range| range.len() >= MIN_BUFFER && range.end <= self.from_client.data().len())
    }

    /// Performs one call's ops. `side` is where the rules' input came from; a client
    /// range the read buffer hands over (see [`Tracker::handover`]) is not copied.
    fn apply(&mut self, out: &Output, side: Side, forwarding: Forwarding) {
        for op in &out.ops {
            // After the closing reply nothing more is written, but what is counted or
            // given back to the store still is.
            if self.closing && matches!(op, Op::Forward(_) | Op::Reply(_)) {
                continue;
            }
            match op {
                Op::Forward(range) => {
                    let input = match side {
                        Side::Client => self.from_client.data(),
                        Side::Backend => self.from_backend.data(),
                    };
                    let Some(bytes) = input.get(range.clone()) else {
                        debug_assert!(false, "a forward range outside the input: {range:?}");
                        continue;
                    };
                    match side {
                        Side::Client if self.backend_abandoned || self.backend_write_failed => {}
                        Side::Client if forwarding == Forwarding::HandedOver => {}
                        Side::Client => self.to_backend.push(bytes),
                        Side::Backend => self.to_client.push(bytes),
                    }
                }
                Op::Reply(range) => match out.replies.get(range.clone()) {
                    Some(bytes) => self.to_client.push(bytes),
                    None => debug_assert!(false, "a reply range outside the replies"),
                },
                Op::Event(event) => self.notices.push_back(Notice::Event(*event)),
                Op::Release {
                    messages,
                    recipients,
                } => self.notices.push_back(Notice::Release {
                    messages: *messages,
                    recipients: *recipients,
                }),
                Op::CloseBackend => {
                    self.backend_abandoned = true;
                    self.to_backend.clear();
                }
                Op::Close => self.closing = true,
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Backend,
}

/// How forwarded client bytes reach the backend's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Forwarding {
    Copied,
    /// The read buffer becomes the queue after the ops are performed.
    HandedOver,
}

/// One direction's read buffer: bytes read but not yet taken by the rules sit at
/// `start..end` and are moved to the front before the next read. It grows while reads
/// fill it and shrinks back when it empties after a small read, so an idle session
/// holds [`MIN_BUFFER`] and a bulk one [`MAX_BUFFER`]. A read is small below
/// [`MIN_BUFFER`], not merely short of the space: under bulk a TLS stream hands over
/// whatever plaintext it has, often less than the space, and shrinking then would make
/// every burst climb back up from the smallest size.
#[derive(Debug)]
struct InBuffer {
    bytes: Vec<u8>,
    start: usize,
    end: usize,
    /// The last read filled all the space it was given: traffic is heavy.
    last_read_filled: bool,
    /// The size of the last read.
    last_read: usize,
}

impl InBuffer {
    fn new(initial: &[u8]) -> Self {
        let mut bytes = vec![0; MIN_BUFFER.max(initial.len())];
        bytes[..initial.len()].copy_from_slice(initial);
        InBuffer {
            bytes,
            start: 0,
            end: initial.len(),
            last_read_filled: false,
            last_read: 0,
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
            self.emptied();
        }
    }

    fn emptied(&mut self) {
        self.start = 0;
        self.end = 0;
        if !self.last_read_filled && self.last_read < MIN_BUFFER && self.bytes.len() > MIN_BUFFER {
            self.bytes = vec![0; MIN_BUFFER];
        }
    }

    /// Consumes `taken` bytes, of which `forward` (a range of [`InBuffer::data`]) goes
    /// to the empty `queue` by handing it this buffer whole; the queue's own buffer
    /// becomes this one, with the bytes not taken yet copied to its front.
    fn hand_over(&mut self, forward: Range<usize>, taken: usize, queue: &mut OutQueue) {
        let forward = self.start + forward.start..self.start + forward.end;
        let kept = (self.start + taken).min(self.end)..self.end;
        let size = self.bytes.len().max(kept.len());
        let mut fresh = queue.exchange(std::mem::take(&mut self.bytes), forward);
        if fresh.len() < size {
            // Exactly the size: growing by doubling could allocate past MAX_BUFFER.
            fresh.reserve_exact(size - fresh.len());
            fresh.resize(size, 0);
        }
        fresh[..kept.len()].copy_from_slice(&queue.bytes[kept.clone()]);
        self.bytes = fresh;
        self.start = 0;
        self.end = kept.len();
        if kept.is_empty() {
            self.emptied();
        }
    }

    /// Free space after the data, made by moving the data to the front and growing.
    fn space(&mut self) -> Option<&mut [u8]> {
        if self.start > 0 {
            self.bytes.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.bytes.len() && self.bytes.len() < MAX_BUFFER {
            let grown = (self.bytes.len() * 2).clamp(MIN_BUFFER, MAX_BUFFER);
            self.bytes.resize(grown, 0);
        }
        (self.end < self.bytes.len()).then(|| &mut self.bytes[self.end..])
    }

    fn filled(&mut self, n: usize) {
        self.last_read_filled = self.end + n >= self.bytes.len();
        self.last_read = n;
        self.end = (self.end + n).min(self.bytes.len());
        if self.last_read_filled && self.bytes.len() < MAX_BUFFER {
            // Grow before the next read rather than after a compaction finds it full.
            let grown = (self.bytes.len() * 2).clamp(MIN_BUFFER, MAX_BUFFER);
            self.bytes.resize(grown, 0);
        }
    }
}

/// Bytes waiting to be written to one side: `bytes[sent..end]`. The buffer stays
/// initialized to its full length, so it can become a read buffer (see
/// [`InBuffer::hand_over`]) without being zeroed.
#[derive(Debug, Default)]
struct OutQueue {
    bytes: Vec<u8>,
    sent: usize,
    end: usize,
}

impl OutQueue {
    fn pending(&self) -> &[u8] {
        &self.bytes[self.sent..self.end]
    }

    fn len(&self) -> usize {
        self.end - self.sent
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.is_empty() {
            // Already cleared when its last byte was written; the room it kept stays.
            self.sent = 0;
            self.end = 0;
        }
        let end = self.end + bytes.len();
        if end > self.bytes.len() {
            let grown = end.max(2 * self.bytes.len());
            self.bytes.reserve_exact(grown - self.bytes.len());
            self.bytes.resize(grown, 0);
        }
        copy_pieces(&mut self.bytes[self.end..end], bytes);
        self.end = end;
    }

    /// Takes `full`, whose `pending` range is what to write next, in place of this
    /// empty queue's buffer, which it returns.
    fn exchange(&mut self, full: Vec<u8>, pending: Range<usize>) -> Vec<u8> {
        debug_assert!(self.is_empty(), "a queue handed a buffer while not empty");
        let end = pending.end.min(full.len());
        self.sent = pending.start.min(end);
        self.end = end;
        std::mem::replace(&mut self.bytes, full)
    }

    fn written(&mut self, n: usize) {
        debug_assert!(n <= self.len(), "wrote more than was pending");
        self.sent = (self.sent + n).min(self.end);
        if self.is_empty() {
            self.clear();
        }
    }

    fn clear(&mut self) {
        // What was just sent says whether traffic is heavy: a queue that held a large
        // batch keeps its room for the next one, and the first small batch after a
        // burst (the reply after the body, the next command) gives the room back, so
        // an idle session keeps no burst-sized queue.
        let batch = self.end;
        self.sent = 0;
        self.end = 0;
        let room = self.bytes.capacity();
        if room > MAX_BUFFER || (batch < MIN_BUFFER && room > MIN_BUFFER) {
            self.bytes = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests;
