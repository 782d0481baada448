//! The legacy backend: dialling it for an authenticated client, and probing its
//! capabilities (RFC 5321 §3.1, §4.1.1.1).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use std::net::SocketAddr;

use crate::proxy_proto;
use crate::session::Hello;
use crate::smtp::reply::ReplyError;
use crate::smtp::xclient;
use crate::smtp::{BackendReply, Capabilities};

/// A backend connection whose greeting and EHLO exchange are done.
#[derive(Debug)]
pub struct BackendConn {
    pub stream: TcpStream,
    /// Bytes the backend sent after its EHLO reply; they belong to the client.
    pub pending: Vec<u8>,
    /// What the backend offers on this very connection (its last EHLO reply; nothing
    /// after HELO). The probe's list can differ: Postfix can vary it per client address,
    /// which XCLIENT or PROXY just changed.
    pub capabilities: Capabilities,
}

/// Why the backend could not be used.
#[derive(Debug)]
pub enum BackendError {
    Connect(std::io::Error),
    Io(std::io::Error),
    Timeout,
    Closed,
    Reply(ReplyError),
    /// The backend answered, but not with the expected success code.
    Refused {
        stage: &'static str,
        code: u16,
    },
    /// [`Xclient::Required`], and this connection's EHLO offers no XCLIENT ADDR; the
    /// backend connection was ended with QUIT before anything was relayed.
    Unidentified,
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::Connect(e) => write!(f, "connect: {e}"),
            BackendError::Io(e) => write!(f, "i/o: {e}"),
            BackendError::Timeout => f.write_str("timed out"),
            BackendError::Closed => f.write_str("connection closed by backend"),
            BackendError::Reply(e) => write!(f, "{e}"),
            BackendError::Refused { stage, code } => write!(f, "{stage} answered {code}"),
            BackendError::Unidentified => f.write_str("backend does not offer XCLIENT ADDR"),
        }
    }
}

impl std::error::Error for BackendError {}

/// Whether postern sends XCLIENT (`--xclient`), and whether the session may go on
/// without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Xclient {
    /// Never (no `--xclient`).
    Off,
    /// When the backend's EHLO offers it; otherwise the backend sees postern's address.
    IfOffered,
    /// XCLIENT ADDR must be offered, else [`BackendError::Unidentified`]: for an
    /// anonymous MX session, whose only identity for the backend would otherwise be
    /// postern's own address, which the backend may trust to relay anywhere.
    Required,
}

/// How postern introduces a client to the backend.
#[derive(Debug, Clone)]
pub struct Introduction<'a> {
    /// Send a PROXY header first (`--backend-proxy-protocol`).
    pub proxy: Option<proxy_proto::Version>,
    /// Send XCLIENT, and whether this session needs it.
    pub xclient: Xclient,
    pub client: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
    /// The authenticated user, for XCLIENT LOGIN.
    pub login: Option<&'a str>,
}

