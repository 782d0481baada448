//! The LDAP / Active Directory credential source (`--ldap-url`): a user name and
//! password from AUTH PLAIN or LOGIN are good when the directory accepts a simple bind
//! (RFC 4511 §4.2, RFC 4513 §5.1.3) as that user with that password.
//!
//! Two ways to find the user's DN, as Dovecot and Postfix's LDAP tables offer them:
//! - **direct bind** ([`Mode::DirectBind`]): `--ldap-user-dn uid=%u,ou=people,dc=example,dc=com`,
//!   the user name escaped as a DN value (RFC 4514, [`escape::dn_value`]);
//! - **search, then bind** ([`Mode::SearchBind`]): a service account
//!   (`--ldap-bind-dn`, `--ldap-bind-password-file`) searches `--ldap-search-base` with
//!   `--ldap-search-filter` (default `(uid=%u)`, for Active Directory
//!   `(sAMAccountName=%u)`), the user name escaped as a filter value (RFC 4515,
//!   [`escape::filter_value`]); exactly one entry must come back, and the bind is as
//!   that entry.
//!
//! The transport is `ldap://`, `ldap://` with `--ldap-starttls` (RFC 4511 §4.14,
//! RFC 4513 §3) or `ldaps://`, with rustls on the build's aws-lc-rs provider and
//! `--ldap-ca` or the system's CAs.
//!
//! What the caller gets is a [`Verdict`]: the credentials are [`Verdict::Valid`],
//! [`Verdict::Invalid`] (SMTP `535`), or the directory could not say
//! ([`Verdict::Down`], SMTP `454 4.7.0`): refused or broken connections, TLS failures,
//! `busy`/`unavailable`, a service account the directory refuses, and every step past
//! `--ldap-timeout`, which bounds the whole verification. An empty password is refused
//! before any I/O: sent, it would be an unauthenticated bind, which RFC 4513 §5.1.2
//! lets a server answer with success (the classic LDAP authentication bypass).
//!
//! Connections: at most `--ldap-pool-size` verifications talk to the directory at
//! once. Idle connections are kept, up to that many of each kind: the service
//! account's, used for searches only, and the users', used for binds only. A bind
//! replaces a connection's identity (RFC 4511 §4.2.1) and nothing but the next bind is
//! ever sent on a user connection, so no user's identity is used for anything else.

pub mod account;
pub mod escape;
pub mod ppolicy;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ldap3::asn1::PL;
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapResult, ResultEntry, Scope};
use ldap3::{SearchOptions, SearchResult};
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tracing::debug;

use crate::sasl::Mechanism;
use crate::tls;

/// The mechanisms this source can verify: it needs the cleartext password for a bind,
/// so PLAIN and LOGIN (never CRAM-MD5 or SCRAM, whose proofs an LDAP server cannot
/// check through a bind).
pub const MECHANISMS: &[Mechanism] = &[Mechanism::Plain, Mechanism::Login];

/// `--ldap-search-filter` when none is given.
pub const DEFAULT_SEARCH_FILTER: &str = "(uid=%u)";
/// `--ldap-timeout` when none is given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// `--ldap-pool-size` when none is given.
pub const DEFAULT_POOL_SIZE: usize = 4;
/// The largest `--ldap-pool-size`: a directory is one server, not a farm to flood.
pub const MAX_POOL_SIZE: usize = 64;

/// The longest user name sent to the directory; a longer one is refused unsent.
const MAX_USER_LEN: usize = 256;

/// No attributes (RFC 4511 §4.5.1.8): what a search asks for when only the DN is used.
const NO_ATTRIBUTES: &str = "1.1";

/// The RDN of the entry a failed search binds to (below the search base), so that an
/// unknown user costs the same round trips as a wrong password.
const DECOY_RDN: &str = "cn=postern-no-such-user";

/// How postern finds a user's entry.
#[derive(Clone, PartialEq, Eq)]
pub enum Mode {
    /// `--ldap-user-dn`: bind as this DN, [`escape::PLACEHOLDER`] replaced by the
    /// RFC 4514-escaped user name. Active Directory also takes a user principal name
    /// here (`%u@corp.example`); a user name with a DN-special character then fails to
    /// bind, which is safe.
    DirectBind { user_dn_template: String },
    /// `--ldap-search-base` and `--ldap-search-filter`: the service account
    /// (`--ldap-bind-dn`, the password from `--ldap-bind-password-file`) searches the
    /// subtree at `base` with the filter, [`escape::PLACEHOLDER`] replaced by the
    /// RFC 4515-escaped user name, then postern binds as the one entry found.
    SearchBind {
        base: String,
        filter_template: String,
        bind_dn: String,
        bind_password: String,
    },
}

impl fmt::Debug for Mode {
    // The service account's password never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::DirectBind { user_dn_template } => f
                .debug_struct("DirectBind")
                .field("user_dn_template", user_dn_template)
                .finish(),
            Mode::SearchBind {
                base,
                filter_template,
                bind_dn,
                ..
            } => f
                .debug_struct("SearchBind")
                .field("base", base)
                .field("filter_template", filter_template)
                .field("bind_dn", bind_dn)
                .field("bind_password", &"<redacted>")
                .finish(),
        }
    }
}

/// Everything the LDAP source is configured with. Build it with [`Settings::from_flags`]
/// or by hand and check it with [`Settings::validate`] ([`Source::new`] does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `--ldap-url`: `ldap://HOST[:PORT]` or `ldaps://HOST[:PORT]`.
    pub url: String,
    pub mode: Mode,
    /// `--ldap-starttls`: upgrade an `ldap://` connection before anything is sent.
    pub starttls: bool,
    /// `--ldap-ca`: PEM CA certificates to trust instead of the system's.
    pub ca: Option<PathBuf>,
    /// `--ldap-timeout`: the most one verification may take, from waiting for a
    /// connection to the bind's answer.
    pub timeout: Duration,
    /// `--ldap-pool-size`: verifications talking to the directory at once, and idle
    /// connections kept of each kind.
    pub pool_size: usize,
}

/// The LDAP flags as given on the command line, for [`Settings::from_flags`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flags {
    /// `--ldap-url`.
    pub url: String,
    /// `--ldap-user-dn`.
    pub user_dn: Option<String>,
    /// `--ldap-search-base`.
    pub search_base: Option<String>,
    /// `--ldap-search-filter`; [`DEFAULT_SEARCH_FILTER`] when absent.
    pub search_filter: Option<String>,
    /// `--ldap-bind-dn`.
    pub bind_dn: Option<String>,
    /// `--ldap-bind-password-file`.
    pub bind_password_file: Option<PathBuf>,
    /// `--ldap-starttls`.
    pub starttls: bool,
    /// `--ldap-ca`.
    pub ca: Option<PathBuf>,
    /// `--ldap-timeout`.
    pub timeout: Duration,
    /// `--ldap-pool-size`.
    pub pool_size: usize,
}

