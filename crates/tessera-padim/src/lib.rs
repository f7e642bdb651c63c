//! # tessera-padim
//!
//! PaDiM (Defard et al., 2021): a Gaussian per feature-map position over pretrained features.
//! Follows the reference implementation:
//!
//! 1. layer1..3 features, deeper levels upsampled (nearest) to layer1's grid and concatenated;
//! 2. channel reduction to `d` dimensions (100 for ResNet-18, 550 for wider backbones):
//!    [`Reduction::Subset`], the paper's seeded random subset of channels, or
//!    [`Reduction::Orthogonal`], a seeded random semi-orthogonal projection of every channel
//!    (Kim et al., 2021, "Semi-orthogonal embedding for efficient unsupervised anomaly
//!    segmentation"), which keeps information from all channels and so depends far less on
//!    the seed; or [`Reduction::Pca`] / [`Reduction::Npca`], the principal directions of
//!    largest / smallest variance of the first training batch (no random choice);
//! 3. per position: mean and covariance + 0.01·I, inverted in f64 through a Cholesky
//!    factorisation (faer), one position per task on all cores; `Σ⁻¹` is kept (and stored)
//!    as its packed upper triangle, half the bytes of the full matrix. With
//!    [`PadimConfig::tie`] > 1 (our addition) one covariance is shared by each `tie × tie`
//!    block of positions (pooled about each position's own mean), which makes a full
//!    covariance over every channel — no reduction, no random choice — affordable;
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
use tessera_core::tensor::{with_f16_slice, with_f32_slice};
use tessera_core::{Error, FeatureMaps, Result};

pub mod maha;
use maha::{mahalanobis, mahalanobis_shared, packed_len, InvCov};

/// How PaDiM reduces the concatenated channels before fitting a Gaussian per position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Reduction {
    /// A seeded random subset of the channels (the paper's and the reference's).
    Subset,
    /// A seeded random semi-orthogonal projection `W` (`C × d`, `WᵀW = I`) of all channels.
    #[default]
    Orthogonal,
    /// The `d` principal directions of largest variance of the first training batch's
    /// embeddings (all positions pooled): no random choice at all.
    Pca,
    /// The `d` principal directions of *smallest* variance (Rippel et al., 2020: for a
    /// Gaussian model of normal features, the low-variance directions carry the anomalies).
    Npca,
}

impl Reduction {
    /// Every reduction, the default first.
    pub const ALL: [Reduction; 4] = [
        Reduction::Orthogonal,
        Reduction::Subset,
        Reduction::Pca,
        Reduction::Npca,
    ];
    /// The names on the command line, in [`Self::ALL`]'s order.
    pub const NAMES: &'static [&'static str] = &["orthogonal", "subset", "pca", "npca"];
    pub fn name(self) -> &'static str {
        match self {
            Reduction::Subset => "subset",
            Reduction::Orthogonal => "orthogonal",
            Reduction::Pca => "pca",
            Reduction::Npca => "npca",
        }
    }

    /// Whether the fitted reduction is a projection matrix (else a channel index).
    pub fn projects(self) -> bool {
        self != Reduction::Subset
    }
}

impl std::str::FromStr for Reduction {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let k = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|r| r.name() == k)
            .ok_or_else(|| {
                Error::Config(format!(
                    "padim reduction '{s}': expected one of {}",
                    Self::NAMES.join(", ")
                ))
            })
    }
}

/// A seeded random `total × d` matrix with orthonormal columns, row-major: Gaussian entries
/// (Box–Muller on ChaCha8), orthonormalised by modified Gram–Schmidt, twice (in f64).
pub fn semi_orthogonal(total: usize, d: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let d = d.min(total);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x50e0_0000_0000_0001);
    let mut gauss = move || -> f64 {
        // 1 − u ∈ (0, 1]: no log(0).
        let u: f64 = 1.0 - rng.random::<f64>();
        let v: f64 = rng.random::<f64>();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    };
    // Columns as rows of `q` (d × total).
    let mut q: Vec<Vec<f64>> = (0..d)
        .map(|_| (0..total).map(|_| gauss()).collect())
        .collect();
    for _pass in 0..2 {
        for j in 0..d {
            let (done, rest) = q.split_at_mut(j);
            let col = &mut rest[0];
            for prev in done.iter() {
                let dot: f64 = prev.iter().zip(col.iter()).map(|(a, b)| a * b).sum();
                for (c, p) in col.iter_mut().zip(prev) {
                    *c -= dot * p;
                }
            }
            let norm = col.iter().map(|v| v * v).sum::<f64>().sqrt();
            for c in col.iter_mut() {
                *c /= norm;
            }
        }
    }
    let mut w = vec![0f32; total * d];
    for (j, col) in q.iter().enumerate() {
        for (i, v) in col.iter().enumerate() {
            w[i * d + j] = *v as f32;
        }
    }
    w
}

/// The `C × d` matrix (row-major) of the principal directions of `x` (`n × C`, row-major):
/// the `d` of largest variance (`largest`) or of smallest. Eigen-decomposition of the
/// covariance in f64 (faer); directions ordered by variance, each with its largest entry
/// positive, so the result depends on the data only.
pub fn principal_directions(
    x: &[f32],
    n: usize,
    c: usize,
    d: usize,
    largest: bool,
) -> Result<Vec<f32>> {
    if n < 2 || x.len() != n * c {
        return Err(Error::Config(format!(
            "padim: principal directions need at least 2 samples of {c} channels, got {n}"
        )));
    }
    let d = d.min(c);
    let mut mean = vec![0f64; c];
    for row in x.chunks(c) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += *v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    // Covariance by rows, in parallel over blocks of samples.
    let cov = x
        .par_chunks(c * 256)
        .map(|block| {
            let mut acc = vec![0f64; c * c];
            let mut centred = vec![0f64; c];
            for row in block.chunks(c) {
                for ((z, v), m) in centred.iter_mut().zip(row).zip(&mean) {
                    *z = *v as f64 - m;
                }
                for i in 0..c {
                    let zi = centred[i];
                    if zi != 0.0 {
                        let dst = &mut acc[i * c..i * c + i + 1];
                        for (a, zj) in dst.iter_mut().zip(&centred[..=i]) {
                            *a += zi * zj;
                        }
                    }
                }
            }
            acc
        })
        .reduce(
            || vec![0f64; c * c],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        );
    let m = faer::Mat::<f64>::from_fn(c, c, |i, j| {
        let (i, j) = if i >= j { (i, j) } else { (j, i) };
        cov[i * c + j] / (n as f64 - 1.0)
    });
    let evd = m
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| Error::Config(format!("padim: eigen-decomposition failed ({e:?})")))?;
    let u = evd.U();
    // Eigenvalues ascend: the largest are the last columns.
    let cols: Vec<usize> = if largest {
        (c - d..c).rev().collect()
    } else {
        (0..d).collect()
    };
    let mut w = vec![0f32; c * d];
    for (j, &col) in cols.iter().enumerate() {
        let (mut big, mut sign) = (0f64, 1f64);
        for i in 0..c {
            let v = u[(i, col)];
            if v.abs() > big {
                big = v.abs();
                sign = v.signum();
            }
        }
        for i in 0..c {
            w[i * d + j] = (u[(i, col)] * sign) as f32;
        }
    }
    Ok(w)
}

/// PaDiM hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PadimConfig {
    /// Dimensions kept; `None` = every channel when the backbone gives ≤ 448 (ResNet-18/34:
    /// no reduction, so no random choice), else 550 (as the reference for Wide-ResNet-50-2).
    /// The paper's ResNet-18 setting is `Some(100)`.
    pub dims: Option<usize>,
    /// How the channels are reduced to `dims`.
    pub reduction: Reduction,
    /// Seed of the channel subset or projection.
    pub seed: u64,
    /// Covariance regulariser ε in Σ + ε·I.
    pub reg: f64,
    /// Backbone levels used (1-based).
    pub levels: Vec<usize>,
    /// Storage type of the inverse covariances (the bulk of the model: `P·d(d+1)/2` values).
    pub inv_cov_dtype: CovDtype,
    /// One covariance per `tie × tie` block of neighbouring positions (each position keeps its
    /// own mean; the block's covariance pools its positions' deviations from their means): the
    /// model's Σ⁻¹ shrinks `tie²`-fold, so a full covariance over every channel fits where a
    /// per-position one does not. `1`: per position (the paper's). `None`: 4 when every channel
    /// is kept (the default for ResNet-18/34), else 1 ([`Self::tie_for`]).
    pub tie: Option<usize>,
}

