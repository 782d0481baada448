//! A real HAProxy in TCP mode (`haproxy -f CFG -db`, foreground) in front of postern,
//! for the PROXY protocol tests; killed on drop.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{STEP, accepts, free_addr_on};

/// One frontend: HAProxy listens on a free port of `ip` and passes each connection to
/// `server` with `option` (`send-proxy`, `send-proxy-v2`, health-check settings...).
pub struct Route<'a> {
    pub ip: IpAddr,
    pub server: SocketAddr,
    pub option: &'a str,
}

const HAPROXY_DEFAULTS: &str = "global\n    maxconn 200\n\
     defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n";

pub struct Haproxy {
    child: Child,
    _dir: TempDir,
    log: PathBuf,
    /// Where each route's frontend listens, in the order given.
    pub frontends: Vec<SocketAddr>,
}

impl Haproxy {
    /// Starts HAProxy with one frontend per route and waits until each accepts.
    pub fn start(routes: &[Route]) -> Haproxy {
        // Ports picked now can be taken before HAProxy binds them: retry.
        for _attempt in 0..3 {
            if let Some(haproxy) = Self::try_start(routes) {
                return haproxy;
            }
        }
        panic!("HAProxy lost the race for free ports three times");
    }

    /// One frontend on a free port of `ip` spreading connections over `servers` in turn
    /// (`balance roundrobin`), each with `option`: replicas behind a load balancer.
    pub fn balance(ip: IpAddr, servers: &[SocketAddr], option: &str) -> Haproxy {
        for _attempt in 0..3 {
            let front = free_addr_on(ip);
            let mut cfg = format!(
                "{HAPROXY_DEFAULTS}frontend fe\n    bind {front}\n    default_backend replicas\n\
                 backend replicas\n    balance roundrobin\n"
            );
            for (i, server) in servers.iter().enumerate() {
                cfg.push_str(&format!("    server replica{i} {server} {option}\n"));
            }
            if let Some(haproxy) = Self::run(cfg, vec![front]) {
                return haproxy;
            }
        }
        panic!("HAProxy lost the race for a free port three times");
    }

    fn try_start(routes: &[Route]) -> Option<Haproxy> {
        let frontends: Vec<SocketAddr> = routes.iter().map(|r| free_addr_on(r.ip)).collect();
        let mut cfg = String::from(HAPROXY_DEFAULTS);
        for (i, (route, bind)) in routes.iter().zip(&frontends).enumerate() {
            cfg.push_str(&format!(
                "frontend fe{i}\n    bind {bind}\n    default_backend be{i}\n\
                 backend be{i}\n    server postern {} {}\n",
                route.server, route.option
            ));
        }
        Self::run(cfg, frontends)
    }

    /// Runs HAProxy with `cfg`; `None` if one of `frontends` was taken meanwhile.
    fn run(cfg: String, frontends: Vec<SocketAddr>) -> Option<Haproxy> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &cfg).expect("write haproxy.cfg");
        let log = dir.path().join("haproxy.log");
        let log_file = std::fs::File::create(&log).expect("haproxy log");
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup"))
            .stderr(log_file)
            .spawn()
            .expect("spawn haproxy");
        let mut haproxy = Haproxy {
            child,
            _dir: dir,
            log,
            frontends,
        };
        for bind in haproxy.frontends.clone() {
            let deadline = Instant::now() + STEP;
            while !accepts(bind) {
                if let Ok(Some(status)) = haproxy.child.try_wait() {
                    let log = haproxy.log_text();
                    if log.contains("in use") {
                        return None;
                    }
                    panic!("haproxy exited ({status}):\n{log}\n{cfg}");
                }
                assert!(Instant::now() < deadline, "haproxy never bound {bind}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Some(haproxy)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- haproxy output -----\n{}", self.log_text());
        }
    }
}
