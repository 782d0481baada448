//! `[legacy-sink]`: the demo's stand-in for the legacy plain-SMTP server.
//!
//! It speaks just enough RFC 5321 for the proxy's probe and for a relayed client: 220,
//! EHLO/HELO (advertising PIPELINING, 8BITMIME and SIZE), MAIL, RCPT, DATA, RSET, NOOP,
//! QUIT. It accepts every message, delivers nothing, and prints the envelope, headers
//! and size of each one on stdout, every line labelled so nobody mistakes it for the
//! real backend.
//!
//! [`SinkSession`] is sans-IO like the proxy's own core (bytes in, [`Output`]s out); [`serve`]
//! is the thin socket loop around it. Commands are framed by [`LineBuffer`], so the sink
//! has the same bounded line length as the proxy, and message bodies end where the
//! relay's own [`BodyScanner`] says, under [`BodyRule::Exact`]: the sink keeps what it
//! receives, so only the real `<CRLF>.<CRLF>` ends a message.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::smtp::LineBuffer;
use crate::smtp::data::{BodyRule, BodyScanner, BodyStep};

/// The prefix of every line the sink prints.
pub const LABEL: &str = "[legacy-sink]";

/// Largest message accepted, advertised as `SIZE` (RFC 1870). Only the headers are
/// kept, so this bounds nothing in memory; it makes the sink behave like a real server.
pub const MAX_MESSAGE: usize = 10 * 1024 * 1024;
/// Recipients per transaction (RFC 5321 §4.5.3.1.8 requires at least 100).
const MAX_RECIPIENTS: usize = 100;
/// Header lines kept for printing; the rest are counted but not kept.
const MAX_HEADER_LINES: usize = 50;
/// Characters printed per header line.
const MAX_PRINTED_HEADER: usize = 200;
/// Octets of a header line kept for printing (RFC 5322 §2.1.1's line limit); the rest of
/// a longer line is counted, not kept.
const MAX_KEPT_LINE: usize = 1000;
/// The `.` and CRLF that end a body after its last line's CRLF (RFC 5321 §4.1.1.4).
const DOT_LINE: usize = 3;
/// Idle time after which a connection is closed (RFC 5321 §4.5.3.2 asks for minutes).
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// One message as received, for printing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub from: String,
    pub to: Vec<String>,
    /// Bytes of content after dot-unstuffing, counting CRLF line ends.
    pub size: usize,
    /// Header lines, unfolded, at most `MAX_HEADER_LINES`.
    pub headers: Vec<String>,
}

impl Message {
    /// The first `Subject:` header's value.
    pub fn subject(&self) -> Option<&str> {
        self.headers.iter().find_map(|h| {
            let (name, value) = h.split_once(':')?;
            name.eq_ignore_ascii_case("subject").then(|| value.trim())
        })
    }
}

/// What the driver must do after a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send this reply line (without CRLF).
    Reply(String),
    /// A message was accepted: print it.
    Delivered(Message),
    /// Close the connection.
    Close,
}

#[derive(Debug)]
enum State {
    /// Between transactions, or collecting MAIL and RCPT.
    Envelope,
    /// Inside DATA, until the end of data.
    Data {
        scanner: BodyScanner,
        content: Content,
    },
}

/// A message body as it arrives, in pieces cut anywhere.
#[derive(Debug, Default)]
struct Content {
    /// Octets after dot-unstuffing, CRLFs included.
    size: usize,
    headers: Vec<String>,
    in_body: bool,
    /// The header line being received, at most [`MAX_KEPT_LINE`] octets of it.
    line: Vec<u8>,
    /// The next octet continues a line rather than starting one.
    mid_line: bool,
    /// The last octet was a CR, whose LF may come in the next piece.
    after_cr: bool,
}

/// One SMTP connection's state.
#[derive(Debug)]
pub struct SinkSession {
    hostname: String,
    state: State,
    from: Option<String>,
    to: Vec<String>,
    /// Received bytes not yet handled: pipelined commands (RFC 2920), or the last
    /// octets of a body that could start its end.
    input: LineBuffer,
}