/// A configuration mistake, naming the flag to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError {
    /// The flag at fault, e.g. `--ldap-url`.
    pub flag: &'static str,
    pub message: String,
}

impl SettingsError {
    fn new(flag: &'static str, message: impl Into<String>) -> SettingsError {
        SettingsError {
            flag,
            message: message.into(),
        }
    }
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.flag, self.message)
    }
}

impl std::error::Error for SettingsError {}

impl Settings {
    /// Settings from the command line: picks the mode, reads the service account's
    /// password file and validates the whole.
    pub fn from_flags(flags: &Flags) -> Result<Settings, SettingsError> {
        let mode = match (&flags.user_dn, &flags.search_base) {
            (Some(_), Some(_)) => {
                return Err(SettingsError::new(
                    "--ldap-user-dn",
                    "--ldap-user-dn (bind directly) and --ldap-search-base (search, then \
                     bind) exclude each other",
                ));
            }
            (None, None) => {
                return Err(SettingsError::new(
                    "--ldap-url",
                    "needs --ldap-user-dn TEMPLATE, or --ldap-search-base DN with \
                     --ldap-bind-dn and --ldap-bind-password-file",
                ));
            }
            (Some(template), None) => {
                for (flag, given) in [
                    ("--ldap-search-filter", flags.search_filter.is_some()),
                    ("--ldap-bind-dn", flags.bind_dn.is_some()),
                    (
                        "--ldap-bind-password-file",
                        flags.bind_password_file.is_some(),
                    ),
                ] {
                    if given {
                        return Err(SettingsError::new(
                            flag,
                            "only used with --ldap-search-base, not with --ldap-user-dn",
                        ));
                    }
                }
                Mode::DirectBind {
                    user_dn_template: template.clone(),
                }
            }
            (None, Some(base)) => {
                let (Some(bind_dn), Some(password_file)) =
                    (&flags.bind_dn, &flags.bind_password_file)
                else {
                    let missing = if flags.bind_dn.is_none() {
                        "--ldap-bind-dn"
                    } else {
                        "--ldap-bind-password-file"
                    };
                    return Err(SettingsError::new(
                        missing,
                        "--ldap-search-base needs a service account to search with: \
                         --ldap-bind-dn DN and --ldap-bind-password-file PATH",
                    ));
                };
                Mode::SearchBind {
                    base: base.clone(),
                    filter_template: flags
                        .search_filter
                        .clone()
                        .unwrap_or_else(|| DEFAULT_SEARCH_FILTER.to_owned()),
                    bind_dn: bind_dn.clone(),
                    bind_password: read_password_file(password_file)?,
                }
            }
        };
        let settings = Settings {
            url: flags.url.clone(),
            mode,
            starttls: flags.starttls,
            ca: flags.ca.clone(),
            timeout: flags.timeout,
            pool_size: flags.pool_size,
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every field, returning the first mistake found.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let target = parse_url(&self.url)?;
        if self.starttls && target.tls {
            return Err(SettingsError::new(
                "--ldap-starttls",
                "is for ldap:// URLs; an ldaps:// connection is TLS from its first byte",
            ));
        }
        if self.ca.is_some() && !target.tls && !self.starttls {
            return Err(SettingsError::new(
                "--ldap-ca",
                "has no effect without TLS: use an ldaps:// URL or --ldap-starttls",
            ));
        }
        if self.timeout.is_zero() {
            return Err(SettingsError::new("--ldap-timeout", "must be more than 0"));
        }
        if self.pool_size == 0 || self.pool_size > MAX_POOL_SIZE {
            return Err(SettingsError::new(
                "--ldap-pool-size",
                format!("must be 1 to {MAX_POOL_SIZE}"),
            ));
        }
        match &self.mode {
            Mode::DirectBind { user_dn_template } => {
                if !user_dn_template.contains(escape::PLACEHOLDER) {
                    return Err(SettingsError::new(
                        "--ldap-user-dn",
                        format!(
                            "{user_dn_template:?} has no {}: every user would bind as the \
                             same DN",
                            escape::PLACEHOLDER
                        ),
                    ));
                }
            }
            Mode::SearchBind {
                base,
                filter_template,
                bind_dn,
                bind_password,
            } => {
                if base.trim().is_empty() {
                    return Err(SettingsError::new("--ldap-search-base", "is empty"));
                }
                if !filter_template.contains(escape::PLACEHOLDER) {
                    return Err(SettingsError::new(
                        "--ldap-search-filter",
                        format!(
                            "{filter_template:?} has no {}: the search would not depend \
                             on the user",
                            escape::PLACEHOLDER
                        ),
                    ));
                }
                // Filled in with a plain name, the template must be one RFC 4515 filter;
                // an escaped user name cannot change that.
                let sample = escape::fill(filter_template, "user");
                if !filter_template.starts_with('(') || ldap3::parse_filter(&sample).is_err() {
                    return Err(SettingsError::new(
                        "--ldap-search-filter",
                        format!(
                            "{filter_template:?} is not an LDAP filter (RFC 4515), e.g. \
                             (uid=%u) or (sAMAccountName=%u)"
                        ),
                    ));
                }
                if bind_dn.trim().is_empty() {
                    return Err(SettingsError::new("--ldap-bind-dn", "is empty"));
                }
                if bind_password.is_empty() {
                    return Err(SettingsError::new(
                        "--ldap-bind-password-file",
                        "the password is empty: a bind with a DN and no password is an \
                         unauthenticated bind (RFC 4513 §5.1.2), which servers may accept \
                         as anonymous",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Things that work but deserve a line in the log.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Ok(target) = parse_url(&self.url)
            && !target.tls
            && !self.starttls
            && !target.loopback
        {
            warnings.push(format!(
                "--ldap-url {}: users' passwords cross the network in clear text; use \
                 ldaps:// or --ldap-starttls",
                self.url
            ));
        }
        warnings
    }

    /// Whether connections use TLS, from the first byte or after StartTLS.
    fn uses_tls(&self) -> bool {
        self.starttls || parse_url(&self.url).is_ok_and(|t| t.tls)
    }
}

/// What [`parse_url`] learnt about `--ldap-url`.
struct Target {
    /// `ldaps://`.
    tls: bool,
    /// The host is a loopback address or `localhost`.
    loopback: bool,
}

/// Accepts `ldap://HOST[:PORT][/]` and `ldaps://HOST[:PORT][/]`: the parts of an LDAP
/// URL (RFC 4516) past the host (a DN, attributes, a filter) would be silently unused.
fn parse_url(text: &str) -> Result<Target, SettingsError> {
    let error = |why: &str| {
        SettingsError::new(
            "--ldap-url",
            format!("{text:?} {why}; expected ldap://HOST[:PORT] or ldaps://HOST[:PORT]"),
        )
    };
    let url = url::Url::parse(text).map_err(|e| error(&format!("is not a URL ({e})")))?;
    let tls = match url.scheme() {
        "ldap" => false,
        "ldaps" => true,
        _ => return Err(error("has another scheme")),
    };
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return Err(error("has no host"));
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(error(
            "holds credentials; the service account is --ldap-bind-dn",
        ));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(error(
            "has a DN, attributes or a filter; use --ldap-search-base and --ldap-search-filter",
        ));
    }
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    Ok(Target { tls, loopback })
}

/// Reads `--ldap-bind-password-file`: the whole file, less its line ending.
pub fn read_password_file(path: &Path) -> Result<String, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        SettingsError::new(
            "--ldap-bind-password-file",
            format!("reading {}: {e}", path.display()),
        )
    })?;
    let password = text.strip_suffix('\n').unwrap_or(&text);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err(SettingsError::new(
            "--ldap-bind-password-file",
            format!(
                "{} is empty: a bind with a DN and no password is an unauthenticated bind \
                 (RFC 4513 §5.1.2), which servers may accept as anonymous",
                path.display()
            ),
        ));
    }
    Ok(password.to_owned())
}

/// The directory's answer about one user name and password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The directory accepted the bind.
    Valid,
    /// The credentials are refused (SMTP `535 5.7.8`); the reason is for the log only.
    Invalid(Refusal),
    /// The directory could not say (SMTP `454 4.7.0`).
    Down(Down),
}