/// Storage type of PaDiM's inverse covariances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CovDtype {
    #[default]
    F32,
    /// Half the model file, memory and bandwidth; the Mahalanobis distance is still computed in
    /// f32 (each row widened on the fly). Σ⁻¹ is computed in f64 and rounded once.
    F16,
}

impl CovDtype {
    /// The names on the command line.
    pub const NAMES: &'static [&'static str] = &["f32", "f16"];
}

impl std::str::FromStr for CovDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" => Ok(CovDtype::F32),
            "f16" => Ok(CovDtype::F16),
            _ => Err(Error::Config(format!(
                "padim covariance dtype '{s}': expected f32 or f16"
            ))),
        }
    }
}

impl CovDtype {
    fn dtype(self) -> DType {
        match self {
            CovDtype::F32 => DType::F32,
            CovDtype::F16 => DType::F16,
        }
    }
}

impl Default for PadimConfig {
    fn default() -> Self {
        Self {
            dims: None,
            reduction: Reduction::default(),
            seed: 0,
            reg: 0.01,
            levels: vec![1, 2, 3],
            inv_cov_dtype: CovDtype::F32,
            tie: None,
        }
    }
}

impl PadimConfig {
    /// The dimensions kept for features of `channels` channels: [`Self::dims`], or the default
    /// (every channel up to [`ALL_CHANNELS_UP_TO`], else 550), at most `channels`.
    pub fn dims_for(&self, channels: usize) -> usize {
        self.dims
            .unwrap_or(if channels <= ALL_CHANNELS_UP_TO {
                channels
            } else {
                550
            })
            .min(channels)
    }

    /// The side of the blocks sharing a covariance for features of `channels` channels:
    /// [`Self::tie`], or the default — 4 when every channel is kept (a full covariance per
    /// position over 448 channels would be 20× the paper's model), else 1 (the paper's).
    pub fn tie_for(&self, channels: usize) -> usize {
        self.tie
            .unwrap_or(if self.dims_for(channels) == channels {
                DEFAULT_TIE
            } else {
                1
            })
            .max(1)
    }

    /// The bytes `fit` holds for a `(height, width)` grid of positions and features of
    /// `channels` channels, whatever the number of training images (the statistics are
    /// streamed): the packed f32 scatter matrices (one per block of [`Self::tie`]), which become
    /// Σ⁻¹ in place, the per-position sums, shift and pending chunk, and one batch of 8 reduced
    /// embeddings (reduced, then transposed: twice).
    pub fn fit_bytes(&self, grid: (usize, usize), channels: usize) -> u64 {
        let p = (grid.0 * grid.1) as u64;
        let d = self.dims_for(channels) as u64;
        let scatter = self.covariances(grid, channels) as u64 * packed_len(d as usize) as u64 * 4;
        let per_position = p * d * (MOMENT_CHUNK as u64 * 4 + 8 + 4);
        let batch = 2 * p * 8 * d * 4;
        scatter + per_position + batch
    }

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
        if self.tie == Some(0) {
            return Err(Error::Config("padim: tie must be ≥ 1".into()));
        }
        Ok(())
    }

    /// The number of inverse covariances for a `(height, width)` grid and features of
    /// `channels` channels: one per `tie × tie` block (partial at the right and bottom edges).
    pub fn covariances(&self, grid: (usize, usize), channels: usize) -> usize {
        block_count(grid, self.tie_for(channels))
    }

    /// What a fit on `channels` channels chose — `d` dimensions, `g` covariances (blocks of
    /// `tie`) for `p` positions — as the fit report, with a line for the user.
    fn fit_summary(
        &self,
        channels: usize,
        d: usize,
        tie: usize,
        g: usize,
        p: usize,
    ) -> serde_json::Value {
        let all = d == channels;
        let random = !all && matches!(self.reduction, Reduction::Subset | Reduction::Orthogonal);
        let kept = if all {
            format!("all {channels} channels (no reduction)")
        } else if random {
            format!(
                "{d} of {channels} dimensions ({}, seed {})",
                self.reduction.name(),
                self.seed
            )
        } else {
            format!("{d} of {channels} dimensions ({})", self.reduction.name())
        };
        let per = if tie > 1 {
            format!("one covariance per {tie} × {tie} block of positions")
        } else {
            "one covariance per position".into()
        };
        let seed = if random {
            "the seed chooses the dimensions"
        } else {
            "nothing random: the seed does not change the model"
        };
        serde_json::json!({
            "channels": channels,
            "dims": d,
            "reduction": if all { "none" } else { self.reduction.name() },
            "tie": tie,
            "covariances": g,
            "positions": p,
            "random_choice": random,
            "summary": format!("PaDiM: {kept}, {per} ({g} for {p} positions); {seed}"),
        })
    }
}

/// The number of `tie × tie` blocks of a `(height, width)` grid (partial at the edges).
fn block_count((h, w): (usize, usize), tie: usize) -> usize {
    h.div_ceil(tie) * w.div_ceil(tie)
}

/// Each position's covariance block when `tie > 1` ([`shared_index`]), else `None`.
fn shared_blocks(grid: (usize, usize), tie: usize) -> Option<Vec<u32>> {
    (tie > 1).then(|| shared_index(grid, tie))
}

/// Up to this many channels the default keeps every one of them ([`PadimConfig::dims_for`]):
/// ResNet-18/34's layer1..3 (64 + 128 + 256).
pub const ALL_CHANNELS_UP_TO: usize = 448;

/// The default [`PadimConfig::tie`] when every channel is kept: chosen on ksdd (seed 0, image
/// AUROC 88.95 / 89.04 / 89.66 / 87.51 % for 1 / 2 / 4 / 8; docs/results.md).
pub const DEFAULT_TIE: usize = 4;

/// For each position of a `(height, width)` grid (row-major), the index of its `tie × tie`
/// block's covariance (blocks row-major too).
pub fn shared_index((h, w): (usize, usize), tie: usize) -> Vec<u32> {
    let t = tie.max(1);
    let wt = w.div_ceil(t);
    (0..h * w)
        .map(|p| ((p / w / t) * wt + (p % w) / t) as u32)
        .collect()
}

/// The positions of each block of a [`shared_index`], in order.
fn block_members(shared: &[u32]) -> Vec<Vec<u32>> {
    let n = shared.iter().map(|&i| i as usize + 1).max().unwrap_or(0);
    let mut m = vec![Vec::new(); n];
    for (pos, &i) in shared.iter().enumerate() {
        m[i as usize].push(pos as u32);
    }
    m
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

/// For every position of an `h × w` grid, the row-major index of its nearest source position
/// in an `sh × sw` grid, exactly as candle's `upsample_nearest2d` (`⌊i · sh / h⌋`, clamped).
fn nearest_index((sh, sw): (usize, usize), (h, w): (usize, usize)) -> Vec<u32> {
    let src = |i: usize, n_in: usize, n_out: usize| {
        ((i as f64 * (n_in as f64 / n_out as f64)) as usize).min(n_in - 1)
    };
    let mut idx = Vec::with_capacity(h * w);
    for y in 0..h {
        let sy = src(y, sh, h);
        for x in 0..w {
            idx.push((sy * sw + src(x, sw, w)) as u32);
        }
    }
    idx
}

/// The chosen levels of `features` (1-based), checked.
fn pick_levels<'a>(features: &'a FeatureMaps, levels: &[usize]) -> Result<Vec<&'a Tensor>> {
    levels.iter().map(|&l| features.level(l, "padim")).collect()
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

/// The fitted channel reduction.
#[derive(Debug, Clone)]
enum Reduce {
    /// Selected channel indices into the concatenated embedding (`d`, u32, increasing).
    Index(Tensor),
    /// The semi-orthogonal projection (`C × d`).
    Project(Tensor),
}

