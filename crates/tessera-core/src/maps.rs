//! Feature maps and anomaly maps.

use candle_core::Tensor;

/// Multi-level backbone features for a batch, finest level first: the paper's X1, X2, X3, each
/// `B × C_k × H_k × W_k` (NCHW).
#[derive(Debug, Clone)]
pub struct FeatureMaps {
    /// One tensor per level.
    pub levels: Vec<Tensor>,
}

impl FeatureMaps {
    /// Wrap per-level tensors.
    pub fn new(levels: Vec<Tensor>) -> Self {
        Self { levels }
    }
    /// Batch size (0 when empty).
    pub fn batch(&self) -> usize {
        self.levels.first().map(|t| t.dims()[0]).unwrap_or(0)
    }
    /// Channel count of each level.
    pub fn channels(&self) -> Vec<usize> {
        self.levels.iter().map(|t| t.dims()[1]).collect()
    }
}

/// A per-pixel anomaly score map, row-major `height × width`.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyMap {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
    /// An image score set by the scorer (PatchCore's optional k-NN reweighting); `None` means
    /// the maximum of the map.
    pub score: Option<f32>,
}

impl AnomalyMap {
    /// A map whose image score is its maximum.
    pub fn new(width: usize, height: usize, data: Vec<f32>) -> Self {
        Self {
            width,
            height,
            data,
            score: None,
        }
    }
    /// The maximum of the map.
    pub fn max(&self) -> f32 {
        self.data.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }
    /// The image-level score: the scorer's when it set one, else the maximum of the map (as
    /// PaDiM, PatchCore and CFA do).
    pub fn image_score(&self) -> f32 {
        self.score.unwrap_or_else(|| self.max())
    }
}
