//! The `postern-bench` binary: parses the command line and runs the load on a
//! multi-threaded runtime (one worker per CPU it may run on, so `taskset` pins it).

use std::process::ExitCode;

use clap::Parser as _;
use postern_bench::BenchArgs;

fn main() -> ExitCode {
    let args = BenchArgs::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}").into())
        .and_then(|runtime| runtime.block_on(postern_bench::run(args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("postern-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
