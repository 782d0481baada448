//! `postern demo`: the real proxy on loopback with a throw-away configuration, so that
//! someone new can send a mail through it in the first five minutes.
//!
//! Nothing is stubbed: the demo writes a self-signed certificate (rcgen) and a users file
//! with one `{PLAIN}` user into a private temporary directory, turns its choices into
//! `serve` flags, and runs the same [`server::run`] as `postern serve`. The only thing
//! added is the backend: unless `--backend` names a real server, [`sink`] stands in for
//! the legacy SMTP server and prints each mail it receives.
//!
//! Every address the demo binds must be loopback: it has a password printed on the
//! console and a certificate nobody should trust beyond this machine.

pub mod sink;

use std::io::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::pin::pin;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use clap::{Args as _, FromArgMatches as _};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::config::{DemoArgs, ServeArgs};
use crate::server::{self, Config, Listeners};
use crate::shutdown;
use crate::tls;

/// The demo user's name.
pub const USER: &str = "demo";

/// Sender and recipient used in the printed examples. `.test` is reserved (RFC 2606),
/// so a demo mail relayed to a real backend by mistake cannot reach anyone.
const EXAMPLE_FROM: &str = "demo@example.test";
const EXAMPLE_TO: &str = "you@example.test";

/// The certificate's subject, shown by TLS clients.
const CERT_COMMON_NAME: &str = "postern demo, self-signed, throw-away";

/// A short grace on Ctrl-C: a demo should stop promptly, but still show the drain.
const SHUTDOWN_GRACE: &str = "5s";

/// Password length and alphabet: 16 characters of 32 (80 bits), without look-alikes
/// (l/1, o/0) and without characters a shell or a command line would treat specially.
const PASSWORD_LEN: usize = 16;
const PASSWORD_ALPHABET: &[u8; 32] = b"abcdefghijkmnpqrstuvwxyz23456789";

/// Runs the demo until SIGINT or SIGTERM, then drains and removes its files.
pub async fn run(args: DemoArgs) -> Result<(), String> {
    check_loopback(&args)?;
    // Caught from the start, so a Ctrl-C while starting still removes the directory
    // (the default action would kill the process before `dir` is dropped).
    let mut early_interrupt = interrupt_signal()?;
    let stop = shutdown::os_signals()?;

    let dir = tempfile::Builder::new()
        .prefix("postern-demo-")
        .tempdir()
        .map_err(|e| format!("creating a temporary directory: {e}"))?;
    let files = Files::write(dir.path(), &args)?;

    let (backend, sink_task) = match &args.backend {
        Some(backend) => (backend.clone(), None),
        None => {
            let listener = TcpListener::bind(args.sink)
                .await
                .map_err(|e| format!("binding the demo sink on {}: {e}", args.sink))?;
            let addr = listener
                .local_addr()
                .map_err(|e| format!("demo sink address: {e}"))?;
            (
                addr.to_string(),
                Some(tokio::spawn(sink::serve(listener, "legacy-sink.test"))),
            )
        }
    };

    let config = serve_config(&args, &backend, &files)?;
    // Bound here, before the banner: a busy port is reported instead of a banner for a
    // demo that cannot start.
    let listeners = Listeners::bind(&config).await.map_err(|e| {
        format!("{e} (pick other ports with --listen, --listen-tls, --metrics-listen)")
    })?;
    let (ready_tx, ready_rx) = oneshot::channel();
    let mut proxy = pin!(server::run(config, listeners, stop, Some(ready_tx)));
    tokio::select! {
        result = &mut proxy => {
            return result.and(Err("the proxy stopped during start-up".into()));
        }
        ready = ready_rx => {
            print_banner(&args, &backend, &files, ready.is_ok_and(|r| r.backend_up));
        }
        _ = early_interrupt.recv() => {
            say("postern demo: interrupted while starting; nothing was sent\n");
            return Ok(());
        }
    }
    drop(early_interrupt);

    let result = proxy.await;
    if let Some(task) = sink_task {
        task.abort();
    }
    let path = dir.path().display().to_string();
    dir.close()
        .map_err(|e| format!("removing the demo directory {path}: {e}"))?;
    say(&format!("postern demo: stopped; removed {path}\n"));
    result
}

