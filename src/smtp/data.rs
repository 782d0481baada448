//! Where a DATA body ends (RFC 5321 §4.1.1.4: `<CRLF>.<CRLF>`), and where a lenient
//! reader could think it ends.
//!
//! Legacy MTAs end DATA at lookalikes of the terminator: Postfix before 3.9 at
//! `<LF>.<LF>` (CVE-2023-51764), OpenSMTPD 6.8 at `<LF>.<CRLF>` and `<CRLF>.<LF>`,
//! others at bare CRs. A body that carries such a lookalike is read as two things by
//! postern and by the backend: the end of one message and a smuggled transaction
//! behind it. [`BodyScanner`] finds the real end, and stops at the first octet from
//! which a lenient backend could read something else:
//! - by default, at a *dot line whose line endings are not both CRLF*: a `.` with a CR
//!   or LF right before it and right after it, other than `<CRLF>.<CRLF>` itself. Bare
//!   LFs elsewhere pass unchanged (old devices send them, and no backend ends a
//!   message at them);
//! - with `--strict-data`, at any bare CR or LF;
//! - either way, at a NUL: RFC 5322 text and RFC 6152 8-bit lines never hold one, and a
//!   backend that drops NULs would read `<CRLF>NUL.<CRLF>` as the end.
//!
//! A server that keeps the mail itself instead of passing it on (the demo's stand-in
//! backend, the benchmark sink) has no one behind it to mislead: [`BodyRule::Exact`]
//! ends its bodies at the real terminator only and refuses nothing.
//!
//! A body is searched for the dots that follow a CR or LF. Most of a large body's octets
//! are base64 or other text with few dots, so the scanner looks for dots alone with
//! `memchr` and checks the octet before each: on base64, a third of the cost of
//! searching for the pairs `<LF>.` and `<CR>.` with `memchr::memmem`, one pair at a
//! time. Where dots turn out dense (prose, or a body made of them), it searches for the
//! pairs instead: within 5% of what that always cost on large reads, and up to 2.6
//! times it on dense dots read 200 octets at a time, where the dots looked at before
//! giving way weigh on every scan (about 40 ns each, far less than the read). By
//! default and under [`BodyRule::Exact`], these searches (and the one for NULs) run
//! over 16 KiB blocks, so each block is fetched into the L1 cache once for all of them. One search for the NUL and both pairs at
//! once (aho-corasick's Teddy) was measured slower: with the one-octet NUL among its
//! patterns it checks every CR and LF, and without it, it gains nothing over the two
//! `memmem` searches under the default rule and is nearly twice as slow on dot-stuffed
//! lines. The scanner keeps the two octets before its input as context and holds back
//! the last octets of an input when they could start a dot line whose meaning depends
//! on octets not yet received.

use memchr::{memchr2, memmem};
use std::sync::LazyLock;

/// The end of DATA (RFC 5321 §4.1.1.4).
pub const END_OF_DATA: &[u8] = b"\r\n.\r\n";

/// Octets searched at a time under [`BodyRule::Guarded`] and [`BodyRule::Exact`]. A
/// block is searched up to three times (NUL, then dots, or `<LF>.` and `<CR>.`): at this
/// size it stays in the L1 cache (32 KiB and up) from the first search to the last,
/// where a whole read (up to 64 KiB from the relay) would come from L2 again for each.
const BLOCK: usize = 16 * 1024;

/// A search for dots alone gives way to the pairs once it has found more than one dot
/// per this many octets (and [`DOTS_AHEAD`] more). Measured on 16 KiB blocks, one dot at
/// a time is faster up to about one dot in 150 octets (each costs a call into
/// `memchr`): 27 GB/s against 17 on a body with a dot-stuffed line every 560 octets, 66
/// against 22 on base64, but 3 against 22 on prose.
const OCTETS_PER_DOT: usize = 128;

/// Dots allowed ahead of the density of [`OCTETS_PER_DOT`], so that a few close together
/// (a dot-stuffed line) do not end the search for dots.
const DOTS_AHEAD: usize = 8;

/// How [`BodyScanner`] finds the dots that follow a CR or LF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DotSearch {
    /// Dots alone, then the pairs once dots turn out denser than one per
    /// [`OCTETS_PER_DOT`].
    Adaptive,
    /// Dots alone for this many dots of an input, then the pairs.
    #[cfg(test)]
    Budget(usize),
}

impl DotSearch {
    /// Whether a search for dots alone that has found `dots` dots in the first `at`
    /// octets of its input should search for the pairs instead.
    fn gives_way(self, dots: usize, at: usize) -> bool {
        match self {
            DotSearch::Adaptive => dots > at / OCTETS_PER_DOT + DOTS_AHEAD,
            #[cfg(test)]
            DotSearch::Budget(budget) => dots >= budget,
        }
    }
}

static LF_DOT: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(b"\n."));
static CR_DOT: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(b"\r."));

/// What a scan found in the bytes it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyStep {
    /// The first `n` octets are body and were taken; the rest (at most three octets
    /// that could start a dot line) must be offered again with more after them.
    More(usize),
    /// The body, terminator included, ends `n` octets in.
    End(usize),
    /// From this offset on, a lenient backend could read the body differently: nothing
    /// from here may reach it. Nothing from here was taken.
    Ambiguous(usize),
}

