//! Metric names, their descriptions, and typed helpers. Names exist here only, and
//! every label value is a `&'static str` from a bounded set: never a user or an address.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{
    Counter, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS_TOTAL: &str = "postern_connections_total";
pub const CONNECTIONS_ACTIVE: &str = "postern_connections_active";
pub const TLS_HANDSHAKES_TOTAL: &str = "postern_tls_handshakes_total";
pub const AUTH_ATTEMPTS_TOTAL: &str = "postern_auth_attempts_total";
pub const BACKEND_CONNECTIONS_TOTAL: &str = "postern_backend_connections_total";
pub const BYTES_TOTAL: &str = "postern_bytes_total";
pub const SESSION_DURATION_SECONDS: &str = "postern_session_duration_seconds";
pub const BACKEND_UP: &str = "postern_backend_up";
pub const RELOADS_TOTAL: &str = "postern_reloads_total";
pub const AUTH_THROTTLED_TOTAL: &str = "postern_auth_throttled_total";
pub const CONNECTIONS_REJECTED_TOTAL: &str = "postern_connections_rejected_total";
pub const MESSAGES_TOTAL: &str = "postern_messages_total";
pub const RECIPIENTS_TOTAL: &str = "postern_recipients_total";
pub const LIMIT_REJECTIONS_TOTAL: &str = "postern_limit_rejections_total";
pub const LIMITS_STORE_ERRORS_TOTAL: &str = "postern_limits_store_errors_total";
pub const CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS: &str =
    "postern_certificate_expiry_timestamp_seconds";
pub const AUTH_SOURCE_REQUESTS_TOTAL: &str = "postern_auth_source_requests_total";
pub const AUTH_SOURCE_DURATION_SECONDS: &str = "postern_auth_source_duration_seconds";
pub const AUTH_SOURCE_UP: &str = "postern_auth_source_up";

