//! Position attention (DANet's `PAM_Module`, as the authors' `selfattention` uses it), with the
//! `N × N` attention computed in chunks of query positions.

use crate::params::{Init, Source};
use candle_core::{CpuStorage, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tessera_conv::{conv2d, ConvParams};
use tessera_core::tensor::with_f32_slice;
use tessera_core::{Error, Result};

/// Position-attention hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PamConfig {
    /// Query/key width `max(1, C / qk_reduction)`: 1 in the authors' code (`C → C`), 8 in
    /// DANet's `PAM_Module`.
    pub qk_reduction: usize,
    /// Negative slope of the leaky ReLU on the attended values (the authors' code applies
    /// `F.leaky_relu`, slope 0.01; DANet has none: `None`).
    pub leaky_slope: Option<f64>,
    /// Query positions per step of the `N × N` attention; `None` computes all `N` rows at once.
    /// Memory for the attention rows is `chunk × N` floats per step instead of `N × N`.
    pub chunk: Option<usize>,
}

impl Default for PamConfig {
    fn default() -> Self {
        Self {
            qk_reduction: 1,
            leaky_slope: Some(0.01),
            chunk: Some(512),
        }
    }
}

/// `e^x` for `x ≤ 0` (the shifted logits of a softmax): Cephes' `expf` scheme — `x = n·ln2 + r`,
/// `|r| ≤ ln2/2`, a degree-6 polynomial for `e^r`, `2^n` put in the exponent bits — written
/// branch-free so that the compiler vectorises it (libm's `expf` does not). Relative error
/// about 2e-7; inputs below −87 give ≈ 1e-38 (not denormals); NaN stays NaN.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    let x = if x < EXP_MIN { EXP_MIN } else { x };
    let n = (x * std::f32::consts::LOG2_E + EXP_ROUND) - EXP_ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = EXP_POLY[0];
    for k in &EXP_POLY[1..] {
        p = p * r + k;
    }
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The exponential's constants, shared by [`exp_nonpositive`] and its AVX2 twin: inputs are
/// clamped at −87, `ln 2` is split in two for an exact `x − n·ln 2`, adding 1.5·2²³ rounds to
/// an integer, and the polynomial's coefficients run from the highest degree down.
const EXP_MIN: f32 = -87.0;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_ROUND: f32 = 12_582_912.0;
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_2e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// Softmax of one row into `o`.
fn softmax_row(r: &[f32], o: &mut [f32]) {
    o.copy_from_slice(r);
    let inv = exp_shifted_row(o);
    o.iter_mut().for_each(|v| *v *= inv);
}

/// Row softmax over the last dimension, fused on the CPU, with a backward pass
/// (`dx = s ∘ (g − Σ g∘s)`). candle-nn's fused `softmax_last_dim` has no backward.
struct RowSoftmax;

impl candle_core::CustomOp1 for RowSoftmax {
    fn name(&self) -> &'static str {
        "pfam-row-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("row softmax: input not contiguous".into()))?;
        let x = &s.as_slice::<f32>()?[a..b];
        let n = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .for_each(|(o, r)| softmax_row(r, o));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let s = res.detach();
        let g = grad.detach();
        let dot = (&g * &s)?.sum_keepdim(D::Minus1)?;
        Ok(Some(g.broadcast_sub(&dot)?.mul(&s)?))
    }
}

/// Softmax over the last dimension, differentiable: the fused op for contiguous f32 CPU
/// tensors, candle-nn's composed `softmax` elsewhere.
pub fn softmax_rows(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        Ok(x.contiguous()?.apply_op1(RowSoftmax)?)
    } else {
        Ok(candle_nn::ops::softmax(x, D::Minus1)?)
    }
}

/// DANet's position attention on flattened maps: `q`, `k` are `B × C_qk × N`, `v` is
/// `B × C × N`; returns `B × C × N` with `out[:, i] = Σ_j s_ij · v[:, j]`,
/// `s_i = softmax_j(q_i · k_j)` (no 1/√d scaling, as DANet and the authors' code).
///
/// On the CPU, when no input is tracked by autograd (inference), a fused kernel computes it in
/// blocks of 64 query rows (about `64 × N` floats alive per thread, `chunk` unused). Otherwise
/// [`position_attention_chunked`]: candle ops, `chunk` query positions at a time,
/// differentiable (when tracked, autograd keeps every chunk until backward: training memory is
/// still `O(N²)` per image and scale).
pub fn position_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    chunk: Option<usize>,
) -> Result<Tensor> {
    attention_at(q, k, v, chunk, false)
}

/// [`position_attention`], the fused kernel's two products in bf16 (sums in f32) when `bf16`
/// and the CPU has native bf16 dot products ([`tessera_conv::bf16::supported`]).
fn attention_at(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    chunk: Option<usize>,
    bf16: bool,
) -> Result<Tensor> {
    check_qkv(q, k, v, chunk)?;
    if tessera_core::tensor::untracked_cpu_f32(&[q, k, v]) {
        return attention_fused(q, k, v, bf16 && tessera_conv::bf16::supported());
    }
    position_attention_chunked(q, k, v, chunk)
}

