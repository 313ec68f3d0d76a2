//! The hashes Slipstream computes, and why there are two.
//!
//! - [`Fnv1a`] for digests that are **stored** and checked by a later
//!   process: the ConfigMap's `slipstream.io/content-digest` annotation and
//!   the per-file checksums in `slipstream sync`'s state. It must give the
//!   same answer in every build, on every platform, in every future
//!   version, which rules out std's hashers (randomly keyed, algorithm
//!   unspecified). FNV-1a is tiny, dependency-free, fully specified and fast
//!   enough for a once-per-write digest. It detects edits and torn writes,
//!   not an adversary (nothing here needs that).
//! - [`fast_hash`] (foldhash, fixed seed) for hashes that **never leave the
//!   process**: the per-key `(key hash, value hash)` pairs the operator keeps
//!   of every ConfigMap it watches, computed for each watch event and write
//!   response. That runs on the hot path over every byte of every value,
//!   where foldhash is several times faster than byte-at-a-time FNV; its
//!   output may change between crate versions, which is fine for values
//!   that are never stored.

use std::hash::{BuildHasher, Hasher};

/// FNV-1a, 64 bit.
#[derive(Clone, Copy, Debug)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self::new()
    }
}

impl Fnv1a {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    pub const fn new() -> Self {
        Self(Self::OFFSET)
    }

    /// Feeds `bytes` as they are.
    #[inline]
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(Self::PRIME);
        }
    }

    /// Feeds `bytes` after their length (8 bytes, little-endian), so that
    /// a sequence of fields hashes unambiguously.
    pub fn write_framed(&mut self, bytes: &[u8]) {
        self.write(&(bytes.len() as u64).to_le_bytes());
        self.write(bytes);
    }

    pub const fn finish(self) -> u64 {
        self.0
    }

    /// The digest as 16 lower-case hex digits.
    pub fn hex(self) -> String {
        format!("{:016x}", self.0)
    }

    /// FNV-1a of `bytes`.
    pub fn of(bytes: &[u8]) -> u64 {
        let mut h = Self::new();
        h.write(bytes);
        h.finish()
    }
}

/// A fast in-process hash of `tag` and `bytes` (see the module docs: never
/// stored). The seed is fixed, so equal input hashes equal in every part of
/// the process.
#[inline]
pub fn fast_hash(tag: u8, bytes: &[u8]) -> u64 {
    let mut h = foldhash::quality::FixedState::with_seed(0x5115_7ea4).build_hasher();
    h.write_u8(tag);
    h.write(bytes);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        assert_eq!(Fnv1a::of(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(Fnv1a::of(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(Fnv1a::of(b"foobar"), 0x8594_4171_f739_67e8);
        let mut framed = Fnv1a::new();
        framed.write_framed(b"a");
        let mut by_hand = Fnv1a::new();
        by_hand.write(&[1, 0, 0, 0, 0, 0, 0, 0, b'a']);
        assert_eq!(framed.hex(), by_hand.hex());
    }
}
