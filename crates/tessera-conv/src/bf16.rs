//! bf16 products for inference on CPUs with native bf16 dot products (AVX512-BF16).
//!
//! `dst (m × n) = a (m × k) · b (k × n)` with `a` and `b` rounded to bf16 (round to nearest
//! even) and the products summed in f32 by `VDPBF16PS`, which multiplies two bf16 pairs per
//! 32-bit lane: twice the multiply-adds of an f32 FMA per instruction. `b` (the weights) is
//! rounded and packed once ([`Panels`]); each call rounds its rows of `a` into a per-thread
//! buffer. Other CPUs have no such path: [`supported`] says so and callers keep f32.

use std::cell::RefCell;

use crate::panel::{MR, NR, ROW_CHUNK};

/// Whether this CPU has native bf16 dot products (AVX512-BF16, with AVX512F/BW).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `v` rounded to bf16, to nearest even (NaN kept a quiet NaN), as its bits.
pub fn to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// The f32 value of bf16 bits.
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// A `k × n` matrix rounded to bf16 and laid out for the micro-kernel: panels of 32
/// columns (zero-padded), each `k/2` (rounded up) pairs of rows, each pair interleaved per
/// column: `data[((panel · pairs + p) · NR + c) · 2 + t] = b[2p + t][panel · NR + c]`.
#[derive(Debug, Clone)]
pub struct Panels {
    data: Vec<u16>,
    k: usize,
    n: usize,
    pairs: usize,
}

impl Panels {
    /// Pack `b` (`k × n`, row stride `rs`, column stride 1).
    pub fn pack(b: &[f32], k: usize, n: usize, rs: usize) -> Self {
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u16; panels * pairs * NR * 2];
        for (i, v) in data.iter_mut().enumerate() {
            let (t, c, rest) = (i % 2, (i / 2) % NR, i / (2 * NR));
            let (p, panel) = (rest % pairs, rest / pairs);
            let (row, col) = (2 * p + t, panel * NR + c);
            if row < k && col < n {
                *v = to_bf16(b[row * rs + col]);
            }
        }
        Self { data, k, n, pairs }
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

thread_local! {
    /// Per-thread rows of `a` rounded to bf16.
    static ROWS: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

impl Panels {
    /// bf16 values per row that [`mm_bf16_rounded`] reads of its `a`: `k` rounded up to even.
    pub fn padded_k(&self) -> usize {
        2 * self.pairs
    }
}

/// `dst[r, j] = Σ_i a[r, i] · b[i, col0 + j]` for `r < m`, `j < ncols`, in bf16 with f32 sums;
/// single-threaded. `col0` must be a multiple of 32.
///
/// # Safety
/// [`supported`] must be true; `a` must address `m` rows of `b.k()` floats (row stride `a_rs`)
/// and `dst` `m` rows of `ncols` floats (row stride `dst_rs`), not aliasing `a`;
/// `col0 + ncols ≤ b.n()`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn mm_bf16(
    m: usize,
    a: *const f32,
    a_rs: usize,
    b: &Panels,
    col0: usize,
    ncols: usize,
    dst: *mut f32,
    dst_rs: usize,
) {
    let (k, kp) = (b.k, b.padded_k());
    ROWS.with(|rows| {
        let mut rows = rows.borrow_mut();
        let need = ROW_CHUNK.min(m) * kp;
        if rows.len() < need {
            rows.resize(need, 0);
        }
        for r0 in (0..m).step_by(ROW_CHUNK) {
            let n_rows = ROW_CHUNK.min(m - r0);
            let buf = &mut rows[..n_rows * kp];
            for (r, out) in buf.chunks_exact_mut(kp).enumerate() {
                let src = std::slice::from_raw_parts(a.add((r0 + r) * a_rs), k);
                round_row(src, &mut out[..k]);
                out[k..].fill(0);
            }
            mm_bf16_rounded(
                n_rows,
                buf.as_ptr(),
                kp,
                b,
                col0,
                ncols,
                dst.add(r0 * dst_rs),
                dst_rs,
            );
        }
    });
}

/// [`mm_bf16`] on rows of `a` already rounded to bf16 ([`round_row`]): `m` rows of
/// [`Panels::padded_k`] values (the last one 0 when `k` is odd), row stride `a_rs` values.
/// The same sums in the same order: the result is [`mm_bf16`]'s on the unrounded rows, to the
/// bit.
///
/// # Safety
/// As [`mm_bf16`], with `a` addressing `m` rows of `b.padded_k()` bf16 values.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn mm_bf16_rounded(
    m: usize,
    a: *const u16,
    a_rs: usize,
    b: &Panels,
    col0: usize,
    ncols: usize,
    dst: *mut f32,
    dst_rs: usize,
) {
    assert!(col0 + ncols <= b.n, "bf16 product: columns out of range");
    crate::panel::drive(
        m,
        a,
        a_rs,
        b.padded_k(),
        b.data.as_ptr(),
        b.pairs * NR * 2,
        b.pairs,
        col0,
        ncols,
        dst,
        dst_rs,
        kernel,
    );
}

