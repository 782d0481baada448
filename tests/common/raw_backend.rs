//! A scripted plain-SMTP backend that records every raw byte it receives.
//!
//! It speaks just enough SMTP for postern's probe and a relayed session: `220` greeting,
//! `EHLO` with a configurable capability list, `MAIL`/`RCPT`/`RSET`/`NOOP` `250`, `DATA`
//! `354` then everything up to `CRLF.CRLF`, `250`, `QUIT` `221`. It never rewrites what
//! it records, so tests can check bytes arrived exactly. [`Fault`]s simulate a backend
//! that is down, busy or hung.
//!
//! It runs on its own thread and tokio runtime, so sync tests (driving swaks or python)
//! and async tests use it the same way.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

use super::{STEP, contains, wait_until};

/// Capabilities [`RawBackend::start`] advertises after its `250-` name line.
pub const DEFAULT_CAPABILITIES: &[&str] = &["PIPELINING", "SIZE 10240000", "8BITMIME"];

/// How the backend misbehaves from now on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Behave.
    None,
    /// Close the listening socket: connections are refused.
    Refuse,
    /// Greet with `421` and close.
    Greet421,
    /// Accept and never send a byte (reads are still recorded).
    Stall,
    /// Accept and close at once.
    Close,
    /// Behave until a DATA body starts, then answer `552 5.3.4` after its first 64 KiB
    /// and close without reading the rest (the peer's writes then fail).
    RefuseBodyAndHangUp,
}

/// One accepted connection: everything the peer sent, in order.
#[derive(Clone, Debug, Default)]
pub struct RecordedSession {
    pub received: Vec<u8>,
    /// Whether the connection has ended.
    pub closed: bool,
    /// Complete messages: the bytes between `DATA`'s 354 and the `CRLF.CRLF`, verbatim
    /// (still dot-stuffed, ending with the CRLF before the dot).
    pub messages: Vec<Vec<u8>>,
}

type Sessions = Arc<Mutex<Vec<RecordedSession>>>;