/// Why credentials were refused. Every reason gets the same SMTP answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// An empty password, refused unsent (RFC 4513 §5.1.2).
    EmptyPassword,
    /// A password that is not UTF-8: a simple bind's password is a UTF-8 string
    /// (RFC 4513 §5.1.3), and the client library sends it as one.
    PasswordNotUtf8,
    /// An empty user name, or one longer than 256 bytes; refused unsent.
    UserName,
    /// The search found no entry.
    NoSuchUser,
    /// The search found more than one entry: which one the client meant is unknown.
    Ambiguous,
    /// `invalidCredentials (49)` (RFC 4511 §4.1.9) with nothing more said.
    WrongPassword,
    /// The account is locked: OpenLDAP's password policy said `accountLocked`, or
    /// Active Directory `data 775`.
    Locked,
    /// The password has expired: the password policy said `passwordExpired`, or Active
    /// Directory `data 532`/`data 701`.
    Expired,
    /// Active Directory `data 533`: the account is disabled.
    Disabled,
    /// Another result code refusing this bind: `noSuchObject (32)`,
    /// `invalidDNSyntax (34)`, `inappropriateAuthentication (48)`,
    /// `insufficientAccessRights (50)` or `unwillingToPerform (53)`.
    Refused(u32),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::EmptyPassword => write!(f, "empty password, not sent"),
            Refusal::PasswordNotUtf8 => write!(f, "password is not UTF-8, not sent"),
            Refusal::UserName => write!(f, "unusable user name, not sent"),
            Refusal::NoSuchUser => write!(f, "no such user"),
            Refusal::Ambiguous => write!(f, "the search found several entries"),
            Refusal::WrongPassword => write!(f, "wrong password"),
            Refusal::Locked => write!(f, "account locked"),
            Refusal::Expired => write!(f, "password expired"),
            Refusal::Disabled => write!(f, "account disabled"),
            Refusal::Refused(rc) => write!(f, "bind refused: {}", result_name(*rc)),
        }
    }
}

/// The step at which the directory failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// No connection became free within the timeout.
    Busy,
    /// TCP, TLS or StartTLS.
    Connect,
    /// The service account's bind.
    ServiceBind,
    /// The search for the user's entry.
    Search,
    /// The user's bind.
    Bind,
}

impl Stage {
    /// A short name for logs and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Busy => "busy",
            Stage::Connect => "connect",
            Stage::ServiceBind => "service bind",
            Stage::Search => "search",
            Stage::Bind => "bind",
        }
    }
}

/// Why the directory could not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Down {
    pub stage: Stage,
    pub detail: String,
}

impl Down {
    fn new(stage: Stage, detail: impl Into<String>) -> Down {
        Down {
            stage,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Down {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LDAP {}: {}", self.stage.as_str(), self.detail)
    }
}

impl std::error::Error for Down {}

/// Idle connections of one kind, at most `max`.
struct Idle {
    conns: Mutex<Vec<Ldap>>,
    max: usize,
}

impl Idle {
    fn new(max: usize) -> Idle {
        Idle {
            conns: Mutex::new(Vec::with_capacity(max)),
            max,
        }
    }

    /// The most recently used idle connection whose driver still runs (one the server
    /// closed has a finished driver and is dropped here).
    fn take(&self) -> Option<Ldap> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(mut conn) = conns.pop() {
            if !conn.is_closed() {
                return Some(conn);
            }
        }
        None
    }

    fn put(&self, conn: Ldap) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() < self.max {
            conns.push(conn);
        }
    }
}

/// One found entry (its DN, and the account name it gives the login), none, or too many.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    One { dn: String, account: Option<String> },
    None,
    Many,
}

/// The LDAP credential source: verifies user names and passwords against a directory.
pub struct Source {
    settings: Settings,
    /// The TLS client config for `ldaps://` or StartTLS.
    tls: Option<Arc<ClientConfig>>,
    /// Connections bound as the service account, for searches.
    searchers: Idle,
    /// Connections used for user binds only.
    binders: Idle,
    /// Verifications talking to the directory.
    slots: Semaphore,
    /// The attributes an entry names its account with ([`account::attributes`]).
    account_attributes: Vec<String>,
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Source")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Source {
    /// Validates `settings` and loads the CA certificates; connects to nothing yet.
    pub fn new(settings: Settings) -> Result<Source, SettingsError> {
        settings.validate()?;
        let tls = if settings.uses_tls() {
            Some(client_config(settings.ca.as_deref())?)
        } else {
            None
        };
        Ok(Source {
            account_attributes: account::attributes(&settings.mode),
            searchers: Idle::new(settings.pool_size),
            binders: Idle::new(settings.pool_size),
            slots: Semaphore::new(settings.pool_size),
            tls,
            settings,
        })
    }

    /// The settings this source runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Asks the directory whether `password` is `user`'s, within `--ldap-timeout`.
    pub async fn verify(&self, user: &str, password: &[u8]) -> Verdict {
        self.verify_account(user, password).await.0
    }