/// Refuses any non-loopback address, and port 0 on the addresses the banner tells
/// people to type (the proxy binds them itself, so the demo could not say which port).
fn check_loopback(args: &DemoArgs) -> Result<(), String> {
    let mut bound = vec![
        ("--listen", args.listen, false),
        ("--listen-tls", args.listen_tls, false),
        ("--metrics-listen", args.metrics_listen, false),
    ];
    if args.backend.is_none() {
        bound.push(("--sink", args.sink, true));
    }
    for (flag, addr, zero_ok) in bound {
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{flag} {addr}: the demo only binds loopback addresses (127.0.0.0/8 or [::1]); \
                 use `postern serve` for anything reachable from other machines"
            ));
        }
        if addr.port() == 0 && !zero_ok {
            return Err(format!(
                "{flag} {addr}: port 0 is not supported here, the demo prints the ports to use; \
                 pick a free port"
            ));
        }
    }
    Ok(())
}

/// The files the demo hands to the proxy, all inside its temporary directory.
struct Files {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    users: std::path::PathBuf,
    password: String,
}

impl Files {
    fn write(dir: &Path, args: &DemoArgs) -> Result<Files, String> {
        // The certificate names every address the banner tells people to connect to, so
        // clients can verify it against cert.pem instead of turning verification off.
        let mut names = vec!["localhost".to_owned()];
        for ip in [
            args.listen.ip(),
            args.listen_tls.ip(),
            IpAddr::from([127, 0, 0, 1]),
            IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        ] {
            if !names.contains(&ip.to_string()) {
                names.push(ip.to_string());
            }
        }
        let cert_error = |e: rcgen::Error| format!("making the demo certificate: {e}");
        let mut params = rcgen::CertificateParams::new(names).map_err(cert_error)?;
        // What `openssl s_client` and browsers show: say what this certificate is.
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, CERT_COMMON_NAME);
        let signing_key = rcgen::KeyPair::generate().map_err(cert_error)?;
        let cert = params.self_signed(&signing_key).map_err(cert_error)?;
        let password = random_password()?;
        let files = Files {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            users: dir.join("users"),
            password,
        };
        let write = |path: &Path, contents: &str| {
            std::fs::write(path, contents).map_err(|e| format!("writing {}: {e}", path.display()))
        };
        write(&files.cert, &cert.pem())?;
        write(&files.key, &signing_key.serialize_pem())?;
        write(
            &files.users,
            &format!("{USER}:{{PLAIN}}{}\n", files.password),
        )?;
        Ok(files)
    }
}

/// A fresh password from the TLS provider's CSPRNG. 32 symbols divide 256 evenly, so
/// taking each byte modulo 32 is unbiased.
fn random_password() -> Result<String, String> {
    let mut bytes = [0u8; PASSWORD_LEN];
    tls::provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| "the system random number generator failed".to_owned())?;
    Ok(bytes
        .iter()
        .map(|b| char::from(PASSWORD_ALPHABET[usize::from(*b) % PASSWORD_ALPHABET.len()]))
        .collect())
}

