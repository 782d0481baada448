//! HAProxy PROXY protocol v1/v2 (<https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt>):
//! framing and decoding of the header a load balancer puts before the client's bytes,
//! and encoding of the header postern sends to the backend. Header parsing and building
//! are the `ppp` crate's; this module only decides how many bytes make the header.

use std::net::{IpAddr, SocketAddr};

use ppp::{HeaderResult, v1, v2};

/// v2 headers start with this 12-byte signature.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// v1 headers start with this.
pub const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 header, CRLF included (spec §2.1).
pub const MAX_V1: usize = 107;
/// The longest v2 header postern accepts: 16 fixed bytes, 216 for UNIX addresses and
/// room for TLVs (which postern ignores; HAProxy's TLS TLVs with a client certificate's
/// names can take a few hundred bytes).
pub const MAX_V2: usize = 16 + 2048;

/// What the first bytes of a connection say about its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Not enough bytes yet; read up to `upto` bytes in total, no more (so nothing of
    /// the client's own data is consumed).
    NeedMore { upto: usize },
    /// The header is the first `len` bytes.
    Complete { len: usize },
    /// Not a PROXY header, or one over the size limits.
    Invalid,
}

/// Frames a header from the bytes read so far.
pub fn frame(buf: &[u8]) -> Framing {
    // Until the first bytes tell v1 from v2, read no further than the v1 prefix: the
    // shortest v1 header ("PROXY UNKNOWN\r\n", 15 bytes) is shorter than a v2 header's
    // fixed part (16), and garbage is refused as soon as it differs from both.
    if buf.len() < V1_PREFIX.len() {
        let could_be = |signature: &[u8]| *buf == signature[..buf.len()];
        return if could_be(V1_PREFIX) || could_be(V2_SIGNATURE) {
            Framing::NeedMore {
                upto: V1_PREFIX.len(),
            }
        } else {
            Framing::Invalid
        };
    }
    let probe = buf.len().min(V2_SIGNATURE.len());
    if buf[..probe] == V2_SIGNATURE[..probe] {
        if buf.len() < 16 {
            return Framing::NeedMore { upto: 16 };
        }
        let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if len > MAX_V2 {
            return Framing::Invalid;
        }
        return if buf.len() >= len {
            Framing::Complete { len }
        } else {
            Framing::NeedMore { upto: len }
        };
    }
    let probe = buf.len().min(V1_PREFIX.len());
    if buf[..probe] != V1_PREFIX[..probe] {
        return Framing::Invalid;
    }
    // v1 has no length field: it ends at CRLF, so read one byte at a time.
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(end) => Framing::Complete { len: end + 2 },
        None if buf.len() >= MAX_V1 => Framing::Invalid,
        None => Framing::NeedMore {
            upto: buf.len() + 1,
        },
    }
}

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A proxied TCP connection: the real client and the address it connected to.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// v2 LOCAL (health checks) or v1 UNKNOWN: keep the connection's own addresses.
    Local,
}

/// Decodes a complete header (the bytes [`frame`] delimited).
pub fn decode(header: &[u8]) -> Option<Header> {
    match HeaderResult::parse(header) {
        HeaderResult::V1(Ok(h)) => match h.addresses {
            v1::Addresses::Tcp4(a) => Some(Header::Proxied {
                source: SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
                destination: SocketAddr::new(IpAddr::V4(a.destination_address), a.destination_port),
            }),
            v1::Addresses::Tcp6(a) => Some(Header::Proxied {
                source: SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
                destination: SocketAddr::new(IpAddr::V6(a.destination_address), a.destination_port),
            }),
            v1::Addresses::Unknown => Some(Header::Local),
        },
        HeaderResult::V2(Ok(h)) => match (h.command, h.addresses) {
            (v2::Command::Local, _) => Some(Header::Local),
            (v2::Command::Proxy, v2::Addresses::IPv4(a)) => Some(Header::Proxied {
                source: SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
                destination: SocketAddr::new(IpAddr::V4(a.destination_address), a.destination_port),
            }),
            (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Some(Header::Proxied {
                source: SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
                destination: SocketAddr::new(IpAddr::V6(a.destination_address), a.destination_port),
            }),
            // UNIX sockets or unspecified families say nothing usable about a client.
            (v2::Command::Proxy, _) => None,
        },
        HeaderResult::V1(Err(_)) | HeaderResult::V2(Err(_)) => None,
    }
}

/// The PROXY protocol version postern sends to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Version {
    V1,
    V2,
}

