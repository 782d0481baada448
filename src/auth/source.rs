//! Where credentials are checked: exactly one [`Source`] per process, chosen by the
//! flags. The passwd-file is checked here on the blocking pool; Dovecot's auth service,
//! an LDAP directory and an nginx `auth_http` server are asked over the network. Every
//! source answers the same three ways: valid (maybe naming the backend to use), invalid,
//! or unavailable (`454 4.7.0`, never `535`). The abuse defences around the check live
//! in [`super::Authenticator`], so they are the same whatever the source.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::{dovecot, http, ldap};
use crate::sasl::{Credentials, Mechanism};
use crate::users::{Check, UserDb};

/// Which kind of source, for the `source` metric label, logs and `postern check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dovecot,
    Ldap,
    Http,
}

impl Kind {
    pub fn label(self) -> &'static str {
        use crate::metrics::label::auth_source;
        match self {
            Kind::File => auth_source::FILE,
            Kind::Dovecot => auth_source::DOVECOT,
            Kind::Ldap => auth_source::LDAP,
            Kind::Http => auth_source::HTTP,
        }
    }
}

/// The source as configured, before anything is loaded or connected.
#[derive(Debug, Clone)]
pub enum Config {
    /// `--users PATH`.
    File(PathBuf),
    /// `--dovecot-auth unix:PATH|inet:HOST:PORT`.
    Dovecot {
        target: dovecot::Target,
        timeout: Duration,
    },
    /// `--ldap-url` and friends.
    Ldap(ldap::Settings),
    /// `--auth-http URL`.
    Http { url: String, timeout: Duration },
}

impl Config {
    pub fn kind(&self) -> Kind {
        match self {
            Config::File(_) => Kind::File,
            Config::Dovecot { .. } => Kind::Dovecot,
            Config::Ldap(_) => Kind::Ldap,
            Config::Http { .. } => Kind::Http,
        }
    }

    /// Where it is, for logs: a path, a socket, a URL.
    pub fn describe(&self) -> String {
        match self {
            Config::File(path) => format!("users file {}", path.display()),
            Config::Dovecot { target, .. } => format!("Dovecot auth at {target}"),
            Config::Ldap(settings) => format!("LDAP at {}", settings.url),
            Config::Http { url, .. } => format!("auth_http server {url}"),
        }
    }
}

/// A credential source, ready to answer.
pub enum Source {
    /// A reload swaps the file for new checks; a check already running keeps its copy.
    File(RwLock<Arc<UserDb>>),
    Dovecot(dovecot::Client),
    Ldap(ldap::Source),
    Http(http::Client),
}

/// One attempt as the source is told about it.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    pub credentials: &'a Credentials,
    pub client: SocketAddr,
    pub local: SocketAddr,
    /// The client's EHLO/HELO name.
    pub helo: Option<&'a str>,
    /// 1 for the connection's first AUTH, then 2, 3, ... (auth_http's
    /// `Auth-Login-Attempt`).
    pub number: u32,
}

/// A source's answer that it could check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub valid: bool,
    /// The work cost what an unknown user costs (the file's decoy hash).
    pub decoy_work: bool,
    /// Where this user's session must go (auth_http's `Auth-Server` and `Auth-Port`).
    pub route: Option<SocketAddr>,
    /// How long the client must wait for a refusal (auth_http's `Auth-Wait`).
    pub wait: Option<Duration>,
    /// The account's own name, where the source accepts more than one spelling of it
    /// (Dovecot's `user=`, the LDAP entry's, auth_http's `Auth-User`): the session goes
    /// on under it, so every spelling shares one sending budget and the backend is told
    /// one login.
    pub user: Option<String>,
}

impl Answer {
    fn valid(valid: bool) -> Answer {
        Answer {
            valid,
            decoy_work: false,
            route: None,
            wait: None,
            user: None,
        }
    }
}

