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

    /// Level `l` (1-based), or an error naming the scorer that needs it.
    pub fn level(&self, l: usize, who: &str) -> crate::Result<&Tensor> {
        self.levels.get(l.wrapping_sub(1)).ok_or_else(|| {
            crate::Error::Config(format!(
                "{who} needs backbone level {l}, features have {}",
                self.levels.len()
            ))
        })
    }

    /// Locally aware patch features, as PatchCore and CFA build them: every chosen level
    /// averaged over 3×3 neighbourhoods (`avg_pool2d(3, 1, 1)`: zero padding, divisor 9), deeper
    /// levels upsampled bilinearly (`align_corners=False`) to the first level's grid, and
    /// concatenated along channels. `B × ΣC × H × W`.
    pub fn local_average_concat(&self, levels: &[usize], who: &str) -> crate::Result<Tensor> {
        let mut parts: Vec<Tensor> = Vec::with_capacity(levels.len());
        for &l in levels {
            let t = self.level(l, who)?;
            let t = t
                .pad_with_zeros(2, 1, 1)?
                .pad_with_zeros(3, 1, 1)?
                .avg_pool2d_with_stride(3, 1)?;
            match parts.first() {
                None => parts.push(t),
                Some(first) => {
                    let (_, _, h, w) = first.dims4()?;
                    parts.push(if t.dims()[2..] == [h, w] {
                        t
                    } else {
                        t.upsample_bilinear2d(h, w, false)?
                    });
                }
            }
        }
        Ok(Tensor::cat(&parts, 1)?)
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
