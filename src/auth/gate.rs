//! Which AUTH failure windows an attempt meets: this process's own ([`AuthGate`]), or,
//! with `--limits-store redis://...`, those every replica shares ([`SharedWindows`]),
//! with the store's failure mode when it cannot answer.
//!
//! With a shared store, the store decides, and the process's own gate counts the same
//! attempts alongside (without deciding), so that when the store stops answering,
//! `--limits-store-failure open` falls back on windows that already hold what this
//! replica saw, not on empty ones. `closed` refuses every AUTH with `454 4.7.0` until the
//! store answers again. Each failed call is counted in
//! `postern_limits_store_errors_total{operation="auth_reserve"|"auth_release"}`.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::limits::shared::{Place, SharedAdmission, SharedName, SharedWindows};
use crate::limits::{Admission, AuthGate, AuthLimits, AuthTicket, Origin, UserKey};
use crate::metrics;
use crate::store::{LimitsStore, StoreError, StoreFailure};

/// How often a failing store is warned about (each AUTH would otherwise log a line).
const STORE_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// The failure windows in front of the verifiers.
pub struct FailureGate {
    local: Arc<AuthGate>,
    shared: Option<Shared>,
    /// Keys user names in the process's tables: a keyed hash, so a flood of long names
    /// cannot grow their memory, nor be aimed at one bucket.
    hasher: RandomState,
}

struct Shared {
    windows: Arc<SharedWindows>,
    failure: StoreFailure,
    /// Whether the last call failed, to say once when the store is back.
    failing: AtomicBool,
    /// When the last warning was logged, and how many failures since.
    warned: Mutex<(Option<Instant>, u64)>,
}

/// A user name as the windows know it: never the name itself.
#[derive(Debug, Clone)]
pub struct NameKey {
    /// The key in the process's tables.
    pub local: UserKey,
    shared: Option<SharedName>,
}

/// The gate's answer to an attempt.
#[derive(Debug)]
pub enum Decision {
    /// Verify after waiting `delay`; `ticket` holds the attempt's place until its outcome.
    Verify { ticket: Ticket, delay: Duration },
    /// Refused without a check; the `scope` of `postern_auth_throttled_total`.
    Refused(&'static str),
}

impl FailureGate {
    pub fn new(limits: AuthLimits, store: &LimitsStore) -> FailureGate {
        let shared = store.redis.as_ref().map(|redis| Shared {
            windows: Arc::new(SharedWindows::new(redis.clone(), limits)),
            failure: store.failure,
            failing: AtomicBool::new(false),
            warned: Mutex::new((None, 0)),
        });
        FailureGate {
            local: AuthGate::new(limits),
            shared,
            hasher: RandomState::new(),
        }
    }

    /// `name` exactly, as the process's tables hash it (for a connection's own
    /// [`AuthHistory`](crate::limits::AuthHistory)).
    pub fn exact_key(&self, name: &str) -> UserKey {
        self.hasher.hash_one(name)
    }

    /// How the windows key `name`.
    pub fn key(&self, name: &str) -> NameKey {
        NameKey {
            local: self.hasher.hash_one(name),
            shared: self.shared.as_ref().map(|_| SharedName::of(name)),
        }
    }

    /// Decides whether an attempt for `name` from `origin` may be verified, and if so
    /// reserves its place.
    pub async fn admit(&self, origin: Origin, name: &NameKey) -> Decision {
        let (Some(shared), Some(shared_name)) = (&self.shared, &name.shared) else {
            return self.admit_locally(origin, name);
        };
        match shared.windows.admit(origin, shared_name).await {
            Ok(SharedAdmission::Verify { place, delay }) => {
                shared.answered();
                Decision::Verify {
                    ticket: Ticket {
                        local: Some(self.local.reserve(origin, name.local)),
                        shared: Some((shared.windows.clone(), place)),
                    },
                    delay,
                }
            }
            Ok(SharedAdmission::Refused(refusal)) => {
                shared.answered();
                Decision::Refused(refusal.label())
            }
            Err(error) => {
                metrics::limits_store_error(metrics::label::store_operation::AUTH_RESERVE);
                shared.warn(&error);
                match shared.failure {
                    StoreFailure::Open => self.admit_locally(origin, name),
                    StoreFailure::Closed => {
                        Decision::Refused(metrics::label::throttle_scope::STORE_UNAVAILABLE)
                    }
                }
            }
        }
    }