impl SinkSession {
    /// A session for a new connection; `hostname` appears in the greeting and EHLO.
    pub fn new(hostname: &str) -> Self {
        SinkSession {
            hostname: hostname.to_owned(),
            state: State::Envelope,
            from: None,
            to: Vec::new(),
            input: LineBuffer::new(),
        }
    }

    /// The 220 greeting; it says what this server is, so a transcript cannot be misread.
    pub fn greeting(&self) -> String {
        format!(
            "220 {} ESMTP postern demo sink (a stand-in for the legacy server)",
            self.hostname
        )
    }

    /// Handles bytes received from the peer, cut anywhere; returns what to do, in order.
    /// Nothing after a [`Output::Close`] is handled.
    pub fn receive(&mut self, bytes: &[u8]) -> Vec<Output> {
        self.input.extend(bytes);
        let mut outputs = Vec::new();
        loop {
            let step = match &mut self.state {
                State::Envelope => match self.input.next_line() {
                    Ok(Some(line)) => self.command(&line),
                    Ok(None) => return outputs,
                    Err(_) => vec![
                        Output::Reply("500 5.5.2 Line too long".into()),
                        Output::Close,
                    ],
                },
                State::Data { scanner, content } => {
                    let pending = self.input.take_pending();
                    match scanner.scan(&pending) {
                        BodyStep::More(n) => {
                            content.add(&pending[..n]);
                            self.input.extend(&pending[n..]);
                            return outputs;
                        }
                        BodyStep::End(n) => {
                            content.add(&pending[..n.saturating_sub(DOT_LINE)]);
                            let content = std::mem::take(content);
                            self.state = State::Envelope;
                            self.input.extend(&pending[n..]);
                            self.finish(content)
                        }
                        BodyStep::Ambiguous(_) => {
                            debug_assert!(false, "BodyRule::Exact refuses nothing");
                            vec![Output::Close]
                        }
                    }
                }
            };
            let close = step.contains(&Output::Close);
            outputs.extend(step);
            if close {
                return outputs;
            }
        }
    }

    fn command(&mut self, line: &[u8]) -> Vec<Output> {
        let text = String::from_utf8_lossy(line);
        let (verb, rest) = match text.split_once(' ') {
            Some((verb, rest)) => (verb, rest.trim()),
            None => (text.as_ref(), ""),
        };
        let reply = |r: String| vec![Output::Reply(r)];
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" => {
                self.reset();
                vec![
                    Output::Reply(format!("250-{} greets {}", self.hostname, rest)),
                    Output::Reply("250-PIPELINING".into()),
                    Output::Reply("250-8BITMIME".into()),
                    Output::Reply(format!("250 SIZE {MAX_MESSAGE}")),
                ]
            }
            "HELO" => {
                self.reset();
                reply(format!("250 {}", self.hostname))
            }
            "MAIL" => match (&self.from, address(rest, "FROM:")) {
                (Some(_), _) => reply("503 5.5.1 MAIL already given".into()),
                (None, Some(from)) => {
                    self.from = Some(from);
                    reply("250 2.1.0 Sender OK".into())
                }
                (None, None) => reply("501 5.5.4 Syntax: MAIL FROM:<address>".into()),
            },
            "RCPT" => match (&self.from, address(rest, "TO:")) {
                (None, _) => reply("503 5.5.1 MAIL first".into()),
                (Some(_), _) if self.to.len() >= MAX_RECIPIENTS => {
                    reply("452 4.5.3 Too many recipients".into())
                }
                (Some(_), Some(to)) => {
                    self.to.push(to);
                    reply("250 2.1.5 Recipient OK".into())
                }
                (Some(_), None) => reply("501 5.5.4 Syntax: RCPT TO:<address>".into()),
            },
            "DATA" if self.to.is_empty() => reply("503 5.5.1 RCPT first".into()),
            "DATA" => {
                self.state = State::Data {
                    scanner: BodyScanner::new(BodyRule::Exact),
                    content: Content::default(),
                };
                reply("354 End data with <CR><LF>.<CR><LF>".into())
            }
            "RSET" => {
                self.reset();
                reply("250 2.0.0 OK".into())
            }
            "NOOP" => reply("250 2.0.0 OK".into()),
            "QUIT" => vec![Output::Reply("221 2.0.0 Bye".into()), Output::Close],
            _ => reply("500 5.5.2 Command not recognized".into()),
        }
    }

    fn finish(&mut self, content: Content) -> Vec<Output> {
        let from = self.from.take().unwrap_or_default();
        let to = std::mem::take(&mut self.to);
        if content.size > MAX_MESSAGE {
            return vec![Output::Reply(format!(
                "552 5.3.4 Message exceeds SIZE {MAX_MESSAGE}"
            ))];
        }
        vec![
            Output::Reply("250 2.0.0 Accepted by the demo sink, delivered nowhere".into()),
            Output::Delivered(Message {
                from,
                to,
                size: content.size,
                headers: content.headers,
            }),
        ]
    }

    fn reset(&mut self) {
        self.from = None;
        self.to.clear();
    }
}

