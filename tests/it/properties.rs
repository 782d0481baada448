//! Property tests for the sans-IO protocol core, through its public API only: line
//! framing, the command and backend-reply parsers, the SASL exchanges, the users-file
//! parser and the pre-AUTH session state machine.
//!
//! Each property holds for any input, so each one is a "never panics" test as well. The
//! generators are biased towards the inputs that matter (lines near `MAX_LINE`, valid
//! base64, real verbs) rather than uniform bytes, which would almost never reach the
//! interesting states. Case counts keep the whole file to a few seconds in a debug build;
//! nothing here runs a password KDF. `fuzz/` holds libFuzzer targets for the same entry
//! points, for longer runs.

use crate::common::session_driver;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree as _;
use proptest::test_runner::TestRunner;

use postern::sasl::{Credentials, Exchange, Mechanism, Step};
use postern::session::{ListenerKind, Verdict};
use postern::smtp::line::{MAX_COMMAND_LINE, MAX_LINE};
use postern::smtp::reply::{MAX_REPLY_LINE, MAX_REPLY_LINES};
use postern::smtp::{BackendReply, Capabilities, Command, LineBuffer, Reply};
use postern::users::UserDb;

use session_driver::{Driver, End, Oracle, assert_wire_form, default_capabilities, limits};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

fn b64(bytes: &[u8]) -> Vec<u8> {
    STANDARD.encode(bytes).into_bytes()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// === LineBuffer ===

/// Client bytes that exercise the framing: runs around `MAX_LINE`, CR and LF alone and
/// together, and short random bytes.
fn client_stream() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        4 => Just(b"\r\n".to_vec()),
        2 => Just(b"\r".to_vec()),
        2 => Just(b"\n".to_vec()),
        4 => prop::collection::vec(any::<u8>(), 0..16),
        1 => (MAX_LINE - 3..=MAX_LINE + 3).prop_map(|n| vec![b'a'; n]),
        1 => (0..2 * MAX_LINE).prop_map(|n| vec![b'b'; n]),
    ];
    prop::collection::vec(piece, 0..24).prop_map(|pieces| pieces.concat())
}

/// What framing `chunks` yields, the way the driver reads: every complete line after each
/// chunk, stopping at the first error. Checks the per-line invariants on the way.
#[derive(Debug, PartialEq, Eq)]
struct Framed {
    lines: Vec<Vec<u8>>,
    too_long: bool,
    /// What `take_pending` returned at the end (empty after an error).
    pending: Vec<u8>,
}

