//! A private Postfix instance: its own `main.cf`/`master.cf`, queue, data directory and
//! log file in a tempdir, started with `postfix -c DIR start` and stopped on drop. The
//! system's Postfix (if any) is neither read nor touched.
//!
//! Mail is accepted for `local.test` and, from an authenticated client only, relayed to
//! any other domain (`smtpd_relay_restrictions = permit_sasl_authenticated,
//! reject_unauth_destination`); every message ends in the `discard` transport, whose log
//! line (`status=sent`) shows it was accepted. Postfix's only way to learn of an
//! authenticated client here is XCLIENT LOGIN from postern: no SASL backend is set up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{STEP, V4, V6, run, wait_accepting};

const POSTFIX: &str = "/usr/sbin/postfix";

/// Whether a private Postfix can run here: the binary exists and we are root (the
/// master process must start as root to drop to the `postfix` user).
pub fn available() -> bool {
    if !super::have(POSTFIX) {
        return false;
    }
    let uid = run(Command::new("id").arg("-u"), STEP);
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        eprintln!("SKIP: a private Postfix instance needs root");
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
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
        let chown = run(Command::new("chown").arg("postfix").arg(&data), STEP);
        assert!(chown.status.success(), "chown postfix {}", data.display());
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
pickup    unix  n - n 60 1 pickup
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
"
        );
        std::fs::write(conf.join("main.cf"), main_cf).expect("main.cf");
        std::fs::write(conf.join("master.cf"), master_cf).expect("master.cf");

        let started = run(&mut postfix_cmd(&conf, "start"), STEP);
        let postfix = Postfix {
            dir,
            conf,
            log,
            port,
            proxy_port,
        };
        assert!(
            started.status.success(),
            "postfix start failed: {}{}\nmaillog:\n{}",
            String::from_utf8_lossy(&started.stdout),
            String::from_utf8_lossy(&started.stderr),
            postfix.log_text()
        );
        for ip in [V4, V6] {
            wait_accepting(SocketAddr::new(ip, port), "postfix smtpd");
            wait_accepting(SocketAddr::new(ip, proxy_port), "postfix proxied smtpd");
        }
        postfix
    }

    /// The plain smtpd service on `ip` (`127.0.0.1` or `::1`).
    pub fn addr(&self, ip: std::net::IpAddr) -> SocketAddr {
        SocketAddr::new(ip, self.port)
    }

    /// The smtpd service that expects a PROXY header, on `ip`.
    pub fn proxy_addr(&self, ip: std::net::IpAddr) -> SocketAddr {
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
        let _ = run(&mut postfix_cmd(&self.conf, "stop"), STEP);
        // `postfix stop` signals the master and returns: wait for it to be gone before
        // the tempdir holding its queue is removed.
        let pid_file = self.dir.path().join("queue/pid/master.pid");
        if let Some(pid) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            let proc_dir = PathBuf::from(format!("/proc/{pid}"));
            let deadline = Instant::now() + Duration::from_secs(10);
            while proc_dir.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn postfix_cmd(conf: &Path, verb: &str) -> Command {
    let mut cmd = Command::new(POSTFIX);
    cmd.arg("-c").arg(conf).arg(verb);
    cmd
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A port free on both 127.0.0.1 and ::1.
fn dual_stack_port() -> u16 {
    for _ in 0..50 {
        let v4 = std::net::TcpListener::bind((V4, 0)).expect("bind");
        let port = v4.local_addr().expect("addr").port();
        if std::net::TcpListener::bind((V6, port)).is_ok() {
            return port;
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1");
}