    fn admit_locally(&self, origin: Origin, name: &NameKey) -> Decision {
        match self.local.admit(origin, name.local, Instant::now()) {
            Admission::Verify { ticket, delay } => Decision::Verify {
                ticket: Ticket {
                    local: Some(ticket),
                    shared: None,
                },
                delay,
            },
            Admission::Refused(refusal) => Decision::Refused(refusal.label()),
        }
    }

    /// Takes back `n` failures of `name` from `origin` (a client that failed one
    /// mechanism and then logged in with another on the same connection), everywhere
    /// they were counted.
    pub async fn forgive(&self, origin: Origin, name: &NameKey, n: u32) {
        self.local.forgive(origin, name.local, n, Instant::now());
        if let (Some(shared), Some(shared_name)) = (&self.shared, &name.shared)
            && let Err(error) = shared.windows.forgive(origin, shared_name, n).await
        {
            metrics::limits_store_error(metrics::label::store_operation::AUTH_RELEASE);
            shared.warn(&error);
        }
    }
}

impl Shared {
    fn answered(&self) {
        if self.failing.swap(false, Ordering::Relaxed) {
            info!("limits store answering again: AUTH failure windows shared again");
        }
    }

    /// Logs a store failure, at most once per [`STORE_WARNING_INTERVAL`] with the count.
    fn warn(&self, error: &StoreError) {
        self.failing.store(true, Ordering::Relaxed);
        let now = Instant::now();
        let mut warned = self
            .warned
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        warned.1 += 1;
        if warned
            .0
            .is_none_or(|at| now.saturating_duration_since(at) >= STORE_WARNING_INTERVAL)
        {
            let failures = warned.1;
            *warned = (Some(now), 0);
            let failure = match self.failure {
                StoreFailure::Open => "open: this replica's own windows apply",
                StoreFailure::Closed => "closed: AUTH refused with 454",
            };
            warn!(%error, failures, failure, "limits store unavailable for the AUTH failure windows");
        }
    }
}

/// An attempt's place in the windows. Dropped without an outcome (no verifier was free,
/// the client went away) it gives the place back.
#[derive(Debug)]
pub struct Ticket {
    local: Option<AuthTicket>,
    shared: Option<(Arc<SharedWindows>, Place)>,
}

impl Ticket {
    /// The credentials were valid: the place is given back and the network trusted for
    /// the user, in the shared windows before this returns (so the next attempt, on any
    /// replica, sees it).
    pub async fn succeeded(mut self) {
        if let Some(local) = self.local.take() {
            local.succeeded(Instant::now());
        }
        if let Some((windows, place)) = self.shared.take()
            && windows.succeeded(&place).await.is_err()
        {
            // The place stays a failure until its window ends: toward the limit.
            metrics::limits_store_error(metrics::label::store_operation::AUTH_RELEASE);
        }
    }

