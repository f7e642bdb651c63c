//! # tessera-patchcore
//!
//! PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection"): a memory bank
//! of locally aggregated patch features, reduced by a greedy coreset; a test patch's anomaly
//! score is its distance to the nearest bank entry.
//!
//! Follows the official implementation as simplified by anomalib:
//! 1. layer2 and layer3 features, each locally averaged over 3×3 neighbourhoods (zero padding,
//!    divisor 9), layer3 upsampled (bilinear) to layer2's grid, concatenated (384 channels for
//!    ResNet-18, 1536 for Wide-ResNet-50-2);
//! 2. optionally reduced to `embed_dim` channels by adaptive average pooling over channels
//!    (the official `target_embed_dimension` reduction);
//! 3. greedy k-center coreset on a seeded Gaussian random projection to 128 dimensions, first
//!    centre drawn from the seed; `coreset_ratio` of all training patches are kept;
//! 4. scoring: 1-NN Euclidean distance to the bank — by default an exact search of the bank
//!    partitioned into clusters with triangle-inequality pruning ([`search`]: brute force's
//!    answer, a fraction of its work on object categories), or brute force in bank chunks
//!    ([`Search::Brute`], the only path off the CPU), or an approximate search of the nearest
//!    clusters ([`Search::Approximate`]); optional image-score
//!    reweighting with the `k` nearest neighbours of the nearest bank patch (paper eq. 7,
//!    anomalib's `1 − softmax(d)[0]`); the caller upsamples (bilinear) and blurs (σ = 4).
//!
//! Deviations, all deliberate: the coreset is exact greedy k-center with triangle-inequality
//! pruning ([`coreset::greedy_coreset`]: the same points as the textbook loop, much less work);
//! the reweighted image score multiplies the maximum of the *final* (upsampled, blurred) map,
//! not of the raw patch scores; the memory bank can be stored in f16 (`bank_dtype`).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use tessera_core::scorer::{FitScorer, Scorer};
//! use tessera_core::FeatureMaps;
//! use tessera_patchcore::PatchcoreConfig;
//! let dev = Device::Cpu;
//! let batch = || -> tessera_core::Result<FeatureMaps> {
//!     let l1 = Tensor::rand(0f32, 1., (2, 4, 16, 16), &dev)?;
//!     let l2 = Tensor::rand(0f32, 1., (2, 8, 8, 8), &dev)?;
//!     let l3 = Tensor::rand(0f32, 1., (2, 16, 4, 4), &dev)?;
//!     Ok(FeatureMaps::new(vec![l1, l2, l3]))
//! };
//! let cfg = PatchcoreConfig { coreset_ratio: 0.25, ..Default::default() };
//! let model = cfg.fit(&mut (0..3).map(|_| batch()))?;
//! assert_eq!(model.bank_len(), 96); // 25 % of 3·2·8·8 patches
//! let raw = model.score(&batch()?)?;
//! assert_eq!((raw.batch, raw.height, raw.width), (2, 8, 8));
//! # Ok::<(), tessera_core::Error>(())
//! ```

pub mod coreset;
pub mod nn;
pub mod search;

pub use search::{PartitionedBank, Search, SearchStats};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use tessera_core::scorer::{grid_tensor, FitScorer, RawMaps, Restore, Scorer, StoredTensors};
use tessera_core::{Error, FeatureMaps, Result};

/// Storage type of the memory bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BankDtype {
    #[default]
    F32,
    /// Half the memory; distances are still computed in f32.
    F16,
}

impl BankDtype {
    /// The names on the command line.
    pub const NAMES: &'static [&'static str] = &["f32", "f16"];
}

impl std::str::FromStr for BankDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" => Ok(BankDtype::F32),
            "f16" => Ok(BankDtype::F16),
            _ => Err(Error::Config(format!(
                "bank dtype '{s}': expected f32 or f16"
            ))),
        }
    }
}

/// PatchCore hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PatchcoreConfig {
    /// Backbone levels used (1-based); the first sets the grid.
    pub levels: Vec<usize>,
    /// Fraction of training patches kept in the bank (0 < r ≤ 1).
    pub coreset_ratio: f64,
    /// Dimension of the random projection the coreset is selected on.
    pub projection_dim: usize,
    /// Reduce patch features to this many channels (adaptive average pooling); `None` keeps all.
    pub embed_dim: Option<usize>,
    /// Reweight image scores with this many neighbours (`None`: off, as the official code).
    pub reweight_k: Option<usize>,
    pub bank_dtype: BankDtype,
    /// Seed of the projection and the first coreset centre.
    pub seed: u64,
    /// Bank rows per distance chunk of the brute-force search (bounds its peak memory).
    pub chunk: usize,
    /// How test patches find their nearest bank row (CPU; other devices use brute force).
    pub search: Search,
    /// Clusters of the partitioned bank (`None`: about `√bank`).
    pub clusters: Option<usize>,
}

