//! The patch descriptor: embedded features, CoordConv coordinates, the 1×1 convolution.

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use tessera_core::tensor::with_f32_slice;
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
///
/// On the CPU, when nothing is tracked by autograd, the rows are written directly in parallel
/// blocks of positions (candle's strided copy of the permuted tensor ran on one thread and
/// took 8 % of `tessera test` with CFA); otherwise candle ops, differentiable.
pub fn rows_with_coords(x: &Tensor, coords: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if tessera_core::tensor::untracked_cpu_f32(&[x, coords]) && coords.dims() == [h * w, 2] {
        return rows_direct(x, coords);
    }
    let rows = x.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?;
    let co = coords.unsqueeze(0)?.broadcast_as((b, h * w, 2))?;
    Ok(Tensor::cat(&[&rows, &co], 2)?.reshape((b * h * w, c + 2))?)
}

/// The trainable 1×1 convolution of the descriptor, as a `D × (C+2)` matrix and a bias.
pub fn descriptor(rows: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(rows.matmul(&weight.t()?)?.broadcast_add(bias)?)
}

/// Positions per parallel block of [`rows_direct`]: the block's rows (`64 × (C + 2)` floats)
/// stay in cache while each channel's 64 contiguous values are scattered into them.
const POS_BLOCK: usize = 64;

/// [`rows_with_coords`] for CPU f32 tensors outside autograd.
fn rows_direct(x: &Tensor, coords: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (hw, cw) = (h * w, c + 2);
    let (x, coords) = (x.contiguous()?, coords.contiguous()?);
    let mut out = vec![0f32; b * hw * cw];
    with_f32_slice(&x, |xs| {
        with_f32_slice(&coords, |co| {
            out.par_chunks_mut(POS_BLOCK * cw)
                .enumerate()
                .for_each(|(blk, rows)| {
                    let first = blk * POS_BLOCK;
                    let nrows = rows.len() / cw;
                    for (r, row) in rows.chunks_mut(cw).enumerate() {
                        let pos = (first + r) % hw;
                        row[c..].copy_from_slice(&co[pos * 2..pos * 2 + 2]);
                    }
                    // A block may straddle two images (when H·W is not a multiple of the
                    // block): one run of rows per image.
                    let mut r = 0;
                    while r < nrows {
                        let (img, pos) = ((first + r) / hw, (first + r) % hw);
                        let run = (hw - pos).min(nrows - r); // rows left in this image
                        let src = &xs[img * c * hw..(img + 1) * c * hw];
                        for ch in 0..c {
                            let plane = &src[ch * hw + pos..ch * hw + pos + run];
                            for (k, &v) in plane.iter().enumerate() {
                                rows[(r + k) * cw + ch] = v;
                            }
                        }
                        r += run;
                    }
                })
        })
    })??;
    Ok(Tensor::from_vec(out, (b * hw, cw), x.device())?)
}
