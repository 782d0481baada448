//! The optional positive cache (`--auth-cache-ttl`): a user who logged in recently with
//! the same password is not sent to the source again until the entry expires. It holds
//! a salted SHA-256 of the name and password, never the password; the salt is random
//! per process, so the entries mean nothing outside it. Only successes are cached: a
//! failure always asks the source, so a changed password works at once, and a
//! reload drops every entry.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Entries kept at most: a flood of distinct successful logins cannot grow it further.
const MAX_ENTRIES: usize = 65_536;

pub struct Cache {
    ttl: Duration,
    salt: [u8; 32],
    entries: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    digest: [u8; 32],
    expires: Instant,
    success: Success,
}

/// What the source said with a success, reused with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Success {
    /// Where the session must go.
    pub route: Option<SocketAddr>,
    /// The account's own name, when the source gave one.
    pub user: Option<String>,
}

impl Cache {
    pub fn new(ttl: Duration, salt: [u8; 32]) -> Cache {
        Cache {
            ttl,
            salt,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn digest(&self, user: &str, password: &[u8]) -> [u8; 32] {
        let mut hash = Sha256::new();
        hash.update(self.salt);
        // The length first, so that no (name, password) split collides with another.
        hash.update((user.len() as u64).to_be_bytes());
        hash.update(user.as_bytes());
        hash.update(password);
        hash.finalize().into()
    }

    /// What the source said if `user` logged in with `password` within the TTL.
    pub fn hit(&self, user: &str, password: &[u8], now: Instant) -> Option<Success> {
        let digest = self.digest(user, password);
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let entry = entries.get(user)?;
        // Not constant-time: the comparison is of salted hashes the client cannot see.
        (entry.expires > now && entry.digest == digest).then(|| entry.success.clone())
    }

    /// `user` logged in with `password` now, and the source said `success`.
    pub fn store(&self, user: &str, password: &[u8], success: Success, now: Instant) {
        let digest = self.digest(user, password);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(user) {
            entries.retain(|_, entry| entry.expires > now);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(
            user.to_owned(),
            Entry {
                digest,
                expires: now + self.ttl,
                success,
            },
        );
    }

    /// The source may have changed its mind about anyone (a reload).
    pub fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_success_is_reused_for_the_same_password_until_it_expires() {
        let cache = Cache::new(Duration::from_secs(60), [7; 32]);
        let now = Instant::now();
        let success = Success {
            route: None,
            user: None,
        };
        assert_eq!(cache.hit("alice", b"secret", now), None);
        cache.store("alice", b"secret", success.clone(), now);
        assert_eq!(cache.hit("alice", b"secret", now), Some(success));
        assert_eq!(cache.hit("alice", b"other", now), None, "another password");
        assert_eq!(cache.hit("bob", b"secret", now), None, "another user");
        assert_eq!(
            cache.hit("alice", b"secret", now + Duration::from_secs(61)),
            None,
            "expired"
        );
        cache.clear();
        assert_eq!(cache.hit("alice", b"secret", now), None, "cleared");
    }

    #[test]
    fn the_route_and_the_name_come_back_with_the_success() {
        let cache = Cache::new(Duration::from_secs(60), [7; 32]);
        let now = Instant::now();
        let success = Success {
            route: Some("192.0.2.7:25".parse().unwrap()),
            user: Some("alice".into()),
        };
        cache.store("Alice", b"secret", success.clone(), now);
        assert_eq!(cache.hit("Alice", b"secret", now), Some(success));
    }

    #[test]
    fn no_name_and_password_split_collides() {
        let cache = Cache::new(Duration::from_secs(60), [7; 32]);
        assert_ne!(cache.digest("ab", b"c"), cache.digest("a", b"bc"));
    }
}