fn check_qkv(q: &Tensor, k: &Tensor, v: &Tensor, chunk: Option<usize>) -> Result<()> {
    let (b, cq, n) = q.dims3()?;
    let (bk, ck, nk) = k.dims3()?;
    let (bv, _, nv) = v.dims3()?;
    if (bk, ck, nk) != (b, cq, n) || (bv, nv) != (b, n) {
        return Err(Error::Config(format!(
            "position attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if chunk == Some(0) {
        return Err(Error::Config("attention chunk must be ≥ 1".into()));
    }
    Ok(())
}

/// [`position_attention`] with candle ops only, `chunk` query rows at a time: the
/// differentiable path (and the one off the CPU); [`position_attention`] takes it whenever an
/// input is tracked by autograd.
pub fn position_attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    chunk: Option<usize>,
) -> Result<Tensor> {
    check_qkv(q, k, v, chunk)?;
    let (b, _, n) = q.dims3()?;
    let chunk = chunk.map_or(n, |c| c.min(n));
    let mut per_image = Vec::with_capacity(b);
    for i in 0..b {
        let qt = q.get(i)?.t()?.contiguous()?; // N × C_qk
        let ki = k.get(i)?.contiguous()?; // C_qk × N
        let vt = v.get(i)?.contiguous()?.t()?; // N × C (a transposed view)
        let mut rows = Vec::with_capacity(n.div_ceil(chunk));
        let mut r0 = 0;
        while r0 < n {
            let m = chunk.min(n - r0);
            let s = softmax_rows(&qt.narrow(0, r0, m)?.matmul(&ki)?)?; // m × N
            rows.push(s.matmul(&vt)?); // m × C
            r0 += m;
        }
        let o = if rows.len() == 1 {
            rows.pop().unwrap()
        } else {
            Tensor::cat(&rows, 0)?
        };
        per_image.push(o.t()?); // C × N
    }
    Ok(Tensor::stack(&per_image, 0)?)
}

/// Query rows per block of the fused attention: a block's `ROWS × N` logits stay in the core's
/// cache between the product with `K`, the softmax and the product with `V`.
const FUSED_ROWS: usize = 64;

thread_local! {
    /// Per-thread logits of a fused-attention block (`FUSED_ROWS × N`), kept across calls
    /// (it was allocated and zeroed per rayon split; page faults per image measured the same
    /// either way, so this only saves the allocation).
    static LOGITS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`position_attention`] for inference on the CPU (nothing tracked by autograd): per block of
/// query rows, logits `Q_rows · K`, the row softmax in place, then `S · Vᵀ` scaled by each row's
/// 1/Σ — the `N × N` attention is never materialised, blocks run in parallel, `q`, `k` and
/// `v` are read where they are stored. Same arithmetic as the chunked path (the same
/// exponential), in a different order.
fn attention_fused(q: &Tensor, k: &Tensor, v: &Tensor, bf16: bool) -> Result<Tensor> {
    use faer::{linalg::matmul::matmul, Accum, MatMut, MatRef, Par};
    let (b, cq, n) = q.dims3()?;
    let c = v.dims()[1];
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    // q, k and v are read in place (borrowed from their storage), not copied out.
    let out = with_f32_slice(&q, |qs| {
        with_f32_slice(&k, |ks| {
            with_f32_slice(&v, |vs| {
                let blocks = n.div_ceil(FUSED_ROWS);
                let mut out = vec![0f32; b * c * n];
                for i in 0..b {
                    let (qs, ks) = (
                        &qs[i * cq * n..(i + 1) * cq * n],
                        &ks[i * cq * n..(i + 1) * cq * n],
                    );
                    let vs = &vs[i * c * n..(i + 1) * c * n];
                    let products = if bf16 {
                        Products::Bf16(Bf16Operands::new(qs, ks, vs, cq, c, n))
                    } else {
                        Products::F32 {
                            qi: MatRef::from_row_major_slice(qs, cq, n),
                            ki: MatRef::from_row_major_slice(ks, cq, n),
                            vi: MatRef::from_row_major_slice(vs, c, n),
                        }
                    };
                    let rows: Vec<(usize, Vec<f32>)> = (0..blocks)
                        .into_par_iter()
                        .map(|bi| {
                            LOGITS.with(|logits| {
                                let mut logits = logits.borrow_mut();
                                if logits.len() < FUSED_ROWS * n {
                                    logits.resize(FUSED_ROWS * n, 0.0);
                                }
                                let r0 = bi * FUSED_ROWS;
                                let m = FUSED_ROWS.min(n - r0);
                                let l = &mut logits[..m * n];
                                let mut o = vec![0f32; m * c];
                                match &products {
                                    Products::F32 { qi, ki, .. } => {
                                        let qt = qi.transpose().subrows(r0, m); // m × C_qk
                                        matmul(
                                            MatMut::from_row_major_slice_mut(l, m, n),
                                            Accum::Replace,
                                            qt,
                                            ki,
                                            1.0f32,
                                            Par::Seq,
                                        );
                                    }
                                    Products::Bf16(ops) => ops.logits(r0, m, l),
                                }
                                let inv = match &products {
                                    Products::F32 { vi, .. } => {
                                        let inv: Vec<f32> =
                                            l.chunks_mut(n).map(exp_shifted_row).collect();
                                        matmul(
                                            MatMut::from_row_major_slice_mut(&mut o, m, c),
                                            Accum::Replace,
                                            MatRef::from_row_major_slice(l, m, n),
                                            vi.transpose(),
                                            1.0f32,
                                            Par::Seq,
                                        );
                                        inv
                                    }
                                    Products::Bf16(ops) => ops.softmax_attend(m, l, &mut o),
                                };
                                o.chunks_mut(c)
                                    .zip(&inv)
                                    .for_each(|(r, &s)| r.iter_mut().for_each(|x| *x *= s));
                                (r0, o)
                            })
                        })
                        .collect();
                    let dst = &mut out[i * c * n..(i + 1) * c * n];
                    for (r0, o) in rows {
                        for (r, row) in o.chunks(c).enumerate() {
                            for (ch, &x) in row.iter().enumerate() {
                                dst[ch * n + r0 + r] = x;
                            }
                        }
                    }
                }
                out
            })
        })
    })???;
    Ok(Tensor::from_vec(out, (b, c, n), q.device())?)
}

/// One image's operands of the fused attention's two products.
enum Products<'a> {
    /// Read in place by faer's f32 GEMM.
    F32 {
        qi: faer::MatRef<'a, f32>,
        ki: faer::MatRef<'a, f32>,
        vi: faer::MatRef<'a, f32>,
    },
    /// Rounded to bf16 and packed once per image ([`Bf16Operands`]).
    Bf16(Bf16Operands),
}

/// The fused attention's operands for bf16 products (only built where the CPU has them):
/// `Qᵀ` as `N × C_qk` rows, `K` (`C_qk × N`) and `Vᵀ` (`N × C`) packed for
/// [`tessera_conv::bf16::mm_bf16`]; the logits and the softmax numerators are rounded as the
/// products read them. Sums stay f32, and so do the exponentials and the normalisation.
struct Bf16Operands {
    qt: Vec<f32>,
    cq: usize,
    k: tessera_conv::bf16::Panels,
    vt: tessera_conv::bf16::Panels,
}

impl Bf16Operands {
    /// From one image's `q` (`C_qk × N`), `k` (`C_qk × N`) and `v` (`C × N`), row-major.
    fn new(q: &[f32], k: &[f32], v: &[f32], cq: usize, c: usize, n: usize) -> Self {
        use tessera_conv::{bf16::Panels, nhwc::transpose_batch};
        let mut qt = vec![0f32; n * cq];
        transpose_batch(q, cq, n, &mut qt);
        let mut vt = vec![0f32; n * c];
        transpose_batch(v, c, n, &mut vt);
        Self {
            k: Panels::pack(k, cq, n, n),
            vt: Panels::pack(&vt, n, c, c),
            qt,
            cq,
        }
    }

    /// `logits (m × N) = Qᵀ[r0..r0 + m] · K`.
    fn logits(&self, r0: usize, m: usize, logits: &mut [f32]) {
        let n = self.k.n();
        assert!(logits.len() >= m * n && (r0 + m) * self.cq <= self.qt.len());
        // SAFETY: built only where the CPU has bf16 products (`attention_at`); the rows of
        // Qᵀ and of the logits are in bounds (asserted).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            tessera_conv::bf16::mm_bf16(
                m,
                self.qt[r0 * self.cq..].as_ptr(),
                self.cq,
                &self.k,
                0,
                n,
                logits.as_mut_ptr(),
                n,
            )
        };
    }

    /// The softmax numerators of `logits` (`m × N`, only read) rounded to bf16, then
    /// `o (m × C) = numerators · Vᵀ`; returns each row's `1/Σ`.
    fn softmax_attend(&self, m: usize, logits: &[f32], o: &mut [f32]) -> Vec<f32> {
        let (n, kp, c) = (self.vt.k(), self.vt.padded_k(), self.vt.n());
        assert!(logits.len() >= m * n && o.len() >= m * c);
        NUMERATORS.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < m * kp {
                buf.resize(m * kp, 0);
            }
            let s = &mut buf[..m * kp];
            let inv = logits
                .chunks(n)
                .take(m)
                .zip(s.chunks_mut(kp))
                .map(|(r, out)| {
                    // The pair's second half when N is odd.
                    out[n..].fill(0);
                    // SAFETY: built only where the CPU has bf16 products (`attention_at`),
                    // which includes AVX-512F; `out` holds N values.
                    #[cfg(target_arch = "x86_64")]
                    return unsafe { exp_shifted_row_bf16(r, out) };
                    #[cfg(not(target_arch = "x86_64"))]
                    unreachable!("bf16 products are only built on x86-64")
                })
                .collect();
            // SAFETY: as in `logits`; `s` is m rows of the padded N, o m × C (asserted).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                tessera_conv::bf16::mm_bf16_rounded(
                    m,
                    s.as_ptr(),
                    kp,
                    &self.vt,
                    0,
                    c,
                    o.as_mut_ptr(),
                    c,
                )
            };
            inv
        })
    }
}

