//! A small OAuth2 authorization server for the relay-out tests, on loopback HTTP: the
//! token endpoint postern asks (`POST /token`, RFC 6749 client-credentials and
//! refresh-token grants) and the introspection endpoint Dovecot's `oauth2` passdb asks
//! (`POST /introspect`, RFC 7662, `introspection_mode = post`). So the token postern
//! sends upstream is checked by a real SASL server against the one that issued it.
//!
//! Tokens are `tok-1`, `tok-2`, ... with a configurable lifetime; an expired one
//! introspects as `{"active": false}`. "Down" closes token connections without an
//! answer (introspection stays up: Dovecot must still refuse stale tokens).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The account every issued token belongs to (introspection's `username`).
pub const MAILBOX: &str = "mailer@example.test";

#[derive(Debug, Default)]
pub struct State {
    pub lifetime: Duration,
    pub down: bool,
    /// With the refresh-token grant: the one refresh token accepted now.
    pub refresh_token: Option<String>,
    /// Issue a new refresh token with every answer (rotation).
    pub rotate: bool,
    issued: u32,
    expiries: HashMap<String, Instant>,
    /// `grant_type` of every token request answered.
    pub grants: Vec<String>,
    /// Every token introspected, in order.
    pub introspected: Vec<String>,
}

pub struct TokenServer {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
}

impl TokenServer {
    pub fn start(lifetime: Duration) -> TokenServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind token server");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State {
            lifetime,
            ..State::default()
        }));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || serve(stream, &state));
            }
        });
        TokenServer { addr, state }
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn introspection_url(&self) -> String {
        format!("http://{}/introspect", self.addr)
    }

    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    /// Revokes every token issued so far: introspection answers `active: false`.
    pub fn revoke_all(&self) {
        self.state.lock().unwrap().expiries.clear();
    }

    /// Tokens issued so far.
    pub fn issued(&self) -> u32 {
        self.state.lock().unwrap().issued
    }

    pub fn introspected(&self) -> Vec<String> {
        self.state.lock().unwrap().introspected.clone()
    }

    pub fn grants(&self) -> Vec<String> {
        self.state.lock().unwrap().grants.clone()
    }
}

fn serve(mut stream: TcpStream, state: &Mutex<State>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Some((head, body)) = read_request(&mut stream) else {
        return;
    };
    let form = parse_form(&body);
    let (status, json) = if head.starts_with("POST /token ") {
        let mut s = state.lock().unwrap();
        if s.down {
            // Down: the connection closes with no answer at all.
            return;
        }
        token(&mut s, &form)
    } else if head.starts_with("POST /introspect ") {
        let mut s = state.lock().unwrap();
        let token = form.get("token").cloned().unwrap_or_default();
        s.introspected.push(token.clone());
        let active = s
            .expiries
            .get(&token)
            .is_some_and(|expiry| Instant::now() < *expiry);
        if active {
            (
                200,
                format!(r#"{{"active": true, "username": "{MAILBOX}", "scope": "smtp"}}"#),
            )
        } else {
            (200, r#"{"active": false}"#.to_owned())
        }
    } else {
        (404, r#"{"error": "not_found"}"#.to_owned())
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        _ => "Not Found",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        json.len()
    );
    let _ = stream.write_all(response.as_bytes());
}

fn token(s: &mut State, form: &HashMap<String, String>) -> (u16, String) {
    let grant = form.get("grant_type").cloned().unwrap_or_default();
    match grant.as_str() {
        "client_credentials" => {}
        "refresh_token" => {
            if form.get("refresh_token") != s.refresh_token.as_ref() {
                return (400, r#"{"error": "invalid_grant"}"#.to_owned());
            }
        }
        _ => return (400, r#"{"error": "unsupported_grant_type"}"#.to_owned()),
    }
    s.grants.push(grant.clone());
    s.issued += 1;
    let token = format!("tok-{}", s.issued);
    s.expiries
        .insert(token.clone(), Instant::now() + s.lifetime);
    let mut json = format!(
        r#"{{"access_token": "{token}", "token_type": "Bearer", "expires_in": {}"#,
        s.lifetime.as_secs()
    );
    if grant == "refresh_token" && s.rotate {
        let rotated = format!("rt-{}", s.issued);
        json.push_str(&format!(r#", "refresh_token": "{rotated}""#));
        s.refresh_token = Some(rotated);
    }
    json.push('}');
    (200, json)
}

fn read_request(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())
                .flatten()
        })
        .unwrap_or(0);
    let mut body = buf[header_end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((head, body))
}

fn parse_form(body: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(text: &str) -> String {
    let text = text.replace('+', " ");
    percent_encoding::percent_decode_str(&text)
        .decode_utf8_lossy()
        .into_owned()
}
