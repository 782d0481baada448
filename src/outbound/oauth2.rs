//! OAuth2 access tokens for XOAUTH2/OAUTHBEARER (RFC 6749): the client-credentials
//! grant (§4.4, Microsoft's app-only SMTP send) or the refresh-token grant (§6,
//! Google and delegated Microsoft), cached and refreshed ahead of expiry.
//!
//! [`Grant::form`] and [`parse_response`] are the protocol, sans-IO. [`TokenSource`]
//! carries them over HTTP/1.1 (hyper; TLS through the process's one rustls provider),
//! one request at a time however many sessions wait, and keeps the token fresh in the
//! background so a session rarely waits at all. Tokens and secrets are [`Secret`]s:
//! never in a log line, a `Debug` or an error message. A refresh token the server
//! rotates is written back to its file atomically (a temporary file, then rename), so a
//! crash never leaves a half-written one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, watch};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::ServerName;
use tracing::{info, warn};

use super::secret::Secret;
use crate::metrics;

/// RFC 6749 Appendix B: `application/x-www-form-urlencoded` keeps only the unreserved
/// characters.
const FORM: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The largest token response read; real ones are a few KiB (a Microsoft JWT ~2 KiB).
pub const MAX_RESPONSE: usize = 64 * 1024;

/// A token is renewed this long before it expires at the latest...
const REFRESH_AHEAD_MAX: Duration = Duration::from_secs(300);

/// ...and no earlier than when this fraction (1/4) of its life is left, so short-lived
/// tokens are still reused.
const REFRESH_AHEAD_DIVISOR: u32 = 4;

/// When the server gives no `expires_in` (it is only RECOMMENDED): assume an hour.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// The longest lifetime believed: a larger `expires_in` (a server's mistake) would
/// otherwise overflow the clock arithmetic, and a day-old token is renewed anyway.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Waits between failed background refreshes, doubling up to the maximum.
const RETRY_MIN: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// What postern asks the token endpoint for.
#[derive(Debug, Clone)]
pub struct Grant {
    pub client_id: String,
    pub client_secret: Option<Secret>,
    pub scope: Option<String>,
}

impl Grant {
    /// The request body: the refresh-token grant with `refresh_token`, else client
    /// credentials.
    pub fn form(&self, refresh_token: Option<&Secret>) -> String {
        let mut fields: Vec<(&str, &str)> = Vec::new();
        match refresh_token {
            Some(token) => {
                fields.push(("grant_type", "refresh_token"));
                fields.push(("refresh_token", token.expose()));
            }
            None => fields.push(("grant_type", "client_credentials")),
        }
        fields.push(("client_id", &self.client_id));
        if let Some(secret) = &self.client_secret {
            fields.push(("client_secret", secret.expose()));
        }
        if let Some(scope) = &self.scope {
            fields.push(("scope", scope));
        }
        fields
            .iter()
            .map(|(name, value)| format!("{name}={}", utf8_percent_encode(value, FORM)))
            .collect::<Vec<_>>()
            .join("&")
    }
}

/// A successful token response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub access_token: Secret,
    pub lifetime: Duration,
    /// A new refresh token (rotation), to be kept instead of the old one.
    pub refresh_token: Option<Secret>,
}

/// Why no token was obtained. Never carries a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// Not reached, no answer in time, or a broken exchange.
    Unreachable(String),
    /// An error answer (RFC 6749 §5.2: `invalid_client`, `invalid_grant`...).
    Refused { status: u16, error: String },
    /// An answer that is not a usable token response.
    Invalid(String),
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenError::Unreachable(why) => write!(f, "token endpoint unreachable: {why}"),
            TokenError::Refused { status, error } => {
                write!(f, "token endpoint refused ({status}): {error}")
            }
            TokenError::Invalid(why) => write!(f, "token endpoint answer unusable: {why}"),
        }
    }
}

impl std::error::Error for TokenError {}

