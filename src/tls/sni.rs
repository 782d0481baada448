//! Several certificate/key pairs, chosen by the client's SNI name (RFC 6066 §3), each
//! reloaded on its own.
//!
//! One `ServerConfig` lives for the whole process; its resolver holds one slot per
//! `--cert`/`--key` pair, and a reload swaps the slot's key. A pair that fails to
//! reload keeps its previous version, and the other pairs are never touched.

use std::fmt;
use std::sync::{Arc, RwLock};

use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

use super::Pair;
use super::check::Leaf;

/// Whether certificate name `pattern` covers `name`, per RFC 6125 §6.4: DNS names
/// compare case-insensitively, and a wildcard is a whole left-most label `*` that
/// stands for exactly one label (`*.example.com` covers `mx.example.com`, not
/// `example.com` nor `a.mx.example.com`). Partial-label wildcards (`mx*.example.com`)
/// and wildcards over a bare top-level domain (`*.com`) match nothing: browsers and
/// the CA/Browser Forum refuse them too.
pub fn covers(pattern: &str, name: &str) -> bool {
    // A fully qualified name may carry the root's empty label (RFC 6066 forbids it in
    // SNI, but --hostname may be written so).
    let name = name.strip_suffix('.').unwrap_or(name);
    let pattern = pattern.strip_suffix('.').unwrap_or(pattern);
    if name.is_empty() || pattern.is_empty() {
        return false;
    }
    match pattern.strip_prefix("*.") {
        Some(base) => {
            if !base.contains('.') || base.contains('*') {
                return false;
            }
            match name.split_once('.') {
                Some((first, rest)) => !first.is_empty() && rest.eq_ignore_ascii_case(base),
                None => false,
            }
        }
        None => !pattern.contains('*') && pattern.eq_ignore_ascii_case(name),
    }
}

/// The index of the pair to serve for `sni`, given each pair's DNS names in `--cert`
/// order: the first pair naming it exactly, else the first covering it with a
/// wildcard (the more specific certificate wins, as in nginx), else the first pair.
pub fn choose<'a>(sni: Option<&str>, pairs: impl IntoIterator<Item = &'a [String]>) -> usize {
    let Some(sni) = sni else { return 0 };
    let mut wildcard = None;
    for (index, names) in pairs.into_iter().enumerate() {
        for pattern in names {
            if !covers(pattern, sni) {
                continue;
            }
            if !pattern.starts_with("*.") {
                return index;
            }
            wildcard.get_or_insert(index);
        }
    }
    wildcard.unwrap_or(0)
}

/// A pair as currently served.
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    pub leaf: Leaf,
}

struct Slot {
    pair: Pair,
    current: RwLock<Arc<Loaded>>,
}

/// The resolver: every pair, in `--cert` order; the first is the default.
pub struct Certificates {
    slots: Vec<Slot>,
}

impl Certificates {
    /// `loaded` must be non-empty and in the same order as the pairs.
    pub fn new(loaded: Vec<(Pair, Loaded)>) -> Certificates {
        Certificates {
            slots: loaded
                .into_iter()
                .map(|(pair, loaded)| Slot {
                    pair,
                    current: RwLock::new(Arc::new(loaded)),
                })
                .collect(),
        }
    }

    /// The pairs, in `--cert` order.
    pub fn pairs(&self) -> impl Iterator<Item = &Pair> {
        self.slots.iter().map(|s| &s.pair)
    }

    /// What pair `index` serves now.
    pub fn current(&self, index: usize) -> Option<Arc<Loaded>> {
        self.slots.get(index).map(|slot| match slot.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        })
    }

    /// New handshakes for pair `index` use `loaded`; others are unaffected.
    pub fn replace(&self, index: usize, loaded: Loaded) {
        if let Some(slot) = self.slots.get(index) {
            let loaded = Arc::new(loaded);
            match slot.current.write() {
                Ok(mut guard) => *guard = loaded,
                Err(poisoned) => *poisoned.into_inner() = loaded,
            }
        }
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current: Vec<Arc<Loaded>> = (0..self.slots.len())
            .filter_map(|i| self.current(i))
            .collect();
        let index = choose(
            hello.server_name(),
            current.iter().map(|l| l.leaf.dns_names.as_slice()),
        );
        current.get(index).map(|l| l.key.clone())
    }
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.pairs()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_wildcards_per_rfc_6125() {
        for (pattern, name, want) in [
            ("mx.example.com", "mx.example.com", true),
            ("MX.Example.COM", "mx.example.com", true),
            ("mx.example.com", "MX.EXAMPLE.COM", true),
            ("mx.example.com", "mx.example.com.", true),
            ("mx.example.com", "example.com", false),
            ("mx.example.com", "a.mx.example.com", false),
            ("*.example.com", "mx.example.com", true),
            ("*.example.com", "MX.example.com", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "a.mx.example.com", false),
            ("*.example.com", ".example.com", false),
            ("*.example.com", "mx.example.org", false),
            ("*.example.com", "mx.example.com.", true),
            ("*.com", "example.com", false),
            ("mx*.example.com", "mx1.example.com", false),
            ("*.*.example.com", "a.b.example.com", false),
            ("*", "localhost", false),
            ("", "", false),
            ("localhost", "localhost", true),
        ] {
            assert_eq!(covers(pattern, name), want, "{pattern} covers {name}");
        }
    }

    #[test]
    fn choose_prefers_exact_then_wildcard_then_the_first_pair() {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let pairs = [
            names(&["default.test"]),
            names(&["*.example.com"]),
            names(&["mx.example.com", "mail.example.org"]),
            names(&["*.example.org", "other.test"]),
        ];
        let pick = |sni: Option<&str>| choose(sni, pairs.iter().map(Vec::as_slice));
        for (sni, want) in [
            (None, 0),
            (Some("default.test"), 0),
            (Some("nothing.test"), 0),
            (Some("smtp.example.com"), 1),
            (Some("mx.example.com"), 2),
            (Some("MX.EXAMPLE.COM"), 2),
            (Some("mail.example.org"), 2),
            (Some("x.example.org"), 3),
            (Some("other.test"), 3),
            (Some("a.b.example.com"), 0),
            (Some("example.com"), 0),
        ] {
            assert_eq!(pick(sni), want, "{sni:?}");
        }
        assert_eq!(choose(Some("x"), std::iter::empty()), 0);
    }
}
