//! Command line and environment: every `serve` flag is also read from `POSTERN_<FLAG>`.
//!
//! clap does the parsing; [`crate::server::Config::from_args`] turns the raw flags into the typed
//! [`Config`](crate::server::Config) the server runs on, with one clear error per mistake.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub mod relay_out;

/// `postern --version`: the crate version and the commit it was built from (`build.rs`).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("POSTERN_GIT_COMMIT"),
    ")"
);

/// The exit status contract, shown by `--help`, the man page and the README.
pub const EXIT_STATUS: &str = "\
Exit status:
  0  success (serve and demo: stopped by SIGTERM or SIGINT and drained)
  1  runtime or configuration error (a message on stderr says which)
  2  usage error: unknown flag, missing or malformed argument";

/// postern: STARTTLS, implicit TLS and SMTP AUTH in front of a plain-SMTP server.
#[derive(Debug, Parser)]
#[command(name = "postern", version = VERSION, about, long_about = None, after_help = EXIT_STATUS)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Serve(Box<ServeArgs>),
    /// Validate the configuration (files, certificate/key match, addresses, backend,
    /// credential source) and exit non-zero with a clear message if anything is wrong,
    /// like `nginx -t`. `postern check relay-out ...` checks a relay-out configuration.
    Check(Box<CheckArgs>),
    /// Relay legacy senders (plain SMTP, allowed networks only) to a modern submission
    /// service: TLS, AUTH with a password or OAuth2 (XOAUTH2, OAUTHBEARER).
    RelayOut(Box<relay_out::RelayOutArgs>),
    /// Read a password (stdin or a tty prompt) and print a users-file line for it.
    HashPassword(HashPasswordArgs),
    /// Try postern on this machine: the real proxy on loopback with a throw-away
    /// certificate, a demo user and a stand-in backend that prints each mail it receives.
    Demo(DemoArgs),
    /// Print a shell completion script to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout, or write one page per command into a directory.
    Man {
        /// Write postern.1, postern-serve.1, ... into this directory instead.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

/// `postern check`: the flags of `serve`, or `relay-out` and its flags.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct CheckArgs {
    #[command(subcommand)]
    pub role: Option<CheckRole>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// The other role `postern check` can check.
#[derive(Debug, Subcommand)]
pub enum CheckRole {
    /// Check a relay-out configuration: its files, the upstream handshake (TLS, EHLO,
    /// AUTH) and an OAuth2 token fetch (the same as `postern relay-out --check`).
    RelayOut(Box<relay_out::RelayOutArgs>),
}

/// Ports used when neither `--listen` nor `--listen-tls` is given.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:587";
pub const DEFAULT_LISTEN_TLS: &str = "0.0.0.0:465";

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Submission listener offering STARTTLS (repeatable). TLS and AUTH are required before
    /// any mail transaction. If neither --listen nor --listen-tls is given, postern listens on
    /// 0.0.0.0:587 (STARTTLS) and 0.0.0.0:465 (implicit TLS).
    #[arg(
        long,
        env = "POSTERN_LISTEN",
        value_delimiter = ',',
        value_name = "ADDR"
    )]
    pub listen: Vec<SocketAddr>,

    /// Implicit-TLS listener, RFC 8314 (repeatable). AUTH is required.
    #[arg(
        long,
        env = "POSTERN_LISTEN_TLS",
        value_delimiter = ',',
        value_name = "ADDR"
    )]
    pub listen_tls: Vec<SocketAddr>,

    /// Inbound MX listener, port 25 style (repeatable): STARTTLS and AUTH offered but not
    /// required; an anonymous session is handed to the backend at its first MAIL. Needs
    /// --xclient or --backend-proxy-protocol so the backend sees the real client (or
    /// --allow-mx-open-relay).
    #[arg(
        long,
        env = "POSTERN_LISTEN_MX",
        value_delimiter = ',',
        value_name = "ADDR"
    )]
    pub listen_mx: Vec<SocketAddr>,

    /// The legacy plain-SMTP server that receives the mail.
    // An Option only so that `postern check relay-out` can do without it: clap still
    // requires it for serve and check.
    #[arg(
        long,
        env = "POSTERN_BACKEND",
        value_name = "HOST:PORT",
        required = true
    )]
    pub backend: Option<String>,

    /// PEM certificate chain, server certificate first, then its intermediates. Repeat
    /// --cert and --key in pairs for several names: each client gets the pair whose
    /// certificate names its SNI, else the first pair.
    #[arg(
        long,
        env = "POSTERN_CERT",
        value_delimiter = ',',
        value_name = "PATH",
        default_value = "/etc/postern/tls.crt"
    )]
    pub cert: Vec<PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1; RSA of 2048 bits or more, ECDSA or
    /// Ed25519) of the --cert in the same position.
    #[arg(
        long,
        env = "POSTERN_KEY",
        value_delimiter = ',',
        value_name = "PATH",
        default_value = "/etc/postern/tls.key"
    )]
    pub key: Vec<PathBuf>,

    // --- The credential source: exactly one (src/auth/source.rs) ---
    /// Credentials file, Dovecot passwd-file style: `user:{SCHEME}data[:ignored...]`
    /// [default: /etc/postern/users when no other source is given].
    #[arg(long, env = "POSTERN_USERS", value_name = "PATH")]
    pub users: Option<PathBuf>,

    /// Check credentials with Dovecot's auth service, as Postfix does with
    /// smtpd_sasl_type = dovecot: `unix:PATH` or `inet:HOST:PORT`. EHLO offers the
    /// mechanisms Dovecot lists as usable over TLS, SCRAM included.
    #[arg(
        long,
        env = "POSTERN_DOVECOT_AUTH",
        value_name = "unix:PATH|inet:HOST:PORT"
    )]
    pub dovecot_auth: Option<crate::auth::dovecot::Target>,

    /// Check credentials with a bind to this LDAP or Active Directory server:
    /// `ldap://HOST[:PORT]` or `ldaps://HOST[:PORT]`. Needs --ldap-user-dn, or
    /// --ldap-search-base with --ldap-bind-dn and --ldap-bind-password-file.
    #[arg(long, env = "POSTERN_LDAP_URL", value_name = "URL")]
    pub ldap_url: Option<String>,

    /// Direct bind: the user's DN, `%u` standing for the escaped user name (RFC 4514),
    /// e.g. `uid=%u,ou=people,dc=example,dc=com`.
    #[arg(long, env = "POSTERN_LDAP_USER_DN", value_name = "TEMPLATE")]
    pub ldap_user_dn: Option<String>,

    /// Search, then bind: where to look for the user's entry.
    #[arg(long, env = "POSTERN_LDAP_SEARCH_BASE", value_name = "DN")]
    pub ldap_search_base: Option<String>,

    /// The search filter, `%u` standing for the escaped user name (RFC 4515) [default:
    /// (uid=%u); Active Directory: (sAMAccountName=%u)].
    #[arg(long, env = "POSTERN_LDAP_SEARCH_FILTER", value_name = "FILTER")]
    pub ldap_search_filter: Option<String>,

    /// The service account the search binds as.
    #[arg(long, env = "POSTERN_LDAP_BIND_DN", value_name = "DN")]
    pub ldap_bind_dn: Option<String>,

    /// A file holding the service account's password (one line).
    #[arg(long, env = "POSTERN_LDAP_BIND_PASSWORD_FILE", value_name = "PATH")]
    pub ldap_bind_password_file: Option<PathBuf>,

    /// Upgrade an `ldap://` connection with StartTLS before anything is sent.
    #[arg(long, env = "POSTERN_LDAP_STARTTLS", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub ldap_starttls: bool,

    /// PEM CA certificates to verify the directory with, instead of the system's.
    #[arg(long, env = "POSTERN_LDAP_CA", value_name = "PATH")]
    pub ldap_ca: Option<PathBuf>,

    /// The most one LDAP verification may take, from waiting for a connection to the
    /// bind's answer; past it the client gets 454 4.7.0.
    #[arg(long, env = "POSTERN_LDAP_TIMEOUT", value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub ldap_timeout: Duration,

    /// LDAP verifications talking to the directory at once.
    #[arg(long, env = "POSTERN_LDAP_POOL_SIZE", value_name = "N", default_value_t = crate::auth::ldap::DEFAULT_POOL_SIZE)]
    pub ldap_pool_size: usize,

    /// Ask this nginx mail `auth_http` server, unchanged: the same request headers as
    /// nginx sends for SMTP, and its `Auth-Status`, `Auth-Wait`, `Auth-Server`/`Auth-Port`
    /// answers (a backend it names must be in --backend-allow).
    #[arg(long, env = "POSTERN_AUTH_HTTP", value_name = "URL")]
    pub auth_http: Option<String>,

    /// The most a request to Dovecot or the auth_http server may take; past it the
    /// client gets 454 4.7.0.
    #[arg(long, env = "POSTERN_AUTH_SOURCE_TIMEOUT", value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub auth_source_timeout: Duration,

    /// Reuse a successful login for this long without asking the source again (keyed by
    /// the user and a salted hash of the password; dropped on reload) [default: off].
    #[arg(long, env = "POSTERN_AUTH_CACHE_TTL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub auth_cache_ttl: Option<Duration>,

    /// Backends a credential source may send a session to (auth_http's Auth-Server and
    /// Auth-Port): addresses or networks, repeatable or comma-separated. A session sent
    /// anywhere else gets 454 4.7.0.
    #[arg(long, env = "POSTERN_BACKEND_ALLOW", value_delimiter = ',', value_name = "ADDR|CIDR", value_parser = parse_net)]
    pub backend_allow: Vec<ipnet::IpNet>,
    // --- end credential source ---
    /// Name used in the greeting and the EHLO reply; a certificate should cover it
    /// (`postern check` warns if none does) [default: the machine's host name].
    #[arg(long, env = "POSTERN_HOSTNAME", value_name = "NAME")]
    pub hostname: Option<String>,

    /// How long a TLS handshake may take.
    #[arg(long, env = "POSTERN_TLS_HANDSHAKE_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// How long a new client may take to send its first command.
    #[arg(long, env = "POSTERN_FIRST_COMMAND_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub first_command_timeout: Duration,

    /// How long to wait for each command before AUTH (RFC 5321 §4.5.3.2 suggests 5 minutes).
    #[arg(long, env = "POSTERN_COMMAND_TIMEOUT", value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub command_timeout: Duration,

    /// Budget for reaching the backend after AUTH: connect, greeting and EHLO reply.
    #[arg(long, env = "POSTERN_BACKEND_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub backend_timeout: Duration,

    /// Close a relayed session when neither side sent a byte for this long.
    #[arg(long, env = "POSTERN_RELAY_IDLE_TIMEOUT", value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub relay_idle_timeout: Duration,

    /// How often the backend's capabilities are probed with EHLO.
    #[arg(long, env = "POSTERN_PROBE_INTERVAL", value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub probe_interval: Duration,

    /// Tell the backend the real client with XCLIENT (address, port, HELO, login) when its
    /// EHLO offers XCLIENT (Postfix: smtpd_authorized_xclient_hosts). Without
    /// --backend-proxy-protocol, an anonymous MX session whose backend does not offer
    /// XCLIENT ADDR gets 451 4.3.0 at MAIL instead of being relayed.
    #[arg(long, env = "POSTERN_XCLIENT", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub xclient: bool,

    /// Send a PROXY protocol header with the real client address on every backend
    /// connection, probes included (Postfix: smtpd_upstream_proxy_protocol = haproxy).
    #[arg(
        long,
        env = "POSTERN_BACKEND_PROXY_PROTOCOL",
        value_enum,
        value_name = "VERSION"
    )]
    pub backend_proxy_protocol: Option<crate::proxy_proto::Version>,

    /// Let --listen-mx run without --xclient or --backend-proxy-protocol. The backend then
    /// sees every anonymous MX client as postern's own address: if it trusts that address
    /// (Postfix mynetworks, loopback), it relays mail from anyone to anywhere.
    #[arg(long, env = "POSTERN_ALLOW_MX_OPEN_RELAY", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub allow_mx_open_relay: bool,

    /// Expect a PROXY protocol v1 or v2 header first on every client connection (behind
    /// a load balancer). Requires --proxy-protocol-from.
    #[arg(long, env = "POSTERN_PROXY_PROTOCOL", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub proxy_protocol: bool,

    /// Networks allowed to send a PROXY header (CIDR, repeatable or comma-separated);
    /// connections from anywhere else are closed.
    #[arg(
        long,
        env = "POSTERN_PROXY_PROTOCOL_FROM",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub proxy_protocol_from: Vec<ipnet::IpNet>,

    /// Serve GET /metrics (Prometheus), /healthz and /readyz on this address [default: disabled].
    #[arg(long, env = "POSTERN_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// On SIGTERM/SIGINT, how long relayed sessions may run before they are closed.
    #[arg(long, env = "POSTERN_SHUTDOWN_GRACE", value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Most client connections open at once, across all listeners; more get `421 4.7.0`.
    #[arg(long, env = "POSTERN_MAX_CONNECTIONS", value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Most connections open at once from one client IPv4 address or IPv6 network
    /// (--ipv6-prefix).
    #[arg(long, env = "POSTERN_MAX_CONNECTIONS_PER_IP", value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_ip: u32,

    /// Prefix length at which IPv6 clients count as one network for every per-IP limit
    /// (connections, AUTH failures, verifications): one subscriber usually holds a whole
    /// /64.
    #[arg(long, env = "POSTERN_IPV6_PREFIX", value_name = "N", default_value_t = crate::limits::DEFAULT_IPV6_PREFIX, value_parser = clap::value_parser!(u8).range(1..=128))]
    pub ipv6_prefix: u8,

    /// Shorter IPv6 prefix (one site's allocation) whose open connections and AUTH
    /// failures are capped together (--max-connections-per-wide-prefix,
    /// --max-auth-failures-per-wide-prefix), and from which a user name over
    /// --max-auth-failures-per-user is refused once any of its networks failed it, so a
    /// client cannot escape these limits by walking through the /64s of its /48. Must
    /// not be longer than --ipv6-prefix.
    #[arg(long, env = "POSTERN_IPV6_PREFIX_WIDE", value_name = "N", default_value_t = crate::limits::DEFAULT_IPV6_PREFIX_WIDE, value_parser = clap::value_parser!(u8).range(1..=128))]
    pub ipv6_prefix_wide: u8,

    /// Most connections open at once from one IPv6 --ipv6-prefix-wide network; more get
    /// `421 4.7.0` [default: 4 × --max-connections-per-ip].
    #[arg(long, env = "POSTERN_MAX_CONNECTIONS_PER_WIDE_PREFIX", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_wide_prefix: Option<u32>,

    /// Error replies after which a session is closed with 421 4.7.0.
    #[arg(long, env = "POSTERN_MAX_ERRORS", value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_errors: u32,

    /// Failed AUTH attempts per connection before it is closed with 421 4.7.0.
    #[arg(long, env = "POSTERN_MAX_AUTH_FAILURES", value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_auth_failures: u32,

    /// Delay before answering a failed AUTH, multiplied by the connection's failure count.
    #[arg(long, env = "POSTERN_AUTH_FAILURE_DELAY", value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub auth_failure_delay: Duration,

    /// Failed AUTH attempts from one client IP (or IPv6 --ipv6-prefix network) per --auth-failure-window
    /// after which its attempts get 454 4.7.0 without any password being checked, except a
    /// user's who logged in from it within the window. An attempt counts from before its
    /// hash is computed, so a parallel burst cannot pass it.
    #[arg(long, env = "POSTERN_MAX_AUTH_FAILURES_PER_IP", value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_auth_failures_per_ip: u32,

    /// Failed AUTH attempts from one IPv6 --ipv6-prefix-wide network per
    /// --auth-failure-window after which its attempts get 454 4.7.0, so a client cannot
    /// escape --max-auth-failures-per-ip by walking through the /64s of its /48
    /// [default: 4 × --max-auth-failures-per-ip].
    #[arg(long, env = "POSTERN_MAX_AUTH_FAILURES_PER_WIDE_PREFIX", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_auth_failures_per_wide_prefix: Option<u32>,

    /// Failed AUTH attempts for one user name per --auth-failure-window after which the
    /// name is slowed down (--auth-failure-delay, doubling per further failure, at most
    /// 15s) and attempts for it get 454 4.7.0 from the networks that failed it (for IPv6,
    /// from their whole --ipv6-prefix-wide site); a network that logged in as that user
    /// within the window is not refused while its own failures for the name stay below N.
    #[arg(long, env = "POSTERN_MAX_AUTH_FAILURES_PER_USER", value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_auth_failures_per_user: u32,

    /// The sliding window of the per-IP and per-user AUTH failure limits.
    #[arg(long, env = "POSTERN_AUTH_FAILURE_WINDOW", value_name = "DURATION", default_value = "15m", value_parser = humantime::parse_duration)]
    pub auth_failure_window: Duration,

    // --- After AUTH: the relay tracker (src/relay.rs, src/quota.rs) ---
    /// Messages one user may send per sliding window, e.g. `100/1h`; the MAIL that
    /// would cross it gets 451 4.7.1 [default: unlimited].
    #[arg(long, env = "POSTERN_MAX_MESSAGES_PER_USER", value_name = "RATE", value_parser = crate::quota::Rate::parse)]
    pub max_messages_per_user: Option<crate::quota::Rate>,

    /// Recipients one user may address per sliding window, e.g. `1000/1h`; the RCPT that
    /// would cross it gets 451 4.7.1 [default: unlimited].
    #[arg(long, env = "POSTERN_MAX_RECIPIENTS_PER_USER", value_name = "RATE", value_parser = crate::quota::Rate::parse)]
    pub max_recipients_per_user: Option<crate::quota::Rate>,

    /// Recipients one message may have; the RCPT past it gets 451 4.7.1 [default: unlimited].
    #[arg(long, env = "POSTERN_MAX_RECIPIENTS_PER_MESSAGE", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_recipients_per_message: Option<u32>,

    /// Where the per-user sending counters and the AUTH failure windows live: `memory`
    /// (this process), or a `redis://` URL (Redis or Valkey) so that several replicas share
    /// one limit and one failure budget.
    #[arg(
        long,
        env = "POSTERN_LIMITS_STORE",
        value_name = "memory|URL",
        default_value = "memory"
    )]
    pub limits_store: String,

    /// When the limits store does not answer: `open` lets mail through uncounted and
    /// applies each replica's own AUTH failure windows, `closed` answers MAIL with 451
    /// 4.3.0 and AUTH with 454 4.7.0 until it is back.
    #[arg(long, env = "POSTERN_LIMITS_STORE_FAILURE", value_enum, default_value_t = crate::store::StoreFailure::Open)]
    pub limits_store_failure: crate::store::StoreFailure,

    /// How long one limits store call may take before it counts as a failure.
    #[arg(long, env = "POSTERN_LIMITS_STORE_TIMEOUT", value_name = "DURATION", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub limits_store_timeout: Duration,

    /// Refuse a DATA body containing a bare CR or LF (SMTP smuggling through a lenient
    /// backend) with 550 5.6.0; the backend connection is closed before the final dot.
    #[arg(long, env = "POSTERN_STRICT_DATA")]
    pub strict_data: bool,

    /// Hide the backend's CHUNKING from clients, so BDAT is never relayed. For a backend
    /// whose BDAT framing cannot be trusted (see the README's "Choosing what to relay").
    #[arg(long, env = "POSTERN_HIDE_CHUNKING")]
    pub hide_chunking: bool,
    // --- end relay tracker ---

    // --- Abuse defences before AUTH (src/limits.rs, src/session.rs) ---
    /// Total time from connect to a successful AUTH (an MX session: to its first MAIL);
    /// a session still without it gets 421 4.7.0 and is closed.
    #[arg(long, env = "POSTERN_AUTH_DEADLINE", value_name = "DURATION", default_value = "2m", value_parser = humantime::parse_duration)]
    pub auth_deadline: Duration,

    /// NOOP, RSET, EHLO/HELO, HELP, VRFY and unknown commands a session may send before
    /// AUTH (as Postfix's smtpd_junk_command_limit); one more gets 421 4.7.0 and the
    /// connection is closed.
    #[arg(long, env = "POSTERN_MAX_JUNK_COMMANDS", value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_junk_commands: u32,

    /// Password verifications one client network (IP or IPv6 --ipv6-prefix) may have
    /// running or queued at once; further attempts get 454 4.7.0 without a check, so a
    /// flood from one network leaves the rest of the verifier pool to everyone else (one
    /// network never runs on every verifier at once). When every verifier is busy,
    /// waiting attempts are served quietest network first.
    #[arg(long, env = "POSTERN_MAX_VERIFICATIONS_PER_NETWORK", value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_verifications_per_network: u32,

    /// SASL mechanisms EHLO offers, comma-separated from PLAIN, LOGIN, CRAM-MD5 [default:
    /// PLAIN,LOGIN, and CRAM-MD5 too when every user has a {PLAIN} secret, since CRAM-MD5
    /// needs the cleartext].
    #[arg(long, env = "POSTERN_AUTH_MECHANISMS", value_name = "LIST", value_delimiter = ',', value_parser = parse_mechanism)]
    pub auth_mechanisms: Vec<crate::sasl::Mechanism>,
    // --- end abuse defences ---
    /// Log format.
    #[arg(long, env = "POSTERN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log level (error, warn, info, debug, trace); RUST_LOG, if set, takes precedence.
    #[arg(
        long,
        env = "POSTERN_LOG_LEVEL",
        value_name = "LEVEL",
        default_value = "info"
    )]
    pub log_level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct HashPasswordArgs {
    /// Hash scheme of the printed line.
    #[arg(long, value_enum, default_value_t = crate::users::HashScheme::Argon2id)]
    pub scheme: crate::users::HashScheme,
}

