//! `Command::parse` on arbitrary bytes: it must not panic, and whatever it accepts must
//! be safe to act on (no CR, LF or NUL; a hello name is one printable word of the line).

#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::smtp::Command;
use postern::smtp::line::MAX_COMMAND_LINE;

fuzz_target!(|line: &[u8]| {
    let Ok(command) = Command::parse(line) else {
        return;
    };
    assert!(!line.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)));
    match command {
        Command::Auth { mechanism, initial } => {
            assert!(mechanism.is_none_or(|m| !m.is_empty() && !m.contains(' ')));
            assert!(initial.is_none_or(|i| !i.is_empty() && !i.contains(&b' ')));
        }
        Command::Ehlo(name) | Command::Helo(name) => {
            assert!(line.len() <= MAX_COMMAND_LINE);
            assert!(!name.is_empty());
            assert!(!name.chars().any(|c| c.is_control() || c.is_whitespace()));
        }
        _ => assert!(line.len() <= MAX_COMMAND_LINE),
    }
});