fn frame(chunks: &[&[u8]]) -> Framed {
    let mut buf = LineBuffer::new();
    let mut lines = Vec::new();
    let (mut fed, mut consumed) = (0, 0);
    for chunk in chunks {
        buf.extend(chunk);
        fed += chunk.len();
        loop {
            match buf.next_line() {
                Ok(Some(line)) => {
                    assert!(line.len() <= MAX_LINE, "line of {}", line.len());
                    assert!(!contains(&line, b"\r\n"), "CRLF inside a line");
                    consumed += line.len() + 2;
                    lines.push(line);
                }
                Ok(None) => {
                    // Never holds more than a maximal line plus the CR of its CRLF.
                    assert!(
                        fed - consumed <= MAX_LINE + 1,
                        "buffered {}",
                        fed - consumed
                    );
                    assert!(!buf.has_line());
                    break;
                }
                Err(_) => {
                    return Framed {
                        lines,
                        too_long: true,
                        pending: Vec::new(),
                    };
                }
            }
        }
    }
    Framed {
        lines,
        too_long: false,
        pending: buf.take_pending(),
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn framing_does_not_depend_on_how_bytes_arrive(
        input in client_stream(),
        cuts in prop::collection::vec(any::<Index>(), 0..8),
    ) {
        let whole = frame(&[&input]);
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut start = 0;
        for cut in cuts {
            chunks.push(&input[start..cut]);
            start = cut;
        }
        chunks.push(&input[start..]);
        prop_assert_eq!(&frame(&chunks), &whole);

        // Nothing lost or invented: the lines, their CRLFs and the rest are the input.
        if !whole.too_long {
            let mut rebuilt = whole.lines.join(&b"\r\n"[..]);
            if !whole.lines.is_empty() {
                rebuilt.extend_from_slice(b"\r\n");
            }
            rebuilt.extend_from_slice(&whole.pending);
            prop_assert_eq!(rebuilt, input);
        }
    }

    #[test]
    fn framing_byte_by_byte_matches_one_chunk(
        input in prop::collection::vec(
            prop_oneof![Just(b'\r'), Just(b'\n'), any::<u8>()],
            0..512,
        ),
    ) {
        // Short inputs only: byte-at-a-time is quadratic in the pending length, and the
        // long-line edges are covered by the random cuts above.
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        prop_assert_eq!(frame(&bytes), frame(&[&input]));
    }
}

// === Command::parse ===

const VERBS: &[&str] = &[
    "EHLO", "HELO", "STARTTLS", "AUTH", "NOOP", "RSET", "QUIT", "MAIL", "RCPT", "DATA", "BDAT",
    "VRFY", "EXPN", "HELP", "XYZZY", "",
];

/// A verb (any case) followed by random bytes, or random bytes alone, or a line around
/// the 512-octet limit.
fn command_line() -> impl Strategy<Value = Vec<u8>> {
    let verb = prop::sample::select(VERBS);
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        (
            verb.clone(),
            any::<bool>(),
            "[ -~\t\r\n\0\u{80}-\u{10ffff}]{0,24}"
        )
            .prop_map(|(verb, lower, rest)| {
                let verb = if lower {
                    verb.to_lowercase()
                } else {
                    verb.to_owned()
                };
                format!("{verb} {rest}").into_bytes()
            }),
        (verb, MAX_COMMAND_LINE - 4..MAX_COMMAND_LINE + 4).prop_map(|(verb, len)| {
            let mut line = format!("{verb} ").into_bytes();
            line.resize(len.max(line.len()), b'x');
            line
        }),
    ]
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn command_parse_is_total_and_its_output_is_safe(line in command_line()) {
        let Ok(command) = Command::parse(&line) else {
            return Ok(());
        };
        // Nothing accepted can smuggle a second command or confuse C string handling.
        prop_assert!(!line.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)));
        match command {
            Command::Auth { mechanism, initial } => {
                if let Some(mechanism) = mechanism {
                    prop_assert!(!mechanism.is_empty() && !mechanism.contains(' '));
                }
                if let Some(initial) = initial {
                    prop_assert!(!initial.is_empty() && !initial.contains(&b' '));
                    prop_assert!(contains(&line, initial));
                }
            }
            Command::Ehlo(name) | Command::Helo(name) => {
                // Replayed to the backend later: one printable word from the line.
                prop_assert!(line.len() <= MAX_COMMAND_LINE);
                prop_assert!(!name.is_empty());
                prop_assert!(!name.chars().any(|c| c.is_control() || c.is_whitespace()));
                prop_assert!(contains(&line, name.as_bytes()));
            }
            _ => prop_assert!(line.len() <= MAX_COMMAND_LINE),
        }
    }
}

// === BackendReply::parse ===

/// Bytes shaped like backend replies: `DDD-`/`DDD ` lines with random codes and text,
/// LF or CRLF endings, and some plain noise.
fn backend_bytes() -> impl Strategy<Value = Vec<u8>> {
    const CODES: &[&[u8]] = &[b"250", b"220", b"354", b"550", b"199", b"25x", b"2"];
    const SEPARATORS: &[&[u8]] = &[b"-", b" ", b"", b"x"];
    const ENDINGS: &[&[u8]] = &[b"\r\n", b"\n", b""];
    let line = (
        prop::sample::select(CODES),
        prop::sample::select(SEPARATORS),
        prop::collection::vec(any::<u8>(), 0..12),
        prop::sample::select(ENDINGS),
    )
        .prop_map(|(code, sep, text, end)| [code, sep, &text, end].concat());
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec(line, 0..8).prop_map(|lines| lines.concat()),
        (0..MAX_REPLY_LINES + 2).prop_map(|n| "250-x\r\n".repeat(n).into_bytes()),
        (MAX_REPLY_LINE - 2..MAX_REPLY_LINE + 8).prop_map(|n| {
            let mut line = b"250 ".to_vec();
            line.resize(n, b'y');
            line.extend_from_slice(b"\r\n");
            line
        }),
    ]
}

