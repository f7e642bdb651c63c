//! Synthesis parameters. Defaults follow DRAEM / MemSeg (and Yuan et al. §3.1) where they say
//! something, and are marked as our choice where they do not.

use serde::{Deserialize, Serialize};
use tessera_core::{Error, Result};

/// Every parameter of the synthesis. `Default` gives the values documented in
/// `docs/synthesis.md`; missing JSON fields take their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    /// Perlin lattice resolution per axis is `2^a` cells, `a` uniform in
    /// `perlin_min_exp..=perlin_max_exp`, drawn separately for x and y (DRAEM: 0..=5).
    pub perlin_min_exp: u32,
    /// See `perlin_min_exp`.
    pub perlin_max_exp: u32,
    /// Noise (scaled to about [-1, 1]) above this is defect (DRAEM: 0.5).
    pub perlin_threshold: f32,
    /// The noise field is rotated by an angle uniform in ±this many degrees (DRAEM: 90).
    pub max_rotation_deg: f32,
    /// A mask covering less than this fraction of the allowed area (the image, or its
    /// foreground) is redrawn.
    pub min_mask_fraction: f32,
    /// Perlin draws before falling back to an ellipse blob (so the mask is never empty).
    pub max_attempts: u32,
    /// Restrict defects to the object (Otsu foreground), for object categories.
    pub foreground: bool,
    /// Dilation of the Otsu foreground, as a fraction of the shorter image side (at least 1 px).
    pub foreground_dilation: f32,
    /// Probability of a texture source when a texture folder is given (MemSeg: 0.5).
    pub texture_probability: f32,
    /// Colour jitter of texture sources: brightness, contrast and saturation factors uniform in
    /// `1 ± texture_jitter`; 0 leaves textures untouched.
    pub texture_jitter: f32,
    /// Structure sources: the augmented image is cut into `structure_grid²` cells that are
    /// shuffled (MemSeg: 8).
    pub structure_grid: u32,
    /// Number of distinct random augmentations applied before shuffling (DRAEM: 3 of 9).
    pub structure_ops: u32,
    /// Blend opacity β is uniform in `[beta_min, beta_max]`.
    pub beta_min: f32,
    /// See `beta_min`.
    pub beta_max: f32,
    /// Local warp inside the mask.
    pub deform: DeformConfig,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            perlin_min_exp: 0,
            perlin_max_exp: 5,
            perlin_threshold: 0.5,
            max_rotation_deg: 90.0,
            min_mask_fraction: 0.005,
            max_attempts: 16,
            foreground: false,
            foreground_dilation: 0.01,
            texture_probability: 0.5,
            texture_jitter: 0.2,
            structure_grid: 8,
            structure_ops: 3,
            beta_min: 0.15,
            beta_max: 1.0,
            deform: DeformConfig::default(),
        }
    }
}

/// The "deformation" step (our choice of form): inside the mask, pixels are resampled through a
/// smooth random displacement field plus a small affine map about the mask's centroid, so the
/// defect bends the pattern under it instead of only recolouring it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeformConfig {
    /// Apply the warp at all.
    pub enabled: bool,
    /// Largest elastic displacement per axis, as a fraction of the shorter image side.
    pub strength: f32,
    /// Control points per axis of the displacement field (interpolated with Catmull–Rom).
    pub grid: u32,
    /// Affine rotation uniform in ± this many degrees.
    pub max_rotation_deg: f32,
    /// Affine scale uniform in `1 ± max_scale`.
    pub max_scale: f32,
}

impl Default for DeformConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            strength: 0.03,
            grid: 4,
            max_rotation_deg: 10.0,
            max_scale: 0.1,
        }
    }
}

fn check(ok: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::Config(msg()))
    }
}

fn in_range(name: &str, v: f32, lo: f32, hi: f32) -> Result<()> {
    check(v.is_finite() && v >= lo && v <= hi, || {
        format!("{name} = {v} must be in [{lo}, {hi}]")
    })
}

impl SynthConfig {
    /// Check every value; the error names the field.
    pub fn validate(&self) -> Result<()> {
        check(self.perlin_min_exp <= self.perlin_max_exp, || {
            format!(
                "perlin_min_exp = {} must not exceed perlin_max_exp = {}",
                self.perlin_min_exp, self.perlin_max_exp
            )
        })?;
        check(self.perlin_max_exp <= 10, || {
            format!(
                "perlin_max_exp = {} must be at most 10",
                self.perlin_max_exp
            )
        })?;
        in_range("perlin_threshold", self.perlin_threshold, -1.0, 1.0)?;
        in_range("max_rotation_deg", self.max_rotation_deg, 0.0, 180.0)?;
        in_range("min_mask_fraction", self.min_mask_fraction, 0.0, 0.9)?;
        in_range("foreground_dilation", self.foreground_dilation, 0.0, 0.5)?;
        in_range("texture_probability", self.texture_probability, 0.0, 1.0)?;
        in_range("texture_jitter", self.texture_jitter, 0.0, 0.9)?;
        check((1..=64).contains(&self.structure_grid), || {
            format!("structure_grid = {} must be in 1..=64", self.structure_grid)
        })?;
        check(
            self.structure_ops as usize <= crate::source::STRUCTURE_OPS,
            || {
                format!(
                    "structure_ops = {} must be at most {}",
                    self.structure_ops,
                    crate::source::STRUCTURE_OPS
                )
            },
        )?;
        in_range("beta_min", self.beta_min, 0.0, 1.0)?;
        in_range("beta_max", self.beta_max, self.beta_min, 1.0)?;
        let d = &self.deform;
        in_range("deform.strength", d.strength, 0.0, 0.5)?;
        check((2..=64).contains(&d.grid), || {
            format!("deform.grid = {} must be in 2..=64", d.grid)
        })?;
        in_range("deform.max_rotation_deg", d.max_rotation_deg, 0.0, 90.0)?;
        in_range("deform.max_scale", d.max_scale, 0.0, 0.9)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_valid_and_json_roundtrip() {
        let c = SynthConfig::default();
        c.validate().unwrap();
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<SynthConfig>(&j).unwrap(), c);
        // Partial JSON takes defaults; unknown fields are rejected (typos must not pass).
        let p: SynthConfig = serde_json::from_str(r#"{"beta_min": 0.3}"#).unwrap();
        assert_eq!(p.beta_min, 0.3);
        assert_eq!(p.structure_grid, 8);
        assert!(serde_json::from_str::<SynthConfig>(r#"{"beta_mn": 0.3}"#).is_err());
    }

    #[test]
    fn invalid_values_name_the_field() {
        let c = SynthConfig {
            beta_min: 0.8,
            beta_max: 0.2,
            ..Default::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("beta_max"), "{e}");
        let c = SynthConfig {
            perlin_min_exp: 4,
            perlin_max_exp: 2,
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("perlin_min_exp"));
        let mut c = SynthConfig::default();
        c.deform.grid = 1;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("deform.grid"));
    }
}
