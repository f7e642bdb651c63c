//! Batched Mahalanobis distances on the CPU: every position's `Σ⁻¹` is read once for all images
//! of a batch and multiplied by a register-blocked kernel.
//!
//! Per position the distances are `q_b = x_bᵀ S x_b` with `S = Σ⁻¹` symmetric, stored as its
//! packed upper triangle ([`packed_len`]): `Σ⁻¹` is streamed from memory for every batch, and
//! the packed form is half the bytes of the full matrices. With `U` the strict upper triangle,
//! `q_b = Σ_i S_ii x_bi² + Σ_J ⟨2 Σ_k x_bk U[k, J], x_bJ⟩` over column blocks `J` (16 columns,
//! then 8) — about half the arithmetic of `X·S`. Row `k`'s segment of a block is contiguous in
//! the packed triangle and is read in place (widened from f16 in registers); inside the block,
//! where the window starts in the previous row's tail, those lanes are masked to zero, so no
//! position's matrix is copied. Each segment updates a 4-image × 16-column tile of accumulators
//! held in registers (8 fused multiply-adds per 2 loads and 4 broadcasts), where a dot product
//! per row and image with a horizontal sum each was latency-bound. Positions that share a
//! triangle ([`mahalanobis_shared`]) are scored together, all their rows against it in 6-row
//! passes: the triangle is read once per batch and the kernel is bound by arithmetic.

use rayon::prelude::*;
use tessera_core::{Error, Result};

/// Positions per parallel task: their differences and one triangle fit in L2, and each
/// `(image, channel)` row of `y` is read in runs of 256 bytes.
const BLOCK: usize = 64;
/// Lanes of one vector (AVX2 `f32`).
const LANES: usize = 8;
/// Vectors per column block of the main kernel.
const WIDE: usize = 2;
/// Images per pass of the main kernel.
const ROWS: usize = 4;
/// Rows per pass when positions share a triangle: their rows (every member position's images)
/// are one block of work, and 6 × 16 accumulators keep both FMA units busy where 4 × 16 left
/// half of them waiting on loads.
const ROWS_SHARED: usize = 6;
/// Rows of a column block whose window is prefetched ahead of its use.
const AHEAD: usize = 8;
/// Triangles above this size are prefetched ([`AHEAD`]).
const FAR_BYTES: usize = 16 << 10;

/// Values in one position's packed upper triangle: `d (d + 1) / 2`.
pub fn packed_len(d: usize) -> usize {
    d * (d + 1) / 2
}

/// Where row `i` of a packed upper triangle starts: the rows before it hold `d, d − 1, …`
/// values (row `i` holds columns `i … d`).
#[inline]
pub(crate) fn row_start(i: usize, d: usize) -> usize {
    i * (2 * d + 1 - i) / 2
}

/// For each value of a packed upper triangle, its index in the row-major `d × d` matrix: row
/// `i`'s columns `i … d`, rows in order (the gather that packs; the lower triangle is not read).
pub fn pack_index(d: usize) -> Vec<u32> {
    (0..d)
        .flat_map(|i| (i..d).map(move |j| (i * d + j) as u32))
        .collect()
}

/// `(P, d, d)` row-major symmetric matrices → their packed upper triangles `(P, d (d + 1) / 2)`
/// ([`pack_index`]'s layout).
pub fn pack_upper<T: Copy>(full: &[T], d: usize) -> Vec<T> {
    if d == 0 {
        return Vec::new();
    }
    let idx = pack_index(d);
    full.chunks_exact(d * d)
        .flat_map(|m| idx.iter().map(move |&k| m[k as usize]))
        .collect()
}

/// For each entry `(i, j)` of a row-major `d × d` matrix, its index in the packed upper
/// triangle of the symmetric matrix: the gather that unpacks it (other devices score with the
/// full matrices).
pub fn unpack_index(d: usize) -> Vec<u32> {
    (0..d * d)
        .map(|k| {
            let (i, j) = (k / d, k % d);
            let (lo, hi) = (i.min(j), i.max(j));
            (row_start(lo, d) + hi - lo) as u32
        })
        .collect()
}