/// Connects to the backend and replays the client's greeting, introducing the client
/// with PROXY and XCLIENT as configured, in strict lockstep (no pipelining with a
/// backend that has not said it can). The whole exchange runs under one `timeout`, so
/// a backend that accepts but never speaks cannot hold a client.
pub async fn connect(
    addr: &str,
    hello: &Hello,
    introduction: &Introduction<'_>,
    timeout: Duration,
) -> Result<BackendConn, BackendError> {
    tokio::time::timeout(timeout, async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(BackendError::Connect)?;
        // Relayed SMTP is request/response: without NODELAY every small reply waits
        // for the peer's delayed ACK.
        let _ = stream.set_nodelay(true);
        if let Some(version) = introduction.proxy {
            let header = proxy_proto::encode(version, introduction.client, introduction.local);
            stream.write_all(&header).await.map_err(BackendError::Io)?;
        }
        let mut buf = Vec::new();
        expect(&mut stream, &mut buf, "greeting", 220).await?;
        // XCLIENT is only offered in an EHLO reply: for a client that greeted with HELO,
        // ask with EHLO first and replay its HELO afterwards.
        let use_xclient = introduction.xclient != Xclient::Off;
        let ask_with_ehlo = use_xclient && !hello.extended;
        let first = Hello {
            extended: hello.extended || ask_with_ehlo,
            name: hello.name.clone(),
        };
        stream
            .write_all(first.command_line().as_bytes())
            .await
            .map_err(BackendError::Io)?;
        let stage = if first.extended { "EHLO" } else { "HELO" };
        let ehlo = expect(&mut stream, &mut buf, stage, 250).await?;
        let mut last_reply = ehlo.lines.clone();
        let mut replay = ask_with_ehlo;
        if use_xclient {
            let offered = xclient::offered_attributes(&Capabilities::from_ehlo_reply(&ehlo.lines));
            let takes_addr = offered
                .as_ref()
                .is_some_and(|o| o.iter().any(|a| a == "ADDR"));
            if introduction.xclient == Xclient::Required && !takes_addr {
                // Politeness only: nothing of the client's was sent, and nothing will be.
                let _ = stream.write_all(b"QUIT\r\n").await;
                return Err(BackendError::Unidentified);
            }
            if let Some(offered) = offered {
                let facts = xclient::ClientFacts {
                    addr: introduction.client.ip(),
                    port: introduction.client.port(),
                    helo: &hello.name,
                    login: introduction.login,
                    proto: if hello.extended { "ESMTP" } else { "SMTP" },
                };
                for command in xclient::commands(&offered, &facts) {
                    stream
                        .write_all(command.as_bytes())
                        .await
                        .map_err(BackendError::Io)?;
                    // Postfix answers a successful XCLIENT with a new 220 greeting;
                    // other implementations (smtp-sink) with 250.
                    let reply = read_reply(&mut stream, &mut buf).await?;
                    if !(200..300).contains(&reply.code) {
                        return Err(BackendError::Refused {
                            stage: "XCLIENT",
                            code: reply.code,
                        });
                    }
                }
                replay = true;
            }
        }
        if replay {
            stream
                .write_all(hello.command_line().as_bytes())
                .await
                .map_err(BackendError::Io)?;
            let stage = if hello.extended {
                "EHLO after XCLIENT"
            } else {
                "HELO after EHLO"
            };
            last_reply = expect(&mut stream, &mut buf, stage, 250).await?.lines;
        }
        let capabilities = if hello.extended {
            Capabilities::from_ehlo_reply(&last_reply)
        } else {
            Capabilities::unknown()
        };
        Ok(BackendConn {
            stream,
            pending: buf,
            capabilities,
        })
    })
    .await
    .map_err(|_| BackendError::Timeout)?
}

/// Asks the backend what it offers: greeting, `EHLO hostname`, QUIT. With
/// `--backend-proxy-protocol` the probe sends a header naming its own connection, as a
/// backend that expects one would otherwise wait for it.
pub async fn probe(
    addr: &str,
    hostname: &str,
    proxy: Option<proxy_proto::Version>,
    timeout: Duration,
) -> Result<Capabilities, BackendError> {
    tokio::time::timeout(timeout, async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(BackendError::Connect)?;
        if let Some(version) = proxy {
            let (local, peer) = (stream.local_addr(), stream.peer_addr());
            if let (Ok(local), Ok(peer)) = (local, peer) {
                let header = proxy_proto::encode(version, local, peer);
                stream.write_all(&header).await.map_err(BackendError::Io)?;
            }
        }
        let mut buf = Vec::new();
        expect(&mut stream, &mut buf, "greeting", 220).await?;
        stream
            .write_all(format!("EHLO {hostname}\r\n").as_bytes())
            .await
            .map_err(BackendError::Io)?;
        let reply = expect(&mut stream, &mut buf, "EHLO", 250).await?;
        // Politeness only: the answer to QUIT changes nothing.
        let _ = stream.write_all(b"QUIT\r\n").await;
        Ok(Capabilities::from_ehlo_reply(&reply.lines))
    })
    .await
    .map_err(|_| BackendError::Timeout)?
}

/// How soon a failed probe is retried.
const DOWN_RETRY: Duration = Duration::from_secs(1);

