//! A client of nginx's mail `auth_http` protocol, so that the authentication server a
//! site's nginx mail proxy already calls works for postern unchanged.
//!
//! The protocol (nginx `ngx_mail_auth_http_module`): one `GET` per attempt, everything
//! in headers, the body ignored both ways. The request says who tries what
//! (`Auth-Method`, `Auth-User`, `Auth-Pass`, `Auth-Protocol: smtp`,
//! `Auth-Login-Attempt`, `Client-IP`, `Client-Host`, `Auth-SMTP-Helo`, and `Auth-Salt`
//! for CRAM-MD5); the answer is `Auth-Status: OK`, optionally naming the backend
//! (`Auth-Server`, `Auth-Port`) and the account (`Auth-User`, which nginx then gives the
//! backend as the login), or an error text with an optional `Auth-Wait` (seconds
//! before the client may try again) and `Auth-Error-Code` (the SMTP reply to give).
//!
//! [`Request::headers`] and [`Answer::parse`] are the protocol, sans-IO; [`Client`]
//! carries them over HTTP/1.1 with hyper, one connection per attempt and a deadline on
//! the whole exchange.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request as HttpRequest, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use tokio::net::TcpStream;

/// What nginx escapes in `Auth-User` and `Auth-Pass` (`NGX_ESCAPE_MAIL_AUTH`): control
/// characters, space and `%` (and every non-ASCII octet, which percent-encoding always
/// escapes). An auth server written for nginx url-decodes exactly these.
const MAIL_AUTH: &AsciiSet = &CONTROLS.add(b' ').add(b'%');

/// The most an answer's headers may hold, all together; nginx reads one buffer of 1 KiB
/// by default, so a well-behaved auth server is far below this.
const MAX_ANSWER_HEADERS: usize = 16 * 1024;

/// How the client authenticated, as `Auth-Method` names it. nginx sends `plain` for both
/// PLAIN and LOGIN: the auth server sees a user name and a password either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Plain,
    /// `Auth-Pass` is the client's hex digest and `Auth-Salt` the challenge.
    CramMd5,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Plain => "plain",
            Method::CramMd5 => "cram-md5",
        }
    }
}

/// One authentication attempt, as the auth server is told about it.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub method: Method,
    pub user: &'a str,
    /// The password, or the CRAM-MD5 digest.
    pub pass: &'a [u8],
    /// The CRAM-MD5 challenge.
    pub salt: Option<&'a str>,
    /// 1 for the first attempt on this connection, then 2, 3, ...
    pub attempt: u32,
    pub client_ip: IpAddr,
    /// The client's EHLO/HELO name.
    pub helo: Option<&'a str>,
}

impl Request<'_> {
    /// The request headers, in the order nginx sends them (besides `Host`).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let escape = |bytes: &[u8]| -> String {
            // Bytes, not text: a password need not be UTF-8.
            percent_encoding::percent_encode(bytes, MAIL_AUTH).to_string()
        };
        let mut headers = vec![
            ("Auth-Method", self.method.name().to_owned()),
            (
                "Auth-User",
                utf8_percent_encode(self.user, MAIL_AUTH).to_string(),
            ),
            ("Auth-Pass", escape(self.pass)),
        ];
        if let Some(salt) = self.salt {
            // The challenge is postern's own `<random.time@host>`: nothing to escape,
            // but it is passed through the same escaping to stay one header line.
            headers.push(("Auth-Salt", escape(salt.as_bytes())));
        }
        headers.push(("Auth-Protocol", "smtp".to_owned()));
        headers.push(("Auth-Login-Attempt", self.attempt.to_string()));
        headers.push(("Client-IP", self.client_ip.to_string()));
        // nginx without a resolver says the name is unknown the same way.
        headers.push(("Client-Host", "[UNAVAILABLE]".to_owned()));
        if let Some(helo) = self.helo {
            headers.push(("Auth-SMTP-Helo", escape(helo.as_bytes())));
        }
        headers
    }
}