/// A `--backend-allow` entry: a network, or one address.
fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{text:?}: expected an IP address or a network (CIDR)"))
}

/// A `--auth-mechanisms` entry: a mechanism postern knows, in any case (whether the
/// credential source can verify it is checked with the source).
fn parse_mechanism(name: &str) -> Result<crate::sasl::Mechanism, String> {
    crate::sasl::Mechanism::parse(name.trim()).ok_or_else(|| {
        format!("{name:?}: expected PLAIN, LOGIN, CRAM-MD5, SCRAM-SHA-1 or SCRAM-SHA-256")
    })
}

/// Flags of `postern demo`. Unlike `serve`, none is read from the environment: a
/// `POSTERN_*` variable meant for a real deployment must not redirect the demo.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// STARTTLS submission listener (loopback only).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:2587")]
    pub listen: SocketAddr,

    /// Implicit-TLS listener (loopback only).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:2465")]
    pub listen_tls: SocketAddr,

    /// Metrics, /healthz and /readyz endpoint (loopback only).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9587")]
    pub metrics_listen: SocketAddr,

    /// Where the built-in stand-in backend listens (loopback only). The default port 0 picks
    /// a free one, so a local MTA on 2525 or 25 never gets in the way.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub sink: SocketAddr,

    /// Relay to this real SMTP server instead of the built-in stand-in.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "sink")]
    pub backend: Option<String>,

    /// Log level of the proxy's log on stderr (error, warn, info, debug, trace).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,
}