/// Reply text as postern or a backend would send it: anything but CR and LF.
fn reply_text() -> impl Strategy<Value = String> {
    "[^\r\n]{0,40}"
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn backend_reply_parse_is_total_and_consistent(buf in backend_bytes()) {
        match BackendReply::parse(&buf) {
            Ok(Some((reply, used))) => {
                prop_assert!(used > 0 && used <= buf.len());
                prop_assert_eq!(buf[used - 1], b'\n');
                prop_assert!((200..600).contains(&reply.code));
                prop_assert!((1..=MAX_REPLY_LINES).contains(&reply.lines.len()));
                for line in &reply.lines {
                    prop_assert!(!line.contains('\n'));
                }
                // What comes after the reply does not change it.
                prop_assert_eq!(
                    BackendReply::parse(&buf[..used]),
                    Ok(Some((reply.clone(), used)))
                );
            }
            Ok(None) => {
                // Waiting for more only while no line is over the limit.
                let tail = buf.rsplit(|&b| b == b'\n').next().unwrap_or(&buf);
                prop_assert!(tail.len() <= MAX_REPLY_LINE);
            }
            Err(_) => {}
        }
    }

    #[test]
    fn backend_reply_round_trips_the_multi_line_encoding(
        code in 200u16..600,
        lines in prop::collection::vec(reply_text(), 1..12),
        trailer in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let reply = Reply {
            code,
            lines: lines.iter().cloned().map(Into::into).collect(),
        };
        let mut wire = Vec::new();
        reply.encode(&mut wire);
        assert_wire_form(&reply);
        let expected = BackendReply { code, lines };
        let encoded_len = wire.len();
        for cut in 0..encoded_len {
            prop_assert_eq!(BackendReply::parse(&wire[..cut]), Ok(None), "prefix {}", cut);
        }
        wire.extend_from_slice(&trailer);
        prop_assert_eq!(BackendReply::parse(&wire), Ok(Some((expected, encoded_len))));
    }
}

// === SASL ===

/// A client response line: noise, base64 of noise or of NUL-separated fields, `*`, `=`.
fn sasl_line() -> impl Strategy<Value = Vec<u8>> {
    let field = prop::collection::vec(any::<u8>(), 0..12);
    prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..24),
        2 => prop::collection::vec(any::<u8>(), 0..24).prop_map(|bytes| b64(&bytes)),
        2 => prop::collection::vec(field, 1..4).prop_map(|fields| b64(&fields.join(&0))),
        1 => ("[a-z ]{0,8}", "[0-9a-fA-Fg]{30,34}")
            .prop_map(|(user, digest)| b64(format!("{user} {digest}").as_bytes())),
        1 => Just(b"*".to_vec()),
        1 => Just(b"=".to_vec()),
    ]
}

fn mechanism() -> impl Strategy<Value = Mechanism> {
    prop::sample::select(&[Mechanism::Plain, Mechanism::Login, Mechanism::CramMd5][..])
}

/// The invariants every step of every exchange keeps.
fn check_step(step: &Step, challenge: &str) -> Result<(), TestCaseError> {
    match step {
        Step::Challenge(text) => {
            prop_assert!(STANDARD.decode(text).is_ok(), "challenge {:?}", text);
        }
        Step::Done(Credentials::Password { username, password }) => {
            prop_assert!(!username.is_empty() && !username.contains('\0'));
            prop_assert!(!password.is_empty());
        }
        Step::Done(Credentials::CramMd5 {
            username,
            challenge: sent,
            digest,
        }) => {
            prop_assert!(!username.is_empty() && !username.contains('\0'));
            prop_assert_eq!(sent, challenge);
            prop_assert_eq!(digest.len(), 32);
            prop_assert!(
                digest
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            );
        }
        Step::Denied | Step::Cancelled | Step::Malformed => {}
    }
    Ok(())
}

