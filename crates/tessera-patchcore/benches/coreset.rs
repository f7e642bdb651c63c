//! Regression benchmarks: greedy coreset on 20k clustered 128-d points (10 % and 1 %), and the
//! 1-NN of one image's 784 patches against a 16k × 384 bank (bottle's size at 10 %): brute force
//! (chunked), the exact partitioned search and the approximate one, on Gaussian noise (nothing to
//! prune) and on clustered points; beside them the bare matrix product brute force is built on
//! (`gemm_784x384x16386`), whose rate bounds it. Whole-category numbers (bottle, 164k patches)
//! come from `cargo xtask bench`; the search on real banks from the `patchcore_search` example of
//! tessera-pipeline.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use rand::{Rng, SeedableRng};
use tessera_patchcore::{coreset, nn, search, PartitionedBank, Search};

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
    let bt = bank.t().unwrap().contiguous().unwrap();
    let mut g = c.benchmark_group("nearest_784x16k_384d");
    g.sample_size(10);
    g.bench_function("gemm_784x384x16386", |b| b.iter(|| q.matmul(&bt).unwrap()));
    let sq1024 = Tensor::randn(0f32, 1., (1024, 1024), &dev).unwrap();
    g.bench_function("gemm_1024_square", |b| {
        b.iter(|| sq1024.matmul(&sq1024).unwrap())
    });
    g.bench_function("chunk4096", |b| {
        b.iter(|| nn::nearest(&q, &bank, &sq, 4096).unwrap())
    });
    let qv: Vec<f32> = q.flatten_all().unwrap().to_vec1().unwrap();
    let noise = PartitionedBank::build(
        &bank.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        384,
        search::default_clusters(16_386),
    )
    .unwrap();
    g.bench_function("exact_noise", |b| {
        b.iter(|| noise.nearest(&qv, Search::Exact).unwrap())
    });
    let pts = clustered(16_386 + 784, 384);
    let (cq, cb) = pts.split_at(784 * 384);
    let cbank = Tensor::from_slice(cb, (16_386, 384), &dev).unwrap();
    let cq_t = Tensor::from_slice(cq, (784, 384), &dev).unwrap();
    let csq = nn::row_norms_sq(&cbank).unwrap();
    let part = PartitionedBank::build(cb, 384, search::default_clusters(16_386)).unwrap();
    g.bench_function("chunk4096_clustered", |b| {
        b.iter(|| nn::nearest(&cq_t, &cbank, &csq, 4096).unwrap())
    });
    g.bench_function("exact_clustered", |b| {
        b.iter(|| part.nearest(cq, Search::Exact).unwrap())
    });
    g.bench_function("approx4_clustered", |b| {
        b.iter(|| part.nearest(cq, Search::Approximate { probes: 4 }).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
