//! Postfix's XCLIENT extension: how postern tells the backend who the client really is
//! (<https://www.postfix.org/XCLIENT_README.html>). Values are xtext (RFC 3461 §4).

use std::net::IpAddr;

use super::Capabilities;
use super::line::MAX_COMMAND_LINE;

/// What postern knows about the client, as XCLIENT attributes.
#[derive(Debug, Clone)]
pub struct ClientFacts<'a> {
    pub addr: IpAddr,
    pub port: u16,
    pub helo: &'a str,
    /// The authenticated user; `None` for an unauthenticated (MX) session.
    pub login: Option<&'a str>,
    /// `ESMTP` after EHLO, `SMTP` after HELO.
    pub proto: &'static str,
}

/// The longest attribute value Postfix takes, as sent (xtext): it answers a longer one
/// with 501, which would fail the whole session for a long EHLO name.
const MAX_VALUE: usize = 255;

/// The attribute names the backend lists after `XCLIENT`, if it offers it at all.
pub fn offered_attributes(capabilities: &Capabilities) -> Option<Vec<String>> {
    capabilities.line("XCLIENT").map(|line| {
        line.split_ascii_whitespace()
            .skip(1)
            .map(|a| a.to_ascii_uppercase())
            .collect()
    })
}

/// The XCLIENT command lines (CRLF included) that carry `facts`, limited to the
/// attributes the backend offers, each line within 512 octets. An attribute longer than
/// Postfix takes is left out rather than cut: a truncated LOGIN would name someone else.
///
/// When the attributes need more than one line, ADDR and LOGIN travel together in the
/// last one. Postfix checks `smtpd_authorized_xclient_hosts` against the client address
/// as it stands, so once an XCLIENT has changed ADDR a further XCLIENT is refused (550);
/// and an XCLIENT without LOGIN clears the login an earlier one set. A LOGIN that cannot
/// share a line with ADDR is left out: the backend then treats the client as
/// unauthenticated, which fails closed.
pub fn commands(offered: &[String], facts: &ClientFacts<'_>) -> Vec<String> {
    let addr = match facts.addr {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => format!("IPV6:{v6}"),
        },
    };
    let candidates = [
        ("ADDR", Some(addr)),
        ("PORT", Some(facts.port.to_string())),
        ("NAME", Some("[UNAVAILABLE]".to_owned())),
        ("HELO", Some(facts.helo.to_owned())),
        ("LOGIN", facts.login.map(str::to_owned)),
        ("PROTO", Some(facts.proto.to_owned())),
    ];
    let attributes: Vec<(&str, String)> = candidates
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
        .filter(|(name, _)| offered.iter().any(|a| a == name))
        .map(|(name, value)| (name, xtext(&value)))
        .filter(|(_, value)| value.len() <= MAX_VALUE)
        .map(|(name, value)| (name, format!(" {name}={value}")))
        .collect();

    let total: usize = attributes.iter().map(|(_, a)| a.len()).sum();
    if total == 0 {
        return Vec::new();
    }
    if "XCLIENT".len() + total <= MAX_COMMAND_LINE {
        let line: String = attributes.iter().map(|(_, a)| a.as_str()).collect();
        return vec![format!("XCLIENT{line}\r\n")];
    }

    // Several lines: everything else first, then ADDR and LOGIN as one unit.
    let is_last = |name: &str| name == "ADDR" || name == "LOGIN";
    let mut units: Vec<String> = attributes
        .iter()
        .filter(|(name, _)| !is_last(name))
        .map(|(_, a)| a.clone())
        .collect();
    let mut last = String::new();
    for (_, attribute) in attributes.iter().filter(|(name, _)| is_last(name)) {
        if "XCLIENT".len() + last.len() + attribute.len() <= MAX_COMMAND_LINE {
            last.push_str(attribute);
        }
    }
    if !last.is_empty() {
        units.push(last);
    }
    let mut lines = Vec::new();
    let mut current = String::from("XCLIENT");
    for unit in units {
        if current.len() + unit.len() > MAX_COMMAND_LINE {
            lines.push(std::mem::replace(&mut current, String::from("XCLIENT")) + "\r\n");
        }
        current.push_str(&unit);
    }
    if current.len() > "XCLIENT".len() {
        lines.push(current + "\r\n");
    }
    lines
}

