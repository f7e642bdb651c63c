//! Channels-last (NHWC) inference kernels: the fast path of frozen feature extraction.
//!
//! In NHWC a convolution is one GEMM `Y (B·H_out·W_out × C_out) = cols (… × k_h·k_w·C_in) · W`
//! whose rows are output pixels, so:
//!
//! - a 1×1 stride-1 convolution reads the input itself as its left operand (no copy at all);
//! - the im2col rows of any other convolution are runs of `C_in` contiguous floats (one
//!   `memcpy` per tap, one per kernel row at stride 1), gathered per tile of rows into a
//!   per-thread buffer that stays in cache;
//! - every tile (rows × output channels) is an independent single-threaded GEMM, so two threads
//!   never share a cache line and small layers still split into enough jobs;
//! - bias, the residual add and ReLU are applied to the tile right after its GEMM, while it is
//!   still in cache (one pass instead of three over the whole tensor).
//!
//! Activations stay NHWC from the stem to the last layer; only the layer outputs that leave the
//! backbone are turned back into NCHW tensors.

use crate::bf16::Panels;
use crate::panel::PanelsF32;
use crate::ConvParams;
use candle_core::{Result, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;

/// A batch of activations, channels-last: `data[((n·H + y)·W + x)·C + c]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Nhwc {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

/// Recycled f32 buffers: fresh large allocations are fresh pages, and on these virtual machines
/// the page faults cost as much as a small convolution. Contents of a taken buffer are
/// arbitrary: every user overwrites all of it.
mod scratch {
    use std::sync::Mutex;

    static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
    /// At most this many buffers, and this many floats in all, are kept.
    const KEEP: usize = 16;
    const KEEP_FLOATS: usize = 64 << 20;

    /// A buffer of exactly `len` floats (arbitrary contents).
    pub fn take(len: usize) -> Vec<f32> {
        let found = {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            // The smallest buffer that fits, so big ones stay for big requests.
            let best = pool
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            best.map(|i| pool.swap_remove(i))
        };
        match found {
            Some(mut b) => {
                // SAFETY: capacity ≥ len and f32 has no invalid bit patterns; the caller
                // overwrites every element before reading it.
                unsafe { b.set_len(len) };
                b
            }
            None => vec![0f32; len],
        }
    }

    /// Return a buffer for reuse.
    pub fn give(b: Vec<f32>) {
        if b.capacity() < 4096 {
            return;
        }
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let held: usize = pool.iter().map(Vec::capacity).sum();
        if pool.len() < KEEP && held + b.capacity() <= KEEP_FLOATS {
            pool.push(b);
        }
    }
}

/// A borrowed NHWC batch (e.g. the storage of a candle tensor).
#[derive(Debug, Clone, Copy)]
pub struct NhwcView<'a> {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: &'a [f32],
}

/// Rows per block when transposing (keeps both sides of a block in L1/L2).
const T_BLOCK: usize = 64;

impl Nhwc {
    /// From an NCHW slice (parallel blocked transpose per image).
    pub fn from_nchw(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Self {
        assert_eq!(
            x.len(),
            n * c * h * w,
            "NCHW buffer does not match its shape"
        );
        let mut data = scratch::take(x.len());
        transpose_batch(x, c, h * w, &mut data);
        Self { n, h, w, c, data }
    }

    /// From a 4-D NCHW f32 tensor (any device; read through the host).
    pub fn from_tensor(x: &Tensor) -> Result<Self> {
        let (n, c, h, w) = x.dims4()?;
        let v = x.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self::from_nchw(&v, n, c, h, w))
    }

    /// Borrow as a view.
    pub fn view(&self) -> NhwcView<'_> {
        NhwcView {
            n: self.n,
            h: self.h,
            w: self.w,
            c: self.c,
            data: &self.data,
        }
    }

    /// To an NCHW buffer (parallel blocked transpose per image).
    pub fn to_nchw(&self) -> Vec<f32> {
        let mut out = scratch::take(self.data.len());
        transpose_batch(&self.data, self.h * self.w, self.c, &mut out);
        out
    }

    /// To a 4-D NCHW tensor on `device`.
    pub fn to_tensor(&self, device: &candle_core::Device) -> Result<Tensor> {
        Tensor::from_vec(self.to_nchw(), (self.n, self.c, self.h, self.w), device)
    }
}

impl Drop for Nhwc {
    fn drop(&mut self) {
        scratch::give(std::mem::take(&mut self.data));
    }
}

/// Transpose every `rows × cols` matrix of a batch (`src`) into `cols × rows` (`dst`): in
/// parallel over blocks of destination rows, in 16 × `T_BLOCK` tiles so that reads and writes
/// both touch whole cache lines.
pub fn transpose_batch(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    let per = rows * cols;
    assert_eq!(src.len(), dst.len(), "transpose: buffers differ in length");
    if per == 0 {
        return;
    }
    dst.par_chunks_mut(per)
        .zip(src.par_chunks(per))
        .for_each(|(d, s)| {
            d.par_chunks_mut(T_BLOCK * rows)
                .enumerate()
                .for_each(|(jb, dblk)| {
                    let j0 = jb * T_BLOCK;
                    let nj = dblk.len() / rows;
                    for i0 in (0..rows).step_by(16) {
                        let ni = 16.min(rows - i0);
                        for jj in 0..nj {
                            let drow = &mut dblk[jj * rows + i0..jj * rows + i0 + ni];
                            for (ii, v) in drow.iter_mut().enumerate() {
                                *v = s[(i0 + ii) * cols + j0 + jj];
                            }
                        }
                    }
                });
        });
}

/// A convolution (weights + bias) packed once for NHWC inference.
#[derive(Debug, Clone)]
pub struct PackedConv {
    pub(crate) cin: usize,
    pub(crate) cout: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) p: ConvParams,
    /// Per group `g`: a `(k_h·k_w·C_in/g) × (C_out/g)` row-major block, rows ordered
    /// `(ki, kj, ci)` — the order in which im2col gathers an NHWC pixel's taps.
    pub(crate) w: Vec<f32>,
    pub(crate) bias: Vec<f32>,
    /// Winograd F(2×2, 3×3) weights `U[ξ] = G·g·Gᵀ` (16 × C_in × C_out), for 3×3 stride-1
    /// convolutions after [`PackedConv::with_winograd`].
    pub(crate) wino: Option<Vec<f32>>,
    /// bf16 products ([`PackedConv::with_bf16`]): `w` per group, and `U[ξ]` per ξ.
    pub(crate) bf16: Option<Bf16Weights>,
    /// f32 products on packed panels ([`PackedConv::with_panels`]): `w` per group, `U[ξ]`
    /// per ξ.
    pub(crate) f32p: Option<F32Weights>,
}