/// Turns the demo's choices into `serve` flags and parses them with `serve`'s own
/// definitions: every setting the demo does not choose gets `serve`'s default, and the
/// result passes the same validation as `postern serve`. Environment variables are
/// switched off for this parse (see [`DemoArgs`]).
fn serve_config(args: &DemoArgs, backend: &str, files: &Files) -> Result<Config, String> {
    let argv: Vec<String> = [
        "serve",
        "--listen",
        &args.listen.to_string(),
        "--listen-tls",
        &args.listen_tls.to_string(),
        "--metrics-listen",
        &args.metrics_listen.to_string(),
        "--backend",
        backend,
        "--cert",
        &files.cert.display().to_string(),
        "--key",
        &files.key.display().to_string(),
        "--users",
        &files.users.display().to_string(),
        "--hostname",
        "localhost",
        "--shutdown-grace",
        SHUTDOWN_GRACE,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let command =
        ServeArgs::augment_args(clap::Command::new("serve")).mut_args(|arg| arg.env(None));
    let matches = command
        .try_get_matches_from(argv)
        .map_err(|e| format!("demo configuration: {e}"))?;
    let serve_args =
        ServeArgs::from_arg_matches(&matches).map_err(|e| format!("demo configuration: {e}"))?;
    Config::from_args(&serve_args)
}

fn print_banner(args: &DemoArgs, backend: &str, files: &Files, backend_up: bool) {
    say(&banner(args, backend, files, backend_up));
}

/// Writes to stdout and flushes (the console is the demo's interface, and a pipe must
/// see each line when it happens). Unlike `print!`, a closed stdout (`postern demo |
/// head`) does not panic: the demo keeps running.
fn say(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// What to type to try the proxy: the console is the demo's user interface.
fn banner(args: &DemoArgs, backend: &str, files: &Files, backend_up: bool) -> String {
    let user = USER;
    let password = &files.password;
    let cert = files.cert.display();
    let (starttls, implicit, metrics) = (args.listen, args.listen_tls, args.metrics_listen);
    let auth_plain = BASE64.encode(format!("\0{user}\0{password}"));
    let mut out = String::new();
    let mut line = |text: &str| {
        out.push_str(text);
        out.push('\n');
    };
    line("");
    line("postern demo: the real proxy on loopback, with a throw-away configuration.");
    line("Not for production: the password and the certificate last until Ctrl-C.");
    line("");
    line(&format!(
        "  STARTTLS      {starttls}   submission, TLS then AUTH required"
    ));
    line(&format!(
        "  implicit TLS  {implicit}   RFC 8314, AUTH required"
    ));
    line(&format!("  user          {user}"));
    line(&format!("  password      {password}"));
    line(&format!(
        "  certificate   {cert}  (self-signed, made just now)"
    ));
    line(&format!(
        "  metrics       http://{metrics}/metrics   (also /healthz and /readyz)"
    ));
    if args.backend.is_some() {
        let state = if backend_up {
            "answers EHLO"
        } else {
            "NOT answering yet: AUTH gets 454 4.7.0 until it does"
        };
        line(&format!(
            "  backend       {backend}   your server ({state})"
        ));
    } else {
        line(&format!(
            "  backend       {backend}   [legacy-sink]: a stand-in for your legacy SMTP server,"
        ));
        line("                accepts every mail and prints it here, delivers nothing");
    }
    line("");
    line("Send a test mail (STARTTLS, then AUTH) with any of these:");
    line("");
    line(&format!(
        "  swaks --server {starttls} --tls --auth PLAIN --auth-user {user} --auth-password {password} --from {EXAMPLE_FROM} --to {EXAMPLE_TO}"
    ));
    line("");
    let (h, p) = (starttls.ip(), starttls.port());
    line(&format!(
        "  python3 -c 'import smtplib, ssl; s = smtplib.SMTP(\"{h}\", {p}); s.starttls(context=ssl.create_default_context(cafile=\"{cert}\")); s.login(\"{user}\", \"{password}\"); s.sendmail(\"{EXAMPLE_FROM}\", [\"{EXAMPLE_TO}\"], \"Subject: hello from postern\\r\\n\\r\\nIt works.\\r\\n\"); s.quit()'"
    ));
    line("");
    line(&format!(
        "  openssl s_client -quiet -crlf -starttls smtp -connect {starttls} -CAfile {cert}"
    ));
    line("  then type these lines:");
    for typed in [
        "EHLO me".to_owned(),
        format!("AUTH PLAIN {auth_plain}"),
        format!("MAIL FROM:<{EXAMPLE_FROM}>"),
        format!("RCPT TO:<{EXAMPLE_TO}>"),
        "DATA".to_owned(),
        "Subject: hello from postern".to_owned(),
        String::new(),
        "It works.".to_owned(),
        ".".to_owned(),
        "QUIT".to_owned(),
    ] {
        line(&format!("    {typed}"));
    }
    line("");
    let (ih, ip) = (implicit.ip(), implicit.port());
    line("Implicit TLS is the same with:");
    line(&format!(
        "  swaks --server {implicit} --tlsc ...   smtplib.SMTP_SSL(\"{ih}\", {ip}, context=...)   openssl s_client -connect {implicit} ..."
    ));
    line("");
    line(&format!(
        "Scrape metrics:  curl -s http://{metrics}/metrics | grep ^postern_"
    ));
    line("Stop:            Ctrl-C (drains open sessions, removes the files above)");
    line("");
    line("Waiting for mail.");
    out
}

/// SIGINT as a stream; on non-Unix a no-op that never fires.
fn interrupt_signal() -> Result<Interrupt, String> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        signal(SignalKind::interrupt())
            .map(Interrupt)
            .map_err(|e| format!("installing SIGINT handler: {e}"))
    }
    #[cfg(not(unix))]
    Ok(Interrupt)
}

