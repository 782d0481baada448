//! The post-AUTH splice: bytes are copied verbatim both ways, counted as they flow, and
//! a half-close on one side is passed on to the other.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::metrics::{Direction, bytes_counter};

pub mod tracker;

/// Large enough that bulk DATA moves in few syscalls and TLS records are full.
const BUFFER_SIZE: usize = 64 * 1024;

/// Bytes moved each way, for the session log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayStats {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

/// How the relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both sides closed their write halves.
    Closed,
    /// Nothing moved for the idle timeout.
    Idle,
    Error(io::Error),
}

/// Copies `client_pending` to the backend and `backend_pending` to the client, then
/// everything else both ways until both sides are done or nothing moves for `idle`.
pub async fn relay<C, B>(
    client: C,
    backend: B,
    client_pending: &[u8],
    backend_pending: &[u8],
    idle: Duration,
) -> (RelayStats, RelayEnd)
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(Activity::new());
    let mut client = Metered::new(
        client,
        bytes_counter(Direction::ClientToBackend),
        activity.clone(),
    );
    let mut backend = Metered::new(
        backend,
        bytes_counter(Direction::BackendToClient),
        activity.clone(),
    );
    let mut stats = RelayStats::default();

    let flush_pending = async {
        if !client_pending.is_empty() {
            backend.inner.write_all(client_pending).await?;
            client.count(client_pending.len());
        }
        if !backend_pending.is_empty() {
            client.inner.write_all(backend_pending).await?;
            backend.count(backend_pending.len());
        }
        io::Result::Ok(())
    };
    if let Err(error) = flush_pending.await {
        return (stats, RelayEnd::Error(error));
    }

    let end = tokio::select! {
        result = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut backend, BUFFER_SIZE, BUFFER_SIZE) => match result {
            Ok(_) => RelayEnd::Closed,
            // Clients commonly drop TCP right after QUIT, without a TLS close_notify or
            // before ours arrives. The backend decides what was delivered, so an abrupt
            // close loses nothing that a clean one would keep.
            Err(error) if matches!(
                error.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ) => RelayEnd::Closed,
            Err(error) => RelayEnd::Error(error),
        },
        () = activity.idle_for(idle) => RelayEnd::Idle,
    };
    stats.client_to_backend = client.bytes_read;
    stats.backend_to_client = backend.bytes_read;
    (stats, end)
}

/// The last time any byte moved.
struct Activity {
    origin: Instant,
    last_millis: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            origin: Instant::now(),
            last_millis: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let millis = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_millis.store(millis, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `idle`. Wakes once per idle period, not per byte.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last =
                self.origin + Duration::from_millis(self.last_millis.load(Ordering::Relaxed));
            tokio::time::sleep_until(last + idle).await;
            let now_last =
                self.origin + Duration::from_millis(self.last_millis.load(Ordering::Relaxed));
            if now_last == last {
                return;
            }
        }
    }
}

/// Counts bytes read from a stream into a live counter, so `/metrics` shows traffic of
/// sessions that are still open (the linkerd `SensorIo` idea).
struct Metered<T> {
    inner: T,
    counter: Counter,
    activity: Arc<Activity>,
    bytes_read: u64,
}

impl<T> Metered<T> {
    fn new(inner: T, counter: Counter, activity: Arc<Activity>) -> Self {
        Metered {
            inner,
            counter,
            activity,
            bytes_read: 0,
        }
    }

    fn count(&mut self, n: usize) {
        let n = n as u64;
        self.bytes_read += n;
        self.counter.increment(n);
        self.activity.touch();
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.count(n);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, duplex};

    #[tokio::test]
    async fn pending_bytes_go_first_then_everything_verbatim_and_half_closes_propagate() {
        let (client, mut client_peer) = duplex(1024);
        let (backend, mut backend_peer) = duplex(1024);
        let task = tokio::spawn(async move {
            relay(
                client,
                backend,
                b"MAIL FROM:<a>\r\n",
                b"",
                Duration::from_secs(5),
            )
            .await
        });
        client_peer
            .write_all(b"RCPT TO:<b>\r\n\xff.\n\r\n")
            .await
            .unwrap();
        client_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\n\xff.\n\r\n");

        backend_peer.write_all(b"250 ok\r\n").await.unwrap();
        backend_peer.shutdown().await.unwrap();
        let mut back = Vec::new();
        client_peer.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"250 ok\r\n");

        let (stats, end) = task.await.unwrap();
        assert!(matches!(end, RelayEnd::Closed), "{end:?}");
        assert_eq!(stats.client_to_backend, 15 + 18);
        assert_eq!(stats.backend_to_client, 8);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_relay_ends() {
        let (client, _client_peer) = duplex(64);
        let (backend, _backend_peer) = duplex(64);
        let (_, end) = relay(client, backend, b"", b"", Duration::from_secs(600)).await;
        assert!(matches!(end, RelayEnd::Idle), "{end:?}");
    }
}
