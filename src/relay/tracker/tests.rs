//! Transcript tests for the relayed session, driving the real [`Tracker`] (buffers,
//! rules, back-pressure) as the relay does. Every transcript is also replayed with
//! each step split at every byte offset, and fed one byte at a time: what reaches
//! each side and what is counted must not depend on how the bytes arrived.

use super::*;
use crate::relay::pump::{Io, Pump, Pumped, Sides};
use crate::smtp::line::MAX_RELAYED_LINE;

const HOST: &str = "postern.test";

fn settings() -> Settings {
    Settings {
        hostname: HOST.into(),
        authenticated: true,
        tls: true,
        chunking: true,
        max_chunk: MAX_CHUNK,
        hide_chunking: false,
        strict_data: false,
        limits: Limits::default(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    C,
    B,
}
use Dir::{B, C};

/// The limits store as the driver sees it: usage so far, and an answer forced for
/// every reservation (a store that is down and fails closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookup {
    Usage(Usage),
    Unavailable,
}

/// What a run of the tracker produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Run {
    to_backend: Vec<u8>,
    to_client: Vec<u8>,
    events: Vec<Event>,
    backend_closed: bool,
    closed: bool,
    lookups: usize,
    /// Messages and recipients given back to the store.
    released: (u32, u32),
    /// The store's usage at the end, after the session's final release.
    usage: Option<Usage>,
}

impl Run {
    fn client_text(&self) -> String {
        String::from_utf8_lossy(&self.to_client).into_owned()
    }
}

/// Runs the relay's own schedule ([`Pump`]) over peers that always read, and plays the
/// limits store.
struct Sim {
    tracker: Tracker,
    pump: Pump,
    limits: Limits,
    store: Lookup,
    /// Client bytes the tracker had no room for yet.
    waiting: Vec<u8>,
    /// Backend bytes the tracker had no room for yet.
    backend_waiting: Vec<u8>,
    run: Run,
    writes: Writes,
    /// The most octets the backend takes per write: 0 blocks it.
    backend_takes: usize,
}

/// The two peers of a [`Sim`]: the client always reads everything, the backend as much
/// as it takes; the client's and the backend's bytes wait in queues until the pump
/// reads them.
struct Peers<'a> {
    waiting: &'a mut Vec<u8>,
    backend_waiting: &'a mut Vec<u8>,
    run: &'a mut Run,
    writes: &'a mut Writes,
    backend_takes: usize,
}

/// How the pump wrote to the peers: not part of [`Run`], which must not depend on how
/// the bytes arrived.
#[derive(Debug, Default)]
struct Writes {
    to_backend: usize,
    to_client: usize,
    largest: usize,
    client_flushes: usize,
}

fn take_into(queue: &mut Vec<u8>, into: &mut [u8]) -> Io {
    if queue.is_empty() {
        return Io::WouldBlock;
    }
    let n = into.len().min(queue.len());
    into[..n].copy_from_slice(&queue[..n]);
    queue.drain(..n);
    Io::Done(n)
}

impl Sides for Peers<'_> {
    fn write_backend(&mut self, bytes: &[u8]) -> Io {
        if self.backend_takes == 0 {
            return Io::WouldBlock;
        }
        let bytes = &bytes[..bytes.len().min(self.backend_takes)];
        self.writes.to_backend += 1;
        self.writes.largest = self.writes.largest.max(bytes.len());
        self.run.to_backend.extend_from_slice(bytes);
        Io::Done(bytes.len())
    }
    fn flush_backend(&mut self) -> Io {
        Io::Done(0)
    }
    fn shutdown_backend(&mut self) -> Io {
        Io::Done(0)
    }
    fn write_client(&mut self, bytes: &[u8]) -> Io {
        self.writes.to_client += 1;
        self.writes.largest = self.writes.largest.max(bytes.len());
        self.run.to_client.extend_from_slice(bytes);
        Io::Done(bytes.len())
    }
    fn flush_client(&mut self) -> Io {
        self.writes.client_flushes += 1;
        Io::Done(0)
    }
    fn read_client(&mut self, into: &mut [u8]) -> Io {
        take_into(self.waiting, into)
    }
    fn read_backend(&mut self, into: &mut [u8]) -> Io {
        take_into(self.backend_waiting, into)
    }
}

impl Sim {
    fn new(settings: Settings, store: Lookup) -> Self {
        Sim {
            limits: settings.limits,
            tracker: Tracker::new(settings, b"", b""),
            pump: Pump::default(),
            store,
            waiting: Vec::new(),
            backend_waiting: Vec::new(),
            run: Run::default(),
            writes: Writes::default(),
            backend_takes: usize::MAX,
        }
    }

    fn feed(&mut self, dir: Dir, bytes: &[u8]) {
        match dir {
            C => self.waiting.extend_from_slice(bytes),
            B => self.backend_waiting.extend_from_slice(bytes),
        }
        self.drain();
    }

    /// Moves everything that can move, until nothing does.
    fn drain(&mut self) {
        loop {
            let mut peers = Peers {
                waiting: &mut self.waiting,
                backend_waiting: &mut self.backend_waiting,
                run: &mut self.run,
                writes: &mut self.writes,
                backend_takes: self.backend_takes,
            };
            let pumped = self.pump.step(&mut self.tracker, &mut peers);
            assert!(
                !matches!(pumped, Pumped::ClientGone(_)),
                "the client always reads"
            );
            let mut progress = matches!(pumped, Pumped::Progress);
            while let Some(notice) = self.tracker.next_notice() {
                self.on_notice(notice);
                progress = true;
            }
            if let Some(claim) = self.tracker.wants_reservation() {
                let answer = self.reserve(claim);
                self.run.lookups += 1;
                self.tracker.on_reservation(answer);
                progress = true;
            }
            self.run.backend_closed = self.tracker.backend_abandoned();
            self.run.closed = self.tracker.closed_by_postern();
            if !progress {
                break;
            }
        }
    }

    fn reserve(&mut self, claim: Claim) -> Reservation {
        let Lookup::Usage(usage) = &mut self.store else {
            return Reservation::Refused(Limit::StoreUnavailable);
        };
        match claim {
            Claim::Message => {
                if self
                    .limits
                    .messages_per_user
                    .is_some_and(|max| usage.messages >= max)
                {
                    return Reservation::Refused(Limit::MessagesPerUser);
                }
                usage.messages += 1;
            }
            Claim::Recipient => {
                if self
                    .limits
                    .recipients_per_user
                    .is_some_and(|max| usage.recipients >= max)
                {
                    return Reservation::Refused(Limit::RecipientsPerUser);
                }
                usage.recipients += 1;
            }
        }
        Reservation::Granted { held: true }
    }

    fn on_notice(&mut self, notice: Notice) {
        match notice {
            Notice::Event(event) => self.run.events.push(event),
            Notice::Release {
                messages,
                recipients,
            } => {
                self.run.released.0 += messages;
                self.run.released.1 += recipients;
                if let Lookup::Usage(usage) = &mut self.store {
                    usage.messages -= u64::from(messages);
                    usage.recipients -= u64::from(recipients);
                }
            }
        }
    }

    /// Ends the session: what was held is given back.
    fn finish(mut self) -> Run {
        self.tracker.finish();
        self.drain();
        if let Lookup::Usage(usage) = self.store {
            self.run.usage = Some(usage);
        }
        self.run
    }
}

fn run_steps(settings: &Settings, lookup: Lookup, steps: &[(Dir, Vec<u8>)]) -> Run {
    let mut sim = Sim::new(settings.clone(), lookup);
    for (dir, bytes) in steps {
        sim.feed(*dir, bytes);
    }
    sim.finish()
}

