use candle_core::{Device, Tensor};
use std::time::Instant;
use tessera_backbone::{Arch, Backbone, WeightsSource};
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let arch = if a.get(1).map(|s| s.as_str()) == Some("wrn") {
        Arch::WideResNet50_2
    } else {
        Arch::ResNet18
    };
    let b: usize = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let reps: usize = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    let dev = Device::Cpu;
    let net = Backbone::load(arch, &WeightsSource::Random { seed: 0 }, 3, &dev).unwrap();
    let x = Tensor::randn(0f32, 1., (b, 3, 224, 224), &dev).unwrap();
    net.forward(&x).unwrap();
    let t = Instant::now();
    for _ in 0..reps {
        net.forward(&x).unwrap();
    }
    println!(
        "{arch:?} b{b}: {:.1} ms/image",
        t.elapsed().as_secs_f64() * 1e3 / (reps * b) as f64
    );
}
