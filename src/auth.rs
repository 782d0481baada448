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

pub mod cache;
pub mod dovecot;
pub mod http;
pub mod ldap;
pub mod names;
pub mod relayed;
pub mod source;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::limits::{
    AuthHistory, AuthLimits, FailurePace, NetSlot, Origin, PerNetSlots, THROTTLE_LOG_INTERVAL,
    ThrottleLog,
};
use crate::metrics;
use crate::sasl::{Credentials, Mechanism};
use crate::session::{SourceReply, Verdict};
use crate::shutdown::Shutdown;
use crate::store::LimitsStore;
use crate::users::UserDb;

pub mod gate;
pub mod hashing;
pub mod pool;

use cache::Cache;
use gate::{FailureGate, NameKey, Ticket};
use pool::{Busy, QUEUE_PER_VERIFIER, VerifierPool};
use source::{Answer, Answered, Attempt, Source, Unavailable};

/// How long an AUTH may wait for a free verifier before it gets `454 4.7.0`.
const VERIFY_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks a remote source may have running at once: they cost postern no CPU, so the
/// pool only orders who goes first under a flood and bounds what the source gets.
const REMOTE_VERIFIERS: usize = 32;

/// How often a source that is down is asked again, and one that is up re-checked.
const SOURCE_PROBE_INTERVAL: Duration = Duration::from_secs(5);

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
    /// `--auth-cache-ttl`: successes reused this long (off when `None`).
    pub cache_ttl: Option<Duration>,
    /// `--backend-allow`: where a source may send a session (auth_http's `Auth-Server`).
    pub backend_allow: Vec<ipnet::IpNet>,
}

/// Who is trying, as the source and the windows need it.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    pub addr: SocketAddr,
    pub local: SocketAddr,
    /// Where the windows and shares count `addr`.
    pub origin: Origin,
    pub helo: Option<&'a str>,
    /// 1 for the connection's first AUTH, then 2, 3, ...
    pub attempt: u32,
}

/// What an AUTH ends in: the verdict, and for a valid one where the session goes and
/// under which name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// A backend the source chose for this user (`None`: the configured one).
    pub route: Option<SocketAddr>,
    /// The account's own name, when the source settled on one (`None`: as typed).
    pub user: Option<String>,
}

impl From<Verdict> for Decision {
    fn from(verdict: Verdict) -> Decision {
        Decision {
            verdict,
            route: None,
            user: None,
        }
    }
}

/// Checks credentials against the source behind the abuse defences.
pub struct Authenticator {
    settings: Settings,
    source: Source,
    /// Bounds concurrent verifications (argon2 uses 64 MiB each; a remote source gets a
    /// bounded load), and orders the attempts waiting for one.
    verifiers: Arc<VerifierPool>,
    /// Verifications running or queued per client network.
    verifications_per_net: Arc<PerNetSlots>,
    /// AUTH failures per client network and per user name.
    gate: FailureGate,
    /// How long a failed AUTH takes at least (the costliest check's time).
    failure_pace: Arc<FailurePace>,
    /// Throttle log lines held back per network.
    throttle_log: ThrottleLog,
    cache: Option<Cache>,
    /// Whether the source answered the last time it was asked.
    up: watch::Sender<bool>,
    /// Makes up the SCRAM salt of names the source does not know (see
    /// [`relayed::decoy_server_first`]).
    decoy_key: [u8; 32],
}