/// Which rule the scanner applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyRule {
    /// Refuse dot lines with a bare CR or LF around the dot; bare CR and LF elsewhere
    /// pass.
    Guarded,
    /// `--strict-data`: refuse every bare CR or LF.
    Strict,
    /// After a refusal: skip to where the client thinks its message ends, which is the
    /// real terminator, or a lookalike with nothing after it yet (a client that ends
    /// its messages with `<LF>.<LF>` is waiting for a reply there).
    Discard,
    /// Only the real terminator ends the body, and nothing is refused: lookalikes, bare
    /// CRs and LFs and NULs are body like any other octet, as RFC 5321 §4.1.1.4 reads.
    /// For a server that keeps the mail itself (the demo's stand-in backend, the
    /// benchmark sink); never for one passing it on to a backend that may be lenient.
    Exact,
}

/// Scans one DATA body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyScanner {
    rule: BodyRule,
    /// The last two octets taken, most recent last. A body starts after the CRLF of the
    /// DATA line (or of the line whose bare ending was refused).
    before: [u8; 2],
    /// The next input starts a line (only right after the command line: a consumed
    /// CR or LF is otherwise never followed by a dot that was not also seen).
    line_start: bool,
}

/// Where a pattern occurs next in the input being scanned.
#[derive(Debug, Clone, Copy)]
enum Hit {
    Unknown,
    None,
    At(usize),
}

/// How a `.` after a CR or LF reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DotLine {
    /// Not a line holding only a dot (e.g. `..` stuffing or `.x`).
    NotOne,
    /// `<CRLF>.<CRLF>`: `len` octets from the CR or LF before the dot.
    Real { len: usize },
    /// A dot line with a bare CR or LF around the dot, `len` octets from the CR or LF
    /// before the dot to the end of the line ending after it.
    Lookalike { len: usize },
    /// The octets that decide are not in yet.
    NeedMore,
}

/// `eol` is the CR or LF before the dot, `before` the octet before it, `after` what
/// follows the dot.
fn dot_line(before: u8, eol: u8, after: &[u8]) -> DotLine {
    let crlf_before = before == b'\r' && eol == b'\n';
    match after {
        [] => DotLine::NeedMore,
        [b'\r'] if crlf_before => DotLine::NeedMore,
        [b'\r', b'\n', ..] if crlf_before => DotLine::Real { len: 4 },
        [b'\r', b'\n', ..] => DotLine::Lookalike { len: 4 },
        [b'\r' | b'\n', ..] => DotLine::Lookalike { len: 3 },
        _ => DotLine::NotOne,
    }
}

fn is_eol(byte: u8) -> bool {
    byte == b'\r' || byte == b'\n'
}

/// The last two octets taken once `taken` follows `before`. Read off the tail rather
/// than shifted through octet by octet: that loop ran over every octet scanned, and
/// cost about a tenth of a bulk body's scan.
fn after_taking(before: [u8; 2], taken: &[u8]) -> [u8; 2] {
    match *taken {
        [.., a, b] => [a, b],
        [b] => [before[1], b],
        [] => before,
    }
}

impl BodyScanner {
    /// A body right after the CRLF of a DATA line accepted with 354.
    pub fn new(rule: BodyRule) -> Self {
        BodyScanner {
            rule,
            before: *b"\r\n",
            line_start: true,
        }
    }

    /// A scanner that skips the rest of a refused body, starting at the offset a scan
    /// of `input` returned as [`BodyStep::Ambiguous`].
    ///
    /// A refusal can come inside the client's own last dot line: at a dot that starts the
    /// body (its CR or LF was the DATA line's), or under [`BodyRule::Strict`] at the bare
    /// CR or LF after a line's only dot. The discard starts from there, so that a client
    /// that ended its message with that line gets its reply instead of waiting for one.
    pub fn discard_from(&self, input: &[u8], at: usize) -> BodyScanner {
        BodyScanner {
            rule: BodyRule::Discard,
            before: after_taking(self.before, input.get(..at).unwrap_or_default()),
            line_start: self.line_start && at == 0,
        }
    }

    pub fn rule(&self) -> BodyRule {
        self.rule
    }

    /// Scans the next bytes of the body.
    pub fn scan(&mut self, input: &[u8]) -> BodyStep {
        self.scan_in_blocks(input, BLOCK, DotSearch::Adaptive)
    }

    /// [`Self::scan`], searching `block` octets at a time. Each block starts where the
    /// one before stopped taking, so it sees the same octets and context as one scan
    /// of the whole input would at that point, and decides the same; `block` is more
    /// than the three octets a scan may hold back, so every block takes some.
    fn scan_in_blocks(&mut self, input: &[u8], block: usize, search: DotSearch) -> BodyStep {
        debug_assert!(block > 3, "a block of {block} octets may take none");
        // Strict stops at every line ending, so its searches are short and blocks gain
        // nothing (measured); Discard ends at a lookalike with nothing after it, which
        // the end of a block would fake.
        if matches!(self.rule, BodyRule::Strict | BodyRule::Discard) {
            return self.scan_once(input, search);
        }
        let mut start = 0;
        loop {
            let end = input.len().min(start + block);
            match self.scan_once(&input[start..end], search) {
                BodyStep::More(n) if end < input.len() => start += n,
                BodyStep::More(n) => return BodyStep::More(start + n),
                BodyStep::End(n) => return BodyStep::End(start + n),
                BodyStep::Ambiguous(n) => return BodyStep::Ambiguous(start + n),
            }
        }
    }

