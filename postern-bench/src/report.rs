//! Counting and reporting: per-worker tallies, live progress counters, and the final
//! summary as one human line or one JSON object.
//!
//! Latencies are kept as raw microsecond samples (4 bytes each) and sorted once at the
//! end: exact percentiles with no dependency, and even a million sessions is only 4 MB.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::client::{Failure, Stage};

/// What one worker saw; merged into the run's total at the end.
#[derive(Default)]
pub struct Tally {
    /// Connect through AUTH, per session, microseconds.
    pub handshake_us: Vec<u32>,
    /// MAIL through the 250 after the data, per message, microseconds.
    pub message_us: Vec<u32>,
    pub sessions: u64,
    pub messages: u64,
    pub bytes: u64,
    pub errors: [u64; Stage::ALL.len()],
    /// The most recent failure text per stage, to say *why*.
    pub last_error: [Option<String>; Stage::ALL.len()],
}

impl Tally {
    pub fn error(&mut self, failure: Failure) {
        let i = failure.stage.index();
        self.errors[i] += 1;
        self.last_error[i] = Some(failure.detail);
    }

    pub fn merge(&mut self, other: Tally) {
        self.handshake_us.extend(other.handshake_us);
        self.message_us.extend(other.message_us);
        self.sessions += other.sessions;
        self.messages += other.messages;
        self.bytes += other.bytes;
        for (i, (n, last)) in other.errors.into_iter().zip(other.last_error).enumerate() {
            self.errors[i] += n;
            if last.is_some() {
                self.last_error[i] = last;
            }
        }
    }
}

/// Saturating conversion of a latency to microseconds.
pub fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Counters the progress line reads while workers run.
#[derive(Default)]
pub struct Live {
    pub sessions: AtomicU64,
    pub messages: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    /// Idle mode: sessions authenticated and now held open.
    pub established: AtomicU64,
}

impl Live {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> [u64; 5] {
        [
            self.sessions.load(Ordering::Relaxed),
            self.messages.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            self.established.load(Ordering::Relaxed),
        ]
    }
}

/// Percentiles of a latency sample set, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles; sorts `samples` in place.
    pub fn of(samples: &mut [u32]) -> Percentiles {
        samples.sort_unstable();
        let rank = |p: f64| -> f64 {
            let n = samples.len();
            if n == 0 {
                return 0.0;
            }
            let i = ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
            f64::from(samples[i]) / 1000.0
        };
        Percentiles {
            count: samples.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            max: rank(1.0),
        }
    }
}

/// The finished run, ready to print.
pub struct Summary {
    pub target: String,
    pub mode: &'static str,
    pub concurrency: usize,
    pub message_size: u64,
    pub messages_per_conn: u64,
    /// The measurement window: the requested duration, or less if the run ended early.
    pub elapsed: Duration,
    pub tally: Tally,
    pub handshake: Percentiles,
    pub message: Percentiles,
    /// Idle mode: sessions that were held open at the same time.
    pub idle_established: Option<u64>,
    /// CPU time this process used during the run (Linux only).
    pub client_cpu: Option<Duration>,
    /// TLS parameters of the first handshake, if there was TLS.
    pub tls: Option<String>,
}

