//! `fit`, `test` and `predict`.

use crate::detector::extract;
use crate::sbm::{check_sbm_weights, sbm_train, SbmMode, SbmOptions, WeightsArgs};
use crate::{Detector, Progress};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tessera_backbone::{Arch, Backbone, WeightsSource};
use tessera_cfa::{CfaConfig, TrainProgress};
use tessera_core::model::{
    BackboneMeta, FitMeta, ModelFile, ModelMeta, Preprocess, ScorerMeta, FORMAT_VERSION,
};
use tessera_core::scorer::FitScorer;
use tessera_core::{DeviceSpec, FeatureMaps, Scorer};
use tessera_data::{list_images, load_batch, Dataset, Sample};
use tessera_eval::{evaluate, render_panel, save_png, EvalSample, RunInfo, Timings};
use tessera_padim::PadimConfig;
use tessera_patchcore::{BankDtype, PatchcoreConfig};
use tessera_pfam::{Pfam, PfamConfig};
use tessera_sbm::SbmConfig;

/// Scorers this build can fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScorerKind {
    #[default]
    Padim,
    Patchcore,
    Cfa,
}

/// Options of `tessera fit`.
#[derive(Debug, Clone)]
pub struct FitOptions {
    pub data: PathBuf,
    pub scorer: ScorerKind,
    pub backbone: Arch,
    /// Local weights file; when `None` and `random_weights` is `None`, the hub is used.
    pub weights: Option<PathBuf>,
    /// Hub repository overriding the architecture's default.
    pub hub_repo: Option<String>,
    /// Use a seeded random backbone instead of pretrained weights (demos and tests only).
    pub random_weights: Option<u64>,
    pub method: String,
    pub seed: u64,
    pub device: DeviceSpec,
    pub out: PathBuf,
    pub preprocess: Preprocess,
    pub batch_size: usize,
    pub padim_dims: Option<usize>,
    /// PatchCore: fraction of training patches kept.
    pub coreset_ratio: f64,
    /// PatchCore: reduce patch features to this many channels.
    pub patchcore_dim: Option<usize>,
    /// PatchCore: memory bank storage type.
    pub bank_dtype: BankDtype,
    /// PatchCore: reweight image scores with this many neighbours.
    pub reweight_k: Option<usize>,
    /// CFA: training epochs.
    pub epochs: usize,
    /// CFA: stop when the training loss has not improved for this many epochs.
    pub patience: Option<usize>,
    /// CFA: descriptor compression γ_d.
    pub cfa_gamma_d: usize,
    /// CFA: memory compression γ_c.
    pub cfa_gamma_c: usize,
    /// `--method sbm|ours`: whether SBM fine-tunes the backbone on this category.
    pub sbm: SbmMode,
    /// `--method sbm|ours`: use this SBM output (tuned backbone, with PFAM for `ours`) instead
    /// of training one.
    pub sbm_weights: Option<PathBuf>,
    /// Use SBM weights even when their gate failed.
    pub sbm_force: bool,
    /// `--method sbm|ours`: the SBM settings when it trains.
    pub sbm_config: SbmConfig,
    /// Texture images for SBM's synthetic defects.
    pub textures: Option<PathBuf>,
    /// `--pfam-train cfa`: after the jigsaw stage, train PFAM end to end with CFA's loss.
    pub pfam_train_cfa: bool,
    pub progress: Progress,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            data: PathBuf::new(),
            scorer: ScorerKind::Padim,
            backbone: Arch::ResNet18,
            weights: None,
            hub_repo: None,
            random_weights: None,
            method: "baseline".into(),
            seed: 0,
            device: DeviceSpec::Cpu,
            out: PathBuf::from("model.safetensors"),
            preprocess: Preprocess::paper(),
            batch_size: 8,
            padim_dims: None,
            coreset_ratio: 0.1,
            patchcore_dim: None,
            bank_dtype: BankDtype::F32,
            reweight_k: None,
            epochs: 30,
            patience: None,
            cfa_gamma_d: 1,
            cfa_gamma_c: 1,
            sbm: SbmMode::Auto,
            sbm_weights: None,
            sbm_force: false,
            sbm_config: SbmConfig::default(),
            textures: None,
            pfam_train_cfa: false,
            progress: Progress::default(),
        }
    }
}

