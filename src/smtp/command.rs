//! The commands postern answers itself before AUTH (RFC 5321 §4.1, RFC 3207, RFC 4954).
//!
//! Everything after AUTH is relayed without parsing, so only the verbs that matter to
//! the pre-AUTH phase get a variant; the rest are [`Command::Known`] or [`Command::Unknown`].

use super::line::MAX_COMMAND_LINE;

/// A parsed command line. Arguments borrow from the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    Ehlo(&'a str),
    Helo(&'a str),
    StartTls {
        has_argument: bool,
    },
    Auth {
        mechanism: Option<&'a str>,
        initial: Option<&'a [u8]>,
    },
    Noop,
    Rset,
    Quit,
    /// MAIL starts a mail transaction, which needs TLS and AUTH first (except on an MX
    /// listener, where it hands the session to the backend).
    Mail,
    /// RCPT and DATA continue a transaction, which cannot exist before MAIL.
    Rcpt,
    Data,
    /// BDAT is followed by a chunk of raw bytes that must never be read as commands.
    Bdat,
    /// A verb RFC 5321 knows (VRFY, EXPN, HELP) that postern refuses before AUTH.
    Known,
    /// Anything else.
    Unknown,
}

/// Why a line is not a command postern can act on; each maps to one reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandError {
    /// Longer than [`MAX_COMMAND_LINE`] (AUTH lines excepted).
    TooLong,
    /// Contains a bare CR, a bare LF or NUL.
    ForbiddenCharacter,
    /// EHLO/HELO without a name, or a name with control characters or invalid UTF-8.
    BadHelloName,
}

impl<'a> Command<'a> {
    /// Parses one line, CRLF already removed.
    pub fn parse(line: &'a [u8]) -> Result<Command<'a>, CommandError> {
        if line.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)) {
            return Err(CommandError::ForbiddenCharacter);
        }
        let (verb, rest) = split_verb(line);
        // RFC 4954 §4: AUTH lines may reach 12288 octets; the line buffer bounds them.
        if line.len() > MAX_COMMAND_LINE && !verb.eq_ignore_ascii_case(b"AUTH") {
            return Err(CommandError::TooLong);
        }
        let command = match verb.to_ascii_uppercase().as_slice() {
            b"EHLO" => Command::Ehlo(hello_name(rest)?),
            b"HELO" => Command::Helo(hello_name(rest)?),
            b"STARTTLS" => Command::StartTls {
                has_argument: !trim(rest).is_empty(),
            },
            b"AUTH" => {
                let mut words = trim(rest).split(|&b| b == b' ').filter(|w| !w.is_empty());
                let mechanism = words
                    .next()
                    .map(|m| std::str::from_utf8(m).unwrap_or("\u{fffd}"));
                Command::Auth {
                    mechanism,
                    initial: words.next(),
                }
            }
            b"NOOP" => Command::Noop,
            b"RSET" => Command::Rset,
            b"QUIT" => Command::Quit,
            b"MAIL" => Command::Mail,
            b"RCPT" => Command::Rcpt,
            b"DATA" => Command::Data,
            b"BDAT" => Command::Bdat,
            b"VRFY" | b"EXPN" | b"HELP" | b"ETRN" | b"TURN" | b"ATRN" | b"SEND" | b"SOML"
            | b"SAML" => Command::Known,
            _ => Command::Unknown,
        };
        Ok(command)
    }
}

fn split_verb(line: &[u8]) -> (&[u8], &[u8]) {
    match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[]),
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    bytes.trim_ascii()
}

/// The EHLO/HELO argument, which postern later replays to the backend: it must be one
/// word of printable characters (UTF-8 allowed for RFC 6531 clients).
fn hello_name(rest: &[u8]) -> Result<&str, CommandError> {
    let name = std::str::from_utf8(trim(rest)).map_err(|_| CommandError::BadHelloName)?;
    if name.is_empty() || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(CommandError::BadHelloName);
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_pre_auth_verbs_case_insensitively() {
        for (line, expected) in [
            (&b"EHLO client.example"[..], Command::Ehlo("client.example")),
            (b"ehlo [192.0.2.1]", Command::Ehlo("[192.0.2.1]")),
            (b"HELO x", Command::Helo("x")),
            (
                b"STARTTLS",
                Command::StartTls {
                    has_argument: false,
                },
            ),
            (
                b"starttls ",
                Command::StartTls {
                    has_argument: false,
                },
            ),
            (b"STARTTLS now", Command::StartTls { has_argument: true }),
            (
                b"AUTH",
                Command::Auth {
                    mechanism: None,
                    initial: None,
                },
            ),
            (
                b"AUTH PLAIN",
                Command::Auth {
                    mechanism: Some("PLAIN"),
                    initial: None,
                },
            ),
            (
                b"auth plain AGZvbwBiYXI=",
                Command::Auth {
                    mechanism: Some("plain"),
                    initial: Some(b"AGZvbwBiYXI="),
                },
            ),
            (
                b"AUTH LOGIN =",
                Command::Auth {
                    mechanism: Some("LOGIN"),
                    initial: Some(b"="),
                },
            ),
            (b"NOOP", Command::Noop),
            (b"noop whatever", Command::Noop),
            (b"RSET", Command::Rset),
            (b"QUIT", Command::Quit),
            (b"MAIL FROM:<a@b>", Command::Mail),
            (b"rcpt TO:<a@b>", Command::Rcpt),
            (b"DATA", Command::Data),
            (b"BDAT 100 LAST", Command::Bdat),
            (b"VRFY root", Command::Known),
            (b"XYZZY", Command::Unknown),
            (b"", Command::Unknown),
            (b"EHLOX", Command::Unknown),
        ] {
            assert_eq!(
                Command::parse(line),
                Ok(expected),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn refuses_what_could_be_smuggled_or_echoed() {
        for (line, expected) in [
            (
                &b"NOOP\nMAIL FROM:<a>"[..],
                CommandError::ForbiddenCharacter,
            ),
            (b"NOOP\r", CommandError::ForbiddenCharacter),
            (b"EHLO a\0b", CommandError::ForbiddenCharacter),
            (b"EHLO", CommandError::BadHelloName),
            (b"EHLO   ", CommandError::BadHelloName),
            (b"EHLO a\x1bb", CommandError::BadHelloName),
            (b"EHLO a b", CommandError::BadHelloName),
            (b"HELO \xff\xfe", CommandError::BadHelloName),
        ] {
            assert_eq!(
                Command::parse(line),
                Err(expected),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn only_auth_lines_may_exceed_512_octets() {
        let mut long = b"NOOP ".to_vec();
        long.resize(MAX_COMMAND_LINE + 1, b'a');
        assert_eq!(Command::parse(&long), Err(CommandError::TooLong));
        long.truncate(MAX_COMMAND_LINE);
        assert_eq!(Command::parse(&long), Ok(Command::Noop));

        let mut auth = b"AUTH PLAIN ".to_vec();
        auth.resize(4000, b'A');
        assert!(matches!(Command::parse(&auth), Ok(Command::Auth { .. })));
    }
}
