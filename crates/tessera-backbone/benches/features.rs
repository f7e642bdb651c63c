//! ms/image of layer1..3 feature extraction at 224 px, batch 1 and 8, ResNet-18 and
//! Wide-ResNet-50-2 (random weights: speed does not depend on them), Tessera's convolution
//! against candle's stock conv2d, and Tessera's bf16 products (`tessera_bf16_*`, only on CPUs
//! with AVX512-BF16).

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tessera_backbone::{Arch, Backbone, Precision, WeightsSource};

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    for (arch, group, batches) in [
        (Arch::ResNet18, "features_r18", &[1usize, 8][..]),
        (Arch::WideResNet50_2, "features_wrn50", &[1, 8][..]),
    ] {
        let mut net = Backbone::load(arch, &WeightsSource::Random { seed: 0 }, 3, &dev).unwrap();
        let mut g = c.benchmark_group(group);
        g.sample_size(10);
        for &b in batches {
            let x = Tensor::randn(0f32, 1., (b, 3, 224, 224), &dev).unwrap();
            g.throughput(Throughput::Elements(b as u64));
            for (name, stock) in [("tessera", false), ("candle", true)] {
                if stock && arch == Arch::WideResNet50_2 && b == 1 {
                    continue; // the stock path at batch 1 adds minutes and no information
                }
                net.set_stock_conv(stock);
                g.bench_function(format!("{name}_batch{b}"), |bench| {
                    bench.iter(|| net.forward(&x).unwrap())
                });
            }
            net.set_stock_conv(false);
            net.set_precision(Precision::Bf16);
            if net.precision() == Precision::Bf16 {
                g.bench_function(format!("tessera_bf16_batch{b}"), |bench| {
                    bench.iter(|| net.forward(&x).unwrap())
                });
            }
            net.set_precision(Precision::F32);
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
