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
//! - [`conv2d`] — the same differentiable op for ordinary NCHW tensors (PFAM, the CFA
//!   descriptor), between two parallel layout changes.
//!
//! On CPUs with native bf16 dot products (AVX512-BF16), [`PackedConv::with_bf16`] rounds the
//! inference path's weights and activations to bf16 for its products ([`bf16`]; sums in f32).
//! On AVX-512 CPUs, [`PackedConv::with_panels`] packs the f32 weights once into the panels of
//! an 8 × 32 micro-kernel ([`panel`]), which the bf16 products share; small Winograd layers run
//! fused, one block of tiles per job from input transform to output, in a per-thread buffer.
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

use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

pub mod bf16;
pub mod nhwc;
pub mod nhwc_train;
pub mod panel;
pub use nhwc::{max_pool, Nhwc, NhwcView, PackedConv};
pub use nhwc_train::{add_relu, conv2d_nhwc, conv2d_nhwc_packed, pack_conv2d, to_nchw, to_nhwc};

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

pub(crate) fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("tessera conv2d: {what} must be contiguous"),
    }
}

/// 2-D convolution of an NCHW batch `x` with `w` (`C_out × C_in/groups × k_h × k_w`), plus an
/// optional bias, optionally followed by a ReLU. f32 on the CPU takes Tessera's kernels (with a
/// backward pass): the channels-last op between two parallel layout changes — one kernel for
/// both layouts, with only single-threaded GEMMs inside rayon jobs (the `gemm` crate's own
/// rayon mode gave wrong results here when several threads ran convolutions at once). Other
/// devices and dtypes take candle's `conv2d`.
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
    to_nchw(&conv2d_nhwc(&to_nhwc(x)?, w, bias, p, relu)?)
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
