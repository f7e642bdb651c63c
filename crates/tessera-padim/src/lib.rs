//! # tessera-padim
//!
//! PaDiM (Defard et al., 2021): a Gaussian per feature-map position over pretrained features.
//! Follows the reference implementation:
//!
//! 1. layer1..3 features, deeper levels upsampled (nearest) to layer1's grid and concatenated;
//! 2. a seeded random subset of `d` channels (100 for ResNet-18, 550 for wider backbones);
//! 3. per position: mean and covariance + 0.01·I, inverted in f64 through a Cholesky
//!    factorisation (faer), one position per task on all cores;
//! 4. scoring: Mahalanobis distance per position; the caller upsamples (bilinear) and blurs
//!    (σ = 4) with [`tessera_core::postprocess`]; image score = max of the map.
//!
//! Deviation from the reference: the channel subset comes from our ChaCha8 RNG, not
//! `torch.randperm` with seed 1024, so the chosen channels differ for the same seed number.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use tessera_core::scorer::{FitScorer, Scorer};
//! use tessera_core::FeatureMaps;
//! use tessera_padim::PadimConfig;
//! let dev = Device::Cpu;
//! let batch = |seed: u64| -> tessera_core::Result<FeatureMaps> {
//!     let l1 = Tensor::rand(0f32, 1., (4, 8, 4, 4), &dev)?;
//!     let l2 = Tensor::rand(0f32, 1., (4, 8, 2, 2), &dev)?;
//!     Ok(FeatureMaps::new(vec![l1, l2]))
//! };
//! let cfg = PadimConfig { dims: Some(6), levels: vec![1, 2], ..Default::default() };
//! let model = cfg.fit(&mut (0..3).map(batch))?;
//! let raw = model.score(&batch(9)?)?;
//! assert_eq!((raw.batch, raw.height, raw.width), (4, 4, 4));
//! # Ok::<(), tessera_core::Error>(())
//! ```

use candle_core::{DType, Device, IndexOp, Tensor, D};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tessera_core::scorer::{grid_tensor, FitScorer, RawMaps, Restore, Scorer, StoredTensors};
use tessera_core::{Error, FeatureMaps, Result};

/// PaDiM hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PadimConfig {
    /// Channels kept; `None` = 100 when the backbone gives ≤ 448 channels (ResNet-18/34),
    /// else 550 (as the reference for Wide-ResNet-50-2).
    pub dims: Option<usize>,
    /// Seed of the channel subset.
    pub seed: u64,
    /// Covariance regulariser ε in Σ + ε·I.
    pub reg: f64,
    /// Backbone levels used (1-based).
    pub levels: Vec<usize>,
}

impl Default for PadimConfig {
    fn default() -> Self {
        Self {
            dims: None,
            seed: 0,
            reg: 0.01,
            levels: vec![1, 2, 3],
        }
    }
}

impl PadimConfig {
    fn validate(&self) -> Result<()> {
        if self.levels.is_empty() || self.levels.contains(&0) {
            return Err(Error::Config(
                "padim: levels must be non-empty and 1-based".into(),
            ));
        }
        if !(self.reg > 0.0 && self.reg.is_finite()) {
            return Err(Error::Config("padim: reg must be positive".into()));
        }
        if self.dims == Some(0) {
            return Err(Error::Config("padim: dims must be ≥ 1".into()));
        }
        Ok(())
    }
}