/// What `fit` did.
#[derive(Debug, Clone, Serialize)]
pub struct FitSummary {
    pub model: PathBuf,
    pub images: usize,
    pub seconds: f64,
    pub threshold: f32,
    pub backbone: String,
    pub weights: String,
    /// Scorer-specific fit facts (PatchCore: patches, bank size, feature and coreset seconds).
    pub scorer_report: serde_json::Value,
    /// Model file size in bytes.
    pub model_bytes: u64,
}

/// How many training images are re-scored to set the default threshold and heatmap range.
const CALIBRATION_IMAGES: usize = 32;

/// Fit a detector on a dataset's normal training images and write the model file.
pub fn fit(o: &FitOptions) -> Result<FitSummary> {
    let start = Instant::now();
    if !["baseline", "sbm", "ours"].contains(&o.method.as_str()) {
        bail!(
            "--method {}: this build implements 'baseline', 'sbm' and 'ours' (SBM + PFAM)",
            o.method
        );
    }
    if o.sbm_weights.is_some() && o.method == "baseline" {
        bail!("--sbm-weights needs --method sbm or --method ours");
    }
    if o.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    o.preprocess.validate()?;
    let device = o.device.open()?;
    let ds = Dataset::open(&o.data)?;
    let train = ds.train()?;
    let wa = WeightsArgs {
        backbone: o.backbone,
        weights: o.weights.clone(),
        hub_repo: o.hub_repo.clone(),
        random_weights: o.random_weights,
    };
    let mut source = wa.source()?;
    let mut sbm_meta = None;
    // The file holding trained PFAM tensors and their configuration (`--method ours`).
    let mut pfam_from: Option<(PathBuf, PfamConfig)> = None;
    if o.method != "baseline" {
        let ours = o.method == "ours";
        let (use_sbm, why) = o.sbm.applies(&ds);
        if let Some(p) = &o.sbm_weights {
            let report = check_sbm_weights(p, o.sbm_force)?;
            o.progress
                .note(format!("sbm: using tuned weights {}", p.display()));
            if ours {
                let cfg = report.as_ref().and_then(|r| r.config.pfam.clone());
                let Some(cfg) = cfg else {
                    bail!(
                        "{}: trained without PFAM, so it cannot serve --method ours (use \
                         --method sbm, or `tessera sbm train --pfam`)",
                        p.display()
                    );
                };
                pfam_from = Some((p.clone(), cfg));
            }
            sbm_meta = report.map(|r| sbm_summary(&r));
            source = WeightsSource::File(p.clone());
        } else if use_sbm || ours {
            let mut config = SbmConfig {
                seed: o.seed,
                ..o.sbm_config.clone()
            };
            if ours {
                config.pfam = Some(config.pfam.unwrap_or_default());
                if !use_sbm {
                    // Texture classes: the backbone stays as ImageNet left it; PFAM alone
                    // learns on the jigsaw task (the paper applies SBM to objects only).
                    config.train_layers.clear();
                }
            }
            o.progress.note(if use_sbm {
                format!("sbm: training the jigsaw first ({why})")
            } else {
                format!("sbm: backbone frozen ({why}); training PFAM on the jigsaw task")
            });
            let tuned = sbm_output_path(&o.out);
            let s = sbm_train(&SbmOptions {
                data: o.data.clone(),
                textures: o.textures.clone(),
                weights: wa.clone(),
                out: tuned.clone(),
                config,
                foreground: None,
                no_synth: false,
                preprocess: o.preprocess.clone(),
                device: o.device,
                restart: false,
                progress: o.progress,
            })?;
            check_sbm_weights(&tuned, o.sbm_force)?;
            if let Some(cfg) = &s.report.config.pfam {
                pfam_from = Some((tuned.clone(), cfg.clone()));
            }
            sbm_meta = Some(sbm_summary(&s.report));
            source = WeightsSource::File(tuned);
        } else {
            o.progress.note(format!(
                "sbm: skipped, {why}; fitting on the pretrained backbone"
            ));
            sbm_meta = Some(serde_json::json!({ "applied": false, "reason": why }));
        }
    }
    let levels = match o.scorer {
        ScorerKind::Padim => vec![1, 2, 3],
        ScorerKind::Patchcore => vec![2, 3],
        ScorerKind::Cfa => vec![1, 2, 3],
    };
    let backbone = Backbone::load(o.backbone, &source, 3, &device)?;
    let mut pfam = match &pfam_from {
        Some((p, cfg)) => Some(load_pfam(p, cfg, &backbone, &device)?),
        None => None,
    };
    // `--pfam-train cfa`: PFAM continues training end to end with CFA's loss, so CFA sees raw
    // backbone features and applies the trainable PFAM itself.
    let e2e = match (o.pfam_train_cfa, &pfam_from, o.scorer) {
        (false, _, _) => None,
        (true, Some((p, cfg)), ScorerKind::Cfa) => {
            Some(trainable_pfam(p, cfg, &backbone, &device)?)
        }
        (true, None, _) => bail!("--pfam-train cfa needs --method ours (PFAM)"),
        (true, _, _) => bail!("--pfam-train cfa needs --scorer cfa"),
    };
    let features_pfam = if e2e.is_some() { None } else { pfam.clone() };
    o.progress.note(format!(
        "fit: {} training images from {}, {} ({}), scorer {:?}, device {}",
        train.len(),
        o.data.display(),
        o.backbone,
        source.describe(),
        o.scorer,
        o.device
    ));
    let pb = o.progress.bar(train.len() as u64, "features");
    let pre = o.preprocess.clone();
    let mut batches =
        train
            .chunks(o.batch_size)
            .map(|chunk| -> tessera_core::Result<FeatureMaps> {
                let b = load_batch(chunk, &pre, &device)?;
                let f = extract(&backbone, features_pfam.as_ref(), &b.tensor)
                    .map_err(|e| tessera_core::Error::Config(format!("{e:#}")))?;
                pb.inc(chunk.len() as u64);
                Ok(f)
            });
    let scorer: Box<dyn Scorer> = match o.scorer {
        ScorerKind::Padim => {
            let cfg = PadimConfig {
                dims: o.padim_dims,
                seed: o.seed,
                levels: levels.clone(),
                ..Default::default()
            };
            Box::new(cfg.fit(&mut batches)?)
        }
        ScorerKind::Patchcore => {
            let cfg = PatchcoreConfig {
                levels: levels.clone(),
                coreset_ratio: o.coreset_ratio,
                embed_dim: o.patchcore_dim,
                reweight_k: o.reweight_k,
                bank_dtype: o.bank_dtype,
                seed: o.seed,
                ..Default::default()
            };
            // The coreset bar replaces the feature bar once features are done.
            let coreset_bar = std::sync::OnceLock::new();
            let progress = |done: usize, total: usize| {
                let bar = coreset_bar.get_or_init(|| {
                    pb.finish_and_clear();
                    o.progress.bar(total as u64, "coreset")
                });
                bar.set_position(done as u64);
            };
            let fitted = cfg.fit_with_progress(&mut batches, &progress)?;
            if let Some(bar) = coreset_bar.get() {
                bar.finish_and_clear();
            }
            Box::new(fitted)
        }
        ScorerKind::Cfa => {
            let cfg = CfaConfig {
                levels: levels.clone(),
                epochs: o.epochs,
                patience: o.patience,
                gamma_d: o.cfa_gamma_d,
                gamma_c: o.cfa_gamma_c,
                seed: o.seed,
                ..Default::default()
            };
            let bar = std::sync::OnceLock::new();
            let progress = |p: TrainProgress| {
                let b = bar.get_or_init(|| {
                    pb.finish_and_clear();
                    o.progress.bar((p.epochs * p.batches) as u64, "train")
                });
                b.set_position(((p.epoch - 1) * p.batches + p.batch) as u64);
                b.set_message(format!("epoch {}/{} loss {:.3}", p.epoch, p.epochs, p.loss));
            };
            let fitted = match &e2e {
                None => cfg.fit_with_progress(&mut batches, &progress)?,
                Some(t) => {
                    let f = cfg.fit_end_to_end(&mut batches, t, &progress)?;
                    pfam = Some(t.pfam.detached());
                    f
                }
            };
            if let Some(b) = bar.get() {
                b.finish_and_clear();
            }
            if let Some(last) = fitted.history().last() {
                o.progress.note(format!(
                    "cfa: {} epochs, final training loss {:.4}, radius {:.4}",
                    fitted.history().len(),
                    last.loss,
                    last.radius
                ));
            }
            Box::new(fitted)
        }
    };
    pb.finish_and_clear();
    let tensors = Detector::tensors(&backbone, pfam.as_ref(), scorer.as_ref())?;
    let scorer_report = scorer.fit_report();
    let mut meta = ModelMeta {
        format: FORMAT_VERSION,
        tessera_version: tessera_core::VERSION.into(),
        method: o.method.clone(),
        seed: o.seed,
        preprocess: o.preprocess.clone(),
        backbone: BackboneMeta {
            arch: o.backbone.name().into(),
            layers: levels,
            source: source.describe(),
        },
        scorer: ScorerMeta {
            kind: scorer.kind().into(),
            config: scorer.config(),
        },
        fit: FitMeta {
            seconds: 0.0,
            images: train.len(),
            data: o.data.display().to_string(),
            created_unix: 0,
        },
        threshold: 0.0,
        heat_range: (0.0, 1.0),
        sbm: sbm_meta,
        pfam: pfam_from
            .as_ref()
            .map(|(_, c)| serde_json::to_value(c))
            .transpose()?,
    };
    let det = Detector {
        backbone,
        pfam,
        scorer,
        meta: meta.clone(),
    };
    // Calibration: score evenly spaced training images through the same path as `test`.
    let step = train.len().div_ceil(CALIBRATION_IMAGES).max(1);
    let calib: Vec<Sample> = train.iter().step_by(step).cloned().collect();
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for chunk in calib.chunks(o.batch_size) {
        let b = load_batch(chunk, &o.preprocess, &device)?;
        let (maps, _) = det.score(&b.tensor)?;
        for m in &maps {
            for &v in &m.data {
                lo = lo.min(v);
                hi = hi.max(v);
            }
        }
    }
    meta.threshold = hi;
    meta.heat_range = (lo, hi + (hi - lo));
    meta.fit.seconds = start.elapsed().as_secs_f64();
    meta.fit.created_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    ModelFile {
        meta: meta.clone(),
        tensors,
    }
    .save(&o.out)?;
    Ok(FitSummary {
        model: o.out.clone(),
        images: train.len(),
        seconds: meta.fit.seconds,
        threshold: meta.threshold,
        backbone: meta.backbone.arch,
        weights: meta.backbone.source,
        scorer_report,
        model_bytes: std::fs::metadata(&o.out).map(|m| m.len()).unwrap_or(0),
    })
}

