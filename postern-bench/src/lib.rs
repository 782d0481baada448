//! `postern-bench`: a load generator for SMTP submission servers, postern or any other.
//!
//! Each connection does the whole client side of a submission session: greeting, EHLO,
//! STARTTLS (RFC 3207) or implicit TLS (RFC 8314), EHLO again, AUTH (RFC 4954), then
//! `--messages-per-conn` transactions of MAIL, RCPT and DATA with a dot-stuffed CRLF
//! message (RFC 5321), then QUIT. `-c` connections run at once for `-d` seconds, and the
//! run ends with sessions/s, messages/s, MB/s, latency percentiles and errors by stage.
//! `--idle N` instead opens N authenticated sessions and holds them, to measure a
//! server's memory per session.
//!
//! It lives in its own crate so that the proxy's binary carries no load generator, and
//! it speaks SMTP through the proxy's library rather than copies: replies are read by
//! `postern::smtp::reply`, EHLO keywords matched by `postern::smtp::Capabilities`, and
//! the AUTH messages written by `postern::sasl::client`.
//!
//! # Layout
//!
//! - `client`: one session, stage by stage, with the stage of any failure.
//! - `message`: the test message, built and dot-stuffed once.
//! - `tls`: the rustls client configuration (`--ca` or `--insecure`).
//! - [`floor`]: the crypto floor, the TLS server work alone per CPU-second, in memory
//!   (the `postern-bench-floor` binary).
//! - `report`: tallies, progress counters, the human and JSON summaries.
//! - the `postern-bench` binary (`main.rs`) parses [`BenchArgs`] and calls [`run`]; the
//!   `postern-bench-sink` binary is the discard backend `benches/compare.sh` puts behind
//!   the proxies.

mod client;
pub mod floor;
mod message;
mod report;
mod tls;

use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use postern::sasl::Mechanism;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

use client::{Account, Script, Session};
use report::{Live, Percentiles, Summary, Tally, micros};

/// Errors at the edges of the command (arguments, files, the target address).
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// After a failed session, a worker waits this long before the next attempt, so a dead
/// target costs a few hundred connects per second instead of a spinning core.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Once the run's time is up, sessions in flight get this long to QUIT before they are
/// abandoned; what they do after the deadline is not counted either way.
const DRAIN: Duration = Duration::from_secs(5);

/// How often the progress line is refreshed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// How TLS starts on the target port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Plain connection upgraded with STARTTLS (submission, port 587).
    Starttls,
    /// TLS from the first byte (submissions, port 465).
    Tls,
    /// No TLS at all (a backend, or a test server).
    Plain,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Starttls => "starttls",
            Mode::Tls => "tls",
            Mode::Plain => "plain",
        }
    }
}

/// The `--mechanism` values: postern's own mechanisms, by their lower-case names (clap
/// lists them in `--help`, so they are spelled out; a test checks them against
/// [`Mechanism::ALL`]).
const MECHANISMS: [&str; 3] = ["plain", "login", "cram-md5"];

fn mechanism_parser() -> impl clap::builder::TypedValueParser<Value = Mechanism> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(MECHANISMS)
        .try_map(|name| Mechanism::parse(&name).ok_or("unknown SASL mechanism"))
}

/// The command line of `postern-bench`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "postern-bench",
    version,
    about = "Load-test an SMTP submission server (postern or any other)"
)]
pub struct BenchArgs {
    /// Server to load, HOST:PORT. Only test servers you run or are allowed to test.
    #[arg(long, value_name = "HOST:PORT")]
    pub target: String,

    /// How TLS starts: STARTTLS, implicit TLS, or none.
    #[arg(long, value_enum, default_value_t = Mode::Starttls)]
    pub mode: Mode,

