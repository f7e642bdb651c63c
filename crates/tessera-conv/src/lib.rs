//! # tessera-conv
//!
//! Fast CPU 2-D convolution for candle, in three forms:
//!
//! - [`nhwc`] — the **inference** path of frozen feature extraction: activations kept
//!   channels-last (NHWC) between layers, weights packed once ([`PackedConv`]), convolution as
//!   tiled im2col-GEMM (one single-threaded GEMM per tile of output pixels, so small layers
//!   still split across threads), 1×1 stride-1 as a GEMM on the input itself, Winograd
//!   F(2×2, 3×3) for 3×3 stride-1 convolutions (2.25× fewer multiplications), bias + residual +
//!   ReLU fused into the tile epilogue, parallel max-pool and layout changes, recycled buffers;
//! - [`nhwc_train`] — the **training** path: the same kernel as a differentiable candle custom
//!   op on NHWC tensors ([`conv2d_nhwc`]), with GEMM-based input gradient (GEMM + scatter per
//!   image) and weight gradient (per-thread partial sums), a parallel bias gradient, and the
//!   residual join [`add_relu`]; gradients nobody needs are skipped;
//! - [`conv2d`] — a differentiable custom op on ordinary NCHW tensors (PFAM, the CFA
//!   descriptor): per image and group, parallel im2col into one GEMM written straight into
//!   NCHW, fused bias/ReLU, GEMM-based backward with a parallel col2im.
//!
//! f32 tensors on the CPU take these kernels; everything else takes candle's own `conv2d` (so
//! CUDA keeps candle's kernels). GEMMs use the `gemm` crate with its AVX-512 kernels enabled
//! (runtime-detected; AVX2/FMA elsewhere).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use tessera_conv::{conv2d, ConvParams, Nhwc, PackedConv};
//! let x = Tensor::randn(0f32, 1., (2, 4, 9, 9), &Device::Cpu)?;
//! let w = Tensor::randn(0f32, 1., (6, 4, 3, 3), &Device::Cpu)?;
//! let b = Tensor::zeros(6, candle_core::DType::F32, &Device::Cpu)?;
//! let p = ConvParams { stride: 2, padding: 1, ..Default::default() };
//! let ours = conv2d(&x, &w, Some(&b), p, false)?;
//! let theirs = x.conv2d(&w, 1, 2, 1, 1)?;
//! let err = (&ours - &theirs)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
//! assert!(err < 1e-4);
//!
//! // The same convolution on the inference path: pack once, run on NHWC activations.
//! let packed = PackedConv::from_tensors(&w, Some(&b), p)?.with_winograd();
//! let y = packed.forward(&Nhwc::from_tensor(&x)?, None, false)?.to_tensor(&Device::Cpu)?;
//! let err = (y - theirs)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
//! assert!(err < 1e-4);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

pub mod nhwc;
pub mod nhwc_train;
pub use nhwc::{max_pool, Nhwc, NhwcView, PackedConv};
pub use nhwc_train::{add_relu, conv2d_nhwc, to_nchw, to_nhwc};

/// Convolution hyper-parameters (square kernels' stride/padding/dilation, as candle's `conv2d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvParams {
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub groups: usize,
}

impl Default for ConvParams {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
        }
    }
}

/// Everything the kernels need about one convolution.
#[derive(Debug, Clone, Copy)]
struct Geom {
    b: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
    p: ConvParams,
}

impl Geom {
    fn new(x: &[usize], w: &[usize], p: ConvParams) -> Result<Self> {
        let (&[b, c_in, h, wd], &[c_out, cpg, kh, kw]) = (x, w) else {
            candle_core::bail!("conv2d expects 4-D input and weight, got {x:?} and {w:?}");
        };
        if p.groups == 0 || c_in % p.groups != 0 || c_out % p.groups != 0 || cpg != c_in / p.groups
        {
            candle_core::bail!(
                "conv2d: input {x:?} and weight {w:?} do not fit groups {}",
                p.groups
            );
        }
        if p.stride == 0 || p.dilation == 0 {
            candle_core::bail!("conv2d: stride and dilation must be ≥ 1");
        }
        let eff_h = p.dilation * (kh - 1) + 1;
        let eff_w = p.dilation * (kw - 1) + 1;
        if h + 2 * p.padding < eff_h || wd + 2 * p.padding < eff_w {
            candle_core::bail!("conv2d: kernel larger than padded input");
        }
        let ho = (h + 2 * p.padding - eff_h) / p.stride + 1;
        let wo = (wd + 2 * p.padding - eff_w) / p.stride + 1;
        Ok(Self {
            b,
            c_in,
            h,
            w: wd,
            c_out,
            kh,
            kw,
            ho,
            wo,
            p,
        })
    }
    fn cg(&self) -> usize {
        self.c_in / self.p.groups
    }
    fn og(&self) -> usize {
        self.c_out / self.p.groups
    }
    /// Rows of one group's column buffer.
    fn kg(&self) -> usize {
        self.cg() * self.kh * self.kw
    }
    fn hw_out(&self) -> usize {
        self.ho * self.wo
    }
    /// A 1×1, stride-1, unpadded convolution: the input already is the column buffer.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.p.stride == 1 && self.p.padding == 0
    }
}

