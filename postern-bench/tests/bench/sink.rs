//! `postern-bench-sink` on its own: it answers a pipelined session, ends a message only
//! at the real `<CRLF>.<CRLF>` however the body is cut into reads, and `--record` keeps
//! each message and the whole connection exactly as they arrived.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use crate::harness::Sink;

/// Every read here is tiny; this only stops a hung sink from stalling the suite.
const LIMIT: Duration = Duration::from_secs(20);

#[test]
fn a_message_cut_anywhere_is_recorded_byte_for_byte() {
    let sink = Sink::start();
    // Lookalikes of the end and a dot-stuffed line are message, not its end.
    let message: &[u8] =
        b"Subject: t\r\n\r\n..stuffed\r\nx\n.\nnot the end\r\n.\r\r\n\r.\r\nlast\r\n.\r\n";
    let commands = b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n";

    let mut conn = TcpStream::connect(sink.addr).expect("connect");
    conn.set_nodelay(true).expect("nodelay");
    conn.set_read_timeout(Some(LIMIT)).expect("read timeout");
    conn.write_all(commands).expect("pipelined commands");
    // One write per octet: the sink's reads end wherever the segments happen to.
    for byte in message {
        conn.write_all(&[*byte]).expect("message octet");
    }
    conn.write_all(b"QUIT\r\n").expect("QUIT");
    let mut replies = String::new();
    conn.read_to_string(&mut replies)
        .expect("replies until close");

    let codes: Vec<&str> = replies.lines().map(|l| &l[..4]).collect();
    assert_eq!(
        codes,
        [
            "220 ", "250-", "250-", "250-", "250 ", "250 ", "250 ", "354 ", "250 ", "221 "
        ],
        "{replies}"
    );
    let recorded = sink.messages();
    assert!(recorded == [message], "{recorded:?}");
    let raw = sink.connections();
    assert!(
        raw == [[&commands[..], message, b"QUIT\r\n"].concat()],
        "{raw:?}"
    );
}

#[test]
fn xclient_is_offered_only_when_asked_for() {
    for (flags, offered) in [(&[][..], false), (&["--xclient"][..], true)] {
        let sink = Sink::start_with(flags);
        let mut conn = TcpStream::connect(sink.addr).expect("connect");
        conn.set_read_timeout(Some(LIMIT)).expect("read timeout");
        conn.write_all(b"EHLO c.test\r\nXCLIENT ADDR=192.0.2.1\r\nQUIT\r\n")
            .expect("commands");
        let mut replies = String::new();
        conn.read_to_string(&mut replies)
            .expect("replies until close");
        assert_eq!(
            replies.contains("250-XCLIENT "),
            offered,
            "{flags:?}: {replies}"
        );
        // Postfix answers XCLIENT with a fresh greeting, whether it was offered or not
        // here: the sink trusts every proxy.
        assert!(replies.contains("\r\n220 "), "{flags:?}: {replies}");
    }
}
