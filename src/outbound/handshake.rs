//! postern's own login to the upstream, sans-IO: greeting, EHLO, STARTTLS (RFC 3207),
//! EHLO again, AUTH (RFC 4954) with PLAIN (RFC 4616), LOGIN, XOAUTH2 (Google's and
//! Microsoft's format) or OAUTHBEARER (RFC 7628). The driver
//! ([`super::upstream`]) feeds it each reply and performs the [`Step`] it returns;
//! nothing here touches a socket, a clock or TLS.
//!
//! Only after `235` is the connection handed to the relay, so a sender's MAIL never
//! reaches an upstream that did not accept postern's credentials, and nothing goes
//! out before TLS: an upstream without STARTTLS is a failure, not a downgrade.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::secret::Secret;
use crate::sasl::client as sasl_client;
use crate::smtp::{BackendReply, Capabilities};

/// What postern logs in with.
#[derive(Debug, Clone)]
pub enum Login {
    Plain { user: String, password: Secret },
    Login { user: String, password: Secret },
    Xoauth2 { user: String, token: Secret },
    Oauthbearer { user: String, token: Secret },
}

impl Login {
    /// The mechanism's name in `AUTH` and in the upstream's EHLO.
    pub fn mechanism(&self) -> &'static str {
        match self {
            Login::Plain { .. } => "PLAIN",
            Login::Login { .. } => "LOGIN",
            Login::Xoauth2 { .. } => "XOAUTH2",
            Login::Oauthbearer { .. } => "OAUTHBEARER",
        }
    }

    pub fn user(&self) -> &str {
        match self {
            Login::Plain { user, .. }
            | Login::Login { user, .. }
            | Login::Xoauth2 { user, .. }
            | Login::Oauthbearer { user, .. } => user,
        }
    }

    pub fn is_oauth2(&self) -> bool {
        matches!(self, Login::Xoauth2 { .. } | Login::Oauthbearer { .. })
    }
}

/// What the driver does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Write these bytes (one command line, CRLF included) and read the next reply.
    Send(Vec<u8>),
    /// Run the TLS handshake, then call [`Handshake::on_tls_established`].
    StartTls,
    /// Logged in: the connection belongs to the relay. `capabilities` is the upstream's
    /// EHLO answer over TLS, what the relay follows BDAT and SIZE by.
    Done {
        capabilities: Capabilities,
    },
    Failed(Failure),
}

/// Why the upstream cannot be used for this session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The upstream answered a stage with an unexpected code (`text` is its first line).
    Refused {
        stage: &'static str,
        code: u16,
        text: String,
    },
    /// `--upstream-tls starttls` and EHLO offers no STARTTLS: never send in plaintext.
    NoStartTls,
    /// The upstream's EHLO over TLS does not offer the configured mechanism.
    MechanismNotOffered(&'static str),
    /// AUTH was answered with something other than 235 (`code` of the final reply).
    AuthRefused { code: u16, text: String },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused { stage, code, text } => write!(f, "{stage} answered {code} {text}"),
            Failure::NoStartTls => f.write_str("upstream does not offer STARTTLS"),
            Failure::MechanismNotOffered(name) => {
                write!(f, "upstream does not offer AUTH {name} over TLS")
            }
            Failure::AuthRefused { code, text } => write!(f, "AUTH answered {code} {text}"),
        }
    }
}

enum State {
    Greeting,
    Ehlo {
        tls: bool,
    },
    StartTls,
    /// `AUTH` sent; `prompts` continuation lines (334) answered so far.
    Auth {
        prompts: u8,
        capabilities: Capabilities,
    },
    /// An OAuth2 error challenge was answered; waiting for the final (failing) reply.
    AuthError {
        code: u16,
        text: String,
    },
    Finished,
}

/// One login to the upstream.
pub struct Handshake {
    state: State,
    hostname: String,
    /// `HOST` of `--upstream`, for OAUTHBEARER's `host=`.
    host: String,
    port: u16,
    /// TLS from the first byte (`--upstream-tls implicit`).
    implicit: bool,
    /// `None` for a probe: stop after EHLO over TLS.
    login: Option<Login>,
}

