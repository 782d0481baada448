//! `postern-bench-sink`: a fast SMTP sink for benchmarks, which accepts mail on plain
//! SMTP and throws it away.
//!
//! `benches/compare.sh` puts it behind both proxies under test. It has to be much cheaper
//! than a proxy, because it shares a core with the load generator: Postfix's `smtp-sink`
//! tops out near 400 MB/s, below what a proxy can relay. So it reads in large chunks,
//! finds the end of the data (`CRLF.CRLF`, RFC 5321 §4.1.1.4) with postern's own body
//! scanner (SIMD searches for the dot lines, [`BodyRule::Exact`]: it keeps the mail, so
//! only the real terminator counts), never looks at lines inside a message, and answers
//! every command without checking it.
//!
//! With `--record DIR` it also writes, per connection, everything it received
//! (`conn-N.raw`) and each message exactly as it arrived after the 354, end marker included
//! (`conn-N-msg-K.data`): compare.sh and the tests check those against what
//! `postern-bench` sent.
//!
//! ```text
//! cargo run --release -p postern-bench --bin postern-bench-sink -- --listen 127.0.0.1:2525 [--record DIR]
//! ```

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;
use postern::smtp::data::{BodyRule, BodyScanner, BodyStep};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Read buffer per connection: big reads keep the syscall count low at GB/s rates.
const READ_BUF: usize = 256 * 1024;

/// Longest command line accepted (RFC 5321 §4.5.3.1.4 says 512; leave room for extensions).
const MAX_LINE: usize = 4096;

#[derive(Debug, Parser)]
#[command(about = "SMTP sink for benchmarks: accepts and discards mail")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:2525")]
    listen: SocketAddr,

    /// Save the raw bytes of every connection and message into this directory.
    #[arg(long, value_name = "DIR")]
    record: Option<PathBuf>,

    /// Name in the greeting and the EHLO reply.
    #[arg(long, default_value = "sink.invalid")]
    hostname: String,

    /// Offer XCLIENT in the EHLO reply (as Postfix does to an authorized proxy), so a
    /// proxy's `--xclient` introduction can be measured.
    #[arg(long)]
    xclient: bool,
}

// One thread is all a sink that does no work per byte needs; benchmarks pin it to a core.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let Some(dir) = &args.record {
        std::fs::create_dir_all(dir)?;
    }
    let listener = TcpListener::bind(args.listen).await?;
    // Tests and scripts read the address from this line (with --listen 127.0.0.1:0).
    println!("postern-bench-sink listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let args = Arc::new(args);
    let ids = AtomicU64::new(0);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: say so, wait, and keep serving the connections we have.
                eprintln!("postern-bench-sink: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let args = args.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(stream, id, &args).await {
                eprintln!("postern-bench-sink: connection {id}: {e}");
            }
        });
    }
}

/// What the next input bytes are.
enum State {
    Command,
    /// Inside DATA, until the scanner finds its end.
    Data(BodyScanner),
}