/// The weights of a [`PackedConv`] packed once for [`crate::panel::mm_f32`].
#[derive(Debug, Clone)]
pub(crate) struct F32Weights {
    groups: Vec<PanelsF32>,
    wino: Option<Vec<PanelsF32>>,
}

/// The weights of a [`PackedConv`] rounded to bf16 and packed for [`crate::bf16::mm_bf16`].
#[derive(Debug, Clone)]
pub(crate) struct Bf16Weights {
    groups: Vec<Panels>,
    wino: Option<Vec<Panels>>,
}

/// A raw pointer that may cross threads (each job writes a disjoint block through it).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
impl SendPtr {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: only used to hand disjoint output blocks to rayon jobs (see `PackedConv::forward`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

thread_local! {
    /// Per-thread im2col tile, reused across convolutions.
    pub(crate) static COLS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per-thread im2col tile rounded to bf16 (bf16 products).
    static COLS_BF16: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    /// Per-thread V and M of a fused Winograd job.
    static WINO_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Channels (input and output) from which bf16 convolutions keep Winograd
/// ([`PackedConv::with_bf16`]).
const WINO_BF16_MIN_CHANNELS: usize = 128;

/// Floats of im2col tile that a job aims for (half of this machine class's 2 MiB L2).
pub(crate) const TILE_FLOATS: usize = 256 * 1024 / 4;

/// Single-threaded `dst (m × n) [+]= a (m × k) · b (k × n)` with element strides (row, column)
/// for each operand.
///
/// # Safety
/// Every element addressed by the shapes and strides must lie inside the pointed-to buffers, and
/// `dst` must not alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    dst_cs: usize,
    accumulate: bool,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

impl PackedConv {
    /// Pack an OIHW weight (`C_out × C_in/groups × k_h × k_w`, row-major) and an optional bias.
    pub fn new(
        weight: &[f32],
        dims: (usize, usize, usize, usize),
        bias: Option<&[f32]>,
        p: ConvParams,
    ) -> Result<Self> {
        let (cout, cpg, kh, kw) = dims;
        let groups = p.groups;
        if groups == 0 || cout % groups != 0 || weight.len() != cout * cpg * kh * kw {
            candle_core::bail!("packed conv: weight {dims:?} does not fit groups {groups}");
        }
        if p.stride == 0 || p.dilation == 0 {
            candle_core::bail!("packed conv: stride and dilation must be ≥ 1");
        }
        if let Some(b) = bias {
            if b.len() != cout {
                candle_core::bail!(
                    "packed conv: bias has {} values for {cout} outputs",
                    b.len()
                );
            }
        }
        let og = cout / groups;
        let kg = kh * kw * cpg;
        let mut w = vec![0f32; groups * kg * og];
        // One packed row (tap (ki, kj), input channel ci of group g) per job: contiguous writes,
        // strided reads (training repacks every step, so this runs in parallel).
        let khw = kh * kw;
        w.par_chunks_mut(og.max(1))
            .enumerate()
            .for_each(|(r, out)| {
                let (g, row) = (r / kg, r % kg);
                let (tap, ci) = (row / cpg, row % cpg);
                let src = &weight[(g * og * cpg + ci) * khw + tap..];
                for (o, v) in out.iter_mut().enumerate() {
                    *v = src[o * cpg * khw];
                }
            });
        Ok(Self {
            cin: cpg * groups,
            cout,
            kh,
            kw,
            p,
            w,
            bias: bias.map(<[f32]>::to_vec).unwrap_or_else(|| vec![0.0; cout]),
            wino: None,
            bf16: None,
            f32p: None,
        })
    }

    /// f32 products on weights packed once into panels for an AVX-512 micro-kernel
    /// ([`crate::panel::mm_f32`]) instead of a general GEMM that packs them on every call:
    /// for convolutions packed once and run many times (inference). Call after
    /// [`PackedConv::with_winograd`]; on CPUs without AVX-512F `self` is unchanged.
    pub fn with_panels(mut self) -> Self {
        if !crate::panel::f32_supported() {
            return self;
        }
        let (groups, wino) = self.pack_panels(PanelsF32::pack);
        self.f32p = Some(F32Weights { groups, wino });
        self
    }

    /// The weights packed by `pack` (`b`, `k`, `n`, row stride): one matrix per group and,
    /// when Winograd applies, one per `U[ξ]`.
    fn pack_panels<P>(
        &self,
        pack: impl Fn(&[f32], usize, usize, usize) -> P,
    ) -> (Vec<P>, Option<Vec<P>>) {
        let (groups, og) = (self.p.groups, self.cout / self.p.groups);
        let kg = self.kh * self.kw * (self.cin / groups);
        let per_group = (0..groups)
            .map(|g| pack(&self.w[g * kg * og..(g + 1) * kg * og], kg, og, og))
            .collect();
        let (cin, cout) = (self.cin, self.cout);
        let wino = self.wino.as_ref().map(|u| {
            (0..16)
                .map(|xi| pack(&u[xi * cin * cout..(xi + 1) * cin * cout], cin, cout, cout))
                .collect()
        });
        (per_group, wino)
    }

    /// Products in bf16 (sums in f32) where this CPU has native bf16 dot products
    /// ([`crate::bf16::supported`]); elsewhere `self` unchanged. Call after
    /// [`PackedConv::with_winograd`] (its `U[ξ]` are rounded too).
    pub fn with_bf16(mut self) -> Self {
        if !crate::bf16::supported() {
            return self;
        }
        // With bf16 products Winograd's transforms (f32, two passes over every tile) cost as
        // much as the products they save below 128 channels: im2col there.
        if self.cin.min(self.cout) < WINO_BF16_MIN_CHANNELS {
            self.wino = None;
        }
        let (groups, wino) = self.pack_panels(Panels::pack);
        self.bf16 = Some(Bf16Weights { groups, wino });
        self
    }

    /// Whether the products run in bf16 ([`PackedConv::with_bf16`] on a CPU that has it).
    pub fn is_bf16(&self) -> bool {
        self.bf16.is_some()
    }

    /// Whether [`PackedConv::with_winograd`] applies: 3×3, stride 1, dilation 1, no groups.
    pub fn winograd_eligible(&self) -> bool {
        self.kh == 3
            && self.kw == 3
            && self.p.stride == 1
            && self.p.dilation == 1
            && self.p.groups == 1
    }

    /// Run this convolution with Winograd's F(2×2, 3×3) algorithm when it is eligible (2.25×
    /// fewer multiplications; results equal to float rounding, ~1e-6 relative): the weights
    /// are transformed once here.
    pub fn with_winograd(mut self) -> Self {
        if !self.winograd_eligible() {
            return self;
        }
        let (cin, cout) = (self.cin, self.cout);
        let mut u = vec![0f32; 16 * cin * cout];
        // U[ξ][ci][·] = (G·g·Gᵀ)[ξ] for one input channel at a time, vectorised over the output
        // channels (self.w rows are (ki, kj, ci), columns o); parallel over ci.
        let up = SendPtr(u.as_mut_ptr());
        let w = &self.w;
        (0..cin).into_par_iter().for_each(|ci| {
            let g: [&[f32]; 9] =
                std::array::from_fn(|k| &w[(k * cin + ci) * cout..(k * cin + ci + 1) * cout]);
            // SAFETY: row (ξ, ci) of u (cout floats) is written by this job only.
            let out: [&mut [f32]; 16] = std::array::from_fn(|xi| unsafe {
                std::slice::from_raw_parts_mut(up.ptr().add((xi * cin + ci) * cout), cout)
            });
            for o in 0..cout {
                // t = G·g (4×3), G = [[1,0,0],[½,½,½],[½,−½,½],[0,0,1]]; then t·Gᵀ.
                let mut t = [[0f32; 3]; 4];
                for j in 0..3 {
                    let (a, b, c) = (g[j][o], g[3 + j][o], g[6 + j][o]);
                    t[0][j] = a;
                    t[1][j] = 0.5 * (a + b + c);
                    t[2][j] = 0.5 * (a - b + c);
                    t[3][j] = c;
                }
                for (i, &[a, b, c]) in t.iter().enumerate() {
                    out[i * 4][o] = a;
                    out[i * 4 + 1][o] = 0.5 * (a + b + c);
                    out[i * 4 + 2][o] = 0.5 * (a - b + c);
                    out[i * 4 + 3][o] = c;
                }
            }
        });
        self.wino = Some(u);
        self
    }

    /// Pack candle tensors (OIHW weight, optional bias), read through the host.
    pub fn from_tensors(weight: &Tensor, bias: Option<&Tensor>, p: ConvParams) -> Result<Self> {
        let dims = weight.dims4()?;
        let w = weight
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = bias
            .map(|b| b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>())
            .transpose()?;
        Self::new(&w, dims, b.as_deref(), p)
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.cout
    }

    /// Output height and width for an `h × w` input.
    pub fn out_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let p = self.p;
        let eh = p.dilation * (self.kh - 1) + 1;
        let ew = p.dilation * (self.kw - 1) + 1;
        if h + 2 * p.padding < eh || w + 2 * p.padding < ew {
            candle_core::bail!("packed conv: kernel larger than the padded {h}×{w} input");
        }
        Ok((
            (h + 2 * p.padding - eh) / p.stride + 1,
            (w + 2 * p.padding - ew) / p.stride + 1,
        ))
    }

    /// `act(conv(x) + bias [+ residual])`, where `act` is ReLU when `relu`.
    pub fn forward(&self, x: &Nhwc, residual: Option<&Nhwc>, relu: bool) -> Result<Nhwc> {
        if let Some(r) = residual {
            let (ho, wo) = self.out_size(x.h, x.w)?;
            if (r.n, r.h, r.w, r.c) != (x.n, ho, wo, self.cout) {
                candle_core::bail!(
                    "packed conv: residual {:?} does not match the output {:?}",
                    (r.n, r.h, r.w, r.c),
                    (x.n, ho, wo, self.cout)
                );
            }
        }
        self.forward_view(x.view(), residual.map(|r| r.data.as_slice()), relu)
    }

    /// [`PackedConv::forward`] on a borrowed input; `residual` is an NHWC buffer of the
    /// output's shape.
    pub fn forward_view(
        &self,
        x: NhwcView<'_>,
        residual: Option<&[f32]>,
        relu: bool,
    ) -> Result<Nhwc> {
        if x.c != self.cin || x.data.len() != x.n * x.h * x.w * x.c {
            candle_core::bail!(
                "packed conv: input has {} channels, the weight expects {}",
                x.c,
                self.cin
            );
        }
        let (ho, wo) = self.out_size(x.h, x.w)?;
        let (cout, groups) = (self.cout, self.p.groups);
        let (cg, og) = (self.cin / groups, cout / groups);
        let kg = self.kh * self.kw * cg;
        let m = x.n * ho * wo;
        if residual.is_some_and(|r| r.len() != m * cout) {
            candle_core::bail!("packed conv: the residual does not match the output's shape");
        }
        let mut y = scratch::take(m * cout);
        if m == 0 || cout == 0 {
            return Ok(Nhwc {
                n: x.n,
                h: ho,
                w: wo,
                c: cout,
                data: y,
            });
        }
        // Few tiles (batch 1, late layers): the 16 GEMMs would be too short to amortise the
        // packing of U, and im2col-GEMM is faster.
        let wino = self
            .wino
            .as_ref()
            .filter(|_| x.n * ho.div_ceil(2) * wo.div_ceil(2) >= WINO_MIN_TILES);
        if let Some(u) = wino {
            self.winograd(x, u, ho, wo, residual, relu, &mut y);
            return Ok(Nhwc {
                n: x.n,
                h: ho,
                w: wo,
                c: cout,
                data: y,
            });
        }
        let pointwise = self.kh == 1
            && self.kw == 1
            && self.p.stride == 1
            && self.p.padding == 0
            && groups == 1;
        // Rows per job: each GEMM call re-packs its slice of W, so the pack is amortised over the
        // rows (≥ 128 when the layer has them); at most one tile per thread's share of the rows.
        // Small layers (batch 1, late layers) then split the output channels instead (≥ 64 per
        // job) until every thread has two jobs.
        let threads = rayon::current_num_threads().max(1);
        let tm = (TILE_FLOATS / kg.max(1))
            .clamp(128, 512)
            .min(m.div_ceil(threads).max(64))
            .div_ceil(16)
            * 16;
        let row_tiles = m.div_ceil(tm);
        let mut col_split = 1;
        // Packed panels are 32 columns wide: a split must start on one.
        let align = if self.bf16.is_some() || self.f32p.is_some() {
            32
        } else {
            16
        };
        while row_tiles * groups * col_split < 2 * threads
            && og % (col_split * 2) == 0
            && og / (col_split * 2) >= 64
            && (og / (col_split * 2)) % align == 0
        {
            col_split *= 2;
        }
        let oc = og / col_split;
        let jobs = row_tiles * groups * col_split;
        let yp = SendPtr(y.as_mut_ptr());
        (0..jobs).into_par_iter().for_each(|job| {
            let (t, gc) = (job / (groups * col_split), job % (groups * col_split));
            let (g, cs) = (gc / col_split, gc % col_split);
            let r0 = t * tm;
            let rows = tm.min(m - r0);
            let n0 = g * og + cs * oc;
            // SAFETY: job (t, g, cs) writes rows r0..r0+rows, columns n0..n0+oc of y only;
            // these blocks are disjoint across jobs and lie inside y (m × cout).
            let dst = unsafe { yp.ptr().add(r0 * cout + n0) };
            let b = &self.w[g * kg * og + cs * oc..];
            #[cfg(target_arch = "x86_64")]
            if let Some(bw) = &self.bf16 {
                let panels = &bw.groups[g];
                // SAFETY: as the f32 product below; the bf16 panels exist only where the CPU
                // has bf16 (`with_bf16`), and cs·oc is a multiple of 32 there (the split above).
                // im2col rows are rounded to bf16 as they are gathered (no f32 copy).
                if pointwise {
                    let a = &x.data[r0 * cg..];
                    unsafe {
                        crate::bf16::mm_bf16(rows, a.as_ptr(), cg, panels, cs * oc, oc, dst, cout)
                    };
                } else {
                    let kp = panels.padded_k();
                    COLS_BF16.with(|cols| {
                        let mut cols = cols.borrow_mut();
                        if cols.len() < rows * kp {
                            cols.resize(rows * kp, 0);
                        }
                        let a = &mut cols[..rows * kp];
                        unsafe {
                            self.gather_bf16(&x, ho, wo, r0, rows, g, a, kp);
                            crate::bf16::mm_bf16_rounded(
                                rows,
                                a.as_ptr(),
                                kp,
                                panels,
                                cs * oc,
                                oc,
                                dst,
                                cout,
                            );
                        }
                    });
                }
                // SAFETY: the block this job wrote (above).
                unsafe { self.epilogue_rows(dst, r0, rows, n0, oc, residual, relu) };
                return;
            }
            COLS.with(|cols| {
                let mut cols = cols.borrow_mut();
                let (a, a_rs): (&[f32], usize) = if pointwise {
                    (&x.data[r0 * cg..], cg)
                } else {
                    if cols.len() < rows * kg {
                        cols.resize(rows * kg, 0.0);
                    }
                    self.gather(&x, ho, wo, r0, rows, g, &mut cols[..rows * kg]);
                    (&cols[..rows * kg], kg)
                };
                // SAFETY: a is rows × kg (row stride a_rs), b is kg × oc inside the packed
                // group block (row stride og), dst is rows × oc with row stride cout; the f32
                // panels exist only where the CPU has AVX-512F, cs·oc is a multiple of 32
                // there (the split above).
                #[cfg(target_arch = "x86_64")]
                if let Some(fp) = &self.f32p {
                    unsafe {
                        crate::panel::mm_f32(
                            rows,
                            a.as_ptr(),
                            a_rs,
                            &fp.groups[g],
                            cs * oc,
                            oc,
                            dst,
                            cout,
                        )
                    };
                    return;
                }
                unsafe {
                    mm(
                        rows,
                        oc,
                        kg,
                        dst,
                        cout,
                        1,
                        false,
                        a.as_ptr(),
                        a_rs,
                        1,
                        b.as_ptr(),
                        og,
                        1,
                    )
                };
            });
            // SAFETY: the block this job wrote (above).
            unsafe { self.epilogue_rows(dst, r0, rows, n0, oc, residual, relu) };
        });
        Ok(Nhwc {
            n: x.n,
            h: ho,
            w: wo,
            c: cout,
            data: y,
        })
    }

    /// Bias, residual and ReLU on an im2col job's block: `rows` output rows from `r0`,
    /// columns `n0..n0 + oc`, at `dst` (row stride C_out).
    ///
    /// # Safety
    /// `dst` must address that block of the output, owned by the caller.
    #[allow(clippy::too_many_arguments)]
    unsafe fn epilogue_rows(
        &self,
        dst: *mut f32,
        r0: usize,
        rows: usize,
        n0: usize,
        oc: usize,
        residual: Option<&[f32]>,
        relu: bool,
    ) {
        let cout = self.cout;
        let bias = &self.bias[n0..n0 + oc];
        for r in 0..rows {
            let out = std::slice::from_raw_parts_mut(dst.add(r * cout), oc);
            let res = residual.map(|res| &res[(r0 + r) * cout + n0..(r0 + r) * cout + n0 + oc]);
            epilogue(out, bias, res, relu);
        }
    }

    /// Winograd F(2×2, 3×3), in blocks of 2×2 output tiles: (1) the input transform
    /// `V[ξ] = Bᵀ·d·B` of every tile's 4×4 patch; (2) 16 independent GEMMs
    /// `M[ξ] = V[ξ] · U[ξ]` (tiles × C_in · C_in × C_out); (3) the output transform `Aᵀ·M·A`
    /// plus bias, residual and ReLU.
    ///
    /// When `U` is small (C_in · C_out ≤ [`WINO_FUSED_MAX`]) each job runs all three steps on
    /// its own block of tiles (and, when blocks are few, its share of the output channels) in a
    /// per-thread buffer that stays in L2: one parallel pass, V and M never leave the core.
    /// Otherwise each step runs over a chunk of tiles in parallel (the GEMMs over ξ, so that a
    /// thread reads only its planes of the large `U`).
    #[allow(clippy::too_many_arguments)]
    fn winograd(
        &self,
        x: NhwcView<'_>,
        u: &[f32],
        ho: usize,
        wo: usize,
        residual: Option<&[f32]>,
        relu: bool,
        y: &mut [f32],
    ) {
        let (cin, cout) = (self.cin, self.cout);
        let bf16 = self.bf16.as_ref().is_some_and(|b| b.wino.is_some());
        let g = WinoGeom {
            th: ho.div_ceil(2),
            tw: wo.div_ceil(2),
            ho,
            wo,
            kv: if bf16 { cin.next_multiple_of(2) } else { cin },
            bf16,
        };
        let tiles = x.n * g.th * g.tw;
        let zeros = vec![0f32; cin];
        let yp = SendPtr(y.as_mut_ptr());
        if cin * cout <= WINO_FUSED_MAX {
            let threads = rayon::current_num_threads().max(1);
            // Tiles per job: V and M (16 × tiles × (C_in + C_out) floats) within ~512 KiB,
            // and at least four jobs per thread when there are tiles for them.
            let tb = (WINO_JOB_FLOATS / (16 * (cin + cout)))
                .min(tiles.div_ceil(4 * threads))
                .max(8);
            let blocks = tiles.div_ceil(tb);
            let mut col_split = 1;
            while blocks * col_split < 2 * threads
                && cout.is_multiple_of(col_split * 2)
                && (cout / (col_split * 2)).is_multiple_of(32)
            {
                col_split *= 2;
            }
            let oc = cout / col_split;
            (0..blocks * col_split).into_par_iter().for_each(|job| {
                let (b, cs) = (job / col_split, job % col_split);
                let (t0, n0) = (b * tb, cs * oc);
                let nt = tb.min(tiles - t0);
                WINO_BUF.with(|buf| {
                    let mut buf = buf.borrow_mut();
                    let (vl, ml) = (16 * nt * cin, 16 * nt * oc);
                    if buf.len() < vl + ml {
                        buf.resize(vl + ml, 0.0);
                    }
                    let (v, m) = buf.split_at_mut(vl);
                    // SAFETY: v holds 16 planes of nt rows (kv u16s or cin floats each), m 16
                    // planes of nt × oc floats; the job's tiles and columns of y are its own.
                    unsafe {
                        self.wino_in(&x, &g, &zeros, t0, nt, v.as_mut_ptr(), nt);
                        for xi in 0..16 {
                            self.wino_mm(&g, u, xi, nt, v.as_ptr(), nt, m.as_mut_ptr(), nt, n0, oc);
                        }
                        self.wino_out(&g, t0, nt, m, nt, n0, oc, residual, relu, yp);
                    }
                });
            });
            return;
        }
        // Tiles per chunk: ≥ 128 rows per GEMM, V and M chunks of at most ~8 MiB each.
        let tc = (WINO_CHUNK_FLOATS / (16 * cin.max(cout)))
            .clamp(128, 4096)
            .min(tiles);
        let mut v = scratch::take(16 * tc * cin);
        let mut m = scratch::take(16 * tc * cout);
        let blk = 16;
        for t0 in (0..tiles).step_by(tc) {
            let nt = tc.min(tiles - t0);
            let vp = SendPtr(v.as_mut_ptr());
            // SAFETY (all three steps): each job writes only its own tiles' rows of V (all 16
            // planes), its own plane of M, or its own tiles' output pixels; V (16 × tc rows of
            // kv u16s or cin floats) and M (16 × tc × cout) hold every row addressed.
            (0..nt.div_ceil(blk)).into_par_iter().for_each(|b| {
                let (r0, rows) = (b * blk, blk.min(nt - b * blk));
                let vrow = if g.bf16 {
                    unsafe { (vp.ptr() as *mut u16).add(r0 * g.kv) as *mut f32 }
                } else {
                    unsafe { vp.ptr().add(r0 * cin) }
                };
                unsafe { self.wino_in(&x, &g, &zeros, t0 + r0, rows, vrow, tc) };
            });
            let mp = SendPtr(m.as_mut_ptr());
            (0..16usize).into_par_iter().for_each(|xi| unsafe {
                self.wino_mm(&g, u, xi, nt, v.as_ptr(), tc, mp.ptr(), tc, 0, cout)
            });
            let m = &m;
            (0..nt.div_ceil(blk)).into_par_iter().for_each(|b| {
                let (r0, rows) = (b * blk, blk.min(nt - b * blk));
                unsafe {
                    self.wino_out(
                        &g,
                        t0 + r0,
                        rows,
                        &m[r0 * cout..],
                        tc,
                        0,
                        cout,
                        residual,
                        relu,
                        yp,
                    )
                };
            });
        }
        scratch::give(v);
        scratch::give(m);
    }

    /// Input transform of tiles `t0..t0 + nt` into rows `0..nt` of the 16 planes of `v`
    /// (plane ξ starts `ξ · ps` rows in; a row is `kv` u16s with bf16 products, `cin` floats
    /// otherwise).
    ///
    /// # Safety
    /// `v` must hold those rows, not shared with another thread.
    #[allow(clippy::too_many_arguments)]
    unsafe fn wino_in(
        &self,
        x: &NhwcView<'_>,
        g: &WinoGeom,
        zeros: &[f32],
        t0: usize,
        nt: usize,
        v: *mut f32,
        ps: usize,
    ) {
        let cin = self.cin;
        let pad = self.p.padding as isize;
        for t in 0..nt {
            let tile = t0 + t;
            let (img, rem) = (tile / (g.th * g.tw), tile % (g.th * g.tw));
            let (y0, x0) = (
                (rem / g.tw) as isize * 2 - pad,
                (rem % g.tw) as isize * 2 - pad,
            );
            let mut d: [&[f32]; 16] = [zeros; 16];
            for i in 0..4 {
                let yy = y0 + i as isize;
                if yy < 0 || yy >= x.h as isize {
                    continue;
                }
                for j in 0..4 {
                    let xx = x0 + j as isize;
                    if xx < 0 || xx >= x.w as isize {
                        continue;
                    }
                    let a = ((img * x.h + yy as usize) * x.w + xx as usize) * cin;
                    d[i * 4 + j] = &x.data[a..a + cin];
                }
            }
            #[cfg(target_arch = "x86_64")]
            if g.bf16 {
                // bf16 V (the weights exist only where the CPU has bf16).
                let v16 = v as *mut u16;
                let out: [&mut [u16]; 16] = std::array::from_fn(|xi| {
                    std::slice::from_raw_parts_mut(v16.add((xi * ps + t) * g.kv), g.kv)
                });
                input_transform_bf16(&d, out, cin);
                continue;
            }
            let out: [&mut [f32]; 16] = std::array::from_fn(|xi| {
                std::slice::from_raw_parts_mut(v.add((xi * ps + t) * cin), cin)
            });
            input_transform(&d, out, cin);
        }
    }

    /// `M[ξ] (nt × oc, row stride oc or C_out) = V[ξ] · U[ξ][:, n0..n0 + oc]` for plane ξ:
    /// planes `ps` rows apart in `v` and `pm` rows apart in `m`.
    ///
    /// # Safety
    /// `v` and `m` must hold those planes; plane ξ of `m` must not be shared with another
    /// thread; `n0` must be a multiple of 32 when `oc < C_out`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn wino_mm(
        &self,
        g: &WinoGeom,
        u: &[f32],
        xi: usize,
        nt: usize,
        v: *const f32,
        ps: usize,
        m: *mut f32,
        pm: usize,
        n0: usize,
        oc: usize,
    ) {
        let (cin, cout) = (self.cin, self.cout);
        let dst = m.add(xi * pm * oc);
        #[cfg(target_arch = "x86_64")]
        if let Some(w) = self.bf16.as_ref().and_then(|b| b.wino.as_ref()) {
            let a = (v as *const u16).add(xi * ps * g.kv);
            crate::bf16::mm_bf16_rounded(nt, a, g.kv, &w[xi], n0, oc, dst, oc);
            return;
        }
        let a = v.add(xi * ps * cin);
        #[cfg(target_arch = "x86_64")]
        if let Some(w) = self.f32p.as_ref().and_then(|f| f.wino.as_ref()) {
            crate::panel::mm_f32(nt, a, cin, &w[xi], n0, oc, dst, oc);
            return;
        }
        let b = u.as_ptr().add(xi * cin * cout + n0);
        mm(nt, oc, cin, dst, oc, 1, false, a, cin, 1, b, cout, 1);
    }

    /// Output transform of tiles `t0..t0 + nt` from rows `0..nt` of the 16 planes of `m`
    /// (`oc` floats a row, planes `pm` rows apart) into output channels `n0..n0 + oc`, with
    /// bias, residual and ReLU.
    ///
    /// # Safety
    /// The tiles' output pixels (those channels) must not be written by another thread.
    #[allow(clippy::too_many_arguments)]
    unsafe fn wino_out(
        &self,
        g: &WinoGeom,
        t0: usize,
        nt: usize,
        m: &[f32],
        pm: usize,
        n0: usize,
        oc: usize,
        residual: Option<&[f32]>,
        relu: bool,
        y: SendPtr,
    ) {
        let cout = self.cout;
        for t in 0..nt {
            let tile = t0 + t;
            let (img, rem) = (tile / (g.th * g.tw), tile % (g.th * g.tw));
            let (oy, ox) = ((rem / g.tw) * 2, (rem % g.tw) * 2);
            let planes: [&[f32]; 16] =
                std::array::from_fn(|xi| &m[(xi * pm + t) * oc..(xi * pm + t + 1) * oc]);
            let outs: [Option<Out<'_>>; 4] = std::array::from_fn(|q| {
                let (yy, xx) = (oy + q / 2, ox + q % 2);
                if yy >= g.ho || xx >= g.wo {
                    return None;
                }
                let at = ((img * g.ho + yy) * g.wo + xx) * cout + n0;
                let out = std::slice::from_raw_parts_mut(y.ptr().add(at), oc);
                Some((out, residual.map(|r| &r[at..at + oc])))
            });
            output_transform(&planes, outs, &self.bias[n0..n0 + oc], relu, oc);
        }
    }

