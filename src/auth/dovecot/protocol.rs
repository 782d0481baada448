//! The wire format of Dovecot's authentication protocol, client side (sans-IO): line
//! framing, Dovecot's tab-escaping, the server's handshake, the lines a client sends
//! (`VERSION`/`CPID`, `AUTH`, `CONT`, `CANCEL`) and the replies it gets (`OK`, `CONT`,
//! `FAIL`). [`super::connection`] keeps the state of one connection on top of this.
//!
//! The reference is protocol 1.2 as Dovecot 2.3 speaks it. Where the protocol document
//! ("Dovecot Authentication Protocol", doc.dovecot.org, `developer_manual/design/
//! auth_protocol`) is vague or wrong, Dovecot's source decides:
//! - `src/lib/strescape.c` (`str_append_tabescaped`, `str_tabunescape`): escaping.
//! - `src/auth/auth-client-connection.c` and `src/auth/mech.c`: the handshake a server
//!   sends (`VERSION`, the `MECH` lines, `SPID`, `CUID`, `COOKIE`, `DONE`).
//! - `src/auth/auth-request-handler.c`: how the server reads `AUTH`/`CONT` and writes
//!   `OK`/`CONT`/`FAIL`.
//! - `src/lib-auth/auth-client-request.c` and `src/login-common/client-common-auth.c`:
//!   how Dovecot's own clients write `AUTH` and read replies.

use std::fmt;
use std::net::SocketAddr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// The protocol's major version; a server with another one speaks something else and
/// is refused (protocol doc, "Client <-> Server").
pub const MAJOR_VERSION: u32 = 1;
/// The minor version this client sends. 1.2 (Dovecot 2.3) is the first where an empty
/// `resp=` means an empty initial response rather than none (`auth-request-handler.c`).
pub const MINOR_VERSION: u32 = 2;

/// The longest line, LF included, either way: `AUTH_CLIENT_MAX_LINE_LENGTH` in
/// `auth-client-interface.h`. The server drops a client that sends a longer one (and
/// with it every request on the connection), and no reply of its own is longer.
pub const MAX_LINE: usize = 16384;

/// The most `MECH` lines a handshake may carry. Dovecot 2.3 implements 17 mechanisms.
pub const MAX_MECHANISMS: usize = 64;

/// The most lines a handshake may have before `DONE`, unknown ones included.
pub const MAX_HANDSHAKE_LINES: usize = 256;

/// The service name sent with every request: passdbs can tell SMTP from IMAP by it
/// (`%s`, `allow_nets`, PAM service names).
pub const SERVICE: &str = "smtp";

/// The longest `reason=` kept from a `FAIL`, in characters.
pub const MAX_REASON: usize = 200;

/// The longest SASL mechanism name (RFC 4422 §3.1).
const MAX_MECHANISM_NAME: usize = 20;

/// Dovecot's escape character (`strescape.c`).
const ESCAPE: u8 = 0x01;

// === errors ===

/// Dovecot sent something this client cannot accept. The connection it came on is no
/// longer usable: every error here ends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// A line longer than [`MAX_LINE`].
    LineTooLong,
    /// A raw NUL byte in a line (Dovecot escapes NUL as `\x01` `0`).
    Nul,
    /// The first line was not `VERSION`.
    ExpectedVersion,
    /// A major version other than [`MAJOR_VERSION`].
    UnsupportedVersion(u32),
    /// A line of this kind without its required fields, or with a field out of range.
    Malformed(&'static str),
    /// More than [`MAX_HANDSHAKE_LINES`] lines before `DONE`.
    HandshakeTooLong,
    /// More than [`MAX_MECHANISMS`] `MECH` lines.
    TooManyMechanisms,
    /// A reply that is not `OK`, `CONT` or `FAIL`.
    UnknownReply,
    /// A `CONT` whose data is not base64.
    Base64,
    /// An `OK` whose `user=` is not UTF-8.
    NotUtf8,
    /// A reply to a request this connection never sent.
    UnknownId(u32),
    /// A reply to a request that waits for the client's answer, not for Dovecot's.
    Unexpected(u32),
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::LineTooLong => write!(f, "line longer than {MAX_LINE} bytes"),
            ProtocolError::Nul => f.write_str("NUL byte in a line"),
            ProtocolError::ExpectedVersion => f.write_str("handshake does not start with VERSION"),
            ProtocolError::UnsupportedVersion(major) => {
                write!(
                    f,
                    "protocol version {major} (this client speaks {MAJOR_VERSION})"
                )
            }
            ProtocolError::Malformed(what) => write!(f, "malformed {what} line"),
            ProtocolError::HandshakeTooLong => {
                write!(f, "handshake longer than {MAX_HANDSHAKE_LINES} lines")
            }
            ProtocolError::TooManyMechanisms => {
                write!(f, "more than {MAX_MECHANISMS} mechanisms")
            }
            ProtocolError::UnknownReply => f.write_str("unknown reply"),
            ProtocolError::Base64 => f.write_str("CONT data is not base64"),
            ProtocolError::NotUtf8 => f.write_str("user name is not UTF-8"),
            ProtocolError::UnknownId(id) => write!(f, "reply to unknown request {id}"),
            ProtocolError::Unexpected(id) => write!(f, "unexpected reply to request {id}"),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// A line this client would send is longer than [`MAX_LINE`]: Dovecot would drop the
/// connection for it, so it is never sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTooLong;

impl fmt::Display for LineTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request line longer than {MAX_LINE} bytes")
    }
}

impl std::error::Error for LineTooLong {}

// === escaping ===

/// Appends `value` tab-escaped (`str_append_tabescaped_n` in `strescape.c`): NUL, `\x01`,
/// TAB, CR and LF become `\x01` followed by `0`, `1`, `t`, `r`, `n`. Nothing else changes,
/// so an escaped value never contains a field or line separator.
pub fn escape_into(out: &mut Vec<u8>, value: &[u8]) {
    for &byte in value {
        let code = match byte {
            0 => b'0',
            ESCAPE => b'1',
            b'\t' => b't',
            b'\r' => b'r',
            b'\n' => b'n',
            _ => {
                out.push(byte);
                continue;
            }
        };
        out.extend_from_slice(&[ESCAPE, code]);
    }
}

/// `value` tab-escaped (see [`escape_into`]).
pub fn escape(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    escape_into(&mut out, value);
    out
}

