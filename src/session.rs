//! The pre-AUTH SMTP session as a sans-IO state machine (RFC 5321, 3207, 4954, 2920).
//!
//! The driver ([`crate::conn`]) hands it the bytes the client sent ([`Session::receive`])
//! and the outcome of the work it asked for (TLS handshake, credential check, backend
//! connection), and performs what [`Session::next_action`] returns. The session owns its
//! input: it decides when the next pipelined line is read (never while a check or the
//! backend is pending), drops what was pipelined after STARTTLS, and hands what the
//! client sent after its AUTH to the relay. Nothing here touches a socket, a clock or an
//! RNG, so every transition is tested below as a transcript.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::sasl::{self, Credentials, Exchange, Mechanism, Response, Step};
use crate::smtp::line::LineTooLong;
use crate::smtp::{Capabilities, Command, CommandError, LineBuffer, Reply, canned};

/// What kind of listener accepted the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// Plain TCP that offers STARTTLS (RFC 3207); TLS and AUTH are required.
    Submission,
    /// TLS from the first byte (RFC 8314); AUTH is required.
    ImplicitTls,
    /// Inbound MX (port 25): STARTTLS and AUTH offered, neither required (RFC 3207 §4:
    /// a publicly referenced server must not require TLS). An anonymous session is
    /// handed to the backend at its first MAIL, so the backend decides as before.
    Mx,
}

impl ListenerKind {
    /// Label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            ListenerKind::Submission => crate::metrics::label::listener::STARTTLS,
            ListenerKind::ImplicitTls => crate::metrics::label::listener::TLS,
            ListenerKind::Mx => crate::metrics::label::listener::MX,
        }
    }
}

/// What the driver must do next, in order.
#[derive(Debug)]
pub enum Action {
    /// Send this reply.
    Reply(Reply),
    /// Flush replies, run the TLS handshake, then call [`Session::on_tls_established`].
    /// Every byte received before it has been dropped (RFC 3207 §4.2).
    StartTls,
    /// Check these credentials off the reactor, then call [`Session::on_verified`].
    Verify {
        mechanism: Mechanism,
        credentials: Credentials,
    },
    /// Pass this step of an exchange the credential source runs itself (Dovecot's
    /// CRAM-MD5 and SCRAM) to the source, then call [`Session::on_source_reply`] (not
    /// after [`SourceSasl::Cancel`]).
    SourceSasl(SourceSasl),
    /// Connect to the backend, replay `hello`, then call [`Session::on_backend_ready`].
    /// `login` is the authenticated user (for XCLIENT).
    ConnectBackend { hello: Hello, login: Option<String> },
    /// Relay bytes verbatim from now on, starting with `pending`: what the client sent
    /// that the session did not read (pipelined after AUTH), after an MX session's MAIL
    /// line. The session is finished.
    Relay { pending: Vec<u8> },
    /// Flush, then wait this long before the next action (slows password guessing).
    Delay(Duration),
    /// Flush replies and close the connection.
    Close,
}

/// One step of a SASL exchange the credential source runs.
#[derive(Debug, PartialEq, Eq)]
pub enum SourceSasl {
    /// `AUTH <mechanism> [initial]`, the initial response decoded (`=`: empty).
    Start {
        mechanism: Mechanism,
        initial: Option<Vec<u8>>,
    },
    /// The client's answer to the last challenge, decoded.
    Step(Vec<u8>),
    /// The client gave up (`*`) or sent something that is not base64: drop the exchange.
    Cancel,
}

/// The source's answer to a [`SourceSasl`] step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceReply {
    /// Send this challenge to the client (base64 after `334 `).
    Challenge(Vec<u8>),
    /// The exchange is over; with the user name the source settled on when valid.
    Done(Verdict, Option<String>),
}

/// How the client greeted, replayed to the backend once it is authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub extended: bool,
    pub name: String,
}

impl Hello {
    /// The command line to send to the backend, CRLF included.
    pub fn command_line(&self) -> String {
        format!(
            "{} {}\r\n",
            if self.extended { "EHLO" } else { "HELO" },
            self.name
        )
    }
}

/// Where the session stands. Each variant carries the data only that state needs.
enum State {
    /// Waiting for a command.
    Command,
    /// In a SASL exchange, waiting for the client's next response line.
    Auth(Exchange),
    /// In an exchange the source runs, waiting for the client's next response line.
    SourceAuth { mechanism: Mechanism },
    /// Waiting for [`Session::on_source_reply`].
    SourceWaiting { mechanism: Mechanism },
    /// Waiting for [`Session::on_verified`].
    Verifying {
        mechanism: Mechanism,
        username: String,
    },
    /// An anonymous MX session sent MAIL; waiting for [`Session::on_backend_ready`].
    Handing,
    /// Credentials were valid; waiting for [`Session::on_backend_ready`].
    Connecting {
        mechanism: Mechanism,
        username: String,
    },
    /// Authenticated and handed to the relay.
    Relaying,
    /// Closed by QUIT (`quit`), a timeout or a fatal error.
    Closed { quit: bool },
}

/// The outcome of a credential check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    Invalid,
    /// Not checked: the client's network or the user name is over its failure limit,
    /// or no verifier was free in time.
    Throttled,
    /// The credential source could not say (down, slow, a temporary failure), or sent
    /// the session somewhere it may not go: `454 4.7.0`, not counted as a failure.
    Unavailable,
}

/// Per-connection limits (Postfix's `smtpd_hard_error_limit` and friends).
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// Error replies (5xx) after which the session is closed with `421 4.7.0`.
    pub max_errors: u32,
    /// Failed AUTH attempts after which the session is closed with `421 4.7.0`.
    pub max_auth_failures: u32,
    /// Delay before answering the n-th failed AUTH: n times this.
    pub auth_failure_delay: Duration,
    /// NOOP, RSET, EHLO/HELO, HELP, VRFY and unknown commands allowed before AUTH; one
    /// more closes the session with `421 4.7.0`.
    pub max_junk_commands: u32,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            max_errors: 10,
            max_auth_failures: 3,
            auth_failure_delay: Duration::from_secs(1),
            max_junk_commands: 100,
        }
    }
}

/// Why the session closed a connection it could have kept serving: one of the
/// pre-AUTH budgets ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// [`SessionLimits::max_junk_commands`].
    JunkCommands,
    /// The driver's deadline for AUTH ([`Session::on_auth_deadline`]).
    AuthDeadline,
}

impl Rejection {
    /// The `reason` label of `postern_connections_rejected_total`.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::JunkCommands => crate::metrics::label::reject_reason::JUNK_COMMANDS,
            Rejection::AuthDeadline => crate::metrics::label::reject_reason::AUTH_DEADLINE,
        }
    }
}

