//! A private Postfix instance for the XCLIENT, PROXY protocol and MX tests: its own
//! `main.cf`/`master.cf`, queue, data directory and log file in a tempdir, started with
//! `postfix -c DIR start` and stopped on drop. The system's Postfix (if any) is neither
//! read nor touched.
//!
//! Unlike the lenient [`super::mta::Mta`] Postfix, this one decides like a submission
//! server behind a proxy: mail is accepted for `local.test` and, from an authenticated
//! client only, relayed to any other domain (`smtpd_relay_restrictions =
//! permit_sasl_authenticated, reject_unauth_destination`); every message ends in the
//! `discard` transport, whose log line (`status=sent`) shows it was accepted. Postfix's
//! only way to learn of an authenticated client here is XCLIENT LOGIN from postern: no
//! SASL backend is set up. It listens on 127.0.0.1 and [::1], plainly and behind a
//! PROXY header (`smtpd_upstream_proxy_protocol = haproxy`).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::mta::{self, Kind, chown, set_mode, wait_pid_file_gone};
use super::postern::{Postern, PosternBuilder, USER};
use super::{PASSWORD, STEP, V4, V6, accepts, free_port, run, wait_until};

const POSTFIX: &str = "/usr/sbin/postfix";

/// A user name with the characters xtext must encode (`+`, `=`).
pub const XTEXT_USER: &str = "bob+tag=x@example.com";

/// A 220-byte user name: with a long EHLO name it pushes XCLIENT past one line.
pub fn long_user() -> String {
    format!("{}@example.com", "u".repeat(208))
}

/// postern as the tests against this Postfix (and HAProxy) run it: a JSON log, read by
/// [`Postern::wait_session_closed`]; postern's own abuse limits but no failure delay;
/// only `{PLAIN}` users ([`USER`], [`XTEXT_USER`], [`long_user`]), so postern's default
/// mechanisms apply; a probe every second. Add listeners with
/// [`PosternBuilder::listen`] or use its `--listen`.
pub fn postern(backend: impl ToString) -> PosternBuilder {
    let users = [USER.to_string(), XTEXT_USER.to_string(), long_user()]
        .map(|user| format!("{user}:{{PLAIN}}{PASSWORD}"));
    Postern::builder(backend)
        .users_file(&users.each_ref().map(String::as_str))
        .default_limits()
        .without_flag("--auth-mechanisms")
        .flag("--auth-failure-delay", "0s")
        .flag("--log-format", "json")
        .flag("--probe-interval", "1s")
}

/// Whether a private Postfix can run here: what [`mta::available`] asks of any private
/// Postfix, and a SASL mechanism plugin.
pub fn available() -> bool {
    if !mta::available(Kind::Postfix) {
        return false;
    }
    // XCLIENT LOGIN only counts with smtpd_sasl_auth_enable, and with that on smtpd
    // dies ("fatal: no SASL authentication mechanisms") unless Cyrus SASL has at least
    // one mechanism plugin (libsasl2-modules, only a Recommends of Postfix).
    let plugin = |dir: &Path| dir.join("sasl2/libplain.so").exists();
    let found = plugin(Path::new("/usr/lib"))
        || std::fs::read_dir("/usr/lib")
            .map(|entries| entries.flatten().any(|e| plugin(&e.path())))
            .unwrap_or(false);
    if !found {
        eprintln!("SKIP: libsasl2-modules is not installed (Postfix needs a SASL mechanism)");
        assert!(
            std::env::var_os("CI").is_none(),
            "libsasl2-modules must be installed in CI (.ci/run)"
        );
    }
    found
}

/// How to configure the instance.
pub struct PostfixOptions {
    /// `smtpd_authorized_xclient_hosts`.
    pub xclient_hosts: String,
}

impl Default for PostfixOptions {
    fn default() -> Self {
        PostfixOptions {
            xclient_hosts: "127.0.0.1 [::1]".into(),
        }
    }
}

pub struct Postfix {
    dir: TempDir,
    conf: PathBuf,
    log: PathBuf,
    /// Plain SMTP on 127.0.0.1 and [::1].
    pub port: u16,
    /// SMTP behind a PROXY header (`smtpd_upstream_proxy_protocol = haproxy`).
    pub proxy_port: u16,
}

impl Postfix {
    pub fn start(options: PostfixOptions) -> Postfix {
        // Ports picked now can be taken before Postfix binds them: retry.
        for _attempt in 0..3 {
            if let Some(postfix) = Self::try_start(&options) {
                return postfix;
            }
        }
        panic!("Postfix lost the race for free ports three times");
    }