/// PLAIN fields as RFC 4616 allows them: UTF-8 without NUL, password any bytes but NUL.
fn plain_fields() -> impl Strategy<Value = (String, Vec<u8>)> {
    ("[^\0]{1,16}", prop::collection::vec(1u8..=255, 1..24))
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn sasl_exchanges_accept_any_line_and_finish_for_good(
        mechanism in mechanism(),
        initial in prop::option::of(sasl_line()),
        lines in prop::collection::vec(sasl_line(), 0..6),
        challenge in "<[0-9]{1,6}\\.[0-9]{1,6}@[a-z.]{1,12}>",
    ) {
        let (mut exchange, mut step) = Exchange::start(mechanism, initial.as_deref(), &challenge);
        prop_assert_eq!(exchange.mechanism(), mechanism);
        check_step(&step, &challenge)?;
        let mut finished = !matches!(step, Step::Challenge(_));
        for line in &lines {
            step = exchange.step(line);
            check_step(&step, &challenge)?;
            if finished {
                // A finished exchange answers nothing but Malformed, whatever comes.
                prop_assert_eq!(&step, &Step::Malformed, "after the end: {:?}", line);
            }
            finished |= !matches!(step, Step::Challenge(_));
        }
    }

    #[test]
    fn plain_round_trips(
        (authcid, password) in plain_fields(),
        authzid_kind in 0..3u8,
        other in "[^\0]{1,8}",
        as_initial in any::<bool>(),
    ) {
        // authzid: none, the same user (same as none, RFC 4616 §2), or someone else.
        let authzid = match authzid_kind {
            0 => String::new(),
            1 => authcid.clone(),
            _ => format!("{other}{authcid}"),
        };
        let message = [authzid.as_bytes(), &[0], authcid.as_bytes(), &[0], &password].concat();
        let encoded = b64(&message);
        let step = if as_initial {
            Exchange::start(Mechanism::Plain, Some(&encoded), "").1
        } else {
            let (mut exchange, first) = Exchange::start(Mechanism::Plain, None, "");
            prop_assert_eq!(first, Step::Challenge(String::new()));
            exchange.step(&encoded)
        };
        let expected = if authzid_kind == 2 {
            Step::Denied
        } else {
            Step::Done(Credentials::Password { username: authcid, password })
        };
        prop_assert_eq!(step, expected);
    }

    #[test]
    fn login_round_trips((username, password) in plain_fields()) {
        let (mut exchange, first) =
            Exchange::start(Mechanism::Login, Some(&b64(username.as_bytes())), "");
        prop_assert!(matches!(first, Step::Challenge(_)));
        prop_assert_eq!(
            exchange.step(&b64(&password)),
            Step::Done(Credentials::Password { username, password })
        );
    }

    #[test]
    fn cram_md5_round_trips(
        username in "[^\0]{1,16}",
        digest in "[0-9a-fA-F]{32}",
        challenge in "<[0-9]{1,6}@[a-z]{1,8}>",
    ) {
        let (mut exchange, first) = Exchange::start(Mechanism::CramMd5, None, &challenge);
        prop_assert_eq!(first, Step::Challenge(STANDARD.encode(&challenge)));
        prop_assert_eq!(
            exchange.step(&b64(format!("{username} {digest}").as_bytes())),
            Step::Done(Credentials::CramMd5 {
                username,
                challenge,
                digest: digest.to_ascii_lowercase(),
            })
        );
    }
}

// === UserDb::parse ===

const SCHEMES: &[&str] = &[
    "PLAIN",
    "plain",
    "CLEAR",
    "CLEARTEXT",
    "SHA512-CRYPT",
    "BLF-CRYPT",
    "blf-crypt",
    "ARGON2ID",
    "MD5",
    "",
    "SSHA 256",
];

/// Password data that looks like, or nearly like, each supported hash format; only
/// parsed, never verified, so no KDF runs.
fn hash_data() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,24}",
        (
            "(rounds=[0-9]{1,10}\\$)?",
            "[./0-9A-Za-z]{0,18}",
            "[./0-9A-Za-z]{84,88}"
        )
            .prop_map(|(rounds, salt, hash)| format!("$6${rounds}{salt}${hash}")),
        ("2[abxy]", "[0-9]{1,3}", "[./0-9A-Za-z]{50,56}")
            .prop_map(|(v, cost, rest)| format!("${v}${cost}${rest}")),
        (
            "argon2(id|i|d)",
            "(v=[0-9]{1,3}\\$)?",
            "[0-9]{1,12}",
            "[0-9]{1,4}",
            "[0-9]{1,4}",
            "[A-Za-z0-9+/]{0,24}",
            "[A-Za-z0-9+/]{0,44}",
        )
            .prop_map(|(alg, v, m, t, p, salt, hash)| {
                format!("${alg}${v}m={m},t={t},p={p}${salt}${hash}")
            }),
    ]
}

