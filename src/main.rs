use clap::Parser;
use postern::config::{Cli, Command};

fn main() -> std::process::ExitCode {
    // Minimal dispatch so `bench` can be tried before the core lands; main's main.rs replaces it.
    let Command::Bench(args) = Cli::parse().command else {
        return std::process::ExitCode::FAILURE;
    };
    let result = tokio::runtime::Runtime::new()
        .map_err(Into::into)
        .and_then(|rt| rt.block_on(postern::bench::run(args)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("postern bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
