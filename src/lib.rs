//! postern: a TLS and SMTP AUTH front for legacy plain-SMTP servers.
//!
//! # Layout
//!
//! - [`config`]: command line and environment.
//! - [`sasl`]: sans-IO SASL exchanges (PLAIN, LOGIN, CRAM-MD5): AUTH lines in, credentials out.
//! - [`users`]: the Dovecot-style passwd-file credential store and password verification.

pub mod config;
pub mod sasl;
pub mod users;