fn users_line() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => "[^\n]{0,40}",
        1 => Just("# comment".to_owned()),
        4 => (
            "[a-c]{0,2}",
            prop::sample::select(SCHEMES),
            hash_data(),
            "(:[0-9a-z/]{0,6}){0,3}",
        )
            .prop_map(|(user, scheme, data, extra)| format!("{user}:{{{scheme}}}{data}{extra}")),
    ]
}

/// A users file line whose password field carries a recognisable secret, and the secret.
/// Users are `u` + digits and secrets start with `Zq`, so neither can occur in the other
/// or in the fixed words of an error message by chance.
fn secret_line() -> impl Strategy<Value = (String, String)> {
    let secret = "Zq[A-Za-z0-9!@#%&*()_+=~/.,?|$-]{6,20}";
    let field =
        (0..4u8, prop::sample::select(SCHEMES), secret).prop_map(|(shape, scheme, secret)| {
            let field = match shape {
                0 => format!("{{{scheme}}}{secret}"),
                1 => secret.clone(),
                2 => format!("{{{secret}"),
                _ => format!("{{{scheme}}}$6${secret}"),
            };
            (field, secret)
        });
    ("u[0-9]{0,2}", field, "(:[0-9a-z]{0,4})?")
        .prop_map(|(user, (field, secret), extra)| (format!("{user}:{field}{extra}"), secret))
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn users_parse_is_total(
        lines in prop::collection::vec(users_line(), 0..8),
        noise in ".{0,64}",
    ) {
        let text = format!("{}\n{noise}", lines.join("\n"));
        if let Err(error) = UserDb::parse(&text) {
            match error.line() {
                Some(line) => prop_assert!(line >= 1 && line <= text.lines().count()),
                // Only a file without any user line is refused as a whole.
                None => prop_assert!(error.to_string().starts_with("no users"), "{}", error),
            }
            prop_assert!(!error.to_string().is_empty());
        }
    }

    #[test]
    fn users_errors_never_echo_a_password(
        lines in prop::collection::vec(secret_line(), 1..6),
    ) {
        let text: Vec<&str> = lines.iter().map(|(line, _)| line.as_str()).collect();
        if let Err(error) = UserDb::parse(&text.join("\n")) {
            let message = format!("{error} {error:?}");
            for (_, secret) in &lines {
                prop_assert!(!message.contains(secret.as_str()), "{:?} in {:?}", secret, message);
            }
        }
    }
}

// === Session ===

/// What a client sends: a line (CRLF added) or raw bytes that may hold CR, LF or neither.
#[derive(Debug, Clone)]
enum Input {
    Line(Vec<u8>),
    Raw(Vec<u8>),
}

impl Input {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Input::Line(line) => [&line[..], b"\r\n"].concat(),
            Input::Raw(bytes) => bytes.clone(),
        }
    }
}

const KINDS: &[ListenerKind] = &[
    ListenerKind::Submission,
    ListenerKind::ImplicitTls,
    ListenerKind::Mx,
];

const TIM_PLAIN: &[u8] = b"\0tim\0tanstaaftanstaaf";

fn session_line() -> impl Strategy<Value = Vec<u8>> {
    let fixed = |lines: &'static [&'static str]| {
        prop::sample::select(lines).prop_map(|line| line.as_bytes().to_vec())
    };
    prop_oneof![
        6 => fixed(&["EHLO client.test", "ehlo [192.0.2.1]", "HELO client.test"]),
        1 => fixed(&["EHLO", "EHLO a b", "HELO \u{1b}x"]),
        5 => fixed(&["STARTTLS", "starttls"]),
        1 => fixed(&["STARTTLS now"]),
        6 => Just([&b"AUTH PLAIN "[..], &b64(TIM_PLAIN)].concat()),
        2 => fixed(&[
            "AUTH PLAIN",
            "AUTH LOGIN",
            "AUTH LOGIN dGlt",
            "AUTH CRAM-MD5",
            "AUTH CRAM-MD5 =",
            "AUTH",
            "AUTH XOAUTH2",
            "auth plain =",
            // Someone else's authzid: refused without a verification.
            "AUTH PLAIN VXJzZWwAS3VydAB4aXBqM3BsbXE=",
        ]),
        // Continuation lines: the PLAIN message, LOGIN fields, a CRAM-MD5 answer, cancel.
        3 => fixed(&[
            "AHRpbQB0YW5zdGFhZnRhbnN0YWFm",
            "dGlt",
            "dGFuc3RhYWY=",
            "dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw",
            "*",
            "=",
        ]),
        1 => prop::collection::vec(any::<u8>(), 0..24).prop_map(|bytes| b64(&bytes)),
        4 => fixed(&[
            "MAIL FROM:<a@b.test>",
            "mail from:<>",
            "RCPT TO:<c@d.test>",
            "DATA",
            "data",
            // Valid base64 too, so a mis-tracked SASL state would show.
            "MAIL",
            "BDAT 10 LAST",
        ]),
        2 => fixed(&["NOOP", "RSET", "VRFY root", "XYZZY", "QUIT"]),
        1 => prop::collection::vec(any::<u8>(), 0..24),
        1 => (
            prop::sample::select(&["NOOP ", "AUTH PLAIN ", "MAIL FROM:", "STARTTLS "][..]),
            prop_oneof![
                MAX_COMMAND_LINE - 12..MAX_COMMAND_LINE + 4,
                MAX_LINE - 4..MAX_LINE + 4,
            ],
        )
            .prop_map(|(verb, len)| {
                let mut line = verb.as_bytes().to_vec();
                line.resize(len, b'A');
                line
            }),
    ]
}