/// The label values of each family, one module per label: what the code emits is
/// taken from here, and `install` creates every combination at 0 so that `rate()` and
/// alerts work before the first event. A value emitted that is not listed here is a bug
/// (`debug_assert!` in the helpers, and the unit tests check the enums' labels).
pub mod label {
    /// `listener` of [`CONNECTIONS_TOTAL`](super::CONNECTIONS_TOTAL).
    pub mod listener {
        pub const STARTTLS: &str = "starttls";
        pub const TLS: &str = "tls";
        pub const MX: &str = "mx";
        pub const ALL: &[&str] = &[STARTTLS, TLS, MX];
    }
    /// `result` of the backend-connection and reload counters and of TLS handshakes.
    pub mod ok_error {
        pub const OK: &str = "ok";
        pub const ERROR: &str = "error";
        pub const ALL: &[&str] = &[OK, ERROR];
    }
    /// `version` of [`TLS_HANDSHAKES_TOTAL`](super::TLS_HANDSHAKES_TOTAL): rustls's names
    /// of the versions postern serves, `unknown` if it ever reports none, and `none` for
    /// a failed handshake.
    pub mod tls_version {
        pub const TLS12: &str = "TLSv1_2";
        pub const TLS13: &str = "TLSv1_3";
        pub const UNKNOWN: &str = "unknown";
        pub const NONE: &str = "none";
        /// The versions of a completed handshake.
        pub const OK: &[&str] = &[TLS12, TLS13, UNKNOWN];
    }
    /// `mechanism` of [`AUTH_ATTEMPTS_TOTAL`](super::AUTH_ATTEMPTS_TOTAL).
    pub mod mechanism {
        pub const PLAIN: &str = "plain";
        pub const LOGIN: &str = "login";
        pub const CRAM_MD5: &str = "cram-md5";
        pub const SCRAM_SHA_1: &str = "scram-sha-1";
        pub const SCRAM_SHA_256: &str = "scram-sha-256";
        pub const ALL: &[&str] = &[PLAIN, LOGIN, CRAM_MD5, SCRAM_SHA_1, SCRAM_SHA_256];
    }
    /// `source` of the `postern_auth_source_*` families.
    pub mod auth_source {
        pub const FILE: &str = "file";
        pub const DOVECOT: &str = "dovecot";
        pub const LDAP: &str = "ldap";
        pub const HTTP: &str = "http";
        pub const ALL: &[&str] = &[FILE, DOVECOT, LDAP, HTTP];
    }
    /// `result` of [`AUTH_SOURCE_REQUESTS_TOTAL`](super::AUTH_SOURCE_REQUESTS_TOTAL):
    /// the source accepted the credentials, refused them, or could not say.
    pub mod auth_source_result {
        pub const VALID: &str = "valid";
        pub const INVALID: &str = "invalid";
        pub const UNAVAILABLE: &str = "unavailable";
        pub const ALL: &[&str] = &[VALID, INVALID, UNAVAILABLE];
    }
    /// `result` of [`AUTH_ATTEMPTS_TOTAL`](super::AUTH_ATTEMPTS_TOTAL).
    pub mod auth_result {
        pub const SUCCESS: &str = "success";
        pub const FAILURE: &str = "failure";
        pub const ALL: &[&str] = &[SUCCESS, FAILURE];
    }
    /// `direction` of [`BYTES_TOTAL`](super::BYTES_TOTAL).
    pub mod direction {
        pub const CLIENT_TO_BACKEND: &str = "client_to_backend";
        pub const BACKEND_TO_CLIENT: &str = "backend_to_client";
        pub const ALL: &[&str] = &[CLIENT_TO_BACKEND, BACKEND_TO_CLIENT];
    }
    /// `scope` of [`AUTH_THROTTLED_TOTAL`](super::AUTH_THROTTLED_TOTAL).
    pub mod throttle_scope {
        /// The client network is over its failure limit.
        pub const IP: &str = "ip";
        /// The client's IPv6 --ipv6-prefix-wide network is over its failure limit.
        pub const WIDE_PREFIX: &str = "wide_prefix";
        /// The user name is over its limit from this network.
        pub const USER: &str = "user";
        /// The connection used up its --max-auth-failures.
        pub const CONNECTION: &str = "connection";
        /// No verifier was free in time.
        pub const VERIFIER: &str = "verifier";
        /// Every verifier busy and the queue full: refused, or displaced from the queue,
        /// as the attempt from the network with the largest share.
        pub const VERIFIER_QUEUE: &str = "verifier_queue";
        /// The network already has --max-verifications-per-network running or queued.
        pub const NETWORK_VERIFICATIONS: &str = "network_verifications";
        /// The limits store holding the failure windows did not answer, and
        /// --limits-store-failure is closed.
        pub const STORE_UNAVAILABLE: &str = "store_unavailable";
        pub const ALL: &[&str] = &[
            IP,
            WIDE_PREFIX,
            USER,
            CONNECTION,
            VERIFIER,
            VERIFIER_QUEUE,
            NETWORK_VERIFICATIONS,
            STORE_UNAVAILABLE,
        ];
    }
    /// `reason` of [`CONNECTIONS_REJECTED_TOTAL`](super::CONNECTIONS_REJECTED_TOTAL).
    pub mod reject_reason {
        pub const MAX_CONNECTIONS: &str = "max_connections";
        pub const MAX_CONNECTIONS_PER_IP: &str = "max_connections_per_ip";
        pub const MAX_CONNECTIONS_PER_WIDE_PREFIX: &str = "max_connections_per_wide_prefix";
        pub const PROXY_UNTRUSTED: &str = "proxy_untrusted";
        pub const PROXY_INVALID: &str = "proxy_invalid";
        pub const JUNK_COMMANDS: &str = "junk_commands";
        pub const AUTH_DEADLINE: &str = "auth_deadline";
        pub const ALL: &[&str] = &[
            MAX_CONNECTIONS,
            MAX_CONNECTIONS_PER_IP,
            MAX_CONNECTIONS_PER_WIDE_PREFIX,
            PROXY_UNTRUSTED,
            PROXY_INVALID,
            JUNK_COMMANDS,
            AUTH_DEADLINE,
        ];
    }
    /// `result` of [`MESSAGES_TOTAL`](super::MESSAGES_TOTAL).
    pub mod message_result {
        pub const ACCEPTED: &str = "accepted";
        pub const REJECTED_BACKEND: &str = "rejected_backend";
        pub const REJECTED_LIMIT: &str = "rejected_limit";
        pub const REJECTED_STRICT_DATA: &str = "rejected_strict_data";
        pub const REJECTED_SMUGGLING: &str = "rejected_smuggling";
        pub const UNANSWERED: &str = "unanswered";
        pub const ALL: &[&str] = &[
            ACCEPTED,
            REJECTED_BACKEND,
            REJECTED_LIMIT,
            REJECTED_STRICT_DATA,
            REJECTED_SMUGGLING,
            UNANSWERED,
        ];
    }
    /// `limit` of [`LIMIT_REJECTIONS_TOTAL`](super::LIMIT_REJECTIONS_TOTAL).
    pub mod limit {
        pub const MESSAGES_PER_USER: &str = "messages_per_user";
        pub const RECIPIENTS_PER_USER: &str = "recipients_per_user";
        pub const RECIPIENTS_PER_MESSAGE: &str = "recipients_per_message";
        pub const STORE_UNAVAILABLE: &str = "store_unavailable";
        pub const ALL: &[&str] = &[
            MESSAGES_PER_USER,
            RECIPIENTS_PER_USER,
            RECIPIENTS_PER_MESSAGE,
            STORE_UNAVAILABLE,
        ];
    }
    /// `operation` of [`LIMITS_STORE_ERRORS_TOTAL`](super::LIMITS_STORE_ERRORS_TOTAL).
    pub mod store_operation {
        /// A sending-limit reservation.
        pub const RESERVE: &str = "reserve";
        /// A sending-limit release.
        pub const RELEASE: &str = "release";
        /// An AUTH attempt's check and reservation in the shared failure windows.
        pub const AUTH_RESERVE: &str = "auth_reserve";
        /// An AUTH attempt's place given back (success, no verdict) or forgiven.
        pub const AUTH_RELEASE: &str = "auth_release";
        pub const ALL: &[&str] = &[RESERVE, RELEASE, AUTH_RESERVE, AUTH_RELEASE];
    }
}

