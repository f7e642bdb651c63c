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
            let padded = t.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
            let t = if t.track_op() {
                // Training through this: candle's avg-pool has no backward for kernel ≠
                // stride; the sum of the nine shifted windows has one.
                let (_, _, h, w) = t.dims4()?;
                let mut acc: Option<Tensor> = None;
                for dy in 0..3 {
                    for dx in 0..3 {
                        let win = padded.narrow(2, dy, h)?.narrow(3, dx, w)?;
                        acc = Some(match acc {
                            None => win,
                            Some(a) => (a + win)?,
                        });
                    }
                }
                (acc.expect("nine windows") / 9.0)?
            } else {
                padded.avg_pool2d_with_stride(3, 1)?
            };
            match parts.first() {
                None => parts.push(t),
                Some(first) => {
                    let (_, _, h, w) = first.dims4()?;
                    parts.push(if t.dims()[2..] == [h, w] {
                        t
                    } else if t.track_op() {
                        // Training through this (e.g. PFAM end to end): candle's bilinear
                        // upsampling has no backward, two interpolation matmuls do.
                        upsample_bilinear_matmul(&t, h, w)?
                    } else {
                        t.upsample_bilinear2d(h, w, false)?
                    });
                }
            }
        }
        Ok(Tensor::cat(&parts, 1)?)
    }
}

/// PyTorch's bilinear interpolation weights (`align_corners=False`) from `n_in` to `n_out`
/// samples as an `n_out × n_in` matrix.
pub fn bilinear_matrix(n_out: usize, n_in: usize) -> Vec<f32> {
    let mut m = vec![0f32; n_out * n_in];
    let scale = n_in as f64 / n_out as f64;
    for o in 0..n_out {
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let l = (src - i0 as f64) as f32;
        m[o * n_in + i0] += 1.0 - l;
        m[o * n_in + i1] += l;
    }
    m
}

/// Bilinear upsampling (`align_corners=False`) of a `B × C × H × W` tensor to `h × w` as two
/// matrix products, so that it is differentiable.
pub fn upsample_bilinear_matmul(t: &Tensor, h: usize, w: usize) -> crate::Result<Tensor> {
    let (_, _, hi, wi) = t.dims4()?;
    let dev = t.device();
    let ah = Tensor::from_vec(bilinear_matrix(h, hi), (h, hi), dev)?;
    let awt = Tensor::from_vec(bilinear_matrix(w, wi), (w, wi), dev)?.t()?;
    let x = t.contiguous()?.broadcast_matmul(&awt.contiguous()?)?; // B × C × H × w
    Ok(ah.broadcast_matmul(&x)?)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_upsampling_equals_candles_and_is_differentiable() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 7, 5), &dev).unwrap();
        for (h, w) in [(14, 10), (28, 28), (7, 5), (9, 13)] {
            let a = x.upsample_bilinear2d(h, w, false).unwrap();
            let b = upsample_bilinear_matmul(&x, h, w).unwrap();
            let d: f32 = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(d < 1e-5, "{h}×{w}: {d}");
        }
        // The differentiable local average equals the pooled one.
        let v = candle_core::Var::from_tensor(&x).unwrap();
        let small = Tensor::randn(0f32, 1., (2, 4, 4, 3), &dev).unwrap();
        let plain = FeatureMaps::new(vec![x.clone(), small.clone()]);
        let tracked = FeatureMaps::new(vec![v.as_tensor().clone(), small]);
        let a = plain.local_average_concat(&[1, 2], "t").unwrap();
        let b = tracked.local_average_concat(&[1, 2], "t").unwrap();
        let d: f32 = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-5, "local average: {d}");
        let y = upsample_bilinear_matmul(v.as_tensor(), 14, 10).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        // Each input sample spreads a total weight of (14/7)·(10/5) = 4 over the output.
        let gx: Vec<f32> = g.get(&v).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(gx.iter().all(|&v| (v - 4.0).abs() < 1e-4), "{gx:?}");
    }
}
