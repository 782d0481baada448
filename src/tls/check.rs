//! What is wrong with a certificate/key pair, in words that name the fix.
//!
//! The common mistakes pass a bare "does the key match" test or fail it for the wrong
//! reason: a chain file with the intermediate first reads as "key does not match", and a
//! chain file with only the leaf loads fine and then every client refuses it ("unable to
//! verify the first certificate"). [`inspect`] looks at the whole file instead. It is
//! pure: the certificates, the key's public half and the time come in, findings go out,
//! so `postern check`, start-up and reload all give the same answer and the tests need
//! no files or clock.
//!
//! Errors stop `serve` (and a reload of that pair); warnings are logged.

use std::time::{Duration, SystemTime};

use tokio_rustls::rustls::pki_types::CertificateDer;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::OID_PKIX_ACCESS_DESCRIPTOR_CA_ISSUERS;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

/// Clients refuse smaller RSA keys: OpenSSL's default security level 2 (Debian 12 and
/// most distributions) and the CA/Browser Forum baseline both require 2048 bits.
pub const MIN_RSA_BITS: usize = 2048;

/// A certificate closer than this to its notAfter is worth a warning at start-up, on
/// reload and once a day (Let's Encrypt renews at 30 days left, so a certificate that
/// gets here was not renewed).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

const DAY: i64 = 86_400;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Clients would refuse the certificate: `serve` does not start with it.
    Error,
    /// Worth knowing, but clients may well accept it.
    Warning,
}

/// One diagnosis, already in the words the operator reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub text: String,
}

impl Finding {
    fn error(text: String) -> Self {
        Finding {
            severity: Severity::Error,
            text,
        }
    }

    fn warning(text: String) -> Self {
        Finding {
            severity: Severity::Warning,
            text,
        }
    }
}

/// The files a pair came from, as shown in messages.
#[derive(Debug, Clone, Copy)]
pub struct Files<'a> {
    pub cert: &'a str,
    pub key: &'a str,
}

/// What could be learnt about the private key.
#[derive(Debug, Clone, Copy)]
pub enum Key<'a> {
    /// The DER SubjectPublicKeyInfo of the key's public half.
    Spki(&'a [u8]),
    /// The crypto provider refused the key, with its reason.
    Unusable(&'a str),
}

/// What the server certificate says about itself, for SNI, metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// SAN DNS names, lower-case, in certificate order.
    pub dns_names: Vec<String>,
    /// The first SAN (DNS or IP), else the subject CN: the metric's `name` label.
    pub label: String,
    /// notAfter, Unix seconds.
    pub not_after: i64,
}

/// The findings for one pair, and the leaf when one could be read.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub leaf: Option<Leaf>,
    pub findings: Vec<Finding>,
}

