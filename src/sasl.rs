//! Sans-IO SASL server exchanges for SMTP AUTH: PLAIN, LOGIN and CRAM-MD5.
//!
//! The session feeds the `AUTH` command's initial response to [`Exchange::start`] and each
//! client continuation line to [`Exchange::step`]. Every call returns a [`Step`]: a
//! challenge to send after `334 `, the collected [`Credentials`], or a verdict the session
//! turns into one SMTP reply. Nothing here touches a socket, a clock or an RNG: the
//! CRAM-MD5 challenge string is passed in, and verifying credentials is the caller's job
//! (see `users`). [`client`] is the client's half of each mechanism, for the load
//! generator and tests; its CRAM-MD5 digest comes from `users`, the crate's one HMAC-MD5.
//!
//! - RFC 4954: SMTP AUTH framing (`334` continuations, `=` for an empty initial response,
//!   `*` to cancel).
//! - RFC 4616: PLAIN (`[authzid] NUL authcid NUL passwd`).
//! - LOGIN: no RFC; the de facto `Username:` / `Password:` prompts
//!   (draft-murchison-sasl-login).
//! - RFC 2195: CRAM-MD5 (`username SP hex(HMAC-MD5(secret, challenge))`).

pub mod client;

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// base64 of `Username:`, the first LOGIN prompt.
const LOGIN_USERNAME_PROMPT: &str = "VXNlcm5hbWU6";
/// base64 of `Password:`, the second LOGIN prompt.
const LOGIN_PASSWORD_PROMPT: &str = "UGFzc3dvcmQ6";
/// Length of a CRAM-MD5 digest in hex: 16 bytes of HMAC-MD5.
const CRAM_MD5_DIGEST_HEX_LEN: usize = 32;

/// A SASL mechanism postern offers after TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    /// RFC 4616 PLAIN.
    Plain,
    /// The de facto LOGIN mechanism (two prompts).
    Login,
    /// RFC 2195 CRAM-MD5; only users with a `{PLAIN}` secret can pass it.
    CramMd5,
    /// RFC 5802 SCRAM-SHA-1, never run by postern itself: only relayed to a credential
    /// source that runs it (Dovecot).
    ScramSha1,
    /// RFC 7677 SCRAM-SHA-256, relayed like [`Mechanism::ScramSha1`].
    ScramSha256,
}

impl Mechanism {
    /// Every mechanism postern runs itself ([`Exchange`]), in the order EHLO lists them.
    pub const ALL: [Mechanism; 3] = [Mechanism::Plain, Mechanism::Login, Mechanism::CramMd5];

    /// Every mechanism postern knows, including those only a credential source runs.
    /// Channel-binding variants (`-PLUS`) are absent: the TLS channel ends at postern,
    /// so the source could never check the binding.
    pub const KNOWN: [Mechanism; 5] = [
        Mechanism::Plain,
        Mechanism::Login,
        Mechanism::CramMd5,
        Mechanism::ScramSha1,
        Mechanism::ScramSha256,
    ];

    /// Parses a mechanism name from an `AUTH` command, ignoring ASCII case (RFC 4422 §3.1).
    pub fn parse(name: &str) -> Option<Mechanism> {
        Mechanism::KNOWN
            .into_iter()
            .find(|mechanism| mechanism.name().eq_ignore_ascii_case(name))
    }

    /// Whether postern can run the exchange itself (else only a source can).
    pub fn runs_locally(self) -> bool {
        Mechanism::ALL.contains(&self)
    }

