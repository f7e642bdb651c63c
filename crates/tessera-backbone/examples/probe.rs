use candle_core::{Device, Tensor};
use std::time::Instant;
use tessera_backbone::{Arch, Backbone, WeightsSource};
fn main() {
    let dev = Device::Cpu;
    for arch in [Arch::ResNet18, Arch::WideResNet50_2] {
        let mut net = Backbone::load(arch, &WeightsSource::Random { seed: 0 }, 3, &dev).unwrap();
        for b in [1usize, 8] {
            let x = Tensor::randn(0f32, 1., (b, 3, 224, 224), &dev).unwrap();
            for stock in [false, true] {
                net.set_stock_conv(stock);
                let f = net.forward(&x).unwrap();
                let reps = if b == 1 { 10 } else { 3 };
                let t = Instant::now();
                for _ in 0..reps {
                    net.forward(&x).unwrap();
                }
                let ms = t.elapsed().as_secs_f64() * 1e3 / (reps * b) as f64;
                println!("{arch:?} b{b} stock={stock}: {ms:.1} ms/image");
                if stock {
                    break;
                }
                let _ = f;
            }
            net.set_stock_conv(false);
            let a = net.forward(&x).unwrap();
            net.set_stock_conv(true);
            let s = net.forward(&x).unwrap();
            net.set_stock_conv(false);
            for (l, (p, q)) in a.levels.iter().zip(&s.levels).enumerate() {
                let d = (p - q)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let m = q
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                println!("  layer{} max abs diff {d:.2e} (max {m:.2})", l + 1);
            }
        }
    }
}
