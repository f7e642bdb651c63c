//! Whole-run evaluation: image- and pixel-level metrics, per-defect-type breakdown, timings, and
//! JSON / Markdown reports.

use crate::decision::{operating_point, OperatingPoint};
use crate::metrics::{self, PoolStats};
use crate::pro::{self, ProImage, PRO_FPR_LIMIT};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use tessera_core::{io::write_atomic, AnomalyMap, Error, Result};

/// One scored test image with its ground truth.
#[derive(Debug, Clone)]
pub struct EvalSample {
    /// A name for the image, e.g. `"broken_large/000.png"`.
    pub name: String,
    /// The defect type (the MVTec sub-folder); `"good"` for normal images.
    pub defect_type: String,
    /// The anomaly map (its maximum is the image score).
    pub map: AnomalyMap,
    /// The ground-truth mask, row-major, `map.width * map.height` long; `None` when there is no
    /// ground truth. For normal images `None` means all-normal; anomalous images without a mask
    /// are left out of the pixel-level metrics.
    pub mask: Option<Vec<bool>>,
}

impl EvalSample {
    /// Whether the image is anomalous (its defect type is not `"good"`).
    pub fn is_anomalous(&self) -> bool {
        self.defect_type != "good"
    }
}

/// Wall-clock timings of a run, recorded in the report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Seconds spent fitting the model on the training images.
    pub fit_seconds: f64,
    /// End-to-end inference milliseconds per test image.
    pub ms_per_image: f64,
    /// Feature-extraction (backbone) milliseconds per test image.
    pub feature_ms_per_image: f64,
    /// Scoring (anomaly-map) milliseconds per test image.
    pub score_ms_per_image: f64,
}

/// What was run, recorded in the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The model file (or a name for the model).
    pub model: String,
    /// The data set / category evaluated, e.g. a path to an MVTec category.
    pub data: String,
    /// The scorer, e.g. `"padim"`.
    pub scorer: String,
    /// The backbone, e.g. `"resnet18"`.
    pub backbone: String,
    /// A free-form description of the method and its settings.
    pub method: String,
}

/// Image and pixel counts of an evaluation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Test images.
    pub images: usize,
    /// Normal (`good`) test images.
    pub normal: usize,
    /// Anomalous test images.
    pub anomalous: usize,
    /// Pixels pooled for the pixel-level metrics.
    pub pixels: u64,
    /// Anomalous (ground-truth positive) pixels among them.
    pub anomalous_pixels: u64,
}

/// Metrics for one defect type, each computed against all normal images.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TypeReport {
    /// Images of this defect type.
    pub images: usize,
    /// Image AUROC of normal images vs images of this type; `None` if undefined.
    pub image_auroc: Option<f64>,
    /// Pixel AUROC pooled over the pixels of normal images and of this type's images; `None` if
    /// undefined (no mask, or no positive pixel).
    pub pixel_auroc: Option<f64>,
    /// AUPRO (FPR ≤ 0.3, normalised) over normal images and this type's images; `None` if
    /// undefined. Absent from reports written before it existed (read as `None`).
    #[serde(default)]
    pub pixel_aupro: Option<f64>,
}

/// The score of one test image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageScore {
    /// The sample name.
    pub name: String,
    /// Its defect type (`"good"` for normal).
    pub defect_type: String,
    /// Its image score (the maximum of its anomaly map).
    pub score: f32,
    /// The model's decision at its threshold (`score > threshold`), when the run had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomalous: Option<bool>,
    /// The normalised score (0.5 at the threshold), when the run had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalized: Option<f32>,
    /// The conformal p-value against the model's calibration normals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p_value: Option<f64>,
}

/// The model's decisions at the thresholds it runs with (not chosen on the test labels).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatingPoints {
    /// Images: anomalous when the image score is above the image threshold.
    pub image: OperatingPoint,
    /// Pixels of images with ground truth (normal images all negative), at the pixel
    /// threshold; `None` without masks.
    pub pixel: Option<OperatingPoint>,
    /// Where the thresholds came from (e.g. the calibration policy).
    pub source: String,
}