/// Whether `value` is one of a family's listed label values (see [`label`]).
fn listed(values: &[&str], value: &str) -> bool {
    let ok = values.contains(&value);
    debug_assert!(ok, "metric label {value:?} is not in its list {values:?}");
    ok
}

/// Session durations span a refused connection (milliseconds) to a slow bulk upload
/// (many minutes).
pub const SESSION_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// A credential source answers in about a millisecond (a file, a local Dovecot) to the
/// request timeout (a directory far away, or down).
pub const AUTH_SOURCE_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process-wide Prometheus recorder, installed on first use; the handle renders
/// `/metrics`. Installed by whoever runs a server (`main`, the demo, in-process tests),
/// never by the server itself: there is one recorder per process, however many servers.
pub fn recorder() -> Result<PrometheusHandle, String> {
    static RECORDER: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    RECORDER.get_or_init(install).clone()
}

fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(SESSION_DURATION_SECONDS.into()),
            SESSION_DURATION_BUCKETS,
        )
        .and_then(|builder| {
            builder.set_buckets_for_metric(
                Matcher::Full(AUTH_SOURCE_DURATION_SECONDS.into()),
                AUTH_SOURCE_DURATION_BUCKETS,
            )
        })
        .and_then(|builder| builder.install_recorder())
        .map_err(|e| format!("installing the metrics recorder: {e}"))?;
    describe();
    let upkeep = handle.clone();
    // install_recorder leaves histogram draining to us (the exporter's own task only
    // exists with its HTTP listener, which postern does not use). A thread, not a task:
    // it must outlive whichever runtime installed the recorder.
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            }
        })
        .map_err(|e| format!("starting the metrics upkeep thread: {e}"))?;
    Ok(handle)
}