/// Undoes [`escape`] the way `str_tabunescape` does: `\x01` followed by any other byte
/// stands for that byte, and a `\x01` at the very end is dropped. (The protocol
/// document lists `l` for LF; Dovecot's code writes and reads `n`.)
pub fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut bytes = field.iter();
    while let Some(&byte) = bytes.next() {
        if byte != ESCAPE {
            out.push(byte);
            continue;
        }
        match bytes.next() {
            Some(b'0') => out.push(0),
            Some(b'1') => out.push(ESCAPE),
            Some(b't') => out.push(b'\t'),
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(&other) => out.push(other),
            None => break,
        }
    }
    out
}

/// The TAB-separated fields of a line, each unescaped (`t_strsplit_tabescaped`).
fn fields(line: &[u8]) -> Vec<Vec<u8>> {
    line.split(|&b| b == b'\t').map(unescape).collect()
}

// === framing ===

/// Bytes from Dovecot, split into lines as they complete. Lines end at LF (a CR before
/// it is dropped, as Dovecot's `i_stream_next_line` does); memory stays under
/// [`MAX_LINE`] plus what one read appended.
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
    /// The first byte not yet returned as part of a line.
    start: usize,
}

impl LineBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the connection.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line without its line end, `Ok(None)` until one is complete.
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, ProtocolError> {
        let pending = &self.buf[self.start..];
        match memchr::memchr(b'\n', pending) {
            Some(end) if end < MAX_LINE => {
                let mut line = &pending[..end];
                if let [rest @ .., b'\r'] = line {
                    line = rest;
                }
                if line.contains(&0) {
                    return Err(ProtocolError::Nul);
                }
                let line = line.to_vec();
                self.start += end + 1;
                Ok(Some(line))
            }
            Some(_) => Err(ProtocolError::LineTooLong),
            None if pending.len() >= MAX_LINE => Err(ProtocolError::LineTooLong),
            None => Ok(None),
        }
    }
}

// === handshake ===

/// What a `MECH` line says about a mechanism (`enum mech_security_flags`,
/// `auth-client-interface.h`). Flags this client does not know are ignored, as the
/// protocol document asks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MechanismFlags {
    /// `private`: not to be advertised as a SASL mechanism (APOP, DOVECOT-TOKEN).
    pub private: bool,
    /// `anonymous`: logs in without credentials (ANONYMOUS).
    pub anonymous: bool,
    /// `plaintext`: the password travels in clear (PLAIN, LOGIN, XOAUTH2).
    pub plaintext: bool,
    /// `dictionary`: open to passive dictionary attacks (CRAM-MD5, DIGEST-MD5).
    pub dictionary: bool,
    /// `active`: open to active (non-dictionary) attacks.
    pub active: bool,
    /// `forward-secrecy`: forward secrecy between sessions.
    pub forward_secrecy: bool,
    /// `mutual-auth`: the server proves itself too (SCRAM).
    pub mutual_auth: bool,
    /// `channel-binding` (protocol 1.3+, Dovecot 2.4): needs TLS channel binding data.
    pub channel_binding: bool,
}

/// One mechanism from the server's handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mechanism {
    name: String,
    flags: MechanismFlags,
}

impl Mechanism {
    /// A mechanism with this name and these flags.
    pub fn new(name: &str, flags: MechanismFlags) -> Mechanism {
        Mechanism {
            name: name.to_owned(),
            flags,
        }
    }

    /// The name as Dovecot spells it (and expects it back in `AUTH`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The flags from its `MECH` line.
    pub fn flags(&self) -> MechanismFlags {
        self.flags
    }

    /// Whether postern may offer it to SMTP clients, who only authenticate over TLS.
    ///
    /// Dovecot's auth service lists every mechanism it would run for any client: the
    /// transport rules (`disable_plaintext_auth`) are enforced by whoever holds the
    /// client connection, Dovecot's login processes or here postern, which takes AUTH
    /// only after TLS, exactly what makes the `plaintext` ones safe. Left out:
    /// - `private`: the protocol document says not to advertise them (APOP needs a
    ///   POP3 greeting, DOVECOT-TOKEN is for Dovecot's own processes).
    /// - `anonymous`: a login without credentials must never open a relay; Postfix
    ///   leaves them out too (its default `smtpd_sasl_security_options = noanonymous`).
    /// - EXTERNAL: Dovecot takes its identity from the client certificate's user name
    ///   (`cert_username`), which postern does not pass, so it could never succeed.
    /// - channel binding (`channel-binding`, `-PLUS` names, RFC 5802 §4): the TLS
    ///   session is postern's, and this protocol version cannot carry its binding data.
    pub fn usable_over_tls(&self) -> bool {
        let flags = self.flags;
        !(flags.private
            || flags.anonymous
            || flags.channel_binding
            || self.name.eq_ignore_ascii_case("EXTERNAL")
            || self.name.to_ascii_uppercase().ends_with("-PLUS"))
    }
}

/// What the server said between connecting and `DONE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// The server's minor version (the major one is [`MAJOR_VERSION`]).
    pub minor_version: u32,
    /// Every mechanism listed, in the server's order, usable or not.
    pub mechanisms: Vec<Mechanism>,
    /// `SPID`: the auth server's process id.
    pub server_pid: Option<u32>,
    /// `CUID`: this connection's id in the server.
    pub connection_id: Option<u32>,
    /// `COOKIE`: for master `REQUEST`s, which postern does not make.
    pub cookie: Option<String>,
}

impl Handshake {
    /// The mechanisms postern can offer, in the server's order (see
    /// [`Mechanism::usable_over_tls`]).
    pub fn usable_mechanisms(&self) -> impl Iterator<Item = &Mechanism> {
        self.mechanisms.iter().filter(|m| m.usable_over_tls())
    }

    /// The usable mechanism called `name`, ignoring ASCII case (RFC 4422 §3.1).
    pub fn find_usable(&self, name: &str) -> Option<&Mechanism> {
        self.usable_mechanisms()
            .find(|m| m.name.eq_ignore_ascii_case(name))
    }
}

/// Reads the server's handshake line by line.
#[derive(Debug, Default)]
pub struct HandshakeParser {
    minor_version: Option<u32>,
    mechanisms: Vec<Mechanism>,
    server_pid: Option<u32>,
    connection_id: Option<u32>,
    cookie: Option<String>,
    lines: usize,
}

