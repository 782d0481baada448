//! A client of Dovecot's authentication protocol: the one Postfix speaks with
//! `smtpd_sasl_type = dovecot`, so that postern can check SMTP AUTH against the users a
//! site's Dovecot already serves, with whatever mechanisms that Dovecot offers.
//!
//! - [`protocol`]: the wire format (sans-IO): framing, tab-escaping, the handshake,
//!   `AUTH`/`CONT`/`CANCEL`, `OK`/`CONT`/`FAIL`, and which mechanisms are usable.
//! - [`connection`]: one connection's state (sans-IO): the handshake, then requests
//!   multiplexed under their ids.

pub mod connection;
pub mod protocol;