/// How often histograms are drained into the rendered summary.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Registers descriptions so `# HELP` lines appear, and creates the series that should
/// exist (at zero) before the first event.
fn describe() {
    describe_counter!(
        CONNECTIONS_TOTAL,
        "Client connections accepted, by listener kind."
    );
    describe_gauge!(CONNECTIONS_ACTIVE, "Client connections currently open.");
    describe_counter!(
        TLS_HANDSHAKES_TOTAL,
        "TLS handshakes with clients, by result and protocol version."
    );
    describe_counter!(
        AUTH_ATTEMPTS_TOTAL,
        "SASL authentication attempts, by mechanism and result."
    );
    describe_counter!(
        BACKEND_CONNECTIONS_TOTAL,
        "Connections to the backend for relayed sessions (after AUTH, or at an anonymous MX session's MAIL), by result; failure includes a backend that cannot be told an MX client's address."
    );
    describe_counter!(
        BYTES_TOTAL,
        "Bytes relayed after authentication, by direction, counted as written."
    );
    describe_histogram!(
        SESSION_DURATION_SECONDS,
        "Client session duration from accept to close."
    );
    describe_gauge!(BACKEND_UP, "1 if the last backend probe succeeded, else 0.");
    describe_counter!(
        RELOADS_TOTAL,
        "Certificate and users-file reloads, by result."
    );
    describe_counter!(
        MESSAGES_TOTAL,
        "Messages after AUTH, by result: accepted or rejected by the backend, refused by a sending limit, for an end-of-data lookalike (smuggling) or by --strict-data."
    );
    describe_counter!(
        RECIPIENTS_TOTAL,
        "Recipients of the messages the backend accepted after AUTH."
    );
    describe_counter!(
        LIMIT_REJECTIONS_TOTAL,
        "MAIL and RCPT commands refused with 451 by a sending limit, by limit."
    );
    describe_counter!(
        LIMITS_STORE_ERRORS_TOTAL,
        "Limits store calls that failed or timed out, by operation: reserve and release (sending limits), auth_reserve and auth_release (the AUTH failure windows shared by replicas)."
    );
    describe_gauge!(
        CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS,
        "The served certificate's notAfter as Unix time, by name (its first SAN); updated on reload."
    );
    describe_counter!(
        AUTH_THROTTLED_TOTAL,
        "AUTH attempts refused without a password check, by scope: ip (network over its failure limit), user (name over its limit from this network), connection (--max-auth-failures used up), verifier (no verifier free in time), verifier_queue (every verifier busy and the queue full: the attempts of the networks with the largest share are refused first), network_verifications (--max-verifications-per-network running or queued), store_unavailable (the limits store holding the failure windows did not answer and --limits-store-failure is closed)."
    );
    describe_counter!(
        AUTH_SOURCE_REQUESTS_TOTAL,
        "Requests to the credential source, by source (file, dovecot, ldap, http) and result (valid, invalid, unavailable: down, slow or answering nonsense, which clients get as 454 4.7.0)."
    );
    describe_histogram!(
        AUTH_SOURCE_DURATION_SECONDS,
        "How long the credential source took to answer one request, by source."
    );
    describe_gauge!(
        AUTH_SOURCE_UP,
        "1 if the credential source answered the last request or probe, else 0, by source."
    );
    describe_counter!(
        CONNECTIONS_REJECTED_TOTAL,
        "Client connections refused or closed before AUTH, by reason."
    );
    gauge!(CONNECTIONS_ACTIVE).set(0.0);
    gauge!(BACKEND_UP).set(0.0);
    register_zeros();
}

