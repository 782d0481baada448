//! The crypto floor: what the TLS work alone costs a server core on this machine, so
//! that a proxy's figures can be read as a fraction of it.
//!
//! Everything runs in memory on one thread, with no socket: a rustls client and a
//! rustls server exchange records through byte vectors. The server is configured by
//! postern's own [`postern::tls::load_server_config`] (its cipher order, its session
//! tickets), with the certificate and key the proxies serve; the client offers only
//! the suite and key exchange asked for, which should be those the load generator
//! negotiates with the proxies (it reports them). Only the server side's calls are
//! timed, on the thread's CPU clock (`CLOCK_THREAD_CPUTIME_ID`), so the client's half
//! of each handshake is not in the figure, as it is not in a proxy's CPU either.
//!
//! Four figures:
//! - full handshakes per server CPU-second (certificate signature, key exchange, key
//!   schedule, the session tickets postern sends after each handshake);
//! - resumed handshakes per server CPU-second (the client presents a ticket from an
//!   earlier handshake; TLS 1.3 resumption in rustls still does the key exchange);
//! - 16 KiB records opened and sealed through the server connection, MB per server
//!   CPU-second (the record layer as a proxy pays for it, copies included);
//! - AES-256-GCM alone on 16 KiB records through rustls' record cipher (aws-lc-rs),
//!   MB per CPU-second: the ceiling of any TLS relay on this core.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustix::time::{ClockId, clock_gettime};
use tokio_rustls::rustls::crypto::aws_lc_rs::{self, cipher_suite, kx_group};
use tokio_rustls::rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, Iv, OutboundChunks, OutboundPlainMessage,
};
use tokio_rustls::rustls::crypto::{CryptoProvider, SupportedKxGroup};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{
    ClientConfig, ClientConnection, ConnectionCommon, ContentType, HandshakeKind, ProtocolVersion,
    ServerConfig, ServerConnection, SupportedCipherSuite,
};

use crate::Error;
use crate::tls::{self, Trust};

/// The size of a full TLS record's plaintext (RFC 8446 §5.1).
pub const RECORD: usize = 16 * 1024;

/// The key exchange the floor's client offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kx {
    X25519,
    /// NIST P-256 (secp256r1).
    P256,
    /// The post-quantum hybrid rustls prefers when both sides offer it.
    X25519mlkem768,
}

impl Kx {
    fn group(self) -> &'static dyn SupportedKxGroup {
        match self {
            Kx::X25519 => kx_group::X25519,
            Kx::P256 => kx_group::SECP256R1,
            Kx::X25519mlkem768 => kx_group::X25519MLKEM768,
        }
    }
}

/// The command line of `postern-bench-floor`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "postern-bench-floor",
    version,
    about = "Measure the TLS server work alone (handshakes, records) per CPU-second, in memory"
)]
pub struct FloorArgs {
    /// The certificate chain (PEM) the proxies serve.
    #[arg(long, value_name = "PATH")]
    pub cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, value_name = "PATH")]
    pub key: PathBuf,
    /// Key exchange offered by the client (match what postern-bench negotiates).
    #[arg(long, value_enum, default_value_t = Kx::X25519)]
    pub kx: Kx,
    /// Server CPU-seconds spent on each of the four measurements.
    #[arg(short = 'd', long, default_value_t = 2.0, value_name = "SECS")]
    pub duration: f64,
    /// Print the figures as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What the floor measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Floor {
    pub full_handshakes_per_cpu_s: f64,
    pub resumed_handshakes_per_cpu_s: f64,
    /// Client CPU per full handshake, microseconds (for reading the load generator's CPU).
    pub client_us_per_full_handshake: f64,
    pub open_mb_per_cpu_s: f64,
    pub seal_mb_per_cpu_s: f64,
    pub aead_open_mb_per_cpu_s: f64,
    pub aead_seal_mb_per_cpu_s: f64,
}

impl Floor {
    pub fn human(&self, kx: Kx) -> String {
        format!(
            "crypto floor (TLS 1.3 AES-256-GCM, {kx:?}, server side only, per CPU-second): \
             {:.0} full handshakes, {:.0} resumed handshakes; 16 KiB records through rustls: \
             open {:.0} MB, seal {:.0} MB; AES-256-GCM alone: open {:.0} MB, seal {:.0} MB \
             (client: {:.0} us per full handshake)",
            self.full_handshakes_per_cpu_s,
            self.resumed_handshakes_per_cpu_s,
            self.open_mb_per_cpu_s,
            self.seal_mb_per_cpu_s,
            self.aead_open_mb_per_cpu_s,
            self.aead_seal_mb_per_cpu_s,
            self.client_us_per_full_handshake,
        )
    }

