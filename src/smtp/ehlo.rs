//! The EHLO capability list clients see (RFC 5321 §4.1.1.1, RFC 3207, RFC 4954).
//!
//! postern speaks for the backend: the backend's own extensions are offered verbatim,
//! except the ones postern implements itself (STARTTLS, AUTH) and the ones meant only
//! for postern (XCLIENT, XFORWARD). Lines are kept as text, never re-synthesised, so an
//! extension postern has never heard of still reaches the client unchanged.

/// The SASL mechanisms postern offers once TLS is up.
pub const AUTH_LINE: &str = "AUTH PLAIN LOGIN CRAM-MD5";

/// The backend's EHLO keywords, as learnt by the probe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Every line after the greeting line, verbatim.
    backend_lines: Vec<String>,
}

impl Capabilities {
    /// From the text lines of the backend's 250 reply to EHLO (the first is its greeting).
    pub fn from_ehlo_reply(lines: &[String]) -> Self {
        Capabilities {
            backend_lines: lines.iter().skip(1).cloned().collect(),
        }
    }

    /// The minimal safe list used before any probe has succeeded: nothing is promised on
    /// the backend's behalf.
    pub fn unknown() -> Self {
        Self::default()
    }

    /// Whether the backend advertises `keyword` (case-insensitive).
    pub fn has(&self, keyword: &str) -> bool {
        self.backend_lines
            .iter()
            .any(|line| keyword_of(line).eq_ignore_ascii_case(keyword))
    }

    /// The backend's line for `keyword`, e.g. `XCLIENT NAME ADDR ...`.
    pub fn line(&self, keyword: &str) -> Option<&str> {
        self.backend_lines
            .iter()
            .map(String::as_str)
            .find(|line| keyword_of(line).eq_ignore_ascii_case(keyword))
    }

    /// The same list without `keyword`'s line (`--hide-chunking`).
    pub fn without(&self, keyword: &str) -> Capabilities {
        Capabilities {
            backend_lines: self
                .backend_lines
                .iter()
                .filter(|line| !keyword_of(line).eq_ignore_ascii_case(keyword))
                .cloned()
                .collect(),
        }
    }

    /// The backend lines a client may see.
    pub fn for_clients(&self) -> impl Iterator<Item = &str> {
        self.backend_lines
            .iter()
            .map(String::as_str)
            .filter(|line| !is_hidden(line))
    }
}

fn keyword_of(line: &str) -> &str {
    line.split([' ', '=']).next().unwrap_or("")
}

/// Lines postern implements itself, lines meant for postern only, and lines that are no
/// ehlo-line at all (RFC 5321 §4.1.1.1): ones that start with no keyword, empty ones
/// (smtp-sink ends its list with a bare `250 `) and ones with control characters (only
/// printable ASCII and SP are allowed), where a bare CR, which the reply parser leaves
/// inside a line, would break the client's framing.
fn is_hidden(line: &str) -> bool {
    // An ehlo-keyword starts with a letter or digit: a line with a blank in front is
    // hidden, not shown with a keyword `has` would not find (" CHUNKING" offered, BDAT
    // refused) or one a lenient client could read after trimming (" STARTTLS").
    let starts_a_keyword = line.starts_with(|c: char| c.is_ascii_alphanumeric());
    if !starts_a_keyword || line.chars().any(|c| c.is_ascii_control()) {
        return true;
    }
    let keyword = keyword_of(line);
    ["STARTTLS", "AUTH", "XCLIENT", "XFORWARD"]
        .iter()
        .any(|k| keyword.eq_ignore_ascii_case(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hides_tls_auth_and_proxy_extensions_and_keeps_the_rest_verbatim() {
        let reply: Vec<String> = [
            "legacy.example Hello",
            "PIPELINING",
            "SIZE 10240000",
            "STARTTLS",
            "AUTH PLAIN LOGIN",
            "AUTH=PLAIN LOGIN",
            "auth=login",
            "XCLIENT NAME ADDR PROTO HELO",
            "XFORWARD NAME ADDR",
            "8BITMIME",
            "X-VENDOR-THING some args",
            "AUTHORITY",
            "SMTPUTF8",
            "CHUNKING",
            "SIZE\r1000",
            "X-NUL\0",
            "",
            " CHUNKING",
            "\tSTARTTLS",
            "-AUTH PLAIN",
        ]
        .map(String::from)
        .to_vec();
        let caps = Capabilities::from_ehlo_reply(&reply);
        assert_eq!(
            caps.for_clients().collect::<Vec<_>>(),
            [
                "PIPELINING",
                "SIZE 10240000",
                "8BITMIME",
                "X-VENDOR-THING some args",
                "AUTHORITY",
                "SMTPUTF8",
                "CHUNKING"
            ]
        );
        assert!(caps.has("xclient"));
        assert!(caps.has("SIZE"));
        assert!(!caps.has("DSN"));
    }

    #[test]
    fn unknown_backend_promises_nothing() {
        assert_eq!(Capabilities::unknown().for_clients().count(), 0);
        assert_eq!(
            Capabilities::from_ehlo_reply(&["only greeting".into()])
                .for_clients()
                .count(),
            0
        );
    }
}