/// `src` rounded to bf16 (round to nearest even; NaN stays NaN; subnormals flush to zero, as
/// the instruction does), 32 values per instruction, the tail through a masked load.
///
/// # Safety
/// [`supported`] must be true.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn round_row(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 32 <= n {
        let lo = _mm512_loadu_ps(src.as_ptr().add(i));
        let hi = _mm512_loadu_ps(src.as_ptr().add(i + 16));
        let h: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst.as_mut_ptr().add(i) as *mut _, h);
        i += 32;
    }
    if i < n {
        let left = n - i;
        let (m_lo, m_hi) = (
            crate::panel::lane_mask(left),
            crate::panel::lane_mask(left.saturating_sub(16)),
        );
        let lo = _mm512_maskz_loadu_ps(m_lo, src.as_ptr().add(i));
        let hi = _mm512_maskz_loadu_ps(m_hi, src.as_ptr().add(i + 16));
        let h: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        let mask: __mmask32 = (1u32 << left) - 1; // left < 32: the loop took every full 32
        _mm512_mask_storeu_epi16(dst.as_mut_ptr().add(i) as *mut _, mask, h);
    }
}

/// [`MR`] rows of bf16 pairs (`a`, row stride `a_rs`) times one panel (`pairs` pairs of 32
/// columns): the 8 × 32 f32 tile in 16 accumulators, stored straight to `dst` (row stride
/// `dst_rs`): its first `rows` rows and `valid` columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    a: *const u16,
    a_rs: usize,
    b: *const u16,
    pairs: usize,
    dst: *mut f32,
    dst_rs: usize,
    rows: usize,
    valid: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let mut bp = b;
    for p in 0..pairs {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(NR) as *const _));
        for (r, acc) in acc.iter_mut().enumerate() {
            let pair = (a.add(r * a_rs + 2 * p) as *const i32).read_unaligned();
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
        }
        bp = bp.add(2 * NR);
    }
    crate::panel::store_tile(&acc, dst, dst_rs, rows, valid);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        assert_eq!(from_bf16(to_bf16(1.0)), 1.0);
        // 1 + 2⁻⁸ lies halfway between 1 and 1 + 2⁻⁷: ties go to the even mantissa (1).
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        // 1 + 3·2⁻⁸ lies halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: to the even one, 1 + 2⁻⁶.
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 1.0 / 64.0);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        // The relative error of rounding is at most 2⁻⁸ (8 significant bits).
        for i in 1..2000 {
            let v = i as f32 * 0.7317 - 613.0;
            let r = from_bf16(to_bf16(v));
            assert!((r - v).abs() <= v.abs() / 256.0, "{v} → {r}");
        }
    }

    /// The packed product equals the f64 product of the bf16-rounded operands (to f32
    /// summation error), for shapes with odd k, partial panels and partial row blocks, and a
    /// column window that starts at a later panel.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn product_equals_the_rounded_reference() {
        if !supported() {
            eprintln!("SKIPPED: this CPU has no AVX512-BF16 (the bf16 path is not used here)");
            return;
        }
        let shapes = [(13, 37, 70, 32), (200, 64, 64, 0), (9, 1, 33, 0)];
        let q = |v: f32| from_bf16(to_bf16(v)) as f64;
        crate::panel::check::product_matches_reference(
            7,
            &shapes,
            q,
            1e-5,
            |a, b, m, k, n, col0| {
                let packed = Panels::pack(b, k, n, n);
                let ncols = n - col0;
                let mut dst = vec![f32::NAN; m * ncols];
                // SAFETY: supported (checked above); the shapes match the buffers.
                unsafe {
                    mm_bf16(
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
