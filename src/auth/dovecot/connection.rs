//! One client connection to Dovecot's auth service, sans-IO: the handshake, then any
//! number of SASL requests at once, each under its own id (protocol document: "ID is a
//! connection-specific unique request identifier").
//!
//! The caller writes the bytes this returns and feeds back the bytes it reads; the
//! connection says which request each reply belongs to. Every request carries a token
//! of the caller's choosing (the async client uses a channel to the waiting exchange),
//! handed back with the reply it waited for, so a reply can never reach the wrong
//! exchange.
//!
//! A request is in one of two states: waiting for Dovecot (after `AUTH` or `CONT`) or
//! waiting for the SMTP client (after a `CONT` challenge). Dovecot never sends two
//! replies in a row for one request, so a reply to a request in the second state, or
//! to an id never issued, breaks the connection. A reply to an id that was issued and
//! has since been cancelled or abandoned is dropped, as Dovecot's own client does
//! (`auth_server_lookup_request`): it can be the late answer to a request that timed
//! out.

use std::collections::HashMap;
use std::fmt;

use super::protocol::{
    self, AuthRequest, ClientInfo, Handshake, HandshakeParser, LineBuffer, ProtocolError, Reply,
};

/// Why a request could not be sent. Nothing was written, and the connection is as it
/// was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// The handshake has not finished yet.
    NotReady,
    /// The connection is closed or broken; open another one.
    Closed,
    /// The mechanism is not one the handshake lists as usable over TLS. (Sending it
    /// anyway would make Dovecot drop the connection, with every request on it.)
    MechanismNotOffered,
    /// The line would be longer than [`protocol::MAX_LINE`].
    TooLong,
    /// Every `u32` id has been used on this connection; open another one.
    IdsExhausted,
    /// `respond` for a request that is not waiting for the client (a caller bug).
    NotChallenged,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::NotReady => f.write_str("handshake not finished"),
            RequestError::Closed => f.write_str("connection closed"),
            RequestError::MechanismNotOffered => f.write_str("mechanism not offered"),
            RequestError::TooLong => write!(f, "{}", protocol::LineTooLong),
            RequestError::IdsExhausted => f.write_str("request ids exhausted"),
            RequestError::NotChallenged => f.write_str("request is not waiting for a response"),
        }
    }
}

impl std::error::Error for RequestError {}

impl From<protocol::LineTooLong> for RequestError {
    fn from(_: protocol::LineTooLong) -> Self {
        RequestError::TooLong
    }
}

/// Something the connection learned from the bytes it was fed.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<T> {
    /// The handshake is complete: see [`Connection::handshake`].
    Ready,
    /// Dovecot answered request `id`; `token` is the one given with the request.
    Reply { reply: Reply, token: T },
}

/// The state of one connection.
#[derive(Debug)]
pub struct Connection<T> {
    lines: LineBuffer,
    phase: Phase,
    /// The id the next request gets; every id below it has been issued.
    next_id: u32,
    requests: HashMap<u32, Request<T>>,
}

#[derive(Debug)]
enum Phase {
    Handshake(HandshakeParser),
    Ready(Handshake),
    /// Closed by the caller, or broken by this error.
    Closed(Option<ProtocolError>),
}

#[derive(Debug)]
enum Request<T> {
    /// Sent to Dovecot; the token waits for its reply.
    Waiting(T),
    /// Dovecot sent a challenge; the client's response is due.
    Challenged,
}

impl<T> Default for Connection<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Connection<T> {
    /// A connection that has just been opened. Send [`protocol::client_handshake`]
    /// first (Dovecot 2.4 waits for it before listing mechanisms).
    pub fn new() -> Self {
        Connection {
            lines: LineBuffer::new(),
            phase: Phase::Handshake(HandshakeParser::new()),
            next_id: 1,
            requests: HashMap::new(),
        }
    }

    /// Bytes read from Dovecot; [`poll`](Self::poll) until it returns `Ok(None)`.
    pub fn receive(&mut self, bytes: &[u8]) {
        if !matches!(self.phase, Phase::Closed(_)) {
            self.lines.extend(bytes);
        }
    }