impl Inspection {
    pub fn errors(&self) -> impl Iterator<Item = &str> {
        self.of(Severity::Error)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &str> {
        self.of(Severity::Warning)
    }

    fn of(&self, severity: Severity) -> impl Iterator<Item = &str> {
        self.findings
            .iter()
            .filter(move |f| f.severity == severity)
            .map(|f| f.text.as_str())
    }
}

/// Checks a chain (in file order) against its key at `now` (Unix seconds).
pub fn inspect(
    files: Files<'_>,
    chain: &[CertificateDer<'_>],
    key: Key<'_>,
    now: i64,
) -> Inspection {
    let mut findings = Vec::new();
    let mut parsed = Vec::with_capacity(chain.len());
    for (index, der) in chain.iter().enumerate() {
        match X509Certificate::from_der(der.as_ref()) {
            Ok((_, cert)) => parsed.push(cert),
            Err(e) => findings.push(Finding::error(format!(
                "certificate {}: block {} is not a valid X.509 certificate ({e}): \
                 replace the file with the PEM your CA issued",
                files.cert,
                index + 1
            ))),
        }
    }
    if !findings.is_empty() || parsed.is_empty() {
        return Inspection {
            leaf: None,
            findings,
        };
    }

    let leaf_index = match key {
        Key::Spki(spki) => parsed.iter().position(|c| c.public_key().raw == spki),
        Key::Unusable(_) => None,
    };
    let leaf_index = match (key, leaf_index) {
        (_, Some(0)) => 0,
        (_, Some(index)) => {
            findings.push(Finding::error(format!(
                "certificate {}: wrong order: the certificate for key {} ({}) is number {} \
                 in the file, but the server certificate must come first: reorder the file \
                 as server certificate, then intermediate(s)",
                files.cert,
                files.key,
                parsed[index].subject(),
                index + 1
            )));
            index
        }
        (Key::Spki(_), None) => {
            let which = if parsed.len() == 1 {
                "the certificate".to_owned()
            } else {
                format!("any of the {} certificates", parsed.len())
            };
            findings.push(Finding::error(format!(
                "private key {} does not match {which} in {}: give the key this \
                 certificate was issued for, or the certificate for this key",
                files.key, files.cert
            )));
            0
        }
        (Key::Unusable(reason), None) => {
            // A small RSA key is refused by the provider too; the size finding below
            // says why in better words than the provider's.
            if rsa_too_small(&parsed[0]).is_none() {
                findings.push(Finding::error(format!(
                    "private key {}: {reason}",
                    files.key
                )));
            }
            0
        }
    };
    let leaf = &parsed[leaf_index];

    if let Some(bits) = rsa_too_small(leaf) {
        findings.push(Finding::error(format!(
            "certificate {}: its RSA key has {bits} bits; clients refuse keys under \
             {MIN_RSA_BITS} bits: get a new certificate with an RSA key of at least \
             {MIN_RSA_BITS} bits or an ECDSA key",
            files.cert
        )));
    }

    let validity = leaf.validity();
    let (not_before, not_after) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    if not_after < now {
        findings.push(Finding::error(format!(
            "certificate {}: expired on {} ({} ago): renew it",
            files.cert,
            date(not_after),
            span(now - not_after)
        )));
    } else if not_before > now {
        findings.push(Finding::error(format!(
            "certificate {}: not valid before {} (in {}): check this machine's clock, or \
             keep the previous certificate until then",
            files.cert,
            date(not_before),
            span(not_before - now)
        )));
    }

    let self_signed = leaf.subject().as_raw() == leaf.issuer().as_raw();
    let issuer_present = parsed
        .iter()
        .any(|c| c.subject().as_raw() == leaf.issuer().as_raw());
    if !self_signed && !issuer_present {
        // A CA that publishes its issuer's address (AIA caIssuers) is a public CA, and
        // public CAs never sign servers from a root (CA/Browser Forum baseline): the
        // missing certificate is an intermediate no client has. Without AIA it may be a
        // private CA that clients trust directly, as certs/mkcerts.sh makes.
        if names_ca_issuers(leaf) {
            findings.push(Finding::error(format!(
                "certificate {}: missing intermediate: the file has no certificate for the \
                 issuer {} and clients will refuse the chain (\"unable to verify the first \
                 certificate\"): append the intermediate certificate(s) after the server \
                 certificate (with ACME clients, use fullchain.pem, not cert.pem)",
                files.cert,
                leaf.issuer()
            )));
        } else {
            findings.push(Finding::warning(format!(
                "certificate {}: the issuer {} is not in the file: fine if clients trust \
                 it directly (a private CA), otherwise they refuse the chain (\"unable to \
                 verify the first certificate\"): append the intermediate certificate(s) \
                 after the server certificate",
                files.cert,
                leaf.issuer()
            )));
        }
    }

    let leaf = describe(leaf);
    if leaf.not_after >= now
        && let Some(text) = expiry_warning(files.cert, &leaf, now)
    {
        findings.push(Finding::warning(text));
    }
    Inspection {
        leaf: Some(leaf),
        findings,
    }
}

/// The once-a-day warning for a certificate under [`EXPIRY_WARNING`] from its end.
pub fn expiry_warning(cert: &str, leaf: &Leaf, now: i64) -> Option<String> {
    let left = leaf.not_after - now;
    if left < 0 || left >= EXPIRY_WARNING.as_secs() as i64 {
        return None;
    }
    Some(format!(
        "certificate {cert} ({}): expires on {}, in {}: renew it",
        leaf.label,
        date(leaf.not_after),
        span(left)
    ))
}

/// A warning when no certificate covers `--hostname`, the name postern gives in its
/// greeting and the one clients are most likely configured with.
pub fn hostname_warning<'a>(
    hostname: &str,
    leaves: impl IntoIterator<Item = &'a Leaf>,
) -> Option<String> {
    let mut names = Vec::new();
    for leaf in leaves {
        if leaf
            .dns_names
            .iter()
            .any(|pattern| super::sni::covers(pattern, hostname))
        {
            return None;
        }
        names.extend(leaf.dns_names.iter().map(String::as_str));
    }
    let names = if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    };
    Some(format!(
        "--hostname {hostname} is not among the certificates' names ({names}): clients \
         that connect to {hostname} will refuse the certificate: add it to a \
         certificate's names, or set --hostname to one of them"
    ))
}

/// The names, label and notAfter of a certificate.
fn describe(cert: &X509Certificate<'_>) -> Leaf {
    let mut dns_names = Vec::new();
    let mut first_san = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => {
                    let dns = dns.to_ascii_lowercase();
                    first_san.get_or_insert_with(|| dns.clone());
                    dns_names.push(dns);
                }
                GeneralName::IPAddress(bytes) => {
                    if let Some(ip) = ip_text(bytes) {
                        first_san.get_or_insert(ip);
                    }
                }
                _ => {}
            }
        }
    }
    let label = first_san
        .or_else(|| {
            cert.subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "(no name)".to_owned());
    Leaf {
        dns_names,
        label,
        not_after: cert.validity().not_after.timestamp(),
    }
}

fn ip_text(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes)
            .ok()
            .map(|b| std::net::Ipv4Addr::from(b).to_string()),
        16 => <[u8; 16]>::try_from(bytes)
            .ok()
            .map(|b| std::net::Ipv6Addr::from(b).to_string()),
        _ => None,
    }
}

fn rsa_too_small(cert: &X509Certificate<'_>) -> Option<usize> {
    match cert.public_key().parsed() {
        Ok(PublicKey::RSA(rsa)) if rsa.key_size() < MIN_RSA_BITS => Some(rsa.key_size()),
        _ => None,
    }
}

fn names_ca_issuers(cert: &X509Certificate<'_>) -> bool {
    cert.extensions().iter().any(|ext| {
        matches!(ext.parsed_extension(), ParsedExtension::AuthorityInfoAccess(aia)
            if aia.iter().any(|d| d.access_method == OID_PKIX_ACCESS_DESCRIPTOR_CA_ISSUERS))
    })
}

/// `2026-03-01T12:00:00Z`.
pub fn date(unix: i64) -> String {
    let at = match u64::try_from(unix) {
        Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => SystemTime::UNIX_EPOCH,
    };
    humantime::format_rfc3339_seconds(at).to_string()
}

/// `12 days`, or hours under two days: "in 0 days" reads like "now".
fn span(secs: i64) -> String {
    if secs >= 2 * DAY {
        format!("{} days", secs / DAY)
    } else {
        let hours = secs / 3600;
        format!("{hours} hour{}", if hours == 1 { "" } else { "s" })
    }
}

/// Unix seconds now; a clock before 1970 reads as 1970.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