impl Reduce {
    /// The reduction of `c` channels to `d`; `emb` (`B × C × H × W`, the first training
    /// batch's embedding) is what the data-driven reductions learn from.
    fn fit(
        reduction: Reduction,
        emb: Option<&Tensor>,
        (c, d): (usize, usize),
        seed: u64,
        dev: &Device,
    ) -> Result<Self> {
        let project = |m: Vec<f32>| -> Result<Self> {
            Ok(Reduce::Project(Tensor::from_vec(m, (c, d), dev)?))
        };
        // Every channel kept: any full-rank reduction is a rotation, which Mahalanobis distances
        // (with ε·I) do not see, so none is applied.
        if d == c {
            return Ok(Reduce::Index(Tensor::from_vec(
                (0..c as u32).collect(),
                c,
                dev,
            )?));
        }
        match reduction {
            Reduction::Subset => Ok(Reduce::Index(Tensor::from_vec(
                channel_subset(c, d, seed),
                d,
                dev,
            )?)),
            Reduction::Orthogonal => project(semi_orthogonal(c, d, seed)),
            Reduction::Pca | Reduction::Npca => {
                let emb = emb.ok_or_else(|| {
                    Error::Config("padim: principal directions need the first batch".into())
                })?;
                let (b, _, h, w) = emb.dims4()?;
                let x: Vec<f32> = emb
                    .to_device(&Device::Cpu)?
                    .permute((0, 2, 3, 1))?
                    .flatten_all()?
                    .to_vec1()?;
                project(principal_directions(
                    &x,
                    b * h * w,
                    c,
                    d,
                    reduction == Reduction::Pca,
                )?)
            }
        }
    }

    fn dims(&self) -> usize {
        match self {
            Reduce::Index(i) => i.dims()[0],
            Reduce::Project(w) => w.dims()[1],
        }
    }

    fn reduction(&self) -> Reduction {
        match self {
            Reduce::Index(_) => Reduction::Subset,
            Reduce::Project(_) => Reduction::Orthogonal,
        }
    }

    /// Refuse features this reduction was not fitted for.
    fn check_channels(&self, c: usize) -> Result<()> {
        let bad = match self {
            Reduce::Index(i) => {
                let last = i.i(i.dims()[0] - 1)?.to_scalar::<u32>()? as usize;
                (last >= c).then(|| format!("selects channel {last}"))
            }
            Reduce::Project(w) => {
                (w.dims()[0] != c).then(|| format!("projects {} channels", w.dims()[0]))
            }
        };
        match bad {
            Some(what) => Err(Error::Config(format!(
                "padim model {what}, but the features have {c} channels: the model does not \
                 fit this backbone"
            ))),
            None => Ok(()),
        }
    }

    /// `(B, C, H, W)` → `(P, B, d)` from the whole embedding: the reference
    /// [`Self::apply_levels`] is tested against.
    #[cfg(test)]
    fn apply(&self, emb: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = emb.dims4()?;
        let d = self.dims();
        Ok(match self {
            Reduce::Index(index) => emb
                .index_select(index, 1)?
                .reshape((b, d, h * w))?
                .permute((2, 0, 1))?
                .contiguous()?,
            Reduce::Project(p) => emb
                .reshape((b, c, h * w))?
                .permute((2, 0, 1))?
                .contiguous()?
                .reshape((h * w * b, c))?
                .matmul(&p.to_device(emb.device())?)?
                .reshape((h * w, b, d))?,
        })
    }

    /// The chosen levels (`B × C_l × H_l × W_l`, the first level's grid first) → `(B, P, d)`,
    /// without building the concatenated embedding: each level is reduced on its own grid and
    /// then brought to the first level's grid (nearest, as [`embed`]). A channel-wise linear
    /// map commutes with nearest upsampling, so this equals reducing `embed(..)` (up to the
    /// order of float additions for a projection), with layer2's and layer3's products on
    /// their 4× and 16× smaller grids and no `C`-channel copy of the whole grid.
    fn reduce_levels(&self, maps: &[&Tensor]) -> Result<Tensor> {
        let (_, _, h, w) = maps[0].dims4()?;
        let dev = maps[0].device().clone();
        let mut sum: Option<Tensor> = None;
        let mut parts: Vec<Tensor> = Vec::new();
        for part in self.reduce_parts(maps)? {
            let y = if part.grid == (h, w) {
                part.y
            } else {
                let idx = nearest_index(part.grid, (h, w));
                let n = idx.len();
                part.y.index_select(&Tensor::from_vec(idx, n, &dev)?, 1)?
            };
            match self {
                Reduce::Project(_) => {
                    sum = Some(match sum {
                        None => y,
                        Some(s) => (s + y)?,
                    })
                }
                Reduce::Index(_) => parts.push(y),
            }
        }
        match self {
            Reduce::Project(_) => {
                sum.ok_or_else(|| Error::Config("padim: no feature level".into()))
            }
            // The index is increasing, so the levels' picks concatenate in its order.
            Reduce::Index(_) => Ok(Tensor::cat(&parts, 2)?),
        }
    }

    /// Each level reduced on its own grid: `(B, S_l, d_l)` (positions by channels, the layout
    /// the Mahalanobis kernel reads) with the first output channel it fills (a projection: all
    /// `d`, summed over the levels; a subset: the level's picks).
    fn reduce_parts(&self, maps: &[&Tensor]) -> Result<Vec<Part>> {
        let dev = maps[0].device().clone();
        let picked: Option<Vec<u32>> = match self {
            Reduce::Index(i) => Some(i.to_vec1()?),
            Reduce::Project(_) => None,
        };
        let (mut offset, mut filled) = (0usize, 0usize);
        let mut parts = Vec::new();
        for m in maps {
            let (b, c, sh, sw) = m.dims4()?;
            // (B, c, S): channels by positions.
            let x = m.contiguous()?.reshape((b, c, sh * sw))?;
            let y = match (self, &picked) {
                (Reduce::Project(p), _) if dev.is_cpu() && p.dtype() == DType::F32 => {
                    // `Xᵀ · W` per image straight into one `(B, S, d)` buffer: `X` (c × S,
                    // row-major) read as `Xᵀ` through column-major strides, no stacking copy.
                    let w = p.narrow(0, offset, c)?.contiguous()?;
                    let d = w.dims()[1];
                    let s = sh * sw;
                    let mut out = vec![0f32; b * s * d];
                    with_f32_slice(&x, |xs| {
                        with_f32_slice(&w, |ws| {
                            use faer::{linalg::matmul::matmul, Accum, MatMut, MatRef, Par};
                            let rhs = MatRef::from_row_major_slice(ws, c, d);
                            let par = if b == 1 { Par::rayon(0) } else { Par::Seq };
                            out.par_chunks_mut(s * d)
                                .zip(xs.par_chunks(c * s))
                                .for_each(|(dst, xi)| {
                                    let lhs = MatRef::from_column_major_slice(xi, s, c);
                                    let dst = MatMut::from_row_major_slice_mut(dst, s, d);
                                    matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, par);
                                });
                        })
                    })??;
                    Some((Tensor::from_vec(out, (b, s, d), &dev)?, 0))
                }
                (Reduce::Project(p), _) => {
                    // `Xᵀ · W` per image, the transposition read by the product's strides.
                    let w = p.narrow(0, offset, c)?.to_device(&dev)?;
                    let per_image = (0..b)
                        .map(|i| x.i(i)?.t()?.matmul(&w))
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    Some((Tensor::stack(&per_image, 0)?, 0))
                }
                (Reduce::Index(_), Some(all)) => {
                    let mine: Vec<u32> = all
                        .iter()
                        .filter(|&&k| (offset..offset + c).contains(&(k as usize)))
                        .map(|&k| k - offset as u32)
                        .collect();
                    let n = mine.len();
                    let first = filled;
                    filled += n;
                    if n == 0 {
                        None
                    } else if n == c && dev.is_cpu() && x.dtype() == DType::F32 {
                        // Every channel of the level (the default for ResNet-18): no gather,
                        // and the (c, S) → (S, c) transposition by faer per image.
                        let s = sh * sw;
                        let mut out = vec![0f32; b * s * c];
                        with_f32_slice(&x, |xs| {
                            use faer::{MatMut, MatRef};
                            out.par_chunks_mut(s * c)
                                .zip(xs.par_chunks(c * s))
                                .for_each(|(dst, xi)| {
                                    MatMut::from_row_major_slice_mut(dst, s, c).copy_from(
                                        MatRef::from_row_major_slice(xi, c, s).transpose(),
                                    );
                                });
                        })?;
                        Some((Tensor::from_vec(out, (b, s, c), &dev)?, first))
                    } else {
                        let y = x.index_select(&Tensor::from_vec(mine, n, &dev)?, 1)?;
                        Some((y.transpose(1, 2)?.contiguous()?, first))
                    }
                }
                _ => None,
            };
            offset += c;
            if let Some((y, first)) = y {
                parts.push(Part {
                    y,
                    grid: (sh, sw),
                    first,
                });
            }
        }
        Ok(parts)
    }

    /// [`Self::reduce_levels`] as `(P, B, d)`, the layout of the statistics.
    fn apply_levels(&self, maps: &[&Tensor]) -> Result<Tensor> {
        Ok(self.reduce_levels(maps)?.transpose(0, 1)?.contiguous()?)
    }

    fn tensor(&self) -> (&'static str, Tensor) {
        match self {
            Reduce::Index(i) => ("index", i.clone()),
            Reduce::Project(w) => ("projection", w.clone()),
        }
    }
}

