//! A raw SMTP line client: plain TCP, STARTTLS or implicit TLS, with `expect("235")`
//! helpers and a transcript for failure messages. Unlike lettre it can send anything,
//! in any framing (CRAM-MD5, `*`, bad base64, pipelined bytes after STARTTLS).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::ServerName;

use super::within;

/// A parsed SMTP reply.
#[derive(Clone, Debug)]
pub struct Reply {
    pub code: u16,
    /// The text of each line after `NNN-`/`NNN `.
    pub lines: Vec<String>,
    /// The reply exactly as received.
    pub raw: String,
}

impl Reply {
    /// The last line: `code` plus text, e.g. `235 2.7.0 Authentication successful`.
    pub fn last(&self) -> String {
        format!(
            "{} {}",
            self.code,
            self.lines.last().cloned().unwrap_or_default()
        )
    }

    /// Whether some line (after the code), compared case-insensitively, is `keyword` or
    /// starts with `keyword ` (EHLO keywords).
    pub fn has_keyword(&self, keyword: &str) -> bool {
        self.lines.iter().any(|l| {
            let l = l.to_ascii_uppercase();
            let k = keyword.to_ascii_uppercase();
            l == k || l.starts_with(&format!("{k} ")) || l.starts_with(&format!("{k}="))
        })
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Gone,
}

/// A connection to postern driven line by line.
pub struct SmtpClient {
    stream: Stream,
    buf: Vec<u8>,
    /// `C: ` and `S: ` lines of the conversation so far.
    pub transcript: String,
}

/// The name tests send in EHLO.
pub const CLIENT_NAME: &str = "client.test";

impl SmtpClient {
    /// Connects over plain TCP (a `--listen` port). Does not read the greeting.
    pub async fn connect(addr: SocketAddr) -> SmtpClient {
        let tcp = within(&format!("connect {addr}"), TcpStream::connect(addr))
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        SmtpClient {
            stream: Stream::Plain(tcp),
            buf: Vec::new(),
            transcript: String::new(),
        }
    }

    /// Wraps a TCP connection made elsewhere (e.g. from a chosen source address).
    pub fn from_tcp(tcp: TcpStream) -> SmtpClient {
        SmtpClient {
            stream: Stream::Plain(tcp),
            buf: Vec::new(),
            transcript: String::new(),
        }
    }

    /// Connects and does the TLS handshake at once (a `--listen-tls` port, RFC 8314).
    pub async fn connect_tls(addr: SocketAddr, config: Arc<ClientConfig>) -> SmtpClient {
        let mut c = Self::connect(addr).await;
        c.upgrade(config).await;
        c
    }

    /// Connects to a `--listen` port and does greeting, EHLO, STARTTLS, handshake and the
    /// second EHLO; returns the client and the post-TLS EHLO reply.
    pub async fn connect_starttls(
        addr: SocketAddr,
        config: Arc<ClientConfig>,
    ) -> (SmtpClient, Reply) {
        let mut c = Self::connect(addr).await;
        c.expect("220").await;
        c.cmd(&format!("EHLO {CLIENT_NAME}"), "250").await;
        c.starttls(config).await;
        let ehlo = c.cmd(&format!("EHLO {CLIENT_NAME}"), "250").await;
        (c, ehlo)
    }

    /// Connects to a `--listen-tls` port, reads the greeting and sends EHLO.
    pub async fn connect_implicit(
        addr: SocketAddr,
        config: Arc<ClientConfig>,
    ) -> (SmtpClient, Reply) {
        let mut c = Self::connect_tls(addr, config).await;
        c.expect("220").await;
        let ehlo = c.cmd(&format!("EHLO {CLIENT_NAME}"), "250").await;
        (c, ehlo)
    }

    /// Sends `STARTTLS`, expects `220` and does the handshake. Fails if the server sent
    /// anything after its 220 in plaintext.
    pub async fn starttls(&mut self, config: Arc<ClientConfig>) {
        self.cmd("STARTTLS", "220").await;
        assert!(
            self.buf.is_empty(),
            "server sent plaintext after its STARTTLS 220: {:?}\n{}",
            String::from_utf8_lossy(&self.buf),
            self.transcript
        );
        self.upgrade(config).await;
    }