/// Where `fit --method sbm` writes the tuned backbone: beside the model, `<out>.sbm.safetensors`.
pub fn sbm_output_path(out: &Path) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    out.with_file_name(format!("{stem}.sbm.safetensors"))
}

/// PFAM with trainable variables (initialised from an SBM output file), for CFA end to end.
struct TrainablePfam {
    pfam: Pfam,
    vars: Vec<candle_core::Var>,
}

impl tessera_cfa::FeatureTransform for TrainablePfam {
    fn forward(&self, f: &FeatureMaps) -> tessera_core::Result<FeatureMaps> {
        self.pfam.forward(f)
    }
    fn vars(&self) -> Vec<candle_core::Var> {
        self.vars.clone()
    }
}

fn trainable_pfam(
    path: &Path,
    cfg: &PfamConfig,
    backbone: &Backbone,
    device: &Device,
) -> Result<TrainablePfam> {
    let ch = backbone.channels();
    let t = candle_core::safetensors::load(path, device)
        .with_context(|| format!("{}: unreadable", path.display()))?;
    let varmap = candle_nn::VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned variable map"))?;
        for (k, v) in t.into_iter().filter(|(k, _)| k.starts_with("pfam.")) {
            data.insert(k, candle_core::Var::from_tensor(&v)?);
        }
    }
    // Variables already in the map are used as they are (the trained values).
    let vb =
        candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, device).pp("pfam");
    let pfam = Pfam::new(cfg.clone(), [ch[0], ch[1], ch[2]], vb)
        .with_context(|| path.display().to_string())?;
    Ok(TrainablePfam {
        pfam,
        vars: varmap.all_vars(),
    })
}