    /// AUTH credentials; without them no AUTH is sent. Prefer the environment variable:
    /// the command line is visible to other users in `ps`.
    #[arg(
        long,
        env = "POSTERN_BENCH_AUTH",
        value_name = "USER:PASS",
        hide_env_values = true
    )]
    pub auth: Option<String>,

    /// SASL mechanism for AUTH.
    #[arg(long, default_value = "plain", value_parser = mechanism_parser())]
    pub mechanism: Mechanism,

    /// Connections running at once (with --idle: handshakes in flight at once).
    #[arg(short = 'c', long, default_value_t = 1, value_name = "N")]
    pub concurrency: usize,

    /// Length of the run in seconds (with --idle: how long to hold the sessions).
    #[arg(short = 'd', long, default_value_t = 10.0, value_name = "SECS")]
    pub duration: f64,

    /// Connect from this local address (an attack from another network than the
    /// legitimate load, both on loopback: 127.0.0.2).
    #[arg(long, value_name = "IP")]
    pub source: Option<std::net::IpAddr>,

    /// Stop after this many sessions, even if time is left.
    #[arg(long, value_name = "N")]
    pub sessions: Option<u64>,

    /// Message size in bytes before dot-stuffing (headers included).
    #[arg(long, default_value_t = 1024, value_name = "BYTES")]
    pub size: usize,

    /// Messages per session; 0 sends back to back until the time is up.
    #[arg(long, default_value_t = 1, value_name = "M")]
    pub messages_per_conn: u64,

    /// Accept any server certificate (self-signed test setups).
    #[arg(long, conflicts_with = "ca")]
    pub insecure: bool,

    /// PEM file of CA certificates to verify the server with.
    #[arg(long, value_name = "PATH")]
    pub ca: Option<PathBuf>,

    /// Name to verify the certificate against (and send as SNI) [default: the host of
    /// --target].
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,

    /// Allow TLS session resumption (off: every handshake is a full one).
    #[arg(long)]
    pub tls_resumption: bool,

    /// Open N authenticated sessions, hold them for -d seconds, then QUIT.
    #[arg(long, value_name = "N")]
    pub idle: Option<u64>,

    /// Print the summary as JSON on stdout (the human line goes to stderr).
    #[arg(long)]
    pub json: bool,

    /// No progress line.
    #[arg(short, long)]
    pub quiet: bool,

    /// Reverse-path for MAIL FROM.
    #[arg(long, default_value = "bench@example.test", value_name = "ADDR")]
    pub mail_from: String,

    /// Forward-path for RCPT TO.
    #[arg(long, default_value = "sink@example.test", value_name = "ADDR")]
    pub rcpt_to: String,

    /// Domain sent in EHLO.
    #[arg(long, default_value = "bench.example.test", value_name = "DOMAIN")]
    pub ehlo: String,

    /// Limit for each step: connect, TLS handshake, each reply.
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// Write the exact bytes sent after each 354 (stuffed message and ".\r\n") to PATH,
    /// to compare with what arrives at the backend.
    #[arg(long, value_name = "PATH")]
    pub dump_message: Option<PathBuf>,
}

/// Runs the load: prints a progress line while running and the summary at the end.
///
/// Fails (after printing the summary) when every attempt failed.
pub async fn run(args: BenchArgs) -> Result<(), Error> {
    let script = Arc::new(script(&args)?);
    if let Some(path) = &args.dump_message {
        std::fs::write(path, &script.payload)
            .map_err(|e| format!("writing --dump-message {}: {e}", path.display()))?;
    }
    let cpu_before = report::process_cpu();
    let summary = match args.idle {
        Some(n) => run_idle(&args, script, n).await,
        None => run_load(&args, script).await,
    };
    let client_cpu = match (cpu_before, report::process_cpu()) {
        (Some(a), Some(b)) => b.checked_sub(a),
        _ => None,
    };
    let summary = Summary {
        client_cpu,
        ..summary
    };
    if args.json {
        eprintln!("{}", summary.human());
        println!("{}", summary.json());
    } else {
        println!("{}", summary.human());
    }
    // A run where every attempt failed measured nothing: say so in the exit status, so
    // scripts don't take a dead target or a wrong password for a result.
    let t = &summary.tally;
    let nothing = match summary.idle_established {
        Some(n) => n == 0,
        None => t.sessions == 0 && t.messages == 0,
    };
    let errors: u64 = t.errors.iter().sum();
    if nothing && errors > 0 {
        return Err(format!("nothing succeeded ({errors} errors)").into());
    }
    Ok(())
}