/// One level reduced on its own grid ([`Reduce::reduce_parts`]).
struct Part {
    /// `(B, S_l, d_l)`.
    y: Tensor,
    grid: (usize, usize),
    /// The first output channel it fills.
    first: usize,
}

/// The parts brought to the `h × w` grid (nearest) and summed (projection) or placed
/// (subset) into one `(B, P, d)` buffer, whole `d_l`-vectors at a time: what
/// [`Reduce::reduce_levels`] does with tensor ops, without its gathers' overhead.
fn assemble(
    parts: &[Part],
    b: usize,
    d: usize,
    (h, w): (usize, usize),
    sum: bool,
) -> Result<Vec<f32>> {
    /// Positions per parallel task.
    const ROWS: usize = 256;
    let p = h * w;
    let mut y = vec![0f32; b * p * d];
    for (n, part) in parts.iter().enumerate() {
        // The first projected part covers every row: stored, not added to the zeroed buffer,
        // so that each fresh page is first written (a read first maps the shared zero page,
        // and the write after it copies the page and flushes the TLB on every core).
        let sum = sum && n > 0;
        let (pb, s, dl) = part.y.dims3()?;
        if pb != b || part.first + dl > d || s != part.grid.0 * part.grid.1 {
            return Err(Error::Config("padim: inconsistent reduced level".into()));
        }
        let idx = (part.grid != (h, w)).then(|| nearest_index(part.grid, (h, w)));
        let cols = part.first..part.first + dl;
        with_f32_slice(&part.y.contiguous()?, |src| {
            y.par_chunks_mut(ROWS * d)
                .enumerate()
                .for_each(|(task, rows)| {
                    for (r, dst) in rows.chunks_exact_mut(d).enumerate() {
                        let row = task * ROWS + r;
                        let (bi, pos) = (row / p, row % p);
                        let at = idx.as_ref().map_or(pos, |idx| idx[pos] as usize);
                        let src = &src[(bi * s + at) * dl..][..dl];
                        let dst = &mut dst[cols.clone()];
                        if sum {
                            dst.iter_mut().zip(src).for_each(|(o, v)| *o += v);
                        } else {
                            dst.copy_from_slice(src);
                        }
                    }
                })
        })?;
    }
    Ok(y)
}

/// A fitted PaDiM model.
#[derive(Debug, Clone)]
pub struct Padim {
    config: PadimConfig,
    /// Channels → `d` dimensions.
    reduce: Reduce,
    /// `P × d` means (P = H·W positions).
    mean: Tensor,
    /// The inverse covariances.
    inv_cov: InvStore,
    /// Each position's covariance block when they are shared ([`PadimConfig::tie`] > 1).
    shared: Option<Vec<u32>>,
    height: usize,
    width: usize,
    /// What the fit chose, for its summary (`null` once restored from a file).
    report: serde_json::Value,
}

/// PaDiM's inverse covariances in the form its scoring path reads.
#[derive(Debug, Clone)]
enum InvStore {
    /// On the CPU: `(P, d (d + 1) / 2)`, each position's symmetric `Σ⁻¹` as its packed upper
    /// triangle ([`maha::pack_upper`]), f32 or f16. The kernel streams `Σ⁻¹` from memory for
    /// every batch; the packed form is half the bytes of the full matrices (and of the file).
    Packed(Tensor),
    /// On other devices: the full `(P, d, d)` matrices, for a batched matrix product.
    Full(Tensor),
}

impl InvStore {
    /// The packed `(G, T)` triangles → the form that scores on `dev`; `shared`: each
    /// position's triangle when positions share them (the full form holds one per position).
    fn on(packed: Tensor, d: usize, dev: &Device, shared: Option<&[u32]>) -> Result<Self> {
        if dev.is_cpu() {
            return Ok(InvStore::Packed(packed.to_device(dev)?));
        }
        let full = Self::unpack(&packed.to_device(dev)?, d)?;
        Ok(InvStore::Full(match shared {
            Some(g) => full.index_select(&Tensor::from_slice(g, g.len(), dev)?, 0)?,
            None => full,
        }))
    }

    /// `(P, T)` packed triangles → `(P, d, d)` symmetric matrices, on the tensor's device.
    fn unpack(packed: &Tensor, d: usize) -> Result<Tensor> {
        let p = packed.dims()[0];
        let idx = Tensor::from_vec(maha::unpack_index(d), d * d, packed.device())?;
        Ok(packed.index_select(&idx, 1)?.reshape((p, d, d))?)
    }

    /// `(P, d, d)` symmetric matrices → `(P, T)` packed triangles, on the tensor's device.
    fn pack(full: &Tensor) -> Result<Tensor> {
        let (p, d, _) = full.dims3()?;
        let idx = Tensor::from_vec(maha::pack_index(d), packed_len(d), full.device())?;
        Ok(full.reshape((p, d * d))?.index_select(&idx, 1)?)
    }

    /// The packed triangles on the CPU (what the model file stores): one per block when
    /// positions share them (`shared`).
    fn packed(&self, shared: Option<&[u32]>) -> Result<Tensor> {
        match self {
            InvStore::Packed(t) => Ok(t.clone()),
            InvStore::Full(t) => {
                let t = match shared {
                    Some(g) => {
                        // The first position of each block holds its matrix.
                        let first: Vec<u32> = block_members(g)
                            .iter()
                            .map(|m| m.first().copied().unwrap_or(u32::MAX))
                            .collect();
                        let n = first.len();
                        t.index_select(&Tensor::from_vec(first, n, t.device())?, 0)?
                    }
                    None => t.clone(),
                };
                Ok(Self::pack(&t)?.to_device(&Device::Cpu)?)
            }
        }
    }
}

impl FitScorer for PadimConfig {
    type Fitted = Padim;

    fn fit(&self, batches: &mut dyn Iterator<Item = Result<FeatureMaps>>) -> Result<Padim> {
        self.validate()?;
        let mut moments: Option<Moments> = None;
        let mut reduce: Option<Reduce> = None;
        let mut grid = (0, 0);
        let mut shared: Option<Vec<u32>> = None;
        let (mut channels, mut tie) = (0, 1);
        for batch in batches {
            let batch = batch?;
            let maps = pick_levels(&batch, &self.levels)?;
            let (_, _, h, w) = maps[0].dims4()?;
            let c: usize = maps.iter().map(|m| m.dims()[1]).sum();
            if reduce.is_none() {
                if let Some(d) = self.dims.filter(|&d| d > c) {
                    return Err(Error::Config(format!(
                        "padim: {d} channels asked for, but the features have {c}; choose at most {c}"
                    )));
                }
                let d = self.dims_for(c);
                // The data-driven reductions learn from the first batch's whole embedding.
                let emb = if matches!(self.reduction, Reduction::Pca | Reduction::Npca) {
                    Some(embed(&batch, &self.levels)?)
                } else {
                    None
                };
                reduce = Some(Reduce::fit(
                    self.reduction,
                    emb.as_ref(),
                    (c, d),
                    self.seed,
                    maps[0].device(),
                )?);
                grid = (h, w);
                (channels, tie) = (c, self.tie_for(c));
                shared = shared_blocks(grid, tie);
            }
            if (h, w) != grid {
                return Err(Error::Config(format!(
                    "padim: feature grid changed from {grid:?} to {:?}",
                    (h, w)
                )));
            }
            // Only the running statistics are kept, never the embeddings: memory does not
            // grow with the number of training images.
            if let Some(r) = &reduce {
                r.check_channels(c)?;
                let y = r.apply_levels(&maps)?.to_device(&Device::Cpu)?; // (P, B, d)
                let (p, b, d) = y.dims3()?;
                let m = moments
                    .get_or_insert_with(|| Moments::new(p, d, MOMENT_CHUNK, shared.as_deref()));
                with_f32_slice(&y, |y| m.add(y, b))??;
            }
        }
        let reduce = reduce.ok_or_else(|| Error::Config("padim: no training images".into()))?;
        let moments = moments.ok_or_else(|| Error::Config("padim: no training images".into()))?;
        let d = moments.d;
        let (mean, inv) = moments.finish(self.reg)?;
        let dev = match &reduce {
            Reduce::Index(t) | Reduce::Project(t) => t.device().clone(),
        };
        // Rounded to f16 while the f32 buffer shrinks: the peak stays the f32 statistics.
        let t = packed_len(d);
        let g = inv.len() / t;
        let inv_cov = match self.inv_cov_dtype {
            CovDtype::F32 => Tensor::from_vec(inv, (g, t), &Device::Cpu)?,
            CovDtype::F16 => Tensor::from_vec(to_f16_shrinking(inv, 16 * t), (g, t), &Device::Cpu)?,
        };
        let inv_cov = InvStore::on(inv_cov, d, &dev, shared.as_deref())?;
        let p = grid.0 * grid.1;
        let mean = Tensor::from_vec(mean, (p, d), &Device::Cpu)?.to_device(&dev)?;
        // All channels are kept as they are (no random choice left): say so.
        let reduction = reduce.reduction();
        let report = self.fit_summary(channels, d, tie, g, p);
        Ok(Padim {
            config: PadimConfig {
                reduction: if reduction == Reduction::Subset {
                    reduction
                } else {
                    self.reduction
                },
                // Resolved, so the model file says what was fitted.
                tie: Some(tie),
                ..self.clone()
            },
            reduce,
            mean,
            inv_cov,
            shared,
            height: grid.0,
            width: grid.1,
            report,
        })
    }
}

