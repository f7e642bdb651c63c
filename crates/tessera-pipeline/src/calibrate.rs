//! Calibration: thresholds a quality engineer can trust, from normal images the model never
//! trained on.
//!
//! At fit time a seeded slice of the training images is held out ([`split_holdout`]); the
//! fitted detector scores it through [`Detector::score`], the same path as `test` and
//! `predict`. The image threshold is the conformal order statistic for the target false-alarm
//! rate ([`tessera_eval::decision::conformal_threshold`]): on a new normal part from the same
//! line, `P(score > threshold) ≤ target`, whatever the scorer. The pixel threshold for masks is
//! the image threshold (so a part judged good has an empty mask), or, with synthetic
//! calibration, the F1-optimal pixel threshold on synthetic defects pasted onto the
//! calibration images ([`tessera_synth`]); the image threshold is then F1-optimal on them too,
//! and the false-alarm guarantee is replaced by the measured rate on the calibration normals.

use crate::batches::batches;
use crate::detector::Detector;
use crate::names::named_enum;
use crate::observer::{stage, Counter, Observer};
use candle_core::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tessera_core::{AnomalyMap, Error, Result};
use tessera_data::{load_image, normalize, Sample};
use tessera_eval::decision::{conformal_threshold, p_value, Conformal, Normalizer};
use tessera_synth::{SynthConfig, Synthesizer};

named_enum! {
    /// How thresholds are chosen.
    #[derive(Default)]
    pub enum CalibrationMode {
        /// From calibration normals only: the conformal threshold for the target false-alarm
        /// rate (images) and the same threshold for masks.
        #[default]
        Normal => "normal",
        /// Also from synthetic defects on the calibration images: F1-optimal image and pixel
        /// thresholds.
        Synthetic => "synthetic",
    }
}

/// Calibration settings of `fit`.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationOptions {
    pub mode: CalibrationMode,
    /// Fraction of the normal training images held out for calibration (never fitted on).
    /// `0` calibrates on training images themselves: no guarantee, and said so.
    pub fraction: f64,
    /// The false-alarm rate the image threshold must keep (conformal).
    pub target_fpr: f64,
    /// Texture images for synthetic defects (optional; the structure source otherwise).
    pub textures: Option<PathBuf>,
    /// The seed that draws the held-out images; `None`: [`DEFAULT_SPLIT_SEED`], whatever the
    /// fit's own seed — so that `--seed` varies the method's random choices only, not which
    /// images it is fitted on (which moves ksdd's PaDiM image AUROC by ~2 points by itself).
    pub split_seed: Option<u64>,
}

/// The seed that draws the calibration hold-out unless one is given.
pub const DEFAULT_SPLIT_SEED: u64 = 0;

impl CalibrationOptions {
    /// The seed that draws the hold-out.
    pub fn split_seed(&self) -> u64 {
        self.split_seed.unwrap_or(DEFAULT_SPLIT_SEED)
    }
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        Self {
            mode: CalibrationMode::Normal,
            fraction: 0.2,
            target_fpr: 0.05,
            textures: None,
            split_seed: None,
        }
    }
}

impl CalibrationOptions {
    /// Check the values.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..0.9).contains(&self.fraction) || !self.fraction.is_finite() {
            return Err(Error::Config(format!(
                "--calibration-fraction {} must lie in [0, 0.9)",
                self.fraction
            )));
        }
        if !(self.target_fpr > 0.0 && self.target_fpr < 1.0) {
            return Err(Error::Config(format!(
                "--target-fpr {} must lie in (0, 1)",
                self.target_fpr
            )));
        }
        Ok(())
    }
}

/// A summary of a set of scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoreSummary {
    pub min: f32,
    pub max: f32,
    pub mean: f32,
    /// Median, 95th and 99th percentile (nearest rank).
    pub p50: f32,
    pub p95: f32,
    pub p99: f32,
}

