//! Reaching the upstream submission service: TCP, TLS (STARTTLS or implicit, TLS 1.2+,
//! the certificate checked against `--upstream-ca` or the system's roots, SNI = the
//! upstream's host name), then the sans-IO [`Handshake`] driven over it. Each phase
//! shares one deadline, every reply is bounded ([`BackendReply::parse`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use super::handshake::{Failure, Handshake, Login, Step};
use crate::config::relay_out::UpstreamTls;
use crate::smtp::reply::ReplyError;
use crate::smtp::{BackendReply, Capabilities, Reply};
use crate::{metrics, tls};

/// A logged-in upstream connection, ready for the relay.
pub struct Connected {
    pub stream: TlsStream<TcpStream>,
    /// Bytes the upstream sent after its 235 (none from a well-behaved one).
    pub pending: Vec<u8>,
    /// Its EHLO answer over TLS.
    pub capabilities: Capabilities,
}

/// Why the upstream could not be used; each maps to one reply to the sender.
#[derive(Debug)]
pub enum DialError {
    Connect(std::io::Error),
    Timeout,
    Tls(std::io::Error),
    Io(std::io::Error),
    Closed,
    Reply(ReplyError),
    /// The upstream sent bytes after its `220` to STARTTLS, before the handshake:
    /// they would be read as if they came over TLS (CVE-2011-1430).
    InjectedBeforeTls,
    Handshake(Failure),
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialError::Connect(e) => write!(f, "connect: {e}"),
            DialError::Timeout => f.write_str("timed out"),
            DialError::Tls(e) => write!(f, "TLS: {e}"),
            DialError::Io(e) => write!(f, "i/o: {e}"),
            DialError::Closed => f.write_str("connection closed by upstream"),
            DialError::Reply(e) => write!(f, "{e}"),
            DialError::InjectedBeforeTls => {
                f.write_str("upstream sent data between STARTTLS and the TLS handshake")
            }
            DialError::Handshake(failure) => write!(f, "{failure}"),
        }
    }
}

impl std::error::Error for DialError {}

impl DialError {
    /// The `result` label of `postern_upstream_sessions_total`.
    pub fn label(&self) -> &'static str {
        use metrics::upstream_result as r;
        match self {
            DialError::Connect(_) | DialError::Closed | DialError::Io(_) => r::UNREACHABLE,
            DialError::Timeout => r::TIMEOUT,
            DialError::Tls(_) | DialError::InjectedBeforeTls => r::TLS_FAILED,
            DialError::Handshake(Failure::NoStartTls) => r::TLS_FAILED,
            DialError::Handshake(Failure::AuthRefused { .. })
            | DialError::Handshake(Failure::MechanismNotOffered(_)) => r::AUTH_FAILED,
            DialError::Reply(_) | DialError::Handshake(Failure::Refused { .. }) => r::REFUSED,
        }
    }

    /// What the sender is told. Always temporary: its queue retries, and a refused
    /// login is postern's problem (or a token server's), never the message's. An upstream
    /// 535 is no proof of bad credentials either (its SASL service may be down).
    pub fn reply(&self) -> Reply {
        match self {
            DialError::Handshake(Failure::AuthRefused { .. })
            | DialError::Handshake(Failure::MechanismNotOffered(_)) => {
                Reply::new(454, "4.7.0 Upstream authentication failed, try again later")
            }
            DialError::Tls(_) | DialError::InjectedBeforeTls => {
                Reply::new(451, "4.4.2 Upstream TLS failed, try again later")
            }
            DialError::Handshake(Failure::NoStartTls) => {
                Reply::new(451, "4.4.2 Upstream offers no TLS, try again later")
            }
            DialError::Connect(_) | DialError::Timeout => {
                Reply::new(451, "4.4.1 Upstream not reachable, try again later")
            }
            DialError::Io(_)
            | DialError::Closed
            | DialError::Reply(_)
            | DialError::Handshake(Failure::Refused { .. }) => {
                Reply::new(451, "4.4.2 Upstream unavailable, try again later")
            }
        }
    }
}

/// Where the upstream is and how to reach it.
#[derive(Clone)]
pub struct Upstream {
    /// `HOST:PORT` as given.
    pub addr: String,
    pub host: String,
    pub port: u16,
    pub mode: UpstreamTls,
    pub tls: Arc<ClientConfig>,
    /// postern's EHLO name.
    pub hostname: String,
    pub timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// What a dial is for.
enum Purpose {
    /// Log in with these credentials and keep the connection.
    Login(Login),
    /// EHLO over TLS, then QUIT.
    Probe,
}

/// The most bytes read per read call.
const READ_CHUNK: usize = 4096;

impl Upstream {
    /// Connects and logs in, under one deadline.
    pub async fn connect(&self, login: Login) -> Result<Connected, DialError> {
        tokio::time::timeout(self.timeout, self.dial(Purpose::Login(login)))
            .await
            .unwrap_or(Err(DialError::Timeout))
    }

