//! A small synthetic category in the MVTec layout, generated deterministically from a seed:
//! the built-in default for demos and tests (no download, no licence question).
//!
//! Normal images show a textured ring-shaped "part" (think of a bottle seen from above) on a
//! noisy background, with small random shifts and lighting changes. Defect types:
//! `scratch` (thin bright lines across the part), `spot` (dark blobs) and `crack` (a missing wedge
//! of the ring). Masks are exact.

use image::{GrayImage, Luma, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use tessera_core::{Error, Result};

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSpec {
    pub seed: u64,
    /// Image side in pixels.
    pub size: u32,
    pub train: usize,
    pub test_good: usize,
    /// Test images per defect type.
    pub test_defect: usize,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self {
            seed: 0,
            size: 256,
            train: 40,
            test_good: 10,
            test_defect: 6,
        }
    }
}

/// Defect types generated.
pub const DEFECT_TYPES: &[&str] = &["crack", "scratch", "spot"];

fn save_rgb(img: &RgbImage, path: &Path) -> Result<()> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| Error::bad_input(path, format!("cannot encode PNG: {e}")))?;
    tessera_core::io::write_atomic(path, buf.get_ref())
}

fn save_gray(img: &GrayImage, path: &Path) -> Result<()> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| Error::bad_input(path, format!("cannot encode PNG: {e}")))?;
    tessera_core::io::write_atomic(path, buf.get_ref())
}

/// A normal image.
fn normal(rng: &mut ChaCha8Rng, size: u32) -> RgbImage {
    let s = size as f32;
    let (cx, cy) = (
        s / 2.0 + rng.random_range(-3.0..3.0),
        s / 2.0 + rng.random_range(-3.0..3.0),
    );
    let light = rng.random_range(0.9f32..1.1);
    let phase = rng.random_range(0.0f32..std::f32::consts::TAU);
    RgbImage::from_fn(size, size, |x, y| {
        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
        let r = (dx * dx + dy * dy).sqrt() / s;
        let a = dy.atan2(dx);
        let noise: f32 = rng.random_range(-8.0..8.0);
        let (base, tex) = if (0.18..0.42).contains(&r) {
            // The ring: fine radial ridges plus a smooth shade.
            (
                150.0 - 120.0 * (r - 0.3).abs(),
                18.0 * (a * 24.0 + phase).sin(),
            )
        } else if r < 0.18 {
            (45.0, 4.0 * (r * 90.0).sin())
        } else {
            (
                90.0,
                6.0 * ((x as f32) * 0.35).sin() * ((y as f32) * 0.35).cos(),
            )
        };
        let v = ((base + tex) * light + noise).clamp(0.0, 255.0);
        Rgb([v as u8, (v * 0.92) as u8, (v * 0.85) as u8])
    })
}

