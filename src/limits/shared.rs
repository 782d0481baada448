//! The AUTH failure windows of [`AuthGate`](super::AuthGate), kept in the limits store
//! (`--limits-store redis://...`) so that any number of replicas share one budget per
//! client network and per user name.
//!
//! The rules are the gate's: an attempt is refused when its network is over `per_net`,
//! its wider site over `per_site`, or its user name over `per_user` and this site (see
//! [`Origin`]) failed it within the window; a name over its limit is otherwise slowed
//! down. A network that logged in as that user within the window is neither refused nor
//! slowed for it while the name's failures from its site are below `per_user`. Windows
//! slide (two fixed windows, the previous weighted by its overlap), aligned on the Redis
//! clock.
//!
//! How the store and the replicas can never disagree into a bypass:
//! - Check and reserve are one Lua script: parallel attempts on any replicas never both
//!   take the last place.
//! - The reservation *is* a failure: the script counts the attempt in the network, name
//!   and pair windows before any hash runs, and a success (or an attempt that never
//!   verified) takes it back from the fixed window it went into. A replica that dies
//!   between the two, or a give-back that never reaches Redis, leaves a failure that
//!   expires with its window (every key has a TTL of two windows): it errs toward the
//!   limit and never locks anything for good.
//! - After a timeout the script may have run: nothing is undone, for the same reason.
//!
//! User names are never stored: a name is keyed by the first 128 bits of
//! SHA-256("postern auth-failure user" ‖ 0 ‖ name). A keyed hash would need a secret
//! that every replica shares, and a replica with another secret would silently count in
//! other keys, giving an attacker one budget per secret, the bypass this module exists
//! to close. An
//! unkeyed hash is enough here: its job is to keep what clients typed (sometimes a
//! password in the name field) out of the store in clear, and bound the key size.
//! Someone who can read Redis can test guesses of a name against it, but learns
//! nothing the log does not already say (it names each failed user, for fail2ban), and
//! can already see every account's name in the sending-limit keys. Collisions only ever
//! merge two names' windows; finding one to aim at a user gains nothing over simply
//! failing as that user. Redis's own dictionaries are seeded, so the keys cannot be
//! aimed at one bucket. Client networks are stored as text, as the log shows them.
//!
//! All keys share the hash tag `{auth}`: one admission reads a network's, a name's
//! and their pair's windows in one script, which Redis Cluster allows only within one
//! slot.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{AuthLimits, Origin, Refusal};
use crate::store::{self, StoreError};

/// Decides and reserves, atomically, on the Redis clock. KEYS: the network, name and
/// pair window prefixes (each fixed window appends `:<index>`), the trust key of the
/// name from the network, the site's window prefix, and the window prefix of the name
/// from the network. ARGV: the window in milliseconds, `per_net`, `per_user`,
/// `per_site` (0 when the site is the network: then the site's and the pair's keys are
/// the network's, counted once). Returns `{verdict, index, failures}`: verdict 0 to
/// verify (the attempt now counts in window `index` of each), 1 refused for the
/// network, 2 refused for the name, 3 refused for the site; `failures` is the name's estimate when it
/// matters for the slowdown (not trusted), else 0. A trusted attempt (the trust key set,
/// the name's failures from the network below `per_user`) meets no limit.
const ADMIT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local index = math.floor(now / window)
local overlap = 1 - (now % window) / window
local function estimate(prefix)
  local current = tonumber(redis.call('GET', prefix .. ':' .. string.format('%d', index)) or '0')
  local previous = tonumber(redis.call('GET', prefix .. ':' .. string.format('%d', index - 1)) or '0')
  return current + previous * overlap
end
local per_user = tonumber(ARGV[3])
local per_site = tonumber(ARGV[4])
local trusted = redis.call('EXISTS', KEYS[4]) == 1 and estimate(KEYS[6]) < per_user
local failures = 0
if not trusted then
  if estimate(KEYS[1]) >= tonumber(ARGV[2]) then
    return {1, index, 0}
  end
  if per_site > 0 and estimate(KEYS[5]) >= per_site then
    return {3, index, 0}
  end
  failures = estimate(KEYS[2])
  if failures >= per_user and estimate(KEYS[3]) > 0 then
    return {2, index, math.floor(failures)}
  end
