//! The [`Authenticator`]: decides whether a client's credentials are good, with every
//! abuse defence in front of the credential source.
//!
//! In order, an attempt meets: the failure windows per client network and per user
//! name ([`gate`]: this process's, or those every replica shares through the limits
//! store; reserved before any hash runs), the share of verifications one network may
//! hold ([`PerNetSlots`]), the verifier pool ([`pool`]: a KDF takes about 100 ms of CPU
//! and argon2 64 MiB, so the verifiers are few, and waiting attempts are served by
//! their network's share), the credential source itself, and on failure the pacing
//! that makes every failure take as long as the costliest hash ([`FailurePace`]).
//! Sessions only ask [`Authenticator::authenticate`]; the connection code knows none of
//! this.

pub mod dovecot;
pub mod http;
pub mod ldap;

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::limits::{
    AuthHistory, AuthLimits, ClientNet, FailurePace, PerNetSlots, THROTTLE_LOG_INTERVAL,
    ThrottleLog,
};
use crate::metrics;
use crate::sasl::{Credentials, Mechanism};
use crate::session::Verdict;
use crate::shutdown::Shutdown;
use crate::store::LimitsStore;
use crate::users::{Check, UserDb};

pub mod gate;
pub mod pool;

use gate::FailureGate;
use pool::{Busy, QUEUE_PER_VERIFIER, VerifierPool};

/// How long an AUTH may wait for a free verifier before it gets `454 4.7.0`.
const VERIFY_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the [`Authenticator`] enforces, from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Failure windows per network and per user name.
    pub failures: AuthLimits,
    /// Where the failure windows live (`--limits-store`), and what happens when it
    /// cannot answer.
    pub store: LimitsStore,
    /// Verifications one client network may have running or queued
    /// (`--max-verifications-per-network`).
    pub verifications_per_network: u32,
    /// `--auth-mechanisms`, if given; see [`Authenticator::mechanisms`].
    pub mechanisms: Option<Vec<Mechanism>>,
}

/// Checks credentials against the users file behind the abuse defences.
pub struct Authenticator {
    settings: Settings,
    /// The users file; a reload swaps it for new attempts while running ones keep their
    /// `Arc`.
    users: RwLock<Arc<UserDb>>,
    /// Bounds concurrent password hash verifications (argon2 uses 64 MiB each), and
    /// orders the attempts waiting for one.
    verifiers: Arc<VerifierPool>,
    /// Verifications running or queued per client network.
    verifications_per_net: Arc<PerNetSlots>,
    /// AUTH failures per client network and per user name.
    gate: FailureGate,
    /// How long a failed AUTH takes at least (the costliest hash's time).
    failure_pace: Arc<FailurePace>,
    /// Throttle log lines held back per network.
    throttle_log: ThrottleLog,
}

impl Authenticator {
    /// An authenticator over `users`, its failure pacing measured on `users`' costliest
    /// hash before the first client can fail.
    pub async fn start(settings: Settings, users: UserDb) -> Arc<Authenticator> {
        let users = Arc::new(users);
        log_mechanisms(settings.mechanisms.as_deref(), &users);
        let failure_pace = Arc::new(FailurePace::default());
        let decoy = users.clone();
        if let Ok(took) = tokio::task::spawn_blocking(move || decoy.time_decoy()).await {
            failure_pace.seed(took);
        }
        let verifiers = verify_concurrency();
        Arc::new(Authenticator {
            verifications_per_net: PerNetSlots::new(settings.verifications_per_network, u32::MAX),
            gate: FailureGate::new(settings.failures, &settings.store),
            settings,
            users: RwLock::new(users),
            verifiers: VerifierPool::new(verifiers, verifiers * QUEUE_PER_VERIFIER),
            failure_pace,
            throttle_log: ThrottleLog::new(THROTTLE_LOG_INTERVAL),
        })
    }

    /// The SASL mechanisms a new session offers: `--auth-mechanisms`, or PLAIN and LOGIN,
    /// with CRAM-MD5 only while every user of the current file can pass it.
    pub fn mechanisms(&self) -> Vec<Mechanism> {
        match &self.settings.mechanisms {
            Some(chosen) => chosen.clone(),
            None => default_mechanisms(&self.users()),
        }
    }

