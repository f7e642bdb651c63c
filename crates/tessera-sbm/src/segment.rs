//! PFAM trained to find synthetic defects (`fit --method ours --pfam-train synth`).
//!
//! The paper trains PFAM on the jigsaw, which a uniform texture cannot teach (docs/pfam.md).
//! This objective works on any category: the backbone stays frozen, PFAM's three outputs feed a
//! linear per-position head (a 1×1 convolution on each level, summed on X1's grid), and the
//! head must mark where tessera-synth pasted a defect. Loss: binary cross-entropy with soft
//! targets (the mask's share of each cell), positives and negatives weighted equally, in the
//! spirit of DRAEM/MemSeg's synthetic supervision. The head is discarded afterwards; the
//! scorers see PFAM's features. Held-out images (never trained on) each get one seeded defect,
//! and the head's cell AUROC on them says whether anything was learned.

use crate::nets::{sorted_vars, to_batch};
use crate::report::{read_stored_report, save_with_report};
use crate::train::mix;
use crate::SbmData;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use image::GrayImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;
use tessera_backbone::Backbone;
use tessera_core::{Error, FeatureMaps, Result};
use tessera_optim::{AdamW, AdamWConfig};
use tessera_pfam::{Pfam, PfamConfig};

/// Metadata key of the report in a segmentation-trained PFAM file.
pub const SEGMENT_REPORT_KEY: &str = "tessera_pfam_segment";

/// Settings of the segmentation objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentConfig {
    pub pfam: PfamConfig,
    pub epochs: usize,
    pub batch_size: usize,
    /// AdamW learning rate of PFAM and the head.
    pub lr: f64,
    pub weight_decay: f64,
    /// Probability that a training input carries a synthetic defect.
    pub synth_prob: f64,
    /// Fraction of the images held out for the held-out AUROC (never trained on).
    pub holdout: f64,
    pub seed: u64,
}

impl Default for SegmentConfig {
    fn default() -> Self {
        Self {
            pfam: PfamConfig::default(),
            epochs: 3,
            batch_size: 8,
            lr: 1e-3,
            weight_decay: 1e-4,
            synth_prob: 0.5,
            holdout: 0.1,
            seed: 0,
        }
    }
}

impl SegmentConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("pfam segmentation: {m}")));
        if self.epochs == 0 || self.batch_size == 0 {
            return bad("epochs and batch size must be ≥ 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("the learning rate must be > 0, got {}", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "weight decay must be ≥ 0, got {}",
                self.weight_decay
            ));
        }
        if !(self.synth_prob > 0.0 && self.synth_prob <= 1.0) {
            return bad(format!(
                "the synthetic-defect probability must lie in (0, 1], got {}",
                self.synth_prob
            ));
        }
        if !(self.holdout > 0.0 && self.holdout < 1.0) {
            return bad(format!("holdout must lie in (0, 1), got {}", self.holdout));
        }
        Ok(())
    }
}

/// One epoch of the segmentation objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentEpoch {
    pub epoch: usize,
    /// Mean balanced cross-entropy over the epoch.
    pub loss: f64,
    /// Cell AUROC of the head on the held-out images' synthetic defects.
    pub heldout_auroc: f64,
    pub seconds: f64,
}

/// What a segmentation run measured (stored in its output file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentReport {
    pub config: SegmentConfig,
    pub arch: String,
    pub source: String,
    pub train_images: usize,
    pub heldout_images: usize,
    pub history: Vec<SegmentEpoch>,
    /// The last epoch's held-out cell AUROC (0.5 = nothing learned).
    pub heldout_auroc: f64,
    pub seconds_per_epoch: f64,
}

/// Progress of a segmentation run.
#[derive(Debug, Clone)]
pub enum SegmentEvent {
    Step {
        epoch: usize,
        epochs: usize,
        batch: usize,
        batches: usize,
        loss: f64,
    },
    Epoch(SegmentEpoch),
}

/// A finished run: PFAM (detached, for inference) and the report.
#[derive(Debug)]
pub struct SegmentOutcome {
    pub pfam: Pfam,
    pub report: SegmentReport,
}

impl SegmentOutcome {
    /// Write PFAM's tensors (`pfam.*`) with the report in the metadata, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        save_with_report(path, &self.pfam.tensors(), SEGMENT_REPORT_KEY, &self.report)
    }
}

/// The segmentation report stored in a file, if it holds one.
pub fn read_segment_report(path: &Path) -> Result<Option<SegmentReport>> {
    read_stored_report(path, SEGMENT_REPORT_KEY, "PFAM")
}

