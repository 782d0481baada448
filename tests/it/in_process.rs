//! The server run inside the test process, on listeners it was handed (issue 14:
//! `server::run(config, listeners, stop, ready)`): no binary, no port juggling, a ready
//! signal instead of polling, a stop request instead of a signal.

use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::HandshakeKind;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::common::postern::USER;
use crate::common::*;

#[tokio::test]
async fn serves_mail_in_process_and_stops_on_request() {
    let backend = RawBackend::start();
    let server = Postern::builder(backend.addr).start_in_process().await;
    assert!(server.backend_up, "the first probe ran before ready");
    let mut client =
        SmtpClient::authenticated(server.smtp, false, server.tls_config(), USER, PASSWORD).await;
    client.cmd("MAIL FROM:<a@client.test>", "250").await;
    client.cmd("RCPT TO:<b@backend.test>", "250").await;
    client.cmd("DATA", "354").await;
    client
        .send(b"Subject: in process\r\n\r\nhello\r\n.\r\n")
        .await;
    client.expect("250").await;
    client.cmd("QUIT", "221").await;
    let session = backend.session_with_messages(1);
    assert_eq!(session.messages[0], b"Subject: in process\r\n\r\nhello\r\n");

    let smtp = server.smtp;
    within("the drain", server.stop())
        .await
        .expect("run ends with Ok");
    assert!(
        TcpStream::connect(smtp).await.is_err(),
        "the listener outlived the server"
    );
}

/// Mail clients reconnect for every send: the second connection of a client that kept
/// its TLS session resumes it (a ticket) instead of a full handshake.
#[tokio::test]
async fn a_reconnecting_client_resumes_its_tls_session() {
    let backend = RawBackend::start();
    let server = Postern::builder(backend.addr).start_in_process().await;
    // One config, so one resumption store, for both connections.
    let connector = TlsConnector::from(server.tls_config());
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let tcp = TcpStream::connect(server.smtps).await.expect("connect");
        let name = ServerName::try_from("localhost").expect("name");
        let mut tls = within("TLS handshake", connector.connect(name, tcp))
            .await
            .expect("handshake");
        // Reading the greeting also reads the tickets sent after the handshake.
        let mut greeting = [0u8; 3];
        within("greeting", tls.read_exact(&mut greeting))
            .await
            .expect("greeting");
        assert_eq!(&greeting, b"220");
        kinds.push(tls.get_ref().1.handshake_kind());
    }
    assert_eq!(
        kinds,
        [Some(HandshakeKind::Full), Some(HandshakeKind::Resumed)]
    );
    server.stop().await.expect("stop");
}