thread_local! {
    /// Per-thread softmax numerators of a fused-attention block in bf16 (`FUSED_ROWS × N`).
    static NUMERATORS: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `α · leaky_relu(a) + r` (or `α · a + r` without a slope) in one parallel pass, for
/// inference on the CPU: candle's `leaky_relu` is five element-wise ops and the scaling and
/// the residual two more, each a pass over the map. The same operations in the same order —
/// `max(a, 0) + (min(a, 0) · slope + 0)`, then `· α`, then `+ r`, with candle's comparisons —
/// so the same values (tested).
fn act_scale_add(a: &Tensor, slope: Option<f64>, alpha: f32, r: &Tensor) -> Result<Tensor> {
    let dims = a.dims().to_vec();
    let out = tessera_core::tensor::with_f32_slices(&[a, r], |sl| {
        let (a, r) = (sl[0], sl[1]);
        let mut out = vec![0f32; a.len()];
        let act = |x: f32| match slope {
            Some(s) => {
                let pos = if x < 0.0 { 0.0 } else { x };
                let neg = if x > 0.0 { 0.0 } else { x };
                pos + (neg * s as f32 + 0.0)
            }
            None => x,
        };
        out.par_chunks_mut(1 << 14)
            .zip(a.par_chunks(1 << 14).zip(r.par_chunks(1 << 14)))
            .for_each(|(o, (a, r))| {
                for ((o, &x), &r) in o.iter_mut().zip(a).zip(r) {
                    *o = act(x) * alpha + r;
                }
            });
        out
    })?;
    Ok(Tensor::from_vec(out, dims, a.device())?)
}

/// `e^(x − max)` of a row in place; returns `1 / Σ` (the softmax's normalisation, applied by
/// the caller to the much smaller product with `V`). On x86-64 with AVX2 (runtime detection)
/// eight lanes at a time with the same operations in the same order, so the result is the same
/// to the bit (tested): the default build targets SSE2, and the exponential was a third of
/// PFAM's inference time.
fn exp_shifted_row(r: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present (checked just above).
            return unsafe { exp_shifted_row_avx512(r) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked just above).
            return unsafe { exp_shifted_row_avx2(r) };
        }
    }
    exp_shifted_row_portable(r)
}