impl HandshakeParser {
    /// A parser waiting for the `VERSION` line.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one line; returns the handshake once `DONE` arrives.
    ///
    /// `VERSION` must come first (Dovecot sends it before anything else, and a major
    /// version other than 1 is another protocol). The other lines may come in any order.
    /// Unknown commands are skipped: a server may add handshake lines in a minor
    /// version, which "can be ignored" (protocol document). Dovecot's own client refuses
    /// them; skipping costs nothing here, and [`MAX_HANDSHAKE_LINES`] bounds them.
    pub fn line(&mut self, line: &[u8]) -> Result<Option<Handshake>, ProtocolError> {
        self.lines += 1;
        if self.lines > MAX_HANDSHAKE_LINES {
            return Err(ProtocolError::HandshakeTooLong);
        }
        let fields = fields(line);
        let (command, args) = match fields.split_first() {
            Some((command, args)) => (command.as_slice(), args),
            None => return Err(ProtocolError::Malformed("handshake")),
        };
        if self.minor_version.is_none() {
            if command != b"VERSION" {
                return Err(ProtocolError::ExpectedVersion);
            }
            let (Some(major), Some(minor)) = (
                args.first().and_then(|a| parse_u32(a)),
                args.get(1).and_then(|a| parse_u32(a)),
            ) else {
                return Err(ProtocolError::Malformed("VERSION"));
            };
            if major != MAJOR_VERSION {
                return Err(ProtocolError::UnsupportedVersion(major));
            }
            self.minor_version = Some(minor);
            return Ok(None);
        }
        match command {
            b"VERSION" => return Err(ProtocolError::Malformed("second VERSION")),
            b"MECH" => self.mechanism(args)?,
            b"SPID" => self.server_pid = Some(required_u32(args, "SPID")?),
            b"CUID" => self.connection_id = Some(required_u32(args, "CUID")?),
            b"COOKIE" => {
                let cookie = args.first().ok_or(ProtocolError::Malformed("COOKIE"))?;
                self.cookie = Some(String::from_utf8_lossy(cookie).into_owned());
            }
            b"DONE" => {
                return Ok(Some(Handshake {
                    minor_version: self.minor_version.unwrap_or(0),
                    mechanisms: std::mem::take(&mut self.mechanisms),
                    server_pid: self.server_pid,
                    connection_id: self.connection_id,
                    cookie: self.cookie.take(),
                }));
            }
            _ => {}
        }
        Ok(None)
    }

    /// `MECH <name> [<flag>...]` (`mech_register_add` in `mech.c`).
    fn mechanism(&mut self, args: &[Vec<u8>]) -> Result<(), ProtocolError> {
        let Some((name, flag_fields)) = args.split_first() else {
            return Err(ProtocolError::Malformed("MECH"));
        };
        if name.is_empty() {
            return Err(ProtocolError::Malformed("MECH"));
        }
        if self.mechanisms.len() >= MAX_MECHANISMS {
            return Err(ProtocolError::TooManyMechanisms);
        }
        // The name goes into postern's EHLO line and back into AUTH: one that is not an
        // RFC 4422 mechanism name could be neither, so it is left out rather than failing
        // the whole handshake over a mechanism postern would never use.
        let Some(name) = mechanism_name(name) else {
            return Ok(());
        };
        if self.mechanisms.iter().any(|m| m.name == name) {
            return Ok(());
        }
        let mut flags = MechanismFlags::default();
        for flag in flag_fields {
            match flag.as_slice() {
                b"private" => flags.private = true,
                b"anonymous" => flags.anonymous = true,
                b"plaintext" => flags.plaintext = true,
                b"dictionary" => flags.dictionary = true,
                b"active" => flags.active = true,
                b"forward-secrecy" => flags.forward_secrecy = true,
                b"mutual-auth" => flags.mutual_auth = true,
                b"channel-binding" => flags.channel_binding = true,
                _ => {}
            }
        }
        self.mechanisms.push(Mechanism { name, flags });
        Ok(())
    }
}

/// `name` if it is an RFC 4422 §3.1 mechanism name: 1 to 20 letters, digits, `-`, `_`
/// (lowercase letters allowed: names compare without case).
fn mechanism_name(name: &[u8]) -> Option<String> {
    let valid = (1..=MAX_MECHANISM_NAME).contains(&name.len())
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    valid.then(|| String::from_utf8_lossy(name).into_owned())
}

/// A decimal `u32` with digits only: no sign, no blanks, no empty string.
fn parse_u32(field: &[u8]) -> Option<u32> {
    if field.is_empty() || field.len() > 10 || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(field).ok()?.parse().ok()
}

fn required_u32(args: &[Vec<u8>], what: &'static str) -> Result<u32, ProtocolError> {
    args.first()
        .and_then(|a| parse_u32(a))
        .ok_or(ProtocolError::Malformed(what))
}

// === requests ===

/// `VERSION` and `CPID`: the client's half of the handshake, sent on connecting.
/// Dovecot refuses PID 0 ("BUG: Authentication client said it's PID 0"), so 0 is sent
/// as 1; an auth-only client's PID is otherwise ignored (`auth-client-connection.c`).
pub fn client_handshake(pid: u32) -> Vec<u8> {
    format!(
        "VERSION\t{MAJOR_VERSION}\t{MINOR_VERSION}\nCPID\t{}\n",
        pid.max(1)
    )
    .into_bytes()
}

/// Who is authenticating, for Dovecot's logs, its auth penalty and passdb rules
/// (`%{rip}`, `allow_nets`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientInfo {
    /// The SMTP client's address: `rip=`, `rport=`.
    pub remote: Option<SocketAddr>,
    /// The address it connected to: `lip=`, `lport=`.
    pub local: Option<SocketAddr>,
    /// The TLS SNI name it asked for: `local_name=`.
    pub local_name: Option<String>,
    /// A session id for Dovecot's logs: `session=`.
    pub session: Option<String>,
}

/// What goes into one `AUTH` line besides the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthRequest<'a> {
    /// The request id (never 0: Dovecot refuses it).
    pub id: u32,
    /// The mechanism, spelled as the server's handshake spells it.
    pub mechanism: &'a str,
    /// The SASL initial response, decoded; `Some(b"")` is an empty one (SMTP's `=`).
    pub initial_response: Option<&'a [u8]>,
    /// Send `no-penalty`: Dovecot then skips its own failure delay per client address.
    pub no_penalty: bool,
}