impl ScoreSummary {
    fn of(values: &mut [f32]) -> Self {
        values.sort_by(f32::total_cmp);
        let n = values.len();
        let q = |p: f64| values[(((n as f64) * p).ceil() as usize).clamp(1, n) - 1];
        Self {
            min: values[0],
            max: values[n - 1],
            mean: (values.iter().map(|&v| v as f64).sum::<f64>() / n as f64) as f32,
            p50: q(0.5),
            p95: q(0.95),
            p99: q(0.99),
        }
    }
}

/// What synthetic calibration found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyntheticCalibration {
    /// Calibration images that received a synthetic defect.
    pub images: usize,
    /// The F1-optimal image threshold (synthetic defects vs clean calibration images), its F1.
    pub image_threshold: f32,
    pub image_f1: f64,
    /// The F1-optimal pixel threshold over their masks, its F1.
    pub pixel_threshold: f32,
    pub pixel_f1: f64,
    /// The false-alarm rate of the image threshold on the clean calibration images.
    pub calibration_fpr: f64,
    /// The share of synthetic defects caught at the image threshold.
    pub synthetic_recall: f64,
}

/// How a model's thresholds were chosen, and the numbers behind them (stored in the model
/// file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub mode: CalibrationMode,
    /// `holdout` (normal images never fitted on) or `in-sample` (training images: optimistic).
    pub source: String,
    pub fraction: f64,
    pub seed: u64,
    /// The seed that drew the held-out images when it was not `seed` (`--split-seed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_seed: Option<u64>,
    /// Calibration normals scored.
    pub images: usize,
    /// Their image scores, sorted (for p-values).
    pub scores: Vec<f32>,
    pub image: ScoreSummary,
    /// Pixel scores of the calibration normals.
    pub pixel: ScoreSummary,
    /// The conformal threshold for the target false-alarm rate, and what it guarantees.
    pub conformal: Conformal,
    /// The image threshold in use: anomalous when `score > image_threshold`.
    pub image_threshold: f32,
    /// The pixel threshold of predicted masks.
    pub pixel_threshold: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthetic: Option<SyntheticCalibration>,
    /// What the user should know (a set too small for the target, in-sample scores, …).
    #[serde(default)]
    pub notes: Vec<String>,
}

impl Calibration {
    /// The image-score normaliser (0.5 at the image threshold).
    pub fn image_normalizer(&self) -> Normalizer {
        Normalizer {
            threshold: self.image_threshold,
            min: self.image.min,
            max: self.image.max,
        }
    }

    /// The pixel normaliser (0.5 at the pixel threshold): heatmap colours.
    pub fn pixel_normalizer(&self) -> Normalizer {
        Normalizer {
            threshold: self.pixel_threshold,
            min: self.pixel.min,
            max: self.pixel.max,
        }
    }

    /// The conformal p-value of an image score among the calibration normals.
    pub fn p_value(&self, score: f32) -> f64 {
        p_value(&self.scores, score)
    }
}

/// Split `samples` into (fit, calibration) with `fraction` held out, chosen by `seed`; each
/// part keeps the input order. At least two images stay for fitting.
pub fn split_holdout(samples: Vec<Sample>, fraction: f64, seed: u64) -> (Vec<Sample>, Vec<Sample>) {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let n = samples.len();
    let k = ((n as f64 * fraction).round() as usize).min(n.saturating_sub(2));
    if k == 0 {
        return (samples, Vec::new());
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
        seed ^ 0xca11_b7a7_e000_0001,
    ));
    let mut held = vec![false; n];
    for &i in &idx[..k] {
        held[i] = true;
    }
    let (mut fit, mut cal) = (Vec::new(), Vec::new());
    for (s, h) in samples.into_iter().zip(held) {
        if h {
            cal.push(s);
        } else {
            fit.push(s);
        }
    }
    (fit, cal)
}

/// The threshold `t` for "anomalous when `score > t`" equivalent to "`score >= f`".
fn just_below(f: f32) -> f32 {
    if f.is_nan() || f == f32::NEG_INFINITY {
        return f;
    }
    if f == 0.0 {
        return -f32::from_bits(1);
    }
    let b = f.to_bits();
    f32::from_bits(if f > 0.0 { b - 1 } else { b + 1 })
}

