//! # tessera-cfa
//!
//! CFA (Lee et al., 2022): coupled-hypersphere-based feature adaptation. A small patch
//! descriptor on top of frozen CNN features is trained so that each normal patch falls inside a
//! hypersphere of radius `r` around its nearest memory-bank centres and away from the others;
//! the anomaly score of a patch is the softmin-weighted distance to its nearest centre.
//!
//! Follows the reference implementation:
//! 1. layer1..3, each averaged over 3×3 (`avg_pool2d(3, 1, 1)`), deeper levels upsampled
//!    (bilinear) to layer1's grid and concatenated (448 channels for ResNet-18);
//! 2. descriptor: CoordConv — two coordinate channels in [−1, 1] (row, column) appended — then
//!    a 1×1 convolution to `C / γ_d` channels;
//! 3. memory bank: the mean descriptor per location over the training set (with the initial
//!    descriptor), reduced by k-means to `HW / γ_c` centres when `γ_c > 1`;
//! 4. loss over the `K + J` nearest centres of every patch (squared distances `d`):
//!    `L = (1/ν)·mean(max(0, d[:K] − r²)) + (1/ν)·mean(max(0, r² − d[J:] − α))`, with
//!    K = J = 3, 1/ν = 1000, α = 0.1, `r` a trained scalar initialised to 1e-5;
//! 5. AdamW with AMSGrad (lr 1e-3, weight decay 5e-4), 30 epochs, batch 4;
//! 6. score: `softmin(d[:K])[0] · d[0]` per patch; the caller upsamples and blurs (σ = 4).
//!
//! Deviations: the reference keeps the epoch with the best *test* AUROC; we never look at test
//! data — training runs for `epochs` epochs or stops when the mean training loss has not improved
//! for `patience` epochs, keeping the descriptor of the epoch with the lowest training loss.
//! Backbone features are computed once and cached (the backbone is frozen, so this changes
//! nothing but the time). Initialisation and shuffling use our seeded ChaCha8 RNG.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use tessera_core::scorer::{FitScorer, Scorer};
//! use tessera_core::FeatureMaps;
//! use tessera_cfa::CfaConfig;
//! let dev = Device::Cpu;
//! let batch = |s: f64| -> tessera_core::Result<FeatureMaps> {
//!     let l1 = (Tensor::rand(0f32, 1., (2, 4, 8, 8), &dev)? + s)?;
//!     let l2 = Tensor::rand(0f32, 1., (2, 6, 4, 4), &dev)?;
//!     let l3 = Tensor::rand(0f32, 1., (2, 8, 2, 2), &dev)?;
//!     Ok(FeatureMaps::new(vec![l1, l2, l3]))
//! };
//! let cfg = CfaConfig { epochs: 2, ..Default::default() };
//! let model = cfg.fit(&mut (0..3).map(|i| batch(i as f64 * 0.1)))?;
//! let raw = model.score(&batch(0.0)?)?;
//! assert_eq!((raw.batch, raw.height, raw.width), (2, 8, 8));
//! assert_eq!(model.history().len(), 2);
//! # Ok::<(), tessera_core::Error>(())
//! ```

pub mod kmeans;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::Optimizer;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tessera_core::scorer::{grid_tensor, FitScorer, RawMaps, Scorer, StoredTensors};
use tessera_core::tensor::with_f32_slice;
use tessera_core::{Error, FeatureMaps, Result};
use tessera_optim::{AdamW, AdamWConfig};

/// CFA hyper-parameters (the reference's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CfaConfig {
    /// Backbone levels used (1-based); the first sets the grid.
    pub levels: Vec<usize>,
    /// Descriptor compression: output channels = input channels / γ_d.
    pub gamma_d: usize,
    /// Memory compression: centres = grid positions / γ_c (k-means when > 1).
    pub gamma_c: usize,
    /// Attraction neighbours.
    pub k: usize,
    /// Repulsion neighbours (the centres ranked J..K+J).
    pub j: usize,
    /// ν of the soft boundary (the loss is scaled by 1/ν).
    pub nu: f64,
    /// Repulsion margin α.
    pub alpha: f64,
    /// Initial hypersphere radius r.
    pub radius_init: f64,
    pub lr: f64,
    pub weight_decay: f64,
    pub epochs: usize,
    pub batch: usize,
    /// Stop when the mean training loss has not improved for this many epochs.
    pub patience: Option<usize>,
    pub seed: u64,
}

