//! `postern-bench-inproc`: postern's server, run in this process under a counting
//! allocator, for profiling allocations per session and heap per idle session.
//!
//! The production binary has no allocation counter and should not carry one; this runs
//! the same library entry point (`postern::server::run`, configured from the same
//! `serve` flags) under a `#[global_allocator]` that counts. The load comes from another
//! process (`postern-bench`), so every allocation counted is the server's.
//!
//! Each line read on stdin prints one snapshot line on stdout (counters since start,
//! live heap, live blocks by size class, RSS, CPU): a driver takes a snapshot, runs
//! load, takes another, and divides the difference by the sessions. `benches/profile.sh`
//! does that. EOF on stdin stops the server.
//!
//! ```text
//! postern-bench-inproc -- --listen 127.0.0.1:2587 --backend 127.0.0.1:2525 \
//!     --cert cert.pem --key key.pem --users users --hostname bench.invalid
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::BufRead as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use clap::Parser as _;
use postern::config::{Cli, Command};
use postern::server::{self, Config, Listeners};

/// Size classes of live blocks: class k holds sizes in [2^k, 2^(k+1)), the last one
/// everything larger.
const CLASSES: usize = 24;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static REALLOCS: AtomicU64 = AtomicU64::new(0);
static FREES: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static LIVE: AtomicI64 = AtomicI64::new(0);
static LIVE_BLOCKS: [AtomicI64; CLASSES] = [const { AtomicI64::new(0) }; CLASSES];

/// Live blocks of 1 KiB up to 64 KiB by exact size, rounded up to [`STEP`]: the
/// buffers an idle session holds are found by their size.
const STEP: usize = 64;
const BIG_FROM: usize = 1024;
const BIG_TO: usize = 64 * 1024;
static LIVE_BIG: [AtomicI64; BIG_TO / STEP + 1] = [const { AtomicI64::new(0) }; BIG_TO / STEP + 1];

fn class(size: usize) -> usize {
    (usize::BITS - size.max(1).leading_zeros() - 1).min(CLASSES as u32 - 1) as usize
}

fn big(size: usize) -> Option<&'static AtomicI64> {
    (BIG_FROM..=BIG_TO)
        .contains(&size)
        .then(|| &LIVE_BIG[size.div_ceil(STEP)])
}

fn born(size: usize) {
    LIVE.fetch_add(size as i64, Relaxed);
    LIVE_BLOCKS[class(size)].fetch_add(1, Relaxed);
    if let Some(n) = big(size) {
        n.fetch_add(1, Relaxed);
    }
}

fn died(size: usize) {
    LIVE.fetch_sub(size as i64, Relaxed);
    LIVE_BLOCKS[class(size)].fetch_sub(1, Relaxed);
    if let Some(n) = big(size) {
        n.fetch_sub(1, Relaxed);
    }
}

// SAFETY: every call goes to the system allocator with the caller's own arguments;
// the counters on the side never touch the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(layout.size() as u64, Relaxed);
        born(layout.size());
        // SAFETY: forwarded unchanged (see the impl).
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(layout.size() as u64, Relaxed);
        born(layout.size());
        // SAFETY: forwarded unchanged (see the impl).
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        FREES.fetch_add(1, Relaxed);
        died(layout.size());
        // SAFETY: forwarded unchanged (see the impl).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        REALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(new_size.saturating_sub(layout.size()) as u64, Relaxed);
        died(layout.size());
        born(new_size);
        // SAFETY: forwarded unchanged (see the impl).
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn snapshot() -> String {
    let classes: Vec<String> = LIVE_BLOCKS
        .iter()
        .enumerate()
        .filter_map(|(k, n)| {
            let n = n.load(Relaxed);
            (n != 0).then(|| format!("{}:{n}", 1u64 << k))
        })
        .collect();
    let big: Vec<String> = LIVE_BIG
        .iter()
        .enumerate()
        .filter_map(|(k, n)| {
            let n = n.load(Relaxed);
            (n != 0).then(|| format!("{}:{n}", k * STEP))
        })
        .collect();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .map_or("?", |v| v.trim().trim_end_matches(" kB"));
    let cpu = postern_cpu_ms().map_or("?".to_owned(), |ms| ms.to_string());
    format!(
        "allocs={} reallocs={} frees={} bytes={} live={} rss_kib={rss} cpu_ms={cpu} live_blocks={} live_big={}",
        ALLOCS.load(Relaxed),
        REALLOCS.load(Relaxed),
        FREES.load(Relaxed),
        BYTES.load(Relaxed),
        LIVE.load(Relaxed),
        classes.join(","),
        big.join(",")
    )
}

/// User + system CPU of this process so far, in milliseconds.
fn postern_cpu_ms() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split(' ');
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) * 10)
}

fn main() -> ExitCode {
    let mut argv: Vec<String> = vec!["postern".into(), "serve".into()];
    argv.extend(std::env::args().skip(1).skip_while(|a| a == "--"));
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    let Command::Serve(args) = cli.command else {
        eprintln!("postern-bench-inproc: only `serve` flags are accepted");
        return ExitCode::from(2);
    };
    // The same logging as `postern serve --log-level warn`: the per-connection span
    // and its fields are part of a session's cost.
    let filter = tracing_subscriber::EnvFilter::new(&args.log_level);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let result = Config::from_args(&args).and_then(|config| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("starting the runtime: {e}"))?;
        runtime.block_on(async {
            let listeners = Listeners::bind(&config).await?;
            let (stop_handle, stop) = postern::shutdown::channel();
            std::thread::spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    if line.is_err() {
                        break;
                    }
                    println!("{}", snapshot());
                }
                // The first request drains, the second ends the drain.
                stop_handle.stop();
                stop_handle.stop();
            });
            server::run(config, listeners, stop, None).await
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("postern-bench-inproc: {e}");
            ExitCode::FAILURE
        }
    }
}