impl Handshake {
    /// Before the upstream's greeting; with `implicit` the TLS handshake is already
    /// done.
    pub fn new(hostname: &str, host: &str, port: u16, implicit: bool, login: Login) -> Self {
        Handshake {
            state: State::Greeting,
            hostname: hostname.to_owned(),
            host: host.to_owned(),
            port,
            implicit,
            login: Some(login),
        }
    }

    /// A probe: TLS and EHLO, no AUTH; [`Step::Done`] after the EHLO over TLS.
    pub fn probe(hostname: &str, implicit: bool) -> Self {
        Handshake {
            state: State::Greeting,
            hostname: hostname.to_owned(),
            host: String::new(),
            port: 0,
            implicit,
            login: None,
        }
    }

    fn ehlo(&self) -> Vec<u8> {
        format!("EHLO {}\r\n", self.hostname).into_bytes()
    }

    /// The TLS handshake asked for by [`Step::StartTls`] completed: greet again
    /// (RFC 3207 §4.2: nothing learnt before TLS is kept).
    pub fn on_tls_established(&mut self) -> Step {
        self.state = State::Ehlo { tls: true };
        Step::Send(self.ehlo())
    }

    /// The upstream's next reply.
    pub fn on_reply(&mut self, reply: &BackendReply) -> Step {
        let text = || reply.lines.first().cloned().unwrap_or_default();
        let refused = |stage| {
            Step::Failed(Failure::Refused {
                stage,
                code: reply.code,
                text: text(),
            })
        };
        match std::mem::replace(&mut self.state, State::Finished) {
            State::Greeting if reply.code == 220 => {
                self.state = State::Ehlo { tls: self.implicit };
                Step::Send(self.ehlo())
            }
            State::Greeting => refused("greeting"),
            State::Ehlo { .. } if reply.code != 250 => refused("EHLO"),
            State::Ehlo { tls: false } => {
                let capabilities = Capabilities::from_ehlo_reply(&reply.lines);
                if !capabilities.has("STARTTLS") {
                    return Step::Failed(Failure::NoStartTls);
                }
                self.state = State::StartTls;
                Step::Send(b"STARTTLS\r\n".to_vec())
            }
            State::Ehlo { tls: true } => {
                let capabilities = Capabilities::from_ehlo_reply(&reply.lines);
                let Some(login) = &self.login else {
                    return Step::Done { capabilities };
                };
                let mechanism = login.mechanism();
                let offered = capabilities.line("AUTH").is_some_and(|line| {
                    line.split_ascii_whitespace()
                        .skip(1)
                        .any(|m| m.eq_ignore_ascii_case(mechanism))
                });
                if !offered {
                    return Step::Failed(Failure::MechanismNotOffered(mechanism));
                }
                let command = self.auth_command();
                self.state = State::Auth {
                    prompts: 0,
                    capabilities,
                };
                Step::Send(command)
            }
            State::StartTls if reply.code == 220 => Step::StartTls,
            State::StartTls => refused("STARTTLS"),
            State::Auth { capabilities, .. } if reply.code == 235 => Step::Done { capabilities },
            State::Auth {
                prompts,
                capabilities,
            } if reply.code == 334 => self.on_challenge(prompts, capabilities, reply),
            State::Auth { .. } => Step::Failed(Failure::AuthRefused {
                code: reply.code,
                text: text(),
            }),
            // The error text of the 334 says more than the final 535.
            State::AuthError { code, text } => Step::Failed(Failure::AuthRefused {
                code: if reply.code == 235 { code } else { reply.code },
                text,
            }),
            State::Finished => refused("after the handshake"),
        }
    }

    fn on_challenge(
        &mut self,
        prompts: u8,
        capabilities: Capabilities,
        reply: &BackendReply,
    ) -> Step {
        match (self.login.as_ref(), prompts) {
            (Some(Login::Login { user, password }), 0 | 1) => {
                let [name, pass] = sasl_client::login(user, password.expose().as_bytes());
                self.state = State::Auth {
                    prompts: prompts + 1,
                    capabilities,
                };
                let answer = if prompts == 0 { name } else { pass };
                Step::Send(format!("{answer}\r\n").into_bytes())
            }
            // RFC 7628 §3.2.3: an error challenge is answered with a lone ^A; Google's
            // XOAUTH2 documents an empty line. Either way the final reply is a failure.
            (Some(Login::Oauthbearer { .. }), 0) => {
                self.state = State::AuthError {
                    code: 334,
                    text: oauth_error(reply),
                };
                Step::Send(format!("{}\r\n", STANDARD.encode([1u8])).into_bytes())
            }
            (Some(Login::Xoauth2 { .. }), 0) => {
                self.state = State::AuthError {
                    code: 334,
                    text: oauth_error(reply),
                };
                Step::Send(b"\r\n".to_vec())
            }
            // A prompt no mechanism here expects: cancel (RFC 4954 §4) and fail.
            _ => {
                self.state = State::AuthError {
                    code: 334,
                    text: "unexpected AUTH challenge".into(),
                };
                Step::Send(b"*\r\n".to_vec())
            }
        }
    }

