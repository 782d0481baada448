//! Real MTAs as postern's backend: Postfix 3.7, Exim 4.96 and OpenSMTPD 6.8, each started
//! privately by the test on a free loopback port with its lenient defaults, accepting
//! mail for any recipient from 127.0.0.1, queueing it and never delivering it, and never
//! asking DNS.
//!
//! In front of each sits a [`Recorder`]: a transparent TCP forwarder that keeps every
//! byte each connection sent to the MTA (and got back), so a test can prove that a
//! line postern refused never reached the MTA. The MTA's own log is the other witness:
//! [`Mta::accepted`] parses the messages it accepted, with their recipient counts.
//!
//! Where the binaries come from:
//! - Postfix: the Debian package (`/usr/sbin/postfix`), installed normally.
//! - Exim and OpenSMTPD: installing either with apt would remove Postfix (all three
//!   provide `mail-transport-agent`), so `.ci/run` unpacks their packages into
//!   `tests/mta-root/` (ignored by git) and creates their users.
//!
//! Without a server (or without root) a test skips loudly, unless `CI` is set: then it
//! fails, since CI installs them all.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{STEP, accepts, free_port, is_root, run};

/// Every message size limit the MTAs are configured with (octets): `SIZE` in their EHLO.
pub const SIZE_LIMIT: u64 = 100_000;

/// Which server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Postfix,
    Exim,
    OpenSmtpd,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Postfix, Kind::Exim, Kind::OpenSmtpd];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Postfix => "Postfix",
            Kind::Exim => "Exim",
            Kind::OpenSmtpd => "OpenSMTPD",
        }
    }

    /// Whether its EHLO offers CHUNKING (BDAT).
    pub fn chunking(self) -> bool {
        matches!(self, Kind::Postfix | Kind::Exim)
    }

    /// Whether it takes pipelined commands. OpenSMTPD 6.8 does not offer PIPELINING
    /// and answers `500 5.5.1 Invalid command: Pipelining not supported` (and hangs up)
    /// when a command arrives before its previous reply was sent.
    pub fn pipelining(self) -> bool {
        !matches!(self, Kind::OpenSmtpd)
    }

    fn binary(self) -> PathBuf {
        match self {
            Kind::Postfix => PathBuf::from("/usr/sbin/postfix"),
            Kind::Exim => mta_root().join("usr/sbin/exim4"),
            Kind::OpenSmtpd => mta_root().join("usr/sbin/smtpd"),
        }
    }
}

/// Where `.ci/run` unpacks the Exim and OpenSMTPD packages.
pub fn mta_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mta-root")
}

/// Whether `kind` can run here. Prints a loud SKIP when not, and fails when `CI` is set.
pub fn available(kind: Kind) -> bool {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root (each server starts as root and drops privileges)".to_string());
    }
    let binary = kind.binary();
    if !binary.exists() {
        missing.push(format!("{}", binary.display()));
    }
    let users: &[&str] = match kind {
        Kind::Postfix => &["postfix"],
        Kind::Exim => &["Debian-exim"],
        Kind::OpenSmtpd => &["opensmtpd", "opensmtpq"],
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for user in users {
        if !passwd.lines().any(|l| l.starts_with(&format!("{user}:"))) {
            missing.push(format!("user {user}"));
        }
    }
    if kind == Kind::OpenSmtpd {
        for tool in ["/usr/bin/unshare", "/usr/bin/mount"] {
            if !Path::new(tool).exists() {
                missing.push(tool.to_string());
            }
        }
        if !Path::new("/var/lib/opensmtpd/empty").is_dir() {
            missing.push("/var/lib/opensmtpd/empty".into());
        }
    }
    if missing.is_empty() {
        return true;
    }
    eprintln!(
        "\n*** SKIP: {} cannot run here: missing {}. `.ci/run` installs it. ***\n",
        kind.name(),
        missing.join(", ")
    );
    assert!(
        std::env::var_os("CI").is_none(),
        "{} must be runnable in CI (.ci/run): missing {}",
        kind.name(),
        missing.join(", ")
    );
    false
}

/// One message an MTA's log says it accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The queue id / message id.
    pub id: String,
    pub recipients: usize,
    /// The log line it was parsed from.
    pub line: String,
}

