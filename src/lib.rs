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
//! - [`config`]: command line and environment (`POSTERN_*`).
//! - [`smtp`]: line framing, pre-AUTH commands, replies, EHLO capability rewrite.
//! - [`sasl`]: PLAIN, LOGIN and CRAM-MD5 exchanges.
//! - [`users`]: the Dovecot-style users file and password verification.
//! - [`session`]: the pre-AUTH state machine.
//! - [`conn`]: drives a session over a socket: TLS, verification, backend hand-off.
//! - [`backend`]: dials the backend and probes its capabilities.
//! - [`proxy_proto`]: HAProxy PROXY protocol v1/v2 framing, decoding and encoding.
//! - [`relay`]: the post-AUTH relay: verbatim bytes, followed by a sans-IO SMTP tracker
//!   ([`relay::tracker`], owning the buffers) applying [`relay::rules`].
//! - [`quota`]: per-user sending limits, in memory or in Redis shared by replicas.
//! - [`limits`]: per-network connection and AUTH-failure limits.
//! - [`listener`]: accept loops and the connection limit.
//! - [`server`]: `postern serve`: wiring, shared state, signals.
//! - [`tls`]: certificate loading, the rustls configuration, certificates chosen by SNI
//!   (`tls::sni`) and the usual chain mistakes (`tls::check`).
//! - [`metrics`]: metric names, the Prometheus recorder, typed helpers.
//! - [`admin`]: `/metrics`, `/healthz` and `/readyz` over HTTP (hyper).
//! - [`reload`]: certificate and users reload on SIGHUP and file change.
//! - [`demo`]: `postern demo`: the real proxy on loopback with a throw-away setup and a
//!   stand-in backend that prints what it receives.
//! - [`bench`](mod@bench): `postern bench`, a load generator for SMTP submission servers.

pub mod admin;
pub mod backend;
pub mod bench;
pub mod config;
pub mod conn;
pub mod demo;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod proxy_proto;
pub mod quota;
pub mod relay;
pub mod reload;
pub mod sasl;
pub mod server;
pub mod session;
pub mod smtp;
pub mod tls;
pub mod users;