/// Score images through the detector; the maps.
pub(crate) fn score_all(
    det: &Detector,
    samples: &[Sample],
    batch_size: usize,
    obs: &dyn Observer,
) -> Result<Vec<AnomalyMap>> {
    let device = det.backbone.device().clone();
    let count = Counter::start(obs, stage::CALIBRATE, samples.len() as u64);
    let mut maps = Vec::with_capacity(samples.len());
    for b in batches(samples, &det.meta.preprocess, batch_size, &device) {
        let (m, _) = det.score(&b?.tensor)?;
        count.add(m.len() as u64);
        maps.extend(m);
    }
    Ok(maps)
}

/// One synthetic image: normalised CHW values, its mask, its size.
type Synthesized = (Vec<f32>, Vec<bool>, (u32, u32));

/// Synthetic defects on the calibration images, scored: (maps, masks).
pub(crate) fn score_synthetic(
    det: &Detector,
    samples: &[Sample],
    synth: &Synthesizer,
    seed: u64,
    batch_size: usize,
) -> Result<(Vec<AnomalyMap>, Vec<Vec<bool>>)> {
    let pre = &det.meta.preprocess;
    let device = det.backbone.device().clone();
    let mut maps = Vec::new();
    let mut masks = Vec::new();
    for (ci, chunk) in samples.chunks(batch_size.max(1)).enumerate() {
        let made: Vec<Synthesized> = chunk
            .par_iter()
            .enumerate()
            .map(|(k, s)| {
                let img = load_image(&s.path, pre)?;
                let s = synth.synthesize(&img.display, seed ^ ((ci * batch_size + k) as u64))?;
                let mask: Vec<bool> = s.mask.pixels().map(|p| p[0] > 127).collect();
                Ok((normalize(&s.image, pre), mask, s.image.dimensions()))
            })
            .collect::<Result<_>>()?;
        let (w, h) = made[0].2;
        let n = made.len();
        let mut data = Vec::with_capacity(n * 3 * (w * h) as usize);
        for (chw, mask, _) in made {
            data.extend(chw);
            masks.push(mask);
        }
        let x = Tensor::from_vec(data, (n, 3, h as usize, w as usize), &device)?;
        maps.extend(det.score(&x)?.0);
    }
    Ok((maps, masks))
}

/// Facts about a calibration run besides its options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CalibrationRun {
    /// The normals were held out from fitting (else: training images, in-sample).
    pub held_out: bool,
    /// Synthetic defects go on the object's foreground only (object categories).
    pub foreground: bool,
    pub seed: u64,
    pub batch_size: usize,
}

