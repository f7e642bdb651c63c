//! # tessera-optim
//!
//! Optimisers candle 0.11 lacks, written to follow PyTorch's update rules exactly (checked
//! against PyTorch goldens over several steps), as `candle_nn::Optimizer`s:
//!
//! - [`AdamW`] with optional AMSGrad — `torch.optim.AdamW(amsgrad=…)`;
//! - [`Sgd`] with momentum, dampening, Nesterov and (coupled) weight decay — `torch.optim.SGD`.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use candle_nn::Optimizer;
//! use tessera_optim::{AdamW, AdamWConfig};
//! let w = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
//! let mut opt = AdamW::new(vec![w.clone()], AdamWConfig { lr: 0.1, amsgrad: true, ..Default::default() })?;
//! for _ in 0..3 {
//!     let loss = w.as_tensor().sqr()?.sum_all()?;
//!     opt.backward_step(&loss)?;
//! }
//! let v: Vec<f32> = w.as_tensor().to_vec1()?;
//! assert!(v[0] < 1.0 && v[1] > -2.0);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use std::collections::HashMap;

/// AdamW hyper-parameters (PyTorch's defaults, except `weight_decay` which PyTorch defaults to
/// 0.01 as well).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Use the running maximum of the second moment (Reddi et al.).
    pub amsgrad: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            amsgrad: false,
        }
    }
}

struct AdamState {
    var: Var,
    m: Tensor,
    v: Tensor,
    v_max: Tensor,
}

/// AdamW (decoupled weight decay) with optional AMSGrad, as `torch.optim.AdamW`.
pub struct AdamW {
    cfg: AdamWConfig,
    state: Vec<AdamState>,
    step: usize,
}

impl AdamW {
    /// The number of steps taken.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// The optimiser state (moments and step count) as named tensors, to checkpoint training.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "step".to_string(),
            Tensor::new(&[self.step as f32], &self.device())?,
        )];
        for (i, s) in self.state.iter().enumerate() {
            out.push((format!("{i}.m"), s.m.clone()));
            out.push((format!("{i}.v"), s.v.clone()));
            out.push((format!("{i}.v_max"), s.v_max.clone()));
        }
        Ok(out)
    }

    /// Restore a state written by [`AdamW::state_tensors`] for the same variables.
    pub fn load_state_tensors(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        let step = get(t, "step")?.to_vec1::<f32>()?;
        self.step = step.first().copied().unwrap_or(0.0) as usize;
        for (i, s) in self.state.iter_mut().enumerate() {
            s.m = get_like(t, &format!("{i}.m"), s.var.as_tensor())?;
            s.v = get_like(t, &format!("{i}.v"), s.var.as_tensor())?;
            s.v_max = get_like(t, &format!("{i}.v_max"), s.var.as_tensor())?;
        }
        Ok(())
    }

    fn device(&self) -> candle_core::Device {
        self.state
            .first()
            .map(|s| s.var.device().clone())
            .unwrap_or(candle_core::Device::Cpu)
    }
}

fn get<'a>(t: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    t.get(name)
        .ok_or_else(|| candle_core::Error::Msg(format!("optimiser state has no tensor '{name}'")))
}

fn get_like(t: &HashMap<String, Tensor>, name: &str, like: &Tensor) -> Result<Tensor> {
    let x = get(t, name)?;
    if x.shape() != like.shape() {
        candle_core::bail!(
            "optimiser state '{name}' has shape {:?}, the variable {:?}",
            x.shape(),
            like.shape()
        );
    }
    x.to_device(like.device())?.to_dtype(like.dtype())
}

impl candle_nn::Optimizer for AdamW {
    type Config = AdamWConfig;

    fn new(vars: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        let state = vars
            .into_iter()
            .filter(|v| v.dtype().is_float())
            .map(|var| {
                let z = var.zeros_like()?;
                Ok(AdamState {
                    m: z.clone(),
                    v: z.clone(),
                    v_max: z,
                    var,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg,
            state,
            step: 0,
        })
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for s in self.state.iter_mut() {
            let Some(g) = grads.get(&s.var) else { continue };
            // Detached: optimiser state must never hold on to the step's autograd graph.
            let g = &g.detach();
            let p = s.var.as_tensor().detach();
            let p = (p * (1.0 - c.lr * c.weight_decay))?;
            s.m = ((&s.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            s.v = ((&s.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let second = if c.amsgrad {
                s.v_max = s.v_max.maximum(&s.v)?;
                &s.v_max
            } else {
                &s.v
            };
            let denom = ((second.sqrt()? / bc2.sqrt())? + c.eps)?;
            let upd = ((&s.m / denom)? * (c.lr / bc1))?;
            s.var.set(&(p - upd)?)?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
}

/// SGD hyper-parameters, as `torch.optim.SGD`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    /// L2 penalty added to the gradient (PyTorch's coupled weight decay).
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: true,
        }
    }
}

/// SGD with momentum / Nesterov, as `torch.optim.SGD` (the first step seeds the buffer with the
/// gradient, as PyTorch does).
pub struct Sgd {
    cfg: SgdConfig,
    state: Vec<(Var, Option<Tensor>)>,
}

impl Sgd {
    /// The momentum buffers as named tensors (absent before the first step), to checkpoint
    /// training.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.state
            .iter()
            .enumerate()
            .filter_map(|(i, (_, b))| b.as_ref().map(|b| (format!("{i}.momentum"), b.clone())))
            .collect()
    }

    /// Restore buffers written by [`Sgd::state_tensors`] for the same variables.
    pub fn load_state_tensors(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        for (i, (var, buf)) in self.state.iter_mut().enumerate() {
            let name = format!("{i}.momentum");
            *buf = if t.contains_key(&name) {
                Some(get_like(t, &name, var.as_tensor())?)
            } else {
                None
            };
        }
        Ok(())
    }
}

impl candle_nn::Optimizer for Sgd {
    type Config = SgdConfig;

    fn new(vars: Vec<Var>, cfg: SgdConfig) -> Result<Self> {
        if cfg.nesterov && (cfg.momentum <= 0.0 || cfg.dampening != 0.0) {
            candle_core::bail!("Nesterov momentum requires a momentum and zero dampening");
        }
        Ok(Self {
            cfg,
            state: vars
                .into_iter()
                .filter(|v| v.dtype().is_float())
                .map(|v| (v, None))
                .collect(),
        })
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let c = self.cfg;
        for (var, buf) in self.state.iter_mut() {
            let Some(g) = grads.get(var) else { continue };
            let (g, p) = (g.detach(), var.as_tensor().detach());
            let mut d = if c.weight_decay != 0.0 {
                (&g + (&p * c.weight_decay)?)?
            } else {
                g
            };
            if c.momentum != 0.0 {
                let b = match buf.take() {
                    None => d.clone(),
                    Some(b) => ((b * c.momentum)? + (&d * (1.0 - c.dampening))?)?,
                };
                d = if c.nesterov {
                    (d + (&b * c.momentum)?)?
                } else {
                    b.clone()
                };
                *buf = Some(b);
            }
            var.set(&(p - (d * c.lr)?)?)?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
}