impl Authenticator {
    /// An authenticator over `source`. A file source's failure pacing is measured on
    /// its costliest hash before the first client can fail; a remote source is asked
    /// once, so that EHLO offers what it can verify from the first session.
    pub async fn start(settings: Settings, source: Source) -> Arc<Authenticator> {
        let failure_pace = Arc::new(FailurePace::default());
        let verifiers = match &source {
            Source::File(_) => verify_concurrency(),
            _ => REMOTE_VERIFIERS,
        };
        if let Some(users) = source.users() {
            log_mechanisms(settings.mechanisms.as_deref(), &users);
            if let Ok(took) = hashing::run(move || users.time_decoy()).await {
                failure_pace.seed(took);
            }
        }
        let up = match source.probe().await {
            Ok(found) => {
                info!(source = source.kind().label(), "credential source: {found}");
                true
            }
            Err(error) => {
                warn!(source = source.kind().label(), %error, "credential source unavailable; AUTH gets 454 4.7.0 until it answers");
                false
            }
        };
        metrics::auth_source_up(source.kind().label(), up);
        let cache = settings.cache_ttl.map(|ttl| {
            let mut salt = [0u8; 32];
            // Without randomness the salt is fixed: the entries are still never the
            // password, only easier to test against if the process memory leaked.
            let _ = crate::tls::provider().secure_random.fill(&mut salt);
            Cache::new(ttl, salt)
        });
        let mut decoy_key = [0u8; 32];
        let _ = crate::tls::provider().secure_random.fill(&mut decoy_key);
        Arc::new(Authenticator {
            decoy_key,
            verifications_per_net: PerNetSlots::new(settings.verifications_per_network, u32::MAX),
            gate: FailureGate::new(settings.failures, &settings.store),
            settings,
            source,
            verifiers: VerifierPool::new(verifiers, verifiers * QUEUE_PER_VERIFIER),
            failure_pace,
            throttle_log: ThrottleLog::new(THROTTLE_LOG_INTERVAL),
            cache,
            up: watch::channel(up).0,
        })
    }

    /// The SASL mechanisms a new session offers: those the source can verify, narrowed
    /// by `--auth-mechanisms`.
    pub fn mechanisms(&self) -> Vec<Mechanism> {
        let verifiable = self
            .source
            .mechanisms()
            .unwrap_or_else(|| vec![Mechanism::Plain, Mechanism::Login]);
        match &self.settings.mechanisms {
            Some(chosen) => chosen
                .iter()
                .copied()
                .filter(|m| match &self.source {
                    // What this Dovecot offers now (it may change across restarts).
                    Source::Dovecot(_) => verifiable.contains(m),
                    // CRAM-MD5 from a users file with hashes, or over auth_http (whose
                    // server needs cleartext passwords): the administrator's choice.
                    _ => self.source.can_verify(*m),
                })
                .collect(),
            None => verifiable,
        }
    }

    /// Whether the source runs `mechanism`'s exchange itself, so the session relays it
    /// step by step ([`Authenticator::relay_start`]) instead of collecting credentials.
    pub fn relays(&self, mechanism: Mechanism) -> bool {
        matches!(self.source, Source::Dovecot(_))
            && !matches!(mechanism, Mechanism::Plain | Mechanism::Login)
    }

    /// Which kind of source checks credentials.
    pub fn source_kind(&self) -> source::Kind {
        self.source.kind()
    }

    /// Whether the source answered the last time it was asked (`/readyz`).
    pub fn source_up(&self) -> watch::Receiver<bool> {
        self.up.subscribe()
    }

    /// The users file in use, for a file source.
    pub fn users(&self) -> Option<Arc<UserDb>> {
        self.source.users()
    }