/// `v` rounded to f16, converted from the end in blocks of `block` values while `v` gives its
/// memory back, so the peak is about `v`'s size rather than `v` plus the f16 copy (large
/// buffers are mapped pages, which a shrinking reallocation returns).
fn to_f16_shrinking(mut v: Vec<f32>, block: usize) -> Vec<half::f16> {
    use half::slice::HalfFloatSliceExt;
    use half::vec::HalfBitsVecExt;
    let n = v.len();
    // Zeroed pages are only resident once written.
    let mut out: Vec<half::f16> = vec![0u16; n].reinterpret_into();
    let mut end = n;
    while end > 0 {
        let start = end.saturating_sub(block.max(1));
        out[start..end].convert_from_f32_slice(&v[start..end]);
        v.truncate(start);
        v.shrink_to_fit();
        end = start;
    }
    out
}

/// Per-position Gaussian statistics, accumulated batch by batch. The scatter matrices, kept as
/// packed upper triangles, take `P·d(d+1)/2` f32 — the size of the model's packed Σ⁻¹, which
/// they become in place — whatever the number of training images; the embeddings themselves
/// are never stored. Images are gathered into chunks of a fixed size before they are added,
/// so the result depends on the images and their order, not on the batch size that delivered
/// them. Sums are taken about the first chunk's mean (a per-position shift), which keeps them
/// accurate in f32.
struct Moments {
    p: usize,
    d: usize,
    n: usize,
    /// Images per accumulation step.
    chunk: usize,
    /// `P × chunk × d`: images waiting for their chunk to fill.
    pending: Vec<f32>,
    filled: usize,
    /// `P × d`: the first chunk's mean (empty until then).
    shift: Vec<f32>,
    /// `P × d`: `Σ (x − shift)`.
    sum: Vec<f64>,
    /// `G × d(d+1)/2`: per covariance block, `Σ (x − shift)(x − shift)ᵀ` over its positions
    /// (each about its own shift), upper triangles packed ([`maha::pack_upper`]'s layout).
    scatter: Vec<f32>,
    /// Each block's positions (one each when covariances are not shared).
    members: Vec<Vec<u32>>,
}

/// Images per accumulation step of [`Moments`].
const MOMENT_CHUNK: usize = 16;

impl Moments {
    /// Statistics for `p` positions of `d` dimensions; `shared`: each position's covariance
    /// block ([`shared_index`]), or one per position.
    fn new(p: usize, d: usize, chunk: usize, shared: Option<&[u32]>) -> Self {
        let chunk = chunk.max(1);
        let members: Vec<Vec<u32>> = match shared {
            Some(g) => block_members(g),
            None => (0..p as u32).map(|i| vec![i]).collect(),
        };
        Self {
            p,
            d,
            n: 0,
            chunk,
            pending: vec![0f32; p * chunk * d],
            filled: 0,
            shift: Vec::new(),
            sum: vec![0f64; p * d],
            scatter: vec![0f32; members.len() * packed_len(d)],
            members,
        }
    }

    /// Add a batch `y`, `(P, B, d)` row-major.
    fn add(&mut self, y: &[f32], b: usize) -> Result<()> {
        let (p, d, k) = (self.p, self.d, self.chunk);
        if y.len() != p * b * d {
            return Err(Error::Config(format!(
                "padim: a batch of {} values does not hold {b} images of {p} positions × {d} dims",
                y.len()
            )));
        }
        let mut i = 0;
        while i < b {
            let take = (k - self.filled).min(b - i);
            for pos in 0..p {
                self.pending[(pos * k + self.filled) * d..][..take * d]
                    .copy_from_slice(&y[(pos * b + i) * d..][..take * d]);
            }
            self.filled += take;
            i += take;
            if self.filled == k {
                self.flush();
            }
        }
        Ok(())
    }

    /// Add the pending images (one GEMM per covariance block, in parallel over blocks).
    fn flush(&mut self) {
        use faer::{linalg::matmul::matmul, Accum, MatMut, MatRef, Par};
        let (d, k, f) = (self.d, self.chunk, self.filled);
        if f == 0 {
            return;
        }
        let pending = &self.pending;
        if self.shift.is_empty() {
            self.shift = vec![0f32; self.p * d];
            self.shift
                .par_chunks_mut(d)
                .enumerate()
                .for_each(|(pos, c)| {
                    for bi in 0..f {
                        let row = &pending[(pos * k + bi) * d..][..d];
                        c.iter_mut().zip(row).for_each(|(c, v)| *c += v);
                    }
                    c.iter_mut().for_each(|c| *c /= f as f32);
                });
        }
        // The first chunk stores its products instead of adding them to the zeroed scatter
        // matrices: their pages are then first written, not read (a read maps the shared zero
        // page, and the write after it copies the page and flushes the TLB on every core).
        let first = self.n == 0;
        self.sum
            .par_chunks_mut(d)
            .zip(self.shift.par_chunks(d))
            .enumerate()
            .for_each(|(pos, (s1, c))| {
                for bi in 0..f {
                    let row = &pending[(pos * k + bi) * d..][..d];
                    for j in 0..d {
                        s1[j] += (row[j] - c[j]) as f64;
                    }
                }
            });
        let shift = &self.shift;
        self.scatter
            .par_chunks_mut(packed_len(d))
            .zip(self.members.par_iter())
            .for_each_init(
                || (Vec::new(), vec![0f32; d * d]),
                |(yc, g), (s2, members)| {
                    // Every member's deviations from its own shift, stacked: one product.
                    let rows = f * members.len();
                    yc.resize(rows * d, 0f32);
                    for (mi, &pos) in members.iter().enumerate() {
                        let pos = pos as usize;
                        let c = &shift[pos * d..][..d];
                        for bi in 0..f {
                            let row = &pending[(pos * k + bi) * d..][..d];
                            let dst = &mut yc[(mi * f + bi) * d..][..d];
                            for j in 0..d {
                                dst[j] = row[j] - c[j];
                            }
                        }
                    }
                    let ym = MatRef::from_row_major_slice(&yc[..rows * d], rows, d);
                    let dst = MatMut::from_row_major_slice_mut(&mut g[..], d, d);
                    matmul(dst, Accum::Replace, ym.transpose(), ym, 1.0f32, Par::Seq);
                    // The product's upper triangle, row by row, into the packed sums.
                    for i in 0..d {
                        let src = &g[i * d + i..(i + 1) * d];
                        let dst = &mut s2[maha::row_start(i, d)..maha::row_start(i + 1, d)];
                        if first {
                            dst.copy_from_slice(src);
                        } else {
                            dst.iter_mut().zip(src).for_each(|(o, v)| *o += v);
                        }
                    }
                },
            );
        self.n += f;
        self.filled = 0;
    }