/// Probes the backend every `interval`, publishing the capabilities of the last
/// successful probe and whether the last probe succeeded.
pub async fn probe_forever(
    addr: String,
    hostname: Arc<str>,
    interval: Duration,
    proxy: Option<proxy_proto::Version>,
    capabilities: watch::Sender<Arc<Capabilities>>,
    up: watch::Sender<bool>,
) {
    loop {
        // The caller ran the first probe. While the backend is down, look again every
        // second (capped by the interval): a pod whose MTA starts a moment after postern
        // should turn ready as soon as the MTA answers, not a whole interval later.
        let wait = if *up.borrow() {
            interval
        } else {
            interval.min(DOWN_RETRY)
        };
        tokio::time::sleep(wait).await;
        match probe(
            &addr,
            &hostname,
            proxy,
            interval.max(Duration::from_secs(5)),
        )
        .await
        {
            Ok(caps) => {
                if !*up.borrow() {
                    tracing::info!(backend = %addr, "backend probe succeeded");
                }
                capabilities.send_if_modified(|current| {
                    let changed = **current != caps;
                    if changed {
                        *current = Arc::new(caps);
                    }
                    changed
                });
                up.send_replace(true);
            }
            Err(error) => {
                // Logged when the backend goes down, not on every retry while it stays down.
                if *up.borrow() {
                    tracing::warn!(backend = %addr, %error, "backend probe failed");
                }
                up.send_replace(false);
            }
        }
    }
}

/// Reads one reply and checks its code. Bytes after it stay in `buf`.
async fn expect(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    stage: &'static str,
    code: u16,
) -> Result<BackendReply, BackendError> {
    let reply = read_reply(stream, buf).await?;
    if reply.code != code {
        return Err(BackendError::Refused {
            stage,
            code: reply.code,
        });
    }
    Ok(reply)
}

