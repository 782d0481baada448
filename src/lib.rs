//! postern: a TLS and SMTP AUTH front for legacy plain-SMTP servers.
//!
//! # Layout
//!
//! - [`config`]: command line and environment.

pub mod config;
pub mod smtp;
pub mod sasl;
pub mod users;
