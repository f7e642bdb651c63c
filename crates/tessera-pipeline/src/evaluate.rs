//! `test`: score a dataset's test split with a model file, write the report and heatmaps.

use crate::batches::batches;
use crate::detector::Detector;
use crate::observer::{stage, Counter, Observer};
use std::path::{Path, PathBuf};
use tessera_backbone::Precision;
use tessera_core::io::Outputs;
use tessera_core::{DeviceSpec, Error, Result};
use tessera_data::Dataset;
use tessera_eval::{evaluate, render_panel, save_png, EvalSample, Report, RunInfo, Timings};

/// Options of `test`.
#[derive(Debug, Clone)]
pub struct TestOptions {
    pub model: PathBuf,
    pub data: PathBuf,
    /// The JSON report; a Markdown report is written beside it (`.md`).
    pub report: PathBuf,
    /// Write one heatmap panel per test image into this folder (replaced as a whole).
    pub heatmaps: Option<PathBuf>,
    /// Replace a non-empty heatmap folder.
    pub overwrite: bool,
    /// Decide at this image threshold instead of the model's.
    pub threshold: Option<f32>,
    pub device: DeviceSpec,
    pub batch_size: usize,
    /// PatchCore models: search the memory bank this way instead of the model's own setting.
    pub patchcore_search: Option<tessera_patchcore::Search>,
    /// The backbone's products: f32, or bf16 where the CPU has native bf16 dot products.
    pub precision: Precision,
}

/// Score a dataset's test split with a model file and write the report (JSON, and Markdown
/// beside it) and optionally heatmap panels. Outputs are checked before any scoring.
pub fn test(o: &TestOptions, obs: &dyn Observer) -> Result<Report> {
    if o.batch_size == 0 {
        return Err(Error::Config("--batch-size must be at least 1".into()));
    }
    let mut outs = Outputs::default();
    outs.reads(&o.model, "--model").reads(&o.data, "--data");
    let md = o.report.with_extension("md");
    if md == o.report {
        return Err(Error::bad_input(
            &o.report,
            "--report: the JSON report needs a name that is not .md (the Markdown report goes \
             beside it)",
        ));
    }
    outs.check_file(&o.report, "--report")?;
    outs.check_file(&md, "--report (its Markdown twin)")?;
    let mut heat_dir = match &o.heatmaps {
        Some(d) => Some(outs.check_dir(d, "--heatmaps", o.overwrite)?),
        None => None,
    };
    let device = o.device.open()?;
    let mut det = Detector::load(&o.model, &device)?;
    det.set_precision(o.precision, obs);
    if let Some(search) = o.patchcore_search {
        det.set_patchcore_search(search)
            .map_err(|e| e.in_file(&o.model))?;
    }
    let ds = Dataset::open(&o.data)?;
    let samples = ds.test()?;
    let mut evals = Vec::with_capacity(samples.len());
    let mut images = Vec::new();
    let mut odd_masks = Vec::new();
    let (mut feat_ms, mut score_ms) = (0.0, 0.0);
    {
        let count = Counter::start(obs, stage::TEST, samples.len() as u64);
        let mut at = 0;
        for b in batches(&samples, &det.meta.preprocess, o.batch_size, &device) {
            let b = b?;
            let (maps, t) = det.score(&b.tensor)?;
            feat_ms += t.features_ms;
            score_ms += t.score_ms;
            let n = maps.len();
            for ((s, map), mask) in samples[at..at + n].iter().zip(maps).zip(b.masks) {
                evals.push(EvalSample {
                    name: s.name.clone(),
                    defect_type: s.defect_type.clone(),
                    map,
                    mask,
                });
            }
            if heat_dir.is_some() {
                images.extend(b.images);
            }
            odd_masks.extend(b.odd_masks);
            at += n;
            count.add(n as u64);
        }
    }
    let n = samples.len() as f64;
    let timings = Timings {
        fit_seconds: det.meta.fit.seconds,
        ms_per_image: (feat_ms + score_ms) / n,
        feature_ms_per_image: feat_ms / n,
        score_ms_per_image: score_ms / n,
    };
    let info = RunInfo {
        model: o.model.display().to_string(),
        data: o.data.display().to_string(),
        scorer: det.meta.scorer.kind().name().into(),
        backbone: format!(
            "{} ({}{})",
            det.meta.backbone.arch,
            det.meta.backbone.source,
            match det.backbone.precision() {
                Precision::F32 => String::new(),
                p => format!("; {p} products"),
            }
        ),
        method: det.meta.method.name().into(),
    };
    if let Some((first, max)) = odd_masks.first() {
        obs.warn(&format!(
            "{} ground-truth mask(s) are not 0/255 (e.g. {}: highest value {max}); read as \
             \"> 0 is defect\" — check the dataset with `tessera data verify`",
            odd_masks.len(),
            first.display()
        ));
    }
    let mut report = evaluate(&evals, timings, info);
    let image_thr = o.threshold.unwrap_or(det.image_threshold());
    let pixel_thr = det.pixel_threshold_at(o.threshold);
    report.operating_point = Some(tessera_eval::operating_points(
        &evals,
        image_thr,
        pixel_thr,
        threshold_source(&det, o.threshold),
    ));
    for (img, e) in report.images.iter_mut().zip(&evals) {
        let v = det.verdict(e.map.image_score(), o.threshold);
        img.anomalous = Some(v.anomalous);
        img.normalized = Some(v.normalized);
        img.p_value = v.p_value;
    }
    if let Some(dir) = heat_dir.as_mut() {
        // Contours at the model's pixel threshold: what it would mark on the line.
        let thr = pixel_thr;
        let root = dir.path()?.to_path_buf();
        let count = Counter::start(obs, stage::HEATMAPS, evals.len() as u64);
        for (e, img) in evals.iter().zip(&images) {
            let panel = render_panel(img, &e.map, e.mask.as_deref(), thr, det.meta.heat_range)?;
            save_png(&panel, &root.join(Path::new(&e.name).with_extension("png")))?;
            count.add(1);
        }
    }
    report.write_json(&o.report)?;
    report.write_markdown(&md)?;
    if let Some(dir) = heat_dir {
        dir.commit()?;
    }
    Ok(report)
}

/// Where a run's thresholds came from, in words.
pub(crate) fn threshold_source(det: &Detector, threshold: Option<f32>) -> String {
    if let Some(t) = threshold {
        return format!("threshold {t} given on the command line");
    }
    match &det.meta.calibration {
        None => "the model's default threshold (a model from before calibration: the highest \
                 pixel score on training images)"
            .into(),
        Some(c) => {
            let base = match (&c.synthetic, c.source.as_str()) {
                (Some(_), _) => format!(
                    "F1-optimal thresholds on synthetic defects over {} held-out normals",
                    c.images
                ),
                (None, "holdout") => format!(
                    "conformal threshold from {} held-out normal images: target false-alarm \
                     rate {:.1} %, guaranteed ≤ {:.1} %",
                    c.images,
                    c.conformal.target_fpr * 100.0,
                    c.conformal.guaranteed_fpr * 100.0
                ),
                (None, _) => format!(
                    "threshold from {} training images (in-sample: no guarantee)",
                    c.images
                ),
            };
            format!(
                "{base}; masks at the pixel threshold {:.6}",
                c.pixel_threshold
            )
        }
    }
}
