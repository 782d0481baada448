//! The credential store: a Dovecot-style passwd-file, parsed once at startup.
//!
//! Each line is `user:{SCHEME}data`, optionally followed by `:`-separated fields that real
//! Dovecot files carry (`uid:gid:home:...`) and postern ignores. `#` comments and blank
//! lines are skipped. Every hash is checked when the file is loaded, so a typo is a startup
//! error with a line number rather than a user who silently can never log in. Errors never
//! echo a password field.
//!
//! Schemes (names are case-insensitive, as in Dovecot):
//! - `{PLAIN}` (aliases `{CLEAR}`, `{CLEARTEXT}`): the only scheme CRAM-MD5 can use, since
//!   RFC 2195 needs the cleartext secret.
//! - `{SHA512-CRYPT}`: crypt(3) `$6$[rounds=N$]salt$hash`.
//! - `{BLF-CRYPT}`: bcrypt `$2y$`, `$2b$` or `$2a$`.
//! - `{ARGON2ID}`: a PHC string `$argon2id$v=19$m=..,t=..,p=..$salt$hash`.
//!
//! Verifying a hashed password is deliberately slow (argon2id at Dovecot's parameters takes
//! about 100 ms and 64 MiB), so callers run [`UserDb::verify_password`] on a blocking thread.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr as _;

use argon2::{Argon2, PasswordHasher as _, PasswordVerifier as _};
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha_crypt::ShaCrypt;
use subtle::ConstantTimeEq as _;

/// Dovecot's argon2id defaults for new hashes: 64 MiB, 3 passes, 1 lane.
const ARGON2_MEMORY_KIB: u32 = 65_536;
const ARGON2_PASSES: u32 = 3;
const ARGON2_LANES: u32 = 1;
/// bcrypt cost for new hashes (2^12 rounds), the bcrypt crate's and PHP's current default.
const BCRYPT_COST: u32 = 12;
/// The cost range bcrypt implementations accept.
const BCRYPT_COSTS: std::ops::RangeInclusive<u32> = 4..=31;
/// bcrypt keys on at most 72 password bytes and silently ignores the rest.
const BCRYPT_MAX_PASSWORD: usize = 72;
/// crypt(3) reads at most 16 salt characters; the sha-crypt crate would read more, so a
/// longer salt would verify differently here than in Dovecot.
const SHA512_CRYPT_MAX_SALT: usize = 16;
/// Random bytes behind a new sha512-crypt salt: 12 bytes are exactly 16 crypt-base64 chars.
const SHA512_CRYPT_SALT_BYTES: usize = 12;
/// 64 bytes of SHA-512 output in crypt-base64.
const SHA512_CRYPT_HASH_CHARS: usize = 86;
/// crypt-base64 alphabet.
const CRYPT_BASE64: &[u8; 64] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// An unknown scheme name is echoed in errors only if it looks like one (short, no spaces or
/// punctuation), which keeps most mistyped password fields out of logs.
const MAX_ECHOED_SCHEME: usize = 32;
/// HMAC key for CRAM-MD5 attempts that cannot succeed; only its cost matters.
const CRAM_MD5_DUMMY_KEY: &[u8] = b"postern: no cleartext secret";

/// Why a file without users is refused.
const NO_USERS: &str = "no users: the file must name at least one user:{SCHEME}password line";

/// The users postern accepts and their password hashes. Cheap to share in an `Arc`.
pub struct UserDb {
    users: HashMap<String, Secret>,
    /// Verified instead when the user does not exist: a copy of the costliest hash in the
    /// file, so that no failure costs more than an unknown name, and the caller can pad
    /// every failure to its time (see [`Check::decoy_work`]).
    dummy: Option<Secret>,
    /// Every secret is `{PLAIN}`: known at load, since every session asks (EHLO offers
    /// CRAM-MD5 only then).
    all_plain: bool,
}

/// The outcome of a password check, with what the caller needs to make failures take
/// the same time whatever the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    pub valid: bool,
    /// The work done cost what the decoy costs (an unknown user, or a user whose hash has
    /// the decoy's scheme and parameters): its duration is a sample of the decoy's time.
    pub decoy_work: bool,
}

/// Why the users file could not be loaded.
#[derive(Debug)]
pub struct LoadError {
    path: Option<PathBuf>,
    kind: LoadErrorKind,
}

#[derive(Debug)]
enum LoadErrorKind {
    Read(std::io::Error),
    Line { number: usize, problem: Problem },
    NoUsers,
}

/// What is wrong with one line. No variant holds a password field.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Problem {
    NotUtf8,
    MissingColon,
    EmptyUser,
    MissingScheme,
    UnknownScheme(Option<String>),
    EmptyPassword,
    BadHash {
        scheme: &'static str,
        reason: &'static str,
    },
    Duplicate {
        user: String,
        first_line: usize,
    },
}

/// Why [`hash_password`] could not produce a hash.
#[derive(Debug)]
#[non_exhaustive]
pub enum HashError {
    /// No client can log in with an empty password (RFC 4616 `passwd = 1*SAFE`).
    EmptyPassword,
    /// The scheme would silently ignore the bytes past `max` (bcrypt).
    PasswordTooLong {
        /// The scheme's name as in the users file.
        scheme: &'static str,
        /// How many bytes the scheme reads.
        max: usize,
    },
    /// The operating system's random generator failed while making a salt.
    Random(String),
    /// The hash implementation rejected its input.
    Hash {
        /// The scheme's name as in the users file.
        scheme: &'static str,
        /// The implementation's message.
        message: String,
    },
}

