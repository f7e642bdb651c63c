//! Texture or object, from the images themselves, for categories outside MVTec AD's name list.
//!
//! A texture (carpet, leather, a machined surface) looks alike everywhere in the frame: its
//! local contrast is about the same in every part of the image, and two images of it do not
//! line up. An object on a background (a bottle, a screw, a pill) puts its detail in one part
//! of the frame and plain background elsewhere. [`infer_kind`] measures that on a few training
//! images, at 64 × 64 grey:
//!
//! - **contrast spread**: the local contrast (mean absolute gradient) in each cell of an 8 × 8
//!   grid, averaged over the images; its coefficient of variation across the cells. About
//!   0.1–0.3 for textures, higher where detail and background alternate;
//! - **background share**: the fraction of cells whose contrast is below a quarter of the
//!   busiest cells' (the 90th percentile) — plain background. Near 0 for textures, a large part of the frame for
//!   objects on a backdrop.
//!
//! The rule: object when the contrast spread is above [`OBJECT_SPREAD`] or the background
//! share above [`OBJECT_BACKGROUND`]; texture otherwise. It is a heuristic with its evidence
//! reported; `tessera-dataset.json` (`"category": "object" | "texture"`) and `--sbm on|off`
//! override it.

use crate::layout::CategoryKind;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tessera_core::{Error, Result};

/// Side of the grey thumbnail the statistics use.
const SIDE: u32 = 64;
/// Cells per side.
const CELLS: usize = 8;
/// At most this many images are read (evenly spaced over the list).
pub const KIND_IMAGES: usize = 16;
/// Contrast spread above which a category is an object.
pub const OBJECT_SPREAD: f64 = 0.5;
/// Background share above which a category is an object.
pub const OBJECT_BACKGROUND: f64 = 0.15;

/// What [`infer_kind`] measured and decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindEvidence {
    pub kind: CategoryKind,
    /// Images read.
    pub images: usize,
    /// Coefficient of variation of the mean local contrast over the 8 × 8 cells.
    pub contrast_spread: f64,
    /// Fraction of cells with under a quarter of the 90th-percentile cell's contrast.
    pub background_share: f64,
}

impl KindEvidence {
    /// One sentence with the numbers and the rule.
    pub fn describe(&self) -> String {
        format!(
            "{} ({} images: contrast spread {:.2}, object above {OBJECT_SPREAD}; background \
             share {:.2}, object above {OBJECT_BACKGROUND})",
            self.kind.name(),
            self.images,
            self.contrast_spread,
            self.background_share
        )
    }
}

/// Mean absolute gradient per cell of one image's grey thumbnail.
fn cell_contrast(path: &std::path::Path) -> Result<Vec<f64>> {
    // The decoder every image goes through (its size limits refuse decompression bombs).
    let img = crate::preprocess::decode(path)?;
    let g = image::imageops::resize(
        &img.to_luma32f(),
        SIDE,
        SIDE,
        image::imageops::FilterType::Triangle,
    );
    let n = SIDE as usize;
    let px = |x: usize, y: usize| g.get_pixel(x as u32, y as u32)[0] as f64;
    let cell = n / CELLS;
    let mut sums = vec![0f64; CELLS * CELLS];
    for y in 0..n - 1 {
        for x in 0..n - 1 {
            let v = px(x, y);
            let grad = (px(x + 1, y) - v).abs() + (px(x, y + 1) - v).abs();
            sums[(y / cell) * CELLS + x / cell] += grad;
        }
    }
    Ok(sums)
}

/// Decide texture or object from (up to [`KIND_IMAGES`] of) `paths`.
pub fn infer_kind(paths: &[PathBuf]) -> Result<KindEvidence> {
    if paths.is_empty() {
        return Err(Error::Config("category kind: no images to look at".into()));
    }
    let step = paths.len().div_ceil(KIND_IMAGES).max(1);
    let picked: Vec<&PathBuf> = paths.iter().step_by(step).collect();
    let cells: Vec<Vec<f64>> = picked
        .par_iter()
        .map(|p| cell_contrast(p.as_path()))
        .collect::<Result<_>>()?;
    let k = CELLS * CELLS;
    let mean: Vec<f64> = (0..k)
        .map(|c| cells.iter().map(|v| v[c]).sum::<f64>() / cells.len() as f64)
        .collect();
    let mu = mean.iter().sum::<f64>() / k as f64;
    let sd = (mean.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / k as f64).sqrt();
    // A blank image has no contrast anywhere: uniform, so a texture.
    let contrast_spread = if mu > 0.0 { sd / mu } else { 0.0 };
    let mut sorted = mean.clone();
    sorted.sort_by(f64::total_cmp);
    let busy = sorted[(k * 9) / 10];
    let background_share = mean.iter().filter(|&&v| v < 0.25 * busy).count() as f64 / k as f64;
    let object = contrast_spread > OBJECT_SPREAD || background_share > OBJECT_BACKGROUND;
    Ok(KindEvidence {
        kind: if object {
            CategoryKind::Object
        } else {
            CategoryKind::Texture
        },
        images: cells.len(),
        contrast_spread,
        background_share,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Noise is a texture; a textured disc on a plain backdrop is an object.
    #[test]
    fn noise_is_a_texture_and_a_disc_on_a_backdrop_an_object() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let (mut noise, mut discs) = (Vec::new(), Vec::new());
        for i in 0..6 {
            let n =
                image::GrayImage::from_fn(96, 96, |_, _| image::Luma([rng.random_range(40..220)]));
            let p = dir.path().join(format!("n{i}.png"));
            n.save(&p).unwrap();
            noise.push(p);
            let d = image::GrayImage::from_fn(96, 96, |x, y| {
                let r2 = (x as i32 - 48).pow(2) + (y as i32 - 48).pow(2);
                image::Luma([if r2 < 30 * 30 {
                    rng.random_range(40..220)
                } else {
                    10
                }])
            });
            let p = dir.path().join(format!("d{i}.png"));
            d.save(&p).unwrap();
            discs.push(p);
        }
        let t = infer_kind(&noise).unwrap();
        assert_eq!(t.kind, CategoryKind::Texture, "{}", t.describe());
        assert!(
            t.contrast_spread < 0.2 && t.background_share == 0.0,
            "{t:?}"
        );
        let o = infer_kind(&discs).unwrap();
        assert_eq!(o.kind, CategoryKind::Object, "{}", o.describe());
        assert!(o.background_share > 0.3, "{o:?}");
        assert!(infer_kind(&[]).is_err());
        // An unreadable file is an error naming it.
        let bad = dir.path().join("bad.png");
        std::fs::write(&bad, b"not a png").unwrap();
        let e = infer_kind(&[bad]).unwrap_err().to_string();
        assert!(e.contains("bad.png"), "{e}");
    }
}