    /// The credentials were wrong: the place becomes a failure (in the shared windows it
    /// already is one).
    pub fn failed(mut self) {
        if let Some(local) = self.local.take() {
            local.failed(Instant::now());
        }
        self.shared = None;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // The local place is given back by its own ticket's drop.
        let Some((windows, place)) = self.shared.take() else {
            return;
        };
        // Drop cannot wait: the give-back runs on its own, bounded by the store timeout.
        // Outside a runtime (never in postern) the place simply stays a failure.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if windows.give_back(&place).await.is_err() {
                    metrics::limits_store_error(metrics::label::store_operation::AUTH_RELEASE);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{ClientNet, NetGrouping};
    use crate::store::test_server::RedisServer;

    fn limits(per_net: u32, per_user: u32) -> AuthLimits {
        AuthLimits {
            per_net,
            per_site: 4 * per_net,
            per_user,
            // Redis windows are aligned on the epoch: a month makes a turn during a test
            // negligible.
            window: Duration::from_secs(30 * 24 * 3600),
            user_delay: Duration::from_secs(1),
        }
    }

    fn net(last: u8) -> ClientNet {
        ClientNet::V4([198, 51, 100, last])
    }

    /// The pairs of gates a scenario runs against, as two replicas: one process (the
    /// same gate twice), and two replicas sharing one Redis (when redis-server is
    /// installed; `RedisServer::start` fails in CI when it is not).
    fn gates(
        limits: AuthLimits,
        redis: Option<&RedisServer>,
    ) -> Vec<(&'static str, [Arc<FailureGate>; 2])> {
        let local = Arc::new(FailureGate::new(limits, &LimitsStore::memory()));
        let mut gates = vec![("memory", [local.clone(), local])];
        if let Some(redis) = redis {
            let replica = || {
                let store =
                    LimitsStore::open(&redis.url(), StoreFailure::Closed, Duration::from_secs(2))
                        .unwrap();
                Arc::new(FailureGate::new(limits, &store))
            };
            gates.push(("redis", [replica(), replica()]));
        }
        gates
    }

    /// Admits an attempt and keeps its place; `None` if refused.
    async fn admit(gate: &FailureGate, from: impl Into<Origin>, name: &str) -> Option<Ticket> {
        match gate.admit(from.into(), &gate.key(name)).await {
            Decision::Verify { ticket, .. } => Some(ticket),
            Decision::Refused(_) => None,
        }
    }

    async fn fail(gate: &FailureGate, from: impl Into<Origin>, name: &str) -> Duration {
        match gate.admit(from.into(), &gate.key(name)).await {
            Decision::Verify { ticket, delay } => {
                ticket.failed();
                delay
            }
            Decision::Refused(scope) => panic!("refused: {scope}"),
        }
    }

    async fn succeed(gate: &FailureGate, from: impl Into<Origin>, name: &str) -> Duration {
        match gate.admit(from.into(), &gate.key(name)).await {
            Decision::Verify { ticket, delay } => {
                ticket.succeeded().await;
                delay
            }
            Decision::Refused(scope) => panic!("refused: {scope}"),
        }
    }

    async fn refusal(
        gate: &FailureGate,
        from: impl Into<Origin>,
        name: &str,
    ) -> Option<&'static str> {
        match gate.admit(from.into(), &gate.key(name)).await {
            Decision::Verify { .. } => None,
            Decision::Refused(scope) => Some(scope),
        }
    }

    /// The rules of issue 12 hold the same in one process and across two replicas of
    /// one store, each step taken on alternate replicas.
    #[tokio::test]
    async fn the_shared_windows_follow_the_in_process_rules_across_replicas() {
        let redis = RedisServer::start().await;
        for (store, [a, b]) in gates(limits(8, 3), redis.as_ref()) {
            let home = net(1);
            succeed(&a, home, "alice").await;
            // Failures from three networks, on either replica: those networks are
            // refused for alice, on either replica...
            fail(&a, net(10), "alice").await;
            fail(&b, net(11), "alice").await;
            fail(&a, net(12), "alice").await;
            for (i, gate) in [&b, &a, &b].into_iter().enumerate() {
                let from = net(10 + i as u8);
                assert_eq!(refusal(gate, from, "alice").await, Some("user"), "{store}");
            }
            // ...a fresh network is slowed, more with each failure...
            assert_eq!(
                fail(&b, net(20), "alice").await,
                Duration::from_secs(1),
                "{store}"
            );
            assert_eq!(
                fail(&a, net(21), "alice").await,
                Duration::from_secs(2),
                "{store}"
            );
            // ...the network that logged in before is neither refused nor slowed, on the
            // other replica too...
            assert_eq!(succeed(&b, home, "alice").await, Duration::ZERO, "{store}");
            // ...and other names are untouched.
            assert_eq!(refusal(&a, net(10), "bob").await, None, "{store}");

            // The network limit refuses whatever the name: 8 places for net 30.
            for i in 0..8 {
                let gate = [&a, &b][i % 2];
                fail(gate, net(30), &format!("user{i}")).await;
            }
            assert_eq!(refusal(&b, net(30), "zoe").await, Some("ip"), "{store}");
            assert_eq!(refusal(&a, net(31), "zoe").await, None, "{store}");

            // Forgiven failures leave the name's window: carol fails twice from net 40
            // (one below the limit of 3), then a switch of mechanism is forgiven.
            fail(&a, net(40), "carol").await;
            fail(&a, net(40), "carol").await;
            fail(&b, net(41), "carol").await;
            assert_eq!(refusal(&b, net(40), "carol").await, Some("user"), "{store}");
            a.forgive(net(40).into(), &a.key("carol"), 2).await;
            assert_eq!(refusal(&b, net(40), "carol").await, None, "{store}");
        }
    }