/// Score the calibration normals (and, in synthetic mode, synthetic defects on them) through
/// `det` and choose the thresholds.
pub fn calibrate(
    det: &Detector,
    normals: &[Sample],
    opts: &CalibrationOptions,
    run: CalibrationRun,
    obs: &dyn Observer,
) -> Result<Calibration> {
    let CalibrationRun {
        held_out,
        foreground: synth_foreground,
        seed,
        batch_size,
    } = run;
    opts.validate()?;
    if normals.is_empty() {
        return Err(Error::Config(
            "calibration needs at least one normal image".into(),
        ));
    }
    let maps = score_all(det, normals, batch_size, obs)?;
    let mut scores: Vec<f32> = maps.iter().map(|m| m.image_score()).collect();
    let mut pixels: Vec<f32> = maps.iter().flat_map(|m| m.data.iter().copied()).collect();
    let conformal = conformal_threshold(&scores, opts.target_fpr);
    let mut notes = Vec::new();
    if !held_out {
        notes.push(
            "calibrated on training images (in-sample, --calibration-fraction 0): unseen normal \
             parts score higher, so the real false-alarm rate is higher than stated"
                .to_string(),
        );
    }
    if !conformal.target_met {
        notes.push(format!(
            "{} calibration images are too few for a {:.1} % false-alarm target (it needs {}); \
             the threshold is their highest score, which guarantees {:.1} %",
            conformal.n,
            opts.target_fpr * 100.0,
            (1.0 / opts.target_fpr - 1.0).ceil(),
            conformal.guaranteed_fpr * 100.0
        ));
    }
    let (image_threshold, pixel_threshold, synthetic) = match opts.mode {
        CalibrationMode::Normal => (conformal.threshold, conformal.threshold, None),
        CalibrationMode::Synthetic => {
            let synth = Synthesizer::new(
                SynthConfig {
                    foreground: synth_foreground,
                    ..Default::default()
                },
                opts.textures.as_deref(),
            )?;
            let (smaps, smasks) = score_synthetic(det, normals, &synth, seed, batch_size)?;
            let mut all: Vec<f32> = scores.clone();
            let mut labels = vec![false; scores.len()];
            all.extend(smaps.iter().map(|m| m.image_score()));
            labels.extend(std::iter::repeat_n(true, smaps.len()));
            let (image_f1, it) = tessera_eval::f1_max(&all, &labels).ok_or_else(|| {
                Error::Config("synthetic calibration: no F1-optimal image threshold".into())
            })?;
            let mut px: Vec<f32> = pixels.clone();
            let mut pl = vec![false; px.len()];
            for (m, k) in smaps.iter().zip(&smasks) {
                px.extend_from_slice(&m.data);
                pl.extend_from_slice(k);
            }
            let (pixel_f1, pt) = tessera_eval::f1_max(&px, &pl).ok_or_else(|| {
                Error::Config("synthetic calibration: no F1-optimal pixel threshold".into())
            })?;
            let (it, pt) = (just_below(it), just_below(pt));
            let fp = scores.iter().filter(|&&s| s > it).count();
            let tp = smaps.iter().filter(|m| m.image_score() > it).count();
            let s = SyntheticCalibration {
                images: smaps.len(),
                image_threshold: it,
                image_f1,
                pixel_threshold: pt,
                pixel_f1,
                calibration_fpr: fp as f64 / scores.len() as f64,
                synthetic_recall: tp as f64 / smaps.len().max(1) as f64,
            };
            if s.calibration_fpr > opts.target_fpr {
                notes.push(format!(
                    "the F1-optimal threshold on synthetic defects flags {:.1} % of the \
                     calibration normals, above the {:.1} % target; the conformal threshold for \
                     the target would be {:.4}",
                    s.calibration_fpr * 100.0,
                    opts.target_fpr * 100.0,
                    conformal.threshold
                ));
            }
            (it, pt, Some(s))
        }
    };
    let image = ScoreSummary::of(&mut scores);
    let pixel = ScoreSummary::of(&mut pixels);
    Ok(Calibration {
        mode: opts.mode,
        source: if held_out { "holdout" } else { "in-sample" }.into(),
        fraction: opts.fraction,
        seed,
        split_seed: Some(opts.split_seed()).filter(|&s| s != seed),
        images: normals.len(),
        scores,
        image,
        pixel,
        conformal,
        image_threshold,
        pixel_threshold,
        synthetic,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holdout_is_seeded_disjoint_and_keeps_two() {
        let samples: Vec<Sample> = (0..10)
            .map(|i| Sample {
                path: format!("{i}.png").into(),
                defect_type: "good".into(),
                mask: None,
                name: format!("good/{i}.png"),
            })
            .collect();
        let (fit, cal) = split_holdout(samples.clone(), 0.2, 1);
        assert_eq!((fit.len(), cal.len()), (8, 2));
        assert!(cal.iter().all(|c| !fit.contains(c)));
        assert_eq!(split_holdout(samples.clone(), 0.2, 1).1, cal);
        assert_ne!(split_holdout(samples.clone(), 0.2, 2).1, cal);
        let (fit, cal) = split_holdout(samples[..3].to_vec(), 0.9, 0);
        assert_eq!((fit.len(), cal.len()), (2, 1));
        let (fit, cal) = split_holdout(samples, 0.0, 0);
        assert_eq!((fit.len(), cal.len()), (10, 0));
    }

    #[test]
    fn just_below_flips_the_rule() {
        for f in [1.5f32, 0.0, -2.0, 1e-30] {
            let t = just_below(f);
            assert!(t < f, "{f}");
            // Nothing lies strictly between t and f: they are neighbouring floats.
            assert!(t.to_bits().abs_diff(f.to_bits()) <= 1 || f == 0.0, "{f}");
        }
    }
}
