//! The jigsaw permutation set: class 0 is the identity, classes 1..=P are permutations of the
//! n×n tiles chosen greedily for maximal Hamming distance (Noroozi & Favaro, 2016).

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tessera_core::{Error, Result};

/// Above this many tiles' permutations, candidates are sampled instead of enumerated.
const MAX_ENUMERATED: usize = 400_000;
/// How many random candidates to draw when the full set is too large (n ≥ 4).
const SAMPLED_CANDIDATES: usize = 100_000;

/// Class 0 = identity, then `P` permutations; `perm[i]` is the source tile shown at position `i`
/// (tiles numbered row-major).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermutationSet {
    grid: usize,
    perms: Vec<Vec<u8>>,
}

fn hamming(a: &[u8], b: &[u8]) -> u8 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as u8
}

fn next_permutation(p: &mut [u8]) -> bool {
    let n = p.len();
    if n < 2 {
        return false;
    }
    let mut i = n - 1;
    while i > 0 && p[i - 1] >= p[i] {
        i -= 1;
    }
    if i == 0 {
        return false;
    }
    let mut j = n - 1;
    while p[j] <= p[i - 1] {
        j -= 1;
    }
    p.swap(i - 1, j);
    p[i..].reverse();
    true
}

impl PermutationSet {
    /// Choose `count` permutations of the `grid × grid` tiles, greedily maximising the minimum
    /// Hamming distance to the identity and to every permutation chosen before (ties: the larger
    /// summed distance, then a seeded order). Deterministic from `seed`.
    pub fn maximal_hamming(grid: usize, count: usize, seed: u64) -> Result<Self> {
        if !(2..=8).contains(&grid) {
            return Err(Error::Config(format!(
                "jigsaw grid must be 2..=8 tiles per side, got {grid}"
            )));
        }
        let tiles = grid * grid;
        let total: Option<usize> = (1..=tiles).try_fold(1usize, |acc, k| acc.checked_mul(k));
        let available = total.map(|t| t - 1);
        if count == 0 || available.is_some_and(|a| count > a) {
            return Err(Error::Config(format!(
                "cannot choose {count} non-identity permutations of a {grid}×{grid} grid (1..={} possible)",
                available.unwrap_or(usize::MAX)
            )));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let identity: Vec<u8> = (0..tiles as u8).collect();
        let mut cands: Vec<Vec<u8>> = match total {
            Some(t) if t <= MAX_ENUMERATED => {
                let mut all = Vec::with_capacity(t - 1);
                let mut p = identity.clone();
                while next_permutation(&mut p) {
                    all.push(p.clone());
                }
                all
            }
            _ => {
                let mut seen = std::collections::HashSet::new();
                let mut v = Vec::with_capacity(SAMPLED_CANDIDATES);
                while v.len() < SAMPLED_CANDIDATES.max(count * 10) {
                    let mut p = identity.clone();
                    p.shuffle(&mut rng);
                    if p != identity && seen.insert(p.clone()) {
                        v.push(p);
                    }
                }
                v
            }
        };
        cands.shuffle(&mut rng);
        let mut min_d: Vec<u8> = cands.iter().map(|c| hamming(c, &identity)).collect();
        let mut sum_d: Vec<u32> = min_d.iter().map(|&d| d as u32).collect();
        let mut taken = vec![false; cands.len()];
        let mut perms = vec![identity];
        // A random first pick, as Noroozi & Favaro: otherwise every seed gives the same set.
        let mut pick = rng.random_range(0..cands.len());
        loop {
            taken[pick] = true;
            perms.push(cands[pick].clone());
            if perms.len() == count + 1 {
                break;
            }
            let chosen = &cands[pick];
            let mut best: Option<usize> = None;
            for k in 0..cands.len() {
                if taken[k] {
                    continue;
                }
                let d = hamming(&cands[k], chosen);
                min_d[k] = min_d[k].min(d);
                sum_d[k] += d as u32;
                let better = match best {
                    None => true,
                    Some(b) => (min_d[k], sum_d[k]) > (min_d[b], sum_d[b]),
                };
                if better {
                    best = Some(k);
                }
            }
            pick = best.expect("count was checked against the number of candidates");
        }
        Ok(Self { grid, perms })
    }

    /// Rebuild from stored permutations (class 0 must be the identity).
    pub fn from_perms(grid: usize, perms: Vec<Vec<u8>>) -> Result<Self> {
        let tiles = grid * grid;
        let ok = !perms.is_empty()
            && perms[0].iter().enumerate().all(|(i, &p)| p as usize == i)
            && perms.iter().all(|p| {
                let mut s = p.clone();
                s.sort_unstable();
                p.len() == tiles && s.iter().enumerate().all(|(i, &v)| v as usize == i)
            });
        if !ok {
            return Err(Error::Config(format!(
                "not a valid permutation set for a {grid}×{grid} grid (class 0 must be the identity)"
            )));
        }
        Ok(Self { grid, perms })
    }

    /// Tiles per side.
    pub fn grid(&self) -> usize {
        self.grid
    }
    /// Number of classes (identity included).
    pub fn classes(&self) -> usize {
        self.perms.len()
    }
    /// Permutation of class `c`.
    pub fn perm(&self, c: usize) -> &[u8] {
        &self.perms[c]
    }
    /// All permutations, identity first.
    pub fn perms(&self) -> &[Vec<u8>] {
        &self.perms
    }
    /// The smallest Hamming distance between two classes (identity included).
    pub fn min_distance(&self) -> usize {
        let mut m = usize::MAX;
        for i in 0..self.perms.len() {
            for j in i + 1..self.perms.len() {
                m = m.min(hamming(&self.perms[i], &self.perms[j]) as usize);
            }
        }
        m
    }
}
