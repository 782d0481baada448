//! The command line as documented: `--help`, `--version`, completions, the man page,
//! exit codes, the README's quick-start commands, and the README's flag tables, which
//! are generated from clap's own metadata and compared here.
//!
//! To refresh the README after changing a flag:
//! `UPDATE_README=1 cargo test --test it cli::readme_flags`.

use std::process::{Command, Output};

use clap::{CommandFactory as _, Parser as _};
use postern::config::{Cli, EXIT_STATUS};

const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
const FLAGS_START: &str = "<!-- flags:start -->";
const FLAGS_END: &str = "<!-- flags:end -->";

fn postern(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(args)
        .env_remove("POSTERN_BACKEND")
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
fn help_lists_commands_and_exit_status() {
    let help = stdout(&postern(&["--help"]));
    for word in [
        "serve",
        "check",
        "hash-password",
        "demo",
        "completions",
        "man",
    ] {
        assert!(help.contains(word), "{word} missing from --help:\n{help}");
    }
    assert!(help.contains(EXIT_STATUS), "{help}");
}

#[test]
fn every_serve_flag_has_an_environment_variable() {
    let help = stdout(&postern(&["serve", "--help"]));
    let command = Cli::command();
    let serve = command.find_subcommand("serve").unwrap();
    for arg in serve.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if long == "help" {
            continue;
        }
        let env = arg
            .get_env()
            .unwrap_or_else(|| panic!("--{long} has no environment variable"));
        let env = env.to_string_lossy();
        assert!(env.starts_with("POSTERN_"), "--{long}: {env}");
        assert!(
            help.contains(&format!("[env: {env}=")),
            "serve --help does not show [env: {env}] for --{long}"
        );
    }
}

#[test]
fn version_names_the_commit() {
    let version = stdout(&postern(&["--version"]));
    assert!(
        version.starts_with(&format!("postern {} (git ", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
}

#[test]
fn completions_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let script = stdout(&postern(&["completions", shell]));
        assert!(
            script.contains("postern") && script.contains("metrics-listen"),
            "{shell}: {script}"
        );
    }
}

#[test]
fn man_page_is_roff() {
    let page = stdout(&postern(&["man"]));
    assert!(page.contains(".TH postern 1"), "{page}");
    assert!(
        page.contains("Exit status"),
        "exit status missing from the man page"
    );

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    stdout(&postern(&["man", "--out-dir", out]));
    for page in ["postern.1", "postern-serve.1", "postern-demo.1"] {
        assert!(dir.path().join(page).exists(), "{page} not written");
    }
}

#[test]
fn exit_codes() {
    // 2: usage errors, clap's convention.
    assert_eq!(postern(&["--no-such-flag"]).status.code(), Some(2));
    assert_eq!(
        postern(&["serve"]).status.code(),
        Some(2),
        "missing --backend"
    );
    // 1: the command line parsed, but the configuration cannot work.
    let output = postern(&[
        "check",
        "--backend",
        "127.0.0.1:1",
        "--cert",
        "/nonexistent",
    ]);
    assert_eq!(output.status.code(), Some(1));
    // 0: help and version are successes.
    assert_eq!(postern(&["serve", "--help"]).status.code(), Some(0));
}

/// Every `postern ...` line in the README's code blocks still parses: a renamed flag
/// or subcommand breaks this test instead of a reader's first try.
#[test]
fn readme_commands_parse() {
    let readme = std::fs::read_to_string(README).unwrap();
    let commands = readme_commands(&readme);
    assert!(
        commands
            .iter()
            .any(|c| c.words.get(1).is_some_and(|w| w == "demo")),
        "the README should show `postern demo`; found {commands:?}"
    );
    for command in &commands {
        match Cli::try_parse_from(&command.words) {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp) => {}
            // `POSTERN_BACKEND=... postern serve`: the variable supplies the flag.
            Err(e)
                if command.has_env
                    && e.kind() == clap::error::ErrorKind::MissingRequiredArgument => {}
            Err(e) => panic!("README command {:?} does not parse:\n{e}", command.words),
        }
    }
}

#[derive(Debug)]
struct ReadmeCommand {
    words: Vec<String>,
    has_env: bool,
}