    /// Means `P × d` and the regularised inverse covariances `G × d(d+1)/2`, packed upper
    /// triangles (computed in place of the scatter matrices, in f64 per block).
    fn finish(mut self, reg: f64) -> Result<(Vec<f32>, Vec<f32>)> {
        self.flush();
        let (n, d) = (self.n, self.d);
        if n < 2 {
            return Err(Error::Config(format!(
                "padim needs at least 2 training images, got {n}"
            )));
        }
        let nf = n as f64;
        let sum = &self.sum;
        self.scatter
            .par_chunks_mut(packed_len(d))
            .zip(self.members.par_iter())
            .try_for_each(|(s2, members)| {
                // Σ = (S − Σ_p s_p s_pᵀ / n) / (m (n − 1)) for a block of m positions, each about
                // its shift: the same as about each position's own mean (m = 1: the usual).
                let m = members.len() as f64;
                let cov = faer::Mat::<f64>::from_fn(d, d, |i, j| {
                    let (lo, hi) = (i.min(j), i.max(j));
                    let centre = members.iter().fold(0.0, |a, &p| {
                        let s1 = &sum[p as usize * d..][..d];
                        a + s1[i] * s1[j] / nf
                    });
                    (s2[maha::row_start(lo, d) + hi - lo] as f64 - centre) / (m * (nf - 1.0))
                        + if i == j { reg } else { 0.0 }
                });
                let llt = cov.llt(faer::Side::Lower).map_err(|e| {
                    let shared = if members.len() > 1 {
                        format!(" (shared by {} positions)", members.len())
                    } else {
                        String::new()
                    };
                    Error::Config(format!(
                        "padim: covariance at position {}{shared} is not positive definite ({e:?})",
                        members.first().copied().unwrap_or(0)
                    ))
                })?;
                let inv = faer::linalg::solvers::DenseSolveCore::inverse(&llt);
                for i in 0..d {
                    let row = &mut s2[maha::row_start(i, d)..maha::row_start(i + 1, d)];
                    for (j, v) in (i..d).zip(row) {
                        *v = inv[(i, j)] as f32;
                    }
                }
                Ok::<(), Error>(())
            })?;
        let mean = self
            .shift
            .iter()
            .zip(&self.sum)
            .map(|(&c, &s)| (c as f64 + s / nf) as f32)
            .collect();
        Ok((mean, self.scatter))
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
        // Fitted models record their tie; files without one predate shared covariances.
        let tie = config.tie.unwrap_or(1);
        let config = PadimConfig {
            tie: Some(tie),
            ..config
        };
        // The stored tensor says which reduction was fitted (files from before the projection
        // existed carry `index` and no `reduction` in their configuration).
        let projected = tensors.contains_key("projection");
        let packed = tensors.contains_key("inv_cov_upper");
        let mut t = StoredTensors::new("padim", tensors);
        let reduce = if projected {
            Reduce::Project(t.take("projection")?.to_dtype(DType::F32)?)
        } else {
            Reduce::Index(t.take("index")?.to_dtype(DType::U32)?)
        };
        let mean = t.take("mean")?;
        // Files from before the packed form (format 2) hold the full `(P, d, d)` matrices.
        let inv_cov = t.take(if packed { "inv_cov_upper" } else { "inv_cov" })?;
        let (height, width) = t.take_grid()?;
        let reduce_ok = match &reduce {
            Reduce::Index(i) => i.rank() == 1,
            Reduce::Project(w) => w.rank() == 2 && w.dims()[0] >= w.dims()[1],
        };
        if mean.rank() != 2 || !reduce_ok {
            return Err(t.inconsistent());
        }
        let (p, d) = mean.dims2()?;
        // Shared covariances came with the packed form: one per block.
        let blocks = block_count((height, width), tie);
        let want: &[usize] = if packed {
            &[blocks, packed_len(d)]
        } else {
            &[p, d, d]
        };
        if !packed && tie > 1 {
            return Err(t.inconsistent());
        }
        if height * width != p || inv_cov.dims() != want || reduce.dims() != d {
            return Err(t.inconsistent());
        }
        let inv_cov = if packed {
            inv_cov
        } else {
            InvStore::pack(&inv_cov)?
        }
        .to_dtype(config.inv_cov_dtype.dtype())?;
        let shared = shared_blocks((height, width), tie);
        let inv_cov = InvStore::on(inv_cov, d, mean.device(), shared.as_deref())?;
        if let Reduce::Index(index) = &reduce {
            let idx: Vec<u32> = index.to_vec1()?;
            if idx.windows(2).any(|w| w[0] >= w[1]) {
                return Err(Error::Config(
                    "padim model has a channel index that is not strictly increasing".into(),
                ));
            }
        }
        // A projection's kind (random or principal) is only in the configuration.
        let reduction = match reduce.reduction() {
            Reduction::Orthogonal if config.reduction.projects() => config.reduction,
            r => r,
        };
        let config = PadimConfig {
            reduction,
            ..config
        };
        Ok(Self {
            config,
            reduce,
            mean,
            inv_cov,
            shared,
            height,
            width,
            report: serde_json::Value::Null,
        })
    }
}

impl Padim {
    /// Number of dimensions kept.
    pub fn dims(&self) -> usize {
        self.reduce.dims()
    }

    /// The reduction this model was fitted with.
    pub fn reduction(&self) -> Reduction {
        self.config.reduction
    }
}

