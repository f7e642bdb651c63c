//! Weights packed once in panels of 32 columns, and single-threaded products `a · b` with them
//! on AVX-512 (8 × 32 tiles, 16 accumulators in registers, `a` read in place): f32
//! multiply-adds ([`PanelsF32`], [`mm_f32`]) and bf16 dot products ([`crate::bf16`]) share the
//! loop over rows and panels. The weights are packed once per convolution instead of once per
//! call (which a general GEMM must do), and the tile is stored straight from the registers.

/// Columns per panel: two vectors of 16 f32 accumulators.
pub(crate) const NR: usize = 32;
/// Rows per micro-kernel call.
pub(crate) const MR: usize = 8;
/// Rows multiplied per pass across the panels (they stay in L2 meanwhile; `mm_bf16` rounds
/// this many at a time too).
pub(crate) const ROW_CHUNK: usize = 128;

/// A micro-kernel: [`MR`] rows of `a` (row stride `a_rs`) times one panel of `steps` steps,
/// stored to `dst` (row stride `dst_rs`): its first `rows` rows and `valid` columns.
pub(crate) type Kernel<T> =
    unsafe fn(*const T, usize, *const T, usize, *mut f32, usize, usize, usize);

/// `dst[r, j] = Σ a[r, ·] · panel-column (col0 + j)` for `r < m`, `j < ncols`: rows of `a`
/// `row_len` values long (what the kernel reads of a row), panels `panel_len` values apart,
/// `steps` kernel steps each.
///
/// # Safety
/// The kernel's instruction set must be present; `a` must address `m` rows of `row_len`
/// values (row stride `a_rs`), `panels` the panels that cover columns `col0..col0 + ncols`,
/// and `dst` `m` rows of `ncols` floats (row stride `dst_rs`), not aliasing `a`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn drive<T: Copy + Default>(
    m: usize,
    a: *const T,
    a_rs: usize,
    row_len: usize,
    panels: *const T,
    panel_len: usize,
    steps: usize,
    col0: usize,
    ncols: usize,
    dst: *mut f32,
    dst_rs: usize,
    kernel: Kernel<T>,
) {
    assert!(
        col0.is_multiple_of(NR),
        "panel product: columns out of range"
    );
    // The last, partial block of rows goes through a zero-padded copy: the kernel always
    // reads MR rows.
    let mut tail: Vec<T> = Vec::new();
    for r0 in (0..m).step_by(ROW_CHUNK) {
        let n_rows = ROW_CHUNK.min(m - r0);
        for panel in col0 / NR..(col0 + ncols).div_ceil(NR) {
            let bp = panels.add(panel * panel_len);
            let c0 = panel * NR - col0;
            let valid = NR.min(col0 + ncols - panel * NR);
            for i0 in (0..n_rows).step_by(MR) {
                let rows = MR.min(n_rows - i0);
                let out = dst.add((r0 + i0) * dst_rs + c0);
                let ap = a.add((r0 + i0) * a_rs);
                if rows == MR {
                    kernel(ap, a_rs, bp, steps, out, dst_rs, MR, valid);
                    continue;
                }
                if tail.is_empty() {
                    tail = vec![T::default(); MR * row_len];
                    for r in 0..rows {
                        let src = std::slice::from_raw_parts(ap.add(r * a_rs), row_len);
                        tail[r * row_len..(r + 1) * row_len].copy_from_slice(src);
                    }
                }
                kernel(tail.as_ptr(), row_len, bp, steps, out, dst_rs, rows, valid);
            }
        }
    }
}

/// The first `n` (at most 16) lanes of a 16-lane mask.
#[inline(always)]
pub(crate) fn lane_mask(n: usize) -> u16 {
    if n >= 16 {
        !0
    } else {
        (1u16 << n) - 1
    }
}

/// Store an 8 × 32 tile of accumulators: the first `rows` rows, `valid` columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn store_tile(
    acc: &[[std::arch::x86_64::__m512; 2]; MR],
    dst: *mut f32,
    dst_rs: usize,
    rows: usize,
    valid: usize,
) {
    use std::arch::x86_64::*;
    let (m_lo, m_hi) = (lane_mask(valid), lane_mask(valid.saturating_sub(16)));
    for (r, acc) in acc.iter().enumerate().take(rows) {
        let o = dst.add(r * dst_rs);
        if valid == NR {
            _mm512_storeu_ps(o, acc[0]);
            _mm512_storeu_ps(o.add(16), acc[1]);
        } else {
            _mm512_mask_storeu_ps(o, m_lo, acc[0]);
            _mm512_mask_storeu_ps(o.add(16), m_hi, acc[1]);
        }
    }
}

/// Whether this CPU runs [`mm_f32`] (AVX-512F).
pub fn f32_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A `k × n` f32 matrix in panels of 32 columns (zero-padded):
/// `data[(panel · k + i) · NR + c] = b[i][panel · NR + c]`.
#[derive(Debug, Clone)]
pub struct PanelsF32 {
    data: Vec<f32>,
    k: usize,
    n: usize,
}