end
for _, i in ipairs(per_site > 0 and {1, 2, 3, 5, 6} or {1, 2, 3}) do
  local key = KEYS[i] .. ':' .. string.format('%d', index)
  redis.call('INCR', key)
  redis.call('PEXPIRE', key, 2 * window)
end
return {0, index, math.floor(failures)}
";

/// Takes an admitted attempt back out of window `ARGV[1]` of the window prefixes in KEYS
/// (the first three, and `KEYS[5]` and `KEYS[6]` when `ARGV[3]` is 1), never below zero
/// (DECR keeps a key's TTL; a key that expired is left missing). With `ARGV[2]` > 0
/// (milliseconds) the attempt succeeded: `KEYS[4]` trusts the pair that long.
const GIVE_BACK_SCRIPT: &str = r"
for _, i in ipairs(ARGV[3] == '1' and {1, 2, 3, 5, 6} or {1, 2, 3}) do
  local key = KEYS[i] .. ':' .. ARGV[1]
  if tonumber(redis.call('GET', key) or '0') > 0 then
    redis.call('DECR', key)
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[4], '1', 'PX', ARGV[2])
end
return 0
";

/// Takes back `ARGV[2]` failures from the window prefixes in KEYS (the name's, the
/// pair's, and where the site is wider the name's from the network), from the current
/// window first, the rest from the previous one (as the in-process table does).
/// `ARGV[1]`: the window in milliseconds.
const FORGIVE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local index = math.floor(now / tonumber(ARGV[1]))
for i = 1, #KEYS do
  local left = tonumber(ARGV[2])
  for back = 0, 1 do
    if left <= 0 then
      break
    end
    local key = KEYS[i] .. ':' .. string.format('%d', index - back)
    local take = math.min(tonumber(redis.call('GET', key) or '0'), left)
    if take > 0 then
      redis.call('DECRBY', key, take)
      left = left - take
    end
  end
end
return 0
";

/// A user name as the shared windows know it: a hash, never the name (see the module
/// documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedName(String);

impl SharedName {
    pub fn of(name: &str) -> SharedName {
        let digest = Sha256::new()
            .chain_update(b"postern auth-failure user\0")
            .chain_update(name.as_bytes())
            .finalize();
        SharedName(digest[..16].iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// An admitted attempt's place in the shared windows: already counted as a failure.
#[derive(Debug, Clone)]
pub struct Place {
    origin: Origin,
    name: SharedName,
    /// The fixed window it was counted in.
    index: i64,
}

/// The shared windows' answer to an attempt.
#[derive(Debug)]
pub enum SharedAdmission {
    /// Verify after waiting `delay`.
    Verify {
        place: Place,
        delay: Duration,
    },
    Refused(Refusal),
}

/// The AUTH failure windows in Redis.
#[derive(Debug)]
pub struct SharedWindows {
    redis: Arc<store::Redis>,
    limits: AuthLimits,
    admit: redis::Script,
    give_back: redis::Script,
    forgive: redis::Script,
}

/// The window prefixes of a network, a name and the name's failures from the site, the
/// trust key of the name from the network, the site's window prefix, and that of the
/// name's failures from the network. The pair and site keys are the network's own
/// wherever the site is the network (IPv4); a `ClientNet` shows its prefix length, so
/// an IPv6 site's keys never meet its networks'. The name's failures from a network
/// keep the key earlier releases used for them.
fn keys(origin: Origin, name: &SharedName) -> [String; 6] {
    let SharedName(hash) = name;
    let Origin { net, site } = origin;
    [
        format!("postern:{{auth}}:net:{net}"),
        format!("postern:{{auth}}:user:{hash}"),
        format!("postern:{{auth}}:pair:{hash}:{site}"),
        format!("postern:{{auth}}:trusted:{hash}:{net}"),
        format!("postern:{{auth}}:net:{site}"),
        format!("postern:{{auth}}:pair:{hash}:{net}"),
    ]
}

/// `script` with every key of `origin` and `name`, in the order the scripts take them.
fn with_keys<'a>(
    script: &'a redis::Script,
    origin: Origin,
    name: &SharedName,
) -> redis::ScriptInvocation<'a> {
    let mut invocation = script.prepare_invoke();
    for key in keys(origin, name) {
        invocation.key(key);
    }
    invocation
}

impl SharedWindows {
    pub fn new(redis: Arc<store::Redis>, limits: AuthLimits) -> SharedWindows {
        SharedWindows {
            redis,
            limits,
            admit: redis::Script::new(ADMIT_SCRIPT),
            give_back: redis::Script::new(GIVE_BACK_SCRIPT),
            forgive: redis::Script::new(FORGIVE_SCRIPT),
        }
    }