    fn scan_once(&mut self, input: &[u8], search: DotSearch) -> BodyStep {
        let step = match self.rule {
            BodyRule::Discard => self
                .discard_after_dot(input)
                .unwrap_or_else(|| self.scan_dot_lines(input, search)),
            BodyRule::Exact => self.scan_dot_lines(input, search),
            BodyRule::Strict | BodyRule::Guarded => {
                let nul = memchr::memchr(0, input);
                let upto = &input[..nul.unwrap_or(input.len())];
                let step = if self.rule == BodyRule::Strict {
                    self.scan_strict(upto)
                } else {
                    self.scan_dot_lines(upto, search)
                };
                match (step, nul) {
                    // What was held back before the NUL is refused with it.
                    (BodyStep::More(n), Some(_)) => BodyStep::Ambiguous(n),
                    (step, _) => step,
                }
            }
        };
        if let BodyStep::More(n) = step {
            self.before = after_taking(self.before, &input[..n]);
            if n > 0 {
                self.line_start = false;
            }
        }
        step
    }

    /// Looks at every `<CR>.` and `<LF>.` (and a dot at the very start of the body).
    fn scan_dot_lines(&mut self, input: &[u8], search: DotSearch) -> BodyStep {
        if self.line_start && input.first() == Some(&b'.') {
            let found = dot_line(self.before[0], self.before[1], &input[1..]);
            if let Some(step) = self.on_dot_line(found, input, 0, 1) {
                return step;
            }
        }
        let mut dots = 0;
        let mut from = 0;
        while !search.gives_way(dots, from) {
            let Some(dot) = memchr::memchr(b'.', &input[from..]).map(|at| from + at) else {
                return self.more_unless_last_is_eol(input);
            };
            // A dot at 0 follows an octet already taken, which is never a CR or LF but
            // at the start of the body (a CR or LF at the end of an input is held back).
            if dot > 0
                && is_eol(input[dot - 1])
                && let Some(step) = self.at_eol_dot(input, dot - 1)
            {
                return step;
            }
            from = dot + 1;
            dots += 1;
        }
        // Every pair that starts before `from` was looked at through its dot, and none
        // starts at `from - 1`, which is a dot.
        self.scan_pairs(input, from)
    }

    /// A discard that starts right after a line's only dot (see
    /// [`BodyScanner::discard_from`]; no scan leaves a CR or LF and a dot in `before`
    /// otherwise, as it holds them back) reads `input` as what follows that dot. The
    /// octet before the CR or LF is gone: taking it for a CR can only end the discard at
    /// a line that would otherwise have been body, after the backend was cut off. Only
    /// for [`BodyRule::Discard`], whose scans alone start from a refusal.
    fn discard_after_dot(&self, input: &[u8]) -> Option<BodyStep> {
        if !is_eol(self.before[0]) || self.before[1] != b'.' {
            return None;
        }
        let found = dot_line(b'\r', self.before[0], input);
        // Both the CR or LF and the dot are already taken.
        self.on_dot_line(found, input, 0, 2)
    }

    /// Looks at every `<CR>.` and `<LF>.` that starts at `from` or later, searching for
    /// the pairs themselves.
    fn scan_pairs(&mut self, input: &[u8], mut from: usize) -> BodyStep {
        // Each pattern's next hit is searched for only once it has been passed, so a
        // body full of dot-stuffed lines is still scanned in linear time.
        let mut next = [Hit::Unknown, Hit::Unknown];
        loop {
            for (hit, finder) in next.iter_mut().zip([&*LF_DOT, &*CR_DOT]) {
                if matches!(hit, Hit::Unknown) || matches!(hit, Hit::At(at) if *at < from) {
                    *hit = finder
                        .find(&input[from..])
                        .map_or(Hit::None, |at| Hit::At(from + at));
                }
            }
            let eol_at = match next {
                [Hit::At(a), Hit::At(b)] => a.min(b),
                [Hit::At(at), _] | [_, Hit::At(at)] => at,
                _ => break,
            };
            if let Some(step) = self.at_eol_dot(input, eol_at) {
                return step;
            }
            from = eol_at + 1;
        }
        self.more_unless_last_is_eol(input)
    }

    /// What the dot after the CR or LF at `eol_at` means; `None` to go on searching.
    fn at_eol_dot(&self, input: &[u8], eol_at: usize) -> Option<BodyStep> {
        let before = match eol_at {
            0 => self.before[1],
            _ => input[eol_at - 1],
        };
        let found = dot_line(before, input[eol_at], &input[eol_at + 2..]);
        // A lookalike's extent is counted from the CR or LF before the dot.
        self.on_dot_line(found, input, eol_at, 0)
    }