    /// The users file in use.
    pub fn users(&self) -> Arc<UserDb> {
        match self.users.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// New verifications use `users`; a verification already running keeps its copy.
    pub fn replace_users(&self, users: UserDb) {
        let users = Arc::new(users);
        // A costlier decoy in the new file must pace failures from the first one on.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (pace, users) = (self.failure_pace.clone(), users.clone());
            runtime.spawn_blocking(move || pace.seed(users.time_decoy()));
        }
        match self.users.write() {
            Ok(mut guard) => *guard = users,
            Err(poisoned) => *poisoned.into_inner() = users,
        }
    }

    /// Applies the failure limits, checks the credentials, and records the outcome.
    /// `history` is the connection's own, `shutdown` cuts the waits short on a drain.
    pub async fn authenticate(
        &self,
        history: &mut AuthHistory,
        shutdown: &mut Shutdown,
        client: ClientNet,
        mechanism: Mechanism,
        credentials: Credentials,
    ) -> Verdict {
        let username = credentials.username().to_owned();
        let user_key = self.gate.key(&username);
        let throttled = |scope: &'static str| {
            metrics::auth_throttled(scope);
            // A refused run repeats fast: one line per network and interval, counted.
            if let Some(events) = self.throttle_log.note(client, Instant::now()) {
                info!(net = %client, events, user = ?LoggedName(&username), mechanism = mechanism.label(), scope, "authentication throttled");
            }
            Verdict::Throttled
        };
        let (ticket, delay) = match self.gate.admit(client, &user_key).await {
            gate::Decision::Verify { ticket, delay } => (ticket, delay),
            gate::Decision::Refused(scope) => return throttled(scope),
        };
        if !delay.is_zero() {
            // The name is over its failure limit: slowed down from networks that have not
            // failed it, so its owner can still log in. A drain does not wait for it.
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.stopping() => return Verdict::Throttled,
            }
        }
        // A flood from one network queues at most this many for the verifier pool: the
        // rest is refused here, before it can crowd out other networks' logins.
        let Ok(verifying) = self.verifications_per_net.try_acquire(client, None) else {
            return throttled(metrics::label::throttle_scope::NETWORK_VERIFICATIONS);
        };
        let verified = self.verify(client, credentials).await;
        // Given back with the verifier, not after the failure pacing below: the cap is on
        // hashing, and a paced failure holds no CPU.
        drop(verifying);
        let (check, took) = match verified {
            Ok(checked) => checked,
            // Refused by share: logged like any refusal (a flood repeats fast).
            Err(Busy::QueueFull | Busy::Displaced) => {
                return throttled(metrics::label::throttle_scope::VERIFIER_QUEUE);
            }
            Err(Busy::TimedOut) => {
                metrics::auth_throttled(metrics::label::throttle_scope::VERIFIER);
                return Verdict::Throttled;
            }
        };
        let valid = check.valid;
        metrics::auth_attempt(mechanism.label(), valid);
        if valid {
            ticket.succeeded().await;
            let forgiven = history.succeeded(user_key.local, mechanism);
            if forgiven > 0 {
                self.gate.forgive(client, &user_key, forgiven).await;
                tracing::debug!(
                    forgiven,
                    mechanism = mechanism.label(),
                    "earlier failures with another mechanism not counted against the user"
                );
            }
            return Verdict::Valid;
        }
        ticket.failed();
        history.failed(user_key.local, mechanism);
        // Every failure answers after the costliest hash's time, so response times tell
        // neither which names exist nor how each is stored (the verifier slot is free
        // again: this waits without holding CPU).
        self.failure_pace.observe(took, check.decoy_work);
        tokio::select! {
            () = tokio::time::sleep(self.failure_pace.pad(took)) => {}
            () = shutdown.stopping() => {}
        }
        // One line per failure, with the name tried, for fail2ban-style tooling.
        info!(user = ?LoggedName(&username), mechanism = mechanism.label(), result = "failure", "authentication failed");
        Verdict::Invalid
    }

    /// Checks credentials on the blocking pool: a KDF takes ~100 ms of CPU and must not
    /// stall the reactor. The verifier pool bounds how many run at once and who waits
    /// for one first. Also returns how long the check itself took (not the queue).
    async fn verify(
        &self,
        client: ClientNet,
        credentials: Credentials,
    ) -> Result<(Check, Duration), Busy> {
        let users = self.users();
        let _verifier = self.verifiers.acquire(client, VERIFY_QUEUE_TIMEOUT).await?;
        let check = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let check = match &credentials {
                Credentials::Password { username, password } => {
                    users.check_password(username, password)
                }
                Credentials::CramMd5 {
                    username,
                    challenge,
                    digest,
                } => Check {
                    valid: users.verify_cram_md5(username, challenge, digest),
                    decoy_work: false,
                },
            };
            (check, started.elapsed())
        });
        let failed = (
            Check {
                valid: false,
                decoy_work: false,
            },
            Duration::ZERO,
        );
        Ok(check.await.unwrap_or(failed))
    }

    /// Logs the throttle events held back per network once their network's interval is
    /// over, until the process exits.
    pub async fn report_throttles(self: Arc<Self>) {
        let mut tick = tokio::time::interval(THROTTLE_LOG_INTERVAL / 4);
        loop {
            tick.tick().await;
            for (net, events) in self.throttle_log.due(Instant::now()) {
                info!(net = %net, events, "authentication throttled");
            }
        }
    }
}

