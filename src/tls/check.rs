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

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, DnType, IsCa, Issuer, KeyPair,
        PublicKeyData, date_time_ymd,
    };

    use super::*;
    use tokio_rustls::rustls::pki_types::pem::PemObject;

    const FILES: Files<'static> = Files {
        cert: "chain.pem",
        key: "key.pem",
    };
    /// 2030-06-01T00:00:00Z: inside every test certificate's validity.
    const MID: i64 = 1_906_416_000;

    /// A 1024-bit RSA self-signed certificate for small.test, made once with
    /// `openssl req -x509 -newkey rsa:1024 -days 36500` (rcgen cannot make such a key,
    /// and aws-lc-rs refuses to load one, which is the point).
    const RSA_1024: &str = "-----BEGIN CERTIFICATE-----
MIICHzCCAYigAwIBAgIUfZ3UZ4hUR+bl8VxsRnmzDakf7yowDQYJKoZIhvcNAQEL
BQAwFTETMBEGA1UEAwwKc21hbGwudGVzdDAgFw0yNjExMzAxMDI0NDhaGA8yMTI2
MTEwNjEwMjQ0OFowFTETMBEGA1UEAwwKc21hbGwudGVzdDCBnzANBgkqhkiG9w0B
AQEFAAOBjQAwgYkCgYEA5zrpXxFCHNP34QLAxOf9E2dm2Ik+sR2FEDDh4Qg697r1
8dSD8dXDbiCSqjS6rXoeiVocaJoj9CKtlvynn71m83gadrT643b1qEPZTTcMrX1X
JLPAOvnUvWWOT7xXWEZDdQXYuwF0HRF9Thct5uESLmFhpv1dKZIzv/pBxSG/zv8C
AwEAAaNqMGgwHQYDVR0OBBYEFMOBnlsnOZNIDeaXUiEyT/5T4veWMB8GA1UdIwQY
MBaAFMOBnlsnOZNIDeaXUiEyT/5T4veWMA8GA1UdEwEB/wQFMAMBAf8wFQYDVR0R
BA4wDIIKc21hbGwudGVzdDANBgkqhkiG9w0BAQsFAAOBgQAdKsQ0Y+ZiQHhV70/A
9o8RVibaA/ZLLW/30ltBodWDs9azgf+z9tCKBSKB0H2FyqqADk04MCoPtr6OPlG2
WrZa58c/4VJB3tsXlYWWdUrRqcqz27fRB8ClxtCcEbjqMuwGNHlLd7dqOIewokQR
AoO0pgXxQSXSbqiq/hDPpLgXQw==
-----END CERTIFICATE-----
";

    /// AIA with one caIssuers URI (RFC 5280 §4.2.2.1), DER by hand: rcgen has no
    /// builder for it.
    fn aia_ca_issuers() -> CustomExtension {
        let uri = b"http://ca.test/int.crt";
        let mut access = vec![0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x02];
        access.push(0x86);
        access.push(uri.len() as u8);
        access.extend_from_slice(uri);
        let mut description = vec![0x30, access.len() as u8];
        description.extend(access);
        let mut content = vec![0x30, description.len() as u8];
        content.extend(description);
        CustomExtension::from_oid_content(&[1, 3, 6, 1, 5, 5, 7, 1, 1], content)
    }

    struct Made {
        der: CertificateDer<'static>,
        key: KeyPair,
    }

    impl Made {
        fn spki(&self) -> Vec<u8> {
            self.key.subject_public_key_info()
        }
    }

    /// A CA (`is_ca`) or server certificate valid through 2030, signed by `issuer` or
    /// by itself.
    fn make(
        cn: &str,
        names: &[&str],
        is_ca: bool,
        issuer: Option<&Issuer<'static, KeyPair>>,
        extra: impl FnOnce(&mut CertificateParams),
    ) -> (Made, CertificateParams) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.not_before = date_time_ymd(2030, 1, 1);
        params.not_after = date_time_ymd(2030, 12, 31);
        if is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        extra(&mut params);
        let cert = match issuer {
            Some(issuer) => params.signed_by(&key, issuer).unwrap(),
            None => params.self_signed(&key).unwrap(),
        };
        (
            Made {
                der: cert.der().clone(),
                key,
            },
            params,
        )
    }

    /// A root, an intermediate, and a server certificate for mx.example.test that
    /// names its issuer's URL (as public CAs do) when `aia` is set.
    fn chain(aia: bool) -> (Made, Made) {
        let (root, root_params) = make("Test Root", &[], true, None, |_| {});
        let root_issuer = Issuer::new(root_params, root.key);
        let (int, int_params) = make("Test Intermediate", &[], true, Some(&root_issuer), |_| {});
        let int_der = int.der.clone();
        let int_issuer = Issuer::new(int_params, int.key);
        let (leaf, _) = make(
            "mx.example.test",
            &["mx.example.test", "*.example.test"],
            false,
            Some(&int_issuer),
            |p| {
                if aia {
                    p.custom_extensions.push(aia_ca_issuers());
                }
            },
        );
        let int = Made {
            der: int_der,
            key: KeyPair::generate().unwrap(),
        };
        (leaf, int)
    }

    fn texts(inspection: &Inspection) -> Vec<(Severity, String)> {
        inspection
            .findings
            .iter()
            .map(|f| (f.severity, f.text.clone()))
            .collect()
    }

    /// The one finding of `inspection`, which must have `severity` and contain `parts`.
    #[track_caller]
    fn assert_one(inspection: &Inspection, severity: Severity, parts: &[&str]) {
        let found = texts(inspection);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].0, severity, "{found:#?}");
        for part in parts {
            assert!(
                found[0].1.contains(part),
                "{part:?} missing: {}",
                found[0].1
            );
        }
    }

    #[test]
    fn a_full_chain_in_order_passes_and_describes_its_leaf() {
        let (leaf, int) = chain(true);
        let spki = leaf.spki();
        let got = inspect(FILES, &[leaf.der, int.der], Key::Spki(&spki), MID);
        assert!(got.findings.is_empty(), "{:#?}", got.findings);
        let described = got.leaf.unwrap();
        assert_eq!(described.dns_names, ["mx.example.test", "*.example.test"]);
        assert_eq!(described.label, "mx.example.test");
        assert_eq!(described.not_after, 1_924_905_600); // 2030-12-31T00:00:00Z
    }

    #[test]
    fn the_intermediate_first_is_named_as_the_wrong_order_not_as_a_wrong_key() {
        let (leaf, int) = chain(true);
        let spki = leaf.spki();
        let got = inspect(FILES, &[int.der, leaf.der], Key::Spki(&spki), MID);
        assert_one(
            &got,
            Severity::Error,
            &[
                "chain.pem: wrong order",
                "key key.pem (CN=mx.example.test) is number 2",
                "server certificate must come first",
            ],
        );
        assert!(!texts(&got)[0].1.contains("does not match"));
    }

    #[test]
    fn a_leaf_without_its_intermediate() {
        // From a public-style CA (AIA caIssuers): clients will refuse it.
        let (leaf, _) = chain(true);
        let spki = leaf.spki();
        let got = inspect(FILES, &[leaf.der], Key::Spki(&spki), MID);
        assert_one(
            &got,
            Severity::Error,
            &[
                "missing intermediate",
                "CN=Test Intermediate",
                "unable to verify the first certificate",
                "fullchain.pem",
            ],
        );
        // From a private CA clients may trust directly: a warning.
        let (leaf, _) = chain(false);
        let spki = leaf.spki();
        let got = inspect(FILES, &[leaf.der], Key::Spki(&spki), MID);
        assert_one(
            &got,
            Severity::Warning,
            &[
                "the issuer CN=Test Intermediate is not in the file",
                "private CA",
            ],
        );
        // A self-signed certificate has no issuer to miss.
        let (own, _) = make("self.test", &["self.test"], false, None, |_| {});
        let spki = own.spki();
        let got = inspect(FILES, &[own.der], Key::Spki(&spki), MID);
        assert!(got.findings.is_empty(), "{:#?}", got.findings);
    }

    #[test]
    fn a_key_for_another_certificate() {
        let (leaf, int) = chain(true);
        let (other, _) = make("other.test", &["other.test"], false, None, |_| {});
        let spki = other.spki();
        let got = inspect(
            FILES,
            std::slice::from_ref(&leaf.der),
            Key::Spki(&spki),
            MID,
        );
        // The missing intermediate is reported too: both are true.
        let found = texts(&got);
        assert!(
            found.iter().any(|(s, t)| *s == Severity::Error
                && t.contains("private key key.pem does not match the certificate in chain.pem")),
            "{found:#?}"
        );
        let got = inspect(FILES, &[leaf.der, int.der], Key::Spki(&spki), MID);
        assert_one(
            &got,
            Severity::Error,
            &["does not match any of the 2 certificates in chain.pem"],
        );
    }

    #[test]
    fn validity_at_the_edges() {
        let (leaf, int) = chain(true);
        let spki = leaf.spki();
        let at = |now| {
            inspect(
                FILES,
                &[leaf.der.clone(), int.der.clone()],
                Key::Spki(&spki),
                now,
            )
        };
        const DAY: i64 = 86_400;
        let start = 1_893_456_000; // 2030-01-01T00:00:00Z
        let end = 1_924_905_600; // 2030-12-31T00:00:00Z
        assert_one(
            &at(end + 3 * DAY),
            Severity::Error,
            &["chain.pem: expired on 2030-12-31T00:00:00Z (3 days ago): renew it"],
        );
        assert_one(
            &at(start - 5 * 3600),
            Severity::Error,
            &[
                "not valid before 2030-01-01T00:00:00Z (in 5 hours)",
                "clock",
            ],
        );
        assert_one(
            &at(end - 10 * DAY),
            Severity::Warning,
            &["(mx.example.test): expires on 2030-12-31T00:00:00Z, in 10 days: renew it"],
        );
        assert!(at(end - 31 * DAY).findings.is_empty());
        assert!(at(start).findings.is_empty() && at(end - 31 * DAY).findings.is_empty());
    }

    #[test]
    fn a_small_rsa_key_is_named_as_such() {
        let der = CertificateDer::from_pem_slice(RSA_1024.as_bytes()).unwrap();
        let now = 1_900_000_000;
        // What aws-lc-rs says about the key is replaced by the reason.
        let got = inspect(
            FILES,
            std::slice::from_ref(&der),
            Key::Unusable("provider refused"),
            now,
        );
        assert_one(
            &got,
            Severity::Error,
            &["its RSA key has 1024 bits", "under 2048 bits", "ECDSA"],
        );
        // A usable key of another kind is still reported, next to the size.
        let got = inspect(FILES, &[der], Key::Spki(b"other"), now);
        assert_eq!(got.errors().count(), 2, "{:#?}", got.findings);
    }

    #[test]
    fn garbage_and_unusable_keys_are_errors_naming_the_file() {
        let got = inspect(
            FILES,
            &[CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00])],
            Key::Spki(b""),
            MID,
        );
        assert_one(
            &got,
            Severity::Error,
            &["chain.pem: block 1 is not a valid X.509"],
        );
        let (leaf, int) = chain(true);
        let got = inspect(FILES, &[leaf.der, int.der], Key::Unusable("bad key"), MID);
        assert_one(&got, Severity::Error, &["private key key.pem: bad key"]);
    }

    #[test]
    fn hostname_must_be_covered_by_some_certificate() {
        let leaf = |names: &[&str]| Leaf {
            dns_names: names.iter().map(|n| n.to_string()).collect(),
            label: names.first().unwrap_or(&"").to_string(),
            not_after: 0,
        };
        let pairs = [leaf(&["mx.example.test"]), leaf(&["*.example.org"])];
        assert_eq!(hostname_warning("mx.example.test", &pairs), None);
        assert_eq!(hostname_warning("smtp.example.org", &pairs), None);
        let warning = hostname_warning("mail.other.test", &pairs).unwrap();
        assert_eq!(
            warning,
            "--hostname mail.other.test is not among the certificates' names \
             (mx.example.test, *.example.org): clients that connect to mail.other.test will \
             refuse the certificate: add it to a certificate's names, or set --hostname to \
             one of them"
        );
        assert!(hostname_warning("a.b.example.org", &pairs).is_some());
    }
}