/// Paint one defect of `kind` into `img`; return its mask.
fn defect(rng: &mut ChaCha8Rng, img: &mut RgbImage, kind: &str) -> GrayImage {
    let size = img.width();
    let s = size as f32;
    let mut mask = GrayImage::new(size, size);
    let paint = |img: &mut RgbImage, mask: &mut GrayImage, x: i64, y: i64, c: [u8; 3]| {
        if x >= 0 && y >= 0 && (x as u32) < size && (y as u32) < size {
            img.put_pixel(x as u32, y as u32, Rgb(c));
            mask.put_pixel(x as u32, y as u32, Luma([255]));
        }
    };
    match kind {
        "scratch" => {
            let a = rng.random_range(0.0f32..std::f32::consts::TAU);
            let r0 = rng.random_range(0.2f32..0.3) * s;
            let len = rng.random_range(0.15f32..0.3) * s;
            let dir = a + rng.random_range(-0.8f32..0.8) + std::f32::consts::FRAC_PI_2;
            let (x0, y0) = (s / 2.0 + r0 * a.cos(), s / 2.0 + r0 * a.sin());
            let steps = (len * 2.0) as usize;
            for i in 0..steps {
                let t = i as f32 / 2.0;
                let (x, y) = (x0 + t * dir.cos(), y0 + t * dir.sin());
                for o in -1..=1 {
                    paint(img, &mut mask, x as i64 + o, y as i64, [235, 235, 225]);
                }
            }
        }
        "spot" => {
            for _ in 0..rng.random_range(1..3) {
                let a = rng.random_range(0.0f32..std::f32::consts::TAU);
                let r0 = rng.random_range(0.2f32..0.4) * s;
                let rad = rng.random_range(0.03f32..0.06) * s;
                let (cx, cy) = (s / 2.0 + r0 * a.cos(), s / 2.0 + r0 * a.sin());
                for y in (cy - rad) as i64..=(cy + rad) as i64 {
                    for x in (cx - rad) as i64..=(cx + rad) as i64 {
                        let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
                        if d <= rad * (0.8 + 0.2 * ((x + y) as f32).sin()) {
                            paint(img, &mut mask, x, y, [40, 25, 20]);
                        }
                    }
                }
            }
        }
        _ => {
            // crack: a wedge of the ring replaced by background.
            let a0 = rng.random_range(0.0f32..std::f32::consts::TAU);
            let w = rng.random_range(0.15f32..0.3);
            for y in 0..size {
                for x in 0..size {
                    let (dx, dy) = (x as f32 - s / 2.0, y as f32 - s / 2.0);
                    let r = (dx * dx + dy * dy).sqrt() / s;
                    let mut da = dy.atan2(dx) - a0;
                    da = (da + std::f32::consts::PI).rem_euclid(std::f32::consts::TAU)
                        - std::f32::consts::PI;
                    if (0.2..0.4).contains(&r) && da.abs() < w * (0.6 + r) {
                        let v = 70 + ((x * 13 + y * 7) % 23) as u8;
                        paint(img, &mut mask, x as i64, y as i64, [v, v, v]);
                    }
                }
            }
        }
    }
    mask
}

/// Write the category to `root` (`train/good`, `test/{good,crack,scratch,spot}`,
/// `ground_truth/<type>/NNN_mask.png`). Same seed, same bytes.
pub fn generate_category(root: &Path, spec: &SyntheticSpec) -> Result<()> {
    if spec.size < 32 {
        return Err(Error::Config(
            "synthetic images must be at least 32 px".into(),
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    for i in 0..spec.train {
        save_rgb(
            &normal(&mut rng, spec.size),
            &root.join(format!("train/good/{i:03}.png")),
        )?;
    }
    for i in 0..spec.test_good {
        save_rgb(
            &normal(&mut rng, spec.size),
            &root.join(format!("test/good/{i:03}.png")),
        )?;
    }
    for kind in DEFECT_TYPES {
        for i in 0..spec.test_defect {
            let mut img = normal(&mut rng, spec.size);
            let mask = defect(&mut rng, &mut img, kind);
            save_rgb(&img, &root.join(format!("test/{kind}/{i:03}.png")))?;
            save_gray(
                &mask,
                &root.join(format!("ground_truth/{kind}/{i:03}_mask.png")),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_complete() {
        let base = std::env::temp_dir().join(format!("tessera-syn-{}", std::process::id()));
        let spec = SyntheticSpec {
            size: 64,
            train: 3,
            test_good: 2,
            test_defect: 2,
            ..Default::default()
        };
        generate_category(&base.join("a"), &spec).unwrap();
        generate_category(&base.join("b"), &spec).unwrap();
        for f in [
            "train/good/002.png",
            "test/spot/001.png",
            "ground_truth/crack/000_mask.png",
        ] {
            assert_eq!(
                std::fs::read(base.join("a").join(f)).unwrap(),
                std::fs::read(base.join("b").join(f)).unwrap()
            );
        }
        let ds = crate::Dataset::open(&base.join("a")).unwrap();
        assert_eq!(ds.train().unwrap().len(), 3);
        let test = ds.test().unwrap();
        assert_eq!(test.len(), 2 + 3 * 2);
        for s in test.iter().filter(|s| s.is_anomalous()) {
            let m = image::open(s.mask.as_ref().unwrap()).unwrap().to_luma8();
            assert!(
                m.pixels().any(|p| p[0] == 255),
                "{} has an empty mask",
                s.name
            );
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}