    /// im2col of output rows `r0..r0+rows` (flattened over n·H_out·W_out), group `g`, into
    /// `cols` (`rows × k_h·k_w·C_in/g`, taps in `(ki, kj, ci)` order).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gather(
        &self,
        x: &NhwcView<'_>,
        ho: usize,
        wo: usize,
        r0: usize,
        rows: usize,
        g: usize,
        cols: &mut [f32],
    ) {
        let kg = self.kh * self.kw * (self.cin / self.p.groups);
        self.gather_with(x, ho, wo, r0, rows, g, cols, kg, 0.0, |s, d| {
            d.copy_from_slice(s)
        });
    }

    /// [`PackedConv::gather`] rounding to bf16 on the way ([`crate::bf16::round_row`]): rows
    /// of `row_len` ≥ k_h·k_w·C_in/g values, zero past the taps. The same values as rounding
    /// the f32 rows.
    ///
    /// # Safety
    /// [`crate::bf16::supported`] must be true.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn gather_bf16(
        &self,
        x: &NhwcView<'_>,
        ho: usize,
        wo: usize,
        r0: usize,
        rows: usize,
        g: usize,
        cols: &mut [u16],
        row_len: usize,
    ) {
        // SAFETY: the caller checked that the CPU has AVX512-BF16.
        self.gather_with(x, ho, wo, r0, rows, g, cols, row_len, 0, |s, d| unsafe {
            crate::bf16::round_row(s, d)
        });
    }

    /// The im2col walk of [`PackedConv::gather`], each run of input values stored by `put`
    /// (which may convert them), rows `row_len` apart, `zero` for padding taps and past them.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn gather_with<T: Copy>(
        &self,
        x: &NhwcView<'_>,
        ho: usize,
        wo: usize,
        r0: usize,
        rows: usize,
        g: usize,
        cols: &mut [T],
        row_len: usize,
        zero: T,
        put: impl Fn(&[f32], &mut [T]),
    ) {
        let (cin, groups) = (self.cin, self.p.groups);
        let cg = cin / groups;
        let kg = self.kh * self.kw * cg;
        let (s, pad, d) = (
            self.p.stride as isize,
            self.p.padding as isize,
            self.p.dilation as isize,
        );
        let (h, w) = (x.h as isize, x.w as isize);
        // At dilation 1 without groups the kw taps of a kernel row are one contiguous run.
        let runs = d == 1 && groups == 1;
        for (rr, dst) in cols.chunks_mut(row_len).take(rows).enumerate() {
            dst[kg..].fill(zero);
            let r = r0 + rr;
            let (img, rem) = (r / (ho * wo), r % (ho * wo));
            let (oh, ow) = ((rem / wo) as isize, (rem % wo) as isize);
            let iw0 = ow * s - pad;
            for ki in 0..self.kh {
                let ih = oh * s - pad + ki as isize * d;
                let drow = &mut dst[ki * self.kw * cg..(ki + 1) * self.kw * cg];
                if ih < 0 || ih >= h {
                    drow.fill(zero);
                    continue;
                }
                let line = (img * x.h + ih as usize) * x.w;
                if runs && iw0 >= 0 && iw0 + self.kw as isize <= w {
                    let a = (line + iw0 as usize) * cin;
                    put(&x.data[a..a + self.kw * cin], drow);
                    continue;
                }
                for kj in 0..self.kw {
                    let iw = iw0 + kj as isize * d;
                    let tap = &mut drow[kj * cg..(kj + 1) * cg];
                    if iw < 0 || iw >= w {
                        tap.fill(zero);
                    } else {
                        let a = (line + iw as usize) * cin + g * cg;
                        put(&x.data[a..a + cg], tap);
                    }
                }
            }
        }
    }
}

