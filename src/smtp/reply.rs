//! SMTP replies: the ones postern sends, and a parser for the backend's (RFC 5321 §4.2).

use std::borrow::Cow;

/// A reply postern sends. `lines` hold the text after the code, enhanced status code
/// included; one encoder writes them as `250-…`/`250 …`, always with CRLF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<Cow<'static, str>>,
}

/// A fixed reply, kept as data so every reply code in postern is greppable in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Canned {
    pub code: u16,
    pub text: &'static str,
}

impl Canned {
    pub const fn new(code: u16, text: &'static str) -> Self {
        Self { code, text }
    }
}

impl From<Canned> for Reply {
    fn from(canned: Canned) -> Self {
        Reply {
            code: canned.code,
            lines: vec![Cow::Borrowed(canned.text)],
        }
    }
}

impl Reply {
    pub fn new(code: u16, text: impl Into<Cow<'static, str>>) -> Self {
        Reply {
            code,
            lines: vec![text.into()],
        }
    }

    /// Writes the reply in wire form. An empty text still yields `CODE\r\n`-style output
    /// (`334 \r\n` for an empty SASL challenge, which RFC 4954 §4 requires).
    pub fn encode(&self, out: &mut Vec<u8>) {
        use std::io::Write as _;
        // Straight into `out`, not through a String per line: writing into a Vec cannot
        // fail.
        let last = self.lines.len().saturating_sub(1);
        if self.lines.is_empty() {
            let _ = write!(out, "{} \r\n", self.code);
        }
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            let _ = write!(out, "{}{}{}\r\n", self.code, sep, line);
        }
    }

    /// The first line as it appears on the wire, without CRLF (for tests and logs).
    pub fn first_line(&self) -> String {
        format!(
            "{} {}",
            self.code,
            self.lines.first().map(|l| l.as_ref()).unwrap_or("")
        )
    }
}

/// The canned replies. Codes and texts follow RFC 5321, 3207, 4954 and 3463.
pub mod canned {
    use super::Canned;

    pub const OK: Canned = Canned::new(250, "2.0.0 OK");
    pub const BYE: Canned = Canned::new(221, "2.0.0 Bye");
    pub const READY_FOR_TLS: Canned = Canned::new(220, "2.0.0 Ready to start TLS");
    pub const AUTH_SUCCEEDED: Canned = Canned::new(235, "2.7.0 Authentication successful");

    pub const TLS_REQUIRED: Canned = Canned::new(530, "5.7.0 Must issue a STARTTLS command first");
    pub const AUTH_REQUIRED: Canned = Canned::new(530, "5.7.0 Authentication required");
    pub const ENCRYPTION_REQUIRED: Canned = Canned::new(
        538,
        "5.7.11 Encryption required for requested authentication mechanism",
    );
    pub const BAD_CREDENTIALS: Canned =
        Canned::new(535, "5.7.8 Authentication credentials invalid");
    pub const TEMPORARY_AUTH_FAILURE: Canned =
        Canned::new(454, "4.7.0 Temporary authentication failure");
    pub const AUTH_CANCELLED: Canned = Canned::new(501, "5.7.0 Authentication cancelled");
    pub const AUTH_MALFORMED: Canned =
        Canned::new(501, "5.5.2 Cannot decode the authentication response");
    pub const AUTH_NO_MECHANISM: Canned = Canned::new(501, "5.5.4 Syntax: AUTH mechanism");
    pub const AUTH_UNKNOWN_MECHANISM: Canned =
        Canned::new(504, "5.5.4 Unrecognized authentication mechanism");
    pub const AUTH_LINE_TOO_LONG: Canned =
        Canned::new(500, "5.5.6 Authentication exchange line is too long");
    pub const ALREADY_AUTHENTICATED: Canned = Canned::new(503, "5.5.1 Already authenticated");
    pub const HELLO_FIRST: Canned = Canned::new(503, "5.5.1 Send EHLO first");

    pub const TLS_ALREADY_ACTIVE: Canned = Canned::new(503, "5.5.1 TLS already active");
    pub const STARTTLS_NO_ARGUMENTS: Canned = Canned::new(501, "5.5.4 Syntax: STARTTLS");

    pub const LINE_TOO_LONG: Canned = Canned::new(500, "5.5.2 Line too long");
    pub const AMBIGUOUS_VERB: Canned =
        Canned::new(500, "5.5.2 A command starts with its verb, then a space");
    pub const CONTROL_CHARACTER: Canned =
        Canned::new(500, "5.5.2 Control character or bare CR or LF in command");
    pub const BAD_HELLO: Canned = Canned::new(501, "5.5.4 Syntax: EHLO hostname");
    pub const UNRECOGNIZED: Canned = Canned::new(500, "5.5.2 Command unrecognized");