/// [`exp_shifted_row`] in portable code (what the compiler vectorises for the build target).
fn exp_shifted_row_portable(r: &mut [f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut it = r.chunks_exact(8);
    for c in &mut it {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    let m = it
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
    r.iter_mut().for_each(|v| *v = exp_nonpositive(*v - m));
    let mut sums = [0f32; 8];
    let mut it = r.chunks_exact(8);
    for c in &mut it {
        for (s, &v) in sums.iter_mut().zip(c) {
            *s += v;
        }
    }
    1.0 / (it.remainder().iter().sum::<f32>() + sums.iter().sum::<f32>())
}

/// [`exp_shifted_row_portable`] with AVX2 intrinsics: lane `l` of each vector is element `l` of
/// the portable loop's 8-wide chunks, every operation the portable one does (no fused
/// multiply-add, which would round differently), the sums accumulated in the same order.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp_shifted_row_avx2(r: &mut [f32]) -> f32 {
    use std::arch::x86_64::*;
    let full = r.len() / 8 * 8;
    let (body, tail) = r.split_at_mut(full);
    let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
    for c in body.chunks_exact(8) {
        // max_ps(v, l) is `v > l ? v : l`, the portable comparison.
        vmax = _mm256_max_ps(_mm256_loadu_ps(c.as_ptr()), vmax);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
    let m = tail
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
    let set = |v: f32| _mm256_set1_ps(v);
    let vm = set(m);
    let lo = set(EXP_MIN);
    let mut sums = _mm256_setzero_ps();
    for c in body.chunks_exact_mut(8) {
        let x = _mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), vm);
        // `x < −87 ? −87 : x` (NaN stays NaN, as in the portable code).
        let x = _mm256_blendv_ps(x, lo, _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo));
        let rnd = set(EXP_ROUND);
        let n = _mm256_sub_ps(
            _mm256_add_ps(_mm256_mul_ps(x, set(std::f32::consts::LOG2_E)), rnd),
            rnd,
        );
        let rr = _mm256_sub_ps(
            _mm256_sub_ps(x, _mm256_mul_ps(n, set(LN2_HI))),
            _mm256_mul_ps(n, set(LN2_LO)),
        );
        let mut p = set(EXP_POLY[0]);
        for &k in &EXP_POLY[1..] {
            p = _mm256_add_ps(_mm256_mul_ps(p, rr), set(k));
        }
        let e = _mm256_add_ps(
            _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, rr), rr), rr),
            set(1.0),
        );
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvttps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let y = _mm256_mul_ps(e, _mm256_castsi256_ps(pow2));
        _mm256_storeu_ps(c.as_mut_ptr(), y);
        sums = _mm256_add_ps(sums, y);
    }
    tail.iter_mut().for_each(|v| *v = exp_nonpositive(*v - m));
    _mm256_storeu_ps(lanes.as_mut_ptr(), sums);
    1.0 / (tail.iter().sum::<f32>() + lanes.iter().sum::<f32>())
}