impl Default for PatchcoreConfig {
    fn default() -> Self {
        Self {
            levels: vec![2, 3],
            coreset_ratio: 0.1,
            projection_dim: 128,
            embed_dim: None,
            reweight_k: None,
            bank_dtype: BankDtype::F32,
            seed: 0,
            chunk: 4096,
            search: Search::Exact,
            clusters: None,
        }
    }
}

impl PatchcoreConfig {
    fn validate(&self) -> Result<()> {
        if self.levels.is_empty() || self.levels.contains(&0) {
            return Err(Error::Config(
                "patchcore: levels must be non-empty and 1-based".into(),
            ));
        }
        if !(self.coreset_ratio > 0.0 && self.coreset_ratio <= 1.0) {
            return Err(Error::Config(format!(
                "patchcore: coreset ratio must be in (0, 1], got {}",
                self.coreset_ratio
            )));
        }
        if self.projection_dim == 0
            || self.chunk == 0
            || self.embed_dim == Some(0)
            || self.reweight_k == Some(0)
            || self.clusters == Some(0)
            || self.search == (Search::Approximate { probes: 0 })
        {
            return Err(Error::Config(
                "patchcore: projection_dim, chunk, embed_dim, reweight_k, clusters and search \
                 probes must be ≥ 1"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Locally aware patch features: 3×3 average of each level, deeper levels upsampled
/// (bilinear) to the first level's grid, concatenated, optionally channel-pooled. `B × C × H × W`.
pub fn embed(features: &FeatureMaps, levels: &[usize], embed_dim: Option<usize>) -> Result<Tensor> {
    let x = features.local_average_concat(levels, "patchcore")?;
    match embed_dim {
        None => Ok(x),
        Some(d) => {
            let (b, c, h, w) = x.dims4()?;
            if d > c {
                return Err(Error::Config(format!(
                    "patchcore: cannot reduce {c} feature channels to {d}; choose an embedding \
                     dimension of at most {c}"
                )));
            }
            let pool = channel_pool_matrix(c, d, x.device())?; // C × d
            let flat = x.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?; // B × HW × C
            let y = flat.broadcast_matmul(&pool)?; // B × HW × d
            Ok(y.transpose(1, 2)?.reshape((b, d, h, w))?)
        }
    }
}

/// PyTorch's `adaptive_avg_pool1d` from `c` to `d` as a `c × d` matrix.
fn channel_pool_matrix(c: usize, d: usize, dev: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; c * d];
    for o in 0..d {
        let s = (o * c) / d;
        let e = ((o + 1) * c).div_ceil(d);
        for i in s..e {
            m[i * d + o] = 1.0 / (e - s) as f32;
        }
    }
    Ok(Tensor::from_vec(m, (c, d), dev)?)
}

/// `B × C × H × W` → `(B·H·W) × C` patch rows (the queries of [`Patchcore::nearest`]).
pub fn patches(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.permute((0, 2, 3, 1))?
        .reshape((b * h * w, c))?
        .contiguous()?)
}

fn gaussian_projection(rows: usize, cols: usize, seed: u64, dev: &Device) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_c0de);
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(1e-12);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect();
    Ok(Tensor::from_vec(v, (rows, cols), dev)?)
}

/// A fitted PatchCore model.
#[derive(Debug, Clone)]
pub struct Patchcore {
    config: PatchcoreConfig,
    /// `K × C` memory bank (f32 or f16).
    bank: Tensor,
    /// `K` squared norms of the bank rows (f32).
    bank_sq: Tensor,
    /// The bank partitioned for [`Search::Exact`] / [`Search::Approximate`] on the CPU.
    partition: Option<Arc<PartitionedBank>>,
    height: usize,
    width: usize,
    /// Fit facts (not stored in model files).
    report: serde_json::Value,
}

/// Progress callback for the coreset: (centres chosen, centres wanted).
pub type CoresetProgress<'a> = &'a (dyn Fn(usize, usize) + Sync);

impl PatchcoreConfig {
    /// Fit, reporting coreset progress.
    pub fn fit_with_progress(
        &self,
        batches: &mut dyn Iterator<Item = Result<FeatureMaps>>,
        progress: CoresetProgress<'_>,
    ) -> Result<Patchcore> {
        self.validate()?;
        let t0 = std::time::Instant::now();
        let mut rows: Vec<Tensor> = Vec::new();
        let mut grid = None;
        for batch in batches {
            let e = embed(&batch?, &self.levels, self.embed_dim)?;
            let (_, _, h, w) = e.dims4()?;
            if *grid.get_or_insert((h, w)) != (h, w) {
                return Err(Error::Config(format!(
                    "patchcore: feature grid changed to {h}×{w}"
                )));
            }
            rows.push(patches(&e)?.to_device(&Device::Cpu)?);
        }
        let (height, width) =
            grid.ok_or_else(|| Error::Config("patchcore: no training images".into()))?;
        let all = Tensor::cat(&rows, 0)?;
        drop(rows);
        let (n, c) = all.dims2()?;
        let k = ((n as f64 * self.coreset_ratio).ceil() as usize).clamp(1, n);
        let t1 = std::time::Instant::now();
        let keep: Vec<u32> = if k == n {
            (0..n as u32).collect()
        } else {
            let projected = if c > self.projection_dim {
                all.matmul(&gaussian_projection(
                    c,
                    self.projection_dim,
                    self.seed,
                    &Device::Cpu,
                )?)?
            } else {
                all.clone()
            };
            let dim = projected.dims()[1];
            let flat: Vec<f32> = projected.flatten_all()?.to_vec1()?;
            use rand::{Rng, SeedableRng};
            let first = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed).random_range(0..n);
            coreset::greedy_coreset(&flat, dim, k, first, &|done| progress(done, k))
                .into_iter()
                .map(|i| i as u32)
                .collect()
        };
        let dev = batches_device(&all);
        let idx = Tensor::from_vec(keep, k, &Device::Cpu)?;
        let bank = all.index_select(&idx, 0)?;
        let bank = match self.bank_dtype {
            BankDtype::F32 => bank,
            BankDtype::F16 => bank.to_dtype(DType::F16)?,
        };
        let bank = bank.to_device(&dev)?;
        let coreset_seconds = t1.elapsed().as_secs_f64();
        let mut model = Patchcore::new(self.clone(), bank, height, width)?;
        model.report = serde_json::json!({
            "patches": n,
            "channels": c,
            "bank": k,
            "features_seconds": (t1 - t0).as_secs_f64(),
            "coreset_seconds": coreset_seconds,
            "search": self.search.to_string(),
            "clusters": model.partition.as_ref().map(|p| p.clusters()),
        });
        Ok(model)
    }
}

