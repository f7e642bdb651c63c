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
        })
    }

    /// Products in bf16 (sums in f32) where this CPU has native bf16 dot products
    /// ([`crate::bf16::supported`]); elsewhere `self` unchanged. Call after
    /// [`PackedConv::with_winograd`] (its `U[ξ]` are rounded too).
    pub fn with_bf16(mut self) -> Self {
        if !crate::bf16::supported() {
            return self;
        }
        let (groups, og) = (self.p.groups, self.cout / self.p.groups);
        let kg = self.kh * self.kw * (self.cin / groups);
        let per_group = (0..groups)
            .map(|g| Panels::pack(&self.w[g * kg * og..(g + 1) * kg * og], kg, og, og))
            .collect();
        let (cin, cout) = (self.cin, self.cout);
        // With bf16 products Winograd's transforms (f32, two passes over every tile) cost as
        // much as the products they save below 128 channels: im2col there.
        if cin.min(cout) < WINO_BF16_MIN_CHANNELS {
            self.wino = None;
        }
        let wino = self.wino.as_ref().map(|u| {
            (0..16)
                .map(|xi| Panels::pack(&u[xi * cin * cout..(xi + 1) * cin * cout], cin, cout, cout))
                .collect()
        });
        self.bf16 = Some(Bf16Weights {
            groups: per_group,
            wino,
        });
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
        // bf16 panels are 32 columns wide: a split must start on one.
        let align = if self.bf16.is_some() { 32 } else { 16 };
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
                // group block (row stride og), dst is rows × oc with row stride cout; the bf16
                // panels exist only where the CPU has bf16 (`with_bf16`), cs·oc is a multiple
                // of 32 there (the split above).
                #[cfg(target_arch = "x86_64")]
                if let Some(bw) = &self.bf16 {
                    unsafe {
                        crate::bf16::mm_bf16(
                            rows,
                            a.as_ptr(),
                            a_rs,
                            &bw.groups[g],
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
            let bias = &self.bias[n0..n0 + oc];
            for r in 0..rows {
                // SAFETY: the same block as above, one row at a time.
                let out = unsafe { std::slice::from_raw_parts_mut(dst.add(r * cout), oc) };
                let res = residual.map(|res| &res[(r0 + r) * cout + n0..(r0 + r) * cout + n0 + oc]);
                epilogue(out, bias, res, relu);
            }
        });
        Ok(Nhwc {
            n: x.n,
            h: ho,
            w: wo,
            c: cout,
            data: y,
        })
    }

    /// Winograd F(2×2, 3×3): per chunk of 2×2 output tiles, (1) the input transform
    /// `V[ξ] = Bᵀ·d·B` of every tile's 4×4 patch, in parallel over tiles; (2) 16 independent
    /// GEMMs `M[ξ] = V[ξ] · U[ξ]` (tiles × C_in · C_in × C_out), in parallel over ξ; (3) the
    /// output transform `Aᵀ·M·A` plus bias, residual and ReLU, in parallel over tiles.
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
        let pad = self.p.padding as isize;
        let (th, tw) = (ho.div_ceil(2), wo.div_ceil(2));
        let tiles = x.n * th * tw;
        // Tiles per chunk: ≥ 128 rows per GEMM (the pack of U[ξ] is amortised over them),
        // V and M chunks of at most ~8 MiB each.
        let tc = (WINO_CHUNK_FLOATS / (16 * cin.max(cout)))
            .clamp(128, 4096)
            .min(tiles);
        let mut v = scratch::take(16 * tc * cin);
        let mut m = scratch::take(16 * tc * cout);
        let zeros = vec![0f32; cin];
        let yp = SendPtr(y.as_mut_ptr());
        for t0 in (0..tiles).step_by(tc) {
            let nt = tc.min(tiles - t0);
            // (1) input transform. V layout: [ξ][tile][ci], written through a raw pointer by
            // tile blocks (each job owns its tiles' rows in all 16 planes).
            let vp = SendPtr(v.as_mut_ptr());
            let blk = 16;
            (0..nt.div_ceil(blk)).into_par_iter().for_each(|b| {
                for t in b * blk..((b + 1) * blk).min(nt) {
                    let tile = t0 + t;
                    let (img, rem) = (tile / (th * tw), tile % (th * tw));
                    let (y0, x0) = ((rem / tw) as isize * 2 - pad, (rem % tw) as isize * 2 - pad);
                    let mut d: [&[f32]; 16] = [&zeros; 16];
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
                    // SAFETY: plane ξ's row t (cin floats) lies inside v (16 × tc × cin) and
                    // belongs to this job only.
                    let out: [&mut [f32]; 16] = std::array::from_fn(|xi| unsafe {
                        std::slice::from_raw_parts_mut(vp.ptr().add((xi * tc + t) * cin), cin)
                    });
                    input_transform(&d, out, cin);
                }
            });
            // (2) the 16 GEMMs.
            let mp = SendPtr(m.as_mut_ptr());
            let wino_bf16 = self.bf16.as_ref().and_then(|b| b.wino.as_ref());
            (0..16usize).into_par_iter().for_each(|xi| {
                // SAFETY: plane ξ of m (nt × cout) is written by this job only; plane ξ of v is
                // nt × cin; U[ξ] is cin × cout (packed for bf16 only where the CPU has it).
                #[cfg(target_arch = "x86_64")]
                if let Some(u16s) = wino_bf16 {
                    unsafe {
                        crate::bf16::mm_bf16(
                            nt,
                            v.as_ptr().add(xi * tc * cin),
                            cin,
                            &u16s[xi],
                            0,
                            cout,
                            mp.ptr().add(xi * tc * cout),
                            cout,
                        )
                    };
                    return;
                }
                unsafe {
                    mm(
                        nt,
                        cout,
                        cin,
                        mp.ptr().add(xi * tc * cout),
                        cout,
                        1,
                        false,
                        v.as_ptr().add(xi * tc * cin),
                        cin,
                        1,
                        u.as_ptr().add(xi * cin * cout),
                        cout,
                        1,
                    )
                };
            });
            // (3) output transform + epilogue.
            let m = &m;
            (0..nt.div_ceil(blk)).into_par_iter().for_each(|b| {
                let mut acc = vec![0f32; 4 * cout];
                for t in b * blk..((b + 1) * blk).min(nt) {
                    let tile = t0 + t;
                    let (img, rem) = (tile / (th * tw), tile % (th * tw));
                    let (oy, ox) = ((rem / tw) * 2, (rem % tw) * 2);
                    let planes: [&[f32]; 16] = std::array::from_fn(|xi| {
                        &m[(xi * tc + t) * cout..(xi * tc + t + 1) * cout]
                    });
                    output_transform(&planes, &mut acc, cout);
                    for dy in 0..2 {
                        for dx in 0..2 {
                            let (yy, xx) = (oy + dy, ox + dx);
                            if yy >= ho || xx >= wo {
                                continue;
                            }
                            let row = (img * ho + yy) * wo + xx;
                            // SAFETY: output pixel `row` belongs to this tile only.
                            let out = unsafe {
                                std::slice::from_raw_parts_mut(yp.ptr().add(row * cout), cout)
                            };
                            let a = &acc[(dy * 2 + dx) * cout..(dy * 2 + dx + 1) * cout];
                            out.copy_from_slice(a);
                            epilogue(
                                out,
                                &self.bias,
                                residual.map(|r| &r[row * cout..(row + 1) * cout]),
                                relu,
                            );
                        }
                    }
                }
            });
        }
        scratch::give(v);
        scratch::give(m);
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
        for (rr, dst) in cols.chunks_mut(kg).take(rows).enumerate() {
            let r = r0 + rr;
            let (img, rem) = (r / (ho * wo), r % (ho * wo));
            let (oh, ow) = ((rem / wo) as isize, (rem % wo) as isize);
            let iw0 = ow * s - pad;
            for ki in 0..self.kh {
                let ih = oh * s - pad + ki as isize * d;
                let drow = &mut dst[ki * self.kw * cg..(ki + 1) * self.kw * cg];
                if ih < 0 || ih >= h {
                    drow.fill(0.0);
                    continue;
                }
                let line = (img * x.h + ih as usize) * x.w;
                if runs && iw0 >= 0 && iw0 + self.kw as isize <= w {
                    let a = (line + iw0 as usize) * cin;
                    drow.copy_from_slice(&x.data[a..a + self.kw * cin]);
                    continue;
                }
                for kj in 0..self.kw {
                    let iw = iw0 + kj as isize * d;
                    let tap = &mut drow[kj * cg..(kj + 1) * cg];
                    if iw < 0 || iw >= w {
                        tap.fill(0.0);
                    } else {
                        let a = (line + iw as usize) * cin + g * cg;
                        tap.copy_from_slice(&x.data[a..a + cg]);
                    }
                }
            }
        }
    }
}