    /// All of `input` is body but a CR or LF at its very end, which could be followed
    /// by a dot.
    fn more_unless_last_is_eol(&self, input: &[u8]) -> BodyStep {
        let keep = usize::from(input.last().is_some_and(|&b| is_eol(b)));
        BodyStep::More(input.len() - keep)
    }

    /// What a dot line at `at` means for the scan; `None` to go on searching.
    /// `shift` is 1 when the CR or LF before the dot is already taken (a dot at the
    /// start of the body), so the line's extent is one octet shorter in `input`.
    fn on_dot_line(
        &self,
        found: DotLine,
        input: &[u8],
        at: usize,
        shift: usize,
    ) -> Option<BodyStep> {
        match found {
            DotLine::NotOne => None,
            DotLine::NeedMore => Some(BodyStep::More(at)),
            DotLine::Real { len } => Some(BodyStep::End(at + len - shift)),
            DotLine::Lookalike { len } => match self.rule {
                BodyRule::Discard if at + len - shift == input.len() => {
                    Some(BodyStep::End(input.len()))
                }
                BodyRule::Discard | BodyRule::Exact => None,
                BodyRule::Guarded | BodyRule::Strict => Some(BodyStep::Ambiguous(at)),
            },
        }
    }

    /// `--strict-data`: every CR must be followed by LF and every LF preceded by CR; a
    /// line that is exactly "." ends the body. A CR at the end of the input is held back
    /// until its next octet shows whether it is bare.
    fn scan_strict(&mut self, input: &[u8]) -> BodyStep {
        let mut i = 0;
        // Whether the line so far is exactly ".", and whether it is empty.
        let (mut line_is_dot, mut line_empty) = if !self.line_start && self.before == *b"\n." {
            (true, false)
        } else {
            (false, self.line_start || self.before[1] == b'\n')
        };
        loop {
            let hit = memchr2(b'\r', b'\n', &input[i..]).map(|h| i + h);
            let text_end = hit.unwrap_or(input.len());
            if text_end > i {
                line_is_dot = line_empty && &input[i..text_end] == b".";
            }
            let Some(at) = hit else {
                return BodyStep::More(input.len());
            };
            if input[at] == b'\n' {
                // A CR always takes its LF with it, so this LF is bare.
                return BodyStep::Ambiguous(at);
            }
            match input.get(at + 1) {
                None => return BodyStep::More(at),
                Some(b'\n') => {}
                Some(_) => return BodyStep::Ambiguous(at),
            }
            if line_is_dot {
                return BodyStep::End(at + 2);
            }
            line_empty = true;
            line_is_dot = false;
            i = at + 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;

    /// Feeds `body` in pieces of `chunk` octets (re-offering what was not taken) and
    /// returns what was taken before the end or refusal, and how it stopped.
    fn run(rule: BodyRule, body: &[u8], chunk: usize) -> (usize, Option<BodyStep>) {
        let mut scanner = BodyScanner::new(rule);
        let mut taken = 0;
        let mut avail = 0;
        loop {
            avail = (avail + chunk).min(body.len());
            match scanner.scan(&body[taken..avail]) {
                BodyStep::More(n) => {
                    taken += n;
                    if avail == body.len() {
                        return (taken, None);
                    }
                }
                BodyStep::End(n) => return (taken + n, Some(BodyStep::End(taken + n))),
                BodyStep::Ambiguous(at) => {
                    return (taken + at, Some(BodyStep::Ambiguous(taken + at)));
                }
            }
        }
    }

    fn every_chunking(rule: BodyRule, body: &[u8]) -> Option<BodyStep> {
        let (_, whole) = run(rule, body, body.len().max(1));
        for chunk in 1..=body.len() {
            assert_eq!(
                run(rule, body, chunk).1,
                whole,
                "{rule:?} chunk {chunk} {body:?}"
            );
        }
        whole
    }

    const LOOKALIKES: [&[u8]; 9] = [
        b"\n.\n",
        b"\n.\r\n",
        b"\r\n.\n",
        b"\r.\r",
        b"\r.\n",
        b"\r\n.\rX",
        b"\n.\r",
        b"\r.\r\n",
        b"\r\r.\r\r",
    ];

    #[test]
    fn the_real_end_is_found_wherever_the_reads_split() {
        for (body, end) in [
            (&b".\r\n"[..], 3),
            (b"\r\n.\r\n", 5),
            (b"Subject: x\r\n\r\nhi\r\n.\r\nMAIL FROM:<a>\r\n", 21),
            (b"a\r\n..\r\n.x\r\n\r\n.\r\n", 16),
            (b"bare\nlines\npass\r\n.\r\n", 20),
            (b"a\r\r\n.\r\n", 7),
        ] {
            assert_eq!(
                every_chunking(BodyRule::Guarded, body),
                Some(BodyStep::End(end)),
                "{body:?}"
            );
        }
    }

    #[test]
    fn every_lookalike_stops_the_body_before_its_dot_line() {
        for lookalike in LOOKALIKES {
            let body = [b"x".as_slice(), lookalike, b"MAIL FROM:<e>\r\n\r\n.\r\n"].concat();
            let dot = body.iter().position(|&b| b == b'.').unwrap_or_default();
            assert_eq!(
                every_chunking(BodyRule::Guarded, &body),
                Some(BodyStep::Ambiguous(dot - 1)),
                "{lookalike:?}"
            );
        }
        // At the very start of the body, the DATA line's CRLF comes first.
        for body in [&b".\n"[..], b".\rX", b".\r\r\n", b"\0.\r\n"] {
            assert_eq!(
                every_chunking(BodyRule::Guarded, body),
                Some(BodyStep::Ambiguous(0))
            );
        }
    }

    #[test]
    fn a_nul_stops_the_body_but_not_before_a_real_end() {
        for rule in [BodyRule::Guarded, BodyRule::Strict] {
            // Cut at the NUL, or before a line ending still held back in front of it.
            let cut = every_chunking(rule, b"hello\r\n\0.\r\nMAIL FROM:<e>\r\n");
            assert!(
                matches!(cut, Some(BodyStep::Ambiguous(5..=7))),
                "{rule:?} {cut:?}"
            );
            assert_eq!(
                every_chunking(rule, b"a\r\n.\r\n\0"),
                Some(BodyStep::End(6)),
                "{rule:?}"
            );
        }
    }

    #[test]
    fn strict_refuses_every_bare_line_ending() {
        for (body, expected) in [
            (&b"a\r\nb\r\n.\r\n"[..], BodyStep::End(9)),
            (b".\r\n", BodyStep::End(3)),
            (b"a\nb", BodyStep::Ambiguous(1)),
            (b"ab\rc", BodyStep::Ambiguous(2)),
            (b"a\r\n\n", BodyStep::Ambiguous(3)),
            (b"a\r\n.\n", BodyStep::Ambiguous(4)),
        ] {
            assert_eq!(
                every_chunking(BodyRule::Strict, body),
                Some(expected),
                "{body:?}"
            );
        }
    }

    #[test]
    fn discarding_stops_at_the_clients_own_end() {
        // The real end, wherever it is.
        let body = b"x\n.\nMAIL FROM:<e>\r\n.\r\n";
        let mut scanner = BodyScanner::new(BodyRule::Guarded);
        assert_eq!(scanner.scan(body), BodyStep::Ambiguous(1));
        let mut discard = scanner.discard_from(body, 1);
        assert_eq!(discard.scan(&body[1..]), BodyStep::End(body.len() - 1));
        // A bare-LF client's own end, when nothing follows it.
        let body = b"line\nline\n.\n";
        let mut scanner = BodyScanner::new(BodyRule::Strict);
        assert_eq!(scanner.scan(body), BodyStep::Ambiguous(4));
        let mut discard = scanner.discard_from(body, 4);
        assert_eq!(discard.scan(&body[4..]), BodyStep::End(body.len() - 4));
    }

    #[test]
    fn discarding_ends_at_the_dot_line_the_refusal_came_inside() {
        // (rule, body, where it is refused): a dot that starts the body, and under
        // --strict-data a bare ending after a line's only dot. The client ended its
        // message there and waits for the reply; with more after the line, it did not.
        for (rule, line, at) in [
            (BodyRule::Guarded, &b".\n"[..], 0),
            (BodyRule::Strict, b"a\r\n.\n", 4),
            (BodyRule::Strict, b".\n", 1),
        ] {
            let mut scanner = BodyScanner::new(rule);
            assert_eq!(scanner.scan(line), BodyStep::Ambiguous(at), "{line:?}");
            let mut discard = scanner.discard_from(line, at);
            assert_eq!(
                discard.scan(&line[at..]),
                BodyStep::End(line.len() - at),
                "{rule:?} {line:?}"
            );
            let more = [line, b"more\r\n"].concat();
            let mut discard = scanner.discard_from(&more, at);
            assert_eq!(
                discard.scan(&more[at..]),
                // All but the last LF, which a dot could follow.
                BodyStep::More(more.len() - at - 1),
                "{rule:?} {more:?}"
            );
        }
    }

    #[test]
    fn exact_ends_at_the_real_terminator_and_refuses_nothing() {
        // Reference: the first <CRLF>.<CRLF>, counting the CRLF of the DATA line.
        fn reference(body: &[u8]) -> Option<BodyStep> {
            let ctx = [b"\r\n".as_slice(), body].concat();
            memmem::find(&ctx, END_OF_DATA).map(|at| BodyStep::End(at + END_OF_DATA.len() - 2))
        }
        for lookalike in LOOKALIKES {
            let body = [b"x".as_slice(), lookalike, b"MAIL FROM:<e>\r\n\0\r\n.\r\n"].concat();
            assert_eq!(
                every_chunking(BodyRule::Exact, &body),
                Some(BodyStep::End(body.len())),
                "{lookalike:?}"
            );
        }
        let alphabet = [b'\r', b'\n', b'.', b'a', 0];
        for len in 1..=6u32 {
            for n in 0..5usize.pow(len) {
                let body: Vec<u8> = (0..len)
                    .map(|k| alphabet[(n / 5usize.pow(k)) % 5])
                    .collect();
                assert_eq!(
                    every_chunking(BodyRule::Exact, &body),
                    reference(&body),
                    "{body:?}"
                );
            }
        }
    }

    #[test]
    fn held_back_octets_are_at_most_the_start_of_a_dot_line() {
        let mut scanner = BodyScanner::new(BodyRule::Guarded);
        assert_eq!(scanner.scan(b"abc\r\n"), BodyStep::More(4));
        assert_eq!(scanner.scan(b"\n."), BodyStep::More(0));
        assert_eq!(scanner.scan(b"\n.\r"), BodyStep::More(0));
        assert_eq!(scanner.scan(b"\n.\r\n"), BodyStep::End(4));
    }

    #[test]
    fn guarded_agrees_with_a_byte_at_a_time_reference() {
        // Reference: the first dot line (a dot between CR/LF octets) decides.
        fn reference(body: &[u8]) -> Option<BodyStep> {
            let ctx = [b"\r\n".as_slice(), body].concat();
            for i in 2..ctx.len() {
                if ctx[i] != b'.' || !is_eol(ctx[i - 1]) {
                    continue;
                }
                let &after = ctx.get(i + 1)?;
                if !is_eol(after) {
                    continue;
                }
                let real = ctx[i - 2..].starts_with(b"\r\n.\r\n");
                if real {
                    return Some(BodyStep::End(i + 3 - 2));
                }
                if ctx[i - 2..].starts_with(b"\r\n.\r") && ctx.len() == i + 2 {
                    return None;
                }
                return Some(BodyStep::Ambiguous(i.saturating_sub(3)));
            }
            None
        }
        let alphabet = [b'\r', b'\n', b'.', b'a'];
        for len in 1..=6u32 {
            for n in 0..4usize.pow(len) {
                let body: Vec<u8> = (0..len)
                    .map(|k| alphabet[(n / 4usize.pow(k)) % 4])
                    .collect();
                let expected = reference(&body);
                assert_eq!(
                    every_chunking(BodyRule::Guarded, &body),
                    expected,
                    "{body:?}"
                );
            }
        }
    }

    /// The scanner as it was before it was made cheaper per octet, kept verbatim (but for
    /// its statics and the discard fix, which changed what it does) so that every change
    /// can be checked step by step against it: the
    /// relay forwards each `More(n)` as it comes, so equal outcomes are not enough.
    mod reference {
        use super::{BodyRule, BodyStep};
        use memchr::{memchr2, memmem};

        #[derive(Debug, Clone, Copy)]
        pub struct BodyScanner {
            rule: BodyRule,
            before: [u8; 2],
            line_start: bool,
        }

        #[derive(Debug, Clone, Copy)]
        enum Hit {
            Unknown,
            None,
            At(usize),
        }

        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum DotLine {
            NotOne,
            Real { len: usize },
            Lookalike { len: usize },
            NeedMore,
        }

        fn dot_line(before: u8, eol: u8, after: &[u8]) -> DotLine {
            let crlf_before = before == b'\r' && eol == b'\n';
            match after {
                [] => DotLine::NeedMore,
                [b'\r'] if crlf_before => DotLine::NeedMore,
                [b'\r', b'\n', ..] if crlf_before => DotLine::Real { len: 4 },
                [b'\r', b'\n', ..] => DotLine::Lookalike { len: 4 },
                [b'\r' | b'\n', ..] => DotLine::Lookalike { len: 3 },
                _ => DotLine::NotOne,
            }
        }

        fn is_eol(byte: u8) -> bool {
            byte == b'\r' || byte == b'\n'
        }

        impl BodyScanner {
            pub fn new(rule: BodyRule) -> Self {
                BodyScanner {
                    rule,
                    before: *b"\r\n",
                    line_start: true,
                }
            }

            /// A scanner in any context, to check one scan from each.
            pub fn in_state(rule: BodyRule, before: [u8; 2], line_start: bool) -> Self {
                BodyScanner {
                    rule,
                    before,
                    line_start,
                }
            }

            pub fn state(&self) -> ([u8; 2], bool) {
                (self.before, self.line_start)
            }

            pub fn discard_from(&self, input: &[u8], at: usize) -> BodyScanner {
                let mut before = self.before;
                for &byte in input.get(..at).unwrap_or_default() {
                    before = [before[1], byte];
                }
                BodyScanner {
                    rule: BodyRule::Discard,
                    before,
                    line_start: self.line_start && at == 0,
                }
            }

            pub fn scan(&mut self, input: &[u8]) -> BodyStep {
                let step = match self.rule {
                    BodyRule::Discard | BodyRule::Exact => self.scan_dot_lines(input),
                    BodyRule::Strict | BodyRule::Guarded => {
                        let nul = memchr::memchr(0, input);
                        let upto = &input[..nul.unwrap_or(input.len())];
                        let step = if self.rule == BodyRule::Strict {
                            self.scan_strict(upto)
                        } else {
                            self.scan_dot_lines(upto)
                        };
                        match (step, nul) {
                            (BodyStep::More(n), Some(_)) => BodyStep::Ambiguous(n),
                            (step, _) => step,
                        }
                    }
                };
                if let BodyStep::More(n) = step {
                    for &byte in &input[..n] {
                        self.before = [self.before[1], byte];
                    }
                    if n > 0 {
                        self.line_start = false;
                    }
                }
                step
            }

            fn scan_dot_lines(&mut self, input: &[u8]) -> BodyStep {
                // The discard fix of the scanner, as it is there (not an optimisation).
                if self.rule == BodyRule::Discard
                    && is_eol(self.before[0])
                    && self.before[1] == b'.'
                {
                    let found = dot_line(b'\r', self.before[0], input);
                    if let Some(step) = self.on_dot_line(found, input, 0, 2) {
                        return step;
                    }
                }
                if self.line_start && input.first() == Some(&b'.') {
                    let found = dot_line(self.before[0], self.before[1], &input[1..]);
                    if let Some(step) = self.on_dot_line(found, input, 0, 1) {
                        return step;
                    }
                }
                let finders = [memmem::Finder::new(b"\n."), memmem::Finder::new(b"\r.")];
                let mut next = [Hit::Unknown, Hit::Unknown];
                let mut from = 0;
                loop {
                    for (hit, finder) in next.iter_mut().zip(&finders) {
                        if matches!(hit, Hit::Unknown) || matches!(hit, Hit::At(at) if *at < from) {
                            *hit = finder
                                .find(&input[from..])
                                .map_or(Hit::None, |at| Hit::At(from + at));
                        }
                    }
                    let eol_at = match next {
                        [Hit::At(a), Hit::At(b)] => a.min(b),
                        [Hit::At(at), _] | [_, Hit::At(at)] => at,
                        _ => break,
                    };
                    let before = match eol_at {
                        0 => self.before[1],
                        _ => input[eol_at - 1],
                    };
                    let found = dot_line(before, input[eol_at], &input[eol_at + 2..]);
                    if let Some(step) = self.on_dot_line(found, input, eol_at, 0) {
                        return step;
                    }
                    from = eol_at + 1;
                }
                let keep = usize::from(input.last().is_some_and(|&b| is_eol(b)));
                BodyStep::More(input.len() - keep)
            }

            fn on_dot_line(
                &self,
                found: DotLine,
                input: &[u8],
                at: usize,
                shift: usize,
            ) -> Option<BodyStep> {
                match found {
                    DotLine::NotOne => None,
                    DotLine::NeedMore => Some(BodyStep::More(at)),
                    DotLine::Real { len } => Some(BodyStep::End(at + len - shift)),
                    DotLine::Lookalike { len } => match self.rule {
                        BodyRule::Discard if at + len - shift == input.len() => {
                            Some(BodyStep::End(input.len()))
                        }
                        BodyRule::Discard | BodyRule::Exact => None,
                        BodyRule::Guarded | BodyRule::Strict => Some(BodyStep::Ambiguous(at)),
                    },
                }
            }

            fn scan_strict(&mut self, input: &[u8]) -> BodyStep {
                let mut i = 0;
                let (mut line_is_dot, mut line_empty) =
                    if !self.line_start && self.before == *b"\n." {
                        (true, false)
                    } else {
                        (false, self.line_start || self.before[1] == b'\n')
                    };
                loop {
                    let hit = memchr2(b'\r', b'\n', &input[i..]).map(|h| i + h);
                    let text_end = hit.unwrap_or(input.len());
                    if text_end > i {
                        line_is_dot = line_empty && &input[i..text_end] == b".";
                    }
                    let Some(at) = hit else {
                        return BodyStep::More(input.len());
                    };
                    if input[at] == b'\n' {
                        return BodyStep::Ambiguous(at);
                    }
                    match input.get(at + 1) {
                        None => return BodyStep::More(at),
                        Some(b'\n') => {}
                        Some(_) => return BodyStep::Ambiguous(at),
                    }
                    if line_is_dot {
                        return BodyStep::End(at + 2);
                    }
                    line_empty = true;
                    line_is_dot = false;
                    i = at + 2;
                }
            }
        }
    }

    /// Bodies dense in what the scanner looks at: CR, LF, dots and NULs alone and in the
    /// sequences that make or fake the end, between runs of text.
    fn body() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            8 => prop::sample::select(vec![
                &b"\r"[..],
                b"\n",
                b".",
                b"\0",
                b"a",
                b"\r\n",
                b"\r\n.\r\n",
                b"\r\n..",
                b"\n.",
                b"\r.",
                b".\r",
                b".\n",
            ])
            .prop_map(<[u8]>::to_vec),
            1 => (0..80usize).prop_map(|len| vec![b'a'; len]),
        ];
        prop::collection::vec(piece, 0..48).prop_map(|pieces| pieces.concat())
    }