/// Validates the arguments and prepares everything sessions share.
fn script(args: &BenchArgs) -> Result<Script, Error> {
    if args.concurrency == 0 {
        return Err("-c must be at least 1".into());
    }
    if !(args.duration.is_finite() && args.duration > 0.0) {
        return Err("-d must be a positive number of seconds".into());
    }
    let addr = resolve(&args.target)?;
    let tls = match args.mode {
        Mode::Plain => None,
        Mode::Starttls | Mode::Tls => {
            let trust = match (&args.ca, args.insecure) {
                (Some(path), _) => tls::Trust::CaFile(path),
                (None, true) => tls::Trust::Insecure,
                (None, false) => {
                    return Err("TLS needs --ca PATH (a PEM CA bundle, e.g. the system's) \
                                or --insecure"
                        .into());
                }
            };
            let config = tls::client_config(trust, args.tls_resumption)?;
            let host = match &args.server_name {
                Some(name) => name.clone(),
                None => host_of(&args.target).to_owned(),
            };
            let name = ServerName::try_from(host.clone())
                .map_err(|e| format!("server name {host:?}: {e}"))?;
            Some((TlsConnector::from(config), name))
        }
    };
    let auth = match &args.auth {
        None => None,
        Some(pair) => {
            let (user, password) = pair.split_once(':').ok_or("--auth must be USER:PASS")?;
            Some(Account {
                mechanism: args.mechanism,
                user: user.to_owned(),
                password: password.to_owned(),
            })
        }
    };
    for (flag, value) in [
        ("--mail-from", &args.mail_from),
        ("--rcpt-to", &args.rcpt_to),
        ("--ehlo", &args.ehlo),
    ] {
        // These go into command lines verbatim: no line breaks, no brackets to confuse paths.
        if value.is_empty() || value.contains(['\r', '\n', '<', '>', ' ']) {
            return Err(format!("{flag} {value:?}: not a usable address or domain").into());
        }
    }
    let body = message::build(args.size, &args.mail_from, &args.rcpt_to);
    Ok(Script {
        addr,
        source: args.source,
        mode: args.mode,
        tls,
        auth,
        ehlo: format!("EHLO {}\r\n", args.ehlo).into_bytes(),
        mail: format!("MAIL FROM:<{}>\r\n", args.mail_from).into_bytes(),
        rcpt: format!("RCPT TO:<{}>\r\n", args.rcpt_to).into_bytes(),
        message_size: body.len() as u64,
        payload: message::stuff(&body),
        timeout: args.timeout,
        negotiated: std::sync::OnceLock::new(),
    })
}

/// Resolves the target once, so that DNS is not part of what is measured.
fn resolve(target: &str) -> Result<SocketAddr, Error> {
    target
        .to_socket_addrs()
        .map_err(|e| format!("--target {target}: {e}"))?
        .next()
        .ok_or_else(|| format!("--target {target}: no address").into())
}

