//! # tessera-eval
//!
//! Evaluation for Tessera: exact threshold-free metrics, whole-run reports and qualitative
//! heatmaps.
//!
//! - [`auroc`] / [`f1_max`]: exact ROC AUC (ties count ½, as scikit-learn's `roc_auc_score`) and
//!   the best F1 over all thresholds, in `O(n log n)`; fast enough to pool millions of pixels.
//! - [`aupro`] / [`pro_curve`]: MVTec AD's per-region overlap (8-connected ground-truth
//!   regions, FPR over all normal pixels, integrated to FPR 0.3 and normalised), exact: one sort
//!   of all pixel scores, ties as one threshold step.
//! - [`evaluate`]: image- and pixel-level AUROC / F1-max (with their thresholds), pixel AUPRO, a
//!   per-defect-type breakdown, counts, timings and run information, as a [`Report`] that
//!   writes itself as JSON or Markdown (atomically).
//! - [`render_panel`] / [`save_png`]: image | heatmap overlay | ground truth | predicted mask
//!   panels.
//!
//! ```
//! use tessera_core::AnomalyMap;
//! use tessera_eval::{auroc, evaluate, EvalSample, RunInfo, Timings};
//!
//! // Image level: tied scores between the classes count one half.
//! assert_eq!(auroc(&[0.2, 0.5, 0.5, 0.9], &[false, false, true, true]), Some(0.875));
//!
//! // A whole run: one normal and one anomalous 2×2 map.
//! let map = |data: Vec<f32>| AnomalyMap::new(2, 2, data);
//! let samples = vec![
//!     EvalSample {
//!         name: "good/000.png".into(),
//!         defect_type: "good".into(),
//!         map: map(vec![0.1, 0.2, 0.1, 0.3]),
//!         mask: None,
//!     },
//!     EvalSample {
//!         name: "crack/000.png".into(),
//!         defect_type: "crack".into(),
//!         map: map(vec![0.2, 0.9, 0.1, 0.1]),
//!         mask: Some(vec![false, true, false, false]),
//!     },
//! ];
//! let report = evaluate(&samples, Timings::default(), RunInfo::default());
//! assert_eq!(report.image_auroc, Some(1.0));
//! assert_eq!(report.pixel_auroc, Some(1.0));
//! assert_eq!(report.pixel_threshold, Some(0.9));
//! assert_eq!(report.pixel_aupro, Some(1.0));
//! assert_eq!(report.counts.pixels, 8);
//! assert!(report.to_markdown().contains("| Image AUROC | 100.00% |"));
//! ```

#![warn(missing_docs)]

pub mod decision;
pub mod heatmap;
pub mod metrics;
pub mod pro;
pub mod report;

pub use heatmap::{compose_gallery, jet, panel_tile, render_panel, save_png};
pub use metrics::{auroc, f1_max};
pub use pro::{
    aupro, connected_components, pro_curve, Components, ProCurve, ProImage, PRO_FPR_LIMIT,
};
pub use report::{
    evaluate, operating_points, Counts, EvalSample, ImageScore, OperatingPoints, Report, RunInfo,
    Timings, TypeReport,
};