impl PanelsF32 {
    /// Pack `b` (`k × n`, row stride `rs`, column stride 1).
    pub fn pack(b: &[f32], k: usize, n: usize, rs: usize) -> Self {
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        for (panel, dst) in data.chunks_exact_mut(k * NR).enumerate() {
            for (i, row) in dst.chunks_exact_mut(NR).enumerate() {
                let c0 = panel * NR;
                let w = NR.min(n - c0);
                row[..w].copy_from_slice(&b[i * rs + c0..i * rs + c0 + w]);
            }
        }
        Self { data, k, n }
    }

    /// Rows of the packed matrix.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of the packed matrix.
    pub fn n(&self) -> usize {
        self.n
    }
}

/// `dst[r, j] = Σ_i a[r, i] · b[i, col0 + j]` for `r < m`, `j < ncols`, in f32 (one
/// multiply-add per term, `i` ascending); single-threaded. `col0` must be a multiple of 32.
///
/// # Safety
/// [`f32_supported`] must be true; `a` must address `m` rows of `b.k()` floats (row stride
/// `a_rs`) and `dst` `m` rows of `ncols` floats (row stride `dst_rs`), not aliasing `a`;
/// `col0 + ncols ≤ b.n()`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn mm_f32(
    m: usize,
    a: *const f32,
    a_rs: usize,
    b: &PanelsF32,
    col0: usize,
    ncols: usize,
    dst: *mut f32,
    dst_rs: usize,
) {
    assert!(
        col0 + ncols <= b.n,
        "f32 panel product: columns out of range"
    );
    drive(
        m,
        a,
        a_rs,
        b.k,
        b.data.as_ptr(),
        b.k * NR,
        b.k,
        col0,
        ncols,
        dst,
        dst_rs,
        kernel_f32,
    );
}

/// [`MR`] rows of `a` times one panel of `k` rows, by fused multiply-adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_f32(
    a: *const f32,
    a_rs: usize,
    b: *const f32,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    rows: usize,
    valid: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let mut bp = b;
    for i in 0..k {
        let b0 = _mm512_loadu_ps(bp);
        let b1 = _mm512_loadu_ps(bp.add(16));
        for (r, acc) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(r * a_rs + i));
            acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
            acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
        }
        bp = bp.add(NR);
    }
    store_tile(&acc, dst, dst_rs, rows, valid);
}

/// A check shared by the products' tests.
#[cfg(test)]
pub(crate) mod check {
    use tessera_core::test_util::Lcg;

    /// For each `(m, k, n, col0)`: seeded random `a` (`m × k`) and `b` (`k × n`) in [-1, 1),
    /// `product(a, b, m, k, n, col0)` (the `m × (n − col0)` columns from `col0`) against the f64
    /// sum of `q(a) · q(b)` (`q`: the operands' rounding), within `tol` × Σ |terms| (at least
    /// `tol` × 1e-3).
    pub(crate) fn product_matches_reference(
        seed: u64,
        shapes: &[(usize, usize, usize, usize)],
        q: impl Fn(f32) -> f64,
        tol: f64,
        product: impl Fn(&[f32], &[f32], usize, usize, usize, usize) -> Vec<f32>,
    ) {
        let mut rng = Lcg(seed);
        for &(m, k, n, col0) in shapes {
            let a: Vec<f32> = (0..m * k).map(|_| rng.signed()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.signed()).collect();
            let ncols = n - col0;
            let dst = product(&a, &b, m, k, n, col0);
            for r in 0..m {
                for j in 0..ncols {
                    let (mut want, mut mag) = (0f64, 0f64);
                    for i in 0..k {
                        let p = q(a[r * k + i]) * q(b[i * n + col0 + j]);
                        want += p;
                        mag += p.abs();
                    }
                    let got = dst[r * ncols + j] as f64;
                    assert!(
                        (got - want).abs() <= tol * mag.max(1e-3),
                        "({m}, {k}, {n}) at ({r}, {j}): {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packed f32 product equals the f64 product to f32 summation error, for shapes with
    /// partial panels and row blocks, k = 1, and a column window from a later panel.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn f32_product_equals_the_reference() {
        if !f32_supported() {
            eprintln!("SKIPPED: this CPU has no AVX-512F (the f32 panels are not used here)");
            return;
        }
        let shapes = [
            (13, 37, 70, 32),
            (200, 64, 64, 0),
            (9, 1, 33, 0),
            (130, 147, 64, 0),
        ];
        check::product_matches_reference(
            5,
            &shapes,
            |v| v as f64,
            1e-6,
            |a, b, m, k, n, col0| {
                let packed = PanelsF32::pack(b, k, n, n);
                assert_eq!((packed.k(), packed.n()), (k, n));
                let ncols = n - col0;
                let mut dst = vec![f32::NAN; m * ncols];
                // SAFETY: supported (checked above); the shapes match the buffers.
                unsafe {
                    mm_f32(
                        m,
                        a.as_ptr(),
                        k,
                        &packed,
                        col0,
                        ncols,
                        dst.as_mut_ptr(),
                        ncols,
                    )
                };
                dst
            },
        );
    }
}
