//! MFCSAM: multi-scale frequency channel self-attention (paper §3.2, eqs. 3–7, Fig. 3).

use crate::fca::{check_fca_channels, FcaConfig, FcaWeight};
use crate::pam::{PamConfig, PositionAttention};
use crate::params::{Init, Source};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, OnceLock};
use tessera_conv::{conv2d, ConvParams, PackedConv};
use tessera_core::{Error, Result};

/// How the per-scale outputs become the block's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Fusion {
    /// Paper eq. 7: `E = E_0 ⊕ … ⊕ E_{S−1}` (concatenation of the attended scales).
    Concat,
    /// The authors' code (EPSANet's PSA style): a softmax across the `S` scales of the `E_i`,
    /// element-wise, weights the convolved features `F_i`, which are then concatenated.
    #[default]
    ScaleSoftmax,
}

/// What the position attention adds its scaled output to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Residual {
    /// Paper eq. 6: `E_i = α · out + A_i` (the frequency-attended features).
    #[default]
    Fca,
    /// The authors' code: `selfattention` returns `gamma · out + input`, its input being `F_i`
    /// before FCAWeight.
    Input,
}

/// Order of the scales in the concatenated output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ScaleOrder {
    /// Scale 0 first, as paper eq. 7 writes it.
    Ascending,
    /// Scale S−1 first: the authors' (and EPSANet's) loop `out = cat(x_i, out)`.
    #[default]
    Descending,
}

/// MFCSAM hyper-parameters. Defaults are the authors' released PFAM: two scales with kernels
/// 3 and 5 and groups 1 and 4, one attention module shared by the scales, scale-softmax fusion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MfcsamConfig {
    /// Kernel size per scale (odd). The paper's rule `k_i = 2(i+1)+1` gives 3, 5, 7, 9.
    pub kernels: Vec<usize>,
    /// Convolution groups per scale (the code's `conv_groups = [1, 4, 8, 16]`).
    pub groups: Vec<usize>,
    pub fusion: Fusion,
    pub residual: Residual,
    /// One FCAWeight + position attention for all scales (the authors' code applies one
    /// `selfattention` module to every scale); `false` gives each scale its own.
    pub share_attention: bool,
    pub order: ScaleOrder,
    pub fca: FcaConfig,
    pub pam: PamConfig,
}

impl Default for MfcsamConfig {
    fn default() -> Self {
        Self {
            kernels: vec![3, 5],
            groups: vec![1, 4],
            fusion: Fusion::ScaleSoftmax,
            residual: Residual::Fca,
            share_attention: true,
            order: ScaleOrder::Descending,
            fca: FcaConfig::default(),
            pam: PamConfig::default(),
        }
    }
}

impl MfcsamConfig {
    /// The paper's `S` scales: kernels `2(i+1)+1`, groups `1, 4, 8, 16, …` (the code's list).
    pub fn paper_scales(s: usize) -> Self {
        Self {
            kernels: (0..s).map(|i| 2 * (i + 1) + 1).collect(),
            groups: (0..s)
                .map(|i| if i == 0 { 1 } else { 1 << (i + 1) })
                .collect(),
            ..Self::default()
        }
    }

    /// Number of scales `S`.
    pub fn scales(&self) -> usize {
        self.kernels.len()
    }

    /// Check the configuration against a channel count `C`.
    pub fn validate(&self, channels: usize) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("mfcsam ({channels} channels): {m}")));
        let s = self.kernels.len();
        if s == 0 {
            return bad("needs at least one scale".into());
        }
        if self.groups.len() != s {
            return bad(format!(
                "{} kernels but {} group counts",
                s,
                self.groups.len()
            ));
        }
        if let Some(k) = self.kernels.iter().find(|&&k| k == 0 || k % 2 == 0) {
            return bad(format!(
                "kernel sizes must be odd (same-size output), got {k}"
            ));
        }
        if channels == 0 || !channels.is_multiple_of(s) {
            return bad(format!(
                "the channel count must split evenly into {s} scales"
            ));
        }
        let cs = channels / s;
        for &g in &self.groups {
            if g == 0 || !channels.is_multiple_of(g) || !cs.is_multiple_of(g) {
                return bad(format!(
                    "groups {g} must divide the input channels ({channels}) and the per-scale \
                     channels ({cs})"
                ));
            }
        }
        check_fca_channels(cs, &format!("mfcsam ({channels} channels, {s} scales)"))?;
        if self.fca.reduction == 0 || self.pam.qk_reduction == 0 || self.pam.chunk == Some(0) {
            return bad("fca.reduction, pam.qk_reduction and pam.chunk must be ≥ 1".into());
        }
        Ok(())
    }
}

