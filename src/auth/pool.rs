//! The verifier pool: how many password verifications run at once, and which waiting
//! attempt gets the next free verifier.
//!
//! A KDF costs about 100 ms of CPU (argon2 also 64 MiB), so at most one verification
//! runs per verifier. Nothing is refused while a verifier is free: an office behind one
//! NAT is never turned away on its own (an earlier try that refused the busiest network
//! outright did just that). One network never runs on every verifier at once, though:
//! the last free one is kept for the others, so on a small machine (two verifiers, two
//! verifications per network) a flood from one network still leaves a user elsewhere a
//! verifier at once, and the network's next attempt waits for its own to end instead.
//!
//! When all are busy, attempts wait in a short queue served by *share*, lowest first:
//! what the attempt's network holds besides it (verifications running and waiting),
//! plus the other attempts it brought to the pool lately, each counting one and
//! decaying by half every [`SHARE_HALF_LIFE`]. A user whose network was quiet until now
//! waits for the next free verifier, not behind a flood from hundreds of networks; with
//! the queue full, the newcomer takes the place of the waiter with the largest share,
//! which is refused; a newcomer whose share is at least that large is refused itself.
//! So under saturation the busiest networks are refused first, and among equals the
//! first come is served first.
//!
//! Counting the attempts a network brings, and not only what it holds, is what tells a
//! flood from many networks apart from a user: each flooding network holds one or two
//! attempts at any moment, as a user does, but brings one after another, and a share
//! follows what the network brings while its attempt waits. Only a network's very
//! first attempt looks like a user's; it is served in its turn, and its next is not.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::limits::{ClientNet, MAX_TRACKED};

/// How fast a network's recent attempts stop counting towards its share.
pub const SHARE_HALF_LIFE: Duration = Duration::from_secs(10);

/// Attempts that may wait per verifier: enough to ride out a burst of logins (at about
/// 100 ms a hash, the last waits under a second), few enough that a flood is refused
/// at once rather than held until its wait times out.
pub const QUEUE_PER_VERIFIER: usize = 8;

/// A share below this, with nothing held, is forgotten.
const FORGOTTEN: f64 = 0.01;

/// Why an attempt got no verifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// The queue was full of attempts from networks with no larger share.
    QueueFull,
    /// It waited, and an attempt from a network with a smaller share took its place.
    Displaced,
    /// It waited until its deadline.
    TimedOut,
}

/// The verifiers and the attempts waiting for one.
#[derive(Debug)]
pub struct VerifierPool {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Verifiers.
    capacity: usize,
    /// Verifiers one network may run on at once: all but one.
    per_net: u32,
    queue_limit: usize,
    running: usize,
    /// In arrival order.
    waiting: Vec<Waiter>,
    next_seq: u64,
    nets: HashMap<ClientNet, Share>,
    /// When a full `nets` may next be swept: a sweep is a scan under the lock, so a
    /// flood of new networks must not cause one per arrival.
    next_sweep: Option<Instant>,
}

#[derive(Debug)]
struct Waiter {
    seq: u64,
    net: ClientNet,
    answer: oneshot::Sender<Answer>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Granted,
    Displaced,
}

/// One network's use of the pool.
#[derive(Debug, Clone, Copy)]
struct Share {
    /// Attempts running or waiting now.
    held: u32,
    /// Of those, running.
    running: u32,
    /// Attempts brought lately, decayed to `updated`.
    recent: f64,
    updated: Instant,
}

impl Share {
    fn decay(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated);
        let halvings = elapsed.as_secs_f64() / SHARE_HALF_LIFE.as_secs_f64();
        self.recent *= 0.5_f64.powf(halvings);
        self.updated = now;
    }

    fn value(&self) -> f64 {
        f64::from(self.held) + self.recent
    }

    /// The value at `now`, without updating the entry.
    fn value_at(mut self, now: Instant) -> f64 {
        self.decay(now);
        self.value()
    }
}