/// Creates every counter series postern can emit, at 0.
fn register_zeros() {
    use label::*;
    for l in listener::ALL {
        counter!(CONNECTIONS_TOTAL, "listener" => *l).absolute(0);
    }
    for v in tls_version::OK {
        counter!(TLS_HANDSHAKES_TOTAL, "result" => ok_error::OK, "version" => *v).absolute(0);
    }
    counter!(TLS_HANDSHAKES_TOTAL, "result" => ok_error::ERROR, "version" => tls_version::NONE)
        .absolute(0);
    for m in mechanism::ALL {
        for r in auth_result::ALL {
            counter!(AUTH_ATTEMPTS_TOTAL, "mechanism" => *m, "result" => *r).absolute(0);
        }
    }
    for r in ok_error::ALL {
        counter!(RELOADS_TOTAL, "result" => *r).absolute(0);
        counter!(BACKEND_CONNECTIONS_TOTAL, "result" => *r).absolute(0);
    }
    for d in direction::ALL {
        counter!(BYTES_TOTAL, "direction" => *d).absolute(0);
    }
    for s in throttle_scope::ALL {
        counter!(AUTH_THROTTLED_TOTAL, "scope" => *s).absolute(0);
    }
    for r in reject_reason::ALL {
        counter!(CONNECTIONS_REJECTED_TOTAL, "reason" => *r).absolute(0);
    }
    for r in message_result::ALL {
        counter!(MESSAGES_TOTAL, "result" => *r).absolute(0);
    }
    counter!(RECIPIENTS_TOTAL).absolute(0);
    for l in limit::ALL {
        counter!(LIMIT_REJECTIONS_TOTAL, "limit" => *l).absolute(0);
    }
    for o in store_operation::ALL {
        counter!(LIMITS_STORE_ERRORS_TOTAL, "operation" => *o).absolute(0);
    }
}

/// A relay direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToBackend,
    BackendToClient,
}

impl Direction {
    pub fn label(self) -> &'static str {
        match self {
            Direction::ClientToBackend => label::direction::CLIENT_TO_BACKEND,
            Direction::BackendToClient => label::direction::BACKEND_TO_CLIENT,
        }
    }
}

pub fn bytes_counter(direction: Direction) -> Counter {
    counter!(BYTES_TOTAL, "direction" => direction.label())
}

/// Counts a connection as active while it lives, and records its duration when it is
/// dropped: even a panicking session task puts the gauge back.
pub struct ActiveConnection {
    started: std::time::Instant,
}

impl ActiveConnection {
    pub fn open(listener: &'static str) -> Self {
        listed(label::listener::ALL, listener);
        counter!(CONNECTIONS_TOTAL, "listener" => listener).increment(1);
        gauge!(CONNECTIONS_ACTIVE).increment(1.0);
        ActiveConnection {
            started: std::time::Instant::now(),
        }
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        gauge!(CONNECTIONS_ACTIVE).decrement(1.0);
        histogram!(SESSION_DURATION_SECONDS).record(self.started.elapsed().as_secs_f64());
    }
}

/// `version` as rustls names it; one postern does not list counts as `unknown`.
pub fn tls_handshake(ok: bool, version: &str) {
    use label::{ok_error, tls_version};
    let (result, version) = if ok {
        let listed = tls_version::OK.iter().find(|v| **v == version);
        (
            ok_error::OK,
            listed.copied().unwrap_or(tls_version::UNKNOWN),
        )
    } else {
        (ok_error::ERROR, tls_version::NONE)
    };
    counter!(TLS_HANDSHAKES_TOTAL, "result" => result, "version" => version).increment(1);
}

pub fn auth_attempt(mechanism: &'static str, success: bool) {
    use label::auth_result;
    listed(label::mechanism::ALL, mechanism);
    let result = if success {
        auth_result::SUCCESS
    } else {
        auth_result::FAILURE
    };
    counter!(AUTH_ATTEMPTS_TOTAL, "mechanism" => mechanism, "result" => result).increment(1);
}

/// One answer (or failure to answer) of the credential source.
pub fn auth_source_request(source: &'static str, result: &'static str, took: Duration) {
    listed(label::auth_source::ALL, source);
    listed(label::auth_source_result::ALL, result);
    counter!(AUTH_SOURCE_REQUESTS_TOTAL, "source" => source, "result" => result).increment(1);
    histogram!(AUTH_SOURCE_DURATION_SECONDS, "source" => source).record(took.as_secs_f64());
}