/// Runs `script` whole, then with every step split at every offset, then byte by
/// byte, and checks each run with `check`.
fn every_split(
    settings: &Settings,
    lookup: Lookup,
    script: &[(Dir, &[u8])],
    check: impl Fn(&Run, &str),
) -> Run {
    let whole: Vec<(Dir, Vec<u8>)> = script.iter().map(|(d, b)| (*d, b.to_vec())).collect();
    let reference = run_steps(settings, lookup, &whole);
    check(&reference, "whole");
    for (i, (dir, bytes)) in script.iter().enumerate() {
        for cut in 0..=bytes.len() {
            let mut steps = whole.clone();
            let (a, b) = bytes.split_at(cut);
            steps.splice(i..=i, [(*dir, a.to_vec()), (*dir, b.to_vec())]);
            check(
                &run_steps(settings, lookup, &steps),
                &format!("step {i} split at {cut}"),
            );
        }
    }
    let bytewise: Vec<(Dir, Vec<u8>)> = script
        .iter()
        .flat_map(|(d, b)| b.iter().map(move |byte| (*d, vec![*byte])))
        .collect();
    check(&run_steps(settings, lookup, &bytewise), "bytewise");
    reference
}

/// Checks that every split gives exactly the whole run.
fn split_invariant(settings: &Settings, lookup: Lookup, script: &[(Dir, &[u8])]) -> Run {
    let whole: Vec<(Dir, Vec<u8>)> = script.iter().map(|(d, b)| (*d, b.to_vec())).collect();
    let reference = run_steps(settings, lookup, &whole);
    every_split(settings, lookup, script, |run, label| {
        assert_eq!(run, &reference, "{label}");
    })
}

fn all(dir: Dir, script: &[(Dir, &[u8])]) -> Vec<u8> {
    script
        .iter()
        .filter(|(d, _)| *d == dir)
        .flat_map(|(_, b)| b.to_vec())
        .collect()
}

const NO_LOOKUP: Lookup = Lookup::Usage(Usage {
    messages: 0,
    recipients: 0,
});

