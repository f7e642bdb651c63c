//! The method gate of `fit --method sbm|ours`: a model is never made worse by the method.
//!
//! The paper's "+ our method" helps on some categories and hurts on others (see
//! `docs/results.md`). At fit time both models are fitted on the same training images: the
//! baseline (pretrained backbone, no PFAM) and the method's. Both score the same evidence —
//! the calibration normals (held out, never fitted on) and synthetic defects pasted onto them
//! ([`tessera_synth`], the machinery of synthetic calibration) — through
//! [`Detector::score`]. The method is kept only when its mean of image and pixel AUROC on that
//! evidence is higher than the baseline's by more than the evidence's own noise: the margin is
//! 1.645 × the standard error of the difference, from a paired bootstrap over the evidence
//! images (both models scored on the same resampled images, [`paired_margin`]), so a method
//! that is ahead by chance on a few dozen images is not kept. Otherwise the baseline is kept.
//! The numbers and the margin are stored in the model file ([`MethodGate`]) and printed by `fit`.
//!
//! The evidence must not be what the method learned from: a PFAM trained to segment
//! synthetic defects (`--pfam-train synth`) scores the gate's synthetic defects far better than
//! the baseline while being worse on real ones (ksdd, docs/pfam.md). Such a method is never
//! kept by the gate ([`Evidence::independent`] false); `--method-gate off|report` keeps it.

use crate::calibrate::{score_all, score_synthetic};
use crate::detector::Detector;
use crate::meta::Method;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tessera_core::{Error, Result};
use tessera_data::Sample;
use tessera_synth::Synthesizer;

/// One model's result on the gate's evidence.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GateScore {
    /// Image AUROC: synthetic defects against the clean calibration normals.
    pub image_auroc: f64,
    /// Pixel AUROC over the same images (defect pixels from the synthetic masks).
    pub pixel_auroc: f64,
}

impl GateScore {
    /// What the gate compares: the mean of image and pixel AUROC.
    pub fn value(&self) -> f64 {
        (self.image_auroc + self.pixel_auroc) / 2.0
    }
}

/// What the gate measured and chose (stored in the model file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodGate {
    /// The method asked for (`sbm` or `ours`).
    pub asked: Method,
    /// The gate's choice: the asked method when strictly better, else the baseline.
    pub choice: Method,
    /// The method the model uses (the choice, or the asked method with
    /// `--method-gate report`).
    pub kept: Method,
    pub baseline: GateScore,
    pub method: GateScore,
    /// Clean calibration normals scored, and synthetic defects made on them.
    pub normals: usize,
    pub synthetic: usize,
    /// `holdout` (normals never fitted on) or `in-sample` (training images: optimistic for
    /// both models alike).
    pub source: String,
    /// False when the method trained on the same kind of synthetic defects the gate scores:
    /// the numbers are recorded, but cannot vouch for the method.
    #[serde(default = "yes")]
    pub independent: bool,
    /// How much better (in the units of [`GateScore::value`]) the method had to be: 1.645 ×
    /// the paired bootstrap standard error of the difference (0 in files written before the
    /// margin existed).
    #[serde(default)]
    pub margin: f64,
    /// One sentence: which model was kept and why.
    pub reason: String,
}

fn yes() -> bool {
    true
}

/// What the gate's evidence was.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evidence {
    /// Clean calibration normals scored, and synthetic defects made on them.
    pub normals: usize,
    pub synthetic: usize,
    /// The normals were held out from the fit (else training images).
    pub held_out: bool,
    /// The method did not learn from synthetic defects of the gate's kind.
    pub independent: bool,
    /// The noise margin the method must exceed ([`paired_margin`]; 0: strictly better).
    pub margin: f64,
}