impl Default for CfaConfig {
    fn default() -> Self {
        Self {
            levels: vec![1, 2, 3],
            gamma_d: 1,
            gamma_c: 1,
            k: 3,
            j: 3,
            nu: 1e-3,
            alpha: 0.1,
            radius_init: 1e-5,
            lr: 1e-3,
            weight_decay: 5e-4,
            epochs: 30,
            batch: 4,
            patience: None,
            seed: 0,
        }
    }
}

impl CfaConfig {
    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(format!("cfa: {m}")));
        if self.levels.is_empty() || self.levels.contains(&0) {
            return bad("levels must be non-empty and 1-based");
        }
        if self.gamma_d == 0 || self.gamma_c == 0 || self.k == 0 || self.batch == 0 {
            return bad("gamma_d, gamma_c, k and batch must be ≥ 1");
        }
        if self.j > self.k {
            return bad("j must not exceed k (repulsion uses the centres ranked j..k+j)");
        }
        if !(self.nu > 0.0 && self.lr > 0.0 && self.weight_decay >= 0.0) {
            return bad("nu and lr must be positive, weight decay non-negative");
        }
        if self.patience == Some(0) {
            return bad("patience must be ≥ 1");
        }
        Ok(())
    }
}

/// CFA's input features: 3×3-averaged levels, upsampled (bilinear) to the first level's grid,
/// concatenated. `B × C × H × W`.
pub fn embed(features: &FeatureMaps, levels: &[usize]) -> Result<Tensor> {
    features.local_average_concat(levels, "cfa")
}

/// CoordConv's two extra channels for an `h × w` grid, as `(h·w) × 2` rows: the row coordinate
/// then the column coordinate, each scaled to [−1, 1] (as the reference's `AddCoords`).
pub fn coords(h: usize, w: usize, dev: &Device) -> Result<Tensor> {
    let scale = |i: usize, n: usize| {
        if n > 1 {
            2.0 * i as f32 / (n - 1) as f32 - 1.0
        } else {
            -1.0
        }
    };
    let v: Vec<f32> = (0..h * w)
        .flat_map(|p| [scale(p / w, h), scale(p % w, w)])
        .collect();
    Ok(Tensor::from_vec(v, (h * w, 2), dev)?)
}

/// `B × C × H × W` features → `(B·H·W) × (C + 2)` descriptor input rows (coordinates appended).
pub fn rows_with_coords(x: &Tensor, coords: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let rows = x.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?;
    let co = coords.unsqueeze(0)?.broadcast_as((b, h * w, 2))?;
    Ok(Tensor::cat(&[&rows, &co], 2)?.reshape((b * h * w, c + 2))?)
}

/// The trainable 1×1 convolution of the descriptor, as a `D × (C+2)` matrix and a bias.
pub fn descriptor(rows: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(rows.matmul(&weight.t()?)?.broadcast_add(bias)?)
}

/// For each row of `phi` (`N × D`), the `n` nearest centres (`M × D`, squared norms given) by
/// squared distance, nearest first: (indices `N × n`, squared distances `N × n`). No gradient.
pub fn nearest_centres(
    phi: &Tensor,
    centres: &Tensor,
    centres_sq: &[f32],
    n: usize,
) -> Result<(Vec<u32>, Vec<f32>)> {
    if !phi.device().is_cpu() {
        return nearest_centres_tensor_ops(phi, centres, centres_sq, n);
    }
    let (rows, _) = phi.dims2()?;
    let m = centres.dims()[0];
    let n = n.min(m);
    let f_sq: Vec<f32> = phi.sqr()?.sum(D::Minus1)?.to_vec1()?;
    let fc = phi.detach().matmul(&centres.t()?)?.contiguous()?;
    let mut idx = vec![0u32; rows * n];
    let mut dist = vec![0f32; rows * n];
    with_f32_slice(&fc, |fc| {
        idx.par_chunks_mut(n)
            .zip(dist.par_chunks_mut(n))
            .zip(fc.par_chunks(m))
            .enumerate()
            .for_each(|(r, ((ix, ds), row))| {
                // Insertion into a short sorted list: n is K + J = 6.
                let mut len = 0;
                for (c, (&dot, &cs)) in row.iter().zip(centres_sq).enumerate() {
                    let d = f_sq[r] + cs - 2.0 * dot;
                    if len < n || d < ds[len - 1] {
                        let mut p = if len < n { len } else { n - 1 };
                        while p > 0 && ds[p - 1] > d {
                            ds[p] = ds[p - 1];
                            ix[p] = ix[p - 1];
                            p -= 1;
                        }
                        ds[p] = d;
                        ix[p] = c as u32;
                        len = (len + 1).min(n);
                    }
                }
            })
    })?;
    Ok((idx, dist))
}