    /// The registered name, as advertised in the EHLO `AUTH` line.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
            Mechanism::CramMd5 => "CRAM-MD5",
            Mechanism::ScramSha1 => "SCRAM-SHA-1",
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
        }
    }

    /// The value of the `mechanism` metric label and tracing field.
    pub fn label(self) -> &'static str {
        match self {
            Mechanism::Plain => crate::metrics::label::mechanism::PLAIN,
            Mechanism::Login => crate::metrics::label::mechanism::LOGIN,
            Mechanism::CramMd5 => crate::metrics::label::mechanism::CRAM_MD5,
            Mechanism::ScramSha1 => crate::metrics::label::mechanism::SCRAM_SHA_1,
            Mechanism::ScramSha256 => crate::metrics::label::mechanism::SCRAM_SHA_256,
        }
    }
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a finished exchange collected, ready for verification against the user store.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// A user name and cleartext password, from PLAIN or LOGIN.
    Password {
        /// The authentication identity (RFC 4616 authcid); valid UTF-8, never empty.
        username: String,
        /// The password as raw bytes: RFC 4616 allows any UTF-8, LOGIN clients send anything.
        password: Vec<u8>,
    },
    /// A CRAM-MD5 answer: the caller checks `digest` against HMAC-MD5(secret, `challenge`).
    CramMd5 {
        /// The user name before the last space of the response; valid UTF-8, never empty.
        username: String,
        /// The challenge string this exchange sent (before base64).
        challenge: String,
        /// The client's digest: 32 hex digits, normalised to lowercase.
        digest: String,
    },
}

impl Credentials {
    /// The user name the client authenticated as.
    pub fn username(&self) -> &str {
        match self {
            Credentials::Password { username, .. } | Credentials::CramMd5 { username, .. } => {
                username
            }
        }
    }
}

// Written by hand so a stray `{:?}` in a log line can never print a password or a digest
// (a digest plus its challenge is enough for an offline dictionary attack).
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Password { username, .. } => f
                .debug_struct("Password")
                .field("username", username)
                .field("password", &format_args!("<redacted>"))
                .finish(),
            Credentials::CramMd5 {
                username,
                challenge,
                ..
            } => f
                .debug_struct("CramMd5")
                .field("username", username)
                .field("challenge", challenge)
                .field("digest", &format_args!("<redacted>"))
                .finish(),
        }
    }
}

/// The outcome of feeding the exchange one client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send `334 <this>`; the text is already base64 and may be empty.
    Challenge(String),
    /// The exchange is complete; verify these credentials.
    Done(Credentials),
    /// Well-formed, but it can never succeed (PLAIN asking to act as another user: postern
    /// does no proxy authorization). Answer `535 5.7.8`.
    Denied,
    /// The client sent `*` (RFC 4954 §4). Answer `501 5.7.0`.
    Cancelled,
    /// The client's message breaks the mechanism's syntax. Answer `501 5.5.2`.
    Malformed,
}

/// One SASL server exchange, from the `AUTH` command to its verdict.
#[derive(Debug)]
pub struct Exchange {
    mechanism: Mechanism,
    state: State,
}

/// What the exchange waits for next; each variant carries only what that wait needs.
#[derive(Debug)]
enum State {
    /// PLAIN sent an empty challenge and waits for the whole message.
    PlainResponse,
    /// LOGIN sent `Username:`.
    LoginUsername,
    /// LOGIN sent `Password:` for this user.
    LoginPassword { username: String },
    /// CRAM-MD5 sent this challenge (before base64).
    CramMd5Response { challenge: String },
    /// A terminal [`Step`] was returned; further input is a caller bug.
    Finished,
}

/// A decoded client message (RFC 4954 §4 framing).
#[derive(Debug, PartialEq, Eq)]
pub enum Response {
    /// `*`: the client gives up.
    Cancel,
    /// The decoded bytes (possibly empty).
    Data(Vec<u8>),
}

