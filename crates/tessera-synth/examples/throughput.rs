//! A quick timed run (no criterion): images/s of `synthesize` at 224×224 and 900×900, one
//! thread and all cores, structure sources, and texture sources when a texture folder is given;
//! plus mask coverage statistics, and `write_dataset` end to end (decode, synthesize, PNG encode,
//! atomic writes) on the built-in synthetic category.
//!
//! ```sh
//! cargo run -p tessera-synth --example throughput -- [TEXTURE_DIR]
//! ```

use image::{Rgb, RgbImage};
use rayon::prelude::*;
use std::time::Instant;
use tessera_synth::{image_seed, SynthConfig, Synthesizer};

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

fn main() -> tessera_core::Result<()> {
    let tex = std::env::args().nth(1).map(std::path::PathBuf::from);
    let mut variants = vec![("structure", Synthesizer::new(SynthConfig::default(), None)?)];
    if let Some(dir) = &tex {
        let cfg = SynthConfig {
            texture_probability: 1.0,
            ..Default::default()
        };
        variants.push(("texture", Synthesizer::new(cfg, Some(dir))?));
    }
    println!("threads: {}", rayon::current_num_threads());
    for size in [224u32, 900] {
        let img = normal(size);
        let n = if size == 224 { 200 } else { 24 };
        for (name, s) in &variants {
            // Warm-up (texture decoding and caching), not timed.
            for i in 0..n as u64 {
                s.synthesize(&img, image_seed(0, i))?;
            }
            let t = Instant::now();
            let mut cover = Vec::with_capacity(n);
            for i in 0..n as u64 {
                let o = s.synthesize(&img, image_seed(0, i))?;
                cover.push(
                    o.mask.pixels().filter(|p| p[0] != 0).count() as f64 / (size * size) as f64,
                );
            }
            let one = n as f64 / t.elapsed().as_secs_f64();
            let t = Instant::now();
            (0..n as u64)
                .into_par_iter()
                .try_for_each(|i| s.synthesize(&img, image_seed(0, i)).map(|_| ()))?;
            let all = n as f64 / t.elapsed().as_secs_f64();
            cover.sort_by(f64::total_cmp);
            println!(
                "{name:9} {size:4}px: {one:7.1} img/s on 1 thread, {all:7.1} img/s on all; \
                 mask coverage median {:.1}% (p10 {:.1}%, p90 {:.1}%)",
                100.0 * cover[n / 2],
                100.0 * cover[n / 10],
                100.0 * cover[9 * n / 10]
            );
        }
    }
    let tmp = std::env::temp_dir().join(format!("tessera-synth-throughput-{}", std::process::id()));
    for (size, count) in [(224u32, 96usize), (900, 16)] {
        let cat = tmp.join(format!("cat{size}"));
        let spec = tessera_data::SyntheticSpec {
            size,
            train: 8,
            test_good: 0,
            test_defect: 0,
            ..Default::default()
        };
        tessera_data::generate_category(&cat, &spec)?;
        let synth = &variants[0].1;
        let sum = tessera_synth::write_dataset(
            &cat,
            &tmp.join(format!("out{size}")),
            count,
            0,
            synth,
            |_| {},
        )?;
        println!(
            "write_dataset {size:4}px: {count} images in {:.2} s, {:.1} img/s (structure sources)",
            sum.seconds, sum.images_per_second
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