/// `AUTH <id> <mechanism> service=smtp secured=tls [...] [resp=<base64>]`.
///
/// `secured=tls` is always sent, as postern takes AUTH only over TLS (Dovecot's login
/// processes send the same for their TLS clients): passdbs and the auth policy server
/// see it (`%{secured}`, `auth-policy.c`). The order follows Dovecot's own client (`auth_server_send_new_request`); `resp=`
/// must be last (protocol document: everything after it is ignored).
pub fn encode_auth(request: &AuthRequest<'_>, client: &ClientInfo) -> Result<Vec<u8>, LineTooLong> {
    let mut line = Vec::with_capacity(256);
    line.extend_from_slice(format!("AUTH\t{}\t", request.id).as_bytes());
    escape_into(&mut line, request.mechanism.as_bytes());
    line.extend_from_slice(b"\tservice=");
    line.extend_from_slice(SERVICE.as_bytes());
    line.extend_from_slice(b"\tsecured=tls");
    if request.no_penalty {
        line.extend_from_slice(b"\tno-penalty");
    }
    if let Some(session) = &client.session {
        line.extend_from_slice(b"\tsession=");
        escape_into(&mut line, session.as_bytes());
    }
    // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d; Dovecot's
    // penalty and allow_nets want a.b.c.d.
    if let Some(local) = client.local {
        line.extend_from_slice(format!("\tlip={}", local.ip().to_canonical()).as_bytes());
    }
    if let Some(remote) = client.remote {
        line.extend_from_slice(format!("\trip={}", remote.ip().to_canonical()).as_bytes());
    }
    if let Some(local) = client.local.filter(|a| a.port() != 0) {
        line.extend_from_slice(format!("\tlport={}", local.port()).as_bytes());
    }
    if let Some(remote) = client.remote.filter(|a| a.port() != 0) {
        line.extend_from_slice(format!("\trport={}", remote.port()).as_bytes());
    }
    if let Some(name) = client.local_name.as_deref().filter(|n| !n.is_empty()) {
        line.extend_from_slice(b"\tlocal_name=");
        escape_into(&mut line, name.as_bytes());
    }
    if let Some(response) = request.initial_response {
        // Empty encodes as `resp=`: an empty initial response from protocol 1.2 on.
        line.extend_from_slice(b"\tresp=");
        line.extend_from_slice(STANDARD.encode(response).as_bytes());
    }
    finish_line(line)
}

/// `CONT <id> <base64>`: the client's answer to a challenge.
pub fn encode_cont(id: u32, response: &[u8]) -> Result<Vec<u8>, LineTooLong> {
    let mut line = format!("CONT\t{id}\t").into_bytes();
    line.extend_from_slice(STANDARD.encode(response).as_bytes());
    finish_line(line)
}

/// `CANCEL <id>`: the client gave up (SMTP `*`); Dovecot forgets the request and sends
/// nothing back (`auth_request_handler_cancel_request`).
pub fn encode_cancel(id: u32) -> Vec<u8> {
    format!("CANCEL\t{id}\n").into_bytes()
}

fn finish_line(mut line: Vec<u8>) -> Result<Vec<u8>, LineTooLong> {
    line.push(b'\n');
    if line.len() > MAX_LINE {
        return Err(LineTooLong);
    }
    Ok(line)
}

// === replies ===

/// A reply from the server to one request.
#[derive(Clone, PartialEq, Eq)]
pub enum Reply {
    /// `OK <id> user=<user> [...]`.
    Ok {
        id: u32,
        /// The user as Dovecot knows them (after `username_format` and the like): the
        /// name postern should use from now on.
        user: String,
        /// `nologin`: the password was right but the passdb forbids the login.
        nologin: bool,
        /// `reason=`, sanitised (see [`Reply::Fail`]).
        reason: Option<String>,
    },
    /// `CONT <id> <base64>`: a challenge for the client, decoded.
    Cont { id: u32, challenge: Vec<u8> },
    /// `FAIL <id> [...]`.
    Fail {
        id: u32,
        /// `user=`, if Dovecot got as far as a user name (lossy UTF-8).
        user: Option<String>,
        /// `reason=`: Dovecot's text for the client, with control characters replaced
        /// and cut to [`MAX_REASON`] characters, so it can go into a reply line.
        reason: Option<String>,
        /// `code=temp_fail` (2.3) or `temp` (2.2): an internal failure (a passdb down),
        /// not a wrong password.
        temporary: bool,
        /// `code=`, if any (`temp_fail`, `authz_fail`, `user_disabled`, ...).
        code: Option<String>,
    },
}

impl Reply {
    /// The request this reply is for.
    pub fn id(&self) -> u32 {
        match self {
            Reply::Ok { id, .. } | Reply::Cont { id, .. } | Reply::Fail { id, .. } => *id,
        }
    }

    /// Parses one line received after the handshake.
    pub fn parse(line: &[u8]) -> Result<Reply, ProtocolError> {
        let fields = fields(line);
        let (command, args) = match fields.split_first() {
            Some((command, args)) => (command.as_slice(), args),
            None => return Err(ProtocolError::UnknownReply),
        };
        let what = match command {
            b"OK" => "OK",
            b"CONT" => "CONT",
            b"FAIL" => "FAIL",
            _ => return Err(ProtocolError::UnknownReply),
        };
        let Some((id, params)) = args.split_first() else {
            return Err(ProtocolError::Malformed(what));
        };
        let id = parse_u32(id).ok_or(ProtocolError::Malformed(what))?;
        if command == b"CONT" {
            // The challenge is positional, and Dovecot writes it unescaped (base64 has
            // no byte to escape). An empty one is valid: PLAIN asks for its message so.
            let data = params.first().ok_or(ProtocolError::Malformed("CONT"))?;
            let challenge = STANDARD.decode(data).map_err(|_| ProtocolError::Base64)?;
            return Ok(Reply::Cont { id, challenge });
        }
        let mut user = None;
        let mut reason = None;
        let mut code = None;
        let mut nologin = false;
        let mut temp = false;
        for param in params {
            let (name, value) = match param.iter().position(|&b| b == b'=') {
                Some(eq) => (&param[..eq], Some(&param[eq + 1..])),
                None => (param.as_slice(), None),
            };
            match (name, value) {
                (b"user", Some(value)) => user = Some(value),
                (b"reason", Some(value)) => reason = Some(sanitize(value)),
                (b"code", Some(value)) => code = Some(String::from_utf8_lossy(value).into_owned()),
                (b"nologin", _) => nologin = true,
                (b"temp", _) => temp = true,
                _ => {}
            }
        }
        if command == b"OK" {
            let user = match user {
                Some(user) if !user.is_empty() => {
                    String::from_utf8(user.to_vec()).map_err(|_| ProtocolError::NotUtf8)?
                }
                _ => return Err(ProtocolError::Malformed("OK")),
            };
            return Ok(Reply::Ok {
                id,
                user,
                nologin,
                reason,
            });
        }
        let temporary = temp || code.as_deref() == Some("temp_fail");
        Ok(Reply::Fail {
            id,
            user: user.map(|u| String::from_utf8_lossy(u).into_owned()),
            reason,
            temporary,
            code,
        })
    }

