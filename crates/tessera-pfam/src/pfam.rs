//! PFAM: the pretrained feature attentive module (paper §3.2, Fig. 2).

use crate::mfcsam::{Mfcsam, MfcsamConfig};
use crate::params::{Init, Source};
use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tessera_conv::{conv2d, ConvParams};
use tessera_core::{Error, FeatureMaps, Result};

/// Which levels PFAM transforms (the others pass through unchanged): the ablation's X1-only
/// and X3-only variants (docs/pfam.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Branches {
    /// X1 and X3, as the paper.
    #[default]
    Both,
    /// `conv1×1(X1) + MFCSAM(X1)` only; X3 passes through.
    X1,
    /// `MFCSAM(X3)` only; X1 passes through.
    X3,
}

impl Branches {
    /// The names on the command line.
    pub const NAMES: &'static [&'static str] = &["both", "x1", "x3"];

    fn x1(self) -> bool {
        self != Branches::X3
    }

    fn x3(self) -> bool {
        self != Branches::X1
    }
}

impl std::str::FromStr for Branches {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "both" => Ok(Branches::Both),
            "x1" => Ok(Branches::X1),
            "x3" => Ok(Branches::X3),
            _ => Err(Error::Config(format!(
                "pfam branches '{s}': expected both, x1 or x3"
            ))),
        }
    }
}

/// PFAM hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PfamConfig {
    /// The MFCSAM used on X1 and on X3.
    pub mfcsam: MfcsamConfig,
    /// Bias on X1's 1×1 convolution (the authors' `conv1x1` has none).
    pub x1_conv_bias: bool,
    /// Seed of the parameter initialisation.
    pub seed: u64,
    /// Which levels are transformed. Both branches' parameters exist either way (a file
    /// always holds the full set); an unused branch keeps its initial values.
    pub branches: Branches,
}

impl PfamConfig {
    /// Check the configuration against the channel counts of X1, X2, X3.
    pub fn validate(&self, channels: [usize; 3]) -> Result<()> {
        if channels.contains(&0) {
            return Err(Error::Config(format!(
                "pfam: channel counts must be positive, got {channels:?}"
            )));
        }
        self.mfcsam.validate(channels[0])?;
        self.mfcsam.validate(channels[2])
    }
}

/// PFAM on three feature levels with channel counts `[C1, C2, C3]`:
/// `X1 → conv1×1(X1) + MFCSAM(X1)`, `X2 → X2`, `X3 → MFCSAM(X3)`; channel counts and sizes are
/// preserved. Parameters (under the prefix): `x1_conv.weight` (`C1 × C1 × 1 × 1`; plus
/// `x1_conv.bias` when configured), `mfcsam1.*`, `mfcsam3.*` (see [`Mfcsam`]).
#[derive(Debug, Clone)]
pub struct Pfam {
    prefix: String,
    channels: [usize; 3],
    cfg: PfamConfig,
    x1_weight: Tensor,
    x1_bias: Option<Tensor>,
    mfcsam1: Mfcsam,
    mfcsam3: Mfcsam,
}

impl Pfam {
    fn from_source(cfg: PfamConfig, channels: [usize; 3], src: &Source) -> Result<Self> {
        cfg.validate(channels)?;
        let c1 = channels[0];
        let init = Init::torch_default(c1);
        let x1_weight = src.get(&[c1, c1, 1, 1], "x1_conv.weight", init)?;
        let x1_bias = if cfg.x1_conv_bias {
            Some(src.get(&[c1], "x1_conv.bias", init)?)
        } else {
            None
        };
        let mfcsam1 = Mfcsam::from_source(cfg.mfcsam.clone(), c1, &src.pp("mfcsam1"))?;
        let mfcsam3 = Mfcsam::from_source(cfg.mfcsam.clone(), channels[2], &src.pp("mfcsam3"))?;
        Ok(Self {
            prefix: src.full(""),
            channels,
            cfg,
            x1_weight,
            x1_bias,
            mfcsam1,
            mfcsam3,
        })
    }

    /// A trainable PFAM whose parameters are `Var`s of `vb` (names under `vb`'s prefix, e.g.
    /// `vb.pp("pfam")` → `pfam.x1_conv.weight`). Parameters the builder's `VarMap` already holds
    /// are used as they are (resuming); missing ones are created with PyTorch's default
    /// initialisation (uniform ±1/√fan_in for weights and biases, α = 0) from a ChaCha8 RNG seeded
    /// with `cfg.seed`.
    pub fn new(cfg: PfamConfig, channels: [usize; 3], vb: VarBuilder) -> Result<Self> {
        let seed = cfg.seed;
        Self::from_source(cfg, channels, &Source::from_vb(vb, seed))
    }