/// A running backend; stopped on drop.
pub struct RawBackend {
    pub addr: SocketAddr,
    sessions: Sessions,
    fault: watch::Sender<(u64, Fault)>,
    applied: Arc<AtomicU64>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl RawBackend {
    /// A well-behaved backend with [`DEFAULT_CAPABILITIES`].
    pub fn start() -> RawBackend {
        Self::with_capabilities(DEFAULT_CAPABILITIES)
    }

    /// A backend whose EHLO reply is `250-rawbackend` followed by `capabilities`.
    pub fn with_capabilities(capabilities: &[&str]) -> RawBackend {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind backend");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("local_addr");
        // Fault::Refuse closes the port and binds it again later: meanwhile no child
        // process may be handed it.
        super::keep_port(addr.port());
        let sessions: Sessions = Arc::default();
        let (fault_tx, fault_rx) = watch::channel((0, Fault::None));
        let applied = Arc::new(AtomicU64::new(0));
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let ehlo = ehlo_reply(capabilities);

        let thread = {
            let sessions = sessions.clone();
            let applied = applied.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("backend runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("tokio listener");
                    accept_loop(
                        listener,
                        addr,
                        ehlo,
                        sessions,
                        fault_rx,
                        applied,
                        shutdown_rx,
                    )
                    .await;
                });
            })
        };
        RawBackend {
            addr,
            sessions,
            fault: fault_tx,
            applied,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        }
    }

    /// Switches fault mode; returns once the backend acts on it (for [`Fault::Refuse`],
    /// once the listening socket is closed).
    pub fn set_fault(&self, fault: Fault) {
        let generation = self.fault.borrow().0 + 1;
        self.fault.send_replace((generation, fault));
        wait_until(STEP, "backend to apply fault", || {
            (self.applied.load(Ordering::SeqCst) >= generation).then_some(())
        });
    }

    /// Every connection so far, in accept order.
    pub fn sessions(&self) -> Vec<RecordedSession> {
        self.sessions.lock().unwrap().clone()
    }

    /// Waits for a connection whose received bytes contain `needle` and returns it.
    pub fn session_containing(&self, needle: &[u8]) -> RecordedSession {
        wait_until(
            STEP,
            &format!(
                "a backend session containing {:?}",
                String::from_utf8_lossy(needle)
            ),
            || {
                self.sessions()
                    .into_iter()
                    .find(|s| contains(&s.received, needle))
            },
        )
    }

    /// Waits until some connection has received `n` complete messages and returns it.
    pub fn session_with_messages(&self, n: usize) -> RecordedSession {
        wait_until(
            STEP,
            &format!("a backend session with {n} message(s)"),
            || self.sessions().into_iter().find(|s| s.messages.len() >= n),
        )
    }

    /// Everything received on all connections, concatenated.
    pub fn all_received(&self) -> Vec<u8> {
        self.sessions()
            .into_iter()
            .flat_map(|s| s.received)
            .collect()
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ehlo_reply(capabilities: &[&str]) -> Vec<u8> {
    let mut lines = vec!["rawbackend".to_string()];
    lines.extend(capabilities.iter().map(|c| c.to_string()));
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let sep = if i + 1 == lines.len() { ' ' } else { '-' };
        out.extend_from_slice(format!("250{sep}{line}\r\n").as_bytes());
    }
    out
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    ehlo: Vec<u8>,
    sessions: Sessions,
    mut fault_rx: watch::Receiver<(u64, Fault)>,
    applied: Arc<AtomicU64>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let mut listener = Some(listener);
    let ehlo = Arc::new(ehlo);
    loop {
        let (generation, fault) = *fault_rx.borrow_and_update();
        if fault == Fault::Refuse {
            listener = None;
        } else if listener.is_none() {
            // std (and mio) set SO_REUSEADDR, so the port can be bound again at once.
            listener = Some(TcpListener::bind(addr).await.expect("re-bind backend port"));
        }
        applied.store(generation, Ordering::SeqCst);

        let accepted = match &listener {
            Some(l) => tokio::select! {
                r = l.accept() => r.ok(),
                _ = fault_rx.changed() => None,
                _ = &mut shutdown => return,
            },
            None => tokio::select! {
                _ = fault_rx.changed() => None,
                _ = &mut shutdown => return,
            },
        };
        if let Some((stream, _)) = accepted {
            let index = {
                let mut s = sessions.lock().unwrap();
                s.push(RecordedSession::default());
                s.len() - 1
            };
            let sessions = sessions.clone();
            let ehlo = ehlo.clone();
            tokio::spawn(async move {
                let _ = serve(stream, fault, &ehlo, &sessions, index).await;
                sessions.lock().unwrap()[index].closed = true;
            });
        }
    }
}

enum Mode {
    Command,
    Data,
}

/// The PROXY protocol v2 signature.
pub const PROXY_V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

enum ProxyHeader {
    NeedMore,
    Absent,
    Len(usize),
}

/// How long the PROXY header at the start of `buf` is, if there is one.
fn proxy_header_len(buf: &[u8]) -> ProxyHeader {
    let v1 = b"PROXY ";
    let n = buf.len().min(v1.len());
    if buf[..n] == v1[..n] {
        if n < v1.len() {
            return ProxyHeader::NeedMore;
        }
        return match super::find(buf, b"\r\n") {
            Some(i) => ProxyHeader::Len(i + 2),
            None => ProxyHeader::NeedMore,
        };
    }
    let n = buf.len().min(PROXY_V2_SIGNATURE.len());
    if buf[..n] == PROXY_V2_SIGNATURE[..n] {
        if buf.len() < 16 {
            return ProxyHeader::NeedMore;
        }
        let len = 16 + u16::from_be_bytes([buf[14], buf[15]]) as usize;
        return if buf.len() >= len {
            ProxyHeader::Len(len)
        } else {
            ProxyHeader::NeedMore
        };
    }
    ProxyHeader::Absent
}

