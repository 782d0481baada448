//! A private `redis-server` (the limits store replicas share), saving nothing to disk.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use super::{STEP, accepts, free_port, wait_until};

/// A `redis-server` on a loopback port, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// `None`, after a message, when redis-server is not installed; in CI (`CI` set) a
    /// missing server fails the test instead.
    pub fn start() -> Option<RedisServer> {
        let Some(binary) = ["/usr/bin/redis-server", "/usr/sbin/redis-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
        else {
            assert!(
                std::env::var_os("CI").is_none(),
                "redis-server must be installed in CI (.ci/run)"
            );
            eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
            return None;
        };
        let mut server = RedisServer {
            port: free_port(),
            child: None,
        };
        server.run(binary);
        Some(server)
    }

    fn run(&mut self, binary: &str) {
        let child = Command::new(binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        wait_until(STEP, "redis-server to accept", || {
            accepts(addr).then_some(())
        });
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server: an outage. Its data is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A new, empty server on the same port: Redis back after an outage.
    pub fn restart(&mut self) {
        self.stop();
        let binary = ["/usr/bin/redis-server", "/usr/sbin/redis-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("redis-server");
        self.run(binary);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
