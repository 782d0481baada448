//! Transcript tests for the tracker. Every transcript is also replayed with each step
//! split at every byte offset, and fed one byte at a time: what reaches each side and
//! what is counted must not depend on how the bytes arrived.

use super::*;

const HOST: &str = "postern.test";

fn settings() -> Settings {
    Settings {
        hostname: HOST.into(),
        authenticated: true,
        tls: true,
        chunking: true,
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

/// What a run of the tracker produced, as a driver with 64 KiB buffers would see it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Run {
    to_backend: Vec<u8>,
    to_client: Vec<u8>,
    events: Vec<Event>,
    backend_closed: bool,
    closed: bool,
    lookups: usize,
}

impl Run {
    fn client_text(&self) -> String {
        String::from_utf8_lossy(&self.to_client).into_owned()
    }
}

/// A minimal driver: keeps what the tracker did not take and offers it again, and plays
/// the limits store (starting from `lookup`, counting what the backend accepts).
struct Sim {
    tracker: Tracker,
    client_buf: Vec<u8>,
    backend_buf: Vec<u8>,
    lookup: Lookup,
    run: Run,
}

impl Sim {
    fn new(settings: Settings, lookup: Lookup) -> Self {
        Sim {
            tracker: Tracker::new(settings),
            client_buf: Vec::new(),
            backend_buf: Vec::new(),
            lookup,
            run: Run::default(),
        }
    }

    fn feed(&mut self, dir: Dir, bytes: &[u8]) {
        match dir {
            C => self.client_buf.extend_from_slice(bytes),
            B => self.backend_buf.extend_from_slice(bytes),
        }
        self.pump();
    }

    fn pump(&mut self) {
        while !self.run.closed {
            let mut progress = false;
            if !self.backend_buf.is_empty() && !self.run.backend_closed {
                let mut out = Output::default();
                let n = self.tracker.backend_bytes(&self.backend_buf, &mut out);
                progress |= n > 0 || !out.ops.is_empty();
                self.apply(&out, B);
                self.backend_buf.drain(..n);
            }
            match self.tracker.wants() {
                Wants::Lookup => {
                    self.tracker.on_lookup(self.lookup);
                    self.run.lookups += 1;
                    progress = true;
                }
                Wants::Input if !self.client_buf.is_empty() => {
                    let mut out = Output::default();
                    let n = self.tracker.client_bytes(&self.client_buf, &mut out);
                    progress |=
                        n > 0 || !out.ops.is_empty() || self.tracker.wants() == Wants::Lookup;
                    self.apply(&out, C);
                    self.client_buf.drain(..n);
                }
                _ => {}
            }
            if !progress {
                break;
            }
        }
    }

    fn apply(&mut self, out: &Output, from: Dir) {
        let input = match from {
            C => &self.client_buf,
            B => &self.backend_buf,
        };
        for op in &out.ops {
            if self.run.closed {
                break;
            }
            match op {
                Op::Forward(range) => match from {
                    C => self.run.to_backend.extend_from_slice(&input[range.clone()]),
                    B => self.run.to_client.extend_from_slice(&input[range.clone()]),
                },
                Op::Reply(range) => self
                    .run
                    .to_client
                    .extend_from_slice(&out.replies[range.clone()]),
                Op::Event(event) => {
                    // The driver records accepted mail in the store, so the next
                    // lookup sees it.
                    if let Lookup::Usage(usage) = &mut self.lookup {
                        match event {
                            Event::RecipientAccepted => usage.recipients += 1,
                            Event::MessageAccepted { .. } => usage.messages += 1,
                            _ => {}
                        }
                    }
                    self.run.events.push(*event)
                }
                Op::CloseBackend => self.run.backend_closed = true,
                Op::Close => self.run.closed = true,
            }
        }
    }
}

fn run_steps(settings: &Settings, lookup: Lookup, steps: &[(Dir, Vec<u8>)]) -> Run {
    let mut sim = Sim::new(settings.clone(), lookup);
    for (dir, bytes) in steps {
        sim.feed(*dir, bytes);
    }
    sim.run
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
         250 legacy.example\r\n\
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
        "500 5.5.2 Bare CR, LF or NUL in command\r\n\
         500 5.5.2 Bare CR, LF or NUL in command\r\n250 ok\r\n"
    );
}