impl Content {
    /// Takes the next octets of the body (before its end-of-data line).
    fn add(&mut self, bytes: &[u8]) {
        // Lines end at CRLF, as the command lines do: a bare LF stays inside its line.
        for piece in bytes.split_inclusive(|&b| b == b'\n') {
            // RFC 5321 §4.5.2: a leading dot was doubled by the client.
            let text = match piece {
                [b'.', rest @ ..] if !self.mid_line => rest,
                _ => piece,
            };
            self.size = self.size.saturating_add(text.len());
            let ends_line = match piece {
                [.., b'\r', b'\n'] => true,
                [b'\n'] => self.after_cr,
                _ => false,
            };
            if !self.in_body {
                let room = MAX_KEPT_LINE.saturating_sub(self.line.len());
                self.line
                    .extend_from_slice(text.get(..room).unwrap_or(text));
                if ends_line {
                    let line = std::mem::take(&mut self.line);
                    self.header_line(line.strip_suffix(b"\r\n").unwrap_or(&line));
                }
            }
            self.after_cr = piece.last() == Some(&b'\r');
            self.mid_line = !ends_line;
        }
    }

    /// One whole line of the header section, CRLF removed.
    fn header_line(&mut self, line: &[u8]) {
        if line.is_empty() {
            self.in_body = true;
            return;
        }
        let text = printable(line);
        // RFC 5322 §2.2.3: a line starting with white space continues the previous header.
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            if let Some(last) = self.headers.last_mut()
                && last.chars().count() < MAX_PRINTED_HEADER
            {
                last.push(' ');
                last.push_str(text.trim());
            }
        } else if self.headers.len() < MAX_HEADER_LINES {
            self.headers.push(text);
        }
    }
}

/// The address in `FROM:<a@b> PARAMS` / `TO:<a@b>`, with its angle brackets; `None`
/// if the keyword or the brackets are missing. `<>` (the null sender) is allowed.
fn address(rest: &str, keyword: &str) -> Option<String> {
    let head = rest.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let path = rest[keyword.len()..].trim_start();
    let end = path.find('>')?;
    path.starts_with('<')
        .then(|| printable(&path.as_bytes()[..=end]))
}

