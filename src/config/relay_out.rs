//! Flags of `postern relay-out`: legacy senders on a plain-SMTP listener, relayed to a
//! modern submission service with TLS and AUTH (passwords or OAuth2). Every flag is
//! also read from `POSTERN_<FLAG>`, as for `serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// How postern reaches the upstream: never in plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UpstreamTls {
    /// Plain TCP, then STARTTLS (RFC 3207), usually port 587.
    Starttls,
    /// TLS from the first byte (RFC 8314), usually port 465.
    Implicit,
}

/// The SASL mechanism postern logs in to the upstream with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UpstreamAuth {
    /// RFC 4616, with --upstream-user and --upstream-password-file.
    Plain,
    /// The `Username:`/`Password:` exchange, with --upstream-user and
    /// --upstream-password-file.
    Login,
    /// Google's and Microsoft's `user=...^Aauth=Bearer ...` with an OAuth2 access token.
    Xoauth2,
    /// RFC 7628, with an OAuth2 access token.
    Oauthbearer,
}

impl UpstreamAuth {
    /// Whether the mechanism takes an OAuth2 access token.
    pub fn is_oauth2(self) -> bool {
        matches!(self, UpstreamAuth::Xoauth2 | UpstreamAuth::Oauthbearer)
    }
}

/// A network in CIDR notation, or a single address (a /32 or /128).
fn parse_network(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{text:?}: expected a network such as 10.0.0.0/8 or an address"))
}

