//! # tessera-synth
//!
//! Realistic synthetic defects made from normal images, as in DRAEM and MemSeg and the
//! shape-biased module of Yuan et al. (§3.1): a training or validation signal where real defects
//! are scarce.
//!
//! For one image and one `u64` seed, [`Synthesizer::synthesize`]:
//!
//! 1. draws a **mask**: 2-D Perlin noise with a random lattice of 2^a × 2^b cells
//!    (a, b ∈ 0..=5), rotated by ±90°, thresholded at 0.5; redrawn when nearly empty, an ellipse
//!    after `max_attempts`; optionally ANDed with the Otsu **foreground** of object images
//!    ([`perlin_mask`], [`foreground_mask`], [`otsu_threshold`]);
//! 2. picks a **source** S: a texture photograph (random file of a folder, colour-jittered), or
//!    a **structure** image — the normal image, augmented by 3 random operations and cut into
//!    8 × 8 shuffled cells;
//! 3. **blends**: I' = (1 − M)·I + M·((1 − β)·I + β·S), β ~ U[0.15, 1] ([`blend`]);
//! 4. **deforms** the mask region: a smooth random displacement field plus a small affine map,
//!    so the defect changes shape locally. Pixels outside the mask never change.
//!
//! Everything is a pure function of (image, seed, [`SynthConfig`], texture files);
//! [`image_seed`] derives per-image seeds from a base seed and an index, so parallel generation
//! gives the same bytes in any order. [`write_dataset`] writes a synthetic test split in the
//! MVTec layout from a category's `train/good`.
//!
//! ```
//! use image::{Rgb, RgbImage};
//! use tessera_synth::{SourceKind, SynthConfig, Synthesizer};
//!
//! // A 64×64 "normal" image: a bright disc on a dark background.
//! let normal = RgbImage::from_fn(64, 64, |x, y| {
//!     let d = (x as f32 - 32.0).hypot(y as f32 - 32.0);
//!     if d < 20.0 { Rgb([200, 180, 160]) } else { Rgb([30, 30, 30]) }
//! });
//! let config = SynthConfig { foreground: true, ..Default::default() };
//! let synth = Synthesizer::new(config, None)?; // no texture folder: structure sources only
//! let out = synth.synthesize(&normal, 42)?;
//! assert_eq!(out.source, SourceKind::Structure);
//! assert!(out.mask.pixels().any(|p| p[0] == 255));
//! // Outside the mask, the image is untouched.
//! for ((a, b), m) in out.image.pixels().zip(normal.pixels()).zip(out.mask.pixels()) {
//!     if m[0] == 0 {
//!         assert_eq!(a, b);
//!     }
//! }
//! // Same seed, same bytes.
//! assert_eq!(synth.synthesize(&normal, 42)?.image, out.image);
//! # Ok::<(), tessera_core::Error>(())
//! ```

mod config;
mod dataset;
mod deform;
mod mask;
mod rng;
mod source;
mod synth;

pub use config::{DeformConfig, SynthConfig};
pub use dataset::{write_dataset, SynthSummary, DEFECT_TYPE, MANIFEST_FILE};
pub use mask::{foreground_mask, otsu_threshold, perlin_mask};
pub use rng::image_seed;
pub use source::DEFAULT_TEXTURE_CACHE_BYTES;
pub use synth::{blend, SourceKind, Synthesizer, Synthetic, MIN_SIDE};