/// `e^x` of sixteen lanes with `x ≤ 0` (the shifted logits), AVX-512F: clamp at −87 (NaN
/// stays NaN: `max_ps` returns its second operand when one is NaN), `n = round(x·log₂e)`,
/// `x − n·ln 2` in two parts, the degree-6 polynomial, then `scalef` by `2^n` (exactly the
/// product with `2^n` put in the exponent bits, in one instruction). A macro so that it is
/// inlined into each caller with that caller's target features.
#[cfg(target_arch = "x86_64")]
macro_rules! exp16_avx512 {
    ($x:expr) => {{
        use std::arch::x86_64::*;
        let set = |v: f32| _mm512_set1_ps(v);
        let x = _mm512_max_ps(set(EXP_MIN), $x);
        let rnd = set(EXP_ROUND);
        let n = _mm512_sub_ps(_mm512_fmadd_ps(x, set(std::f32::consts::LOG2_E), rnd), rnd);
        let rr = _mm512_fmadd_ps(n, set(-LN2_LO), _mm512_fmadd_ps(n, set(-LN2_HI), x));
        let mut p = set(EXP_POLY[0]);
        for &k in &EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, rr, set(k));
        }
        let e = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, rr), rr, rr), set(1.0));
        _mm512_scalef_ps(e, n)
    }};
}

/// The maximum of a row (NaNs passed over, as the portable comparison), sixteen lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_max_avx512(r: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let full = r.len() / 16 * 16;
    let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
    for c in r[..full].chunks_exact(16) {
        // max_ps(v, l) is `v > l ? v : l`, the portable comparison (a NaN is passed over).
        vmax = _mm512_max_ps(_mm512_loadu_ps(c.as_ptr()), vmax);
    }
    let mut lanes = [0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), vmax);
    r[full..]
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a })
}

/// [`exp_shifted_row_portable`] sixteen lanes wide with fused multiply-adds (AVX-512F, which
/// includes them): the same scheme ([`exp16_avx512`]) with each multiply-add rounded once, so
/// about a third fewer operations (the exponential was a third of the attention's time). Not
/// the portable loop's bits: within 2 ulp of it per element (tested), the sum in 16 lanes.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_shifted_row_avx512(r: &mut [f32]) -> f32 {
    use std::arch::x86_64::*;
    let m = row_max_avx512(r);
    let full = r.len() / 16 * 16;
    let (body, tail) = r.split_at_mut(full);
    let vm = _mm512_set1_ps(m);
    let mut sums = _mm512_setzero_ps();
    for c in body.chunks_exact_mut(16) {
        let y = exp16_avx512!(_mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), vm));
        _mm512_storeu_ps(c.as_mut_ptr(), y);
        sums = _mm512_add_ps(sums, y);
    }
    tail.iter_mut().for_each(|v| *v = exp_nonpositive(*v - m));
    let mut lanes = [0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), sums);
    1.0 / (tail.iter().sum::<f32>() + lanes.iter().sum::<f32>())
}

/// [`exp_shifted_row_avx512`] for the bf16 product: the same exponentials, written rounded to
/// bf16 into `out` (`r` is only read) instead of back as f32 — what the product would round
/// them to, in the same instruction, so no f32 row is written and read again; `1/Σ` of the
/// unrounded values, as before. `out` must hold `r.len()` values.
///
/// # Safety
/// The CPU must support AVX-512F and AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn exp_shifted_row_bf16(r: &[f32], out: &mut [u16]) -> f32 {
    use std::arch::x86_64::*;
    assert!(out.len() >= r.len());
    let m = row_max_avx512(r);
    let vm = _mm512_set1_ps(m);
    let mut sums = _mm512_setzero_ps();
    let round_store = |y: __m512, dst: *mut u16| {
        let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(y));
        _mm256_storeu_si256(dst as *mut __m256i, h);
    };
    let full = r.len() / 16 * 16;
    for (i, c) in r[..full].chunks_exact(16).enumerate() {
        let y = exp16_avx512!(_mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), vm));
        round_store(y, out.as_mut_ptr().add(16 * i));
        sums = _mm512_add_ps(sums, y);
    }
    let mut lanes = [0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), sums);
    let mut sum = lanes.iter().sum::<f32>();
    let left = r.len() - full;
    if left > 0 {
        // The tail as the f32 path computes it, rounded by the same instruction.
        let mut t = [0f32; 16];
        for (d, &v) in t.iter_mut().zip(&r[full..]) {
            *d = exp_nonpositive(v - m);
        }
        sum += t[..left].iter().sum::<f32>();
        let mut h = [0u16; 16];
        round_store(_mm512_loadu_ps(t.as_ptr()), h.as_mut_ptr());
        out[full..r.len()].copy_from_slice(&h[..left]);
    }
    1.0 / sum
}