    /// What this reply means for the SASL exchange.
    ///
    /// An `OK` with `nologin` is a failure: Dovecot's own login processes refuse such a
    /// login (`client_auth_handle_reply`), and a passdb says `nologin` precisely to
    /// keep a user with the right password out.
    pub fn into_step(self) -> Step {
        match self {
            Reply::Cont { challenge, .. } => Step::Challenge(challenge),
            Reply::Ok {
                user,
                nologin: false,
                ..
            } => Step::Success { user },
            Reply::Ok { user, reason, .. } => Step::Failure {
                temporary: false,
                reason,
                user: Some(user),
            },
            Reply::Fail {
                user,
                reason,
                temporary,
                ..
            } => Step::Failure {
                temporary,
                reason,
                user,
            },
        }
    }
}

// Written by hand: a challenge can carry secrets (a CRAM-MD5 nonce is harmless, but
// GSSAPI and SCRAM data should not end up in logs).
impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Ok {
                id,
                user,
                nologin,
                reason,
            } => f
                .debug_struct("Ok")
                .field("id", id)
                .field("user", user)
                .field("nologin", nologin)
                .field("reason", reason)
                .finish(),
            Reply::Cont { id, challenge } => f
                .debug_struct("Cont")
                .field("id", id)
                .field("challenge", &format_args!("<{} bytes>", challenge.len()))
                .finish(),
            Reply::Fail {
                id,
                user,
                reason,
                temporary,
                code,
            } => f
                .debug_struct("Fail")
                .field("id", id)
                .field("user", user)
                .field("reason", reason)
                .field("temporary", temporary)
                .field("code", code)
                .finish(),
        }
    }
}

/// `reason=` made safe for a reply line: lossy UTF-8, control characters as spaces, at
/// most [`MAX_REASON`] characters.
fn sanitize(value: &[u8]) -> String {
    String::from_utf8_lossy(value)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON)
        .collect()
}

/// Where one SASL exchange stands after a reply from Dovecot.
#[derive(Clone, PartialEq, Eq)]
pub enum Step {
    /// Send this challenge to the client (base64 after `334 `) and pass its answer on.
    Challenge(Vec<u8>),
    /// Authenticated as `user` (Dovecot's spelling of the name).
    Success {
        /// The user name Dovecot settled on.
        user: String,
    },
    /// Not authenticated.
    Failure {
        /// Dovecot could not check (a passdb down): answer `454 4.7.0`, not `535`.
        temporary: bool,
        /// Dovecot's text for the client, sanitised (see [`Reply::Fail`]).
        reason: Option<String>,
        /// The user name Dovecot saw, if any: for per-user failure windows.
        user: Option<String>,
    },
}

impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Challenge(challenge) => f
                .debug_tuple("Challenge")
                .field(&format_args!("<{} bytes>", challenge.len()))
                .finish(),
            Step::Success { user } => f.debug_struct("Success").field("user", user).finish(),
            Step::Failure {
                temporary,
                reason,
                user,
            } => f
                .debug_struct("Failure")
                .field("temporary", temporary)
                .field("reason", reason)
                .field("user", user)
                .finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The handshake Dovecot 2.3.19 sent for
    /// `auth_mechanisms = plain login cram-md5 scram-sha-256`.
    const HANDSHAKE_2_3: &[u8] = b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n\