/// PFAM as trained by SBM, from its output file.
fn load_pfam(path: &Path, cfg: &PfamConfig, backbone: &Backbone, device: &Device) -> Result<Pfam> {
    let ch = backbone.channels();
    let t = candle_core::safetensors::load(path, device)
        .with_context(|| format!("{}: unreadable", path.display()))?;
    let t: std::collections::HashMap<_, _> = t
        .into_iter()
        .filter(|(k, _)| k.starts_with("pfam."))
        .collect();
    Pfam::load(&t, "pfam", cfg.clone(), [ch[0], ch[1], ch[2]], device)
        .with_context(|| path.display().to_string())
}

fn sbm_summary(r: &tessera_sbm::SbmReport) -> serde_json::Value {
    serde_json::json!({
        "applied": true,
        "gate": r.gate,
        "drift": r.drift,
        "epochs": r.history.len(),
        "train_layers": r.config.train_layers,
        "anchor": r.config.anchor,
        "anchor_weight": r.config.anchor_weight,
        "lr_backbone": r.config.lr_backbone,
        "source": r.source,
        "pfam": r.config.pfam.is_some(),
    })
}

/// Options of `tessera test`.
#[derive(Debug, Clone)]
pub struct TestOptions {
    pub model: PathBuf,
    pub data: PathBuf,
    pub report: PathBuf,
    pub heatmaps: Option<PathBuf>,
    pub device: DeviceSpec,
    pub batch_size: usize,
    pub progress: Progress,
}