/// The linear per-position head: one 1×1 convolution per level, upsampled (nearest) to the
/// first level's grid and summed, plus a bias: logits `(B, H1, W1)`.
struct SegHead {
    weights: Vec<Var>,
    bias: Var,
}

impl SegHead {
    fn new(channels: [usize; 3], seed: u64, dev: &Device) -> Result<Self> {
        let fan_in: usize = channels.iter().sum();
        let bound = 1.0 / (fan_in as f32).sqrt();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut weights = Vec::new();
        for c in channels {
            let w: Vec<f32> = (0..c).map(|_| rng.random_range(-bound..bound)).collect();
            weights.push(Var::from_tensor(&Tensor::from_vec(w, (1, c), dev)?)?);
        }
        let bias = Var::from_tensor(&Tensor::zeros(1, DType::F32, dev)?)?;
        Ok(Self { weights, bias })
    }

    fn vars(&self) -> Vec<Var> {
        let mut v = self.weights.clone();
        v.push(self.bias.clone());
        v
    }

    fn forward(&self, levels: &[Tensor]) -> Result<Tensor> {
        let (b, _, h1, w1) = levels[0].dims4()?;
        let mut acc: Option<Tensor> = None;
        for (x, w) in levels.iter().zip(&self.weights) {
            let (_, c, h, wd) = x.dims4()?;
            // (1, C) · (B, C, HW) → (B, 1, HW)
            let z = w
                .as_tensor()
                .unsqueeze(0)?
                .broadcast_as((b, 1, c))?
                .matmul(&x.contiguous()?.reshape((b, c, h * wd))?)?
                .reshape((b, h, wd))?;
            let z = if (h, wd) == (h1, w1) {
                z
            } else {
                let dev = z.device();
                let rows = Tensor::new(nearest(h, h1).as_slice(), dev)?;
                let cols = Tensor::new(nearest(wd, w1).as_slice(), dev)?;
                z.index_select(&rows, 1)?.index_select(&cols, 2)?
            };
            acc = Some(match acc {
                None => z,
                Some(a) => (a + z)?,
            });
        }
        let acc = acc.ok_or_else(|| Error::Config("segmentation head: no levels".into()))?;
        Ok(acc.broadcast_add(self.bias.as_tensor())?)
    }
}

/// Source index of each of `to` outputs for nearest upsampling from `from` (PyTorch's
/// `nearest`: floor(i · from / to)).
fn nearest(from: usize, to: usize) -> Vec<u32> {
    (0..to).map(|i| ((i * from) / to) as u32).collect()
}

/// The mask's share of defect pixels in each cell of an `h × w` grid (area average).
pub fn pool_mask(mask: &GrayImage, h: usize, w: usize) -> Vec<f32> {
    let (mw, mh) = (mask.width() as usize, mask.height() as usize);
    let mut out = vec![0f32; h * w];
    for y in 0..h {
        let (y0, y1) = (y * mh / h, ((y + 1) * mh).div_ceil(h).min(mh));
        for x in 0..w {
            let (x0, x1) = (x * mw / w, ((x + 1) * mw).div_ceil(w).min(mw));
            let mut hit = 0usize;
            for yy in y0..y1 {
                for xx in x0..x1 {
                    hit += (mask.get_pixel(xx as u32, yy as u32)[0] > 127) as usize;
                }
            }
            out[y * w + x] = hit as f32 / ((y1 - y0) * (x1 - x0)).max(1) as f32;
        }
    }
    out
}

