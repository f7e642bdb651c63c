//! Nearest-neighbour search over a memory bank partitioned into clusters: exact with
//! triangle-inequality pruning, or approximate (visit only the nearest clusters).
//!
//! The bank is split once into `C` clusters (farthest-point seeds refined by a few Lloyd steps;
//! deterministic, no random choice), its rows stored cluster by cluster with each cluster's
//! centre `c` and radius `r = max ‖b − c‖`. A query `q` cannot have its nearest neighbour in a
//! cluster when `‖q − c‖ − r` exceeds the best distance already found (triangle inequality), so:
//!
//! 1. `‖q − c‖` for every query and centre (one small matrix product);
//! 2. every query searches its nearest cluster(s) first, giving an upper bound `u_q`;
//! 3. every other cluster is searched by exactly the queries it might still beat, `‖q − c‖ − r ≤
//!    u_q` (with a margin for f32 rounding). Each cluster meets its queries in one matrix product,
//!    clusters run in parallel.
//!
//! The result is the brute-force result: same nearest distances (up to f32 rounding of the dot
//! products) and indices (ties to the lowest bank index). [`Search::Approximate`] stops after step
//! 2 with `probes` clusters per query — faster, and not exact; its recall is measured, not assumed.

use faer::{linalg::matmul::matmul, Accum, MatMut, MatRef, Par};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tessera_core::{Error, Result};

/// How the nearest bank row of each test patch is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Search {
    /// Every bank row, chunk by chunk (the reference; the only path off the CPU).
    Brute,
    /// The partitioned bank with pruning: the brute-force answer, less work.
    #[default]
    Exact,
    /// The `probes` nearest clusters of each query only (an inverted-file search): not exact.
    Approximate { probes: usize },
}

impl Search {
    /// The forms accepted on the command line.
    pub const HELP: &'static str = "brute, exact or approx:P (P nearest clusters)";
}

impl std::fmt::Display for Search {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Search::Brute => f.write_str("brute"),
            Search::Exact => f.write_str("exact"),
            Search::Approximate { probes } => write!(f, "approx:{probes}"),
        }
    }
}

impl std::str::FromStr for Search {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "brute" => return Ok(Search::Brute),
            "exact" => return Ok(Search::Exact),
            _ => {}
        }
        if let Some(p) = t.strip_prefix("approx:") {
            if let Ok(probes) = p.parse::<usize>() {
                if probes >= 1 {
                    return Ok(Search::Approximate { probes });
                }
            }
        }
        Err(Error::Config(format!(
            "patchcore search '{s}': expected {}",
            Self::HELP
        )))
    }
}

/// Default number of clusters for a bank of `k` rows: about `√k`, so a cluster and the list of
/// centres cost about the same to scan.
pub fn default_clusters(k: usize) -> usize {
    ((k as f64).sqrt().round() as usize).clamp(1, k.max(1))
}

/// Lloyd refinement steps after the farthest-point seeds.
const LLOYD_STEPS: usize = 3;
/// Queries per matrix product (bounds the scratch memory of one cluster's product).
const QUERY_BLOCK: usize = 1024;

/// A memory bank stored cluster by cluster.
#[derive(Debug, Clone)]
pub struct PartitionedBank {
    dim: usize,
    /// Bank rows, cluster by cluster (`K × dim`, f32).
    rows: Vec<f32>,
    /// Original bank index of each stored row.
    ids: Vec<u32>,
    /// Squared norm of each stored row.
    sq: Vec<f32>,
    /// Cluster `j` is stored rows `offsets[j] .. offsets[j + 1]`.
    offsets: Vec<usize>,
    /// Centres (`C × dim`) and their squared norms.
    centres: Vec<f32>,
    centre_sq: Vec<f32>,
    /// `max ‖b − c‖` over each cluster's rows.
    radius: Vec<f32>,
    /// Largest squared row norm (scales the rounding margin of the bounds).
    max_sq: f32,
}