    pub fn json(&self, kx: Kx) -> String {
        format!(
            "{{\"kx\":\"{kx:?}\",\"suite\":\"TLS13_AES_256_GCM_SHA384\",\
             \"full_handshakes_per_cpu_s\":{:.0},\"resumed_handshakes_per_cpu_s\":{:.0},\
             \"client_us_per_full_handshake\":{:.1},\
             \"open_mb_per_cpu_s\":{:.0},\"seal_mb_per_cpu_s\":{:.0},\
             \"aead_open_mb_per_cpu_s\":{:.0},\"aead_seal_mb_per_cpu_s\":{:.0}}}",
            self.full_handshakes_per_cpu_s,
            self.resumed_handshakes_per_cpu_s,
            self.client_us_per_full_handshake,
            self.open_mb_per_cpu_s,
            self.seal_mb_per_cpu_s,
            self.aead_open_mb_per_cpu_s,
            self.aead_seal_mb_per_cpu_s,
        )
    }
}

/// Runs the four measurements.
pub fn run(args: &FloorArgs) -> Result<Floor, Error> {
    if !(args.duration.is_finite() && args.duration > 0.0) {
        return Err("-d must be a positive number of seconds".into());
    }
    let budget = Duration::from_secs_f64(args.duration);
    let server = postern::tls::load_server_config(&args.cert, &args.key)?;
    let mut provider = aws_lc_rs::default_provider();
    provider.cipher_suites = vec![cipher_suite::TLS13_AES_256_GCM_SHA384];
    provider.kx_groups = vec![args.kx.group()];
    let provider: Arc<CryptoProvider> = Arc::new(provider);
    let full = tls::client_config_with(provider.clone(), Trust::Insecure, false)?;
    let resuming = tls::client_config_with(provider, Trust::Insecure, true)?;

    let mut floor = Floor::default();
    let (rate, client) =
        handshakes(&server, &full, budget, false).map_err(|e| format!("full handshakes: {e}"))?;
    floor.full_handshakes_per_cpu_s = rate;
    floor.client_us_per_full_handshake = client.as_secs_f64() * 1e6;
    floor.resumed_handshakes_per_cpu_s = handshakes(&server, &resuming, budget, true)
        .map_err(|e| format!("resumed handshakes: {e}"))?
        .0;
    let (open, seal) = records(&server, &full, budget).map_err(|e| format!("records: {e}"))?;
    floor.open_mb_per_cpu_s = open;
    floor.seal_mb_per_cpu_s = seal;
    let (open, seal) = aead(budget).map_err(|e| format!("AES-256-GCM alone: {e}"))?;
    floor.aead_open_mb_per_cpu_s = open;
    floor.aead_seal_mb_per_cpu_s = seal;
    Ok(floor)
}