/// A parsed password field. The hash strings are validated at load time.
#[derive(Clone)]
enum Secret {
    Plain(String),
    Sha512Crypt(String),
    BlfCrypt(String),
    Argon2id(String),
}

/// Schemes in order of verification cost, which breaks ties when choosing the dummy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Scheme {
    Plain,
    Sha512Crypt,
    BlfCrypt,
    Argon2id,
}

// === impl UserDb ===

impl UserDb {
    /// Parses the text of a users file.
    pub fn parse(text: &str) -> Result<UserDb, LoadError> {
        let mut users = HashMap::new();
        let mut first_lines: HashMap<&str, usize> = HashMap::new();
        // The costliest secret so far and its cost.
        let mut costliest: Option<(u64, Scheme, Secret)> = None;
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line_error = |problem| LoadError {
                path: None,
                kind: LoadErrorKind::Line { number, problem },
            };
            let Some((user, secret)) = parse_line(line).map_err(line_error)? else {
                continue;
            };
            if let Some(&first_line) = first_lines.get(user) {
                return Err(line_error(Problem::Duplicate {
                    user: user.to_owned(),
                    first_line,
                }));
            }
            first_lines.insert(user, number);
            let key = (secret.cost(), secret.scheme());
            if costliest
                .as_ref()
                .is_none_or(|(cost, scheme, _)| key > (*cost, *scheme))
            {
                costliest = Some((key.0, key.1, secret.clone()));
            }
            users.insert(user.to_owned(), secret);
        }
        // A file that names nobody is a mistake (a truncated copy, the wrong path written
        // by a tool): serving it would refuse every login, so it is refused instead, and a
        // reload keeps the users it had.
        if users.is_empty() {
            return Err(LoadError {
                path: None,
                kind: LoadErrorKind::NoUsers,
            });
        }
        let dummy = costliest.map(|(_, _, secret)| secret);
        let all_plain = users
            .values()
            .all(|secret| matches!(secret, Secret::Plain(_)));
        Ok(UserDb {
            users,
            dummy,
            all_plain,
        })
    }

    /// Reads and parses a users file; errors name the path.
    pub fn load(path: &Path) -> Result<UserDb, LoadError> {
        let with_path = |kind| LoadError {
            path: Some(path.to_owned()),
            kind,
        };
        let bytes = std::fs::read(path).map_err(|error| with_path(LoadErrorKind::Read(error)))?;
        let text = String::from_utf8(bytes).map_err(|error| {
            let valid = &error.as_bytes()[..error.utf8_error().valid_up_to()];
            let number = valid.iter().filter(|&&byte| byte == b'\n').count() + 1;
            with_path(LoadErrorKind::Line {
                number,
                problem: Problem::NotUtf8,
            })
        })?;
        UserDb::parse(&text).map_err(|error| with_path(error.kind))
    }

    /// How many users the file defines.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file defines no users at all.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Checks a PLAIN or LOGIN password. The user name must match exactly (case-sensitive,
    /// like Dovecot's default).
    ///
    /// Blocking (argon2 ~100 ms): the caller runs it in `spawn_blocking`.
    pub fn verify_password(&self, username: &str, password: &[u8]) -> bool {
        self.check_password(username, password).valid
    }

    /// [`Self::verify_password`], also saying whether the work done was the decoy's.
    pub fn check_password(&self, username: &str, password: &[u8]) -> Check {
        let decoy_cost = self.dummy.as_ref().map(Secret::cost);
        match self.users.get(username) {
            Some(secret) => Check {
                valid: secret.verify(password),
                decoy_work: decoy_cost == Some(secret.cost()),
            },
            None => {
                // The costliest work a wrong password can cause, so response time does not
                // tell which user names exist. black_box keeps the result (and so the
                // work) from being elided.
                if let Some(dummy) = &self.dummy {
                    std::hint::black_box(dummy.verify(password));
                }
                Check {
                    valid: false,
                    decoy_work: true,
                }
            }
        }
    }

    /// How long one verification of the decoy takes now: a first sample for the caller's
    /// failure pacing, before any client has failed. Blocking, like a verification.
    pub fn time_decoy(&self) -> std::time::Duration {
        let started = std::time::Instant::now();
        if let Some(dummy) = &self.dummy {
            std::hint::black_box(dummy.verify(b"postern: decoy timing"));
        }
        started.elapsed()
    }

    /// Whether every user has a `{PLAIN}` secret, so that CRAM-MD5 can work for all.
    /// Whether `username`'s secret is `{PLAIN}`: checking it costs a comparison, not a
    /// KDF (an unknown name costs the decoy's hash, so it is not cheap).
    pub fn is_plain(&self, username: &str) -> bool {
        matches!(self.users.get(username), Some(Secret::Plain(_)))
    }

    pub fn all_plain(&self) -> bool {
        self.all_plain
    }

    /// How many users have a hashed secret (and so cannot use CRAM-MD5).
    pub fn hashed(&self) -> usize {
        self.users
            .values()
            .filter(|secret| !matches!(secret, Secret::Plain(_)))
            .count()
    }

    /// RFC 2195: HMAC-MD5(secret, challenge) as lowercase hex, compared in constant time.
    ///
    /// Only `{PLAIN}` users can pass; for hashed users and unknown users it returns false
    /// after doing comparable work (same as a wrong password).
    pub fn verify_cram_md5(&self, username: &str, challenge: &str, digest_hex: &str) -> bool {
        let (key, can_pass) = match self.users.get(username) {
            Some(Secret::Plain(secret)) => (secret.as_bytes(), true),
            _ => (CRAM_MD5_DUMMY_KEY, false),
        };
        let Some(expected) = cram_md5_digest(key, challenge.as_bytes()) else {
            return false;
        };
        let supplied = digest_hex.to_ascii_lowercase();
        let matches: bool = expected.ct_eq(supplied.as_bytes()).into();
        matches & can_pass
    }
}