/// The source could not say: down, slow, or answering nonsense. The text is for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String, pub Answered);

/// Whether the source answered when it could not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// No answer (unreachable, too slow, nonsense): the source counts as down.
    No,
    /// It answered "try later" for this one attempt (a passdb failing for one user, an
    /// auth_http 4xx): `454 4.7.0`, but the source is up, or any client that knows
    /// such a name could flip `/readyz`.
    TryLater,
}

impl Unavailable {
    pub fn down(reason: String) -> Unavailable {
        Unavailable(reason, Answered::No)
    }

    pub fn try_later(reason: String) -> Unavailable {
        Unavailable(reason, Answered::TryLater)
    }
}

impl Source {
    /// Loads the file, or makes the client of a remote source (nothing is connected
    /// yet: a source that is down at start-up is reported by the readiness probe).
    pub fn open(config: &Config) -> Result<Source, String> {
        Ok(match config {
            Config::File(path) => {
                let users = UserDb::load(path).map_err(|e| e.to_string())?;
                Source::File(RwLock::new(Arc::new(users)))
            }
            Config::Dovecot { target, timeout } => Source::Dovecot(dovecot::Client::new(
                target.clone(),
                dovecot::Options {
                    timeout: *timeout,
                    // postern's own failure windows and pacing stand in front; Dovecot's
                    // penalty on top would double every failure's delay.
                    no_penalty: true,
                },
            )),
            Config::Ldap(settings) => {
                Source::Ldap(ldap::Source::new(settings.clone()).map_err(|e| e.to_string())?)
            }
            Config::Http { url, timeout } => Source::Http(
                http::Client::new(url, *timeout).map_err(|e| format!("--auth-http: {e}"))?,
            ),
        })
    }

    pub fn kind(&self) -> Kind {
        match self {
            Source::File(_) => Kind::File,
            Source::Dovecot(_) => Kind::Dovecot,
            Source::Ldap(_) => Kind::Ldap,
            Source::Http(_) => Kind::Http,
        }
    }

    /// The users file in use, for a file source.
    pub fn users(&self) -> Option<Arc<UserDb>> {
        match self {
            Source::File(users) => Some(match users.read() {
                Ok(guard) => guard.clone(),
                Err(poisoned) => poisoned.into_inner().clone(),
            }),
            _ => None,
        }
    }

    /// New checks use `users`. `false` when this is not a file source.
    pub fn replace_users(&self, users: Arc<UserDb>) -> bool {
        let Source::File(current) = self else {
            return false;
        };
        match current.write() {
            Ok(mut guard) => *guard = users,
            Err(poisoned) => *poisoned.into_inner() = users,
        }
        true
    }

    /// The mechanisms this source can verify, in the order EHLO lists them. `None`
    /// from a Dovecot that was never reached: it is asked again on the next session.
    pub fn mechanisms(&self) -> Option<Vec<Mechanism>> {
        match self {
            Source::File(_) => {
                let users = self.users()?;
                let mut mechanisms = vec![Mechanism::Plain, Mechanism::Login];
                // CRAM-MD5 needs the cleartext: offered to a hashed user it only earns
                // that client a 535 (and smtplib tries it first).
                if users.all_plain() {
                    mechanisms.push(Mechanism::CramMd5);
                }
                Some(mechanisms)
            }
            Source::Dovecot(client) => {
                let handshake = client.handshake()?;
                // postern collects PLAIN and LOGIN itself and checks both as PLAIN.
                let plain = handshake.find_usable("PLAIN").is_some();
                Some(
                    handshake
                        .usable_mechanisms()
                        .filter_map(|m| Mechanism::parse(m.name()))
                        .filter(|m| plain || !matches!(m, Mechanism::Plain | Mechanism::Login))
                        .collect(),
                )
            }
            Source::Ldap(_) => Some(ldap::MECHANISMS.to_vec()),
            // What nginx's smtp_auth offers by default; CRAM-MD5 with --auth-mechanisms,
            // for an auth server that keeps cleartext passwords.
            Source::Http(_) => Some(vec![Mechanism::Plain, Mechanism::Login]),
        }
    }

