//! Trainable channels-last ops: candle custom ops on NHWC tensors (`B × H × W × C`) with
//! GEMM-based backward passes, for fine-tuning a backbone (SBM) at the speed of the inference
//! path.
//!
//! - forward: the inference kernel of [`PackedConv`] (tiled im2col-GEMM, fused bias + ReLU);
//! - input gradient: `dcols = dY · Wᵀ` per tile of output rows, scattered back into the image
//!   (runs of `C_in` floats per tap), in parallel over images (a 1×1 stride-1 convolution:
//!   one GEMM straight into dX);
//! - weight gradient: `dW = Σ colsᵀ · dY`, one partial sum per thread over a contiguous range of
//!   tiles, then added (deterministic for a given thread count);
//! - the ReLU masks and the residual join (`relu(a + b)`) are parallel element-wise ops.
//!
//! Gradients that nobody asks for (a frozen input, frozen weights) are not computed.

use crate::nhwc::{mm, transpose_batch, NhwcView, PackedConv, COLS, TILE_FLOATS};
use crate::{contiguous, ConvParams};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

fn is_cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Convolution of an NHWC batch `x` (`B × H × W × C_in`) with an OIHW weight `w`, optional bias
/// and ReLU; returns `B × H_out × W_out × C_out`. Differentiable in `x`, `w` and `bias`. Off the
/// CPU it permutes to NCHW and takes candle's convolution.
pub fn conv2d_nhwc(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: ConvParams,
    relu: bool,
) -> Result<Tensor> {
    if !is_cpu_f32(&[x, w]) {
        let y = crate::conv2d(&x.permute((0, 3, 1, 2))?, w, bias, p, relu)?;
        return y.permute((0, 2, 3, 1))?.contiguous();
    }
    let c_out = w.dims4()?.0;
    let b = match bias {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(c_out, DType::F32, x.device())?,
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b, NhwcConv { p, relu })
}

/// [`conv2d_nhwc`] with weights packed once by the caller (`conv`, e.g. kept by a loaded model
/// so that the packing and Winograd's weight transform are not redone on every call): CPU f32
/// inference only — not differentiable, and an error for other devices or dtypes. The same
/// arithmetic as [`conv2d_nhwc`] with the same packing.
pub fn conv2d_nhwc_packed(x: &Tensor, conv: &PackedConv, relu: bool) -> Result<Tensor> {
    if !is_cpu_f32(&[x]) {
        candle_core::bail!(
            "packed conv: needs an f32 tensor on the CPU, got {:?} on {:?}",
            x.dtype(),
            x.device()
        );
    }
    x.contiguous()?.apply_op1_no_bwd(&Prepacked { conv, relu })
}

/// The packing [`conv2d_nhwc`] does on every call, done once: an OIHW weight, an optional
/// bias (zeros when absent, as there), Winograd's transform where it applies. For
/// [`conv2d_nhwc_packed`].
pub fn pack_conv2d(w: &Tensor, bias: Option<&Tensor>, p: ConvParams) -> Result<PackedConv> {
    let dims = w.dims4()?;
    let wt = w.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let b = match bias {
        Some(b) => b.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        None => vec![0f32; dims.0],
    };
    pack(&wt, dims, &b, p)
}

struct Prepacked<'a> {
    conv: &'a PackedConv,
    relu: bool,
}

impl CustomOp1 for Prepacked<'_> {
    fn name(&self) -> &'static str {
        "tessera-conv2d-nhwc-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        forward_packed(self.conv, s, l, self.relu)
    }
}

/// The packing of an OIHW weight and its bias for the NHWC ops ([`conv2d_nhwc`] per call,
/// [`pack_conv2d`] once): one place, so both give the same values.
fn pack(
    w: &[f32],
    dims: (usize, usize, usize, usize),
    b: &[f32],
    p: ConvParams,
) -> Result<PackedConv> {
    Ok(PackedConv::new(w, dims, Some(b), p)?.with_winograd())
}