/// Whether the credential source answers. Only the configured source has a series.
pub fn auth_source_up(source: &'static str, up: bool) {
    listed(label::auth_source::ALL, source);
    gauge!(AUTH_SOURCE_UP, "source" => source).set(if up { 1.0 } else { 0.0 });
}

pub fn backend_connection(ok: bool) {
    let result = if ok {
        label::ok_error::OK
    } else {
        label::ok_error::ERROR
    };
    counter!(BACKEND_CONNECTIONS_TOTAL, "result" => result).increment(1);
}

pub fn auth_throttled(scope: &'static str) {
    listed(label::throttle_scope::ALL, scope);
    counter!(AUTH_THROTTLED_TOTAL, "scope" => scope).increment(1);
}

pub fn connection_rejected(reason: &'static str) {
    listed(label::reject_reason::ALL, reason);
    counter!(CONNECTIONS_REJECTED_TOTAL, "reason" => reason).increment(1);
}

pub fn reload(ok: bool) {
    let result = if ok {
        label::ok_error::OK
    } else {
        label::ok_error::ERROR
    };
    counter!(RELOADS_TOTAL, "result" => result).increment(1);
}

/// How a message ended, for [`MESSAGES_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageResult {
    Accepted,
    RejectedByBackend,
    RejectedByLimit,
    RejectedStrictData,
    /// A body with an end-of-data lookalike (SMTP smuggling), refused by default.
    RejectedSmuggling,
    /// The session ended after the message's end was forwarded, before the backend
    /// answered it.
    Unanswered,
}

impl MessageResult {
    pub fn label(self) -> &'static str {
        match self {
            MessageResult::Accepted => label::message_result::ACCEPTED,
            MessageResult::RejectedByBackend => label::message_result::REJECTED_BACKEND,
            MessageResult::RejectedByLimit => label::message_result::REJECTED_LIMIT,
            MessageResult::RejectedStrictData => label::message_result::REJECTED_STRICT_DATA,
            MessageResult::RejectedSmuggling => label::message_result::REJECTED_SMUGGLING,
            MessageResult::Unanswered => label::message_result::UNANSWERED,
        }
    }
}

pub fn message(result: MessageResult) {
    counter!(MESSAGES_TOTAL, "result" => result.label()).increment(1);
}

pub fn recipients_accepted(n: u64) {
    counter!(RECIPIENTS_TOTAL).increment(n);
}

pub fn limit_rejection(limit: &'static str) {
    listed(label::limit::ALL, limit);
    counter!(LIMIT_REJECTIONS_TOTAL, "limit" => limit).increment(1);
}

pub fn limits_store_error(operation: &'static str) {
    listed(label::store_operation::ALL, operation);
    counter!(LIMITS_STORE_ERRORS_TOTAL, "operation" => operation).increment(1);
}

pub fn backend_up(up: bool) {
    gauge!(BACKEND_UP).set(if up { 1.0 } else { 0.0 });
}

/// The leaf's notAfter for the certificate named `name`. The one label that is not a
/// `&'static str`: it comes from the operator's certificates, so the set is as small as
/// the `--cert` list, and it is what an alert must show to say which one to renew.
pub fn certificate_expiry(name: &str, not_after: i64) {
    gauge!(CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS, "name" => name.to_owned()).set(not_after as f64);
}

// --- relay-out (src/outbound.rs): its own series, created only by that role ---

pub const UPSTREAM_SESSIONS_TOTAL: &str = "postern_upstream_sessions_total";
pub const OAUTH2_TOKEN_REFRESHES_TOTAL: &str = "postern_oauth2_token_refreshes_total";
pub const OAUTH2_TOKEN_EXPIRY_TIMESTAMP_SECONDS: &str =
    "postern_oauth2_token_expiry_timestamp_seconds";