async fn serve(
    mut stream: TcpStream,
    fault: Fault,
    ehlo: &[u8],
    sessions: &Sessions,
    index: usize,
) -> std::io::Result<()> {
    match fault {
        Fault::None | Fault::Refuse | Fault::RefuseBodyAndHangUp => {}
        Fault::Close => return Ok(()),
        Fault::Greet421 => {
            stream
                .write_all(b"421 4.3.2 rawbackend busy, try later\r\n")
                .await?;
            return Ok(());
        }
        Fault::Stall => {
            let mut chunk = [0u8; 4096];
            loop {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(());
                }
                sessions.lock().unwrap()[index]
                    .received
                    .extend_from_slice(&chunk[..n]);
            }
        }
    }

    stream.write_all(b"220 rawbackend ESMTP ready\r\n").await?;
    let mut pending: Vec<u8> = Vec::new();
    let mut mode = Mode::Command;
    // A PROXY protocol header (v1 line or v2 binary) may open the session; it is
    // recorded like everything else but not answered.
    let mut proxy_checked = false;
    // In DATA, where the search for the end marker resumes (keeps a 5 MiB message linear).
    let mut scan_from = 0usize;
    let mut chunk = vec![0u8; 64 * 1024];
    // Limit on reading a single reply's worth of silence; a session that idles this long
    // is abandoned so a stuck test cannot keep the thread alive.
    let idle = Duration::from_secs(300);
    loop {
        if !proxy_checked {
            match proxy_header_len(&pending) {
                ProxyHeader::NeedMore => {}
                ProxyHeader::Absent => proxy_checked = true,
                ProxyHeader::Len(n) => {
                    pending.drain(..n);
                    proxy_checked = true;
                }
            }
        }
        // Answer every complete command / message already buffered (pipelining).
        loop {
            if !proxy_checked {
                break; // still waiting to see whether a PROXY header comes first
            }
            match mode {
                Mode::Command => {
                    let Some(end) = pending.iter().position(|&b| b == b'\n') else {
                        break;
                    };
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches(['\r', '\n']);
                    let verb = text
                        .split(' ')
                        .next()
                        .unwrap_or_default()
                        .to_ascii_uppercase();
                    match verb.as_str() {
                        "EHLO" => stream.write_all(ehlo).await?,
                        "HELO" => stream.write_all(b"250 rawbackend\r\n").await?,
                        "MAIL" => stream.write_all(b"250 2.1.0 Ok\r\n").await?,
                        "RCPT" => stream.write_all(b"250 2.1.5 Ok\r\n").await?,
                        "RSET" | "NOOP" => stream.write_all(b"250 2.0.0 Ok\r\n").await?,
                        "DATA" => {
                            stream
                                .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                                .await?;
                            mode = Mode::Data;
                            scan_from = 0;
                        }
                        // XCLIENT (Postfix) answers with a fresh greeting.
                        "XCLIENT" => stream.write_all(b"220 rawbackend ESMTP ready\r\n").await?,
                        "QUIT" => {
                            stream.write_all(b"221 2.0.0 Bye\r\n").await?;
                            return Ok(());
                        }
                        _ => {
                            stream
                                .write_all(b"502 5.5.2 Error: command not recognized\r\n")
                                .await?
                        }
                    }
                }
                Mode::Data if fault == Fault::RefuseBodyAndHangUp => {
                    if pending.len() < 64 * 1024 {
                        break;
                    }
                    stream
                        .write_all(b"552 5.3.4 Message size exceeds fixed limit\r\n")
                        .await?;
                    return Ok(());
                }
                Mode::Data => {
                    // The message ends at CRLF "." CRLF; the CRLF before the dot may be the
                    // one that ended the DATA command itself (an empty message).
                    let end = if pending.starts_with(b".\r\n") {
                        Some((0, 3))
                    } else {
                        super::find(&pending[scan_from..], postern::smtp::data::END_OF_DATA)
                            .map(|i| (scan_from + i + 2, scan_from + i + 5))
                    };
                    let Some((body_end, consumed)) = end else {
                        scan_from = pending.len().saturating_sub(4);
                        break;
                    };
                    let message = pending[..body_end].to_vec();
                    pending.drain(..consumed);
                    sessions.lock().unwrap()[index].messages.push(message);
                    stream.write_all(b"250 2.0.0 Ok: queued\r\n").await?;
                    mode = Mode::Command;
                }
            }
        }
        let n = match tokio::time::timeout(idle, stream.read(&mut chunk)).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        sessions.lock().unwrap()[index]
            .received
            .extend_from_slice(&chunk[..n]);
        pending.extend_from_slice(&chunk[..n]);
    }
}
