//! One synthetic defect: mask → source → blend → deformation.

use crate::config::SynthConfig;
use crate::deform::deform_into;
use crate::mask::{defect_mask, foreground, to_gray};
use crate::rng::{Draw, STAGE_BETA, STAGE_SOURCE};
use crate::source::{augment_structure, jitter, shuffle_cells, Textures};
use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tessera_core::{Error, Result};

/// Where the anomalous content came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// A texture photograph (the file).
    Texture(PathBuf),
    /// The normal image itself, augmented and cell-shuffled.
    Structure,
}

/// A synthetic anomalous image and its ground truth.
#[derive(Debug, Clone)]
pub struct Synthetic {
    /// The image with the defect; equal to the input outside `mask`, byte for byte.
    pub image: RgbImage,
    /// The defect, 255 inside and 0 outside; never empty.
    pub mask: GrayImage,
    /// The anomaly source used.
    pub source: SourceKind,
    /// The blend opacity β.
    pub beta: f32,
}

/// Smallest image side accepted.
pub const MIN_SIDE: u32 = 8;

/// Makes synthetic defects. Holds the configuration and the texture list (textures are decoded
/// on first use and cached); `synthesize` takes `&self`, so one synthesizer serves many threads.
pub struct Synthesizer {
    config: SynthConfig,
    textures: Option<Textures>,
}

impl std::fmt::Debug for Synthesizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Synthesizer")
            .field("config", &self.config)
            .field("texture_dir", &self.texture_dir())
            .field("texture_files", &self.texture_files().len())
            .finish()
    }
}

impl Synthesizer {
    /// Check `config` and, when given, list the image files under `textures` (recursively). The
    /// error names the folder when it does not exist or holds no images.
    pub fn new(config: SynthConfig, textures: Option<&Path>) -> Result<Self> {
        config.validate()?;
        let textures = textures.map(Textures::open).transpose()?;
        Ok(Self { config, textures })
    }

    /// Bound the memory kept for decoded textures (default 256 MiB). Results do not depend on it.
    pub fn with_texture_cache_bytes(mut self, bytes: usize) -> Self {
        if let Some(t) = &mut self.textures {
            t.limit = bytes;
        }
        self
    }

    /// The configuration.
    pub fn config(&self) -> &SynthConfig {
        &self.config
    }

    /// The texture folder, if any.
    pub fn texture_dir(&self) -> Option<&Path> {
        self.textures.as_ref().map(|t| t.root.as_path())
    }

    /// The texture files found (sorted); empty without a texture folder.
    pub fn texture_files(&self) -> &[PathBuf] {
        self.textures.as_ref().map_or(&[], |t| &t.files)
    }

    /// Make one synthetic defect on `image`. Same (image, seed, config, texture files) → same
    /// bytes, on any thread. Errors: an image smaller than [`MIN_SIDE`] (or than the structure
    /// grid) on a side, an unreadable texture file (named).
    pub fn synthesize(&self, image: &RgbImage, seed: u64) -> Result<Synthetic> {
        let cfg = &self.config;
        let (w, h) = image.dimensions();
        let min_side = MIN_SIDE.max(cfg.structure_grid);
        if w < min_side || h < min_side {
            return Err(Error::Config(format!(
                "image is {w}×{h} px; synthesis needs at least {min_side} px per side"
            )));
        }
        // Foreground restriction; an empty foreground (e.g. a constant image) means none.
        let fg = cfg
            .foreground
            .then(|| foreground(image, cfg.foreground_dilation))
            .filter(|m| m.iter().any(|&v| v != 0));
        let mask = defect_mask((w, h), cfg, fg.as_deref(), seed);

        let mut draw = Draw::new(seed, STAGE_SOURCE);
        let texture = match &self.textures {
            Some(t) if draw.chance(cfg.texture_probability) => Some((t, draw.below(t.files.len()))),
            _ => None,
        };
        let (source, kind) = match texture {
            Some((t, idx)) => {
                let mut s = (*t.get(idx, w, h)?).clone();
                jitter(&mut s, cfg.texture_jitter, &mut draw);
                (s, SourceKind::Texture(t.files[idx].clone()))
            }
            None => {
                let mut aug = image.clone();
                augment_structure(&mut aug, cfg.structure_ops as usize, &mut draw);
                (
                    shuffle_cells(&aug, cfg.structure_grid, &mut draw).0,
                    SourceKind::Structure,
                )
            }
        };
        let beta = Draw::new(seed, STAGE_BETA).range(cfg.beta_min, cfg.beta_max);
        let blended = blend_raw(image, &source, &mask, beta);
        let out = if cfg.deform.enabled {
            let mut out = blended.clone();
            deform_into(&blended, &mask, &cfg.deform, seed, &mut out);
            out
        } else {
            blended
        };
        Ok(Synthetic {
            image: out,
            mask: to_gray((w, h), &mask),
            source: kind,
            beta,
        })
    }
}

/// I' = (1 − M)·I + M·((1 − β)·I + β·S), rounded; M is 0/1 per pixel.
fn blend_raw(image: &RgbImage, source: &RgbImage, mask: &[u8], beta: f32) -> RgbImage {
    let mut out = image.clone();
    let src = source.as_raw();
    for (i, px) in out.as_mut().chunks_exact_mut(3).enumerate() {
        if mask[i] != 0 {
            for c in 0..3 {
                let (a, s) = (px[c] as f32, src[i * 3 + c] as f32);
                px[c] = ((1.0 - beta) * a + beta * s).round() as u8;
            }
        }
    }
    out
}

/// The blend step on its own: `I' = (1 − M)·I + M·((1 − β)·I + β·S)` per channel, rounded to
/// the nearest integer, where M = 1 for nonzero mask pixels. Pixels outside the mask are copied.
pub fn blend(image: &RgbImage, source: &RgbImage, mask: &GrayImage, beta: f32) -> Result<RgbImage> {
    if source.dimensions() != image.dimensions() || mask.dimensions() != image.dimensions() {
        return Err(Error::Config(format!(
            "blend needs equal sizes: image {:?}, source {:?}, mask {:?}",
            image.dimensions(),
            source.dimensions(),
            mask.dimensions()
        )));
    }
    if !(0.0..=1.0).contains(&beta) {
        return Err(Error::Config(format!("beta = {beta} must be in [0, 1]")));
    }
    let m: Vec<u8> = mask.as_raw().iter().map(|&v| (v != 0) as u8).collect();
    Ok(blend_raw(image, source, &m, beta))
}
