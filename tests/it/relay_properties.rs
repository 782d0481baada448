//! Properties of the relayed session (issue 11): "whatever bytes a client sends, the
//! backend never acts on anything postern has not classified the same way the backend
//! will, and when postern cannot know how the backend will read something, it refuses
//! it."
//!
//! The real `Tracker` is driven by `support/relay_harness.rs` against a model backend
//! that answers like a lenient server that takes everything (250, 354 to DATA, its
//! capabilities to EHLO). The harness checks, on every byte the backend receives, that
//! a strict reader (lines end at CRLF, bodies at CRLF.CRLF, chunks by their size) and
//! lenient readers (lines at LF, words split on isspace; bodies at `<LF>.<LF>`,
//! `<LF>.<CRLF>`, `<CRLF>.<LF>`, or at a dot between any CRs and LFs) read the same
//! commands and message ends. On top of that, these properties check that what
//! reaches the backend and the client does not depend on how the client's bytes were
//! split into reads, and that postern's own count of messages follows the backend's.

use crate::common::relay_harness;

use proptest::prelude::*;
use proptest::sample::Index;

use postern::relay::tracker::{Event, Limits, MAX_BUFFER, MAX_CHUNK};
use relay_harness::{Answer, Harness, Op, Read, Setup};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// Client bytes biased towards what matters: real verbs, the verbs postern answers
/// itself, BDAT with odd sizes, dots, CR/LF alone and together, NUL/VT/FF, and short
/// random runs.
fn client_stream() -> impl Strategy<Value = Vec<u8>> {
    let line = prop::sample::select(vec![
        &b"MAIL FROM:<a@x>\r\n"[..],
        b"RCPT TO:<b@x>\r\n",
        b"DATA\r\n",
        b"RSET\r\n",
        b"NOOP\r\n",
        b"EHLO client.test\r\n",
        b"HELO client.test\r\n",
        b"QUIT\r\n",
        b" \tmail\tfrom:<c@x>\r\n",
        b"AUTH PLAIN AGEAYg==\r\n",
        b"STARTTLS\r\n",
        b"XCLIENT ADDR=1.2.3.4\r\n",
        b"xforward name=x\r\n",
        b"BDAT 0 LAST\r\n",
        b"\r\n.\r\n",
        b"\n.\n",
        b"\r\n.\n",
        b"\n.\r\n",
        b"\r.\r",
        b"\r\n..\r\n",
    ]);
    let bdat = (
        prop::sample::select(vec![
            "1",
            "3",
            "10",
            "0010",
            "00000000000000000003",
            "999",
            "1000",
            "1001",
            "2147483647",
            "2147483648",
            "4294967306",
            "-1",
            "+3",
            "0x10",
            "3 3",
        ]),
        any::<bool>(),
    )
        .prop_map(|(size, last)| {
            format!("BDAT {size}{}\r\n", if last { " LAST" } else { "" }).into_bytes()
        });
    let octet = prop::sample::select(vec![
        &b"\r"[..],
        b"\n",
        b"\r\n",
        b".",
        b"\0",
        b"\x0b",
        b"\x0c",
        b"\t",
        b" ",
        b"x",
        b"\x7f",
        b"\xc3\xa9",
    ]);
    let piece = prop_oneof![
        6 => line.prop_map(<[u8]>::to_vec),
        2 => bdat,
        6 => octet.prop_map(<[u8]>::to_vec),
        1 => prop::collection::vec(any::<u8>(), 0..8),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
}

fn setup() -> impl Strategy<Value = Setup> {
    (any::<u8>(), any::<u8>()).prop_map(|(flags, extra)| Setup::from_bytes(flags, extra))
}

/// `input` cut at `cuts`.
fn split(input: &[u8], cuts: &[Index]) -> Vec<Vec<u8>> {
    let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
    cuts.sort_unstable();
    let mut pieces = Vec::new();
    let mut start = 0;
    for cut in cuts {
        pieces.push(input[start..cut].to_vec());
        start = cut;
    }
    pieces.push(input[start..].to_vec());
    pieces
}

/// Each piece arrives in its own read, everything moving between reads; then the
/// client closes.
fn run(setup: Setup, pieces: &[Vec<u8>]) -> Harness {
    let mut harness = Harness::new(setup);
    for piece in pieces {
        harness.step(Op::Client(piece.clone()));
        harness.step(Op::Pump);
    }
    harness.step(Op::ClientEof);
    harness.step(Op::Pump);
    harness.finish();
    harness
}

/// Whether postern answered something itself (the model backend only says 2xx/354).
fn postern_refused(harness: &Harness) -> bool {
    harness
        .to_client
        .split(|&b| b == b'\n')
        .any(|line| matches!(line.first(), Some(b'4' | b'5')))
}

fn sorted_events(events: &[Event]) -> Vec<String> {
    let mut events: Vec<String> = events.iter().map(|e| format!("{e:?}")).collect();
    events.sort();
    events
}

fn count(events: &[Event], f: impl Fn(&Event) -> bool) -> usize {
    events.iter().filter(|e| f(e)).count()
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn the_backend_reads_what_postern_classified_however_reads_split(
        setup in setup(),
        input in client_stream(),
        cuts in prop::collection::vec(any::<Index>(), 0..8),
    ) {
        // The harness panics inside `run` on any reading that differs.
        let whole = run(setup, std::slice::from_ref(&input));
        let bytewise: Vec<Vec<u8>> = input.iter().map(|&b| vec![b]).collect();
        for pieces in [split(&input, &cuts), bytewise] {
            let other = run(setup, &pieces);
            prop_assert_eq!(&other.backend.log, &whole.backend.log);
            // Events from client lines (a limit reached) and from replies (a recipient
            // accepted) interleave as the reads fall; each kind comes in order.
            prop_assert_eq!(sorted_events(&other.events), sorted_events(&whole.events));
            prop_assert_eq!(
                other.tracker.backend_abandoned(),
                whole.tracker.backend_abandoned()
            );
            if whole.tracker.backend_abandoned() {
                // Cut off mid-body: the body octets before the refused dot line that
                // were already written depend on the reads, and whether the client's
                // own end came (and with it the 550) depends on them too.
                let (a, b) = (&other.backend.received, &whole.backend.received);
                prop_assert!(a.starts_with(b) || b.starts_with(a));
                let (a, b) = (other.client_text(), whole.client_text());
                prop_assert!(a.starts_with(&b) || b.starts_with(&a), "{} / {}", a, b);
            } else {
                prop_assert_eq!(
                    String::from_utf8_lossy(&other.backend.received),
                    String::from_utf8_lossy(&whole.backend.received)
                );
                prop_assert_eq!(other.client_text(), whole.client_text());
            }
        }

        // Postern's count of messages and recipients is the backend's.
        let accepted = count(&whole.events, |e| matches!(e, Event::MessageAccepted { .. }));
        let recipients = count(&whole.events, |e| matches!(e, Event::RecipientAccepted));
        let ends = whole
            .backend
            .log
            .iter()
            .filter(|r| matches!(r, Read::Body(_)))
            .count()
            + whole
                .backend
                .log
                .iter()
                .zip(whole.backend.log.iter().skip(1))
                .filter(|(cmd, _)| matches!(cmd, Read::Command(l) if l.to_ascii_uppercase().ends_with(b"LAST")))
                .count();
        prop_assert!(accepted <= whole.backend.accepted_messages);
        prop_assert!(accepted <= ends);
        if !whole.tracker.closed_by_postern() && !whole.tracker.backend_abandoned() {
            prop_assert_eq!(accepted, whole.backend.accepted_messages);
        }
        let _ = recipients;

        // Nothing refused: the backend got the client's bytes, all but an unfinished
        // tail.
        let refused = postern_refused(&whole)
            || whole.tracker.closed_by_postern()
            || whole.tracker.backend_abandoned();
        if !refused {
            let received = &whole.backend.received;
            prop_assert!(input.starts_with(received));
            let tail = &input[received.len()..];
            // Nothing goes on after a QUIT the backend accepted: a server closes there.
            prop_assert!(
                whole.backend.said_goodbye_at.is_some() || !tail.windows(2).any(|w| w == b"\r\n"),
                "a complete line was held back: {:?}",
                String::from_utf8_lossy(tail)
            );
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// The backend answers with anything (refusals, 421, multi-line and bare-LF
    /// replies, 250 to DATA), replies and writes arrive in any pieces, the store answers
    /// anything, sides close at any time: every invariant of the harness still holds.
    #[test]
    fn any_interleaving_keeps_the_invariants(
        setup in setup(),
        data in prop::collection::vec(any::<u8>(), 0..256),
        input in client_stream(),
        cuts in prop::collection::vec(any::<Index>(), 0..8),
    ) {
        let mut harness = Harness::new(setup);
        let mut pieces = split(&input, &cuts).into_iter();
        for op in Op::decode(&data) {
            // Client bytes come from the biased stream rather than the raw ones.
            let op = match op {
                Op::Client(_) => Op::Client(pieces.next().unwrap_or_default()),
                Op::RawBackend(_) => Op::Answer(Answer::Positive),
                op => op,
            };
            harness.step(op);
        }
        for piece in pieces {
            harness.step(Op::Client(piece));
        }
        harness.step(Op::Pump);
        harness.finish();
    }
}

fn plain() -> Setup {
    Setup {
        strict_data: false,
        chunking: true,
        small_size: false,
        authenticated: true,
        tls: true,
        limits: Limits::default(),
    }
}

#[test]
fn the_harness_sees_commands_bodies_and_chunks() {
    let input = b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\nhi\r\n..x\r\n.\r\n\
                  BDAT 3\r\nabcBDAT 0 LAST\r\nQUIT\r\n";
    let harness = run(plain(), &[input.to_vec()]);
    assert_eq!(harness.backend.received, input);
    assert_eq!(
        harness.backend.log,
        [
            Read::Command(b"MAIL FROM:<a>".to_vec()),
            Read::Command(b"RCPT TO:<b>".to_vec()),
            Read::Command(b"DATA".to_vec()),
            Read::Body(b"hi\r\n..x\r\n.\r\n".len()),
            Read::Command(b"BDAT 3".to_vec()),
            Read::Chunk(3),
            Read::Command(b"BDAT 0 LAST".to_vec()),
            Read::Chunk(0),
            Read::Command(b"QUIT".to_vec()),
        ]
    );
    assert_eq!(harness.backend.accepted_messages, 2);
    assert_eq!(MAX_CHUNK, (1 << 31) - 1);
}

#[test]
fn the_harness_catches_a_smuggled_message() {
    // Fed straight to the model backend, the lookalike is caught; through postern it
    // never arrives.
    let outcome = std::panic::catch_unwind(|| {
        let mut harness = Harness::new(plain());
        harness.step(Op::Client(b"DATA\r\n".to_vec()));
        harness.step(Op::Pump);
        harness.backend_receive_for_test(b"x\n.\nMAIL FROM:<e>\r\n");
    });
    assert!(outcome.is_err());
    let harness = run(
        plain(),
        &[b"DATA\r\nx\n.\nMAIL FROM:<e>\r\n\r\n.\r\n".to_vec()],
    );
    assert!(harness.tracker.backend_abandoned());
    assert!(b"DATA\r\nx".starts_with(&harness.backend.received));
    assert!(harness.backend.received.starts_with(b"DATA\r\n"));
    assert!(harness.client_text().contains("550 5.6.0"));
}

// === Problems the review found, each fixed: these keep them fixed ===

/// `Tracker::finish` runs the ledger's release through `apply`, which stops at the first
/// op once `closing` is set: every session postern ends with a closing reply of its own
/// (550 5.6.0 for a smuggling lookalike, 552/501 for BDAT, 500 for an endless line, 421
/// out of step) keeps the slots its open transaction held, until the window expires.
/// Found by `any_interleaving_keeps_the_invariants`.
#[test]
fn a_session_postern_closes_gives_back_what_it_held() {
    let limited = Setup {
        limits: Limits {
            messages_per_user: Some(5),
            recipients_per_user: Some(5),
            ..Limits::default()
        },
        ..plain()
    };
    let mut harness = Harness::new(limited);
    harness.step(Op::Client(
        b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n".to_vec(),
    ));
    harness.step(Op::Pump);
    harness.step(Op::Client(b"x\n.\nMAIL FROM:<e>\r\n\r\n.\r\n".to_vec()));
    harness.step(Op::Pump);
    assert!(harness.tracker.closed_by_postern());
    assert!(harness.client_text().contains("550 5.6.0"));
    harness.finish(); // panics: postern kept 1 message and 1 recipient slot
}

/// Postern's own replies (500 for a control octet, 503 for AUTH/STARTTLS, 502 for
/// XCLIENT) go to `to_client` whatever its size: the client is read as long as
/// `to_backend` has room, and nothing is forwarded for these lines. A client that
/// sends them and never reads gets an unbounded queue: 6 octets in, ~36 out.
#[test]
fn a_client_that_never_reads_cannot_grow_the_reply_queue_without_bound() {
    let mut harness = Harness::new(plain());
    harness.step(Op::Client(b"AUTH\r\n".repeat(100_000)));
    // Read everything the tracker will take; never write to the client.
    harness.step(Op::ReadClient(usize::MAX));
}

/// The same flood through an anonymous MX session (no login needed to reach the relay).
#[test]
fn an_anonymous_client_cannot_grow_the_reply_queue_without_bound() {
    let anonymous = Setup {
        authenticated: false,
        tls: false,
        ..plain()
    };
    let mut harness = Harness::new(anonymous);
    harness.step(Op::Client(b"NOOP\x0b\r\n".repeat(60_000)));
    harness.step(Op::ReadClient(usize::MAX));
    assert!(harness.tracker.to_client().len() <= 4 * MAX_BUFFER);
}

/// A reservation the driver asked for and the store granted after postern stopped
/// taking client bytes (here a failed write to the backend; equally a 421 from the
/// backend or a closing reply) is stored in the rules as `Answered(Granted { held:
/// true })` and never consumed, and `finish` gives back only the ledger's slots: the
/// slot stays taken in the store until its window expires.
#[test]
fn a_reservation_granted_after_the_backend_failed_is_given_back() {
    let limited = Setup {
        limits: Limits {
            messages_per_user: Some(5),
            ..Limits::default()
        },
        ..plain()
    };
    let mut harness = Harness::new(limited);
    harness.step(Op::Client(b"MAIL FROM:<a>\r\n".to_vec()));
    harness.step(Op::ReadClient(usize::MAX));
    assert!(harness.tracker.wants_reservation().is_some());
    // The store call is in flight when the backend write fails.
    harness.step(Op::BackendWriteFailed);
    harness.step(Op::Store(0));
    harness.finish(); // panics: postern kept 1 slot, the backend accepted nothing
}

/// When the backend answers 354 to something other than DATA, postern says the relay is
/// out of step and closes the client, but what it had queued for the backend is still
/// handed out by `to_backend()` (only `CloseBackend` clears it), and the relay writes
/// it. A BDAT chunk queued there is read by a backend now in DATA mode as body: its
/// `<CRLF>.<CRLF>` ends that message and the chunk's next line (here XCLIENT, which
/// postern never forwards as a command) is a command to the backend.
#[test]
fn nothing_more_reaches_a_backend_that_answered_354_to_a_non_data_command() {
    use postern::relay::tracker::Tracker;
    let mut tracker = Tracker::new(plain().settings(), b"", b"");
    let client = b"NOOP\r\nBDAT 25\r\n\r\n.\r\nXCLIENT LOGIN=root\r\n";
    let space = tracker.client_space().expect("room");
    space[..client.len()].copy_from_slice(client);
    tracker.client_read(client.len());
    // The backend took "NOOP\r\n" only; the rest waits in postern's queue.
    assert_eq!(tracker.to_backend(), client);
    tracker.backend_written(6);
    let reply = b"354 go ahead\r\n";
    let space = tracker.backend_space().expect("room");
    space[..reply.len()].copy_from_slice(reply);
    tracker.backend_read(reply.len());
    assert!(tracker.closed_by_postern());
    assert!(
        tracker.to_backend().is_empty(),
        "still queued for the backend: {:?}",
        String::from_utf8_lossy(tracker.to_backend())
    );
}

/// Hardening: a verb with octets above 127 is `Other` to postern and forwarded without
/// waiting, but a backend that strips the eighth bit of its input (sendmail's
/// SevenBitInput, some 7-bit gateways) reads `D\xc1TA` as DATA. What the client
/// pipelined behind it, a BDAT chunk included, is then a body to that backend. RFC 6531
/// allows UTF-8 in arguments, never in verbs, so refusing such verbs costs nothing.
#[test]
fn a_verb_with_eight_bit_octets_is_refused() {
    let harness = run(plain(), &[b"D\xc1TA\r\nNOOP\r\n".to_vec()]);
    assert!(
        !harness.backend.received.starts_with(b"D\xc1TA"),
        "forwarded: {:?}",
        String::from_utf8_lossy(&harness.backend.received)
    );
}