    /// Whether `mechanism` can be verified by this source at all (for
    /// `--auth-mechanisms`).
    pub fn can_verify(&self, mechanism: Mechanism) -> bool {
        match self {
            Source::File(_) | Source::Http(_) => mechanism.runs_locally(),
            Source::Dovecot(_) => true,
            Source::Ldap(_) => ldap::MECHANISMS.contains(&mechanism),
        }
    }

    /// Checks credentials postern collected itself (PLAIN, LOGIN, and CRAM-MD5 for a
    /// file or auth_http source). A file check runs on a hashing thread ([`super::hashing`]).
    pub async fn check(&self, attempt: Attempt<'_>) -> Result<Answer, Unavailable> {
        match self {
            Source::File(_) => {
                let users = self
                    .users()
                    .ok_or_else(|| Unavailable::down("no users".into()))?;
                let credentials = attempt.credentials.clone();
                let check = super::hashing::run(move || check_file(&users, &credentials));
                let check = check
                    .await
                    .map_err(|e| Unavailable::down(format!("verifier task: {e}")))?;
                Ok(Answer {
                    valid: check.valid,
                    decoy_work: check.decoy_work,
                    route: None,
                    wait: None,
                    user: None,
                })
            }
            Source::Dovecot(client) => check_dovecot(client, attempt).await,
            Source::Ldap(source) => match attempt.credentials {
                Credentials::Password { username, password } => {
                    match source.verify_account(username, password).await {
                        (ldap::Verdict::Valid, account) => Ok(Answer {
                            user: Some(
                                account.unwrap_or_else(|| ldap::account::fallback(username)),
                            ),
                            ..Answer::valid(true)
                        }),
                        (ldap::Verdict::Invalid(refusal), _) => {
                            tracing::debug!(%refusal, "LDAP refused the credentials");
                            Ok(Answer::valid(false))
                        }
                        (ldap::Verdict::Down(down), _) => Err(Unavailable::down(down.to_string())),
                    }
                }
                Credentials::CramMd5 { .. } => Ok(Answer::valid(false)),
            },
            Source::Http(client) => check_http(client, attempt).await,
        }
    }

    /// Whether the source answers now, and what it said: Dovecot's handshake, an LDAP
    /// service bind, the auth_http server accepting a connection.
    pub async fn probe(&self) -> Result<String, String> {
        match self {
            Source::File(_) => {
                let users = self.users().map(|u| u.len()).unwrap_or_default();
                Ok(format!("{users} users"))
            }
            Source::Dovecot(client) => {
                let handshake = client.probe().await.map_err(|e| e.to_string())?;
                let names: Vec<&str> = handshake.usable_mechanisms().map(|m| m.name()).collect();
                Ok(format!(
                    "handshake done, mechanisms usable over TLS: {}",
                    names.join(" ")
                ))
            }
            Source::Ldap(source) => source.check().await.map_err(|e| e.to_string()),
            Source::Http(client) => client.reachable().await.map_err(|e| e.to_string()),
        }
    }
}

/// Whether checking `credentials` against `users` costs microseconds (a `{PLAIN}`
/// comparison, a CRAM-MD5 HMAC): then it runs where it is asked, without a verifier or
/// a hop to the blocking pool (measured: 4% of a session's CPU, and a queue behind
/// argon2 under attack).
pub fn is_cheap(users: &UserDb, credentials: &Credentials) -> bool {
    match credentials {
        Credentials::Password { username, .. } => users.is_plain(username),
        Credentials::CramMd5 { .. } => true,
    }
}

