//! Per-user sending limits: messages and recipients per sliding window, counted as the
//! backend accepts them, kept in memory or in Redis/Valkey so replicas share them.
//!
//! The relay ([`crate::relay`]) asks for a user's [`Usage`] at each MAIL and records
//! what the backend accepted; the decision itself (451 4.7.1, RFC 3463 "delivery not
//! authorized") is the tracker's. A window is estimated from two fixed windows, the
//! previous one weighted by how much of it still overlaps (the same estimate as the
//! AUTH-failure table in [`crate::limits`]), so each user costs two counters per limit.
//!
//! In Redis one Lua script reads and adds atomically, on the server's clock, so
//! replicas with skewed clocks agree. Every call has a short timeout; when the store
//! cannot answer, `--limits-store-failure open` lets mail through uncounted (the
//! default: limits are abuse control, and the backend keeps working without Redis),
//! `closed` answers MAIL with `451 4.3.0` until the store is back.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

use crate::limits::FailureWindow;
use crate::relay::tracker::{Limits, Usage};

/// `N/DURATION`, e.g. `100/1h`: at most N per sliding window of DURATION.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub window: Duration,
}

impl Rate {
    /// Parses `N/DURATION` (humantime durations: `30m`, `1h`, `1day`), for clap.
    pub fn parse(text: &str) -> Result<Rate, String> {
        let (count, window) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?}: expected N/DURATION, e.g. 100/1h"))?;
        let count: u64 = count
            .trim()
            .parse()
            .map_err(|e| format!("{text:?}: count: {e}"))?;
        let window = humantime::parse_duration(window.trim())
            .map_err(|e| format!("{text:?}: window: {e}"))?;
        if count == 0 {
            return Err(format!("{text:?}: the count must be at least 1"));
        }
        if window < Duration::from_secs(1) {
            return Err(format!("{text:?}: the window must be at least 1s"));
        }
        Ok(Rate { count, window })
    }
}

/// What to do when the limits store cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreFailure {
    /// Let mail through uncounted.
    Open,
    /// Refuse MAIL with 451 4.3.0 until the store answers again.
    Closed,
}

/// The window used for a limit that is not set: its counter is still kept, cheaply,
/// so turning the limit on later starts from real numbers.
const DEFAULT_WINDOW: Duration = Duration::from_secs(3600);

/// The `--max-*-per-*` and `--limits-store*` settings.
#[derive(Debug, Clone)]
pub struct QuotaConfig {
    pub messages_per_user: Option<Rate>,
    pub recipients_per_user: Option<Rate>,
    pub recipients_per_message: Option<u32>,
    /// `memory`, or a `redis://` / `rediss://` / `redis+unix://` / `valkey://` URL.
    pub store: String,
    pub failure: StoreFailure,
    pub timeout: Duration,
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

/// The per-user limits and where their counters live.
pub struct Quota {
    limits: Limits,
    message_window: Duration,
    recipient_window: Duration,
    failure: StoreFailure,
    timeout: Duration,
    store: Store,
}

enum Store {
    /// Per process. Keys are hashed user names, so the table's memory is bounded by
    /// [`crate::limits::MAX_TRACKED`] entries whatever the names.
    Memory {
        hasher: RandomState,
        messages: FailureWindow<u64>,
        recipients: FailureWindow<u64>,
    },
    Redis(RedisStore),
}

impl fmt::Debug for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quota")
            .field("limits", &self.limits)
            .field("failure", &self.failure)
            .field(
                "store",
                &match self.store {
                    Store::Memory { .. } => "memory",
                    Store::Redis(_) => "redis",
                },
            )
            .finish()
    }
}