fn batches_device(t: &Tensor) -> Device {
    t.device().clone()
}

impl FitScorer for PatchcoreConfig {
    type Fitted = Patchcore;
    fn fit(&self, batches: &mut dyn Iterator<Item = Result<FeatureMaps>>) -> Result<Patchcore> {
        self.fit_with_progress(batches, &|_, _| {})
    }
}

impl Restore for Patchcore {
    const KIND: &'static str = "patchcore";
    type Config = PatchcoreConfig;

    fn restore(config: PatchcoreConfig, tensors: HashMap<String, Tensor>) -> Result<Self> {
        config.validate()?;
        let mut t = StoredTensors::new("patchcore", tensors);
        let bank = t.take("bank")?;
        let (height, width) = t.take_grid()?;
        if bank.rank() != 2 || bank.dims()[0] == 0 {
            return Err(t.inconsistent());
        }
        let want = match config.bank_dtype {
            BankDtype::F32 => DType::F32,
            BankDtype::F16 => DType::F16,
        };
        let bank = bank.to_dtype(want)?;
        Self::new(config, bank, height, width)
    }
}

impl Patchcore {
    fn new(config: PatchcoreConfig, bank: Tensor, height: usize, width: usize) -> Result<Self> {
        let bank_sq = nn::row_norms_sq(&bank)?;
        let mut model = Self {
            config,
            bank,
            bank_sq,
            partition: None,
            height,
            width,
            report: serde_json::Value::Null,
        };
        model.set_search(model.config.search)?;
        Ok(model)
    }