/// Reads a token endpoint's answer (RFC 6749 §5.1, §5.2).
pub fn parse_response(status: u16, body: &[u8]) -> Result<Issued, TokenError> {
    let json: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| TokenError::Invalid(format!("HTTP {status}, not JSON")))?;
    if status != 200 {
        // Only the error code and its description: both are the server's words about
        // the request, and neither holds a credential.
        let text = |key: &str| json.get(key).and_then(|v| v.as_str()).map(printable);
        let error = match (text("error"), text("error_description")) {
            (Some(code), Some(description)) => format!("{code}: {description}"),
            (Some(code), None) => code,
            _ => "no error code".to_owned(),
        };
        return Err(TokenError::Refused { status, error });
    }
    let access_token = json
        .get("access_token")
        .and_then(|v| v.as_str())
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| TokenError::Invalid("no usable access_token".into()))?;
    if let Some(kind) = json.get("token_type").and_then(|v| v.as_str())
        && !kind.eq_ignore_ascii_case("bearer")
    {
        return Err(TokenError::Invalid(format!(
            "token_type {:?}, not Bearer",
            printable(kind)
        )));
    }
    // Microsoft has sent expires_in as a string; both forms are read.
    let lifetime = match json.get("expires_in") {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .map(|secs| Duration::from_secs(secs.min(MAX_LIFETIME.as_secs())))
    .unwrap_or(DEFAULT_LIFETIME);
    let refresh_token = json
        .get("refresh_token")
        .and_then(|v| v.as_str())
        .filter(|t| !t.is_empty())
        .map(Secret::new);
    Ok(Issued {
        access_token: Secret::new(access_token),
        lifetime,
        refresh_token,
    })
}

/// Server text for a log line: control characters dropped, bounded.
fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(300).collect()
}

/// How long before expiry a token of `lifetime` is renewed.
pub fn refresh_ahead(lifetime: Duration) -> Duration {
    (lifetime / REFRESH_AHEAD_DIVISOR).min(REFRESH_AHEAD_MAX)
}

/// Settings of [`TokenSource`], from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    pub url: String,
    pub grant: Grant,
    /// With the refresh-token grant: where the refresh token lives (and is written
    /// back when the server rotates it).
    pub refresh_token_file: Option<PathBuf>,
    pub timeout: Duration,
    /// Roots for an `https://` token endpoint.
    pub tls: Arc<ClientConfig>,
}

struct Cached {
    token: Secret,
    /// When to stop using it (refresh-ahead included).
    renew_at: Instant,
}

/// The access token every session logs in with: fetched once, shared, renewed ahead
/// of expiry.
pub struct TokenSource {
    settings: Settings,
    uri: Uri,
    cached: Mutex<Option<Cached>>,
    /// The client secret in use (a reload replaces it).
    client_secret: Mutex<Option<Secret>>,
    /// The refresh token in use (rotated ones replace it), and whether it is newer
    /// than its file (a rotation whose write-back failed).
    refresh_token: Mutex<(Option<Secret>, bool)>,
    /// Whether the last fetch succeeded (for /readyz).
    healthy: watch::Sender<bool>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("url", &self.settings.url)
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    pub fn new(settings: Settings) -> Result<TokenSource, String> {
        let uri: Uri = settings
            .url
            .parse()
            .map_err(|e| format!("--oauth2-token-url {:?}: {e}", settings.url))?;
        if !matches!(uri.scheme_str(), Some("https" | "http")) || uri.host().is_none() {
            return Err(format!(
                "--oauth2-token-url {:?}: expected an https:// (or http://) URL with a host",
                settings.url
            ));
        }
        let refresh_token = match &settings.refresh_token_file {
            Some(path) => Some(super::secret::read_file(
                "--oauth2-refresh-token-file",
                path,
            )?),
            None => None,
        };
        Ok(TokenSource {
            client_secret: Mutex::new(settings.grant.client_secret.clone()),
            settings,
            uri,
            cached: Mutex::new(None),
            refresh_token: Mutex::new((refresh_token, false)),
            healthy: watch::channel(false).0,
        })
    }

    /// Follows whether the last fetch succeeded.
    pub fn healthy(&self) -> watch::Receiver<bool> {
        self.healthy.subscribe()
    }