/// Below this many 2×2 output tiles a convolution stays on im2col-GEMM.
const WINO_MIN_TILES: usize = 32;

/// Largest `C_in · C_out` whose Winograd convolution runs fused per block of tiles (its `U`,
/// 16 · C_in · C_out floats, is read by every job).
const WINO_FUSED_MAX: usize = 256 * 256;

/// Floats of V and M per fused Winograd job (512 KiB: they stay in a 1–2 MiB L2).
const WINO_JOB_FLOATS: usize = 128 * 1024;

/// Tile geometry of a Winograd convolution: tiles per column and row, the output size, the
/// values per row of V (`C_in`, or rounded up to even for bf16).
struct WinoGeom {
    th: usize,
    tw: usize,
    ho: usize,
    wo: usize,
    kv: usize,
    /// V in bf16 (the products are).
    bf16: bool,
}

/// Floats per Winograd chunk buffer (V or M).
const WINO_CHUNK_FLOATS: usize = 2 << 20;

/// Channels per step of the Winograd transforms (fixed-size arrays that LLVM vectorises).
const LANES: usize = 16;

/// `Bᵀ·d·B` on `LANES` channels at once, Bᵀ = [[1,0,−1,0],[0,1,1,0],[0,−1,1,0],[0,1,0,−1]].
#[inline(always)]
fn bt_d_b(v: &[[f32; LANES]; 16]) -> [[f32; LANES]; 16] {
    let mut t = [[0f32; LANES]; 16];
    for j in 0..4 {
        for l in 0..LANES {
            let (a, b, c, e) = (v[j][l], v[4 + j][l], v[8 + j][l], v[12 + j][l]);
            t[j][l] = a - c;
            t[4 + j][l] = b + c;
            t[8 + j][l] = c - b;
            t[12 + j][l] = b - e;
        }
    }
    let mut r = [[0f32; LANES]; 16];
    for i in 0..4 {
        for l in 0..LANES {
            let (a, b, c, e) = (
                t[4 * i][l],
                t[4 * i + 1][l],
                t[4 * i + 2][l],
                t[4 * i + 3][l],
            );
            r[4 * i][l] = a - c;
            r[4 * i + 1][l] = b + c;
            r[4 * i + 2][l] = c - b;
            r[4 * i + 3][l] = b - e;
        }
    }
    r
}

