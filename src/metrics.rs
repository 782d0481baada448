//! Metric names, their descriptions, and typed helpers. Names exist here only, and
//! every label value is a `&'static str` from a bounded set: never a user or an address.

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

/// Session durations span a refused connection (milliseconds) to a slow bulk upload
/// (many minutes).
pub const SESSION_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// Installs the process-wide Prometheus recorder and its upkeep task; the returned
/// handle renders `/metrics`. Must run inside the runtime.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(SESSION_DURATION_SECONDS.into()),
            SESSION_DURATION_BUCKETS,
        )
        .and_then(|builder| builder.install_recorder())
        .map_err(|e| format!("installing the metrics recorder: {e}"))?;
    describe();
    let upkeep = handle.clone();
    // install_recorder leaves histogram draining to us (the exporter's own task only
    // exists with its HTTP listener, which postern does not use).
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(5));
        loop {
            ticker.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

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
        "Limits store calls that failed or timed out, by operation."
    );
    describe_gauge!(
        CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS,
        "The served certificate's notAfter as Unix time, by name (its first SAN); updated on reload."
    );
    gauge!(CONNECTIONS_ACTIVE).set(0.0);
    gauge!(BACKEND_UP).set(0.0);
    for direction in [Direction::ClientToBackend, Direction::BackendToClient] {
        bytes_counter(direction).absolute(0);
    }
    for result in ["ok", "error"] {
        counter!(RELOADS_TOTAL, "result" => result).absolute(0);
        counter!(BACKEND_CONNECTIONS_TOTAL, "result" => result).absolute(0);
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
            Direction::ClientToBackend => "client_to_backend",
            Direction::BackendToClient => "backend_to_client",
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

pub fn tls_handshake(ok: bool, version: &'static str) {
    let result = if ok { "ok" } else { "error" };
    counter!(TLS_HANDSHAKES_TOTAL, "result" => result, "version" => version).increment(1);
}

pub fn auth_attempt(mechanism: &'static str, success: bool) {
    let result = if success { "success" } else { "failure" };
    counter!(AUTH_ATTEMPTS_TOTAL, "mechanism" => mechanism, "result" => result).increment(1);
}

pub fn backend_connection(ok: bool) {
    let result = if ok { "ok" } else { "error" };
    counter!(BACKEND_CONNECTIONS_TOTAL, "result" => result).increment(1);
}

pub fn auth_throttled(scope: &'static str) {
    counter!(AUTH_THROTTLED_TOTAL, "scope" => scope).increment(1);
}

pub fn connection_rejected(reason: &'static str) {
    counter!(CONNECTIONS_REJECTED_TOTAL, "reason" => reason).increment(1);
}

pub fn reload(ok: bool) {
    let result = if ok { "ok" } else { "error" };
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
}

impl MessageResult {
    pub fn label(self) -> &'static str {
        match self {
            MessageResult::Accepted => "accepted",
            MessageResult::RejectedByBackend => "rejected_backend",
            MessageResult::RejectedByLimit => "rejected_limit",
            MessageResult::RejectedStrictData => "rejected_strict_data",
            MessageResult::RejectedSmuggling => "rejected_smuggling",
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
    counter!(LIMIT_REJECTIONS_TOTAL, "limit" => limit).increment(1);
}

pub fn limits_store_error(operation: &'static str) {
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
