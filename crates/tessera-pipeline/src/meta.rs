//! The typed metadata of a model file (the `tessera` entry of its safetensors header).
//!
//! Format 1 files (Tessera before the pipeline crate) read into the same types: the scorer's
//! `{kind, config}` pair is [`ScorerConfig`]'s serde form, `method` is [`Method`]'s name, and
//! the SBM section's optional fields default to absent.

use crate::names::named_enum;
use crate::ScorerConfig;
use serde::{Deserialize, Serialize};
use tessera_backbone::Arch;
use tessera_core::model::Preprocess;

named_enum! {
    /// What was fitted besides the scorer.
    #[derive(Default)]
    pub enum Method {
        /// The scorer on plain ImageNet features.
        #[default]
        Baseline => "baseline",
        /// The scorer on an SBM-tuned backbone (object categories; see [`crate::SbmMode`]).
        Sbm => "sbm",
        /// The paper's "+ our method": SBM where it applies, plus PFAM before the scorer.
        Ours => "ours",
    }
}

/// Which backbone produced the features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackboneMeta {
    pub arch: Arch,
    /// Which stages feed the scorer (1-based: 1 = layer1).
    pub layers: Vec<usize>,
    /// Where the weights came from (file path or hub repo), for the record.
    pub source: String,
}

/// Facts about the fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitMeta {
    /// Wall time of the whole fit (features + scorer + calibration), seconds.
    pub seconds: f64,
    /// Number of images the scorer was fitted on.
    pub images: usize,
    /// The data the model was fitted on (path as given).
    pub data: String,
    /// Seconds since the Unix epoch when the fit finished.
    pub created_unix: u64,
}

/// What the SBM stage did (`--method sbm|ours`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SbmMeta {
    /// Whether the backbone used is SBM-tuned.
    pub applied: bool,
    /// Why SBM was skipped (when not applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The held-out jigsaw gate of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<tessera_sbm::Gate>,
    /// Final relative feature drift per layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_layers: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<tessera_sbm::Anchor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor_weight: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_backbone: Option<f64>,
    /// The weights SBM started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Whether PFAM trained with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pfam: Option<bool>,
    /// `--pfam-train synth`: how PFAM learned to segment synthetic defects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pfam_segment: Option<tessera_sbm::SegmentReport>,
}

impl SbmMeta {
    /// SBM was skipped, for `reason`.
    pub fn skipped(reason: impl Into<String>) -> Self {
        Self {
            applied: false,
            reason: Some(reason.into()),
            gate: None,
            drift: None,
            epochs: None,
            train_layers: None,
            anchor: None,
            anchor_weight: None,
            lr_backbone: None,
            source: None,
            pfam: None,
            pfam_segment: None,
        }
    }

    /// What an SBM run's report says.
    pub fn from_report(r: &tessera_sbm::SbmReport) -> Self {
        Self {
            applied: true,
            reason: None,
            gate: Some(r.gate.clone()),
            drift: Some(r.drift.clone()),
            epochs: Some(r.history.len()),
            train_layers: Some(r.config.train_layers.clone()),
            anchor: Some(r.config.anchor),
            anchor_weight: Some(r.config.anchor_weight),
            lr_backbone: Some(r.config.lr_backbone),
            source: Some(r.source.clone()),
            pfam: Some(r.config.pfam.is_some()),
            pfam_segment: None,
        }
    }
}

/// Everything in a model file besides tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    pub format: u32,
    pub tessera_version: String,
    pub method: Method,
    pub seed: u64,
    pub preprocess: Preprocess,
    pub backbone: BackboneMeta,
    /// The scorer's kind and configuration.
    pub scorer: ScorerConfig,
    pub fit: FitMeta,
    /// The image threshold: anomalous when the image score is above it (from calibration;
    /// for format-1 files, the highest pixel score on training images).
    pub threshold: f32,
    /// Score range used to colour heatmaps consistently across runs: (low, high); the pixel
    /// threshold sits in the middle.
    pub heat_range: (f32, f32),
    /// How the thresholds were chosen and the calibration scores behind them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<crate::Calibration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sbm: Option<SbmMeta>,
    /// `--method ours`: the PFAM configuration (its tensors are stored under `pfam.`); features
    /// pass through PFAM before the scorer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pfam: Option<tessera_pfam::PfamConfig>,
    /// `--method sbm|ours`: the method gate's evidence and which model it kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<crate::MethodGate>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_format_1_metadata() {
        // As Tessera 0.1 (format 1) wrote it.
        let v1 = r#"{"format":1,"tessera_version":"0.1.0","method":"sbm","seed":0,
            "preprocess":{"resize":256,"crop":224,"mean":[0.485,0.456,0.406],"std":[0.229,0.224,0.225]},
            "backbone":{"arch":"resnet18","layers":[1,2,3],"source":"w.safetensors"},
            "scorer":{"kind":"padim","config":{"dims":null,"seed":0,"reg":0.01,"levels":[1,2,3]}},
            "fit":{"seconds":7.4,"images":209,"data":"bottle","created_unix":1},
            "threshold":0.5,"heat_range":[0.1,0.9],
            "sbm":{"applied":false,"reason":"'x' is a texture category"}}"#;
        let m: ModelMeta = serde_json::from_str(v1).unwrap();
        assert_eq!(m.method, Method::Sbm);
        assert_eq!(m.backbone.arch, Arch::ResNet18);
        assert!(matches!(m.scorer, ScorerConfig::Padim(ref c) if c.reg == 0.01));
        assert!(!m.sbm.as_ref().unwrap().applied);
        // And writes the scorer the same way.
        let back = serde_json::to_value(&m).unwrap();
        assert_eq!(back["scorer"]["kind"], "padim");
        assert_eq!(
            back["scorer"]["config"]["levels"],
            serde_json::json!([1, 2, 3])
        );
    }

    #[test]
    fn names_parse_both_ways() {
        for n in Method::NAMES {
            assert_eq!(n.parse::<Method>().unwrap().name(), *n);
        }
        assert!("Ours".parse::<Method>().is_ok());
        let e = "best".parse::<Method>().unwrap_err().to_string();
        assert!(e.contains("baseline, sbm, ours"), "{e}");
    }
}
