//! User names as the failure windows and the directory's accounts compare them.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use unicode_normalization::UnicodeNormalization as _;
use unicode_normalization::char::is_combining_mark;

/// A user name folded so that every spelling a credential source may check as one
/// account is one string. Dovecot (`%Lu`, its default) and LDAP (`uid` and
/// `sAMAccountName` match after RFC 4518's preparation: mapping, compatibility
/// normalization, case folding, insignificant spaces) check one account for `alice`,
/// `ALICE`, ` alice`, fullwidth `ａｌｉｃｅ` and `𝐚lice`. The failure windows count an
/// attempt under this fold, or each spelling would get a window of its own and the
/// per-user limit would be multiplied; so it goes further than any directory's: X.520's
/// preparation, then compatibility decomposition without the combining marks, spaces
/// and control characters, in lower case. Names it merges that a directory keeps apart
/// (`jürgen` and `jurgen`) only share a window, which errs toward the limit and locks
/// no one out.
pub fn fold(name: &str) -> String {
    // Lower case first: X.520's tables are Unicode 3.2's, which has no capital ß.
    let lower = name.to_lowercase();
    let prepared = stringprep::x520prep(&lower, true).unwrap_or(Cow::Borrowed(&lower));
    prepared
        .nfkd()
        .filter(|c| !is_combining_mark(*c) && !c.is_whitespace() && !c.is_control())
        .flat_map(char::to_lowercase)
        .nfkd()
        .filter(|c| !is_combining_mark(*c))
        .collect()
}

/// A user name as a directory compares it, as near as postern can tell: X.520's
/// preparation with case folding, then insignificant spaces (RFC 4518 §2.6.1: none
/// leading or trailing, inner runs as one). Narrower than [`fold`], which also merges
/// names a directory keeps apart (`al ice` and `alice`).
pub fn directory_fold(name: &str) -> String {
    let lower = name.to_lowercase();
    let prepared = stringprep::x520prep(&lower, true).unwrap_or(Cow::Borrowed(&lower));
    prepared
        .split(' ')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Most login names [`Logins`] remembers (~100 bytes each).
const MAX_LOGINS: usize = 100_000;

/// The accounts the credential source said login names stand for, so that the failure
/// windows count every login name of an account (an LDAP entry's `uid` and each `mail`
/// alias) as the account: else each would bring a per-user limit of its own. Learned
/// from the source's answers, successes and failures alike, and forgotten a window on:
/// the first attempt under a name not seen yet still counts under that name.
#[derive(Debug)]
pub struct Logins {
    window: Duration,
    accounts: Mutex<HashMap<String, (String, Instant)>>,
}

impl Logins {
    pub fn new(window: Duration) -> Logins {
        Logins {
            window,
            accounts: Mutex::new(HashMap::new()),
        }
    }

    /// The name the failure windows count a login as `typed` under: its account's
    /// fold, when the source named one within the window, else its own.
    pub fn window_name(&self, typed: &str, now: Instant) -> String {
        let typed = fold(typed);
        let accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        match accounts.get(&typed) {
            Some((account, at)) if now.saturating_duration_since(*at) < self.window => {
                account.clone()
            }
            _ => typed,
        }
    }

    /// The source said `typed` is a login of `account`.
    pub fn learn(&self, typed: &str, account: &str, now: Instant) {
        let (typed, account) = (fold(typed), fold(account));
        if typed == account {
            return;
        }
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        if accounts.len() >= MAX_LOGINS && !accounts.contains_key(&typed) {
            let window = self.window;
            accounts.retain(|_, (_, at)| now.saturating_duration_since(*at) < window);
            if accounts.len() >= MAX_LOGINS {
                accounts.clear();
            }
        }
        accounts.insert(typed, (account, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_a_directory_binds_folds_to_one_name() {
        // What slapd binds as alice (caseIgnoreMatch on uid), and Dovecot's %Lu.
        for spelling in [
            "alice",
            "ALICE",
            " Alice ",
            "al ice",
            "\u{a0}alice",
            "ａｌｉｃｅ",
            "ＡＬＩＣＥ",
            "𝐚lice",
            "𝖺𝗅𝗂𝖼𝖾",
            "ⓐlice",
            "aℓice",
            "alİce",
            "al\u{ad}ice",
            "al\u{200b}ice",
            "alice\t",
        ] {
            assert_eq!(fold(spelling), "alice", "{spelling:?}");
        }
        assert_eq!(fold("xẞ"), fold("xß"));
        assert_ne!(fold("alice"), fold("alicia"));
    }

    #[test]
    fn the_logins_of_an_account_share_its_window_name_for_a_window() {
        let logins = Logins::new(Duration::from_secs(600));
        let now = Instant::now();
        assert_eq!(
            logins.window_name("Dora@Example.TEST", now),
            "dora@example.test"
        );
        logins.learn("dora@example.test", "dora", now);
        logins.learn("D.Explorer@example.test", "DORA", now);
        for login in ["dora", "DORA@example.test", "d.explorer@example.test"] {
            assert_eq!(logins.window_name(login, now), "dora", "{login}");
        }
        let later = now + Duration::from_secs(601);
        assert_eq!(
            logins.window_name("dora@example.test", later),
            "dora@example.test"
        );
    }
}