/// Inverse covariances `(P, d (d + 1) / 2)` as stored: each position's symmetric `Σ⁻¹` as its
/// packed upper triangle ([`pack_upper`]).
#[derive(Clone, Copy, Debug)]
pub enum InvCov<'a> {
    /// `f32` storage.
    F32(&'a [f32]),
    /// `f16` storage, widened to `f32` per position.
    F16(&'a [half::f16]),
}

impl InvCov<'_> {
    fn len(&self) -> usize {
        match self {
            InvCov::F32(v) => v.len(),
            InvCov::F16(v) => v.len(),
        }
    }
}

/// Mahalanobis distances `√((y − μ)ᵀ Σ⁻¹ (y − μ))` of `b` images at every position: `y` is
/// `(B, P, d)`, `mean` `(P, d)`, `inv` `(P, d (d + 1) / 2)` packed; the result is `(B, P)`,
/// rounding below zero clamped to 0 before the root. Blocks of positions run in parallel on rayon's
/// pool; the CPU's widest vector unit is detected at run time, with the same operations in the
/// same order on every path (the results do not depend on it).
///
/// ```
/// use tessera_padim::maha::{mahalanobis, InvCov};
/// // One position, d = 2, Σ⁻¹ = diag(1, 4), packed as (S₀₀, S₀₁, S₁₁): the distance of (3, 1)
/// // from (0, 0) is √(9 + 4).
/// let d = mahalanobis(&[3.0, 1.0], &[0.0, 0.0], InvCov::F32(&[1.0, 0.0, 4.0]), 1, 2)?;
/// assert_eq!(d, vec![13f32.sqrt()]);
/// # Ok::<(), tessera_core::Error>(())
/// ```
pub fn mahalanobis(
    y: &[f32],
    mean: &[f32],
    inv: InvCov<'_>,
    b: usize,
    d: usize,
) -> Result<Vec<f32>> {
    run(y, mean, inv, b, d, None)
}

/// [`mahalanobis`] where positions share inverse covariances: position `p` uses triangle
/// `shared[p]` of `inv` (`(G, d (d + 1) / 2)`, every index below `G`). Neighbouring positions
/// that share one read it from cache.
///
/// ```
/// use tessera_padim::maha::{mahalanobis_shared, InvCov};
/// // Two positions, d = 1, both using the one Σ⁻¹ = 4.
/// let d = mahalanobis_shared(&[1.0, 2.0], &[0.0, 0.0], InvCov::F32(&[4.0]), 1, 1, &[0, 0])?;
/// assert_eq!(d, vec![2.0, 4.0]);
/// # Ok::<(), tessera_core::Error>(())
/// ```
pub fn mahalanobis_shared(
    y: &[f32],
    mean: &[f32],
    inv: InvCov<'_>,
    b: usize,
    d: usize,
    shared: &[u32],
) -> Result<Vec<f32>> {
    run(y, mean, inv, b, d, Some(shared))
}

fn run(
    y: &[f32],
    mean: &[f32],
    inv: InvCov<'_>,
    b: usize,
    d: usize,
    shared: Option<&[u32]>,
) -> Result<Vec<f32>> {
    let p = mean.len() / d.max(1);
    let t = packed_len(d);
    // Whole triangles, and every position's one among them.
    let inv_fits = match shared {
        Some(g) => {
            t > 0
                && inv.len().is_multiple_of(t)
                && g.len() == p
                && g.iter().all(|&i| (i as usize) < inv.len() / t)
        }
        None => inv.len() == p * t,
    };
    if d == 0 || y.len() != b * d * p || mean.len() != p * d || !inv_fits {
        return Err(Error::Config(format!(
            "padim: mahalanobis on inconsistent sizes (y {}, mean {}, inv {}, b {b}, d {d})",
            y.len(),
            mean.len(),
            inv.len()
        )));
    }
    let job = Job {
        y,
        mean,
        inv,
        shared,
        dims: (b, d, p),
    };
    let units = units(p, shared);
    let outs: Vec<Vec<f32>> = units
        .par_iter()
        .map(|positions| block(job, positions))
        .collect();
    // (positions, B) per unit → (B, P).
    let mut dist = vec![0f32; b * p];
    for (positions, out) in units.iter().zip(&outs) {
        for (j, v) in out.iter().enumerate() {
            let (k, bi) = (j / b, j % b);
            dist[bi * p + positions[k]] = v.max(0.0).sqrt();
        }
    }
    Ok(dist)
}