/// The output columns `ow` whose input column `ow·s − pad + kj·d` lies inside `0..w`.
fn valid_cols(g: &Geom, kj: usize) -> (usize, usize) {
    let (s, off) = (
        g.p.stride as isize,
        kj as isize * g.p.dilation as isize - g.p.padding as isize,
    );
    // smallest ow with ow·s + off ≥ 0, and first ow with ow·s + off ≥ w
    let lo = if off >= 0 {
        0
    } else {
        ((-off) as usize).div_ceil(g.p.stride)
    };
    let hi_num = g.w as isize - off;
    let hi = if hi_num <= 0 {
        0
    } else {
        (hi_num as usize).div_ceil(s as usize)
    };
    (lo.min(g.wo), hi.min(g.wo).max(lo.min(g.wo)))
}

/// im2col of channels `c0..c0+cg` of one image (`C × H × W`) into `cols` (`cg·kh·kw × ho·wo`).
fn im2col(x: &[f32], g: &Geom, c0: usize, cols: &mut [f32]) {
    let (hw_out, s, pad, d) = (
        g.hw_out(),
        g.p.stride as isize,
        g.p.padding as isize,
        g.p.dilation as isize,
    );
    cols.par_chunks_mut(hw_out)
        .enumerate()
        .for_each(|(r, row)| {
            let c = c0 + r / (g.kh * g.kw);
            let ki = ((r / g.kw) % g.kh) as isize;
            let kj = r % g.kw;
            let (lo, hi) = valid_cols(g, kj);
            let first_iw = lo as isize * s - pad + kj as isize * d;
            let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
            for oh in 0..g.ho {
                let ih = oh as isize * s - pad + ki * d;
                let out = &mut row[oh * g.wo..(oh + 1) * g.wo];
                if ih < 0 || ih >= g.h as isize || lo >= hi {
                    out.fill(0.0);
                    continue;
                }
                let src = &plane[ih as usize * g.w..(ih as usize + 1) * g.w];
                out[..lo].fill(0.0);
                out[hi..].fill(0.0);
                let start = first_iw as usize;
                if s == 1 {
                    out[lo..hi].copy_from_slice(&src[start..start + (hi - lo)]);
                } else {
                    for (o, i) in out[lo..hi].iter_mut().zip((start..).step_by(s as usize)) {
                        *o = src[i];
                    }
                }
            }
        });
}

/// Scatter-add columns back into channels `c0..c0+cg` of one image's gradient (`C × H × W`).
/// Parallel over input channels: the rows of one channel touch only that channel.
fn col2im(cols: &[f32], g: &Geom, c0: usize, dx: &mut [f32]) {
    let (hw_out, s, pad, d) = (
        g.hw_out(),
        g.p.stride as isize,
        g.p.padding as isize,
        g.p.dilation as isize,
    );
    let plane_len = g.h * g.w;
    dx[c0 * plane_len..(c0 + g.cg()) * plane_len]
        .par_chunks_mut(plane_len)
        .enumerate()
        .for_each(|(ci, plane)| {
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let (lo, hi) = valid_cols(g, kj);
                    if lo >= hi {
                        continue;
                    }
                    let first_iw = (lo as isize * s - pad + kj as isize * d) as usize;
                    let r = (ci * g.kh + ki) * g.kw + kj;
                    let row = &cols[r * hw_out..(r + 1) * hw_out];
                    for oh in 0..g.ho {
                        let ih = oh as isize * s - pad + ki as isize * d;
                        if ih < 0 || ih >= g.h as isize {
                            continue;
                        }
                        let dst = &mut plane[ih as usize * g.w..(ih as usize + 1) * g.w];
                        let src = &row[oh * g.wo + lo..oh * g.wo + hi];
                        for (v, i) in src.iter().zip((first_iw..).step_by(s as usize)) {
                            dst[i] += v;
                        }
                    }
                }
            }
        });
}

/// Row-major `dst (m × n) = [dst +] a (m × k) · b (k × n)` with arbitrary strides on `a` and `b`.
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: &[f32],
    a_rs: isize,
    a_cs: isize,
    b: &[f32],
    b_rs: isize,
    b_cs: isize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    debug_assert!(dst.len() >= m * n);
    // SAFETY: the slices cover every element addressed by (m, n, k) and the given strides (checked
    // by the callers' shapes); dst does not alias a or b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        )
    }
}

