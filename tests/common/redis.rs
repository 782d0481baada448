//! A private `redis-server` on a free loopback port, saving nothing to disk, for the
//! shared per-user limits store (`--limits-store redis://...`); killed on drop.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::{STEP, accepts, free_addr, wait_until};

/// Where Debian installs it.
const REDIS_SERVER: &str = "/usr/bin/redis-server";

pub struct Redis {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The redis-server found at start, for restarts.
    binary: &'static str,
}

impl Redis {
    /// Starts redis-server and waits until it accepts; `None` (after saying so) when it
    /// is not installed and `CI` is unset. `what` names the cases that then do not run.
    pub fn start(what: &str) -> Option<Redis> {
        let Some(binary) = [REDIS_SERVER, "/usr/sbin/redis-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
        else {
            assert!(
                std::env::var_os("CI").is_none(),
                "redis-server is not installed and CI is set (apt-get install redis-server)"
            );
            eprintln!(
                "SKIPPED: redis-server is not installed (apt-get install redis-server); \
                 {what} did not run"
            );
            return None;
        };
        for _attempt in 0..3 {
            let mut redis = Redis {
                child: None,
                addr: free_addr(),
                binary,
            };
            if redis.run() {
                return Some(redis);
            }
        }
        panic!("redis-server failed to start three times");
    }

    /// A new, empty server on the same port: Redis back after an outage.
    pub fn restart(&mut self) {
        self.stop();
        assert!(self.run(), "redis-server could not take its port back");
    }

    /// Starts redis-server on `self.addr` and waits until it accepts; false if it exited
    /// first (the port was taken).
    fn run(&mut self) -> bool {
        let binary = self.binary;
        let mut child = Command::new(binary)
            .args([
                "--port",
                &self.addr.port().to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
        let addr = self.addr;
        let up = wait_until(STEP, "redis-server to accept", || {
            if child.try_wait().expect("try_wait").is_some() {
                return Some(false); // lost the port race
            }
            accepts(addr).then_some(true)
        });
        if up {
            self.child = Some(child);
        }
        up
    }

    /// The `--limits-store` URL.
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Kills the server, for tests of what postern does when its store goes away.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