MECH\tCRAM-MD5\tdictionary\tactive\nMECH\tSCRAM-SHA-256\tmutual-auth\nSPID\t8309\nCUID\t1\n\
COOKIE\taec3a25adcb5e6391ddb0ff26eee4b52\nDONE\n";

    fn lines_of(wire: &[u8]) -> Vec<Vec<u8>> {
        let mut buffer = LineBuffer::new();
        buffer.extend(wire);
        let mut lines = Vec::new();
        while let Some(line) = buffer.next_line().expect("framing") {
            lines.push(line);
        }
        lines
    }

    /// Feeds `wire` to a fresh parser in the given chunks and returns what it made of it.
    fn handshake_in_chunks(chunks: &[&[u8]]) -> Result<Option<Handshake>, ProtocolError> {
        let mut buffer = LineBuffer::new();
        let mut parser = HandshakeParser::new();
        for chunk in chunks {
            buffer.extend(chunk);
            while let Some(line) = buffer.next_line()? {
                if let Some(done) = parser.line(&line)? {
                    return Ok(Some(done));
                }
            }
        }
        Ok(None)
    }

    fn handshake(wire: &[u8]) -> Result<Option<Handshake>, ProtocolError> {
        handshake_in_chunks(&[wire])
    }

    fn names(handshake: &Handshake) -> Vec<&str> {
        handshake.usable_mechanisms().map(|m| m.name()).collect()
    }

    #[test]
    fn escaping_follows_strescape_c() {
        for (name, raw, escaped) in [
            ("plain", &b"alice"[..], &b"alice"[..]),
            ("empty", b"", b""),
            ("tab", b"a\tb", b"a\x01tb"),
            ("lf", b"a\nb", b"a\x01nb"),
            ("cr", b"a\rb", b"a\x01rb"),
            ("nul", b"a\0b", b"a\x010b"),
            ("escape char", b"a\x01b", b"a\x011b"),
            ("backslash untouched", b"a\\b", b"a\\b"),
            ("all", b"\t\n\r\0\x01", b"\x01t\x01n\x01r\x010\x011"),
            (
                "utf-8 untouched",
                "j\u{f6}rg".as_bytes(),
                "j\u{f6}rg".as_bytes(),
            ),
        ] {
            assert_eq!(escape(raw), escaped, "escape {name}");
            assert_eq!(unescape(escaped), raw, "unescape {name}");
        }
    }

    #[test]
    fn unescaping_is_total_like_str_tabunescape() {
        for (name, escaped, raw) in [
            ("unknown code is the byte", &b"a\x01xb"[..], &b"axb"[..]),
            ("doc's `l` is just l", b"\x01l", b"l"),
            ("trailing escape dropped", b"ab\x01", b"ab"),
            ("lone escape", b"\x01", b""),
            ("escaped escape then code", b"\x011t", b"\x01t"),
        ] {
            assert_eq!(unescape(escaped), raw, "{name}");
        }
    }

    proptest::proptest! {
        #[test]
        fn escaping_round_trips_and_never_leaves_separators(
            value in proptest::collection::vec(proptest::num::u8::ANY, 0..64)
        ) {
            let escaped = escape(&value);
            proptest::prop_assert!(!escaped.iter().any(|b| matches!(b, b'\t' | b'\n' | b'\r' | 0)));
            proptest::prop_assert_eq!(unescape(&escaped), value);
        }
    }

    #[test]
    fn parses_dovecot_2_3_handshake() {
        let done = handshake(HANDSHAKE_2_3).unwrap().expect("DONE");
        assert_eq!(done.minor_version, 2);
        assert_eq!(done.server_pid, Some(8309));
        assert_eq!(done.connection_id, Some(1));
        assert_eq!(
            done.cookie.as_deref(),
            Some("aec3a25adcb5e6391ddb0ff26eee4b52")
        );
        assert_eq!(
            names(&done),
            ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"]
        );
        let cram = &done.mechanisms[2];
        assert_eq!(
            cram.flags(),
            MechanismFlags {
                dictionary: true,
                active: true,
                ..MechanismFlags::default()
            }
        );
        assert!(done.mechanisms[0].flags().plaintext);
        assert!(done.mechanisms[3].flags().mutual_auth);
        assert_eq!(
            done.find_usable("cram-md5").map(Mechanism::name),
            Some("CRAM-MD5")
        );
        assert_eq!(done.find_usable("DIGEST-MD5"), None);
    }

    #[test]
    fn every_prefix_and_every_split_of_the_handshake_parses_the_same() {
        let whole = handshake(HANDSHAKE_2_3).unwrap().expect("DONE");
        for cut in 0..HANDSHAKE_2_3.len() {
            // A prefix alone is never a handshake, and never an error.
            assert_eq!(handshake(&HANDSHAKE_2_3[..cut]), Ok(None), "prefix {cut}");
            let (a, b) = HANDSHAKE_2_3.split_at(cut);
            assert_eq!(
                handshake_in_chunks(&[a, b]).as_ref(),
                Ok(&Some(whole.clone())),
                "split at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = HANDSHAKE_2_3.chunks(1).collect();
        assert_eq!(handshake_in_chunks(&bytes), Ok(Some(whole)));
    }

    #[test]
    fn which_mechanisms_are_usable_over_tls() {
        let wire = b"VERSION\t1\t2\n\
MECH\tPLAIN\tplaintext\n\
MECH\tAPOP\tprivate\tdictionary\tactive\n\
MECH\tANONYMOUS\tanonymous\n\
MECH\tDOVECOT-TOKEN\tprivate\n\
MECH\tEXTERNAL\n\
MECH\tSCRAM-SHA-256-PLUS\tmutual-auth\tchannel-binding\n\
MECH\tOTP\tdictionary\tactive\n\
MECH\tGSSAPI\n\
MECH\tXOAUTH2\tplaintext\n\
MECH\tNEW-MECH\tsome-future-flag\n\
DONE\n";
        let done = handshake(wire).unwrap().expect("DONE");
        assert_eq!(done.mechanisms.len(), 10);
        assert_eq!(
            names(&done),
            ["PLAIN", "OTP", "GSSAPI", "XOAUTH2", "NEW-MECH"]
        );
    }

    #[test]
    fn handshake_tolerates_order_unknown_lines_and_odd_mechanisms() {
        let wire = b"VERSION\t1\t3\nSPID\t1\nFUTURE\tthing\nMECH\tPLAIN\nMECH\tPLAIN\tprivate\n\
MECH\thas space\nMECH\tWAY-TOO-LONG-A-MECHANISM-NAME\nMECH\tLOGIN\nCUID\t7\nDONE\n";
        let done = handshake(wire).unwrap().expect("DONE");
        assert_eq!(done.minor_version, 3);
        // The duplicate keeps the first flags; invalid names are skipped.
        assert_eq!(names(&done), ["PLAIN", "LOGIN"]);
        assert_eq!(done.cookie, None);
        let none = handshake(b"VERSION\t1\t2\nDONE\n").unwrap().expect("DONE");
        assert!(none.mechanisms.is_empty());
    }

    #[test]
    fn hostile_handshakes_are_errors() {
        let many_mechs: Vec<u8> = (0..=MAX_MECHANISMS)
            .flat_map(|i| format!("MECH\tM{i}\n").into_bytes())
            .collect();
        let many_lines: Vec<u8> = b"VERSION\t1\t2\n"
            .iter()
            .copied()
            .chain((0..MAX_HANDSHAKE_LINES).flat_map(|_| b"X\n".iter().copied()))
            .collect();
        let overlong = [b"VERSION\t1\t2\nMECH\t".as_slice(), &vec![b'A'; MAX_LINE]].concat();
        for (name, wire, error) in [
            (
                "not VERSION first",
                b"MECH\tPLAIN\n".to_vec(),
                ProtocolError::ExpectedVersion,
            ),
            (
                "empty first line",
                b"\n".to_vec(),
                ProtocolError::ExpectedVersion,
            ),
            (
                "major 2",
                b"VERSION\t2\t0\n".to_vec(),
                ProtocolError::UnsupportedVersion(2),
            ),
            (
                "no minor",
                b"VERSION\t1\n".to_vec(),
                ProtocolError::Malformed("VERSION"),
            ),
            (
                "signed",
                b"VERSION\t+1\t2\n".to_vec(),
                ProtocolError::Malformed("VERSION"),
            ),
            (
                "overflow",
                b"VERSION\t1\t99999999999\n".to_vec(),
                ProtocolError::Malformed("VERSION"),
            ),
            (
                "second VERSION",
                b"VERSION\t1\t2\nVERSION\t1\t2\n".to_vec(),
                ProtocolError::Malformed("second VERSION"),
            ),
            (
                "MECH without name",
                b"VERSION\t1\t2\nMECH\n".to_vec(),
                ProtocolError::Malformed("MECH"),
            ),
            (
                "MECH empty name",
                b"VERSION\t1\t2\nMECH\t\tplaintext\n".to_vec(),
                ProtocolError::Malformed("MECH"),
            ),
            (
                "bad SPID",
                b"VERSION\t1\t2\nSPID\tx\n".to_vec(),
                ProtocolError::Malformed("SPID"),
            ),
            (
                "bad CUID",
                b"VERSION\t1\t2\nCUID\n".to_vec(),
                ProtocolError::Malformed("CUID"),
            ),
            (
                "no COOKIE",
                b"VERSION\t1\t2\nCOOKIE\n".to_vec(),
                ProtocolError::Malformed("COOKIE"),
            ),
            (
                "NUL",
                b"VERSION\t1\t2\nMECH\tPL\0AIN\n".to_vec(),
                ProtocolError::Nul,
            ),
            (
                "too many mechanisms",
                [b"VERSION\t1\t2\n".as_slice(), &many_mechs].concat(),
                ProtocolError::TooManyMechanisms,
            ),
            (
                "too many lines",
                many_lines,
                ProtocolError::HandshakeTooLong,
            ),
            (
                "overlong line",
                overlong.clone(),
                ProtocolError::LineTooLong,
            ),
            (
                "overlong line with LF",
                [overlong.as_slice(), b"\n"].concat(),
                ProtocolError::LineTooLong,
            ),
        ] {
            assert_eq!(handshake(&wire), Err(error), "{name}");
        }
    }

    #[test]
    fn framing_takes_lf_drops_cr_and_bounds_lines() {
        assert_eq!(lines_of(b"a\nb\r\n\nc"), [&b"a"[..], b"b", b""]);
        let longest = [vec![b'x'; MAX_LINE - 1], b"\n".to_vec()].concat();
        assert_eq!(lines_of(&longest), [vec![b'x'; MAX_LINE - 1]]);
        let mut buffer = LineBuffer::new();
        buffer.extend(&vec![b'x'; MAX_LINE - 1]);
        assert_eq!(buffer.next_line(), Ok(None));
        buffer.extend(b"x");
        assert_eq!(buffer.next_line(), Err(ProtocolError::LineTooLong));
        // Consumed lines do not count towards the bound.
        let mut buffer = LineBuffer::new();
        for _ in 0..10 {
            buffer.extend(&[vec![b'y'; MAX_LINE / 2], b"\n".to_vec()].concat());
            assert!(buffer.next_line().unwrap().is_some());
        }
    }

    #[test]
    fn client_handshake_bytes() {
        assert_eq!(client_handshake(4242), b"VERSION\t1\t2\nCPID\t4242\n");
        assert_eq!(client_handshake(0), b"VERSION\t1\t2\nCPID\t1\n");
    }

    #[test]
    fn auth_lines() {
        let full = ClientInfo {
            remote: Some("[2001:db8::7]:50123".parse().unwrap()),
            local: Some("192.0.2.1:587".parse().unwrap()),
            local_name: Some("mail.example\tevil=1".into()),
            session: Some("s1".into()),
        };
        let mapped = ClientInfo {
            remote: Some("[::ffff:198.51.100.9]:4000".parse().unwrap()),
            local: Some("[::ffff:192.0.2.1]:0".parse().unwrap()),
            ..ClientInfo::default()
        };
        let request = |mechanism, initial_response, no_penalty| AuthRequest {
            id: 7,
            mechanism,
            initial_response,
            no_penalty,
        };
        for (name, request, client, line) in [
            (
                "bare",
                request("LOGIN", None, false),
                ClientInfo::default(),
                "AUTH\t7\tLOGIN\tservice=smtp\tsecured=tls\n",
            ),
            (
                "initial response",
                request("PLAIN", Some(&b"\0alice\0secret"[..]), false),
                ClientInfo::default(),
                "AUTH\t7\tPLAIN\tservice=smtp\tsecured=tls\tresp=AGFsaWNlAHNlY3JldA==\n",
            ),
            (
                "empty initial response",
                request("PLAIN", Some(&b""[..]), false),
                ClientInfo::default(),
                "AUTH\t7\tPLAIN\tservice=smtp\tsecured=tls\tresp=\n",
            ),
            (
                "everything, SNI escaped, resp last",
                request("PLAIN", Some(&b"x"[..]), true),
                full,
                "AUTH\t7\tPLAIN\tservice=smtp\tsecured=tls\tno-penalty\tsession=s1\t\
                 lip=192.0.2.1\trip=2001:db8::7\tlport=587\trport=50123\t\
                 local_name=mail.example\x01tevil=1\tresp=eA==\n",
            ),
            (
                "mapped IPv4, port 0 left out",
                request("CRAM-MD5", None, false),
                mapped,
                "AUTH\t7\tCRAM-MD5\tservice=smtp\tsecured=tls\tlip=192.0.2.1\t\
                 rip=198.51.100.9\trport=4000\n",
            ),
        ] {
            let got = encode_auth(&request, &client).expect(name);
            assert_eq!(String::from_utf8_lossy(&got), line, "{name}");
        }
    }

    #[test]
    fn request_lines_never_exceed_the_server_limit() {
        // base64 of n bytes is 4*ceil(n/3); "CONT\t1\t" is 7 and the LF 1.
        let fits = (MAX_LINE - 8) / 4 * 3;
        assert_eq!(
            encode_cont(1, &vec![0; fits]).map(|l| l.len()),
            Ok(MAX_LINE)
        );
        assert_eq!(encode_cont(1, &vec![0; fits + 1]), Err(LineTooLong));
        let huge = vec![0; MAX_LINE];
        let request = AuthRequest {
            id: 1,
            mechanism: "PLAIN",
            initial_response: Some(&huge),
            no_penalty: false,
        };
        assert_eq!(
            encode_auth(&request, &ClientInfo::default()),
            Err(LineTooLong)
        );
        assert_eq!(encode_cont(3, b"").unwrap(), b"CONT\t3\t\n");
        assert_eq!(encode_cancel(3), b"CANCEL\t3\n");
    }

    #[test]
    fn replies_from_dovecot() {
        let fail = |id, user: Option<&str>, reason: Option<&str>, temporary, code: Option<&str>| {
            Reply::Fail {
                id,
                user: user.map(Into::into),
                reason: reason.map(Into::into),
                temporary,
                code: code.map(Into::into),
            }
        };
        for (name, line, reply) in [
            (
                "OK",
                &b"OK\t1\tuser=alice"[..],
                Reply::Ok {
                    id: 1,
                    user: "alice".into(),
                    nologin: false,
                    reason: None,
                },
            ),
            (
                "OK with extra fields",
                b"OK\t2\tuser=al\x01tice\toriginal_user=x\tpass=hidden\tproxy",
                Reply::Ok {
                    id: 2,
                    user: "al\tice".into(),
                    nologin: false,
                    reason: None,
                },
            ),
            (
                "OK nologin",
                b"OK\t3\tuser=bob\tnologin\treason=Use\x01nanother server",
                Reply::Ok {
                    id: 3,
                    user: "bob".into(),
                    nologin: true,
                    reason: Some("Use another server".into()),
                },
            ),
            (
                "CONT",
                b"CONT\t4\tVXNlcm5hbWU6",
                Reply::Cont {
                    id: 4,
                    challenge: b"Username:".to_vec(),
                },
            ),
            (
                "CONT empty",
                b"CONT\t4\t",
                Reply::Cont {
                    id: 4,
                    challenge: Vec::new(),
                },
            ),
            ("FAIL bare", b"FAIL\t5", fail(5, None, None, false, None)),
            (
                "FAIL with user",
                b"FAIL\t2\tuser=alice",
                fail(2, Some("alice"), None, false, None),
            ),
            (
                "FAIL 2.3 tempfail",
                b"FAIL\t6\tuser=alice\tcode=temp_fail",
                fail(6, Some("alice"), None, true, Some("temp_fail")),
            ),
            (
                "FAIL 2.2 temp",
                b"FAIL\t6\ttemp",
                fail(6, None, None, true, None),
            ),
            (
                "FAIL invalid base64",
                b"FAIL\t6\tcode=invalid_base64\treason=Invalid base64 data in initial response",
                fail(
                    6,
                    None,
                    Some("Invalid base64 data in initial response"),
                    false,
                    Some("invalid_base64"),
                ),
            ),
            (
                "FAIL timed out",
                b"FAIL\t99\treason=Authentication request timed out",
                fail(
                    99,
                    None,
                    Some("Authentication request timed out"),
                    false,
                    None,
                ),
            ),
            (
                "FAIL user disabled",
                b"FAIL\t8\tuser=eve\tcode=user_disabled",
                fail(8, Some("eve"), None, false, Some("user_disabled")),
            ),
            (
                "CR before LF already stripped; reason controls replaced",
                b"FAIL\t9\treason=a\x01r\x01nb\x1bc",
                fail(9, None, Some("a  b c"), false, None),
            ),
        ] {
            assert_eq!(Reply::parse(line), Ok(reply), "{name}");
        }
    }

    #[test]
    fn hostile_replies_are_errors() {
        for (name, line, error) in [
            ("empty", &b""[..], ProtocolError::UnknownReply),
            ("unknown", b"USER\t1\talice", ProtocolError::UnknownReply),
            ("lowercase", b"ok\t1\tuser=a", ProtocolError::UnknownReply),
            (
                "handshake line",
                b"MECH\tPLAIN",
                ProtocolError::UnknownReply,
            ),
            ("no id", b"OK", ProtocolError::Malformed("OK")),
            ("empty id", b"FAIL\t", ProtocolError::Malformed("FAIL")),
            (
                "id not a number",
                b"OK\tone\tuser=a",
                ProtocolError::Malformed("OK"),
            ),
            (
                "negative id",
                b"OK\t-1\tuser=a",
                ProtocolError::Malformed("OK"),
            ),
            (
                "id overflow",
                b"FAIL\t4294967296",
                ProtocolError::Malformed("FAIL"),
            ),
            ("OK without user", b"OK\t1", ProtocolError::Malformed("OK")),
            (
                "OK empty user",
                b"OK\t1\tuser=",
                ProtocolError::Malformed("OK"),
            ),
            (
                "OK user not UTF-8",
                b"OK\t1\tuser=\xff",
                ProtocolError::NotUtf8,
            ),
            (
                "CONT without data",
                b"CONT\t1",
                ProtocolError::Malformed("CONT"),
            ),
            ("CONT bad base64", b"CONT\t1\t!!!", ProtocolError::Base64),
            ("CONT unpadded", b"CONT\t1\tYQ", ProtocolError::Base64),
        ] {
            assert_eq!(Reply::parse(line), Err(error), "{name}");
        }
    }

    #[test]
    fn steps_from_replies() {
        let step = |line: &[u8]| Reply::parse(line).unwrap().into_step();
        assert_eq!(step(b"CONT\t1\tYQ=="), Step::Challenge(b"a".to_vec()));
        assert_eq!(
            step(b"OK\t1\tuser=alice"),
            Step::Success {
                user: "alice".into()
            }
        );
        assert_eq!(
            step(b"OK\t1\tuser=alice\tnologin"),
            Step::Failure {
                temporary: false,
                reason: None,
                user: Some("alice".into())
            }
        );
        assert_eq!(
            step(b"FAIL\t1\tuser=alice\tcode=temp_fail\treason=db down"),
            Step::Failure {
                temporary: true,
                reason: Some("db down".into()),
                user: Some("alice".into())
            }
        );
    }

    #[test]
    fn debug_output_hides_challenges() {
        let reply = Reply::parse(b"CONT\t1\tc2VjcmV0").unwrap();
        assert!(!format!("{reply:?}").contains("secret"));
        assert!(!format!("{:?}", reply.into_step()).contains("secret"));
    }
}
