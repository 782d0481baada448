//! The account a login stands for, as the directory names it.
//!
//! A directory binds many spellings of one name: `uid`, `mail` and `sAMAccountName`
//! match without case, with insignificant spaces, and after Unicode compatibility
//! mapping (RFC 4518), so `ALICE`, ` alice`, fullwidth `ａｌｉｃｅ` and `𝐚lice` all bind
//! as alice. A session must go on under one name per account, or each spelling gets a
//! sending budget of its own and the backend is told a login that is not the account's.
//! No fold of the typed text can match every directory's rules (slapd keeps `xß` and
//! `xẞ` apart, where Unicode case folding merges them), so the name is read from the
//! entry: the value of the attribute the login is matched against, taken from the
//! `--ldap-user-dn` or `--ldap-search-filter` template.

use ldap3::ResultEntry;
use ldap3::asn1::PL;

use super::Mode;
use super::escape::PLACEHOLDER;
use crate::auth::names;

/// The longest account name taken from an entry: Postfix's bound on an XCLIENT value.
const MAX_ACCOUNT_LEN: usize = 255;

/// The attributes the login is matched against, in the template's order: the
/// attribute of the RDN holding the placeholder (`uid=%u,ou=people,...`), or those
/// compared for equality with it in the filter (`(|(uid=%u)(mail=%u))`: uid, mail).
/// Empty when the template names none (a user principal name, `%u@corp.example`).
pub fn attributes(mode: &Mode) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    match mode {
        Mode::DirectBind { user_dn_template } => {
            if let Some(rdn) = user_dn_template
                .split(',')
                .find(|rdn| rdn.contains(PLACEHOLDER))
                && let Some((attribute, value)) = rdn.split_once('=')
                && value.trim() == PLACEHOLDER
            {
                found.push(attribute.trim().to_owned());
            }
        }
        Mode::SearchBind {
            filter_template, ..
        } => {
            let equality = format!("={PLACEHOLDER})");
            let mut rest = filter_template.as_str();
            while let Some(at) = rest.find(&equality) {
                let before = &rest[..at];
                if let Some(open) = before.rfind('(') {
                    let attribute = &before[open + 1..];
                    // `~=`, `>=`, `<=` and extensible matches are not equality.
                    let plain = !attribute.is_empty()
                        && attribute
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
                    if plain && !found.iter().any(|a| a.eq_ignore_ascii_case(attribute)) {
                        found.push(attribute.to_owned());
                    }
                }
                rest = &rest[at + equality.len()..];
            }
        }
    }
    found.retain(|a| !a.is_empty());
    found
}

/// The account name an entry gives for the login `typed`: the value the login matched,
/// among all of `attributes`. Never merely the first value or attribute: a user who
/// may edit their own `mail` could otherwise set it to another account's name and,
/// logging in with their uid, go on as that account.
///
/// Which value matched is told as the directory compares ([`names::directory_fold`]);
/// a value that compares alike only under a wider fold proves nothing (slapd reads an
/// IA5 value only up to a NUL, so `a lice<NUL>z` matched `a lice` while `alice`, beside
/// it, folded alike under the wide fold). No value, two of them, or one that cannot be
/// a login (UTF-8, printable, at most 255 octets): no name, and the caller falls back
/// on the name typed.
pub fn from_entry(entry: &ResultEntry, attributes: &[String], typed: &str) -> Option<String> {
    let narrow = names::directory_fold(typed);
    let mut matching = attributes
        .iter()
        .filter_map(|wanted| values_of(entry, wanted))
        .flatten()
        .filter(|v| names::directory_fold(v) == narrow);
    let value = matching.next()?;
    if matching.any(|other| other != value) {
        return None;
    }
    Some(value).filter(|v| can_be_login(v))
}

fn can_be_login(value: &str) -> bool {
    !value.is_empty() && value.len() <= MAX_ACCOUNT_LEN && !value.chars().any(char::is_control)
}

