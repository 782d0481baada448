//! Accept loops: one task per bound address, one task per connection.

use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{error, info};

use std::net::SocketAddr;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tracing::warn;

use crate::conn::{self, ClientAddrs, Services};
use crate::limits::{NetGrouping, OverLimit, PerNetSlots};
use crate::metrics;
use crate::proxy_proto;
use crate::session::ListenerKind;
use crate::shutdown::Shutdown;
use crate::smtp::{Reply, canned};

/// Pending connections the kernel may queue before postern accepts them (capped by
/// `net.core.somaxconn`). tokio's default of 1024 overflowed under a burst of 1000 TLS
/// clients: the kernel then answered with SYN cookies, dropped the final ACK, and SMTP
/// clients, which wait for the server to speak first, hung waiting for a greeting.
const BACKLOG: u32 = 4096;

/// Binds a listening socket with `BACKLOG`.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std's TcpListener::bind does: a restart must not wait for TIME_WAIT to clear.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Who may connect, and how many at once: the limits applied before a session starts.
pub struct ConnectionLimits {
    /// Connections across all listeners (`--max-connections`); a drain waits for all
    /// of its permits.
    pub total: Arc<Semaphore>,
    /// Connections per client network and per wide IPv6 prefix.
    pub per_net: Arc<PerNetSlots>,
    /// How client addresses group into networks.
    pub grouping: NetGrouping,
    /// Refused connections still waiting for their 421 (see [`MAX_PENDING_REFUSALS`]).
    pub refusals: Arc<Semaphore>,
    /// `Some` with `--proxy-protocol`: the networks whose PROXY headers are believed.
    pub proxy_protocol_from: Option<Vec<IpNet>>,
}

/// Accepts connections until shutdown, spawning a [`conn::serve`] task for each.
/// `limits.total` bounds connections across all listeners; over the bound a client gets
/// `421 4.7.0` before any greeting.
pub async fn accept_loop(
    listener: TcpListener,
    kind: ListenerKind,
    limits: Arc<ConnectionLimits>,
    services: Arc<Services>,
    mut shutdown: Shutdown,
) {
    let mut backoff = Duration::from_millis(5);
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, listener = kind.label(), "listening");
    }
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.stopping() => return,
        };
        let (mut tcp, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(5);
                pair
            }
            Err(error) => {
                error!(%error, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = limits.total.clone().try_acquire_owned() else {
            refuse(
                tcp,
                metrics::label::reject_reason::MAX_CONNECTIONS,
                &limits.refusals,
            );
            continue;
        };
        let (limits, services) = (limits.clone(), services.clone());
        tokio::spawn(async move {
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            let Some(addrs) = client_addrs(&mut tcp, peer, &limits).await else {
                return;
            };
            let ip = addrs.client.ip();
            let net_slot = match limits
                .per_net
                .try_acquire(limits.grouping.net(ip), limits.grouping.wide(ip))
            {
                Ok(slot) => slot,
                Err(over) => {
                    let reason = match over {
                        OverLimit::Net => metrics::label::reject_reason::MAX_CONNECTIONS_PER_IP,
                        OverLimit::Wide => {
                            metrics::label::reject_reason::MAX_CONNECTIONS_PER_WIDE_PREFIX
                        }
                    };
                    refuse(tcp, reason, &limits.refusals);
                    return;
                }
            };
            conn::serve(tcp, addrs, kind, services).await;
            drop((permit, net_slot));
        });
    }
}