/// CPU time this thread has used.
fn thread_cpu() -> Duration {
    let t = clock_gettime(ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// CPU time of the calls made through it, on the thread's clock.
#[derive(Default)]
struct Meter {
    spent: Duration,
}

impl Meter {
    fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let start = thread_cpu();
        let value = f();
        self.spent += thread_cpu().saturating_sub(start);
        value
    }
}

/// Handshakes per server CPU-second, and the client's CPU per handshake. With
/// `resume`, one untimed handshake first gives the client its tickets.
fn handshakes(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
    budget: Duration,
    resume: bool,
) -> Result<(f64, Duration), Error> {
    let (mut s, mut c) = (Meter::default(), Meter::default());
    if resume {
        connect(server, client, &mut Meter::default(), &mut Meter::default())?;
    }
    let mut n = 0u32;
    while s.spent < budget {
        let (server_conn, _) = connect(server, client, &mut s, &mut c)?;
        let want = if resume {
            HandshakeKind::Resumed
        } else {
            HandshakeKind::Full
        };
        if server_conn.handshake_kind() != Some(want) {
            // A resumption refused (or a retry forced) would measure another handshake.
            return Err(format!(
                "the floor's handshake was {:?}, not {want:?}",
                server_conn.handshake_kind()
            )
            .into());
        }
        n += 1;
    }
    let per_server = f64::from(n) / s.spent.as_secs_f64();
    Ok((per_server, c.spent / n.max(1)))
}

/// One handshake in memory, with the tickets the server sends after it read by the
/// client (so resumption has them). Only the server's calls go on `s`.
fn connect(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
    s: &mut Meter,
    c: &mut Meter,
) -> Result<(ServerConnection, ClientConnection), Error> {
    let name = ServerName::try_from("localhost")?;
    let mut client_conn = c.time(|| ClientConnection::new(client.clone(), name))?;
    let mut server_conn = s.time(|| ServerConnection::new(server.clone()))?;
    let mut wire = Vec::with_capacity(8192);
    loop {
        let mut moved = false;
        wire.clear();
        c.time(|| drain(&mut client_conn, &mut wire))?;
        if !wire.is_empty() {
            s.time(|| feed(&mut server_conn, &wire))?;
            moved = true;
        }
        wire.clear();
        s.time(|| drain(&mut server_conn, &mut wire))?;
        if !wire.is_empty() {
            c.time(|| feed(&mut client_conn, &wire))?;
            moved = true;
        }
        if !moved {
            break;
        }
    }
    if server_conn.is_handshaking() || client_conn.is_handshaking() {
        return Err("the in-memory handshake stalled".into());
    }
    Ok((server_conn, client_conn))
}

/// Everything `conn` wants to send, appended to `wire`.
fn drain<D>(conn: &mut ConnectionCommon<D>, wire: &mut Vec<u8>) -> Result<(), Error> {
    while conn.wants_write() {
        conn.write_tls(wire)?;
    }
    Ok(())
}

/// `wire` given to `conn` and processed, as many reads as it takes.
fn feed<D>(conn: &mut ConnectionCommon<D>, mut wire: &[u8]) -> Result<(), Error> {
    while !wire.is_empty() {
        conn.read_tls(&mut wire)?;
        conn.process_new_packets()?;
    }
    Ok(())
}

/// 16 KiB records through an established connection: opened by the server (client
/// seals), then sealed by the server (client opens). MB per server CPU-second each.
fn records(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
    budget: Duration,
) -> Result<(f64, f64), Error> {
    let (mut server_conn, mut client_conn) =
        connect(server, client, &mut Meter::default(), &mut Meter::default())?;
    let payload = vec![0x5a_u8; RECORD];
    let mut plain = vec![0u8; RECORD];
    let mut wire = Vec::with_capacity(RECORD + 64);

    let mut s = Meter::default();
    let mut n = 0u64;
    while s.spent < budget {
        wire.clear();
        client_conn.writer().write_all(&payload)?;
        drain(&mut client_conn, &mut wire)?;
        s.time(|| -> Result<(), Error> {
            feed(&mut server_conn, &wire)?;
            server_conn.reader().read_exact(&mut plain)?;
            Ok(())
        })?;
        n += 1;
    }
    let open = mb_per_s(n, s.spent);

    let mut s = Meter::default();
    let mut n = 0u64;
    while s.spent < budget {
        wire.clear();
        s.time(|| -> Result<(), Error> {
            server_conn.writer().write_all(&payload)?;
            drain(&mut server_conn, &mut wire)?;
            Ok(())
        })?;
        feed(&mut client_conn, &wire)?;
        client_conn.reader().read_exact(&mut plain)?;
        n += 1;
    }
    Ok((open, mb_per_s(n, s.spent)))
}

/// AES-256-GCM alone on 16 KiB records, through rustls' TLS 1.3 record cipher (the
/// aws-lc-rs one postern uses): seal, and open of a copy of one sealed record (the
/// copy, a memcpy of 16 KiB, is counted with the open).
fn aead(budget: Duration) -> Result<(f64, f64), Error> {
    let SupportedCipherSuite::Tls13(suite) = cipher_suite::TLS13_AES_256_GCM_SHA384 else {
        return Err("TLS13_AES_256_GCM_SHA384 is not a TLS 1.3 suite".into());
    };
    let key = || AeadKey::from([7u8; 32]);
    let iv = || Iv::new([9u8; 12]);
    let mut sealer = suite.aead_alg.encrypter(key(), iv());
    let mut opener = suite.aead_alg.decrypter(key(), iv());
    let payload = vec![0x5a_u8; RECORD];
    let plain = || OutboundPlainMessage {
        typ: ContentType::ApplicationData,
        version: ProtocolVersion::TLSv1_2,
        payload: OutboundChunks::Single(&payload),
    };

    let mut s = Meter::default();
    let mut n = 0u64;
    while s.spent < budget {
        s.time(|| sealer.encrypt(plain(), n))?;
        n += 1;
    }
    let seal = mb_per_s(n, s.spent);

    // A fresh sealer: aws-lc's TLS sealing key refuses a sequence number that does not
    // grow.
    let sealed = suite
        .aead_alg
        .encrypter(key(), iv())
        .encrypt(plain(), 0)?
        .encode();
    // The record header (5 octets) is not part of what the cipher opens.
    let body = sealed
        .get(5..)
        .ok_or("a sealed record without its header")?;
    let mut work = body.to_vec();
    let mut s = Meter::default();
    let mut n = 0u64;
    while s.spent < budget {
        s.time(|| -> Result<(), Error> {
            work.copy_from_slice(body);
            let message = InboundOpaqueMessage::new(
                ContentType::ApplicationData,
                ProtocolVersion::TLSv1_2,
                &mut work,
            );
            opener.decrypt(message, 0)?;
            Ok(())
        })?;
        n += 1;
    }
    Ok((mb_per_s(n, s.spent), seal))
}

fn mb_per_s(records: u64, spent: Duration) -> f64 {
    records as f64 * RECORD as f64 / 1e6 / spent.as_secs_f64().max(1e-9)
}
