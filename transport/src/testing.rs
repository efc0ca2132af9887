//! Helpers shared by the transport's tests, its `transport-peer` test driver and benches:
//! the payload checksum both sides of a transfer report, hex for the driver's line
//! protocol, and block references in their wire form ([`crate::wire::encode_ref`]).

use dragon_shm::heap::BlockRef;

use crate::wire::{decode_ref, encode_ref};

/// The FNV-1a-style 64-bit checksum of `b` (little-endian words, then the tail bytes).
pub fn checksum(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut words = b.chunks_exact(8);
    for w in &mut words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(a)).wrapping_mul(0x0100_0000_01b3);
    }
    for &x in words.remainder() {
        h = (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The bytes of an even-length hex string, or None.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

/// A block reference as 64 hex digits (its wire form).
pub fn ref_hex(r: &BlockRef) -> String {
    hex(&encode_ref(r))
}

/// The block reference of 64 hex digits, or None.
pub fn ref_of_hex(s: &str) -> Option<BlockRef> {
    unhex(s).filter(|b| b.len() == 32).map(|b| decode_ref(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_and_hex_round_trip() {
        let r = BlockRef {
            segment: 7,
            offset: 1 << 40,
            len: 4096,
            gen: 3,
            _pad: 0,
        };
        assert_eq!(ref_of_hex(&ref_hex(&r)), Some(r));
        assert_eq!(ref_of_hex("abc"), None);
        assert_eq!(unhex("0aff"), Some(vec![10, 255]));
        assert_ne!(checksum(b"abcdefghi"), checksum(b"abcdefghj"));
    }
}