pub(crate) fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("tessera conv2d: {what} must be contiguous"),
    }
}

/// Forward: `y = act(conv(x, w) + b)`.
#[derive(Debug, Clone, Copy)]
struct ConvFwd {
    p: ConvParams,
    relu: bool,
}

impl CustomOp3 for ConvFwd {
    fn name(&self) -> &'static str {
        "tessera-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(xl.dims(), wl.dims(), self.p)?;
        let (x, w, bias) = (
            contiguous(xs, xl, "input")?,
            contiguous(ws, wl, "weight")?,
            contiguous(bs, bl, "bias")?,
        );
        let (hw_in, hw_out, kg, og, cg) = (g.h * g.w, g.hw_out(), g.kg(), g.og(), g.cg());
        let mut y = vec![0f32; g.b * g.c_out * hw_out];
        let mut cols = if g.is_pointwise() {
            Vec::new()
        } else {
            vec![0f32; kg * hw_out]
        };
        for n in 0..g.b {
            let xi = &x[n * g.c_in * hw_in..(n + 1) * g.c_in * hw_in];
            let yi = &mut y[n * g.c_out * hw_out..(n + 1) * g.c_out * hw_out];
            for grp in 0..g.p.groups {
                let wg = &w[grp * og * kg..(grp + 1) * og * kg];
                let rhs: &[f32] = if g.is_pointwise() {
                    &xi[grp * cg * hw_in..(grp + 1) * cg * hw_in]
                } else {
                    im2col(xi, &g, grp * cg, &mut cols);
                    &cols
                };
                let out = &mut yi[grp * og * hw_out..(grp + 1) * og * hw_out];
                gemm_f32(
                    og,
                    hw_out,
                    kg,
                    out,
                    false,
                    wg,
                    kg as isize,
                    1,
                    rhs,
                    hw_out as isize,
                    1,
                );
            }
            let relu = self.relu;
            yi.par_chunks_mut(hw_out)
                .zip(bias.par_iter())
                .for_each(|(row, &bv)| {
                    if relu {
                        row.iter_mut().for_each(|v| *v = (*v + bv).max(0.0));
                    } else {
                        row.iter_mut().for_each(|v| *v += bv);
                    }
                });
        }
        Ok((CpuStorage::F32(y), Shape::from((g.b, g.c_out, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = if self.relu {
            grad.mul(&res.gt(0f32)?.to_dtype(DType::F32)?)?
        } else {
            grad.clone()
        };
        let grad = grad.contiguous()?;
        let dx = grad.apply_op2_no_bwd(
            &w.contiguous()?,
            &ConvBwdData {
                p: self.p,
                x_dims: x.dims4()?,
            },
        )?;
        let dw = x.contiguous()?.apply_op2_no_bwd(
            &grad,
            &ConvBwdFilter {
                p: self.p,
                w_dims: w.dims4()?,
            },
        )?;
        let db = grad.sum((0, 2, 3))?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Input gradient: `dX = col2im(Wᵀ · dY)`; operands (dY, W).
struct ConvBwdData {
    p: ConvParams,
    x_dims: (usize, usize, usize, usize),
}

impl CustomOp2 for ConvBwdData {
    fn name(&self) -> &'static str {
        "tessera-conv2d-bwd-data"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, wd) = self.x_dims;
        let g = Geom::new(&[b, c, h, wd], wl.dims(), self.p)?;
        let (dy, w) = (
            contiguous(gs, gl, "gradient")?,
            contiguous(ws, wl, "weight")?,
        );
        let (hw_in, hw_out, kg, og, cg) = (h * wd, g.hw_out(), g.kg(), g.og(), g.cg());
        let mut dx = vec![0f32; b * c * hw_in];
        let mut cols = vec![0f32; kg * hw_out];
        for n in 0..b {
            let dyi = &dy[n * g.c_out * hw_out..(n + 1) * g.c_out * hw_out];
            let dxi = &mut dx[n * c * hw_in..(n + 1) * c * hw_in];
            for grp in 0..self.p.groups {
                let wg = &w[grp * og * kg..(grp + 1) * og * kg];
                let dyg = &dyi[grp * og * hw_out..(grp + 1) * og * hw_out];
                if g.is_pointwise() {
                    // The columns are the input: write the GEMM straight into dX.
                    let dst = &mut dxi[grp * cg * hw_in..(grp + 1) * cg * hw_in];
                    gemm_f32(
                        kg,
                        hw_out,
                        og,
                        dst,
                        false,
                        wg,
                        1,
                        kg as isize,
                        dyg,
                        hw_out as isize,
                        1,
                    );
                } else {
                    gemm_f32(
                        kg,
                        hw_out,
                        og,
                        &mut cols,
                        false,
                        wg,
                        1,
                        kg as isize,
                        dyg,
                        hw_out as isize,
                        1,
                    );
                    col2im(&cols, &g, grp * cg, dxi);
                }
            }
        }
        Ok((CpuStorage::F32(dx), Shape::from(self.x_dims)))
    }
}

/// Weight gradient: `dW = Σ_images dY · colsᵀ`; operands (X, dY).
struct ConvBwdFilter {
    p: ConvParams,
    w_dims: (usize, usize, usize, usize),
}

impl CustomOp2 for ConvBwdFilter {
    fn name(&self) -> &'static str {
        "tessera-conv2d-bwd-filter"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (o, cpg, kh, kw) = self.w_dims;
        let g = Geom::new(xl.dims(), &[o, cpg, kh, kw], self.p)?;
        let (x, dy) = (
            contiguous(xs, xl, "input")?,
            contiguous(gs, gl, "gradient")?,
        );
        let (hw_in, hw_out, kg, og, cg) = (g.h * g.w, g.hw_out(), g.kg(), g.og(), g.cg());
        let mut dw = vec![0f32; o * kg];
        let mut cols = if g.is_pointwise() {
            Vec::new()
        } else {
            vec![0f32; kg * hw_out]
        };
        for n in 0..g.b {
            let xi = &x[n * g.c_in * hw_in..(n + 1) * g.c_in * hw_in];
            let dyi = &dy[n * g.c_out * hw_out..(n + 1) * g.c_out * hw_out];
            for grp in 0..self.p.groups {
                let rhs: &[f32] = if g.is_pointwise() {
                    &xi[grp * cg * hw_in..(grp + 1) * cg * hw_in]
                } else {
                    im2col(xi, &g, grp * cg, &mut cols);
                    &cols
                };
                let dyg = &dyi[grp * og * hw_out..(grp + 1) * og * hw_out];
                let dst = &mut dw[grp * og * kg..(grp + 1) * og * kg];
                // (og × hw) · (hw × kg): the columns read transposed.
                gemm_f32(
                    og,
                    kg,
                    hw_out,
                    dst,
                    n > 0,
                    dyg,
                    hw_out as isize,
                    1,
                    rhs,
                    1,
                    hw_out as isize,
                );
            }
        }
        Ok((CpuStorage::F32(dw), Shape::from(self.w_dims)))
    }
}

/// 2-D convolution of an NCHW batch `x` with `w` (`C_out × C_in/groups × k_h × k_w`), plus an
/// optional bias, optionally followed by a ReLU. f32 on the CPU takes Tessera's kernels (with a
/// backward pass); other devices and dtypes take candle's `conv2d`.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: ConvParams,
    relu: bool,
) -> Result<Tensor> {
    let fast = x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32;
    if !fast {
        if p.groups > 1 && (x.track_op() || w.track_op()) {
            return split_groups_conv2d(x, w, bias, p, relu);
        }
        return stock_conv2d(x, w, bias, p, relu);
    }
    let c_out = w.dims4()?.0;
    let b = match bias {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(c_out, DType::F32, x.device())?,
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b, ConvFwd { p, relu })
}

/// A grouped convolution as one candle `conv2d` per group, concatenated: candle 0.11's conv2d
/// backward ignores `groups`, so on devices where our kernels do not run, training a grouped
/// convolution (PFAM's MFCSAM) takes this path to get correct gradients.
pub fn split_groups_conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: ConvParams,
    relu: bool,
) -> Result<Tensor> {
    let g = p.groups.max(1);
    let (cin, cout) = (x.dim(1)? / g, w.dim(0)? / g);
    let one = ConvParams { groups: 1, ..p };
    let parts = (0..g)
        .map(|i| {
            let b = bias.map(|b| b.narrow(0, i * cout, cout)).transpose()?;
            stock_conv2d(
                &x.narrow(1, i * cin, cin)?,
                &w.narrow(0, i * cout, cout)?,
                b.as_ref(),
                one,
                relu,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 1)
}

/// candle's own convolution with the same signature (the reference and the non-CPU path).
pub fn stock_conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: ConvParams,
    relu: bool,
) -> Result<Tensor> {
    let mut y = x.conv2d(w, p.padding, p.stride, p.dilation, p.groups)?;
    if let Some(b) = bias {
        y = y.broadcast_add(&b.reshape((1, b.dims1()?, 1, 1))?)?;
    }
    if relu {
        y = y.relu()?;
    }
    Ok(y)
}
