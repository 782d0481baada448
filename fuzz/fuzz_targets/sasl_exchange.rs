//! A SASL exchange fed arbitrary client lines. The first byte picks the mechanism and
//! whether the AUTH command carried an initial response; the rest is split at LF into
//! lines (the first one being that initial response, if any). No step may panic, every
//! step keeps its invariants, and a finished exchange answers only `Malformed`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::sasl::{Credentials, Exchange, Mechanism, Step};

const CHALLENGE: &str = "<1896.697170952@postoffice.example>";

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mechanism = match first % 3 {
        0 => Mechanism::Plain,
        1 => Mechanism::Login,
        _ => Mechanism::CramMd5,
    };
    let mut lines = rest.split(|&b| b == b'\n');
    let initial = if first & 0x80 != 0 {
        lines.next()
    } else {
        None
    };

    let (mut exchange, step) = Exchange::start(mechanism, initial, CHALLENGE);
    assert_eq!(exchange.mechanism(), mechanism);
    check(&step);
    let mut finished = !matches!(step, Step::Challenge(_));
    for line in lines {
        let step = exchange.step(line);
        check(&step);
        if finished {
            assert_eq!(step, Step::Malformed);
        }
        finished |= !matches!(step, Step::Challenge(_));
    }
});

fn check(step: &Step) {
    match step {
        Step::Challenge(text) => {
            assert!(
                text.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
            );
        }
        Step::Done(Credentials::Password { username, password }) => {
            assert!(!username.is_empty() && !username.contains('\0'));
            assert!(!password.is_empty());
        }
        Step::Done(Credentials::CramMd5 {
            username,
            challenge,
            digest,
        }) => {
            assert!(!username.is_empty() && !username.contains('\0'));
            assert_eq!(challenge, CHALLENGE);
            assert!(digest.len() == 32 && digest.bytes().all(|b| b.is_ascii_hexdigit()));
            assert_eq!(digest, &digest.to_ascii_lowercase());
        }
        Step::Denied | Step::Cancelled | Step::Malformed => {}
    }
}
