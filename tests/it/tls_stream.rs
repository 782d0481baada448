//! postern's TLS server stream (`src/tls/stream.rs`) against a client that seals records
//! of its own with the session's keys, through the binary's listeners.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::crypto::aws_lc_rs::cipher_suite;
use tokio_rustls::rustls::crypto::cipher::{OutboundChunks, OutboundPlainMessage};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ConnectionTrafficSecrets, ContentType, ProtocolVersion};

/// A TLS 1.3 session on `tcp` whose client then sends "NOOP", the first two bytes of a
/// handshake message in a record of their own, and the end of its side; then reads
/// until postern closes.
async fn cut_a_handshake_message_short(postern: &Postern, tcp: TcpStream) {
    let mut config = (*postern.tls_config()).clone();
    config.enable_secret_extraction = true;
    let name = ServerName::try_from("localhost").expect("server name");
    let client = within(
        "TLS handshake",
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("TLS handshake");
    let (mut tcp, conn) = client.into_inner();
    let secrets = conn.dangerous_extract_secrets().expect("client keys");
    let (seq, ConnectionTrafficSecrets::Aes256Gcm { key, iv }) = secrets.tx else {
        panic!("postern's TLS 1.3 suite is AES-256-GCM");
    };
    let suite = cipher_suite::TLS13_AES_256_GCM_SHA384
        .tls13()
        .expect("a TLS 1.3 suite");
    let mut encrypter = suite.aead_alg.encrypter(key, iv);
    let mut forged = Vec::new();
    for (i, (typ, payload)) in [
        (ContentType::ApplicationData, &b"NOOP\r\n"[..]),
        (ContentType::Handshake, &[24, 0][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let message = OutboundPlainMessage {
            typ,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(payload),
        };
        let sealed = encrypter
            .encrypt(message, seq + u64::try_from(i).expect("small"))
            .expect("seal");
        forged.extend(sealed.encode());
    }
    within("forged records", tcp.write_all(&forged))
        .await
        .expect("write");
    within("half-close", tcp.shutdown())
        .await
        .expect("shutdown");
    let mut rest = Vec::new();
    let _ = within("postern closes", tcp.read_to_end(&mut rest)).await;
}

/// A client that begins a handshake message inside its session and closes its side,
/// on the implicit-TLS port and after STARTTLS: postern ends the session without a
/// panic (the stream once sliced an empty buffer at rustls' offsets) and serves the
/// next client.
#[tokio::test]
async fn a_handshake_message_cut_short_does_not_panic_postern() {
    let backend = RawBackend::start();
    let postern = Postern::start(backend.addr);

    let tcp = within("connect", TcpStream::connect(postern.smtps))
        .await
        .expect("connect");
    cut_a_handshake_message_short(&postern, tcp).await;

    let mut plain = postern.plain().await;
    plain.expect("220 ").await;
    plain.cmd("EHLO client.test", "250 ").await;
    plain.cmd("STARTTLS", "220 ").await;
    cut_a_handshake_message_short(&postern, plain.into_tcp()).await;

    // The panic message, if any, is written before the task lets go of the socket.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = postern.log();
    assert!(!log.contains("panicked"), "{log}");
    let (mut c, _) = postern.implicit().await;
    c.cmd("QUIT", "221").await;
}