/// The result of [`evaluate`]: metrics, counts, timings and run information, serialisable to JSON
/// (the field names are the JSON keys) and renderable as Markdown.
///
/// Metrics are `Option`s, serialised as `null` when undefined (e.g. only one class present).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Image-level ROC AUC in `[0, 1]`.
    pub image_auroc: Option<f64>,
    /// Pixel-level ROC AUC pooled over all pixels of all test images with ground truth.
    pub pixel_auroc: Option<f64>,
    /// Area under the per-region overlap curve up to FPR 0.3, normalised to `[0, 1]`
    /// (MVTec AD's AUPRO; [`crate::aupro`]), over the same pixels as `pixel_auroc`; `None` when
    /// no image has a ground-truth region. Absent from older reports (read as `None`).
    #[serde(default)]
    pub pixel_aupro: Option<f64>,
    /// The best image-level F1 over all thresholds.
    pub image_f1_max: Option<f64>,
    /// The image-score threshold achieving `image_f1_max` (anomalous when
    /// `score >= threshold`). Absent from older reports (read as `None`).
    #[serde(default)]
    pub image_threshold: Option<f32>,
    /// The best pixel-level F1 over all thresholds.
    pub pixel_f1_max: Option<f64>,
    /// The pixel threshold achieving `pixel_f1_max` (anomalous when `score >= threshold`).
    pub pixel_threshold: Option<f32>,
    /// Image and pixel counts.
    pub counts: Counts,
    /// Per-defect-type metrics (every type except `good`), keyed by type.
    pub per_type: BTreeMap<String, TypeReport>,
    /// Seconds spent fitting.
    pub fit_seconds: f64,
    /// End-to-end inference milliseconds per image.
    pub ms_per_image: f64,
    /// Feature-extraction milliseconds per image.
    pub feature_ms_per_image: f64,
    /// Scoring milliseconds per image.
    pub score_ms_per_image: f64,
    /// The model.
    pub model: String,
    /// The data evaluated.
    pub data: String,
    /// The scorer.
    pub scorer: String,
    /// The backbone.
    pub backbone: String,
    /// The method description.
    pub method: String,
    /// The Tessera version that produced the report.
    pub tessera_version: String,
    /// Every test image's score, in input order.
    pub images: Vec<ImageScore>,
    /// Decisions at the model's stored thresholds; absent from reports made without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operating_point: Option<OperatingPoints>,
}

/// Check a sample's map and mask sizes (the panics [`evaluate`] documents, naming the sample);
/// `true` when its map holds a NaN.
fn check_sample(s: &EvalSample) -> bool {
    let n = s.map.width * s.map.height;
    assert_eq!(
        s.map.data.len(),
        n,
        "sample {}: anomaly map has {} values but is {}×{}",
        s.name,
        s.map.data.len(),
        s.map.width,
        s.map.height
    );
    if let Some(m) = &s.mask {
        assert_eq!(
            m.len(),
            n,
            "sample {}: mask has {} pixels but the map is {}×{}",
            s.name,
            m.len(),
            s.map.width,
            s.map.height
        );
    }
    s.map.data.iter().any(|v| v.is_nan())
}

/// The pixel view of one sample (`None`: anomalous without ground truth, left out).
fn sample_pro(s: &EvalSample) -> Option<ProImage<'_>> {
    match &s.mask {
        Some(m) => Some(ProImage::new(&s.map, Some(m))),
        None if s.is_anomalous() => None,
        None => Some(ProImage::new(&s.map, None)),
    }
}

/// Pixel metrics of a pooled set of samples.
struct PixelStats {
    stats: PoolStats,
    aupro: Option<f64>,
}

