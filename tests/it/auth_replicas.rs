//! Issue 12, point 10: three postern replicas behind a real HAProxy (`balance
//! roundrobin`, `send-proxy`) share their AUTH failure windows through one real
//! `redis-server` (`--limits-store`), so failures spread over the replicas meet the
//! per-network and per-user budgets exactly as one process would; with Redis stopped,
//! `--limits-store-failure` decides: `closed` refuses AUTH with 454, `open` falls back on
//! each replica's own windows.
//!
//! Each client network is a loopback address of its own (Linux routes all of 127/8 to
//! `lo`): the client binds it, HAProxy passes it on in its PROXY header, and postern
//! believes that header only from HAProxy's 127.0.0.1.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::common::haproxy::Haproxy;
use crate::common::postern::USER;
use crate::common::redis::Redis;
use crate::common::*;

/// The per-network and per-user budgets: postern's defaults, spelled out.
const PER_NET: usize = 20;
const PER_USER: usize = 10;

/// The slowdown of a name at its budget; each failure past it doubles it.
const USER_DELAY: Duration = Duration::from_millis(100);

/// Three replicas with one users file and one certificate, HAProxy in front.
struct Cluster {
    replicas: Vec<(Postern, SocketAddr)>,
    _haproxy: Haproxy,
    front: SocketAddr,
    certs: TestCerts,
    _backend: RawBackend,
}

impl Cluster {
    fn start(redis: &Redis, failure: &str) -> Cluster {
        let backend = RawBackend::start();
        let certs = TestCerts::generate();
        let replica = || {
            let admin = free_addr();
            let postern = Postern::builder(backend.addr)
                .default_limits()
                .certs(certs.clone())
                .users_file(&[&format!("{USER}:{{PLAIN}}{PASSWORD}")])
                .flag("--metrics-listen", admin.to_string())
                .flag("--proxy-protocol", "true")
                .flag("--proxy-protocol-from", "127.0.0.1/32")
                .flag("--limits-store", redis.url())
                .flag("--limits-store-failure", failure)
                .flag("--limits-store-timeout", "300ms")
                .flag("--auth-failure-delay", "100ms")
                // Redis windows are aligned on the epoch: with 15 minutes, one in a few
                // dozen runs would see a window turn, and the failures before it weigh
                // less than one each. 30 days make that negligible.
                .flag("--auth-failure-window", "720h")
                .start();
            wait_until(STEP, "admin endpoint", || accepts(admin).then_some(()));
            (postern, admin)
        };
        let replicas: Vec<(Postern, SocketAddr)> = (0..3).map(|_| replica()).collect();
        let servers: Vec<SocketAddr> = replicas.iter().map(|(p, _)| p.smtps).collect();
        let haproxy = Haproxy::balance(Ipv4Addr::LOCALHOST.into(), &servers, "send-proxy");
        let front = haproxy.frontends[0];
        Cluster {
            replicas,
            _haproxy: haproxy,
            front,
            certs,
            _backend: backend,
        }
    }

    /// A session through HAProxy from `client` (127.0.0.x), greeted and past EHLO.
    async fn from(&self, client: Ipv4Addr) -> SmtpClient {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from((client, 0)))
            .unwrap_or_else(|e| panic!("bind {client}: {e}"));
        let tcp = within("connect to HAProxy", socket.connect(self.front))
            .await
            .expect("connect to HAProxy");
        let mut c = SmtpClient::from_tcp(tcp);
        c.upgrade(self.certs.client_config()).await;
        c.expect("220").await;
        c.cmd("EHLO client.test", "250").await;
        c
    }

    /// One AUTH PLAIN from `client` on a connection of its own; the reply's first four
    /// characters and how long it took.
    async fn attempt(&self, client: Ipv4Addr, user: &str, password: &str) -> (String, Duration) {
        let mut c = self.from(client).await;
        let started = Instant::now();
        c.line(&format!("AUTH PLAIN {}", plain_response(user, password)))
            .await;
        let reply = c.read_reply().await;
        (reply.raw.chars().take(9).collect(), started.elapsed())
    }

    /// `name` (a full series, labels included) on each replica.
    async fn per_replica(&self, name: &str) -> Vec<f64> {
        let mut values = Vec::new();
        for (_, admin) in &self.replicas {
            values.push(metric_sum(*admin, name).await.unwrap_or(0.0));
        }
        values
    }
}