/// [`nearest_centres`] with tensor ops only — the accelerator path (any device works): the
/// distance matrix is built and sorted on the device (`arg_sort`), and only the `N × n`
/// selected indices and distances cross to the host.
pub fn nearest_centres_tensor_ops(
    phi: &Tensor,
    centres: &Tensor,
    centres_sq: &[f32],
    n: usize,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let m = centres.dims()[0];
    let n = n.min(m);
    let phi = phi.detach();
    let cs = Tensor::from_slice(centres_sq, (1, m), phi.device())?;
    let d = (phi.matmul(&centres.t()?)? * -2.0)?
        .broadcast_add(&phi.sqr()?.sum_keepdim(D::Minus1)?)?
        .broadcast_add(&cs)?
        .contiguous()?;
    let order = d.arg_sort_last_dim(true)?.narrow(1, 0, n)?.contiguous()?;
    let dist = d.gather(&order, 1)?;
    Ok((
        order.flatten_all()?.to_vec1::<u32>()?,
        dist.flatten_all()?.to_vec1::<f32>()?,
    ))
}

/// The loss's contact with the selected centres, as a custom op on CPU:
/// forward `out[n, j] = phi[n] · centres[idx[n, j]]` (differentiable in `phi`), and its
/// backward `dphi[n] = Σ_j g[n, j] · centres[idx[n, j]]` — without materialising the
/// `N × (K+J) × D` gathered centres.
#[derive(Clone)]
struct SelectedCentres {
    centres: std::sync::Arc<Vec<f32>>,
    idx: std::sync::Arc<Vec<u32>>,
    kj: usize,
    d: usize,
    /// false: the dot products (N × D → N × kj); true: their gradient (N × kj → N × D).
    backward: bool,
}

impl candle_core::CustomOp1 for SelectedCentres {
    fn name(&self) -> &'static str {
        if self.backward {
            "cfa-combine-centres"
        } else {
            "cfa-selected-dots"
        }
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("cfa: operand must be contiguous".into()))?;
        let x = &s.as_slice::<f32>()?[a..b];
        let (d, kj) = (self.d, self.kj);
        let centre = |c: u32| &self.centres[c as usize * d..(c as usize + 1) * d];
        let (n, out) = if self.backward {
            let n = x.len() / kj;
            let mut out = vec![0f32; n * d];
            out.par_chunks_mut(d)
                .zip(x.par_chunks(kj))
                .zip(self.idx.par_chunks(kj))
                .for_each(|((o, g), ix)| {
                    for (&gv, &c) in g.iter().zip(ix) {
                        o.iter_mut().zip(centre(c)).for_each(|(v, y)| *v += gv * y);
                    }
                });
            (n, out)
        } else {
            let n = x.len() / d;
            let mut out = vec![0f32; n * kj];
            out.par_chunks_mut(kj)
                .zip(x.par_chunks(d))
                .zip(self.idx.par_chunks(kj))
                .for_each(|((o, p), ix)| {
                    for (v, &c) in o.iter_mut().zip(ix) {
                        *v = p.iter().zip(centre(c)).map(|(x, y)| x * y).sum();
                    }
                });
            (n, out)
        };
        let cols = if self.backward { d } else { kj };
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from((n, cols)),
        ))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if self.backward {
            return Ok(None);
        }
        let op = Self {
            backward: true,
            ..self.clone()
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// The coupled-hypersphere loss of a batch of descriptors `phi` (`N × D`, differentiable)
/// against fixed `centres`: attraction to the K nearest, repulsion from those ranked J..K+J.
pub fn soft_boundary_loss(
    phi: &Tensor,
    centres: &Tensor,
    centres_sq: &[f32],
    r: &Tensor,
    cfg: &CfaConfig,
) -> Result<Tensor> {
    let (n, d) = phi.dims2()?;
    let (idx, _) = nearest_centres(phi, centres, centres_sq, cfg.k + cfg.j)?;
    let kj = idx.len() / n;
    let sel_sq: Vec<f32> = idx.iter().map(|&i| centres_sq[i as usize]).collect();
    let sel_sq = Tensor::from_vec(sel_sq, (n, kj), phi.device())?;
    let dot = if phi.device().is_cpu() && phi.dtype() == DType::F32 {
        let c: Vec<f32> = centres.flatten_all()?.to_vec1()?;
        let op = SelectedCentres {
            centres: std::sync::Arc::new(c),
            idx: std::sync::Arc::new(idx),
            kj,
            d,
            backward: false,
        };
        phi.contiguous()?.apply_op1(op)?
    } else {
        let ix = Tensor::from_vec(idx, n * kj, phi.device())?;
        let sel = centres.index_select(&ix, 0)?.reshape((n, kj, d))?;
        phi.unsqueeze(1)?.broadcast_mul(&sel)?.sum(D::Minus1)?
    };
    let f_sq = phi.sqr()?.sum_keepdim(D::Minus1)?; // n × 1
    let dist = (f_sq.broadcast_add(&sel_sq)? - (dot * 2.0)?)?;
    let r2 = r.sqr()?.reshape((1, 1))?;
    let att = dist
        .narrow(1, 0, cfg.k.min(kj))?
        .broadcast_sub(&r2)?
        .relu()?
        .mean_all()?;
    let rep_from = cfg.j.min(kj);
    let rep = (r2.broadcast_sub(&dist.narrow(1, rep_from, kj - rep_from)?)? - cfg.alpha)?
        .relu()?
        .mean_all()?;
    Ok(((att + rep)? / cfg.nu)?)
}

/// One epoch's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    pub epoch: usize,
    /// Mean training loss over the epoch's batches.
    pub loss: f64,
    /// The hypersphere radius after the epoch.
    pub radius: f64,
    pub seconds: f64,
}

