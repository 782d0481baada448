//! Stopping: who asks for it, and how every task hears that it has begun.
//!
//! The caller of [`crate::server::run`] owns the reasons to stop (`main` forwards
//! SIGTERM and SIGINT; the demo and tests stop it by hand) and hands the server a
//! [`StopRequests`]. The first request starts the drain, which the server announces on a
//! [`Drain`]: every session holds a [`Shutdown`] and answers `421` before AUTH once it
//! fires. A second request ends the drain at once.

use tokio::sync::{mpsc, watch};

/// Sends stop requests to a running server.
#[derive(Clone)]
pub struct StopHandle(mpsc::UnboundedSender<()>);

impl StopHandle {
    /// Asks the server to stop: the first request drains, the second ends the drain.
    pub fn stop(&self) {
        let _ = self.0.send(());
    }
}

/// The server's side of [`StopHandle`]s.
pub struct StopRequests(mpsc::UnboundedReceiver<()>);

/// A pair to stop a server by hand.
pub fn channel() -> (StopHandle, StopRequests) {
    let (tx, rx) = mpsc::unbounded_channel();
    (StopHandle(tx), StopRequests(rx))
}

impl StopRequests {
    /// Resolves at the next request. Once every [`StopHandle`] is gone nobody can ask any
    /// more, and a server nobody can stop is a leak: that counts as a request too.
    pub async fn next(&mut self) {
        let _ = self.0.recv().await;
    }
}

/// Stop requests from SIGTERM and SIGINT, for the `postern` binary.
pub fn os_signals() -> Result<StopRequests, String> {
    let (handle, requests) = channel();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())
            .map_err(|e| format!("installing SIGTERM handler: {e}"))?;
        let mut int = signal(SignalKind::interrupt())
            .map_err(|e| format!("installing SIGINT handler: {e}"))?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                handle.stop();
            }
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            handle.stop();
        }
    });
    Ok(requests)
}

/// Announces the drain to every [`Shutdown`].
pub struct Drain(watch::Sender<bool>);

impl Drain {
    pub fn new() -> Drain {
        Drain(watch::channel(false).0)
    }

    /// A receiver for one more task.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }

    /// Tells every [`Shutdown`] that the drain has begun.
    pub fn begin(&self) {
        self.0.send_replace(true);
    }
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new()
    }
}

/// Hears that the drain has begun.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Resolves once the drain has begun (at once if it already has). A dropped
    /// [`Drain`] means the server is gone, which is a drain too.
    pub async fn stopping(&mut self) {
        let _ = self.0.wait_for(|stopping| *stopping).await;
    }

    /// Whether the drain has begun.
    pub fn is_stopping(&self) -> bool {
        *self.0.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_drain_reaches_every_subscriber_even_late_ones() {
        let drain = Drain::new();
        let mut early = drain.subscribe();
        assert!(!early.is_stopping());
        drain.begin();
        let mut late = drain.subscribe();
        tokio::time::timeout(Duration::from_secs(1), async {
            early.stopping().await;
            late.stopping().await;
        })
        .await
        .expect("stopping resolves after begin");
        assert!(late.is_stopping());
    }

    #[tokio::test]
    async fn stop_requests_come_one_by_one_and_a_dropped_handle_counts() {
        let (handle, mut requests) = channel();
        handle.stop();
        handle.stop();
        requests.next().await;
        requests.next().await;
        let pending = tokio::time::timeout(Duration::from_millis(50), requests.next()).await;
        assert!(pending.is_err(), "no third request yet");
        drop(handle);
        tokio::time::timeout(Duration::from_secs(1), requests.next())
            .await
            .expect("a server nobody can stop any more stops");
    }
}
