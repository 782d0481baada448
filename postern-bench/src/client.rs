//! One SMTP submission session, seen from the client (RFC 5321, RFC 3207, RFC 4954).
//!
//! The client is deliberately strict: every reply must carry the expected code, and any
//! deviation is a [`Failure`] tagged with the [`Stage`] it happened in, so the report can
//! say *where* a server breaks under load. Commands are sent in lockstep (no PIPELINING),
//! which is what most submission clients do and what makes per-message latency meaningful.
//! Replies are read with postern's reply parser, EHLO keywords matched with its
//! [`Capabilities`], and AUTH messages written by its `sasl::client`.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use postern::sasl::{self, Mechanism};
use postern::smtp::{BackendReply, Capabilities, Reply};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

use super::Mode;

/// Initial read buffer. It grows only for replies longer than that; the reply parser
/// bounds them (`postern::smtp::reply::MAX_REPLY_LINE`, `MAX_REPLY_LINES`).
const READ_BUF: usize = 4096;

/// How much of a malformed reply a failure quotes.
const QUOTED: usize = 200;

/// Where in the session something failed. Order is the order of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Greeting,
    Ehlo,
    Starttls,
    Tls,
    Auth,
    Mail,
    Rcpt,
    Data,
    Quit,
}

impl Stage {
    /// Every stage, in session order (the report's column order).
    pub const ALL: [Stage; 10] = [
        Stage::Connect,
        Stage::Greeting,
        Stage::Ehlo,
        Stage::Starttls,
        Stage::Tls,
        Stage::Auth,
        Stage::Mail,
        Stage::Rcpt,
        Stage::Data,
        Stage::Quit,
    ];

    /// Lower-case name used in reports and JSON keys.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Greeting => "greeting",
            Stage::Ehlo => "ehlo",
            Stage::Starttls => "starttls",
            Stage::Tls => "tls",
            Stage::Auth => "auth",
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
            Stage::Data => "data",
            Stage::Quit => "quit",
        }
    }

    /// Position in [`Stage::ALL`], for per-stage counters.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A session that went wrong: where, and what the server said or the OS reported.
#[derive(Debug)]
pub struct Failure {
    pub stage: Stage,
    pub detail: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.stage.name(), self.detail)
    }
}

/// The account to log in with (`--auth`), and the mechanism to present it with.
pub struct Account {
    /// `--mechanism`.
    pub mechanism: Mechanism,
    /// The authentication identity, before the first `:` of `--auth`.
    pub user: String,
    /// The rest of `--auth`.
    pub password: String,
}

/// Everything a session needs, prepared once per run and shared by every connection.
pub struct Script {
    pub addr: SocketAddr,
    /// The local address to connect from (`--source`); the kernel picks one without.
    pub source: Option<IpAddr>,
    pub mode: Mode,
    /// Present for `starttls` and `tls` modes.
    pub tls: Option<(TlsConnector, ServerName<'static>)>,
    pub auth: Option<Account>,
    /// `EHLO name\r\n`
    pub ehlo: Vec<u8>,
    /// `MAIL FROM:<...>\r\n`
    pub mail: Vec<u8>,
    /// `RCPT TO:<...>\r\n`
    pub rcpt: Vec<u8>,
    /// The dot-stuffed message followed by `.\r\n`.
    pub payload: Vec<u8>,
    /// Size of the message before stuffing: what MB/s counts.
    pub message_size: u64,
    /// Per-step limit: each read of a reply and each write.
    pub timeout: Duration,
    /// What the first TLS handshake negotiated (version, cipher suite, key exchange),
    /// for the report: the key exchange in particular differs between servers.
    pub negotiated: OnceLock<String>,
}

/// A TCP connection to `addr`, from `source` when given.
async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(ip) = source else {
        return TcpStream::connect(addr).await;
    };
    let socket = match ip {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(addr).await
}

/// Anything a session can run over: plain TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An established (greeted, EHLOed, TLS'd and authenticated as configured) session.
pub struct Session {
    conn: Conn<Box<dyn Io>>,
}

impl Session {
    /// Connects and runs the session up to and including AUTH.
    pub async fn open(script: &Script) -> Result<Session, Failure> {
        let t = script.timeout;
        let tcp = within(Stage::Connect, t, connect(script.addr, script.source)).await?;
        // Commands and replies are small and strictly alternate: without this, Nagle's
        // algorithm meets the peer's delayed ACK and costs up to 40 ms per exchange.
        tcp.set_nodelay(true).map_err(|e| fail(Stage::Connect, e))?;

        let mut conn: Conn<Box<dyn Io>> = match (script.mode, &script.tls) {
            (Mode::Plain, _) => {
                let mut conn = Conn::new(Box::new(tcp) as Box<dyn Io>);
                conn.greeting(t).await?;
                conn
            }
            (Mode::Tls, Some((connector, name))) => {
                let tls = within(Stage::Tls, t, connector.connect(name.clone(), tcp)).await?;
                note_negotiated(script, &tls);
                let mut conn = Conn::new(Box::new(tls) as Box<dyn Io>);
                conn.greeting(t).await?;
                conn
            }
            (Mode::Starttls, Some((connector, name))) => {
                let mut plain = Conn::new(tcp);
                plain.greeting(t).await?;
                let ehlo = plain.command(Stage::Ehlo, t, &script.ehlo, &[250]).await?;
                if !Capabilities::from_ehlo_reply(&ehlo.lines).has("STARTTLS") {
                    return Err(fail(Stage::Ehlo, "STARTTLS not offered"));
                }
                plain
                    .command(Stage::Starttls, t, b"STARTTLS\r\n", &[220])
                    .await?;
                // RFC 3207 §4.2: nothing may follow the 220 in the clear; a server that
                // sends more is broken (or an attacker's injection), not something to carry
                // into the TLS session.
                let tcp = plain
                    .into_inner()
                    .map_err(|n| fail(Stage::Starttls, format!("{n} bytes sent after 220")))?;
                let tls = within(Stage::Tls, t, connector.connect(name.clone(), tcp)).await?;
                note_negotiated(script, &tls);
                Conn::new(Box::new(tls) as Box<dyn Io>)
            }
            (Mode::Tls | Mode::Starttls, None) => {
                return Err(fail(Stage::Tls, "no TLS configuration"));
            }
        };
        conn.command(Stage::Ehlo, t, &script.ehlo, &[250]).await?;
        if let Some(account) = &script.auth {
            conn.authenticate(account, t).await?;
        }
        Ok(Session { conn })
    }