/// Serves one SMTP connection until QUIT or EOF.
async fn serve(mut stream: TcpStream, id: u64, args: &Args) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut record = match &args.record {
        Some(dir) => Some(Recorder::new(dir.clone(), id)?),
        None => None,
    };
    let host = &args.hostname;
    let xclient = if args.xclient {
        "250-XCLIENT NAME ADDR PORT PROTO HELO LOGIN\r\n"
    } else {
        ""
    };
    let ehlo = format!("250-{host}\r\n250-PIPELINING\r\n250-8BITMIME\r\n{xclient}250 SIZE\r\n");
    let mut out = format!("220 {host} ESMTP postern-bench-sink\r\n").into_bytes();
    let mut buf = vec![0u8; READ_BUF];
    let (mut start, mut end) = (0, 0);
    // DATA starts right after the CRLF of the DATA command: an empty message is ".\r\n".
    let mut state = State::Command;
    loop {
        // Answer everything that is complete, then write all replies at once: this is
        // what makes pipelined commands (RFC 2920) work and cost one write.
        loop {
            match state {
                State::Command => {
                    let Some(lf) = memchr::memchr(b'\n', &buf[start..end]) else {
                        break;
                    };
                    let line = &buf[start..start + lf + 1];
                    start += lf + 1;
                    let verb = line.get(..4).map(|v| v.to_ascii_uppercase());
                    match verb.as_deref() {
                        Some(b"EHLO") => out.extend_from_slice(ehlo.as_bytes()),
                        Some(b"HELO") => {
                            out.extend_from_slice(format!("250 {host}\r\n").as_bytes())
                        }
                        Some(b"MAIL" | b"RCPT" | b"RSET" | b"NOOP") => {
                            out.extend_from_slice(b"250 2.0.0 Ok\r\n")
                        }
                        Some(b"DATA") => {
                            out.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                            state = State::Data(BodyScanner::new(BodyRule::Exact));
                            if let Some(r) = &mut record {
                                r.begin_message();
                            }
                        }
                        // Postfix answers XCLIENT with a fresh greeting; proxies expect that.
                        Some(b"XCLI") => {
                            out.extend_from_slice(format!("220 {host}\r\n").as_bytes())
                        }
                        Some(b"QUIT") => {
                            out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                            if let Some(r) = &mut record {
                                r.raw(&buf[..start])?;
                            }
                            stream.write_all(&out).await?;
                            return Ok(());
                        }
                        Some(b"STAR") => out.extend_from_slice(b"454 4.7.0 TLS not available\r\n"),
                        _ => out.extend_from_slice(b"502 5.5.2 Command not implemented\r\n"),
                    }
                }
                State::Data(ref mut scanner) => {
                    let chunk = &buf[start..end];
                    match scanner.scan(chunk) {
                        BodyStep::End(n) => {
                            if let Some(r) = &mut record {
                                r.message(&chunk[..n], true)?;
                            }
                            start += n;
                            out.extend_from_slice(b"250 2.0.0 Ok: discarded\r\n");
                            state = State::Command;
                        }
                        // The octets not taken (at most three that could start the end
                        // line) stay in the buffer and are offered again with more.
                        BodyStep::More(n) => {
                            if let Some(r) = &mut record {
                                r.message(&chunk[..n], false)?;
                            }
                            start += n;
                            break;
                        }
                        BodyStep::Ambiguous(_) => {
                            return Err(std::io::Error::other(
                                "the body scanner refused a body under BodyRule::Exact",
                            ));
                        }
                    }
                }
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if let Some(r) = &mut record {
            r.raw(&buf[..start])?;
        }
        // Keep only the unprocessed tail (a partial command line) at the front.
        buf.copy_within(start..end, 0);
        end -= start;
        start = 0;
        if end >= MAX_LINE {
            stream.write_all(b"500 5.5.2 Line too long\r\n").await?;
            return Ok(());
        }
        let n = stream.read(&mut buf[end..]).await?;
        if n == 0 {
            return Ok(());
        }
        end += n;
    }
}

/// Writes what a connection received into files, for the byte-exact check.
struct Recorder {
    dir: PathBuf,
    id: u64,
    raw: std::fs::File,
    messages: u64,
    current: Vec<u8>,
}

impl Recorder {
    fn new(dir: PathBuf, id: u64) -> std::io::Result<Self> {
        let raw = std::fs::File::create(dir.join(format!("conn-{id}.raw")))?;
        Ok(Recorder {
            dir,
            id,
            raw,
            messages: 0,
            current: Vec::new(),
        })
    }

    fn raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.raw.write_all(bytes)
    }

    fn begin_message(&mut self) {
        self.current.clear();
    }

    fn message(&mut self, bytes: &[u8], last: bool) -> std::io::Result<()> {
        self.current.extend_from_slice(bytes);
        if last {
            let name = format!("conn-{}-msg-{}.data", self.id, self.messages);
            std::fs::write(self.dir.join(name), &self.current)?;
            self.messages += 1;
            self.current.clear();
        }
        Ok(())
    }
}
