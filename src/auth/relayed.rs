//! The user name inside a relayed SASL message: the failure windows must meet an
//! attempt before the source sees the proof of the password, so postern reads the name
//! from the message that carries it, as the mechanism defines it, and nothing else.

use crate::sasl::Mechanism;

/// The name the client claims in `message` (decoded, no CRLF), if this is the message
/// of `mechanism` that carries it:
/// - CRAM-MD5 (RFC 2195): the response, `name SP digest`.
/// - SCRAM (RFC 5802 §5.1): the client-first message, `gs2-header n=name,r=nonce`,
///   with `=2C` and `=3D` standing for `,` and `=`.
pub fn claimed_name(mechanism: Mechanism, message: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(message).ok()?;
    let name = match mechanism {
        Mechanism::CramMd5 => text.rsplit_once(' ')?.0.to_owned(),
        Mechanism::ScramSha1 | Mechanism::ScramSha256 => scram_name(text)?,
        Mechanism::Plain | Mechanism::Login => return None,
    };
    (!name.is_empty()).then_some(name)
}

/// Whether an initial response to `mechanism` is the message that names the user:
/// SCRAM's client-first message is; CRAM-MD5 is server-first, and Dovecot ignores an
/// initial response to it.
pub fn named_initially(mechanism: Mechanism) -> bool {
    matches!(mechanism, Mechanism::ScramSha1 | Mechanism::ScramSha256)
}

/// What a server-first SCRAM message would say to a name the source does not know, so
/// that the answer to a client-first message tells no names apart (RFC 5802 §9: the
/// salt of an unknown user "should be" made up, and constant per name). `key` is a
/// secret of the process; the iteration count is Dovecot's (4096).
pub fn decoy_server_first(
    client_first: &[u8],
    name: &str,
    key: &[u8; 32],
    random: &[u8; 18],
) -> Option<Vec<u8>> {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use sha2::{Digest, Sha256};
    let text = std::str::from_utf8(client_first).ok()?;
    let bare = text.splitn(3, ',').nth(2)?;
    let nonce = bare.split(',').find_map(|a| a.strip_prefix("r="))?;
    let mut salt = Sha256::new();
    salt.update(key);
    salt.update(name.as_bytes());
    let salt = salt.finalize();
    Some(
        format!(
            "r={nonce}{},s={},i=4096",
            STANDARD.encode(random),
            STANDARD.encode(&salt[..16])
        )
        .into_bytes(),
    )
}

fn scram_name(client_first: &str) -> Option<String> {
    // gs2-cbind-flag "," [authzid] "," client-first-message-bare
    let mut parts = client_first.splitn(3, ',');
    let flag = parts.next()?;
    if !matches!(flag.as_bytes().first(), Some(b'n' | b'y' | b'p')) {
        return None;
    }
    let authzid = parts.next()?;
    let bare = parts.next()?;
    let encoded = bare.split(',').find_map(|a| a.strip_prefix("n="))?;
    // As for PLAIN (`sasl::plain`), acting as another user is never granted: an
    // authzid other than the name itself names nobody postern lets through (Dovecot
    // would let a master user in as anyone).
    if !authzid.is_empty() && authzid.strip_prefix("a=") != Some(encoded) {
        return None;
    }
    Some(encoded.replace("=2C", ",").replace("=3D", "="))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decoy_server_first_extends_the_clients_nonce_and_keeps_a_salt_per_name() {
        let key = [9; 32];
        let first = decoy_server_first(b"n,,n=nobody,r=abc", "nobody", &key, &[1; 18]).unwrap();
        let again = decoy_server_first(b"n,,n=nobody,r=xyz", "nobody", &key, &[2; 18]).unwrap();
        let other = decoy_server_first(b"n,,n=else,r=abc", "else", &key, &[1; 18]).unwrap();
        let text = String::from_utf8(first.clone()).unwrap();
        assert!(text.starts_with("r=abc"), "{text}");
        assert!(text.ends_with(",i=4096"), "{text}");
        let salt = |m: &[u8]| {
            String::from_utf8(m.to_vec())
                .unwrap()
                .split(',')
                .nth(1)
                .unwrap()
                .to_owned()
        };
        assert_eq!(salt(&first), salt(&again), "one salt per name");
        assert_ne!(salt(&first), salt(&other));
        assert_eq!(
            decoy_server_first(b"n,,n=nobody", "nobody", &key, &[1; 18]),
            None
        );
    }

    #[test]
    fn names_are_read_where_each_mechanism_puts_them() {
        for (mechanism, message, expected) in [
            (
                Mechanism::CramMd5,
                &b"tim b913a602c7eda7a495b4e6e7334d3890"[..],
                Some("tim"),
            ),
            (
                Mechanism::CramMd5,
                b"first last 0123456789abcdef0123456789abcdef",
                Some("first last"),
            ),
            (Mechanism::CramMd5, b"nospace", None),
            (Mechanism::CramMd5, b" 0123", None),
            (
                Mechanism::ScramSha256,
                b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
                Some("user"),
            ),
            (
                Mechanism::ScramSha1,
                b"y,a=a=2Cb=3Dc,n=a=2Cb=3Dc,r=nonce",
                Some("a,b=c"),
            ),
            // Acting as another user: nobody postern lets through.
            (Mechanism::ScramSha1, b"y,a=admin,n=a=2Cb=3Dc,r=nonce", None),
            (Mechanism::ScramSha256, b"n,x,n=user,r=nonce", None),
            (Mechanism::ScramSha256, b"n,,r=nonce", None),
            (Mechanism::ScramSha256, b"c=biws,r=nonce,p=proof", None),
            (Mechanism::ScramSha256, b"\xff\xfe", None),
            (Mechanism::Plain, b"\0user\0pass", None),
        ] {
            assert_eq!(
                claimed_name(mechanism, message).as_deref(),
                expected,
                "{mechanism} {:?}",
                String::from_utf8_lossy(message)
            );
        }
    }
}