/// Every pixel-level metric from one sorted pool: the pixels of every sample that takes part
/// (a mask, or a normal image), pooled and sorted once; each subset (a defect type with the
/// normal images) is a filter of that pool ([`pro::Pool::subset`]), so the whole evaluation
/// costs one sort where pooling each subset anew cost one (AUROC) plus one (AUPRO) per subset.
struct PixelPool {
    pool: pro::Pool,
    /// `members[j]`: the sample index of the pool's image `j`.
    members: Vec<usize>,
    /// Per sample: it takes part and its map holds a NaN (metrics including it are `None`).
    nan: Vec<bool>,
}

impl PixelPool {
    fn new(samples: &[EvalSample]) -> Self {
        let nan: Vec<bool> = samples.par_iter().map(check_sample).collect();
        let views: Vec<Option<ProImage>> = samples.iter().map(sample_pro).collect();
        let members: Vec<usize> = (0..samples.len())
            .filter(|&i| views[i].is_some() && !nan[i])
            .collect();
        let images: Vec<ProImage> = members.iter().filter_map(|&i| views[i]).collect();
        let pool = pro::Pool::new(&images).expect("NaN maps are left out of the pool");
        let nan = (0..samples.len())
            .map(|i| nan[i] && views[i].is_some())
            .collect();
        Self { pool, members, nan }
    }

    /// Metrics over the samples `select` picks (`None` metrics if one of them holds a NaN).
    fn stats(&self, select: impl Fn(usize) -> bool, want_f1: bool) -> PixelStats {
        let all = (0..self.nan.len()).all(&select);
        let sub;
        let pool = if all {
            &self.pool
        } else {
            sub = self.pool.subset(|j| select(self.members[j]));
            &sub
        };
        let mut stats = metrics::sorted_stats(&pool.keys, 32, want_f1);
        let mut aupro = pool.aupro(PRO_FPR_LIMIT);
        if (0..self.nan.len()).any(|i| self.nan[i] && select(i)) {
            (stats.auroc, stats.f1, aupro) = (None, None, None);
        }
        PixelStats { stats, aupro }
    }

    /// Pixels pooled over every sample that takes part (NaN maps left out).
    fn len(&self) -> u64 {
        self.pool.keys.len() as u64
    }
}

/// Evaluate a scored test set.
///
/// - Image level: each image's score is its map's maximum ([`AnomalyMap::image_score`]);
///   label = [`EvalSample::is_anomalous`].
/// - Pixel level: all pixels of all test images are pooled into one ranking (normal images
///   without a mask count as all-normal; anomalous images without a mask are left out). The
///   pixel AUROC is `None` when no anomalous image has a (non-empty) mask.
/// - AUPRO ([`crate::aupro`], FPR limit [`PRO_FPR_LIMIT`]) over the same pixels: ground-truth
///   regions are the 8-connected components of each mask.
/// - Per defect type: normal images vs the images of that type, at both levels.
///
/// Any NaN score makes the metrics it takes part in `None`.
///
/// # Panics
///
/// If a map's `data` is not `width * height` long, or a mask's length differs from its map's.
pub fn evaluate(samples: &[EvalSample], timings: Timings, info: RunInfo) -> Report {
    let scores: Vec<f32> = samples.iter().map(|s| s.map.image_score()).collect();
    let labels: Vec<bool> = samples.iter().map(EvalSample::is_anomalous).collect();
    let image_auroc = metrics::auroc(&scores, &labels);
    let image_f1 = metrics::f1_max(&scores, &labels);

    let pixels = PixelPool::new(samples);
    let all = pixels.stats(|_| true, true);

    let normal = labels.iter().filter(|&&a| !a).count();
    let mut per_type = BTreeMap::new();
    let mut types: Vec<&str> = samples
        .iter()
        .filter(|s| s.is_anomalous())
        .map(|s| s.defect_type.as_str())
        .collect();
    types.sort_unstable();
    types.dedup();
    for ty in types {
        let select = |i: usize| !labels[i] || samples[i].defect_type == ty;
        let (s, l): (Vec<f32>, Vec<bool>) = (0..samples.len())
            .filter(|&i| select(i))
            .map(|i| (scores[i], labels[i]))
            .unzip();
        let px = pixels.stats(select, false);
        per_type.insert(
            ty.to_string(),
            TypeReport {
                images: samples.iter().filter(|s| s.defect_type == ty).count(),
                image_auroc: metrics::auroc(&s, &l),
                pixel_auroc: px.stats.auroc,
                pixel_aupro: px.aupro,
            },
        );
    }

    Report {
        image_auroc,
        pixel_auroc: all.stats.auroc,
        pixel_aupro: all.aupro,
        image_f1_max: image_f1.map(|(f, _)| f),
        image_threshold: image_f1.map(|(_, t)| t),
        pixel_f1_max: all.stats.f1.map(|(f, _)| f),
        pixel_threshold: all.stats.f1.map(|(_, t)| t),
        counts: Counts {
            images: samples.len(),
            normal,
            anomalous: samples.len() - normal,
            pixels: pixels.len(),
            anomalous_pixels: all.stats.positives,
        },
        per_type,
        fit_seconds: timings.fit_seconds,
        ms_per_image: timings.ms_per_image,
        feature_ms_per_image: timings.feature_ms_per_image,
        score_ms_per_image: timings.score_ms_per_image,
        model: info.model,
        data: info.data,
        scorer: info.scorer,
        backbone: info.backbone,
        method: info.method,
        tessera_version: tessera_core::VERSION.to_string(),
        images: samples
            .iter()
            .zip(&scores)
            .map(|(s, &score)| ImageScore {
                name: s.name.clone(),
                defect_type: s.defect_type.clone(),
                score,
                anomalous: None,
                normalized: None,
                p_value: None,
            })
            .collect(),
        operating_point: None,
    }
}