/// `result` of [`UPSTREAM_SESSIONS_TOTAL`]: how postern's login to the upstream for one
/// sender session ended.
pub mod upstream_result {
    pub const OK: &str = "ok";
    /// Connection refused or lost before the login finished.
    pub const UNREACHABLE: &str = "unreachable";
    pub const TIMEOUT: &str = "timeout";
    /// TLS handshake or certificate failure, or no STARTTLS offered.
    pub const TLS_FAILED: &str = "tls_failed";
    /// No OAuth2 token could be obtained.
    pub const TOKEN_FAILED: &str = "token_failed";
    /// AUTH refused, or the mechanism not offered.
    pub const AUTH_FAILED: &str = "auth_failed";
    /// Greeting, EHLO or STARTTLS refused, or a malformed reply.
    pub const REFUSED: &str = "refused";
    pub const ALL: &[&str] = &[
        OK,
        UNREACHABLE,
        TIMEOUT,
        TLS_FAILED,
        TOKEN_FAILED,
        AUTH_FAILED,
        REFUSED,
    ];
}

/// Describes the relay-out series and creates them at 0 (`oauth2` when the role uses
/// OAuth2).
pub fn relay_out_series(oauth2: bool) {
    describe_counter!(
        UPSTREAM_SESSIONS_TOTAL,
        "relay-out: logins to the upstream for sender sessions, by result."
    );
    for r in upstream_result::ALL {
        counter!(UPSTREAM_SESSIONS_TOTAL, "result" => *r).absolute(0);
    }
    if oauth2 {
        describe_counter!(
            OAUTH2_TOKEN_REFRESHES_TOTAL,
            "relay-out: OAuth2 token requests, by result."
        );
        describe_gauge!(
            OAUTH2_TOKEN_EXPIRY_TIMESTAMP_SECONDS,
            "relay-out: when the current OAuth2 access token expires, as Unix time."
        );
        for r in label::ok_error::ALL {
            counter!(OAUTH2_TOKEN_REFRESHES_TOTAL, "result" => *r).absolute(0);
        }
        gauge!(OAUTH2_TOKEN_EXPIRY_TIMESTAMP_SECONDS).set(0.0);
    }
}

pub fn upstream_session(result: &'static str) {
    listed(upstream_result::ALL, result);
    counter!(UPSTREAM_SESSIONS_TOTAL, "result" => result).increment(1);
}

pub fn oauth2_token_refresh(ok: bool) {
    let result = if ok {
        label::ok_error::OK
    } else {
        label::ok_error::ERROR
    };
    counter!(OAUTH2_TOKEN_REFRESHES_TOTAL, "result" => result).increment(1);
}

pub fn oauth2_token_expiry(unix_seconds: f64) {
    gauge!(OAUTH2_TOKEN_EXPIRY_TIMESTAMP_SECONDS).set(unix_seconds);
}

#[cfg(test)]
mod tests {
    use super::label;
    use crate::relay::rules::Limit;
    use crate::sasl::Mechanism;
    use crate::session::{ListenerKind, Rejection};

    /// The enums that name label values outside this module name listed ones.
    #[test]
    fn every_emitted_label_is_listed() {
        for m in Mechanism::KNOWN {
            assert!(label::mechanism::ALL.contains(&m.label()), "{m:?}");
        }
        for l in [
            ListenerKind::Submission,
            ListenerKind::ImplicitTls,
            ListenerKind::Mx,
        ] {
            assert!(label::listener::ALL.contains(&l.label()), "{l:?}");
        }
        for r in [Rejection::JunkCommands, Rejection::AuthDeadline] {
            assert!(label::reject_reason::ALL.contains(&r.label()), "{r:?}");
        }
        for l in [
            Limit::MessagesPerUser,
            Limit::RecipientsPerUser,
            Limit::RecipientsPerMessage,
            Limit::StoreUnavailable,
        ] {
            assert!(label::limit::ALL.contains(&l.label()), "{l:?}");
        }
    }
}
