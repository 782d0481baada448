//! Incremental CRLF framing for the command phase (RFC 5321 §2.3.8, §4.5.3.1.4).
//!
//! A line ends only at CRLF: a bare CR or LF stays inside the line, where the command
//! parser rejects it, so `\n.\n`-style smuggling can never split a line here.

/// The longest line accepted in any pre-AUTH state, CRLF excluded: an AUTH command or
/// SASL response may be 12288 octets (RFC 4954 §4). A peer that sends more without a
/// CRLF is answered and disconnected rather than buffered.
pub const MAX_LINE: usize = 12288;

/// The longest command line relayed after AUTH, CRLF excluded: Postfix's
/// `line_length_limit` (2048). RFC 5321 §4.5.3.1.4 lets extensions lengthen MAIL and
/// RCPT past 512 (SIZE, BODY, AUTH=, ENVID, ORCPT stay well under 2048), and a longer
/// line could be split in two by a backend with a fixed buffer.
pub const MAX_RELAYED_LINE: usize = 2046;

/// The longest ordinary command line, CRLF excluded (RFC 5321 §4.5.3.1.4: 512 with CRLF).
pub const MAX_COMMAND_LINE: usize = 510;

/// Bytes received from a peer, split into lines as they complete.
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
    /// Start of the first unconsumed byte in `buf`.
    start: usize,
}

/// The peer sent more than [`MAX_LINE`] octets without a CRLF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTooLong;

impl LineBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the peer.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line without its CRLF, `Ok(None)` if none is complete yet.
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, LineTooLong> {
        let pending = &self.buf[self.start..];
        match find_crlf(pending) {
            Some(end) if end <= MAX_LINE => {
                let line = pending[..end].to_vec();
                self.start += end + 2;
                Ok(Some(line))
            }
            Some(_) => Err(LineTooLong),
            None if pending.len() > MAX_LINE + 1 => Err(LineTooLong),
            None => Ok(None),
        }
    }

    /// Whether a complete line is waiting, i.e. the client pipelined it (RFC 2920).
    pub fn has_line(&self) -> bool {
        find_crlf(&self.buf[self.start..]).is_some()
    }

    /// Takes every byte not yet consumed, leaving the buffer empty: what the client
    /// pipelined after its AUTH line goes to the backend first.
    pub fn take_pending(&mut self) -> Vec<u8> {
        let rest = self.buf.split_off(self.start);
        self.buf.clear();
        self.start = 0;
        rest
    }

    /// Drops every byte not yet consumed (RFC 3207 §4.2: nothing sent before the TLS
    /// handshake may be acted on after it).
    pub fn discard(&mut self) {
        self.buf.clear();
        self.start = 0;
    }
}

/// Offset of the first CRLF: the one line splitter of the crate (a bare CR or LF never
/// ends a line).
pub fn find_crlf(bytes: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(lf) = memchr::memchr(b'\n', &bytes[from..]) {
        let at = from + lf;
        if at > 0 && bytes[at - 1] == b'\r' {
            return Some(at - 1);
        }
        from = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut buf = LineBuffer::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buf.extend(chunk);
            while let Some(line) = buf.next_line().unwrap() {
                out.push(line);
            }
        }
        out
    }

    #[test]
    fn every_split_of_a_pipeline_gives_the_same_lines() {
        let input: &[u8] = b"EHLO a\r\nMAIL FROM:<x>\r\n\r\nQUIT\r\n";
        let expected: Vec<Vec<u8>> = vec![
            b"EHLO a".to_vec(),
            b"MAIL FROM:<x>".to_vec(),
            b"".to_vec(),
            b"QUIT".to_vec(),
        ];
        for split in 0..=input.len() {
            let (a, b) = input.split_at(split);
            assert_eq!(lines_of(&[a, b]), expected, "split at {split}");
        }
        let bytewise: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(lines_of(&bytewise), expected);
    }

    #[test]
    fn bare_lf_and_cr_do_not_end_a_line() {
        for (input, expected) in [
            (&b"NOOP\nQUIT\r\n"[..], &b"NOOP\nQUIT"[..]),
            (b"NOOP\rQUIT\r\n", b"NOOP\rQUIT"),
            (b"DATA\n.\n\r\n", b"DATA\n.\n"),
        ] {
            assert_eq!(lines_of(&[input]), vec![expected.to_vec()]);
        }
    }

    #[test]
    fn unterminated_runaway_line_is_refused_without_buffering_it_all() {
        let mut buf = LineBuffer::new();
        buf.extend(&[b'a'; MAX_LINE]);
        assert_eq!(buf.next_line(), Ok(None));
        buf.extend(b"aa");
        assert_eq!(buf.next_line(), Err(LineTooLong));
    }

    #[test]
    fn a_line_of_exactly_max_line_is_accepted() {
        let mut buf = LineBuffer::new();
        buf.extend(&[b'a'; MAX_LINE]);
        buf.extend(b"\r\n");
        assert_eq!(buf.next_line().unwrap().map(|l| l.len()), Some(MAX_LINE));
        buf.extend(&[b'a'; MAX_LINE + 1]);
        buf.extend(b"\r\n");
        assert_eq!(buf.next_line(), Err(LineTooLong));
    }

    #[test]
    fn take_pending_and_discard_return_and_drop_the_unread_rest() {
        let mut buf = LineBuffer::new();
        buf.extend(b"AUTH PLAIN x\r\nMAIL FROM:<a>\r\nRC");
        assert_eq!(buf.next_line().unwrap(), Some(b"AUTH PLAIN x".to_vec()));
        assert!(buf.has_line());
        assert_eq!(buf.take_pending(), b"MAIL FROM:<a>\r\nRC".to_vec());
        assert_eq!(buf.next_line(), Ok(None));

        buf.extend(b"STARTTLS\r\nMAIL FROM:<evil>\r\n");
        assert_eq!(buf.next_line().unwrap(), Some(b"STARTTLS".to_vec()));
        buf.discard();
        assert!(!buf.has_line());
        assert_eq!(buf.take_pending(), Vec::<u8>::new());
    }
}
