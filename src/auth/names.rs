//! User names as the failure windows and the directory's accounts compare them.

use std::borrow::Cow;

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

/// A user name as a directory compares it, as near as postern can tell (RFC 4518's
/// caseIgnoreMatch): X.520's preparation with case folding, compatibility
/// normalization, then insignificant spaces (none leading or trailing, inner runs as
/// one). Narrower than [`fold`], which also merges names a directory keeps apart
/// (`al ice` and `alice`).
pub fn directory_fold(name: &str) -> String {
    let lower = name.to_lowercase();
    let prepared = stringprep::x520prep(&lower, true).unwrap_or(Cow::Borrowed(&lower));
    let normalized: String = prepared.nfkc().collect();
    normalized
        .split(' ')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
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
}
