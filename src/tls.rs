//! Server TLS: certificate/key pairs chosen by SNI ([`sni`]), checked before use
//! ([`check`]), PEM loading (rustls-pki-types), the rustls config, and the server
//! stream on rustls' unbuffered API ([`stream`]).

pub mod check;
pub mod sni;
pub mod stream;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::crypto::aws_lc_rs::cipher_suite as suite;
use tokio_rustls::rustls::crypto::{CryptoProvider, aws_lc_rs};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::ResolvesServerCert;
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};

pub use sni::Certificates;

/// The crypto provider, named explicitly so a second provider compiled in by some
/// dependency can never make rustls guess (which panics at runtime).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

/// The server's cipher suites in the order it prefers them. rustls picks the first one
/// the client also offers (`ignore_client_order`), so an old TLS 1.2 client that lists
/// AES-128 first still gets AES-256-GCM. TLS 1.3 keeps rustls's own list and order
/// (AES-256-GCM, AES-128-GCM, CHACHA20): every TLS 1.3 suite is an AEAD.
const SERVER_SUITE_ORDER: &[rustls::SupportedCipherSuite] = &[
    suite::TLS13_AES_256_GCM_SHA384,
    suite::TLS13_AES_128_GCM_SHA256,
    suite::TLS13_CHACHA20_POLY1305_SHA256,
    suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
];

/// The provider for serving: [`provider`] with [`SERVER_SUITE_ORDER`].
fn server_provider() -> Arc<CryptoProvider> {
    let mut provider = aws_lc_rs::default_provider();
    provider.cipher_suites = SERVER_SUITE_ORDER.to_vec();
    Arc::new(provider)
}

/// A `--cert`/`--key` pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl fmt::Display for Pair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} / {}", self.cert.display(), self.key.display())
    }
}

/// A pair that passed its checks, with the warnings found on the way.
pub struct Accepted {
    pub loaded: sni::Loaded,
    pub warnings: Vec<String>,
}

/// Reads and checks one pair at `now` (Unix seconds). `Err` holds every error found,
/// each naming the file and the fix.
pub fn load_pair(pair: &Pair, now: i64) -> Result<Accepted, Vec<String>> {
    let chain = read_chain(&pair.cert).map_err(|e| vec![e])?;
    let key_der = PrivateKeyDer::from_pem_file(&pair.key)
        .map_err(|e| vec![format!("reading private key {}: {e}", pair.key.display())])?;
    let signing = server_provider().key_provider.load_private_key(key_der);
    let spki = signing
        .as_ref()
        .ok()
        .and_then(|k| k.public_key())
        .map(|spki| spki.as_ref().to_vec());
    let refusal = match &signing {
        Ok(_) => String::new(),
        Err(e) => format!("not a usable RSA, ECDSA or Ed25519 key ({e})"),
    };
    let key = match (&spki, &signing) {
        (Some(spki), _) => check::Key::Spki(spki),
        (None, Ok(_)) => check::Key::Unusable("the key's public half cannot be derived"),
        (None, Err(_)) => check::Key::Unusable(&refusal),
    };
    let (cert_text, key_text) = (
        pair.cert.display().to_string(),
        pair.key.display().to_string(),
    );
    let files = check::Files {
        cert: &cert_text,
        key: &key_text,
    };
    let inspection = check::inspect(files, &chain, key, now);
    let errors: Vec<String> = inspection.errors().map(str::to_owned).collect();
    let (Ok(signing), Some(leaf), true) = (signing, inspection.leaf.clone(), errors.is_empty())
    else {
        return Err(errors);
    };
    let key = CertifiedKey::new(chain, signing);
    // inspect() already matched the key to the first certificate; this is rustls's own
    // word on it, kept so a disagreement can never serve a mismatched pair.
    key.keys_match().map_err(|e| {
        vec![format!(
            "private key {} does not match certificate {}: {e}",
            pair.key.display(),
            pair.cert.display()
        )]
    })?;
    Ok(Accepted {
        loaded: sni::Loaded {
            key: Arc::new(key),
            leaf,
        },
        warnings: inspection.warnings().map(str::to_owned).collect(),
    })
}

fn read_chain(cert: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("reading certificate {}: {e}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("reading certificate {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "certificate {}: no CERTIFICATE block found",
            cert.display()
        ));
    }
    Ok(chain)
}

/// Every pair loaded and checked, plus the warnings (`--hostname` coverage included).
pub struct Loaded {
    pub certificates: Arc<Certificates>,
    pub warnings: Vec<String>,
}

/// Loads every pair; `Err` holds every error of every pair.
pub fn load_all(pairs: &[Pair], hostname: &str, now: i64) -> Result<Loaded, Vec<String>> {
    if pairs.is_empty() {
        return Err(vec!["no certificate: give --cert and --key".to_owned()]);
    }
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut loaded = Vec::new();
    for pair in pairs {
        match load_pair(pair, now) {
            Ok(accepted) => {
                warnings.extend(accepted.warnings);
                loaded.push((pair.clone(), accepted.loaded));
            }
            Err(e) => errors.extend(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    warnings.extend(check::hostname_warning(
        hostname,
        loaded.iter().map(|(_, l)| &l.leaf),
    ));
    Ok(Loaded {
        certificates: Arc::new(Certificates::new(loaded)),
        warnings,
    })
}

/// The server config for `resolver`: the server's cipher order, no client certificates,
/// session tickets.
pub fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Result<Arc<ServerConfig>, String> {
    let mut config = ServerConfig::builder_with_provider(server_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.ignore_client_order = true;
    // Mail clients reconnect for every send: a resumed session skips the certificate
    // and the key exchange's signature. Stateless tickets (RFC 5077 §4 construction,
    // AES-256 and HMAC-SHA256) hold no per-client memory, unlike the session cache's
    // 256 entries, and the key rotates every 6 hours, bounding what a stolen key opens.
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
        .map_err(|e| format!("TLS session tickets: {e}"))?;
    // One ticket per handshake, not rustls's default two: a TLS 1.3 ticket is used once
    // (RFC 8446 §C.4), and a client that reconnects one send after another gets a fresh
    // one with every resumed session. The second was sealed and sent for nothing.
    config.send_tls13_tickets = 1;
    Ok(Arc::new(config))
}

/// One pair as a server config, for the demo's throw-away certificate.
pub fn load_server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let pair = Pair {
        cert: cert.to_owned(),
        key: key.to_owned(),
    };
    let accepted = load_pair(&pair, check::now()).map_err(|e| e.join("\n"))?;
    server_config(Arc::new(Certificates::new(vec![(pair, accepted.loaded)])))
}

/// The negotiated protocol version and cipher suite, for the session log line. Takes
/// the `CommonState` both kinds of rustls connection deref to, so the buffered
/// `ServerConnection` and the unbuffered [`stream::ServerStream`] can be described.
pub fn describe(conn: &rustls::CommonState) -> String {
    let version = conn
        .protocol_version()
        .and_then(|v| v.as_str())
        .unwrap_or("?");
    let suite = conn
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("?");
    format!("{version}/{suite}")
}