/// A private MTA with a [`Recorder`] in front; stopped on drop.
pub struct Mta {
    pub kind: Kind,
    dir: TempDir,
    log: PathBuf,
    /// Exim and OpenSMTPD run in the foreground as our child; Postfix daemonizes.
    child: Option<Child>,
    postfix_conf: Option<PathBuf>,
    /// The MTA's own listener.
    pub direct: SocketAddr,
    pub recorder: Recorder,
}

impl Mta {
    /// Starts `kind`, or returns `None` (after a loud SKIP) if it cannot run here.
    pub fn start(kind: Kind) -> Option<Mta> {
        if !available(kind) {
            return None;
        }
        // A port picked now can be taken before the server binds it: retry.
        for _attempt in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            set_mode(dir.path(), 0o755);
            let port = free_port();
            let started = match kind {
                Kind::Postfix => start_postfix(dir, port),
                Kind::Exim => start_exim(dir, port),
                Kind::OpenSmtpd => start_opensmtpd(dir, port),
            };
            if let Some(mta) = started {
                return Some(mta);
            }
        }
        panic!("{} lost the race for a free port three times", kind.name());
    }

    /// Where postern should send its backend connections: the recorder.
    pub fn addr(&self) -> SocketAddr {
        self.recorder.addr
    }

    /// The MTA's log so far.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Every message accepted so far, as the log tells, read once.
    pub fn accepted_now(&self) -> Vec<Accepted> {
        parse_accepted(self.kind, &self.log_text())
    }

    /// Every message accepted so far, once the log has settled: the parsed list has not
    /// changed for 300 ms (at most 10 s in all).
    pub async fn accepted(&self) -> Vec<Accepted> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = self.accepted_now();
        let mut stable_since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.accepted_now();
            if now != last {
                last = now;
                stable_since = Instant::now();
            } else if stable_since.elapsed() >= Duration::from_millis(300)
                || Instant::now() > deadline
            {
                return last;
            }
        }
    }
}

