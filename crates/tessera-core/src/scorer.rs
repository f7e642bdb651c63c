//! The trait every scorer implements (PaDiM, PatchCore, CFA).
//!
//! A scorer's *configuration* is a separate type that is validated and then fitted on training
//! features ([`FitScorer::fit`]); only the fitted [`Scorer`] can score. A scorer returns raw maps
//! on its own feature grid; [`crate::postprocess`] upsamples and blurs them the same way for all.

use crate::{FeatureMaps, Result};
use candle_core::Tensor;

/// Raw anomaly scores for a batch on the scorer's feature grid, row-major `batch × height × width`.
#[derive(Debug, Clone, PartialEq)]
pub struct RawMaps {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
    /// Image scores set by the scorer, one per image (PatchCore's reweighting); `None` means
    /// the maximum of each final map.
    pub image_scores: Option<Vec<f32>>,
}

impl RawMaps {
    /// Maps whose image scores are the maxima of the final maps.
    pub fn new(batch: usize, height: usize, width: usize, data: Vec<f32>) -> Self {
        Self {
            batch,
            height,
            width,
            data,
            image_scores: None,
        }
    }

    /// The map of image `i`.
    pub fn image(&self, i: usize) -> &[f32] {
        let n = self.height * self.width;
        &self.data[i * n..(i + 1) * n]
    }
}

/// A fitted scorer.
pub trait Scorer: Send + Sync {
    /// Short name stored in model files: `padim`, `patchcore`, `cfa`.
    fn kind(&self) -> &'static str;
    /// The configuration it was fitted with, as JSON (stored in the model file).
    fn config(&self) -> serde_json::Value;
    /// Which backbone levels (1-based) the scorer consumes.
    fn levels(&self) -> Vec<usize>;
    /// Score a batch of features: raw maps on the scorer's grid.
    fn score(&self, features: &FeatureMaps) -> Result<RawMaps>;
    /// The fitted state as named tensors (stored under `scorer.` in the model file).
    fn tensors(&self) -> Result<Vec<(String, Tensor)>>;
    /// Facts about the fit worth reporting (e.g. stage timings), as JSON; `null` by default.
    fn fit_report(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// σ of the Gaussian blur applied after upsampling, in input pixels (4 for all three).
    fn blur_sigma(&self) -> f32 {
        4.0
    }
}

/// A fitted scorer that describes itself: its kind (the name stored in model files), its
/// configuration type, and how to rebuild it from what it stored. A model file names the kind
/// and holds the configuration and the tensors; [`Restore::restore`] is the inverse of
/// [`Scorer::config`] + [`Scorer::tensors`].
pub trait Restore: Scorer + Sized + 'static {
    /// The name stored in model files (`padim`, `patchcore`, `cfa`).
    const KIND: &'static str;
    /// The hyper-parameters, as stored in model files.
    type Config: serde::Serialize + serde::de::DeserializeOwned + Clone + std::fmt::Debug;
    /// Rebuild the fitted scorer from its configuration and its stored tensors (names without
    /// the `scorer.` prefix). Every tensor is checked for shape and range: a model file is
    /// input, and a bad one must give an error, never a panic or a wrong score.
    fn restore(
        config: Self::Config,
        tensors: std::collections::HashMap<String, Tensor>,
    ) -> Result<Self>;
}

/// A validated scorer configuration that can be fitted on streamed training features.
pub trait FitScorer {
    /// The fitted scorer.
    type Fitted: Scorer;
    /// Fit on batches of training features (streamed, so the caller controls memory).
    fn fit(&self, batches: &mut dyn Iterator<Item = Result<FeatureMaps>>) -> Result<Self::Fitted>;
}

/// A fitted scorer's tensors as read back from a model file, with errors that name the scorer.
#[derive(Debug)]
pub struct StoredTensors {
    kind: &'static str,
    tensors: std::collections::HashMap<String, Tensor>,
}

impl StoredTensors {
    /// Wrap the `scorer.*` tensors of a `kind` model.
    pub fn new(kind: &'static str, tensors: std::collections::HashMap<String, Tensor>) -> Self {
        Self { kind, tensors }
    }

    /// Take a tensor, or fail naming the scorer and the tensor.
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        self.tensors.remove(name).ok_or_else(|| {
            crate::Error::Config(format!("{} model lacks tensor '{name}'", self.kind))
        })
    }

    /// Take the feature grid (`grid`: height, width) written by [`grid_tensor`].
    pub fn take_grid(&mut self) -> Result<(usize, usize)> {
        let g: Vec<u32> = self
            .take("grid")?
            .to_dtype(candle_core::DType::U32)?
            .to_vec1()?;
        match g[..] {
            [h, w] if h > 0 && w > 0 => Ok((h as usize, w as usize)),
            _ => Err(crate::Error::Config(format!(
                "{} model has a bad grid tensor {g:?}",
                self.kind
            ))),
        }
    }

    /// An error for tensors whose shapes do not fit together.
    pub fn inconsistent(&self) -> crate::Error {
        crate::Error::Config(format!(
            "{} model tensors have inconsistent shapes",
            self.kind
        ))
    }
}

/// The feature grid as a model-file tensor (`grid`: two u32, height then width).
pub fn grid_tensor(height: usize, width: usize) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        vec![height as u32, width as u32],
        2,
        &candle_core::Device::Cpu,
    )?)
}