/// MFCSAM on `C` channels with `S` scales (`C' = C/S` channels each):
/// 1. `F_i = conv_{k_i}(X)` (grouped, padding `k_i/2`, no bias; parameter `conv{i}.weight`,
///    `C' × C/g_i × k_i × k_i`);
/// 2. `A_i = FCAWeight(F_i)` (`fca.*`, or `fca{i}.*` when not shared);
/// 3. `E_i = α · leaky_relu(position_attention(A_i)) + A_i` (or `+ F_i`; `pam.*`/`pam{i}.*`);
/// 4. fusion: `concat(E_i)`, or `concat(F_i · softmax_i(E_i))`.
///
/// Output `B × C × H × W`, the input's shape.
#[derive(Debug, Clone)]
pub struct Mfcsam {
    prefix: String,
    channels: usize,
    cfg: MfcsamConfig,
    convs: Vec<Tensor>,
    fca: Vec<FcaWeight>,
    pam: Vec<PositionAttention>,
    /// Per convolution, its weights packed on first use — only for a loaded model, whose
    /// tensors never change (`Var`s do, under the optimiser).
    packed: Option<Vec<PackOnce>>,
}

/// A convolution's packed weights (and Winograd transform), built on first use and shared by
/// clones: the transform was most of the time of X3's 3×3 convolution at 14 × 14.
#[derive(Debug, Clone, Default)]
struct PackOnce(Arc<OnceLock<PackedConv>>);

impl PackOnce {
    /// `conv2d(x, w)` with the weights packed once; `None` when `x` cannot take the packed
    /// path (off the CPU, not f32, or tracked by autograd).
    fn conv(&self, x: &Tensor, w: &Tensor, p: ConvParams) -> Result<Option<Tensor>> {
        use tessera_conv::{conv2d_nhwc_packed, pack_conv2d, to_nchw, to_nhwc};
        if !tessera_core::tensor::untracked_cpu_f32(&[x]) {
            return Ok(None);
        }
        let packed = match self.0.get() {
            Some(c) => c,
            None => {
                let c = pack_conv2d(w, None, p)?;
                self.0.get_or_init(|| c)
            }
        };
        Ok(Some(to_nchw(&conv2d_nhwc_packed(
            &to_nhwc(x)?,
            packed,
            false,
        )?)?))
    }
}

impl Mfcsam {
    pub(crate) fn from_source(cfg: MfcsamConfig, channels: usize, src: &Source) -> Result<Self> {
        cfg.validate(channels)?;
        let s = cfg.scales();
        let cs = channels / s;
        let mut convs = Vec::with_capacity(s);
        for (i, (&k, &g)) in cfg.kernels.iter().zip(&cfg.groups).enumerate() {
            let fan_in = channels / g * k * k;
            convs.push(src.get(
                &[cs, channels / g, k, k],
                &format!("conv{i}.weight"),
                Init::torch_default(fan_in),
            )?);
        }
        let n_att = if cfg.share_attention { 1 } else { s };
        let mut fca = Vec::with_capacity(n_att);
        let mut pam = Vec::with_capacity(n_att);
        for i in 0..n_att {
            let tag = if cfg.share_attention {
                String::new()
            } else {
                i.to_string()
            };
            fca.push(FcaWeight::from_source(
                cfg.fca,
                cs,
                &src.pp(&format!("fca{tag}")),
            )?);
            pam.push(PositionAttention::from_source(
                cfg.pam,
                cs,
                &src.pp(&format!("pam{tag}")),
            )?);
        }
        // One cell per convolution (`vec![x; n]` would clone one shared cell).
        let packed = src
            .is_frozen()
            .then(|| convs.iter().map(|_| PackOnce::default()).collect());
        Ok(Self {
            prefix: src.full(""),
            channels,
            cfg,
            convs,
            fca,
            pam,
            packed,
        })
    }

    /// The attention modules used by scale `i`.
    fn attention(&self, i: usize) -> (&FcaWeight, &PositionAttention) {
        let j = if self.cfg.share_attention { 0 } else { i };
        (&self.fca[j], &self.pam[j])
    }

