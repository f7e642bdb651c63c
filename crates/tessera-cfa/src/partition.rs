//! The memory bank partitioned by position, for a nearest-centre search that skips whole groups
//! of centres when a distance bound says none of them can be among a row's nearest.
//!
//! With `γ_c = 1` the bank holds one centre per grid position, and neighbouring positions'
//! centres are close (the descriptor sees the coordinates and smooth features). The centres are
//! grouped in square tiles of positions; each tile keeps its mean `g` and radius `ρ` (the
//! largest distance of a member from `g`). For a query `q`, no member of a tile is nearer than
//! `‖q − g‖ − ρ`. A block of queries first searches each query's nearest tile (by that bound),
//! which gives its `n` best distances so far, then every other tile whose bound does not exceed
//! the `n`-th of them — the answer of a full scan, each tile meeting its queries in one product.
//! When the bounds would keep more than half of the bank (no structure to use), the block is
//! scanned whole instead.

use crate::centres::{sq_norm, BlockSearch};

/// Relative rounding margin of the f32 distance bounds: the expansion `‖q‖² + ‖c‖² − 2 q·c`
/// loses up to about ε·(‖q‖² + ‖c‖²) per term (≈ 170 f32 ulps here).
const MARGIN: f32 = 1e-5;
/// Above this share of a full scan's distances, a block is scanned whole.
const SCAN_SHARE: f64 = 0.5;

/// Centres grouped by tiles of grid positions.
pub(crate) struct Partition {
    d: usize,
    /// The original index of every centre, tile by tile; `offsets[t]..offsets[t + 1]` is tile
    /// `t`'s range.
    ids: Vec<u32>,
    offsets: Vec<usize>,
    /// The centres in that order (`M × D`) and their squared norms.
    rows: Vec<f32>,
    sq: Vec<f32>,
    /// Tile means (`T × D`), their squared norms, and radii.
    means: Vec<f32>,
    means_sq: Vec<f32>,
    radius: Vec<f32>,
    max_sq: f32,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("centres", &self.sq.len())
            .field("tiles", &self.tiles())
            .finish()
    }
}

impl Partition {
    /// Group the `h × w` centres (one per position, row-major) in tiles of about `√√(h·w)`
    /// positions a side. `None` when the bank is not one centre per position.
    pub(crate) fn by_position(
        centres: &[f32],
        centres_sq: &[f32],
        d: usize,
        (h, w): (usize, usize),
    ) -> Option<Self> {
        let m = centres_sq.len();
        if m != h * w || centres.len() != m * d || m < 4 || d == 0 {
            return None;
        }
        let side = ((m as f64).sqrt().sqrt().round() as usize).max(1);
        let (th, tw) = (h.div_ceil(side), w.div_ceil(side));
        let mut ids = Vec::with_capacity(m);
        let mut offsets = vec![0];
        for ty in 0..th {
            for tx in 0..tw {
                for y in ty * side..((ty + 1) * side).min(h) {
                    for x in tx * side..((tx + 1) * side).min(w) {
                        ids.push((y * w + x) as u32);
                    }
                }
                offsets.push(ids.len());
            }
        }
        let mut rows = Vec::with_capacity(m * d);
        for &i in &ids {
            rows.extend_from_slice(&centres[i as usize * d..(i as usize + 1) * d]);
        }
        let sq: Vec<f32> = ids.iter().map(|&i| centres_sq[i as usize]).collect();
        let tiles = offsets.len() - 1;
        let (mut means, mut radius) = (vec![0f32; tiles * d], vec![0f32; tiles]);
        for t in 0..tiles {
            let members = &rows[offsets[t] * d..offsets[t + 1] * d];
            let count = (offsets[t + 1] - offsets[t]) as f64;
            let mut mean = vec![0f64; d];
            for r in members.chunks(d) {
                mean.iter_mut().zip(r).for_each(|(s, &v)| *s += v as f64);
            }
            mean.iter_mut().for_each(|s| *s /= count);
            let g = &mut means[t * d..(t + 1) * d];
            g.iter_mut().zip(&mean).for_each(|(o, &v)| *o = v as f32);
            // The radius about the stored (f32) mean, in f64, rounded up.
            let far = members
                .chunks(d)
                .map(|r| {
                    r.iter()
                        .zip(g.iter())
                        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                        .sum::<f64>()
                })
                .fold(0f64, f64::max)
                .sqrt();
            radius[t] = (far * (1.0 + 1e-6)) as f32;
        }
        let means_sq = means
            .chunks(d)
            .map(|g| g.iter().map(|v| v * v).sum())
            .collect();
        let max_sq = sq.iter().fold(0f32, |a, &v| a.max(v));
        Some(Self {
            d,
            ids,
            offsets,
            rows,
            sq,
            means,
            means_sq,
            radius,
            max_sq,
        })
    }