/// `Aᵀ·M·A` on `LANES` channels at once, Aᵀ = [[1,1,1,0],[0,1,−1,−1]].
#[inline(always)]
fn at_m_a(m: &[[f32; LANES]; 16]) -> [[f32; LANES]; 4] {
    let mut s = [[0f32; LANES]; 8];
    for j in 0..4 {
        for l in 0..LANES {
            let (p, q, r, t) = (m[j][l], m[4 + j][l], m[8 + j][l], m[12 + j][l]);
            s[j][l] = p + q + r;
            s[4 + j][l] = q - r - t;
        }
    }
    let mut y = [[0f32; LANES]; 4];
    for i in 0..2 {
        for l in 0..LANES {
            let (a, b, c, e) = (
                s[4 * i][l],
                s[4 * i + 1][l],
                s[4 * i + 2][l],
                s[4 * i + 3][l],
            );
            y[2 * i][l] = a + b + c;
            y[2 * i + 1][l] = b - c - e;
        }
    }
    y
}

/// The input transform of one 4×4 patch `d` (row-major taps, `cin` floats each) into the 16
/// planes `out`.
fn input_transform(d: &[&[f32]; 16], mut out: [&mut [f32]; 16], cin: usize) {
    input_transform_with(d, cin, |k, c0, r, n| {
        if n == LANES {
            out[k][c0..c0 + LANES].copy_from_slice(r);
        } else {
            copy_partial(&r[..n], &mut out[k][c0..c0 + n]);
        }
    });
}