impl Quota {
    /// Validates the configuration. Nothing connects yet: Redis is dialled at first use
    /// (inside the runtime), and a store that is down at start-up is a failure like any
    /// other, handled by the failure mode.
    pub fn new(config: &QuotaConfig) -> Result<Quota, String> {
        let limits = Limits {
            messages_per_user: config.messages_per_user.map(|r| r.count),
            recipients_per_user: config.recipients_per_user.map(|r| r.count),
            recipients_per_message: config.recipients_per_message,
        };
        let message_window = config
            .messages_per_user
            .map_or(DEFAULT_WINDOW, |r| r.window);
        let recipient_window = config
            .recipients_per_user
            .map_or(DEFAULT_WINDOW, |r| r.window);
        let store = if config.store == "memory" {
            Store::Memory {
                hasher: RandomState::new(),
                messages: FailureWindow::new(u32::MAX, message_window),
                recipients: FailureWindow::new(u32::MAX, recipient_window),
            }
        } else {
            Store::Redis(RedisStore::new(&config.store, config.timeout)?)
        };
        Ok(Quota {
            limits,
            message_window,
            recipient_window,
            failure: config.failure,
            timeout: config.timeout,
            store,
        })
    }

    /// No limits: nothing is stored or looked up.
    pub fn unlimited() -> Quota {
        Quota {
            limits: Limits::default(),
            message_window: DEFAULT_WINDOW,
            recipient_window: DEFAULT_WINDOW,
            failure: StoreFailure::Open,
            timeout: Duration::from_millis(250),
            store: Store::Memory {
                hasher: RandomState::new(),
                messages: FailureWindow::new(u32::MAX, DEFAULT_WINDOW),
                recipients: FailureWindow::new(u32::MAX, DEFAULT_WINDOW),
            },
        }
    }

    /// The limits the tracker enforces.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn failure(&self) -> StoreFailure {
        self.failure
    }

    /// Whether any per-user limit is set, i.e. whether the store is used at all.
    pub fn per_user(&self) -> bool {
        self.limits.messages_per_user.is_some() || self.limits.recipients_per_user.is_some()
    }

    /// The user's messages and recipients in the current windows.
    pub async fn usage(&self, user: &str) -> Result<Usage, StoreError> {
        self.update(user, 0, 0).await
    }

    /// Adds what the backend accepted for `user`.
    pub async fn record(
        &self,
        user: &str,
        messages: u32,
        recipients: u32,
    ) -> Result<(), StoreError> {
        self.update(user, messages, recipients).await.map(|_| ())
    }

    async fn update(
        &self,
        user: &str,
        messages: u32,
        recipients: u32,
    ) -> Result<Usage, StoreError> {
        match &self.store {
            Store::Memory {
                hasher,
                messages: message_table,
                recipients: recipient_table,
            } => {
                let key = hasher.hash_one(user);
                let now = Instant::now();
                if messages > 0 {
                    message_table.add(key, messages, now);
                }
                if recipients > 0 {
                    recipient_table.add(key, recipients, now);
                }
                Ok(Usage {
                    messages: message_table.count(&key, now),
                    recipients: recipient_table.count(&key, now),
                })
            }
            Store::Redis(redis) => {
                let call = redis.update(
                    user,
                    [self.message_window, self.recipient_window],
                    [messages, recipients],
                );
                tokio::time::timeout(self.timeout, call)
                    .await
                    .map_err(|_| StoreError::Timeout)?
            }
        }
    }
}

/// Reads both counters of a user, after adding to them, in one atomic step on the
/// server's clock. KEYS: the message and recipient key prefixes. ARGV: both windows in
/// milliseconds, then the amounts to add. Returns the two window estimates.
const UPDATE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local result = {}
for i = 1, 2 do
  local window = tonumber(ARGV[i])
  local add = tonumber(ARGV[i + 2])
  local index = math.floor(now / window)
  local current_key = KEYS[i] .. ':' .. index
  local current
  if add > 0 then
    current = redis.call('INCRBY', current_key, add)
    redis.call('PEXPIRE', current_key, 2 * window)
  else
    current = tonumber(redis.call('GET', current_key) or '0')
  end
  local previous = tonumber(redis.call('GET', KEYS[i] .. ':' .. (index - 1)) or '0')
  local overlap = 1 - (now % window) / window
  result[i] = math.floor(current + previous * overlap)