/// Peer bytes made safe for a terminal: control characters (escape sequences) become
/// `\xNN`, invalid UTF-8 becomes U+FFFD, and the length is capped.
fn printable(bytes: &[u8]) -> String {
    let mut out = String::new();
    for c in String::from_utf8_lossy(bytes).chars() {
        if out.len() >= MAX_PRINTED_HEADER {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.push_str(&format!("\\x{:02x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// The lines printed for one message.
pub fn report(number: u64, message: &Message) -> String {
    let mut out = format!(
        "{LABEL} message {number} from {} to {}, {} bytes, Subject: {}\n",
        message.from,
        message.to.join(", "),
        message.size,
        message.subject().unwrap_or("(none)"),
    );
    for header in &message.headers {
        out.push_str(&format!("{LABEL}     {header}\n"));
    }
    out.push_str(&format!(
        "{LABEL} (stand-in for the legacy SMTP server: accepted, delivered nowhere)\n"
    ));
    out
}

/// Accepts connections until the task is dropped.
pub async fn serve(listener: TcpListener, hostname: &'static str) {
    let count = Arc::new(AtomicU64::new(0));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors or similar: a demo can wait a moment.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let count = count.clone();
        tokio::spawn(async move {
            // The proxy's probe hangs up after QUIT without reading the reply; errors
            // on a sink connection are never worth reporting.
            let _ = connection(stream, hostname, &count).await;
        });
    }
}

async fn connection(
    mut stream: TcpStream,
    hostname: &str,
    count: &AtomicU64,
) -> std::io::Result<()> {
    let mut session = SinkSession::new(hostname);
    let mut out = Vec::new();
    send(&mut stream, &mut out, &session.greeting()).await?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match tokio::time::timeout(IDLE_TIMEOUT, stream.read(&mut buf)).await {
            Ok(read) => read?,
            Err(_) => {
                return send(&mut stream, &mut out, "421 4.4.2 Idle timeout").await;
            }
        };
        if n == 0 {
            return Ok(());
        }
        for output in session.receive(&buf[..n]) {
            match output {
                Output::Reply(reply) => {
                    out.extend_from_slice(reply.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                Output::Delivered(message) => {
                    let number = count.fetch_add(1, Ordering::Relaxed) + 1;
                    print_report(&report(number, &message));
                }
                Output::Close => {
                    stream.write_all(&out).await?;
                    return Ok(());
                }
            }
        }
        // RFC 2920: replies to a pipelined batch may go out together.
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
    }
}

async fn send(stream: &mut TcpStream, out: &mut Vec<u8>, reply: &str) -> std::io::Result<()> {
    out.extend_from_slice(reply.as_bytes());
    out.extend_from_slice(b"\r\n");
    stream.write_all(out).await?;
    out.clear();
    Ok(())
}

/// One block per message under one lock, so two messages never interleave.
fn print_report(text: &str) {
    let mut stdout = std::io::stdout().lock();
    // A closed console must not take the demo down with it.
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `lines`, each with its CRLF, all at once, and returns every reply, plus the
    /// delivered messages.
    fn run(session: &mut SinkSession, lines: &[&str]) -> (Vec<String>, Vec<Message>) {
        let wire: String = lines.iter().map(|line| format!("{line}\r\n")).collect();
        outputs(session.receive(wire.as_bytes()))
    }

    fn outputs(outputs: Vec<Output>) -> (Vec<String>, Vec<Message>) {
        let mut replies = Vec::new();
        let mut messages = Vec::new();
        for output in outputs {
            match output {
                Output::Reply(r) => replies.push(r),
                Output::Delivered(m) => messages.push(m),
                Output::Close => replies.push("<close>".into()),
            }
        }
        (replies, messages)
    }

    fn codes(replies: &[String]) -> Vec<&str> {
        replies.iter().map(|r| &r[..3]).collect()
    }

    #[test]
    fn a_whole_transaction() {
        let mut s = SinkSession::new("sink.test");
        assert!(s.greeting().starts_with("220 sink.test "));
        let (replies, messages) = run(
            &mut s,
            &[
                "EHLO client.test",
                "MAIL FROM:<a@example.test> SIZE=100 BODY=8BITMIME",
                "RCPT TO:<b@example.test>",
                "rcpt to: <c@example.test>",
                "DATA",
                "Subject: hello",
                "To: b@example.test,",
                "  c@example.test",
                "",
                "..leading dot",
                "body",
                ".",
                "QUIT",
            ],
        );
        assert_eq!(
            replies[..4],
            [
                "250-sink.test greets client.test",
                "250-PIPELINING",
                "250-8BITMIME",
                "250 SIZE 10485760"
            ]
        );
        assert_eq!(
            codes(&replies[4..]),
            ["250", "250", "250", "354", "250", "221", "<cl"]
        );
        let [message] = &messages[..] else {
            panic!("{messages:?}")
        };
        assert_eq!(message.from, "<a@example.test>");
        assert_eq!(message.to, ["<b@example.test>", "<c@example.test>"]);
        assert_eq!(message.subject(), Some("hello"));
        assert_eq!(
            message.headers,
            ["Subject: hello", "To: b@example.test, c@example.test"]
        );
        // Unstuffed ".leading dot" is 12 bytes; every line counts its CRLF.
        let size = [14, 19, 16, 0, 12, 4].iter().map(|n| n + 2).sum::<usize>();
        assert_eq!(message.size, size);
    }

    #[test]
    fn out_of_order_commands_are_refused() {
        let mut s = SinkSession::new("sink.test");
        let (replies, messages) = run(
            &mut s,
            &[
                "RCPT TO:<b@x.test>",
                "DATA",
                "MAIL FROM:a@x.test",
                "MAIL FROM:<>",
                "MAIL FROM:<a@x.test>",
                "DATA",
                "RSET",
                "RCPT TO:<b@x.test>",
                "NOOP",
                "VRFY x",
            ],
        );
        assert_eq!(
            codes(&replies),
            [
                "503", "503", "501", "250", "503", "503", "250", "503", "250", "500"
            ]
        );
        assert!(messages.is_empty());
    }

    #[test]
    fn reads_cut_anywhere_give_the_same_transcript() {
        let wire: &[u8] = b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n\
            Subject: cut\r\n anywhere\r\n\r\n..dot\r\nbare\nLF\r\n\r\n.\r\nNOOP\r\nQUIT\r\nNOOP\r\n";
        let whole = SinkSession::new("sink.test").receive(wire);
        let (replies, messages) = outputs(whole.clone());
        assert_eq!(
            codes(&replies),
            [
                "250", "250", "250", "250", "250", "250", "354", "250", "250", "221", "<cl"
            ]
        );
        assert_eq!(messages[0].headers, ["Subject: cut anywhere"]);
        // Every octet before the end-of-data line, less the doubled dot.
        let body = b"Subject: cut\r\n anywhere\r\n\r\n..dot\r\nbare\nLF\r\n\r\n";
        assert_eq!(messages[0].size, body.len() - 1);
        // As the driver does: nothing is fed once the session said Close.
        let feed = |pieces: &mut dyn Iterator<Item = &[u8]>| {
            let mut session = SinkSession::new("sink.test");
            let mut got = Vec::new();
            for piece in pieces {
                got.extend(session.receive(piece));
                if got.last() == Some(&Output::Close) {
                    break;
                }
            }
            got
        };
        for cut in 1..wire.len() {
            let got = feed(&mut [&wire[..cut], &wire[cut..]].into_iter());
            assert_eq!(got, whole, "cut at {cut}");
        }
        assert_eq!(feed(&mut wire.chunks(1)), whole, "byte by byte");
    }

    #[test]
    fn only_the_real_end_of_data_ends_a_message() {
        let mut s = SinkSession::new("sink.test");
        let (replies, messages) = outputs(s.receive(
            b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n\
              x\n.\nMAIL FROM:<e@x.test>\r\n\r\n.\r\n",
        ));
        assert_eq!(codes(&replies), ["250", "250", "354", "250"]);
        assert_eq!(messages.len(), 1);
        assert_eq!(
            messages[0].size,
            b"x\n.\nMAIL FROM:<e@x.test>\r\n\r\n".len()
        );
    }

    #[test]
    fn an_overlong_command_line_closes_the_connection() {
        let mut s = SinkSession::new("sink.test");
        let (replies, _) = outputs(s.receive(&[b'A'; 20_000]));
        assert_eq!(replies, ["500 5.5.2 Line too long", "<close>"]);
    }

    #[test]
    fn a_second_transaction_starts_clean() {
        let mut s = SinkSession::new("sink.test");
        let transaction = [
            "MAIL FROM:<a@x.test>",
            "RCPT TO:<b@x.test>",
            "DATA",
            "x",
            ".",
        ];
        let (_, first) = run(&mut s, &transaction);
        let (replies, second) = run(&mut s, &transaction);
        assert_eq!(codes(&replies), ["250", "250", "354", "250"]);
        assert_eq!(first, second);
    }

    #[test]
    fn report_is_labelled_and_terminal_safe() {
        let message = Message {
            from: "<a@x.test>".into(),
            to: vec!["<b@x.test>".into()],
            size: 42,
            headers: vec![printable(b"Subject: hi\x1b[31mred")],
        };
        let text = report(7, &message);
        assert!(text.lines().all(|l| l.starts_with(LABEL)), "{text}");
        assert!(text.starts_with(
            "[legacy-sink] message 7 from <a@x.test> to <b@x.test>, 42 bytes, Subject: hi\\x1b[31mred\n"
        ));
        assert!(!text.contains('\x1b'));
    }
}