    /// A name over its limit is refused from every /64 of an IPv6 site (a /48) that
    /// failed it, on every replica: a client holding the /48 cannot walk its /64s for
    /// one more guess each.
    #[tokio::test]
    async fn a_site_that_failed_a_name_is_refused_from_all_its_networks_across_replicas() {
        let redis = RedisServer::start().await;
        let from = |addr: &str| NetGrouping::default().origin(addr.parse().unwrap());
        for (store, [a, b]) in gates(limits(100, 2), redis.as_ref()) {
            let home = from("2001:db8:a:100::1");
            succeed(&a, home, "alice").await;
            fail(&a, from("2001:db8:a:1::1"), "alice").await;
            fail(&b, from("2001:db8:a:2::1"), "alice").await;
            for fresh in ["2001:db8:a:3::1", "2001:db8:a:ffff::1"] {
                assert_eq!(
                    refusal(&b, from(fresh), "alice").await,
                    Some("user"),
                    "{store} {fresh}"
                );
            }
            // Another site is slowed, and the /64 that logged in keeps its trust.
            assert_eq!(
                fail(&a, from("2001:db8:b::1"), "alice").await,
                Duration::from_secs(1),
                "{store}"
            );
            assert_eq!(succeed(&b, home, "alice").await, Duration::ZERO, "{store}");
            // Forgiven failures leave the site's window too: carol stays over her limit,
            // but the site that logged in after a failure is no longer refused.
            fail(&a, from("2001:db8:c:1::1"), "carol").await;
            fail(&a, from("2001:db8:d:1::1"), "carol").await;
            fail(&b, from("2001:db8:e:1::1"), "carol").await;
            assert_eq!(
                refusal(&b, from("2001:db8:c:2::1"), "carol").await,
                Some("user"),
                "{store}"
            );
            b.forgive(from("2001:db8:c:1::1"), &b.key("carol"), 1).await;
            assert_eq!(
                refusal(&a, from("2001:db8:c:2::1"), "carol").await,
                None,
                "{store}"
            );
        }
    }

    /// Failures from the /64s of one IPv6 site fill the site's own window, on every
    /// replica: walking the /64s of a /48 does not escape the per-network limit.
    #[tokio::test]
    async fn a_site_walking_its_networks_meets_its_own_limit_across_replicas() {
        let redis = RedisServer::start().await;
        let from = |site: u16, net: u16| {
            let addr = format!("2001:db8:{site:x}:{net:x}::1");
            NetGrouping::default().origin(addr.parse().unwrap())
        };
        // 2 failures per network, 8 per site.
        for (store, [a, b]) in gates(limits(2, 1000), redis.as_ref()) {
            for net in 0..4 {
                fail(&a, from(0xa, net), &format!("u{net}a")).await;
                fail(&b, from(0xa, net), &format!("u{net}b")).await;
            }
            let scopes = [
                refusal(&a, from(0xa, 4), "x").await,
                refusal(&b, from(0xa, 0xffff), "x").await,
                refusal(&a, from(0xb, 0), "x").await,
            ];
            assert_eq!(
                scopes,
                [Some("wide_prefix"), Some("wide_prefix"), None],
                "{store}"
            );
            // A ticket given back leaves the site's window too.
            let c = from(0xc, 0);
            let held = admit(&a, c, "y").await.expect(store);
            held.succeeded().await;
            for net in 1..=4 {
                fail(&b, from(0xc, net), "z1").await;
                fail(&a, from(0xc, net), "z2").await;
            }
            assert_eq!(
                refusal(&b, from(0xc, 5), "x").await,
                Some("wide_prefix"),
                "{store}"
            );
        }
    }

    /// A user who logged in from a network keeps logging in there after a guesser on
    /// the same address used its failure window up, on every replica, for as many
    /// attempts on the trust as the per-user limit: running ones included.
    #[tokio::test]
    async fn a_trusted_network_passes_its_own_network_limit_across_replicas() {
        let redis = RedisServer::start().await;
        for (store, [a, b]) in gates(limits(3, 2), redis.as_ref()) {
            let shared = net(7);
            succeed(&a, shared, "alice").await;
            for (i, gate) in [&a, &b, &a].into_iter().enumerate() {
                fail(gate, shared, &format!("guess{i}")).await;
            }
            assert_eq!(refusal(&b, shared, "bob").await, Some("ip"), "{store}");
            assert_eq!(
                succeed(&b, shared, "alice").await,
                Duration::ZERO,
                "{store}"
            );
            // Two attempts running on the trust are all it takes at once...
            let first = admit(&a, shared, "alice").await.expect(store);
            let second = admit(&b, shared, "alice").await.expect(store);
            assert_eq!(refusal(&a, shared, "alice").await, Some("ip"), "{store}");
            first.succeeded().await;
            second.succeeded().await;
            // ...and two failures use it up.
            fail(&a, shared, "alice").await;
            fail(&b, shared, "alice").await;
            assert_eq!(refusal(&b, shared, "alice").await, Some("ip"), "{store}");
        }
    }