/// Produces the CRAM-MD5 challenge `<random.timestamp@hostname>`; a fresh one per call.
pub type ChallengeSource = Box<dyn FnMut() -> String + Send + Sync>;

/// One client's pre-AUTH session.
pub struct Session {
    kind: ListenerKind,
    hostname: Arc<str>,
    capabilities: Arc<Capabilities>,
    challenges: ChallengeSource,
    /// TLS is active on the client connection. The one place this fact lives.
    tls: bool,
    /// The client's EHLO/HELO since the last greeting or TLS handshake.
    hello: Option<Hello>,
    state: State,
    /// The authenticated user and mechanism, once the backend accepted the session.
    authenticated: Option<(String, Mechanism)>,
    limits: SessionLimits,
    errors: u32,
    auth_failures: u32,
    /// What EHLO offers and AUTH accepts.
    mechanisms: Vec<Mechanism>,
    /// Those of `mechanisms` whose exchange the credential source runs.
    relayed: Vec<Mechanism>,
    /// Commands that neither authenticate nor start mail, so far (see [`is_junk`]).
    junk: u32,
    rejection: Option<Rejection>,
    /// What the client sent and the session has not read yet.
    input: LineBuffer,
    /// Actions decided but not yet taken by the driver.
    queue: VecDeque<Action>,
    /// Bytes the backend must receive before `input` (an MX session's MAIL line).
    first: Vec<u8>,
    /// Complete lines read so far (the driver's command timer restarts on each).
    lines: u64,
}

impl Session {
    pub fn new(
        kind: ListenerKind,
        hostname: Arc<str>,
        capabilities: Arc<Capabilities>,
        challenges: ChallengeSource,
        limits: SessionLimits,
    ) -> Self {
        Session {
            kind,
            hostname,
            capabilities,
            challenges,
            tls: kind == ListenerKind::ImplicitTls,
            hello: None,
            state: State::Command,
            authenticated: None,
            limits,
            errors: 0,
            auth_failures: 0,
            mechanisms: Mechanism::ALL.to_vec(),
            relayed: Vec::new(),
            junk: 0,
            rejection: None,
            input: LineBuffer::new(),
            queue: VecDeque::new(),
            first: Vec::new(),
            lines: 0,
        }
    }

    /// Bytes received from the client.
    pub fn receive(&mut self, bytes: &[u8]) {
        self.input.extend(bytes);
    }

    /// The next thing the driver must do, or `None` when the session needs more bytes,
    /// waits for the outcome it asked for, or is finished. Lines are read one at a time
    /// and only in a state that reads them, so pipelined commands (RFC 2920) are
    /// answered in order and nothing is read past an AUTH that is being checked.
    pub fn next_action(&mut self) -> Option<Action> {
        loop {
            if let Some(mut action) = self.queue.pop_front() {
                match &mut action {
                    // RFC 3207 §4.2, CVE-2011-0411: whatever the client pipelined after
                    // STARTTLS was sent in plaintext and is never acted on.
                    Action::StartTls => self.input.discard(),
                    Action::Relay { pending } => {
                        *pending = std::mem::take(&mut self.first);
                        pending.extend_from_slice(&self.input.take_pending());
                    }
                    _ => {}
                }
                return Some(action);
            }
            if !matches!(
                self.state,
                State::Command | State::Auth(_) | State::SourceAuth { .. }
            ) {
                return None;
            }
            let actions = match self.input.next_line() {
                Ok(Some(line)) => {
                    self.lines += 1;
                    self.on_line(&line)
                }
                Ok(None) => return None,
                Err(LineTooLong) => {
                    self.lines += 1;
                    self.on_line_too_long()
                }
            };
            self.queue.extend(actions);
        }
    }

    /// Lines read so far (complete ones, and the over-long one that closes): the
    /// driver restarts its command timer when this grows, so a client trickling a
    /// partial line (slowloris) is cut off like a silent one.
    pub fn lines_read(&self) -> u64 {
        self.lines
    }

    /// Offers and accepts only `mechanisms` (postern's own by default), e.g. no CRAM-MD5
    /// when some users have hashed passwords and so could never pass it.
    pub fn with_mechanisms(mut self, mechanisms: &[Mechanism]) -> Self {
        self.mechanisms = mechanisms.to_vec();
        self
    }

    /// Relays the exchanges of `relayed` to the credential source step by step
    /// ([`Action::SourceSasl`]) instead of running them; a mechanism postern cannot run
    /// itself is always relayed.
    pub fn with_relayed(mut self, relayed: &[Mechanism]) -> Self {
        self.relayed = relayed.to_vec();
        self
    }

    /// The client's EHLO/HELO name, once it greeted.
    pub fn hello_name(&self) -> Option<&str> {
        self.hello.as_ref().map(|hello| hello.name.as_str())
    }

    /// The budget whose end closed the session, if one did.
    pub fn rejection(&self) -> Option<Rejection> {
        self.rejection
    }

    /// The driver's deadline for a successful AUTH (an MX session: for its first MAIL)
    /// passed: a client that keeps a slot without ever logging in is let go.
    pub fn on_auth_deadline(&mut self) {
        self.rejection = Some(Rejection::AuthDeadline);
        let actions = self.close_with(canned::AUTH_DEADLINE.into());
        self.queue.extend(actions);
    }