impl Summary {
    fn rate(&self, n: u64) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 { n as f64 / secs } else { 0.0 }
    }

    fn errors_total(&self) -> u64 {
        self.tally.errors.iter().sum()
    }

    /// One line for people (plus a second line naming errors, if there were any).
    pub fn human(&self) -> String {
        let t = &self.tally;
        let mut s = String::new();
        if let Some(n) = self.idle_established {
            let _ = write!(s, "idle {n} sessions held  ");
        }
        let _ = write!(
            s,
            "sessions {} ({:.1}/s)  messages {} ({:.1}/s, {:.2} MB/s)  \
             handshake p50 {:.2} ms p99 {:.2} ms  message p50 {:.2} ms p99 {:.2} ms  \
             errors {}  [{:.1} s, c={}, {} B x {}/conn{}{}]",
            t.sessions,
            self.rate(t.sessions),
            t.messages,
            self.rate(t.messages),
            self.rate(t.bytes) / 1e6,
            self.handshake.p50,
            self.handshake.p99,
            self.message.p50,
            self.message.p99,
            self.errors_total(),
            self.elapsed.as_secs_f64(),
            self.concurrency,
            self.message_size,
            self.messages_per_conn,
            match self.client_cpu {
                Some(cpu) => format!(", client CPU {:.2} s", cpu.as_secs_f64()),
                None => String::new(),
            },
            match &self.tls {
                Some(tls) => format!(", {tls}"),
                None => String::new(),
            },
        );
        if self.errors_total() > 0 {
            s.push_str("\nerrors:");
            for stage in Stage::ALL {
                let i = stage.index();
                if t.errors[i] > 0 {
                    let why = t.last_error[i].as_deref().unwrap_or("");
                    let _ = write!(s, " {}={} (last: {})", stage.name(), t.errors[i], why);
                }
            }
        }
        s
    }

    /// One JSON object (no dependency: the values are numbers and a few plain strings).
    pub fn json(&self) -> String {
        let t = &self.tally;
        let pct = |p: &Percentiles| {
            format!(
                "{{\"count\":{},\"p50\":{:.3},\"p99\":{:.3},\"max\":{:.3}}}",
                p.count, p.p50, p.p99, p.max
            )
        };
        let mut errors = String::from("{");
        for (k, stage) in Stage::ALL.iter().enumerate() {
            if k > 0 {
                errors.push(',');
            }
            let _ = write!(errors, "\"{}\":{}", stage.name(), t.errors[stage.index()]);
        }
        errors.push('}');
        let mut last = String::from("{");
        for stage in Stage::ALL {
            if let Some(why) = &t.last_error[stage.index()] {
                if last.len() > 1 {
                    last.push(',');
                }
                let _ = write!(last, "\"{}\":{}", stage.name(), json_string(why));
            }
        }
        last.push('}');
        let opt = |v: Option<String>| v.unwrap_or_else(|| "null".into());
        format!(
            "{{\"target\":{},\"mode\":\"{}\",\"concurrency\":{},\"message_size\":{},\
             \"messages_per_conn\":{},\"elapsed_s\":{:.3},\"sessions\":{},\"messages\":{},\
             \"bytes\":{},\"sessions_per_s\":{:.2},\"messages_per_s\":{:.2},\"mb_per_s\":{:.3},\
             \"handshake_ms\":{},\"message_ms\":{},\"errors\":{},\"errors_total\":{},\
             \"last_error\":{},\"idle_established\":{},\"client_cpu_s\":{},\"tls\":{}}}",
            json_string(&self.target),
            self.mode,
            self.concurrency,
            self.message_size,
            self.messages_per_conn,
            self.elapsed.as_secs_f64(),
            t.sessions,
            t.messages,
            t.bytes,
            self.rate(t.sessions),
            self.rate(t.messages),
            self.rate(t.bytes) / 1e6,
            pct(&self.handshake),
            pct(&self.message),
            errors,
            self.errors_total(),
            last,
            opt(self.idle_established.map(|n| n.to_string())),
            opt(self.client_cpu.map(|c| format!("{:.3}", c.as_secs_f64()))),
            opt(self.tls.as_deref().map(json_string)),
        )
    }
}

/// A JSON string literal (RFC 8259 §7): quotes, backslashes and control characters escaped.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// CPU time (user + system, all threads) this process has used so far, from
/// `/proc/self/stat` fields 14 and 15; `None` where there is no procfs.
pub fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces; fields after it are space-separated.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split(' ');
    // `rest` starts at field 3, so utime (14) is the 12th item.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // USER_HZ is 100 on every Linux ABI Rust supports (it is fixed for userspace).
    Some(Duration::from_millis((utime + stime) * 10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let mut v: Vec<u32> = (1..=100).rev().map(|ms| ms * 1000).collect();
        let p = Percentiles::of(&mut v);
        assert_eq!((p.count, p.p50, p.p99, p.max), (100, 50.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
        let p = Percentiles::of(&mut [7000]);
        assert_eq!((p.p50, p.p99), (7.0, 7.0));
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\r\n\u{1}"), r#""a\"b\\c\r\n\u0001""#);
    }

    #[test]
    fn tallies_merge() {
        let mut a = Tally::default();
        a.error(Failure {
            stage: Stage::Auth,
            detail: "535 no".into(),
        });
        let mut b = Tally {
            sessions: 2,
            ..Tally::default()
        };
        b.error(Failure {
            stage: Stage::Auth,
            detail: "535 again".into(),
        });
        a.merge(b);
        assert_eq!(a.sessions, 2);
        assert_eq!(a.errors[Stage::Auth.index()], 2);
        assert_eq!(
            a.last_error[Stage::Auth.index()].as_deref(),
            Some("535 again")
        );
    }

    #[test]
    fn own_cpu_time_is_readable() {
        if cfg!(target_os = "linux") {
            assert!(process_cpu().is_some());
        }
    }
}
