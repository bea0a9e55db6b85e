//! xorshift64*: a tiny deterministic RNG for the bounded fuzz tests, so a
//! failure reproduces from its seed and no dependency is needed.

pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// An index into a slice of `len` elements (0 when len is 0).
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }
}

/// The seed of a fuzz test: `FUZZ_SEED` when set (to replay a failure),
/// else the test's fixed one; printed either way.
pub fn fuzz_seed(fixed: u64) -> u64 {
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(fixed);
    eprintln!("fuzz seed {seed} (FUZZ_SEED={seed} replays it)");
    seed
}