/// The parallel tasks of [`mahalanobis`] over `p` positions: blocks of [`BLOCK`] consecutive
/// positions, or (`shared`) each triangle with the positions that use it, so that it is read
/// once for all of their rows.
fn units(p: usize, shared: Option<&[u32]>) -> Vec<Vec<usize>> {
    match shared {
        None => (0..p.div_ceil(BLOCK))
            .map(|blk| (blk * BLOCK..((blk + 1) * BLOCK).min(p)).collect())
            .collect(),
        Some(g) => super::block_members(g)
            .into_iter()
            .filter(|m| !m.is_empty())
            .map(|m| m.into_iter().map(|i| i as usize).collect())
            .collect(),
    }
}

/// The inputs of [`mahalanobis`], checked: `y` `(B, P, d)`, `mean` `(P, d)`, `inv` `(P, T)`
/// packed (or `(G, T)` with `shared`, each position's triangle index), `dims` = `(B, d, P)`.
#[derive(Clone, Copy)]
struct Job<'a> {
    y: &'a [f32],
    mean: &'a [f32],
    inv: InvCov<'a>,
    shared: Option<&'a [u32]>,
    dims: (usize, usize, usize),
}

/// One task of [`mahalanobis`] on the widest vector unit the CPU has: the squared distances of
/// `positions` (a block of consecutive ones, or the positions sharing one triangle), `(n, B)`.
fn block(job: Job<'_>, positions: &[usize]) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
            return unsafe { block_avx2(job, positions) };
        }
    }
    block_generic::<false>(job, positions)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_avx2(job: Job<'_>, positions: &[usize]) -> Vec<f32> {
    block_generic::<true>(job, positions)
}

/// The column blocks of a `d`-wide row (`d ≥ 8`): `(start, vectors, first counted column)`,
/// `8·WIDE` columns while they fit, then 8; a remainder of fewer than 8 columns is a block of 8
/// ending at `d` that counts only its columns from the previous block's end (its window stays
/// inside the row, where one past `d` would read the next row).
fn column_blocks(d: usize) -> Vec<(usize, usize, usize)> {
    let wide = d / (WIDE * LANES) * (WIDE * LANES);
    let narrow = d / LANES * LANES;
    let mut v: Vec<(usize, usize, usize)> = (0..wide)
        .step_by(WIDE * LANES)
        .map(|j| (j, WIDE, j))
        .chain((wide..narrow).step_by(LANES).map(|j| (j, 1, j)))
        .collect();
    if narrow < d {
        v.push((d - LANES, 1, narrow));
    }
    v
}