/// Decisions on `samples` at fixed thresholds: images by their score, pixels of images with
/// ground truth (normal images count as all negative; anomalous images without a mask are
/// left out).
pub fn operating_points(
    samples: &[EvalSample],
    image_threshold: f32,
    pixel_threshold: f32,
    source: impl Into<String>,
) -> OperatingPoints {
    let scores: Vec<f32> = samples.iter().map(|s| s.map.image_score()).collect();
    let labels: Vec<bool> = samples.iter().map(EvalSample::is_anomalous).collect();
    let image = operating_point(&scores, &labels, image_threshold);
    let pixel = samples
        .par_iter()
        .filter_map(|s| {
            let none = vec![false; s.map.data.len()];
            let mask = match (&s.mask, s.is_anomalous()) {
                (Some(m), _) => m,
                (None, false) => &none,
                (None, true) => return None,
            };
            Some(operating_point(&s.map.data, mask, pixel_threshold))
        })
        .reduce_with(|a, b| a.merge(&b));
    let any_mask = samples.iter().any(|s| s.mask.is_some());
    OperatingPoints {
        image,
        pixel: pixel.filter(|_| any_mask),
        source: source.into(),
    }
}

/// A metric in `[0, 1]` as a percentage with two decimals, or `n/a`.
fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{:.2}%", 100.0 * v))
}

/// Make a string safe inside a Markdown table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

