//! Accept loops: one task per bound address, one task per connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{error, info};

use crate::conn;
use crate::limits::ClientNet;
use crate::metrics;
use crate::server::Shared;
use crate::session::ListenerKind;
use crate::smtp::{Reply, canned};

/// Accepts connections until shutdown, spawning a [`conn::serve`] task for each.
/// `slots` bounds connections across all listeners; over the bound a client gets
/// `421 4.7.0` before any greeting.
pub async fn accept_loop(
    listener: TcpListener,
    kind: ListenerKind,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
) {
    let mut shutdown = shared.shutdown.clone();
    let mut backoff = Duration::from_millis(5);
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, listener = kind.label(), "listening");
    }
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = crate::server::stopping(&mut shutdown) => return,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(5);
                pair
            }
            Err(error) => {
                // EMFILE and friends: wait for connections to close instead of spinning.
                error!(%error, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            refuse(tcp, "max_connections");
            continue;
        };
        let Some(net_slot) = shared.per_net.try_acquire(ClientNet::from(peer.ip())) else {
            refuse(tcp, "max_connections_per_ip");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            conn::serve(tcp, peer, kind, shared).await;
            drop((permit, net_slot));
        });
    }
}

/// How long a refused client gets to read its 421.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers `421 4.7.0` before any greeting (RFC 5321 §3.1 allows a 421 opening) and
/// closes, off the accept loop so a slow reader cannot stall accepting.
fn refuse(mut tcp: tokio::net::TcpStream, reason: &'static str) {
    metrics::connection_rejected(reason);
    tokio::spawn(async move {
        let mut out = Vec::new();
        Reply::from(canned::TOO_MANY_CONNECTIONS).encode(&mut out);
        let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, tcp.write_all(&out)).await;
    });
}