    /// A token that is not about to expire: the cached one, or a new one. Sessions
    /// that ask while a fetch runs wait for it instead of starting their own.
    pub async fn token(&self) -> Result<Secret, TokenError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref()
            && Instant::now() < c.renew_at
        {
            return Ok(c.token.clone());
        }
        let fresh = self.fetch().await?;
        let token = fresh.token.clone();
        *cached = Some(fresh);
        Ok(token)
    }

    /// The upstream refused `token` (revoked before its time): the next session
    /// fetches a new one instead of failing the same way.
    pub async fn forget(&self, token: &Secret) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|c| &c.token == token) {
            *cached = None;
        }
    }

    /// New credentials from their files (SIGHUP): a rotated client secret, or a refresh
    /// token an administrator obtained again. The cached access token stays until it is
    /// due; the next request uses the new credentials.
    pub async fn replace_credentials(
        &self,
        client_secret: Option<Secret>,
        refresh_token: Option<Secret>,
    ) {
        *self.client_secret.lock().await = client_secret;
        let mut current = self.refresh_token.lock().await;
        match (refresh_token, current.1) {
            // The file holds the token the server rotated away from: keep ours.
            (Some(_), true) => {
                warn!(
                    "the refresh token file is older than the token in use (its rotation could not be saved); keeping the one in use"
                )
            }
            (Some(token), false) => current.0 = Some(token),
            (None, _) => {}
        }
    }

    /// Keeps a fresh token cached until the process ends: sessions then never wait for
    /// the token endpoint, and /readyz knows when it fails.
    pub async fn keep_fresh(self: Arc<Self>) {
        let mut retry = RETRY_MIN;
        loop {
            let wait = match self.token().await {
                Ok(_) => {
                    retry = RETRY_MIN;
                    let renew_at = self.cached.lock().await.as_ref().map(|c| c.renew_at);
                    renew_at
                        .map(|at| at.saturating_duration_since(Instant::now()))
                        .unwrap_or(RETRY_MIN)
                }
                Err(_) => {
                    let wait = retry;
                    retry = (retry * 2).min(RETRY_MAX);
                    wait
                }
            };
            // At least a moment: a server issuing already-expired tokens must not spin.
            tokio::time::sleep(wait.max(Duration::from_millis(500))).await;
        }
    }

    async fn fetch(&self) -> Result<Cached, TokenError> {
        let result = self.fetch_once().await;
        metrics::oauth2_token_refresh(result.is_ok());
        match &result {
            Ok(issued) => {
                let expires = SystemTime::now() + issued.lifetime;
                let unix = expires
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                metrics::oauth2_token_expiry(unix);
                info!(
                    expires_in = issued.lifetime.as_secs(),
                    "OAuth2 access token obtained"
                );
                self.healthy.send_replace(true);
            }
            Err(error) => {
                warn!(%error, url = %self.settings.url, "OAuth2 token request failed");
                self.healthy.send_replace(false);
            }
        }
        let issued = result?;
        if let Some(rotated) = issued.refresh_token.clone() {
            self.rotate(rotated).await;
        }
        Ok(Cached {
            renew_at: Instant::now() + issued.lifetime - refresh_ahead(issued.lifetime),
            token: issued.access_token,
        })
    }

    /// Keeps a rotated refresh token, in memory and in its file.
    async fn rotate(&self, rotated: Secret) {
        let mut current = self.refresh_token.lock().await;
        if current.0.is_none() || current.0.as_ref() == Some(&rotated) {
            return;
        }
        let mut unsaved = false;
        if let Some(path) = &self.settings.refresh_token_file {
            match write_atomically(path, rotated.expose()) {
                Ok(()) => info!(file = %path.display(), "rotated OAuth2 refresh token saved"),
                // The new token still works from memory; the old one in the file may
                // not after a restart, which the log says now rather than then.
                Err(error) => {
                    unsaved = true;
                    warn!(file = %path.display(), %error,
                        "rotated OAuth2 refresh token could not be saved; the file holds the previous one")
                }
            }
        }
        *current = (Some(rotated), unsaved);
    }

    async fn fetch_once(&self) -> Result<Issued, TokenError> {
        let refresh_token = self.refresh_token.lock().await.0.clone();
        let grant = Grant {
            client_secret: self.client_secret.lock().await.clone(),
            ..self.settings.grant.clone()
        };
        let body = grant.form(refresh_token.as_ref());
        tokio::time::timeout(self.settings.timeout, self.exchange(body))
            .await
            .unwrap_or_else(|_| Err(TokenError::Unreachable("no answer in time".into())))
    }

    async fn exchange(&self, body: String) -> Result<Issued, TokenError> {
        let unreachable = |e: &dyn std::fmt::Display| TokenError::Unreachable(e.to_string());
        let host = self.uri.host().unwrap_or_default();
        let https = self.uri.scheme_str() == Some("https");
        let port = self.uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let tcp = TcpStream::connect((bare_host, port))
            .await
            .map_err(|e| unreachable(&e))?;
        let _ = tcp.set_nodelay(true);
        if https {
            let name = ServerName::try_from(bare_host.to_owned()).map_err(|e| unreachable(&e))?;
            let tls = TlsConnector::from(self.settings.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| unreachable(&e))?;
            self.post(tls, body).await
        } else {
            self.post(tcp, body).await
        }
    }

    async fn post<S>(&self, stream: S, body: String) -> Result<Issued, TokenError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let unreachable = |e: &dyn std::fmt::Display| TokenError::Unreachable(e.to_string());
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(&e))?;
        let connection = tokio::spawn(connection);
        let path = self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let authority = self
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let request = Request::post(path)
            .header(hyper::header::HOST, authority)
            .header(
                hyper::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(hyper::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(&e))?;
        let status = response.status().as_u16();
        let body = http_body_util::Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| unreachable(&e))?
            .to_bytes();
        connection.abort();
        if status >= 500 {
            return Err(TokenError::Unreachable(format!("HTTP {status}")));
        }
        parse_response(status, &body)
    }
}

