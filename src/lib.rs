//! postern: a TLS and SMTP AUTH front for legacy plain-SMTP servers.
//!
//! # Layout
//!
//! - [`config`]: command line and environment.
//! - [`bench`]: `postern bench`, a load generator for SMTP submission servers.

pub mod bench;
pub mod config;
