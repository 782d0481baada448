//! Certificates made with the openssl command line, the way an operator's CA makes them:
//! a root, an intermediate, and server certificates signed by the intermediate with
//! `openssl ca`, which can also back-date and post-date them (`-startdate`/`-enddate`).
//! Server certificates carry an AIA caIssuers URL, as those of public CAs do.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Output, STEP, run};

const CONFIG: &str = r#"
[ca]
default_ca = test

[test]
dir = .
database = index.txt
new_certs_dir = issued
serial = serial
default_md = sha256
policy = any
unique_subject = no
copy_extensions = none
email_in_dn = no

[any]
commonName = supplied

[req]
distinguished_name = dn
prompt = no

[dn]
CN = unused

[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[leaf_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = ${ENV::SAN}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
authorityInfoAccess = caIssuers;URI:http://ca.test/intermediate.crt
"#;

/// A root and an intermediate in a directory of their own.
pub struct Ca {
    pub dir: PathBuf,
    /// The root certificate: what clients trust.
    pub root: PathBuf,
    /// The intermediate certificate: what a chain file must carry after the leaf.
    pub intermediate: PathBuf,
}

/// The key type of a server certificate.
#[derive(Debug, Clone, Copy)]
pub enum KeyType {
    EcdsaP256,
    Rsa(u32),
}

/// When a server certificate is valid, in days from now (negative: in the past).
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub from_days: i64,
    pub to_days: i64,
}

impl Validity {
    pub const NORMAL: Validity = Validity {
        from_days: -1,
        to_days: 90,
    };
}

/// A server certificate's files.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The server certificate alone.
    pub cert: PathBuf,
    /// Server certificate, then intermediate: what `--cert` should get.
    pub chain: PathBuf,
    /// Intermediate, then server certificate: the classic ordering mistake.
    pub reversed: PathBuf,
    pub key: PathBuf,
}

#[track_caller]
fn openssl(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("openssl");
    // The config reads ${ENV::SAN} wherever it is loaded, so it must always be set.
    cmd.current_dir(dir).args(args).env("SAN", "DNS:unused");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run(&mut cmd, b"", STEP);
    out.assert_success(&format!("openssl {}", args.join(" ")));
    out
}

/// `openssl ca` date format, UTC, `days` from now.
fn ca_date(days: i64) -> String {
    let out = run(
        Command::new("date")
            .arg("-u")
            .arg(format!("-d{days} days"))
            .arg("+%Y%m%d%H%M%SZ"),
        b"",
        STEP,
    );
    out.assert_success("date");
    out.stdout.trim().to_owned()
}

fn key_args(key: KeyType) -> Vec<String> {
    match key {
        KeyType::EcdsaP256 => vec![
            "-newkey".into(),
            "ec".into(),
            "-pkeyopt".into(),
            "ec_paramgen_curve:P-256".into(),
        ],
        KeyType::Rsa(bits) => vec!["-newkey".into(), format!("rsa:{bits}")],
    }
}

impl Ca {
    /// A new root and intermediate in `dir`.
    pub fn new(dir: &Path) -> Ca {
        std::fs::write(dir.join("openssl.cnf"), CONFIG).unwrap();
        std::fs::write(dir.join("index.txt"), "").unwrap();
        std::fs::write(dir.join("serial"), "1000\n").unwrap();
        std::fs::create_dir_all(dir.join("issued")).unwrap();
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-config",
                "openssl.cnf",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "root.key",
                "-out",
                "root.pem",
                "-subj",
                "/CN=postern test root",
                "-days",
                "3650",
                "-extensions",
                "ca_ext",
            ],
            &[],
        );
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-config",
                "openssl.cnf",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "intermediate.key",
                "-out",
                "intermediate.csr",
                "-subj",
                "/CN=postern test intermediate",
            ],
            &[],
        );
        openssl(
            dir,
            &[
                "ca",
                "-batch",
                "-config",
                "openssl.cnf",
                "-cert",
                "root.pem",
                "-keyfile",
                "root.key",
                "-in",
                "intermediate.csr",
                "-out",
                "intermediate.pem",
                "-days",
                "3650",
                "-extensions",
                "ca_ext",
                "-notext",
            ],
            &[("SAN", "DNS:unused")],
        );
        Ca {
            dir: dir.to_owned(),
            root: dir.join("root.pem"),
            intermediate: dir.join("intermediate.pem"),
        }
    }

    /// A server certificate `file` (a file-name stem) for `names` (DNS SANs, the first
    /// also the CN), signed by the intermediate.
    pub fn leaf(&self, file: &str, names: &[&str], key: KeyType, validity: Validity) -> Leaf {
        let dir = &self.dir;
        let key_path = format!("{file}.key");
        let csr = format!("{file}.csr");
        let cert = format!("{file}.pem");
        let mut req: Vec<String> = ["req", "-new", "-config", "openssl.cnf", "-nodes"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        req.extend(key_args(key));
        req.extend(
            [
                "-keyout",
                &key_path,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={}", names[0]),
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        let req: Vec<&str> = req.iter().map(String::as_str).collect();
        openssl(dir, &req, &[]);
        let san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
        let (start, end) = (ca_date(validity.from_days), ca_date(validity.to_days));
        openssl(
            dir,
            &[
                "ca",
                "-batch",
                "-config",
                "openssl.cnf",
                "-cert",
                "intermediate.pem",
                "-keyfile",
                "intermediate.key",
                "-in",
                &csr,
                "-out",
                &cert,
                "-startdate",
                &start,
                "-enddate",
                &end,
                "-extensions",
                "leaf_ext",
                "-notext",
            ],
            &[("SAN", &san.join(","))],
        );
        let leaf_pem = std::fs::read_to_string(dir.join(&cert)).unwrap();
        let int_pem = std::fs::read_to_string(&self.intermediate).unwrap();
        let chain = dir.join(format!("{file}.chain.pem"));
        let reversed = dir.join(format!("{file}.reversed.pem"));
        std::fs::write(&chain, format!("{leaf_pem}{int_pem}")).unwrap();
        std::fs::write(&reversed, format!("{int_pem}{leaf_pem}")).unwrap();
        Leaf {
            cert: dir.join(cert),
            chain,
            reversed,
            key: dir.join(key_path),
        }
    }
}

/// `openssl x509 -enddate` of `cert` as Unix seconds (GNU date reads openssl's format).
pub fn enddate_unix(cert: &Path) -> i64 {
    let out = run(
        Command::new("openssl")
            .args(["x509", "-noout", "-enddate", "-in"])
            .arg(cert),
        b"",
        STEP,
    );
    out.assert_success("openssl x509 -enddate");
    let date = out.stdout.trim().trim_start_matches("notAfter=").to_owned();
    let out = run(
        Command::new("date").args(["-u", "-d", &date, "+%s"]),
        b"",
        STEP,
    );
    out.assert_success("date +%s");
    out.stdout.trim().parse().unwrap()
}

/// The PEM of the first certificate in `text`, whitespace-normalised for comparison.
pub fn first_pem(text: &str) -> Option<String> {
    let start = text.find("-----BEGIN CERTIFICATE-----")?;
    let end_marker = "-----END CERTIFICATE-----";
    let end = text[start..].find(end_marker)? + start + end_marker.len();
    Some(text[start..end].split_whitespace().collect())
}
