//! The pre-AUTH session driven by arbitrary client bytes (it frames its own lines), with the
//! same checking driver the property tests use (`tests/common/session_driver.rs`): it
//! panics on any broken invariant (a relay without TLS or valid credentials, a reply to
//! MAIL other than 4xx/5xx, a malformed reply line, ...).
//!
//! Input layout, so that the fuzzer controls the driver deterministically too:
//! - byte 0: bits 0-1 the listener (STARTTLS, implicit TLS, MX, STARTTLS), bits 2-4 the
//!   error limit, bits 5-7 the AUTH failure limit;
//! - byte 1: four verdicts, two bits each (Valid, Invalid, Throttled, Valid);
//! - byte 2: eight backend-ready answers, one bit each;
//! - byte 3: the size of the chunks the rest arrives in (1 to 64 bytes);
//! - the rest: the client's bytes.

#![no_main]

#[path = "../../tests/common/session_driver.rs"]
mod session_driver;

use libfuzzer_sys::fuzz_target;
use postern::session::{ListenerKind, Verdict};
use session_driver::{Driver, Oracle, default_capabilities, limits};

fuzz_target!(|data: &[u8]| {
    let Some((&[setup, verdicts, ready, chunk], client)) = data.split_first_chunk::<4>() else {
        return;
    };
    let kind = match setup & 3 {
        1 => ListenerKind::ImplicitTls,
        2 => ListenerKind::Mx,
        _ => ListenerKind::Submission,
    };
    let max_errors = u32::from((setup >> 2) & 0x07) + 1;
    let max_auth_failures = u32::from(setup >> 5) + 1;
    let verdicts = (0..4)
        .map(|i| match (verdicts >> (2 * i)) & 3 {
            1 => Verdict::Invalid,
            2 => Verdict::Throttled,
            _ => Verdict::Valid,
        })
        .collect();
    let ready = (0..8).map(|i| ready & (1 << i) != 0).collect();
    let mut driver = Driver::new(
        kind,
        default_capabilities(),
        limits(max_errors, max_auth_failures),
        Oracle::new(verdicts, ready),
    );
    for bytes in client.chunks(usize::from(chunk % 64) + 1) {
        driver.feed(bytes);
    }
});