fn lock(mutex: &Mutex<State>) -> MutexGuard<'_, State> {
    // Plain counters and channels: a panic elsewhere cannot leave them inconsistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running verification's verifier; dropping it hands the verifier to the waiter
/// with the lowest share.
#[derive(Debug)]
pub struct Verifier {
    pool: Arc<VerifierPool>,
    net: ClientNet,
}

impl Drop for Verifier {
    fn drop(&mut self) {
        lock(&self.pool.state).finish(self.net, Instant::now());
    }
}

impl VerifierPool {
    /// `capacity` verifiers, and up to `queue_limit` attempts waiting for one.
    pub fn new(capacity: usize, queue_limit: usize) -> Arc<VerifierPool> {
        let capacity = capacity.max(1);
        Arc::new(VerifierPool {
            state: Mutex::new(State {
                capacity,
                per_net: u32::try_from(capacity - 1).unwrap_or(u32::MAX).max(1),
                queue_limit,
                running: 0,
                waiting: Vec::new(),
                next_seq: 0,
                nets: HashMap::new(),
                next_sweep: None,
            }),
        })
    }

    /// A verifier for an attempt from `net`: at once if one is free, else after waiting
    /// (at most `wait`) for its turn by share.
    pub async fn acquire(
        self: &Arc<Self>,
        net: ClientNet,
        wait: Duration,
    ) -> Result<Verifier, Busy> {
        let (seq, answer) = {
            let mut state = lock(&self.state);
            match state.arrive(net, Instant::now()) {
                Arrival::Run => return Ok(self.verifier(net)),
                Arrival::Refused => return Err(Busy::QueueFull),
                Arrival::Wait(seq, answer) => (seq, answer),
            }
        };
        let mut waiting = Waiting {
            pool: self.clone(),
            seq,
            net,
            answer: Some(answer),
        };
        let answer = match waiting.answer.as_mut() {
            Some(answer) => tokio::time::timeout(wait, answer).await,
            None => return Err(Busy::TimedOut),
        };
        match answer {
            Ok(Ok(Answer::Granted)) => {
                // The verifier is ours now: the guard must not give it back.
                waiting.answer = None;
                Ok(self.verifier(net))
            }
            Ok(Ok(Answer::Displaced)) => Err(Busy::Displaced),
            // The sender is only dropped with an answer sent, or once the guard took the
            // waiter out; either way the guard settles it.
            Ok(Err(_)) | Err(_) => Err(Busy::TimedOut),
        }
    }

    fn verifier(self: &Arc<Self>, net: ClientNet) -> Verifier {
        Verifier {
            pool: self.clone(),
            net,
        }
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize, usize) {
        let state = lock(&self.state);
        (state.running, state.waiting.len(), state.nets.len())
    }
}

/// A waiting attempt; dropped before its answer was taken (timed out, or the client
/// went away), it leaves the queue, or hands on a verifier granted meanwhile.
struct Waiting {
    pool: Arc<VerifierPool>,
    seq: u64,
    net: ClientNet,
    answer: Option<oneshot::Receiver<Answer>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let Some(mut answer) = self.answer.take() else {
            return;
        };
        let mut state = lock(&self.pool.state);
        if let Some(at) = state.waiting.iter().position(|w| w.seq == self.seq) {
            state.waiting.remove(at);
            state.unhold(self.net);
        } else if answer.try_recv() == Ok(Answer::Granted) {
            state.finish(self.net, Instant::now());
        }
        // Displaced: the displacing arrival already gave its place back.
    }
}

/// What an arriving attempt does.
enum Arrival {
    Run,
    Wait(u64, oneshot::Receiver<Answer>),
    Refused,
}