    fn window(&self) -> u64 {
        store::millis(self.limits.window.max(Duration::from_secs(1)))
    }

    /// Decides whether an attempt for `name` from `origin` may be verified, and if so
    /// counts it (see `ADMIT_SCRIPT`).
    pub async fn admit(
        &self,
        origin: Origin,
        name: &SharedName,
    ) -> Result<SharedAdmission, StoreError> {
        let per_site = if origin.wider_site().is_some() {
            self.limits.per_site
        } else {
            0
        };
        let (verdict, index, failures): (u8, i64, u64) = self
            .redis
            .invoke(
                with_keys(&self.admit, origin, name)
                    .arg(self.window())
                    .arg(self.limits.per_net)
                    .arg(self.limits.per_user)
                    .arg(per_site),
            )
            .await?;
        match verdict {
            0 => {
                let delay = if failures >= u64::from(self.limits.per_user) {
                    self.limits.user_delay(failures as f64)
                } else {
                    Duration::ZERO
                };
                Ok(SharedAdmission::Verify {
                    place: Place {
                        origin,
                        name: name.clone(),
                        index,
                    },
                    delay,
                })
            }
            1 => Ok(SharedAdmission::Refused(Refusal::Net)),
            2 => Ok(SharedAdmission::Refused(Refusal::User)),
            3 => Ok(SharedAdmission::Refused(Refusal::Site)),
            // Another script under our name, or a server that ran ours wrongly: an
            // error, so the failure mode decides, rather than a guess.
            _ => Err(StoreError::Redis(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "the AUTH admit script answered none of 0, 1, 2 and 3",
            )))),
        }
    }

    /// The credentials were valid: the place is given back and the network is trusted
    /// for this user for a window, on every replica.
    pub async fn succeeded(&self, place: &Place) -> Result<(), StoreError> {
        self.take_back(place, self.window()).await
    }

    /// The attempt ended without a verdict (no verifier, the client left): the place is
    /// given back.
    pub async fn give_back(&self, place: &Place) -> Result<(), StoreError> {
        self.take_back(place, 0).await
    }

    async fn take_back(&self, place: &Place, trust_for: u64) -> Result<(), StoreError> {
        let _: u8 = self
            .redis
            .invoke(
                with_keys(&self.give_back, place.origin, &place.name)
                    .arg(place.index)
                    .arg(trust_for)
                    .arg(u8::from(place.origin.wider_site().is_some())),
            )
            .await?;
        Ok(())
    }

    /// Takes back `n` failures of `name` from `origin` (a client that failed one
    /// mechanism and then logged in with another on the same connection).
    pub async fn forgive(
        &self,
        origin: Origin,
        name: &SharedName,
        n: u32,
    ) -> Result<(), StoreError> {
        let [_, user_key, pair_key, _, _, from_net_key] = keys(origin, name);
        let mut invocation = self.forgive.key(user_key);
        invocation.key(pair_key);
        if origin.wider_site().is_some() {
            invocation.key(from_net_key);
        }
        let _: u8 = self
            .redis
            .invoke(invocation.arg(self.window()).arg(n))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::ClientNet;
    use crate::store::test_server::RedisServer;
    use crate::store::{LimitsStore, StoreFailure};

    fn limits(per_net: u32, per_user: u32) -> AuthLimits {
        AuthLimits {
            per_net,
            per_site: 4 * per_net,
            per_user,
            // Windows are aligned on the epoch: a month makes a turn during a test
            // (which would weigh the earlier window less than 1) negligible.
            window: Duration::from_secs(30 * 24 * 3600),
            user_delay: Duration::from_secs(1),
        }
    }

    fn windows(redis: &RedisServer, limits: AuthLimits) -> SharedWindows {
        let store =
            LimitsStore::open(&redis.url(), StoreFailure::Closed, Duration::from_secs(2)).unwrap();
        SharedWindows::new(store.redis.unwrap(), limits)
    }

    fn net(last: u8) -> Origin {
        ClientNet::V4([198, 51, 100, last]).into()
    }

    #[test]
    fn names_are_hashed_to_fixed_size_keys() {
        let alice = SharedName::of("alice");
        assert_eq!(alice, SharedName::of("alice"));
        assert_ne!(alice, SharedName::of("Alice"));
        assert_eq!(alice.0.len(), 32);
        assert_eq!(SharedName::of(&"x".repeat(12_000)).0.len(), 32);
        assert!(alice.0.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    /// Parallel attempts through two replicas' connections for one name from one network
    /// never get more places than the limit, and every key they leave expires.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn replicas_racing_for_the_last_places_never_pass_the_limit() {
        let Some(redis) = RedisServer::start().await else {
            return;
        };
        let replicas = [
            Arc::new(windows(&redis, limits(7, 1000))),
            Arc::new(windows(&redis, limits(7, 1000))),
        ];
        let barrier = Arc::new(tokio::sync::Barrier::new(40));
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let (replica, barrier) = (replicas[i % 2].clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let name = SharedName::of(&format!("guess{i}"));
                    matches!(
                        replica.admit(net(1), &name).await.unwrap(),
                        SharedAdmission::Verify { .. }
                    )
                })
            })
            .collect();
        let mut admitted = 0;
        for task in tasks {
            admitted += usize::from(task.await.unwrap());
        }
        assert_eq!(admitted, 7);

        let mut connection = redis.inspect().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut connection)
            .await
            .unwrap();
        // One network key, seven name keys, seven pair keys; no name in clear.
        assert_eq!(keys.len(), 15, "{keys:?}");
        for key in keys {
            assert!(key.starts_with("postern:{auth}:"), "{key}");
            assert!(!key.contains("guess"), "{key}");
            let ttl: i64 = redis::cmd("PTTL")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .unwrap();
            assert!(ttl > 0, "{key}: PTTL {ttl}");
        }
    }

    /// A give-back in a later window takes the attempt out of the window it went into.
    #[tokio::test]
    async fn a_place_is_given_back_to_the_window_it_was_counted_in() {
        let Some(redis) = RedisServer::start().await else {
            return;
        };
        let shared = windows(&redis, limits(1, 1000));
        let alice = SharedName::of("alice");
        let SharedAdmission::Verify { mut place, .. } = shared.admit(net(1), &alice).await.unwrap()
        else {
            panic!("refused");
        };
        assert!(matches!(
            shared.admit(net(1), &alice).await.unwrap(),
            SharedAdmission::Refused(Refusal::Net)
        ));
        // A window other than the one counted in: nothing changes.
        place.index -= 5;
        shared.give_back(&place).await.unwrap();
        assert!(matches!(
            shared.admit(net(1), &alice).await.unwrap(),
            SharedAdmission::Refused(Refusal::Net)
        ));
        place.index += 5;
        shared.give_back(&place).await.unwrap();
        // Given back twice: never below zero, so one place again, not two.
        shared.give_back(&place).await.unwrap();
        assert!(matches!(
            shared.admit(net(1), &alice).await.unwrap(),
            SharedAdmission::Verify { .. }
        ));
        assert!(matches!(
            shared.admit(net(1), &alice).await.unwrap(),
            SharedAdmission::Refused(Refusal::Net)
        ));
    }

    /// A trust key lives one window.
    #[tokio::test]
    async fn a_success_trusts_the_network_for_one_window() {
        let Some(redis) = RedisServer::start().await else {
            return;
        };
        let shared = windows(&redis, limits(100, 1));
        let alice = SharedName::of("alice");
        let SharedAdmission::Verify { place, .. } = shared.admit(net(1), &alice).await.unwrap()
        else {
            panic!("refused");
        };
        shared.succeeded(&place).await.unwrap();
        let [_, _, _, trust, ..] = keys(net(1), &alice);
        let mut connection = redis.inspect().await;
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&trust)
            .query_async(&mut connection)
            .await
            .unwrap();
        let window = i64::try_from(shared.window()).unwrap();
        assert!(ttl > window - 60_000 && ttl <= window, "PTTL {ttl}");
    }
}