impl MethodGate {
    /// Compare the two scores; the method must be better by more than the margin, on
    /// independent evidence, to be kept.
    pub fn decide(asked: Method, baseline: GateScore, method: GateScore, ev: Evidence) -> Self {
        let Evidence {
            normals,
            synthetic,
            held_out,
            independent,
            margin,
        } = ev;
        let margin = if margin.is_finite() {
            margin.max(0.0)
        } else {
            0.0
        };
        let lead = method.value() - baseline.value();
        let better = lead > margin;
        let keep = better && independent;
        let fmt = |s: &GateScore| {
            format!(
                "image {:.2} / pixel {:.2} %",
                s.image_auroc * 100.0,
                s.pixel_auroc * 100.0
            )
        };
        let reason = format!(
            "on {normals} {} normals + {synthetic} synthetic defects, --method {asked} scored {} \
             and the baseline {} (AUROC); {}",
            if held_out { "held-out" } else { "in-sample" },
            fmt(&method),
            fmt(&baseline),
            if keep {
                format!("kept --method {asked}")
            } else if better {
                "kept the baseline: the method's PFAM learned from synthetic defects like these, \
                 so they cannot vouch for it (--method-gate off keeps the method)"
                    .to_string()
            } else if lead > 0.0 {
                format!(
                    "kept the baseline: --method {asked} is ahead by {:.2} points, within the \
                     evidence's noise (margin {:.2} = 1.645 × the paired bootstrap standard \
                     error)",
                    lead * 100.0,
                    margin * 100.0
                )
            } else {
                format!("kept the baseline: --method {asked} is not better on this category")
            }
        );
        let choice = if keep { asked } else { Method::Baseline };
        Self {
            asked,
            choice,
            kept: choice,
            baseline,
            method,
            normals,
            synthetic,
            source: if held_out { "holdout" } else { "in-sample" }.into(),
            independent,
            margin,
            reason,
        }
    }
}

/// Pixels kept per evidence image for the bootstrap (a seeded uniform sample, the same
/// positions for both models): the resampled pixel AUROCs then sort tens of thousands of
/// values, not millions.
const BOOT_PIXELS: usize = 2048;
/// Bootstrap resamples of the evidence images.
const BOOT_REPS: usize = 200;
/// One-sided 95 %: the method is kept when its lead exceeds 1.645 standard errors.
const BOOT_Z: f64 = 1.645;

/// One model's scores on the gate's evidence: the AUROCs, and what [`paired_margin`]
/// resamples (per image: the image score and a seeded sample of its pixels).
#[derive(Debug, Clone)]
pub struct GateSample {
    pub score: GateScore,
    /// Clean normals first, then synthetic defects.
    normals: usize,
    image: Vec<f32>,
    pixels: Vec<(Vec<f32>, Vec<bool>)>,
}

/// Score `det` on `normals` and on synthetic defects made on them (seeded: the same images
/// for every detector).
pub fn gate_score(
    det: &Detector,
    normals: &[Sample],
    synth: &Synthesizer,
    seed: u64,
    batch_size: usize,
    obs: &dyn crate::Observer,
) -> Result<GateSample> {
    let clean = score_all(det, normals, batch_size, obs)?;
    let (defects, masks) = score_synthetic(det, normals, synth, seed, batch_size)?;
    let mut scores: Vec<f32> = clean.iter().map(|m| m.image_score()).collect();
    let mut labels = vec![false; scores.len()];
    scores.extend(defects.iter().map(|m| m.image_score()));
    labels.extend(std::iter::repeat_n(true, defects.len()));
    let image_auroc = tessera_eval::auroc(&scores, &labels);
    let mut px: Vec<f32> = clean.iter().flat_map(|m| m.data.iter().copied()).collect();
    let mut pl = vec![false; px.len()];
    for (m, k) in defects.iter().zip(&masks) {
        px.extend_from_slice(&m.data);
        pl.extend_from_slice(k);
    }
    let pixel_auroc = tessera_eval::auroc(&px, &pl);
    let score = match (image_auroc, pixel_auroc) {
        (Some(image_auroc), Some(pixel_auroc)) => GateScore {
            image_auroc,
            pixel_auroc,
        },
        _ => {
            return Err(Error::Config(
                "method gate: the synthetic defects gave no AUROC (no defect pixels, or NaN \
                 scores)"
                    .into(),
            ))
        }
    };
    // Clean images have no defect pixel (and may differ in size from each other).
    let pixels = clean
        .iter()
        .map(|m| (m, None))
        .chain(defects.iter().zip(&masks).map(|(m, k)| (m, Some(k))))
        .enumerate()
        .map(|(i, (m, k))| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ ((i as u64) << 20));
            let n = k.map_or(m.data.len(), |k| m.data.len().min(k.len()));
            (0..BOOT_PIXELS.min(n))
                .map(|_| {
                    let j = rng.random_range(0..n);
                    (m.data[j], k.is_some_and(|k| k[j]))
                })
                .unzip()
        })
        .collect();
    Ok(GateSample {
        score,
        normals: clean.len(),
        image: scores,
        pixels,
    })
}