pub fn check_file(users: &UserDb, credentials: &Credentials) -> Check {
    match credentials {
        Credentials::Password { username, password } => users.check_password(username, password),
        Credentials::CramMd5 {
            username,
            challenge,
            digest,
        } => Check {
            valid: users.verify_cram_md5(username, challenge, digest),
            decoy_work: false,
        },
    }
}

/// PLAIN and LOGIN are collected by postern and checked as one `AUTH PLAIN` (the
/// failure windows need the name before Dovecot sees the password).
async fn check_dovecot(
    client: &dovecot::Client,
    attempt: Attempt<'_>,
) -> Result<Answer, Unavailable> {
    let Credentials::Password { username, password } = attempt.credentials else {
        // CRAM-MD5 with Dovecot is relayed ([`super::Relayed`]), never collected.
        return Ok(Answer::valid(false));
    };
    let mut message = Vec::with_capacity(username.len() + password.len() + 2);
    message.push(0);
    message.extend_from_slice(username.as_bytes());
    message.push(0);
    message.extend_from_slice(password);
    let info = client_info(&attempt);
    let (exchange, step) = match client.start("PLAIN", Some(&message), &info).await {
        Ok(started) => started,
        // Credentials longer than one Dovecot request line (a long LOGIN) fit no
        // account; Dovecot never saw them and is not down.
        Err(dovecot::Error::ResponseTooLong) => return Ok(Answer::valid(false)),
        Err(e) => return Err(Unavailable::down(e.to_string())),
    };
    match step {
        dovecot::Step::Success { user } => Ok(Answer {
            user: Some(user),
            ..Answer::valid(true)
        }),
        dovecot::Step::Failure {
            temporary: true,
            reason,
            ..
        } => Err(Unavailable::try_later(format!(
            "Dovecot could not check: {}",
            reason.as_deref().unwrap_or("temporary failure")
        ))),
        dovecot::Step::Failure { .. } => Ok(Answer::valid(false)),
        dovecot::Step::Challenge(_) => {
            exchange.cancel().await;
            Err(Unavailable::down(
                "Dovecot asked for more than PLAIN sends".into(),
            ))
        }
    }
}

/// What Dovecot's AUTH line says about the client (`rip`, `lip`, ...).
pub fn client_info(attempt: &Attempt<'_>) -> dovecot::ClientInfo {
    dovecot::ClientInfo {
        remote: Some(attempt.client),
        local: Some(attempt.local),
        local_name: None,
        session: None,
    }
}

async fn check_http(client: &http::Client, attempt: Attempt<'_>) -> Result<Answer, Unavailable> {
    let (method, user, pass, salt) = match attempt.credentials {
        Credentials::Password { username, password } => {
            (http::Method::Plain, username, password.as_slice(), None)
        }
        Credentials::CramMd5 {
            username,
            challenge,
            digest,
        } => (
            http::Method::CramMd5,
            username,
            digest.as_bytes(),
            Some(challenge.as_str()),
        ),
    };
    let request = http::Request {
        method,
        user,
        pass,
        salt,
        attempt: attempt.number,
        client_ip: attempt.client.ip(),
        helo: attempt.helo,
    };
    match client.ask(&request).await {
        Ok(http::Answer::Ok { backend, user }) => Ok(Answer {
            route: backend,
            user,
            ..Answer::valid(true)
        }),
        // An auth server that says "try later" (a 4xx code) is a source that cannot
        // check now, not a wrong password.
        Ok(http::Answer::Refused {
            message,
            error_code: Some(code),
            ..
        }) if code.starts_with('4') => Err(Unavailable::try_later(format!(
            "auth_http server: {code} {message}"
        ))),
        Ok(http::Answer::Refused { message, wait, .. }) => {
            tracing::debug!(%message, "auth_http server refused the credentials");
            Ok(Answer {
                wait,
                ..Answer::valid(false)
            })
        }
        Err(error) => Err(Unavailable::down(format!("auth_http server: {error}"))),
    }
}