    fn auth_command(&self) -> Vec<u8> {
        let Some(login) = &self.login else {
            return Vec::new();
        };
        let line = match login {
            Login::Plain { user, password } => format!(
                "AUTH PLAIN {}",
                sasl_client::plain(user, password.expose().as_bytes())
            ),
            Login::Login { .. } => "AUTH LOGIN".to_owned(),
            Login::Xoauth2 { user, token } => {
                let message = format!("user={user}\x01auth=Bearer {}\x01\x01", token.expose());
                format!("AUTH XOAUTH2 {}", STANDARD.encode(message))
            }
            Login::Oauthbearer { user, token } => {
                // RFC 7628 §3.1: gs2 header with the authzid, then host, port, auth.
                let message = format!(
                    "n,a={},\x01host={}\x01port={}\x01auth=Bearer {}\x01\x01",
                    gs2_escape(user),
                    self.host,
                    self.port,
                    token.expose()
                );
                format!("AUTH OAUTHBEARER {}", STANDARD.encode(message))
            }
        };
        format!("{line}\r\n").into_bytes()
    }
}

/// RFC 5801 §4: `,` and `=` in a gs2 authzid are written `=2C` and `=3D`.
fn gs2_escape(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

/// The decoded JSON of an OAuth2 error challenge (`{"status":"invalid_token",...}`),
/// for the log: it names no secret.
fn oauth_error(reply: &BackendReply) -> String {
    let text = reply.lines.first().map(String::as_str).unwrap_or_default();
    let decoded = STANDARD.decode(text.trim()).unwrap_or_default();
    let mut error: String = String::from_utf8_lossy(&decoded)
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    if error.is_empty() {
        error = "token refused".into();
    }
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, lines: &[&str]) -> BackendReply {
        BackendReply {
            code,
            lines: lines.iter().map(|l| l.to_string()).collect(),
        }
    }

    fn sent(step: Step) -> String {
        match step {
            Step::Send(bytes) => String::from_utf8(bytes).expect("utf-8"),
            other => panic!("expected Send, got {other:?}"),
        }
    }

    fn decoded_auth(line: &str, mechanism: &str) -> String {
        let b64 = line
            .strip_prefix(&format!("AUTH {mechanism} "))
            .and_then(|rest| rest.strip_suffix("\r\n"))
            .unwrap_or_else(|| panic!("not AUTH {mechanism}: {line:?}"));
        String::from_utf8(STANDARD.decode(b64).expect("base64")).expect("utf-8")
    }

    const EHLO_PLAIN: &[&str] = &["smtp.test", "PIPELINING", "SIZE 1000", "STARTTLS"];
    const EHLO_TLS: &[&str] = &[
        "smtp.test",
        "PIPELINING",
        "SIZE 1000",
        "CHUNKING",
        "AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER",
    ];

    /// Greeting, EHLO, STARTTLS, TLS, EHLO: returns the AUTH line.
    fn to_auth(handshake: &mut Handshake) -> String {
        assert_eq!(
            sent(handshake.on_reply(&reply(220, &["smtp.test ESMTP"]))),
            "EHLO postern.test\r\n"
        );
        assert_eq!(
            sent(handshake.on_reply(&reply(250, EHLO_PLAIN))),
            "STARTTLS\r\n"
        );
        assert_eq!(
            handshake.on_reply(&reply(220, &["go ahead"])),
            Step::StartTls
        );
        assert_eq!(
            sent(handshake.on_tls_established()),
            "EHLO postern.test\r\n"
        );
        sent(handshake.on_reply(&reply(250, EHLO_TLS)))
    }

    fn starttls(login: Login) -> Handshake {
        Handshake::new("postern.test", "smtp.test", 587, false, login)
    }

    fn secret(s: &str) -> Secret {
        Secret::new(s)
    }

    #[test]
    fn plain_over_starttls() {
        let mut h = starttls(Login::Plain {
            user: "u@test".into(),
            password: secret("pw"),
        });
        let auth = to_auth(&mut h);
        assert_eq!(decoded_auth(&auth, "PLAIN"), "\0u@test\0pw");
        match h.on_reply(&reply(235, &["2.7.0 ok"])) {
            Step::Done { capabilities } => {
                assert!(capabilities.has("CHUNKING"));
                assert!(capabilities.has("SIZE"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn login_answers_both_prompts() {
        let mut h = starttls(Login::Login {
            user: "u".into(),
            password: secret("pw"),
        });
        assert_eq!(to_auth(&mut h), "AUTH LOGIN\r\n");
        assert_eq!(
            sent(h.on_reply(&reply(334, &["VXNlcm5hbWU6"]))),
            format!("{}\r\n", STANDARD.encode("u"))
        );
        assert_eq!(
            sent(h.on_reply(&reply(334, &["UGFzc3dvcmQ6"]))),
            format!("{}\r\n", STANDARD.encode("pw"))
        );
        assert!(matches!(
            h.on_reply(&reply(235, &["ok"])),
            Step::Done { .. }
        ));
    }

    #[test]
    fn xoauth2_and_oauthbearer_initial_responses() {
        let mut h = starttls(Login::Xoauth2 {
            user: "u@test".into(),
            token: secret("tok"),
        });
        assert_eq!(
            decoded_auth(&to_auth(&mut h), "XOAUTH2"),
            "user=u@test\x01auth=Bearer tok\x01\x01"
        );
        let mut h = starttls(Login::Oauthbearer {
            user: "a,b=c".into(),
            token: secret("tok"),
        });
        assert_eq!(
            decoded_auth(&to_auth(&mut h), "OAUTHBEARER"),
            "n,a=a=2Cb=3Dc,\x01host=smtp.test\x01port=587\x01auth=Bearer tok\x01\x01"
        );
    }

    #[test]
    fn a_refused_token_is_answered_then_fails_with_the_servers_error() {
        let error = STANDARD.encode(r#"{"status":"invalid_token"}"#);
        let mut h = starttls(Login::Oauthbearer {
            user: "u".into(),
            token: secret("tok"),
        });
        to_auth(&mut h);
        assert_eq!(sent(h.on_reply(&reply(334, &[&error]))), "AQ==\r\n");
        match h.on_reply(&reply(535, &["5.7.8 Authentication failed"])) {
            Step::Failed(Failure::AuthRefused { code, text }) => {
                assert_eq!(code, 535);
                assert!(text.contains("invalid_token"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        let mut h = starttls(Login::Xoauth2 {
            user: "u".into(),
            token: secret("tok"),
        });
        to_auth(&mut h);
        assert_eq!(sent(h.on_reply(&reply(334, &[&error]))), "\r\n");
        assert!(matches!(
            h.on_reply(&reply(535, &["5.7.8 no"])),
            Step::Failed(Failure::AuthRefused { code: 535, .. })
        ));
    }

    #[test]
    fn never_plaintext_and_never_an_unoffered_mechanism() {
        let login = || Login::Plain {
            user: "u".into(),
            password: secret("pw"),
        };
        let mut h = starttls(login());
        h.on_reply(&reply(220, &["hi"]));
        assert_eq!(
            h.on_reply(&reply(250, &["smtp.test", "AUTH PLAIN"])),
            Step::Failed(Failure::NoStartTls)
        );

        let mut h = Handshake::new("postern.test", "smtp.test", 465, true, login());
        assert_eq!(
            sent(h.on_reply(&reply(220, &["hi"]))),
            "EHLO postern.test\r\n"
        );
        assert_eq!(
            h.on_reply(&reply(250, &["smtp.test", "AUTH LOGIN XOAUTH2"])),
            Step::Failed(Failure::MechanismNotOffered("PLAIN"))
        );
        // Implicit TLS: AUTH straight after the first EHLO, no STARTTLS.
        let mut h = Handshake::new("postern.test", "smtp.test", 465, true, login());
        h.on_reply(&reply(220, &["hi"]));
        assert!(sent(h.on_reply(&reply(250, EHLO_TLS))).starts_with("AUTH PLAIN "));
    }

    #[test]
    fn refusals_at_each_stage() {
        let login = || Login::Plain {
            user: "u".into(),
            password: secret("pw"),
        };
        let mut h = starttls(login());
        assert!(matches!(
            h.on_reply(&reply(554, &["5.3.2 go away"])),
            Step::Failed(Failure::Refused {
                stage: "greeting",
                code: 554,
                ..
            })
        ));
        let mut h = starttls(login());
        h.on_reply(&reply(220, &["hi"]));
        assert!(matches!(
            h.on_reply(&reply(421, &["busy"])),
            Step::Failed(Failure::Refused { stage: "EHLO", .. })
        ));
        let mut h = starttls(login());
        h.on_reply(&reply(220, &["hi"]));
        h.on_reply(&reply(250, EHLO_PLAIN));
        assert!(matches!(
            h.on_reply(&reply(454, &["4.7.0 TLS not available"])),
            Step::Failed(Failure::Refused {
                stage: "STARTTLS",
                ..
            })
        ));
        let mut h = starttls(login());
        to_auth(&mut h);
        assert!(matches!(
            h.on_reply(&reply(535, &["5.7.8 bad"])),
            Step::Failed(Failure::AuthRefused { code: 535, .. })
        ));
    }

    #[test]
    fn a_probe_stops_after_ehlo_over_tls() {
        let mut h = Handshake::probe("postern.test", false);
        h.on_reply(&reply(220, &["hi"]));
        assert_eq!(sent(h.on_reply(&reply(250, EHLO_PLAIN))), "STARTTLS\r\n");
        assert_eq!(h.on_reply(&reply(220, &["go"])), Step::StartTls);
        h.on_tls_established();
        match h.on_reply(&reply(250, EHLO_TLS)) {
            Step::Done { capabilities } => assert!(capabilities.has("AUTH")),
            other => panic!("{other:?}"),
        }
    }

    proptest::proptest! {
        /// Whatever the upstream answers, the handshake never panics, never sends the
        /// credentials before TLS, and ends (Done or Failed) within a few replies.
        #[test]
        fn any_reply_sequence_ends_and_auth_only_after_tls(
            codes in proptest::collection::vec(
                proptest::sample::select(vec![220u16, 235, 250, 334, 421, 454, 535, 554]),
                1..12,
            ),
            mechanism in 0usize..4,
        ) {
            let user = "u".to_owned();
            let login = match mechanism {
                0 => Login::Plain { user, password: secret("pw") },
                1 => Login::Login { user, password: secret("pw") },
                2 => Login::Xoauth2 { user, token: secret("tok") },
                _ => Login::Oauthbearer { user, token: secret("tok") },
            };
            let mut h = starttls(login);
            let mut tls = false;
            let mut ended = false;
            let replies = codes.len();
            for code in codes {
                let lines: &[&str] = if code == 250 { EHLO_TLS } else { &["x"] };
                let lines = if code == 250 && !tls { EHLO_PLAIN } else { lines };
                let mut step = h.on_reply(&reply(code, lines));
                if step == Step::StartTls {
                    tls = true;
                    step = h.on_tls_established();
                }
                match step {
                    Step::Send(bytes) => {
                        let text = String::from_utf8_lossy(&bytes).into_owned();
                        proptest::prop_assert!(tls || !text.starts_with("AUTH"), "{}", text);
                        proptest::prop_assert!(bytes.ends_with(b"\r\n"));
                    }
                    Step::Done { .. } => {
                        proptest::prop_assert!(tls);
                        ended = true;
                        break;
                    }
                    Step::Failed(_) => {
                        ended = true;
                        break;
                    }
                    Step::StartTls => proptest::prop_assert!(false, "STARTTLS twice"),
                }
            }
            // The longest run: greeting, EHLO, STARTTLS, EHLO, AUTH, three 334s, the end.
            proptest::prop_assert!(ended || replies < 9);
        }
    }

    #[test]
    fn debug_output_names_no_secret() {
        let login = Login::Xoauth2 {
            user: "u".into(),
            token: secret("very-secret-token"),
        };
        assert!(!format!("{login:?}").contains("very-secret-token"));
    }
}
