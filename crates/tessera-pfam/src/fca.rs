//! FCAWeight: FcaNet's multi-spectral channel attention (`MultiSpectralAttentionLayer`).

use crate::dct::{effective_filters, DctSize, NUM_FREQ};
use crate::params::{Init, Source};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use tessera_core::{Error, Result};

/// FCAWeight hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FcaConfig {
    /// Bottleneck of the two fully connected layers: `C → max(1, C / reduction) → C`.
    pub reduction: usize,
    /// The DCT grid (default: the feature map's own size).
    pub dct: DctSize,
}

impl Default for FcaConfig {
    fn default() -> Self {
        Self {
            reduction: 16,
            dct: DctSize::Feature,
        }
    }
}

/// Multi-spectral channel attention on `C` channels (`C` divisible by 16): channel group `g`
/// (of 16 equal groups) is reduced over space with DCT basis `g`, giving a `C` vector `y`; the
/// output is `x · sigmoid(W₂ · relu(W₁ · y))` per channel. Parameters `fc1.weight`
/// (`C/r × C`) and `fc2.weight` (`C × C/r`), no biases.
#[derive(Debug)]
pub struct FcaWeight {
    prefix: String,
    channels: usize,
    cfg: FcaConfig,
    fc1: Tensor,
    fc2: Tensor,
    device: Device,
    /// Filters per feature size, `16 × 1 × H·W`, built on first use.
    filters: Mutex<HashMap<(usize, usize), Tensor>>,
}

impl Clone for FcaWeight {
    fn clone(&self) -> Self {
        Self {
            prefix: self.prefix.clone(),
            channels: self.channels,
            cfg: self.cfg,
            fc1: self.fc1.clone(),
            fc2: self.fc2.clone(),
            device: self.device.clone(),
            filters: Mutex::new(self.filters.lock().unwrap().clone()),
        }
    }
}

/// The checks FCAWeight's shape rules need, as a configuration error.
pub(crate) fn check_fca_channels(channels: usize, what: &str) -> Result<()> {
    if channels == 0 || !channels.is_multiple_of(NUM_FREQ) {
        return Err(Error::Config(format!(
            "{what}: FCAWeight splits channels into {NUM_FREQ} frequency groups, so the attended \
             channel count must be a positive multiple of {NUM_FREQ}; got {channels}"
        )));
    }
    Ok(())
}

impl FcaWeight {
    /// Hidden width of the bottleneck.
    pub fn hidden(channels: usize, reduction: usize) -> usize {
        (channels / reduction.max(1)).max(1)
    }

    pub(crate) fn from_source(cfg: FcaConfig, channels: usize, src: &Source) -> Result<Self> {
        check_fca_channels(channels, "fca")?;
        if cfg.reduction == 0 {
            return Err(Error::Config("fca: reduction must be ≥ 1".into()));
        }
        let hid = Self::hidden(channels, cfg.reduction);
        let fc1 = src.get(
            &[hid, channels],
            "fc1.weight",
            Init::torch_default(channels),
        )?;
        let fc2 = src.get(&[channels, hid], "fc2.weight", Init::torch_default(hid))?;
        Ok(Self {
            prefix: src.full(""),
            channels,
            cfg,
            fc1,
            fc2,
            device: src.device(),
            filters: Mutex::new(HashMap::new()),
        })
    }

    /// The DCT filters applied to an `h × w` map, `16 × h × w` (pooling to a fixed grid folded
    /// in), on the block's device.
    pub fn filters(&self, h: usize, w: usize) -> Result<Tensor> {
        if let Some(f) = self.filters.lock().unwrap().get(&(h, w)) {
            return Ok(f.clone());
        }
        let (dh, dw) = self.cfg.dct.resolve(self.channels, h, w)?;
        let f = Tensor::from_vec(
            effective_filters(h, w, dh, dw),
            (NUM_FREQ, h, w),
            &self.device,
        )?;
        self.filters.lock().unwrap().insert((h, w), f.clone());
        Ok(f)
    }

    /// The per-channel attention weights `sigmoid(W₂ relu(W₁ y))`, `B × C`.
    pub fn weights(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != self.channels {
            return Err(Error::Config(format!(
                "fca: built for {} channels, input has {c}",
                self.channels
            )));
        }
        let f = self.filters(h, w)?.reshape((NUM_FREQ, 1, h * w))?;
        let y = x
            .contiguous()?
            .reshape((b, NUM_FREQ, c / NUM_FREQ, h * w))?
            .broadcast_mul(&f)?
            .sum(3)?
            .reshape((b, c))?;
        let z = y.matmul(&self.fc1.t()?)?.relu()?.matmul(&self.fc2.t()?)?;
        Ok(candle_nn::ops::sigmoid(&z)?)
    }

    /// `x` (`B × C × H × W`) scaled per channel by its frequency attention.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, _, _) = x.dims4()?;
        let s = self.weights(x)?.reshape((b, c, 1, 1))?;
        Ok(x.broadcast_mul(&s)?)
    }

    /// The parameters with their full names (`{prefix}.fc1.weight`, `{prefix}.fc2.weight`).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            (crate::join(&self.prefix, "fc1.weight"), self.fc1.clone()),
            (crate::join(&self.prefix, "fc2.weight"), self.fc2.clone()),
        ]
    }

    /// Attended channel count.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// A copy whose parameters are detached from autograd.
    pub fn detached(&self) -> Self {
        Self {
            fc1: self.fc1.detach(),
            fc2: self.fc2.detach(),
            ..self.clone()
        }
    }
}

crate::params::block_constructors!(
    FcaWeight,
    FcaConfig,
    "with parameters `fc1.weight`, `fc2.weight`",
    "`{prefix}.fc1.weight`, `{prefix}.fc2.weight`"
);
