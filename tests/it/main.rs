//! postern's integration tests, built as one binary: each module below was a test file of
//! its own, and linking one binary instead of one per file is what keeps a test build
//! short on a two-core machine. They all run as threads of this one process, so none of
//! them may change process-wide state (environment variables, the current directory),
//! and ports come only from [`common::free_port`], which no two tests ever share.
//!
//! `cargo test --test it relay::` runs one module, `cargo test --test it
//! relay::five_mib_message_arrives_exactly` one test. `tests/README.md` says what each
//! module covers.

// The harness is tests/common.rs and tests/common/, beside this directory.
#[path = ".."]
mod tests_dir {
    pub mod common;
}
use tests_dir::common;

mod abuse;
mod auth;
mod auth_replicas;
mod auth_sources;
mod certificates;
mod certs_script;
mod cli;
mod client_identity;
mod clients;
mod demo;
mod dovecot_auth;
mod framing_mta;
mod harness;
mod hostile;
mod implicit_tls;
mod in_process;
mod ldap_auth;
mod limits;
mod load;
mod mx;
mod mx_postfix;
mod operations;
mod parallel_limits;
mod properties;
mod proxy_protocol;
mod relay;
mod relay_fuzz_seeds;
mod relay_out;
mod relay_properties;
mod relay_tracking;
mod reload;
mod starttls;
mod startup;
mod tls_stream;
mod xclient_postfix;