/// Work done by one search, for reports and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SearchStats {
    /// Query × bank-row distances computed.
    pub pairs: u64,
    /// Query × bank-row distances brute force computes.
    pub brute_pairs: u64,
}

impl SearchStats {
    /// Share of brute force's distance computations that were done.
    pub fn fraction(&self) -> f64 {
        if self.brute_pairs == 0 {
            0.0
        } else {
            self.pairs as f64 / self.brute_pairs as f64
        }
    }
}

/// Dot product in eight independent lanes, so the compiler can vectorise it (a plain f32
/// `sum()` must keep its order and stays scalar).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Fold one query's row of dot products with the rows `bsq`/`bids` into its running best
/// (`‖b‖² − 2q·b`, original index; ties to the lower index).
fn fold_min(best: &mut (f32, u32), dots: &[f32], bsq: &[f32], bids: &[u32]) {
    for ((&dv, &bs), &id) in dots.iter().zip(bsq).zip(bids) {
        let v = bs - 2.0 * dv;
        if v < best.0 || (v == best.0 && id < best.1) {
            *best = (v, id);
        }
    }
}

/// `out (m × n) = a (m × d) · b (n × d)ᵀ`, row-major slices.
fn gemm_nt(out: &mut [f32], a: &[f32], b: &[f32], m: usize, n: usize, d: usize, par: Par) {
    let a = MatRef::from_row_major_slice(a, m, d);
    let b = MatRef::from_row_major_slice(b, n, d);
    let dst = MatMut::from_row_major_slice_mut(out, m, n);
    matmul(dst, Accum::Replace, a, b.transpose(), 1.0f32, par);
}

