//! postern: a TLS and SMTP AUTH front for legacy plain-SMTP servers.
//!
//! postern accepts mail clients, offers STARTTLS (RFC 3207) and implicit TLS
//! (RFC 8314), and requires SMTP AUTH (RFC 4954) against its own users file before any
//! mail transaction. Once a client is authenticated it connects to the backend, replays
//! the client's EHLO, and from then on copies bytes verbatim both ways: the backend
//! stays the one that accepts or refuses mail. The relay follows the SMTP state of what
//! it copies, to answer a second AUTH itself, keep EHLO consistent, count mail and
//! enforce per-user sending limits.
//!
//! The protocol core (`smtp`, `sasl`, `session`, `relay::rules`, `relay::tracker`) is
//! sans-IO: it takes bytes or lines and returns actions, and is tested without sockets.
//! The async shell around it is thin: `relay` only moves bytes between the sockets and
//! the buffers `relay::tracker::Tracker` owns.
//!
//! # Layout
//!
//! Top to bottom; a module uses only modules below it (no cycles).
//!
//! - [`demo`]: `postern demo`: the real proxy on loopback with a throw-away setup and a
//!   stand-in backend that prints what it receives.
//! - [`server`]: `postern serve`: turns the configuration into each layer's settings,
//!   wires them, serves listeners its caller bound until asked to stop.
//! - [`outbound`]: `postern relay-out`: legacy senders on plain SMTP relayed to a
//!   modern submission service, postern logging in upstream over TLS with a password
//!   or OAuth2 ([`outbound::oauth2`]), through the same relay as inbound mail.
//! - [`config`]: command line and environment (`POSTERN_*`).
//! - [`admin`]: `/metrics`, `/healthz` and `/readyz` over HTTP (hyper).
//! - [`reload`]: certificate and users reload on SIGHUP and file change.
//! - [`listener`]: accept loops, the connection limits, the PROXY header.
//! - [`conn`]: drives a session over a socket: TLS, verification, backend hand-off.
//! - [`auth`]: the [`auth::Authenticator`]: credential checks behind the AUTH failure
//!   windows (this process's, or shared by replicas through the limits store), the
//!   verifier pool served by network share, and constant-time failures.
//! - [`relay`]: the post-AUTH relay: verbatim bytes, followed by a sans-IO SMTP tracker
//!   ([`relay::tracker`], owning the buffers) applying [`relay::rules`].
//! - [`backend`]: dials the backend, introduces the client, probes its capabilities.
//! - [`quota`]: per-user sending limits, in memory or in Redis shared by replicas.
//! - [`limits`]: per-network connection and AUTH-failure tables, in the process or in
//!   the limits store (`limits::shared`).
//! - [`store`]: the limits store (`--limits-store`): the Redis connection replicas share
//!   their counters through, its timeout and its failure mode.
//! - [`shutdown`]: stop requests and the drain every task hears.
//! - [`session`]: the pre-AUTH state machine (sans-IO).
//! - [`sasl`]: PLAIN, LOGIN and CRAM-MD5 exchanges (sans-IO).
//! - [`smtp`]: line framing, commands, replies, EHLO capability rewrite (sans-IO).
//! - [`proxy_proto`]: HAProxy PROXY protocol v1/v2 framing, decoding and encoding.
//! - [`users`]: the Dovecot-style users file and password verification.
//! - [`tls`]: certificate loading, the rustls configuration, certificates chosen by SNI
//!   (`tls::sni`), the usual chain mistakes (`tls::check`) and the server stream (`tls::stream`).
//! - [`metrics`]: metric names, the Prometheus recorder, typed helpers.
//! - [`copy`]: large copies between the relay's buffers, clear of a glibc slow path.

pub mod admin;
pub mod auth;
pub mod backend;
pub mod config;
pub mod conn;
pub mod copy;
pub mod demo;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod outbound;
pub mod proxy_proto;
pub mod quota;
pub mod relay;
pub mod reload;
pub mod sasl;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod smtp;
pub mod store;
pub mod tls;
pub mod users;

#[cfg(test)]
mod layout {
    //! Keeps the `# Layout` above true: the modules are listed top to bottom, and the
    //! code of each (its tests aside) uses only modules listed below it, so the
    //! dependency graph has no cycle and reads in one direction.

    use std::path::Path;

    fn listed() -> Vec<String> {
        include_str!("lib.rs")
            .lines()
            .take_while(|line| line.starts_with("//!"))
            .filter_map(|line| line.strip_prefix("//! - [`"))
            .filter_map(|rest| rest.split('`').next())
            .map(str::to_owned)
            .collect()
    }

    /// The source of module `name` (its file and its directory), without test modules.
    fn source(name: &str) -> String {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![src.join(format!("{name}.rs"))];
        let mut dirs = vec![src.join(name)];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                match path.extension() {
                    _ if path.is_dir() => dirs.push(path),
                    Some(ext) if ext == "rs" && !path.ends_with("tests.rs") => files.push(path),
                    _ => {}
                }
            }
        }
        files
            .iter()
            .filter_map(|file| std::fs::read_to_string(file).ok())
            .map(|text| match text.find("#[cfg(test)]\nmod tests") {
                Some(cut) => text[..cut].to_owned(),
                None => text,
            })
            // Comments may name any module: a doc link is no dependency.
            .flat_map(|text| {
                text.lines()
                    .filter(|line| !line.trim_start().starts_with("//"))
                    .map(|line| format!("{line}\n"))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The crate modules `text` names: `crate::x` paths and `use crate::{x, y::z}`.
    fn uses(text: &str) -> Vec<String> {
        let ident = |s: &str| -> String {
            s.trim_start()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        };
        let mut found = Vec::new();
        for (at, _) in text.match_indices("crate::") {
            let rest = &text[at + "crate::".len()..];
            match rest.strip_prefix('{') {
                Some(group) => {
                    let group = group.split('}').next().unwrap_or("");
                    found.extend(group.split(',').map(ident));
                }
                None => found.push(ident(rest)),
            }
        }
        found
    }

    #[test]
    fn modules_use_only_modules_listed_below_them() {
        let order = listed();
        assert!(order.len() > 10, "layout not found: {order:?}");
        let mut wrong = Vec::new();
        for (rank, module) in order.iter().enumerate() {
            for used in uses(&source(module)) {
                if let Some(at) = order.iter().position(|m| *m == used)
                    && at < rank
                {
                    wrong.push(format!("{module} uses {used}, listed above it"));
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
