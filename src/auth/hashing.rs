//! The threads password hashes run on: their own, at a lower CPU priority than the
//! threads that serve sessions.
//!
//! A KDF costs about 100 ms of CPU, and a flood of wrong passwords from many networks
//! makes every one of them run (the failure windows only stop a flood that repeats a
//! network or a name). On tokio's blocking pool those hashes compete with the runtime
//! as equals, and on a small machine they halved the rate of every other session,
//! handshakes and relayed mail included. At nice [`HASHING_NICE`] the scheduler gives
//! them what the runtime leaves, and about a tenth of a core when it leaves nothing:
//! a login with a hashed password then waits longer on a saturated machine, and the
//! verifier pool's queue bounds how long.
//!
//! The threads belong to a runtime of their own (tokio's blocking pool, started on
//! demand and ended when idle), kept for the life of the process: a `Runtime` must not
//! be dropped inside async code, and the pool is as long-lived as tokio's own.

use std::sync::OnceLock;

use tokio::runtime::{Builder, Runtime};
use tokio::task::JoinError;

/// The nice value of a hashing thread (0 is the runtime's, 19 the lowest). At 10 the
/// scheduler weighs a hash at about a tenth of a session thread.
pub const HASHING_NICE: i32 = 10;

/// Threads at most; the verifier pool admits far fewer hashes at once.
const MAX_THREADS: usize = 64;

static HASHING: OnceLock<Option<Runtime>> = OnceLock::new();

/// Runs `hash` on a hashing thread and waits for it without blocking the runtime.
pub async fn run<F, R>(hash: F) -> Result<R, JoinError>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    match HASHING.get_or_init(build) {
        Some(runtime) => runtime.spawn_blocking(hash).await,
        // Could not start threads of our own: the shared blocking pool still works.
        None => tokio::task::spawn_blocking(hash).await,
    }
}

fn build() -> Option<Runtime> {
    Builder::new_current_thread()
        .thread_name("postern-hash")
        .max_blocking_threads(MAX_THREADS)
        .on_thread_start(lower_priority)
        .build()
        .map_err(
            |error| tracing::warn!(%error, "no hashing threads; hashes share the blocking pool"),
        )
        .ok()
}

/// Lowers the calling thread only: Linux keeps a nice value per thread. Failing leaves
/// the thread as it was, which is only less fair under a flood.
fn lower_priority() {
    let thread = rustix::thread::gettid();
    if let Err(error) = rustix::process::setpriority_process(Some(thread), HASHING_NICE) {
        tracing::debug!(%error, "could not lower a hashing thread's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_run_on_their_own_threads_at_a_lower_priority() {
        let (name, nice) = run(|| {
            let thread = rustix::thread::gettid();
            (
                std::thread::current().name().map(str::to_owned),
                rustix::process::getpriority_process(Some(thread)),
            )
        })
        .await
        .expect("the hash ran");
        assert_eq!(name.as_deref(), Some("postern-hash"));
        assert_eq!(nice.ok(), Some(HASHING_NICE));
    }

    #[tokio::test]
    async fn a_panicking_hash_is_an_error_not_a_panic_here() {
        let outcome = run(|| -> u32 { panic!("bad hash") }).await;
        assert!(outcome.is_err());
        assert_eq!(run(|| 7).await.ok(), Some(7));
    }
}