    fn tiles(&self) -> usize {
        self.radius.len()
    }

    /// The `ix.len() / rows` nearest centres of each row of `block` (nearest first, ties to the
    /// lower centre index), as [`BlockSearch::run`] finds them; `scan` is that search, used when
    /// the bounds do not pay. Returns the distances computed (`rows × M` for a scan).
    pub(crate) fn search(
        &self,
        block: &[f32],
        ix: &mut [u32],
        ds: &mut [f32],
        scan: &BlockSearch,
    ) -> usize {
        use faer::{linalg::matmul::matmul, Accum, MatMut, MatRef, Par};
        let d = self.d;
        let nr = block.len() / d;
        let n = ix.len() / nr;
        let m = self.sq.len();
        let q_sq: Vec<f32> = block.chunks(d).map(sq_norm).collect();
        if q_sq.iter().any(|v| !v.is_finite()) || n == 0 {
            scan.run(block, ix, ds);
            return nr * m;
        }
        // Lower bounds on the distance from each query to each tile's members.
        let tiles = self.tiles();
        let mut g = vec![0f32; nr * tiles];
        matmul(
            MatMut::from_row_major_slice_mut(&mut g, nr, tiles),
            Accum::Replace,
            MatRef::from_row_major_slice(block, nr, d),
            MatRef::from_row_major_slice(&self.means, tiles, d).transpose(),
            1.0f32,
            Par::Seq,
        );
        for (r, row) in g.chunks_mut(tiles).enumerate() {
            let qs = q_sq[r];
            for (t, v) in row.iter_mut().enumerate() {
                let gs = self.means_sq[t];
                let d2 = qs + gs - 2.0 * *v - MARGIN * (qs + gs);
                *v = d2.max(0.0).sqrt() - self.radius[t];
            }
        }
        let bound = g;
        // Each query's best (distance, centre) so far, ascending; (∞, MAX) unfilled.
        let mut best = vec![(f32::INFINITY, u32::MAX); nr * n];
        let mut lists: Vec<Vec<u32>> = vec![Vec::new(); tiles];
        let mut done = vec![false; nr * tiles];
        // Wave 1: each query's nearest tile by the bound.
        for (r, row) in bound.chunks(tiles).enumerate() {
            let t = (0..tiles)
                .min_by(|&a, &b| row[a].total_cmp(&row[b]).then(a.cmp(&b)))
                .expect("at least one tile");
            lists[t].push(r as u32);
            done[r * tiles + t] = true;
        }
        let mut pairs = self.search_lists(block, &q_sq, &lists, &mut best, n);
        // Wave 2: every other tile that may hold a nearer centre than the n-th found.
        lists.iter_mut().for_each(Vec::clear);
        let mut wanted = 0usize;
        for (r, row) in bound.chunks(tiles).enumerate() {
            let worst = best[r * n + n - 1].0;
            let u = (worst.max(0.0) + MARGIN * (q_sq[r] + self.max_sq)).sqrt();
            for (t, &b) in row.iter().enumerate() {
                if !done[r * tiles + t] && b <= u {
                    lists[t].push(r as u32);
                    wanted += self.offsets[t + 1] - self.offsets[t];
                }
            }
        }
        if (pairs + wanted) as f64 > SCAN_SHARE * (nr * m) as f64 {
            scan.run(block, ix, ds);
            return nr * m;
        }
        pairs += self.search_lists(block, &q_sq, &lists, &mut best, n);
        for ((o_i, o_d), b) in ix.iter_mut().zip(ds.iter_mut()).zip(&best) {
            *o_d = b.0;
            *o_i = b.1;
        }
        pairs
    }

