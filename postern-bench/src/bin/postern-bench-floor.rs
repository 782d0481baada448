//! The `postern-bench-floor` binary: the TLS server work alone per CPU-second, in memory
//! (see `postern_bench::floor`). `benches/compare.sh` runs it beside the proxies and
//! reports their figures as fractions of it.

use std::process::ExitCode;

use clap::Parser as _;
use postern_bench::floor::{self, FloorArgs};

fn main() -> ExitCode {
    let args = FloorArgs::parse();
    match floor::run(&args) {
        Ok(result) => {
            if args.json {
                eprintln!("{}", result.human(args.kx));
                println!("{}", result.json(args.kx));
            } else {
                println!("{}", result.human(args.kx));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("postern-bench-floor: {e}");
            ExitCode::FAILURE
        }
    }
}
