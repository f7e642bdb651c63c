//! The patch descriptor: embedded features, CoordConv coordinates, the 1×1 convolution.

use candle_core::{Device, Tensor};
use tessera_core::{FeatureMaps, Result};

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