/// Replaces `path` with `contents` so that a reader (or a crash) sees the old file or
/// the new one, never a mix: write a temporary file beside it, sync, rename over.
pub fn write_atomically(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("no file name"))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".tmp{}", std::process::id()));
    let temp = match dir {
        Some(dir) => dir.join(&temp_name),
        None => PathBuf::from(&temp_name),
    };
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            // A refresh token is a long-lived credential: owner only.
            .mode(0o600)
            .open(&temp)?;
        file.write_all(contents.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written?;
    if let Some(dir) = dir
        && let Ok(handle) = std::fs::File::open(dir)
    {
        // The rename itself survives a crash only once the directory is synced.
        let _ = handle.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(secret: Option<&str>, scope: Option<&str>) -> Grant {
        Grant {
            client_id: "app id".into(),
            client_secret: secret.map(Secret::new),
            scope: scope.map(str::to_owned),
        }
    }

    #[test]
    fn forms_for_both_grants() {
        let g = grant(Some("s&=+"), Some("https://outlook.office365.com/.default"));
        assert_eq!(
            g.form(None),
            "grant_type=client_credentials&client_id=app%20id&client_secret=s%26%3D%2B&scope=https%3A%2F%2Foutlook.office365.com%2F.default"
        );
        let g = grant(None, None);
        assert_eq!(
            g.form(Some(&Secret::new("1//r-t"))),
            "grant_type=refresh_token&refresh_token=1%2F%2Fr-t&client_id=app%20id"
        );
    }

    #[test]
    fn responses() {
        let ok = parse_response(
            200,
            br#"{"access_token":"abc.def","token_type":"Bearer","expires_in":3599}"#,
        )
        .expect("ok");
        assert_eq!(ok.access_token.expose(), "abc.def");
        assert_eq!(ok.lifetime, Duration::from_secs(3599));
        assert_eq!(ok.refresh_token, None);

        // Microsoft's string form, a rotated refresh token, no token_type.
        let ok = parse_response(
            200,
            br#"{"access_token":"a","expires_in":"60","refresh_token":"r2"}"#,
        )
        .expect("ok");
        assert_eq!(ok.lifetime, Duration::from_secs(60));
        assert_eq!(ok.refresh_token.as_ref().map(Secret::expose), Some("r2"));

        // No expires_in: an hour. A huge one: a day, without overflowing.
        let ok = parse_response(200, br#"{"access_token":"a"}"#).expect("ok");
        assert_eq!(ok.lifetime, DEFAULT_LIFETIME);
        let ok = parse_response(
            200,
            br#"{"access_token":"a","expires_in":18446744073709551615}"#,
        )
        .expect("ok");
        assert_eq!(ok.lifetime, MAX_LIFETIME);

        assert_eq!(
            parse_response(
                400,
                br#"{"error":"invalid_grant","error_description":"AADSTS70000 expired"}"#
            ),
            Err(TokenError::Refused {
                status: 400,
                error: "invalid_grant: AADSTS70000 expired".into()
            })
        );
        for bad in [
            &br#"{"token_type":"Bearer"}"#[..],
            br#"{"access_token":""}"#,
            br#"{"access_token":"a b"}"#,
            br#"{"access_token":"a","token_type":"mac"}"#,
            b"<html>",
        ] {
            assert!(
                matches!(parse_response(200, bad), Err(TokenError::Invalid(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn errors_and_debug_never_carry_the_token() {
        let issued =
            parse_response(200, br#"{"access_token":"sekrit","refresh_token":"r"}"#).expect("ok");
        let debug = format!("{issued:?}");
        assert!(
            !debug.contains("sekrit") && !debug.contains("\"r\""),
            "{debug}"
        );
    }

    #[test]
    fn refresh_ahead_of_expiry() {
        assert_eq!(
            refresh_ahead(Duration::from_secs(3600)),
            Duration::from_secs(300)
        );
        assert_eq!(
            refresh_ahead(Duration::from_secs(8)),
            Duration::from_secs(2)
        );
        assert_eq!(refresh_ahead(Duration::ZERO), Duration::ZERO);
    }

    /// A token endpoint answering every request with `status` and `body`, counting
    /// the requests.
    async fn endpoint(
        status: u16,
        body: &'static str,
    ) -> (String, Arc<std::sync::atomic::AtomicU32>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/token", listener.local_addr().expect("addr"));
        let count = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = tcp.read(&mut buf).await;
                    // Slow enough for concurrent callers to pile up behind the first.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if status == 0 {
                        return;
                    }
                    let response = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tcp.write_all(response.as_bytes()).await;
                });
            }
        });
        (url, count)
    }

    fn source(url: String) -> TokenSource {
        // Only http:// here: the roots are never used.
        let tls = Arc::new(
            ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(tokio_rustls::rustls::RootCertStore::empty())
                .with_no_client_auth(),
        );
        TokenSource::new(Settings {
            url,
            grant: grant(Some("s"), None),
            refresh_token_file: None,
            timeout: Duration::from_secs(5),
            tls,
        })
        .expect("source")
    }

    #[tokio::test]
    async fn concurrent_sessions_share_one_request_and_the_cache() {
        let (url, count) = endpoint(
            200,
            r#"{"access_token":"t1","token_type":"Bearer","expires_in":3600}"#,
        )
        .await;
        let source = Arc::new(source(url));
        let mut calls = Vec::new();
        for _ in 0..5 {
            let source = source.clone();
            calls.push(tokio::spawn(async move { source.token().await }));
        }
        for call in calls {
            let token = call.await.expect("join").expect("token");
            assert_eq!(token.expose(), "t1");
        }
        assert_eq!(source.token().await.expect("cached").expose(), "t1");
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(*source.healthy().borrow());

        // A refused token is forgotten: the next caller asks again.
        source.forget(&Secret::new("t1")).await;
        source.token().await.expect("refetched");
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn failures_are_told_apart() {
        let (url, _) = endpoint(503, "busy").await;
        assert!(matches!(
            source(url).token().await,
            Err(TokenError::Unreachable(_))
        ));
        let (url, _) = endpoint(0, "").await;
        let broken = source(url);
        assert!(matches!(
            broken.token().await,
            Err(TokenError::Unreachable(_))
        ));
        assert!(!*broken.healthy().borrow());
        let (url, _) = endpoint(401, r#"{"error":"invalid_client"}"#).await;
        assert_eq!(
            source(url).token().await,
            Err(TokenError::Refused {
                status: 401,
                error: "invalid_client".into()
            })
        );
        let refused = TokenSource::new(Settings {
            url: "ftp://x/".into(),
            ..source("http://127.0.0.1:1/".into()).settings.clone()
        });
        assert!(refused.is_err());
    }

    #[tokio::test]
    async fn a_reload_never_brings_back_a_refresh_token_rotated_away() {
        let source = source("http://127.0.0.1:1/token".into());
        *source.refresh_token.lock().await = (Some(Secret::new("rotated")), true);
        source
            .replace_credentials(None, Some(Secret::new("stale-from-file")))
            .await;
        assert_eq!(
            source
                .refresh_token
                .lock()
                .await
                .0
                .as_ref()
                .map(Secret::expose),
            Some("rotated")
        );
        // Saved rotations (or none): the file is the truth.
        source.refresh_token.lock().await.1 = false;
        source
            .replace_credentials(Some(Secret::new("s2")), Some(Secret::new("from-file")))
            .await;
        assert_eq!(
            source
                .refresh_token
                .lock()
                .await
                .0
                .as_ref()
                .map(Secret::expose),
            Some("from-file")
        );
        assert_eq!(
            source
                .client_secret
                .lock()
                .await
                .as_ref()
                .map(Secret::expose),
            Some("s2")
        );
    }

    #[test]
    fn atomic_write_replaces_the_file_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("refresh");
        std::fs::write(&path, "old\n").expect("write");
        write_atomically(&path, "new").expect("replace");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new\n");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .flatten()
            .collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
    }
}