/// Lines in fenced code blocks that run postern, with `$ ` prompts, `VAR=value`
/// prefixes and `\` continuations handled.
fn readme_commands(readme: &str) -> Vec<ReadmeCommand> {
    let mut commands = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in readme.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block {
            continue;
        }
        let line = line.trim();
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let full = std::mem::take(&mut pending);
        let full = full.strip_prefix("$ ").unwrap_or(&full);
        let words = shell_words(full);
        let env_count = words
            .iter()
            .take_while(|w| w.contains('=') && !w.starts_with('-'))
            .count();
        let command = &words[env_count..];
        let args = match command {
            [first, rest @ ..] if first == "postern" => rest,
            // `cargo run [--release] -- demo`: what follows `--` goes to postern.
            [cargo, run, rest @ ..] if cargo == "cargo" && run == "run" => {
                match rest.iter().position(|w| w == "--") {
                    Some(dashes) => &rest[dashes + 1..],
                    None => continue,
                }
            }
            _ => continue,
        };
        let mut words = vec!["postern".to_owned()];
        words.extend_from_slice(args);
        commands.push(ReadmeCommand {
            words,
            has_env: env_count > 0,
        });
    }
    commands
}

/// Enough of POSIX shell word splitting for README examples: blanks, quotes, and a
/// `|`, `>` or `#` ending the command.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    let mut in_word = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, '|' | '>' | '#' | ';' | '&') if !in_word => break,
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// The README's flag reference is exactly what clap knows: names, environment
/// variables, defaults and help text.
#[test]
fn readme_flags_match_the_command_line() {
    let readme = std::fs::read_to_string(README).unwrap();
    let (Some(start), Some(end)) = (readme.find(FLAGS_START), readme.find(FLAGS_END)) else {
        panic!("README.md lacks the {FLAGS_START} ... {FLAGS_END} markers");
    };
    let current = &readme[start + FLAGS_START.len()..end];
    let expected = flags_markdown();
    if current == expected {
        return;
    }
    if std::env::var_os("UPDATE_README").is_some() {
        let updated = format!(
            "{}{expected}{}",
            &readme[..start + FLAGS_START.len()],
            &readme[end..]
        );
        std::fs::write(README, updated).unwrap();
        return;
    }
    panic!(
        "README.md's flag tables are out of date with the command line.\n\
         Regenerate them with: UPDATE_README=1 cargo test --test it cli::readme_flags\n\n\
         expected:\n{expected}"
    );
}

/// The section between the markers: one table per documented subcommand, then the exit
/// status contract.
fn flags_markdown() -> String {
    let cli = Cli::command();
    let mut out = String::from(
        "\n## Flags\n\n\
         <!-- Generated from the clap definitions by tests/it/cli.rs: edit the doc comments \
         in src/, then run `UPDATE_README=1 cargo test --test it cli::readme_flags`. -->\n\n\
         `postern serve --help` shows the same, `postern man` as a man page.\n",
    );
    for (name, intro) in [
        (
            "serve",
            "Every flag can also be set through its environment variable; a flag given on \
             the command line wins.",
        ),
        (
            "relay-out",
            "Every flag except --check can also be set through its environment variable; \
             a flag given on the command line wins.",
        ),
        (
            "demo",
            "The demo reads no environment variables, so settings meant for a real \
             deployment cannot redirect it.",
        ),
    ] {
        let Some(sub) = cli.find_subcommand(name) else {
            panic!("no subcommand {name}")
        };
        out.push_str(&format!("\n### `postern {name}`\n\n{intro}\n\n"));
        let with_env = sub.get_arguments().any(|a| a.get_env().is_some());
        if with_env {
            out.push_str("| Flag | Environment | Default | Description |\n|---|---|---|---|\n");
        } else {
            out.push_str("| Flag | Default | Description |\n|---|---|---|\n");
        }
        for arg in sub.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" {
                continue;
            }
            let mut flag = format!("--{long}");
            if let Some(names) = arg.get_value_names() {
                for value in names {
                    flag.push_str(&format!(" <{value}>"));
                }
            }
            let defaults: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| format!("`{}`", v.to_string_lossy()))
                .collect();
            let default = if arg.is_required_set() {
                "required".to_owned()
            } else {
                defaults.join(", ")
            };
            let mut help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let values: Vec<String> = arg
                .get_possible_values()
                .iter()
                .filter(|v| !v.is_hide_set())
                .map(|v| format!("`{}`", v.get_name()))
                .collect();
            if !values.is_empty() {
                help.push_str(&format!(" (one of {})", values.join(", ")));
            }
            let help = help.replace('|', "\\|").replace('\n', " ");
            let row = if with_env {
                let env = arg
                    .get_env()
                    .map(|e| format!("`{}`", e.to_string_lossy()))
                    .unwrap_or_default();
                format!("| `{flag}` | {env} | {default} | {help} |\n")
            } else {
                format!("| `{flag}` | {default} | {help} |\n")
            };
            out.push_str(&row);
        }
    }
    out.push_str(&format!(
        "\n### Exit status\n\n```text\n{EXIT_STATUS}\n```\n"
    ));
    out
}
