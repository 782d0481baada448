//! Abuse limits shared by all connections: open connections and running password
//! verifications per client network, and
//! authentication failures per client network and per user name in a sliding window
//! ([`AuthGate`]; the same windows kept in the limits store, shared by replicas, are
//! [`shared`]).
//!
//! The tables are bounded: the connection table by the connection limit itself, the
//! failure table by [`MAX_TRACKED`] entries, so a flood from many addresses costs a
//! fixed amount of memory. Time is passed in, so the logic is tested without a clock.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::sasl::Mechanism;

pub mod shared;
mod trust;

use trust::TrustedNets;

/// Most keys the failure table tracks at once (~50 bytes each).
pub const MAX_TRACKED: usize = 100_000;

/// A failure table full of live keys forgets this fraction of them at once (one
/// in ten), those with the fewest failures: one scan pays for many insertions.
const EVICTED_WHEN_FULL: usize = 10;

/// A client's network as the limits see it: an IPv4 address, or an IPv6 prefix (one
/// subscriber usually owns a whole /64 or more, so counting single IPv6 addresses is
/// useless). IPv4-mapped IPv6 addresses, and those of NAT64's well-known prefix, count as
/// the IPv4 address they carry. Made by a [`NetGrouping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientNet {
    V4([u8; 4]),
    /// The address with every bit past `len` cleared.
    V6 {
        prefix: [u8; 16],
        len: u8,
    },
}

/// Default of `--ipv6-prefix`: a /64 is one subscriber's LAN (RFC 6177).
pub const DEFAULT_IPV6_PREFIX: u8 = 64;
/// Default of `--ipv6-prefix-wide`: a /48 is one site's allocation (RFC 6177), so one
/// customer can hold 65536 /64s and walk through them.
pub const DEFAULT_IPV6_PREFIX_WIDE: u8 = 48;

/// How client addresses are grouped into networks: IPv6 at `v6_prefix` for every
/// per-network limit, and at the shorter `v6_wide_prefix` for a second, larger
/// connection cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetGrouping {
    pub v6_prefix: u8,
    pub v6_wide_prefix: u8,
}

impl Default for NetGrouping {
    fn default() -> Self {
        NetGrouping {
            v6_prefix: DEFAULT_IPV6_PREFIX,
            v6_wide_prefix: DEFAULT_IPV6_PREFIX_WIDE,
        }
    }
}

impl NetGrouping {
    /// The network `ip` counts in.
    pub fn net(self, ip: IpAddr) -> ClientNet {
        match ip {
            IpAddr::V4(v4) => ClientNet::V4(v4.octets()),
            IpAddr::V6(v6) => match embedded_ipv4(v6) {
                Some(v4) => ClientNet::V4(v4.octets()),
                None => ClientNet::v6(v6.octets(), self.v6_prefix),
            },
        }
    }

    /// The wider IPv6 network `ip` also counts in; `None` for IPv4 (an IPv4 address is
    /// already scarce), and when the wide prefix is not wider than the narrow one.
    pub fn wide(self, ip: IpAddr) -> Option<ClientNet> {
        match ip {
            IpAddr::V6(v6) if embedded_ipv4(v6).is_none() => (self.v6_wide_prefix < self.v6_prefix)
                .then(|| ClientNet::v6(v6.octets(), self.v6_wide_prefix)),
            _ => None,
        }
    }

    /// Where an AUTH attempt from `ip` comes from, as the failure windows count it.
    pub fn origin(self, ip: IpAddr) -> Origin {
        let net = self.net(ip);
        Origin {
            net,
            site: self.wide(ip).unwrap_or(net),
        }
    }
}

/// Where an AUTH attempt comes from, as the failure windows count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The client's network: its failure window, and the trust a login from it earns.
    pub net: ClientNet,
    /// The site the network belongs to: its --ipv6-prefix-wide network, or for IPv4 the
    /// address itself. A name over its limit is refused from every site that failed it,
    /// not only from the failing network: one customer holds a whole IPv6 /48, and could
    /// otherwise walk its 65,536 /64s for one more guess each.
    pub site: ClientNet,
}

impl Origin {
    /// The site, when it is wider than the network and so has windows of its own.
    pub fn wider_site(self) -> Option<ClientNet> {
        (self.site != self.net).then_some(self.site)
    }

    /// The networks an attempt from here counts in: its own, and its site where wider
    /// (a `ClientNet` carries its prefix length, so the two never share a key).
    fn counted_in(self) -> impl Iterator<Item = ClientNet> {
        std::iter::once(self.net).chain(self.wider_site())
    }
}

/// An origin whose site is its own network, as for every IPv4 client.
impl From<ClientNet> for Origin {
    fn from(net: ClientNet) -> Origin {
        Origin { net, site: net }
    }
}

/// The IPv4 client behind an IPv6 address: an IPv4-mapped address (a dual-stack
/// socket), or one of NAT64's well-known prefix `64:ff9b::/96` (RFC 6052), which is how
/// IPv4 clients reach a server on an IPv6-only network through a translator. Counted by
/// its /64, every IPv4 client there would share one budget, and one of them could use
/// it up for all.
fn embedded_ipv4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    const NAT64_WELL_KNOWN: [u16; 6] = [0x64, 0xff9b, 0, 0, 0, 0];
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let [.., a, b, c, d] = v6.octets();
    (v6.segments()[..6] == NAT64_WELL_KNOWN).then(|| Ipv4Addr::new(a, b, c, d))
}

impl ClientNet {
    fn v6(mut octets: [u8; 16], len: u8) -> ClientNet {
        let len = len.min(128);
        let bits = u128::from_be_bytes(octets);
        let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
        octets = (bits & mask).to_be_bytes();
        ClientNet::V6 {
            prefix: octets,
            len,
        }
    }
}

