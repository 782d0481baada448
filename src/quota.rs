//! Per-user sending limits: messages and recipients per sliding window, kept in memory
//! or in Redis/Valkey so replicas share them.
//!
//! A limit is reserved, not read: [`Quota::reserve`] checks and takes the slots of a
//! MAIL or RCPT in one atomic step, and [`Quota::release`] gives them back when the
//! backend refuses the command, on RSET, or when the message is rejected. Reading the
//! usage at MAIL and recording it after the backend accepted let parallel sessions of
//! one user all see the same free slot (issue 11: eight sessions got 30 recipients
//! through a limit of 10). [`Quota::usage`] and [`Quota::record`] remain for the relay
//! until it moves to reservations; the refusal itself (451 4.7.1, RFC 3463 "delivery
//! not authorized") is the tracker's. A window is estimated from two fixed windows, the
//! previous one weighted by how much of it still overlaps (the same estimate as the
//! AUTH-failure table in [`crate::limits`]), so each user costs two counters per limit.
//!
//! In memory one lock covers each check-and-add. In Redis (the [`crate::store`]
//! connection) one Lua script per call checks and adds atomically, on the server's
//! clock, so replicas with skewed clocks agree. Every call has a short timeout; when the
//! store cannot answer, `--limits-store-failure open` lets mail through uncounted (the
//! default: limits are abuse control, and the backend keeps working without Redis),
//! `closed` answers MAIL with `451 4.3.0` until the store is back.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::limits::MAX_TRACKED;
use crate::store::{self, LimitsStore, StoreError, StoreFailure, millis};

/// What a session is allowed to send. The relay's rules enforce the per-message one
/// and ask this store for the per-user ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub messages_per_user: Option<u64>,
    pub recipients_per_user: Option<u64>,
    pub recipients_per_message: Option<u32>,
}

/// A user's sending so far, as the limits store estimates it for the current window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub messages: u64,
    pub recipients: u64,
}

/// Which sending limit refused a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    MessagesPerUser,
    RecipientsPerUser,
    RecipientsPerMessage,
    /// The store was unavailable and the failure mode is closed.
    StoreUnavailable,
}

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Limit::MessagesPerUser => crate::metrics::label::limit::MESSAGES_PER_USER,
            Limit::RecipientsPerUser => crate::metrics::label::limit::RECIPIENTS_PER_USER,
            Limit::RecipientsPerMessage => crate::metrics::label::limit::RECIPIENTS_PER_MESSAGE,
            Limit::StoreUnavailable => crate::metrics::label::limit::STORE_UNAVAILABLE,
        }
    }
}

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

/// The window used for a limit that is not set: its counter is still kept, cheaply,
/// so turning the limit on later starts from real numbers.
const DEFAULT_WINDOW: Duration = Duration::from_secs(3600);

/// The `--max-*-per-*` settings and the `--limits-store*` ones.
#[derive(Debug, Clone)]
pub struct QuotaConfig {
    pub messages_per_user: Option<Rate>,
    pub recipients_per_user: Option<Rate>,
    pub recipients_per_message: Option<u32>,
    pub store: LimitsStore,
}

/// The per-user limits and where their counters live.
pub struct Quota {
    limits: Limits,
    message_window: Duration,
    recipient_window: Duration,
    failure: StoreFailure,
    store: Store,
}

/// The outcome of a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    Granted,
    /// Nothing was taken: this limit would be exceeded.
    Refused(Limit),
}

/// The per-user limits in the order the stores keep them: messages first, so a
/// reservation that would exceed both is refused for its messages.
const PER_USER: [Limit; 2] = [Limit::MessagesPerUser, Limit::RecipientsPerUser];

enum Store {
    /// Per process.
    Memory(MemoryTable),
    /// Boxed: three scripts make it several times the memory table's size.
    Redis(Box<RedisStore>),
}

