//! Preprocessing of one decoded image (RGB conversion, resize, crop, normalisation):
//! `cargo bench -p tessera-data --bench preprocess`.

use criterion::{criterion_group, criterion_main, Criterion};
use image::{DynamicImage, RgbImage};
use tessera_core::model::Preprocess;
use tessera_core::test_util::Lcg;
use tessera_data::preprocess_image;

/// A smooth gradient with noise, `w × h` (the resize does the same work whatever the values).
fn picture(w: u32, h: u32) -> DynamicImage {
    let mut rng = Lcg(1);
    DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
        let n = (rng.next_u64() >> 59) as u32;
        image::Rgb([
            ((x * 255 / w + n) % 256) as u8,
            ((y * 255 / h + n) % 256) as u8,
            (((x + y) * 127 / (w + h) + n) % 256) as u8,
        ])
    }))
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("preprocess");
    g.sample_size(20);
    // MVTec bottle (900 × 900, the paper's resize 256 + crop 224) and KolektorSDD (about
    // 250 × 630, resolved to 224 × 576 by the default geometry).
    for (name, (w, h), pre) in [
        ("bottle_900_paper", (900, 900), Preprocess::paper()),
        ("ksdd_250x630_auto", (250, 630), Preprocess::auto()),
    ] {
        let img = picture(w, h);
        let pre = pre.resolve((w, h));
        g.bench_function(name, |b| {
            b.iter(|| preprocess_image(&img, &pre, "bench.png").unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