/// As logs show it: an IPv4 address, or an IPv6 prefix as `2001:db8:1:2::/64`.
impl std::fmt::Display for ClientNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientNet::V4(octets) => write!(f, "{}", std::net::Ipv4Addr::from(*octets)),
            ClientNet::V6 { prefix, len } => {
                write!(f, "{}/{len}", std::net::Ipv6Addr::from(*prefix))
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The tables hold plain counters; a panic elsewhere cannot leave them inconsistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Slots per client network, and per wider IPv6 network (see [`NetGrouping`]): the
/// open connections, and (with no wide cap) the running password verifications.
#[derive(Debug)]
pub struct PerNetSlots {
    limit: u32,
    wide_limit: u32,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    nets: HashMap<ClientNet, u32>,
    wide: HashMap<ClientNet, u32>,
}

/// Which connection cap a new connection is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    /// `--max-connections-per-ip` for its address or IPv6 prefix.
    Net,
    /// `--max-connections-per-wide-prefix` for its wider IPv6 prefix.
    Wide,
}

/// Holds one connection slot of a network (and of its wider network); dropping it frees
/// them.
#[derive(Debug)]
pub struct NetSlot {
    table: Arc<PerNetSlots>,
    net: ClientNet,
    wide: Option<ClientNet>,
}

impl PerNetSlots {
    pub fn new(limit: u32, wide_limit: u32) -> Arc<Self> {
        Arc::new(PerNetSlots {
            limit,
            wide_limit,
            open: Mutex::new(Open::default()),
        })
    }

    /// A slot for `net` and its wider network `wide`, or which cap is reached. Checks
    /// both before counting either, so a refusal takes nothing.
    pub fn try_acquire(
        self: &Arc<Self>,
        net: ClientNet,
        wide: Option<ClientNet>,
    ) -> Result<NetSlot, OverLimit> {
        let mut open = lock(&self.open);
        if open.nets.get(&net).copied().unwrap_or(0) >= self.limit {
            return Err(OverLimit::Net);
        }
        if let Some(wide) = wide {
            if open.wide.get(&wide).copied().unwrap_or(0) >= self.wide_limit {
                return Err(OverLimit::Wide);
            }
            increment(&mut open.wide, wide);
        }
        increment(&mut open.nets, net);
        Ok(NetSlot {
            table: self.clone(),
            net,
            wide,
        })
    }
}

impl Drop for NetSlot {
    fn drop(&mut self) {
        let mut open = lock(&self.table.open);
        decrement(&mut open.nets, &self.net);
        if let Some(wide) = &self.wide {
            decrement(&mut open.wide, wide);
        }
    }
}

/// Events per key over a sliding window, estimated from the current and previous fixed
/// windows (the previous one weighted by how much of it still overlaps). Not locked: the
/// owner decides what one lock covers.
#[derive(Debug)]
struct Table<K> {
    window: Duration,
    entries: HashMap<K, Counts>,
    /// When a full table may next be swept for expired entries. A sweep is a scan, so a
    /// flood of new keys must not trigger one per insertion.
    next_sweep: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Counts {
    start: Instant,
    current: u32,
    previous: u32,
}

impl Counts {
    /// Moves the fixed windows forward to the one containing `now`.
    fn advance(&mut self, now: Instant, window: Duration) {
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= window * 2 {
            *self = Counts {
                start: now,
                current: 0,
                previous: 0,
            };
        } else if elapsed >= window {
            self.previous = self.current;
            self.current = 0;
            self.start += window;
        }
    }

    fn estimate(&self, now: Instant, window: Duration) -> f64 {
        let into_current =
            now.saturating_duration_since(self.start).as_secs_f64() / window.as_secs_f64();
        f64::from(self.previous) * (1.0 - into_current).max(0.0) + f64::from(self.current)
    }
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new(window: Duration) -> Self {
        Table {
            window: window.max(Duration::from_secs(1)),
            entries: HashMap::new(),
            next_sweep: None,
        }
    }

    /// The sliding-window estimate of events for `key`.
    fn estimate(&mut self, key: &K, now: Instant) -> f64 {
        let window = self.window;
        match self.entries.get_mut(key) {
            Some(counts) => {
                counts.advance(now, window);
                counts.estimate(now, window)
            }
            None => 0.0,
        }
    }

    /// Records `n` events for `key`.
    fn add(&mut self, key: K, n: u32, now: Instant) {
        if self.entries.len() >= MAX_TRACKED && !self.entries.contains_key(&key) {
            self.make_room(now);
        }
        let counts = self.entries.entry(key).or_insert(Counts {
            start: now,
            current: 0,
            previous: 0,
        });
        counts.advance(now, self.window);
        counts.current = counts.current.saturating_add(n);
    }

    /// Frees room in a full table: expired entries go first (at most one scan per
    /// quarter window, so a flood of new keys does not scan per insertion), then, while
    /// it is still full of live entries, the tenth with the fewest events. Whoever floods
    /// the table with fresh keys (one failure each, from many networks) so pushes out
    /// only keys as cheap as its own: to make postern forget a name with k failures it
    /// must first hold nine tenths of the table at k failures or more.
    fn make_room(&mut self, now: Instant) {
        let window = self.window;
        if self.next_sweep.is_none_or(|at| now >= at) {
            self.entries
                .retain(|_, counts| now.saturating_duration_since(counts.start) < window * 2);
            self.next_sweep = Some(now + window / 4);
        }
        if self.entries.len() < MAX_TRACKED {
            return;
        }
        let mut estimates: Vec<f64> = self
            .entries
            .values_mut()
            .map(|counts| {
                counts.advance(now, window);
                counts.estimate(now, window)
            })
            .collect();
        let evict = (estimates.len() / EVICTED_WHEN_FULL).max(1);
        let (_, &mut threshold, _) = estimates.select_nth_unstable_by(evict - 1, f64::total_cmp);
        // Below the threshold are fewer than `evict` entries; ties at it go until the
        // tenth is reached, so a table of equal counts still keeps nine tenths.
        let mut ties = evict - estimates.iter().filter(|&&e| e < threshold).count();
        self.entries.retain(|_, counts| {
            let estimate = counts.estimate(now, window);
            if estimate < threshold {
                return false;
            }
            if estimate == threshold && ties > 0 {
                ties -= 1;
                return false;
            }
            true
        });
    }