/// An element of stored `Σ⁻¹`: `f32`, or `f16` widened as it is read.
trait Stored: Copy {
    const ZERO: Self;
    fn widen(self) -> f32;
    /// Eight consecutive values widened to one vector.
    ///
    /// # Safety
    /// AVX2 + F16C must be present and `p … p + 8` readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Stored for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Stored for half::f16 {
    const ZERO: Self = half::f16::ZERO;
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// [`block`]'s squared distances; `FMA`: the caller is compiled for AVX2 + FMA + F16C and the
/// CPU has them.
#[inline(always)]
fn block_generic<const FMA: bool>(job: Job<'_>, positions: &[usize]) -> Vec<f32> {
    match job.inv {
        InvCov::F32(v) => block_typed::<f32, FMA>(job, v, positions),
        InvCov::F16(v) => block_typed::<half::f16, FMA>(job, v, positions),
    }
}

/// [`block_generic`] for one storage type.
///
/// `q = Σ_i S_ii x_i² + ⟨2 Σ_k x_k U[k, J], x_J⟩` summed over column blocks `J`, `U` the strict
/// upper triangle. Row `k`'s window of block `J` is read in place from the packed triangle: for
/// `k` inside the block the window starts in the previous row's tail, and those lanes (and the
/// diagonal) are masked to zero, so nothing is copied per position.
#[inline(always)]
fn block_typed<T: Stored, const FMA: bool>(
    job: Job<'_>,
    inv: &[T],
    positions: &[usize],
) -> Vec<f32> {
    let Job {
        y,
        mean,
        shared,
        dims: (b, d, p),
        ..
    } = job;
    let n = positions.len();
    let dp = d.div_ceil(LANES) * LANES;
    // x[(k·b + bi)·dp + i] = y[bi, positions[k], i] − μ[positions[k], i]; padding stays 0.
    let mut x = vec![0f32; n * b * dp];
    for (k, &pos) in positions.iter().enumerate() {
        let mu = &mean[pos * d..][..d];
        for bi in 0..b {
            let dst = &mut x[(k * b + bi) * dp..][..d];
            let src = &y[(bi * p + pos) * d..][..d];
            for ((o, v), m) in dst.iter_mut().zip(src).zip(mu) {
                *o = v - m;
            }
        }
    }
    let t = packed_len(d);
    // Rows that read one triangle: each position's images, or (shared) all of them at once.
    let parts: Vec<(usize, std::ops::Range<usize>)> = match shared {
        None => positions
            .iter()
            .enumerate()
            .map(|(k, &pos)| (pos, k * b..(k + 1) * b))
            .collect(),
        Some(g) => vec![(g[positions[0]] as usize, 0..n * b)],
    };
    let rows_max = if shared.is_some() { ROWS_SHARED } else { ROWS };
    let (small, dw) = (d < LANES, d.max(LANES));
    let blocks = column_blocks(dw);
    let mut out = vec![0f32; n * b];
    for (m, rows) in parts {
        let src = &inv[m * t..][..t];
        let padded;
        // Below one vector, the triangle is widened to d = 8 with zero rows and columns (x's
        // padding is zero too), so every window is a whole vector inside its row.
        let tri = if small {
            padded = widened(src, d);
            &padded[..]
        } else {
            src
        };
        rows_typed::<T, FMA>(
            tri,
            &x[rows.start * dp..rows.end * dp],
            (dw, dp),
            &blocks,
            rows_max,
            &mut out[rows],
        );
    }
    out
}

/// A packed triangle of dimension `d < 8` widened to 8 with zero rows and columns.
fn widened<T: Stored>(src: &[T], d: usize) -> Vec<T> {
    let mut dst = vec![T::ZERO; packed_len(LANES)];
    for i in 0..d {
        dst[row_start(i, LANES)..][..d - i]
            .copy_from_slice(&src[row_start(i, d)..row_start(i + 1, d)]);
    }
    dst
}

/// `q` of every row of `x` (rows of `dp`) against one packed triangle `tri` of dimension `d ≥
/// 8`, in passes of up to `rows_max` rows per column block; a triangle larger than
/// [`FAR_BYTES`] is prefetched by the first pass of each block (later ones find it in L1).
#[inline(always)]
fn rows_typed<T: Stored, const FMA: bool>(
    tri: &[T],
    x: &[f32],
    (d, dp): (usize, usize),
    blocks: &[(usize, usize, usize)],
    rows_max: usize,
    q: &mut [f32],
) {
    let rows = q.len();
    let mut diag = vec![0f32; dp];
    for (i, o) in diag[..d].iter_mut().enumerate() {
        *o = tri[row_start(i, d)].widen();
    }
    for (r, qr) in q.iter_mut().enumerate() {
        *qr = diagonal::<FMA>(&diag, &x[r * dp..][..dp]);
    }
    // A triangle that fits in half of L1 is there after its first block: hints would only cost.
    let far = std::mem::size_of_val(tri) > FAR_BYTES;
    for &(j0, vecs, lo) in blocks {
        for g in 0..rows.div_ceil(rows_max) {
            let (rlo, rhi) = (g * rows_max, ((g + 1) * rows_max).min(rows));
            let t = Tile {
                tri,
                x: &x[rlo * dp..rhi * dp],
                j0,
                lo,
                d,
                dp,
                prefetch: far && g == 0,
            };
            let part: &[f32] = match (rhi - rlo, vecs == WIDE) {
                (6, true) => &tile::<T, 6, WIDE, FMA>(t),
                (5, true) => &tile::<T, 5, WIDE, FMA>(t),
                (4, true) => &tile::<T, 4, WIDE, FMA>(t),
                (3, true) => &tile::<T, 3, WIDE, FMA>(t),
                (2, true) => &tile::<T, 2, WIDE, FMA>(t),
                (1, true) => &tile::<T, 1, WIDE, FMA>(t),
                (6, false) => &tile::<T, 6, 1, FMA>(t),
                (5, false) => &tile::<T, 5, 1, FMA>(t),
                (4, false) => &tile::<T, 4, 1, FMA>(t),
                (3, false) => &tile::<T, 3, 1, FMA>(t),
                (2, false) => &tile::<T, 2, 1, FMA>(t),
                _ => &tile::<T, 1, 1, FMA>(t),
            };
            for (qr, v) in q[rlo..rhi].iter_mut().zip(part) {
                *qr += v;
            }
        }
    }
}

/// `Σ_i S_ii x_i²` over the padded row (lane `l` sums `i ≡ l mod 8` in order).
#[inline(always)]
fn diagonal<const FMA: bool>(diag: &[f32], x: &[f32]) -> f32 {
    assert_eq!(diag.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA is set only by callers compiled for AVX2 + FMA on a CPU that has them;
        // whole chunks of 8 inside both slices.
        unsafe {
            use std::arch::x86_64::*;
            let mut lane = _mm256_setzero_ps();
            for (s, v) in diag.chunks_exact(LANES).zip(x.chunks_exact(LANES)) {
                let xv = _mm256_loadu_ps(v.as_ptr());
                let sx = _mm256_mul_ps(_mm256_loadu_ps(s.as_ptr()), xv);
                lane = _mm256_fmadd_ps(sx, xv, lane);
            }
            let mut l = [0f32; LANES];
            _mm256_storeu_ps(l.as_mut_ptr(), lane);
            return hsum(&l);
        }
    }
    let mut lane = [0f32; LANES];
    for (s, v) in diag.chunks_exact(LANES).zip(x.chunks_exact(LANES)) {
        for l in 0..LANES {
            lane[l] = (s[l] * v[l]).mul_add(v[l], lane[l]);
        }
    }
    hsum(&lane)
}

/// The operands of [`tile`]: one position's packed triangle `tri` (dimension `d ≥ 8`), `R`
/// images' differences `x` (rows of `dp`), the block's first column `j0` and first counted
/// column `lo`.
#[derive(Clone, Copy)]
struct Tile<'a, T> {
    tri: &'a [T],
    x: &'a [f32],
    j0: usize,
    lo: usize,
    d: usize,
    dp: usize,
    /// Request the block's windows [`AHEAD`] rows early (the triangle is not in cache).
    prefetch: bool,
}

