//! Extract layer1..3 features with a ResNet-18 and time it.
//!
//! ```text
//! cargo run --release -p tessera-backbone --example features -- [WEIGHTS.safetensors]
//! ```
//!
//! Without a weights file the network is seeded random (the shapes and the speed are the same).

use candle_core::{DType, Device, Tensor};
use std::time::Instant;
use tessera_backbone::{Arch, Backbone, WeightsSource};

fn main() -> tessera_core::Result<()> {
    let source = match std::env::args().nth(1) {
        Some(p) => WeightsSource::File(p.into()),
        None => WeightsSource::Random { seed: 0 },
    };
    let dev = Device::Cpu;
    let net = Backbone::load(Arch::ResNet18, &source, 3, &dev)?;
    let x = Tensor::zeros((2, 3, 224, 224), DType::F32, &dev)?;
    net.forward(&x)?; // warm-up: packs the weights once
    let t = Instant::now();
    let f = net.forward(&x)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    for (i, l) in f.levels.iter().enumerate() {
        println!("layer{}: {:?}", i + 1, l.dims());
    }
    println!(
        "{} ({}): {ms:.1} ms for a batch of 2",
        net.arch_name(),
        source.describe()
    );
    Ok(())
}