/// Hash verifications at once: one per core keeps argon2's memory bounded while using
/// the machine.
fn verify_concurrency() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2)
}

/// PLAIN and LOGIN, and CRAM-MD5 when every user has a `{PLAIN}` secret: offering it to
/// a hashed user only earns that client a 535 (and smtplib tries it first).
fn default_mechanisms(users: &UserDb) -> Vec<Mechanism> {
    let mut mechanisms = vec![Mechanism::Plain, Mechanism::Login];
    if users.all_plain() {
        mechanisms.push(Mechanism::CramMd5);
    }
    mechanisms
}

/// Says at start-up which mechanisms are offered and why.
fn log_mechanisms(chosen: Option<&[Mechanism]>, users: &UserDb) {
    info!(users = users.len(), "users loaded");
    let hashed = users.hashed();
    match chosen {
        Some(chosen) => {
            let names: Vec<&str> = chosen.iter().map(|m| m.name()).collect();
            info!(mechanisms = %names.join(" "), "AUTH mechanisms from --auth-mechanisms");
            if chosen.contains(&Mechanism::CramMd5) && hashed > 0 {
                warn!(
                    hashed,
                    "--auth-mechanisms offers CRAM-MD5, which users with a hashed password cannot pass"
                );
            }
        }
        None if hashed == 0 => info!(
            "AUTH PLAIN LOGIN CRAM-MD5: every user has a {{PLAIN}} secret, so CRAM-MD5 is offered"
        ),
        None => info!(
            hashed,
            "AUTH PLAIN LOGIN: CRAM-MD5 is not offered because users with a hashed password cannot pass it (--auth-mechanisms to choose)"
        ),
    }
}

/// Most octets of a client-supplied string that a log line carries: AUTH lines may be
/// 12 KB, and a name that long, logged per attempt, would flood the log.
const MAX_LOGGED: usize = 256;

/// A client-supplied user name for logs: control characters (CR/LF above all) escaped,
/// so a name cannot forge log lines, and cut to [`MAX_LOGGED`] octets with a marker
/// saying how many were left out.
pub struct LoggedName<'a>(pub &'a str);

impl fmt::Debug for LoggedName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0;
        if text.len() <= MAX_LOGGED {
            return write!(f, "{}", text.escape_debug());
        }
        let mut cut = MAX_LOGGED;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let (kept, left) = text.split_at(cut);
        write!(f, "{}…[+{} octets]", kept.escape_debug(), left.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_names_are_escaped_and_cut() {
        for (name, expected) in [
            ("alice".to_owned(), "alice".to_owned()),
            ("a\r\nb".to_owned(), "a\\r\\nb".to_owned()),
            ("x".repeat(256), "x".repeat(256)),
            (
                "x".repeat(12_288),
                format!("{}…[+12032 octets]", "x".repeat(256)),
            ),
            // Never cut inside a character: é is two octets, the cut falls back one.
            (
                format!("{}é{}", "x".repeat(255), "y".repeat(10)),
                format!("{}…[+12 octets]", "x".repeat(255)),
            ),
        ] {
            assert_eq!(format!("{:?}", LoggedName(&name)), expected);
        }
    }
}
