//! PatchCore alone, on feature tensors: a 10 % coreset memory bank, then nearest-neighbour
//! scores of normal patches and of an anomalous one.
//!
//! ```text
//! cargo run -p tessera-patchcore --example memory_bank
//! ```

use candle_core::{Device, Tensor};
use tessera_core::scorer::{FitScorer, Scorer};
use tessera_core::FeatureMaps;
use tessera_patchcore::PatchcoreConfig;

fn features(batch: usize, dev: &Device) -> tessera_core::Result<FeatureMaps> {
    Ok(FeatureMaps::new(vec![
        Tensor::randn(0f32, 1., (batch, 8, 16, 16), dev)?,
        Tensor::randn(0f32, 1., (batch, 16, 8, 8), dev)?,
        Tensor::randn(0f32, 1., (batch, 32, 4, 4), dev)?,
    ]))
}

fn main() -> tessera_core::Result<()> {
    let dev = Device::Cpu;
    let model = PatchcoreConfig::default().fit(&mut (0..6).map(|_| features(4, &dev)))?;
    let mut odd = features(2, &dev)?;
    let spike = (Tensor::ones((2, 16, 1, 1), candle_core::DType::F32, &dev)? * 10.0)?;
    odd.levels[1] = odd.levels[1].slice_assign(&[0..2, 0..16, 4..5, 4..5], &spike)?;
    let normal = model.score(&features(2, &dev)?)?;
    let anomalous = model.score(&odd)?;
    let max = |v: &[f32]| v.iter().copied().fold(f32::MIN, f32::max);
    println!(
        "bank {} patches × {} channels; max 1-NN distance: normal {:.2}, anomalous {:.2}",
        model.bank_len(),
        model.bank().dims()[1],
        max(&normal.data),
        max(&anomalous.data)
    );
    Ok(())
}