    /// `x` (`B × C × H × W`) → `B × C × H × W`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = x.dims4()?;
        if c != self.channels {
            return Err(Error::Config(format!(
                "mfcsam '{}': built for {} channels, input has {c}",
                self.prefix, self.channels
            )));
        }
        let s = self.cfg.scales();
        let mut f = Vec::with_capacity(s);
        let mut e = Vec::with_capacity(s);
        for (i, (w, &k)) in self.convs.iter().zip(&self.cfg.kernels).enumerate() {
            let p = ConvParams {
                padding: k / 2,
                groups: self.cfg.groups[i],
                ..ConvParams::default()
            };
            let once = self.packed.as_ref().map(|v| &v[i]);
            let fi = match once.map(|o| o.conv(x, w, p)).transpose()?.flatten() {
                Some(fi) => fi,
                None => conv2d(x, w, None, p, false)?,
            };
            let (fca, pam) = self.attention(i);
            let ai = fca.forward(&fi)?;
            let res = match self.cfg.residual {
                Residual::Fca => &ai,
                Residual::Input => &fi,
            };
            e.push(pam.forward_with_residual(&ai, res)?);
            f.push(fi);
        }
        let order = self.cfg.order;
        match self.cfg.fusion {
            Fusion::Concat => concat_scales(e, order),
            // A softmax over one scale is 1 everywhere.
            Fusion::ScaleSoftmax if s == 1 => concat_scales(f, order),
            Fusion::ScaleSoftmax
                if tessera_core::tensor::untracked_cpu_f32(
                    &f.iter().chain(&e).collect::<Vec<_>>(),
                ) =>
            {
                scale_softmax_fused(&f, &e, order)
            }
            Fusion::ScaleSoftmax => scale_softmax_ops(&f, &e, order),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &MfcsamConfig {
        &self.cfg
    }

    /// Input (= output) channel count.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Change the attention chunk of every position attention (inference setting).
    pub fn set_chunk(&mut self, chunk: Option<usize>) -> Result<()> {
        for p in &mut self.pam {
            p.set_chunk(chunk)?;
        }
        self.cfg.pam.chunk = chunk;
        Ok(())
    }

    /// The position attentions' products in bf16 ([`PositionAttention::set_bf16_products`]).
    pub fn set_bf16_products(&mut self, on: bool) {
        for p in &mut self.pam {
            p.set_bf16_products(on);
        }
    }

    /// The position attention blocks (one when shared), e.g. to read α.
    pub fn position_attention(&self) -> &[PositionAttention] {
        &self.pam
    }

    /// The FCAWeight blocks (one when shared).
    pub fn fca(&self) -> &[FcaWeight] {
        &self.fca
    }

    /// The parameters with their full names.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .convs
            .iter()
            .enumerate()
            .map(|(i, w)| {
                (
                    crate::join(&self.prefix, &format!("conv{i}.weight")),
                    w.clone(),
                )
            })
            .collect();
        for (f, p) in self.fca.iter().zip(&self.pam) {
            out.extend(f.tensors());
            out.extend(p.tensors());
        }
        out
    }

    /// A copy whose parameters are detached from autograd (inference: chunks of the attention
    /// are freed as soon as they are used).
    pub fn detached(&self) -> Self {
        Self {
            prefix: self.prefix.clone(),
            channels: self.channels,
            cfg: self.cfg.clone(),
            convs: self.convs.iter().map(|t| t.detach()).collect(),
            fca: self.fca.iter().map(|f| f.detached()).collect(),
            pam: self.pam.iter().map(|p| p.detached()).collect(),
            packed: self.packed.clone(),
        }
    }
}