/// One column block `J = j0 … j0 + 8V` for the `R` images of `x`: `⟨2 Σ_k x_k U[k, J],
/// x_J⟩` over the columns from `lo`, with an `R × 8V` accumulator tile held in registers. Row
/// `k`'s window is `tri[row_start(k) + j0 − k …]`; rows `k ≥ j0` keep only lanes `j > k`.
#[inline(always)]
fn tile<T: Stored, const R: usize, const V: usize, const FMA: bool>(t: Tile<'_, T>) -> [f32; R] {
    let Tile {
        tri,
        x,
        j0,
        lo,
        d,
        dp,
        ..
    } = t;
    let end = j0 + V * LANES;
    // Every read below stays inside these bounds: row k's window ends at
    // `row_start(k) + end − k ≤ row_start(k + 1)` when `end ≤ d`, and starts at or after 0.
    assert!(x.len() == R * dp && end <= d && lo >= j0 && lo < end && tri.len() == packed_len(d));
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA is set only by callers compiled for AVX2 + FMA + F16C on a CPU that has
        // them; the bounds were checked just above.
        return unsafe { tile_fma::<T, R, V>(t) };
    }
    let mut acc = [[[0f32; LANES]; V]; R];
    for k in 0..end {
        let row = &tri[row_start(k, d) + j0 - k..][..V * LANES];
        for r in 0..R {
            let xk = x[r * dp + k];
            for v in 0..V {
                for l in 0..LANES {
                    let s = if j0 + v * LANES + l > k {
                        row[v * LANES + l].widen()
                    } else {
                        0.0
                    };
                    acc[r][v][l] = xk.mul_add(s, acc[r][v][l]);
                }
            }
        }
    }
    let mut q = [0f32; R];
    for r in 0..R {
        let mut lane = [0f32; LANES];
        for v in 0..V {
            let xv = &x[r * dp + j0 + v * LANES..][..LANES];
            for l in 0..LANES {
                let xj = if j0 + v * LANES + l >= lo { xv[l] } else { 0.0 };
                let a = acc[r][v][l] + acc[r][v][l];
                lane[l] = a.mul_add(xj, lane[l]);
            }
        }
        q[r] = hsum(&lane);
    }
    q
}

/// The lanes summed pairwise in a fixed order (the same on every path).
#[inline(always)]
fn hsum(lane: &[f32; LANES]) -> f32 {
    let h: [f32; 4] = [
        lane[0] + lane[4],
        lane[1] + lane[5],
        lane[2] + lane[6],
        lane[3] + lane[7],
    ];
    (h[0] + h[2]) + (h[1] + h[3])
}

