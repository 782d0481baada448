//! A private Dovecot 2.3 (Debian `dovecot-core`) running only its auth service, with a
//! generated configuration: on a UNIX socket in a temporary directory and on a loopback
//! TCP port, with a passwd-file passdb (one `{PLAIN}`, one `{SHA512-CRYPT}` and one
//! `{CRAM-MD5}` user, one with `nologin`) and a checkpassword passdb that always fails
//! temporarily, for the user `broken`.
//!
//! Without Dovecot (or root) [`Dovecot::start`] skips loudly, unless `CI` is set: then it
//! fails, since `.ci/run` installs `dovecot-core`.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

use super::{PASSWORD, STEP, free_port, is_root, wait_until};
use postern::auth::dovecot::Target;

pub const DOVECOT: &str = "/usr/sbin/dovecot";

/// `{SHA512-CRYPT}` of [`PASSWORD`] (`doveadm pw -s SHA512-CRYPT -p secret`).
pub const SHA512_CRYPT: &str = "{SHA512-CRYPT}$6$pTjLcWoGrkF.l9DI$zdSaXWUA4syPMC6XHC4tXCqGxflacJSA.\
y3yD5Fxcl5V1mXphupSRkr/t7/Y788TSDyijqV.A/ytb6OMFEPiH.";
/// `{CRAM-MD5}` of [`PASSWORD`]: the HMAC-MD5 key state, usable for CRAM-MD5 and PLAIN.
pub const CRAM_MD5: &str =
    "{CRAM-MD5}cd3ba7deaad6e5ca23448ba42e379747a9e0f7f1fbc00c8a81bbaac395731b56";

/// What the tests' Dovecot offers, in the order its handshake lists them.
pub const MECHANISMS: [&str; 4] = ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"];

// === a private Dovecot ===