impl fmt::Debug for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quota")
            .field("limits", &self.limits)
            .field("failure", &self.failure)
            .field(
                "store",
                &match self.store {
                    Store::Memory(_) => "memory",
                    Store::Redis(_) => "redis",
                },
            )
            .finish()
    }
}

impl Quota {
    /// The limits of `config`, counted in its store (which dials Redis at first use).
    pub fn new(config: &QuotaConfig) -> Quota {
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
        let store = match &config.store.redis {
            None => Store::Memory(MemoryTable::new([message_window, recipient_window])),
            Some(redis) => Store::Redis(Box::new(RedisStore::new(redis.clone()))),
        };
        Quota {
            limits,
            message_window,
            recipient_window,
            failure: config.store.failure,
            store,
        }
    }

    /// No limits: nothing is stored or looked up.
    pub fn unlimited() -> Quota {
        Quota {
            limits: Limits::default(),
            message_window: DEFAULT_WINDOW,
            recipient_window: DEFAULT_WINDOW,
            failure: StoreFailure::Open,
            store: Store::Memory(MemoryTable::new([DEFAULT_WINDOW; 2])),
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

    /// Atomically: if for every configured per-user limit the window estimate plus what
    /// is asked stays within the limit, adds it all and returns `Granted`; otherwise adds
    /// nothing and returns `Refused` with the first limit that would be exceeded
    /// (messages are checked first). Amounts for a limit that is not configured are
    /// still counted but never refuse.
    ///
    /// A limit for which nothing is asked is not checked: a RCPT (`reserve(user, 0, 1)`)
    /// in a message whose MAIL was granted must not be refused because the message
    /// count is at or, after a lowered limit, over its limit.
    ///
    /// Checking and adding in one step is what keeps N parallel sessions of one user
    /// from all reading "one slot left" and all taking it.
    ///
    /// After a [`StoreError::Timeout`] the script may still have run in Redis. Do not
    /// release on an error: the slots then stay taken until their windows pass, which
    /// errs towards the limit, where releasing could free another session's slots.
    pub async fn reserve(
        &self,
        user: &str,
        messages: u32,
        recipients: u32,
    ) -> Result<Reservation, StoreError> {
        let asked = [messages, recipients];
        let limits = [
            self.limits.messages_per_user,
            self.limits.recipients_per_user,
        ];
        match &self.store {
            Store::Memory(table) => Ok(table.reserve(user, asked, limits, Instant::now())),
            Store::Redis(redis) => redis.reserve(user, self.windows(), asked, limits).await,
        }
    }

    /// Gives back slots taken by [`Quota::reserve`] (the backend refused the command,
    /// RSET, the message was rejected), never below zero: from the current window's
    /// counter first, the rest from the previous one, where a reservation made just
    /// before the window turned was counted.
    pub async fn release(
        &self,
        user: &str,
        messages: u32,
        recipients: u32,
    ) -> Result<(), StoreError> {
        let amounts = [messages, recipients];
        if amounts == [0, 0] {
            return Ok(());
        }
        match &self.store {
            Store::Memory(table) => {
                table.release(user, amounts, Instant::now());
                Ok(())
            }
            Store::Redis(redis) => redis.release(user, self.windows(), amounts).await,
        }
    }

    fn windows(&self) -> [Duration; 2] {
        [self.message_window, self.recipient_window]
    }

    async fn update(
        &self,
        user: &str,
        messages: u32,
        recipients: u32,
    ) -> Result<Usage, StoreError> {
        match &self.store {
            Store::Memory(table) => {
                let [messages, recipients] =
                    table.update(user, [messages, recipients], Instant::now());
                Ok(Usage {
                    messages,
                    recipients,
                })
            }
            Store::Redis(redis) => {
                redis
                    .update(user, self.windows(), [messages, recipients])
                    .await
            }
        }
    }
}

/// One user's counter for one limit: two fixed windows, the estimate being the current
/// one plus the previous one weighted by how much of it still overlaps (as in
/// [`crate::limits`]).
#[derive(Debug, Clone, Copy)]
struct Windows {
    start: Instant,
    current: u64,
    previous: u64,
}

impl Windows {
    fn new(now: Instant) -> Windows {
        Windows {
            start: now,
            current: 0,
            previous: 0,
        }
    }

    /// Moves the fixed windows forward to the one containing `now`.
    fn advance(&mut self, now: Instant, window: Duration) {
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= window * 2 {
            *self = Windows::new(now);
        } else if elapsed >= window {
            self.previous = self.current;
            self.current = 0;
            self.start += window;
        }
    }

    /// The sliding-window estimate, rounded down. Call [`Windows::advance`] first.
    fn estimate(&self, now: Instant, window: Duration) -> u64 {
        let into_current =
            now.saturating_duration_since(self.start).as_secs_f64() / window.as_secs_f64();
        let previous = self.previous as f64 * (1.0 - into_current).max(0.0);
        self.current.saturating_add(previous as u64)
    }

    /// Takes `n` back, from the current window first. Call [`Windows::advance`] first.
    fn give_back(&mut self, n: u64) {
        let from_current = n.min(self.current);
        self.current -= from_current;
        self.previous = self.previous.saturating_sub(n - from_current);
    }

    fn expired(&self, now: Instant, window: Duration) -> bool {
        now.saturating_duration_since(self.start) >= window * 2
    }
}

/// The memory store: per user, one [`Windows`] per limit ([`PER_USER`] order), all
/// behind one lock, so a reservation checks and adds both counters in one step however
/// many tasks ask at once. Keys are hashed user names and the table holds at most
/// [`MAX_TRACKED`] of them, so its memory is bounded whatever the names.
struct MemoryTable {
    hasher: RandomState,
    windows: [Duration; 2],
    inner: Mutex<TableInner>,
}

struct TableInner {
    entries: HashMap<u64, [Windows; 2]>,
    /// When a full table may next be swept for expired entries: a sweep is a scan under
    /// the lock, so a flood of new users must not trigger one per insertion.
    next_sweep: Option<Instant>,
}

impl MemoryTable {
    fn new(windows: [Duration; 2]) -> MemoryTable {
        MemoryTable {
            hasher: RandomState::new(),
            windows: windows.map(|w| w.max(Duration::from_secs(1))),
            inner: Mutex::new(TableInner {
                entries: HashMap::new(),
                next_sweep: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TableInner> {
        // Plain counters: a panic elsewhere cannot leave them inconsistent.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds `add` unconditionally and returns the estimates (the `usage`/`record` path).
    fn update(&self, user: &str, add: [u32; 2], now: Instant) -> [u64; 2] {
        let key = self.hasher.hash_one(user);
        let mut inner = self.lock();
        if add != [0, 0] {
            inner.add(key, add, self.windows, now);
        }
        inner.estimates(key, self.windows, now)
    }

    fn reserve(
        &self,
        user: &str,
        asked: [u32; 2],
        limits: [Option<u64>; 2],
        now: Instant,
    ) -> Reservation {
        let key = self.hasher.hash_one(user);
        let mut inner = self.lock();
        let estimates = inner.estimates(key, self.windows, now);
        for i in 0..2 {
            if let Some(limit) = limits[i]
                && asked[i] > 0
                && estimates[i].saturating_add(u64::from(asked[i])) > limit
            {
                return Reservation::Refused(PER_USER[i]);
            }
        }
        if asked != [0, 0] {
            inner.add(key, asked, self.windows, now);
        }
        Reservation::Granted
    }

    fn release(&self, user: &str, amounts: [u32; 2], now: Instant) {
        let key = self.hasher.hash_one(user);
        let mut inner = self.lock();
        // A user the table does not know (never counted, expired or evicted) has
        // nothing to give back.
        if let Some(counts) = inner.entries.get_mut(&key) {
            for i in 0..2 {
                counts[i].advance(now, self.windows[i]);
                counts[i].give_back(u64::from(amounts[i]));
            }
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.lock().entries.len()
    }
}

impl TableInner {
    /// Both estimates for `key`, without creating an entry for a user never counted.
    fn estimates(&mut self, key: u64, windows: [Duration; 2], now: Instant) -> [u64; 2] {
        match self.entries.get_mut(&key) {
            Some(counts) => std::array::from_fn(|i| {
                counts[i].advance(now, windows[i]);
                counts[i].estimate(now, windows[i])
            }),
            None => [0, 0],
        }
    }

    fn add(&mut self, key: u64, add: [u32; 2], windows: [Duration; 2], now: Instant) {
        if self.entries.len() >= MAX_TRACKED && !self.entries.contains_key(&key) {
            if self.next_sweep.is_none_or(|at| now >= at) {
                self.entries
                    .retain(|_, counts| !(0..2).all(|i| counts[i].expired(now, windows[i])));
                let shortest = windows[0].min(windows[1]);
                self.next_sweep = Some(now + shortest / 4);
            }
            if self.entries.len() >= MAX_TRACKED {
                // Still full of live users: forget an arbitrary one rather than grow.
                // That user's counts restart from zero; it takes MAX_TRACKED users
                // sending within one window, which the accounts file bounds.
                if let Some(victim) = self.entries.keys().next().copied() {
                    self.entries.remove(&victim);
                }
            }
        }
        let counts = self
            .entries
            .entry(key)
            .or_insert_with(|| [Windows::new(now); 2]);
        for i in 0..2 {
            counts[i].advance(now, windows[i]);
            counts[i].current = counts[i].current.saturating_add(u64::from(add[i]));
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

/// Takes what is asked if every limit allows it, in one atomic step on the server's
/// clock, so replicas never both take the last slot. KEYS: the message and recipient
/// key prefixes. ARGV: both windows in milliseconds, the amounts asked, the limits (0:
/// not set, counted but never refused). Checks every limit before adding anything, so
/// a refusal takes nothing. Returns 0 when granted, else the index of the first limit
/// that would be exceeded (1: messages, 2: recipients).
const RESERVE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local current_keys = {}
for i = 1, 2 do
  local window = tonumber(ARGV[i])
  local add = tonumber(ARGV[i + 2])
  local limit = tonumber(ARGV[i + 4])
  local index = math.floor(now / window)
  current_keys[i] = KEYS[i] .. ':' .. index
  if add > 0 and limit > 0 then
    local current = tonumber(redis.call('GET', current_keys[i]) or '0')
    local previous = tonumber(redis.call('GET', KEYS[i] .. ':' .. (index - 1)) or '0')
    local overlap = 1 - (now % window) / window
    if math.floor(current + previous * overlap) + add > limit then
      return i
    end
  end
end
for i = 1, 2 do
  local add = tonumber(ARGV[i + 2])
  if add > 0 then
    redis.call('INCRBY', current_keys[i], add)
    redis.call('PEXPIRE', current_keys[i], 2 * tonumber(ARGV[i]))
  end
end
return 0
";

/// Gives back what a reservation took, never below zero: from the current window's
/// counter first, the rest from the previous one (a reservation made just before the
/// window turned). KEYS: the key prefixes. ARGV: both windows in milliseconds, the
/// amounts to give back. DECRBY keeps a key's expiry, and a missing key is left
/// missing, so nothing is created without one.
const RELEASE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, 2 do
  local window = tonumber(ARGV[i])
  local left = tonumber(ARGV[i + 2])
  local index = math.floor(now / window)
  for back = 0, 1 do
    if left <= 0 then
      break
    end
    local key = KEYS[i] .. ':' .. (index - back)
    local take = math.min(tonumber(redis.call('GET', key) or '0'), left)
    if take > 0 then
      redis.call('DECRBY', key, take)
      left = left - take
    end
  end
end
return 0
";

struct RedisStore {
    redis: Arc<store::Redis>,
    update_script: redis::Script,
    reserve_script: redis::Script,
    release_script: redis::Script,
}

impl RedisStore {
    fn new(redis: Arc<store::Redis>) -> RedisStore {
        RedisStore {
            redis,
            update_script: redis::Script::new(UPDATE_SCRIPT),
            reserve_script: redis::Script::new(RESERVE_SCRIPT),
            release_script: redis::Script::new(RELEASE_SCRIPT),
        }
    }

    async fn update(
        &self,
        user: &str,
        windows: [Duration; 2],
        add: [u32; 2],
    ) -> Result<Usage, StoreError> {
        let [message_key, recipient_key] = keys(user);
        let (messages, recipients): (u64, u64) = self
            .redis
            .invoke(
                self.update_script
                    .key(message_key)
                    .key(recipient_key)
                    .arg(millis(windows[0]))
                    .arg(millis(windows[1]))
                    .arg(add[0])
                    .arg(add[1]),
            )
            .await?;
        Ok(Usage {
            messages,
            recipients,
        })
    }

    async fn reserve(
        &self,
        user: &str,
        windows: [Duration; 2],
        asked: [u32; 2],
        limits: [Option<u64>; 2],
    ) -> Result<Reservation, StoreError> {
        let [message_key, recipient_key] = keys(user);
        let refused: u8 = self
            .redis
            .invoke(
                self.reserve_script
                    .key(message_key)
                    .key(recipient_key)
                    .arg(millis(windows[0]))
                    .arg(millis(windows[1]))
                    .arg(asked[0])
                    .arg(asked[1])
                    .arg(limits[0].unwrap_or(0))
                    .arg(limits[1].unwrap_or(0)),
            )
            .await?;
        match refused {
            0 => Ok(Reservation::Granted),
            1 | 2 => Ok(Reservation::Refused(PER_USER[usize::from(refused - 1)])),
            // Another script under our name, or a server that ran ours wrongly: say so
            // rather than guess whether a slot was taken.
            _ => Err(StoreError::Redis(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "the reserve script answered neither 0, 1 nor 2",
            )))),
        }
    }

    async fn release(
        &self,
        user: &str,
        windows: [Duration; 2],
        amounts: [u32; 2],
    ) -> Result<(), StoreError> {
        let [message_key, recipient_key] = keys(user);
        let _: u8 = self
            .redis
            .invoke(
                self.release_script
                    .key(message_key)
                    .key(recipient_key)
                    .arg(millis(windows[0]))
                    .arg(millis(windows[1]))
                    .arg(amounts[0])
                    .arg(amounts[1]),
            )
            .await?;
        Ok(())
    }
}

/// A user's message and recipient key prefixes; each fixed window appends its index.
/// The hash tag keeps a user's keys in one slot of a Redis Cluster.
fn keys(user: &str) -> [String; 2] {
    [
        format!("postern:limits:{{{user}}}:messages"),
        format!("postern:limits:{{{user}}}:recipients"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_server::RedisServer;

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

    /// `spec` (`memory` or a URL) as the limits store.
    fn store(spec: &str, failure: StoreFailure) -> LimitsStore {
        LimitsStore::open(spec, failure, Duration::from_secs(2)).unwrap()
    }

    fn config(spec: &str) -> QuotaConfig {
        QuotaConfig {
            messages_per_user: Some(Rate {
                count: 2,
                window: Duration::from_secs(60),
            }),
            recipients_per_user: None,
            recipients_per_message: Some(3),
            store: store(spec, StoreFailure::Open),
        }
    }

    #[tokio::test]
    async fn the_memory_store_counts_per_user() {
        let quota = Quota::new(&config("memory"));
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

    #[tokio::test]
    async fn an_unreachable_redis_is_an_error_not_a_grant() {
        // Port 1 on loopback refuses at once.
        let quota = Quota::new(&config("redis://127.0.0.1:1/0"));
        assert!(quota.usage("alice").await.is_err());
        assert!(quota.reserve("alice", 1, 0).await.is_err());
    }

    /// A quota with per-user limits of `messages` and `recipients` (`None`: not set)
    /// per `window`, on `store`.
    fn limited(
        spec: &str,
        messages: Option<u64>,
        recipients: Option<u64>,
        window: Duration,
    ) -> Quota {
        let rate = |count| Rate { count, window };
        Quota::new(&QuotaConfig {
            messages_per_user: messages.map(rate),
            recipients_per_user: recipients.map(rate),
            recipients_per_message: None,
            store: store(spec, StoreFailure::Closed),
        })
    }

    const MINUTE: Duration = Duration::from_secs(60);
    const GRANTED: Reservation = Reservation::Granted;
    const NO_MESSAGE: Reservation = Reservation::Refused(Limit::MessagesPerUser);
    const NO_RECIPIENT: Reservation = Reservation::Refused(Limit::RecipientsPerUser);

    fn usage(messages: u64, recipients: u64) -> Usage {
        Usage {
            messages,
            recipients,
        }
    }

    /// Reserve, refuse and release on any store; the caller picks a window that cannot
    /// turn during the test (Redis windows are aligned on the epoch).
    async fn reserve_refuse_release(quota: &Quota) {
        let r = |m, n| quota.reserve("alice", m, n);
        assert_eq!(r(1, 0).await.unwrap(), GRANTED);
        assert_eq!(r(1, 2).await.unwrap(), GRANTED);
        assert_eq!(r(1, 0).await.unwrap(), NO_MESSAGE);
        // Messages are checked first, and a refusal takes nothing of either.
        assert_eq!(r(1, 9).await.unwrap(), NO_MESSAGE);
        assert_eq!(quota.usage("alice").await.unwrap(), usage(2, 2));
        // At the message limit, a RCPT of a message already granted still gets in.
        assert_eq!(r(0, 1).await.unwrap(), GRANTED);
        assert_eq!(r(0, 1).await.unwrap(), NO_RECIPIENT);
        assert_eq!(quota.usage("alice").await.unwrap(), usage(2, 3));
        // Other users have their own slots.
        assert_eq!(quota.reserve("bob", 2, 3).await.unwrap(), GRANTED);
        // Released slots can be taken again, and only they.
        quota.release("alice", 1, 2).await.unwrap();
        assert_eq!(quota.usage("alice").await.unwrap(), usage(1, 1));
        assert_eq!(r(1, 2).await.unwrap(), GRANTED);
        assert_eq!(r(0, 1).await.unwrap(), NO_RECIPIENT);
        // Never below zero: giving back more than was taken frees no extra slots.
        quota.release("alice", 50, 50).await.unwrap();
        quota.release("nobody", 1, 1).await.unwrap();
        assert_eq!(quota.usage("alice").await.unwrap(), usage(0, 0));
        assert_eq!(quota.usage("nobody").await.unwrap(), usage(0, 0));
        assert_eq!(r(2, 3).await.unwrap(), GRANTED);
        assert_eq!(r(1, 0).await.unwrap(), NO_MESSAGE);
        assert_eq!(r(0, 1).await.unwrap(), NO_RECIPIENT);
        // More than the whole limit at once is refused outright, from zero too.
        assert_eq!(quota.reserve("carol", 3, 0).await.unwrap(), NO_MESSAGE);
        assert_eq!(quota.reserve("carol", 0, 4).await.unwrap(), NO_RECIPIENT);
        assert_eq!(quota.usage("carol").await.unwrap(), usage(0, 0));
    }

    #[tokio::test]
    async fn memory_reservations_are_granted_refused_and_released() {
        reserve_refuse_release(&limited("memory", Some(2), Some(3), MINUTE)).await;
    }

    #[tokio::test]
    async fn a_limit_that_is_not_set_counts_but_never_refuses() {
        let quota = limited("memory", Some(1), None, MINUTE);
        assert_eq!(quota.reserve("alice", 1, 1000).await.unwrap(), GRANTED);
        assert_eq!(quota.reserve("alice", 0, u32::MAX).await.unwrap(), GRANTED);
        assert_eq!(quota.reserve("alice", 1, 0).await.unwrap(), NO_MESSAGE);
        assert_eq!(
            quota.usage("alice").await.unwrap(),
            usage(1, 1000 + u64::from(u32::MAX))
        );
        let unlimited = Quota::unlimited();
        for _ in 0..3 {
            assert_eq!(unlimited.reserve("bob", 5, 5).await.unwrap(), GRANTED);
        }
    }

    #[test]
    fn memory_releases_take_from_the_current_window_then_the_previous() {
        let table = MemoryTable::new([MINUTE; 2]);
        let t0 = Instant::now();
        let limits = [Some(10), Some(10)];
        assert_eq!(table.reserve("alice", [3, 0], limits, t0), GRANTED);
        // The window turns: the 3 are now the previous window's, fully overlapping.
        let t1 = t0 + MINUTE;
        assert_eq!(table.reserve("alice", [1, 0], limits, t1), GRANTED);
        assert_eq!(table.update("alice", [0, 0], t1), [4, 0]);
        table.release("alice", [2, 0], t1);
        assert_eq!(table.update("alice", [0, 0], t1), [2, 0]);
        // Half a window on, the remaining 2 in the previous window weigh 1.
        assert_eq!(table.update("alice", [0, 0], t1 + MINUTE / 2), [1, 0]);
        // The refusal is on the estimate: 1 + 9 fits, 1 + 10 does not.
        let t2 = t1 + MINUTE / 2;
        assert_eq!(table.reserve("alice", [10, 0], limits, t2), NO_MESSAGE);
        assert_eq!(table.reserve("alice", [9, 0], limits, t2), GRANTED);
        assert_eq!(table.update("alice", [0, 0], t2), [10, 0]);
    }

    #[test]
    fn the_memory_table_never_grows_past_its_bound() {
        let table = MemoryTable::new([MINUTE; 2]);
        let now = Instant::now();
        for i in 0..MAX_TRACKED + 50 {
            let user = i.to_string();
            assert_eq!(table.reserve(&user, [1, 1], [Some(1); 2], now), GRANTED);
        }
        assert!(table.tracked() <= MAX_TRACKED);
        // Reads and refusals of unknown users create nothing.
        let later = now + MINUTE * 3;
        assert_eq!(table.update("new", [0, 0], later), [0, 0]);
        assert_eq!(
            table.reserve("new", [2, 0], [Some(1); 2], later),
            NO_MESSAGE
        );
        table.release("new", [1, 1], later);
        // Once every entry expired, a new user sweeps them all away.
        assert_eq!(table.reserve("new", [1, 0], [Some(1); 2], later), GRANTED);
        assert_eq!(table.tracked(), 1);
    }

    /// N sessions of one user racing for the same slots, started together: exactly the
    /// limit gets through, never one more. `quota` has limits of 10 messages and 10
    /// recipients.
    async fn race_for_slots(quota: Arc<Quota>) {
        // 50 MAILs at once, one message each.
        let granted = race(&quota, 50, 1, |quota| async move {
            quota.reserve("racer", 1, 0).await.unwrap() == GRANTED
        })
        .await;
        assert_eq!(granted, 10, "messages granted by 50 parallel MAILs");
        // 8 sessions each trying 10 RCPTs, one at a time.
        let granted = race(&quota, 8, 10, |quota| async move {
            quota.reserve("racer", 0, 1).await.unwrap() == GRANTED
        })
        .await;
        assert_eq!(granted, 10, "recipients granted to 8 parallel sessions");
        assert_eq!(quota.usage("racer").await.unwrap(), usage(10, 10));
    }

    /// Runs `tasks` tasks that each call `attempt` `times` times in a row, all starting
    /// at a barrier; returns how many attempts succeeded.
    async fn race<F, Fut>(quota: &Arc<Quota>, tasks: usize, times: usize, attempt: F) -> usize
    where
        F: Fn(Arc<Quota>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = bool> + Send,
    {
        let barrier = Arc::new(tokio::sync::Barrier::new(tasks));
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let (quota, barrier, attempt) = (quota.clone(), barrier.clone(), attempt.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let mut granted = 0;
                    for _ in 0..times {
                        granted += usize::from(attempt(quota.clone()).await);
                    }
                    granted
                })
            })
            .collect();
        let mut granted = 0;
        for handle in handles {
            granted += handle.await.unwrap();
        }
        granted
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn parallel_memory_reservations_never_pass_the_limit() {
        race_for_slots(Arc::new(limited("memory", Some(10), Some(10), MINUTE))).await;
    }

    /// Redis windows are aligned on the epoch; at 30 days the chance that one turns
    /// during a test (and the previous window's weight drops below 1) is negligible.
    const MONTH: Duration = Duration::from_secs(30 * 24 * 3600);

    #[tokio::test]
    async fn redis_reservations_are_granted_refused_and_released() {
        let Some(redis) = RedisServer::start().await else {
            return;
        };
        reserve_refuse_release(&limited(&redis.url(), Some(2), Some(3), MONTH)).await;
        let unset = limited(&redis.url(), Some(1), None, MONTH);
        assert_eq!(unset.reserve("dave", 1, 1000).await.unwrap(), GRANTED);
        assert_eq!(unset.reserve("dave", 0, 1).await.unwrap(), GRANTED);
        assert_eq!(unset.reserve("dave", 1, 0).await.unwrap(), NO_MESSAGE);
        assert_eq!(unset.usage("dave").await.unwrap(), usage(1, 1001));
    }

    #[tokio::test]
    async fn redis_keys_expire_after_two_windows() {
        let Some(redis) = RedisServer::start().await else {
            return;
        };
        let quota = limited(&redis.url(), Some(5), Some(5), MINUTE);
        assert_eq!(quota.reserve("erin", 1, 2).await.unwrap(), GRANTED);
        quota.release("erin", 1, 1).await.unwrap();
        // A release of a user with no keys creates none.
        quota.release("frank", 1, 1).await.unwrap();
        let mut connection = redis.inspect().await;
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg("postern:limits:*")
            .query_async(&mut connection)
            .await
            .unwrap();
        keys.sort();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert!(keys[0].starts_with("postern:limits:{erin}:messages:"));
        assert!(keys[1].starts_with("postern:limits:{erin}:recipients:"));
        for key in keys {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .unwrap();
            // DECRBY in the release kept the expiry the reservation set.
            assert!(ttl > 0 && ttl <= 2 * 60_000, "{key}: PTTL {ttl}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn parallel_redis_reservations_never_pass_the_limit() {
        let Some(redis) = RedisServer::start().await else {
            return;
        };
        race_for_slots(Arc::new(limited(&redis.url(), Some(10), Some(10), MONTH))).await;
    }

    /// Sleeps until 50 ms past the next whole second of the (shared, loopback) clock,
    /// where a fresh 1 s Redis window has just begun.
    async fn next_second() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let into = Duration::from_nanos(u64::from(now.subsec_nanos()));
        tokio::time::sleep(Duration::from_secs(1) - into + Duration::from_millis(50)).await;
    }

    #[tokio::test]
    async fn redis_releases_take_from_the_current_window_then_the_previous() {
        let Some(redis) = RedisServer::start().await else {
            return;
        };
        let second = Duration::from_secs(1);
        let quota = limited(&redis.url(), Some(100), None, second);
        next_second().await;
        assert_eq!(quota.reserve("gina", 3, 0).await.unwrap(), GRANTED);
        next_second().await;
        assert_eq!(quota.reserve("gina", 1, 0).await.unwrap(), GRANTED);
        quota.release("gina", 2, 0).await.unwrap();
        let mut connection = redis.inspect().await;
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg("postern:limits:{gina}:messages:*")
            .query_async(&mut connection)
            .await
            .unwrap();
        // Window indexes have the same number of digits, so text order is time order.
        keys.sort();
        let counts: Vec<u64> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(counts, [2, 0], "previous, current: {keys:?}");
    }
}