    /// Proves the upstream is there: connect, TLS, EHLO; returns what it offers.
    pub async fn probe(&self) -> Result<Capabilities, DialError> {
        let dialled = tokio::time::timeout(self.timeout, self.dial(Purpose::Probe))
            .await
            .unwrap_or(Err(DialError::Timeout))?;
        let mut stream = dialled.stream;
        // Politeness only: the answer changes nothing.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            stream.write_all(b"QUIT\r\n").await?;
            stream.shutdown().await
        })
        .await;
        Ok(dialled.capabilities)
    }

    async fn dial(&self, purpose: Purpose) -> Result<Connected, DialError> {
        let mut tcp = TcpStream::connect(self.addr.as_str())
            .await
            .map_err(DialError::Connect)?;
        // Request/response both ways: no waiting on delayed ACKs.
        let _ = tcp.set_nodelay(true);
        let implicit = self.mode == UpstreamTls::Implicit;
        let mut handshake = match purpose {
            Purpose::Login(login) => {
                Handshake::new(&self.hostname, &self.host, self.port, implicit, login)
            }
            Purpose::Probe => Handshake::probe(&self.hostname, implicit),
        };
        let mut buf = Vec::new();
        let (mut stream, first) = if implicit {
            (self.start_tls(tcp).await?, None)
        } else {
            match run(&mut tcp, &mut handshake, &mut buf, None).await? {
                Ran::StartTls if buf.is_empty() => {}
                Ran::StartTls => return Err(DialError::InjectedBeforeTls),
                // The handshake asks for TLS before it can finish.
                Ran::Done(_) => return Err(DialError::Handshake(Failure::NoStartTls)),
            }
            let first = handshake.on_tls_established();
            (self.start_tls(tcp).await?, Some(first))
        };
        match run(&mut stream, &mut handshake, &mut buf, first).await? {
            Ran::Done(capabilities) => Ok(Connected {
                stream,
                pending: buf,
                capabilities,
            }),
            // A second STARTTLS over TLS is a protocol error of the upstream.
            Ran::StartTls => Err(DialError::Handshake(Failure::Refused {
                stage: "STARTTLS",
                code: 220,
                text: "STARTTLS inside TLS".into(),
            })),
        }
    }

    async fn start_tls(&self, tcp: TcpStream) -> Result<TlsStream<TcpStream>, DialError> {
        let name = ServerName::try_from(self.host.clone())
            .map_err(|e| DialError::Tls(std::io::Error::other(e)))?;
        TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(DialError::Tls)
    }
}

/// How a run of the handshake over one stream ended.
enum Ran {
    StartTls,
    Done(Capabilities),
}

async fn run<S>(
    stream: &mut S,
    handshake: &mut Handshake,
    buf: &mut Vec<u8>,
    mut send: Option<Step>,
) -> Result<Ran, DialError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match send.take() {
            Some(Step::Send(bytes)) => {
                stream.write_all(&bytes).await.map_err(DialError::Io)?;
                stream.flush().await.map_err(DialError::Io)?;
            }
            Some(Step::StartTls) => return Ok(Ran::StartTls),
            Some(Step::Done { capabilities }) => return Ok(Ran::Done(capabilities)),
            Some(Step::Failed(failure)) => return Err(DialError::Handshake(failure)),
            None => {}
        }
        let reply = read_reply(stream, buf).await?;
        send = Some(handshake.on_reply(&reply));
    }
}

async fn read_reply<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<BackendReply, DialError> {
    loop {
        if let Some((reply, used)) = BackendReply::parse(buf).map_err(DialError::Reply)? {
            buf.drain(..used);
            return Ok(reply);
        }
        let mut chunk = [0u8; READ_CHUNK];
        let n = stream.read(&mut chunk).await.map_err(DialError::Io)?;
        if n == 0 {
            return Err(DialError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The TLS client settings: `ca`'s certificates, or the system's roots; TLS 1.2 and
/// 1.3 only, on the build's one crypto provider.
pub fn client_config(flag: &str, ca: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            let error = |why: String| format!("{flag} {}: {why}", path.display());
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| error(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| error(e.to_string()))?;
            if certs.is_empty() {
                return Err(error("no CERTIFICATE in it".to_owned()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| error(e.to_string()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(format!(
                    "no system CA certificates found; give the upstream's CA with {flag}"
                ));
            }
        }
    }
    let config = ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("{flag}: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
