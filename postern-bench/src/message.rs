//! The test message: built once per run, sent unchanged by every connection.
//!
//! The message is valid RFC 5322 text with CRLF line endings and lines well under the
//! RFC 5321 §4.5.3.1.6 limit of 1000 octets. Some body lines start with a dot, one of them
//! a lone ".", so every run exercises dot-stuffing (RFC 5321 §4.5.2) through the proxy
//! under test; a proxy that mangles it fails the byte-exact check in `benches/compare.sh`.

/// Body line length including CRLF. 78 characters of text is the RFC 5322 §2.1.1 "SHOULD".
const LINE: usize = 80;

/// Every `DOT_EVERY`-th body line starts with a dot.
const DOT_EVERY: usize = 7;

/// The end-of-data marker that follows the stuffed message (RFC 5321 §4.1.1.4).
const END_OF_DATA: &[u8] = b".\r\n";

/// Builds a message of exactly `size` octets when `size` is at least the header length,
/// otherwise the shortest message (headers and an empty body).
///
/// The content is deterministic so that two runs send the same bytes.
pub fn build(size: usize, from: &str, to: &str) -> Vec<u8> {
    let header = |pad: usize| {
        format!(
            "From: <{from}>\r\nTo: <{to}>\r\nSubject: postern bench{}\r\n\
             Message-ID: <bench@postern.invalid>\r\nMIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=us-ascii\r\n\r\n",
            "!".repeat(pad)
        )
    };
    let mut msg = header(0).into_bytes();
    // A body of one octet can't end in CRLF: lengthen the subject by one instead.
    if size == msg.len() + 1 {
        msg = header(1).into_bytes();
    }
    let mut remaining = size.saturating_sub(msg.len());
    msg.reserve(remaining);

    // A lone "." first: the line a careless relay would take for the end of the data.
    if remaining >= 3 && remaining != 4 {
        msg.extend_from_slice(b".\r\n");
        remaining -= 3;
    }
    let mut seed: u32 = 0x2545_f491;
    let mut line_no = 0;
    while remaining > 0 {
        // Two lines' worth or less left: finish with one line that uses it all up
        // (at most 2 * LINE - 2 characters, still far below the 998 limit).
        let len = if remaining <= 2 * LINE {
            remaining
        } else {
            LINE
        };
        let text = len - 2;
        let start = msg.len();
        for _ in 0..text {
            // xorshift: cheap, deterministic, and not compressible to nothing.
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            msg.push(b"abcdefghijklmnopqrstuvwxyz0123456789     "[(seed % 41) as usize]);
        }
        if line_no % DOT_EVERY == DOT_EVERY - 1 && text > 0 {
            msg[start] = b'.';
        }
        msg.extend_from_slice(b"\r\n");
        remaining -= len;
        line_no += 1;
    }
    msg
}

/// Dot-stuffs `msg` (which must end in CRLF, as [`build`] guarantees) and appends the
/// end-of-data line: the exact bytes to write after the 354 reply.
pub fn stuff(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + msg.len() / 64 + END_OF_DATA.len());
    let mut line_start = true;
    for &b in msg {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    out.extend_from_slice(END_OF_DATA);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_sizes_and_crlf() {
        for size in (0..600).chain([1024, 4096, 65_536, 1 << 20]) {
            let msg = build(size, "a@b", "c@d");
            let min = build(0, "a@b", "c@d").len();
            if size >= min {
                assert_eq!(msg.len(), size, "size {size}");
            }
            assert!(msg.ends_with(b"\r\n"), "size {size}");
            // Every LF is preceded by CR, and no bare CR.
            for (i, &b) in msg.iter().enumerate() {
                if b == b'\n' {
                    assert_eq!(msg[i - 1], b'\r', "size {size} at {i}");
                }
                if b == b'\r' {
                    assert_eq!(msg.get(i + 1), Some(&b'\n'), "size {size} at {i}");
                }
            }
            assert!(msg.split(|&b| b == b'\n').all(|l| l.len() <= 1000));
        }
    }

    #[test]
    fn has_lines_that_need_stuffing() {
        let msg = build(4096, "a@b", "c@d");
        // A lone dot line, and dotted lines with text after the dot.
        assert!(msg.windows(5).any(|w| w == b"\r\n.\r\n"));
        assert!(
            msg.windows(3)
                .filter(|w| w[..2] == *b"\n." && w[2] != b'\r')
                .count()
                >= 2
        );
    }

    #[test]
    fn stuffing() {
        for (input, expected) in [
            (&b"a\r\n"[..], &b"a\r\n.\r\n"[..]),
            (b".\r\n", b"..\r\n.\r\n"),
            (b"x\r\n.\r\n..y\r\n", b"x\r\n..\r\n...y\r\n.\r\n"),
            (b"a.b\r\n", b"a.b\r\n.\r\n"),
            (b"", b".\r\n"),
        ] {
            assert_eq!(
                stuff(input),
                expected,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn stuffed_message_has_a_single_end_marker() {
        let stuffed = stuff(&build(10_000, "a@b", "c@d"));
        let marker = b"\r\n.\r\n";
        let first = stuffed.windows(5).position(|w| w == marker);
        assert_eq!(first, Some(stuffed.len() - 5));
    }
}