/// `conv` applied to the NHWC input in `s` (the forward of both NHWC convolution ops).
fn forward_packed(
    conv: &PackedConv,
    s: &CpuStorage,
    l: &Layout,
    relu: bool,
) -> Result<(CpuStorage, Shape)> {
    let (n, h, w, c) = dims4(l, "input")?;
    let data = contiguous(s, l, "input")?;
    let mut y = conv.forward_view(NhwcView { n, h, w, c, data }, None, relu)?;
    let shape = Shape::from((y.n, y.h, y.w, y.c));
    Ok((CpuStorage::F32(std::mem::take(&mut y.data)), shape))
}

/// `relu(a + b)` (the residual join of a ResNet block), parallel on the CPU, differentiable.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !is_cpu_f32(&[a, b]) || a.shape() != b.shape() {
        return (a + b)?.relu();
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
}

/// NCHW → NHWC (a parallel transpose on the CPU), differentiable.
pub fn to_nhwc(x: &Tensor) -> Result<Tensor> {
    if !is_cpu_f32(&[x]) {
        return x.permute((0, 2, 3, 1))?.contiguous();
    }
    x.contiguous()?.apply_op1(Relayout { to_nhwc: true })
}

/// NHWC → NCHW (a parallel transpose on the CPU), differentiable.
pub fn to_nchw(x: &Tensor) -> Result<Tensor> {
    if !is_cpu_f32(&[x]) {
        return x.permute((0, 3, 1, 2))?.contiguous();
    }
    x.contiguous()?.apply_op1(Relayout { to_nhwc: false })
}

fn dims4(l: &Layout, what: &str) -> Result<(usize, usize, usize, usize)> {
    match *l.dims() {
        [a, b, c, d] => Ok((a, b, c, d)),
        ref other => candle_core::bail!("tessera NHWC op: {what} must be 4-D, got {other:?}"),
    }
}

struct Relayout {
    to_nhwc: bool,
}

impl CustomOp1 for Relayout {
    fn name(&self) -> &'static str {
        "tessera-relayout"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "input")?;
        let (n, a, b, c) = dims4(l, "input")?;
        let mut out = vec![0f32; x.len()];
        if self.to_nhwc {
            // (n, c=a, h=b, w=c) → (n, h, w, c)
            transpose_batch(x, a, b * c, &mut out);
            Ok((CpuStorage::F32(out), Shape::from((n, b, c, a))))
        } else {
            // (n, h=a, w=b, c) → (n, c, h, w)
            transpose_batch(x, a * b, c, &mut out);
            Ok((CpuStorage::F32(out), Shape::from((n, c, a, b))))
        }
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Relayout {
            to_nhwc: !self.to_nhwc,
        })?))
    }
}

/// `grad · [out > 0]`, in parallel.
fn relu_mask(grad: &Tensor, out: &Tensor) -> Result<Tensor> {
    grad.contiguous()?
        .apply_op2_no_bwd(&out.contiguous()?, &ReluMask)
}

struct ReluMask;

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "tessera-relu-mask"
    }
    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        os: &CpuStorage,
        ol: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, o) = (
            contiguous(gs, gl, "gradient")?,
            contiguous(os, ol, "output")?,
        );
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(1 << 14)
            .zip(g.par_chunks(1 << 14).zip(o.par_chunks(1 << 14)))
            .for_each(|(d, (g, o))| {
                for ((d, &g), &o) in d.iter_mut().zip(g).zip(o) {
                    *d = if o > 0.0 { g } else { 0.0 };
                }
            });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

/// Σ over every pixel of an NHWC tensor: one value per channel (the bias gradient), in
/// parallel (candle's reduction over leading dimensions is single-threaded and slow).
struct ChannelSum;

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "tessera-channel-sum"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "gradient")?;
        let (_, _, _, c) = dims4(l, "gradient")?;
        let rows = x.len().checked_div(c).unwrap_or(0);
        let per = rows
            .div_ceil(4 * rayon::current_num_threads().max(1))
            .max(1);
        let sum = x
            .par_chunks(per * c.max(1))
            .map(|part| {
                let mut acc = vec![0f32; c];
                for px in part.chunks(c) {
                    acc.iter_mut().zip(px).for_each(|(a, v)| *a += v);
                }
                acc
            })
            .reduce(
                || vec![0f32; c],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        Ok((CpuStorage::F32(sum), Shape::from(c)))
    }
}

struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "tessera-add-relu"
    }
    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (contiguous(as_, al, "lhs")?, contiguous(bs, bl, "rhs")?);
        let mut out = vec![0f32; a.len()];
        out.par_chunks_mut(1 << 14)
            .zip(a.par_chunks(1 << 14).zip(b.par_chunks(1 << 14)))
            .for_each(|(d, (a, b))| {
                for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
                    *d = (a + b).max(0.0);
                }
            });
        Ok((CpuStorage::F32(out), al.shape().clone()))
    }
    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = relu_mask(grad, res)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

struct NhwcConv {
    p: ConvParams,
    relu: bool,
}

impl CustomOp3 for NhwcConv {
    fn name(&self) -> &'static str {
        "tessera-conv2d-nhwc"
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
        let wd = dims4(wl, "weight")?;
        let (wt, b) = (contiguous(ws, wl, "weight")?, contiguous(bs, bl, "bias")?);
        forward_packed(&pack(wt, wd, b, self.p)?, xs, xl, self.relu)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = if self.relu {
            relu_mask(grad, res)?
        } else {
            grad.contiguous()?
        };
        let dx = if x.track_op() {
            Some(g.apply_op2_no_bwd(
                w,
                &BwdData {
                    p: self.p,
                    x_dims: x.dims4()?,
                },
            )?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(x.apply_op2_no_bwd(
                &g,
                &BwdFilter {
                    p: self.p,
                    w_dims: w.dims4()?,
                },
            )?)
        } else {
            None
        };
        let db = if b.track_op() {
            Some(g.apply_op1_no_bwd(&ChannelSum)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// The geometry of a convolution without its weights (for the gradient kernels).
fn geometry(w_dims: (usize, usize, usize, usize), p: ConvParams) -> PackedConv {
    let (cout, cpg, kh, kw) = w_dims;
    PackedConv {
        cin: cpg * p.groups,
        cout,
        kh,
        kw,
        p,
        w: Vec::new(),
        bias: Vec::new(),
        wino: None,
        bf16: None,
        f32p: None,
    }
}

/// Input gradient; operands (dY NHWC, W OIHW).
struct BwdData {
    p: ConvParams,
    x_dims: (usize, usize, usize, usize),
}

impl CustomOp2 for BwdData {
    fn name(&self) -> &'static str {
        "tessera-conv2d-nhwc-bwd-data"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, cin) = self.x_dims;
        let (gn, ho, wo, cout) = dims4(gl, "gradient")?;
        let (dy, wt) = (
            contiguous(gs, gl, "gradient")?,
            contiguous(ws, wl, "weight")?,
        );
        let wdims = dims4(wl, "weight")?;
        // Shapes from the geometry alone: the weights are packed only on the path that uses
        // them (not on the flipped-kernel path below).
        let geo = geometry(wdims, self.p);
        if gn != n || geo.cin != cin || geo.cout != cout || geo.out_size(h, w)? != (ho, wo) {
            candle_core::bail!("tessera NHWC conv backward: gradient and input shapes disagree");
        }
        // Stride 1 without groups: dX is the "full" convolution of dY with the flipped,
        // transposed kernel — a forward convolution (parallel over tiles, no scatter, and
        // Winograd for 3×3).
        let (_, _, kh, kw) = wdims;
        let p = self.p;
        if p.stride == 1 && p.groups == 1 && kh == kw && p.padding <= p.dilation * (kh - 1) {
            let mut flipped = vec![0f32; wt.len()];
            for o in 0..cout {
                for ci in 0..cin {
                    for ki in 0..kh {
                        for kj in 0..kw {
                            flipped[((ci * cout + o) * kh + ki) * kw + kj] =
                                wt[((o * cin + ci) * kh + (kh - 1 - ki)) * kw + (kw - 1 - kj)];
                        }
                    }
                }
            }
            let q = ConvParams {
                padding: p.dilation * (kh - 1) - p.padding,
                ..p
            };
            let t = PackedConv::new(&flipped, (cin, cout, kh, kw), None, q)?.with_winograd();
            let mut dx = t.forward_view(
                NhwcView {
                    n,
                    h: ho,
                    w: wo,
                    c: cout,
                    data: dy,
                },
                None,
                false,
            )?;
            if (dx.h, dx.w) == (h, w) {
                return Ok((
                    CpuStorage::F32(std::mem::take(&mut dx.data)),
                    Shape::from(self.x_dims),
                ));
            }
            // (A padded input larger than the output reach: fall through to the general path.)
        }
        let pc = PackedConv::new(wt, wdims, None, self.p)?;
        let groups = self.p.groups;
        let (cg, og) = (cin / groups, cout / groups);
        let kg = pc.kh * pc.kw * cg;
        let mut dx = vec![0f32; n * h * w * cin];
        let pointwise =
            pc.kh == 1 && pc.kw == 1 && self.p.stride == 1 && self.p.padding == 0 && groups == 1;
        if pointwise {
            // dX (rows × C_in) = dY (rows × C_out) · Wᵀ, W packed C_in × C_out.
            let tm = 256;
            dx.par_chunks_mut(tm * cin).enumerate().for_each(|(t, d)| {
                let rows = d.len() / cin;
                let a = &dy[t * tm * cout..];
                // SAFETY: d is rows × cin; a is rows × cout; pc.w is cin × cout.
                unsafe {
                    mm(
                        rows,
                        cin,
                        cout,
                        d.as_mut_ptr(),
                        cin,
                        1,
                        false,
                        a.as_ptr(),
                        cout,
                        1,
                        pc.w.as_ptr(),
                        1,
                        cout,
                    )
                };
            });
        } else {
            let hw_out = ho * wo;
            let tm = (TILE_FLOATS / kg.max(1)).clamp(64, 512).min(hw_out.max(1));
            dx.par_chunks_mut(h * w * cin)
                .enumerate()
                .for_each(|(img, dxi)| {
                    COLS.with(|cols| {
                        let mut cols = cols.borrow_mut();
                        if cols.len() < tm * kg {
                            cols.resize(tm * kg, 0.0);
                        }
                        for t0 in (0..hw_out).step_by(tm) {
                            let rows = tm.min(hw_out - t0);
                            for grp in 0..groups {
                                let a = &dy[(img * hw_out + t0) * cout + grp * og..];
                                let b = &pc.w[grp * kg * og..];
                                // SAFETY: cols holds rows × kg; a is rows × og with row stride
                                // cout; b (og × kg) reads the packed kg × og block transposed.
                                unsafe {
                                    mm(
                                        rows,
                                        kg,
                                        og,
                                        cols.as_mut_ptr(),
                                        kg,
                                        1,
                                        false,
                                        a.as_ptr(),
                                        cout,
                                        1,
                                        b.as_ptr(),
                                        1,
                                        og,
                                    )
                                };
                                scatter(&pc, h, w, ho, wo, t0, rows, grp, &cols[..rows * kg], dxi);
                            }
                        }
                    });
                });
        }
        Ok((CpuStorage::F32(dx), Shape::from(self.x_dims)))
    }
}

/// Add the column rows `t0..t0+rows` (image-local output pixels) of group `grp` back into one
/// image's NHWC input gradient `dxi` — the adjoint of [`PackedConv::gather`].
#[allow(clippy::too_many_arguments)]
fn scatter(
    pc: &PackedConv,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    t0: usize,
    rows: usize,
    grp: usize,
    cols: &[f32],
    dxi: &mut [f32],
) {
    let (cin, groups) = (pc.cin, pc.p.groups);
    let cg = cin / groups;
    let kg = pc.kh * pc.kw * cg;
    let (s, pad, d) = (
        pc.p.stride as isize,
        pc.p.padding as isize,
        pc.p.dilation as isize,
    );
    debug_assert!(t0 + rows <= ho * wo);
    for (rr, src) in cols.chunks(kg).take(rows).enumerate() {
        let r = t0 + rr;
        let (oh, ow) = ((r / wo) as isize, (r % wo) as isize);
        for ki in 0..pc.kh {
            let ih = oh * s - pad + ki as isize * d;
            if ih < 0 || ih >= h as isize {
                continue;
            }
            for kj in 0..pc.kw {
                let iw = ow * s - pad + kj as isize * d;
                if iw < 0 || iw >= w as isize {
                    continue;
                }
                let a = (ih as usize * w + iw as usize) * cin + grp * cg;
                let tap = &src[(ki * pc.kw + kj) * cg..(ki * pc.kw + kj + 1) * cg];
                for (v, &g) in dxi[a..a + cg].iter_mut().zip(tap) {
                    *v += g;
                }
            }
        }
    }
}

/// Weight gradient; operands (X NHWC, dY NHWC).
struct BwdFilter {
    p: ConvParams,
    w_dims: (usize, usize, usize, usize),
}

impl CustomOp2 for BwdFilter {
    fn name(&self) -> &'static str {
        "tessera-conv2d-nhwc-bwd-filter"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, cin) = dims4(xl, "input")?;
        let (gn, ho, wo, cout) = dims4(gl, "gradient")?;
        let (x, dy) = (
            contiguous(xs, xl, "input")?,
            contiguous(gs, gl, "gradient")?,
        );
        let pc = geometry(self.w_dims, self.p);
        if gn != n || pc.cin != cin || pc.cout != cout || pc.out_size(h, w)? != (ho, wo) {
            candle_core::bail!("tessera NHWC conv backward: gradient and input shapes disagree");
        }
        let groups = self.p.groups;
        let (cg, og) = (cin / groups, cout / groups);
        let kg = pc.kh * pc.kw * cg;
        let pointwise =
            pc.kh == 1 && pc.kw == 1 && self.p.stride == 1 && self.p.padding == 0 && groups == 1;
        let m = n * ho * wo;
        let tm = (2 * TILE_FLOATS / kg.max(1)).clamp(64, 512);
        let tiles = m.div_ceil(tm);
        let threads = rayon::current_num_threads().max(1);
        let per = tiles.div_ceil(threads).max(1);
        let view = NhwcView {
            n,
            h,
            w,
            c: cin,
            data: x,
        };
        let packed = (0..tiles.div_ceil(per))
            .into_par_iter()
            .map(|part| {
                let mut acc = vec![0f32; groups * kg * og];
                let mut cols = if pointwise {
                    Vec::new()
                } else {
                    vec![0f32; tm * kg]
                };
                for t in part * per..((part + 1) * per).min(tiles) {
                    let r0 = t * tm;
                    let rows = tm.min(m - r0);
                    for grp in 0..groups {
                        let (a, a_cs): (&[f32], usize) = if pointwise {
                            (&x[r0 * cin..], cin)
                        } else {
                            pc.gather(&view, ho, wo, r0, rows, grp, &mut cols[..rows * kg]);
                            (&cols[..rows * kg], kg)
                        };
                        let b = &dy[r0 * cout + grp * og..];
                        let dst = &mut acc[grp * kg * og..(grp + 1) * kg * og];
                        // SAFETY: dst is kg × og; a read transposed is kg × rows; b is
                        // rows × og with row stride cout.
                        unsafe {
                            mm(
                                kg,
                                og,
                                rows,
                                dst.as_mut_ptr(),
                                og,
                                1,
                                true,
                                a.as_ptr(),
                                1,
                                a_cs,
                                b.as_ptr(),
                                cout,
                                1,
                            )
                        };
                    }
                }
                acc
            })
            .reduce_with(|mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            })
            .unwrap_or_else(|| vec![0f32; groups * kg * og]);
        // Unpack (per group: rows (ki, kj, ci) × og) into OIHW.
        let (kh, kw) = (pc.kh, pc.kw);
        let mut dw = vec![0f32; cout * cg * kh * kw];
        dw.par_chunks_mut(cg * kh * kw)
            .enumerate()
            .for_each(|(o, out)| {
                let (grp, oo) = (o / og, o % og);
                let blk = &packed[grp * kg * og..(grp + 1) * kg * og];
                for ci in 0..cg {
                    for ki in 0..kh {
                        for kj in 0..kw {
                            out[(ci * kh + ki) * kw + kj] =
                                blk[((ki * kw + kj) * cg + ci) * og + oo];
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(dw), Shape::from(self.w_dims)))
    }
}