    /// The trust of a login is bounded by the name's failures from that network, those
    /// before the login included: a guesser sharing the address gets `per_user` tries at
    /// the user's password in all, on every replica. From another /64 of the same site
    /// the guesses do not touch a /64's trust.
    #[tokio::test]
    async fn a_trust_gives_a_neighbour_no_more_guesses_than_the_per_user_limit() {
        let redis = RedisServer::start().await;
        let from = |addr: &str| NetGrouping::default().origin(addr.parse().unwrap());
        for (store, [a, b]) in gates(limits(100, 3), redis.as_ref()) {
            let shared = net(7);
            fail(&a, shared, "alice").await;
            fail(&b, shared, "alice").await;
            succeed(&a, shared, "alice").await;
            fail(&b, shared, "alice").await;
            assert_eq!(refusal(&a, shared, "alice").await, Some("user"), "{store}");

            let home = from("2001:db8:a:100::1");
            succeed(&a, home, "carol").await;
            for i in 1..=5 {
                let guesser = from(&format!("2001:db8:a:{i}::1"));
                if let Some(ticket) = admit(&b, guesser, "carol").await {
                    ticket.failed();
                }
            }
            assert_eq!(succeed(&b, home, "carol").await, Duration::ZERO, "{store}");
        }
    }

    /// Running attempts hold their place on every replica; a success and a dropped
    /// ticket give it back, a failure keeps it.
    #[tokio::test]
    async fn places_are_held_until_the_outcome_and_given_back_on_success_or_drop() {
        let redis = RedisServer::start().await;
        for (store, [a, b]) in gates(limits(3, 1000), redis.as_ref()) {
            let mut tickets = Vec::new();
            for (i, gate) in [&a, &b, &a].into_iter().enumerate() {
                tickets.push(admit(gate, net(1), &format!("u{i}")).await.expect(store));
            }
            assert_eq!(refusal(&b, net(1), "u3").await, Some("ip"), "{store}");
            let [first, second, third] = <[Ticket; 3]>::try_from(tickets).unwrap();
            first.succeeded().await;
            let _x = admit(&b, net(1), "x").await.expect(store);
            assert_eq!(refusal(&a, net(1), "y").await, Some("ip"), "{store}");
            // A dropped ticket's give-back runs on its own task in the shared case.
            drop(second);
            let deadline = Instant::now() + Duration::from_secs(5);
            let _z = loop {
                if let Some(ticket) = admit(&a, net(1), "z").await {
                    break ticket;
                }
                assert!(Instant::now() < deadline, "{store}: never given back");
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            third.failed();
            assert_eq!(refusal(&b, net(1), "w").await, Some("ip"), "{store}");
        }
    }

    /// With the store down: `closed` refuses, `open` falls back on this replica's own
    /// windows, which counted what the replica saw while the store was up.
    #[tokio::test]
    async fn a_store_outage_follows_the_failure_mode() {
        let Some(mut redis) = RedisServer::start().await else {
            return;
        };
        let open = LimitsStore::open(&redis.url(), StoreFailure::Open, Duration::from_millis(300))
            .unwrap();
        let closed = LimitsStore::open(
            &redis.url(),
            StoreFailure::Closed,
            Duration::from_millis(300),
        )
        .unwrap();
        let open = FailureGate::new(limits(4, 1000), &open);
        let closed = FailureGate::new(limits(4, 1000), &closed);
        for i in 0..3 {
            fail(&open, net(1), &format!("u{i}")).await;
        }
        fail(&closed, net(2), "u").await;
        redis.stop();
        assert_eq!(
            refusal(&closed, net(3), "u").await,
            Some("store_unavailable")
        );
        // Open: its own windows had three of net 1's failures; one more place is left.
        fail(&open, net(1), "u3").await;
        assert_eq!(refusal(&open, net(1), "u4").await, Some("ip"));
        assert_eq!(refusal(&open, net(3), "u").await, None);
    }
}