// The field docs are `--help` text, where link markup around a URL would be printed.
#[allow(rustdoc::bare_urls)]
#[derive(Debug, Args)]
pub struct RelayOutArgs {
    /// Plain-SMTP listener for legacy senders (repeatable). Only --allow-from networks
    /// are served; with --cert/--key it offers STARTTLS too.
    #[arg(
        long,
        env = "POSTERN_LISTEN",
        value_delimiter = ',',
        value_name = "ADDR",
        default_value = "0.0.0.0:25"
    )]
    pub listen: Vec<SocketAddr>,

    /// Networks whose senders may relay (CIDR or single addresses, repeatable or
    /// comma-separated); any other client gets 554 5.7.1 and is closed. Required: an
    /// open plaintext relay to a mailbox provider is the failure to avoid.
    #[arg(
        long,
        env = "POSTERN_ALLOW_FROM",
        value_delimiter = ',',
        value_name = "CIDR",
        required = true,
        value_parser = parse_network
    )]
    pub allow_from: Vec<ipnet::IpNet>,

    /// PEM certificate chain for STARTTLS towards senders that can use it (optional).
    #[arg(long, env = "POSTERN_CERT", value_name = "PATH", requires = "key")]
    pub cert: Option<PathBuf>,

    /// PEM private key of --cert.
    #[arg(long, env = "POSTERN_KEY", value_name = "PATH", requires = "cert")]
    pub key: Option<PathBuf>,

    /// Senders' credentials (Dovecot passwd-file style), offered as AUTH after STARTTLS
    /// (needs --cert); a sender that logs in may use its own upstream identity
    /// (--upstream-user-map). Without it, AUTH is not offered.
    #[arg(long, env = "POSTERN_USERS", value_name = "PATH", requires = "cert")]
    pub users: Option<PathBuf>,

    /// Name used in the greeting and the EHLO replies, to senders and upstream
    /// [default: the machine's host name].
    #[arg(long, env = "POSTERN_HOSTNAME", value_name = "NAME")]
    pub hostname: Option<String>,

    /// The submission service mail goes to, e.g. smtp.office365.com:587.
    #[arg(long, env = "POSTERN_UPSTREAM", value_name = "HOST:PORT")]
    pub upstream: String,

    /// How TLS starts with the upstream; plaintext is not an option.
    #[arg(long, env = "POSTERN_UPSTREAM_TLS", value_enum, value_name = "MODE", default_value_t = UpstreamTls::Starttls)]
    pub upstream_tls: UpstreamTls,

    /// PEM CA certificates the upstream's certificate must chain to [default: the
    /// system's trusted roots].
    #[arg(long, env = "POSTERN_UPSTREAM_CA", value_name = "PATH")]
    pub upstream_ca: Option<PathBuf>,

    /// The SASL mechanism postern logs in to the upstream with.
    #[arg(
        long,
        env = "POSTERN_UPSTREAM_AUTH",
        value_enum,
        value_name = "MECHANISM"
    )]
    pub upstream_auth: UpstreamAuth,

    /// The upstream account: the login of plain/login, the mailbox of xoauth2 (`user=`)
    /// and oauthbearer (`a=`).
    #[arg(long, env = "POSTERN_UPSTREAM_USER", value_name = "NAME")]
    pub upstream_user: String,

    /// File holding the upstream password (plain, login); one trailing newline is
    /// ignored.
    #[arg(long, env = "POSTERN_UPSTREAM_PASSWORD_FILE", value_name = "PATH")]
    pub upstream_password_file: Option<PathBuf>,

    /// File of `login upstream-user` lines: a sender that logged in to postern as
    /// `login` is relayed as `upstream-user` (with the same credentials: OAuth2
    /// app-only tokens may send as any mailbox they are granted). Others use
    /// --upstream-user.
    #[arg(
        long,
        env = "POSTERN_UPSTREAM_USER_MAP",
        value_name = "PATH",
        requires = "users"
    )]
    pub upstream_user_map: Option<PathBuf>,

    /// OAuth2 token endpoint (xoauth2, oauthbearer), e.g.
    /// https://login.microsoftonline.com/TENANT/oauth2/v2.0/token.
    #[arg(long, env = "POSTERN_OAUTH2_TOKEN_URL", value_name = "URL")]
    pub oauth2_token_url: Option<String>,

    /// OAuth2 client (application) id.
    #[arg(long, env = "POSTERN_OAUTH2_CLIENT_ID", value_name = "ID")]
    pub oauth2_client_id: Option<String>,

    /// File holding the OAuth2 client secret.
    #[arg(long, env = "POSTERN_OAUTH2_CLIENT_SECRET_FILE", value_name = "PATH")]
    pub oauth2_client_secret_file: Option<PathBuf>,

    /// File holding an OAuth2 refresh token: with it postern uses the refresh-token
    /// grant (Google, delegated Microsoft) and writes a rotated refresh token back
    /// (atomically); without it, the client-credentials grant (Microsoft app-only).
    #[arg(long, env = "POSTERN_OAUTH2_REFRESH_TOKEN_FILE", value_name = "PATH")]
    pub oauth2_refresh_token_file: Option<PathBuf>,

    /// OAuth2 scope, e.g. https://outlook.office365.com/.default or
    /// https://mail.google.com/.
    #[arg(long, env = "POSTERN_OAUTH2_SCOPE", value_name = "SCOPE")]
    pub oauth2_scope: Option<String>,

    /// Budget for reaching the upstream: connect, TLS, EHLO and AUTH (the token fetch
    /// has its own).
    #[arg(long, env = "POSTERN_UPSTREAM_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub upstream_timeout: Duration,

    /// How long one token request may take.
    #[arg(long, env = "POSTERN_OAUTH2_TIMEOUT", value_name = "DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub oauth2_timeout: Duration,

    /// How often the upstream is probed (connect, TLS, EHLO) for /readyz and for the
    /// extensions senders are offered.
    #[arg(long, env = "POSTERN_PROBE_INTERVAL", value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub probe_interval: Duration,

    /// How long a TLS handshake with a sender may take.
    #[arg(long, env = "POSTERN_TLS_HANDSHAKE_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// How long a new sender may take to send its first command.
    #[arg(long, env = "POSTERN_FIRST_COMMAND_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub first_command_timeout: Duration,

    /// How long to wait for each command before MAIL.
    #[arg(long, env = "POSTERN_COMMAND_TIMEOUT", value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub command_timeout: Duration,

    /// Close a relayed session when neither side sent a byte for this long.
    #[arg(long, env = "POSTERN_RELAY_IDLE_TIMEOUT", value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub relay_idle_timeout: Duration,

    /// Most sender connections open at once; more get `421 4.7.0`.
    #[arg(long, env = "POSTERN_MAX_CONNECTIONS", value_name = "N", default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// On SIGTERM/SIGINT, how long relayed sessions may run before they are closed.
    #[arg(long, env = "POSTERN_SHUTDOWN_GRACE", value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Serve GET /metrics (Prometheus), /healthz and /readyz on this address [default:
    /// disabled]. /readyz fails while the upstream probe or the token fetch does.
    #[arg(long, env = "POSTERN_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// Check the configuration, the upstream handshake (TLS, EHLO, AUTH) and a token
    /// fetch, then exit: `postern check` for this role.
    #[arg(long)]
    pub check: bool,

    /// Log format.
    #[arg(long, env = "POSTERN_LOG_FORMAT", value_enum, default_value_t = super::LogFormat::Text)]
    pub log_format: super::LogFormat,

    /// Log level (error, warn, info, debug, trace); RUST_LOG, if set, takes precedence.
    #[arg(
        long,
        env = "POSTERN_LOG_LEVEL",
        value_name = "LEVEL",
        default_value = "info"
    )]
    pub log_level: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_and_single_addresses() {
        assert_eq!(
            parse_network("10.0.0.0/8").map(|n| n.to_string()),
            Ok("10.0.0.0/8".into())
        );
        assert_eq!(
            parse_network(" 192.0.2.7").map(|n| n.to_string()),
            Ok("192.0.2.7/32".into())
        );
        assert_eq!(
            parse_network("2001:db8::1").map(|n| n.to_string()),
            Ok("2001:db8::1/128".into())
        );
        assert!(parse_network("example.com").is_err());
        assert!(parse_network("10.0.0.0/33").is_err());
    }
}