#[cfg(unix)]
struct Interrupt(tokio::signal::unix::Signal);
#[cfg(not(unix))]
struct Interrupt;

impl Interrupt {
    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            let _ = self.0.recv().await;
        }
        #[cfg(not(unix))]
        std::future::pending::<()>().await
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use std::time::Duration;

    use super::*;
    use crate::config::{Cli, Command};

    fn demo_args(extra: &[&str]) -> DemoArgs {
        let argv = ["postern", "demo"].iter().chain(extra);
        match Cli::try_parse_from(argv) {
            Ok(Cli {
                command: Command::Demo(args),
            }) => args,
            other => panic!("not a demo command line: {other:?}"),
        }
    }

    #[test]
    fn refuses_non_loopback_addresses() {
        for (flags, needle) in [
            (&["--listen", "0.0.0.0:2587"][..], "--listen 0.0.0.0:2587"),
            (&["--listen-tls", "192.0.2.1:2465"], "--listen-tls"),
            (&["--metrics-listen", "[::]:9587"], "--metrics-listen"),
            (&["--sink", "10.0.0.1:25"], "--sink"),
            (&["--listen", "127.0.0.1:0"], "port 0"),
        ] {
            let error = check_loopback(&demo_args(flags)).unwrap_err();
            assert!(error.contains(needle), "{flags:?}: {error}");
        }
    }

    #[test]
    fn accepts_loopback_addresses() {
        for flags in [
            &[][..],
            &["--listen", "127.0.0.2:2587", "--listen-tls", "[::1]:2465"],
            &["--sink", "127.0.0.1:0"],
            // A real backend may live anywhere: the demo connects to it, never binds it.
            &["--backend", "mail.example.test:25"],
        ] {
            check_loopback(&demo_args(flags)).unwrap();
        }
    }

    #[test]
    fn sink_and_backend_conflict() {
        let result = Cli::try_parse_from([
            "postern",
            "demo",
            "--sink",
            "127.0.0.1:1",
            "--backend",
            "x:25",
        ]);
        assert!(result.is_err());
    }

    #[test]
    fn passwords_are_fresh_and_plain() {
        let a = random_password().unwrap();
        let b = random_password().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), PASSWORD_LEN);
        assert!(a.bytes().all(|c| PASSWORD_ALPHABET.contains(&c)));
    }

    /// The demo's flags survive `serve`'s own validation. (That `POSTERN_*` variables do
    /// not leak in is checked by `tests/it/demo.rs`, which can set a child's environment.)
    #[test]
    fn serve_config_uses_serve_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let args = demo_args(&[]);
        let files = Files::write(dir.path(), &args).unwrap();
        let config = serve_config(&args, "127.0.0.1:2525", &files).unwrap();
        assert_eq!(config.listen, vec![args.listen]);
        assert_eq!(config.listen_tls, vec![args.listen_tls]);
        assert_eq!(config.metrics_listen, Some(args.metrics_listen));
        assert_eq!(config.backend, "127.0.0.1:2525");
        assert_eq!(config.shutdown_grace, Duration::from_secs(5));
        let users = std::fs::read_to_string(&files.users).unwrap();
        assert_eq!(users, format!("demo:{{PLAIN}}{}\n", files.password));
        tls::load_server_config(&files.cert, &files.key).unwrap();
    }
}
