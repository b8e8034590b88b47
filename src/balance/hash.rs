//! A small, fixed 64-bit hash: the same bytes give the same value in every process, on every
//! machine and with every Rust version, which Maglev tables and client affinity depend on
//! (std's hashers promise none of that). FNV-1a over the bytes, seeded, then MurmurHash3's
//! 64-bit finaliser so that nearby inputs land far apart.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Seeds for the two Maglev permutation hashes and for client keys. Changing one changes
/// every table: the golden test in `maglev` pins them.
pub const SEED_OFFSET: u64 = 0x9e37_79b9_7f4a_7c15;
pub const SEED_SKIP: u64 = 0xc2b2_ae3d_27d4_eb4f;
pub const SEED_KEY: u64 = 0x1656_67b1_9e37_79f9;

#[inline]
pub fn hash64(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    fmix64(h)
}

#[inline]
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_values() {
        // Part of ringlb's behaviour: clients map to backends through these. Computed by this
        // implementation when it was fixed (2026-11-29); a change moves clients on upgrade.
        assert_eq!(hash64(0, b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(hash64(SEED_OFFSET, b"10.0.0.1:5432"), 0x5068_f01d_b65f_d20a);
        assert_eq!(hash64(SEED_KEY, &[127, 0, 0, 1]), 0xe13f_e9f9_bd7f_9574);
        assert_ne!(hash64(SEED_OFFSET, b"a"), hash64(SEED_SKIP, b"a"));
    }
}