/// [`input_transform`] into planes of bf16 values (rounded as [`crate::bf16::round_row`]
/// does, so the product sees the same operands), each zero past `cin`.
///
/// # Safety
/// [`crate::bf16::supported`] must be true.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn input_transform_bf16(d: &[&[f32]; 16], mut out: [&mut [u16]; 16], cin: usize) {
    use std::arch::x86_64::*;
    for o in out.iter_mut() {
        o[cin..].fill(0);
    }
    input_transform_with(d, cin, |k, c0, r, n| {
        // SAFETY: AVX512-BF16 is present (the caller's contract); `r` holds LANES floats.
        let h: __m256i =
            unsafe { std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(r.as_ptr()))) };
        if n == LANES {
            // SAFETY: out[k][c0..c0 + LANES] is in bounds (n == LANES values remain).
            unsafe { _mm256_storeu_si256(out[k].as_mut_ptr().add(c0) as *mut __m256i, h) };
        } else {
            let mut t = [0u16; LANES];
            // SAFETY: t holds LANES u16 values (32 bytes).
            unsafe { _mm256_storeu_si256(t.as_mut_ptr() as *mut __m256i, h) };
            out[k][c0..c0 + n].copy_from_slice(&t[..n]);
        }
    });
}

/// `s[c0..c0 + n]` as `LANES` lanes (zero past `n`). The full block is one fixed-size load;
/// the partial one is out of line ([`copy_partial`]).
#[inline(always)]
fn load_lanes(s: &[f32], c0: usize, n: usize) -> [f32; LANES] {
    if n == LANES {
        s[c0..c0 + LANES].try_into().expect("LANES values")
    } else {
        let mut v = [0f32; LANES];
        copy_partial(&s[c0..c0 + n], &mut v[..n]);
        v
    }
}