    /// New verifications use `users`; a verification already running keeps its copy.
    pub fn replace_users(&self, users: UserDb) {
        let users = Arc::new(users);
        // A costlier decoy in the new file must pace failures from the first one on.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (pace, users) = (self.failure_pace.clone(), users.clone());
            runtime.spawn(hashing::run(move || pace.seed(users.time_decoy())));
        }
        self.source.replace_users(users);
        self.forget();
    }

    /// Drops every cached success (a reload: the source may have changed its mind).
    pub fn forget(&self) {
        if let Some(cache) = &self.cache {
            cache.clear();
        }
    }

    fn throttled(
        &self,
        client: &Client<'_>,
        username: &str,
        mechanism: Mechanism,
        scope: &'static str,
    ) -> Verdict {
        metrics::auth_throttled(scope);
        // A refused run repeats fast: one line per network and interval, counted.
        if let Some(events) = self.throttle_log.note(client.origin.net, Instant::now()) {
            info!(net = %client.origin.net, events, user = ?LoggedName(username), mechanism = mechanism.label(), scope, "authentication throttled");
        }
        Verdict::Throttled
    }

    /// Meets the failure windows for `username`: `Ok(ticket)` once the attempt may be
    /// checked, after the slow-down its name has earned.
    async fn admit(
        &self,
        client: &Client<'_>,
        shutdown: &mut Shutdown,
        username: &str,
        mechanism: Mechanism,
    ) -> Result<(Ticket, NameKey), Verdict> {
        let user_key = self.gate.key(&names::fold(username));
        let (ticket, delay) = match self.gate.admit(client.origin, &user_key).await {
            gate::Decision::Verify { ticket, delay } => (ticket, delay),
            gate::Decision::Refused(scope) => {
                return Err(self.throttled(client, username, mechanism, scope));
            }
        };
        if !delay.is_zero() {
            // The name is over its failure limit: slowed down from networks that have not
            // failed it, so its owner can still log in. A drain does not wait for it.
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.stopping() => return Err(Verdict::Throttled),
            }
        }
        Ok((ticket, user_key))
    }

    /// Applies the failure limits, checks the credentials, and records the outcome.
    /// `history` is the connection's own, `shutdown` cuts the waits short on a drain.
    pub async fn authenticate(
        &self,
        history: &mut AuthHistory,
        shutdown: &mut Shutdown,
        client: Client<'_>,
        mechanism: Mechanism,
        credentials: Credentials,
    ) -> Decision {
        let username = credentials.username().to_owned();
        let (ticket, user_key) = match self.admit(&client, shutdown, &username, mechanism).await {
            Ok(admitted) => admitted,
            Err(verdict) => return verdict.into(),
        };
        // A flood from one network queues at most this many for the verifier pool: the
        // rest is refused here, before it can crowd out other networks' logins.
        let Ok(verifying) = self
            .verifications_per_net
            .try_acquire(client.origin.net, None)
        else {
            return self
                .throttled(
                    &client,
                    &username,
                    mechanism,
                    metrics::label::throttle_scope::NETWORK_VERIFICATIONS,
                )
                .into();
        };
        let verified = self.verify(&client, &credentials).await;
        // Given back with the verifier, not after the failure pacing below: the cap is on
        // hashing, and a paced failure holds no CPU.
        drop(verifying);
        let (answer, took) = match verified {
            Ok((Ok(answer), took)) => (answer, took),
            Ok((Err(Unavailable(reason, _)), _)) => {
                warn!(source = self.source.kind().label(), %reason, user = ?LoggedName(&username), "credential source unavailable; 454 4.7.0");
                return Verdict::Unavailable.into();
            }
            // Refused by share: logged like any refusal (a flood repeats fast).
            Err(Busy::QueueFull | Busy::Displaced) => {
                return self
                    .throttled(
                        &client,
                        &username,
                        mechanism,
                        metrics::label::throttle_scope::VERIFIER_QUEUE,
                    )
                    .into();
            }
            Err(Busy::TimedOut) => {
                metrics::auth_throttled(metrics::label::throttle_scope::VERIFIER);
                return Verdict::Throttled.into();
            }
        };
        let route = match answer.route {
            Some(route) if !self.may_route_to(route) => {
                warn!(user = ?LoggedName(&username), %route, "the credential source sent the session to a backend outside --backend-allow; 454 4.7.0");
                ticket.failed();
                return Verdict::Unavailable.into();
            }
            route => route,
        };
        if answer.valid
            && let (Some(cache), Credentials::Password { password, .. }) =
                (&self.cache, &credentials)
        {
            let success = cache::Success {
                route,
                user: answer.user.clone(),
            };
            cache.store(&username, password, success, Instant::now());
        }
        let verdict = self
            .settle(
                history,
                shutdown,
                &client,
                Settled {
                    ticket,
                    user_key,
                    username: &username,
                    mechanism,
                    valid: answer.valid,
                    took,
                    decoy_work: answer.decoy_work,
                    wait: answer.wait,
                },
            )
            .await;
        let user = answer.user.filter(|_| verdict == Verdict::Valid);
        Decision {
            verdict,
            route,
            user,
        }
    }

    /// Whether a source may send a session to `backend` (`--backend-allow`).
    fn may_route_to(&self, backend: SocketAddr) -> bool {
        self.settings
            .backend_allow
            .iter()
            .any(|net| net.contains(&backend.ip()))
    }

    /// Records a checked attempt's outcome: the windows, the connection's history, the
    /// metric, and for a failure the pacing and the log line.
    async fn settle(
        &self,
        history: &mut AuthHistory,
        shutdown: &mut Shutdown,
        client: &Client<'_>,
        settled: Settled<'_>,
    ) -> Verdict {
        let Settled {
            ticket,
            user_key,
            username,
            mechanism,
            valid,
            took,
            decoy_work,
            wait,
        } = settled;
        metrics::auth_attempt(mechanism.label(), valid);
        // A switch of mechanism is forgiven for the very name typed, not for every name
        // that shares its window: else logging in as `jurgen` would forgive guesses at
        // `jürgen`'s password.
        let exact = self.gate.exact_key(username);
        if valid {
            ticket.succeeded().await;
            let forgiven = history.succeeded(exact, mechanism);
            if forgiven > 0 {
                self.gate.forgive(client.origin, &user_key, forgiven).await;
                tracing::debug!(
                    forgiven,
                    mechanism = mechanism.label(),
                    "earlier failures with another mechanism not counted against the user"
                );
            }
            return Verdict::Valid;
        }
        ticket.failed();
        history.failed(exact, mechanism);
        // Every failure answers after the costliest check's time, so response times tell
        // neither which names exist nor how each is stored (the verifier slot is free
        // again: this waits without holding CPU). An auth_http server's Auth-Wait can
        // only make it longer.
        self.failure_pace.observe(took, decoy_work);
        let pause = self.failure_pace.pad(took).max(wait.unwrap_or_default());
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shutdown.stopping() => {}
        }
        // One line per failure, with the name tried, for fail2ban-style tooling.
        info!(user = ?LoggedName(username), mechanism = mechanism.label(), result = "failure", "authentication failed");
        Verdict::Invalid
    }

    /// Checks credentials with the source, under the verifier pool (which bounds how
    /// many run at once and who waits for one first), or from the cache. Also returns
    /// how long the check itself took (not the queue).
    async fn verify(
        &self,
        client: &Client<'_>,
        credentials: &Credentials,
    ) -> Result<(Result<Answer, Unavailable>, Duration), Busy> {
        if let (Some(cache), Credentials::Password { username, password }) =
            (&self.cache, credentials)
            && let Some(success) = cache.hit(username, password, Instant::now())
        {
            let answer = Answer {
                valid: true,
                decoy_work: false,
                route: success.route,
                wait: None,
                user: success.user,
            };
            return Ok((Ok(answer), Duration::ZERO));
        }
        if let Some(users) = self.source.users()
            && source::is_cheap(&users, credentials)
        {
            let started = Instant::now();
            let check = source::check_file(&users, credentials);
            let took = started.elapsed();
            let answer = Ok(Answer {
                valid: check.valid,
                decoy_work: check.decoy_work,
                route: None,
                wait: None,
                user: None,
            });
            self.record(&answer, took);
            return Ok((answer, took));
        }
        let _verifier = self
            .verifiers
            .acquire(client.origin.net, VERIFY_QUEUE_TIMEOUT)
            .await?;
        let started = Instant::now();
        let answer = self
            .source
            .check(Attempt {
                credentials,
                client: client.addr,
                local: client.local,
                helo: client.helo,
                number: client.attempt,
            })
            .await;
        let took = started.elapsed();
        self.record(&answer, took);
        Ok((answer, took))
    }

    /// Counts a source's answer and keeps its up state.
    fn record(&self, answer: &Result<Answer, Unavailable>, took: Duration) {
        use metrics::label::auth_source_result as result;
        let (label, up) = match answer {
            Ok(answer) if answer.valid => (result::VALID, true),
            Ok(_) => (result::INVALID, true),
            Err(Unavailable(_, answered)) => (result::UNAVAILABLE, *answered == Answered::TryLater),
        };
        let source = self.source.kind().label();
        metrics::auth_source_request(source, label, took);
        self.set_up(up);
    }

    fn set_up(&self, up: bool) {
        let was = self.up.send_replace(up);
        if was != up {
            metrics::auth_source_up(self.source.kind().label(), up);
            if up {
                info!(
                    source = self.source.kind().label(),
                    "credential source answers again"
                );
            }
        }
    }

    /// Asks a remote source whether it answers, every few seconds, until the process
    /// exits: `/readyz` and the `up` gauge follow, and a Dovecot that comes back is
    /// known (with its mechanisms) before the next client tries.
    pub async fn watch_source(self: Arc<Self>) {
        if matches!(self.source, Source::File(_)) {
            return;
        }
        let mut tick = tokio::time::interval(SOURCE_PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.source.probe().await {
                Ok(_) => self.set_up(true),
                Err(error) => {
                    if *self.up.borrow() {
                        warn!(source = self.source.kind().label(), %error, "credential source unavailable");
                    }
                    self.set_up(false);
                }
            }
        }
    }

    /// Starts a SASL exchange the source runs itself (Dovecot: CRAM-MD5, SCRAM). The
    /// windows meet the attempt as soon as a message names the user: here for SCRAM,
    /// at the response for CRAM-MD5 ([`Authenticator::relay_step`]).
    pub async fn relay_start(
        &self,
        history: &mut AuthHistory,
        shutdown: &mut Shutdown,
        client: Client<'_>,
        mechanism: Mechanism,
        initial: Option<Vec<u8>>,
    ) -> (Option<Relayed>, SourceReply) {
        let Source::Dovecot(dovecot) = &self.source else {
            debug_assert!(false, "only a Dovecot source relays");
            return (None, SourceReply::Done(Verdict::Unavailable, None));
        };
        let mut relayed = Relayed {
            mechanism,
            exchange: None,
            admitted: None,
            challenged: false,
            named_by: None,
            decoy: false,
        };
        // CRAM-MD5 is server-first: Dovecot ignores an initial response, so the name
        // is read from the response to its challenge (in relay_step). The name meets
        // its windows first (their slow-down holds no slot), as in authenticate.
        if let Some(message) = &initial
            && !message.is_empty()
            && relayed::named_initially(mechanism)
            && let Err(verdict) = self
                .admit_named(&mut relayed, &client, shutdown, message)
                .await
        {
            return (None, SourceReply::Done(verdict, None));
        }
        // Held for this call only: between two client lines the exchange holds no slot.
        let (_slot, verifier) = match self.relay_capacity(&client, &mut relayed).await {
            Ok(held) => held,
            Err(verdict) => return (None, SourceReply::Done(verdict, None)),
        };
        let info = source::client_info(&Attempt {
            credentials: &Credentials::Password {
                username: String::new(),
                password: Vec::new(),
            },
            client: client.addr,
            local: client.local,
            helo: client.helo,
            number: client.attempt,
        });
        let started = Instant::now();
        let result = dovecot
            .start(mechanism.name(), initial.as_deref(), &info)
            .await;
        drop(verifier);
        match result {
            Ok((exchange, step)) => {
                relayed.exchange = Some(exchange);
                self.relay_answer(relayed, history, shutdown, &client, step, started)
                    .await
            }
            Err(error) => {
                relayed.give_back();
                self.relay_failed(&error, started);
                (None, SourceReply::Done(Verdict::Unavailable, None))
            }
        }
    }

    /// The client's answer to a relayed challenge.
    pub async fn relay_step(
        &self,
        mut relayed: Relayed,
        history: &mut AuthHistory,
        shutdown: &mut Shutdown,
        client: Client<'_>,
        response: Vec<u8>,
    ) -> (Option<Relayed>, SourceReply) {
        if relayed.admitted.is_none()
            && let Err(verdict) = self
                .admit_named(&mut relayed, &client, shutdown, &response)
                .await
        {
            return (None, SourceReply::Done(verdict, None));
        }
        let (_slot, verifier) = match self.relay_capacity(&client, &mut relayed).await {
            Ok(held) => held,
            Err(verdict) => return (None, SourceReply::Done(verdict, None)),
        };
        if relayed.decoy {
            // The proof for a name the source does not know: the failure it would be.
            let started = Instant::now();
            let refused = dovecot::Step::Failure {
                temporary: false,
                reason: None,
                user: None,
            };
            return self
                .relay_answer(relayed, history, shutdown, &client, refused, started)
                .await;
        }
        let Some(exchange) = relayed.exchange.as_mut() else {
            return (None, SourceReply::Done(Verdict::Unavailable, None));
        };
        let started = Instant::now();
        let stepped = exchange.step(&response).await;
        drop(verifier);
        match stepped {
            Ok(step) => {
                self.relay_answer(relayed, history, shutdown, &client, step, started)
                    .await
            }
            Err(error) => {
                relayed.give_back();
                self.relay_failed(&error, started);
                (None, SourceReply::Done(Verdict::Unavailable, None))
            }
        }
    }

    /// The network's verification slot and a verifier for one call to the source, as
    /// `authenticate` takes them: a flood of relayed exchanges meets the same share as
    /// any other. Refused, the attempt's place in the windows is given back (it was
    /// never checked).
    async fn relay_capacity(
        &self,
        client: &Client<'_>,
        relayed: &mut Relayed,
    ) -> Result<(NetSlot, pool::Verifier), Verdict> {
        use metrics::label::throttle_scope;
        let mechanism = relayed.mechanism;
        let scope = match self
            .verifications_per_net
            .try_acquire(client.origin.net, None)
        {
            Ok(slot) => match self
                .verifiers
                .acquire(client.origin.net, VERIFY_QUEUE_TIMEOUT)
                .await
            {
                Ok(verifier) => return Ok((slot, verifier)),
                Err(Busy::QueueFull | Busy::Displaced) => throttle_scope::VERIFIER_QUEUE,
                Err(Busy::TimedOut) => throttle_scope::VERIFIER,
            },
            Err(_) => throttle_scope::NETWORK_VERIFICATIONS,
        };
        relayed.give_back();
        Err(self.throttled(client, "", mechanism, scope))
    }

    /// Meets the windows with the name `message` claims. A message that names nobody
    /// postern can read is refused unsent: Dovecot may read a name in it (a SCRAM
    /// extension that is not UTF-8) and check a proof no window has met.
    async fn admit_named(
        &self,
        relayed: &mut Relayed,
        client: &Client<'_>,
        shutdown: &mut Shutdown,
        message: &[u8],
    ) -> Result<(), Verdict> {
        let Some(name) = relayed::claimed_name(relayed.mechanism, message) else {
            return Err(Verdict::Invalid);
        };
        let (ticket, key) = self
            .admit(client, shutdown, &name, relayed.mechanism)
            .await?;
        relayed.admitted = Some((ticket, key, name));
        relayed.named_by = Some(message.to_vec());
        Ok(())
    }

    /// An exchange that ended in an error: the source is down only if the error says so
    /// (not for a request postern refused to send).
    fn relay_failed(&self, error: &dovecot::Error, started: Instant) {
        if error.is_source_down() {
            self.relay_down(&error.to_string(), started);
        } else {
            warn!(source = self.source.kind().label(), %error, "relayed exchange failed; 454 4.7.0");
        }
    }

    fn relay_down(&self, reason: &str, started: Instant) {
        warn!(source = self.source.kind().label(), %reason, "credential source unavailable; 454 4.7.0");
        self.record(
            &Err(Unavailable::down(reason.to_owned())),
            started.elapsed(),
        );
    }

    /// What Dovecot said about a relayed exchange.
    async fn relay_answer(
        &self,
        mut relayed: Relayed,
        history: &mut AuthHistory,
        shutdown: &mut Shutdown,
        client: &Client<'_>,
        step: dovecot::Step,
        started: Instant,
    ) -> (Option<Relayed>, SourceReply) {
        let took = started.elapsed();
        let named_by = relayed.named_by.take();
        let (valid, dovecot_user) = match step {
            // Dovecot refused the message that named the user: SCRAM's client-first,
            // looked up at once, so an unknown name fails here and a known one gets
            // its salt. Both get a server-first; the unknown one fails at the proof.
            dovecot::Step::Failure {
                temporary: false, ..
            } if relayed::named_initially(relayed.mechanism)
                && let Some(first) = &named_by
                && let Some((_, _, name)) = &relayed.admitted
                && let Some(challenge) = {
                    let mut random = [0u8; 18];
                    let _ = crate::tls::provider().secure_random.fill(&mut random);
                    relayed::decoy_server_first(first, name, &self.decoy_key, &random)
                } =>
            {
                relayed.exchange = None;
                relayed.decoy = true;
                relayed.challenged = true;
                return (Some(relayed), SourceReply::Challenge(challenge));
            }
            dovecot::Step::Challenge(challenge) => {
                // Dovecot challenged a named user: from here, an exchange dropped
                // unfinished counts as a failure (see Relayed's Drop).
                relayed.challenged = relayed.admitted.is_some();
                return (Some(relayed), SourceReply::Challenge(challenge));
            }
            dovecot::Step::Success { user } => (true, Some(user)),
            dovecot::Step::Failure {
                temporary: true,
                reason,
                ..
            } => {
                let reason = reason.unwrap_or_else(|| "temporary failure".into());
                relayed.give_back();
                warn!(source = self.source.kind().label(), %reason, "credential source could not check; 454 4.7.0");
                self.record(&Err(Unavailable::try_later(reason)), took);
                return (None, SourceReply::Done(Verdict::Unavailable, None));
            }
            dovecot::Step::Failure { user, .. } => (false, user),
        };
        self.record(
            &Ok(Answer {
                valid,
                decoy_work: false,
                route: None,
                wait: None,
                user: None,
            }),
            took,
        );
        let mechanism = relayed.mechanism;
        // Dovecot ended the exchange before a message named the user (it refused the
        // start): still counted, under the name Dovecot saw or under no name.
        let (ticket, key, name) = match relayed.admitted.take() {
            Some(admitted) => admitted,
            None => {
                let name = dovecot_user.clone().unwrap_or_default();
                match self.admit(client, shutdown, &name, mechanism).await {
                    Ok((ticket, key)) => (ticket, key, name),
                    Err(verdict) => return (None, SourceReply::Done(verdict, None)),
                }
            }
        };
        let verdict = self
            .settle(
                history,
                shutdown,
                client,
                Settled {
                    ticket,
                    user_key: key,
                    username: &name,
                    mechanism,
                    valid,
                    took,
                    decoy_work: false,
                    wait: None,
                },
            )
            .await;
        let user = (verdict == Verdict::Valid).then(|| dovecot_user.unwrap_or(name));
        (None, SourceReply::Done(verdict, user))
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

/// A checked attempt, for [`Authenticator::settle`].
struct Settled<'a> {
    ticket: Ticket,
    user_key: NameKey,
    username: &'a str,
    mechanism: Mechanism,
    valid: bool,
    took: Duration,
    decoy_work: bool,
    wait: Option<Duration>,
}