impl Scorer for Padim {
    fn kind(&self) -> &'static str {
        "padim"
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("config serialises")
    }

    fn fit_report(&self) -> serde_json::Value {
        self.report.clone()
    }

    fn levels(&self) -> Vec<usize> {
        self.config.levels.clone()
    }

    fn score(&self, features: &FeatureMaps) -> Result<RawMaps> {
        let maps = pick_levels(features, &self.config.levels)?;
        let (b, _, h, w) = maps[0].dims4()?;
        let c: usize = maps.iter().map(|m| m.dims()[1]).sum();
        self.reduce.check_channels(c)?;
        if (h, w) != (self.height, self.width) {
            return Err(Error::Config(format!(
                "padim model was fitted on a {}×{} feature grid, got {h}×{w}: use the model's preprocessing",
                self.height, self.width
            )));
        }
        let data = match &self.inv_cov {
            InvStore::Packed(inv_cov) => {
                let d = self.dims();
                let sum = matches!(self.reduce, Reduce::Project(_));
                let y = assemble(&self.reduce.reduce_parts(&maps)?, b, d, (h, w), sum)?;
                let run = |mean: &[f32], inv: InvCov<'_>| match &self.shared {
                    Some(g) => mahalanobis_shared(&y, mean, inv, b, d, g),
                    None => mahalanobis(&y, mean, inv, b, d),
                };
                with_f32_slice(&self.mean, |mean| match inv_cov.dtype() {
                    DType::F16 => with_f16_slice(inv_cov, |inv| run(mean, InvCov::F16(inv))),
                    _ => with_f32_slice(inv_cov, |inv| run(mean, InvCov::F32(inv))),
                })???
            }
            InvStore::Full(inv_cov) => {
                let y = self
                    .reduce
                    .reduce_levels(&maps)?
                    .to_device(self.mean.device())?;
                let x = y.transpose(0, 1)?.contiguous()?; // (P, B, d)
                let diff = x.broadcast_sub(&self.mean.unsqueeze(1)?)?;
                let t = diff.matmul(&inv_cov.to_dtype(DType::F32)?)?; // (P, B, d)
                let dist = (t * &diff)?.sum(D::Minus1)?.clamp(0f32, f32::MAX)?.sqrt()?; // (P, B)
                dist.t()?.contiguous()?.flatten_all()?.to_vec1()?
            }
        };
        Ok(RawMaps::new(b, h, w, data))
    }

    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let grid = grid_tensor(self.height, self.width)?;
        let (name, reduce) = self.reduce.tensor();
        Ok(vec![
            (name.into(), reduce),
            ("mean".into(), self.mean.clone()),
            (
                "inv_cov_upper".into(),
                self.inv_cov.packed(self.shared.as_deref())?,
            ),
            ("grid".into(), grid),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_core::test_util::Lcg;

    /// Random features of `b` images, one map per `(channels, (height, width), scale)`, shifted
    /// by `0.01·s`; `Tensor::rand` draws anew on every call.
    fn random_features(b: usize, levels: &[(usize, (usize, usize), f64)], s: u64) -> FeatureMaps {
        FeatureMaps::new(
            levels
                .iter()
                .map(|&(c, (h, w), k)| {
                    Tensor::rand(0f32, 1., (b, c, h, w), &Device::Cpu)
                        .unwrap()
                        .affine(k, s as f64 * 0.01)
                        .unwrap()
                })
                .collect(),
        )
    }

    /// Reducing each level on its own grid then upsampling equals reducing the concatenated
    /// embedding: exactly for a channel subset, to float rounding for a projection; on grids
    /// that divide evenly and on ones that do not (odd sizes, as non-square inputs give).
    #[test]
    fn per_level_reduction_equals_reducing_the_embedding() {
        let dev = Device::Cpu;
        for (g1, g2, g3) in [((8, 8), (4, 4), (2, 2)), ((10, 15), (5, 8), (3, 4))] {
            let t = |c: usize, (h, w): (usize, usize), s: f64| {
                Tensor::rand(0f32, 1., (2, c, h, w), &dev)
                    .unwrap()
                    .affine(s, 0.0)
                    .unwrap()
            };
            let f = FeatureMaps::new(vec![t(6, g1, 1.0), t(5, g2, 2.0), t(7, g3, 3.0)]);
            let levels = [1, 2, 3];
            let emb = embed(&f, &levels).unwrap();
            let maps = pick_levels(&f, &levels).unwrap();
            let idx =
                Reduce::Index(Tensor::from_vec(vec![0u32, 3, 6, 7, 12, 17], 6, &dev).unwrap());
            assert_eq!(
                idx.apply_levels(&maps).unwrap().to_vec3::<f32>().unwrap(),
                idx.apply(&emb).unwrap().to_vec3::<f32>().unwrap()
            );
            // The CPU scoring path assembles the parts itself: the same values.
            let bdp = |r: &Reduce, d: usize, sum: bool| -> (Vec<f32>, Vec<f32>) {
                let parts = r.reduce_parts(&maps).unwrap();
                let a = assemble(&parts, 2, d, g1, sum).unwrap();
                let t = r.reduce_levels(&maps).unwrap();
                (a, t.flatten_all().unwrap().to_vec1().unwrap())
            };
            let (a, t) = bdp(&idx, 6, false);
            assert_eq!(a, t);
            let proj = Reduce::Project(
                Tensor::from_vec(semi_orthogonal(18, 4, 1), (18, 4), &dev).unwrap(),
            );
            let (a, t) = bdp(&proj, 4, true);
            for (x, y) in a.iter().zip(&t) {
                assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{x} vs {y}");
            }
            let a: Vec<f32> = proj
                .apply_levels(&maps)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f32> = proj
                .apply(&emb)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{x} vs {y}");
            }
        }
    }

    /// The fused CPU Mahalanobis equals the tensor formulation (the one other devices run),
    /// with sizes that are not multiples of the block or the lanes, and refuses bad sizes.
    #[test]
    fn fused_mahalanobis_equals_the_tensor_formulation() {
        let dev = Device::Cpu;
        let (b, d, p) = (3usize, 21usize, 37usize);
        let y = Tensor::rand(-1f32, 1., (b, p, d), &dev).unwrap();
        let mean = Tensor::rand(-1f32, 1., (p, d), &dev).unwrap();
        // Symmetric positive definite: A Aᵀ + I per position.
        let a = Tensor::rand(-1f32, 1., (p, d, d), &dev).unwrap();
        let inv = (a.matmul(&a.transpose(1, 2).unwrap()).unwrap()
            + Tensor::eye(d, candle_core::DType::F32, &dev)
                .unwrap()
                .unsqueeze(0)
                .unwrap()
                .broadcast_as((p, d, d))
                .unwrap())
        .unwrap()
        .contiguous()
        .unwrap();
        let v = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let packed = maha::pack_upper(&v(&inv), d);
        let got = mahalanobis(&v(&y), &v(&mean), InvCov::F32(&packed), b, d).unwrap();
        let x = y.transpose(0, 1).unwrap().contiguous().unwrap();
        let diff = x.broadcast_sub(&mean.unsqueeze(1).unwrap()).unwrap();
        // The tensor formulation, `(P, B)` → `(B, P)`, for a given Σ⁻¹.
        let reference = |inv: &Tensor| -> Vec<f32> {
            let t = diff.matmul(inv).unwrap();
            v(&(t * &diff)
                .unwrap()
                .sum(D::Minus1)
                .unwrap()
                .sqrt()
                .unwrap()
                .t()
                .unwrap())
        };
        for (g, w) in got.iter().zip(reference(&inv)) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}");
        }
        // f16 storage: the same distances as the f32 formulation on the f16-rounded Σ⁻¹.
        let inv16: Vec<half::f16> = packed.iter().map(|&x| half::f16::from_f32(x)).collect();
        let got16 = mahalanobis(&v(&y), &v(&mean), InvCov::F16(&inv16), b, d).unwrap();
        let inv_r = inv
            .to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        for (g, w) in got16.iter().zip(reference(&inv_r)) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "f16: {g} vs {w}");
        }
        assert!(
            got16.iter().zip(&got).any(|(a, b)| a != b),
            "f16 rounding must show"
        );
        assert!(mahalanobis(&v(&y), &v(&mean), InvCov::F32(&packed), b + 1, d).is_err());
    }

    /// The streamed statistics (batch by batch, about a shift, f32 scatter) equal the
    /// two-pass mean and covariance in f64 over all images at once, then inverted — with
    /// features far from zero (where a plain f32 sum of squares would lose digits), batches
    /// of different sizes, and a batch that does not fit refused.
    #[test]
    fn streamed_statistics_equal_the_two_pass_formulation() {
        use rand::{Rng, SeedableRng};
        let (p, d, reg) = (3, 5, 0.01);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let sizes = [4usize, 3, 6, 1];
        // (P, B, d) batches; position-dependent offsets of 1000.
        let batches: Vec<Vec<f32>> = sizes
            .iter()
            .map(|&b| {
                (0..p * b * d)
                    .map(|i| {
                        let pos = i / (b * d);
                        1000.0 * (pos as f32 + 1.0) + rng.random_range(-1.0..1.0f32)
                    })
                    .collect()
            })
            .collect();
        // Chunks of 5 over batches of 4, 3, 6, 1: chunks fill across batch boundaries.
        let mut m = Moments::new(p, d, 5, None);
        for (y, &b) in batches.iter().zip(&sizes) {
            m.add(y, b).unwrap();
        }
        assert!(m.add(&batches[1], 2).is_err());
        let (mean, inv) = m.finish(reg).unwrap();
        // The same images one at a time: the same result to the bit (the batch size that
        // delivers the images does not matter).
        let mut one = Moments::new(p, d, 5, None);
        for (y, &b) in batches.iter().zip(&sizes) {
            for i in 0..b {
                let img: Vec<f32> = (0..p)
                    .flat_map(|pos| y[(pos * b + i) * d..][..d].to_vec())
                    .collect();
                one.add(&img, 1).unwrap();
            }
        }
        assert_eq!(one.finish(reg).unwrap(), (mean.clone(), inv.clone()));
        let n: usize = sizes.iter().sum();
        for pos in 0..p {
            let rows: Vec<Vec<f64>> = batches
                .iter()
                .zip(&sizes)
                .flat_map(|(y, &b)| {
                    (0..b).map(move |bi| {
                        y[(pos * b + bi) * d..][..d]
                            .iter()
                            .map(|&v| v as f64)
                            .collect::<Vec<f64>>()
                    })
                })
                .collect();
            let mu: Vec<f64> = (0..d)
                .map(|k| rows.iter().map(|r| r[k]).sum::<f64>() / n as f64)
                .collect();
            for k in 0..d {
                let got = mean[pos * d + k] as f64;
                assert!((got - mu[k]).abs() < 1e-3, "mean {got} vs {}", mu[k]);
            }
            let cov = faer::Mat::<f64>::from_fn(d, d, |i, j| {
                rows.iter()
                    .map(|r| (r[i] - mu[i]) * (r[j] - mu[j]))
                    .sum::<f64>()
                    / (n as f64 - 1.0)
                    + if i == j { reg } else { 0.0 }
            });
            let want = faer::linalg::solvers::DenseSolveCore::inverse(
                &cov.llt(faer::Side::Lower).unwrap(),
            );
            for i in 0..d {
                for j in 0..d {
                    let (lo, hi) = (i.min(j), i.max(j));
                    let at = pos * packed_len(d) + maha::row_start(lo, d) + hi - lo;
                    let (g, w) = (inv[at] as f64, want[(i, j)]);
                    assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{g} vs {w}");
                }
            }
        }
        // Fewer than two images: no covariance.
        let mut single = Moments::new(p, d, 5, None);
        single.add(&batches[3], 1).unwrap();
        assert!(single.finish(reg).is_err());
    }

    /// The full-matrix path other devices run (forced here on the CPU) scores like the packed
    /// CPU kernel and writes the same packed tensor; a format-2 file (full `inv_cov`) loads
    /// into the packed form and scores to the bit like the model it came from.
    #[test]
    fn packed_full_and_legacy_models_agree() {
        use tessera_core::scorer::Restore;
        let feats = |s: u64| {
            Ok::<_, Error>(random_features(
                3,
                &[(6, (8, 8), 1.0), (5, (4, 4), 2.0), (7, (2, 2), 3.0)],
                s,
            ))
        };
        for dtype in [CovDtype::F32, CovDtype::F16] {
            let cfg = PadimConfig {
                dims: Some(9),
                inv_cov_dtype: dtype,
                ..Default::default()
            };
            let m = cfg.fit(&mut (0..4).map(feats)).unwrap();
            let test = feats(9).unwrap();
            let want = m.score(&test).unwrap();
            let packed = m.inv_cov.packed(m.shared.as_deref()).unwrap();
            assert_eq!(packed.dims(), [64, packed_len(9)]);
            assert_eq!(packed.dtype(), dtype.dtype());
            let full = InvStore::unpack(&packed, 9).unwrap();
            let on_device = Padim {
                inv_cov: InvStore::Full(full.clone()),
                ..m.clone()
            };
            let got = on_device.score(&test).unwrap();
            for (g, w) in got.data.iter().zip(&want.data) {
                assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{g} vs {w}");
            }
            let repacked = on_device
                .inv_cov
                .packed(on_device.shared.as_deref())
                .unwrap();
            assert_eq!(
                repacked
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap(),
                packed
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap()
            );
            // A format-2 file: `inv_cov` as the full matrices.
            let mut old: std::collections::HashMap<String, Tensor> =
                m.tensors().unwrap().into_iter().collect();
            assert!(old.remove("inv_cov_upper").is_some());
            old.insert("inv_cov".into(), full);
            let back = Padim::restore(cfg.clone(), old.clone()).unwrap();
            assert_eq!(back.score(&test).unwrap(), want);
            // A full matrix under the new name, or a packed one under the old, is refused.
            let mut wrong = old.clone();
            let full = wrong.remove("inv_cov").unwrap();
            wrong.insert("inv_cov_upper".into(), full);
            assert!(Padim::restore(cfg.clone(), wrong).is_err());
            let mut wrong = old;
            wrong.insert("inv_cov".into(), packed);
            assert!(Padim::restore(cfg, wrong).is_err());
        }
    }

    /// Shared covariances: each `tie × tie` block's Σ pools its positions' deviations from
    /// their own means (checked against a direct f64 computation, edge blocks partial).
    #[test]
    fn shared_covariances_pool_their_positions() {
        let (h, w, d, n, reg) = (3usize, 5usize, 3usize, 7usize, 0.01);
        let p = h * w;
        let shared = shared_index((h, w), 2);
        assert_eq!(shared, [0, 0, 1, 1, 2, 0, 0, 1, 1, 2, 3, 3, 4, 4, 5]);
        let cfg = PadimConfig {
            tie: Some(2),
            ..Default::default()
        };
        assert_eq!(cfg.covariances((h, w), d), 6);
        let mut rng = Lcg(17);
        let mut rnd = move || rng.unit();
        // (P, B, d) per image, n images; position p's values offset by p (distinct means).
        let x: Vec<Vec<f32>> = (0..n)
            .map(|_| (0..p * d).map(|i| rnd() + (i / d) as f32).collect())
            .collect();
        let mut m = Moments::new(p, d, 5, Some(&shared));
        for img in &x {
            m.add(img, 1).unwrap();
        }
        let (mean, inv) = m.finish(reg).unwrap();
        assert_eq!(inv.len(), 6 * packed_len(d));
        for g in 0..6u32 {
            let members: Vec<usize> = (0..p).filter(|&q| shared[q] == g).collect();
            let mut cov = faer::Mat::<f64>::zeros(d, d);
            for &q in &members {
                let mu: Vec<f64> = (0..d)
                    .map(|j| x.iter().map(|img| img[q * d + j] as f64).sum::<f64>() / n as f64)
                    .collect();
                for (j, m) in mu.iter().enumerate() {
                    assert!((mean[q * d + j] as f64 - m).abs() < 1e-5);
                }
                for img in &x {
                    for i in 0..d {
                        for j in 0..d {
                            cov[(i, j)] +=
                                (img[q * d + i] as f64 - mu[i]) * (img[q * d + j] as f64 - mu[j]);
                        }
                    }
                }
            }
            let k = (members.len() * (n - 1)) as f64;
            let cov = faer::Mat::<f64>::from_fn(d, d, |i, j| {
                cov[(i, j)] / k + if i == j { reg } else { 0.0 }
            });
            let want = faer::linalg::solvers::DenseSolveCore::inverse(
                &cov.llt(faer::Side::Lower).unwrap(),
            );
            let got = &inv[g as usize * packed_len(d)..][..packed_len(d)];
            for i in 0..d {
                for j in i..d {
                    let (a, b) = (got[maha::row_start(i, d) + j - i] as f64, want[(i, j)]);
                    assert!(
                        (a - b).abs() <= 1e-3 * b.abs().max(1.0),
                        "block {g} ({i}, {j}): {a} vs {b}"
                    );
                }
            }
        }
    }

    /// A model with shared covariances scores like one with each block's Σ⁻¹ copied to its
    /// positions, on the CPU kernel and the full-matrix (device) path; it stores one triangle
    /// per block, restores to the same scores, and a file whose block count does not match its
    /// configuration is refused.
    #[test]
    fn shared_covariances_score_like_their_copies() {
        use tessera_core::scorer::Restore;
        let dev = Device::Cpu;
        let feats = |s: u64| {
            Ok::<_, Error>(random_features(
                3,
                &[(6, (7, 5), 1.0), (5, (4, 3), 2.0), (7, (2, 2), 3.0)],
                s,
            ))
        };
        for dtype in [CovDtype::F32, CovDtype::F16] {
            let cfg = PadimConfig {
                dims: Some(9),
                inv_cov_dtype: dtype,
                tie: Some(2),
                ..Default::default()
            };
            let m = cfg.fit(&mut (0..6).map(feats)).unwrap();
            let test = feats(9).unwrap();
            let want = m.score(&test).unwrap();
            let shared = m.shared.clone().unwrap();
            let packed = m.inv_cov.packed(Some(&shared)).unwrap();
            assert_eq!(packed.dims(), [12, packed_len(9)]);
            let idx = Tensor::from_slice(&shared, shared.len(), &dev).unwrap();
            let copied = Padim {
                inv_cov: InvStore::Packed(packed.index_select(&idx, 0).unwrap()),
                shared: None,
                ..m.clone()
            };
            assert_eq!(copied.score(&test).unwrap(), want);
            let full = InvStore::unpack(&packed, 9)
                .unwrap()
                .index_select(&idx, 0)
                .unwrap();
            let on_device = Padim {
                inv_cov: InvStore::Full(full),
                ..m.clone()
            };
            for (g, w) in on_device.score(&test).unwrap().data.iter().zip(&want.data) {
                assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{g} vs {w}");
            }
            let repacked = on_device.inv_cov.packed(Some(&shared)).unwrap();
            let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(f32s(&repacked), f32s(&packed));
            let stored: std::collections::HashMap<String, Tensor> =
                m.tensors().unwrap().into_iter().collect();
            let back = Padim::restore(cfg.clone(), stored.clone()).unwrap();
            assert_eq!(back.score(&test).unwrap(), want);
            for tie in [1, 3] {
                let other = PadimConfig {
                    tie: Some(tie),
                    ..cfg.clone()
                };
                assert!(Padim::restore(other, stored.clone()).is_err(), "tie {tie}");
            }
        }
    }

    /// With every channel kept no reduction is applied: the seed and the reduction asked for
    /// change nothing, and the model says it kept the channels as they are.
    #[test]
    fn every_channel_needs_no_reduction() {
        let feats = |s: u64| {
            Ok::<_, Error>(random_features(
                4,
                &[(6, (4, 4), 1.0), (5, (2, 2), 2.0), (7, (1, 1), 3.0)],
                s,
            ))
        };
        // Tensor::rand draws anew on every call: the same batches for every fit.
        let train: Vec<FeatureMaps> = (0..5).map(|s| feats(s).unwrap()).collect();
        let test = feats(9).unwrap();
        let fit = |reduction: Reduction, seed: u64| {
            let cfg = PadimConfig {
                dims: Some(18),
                reduction,
                seed,
                ..Default::default()
            };
            let m = cfg.fit(&mut train.iter().cloned().map(Ok)).unwrap();
            assert_eq!(m.reduction(), Reduction::Subset);
            m.score(&test).unwrap()
        };
        let want = fit(Reduction::Orthogonal, 1);
        assert_eq!(fit(Reduction::Orthogonal, 2), want);
        assert_eq!(fit(Reduction::Subset, 3), want);
        assert_eq!(fit(Reduction::Pca, 0), want);
    }
}
