//! Images/s of `Synthesizer::synthesize` at 224×224 and 900×900 (default configuration:
//! Perlin mask, structure source, blend, deformation), one image per iteration on one thread,
//! and a batch of 8 images on all cores (rayon). With `TESSERA_TEXTURES=DIR` (or
//! `../shared/data/textures/dtd10` present) texture sources are measured too, cache warm.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use image::{Rgb, RgbImage};
use rayon::prelude::*;
use std::path::PathBuf;
use tessera_synth::{image_seed, SynthConfig, Synthesizer};

/// A normal-looking test image: a shaded ring with fine ridges on a textured background.
fn normal(size: u32) -> RgbImage {
    let s = size as f32;
    RgbImage::from_fn(size, size, |x, y| {
        let (dx, dy) = (x as f32 - s / 2.0, y as f32 - s / 2.0);
        let r = dx.hypot(dy) / s;
        let v = if (0.18..0.42).contains(&r) {
            150.0 + 18.0 * (dy.atan2(dx) * 24.0).sin()
        } else {
            90.0 + 6.0 * (x as f32 * 0.35).sin() * (y as f32 * 0.35).cos()
        };
        Rgb([v as u8, (v * 0.92) as u8, (v * 0.85) as u8])
    })
}

fn textures() -> Option<PathBuf> {
    let p = std::env::var_os("TESSERA_TEXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/data/textures/dtd10"
            ))
        });
    p.is_dir().then_some(p)
}

fn bench(c: &mut Criterion) {
    let structure = Synthesizer::new(SynthConfig::default(), None).unwrap();
    let texture = textures().map(|dir| {
        let cfg = SynthConfig {
            texture_probability: 1.0,
            ..Default::default()
        };
        Synthesizer::new(cfg, Some(&dir)).unwrap()
    });
    let mut g = c.benchmark_group("synth");
    g.sample_size(10);
    for size in [224u32, 900] {
        let img = normal(size);
        let mut variants = vec![("structure", &structure)];
        if let Some(t) = &texture {
            // Warm the cache for the files the benchmark's seeds pick.
            for i in 0..64 {
                t.synthesize(&img, image_seed(0, i)).unwrap();
            }
            variants.push(("texture", t));
        }
        for (name, synth) in variants {
            g.throughput(Throughput::Elements(1));
            let mut i = 0u64;
            g.bench_function(format!("{name}_{size}px_1thread"), |b| {
                b.iter(|| {
                    i = (i + 1) % 64;
                    synth.synthesize(&img, image_seed(0, i)).unwrap()
                })
            });
            g.throughput(Throughput::Elements(8));
            g.bench_function(format!("{name}_{size}px_batch8_rayon"), |b| {
                b.iter(|| {
                    (0..8u64)
                        .into_par_iter()
                        .map(|i| synth.synthesize(&img, image_seed(1, i)).unwrap().beta)
                        .sum::<f32>()
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