impl Report {
    /// Render the report as Markdown: a headline table (metrics as percentages, counts,
    /// timings), the run information and a per-defect-type table.
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let c = &self.counts;
        let _ = writeln!(md, "# Tessera evaluation: {}\n", cell(&self.data));
        let _ = writeln!(md, "| Metric | Value |\n|---|---|");
        let _ = writeln!(md, "| Image AUROC | {} |", pct(self.image_auroc));
        let _ = writeln!(md, "| Pixel AUROC | {} |", pct(self.pixel_auroc));
        let _ = writeln!(
            md,
            "| Pixel AUPRO (FPR ≤ 0.3) | {} |",
            pct(self.pixel_aupro)
        );
        let thr = |t: Option<f32>| t.map_or_else(String::new, |t| format!(" (threshold {t:.6})"));
        let _ = writeln!(
            md,
            "| Image F1-max | {}{} |",
            pct(self.image_f1_max),
            thr(self.image_threshold)
        );
        let _ = writeln!(
            md,
            "| Pixel F1-max | {}{} |",
            pct(self.pixel_f1_max),
            thr(self.pixel_threshold)
        );
        let _ = writeln!(
            md,
            "| Images | {} ({} normal, {} anomalous) |",
            c.images, c.normal, c.anomalous
        );
        let _ = writeln!(
            md,
            "| Pixels | {} ({} anomalous) |",
            c.pixels, c.anomalous_pixels
        );
        let _ = writeln!(md, "| Fit time | {:.2} s |", self.fit_seconds);
        let _ = writeln!(md, "| Inference | {:.2} ms/image |", self.ms_per_image);
        let _ = writeln!(
            md,
            "| Features | {:.2} ms/image |",
            self.feature_ms_per_image
        );
        let _ = writeln!(md, "| Scoring | {:.2} ms/image |", self.score_ms_per_image);

        let _ = writeln!(md, "\n| Run | |\n|---|---|");
        for (k, v) in [
            ("Model", &self.model),
            ("Data", &self.data),
            ("Scorer", &self.scorer),
            ("Backbone", &self.backbone),
            ("Method", &self.method),
            ("Tessera", &self.tessera_version),
        ] {
            let _ = writeln!(md, "| {k} | {} |", cell(v));
        }

        if let Some(op) = &self.operating_point {
            let rate = |v: Option<f64>| pct(v);
            let _ = writeln!(
                md,
                "\n## At the model's thresholds\n\n{}\n\n| | Threshold | TP | FP | TN | FN | False-alarm rate | Recall | Precision | F1 | F1-max (oracle) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                cell(&op.source)
            );
            let row = |md: &mut String, what: &str, p: &OperatingPoint, oracle: Option<f64>| {
                let _ = writeln!(
                    md,
                    "| {what} | {:.6} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    p.threshold,
                    p.tp,
                    p.fp,
                    p.tn,
                    p.fn_,
                    rate(p.false_alarm_rate),
                    rate(p.recall),
                    rate(p.precision),
                    rate(p.f1),
                    rate(oracle)
                );
            };
            row(&mut md, "Images", &op.image, self.image_f1_max);
            if let Some(p) = &op.pixel {
                row(&mut md, "Pixels", p, self.pixel_f1_max);
            }
        }