/// Training progress, reported after every batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainProgress {
    pub epoch: usize,
    pub epochs: usize,
    pub batch: usize,
    pub batches: usize,
    /// Running mean loss of the epoch so far.
    pub loss: f64,
}

/// A fitted CFA model.
#[derive(Debug, Clone)]
pub struct Cfa {
    config: CfaConfig,
    weight: Tensor,
    bias: Tensor,
    centres: Tensor,
    centres_sq: Vec<f32>,
    height: usize,
    width: usize,
    history: Vec<EpochStats>,
}

fn uniform(n: usize, bound: f64, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<f32> {
    use rand::Rng;
    (0..n)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect()
}

/// A trainable feature transform trained jointly with CFA's descriptor by CFA's loss (e.g.
/// PFAM, end to end): it maps backbone features to the features CFA embeds.
pub trait FeatureTransform {
    fn forward(&self, features: &FeatureMaps) -> Result<FeatureMaps>;
    /// Its trainable variables (updated in place by the optimiser).
    fn vars(&self) -> Vec<Var>;
}

impl CfaConfig {
    /// Fit, reporting training progress after every batch.
    pub fn fit_with_progress(
        &self,
        batches: &mut dyn Iterator<Item = Result<FeatureMaps>>,
        progress: &dyn Fn(TrainProgress),
    ) -> Result<Cfa> {
        self.fit_inner(batches, None, progress)
    }

    /// Fit end to end: `transform` runs on the (frozen) backbone features of every batch and
    /// trains with the descriptor, by the same loss and optimiser. Its variables are left at the
    /// values of the kept (best training-loss) epoch.
    pub fn fit_end_to_end(
        &self,
        batches: &mut dyn Iterator<Item = Result<FeatureMaps>>,
        transform: &dyn FeatureTransform,
        progress: &dyn Fn(TrainProgress),
    ) -> Result<Cfa> {
        self.fit_inner(batches, Some(transform), progress)
    }

    fn fit_inner(
        &self,
        batches: &mut dyn Iterator<Item = Result<FeatureMaps>>,
        transform: Option<&dyn FeatureTransform>,
        progress: &dyn Fn(TrainProgress),
    ) -> Result<Cfa> {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        self.validate()?;
        // The backbone is frozen: compute its features once, keep them (CPU) for every epoch —
        // embedded, or raw per level when a transform trains on them.
        let mut cache: Vec<Vec<Tensor>> = Vec::new();
        let mut grid = None;
        let mut device = Device::Cpu;
        let mut c = 0;
        for b in batches {
            let b = b?;
            let e = match transform {
                None => embed(&b, &self.levels)?,
                Some(t) => embed(&t.forward(&b)?, &self.levels)?.detach(),
            };
            device = e.device().clone();
            let (n, ch, h, w) = e.dims4()?;
            c = ch;
            if *grid.get_or_insert((h, w)) != (h, w) {
                return Err(Error::Config(format!(
                    "cfa: feature grid changed to {h}×{w}"
                )));
            }
            for i in 0..n {
                cache.push(match transform {
                    None => vec![e.get(i)?.to_device(&Device::Cpu)?],
                    Some(_) => b
                        .levels
                        .iter()
                        .map(|l| l.get(i)?.to_device(&Device::Cpu))
                        .collect::<candle_core::Result<_>>()?,
                });
            }
        }
        let (h, w) = grid.ok_or_else(|| Error::Config("cfa: no training images".into()))?;
        let d = (c / self.gamma_d).max(1);
        let co = coords(h, w, &device)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        // PyTorch's Conv2d initialisation: U(±1/√fan_in) for weight and bias.
        let bound = 1.0 / ((c + 2) as f64).sqrt();
        let weight = Var::from_vec(uniform(d * (c + 2), bound, &mut rng), (d, c + 2), &device)?;
        let bias = Var::from_vec(uniform(d, bound, &mut rng), d, &device)?;
        let r = Var::from_vec(vec![self.radius_init as f32], 1, &device)?;
        let batch_of = |ids: &[usize]| -> Result<Tensor> {
            let x = match transform {
                None => {
                    let xs: Vec<&Tensor> = ids.iter().map(|&i| &cache[i][0]).collect();
                    Tensor::stack(&xs, 0)?.to_device(&device)?
                }
                Some(t) => {
                    let levels = (0..cache[ids[0]].len())
                        .map(|l| {
                            let xs: Vec<&Tensor> = ids.iter().map(|&i| &cache[i][l]).collect();
                            Tensor::stack(&xs, 0)?.to_device(&device)
                        })
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    embed(&t.forward(&FeatureMaps::new(levels))?, &self.levels)?
                }
            };
            rows_with_coords(&x, &co)
        };
        // Memory bank: mean initial descriptor per location (detached: no graph across batches).
        let (w0, b0) = (weight.as_tensor().detach(), bias.as_tensor().detach());
        let mut sum: Option<Tensor> = None;
        let all: Vec<usize> = (0..cache.len()).collect();
        for ids in all.chunks(self.batch) {
            let phi = descriptor(&batch_of(ids)?.detach(), &w0, &b0)?;
            let s = phi.reshape((ids.len(), h * w, d))?.sum(0)?;
            sum = Some(match sum {
                None => s,
                Some(acc) => (acc + s)?,
            });
        }
        let mean = (sum.expect("at least one batch") / cache.len() as f64)?.detach();
        let centres = if self.gamma_c > 1 {
            let k = (h * w / self.gamma_c).max(1);
            let v: Vec<f32> = mean.flatten_all()?.to_vec1()?;
            let cen = kmeans::kmeans(&v, d, k, 30, self.seed);
            Tensor::from_vec(cen, (k, d), &device)?
        } else {
            mean
        };
        let centres_sq: Vec<f32> = centres.sqr()?.sum(D::Minus1)?.to_vec1()?;

        let extra: Vec<Var> = transform.map(|t| t.vars()).unwrap_or_default();
        let mut trained = vec![weight.clone(), bias.clone(), r.clone()];
        trained.extend(extra.iter().cloned());
        let mut opt = AdamW::new(
            trained,
            AdamWConfig {
                lr: self.lr,
                weight_decay: self.weight_decay,
                amsgrad: true,
                ..Default::default()
            },
        )?;
        let mut order: Vec<usize> = (0..cache.len()).collect();
        let mut history = Vec::with_capacity(self.epochs);
        let mut best: Option<(f64, Tensor, Tensor, Vec<Tensor>)> = None;
        let mut since_best = 0;
        let batches = order.len().div_ceil(self.batch);
        for epoch in 1..=self.epochs {
            let t0 = std::time::Instant::now();
            order.shuffle(&mut rng);
            let mut total = 0.0;
            for (bi, ids) in order.chunks(self.batch).enumerate() {
                let phi = descriptor(&batch_of(ids)?, weight.as_tensor(), bias.as_tensor())?;
                let loss = soft_boundary_loss(&phi, &centres, &centres_sq, r.as_tensor(), self)?;
                total += loss.to_scalar::<f32>()? as f64;
                opt.backward_step(&loss)?;
                progress(TrainProgress {
                    epoch,
                    epochs: self.epochs,
                    batch: bi + 1,
                    batches,
                    loss: total / (bi + 1) as f64,
                });
            }
            let loss = total / batches as f64;
            if !loss.is_finite() {
                return Err(Error::Config(format!(
                    "cfa: training diverged at epoch {epoch} (loss {loss})"
                )));
            }
            let radius = r.as_tensor().to_vec1::<f32>()?[0] as f64;
            history.push(EpochStats {
                epoch,
                loss,
                radius,
                seconds: t0.elapsed().as_secs_f64(),
            });
            if best.as_ref().is_none_or(|(b, _, _, _)| loss < *b) {
                // copy(): a Var's storage is updated in place by the optimiser.
                best = Some((
                    loss,
                    weight.as_tensor().copy()?.detach(),
                    bias.as_tensor().copy()?.detach(),
                    extra
                        .iter()
                        .map(|v| v.as_tensor().copy().map(|t| t.detach()))
                        .collect::<candle_core::Result<_>>()?,
                ));
                since_best = 0;
            } else {
                since_best += 1;
                if self.patience.is_some_and(|p| since_best >= p) {
                    break;
                }
            }
        }
        let (weight, bias) = match best {
            Some((_, w, b, x)) => {
                // The transform keeps the kept epoch's values, matching the descriptor.
                for (v, t) in extra.iter().zip(&x) {
                    v.set(t)?;
                }
                (w, b)
            }
            None => (weight.as_tensor().detach(), bias.as_tensor().detach()),
        };
        Ok(Cfa {
            config: self.clone(),
            weight,
            bias,
            centres,
            centres_sq,
            height: h,
            width: w,
            history,
        })
    }
}

impl FitScorer for CfaConfig {
    type Fitted = Cfa;
    fn fit(&self, batches: &mut dyn Iterator<Item = Result<FeatureMaps>>) -> Result<Cfa> {
        self.fit_with_progress(batches, &|_| {})
    }
}

impl Cfa {
    /// Rebuild from the tensors and config stored in a model file.
    pub fn from_parts(config: CfaConfig, tensors: HashMap<String, Tensor>) -> Result<Self> {
        config.validate()?;
        let mut t = StoredTensors::new("cfa", tensors);
        let weight = t.take("weight")?;
        let bias = t.take("bias")?;
        let centres = t.take("centres")?;
        let (height, width) = t.take_grid()?;
        let (d, _) = weight.dims2()?;
        if bias.dims() != [d] || centres.rank() != 2 || centres.dims()[1] != d {
            return Err(t.inconsistent());
        }
        let centres_sq = centres.sqr()?.sum(D::Minus1)?.to_vec1()?;
        Ok(Self {
            config,
            weight,
            bias,
            centres,
            centres_sq,
            height,
            width,
            history: Vec::new(),
        })
    }

    /// Per-epoch training record (empty for a model loaded from a file).
    pub fn history(&self) -> &[EpochStats] {
        &self.history
    }
}

impl Scorer for Cfa {
    fn kind(&self) -> &'static str {
        "cfa"
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("config serialises")
    }

    fn levels(&self) -> Vec<usize> {
        self.config.levels.clone()
    }

    fn fit_report(&self) -> serde_json::Value {
        serde_json::json!({ "epochs": self.history, "centres": self.centres.dims()[0] })
    }

    fn score(&self, features: &FeatureMaps) -> Result<RawMaps> {
        let x = embed(features, &self.config.levels)?;
        let (b, _, h, w) = x.dims4()?;
        if (h, w) != (self.height, self.width) {
            return Err(Error::Config(format!(
                "cfa model was fitted on a {}×{} feature grid, got {h}×{w}: use the model's preprocessing",
                self.height, self.width
            )));
        }
        let x = x.to_device(self.weight.device())?;
        let rows = rows_with_coords(&x, &coords(h, w, x.device())?)?;
        let phi = descriptor(&rows, &self.weight, &self.bias)?;
        let k = self.config.k;
        let (_, dist) = nearest_centres(&phi, &self.centres, &self.centres_sq, k)?;
        let k = dist.len() / (b * h * w);
        // softmin(d)[0]·d[0], with d sorted ascending: 1 / Σ exp(−(dᵢ − d₀)) · d₀.
        let data = dist
            .chunks(k)
            .map(|d| {
                let z: f32 = d.iter().map(|v| (-(v - d[0])).exp()).sum();
                d[0] / z
            })
            .collect();
        Ok(RawMaps::new(b, h, w, data))
    }

    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let grid = grid_tensor(self.height, self.width)?;
        Ok(vec![
            ("weight".into(), self.weight.clone()),
            ("bias".into(), self.bias.clone()),
            ("centres".into(), self.centres.clone()),
            ("grid".into(), grid),
        ])
    }
}