/// [`tile`] with AVX2 + FMA intrinsics: the same operations in the same order.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C, and the bounds asserted in [`tile`] must hold.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile_fma<T: Stored, const R: usize, const V: usize>(t: Tile<'_, T>) -> [f32; R] {
    use std::arch::x86_64::*;
    let Tile {
        tri,
        x,
        j0,
        lo,
        d,
        dp,
        prefetch,
    } = t;
    let end = j0 + V * LANES;
    let (tp, xp) = (tri.as_ptr(), x.as_ptr());
    // Column index of every lane of the block.
    let mut cols = [_mm256_setzero_si256(); V];
    for (v, c) in cols.iter_mut().enumerate() {
        let base = _mm256_set1_epi32((j0 + v * LANES) as i32);
        *c = _mm256_add_epi32(base, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    let mut acc = [[_mm256_setzero_ps(); V]; R];
    let mut row = tp.add(j0);
    // The windows of successive rows are `d − k − 1` apart, a stride the hardware prefetcher
    // does not follow: each is requested `AHEAD` rows early (a hint; past the end it is
    // dropped, never read).
    let mut ahead = row;
    for k in 0..AHEAD.min(end) {
        ahead = ahead.wrapping_add(d - k - 1);
    }
    let last = std::mem::size_of::<T>() * (V * LANES - 1);
    // Rows above the block: every lane is strictly upper.
    for k in 0..j0 {
        if prefetch {
            _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            _mm_prefetch::<_MM_HINT_T0>((ahead as *const i8).wrapping_add(last));
        }
        ahead = ahead.wrapping_add(d.wrapping_sub(k + AHEAD + 1));
        let mut sv = [_mm256_setzero_ps(); V];
        for (v, o) in sv.iter_mut().enumerate() {
            *o = T::load8(row.add(v * LANES));
        }
        for (r, ar) in acc.iter_mut().enumerate() {
            let xk = _mm256_set1_ps(*xp.add(r * dp + k));
            for (a, sv) in ar.iter_mut().zip(&sv) {
                *a = _mm256_fmadd_ps(xk, *sv, *a);
            }
        }
        row = row.add(d - k - 1);
    }
    // Rows inside it: lanes at or left of the diagonal masked to zero.
    for k in j0..end {
        if prefetch {
            _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            _mm_prefetch::<_MM_HINT_T0>((ahead as *const i8).wrapping_add(last));
        }
        ahead = ahead.wrapping_add(d.wrapping_sub(k + AHEAD + 1));
        let kv = _mm256_set1_epi32(k as i32);
        let mut sv = [_mm256_setzero_ps(); V];
        for (v, o) in sv.iter_mut().enumerate() {
            let keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(cols[v], kv));
            *o = _mm256_and_ps(T::load8(row.add(v * LANES)), keep);
        }
        for (r, ar) in acc.iter_mut().enumerate() {
            let xk = _mm256_set1_ps(*xp.add(r * dp + k));
            for (a, sv) in ar.iter_mut().zip(&sv) {
                *a = _mm256_fmadd_ps(xk, *sv, *a);
            }
        }
        row = row.add(d - k - 1);
    }
    let lov = _mm256_set1_epi32(lo as i32 - 1);
    let mut q = [0f32; R];
    for (r, (ar, qr)) in acc.iter().zip(q.iter_mut()).enumerate() {
        let mut lane = _mm256_setzero_ps();
        for (v, a) in ar.iter().enumerate() {
            let keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(cols[v], lov));
            let xj = _mm256_and_ps(_mm256_loadu_ps(xp.add(r * dp + j0 + v * LANES)), keep);
            lane = _mm256_fmadd_ps(_mm256_add_ps(*a, *a), xj, lane);
        }
        let mut l = [0f32; LANES];
        _mm256_storeu_ps(l.as_mut_ptr(), lane);
        *qr = hsum(&l);
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_core::test_util::Lcg;

    /// Reference: the full product in f64 per position and image.
    fn reference(y: &[f32], mean: &[f32], inv: &[f32], b: usize, d: usize) -> Vec<f64> {
        let p = mean.len() / d;
        let mut out = vec![0f64; b * p];
        for bi in 0..b {
            for k in 0..p {
                let x: Vec<f64> = (0..d)
                    .map(|i| (y[(bi * p + k) * d + i] - mean[k * d + i]) as f64)
                    .collect();
                let s = &inv[k * d * d..][..d * d];
                let mut q = 0f64;
                for i in 0..d {
                    for j in 0..d {
                        q += x[i] * s[i * d + j] as f64 * x[j];
                    }
                }
                out[bi * p + k] = q.max(0.0).sqrt();
            }
        }
        out
    }

    fn lcg(seed: u64) -> impl FnMut() -> f32 {
        let mut rng = Lcg(seed);
        move || rng.signed()
    }

    /// Every image-group remainder (b = 1…9), dimensions below, at and across the vector and
    /// block widths, positions not a multiple of the task block; symmetric positive definite
    /// Σ⁻¹ with its lower triangle overwritten by garbage before packing (it must not be read).
    #[test]
    fn equals_the_full_product() {
        let mut rnd = lcg(3);
        for &(b, d, p) in &[
            (1usize, 1usize, 3usize),
            (2, 7, 17),
            (3, 8, 5),
            (4, 23, 9),
            (5, 24, 4),
            (8, 25, 33),
            (9, 57, 6),
            (6, 100, 3),
        ] {
            let y: Vec<f32> = (0..b * d * p).map(|_| rnd()).collect();
            let mean: Vec<f32> = (0..p * d).map(|_| rnd()).collect();
            let mut inv = vec![0f32; p * d * d];
            for k in 0..p {
                let a: Vec<f32> = (0..d * d).map(|_| rnd()).collect();
                for i in 0..d {
                    for j in 0..d {
                        let v: f32 = (0..d).map(|t| a[i * d + t] * a[j * d + t]).sum();
                        inv[k * d * d + i * d + j] = v + if i == j { 1.0 } else { 0.0 };
                    }
                }
            }
            let want = reference(&y, &mean, &inv, b, d);
            let mut garbage = inv.clone();
            for k in 0..p {
                for i in 0..d {
                    for j in 0..i {
                        garbage[k * d * d + i * d + j] = f32::NAN;
                    }
                }
            }
            let packed = pack_upper(&garbage, d);
            assert_eq!(packed.len(), p * packed_len(d));
            let got = mahalanobis(&y, &mean, InvCov::F32(&packed), b, d).unwrap();
            for (g, w) in got.iter().zip(&want) {
                let tol = 1e-5 * w.abs().max(1.0);
                assert!((*g as f64 - w).abs() <= tol, "b {b} d {d}: {g} vs {w}");
            }
            let inv16: Vec<half::f16> = packed.iter().map(|&v| half::f16::from_f32(v)).collect();
            let rounded: Vec<f32> = inv
                .iter()
                .map(|&v| half::f16::from_f32(v).to_f32())
                .collect();
            let want16 = reference(&y, &mean, &rounded, b, d);
            let got16 = mahalanobis(&y, &mean, InvCov::F16(&inv16), b, d).unwrap();
            for (g, w) in got16.iter().zip(&want16) {
                let tol = 1e-5 * w.abs().max(1.0);
                assert!((*g as f64 - w).abs() <= tol, "f16 b {b} d {d}: {g} vs {w}");
            }
        }
    }

    /// The vector path and the portable one do the same operations in the same order: equal to
    /// the bit, for f32 and f16 storage and every tile shape.
    #[test]
    fn every_path_gives_the_same_bits() {
        let mut rnd = lcg(5);
        // Below one vector (widened), whole blocks only, and a remainder block.
        for (b, d, p) in [(7usize, 45usize, 70usize), (5, 5, 9), (3, 48, 66)] {
            let y: Vec<f32> = (0..b * d * p).map(|_| rnd()).collect();
            let mean: Vec<f32> = (0..p * d).map(|_| rnd()).collect();
            let inv: Vec<f32> = (0..p * packed_len(d)).map(|_| rnd()).collect();
            let inv16: Vec<half::f16> = inv.iter().map(|&v| half::f16::from_f32(v)).collect();
            // Shared: position i uses triangle i % 3 (units of up to 24 positions, so passes
            // of 6, 5, … rows).
            let shared: Vec<u32> = (0..p).map(|i| (i % 3) as u32).collect();
            let (blocks, members) = (units(p, None), units(p, Some(&shared)));
            let units = [(None, &blocks), (Some(&shared[..]), &members)];
            for s in [InvCov::F32(&inv), InvCov::F16(&inv16)] {
                for (positions, sh) in units
                    .iter()
                    .flat_map(|(sh, u)| u.iter().map(move |x| (x, *sh)))
                {
                    let job = Job {
                        y: &y,
                        mean: &mean,
                        inv: s,
                        shared: sh,
                        dims: (b, d, p),
                    };
                    let fast = block(job, positions);
                    let portable = block_generic::<false>(job, positions);
                    assert_eq!(fast.len(), portable.len());
                    for (f, q) in fast.iter().zip(&portable) {
                        assert_eq!(
                            f.to_bits(),
                            q.to_bits(),
                            "f16: {}",
                            matches!(s, InvCov::F16(_))
                        );
                    }
                }
            }
        }
    }

    /// Positions that share triangles score exactly as with each shared triangle copied to
    /// them, for f32 and f16, below one vector and above; an index past the triangles is refused.
    #[test]
    fn shared_triangles_equal_copies() {
        let mut rnd = lcg(13);
        for (b, d, p, g) in [(5usize, 30usize, 70usize, 9usize), (3, 5, 11, 4)] {
            let y: Vec<f32> = (0..b * d * p).map(|_| rnd()).collect();
            let mean: Vec<f32> = (0..p * d).map(|_| rnd()).collect();
            let t = packed_len(d);
            let inv: Vec<f32> = (0..g * t).map(|_| rnd()).collect();
            let shared: Vec<u32> = (0..p).map(|i| ((i * 7 + i / 3) % g) as u32).collect();
            let copied: Vec<f32> = shared
                .iter()
                .flat_map(|&m| inv[m as usize * t..][..t].iter().copied())
                .collect();
            let a = mahalanobis_shared(&y, &mean, InvCov::F32(&inv), b, d, &shared).unwrap();
            let c = mahalanobis(&y, &mean, InvCov::F32(&copied), b, d).unwrap();
            assert_eq!(a, c);
            let h = |v: &[f32]| -> Vec<half::f16> {
                v.iter().map(|&x| half::f16::from_f32(x)).collect()
            };
            let (inv16, copied16) = (h(&inv), h(&copied));
            let a = mahalanobis_shared(&y, &mean, InvCov::F16(&inv16), b, d, &shared).unwrap();
            let c = mahalanobis(&y, &mean, InvCov::F16(&copied16), b, d).unwrap();
            assert_eq!(a, c);
            let mut bad = shared.clone();
            bad[p - 1] = g as u32;
            assert!(mahalanobis_shared(&y, &mean, InvCov::F32(&inv), b, d, &bad).is_err());
            assert!(mahalanobis_shared(&y, &mean, InvCov::F32(&inv), b, d, &bad[1..]).is_err());
        }
    }

    #[test]
    fn refuses_inconsistent_sizes() {
        let e = mahalanobis(&[0.0; 5], &[0.0; 2], InvCov::F32(&[1.0, 0.0, 1.0]), 2, 2);
        assert!(e.is_err());
        // A full d × d matrix is not a packed one.
        let full = mahalanobis(
            &[0.0; 2],
            &[0.0; 2],
            InvCov::F32(&[1.0, 0.0, 0.0, 1.0]),
            1,
            2,
        );
        assert!(full.is_err());
        assert!(mahalanobis(&[], &[], InvCov::F32(&[]), 1, 0).is_err());
    }

    /// Unpacking gathers every entry of the symmetric matrix back, both triangles.
    #[test]
    fn packing_round_trips() {
        let (p, d) = (3usize, 7usize);
        let mut rnd = lcg(11);
        let mut full = vec![0f32; p * d * d];
        for k in 0..p {
            for i in 0..d {
                for j in i..d {
                    let v = rnd();
                    full[k * d * d + i * d + j] = v;
                    full[k * d * d + j * d + i] = v;
                }
            }
        }
        let packed = pack_upper(&full, d);
        let idx = unpack_index(d);
        let t = packed_len(d);
        let back: Vec<f32> = (0..p)
            .flat_map(|k| idx.iter().map(move |&j| (k, j)))
            .map(|(k, j)| packed[k * t + j as usize])
            .collect();
        assert_eq!(back, full);
        assert_eq!(packed_len(0), 0);
        assert!(pack_upper(&[0f32; 0], 0).is_empty());
    }
}
