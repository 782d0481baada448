//! A fast SMTP sink for benchmarks: accepts mail on plain SMTP and throws it away.
//!
//! `benches/compare.sh` puts it behind both proxies under test. It has to be much cheaper
//! than a proxy, because it shares a core with the load generator: Postfix's `smtp-sink`
//! tops out near 400 MB/s, below what a proxy can relay. So it reads in large chunks and
//! finds the end of the data (`CRLF.CRLF`, RFC 5321 §4.1.1.4) with a SIMD substring search,
//! never looking at lines inside a message, and answers every command without checking it.
//!
//! With `--record DIR` it also writes, per connection, everything it received
//! (`conn-N.raw`) and each message exactly as it arrived after the 354, end marker included
//! (`conn-N-msg-K.data`): compare.sh checks those against what `postern bench` sent.
//!
//! This is an example rather than a `postern` subcommand so the production binary does
//! not carry a fake mail server.
//!
//! ```text
//! cargo run --release --example bench_sink -- --listen 127.0.0.1:2525 [--record DIR]
//! ```

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Read buffer per connection: big reads keep the syscall count low at GB/s rates.
const READ_BUF: usize = 256 * 1024;

/// Longest command line accepted (RFC 5321 §4.5.3.1.4 says 512; leave room for extensions).
const MAX_LINE: usize = 4096;

/// End of the data: the CRLF that ends the last line, a dot, CRLF.
use postern::smtp::data::END_OF_DATA;

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
}

// One thread is all a sink that does no work per byte needs; benchmarks pin it to a core.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let Some(dir) = &args.record {
        std::fs::create_dir_all(dir)?;
    }
    let listener = TcpListener::bind(args.listen).await?;
    println!("bench_sink listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let args = Arc::new(args);
    let ids = AtomicU64::new(0);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: say so, wait, and keep serving the connections we have.
                eprintln!("bench_sink: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let args = args.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(stream, id, &args).await {
                eprintln!("bench_sink: connection {id}: {e}");
            }
        });
    }
}

/// What the next input bytes are.
enum State {
    Command,
    /// Inside DATA; `matched` octets of [`END_OF_DATA`] were at the end of earlier input.
    Data {
        matched: usize,
    },
}

/// Serves one SMTP connection until QUIT or EOF.
async fn serve(mut stream: TcpStream, id: u64, args: &Args) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut record = match &args.record {
        Some(dir) => Some(Recorder::new(dir.clone(), id)?),
        None => None,
    };
    let host = &args.hostname;
    let ehlo = format!("250-{host}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE\r\n");
    let mut out = format!("220 {host} ESMTP bench_sink\r\n").into_bytes();
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
                            state = State::Data { matched: 2 };
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
                State::Data { matched } => {
                    let chunk = &buf[start..end];
                    match find_end(matched, chunk) {
                        Scan::End(n) => {
                            if let Some(r) = &mut record {
                                r.message(&chunk[..n], true)?;
                            }
                            start += n;
                            out.extend_from_slice(b"250 2.0.0 Ok: discarded\r\n");
                            state = State::Command;
                        }
                        Scan::More(m) => {
                            if let Some(r) = &mut record {
                                r.message(chunk, false)?;
                            }
                            start = end;
                            state = State::Data { matched: m };
                            break;
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

/// Result of scanning message data for the end marker.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// The marker ends after this many octets of the chunk.
    End(usize),
    /// No end in this chunk; this many octets of the marker end the chunk.
    More(usize),
}

/// Finds the end of the data in `chunk`, given that the input before it ended with the
/// first `matched` octets of [`END_OF_DATA`].
///
/// A match that straddles chunks either continues the partial one or starts inside the
/// chunk: the marker's only self-overlap is its leading CR, and a partial "\r\n.\r" that
/// fails on the next octet cannot restart at its own last CR, because both paths need a
/// LF next. So one continuation check plus one search is exact (tested against a naive
/// search at every split below).
fn find_end(matched: usize, chunk: &[u8]) -> Scan {
    if matched > 0 {
        let need = END_OF_DATA.len() - matched;
        let n = need.min(chunk.len());
        if chunk[..n] == END_OF_DATA[matched..matched + n] {
            return if n == need {
                Scan::End(n)
            } else {
                Scan::More(matched + n)
            };
        }
    }
    if let Some(i) = memchr::memmem::find(chunk, END_OF_DATA) {
        return Scan::End(i + END_OF_DATA.len());
    }
    // Longest suffix of the chunk that is a prefix of the marker.
    let tail = (1..END_OF_DATA.len())
        .rev()
        .find(|&k| chunk.len() >= k && chunk[chunk.len() - k..] == END_OF_DATA[..k])
        .unwrap_or(0);
    Scan::More(tail)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `data` (which follows a "DATA\r\n" line) in the given pieces and returns
    /// where the end marker was found, as an offset into `data`.
    fn scan_in_pieces(data: &[u8], cuts: &[usize]) -> Option<usize> {
        let mut matched = 2;
        let mut offset = 0;
        let mut bounds = cuts.to_vec();
        bounds.push(data.len());
        for &cut in &bounds {
            let chunk = &data[offset..cut];
            match find_end(matched, chunk) {
                Scan::End(n) => return Some(offset + n),
                Scan::More(m) => matched = m,
            }
            offset = cut;
        }
        None
    }

    fn naive(data: &[u8]) -> Option<usize> {
        let mut with_prefix = b"\r\n".to_vec();
        with_prefix.extend_from_slice(data);
        with_prefix
            .windows(END_OF_DATA.len())
            .position(|w| w == END_OF_DATA)
            .map(|i| i + END_OF_DATA.len() - 2)
    }

    #[test]
    fn every_split_agrees_with_naive_search() {
        let cases: [&[u8]; 9] = [
            b".\r\n",
            b"a\r\n.\r\n",
            b"a\r\n..\r\n.\r\nQUIT\r\n",
            b"x\r\n.\r\r\n.\r\n",
            b"\r\n.\r\n",
            b"a\r\n.x\r\n.\r\n",
            b"a\r\r\n\r\n.\r\n",
            b"a\n.\n\r\n.\r\n",
            b"no end here\r\n.",
        ];
        for data in cases {
            let expected = naive(data);
            assert_eq!(scan_in_pieces(data, &[]), expected, "{data:?} whole");
            for a in 0..=data.len() {
                for b in a..=data.len() {
                    assert_eq!(
                        scan_in_pieces(data, &[a, b]),
                        expected,
                        "{data:?} cut at {a},{b}"
                    );
                }
            }
        }
    }

    #[test]
    fn byte_at_a_time() {
        let data = b"Subject: x\r\n\r\n..\r\n...x\r\n.\r\nMAIL";
        let cuts: Vec<usize> = (1..data.len()).collect();
        assert_eq!(scan_in_pieces(data, &cuts), naive(data));
        assert_eq!(naive(data), Some(data.len() - 4));
    }
}
