//! CFA alone, on feature tensors: train the patch descriptor for a few epochs and watch the
//! coupled-hypersphere loss fall.
//!
//! ```text
//! cargo run -p tessera-cfa --example train
//! ```

use candle_core::{Device, Tensor};
use tessera_cfa::CfaConfig;
use tessera_core::scorer::Scorer;
use tessera_core::FeatureMaps;

fn main() -> tessera_core::Result<()> {
    let dev = Device::Cpu;
    let batch = |i: u64| -> tessera_core::Result<FeatureMaps> {
        let base = (i as f64 * 0.01).sin();
        Ok(FeatureMaps::new(vec![
            (Tensor::randn(0f32, 0.3, (2, 8, 8, 8), &dev)? + base)?,
            Tensor::randn(0f32, 0.3, (2, 8, 4, 4), &dev)?,
            Tensor::randn(0f32, 0.3, (2, 8, 2, 2), &dev)?,
        ]))
    };
    let cfg = CfaConfig {
        epochs: 5,
        ..Default::default()
    };
    let model = cfg.fit_with_progress(&mut (0..6).map(batch), &|_| {})?;
    for e in model.history() {
        println!(
            "epoch {}: loss {:.4}, radius {:.5}",
            e.epoch, e.loss, e.radius
        );
    }
    let raw = model.score(&batch(99)?)?;
    println!(
        "scored a batch: {}×{}×{} raw map",
        raw.batch, raw.height, raw.width
    );
    Ok(())
}