    /// Does the TLS handshake on the current TCP stream (server name `localhost`).
    pub async fn upgrade(&mut self, config: Arc<ClientConfig>) {
        let tcp = match std::mem::replace(&mut self.stream, Stream::Gone) {
            Stream::Plain(tcp) => tcp,
            _ => panic!("upgrade: not a plain TCP stream"),
        };
        let name = ServerName::try_from("localhost").expect("server name");
        let tls = within(
            "TLS handshake",
            TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .unwrap_or_else(|e| panic!("TLS handshake: {e}\n{}", self.transcript));
        self.transcript.push_str("-- TLS established --\n");
        self.stream = Stream::Tls(Box::new(tls));
    }

    /// The plain TCP stream, for a test that goes on with bytes of its own (its own
    /// TLS client after STARTTLS). Fails if the server sent anything not yet read.
    pub fn into_tcp(self) -> TcpStream {
        assert!(
            self.buf.is_empty(),
            "unread bytes from the server: {:?}\n{}",
            String::from_utf8_lossy(&self.buf),
            self.transcript
        );
        match self.stream {
            Stream::Plain(tcp) => tcp,
            _ => panic!("into_tcp: not a plain TCP stream"),
        }
    }

    /// Whether the connection is on TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
    }

    /// The client's own address, as postern (or whatever it connected to) sees it.
    pub fn local_addr(&self) -> SocketAddr {
        let tcp = match &self.stream {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
            Stream::Gone => panic!("local_addr of a closed client"),
        };
        tcp.local_addr().expect("local address")
    }

    /// Writes raw bytes in one write (a test of pipelining sends several lines at once).
    pub async fn send(&mut self, bytes: &[u8]) {
        for line in String::from_utf8_lossy(bytes).split_inclusive('\n') {
            if self.transcript.len() < 64 * 1024 {
                self.transcript.push_str("C: ");
                self.transcript
                    .push_str(line.trim_end_matches(['\r', '\n']));
                self.transcript.push('\n');
            }
        }
        let what = format!("write {} bytes", bytes.len());
        let result = match &mut self.stream {
            Stream::Plain(s) => within(&what, write_flush(s, bytes)).await,
            Stream::Tls(s) => within(&what, write_flush(s.as_mut(), bytes)).await,
            Stream::Gone => panic!("send on a closed client"),
        };
        result.unwrap_or_else(|e| panic!("{what}: {e}\n{}", self.transcript));
    }

    /// Sends `line` followed by CRLF.
    pub async fn line(&mut self, line: &str) {
        self.send(format!("{line}\r\n").as_bytes()).await;
    }

    /// Sends `line` and expects a reply starting with `prefix`.
    pub async fn cmd(&mut self, line: &str, prefix: &str) -> Reply {
        self.line(line).await;
        self.expect(prefix).await
    }

    /// Reads one reply and checks its last line starts with `prefix` (`"235"`,
    /// `"538 5.7.11"`).
    pub async fn expect(&mut self, prefix: &str) -> Reply {
        let reply = self.read_reply().await;
        assert!(
            reply.last().starts_with(prefix),
            "expected a reply starting {prefix:?}, got {:?}\n--- transcript ---\n{}",
            reply.raw,
            self.transcript
        );
        reply
    }

    /// Reads one (possibly multi-line) reply.
    pub async fn read_reply(&mut self) -> Reply {
        let mut raw = String::new();
        let mut lines = Vec::new();
        loop {
            let line = match self.read_line().await {
                Some(l) => l,
                None => panic!(
                    "connection closed while waiting for a reply (got {raw:?})\n--- transcript ---\n{}",
                    self.transcript
                ),
            };
            raw.push_str(&line);
            let text = line.trim_end_matches(['\r', '\n']);
            let code = text
                .get(..3)
                .and_then(|c| c.parse::<u16>().ok())
                .unwrap_or_else(|| panic!("not an SMTP reply line: {text:?}\n{}", self.transcript));
            let sep = text.as_bytes().get(3).copied();
            lines.push(text.get(4..).unwrap_or("").to_string());
            if sep != Some(b'-') {
                return Reply { code, lines, raw };
            }
        }
    }

