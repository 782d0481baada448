//! How a command line is read, before AUTH and after it (RFC 5321 §4.1, RFC 3207,
//! RFC 4954).
//!
//! [`Verb::split`] is the one place where a line is checked and its verb found: the
//! pre-AUTH session parses with it, and the relay's tracker classifies every forwarded
//! line with it. A line may hold printable ASCII, HT and octets above 127 (RFC 6531
//! addresses); any other control octet is refused, because lenient backends disagree
//! about it: Postfix splits words on `isspace()` (so `MAIL\x0bFROM:` is MAIL), others
//! end a line at a bare CR or LF, or a string at NUL. A refused line is never
//! forwarded, so whatever the backend would have made of it cannot matter.
//!
//! Before AUTH only the verbs that matter to the session get a [`Command`] variant;
//! the rest are [`Command::Known`] or [`Command::Unknown`].

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
    /// Contains a control octet other than HT (NUL, CR or LF alone, VT, FF, DEL...).
    ForbiddenCharacter,
    /// Starts with a blank, or has a tab after the verb: Postfix skips and splits on
    /// both, Exim and OpenSMTPD do not, so `\tBDAT 10` is a chunk to one and an
    /// unknown command (with its "chunk" read as commands) to another.
    AmbiguousVerb,
    /// EHLO/HELO without a name, or a name with control characters or invalid UTF-8.
    BadHelloName,
}

impl<'a> Command<'a> {
    /// Parses one line, CRLF already removed.
    pub fn parse(line: &'a [u8]) -> Result<Command<'a>, CommandError> {
        let (verb, rest) = Verb::split(line)?;
        // RFC 4954 §4: AUTH lines may reach 12288 octets; the line buffer bounds them.
        if line.len() > MAX_COMMAND_LINE && verb != Verb::Auth {
            return Err(CommandError::TooLong);
        }
        let command = match verb {
            Verb::Ehlo => Command::Ehlo(hello_name(rest)?),
            Verb::Helo => Command::Helo(hello_name(rest)?),
            Verb::StartTls => Command::StartTls {
                has_argument: !trim(rest).is_empty(),
            },
            Verb::Auth => {
                let mut words = trim(rest).split(|&b| is_blank(b)).filter(|w| !w.is_empty());
                let mechanism = words
                    .next()
                    .map(|m| std::str::from_utf8(m).unwrap_or("\u{fffd}"));
                Command::Auth {
                    mechanism,
                    initial: words.next(),
                }
            }
            Verb::Noop => Command::Noop,
            Verb::Rset => Command::Rset,
            Verb::Quit => Command::Quit,
            Verb::Mail => Command::Mail,
            Verb::Rcpt => Command::Rcpt,
            Verb::Data => Command::Data,
            Verb::Bdat => Command::Bdat,
            Verb::Known => Command::Known,
            Verb::ProxyOnly | Verb::Other => Command::Unknown,
        };
        Ok(command)
    }
}

/// A command verb, as every backend postern may front reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Ehlo,
    Helo,
    StartTls,
    Auth,
    Noop,
    Rset,
    Quit,
    Mail,
    Rcpt,
    Data,
    Bdat,
    /// XCLIENT and XFORWARD: meant for postern's own use towards the backend.
    ProxyOnly,
    /// A verb RFC 5321 knows (VRFY, EXPN, HELP...) without a variant of its own.
    Known,
    Other,
}

impl Verb {
    /// Checks a line (CRLF removed) and splits it into its verb and the rest: the verb
    /// starts the line and ends at a SP (or the end), the one way every backend reads
    /// it. The rest starts after that SP.
    pub fn split(line: &[u8]) -> Result<(Verb, &[u8]), CommandError> {
        if line.iter().any(|&b| is_forbidden(b)) {
            return Err(CommandError::ForbiddenCharacter);
        }
        let end = line.iter().position(|&b| is_blank(b)).unwrap_or(line.len());
        let (word, rest) = line.split_at(end);
        if word.is_empty() && !rest.is_empty() || rest.first() == Some(&b'\t') {
            return Err(CommandError::AmbiguousVerb);
        }
        // RFC 6531 allows UTF-8 in arguments, never in a verb; a backend that strips
        // the eighth bit (sendmail's SevenBitInput, 7-bit gateways) reads D\xc1TA as DATA.
        if !word.is_ascii() {
            return Err(CommandError::ForbiddenCharacter);
        }
        let rest = rest.get(1..).unwrap_or_default();
        let mut upper = [0u8; 8];
        let verb = match upper.get_mut(..word.len()) {
            Some(upper) => {
                upper.copy_from_slice(word);
                upper.make_ascii_uppercase();
                Verb::from_upper(upper)
            }
            None => Verb::Other,
        };
        Ok((verb, rest))
    }

