//! Copies between the relay's long-lived buffers, in pieces.
//!
//! glibc's `memcpy` copies a block above a few KiB with `rep movsb`, which on AMD Zen
//! runs about twenty times slower (~2 GB/s instead of ~40) when the destination lies 1
//! to 31 octets past the source modulo 4096. A session's buffers live long and keep
//! their addresses, so some pairs hit that distance on every copy: on an AMD EPYC
//! machine, copying decrypted records into the relay's read buffer was 8% of bulk
//! CPU (benches/README.md). Pieces at or below glibc's threshold are copied with
//! vector loads and stores at full speed whatever the distance; the extra calls cost
//! under 1% of a copy.

/// Below glibc's `rep movsb` threshold for AVX2 (2,048 octets and up, by CPU).
const PIECE: usize = 2048;

/// Copies `src` into `dst`, which must be as long.
pub fn copy_pieces(dst: &mut [u8], src: &[u8]) {
    debug_assert_eq!(
        dst.len(),
        src.len(),
        "copy between slices of different lengths"
    );
    for (to, from) in dst.chunks_mut(PIECE).zip(src.chunks(PIECE)) {
        to.copy_from_slice(from);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_octet_arrives_in_order_whatever_the_length() {
        let src: Vec<u8> = (0..3 * PIECE + 17).map(|i| (i % 251) as u8).collect();
        for len in [0, 1, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE + 17] {
            let mut dst = vec![0; len];
            copy_pieces(&mut dst, &src[..len]);
            assert_eq!(dst, src[..len]);
        }
    }
}