    pub const SHUTTING_DOWN: Canned = Canned::new(421, "4.3.2 Service shutting down");
    pub const TOO_MANY_CONNECTIONS: Canned = Canned::new(421, "4.7.0 Too many connections");
    pub const TOO_MANY_ERRORS: Canned =
        Canned::new(421, "4.7.0 Too many errors, closing connection");
    pub const TOO_MANY_AUTH_FAILURES: Canned = Canned::new(
        421,
        "4.7.0 Too many authentication failures, closing connection",
    );
    /// `--max-junk-commands` reached before AUTH (Postfix's smtpd_junk_command_limit).
    pub const TOO_MANY_JUNK_COMMANDS: Canned = Canned::new(
        421,
        "4.7.0 Too many commands without authentication, closing connection",
    );
    /// `--auth-deadline` passed before AUTH succeeded (an MX session: before its MAIL).
    pub const AUTH_DEADLINE: Canned = Canned::new(
        421,
        "4.7.0 Too long without authentication, closing connection",
    );
    pub const AUTH_THROTTLED: Canned = Canned::new(
        454,
        "4.7.0 Too many authentication failures, try again later",
    );
    pub const MAIL_FIRST: Canned = Canned::new(503, "5.5.1 Send MAIL first");
    pub const NOT_IMPLEMENTED: Canned = Canned::new(502, "5.5.1 Command not implemented");
    pub const BACKEND_TRY_LATER: Canned = Canned::new(
        451,
        "4.3.0 Mail system temporarily unavailable, try again later",
    );
    pub const RELAY_OUT_OF_STEP: Canned = Canned::new(
        421,
        "4.3.0 Backend out of step with the command stream, closing connection",
    );
    pub const TIMEOUT: Canned = Canned::new(421, "4.4.2 Timeout, closing connection");
    /// `--xclient` and the backend does not take XCLIENT ADDR from postern: an anonymous
    /// MX session would reach it as postern's own address, which it may trust to relay.
    pub const BACKEND_CANNOT_IDENTIFY: Canned = Canned::new(
        451,
        "4.3.0 Backend cannot identify the client, try again later",
    );
    pub const BACKEND_UNAVAILABLE: Canned =
        Canned::new(421, "4.3.0 Backend unavailable, closing connection");

    // After AUTH, answered by the relay tracker instead of the backend.
    pub const AUTH_NOT_NOW: Canned =
        Canned::new(503, "5.5.1 AUTH not permitted once mail is relayed");
    pub const STARTTLS_NOT_NOW: Canned =
        Canned::new(503, "5.5.1 STARTTLS not permitted once mail is relayed");
    pub const BDAT_NOT_OFFERED: Canned =
        Canned::new(502, "5.5.1 BDAT not offered, closing connection");
    pub const BDAT_SYNTAX: Canned =
        Canned::new(501, "5.5.4 Syntax: BDAT size [LAST], closing connection");
    pub const MESSAGE_LIMIT: Canned = Canned::new(
        451,
        "4.7.1 Message limit for this user reached, try again later",
    );
    pub const RECIPIENT_LIMIT: Canned = Canned::new(
        451,
        "4.7.1 Recipient limit for this user reached, try again later",
    );
    pub const RECIPIENTS_PER_MESSAGE: Canned =
        Canned::new(451, "4.7.1 Too many recipients for one message");
    pub const LIMITS_UNAVAILABLE: Canned = Canned::new(
        451,
        "4.3.0 Sending limits cannot be checked, try again later",
    );
    pub const BARE_LINE_ENDING: Canned =
        Canned::new(550, "5.6.0 Bare CR or LF in message, closing connection");
    pub const AMBIGUOUS_END_OF_DATA: Canned = Canned::new(
        550,
        "5.6.0 Message contains a bare CR or LF around a dot line, closing connection",
    );
    pub const CHUNK_TOO_BIG: Canned = Canned::new(
        552,
        "5.3.4 Chunk exceeds the message size limit, closing connection",
    );
    pub const BDAT_SEQUENCE: Canned = Canned::new(
        503,
        "5.5.1 Only BDAT, NOOP or QUIT may follow a non-final BDAT, closing connection",
    );
    pub const REFUSED_BETWEEN_CHUNKS: Canned = Canned::new(
        421,
        "4.3.0 Backend refused a command between chunks, closing connection",
    );
    pub const EMPTY_CHUNK: Canned = Canned::new(
        501,
        "5.5.4 BDAT 0 is only valid with LAST, closing connection",
    );
}

/// A reply read from the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendReply {
    pub code: u16,
    /// Text of each line after `CODE-`/`CODE `, without CRLF.
    pub lines: Vec<String>,
}

/// The longest backend reply line and the most lines postern accepts in one reply; a
/// backend beyond them is treated as broken rather than buffered without bound.
pub const MAX_REPLY_LINE: usize = 4096;
pub const MAX_REPLY_LINES: usize = 128;

/// Why a backend reply could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyError {
    /// Not `DDD-text` / `DDD text`, or codes differ between lines.
    Malformed,
    /// Over [`MAX_REPLY_LINE`] or [`MAX_REPLY_LINES`].
    TooLong,
}

impl std::fmt::Display for ReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyError::Malformed => f.write_str("malformed SMTP reply"),
            ReplyError::TooLong => f.write_str("SMTP reply too long"),
        }
    }
}