#[test]
fn an_endless_command_line_is_refused_and_closes() {
    let mut long = b"NOOP ".to_vec();
    long.resize(MAX_LINE + 10, b'a');
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
                [Event::RecipientAccepted, Event::BareLineEnding],
                "{what}"
            );
        });
    }
}

#[test]
fn lenient_data_relays_smuggling_sequences_verbatim() {
    // Observe, never alter: without --strict-data the backend decides, and postern's
    // reading (one message, ended by CRLF.CRLF) is what a compliant server reads.
    for sequence in SMUGGLING {
        let (prefix, body) = smuggling_script(sequence);
        let script: &[(Dir, &[u8])] = &[
            (C, &prefix),
            (B, b"250 ok\r\n250 ok\r\n354 go\r\n"),
            (C, &body),
            (B, b"250 queued\r\n"),
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
    let run = split_invariant(&limited, Lookup::Unavailable, &[(C, b"MAIL FROM:<a>\r\n")]);
    assert!(run.to_backend.is_empty());
    assert_eq!(
        run.client_text(),
        "451 4.3.0 Sending limits cannot be checked, try again later\r\n"
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
        // A new message: per-message count starts again, the per-user count goes on
        // (2 from the store + 2 accepted here = 4 of 5).
        (C, b"MAIL FROM:<a>\r\nRCPT TO:<6>\r\nRCPT TO:<7>\r\n"),
        (B, b"250 m\r\n250 r6\r\n"),
    ];
    let run = split_invariant(&limited, usage, script);
    assert_eq!(
        run.to_backend,
        b"MAIL FROM:<a>\r\nRCPT TO:<1>\r\nRCPT TO:<2>\r\nRCPT TO:<4>\r\nRSET\r\n\
          MAIL FROM:<a>\r\nRCPT TO:<6>\r\n"
    );
    assert_eq!(
        run.client_text(),
        "250 m\r\n250 r1\r\n550 r2 unknown\r\n\
         451 4.7.1 Too many recipients for one message\r\n\
         250 r4\r\n451 4.7.1 Too many recipients for one message\r\n250 rset\r\n\
         250 m\r\n250 r6\r\n\
         451 4.7.1 Recipient limit for this user reached, try again later\r\n"
    );
    assert_eq!(run.lookups, 2);
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
    assert_eq!(sim.tracker.wants(), Wants::Backend);
    sim.feed(B, &b"250 ok\r\n".repeat(10));
    assert_eq!(sim.run.to_backend.len(), (MAX_PENDING + 10) * 6);
    sim.feed(B, &b"250 ok\r\n".repeat(MAX_PENDING + 10));
    assert_eq!(sim.run.to_backend, commands);
    assert_eq!(sim.tracker.wants(), Wants::Input);
}

#[test]
fn the_terminator_automaton_agrees_with_a_plain_search() {
    // Every split of inputs rich in CR, LF and dots, against a naive search.
    let samples: &[&[u8]] = &[
        b"\r\n.\r\n",
        b".\r\n",
        b"a\r\n.\r\r\n.\r\n",
        b"\r\r\n..\r\n.\r\n",
        b"x\r\n.\rx\r\n.\n\r\n.\r\n",
        b"\r\n.\r\r\n\r\n.\r\n",
        b"abc",
    ];
    for sample in samples {
        let mut with_line = b"\r\n".to_vec();
        with_line.extend_from_slice(sample);
        let expected = with_line
            .windows(5)
            .position(|w| w == END_OF_DATA)
            .map(|p| p + 5 - 2);
        for cut in 0..=sample.len() {
            let mut t = Terminator::after_command_line();
            let (a, b) = sample.split_at(cut);
            let got = match t.scan(a) {
                Some(end) => Some(end),
                None => t.scan(b).map(|end| end + cut),
            };
            assert_eq!(got, expected, "{sample:?} cut {cut}");
        }
    }
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