impl State {
    fn arrive(&mut self, net: ClientNet, now: Instant) -> Arrival {
        let share = self.note_arrival(net, now);
        // A verifier free now is one no waiter may take (kept for other networks than
        // theirs), or it would have gone to a waiter when it was freed.
        if self.running < self.capacity && self.may_run(net) {
            self.hold(net);
            self.start(net);
            return Arrival::Run;
        }
        // Refusals only once every verifier is busy: a lone network waiting for the one
        // kept for others is bounded by --max-verifications-per-network, not refused.
        if self.running >= self.capacity && self.waiting.len() >= self.queue_limit {
            // The busiest waiter: the largest share, the latest to arrive among equals.
            let busiest = self
                .ranked(now)
                .max_by(|(_, a, x), (_, b, y)| a.total_cmp(b).then(x.cmp(y)))
                .map(|(at, busiest, _)| (at, busiest));
            match busiest {
                Some((at, busiest)) if share < busiest => {
                    let displaced = self.waiting.remove(at);
                    self.unhold(displaced.net);
                    // A waiter that already went away needs no answer.
                    let _ = displaced.answer.send(Answer::Displaced);
                }
                _ => return Arrival::Refused,
            }
        }
        let (answer, receiver) = oneshot::channel();
        let seq = self.next_seq;
        self.next_seq += 1;
        self.waiting.push(Waiter { seq, net, answer });
        self.hold(net);
        Arrival::Wait(seq, receiver)
    }