    /// Takes back up to `n` events recorded for `key`, newest first.
    fn subtract(&mut self, key: &K, n: u32, now: Instant) {
        let window = self.window;
        if let Some(counts) = self.entries.get_mut(key) {
            counts.advance(now, window);
            let from_current = n.min(counts.current);
            counts.current -= from_current;
            counts.previous = counts.previous.saturating_sub(n - from_current);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

// === AuthGate ===

/// The failure-table key of a user name: a keyed hash (see `auth::Authenticator`), so
/// a flood of long names cannot grow the tables' memory.
pub type UserKey = u64;

/// The longest a user name's slowdown makes one attempt wait.
pub const MAX_USER_DELAY: Duration = Duration::from_secs(15);

/// What the [`AuthGate`] enforces.
#[derive(Debug, Clone, Copy)]
pub struct AuthLimits {
    /// Failed (or running) verifications per client network and window.
    pub per_net: u32,
    /// Failed (or running) verifications per site and window, where the site is wider
    /// than the network (IPv6; see [`Origin`]).
    pub per_site: u32,
    /// Failed (or running) verifications per user name and window, past which the name
    /// is slowed down, and refused from the sites that failed it (see [`Origin`]).
    pub per_user: u32,
    pub window: Duration,
    /// The first slowdown past `per_user`; it doubles with each further failure, up to
    /// [`MAX_USER_DELAY`].
    pub user_delay: Duration,
}

/// Why an attempt is refused without any password being checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The client's network is over its failure limit.
    Net,
    /// The client's site is over its failure limit.
    Site,
    /// The user name is over its limit and this site is among those that failed it.
    User,
}

impl Refusal {
    /// The `scope` label of `postern_auth_throttled_total` and the log line.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Net => crate::metrics::label::throttle_scope::IP,
            Refusal::Site => crate::metrics::label::throttle_scope::WIDE_PREFIX,
            Refusal::User => crate::metrics::label::throttle_scope::USER,
        }
    }
}

/// The gate's answer to an attempt.
#[derive(Debug)]
pub enum Admission {
    /// Verify after waiting `delay`; `ticket` holds the attempt's place in the windows
    /// until its outcome is known.
    Verify {
        ticket: AuthTicket,
        delay: Duration,
    },
    Refused(Refusal),
}

/// AUTH failure limits per client network and per user name.
///
/// An attempt takes its place in both windows *before* its hash is computed (check and
/// reserve under one lock), so a burst of parallel attempts can never verify more than
/// the limit; a success gives its place back. Failures for a user name never lock the
/// name out everywhere, which would let anyone deny service to any user: past the limit
/// the name is slowed down, and refused only from the sites that failed it.
///
/// A network that logged in as a user within the window is trusted for that user: its
/// attempts for the name meet none of these limits, network and site ones included, so
/// a user sharing a carrier's address with a guesser keeps logging in. The trust holds
/// while the name's failures from that network (running attempts included) are below
/// `per_user`: a guesser on the same address gets no more tries at that user's
/// password than the per-user limit allows anywhere. Past it the user is refused there
/// too, which cannot be helped: the two share an address. Failures from other /64s of
/// the site do not count against a /64's trust.
#[derive(Debug)]
pub struct AuthGate {
    limits: AuthLimits,
    state: Mutex<GateState>,
}

#[derive(Debug)]
struct GateState {
    /// Failures per network, and per site where it is wider (see [`Origin`]).
    nets: Table<ClientNet>,
    users: Table<UserKey>,
    /// Failures of one user name from one network, and from its site where wider: the
    /// sites a name over its limit refuses, and what bounds the trust of a network.
    user_nets: Table<(UserKey, ClientNet)>,
    /// The networks that logged in as each user.
    logged_in: TrustedNets,
    /// Verifications running now, per network and wider site. Bounded by the
    /// connections, so not swept.
    running_nets: HashMap<ClientNet, u32>,
    running_users: HashMap<UserKey, u32>,
    running_user_nets: HashMap<(UserKey, ClientNet), u32>,
}

fn increment<K: Hash + Eq>(map: &mut HashMap<K, u32>, key: K) {
    *map.entry(key).or_insert(0) += 1;
}

fn decrement<K: Hash + Eq>(map: &mut HashMap<K, u32>, key: &K) {
    if let Some(count) = map.get_mut(key) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            map.remove(key);
        }
    }
}

fn running<K: Hash + Eq>(map: &HashMap<K, u32>, key: &K) -> f64 {
    f64::from(map.get(key).copied().unwrap_or(0))
}

impl AuthGate {
    pub fn new(limits: AuthLimits) -> Arc<Self> {
        Arc::new(AuthGate {
            limits,
            state: Mutex::new(GateState {
                nets: Table::new(limits.window),
                users: Table::new(limits.window),
                user_nets: Table::new(limits.window),
                logged_in: TrustedNets::new(limits.window),
                running_nets: HashMap::new(),
                running_users: HashMap::new(),
                running_user_nets: HashMap::new(),
            }),
        })
    }

    /// Decides whether an attempt for `user` from `origin` may be verified, and if so
    /// reserves its place.
    pub fn admit(self: &Arc<Self>, origin: Origin, user: UserKey, now: Instant) -> Admission {
        let limits = self.limits;
        let mut state = lock(&self.state);
        let trusted = self.trusted(&mut state, origin, user, now);
        let mut delay = Duration::ZERO;
        if !trusted {
            let net = origin.net;
            let net_count = state.nets.estimate(&net, now) + running(&state.running_nets, &net);
            if net_count >= f64::from(limits.per_net) {
                return Admission::Refused(Refusal::Net);
            }
            if let Some(site) = origin.wider_site() {
                let site_count =
                    state.nets.estimate(&site, now) + running(&state.running_nets, &site);
                if site_count >= f64::from(limits.per_site) {
                    return Admission::Refused(Refusal::Site);
                }
            }
            let user_count =
                state.users.estimate(&user, now) + running(&state.running_users, &user);
            if user_count >= f64::from(limits.per_user) {
                let at_site = (user, origin.site);
                let failed_here = state.user_nets.estimate(&at_site, now) > 0.0
                    || state.running_user_nets.contains_key(&at_site);
                if failed_here {
                    return Admission::Refused(Refusal::User);
                }
                delay = limits.user_delay(user_count);
            }
        }
        Admission::Verify {
            ticket: self.take_place(&mut state, origin, user),
            delay,
        }
    }