    /// Search tile `t` for the queries in `lists[t]`, every tile, merging into `best`. Returns
    /// the distances computed.
    fn search_lists(
        &self,
        block: &[f32],
        q_sq: &[f32],
        lists: &[Vec<u32>],
        best: &mut [(f32, u32)],
        n: usize,
    ) -> usize {
        use faer::{linalg::matmul::matmul, Accum, MatMut, MatRef, Par};
        let d = self.d;
        let (mut qbuf, mut out) = (Vec::new(), Vec::new());
        let mut pairs = 0;
        for (t, list) in lists.iter().enumerate() {
            if list.is_empty() {
                continue;
            }
            let (s, e) = (self.offsets[t], self.offsets[t + 1]);
            let k = e - s;
            qbuf.clear();
            for &r in list {
                qbuf.extend_from_slice(&block[r as usize * d..(r as usize + 1) * d]);
            }
            out.resize(list.len() * k, 0.0);
            matmul(
                MatMut::from_row_major_slice_mut(&mut out, list.len(), k),
                Accum::Replace,
                MatRef::from_row_major_slice(&qbuf, list.len(), d),
                MatRef::from_row_major_slice(&self.rows[s * d..e * d], k, d).transpose(),
                1.0f32,
                Par::Seq,
            );
            pairs += list.len() * k;
            for (&r, dots) in list.iter().zip(out.chunks(k)) {
                let r = r as usize;
                let top = &mut best[r * n..(r + 1) * n];
                for (j, &dot) in dots.iter().enumerate() {
                    let dist = q_sq[r] + self.sq[s + j] - 2.0 * dot;
                    insert(top, (dist, self.ids[s + j]));
                }
            }
        }
        pairs
    }
}

/// Insert into an ascending list of `(distance, centre)`, dropping the last: lexicographic, so
/// the result does not depend on the order centres are met in (a scan's ties go to the lower
/// index).
#[inline]
fn insert(top: &mut [(f32, u32)], c: (f32, u32)) {
    let n = top.len();
    let less = |a: (f32, u32), b: (f32, u32)| a.0 < b.0 || (a.0 == b.0 && a.1 < b.1);
    if !less(c, top[n - 1]) {
        return;
    }
    let mut p = n - 1;
    while p > 0 && less(c, top[p - 1]) {
        top[p] = top[p - 1];
        p -= 1;
    }
    top[p] = c;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::centres::search_rows;
    use tessera_core::test_util::Lcg;

    fn noise(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = Lcg(seed);
        (0..n).map(|_| rng.signed() * scale).collect()
    }

    fn norms(v: &[f32], d: usize) -> Vec<f32> {
        v.chunks(d).map(sq_norm).collect()
    }

    /// Both searches on the same rows: the same neighbours, distances within rounding.
    fn same_as_scan(ps: &[f32], cs: &[f32], d: usize, grid: (usize, usize), n: usize) -> f64 {
        let sq = norms(cs, d);
        let part = Partition::by_position(cs, &sq, d, grid).expect("one centre per position");
        let (i1, d1, pairs) = search_rows(ps, cs, &sq, n, Some(&part));
        let (i2, d2, full) = search_rows(ps, cs, &sq, n, None);
        assert_eq!(i1, i2, "neighbours differ");
        for (a, b) in d1.iter().zip(&d2) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
        pairs as f64 / full as f64
    }

    #[test]
    fn bounded_search_finds_the_scans_neighbours() {
        let (h, w, d) = (23, 31, 24);
        // Centres that vary smoothly with position (as CFA's do), a pair of duplicates (a
        // tie, to the lower index), and queries near centres, far from all, and across the
        // 256-row blocks.
        let mut cs = vec![0f32; h * w * d];
        for y in 0..h {
            for x in 0..w {
                for c in 0..d {
                    let f = 0.05 * (1 + c % 4) as f32;
                    let v = ((y as f32 * f + c as f32).sin() + (x as f32 * f).cos()) * 2.0;
                    cs[(y * w + x) * d + c] = v;
                }
            }
        }
        let e = noise(h * w * d, 3, 0.01);
        cs.iter_mut().zip(&e).for_each(|(c, n)| *c += n);
        let (a, b) = (5 * w + 7, 17 * w + 20);
        let dup: Vec<f32> = cs[a * d..(a + 1) * d].to_vec();
        cs[b * d..(b + 1) * d].copy_from_slice(&dup);
        let mut ps: Vec<f32> = cs.clone();
        let jitter = noise(ps.len(), 5, 0.05);
        ps.iter_mut().zip(&jitter).for_each(|(p, n)| *p += n);
        ps.extend(noise(40 * d, 9, 6.0)); // far from every centre
        ps.extend_from_slice(&dup); // exactly the duplicated centre
        let share = same_as_scan(&ps, &cs, d, (h, w), 3);
        assert!(
            share < 0.5,
            "structured bank: {share} of the distances computed"
        );
        same_as_scan(&ps, &cs, d, (h, w), 6);
        // No structure: random centres; the answer is still the scan's.
        let rc = noise(h * w * d, 11, 1.0);
        let rq = noise(300 * d, 13, 1.0);
        same_as_scan(&rq, &rc, d, (h, w), 3);
        // A bank that is not one centre per position has no partition.
        assert!(Partition::by_position(&rc, &norms(&rc, d), d, (h, w + 1)).is_none());
    }
}