impl Drop for Mta {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- {} log -----\n{}\n----- bytes through the recorder -----\n{}",
                self.kind.name(),
                self.log_text(),
                self.recorder.transcript()
            );
        }
        if let Some(conf) = &self.postfix_conf {
            let _ = run(
                Command::new(Kind::Postfix.binary())
                    .arg("-c")
                    .arg(conf)
                    .arg("stop"),
                b"",
                STEP,
            );
            wait_pid_file_gone(&self.dir.path().join("queue/pid/master.pid"));
        }
        if let Some(child) = &mut self.child {
            // SIGTERM first so the servers take their own children down with them.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// chmod `path` to `mode`.
pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// `chown -R owner path`.
pub fn chown(path: &Path, owner: &str) {
    run(
        Command::new("chown").arg("-R").arg(owner).arg(path),
        b"",
        STEP,
    )
    .assert_success("chown");
}

/// Waits (at most 10 s) until the process whose pid `pid_file` holds is gone: a daemon's
/// stop command returns before that, and its files must outlive it.
pub fn wait_pid_file_gone(pid_file: &Path) {
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

/// Waits until `port` on loopback accepts, the child (if any) still runs and the log
/// does not report a lost port race. `None` means: retry with another port.
fn wait_listening(
    kind: Kind,
    port: u16,
    child: &mut Option<Child>,
    log: &Path,
    lost_race: &[&str],
) -> Option<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let start = Instant::now();
    loop {
        let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
        if let Some(c) = child
            && let Some(status) = c.try_wait().expect("try_wait")
        {
            if lost_race.iter().any(|n| text.contains(n)) {
                return None;
            }
            panic!(
                "{} exited during startup with {status}\n{text}",
                kind.name()
            );
        }
        if lost_race.iter().any(|n| text.contains(n)) {
            if let Some(c) = child {
                let _ = c.kill();
                let _ = c.wait();
            }
            return None;
        }
        if accepts(addr) {
            return Some(());
        }
        if start.elapsed() > STEP {
            panic!(
                "{} did not accept on {addr} within {STEP:?}\n{text}",
                kind.name()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------
// Postfix

fn start_postfix(dir: TempDir, port: u16) -> Option<Mta> {
    let root = dir.path().to_path_buf();
    let conf = root.join("conf");
    let queue = root.join("queue");
    let data = root.join("data");
    for d in [&conf, &queue, &data] {
        std::fs::create_dir(d).expect("mkdir");
    }
    chown(&data, "postfix");
    let log = root.join("maillog");
    // Lenient defaults, spelled out where a later Postfix changed them; mail for any
    // domain from loopback; everything queued (the only transport is deferred), none
    // of it delivered.
    let main_cf = format!(
        "compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
maillog_file = {log}
maillog_file_prefixes = {root}
syslog_name = postfix-postern-mta
myhostname = postfix.test
mydomain = postfix.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
default_transport = discard
local_transport = discard
relay_transport = discard
defer_transports = discard
alias_maps =
alias_database =
local_recipient_maps =
biff = no
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtpd_forbid_bare_newline = no
message_size_limit = {SIZE_LIMIT}
smtpd_error_sleep_time = 0s
",
        queue = queue.display(),
        data = data.display(),
        log = log.display(),
        root = root.display(),
    );
    let master_cf = format!(
        "127.0.0.1:{port} inet n - n - - smtpd
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
    let started = run(
        Command::new(Kind::Postfix.binary())
            .arg("-c")
            .arg(&conf)
            .arg("start"),
        b"",
        STEP,
    );
    let log_text =
        || String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    if !started.status.success() {
        if log_text().contains("in use") {
            return None;
        }
        panic!("postfix start failed: {started}\nmaillog:\n{}", log_text());
    }
    let mut mta = Mta {
        kind: Kind::Postfix,
        direct: SocketAddr::from(([127, 0, 0, 1], port)),
        recorder: Recorder::start(SocketAddr::from(([127, 0, 0, 1], port))),
        dir,
        log,
        child: None,
        postfix_conf: Some(conf),
    };
    // master binds its inet ports before it daemonizes, so a lost race shows in the log
    // and in `postfix start`'s status; just wait for it to accept.
    let mut none = None;
    wait_listening(Kind::Postfix, port, &mut none, &mta.log, &["in use"])?;
    mta.child = none;
    Some(mta)
}

// ---------------------------------------------------------------------------------------
// Exim

fn start_exim(dir: TempDir, port: u16) -> Option<Mta> {
    let root = dir.path().to_path_buf();
    let spool = root.join("spool");
    let logdir = root.join("log");
    for d in [&spool, &logdir] {
        std::fs::create_dir(d).expect("mkdir");
    }
    // The daemon runs as root; the processes that receive a message run as Debian-exim.
    chown(&spool, "Debian-exim:");
    chown(&logdir, "Debian-exim:");
    let conf = root.join("exim.conf");
    // Exim's defaults except: no DNS or ident lookups, no TLS (postern is the TLS end),
    // queue only (no queue runner either: the daemon is started without -q), recipients
    // on the `<=` line, and an ACL that takes any recipient (without one Exim refuses
    // every RCPT).
    let config = format!(
        "primary_hostname = exim.test
spool_directory = {spool}
log_file_path = {logdir}/%slog
pid_file_path = {root}/exim.pid
local_interfaces = <; 127.0.0.1
host_lookup =
rfc1413_hosts =
rfc1413_query_timeout = 0s
tls_advertise_hosts =
queue_only = true
log_selector = +received_recipients
keep_environment =
message_size_limit = {SIZE_LIMIT}
acl_smtp_rcpt = acl_rcpt

begin acl

acl_rcpt:
  accept
",
        spool = spool.display(),
        logdir = logdir.display(),
        root = root.display(),
    );
    std::fs::write(&conf, config).expect("exim.conf");
    let stderr_log = root.join("exim.stderr");
    let out = std::fs::File::create(&stderr_log).expect("create exim stderr");
    let child = Command::new(Kind::Exim.binary())
        .arg("-bdf")
        .arg("-oX")
        .arg(port.to_string())
        .arg("-C")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .spawn()
        .expect("spawn exim4");
    let log = logdir.join("mainlog");
    let mut child = Some(child);
    let lost = wait_listening(
        Kind::Exim,
        port,
        &mut child,
        &stderr_log,
        &["Address already in use"],
    );
    let mta = Mta {
        kind: Kind::Exim,
        direct: SocketAddr::from(([127, 0, 0, 1], port)),
        recorder: Recorder::start(SocketAddr::from(([127, 0, 0, 1], port))),
        dir,
        log,
        child,
        postfix_conf: None,
    };
    lost.map(|()| mta)
}

// ---------------------------------------------------------------------------------------
// OpenSMTPD

fn start_opensmtpd(dir: TempDir, port: u16) -> Option<Mta> {
    let root = dir.path().to_path_buf();
    let spool = root.join("spool");
    let rundir = root.join("run");
    for d in [&spool, &rundir] {
        std::fs::create_dir(d).expect("mkdir");
    }
    set_mode(&spool, 0o711);
    // The bind mount targets; the spool one is a mount point only.
    std::fs::create_dir_all("/var/spool/smtpd").expect("mkdir /var/spool/smtpd");
    // Its defaults resolve every client's name: only /etc/hosts, and a name server
    // that is not there, so no query leaves the machine.
    let resolv = root.join("resolv.conf");
    std::fs::write(&resolv, "lookup file\nnameserver 127.0.0.1\n").expect("resolv.conf");
    let conf = root.join("smtpd.conf");
    // Mail for anything from anyone on loopback; the relay action is never run because
    // the delivery agents start paused (-P mta -P mda): everything stays queued.
    std::fs::write(
        &conf,
        format!(
            "listen on 127.0.0.1 port {port} hostname opensmtpd.test
action \"queue\" relay host smtp://127.0.0.1:9
match from any for any action \"queue\"
"
        ),
    )
    .expect("smtpd.conf");
    // smtpd uses fixed paths for its spool, control socket and pid file: give it
    // private ones in a mount namespace of its own.
    let script = format!(
        "set -e
mount --bind {spool} /var/spool/smtpd
mount --bind {rundir} /run
mount --bind {resolv} /etc/resolv.conf
exec {smtpd} -d -f {conf} -P mta -P mda
",
        spool = spool.display(),
        rundir = rundir.display(),
        resolv = resolv.display(),
        smtpd = Kind::OpenSmtpd.binary().display(),
        conf = conf.display(),
    );
    let log = root.join("smtpd.log");
    let out = std::fs::File::create(&log).expect("create smtpd log");
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .spawn()
        .expect("spawn unshare smtpd");
    let mut child = Some(child);
    let lost = wait_listening(
        Kind::OpenSmtpd,
        port,
        &mut child,
        &log,
        &["Address already in use"],
    );
    let mta = Mta {
        kind: Kind::OpenSmtpd,
        direct: SocketAddr::from(([127, 0, 0, 1], port)),
        recorder: Recorder::start(SocketAddr::from(([127, 0, 0, 1], port))),
        dir,
        log,
        child,
        postfix_conf: None,
    };
    lost.map(|()| mta)
}

// ---------------------------------------------------------------------------------------
// Log parsing

/// The accepted messages in an MTA's log:
/// - Postfix: `qmgr[..]: QUEUEID: from=<..>, size=N, nrcpt=N (queue active)`;
/// - Exim: `ID <= sender ... for rcpt1 rcpt2` (`log_selector = +received_recipients`);
/// - OpenSMTPD: `smtp message msgid=ID size=N nrcpt=N proto=..`.
pub fn parse_accepted(kind: Kind, log: &str) -> Vec<Accepted> {
    let mut out = Vec::new();
    for line in log.lines() {
        let parsed = match kind {
            Kind::Postfix => parse_postfix(line),
            Kind::Exim => parse_exim(line),
            Kind::OpenSmtpd => parse_opensmtpd(line),
        };
        if let Some((id, recipients)) = parsed {
            out.push(Accepted {
                id,
                recipients,
                line: line.to_string(),
            });
        }
    }
    out
}

fn field_after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(key)? + key.len();
    let rest = &line[start..];
    let end = rest.find([' ', ',', ')']).unwrap_or(rest.len());
    Some(&rest[..end])
}

fn parse_postfix(line: &str) -> Option<(String, usize)> {
    if !line.contains("/qmgr[") || !line.contains(" nrcpt=") || !line.contains("from=<") {
        return None;
    }
    let nrcpt = field_after(line, " nrcpt=")?.parse().ok()?;
    let after = &line[line.find("]: ")? + 3..];
    let id = after.split(':').next()?.to_string();
    Some((id, nrcpt))
}

fn parse_exim(line: &str) -> Option<(String, usize)> {
    let mut words = line.split(' ');
    // `YYYY-MM-DD HH:MM:SS ID <= sender ...`
    let (_date, _time, id, arrow) = (words.next()?, words.next()?, words.next()?, words.next()?);
    if arrow != "<=" {
        return None;
    }
    let for_at = line.rfind(" for ")?;
    let recipients = line[for_at + 5..].split_whitespace().count();
    Some((id.to_string(), recipients))
}

fn parse_opensmtpd(line: &str) -> Option<(String, usize)> {
    if !line.contains(" smtp message ") {
        return None;
    }
    let id = field_after(line, " msgid=")?.to_string();
    let nrcpt = field_after(line, " nrcpt=")?.parse().ok()?;
    Some((id, nrcpt))
}

// ---------------------------------------------------------------------------------------
// The recorder

/// What went through one forwarded connection.
#[derive(Clone, Debug, Default)]
pub struct Recorded {
    /// Client (postern) to MTA.
    pub up: Vec<u8>,
    /// MTA to client.
    pub down: Vec<u8>,
}

/// A transparent TCP forwarder on a loopback port of its own, in front of `target`,
/// keeping every byte of every connection. Runs on a thread with its own runtime, so it
/// works whatever the test's runtime does (blocking waits included); stops on drop.
pub struct Recorder {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<Recorded>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    pub fn start(target: SocketAddr) -> Recorder {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind recorder");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("recorder addr");
        let conns: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = conns.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("recorder runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                let accept_loop = async {
                    while let Ok((client, _)) = listener.accept().await {
                        let index = {
                            let mut c = shared.lock().unwrap();
                            c.push(Recorded::default());
                            c.len() - 1
                        };
                        tokio::spawn(forward(client, target, shared.clone(), index));
                    }
                };
                tokio::select! {
                    _ = accept_loop => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime cancels every forwarding task.
        });
        Recorder {
            addr,
            conns,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Every connection so far, in the order they were accepted.
    pub fn connections(&self) -> Vec<Recorded> {
        self.conns.lock().unwrap().clone()
    }

    /// How many connections were accepted so far.
    pub fn count(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// Everything sent to the MTA on connections from the `since`-th on, concatenated.
    pub fn up_since(&self, since: usize) -> Vec<u8> {
        self.conns.lock().unwrap()[since..]
            .iter()
            .flat_map(|c| c.up.iter().copied())
            .collect()
    }

    /// Everything sent to the MTA so far.
    pub fn up(&self) -> Vec<u8> {
        self.up_since(0)
    }

    /// Both directions of every connection, printable, for failure messages.
    pub fn transcript(&self) -> String {
        let mut out = String::new();
        for (i, c) in self.connections().iter().enumerate() {
            out.push_str(&format!(
                "== connection {i}: to the MTA ==\n{:?}\n== from the MTA ==\n{:?}\n",
                String::from_utf8_lossy(&c.up),
                String::from_utf8_lossy(&c.down)
            ));
        }
        out
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn forward(
    client: tokio::net::TcpStream,
    target: SocketAddr,
    conns: Arc<Mutex<Vec<Recorded>>>,
    index: usize,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(server)) = tokio::time::timeout(STEP, tokio::net::TcpStream::connect(target)).await
    else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up_conns = conns.clone();
    let up = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            up_conns.lock().unwrap()[index]
                .up
                .extend_from_slice(&buf[..n]);
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            conns.lock().unwrap()[index]
                .down
                .extend_from_slice(&buf[..n]);
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    // Both directions run to their end; each side's close is passed on as a FIN. An
    // idle connection is cut after ten minutes at the latest.
    let _ = tokio::time::timeout(Duration::from_secs(600), async { tokio::join!(up, down) }).await;
}

/// Speaks to `addr` directly (not through postern), synchronously: writes `stream` as
/// one write, or line by line with a pause after each, then reads until the server
/// closes or goes quiet for `quiet`. For probing how an MTA itself reads a stream.
pub fn converse(addr: SocketAddr, writes: &[&[u8]], quiet: Duration) -> String {
    let mut s = TcpStream::connect_timeout(&addr, STEP).expect("connect");
    s.set_read_timeout(Some(quiet)).expect("timeout");
    s.set_write_timeout(Some(STEP)).expect("timeout");
    let mut got = Vec::new();
    let read_some = |s: &mut TcpStream, got: &mut Vec<u8>| -> bool {
        let mut buf = [0u8; 8192];
        match s.read(&mut buf) {
            Ok(0) => false,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                true
            }
            Err(_) => false,
        }
    };
    read_some(&mut s, &mut got);
    for w in writes {
        if s.write_all(w).is_err() {
            break;
        }
        // Let the server answer before the next write (no pipelining).
        while read_some(&mut s, &mut got) {
            if got.ends_with(b"\r\n") {
                break;
            }
        }
    }
    while read_some(&mut s, &mut got) {}
    String::from_utf8_lossy(&got).into_owned()
}
