//! Greedy k-center coreset selection (Sener & Savarese; PatchCore's "approximate greedy
//! coreset" is this on a random projection of the patches).
//!
//! [`greedy_coreset`] returns exactly the points the textbook algorithm
//! ([`greedy_coreset_bruteforce`]) returns — same order, same ties — but does far less work:
//! points are grouped by their nearest centre, and by the triangle inequality a new centre `c`
//! can only capture a point `x` of cluster `j` if `d(c_j, c) < 2·d(x, c_j)`. Whole clusters are
//! skipped when `d(c_j, c) ≥ 2·radius_j`, and only the points of the remaining clusters are
//! visited, in parallel. Memory is `O(N)` (never `N × N`).

use rayon::prelude::*;

/// Euclidean distance; eight independent accumulators so the loop vectorises, and the *same*
/// function everywhere so the fast and the brute-force selection see identical values.
#[inline]
pub fn dist(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            let d = x[l] - y[l];
            acc[l] += d * d;
        }
    }
    let mut s = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += (x - y) * (x - y);
    }
    let t = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    (t + s).sqrt()
}

/// The textbook greedy k-center on `points` (`n × dim`, row-major): start at `first`, then
/// repeatedly take the point farthest from its nearest centre (lowest index on ties).
/// `O(n·k)` distance evaluations; the reference for tests.
pub fn greedy_coreset_bruteforce(points: &[f32], dim: usize, k: usize, first: usize) -> Vec<usize> {
    let n = points.len() / dim;
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let row = |i: usize| &points[i * dim..(i + 1) * dim];
    let mut min_d: Vec<f32> = (0..n).map(|i| dist(row(i), row(first))).collect();
    let mut out = vec![first];
    while out.len() < k {
        let mut best = 0;
        for i in 1..n {
            if min_d[i] > min_d[best] {
                best = i;
            }
        }
        out.push(best);
        let c = row(best);
        for (i, m) in min_d.iter_mut().enumerate() {
            let d = dist(row(i), c);
            if d < *m {
                *m = d;
            }
        }
    }
    out
}

struct Cluster {
    center: u32,
    /// (point, distance to this centre), the points whose nearest centre this is.
    members: Vec<(u32, f32)>,
    radius: f32,
    far: u32,
}

impl Cluster {
    fn refresh(&mut self) {
        let (mut r, mut f) = (f32::NEG_INFINITY, u32::MAX);
        for &(i, d) in &self.members {
            if d > r || (d == r && i < f) {
                r = d;
                f = i;
            }
        }
        self.radius = r;
        self.far = f;
    }
}

/// Margin on the triangle-inequality tests so that float rounding can never skip a point the
/// brute-force algorithm would update.
const SAFETY: f32 = 1.0 + 1e-4;

/// Greedy k-center, identical in result to [`greedy_coreset_bruteforce`], with cluster pruning
/// and all cores. `progress` is called with the number of centres chosen so far.
pub fn greedy_coreset(
    points: &[f32],
    dim: usize,
    k: usize,
    first: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Vec<usize> {
    let n = points.len() / dim;
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let row = |i: usize| &points[i * dim..(i + 1) * dim];
    let c0 = row(first);
    let members: Vec<(u32, f32)> = (0..n)
        .into_par_iter()
        .map(|i| (i as u32, dist(row(i), c0)))
        .collect();
    let mut clusters = vec![Cluster {
        center: first as u32,
        members,
        radius: 0.0,
        far: 0,
    }];
    clusters[0].refresh();
    let mut out = vec![first];
    let mut center_d: Vec<f32> = Vec::with_capacity(k);
    while out.len() < k {
        // The farthest point overall: the farthest of the cluster with the largest radius
        // (lowest point index on ties, as the brute force).
        let best = clusters
            .iter()
            .fold((f32::NEG_INFINITY, u32::MAX), |(r, f), c| {
                if c.radius > r || (c.radius == r && c.far < f) {
                    (c.radius, c.far)
                } else {
                    (r, f)
                }
            })
            .1 as usize;
        out.push(best);
        let c = row(best);
        center_d.clear();
        center_d.par_extend(
            clusters
                .par_iter()
                .map(|cl| dist(row(cl.center as usize), c)),
        );
        let moved: Vec<Vec<(u32, f32)>> = clusters
            .par_iter_mut()
            .zip(center_d.par_iter())
            .filter(|(cl, &dc)| dc < 2.0 * cl.radius * SAFETY)
            .map(|(cl, &dc)| {
                let mut taken = Vec::new();
                cl.members.retain_mut(|(i, d)| {
                    if dc >= 2.0 * *d * SAFETY {
                        return true;
                    }
                    let nd = dist(row(*i as usize), c);
                    if nd < *d {
                        taken.push((*i, nd));
                        false
                    } else {
                        true
                    }
                });
                if !taken.is_empty() {
                    cl.refresh();
                }
                taken
            })
            .collect();
        let mut new = Cluster {
            center: best as u32,
            members: moved.concat(),
            radius: 0.0,
            far: 0,
        };
        new.refresh();
        clusters.push(new);
        clusters.retain(|cl| !cl.members.is_empty() || cl.center as usize == best);
        progress(out.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        // Clustered data, like patch features: a few blobs plus noise.
        let centres: Vec<f32> = (0..8 * dim).map(|_| rng.random_range(-5.0..5.0)).collect();
        (0..n)
            .flat_map(|i| {
                let c = i % 8;
                (0..dim)
                    .map(|d| centres[c * dim + d] + rng.random_range(-1.0f32..1.0))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn fast_equals_bruteforce() {
        for (n, dim, k, seed) in [
            (500, 16, 60, 1),
            (1000, 13, 200, 2),
            (300, 128, 300, 3),
            (50, 4, 10, 4),
        ] {
            let p = random(n, dim, seed);
            let first = (seed as usize * 37) % n;
            let a = greedy_coreset_bruteforce(&p, dim, k, first);
            let b = greedy_coreset(&p, dim, k, first, &|_| {});
            assert_eq!(a, b, "n={n} dim={dim} k={k}");
        }
    }

    #[test]
    fn duplicates_and_small_k() {
        // Many identical points: ties everywhere.
        let p: Vec<f32> = (0..40).flat_map(|i| vec![(i % 4) as f32, 0.0]).collect();
        let a = greedy_coreset_bruteforce(&p, 2, 10, 5);
        let b = greedy_coreset(&p, 2, 10, 5, &|_| {});
        assert_eq!(a, b);
        assert_eq!(greedy_coreset(&p, 2, 0, 0, &|_| {}), Vec::<usize>::new());
        assert_eq!(greedy_coreset(&p, 2, 1, 3, &|_| {}), vec![3]);
    }

    #[test]
    fn dist_is_euclidean() {
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..19).map(|i| (i * 2) as f32).collect();
        let want: f32 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>()
            .sqrt();
        assert!((dist(&a, &b) - want).abs() < 1e-4);
    }
}