fn session_input() -> impl Strategy<Value = Input> {
    prop_oneof![
        12 => session_line().prop_map(Input::Line),
        1 => prop::collection::vec(
            prop_oneof![any::<u8>(), Just(b'\r'), Just(b'\n')],
            0..16
        )
        .prop_map(Input::Raw),
    ]
}

fn verdict() -> impl Strategy<Value = Verdict> {
    prop_oneof![
        3 => Just(Verdict::Valid),
        1 => Just(Verdict::Invalid),
        1 => Just(Verdict::Throttled),
    ]
}

/// One simulated connection: listener kind, limits, oracle answers, client inputs.
#[derive(Debug, Clone)]
struct Connection {
    kind: ListenerKind,
    max_errors: u32,
    max_auth_failures: u32,
    verdicts: Vec<Verdict>,
    ready: Vec<bool>,
    inputs: Vec<Input>,
}

fn connection() -> impl Strategy<Value = Connection> {
    (
        prop::sample::select(KINDS),
        1..12u32,
        1..5u32,
        prop::collection::vec(verdict(), 0..4),
        prop::collection::vec(prop::bool::weighted(0.7), 0..4),
        prop::collection::vec(session_input(), 0..32),
    )
        .prop_map(
            |(kind, max_errors, max_auth_failures, verdicts, ready, inputs)| Connection {
                kind,
                max_errors,
                max_auth_failures,
                verdicts,
                ready,
                inputs,
            },
        )
}

/// Runs one connection through the checking driver; panics on any broken invariant.
fn run(connection: &Connection) -> Driver {
    let mut driver = Driver::new(
        connection.kind,
        default_capabilities(),
        limits(connection.max_errors, connection.max_auth_failures),
        Oracle::new(connection.verdicts.clone(), connection.ready.clone()),
    );
    for input in &connection.inputs {
        driver.feed(&input.bytes());
    }
    driver
}