impl Exchange {
    /// Starts an exchange for an `AUTH <mechanism> [initial]` command.
    ///
    /// `initial` is the AUTH command's initial response exactly as sent (base64 text, or
    /// `=` meaning empty), if any. `challenge` is only used for CRAM-MD5: the raw
    /// `<random.timestamp@hostname>` string; the exchange base64-encodes it.
    pub fn start(
        mechanism: Mechanism,
        initial: Option<&[u8]>,
        challenge: &str,
    ) -> (Exchange, Step) {
        let mut exchange = Exchange {
            mechanism,
            state: State::Finished,
        };
        let step = match (mechanism, initial) {
            (Mechanism::Plain, None) => {
                // RFC 4954 §4: a mechanism whose client speaks first gets an empty challenge.
                exchange.state = State::PlainResponse;
                Step::Challenge(String::new())
            }
            (Mechanism::Login, None) => {
                exchange.state = State::LoginUsername;
                Step::Challenge(LOGIN_USERNAME_PROMPT.to_owned())
            }
            (Mechanism::Plain | Mechanism::Login, Some(initial)) => {
                // An initial response is exactly what the first continuation line would have
                // carried, so it takes the same path (LOGIN: the user name).
                exchange.state = match mechanism {
                    Mechanism::Plain => State::PlainResponse,
                    _ => State::LoginUsername,
                };
                exchange.step(initial)
            }
            (Mechanism::CramMd5, None) => {
                exchange.state = State::CramMd5Response {
                    challenge: challenge.to_owned(),
                };
                Step::Challenge(STANDARD.encode(challenge))
            }
            (Mechanism::CramMd5, Some(initial)) => match decode(initial) {
                // RFC 4422 §5: CRAM-MD5 is server-first, so a client cannot answer a challenge
                // it has not seen yet. `*` is still honoured as a cancel.
                Some(Response::Cancel) => Step::Cancelled,
                _ => Step::Malformed,
            },
            (Mechanism::ScramSha1 | Mechanism::ScramSha256, _) => {
                debug_assert!(false, "{mechanism} is only relayed to a source");
                Step::Malformed
            }
        };
        (exchange, step)
    }

    /// Feeds one client response line (without CRLF).
    ///
    /// After `Done`, `Denied`, `Cancelled` or `Malformed` the exchange is finished, and any
    /// further line returns `Malformed`.
    pub fn step(&mut self, line: &[u8]) -> Step {
        let state = std::mem::replace(&mut self.state, State::Finished);
        // Before decoding, so that even `*` gets Malformed: a finished exchange has
        // nothing left to cancel.
        if let State::Finished = state {
            return Step::Malformed;
        }
        let data = match decode(line) {
            Some(Response::Data(data)) => data,
            Some(Response::Cancel) => return Step::Cancelled,
            None => return Step::Malformed,
        };
        match state {
            State::PlainResponse => plain(&data),
            State::LoginUsername => match username(data) {
                Some(username) => {
                    self.state = State::LoginPassword { username };
                    Step::Challenge(LOGIN_PASSWORD_PROMPT.to_owned())
                }
                None => Step::Malformed,
            },
            // Empty passwords are refused as in PLAIN (RFC 4616 `passwd = 1*SAFE`), so both
            // mechanisms answer the same input the same way.
            State::LoginPassword { .. } if data.is_empty() => Step::Malformed,
            State::LoginPassword { username } => Step::Done(Credentials::Password {
                username,
                password: data,
            }),
            State::CramMd5Response { challenge } => cram_md5(data, challenge),
            State::Finished => Step::Malformed,
        }
    }

    /// The mechanism this exchange runs.
    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }
}

/// Decodes one client message; `None` means it is not base64. Also used by the session
/// for the messages of an exchange the credential source runs.
pub fn decode(line: &[u8]) -> Option<Response> {
    match line {
        b"*" => Some(Response::Cancel),
        // RFC 4954 §4 defines `=` for an empty initial response; accepting it on a
        // continuation line too costs nothing, since `=` alone is never valid base64.
        b"=" => Some(Response::Data(Vec::new())),
        _ => STANDARD.decode(line).ok().map(Response::Data),
    }
}

/// Accepts a user name if it is non-empty UTF-8 without NUL (RFC 4616 §2 `SAFE`).
fn username(bytes: Vec<u8>) -> Option<String> {
    if bytes.is_empty() || bytes.contains(&0) {
        return None;
    }
    String::from_utf8(bytes).ok()
}

/// RFC 4616 §2: `message = [authzid] UTF8NUL authcid UTF8NUL passwd`.
fn plain(message: &[u8]) -> Step {
    let mut parts = message.split(|&byte| byte == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Step::Malformed;
    };
    let Some(username) = username(authcid.to_vec()) else {
        return Step::Malformed;
    };
    if password.is_empty() || std::str::from_utf8(authzid).is_err() {
        return Step::Malformed;
    }
    // RFC 4616 §2: an authzid equal to the authcid is the same as none. Anything else asks
    // to act as another user, which postern never grants.
    if !authzid.is_empty() && authzid != username.as_bytes() {
        return Step::Denied;
    }
    Step::Done(Credentials::Password {
        username,
        password: password.to_vec(),
    })
}