    /// A PFAM from saved tensors named `{prefix}.x1_conv.weight`, … (as [`Pfam::tensors`] wrote
    /// them), on `device`. A missing or mis-shaped tensor, or one under the prefix that this
    /// configuration does not use, is an error naming it. The parameters are plain tensors (no
    /// autograd): the memory-bounded inference path.
    pub fn load(
        tensors: &HashMap<String, Tensor>,
        prefix: &str,
        cfg: PfamConfig,
        channels: [usize; 3],
        device: &Device,
    ) -> Result<Self> {
        let src = Source::from_tensors(tensors, prefix, device);
        let m = Self::from_source(cfg, channels, &src)?;
        src.check_no_extra()?;
        Ok(m)
    }

    /// Every parameter with its full name, to save (values are current: they share storage
    /// with the `Var`s being trained).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            crate::join(&self.prefix, "x1_conv.weight"),
            self.x1_weight.clone(),
        )];
        if let Some(b) = &self.x1_bias {
            out.push((crate::join(&self.prefix, "x1_conv.bias"), b.clone()));
        }
        out.extend(self.mfcsam1.tensors());
        out.extend(self.mfcsam3.tensors());
        out
    }

    /// `[X1, X2, X3]` → `[conv1×1(X1) + MFCSAM(X1), X2, MFCSAM(X3)]` (a branch left out by
    /// [`PfamConfig::branches`] passes its level through).
    pub fn forward(&self, features: &FeatureMaps) -> Result<FeatureMaps> {
        if features.levels.len() != 3 {
            return Err(Error::Config(format!(
                "pfam needs exactly 3 feature levels (X1, X2, X3), got {}",
                features.levels.len()
            )));
        }
        for (l, (t, &c)) in features.levels.iter().zip(&self.channels).enumerate() {
            let dims = t.dims();
            if dims.len() != 4 || dims[1] != c {
                return Err(Error::Config(format!(
                    "pfam was built for channels {:?}; level X{} has shape {dims:?} (NCHW)",
                    self.channels,
                    l + 1
                )));
            }
        }
        let [x1, x2, x3] = [0, 1, 2].map(|i| &features.levels[i]);
        let y1 = if self.cfg.branches.x1() {
            let conv = conv2d(
                x1,
                &self.x1_weight,
                self.x1_bias.as_ref(),
                ConvParams::default(),
                false,
            )?;
            (conv + self.mfcsam1.forward(x1)?)?
        } else {
            x1.clone()
        };
        let y3 = if self.cfg.branches.x3() {
            self.mfcsam3.forward(x3)?
        } else {
            x3.clone()
        };
        Ok(FeatureMaps::new(vec![y1, x2.clone(), y3]))
    }

    /// A copy whose parameters are detached from autograd: use it for inference with a model
    /// being trained, so that attention chunks are freed as soon as they are used. (A model from
    /// [`Pfam::load`] already is.)
    pub fn detached(&self) -> Self {
        Self {
            prefix: self.prefix.clone(),
            channels: self.channels,
            cfg: self.cfg.clone(),
            x1_weight: self.x1_weight.detach(),
            x1_bias: self.x1_bias.as_ref().map(|b| b.detach()),
            mfcsam1: self.mfcsam1.detached(),
            mfcsam3: self.mfcsam3.detached(),
        }
    }

    /// Set the attention chunk (query rows per step) of every position attention; `None`
    /// computes the full `N × N` at once. Outputs do not depend on it.
    pub fn set_chunk(&mut self, chunk: Option<usize>) -> Result<()> {
        self.mfcsam1.set_chunk(chunk)?;
        self.mfcsam3.set_chunk(chunk)?;
        self.cfg.mfcsam.pam.chunk = chunk;
        Ok(())
    }

    /// Every position attention's products in bf16 (sums in f32) where the CPU has native
    /// bf16 dot products ([`crate::PositionAttention::set_bf16_products`]); an inference
    /// setting, saved nowhere.
    pub fn set_bf16_products(&mut self, on: bool) {
        self.mfcsam1.set_bf16_products(on);
        self.mfcsam3.set_bf16_products(on);
    }

    /// The configuration.
    pub fn config(&self) -> &PfamConfig {
        &self.cfg
    }

    /// Channel counts of X1, X2, X3.
    pub fn channels(&self) -> [usize; 3] {
        self.channels
    }

    /// The name prefix of the parameters.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The MFCSAM on X1.
    pub fn mfcsam1(&self) -> &Mfcsam {
        &self.mfcsam1
    }

    /// The MFCSAM on X3.
    pub fn mfcsam3(&self) -> &Mfcsam {
        &self.mfcsam3
    }
}