/// The values of attribute `wanted` in a SearchResultEntry (RFC 4511 §4.5.2: objectName,
/// then the attribute list, each a SEQUENCE of the type and a SET of values), read
/// without ldap3's `SearchEntry::construct`, which panics on a malformed entry.
fn values_of(entry: &ResultEntry, wanted: &str) -> Option<Vec<String>> {
    let PL::C(parts) = &entry.0.payload else {
        return None;
    };
    let PL::C(list) = &parts.get(1)?.payload else {
        return None;
    };
    list.iter().find_map(|attribute| {
        let PL::C(pair) = &attribute.payload else {
            return None;
        };
        let (PL::P(name), PL::C(values)) = (&pair.first()?.payload, &pair.get(1)?.payload) else {
            return None;
        };
        if !std::str::from_utf8(name).is_ok_and(|name| name.eq_ignore_ascii_case(wanted)) {
            return None;
        }
        Some(
            values
                .iter()
                .filter_map(|value| match &value.payload {
                    PL::P(octets) => String::from_utf8(octets.clone()).ok(),
                    PL::C(_) => None,
                })
                .collect(),
        )
    })
}

/// The account name when the entry gives none (no attribute in the template, or one
/// the user may not read): the typed name without leading and trailing spaces, inner
/// runs of spaces as one, ASCII letters in lower case. It covers what real clients send
/// (`Alice`, `alice `), not every spelling the directory binds. Only ASCII is folded:
/// Unicode case folding merges names a directory keeps apart (`xẞ` would go on as
/// `xß`, another account).
pub fn fallback(user: &str) -> String {
    user.split(' ')
        .filter(|word| !word.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldap3::asn1::{StructureTag, TagClass};

    fn direct(template: &str) -> Vec<String> {
        attributes(&Mode::DirectBind {
            user_dn_template: template.into(),
        })
    }

    fn search(filter: &str) -> Vec<String> {
        attributes(&Mode::SearchBind {
            base: "dc=example,dc=test".into(),
            filter_template: filter.into(),
            bind_dn: "cn=postern".into(),
            bind_password: "secret".into(),
        })
    }

    #[test]
    fn the_login_attribute_comes_from_the_template() {
        assert_eq!(direct("uid=%u,ou=people,dc=example,dc=com"), ["uid"]);
        assert_eq!(direct("ou=people,cn=%u,dc=example"), ["cn"]);
        assert!(direct("%u@corp.example").is_empty());
        assert!(direct("cn=x%u,dc=example").is_empty());
        assert_eq!(search("(uid=%u)"), ["uid"]);
        assert_eq!(search("(sAMAccountName=%u)"), ["sAMAccountName"]);
        assert_eq!(
            search("(&(objectClass=person)(|(uid=%u)(mail=%u)(UID=%u)))"),
            ["uid", "mail"]
        );
        assert!(search("(cn~=%u)").is_empty());
        assert!(search("(cn:caseExactMatch:=%u)").is_empty());
        assert!(search("(mail=%u@example.org)").is_empty());
    }

    fn tag(class: TagClass, id: u64, payload: PL) -> StructureTag {
        StructureTag { class, id, payload }
    }

    fn octets(text: &str) -> StructureTag {
        tag(TagClass::Universal, 4, PL::P(text.as_bytes().to_vec()))
    }

    fn entry(attributes: &[(&str, &[&str])]) -> ResultEntry {
        let list = attributes
            .iter()
            .map(|(name, values)| {
                let values = values.iter().map(|v| octets(v)).collect();
                tag(
                    TagClass::Universal,
                    16,
                    PL::C(vec![
                        octets(name),
                        tag(TagClass::Universal, 17, PL::C(values)),
                    ]),
                )
            })
            .collect();
        ResultEntry::new(tag(
            TagClass::Application,
            4,
            PL::C(vec![
                octets("uid=alice,ou=people,dc=example,dc=test"),
                tag(TagClass::Universal, 16, PL::C(list)),
            ]),
        ))
    }

    #[test]
    fn the_account_is_the_value_the_login_matched() {
        let wanted = ["uid".to_owned(), "mail".to_owned()];
        let both = entry(&[("mail", &["Alice@Example.org"]), ("UID", &["alice"])]);
        assert_eq!(
            from_entry(&both, &wanted, "ALICE").as_deref(),
            Some("alice")
        );
        assert_eq!(
            from_entry(&both, &wanted, "ａｌｉｃｅ").as_deref(),
            Some("alice")
        );
        assert_eq!(
            from_entry(&both, &wanted, "alice@example.org").as_deref(),
            Some("Alice@Example.org")
        );
        // mallory set her own mail, listed first in the filter, to alice's uid: logging
        // in as mallory she goes on as mallory.
        let mallory = entry(&[("mail", &["alice"]), ("uid", &["mallory"])]);
        let mail_first = ["mail".to_owned(), "uid".to_owned()];
        assert_eq!(
            from_entry(&mallory, &mail_first, "mallory").as_deref(),
            Some("mallory")
        );
        let mail_only = entry(&[("mail", &["alice@example.org"])]);
        assert_eq!(
            from_entry(&mail_only, &wanted, "Alice@Example.ORG").as_deref(),
            Some("alice@example.org")
        );
        // Of several values, the one the login folds to, never merely the first:
        // mallory put bob's address before her own.
        let aliases = entry(&[("mail", &["bob@example.org", "mallory@example.org"])]);
        assert_eq!(
            from_entry(&aliases, &wanted, "MALLORY@example.org").as_deref(),
            Some("mallory@example.org")
        );
        assert_eq!(from_entry(&aliases, &wanted, "m@example.org"), None);
        // Kept as the directory stores it: two accounts that differ only in a
        // character Unicode folds together stay two.
        let eszett = entry(&[("uid", &["xẞ"])]);
        assert_eq!(from_entry(&eszett, &wanted, "xẞ").as_deref(), Some("xẞ"));
        // A login that matches no value the entry gives gives no account: the caller
        // falls back.
        assert_eq!(from_entry(&eszett, &wanted, "someone"), None);
        // trudy put alice's name beside her own "al ice", which the wide fold merges:
        // logging in as "al ice" she goes on as "al ice".
        let trudy = entry(&[("mail", &["alice", "al ice"]), ("uid", &["trudy"])]);
        let mail_first = ["mail".to_owned(), "uid".to_owned()];
        assert_eq!(
            from_entry(&trudy, &mail_first, "al ice").as_deref(),
            Some("al ice")
        );
        assert_eq!(
            from_entry(&trudy, &mail_first, "AL  ICE").as_deref(),
            Some("al ice")
        );
        // The value the login matched cannot be a login (too long): no name, never the
        // other value the wide fold would match.
        let long = format!("al{}ice", " ".repeat(300));
        let trudy3 = entry(&[("mail", &["alice", &long]), ("uid", &["trudy3"])]);
        assert_eq!(from_entry(&trudy3, &mail_first, "al ice"), None);
        // slapd reads an IA5 value up to a NUL: a value it matched that way is not
        // seen here, and `alice` beside it, alike only under the wide fold, is no match.
        let trudy4 = entry(&[("mail", &["alice", "a lice\0z"]), ("uid", &["trudy4"])]);
        assert_eq!(from_entry(&trudy4, &mail_first, "a lice"), None);
        // Two values that compare alike: no name.
        let twice = entry(&[("mail", &["Al Ice", "al  ice"])]);
        assert_eq!(from_entry(&twice, &mail_first, "al ice"), None);
        // Across attributes too: the directory matched uid "al ice", not mail "alice".
        let across = entry(&[("mail", &["alice"]), ("uid", &["al ice"])]);
        assert_eq!(
            from_entry(&across, &mail_first, "al ice").as_deref(),
            Some("al ice")
        );
        for unusable in [
            entry(&[]),
            entry(&[("uid", &[])]),
            entry(&[("uid", &[""])]),
            entry(&[("uid", &["al\tice"])]),
            entry(&[("uid", &[&"a".repeat(256)])]),
        ] {
            assert_eq!(from_entry(&unusable, &wanted, "alice"), None);
        }
    }

    #[test]
    fn the_fallback_folds_what_clients_send() {
        for typed in ["alice", "ALICE", "Alice", " alice", "alice  ", "  ALICE  "] {
            assert_eq!(fallback(typed), "alice", "{typed:?}");
        }
        assert_eq!(fallback("  Jean   Dupont "), "jean dupont");
        assert_eq!(fallback("xẞ"), "xẞ");
        assert_eq!(fallback("\u{212a}elvin"), "\u{212a}elvin");
    }
}
