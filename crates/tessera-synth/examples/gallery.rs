//! Writes the documentation gallery (rows of normal | synthetic | mask) from normal images of
//! the built-in synthetic category, with structure sources only — no third-party data, so the
//! picture may live in the repository.
//!
//! ```sh
//! cargo run -p tessera-synth --example gallery -- docs/images/synthesis-gallery.png
//! ```

use image::{Rgb, RgbImage};
use tessera_data::{generate_category, SyntheticSpec};
use tessera_synth::{SynthConfig, Synthesizer};

fn main() -> tessera_core::Result<()> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "synthesis-gallery.png".into());
    let size = 160u32;
    let tmp = std::env::temp_dir().join(format!("tessera-synth-gallery-{}", std::process::id()));
    generate_category(
        &tmp,
        &SyntheticSpec {
            seed: 0,
            size,
            train: 4,
            test_good: 0,
            test_defect: 0,
        },
    )?;
    // Rows 1–2: anywhere on the image; rows 3–4: restricted to the Otsu foreground (the ring).
    let anywhere = Synthesizer::new(SynthConfig::default(), None)?;
    let on_object = Synthesizer::new(
        SynthConfig {
            foreground: true,
            ..Default::default()
        },
        None,
    )?;
    let rows = [
        (&anywhere, 0u64),
        (&anywhere, 1),
        (&on_object, 2),
        (&on_object, 3),
    ];
    let gap = 4u32;
    let mut sheet = RgbImage::from_pixel(
        3 * size + 2 * gap,
        rows.len() as u32 * size + (rows.len() as u32 - 1) * gap,
        Rgb([255, 255, 255]),
    );
    for (r, (synth, seed)) in rows.iter().enumerate() {
        let path = tmp.join(format!("train/good/{r:03}.png"));
        let normal = image::open(&path)
            .map_err(|e| tessera_core::Error::bad_input(&path, e.to_string()))?
            .to_rgb8();
        let s = synth.synthesize(&normal, tessera_synth::image_seed(*seed, r as u64))?;
        let mask = RgbImage::from_fn(size, size, |x, y| {
            let v = s.mask.get_pixel(x, y)[0];
            Rgb([v, v, v])
        });
        let y = r as u32 * (size + gap);
        for (c, tile) in [&normal, &s.image, &mask].into_iter().enumerate() {
            image::imageops::replace(&mut sheet, tile, (c as u32 * (size + gap)) as i64, y as i64);
        }
        println!("row {}: source {:?}, beta {:.2}", r + 1, s.source, s.beta);
    }
    let out = std::path::Path::new(&out);
    tessera_core::io::replace_atomic(out, |tmp_file| {
        sheet
            .save_with_format(tmp_file, image::ImageFormat::Png)
            .map_err(std::io::Error::other)
    })?;
    let _ = std::fs::remove_dir_all(&tmp);
    println!("wrote {}", out.display());
    Ok(())
}