impl PartitionedBank {
    /// Partition `rows` (`K × dim`, row-major) into at most `clusters` clusters.
    pub fn build(rows: &[f32], dim: usize, clusters: usize) -> Result<Self> {
        if dim == 0 || rows.is_empty() || !rows.len().is_multiple_of(dim) {
            return Err(Error::Config(format!(
                "patchcore search: a bank of {} values is not a non-empty set of {dim}-d rows",
                rows.len()
            )));
        }
        if rows.iter().any(|v| !v.is_finite()) {
            return Err(Error::Config(
                "patchcore search: the memory bank holds a non-finite value".into(),
            ));
        }
        let k = rows.len() / dim;
        let c = clusters.clamp(1, k);
        let row = |i: usize| &rows[i * dim..(i + 1) * dim];

        // Farthest-point seeds, starting from row 0 (deterministic; in a fitted bank row 0 is
        // the seeded first coreset centre).
        let mut seeds = vec![0usize];
        let mut near = vec![f32::INFINITY; k];
        let mut assign = vec![0usize; k];
        while seeds.len() <= c {
            let s = *seeds.last().expect("one seed");
            let sv = row(s);
            let j = seeds.len() - 1;
            near.par_iter_mut()
                .zip(assign.par_iter_mut())
                .enumerate()
                .for_each(|(i, (n, a))| {
                    let d = crate::coreset::dist(&rows[i * dim..(i + 1) * dim], sv);
                    if d < *n {
                        *n = d;
                        *a = j;
                    }
                });
            if seeds.len() == c {
                break;
            }
            let (far, &fd) = near
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
                .expect("k ≥ 1");
            if fd <= 0.0 {
                break; // every row already coincides with a seed
            }
            seeds.push(far);
        }
        let mut centres: Vec<f32> = seeds.iter().flat_map(|&s| row(s).to_vec()).collect();
        let mut nc = seeds.len();

        // Lloyd steps: centres to their members' means, rows to the nearest centre.
        for _ in 0..LLOYD_STEPS {
            let mut sums = vec![0f64; nc * dim];
            let mut counts = vec![0usize; nc];
            for (i, &a) in assign.iter().enumerate() {
                counts[a] += 1;
                sums[a * dim..(a + 1) * dim]
                    .iter_mut()
                    .zip(row(i))
                    .for_each(|(s, &v)| *s += v as f64);
            }
            // Empty clusters are dropped.
            let kept: Vec<usize> = (0..nc).filter(|&j| counts[j] > 0).collect();
            centres = kept
                .iter()
                .flat_map(|&j| {
                    let n = counts[j] as f64;
                    sums[j * dim..(j + 1) * dim]
                        .iter()
                        .map(move |&s| (s / n) as f32)
                })
                .collect();
            nc = kept.len();
            assign = nearest_centre(rows, &centres, dim);
        }

        // Store the rows cluster by cluster (stable: bank order inside a cluster).
        let mut counts = vec![0usize; nc];
        assign.iter().for_each(|&a| counts[a] += 1);
        let mut offsets = vec![0usize; nc + 1];
        for j in 0..nc {
            offsets[j + 1] = offsets[j] + counts[j];
        }
        let mut fill = offsets.clone();
        let mut ids = vec![0u32; k];
        for (i, &a) in assign.iter().enumerate() {
            ids[fill[a]] = i as u32;
            fill[a] += 1;
        }
        let mut stored = vec![0f32; k * dim];
        stored
            .par_chunks_mut(dim)
            .zip(ids.par_iter())
            .for_each(|(dst, &i)| dst.copy_from_slice(row(i as usize)));
        let sq: Vec<f32> = stored.par_chunks(dim).map(|r| dot(r, r)).collect();
        // Radii measured directly (no cancellation), in f64, rounded up.
        let radius: Vec<f32> = (0..nc)
            .into_par_iter()
            .map(|j| {
                let cv = &centres[j * dim..(j + 1) * dim];
                let r2 = stored[offsets[j] * dim..offsets[j + 1] * dim]
                    .chunks(dim)
                    .map(|r| {
                        r.iter()
                            .zip(cv)
                            .map(|(&x, &y)| {
                                let d = x as f64 - y as f64;
                                d * d
                            })
                            .sum::<f64>()
                    })
                    .fold(0f64, f64::max);
                (r2.sqrt() * (1.0 + 1e-6)) as f32
            })
            .collect();
        let centre_sq = centres.chunks(dim).map(|r| dot(r, r)).collect();
        let max_sq = sq.iter().copied().fold(0f32, f32::max);
        Ok(Self {
            dim,
            rows: stored,
            ids,
            sq,
            offsets,
            centres,
            centre_sq,
            radius,
            max_sq,
        })
    }

    /// Number of clusters.
    pub fn clusters(&self) -> usize {
        self.radius.len()
    }

    /// Number of bank rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Always false: a partition holds at least one row.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Row dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Bytes held (the f32 copy of the bank, its bookkeeping and the centres).
    pub fn bytes(&self) -> usize {
        4 * (self.rows.len() + self.ids.len() + self.sq.len() + self.centres.len())
            + 8 * self.offsets.len()
            + 8 * self.radius.len()
    }