/// A copy of a partial block of lanes, kept out of line: inlined, the compiler merged it with
/// the full block's fixed-size copy into one variable-length `memcpy` call per block (12 % of
/// a batch-1 forward).
#[cold]
#[inline(never)]
fn copy_partial(s: &[f32], d: &mut [f32]) {
    d.copy_from_slice(s);
}

/// `Bᵀ·d·B` of one 4×4 patch, `LANES` channels at a time: `put(ξ, c0, values, n)` stores
/// plane ξ's channels `c0..c0 + n` (the first `n` of `values`).
#[inline(always)]
fn input_transform_with(
    d: &[&[f32]; 16],
    cin: usize,
    mut put: impl FnMut(usize, usize, &[f32; LANES], usize),
) {
    for c0 in (0..cin).step_by(LANES) {
        let n = LANES.min(cin - c0);
        let v: [[f32; LANES]; 16] = std::array::from_fn(|k| load_lanes(d[k], c0, n));
        let r = bt_d_b(&v);
        for (k, rk) in r.iter().enumerate() {
            put(k, c0, rk, n);
        }
    }
}

/// One output pixel of a Winograd tile: its `C_out` floats and, when there is one, the
/// residual's.
type Out<'a> = (&'a mut [f32], Option<&'a [f32]>);

