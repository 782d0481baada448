//! The relay's schedule, sans-IO: in what order bytes move between the two connections
//! and the [`Tracker`]'s buffers, and what a failed or finished side means.
//!
//! [`Pump::step`] moves everything that can move once, through a [`Sides`] that the
//! async shell implements over its sockets (`relay.rs`, where "would block" is a
//! registered wake-up) and tests implement over byte vectors. The rules of what may
//! move live in the tracker; this is only the order, so that tests and fuzz targets
//! run the same order as production.

use std::io;

use super::tracker::Tracker;

/// What one operation on a side came to.
#[derive(Debug)]
pub enum Io {
    /// Done; for reads and writes, with this many bytes (a read of 0 is the end).
    Done(usize),
    /// Not possible now; the side will say when (the shell registered a wake-up).
    WouldBlock,
    Failed(io::Error),
}

/// The two connections, as the pump uses them.
pub trait Sides {
    fn write_backend(&mut self, bytes: &[u8]) -> Io;
    fn flush_backend(&mut self) -> Io;
    fn shutdown_backend(&mut self) -> Io;
    fn write_client(&mut self, bytes: &[u8]) -> Io;
    fn flush_client(&mut self) -> Io;
    fn read_client(&mut self, into: &mut [u8]) -> Io;
    fn read_backend(&mut self, into: &mut [u8]) -> Io;
}

/// What one [`Pump::step`] came to.
#[derive(Debug)]
pub enum Pumped {
    /// Bytes moved or a side changed state: step again.
    Progress,
    /// Nothing could move.
    Stalled,
    /// The client connection failed or closed for writing: the session is over.
    ClientGone(Option<io::Error>),
}

/// The largest write: below the loopback MSS (65,483 octets with TCP timestamps), where
/// a sidecar's backend sits. A write past the MSS leaves a tail that travels as a
/// segment of its own, at the cost of a whole one. A queue can hold up to about twice
/// [`MAX_BUFFER`](super::tracker::MAX_BUFFER): a read into a full buffer adds to what
/// waits.
const MAX_WRITE: usize = 60 * 1024;

/// The front of a queue that one write may carry.
fn at_most_one_write(pending: &[u8]) -> &[u8] {
    &pending[..pending.len().min(MAX_WRITE)]
}

/// The flushing and closing state of the two connections between steps.
#[derive(Debug, Default)]
pub struct Pump {
    backend_shut: bool,
    backend_unflushed: bool,
    client_unflushed: bool,
    /// Bytes written to the backend and to the client since [`Pump::take_moved`].
    moved: (usize, usize),
}

impl Pump {
    /// Moves what can move now: client bytes to the backend first (so a command reaches
    /// the backend before its reply is awaited), then the backend's and postern's
    /// replies to the client, then reads, each only while the tracker offers room.
    pub fn step(&mut self, tracker: &mut Tracker, sides: &mut impl Sides) -> Pumped {
        let mut progress = false;

        while !tracker.to_backend().is_empty() {
            match sides.write_backend(at_most_one_write(tracker.to_backend())) {
                Io::Done(n) if n > 0 => {
                    self.moved.0 += n;
                    tracker.backend_written(n);
                    self.backend_unflushed = true;
                    progress = true;
                }
                Io::WouldBlock => break,
                // The backend is gone for writing; what it said before still goes to
                // the client.
                Io::Done(_) | Io::Failed(_) => {
                    tracker.backend_write_failed();
                    progress = true;
                }
            }
        }
        if self.backend_unflushed && tracker.to_backend().is_empty() {
            match sides.flush_backend() {
                Io::WouldBlock => {}
                Io::Done(_) => {
                    self.backend_unflushed = false;
                    progress = true;
                }
                Io::Failed(_) => {
                    self.backend_unflushed = false;
                    tracker.backend_write_failed();
                    progress = true;
                }
            }
        }
        if tracker.backend_done()
            && !self.backend_shut
            && !self.backend_unflushed
            && !matches!(sides.shutdown_backend(), Io::WouldBlock)
        {
            self.backend_shut = true;
            progress = true;
        }

        while !tracker.to_client().is_empty() {
            match sides.write_client(at_most_one_write(tracker.to_client())) {
                Io::Done(n) if n > 0 => {
                    self.moved.1 += n;
                    tracker.client_written(n);
                    self.client_unflushed = true;
                    progress = true;
                }
                Io::Done(_) => return Pumped::ClientGone(None),
                Io::Failed(error) => return Pumped::ClientGone(Some(error)),
                Io::WouldBlock => break,
            }
        }
        // Once the session is done, the shell's close sends what is queued together with
        // TLS's close_notify: one write where a flush would make two.
        if self.client_unflushed && tracker.to_client().is_empty() && !tracker.is_done() {
            match sides.flush_client() {
                Io::WouldBlock => {}
                Io::Done(_) => {
                    self.client_unflushed = false;
                    progress = true;
                }
                Io::Failed(error) => return Pumped::ClientGone(Some(error)),
            }
        }

        // A read that fills the room it was given has likely left more behind (in the
        // TLS stream's plaintext, or in the socket): read on while reads fill, so that
        // one write carries what arrived. A 20 KB message read into the first 512-byte
        // buffer otherwise left in six writes. The tracker's room ends the loop.
        while let Some(space) = tracker.client_space() {
            let room = space.len();
            match sides.read_client(space) {
                Io::Done(n) => {
                    tracker.client_read(n);
                    progress = true;
                    if n < room {
                        break;
                    }
                }
                // A TLS client that drops TCP without close_notify has still ended.
                Io::Failed(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                    tracker.client_read(0);
                    progress = true;
                    break;
                }
                Io::Failed(error) => return Pumped::ClientGone(Some(error)),
                Io::WouldBlock => break,
            }
        }
        while let Some(space) = tracker.backend_space() {
            let room = space.len();
            match sides.read_backend(space) {
                Io::Done(n) => {
                    tracker.backend_read(n);
                    progress = true;
                    if n < room {
                        break;
                    }
                }
                // A reset after the backend's last words: they were read before it.
                Io::Failed(_) => {
                    tracker.backend_read(0);
                    progress = true;
                    break;
                }
                Io::WouldBlock => break,
            }
        }

        if progress {
            Pumped::Progress
        } else {
            Pumped::Stalled
        }
    }

    /// Bytes written to the backend and to the client since the last call, including
    /// those of a step that ended the session.
    pub fn take_moved(&mut self) -> (usize, usize) {
        std::mem::take(&mut self.moved)
    }

    /// Whether the backend's write side was shut down.
    pub fn backend_shut(&self) -> bool {
        self.backend_shut
    }
}
