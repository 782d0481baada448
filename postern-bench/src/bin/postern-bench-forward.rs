//! `postern-bench-forward`: the relay floor. A TCP forwarder that copies bytes both ways
//! and does nothing else: no TLS, no SMTP, no limits, no logging.
//!
//! `benches/compare.sh` puts it on the proxies' core in front of the same sink and loads
//! it with plain SMTP sessions (`postern-bench --mode plain`, no AUTH). What it spends per
//! session and per MB is what this machine's kernel and tokio charge any user-space relay
//! for two loopback connections and the bytes through them. A TLS proxy pays that and the
//! crypto floor, and more: its clients also exchange STARTTLS, the TLS flights, a second
//! EHLO and AUTH, which the plain session does not have. So the two floors together give
//! a ceiling no TLS proxy on this machine can reach, and the goals are checked against it.
//!
//! ```text
//! cargo run --release -p postern-bench --bin postern-bench-forward -- --listen 127.0.0.1:2526 --to 127.0.0.1:2525
//! ```

use std::io::Write as _;
use std::net::SocketAddr;

use clap::Parser;
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Parser)]
#[command(about = "TCP forwarder for benchmarks: the cost of relaying bytes and nothing else")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:2526")]
    listen: SocketAddr,

    /// Address every connection is forwarded to.
    #[arg(long, value_name = "HOST:PORT")]
    to: SocketAddr,

    /// Read buffer each way, so also the largest write. tokio's default (8 KiB) for
    /// sessions of small commands; for bulk, the largest write loopback sends as one
    /// segment (65,483: its MSS with TCP timestamps), the cheapest measured. One octet
    /// more and each write leaves a tiny segment behind, which halves the MB per
    /// CPU-second. Each connection zeroes its two buffers, so a larger one costs short
    /// sessions a little.
    #[arg(long, default_value_t = 8 * 1024, value_name = "BYTES")]
    buffer: usize,
}

// One thread: the forwarder is pinned to one core, as the proxies are.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await?;
    // Tests and scripts read the address from this line (with --listen 127.0.0.1:0).
    println!(
        "postern-bench-forward listening on {}",
        listener.local_addr()?
    );
    std::io::stdout().flush()?;
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) => {
                // EMFILE and friends: say so, wait, and keep forwarding what is open.
                eprintln!("postern-bench-forward: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (to, buffer) = (args.to, args.buffer);
        tokio::spawn(async move {
            if let Err(e) = forward(client, to, buffer).await {
                eprintln!("postern-bench-forward: {e}");
            }
        });
    }
}

/// Connects to `to` and copies both ways until both sides have closed.
async fn forward(mut client: TcpStream, to: SocketAddr, buffer: usize) -> std::io::Result<()> {
    // As postern does on both of its sockets: every reply goes out when it is written.
    client.set_nodelay(true)?;
    let mut backend = TcpStream::connect(to).await?;
    backend.set_nodelay(true)?;
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut backend, buffer, buffer).await?;
    Ok(())
}
