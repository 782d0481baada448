//! Drives the real [`Session`] from raw client bytes, the way `conn.rs` does, and checks
//! the pre-AUTH invariants after every step, panicking on the first violation.
//!
//! Shared by `tests/it/properties.rs` (proptest) and `fuzz/fuzz_targets/session.rs`
//! (libFuzzer, through `#[path]`), so both check exactly the same rules. It sees only the
//! public API: what the session does is judged from its [`Action`]s and replies, the way
//! a client and the driver would see them, never from its private state.
//!
//! The session owns its input, its line framing and the STARTTLS discard; the driver only
//! hands it bytes ([`Session::receive`]) and performs what [`Session::next_action`]
//! returns: [`Action::StartTls`] is reported done at once, [`Action::Verify`] and
//! [`Action::ConnectBackend`] are answered from an [`Oracle`], [`Action::Close`] and
//! [`Action::Relay`] end the session. To judge each answer against the line that caused
//! it, the checker keeps its own copy of the client's lines ([`LineBuffer`] fed the same
//! bytes): the session must read exactly those lines, one per [`Session::lines_read`]
//! step, and none of those the client pipelined after STARTTLS.

// Each includer uses a different subset.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use postern::session::{Action, ListenerKind, Session, SessionLimits, Verdict};
use postern::smtp::line::MAX_COMMAND_LINE;
use postern::smtp::{Capabilities, LineBuffer, Reply};

/// Answers the driver's questions from fixed lists, cycling through them.
#[derive(Debug, Clone)]
pub struct Oracle {
    verdicts: Vec<Verdict>,
    ready: Vec<bool>,
    next_verdict: usize,
    next_ready: usize,
}

impl Oracle {
    /// Empty lists mean "always Valid" and "always ready".
    pub fn new(verdicts: Vec<Verdict>, ready: Vec<bool>) -> Self {
        Oracle {
            verdicts,
            ready,
            next_verdict: 0,
            next_ready: 0,
        }
    }

    fn verdict(&mut self) -> Verdict {
        let verdict = self
            .verdicts
            .get(self.next_verdict % self.verdicts.len().max(1))
            .copied()
            .unwrap_or(Verdict::Valid);
        self.next_verdict += 1;
        verdict
    }

    fn ready(&mut self) -> bool {
        let ready = self
            .ready
            .get(self.next_ready % self.ready.len().max(1))
            .copied()
            .unwrap_or(true);
        self.next_ready += 1;
        ready
    }
}

/// How the session ended, if it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Closed,
    Relayed,
}

/// Which driver call produced a list of actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Line,
    LineTooLong,
    Verified(Verdict),
    BackendReady(bool),
}

/// The backend capabilities the properties use unless they bring their own.
pub fn default_capabilities() -> Capabilities {
    Capabilities::from_ehlo_reply(
        &[
            "legacy.test",
            "PIPELINING",
            "SIZE 1000",
            "STARTTLS",
            "AUTH LOGIN",
            "XCLIENT ADDR",
            "8BITMIME",
        ]
        .map(String::from),
    )
}

/// Limits without delays; error limits as given.
pub fn limits(max_errors: u32, max_auth_failures: u32) -> SessionLimits {
    SessionLimits {
        max_errors,
        max_auth_failures,
        auth_failure_delay: Duration::ZERO,
        // The properties drive long random sessions; the junk budget has its own tests.
        max_junk_commands: u32::MAX,
    }
}

/// The simulated driver plus the facts the invariants are checked against.
pub struct Driver {
    session: Session,
    kind: ListenerKind,
    lines: LineBuffer,
    oracle: Oracle,
    /// TLS is up: an implicit-TLS listener, or `on_tls_established` was called.
    tls: bool,
    /// A line got `250` to EHLO/HELO since the connection (or TLS) started.
    greeted: bool,
    /// The last reply was `334`: the next line is a SASL response, not a command.
    in_sasl: bool,
    /// Code of the last reply sent, for "235 is followed by Relay".
    last_code: Option<u16>,
    /// The pending backend connection is an anonymous MX hand-off, not an AUTH.
    anonymous: bool,
    /// An MX session's MAIL line, handed to the backend, that the relay must send first.
    handed_line: Option<Vec<u8>>,
    /// Every reply code sent, in order; for callers that want to look at coverage.
    pub codes: Vec<u16>,
    pub end: Option<End>,
}

