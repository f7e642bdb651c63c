//! What xtask reads from the `tessera` binary, typed: `test`'s report, `fit`'s summary and
//! `data info`. xtask does not link the library crates (so `cargo xtask demo` compiles candle
//! once, for the binary); the test below keeps these in step with `tessera_eval::Report`.

use serde::Deserialize;
use std::path::Path;

/// The fields of `tessera_eval::Report` that xtask uses.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct TestReport {
    pub image_auroc: Option<f64>,
    pub pixel_auroc: Option<f64>,
    #[serde(default)]
    pub pixel_aupro: Option<f64>,
    pub image_f1_max: Option<f64>,
    pub pixel_f1_max: Option<f64>,
    pub fit_seconds: f64,
    pub ms_per_image: f64,
    pub feature_ms_per_image: f64,
    pub score_ms_per_image: f64,
    pub method: String,
    #[serde(default)]
    pub counts: Counts,
    /// Decisions at the model's stored thresholds.
    #[serde(default)]
    pub operating_point: Option<OperatingPoints>,
}

/// The image counts of a report.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Counts {
    pub images: usize,
}

/// The decisions of a report at the model's thresholds.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct OperatingPoints {
    pub image: OperatingPoint,
    #[serde(default)]
    pub pixel: Option<OperatingPoint>,
}

/// One operating point (the rates xtask tabulates).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct OperatingPoint {
    pub threshold: f32,
    pub false_alarm_rate: Option<f64>,
    pub recall: Option<f64>,
    pub precision: Option<f64>,
    pub f1: Option<f64>,
}

impl TestReport {
    /// A metric by its JSON name.
    pub fn metric(&self, name: &str) -> Option<f64> {
        match name {
            "image_auroc" => self.image_auroc,
            "pixel_auroc" => self.pixel_auroc,
            "pixel_aupro" => self.pixel_aupro,
            "image_f1_max" => self.image_f1_max,
            "pixel_f1_max" => self.pixel_f1_max,
            "false_alarm_rate" => self.operating_point.as_ref()?.image.false_alarm_rate,
            "recall" => self.operating_point.as_ref()?.image.recall,
            "precision" => self.operating_point.as_ref()?.image.precision,
            "f1_at_threshold" => self.operating_point.as_ref()?.image.f1,
            _ => None,
        }
    }
}

/// The fields of `tessera fit --json` that xtask uses.
#[derive(Debug, Clone, Deserialize)]
pub struct FitSummary {
    pub model_bytes: u64,
    #[serde(default)]
    pub scorer_report: serde_json::Value,
}

/// `tessera data info --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct DataInfo {
    pub kind: Option<String>,
}

/// Read and parse a JSON file, naming it on error.
pub fn read<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    use anyhow::Context;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_tessera_eval_writes() {
        let samples = vec![
            tessera_eval::EvalSample {
                name: "good/0.png".into(),
                defect_type: "good".into(),
                map: tessera_core::AnomalyMap::new(2, 1, vec![0.1, 0.2]),
                mask: None,
            },
            tessera_eval::EvalSample {
                name: "cut/0.png".into(),
                defect_type: "cut".into(),
                map: tessera_core::AnomalyMap::new(2, 1, vec![0.1, 0.9]),
                mask: Some(vec![false, true]),
            },
        ];
        let timings = tessera_eval::Timings {
            fit_seconds: 1.5,
            ms_per_image: 2.0,
            feature_ms_per_image: 1.25,
            score_ms_per_image: 0.75,
        };
        let info = tessera_eval::RunInfo {
            method: "ours".into(),
            ..Default::default()
        };
        let mut full = tessera_eval::evaluate(&samples, timings, info);
        full.operating_point = Some(tessera_eval::operating_points(&samples, 0.5, 0.5, "test"));
        let ours: TestReport =
            serde_json::from_value(serde_json::to_value(&full).unwrap()).unwrap();
        assert_eq!(ours.image_auroc, full.image_auroc);
        assert_eq!(ours.pixel_auroc, full.pixel_auroc);
        assert_eq!(ours.pixel_aupro, full.pixel_aupro);
        assert_eq!(ours.image_f1_max, full.image_f1_max);
        assert_eq!(ours.pixel_f1_max, full.pixel_f1_max);
        assert_eq!(ours.counts.images, full.counts.images);
        assert_eq!(
            (
                ours.fit_seconds,
                ours.ms_per_image,
                ours.feature_ms_per_image,
                ours.score_ms_per_image
            ),
            (1.5, 2.0, 1.25, 0.75)
        );
        assert_eq!(ours.method, "ours");
        let (a, b) = (
            &ours.operating_point.as_ref().unwrap().image,
            &full.operating_point.as_ref().unwrap().image,
        );
        assert_eq!(
            (a.threshold, a.false_alarm_rate, a.recall, a.precision, a.f1),
            (b.threshold, b.false_alarm_rate, b.recall, b.precision, b.f1)
        );
    }
}