/// The output transform of one tile's 16 planes `m` (`cout` floats each) into its 2×2 outputs
/// (`outs[dy·2 + dx]`, `None` past the image's edge), with the [`epilogue`] applied on the way
/// (the same operations in the same order).
fn output_transform(
    m: &[&[f32]; 16],
    mut outs: [Option<Out<'_>>; 4],
    bias: &[f32],
    relu: bool,
    cout: usize,
) {
    for c0 in (0..cout).step_by(LANES) {
        let n = LANES.min(cout - c0);
        let v: [[f32; LANES]; 16] = std::array::from_fn(|k| load_lanes(m[k], c0, n));
        let y = at_m_a(&v);
        let b = &bias[c0..c0 + n];
        for (yq, out) in y.iter().zip(outs.iter_mut()) {
            let Some((out, res)) = out else { continue };
            let o = &mut out[c0..c0 + n];
            match res {
                Some(r) => {
                    let r = &r[c0..c0 + n];
                    for l in 0..n {
                        let x = yq[l] + b[l] + r[l];
                        o[l] = if relu { x.max(0.0) } else { x };
                    }
                }
                None => {
                    for l in 0..n {
                        let x = yq[l] + b[l];
                        o[l] = if relu { x.max(0.0) } else { x };
                    }
                }
            }
        }
    }
}

/// In place: `out = act(out + bias [+ residual])` (one output row of either kernel).
fn epilogue(out: &mut [f32], bias: &[f32], residual: Option<&[f32]>, relu: bool) {
    match residual {
        Some(r) => {
            for ((o, &b), &s) in out.iter_mut().zip(bias).zip(r) {
                let v = *o + b + s;
                *o = if relu { v.max(0.0) } else { v };
            }
        }
        None => {
            for (o, &b) in out.iter_mut().zip(bias) {
                let v = *o + b;
                *o = if relu { v.max(0.0) } else { v };
            }
        }
    }
}

/// Max-pooling with a `k × k` window, `stride` and implicit −∞ `padding` (PyTorch semantics).
pub fn max_pool(x: &Nhwc, k: usize, stride: usize, padding: usize) -> Result<Nhwc> {
    if k == 0 || stride == 0 || x.h + 2 * padding < k || x.w + 2 * padding < k || padding > k / 2 {
        candle_core::bail!(
            "max-pool: window {k}, stride {stride}, padding {padding} do not fit a {}×{} input",
            x.h,
            x.w
        );
    }
    let ho = (x.h + 2 * padding - k) / stride + 1;
    let wo = (x.w + 2 * padding - k) / stride + 1;
    let c = x.c;
    let mut data = scratch::take(x.n * ho * wo * c);
    if c == 0 {
        return Ok(Nhwc {
            n: x.n,
            h: ho,
            w: wo,
            c,
            data,
        });
    }
    data.par_chunks_mut(wo * c)
        .enumerate()
        .for_each(|(line, out)| {
            let (img, oh) = (line / ho, line % ho);
            let y0 = (oh * stride) as isize - padding as isize;
            for (ow, px) in out.chunks_mut(c).enumerate() {
                px.fill(f32::NEG_INFINITY);
                let x0 = (ow * stride) as isize - padding as isize;
                for dy in 0..k as isize {
                    let yy = y0 + dy;
                    if yy < 0 || yy >= x.h as isize {
                        continue;
                    }
                    for dx in 0..k as isize {
                        let xx = x0 + dx;
                        if xx < 0 || xx >= x.w as isize {
                            continue;
                        }
                        let a = ((img * x.h + yy as usize) * x.w + xx as usize) * c;
                        for (v, &s) in px.iter_mut().zip(&x.data[a..a + c]) {
                            *v = v.max(s);
                        }
                    }
                }
            }
        });
    Ok(Nhwc {
        n: x.n,
        h: ho,
        w: wo,
        c,
        data,
    })
}
