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
//!
//! The evidence must not be what the method learned from: a PFAM trained to segment
//! synthetic defects (`--pfam-train synth`) scores the gate's synthetic defects far better than
//! the baseline while being worse on real ones (ksdd, docs/pfam.md). Such a method is never
//! kept by the gate ([`Evidence::independent`] false); `--method-gate off|report` keeps it.

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
    /// False when the method trained on the same kind of synthetic defects the gate scores:
    /// the numbers are recorded, but cannot vouch for the method.
    #[serde(default = "yes")]
    pub independent: bool,
    /// One sentence: which model was kept and why.
    pub reason: String,
}

fn yes() -> bool {
    true
}

/// What the gate's evidence was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evidence {
    /// Clean calibration normals scored, and synthetic defects made on them.
    pub normals: usize,
    pub synthetic: usize,
    /// The normals were held out from the fit (else training images).
    pub held_out: bool,
    /// The method did not learn from synthetic defects of the gate's kind.
    pub independent: bool,
}

impl MethodGate {
    /// Compare the two scores; the method must be strictly better, on independent evidence,
    /// to be kept.
    pub fn decide(asked: Method, baseline: GateScore, method: GateScore, ev: Evidence) -> Self {
        let Evidence {
            normals,
            synthetic,
            held_out,
            independent,
        } = ev;
        let better = method.value() > baseline.value();
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

    fn ev(held_out: bool, independent: bool) -> Evidence {
        Evidence {
            normals: 10,
            synthetic: 10,
            held_out,
            independent,
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
