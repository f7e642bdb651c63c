//! The PaDiM Mahalanobis kernel alone: `cargo bench -p tessera-padim --bench mahalanobis`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rayon::prelude::*;
use tessera_core::test_util::Lcg;
use tessera_padim::maha::{mahalanobis, mahalanobis_shared, packed_len, InvCov};
use tessera_padim::shared_index;

/// Deterministic values in [-1, 1) (the kernel's speed does not depend on them).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Lcg(seed);
    (0..n).map(|_| rng.signed()).collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("mahalanobis");
    g.sample_size(10);
    // (d, positions, batch): ResNet-18 PaDiM on a 56×56 grid; Wide-ResNet-50-2's d = 550 on
    // a slice of the grid (the whole grid's Σ⁻¹ is 3.8 GB).
    for &(d, p, b) in &[(100usize, 3136usize, 1usize), (100, 3136, 8), (550, 256, 8)] {
        let y = values(b * d * p, 1);
        let mean = values(p * d, 2);
        // Packed upper triangles, as models store them.
        let inv = values(p * packed_len(d), 3);
        let inv16: Vec<half::f16> = inv.iter().map(|&v| half::f16::from_f32(v)).collect();
        // Multiply-adds of the symmetric form: half of d² per position and image.
        g.throughput(Throughput::Elements((b * p * d * (d + 1) / 2) as u64));
        let tag = format!("d{d}_p{p}_b{b}");
        g.bench_function(format!("f32_{tag}"), |bn| {
            bn.iter(|| mahalanobis(&y, &mean, InvCov::F32(&inv), b, d).unwrap())
        });
        g.bench_function(format!("f16_{tag}"), |bn| {
            bn.iter(|| mahalanobis(&y, &mean, InvCov::F16(&inv16), b, d).unwrap())
        });
        // The memory floor: reading the packed f32 and f16 Σ⁻¹ once, on all threads.
        g.bench_function(format!("read_f32_{tag}"), |bn| {
            bn.iter(|| {
                inv.par_chunks(1 << 16)
                    .map(|c| c.iter().fold(0f32, |a, &v| a.max(v)))
                    .reduce(|| 0.0, f32::max)
            })
        });
        g.bench_function(format!("read_f16_{tag}"), |bn| {
            bn.iter(|| {
                inv16
                    .par_chunks(1 << 16)
                    .map(|c| c.iter().fold(0u16, |a, &v| a.max(v.to_bits())))
                    .reduce(|| 0, u16::max)
            })
        });
    }
    // Every ResNet-18 channel (d = 448) with one Σ⁻¹ per 4 × 4 block of the 56 × 56 grid
    // (`--padim-dims 448 --padim-tie 4`): 196 triangles, each read by 16 positions.
    let (d, b, grid) = (448usize, 8usize, (56usize, 56usize));
    let p = grid.0 * grid.1;
    let shared = shared_index(grid, 4);
    let y = values(b * d * p, 1);
    let mean = values(p * d, 2);
    let inv = values(196 * packed_len(d), 3);
    let inv16: Vec<half::f16> = inv.iter().map(|&v| half::f16::from_f32(v)).collect();
    g.throughput(Throughput::Elements((b * p * d * (d + 1) / 2) as u64));
    g.bench_function(format!("f32_d{d}_p{p}_tie4_b{b}"), |bn| {
        bn.iter(|| mahalanobis_shared(&y, &mean, InvCov::F32(&inv), b, d, &shared).unwrap())
    });
    g.bench_function(format!("f16_d{d}_p{p}_tie4_b{b}"), |bn| {
        bn.iter(|| mahalanobis_shared(&y, &mean, InvCov::F16(&inv16), b, d, &shared).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