// Hand-written so that a `{:?}` of the store can never print a hash.
impl fmt::Debug for UserDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserDb")
            .field("users", &self.users.len())
            .field("dummy", &self.dummy.as_ref().map(Secret::scheme))
            .finish()
    }
}

/// Splits one line into a user and a validated secret; `None` for comments and blank lines.
fn parse_line(line: &str) -> Result<Option<(&str, Secret)>, Problem> {
    let trimmed = line.trim_start();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return Ok(None);
    }
    let (user, rest) = line.split_once(':').ok_or(Problem::MissingColon)?;
    if user.is_empty() {
        return Err(Problem::EmptyUser);
    }
    // The password field ends at the next ':'. None of the supported hash formats can
    // contain one, so this never cuts a hash short.
    let field = rest.split_once(':').map_or(rest, |(field, _)| field);
    Ok(Some((user, Secret::parse(field)?)))
}

// === impl Secret ===

impl Secret {
    /// Parses and validates `{SCHEME}data`.
    fn parse(field: &str) -> Result<Secret, Problem> {
        let (name, data) = field
            .strip_prefix('{')
            .and_then(|rest| rest.split_once('}'))
            .ok_or(Problem::MissingScheme)?;
        let scheme = Scheme::parse(name).ok_or_else(|| {
            let looks_like_a_name = !name.is_empty()
                && name.len() <= MAX_ECHOED_SCHEME
                && name
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || b"-_.".contains(&byte));
            Problem::UnknownScheme(looks_like_a_name.then(|| name.to_owned()))
        })?;
        let bad_hash = |reason| Problem::BadHash {
            scheme: scheme.name(),
            reason,
        };
        match scheme {
            Scheme::Plain if data.is_empty() => Err(Problem::EmptyPassword),
            Scheme::Plain => Ok(Secret::Plain(data.to_owned())),
            Scheme::Sha512Crypt => check_sha512_crypt(data)
                .map(|()| Secret::Sha512Crypt(data.to_owned()))
                .map_err(bad_hash),
            Scheme::BlfCrypt => check_blf_crypt(data)
                .map(|()| Secret::BlfCrypt(data.to_owned()))
                .map_err(bad_hash),
            Scheme::Argon2id => check_argon2id(data)
                .map(|()| Secret::Argon2id(data.to_owned()))
                .map_err(bad_hash),
        }
    }

    fn scheme(&self) -> Scheme {
        match self {
            Secret::Plain(_) => Scheme::Plain,
            Secret::Sha512Crypt(_) => Scheme::Sha512Crypt,
            Secret::BlfCrypt(_) => Scheme::BlfCrypt,
            Secret::Argon2id(_) => Scheme::Argon2id,
        }
    }

    /// Roughly how long a verification takes, in nanoseconds on a current x86-64 core.
    /// Only the order matters: it picks the decoy, the costliest hash in the file. The
    /// caller measures real times for padding, so a model that is off by a factor only
    /// makes the decoy a little cheaper than the costliest hash, which the measured
    /// pacing still covers.
    fn cost(&self) -> u64 {
        /// Per sha512-crypt round, per bcrypt iteration (2^cost), per argon2 KiB-pass.
        const SHA512_ROUND_NS: u64 = 550;
        const BCRYPT_ITERATION_NS: u64 = 60_000;
        const ARGON2_KIB_PASS_NS: u64 = 500;
        /// crypt(3)'s rounds when the hash names none.
        const SHA512_DEFAULT_ROUNDS: u64 = 5_000;
        match self {
            Secret::Plain(_) => 0,
            Secret::Sha512Crypt(hash) => {
                let rounds = hash
                    .strip_prefix("$6$rounds=")
                    .and_then(|rest| rest.split('$').next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(SHA512_DEFAULT_ROUNDS);
                rounds.saturating_mul(SHA512_ROUND_NS)
            }
            Secret::BlfCrypt(hash) => {
                let cost = bcrypt::HashParts::from_str(hash)
                    .map(|parts| parts.get_cost())
                    .unwrap_or(BCRYPT_COST);
                (1u64 << cost.min(40)).saturating_mul(BCRYPT_ITERATION_NS)
            }
            Secret::Argon2id(hash) => argon2::PasswordHash::new(hash)
                .ok()
                .and_then(|hash| argon2::Params::try_from(&hash).ok())
                .map_or(0, |params| {
                    u64::from(params.m_cost())
                        .saturating_mul(u64::from(params.t_cost()))
                        .saturating_mul(ARGON2_KIB_PASS_NS)
                }),
        }
    }

    /// Whether `password` matches. Each crate compares its digests in constant time.
    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Secret::Plain(secret) => secret.as_bytes().ct_eq(password).into(),
            Secret::Sha512Crypt(hash) => ShaCrypt::default()
                .verify_password(password, hash.as_str())
                .is_ok(),
            Secret::BlfCrypt(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            Secret::Argon2id(hash) => Argon2::default()
                .verify_password(password, hash.as_str())
                .is_ok(),
        }
    }
}