    /// The 220 greeting (RFC 5321 §4.2).
    pub fn greeting(&self) -> Reply {
        Reply::new(220, format!("{} ESMTP postern", self.hostname))
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The user and mechanism of a session that reached the relay.
    pub fn authenticated(&self) -> Option<(&str, Mechanism)> {
        self.authenticated
            .as_ref()
            .map(|(user, mech)| (user.as_str(), *mech))
    }

    /// Whether the session was closed for reaching its AUTH failure limit.
    pub fn auth_failures_exhausted(&self) -> bool {
        self.auth_failures >= self.limits.max_auth_failures
    }

    /// Whether the client ended the session with QUIT.
    pub fn quit(&self) -> bool {
        matches!(self.state, State::Closed { quit: true })
    }

    /// One line received from the client, CRLF removed.
    fn on_line(&mut self, line: &[u8]) -> Vec<Action> {
        let mut actions = self.dispatch_line(line);
        // Auth failures have their own limit; every other 5xx counts as an error.
        let error = actions
            .iter()
            .any(|a| matches!(a, Action::Reply(r) if r.code >= 500 && r.code != 535));
        let closing = actions.iter().any(|a| matches!(a, Action::Close));
        if error && !closing {
            self.errors += 1;
            if self.errors >= self.limits.max_errors {
                actions.extend(self.close_with(canned::TOO_MANY_ERRORS.into()));
            }
        }
        actions
    }

    fn dispatch_line(&mut self, line: &[u8]) -> Vec<Action> {
        match std::mem::replace(&mut self.state, State::Command) {
            State::Command => self.on_command(line),
            State::Auth(mut exchange) => {
                let step = exchange.step(line);
                self.on_sasl_step(exchange, step)
            }
            State::SourceAuth { mechanism } => match sasl::decode(line) {
                Some(Response::Data(response)) => {
                    self.state = State::SourceWaiting { mechanism };
                    vec![Action::SourceSasl(SourceSasl::Step(response))]
                }
                Some(Response::Cancel) => vec![
                    Action::SourceSasl(SourceSasl::Cancel),
                    Action::Reply(canned::AUTH_CANCELLED.into()),
                ],
                None => vec![
                    Action::SourceSasl(SourceSasl::Cancel),
                    Action::Reply(canned::AUTH_MALFORMED.into()),
                ],
            },
            // next_action reads no line in any other state.
            other => {
                debug_assert!(false, "a line read while waiting or finished");
                self.state = other;
                Vec::new()
            }
        }
    }

    /// The client sent a line longer than any state allows; it cannot be answered in
    /// sync, so the connection closes (RFC 4954 §4 for SASL lines).
    fn on_line_too_long(&mut self) -> Vec<Action> {
        let reply = match self.state {
            State::Auth(_) | State::SourceAuth { .. } => canned::AUTH_LINE_TOO_LONG,
            _ => canned::LINE_TOO_LONG,
        };
        self.close_with(reply.into())
    }

    /// No command arrived in time (RFC 5321 §4.5.3.2).
    pub fn on_timeout(&mut self) {
        let actions = self.close_with(canned::TIMEOUT.into());
        self.queue.extend(actions);
    }

    /// The TLS handshake after STARTTLS succeeded: RFC 3207 §4.2 says the client must
    /// greet again and nothing learnt before TLS may be kept.
    pub fn on_tls_established(&mut self) {
        self.tls = true;
        self.hello = None;
        self.state = State::Command;
    }

    /// The outcome of [`Action::Verify`].
    /// The outcome of [`Action::Verify`]; `account` is the name the credential source
    /// settled on, when it accepts several spellings: the session goes on under it.
    pub fn on_verified(&mut self, verdict: Verdict, account: Option<String>) {
        let actions = self.verified(verdict, account);
        self.queue.extend(actions);
    }

    fn verified(&mut self, verdict: Verdict, account: Option<String>) -> Vec<Action> {
        match std::mem::replace(&mut self.state, State::Command) {
            State::Verifying {
                mechanism,
                username,
            } => self.concluded(verdict, mechanism, account.unwrap_or(username)),
            other => {
                debug_assert!(false, "an outcome nobody asked for");
                self.state = other;
                Vec::new()
            }
        }
    }

    /// The source's answer to the last [`Action::SourceSasl`] step.
    pub fn on_source_reply(&mut self, reply: SourceReply) {
        let actions = match (std::mem::replace(&mut self.state, State::Command), reply) {
            (State::SourceWaiting { mechanism }, SourceReply::Challenge(challenge)) => {
                self.state = State::SourceAuth { mechanism };
                vec![Action::Reply(Reply::new(334, STANDARD.encode(challenge)))]
            }
            (State::SourceWaiting { mechanism }, SourceReply::Done(verdict, user)) => {
                self.concluded(verdict, mechanism, user.unwrap_or_default())
            }
            (other, _) => {
                debug_assert!(false, "an outcome nobody asked for");
                self.state = other;
                Vec::new()
            }
        };
        self.queue.extend(actions);
    }

    /// A checked AUTH, whoever ran the exchange.
    fn concluded(
        &mut self,
        verdict: Verdict,
        mechanism: Mechanism,
        username: String,
    ) -> Vec<Action> {
        match verdict {
            Verdict::Valid => match self.hello.clone() {
                Some(hello) => {
                    let login = Some(username.clone());
                    self.state = State::Connecting {
                        mechanism,
                        username,
                    };
                    vec![Action::ConnectBackend { hello, login }]
                }
                None => vec![Action::Reply(canned::HELLO_FIRST.into())],
            },
            Verdict::Throttled => self.auth_failed(canned::AUTH_THROTTLED.into()),
            Verdict::Unavailable => reply(canned::TEMPORARY_AUTH_FAILURE.into()),
            Verdict::Invalid => self.auth_failed(canned::BAD_CREDENTIALS.into()),
        }
    }

    /// A failed AUTH: answered after a delay that grows with each failure, and the
    /// connection closed once it reaches the limit (RFC 4954 §4 allows both).
    fn auth_failed(&mut self, reply: Reply) -> Vec<Action> {
        self.auth_failures += 1;
        let delay = self.limits.auth_failure_delay * self.auth_failures;
        let mut actions = vec![Action::Delay(delay)];
        if self.auth_failures >= self.limits.max_auth_failures {
            actions.extend(self.close_with(canned::TOO_MANY_AUTH_FAILURES.into()));
        } else {
            actions.push(Action::Reply(reply));
        }
        actions
    }

    /// The outcome of [`Action::ConnectBackend`]: only a backend that greeted and accepted
    /// the EHLO earns the client a 235, so a 235 is never followed by silence.
    pub fn on_backend_ready(&mut self, ready: bool) {
        let actions = self.backend_ready(ready);
        self.queue.extend(actions);
    }

    fn backend_ready(&mut self, ready: bool) -> Vec<Action> {
        match std::mem::replace(&mut self.state, State::Command) {
            State::Connecting {
                mechanism,
                username,
            } if ready => {
                self.authenticated = Some((username, mechanism));
                self.state = State::Relaying;
                vec![
                    Action::Reply(canned::AUTH_SUCCEEDED.into()),
                    Action::Relay {
                        pending: Vec::new(),
                    },
                ]
            }
            State::Connecting { .. } => vec![Action::Reply(canned::TEMPORARY_AUTH_FAILURE.into())],
            State::Handing if ready => {
                self.state = State::Relaying;
                vec![Action::Relay {
                    pending: Vec::new(),
                }]
            }
            State::Handing => {
                self.first.clear();
                vec![Action::Reply(canned::BACKEND_TRY_LATER.into())]
            }
            other => {
                debug_assert!(false, "an outcome nobody asked for");
                self.state = other;
                Vec::new()
            }
        }
    }

    /// The backend was reached but cannot be told an anonymous MX client's address
    /// (`--xclient` without XCLIENT ADDR): the MAIL gets a 451 of its own and nothing
    /// is relayed. Anywhere else this is an unusable backend like any other.
    pub fn on_backend_unidentified(&mut self) {
        if matches!(self.state, State::Handing) {
            self.state = State::Command;
            self.first.clear();
            self.queue
                .push_back(Action::Reply(canned::BACKEND_CANNOT_IDENTIFY.into()));
            return;
        }
        self.on_backend_ready(false)
    }

    fn on_command(&mut self, line: &[u8]) -> Vec<Action> {
        let command = match Command::parse(line) {
            Ok(command) => command,
            Err(error) => return reply(command_error_reply(error)),
        };
        // A client that only ever greets, resets and probes is holding a connection slot
        // without any intention to log in (Postfix: smtpd_junk_command_limit).
        if is_junk(&command) {
            self.junk += 1;
            if self.junk > self.limits.max_junk_commands {
                self.rejection = Some(Rejection::JunkCommands);
                return self.close_with(canned::TOO_MANY_JUNK_COMMANDS.into());
            }
        }
        match command {
            Command::Ehlo(name) => {
                self.hello = Some(Hello {
                    extended: true,
                    name: name.to_owned(),
                });
                vec![Action::Reply(self.ehlo_reply())]
            }
            Command::Helo(name) => {
                self.hello = Some(Hello {
                    extended: false,
                    name: name.to_owned(),
                });
                vec![Action::Reply(Reply::new(250, self.hostname.to_string()))]
            }
            Command::StartTls { .. } if self.tls => reply(canned::TLS_ALREADY_ACTIVE.into()),
            Command::StartTls { has_argument: true } => reply(canned::STARTTLS_NO_ARGUMENTS.into()),
            Command::StartTls {
                has_argument: false,
            } => {
                vec![
                    Action::Reply(canned::READY_FOR_TLS.into()),
                    Action::StartTls,
                ]
            }
            Command::Auth { .. } if !self.tls => reply(canned::ENCRYPTION_REQUIRED.into()),
            Command::Auth { .. } if self.hello.is_none() => reply(canned::HELLO_FIRST.into()),
            Command::Auth {
                mechanism: None, ..
            } => reply(canned::AUTH_NO_MECHANISM.into()),
            Command::Auth {
                mechanism: Some(name),
                initial,
            } => match Mechanism::parse(name).filter(|m| self.mechanisms.contains(m)) {
                None => reply(canned::AUTH_UNKNOWN_MECHANISM.into()),
                Some(mechanism)
                    if self.relayed.contains(&mechanism) || !mechanism.runs_locally() =>
                {
                    match initial.map(sasl::decode) {
                        None => self.start_relayed(mechanism, None),
                        Some(Some(Response::Data(initial))) => {
                            self.start_relayed(mechanism, Some(initial))
                        }
                        Some(Some(Response::Cancel)) => reply(canned::AUTH_CANCELLED.into()),
                        Some(None) => reply(canned::AUTH_MALFORMED.into()),
                    }
                }
                Some(mechanism) => {
                    let challenge = match mechanism {
                        Mechanism::CramMd5 => (self.challenges)(),
                        _ => String::new(),
                    };
                    let (exchange, step) = Exchange::start(mechanism, initial, &challenge);
                    self.on_sasl_step(exchange, step)
                }
            },
            Command::Noop | Command::Rset => reply(canned::OK.into()),
            Command::Quit => {
                let actions = self.close_with(canned::BYE.into());
                self.state = State::Closed { quit: true };
                actions
            }
            // RFC 3030: a BDAT chunk follows its command unannounced, so after refusing
            // it the only safe way never to read the chunk as commands is to close.
            Command::Bdat if self.kind == ListenerKind::Mx => {
                self.close_with(canned::MAIL_FIRST.into())
            }
            Command::Bdat => {
                let refusal = self.refusal();
                self.close_with(refusal.into())
            }
            Command::Mail if self.kind == ListenerKind::Mx => match self.hello.clone() {
                Some(hello) => {
                    self.state = State::Handing;
                    self.first = line.to_vec();
                    self.first.extend_from_slice(b"\r\n");
                    vec![Action::ConnectBackend { hello, login: None }]
                }
                None => reply(canned::HELLO_FIRST.into()),
            },
            Command::Rcpt | Command::Data if self.kind == ListenerKind::Mx => {
                reply(canned::MAIL_FIRST.into())
            }
            Command::Known if self.kind == ListenerKind::Mx => {
                reply(canned::NOT_IMPLEMENTED.into())
            }
            Command::Unknown if self.kind == ListenerKind::Mx => reply(canned::UNRECOGNIZED.into()),
            Command::Mail | Command::Rcpt | Command::Data | Command::Known => {
                reply(self.refusal().into())
            }
            Command::Unknown if !self.tls => reply(canned::TLS_REQUIRED.into()),
            Command::Unknown => reply(canned::UNRECOGNIZED.into()),
        }
    }

    fn on_sasl_step(&mut self, exchange: Exchange, step: Step) -> Vec<Action> {
        let mechanism = exchange.mechanism();
        match step {
            Step::Challenge(text) => {
                self.state = State::Auth(exchange);
                reply(Reply::new(334, text))
            }
            Step::Done(credentials) => {
                self.state = State::Verifying {
                    mechanism,
                    username: credentials.username().to_owned(),
                };
                vec![Action::Verify {
                    mechanism,
                    credentials,
                }]
            }
            Step::Denied => self.auth_failed(canned::BAD_CREDENTIALS.into()),
            Step::Cancelled => reply(canned::AUTH_CANCELLED.into()),
            Step::Malformed => reply(canned::AUTH_MALFORMED.into()),
        }
    }

    fn start_relayed(&mut self, mechanism: Mechanism, initial: Option<Vec<u8>>) -> Vec<Action> {
        self.state = State::SourceWaiting { mechanism };
        vec![Action::SourceSasl(SourceSasl::Start { mechanism, initial })]
    }

    /// Why a mail transaction or a restricted verb is refused right now.
    fn refusal(&self) -> crate::smtp::Canned {
        if self.tls {
            canned::AUTH_REQUIRED
        } else {
            canned::TLS_REQUIRED
        }
    }

    fn ehlo_reply(&self) -> Reply {
        let mut lines: Vec<Cow<'static, str>> = vec![self.hostname.to_string().into()];
        lines.extend(
            self.capabilities
                .for_clients()
                .map(|line| Cow::Owned(line.to_owned())),
        );
        if self.tls && !self.mechanisms.is_empty() {
            let names: Vec<&str> = self.mechanisms.iter().map(|m| m.name()).collect();
            lines.push(format!("AUTH {}", names.join(" ")).into());
        } else if self.kind != ListenerKind::ImplicitTls {
            lines.push("STARTTLS".into());
        }
        Reply { code: 250, lines }
    }

    fn close_with(&mut self, reply: Reply) -> Vec<Action> {
        self.state = State::Closed { quit: false };
        vec![Action::Reply(reply), Action::Close]
    }
}

/// The commands `--max-junk-commands` counts: they neither authenticate nor start mail.
fn is_junk(command: &Command<'_>) -> bool {
    matches!(
        command,
        Command::Noop
            | Command::Rset
            | Command::Ehlo(_)
            | Command::Helo(_)
            | Command::Known
            | Command::Unknown
    )
}

fn reply(reply: Reply) -> Vec<Action> {
    vec![Action::Reply(reply)]
}

fn command_error_reply(error: CommandError) -> Reply {
    match error {
        CommandError::TooLong => canned::LINE_TOO_LONG.into(),
        CommandError::ForbiddenCharacter => canned::CONTROL_CHARACTER.into(),
        CommandError::AmbiguousVerb => canned::AMBIGUOUS_VERB.into(),
        CommandError::BadHelloName => canned::BAD_HELLO.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN_TIM: &str = "AHRpbQB0YW5zdGFhZnRhbnN0YWFm"; // \0tim\0tanstaaftanstaaf

    fn session(kind: ListenerKind) -> Session {
        let caps = Capabilities::from_ehlo_reply(
            &[
                "legacy",
                "PIPELINING",
                "SIZE 1000",
                "STARTTLS",
                "AUTH LOGIN",
                "XCLIENT ADDR",
                "8BITMIME",
            ]
            .map(String::from),
        );
        let limits = SessionLimits {
            auth_failure_delay: Duration::ZERO,
            ..SessionLimits::default()
        };
        let challenges = Box::new(|| "<1.2@mx.test>".to_owned());
        Session::new(kind, "mx.test".into(), Arc::new(caps), challenges, limits)
    }

    /// A session after STARTTLS and EHLO, ready for AUTH.
    fn greeted_tls() -> Session {
        let mut s = session(ListenerKind::ImplicitTls);
        s.on_line(b"EHLO client.test");
        s
    }

    fn wire(actions: &[Action]) -> String {
        let mut out = Vec::new();
        for action in actions {
            if let Action::Reply(reply) = action {
                reply.encode(&mut out);
            }
        }
        String::from_utf8(out).unwrap()
    }

    /// Every action the session has ready, reading the lines it has received.
    fn drain(s: &mut Session) -> Vec<Action> {
        std::iter::from_fn(|| s.next_action()).collect()
    }

    #[track_caller]
    fn assert_reply(actions: &[Action], expected_start: &str) {
        let text = wire(actions);
        assert!(
            text.starts_with(expected_start),
            "expected {expected_start:?}, got {text:?}"
        );
    }

    #[test]
    fn greets_with_hostname() {
        assert_eq!(
            session(ListenerKind::Submission).greeting().first_line(),
            "220 mx.test ESMTP postern"
        );
    }

    #[test]
    fn ehlo_offers_starttls_before_tls_and_auth_after() {
        let mut s = session(ListenerKind::Submission);
        assert_eq!(
            wire(&s.on_line(b"EHLO c")),
            "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250 STARTTLS\r\n"
        );
        assert!(matches!(
            s.on_line(b"STARTTLS")[..],
            [Action::Reply(_), Action::StartTls]
        ));
        s.on_tls_established();
        assert_eq!(
            wire(&s.on_line(b"EHLO c")),
            "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250 AUTH PLAIN LOGIN CRAM-MD5\r\n"
        );
        assert_eq!(wire(&s.on_line(b"HELO c")), "250 mx.test\r\n");
    }

    #[test]
    fn before_tls_only_greeting_starttls_noop_rset_quit_are_served() {
        for (line, expected) in [
            (&b"AUTH PLAIN"[..], "538 5.7.11 "),
            (b"AUTH", "538 5.7.11 "),
            (
                b"MAIL FROM:<a@b>",
                "530 5.7.0 Must issue a STARTTLS command first",
            ),
            (
                b"RCPT TO:<a@b>",
                "530 5.7.0 Must issue a STARTTLS command first",
            ),
            (b"DATA", "530 5.7.0 Must issue a STARTTLS command first"),
            (
                b"VRFY root",
                "530 5.7.0 Must issue a STARTTLS command first",
            ),
            (b"XYZZY", "530 5.7.0 Must issue a STARTTLS command first"),
            (b"NOOP", "250 2.0.0"),
            (b"RSET", "250 2.0.0"),
            (b"STARTTLS x", "501 5.5.4"),
            (b"NOOP\nMAIL FROM:<a>", "500 5.5.2"),
            (b"EHLO bad\x01name", "500 5.5.2"),
            (b"EHLO bad name", "501 5.5.4"),
        ] {
            let mut s = session(ListenerKind::Submission);
            s.on_line(b"EHLO c");
            assert_reply(&s.on_line(line), expected);
        }
    }

    #[test]
    fn after_tls_before_auth_mail_needs_authentication() {
        for (line, expected) in [
            (&b"MAIL FROM:<a@b>"[..], "530 5.7.0 Authentication required"),
            (b"DATA", "530 5.7.0 Authentication required"),
            (b"VRFY x", "530 5.7.0 Authentication required"),
            (b"XYZZY", "500 5.5.2"),
            (b"STARTTLS", "503 5.5.1"),
            (b"AUTH", "501 5.5.4"),
            (b"AUTH KERBEROS_V4", "504 5.5.4"),
        ] {
            assert_reply(&greeted_tls().on_line(line), expected);
        }
    }

    #[test]
    fn bdat_before_auth_closes_so_its_chunk_is_never_read_as_commands() {
        let actions = greeted_tls().on_line(b"BDAT 20 LAST");
        assert_reply(&actions, "530 5.7.0 Authentication required");
        assert!(matches!(actions.last(), Some(Action::Close)));
    }

    #[test]
    fn quit_closes() {
        let actions = session(ListenerKind::Submission).on_line(b"QUIT");
        assert_reply(&actions, "221 2.0.0");
        assert!(matches!(actions.last(), Some(Action::Close)));
    }

    #[test]
    fn auth_needs_a_greeting_first() {
        let mut s = session(ListenerKind::ImplicitTls);
        assert_reply(&s.on_line(b"AUTH PLAIN"), "503 5.5.1");
    }

    #[test]
    fn starttls_resets_everything_learnt_before() {
        let mut s = session(ListenerKind::Submission);
        s.on_line(b"EHLO before.tls");
        s.on_line(b"STARTTLS");
        s.on_tls_established();
        assert!(s.is_tls());
        // The pre-TLS EHLO does not count: AUTH needs a new one.
        assert_reply(&s.on_line(b"AUTH PLAIN"), "503 5.5.1");
    }

    #[test]
    fn plain_success_connects_the_backend_before_answering_235() {
        let mut s = greeted_tls();
        let actions = s.on_line(format!("AUTH PLAIN {PLAIN_TIM}").as_bytes());
        let [
            Action::Verify {
                mechanism: Mechanism::Plain,
                credentials,
            },
        ] = &actions[..]
        else {
            panic!("expected Verify, got {actions:?}");
        };
        assert_eq!(credentials.username(), "tim");
        let actions = s.verified(Verdict::Valid, None);
        let [Action::ConnectBackend { hello, login }] = &actions[..] else {
            panic!("{actions:?}")
        };
        assert_eq!(hello.command_line(), "EHLO client.test\r\n");
        assert_eq!(login.as_deref(), Some("tim"));
        assert!(s.authenticated().is_none());
        let actions = s.backend_ready(true);
        assert_reply(&actions, "235 2.7.0");
        assert!(matches!(actions.last(), Some(Action::Relay { .. })));
        assert_eq!(s.authenticated(), Some(("tim", Mechanism::Plain)));
    }

    #[test]
    fn backend_failure_gives_454_and_the_client_may_retry() {
        let mut s = greeted_tls();
        s.on_line(format!("AUTH PLAIN {PLAIN_TIM}").as_bytes());
        s.verified(Verdict::Valid, None);
        assert_reply(&s.backend_ready(false), "454 4.7.0");
        assert!(s.authenticated().is_none());
        assert!(matches!(
            s.on_line(format!("AUTH PLAIN {PLAIN_TIM}").as_bytes())[..],
            [Action::Verify { .. }]
        ));
    }

    #[test]
    fn wrong_credentials_give_535_and_any_mechanism_may_be_retried() {
        let mut s = greeted_tls();
        s.on_line(format!("AUTH PLAIN {PLAIN_TIM}").as_bytes());
        assert_reply(&s.verified(Verdict::Invalid, None), "535 5.7.8");
        assert_reply(&s.on_line(b"MAIL FROM:<a@b>"), "530 5.7.0");
        assert_eq!(wire(&s.on_line(b"AUTH LOGIN")), "334 VXNlcm5hbWU6\r\n");
        assert_eq!(wire(&s.on_line(b"dGlt")), "334 UGFzc3dvcmQ6\r\n");
        let actions = s.on_line(b"dGFuc3RhYWZ0YW5zdGFhZg==");
        assert!(
            matches!(
                actions[..],
                [Action::Verify {
                    mechanism: Mechanism::Login,
                    ..
                }]
            ),
            "{actions:?}"
        );
    }

    #[test]
    fn sasl_exchange_replies() {
        for (lines, expected) in [
            (&[&b"AUTH PLAIN"[..]][..], "334 \r\n"),
            (&[b"AUTH PLAIN", b"*"], "501 5.7.0"),
            (&[b"AUTH PLAIN !!!notbase64"], "501 5.5.2"),
            (&[b"AUTH PLAIN", b"%%%"], "501 5.5.2"),
            (&[b"AUTH LOGIN dGlt"], "334 UGFzc3dvcmQ6"),
            (&[b"AUTH LOGIN", b"*"], "501 5.7.0"),
            (&[b"AUTH CRAM-MD5"], "334 PDEuMkBteC50ZXN0Pg=="),
            (&[b"AUTH PLAIN VXJzZWwAS3VydAB4aXBqM3BsbXE="], "535 5.7.8"),
        ] {
            let mut s = greeted_tls();
            let mut actions = Vec::new();
            for line in lines {
                actions = s.on_line(line);
            }
            assert_reply(&actions, expected);
        }
    }

    #[test]
    fn overlong_lines_close_with_the_right_code() {
        let mut s = greeted_tls();
        assert_reply(&s.on_line_too_long(), "500 5.5.2");
        let mut s = greeted_tls();
        s.on_line(b"AUTH PLAIN");
        let actions = s.on_line_too_long();
        assert_reply(&actions, "500 5.5.6");
        assert!(matches!(actions.last(), Some(Action::Close)));
    }

    #[test]
    fn timeout_answers_421_and_closes() {
        let mut s = session(ListenerKind::Submission);
        s.on_timeout();
        let actions = drain(&mut s);
        assert_reply(&actions, "421 4.4.2");
        assert!(matches!(actions.last(), Some(Action::Close)));
    }

    #[test]
    fn auth_failures_are_delayed_more_each_time_and_close_at_the_limit() {
        let caps = Arc::new(Capabilities::unknown());
        let limits = SessionLimits {
            max_errors: 10,
            max_auth_failures: 3,
            auth_failure_delay: Duration::from_secs(1),
            ..SessionLimits::default()
        };
        let mut s = Session::new(
            ListenerKind::ImplicitTls,
            "mx.test".into(),
            caps,
            Box::new(String::new),
            limits,
        );
        s.on_line(b"EHLO c");
        for (attempt, verdict, expected) in [
            (1, Verdict::Invalid, "535 5.7.8"),
            (2, Verdict::Throttled, "454 4.7.0"),
            (3, Verdict::Invalid, "421 4.7.0"),
        ] {
            s.on_line(format!("AUTH PLAIN {PLAIN_TIM}").as_bytes());
            let actions = s.verified(verdict, None);
            assert!(
                matches!(actions[0], Action::Delay(d) if d == Duration::from_secs(attempt)),
                "{actions:?}"
            );
            assert_reply(&actions, expected);
        }
        // Closed: nothing more is read, whatever the client still sends.
        s.receive(b"AUTH PLAIN\r\n");
        assert!(s.next_action().is_none());
    }

    #[test]
    fn plain_with_a_foreign_authzid_counts_as_a_failure() {
        let mut s = greeted_tls();
        let actions = s.on_line(b"AUTH PLAIN VXJzZWwAS3VydAB4aXBqM3BsbXE=");
        assert!(matches!(actions[0], Action::Delay(_)));
        assert_reply(&actions, "535 5.7.8");
    }

    #[test]
    fn too_many_errors_close_the_session() {
        let mut s = greeted_tls();
        for _ in 0..9 {
            assert_reply(&s.on_line(b"XYZZY"), "500 5.5.2");
        }
        let actions = s.on_line(b"MAIL FROM:<a@b>");
        assert_eq!(
            wire(&actions),
            "530 5.7.0 Authentication required\r\n421 4.7.0 Too many errors, closing connection\r\n"
        );
        assert!(matches!(actions.last(), Some(Action::Close)));
    }

    #[test]
    fn mx_offers_tls_and_auth_but_hands_anonymous_mail_to_the_backend() {
        let mut s = session(ListenerKind::Mx);
        assert!(wire(&s.on_line(b"EHLO peer.example")).ends_with("250 STARTTLS\r\n"));
        assert_reply(&s.on_line(b"RCPT TO:<a@b>"), "503 5.5.1");
        assert_reply(&s.on_line(b"VRFY x"), "502 5.5.1");
        assert_reply(&s.on_line(b"AUTH PLAIN"), "538 5.7.11");
        let actions = s.on_line(b"MAIL FROM:<a@peer.example> SIZE=10");
        let [Action::ConnectBackend { hello, login: None }] = &actions[..] else {
            panic!("{actions:?}")
        };
        assert_eq!(hello.command_line(), "EHLO peer.example\r\n");
        // No 235 and no reply of postern's own: the backend answers the MAIL, which the
        // relay sends first.
        s.on_backend_ready(true);
        let actions = drain(&mut s);
        let [Action::Relay { pending }] = &actions[..] else {
            panic!("{actions:?}")
        };
        assert_eq!(pending, b"MAIL FROM:<a@peer.example> SIZE=10\r\n");
        assert!(s.authenticated().is_none());
    }

    #[test]
    fn mx_backend_down_at_mail_gives_451_and_mx_needs_a_greeting() {
        let mut s = session(ListenerKind::Mx);
        assert_reply(&s.on_line(b"MAIL FROM:<a@b>"), "503 5.5.1");
        s.on_line(b"HELO peer");
        s.on_line(b"MAIL FROM:<a@b>");
        assert_reply(&s.backend_ready(false), "451 4.3.0");
        let mut s = session(ListenerKind::Mx);
        s.on_line(b"EHLO peer");
        let actions = s.on_line(b"BDAT 10 LAST");
        assert_reply(&actions, "503 5.5.1");
        assert!(matches!(actions.last(), Some(Action::Close)));
    }

    #[test]
    fn mx_after_tls_offers_auth_and_authenticated_users_relay_as_on_submission() {
        let mut s = session(ListenerKind::Mx);
        s.on_line(b"STARTTLS");
        s.on_tls_established();
        assert!(wire(&s.on_line(b"EHLO c")).ends_with("250 AUTH PLAIN LOGIN CRAM-MD5\r\n"));
        assert!(matches!(
            s.on_line(format!("AUTH PLAIN {PLAIN_TIM}").as_bytes())[..],
            [Action::Verify { .. }]
        ));
    }

    #[test]
    fn junk_commands_past_the_limit_close_with_421() {
        let limits = SessionLimits {
            max_junk_commands: 4,
            max_errors: 100,
            ..SessionLimits::default()
        };
        let mut s = Session::new(
            ListenerKind::ImplicitTls,
            "mx.test".into(),
            Arc::new(Capabilities::unknown()),
            Box::new(String::new),
            limits,
        );
        for line in [&b"EHLO c"[..], b"NOOP", b"RSET", b"VRFY x"] {
            assert!(!matches!(s.on_line(line).last(), Some(Action::Close)));
        }
        // Neither AUTH nor a refused MAIL is junk.
        assert_reply(&s.on_line(b"AUTH PLAIN"), "334");
        s.on_line(b"*");
        assert_reply(&s.on_line(b"MAIL FROM:<a@b>"), "530");
        assert_eq!(s.rejection(), None);
        let actions = s.on_line(b"HELP");
        assert_eq!(
            wire(&actions),
            "421 4.7.0 Too many commands without authentication, closing connection\r\n"
        );
        assert!(matches!(actions.last(), Some(Action::Close)));
        assert_eq!(s.rejection(), Some(Rejection::JunkCommands));
        assert_eq!(Rejection::JunkCommands.label(), "junk_commands");
    }

    #[test]
    fn the_auth_deadline_closes_with_421() {
        let mut s = greeted_tls();
        s.on_auth_deadline();
        let actions = drain(&mut s);
        assert_reply(&actions, "421 4.7.0 Too long without authentication");
        assert!(matches!(actions.last(), Some(Action::Close)));
        assert_eq!(s.rejection().map(Rejection::label), Some("auth_deadline"));
    }

    #[test]
    fn only_the_chosen_mechanisms_are_offered_and_accepted() {
        let mut s = session(ListenerKind::ImplicitTls)
            .with_mechanisms(&[Mechanism::Plain, Mechanism::Login]);
        assert!(wire(&s.on_line(b"EHLO c")).ends_with("250 AUTH PLAIN LOGIN\r\n"));
        assert_reply(&s.on_line(b"AUTH CRAM-MD5"), "504 5.5.4");
        assert_reply(&s.on_line(b"AUTH LOGIN"), "334");
    }

    #[test]
    fn pipelined_lines_are_answered_in_order_and_partial_lines_wait() {
        let mut s = session(ListenerKind::Submission);
        s.receive(b"NOOP\r\nRSET\r\nNO");
        assert_eq!(wire(&drain(&mut s)), "250 2.0.0 OK\r\n250 2.0.0 OK\r\n");
        assert_eq!(s.lines_read(), 2);
        s.receive(b"OP\r");
        assert!(s.next_action().is_none());
        s.receive(b"\n");
        assert_reply(&drain(&mut s), "250 2.0.0");
        assert_eq!(s.lines_read(), 3);
    }

    #[test]
    fn starttls_drops_what_was_pipelined_after_it() {
        // RFC 3207 §4.2 / CVE-2011-0411: an injected command must never be answered.
        let mut s = session(ListenerKind::Submission);
        s.receive(b"EHLO c\r\nSTARTTLS\r\nAUTH PLAIN x\r\nMAIL FROM:<a@b>\r\n");
        let actions = drain(&mut s);
        assert!(
            matches!(actions.last(), Some(Action::StartTls)),
            "{actions:?}"
        );
        s.on_tls_established();
        assert!(
            s.next_action().is_none(),
            "a pipelined line survived STARTTLS"
        );
        s.receive(b"EHLO c\r\n");
        assert!(wire(&drain(&mut s)).contains("AUTH PLAIN"));
    }

    #[test]
    fn the_session_goes_on_under_the_name_the_source_settled_on() {
        let mut s = greeted_tls();
        s.receive(format!("AUTH PLAIN {PLAIN_TIM}\r\n").as_bytes());
        assert!(matches!(s.next_action(), Some(Action::Verify { .. })));
        s.on_verified(Verdict::Valid, Some("timothy".into()));
        let actions = drain(&mut s);
        let [Action::ConnectBackend { login, .. }] = &actions[..] else {
            panic!("{actions:?}");
        };
        assert_eq!(login.as_deref(), Some("timothy"));
        s.on_backend_ready(true);
        assert_reply(&drain(&mut s), "235 ");
        assert_eq!(s.authenticated(), Some(("timothy", Mechanism::Plain)));
    }

    #[test]
    fn nothing_is_read_while_credentials_are_checked_and_the_rest_goes_to_the_relay() {
        let mut s = greeted_tls();
        let pipelined = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n";
        s.receive(format!("AUTH PLAIN {PLAIN_TIM}\r\n").as_bytes());
        s.receive(pipelined);
        assert!(matches!(s.next_action(), Some(Action::Verify { .. })));
        assert!(s.next_action().is_none(), "read past an AUTH being checked");
        s.on_verified(Verdict::Valid, None);
        assert!(matches!(
            s.next_action(),
            Some(Action::ConnectBackend { .. })
        ));
        assert!(
            s.next_action().is_none(),
            "read past an AUTH being connected"
        );
        s.on_backend_ready(true);
        let actions = drain(&mut s);
        assert_reply(&actions, "235 2.7.0");
        let Some(Action::Relay { pending }) = actions.last() else {
            panic!("{actions:?}")
        };
        assert_eq!(pending, pipelined);
        s.receive(b"QUIT\r\n");
        assert!(s.next_action().is_none(), "a relayed session reads nothing");
    }

    #[test]
    fn an_overlong_line_closes_through_the_buffer_too() {
        let mut s = session(ListenerKind::Submission);
        s.receive(&vec![b'A'; crate::smtp::line::MAX_LINE + 10]);
        let actions = drain(&mut s);
        assert_reply(&actions, "500 5.5.2");
        assert!(matches!(actions.last(), Some(Action::Close)));
    }

    #[test]
    fn an_mx_backend_that_cannot_take_the_mail_forgets_the_line() {
        let mut s = session(ListenerKind::Mx);
        s.receive(b"EHLO peer\r\nMAIL FROM:<a@b>\r\n");
        drain(&mut s);
        s.on_backend_ready(false);
        assert_reply(&drain(&mut s), "451 4.3.0");
        s.receive(b"MAIL FROM:<x@y>\r\n");
        assert!(matches!(drain(&mut s)[..], [Action::ConnectBackend { .. }]));
        s.on_backend_ready(true);
        let Some(Action::Relay { pending }) = s.next_action() else {
            panic!("no relay")
        };
        assert_eq!(pending, b"MAIL FROM:<x@y>\r\n");
    }

    /// A TLS session whose source runs CRAM-MD5 and SCRAM-SHA-256 (Dovecot).
    fn relaying() -> Session {
        let relayed = [Mechanism::CramMd5, Mechanism::ScramSha256];
        let mut s = session(ListenerKind::ImplicitTls)
            .with_mechanisms(&[Mechanism::Plain, Mechanism::CramMd5, Mechanism::ScramSha256])
            .with_relayed(&relayed);
        s.receive(b"EHLO client.test\r\n");
        drain(&mut s);
        s
    }

    #[test]
    fn ehlo_offers_what_the_source_verifies() {
        let mut s = session(ListenerKind::ImplicitTls)
            .with_mechanisms(&[Mechanism::Plain, Mechanism::ScramSha256])
            .with_relayed(&[Mechanism::ScramSha256]);
        s.receive(b"EHLO client.test\r\n");
        assert!(wire(&drain(&mut s)).contains("250 AUTH PLAIN SCRAM-SHA-256\r\n"));
    }

    #[test]
    fn a_relayed_exchange_passes_each_step_through_and_ends_as_the_source_says() {
        let mut s = relaying();
        // A client that pipelines its answer: it is not read while the source is asked.
        s.receive(b"AUTH SCRAM-SHA-256 biwsbj11c2VyLHI9bm9uY2U=\r\nYz1iaXdz\r\n");
        let actions = drain(&mut s);
        let [Action::SourceSasl(SourceSasl::Start { mechanism, initial })] = &actions[..] else {
            panic!("{actions:?}");
        };
        assert_eq!(*mechanism, Mechanism::ScramSha256);
        assert_eq!(initial.as_deref(), Some(&b"n,,n=user,r=nonce"[..]));
        assert!(s.next_action().is_none());
        s.on_source_reply(SourceReply::Challenge(
            b"r=nonce2,s=c2FsdA==,i=4096".to_vec(),
        ));
        let actions = drain(&mut s);
        assert_eq!(
            wire(&actions),
            "334 cj1ub25jZTIscz1jMkZzZEE9PSxpPTQwOTY=\r\n"
        );
        assert!(
            matches!(&actions[1..], [Action::SourceSasl(SourceSasl::Step(r))] if r == b"c=biws"),
            "{actions:?}"
        );
    }

    #[test]
    fn a_relayed_success_connects_the_backend_as_the_sources_user() {
        let mut s = relaying();
        s.receive(b"AUTH CRAM-MD5\r\n");
        drain(&mut s);
        s.on_source_reply(SourceReply::Challenge(b"<1.2@dovecot>".to_vec()));
        drain(&mut s);
        s.receive(b"dGltIDAxMjM=\r\n");
        drain(&mut s);
        s.on_source_reply(SourceReply::Done(
            Verdict::Valid,
            Some("tim@example".into()),
        ));
        let actions = drain(&mut s);
        let [Action::ConnectBackend { login, .. }] = &actions[..] else {
            panic!("{actions:?}");
        };
        assert_eq!(login.as_deref(), Some("tim@example"));
        s.on_backend_ready(true);
        assert_reply(&drain(&mut s), "235 ");
        assert_eq!(s.authenticated(), Some(("tim@example", Mechanism::CramMd5)));
    }

    #[test]
    fn relayed_failures_cancels_and_an_unavailable_source_get_their_replies() {
        for (line, reply, expected) in [
            (&b"*"[..], None, "501 5.7.0"),
            (b"not base64!", None, "501 5.5.2"),
            (
                b"dGlt",
                Some(SourceReply::Done(Verdict::Invalid, None)),
                "535 5.7.8",
            ),
            (
                b"dGlt",
                Some(SourceReply::Done(Verdict::Unavailable, None)),
                "454 4.7.0",
            ),
        ] {
            let mut s = relaying();
            s.receive(b"AUTH CRAM-MD5\r\n");
            drain(&mut s);
            s.on_source_reply(SourceReply::Challenge(b"<1@x>".to_vec()));
            drain(&mut s);
            s.receive(line);
            s.receive(b"\r\n");
            let mut actions = drain(&mut s);
            if let Some(reply) = reply {
                assert!(matches!(
                    actions[..],
                    [Action::SourceSasl(SourceSasl::Step(_))]
                ));
                s.on_source_reply(reply);
                actions = drain(&mut s);
            } else {
                assert!(
                    matches!(
                        actions.first(),
                        Some(Action::SourceSasl(SourceSasl::Cancel))
                    ),
                    "{actions:?}"
                );
            }
            assert_reply(
                &actions
                    .into_iter()
                    .filter(|a| matches!(a, Action::Reply(_)))
                    .collect::<Vec<_>>(),
                expected,
            );
            // The session takes commands again.
            s.receive(b"NOOP\r\n");
            assert_reply(&drain(&mut s), "250");
        }
    }

    #[test]
    fn a_scram_exchange_is_never_run_by_postern_itself() {
        // Offered only because a source runs it; without a relaying source it is not
        // offered, and asking for it is an unknown mechanism.
        let mut s = greeted_tls();
        s.receive(b"AUTH SCRAM-SHA-256\r\n");
        assert_reply(&drain(&mut s), "504");
    }
}
