//! `postern-bench-sink` end to end: it answers a pipelined session, ends a message only at
//! the real `<CRLF>.<CRLF>` however the body is cut into reads, and `--record` keeps each
//! message and the whole connection exactly as they arrived.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

/// Every read here is tiny; this only stops a hung sink from stalling the suite.
const LIMIT: Duration = Duration::from_secs(20);

/// A running sink, killed on drop.
struct Sink {
    child: Child,
    addr: SocketAddr,
    _stdout: BufReader<ChildStdout>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the sink on a port the kernel picks, recording into `dir`.
fn start(dir: &Path) -> Sink {
    let mut child = Command::new(env!("CARGO_BIN_EXE_postern-bench-sink"))
        .args(["--listen", "127.0.0.1:0", "--record"])
        .arg(dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn postern-bench-sink");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("read the listening line");
    let addr = line
        .trim()
        .strip_prefix("postern-bench-sink listening on ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    Sink {
        child,
        addr,
        _stdout: stdout,
    }
}

#[test]
fn a_message_cut_anywhere_is_recorded_byte_for_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = start(dir.path());
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
    let recorded = std::fs::read(dir.path().join("conn-0-msg-0.data")).expect("message file");
    assert!(
        recorded == message,
        "{:?}",
        String::from_utf8_lossy(&recorded)
    );
    let raw = std::fs::read(dir.path().join("conn-0.raw")).expect("raw file");
    assert!(
        raw == [&commands[..], message, b"QUIT\r\n"].concat(),
        "{:?}",
        String::from_utf8_lossy(&raw)
    );
}