impl Driver {
    pub fn new(
        kind: ListenerKind,
        capabilities: Capabilities,
        limits: SessionLimits,
        oracle: Oracle,
    ) -> Self {
        let session = Session::new(
            kind,
            "mx.test".into(),
            Arc::new(capabilities),
            Box::new(|| "<1.2@mx.test>".to_owned()),
            limits,
        );
        let mut driver = Driver {
            session,
            kind,
            lines: LineBuffer::new(),
            oracle,
            tls: kind == ListenerKind::ImplicitTls,
            greeted: false,
            in_sasl: false,
            last_code: None,
            anonymous: false,
            handed_line: None,
            codes: Vec::new(),
            end: None,
        };
        let greeting = driver.session.greeting();
        driver.check_reply(&greeting);
        assert_eq!(greeting.code, 220, "greeting");
        driver
    }

    /// Bytes from the client, in whatever chunks the network delivered them.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.end.is_some() {
            return;
        }
        self.session.receive(bytes);
        self.lines.extend(bytes);
        self.pump(None);
    }

    /// Takes every action the session has ready, judging each line's answer as a whole:
    /// a batch is what one line (or one outcome, `outcome`) produced, up to an action
    /// that needs the driver to act before the session can go on.
    fn pump(&mut self, outcome: Option<Origin>) {
        let mut origin = outcome;
        let mut batch = Vec::new();
        let mut line: Option<Vec<u8>> = None;
        loop {
            let before = self.session.lines_read();
            let action = self.session.next_action();
            let read = self.session.lines_read() - before;
            assert!(read <= 1, "more than one line read for one action");
            if (action.is_none() || read == 1) && !batch.is_empty() {
                self.judge(line.take(), std::mem::take(&mut batch), origin.take());
            }
            let Some(action) = action else {
                assert_eq!(read, 0, "a line read without an answer");
                return;
            };
            if read == 1 {
                assert!(self.end.is_none(), "a line read after the end: {action:?}");
                // The session read a line: it must be the client's next one.
                origin = Some(match self.lines.next_line() {
                    Ok(Some(next)) => {
                        line = Some(next);
                        Origin::Line
                    }
                    Ok(None) => panic!("the session read a line the client did not send"),
                    Err(_) => Origin::LineTooLong,
                });
            } else if origin.is_none() {
                panic!("an action nobody asked for: {action:?}");
            }
            let waits = matches!(
                action,
                Action::Verify { .. } | Action::ConnectBackend { .. } | Action::StartTls
            );
            batch.push(action);
            if waits {
                self.judge(line.take(), std::mem::take(&mut batch), origin.take());
            }
        }
    }

    /// Checks one batch against the line that caused it, then performs it.
    fn judge(&mut self, line: Option<Vec<u8>>, actions: Vec<Action>, origin: Option<Origin>) {
        let Some(origin) = origin else {
            panic!("actions without a cause: {actions:?}")
        };
        if origin == Origin::LineTooLong {
            assert!(
                matches!(actions.last(), Some(Action::Close)),
                "an over-long line must close: {actions:?}"
            );
        }
        match line {
            Some(line) => self.on_line(&line, actions),
            None => self.perform(actions, origin),
        }
    }

    fn on_line(&mut self, line: &[u8], actions: Vec<Action>) {
        let as_command = !self.in_sasl;
        let verb = verb(line);
        let clean = !line.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0));
        let first_code = actions.iter().find_map(|action| match action {
            Action::Reply(reply) => Some(reply.code),
            _ => None,
        });
        let shown = String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();

        if as_command && matches!(verb.as_slice(), b"MAIL" | b"RCPT" | b"DATA" | b"BDAT") {
            // No mail transaction before AUTH: refusals only, and nothing that moves the
            // session towards TLS, verification or the relay. The one exception is by
            // design: an MX listener hands an anonymous session to the backend at MAIL,
            // replaying that exact line first, and lets the backend answer it.
            let handoff = self.kind == ListenerKind::Mx && verb == b"MAIL";
            for action in &actions {
                match action {
                    Action::Reply(reply) => assert!(
                        (400..600).contains(&reply.code),
                        "{shown:?} before AUTH got {}",
                        reply.first_line()
                    ),
                    Action::Close | Action::Delay(_) => {}
                    Action::ConnectBackend { login, .. } if handoff => {
                        assert!(self.greeted, "MX hand-off before EHLO/HELO");
                        assert!(login.is_none(), "anonymous hand-off with a login");
                        self.handed_line = Some([line, b"\r\n"].concat());
                    }
                    other => panic!("{shown:?} before AUTH caused {other:?}"),
                }
            }
            assert!(
                first_code.is_some() || handoff,
                "{shown:?} got no reply: {actions:?}"
            );
        }
        if as_command && verb == b"AUTH" && clean {
            let expected = if !self.tls {
                // RFC 3207 / RFC 4954 §4: credentials only over TLS.
                538
            } else if !self.greeted {
                // RFC 3207 §4.2: the EHLO before STARTTLS does not count.
                503
            } else {
                0
            };
            if expected != 0 {
                assert_eq!(first_code, Some(expected), "{shown:?}: {actions:?}");
            }
        }
        if as_command && verb == b"STARTTLS" && self.tls && clean && line.len() <= MAX_COMMAND_LINE
        {
            assert_eq!(first_code, Some(503), "STARTTLS under TLS");
        }
        let hello = as_command && matches!(verb.as_slice(), b"EHLO" | b"HELO");
        self.perform(actions, Origin::Line);
        if hello && first_code == Some(250) {
            self.greeted = true;
        }
    }

    fn perform(&mut self, actions: Vec<Action>, origin: Origin) {
        let count = actions.len();
        for (index, action) in actions.into_iter().enumerate() {
            assert!(self.end.is_none(), "action after the end: {action:?}");
            if self.last_code == Some(235) {
                assert!(
                    matches!(action, Action::Relay { .. }),
                    "235 not followed by Relay"
                );
            }
            match action {
                Action::Reply(reply) => {
                    self.check_reply(&reply);
                    if reply.code == 235 {
                        assert_eq!(origin, Origin::BackendReady(true), "235 from {origin:?}");
                    }
                }
                Action::StartTls => {
                    assert_eq!(origin, Origin::Line);
                    assert_eq!(self.last_code, Some(220), "StartTls without 220");
                    assert!(!self.tls, "StartTls under TLS");
                    assert_ne!(self.kind, ListenerKind::ImplicitTls);
                    // RFC 3207 §4.2: nothing pipelined after STARTTLS is acted on. The
                    // session drops it itself; the checker's copy forgets it too, so a
                    // session that read one would read a line the client never sent.
                    self.lines.discard();
                    self.session.on_tls_established();
                    self.tls = true;
                    self.greeted = false;
                    self.in_sasl = false;
                    self.last_code = None;
                }
                Action::Verify { credentials, .. } => {
                    assert!(self.tls, "credentials accepted without TLS");
                    assert!(self.greeted, "Verify before EHLO/HELO");
                    assert!(!credentials.username().is_empty());
                    let verdict = self.oracle.verdict();
                    self.session.on_verified(verdict, None);
                    self.pump(Some(Origin::Verified(verdict)));
                }
                // The driver's session runs every mechanism itself (no source relays).
                Action::SourceSasl(step) => {
                    panic!("SourceSasl without a relaying source: {step:?}")
                }
                Action::ConnectBackend { hello, login } => {
                    // After valid credentials, as that user; or an MX hand-off at MAIL,
                    // checked in on_line.
                    self.anonymous = login.is_none();
                    if self.anonymous {
                        assert_eq!(self.kind, ListenerKind::Mx, "anonymous ConnectBackend");
                        assert_eq!(origin, Origin::Line, "anonymous ConnectBackend");
                    } else {
                        assert_eq!(origin, Origin::Verified(Verdict::Valid), "ConnectBackend");
                        self.handed_line = None;
                    }
                    assert!(hello.command_line().ends_with("\r\n"));
                    assert_eq!(hello.command_line().matches('\n').count(), 1);
                    let ready = self.oracle.ready();
                    self.session.on_backend_ready(ready);
                    if !ready {
                        self.handed_line = None;
                    }
                    self.pump(Some(Origin::BackendReady(ready)));
                }
                Action::Relay { pending } => {
                    // The one door to the backend: TLS, valid credentials, a ready backend
                    // (or, on MX only, an anonymous hand-off the backend then judges).
                    assert_eq!(origin, Origin::BackendReady(true), "Relay");
                    // The relay starts with the handed-off MAIL line, then everything the
                    // client sent that the session did not read, byte for byte.
                    let mut expected = self.handed_line.take().unwrap_or_default();
                    expected.extend_from_slice(&self.lines.take_pending());
                    assert_eq!(pending, expected, "the relay's first bytes");
                    if self.anonymous {
                        assert_eq!(index, 0, "postern replied to a handed-off MAIL");
                        assert!(self.session.authenticated().is_none());
                    } else {
                        assert!(self.tls, "Relay without TLS");
                        assert_eq!(self.last_code, Some(235), "Relay without 235");
                        assert!(self.session.authenticated().is_some());
                    }
                    assert_eq!(index + 1, count, "actions after Relay");
                    self.end = Some(End::Relayed);
                }
                Action::Delay(_) => {}
                Action::Close => {
                    assert_eq!(index + 1, count, "actions after Close");
                    self.end = Some(End::Closed);
                }
            }
        }
        assert_eq!(self.session.is_tls(), self.tls, "is_tls disagrees");
        if self.end != Some(End::Relayed) {
            assert!(
                self.session.authenticated().is_none(),
                "authenticated early"
            );
        }
    }

    /// Every reply line is `DDD-text` or `DDD text` (the last one), CRLF-terminated, with
    /// no CR or LF inside (RFC 5321 §4.2).
    fn check_reply(&mut self, reply: &Reply) {
        assert_wire_form(reply);
        self.in_sasl = reply.code == 334;
        self.last_code = Some(reply.code);
        self.codes.push(reply.code);
    }
}

