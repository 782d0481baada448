//! The networks each user logged in from lately: what makes a network trusted for a
//! user in the [`AuthGate`](super::AuthGate).
//!
//! Bounded twice. A user keeps at most [`NETS_PER_USER`] networks, the most recent, so
//! one account logging in from thousands of IPv6 /64s (one /48 holds 65,536) fills only
//! its own share. The whole table holds at most [`MAX_TRACKED`] logins; when full of live
//! ones, the users with the most networks lose their oldest first, so a user's trust
//! from a network is forgotten only once every account of a flood is down to as few
//! networks, or more users than the table holds logged in within the window.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{ClientNet, EVICTED_WHEN_FULL, MAX_TRACKED, UserKey};

/// Most networks one user is trusted from at once. A user roaming between home, office
/// and a carrier's changing addresses stays well below it.
pub const NETS_PER_USER: usize = 16;

#[derive(Debug)]
pub(super) struct TrustedNets {
    window: Duration,
    /// Each user's logins, oldest first.
    by_user: HashMap<UserKey, Vec<(ClientNet, Instant)>>,
    /// Logins held, over all users.
    len: usize,
    /// When a full table may next be swept for expired logins (a sweep is a scan).
    next_sweep: Option<Instant>,
}

impl TrustedNets {
    pub(super) fn new(window: Duration) -> Self {
        TrustedNets {
            window,
            by_user: HashMap::new(),
            len: 0,
            next_sweep: None,
        }
    }

    /// Whether `net` logged in as `user` within the window.
    pub(super) fn logged_in(&self, user: UserKey, net: ClientNet, now: Instant) -> bool {
        self.by_user.get(&user).is_some_and(|logins| {
            logins
                .iter()
                .any(|&(from, at)| from == net && now.saturating_duration_since(at) < self.window)
        })
    }

    /// Records that `net` logged in as `user` at `now`.
    pub(super) fn record(&mut self, user: UserKey, net: ClientNet, now: Instant) {
        let known = self
            .by_user
            .get(&user)
            .is_some_and(|logins| logins.iter().any(|&(from, _)| from == net));
        if !known && self.len >= MAX_TRACKED {
            self.make_room(now);
        }
        let logins = self.by_user.entry(user).or_default();
        if let Some(at) = logins.iter().position(|&(from, _)| from == net) {
            logins.remove(at);
            self.len -= 1;
        } else if logins.len() >= NETS_PER_USER {
            logins.remove(0);
            self.len -= 1;
        }
        logins.push((net, now));
        self.len += 1;
    }

    /// Frees a tenth of a full table: expired logins first (at most one scan per quarter
    /// window), then the oldest logins of the users with the most networks, trimming every
    /// user to the largest share that fits. One scan pays for many logins.
    fn make_room(&mut self, now: Instant) {
        let window = self.window;
        if self.next_sweep.is_none_or(|at| now >= at) {
            self.by_user.retain(|_, logins| {
                logins.retain(|&(_, at)| now.saturating_duration_since(at) < window);
                !logins.is_empty()
            });
            self.len = self.by_user.values().map(Vec::len).sum();
            self.next_sweep = Some(now + window / 4);
        }
        if self.len < MAX_TRACKED {
            return;
        }
        let target = MAX_TRACKED - MAX_TRACKED / EVICTED_WHEN_FULL;
        let kept_at = |share: usize| -> usize {
            self.by_user
                .values()
                .map(|logins| logins.len().min(share))
                .sum()
        };
        let share = (1..NETS_PER_USER)
            .rev()
            .find(|&share| kept_at(share) <= target);
        for logins in self.by_user.values_mut() {
            let keep = share.unwrap_or(1);
            if logins.len() > keep {
                logins.drain(..logins.len() - keep);
            }
        }
        if share.is_none() {
            // More users than the target, each down to its newest login: of those, the
            // newest stay.
            let mut newest: Vec<Instant> = self
                .by_user
                .values()
                .filter_map(|logins| logins.last().map(|&(_, at)| at))
                .collect();
            let evict = newest.len().saturating_sub(target);
            if evict > 0 {
                let (_, &mut cutoff, _) = newest.select_nth_unstable(evict - 1);
                let mut ties = evict - newest.iter().filter(|&&at| at < cutoff).count();
                self.by_user.retain(|_, logins| {
                    let Some(&(_, at)) = logins.last() else {
                        return false;
                    };
                    if at < cutoff {
                        return false;
                    }
                    if at == cutoff && ties > 0 {
                        ties -= 1;
                        return false;
                    }
                    true
                });
            }
        }
        self.len = self.by_user.values().map(Vec::len).sum();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(600);

    fn net(i: u32) -> ClientNet {
        ClientNet::V4(i.to_be_bytes())
    }

    #[test]
    fn a_login_trusts_its_network_for_one_window() {
        let mut trust = TrustedNets::new(WINDOW);
        let t0 = Instant::now();
        trust.record(1, net(1), t0);
        assert!(trust.logged_in(1, net(1), t0 + WINDOW - Duration::from_secs(1)));
        assert!(!trust.logged_in(1, net(1), t0 + WINDOW));
        assert!(!trust.logged_in(1, net(2), t0));
        assert!(!trust.logged_in(2, net(1), t0));
        // A later login from the same network starts the window again, once.
        trust.record(1, net(1), t0 + WINDOW / 2);
        assert!(trust.logged_in(1, net(1), t0 + WINDOW));
        assert_eq!(trust.len(), 1);
    }

    #[test]
    fn a_user_keeps_only_the_most_recent_networks() {
        let mut trust = TrustedNets::new(WINDOW);
        let t0 = Instant::now();
        for i in 0..NETS_PER_USER as u32 + 4 {
            trust.record(1, net(i), t0 + Duration::from_secs(i.into()));
        }
        let now = t0 + Duration::from_secs(30);
        assert_eq!(trust.len(), NETS_PER_USER);
        assert!(!trust.logged_in(1, net(3), now));
        assert!(trust.logged_in(1, net(4), now));
        assert!(trust.logged_in(1, net(NETS_PER_USER as u32 + 3), now));
    }

    #[test]
    fn a_flood_of_logins_from_many_accounts_forgets_their_networks_before_a_users_own() {
        let mut trust = TrustedNets::new(WINDOW);
        let t0 = Instant::now();
        trust.record(u64::MAX, net(u32::MAX), t0);
        let later = t0 + Duration::from_secs(10);
        // Enough accounts, each from its full share of networks, to fill the table
        // twice over.
        let accounts = 2 * MAX_TRACKED / NETS_PER_USER;
        for account in 0..accounts as u64 {
            for i in 0..NETS_PER_USER as u32 {
                trust.record(account, net(i), later);
            }
        }
        assert!(trust.len() <= MAX_TRACKED);
        assert!(trust.logged_in(u64::MAX, net(u32::MAX), later));
    }

    #[test]
    fn more_users_than_the_table_holds_keep_the_newest_logins() {
        let mut trust = TrustedNets::new(WINDOW);
        let t0 = Instant::now();
        for user in 0..MAX_TRACKED as u64 + 10 {
            trust.record(user, net(1), t0 + Duration::from_millis(user));
        }
        let now = t0 + Duration::from_secs(200);
        assert!(trust.len() <= MAX_TRACKED);
        assert!(trust.logged_in(MAX_TRACKED as u64 + 9, net(1), now));
        assert!(!trust.logged_in(0, net(1), now));
    }
}
