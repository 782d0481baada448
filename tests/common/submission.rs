//! A private Postfix *submission* service for the relay-out tests: what Microsoft 365
//! or Google Workspace look like to a client. It requires STARTTLS (test CA
//! certificate) and AUTH before MAIL, and checks AUTH through a private Dovecot
//! ([`super::dovecot`], `smtpd_sasl_type = dovecot`): a passwd-file for PLAIN/LOGIN
//! (`alice` / [`super::PASSWORD`]) and the `oauth2` passdb for XOAUTH2/OAUTHBEARER,
//! introspecting tokens at a [`super::token_server::TokenServer`].
//!
//! Nothing is trusted by address (`mynetworks` is empty of loopback), so only an
//! authenticated client can send. Every accepted message is put on hold
//! (`smtpd_end_of_data_restrictions = check_client_access static:HOLD`), so its exact
//! content can be read back with `postcat`.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::dovecot::{Dovecot, Settings};
use super::mta::{self, Kind, chown, set_mode, wait_pid_file_gone};
use super::postfix::{MASTER_SERVICES, postfix_cmd};
use super::token_server::TokenServer;
use super::{STEP, TestCerts, V4, accepts, free_port, run, wait_until};

const POSTFIX: &str = "/usr/sbin/postfix";

/// A recipient the upstream refuses with `554 5.7.1` (a 5xx that must reach the
/// sender as it is).
pub const REFUSED_RCPT: &str = "nobody@example.org";

/// The upstream: Dovecot (SASL) and Postfix (SMTP), stopped on drop.
pub struct Submission {
    pub postfix_dir: TempDir,
    conf: PathBuf,
    log: PathBuf,
    /// STARTTLS submission (587 style).
    pub port: u16,
    /// Implicit TLS submission (465 style, `smtpd_tls_wrappermode`).
    pub smtps_port: u16,
    pub certs: TestCerts,
    pub dovecot: Dovecot,
    /// Holds the oauth2 passdb's settings file.
    _oauth2_dir: TempDir,
}

/// Whether the upstream can run here (Postfix and Dovecot), with a loud skip if not.
pub fn available() -> bool {
    mta::available(Kind::Postfix) && super::dovecot::available()
}

