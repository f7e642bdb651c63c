//! The method gate of `fit --method sbm|ours`: a model is never made worse by the method.
//!
//! The paper's "+ our method" helps on some categories and hurts on others (see
//! `docs/results.md`). At fit time both models are fitted on the same training images: the
//! baseline (pretrained backbone, no PFAM) and the method's. Both score the same evidence —
//! the calibration normals (held out, never fitted on) and synthetic defects pasted onto them
//! ([`tessera_synth`], the machinery of synthetic calibration) — through
//! [`Detector::score`]. The method is kept only when its mean of image and pixel AUROC on that
//! evidence is higher than the baseline's; otherwise the baseline is kept. Both numbers are
//! stored in the model file ([`MethodGate`]) and printed by `fit`.

use crate::calibrate::{score_all, score_synthetic};
use crate::detector::Detector;
use crate::meta::Method;
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
    /// One sentence: which model was kept and why.
    pub reason: String,
}

impl MethodGate {
    /// Compare the two scores; the method must be strictly better to be kept.
    pub fn decide(
        asked: Method,
        baseline: GateScore,
        method: GateScore,
        normals: usize,
        synthetic: usize,
        held_out: bool,
    ) -> Self {
        let better = method.value() > baseline.value();
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
            if better {
                format!("kept --method {asked}")
            } else {
                format!("kept the baseline: --method {asked} is not better on this category")
            }
        );
        let choice = if better { asked } else { Method::Baseline };
        Self {
            asked,
            choice,
            kept: choice,
            baseline,
            method,
            normals,
            synthetic,
            source: if held_out { "holdout" } else { "in-sample" }.into(),
            reason,
        }
    }
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
) -> Result<GateScore> {
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
    match (image_auroc, pixel_auroc) {
        (Some(image_auroc), Some(pixel_auroc)) => Ok(GateScore {
            image_auroc,
            pixel_auroc,
        }),
        _ => Err(Error::Config(
            "method gate: the synthetic defects gave no AUROC (no defect pixels, or NaN scores)"
                .into(),
        )),
    }
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

    #[test]
    fn the_method_must_be_strictly_better() {
        let g = MethodGate::decide(Method::Ours, s(0.9, 0.9), s(0.95, 0.9), 10, 10, true);
        assert_eq!(g.kept, Method::Ours);
        assert!(g.reason.contains("kept --method ours"), "{}", g.reason);
        let g = MethodGate::decide(Method::Ours, s(0.9, 0.9), s(0.9, 0.9), 10, 10, true);
        assert_eq!(g.kept, Method::Baseline);
        let g = MethodGate::decide(Method::Sbm, s(0.9, 0.95), s(0.97, 0.85), 10, 10, false);
        assert_eq!(g.kept, Method::Baseline);
        assert!(g.reason.contains("in-sample") && g.reason.contains("not better"));
        assert_eq!(g.source, "in-sample");
    }
}