impl Scheme {
    /// Dovecot scheme names, matched case-insensitively.
    fn parse(name: &str) -> Option<Scheme> {
        const NAMES: [(&str, Scheme); 6] = [
            ("PLAIN", Scheme::Plain),
            ("CLEAR", Scheme::Plain),
            ("CLEARTEXT", Scheme::Plain),
            ("SHA512-CRYPT", Scheme::Sha512Crypt),
            ("BLF-CRYPT", Scheme::BlfCrypt),
            ("ARGON2ID", Scheme::Argon2id),
        ];
        NAMES
            .iter()
            .find(|(candidate, _)| candidate.eq_ignore_ascii_case(name))
            .map(|&(_, scheme)| scheme)
    }

    fn name(self) -> &'static str {
        match self {
            Scheme::Plain => "PLAIN",
            Scheme::Sha512Crypt => "SHA512-CRYPT",
            Scheme::BlfCrypt => "BLF-CRYPT",
            Scheme::Argon2id => "ARGON2ID",
        }
    }
}

/// `$6$[rounds=N$]salt$hash`, checked to the same rules the sha-crypt crate verifies by,
/// plus crypt(3)'s 16-character salt limit.
fn check_sha512_crypt(data: &str) -> Result<(), &'static str> {
    const SHAPE: &str = "expected $6$[rounds=N$]salt$hash";
    // The crate's own MCF parser: non-empty fields in its character set.
    sha_crypt::PasswordHashRef::new(data).map_err(|_| SHAPE)?;
    let rest = data.strip_prefix("$6$").ok_or(SHAPE)?;
    let mut fields: Vec<&str> = rest.split('$').collect();
    if let Some(rounds) = fields.first()
        && rounds.starts_with("rounds=")
    {
        sha_crypt::Params::from_str(rounds).map_err(|_| "rounds must be 1000 to 999999999")?;
        fields.remove(0);
    }
    let [salt, hash] = fields[..] else {
        return Err(SHAPE);
    };
    if salt.len() > SHA512_CRYPT_MAX_SALT {
        return Err("salt longer than 16 characters");
    }
    let hash = hash.as_bytes();
    // 64 bytes are 85 full sextets plus 2 bits; the last character carries only those 2
    // bits, so a canonical encoding ends in one of the first 4 alphabet characters.
    let canonical_end = hash
        .last()
        .is_some_and(|last| CRYPT_BASE64[..4].contains(last));
    if hash.len() != SHA512_CRYPT_HASH_CHARS
        || !hash.iter().all(|byte| CRYPT_BASE64.contains(byte))
        || !canonical_end
    {
        return Err("hash part is not 86 crypt-base64 characters");
    }
    Ok(())
}

/// `$2y$`, `$2b$` or `$2a$` bcrypt, parsed by the bcrypt crate itself. `$2x$` marks hashes
/// made with the pre-2011 crypt_blowfish sign-extension bug, which the crate does not
/// reproduce, so such a hash is refused here rather than failing every login later.
fn check_blf_crypt(data: &str) -> Result<(), &'static str> {
    if !["$2y$", "$2b$", "$2a$"]
        .iter()
        .any(|prefix| data.starts_with(prefix))
    {
        return Err("expected a $2y$, $2b$ or $2a$ hash");
    }
    let parts =
        bcrypt::HashParts::from_str(data).map_err(|_| "expected $2y$NN$ + 53 characters")?;
    if !BCRYPT_COSTS.contains(&parts.get_cost()) {
        return Err("cost must be 04 to 31");
    }
    Ok(())
}

/// A PHC `$argon2id$` string with parameters the argon2 crate accepts.
fn check_argon2id(data: &str) -> Result<(), &'static str> {
    let hash = argon2::PasswordHash::new(data).map_err(|_| "not a PHC string")?;
    if hash.algorithm != argon2::ARGON2ID_IDENT {
        return Err("expected $argon2id$");
    }
    if let Some(version) = hash.version {
        argon2::Version::try_from(version).map_err(|_| "version must be 16 or 19")?;
    }
    argon2::Params::try_from(&hash).map_err(|_| "bad m, t or p parameter")?;
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err("missing salt or hash");
    }
    Ok(())
}

/// RFC 2195 §2: `HMAC-MD5(secret, challenge)` as lowercase hex, the digest a CRAM-MD5
/// client sends and [`UserDb::verify_cram_md5`] recomputes; `sasl::client` computes a
/// client's with it. `None` only if the MAC refused the key, which HMAC never does.
pub fn cram_md5_digest(key: &[u8], message: &[u8]) -> Option<[u8; 32]> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut mac = Hmac::<md5::Md5>::new_from_slice(key).ok()?;
    mac.update(message);
    let digest = mac.finalize().into_bytes();
    let mut hex = [0u8; 32];
    for (pair, byte) in hex.chunks_exact_mut(2).zip(digest.iter()) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0x0f)];
    }
    Some(hex)
}

// === hash_password ===

/// Schemes `hash-password` can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HashScheme {
    Argon2id,
    #[value(name = "sha512-crypt")]
    Sha512Crypt,
    Bcrypt,
}