/// The auth server's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The credentials are good. `backend`, when the server names one, is where this
    /// session must go (per-user routing); `user`, when it names one, the account the
    /// session goes on as (nginx's `Auth-User` in an answer).
    Ok {
        backend: Option<SocketAddr>,
        user: Option<String>,
    },
    /// The credentials are refused. `wait` is how long nginx would make the client
    /// wait before it may try again (without it nginx closes the connection);
    /// `error_code` the SMTP reply the server wants given, e.g. `535 5.7.8`.
    Refused {
        message: String,
        wait: Option<Duration>,
        error_code: Option<String>,
    },
}

/// Why an answer could not be used: the source is then treated as down for this
/// attempt (`454 4.7.0`), never as a refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// No answer within the timeout.
    Timeout,
    /// The server could not be reached or broke the exchange.
    Unreachable(String),
    /// An HTTP status other than 200, or an answer the protocol does not allow.
    Invalid(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Timeout => write!(f, "no answer in time"),
            Error::Unreachable(why) => write!(f, "unreachable: {why}"),
            Error::Invalid(why) => write!(f, "invalid answer: {why}"),
        }
    }
}

impl std::error::Error for Error {}

impl Answer {
    /// Reads an answer from its status and headers (names compared without case).
    pub fn parse<'h>(
        status: u16,
        headers: impl IntoIterator<Item = (&'h str, &'h [u8])>,
    ) -> Result<Answer, Error> {
        if status != 200 {
            return Err(Error::Invalid(format!("HTTP status {status}")));
        }
        let mut auth_status = None;
        let (mut server, mut port, mut wait, mut error_code) = (None, None, None, None);
        let mut user = None;
        for (name, value) in headers {
            let text = || {
                std::str::from_utf8(value)
                    .map(str::trim)
                    .map_err(|_| Error::Invalid(format!("{name} is not text")))
            };
            match name.to_ascii_lowercase().as_str() {
                "auth-status" => auth_status = Some(text()?.to_owned()),
                "auth-server" => server = Some(text()?.to_owned()),
                "auth-port" => port = Some(text()?.to_owned()),
                "auth-wait" => wait = Some(text()?.to_owned()),
                "auth-error-code" => error_code = Some(text()?.to_owned()),
                "auth-user" => user = Some(text()?.to_owned()),
                _ => {}
            }
        }
        let Some(auth_status) = auth_status else {
            return Err(Error::Invalid("no Auth-Status".into()));
        };
        if auth_status == "OK" {
            let backend = match (server, port) {
                (None, None) => None,
                (Some(server), Some(port)) => Some(backend_address(&server, &port)?),
                _ => {
                    return Err(Error::Invalid(
                        "Auth-Server without Auth-Port, or the reverse".into(),
                    ));
                }
            };
            let user = user.as_deref().map(account).transpose()?;
            return Ok(Answer::Ok { backend, user });
        }
        let wait = match wait {
            None => None,
            Some(text) => Some(Duration::from_secs(
                text.parse::<u64>()
                    .map_err(|_| Error::Invalid(format!("Auth-Wait {text:?}")))?
                    .min(MAX_WAIT_SECONDS),
            )),
        };
        let error_code = match error_code {
            Some(code) if !smtp_error_code(&code) => {
                return Err(Error::Invalid(format!("Auth-Error-Code {code:?}")));
            }
            other => other,
        };
        Ok(Answer::Refused {
            message: auth_status,
            wait,
            error_code,
        })
    }
}

/// The longest `Auth-Wait` honoured: a server asking for more is capped, not obeyed.
const MAX_WAIT_SECONDS: u64 = 60;

/// An `Auth-User` the session can go on as: a name a client could have sent (postern's
/// own bound on AUTH names), printable, at most 255 octets, as Postfix takes an
/// XCLIENT LOGIN.
fn account(name: &str) -> Result<String, Error> {
    if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
        return Err(Error::Invalid(format!("Auth-User {name:?}")));
    }
    Ok(name.to_owned())
}