    /// One mail transaction: MAIL, RCPT, DATA and the message.
    pub async fn send_message(&mut self, script: &Script) -> Result<(), Failure> {
        let t = script.timeout;
        let c = &mut self.conn;
        c.command(Stage::Mail, t, &script.mail, &[250]).await?;
        // 251: "user not local; will forward" is success too (RFC 5321 §3.4).
        c.command(Stage::Rcpt, t, &script.rcpt, &[250, 251]).await?;
        c.command(Stage::Data, t, b"DATA\r\n", &[354]).await?;
        c.command(Stage::Data, t, &script.payload, &[250]).await?;
        Ok(())
    }

    /// QUIT, then close the connection (with a TLS close_notify where there is TLS).
    pub async fn quit(mut self, script: &Script) -> Result<(), Failure> {
        let t = script.timeout;
        self.conn
            .command(Stage::Quit, t, b"QUIT\r\n", &[221])
            .await?;
        // The session is complete; a peer that resets instead of reading our
        // close_notify is not an error worth counting.
        let _ = tokio::time::timeout(t, self.conn.io.shutdown()).await;
        Ok(())
    }
}

/// Records the first handshake's parameters, e.g. `TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519`.
fn note_negotiated(script: &Script, tls: &tokio_rustls::client::TlsStream<TcpStream>) {
    if script.negotiated.get().is_some() {
        return;
    }
    let conn = tls.get_ref().1;
    let describe = |v: Option<String>| v.unwrap_or_else(|| "?".into());
    let _ = script.negotiated.set(format!(
        "{} {} {}",
        describe(conn.protocol_version().map(|v| format!("{v:?}"))),
        describe(
            conn.negotiated_cipher_suite()
                .map(|c| format!("{:?}", c.suite()))
        ),
        describe(
            conn.negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name()))
        ),
    ));
}

/// A stream plus a read buffer that keeps bytes received past the current reply.
struct Conn<S> {
    io: S,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(io: S) -> Self {
        Conn {
            io,
            buf: vec![0; READ_BUF],
            start: 0,
            end: 0,
        }
    }

    /// Returns the stream if no unread bytes are buffered, else how many there are.
    fn into_inner(self) -> Result<S, usize> {
        match self.end - self.start {
            0 => Ok(self.io),
            n => Err(n),
        }
    }

    async fn greeting(&mut self, t: Duration) -> Result<(), Failure> {
        let reply = within(Stage::Greeting, t, self.read_reply()).await?;
        expect(Stage::Greeting, reply, &[220]).map(drop)
    }

    /// Sends `line` (a command or the message) and checks the reply code.
    async fn command(
        &mut self,
        stage: Stage,
        t: Duration,
        line: &[u8],
        ok: &[u16],
    ) -> Result<BackendReply, Failure> {
        within(stage, t, async {
            self.io.write_all(line).await?;
            self.io.flush().await
        })
        .await?;
        let reply = within(stage, t, self.read_reply()).await?;
        expect(stage, reply, ok)
    }