/// Hashes `password` for a users file and returns the whole password field, e.g.
/// `{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$...`, which Dovecot reads as well.
///
/// Parameters: argon2id with `doveadm pw`'s defaults (m=65536, t=3, p=1); sha512-crypt with
/// crypt(3)'s 5000 rounds, written out; bcrypt `$2y$` at cost 12 (doveadm uses 5). The
/// salt comes from the operating system's RNG.
pub fn hash_password(scheme: HashScheme, password: &str) -> Result<String, HashError> {
    if password.is_empty() {
        return Err(HashError::EmptyPassword);
    }
    let password = password.as_bytes();
    match scheme {
        HashScheme::Argon2id => {
            let failed = |error: argon2::password_hash::Error| HashError::Hash {
                scheme: Scheme::Argon2id.name(),
                message: error.to_string(),
            };
            let params = argon2::Params::new(ARGON2_MEMORY_KIB, ARGON2_PASSES, ARGON2_LANES, None)
                .map_err(|error| failed(error.into()))?;
            let hash = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                .hash_password(password)
                .map_err(failed)?;
            Ok(format!("{{ARGON2ID}}{hash}"))
        }
        HashScheme::Sha512Crypt => {
            let salt = argon2::password_hash::try_generate_salt()
                .map_err(|error| HashError::Random(error.to_string()))?;
            // crypt(3) reads 16 salt characters at most; a longer salt would not verify in
            // Dovecot (see SHA512_CRYPT_MAX_SALT).
            let salt = salt.get(..SHA512_CRYPT_SALT_BYTES).unwrap_or(&salt[..]);
            let hash = ShaCrypt::SHA512
                .hash_password_with_salt(password, salt)
                .map_err(|error| HashError::Hash {
                    scheme: Scheme::Sha512Crypt.name(),
                    message: error.to_string(),
                })?;
            Ok(format!("{{SHA512-CRYPT}}{hash}"))
        }
        HashScheme::Bcrypt => {
            if password.len() > BCRYPT_MAX_PASSWORD {
                return Err(HashError::PasswordTooLong {
                    scheme: Scheme::BlfCrypt.name(),
                    max: BCRYPT_MAX_PASSWORD,
                });
            }
            let parts = bcrypt::hash_with_result(password, BCRYPT_COST).map_err(|error| {
                HashError::Hash {
                    scheme: Scheme::BlfCrypt.name(),
                    message: error.to_string(),
                }
            })?;
            // $2y$ is what doveadm writes; every bcrypt verifier accepts it.
            let hash = parts.format_for_version(bcrypt::Version::TwoY);
            Ok(format!("{{BLF-CRYPT}}{hash}"))
        }
    }
}

// === errors ===

impl LoadError {
    /// The 1-based line the problem is on, if it is about one line.
    pub fn line(&self) -> Option<usize> {
        match self.kind {
            LoadErrorKind::Line { number, .. } => Some(number),
            LoadErrorKind::Read(_) | LoadErrorKind::NoUsers => None,
        }
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.kind, &self.path) {
            (LoadErrorKind::Read(error), Some(path)) => {
                write!(f, "reading {}: {error}", path.display())
            }
            (LoadErrorKind::Read(error), None) => write!(f, "reading users: {error}"),
            (LoadErrorKind::Line { number, problem }, Some(path)) => {
                write!(f, "{}: line {number}: {problem}", path.display())
            }
            (LoadErrorKind::Line { number, problem }, None) => {
                write!(f, "line {number}: {problem}")
            }
            (LoadErrorKind::NoUsers, Some(path)) => write!(f, "{}: {NO_USERS}", path.display()),
            (LoadErrorKind::NoUsers, None) => f.write_str(NO_USERS),
        }
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            LoadErrorKind::Read(error) => Some(error),
            LoadErrorKind::Line { .. } | LoadErrorKind::NoUsers => None,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NotUtf8 => f.write_str("not valid UTF-8"),
            Problem::MissingColon => f.write_str("expected user:{SCHEME}password"),
            Problem::EmptyUser => f.write_str("empty user name"),
            Problem::MissingScheme => f.write_str("password has no {SCHEME} prefix"),
            Problem::UnknownScheme(Some(name)) => write!(f, "unknown scheme {{{name}}}"),
            Problem::UnknownScheme(None) => f.write_str("unknown scheme"),
            Problem::EmptyPassword => f.write_str("empty password"),
            Problem::BadHash { scheme, reason } => write!(f, "bad {{{scheme}}} hash: {reason}"),
            Problem::Duplicate { user, first_line } => {
                write!(f, "duplicate user {user} (first on line {first_line})")
            }
        }
    }
}

impl fmt::Display for HashError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashError::EmptyPassword => f.write_str("empty password"),
            HashError::PasswordTooLong { scheme, max } => {
                write!(
                    f,
                    "{{{scheme}}} uses only the first {max} bytes of a password"
                )
            }
            HashError::Random(message) => write!(f, "generating a salt: {message}"),
            HashError::Hash { scheme, message } => {
                write!(f, "hashing with {{{scheme}}}: {message}")
            }
        }
    }
}

