//! The limits store (`--limits-store`): where counters that replicas share live, how long
//! one call may take (`--limits-store-timeout`), and what a replica does when the store
//! cannot answer (`--limits-store-failure`).
//!
//! `memory` keeps every counter in the process. A `redis://` (or `valkey://`) URL puts
//! them in Redis, where each check-and-reserve is one Lua script run atomically on the
//! server's clock, so replicas with skewed clocks agree. The users of the store (the
//! sending limits in `quota`, the AUTH failure windows in `limits::shared`) bring their
//! own scripts; this module owns the one connection they share, its timeouts and its
//! errors.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, ScriptInvocation};
use tokio::sync::OnceCell;

/// What to do when the limits store cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreFailure {
    /// Let mail through uncounted; AUTH falls back to this replica's own failure windows.
    Open,
    /// Refuse MAIL with 451 4.3.0 and AUTH with 454 4.7.0 until the store answers again.
    Closed,
}

/// Why the store did not answer.
#[derive(Debug)]
pub enum StoreError {
    Timeout,
    Redis(redis::RedisError),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Timeout => f.write_str("timed out"),
            StoreError::Redis(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// `--limits-store`, `--limits-store-failure` and `--limits-store-timeout`, validated.
#[derive(Debug, Clone)]
pub struct LimitsStore {
    /// `None` for `memory`: each process counts alone.
    pub redis: Option<Arc<Redis>>,
    pub failure: StoreFailure,
}

impl LimitsStore {
    /// Parses `--limits-store`: `memory`, or a `redis://` / `rediss://` /
    /// `redis+unix://` / `valkey://` URL. Nothing connects yet: Redis is dialled at
    /// first use (inside the runtime), and a store that is down at start-up is a failure
    /// like any other, handled by `failure`.
    pub fn open(
        spec: &str,
        failure: StoreFailure,
        timeout: Duration,
    ) -> Result<LimitsStore, String> {
        let redis = match spec {
            "memory" => None,
            url => Some(Arc::new(Redis::new(url, timeout)?)),
        };
        Ok(LimitsStore { redis, failure })
    }

    /// Every counter in this process.
    pub fn memory() -> LimitsStore {
        LimitsStore {
            redis: None,
            failure: StoreFailure::Open,
        }
    }
}

/// One multiplexed connection to Redis (or Valkey), shared by every user of the store.
pub struct Redis {
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
    timeout: Duration,
}

impl fmt::Debug for Redis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password: never printed.
        f.debug_struct("Redis")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Redis {
    fn new(url: &str, timeout: Duration) -> Result<Redis, String> {
        // Valkey speaks the same protocol; accept its scheme as an alias.
        let url = match url.strip_prefix("valkey://") {
            Some(rest) => format!("redis://{rest}"),
            None => url.to_owned(),
        };
        let client =
            redis::Client::open(url.as_str()).map_err(|e| format!("--limits-store: {e}"))?;
        Ok(Redis {
            client,
            connection: OnceCell::new(),
            timeout,
        })
    }

    /// Runs a script, bounded by the store timeout (dialling included), so no session
    /// waits longer than that for the store.
    ///
    /// After a [`StoreError::Timeout`] the script may still have run: callers must not
    /// undo on an error what the script would have done.
    pub async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let call = async {
            let mut connection = self.connection().await?;
            invocation
                .invoke_async(&mut connection)
                .await
                .map_err(StoreError::Redis)
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| StoreError::Timeout)?
    }

    /// The shared connection. The manager reconnects by itself after Redis restarts;
    /// each attempt is bounded by the store timeout.
    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        self.connection
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            })
            .await
            .cloned()
            .map_err(StoreError::Redis)
    }
}

/// A duration as the scripts take it: whole milliseconds, at least 1.
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// A private `redis-server` for the unit tests of the store's users.
#[cfg(test)]
pub(crate) mod test_server {
    use std::time::{Duration, Instant};

    /// A private `redis-server` on a free loopback port, saving nothing, killed on drop.
    pub struct RedisServer {
        pub port: u16,
        child: Option<std::process::Child>,
    }

    impl RedisServer {
        /// `None` (after a loud message) when redis-server is not installed, unless the
        /// `CI` variable is set: there a missing server is a failure, not a skip.
        pub async fn start() -> Option<RedisServer> {
            let Some(binary) = ["/usr/bin/redis-server", "/usr/sbin/redis-server"]
                .into_iter()
                .find(|p| std::path::Path::new(p).exists())
            else {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "redis-server is not installed, and CI is set"
                );
                eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
                return None;
            };
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap()
                .port();
            let child = std::process::Command::new(binary)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let server = RedisServer {
                port,
                child: Some(child),
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                assert!(Instant::now() < deadline, "redis-server did not start");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Some(server)
        }

        pub fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/0", self.port)
        }

        /// A plain connection for looking at what the scripts left.
        pub async fn inspect(&self) -> redis::aio::MultiplexedConnection {
            redis::Client::open(self.url())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap()
        }

        /// Kills the server (an outage); the port stays unused.
        pub fn stop(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_are_checked_up_front() {
        let open = |spec| LimitsStore::open(spec, StoreFailure::Open, Duration::from_secs(1));
        assert!(open("memory").unwrap().redis.is_none());
        assert!(open("redis://127.0.0.1:1/0").unwrap().redis.is_some());
        assert!(open("valkey://127.0.0.1:1").unwrap().redis.is_some());
        assert!(open("http://127.0.0.1").is_err());
    }

    #[test]
    fn a_store_never_prints_its_url() {
        let store = LimitsStore::open(
            "redis://:hunter2@127.0.0.1:1/0",
            StoreFailure::Closed,
            Duration::from_secs(1),
        )
        .unwrap();
        assert!(!format!("{store:?}").contains("hunter2"));
    }

    #[tokio::test]
    async fn an_unreachable_redis_fails_within_the_timeout() {
        // Port 1 on loopback refuses at once; the timeout bounds any other failure.
        let store = LimitsStore::open(
            "redis://127.0.0.1:1/0",
            StoreFailure::Open,
            Duration::from_millis(200),
        )
        .unwrap();
        let redis = store.redis.unwrap();
        let script = redis::Script::new("return 1");
        let started = std::time::Instant::now();
        let answer: Result<u8, _> = redis.invoke(&script.prepare_invoke()).await;
        assert!(answer.is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