/// nginx takes only an IP address in `Auth-Server` (it does not resolve names there).
fn backend_address(server: &str, port: &str) -> Result<SocketAddr, Error> {
    let ip: IpAddr = server
        .parse()
        .map_err(|_| Error::Invalid(format!("Auth-Server {server:?} is not an IP address")))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| Error::Invalid(format!("Auth-Port {port:?}")))?;
    // `::ffff:a.b.c.d` is dialled as a.b.c.d: --backend-allow must see that address.
    Ok(SocketAddr::new(ip.to_canonical(), port))
}

/// A reply postern can send as it is: a 4xx or 5xx code, optionally an enhanced code
/// and text, nothing that could end the line early.
fn smtp_error_code(code: &str) -> bool {
    let bytes = code.as_bytes();
    bytes.len() >= 3
        && matches!(bytes[0], b'4' | b'5')
        && bytes[1..3].iter().all(u8::is_ascii_digit)
        && (bytes.len() == 3 || bytes[3] == b' ')
        && !bytes.iter().any(|b| b.is_ascii_control())
}

/// Asks one auth server.
#[derive(Debug, Clone)]
pub struct Client {
    uri: Uri,
    authority: String,
    timeout: Duration,
}

impl Client {
    /// A client for `url` (`http://host:port/path`); every exchange must end within
    /// `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<Client, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("--auth-http {url:?}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "--auth-http {url:?}: only http:// is supported (as in nginx); keep the auth server on loopback or a private network"
            ));
        }
        let Some(authority) = uri.authority().map(|a| a.to_string()) else {
            return Err(format!("--auth-http {url:?}: no host"));
        };
        Ok(Client {
            uri,
            authority,
            timeout,
        })
    }

    /// One attempt: the auth server's answer, or why there was none.
    /// Whether the server accepts a connection within the timeout (`postern check`,
    /// readiness): an attempt with made-up credentials would count against someone.
    pub async fn reachable(&self) -> Result<String, Error> {
        let (host, port) = self.host_port();
        match tokio::time::timeout(self.timeout, TcpStream::connect((host, port))).await {
            Ok(Ok(_)) => Ok(format!("{} accepts connections", self.authority)),
            Ok(Err(e)) => Err(Error::Unreachable(e.to_string())),
            Err(_) => Err(Error::Timeout),
        }
    }

    fn host_port(&self) -> (&str, u16) {
        let host = self.uri.host().unwrap_or_default();
        // A bracketed IPv6 literal comes without its brackets from Uri::host.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (host, self.uri.port_u16().unwrap_or(80))
    }

    pub async fn ask(&self, request: &Request<'_>) -> Result<Answer, Error> {
        tokio::time::timeout(self.timeout, self.exchange(request))
            .await
            .unwrap_or(Err(Error::Timeout))
    }

    async fn exchange(&self, request: &Request<'_>) -> Result<Answer, Error> {
        let unreachable = |e: &dyn std::fmt::Display| Error::Unreachable(e.to_string());
        let (host, port) = self.host_port();
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| unreachable(&e))?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| unreachable(&e))?;
        let connection = tokio::spawn(connection);
        let path = self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut http = HttpRequest::get(path)
            .header(hyper::header::HOST, self.authority.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| Error::Invalid(e.to_string()))?;
        for (name, value) in request.headers() {
            let invalid = |e: &dyn std::fmt::Display| Error::Invalid(e.to_string());
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| invalid(&e))?;
            let value = HeaderValue::from_str(&value).map_err(|e| invalid(&e))?;
            http.headers_mut().insert(name, value);
        }
        let response = sender
            .send_request(http)
            .await
            .map_err(|e| unreachable(&e))?;
        let status = response.status();
        let size: usize = response
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        if size > MAX_ANSWER_HEADERS {
            return Err(Error::Invalid(format!("{size} octets of headers")));
        }
        let answer = Answer::parse(
            status.as_u16(),
            response
                .headers()
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_bytes())),
        );
        // The body is ignored (the protocol says so), but read so the server is not
        // reset mid-write; bounded like everything else by the timeout.
        if status == StatusCode::OK {
            let _ = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_HEADERS)
                .collect()
                .await;
        }
        connection.abort();
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(user: &'a str, pass: &'a [u8]) -> Request<'a> {
        Request {
            method: Method::Plain,
            user,
            pass,
            salt: None,
            attempt: 1,
            client_ip: "192.0.2.42".parse().unwrap(),
            helo: Some("client.example.org"),
        }
    }

    fn header<'a>(headers: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn requests_carry_what_nginx_sends_for_smtp() {
        let headers = request("alice", b"s3cret").headers();
        for (name, value) in [
            ("Auth-Method", "plain"),
            ("Auth-User", "alice"),
            ("Auth-Pass", "s3cret"),
            ("Auth-Protocol", "smtp"),
            ("Auth-Login-Attempt", "1"),
            ("Client-IP", "192.0.2.42"),
            ("Client-Host", "[UNAVAILABLE]"),
            ("Auth-SMTP-Helo", "client.example.org"),
        ] {
            assert_eq!(header(&headers, name), Some(value), "{name}");
        }
        assert_eq!(header(&headers, "Auth-Salt"), None);
    }

    #[test]
    fn user_and_password_are_escaped_as_nginx_escapes_them() {
        // Space, %, CR/LF, NUL and non-ASCII escaped; everything else as typed, so an
        // auth server's url-decoding gives back exactly the client's bytes.
        let headers = request("al ice%", b"p\r\nw\0d\xff:/?#&+").headers();
        assert_eq!(header(&headers, "Auth-User"), Some("al%20ice%25"));
        assert_eq!(header(&headers, "Auth-Pass"), Some("p%0D%0Aw%00d%FF:/?#&+"));
        assert_eq!(
            header(&request("jürgen", b"x").headers(), "Auth-User"),
            Some("j%C3%BCrgen")
        );
        for (_, value) in &headers {
            assert!(HeaderValue::from_str(value).is_ok(), "{value:?}");
        }
    }

    #[test]
    fn cram_md5_sends_the_digest_and_the_challenge() {
        let mut r = request("alice", b"b913a602c7eda7a495b4e6e7334d3890");
        r.method = Method::CramMd5;
        r.salt = Some("<1896.697170952@postoffice.example.net>");
        let headers = r.headers();
        assert_eq!(header(&headers, "Auth-Method"), Some("cram-md5"));
        assert_eq!(
            header(&headers, "Auth-Salt"),
            Some("<1896.697170952@postoffice.example.net>")
        );
    }

    fn parse(status: u16, headers: &[(&str, &str)]) -> Result<Answer, Error> {
        Answer::parse(status, headers.iter().map(|(n, v)| (*n, v.as_bytes())))
    }

    #[test]
    fn answers() {
        let ok = |backend| {
            Ok(Answer::Ok {
                backend,
                user: None,
            })
        };
        let refused = |message: &str, wait: Option<u64>, code: Option<&str>| {
            Ok(Answer::Refused {
                message: message.into(),
                wait: wait.map(Duration::from_secs),
                error_code: code.map(Into::into),
            })
        };
        let invalid = |r: &Result<Answer, Error>| matches!(r, Err(Error::Invalid(_)));
        assert_eq!(parse(200, &[("Auth-Status", "OK")]), ok(None));
        assert_eq!(
            parse(
                200,
                &[
                    ("auth-status", "OK"),
                    ("Auth-Server", "198.51.100.1"),
                    ("Auth-Port", "2525")
                ]
            ),
            ok(Some("198.51.100.1:2525".parse().unwrap()))
        );
        assert_eq!(
            parse(
                200,
                &[
                    ("Auth-Status", "Invalid login or password"),
                    ("Auth-Wait", "3"),
                    ("Auth-Error-Code", "535 5.7.8")
                ]
            ),
            refused("Invalid login or password", Some(3), Some("535 5.7.8"))
        );
        assert_eq!(
            parse(200, &[("Auth-Status", "no"), ("Auth-Wait", "86400")]),
            refused("no", Some(MAX_WAIT_SECONDS), None)
        );
        for bad in [
            parse(500, &[("Auth-Status", "OK")]),
            parse(200, &[]),
            parse(
                200,
                &[("Auth-Status", "OK"), ("Auth-Server", "mail.example")],
            ),
            parse(
                200,
                &[
                    ("Auth-Status", "OK"),
                    ("Auth-Server", "mail.example"),
                    ("Auth-Port", "25"),
                ],
            ),
            parse(
                200,
                &[
                    ("Auth-Status", "OK"),
                    ("Auth-Server", "192.0.2.1"),
                    ("Auth-Port", "0"),
                ],
            ),
            parse(200, &[("Auth-Status", "no"), ("Auth-Wait", "soon")]),
            parse(200, &[("Auth-Status", "no"), ("Auth-Error-Code", "235 ok")]),
            parse(
                200,
                &[("Auth-Status", "no"), ("Auth-Error-Code", "535 5.7.8\x07x")],
            ),
        ] {
            assert!(invalid(&bad), "{bad:?}");
        }
    }

    #[test]
    fn only_http_urls_with_a_host() {
        assert!(Client::new("http://127.0.0.1:9000/auth", Duration::from_secs(1)).is_ok());
        assert!(Client::new("https://auth.example/auth", Duration::from_secs(1)).is_err());
        assert!(Client::new("/auth", Duration::from_secs(1)).is_err());
    }

    #[tokio::test]
    async fn a_server_that_is_down_or_silent_is_an_error_not_a_refusal() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepted by the kernel, never answered.
        let silent =
            Client::new(&format!("http://{addr}/auth"), Duration::from_millis(200)).unwrap();
        assert_eq!(
            silent.ask(&request("alice", b"x")).await,
            Err(Error::Timeout)
        );
        drop(listener);
        let down = Client::new(&format!("http://{addr}/auth"), Duration::from_secs(2)).unwrap();
        assert!(matches!(
            down.ask(&request("alice", b"x")).await,
            Err(Error::Unreachable(_))
        ));
    }

    /// Attack: `--backend-allow` is checked against the address as the auth server
    /// wrote it. An IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) is inside any IPv6
    /// allowance that covers `::ffff:0:0/96` (`::/0`, "any IPv6 backend"), yet the dial
    /// reaches the IPv4 host: an auth server (or whoever controls its answers) sends
    /// sessions to loopback or any internal IPv4 service the allowance never named.
    /// The route must be the IPv4 address, which the allowance is then checked against.
    #[test]
    fn an_ipv4_mapped_route_is_the_ipv4_address() {
        assert_eq!(
            parse(
                200,
                &[
                    ("Auth-Status", "OK"),
                    ("Auth-Server", "::ffff:127.0.0.1"),
                    ("Auth-Port", "25")
                ]
            ),
            Ok(Answer::Ok {
                backend: Some("127.0.0.1:25".parse().unwrap()),
                user: None,
            })
        );
    }

    #[test]
    fn auth_user_in_an_answer_names_the_account() {
        assert_eq!(
            parse(200, &[("Auth-Status", "OK"), ("Auth-User", " alice ")]),
            Ok(Answer::Ok {
                backend: None,
                user: Some("alice".into()),
            })
        );
        for bad in ["", "al\u{7f}ice", &"a".repeat(256)] {
            assert!(
                matches!(
                    parse(200, &[("Auth-Status", "OK"), ("Auth-User", bad)]),
                    Err(Error::Invalid(_))
                ),
                "{bad:?}"
            );
        }
    }
}