    fn from_upper(word: &[u8]) -> Verb {
        match word {
            b"EHLO" => Verb::Ehlo,
            b"HELO" => Verb::Helo,
            b"STARTTLS" => Verb::StartTls,
            b"AUTH" => Verb::Auth,
            b"NOOP" => Verb::Noop,
            b"RSET" => Verb::Rset,
            b"QUIT" => Verb::Quit,
            b"MAIL" => Verb::Mail,
            b"RCPT" => Verb::Rcpt,
            b"DATA" => Verb::Data,
            b"BDAT" => Verb::Bdat,
            b"XCLIENT" | b"XFORWARD" => Verb::ProxyOnly,
            b"VRFY" | b"EXPN" | b"HELP" | b"ETRN" | b"TURN" | b"ATRN" | b"SEND" | b"SOML"
            | b"SAML" => Verb::Known,
            _ => Verb::Other,
        }
    }
}

/// Control octets other than HT, and DEL. Octets above 127 pass: UTF-8 (RFC 6531).
fn is_forbidden(byte: u8) -> bool {
    (byte < 0x20 && byte != b'\t') || byte == 0x7f
}

fn is_blank(byte: u8) -> bool {
    byte == b' ' || byte == b'\t'
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
            (b"XCLIENT ADDR=1.2.3.4", Command::Unknown),
            (b"STARTTLSX", Command::Unknown),
            (b"MAIL FROM:<\xc3\xa9@b>", Command::Mail),
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
            (b"EHLO a\x1bb", CommandError::ForbiddenCharacter),
            (b"EHLO a\0b", CommandError::ForbiddenCharacter),
            (b"MAIL\x0bFROM:<a>", CommandError::ForbiddenCharacter),
            (b"STARTTLS\x0c", CommandError::ForbiddenCharacter),
            (b"NOOP\x7f", CommandError::ForbiddenCharacter),
            (b"D\xc1TA", CommandError::ForbiddenCharacter),
            (
                b"\x0bXCLIENT ADDR=1.2.3.4",
                CommandError::ForbiddenCharacter,
            ),
            (b"EHLO", CommandError::BadHelloName),
            (b"EHLO   ", CommandError::BadHelloName),
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
    fn every_control_octet_but_ht_is_refused_anywhere_in_the_line() {
        for byte in (0u8..0x20).chain([0x7f]) {
            let line = [b"MAIL".as_slice(), &[byte], b"FROM:<a@b>"].concat();
            let verdict = Verb::split(&line).map(|(verb, _)| verb);
            if byte == b'\t' {
                // Not a control octet, but no separator every backend agrees on.
                assert_eq!(verdict, Err(CommandError::AmbiguousVerb));
            } else {
                assert_eq!(verdict, Err(CommandError::ForbiddenCharacter), "{byte:#x}");
            }
        }
    }

    #[test]
    fn a_verb_with_a_blank_before_or_a_tab_after_it_is_refused() {
        for line in [
            &b" MAIL FROM:<a>"[..],
            b"\tBDAT 10",
            b"BDAT\t10",
            b"MAIL\tFROM:<a>",
            b" ",
        ] {
            assert_eq!(
                Verb::split(line),
                Err(CommandError::AmbiguousVerb),
                "{line:?}"
            );
        }
    }

    #[test]
    fn verbs_end_at_a_space() {
        for (line, verb, rest) in [
            (&b"RCPT TO:<a>"[..], Verb::Rcpt, &b"TO:<a>"[..]),
            (b"rcpt TO:<a>\tx", Verb::Rcpt, b"TO:<a>\tx"),
            (b"XFORWARD ADDR=1", Verb::ProxyOnly, b"ADDR=1"),
            (b"xclient", Verb::ProxyOnly, b""),
            (b"BDAT  10 LAST", Verb::Bdat, b" 10 LAST"),
            (b"STARTTLS", Verb::StartTls, b""),
            (b"DATAX", Verb::Other, b""),
            (b"", Verb::Other, b""),
        ] {
            assert_eq!(Verb::split(line), Ok((verb, rest)), "{line:?}");
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