proptest! {
    #![proptest_config(config(1024))]

    /// No MAIL before AUTH, no relay without TLS, valid credentials and a ready backend
    /// (bar the MX listener's anonymous hand-off at MAIL), no AUTH on a pre-TLS greeting,
    /// well-formed replies: see `support/session_driver.rs`.
    #[test]
    fn session_keeps_its_invariants_for_any_client(connection in connection()) {
        run(&connection);
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Whatever the backend advertises, the EHLO reply postern builds from it is well
    /// formed: the backend's lines reach clients, so they must not break the framing.
    #[test]
    fn ehlo_reply_is_well_formed_for_any_backend_capabilities(
        backend in prop::collection::vec(
            (reply_text(), prop::collection::vec(any::<u8>(), 0..4)),
            1..8,
        ),
        kind in prop::sample::select(KINDS),
    ) {
        // Each backend line is text with a few raw bytes appended; LF is the one byte
        // that cannot be inside a parsed line.
        let mut wire = Vec::new();
        for (index, (text, raw)) in backend.iter().enumerate() {
            let sep = if index + 1 == backend.len() { " " } else { "-" };
            wire.extend_from_slice(format!("250{sep}{text}").as_bytes());
            wire.extend(raw.iter().filter(|&&b| b != b'\n'));
            wire.extend_from_slice(b"\r\n");
        }
        let Ok(Some((reply, _))) = BackendReply::parse(&wire) else {
            return Ok(());
        };
        let capabilities = Capabilities::from_ehlo_reply(&reply.lines);
        let mut driver = Driver::new(kind, capabilities, limits(10, 3), Oracle::new(vec![], vec![]));
        driver.feed(b"EHLO client.test\r\n");
        prop_assert_eq!(driver.codes.last(), Some(&250));
    }
}

/// Guards against a generator that never gets anywhere: a fixed-seed sample of the
/// session connections must reach the relay, close, and stay open in some cases each.
#[test]
fn session_generator_reaches_every_outcome() {
    let mut runner = TestRunner::deterministic();
    let strategy = connection();
    let (mut relayed, mut closed, mut open) = (0, 0, 0);
    for _ in 0..500 {
        let connection = strategy.new_tree(&mut runner).unwrap().current();
        match run(&connection).end {
            Some(End::Relayed) => relayed += 1,
            Some(End::Closed) => closed += 1,
            None => open += 1,
        }
    }
    assert!(
        relayed >= 20 && closed >= 20 && open >= 20,
        "relayed {relayed}, closed {closed}, open {open}"
    );
}

/// The driver itself accepts the happy paths on every listener.
#[test]
fn session_driver_relays_the_happy_path() {
    let auth = [&b"AUTH PLAIN "[..], &b64(TIM_PLAIN), b"\r\n"].concat();
    for (kind, script) in [
        (
            ListenerKind::Submission,
            vec![&b"EHLO c\r\n"[..], b"STARTTLS\r\n", b"EHLO c\r\n", &auth],
        ),
        (ListenerKind::ImplicitTls, vec![&b"EHLO c\r\n"[..], &auth]),
        (
            ListenerKind::Mx,
            vec![&b"EHLO c\r\n"[..], b"STARTTLS\r\n", b"EHLO c\r\n", &auth],
        ),
        // MX hands an anonymous session to the backend at its first MAIL.
        (
            ListenerKind::Mx,
            vec![&b"EHLO c\r\n"[..], b"MAIL FROM:<>\r\n"],
        ),
    ] {
        let mut driver = Driver::new(
            kind,
            default_capabilities(),
            limits(10, 3),
            Oracle::new(vec![], vec![]),
        );
        for bytes in script {
            driver.feed(bytes);
        }
        assert_eq!(
            driver.end,
            Some(End::Relayed),
            "{kind:?}: {:?}",
            driver.codes
        );
    }
}

// PROXY protocol headers arrive before anything else, from a load balancer that may be
// misconfigured or spoofed: framing must never panic, never ask for more than the
// limits, and the header it frames must decode (or be refused) without panicking.
proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn proxy_header_framing_is_total_and_bounded(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        use postern::proxy_proto::{Framing, MAX_V1, MAX_V2, decode, frame};
        let mut have = 0;
        loop {
            match frame(&bytes[..have]) {
                Framing::NeedMore { upto } => {
                    prop_assert!(upto > have && upto <= MAX_V1.max(MAX_V2), "asked for {} with {}", upto, have);
                    if upto > bytes.len() {
                        break;
                    }
                    have = upto;
                }
                Framing::Complete { len } => {
                    prop_assert!(len <= have);
                    let _ = decode(&bytes[..len]);
                    break;
                }
                Framing::Invalid => break,
            }
        }
    }
}

/// CVE-2011-0411: commands pipelined after STARTTLS, in the same packet, are never read
/// (the checking driver panics if the session reads a line the client sent before TLS).
#[test]
fn commands_pipelined_after_starttls_are_never_read() {
    let auth = [&b"AUTH PLAIN "[..], &b64(TIM_PLAIN), b"\r\n"].concat();
    for kind in [ListenerKind::Submission, ListenerKind::Mx] {
        let mut driver = Driver::new(
            kind,
            default_capabilities(),
            limits(10, 3),
            Oracle::new(vec![], vec![]),
        );
        driver.feed(
            &[
                &b"EHLO c\r\nSTARTTLS\r\n"[..],
                &auth,
                b"MAIL FROM:<a@b>\r\n",
            ]
            .concat(),
        );
        assert_eq!(driver.codes, [220, 250, 220], "{kind:?}");
        assert_eq!(driver.end, None);
    }
}