end
return result
";

struct RedisStore {
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
    script: redis::Script,
    timeout: Duration,
}

impl RedisStore {
    fn new(url: &str, timeout: Duration) -> Result<RedisStore, String> {
        // Valkey speaks the same protocol; accept its scheme as an alias.
        let url = match url.strip_prefix("valkey://") {
            Some(rest) => format!("redis://{rest}"),
            None => url.to_owned(),
        };
        let client =
            redis::Client::open(url.as_str()).map_err(|e| format!("--limits-store: {e}"))?;
        Ok(RedisStore {
            client,
            connection: OnceCell::new(),
            script: redis::Script::new(UPDATE_SCRIPT),
            timeout,
        })
    }

    /// The shared connection. The manager reconnects by itself after Redis restarts;
    /// each attempt is bounded by the store timeout, so no session waits longer.
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

    async fn update(
        &self,
        user: &str,
        windows: [Duration; 2],
        add: [u32; 2],
    ) -> Result<Usage, StoreError> {
        let mut connection = self.connection().await?;
        // The hash tag keeps a user's keys in one slot of a Redis Cluster.
        let (messages, recipients): (u64, u64) = self
            .script
            .key(format!("postern:limits:{{{user}}}:messages"))
            .key(format!("postern:limits:{{{user}}}:recipients"))
            .arg(millis(windows[0]))
            .arg(millis(windows[1]))
            .arg(add[0])
            .arg(add[1])
            .invoke_async(&mut connection)
            .await
            .map_err(StoreError::Redis)?;
        Ok(Usage {
            messages,
            recipients,
        })
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_humantime_windows() {
        assert_eq!(
            Rate::parse("100/1h"),
            Ok(Rate {
                count: 100,
                window: Duration::from_secs(3600)
            })
        );
        assert_eq!(
            Rate::parse("5 / 30m").map(|r| r.window),
            Ok(Duration::from_secs(1800))
        );
        for bad in [
            "100",
            "0/1h",
            "x/1h",
            "10/",
            "10/0s",
            "10/500ms",
            "10/forever",
        ] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    fn config(store: &str) -> QuotaConfig {
        QuotaConfig {
            messages_per_user: Some(Rate {
                count: 2,
                window: Duration::from_secs(60),
            }),
            recipients_per_user: None,
            recipients_per_message: Some(3),
            store: store.into(),
            failure: StoreFailure::Open,
            timeout: Duration::from_millis(200),
        }
    }

    #[tokio::test]
    async fn the_memory_store_counts_per_user() {
        let quota = Quota::new(&config("memory")).unwrap();
        assert!(quota.per_user());
        assert_eq!(quota.limits().messages_per_user, Some(2));
        assert_eq!(quota.limits().recipients_per_message, Some(3));
        quota.record("alice", 1, 3).await.unwrap();
        quota.record("alice", 1, 1).await.unwrap();
        assert_eq!(
            quota.usage("alice").await.unwrap(),
            Usage {
                messages: 2,
                recipients: 4
            }
        );
        assert_eq!(quota.usage("bob").await.unwrap(), Usage::default());
    }

    #[test]
    fn store_urls_are_checked_up_front() {
        assert!(Quota::new(&config("redis://127.0.0.1:1/0")).is_ok());
        assert!(Quota::new(&config("valkey://127.0.0.1:1")).is_ok());
        assert!(Quota::new(&config("http://127.0.0.1")).is_err());
    }

    #[tokio::test]
    async fn an_unreachable_redis_fails_within_the_timeout() {
        // Port 1 on loopback refuses at once; the timeout bounds any other failure.
        let quota = Quota::new(&config("redis://127.0.0.1:1/0")).unwrap();
        let started = Instant::now();
        assert!(quota.usage("alice").await.is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