/// Checks the wire form of a reply: see [`Driver::check_reply`].
pub fn assert_wire_form(reply: &Reply) {
    let mut wire = Vec::new();
    reply.encode(&mut wire);
    let text = String::from_utf8_lossy(&wire).into_owned();
    assert!(wire.ends_with(b"\r\n"), "{text:?}");
    let body = &wire[..wire.len() - 2];
    let lines: Vec<&[u8]> = split_crlf(body);
    let code = format!("{:03}", reply.code);
    assert!((200..600).contains(&reply.code), "{text:?}");
    for (index, line) in lines.iter().enumerate() {
        let last = index + 1 == lines.len();
        assert!(line.len() >= 4, "short line in {text:?}");
        assert_eq!(&line[..3], code.as_bytes(), "{text:?}");
        assert_eq!(line[3], if last { b' ' } else { b'-' }, "{text:?}");
        assert!(
            !line.iter().any(|&b| b == b'\r' || b == b'\n'),
            "CR or LF inside {text:?}"
        );
    }
}

fn split_crlf(bytes: &[u8]) -> Vec<&[u8]> {
    let mut lines = Vec::new();
    let mut rest = bytes;
    while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
        lines.push(&rest[..end]);
        rest = &rest[end + 2..];
    }
    lines.push(rest);
    lines
}

/// The first space-separated word, uppercased.
fn verb(line: &[u8]) -> Vec<u8> {
    let end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    line[..end].to_ascii_uppercase()
}