/// Who the client is: the TCP peer, or with `--proxy-protocol` the source in the
/// header a trusted load balancer sent. `None` means the connection was closed.
async fn client_addrs(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    limits: &ConnectionLimits,
) -> Option<ClientAddrs> {
    let local = tcp.local_addr().ok()?;
    let Some(trusted) = &limits.proxy_protocol_from else {
        return Some(ClientAddrs {
            client: peer,
            local,
        });
    };
    // Exim CVE-2023-42117 class: a PROXY header is only believed from listed sources.
    if !trusted.iter().any(|net| net.contains(&peer.ip())) {
        metrics::connection_rejected(metrics::label::reject_reason::PROXY_UNTRUSTED);
        warn!(%peer, "PROXY protocol expected from a listed load balancer only; closing");
        return None;
    }
    match tokio::time::timeout(PROXY_HEADER_TIMEOUT, read_proxy_header(tcp)).await {
        Ok(Some(proxy_proto::Header::Proxied {
            source,
            destination,
        })) => Some(ClientAddrs {
            client: SocketAddr::new(source.ip().to_canonical(), source.port()),
            local: destination,
        }),
        Ok(Some(proxy_proto::Header::Local)) => Some(ClientAddrs {
            client: peer,
            local,
        }),
        Ok(None) | Err(_) => {
            metrics::connection_rejected(metrics::label::reject_reason::PROXY_INVALID);
            warn!(%peer, "missing, malformed or slow PROXY header; closing without a greeting");
            None
        }
    }
}

/// Reads exactly the PROXY header, never a byte of what follows (which may be a TLS
/// ClientHello that rustls must see).
async fn read_proxy_header(tcp: &mut TcpStream) -> Option<proxy_proto::Header> {
    let mut buf = Vec::with_capacity(proxy_proto::MAX_V1);
    loop {
        match proxy_proto::frame(&buf) {
            proxy_proto::Framing::NeedMore { upto } => {
                let have = buf.len();
                buf.resize(upto, 0);
                tcp.read_exact(&mut buf[have..]).await.ok()?;
            }
            proxy_proto::Framing::Complete { len } => return proxy_proto::decode(&buf[..len]),
            proxy_proto::Framing::Invalid => return None,
        }
    }
}

/// How long a load balancer may take to send the PROXY header.
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a refused client gets to read its 421.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Most refused connections that wait for their 421 at once. Each holds a task and a
/// socket for up to `REFUSAL_WRITE_TIMEOUT`, so a flood of clients that never read
/// must not grow them without bound; past this many, a refused connection is closed at
/// once without a reply (the client sees a reset or EOF, and retries as after a 421).
pub const MAX_PENDING_REFUSALS: usize = 256;

/// Answers `421 4.7.0` before any greeting (RFC 5321 §3.1 allows a 421 opening) and
/// closes, off the accept loop so a slow reader cannot stall accepting. With
/// [`MAX_PENDING_REFUSALS`] already waiting (`pending` has no permit left), closes
/// without the 421.
fn refuse(mut tcp: TcpStream, reason: &'static str, pending: &Arc<Semaphore>) {
    metrics::connection_rejected(reason);
    let Ok(permit) = pending.clone().try_acquire_owned() else {
        drop(tcp);
        return;
    };
    tokio::spawn(async move {
        let mut out = Vec::new();
        Reply::from(canned::TOO_MANY_CONNECTIONS).encode(&mut out);
        let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, tcp.write_all(&out)).await;
        drop(permit);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A connected pair: the client end and the accepted server end.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    async fn read_all(mut client: TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got)).await;
        got
    }

    #[tokio::test]
    async fn refusals_past_the_bound_are_closed_without_a_421() {
        let pending = Arc::new(Semaphore::new(MAX_PENDING_REFUSALS));
        // Every slot taken, as by clients that never read their 421.
        let held = pending
            .clone()
            .acquire_many_owned(MAX_PENDING_REFUSALS as u32)
            .await
            .unwrap();
        let (client, server) = pair().await;
        refuse(server, "max_connections", &pending);
        assert_eq!(read_all(client).await, b"");

        // A slot frees: the next refused client gets its 421 again, and the slot back.
        drop(held);
        let (client, server) = pair().await;
        refuse(server, "max_connections", &pending);
        assert!(read_all(client).await.starts_with(b"421 4.7.0"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(pending.available_permits(), MAX_PENDING_REFUSALS);
    }
}