/// Whether Dovecot can run here. Prints a loud SKIP when not, and fails when `CI` is set.
pub fn available() -> bool {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root (Dovecot starts as root and drops to its own users)".to_string());
    }
    if !Path::new(DOVECOT).exists() {
        missing.push(format!("{DOVECOT} (Debian dovecot-core)"));
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for user in ["dovecot", "dovenull"] {
        if !passwd.lines().any(|l| l.starts_with(&format!("{user}:"))) {
            missing.push(format!("user {user} (created by dovecot-core)"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    eprintln!(
        "\n*** SKIP: Dovecot cannot run here: missing {}. `.ci/run` installs dovecot-core. ***\n",
        missing.join(", ")
    );
    assert!(
        std::env::var_os("CI").is_none(),
        "Dovecot must be runnable in CI (.ci/run): missing {}",
        missing.join(", ")
    );
    false
}

/// A Dovecot running only its auth service, killed on drop (printing its log if the
/// test failed).
pub struct Dovecot {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

/// What a test may change in the generated configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `auth_failure_delay`: `0` by default (Dovecot's 2 s would only slow tests down).
    pub failure_delay: String,
    /// `auth_mechanisms`.
    pub mechanisms: String,
    /// Appended to the configuration as it is (another passdb, a second listener).
    pub extra: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            failure_delay: "0".into(),
            mechanisms: "plain login cram-md5 scram-sha-256".into(),
            extra: String::new(),
        }
    }
}

impl Dovecot {
    /// Starts one with `auth_failure_delay = 0` (Dovecot's 2 s would only slow the
    /// tests down), or returns `None` after a loud SKIP.
    pub fn start() -> Option<Dovecot> {
        Dovecot::start_with_failure_delay("0")
    }

    pub fn start_with_failure_delay(delay: &str) -> Option<Dovecot> {
        Dovecot::start_with(Settings {
            failure_delay: delay.into(),
            ..Settings::default()
        })
    }

    /// Starts one with `settings`, or returns `None` after a loud SKIP.
    pub fn start_with(settings: Settings) -> Option<Dovecot> {
        if !available() {
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        // Dovecot's auth process runs as `dovecot` and reads the users file from here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod dir");
        let users = format!(
            "alice:{{PLAIN}}{PASSWORD}\n\
             bob:{SHA512_CRYPT}\n\
             carol:{CRAM_MD5}\n\
             dave:{{PLAIN}}{PASSWORD}::::::nologin reason=Moved\n"
        );
        std::fs::write(dir.path().join("users"), users).expect("write users");
        // checkpassword's "temporary failure" exit code.
        let tempfail = dir.path().join("tempfail.sh");
        std::fs::write(&tempfail, "#!/bin/sh\nexit 111\n").expect("write tempfail.sh");
        std::fs::set_permissions(&tempfail, std::fs::Permissions::from_mode(0o755))
            .expect("chmod tempfail.sh");
        let mut dovecot = Dovecot {
            dir,
            port: 0,
            child: None,
        };
        // The free port can be taken between the probe and Dovecot's bind: retry then.
        for _ in 0..5 {
            dovecot.port = free_port();
            std::fs::write(dovecot.conf(), dovecot.config(&settings)).expect("write dovecot.conf");
            if dovecot.spawn() {
                return Some(dovecot);
            }
        }
        panic!("Dovecot did not start:\n{}", dovecot.log());
    }

    /// The whole configuration: nothing from /etc/dovecot.
    fn config(&self, settings: &Settings) -> String {
        let dir = self.dir.path().display();
        let port = self.port;
        let Settings {
            failure_delay,
            mechanisms,
            extra,
        } = settings;
        format!(
            "# A private Dovecot for postern's tests: the auth service and nothing else.
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
protocols =
listen = 127.0.0.1
ssl = no
auth_mechanisms = {mechanisms}
auth_failure_delay = {failure_delay}
auth_verbose = yes
# Logs each request line as received (resp= hidden): what postern sent.
auth_debug = yes
passdb {{
  driver = passwd-file
  args = {dir}/users
}}
# Only for the user `broken`: a passdb that always fails temporarily.
passdb {{
  driver = checkpassword
  args = {dir}/tempfail.sh
  username_filter = broken
}}
service auth {{
  unix_listener {dir}/auth-client {{
    mode = 0600
  }}
  inet_listener {{
    address = 127.0.0.1
    port = {port}
  }}
}}
{extra}
"
        )
    }

    /// The directory holding the configuration, the users file, the sockets and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("dovecot.conf")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("auth-client")
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `unix:<dir>/auth-client`.
    pub fn unix(&self) -> Target {
        Target::Unix(self.socket())
    }

    /// `inet:127.0.0.1:<port>`.
    pub fn inet(&self) -> Target {
        format!("inet:127.0.0.1:{}", self.port)
            .parse()
            .expect("inet target")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default()
    }

    /// Starts the process (in its own process group, so that it and its children can
    /// be signalled at once) and waits until both listeners accept. `false` if it
    /// exited because its port was taken.
    pub fn spawn(&mut self) -> bool {
        let child = Command::new(DOVECOT)
            .arg("-c")
            .arg(self.conf())
            .arg("-F")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {DOVECOT}: {e}"));
        self.child = Some(child);
        let socket = self.socket();
        let addr = self.addr();
        let up = wait_until(STEP, "Dovecot's listeners", || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Some(Err(status));
            }
            let unix = std::os::unix::net::UnixStream::connect(&socket).is_ok();
            (unix && super::accepts(addr)).then_some(Ok(()))
        });
        match up {
            Ok(()) => true,
            Err(status) => {
                self.child = None;
                let log = self.log();
                assert!(
                    log.contains("Address already in use"),
                    "Dovecot exited ({status}):\n{log}"
                );
                false
            }
        }
    }

    /// Sends `signal` to Dovecot's process group (the master and every child).
    pub fn signal(&self, signal: &str) {
        let Some(child) = &self.child else {
            return;
        };
        let status = Command::new("kill")
            .args([&format!("-{signal}"), "--", &format!("-{}", child.id())])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Kills every Dovecot process at once (no orderly shutdown) and reaps the master.
    pub fn kill(&mut self) {
        self.signal("CONT");
        self.signal("KILL");
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// Starts it again with the same configuration, listeners and files.
    pub fn restart(&mut self) {
        assert!(self.spawn(), "Dovecot's port was taken during the restart");
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- dovecot.log ---\n{}", self.log());
        }
    }
}