/// The host part of HOST:PORT, without brackets for IPv6 literals.
fn host_of(target: &str) -> &str {
    let host = target.rsplit_once(':').map_or(target, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// What the workers of one run share.
struct Shared {
    script: Arc<Script>,
    live: Live,
    /// Set when the run's time is up (or on Ctrl-C): no new sessions or messages.
    stop: AtomicBool,
    /// Sessions still allowed to start (`--sessions`), `u64::MAX` if unbounded.
    budget: AtomicU64,
    /// Results completed after this instant are not counted.
    deadline: Instant,
    messages_per_conn: u64,
}

impl Shared {
    fn counts(&self) -> bool {
        Instant::now() <= self.deadline
    }

    fn take_session(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
            && self
                .budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
    }

    fn fail(&self, tally: &mut Tally, failure: client::Failure) {
        // Failures while draining are the harness cutting sessions short, not the server.
        if self.counts() {
            Live::add(&self.live.errors, 1);
            tally.error(failure);
        }
    }
}

/// The load run: `-c` workers, each running sessions back to back.
async fn run_load(args: &BenchArgs, script: Arc<Script>) -> Summary {
    let start = Instant::now();
    let duration = Duration::from_secs_f64(args.duration);
    let shared = Arc::new(Shared {
        script,
        live: Live::default(),
        stop: AtomicBool::new(false),
        budget: AtomicU64::new(args.sessions.unwrap_or(u64::MAX)),
        deadline: start + duration,
        messages_per_conn: args.messages_per_conn,
    });
    let mut workers = JoinSet::new();
    for _ in 0..args.concurrency {
        workers.spawn(worker(shared.clone()));
    }

    let progress = (!args.quiet).then(|| tokio::spawn(progress(shared.clone(), start, false)));
    // The run ends at the deadline, on Ctrl-C, or when --sessions is used up.
    let all_done = async {
        let mut total = Tally::default();
        while let Some(res) = workers.join_next().await {
            if let Ok(t) = res {
                total.merge(t);
            }
        }
        total
    };
    tokio::pin!(all_done);
    let mut total = tokio::select! {
        t = &mut all_done => Some(t),
        _ = tokio::time::sleep_until(shared.deadline) => None,
        _ = tokio::signal::ctrl_c() => None,
    };
    let end = Instant::now().min(shared.deadline);
    shared.stop.store(true, Ordering::Relaxed);
    if total.is_none() {
        total = tokio::time::timeout(DRAIN, &mut all_done).await.ok();
    }
    if let Some(p) = progress {
        p.abort();
        clear_progress();
    }
    summarize(
        args,
        &shared.script,
        total.unwrap_or_default(),
        end - start,
        None,
    )
}

/// One connection slot: sessions back to back until the run stops.
async fn worker(shared: Arc<Shared>) -> Tally {
    let script = &shared.script;
    let mut tally = Tally::default();
    'sessions: while shared.take_session() {
        let started = Instant::now();
        let mut session = match Session::open(script).await {
            Ok(s) => s,
            Err(f) => {
                shared.fail(&mut tally, f);
                tokio::time::sleep(ERROR_BACKOFF).await;
                continue;
            }
        };
        if shared.counts() {
            tally.handshake_us.push(micros(started.elapsed()));
        }
        let mut sent = 0;
        while shared.messages_per_conn == 0 || sent < shared.messages_per_conn {
            if shared.stop.load(Ordering::Relaxed) {
                break;
            }
            let t0 = Instant::now();
            if let Err(f) = session.send_message(script).await {
                shared.fail(&mut tally, f);
                tokio::time::sleep(ERROR_BACKOFF).await;
                continue 'sessions;
            }
            sent += 1;
            if shared.counts() {
                tally.message_us.push(micros(t0.elapsed()));
                tally.messages += 1;
                tally.bytes += script.message_size;
                Live::add(&shared.live.messages, 1);
                Live::add(&shared.live.bytes, script.message_size);
            }
        }
        let complete = shared.messages_per_conn == 0 || sent == shared.messages_per_conn;
        match session.quit(script).await {
            Ok(()) if complete && shared.counts() => {
                tally.sessions += 1;
                Live::add(&shared.live.sessions, 1);
            }
            Ok(()) => {}
            Err(f) => shared.fail(&mut tally, f),
        }
    }
    tally
}

/// The idle run: open `n` sessions (at most `-c` handshakes at once), hold them all for
/// `-d` seconds, then QUIT them.
async fn run_idle(args: &BenchArgs, script: Arc<Script>, n: u64) -> Summary {
    let start = Instant::now();
    let shared = Arc::new(Shared {
        script,
        live: Live::default(),
        stop: AtomicBool::new(false),
        budget: AtomicU64::new(n),
        // Nothing is cut short by time in idle mode, so everything counts.
        deadline: start + Duration::from_secs(u64::from(u32::MAX)),
        messages_per_conn: 0,
    });
    let gate = Arc::new(Semaphore::new(args.concurrency));
    let (release_tx, release_rx) = watch::channel(false);
    let mut sessions = JoinSet::new();
    for _ in 0..n {
        let (shared, gate, mut release) = (shared.clone(), gate.clone(), release_rx.clone());
        sessions.spawn(async move {
            let mut tally = Tally::default();
            let session = {
                let Ok(_permit) = gate.acquire().await else {
                    return tally;
                };
                let t0 = Instant::now();
                match Session::open(&shared.script).await {
                    Ok(s) => {
                        tally.handshake_us.push(micros(t0.elapsed()));
                        s
                    }
                    Err(f) => {
                        shared.fail(&mut tally, f);
                        return tally;
                    }
                }
            };
            Live::add(&shared.live.established, 1);
            // Hold the session until released; a closed channel means release as well.
            let _ = release.wait_for(|go| *go).await;
            match session.quit(&shared.script).await {
                Ok(()) => tally.sessions += 1,
                Err(f) => shared.fail(&mut tally, f),
            }
            Live::add(&shared.live.sessions, 1);
            tally
        });
    }

    let progress = (!args.quiet).then(|| tokio::spawn(progress(shared.clone(), start, true)));
    // Wait for every session to be either established or failed.
    let interrupted = loop {
        let [_, _, _, errors, established] = shared.live.snapshot();
        if established + errors >= n {
            break false;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = tokio::signal::ctrl_c() => break true,
        }
    };
    let established = shared.live.established.load(Ordering::Relaxed);
    if let Some(p) = progress {
        p.abort();
        clear_progress();
    }
    if !interrupted {
        // compare.sh waits for this line before it measures memory: keep its wording.
        eprintln!(
            "idle: {established} sessions established, {} failed; holding for {:.1} s",
            n - established,
            args.duration
        );
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs_f64(args.duration)) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    let _ = release_tx.send(true);
    let mut total = Tally::default();
    let _ = tokio::time::timeout(DRAIN + args.timeout, async {
        while let Some(res) = sessions.join_next().await {
            if let Ok(t) = res {
                total.merge(t);
            }
        }
    })
    .await;
    summarize(
        args,
        &shared.script,
        total,
        start.elapsed(),
        Some(established),
    )
}

fn summarize(
    args: &BenchArgs,
    script: &Script,
    mut tally: Tally,
    elapsed: Duration,
    idle_established: Option<u64>,
) -> Summary {
    let handshake = Percentiles::of(&mut tally.handshake_us);
    let message = Percentiles::of(&mut tally.message_us);
    Summary {
        target: args.target.clone(),
        mode: script.mode.name(),
        concurrency: args.concurrency,
        message_size: script.message_size,
        messages_per_conn: args.messages_per_conn,
        elapsed,
        tally,
        handshake,
        message,
        idle_established,
        client_cpu: None,
        tls: script.negotiated.get().cloned(),
    }
}

/// Prints a progress line every second: on a terminal it rewrites one line, elsewhere
/// (logs, CI) it prints one line per second.
async fn progress(shared: Arc<Shared>, start: Instant, idle: bool) {
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval_at(start + PROGRESS_EVERY, PROGRESS_EVERY);
    let mut prev = [0u64; 5];
    loop {
        let now = tick.tick().await;
        let cur = shared.live.snapshot();
        let secs = PROGRESS_EVERY.as_secs_f64();
        let line = if idle {
            format!(
                "{:6.1}s  established {}  failed {}",
                (now - start).as_secs_f64(),
                cur[4],
                cur[3]
            )
        } else {
            format!(
                "{:6.1}s  sessions {} ({:.0}/s)  messages {} ({:.0}/s)  {:.1} MB/s  errors {}",
                (now - start).as_secs_f64(),
                cur[0],
                (cur[0] - prev[0]) as f64 / secs,
                cur[1],
                (cur[1] - prev[1]) as f64 / secs,
                (cur[2] - prev[2]) as f64 / secs / 1e6,
                cur[3],
            )
        };
        if tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
        prev = cur;
    }
}

/// Erases the rewritten progress line so the summary starts on a clean line.
fn clear_progress() {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mechanism_values_are_posterns_mechanisms() {
        let parsed: Vec<_> = MECHANISMS
            .iter()
            .filter_map(|m| Mechanism::parse(m))
            .collect();
        assert_eq!(parsed, Mechanism::ALL);
        for (name, mechanism) in [
            ("plain", Mechanism::Plain),
            ("cram-md5", Mechanism::CramMd5),
        ] {
            let args = <BenchArgs as clap::Parser>::try_parse_from([
                "postern-bench",
                "--target",
                "x:1",
                "--mechanism",
                name,
            ])
            .unwrap();
            assert_eq!(args.mechanism, mechanism);
        }
        let args =
            <BenchArgs as clap::Parser>::try_parse_from(["postern-bench", "--target", "x:1"]);
        assert_eq!(args.unwrap().mechanism, Mechanism::Plain);
        assert!(
            <BenchArgs as clap::Parser>::try_parse_from([
                "postern-bench",
                "--target",
                "x:1",
                "--mechanism",
                "gssapi"
            ])
            .is_err()
        );
    }

    #[test]
    fn host_of_target() {
        assert_eq!(host_of("mail.example:587"), "mail.example");
        assert_eq!(host_of("127.0.0.1:25"), "127.0.0.1");
        assert_eq!(host_of("[::1]:465"), "::1");
    }
}