fn net(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

const FAILED: &str = "postern_auth_attempts_total{mechanism=\"plain\",result=\"failure\"}";

/// Both tests, with Redis up: the network budget, then the user budget, each met over
/// all three replicas as in one process. Returns how the guessing network's failures
/// were spread over the replicas.
async fn budgets_hold_across_replicas(cluster: &Cluster) -> Vec<f64> {
    // A network that logs in before the attack.
    let home = net(5);
    let (reply, _) = cluster.attempt(home, USER, PASSWORD).await;
    assert_eq!(reply, "235 2.7.0", "home login");

    // 1. The network budget: PER_NET failures from one network, for as many names,
    // spread by HAProxy over the replicas; the next is refused on every replica.
    let guesser = net(2);
    for i in 0..PER_NET {
        let (reply, _) = cluster.attempt(guesser, &format!("guess{i}"), "x").await;
        assert_eq!(&reply[..3], "535", "failure {i} of the budget");
    }
    let spread = cluster.per_replica(FAILED).await;
    eprintln!("{PER_NET} failures from one network, per replica: {spread:?}");
    assert_eq!(spread.iter().sum::<f64>(), PER_NET as f64);
    assert!(spread.iter().all(|&n| n > 0.0), "not spread: {spread:?}");
    for i in 0..3 {
        let (reply, _) = cluster.attempt(guesser, &format!("late{i}"), "x").await;
        assert_eq!(
            reply,
            "454 4.7.0",
            "attempt {} over the budget",
            PER_NET + i
        );
    }
    // Refused without a check: no replica verified another one.
    assert_eq!(cluster.per_replica(FAILED).await, spread);

    // 2. The user budget: one wrong password for alice from each of PER_USER + 3
    // networks (the last three, past the budget, slowed but not refused: they had not
    // failed her before).
    let attackers: Vec<Ipv4Addr> = (0..PER_USER as u8 + 3).map(|i| net(10 + i)).collect();
    for &from in &attackers {
        let (reply, _) = cluster.attempt(from, USER, "wrong").await;
        assert_eq!(&reply[..3], "535", "alice from {from}");
    }
    // Those networks are refused for alice on every replica, right password or not...
    for &from in &attackers[..3] {
        let (reply, _) = cluster.attempt(from, USER, PASSWORD).await;
        assert_eq!(reply, "454 4.7.0", "alice from {from}, which failed her");
    }
    // ...a fresh network logs in, slowed: three failures past the budget, 8 x 100 ms...
    let (reply, took) = cluster.attempt(net(60), USER, PASSWORD).await;
    assert_eq!(reply, "235 2.7.0", "alice from a fresh network");
    assert!(took >= USER_DELAY * 7, "not slowed: {took:?}");
    // ...and the network that logged in before is neither refused nor slowed, on any
    // replica.
    for _ in 0..3 {
        let (reply, took) = cluster.attempt(home, USER, PASSWORD).await;
        assert_eq!(reply, "235 2.7.0", "alice from home");
        assert!(took < USER_DELAY * 5, "home slowed: {took:?}");
    }
    spread
}

/// `closed`: with Redis stopped every replica answers AUTH with 454 4.7.0, and counts
/// it; once Redis is back (empty), logins work again.
#[tokio::test]
async fn three_replicas_share_one_budget_and_refuse_auth_without_redis_when_closed() {
    if !have("haproxy") {
        return;
    }
    let Some(mut redis) = Redis::start("the replica tests") else {
        return;
    };
    let cluster = Cluster::start(&redis, "closed");
    budgets_hold_across_replicas(&cluster).await;

    redis.stop();
    for i in 0..3 {
        let (reply, took) = cluster.attempt(net(70 + i), USER, PASSWORD).await;
        assert_eq!(reply, "454 4.7.0", "closed, Redis down, replica {i}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
    let errors = cluster
        .per_replica("postern_limits_store_errors_total{operation=\"auth_reserve\"}")
        .await;
    let refused = cluster
        .per_replica("postern_auth_throttled_total{scope=\"store_unavailable\"}")
        .await;
    assert!(errors.iter().all(|&n| n >= 1.0), "{errors:?}");
    assert!(refused.iter().all(|&n| n >= 1.0), "{refused:?}");

    redis.restart();
    let deadline = Instant::now() + STEP;
    for i in 0..3 {
        loop {
            let (reply, _) = cluster.attempt(net(80 + i), USER, PASSWORD).await;
            if reply == "235 2.7.0" {
                break;
            }
            assert!(Instant::now() < deadline, "never back: {reply}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `open`: with Redis stopped the replicas fall back on their own windows, which hold
/// what each saw while Redis was up: alice logs in from a fresh network, and the guessing
/// network, over its budget in Redis, may fail again on each replica until that
/// replica's own count reaches the budget.
#[tokio::test]
async fn three_replicas_share_one_budget_and_fall_back_on_their_own_windows_when_open() {
    if !have("haproxy") {
        return;
    }
    let Some(mut redis) = Redis::start("the replica tests") else {
        return;
    };
    let cluster = Cluster::start(&redis, "open");
    let spread = budgets_hold_across_replicas(&cluster).await;

    redis.stop();
    for i in 0..3 {
        let (reply, _) = cluster.attempt(net(70 + i), USER, PASSWORD).await;
        assert_eq!(reply, "235 2.7.0", "open, Redis down, replica {i}");
    }
    // Round robin gives each replica PER_NET of these attempts: each lets through what
    // its own budget has left after the failures it counted itself, then refuses.
    let before = cluster.per_replica(FAILED).await;
    let mut refused = 0;
    for i in 0..3 * PER_NET {
        let (reply, _) = cluster.attempt(net(2), &format!("down{i}"), "x").await;
        match &reply[..3] {
            "535" => {}
            "454" => refused += 1,
            _ => panic!("attempt {i} with Redis down: {reply}"),
        }
    }
    let after = cluster.per_replica(FAILED).await;
    eprintln!(
        "Redis down: failures from the guessing network per replica {before:?} -> {after:?}, \
         {refused} refused"
    );
    for i in 0..3 {
        let own = spread[i] + (after[i] - before[i]);
        assert_eq!(
            own, PER_NET as f64,
            "replica {i}: {spread:?}, {before:?} -> {after:?}"
        );
    }
    // Each replica alone let through PER_NET in all: 3 x PER_NET, of which PER_NET
    // before the outage.
    assert_eq!(refused, PER_NET);
    let errors = cluster
        .per_replica("postern_limits_store_errors_total{operation=\"auth_reserve\"}")
        .await;
    assert!(errors.iter().all(|&n| n >= 1.0), "{errors:?}");
}