    /// The next event from what was received. After an error the connection is broken:
    /// every later call returns the same error, and the caller should drop it (and the
    /// tokens, through [`close`](Self::close)).
    pub fn poll(&mut self) -> Result<Option<Event<T>>, ProtocolError> {
        loop {
            if let Phase::Closed(error) = &self.phase {
                return match error {
                    Some(error) => Err(error.clone()),
                    None => Ok(None),
                };
            }
            let line = match self.lines.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => return Ok(None),
                Err(error) => return Err(self.broken(error)),
            };
            let result = if let Phase::Handshake(parser) = &mut self.phase {
                match parser.line(&line) {
                    Ok(Some(handshake)) => {
                        self.phase = Phase::Ready(handshake);
                        return Ok(Some(Event::Ready));
                    }
                    Ok(None) => continue,
                    Err(error) => Err(error),
                }
            } else {
                Reply::parse(&line).and_then(|reply| self.deliver(reply))
            };
            match result {
                Ok(Some(event)) => return Ok(Some(event)),
                Ok(None) => continue,
                Err(error) => return Err(self.broken(error)),
            }
        }
    }

    /// Matches a reply to its request.
    fn deliver(&mut self, reply: Reply) -> Result<Option<Event<T>>, ProtocolError> {
        let id = reply.id();
        match self.requests.remove(&id) {
            Some(Request::Waiting(token)) => {
                if matches!(reply, Reply::Cont { .. }) {
                    self.requests.insert(id, Request::Challenged);
                }
                Ok(Some(Event::Reply { reply, token }))
            }
            Some(Request::Challenged) => Err(ProtocolError::Unexpected(id)),
            // Issued, then cancelled or abandoned: a late answer, dropped.
            None if id != 0 && id < self.next_id => Ok(None),
            None => Err(ProtocolError::UnknownId(id)),
        }
    }

    fn broken(&mut self, error: ProtocolError) -> ProtocolError {
        self.phase = Phase::Closed(Some(error.clone()));
        error
    }

    /// The server's handshake, once [`Event::Ready`] has been returned.
    pub fn handshake(&self) -> Option<&Handshake> {
        match &self.phase {
            Phase::Ready(handshake) => Some(handshake),
            Phase::Handshake(_) | Phase::Closed(_) => None,
        }
    }

    /// Whether requests can still be sent.
    pub fn is_open(&self) -> bool {
        !matches!(self.phase, Phase::Closed(_))
    }

    /// Requests in progress (waiting for Dovecot or for the client).
    pub fn in_progress(&self) -> usize {
        self.requests.len()
    }

    /// Starts a SASL exchange: returns its id and the `AUTH` line to write. `token`
    /// comes back with Dovecot's reply.
    pub fn start(
        &mut self,
        mechanism: &str,
        initial_response: Option<&[u8]>,
        client: &ClientInfo,
        no_penalty: bool,
        token: T,
    ) -> Result<(u32, Vec<u8>), RequestError> {
        let handshake = match &self.phase {
            Phase::Ready(handshake) => handshake,
            Phase::Handshake(_) => return Err(RequestError::NotReady),
            Phase::Closed(_) => return Err(RequestError::Closed),
        };
        // Dovecot drops the whole connection on an AUTH for a mechanism it does not
        // know ("BUG: ... requested unsupported authentication mechanism"), and the
        // private and anonymous ones are not for SMTP clients.
        let mechanism = handshake
            .find_usable(mechanism)
            .ok_or(RequestError::MechanismNotOffered)?;
        let id = self.next_id;
        let next_id = id.checked_add(1).ok_or(RequestError::IdsExhausted)?;
        let line = protocol::encode_auth(
            &AuthRequest {
                id,
                mechanism: mechanism.name(),
                initial_response,
                no_penalty,
            },
            client,
        )?;
        self.next_id = next_id;
        self.requests.insert(id, Request::Waiting(token));
        Ok((id, line))
    }

    /// The client's answer to request `id`'s challenge: returns the `CONT` line to
    /// write. `token` comes back with Dovecot's reply.
    pub fn respond(&mut self, id: u32, response: &[u8], token: T) -> Result<Vec<u8>, RequestError> {
        if !self.is_open() {
            return Err(RequestError::Closed);
        }
        if !matches!(self.requests.get(&id), Some(Request::Challenged)) {
            return Err(RequestError::NotChallenged);
        }
        let line = protocol::encode_cont(id, response)?;
        self.requests.insert(id, Request::Waiting(token));
        Ok(line)
    }

    /// Forgets request `id` and returns the `CANCEL` line to tell Dovecot, if the
    /// request was in progress. A reply that still arrives for it is dropped.
    pub fn cancel(&mut self, id: u32) -> Option<Vec<u8>> {
        self.requests.remove(&id)?;
        self.is_open().then(|| protocol::encode_cancel(id))
    }

    /// Closes the connection: returns the tokens of every request waiting for Dovecot,
    /// which will never get a reply now.
    pub fn close(&mut self) -> Vec<T> {
        if let Phase::Handshake(_) | Phase::Ready(_) = self.phase {
            self.phase = Phase::Closed(None);
        }
        self.requests
            .drain()
            .filter_map(|(_, request)| match request {
                Request::Waiting(token) => Some(token),
                Request::Challenged => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::dovecot::protocol::Step;

    const HANDSHAKE: &[u8] = b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n\
MECH\tCRAM-MD5\tdictionary\tactive\nMECH\tAPOP\tprivate\nMECH\tANONYMOUS\tanonymous\n\
SPID\t1\nCUID\t1\nCOOKIE\t00\nDONE\n";

    fn ready() -> Connection<&'static str> {
        let mut connection = Connection::new();
        connection.receive(HANDSHAKE);
        assert_eq!(connection.poll(), Ok(Some(Event::Ready)));
        assert_eq!(connection.poll(), Ok(None));
        connection
    }

    fn text(line: &[u8]) -> String {
        String::from_utf8_lossy(line).into_owned()
    }

    /// Feeds one server line and returns the single event it makes.
    fn reply(connection: &mut Connection<&'static str>, line: &str) -> (Step, &'static str) {
        connection.receive(line.as_bytes());
        match connection.poll() {
            Ok(Some(Event::Reply { reply, token })) => (reply.into_step(), token),
            other => panic!("{line:?}: {other:?}"),
        }
    }

    #[test]
    fn login_transcript() {
        let mut c = ready();
        let (id, line) = c
            .start("login", None, &ClientInfo::default(), false, "t1")
            .unwrap();
        assert_eq!(id, 1);
        assert_eq!(text(&line), "AUTH\t1\tLOGIN\tservice=smtp\tsecured=tls\n");
        assert_eq!(
            reply(&mut c, "CONT\t1\tVXNlcm5hbWU6\n"),
            (Step::Challenge(b"Username:".to_vec()), "t1")
        );
        assert_eq!(
            text(&c.respond(1, b"alice", "t2").unwrap()),
            "CONT\t1\tYWxpY2U=\n"
        );
        assert_eq!(
            reply(&mut c, "CONT\t1\tUGFzc3dvcmQ6\n"),
            (Step::Challenge(b"Password:".to_vec()), "t2")
        );
        c.respond(1, b"secret", "t3").unwrap();
        assert_eq!(
            reply(&mut c, "OK\t1\tuser=alice\n"),
            (
                Step::Success {
                    user: "alice".into()
                },
                "t3"
            )
        );
        assert_eq!(c.in_progress(), 0);
        // The connection carries the next request under a new id.
        let (id, _) = c
            .start(
                "PLAIN",
                Some(b"\0a\0b"),
                &ClientInfo::default(),
                false,
                "t4",
            )
            .unwrap();
        assert_eq!(id, 2);
    }

    #[test]
    fn concurrent_requests_get_their_own_replies_in_any_order() {
        let mut c = ready();
        let client = ClientInfo::default();
        let (a, _) = c
            .start("PLAIN", Some(b"\0a\0x"), &client, false, "a")
            .unwrap();
        let (b, _) = c
            .start("PLAIN", Some(b"\0b\0y"), &client, false, "b")
            .unwrap();
        let (d, _) = c.start("CRAM-MD5", None, &client, false, "d").unwrap();
        assert_eq!((a, b, d), (1, 2, 3));
        // All three replies in one read, out of order.
        c.receive(b"CONT\t3\tPDE+\nFAIL\t2\tuser=b\nOK\t1\tuser=a\n");
        let mut got = Vec::new();
        while let Some(Event::Reply { reply, token }) = c.poll().unwrap() {
            got.push((reply.id(), token));
        }
        assert_eq!(got, [(3, "d"), (2, "b"), (1, "a")]);
        assert_eq!(c.in_progress(), 1);
    }

    #[test]
    fn refuses_mechanisms_not_usable_over_tls_without_sending_anything() {
        let mut c = ready();
        for mechanism in ["APOP", "ANONYMOUS", "DIGEST-MD5", "", "PLAIN\tx"] {
            assert_eq!(
                c.start(mechanism, None, &ClientInfo::default(), false, "t"),
                Err(RequestError::MechanismNotOffered),
                "{mechanism:?}"
            );
        }
        assert_eq!(c.in_progress(), 0);
        // No id was used up.
        let (id, _) = c
            .start("PLAIN", None, &ClientInfo::default(), false, "t")
            .unwrap();
        assert_eq!(id, 1);
    }

    #[test]
    fn requests_before_the_handshake_or_after_close_are_refused() {
        let mut c: Connection<()> = Connection::new();
        c.receive(&HANDSHAKE[..20]);
        assert_eq!(c.poll(), Ok(None));
        assert_eq!(
            c.start("PLAIN", None, &ClientInfo::default(), false, ()),
            Err(RequestError::NotReady)
        );
        let mut c = ready();
        c.start("PLAIN", None, &ClientInfo::default(), false, "waiting")
            .unwrap();
        assert_eq!(c.close(), ["waiting"]);
        assert!(!c.is_open());
        assert_eq!(
            c.start("PLAIN", None, &ClientInfo::default(), false, "t"),
            Err(RequestError::Closed)
        );
        assert_eq!(c.poll(), Ok(None));
    }

    #[test]
    fn respond_only_after_a_challenge() {
        let mut c = ready();
        let (id, _) = c
            .start("LOGIN", None, &ClientInfo::default(), false, "t")
            .unwrap();
        assert_eq!(c.respond(id, b"x", "u"), Err(RequestError::NotChallenged));
        assert_eq!(c.respond(99, b"x", "u"), Err(RequestError::NotChallenged));
        reply(&mut c, "CONT\t1\t\n");
        assert_eq!(
            c.respond(id, &vec![0; protocol::MAX_LINE], "u"),
            Err(RequestError::TooLong)
        );
        // Still challenged: a shorter answer goes through.
        assert!(c.respond(id, b"x", "u").is_ok());
    }

    #[test]
    fn late_replies_to_cancelled_requests_are_dropped() {
        let mut c = ready();
        let (id, _) = c
            .start("LOGIN", None, &ClientInfo::default(), false, "t")
            .unwrap();
        assert_eq!(c.cancel(id).map(|l| text(&l)), Some("CANCEL\t1\n".into()));
        assert_eq!(c.cancel(id), None);
        c.receive(b"FAIL\t1\treason=Authentication request timed out\n");
        assert_eq!(c.poll(), Ok(None));
        assert!(c.is_open());
    }

    #[test]
    fn wrong_ids_break_the_connection() {
        for (name, line, error) in [
            (
                "never issued",
                "OK\t2\tuser=x\n",
                ProtocolError::UnknownId(2),
            ),
            ("id 0", "FAIL\t0\n", ProtocolError::UnknownId(0)),
            (
                "far future",
                "OK\t4294967295\tuser=x\n",
                ProtocolError::UnknownId(u32::MAX),
            ),
        ] {
            let mut c = ready();
            c.start("PLAIN", None, &ClientInfo::default(), false, "t")
                .unwrap();
            c.receive(line.as_bytes());
            assert_eq!(c.poll(), Err(error.clone()), "{name}");
            // Broken for good, and the waiting token is handed back.
            assert_eq!(c.poll(), Err(error), "{name}");
            assert!(!c.is_open());
            assert_eq!(c.close(), ["t"], "{name}");
        }
    }

    #[test]
    fn a_second_reply_while_waiting_for_the_client_breaks_the_connection() {
        let mut c = ready();
        c.start("LOGIN", None, &ClientInfo::default(), false, "t")
            .unwrap();
        reply(&mut c, "CONT\t1\tVXNlcm5hbWU6\n");
        c.receive(b"OK\t1\tuser=alice\n");
        assert_eq!(c.poll(), Err(ProtocolError::Unexpected(1)));
    }

    #[test]
    fn hostile_lines_after_the_handshake() {
        for (name, wire, error) in [
            ("unknown reply", &b"DONE\n"[..], ProtocolError::UnknownReply),
            ("NUL", b"OK\t1\tuser=a\0b\n", ProtocolError::Nul),
            ("garbage", b"\xff\xfe\n", ProtocolError::UnknownReply),
        ] {
            let mut c = ready();
            c.start("PLAIN", None, &ClientInfo::default(), false, "t")
                .unwrap();
            c.receive(wire);
            assert_eq!(c.poll(), Err(error), "{name}");
        }
        let mut c = ready();
        c.receive(&vec![b'A'; protocol::MAX_LINE]);
        assert_eq!(c.poll(), Err(ProtocolError::LineTooLong));
    }

    #[test]
    fn replies_split_at_every_byte() {
        let wire = b"CONT\t1\tVXNlcm5hbWU6\n";
        for cut in 0..wire.len() {
            let mut c = ready();
            c.start("LOGIN", None, &ClientInfo::default(), false, "t")
                .unwrap();
            c.receive(&wire[..cut]);
            assert_eq!(c.poll(), Ok(None), "cut {cut}");
            c.receive(&wire[cut..]);
            assert!(
                matches!(c.poll(), Ok(Some(Event::Reply { token: "t", .. }))),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn handshake_and_first_reply_in_one_read() {
        let mut c: Connection<&str> = Connection::new();
        c.receive(&[HANDSHAKE, b"FAIL\t1\n"].concat());
        assert_eq!(c.poll(), Ok(Some(Event::Ready)));
        // A reply before any request was sent: an id never issued.
        assert_eq!(c.poll(), Err(ProtocolError::UnknownId(1)));
    }
}
