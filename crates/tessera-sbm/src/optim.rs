//! The optimisers of one SBM run, behind one small trait so checkpoints can save their state.

use crate::nets::Nets;
use crate::{OptimizerKind, SbmConfig};
use candle_core::{Tensor, Var};
use candle_nn::Optimizer;
use std::collections::HashMap;
use tessera_core::Result;
use tessera_optim::{AdamW, AdamWConfig, Sgd, SgdConfig};

pub(crate) struct Optimizers {
    pub(crate) bb: Option<Box<dyn StatefulOpt>>,
    pub(crate) pfam: Option<Box<dyn StatefulOpt>>,
    pub(crate) head: Box<dyn StatefulOpt>,
}

pub(crate) trait StatefulOpt {
    fn step(&mut self, g: &candle_core::backprop::GradStore) -> candle_core::Result<()>;
    fn state(&self) -> Result<Vec<(String, Tensor)>>;
    fn load(&mut self, t: &HashMap<String, Tensor>) -> Result<()>;
}

impl StatefulOpt for Sgd {
    fn step(&mut self, g: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
        Optimizer::step(self, g)
    }
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.state_tensors())
    }
    fn load(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        Ok(self.load_state_tensors(t)?)
    }
}

impl StatefulOpt for AdamW {
    fn step(&mut self, g: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
        Optimizer::step(self, g)
    }
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.state_tensors()?)
    }
    fn load(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        Ok(self.load_state_tensors(t)?)
    }
}

fn make_opt(c: &SbmConfig, vars: Vec<Var>, lr: f64) -> Result<Box<dyn StatefulOpt>> {
    Ok(match c.optimizer {
        OptimizerKind::Sgd => Box::new(Sgd::new(
            vars,
            SgdConfig {
                lr,
                momentum: c.momentum,
                dampening: 0.0,
                weight_decay: c.weight_decay,
                nesterov: c.momentum > 0.0,
            },
        )?),
        OptimizerKind::Adamw => Box::new(AdamW::new(
            vars,
            AdamWConfig {
                lr,
                weight_decay: c.weight_decay,
                ..Default::default()
            },
        )?),
    })
}

impl Optimizers {
    /// One optimiser per parameter group (backbone, PFAM, head), each with its learning rate;
    /// none for a group that does not train.
    pub(crate) fn new(c: &SbmConfig, nets: &Nets) -> Result<Self> {
        Ok(Self {
            pfam: if nets.pfam_vars.is_empty() {
                None
            } else {
                Some(make_opt(
                    c,
                    nets.pfam_vars.iter().map(|(_, v)| v.clone()).collect(),
                    c.lr_pfam,
                )?)
            },
            bb: if c.lr_backbone > 0.0 && !nets.vars.is_empty() {
                Some(make_opt(
                    c,
                    nets.vars.iter().map(|(_, v)| v.clone()).collect(),
                    c.lr_backbone,
                )?)
            } else {
                None
            },
            head: make_opt(c, nets.head.vars(), c.lr_head)?,
        })
    }

    /// One step of every optimiser.
    pub(crate) fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        if let Some(o) = self.bb.as_mut() {
            o.step(grads)?;
        }
        if let Some(o) = self.pfam.as_mut() {
            o.step(grads)?;
        }
        Ok(self.head.step(grads)?)
    }
}