    /// `body` read in pieces ending at `cuts`, each read scanned (with what was held
    /// back) by both scanners as the relay would, the new one `block` octets at a
    /// time: a refusal discards up to the client's end, and an end starts the next
    /// message with the same rule.
    fn replay(
        rule: BodyRule,
        body: &[u8],
        cuts: &[Index],
        block: usize,
        search: DotSearch,
    ) -> Result<(), TestCaseError> {
        let mut ends: Vec<usize> = cuts.iter().map(|i| i.index(body.len() + 1)).collect();
        ends.push(body.len());
        ends.sort_unstable();
        let mut scanner = BodyScanner::new(rule);
        let mut expected = reference::BodyScanner::new(rule);
        let mut taken = 0;
        for end in ends {
            while taken < end {
                let input = &body[taken..end];
                let step = scanner.scan_in_blocks(input, block, search);
                prop_assert_eq!(step, expected.scan(input), "{:?} at {}", rule, taken);
                match step {
                    BodyStep::More(n) => {
                        taken += n;
                        break;
                    }
                    BodyStep::End(n) => {
                        taken += n;
                        scanner = BodyScanner::new(rule);
                        expected = reference::BodyScanner::new(rule);
                    }
                    BodyStep::Ambiguous(at) => {
                        scanner = scanner.discard_from(input, at);
                        expected = expected.discard_from(input, at);
                        taken += at;
                    }
                }
            }
        }
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        /// Every rule gives the reference's step for every read, however the body is cut
        /// and whatever the block (small ones put many edges among few octets).
        #[test]
        fn every_step_matches_the_reference(
            rule in prop::sample::select(vec![
                BodyRule::Guarded,
                BodyRule::Strict,
                BodyRule::Exact,
                BodyRule::Discard,
            ]),
            body in body(),
            cuts in prop::collection::vec(any::<Index>(), 0..12),
            block in prop_oneof![4..24usize, Just(BLOCK)],
            // Small budgets give way at every point of a body; the largest never does.
            search in prop_oneof![
                Just(DotSearch::Adaptive),
                (0..16usize).prop_map(DotSearch::Budget),
                Just(DotSearch::Budget(usize::MAX)),
            ],
        ) {
            replay(rule, &body, &cuts, block, search)?;
        }
    }