/// Score a dataset's test split with a model file and write the report (JSON, and Markdown
/// beside it) and optionally heatmap panels.
pub fn test(o: &TestOptions) -> Result<tessera_eval::Report> {
    if o.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let device = o.device.open()?;
    let det = Detector::load(&o.model, &device)?;
    let ds = Dataset::open(&o.data)?;
    let samples = ds.test()?;
    let pb = o.progress.bar(samples.len() as u64, "test");
    let mut evals = Vec::with_capacity(samples.len());
    let mut images = Vec::new();
    let (mut feat_ms, mut score_ms) = (0.0, 0.0);
    for chunk in samples.chunks(o.batch_size) {
        let b = load_batch(chunk, &det.meta.preprocess, &device)?;
        let (maps, t) = det.score(&b.tensor)?;
        feat_ms += t.features_ms;
        score_ms += t.score_ms;
        for ((s, map), mask) in chunk.iter().zip(maps).zip(b.masks) {
            evals.push(EvalSample {
                name: s.name.clone(),
                defect_type: s.defect_type.clone(),
                map,
                mask,
            });
        }
        if o.heatmaps.is_some() {
            images.extend(b.images);
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
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
        scorer: det.meta.scorer.kind.clone(),
        backbone: format!("{} ({})", det.meta.backbone.arch, det.meta.backbone.source),
        method: det.meta.method.clone(),
    };
    let report = evaluate(&evals, timings, info);
    report.write_json(&o.report)?;
    report.write_markdown(&o.report.with_extension("md"))?;
    if let Some(dir) = &o.heatmaps {
        // The stated threshold of the contour: the F1-optimal pixel threshold of this run when
        // masks exist, else the model's default.
        let thr = report.pixel_threshold.unwrap_or(det.meta.threshold);
        let pb = o.progress.bar(evals.len() as u64, "heatmaps");
        for (e, img) in evals.iter().zip(&images) {
            let panel = render_panel(img, &e.map, e.mask.as_deref(), thr, det.meta.heat_range)?;
            let file = Path::new(&e.name).with_extension("png");
            save_png(&panel, &dir.join(file))?;
            pb.inc(1);
        }
        pb.finish_and_clear();
    }
    Ok(report)
}

/// Options of `tessera predict`.
#[derive(Debug, Clone)]
pub struct PredictOptions {
    pub model: PathBuf,
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    /// Pixel threshold for the predicted mask and the anomalous flag; model default if `None`.
    pub threshold: Option<f32>,
    pub device: DeviceSpec,
    pub batch_size: usize,
    pub progress: Progress,
}

/// What `predict` did.
#[derive(Debug, Clone, Serialize)]
pub struct PredictSummary {
    pub images: usize,
    pub anomalous: usize,
    pub threshold: f32,
    pub scores_csv: PathBuf,
}

/// Score images (files or folders of images) with a model file: heatmap panels and
/// `scores.csv` in `out`.
pub fn predict(o: &PredictOptions) -> Result<PredictSummary> {
    if o.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let device = o.device.open()?;
    let det = Detector::load(&o.model, &device)?;
    let mut files = Vec::new();
    for p in &o.inputs {
        if p.is_dir() {
            files.extend(list_images(p)?);
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            bail!("{}: no such file or folder", p.display());
        }
    }
    if files.is_empty() {
        bail!("no images found in {:?}", o.inputs);
    }
    let thr = o.threshold.unwrap_or(det.meta.threshold);
    let samples: Vec<Sample> = files
        .iter()
        .map(|p| Sample {
            path: p.clone(),
            defect_type: "unknown".into(),
            mask: None,
            name: p.display().to_string(),
        })
        .collect();
    let mut csv = String::from("path,score,anomalous,heatmap\n");
    let mut anomalous = 0;
    let mut used_names = std::collections::HashSet::new();
    let pb = o.progress.bar(samples.len() as u64, "predict");
    for chunk in samples.chunks(o.batch_size) {
        let b = load_batch(chunk, &det.meta.preprocess, &device)?;
        let (maps, _) = det.score(&b.tensor)?;
        for ((s, map), img) in chunk.iter().zip(maps).zip(&b.images) {
            let score = map.image_score();
            let is_anom = score >= thr;
            anomalous += is_anom as usize;
            let stem = s
                .path
                .file_stem()
                .map(|x| x.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut name = format!("{stem}.png");
            let mut k = 1;
            while !used_names.insert(name.clone()) {
                name = format!("{stem}_{k}.png");
                k += 1;
            }
            let panel = render_panel(img, &map, None, thr, det.meta.heat_range)?;
            save_png(&panel, &o.out.join(&name))?;
            csv.push_str(&format!(
                "{},{score},{is_anom},{name}\n",
                csv_field(&s.path.display().to_string())
            ));
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    let scores_csv = o.out.join("scores.csv");
    tessera_core::io::write_atomic(&scores_csv, csv.as_bytes()).context("writing scores.csv")?;
    Ok(PredictSummary {
        images: samples.len(),
        anomalous,
        threshold: thr,
        scores_csv,
    })
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