    /// One start on fresh ports; `None` when a port was taken meanwhile.
    fn try_start(options: &PostfixOptions) -> Option<Postfix> {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        // Postfix's daemons run as the `postfix` user and must reach data_directory.
        set_mode(&root, 0o755);
        let conf = root.join("conf");
        let queue = root.join("queue");
        let data = root.join("data");
        for d in [&conf, &queue, &data] {
            std::fs::create_dir(d).expect("mkdir");
        }
        chown(&data, "postfix");
        let log = root.join("maillog");
        let port = dual_stack_port();
        let proxy_port = dual_stack_port();

        let main_cf = format!(
            "compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
maillog_file = {log}
maillog_file_prefixes = {root}
syslog_name = postfix-postern-test
myhostname = backend.test
mydomain = backend.test
mydestination = local.test
inet_interfaces = loopback-only
inet_protocols = all
mynetworks = 127.0.0.0/8 [::1]/128
default_transport = discard
local_transport = discard
relay_transport = discard
alias_maps =
alias_database =
local_recipient_maps =
biff = no
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtpd_client_port_logging = yes
# XCLIENT LOGIN only counts with SASL on (no SASL backend is needed for it).
smtpd_sasl_auth_enable = yes
smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination
smtpd_authorized_xclient_hosts = {xclient}
smtpd_upstream_proxy_timeout = 5s
",
            queue = queue.display(),
            data = data.display(),
            log = log.display(),
            root = root.display(),
            xclient = options.xclient_hosts,
        );
        let master_cf = format!(
            "127.0.0.1:{port} inet n - n - - smtpd
[::1]:{port} inet n - n - - smtpd
127.0.0.1:{proxy_port} inet n - n - - smtpd -o syslog_name=postfix-postern-test/proxied -o smtpd_upstream_proxy_protocol=haproxy
[::1]:{proxy_port} inet n - n - - smtpd -o syslog_name=postfix-postern-test/proxied -o smtpd_upstream_proxy_protocol=haproxy
{MASTER_SERVICES}"
        );
        std::fs::write(conf.join("main.cf"), main_cf).expect("main.cf");
        std::fs::write(conf.join("master.cf"), master_cf).expect("master.cf");

        let started = run(&mut postfix_cmd(&conf, "start"), b"", STEP);
        let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
        if !started.status.success() {
            // master binds its inet ports before it daemonizes: a lost race shows here.
            if log_text().contains("in use") {
                return None;
            }
            panic!("postfix start failed: {started}\nmaillog:\n{}", log_text());
        }
        let postfix = Postfix {
            dir,
            conf,
            log,
            port,
            proxy_port,
        };
        for ip in [V4, V6] {
            for (p, what) in [(port, "smtpd"), (proxy_port, "proxied smtpd")] {
                let addr = SocketAddr::new(ip, p);
                wait_until(STEP, &format!("Postfix {what} to accept on {addr}"), || {
                    accepts(addr).then_some(())
                });
            }
        }
        Some(postfix)
    }

    /// The plain smtpd service on `ip` (`127.0.0.1` or `::1`).
    pub fn addr(&self, ip: IpAddr) -> SocketAddr {
        SocketAddr::new(ip, self.port)
    }

    /// The smtpd service that expects a PROXY header, on `ip`.
    pub fn proxy_addr(&self, ip: IpAddr) -> SocketAddr {
        SocketAddr::new(ip, self.proxy_port)
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

    /// The log lines of the smtpd session whose client was `client` (`host[addr]:port`
    /// as Postfix writes it), once its `disconnect` line is written.
    pub fn session_lines(&self, client_ip: &str, client_port: u16) -> Vec<String> {
        let tag = format!("[{client_ip}]:{client_port}");
        self.wait_line(&["disconnect from", &tag]);
        // Lines of one smtpd process between its connect and disconnect; the pid is the
        // session's key since each smtpd serves one connection at a time.
        let text = self.log_text();
        let disconnect = text
            .lines()
            .find(|l| l.contains("disconnect from") && l.contains(&tag))
            .expect("disconnect line");
        let pid = smtpd_pid(disconnect);
        let mut lines = Vec::new();
        for line in text.lines() {
            if smtpd_pid(line) == pid {
                if line.contains("connect from") && !line.contains("disconnect") {
                    lines.clear();
                }
                lines.push(line.to_owned());
                if line == disconnect {
                    break;
                }
            }
        }
        lines
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// `smtpd[1234]` from a log line.
fn smtpd_pid(line: &str) -> Option<&str> {
    let start = line.find("smtpd[")? + "smtpd[".len();
    let end = start + line[start..].find(']')?;
    Some(&line[start..end])
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- Postfix maillog -----\n{}", self.log_text());
        }
        let _ = run(&mut postfix_cmd(&self.conf, "stop"), b"", STEP);
        // `postfix stop` signals the master and returns: wait for it to be gone before
        // the tempdir holding its queue is removed.
        wait_pid_file_gone(&self.dir.path().join("queue/pid/master.pid"));
    }
}

/// The services every private Postfix's master.cf needs besides its listeners.
pub const MASTER_SERVICES: &str = "pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
smtp      unix  - - n -  - smtp
relay     unix  - - n -  - smtp
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
anvil     unix  - - n -  1 anvil
scache    unix  - - n -  1 scache
postlog   unix-dgram n - n - 1 postlogd
";

/// `postfix -c CONF VERB`.
pub fn postfix_cmd(conf: &Path, verb: &str) -> Command {
    let mut cmd = Command::new(POSTFIX);
    cmd.arg("-c").arg(conf).arg(verb);
    cmd
}

/// A port from [`free_port`] that is free on ::1 too.
fn dual_stack_port() -> u16 {
    for _ in 0..50 {
        let port = free_port();
        if std::net::TcpListener::bind((V6, port)).is_ok() {
            return port;
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1");
}
