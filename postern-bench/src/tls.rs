//! TLS client configuration for the load generator.
//!
//! The provider is named explicitly (aws-lc-rs) so the process never depends on which
//! crypto providers happen to be compiled in (see DEPENDENCIES.md, "the trap").
//! `--insecure` skips only the certificate *chain and name* checks: handshake signatures
//! are still verified, so a handshake costs the client what a real one does.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::client::Resumption;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{self, CryptoProvider, aws_lc_rs};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::Error;

/// How the server's certificate is checked.
pub enum Trust<'a> {
    /// Verify the chain against the PEM certificates in this file.
    CaFile(&'a Path),
    /// Accept any certificate (self-signed test deployments).
    Insecure,
}

/// Builds the shared client configuration.
///
/// Resumption is off unless asked for: a load test of handshakes should pay for full
/// handshakes, as first-time clients do, and both proxies under comparison then do the
/// same work.
pub fn client_config(trust: Trust<'_>, resumption: bool) -> Result<Arc<ClientConfig>, Error> {
    client_config_with(Arc::new(aws_lc_rs::default_provider()), trust, resumption)
}

/// [`client_config`] with a narrowed provider: the crypto floor offers only the suite
/// and key exchange the load generator negotiates, so it measures that handshake.
pub fn client_config_with(
    provider: Arc<CryptoProvider>,
    trust: Trust<'_>,
    resumption: bool,
) -> Result<Arc<ClientConfig>, Error> {
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = match trust {
        Trust::CaFile(path) => {
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("reading --ca {}: {e}", path.display()))?;
            let (added, _ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("--ca {}: no usable certificate", path.display()).into());
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
            .with_no_client_auth(),
    };
    if !resumption {
        config.resumption = Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// Accepts any certificate chain and name but checks handshake signatures.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, tokio_rustls::rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