    /// [`Source::verify`], and for a valid login the account name the entry gives (see
    /// [`account`]), when it gives one the user may read.
    pub async fn verify_account(&self, user: &str, password: &[u8]) -> (Verdict, Option<String>) {
        // RFC 4513 §5.1.2: a bind with a DN and an empty password is "unauthenticated"
        // and a server may answer it with success. Never sent.
        if password.is_empty() {
            return (Verdict::Invalid(Refusal::EmptyPassword), None);
        }
        let Ok(password) = std::str::from_utf8(password) else {
            return (Verdict::Invalid(Refusal::PasswordNotUtf8), None);
        };
        // A control character is no part of a login name; slapd binds `alice<TAB>` as
        // alice in a DN.
        if user.is_empty() || user.len() > MAX_USER_LEN || user.chars().any(char::is_control) {
            return (Verdict::Invalid(Refusal::UserName), None);
        }
        let deadline = Instant::now() + self.settings.timeout;
        let Ok(Ok(_slot)) = timeout_at(deadline, self.slots.acquire()).await else {
            let down = Down::new(
                Stage::Busy,
                format!(
                    "all {} connections stayed busy for {:?}",
                    self.settings.pool_size, self.settings.timeout
                ),
            );
            return (Verdict::Down(down), None);
        };
        match &self.settings.mode {
            Mode::DirectBind { user_dn_template } => {
                let dn = escape::fill(user_dn_template, &escape::dn_value(user));
                self.bind(&dn, password, deadline, Some(user)).await
            }
            Mode::SearchBind {
                base,
                filter_template,
                ..
            } => {
                let filter = escape::fill(filter_template, &escape::filter_value(user));
                let refusal = match self.search(base, &filter, user, deadline).await {
                    Err(down) => return (Verdict::Down(down), None),
                    Ok(Found::One { dn, account }) => {
                        let (verdict, _) = self.bind(&dn, password, deadline, None).await;
                        let account = account.filter(|_| verdict == Verdict::Valid);
                        return (verdict, account);
                    }
                    Ok(Found::None) => Refusal::NoSuchUser,
                    Ok(Found::Many) => Refusal::Ambiguous,
                };
                // A bind that cannot succeed, so that an unknown user takes the round
                // trips a wrong password takes, and a directory that stops answering
                // now gives the answer a real bind would.
                let verdict = match self.bind(&decoy_dn(base), password, deadline, None).await {
                    (Verdict::Down(down), _) => Verdict::Down(down),
                    (Verdict::Valid | Verdict::Invalid(_), _) => Verdict::Invalid(refusal),
                };
                (verdict, None)
            }
        }
    }

    /// `postern check`: connects (with StartTLS if asked), binds as the service account
    /// and looks up the search base (search mode), and says what it found.
    pub async fn check(&self) -> Result<String, Down> {
        let deadline = Instant::now() + self.settings.timeout;
        let mut conn = self.connect(deadline).await?;
        let transport = if self.settings.starttls {
            "StartTLS"
        } else if self.settings.uses_tls() {
            "TLS"
        } else {
            "no TLS"
        };
        let url = &self.settings.url;
        match &self.settings.mode {
            Mode::DirectBind { user_dn_template } => Ok(format!(
                "LDAP {url} answers ({transport}); users bind as {user_dn_template}"
            )),
            Mode::SearchBind {
                base,
                filter_template,
                bind_dn,
                bind_password,
            } => {
                self.service_bind(&mut conn, bind_dn, bind_password, deadline)
                    .await?;
                let lookup = conn.search(base, Scope::Base, "(objectClass=*)", vec![NO_ATTRIBUTES]);
                let result = match timeout_at(deadline, lookup).await {
                    Err(_) => return Err(self.timed_out(Stage::Search)),
                    Ok(Err(e)) => return Err(Down::new(Stage::Search, e.to_string())),
                    Ok(Ok(SearchResult(_, result))) => result,
                };
                if result.rc != 0 {
                    return Err(Down::new(
                        Stage::Search,
                        format!("search base {base} as {bind_dn}: {}", describe(&result)),
                    ));
                }
                Ok(format!(
                    "LDAP {url} answers ({transport}); bound as {bind_dn}; search base \
                     {base} found; users are searched with {filter_template}"
                ))
            }
        }
    }

    /// A user bind as `dn`, on an idle user connection or a new one; after a valid one,
    /// with `read_account_for` the login typed, the account name the entry gives it,
    /// read as the user.
    async fn bind(
        &self,
        dn: &str,
        password: &str,
        deadline: Instant,
        read_account_for: Option<&str>,
    ) -> (Verdict, Option<String>) {
        let (mut conn, mut reused) = match self.binders.take() {
            Some(conn) => (conn, true),
            None => match self.connect(deadline).await {
                Ok(conn) => (conn, false),
                Err(down) => return (Verdict::Down(down), None),
            },
        };
        loop {
            let bind = conn
                .with_controls(ppolicy::request())
                .simple_bind(dn, password);
            match timeout_at(deadline, bind).await {
                Err(_) => return (Verdict::Down(self.timed_out(Stage::Bind)), None),
                Ok(Err(e)) if reused => {
                    // The server closed this idle connection since its last use
                    // (restart, idle timeout): one more try on a fresh one.
                    debug!(error = %e, "LDAP: idle connection failed, reconnecting");
                    conn = match self.connect(deadline).await {
                        Ok(conn) => conn,
                        Err(down) => return (Verdict::Down(down), None),
                    };
                    reused = false;
                }
                Ok(Err(e)) => return (Verdict::Down(Down::new(Stage::Bind, e.to_string())), None),
                Ok(Ok(result)) => {
                    let verdict = bind_verdict(&result);
                    let account = match (&verdict, read_account_for) {
                        (Verdict::Valid, Some(user)) => {
                            self.read_account(&mut conn, dn, user, deadline).await
                        }
                        _ => None,
                    };
                    if !matches!(verdict, Verdict::Down(_)) {
                        self.binders.put(conn);
                    }
                    return (verdict, account);
                }
            }
        }
    }

    /// The account name the entry at `dn` gives, read on a connection bound as its
    /// user; `None` when the template names no attribute, or the user may not read it.
    async fn read_account(
        &self,
        conn: &mut Ldap,
        dn: &str,
        user: &str,
        deadline: Instant,
    ) -> Option<String> {
        if self.account_attributes.is_empty() {
            return None;
        }
        let attributes: Vec<&str> = self.account_attributes.iter().map(String::as_str).collect();
        let read = conn.search(dn, Scope::Base, "(objectClass=*)", attributes);
        match timeout_at(deadline, read).await {
            Ok(Ok(SearchResult(entries, result))) if result.rc == 0 => entries
                .iter()
                .find(|e| !e.is_ref() && !e.is_intermediate())
                .and_then(|entry| account::from_entry(entry, &self.account_attributes, user)),
            Ok(Ok(SearchResult(_, result))) => {
                debug!(result = %describe(&result), "LDAP: the user's entry could not be read for its account name");
                None
            }
            Ok(Err(e)) => {
                debug!(error = %e, "LDAP: the user's entry could not be read for its account name");
                None
            }
            Err(_) => None,
        }
    }

