//! The integration tests of `postern-bench`, one binary (one link) for all of them: the
//! load generator against a real postern in front of the recording sink, and the sink
//! on its own.
//!
//! `postern` is the workspace's other binary, which cargo builds into the same directory
//! when the tests run from the workspace root (`cargo test`).

mod bench;
mod harness;
mod sink;