    /// For each query row (`queries`: `M × dim`, row-major), the distance to its nearest bank row
    /// and that row's index in the original bank. `search` must not be [`Search::Brute`] (that
    /// path needs no partition: [`crate::nn::nearest`]).
    pub fn nearest(
        &self,
        queries: &[f32],
        search: Search,
    ) -> Result<(Vec<f32>, Vec<u32>, SearchStats)> {
        let d = self.dim;
        if !queries.len().is_multiple_of(d) {
            return Err(Error::Config(format!(
                "patchcore search: {} query values are not {d}-d rows",
                queries.len()
            )));
        }
        let m = queries.len() / d;
        let nc = self.clusters();
        let first_probes = match search {
            Search::Brute => {
                return Err(Error::Config(
                    "patchcore search: brute force does not use the partition".into(),
                ))
            }
            Search::Exact => 1,
            Search::Approximate { probes } => probes.clamp(1, nc),
        };
        let q_sq: Vec<f32> = queries.par_chunks(d).map(|r| dot(r, r)).collect();

        // Query-to-centre distances, lower bounds after a rounding margin (the f32 expansion
        // ‖q‖² + ‖c‖² − 2q·c loses up to ~ε·(‖q‖² + ‖c‖²) per term).
        let mut g = vec![0f32; m * nc];
        gemm_nt(&mut g, queries, &self.centres, m, nc, d, Par::rayon(0));
        let centre_dist: Vec<f32> = g
            .par_chunks(nc)
            .zip(q_sq.par_iter())
            .flat_map_iter(|(gr, &qs)| {
                gr.iter().zip(&self.centre_sq).map(move |(&gv, &cs)| {
                    let scale = qs + cs;
                    (qs + cs - 2.0 * gv - MARGIN * scale).max(0.0).sqrt()
                })
            })
            .collect();
        drop(g);

        // Clusters in order of distance to each query. Approximate: the first `probes` only.
        // Exact: in waves (the nearest, then the next three, then the rest), each cluster
        // searched only when its bound `‖q − c‖ − r` does not exceed the best distance so far,
        // which tightens after every wave.
        let order: Vec<u32> = (0..m)
            .into_par_iter()
            .flat_map_iter(|qi| {
                let row = &centre_dist[qi * nc..(qi + 1) * nc];
                let mut idx: Vec<u32> = (0..nc as u32).collect();
                idx.sort_unstable_by(|a, b| {
                    row[*a as usize].total_cmp(&row[*b as usize]).then(a.cmp(b))
                });
                idx
            })
            .collect();
        let waves: Vec<(usize, usize)> = match search {
            Search::Exact => [(0, 1), (1, 4), (4, nc)]
                .into_iter()
                .map(|(a, b)| (a.min(nc), b.min(nc)))
                .filter(|(a, b)| a < b)
                .collect(),
            _ => vec![(0, first_probes)],
        };
        let mut best = vec![(f32::INFINITY, u32::MAX); m];
        let mut lists: Vec<Vec<u32>> = vec![Vec::new(); nc];
        let mut stats = SearchStats {
            pairs: 0,
            brute_pairs: (m * self.len()) as u64,
        };
        // The clusters ranked `from..to` that might still hold a nearer row, per cluster.
        let candidates =
            |from: usize, to: usize, best: &[(f32, u32)], lists: &mut Vec<Vec<u32>>| {
                lists.iter_mut().for_each(|l| l.clear());
                let mut pairs = 0usize;
                for qi in 0..m {
                    let (v, _) = best[qi];
                    let u2 = (v + q_sq[qi]).max(0.0) + MARGIN * (q_sq[qi] + self.max_sq);
                    let u = u2.sqrt();
                    let row = &centre_dist[qi * nc..(qi + 1) * nc];
                    for &j in &order[qi * nc + from..qi * nc + to] {
                        let j = j as usize;
                        if row[j] - self.radius[j] <= u {
                            lists[j].push(qi as u32);
                            pairs += self.offsets[j + 1] - self.offsets[j];
                        }
                    }
                }
                pairs
            };
        for (wave, &(from, to)) in waves.iter().enumerate() {
            if wave == 0 {
                lists.iter_mut().for_each(|l| l.clear());
                for qi in 0..m {
                    for &j in &order[qi * nc + from..qi * nc + to] {
                        lists[j as usize].push(qi as u32);
                    }
                }
            } else {
                if wave == 1 {
                    // When the bounds prune little (features without cluster structure), the
                    // scattered products cost more than one pass over the whole bank.
                    let rest = candidates(from, nc, &best, &mut lists);
                    if rest as f64 > BRUTE_SHARE * stats.brute_pairs as f64 {
                        stats.pairs += self.search_all(queries, &mut best);
                        break;
                    }
                }
                candidates(from, to, &best, &mut lists);
            }
            stats.pairs += self.search_lists(queries, &lists, &mut best);
        }
        let dist = best
            .iter()
            .zip(&q_sq)
            .map(|(&(v, _), &qs)| (v + qs).max(0.0).sqrt())
            .collect();
        let idx = best.into_iter().map(|(_, i)| i).collect();
        Ok((dist, idx, stats))
    }