async fn read_reply(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<BackendReply, BackendError> {
    loop {
        if let Some((reply, used)) = BackendReply::parse(buf).map_err(BackendError::Reply)? {
            buf.drain(..used);
            return Ok(reply);
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.map_err(BackendError::Io)?;
        if n == 0 {
            return Err(BackendError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// How the backend learns who an anonymous `--listen-mx` client is. Without one of
/// these it sees postern's own address, and a backend that trusts that address (the
/// usual sidecar: Postfix `permit_mynetworks` with postern on loopback) relays mail from
/// anyone to anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MxIdentity {
    /// A PROXY header on every backend connection (`--backend-proxy-protocol`).
    ProxyHeader,
    /// XCLIENT ADDR (`--xclient`): a backend connection that does not offer it gets the
    /// client `451 4.3.0` at MAIL instead of a relay.
    Xclient,
    /// Neither, and the operator said so (`--allow-mx-open-relay`).
    Unidentified,
}

/// Why `--listen-mx` will not start as configured.
const MX_OPEN_RELAY: &str = "--listen-mx without --xclient or --backend-proxy-protocol: \
the backend would see every MX client as postern's own address and, if it trusts that \
address (Postfix mynetworks, loopback), relay mail from anyone to anywhere. Add --xclient \
(and postern's address to the backend's smtpd_authorized_xclient_hosts) or \
--backend-proxy-protocol; or, if the backend does not trust postern's address, \
--allow-mx-open-relay";

impl MxIdentity {
    /// The identity the flags give, or the error that names the fix. With both flags
    /// PROXY wins: it already carries the address, so XCLIENT is then only a bonus.
    pub fn choose(
        xclient: bool,
        proxy: Option<proxy_proto::Version>,
        allow_open_relay: bool,
    ) -> Result<MxIdentity, String> {
        match (proxy, xclient, allow_open_relay) {
            (Some(_), _, _) => Ok(MxIdentity::ProxyHeader),
            (None, true, _) => Ok(MxIdentity::Xclient),
            (None, false, true) => Ok(MxIdentity::Unidentified),
            (None, false, false) => Err(MX_OPEN_RELAY.to_owned()),
        }
    }
}

/// What is wrong with the backend's XCLIENT offer when `--xclient` is set, in words
/// for the start-up log and `postern check`; `None` if ADDR is offered or not needed.
/// The probe connects from postern's address as sessions do, so its EHLO shows what
/// `smtpd_authorized_xclient_hosts` grants postern.
pub fn xclient_gap(
    xclient: bool,
    mx_identity: Option<MxIdentity>,
    capabilities: &Capabilities,
) -> Option<String> {
    if !xclient {
        return None;
    }
    let problem = match xclient::offered_attributes(capabilities) {
        None => {
            "--xclient is set but the backend does not offer XCLIENT to postern \
                 (Postfix: add postern's address to smtpd_authorized_xclient_hosts)"
        }
        Some(offered) if !offered.iter().any(|a| a == "ADDR") => {
            "--xclient is set but the backend's XCLIENT does not take ADDR"
        }
        Some(_) => return None,
    };
    let consequence = if mx_identity == Some(MxIdentity::Xclient) {
        "anonymous MX sessions get 451 4.3.0 at MAIL until it does"
    } else {
        "sessions reach it without the client's address"
    };
    Some(format!("{problem}; {consequence}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy_proto::Version;

    #[test]
    fn mx_identity_needs_a_way_to_name_the_client_or_an_explicit_risk() {
        use MxIdentity::*;
        let v2 = Some(Version::V2);
        // (xclient, proxy, allow_open_relay) -> identity
        for (name, xclient, proxy, allow, want) in [
            ("proxy alone", false, v2, false, Some(ProxyHeader)),
            ("proxy beats xclient", true, v2, false, Some(ProxyHeader)),
            (
                "allow is moot with proxy",
                false,
                v2,
                true,
                Some(ProxyHeader),
            ),
            ("xclient alone", true, None, false, Some(Xclient)),
            (
                "allow is moot with xclient",
                true,
                None,
                true,
                Some(Xclient),
            ),
            ("explicit risk", false, None, true, Some(Unidentified)),
            ("nothing: open relay", false, None, false, None),
        ] {
            let got = MxIdentity::choose(xclient, proxy, allow);
            assert_eq!(got.as_ref().ok().copied(), want, "{name}: {got:?}");
        }
        let error = MxIdentity::choose(false, None, false).unwrap_err();
        for fix in [
            "--xclient",
            "--backend-proxy-protocol",
            "--allow-mx-open-relay",
        ] {
            assert!(error.contains(fix), "{error}");
        }
    }

    #[test]
    fn xclient_gap_names_what_the_backend_lacks_and_what_follows() {
        let caps = |lines: &[&str]| {
            let lines: Vec<String> = ["backend.test"]
                .iter()
                .chain(lines)
                .map(|l| l.to_string())
                .collect();
            Capabilities::from_ehlo_reply(&lines)
        };
        let mx = Some(MxIdentity::Xclient);
        let none = caps(&["PIPELINING"]);
        let no_addr = caps(&["XCLIENT NAME HELO LOGIN"]);
        let full = caps(&["XCLIENT NAME ADDR PORT PROTO HELO LOGIN"]);
        for (name, xclient, identity, capabilities, want) in [
            ("not asked", false, mx, &none, None),
            ("offered", true, mx, &full, None),
            (
                "not offered, MX",
                true,
                mx,
                &none,
                Some("does not offer XCLIENT to postern"),
            ),
            (
                "no ADDR, MX",
                true,
                mx,
                &no_addr,
                Some("XCLIENT does not take ADDR"),
            ),
            (
                "not offered, submission only",
                true,
                None,
                &none,
                Some("sessions reach it without the client's address"),
            ),
        ] {
            let got = xclient_gap(xclient, identity, capabilities);
            match (want, &got) {
                (None, None) => {}
                (Some(part), Some(text)) if text.contains(part) => {}
                _ => panic!("{name}: {got:?}"),
            }
        }
        let mx_gap = xclient_gap(true, mx, &none).unwrap_or_default();
        assert!(
            mx_gap.contains("451 4.3.0") && mx_gap.contains("smtpd_authorized_xclient_hosts"),
            "{mx_gap}"
        );
    }
}
