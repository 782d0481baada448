//! The `postern` binary: parses the command line, sets up logging and runs a subcommand.

use std::io::{IsTerminal, Read, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser};
use postern::config::{
    CheckArgs, CheckRole, Cli, Command, DemoArgs, HashPasswordArgs, LogFormat, ServeArgs,
};
use postern::server::{self, Config, Listeners};
use postern::users;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Check(args) => check(*args),
        Command::RelayOut(args) => relay_out(*args),
        Command::HashPassword(args) => hash_password(args),
        Command::Demo(args) => demo(args),
        Command::Completions { shell } => completions(shell),
        Command::Man { out_dir } => man(out_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            // Several errors (every certificate mistake at once) come one per line.
            for line in message.lines() {
                eprintln!("postern: {line}");
            }
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> Result<(), String> {
    init_logging(args.log_format, &args.log_level)?;
    let config = Config::from_args(&args)?;
    runtime()?.block_on(async {
        let listeners = Listeners::bind(&config).await?;
        let stop = postern::shutdown::os_signals()?;
        server::run(config, listeners, stop, None).await
    })
}

fn check(args: CheckArgs) -> Result<(), String> {
    if let Some(CheckRole::RelayOut(mut relay_out_args)) = args.role {
        relay_out_args.check = true;
        return relay_out(*relay_out_args);
    }
    let config = Config::from_args(&args.serve)?;
    runtime()?.block_on(server::check(config))?;
    println!("configuration ok");
    Ok(())
}

fn relay_out(args: postern::config::relay_out::RelayOutArgs) -> Result<(), String> {
    use postern::outbound;
    if args.check {
        let config = outbound::Config::from_args(&args)?;
        runtime()?.block_on(outbound::check(config))?;
        println!("configuration ok");
        return Ok(());
    }
    init_logging(args.log_format, &args.log_level)?;
    let config = outbound::Config::from_args(&args)?;
    runtime()?.block_on(async {
        let listeners = outbound::Listeners::bind(&config).await?;
        let stop = postern::shutdown::os_signals()?;
        outbound::run(config, listeners, stop).await
    })
}

fn demo(args: DemoArgs) -> Result<(), String> {
    init_logging(LogFormat::Text, &args.log_level)?;
    runtime()?.block_on(postern::demo::run(args))
}

fn completions(shell: clap_complete::Shell) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut Cli::command(), "postern", &mut out);
    out.flush().map_err(|e| format!("writing completions: {e}"))
}

/// One page on stdout, or `postern.1` plus one page per subcommand into `out_dir`.
fn man(out_dir: Option<PathBuf>) -> Result<(), String> {
    match out_dir {
        Some(dir) => clap_mangen::generate_to(Cli::command(), &dir)
            .map_err(|e| format!("writing man pages to {}: {e}", dir.display())),
        None => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(Cli::command())
                .render(&mut out)
                .and_then(|()| out.flush())
                .map_err(|e| format!("writing the man page: {e}"))
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))
}

/// RUST_LOG, when set, overrides `--log-level`.
fn init_logging(format: LogFormat, level: &str) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => EnvFilter::try_new(directives),
        _ => EnvFilter::try_new(level),
    }
    .map_err(|e| format!("--log-level {level:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| format!("initialising logging: {e}"))
}

fn hash_password(args: HashPasswordArgs) -> Result<(), String> {
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ")
            .map_err(|e| format!("reading password: {e}"))?;
        let again =
            rpassword::prompt_password("Again: ").map_err(|e| format!("reading password: {e}"))?;
        if first != again {
            return Err("passwords do not match".into());
        }
        first
    } else {
        let mut input = String::new();
        std::io::stdin()
            .read_to_string(&mut input)
            .map_err(|e| format!("reading password from stdin: {e}"))?;
        // One trailing newline comes from `echo` or a here-string, not the password.
        let trimmed = input.strip_suffix('\n').unwrap_or(&input);
        trimmed.strip_suffix('\r').unwrap_or(trimmed).to_owned()
    };
    if password.is_empty() {
        return Err("empty password".into());
    }
    let line = users::hash_password(args.scheme, &password).map_err(|e| e.to_string())?;
    println!("{line}");
    Ok(())
}