    /// Takes an attempt's place without checking the limits: the windows shared through
    /// the limits store decided, and this gate only keeps the replica's own count, to
    /// fall back on when the store cannot answer.
    pub fn reserve(self: &Arc<Self>, origin: Origin, user: UserKey) -> AuthTicket {
        let mut state = lock(&self.state);
        self.take_place(&mut state, origin, user)
    }

    /// Whether `origin`'s network logged in as `user` within the window, and the name's
    /// failures from that network (running attempts included) are below `per_user`.
    fn trusted(&self, state: &mut GateState, origin: Origin, user: UserKey, now: Instant) -> bool {
        if !state.logged_in.logged_in(user, origin.net, now) {
            return false;
        }
        let pair = (user, origin.net);
        let failures =
            state.user_nets.estimate(&pair, now) + running(&state.running_user_nets, &pair);
        failures < f64::from(self.limits.per_user)
    }

    fn take_place(
        self: &Arc<Self>,
        state: &mut GateState,
        origin: Origin,
        user: UserKey,
    ) -> AuthTicket {
        increment(&mut state.running_users, user);
        for net in origin.counted_in() {
            increment(&mut state.running_nets, net);
            increment(&mut state.running_user_nets, (user, net));
        }
        AuthTicket {
            gate: self.clone(),
            origin,
            user,
            settled: false,
        }
    }

    /// Takes back `n` failures of `user` from `origin` (a client that failed one
    /// mechanism and then logged in with another on the same connection).
    pub fn forgive(&self, origin: Origin, user: UserKey, n: u32, now: Instant) {
        let mut state = lock(&self.state);
        state.users.subtract(&user, n, now);
        for net in origin.counted_in() {
            state.user_nets.subtract(&(user, net), n, now);
        }
    }

    fn settle(&self, origin: Origin, user: UserKey, outcome: Settled) {
        let mut state = lock(&self.state);
        decrement(&mut state.running_users, &user);
        for net in origin.counted_in() {
            decrement(&mut state.running_nets, &net);
            decrement(&mut state.running_user_nets, &(user, net));
        }
        match outcome {
            Settled::Succeeded(now) => state.logged_in.record(user, origin.net, now),
            Settled::Failed(now) => {
                state.users.add(user, 1, now);
                for net in origin.counted_in() {
                    state.nets.add(net, 1, now);
                    state.user_nets.add((user, net), 1, now);
                }
            }
            Settled::GivenBack => {}
        }
    }
}

/// How an [`AuthTicket`] ended.
enum Settled {
    Succeeded(Instant),
    Failed(Instant),
    GivenBack,
}

impl AuthLimits {
    /// The slowdown of an attempt for a name with `count` failures (or running
    /// attempts) at or past `per_user`: `user_delay` at the limit, doubling with each one
    /// past it, capped.
    pub fn user_delay(&self, count: f64) -> Duration {
        let over = (count - f64::from(self.per_user)).clamp(0.0, 16.0) as u32;
        self.user_delay
            .saturating_mul(1 << over)
            .min(MAX_USER_DELAY)
    }
}

/// One attempt's place in the [`AuthGate`]'s windows. Dropped without an outcome (no
/// verifier was free, the client went away) it gives the place back.
#[derive(Debug)]
pub struct AuthTicket {
    gate: Arc<AuthGate>,
    origin: Origin,
    user: UserKey,
    settled: bool,
}

impl AuthTicket {
    /// The credentials were valid: the place is given back and the network is trusted
    /// for this user for a window.
    pub fn succeeded(mut self, now: Instant) {
        self.settled = true;
        self.gate
            .settle(self.origin, self.user, Settled::Succeeded(now));
    }

    /// The credentials were wrong: the place becomes a failure.
    pub fn failed(mut self, now: Instant) {
        self.settled = true;
        self.gate
            .settle(self.origin, self.user, Settled::Failed(now));
    }
}

impl Drop for AuthTicket {
    fn drop(&mut self) {
        if !self.settled {
            self.gate.settle(self.origin, self.user, Settled::GivenBack);
        }
    }
}

/// How long a failed AUTH takes at least, so that a failure answers after the same time
/// whatever the user: unknown, `{PLAIN}`, a cheap hash, a costly one or CRAM-MD5. The
/// target follows the costliest verification seen (the decoy, see
/// `users::Check::decoy_work`): it rises quickly when a failure took longer, so a hash the
/// cost model underrated is still covered, and falls slowly with the decoy's own samples
/// once the machine is less busy. Durations are passed in.
#[derive(Debug, Default)]
pub struct FailurePace {
    estimate: Mutex<Duration>,
}

impl FailurePace {
    /// A first sample of the decoy's time, measured before any client failed.
    pub fn seed(&self, decoy: Duration) {
        let mut estimate = lock(&self.estimate);
        *estimate = (*estimate).max(decoy);
    }

    /// A failed verification took `took`; `decoy_work` if it cost what the decoy costs.
    pub fn observe(&self, took: Duration, decoy_work: bool) {
        let mut estimate = lock(&self.estimate);
        let current = *estimate;
        if took > current {
            *estimate = current + (took - current) / 2;
        } else if decoy_work {
            *estimate = current - (current - took) / 8;
        }
    }

    /// How long to wait after a failed verification that took `took`. The target sits a
    /// quarter above the estimate, so that the decoy's own failures are padded too and
    /// every failure ends at the same moment, not only the cheap ones.
    pub fn pad(&self, took: Duration) -> Duration {
        let target = *lock(&self.estimate) * 5 / 4;
        target.saturating_sub(took)
    }
}