/// Position attention block on `C` channels: 1×1 convolutions (with bias) make `P` (query),
/// `K` (key) and `V` (value), then `E = α · act(attention(P, K, V)) + residual`. Parameters
/// `query.{weight,bias}`, `key.{weight,bias}`, `value.{weight,bias}` and `alpha` (shape `[1]`,
/// initialised to 0).
#[derive(Debug, Clone)]
pub struct PositionAttention {
    prefix: String,
    channels: usize,
    cfg: PamConfig,
    query: (Tensor, Tensor),
    key: (Tensor, Tensor),
    value: (Tensor, Tensor),
    alpha: Tensor,
    /// Inference setting: the fused attention's products in bf16 where the CPU has them.
    bf16: bool,
}

impl PositionAttention {
    /// Query/key width for `channels` input channels.
    pub fn qk_channels(channels: usize, qk_reduction: usize) -> usize {
        (channels / qk_reduction.max(1)).max(1)
    }

    pub(crate) fn from_source(cfg: PamConfig, channels: usize, src: &Source) -> Result<Self> {
        if channels == 0 {
            return Err(Error::Config("position attention needs ≥ 1 channel".into()));
        }
        if cfg.qk_reduction == 0 {
            return Err(Error::Config("pam: qk_reduction must be ≥ 1".into()));
        }
        if cfg.chunk == Some(0) {
            return Err(Error::Config("pam: attention chunk must be ≥ 1".into()));
        }
        let cq = Self::qk_channels(channels, cfg.qk_reduction);
        let init = Init::torch_default(channels);
        let conv = |name: &str, out: usize| -> Result<(Tensor, Tensor)> {
            let w = src.get(&[out, channels, 1, 1], &format!("{name}.weight"), init)?;
            let b = src.get(&[out], &format!("{name}.bias"), init)?;
            Ok((w, b))
        };
        let query = conv("query", cq)?;
        let key = conv("key", cq)?;
        let value = conv("value", channels)?;
        let alpha = src.get(&[1], "alpha", Init::Const(0.0))?;
        Ok(Self {
            prefix: src.full(""),
            channels,
            cfg,
            query,
            key,
            value,
            alpha,
            bf16: false,
        })
    }

    /// The attended values before scaling, `act(V · Sᵀ)`, `B × C × H × W`.
    pub fn attend(&self, x: &Tensor) -> Result<Tensor> {
        let out = self.attention_out(x)?;
        Ok(match self.cfg.leaky_slope {
            Some(s) => candle_nn::ops::leaky_relu(&out, s)?,
            None => out,
        })
    }

    /// `V · Sᵀ` before the activation, `B × C × H × W`.
    fn attention_out(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != self.channels {
            return Err(Error::Config(format!(
                "position attention: built for {} channels, input has {c}",
                self.channels
            )));
        }
        let n = h * w;
        let p1 = ConvParams::default();
        let proj = |(wt, bs): &(Tensor, Tensor)| -> Result<Tensor> {
            let y = conv2d(x, wt, Some(bs), p1, false)?;
            let co = y.dims()[1];
            Ok(y.reshape((b, co, n))?)
        };
        let (q, k, v) = (proj(&self.query)?, proj(&self.key)?, proj(&self.value)?);
        Ok(attention_at(&q, &k, &v, self.cfg.chunk, self.bf16)?.reshape((b, c, h, w))?)
    }

