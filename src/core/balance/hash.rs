//! The one hash every peer uses: xxHash64 with fixed seeds, never `RandomState`.
//!
//! Tables and keys must hash identically on every peer and across restarts, so the seeds are
//! constants and golden vectors in the tests pin them.

use std::hash::Hasher;

use twox_hash::XxHash64;

/// Seed for request hash keys.
pub const KEY_SEED: u64 = 0x0051_40A1_0000_0001;
/// Seeds for Maglev's offset and skip permutations.
pub const MAGLEV_OFFSET_SEED: u64 = 0x0051_40A1_0000_0002;
pub const MAGLEV_SKIP_SEED: u64 = 0x0051_40A1_0000_0003;
/// Seed for ketama ring points.
pub const RING_SEED: u64 = 0x0051_40A1_0000_0004;
/// Seed for the rendezvous hash that assigns each backend its probers (`health.probers`).
pub const PROBER_SEED: u64 = 0x0051_40A1_0000_0005;

/// xxHash64 of `bytes` under `seed`.
pub fn hash_bytes(bytes: &[u8], seed: u64) -> u64 {
    let mut h = XxHash64::with_seed(seed);
    h.write(bytes);
    h.finish()
}

/// Hash of a request key (header value, cookie, path, client address...).
pub fn hash_key(bytes: &[u8]) -> u64 {
    hash_bytes(bytes, KEY_SEED)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOLDEN_USER_42: u64 = 16_964_933_928_561_069_176;

    /// Golden values: changing them remaps every key in every deployed cluster.
    #[test]
    fn golden() {
        assert_eq!(hash_bytes(b"", 0), 0xef46db3751d8e999);
        assert_eq!(hash_key(b"user-42"), GOLDEN_USER_42);
        assert_ne!(hash_key(b"user-42"), hash_key(b"user-43"));
    }
}
