//! `UserDb::parse` on arbitrary text (bytes taken as lossy UTF-8, as a file read with
//! `String::from_utf8_lossy` would be): no panic, and an error names a line of the text.
//!
//! Parsing only checks hash syntax; no KDF runs, so executions stay fast. That errors
//! never echo a password is checked by the property tests, whose generated secrets
//! cannot collide with the fixed words of an error message the way fuzzed bytes can.

#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::users::UserDb;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match UserDb::parse(&text) {
        Ok(db) => assert!(db.len() <= text.lines().count()),
        Err(error) => {
            let line = error.line().expect("a parse error names its line");
            assert!(line >= 1 && line <= text.lines().count());
            assert!(!error.to_string().is_empty());
        }
    }
});