    /// Searches for the user's entry on an idle service connection or a new one.
    async fn search(
        &self,
        base: &str,
        filter: &str,
        user: &str,
        deadline: Instant,
    ) -> Result<Found, Down> {
        let (mut conn, mut reused) = match self.searchers.take() {
            Some(conn) => (conn, true),
            None => (self.searcher(deadline).await?, false),
        };
        loop {
            // Two entries are enough to know the name is ambiguous (RFC 4511 §4.5.1.4);
            // the time limit lets the server give up when postern does.
            let options = SearchOptions::new().sizelimit(2).timelimit(
                i32::try_from(self.settings.timeout.as_secs().max(1)).unwrap_or(i32::MAX),
            );
            let attributes: Vec<&str> = if self.account_attributes.is_empty() {
                vec![NO_ATTRIBUTES]
            } else {
                self.account_attributes.iter().map(String::as_str).collect()
            };
            let search =
                conn.with_search_options(options)
                    .search(base, Scope::Subtree, filter, attributes);
            match timeout_at(deadline, search).await {
                Err(_) => return Err(self.timed_out(Stage::Search)),
                Ok(Err(e)) if reused => {
                    debug!(error = %e, "LDAP: idle service connection failed, reconnecting");
                    conn = self.searcher(deadline).await?;
                    reused = false;
                }
                Ok(Err(e)) => return Err(Down::new(Stage::Search, e.to_string())),
                Ok(Ok(SearchResult(entries, result))) => {
                    let found = found(&entries, &result, &self.account_attributes, user)?;
                    self.searchers.put(conn);
                    return Ok(found);
                }
            }
        }
    }

    /// A new connection bound as the service account.
    async fn searcher(&self, deadline: Instant) -> Result<Ldap, Down> {
        let Mode::SearchBind {
            bind_dn,
            bind_password,
            ..
        } = &self.settings.mode
        else {
            return Err(Down::new(Stage::ServiceBind, "no service account"));
        };
        let mut conn = self.connect(deadline).await?;
        self.service_bind(&mut conn, bind_dn, bind_password, deadline)
            .await?;
        Ok(conn)
    }

    /// Binds `conn` as the service account. Any refusal is the directory's or the
    /// configuration's fault, never the client's: [`Down`].
    async fn service_bind(
        &self,
        conn: &mut Ldap,
        bind_dn: &str,
        bind_password: &str,
        deadline: Instant,
    ) -> Result<(), Down> {
        match timeout_at(deadline, conn.simple_bind(bind_dn, bind_password)).await {
            Err(_) => Err(self.timed_out(Stage::ServiceBind)),
            Ok(Err(e)) => Err(Down::new(Stage::ServiceBind, e.to_string())),
            Ok(Ok(result)) if result.rc == 0 => Ok(()),
            Ok(Ok(result)) => Err(Down::new(
                Stage::ServiceBind,
                format!("as {bind_dn}: {}", describe(&result)),
            )),
        }
    }

    /// A new connection: TCP, then StartTLS or TLS as configured.
    async fn connect(&self, deadline: Instant) -> Result<Ldap, Down> {
        let mut settings = LdapConnSettings::new().set_starttls(self.settings.starttls);
        if let Some(config) = &self.tls {
            settings = settings.set_config(config.clone());
        }
        let url = &self.settings.url;
        match timeout_at(deadline, LdapConnAsync::with_settings(settings, url)).await {
            Err(_) => Err(self.timed_out(Stage::Connect)),
            Ok(Err(e)) => Err(Down::new(Stage::Connect, format!("{url}: {e}"))),
            Ok(Ok((driver, conn))) => {
                // ldap3 reads and writes the socket in a task of its own; it ends when
                // the last handle to the connection is dropped or the server closes it.
                tokio::spawn(async move {
                    if let Err(e) = driver.drive().await {
                        debug!(error = %e, "LDAP connection ended");
                    }
                });
                Ok(conn)
            }
        }
    }

    fn timed_out(&self, stage: Stage) -> Down {
        Down::new(
            stage,
            format!(
                "no answer from {} within {:?}",
                self.settings.url, self.settings.timeout
            ),
        )
    }
}

