//! The client's half of each mechanism: what a client answers, base64-encoded and ready
//! to send after `AUTH <mechanism> ` or as a continuation line (RFC 4954 §4).
//!
//! postern itself never logs in anywhere; this is for the tools around it that do (the
//! load generator in `postern-bench`) and for tests, so that they speak the same
//! encodings the server half in [`super`] parses, from one implementation.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// RFC 4616 §2: `NUL authcid NUL passwd`, with no authorization identity: the `AUTH PLAIN`
/// initial response.
pub fn plain(username: &str, password: &[u8]) -> String {
    let mut message = Vec::with_capacity(username.len() + password.len() + 2);
    message.push(0);
    message.extend_from_slice(username.as_bytes());
    message.push(0);
    message.extend_from_slice(password);
    STANDARD.encode(message)
}

/// LOGIN: the answers to the `Username:` and `Password:` prompts, in that order.
pub fn login(username: &str, password: &[u8]) -> [String; 2] {
    [STANDARD.encode(username), STANDARD.encode(password)]
}

/// RFC 2195 §2: the answer to a CRAM-MD5 challenge, given as the base64 text after
/// `334 `: `username SP hex(HMAC-MD5(secret, challenge))`. `None` if the challenge is not
/// base64.
pub fn cram_md5(username: &str, secret: &[u8], challenge: &str) -> Option<String> {
    let challenge = STANDARD.decode(challenge.trim()).ok()?;
    let digest = crate::users::cram_md5_digest(secret, &challenge)?;
    let mut response = Vec::with_capacity(username.len() + 1 + digest.len());
    response.extend_from_slice(username.as_bytes());
    response.push(b' ');
    response.extend_from_slice(&digest);
    Some(STANDARD.encode(response))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sasl::{Credentials, Exchange, Mechanism, Step};
    use crate::users::cram_md5_digest;

    fn password(username: &str, password: &[u8]) -> Step {
        Step::Done(Credentials::Password {
            username: username.to_owned(),
            password: password.to_vec(),
        })
    }

    #[test]
    fn rfc2195_example() {
        // RFC 2195 §2: tim / tanstaaftanstaaf.
        let challenge = "PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+";
        assert_eq!(
            cram_md5("tim", b"tanstaaftanstaaf", challenge).as_deref(),
            Some("dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw")
        );
        assert_eq!(cram_md5("tim", b"x", "not base64!"), None);
    }

    #[test]
    fn the_server_half_reads_what_the_client_half_sends() {
        let user = "alice@example.test";
        let secret = "pässword with spaces".as_bytes();

        let response = plain(user, secret);
        let (_, step) = Exchange::start(Mechanism::Plain, Some(response.as_bytes()), "");
        assert_eq!(step, password(user, secret));

        let (mut exchange, step) = Exchange::start(Mechanism::Login, None, "");
        assert!(matches!(step, Step::Challenge(_)), "{step:?}");
        let [name, pass] = login(user, secret);
        assert!(matches!(exchange.step(name.as_bytes()), Step::Challenge(_)));
        assert_eq!(exchange.step(pass.as_bytes()), password(user, secret));

        let nonce = "<1.2@postern.test>";
        let (mut exchange, step) = Exchange::start(Mechanism::CramMd5, None, nonce);
        let Step::Challenge(challenge) = step else {
            panic!("{step:?}")
        };
        let answer = cram_md5(user, secret, &challenge).expect("base64 challenge");
        let expected = cram_md5_digest(secret, nonce.as_bytes()).expect("digest");
        assert_eq!(
            exchange.step(answer.as_bytes()),
            Step::Done(Credentials::CramMd5 {
                username: user.to_owned(),
                challenge: nonce.to_owned(),
                digest: String::from_utf8_lossy(&expected).into_owned(),
            })
        );
    }
}
