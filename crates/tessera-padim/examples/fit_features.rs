//! PaDiM alone, on feature tensors (no backbone, no images): fit on "normal" features, then
//! score normal features and features with an anomalous patch.
//!
//! ```text
//! cargo run -p tessera-padim --example fit_features
//! ```

use candle_core::{Device, Tensor};
use tessera_core::scorer::{FitScorer, Scorer};
use tessera_core::FeatureMaps;
use tessera_padim::PadimConfig;

fn features(batch: usize, shift: f64, dev: &Device) -> tessera_core::Result<FeatureMaps> {
    let l1 = (Tensor::randn(0f32, 1., (batch, 16, 8, 8), dev)? + shift)?;
    let l2 = Tensor::randn(0f32, 1., (batch, 32, 4, 4), dev)?;
    Ok(FeatureMaps::new(vec![l1, l2]))
}

fn main() -> tessera_core::Result<()> {
    let dev = Device::Cpu;
    let cfg = PadimConfig {
        dims: Some(24),
        levels: vec![1, 2],
        ..Default::default()
    };
    let model = cfg.fit(&mut (0..8).map(|_| features(8, 0.0, &dev)))?;
    let normal = model.score(&features(4, 0.0, &dev)?)?;
    // An anomaly: one patch of level 1 shifted far from the normal distribution.
    let mut odd = features(4, 0.0, &dev)?;
    let patch = (Tensor::ones((4, 16, 2, 2), candle_core::DType::F32, &dev)? * 6.0)?;
    odd.levels[0] = odd.levels[0].slice_assign(&[0..4, 0..16, 3..5, 3..5], &patch)?;
    let anomalous = model.score(&odd)?;
    let max = |v: &[f32]| v.iter().copied().fold(f32::MIN, f32::max);
    println!(
        "grid {}×{}, {} channels kept; max Mahalanobis distance: normal {:.2}, with an anomalous patch {:.2}",
        normal.height,
        normal.width,
        model.dims(),
        max(&normal.data),
        max(&anomalous.data)
    );
    Ok(())
}