/// Concatenate the chosen levels on the first level's grid (nearest upsampling), `B × C × H × W`.
pub fn embed(features: &FeatureMaps, levels: &[usize]) -> Result<Tensor> {
    let pick = |l: usize| features.level(l, "padim");
    let first = pick(levels[0])?;
    let (_, _, h, w) = first.dims4()?;
    let mut parts = vec![first.clone()];
    for &l in &levels[1..] {
        let t = pick(l)?;
        let (_, _, th, tw) = t.dims4()?;
        parts.push(if (th, tw) == (h, w) {
            t.clone()
        } else {
            t.upsample_nearest2d(h, w)?
        });
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// Seeded channel subset of size `d` from `total`, sorted.
pub fn channel_subset(total: usize, d: usize, seed: u64) -> Vec<u32> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut idx: Vec<u32> = (0..total as u32).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    idx.truncate(d.min(total));
    idx.sort_unstable();
    idx
}

/// A fitted PaDiM model.
#[derive(Debug, Clone)]
pub struct Padim {
    config: PadimConfig,
    /// Selected channel indices into the concatenated embedding.
    index: Tensor,
    /// `P × d` means (P = H·W positions).
    mean: Tensor,
    /// `P × d × d` inverse covariances.
    inv_cov: Tensor,
    height: usize,
    width: usize,
}

fn select(emb: &Tensor, index: &Tensor) -> Result<Tensor> {
    // (B, C, H, W) → (P, B, d)
    let (b, _, h, w) = emb.dims4()?;
    let sel = emb.index_select(index, 1)?;
    let d = index.dims1()?;
    Ok(sel
        .reshape((b, d, h * w))?
        .permute((2, 0, 1))?
        .contiguous()?)
}

impl FitScorer for PadimConfig {
    type Fitted = Padim;

    fn fit(&self, batches: &mut dyn Iterator<Item = Result<FeatureMaps>>) -> Result<Padim> {
        self.validate()?;
        let mut chunks: Vec<Tensor> = Vec::new();
        let mut index: Option<Tensor> = None;
        let mut grid = (0, 0);
        for batch in batches {
            let emb = embed(&batch?, &self.levels)?;
            let (_, c, h, w) = emb.dims4()?;
            if index.is_none() {
                if let Some(d) = self.dims.filter(|&d| d > c) {
                    return Err(Error::Config(format!(
                        "padim: {d} channels asked for, but the features have {c}; choose at most {c}"
                    )));
                }
                let d = self.dims.unwrap_or(if c <= 448 { 100 } else { 550 }).min(c);
                let idx = channel_subset(c, d, self.seed);
                index = Some(Tensor::from_vec(idx, d, emb.device())?);
                grid = (h, w);
            }
            if (h, w) != grid {
                return Err(Error::Config(format!(
                    "padim: feature grid changed from {grid:?} to {:?}",
                    (h, w)
                )));
            }
            // Keep the selected channels only: (P, B, d), moved to the CPU (statistics are
            // computed there in f64).
            chunks.push(select(&emb, index.as_ref().unwrap())?.to_device(&Device::Cpu)?);
        }
        let index = index.ok_or_else(|| Error::Config("padim: no training images".into()))?;
        let x = Tensor::cat(&chunks, 1)?; // (P, N, d)
        drop(chunks);
        let (p, n, d) = x.dims3()?;
        if n < 2 {
            return Err(Error::Config(format!(
                "padim needs at least 2 training images, got {n}"
            )));
        }
        let mean = x.mean_keepdim(1)?; // (P, 1, d)
        let xc = x.broadcast_sub(&mean)?;
        let cov = (xc.transpose(1, 2)?.contiguous()?.matmul(&xc)? / (n as f64 - 1.0))?; // (P, d, d)
        let cov: Vec<f32> = cov.flatten_all()?.to_vec1()?;
        let reg = self.reg;
        let inv: Vec<f32> = cov
            .par_chunks(d * d)
            .enumerate()
            .map(|(pos, c)| {
                let m = faer::Mat::<f64>::from_fn(d, d, |i, j| {
                    c[i * d + j] as f64 + if i == j { reg } else { 0.0 }
                });
                let llt = m.llt(faer::Side::Lower).map_err(|e| {
                    Error::Config(format!(
                        "padim: covariance at position {pos} is not positive definite ({e:?})"
                    ))
                })?;
                let inv = faer::linalg::solvers::DenseSolveCore::inverse(&llt);
                Ok((0..d * d)
                    .map(|k| inv[(k / d, k % d)] as f32)
                    .collect::<Vec<f32>>())
            })
            .collect::<Result<Vec<Vec<f32>>>>()?
            .concat();
        let dev = index.device().clone();
        let inv_cov = Tensor::from_vec(inv, (p, d, d), &Device::Cpu)?.to_device(&dev)?;
        let mean = mean.squeeze(1)?.to_device(&dev)?;
        Ok(Padim {
            config: self.clone(),
            index,
            mean,
            inv_cov,
            height: grid.0,
            width: grid.1,
        })
    }
}

impl Restore for Padim {
    const KIND: &'static str = "padim";
    type Config = PadimConfig;

    fn restore(
        config: PadimConfig,
        tensors: std::collections::HashMap<String, Tensor>,
    ) -> Result<Self> {
        config.validate()?;
        let mut t = StoredTensors::new("padim", tensors);
        let index = t.take("index")?.to_dtype(DType::U32)?;
        let mean = t.take("mean")?;
        let inv_cov = t.take("inv_cov")?;
        let (height, width) = t.take_grid()?;
        if mean.rank() != 2 || index.rank() != 1 {
            return Err(t.inconsistent());
        }
        let (p, d) = mean.dims2()?;
        if height * width != p || inv_cov.dims() != [p, d, d] || index.dims1()? != d {
            return Err(t.inconsistent());
        }
        let idx: Vec<u32> = index.to_vec1()?;
        if idx.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::Config(
                "padim model has a channel index that is not strictly increasing".into(),
            ));
        }
        Ok(Self {
            config,
            index,
            mean,
            inv_cov,
            height,
            width,
        })
    }
}

impl Padim {
    /// Number of channels kept.
    pub fn dims(&self) -> usize {
        self.index.dims()[0]
    }
}

impl Scorer for Padim {
    fn kind(&self) -> &'static str {
        "padim"
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("config serialises")
    }

    fn levels(&self) -> Vec<usize> {
        self.config.levels.clone()
    }

    fn score(&self, features: &FeatureMaps) -> Result<RawMaps> {
        let emb = embed(features, &self.config.levels)?;
        let (b, c, h, w) = emb.dims4()?;
        let last = self.index.i(self.dims() - 1)?.to_scalar::<u32>()? as usize;
        if last >= c {
            return Err(Error::Config(format!(
                "padim model selects channel {last}, but the features have {c} channels: the \
                 model does not fit this backbone"
            )));
        }
        if (h, w) != (self.height, self.width) {
            return Err(Error::Config(format!(
                "padim model was fitted on a {}×{} feature grid, got {h}×{w}: use the model's preprocessing",
                self.height, self.width
            )));
        }
        let x = select(&emb, &self.index)?.to_device(self.mean.device())?; // (P, B, d)
        let diff = x.broadcast_sub(&self.mean.unsqueeze(1)?)?;
        let t = diff.matmul(&self.inv_cov)?; // (P, B, d)
        let dist = (t * &diff)?.sum(D::Minus1)?.clamp(0f32, f32::MAX)?.sqrt()?; // (P, B)
        let data: Vec<f32> = dist.t()?.contiguous()?.flatten_all()?.to_vec1()?;
        Ok(RawMaps::new(b, h, w, data))
    }

    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let grid = grid_tensor(self.height, self.width)?;
        Ok(vec![
            ("index".into(), self.index.clone()),
            ("mean".into(), self.mean.clone()),
            ("inv_cov".into(), self.inv_cov.clone()),
            ("grid".into(), grid),
        ])
    }
}