    async fn authenticate(&mut self, account: &Account, t: Duration) -> Result<(), Failure> {
        let stage = Stage::Auth;
        let (user, password) = (account.user.as_str(), account.password.as_bytes());
        match account.mechanism {
            Mechanism::Plain => {
                // Sent as the initial response (RFC 4954 §4) to save a round trip, as real
                // clients do.
                let line = format!("AUTH PLAIN {}\r\n", sasl::client::plain(user, password));
                self.command(stage, t, line.as_bytes(), &[235]).await?;
            }
            Mechanism::Login => {
                self.command(stage, t, b"AUTH LOGIN\r\n", &[334]).await?;
                let [user, password] = sasl::client::login(user, password);
                self.command(stage, t, format!("{user}\r\n").as_bytes(), &[334])
                    .await?;
                self.command(stage, t, format!("{password}\r\n").as_bytes(), &[235])
                    .await?;
            }
            Mechanism::CramMd5 => {
                let reply = self.command(stage, t, b"AUTH CRAM-MD5\r\n", &[334]).await?;
                let challenge = reply.lines.first().map_or("", String::as_str);
                let answer = sasl::client::cram_md5(user, password, challenge)
                    .ok_or_else(|| fail(stage, "CRAM-MD5 challenge is not base64"))?;
                self.command(stage, t, format!("{answer}\r\n").as_bytes(), &[235])
                    .await?;
            }
            // --mechanism offers only the three above.
            Mechanism::ScramSha1 | Mechanism::ScramSha256 => {
                return Err(fail(stage, "the load generator does not speak SCRAM"));
            }
        }
        Ok(())
    }

    /// Reads one complete (possibly multi-line) reply, RFC 5321 §4.2.1.
    async fn read_reply(&mut self) -> std::io::Result<BackendReply> {
        loop {
            let pending = &self.buf[self.start..self.end];
            match BackendReply::parse(pending) {
                Ok(Some((reply, used))) => {
                    self.start += used;
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(e) => {
                    let quoted = String::from_utf8_lossy(&pending[..pending.len().min(QUOTED)]);
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{e}: {quoted:?}"),
                    ));
                }
            }
            // Make room: move the partial reply to the front, grow only if it is that big.
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let n = self.io.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.end += n;
        }
    }
}

/// The reply as the server sent it, lines joined by CRLF, for failure details.
fn wire_text(reply: &BackendReply) -> String {
    let lines = reply.lines.iter().cloned().map(Cow::Owned).collect();
    let mut wire = Vec::new();
    Reply {
        code: reply.code,
        lines,
    }
    .encode(&mut wire);
    String::from_utf8_lossy(&wire).trim_end().to_owned()
}

fn expect(stage: Stage, reply: BackendReply, ok: &[u16]) -> Result<BackendReply, Failure> {
    if ok.contains(&reply.code) {
        Ok(reply)
    } else {
        Err(fail(stage, wire_text(&reply)))
    }
}

fn fail(stage: Stage, detail: impl ToString) -> Failure {
    Failure {
        stage,
        detail: detail.to_string(),
    }
}

/// Runs one step with its own deadline, attributing I/O errors and timeouts to `stage`.
async fn within<T, E: fmt::Display>(
    stage: Stage,
    t: Duration,
    step: impl Future<Output = Result<T, E>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(t, step).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(fail(stage, e)),
        Err(_) => Err(fail(stage, format!("timed out after {t:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn replies(chunks: &[&[u8]]) -> Vec<Result<(u16, String), String>> {
        let (client, mut server) = tokio::io::duplex(64);
        let data: Vec<u8> = chunks.concat();
        let writer = tokio::spawn(async move {
            // Written one small piece at a time to split replies at awkward points.
            for piece in data.chunks(3) {
                if server.write_all(piece).await.is_err() {
                    break;
                }
            }
        });
        let mut conn = Conn::new(client);
        let mut out = Vec::new();
        loop {
            match conn.read_reply().await {
                Ok(r) => out.push(Ok((r.code, wire_text(&r)))),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => {
                    out.push(Err(e.to_string()));
                    break;
                }
            }
        }
        // The writer may be blocked on a full pipe after an error: closing our end ends it.
        drop(conn);
        let _ = writer.await;
        out
    }

    #[tokio::test]
    async fn multi_line_and_split_replies() {
        let got = replies(&[b"220 hi\r\n250-a\r\n250-STARTTLS\r\n250 SIZE 10\r\n354\r\n"]).await;
        assert_eq!(
            got,
            vec![
                Ok((220, "220 hi".into())),
                Ok((250, "250-a\r\n250-STARTTLS\r\n250 SIZE 10".into())),
                Ok((354, "354".into())),
            ]
        );
    }

    #[tokio::test]
    async fn malformed_replies_are_errors() {
        // The last one: a line longer than the reply parser takes, never ended.
        let endless = [b'2'; 5000];
        for bad in [
            &b"25 x\r\n"[..],
            b"abc ok\r\n",
            b"250-a\r\n251 b\r\n",
            &endless,
        ] {
            let got = replies(&[bad]).await;
            assert!(matches!(got.last(), Some(Err(_))), "{got:?}");
        }
    }
}
