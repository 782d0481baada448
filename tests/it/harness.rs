//! Self-tests of the harness pieces that do not involve postern: if one of these fails,
//! the machine (smtp-sink, swaks, openssl, python3) is the suspect, not postern.

use crate::common;

use std::process::Command;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[test]
fn smtp_sink_dumps_a_message_from_swaks() {
    let sink = SmtpSink::start();
    let out = run(
        Command::new("swaks").args([
            "--server",
            &sink.addr.to_string(),
            "--from",
            "a@client.test",
            "--to",
            "b@backend.test",
            "--body",
            "line one\n.leading dot\n",
        ]),
        b"",
        STEP,
    );
    out.assert_success("swaks to smtp-sink");
    let msgs = sink.wait_for_messages(1);
    assert_eq!(msgs.len(), 1);
    assert!(
        msgs[0].contains("X-Mail-Args: <a@client.test>"),
        "{}",
        msgs[0]
    );
    assert!(
        msgs[0].contains("X-Rcpt-Args: <b@backend.test>"),
        "{}",
        msgs[0]
    );
    // smtp-sink undoes dot-stuffing and writes LF line ends.
    assert!(msgs[0].contains("\n.leading dot\n"), "{}", msgs[0]);
}

#[tokio::test]
async fn raw_backend_records_bytes_verbatim() {
    let backend = RawBackend::start();
    let mut s = within("connect", TcpStream::connect(backend.addr))
        .await
        .unwrap();
    let sent: &[u8] = b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n\xe9t\xe9\r\n..dot\r\nbare\nlf\r\n.\r\nQUIT\r\n";
    within("write", s.write_all(sent)).await.unwrap();
    let mut got = Vec::new();
    within("read to EOF", s.read_to_end(&mut got))
        .await
        .unwrap();
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("220 "), "{got}");
    assert!(
        got.contains("250-rawbackend\r\n250-PIPELINING\r\n"),
        "{got}"
    );
    assert!(got.contains("354 "), "{got}");
    assert!(
        got.ends_with("250 2.0.0 Ok: queued\r\n221 2.0.0 Bye\r\n"),
        "{got}"
    );
    let session = backend.session_with_messages(1);
    assert_eq!(session.received, sent);
    assert_eq!(session.messages[0], b"\xe9t\xe9\r\n..dot\r\nbare\nlf\r\n");
}

#[tokio::test]
async fn raw_backend_faults() {
    let backend = RawBackend::start();

    backend.set_fault(Fault::Greet421);
    let mut s = TcpStream::connect(backend.addr).await.unwrap();
    let mut got = Vec::new();
    within("read 421", s.read_to_end(&mut got)).await.unwrap();
    assert!(got.starts_with(b"421 "), "{}", show(&got));

    backend.set_fault(Fault::Refuse);
    let err = TcpStream::connect(backend.addr).await.expect_err("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

    backend.set_fault(Fault::Stall);
    let mut s = TcpStream::connect(backend.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await;
    assert!(r.is_err(), "a stalled backend must not send anything");

    backend.set_fault(Fault::None);
    let mut s = TcpStream::connect(backend.addr).await.unwrap();
    let n = within("greeting", s.read(&mut buf)).await.unwrap();
    assert!(buf[..n].starts_with(b"220"));
}

#[test]
fn swaks_and_smtplib_talk_to_raw_backend() {
    let backend = RawBackend::start();
    let out = run(
        Command::new("swaks").args([
            "--server",
            &backend.addr.to_string(),
            "--helo",
            "client.test",
            "--from",
            "a@client.test",
            "--to",
            "b@backend.test",
        ]),
        b"",
        STEP,
    );
    out.assert_success("swaks to RawBackend");
    let s = backend.session_containing(b"MAIL FROM:<a@client.test>");
    assert!(
        s.received.starts_with(b"EHLO client.test\r\n"),
        "{}",
        show(&s.received)
    );
    assert_eq!(s.messages.len(), 1);

    let py = "import smtplib,sys\n\
              s=smtplib.SMTP('127.0.0.1',int(sys.argv[1]),local_hostname='py.test')\n\
              s.sendmail('p@client.test',['q@backend.test'],b'Subject: x\\r\\n\\r\\nhi\\r\\n')\n\
              s.quit()\n";
    let out = run(
        Command::new("python3").args(["-c", py, &backend.addr.port().to_string()]),
        b"",
        STEP,
    );
    out.assert_success("smtplib to RawBackend");
    let s = backend.session_containing(b"FROM:<p@client.test>");
    assert_eq!(s.messages, vec![b"Subject: x\r\n\r\nhi\r\n".to_vec()]);
}

#[test]
fn certs_from_rcgen_verify_with_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let paths = TestCerts::generate().write_to(dir.path());
    let out = run(
        Command::new("openssl")
            .args(["verify", "-verify_hostname", "localhost", "-CAfile"])
            .arg(&paths.ca)
            .arg(&paths.cert),
        b"",
        STEP,
    );
    out.assert_success("openssl verify");
}

#[test]
fn cram_md5_helper_matches_rfc2195_example() {
    // RFC 2195 §2: tim / tanstaaftanstaaf.
    let challenge = b64("<1896.697170952@postoffice.reston.mci.net>");
    assert_eq!(
        String::from_utf8(unb64(&cram_md5_response(
            "tim",
            "tanstaaftanstaaf",
            &challenge
        )))
        .unwrap(),
        "tim b913a602c7eda7a495b4e6e7334d3890"
    );
}