impl std::error::Error for HashError {}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../tests/fixtures/users.passwd");

    fn fixture() -> UserDb {
        match UserDb::parse(FIXTURE) {
            Ok(db) => db,
            Err(error) => panic!("fixture: {error}"),
        }
    }

    fn parse_error(text: &str) -> String {
        match UserDb::parse(text) {
            Ok(db) => panic!("expected an error for {text:?}, got {db:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn fixture_users_verify_with_their_password_only() {
        let db = fixture();
        for (user, password) in [
            ("dove-plain", "secret"),
            ("dove-sha512", "secret"),
            ("dove-blf", "secret"),
            ("dove-argon2", "secret"),
            ("openssl-sha512", "secret"),
            ("openssl-rounds", "secret"),
            ("mkpasswd-blf-2b", "secret"),
            ("mkpasswd-blf-2a", "secret"),
            ("htpasswd-blf", "secret"),
            ("php-blf", "rasmuslerdorf"),
            ("cli-argon2", "secret"),
            ("tim", "tanstaaftanstaaf"),
            ("clear", "secret"),
            ("cleartext", "secret"),
        ] {
            assert!(db.verify_password(user, password.as_bytes()), "{user}");
            assert!(
                !db.verify_password(user, b"Secret"),
                "{user} wrong password"
            );
        }
        assert_eq!(db.len(), 14);
        assert!(!db.is_empty());
    }

    #[test]
    fn unknown_users_fail() {
        let db = fixture();
        for user in ["nobody", "DOVE-PLAIN", "dove-plain ", ""] {
            assert!(!db.verify_password(user, b"secret"), "{user:?}");
            assert!(db.check_password(user, b"secret").decoy_work, "{user:?}");
        }
        // The dummy is the costliest hash: dove-argon2's 64 MiB and 3 passes.
        assert_eq!(
            db.dummy.as_ref().map(Secret::scheme),
            Some(Scheme::Argon2id)
        );
        assert!(db.check_password("dove-argon2", b"x").decoy_work);
        // cli-argon2 is argon2id too, but with 4 MiB: not the decoy's cost.
        assert!(!db.check_password("cli-argon2", b"x").decoy_work);
        assert!(!db.check_password("dove-plain", b"x").decoy_work);
    }

    #[test]
    fn dummy_is_the_costliest_hash_whatever_the_scheme() {
        let sha = "$6$rounds=10000$abc$3DDOWZMNRRKDT142bUtYQRY52ycK/xshRXOQgIyt2QRXzLDnoPq6v4lO9bA3f/JhGz1mHrAh.QUDGHmaE5RxP.";
        let sha_default = "$6$lRIUi9jdcFZ6nFOD$hPrIV2Ds4Jf.dNbalhcRaBBCV.9BRXWpP1DDrxJs50x2o.EIkJxrSc0982QPgbx.kKYv7QQIOkPTbs8owfYZl1";
        let blf5 = "$2y$05$9IoBKkFUzKc3D5KkeRvJ6OYtvf/dCmzNy1TY7g9mdvyXnWBRT7TZ.";
        let blf10 = "$2y$10$oRLhhHmqTZZ0Ljm686ddve9SFvzomf7gN78V.m/awgkO/KjlNZ/Ci";
        let argon_small =
            "$argon2id$v=19$m=4096,t=3,p=1$c29tZXNhbHQ$JSTtCfuzyWAVVZF1mjNyip+A7CCi5xkKhBoPdXSPbqs";
        for (text, expected) in [
            ("a:{PLAIN}x".to_owned(), Scheme::Plain),
            // One costly user among many cheap ones is still the decoy.
            (
                format!("a:{{PLAIN}}x\nb:{{PLAIN}}y\nc:{{SHA512-CRYPT}}{sha}"),
                Scheme::Sha512Crypt,
            ),
            // rounds=10000 (~5.5 ms) beats bcrypt cost 5 (~2 ms)...
            (
                format!("c:{{SHA512-CRYPT}}{sha}\nd:{{BLF-CRYPT}}{blf5}"),
                Scheme::Sha512Crypt,
            ),
            // ...but not cost 10 (~60 ms), nor a small argon2 the default rounds.
            (
                format!("c:{{SHA512-CRYPT}}{sha}\nd:{{BLF-CRYPT}}{blf10}"),
                Scheme::BlfCrypt,
            ),
            (
                format!("c:{{SHA512-CRYPT}}{sha_default}\nd:{{ARGON2ID}}{argon_small}"),
                Scheme::Argon2id,
            ),
        ] {
            let db = UserDb::parse(&text).map_err(|error| error.to_string());
            let dummy = db.map(|db| db.dummy.as_ref().map(Secret::scheme));
            assert_eq!(dummy, Ok(Some(expected)), "{text}");
        }
    }

    #[test]
    fn a_file_without_users_is_refused() {
        for text in ["", "\n\n", "# only a comment\n   \n# and another\n"] {
            assert_eq!(parse_error(text), NO_USERS, "{text:?}");
        }
        let dir = tempfile::tempdir().map_err(|error| error.to_string());
        let Ok(dir) = dir else {
            panic!("{dir:?}");
        };
        let file = dir.path().join("users");
        assert!(std::fs::write(&file, "# nobody yet\n").is_ok());
        let message = UserDb::load(&file)
            .map(|db| db.len())
            .map_err(|e| e.to_string());
        assert_eq!(message, Err(format!("{}: {NO_USERS}", file.display())));
    }

    #[test]
    fn cram_md5_needs_every_user_plain() {
        assert!(!fixture().all_plain());
        assert_eq!(fixture().hashed(), 10);
        let db = UserDb::parse("a:{PLAIN}x\nb:{CLEAR}y").map_err(|e| e.to_string());
        assert_eq!(db.map(|db| (db.all_plain(), db.hashed())), Ok((true, 0)));
    }

    #[test]
    fn cram_md5() {
        let db = fixture();
        let challenge = "<1896.697170952@postoffice.reston.mci.net>";
        let digest = "b913a602c7eda7a495b4e6e7334d3890";
        // RFC 2195 §2 example.
        assert!(db.verify_cram_md5("tim", challenge, digest));
        assert!(db.verify_cram_md5("tim", challenge, &digest.to_ascii_uppercase()));
        assert!(!db.verify_cram_md5("tim", challenge, "b913a602c7eda7a495b4e6e7334d3891"));
        assert!(!db.verify_cram_md5("tim", "<other@host>", digest));
        assert!(!db.verify_cram_md5("tim", challenge, ""));
        // Hashed users can never pass, even with the right digest for their password.
        let secret_digest = cram_md5_digest(b"secret", challenge.as_bytes());
        let secret_digest = secret_digest
            .as_ref()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .unwrap_or_default();
        assert!(db.verify_cram_md5("dove-plain", challenge, secret_digest));
        assert!(db.verify_cram_md5("clear", challenge, secret_digest));
        for user in ["dove-sha512", "dove-blf", "dove-argon2", "nobody"] {
            assert!(
                !db.verify_cram_md5(user, challenge, secret_digest),
                "{user}"
            );
        }
    }

    #[test]
    fn comments_blank_lines_and_extra_fields() {
        let text = "# comment\n\n   \n  # indented comment\r\n\
                    a:{PLAIN}one:1000:1000::/home/a:/bin/false\r\n\
                    b:{plain}two\n\
                    c:{Clear}three::\n";
        let db = UserDb::parse(text).map_err(|error| error.to_string());
        let Ok(db) = db else {
            panic!("{db:?}");
        };
        assert_eq!(db.len(), 3);
        assert!(db.verify_password("a", b"one"));
        assert!(!db.verify_password("a", b"one:1000"));
        assert!(db.verify_password("b", b"two"));
        assert!(db.verify_password("c", b"three"));
    }

    #[test]
    fn parse_errors_name_the_line_and_never_the_password() {
        let sha = "$6$lRIUi9jdcFZ6nFOD$hPrIV2Ds4Jf.dNbalhcRaBBCV.9BRXWpP1DDrxJs50x2o.EIkJxrSc0982QPgbx.kKYv7QQIOkPTbs8owfYZl1";
        let blf = "$2y$05$9IoBKkFUzKc3D5KkeRvJ6OYtvf/dCmzNy1TY7g9mdvyXnWBRT7TZ.";
        let argon =
            "$argon2id$v=19$m=4096,t=3,p=1$c29tZXNhbHQ$JSTtCfuzyWAVVZF1mjNyip+A7CCi5xkKhBoPdXSPbqs";
        let cases = [
            ("a:{FOO}hunter2", "line 1: unknown scheme {FOO}"),
            (
                "a:{MD5-CRYPT}$1$hunter2",
                "line 1: unknown scheme {MD5-CRYPT}",
            ),
            ("a:{hunter2 hunter2}x", "line 1: unknown scheme"),
            (
                "# c\n\na:{PLAIN}x\nhunter2",
                "line 4: expected user:{SCHEME}password",
            ),
            (":{PLAIN}hunter2", "line 1: empty user name"),
            ("a:hunter2", "line 1: password has no {SCHEME} prefix"),
            ("a:{PLAINhunter2", "line 1: password has no {SCHEME} prefix"),
            ("a:{PLAIN}", "line 1: empty password"),
            ("a:{PLAIN}:hunter2", "line 1: empty password"),
            (
                "a:{PLAIN}x\nb:{PLAIN}y\na:{PLAIN}hunter2",
                "line 3: duplicate user a (first on line 1)",
            ),
            (
                "a:{SHA512-CRYPT}hunter2",
                "line 1: bad {SHA512-CRYPT} hash: expected $6$[rounds=N$]salt$hash",
            ),
            (
                "a:{SHA512-CRYPT}$5$abc$hunter2",
                "line 1: bad {SHA512-CRYPT} hash: expected $6$[rounds=N$]salt$hash",
            ),
            (
                "a:{BLF-CRYPT}hunter2",
                "line 1: bad {BLF-CRYPT} hash: expected a $2y$, $2b$ or $2a$ hash",
            ),
            (
                "a:{ARGON2ID}hunter2",
                "line 1: bad {ARGON2ID} hash: not a PHC string",
            ),
        ];
        for (text, expected) in cases {
            let error = parse_error(text);
            assert_eq!(error, expected, "{text:?}");
            assert!(!error.contains("hunter2"), "{error}");
        }
        // Bad hashes of every scheme, each derived from a good one.
        let bad_hashes = [
            format!("{{SHA512-CRYPT}}{}", &sha[..sha.len() - 1]),
            format!("{{SHA512-CRYPT}}{sha}x"),
            format!("{{SHA512-CRYPT}}{}", sha.replace("$6$", "$6$rounds=999$")),
            format!("{{SHA512-CRYPT}}{}", sha.replace("$6$", "$6$rounds=ten$")),
            format!(
                "{{SHA512-CRYPT}}{}",
                sha.replace("lRIUi9jdcFZ6nFOD", "lRIUi9jdcFZ6nFODx")
            ),
            format!("{{SHA512-CRYPT}}{}", sha.replace("lRIUi9jdcFZ6nFOD", "")),
            format!("{{SHA512-CRYPT}}{}", sha.replace("hPrI", "hPr_")),
            format!("{{SHA512-CRYPT}}{sha}$extra"),
            format!("{{BLF-CRYPT}}{}", &blf[..blf.len() - 1]),
            format!("{{BLF-CRYPT}}{}", blf.replace("$2y$", "$2x$")),
            format!("{{BLF-CRYPT}}{}", blf.replace("$05$", "$03$")),
            format!("{{BLF-CRYPT}}{}", blf.replace("$05$", "$32$")),
            format!("{{BLF-CRYPT}}{}", blf.replace("$05$", "$5x$")),
            format!("{{BLF-CRYPT}}{}", blf.replace("9IoB", "9Io!")),
            format!("{{ARGON2ID}}{}", argon.replace("argon2id", "argon2i")),
            format!("{{ARGON2ID}}{}", argon.replace("v=19", "v=18")),
            format!("{{ARGON2ID}}{}", argon.replace("m=4096", "m=1")),
            format!("{{ARGON2ID}}{}", argon.replace("t=3", "t=0")),
            format!("{{ARGON2ID}}{}", argon.replace(",p=1", ",p=1,q=2")),
            format!(
                "{{ARGON2ID}}{}",
                argon.replace("$JSTtCfuzyWAVVZF1mjNyip+A7CCi5xkKhBoPdXSPbqs", "")
            ),
            format!("{{ARGON2ID}}{}", argon.replace("c29tZXNhbHQ", "c29t")),
        ];
        for field in bad_hashes {
            let text = format!("# users\nalice:{field}:1000");
            let error = parse_error(&text);
            assert!(error.starts_with("line 2: bad {"), "{field}: {error}");
            assert!(!error.contains(&field[field.len() - 8..]), "{error}");
        }
    }

    /// The load-time check and the crate that verifies later must agree on what a
    /// sha512-crypt hash may end with, or a user could load fine and never log in.
    #[test]
    fn sha512_crypt_check_agrees_with_the_verifier() {
        let good = "$6$lRIUi9jdcFZ6nFOD$hPrIV2Ds4Jf.dNbalhcRaBBCV.9BRXWpP1DDrxJs50x2o.EIkJxrSc0982QPgbx.kKYv7QQIOkPTbs8owfYZl1";
        let stem = &good[..good.len() - 1];
        for &last in CRYPT_BASE64 {
            let hash = format!("{stem}{}", char::from(last));
            let verifier = ShaCrypt::default().verify_password(b"wrong", hash.as_str());
            let parses = verifier != Err(argon2::password_hash::Error::EncodingInvalid);
            assert_eq!(check_sha512_crypt(&hash).is_ok(), parses, "{hash}");
        }
    }

    #[test]
    fn load_errors_name_the_path() {
        let dir = tempfile::tempdir().map_err(|error| error.to_string());
        let Ok(dir) = dir else {
            panic!("{dir:?}");
        };
        let missing = dir.path().join("missing");
        let error = UserDb::load(&missing).map(|db| db.len());
        let message = error.as_ref().map_err(ToString::to_string);
        assert!(
            matches!(&message, Err(m) if m.starts_with(&format!("reading {}: ", missing.display()))),
            "{message:?}"
        );
        assert!(matches!(error, Err(ref e) if std::error::Error::source(e).is_some()));

        let file = dir.path().join("users");
        for (content, expected) in [
            (
                &b"a:{PLAIN}x\nb:{FOO}y\n"[..],
                "line 2: unknown scheme {FOO}",
            ),
            (b"a:{PLAIN}x\n\nb:{PLAIN}\xff\n", "line 3: not valid UTF-8"),
        ] {
            assert!(std::fs::write(&file, content).is_ok());
            let message = UserDb::load(&file)
                .map(|db| db.len())
                .map_err(|e| e.to_string());
            assert_eq!(message, Err(format!("{}: {expected}", file.display())));
        }
        assert!(std::fs::write(&file, FIXTURE).is_ok());
        assert_eq!(UserDb::load(&file).map(|db| db.len()).ok(), Some(14));
    }

    #[test]
    fn hash_password_round_trips() {
        for (scheme, prefix) in [
            (
                HashScheme::Argon2id,
                "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$",
            ),
            (HashScheme::Sha512Crypt, "{SHA512-CRYPT}$6$rounds=5000$"),
            (HashScheme::Bcrypt, "{BLF-CRYPT}$2y$12$"),
        ] {
            let field = hash_password(scheme, "correct horse").map_err(|e| e.to_string());
            let Ok(field) = field else {
                panic!("{scheme:?}: {field:?}");
            };
            assert!(field.starts_with(prefix), "{field}");
            let db = UserDb::parse(&format!("u:{field}")).map_err(|e| e.to_string());
            let Ok(db) = db else {
                panic!("{field}: {db:?}");
            };
            assert!(db.verify_password("u", b"correct horse"), "{field}");
            assert!(!db.verify_password("u", b"correct horsf"), "{field}");
        }
    }

    #[test]
    fn hash_password_refuses_what_cannot_work() {
        assert!(matches!(
            hash_password(HashScheme::Argon2id, ""),
            Err(HashError::EmptyPassword)
        ));
        let long = "x".repeat(BCRYPT_MAX_PASSWORD + 1);
        assert!(matches!(
            hash_password(HashScheme::Bcrypt, &long),
            Err(HashError::PasswordTooLong { max: 72, .. })
        ));
    }

    #[test]
    fn user_db_can_be_shared_across_tasks() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<UserDb>();
        assert_send_sync::<LoadError>();
        assert_send_sync::<HashError>();
    }

    #[test]
    fn debug_never_shows_hashes() {
        let debug = format!("{:?}", fixture());
        assert!(!debug.contains("secret") && !debug.contains('$'), "{debug}");
    }
}
