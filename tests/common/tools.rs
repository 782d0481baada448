//! Real SMTP clients driven against postern: swaks, Python's smtplib (sending a message
//! file, or a whole session reported as JSON), `openssl s_client` and lettre.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::Value;

use super::postern::Postern;
use super::{Output, STEP, run, within};

/// Which listener a client uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// `--listen`, upgraded with STARTTLS (RFC 3207).
    StartTls,
    /// `--listen-tls`, TLS from the first byte (RFC 8314).
    Implicit,
}

impl Listener {
    /// The postern address for this listener kind.
    pub fn addr(self, postern: &Postern) -> SocketAddr {
        match self {
            Listener::StartTls => postern.smtp,
            Listener::Implicit => postern.smtps,
        }
    }
}

/// Runs swaks against `postern` on the given listener, verifying the certificate against
/// the test CA, from `sender@client.test` to `rcpt@backend.test`, plus `extra` arguments
/// (`--auth PLAIN --auth-user alice --auth-password secret`, ...).
pub fn swaks(postern: &Postern, listener: Listener, extra: &[&str]) -> Output {
    let addr = listener.addr(postern);
    let mut cmd = Command::new("swaks");
    cmd.args(["--server", &addr.ip().to_string()])
        .args(["--port", &addr.port().to_string()])
        .arg(match listener {
            Listener::StartTls => "--tls",
            Listener::Implicit => "--tlsc",
        })
        .args(["--tls-verify", "--tls-sni", "localhost"])
        .arg("--tls-ca-path")
        .arg(&postern.paths.ca)
        .args(["--helo", "client.test"])
        .args(["--from", "sender@client.test", "--to", "rcpt@backend.test"])
        .args(["--timeout", "20"])
        .args(extra);
    run(&mut cmd, b"", STEP * 3)
}

/// The smtplib driver script shipped with the tests.
pub fn smtplib_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/smtplib_send.py")
}

/// Sends `message` (raw bytes, CRLF line endings) with Python's smtplib. `mech` is
/// `auto` (smtplib's own choice via `login()`), `PLAIN`, `LOGIN` or `CRAM-MD5`.
pub fn smtplib(
    postern: &Postern,
    listener: Listener,
    user: &str,
    password: &str,
    mech: &str,
    message: &[u8],
) -> Output {
    let addr = listener.addr(postern);
    let msg_path = postern
        .dir()
        .join(format!("smtplib-{}.eml", super::free_port()));
    std::fs::write(&msg_path, message).expect("write message file");
    let mut cmd = Command::new("python3");
    cmd.arg(smtplib_script())
        .args(["--host", &addr.ip().to_string()])
        .args(["--port", &addr.port().to_string()])
        .args([
            "--mode",
            match listener {
                Listener::StartTls => "starttls",
                Listener::Implicit => "implicit",
            },
        ])
        .arg("--cafile")
        .arg(&postern.paths.ca)
        .args(["--user", user, "--password", password, "--mech", mech])
        .arg("--message-file")
        .arg(&msg_path);
    run(&mut cmd, b"", STEP * 3)
}

/// Runs `openssl s_client -starttls smtp` (or implicit TLS) against postern with
/// `script` as its stdin, verifying the certificate for `localhost` against the test CA.
/// s_client does its own EHLO and STARTTLS; `script` is what it sends after the
/// handshake. Returns what the server said (stdout) and s_client's diagnostics (stderr).
pub fn s_client(postern: &Postern, listener: Listener, script: &[u8]) -> Output {
    let addr = listener.addr(postern);
    let mut cmd = Command::new("openssl");
    cmd.arg("s_client");
    if listener == Listener::StartTls {
        cmd.args(["-starttls", "smtp", "-name", "client.test"]);
    }
    cmd.args(["-connect", &addr.to_string()])
        .arg("-CAfile")
        .arg(&postern.paths.ca)
        .args(["-verify_return_error", "-verify_hostname", "localhost"])
        .args(["-servername", "localhost", "-quiet", "-ign_eof"]);
    run(&mut cmd, script, STEP * 2)
}

/// A lettre transport to postern: the TLS mode for `listener`, the test CA as the only
/// root, `mechanism` with `user`/`password`, EHLO name `client.test`.
pub fn lettre_transport(
    postern: &Postern,
    listener: Listener,
    user: &str,
    password: &str,
    mechanism: Mechanism,
) -> AsyncSmtpTransport<Tokio1Executor> {
    let addr = listener.addr(postern);
    let ca = Certificate::from_pem(postern.certs.ca_pem.as_bytes()).expect("CA for lettre");
    let params = TlsParameters::builder("localhost".into())
        .add_root_certificate(ca)
        .build_rustls()
        .expect("lettre TLS parameters");
    let tls = match listener {
        Listener::StartTls => Tls::Required(params),
        Listener::Implicit => Tls::Wrapper(params),
    };
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(addr.ip().to_string())
        .port(addr.port())
        .tls(tls)
        .credentials(Credentials::new(user.into(), password.into()))
        .authentication(vec![mechanism])
        .hello_name(ClientId::Domain("client.test".into()))
        .timeout(Some(STEP))
        .build()
}

/// Sends `message` with lettre, bounded by [`within`].
pub async fn lettre_send(
    transport: &AsyncSmtpTransport<Tokio1Executor>,
    message: Message,
) -> Result<Response, lettre::transport::smtp::Error> {
    within("lettre send", transport.send(message)).await
}