/// The TLS client config: the `--ldap-ca` certificates, or the system's, on the
/// build's one crypto provider.
fn client_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>, SettingsError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            let error = |why: String| {
                SettingsError::new("--ldap-ca", format!("reading {}: {why}", path.display()))
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| error(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| error(e.to_string()))?;
            if certs.is_empty() {
                return Err(error("no CERTIFICATE in it".to_owned()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| error(e.to_string()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(SettingsError::new(
                    "--ldap-ca",
                    "no system CA certificates found; give the directory's CA with --ldap-ca",
                ));
            }
        }
    }
    let config = ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| SettingsError::new("--ldap-ca", e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The DN a failed search binds to.
fn decoy_dn(base: &str) -> String {
    format!("{DECOY_RDN},{base}")
}

/// What a user bind's result means.
fn bind_verdict(result: &LdapResult) -> Verdict {
    match result.rc {
        0 => Verdict::Valid,
        // RFC 4511 §4.1.9 invalidCredentials: a wrong password, or an account the
        // server will not let in, which it may say in a control or in the text.
        49 => Verdict::Invalid(account_state(result).unwrap_or(Refusal::WrongPassword)),
        32 | 34 | 48 | 50 | 53 => Verdict::Invalid(Refusal::Refused(result.rc)),
        // busy (51), unavailable (52), and anything else: the directory's problem, not
        // a verdict on the password.
        _ => Verdict::Down(Down::new(Stage::Bind, describe(result))),
    }
}

/// A refusal more precise than "wrong password", from the password policy response
/// control or Active Directory's diagnostic text (`... AcceptSecurityContext error,
/// data 775, v4563`).
fn account_state(result: &LdapResult) -> Option<Refusal> {
    let policy = result
        .ctrls
        .iter()
        .filter(|control| control.1.ctype == ppolicy::OID)
        .find_map(|control| control.1.val.as_deref().and_then(ppolicy::error));
    match policy {
        Some(ppolicy::PolicyError::AccountLocked) => return Some(Refusal::Locked),
        Some(ppolicy::PolicyError::PasswordExpired) => return Some(Refusal::Expired),
        Some(ppolicy::PolicyError::Other(_)) | None => {}
    }
    let data = result
        .text
        .split(", ")
        .find_map(|part| part.strip_prefix("data "))?;
    match data {
        "775" => Some(Refusal::Locked),
        "532" | "701" => Some(Refusal::Expired),
        "533" => Some(Refusal::Disabled),
        _ => None,
    }
}

/// What a search's entries and result say about `user`; the account name is read from
/// `account_attributes`.
fn found(
    entries: &[ResultEntry],
    result: &LdapResult,
    account_attributes: &[String],
    user: &str,
) -> Result<Found, Down> {
    // Continuation references (Active Directory returns them for other partitions)
    // and intermediate responses are not entries (RFC 4511 §4.5.2, §4.5.3).
    let entries: Vec<&ResultEntry> = entries
        .iter()
        .filter(|e| !e.is_ref() && !e.is_intermediate())
        .collect();
    match result.rc {
        0 => {}
        // sizeLimitExceeded (4): more than the two entries asked for.
        4 => return Ok(Found::Many),
        _ => return Err(Down::new(Stage::Search, describe(result))),
    }
    match entries.as_slice() {
        [] => Ok(Found::None),
        [entry] => match entry_dn(entry) {
            Some(dn) => Ok(Found::One {
                dn,
                account: account::from_entry(entry, account_attributes, user),
            }),
            None => Err(Down::new(Stage::Search, "an entry without a usable DN")),
        },
        _ => Ok(Found::Many),
    }
}

/// The DN of a SearchResultEntry (RFC 4511 §4.5.2: `objectName` first), read without
/// ldap3's `SearchEntry::construct`, which panics on a malformed entry.
fn entry_dn(entry: &ResultEntry) -> Option<String> {
    let PL::C(parts) = &entry.0.payload else {
        return None;
    };
    let PL::P(dn) = &parts.first()?.payload else {
        return None;
    };
    String::from_utf8(dn.clone())
        .ok()
        .filter(|dn| !dn.is_empty())
}

/// A result code's name and the server's text, for logs and `postern check`.
fn describe(result: &LdapResult) -> String {
    if result.text.is_empty() {
        result_name(result.rc)
    } else {
        format!("{} ({})", result_name(result.rc), result.text)
    }
}

/// RFC 4511 Appendix A's name for a result code, with the number.
fn result_name(rc: u32) -> String {
    let name = match rc {
        0 => "success",
        1 => "operationsError",
        2 => "protocolError",
        3 => "timeLimitExceeded",
        4 => "sizeLimitExceeded",
        7 => "authMethodNotSupported",
        8 => "strongerAuthRequired",
        10 => "referral",
        11 => "adminLimitExceeded",
        13 => "confidentialityRequired",
        32 => "noSuchObject",
        34 => "invalidDNSyntax",
        48 => "inappropriateAuthentication",
        49 => "invalidCredentials",
        50 => "insufficientAccessRights",
        51 => "busy",
        52 => "unavailable",
        53 => "unwillingToPerform",
        80 => "other",
        _ => return format!("result code {rc}"),
    };
    format!("{name} ({rc})")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldap3::asn1::{StructureTag, TagClass};
    use ldap3::controls::{Control, RawControl};

    fn search_settings() -> Settings {
        Settings {
            url: "ldap://127.0.0.1:389".into(),
            mode: Mode::SearchBind {
                base: "ou=people,dc=example,dc=test".into(),
                filter_template: DEFAULT_SEARCH_FILTER.into(),
                bind_dn: "cn=postern,dc=example,dc=test".into(),
                bind_password: "service-secret".into(),
            },
            starttls: false,
            ca: None,
            timeout: Duration::from_secs(2),
            pool_size: 2,
        }
    }

    fn flags(url: &str) -> Flags {
        Flags {
            url: url.into(),
            user_dn: None,
            search_base: None,
            search_filter: None,
            bind_dn: None,
            bind_password_file: None,
            starttls: false,
            ca: None,
            timeout: DEFAULT_TIMEOUT,
            pool_size: DEFAULT_POOL_SIZE,
        }
    }

    #[test]
    fn flags_pick_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let password_file = dir.path().join("bind.pw");
        std::fs::write(&password_file, "s3cret\r\n").unwrap();

        let mut direct = flags("ldaps://ldap.example.com");
        direct.user_dn = Some("uid=%u,ou=people,dc=example,dc=com".into());
        assert_eq!(
            Settings::from_flags(&direct).unwrap().mode,
            Mode::DirectBind {
                user_dn_template: "uid=%u,ou=people,dc=example,dc=com".into()
            }
        );

        let mut search = flags("ldap://dc1.corp.example:389");
        search.starttls = true;
        search.search_base = Some("dc=corp,dc=example".into());
        search.bind_dn = Some("cn=postern,cn=Users,dc=corp,dc=example".into());
        search.bind_password_file = Some(password_file.clone());
        let settings = Settings::from_flags(&search).unwrap();
        assert_eq!(
            settings.mode,
            Mode::SearchBind {
                base: "dc=corp,dc=example".into(),
                filter_template: "(uid=%u)".into(),
                bind_dn: "cn=postern,cn=Users,dc=corp,dc=example".into(),
                bind_password: "s3cret".into(),
            }
        );
        // The service account's password stays out of logs.
        let shown = format!("{settings:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("<redacted>"),
            "{shown}"
        );

        search.search_filter = Some("(sAMAccountName=%u)".into());
        assert!(matches!(
            Settings::from_flags(&search).unwrap().mode,
            Mode::SearchBind { filter_template, .. } if filter_template == "(sAMAccountName=%u)"
        ));
    }

    #[test]
    fn flag_mistakes_name_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let password_file = dir.path().join("bind.pw");
        std::fs::write(&password_file, "s3cret\n").unwrap();
        let empty_file = dir.path().join("empty.pw");
        std::fs::write(&empty_file, "\n").unwrap();
        let missing_file = dir.path().join("missing.pw");

        let direct = |url: &str| {
            let mut f = flags(url);
            f.user_dn = Some("uid=%u,dc=example,dc=com".into());
            f
        };
        let search = || {
            let mut f = flags("ldap://127.0.0.1");
            f.search_base = Some("dc=example,dc=com".into());
            f.bind_dn = Some("cn=postern,dc=example,dc=com".into());
            f.bind_password_file = Some(password_file.clone());
            f
        };
        let cases: Vec<(Flags, &str, &str)> = vec![
            (flags("ldap://h"), "--ldap-url", "needs --ldap-user-dn"),
            (
                Flags {
                    search_base: Some("dc=x".into()),
                    ..direct("ldap://h")
                },
                "--ldap-user-dn",
                "exclude each other",
            ),
            (
                Flags {
                    bind_dn: Some("cn=x".into()),
                    ..direct("ldap://h")
                },
                "--ldap-bind-dn",
                "only used with --ldap-search-base",
            ),
            (
                Flags {
                    search_filter: Some("(uid=%u)".into()),
                    ..direct("ldap://h")
                },
                "--ldap-search-filter",
                "only used with",
            ),
            (
                Flags {
                    bind_dn: None,
                    ..search()
                },
                "--ldap-bind-dn",
                "needs a service account",
            ),
            (
                Flags {
                    bind_password_file: None,
                    ..search()
                },
                "--ldap-bind-password-file",
                "needs a service account",
            ),
            (
                Flags {
                    bind_password_file: Some(empty_file.clone()),
                    ..search()
                },
                "--ldap-bind-password-file",
                "unauthenticated bind",
            ),
            (
                Flags {
                    bind_password_file: Some(missing_file.clone()),
                    ..search()
                },
                "--ldap-bind-password-file",
                "missing.pw",
            ),
            (
                Flags {
                    search_filter: Some("(uid=alice)".into()),
                    ..search()
                },
                "--ldap-search-filter",
                "has no %u",
            ),
            (
                Flags {
                    search_filter: Some("uid=%u".into()),
                    ..search()
                },
                "--ldap-search-filter",
                "not an LDAP filter",
            ),
            (
                Flags {
                    search_filter: Some("(&(uid=%u)".into()),
                    ..search()
                },
                "--ldap-search-filter",
                "not an LDAP filter",
            ),
            (
                Flags {
                    search_base: Some(" ".into()),
                    ..search()
                },
                "--ldap-search-base",
                "empty",
            ),
            (
                Flags {
                    user_dn: Some("cn=admin,dc=example,dc=com".into()),
                    ..flags("ldap://h")
                },
                "--ldap-user-dn",
                "same DN",
            ),
            (direct("http://h"), "--ldap-url", "another scheme"),
            (direct("ldap.example.com"), "--ldap-url", "not a URL"),
            (direct("ldap:foo"), "--ldap-url", "no host"),
            (direct("ldap://"), "--ldap-url", "no host"),
            (direct("ldap:///"), "--ldap-url", "no host"),
            (direct("ldap://u:p@h"), "--ldap-url", "credentials"),
            (
                direct("ldap://h/dc=example,dc=com"),
                "--ldap-url",
                "has a DN",
            ),
            (direct("ldap://h/??sub?(uid=x)"), "--ldap-url", "has a DN"),
            (
                Flags {
                    starttls: true,
                    ..direct("ldaps://h")
                },
                "--ldap-starttls",
                "ldap:// URLs",
            ),
            (
                Flags {
                    ca: Some("ca.pem".into()),
                    ..direct("ldap://h")
                },
                "--ldap-ca",
                "without TLS",
            ),
            (
                Flags {
                    timeout: Duration::ZERO,
                    ..direct("ldap://h")
                },
                "--ldap-timeout",
                "more than 0",
            ),
            (
                Flags {
                    pool_size: 0,
                    ..direct("ldap://h")
                },
                "--ldap-pool-size",
                "1 to 64",
            ),
            (
                Flags {
                    pool_size: MAX_POOL_SIZE + 1,
                    ..direct("ldap://h")
                },
                "--ldap-pool-size",
                "1 to 64",
            ),
        ];
        for (given, flag, says) in cases {
            let error = Settings::from_flags(&given).expect_err(&format!("{given:?}"));
            assert_eq!(error.flag, flag, "{given:?}: {error}");
            assert!(error.message.contains(says), "{given:?}: {error}");
            assert!(error.to_string().starts_with(flag));
        }
        for good in [
            "ldap://h",
            "ldap://h/",
            "ldaps://ldap.example.com:636",
            "ldap://[::1]:3389",
            "LDAP://h",
        ] {
            assert!(Settings::from_flags(&direct(good)).is_ok(), "{good}");
        }
    }

    #[test]
    fn clear_text_to_another_host_is_warned_about() {
        for (url, starttls, warned) in [
            ("ldap://ldap.example.com", false, true),
            ("ldap://ldap.example.com", true, false),
            ("ldaps://ldap.example.com", false, false),
            ("ldap://127.0.0.1:389", false, false),
            ("ldap://localhost", false, false),
            ("ldap://[::1]", false, false),
        ] {
            let settings = Settings {
                url: url.into(),
                starttls,
                ..search_settings()
            };
            assert_eq!(!settings.warnings().is_empty(), warned, "{url} {starttls}");
        }
    }

    #[test]
    fn ca_files_are_read_or_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let tls = |ca: Option<PathBuf>| Settings {
            url: "ldaps://127.0.0.1".into(),
            ca,
            ..search_settings()
        };
        let missing = Source::new(tls(Some(dir.path().join("nope.pem")))).unwrap_err();
        assert_eq!(missing.flag, "--ldap-ca");
        assert!(missing.message.contains("nope.pem"), "{missing}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = Source::new(tls(Some(empty))).unwrap_err();
        assert!(error.message.contains("no CERTIFICATE"), "{error}");

        let good = dir.path().join("ca.pem");
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        std::fs::write(&good, ca.cert.pem()).unwrap();
        assert!(Source::new(tls(Some(good))).is_ok());
    }

    fn result(rc: u32, text: &str, policy: Option<&[u8]>) -> LdapResult {
        LdapResult {
            rc,
            matched: String::new(),
            text: text.into(),
            refs: vec![],
            ctrls: policy
                .map(|value| {
                    vec![Control(
                        None,
                        RawControl {
                            ctype: ppolicy::OID.into(),
                            crit: false,
                            val: Some(value.to_vec()),
                        },
                    )]
                })
                .into_iter()
                .flatten()
                .collect(),
        }
    }

    #[test]
    fn bind_results_map_to_verdicts() {
        let locked: &[u8] = &[0x30, 0x03, 0x81, 0x01, 0x01];
        let expired: &[u8] = &[0x30, 0x03, 0x81, 0x01, 0x00];
        let ad = |data: &str| {
            format!(
                "80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data {data}, v4563"
            )
        };
        for (result, expected) in [
            (result(0, "", None), Verdict::Valid),
            (
                result(49, "", None),
                Verdict::Invalid(Refusal::WrongPassword),
            ),
            (
                result(49, "", Some(locked)),
                Verdict::Invalid(Refusal::Locked),
            ),
            (
                result(49, "", Some(expired)),
                Verdict::Invalid(Refusal::Expired),
            ),
            (
                result(49, "", Some(&[0xff])),
                Verdict::Invalid(Refusal::WrongPassword),
            ),
            (
                result(49, &ad("52e"), None),
                Verdict::Invalid(Refusal::WrongPassword),
            ),
            (
                result(49, &ad("775"), None),
                Verdict::Invalid(Refusal::Locked),
            ),
            (
                result(49, &ad("533"), None),
                Verdict::Invalid(Refusal::Disabled),
            ),
            (
                result(49, &ad("532"), None),
                Verdict::Invalid(Refusal::Expired),
            ),
            (result(32, "", None), Verdict::Invalid(Refusal::Refused(32))),
            (result(34, "", None), Verdict::Invalid(Refusal::Refused(34))),
            (result(48, "", None), Verdict::Invalid(Refusal::Refused(48))),
            (result(53, "", None), Verdict::Invalid(Refusal::Refused(53))),
        ] {
            assert_eq!(bind_verdict(&result), expected, "{result:?}");
        }
        for rc in [1, 2, 3, 51, 52, 80, 1000] {
            let verdict = bind_verdict(&result(rc, "try later", None));
            let Verdict::Down(down) = verdict else {
                panic!("rc {rc}: {verdict:?}");
            };
            assert_eq!(down.stage, Stage::Bind);
            assert!(down.detail.contains("try later"), "{down}");
        }
        assert!(
            bind_verdict(&result(51, "", None))
                .eq(&Verdict::Down(Down::new(Stage::Bind, "busy (51)")))
        );
    }

    fn entry(dn: &str) -> ResultEntry {
        ResultEntry::new(StructureTag {
            class: TagClass::Application,
            id: 4,
            payload: PL::C(vec![
                StructureTag {
                    class: TagClass::Universal,
                    id: 4,
                    payload: PL::P(dn.as_bytes().to_vec()),
                },
                StructureTag {
                    class: TagClass::Universal,
                    id: 16,
                    payload: PL::C(vec![]),
                },
            ]),
        })
    }

    fn reference() -> ResultEntry {
        ResultEntry::new(StructureTag {
            class: TagClass::Application,
            id: 19,
            payload: PL::C(vec![StructureTag {
                class: TagClass::Universal,
                id: 4,
                payload: PL::P(b"ldap://dc2.corp.example/DC=DomainDnsZones".to_vec()),
            }]),
        })
    }

    #[test]
    fn searches_must_find_exactly_one_entry() {
        let alice = "uid=alice,ou=people,dc=example,dc=test";
        let ok = result(0, "", None);
        let one = || {
            Ok(Found::One {
                dn: alice.into(),
                account: None,
            })
        };
        for (entries, rc, expected) in [
            (vec![entry(alice)], 0, one()),
            (vec![], 0, Ok(Found::None)),
            (vec![entry(alice), entry("uid=bob")], 0, Ok(Found::Many)),
            (vec![entry(alice), entry("uid=bob")], 4, Ok(Found::Many)),
            (vec![entry(alice)], 4, Ok(Found::Many)),
            // Active Directory's continuation references are not entries.
            (vec![reference(), entry(alice), reference()], 0, one()),
            (vec![reference()], 0, Ok(Found::None)),
            (vec![entry("")], 0, Err(Stage::Search)),
            (vec![], 32, Err(Stage::Search)),
            (vec![], 50, Err(Stage::Search)),
            (vec![], 10, Err(Stage::Search)),
            (vec![], 51, Err(Stage::Search)),
        ] {
            let got = found(
                &entries,
                &LdapResult { rc, ..ok.clone() },
                &["uid".into()],
                "alice",
            );
            assert_eq!(got.map_err(|d| d.stage), expected, "rc {rc}");
        }
    }

    #[test]
    fn decoy_binds_go_below_the_search_base() {
        assert_eq!(
            decoy_dn("ou=people,dc=example,dc=test"),
            "cn=postern-no-such-user,ou=people,dc=example,dc=test"
        );
    }

    /// A listener nobody answers on: connections complete (the kernel's backlog) and
    /// then hang, as with a stopped server.
    fn silent_listener() -> (std::net::TcpListener, String) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("ldap://{}", listener.local_addr().unwrap());
        (listener, url)
    }

    #[tokio::test]
    async fn unusable_credentials_are_refused_without_any_io() {
        let (listener, url) = silent_listener();
        for mode in [
            search_settings().mode,
            Mode::DirectBind {
                user_dn_template: "uid=%u,dc=example,dc=test".into(),
            },
        ] {
            let source = Source::new(Settings {
                url: url.clone(),
                mode,
                ..search_settings()
            })
            .unwrap();
            let long = "x".repeat(MAX_USER_LEN + 1);
            for (user, password, refusal) in [
                ("alice", &b""[..], Refusal::EmptyPassword),
                ("", b"", Refusal::EmptyPassword),
                ("alice", b"\xff\xfe", Refusal::PasswordNotUtf8),
                ("", b"secret", Refusal::UserName),
                (&long, b"secret", Refusal::UserName),
            ] {
                assert_eq!(
                    source.verify(user, password).await,
                    Verdict::Invalid(refusal)
                );
            }
        }
        // Not one connection was opened.
        assert_eq!(
            listener.accept().map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::WouldBlock)
        );
    }

    #[tokio::test]
    async fn a_silent_server_is_down_within_the_timeout() {
        let (_listener, url) = silent_listener();
        let timeout = Duration::from_millis(300);
        for mode in [
            search_settings().mode,
            Mode::DirectBind {
                user_dn_template: "uid=%u,dc=example,dc=test".into(),
            },
        ] {
            let source = Source::new(Settings {
                url: url.clone(),
                mode,
                timeout,
                ..search_settings()
            })
            .unwrap();
            let started = std::time::Instant::now();
            let verdict = source.verify("alice", b"secret").await;
            let took = started.elapsed();
            assert!(
                matches!(&verdict, Verdict::Down(down) if down.detail.contains("no answer")),
                "{verdict:?}"
            );
            assert!(took >= timeout && took < timeout * 3, "{took:?}");
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_down_at_once() {
        let (listener, url) = silent_listener();
        drop(listener);
        let source = Source::new(Settings {
            url,
            ..search_settings()
        })
        .unwrap();
        let started = std::time::Instant::now();
        let verdict = source.verify("alice", b"secret").await;
        assert!(
            matches!(
                &verdict,
                Verdict::Down(Down {
                    stage: Stage::Connect,
                    ..
                })
            ),
            "{verdict:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        let checked = source.check().await.unwrap_err();
        assert_eq!(checked.stage, Stage::Connect);
    }

    #[tokio::test]
    async fn waiting_for_a_busy_pool_counts_against_the_timeout() {
        let (listener, url) = silent_listener();
        let timeout = Duration::from_millis(300);
        let source = Source::new(Settings {
            url,
            timeout,
            pool_size: 1,
            ..search_settings()
        })
        .unwrap();
        // Another verification holds the only slot throughout.
        let held = source.slots.acquire().await.unwrap();
        let started = std::time::Instant::now();
        let verdict = source.verify("bob", b"secret").await;
        assert!(
            matches!(
                &verdict,
                Verdict::Down(Down {
                    stage: Stage::Busy,
                    ..
                })
            ),
            "{verdict:?}"
        );
        assert!(started.elapsed() >= timeout);
        assert!(listener.accept().is_err(), "no connection while waiting");
        drop(held);
    }
}
