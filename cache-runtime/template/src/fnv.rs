//! FNV-1a, 64 bits: a hash that is stable across builds, platforms and Rust versions.
//!
//! It names templates at the type level (`TemplateId<HASH>`, computed by the macros) and fingerprints the
//! registry whose triggers a database has installed. Both are compared across builds, so the function must never
//! change: a different value means every installed database has to re-install its triggers.

/// The FNV-1a 64 hash of `bytes`.
///
/// # Examples
///
/// ```
/// assert_eq!(cache_template::fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
/// assert_eq!(cache_template::fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
/// ```
pub const fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET_BASIS;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(PRIME);
        i += 1;
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::fnv1a64;

    #[test]
    fn published_test_vectors() {
        // From the FNV reference test suite (http://www.isthe.com/chongo/tech/comp/fnv/).
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn usable_in_const_context() {
        const HASH: u64 = fnv1a64(b"a");
        assert_eq!(HASH, fnv1a64("a".as_bytes()));
    }
}