    /// Reads one line including its line ending; `None` at end of stream.
    pub async fn read_line(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line).into_owned();
                self.transcript.push_str("S: ");
                self.transcript
                    .push_str(line.trim_end_matches(['\r', '\n']));
                self.transcript.push('\n');
                return Some(line);
            }
            let n = self.read_some("a reply line").await;
            if n == 0 {
                return None;
            }
        }
    }

    async fn read_some(&mut self, what: &str) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        let result = match &mut self.stream {
            Stream::Plain(s) => within(what, s.read(&mut chunk)).await,
            Stream::Tls(s) => within(what, s.read(&mut chunk)).await,
            Stream::Gone => return 0,
        };
        match result {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                n
            }
            // A reset or a TLS close without close_notify both mean "closed" here.
            Err(_) => 0,
        }
    }

    /// Expects the server to close the connection (EOF or reset) without sending more.
    pub async fn expect_closed(&mut self) {
        loop {
            assert!(
                self.buf.is_empty(),
                "expected the connection to close, got {:?}\n{}",
                String::from_utf8_lossy(&self.buf),
                self.transcript
            );
            if self.read_some("the server to close the connection").await == 0 {
                return;
            }
        }
    }

    /// Expects no bytes from the server for `quiet` (the connection may stay open).
    pub async fn expect_silence(&mut self, quiet: Duration) {
        let mut chunk = [0u8; 1024];
        let got = match &mut self.stream {
            Stream::Plain(s) => tokio::time::timeout(quiet, s.read(&mut chunk)).await,
            Stream::Tls(s) => tokio::time::timeout(quiet, s.read(&mut chunk)).await,
            Stream::Gone => return,
        };
        if let Ok(Ok(n)) = got {
            assert!(
                n == 0 && self.buf.is_empty(),
                "expected silence, got {:?}\n{}",
                String::from_utf8_lossy(&chunk[..n]),
                self.transcript
            );
        }
        assert!(
            self.buf.is_empty(),
            "expected silence, had buffered {:?}",
            self.buf
        );
    }

    /// `AUTH PLAIN` with an initial response; expects `prefix` (`"235"`, `"535 5.7.8"`).
    pub async fn auth_plain(&mut self, user: &str, password: &str, prefix: &str) -> Reply {
        let ir = super::plain_response(user, password);
        self.cmd(&format!("AUTH PLAIN {ir}"), prefix).await
    }

    /// Connects to `listener`'s port, does TLS (STARTTLS or implicit), EHLO and
    /// `AUTH PLAIN` as `user`; returns once postern answered `235`.
    pub async fn authenticated(
        addr: SocketAddr,
        implicit: bool,
        config: Arc<ClientConfig>,
        user: &str,
        password: &str,
    ) -> SmtpClient {
        let (mut c, _) = if implicit {
            Self::connect_implicit(addr, config).await
        } else {
            Self::connect_starttls(addr, config).await
        };
        c.auth_plain(user, password, "235 2.7.0").await;
        c
    }

    /// Sends one short message from `from` and QUITs, each step accepted.
    pub async fn send_one_and_quit(&mut self, from: &str) {
        self.cmd(&format!("MAIL FROM:<{from}>"), "250").await;
        self.cmd("RCPT TO:<rcpt@example.net>", "250").await;
        self.cmd("DATA", "354").await;
        self.cmd("Subject: one\r\n\r\none\r\n.", "250").await;
        self.cmd("QUIT", "221").await;
    }

    /// Shuts down the write side (TLS close_notify, then TCP FIN).
    pub async fn shutdown(&mut self) {
        let _ = match &mut self.stream {
            Stream::Plain(s) => within("shutdown", s.shutdown()).await,
            Stream::Tls(s) => within("shutdown", s.shutdown()).await,
            Stream::Gone => Ok(()),
        };
    }
}

async fn write_flush<S: AsyncWrite + AsyncRead + Unpin>(
    s: &mut S,
    bytes: &[u8],
) -> std::io::Result<()> {
    s.write_all(bytes).await?;
    s.flush().await
}