/// The scales' outputs concatenated along channels in `order`.
fn concat_scales(mut parts: Vec<Tensor>, order: ScaleOrder) -> Result<Tensor> {
    if order == ScaleOrder::Descending {
        parts.reverse();
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// Scale-softmax fusion as candle ops (differentiable; any device): `concat(F_i ·
/// softmax_i(E_i))` in `order`.
fn scale_softmax_ops(f: &[Tensor], e: &[Tensor], order: ScaleOrder) -> Result<Tensor> {
    let w = candle_nn::ops::softmax(&Tensor::stack(e, 1)?, 1)?;
    let parts = f
        .iter()
        .enumerate()
        .map(|(i, fi)| Ok(fi.mul(&w.narrow(1, i, 1)?.squeeze(1)?)?))
        .collect::<Result<Vec<_>>>()?;
    concat_scales(parts, order)
}

/// Scale-softmax fusion for inference (CPU f32, nothing tracked): `concat_p(F_i ·
/// softmax_i(E_i))` in the output order, in two parallel passes (the softmax weights per
/// position, then the products straight into their place in the output) instead of candle's
/// stack, max, subtract, exp, sum over a middle dimension (one thread), divide, `S` products
/// and a concatenation ([`scale_softmax_ops`]). The same operations in the same order — `exp`
/// from std as candle's, the sum from 0 in scale order — so the same values for finite
/// inputs (tested).
fn scale_softmax_fused(f: &[Tensor], e: &[Tensor], order: ScaleOrder) -> Result<Tensor> {
    use rayon::prelude::*;
    /// Positions per parallel job.
    const CHUNK: usize = 4096;
    let s = f.len();
    let (b, c, h, w) = f[0].dims4()?;
    let per = c * h * w;
    let refs: Vec<&Tensor> = f.iter().chain(e).collect();
    let out = tessera_core::tensor::with_f32_slices(&refs, |sl| {
        let (fs, es) = sl.split_at(s);
        let mut wts = vec![0f32; b * per * s];
        wts.par_chunks_mut(CHUNK * s)
            .enumerate()
            .for_each(|(ci, wc)| {
                let mut num = vec![0f32; s];
                for (t, wp) in wc.chunks_exact_mut(s).enumerate() {
                    let g = ci * CHUNK + t;
                    let mut m = es[0][g];
                    for ek in &es[1..] {
                        if ek[g] > m {
                            m = ek[g];
                        }
                    }
                    let mut den = 0f32;
                    for (nk, ek) in num.iter_mut().zip(es) {
                        *nk = (ek[g] - m).exp();
                        den += *nk;
                    }
                    for (wk, nk) in wp.iter_mut().zip(&num) {
                        *wk = nk / den;
                    }
                }
            });
        let mut out = vec![0f32; b * s * per];
        out.par_chunks_mut(per).enumerate().for_each(|(idx, o)| {
            let (img, part) = (idx / s, idx % s);
            let i = match order {
                ScaleOrder::Ascending => part,
                ScaleOrder::Descending => s - 1 - part,
            };
            let base = img * per;
            for (j, v) in o.iter_mut().enumerate() {
                *v = fs[i][base + j] * wts[(base + j) * s + i];
            }
        });
        out
    })?;
    Ok(Tensor::from_vec(out, (b, s * c, h, w), f[0].device())?)
}

crate::params::block_constructors!(
    Mfcsam,
    MfcsamConfig,
    "with parameters `conv{i}.weight`, `fca*`, `pam*`",
    "`{prefix}.conv0.weight`, …"
);

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused inference fusion gives candle's composition's values exactly, for two and
    /// three scales, both orders, a batch of two and sizes across the parallel chunks.
    #[test]
    fn fused_scale_softmax_equals_the_candle_ops() {
        let mut rng = tessera_core::test_util::Lcg(5);
        let dev = candle_core::Device::Cpu;
        let mut t = |shape: (usize, usize, usize, usize), scale: f32| {
            let n = shape.0 * shape.1 * shape.2 * shape.3;
            let d: Vec<f32> = (0..n).map(|_| rng.signed() * scale).collect();
            Tensor::from_vec(d, shape, &dev).unwrap()
        };
        for (s, shape) in [(2, (2, 16, 9, 7)), (3, (1, 32, 40, 41)), (2, (1, 3, 1, 1))] {
            let f: Vec<Tensor> = (0..s).map(|_| t(shape, 3.0)).collect();
            let e: Vec<Tensor> = (0..s).map(|_| t(shape, 30.0)).collect();
            for order in [ScaleOrder::Ascending, ScaleOrder::Descending] {
                let want = scale_softmax_ops(&f, &e, order).unwrap();
                let got = scale_softmax_fused(&f, &e, order).unwrap();
                assert_eq!(got.dims(), want.dims());
                let (g, w): (Vec<f32>, Vec<f32>) = (
                    got.flatten_all().unwrap().to_vec1().unwrap(),
                    want.flatten_all().unwrap().to_vec1().unwrap(),
                );
                for (i, (a, b)) in g.iter().zip(&w).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{s} scales, {order:?}, at {i}");
                }
            }
        }
    }
}
