//! `BackendReply::parse` on arbitrary backend bytes: no panic, a parsed reply is
//! unaffected by what follows it, and re-encoding it with `Reply::encode` parses back to
//! the same reply.

#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::smtp::reply::MAX_REPLY_LINES;
use postern::smtp::{BackendReply, Reply};

fuzz_target!(|buf: &[u8]| {
    let Ok(Some((reply, used))) = BackendReply::parse(buf) else {
        return;
    };
    assert!(used > 0 && used <= buf.len() && buf[used - 1] == b'\n');
    assert!((200..600).contains(&reply.code));
    assert!((1..=MAX_REPLY_LINES).contains(&reply.lines.len()));
    assert_eq!(
        BackendReply::parse(&buf[..used]),
        Ok(Some((reply.clone(), used)))
    );

    let again = Reply {
        code: reply.code,
        lines: reply.lines.iter().cloned().map(Into::into).collect(),
    };
    let mut wire = Vec::new();
    again.encode(&mut wire);
    // The text of a parsed line can be longer than it was on the wire (lossy UTF-8 turns
    // one bad byte into three), so only a reply that still fits must round-trip.
    if let Ok(parsed) = BackendReply::parse(&wire) {
        assert_eq!(parsed, Some((reply, wire.len())));
    }
});