/// Below this many 2×2 output tiles a convolution stays on im2col-GEMM.
const WINO_MIN_TILES: usize = 32;

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
    let mut v = [[0f32; LANES]; 16];
    for c0 in (0..cin).step_by(LANES) {
        let n = LANES.min(cin - c0);
        // Fixed-length copies for full blocks (inlined; a variable length calls memmove).
        if n == LANES {
            for (k, vk) in v.iter_mut().enumerate() {
                vk.copy_from_slice(&d[k][c0..c0 + LANES]);
            }
            let r = bt_d_b(&v);
            for (k, ok) in out.iter_mut().enumerate() {
                ok[c0..c0 + LANES].copy_from_slice(&r[k]);
            }
            continue;
        }
        for (k, vk) in v.iter_mut().enumerate() {
            vk[..n].copy_from_slice(&d[k][c0..c0 + n]);
        }
        let r = bt_d_b(&v);
        for (k, ok) in out.iter_mut().enumerate() {
            ok[c0..c0 + n].copy_from_slice(&r[k][..n]);
        }
    }
}

/// The output transform of one tile's 16 planes `m` (`cout` floats each) into its 2×2 outputs,
/// written `[dy·2 + dx][c]` into `acc`.
fn output_transform(m: &[&[f32]; 16], acc: &mut [f32], cout: usize) {
    let mut v = [[0f32; LANES]; 16];
    for c0 in (0..cout).step_by(LANES) {
        let n = LANES.min(cout - c0);
        if n == LANES {
            for (k, vk) in v.iter_mut().enumerate() {
                vk.copy_from_slice(&m[k][c0..c0 + LANES]);
            }
        } else {
            for (k, vk) in v.iter_mut().enumerate() {
                vk[..n].copy_from_slice(&m[k][c0..c0 + n]);
            }
        }
        let y = at_m_a(&v);
        for (q, yq) in y.iter().enumerate() {
            acc[q * cout + c0..q * cout + c0 + n].copy_from_slice(&yq[..n]);
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
