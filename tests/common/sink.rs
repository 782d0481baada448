//! The real Postfix `smtp-sink` as a backend, dumping every message to a file.
//!
//! The dump is not byte-exact (smtp-sink turns CRLF into LF and undoes dot-stuffing, and
//! prepends its own `X-*` and `Received:` headers); byte-exact checks use
//! [`super::RawBackend`].

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use tempfile::TempDir;

use super::{STEP, accepts, free_addr, is_root, wait_until};

/// Where Debian's postfix package installs it.
pub const SMTP_SINK: &str = "/usr/sbin/smtp-sink";

/// A running `smtp-sink`, killed on drop.
pub struct SmtpSink {
    child: Child,
    pub addr: SocketAddr,
    dump: PathBuf,
    dir: TempDir,
}

impl SmtpSink {
    /// Starts `smtp-sink` on a free loopback port and waits until it accepts.
    pub fn start() -> SmtpSink {
        Self::start_with(&[])
    }

    /// Like [`Self::start`] with extra smtp-sink options (see smtp-sink(1)).
    pub fn start_with(extra: &[&str]) -> SmtpSink {
        Self::start_with_backlog(extra, 100)
    }

    /// Like [`Self::start_with`] with smtp-sink's listen backlog set to `backlog` (the
    /// default 100 makes a burst of hundreds of connections wait out SYN retries).
    pub fn start_with_backlog(extra: &[&str], backlog: u32) -> SmtpSink {
        let dir = tempfile::tempdir().expect("tempdir");
        let dump = dir.path().join("dump");
        std::fs::create_dir(&dump).expect("mkdir dump");
        // As root smtp-sink must drop privileges (-u); the unprivileged user then needs to
        // reach and write the dump directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod tempdir");
        std::fs::set_permissions(&dump, std::fs::Permissions::from_mode(0o777))
            .expect("chmod dump");

        for _attempt in 0..3 {
            let addr = free_addr();
            let mut cmd = Command::new(SMTP_SINK);
            if is_root() {
                cmd.args(["-u", "nobody"]);
            }
            // -d DIR/%M. : one file per message, named minute.random-hex.
            cmd.arg("-d").arg(format!("{}/%M.", dump.display()));
            cmd.args(["-h", "sink.test"]);
            cmd.args(extra);
            cmd.arg(addr.to_string()).arg(backlog.to_string());
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let mut child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {SMTP_SINK} (apt-get install postfix): {e}"));
            let start = Instant::now();
            loop {
                if child.try_wait().expect("try_wait").is_some() {
                    break; // probably lost the port race: next attempt
                }
                if accepts(addr) {
                    return SmtpSink {
                        child,
                        addr,
                        dump,
                        dir,
                    };
                }
                if start.elapsed() > STEP {
                    let _ = child.kill();
                    panic!("smtp-sink did not accept on {addr} within {STEP:?}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("smtp-sink failed to start three times");
    }

    /// The messages dumped so far, oldest first.
    pub fn messages(&self) -> Vec<String> {
        let mut files: Vec<(SystemTime, PathBuf)> = std::fs::read_dir(&self.dump)
            .expect("read dump dir")
            .filter_map(|e| e.ok())
            .map(|e| {
                let t = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                (t, e.path())
            })
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|(_, p)| {
                let bytes = std::fs::read(&p).expect("read dump file");
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .collect()
    }

    /// Waits until `n` messages have been dumped completely and returns them.
    pub fn wait_for_messages(&self, n: usize) -> Vec<String> {
        // A dump file is complete once its size stops changing (smtp-sink writes while
        // the DATA arrives and closes the file at the final dot).
        let mut last: Option<Vec<usize>> = None;
        wait_until(STEP, &format!("{n} message(s) in smtp-sink's dump"), || {
            let msgs = self.messages();
            let sizes: Vec<usize> = msgs.iter().map(|m| m.len()).collect();
            let stable = last.as_ref() == Some(&sizes);
            last = Some(sizes);
            (msgs.len() >= n && stable).then_some(msgs)
        })
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}