/// `softplus(z) = log(1 + eˣ)`, stable for large |z|.
fn softplus(z: &Tensor) -> Result<Tensor> {
    Ok((z.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// Balanced binary cross-entropy with soft targets `t` (same shape as the logits `z`): the
/// positive mass and the negative mass each weigh one half, so a small defect is not drowned
/// by the normal cells around it. With no positive mass, the negative term alone.
fn balanced_bce(z: &Tensor, t: &Tensor) -> Result<Tensor> {
    let pos = t.sum_all()?.to_scalar::<f32>()? as f64;
    let neg = t.elem_count() as f64 - pos;
    // −log σ(z) = softplus(−z); −log(1 − σ(z)) = softplus(z).
    let lp = (softplus(&z.neg()?)? * t)?.sum_all()?;
    let ln = (softplus(z)? * (t.ones_like()? - t)?)?.sum_all()?;
    let ln = (ln / neg.max(1.0))?;
    if pos > 1e-6 {
        Ok(((lp / pos)? * 0.5)?.add(&(ln * 0.5)?)?)
    } else {
        Ok(ln)
    }
}

/// One input: normalised CHW values and the defect mask (all zeros for a clean image).
type Input = (Vec<f32>, GrayImage);

fn make_input(data: &SbmData, i: usize, defect: bool, seed: u64) -> Result<Input> {
    let img = &data.images[i];
    let (w, h) = img.dimensions();
    let synth = match data.synth {
        Some(s) if defect => Some(s.synthesize(img, seed)?),
        _ => None,
    };
    Ok(match synth {
        Some(s) => (tessera_data::normalize(&s.image, &data.preprocess), s.mask),
        None => (
            tessera_data::normalize(img, &data.preprocess),
            GrayImage::new(w, h),
        ),
    })
}

/// Frozen backbone features of a batch, then PFAM (trainable) and the head: the logits and
/// the soft targets on X1's grid.
fn forward_batch(
    backbone: &Backbone,
    pfam: &Pfam,
    head: &SegHead,
    inputs: Vec<Input>,
    (h, w): (usize, usize),
) -> Result<(Tensor, Tensor)> {
    let dev = backbone.device().clone();
    let b = inputs.len();
    let (chw, masks): (Vec<_>, Vec<_>) = inputs.into_iter().unzip();
    let x = to_batch(chw, 3, h, w, &dev)?;
    let f = backbone.forward(&x)?;
    let levels: Vec<Tensor> = f.levels.iter().map(|t| t.detach()).collect();
    let out = pfam.forward(&FeatureMaps::new(levels))?;
    let z = head.forward(&out.levels)?;
    let (_, h1, w1) = z.dims3()?;
    let t: Vec<f32> = masks
        .par_iter()
        .flat_map_iter(|m| pool_mask(m, h1, w1))
        .collect();
    Ok((z, Tensor::from_vec(t, (b, h1, w1), &dev)?))
}

/// Train PFAM (and the throw-away head) to segment `data.synth`'s defects on the frozen
/// `backbone`'s features. Deterministic from `config.seed`.
pub fn train_pfam_segment(
    config: &SegmentConfig,
    backbone: &Backbone,
    data: &SbmData,
    progress: &dyn Fn(&SegmentEvent),
) -> Result<SegmentOutcome> {
    config.validate()?;
    if data.synth.is_none() {
        return Err(Error::Config(
            "pfam segmentation needs synthetic defects (a synthesizer)".into(),
        ));
    }
    let ch = backbone.channels();
    let channels = match ch[..] {
        [a, b, c] => [a, b, c],
        _ => return Err(Error::Config("PFAM needs backbone layers 1..3".into())),
    };
    let n_img = data.images.len();
    let n_hold = ((n_img as f64 * config.holdout).round() as usize).max(2);
    if n_img < n_hold + 2 {
        return Err(Error::Config(format!(
            "pfam segmentation: {n_img} normal images are too few (need ≥ {})",
            n_hold + 2
        )));
    }
    let (w, h) = data.common_size("pfam segmentation")?;
    let dev = backbone.device().clone();
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp("pfam");
    let pfam = Pfam::new(config.pfam.clone(), channels, vb)?;
    let head = SegHead::new(channels, mix(&[config.seed, 21]), &dev)?;
    let mut params: Vec<Var> = sorted_vars(&varmap)?.into_iter().map(|(_, v)| v).collect();
    params.extend(head.vars());
    let mut opt = AdamW::new(
        params,
        AdamWConfig {
            lr: config.lr,
            weight_decay: config.weight_decay,
            ..Default::default()
        },
    )?;

    let mut order: Vec<usize> = (0..n_img).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(mix(&[
        config.seed,
        22,
    ])));
    let (hold_idx, train_idx) = order.split_at(n_hold);
    // Every held-out image carries one fixed defect: the same inputs at every epoch.
    let held: Vec<Input> = hold_idx
        .par_iter()
        .map(|&i| make_input(data, i, true, mix(&[config.seed, 23, i as u64])))
        .collect::<Result<_>>()?;

    let batches = train_idx.len().div_ceil(config.batch_size);
    let mut history = Vec::new();
    for epoch in 0..config.epochs {
        let t0 = Instant::now();
        let mut ep = train_idx.to_vec();
        ep.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(mix(&[
            config.seed,
            24,
            epoch as u64,
        ])));
        let (mut s_loss, mut seen) = (0.0, 0usize);
        for (bi, chunk) in ep.chunks(config.batch_size).enumerate() {
            let inputs: Vec<Input> = chunk
                .par_iter()
                .enumerate()
                .map(|(k, &i)| {
                    let pos = (bi * config.batch_size + k) as u64;
                    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(mix(&[
                        config.seed,
                        25,
                        epoch as u64,
                        pos,
                    ]));
                    let defect = r.random::<f64>() < config.synth_prob;
                    make_input(data, i, defect, r.random())
                })
                .collect::<Result<_>>()?;
            let (z, t) = forward_batch(backbone, &pfam, &head, inputs, (h, w))?;
            let loss = balanced_bce(&z, &t)?;
            let lv = loss.to_scalar::<f32>()? as f64;
            if !lv.is_finite() {
                return Err(Error::Config(format!(
                    "pfam segmentation diverged at epoch {} (loss {lv}); lower the learning rate",
                    epoch + 1
                )));
            }
            opt.step(&loss.backward()?)?;
            s_loss += lv * chunk.len() as f64;
            seen += chunk.len();
            progress(&SegmentEvent::Step {
                epoch: epoch + 1,
                epochs: config.epochs,
                batch: bi + 1,
                batches,
                loss: s_loss / seen as f64,
            });
        }
        let auroc = heldout_auroc(backbone, &pfam.detached(), &head, &held, (h, w), config)?;
        let e = SegmentEpoch {
            epoch: epoch + 1,
            loss: s_loss / seen.max(1) as f64,
            heldout_auroc: auroc,
            seconds: t0.elapsed().as_secs_f64(),
        };
        progress(&SegmentEvent::Epoch(e.clone()));
        history.push(e);
    }
    let last = history.last().map(|e| e.heldout_auroc).unwrap_or(0.5);
    let seconds_per_epoch = history.iter().map(|e| e.seconds).sum::<f64>() / history.len() as f64;
    Ok(SegmentOutcome {
        pfam: pfam.detached(),
        report: SegmentReport {
            config: config.clone(),
            arch: backbone.arch_name().to_string(),
            source: data.source.clone(),
            train_images: train_idx.len(),
            heldout_images: hold_idx.len(),
            history,
            heldout_auroc: last,
            seconds_per_epoch,
        },
    })
}

/// The head's cell AUROC on the held-out inputs (cells more than half covered are defects).
fn heldout_auroc(
    backbone: &Backbone,
    pfam: &Pfam,
    head: &SegHead,
    held: &[Input],
    hw: (usize, usize),
    config: &SegmentConfig,
) -> Result<f64> {
    let (mut scores, mut labels) = (Vec::new(), Vec::new());
    for chunk in held.chunks(config.batch_size) {
        let (z, t) = forward_batch(backbone, pfam, head, chunk.to_vec(), hw)?;
        scores.extend(z.detach().flatten_all()?.to_vec1::<f32>()?);
        labels.extend(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|&v| v > 0.5));
    }
    Ok(tessera_eval::auroc(&scores, &labels).unwrap_or(0.5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_mask_is_the_covered_share_of_each_cell() {
        let mut m = GrayImage::new(8, 4);
        for y in 0..2 {
            for x in 0..4 {
                m.put_pixel(x, y, image::Luma([255]));
            }
        }
        // 2×2 grid of 4×2 cells: the top-left one is fully covered.
        assert_eq!(pool_mask(&m, 2, 2), vec![1.0, 0.0, 0.0, 0.0]);
        // 1×4 grid of 2×4 cells: the left two are half covered.
        assert_eq!(pool_mask(&m, 1, 4), vec![0.5, 0.5, 0.0, 0.0]);
    }

    #[test]
    fn balanced_bce_weighs_positive_and_negative_mass_equally() -> Result<()> {
        let dev = Device::Cpu;
        let z = Tensor::new(&[[2.0f32, -1.0, 0.0, 3.0]], &dev)?;
        let t = Tensor::new(&[[1.0f32, 0.0, 0.0, 0.0]], &dev)?;
        let sp = |x: f64| (1.0 + x.exp()).ln();
        // positive: softplus(−2); negatives: mean of softplus(−1), softplus(0), softplus(3).
        let want = 0.5 * sp(-2.0) + 0.5 * (sp(-1.0) + sp(0.0) + sp(3.0)) / 3.0;
        let got = balanced_bce(&z, &t)?.to_scalar::<f32>()? as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // No positives: the plain mean over negatives.
        let t0 = t.zeros_like()?;
        let want0 = (sp(2.0) + sp(-1.0) + sp(0.0) + sp(3.0)) / 4.0;
        let got0 = balanced_bce(&z, &t0)?.to_scalar::<f32>()? as f64;
        assert!((got0 - want0).abs() < 1e-5, "{got0} vs {want0}");
        Ok(())
    }

    #[test]
    fn nearest_upsampling_indices_follow_torch() {
        assert_eq!(nearest(2, 4), vec![0, 0, 1, 1]);
        assert_eq!(nearest(3, 7), vec![0, 0, 0, 1, 1, 2, 2]);
    }
}
