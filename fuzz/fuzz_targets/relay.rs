//! The relayed session after AUTH: the real `Tracker` driven by an interleaving of
//! client chunks, backend answers, store answers, partial writes and half-closes,
//! against a model backend that reads what postern forwards the way a strict server
//! does and checks that lenient servers would read it the same way. The driver and
//! every invariant live in `tests/common/relay_harness.rs` (shared with
//! `tests/it/relay_properties.rs` and the seed smoke test `tests/it/relay_fuzz_seeds.rs`).
//!
//! Input layout (see `Setup::from_bytes` and `Op::decode`):
//! - byte 0: bit 0 `--strict-data`, 1 CHUNKING, 2 authenticated, 3 TLS, 4 a message
//!   limit, 5 a recipient limit, 6 a per-message recipient limit, 7 `SIZE 1000`;
//! - byte 1: the limits' values;
//! - then steps, each an op byte and an argument byte: 0-2 client bytes (the argument
//!   is their length), 3 a repeated run of client bytes, 4 a client read, 5 and 6
//!   writes to the backend and to the client, 7-8 the backend answers its oldest
//!   command (the argument picks 354/250/550/...), 9 a backend read, 10 the store's
//!   answer, 11 raw backend bytes, 12 EOFs and a failed write, 13-15 move everything.

#![no_main]

#[path = "../../tests/common/relay_harness.rs"]
mod relay_harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| relay_harness::run_fuzz(data));