/// How often repeated throttle events from one network make a log line.
pub const THROTTLE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Keeps throttle events from flooding the log: the first event from a network is logged
/// at once, the rest are counted and reported in one line per network per interval. A
/// brute-force run refused thousands of times a minute costs a line a minute.
#[derive(Debug)]
pub struct ThrottleLog {
    interval: Duration,
    entries: Mutex<HashMap<ClientNet, Held>>,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    /// When the current interval began (the last line logged for the network).
    since: Instant,
    /// Events since then that were not logged.
    count: u64,
}

impl ThrottleLog {
    pub fn new(interval: Duration) -> Self {
        ThrottleLog {
            interval,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// One throttle event from `net`: `Some(n)` if a line is due now, reporting `n`
    /// events (this one and any held back), `None` if it is held back.
    pub fn note(&self, net: ClientNet, now: Instant) -> Option<u64> {
        let mut entries = lock(&self.entries);
        match entries.get_mut(&net) {
            Some(held) if now.saturating_duration_since(held.since) < self.interval => {
                held.count += 1;
                None
            }
            Some(held) => {
                let events = held.count + 1;
                *held = Held {
                    since: now,
                    count: 0,
                };
                Some(events)
            }
            None => {
                if entries.len() >= MAX_TRACKED {
                    // Full: an arbitrary network loses its held-back count, never memory.
                    if let Some(victim) = entries.keys().next().copied() {
                        entries.remove(&victim);
                    }
                }
                entries.insert(
                    net,
                    Held {
                        since: now,
                        count: 0,
                    },
                );
                Some(1)
            }
        }
    }

    /// The networks whose interval is over with events held back, and how many: one line
    /// each is due. Networks quiet for a whole interval are forgotten.
    pub fn due(&self, now: Instant) -> Vec<(ClientNet, u64)> {
        let mut due = Vec::new();
        lock(&self.entries).retain(|net, held| {
            if now.saturating_duration_since(held.since) < self.interval {
                return true;
            }
            if held.count == 0 {
                return false;
            }
            due.push((*net, held.count));
            *held = Held {
                since: now,
                count: 0,
            };
            true
        });
        due
    }
}

/// One connection's failed attempts, so that a client that fails one mechanism and
/// succeeds with the next (smtplib tries CRAM-MD5 first, which a hashed user cannot
/// pass) is not counted as guessing passwords.
#[derive(Debug, Default)]
pub struct AuthHistory {
    failures: Vec<(UserKey, Mechanism)>,
}

/// Failures an [`AuthHistory`] remembers; the per-connection failure limit is lower.
const MAX_HISTORY: usize = 16;

impl AuthHistory {
    pub fn failed(&mut self, user: UserKey, mechanism: Mechanism) {
        if self.failures.len() < MAX_HISTORY {
            self.failures.push((user, mechanism));
        }
    }

    /// `user` logged in with `mechanism`: how many of this connection's failures for
    /// `user` were with another mechanism, and so are not held against it.
    pub fn succeeded(&mut self, user: UserKey, mechanism: Mechanism) -> u32 {
        let forgiven = self
            .failures
            .iter()
            .filter(|(u, m)| *u == user && *m != mechanism)
            .count() as u32;
        self.failures.retain(|(u, _)| *u != user);
        forgiven
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let g = NetGrouping::default();
        let a = ip("2001:db8:1:2::1");
        assert_eq!(g.net(a), g.net(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(g.net(a), g.net(ip("2001:db8:1:3::1")));
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        assert_eq!(g.net(mapped), g.net(ip("192.0.2.7")));
        assert_eq!(g.wide(mapped), None);
        assert_eq!(g.wide(ip("192.0.2.7")), None);
        assert_ne!(
            g.net(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            g.net(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
    }

    #[test]
    fn nat64_well_known_addresses_count_as_the_ipv4_client_they_carry() {
        let g = NetGrouping::default();
        let translated = ip("64:ff9b::192.0.2.7");
        assert_eq!(g.net(translated), g.net(ip("192.0.2.7")));
        assert_ne!(g.net(translated), g.net(ip("64:ff9b::198.51.100.1")));
        assert_eq!(g.wide(translated), None);
        // Only the well-known /96: the rest of 64:ff9b::/32 is plain IPv6.
        assert_eq!(
            g.net(ip("64:ff9b:0:0:1::c000:207")),
            g.net(ip("64:ff9b:0:0:2::1"))
        );
    }

    #[test]
    fn ipv6_groups_at_the_configured_prefixes() {
        // (name, narrow, wide, a, b, same narrow network, same wide network)
        let rows = [
            (
                "/64s in one /48",
                64,
                48,
                "2001:db8:1:2::1",
                "2001:db8:1:3::1",
                false,
                true,
            ),
            (
                "/48s apart",
                64,
                48,
                "2001:db8:1:2::1",
                "2001:db8:2:2::1",
                false,
                false,
            ),
            (
                "one /56",
                56,
                48,
                "2001:db8:1:200::1",
                "2001:db8:1:2ff::1",
                true,
                true,
            ),
            (
                "/56s apart",
                56,
                48,
                "2001:db8:1:200::1",
                "2001:db8:1:300::1",
                false,
                true,
            ),
            (
                "odd bit lengths",
                61,
                47,
                "2001:db8:0:8::1",
                "2001:db8:1:f::1",
                false,
                true,
            ),
            (
                "one /61",
                61,
                47,
                "2001:db8:0:8::1",
                "2001:db8:0:f::1",
                true,
                true,
            ),
            (
                "/128: one address",
                128,
                64,
                "2001:db8::1",
                "2001:db8::2",
                false,
                true,
            ),
        ];
        for (name, narrow, wide, a, b, same_net, same_wide) in rows {
            let g = NetGrouping {
                v6_prefix: narrow,
                v6_wide_prefix: wide,
            };
            assert_eq!(g.net(ip(a)) == g.net(ip(b)), same_net, "{name}");
            assert_eq!(g.wide(ip(a)) == g.wide(ip(b)), same_wide, "{name}");
            assert!(g.wide(ip(a)).is_some(), "{name}");
        }
        let g = NetGrouping::default();
        assert_eq!(
            g.net(ip("2001:db8:1:2:3::4")).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            g.wide(ip("2001:db8:1:2:3::4")).map(|n| n.to_string()),
            Some("2001:db8:1::/48".to_owned())
        );
        // A wide prefix not wider than the narrow one adds no second count.
        let same = NetGrouping {
            v6_prefix: 48,
            v6_wide_prefix: 48,
        };
        assert_eq!(same.wide(ip("2001:db8::1")), None);
    }

    #[test]
    fn per_net_slots_are_limited_and_released_on_drop() {
        let table = PerNetSlots::new(2, 100);
        let net = ClientNet::V4([192, 0, 2, 1]);
        let first = table.try_acquire(net, None).unwrap();
        let _second = table.try_acquire(net, None).unwrap();
        assert_eq!(table.try_acquire(net, None).unwrap_err(), OverLimit::Net);
        assert!(
            table
                .try_acquire(ClientNet::V4([192, 0, 2, 2]), None)
                .is_ok()
        );
        drop(first);
        assert!(table.try_acquire(net, None).is_ok());
    }

    #[test]
    fn the_wide_cap_spans_the_narrow_networks_inside_it() {
        let g = NetGrouping::default();
        let table = PerNetSlots::new(2, 3);
        let slot = |addr: &str| table.try_acquire(g.net(ip(addr)), g.wide(ip(addr)));
        let a1 = slot("2001:db8:1:1::1").unwrap();
        let _a2 = slot("2001:db8:1:1::2").unwrap();
        assert_eq!(slot("2001:db8:1:1::3").unwrap_err(), OverLimit::Net);
        let _b = slot("2001:db8:1:2::1").unwrap();
        // Three open in 2001:db8:1::/48: a fresh /64 in it is over the wide cap...
        assert_eq!(slot("2001:db8:1:3::1").unwrap_err(), OverLimit::Wide);
        // ...another /48 is not, and a refusal took no slot.
        assert!(slot("2001:db8:2:1::1").is_ok());
        drop(a1);
        assert!(slot("2001:db8:1:3::1").is_ok());
    }

    #[test]
    fn failures_block_within_the_window_and_decay_after_it() {
        let window = Duration::from_secs(60);
        let mut table = Table::new(window);
        let blocked = |table: &mut Table<&str>, key, at| table.estimate(&key, at) >= 3.0;
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(!blocked(&mut table, "ip", t0), "after {i} failures");
            table.add("ip", 1, t0);
        }
        assert!(blocked(&mut table, "ip", t0));
        assert!(!blocked(&mut table, "other", t0));
        assert!(blocked(
            &mut table,
            "ip",
            t0 + window - Duration::from_secs(1)
        ));
        // Half a window later the previous window only weighs 3 * 0.5.
        assert!(!blocked(&mut table, "ip", t0 + window + window / 2));
        assert!(!blocked(&mut table, "ip", t0 + window * 3));
    }

    #[test]
    fn the_table_never_grows_past_its_bound() {
        let mut table = Table::new(Duration::from_secs(60));
        let now = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 50) {
            table.add(i, 1, now);
        }
        assert!(table.len() <= MAX_TRACKED);
    }

    #[test]
    fn a_flood_of_fresh_keys_pushes_out_the_cheapest_not_a_counted_name() {
        let window = Duration::from_secs(600);
        let mut table = Table::new(window);
        let t0 = Instant::now();
        table.add(u32::MAX, 3, t0);
        // Many times the table's size of one-failure keys, later in the same window, so
        // the sweep of expired entries frees nothing.
        let later = t0 + Duration::from_secs(10);
        for i in 0..(3 * MAX_TRACKED as u32) {
            table.add(i, 1, later);
        }
        assert!(table.len() <= MAX_TRACKED);
        assert_eq!(table.estimate(&u32::MAX, later), 3.0);
        // Keys costlier than the counted one do push it out, once they fill the table.
        for i in 0..MAX_TRACKED as u32 {
            table.add(i, 4, later);
        }
        assert_eq!(table.estimate(&u32::MAX, later), 0.0);
    }

    #[test]
    fn a_full_table_of_equal_counts_forgets_a_tenth_at_once() {
        let mut table = Table::new(Duration::from_secs(600));
        let now = Instant::now();
        for i in 0..MAX_TRACKED as u32 {
            table.add(i, 1, now);
        }
        assert_eq!(table.len(), MAX_TRACKED);
        table.add(u32::MAX, 1, now);
        assert_eq!(
            table.len(),
            MAX_TRACKED - MAX_TRACKED / EVICTED_WHEN_FULL + 1
        );
    }

    fn gate(per_net: u32, per_user: u32) -> Arc<AuthGate> {
        AuthGate::new(AuthLimits {
            per_net,
            per_site: 4 * per_net,
            per_user,
            window: Duration::from_secs(600),
            user_delay: Duration::from_secs(1),
        })
    }

    fn net(last: u8) -> ClientNet {
        ClientNet::V4([198, 51, 100, last])
    }

    const ALICE: UserKey = 1;
    const BOB: UserKey = 2;

    /// Admits and fails one attempt; panics if it was refused.
    #[track_caller]
    fn fail(
        gate: &Arc<AuthGate>,
        from: impl Into<Origin>,
        user: UserKey,
        now: Instant,
    ) -> Duration {
        match gate.admit(from.into(), user, now) {
            Admission::Verify { ticket, delay } => {
                ticket.failed(now);
                delay
            }
            Admission::Refused(why) => panic!("refused: {why:?}"),
        }
    }

    #[track_caller]
    fn refusal(
        gate: &Arc<AuthGate>,
        from: impl Into<Origin>,
        user: UserKey,
        now: Instant,
    ) -> Option<Refusal> {
        match gate.admit(from.into(), user, now) {
            Admission::Verify { .. } => None,
            Admission::Refused(why) => Some(why),
        }
    }

    #[test]
    fn user_failures_from_many_networks_slow_the_name_but_refuse_only_those_networks() {
        let gate = gate(100, 3);
        let now = Instant::now();
        for i in 0..3 {
            assert_eq!(
                fail(&gate, net(i), ALICE, now),
                Duration::ZERO,
                "attempt {i}"
            );
        }
        // Over the limit: the networks that failed are refused...
        for i in 0..3 {
            assert_eq!(refusal(&gate, net(i), ALICE, now), Some(Refusal::User));
        }
        // ...a fresh one is slowed, more with each failure, up to the cap...
        assert_eq!(fail(&gate, net(10), ALICE, now), Duration::from_secs(1));
        assert_eq!(fail(&gate, net(11), ALICE, now), Duration::from_secs(2));
        assert_eq!(fail(&gate, net(12), ALICE, now), Duration::from_secs(4));
        for i in 13..30 {
            fail(&gate, net(i), ALICE, now);
        }
        match gate.admit(net(99).into(), ALICE, now) {
            Admission::Verify { delay, .. } => assert_eq!(delay, MAX_USER_DELAY),
            other => panic!("{other:?}"),
        }
        // ...and other names are untouched.
        assert_eq!(refusal(&gate, net(0), BOB, now), None);
    }

    #[test]
    fn a_site_walking_its_64s_is_refused_once_any_of_them_failed_the_name() {
        let gate = gate(100, 3);
        let now = Instant::now();
        let from = |addr: &str| NetGrouping::default().origin(addr.parse().unwrap());
        // alice's own /64 inside the attacker's /48 (a carrier's pool) logged in before.
        let home = from("2001:db8:a:100::1");
        match gate.admit(home, ALICE, now) {
            Admission::Verify { ticket, .. } => ticket.succeeded(now),
            other => panic!("{other:?}"),
        }
        // Three /64s of the /48 put alice over her limit.
        for i in 0..3 {
            fail(&gate, from(&format!("2001:db8:a:{i}::1")), ALICE, now);
        }
        // Every other /64 of that /48 is refused, not slowed: no walking for guesses...
        for fresh in ["2001:db8:a:3::1", "2001:db8:a:ffff::1"] {
            assert_eq!(
                refusal(&gate, from(fresh), ALICE, now),
                Some(Refusal::User),
                "{fresh}"
            );
        }
        // ...another site is only slowed, as any fresh network is...
        assert_eq!(
            fail(&gate, from("2001:db8:b::1"), ALICE, now),
            Duration::from_secs(1)
        );
        // ...and the /64 that logged in is neither refused nor slowed.
        match gate.admit(home, ALICE, now) {
            Admission::Verify { delay, .. } => assert_eq!(delay, Duration::ZERO),
            other => panic!("{other:?}"),
        }
        // The failures counted against each /64's own window, not the site's.
        assert_eq!(refusal(&gate, from("2001:db8:a:3::1"), BOB, now), None);
    }

    #[test]
    fn a_site_walking_its_64s_meets_the_site_failure_limit() {
        // 3 failures per /64, 12 per /48.
        let gate = gate(3, 100);
        let now = Instant::now();
        let from = |site: u16, net: u16| {
            let addr = format!("2001:db8:{site:x}:{net:x}::1");
            NetGrouping::default().origin(addr.parse().unwrap())
        };
        // alice logged in from a /64 of the site before the guessing.
        let home = from(0xa, 0x100);
        match gate.admit(home, ALICE, now) {
            Admission::Verify { ticket, .. } => ticket.succeeded(now),
            other => panic!("{other:?}"),
        }
        let mut user = 100;
        for net in 0..4 {
            for _ in 0..3 {
                user += 1;
                fail(&gate, from(0xa, net), user, now);
            }
        }
        // The site's window does not refuse her there.
        assert_eq!(refusal(&gate, home, ALICE, now), None);
        assert_eq!(refusal(&gate, home, BOB, now), Some(Refusal::Site));
        assert_eq!(refusal(&gate, from(0xa, 0), 99, now), Some(Refusal::Net));
        assert_eq!(refusal(&gate, from(0xa, 4), 99, now), Some(Refusal::Site));
        assert_eq!(
            refusal(&gate, from(0xa, 0xffff), 99, now),
            Some(Refusal::Site)
        );
        assert_eq!(refusal(&gate, from(0xb, 0), 99, now), None);
        // IPv4 addresses have no site of their own to fill.
        for last in 0..20 {
            fail(&gate, net(last), 1000 + u64::from(last), now);
        }
        assert_eq!(refusal(&gate, net(20), 99, now), None);
    }

    #[test]
    fn a_network_that_logged_in_is_trusted_for_that_user_for_as_many_failures() {
        let gate = gate(100, 2);
        let now = Instant::now();
        let home = net(1);
        match gate.admit(home.into(), ALICE, now) {
            Admission::Verify { ticket, .. } => ticket.succeeded(now),
            other => panic!("{other:?}"),
        }
        // Guessing from elsewhere neither refuses nor slows the network that logged in.
        for i in 0..5 {
            fail(&gate, net(50 + i), ALICE, now);
        }
        assert_eq!(refusal(&gate, net(50), ALICE, now), Some(Refusal::User));
        assert_eq!(fail(&gate, home, ALICE, now), Duration::ZERO);
        // The trust lasts a window from the login.
        let later = now + Duration::from_secs(601);
        assert_eq!(refusal(&gate, home, ALICE, later), Some(Refusal::User));
        // Its own failures use the trust up: two (per_user), then the limits apply.
        assert_eq!(fail(&gate, home, ALICE, now), Duration::ZERO);
        assert_eq!(refusal(&gate, home, ALICE, now), Some(Refusal::User));
    }

    #[test]
    fn a_user_who_logged_in_passes_the_network_limit_a_guesser_there_used_up() {
        let gate = gate(3, 2);
        let now = Instant::now();
        let shared = net(7);
        match gate.admit(shared.into(), ALICE, now) {
            Admission::Verify { ticket, .. } => ticket.succeeded(now),
            other => panic!("{other:?}"),
        }
        // A guesser behind the same address fills its network window.
        for user in 10..13 {
            fail(&gate, shared, user, now);
        }
        assert_eq!(refusal(&gate, shared, BOB, now), Some(Refusal::Net));
        // alice still gets in from there, and a success does not use the trust up.
        for _ in 0..5 {
            match gate.admit(shared.into(), ALICE, now) {
                Admission::Verify { ticket, delay } => {
                    assert_eq!(delay, Duration::ZERO);
                    ticket.succeeded(now);
                }
                other => panic!("{other:?}"),
            }
        }
        // A burst on the trust stops at per_user running attempts...
        let held: Vec<Admission> = (0..5)
            .map(|_| gate.admit(shared.into(), ALICE, now))
            .collect();
        let admitted = held
            .iter()
            .filter(|a| matches!(a, Admission::Verify { .. }))
            .count();
        assert_eq!(admitted, 2);
        drop(held);
        // ...and failures on it use it up: then the network limit applies to alice too.
        fail(&gate, shared, ALICE, now);
        fail(&gate, shared, ALICE, now);
        assert_eq!(refusal(&gate, shared, ALICE, now), Some(Refusal::Net));
    }

    #[test]
    fn the_network_limit_refuses_whatever_the_user() {
        let gate = gate(3, 100);
        let now = Instant::now();
        for user in 0..3 {
            fail(&gate, net(1), user, now);
        }
        assert_eq!(refusal(&gate, net(1), 77, now), Some(Refusal::Net));
        assert_eq!(refusal(&gate, net(2), 77, now), None);
    }

    #[test]
    fn running_attempts_hold_their_place_and_success_gives_it_back() {
        let gate = gate(5, 3);
        let now = Instant::now();
        // A burst from one network for many names: only the limit gets through.
        let tickets: Vec<AuthTicket> = (0..50)
            .filter_map(|user| match gate.admit(net(1).into(), user, now) {
                Admission::Verify { ticket, .. } => Some(ticket),
                Admission::Refused(_) => None,
            })
            .collect();
        assert_eq!(tickets.len(), 5);
        // Success and a dropped ticket give the place back; a failure keeps it.
        let mut tickets = tickets.into_iter();
        if let Some(t) = tickets.next() {
            t.succeeded(now);
        }
        if let Some(t) = tickets.next() {
            drop(t);
        }
        if let Some(t) = tickets.next() {
            t.failed(now);
        }
        let rest: Vec<AuthTicket> = tickets.collect();
        assert_eq!(refusal(&gate, net(1), 100, now), None);
        drop(rest);
        // A burst for one name from one network stops at the user limit.
        let burst: Vec<Admission> = (0..50)
            .map(|_| gate.admit(net(2).into(), ALICE, now))
            .collect();
        let admitted = burst
            .iter()
            .filter(|a| matches!(a, Admission::Verify { .. }))
            .count();
        assert_eq!(admitted, 3);
    }

    #[test]
    fn forgiven_failures_leave_the_user_window() {
        let gate = gate(100, 2);
        let now = Instant::now();
        fail(&gate, net(1), ALICE, now);
        fail(&gate, net(1), ALICE, now);
        assert_eq!(refusal(&gate, net(1), ALICE, now), Some(Refusal::User));
        gate.forgive(net(1).into(), ALICE, 2, now);
        assert_eq!(refusal(&gate, net(1), ALICE, now), None);

        let mut history = AuthHistory::default();
        history.failed(ALICE, Mechanism::CramMd5);
        history.failed(ALICE, Mechanism::Plain);
        history.failed(BOB, Mechanism::CramMd5);
        // Only the other mechanism's failure for the same name is forgiven.
        assert_eq!(history.succeeded(ALICE, Mechanism::Plain), 1);
        assert_eq!(history.succeeded(ALICE, Mechanism::Login), 0);
        assert_eq!(history.succeeded(BOB, Mechanism::Plain), 1);
    }

    #[test]
    fn failure_pace_pads_every_failure_to_the_costliest() {
        let ms = Duration::from_millis;
        let pace = FailurePace::default();
        pace.seed(ms(100));
        // A cheap failure waits until the target, a quarter above the decoy's time...
        assert_eq!(pace.pad(ms(0)), ms(125));
        assert_eq!(pace.pad(ms(3)), ms(122));
        // ...and so does the decoy itself.
        assert_eq!(pace.pad(ms(100)), ms(25));
        // Cheap samples never pull the target down; the decoy's do, slowly.
        pace.observe(ms(1), false);
        assert_eq!(pace.pad(ms(0)), ms(125));
        pace.observe(ms(60), true);
        assert_eq!(pace.pad(ms(0)), ms(118) + Duration::from_micros(750));
        // A costlier hash than expected raises it at once by half the difference.
        pace.observe(ms(295), false);
        assert_eq!(pace.pad(ms(0)), ms(243) + Duration::from_micros(750));
    }

    #[test]
    fn throttle_log_reports_one_line_per_network_per_interval() {
        let log = ThrottleLog::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let a = ClientNet::V4([192, 0, 2, 1]);
        let b = ClientNet::V4([192, 0, 2, 2]);
        assert_eq!(log.note(a, t0), Some(1));
        for i in 0..100 {
            assert_eq!(log.note(a, t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(log.note(b, t0), Some(1));
        assert!(log.due(t0 + Duration::from_secs(59)).is_empty());
        // The interval ends: one line for a's 100 held-back events; b had none.
        assert_eq!(log.due(t0 + Duration::from_secs(60)), vec![(a, 100)]);
        assert_eq!(log.note(a, t0 + Duration::from_secs(61)), None);
        // An event after the interval reports itself and what was held back.
        assert_eq!(log.note(a, t0 + Duration::from_secs(121)), Some(2));
        // b was quiet for a whole interval: forgotten, so its next event logs at once.
        assert_eq!(log.note(b, t0 + Duration::from_secs(200)), Some(1));
    }

    #[test]
    fn client_nets_display_as_an_address_or_a_64() {
        let v6: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        assert_eq!(
            NetGrouping::default().net(v6).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(ClientNet::V4([192, 0, 2, 7]).to_string(), "192.0.2.7");
    }
}
