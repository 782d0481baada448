//! Abuse limits shared by all connections: open connections per client network, and
//! authentication failures per client network and per user name in a sliding window.
//!
//! Both tables are bounded: the connection table by the connection limit itself, the
//! failure table by [`MAX_TRACKED`] entries, so a flood from many addresses costs a
//! fixed amount of memory. Time is passed in, so the logic is tested without a clock.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most keys the failure table tracks at once (~50 bytes each).
pub const MAX_TRACKED: usize = 100_000;

/// A client's network as the limits see it: an IPv4 address, or an IPv6 /64 (one
/// subscriber usually owns a whole /64, so counting single IPv6 addresses is useless).
/// IPv4-mapped IPv6 addresses count as the IPv4 address they carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientNet {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
}

impl From<IpAddr> for ClientNet {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => ClientNet::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientNet::V4(v4.octets()),
                None => {
                    let mut prefix = [0u8; 8];
                    prefix.copy_from_slice(&v6.octets()[..8]);
                    ClientNet::V6Prefix(prefix)
                }
            },
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The tables hold plain counters; a panic elsewhere cannot leave them inconsistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Open connections per client network.
#[derive(Debug)]
pub struct PerNetConnections {
    limit: u32,
    open: Mutex<HashMap<ClientNet, u32>>,
}

/// Holds one connection slot of a network; dropping it frees the slot.
#[derive(Debug)]
pub struct NetSlot {
    table: Arc<PerNetConnections>,
    net: ClientNet,
}

impl PerNetConnections {
    pub fn new(limit: u32) -> Arc<Self> {
        Arc::new(PerNetConnections {
            limit,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `net`, or `None` if it already has `limit` connections open.
    pub fn try_acquire(self: &Arc<Self>, net: ClientNet) -> Option<NetSlot> {
        let mut open = lock(&self.open);
        let count = open.entry(net).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(NetSlot {
            table: self.clone(),
            net,
        })
    }
}

impl Drop for NetSlot {
    fn drop(&mut self) {
        let mut open = lock(&self.table.open);
        if let Some(count) = open.get_mut(&self.net) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.net);
            }
        }
    }
}

/// Failures per key over a sliding window, estimated from the current and previous
/// fixed windows (the previous one weighted by how much of it still overlaps).
#[derive(Debug)]
pub struct FailureWindow<K> {
    window: Duration,
    limit: u32,
    entries: Mutex<HashMap<K, Counts>>,
    /// When a full table may next be swept for expired entries. A sweep is a scan
    /// under the lock, so a flood of new keys must not trigger one per insertion.
    next_sweep: Mutex<Option<Instant>>,
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

impl<K: Hash + Eq + Clone> FailureWindow<K> {
    pub fn new(limit: u32, window: Duration) -> Self {
        FailureWindow {
            window: window.max(Duration::from_secs(1)),
            limit,
            entries: Mutex::new(HashMap::new()),
            next_sweep: Mutex::new(None),
        }
    }

    /// Whether `key` reached the limit: further attempts are refused without checking
    /// any password, so a brute-force run cannot burn CPU on the KDF.
    pub fn is_blocked(&self, key: &K, now: Instant) -> bool {
        let mut entries = lock(&self.entries);
        match entries.get_mut(key) {
            Some(counts) => {
                counts.advance(now, self.window);
                counts.estimate(now, self.window) >= f64::from(self.limit)
            }
            None => false,
        }
    }

    /// Records one failure for `key`.
    pub fn record_failure(&self, key: K, now: Instant) {
        self.add(key, 1, now);
    }

    /// The sliding-window estimate of events for `key`, rounded down.
    pub fn count(&self, key: &K, now: Instant) -> u64 {
        let mut entries = lock(&self.entries);
        match entries.get_mut(key) {
            Some(counts) => {
                counts.advance(now, self.window);
                counts.estimate(now, self.window) as u64
            }
            None => 0,
        }
    }

    /// Records `n` events for `key`.
    pub fn add(&self, key: K, n: u32, now: Instant) {
        let mut entries = lock(&self.entries);
        if entries.len() >= MAX_TRACKED && !entries.contains_key(&key) {
            let window = self.window;
            let mut next_sweep = lock(&self.next_sweep);
            if next_sweep.is_none_or(|at| now >= at) {
                entries
                    .retain(|_, counts| now.saturating_duration_since(counts.start) < window * 2);
                *next_sweep = Some(now + window / 4);
            }
            if entries.len() >= MAX_TRACKED {
                // Still full of live entries: forget an arbitrary one rather than grow.
                if let Some(victim) = entries.keys().next().cloned() {
                    entries.remove(&victim);
                }
            }
        }
        let counts = entries.entry(key).or_insert(Counts {
            start: now,
            current: 0,
            previous: 0,
        });
        counts.advance(now, self.window);
        counts.current = counts.current.saturating_add(n);
    }

    pub fn tracked(&self) -> usize {
        lock(&self.entries).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ClientNet::from(a), ClientNet::from(b));
        assert_ne!(ClientNet::from(a), ClientNet::from(c));
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        assert_eq!(
            ClientNet::from(mapped),
            ClientNet::from(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)))
        );
        assert_ne!(
            ClientNet::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            ClientNet::from(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
    }

    #[test]
    fn per_net_slots_are_limited_and_released_on_drop() {
        let table = PerNetConnections::new(2);
        let net = ClientNet::V4([192, 0, 2, 1]);
        let first = table.try_acquire(net).unwrap();
        let _second = table.try_acquire(net).unwrap();
        assert!(table.try_acquire(net).is_none());
        assert!(table.try_acquire(ClientNet::V4([192, 0, 2, 2])).is_some());
        drop(first);
        assert!(table.try_acquire(net).is_some());
    }

    #[test]
    fn failures_block_within_the_window_and_decay_after_it() {
        let window = Duration::from_secs(60);
        let limit = FailureWindow::new(3, window);
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(!limit.is_blocked(&"ip", t0), "after {i} failures");
            limit.record_failure("ip", t0);
        }
        assert!(limit.is_blocked(&"ip", t0));
        assert!(!limit.is_blocked(&"other", t0));
        assert!(limit.is_blocked(&"ip", t0 + window - Duration::from_secs(1)));
        // Half a window later the previous window only weighs 3 * 0.5.
        assert!(!limit.is_blocked(&"ip", t0 + window + window / 2));
        assert!(!limit.is_blocked(&"ip", t0 + window * 3));
    }

    #[test]
    fn the_table_never_grows_past_its_bound() {
        let limit = FailureWindow::new(1, Duration::from_secs(60));
        let now = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 50) {
            limit.record_failure(i, now);
        }
        assert!(limit.tracked() <= MAX_TRACKED);
    }
}
