//! Seeds and value-stable random draws.
//!
//! Every draw is built directly on ChaCha8's raw output (whose stream is fixed by its spec), not
//! on `rand`'s distribution helpers, whose algorithms may change between `rand` releases: the
//! same (image, seed, config) must give the same bytes across dependency updates.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// SplitMix64's finaliser: a bijective 64-bit mix.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed of image `index` in a run with seed `base`. It depends only on `(base, index)`, so
/// images can be generated in any order, on any number of threads, with identical results.
pub fn image_seed(base: u64, index: u64) -> u64 {
    splitmix64(base ^ splitmix64(index))
}

/// Independent streams per stage, so that e.g. one more mask redraw does not shift the draws of
/// the source, blend factor or warp.
pub(crate) const STAGE_MASK: u64 = 1;
pub(crate) const STAGE_SOURCE: u64 = 2;
pub(crate) const STAGE_BETA: u64 = 3;
pub(crate) const STAGE_DEFORM: u64 = 4;

/// A ChaCha8 stream with the few draws synthesis needs.
pub(crate) struct Draw(ChaCha8Rng);

impl Draw {
    pub(crate) fn new(seed: u64, stage: u64) -> Self {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        r.set_stream(stage);
        Draw(r)
    }

    /// Uniform in [0, 1), 24 bits (every value exact in f32).
    pub(crate) fn unit(&mut self) -> f32 {
        (self.0.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0)
    }

    /// Uniform in [lo, hi); `lo` when the range is empty.
    pub(crate) fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform integer in `0..n` (`n > 0`): multiply-shift, bias below n / 2^64.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0);
        ((self.0.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// True with probability `p`.
    pub(crate) fn chance(&mut self, p: f32) -> bool {
        self.unit() < p
    }

    /// `k` distinct indices of `0..n`, in random order (partial Fisher–Yates).
    pub(crate) fn pick_distinct(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..n).collect();
        let k = k.min(n);
        for i in 0..k {
            let j = i + self.below(n - i);
            idx.swap(i, j);
        }
        idx.truncate(k);
        idx
    }

    /// A uniformly random permutation of `0..n` (Fisher–Yates).
    pub(crate) fn permutation(&mut self, n: usize) -> Vec<usize> {
        self.pick_distinct(n, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_distinct_and_stable() {
        let a: Vec<u64> = (0..1000).map(|i| image_seed(7, i)).collect();
        let mut s = a.clone();
        s.sort_unstable();
        s.dedup();
        assert_eq!(s.len(), a.len());
        assert_ne!(image_seed(7, 0), image_seed(8, 0));
        // Pinned: a change here silently changes every generated data set.
        assert_eq!(image_seed(0, 0), splitmix64(splitmix64(0)));
    }

    #[test]
    fn draws_in_range_and_permutations_valid() {
        let mut d = Draw::new(1, STAGE_MASK);
        for _ in 0..1000 {
            let u = d.unit();
            assert!((0.0..1.0).contains(&u));
            assert!(d.below(5) < 5);
        }
        let mut p = d.permutation(64);
        p.sort_unstable();
        assert_eq!(p, (0..64).collect::<Vec<_>>());
        assert_eq!(Draw::new(1, 2).unit(), Draw::new(1, 2).unit());
        assert_ne!(Draw::new(1, 2).unit(), Draw::new(1, 3).unit());
    }
}