impl Submission {
    /// Starts Dovecot (with the oauth2 passdb asking `tokens`) and Postfix.
    pub fn start(tokens: &TokenServer) -> Submission {
        let dovecot_extra = |conf: &Path| {
            format!(
                "passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {conf}
}}
",
                conf = conf.display()
            )
        };
        // Dovecot's auth process (user dovecot) reads the oauth2 settings file.
        let conf_dir = tempfile::tempdir().expect("tempdir");
        set_mode(conf_dir.path(), 0o755);
        let conf_path = conf_dir.path().join("dovecot-oauth2.conf.ext");
        std::fs::write(
            &conf_path,
            format!(
                "introspection_mode = post
introspection_url = {url}
username_attribute = username
active_attribute = active
active_value = true
",
                url = tokens.introspection_url()
            ),
        )
        .expect("oauth2 conf");
        std::fs::set_permissions(&conf_path, std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let dovecot = Dovecot::start_with(Settings {
            mechanisms: "plain login xoauth2 oauthbearer".into(),
            extra: dovecot_extra(&conf_path),
            ..Settings::default()
        })
        .expect("Dovecot (checked by available())");
        // Postfix's smtpd runs as `postfix` and must reach the auth socket.
        std::fs::set_permissions(dovecot.socket(), std::fs::Permissions::from_mode(0o666))
            .expect("chmod auth socket");

        let certs = TestCerts::generate();
        for _attempt in 0..3 {
            if let Some(postfix) = Self::try_start(&dovecot, &certs) {
                let (postfix_dir, conf, log, port, smtps_port) = postfix;
                return Submission {
                    postfix_dir,
                    conf,
                    log,
                    port,
                    smtps_port,
                    certs,
                    dovecot,
                    _oauth2_dir: conf_dir,
                };
            }
        }
        panic!("Postfix lost the race for a free port three times");
    }

    fn try_start(
        dovecot: &Dovecot,
        certs: &TestCerts,
    ) -> Option<(TempDir, PathBuf, PathBuf, u16, u16)> {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        set_mode(&root, 0o755);
        let conf = root.join("conf");
        let queue = root.join("queue");
        let data = root.join("data");
        let tls = root.join("tls");
        for d in [&conf, &queue, &data, &tls] {
            std::fs::create_dir(d).expect("mkdir");
        }
        chown(&data, "postfix");
        let paths = certs.write_to(&tls);
        let log = root.join("maillog");
        let port = free_port();
        let smtps_port = free_port();
        let main_cf = format!(
            "compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
maillog_file = {log}
maillog_file_prefixes = {root}
syslog_name = postfix-submission-test
myhostname = upstream.test
mydomain = upstream.test
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
# Nothing is trusted by address: only AUTH lets a client send.
mynetworks = 192.0.2.1/32
default_transport = discard
relay_transport = discard
local_transport = discard
alias_maps =
alias_database =
local_recipient_maps =
biff = no
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtpd_client_port_logging = yes
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_security_level = encrypt
smtpd_tls_auth_only = yes
smtpd_tls_loglevel = 1
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = {sasl}
smtpd_relay_restrictions = permit_sasl_authenticated, reject
# One recipient the upstream refuses, for the pass-through of its 5xx.
smtpd_recipient_restrictions = check_recipient_access inline:{{ {{ {REFUSED_RCPT} = REJECT No such user here }} }}, permit_sasl_authenticated, reject
# Every message stays in the hold queue, for postcat.
smtpd_end_of_data_restrictions = check_client_access static:HOLD
",
            queue = queue.display(),
            data = data.display(),
            log = log.display(),
            root = root.display(),
            cert = paths.cert.display(),
            key = paths.key.display(),
            sasl = dovecot.socket().display(),
        );
        let master_cf = format!(
            "127.0.0.1:{port} inet n - n - - smtpd
127.0.0.1:{smtps_port} inet n - n - - smtpd -o smtpd_tls_wrappermode=yes
tlsmgr    unix  - - n 1000? 1 tlsmgr
{MASTER_SERVICES}"
        );
        std::fs::write(conf.join("main.cf"), main_cf).expect("main.cf");
        std::fs::write(conf.join("master.cf"), master_cf).expect("master.cf");
        let started = run(&mut postfix_cmd(&conf, "start"), b"", STEP);
        let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
        if !started.status.success() {
            if log_text().contains("in use") {
                return None;
            }
            panic!("postfix start failed: {started}\nmaillog:\n{}", log_text());
        }
        for p in [port, smtps_port] {
            let addr = SocketAddr::new(V4, p);
            wait_until(STEP, "Postfix submission to accept", || {
                accepts(addr).then_some(())
            });
        }
        Some((dir, conf, log, port, smtps_port))
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(V4, self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has a line containing every one of `needles`; returns it.
    pub fn wait_line(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            let text = self.log_text();
            if let Some(line) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_owned();
            }
            if Instant::now() > deadline {
                panic!("no Postfix log line with {needles:?}; maillog:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The queue ids of messages accepted so far (`hold:` lines), in order.
    pub fn held(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains(": hold: "))
            .filter_map(|l| {
                let before = l.split(": hold: ").next()?;
                before.rsplit(' ').next().map(str::to_owned)
            })
            .collect()
    }

    /// Waits for the `n`-th accepted message and returns its queue id.
    pub fn wait_held(&self, n: usize) -> String {
        wait_until(STEP, &format!("{n} held message(s)"), || {
            self.held().get(n - 1).cloned()
        })
    }

    /// The `client=` line of a queue id: who sent it, with which SASL login.
    pub fn client_line(&self, queue_id: &str) -> String {
        self.wait_line(&[&format!("{queue_id}: client=")])
    }

    /// A held message's content (headers and body) as Postfix stored it.
    pub fn content(&self, queue_id: &str) -> String {
        let out = run(
            Command::new("postcat")
                .arg("-c")
                .arg(&self.conf)
                .args(["-bh", "-q", queue_id]),
            b"",
            STEP,
        );
        out.assert_success("postcat");
        out.stdout
    }

    pub fn ca_path(&self) -> PathBuf {
        let path = self.postfix_dir.path().join("tls/ca.pem");
        assert!(path.exists());
        path
    }
}

impl Drop for Submission {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- submission Postfix maillog -----\n{}",
                self.log_text()
            );
        }
        let _ = run(&mut postfix_cmd(&self.conf, "stop"), b"", STEP);
        wait_pid_file_gone(&self.postfix_dir.path().join("queue/pid/master.pid"));
    }
}