#[test]
fn a_pipelined_transaction_is_relayed_verbatim_and_counted() {
    let script: &[(Dir, &[u8])] = &[
        (
            C,
            b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nRCPT TO:<c@x>\r\nDATA\r\n",
        ),
        (B, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 No\r\n"),
        (B, b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (
            C,
            b"Subject: x\r\n\r\nbody\r\n..leading dot\r\n.x\r\n\r\n.\r\nMAIL FROM:<a@x>\r\nRSET\r\n",
        ),
        (B, b"250 2.0.0 queued\r\n250 2.1.0 Ok\r\n250 2.0.0 Ok\r\n"),
        (C, b"QUIT\r\n"),
        (B, b"221 2.0.0 Bye\r\n"),
    ];
    let run = split_invariant(&settings(), NO_LOOKUP, script);
    assert_eq!(run.to_backend, all(C, script));
    assert_eq!(run.to_client, all(B, script));
    assert_eq!(
        run.events,
        [
            Event::RecipientAccepted,
            Event::MessageAccepted { recipients: 1 }
        ]
    );
}

#[test]
fn an_empty_body_and_a_body_pipelined_with_data_are_followed() {
    // The client should wait for 354; one that does not is still read correctly,
    // because its bytes after DATA wait for the backend's answer.
    let script: &[(Dir, &[u8])] = &[
        (
            C,
            b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n.\r\nDATA\r\nx\r\n.\r\nNOOP\r\n",
        ),
        (B, b"250 ok\r\n250 ok\r\n354 go\r\n250 one\r\n"),
        (B, b"354 go\r\n250 two\r\n250 noop\r\n"),
    ];
    let run = split_invariant(&settings(), NO_LOOKUP, script);
    assert_eq!(run.to_backend, all(C, script));
    assert_eq!(run.to_client, all(B, script));
    assert_eq!(
        run.events,
        [
            Event::RecipientAccepted,
            Event::MessageAccepted { recipients: 1 },
            Event::MessageAccepted { recipients: 0 },
        ]
    );
}

#[test]
fn a_refused_data_leaves_the_client_in_the_command_phase() {
    let script: &[(Dir, &[u8])] = &[
        (C, b"MAIL FROM:<a>\r\nDATA\r\n"),
        (B, b"250 ok\r\n554 5.5.1 No valid recipients\r\n"),
        (C, b"AUTH PLAIN x\r\nQUIT\r\n"),
        (B, b"221 bye\r\n"),
    ];
    let run = split_invariant(&settings(), NO_LOOKUP, script);
    assert_eq!(run.to_backend, b"MAIL FROM:<a>\r\nDATA\r\nQUIT\r\n");
    assert_eq!(
        run.client_text(),
        "250 ok\r\n554 5.5.1 No valid recipients\r\n503 5.5.1 Already authenticated\r\n221 bye\r\n"
    );
    assert!(run.events.is_empty());
}

#[test]
fn auth_and_starttls_are_answered_in_pipeline_order_and_never_forwarded() {
    let script: &[(Dir, &[u8])] = &[
        (
            C,
            b"MAIL FROM:<a>\r\nAUTH PLAIN AGEAYg==\r\nRCPT TO:<b>\r\nstarttls\r\n",
        ),
        (B, b"250 mail ok\r\n"),
        (B, b"250 rcpt ok\r\n"),
        (C, b"auth login\r\n"),
    ];
    let run = split_invariant(&settings(), NO_LOOKUP, script);
    assert_eq!(run.to_backend, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\n");
    assert_eq!(
        run.client_text(),
        "250 mail ok\r\n\
         503 5.5.1 Already authenticated\r\n\
         250 rcpt ok\r\n\
         503 5.5.1 TLS already active\r\n\
         503 5.5.1 Already authenticated\r\n"
    );
}

#[test]
fn an_anonymous_plaintext_session_gets_no_auth_or_starttls_either() {
    let anonymous = Settings {
        authenticated: false,
        tls: false,
        ..settings()
    };
    let script: &[(Dir, &[u8])] = &[(C, b"AUTH PLAIN\r\nSTARTTLS\r\n")];
    let run = split_invariant(&anonymous, NO_LOOKUP, script);
    assert!(run.to_backend.is_empty());
    assert_eq!(
        run.client_text(),
        "503 5.5.1 AUTH not permitted once mail is relayed\r\n\
         503 5.5.1 STARTTLS not permitted once mail is relayed\r\n"
    );
}

#[test]
fn ehlo_after_login_is_rewritten_as_before_login() {
    let script: &[(Dir, &[u8])] = &[
        (C, b"EHLO client.example\r\n"),
        (
            B,
            b"250-legacy.example Hello\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-AUTH PLAIN LOGIN\r\n\
              250-STARTTLS\r\n250-XCLIENT NAME ADDR\r\n250 8BITMIME\r\n",
        ),
        (C, b"HELO again\r\n"),
        (B, b"250 legacy.example\r\n"),
        (C, b"EHLO x\r\n"),
        (B, b"501 5.5.2 Syntax\r\n"),
    ];
    let run = split_invariant(&settings(), NO_LOOKUP, script);
    assert_eq!(run.to_backend, all(C, script));
    assert_eq!(
        run.client_text(),
        "250-postern.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n\
         250 AUTH PLAIN LOGIN CRAM-MD5\r\n\
         250 postern.test\r\n\
         501 5.5.2 Syntax\r\n"
    );
}

#[test]
fn bdat_chunks_are_counted_not_parsed() {
    let script: &[(Dir, &[u8])] = &[
        (C, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\n"),
        (B, b"250 ok\r\n250 ok\r\n"),
        // The chunk holds what would be commands and an end of data; none of it is.
        (C, b"BDAT 30\r\nAUTH PLAIN x\r\n.\r\nRCPT TO:<c>\r\n"),
        (C, b"bdat 0 last\r\nBDAT 3 LAST\r\nabcNOOP\r\n"),
        (
            B,
            b"250 30 octets\r\n250 0 octets\r\n250 3 octets, message ok\r\n",
        ),
        (B, b"250 noop\r\n"),
    ];
    let run = split_invariant(&settings(), NO_LOOKUP, script);
    assert_eq!(run.to_backend, all(C, script));
    assert_eq!(run.to_client, all(B, script));
    assert_eq!(
        run.events,
        [
            Event::RecipientAccepted,
            Event::MessageAccepted { recipients: 1 },
            Event::MessageAccepted { recipients: 0 },
        ]
    );
}

#[test]
fn bdat_without_chunking_or_with_a_bad_size_closes() {
    let no_chunking = Settings {
        chunking: false,
        ..settings()
    };
    let run = split_invariant(&no_chunking, NO_LOOKUP, &[(C, b"BDAT 4 LAST\r\nQUIT")]);
    assert!(run.to_backend.is_empty());
    assert!(run.closed);
    assert_eq!(
        run.client_text(),
        "502 5.5.1 BDAT not offered, closing connection\r\n"
    );
    for line in [&b"BDAT x\r\n"[..], b"BDAT\r\n", b"BDAT 1 LAST more\r\n"] {
        let run = split_invariant(&settings(), NO_LOOKUP, &[(C, line)]);
        assert!(run.to_backend.is_empty());
        assert!(run.closed);
        assert!(run.client_text().starts_with("501 5.5.4"));
    }
}

#[test]
fn command_lines_with_bare_line_endings_are_refused_not_forwarded() {
    let script: &[(Dir, &[u8])] = &[
        (C, b"NOOP\nDATA\r\nRSET\rMAIL\r\nNOOP\r\n"),
        (B, b"250 ok\r\n"),
    ];
    let run = split_invariant(&settings(), NO_LOOKUP, script);
    assert_eq!(run.to_backend, b"NOOP\r\n");
    assert_eq!(
        run.client_text(),
        "500 5.5.2 Control character or bare CR or LF in command\r\n\
         500 5.5.2 Control character or bare CR or LF in command\r\n250 ok\r\n"
    );
}

#[test]
fn an_endless_command_line_is_refused_and_closes() {
    let mut long = b"NOOP ".to_vec();
    long.resize(MAX_RELAYED_LINE + 10, b'a');
    let mut sim = Sim::new(settings(), NO_LOOKUP);
    sim.feed(C, &long);
    assert!(sim.run.closed);
    assert!(sim.run.to_backend.is_empty());
    assert_eq!(sim.run.client_text(), "500 5.5.2 Line too long\r\n");
}

/// The smuggling sequences: a bare LF or CR around a dot, then a second message.
const SMUGGLING: &[&[u8]] = &[
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\n.\r",
    b"\r\n\x00.\r\n",
];

fn smuggling_script(sequence: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut body = b"Subject: first\r\n\r\nhello".to_vec();
    body.extend_from_slice(sequence);
    body.extend_from_slice(
        b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@x>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n",
    );
    let prefix = b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n".to_vec();
    (prefix, body)
}

fn first_bare_line_ending(body: &[u8]) -> usize {
    (0..body.len())
        .find(|&i| match body[i] {
            b'\r' => body.get(i + 1) != Some(&b'\n'),
            b'\n' => i == 0 || body[i - 1] != b'\r',
            _ => false,
        })
        .unwrap()
}

#[test]
fn strict_data_refuses_smuggling_sequences_without_completing_the_message() {
    let strict = Settings {
        strict_data: true,
        ..settings()
    };
    for sequence in SMUGGLING {
        if sequence.contains(&0) {
            continue; // A NUL is not a line ending; see the lenient test.
        }
        let (prefix, body) = smuggling_script(sequence);
        let bare_at = first_bare_line_ending(&body);
        let script: &[(Dir, &[u8])] = &[
            (C, &prefix),
            (B, b"250 ok\r\n250 ok\r\n354 go\r\n"),
            (C, &body),
            (B, b"250 late\r\n"),
        ];
        let mut allowed = prefix.clone();
        allowed.extend_from_slice(&body[..bare_at]);
        every_split(&strict, NO_LOOKUP, script, |run, label| {
            let what = format!("{:?} {label}", String::from_utf8_lossy(sequence));
            assert!(run.backend_closed, "{what}");
            assert!(run.closed, "{what}");
            // Never the bare line ending, let alone a dot or the smuggled message.
            assert!(
                allowed.starts_with(&run.to_backend),
                "{what}: {:?}",
                String::from_utf8_lossy(&run.to_backend)
            );
            assert!(run.to_backend.len() >= prefix.len(), "{what}");
            assert_eq!(
                run.client_text(),
                "250 ok\r\n250 ok\r\n354 go\r\n550 5.6.0 Bare CR or LF in message, closing connection\r\n",
                "{what}"
            );
            assert_eq!(
                run.events,
                [
                    Event::RecipientAccepted,
                    Event::BodyRefused { strict: true }
                ],
                "{what}"
            );
        });
    }
}

#[test]
fn by_default_a_body_with_an_end_of_data_lookalike_never_completes() {
    // Postfix 3.7 ends DATA at <LF>.<LF>, OpenSMTPD at <LF>.<CRLF> and <CRLF>.<LF>:
    // relayed, each of these would give the backend a second, unchecked message.
    for sequence in SMUGGLING {
        let (prefix, body) = smuggling_script(sequence);
        let script: &[(Dir, &[u8])] = &[
            (C, &prefix),
            (B, b"250 ok\r\n250 ok\r\n354 go\r\n"),
            (C, &body),
            (B, b"250 late\r\n"),
        ];
        let dot = body
            .windows(2)
            .position(|w| (w[0] == b'\r' || w[0] == b'\n') && w[1] == b'.')
            .unwrap();
        let mut allowed = prefix.clone();
        allowed.extend_from_slice(&body[..dot]);
        every_split(&settings(), NO_LOOKUP, script, |run, label| {
            let what = format!("{:?} {label}", String::from_utf8_lossy(sequence));
            assert!(run.backend_closed, "{what}");
            assert!(run.closed, "{what}");
            assert!(
                allowed.starts_with(&run.to_backend),
                "{what}: {:?}",
                String::from_utf8_lossy(&run.to_backend)
            );
            assert_eq!(
                run.client_text(),
                "250 ok\r\n250 ok\r\n354 go\r\n550 5.6.0 Message contains a bare CR or LF \
                 around a dot line, closing connection\r\n",
                "{what}"
            );
            assert_eq!(
                run.events,
                [
                    Event::RecipientAccepted,
                    Event::BodyRefused { strict: false }
                ],
                "{what}"
            );
        });
    }
    // A NUL, which a backend may drop (making <CRLF>NUL.<CRLF> an end), is refused too.
    let script: &[(Dir, &[u8])] = &[
        (C, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n"),
        (B, b"250 ok\r\n250 ok\r\n354 go\r\n"),
        (C, b"hello\r\n\x00.\r\nMAIL FROM:<e>\r\n\r\n.\r\n"),
    ];
    every_split(&settings(), NO_LOOKUP, script, |run, label| {
        assert!(run.backend_closed && run.closed, "{label}");
        assert!(!run.to_backend.contains(&0), "{label}");
    });
    // Bare LFs elsewhere pass unchanged.
    for body in [
        &b"Subject: old device\nline\n..stuffed\n\r\n.\r\n"[..],
        b"bare\nlines\n\nand a bare\rCR\r\n..\r\n.\r\n",
    ] {
        let script: &[(Dir, &[u8])] = &[
            (C, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n"),
            (B, b"250 ok\r\n250 ok\r\n354 go\r\n"),
            (C, body),
            (B, b"250 queued\r\n"),
        ];
        let run = split_invariant(&settings(), NO_LOOKUP, script);
        assert_eq!(run.to_backend, all(C, script));
        assert_eq!(run.to_client, all(B, script));
    }
}

#[test]
fn a_refused_body_is_answered_at_the_clients_own_end() {
    // A bare-LF client ends with <LF>.<LF> and waits: the 550 comes at once.
    let strict = Settings {
        strict_data: true,
        ..settings()
    };
    for settings in [settings(), strict.clone()] {
        let script: &[(Dir, &[u8])] = &[
            (C, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n"),
            (B, b"250 ok\r\n250 ok\r\n354 go\r\n"),
            (C, b"Subject: x\n\nbody\n.\n"),
        ];
        let run = every_split(&settings, NO_LOOKUP, script, |run, label| {
            assert!(run.closed && run.backend_closed, "{label}");
        });
        assert!(run.client_text().ends_with("closing connection\r\n"));
        assert!(run.client_text().contains("550 5.6.0"));
    }
    // The same when the refusal comes inside that last line: at a dot that starts the
    // body, or under --strict-data at the bare LF after a line's only dot.
    for (settings, body) in [(settings(), &b".\n"[..]), (strict, b"a\r\n.\n")] {
        let script: &[(Dir, &[u8])] = &[
            (C, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n"),
            (B, b"250 ok\r\n250 ok\r\n354 go\r\n"),
            (C, body),
        ];
        let run = every_split(&settings, NO_LOOKUP, script, |run, label| {
            assert!(run.closed && run.backend_closed, "{body:?} {label}");
        });
        assert!(run.client_text().contains("550 5.6.0"), "{body:?}");
    }
    // With more behind the lookalike, the 550 waits for the real end.
    let mut sim = Sim::new(settings(), NO_LOOKUP);
    sim.feed(C, b"DATA\r\n");
    sim.feed(B, b"354 go\r\n");
    sim.feed(C, b"x\n.\nMAIL FROM:<e>\r\n");
    assert!(sim.run.backend_closed);
    assert!(!sim.run.closed);
    sim.feed(C, b"RCPT TO:<v>\r\nDATA\r\n.\r\n");
    assert!(sim.run.closed);
    assert!(b"DATA\r\nx".starts_with(&sim.run.to_backend));
}

#[test]
fn strict_data_accepts_clean_bodies_and_still_finds_the_end() {
    let strict = Settings {
        strict_data: true,
        ..settings()
    };
    let script: &[(Dir, &[u8])] = &[
        (C, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n"),
        (B, b"250 ok\r\n250 ok\r\n354 go\r\n"),
        (C, b".\r\n"),
        (B, b"250 empty ok\r\n"),
        (C, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n"),
        (B, b"250 ok\r\n250 ok\r\n354 go\r\n"),
        (C, b"a\r\n..\r\n.b\r\n\r\n\r\n.\r\nNOOP\r\n"),
        (B, b"250 second ok\r\n250 noop\r\n"),
    ];
    let run = split_invariant(&strict, NO_LOOKUP, script);
    assert_eq!(run.to_backend, all(C, script));
    assert_eq!(run.to_client, all(B, script));
    assert_eq!(run.events.len(), 4);
}

#[test]
fn a_user_over_the_message_limit_gets_451_at_mail() {
    let limited = Settings {
        limits: Limits {
            messages_per_user: Some(3),
            ..Limits::default()
        },
        ..settings()
    };
    let over = Lookup::Usage(Usage {
        messages: 3,
        recipients: 0,
    });
    let script: &[(Dir, &[u8])] = &[
        (C, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n"),
        (B, b"503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n"),
    ];
    let run = split_invariant(&limited, over, script);
    assert_eq!(run.to_backend, b"RCPT TO:<b>\r\nDATA\r\n");
    assert_eq!(
        run.client_text(),
        "451 4.7.1 Message limit for this user reached, try again later\r\n\
         503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n"
    );
    assert_eq!(run.events, [Event::LimitReached(Limit::MessagesPerUser)]);
    assert_eq!(run.lookups, 1);

    let under = Lookup::Usage(Usage {
        messages: 2,
        recipients: 0,
    });
    let run = split_invariant(&limited, under, &[(C, b"MAIL FROM:<a>\r\n")]);
    assert_eq!(run.to_backend, b"MAIL FROM:<a>\r\n");

    let anonymous = Settings {
        authenticated: false,
        ..limited.clone()
    };
    let run = split_invariant(&anonymous, over, &[(C, b"MAIL FROM:<a>\r\n")]);
    assert_eq!(run.to_backend, b"MAIL FROM:<a>\r\n");
    assert_eq!(run.lookups, 0);
}

#[test]
fn a_store_that_cannot_answer_fails_closed_when_asked_to() {
    let limited = Settings {
        limits: Limits {
            recipients_per_user: Some(10),
            ..Limits::default()
        },
        ..settings()
    };
    let script: &[(Dir, &[u8])] = &[(C, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\n"), (B, b"250 ok\r\n")];
    let run = split_invariant(&limited, Lookup::Unavailable, script);
    assert_eq!(run.to_backend, b"MAIL FROM:<a>\r\n");
    assert_eq!(
        run.client_text(),
        "250 ok\r\n451 4.3.0 Sending limits cannot be checked, try again later\r\n"
    );
    assert_eq!(run.events, [Event::LimitReached(Limit::StoreUnavailable)]);
}

#[test]
fn recipient_limits_count_pipelined_and_accepted_recipients() {
    let limited = Settings {
        limits: Limits {
            recipients_per_message: Some(2),
            recipients_per_user: Some(5),
            ..Limits::default()
        },
        ..settings()
    };
    let usage = Lookup::Usage(Usage {
        messages: 0,
        recipients: 2,
    });
    let script: &[(Dir, &[u8])] = &[
        (
            C,
            b"MAIL FROM:<a>\r\nRCPT TO:<1>\r\nRCPT TO:<2>\r\nRCPT TO:<3>\r\n",
        ),
        (B, b"250 m\r\n250 r1\r\n550 r2 unknown\r\n"),
        (C, b"RCPT TO:<4>\r\nRCPT TO:<5>\r\nRSET\r\n"),
        (B, b"250 r4\r\n250 rset\r\n"),
        // A new message: the per-message count starts again, and the RSET gave back
        // the two recipients of the abandoned one.
        (
            C,
            b"MAIL FROM:<a>\r\nRCPT TO:<6>\r\nRCPT TO:<7>\r\nRCPT TO:<8>\r\n",
        ),
        (B, b"250 m\r\n250 r6\r\n250 r7\r\n"),
        (C, b"DATA\r\n"),
        (B, b"354 go\r\n"),
        (C, b"hi\r\n.\r\n"),
        (B, b"250 queued\r\n"),
        (C, b"MAIL FROM:<a>\r\nRCPT TO:<9>\r\n"),
        (B, b"250 m\r\n"),
    ];
    let run = split_invariant(&limited, usage, script);
    assert_eq!(
        run.to_backend,
        b"MAIL FROM:<a>\r\nRCPT TO:<1>\r\nRCPT TO:<2>\r\nRCPT TO:<4>\r\nRSET\r\n\
          MAIL FROM:<a>\r\nRCPT TO:<6>\r\nRCPT TO:<7>\r\nDATA\r\nhi\r\n.\r\n\
          MAIL FROM:<a>\r\nRCPT TO:<9>\r\n"
    );
    assert_eq!(
        run.client_text(),
        "250 m\r\n250 r1\r\n550 r2 unknown\r\n\
         451 4.7.1 Too many recipients for one message\r\n\
         250 r4\r\n451 4.7.1 Too many recipients for one message\r\n250 rset\r\n\
         250 m\r\n250 r6\r\n250 r7\r\n\
         451 4.7.1 Too many recipients for one message\r\n354 go\r\n250 queued\r\n\
         250 m\r\n"
    );
    // The store keeps the delivered message's two recipients; RCPT 9, unanswered at
    // the end, and the abandoned ones came back.
    assert_eq!(run.usage.map(|u| u.recipients), Some(4));
}

#[test]
fn refused_resets_keep_the_transaction_and_its_recipient_count() {
    // Postfix refuses a nested MAIL (503), `RSET x` (501) and a bare EHLO (501) and
    // keeps the open transaction: none of them may make room for more recipients.
    let limited = Settings {
        limits: Limits {
            recipients_per_message: Some(2),
            ..Limits::default()
        },
        ..settings()
    };
    for (reset, refusal) in [
        (
            &b"MAIL FROM:<b>\r\n"[..],
            &b"503 5.5.1 Error: nested MAIL command\r\n"[..],
        ),
        (b"RSET x\r\n", b"501 5.5.4 Syntax: RSET\r\n"),
        (b"EHLO\r\n", b"501 Syntax: EHLO hostname\r\n"),
        (b"HELO\r\n", b"501 Syntax: HELO hostname\r\n"),
    ] {
        let script: &[(Dir, &[u8])] = &[
            (C, b"MAIL FROM:<a>\r\nRCPT TO:<1>\r\nRCPT TO:<2>\r\n"),
            (C, reset),
            (C, b"RCPT TO:<3>\r\nRCPT TO:<4>\r\n"),
            (B, b"250 m\r\n250 r1\r\n250 r2\r\n"),
            (B, refusal),
        ];
        let run = split_invariant(&limited, NO_LOOKUP, script);
        let sent = String::from_utf8_lossy(&run.to_backend).into_owned();
        assert!(!sent.contains("<3>") && !sent.contains("<4>"), "{sent}");
        assert_eq!(
            run.client_text()
                .matches("451 4.7.1 Too many recipients for one message")
                .count(),
            2
        );
    }
    // An accepted RSET does make room, even pipelined ahead of its answer.
    let script: &[(Dir, &[u8])] = &[
        (C, b"MAIL FROM:<a>\r\nRCPT TO:<1>\r\nRCPT TO:<2>\r\n"),
        (
            C,
            b"RSET\r\nMAIL FROM:<a>\r\nRCPT TO:<3>\r\nRCPT TO:<4>\r\nRCPT TO:<5>\r\n",
        ),
        (B, b"250 m\r\n250 r1\r\n250 r2\r\n250 rset\r\n250 m\r\n"),
        (B, b"250 r3\r\n250 r4\r\n"),
    ];
    let run = split_invariant(&limited, NO_LOOKUP, script);
    let sent = String::from_utf8_lossy(&run.to_backend).into_owned();
    assert!(sent.contains("<3>") && sent.contains("<4>") && !sent.contains("<5>"));
}

#[test]
fn message_slots_are_given_back_when_the_message_is_not_sent() {
    let limited = Settings {
        limits: Limits {
            messages_per_user: Some(1),
            recipients_per_user: Some(10),
            ..Limits::default()
        },
        ..settings()
    };
    // A refused MAIL, a rejected message, RSET and the session's end all give back.
    let script: &[(Dir, &[u8])] = &[
        (C, b"MAIL FROM:<a>\r\n"),
        (B, b"550 no\r\n"),
        (C, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n"),
        (B, b"250 m\r\n250 r\r\n354 go\r\n"),
        (C, b"x\r\n.\r\n"),
        (B, b"554 rejected\r\n"),
        (C, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nRSET\r\n"),
        (B, b"250 m\r\n250 r\r\n250 rset\r\n"),
        (C, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\n"),
        (B, b"250 m\r\n250 r\r\n"),
    ];
    let run = split_invariant(&limited, NO_LOOKUP, script);
    assert!(!run.client_text().contains("451"), "{}", run.client_text());
    assert_eq!(run.usage, Some(Usage::default()));
    // A second message while the first holds the only slot is refused.
    let script: &[(Dir, &[u8])] = &[
        (C, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n"),
        (B, b"250 m\r\n250 r\r\n354 go\r\n"),
        (C, b"x\r\n.\r\nMAIL FROM:<a>\r\n"),
        (B, b"250 queued\r\n"),
    ];
    let run = split_invariant(&limited, NO_LOOKUP, script);
    assert!(
        run.client_text()
            .ends_with("451 4.7.1 Message limit for this user reached, try again later\r\n")
    );
    assert_eq!(
        run.usage,
        Some(Usage {
            messages: 1,
            recipients: 1
        })
    );
}

/// A client that resets right after a message's end, before the backend answers it:
/// Postfix and OpenSMTPD deliver the message anyway, so its slots stay taken. What was
/// pipelined after the end, with no end of its own, is given back.
#[test]
fn a_message_whose_end_is_unanswered_keeps_its_slots() {
    let limited = Settings {
        limits: Limits {
            messages_per_user: Some(5),
            recipients_per_user: Some(10),
            ..Limits::default()
        },
        ..settings()
    };
    let script: &[(Dir, &[u8])] = &[
        (
            C,
            b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<c>\r\nDATA\r\n",
        ),
        (B, b"250 m\r\n250 r\r\n250 r\r\n354 go\r\n"),
        (C, b"x\r\n.\r\nMAIL FROM:<a>\r\nRCPT TO:<d>\r\n"),
    ];
    let run = split_invariant(&limited, NO_LOOKUP, script);
    assert_eq!(
        run.events.last(),
        Some(&Event::MessageUnanswered { recipients: 2 })
    );
    assert_eq!(
        run.usage,
        Some(Usage {
            messages: 1,
            recipients: 2
        })
    );
    // BDAT LAST pipelined behind its MAIL and RCPTs: none of them answered.
    let script: &[(Dir, &[u8])] = &[
        (C, b"EHLO c\r\n"),
        (B, b"250-legacy\r\n250 CHUNKING\r\n"),
        (
            C,
            b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nBDAT 3 LAST\r\nabcRSET\r\n",
        ),
    ];
    let run = split_invariant(&limited, NO_LOOKUP, script);
    assert_eq!(
        run.events.last(),
        Some(&Event::MessageUnanswered { recipients: 1 })
    );
    assert_eq!(
        run.usage,
        Some(Usage {
            messages: 1,
            recipients: 1
        })
    );
    // Answered, the same messages count as before.
    let script: &[(Dir, &[u8])] = &[
        (C, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n"),
        (B, b"250 m\r\n250 r\r\n354 go\r\n"),
        (C, b"x\r\n.\r\n"),
        (B, b"554 no\r\n"),
    ];
    let run = split_invariant(&limited, NO_LOOKUP, script);
    assert_eq!(run.events.last(), Some(&Event::MessageRejected));
    assert_eq!(run.usage, Some(Usage::default()));
}

#[test]
fn control_octets_in_command_lines_are_refused_not_forwarded() {
    for line in [
        &b"MAIL\x0bFROM:<a>\r\n"[..],
        b"RCPT\x0cTO:<b>\r\n",
        b"XCLIENT\x0bLOGIN=root\r\n",
        b"\x0bXCLIENT ADDR=1.2.3.4\r\n",
        b"AUTH\x0bPLAIN AHRpbQBzZWNyZXQ=\r\n",
        b"STARTTLS\x0c\r\n",
        b"MAIL\x00FROM:<a>\r\n",
        b"NOOP\x7f\r\n",
        b"D\xc1TA\r\n",
    ] {
        let run = split_invariant(&settings(), NO_LOOKUP, &[(C, line), (C, b"NOOP\r\n")]);
        assert_eq!(run.to_backend, b"NOOP\r\n", "{line:?}");
        assert!(run.client_text().starts_with("500 5.5.2"), "{line:?}");
    }
}

#[test]
fn bdat_sizes_a_backend_could_read_differently_close_the_session() {
    let sized = Settings {
        max_chunk: 1000,
        ..settings()
    };
    for (settings, line, reply) in [
        (
            settings(),
            &b"BDAT 4294967306 LAST\r\n0123456789"[..],
            "552 5.3.4",
        ),
        (settings(), b"BDAT 2147483648\r\n", "552 5.3.4"),
        (sized.clone(), b"BDAT 1001 LAST\r\n", "552 5.3.4"),
        (settings(), b"BDAT 0\r\nMAIL FROM:<e>\r\n", "501 5.5.4"),
        (settings(), b"BDAT -1\r\n", "501 5.5.4"),
        (settings(), b"BDAT +10\r\n", "501 5.5.4"),
    ] {
        let run = split_invariant(&settings, NO_LOOKUP, &[(C, line)]);
        assert!(run.to_backend.is_empty(), "{line:?}");
        assert!(run.closed, "{line:?}");
        assert!(run.client_text().starts_with(reply), "{line:?}");
    }
    let run = split_invariant(&sized, NO_LOOKUP, &[(C, b"BDAT 1000 LAST\r\n")]);
    assert_eq!(run.to_backend, b"BDAT 1000 LAST\r\n");
}

#[test]
fn the_chunk_limit_comes_from_the_backends_size() {
    use crate::smtp::Capabilities;
    let caps = |size: &str| Capabilities::from_ehlo_reply(&["x".into(), size.into()]);
    assert_eq!(chunk_limit(&caps("SIZE 10240000")), 10_240_000);
    assert_eq!(chunk_limit(&caps("SIZE 0")), MAX_CHUNK);
    assert_eq!(chunk_limit(&caps("SIZE")), MAX_CHUNK);
    assert_eq!(chunk_limit(&caps("SIZE 99999999999")), MAX_CHUNK);
    assert_eq!(chunk_limit(&caps("8BITMIME")), MAX_CHUNK);
}

#[test]
fn a_backend_that_hangs_up_still_has_its_last_reply_relayed() {
    let mut sim = Sim::new(settings(), NO_LOOKUP);
    sim.feed(C, b"DATA\r\n");
    sim.feed(B, b"354 go\r\n");
    // The backend refuses the oversized message and hangs up; the write fails.
    sim.tracker.backend_write_failed();
    sim.feed(B, b"552 5.3.4 Message too big\r\n");
    sim.tracker.backend_read(0);
    sim.drain();
    assert!(
        sim.run
            .client_text()
            .ends_with("552 5.3.4 Message too big\r\n")
    );
    assert!(sim.tracker.is_done());
}

#[test]
fn a_quit_the_backend_accepts_ends_the_session_there() {
    // What is pipelined behind QUIT waits for its answer (RFC 2920 lets QUIT only end a
    // group) and, once the backend said 221, is never forwarded.
    let script: &[(Dir, &[u8])] = &[
        (C, b"NOOP\r\nQUIT\r\nMAIL FROM:<late@example.test>\r\n"),
        (B, b"250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"),
    ];
    let run = split_invariant(&settings(), NO_LOOKUP, script);
    assert_eq!(run.to_backend, b"NOOP\r\nQUIT\r\n");
    assert_eq!(run.client_text(), "250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n");

    let mut sim = Sim::new(settings(), NO_LOOKUP);
    sim.feed(C, b"QUIT\r\n");
    sim.feed(B, b"221 2.0.0 Bye\r\n");
    assert!(sim.tracker.is_done());
    // The backend's end of stream is not waited for, the client may still send (so the
    // close lingers), and the 221 is left for the close to send with TLS's
    // close_notify.
    assert!(sim.tracker.backend_space().is_none());
    assert!(sim.tracker.ends_with_client_sending());
    assert_eq!(sim.writes.client_flushes, 0);
    assert_eq!(sim.run.client_text(), "221 2.0.0 Bye\r\n");
}

#[test]
fn a_quit_the_backend_refuses_leaves_the_session_going() {
    let script: &[(Dir, &[u8])] = &[
        (C, b"QUIT now\r\nNOOP\r\n"),
        (B, b"501 5.5.4 Syntax: QUIT\r\n250 2.0.0 Ok\r\n"),
    ];
    let run = split_invariant(&settings(), NO_LOOKUP, script);
    assert_eq!(run.to_backend, b"QUIT now\r\nNOOP\r\n");
    assert_eq!(
        run.client_text(),
        "501 5.5.4 Syntax: QUIT\r\n250 2.0.0 Ok\r\n"
    );

    let mut sim = Sim::new(settings(), NO_LOOKUP);
    sim.feed(C, b"QUIT now\r\n");
    sim.feed(B, b"501 5.5.4 Syntax: QUIT\r\n");
    assert!(!sim.tracker.is_done());
    assert!(sim.tracker.backend_space().is_some());
    assert!(sim.writes.client_flushes > 0);
}

#[test]
fn a_client_that_stops_reading_does_not_stop_its_own_upload() {
    // Replies pile up for a client that does not read them; its bytes still flow.
    let mut tracker = Tracker::new(settings(), b"", b"");
    let noops = b"NOOP\r\n".repeat(50);
    let space = tracker.client_space().unwrap();
    let n = space.len().min(noops.len());
    space[..n].copy_from_slice(&noops[..n]);
    tracker.client_read(n);
    let sent = tracker.to_backend().len();
    assert!(sent > 0);
    tracker.backend_written(sent);
    let replies = b"250 ok\r\n".repeat(50);
    let space = tracker.backend_space().unwrap();
    let m = space.len().min(replies.len());
    space[..m].copy_from_slice(&replies[..m]);
    tracker.backend_read(m);
    assert!(!tracker.to_client().is_empty());
    assert!(tracker.client_space().is_some());
}

#[test]
fn unsolicited_replies_and_odd_lines_are_relayed() {
    let script: &[(Dir, &[u8])] = &[
        (B, b"421 4.4.2 idle\r\n"),
        (C, b"NOOP\r\n"),
        (B, b"xx\r\n25\n250-a\n250 b\n"),
    ];
    let run = split_invariant(&settings(), NO_LOOKUP, script);
    assert_eq!(run.to_client, all(B, script));
}

#[test]
fn a_deep_pipeline_waits_for_replies() {
    let commands = b"NOOP\r\n".repeat(MAX_PENDING + 20);
    let mut sim = Sim::new(settings(), NO_LOOKUP);
    sim.feed(C, &commands);
    assert_eq!(sim.run.to_backend.len(), MAX_PENDING * 6);
    assert_eq!(sim.tracker.rules.wants(), Wants::Backend);
    sim.feed(B, &b"250 ok\r\n".repeat(10));
    assert_eq!(sim.run.to_backend.len(), (MAX_PENDING + 10) * 6);
    sim.feed(B, &b"250 ok\r\n".repeat(MAX_PENDING + 10));
    assert_eq!(sim.run.to_backend, commands);
    assert_eq!(sim.tracker.rules.wants(), Wants::Input);
}

#[test]
fn a_354_to_anything_but_data_closes_both_sides() {
    // The backend took NOOP as DATA (a broken or hostile backend): from here on the
    // backend and the tracker disagree on what is a command, so postern stops.
    let script: &[(Dir, &[u8])] = &[
        (C, b"MAIL FROM:<a>\r\nNOOP\r\nRCPT TO:<b>\r\n"),
        (B, b"250 ok\r\n354 go ahead\r\n"),
        (C, b"AUTH PLAIN x\r\n"),
    ];
    let run = split_invariant(&settings(), NO_LOOKUP, script);
    assert!(run.closed, "{run:?}");
    assert!(
        run.client_text().ends_with(
            "421 4.3.0 Backend out of step with the command stream, closing connection\r\n"
        ),
        "{}",
        run.client_text()
    );
    assert!(!String::from_utf8_lossy(&run.to_backend).contains("AUTH"));
}

#[test]
fn hide_chunking_keeps_chunking_out_of_ehlo_and_bdat_out_of_the_backend() {
    let hidden = Settings {
        hide_chunking: true,
        ..settings()
    };
    let script: &[(Dir, &[u8])] = &[
        (C, b"EHLO c\r\n"),
        (B, b"250-legacy\r\n250-CHUNKING\r\n250 SIZE 100\r\n"),
        (C, b"BDAT 3 LAST\r\nabc"),
    ];
    let run = split_invariant(&hidden, NO_LOOKUP, script);
    assert_eq!(run.to_backend, b"EHLO c\r\n");
    assert_eq!(
        run.client_text(),
        "250-postern.test\r\n250-SIZE 100\r\n250 AUTH PLAIN LOGIN CRAM-MD5\r\n\
         502 5.5.1 BDAT not offered, closing connection\r\n"
    );
}

#[test]
fn a_slot_granted_after_the_session_closed_is_given_back() {
    let limited = Settings {
        limits: Limits {
            recipients_per_user: Some(10),
            ..Limits::default()
        },
        ..settings()
    };
    let mut tracker = Tracker::new(limited, b"RCPT TO:<a>\r\nXYZ", b"");
    assert_eq!(tracker.wants_reservation(), Some(Claim::Recipient));
    // The client is gone before the store answers; the answer still comes.
    tracker.client_read(0);
    assert!(tracker.wants_reservation_answer());
    tracker.on_reservation(Reservation::Granted { held: true });
    tracker.finish();
    let mut released = (0, 0);
    while let Some(notice) = tracker.next_notice() {
        if let Notice::Release {
            messages,
            recipients,
        } = notice
        {
            released = (released.0 + messages, released.1 + recipients);
        }
    }
    assert_eq!(released, (0, 1));
}

/// A client that pipelines a whole chunked message and resets before any of it is
/// written to the backend: the backend never got the message, so its slots go back.
/// Once the bytes are written, the unanswered end keeps them.
#[test]
fn a_message_end_never_written_to_the_backend_gives_its_slots_back() {
    let limited = Settings {
        limits: Limits {
            messages_per_user: Some(5),
            recipients_per_user: Some(10),
            ..Limits::default()
        },
        ..settings()
    };
    let message = b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nBDAT 3 LAST\r\nabc";
    for written in [false, true] {
        let mut tracker = Tracker::new(limited.clone(), message, b"");
        while tracker.wants_reservation().is_some() {
            tracker.on_reservation(Reservation::Granted { held: true });
        }
        assert_eq!(tracker.to_backend(), message);
        if written {
            tracker.backend_written(message.len() - 1);
            // One octet short of the chunk's end is not the end.
            let mut short = Tracker::new(limited.clone(), message, b"");
            while short.wants_reservation().is_some() {
                short.on_reservation(Reservation::Granted { held: true });
            }
            short.backend_written(message.len() - 1);
            short.client_read(0);
            short.finish();
            assert_eq!(released(&mut short), ((1, 1), false));
            tracker.backend_written(1);
        }
        tracker.client_read(0);
        tracker.finish();
        let expected = if written {
            ((0, 0), true)
        } else {
            ((1, 1), false)
        };
        assert_eq!(released(&mut tracker), expected, "written: {written}");
    }
}

/// The slots a finished tracker gave back, and whether it reported an unanswered end.
fn released(tracker: &mut Tracker) -> ((u32, u32), bool) {
    let (mut released, mut unanswered) = ((0, 0), false);
    while let Some(notice) = tracker.next_notice() {
        match notice {
            Notice::Release {
                messages,
                recipients,
            } => released = (released.0 + messages, released.1 + recipients),
            Notice::Event(Event::MessageUnanswered { .. }) => unanswered = true,
            Notice::Event(_) => {}
        }
    }
    (released, unanswered)
}

#[test]
fn nothing_queued_reaches_a_backend_that_answered_354_to_a_non_data_command() {
    // Found by the relay fuzz harness: the BDAT chunk queued behind NOOP would be body
    // to a backend that took NOOP as DATA, and its XCLIENT line a command.
    let mut tracker = Tracker::new(settings(), b"", b"");
    let client = b"NOOP\r\nBDAT 25\r\n\r\n.\r\nXCLIENT LOGIN=root\r\n";
    let space = tracker.client_space().unwrap();
    space[..client.len()].copy_from_slice(client);
    tracker.client_read(client.len());
    tracker.backend_written(6);
    let reply = b"354 go ahead\r\n";
    let space = tracker.backend_space().unwrap();
    space[..reply.len()].copy_from_slice(reply);
    tracker.backend_read(reply.len());
    assert!(tracker.closed_by_postern());
    assert!(tracker.backend_abandoned());
    assert!(tracker.to_backend().is_empty());
}

#[test]
fn command_lines_after_login_stop_at_postfixs_line_limit() {
    let mut longest = b"MAIL FROM:<a@x> ".to_vec();
    longest.resize(MAX_RELAYED_LINE, b'x');
    longest.extend_from_slice(b"\r\n");
    let run = split_invariant(&settings(), NO_LOOKUP, &[(C, &longest)]);
    assert_eq!(run.to_backend, longest);
    let mut over = longest[..MAX_RELAYED_LINE].to_vec();
    over.extend_from_slice(b"y\r\n");
    let run = split_invariant(&settings(), NO_LOOKUP, &[(C, &over)]);
    assert!(run.to_backend.is_empty() && run.closed);
    assert_eq!(run.client_text(), "500 5.5.2 Line too long\r\n");
}

#[test]
fn a_queue_gives_back_its_burst_room_after_the_first_small_batch() {
    let mut queue = OutQueue::default();
    let burst = vec![b'x'; MAX_BUFFER];
    queue.push(&burst);
    queue.written(MAX_BUFFER);
    // Heavy traffic: the room stays for the next batch.
    assert!(queue.bytes.capacity() >= MAX_BUFFER);
    queue.push(b"250 2.0.0 Ok\r\n");
    assert!(
        queue.bytes.capacity() >= MAX_BUFFER,
        "kept while it is used"
    );
    queue.written(14);
    assert_eq!(queue.bytes.capacity(), 0, "an idle session holds no burst");
    // Small batches keep a small queue.
    queue.push(b"250 2.0.0 Ok\r\n");
    queue.written(14);
    assert!(queue.bytes.capacity() <= MIN_BUFFER);
}

#[test]
fn a_handed_over_read_buffer_is_allocated_within_max_buffer() {
    let mut queue = OutQueue::default();
    queue.push(&vec![b'x'; 20_000]);
    // Not a small batch: the queue keeps its room.
    queue.written(20_000);
    let mut buffer = InBuffer::new(b"");
    while buffer.bytes.len() < MAX_BUFFER {
        let n = buffer.space().map_or(0, |s| s.len());
        buffer.filled(n);
        buffer.consume(n);
    }
    let n = buffer.space().map_or(0, |s| s.len());
    buffer.filled(n);
    buffer.hand_over(0..n, n, &mut queue);
    assert!(
        buffer.bytes.capacity() <= MAX_BUFFER,
        "a read buffer of {} octets",
        buffer.bytes.capacity()
    );
}

#[test]
fn a_queue_handed_an_oversized_buffer_gives_it_back_when_written() {
    let mut queue = OutQueue::default();
    let mut big = Vec::with_capacity(60_000);
    big.resize(MAX_BUFFER, b'x');
    drop(queue.exchange(big, 0..MAX_BUFFER));
    queue.written(MAX_BUFFER);
    assert!(
        queue.bytes.capacity() <= MAX_BUFFER,
        "a queue of {} octets",
        queue.bytes.capacity()
    );
}

#[test]
fn a_read_buffer_keeps_its_size_through_short_bulk_reads_and_shrinks_after_a_small_one() {
    let mut buffer = InBuffer::new(b"");
    // Reads that fill it: it grows to the largest size.
    while buffer.bytes.len() < MAX_BUFFER {
        let space = buffer.space().map_or(0, |s| s.len());
        buffer.filled(space);
        buffer.consume(space);
    }
    // A bulk read short of the space (a TLS stream hands over what it has).
    buffer.space();
    buffer.filled(16 * 1024);
    buffer.consume(16 * 1024);
    assert_eq!(buffer.bytes.len(), MAX_BUFFER);
    // A command after the burst: back to the smallest size.
    buffer.space();
    buffer.filled(6);
    buffer.consume(6);
    assert_eq!(buffer.bytes.len(), MIN_BUFFER);
}

/// A message body of at least `size` octets, ended by the end-of-data line.
fn body_of(size: usize) -> Vec<u8> {
    let mut body = b"Subject: one write\r\n\r\n".to_vec();
    while body.len() < size {
        body.extend_from_slice(b"a line of the message, long enough to count\r\n");
    }
    body.extend_from_slice(b".\r\n");
    body
}

#[test]
fn what_arrived_at_once_leaves_in_one_write_whatever_the_read_buffer_size() {
    // The read buffers start at MIN_BUFFER: a body or a reply larger than that, there in
    // full, must not reach the other side in as many writes as the buffer has sizes.
    let mut sim = Sim::new(settings(), NO_LOOKUP);
    sim.feed(C, b"DATA\r\n");
    sim.feed(B, b"354 go\r\n");
    let before = (sim.run.to_backend.len(), sim.run.to_client.len());
    let body = body_of(9 * MIN_BUFFER);
    sim.writes = Writes::default();
    sim.feed(C, &body);
    assert_eq!(sim.writes.to_backend, 1);
    assert_eq!(sim.run.to_backend[before.0..], body[..]);

    let reply = format!("250-{}\r\n250 2.0.0 Ok\r\n", "x".repeat(3 * MIN_BUFFER));
    sim.feed(B, reply.as_bytes());
    assert_eq!(sim.writes.to_client, 1);
    assert_eq!(sim.run.to_client[before.1..], *reply.as_bytes());
}

#[test]
fn a_bulk_read_becomes_the_backends_queue_without_a_copy() {
    let mut sim = Sim::new(settings(), NO_LOOKUP);
    sim.feed(C, b"DATA\r\n");
    sim.feed(B, b"354 go\r\n");
    let before = sim.run.to_backend.len();
    sim.backend_takes = 0;
    let body = body_of(3 * MAX_BUFFER);
    let first = &body[..4 * MIN_BUFFER];
    // A buffer at its largest, which a read does not grow (and move).
    sim.tracker.from_client.bytes.resize(MAX_BUFFER, 0);
    let read_into = sim.tracker.from_client.bytes.as_ptr();
    sim.feed(C, first);
    // Taken by the rules save what could begin the end of the data, and queued in
    // the very buffer it was read into.
    assert_eq!(sim.tracker.to_backend.bytes.as_ptr(), read_into);
    let queued = sim.tracker.to_backend().len();
    assert!(queued + 5 >= first.len(), "{queued} of {}", first.len());
    assert_eq!(sim.tracker.to_backend(), &first[..queued]);
    // Behind a blocked backend the next reads are copied after it, in order.
    sim.feed(C, &body[first.len()..]);
    sim.feed(C, b"RSET\r\n");
    sim.backend_takes = usize::MAX;
    sim.drain();
    sim.feed(B, b"250 ok\r\n");
    let mut sent = body.clone();
    sent.extend_from_slice(b"RSET\r\n");
    assert_eq!(sim.run.to_backend[before..], sent[..]);
}

#[test]
fn bodies_reach_the_backend_exactly_whatever_arrives_and_it_takes() {
    let mut stream = body_of(3 * MAX_BUFFER + 77);
    // A command pipelined behind the end of the data, often split across reads: its
    // start waits in the read buffer for the rest, whatever buffer that is then.
    stream.extend_from_slice(b"MAIL FROM:<b@example.org>\r\n");
    for takes in [1, 100, MIN_BUFFER - 1, MIN_BUFFER, 4096, 65_483, usize::MAX] {
        for arrives in [1, MIN_BUFFER - 1, MIN_BUFFER, 1000, 16 * 1024 + 5, 40_000] {
            let mut sim = Sim::new(settings(), NO_LOOKUP);
            sim.feed(C, b"DATA\r\n");
            sim.feed(B, b"354 go\r\n");
            let before = sim.run.to_backend.len();
            for (i, chunk) in stream.chunks(arrives).enumerate() {
                // Now and then the backend stops taking for a while.
                sim.backend_takes = if i % 3 == 2 { 0 } else { takes };
                sim.feed(C, chunk);
            }
            sim.backend_takes = takes;
            sim.drain();
            let sent = &sim.run.to_backend[before..];
            assert!(
                sent == stream,
                "takes {takes}, arrives {arrives}: {} octets of {}, first difference at {:?}",
                sent.len(),
                stream.len(),
                sent.iter().zip(&stream).position(|(a, b)| a != b)
            );
        }
    }
}

#[test]
fn no_write_crosses_the_loopback_mss() {
    // Beyond the loopback MSS (65,483 octets) a write leaves a tail that travels as a
    // segment of its own.
    let mut sim = Sim::new(settings(), NO_LOOKUP);
    sim.feed(C, b"DATA\r\n");
    sim.feed(B, b"354 go\r\n");
    let before = sim.run.to_backend.len();
    let body = body_of(5 * MAX_BUFFER);
    sim.writes = Writes::default();
    sim.feed(C, &body);
    let Writes {
        to_backend,
        largest,
        ..
    } = sim.writes;
    assert!(largest <= 65_483, "a write of {largest} octets");
    assert!(
        to_backend <= 2 * body.len().div_ceil(MAX_BUFFER),
        "{to_backend} writes"
    );
    assert_eq!(sim.run.to_backend[before..], body[..]);
}

#[test]
fn after_a_non_final_bdat_only_bdat_noop_and_quit_reach_the_backend() {
    // Exim answers anything else with 503 and then reads the next chunk as commands.
    for other in [
        &b"HELP\r\n"[..],
        b"RSET\r\n",
        b"MAIL FROM:<c>\r\n",
        b"EHLO x\r\n",
        b"DATA\r\n",
    ] {
        let mut client = b"BDAT 4\r\nab\r\n".to_vec();
        client.extend_from_slice(other);
        client.extend_from_slice(b"BDAT 6\r\nRSET\r\n");
        let script: &[(Dir, &[u8])] = &[
            (C, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\n"),
            (B, b"250 ok\r\n250 ok\r\n"),
            (C, &client),
            (B, b"250 4 octets\r\n"),
        ];
        let run = split_invariant(&settings(), NO_LOOKUP, script);
        assert_eq!(
            run.to_backend, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nBDAT 4\r\nab\r\n",
            "{other:?}"
        );
        assert!(run.closed);
        assert!(
            run.client_text().ends_with(
                "503 5.5.1 Only BDAT, NOOP or QUIT may follow a non-final BDAT, closing connection\r\n"
            ),
            "{}",
            run.client_text()
        );
    }
    let script: &[(Dir, &[u8])] = &[
        (C, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\n"),
        (B, b"250 ok\r\n250 ok\r\n"),
        (C, b"BDAT 4\r\nabcdNOOP\r\nBDAT 2 LAST\r\nef"),
        (B, b"250 4 octets\r\n250 noop\r\n250 message ok\r\n"),
    ];
    let run = split_invariant(&settings(), NO_LOOKUP, script);
    assert_eq!(run.to_backend, all(C, script));
    assert!(!run.closed);
}

#[test]
fn a_noop_or_quit_between_chunks_is_answered_before_the_next_chunk_goes() {
    // Exim answers a NOOP or QUIT it does not take as one (`QUIT x`, the eleventh
    // NOOP) with 503, then refuses the next BDAT unread and runs its chunk as commands.
    for between in [&b"NOOP\r\n"[..], b"QUIT x\r\n"] {
        let mut client = b"BDAT 4\r\nabcd".to_vec();
        client.extend_from_slice(between);
        client.extend_from_slice(b"BDAT 6\r\nRSET\r\n");
        let script: &[(Dir, &[u8])] = &[
            (C, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\n"),
            (B, b"250 ok\r\n250 ok\r\n"),
            (C, &client),
            (B, b"250 4 octets\r\n"),
            (B, b"503 only BDAT permissible after non-LAST BDAT\r\n"),
        ];
        let run = split_invariant(&settings(), NO_LOOKUP, script);
        let mut sent = b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nBDAT 4\r\nabcd".to_vec();
        sent.extend_from_slice(between);
        assert_eq!(run.to_backend, sent, "{between:?}");
        assert!(run.closed && run.backend_closed, "{between:?}");
        assert!(
            run.client_text().ends_with(
                "421 4.3.0 Backend refused a command between chunks, closing connection\r\n"
            ),
            "{}",
            run.client_text()
        );
    }
}

#[test]
fn a_refused_non_final_chunk_closes_before_the_next_chunk_is_sent() {
    // Exim without PIPELINING answers input pipelined behind a chunk with 554 and then
    // reads the next BDAT's chunk as commands.
    let script: &[(Dir, &[u8])] = &[
        (C, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\n"),
        (B, b"250 ok\r\n250 ok\r\n"),
        (C, b"BDAT 4\r\nabcdBDAT 6\r\nRSET\r\n"),
        (B, b"554 SMTP synchronization error\r\n"),
    ];
    let run = split_invariant(&settings(), NO_LOOKUP, script);
    assert_eq!(
        run.to_backend,
        b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nBDAT 4\r\nabcd"
    );
    assert!(run.closed);
    assert!(run.backend_closed);
    assert!(
        run.client_text().ends_with(
            "421 4.3.0 Backend refused a command between chunks, closing connection\r\n"
        ),
        "{}",
        run.client_text()
    );
}