/// A small test message.
pub fn lettre_message(subject: &str, body: &str) -> Message {
    Message::builder()
        .from("Sender <sender@client.test>".parse().expect("from"))
        .to("Rcpt <rcpt@backend.test>".parse().expect("to"))
        .subject(subject)
        .body(body.to_string())
        .expect("message")
}

/// `user:{SCHEME}hash` from `postern hash-password --scheme scheme` fed `password`.
pub fn hash_password(scheme: &str, password: &str) -> String {
    let mut cmd = super::postern::command();
    cmd.args(["hash-password", "--scheme", scheme]);
    let out = run(&mut cmd, format!("{password}\n").as_bytes(), STEP);
    out.assert_success("postern hash-password");
    let line = out.stdout.trim().to_string();
    assert!(
        line.starts_with('{'),
        "hash-password should print {{SCHEME}}...: {out}"
    );
    line
}

/// `{SHA512-CRYPT}` hash made by `openssl passwd -6`.
pub fn openssl_sha512(password: &str) -> String {
    let out = run(
        Command::new("openssl").args(["passwd", "-6", "-stdin"]),
        format!("{password}\n").as_bytes(),
        STEP,
    );
    out.assert_success("openssl passwd -6");
    format!("{{SHA512-CRYPT}}{}", out.stdout.trim())
}

/// `{BLF-CRYPT}` hash made by `htpasswd -B` (apache2-utils).
pub fn htpasswd_bcrypt(password: &str) -> String {
    let out = run(
        Command::new("htpasswd").args(["-niB", "-C", "5", "x"]),
        format!("{password}\n").as_bytes(),
        STEP,
    );
    out.assert_success("htpasswd -B (apt-get install apache2-utils)");
    let hash = out
        .stdout
        .trim()
        .strip_prefix("x:")
        .unwrap_or_else(|| panic!("htpasswd output: {out}"))
        .to_string();
    format!("{{BLF-CRYPT}}{hash}")
}

/// One SMTP session by Python's smtplib from `tests/scripts/smtplib_session.py`: from a
/// chosen source address, optionally STARTTLS (certificate not checked) and AUTH PLAIN,
/// then one message; it reports every reply and its own address as JSON.
#[derive(Debug, Clone)]
pub struct SmtplibSession {
    pub to: SocketAddr,
    pub source: Option<IpAddr>,
    pub ehlo: String,
    pub starttls: bool,
    /// Greet with HELO instead of EHLO.
    pub helo: bool,
    pub login: Option<(String, String)>,
    pub rcpt: Vec<String>,
}

impl SmtplibSession {
    pub fn new(to: SocketAddr) -> Self {
        SmtplibSession {
            to,
            source: None,
            ehlo: "client.example".into(),
            starttls: false,
            helo: false,
            login: None,
            rcpt: Vec::new(),
        }
    }

    pub fn from(mut self, source: IpAddr) -> Self {
        self.source = Some(source);
        self
    }

    pub fn starttls(mut self) -> Self {
        self.starttls = true;
        self
    }

    pub fn helo(mut self) -> Self {
        self.helo = true;
        self
    }

    pub fn login(mut self, user: &str, password: &str) -> Self {
        self.login = Some((user.into(), password.into()));
        self
    }

    pub fn ehlo(mut self, name: &str) -> Self {
        self.ehlo = name.into();
        self
    }

    pub fn rcpt(mut self, rcpt: &str) -> Self {
        self.rcpt.push(rcpt.into());
        self
    }

    pub fn run(&self) -> SmtplibReport {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/smtplib_session.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .arg("--host")
            .arg(self.to.ip().to_string())
            .arg("--port")
            .arg(self.to.port().to_string())
            .arg("--ehlo")
            .arg(&self.ehlo);
        if let Some(source) = self.source {
            cmd.arg("--source").arg(source.to_string());
        }
        if self.helo {
            cmd.arg("--helo");
        }
        if self.starttls {
            cmd.arg("--starttls");
        }
        if let Some((user, password)) = &self.login {
            cmd.arg("--user").arg(user).arg("--password").arg(password);
        }
        for r in &self.rcpt {
            cmd.arg("--rcpt").arg(r);
        }
        let out = run(&mut cmd, b"", STEP + Duration::from_secs(10));
        let json = serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| {
            panic!("smtplib client printed no JSON ({e}): {out}");
        });
        SmtplibReport {
            json,
            raw: out.stdout,
        }
    }
}

/// What [`SmtplibSession::run`] reported.
#[derive(Debug)]
pub struct SmtplibReport {
    pub json: Value,
    pub raw: String,
}

impl SmtplibReport {
    /// The reply code of a step (`greeting`, `ehlo`, `starttls`, `ehlo_tls`, `auth`,
    /// `mail`, `data`).
    pub fn code(&self, step: &str) -> Option<u64> {
        self.json["steps"][step][0].as_u64()
    }

    /// The reply text of a step.
    pub fn text(&self, step: &str) -> String {
        self.json["steps"][step][1]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Reply codes of the RCPT commands, in order.
    pub fn rcpt_codes(&self) -> Vec<u64> {
        self.json["steps"]["rcpt"]
            .as_array()
            .map(|a| a.iter().filter_map(|r| r[0].as_u64()).collect())
            .unwrap_or_default()
    }

    /// The client's own address, as postern and the backend saw it.
    pub fn local(&self) -> SocketAddr {
        let ip: IpAddr = self.json["local"]["ip"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no local address in {}", self.raw));
        let port = self.json["local"]["port"].as_u64().expect("local port") as u16;
        SocketAddr::new(ip, port)
    }
}