    /// `α · attend(x) + residual` (the residual has `x`'s shape).
    pub fn forward_with_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if residual.dims() != x.dims() {
            return Err(Error::Config(format!(
                "position attention: residual {:?} does not match input {:?}",
                residual.dims(),
                x.dims()
            )));
        }
        let out = self.attention_out(x)?;
        if tessera_core::tensor::untracked_cpu_f32(&[&out, residual, &self.alpha]) {
            let alpha = self.alpha.flatten_all()?.to_vec1::<f32>()?[0];
            return act_scale_add(&out, self.cfg.leaky_slope, alpha, residual);
        }
        let act = match self.cfg.leaky_slope {
            Some(s) => candle_nn::ops::leaky_relu(&out, s)?,
            None => out,
        };
        Ok(act.broadcast_mul(&self.alpha)?.add(residual)?)
    }

    /// `α · attend(x) + x` (DANet's form).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with_residual(x, x)
    }

    /// The configuration.
    pub fn config(&self) -> &PamConfig {
        &self.cfg
    }

    /// Change the attention chunk (an inference-time setting; no parameter depends on it).
    pub fn set_chunk(&mut self, chunk: Option<usize>) -> Result<()> {
        if chunk == Some(0) {
            return Err(Error::Config("pam: attention chunk must be ≥ 1".into()));
        }
        self.cfg.chunk = chunk;
        Ok(())
    }

    /// Run the inference attention's two products in bf16 (sums in f32) on CPUs with native
    /// bf16 dot products, f32 elsewhere (an inference setting, like the backbone's precision).
    pub fn set_bf16_products(&mut self, on: bool) {
        self.bf16 = on;
    }

    /// The learned scale α.
    pub fn alpha(&self) -> &Tensor {
        &self.alpha
    }

    /// The parameters with their full names.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let j = |n: &str| crate::join(&self.prefix, n);
        vec![
            (j("query.weight"), self.query.0.clone()),
            (j("query.bias"), self.query.1.clone()),
            (j("key.weight"), self.key.0.clone()),
            (j("key.bias"), self.key.1.clone()),
            (j("value.weight"), self.value.0.clone()),
            (j("value.bias"), self.value.1.clone()),
            (j("alpha"), self.alpha.clone()),
        ]
    }

    /// A copy whose parameters are detached from autograd.
    pub fn detached(&self) -> Self {
        let d = |(w, b): &(Tensor, Tensor)| (w.detach(), b.detach());
        Self {
            prefix: self.prefix.clone(),
            channels: self.channels,
            cfg: self.cfg,
            query: d(&self.query),
            key: d(&self.key),
            value: d(&self.value),
            alpha: self.alpha.detach(),
            bf16: self.bf16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused attention with bf16 products (where the CPU has them) against f32: the
    /// logits (up to ±10 here) are off by ~2⁻⁸ of Σ|q||k|, so the weights by a few percent, and
    /// every output, a weighted mean of V, by a small fraction of max |V|. Not equal either:
    /// the bf16 path ran.
    #[test]
    fn bf16_attention_is_close_to_f32() {
        if !tessera_conv::bf16::supported() {
            eprintln!("SKIPPED: this CPU has no AVX512-BF16 (the attention stays f32 here)");
            return;
        }
        let mut rng = tessera_core::test_util::Lcg(3);
        let dev = candle_core::Device::Cpu;
        let mut t = |c: usize, n: usize, scale: f32| {
            let d: Vec<f32> = (0..2 * c * n).map(|_| rng.signed() * scale).collect();
            Tensor::from_vec(d, (2, c, n), &dev).unwrap()
        };
        let (q, k, v) = (t(8, 300, 1.0), t(8, 300, 1.0), t(16, 300, 1.0));
        let f = attention_at(&q, &k, &v, None, false).unwrap();
        let b = attention_at(&q, &k, &v, None, true).unwrap();
        let err = tessera_core::test_util::max_abs_diff(&f, &b);
        eprintln!("bf16 attention: max abs difference {err:.2e} from f32");
        assert!(err > 0.0, "the bf16 products did not run");
        assert!(err < 2e-2, "bf16 attention off by {err} (V within ±1)");
    }

    /// The fused activation, scaling and residual give candle's ops' values exactly.
    #[test]
    fn fused_tail_equals_the_candle_ops() {
        let mut rng = tessera_core::test_util::Lcg(9);
        let dev = candle_core::Device::Cpu;
        let n = 2 * 8 * 70 * 71; // across the parallel chunks
        let mut a: Vec<f32> = (0..n).map(|_| rng.signed() * 5.0).collect();
        a[..4].copy_from_slice(&[0.0, -0.0, 1e-30, -1e-30]);
        let r: Vec<f32> = (0..n).map(|_| rng.signed()).collect();
        let a = Tensor::from_vec(a, (2, 8, 70, 71), &dev).unwrap();
        let r = Tensor::from_vec(r, (2, 8, 70, 71), &dev).unwrap();
        for slope in [Some(0.01), Some(0.2), None] {
            for alpha in [0.0f32, -3.7e-4, 1.25] {
                let at = Tensor::new(&[alpha], &dev).unwrap();
                let act = match slope {
                    Some(s) => candle_nn::ops::leaky_relu(&a, s).unwrap(),
                    None => a.clone(),
                };
                let want = act.broadcast_mul(&at).unwrap().add(&r).unwrap();
                let got = act_scale_add(&a, slope, alpha, &r).unwrap();
                let (g, w): (Vec<f32>, Vec<f32>) = (
                    got.flatten_all().unwrap().to_vec1().unwrap(),
                    want.flatten_all().unwrap().to_vec1().unwrap(),
                );
                for (i, (x, y)) in g.iter().zip(&w).enumerate() {
                    assert_eq!(x.to_bits(), y.to_bits(), "{slope:?} α {alpha} at {i}");
                }
            }
        }
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -(i as f32) * 100.0 / 200_000.0;
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            if x > -87.0 {
                worst = worst.max(((got - want) / want).abs());
            } else {
                assert!(got < 2e-38);
            }
        }
        assert!(worst < 5e-7, "relative error {worst:e}");
        assert!(exp_nonpositive(f32::NAN).is_nan());
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 2e-38);
    }

    /// Rows for the vector exponentials: lengths around the 8- and 16-lane boundaries and the
    /// 56 × 56 row; values from −200 to 40 (clamped, ordinary), ±0, infinities and a NaN in
    /// some rows, and a row of small values.
    fn exp_rows() -> Vec<(String, Vec<f32>)> {
        let mut state = 0x9e37_79b9_u32;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as f32 / u32::MAX as f32
        };
        let mut rows = Vec::new();
        for n in (0..=41).chain([3136]) {
            for case in 0..4 {
                let mut r: Vec<f32> = (0..n).map(|_| next() * 240.0 - 200.0).collect();
                if case == 1 && n > 2 {
                    r[0] = f32::NEG_INFINITY;
                    r[n - 1] = -0.0;
                    r[1] = 0.0;
                }
                if case == 2 && n > 0 {
                    r[n / 2] = f32::NAN;
                }
                if case == 3 {
                    r.iter_mut().for_each(|v| *v *= 1e-3);
                }
                rows.push((format!("n {n} case {case}"), r));
            }
        }
        rows
    }

    #[test]
    fn the_avx2_exponential_equals_the_portable_one_to_the_bit() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            for (what, r) in exp_rows() {
                let (mut a, mut b) = (r.clone(), r);
                // SAFETY: AVX2 is present (checked above).
                let sa = unsafe { exp_shifted_row_avx2(&mut a) };
                let sb = exp_shifted_row_portable(&mut b);
                assert_eq!(sa.to_bits(), sb.to_bits(), "{what}: 1/sum");
                for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                    assert_eq!(x.to_bits(), y.to_bits(), "{what} at {i}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn the_avx512_exponential_is_within_two_ulp_of_the_portable_one() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            let ulps = |x: f32, y: f32| (x.to_bits() as i64 - y.to_bits() as i64).abs();
            for (what, r) in exp_rows() {
                let (mut a, mut b) = (r.clone(), r);
                // SAFETY: AVX-512F is present (checked above).
                let sa = unsafe { exp_shifted_row_avx512(&mut a) };
                let sb = exp_shifted_row_portable(&mut b);
                assert_eq!(sa.is_nan(), sb.is_nan(), "{what}: 1/sum {sa} vs {sb}");
                if !sb.is_nan() && sa != sb {
                    // The sums run in 16 lanes instead of 8.
                    assert!((sa - sb).abs() <= 1e-6 * sb.abs(), "{what}: {sa} vs {sb}");
                }
                for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
                    assert_eq!(x.is_nan(), y.is_nan(), "{what} at {i}: {x} vs {y}");
                    if !y.is_nan() {
                        assert!(ulps(x, y) <= 2, "{what} at {i}: {x} vs {y}");
                    }
                }
            }
        }
    }

    /// The bf16 product's exponentials are the f32 ones rounded by the instruction the
    /// product used to round them with: the same bits, and the same `1/Σ`.
    #[test]
    fn the_bf16_exponential_is_the_f32_one_rounded() {
        #[cfg(target_arch = "x86_64")]
        if tessera_conv::bf16::supported() {
            for (what, r) in exp_rows() {
                let mut f = r.clone();
                // SAFETY: AVX-512F and AVX512-BF16 are present (checked above).
                let (sf, want, sb, got) = unsafe {
                    let sf = exp_shifted_row_avx512(&mut f);
                    let mut want = vec![0u16; r.len()];
                    tessera_conv::bf16::round_row(&f, &mut want);
                    let mut got = vec![0u16; r.len()];
                    (sf, want, exp_shifted_row_bf16(&r, &mut got), got)
                };
                assert_eq!(sf.to_bits(), sb.to_bits(), "{what}: 1/sum {sf} vs {sb}");
                assert_eq!(want, got, "{what}");
            }
        }
    }

    #[test]
    fn row_softmax_handles_ragged_rows() {
        for n in [1usize, 7, 8, 9, 33] {
            let r: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32) - 3.0).collect();
            let mut o = vec![0f32; n];
            softmax_row(&r, &mut o);
            let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = r.iter().map(|&v| ((v - m) as f64).exp()).sum();
            for (&ov, &rv) in o.iter().zip(&r) {
                let want = ((rv - m) as f64).exp() / z;
                assert!((ov as f64 - want).abs() < 1e-6, "n {n}");
            }
        }
    }
}

crate::params::block_constructors!(
    PositionAttention,
    PamConfig,
    "with parameters `query.*`, `key.*`, `value.*`, `alpha`",
    "`{prefix}.query.weight`, …, `{prefix}.alpha`"
);