    /// Each waiter's position, share at `now` and arrival order.
    fn ranked(&self, now: Instant) -> impl Iterator<Item = (usize, f64, u64)> + '_ {
        self.waiting.iter().enumerate().map(move |(at, waiter)| {
            let total = self
                .nets
                .get(&waiter.net)
                .map_or(0.0, |share| share.value_at(now));
            // Not itself: its own hold, and its own arrival counted whole, so that
            // waiters of one network stay in arrival order as their arrivals decay (and
            // a long wait lowers a share by up to one, never starving anyone).
            (at, (total - 2.0).max(0.0), waiter.seq)
        })
    }

    /// Counts an attempt `net` brings; returns the network's share before it.
    fn note_arrival(&mut self, net: ClientNet, now: Instant) -> f64 {
        if !self.nets.contains_key(&net) && self.nets.len() >= MAX_TRACKED {
            self.forget_idle(now);
        }
        let share = self.nets.entry(net).or_insert(Share {
            held: 0,
            running: 0,
            recent: 0.0,
            updated: now,
        });
        share.decay(now);
        let before = share.value();
        share.recent += 1.0;
        before
    }

    /// Drops networks that hold nothing and brought nothing lately (at most once per
    /// half-life); if none, any one that holds nothing: the table stays bounded whatever
    /// the number of networks.
    fn forget_idle(&mut self, now: Instant) {
        if self.next_sweep.is_none_or(|at| now >= at) {
            self.nets.retain(|_, share| {
                share.decay(now);
                share.held > 0 || share.recent >= FORGOTTEN
            });
            self.next_sweep = Some(now + SHARE_HALF_LIFE);
        }
        if self.nets.len() >= MAX_TRACKED
            && let Some(idle) = self
                .nets
                .iter()
                .find(|(_, share)| share.held == 0)
                .map(|(net, _)| *net)
        {
            self.nets.remove(&idle);
        }
    }

    fn hold(&mut self, net: ClientNet) {
        if let Some(share) = self.nets.get_mut(&net) {
            share.held += 1;
        }
    }

    fn unhold(&mut self, net: ClientNet) {
        if let Some(share) = self.nets.get_mut(&net) {
            share.held = share.held.saturating_sub(1);
        }
    }

    /// Whether `net` may run on one more verifier.
    fn may_run(&self, net: ClientNet) -> bool {
        self.nets
            .get(&net)
            .is_none_or(|share| share.running < self.per_net)
    }

    fn start(&mut self, net: ClientNet) {
        self.running += 1;
        if let Some(share) = self.nets.get_mut(&net) {
            share.running += 1;
        }
    }

    /// A verification of `net` ended: its verifier goes to the waiter with the lowest
    /// share (the earliest among equals) whose network may run on one more.
    fn finish(&mut self, net: ClientNet, now: Instant) {
        self.running = self.running.saturating_sub(1);
        if let Some(share) = self.nets.get_mut(&net) {
            share.running = share.running.saturating_sub(1);
        }
        self.unhold(net);
        while self.running < self.capacity {
            let Some(at) = self
                .ranked(now)
                .filter(|&(at, _, _)| self.may_run(self.waiting[at].net))
                .min_by(|(_, a, x), (_, b, y)| a.total_cmp(b).then(x.cmp(y)))
                .map(|(at, _, _)| at)
            else {
                break;
            };
            let next = self.waiting.remove(at);
            if next.answer.send(Answer::Granted).is_err() {
                // Gone without taking itself out of the queue: cannot happen (the guard
                // holds the receiver until it did), but never leak the verifier.
                self.unhold(next.net);
                continue;
            }
            self.start(next.net);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(last: u8) -> ClientNet {
        ClientNet::V4([198, 51, 100, last])
    }

    const WAIT: Duration = Duration::from_secs(5);

    /// Starts an acquire for `net` and lets it run until it holds a verifier or waits.
    async fn queue(
        pool: &Arc<VerifierPool>,
        from: ClientNet,
    ) -> tokio::task::JoinHandle<Result<Verifier, Busy>> {
        let pool = pool.clone();
        let task = tokio::spawn(async move { pool.acquire(from, WAIT).await });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        task
    }

    #[tokio::test]
    async fn a_lone_network_runs_on_all_verifiers_but_one_and_is_never_refused_alone() {
        let pool = VerifierPool::new(3, 2);
        let mut running = Vec::new();
        for _ in 0..2 {
            running.push(pool.acquire(net(1), WAIT).await.unwrap());
        }
        // The last verifier is kept for other networks: net 1 waits, and is not refused
        // even past the queue's length while that verifier is free...
        let first = queue(&pool, net(1)).await;
        let second = queue(&pool, net(1)).await;
        let third = queue(&pool, net(1)).await;
        assert_eq!(pool.counts(), (2, 3, 1));
        // ...another network gets the kept verifier at once...
        let other = pool.acquire(net(2), Duration::ZERO).await.unwrap();
        // ...and with every verifier busy and the queue full, a newcomer no busier than
        // the busiest waiter is refused.
        assert_eq!(
            pool.acquire(net(1), WAIT).await.unwrap_err(),
            Busy::QueueFull
        );
        running.pop();
        let first = first.await.unwrap().unwrap();
        running.pop();
        let second = second.await.unwrap().unwrap();
        drop(other);
        // net 1 already runs on two: the third waits for one of its own to end.
        assert_eq!(pool.counts(), (2, 1, 2));
        drop(first);
        let third = third.await.unwrap().unwrap();
        drop((second, third, running));
        assert_eq!(pool.counts().0, 0);
    }

    #[tokio::test]
    async fn the_quietest_network_is_served_first() {
        let pool = VerifierPool::new(1, 10);
        let busy = pool.acquire(net(1), WAIT).await.unwrap();
        // A flood network that brought an attempt before and five more now, then a
        // quiet network's first.
        drop(pool.acquire(net(2), Duration::ZERO).await);
        let mut flood = Vec::new();
        for _ in 0..5 {
            flood.push(queue(&pool, net(2)).await);
        }
        let quiet = queue(&pool, net(3)).await;
        drop(busy);
        let quiet = quiet.await.unwrap().unwrap();
        assert_eq!(pool.counts(), (1, 5, 3));
        drop(quiet);
        // Then the flood, in arrival order.
        for task in flood {
            drop(task.await.unwrap().unwrap());
        }
        assert_eq!(pool.counts().0, 0);
    }

    #[tokio::test]
    async fn with_the_queue_full_a_quiet_newcomer_displaces_the_busiest_waiter() {
        let pool = VerifierPool::new(1, 2);
        let busy = pool.acquire(net(1), WAIT).await.unwrap();
        // Before: net 2 brought one attempt (its share is 1), net 5 two; net 4 none.
        for from in [net(2), net(5), net(5)] {
            drop(pool.acquire(from, Duration::ZERO).await);
        }
        let busier = queue(&pool, net(2)).await;
        let early = queue(&pool, net(4)).await;
        // A newcomer busier than the busiest waiter is refused...
        assert_eq!(
            pool.acquire(net(5), WAIT).await.unwrap_err(),
            Busy::QueueFull
        );
        // ...a quieter one takes the busiest waiter's place.
        let quiet = queue(&pool, net(3)).await;
        assert_eq!(busier.await.unwrap().unwrap_err(), Busy::Displaced);
        assert_eq!(pool.counts().1, 2);
        drop(busy);
        // Equal shares (0): first come, first served.
        let early = early.await.unwrap().unwrap();
        drop(early);
        drop(quiet.await.unwrap().unwrap());
        assert_eq!(pool.counts().0, 0);
    }

    #[tokio::test]
    async fn a_wait_that_times_out_or_is_abandoned_leaves_nothing_behind() {
        let pool = VerifierPool::new(1, 4);
        let busy = pool.acquire(net(1), WAIT).await.unwrap();
        let started = Instant::now();
        assert_eq!(
            pool.acquire(net(2), Duration::from_millis(50))
                .await
                .unwrap_err(),
            Busy::TimedOut
        );
        assert!(started.elapsed() >= Duration::from_millis(50));
        let abandoned = queue(&pool, net(3)).await;
        abandoned.abort();
        let _ = abandoned.await;
        assert_eq!(pool.counts().1, 0);
        drop(busy);
        assert_eq!(pool.counts().0, 0);
        // Nothing leaked: the one verifier is free for the next attempt.
        drop(pool.acquire(net(4), Duration::ZERO).await.unwrap());
    }

    #[test]
    fn a_granted_verifier_whose_waiter_left_is_handed_on() {
        let pool = VerifierPool::new(1, 4);
        let now = Instant::now();
        let mut state = lock(&pool.state);
        assert!(matches!(state.arrive(net(1), now), Arrival::Run));
        let Arrival::Wait(seq, receiver) = state.arrive(net(2), now) else {
            panic!("not queued");
        };
        let Arrival::Wait(_, mut third) = state.arrive(net(3), now) else {
            panic!("not queued");
        };
        // net 1 finishes: net 2 (first among equal shares) is granted...
        state.finish(net(1), now);
        drop(state);
        // ...but its waiter goes away before taking the answer: net 3 gets it.
        drop(Waiting {
            pool: pool.clone(),
            seq,
            net: net(2),
            answer: Some(receiver),
        });
        assert_eq!(third.try_recv(), Ok(Answer::Granted));
        assert_eq!(pool.counts().0, 1);
    }

    #[test]
    fn shares_decay_by_half_each_half_life() {
        let pool = VerifierPool::new(1, 4);
        let now = Instant::now();
        let mut state = lock(&pool.state);
        for _ in 0..8 {
            state.note_arrival(net(1), now);
        }
        let later = now + SHARE_HALF_LIFE * 2;
        assert!((state.note_arrival(net(1), later) - 2.0).abs() < 1e-9);
        let much_later = later + SHARE_HALF_LIFE * 20;
        state.forget_idle(much_later);
        assert!(state.nets.is_empty());
    }

    #[test]
    fn the_share_table_never_grows_past_its_bound() {
        let pool = VerifierPool::new(1, 4);
        let now = Instant::now();
        let mut state = lock(&pool.state);
        for i in 0..(MAX_TRACKED as u32 + 50) {
            state.note_arrival(ClientNet::V4(i.to_be_bytes()), now);
        }
        assert!(state.nets.len() <= MAX_TRACKED);
    }
}