        if !self.per_type.is_empty() {
            let _ = writeln!(
                md,
                "\n## Per defect type\n\n| Type | Images | Image AUROC | Pixel AUROC | Pixel AUPRO |\n|---|---:|---:|---:|---:|"
            );
            for (ty, t) in &self.per_type {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} |",
                    cell(ty),
                    t.images,
                    pct(t.image_auroc),
                    pct(t.pixel_auroc),
                    pct(t.pixel_aupro)
                );
            }
        }
        md
    }

    /// Write the report as pretty-printed JSON, atomically.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::io(path, std::io::Error::other(e)))?;
        bytes.push(b'\n');
        write_atomic(path, &bytes)
    }

    /// Write the report as Markdown ([`Report::to_markdown`]), atomically.
    pub fn write_markdown(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.to_markdown().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_core::test_util::Lcg;

    fn sample(name: &str, ty: &str, data: Vec<f32>, mask: Option<Vec<bool>>) -> EvalSample {
        EvalSample {
            name: name.into(),
            defect_type: ty.into(),
            map: AnomalyMap::new(2, 2, data),
            mask,
        }
    }

    fn info() -> RunInfo {
        RunInfo {
            model: "m.tsr".into(),
            data: "bottle".into(),
            scorer: "padim".into(),
            backbone: "resnet18".into(),
            method: "PaDiM | d=100".into(),
        }
    }

    fn set() -> Vec<EvalSample> {
        vec![
            sample("good/0", "good", vec![0.1, 0.2, 0.1, 0.3], None),
            sample(
                "good/1",
                "good",
                vec![0.2, 0.2, 0.4, 0.1],
                Some(vec![false; 4]),
            ),
            sample(
                "crack/0",
                "crack",
                vec![0.1, 0.9, 0.2, 0.2],
                Some(vec![false, true, false, false]),
            ),
            sample(
                "hole/0",
                "hole",
                vec![0.35, 0.1, 0.5, 0.1],
                Some(vec![false, false, true, true]),
            ),
        ]
    }

    /// Pixel metrics of the samples `select` picks, each pooled on its own by the public
    /// functions: what `evaluate` computed before it pooled once and filtered.
    fn pooled_alone(
        samples: &[EvalSample],
        select: impl Fn(usize) -> bool,
    ) -> (Option<f64>, Option<(f64, f32)>, Option<f64>) {
        let chosen: Vec<&EvalSample> = (0..samples.len())
            .filter(|&i| select(i))
            .map(|i| &samples[i])
            .filter(|s| s.mask.is_some() || !s.is_anomalous())
            .collect();
        let (mut px, mut lb) = (Vec::new(), Vec::new());
        for s in &chosen {
            px.extend_from_slice(&s.map.data);
            match &s.mask {
                Some(m) => lb.extend_from_slice(m),
                None => lb.extend(std::iter::repeat_n(false, s.map.data.len())),
            }
        }
        let images: Vec<ProImage> = chosen
            .iter()
            .map(|s| ProImage::new(&s.map, s.mask.as_deref()))
            .collect();
        (
            metrics::auroc(&px, &lb),
            metrics::f1_max(&px, &lb),
            pro::aupro(&images, PRO_FPR_LIMIT),
        )
    }

    #[test]
    fn one_pool_filtered_equals_pooling_each_subset() {
        // 12 × 9 maps with scores on a coarse grid (ties across images and labels), three defect
        // types with one to three regions each, an anomalous image without a mask (left out),
        // a normal image with an all-false mask; then a NaN in one type's image.
        let (w, h) = (12, 9);
        let mut rng = Lcg(7);
        let mut next = move || (rng.next_u64() >> 33) as u32;
        let mut samples = Vec::new();
        for (t, n) in [("good", 4), ("crack", 3), ("hole", 2), ("scratch", 3)] {
            for i in 0..n {
                let data: Vec<f32> = (0..w * h).map(|_| (next() % 16) as f32 * 0.25).collect();
                let mask = match (t, i) {
                    ("good", 1) => Some(vec![false; w * h]),
                    ("good", _) | ("scratch", 2) => None,
                    _ => Some(
                        (0..w * h)
                            .map(|p| {
                                let (y, x) = (p / w, p % w);
                                (x + i) % 5 == 0 && y > i || (x < 3 && y < 2 + i)
                            })
                            .collect(),
                    ),
                };
                samples.push(EvalSample {
                    name: format!("{t}/{i}"),
                    defect_type: t.into(),
                    map: AnomalyMap::new(w, h, data),
                    mask,
                });
            }
        }
        for with_nan in [false, true] {
            if with_nan {
                samples[6].map.data[5] = f32::NAN; // crack/2
            }
            let r = evaluate(&samples, Timings::default(), info());
            let (auroc, f1, aupro) = pooled_alone(&samples, |_| true);
            assert_eq!(r.pixel_auroc, auroc);
            assert_eq!(r.pixel_f1_max, f1.map(|(f, _)| f));
            assert_eq!(r.pixel_threshold, f1.map(|(_, t)| t));
            assert_eq!(r.pixel_aupro, aupro);
            assert_eq!(r.pixel_auroc.is_none(), with_nan);
            for ty in ["crack", "hole", "scratch"] {
                let select = |i: usize| !samples[i].is_anomalous() || samples[i].defect_type == ty;
                let (auroc, _, aupro) = pooled_alone(&samples, select);
                let t = &r.per_type[ty];
                assert_eq!((t.pixel_auroc, t.pixel_aupro), (auroc, aupro), "{ty}");
                assert_eq!(auroc.is_none(), with_nan && ty == "crack", "{ty}");
            }
        }
    }

    #[test]
    fn evaluates_small_set() {
        let r = evaluate(&set(), Timings::default(), info());
        // Image scores: good 0.3, 0.4; crack 0.9; hole 0.5 → perfectly separated.
        assert_eq!(r.image_auroc, Some(1.0));
        assert_eq!(r.image_f1_max, Some(1.0));
        // F1 1 first reached at threshold 0.5 (the hole image); 0.9 alone gives 2/3.
        assert_eq!(r.image_threshold, Some(0.5));
        assert_eq!(
            r.counts,
            Counts {
                images: 4,
                normal: 2,
                anomalous: 2,
                pixels: 16,
                anomalous_pixels: 3
            }
        );
        // Pixel AUROC by brute force over the same pool.
        let s: Vec<f32> = set().iter().flat_map(|s| s.map.data.clone()).collect();
        let l: Vec<bool> = set()
            .iter()
            .flat_map(|s| s.mask.clone().unwrap_or(vec![false; 4]))
            .collect();
        assert_eq!(r.pixel_auroc, crate::auroc(&s, &l));
        let (f1, t) = crate::f1_max(&s, &l).unwrap();
        assert_eq!(r.pixel_f1_max, Some(f1));
        assert_eq!(r.pixel_threshold, Some(t));
        assert_eq!(r.per_type.len(), 2);
        assert_eq!(r.per_type["crack"].images, 1);
        assert_eq!(r.per_type["crack"].image_auroc, Some(1.0));
        assert_eq!(r.per_type["crack"].pixel_auroc, Some(1.0));
        assert!(r.per_type["hole"].pixel_auroc.unwrap() < 1.0);
        // AUPRO by hand. Regions: crack {0.9} (size 1), hole {0.5, 0.1} (size 2); 13 normal
        // pixels, the highest 0.4, 0.35, 0.3, then five at 0.2. PRO is 0.75 from FPR 0 up to
        // FPR 8/13 > 0.3 → 0.75.
        let close = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() < 1e-12;
        assert!(close(r.pixel_aupro, 0.75), "{:?}", r.pixel_aupro);
        // crack: its one pixel above every normal pixel → 1; hole: PRO 0.5 until the 10
        // normal pixels' fourth (FPR 0.4) → 0.5.
        assert!(close(r.per_type["crack"].pixel_aupro, 1.0));
        assert!(close(r.per_type["hole"].pixel_aupro, 0.5));
        assert_eq!(r.images.len(), 4);
        assert_eq!(r.images[2].score, 0.9);
        assert_eq!(r.tessera_version, tessera_core::VERSION);
    }

    #[test]
    fn no_masks_means_no_pixel_metrics() {
        let mut s = set();
        s[2].mask = None;
        s[3].mask = None;
        let r = evaluate(&s, Timings::default(), info());
        assert_eq!(r.pixel_auroc, None);
        assert_eq!(r.pixel_f1_max, None);
        assert_eq!(r.pixel_threshold, None);
        assert_eq!(r.pixel_aupro, None);
        assert_eq!(r.per_type["crack"].pixel_aupro, None);
        assert_eq!(r.counts.pixels, 8);
        assert!(r.image_auroc.is_some());
        assert!(r.image_f1_max.is_some() && r.image_threshold.is_some());
        let v = serde_json::to_value(&r).unwrap();
        assert!(v["pixel_auroc"].is_null());
        assert!(v["pixel_aupro"].is_null());
        assert!(r
            .to_markdown()
            .contains("| Pixel AUPRO (FPR ≤ 0.3) | n/a |"));
    }

    #[test]
    fn only_normal_images() {
        let r = evaluate(&set()[..2], Timings::default(), info());
        assert_eq!(r.image_auroc, None);
        assert_eq!(r.pixel_auroc, None);
        assert!(r.per_type.is_empty());
    }

    #[test]
    fn nan_makes_pixel_metrics_undefined() {
        let mut s = set();
        s[0].map.data[0] = f32::NAN;
        let r = evaluate(&s, Timings::default(), info());
        assert_eq!(r.pixel_auroc, None);
        assert_eq!(r.pixel_aupro, None);
        assert_eq!(r.per_type["crack"].pixel_auroc, None);
        assert_eq!(r.per_type["crack"].pixel_aupro, None);
    }

    #[test]
    #[should_panic(expected = "mask has 3 pixels")]
    fn mask_size_mismatch_panics() {
        let mut s = set();
        s[2].mask = Some(vec![false; 3]);
        let _ = evaluate(&s, Timings::default(), info());
    }

    #[test]
    fn json_keys_and_roundtrip() {
        let t = Timings {
            fit_seconds: 1.5,
            ms_per_image: 20.0,
            feature_ms_per_image: 15.0,
            score_ms_per_image: 5.0,
        };
        let r = evaluate(&set(), t, info());
        let v = serde_json::to_value(&r).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        let mut want = vec![
            "image_auroc",
            "pixel_auroc",
            "pixel_aupro",
            "image_f1_max",
            "image_threshold",
            "pixel_f1_max",
            "pixel_threshold",
            "counts",
            "per_type",
            "fit_seconds",
            "ms_per_image",
            "feature_ms_per_image",
            "score_ms_per_image",
            "model",
            "data",
            "scorer",
            "backbone",
            "method",
            "tessera_version",
            "images",
        ];
        want.sort_unstable();
        assert_eq!(keys, want);
        assert_eq!(v["counts"]["anomalous_pixels"], 3);
        let mut type_keys: Vec<&str> = v["per_type"]["crack"]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        type_keys.sort_unstable();
        assert_eq!(
            type_keys,
            ["image_auroc", "images", "pixel_aupro", "pixel_auroc"]
        );
        assert_eq!(v["images"][0]["name"], "good/0");

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/report.json");
        r.write_json(&p).unwrap();
        let back: Report = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(back, r);
        let m = dir.path().join("report.md");
        r.write_markdown(&m).unwrap();
        assert_eq!(std::fs::read_to_string(&m).unwrap(), r.to_markdown());

        // A report written before AUPRO and the image threshold existed still reads.
        let mut old = v.clone();
        let o = old.as_object_mut().unwrap();
        o.remove("pixel_aupro");
        o.remove("image_threshold");
        for t in o["per_type"].as_object_mut().unwrap().values_mut() {
            t.as_object_mut().unwrap().remove("pixel_aupro");
        }
        let back: Report = serde_json::from_value(old).unwrap();
        assert_eq!(back.pixel_aupro, None);
        assert_eq!(back.image_threshold, None);
        assert_eq!(back.per_type["crack"].pixel_aupro, None);
        assert_eq!(back.pixel_auroc, r.pixel_auroc);
    }

    #[test]
    fn markdown_tables() {
        let r = evaluate(&set(), Timings::default(), info());
        let md = r.to_markdown();
        assert!(md.contains("| Image AUROC | 100.00% |"), "{md}");
        assert!(md.contains("| Pixel AUROC | "));
        assert!(
            md.contains("| crack | 1 | 100.00% | 100.00% | 100.00% |"),
            "{md}"
        );
        assert!(md.contains("| Pixel AUPRO (FPR ≤ 0.3) | 75.00% |"), "{md}");
        assert!(
            md.contains("| Image F1-max | 100.00% (threshold 0.500000) |"),
            "{md}"
        );
        assert!(md.contains("| Pixel F1-max | "), "{md}");
        assert!(md.contains("PaDiM \\| d=100"));
        let r = evaluate(&set()[..2], Timings::default(), info());
        assert!(r.to_markdown().contains("| Image AUROC | n/a |"));
    }
}