/// The margin the method must exceed: [`BOOT_Z`] × the standard deviation of
/// `value(method) − value(baseline)` over [`BOOT_REPS`] paired bootstrap resamples of the
/// evidence (normals and defects resampled separately, the same images for both models;
/// pixel AUROC on each image's pixel sample). Seeded; 0 when the two samples do not pair.
pub fn paired_margin(baseline: &GateSample, method: &GateSample, seed: u64) -> f64 {
    let (n, total) = (baseline.normals, baseline.image.len());
    if n == 0
        || n == total
        || method.normals != n
        || method.image.len() != total
        || baseline.pixels.len() != total
        || method.pixels.len() != total
    {
        return 0.0;
    }
    let value = |s: &GateSample, pick: &[usize]| -> Option<f64> {
        let labels: Vec<bool> = pick.iter().map(|&i| i >= n).collect();
        let scores: Vec<f32> = pick.iter().map(|&i| s.image[i]).collect();
        let image = tessera_eval::auroc(&scores, &labels)?;
        let (mut ps, mut pl) = (Vec::new(), Vec::new());
        for &i in pick {
            ps.extend_from_slice(&s.pixels[i].0);
            pl.extend_from_slice(&s.pixels[i].1);
        }
        let pixel = tessera_eval::auroc(&ps, &pl)?;
        Some((image + pixel) / 2.0)
    };
    let diffs: Vec<f64> = (0..BOOT_REPS)
        .into_par_iter()
        .filter_map(|r| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed.wrapping_add(r as u64));
            let mut pick: Vec<usize> = (0..n).map(|_| rng.random_range(0..n)).collect();
            pick.extend((n..total).map(|_| rng.random_range(n..total)));
            Some(value(method, &pick)? - value(baseline, &pick)?)
        })
        .collect();
    if diffs.len() < 2 {
        return 0.0;
    }
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    let var = diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (diffs.len() - 1) as f64;
    BOOT_Z * var.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(i: f64, p: f64) -> GateScore {
        GateScore {
            image_auroc: i,
            pixel_auroc: p,
        }
    }

    fn ev(held_out: bool, independent: bool) -> Evidence {
        Evidence {
            normals: 10,
            synthetic: 10,
            held_out,
            independent,
            margin: 0.0,
        }
    }

    #[test]
    fn the_method_must_be_strictly_better() {
        let g = MethodGate::decide(Method::Ours, s(0.9, 0.9), s(0.95, 0.9), ev(true, true));
        assert_eq!(g.kept, Method::Ours);
        assert!(g.reason.contains("kept --method ours"), "{}", g.reason);
        let g = MethodGate::decide(Method::Ours, s(0.9, 0.9), s(0.9, 0.9), ev(true, true));
        assert_eq!(g.kept, Method::Baseline);
        let g = MethodGate::decide(Method::Sbm, s(0.9, 0.95), s(0.97, 0.85), ev(false, true));
        assert_eq!(g.kept, Method::Baseline);
        assert!(g.reason.contains("in-sample") && g.reason.contains("not better"));
        assert_eq!(g.source, "in-sample");
    }

    #[test]
    fn a_lead_within_the_margin_keeps_the_baseline() {
        let mut e = ev(true, true);
        e.margin = 0.01;
        // Ahead by 0.005 (mean of image and pixel): inside the margin.
        let g = MethodGate::decide(Method::Ours, s(0.9, 0.9), s(0.91, 0.9), e);
        assert_eq!(g.kept, Method::Baseline);
        assert!(
            g.reason.contains("within the evidence's noise"),
            "{}",
            g.reason
        );
        assert_eq!(g.margin, 0.01);
        // Ahead by 0.015: beyond it.
        let g = MethodGate::decide(Method::Ours, s(0.9, 0.9), s(0.92, 0.91), e);
        assert_eq!(g.kept, Method::Ours);
        // A margin that is not a number does not block a decision; a negative one counts as 0.
        e.margin = f64::NAN;
        let g = MethodGate::decide(Method::Ours, s(0.9, 0.9), s(0.91, 0.9), e);
        assert_eq!((g.kept, g.margin), (Method::Ours, 0.0));
        e.margin = -1.0;
        let g = MethodGate::decide(Method::Ours, s(0.9, 0.9), s(0.9, 0.9), e);
        assert_eq!((g.kept, g.margin), (Method::Baseline, 0.0));
    }

    /// A sample of `n` normals and `n` defects: image scores and 64 pixels per image, the
    /// defects' pixels half anomalous; `noise` blurs the separation.
    fn sample(n: usize, noise: f32, seed: u64) -> GateSample {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut image = Vec::new();
        let mut pixels = Vec::new();
        for i in 0..2 * n {
            let defect = i >= n;
            image.push(defect as u8 as f32 + noise * rng.random::<f32>());
            let labels: Vec<bool> = (0..64).map(|j| defect && j % 2 == 0).collect();
            let px = labels
                .iter()
                .map(|&l| l as u8 as f32 + noise * rng.random::<f32>())
                .collect();
            pixels.push((px, labels));
        }
        GateSample {
            score: s(0.0, 0.0),
            normals: n,
            image,
            pixels,
        }
    }

    #[test]
    fn the_margin_measures_the_evidence_noise() {
        // The same scores for both models: every resample gives a difference of 0.
        let a = sample(20, 2.0, 1);
        assert_eq!(paired_margin(&a, &a, 7), 0.0);
        // Two models that differ by noise: a margin, the same for the same seed, smaller with
        // five times the evidence.
        let (small, small_b) = (sample(20, 2.0, 1), sample(20, 2.0, 2));
        let m = paired_margin(&small, &small_b, 7);
        assert!(m > 0.01 && m < 0.5, "{m}");
        assert_eq!(m, paired_margin(&small, &small_b, 7));
        let (big, big_b) = (sample(100, 2.0, 1), sample(100, 2.0, 2));
        let mb = paired_margin(&big, &big_b, 7);
        assert!(mb < m * 0.7, "{mb} vs {m}");
        // Samples that do not pair (different evidence sizes) give no margin.
        assert_eq!(paired_margin(&small, &big, 7), 0.0);
    }

    #[test]
    fn evidence_the_method_learned_from_cannot_keep_it() {
        let g = MethodGate::decide(Method::Ours, s(0.9, 0.8), s(0.99, 0.85), ev(true, false));
        assert_eq!((g.choice, g.kept), (Method::Baseline, Method::Baseline));
        assert!(!g.independent);
        assert!(g.reason.contains("cannot vouch"), "{}", g.reason);
        // Worse is worse, whatever the evidence.
        let g = MethodGate::decide(Method::Ours, s(0.9, 0.8), s(0.8, 0.8), ev(true, false));
        assert!(g.reason.contains("not better"), "{}", g.reason);
        // Old model files (no field) read as independent evidence.
        let mut v = serde_json::to_value(&g).unwrap();
        v.as_object_mut().unwrap().remove("independent");
        let back: MethodGate = serde_json::from_value(v).unwrap();
        assert!(back.independent);
    }
}
