//! Regression benchmarks: greedy coreset on 20k clustered 128-d points (10 % and 1 %), and the
//! chunked 1-NN of one image's 784 patches against a 16k × 384 bank (bottle's size at 10 %).
//! Whole-category numbers (bottle, 164k patches) come from `cargo xtask bench`.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use rand::{Rng, SeedableRng};
use tessera_patchcore::{coreset, nn};

fn clustered(n: usize, dim: usize) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let centres: Vec<f32> = (0..64 * dim).map(|_| rng.random_range(-4.0..4.0)).collect();
    (0..n)
        .flat_map(|i| {
            let c = (i * 7919) % 64;
            (0..dim)
                .map(|d| centres[c * dim + d] + rng.random_range(-1.0f32..1.0))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let pts = clustered(20_000, 128);
    let mut g = c.benchmark_group("coreset_20k_128d");
    g.sample_size(10);
    for (name, k) in [("ratio_0.1", 2000), ("ratio_0.01", 200)] {
        g.bench_function(name, |b| {
            b.iter(|| coreset::greedy_coreset(&pts, 128, k, 0, &|_| {}))
        });
    }
    g.finish();

    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1., (784, 384), &dev).unwrap();
    let bank = Tensor::randn(0f32, 1., (16_386, 384), &dev).unwrap();
    let sq = nn::row_norms_sq(&bank).unwrap();
    let mut g = c.benchmark_group("nearest_784x16k_384d");
    g.sample_size(10);
    g.bench_function("chunk4096", |b| {
        b.iter(|| nn::nearest(&q, &bank, &sq, 4096).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