/// RFC 2195 §2: the response is `username SP digest`, digest being 32 hex digits. The user
/// name may itself contain spaces, so split at the last one.
fn cram_md5(mut response: Vec<u8>, challenge: String) -> Step {
    let Some(space) = response.iter().rposition(|&byte| byte == b' ') else {
        return Step::Malformed;
    };
    let digest = response.split_off(space + 1);
    response.truncate(space);
    if digest.len() != CRAM_MD5_DIGEST_HEX_LEN || !digest.iter().all(u8::is_ascii_hexdigit) {
        return Step::Malformed;
    }
    let Some(username) = username(response) else {
        return Step::Malformed;
    };
    // All ASCII hex digits, so this is one byte per char.
    let digest = digest
        .iter()
        .map(|byte| char::from(byte.to_ascii_lowercase()))
        .collect();
    Step::Done(Credentials::CramMd5 {
        username,
        challenge,
        digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC2195_CHALLENGE: &str = "<1896.697170952@postoffice.reston.mci.net>";

    /// A table row: name, initial response, continuation lines, every step expected.
    type Case<'a> = (&'a str, Option<&'a str>, Vec<&'a str>, Vec<Step>);

    fn b64(bytes: &[u8]) -> String {
        STANDARD.encode(bytes)
    }

    fn password(username: &str, password: &[u8]) -> Step {
        Step::Done(Credentials::Password {
            username: username.to_owned(),
            password: password.to_vec(),
        })
    }

    fn cram(username: &str, digest: &str) -> Step {
        Step::Done(Credentials::CramMd5 {
            username: username.to_owned(),
            challenge: RFC2195_CHALLENGE.to_owned(),
            digest: digest.to_owned(),
        })
    }

    /// Runs a whole exchange and returns every step, starting with the one from `start`.
    fn run(mechanism: Mechanism, initial: Option<&str>, lines: &[&str]) -> Vec<Step> {
        let (mut exchange, first) =
            Exchange::start(mechanism, initial.map(str::as_bytes), RFC2195_CHALLENGE);
        assert_eq!(exchange.mechanism(), mechanism);
        let mut steps = vec![first];
        for line in lines {
            steps.push(exchange.step(line.as_bytes()));
        }
        steps
    }

    fn challenge(text: &str) -> Step {
        Step::Challenge(text.to_owned())
    }

    #[test]
    fn mechanism_names() {
        for (input, expected) in [
            ("PLAIN", Some(Mechanism::Plain)),
            ("plain", Some(Mechanism::Plain)),
            ("Login", Some(Mechanism::Login)),
            ("cram-md5", Some(Mechanism::CramMd5)),
            ("CRAM-MD5", Some(Mechanism::CramMd5)),
            ("CRAM_MD5", None),
            ("XOAUTH2", None),
            ("", None),
        ] {
            assert_eq!(Mechanism::parse(input), expected, "{input:?}");
        }
        for (mechanism, name, label) in [
            (Mechanism::Plain, "PLAIN", "plain"),
            (Mechanism::Login, "LOGIN", "login"),
            (Mechanism::CramMd5, "CRAM-MD5", "cram-md5"),
        ] {
            assert_eq!(mechanism.name(), name);
            assert_eq!(mechanism.label(), label);
            assert_eq!(Mechanism::parse(name), Some(mechanism));
        }
    }

    #[test]
    fn plain() {
        let tim = b64(b"\0tim\0tanstaaftanstaaf");
        let ursel = b64(b"Ursel\0Kurt\0xipj3plmq");
        let same_authzid = b64(b"tim\0tim\0tanstaaftanstaaf");
        let utf8 = b64("\0jürgen\0pässword".as_bytes());
        let binary_password = b64(b"\0tim\0\xff\xfe");
        let cases: Vec<Case> = vec![
            // RFC 4616 §4 examples.
            (
                "initial response",
                Some(&tim),
                vec![],
                vec![password("tim", b"tanstaaftanstaaf")],
            ),
            (
                "proxy authorization",
                Some(&ursel),
                vec![],
                vec![Step::Denied],
            ),
            (
                "authzid equal to authcid",
                Some(&same_authzid),
                vec![],
                vec![password("tim", b"tanstaaftanstaaf")],
            ),
            (
                "empty challenge first",
                None,
                vec![&tim],
                vec![challenge(""), password("tim", b"tanstaaftanstaaf")],
            ),
            (
                "UTF-8 user",
                Some(&utf8),
                vec![],
                vec![password("jürgen", "pässword".as_bytes())],
            ),
            (
                "password bytes are not UTF-8-checked",
                Some(&binary_password),
                vec![],
                vec![password("tim", b"\xff\xfe")],
            ),
            (
                "cancel as initial response",
                Some("*"),
                vec![],
                vec![Step::Cancelled],
            ),
            (
                "cancel",
                None,
                vec!["*"],
                vec![challenge(""), Step::Cancelled],
            ),
            (
                "= is empty: no NULs",
                Some("="),
                vec![],
                vec![Step::Malformed],
            ),
            (
                "= on a continuation line",
                None,
                vec!["="],
                vec![challenge(""), Step::Malformed],
            ),
            ("bad base64", Some("dGlt!"), vec![], vec![Step::Malformed]),
            (
                "bad padding",
                Some("AHRpbQB0YW5zdGFhZg"),
                vec![],
                vec![Step::Malformed],
            ),
            (
                "line after the end",
                Some(&tim),
                vec![&tim],
                vec![password("tim", b"tanstaaftanstaaf"), Step::Malformed],
            ),
            (
                "cancel after the end",
                Some(&tim),
                vec!["*"],
                vec![password("tim", b"tanstaaftanstaaf"), Step::Malformed],
            ),
        ];
        for (name, initial, lines, expected) in cases {
            assert_eq!(run(Mechanism::Plain, initial, &lines), expected, "{name}");
        }
    }

    #[test]
    fn plain_malformed_messages() {
        for message in [
            &b"tim"[..],
            b"\0tim",
            b"\0tim\0pw\0",
            b"\0\0pw",
            b"\0tim\0",
            b"\0\xfftim\0pw",
            b"\xff\0tim\0pw",
        ] {
            assert_eq!(
                run(Mechanism::Plain, Some(&b64(message)), &[]),
                vec![Step::Malformed],
                "{message:?}"
            );
        }
    }

    #[test]
    fn login() {
        let user = b64(b"tim");
        let pass = b64(b"tanstaaftanstaaf");
        let cases: Vec<Case> = vec![
            (
                "two prompts",
                None,
                vec![&user, &pass],
                vec![
                    challenge("VXNlcm5hbWU6"),
                    challenge("UGFzc3dvcmQ6"),
                    password("tim", b"tanstaaftanstaaf"),
                ],
            ),
            (
                "user name as initial response",
                Some(&user),
                vec![&pass],
                vec![
                    challenge("UGFzc3dvcmQ6"),
                    password("tim", b"tanstaaftanstaaf"),
                ],
            ),
            (
                "cancel as initial response",
                Some("*"),
                vec![],
                vec![Step::Cancelled],
            ),
            (
                "cancel at the user name",
                None,
                vec!["*"],
                vec![challenge("VXNlcm5hbWU6"), Step::Cancelled],
            ),
            (
                "cancel at the password",
                None,
                vec![&user, "*"],
                vec![
                    challenge("VXNlcm5hbWU6"),
                    challenge("UGFzc3dvcmQ6"),
                    Step::Cancelled,
                ],
            ),
            ("empty user name", Some("="), vec![], vec![Step::Malformed]),
            (
                "empty user line",
                None,
                vec![""],
                vec![challenge("VXNlcm5hbWU6"), Step::Malformed],
            ),
            (
                "empty password",
                Some(&user),
                vec!["="],
                vec![challenge("UGFzc3dvcmQ6"), Step::Malformed],
            ),
            (
                "bad base64 user",
                Some("%%%%"),
                vec![],
                vec![Step::Malformed],
            ),
            (
                "bad base64 password",
                Some(&user),
                vec!["dGlt IA=="],
                vec![challenge("UGFzc3dvcmQ6"), Step::Malformed],
            ),
        ];
        for (name, initial, lines, expected) in cases {
            assert_eq!(run(Mechanism::Login, initial, &lines), expected, "{name}");
        }
    }

    #[test]
    fn login_prompts_decode_to_the_conventional_text() {
        assert_eq!(
            STANDARD.decode(LOGIN_USERNAME_PROMPT).ok(),
            Some(b"Username:".to_vec())
        );
        assert_eq!(
            STANDARD.decode(LOGIN_PASSWORD_PROMPT).ok(),
            Some(b"Password:".to_vec())
        );
    }

    #[test]
    fn login_user_name_must_be_utf8() {
        let steps = run(Mechanism::Login, Some(&b64(b"\xfftim")), &[]);
        assert_eq!(steps, vec![Step::Malformed]);
    }

    #[test]
    fn cram_md5() {
        // RFC 2195 §2 example.
        let rfc_response = "dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw";
        let rfc_challenge = "PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+";
        let digest = "b913a602c7eda7a495b4e6e7334d3890";
        let upper = b64(b"tim B913A602C7EDA7A495B4E6E7334D3890");
        let spaced_user = b64(b"tim smith b913a602c7eda7a495b4e6e7334d3890");
        let short = b64(b"tim b913a602c7eda7a495b4e6e7334d389");
        let not_hex = b64(b"tim g913a602c7eda7a495b4e6e7334d3890");
        let no_space = b64(b"timb913a602c7eda7a495b4e6e7334d3890");
        let no_user = b64(b" b913a602c7eda7a495b4e6e7334d3890");
        let cases: Vec<Case> = vec![
            (
                "RFC 2195 example",
                None,
                vec![rfc_response],
                vec![challenge(rfc_challenge), cram("tim", digest)],
            ),
            (
                "uppercase digest is normalised",
                None,
                vec![&upper],
                vec![challenge(rfc_challenge), cram("tim", digest)],
            ),
            (
                "user name with a space",
                None,
                vec![&spaced_user],
                vec![challenge(rfc_challenge), cram("tim smith", digest)],
            ),
            (
                "cancel as initial response",
                Some("*"),
                vec![],
                vec![Step::Cancelled],
            ),
            // CRAM-MD5 is server-first: nothing can be answered before the challenge.
            (
                "initial response",
                Some(rfc_response),
                vec![],
                vec![Step::Malformed],
            ),
            (
                "empty initial response",
                Some("="),
                vec![],
                vec![Step::Malformed],
            ),
            (
                "cancel",
                None,
                vec!["*"],
                vec![challenge(rfc_challenge), Step::Cancelled],
            ),
            (
                "short digest",
                None,
                vec![&short],
                vec![challenge(rfc_challenge), Step::Malformed],
            ),
            (
                "not hex",
                None,
                vec![&not_hex],
                vec![challenge(rfc_challenge), Step::Malformed],
            ),
            (
                "no space",
                None,
                vec![&no_space],
                vec![challenge(rfc_challenge), Step::Malformed],
            ),
            (
                "no user",
                None,
                vec![&no_user],
                vec![challenge(rfc_challenge), Step::Malformed],
            ),
            (
                "empty",
                None,
                vec!["="],
                vec![challenge(rfc_challenge), Step::Malformed],
            ),
            (
                "bad base64",
                None,
                vec!["dGlt*"],
                vec![challenge(rfc_challenge), Step::Malformed],
            ),
        ];
        for (name, initial, lines, expected) in cases {
            assert_eq!(run(Mechanism::CramMd5, initial, &lines), expected, "{name}");
        }
    }

    #[test]
    fn debug_never_shows_secrets() {
        let password = Credentials::Password {
            username: "tim".to_owned(),
            password: b"tanstaaftanstaaf".to_vec(),
        };
        let cram = Credentials::CramMd5 {
            username: "tim".to_owned(),
            challenge: RFC2195_CHALLENGE.to_owned(),
            digest: "b913a602c7eda7a495b4e6e7334d3890".to_owned(),
        };
        for (credentials, secret) in [
            (&password, "tanstaaf"),
            (&password, "116"), // the first password byte, in case Vec<u8> were printed
            (&cram, "b913a602"),
        ] {
            let debug = format!("{credentials:?} {:?}", Step::Done(credentials.clone()));
            assert!(debug.contains("tim"), "{debug}");
            assert!(!debug.contains(secret), "{debug}");
        }
        assert_eq!(password.username(), "tim");
        assert_eq!(cram.username(), "tim");
    }
}
