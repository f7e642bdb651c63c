//! Training CFA's descriptor (optionally end to end with a feature transform such as PFAM).

use crate::partition::Partition;
use crate::step::{descriptor_backward, descriptor_forward, soft_boundary_grad_in};
use crate::{
    coords, descriptor, embed, kmeans, rows_with_coords, soft_boundary_loss, Cfa, CfaConfig,
};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::Optimizer;
use serde::{Deserialize, Serialize};
use tessera_core::scorer::FitScorer;
use tessera_core::tensor::with_f32_slice;
use tessera_core::{Error, FeatureMaps, Result};
use tessera_optim::{AdamW, AdamWConfig};

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
        let host: Option<Vec<f32>> = match centres.device() {
            Device::Cpu if centres.dtype() == DType::F32 => Some(centres.flatten_all()?.to_vec1()?),
            _ => None,
        };
        // One centre per position: the search skips tiles of the bank by a distance bound.
        let partition = host
            .as_deref()
            .filter(|_| self.gamma_c == 1)
            .and_then(|cs| Partition::by_position(cs, &centres_sq, d, (h, w)));
        let bank = Bank {
            centres: &centres,
            centres_sq: &centres_sq,
            host,
            partition,
            scratch: Default::default(),
        };

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
                let rows = batch_of(ids)?;
                total += self.step(&rows, &weight, &bias, &r, &bank, &mut opt)?;
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
            partition: Default::default(),
        })
    }
}

/// The memory bank as the training step reads it.
struct Bank<'a> {
    centres: &'a Tensor,
    centres_sq: &'a [f32],
    /// The centres as host floats, when they are CPU f32 (the fused step's input).
    host: Option<Vec<f32>>,
    /// Their grouping by position, for the bounded search.
    partition: Option<Partition>,
    /// The fused step's buffers, kept across steps.
    scratch: std::cell::RefCell<Scratch>,
}

#[derive(Default)]
struct Scratch {
    phi: Vec<f32>,
    dphi: Vec<f32>,
}

impl CfaConfig {
    /// One optimiser step on a batch of descriptor input rows; returns the batch's loss.
    ///
    /// On the CPU in f32 the loss and `∂L/∂φ` come from the fused pass
    /// ([`crate::soft_boundary_grad`], with the bank's partition when it has one).
    /// When the rows carry no gradient (no trainable transform before the descriptor), the
    /// descriptor's product and its parameter gradients are computed directly as well and handed
    /// to the optimiser; otherwise `∂L/∂φ` is pushed through candle's graph (`Σ φ ⊙ ∂L/∂φ`
    /// has the loss's gradient in every variable upstream of `φ`). Elsewhere: the tensor form.
    fn step(
        &self,
        rows: &Tensor,
        weight: &Var,
        bias: &Var,
        r: &Var,
        bank: &Bank,
        opt: &mut AdamW,
    ) -> Result<f64> {
        let fused = bank
            .host
            .as_deref()
            .filter(|_| rows.device().is_cpu() && rows.dtype() == DType::F32);
        let Some(centres) = fused else {
            let phi = descriptor(rows, weight.as_tensor(), bias.as_tensor())?;
            return self.tensor_step(&phi, r, bank, opt);
        };
        let (d, cin) = weight.as_tensor().dims2()?;
        let rv = r.as_tensor().to_vec1::<f32>()?[0];
        let mut scratch = bank.scratch.borrow_mut();
        let Scratch { phi: pv, dphi } = &mut *scratch;
        if !rows.track_op() {
            let w: Vec<f32> = weight.as_tensor().flatten_all()?.to_vec1()?;
            let b: Vec<f32> = bias.as_tensor().to_vec1()?;
            let fused = with_f32_slice(&rows.contiguous()?, |xs| {
                descriptor_forward(xs, cin, &w, &b, pv);
                let part = bank.partition.as_ref();
                soft_boundary_grad_in(pv, d, centres, bank.centres_sq, part, rv, self, dphi).map(
                    |lg| {
                        let (dw, db) = descriptor_backward(dphi, d, xs, cin);
                        (lg, dw, db)
                    },
                )
            })?;
            if let Some((lg, dw, db)) = fused {
                let dev = weight.device();
                let mut grads = GradStore::default();
                grads.insert(weight.as_tensor(), Tensor::from_vec(dw, (d, cin), dev)?);
                grads.insert(bias.as_tensor(), Tensor::from_vec(db, d, dev)?);
                grads.insert(r.as_tensor(), Tensor::from_vec(vec![lg.dr], 1, dev)?);
                opt.step(&grads)?;
                return Ok(lg.loss as f64);
            }
        }
        let phi = descriptor(rows, weight.as_tensor(), bias.as_tensor())?;
        let lg = with_f32_slice(&phi.contiguous()?, |ps| {
            let part = bank.partition.as_ref();
            soft_boundary_grad_in(ps, d, centres, bank.centres_sq, part, rv, self, dphi)
        })?;
        let Some(lg) = lg else {
            return self.tensor_step(&phi, r, bank, opt);
        };
        let g = Tensor::from_slice(dphi, phi.dims(), phi.device())?;
        let surrogate = ((&phi * &g)?.sum_all()? + (r.as_tensor() * lg.dr as f64)?.sum_all()?)?;
        opt.backward_step(&surrogate)?;
        Ok(lg.loss as f64)
    }

    /// The step in tensor form: [`soft_boundary_loss`] and candle's autograd.
    fn tensor_step(&self, phi: &Tensor, r: &Var, bank: &Bank, opt: &mut AdamW) -> Result<f64> {
        let loss = soft_boundary_loss(phi, bank.centres, bank.centres_sq, r.as_tensor(), self)?;
        opt.backward_step(&loss)?;
        Ok(loss.to_scalar::<f32>()? as f64)
    }
}

impl FitScorer for CfaConfig {
    type Fitted = Cfa;
    fn fit(&self, batches: &mut dyn Iterator<Item = Result<FeatureMaps>>) -> Result<Cfa> {
        self.fit_with_progress(batches, &|_| {})
    }
}