/// RFC 3461 §4: printable ASCII except `+` and `=` as is, everything else as `+XX`.
fn xtext(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if (b'!'..=b'~').contains(&byte) && byte != b'+' && byte != b'=' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("+{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<String> {
        ["NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn sends_only_offered_attributes_xtext_encoded() {
        let facts = ClientFacts {
            addr: "192.0.2.7".parse().unwrap(),
            port: 41000,
            helo: "client.example",
            login: Some("jo+e=x y@example.com"),
            proto: "ESMTP",
        };
        assert_eq!(
            commands(&all(), &facts),
            [
                "XCLIENT ADDR=192.0.2.7 PORT=41000 NAME=[UNAVAILABLE] HELO=client.example LOGIN=jo+2Be+3Dx+20y@example.com PROTO=ESMTP\r\n"
            ]
        );
        let some: Vec<String> = ["ADDR", "LOGIN"].map(String::from).to_vec();
        assert_eq!(
            commands(&some, &facts),
            ["XCLIENT ADDR=192.0.2.7 LOGIN=jo+2Be+3Dx+20y@example.com\r\n"]
        );
        assert!(commands(&[], &facts).is_empty());
    }

    #[test]
    fn ipv6_is_tagged_and_mapped_ipv4_is_plain() {
        let mut facts = ClientFacts {
            addr: "2001:db8::1".parse().unwrap(),
            port: 1,
            helo: "h",
            login: None,
            proto: "SMTP",
        };
        let addr_only = ["ADDR".to_owned()];
        assert_eq!(
            commands(&addr_only, &facts),
            ["XCLIENT ADDR=IPV6:2001:db8::1\r\n"]
        );
        facts.addr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(commands(&addr_only, &facts), ["XCLIENT ADDR=192.0.2.1\r\n"]);
    }

    #[test]
    fn long_values_split_into_several_commands_under_512_octets() {
        let helo = "h".repeat(250);
        let login = "u".repeat(250);
        let facts = ClientFacts {
            addr: "192.0.2.7".parse().unwrap(),
            port: 2,
            helo: &helo,
            login: Some(&login),
            proto: "ESMTP",
        };
        let lines = commands(&all(), &facts);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines
                .iter()
                .all(|l| l.len() <= 512 && l.starts_with("XCLIENT "))
        );
        let joined = lines.concat();
        assert!(
            joined.contains(&format!("HELO={helo}")) && joined.contains(&format!("LOGIN={login}"))
        );

        // Postfix refuses an XCLIENT after one that changed ADDR, and forgets a LOGIN
        // when a later XCLIENT has none: both go in the last line, and only there.
        let (last, earlier) = lines.split_last().unwrap();
        assert!(last.contains(" ADDR=192.0.2.7") && last.contains(&format!(" LOGIN={login}")));
        assert!(
            earlier
                .iter()
                .all(|l| !l.contains(" ADDR=") && !l.contains(" LOGIN="))
        );
    }

    #[test]
    fn values_longer_than_postfix_takes_are_left_out_not_cut() {
        // Postfix answers 501 to a value over 255 octets as sent: a long EHLO name
        // (tripled by xtext when it is not ASCII) would fail the session.
        let long_helo = "h".repeat(256);
        let tripled = "\u{e9}".repeat(43); // 86 octets, 258 as xtext
        let fits = "h".repeat(255);
        let huge_login = "x".repeat(600);
        for (helo, login, kept) in [
            (long_helo.as_str(), None, false),
            (tripled.as_str(), None, false),
            (fits.as_str(), None, true),
            ("client.example", Some(huge_login.as_str()), true),
        ] {
            let facts = ClientFacts {
                addr: "192.0.2.7".parse().unwrap(),
                port: 2,
                helo,
                login,
                proto: "ESMTP",
            };
            let lines = commands(&all(), &facts).concat();
            assert_eq!(lines.contains(" HELO="), kept, "{lines}");
            assert!(lines.contains(" ADDR=192.0.2.7"), "{lines}");
            assert!(!lines.contains("LOGIN="), "{lines}");
        }
    }
}
