//! The integration tests of `postern-bench`, one binary (one link) for all of them: the
//! load generator against a real postern in front of the recording sink, and the sink
//! on its own. It is named `bench`, not `it` like postern's own, so that `cargo test
//! --test it` at the top runs postern's tests only.
//!
//! postern itself runs in the test process (`postern::server::run` on listeners the
//! harness binds), so these tests need no binary from the other crate.

mod floor;
mod forward;
mod generator;
mod harness;
mod sink;