    #[test]
    fn one_scan_from_every_context_gives_the_references_step_wherever_it_gives_way() {
        // Every input of up to five octets over those the scanner looks at, after any two
        // octets (or at the start of the body), under every rule, giving way to the pairs
        // after each of its dots or never: the step and the context after it match.
        let alphabet = [b'\r', b'\n', b'.', 0, b'a'];
        let mut contexts = vec![(*b"\r\n", true)];
        for a in alphabet {
            for b in alphabet {
                contexts.push(([a, b], false));
            }
        }
        let rules = [
            BodyRule::Guarded,
            BodyRule::Strict,
            BodyRule::Exact,
            BodyRule::Discard,
        ];
        for len in 0..=5u32 {
            for n in 0..5usize.pow(len) {
                let input: Vec<u8> = (0..len)
                    .map(|k| alphabet[(n / 5usize.pow(k)) % 5])
                    .collect();
                let dots = input.iter().filter(|&&b| b == b'.').count();
                let searches = (0..=dots)
                    .map(DotSearch::Budget)
                    .chain([DotSearch::Budget(usize::MAX), DotSearch::Adaptive]);
                for (search, rule) in searches.flat_map(|s| rules.map(|r| (s, r))) {
                    for &(before, line_start) in &contexts {
                        let mut scanner = BodyScanner {
                            rule,
                            before,
                            line_start,
                        };
                        let mut expected =
                            reference::BodyScanner::in_state(rule, before, line_start);
                        let step = scanner.scan_once(&input, search);
                        let context = (scanner.before, scanner.line_start);
                        assert_eq!(
                            (step, context),
                            (expected.scan(&input), expected.state()),
                            "{rule:?} after {before:?} ({line_start}), {search:?}: {input:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn giving_way_to_the_pairs_mid_block_changes_no_step() {
        // Sparse dots first (a dot-stuffed line among base64-like ones), then dots dense
        // enough to use up the budget wherever it runs out, then what ends or fakes the
        // end: the search changes within the block, before or after it.
        let sparse = [
            &b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=\r\n".repeat(10)[..],
            b"..stuffed\r\n",
        ]
        .concat()
        .repeat(20);
        for dense in [0, 50, 130, 400, 1000] {
            for sequence in [&b"\r\n.\r\n"[..], b"\n.\n", b"\r\n.\n", b"\r.\r", b"\0"] {
                let body = [
                    &sparse[..],
                    &b"e.g. a.b.c\r\n".repeat(dense),
                    sequence,
                    b"tail\r\n.\r\n",
                ]
                .concat();
                for rule in [BodyRule::Guarded, BodyRule::Exact, BodyRule::Discard] {
                    if let Err(failed) = replay(rule, &body, &[], BLOCK, DotSearch::Adaptive) {
                        panic!("{dense} dense lines, {sequence:?}: {failed}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_real_block_edge_changes_no_step() {
        for sequence in [
            &b"\r\n.\r\n"[..],
            b"\r\n..\r\n",
            b"\n.\n",
            b"\r.\r",
            b"\r\n.\n",
            b"\n.\r\n",
            b"\0",
            b"\r\n\0",
        ] {
            for at in BLOCK - 6..BLOCK + 2 {
                let body = [&vec![b'a'; at][..], sequence, b"tail\r\n.\r\n"].concat();
                for rule in [BodyRule::Guarded, BodyRule::Strict, BodyRule::Exact] {
                    if let Err(failed) = replay(rule, &body, &[], BLOCK, DotSearch::Adaptive) {
                        panic!("{sequence:?} at {at}: {failed}");
                    }
                }
            }
        }
    }
}