impl std::error::Error for ReplyError {}

impl BackendReply {
    /// Parses one complete reply from the front of `buf`. Returns the reply and the number
    /// of bytes it took, or `Ok(None)` if more bytes are needed. Lines end at LF (a CR
    /// before it is dropped): RFC 5321 §4.5.1 asks receivers to be liberal here.
    pub fn parse(buf: &[u8]) -> Result<Option<(BackendReply, usize)>, ReplyError> {
        let mut lines = Vec::new();
        let mut code = None;
        let mut pos = 0;
        loop {
            let rest = &buf[pos..];
            let Some(end) = rest.iter().position(|&b| b == b'\n') else {
                return if rest.len() > MAX_REPLY_LINE {
                    Err(ReplyError::TooLong)
                } else {
                    Ok(None)
                };
            };
            if end > MAX_REPLY_LINE {
                return Err(ReplyError::TooLong);
            }
            let line = rest[..end].strip_suffix(b"\r").unwrap_or(&rest[..end]);
            pos += end + 1;
            let (this_code, last, text) = split_reply_line(line)?;
            if *code.get_or_insert(this_code) != this_code {
                return Err(ReplyError::Malformed);
            }
            lines.push(text);
            if last {
                return Ok(Some((
                    BackendReply {
                        code: this_code,
                        lines,
                    },
                    pos,
                )));
            }
            if lines.len() >= MAX_REPLY_LINES {
                return Err(ReplyError::TooLong);
            }
        }
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
}

/// The code of a reply line from its first three octets: the one reply-code reader of
/// the crate.
pub fn reply_code(digits: &[u8]) -> Option<u16> {
    match digits {
        [a, b, c] if digits.iter().all(u8::is_ascii_digit) => Some(
            [a, b, c]
                .iter()
                .fold(0u16, |acc, d| acc * 10 + u16::from(**d - b'0')),
        ),
        _ => None,
    }
}

fn split_reply_line(line: &[u8]) -> Result<(u16, bool, String), ReplyError> {
    let code = line
        .get(..3)
        .and_then(reply_code)
        .filter(|code| (200..600).contains(code))
        .ok_or(ReplyError::Malformed)?;
    let (last, text) = match line.get(3) {
        None => (true, &[][..]),
        Some(b' ') => (true, &line[4..]),
        Some(b'-') => (false, &line[4..]),
        Some(_) => return Err(ReplyError::Malformed),
    };
    Ok((code, last, String::from_utf8_lossy(text).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(reply: &Reply) -> String {
        let mut out = Vec::new();
        reply.encode(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn encodes_single_multi_and_empty_replies() {
        assert_eq!(
            encoded(&canned::AUTH_REQUIRED.into()),
            "530 5.7.0 Authentication required\r\n"
        );
        let multi = Reply {
            code: 250,
            lines: vec!["mx greets c".into(), "SIZE 10".into(), "8BITMIME".into()],
        };
        assert_eq!(
            encoded(&multi),
            "250-mx greets c\r\n250-SIZE 10\r\n250 8BITMIME\r\n"
        );
        assert_eq!(encoded(&Reply::new(334, "")), "334 \r\n");
        assert_eq!(
            encoded(&Reply {
                code: 334,
                lines: vec![]
            }),
            "334 \r\n"
        );
    }

    #[test]
    fn parses_backend_replies_incrementally() {
        let wire = b"250-mx.example\r\n250-SIZE 1000\r\n250 8BITMIME\r\n220 next";
        let expected = BackendReply {
            code: 250,
            lines: vec!["mx.example".into(), "SIZE 1000".into(), "8BITMIME".into()],
        };
        for cut in 0..wire.len() {
            let got = BackendReply::parse(&wire[..cut]).unwrap();
            if cut < 45 {
                assert_eq!(got, None, "prefix {cut}");
            } else {
                assert_eq!(got, Some((expected.clone(), 45)), "prefix {cut}");
            }
        }
        assert_eq!(
            BackendReply::parse(b"220\n").unwrap(),
            Some((
                BackendReply {
                    code: 220,
                    lines: vec![String::new()]
                },
                4
            ))
        );
    }

    #[test]
    fn refuses_malformed_and_unbounded_backend_replies() {
        for wire in [
            &b"hello\r\n"[..],
            b"250-a\r\n251 b\r\n",
            b"25\r\n",
            b"2500 x\r\n",
            b"650 x\r\n",
        ] {
            assert_eq!(
                BackendReply::parse(wire),
                Err(ReplyError::Malformed),
                "{wire:?}"
            );
        }
        assert_eq!(
            BackendReply::parse(&[b'2'; MAX_REPLY_LINE + 1]),
            Err(ReplyError::TooLong)
        );
        let many = "250-x\r\n".repeat(MAX_REPLY_LINES + 1);
        assert_eq!(
            BackendReply::parse(many.as_bytes()),
            Err(ReplyError::TooLong)
        );
    }
}