/// A SASL exchange the source runs, between two client messages. Dropping it cancels
/// the exchange at the source and gives back the attempt's place in the windows.
pub struct Relayed {
    mechanism: Mechanism,
    exchange: Option<dovecot::Exchange>,
    /// The attempt's place in the windows, once a message named the user.
    admitted: Option<(Ticket, NameKey, String)>,
    /// The source challenged the named user: it exists (Dovecot fails an unknown name
    /// at once), so dropping the exchange now is a failed attempt, not a free probe.
    challenged: bool,
    /// The message that named the user in the current step, if one did.
    named_by: Option<Vec<u8>>,
    /// The source refused the name; postern answered with a made-up challenge.
    decoy: bool,
}

impl Relayed {
    /// The attempt was never checked (postern busy, the source down): its place goes
    /// back, as for any attempt that ends without an outcome.
    fn give_back(&mut self) {
        self.admitted = None;
        self.challenged = false;
    }
}

impl Drop for Relayed {
    fn drop(&mut self) {
        if self.challenged
            && let Some((ticket, _, _)) = self.admitted.take()
        {
            ticket.failed();
        }
    }
}

impl fmt::Debug for Relayed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relayed")
            .field("mechanism", &self.mechanism)
            .finish_non_exhaustive()
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
/// so a name cannot forge log lines, and cut to `MAX_LOGGED` octets with a marker
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