    /// Every query against every row: blocks of queries × blocks of rows, each product
    /// parallel, then one parallel pass that keeps each query's minimum; merged into `best` as
    /// [`Self::search_lists`]. Returns the pairs computed.
    fn search_all(&self, queries: &[f32], best: &mut [(f32, u32)]) -> u64 {
        const RB: usize = 4096;
        let d = self.dim;
        let k = self.len();
        let mut out = Vec::new();
        for (bq, qrows) in best
            .chunks_mut(QUERY_BLOCK)
            .zip(queries.chunks(QUERY_BLOCK * d))
        {
            let mq = bq.len();
            for s in (0..k).step_by(RB) {
                let n = RB.min(k - s);
                out.resize(mq * n, 0.0);
                gemm_nt(
                    &mut out,
                    qrows,
                    &self.rows[s * d..(s + n) * d],
                    mq,
                    n,
                    d,
                    Par::rayon(0),
                );
                let (bsq, bids) = (&self.sq[s..s + n], &self.ids[s..s + n]);
                bq.par_iter_mut()
                    .zip(out.par_chunks(n))
                    .for_each(|(b, o)| fold_min(b, o, bsq, bids));
            }
        }
        (best.len() * k) as u64
    }

    /// Search cluster `j` for the queries in `lists[j]`, every cluster, and merge into `best`
    /// (`‖b‖² − 2q·b`, original index; ties to the lower index). Returns the pairs computed.
    fn search_lists(&self, queries: &[f32], lists: &[Vec<u32>], best: &mut [(f32, u32)]) -> u64 {
        let d = self.dim;
        let found: Vec<Vec<(u32, f32, u32)>> = lists
            .par_iter()
            .enumerate()
            .filter(|(_, l)| !l.is_empty())
            .map_init(
                || (Vec::<f32>::new(), Vec::<f32>::new()),
                |(qbuf, out), (j, list)| {
                    let (s, e) = (self.offsets[j], self.offsets[j + 1]);
                    let n = e - s;
                    let brows = &self.rows[s * d..e * d];
                    let bsq = &self.sq[s..e];
                    let bids = &self.ids[s..e];
                    let mut res = Vec::with_capacity(list.len());
                    for block in list.chunks(QUERY_BLOCK) {
                        let mq = block.len();
                        qbuf.clear();
                        for &qi in block {
                            qbuf.extend_from_slice(
                                &queries[qi as usize * d..(qi as usize + 1) * d],
                            );
                        }
                        out.resize(mq * n, 0.0);
                        gemm_nt(out, qbuf, brows, mq, n, d, Par::Seq);
                        for (r, &qi) in block.iter().enumerate() {
                            let mut b = (f32::INFINITY, u32::MAX);
                            fold_min(&mut b, &out[r * n..(r + 1) * n], bsq, bids);
                            res.push((qi, b.0, b.1));
                        }
                    }
                    res
                },
            )
            .collect();
        let mut pairs = 0u64;
        for (j, l) in lists.iter().enumerate() {
            pairs += (l.len() * (self.offsets[j + 1] - self.offsets[j])) as u64;
        }
        for (qi, v, i) in found.into_iter().flatten() {
            let b = &mut best[qi as usize];
            if v < b.0 || (v == b.0 && i < b.1) {
                *b = (v, i);
            }
        }
        pairs
    }
}

/// Above this share of brute force's distances, the exact search scans the whole bank instead.
const BRUTE_SHARE: f64 = 0.5;

/// Relative rounding margin of the f32 distance bounds (≈ 170 f32 ulps of the norms).
const MARGIN: f32 = 1e-5;