/// Encodes the header for a backend connection on behalf of `source`, which connected
/// to `destination`. Mixed families are expressed in IPv6 (IPv4-mapped), as the
/// protocol needs one family for both addresses.
pub fn encode(version: Version, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = same_family(source, destination);
    match version {
        Version::V1 => v1::Addresses::from((source, destination))
            .to_string()
            .into_bytes(),
        Version::V2 => v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (source, destination),
        )
        .build()
        // Building into a Vec with two socket addresses cannot fail; fall back to LOCAL
        // (the backend then sees postern's own address) rather than panic.
        .unwrap_or_else(|_| {
            let mut local = V2_SIGNATURE.to_vec();
            local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
            local
        }),
    }
}

fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let to_v6 = |s: SocketAddr| match s.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), s.port()),
        IpAddr::V6(_) => s,
    };
    if a.is_ipv4() == b.is_ipv4() {
        (a, b)
    } else {
        (to_v6(a), to_v6(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Feeds growing prefixes, as the reader does, and checks the framing stops exactly
    /// at the header's end whatever follows it.
    fn frame_incrementally(wire: &[u8]) -> Framing {
        let mut have = 0;
        loop {
            match frame(&wire[..have]) {
                Framing::NeedMore { upto } => {
                    assert!(
                        upto > have && upto <= wire.len(),
                        "asked for {upto} with {have} of {}",
                        wire.len()
                    );
                    have = upto;
                }
                done => return done,
            }
        }
    }

    #[test]
    fn v1_and_v2_round_trip_and_frame_without_reading_past_the_header() {
        for (version, source, destination) in [
            (
                Version::V1,
                addr("192.0.2.7:41000"),
                addr("198.51.100.1:587"),
            ),
            (
                Version::V2,
                addr("192.0.2.7:41000"),
                addr("198.51.100.1:587"),
            ),
            (
                Version::V1,
                addr("[2001:db8::7]:41000"),
                addr("[2001:db8::1]:465"),
            ),
            (
                Version::V2,
                addr("[2001:db8::7]:41000"),
                addr("[2001:db8::1]:465"),
            ),
        ] {
            let header = encode(version, source, destination);
            let mut wire = header.clone();
            wire.extend_from_slice(b"\x16\x03\x01 client hello follows");
            assert_eq!(
                frame_incrementally(&wire),
                Framing::Complete { len: header.len() },
                "{version:?}"
            );
            assert_eq!(
                decode(&header),
                Some(Header::Proxied {
                    source,
                    destination
                }),
                "{version:?}"
            );
        }
    }

    #[test]
    fn mixed_families_are_sent_as_ipv6() {
        let header = encode(Version::V1, addr("192.0.2.7:1"), addr("[2001:db8::1]:25"));
        assert_eq!(header, b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::1 1 25\r\n");
    }

    #[test]
    fn local_and_unknown_keep_the_peer_address() {
        assert_eq!(decode(b"PROXY UNKNOWN\r\n"), Some(Header::Local));
        // The 15-byte UNKNOWN header must frame without asking for a 16th byte the
        // sender (who waits for the greeting) will never send.
        assert_eq!(
            frame_incrementally(b"PROXY UNKNOWN\r\n"),
            Framing::Complete { len: 15 }
        );
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(frame(&local), Framing::Complete { len: 16 });
        assert_eq!(decode(&local), Some(Header::Local));
    }

    #[test]
    fn garbage_and_oversized_headers_are_invalid() {
        assert_eq!(frame(b"EHLO x\r\n"), Framing::Invalid);
        assert_eq!(frame(b"\x16\x03\x01"), Framing::Invalid);
        assert_eq!(frame(b"E"), Framing::Invalid);
        let mut long_v1 = b"PROXY TCP4 ".to_vec();
        long_v1.resize(MAX_V1, b'1');
        assert_eq!(frame(&long_v1), Framing::Invalid);
        let mut huge_v2 = V2_SIGNATURE.to_vec();
        huge_v2.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(frame(&huge_v2), Framing::Invalid);
        assert_eq!(decode(b"PROXY TCP4 300.1.1.1 1.1.1.1 1 2\r\n"), None);
        assert_eq!(decode(b"PROXY TCP4 1.1.1.1 1.1.1.1 1\r\n"), None);
    }
}