    /// Change how test patches are searched (e.g. brute force for a comparison); builds or
    /// drops the partitioned copy of the bank as needed. Off the CPU the search is brute force.
    pub fn set_search(&mut self, search: Search) -> Result<()> {
        if let Search::Approximate { probes: 0 } = search {
            return Err(Error::Config("patchcore: search probes must be ≥ 1".into()));
        }
        self.config.search = search;
        if search == Search::Brute || !self.bank.device().is_cpu() {
            self.partition = None;
        } else if self.partition.is_none() {
            let (k, c) = self.bank.dims2()?;
            let rows: Vec<f32> = self.bank.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let clusters = self
                .config
                .clusters
                .unwrap_or_else(|| search::default_clusters(k));
            self.partition = Some(Arc::new(PartitionedBank::build(&rows, c, clusters)?));
        }
        Ok(())
    }

    /// The partitioned bank, when the search uses one.
    pub fn partition(&self) -> Option<&PartitionedBank> {
        self.partition.as_deref()
    }

    /// Nearest bank distance and index of each patch row (`M × C`, f32), by the configured
    /// search, with the work it took.
    pub fn nearest(&self, rows: &Tensor) -> Result<(Vec<f32>, Vec<u32>, SearchStats)> {
        match &self.partition {
            Some(p) => {
                let rows = rows.to_dtype(DType::F32)?.contiguous()?;
                tessera_core::tensor::with_f32_slice(&rows, |q| p.nearest(q, self.config.search))?
            }
            None => {
                let (d, i) = nn::nearest(rows, &self.bank, &self.bank_sq, self.config.chunk)?;
                let pairs = (rows.dims()[0] * self.bank_len()) as u64;
                let stats = SearchStats {
                    pairs,
                    brute_pairs: pairs,
                };
                Ok((d, i, stats))
            }
        }
    }

    /// Number of patches in the memory bank.
    pub fn bank_len(&self) -> usize {
        self.bank.dims()[0]
    }

    /// The memory bank (`K × C`).
    pub fn bank(&self) -> &Tensor {
        &self.bank
    }
}

impl Scorer for Patchcore {
    fn kind(&self) -> &'static str {
        "patchcore"
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("config serialises")
    }

    fn levels(&self) -> Vec<usize> {
        self.config.levels.clone()
    }

    fn fit_report(&self) -> serde_json::Value {
        self.report.clone()
    }

    fn score(&self, features: &FeatureMaps) -> Result<RawMaps> {
        let e = embed(features, &self.config.levels, self.config.embed_dim)?;
        let (b, c, h, w) = e.dims4()?;
        if c != self.bank.dims()[1] {
            return Err(Error::Config(format!(
                "patchcore model's memory bank has {} channels, the features {c}: the model does \
                 not fit this backbone",
                self.bank.dims()[1]
            )));
        }
        if (h, w) != (self.height, self.width) {
            return Err(Error::Config(format!(
                "patchcore model was fitted on a {}×{} feature grid, got {h}×{w}: use the model's preprocessing",
                self.height, self.width
            )));
        }
        let q = patches(&e)?.to_device(self.bank.device())?;
        let (dist, nn_idx, _) = self.nearest(&q)?;
        let image_scores = match self.config.reweight_k {
            None => None,
            Some(k) => {
                let per = h * w;
                let mut s = Vec::with_capacity(b);
                for i in 0..b {
                    let d = &dist[i * per..(i + 1) * per];
                    let (arg, &top) = d
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
                        .expect("non-empty grid");
                    let nn_row = self
                        .bank
                        .narrow(0, nn_idx[i * per + arg] as usize, 1)?
                        .to_dtype(DType::F32)?;
                    let (_, support) =
                        nn::k_nearest(&nn_row, &self.bank, &self.bank_sq, k, self.config.chunk)?;
                    let qrow = q.narrow(0, i * per + arg, 1)?;
                    let sup = self
                        .bank
                        .index_select(&Tensor::new(support.as_slice(), self.bank.device())?, 0)?;
                    let sup = sup.to_dtype(DType::F32)?;
                    let dd: Vec<f32> =
                        qrow.broadcast_sub(&sup)?.sqr()?.sum(1)?.sqrt()?.to_vec1()?;
                    // 1 − softmax(d)[0], computed stably.
                    let m = dd.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let z: f32 = dd.iter().map(|v| (v - m).exp()).sum();
                    let weight = 1.0 - (dd[0] - m).exp() / z;
                    s.push(weight * top);
                }
                Some(s)
            }
        };
        Ok(RawMaps {
            batch: b,
            height: h,
            width: w,
            data: dist,
            image_scores,
        })
    }

    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let grid = grid_tensor(self.height, self.width)?;
        Ok(vec![
            ("bank".into(), self.bank.clone()),
            ("grid".into(), grid),
        ])
    }
}