/// Index of the nearest centre for every row (ties to the lower centre).
fn nearest_centre(rows: &[f32], centres: &[f32], dim: usize) -> Vec<usize> {
    let k = rows.len() / dim;
    let nc = centres.len() / dim;
    let csq: Vec<f32> = centres.chunks(dim).map(|r| dot(r, r)).collect();
    let mut out = vec![0usize; k];
    const BLOCK: usize = 2048;
    let mut g = vec![0f32; BLOCK.min(k) * nc];
    for (bi, chunk) in rows.chunks(BLOCK * dim).enumerate() {
        let n = chunk.len() / dim;
        gemm_nt(&mut g[..n * nc], chunk, centres, n, nc, dim, Par::rayon(0));
        out[bi * BLOCK..bi * BLOCK + n]
            .par_iter_mut()
            .zip(g[..n * nc].par_chunks(nc))
            .for_each(|(o, gr)| {
                let mut best = (f32::INFINITY, 0usize);
                for (j, (&gv, &cs)) in gr.iter().zip(&csq).enumerate() {
                    let v = cs - 2.0 * gv;
                    if v < best.0 {
                        best = (v, j);
                    }
                }
                *o = best.1;
            });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn clustered(n: usize, dim: usize, groups: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let centres: Vec<f32> = (0..groups * dim)
            .map(|_| rng.random_range(-4.0..4.0))
            .collect();
        (0..n)
            .flat_map(|i| {
                let c = (i * 7919) % groups;
                (0..dim)
                    .map(|d| centres[c * dim + d] + rng.random_range(-1.0f32..1.0))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The textbook answer: every pair, in f64, ties to the lower index.
    fn reference(q: &[f32], bank: &[f32], dim: usize) -> Vec<(f64, u32)> {
        q.chunks(dim)
            .map(|qr| {
                let mut best = (f64::INFINITY, 0u32);
                for (i, br) in bank.chunks(dim).enumerate() {
                    let d: f64 = qr
                        .iter()
                        .zip(br)
                        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                        .sum();
                    if d < best.0 {
                        best = (d, i as u32);
                    }
                }
                (best.0.sqrt(), best.1)
            })
            .collect()
    }

    #[test]
    fn exact_equals_brute_force_and_prunes() {
        let dim = 24;
        let bank = clustered(3000, dim, 40, 1);
        let q = clustered(500, dim, 40, 2);
        let p = PartitionedBank::build(&bank, dim, default_clusters(3000)).unwrap();
        assert_eq!(p.len(), 3000);
        let (dist, idx, stats) = p.nearest(&q, Search::Exact).unwrap();
        let want = reference(&q, &bank, dim);
        for (qi, ((d, i), (wd, wi))) in dist.iter().zip(&idx).zip(&want).enumerate() {
            assert!(
                (*d as f64 - wd).abs() <= 1e-4 * (1.0 + wd),
                "query {qi}: {d} vs {wd}"
            );
            assert_eq!(i, wi, "query {qi}");
        }
        // Clustered data: most clusters are pruned.
        assert!(stats.fraction() < 0.5, "{stats:?}");
        assert_eq!(stats.brute_pairs, 500 * 3000);
    }

    #[test]
    fn exact_on_unclustered_data_and_odd_sizes() {
        // Uniform noise prunes little; the answer must still be exact. Sizes with remainders.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let dim = 7;
        let bank: Vec<f32> = (0..1001 * dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let q: Vec<f32> = (0..1500 * dim)
            .map(|_| rng.random_range(-1.2f32..1.2))
            .collect();
        for clusters in [1, 2, 31, 1001, 5000] {
            let p = PartitionedBank::build(&bank, dim, clusters).unwrap();
            let (dist, idx, _) = p.nearest(&q, Search::Exact).unwrap();
            let want = reference(&q, &bank, dim);
            for ((d, i), (wd, wi)) in dist.iter().zip(&idx).zip(&want) {
                assert!((*d as f64 - wd).abs() <= 1e-4 * (1.0 + wd));
                assert_eq!(i, wi, "clusters {clusters}");
            }
        }
    }

    #[test]
    fn exact_falls_back_to_one_pass_when_nothing_prunes() {
        // 64-d noise: every cluster overlaps every query's ball, the whole-bank pass runs
        // (more pairs than brute force: the first cluster is searched before the bound says
        // so) and the answer is still exact. Bank and query counts not multiples of the blocks.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let dim = 64;
        let bank: Vec<f32> = (0..2100 * dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let q: Vec<f32> = (0..130 * dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let p = PartitionedBank::build(&bank, dim, 46).unwrap();
        let (dist, idx, stats) = p.nearest(&q, Search::Exact).unwrap();
        assert!(stats.pairs > stats.brute_pairs, "{stats:?}");
        let want = reference(&q, &bank, dim);
        for ((d, i), (wd, wi)) in dist.iter().zip(&idx).zip(&want) {
            assert!((*d as f64 - wd).abs() <= 1e-4 * (1.0 + wd));
            assert_eq!(i, wi);
        }
    }

    #[test]
    fn duplicates_tie_to_the_lowest_index() {
        let dim = 3;
        let mut bank = vec![0f32; 10 * dim];
        for (i, r) in bank.chunks_mut(dim).enumerate() {
            r[0] = (i % 3) as f32; // rows 0,3,6,9 equal; 1,4,7 equal; 2,5,8 equal
        }
        let q = vec![1.0, 0.0, 0.0, 2.1, 0.0, 0.0, -5.0, 0.0, 0.0];
        let p = PartitionedBank::build(&bank, dim, 3).unwrap();
        let (dist, idx, _) = p.nearest(&q, Search::Exact).unwrap();
        assert_eq!(idx, vec![1, 2, 0]);
        assert!((dist[1] - 0.1).abs() < 1e-5 && dist[0] == 0.0 && dist[2] == 5.0);
    }

    #[test]
    fn approximate_finds_most_and_all_probes_is_exact() {
        let dim = 16;
        let bank = clustered(2000, dim, 30, 4);
        let q = clustered(400, dim, 30, 5);
        let p = PartitionedBank::build(&bank, dim, 45).unwrap();
        let (_, exact, _) = p.nearest(&q, Search::Exact).unwrap();
        let (_, one, s1) = p.nearest(&q, Search::Approximate { probes: 1 }).unwrap();
        let (_, all, _) = p
            .nearest(
                &q,
                Search::Approximate {
                    probes: p.clusters(),
                },
            )
            .unwrap();
        assert_eq!(all, exact);
        let recall = one.iter().zip(&exact).filter(|(a, b)| a == b).count() as f64 / 400.0;
        assert!(recall > 0.5 && recall <= 1.0, "recall {recall}");
        assert!(s1.fraction() < 0.2, "{s1:?}");
    }

    #[test]
    fn bad_banks_and_parsing() {
        assert!(PartitionedBank::build(&[], 3, 4).is_err());
        assert!(PartitionedBank::build(&[1.0, 2.0], 3, 4).is_err());
        assert!(PartitionedBank::build(&[1.0, f32::NAN, 0.0], 3, 1).is_err());
        let p = PartitionedBank::build(&[1.0, 2.0, 3.0], 3, 4).unwrap();
        assert_eq!(p.clusters(), 1);
        assert!(p.nearest(&[1.0, 2.0], Search::Exact).is_err());
        assert!(p.nearest(&[1.0, 2.0, 3.0], Search::Brute).is_err());
        for s in ["brute", "exact", "approx:4", " Exact "] {
            let v: Search = s.parse().unwrap();
            assert_eq!(v.to_string(), s.trim().to_ascii_lowercase());
        }
        for s in ["approx:0", "approx:", "fast", "approx:x"] {
            assert!(s.parse::<Search>().is_err(), "{s}");
        }
        let j = serde_json::to_string(&Search::Approximate { probes: 3 }).unwrap();
        assert_eq!(
            serde_json::from_str::<Search>(&j).unwrap(),
            Search::Approximate { probes: 3 }
        );
    }
}
