//! Putting a client's user name into a search filter (RFC 4515) or a DN (RFC 4514).
//!
//! The user name is whatever the client typed after AUTH: every character the two
//! string forms give a meaning to must reach the server as data, or `*` becomes a
//! wildcard, `)(` a second filter component and `,` another RDN (LDAP injection). Both
//! escapes come from ldap3 ([`ldap3::ldap_escape`], [`ldap3::dn_escape`]); the tables
//! below pin down that they escape what the RFCs require.

use std::borrow::Cow;

/// The placeholder for the user name in `--ldap-user-dn` and `--ldap-search-filter`.
pub const PLACEHOLDER: &str = "%u";

/// `user` as an assertion value in a string filter (RFC 4515 §3): `*`, `(`, `)`, `\`
/// and NUL become `\2a`, `\28`, `\29`, `\5c` and `\00`. Everything else, UTF-8
/// included, is a valid `UTF1SUBSET`/`UTFMB` character there and stays as it is.
pub fn filter_value(user: &str) -> Cow<'_, str> {
    ldap3::ldap_escape(user)
}

/// `user` as an attribute value in a string DN (RFC 4514 §2.4): `"`, `+`, `,`, `;`,
/// `<`, `>`, `\` and NUL anywhere, a leading space or `#` and a trailing space are
/// hex-escaped (`=` too, which the RFC allows and some servers' parsers want).
pub fn dn_value(user: &str) -> Cow<'_, str> {
    ldap3::dn_escape(user)
}

/// `template` with every [`PLACEHOLDER`] replaced by `escaped`. The replacement is not
/// scanned again, so a user name containing `%u` stays literal text.
pub fn fill(template: &str, escaped: &str) -> String {
    template.replace(PLACEHOLDER, escaped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_values_escape_what_rfc_4515_reserves() {
        for (user, escaped) in [
            ("alice", "alice"),
            ("*", r"\2a"),
            ("al*", r"al\2a"),
            (")(", r"\29\28"),
            ("admin)(|(uid=*", r"admin\29\28|\28uid=\2a"),
            (
                "*)(uid=*))(|(uid=*",
                r"\2a\29\28uid=\2a\29\29\28|\28uid=\2a",
            ),
            // A backslash the client typed, then a real NUL.
            (r"\00", r"\5c00"),
            ("a\0b", r"a\00b"),
            (r"a\2ab", r"a\5c2ab"),
            // Nothing else is special in a filter value.
            ("smith, john", "smith, john"),
            ("a=b&c|d!e~f<g>h", "a=b&c|d!e~f<g>h"),
            ("jörg", "jörg"),
            ("", ""),
        ] {
            assert_eq!(filter_value(user), escaped, "user {user:?}");
        }
    }

    #[test]
    fn dn_values_escape_what_rfc_4514_reserves() {
        for (user, escaped) in [
            ("alice", "alice"),
            ("smith, john", r"smith\2c john"),
            ("a+b", r"a\2bb"),
            ("a\"b", r"a\22b"),
            (r"a\b", r"a\5cb"),
            ("a<b>c", r"a\3cb\3ec"),
            ("a;b", r"a\3bb"),
            ("a=b", r"a\3db"),
            ("a\0b", r"a\00b"),
            ("#hash", r"\23hash"),
            ("a#b", "a#b"),
            (" lead", r"\20lead"),
            ("trail ", r"trail\20"),
            ("in side", "in side"),
            (" ", r"\20"),
            ("eve,ou=admins", r"eve\2cou\3dadmins"),
            // Filter metacharacters mean nothing in a DN.
            ("a*b()", "a*b()"),
            ("jörg", "jörg"),
        ] {
            assert_eq!(dn_value(user), escaped, "user {user:?}");
        }
    }

    #[test]
    fn escaped_values_leave_no_structure_behind() {
        let nasty = [
            "*",
            ")(",
            "\0",
            r"\00",
            "admin)(|(uid=*",
            "x,ou=admins",
            "a+cn=b",
            " #,;<>\"\\=+*()\0 ",
        ];
        for user in nasty {
            let filter = filter_value(user);
            assert!(
                !filter.contains(['*', '(', ')', '\0']),
                "{user:?} -> {filter:?}"
            );
            // Every backslash left starts a two-hex-digit escape (RFC 4515 §3).
            let bytes = filter.as_bytes();
            for (i, _) in filter.match_indices('\\') {
                assert!(
                    bytes
                        .get(i + 1..i + 3)
                        .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)),
                    "{user:?} -> {filter:?}"
                );
            }
            let dn = dn_value(user);
            assert!(
                !dn.contains([',', '+', '"', '<', '>', ';', '=', '\0']),
                "{user:?} -> {dn:?}"
            );
            assert!(!dn.starts_with([' ', '#']) && !dn.ends_with(' '));
        }
    }

    #[test]
    fn the_filled_in_filter_parses_as_one_filter() {
        for template in [
            "(uid=%u)",
            "(&(objectClass=inetOrgPerson)(|(uid=%u)(mail=%u)))",
        ] {
            for user in ["*", ")(", "admin)(|(uid=*", "a\0b", r"\00", "(", ")"] {
                let filter = fill(template, &filter_value(user));
                assert!(
                    ldap3::parse_filter(&filter).is_ok(),
                    "{template} with {user:?}: {filter}"
                );
            }
        }
        // Without the escape the same names change the filter or break it.
        assert!(ldap3::parse_filter(fill("(uid=%u)", ")(")).is_err());
    }

    #[test]
    fn fill_replaces_every_placeholder_once() {
        assert_eq!(
            fill("(|(uid=%u)(mail=%u))", "bob"),
            "(|(uid=bob)(mail=bob))"
        );
        // A user name holding the placeholder is not expanded again.
        assert_eq!(fill("uid=%u,dc=x", "%u"), "uid=%u,dc=x");
        assert_eq!(fill("(uid=%u)", "%u%u"), "(uid=%u%u)");
    }
}
