//! `fit` as stages: [`prepare_backbone`](crate::prepare_backbone) → optional SBM
//! ([`sbm_stage`]) → optional PFAM ([`load_pfam`]) → [`fit_scorer`] → [`calibrate`] →
//! [`Detector::to_model_file`].

use crate::batches::batches;
use crate::calibrate::{calibrate, split_holdout, CalibrationOptions, CalibrationRun};
use crate::detector::TILE_CHUNK;
use crate::detector::{extract, Detector};
use crate::gate::{gate_score, paired_margin, MethodGate};
use crate::memory::{available_bytes, check_fit_memory, estimate_fit};
use crate::meta::{BackboneMeta, FitMeta, Method, ModelMeta, SbmMeta};
use crate::names::named_enum;
use crate::observer::{stage, Counter, Observer};
use crate::sbm::{check_sbm_weights, checkpoint_path, sbm_train_checked, SbmMode, SbmOptions};
use crate::tiles::TileGrid;
use crate::weights::{prepare_backbone, WeightsArgs};
use crate::ScorerConfig;
use candle_core::{Device, Tensor};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tessera_backbone::{Backbone, WeightsSource};
use tessera_core::io::Outputs;
use tessera_core::model::{Geometry, Preprocess, AUTO_ASPECT, FORMAT_VERSION};
use tessera_core::{DeviceSpec, Error, FeatureMaps, Result, Scorer};
use tessera_data::{Dataset, Sample};
use tessera_pfam::{Pfam, PfamConfig};
use tessera_sbm::SbmConfig;

named_enum! {
    /// How PFAM trains for `--method ours`.
    #[derive(Default)]
    pub enum PfamTraining {
        /// In the SBM stage, on the jigsaw task.
        #[default]
        Jigsaw => "jigsaw",
        /// Then also end to end with CFA's loss (`--scorer cfa` only).
        Cfa => "cfa",
        /// On the frozen (SBM-tuned for objects) backbone, to segment synthetic defects
        /// (any category; no jigsaw for PFAM).
        Synth => "synth",
    }
}

named_enum! {
    /// What the method gate of `--method sbm|ours` does ([`MethodGate`]).
    #[derive(Default)]
    pub enum GateMode {
        /// Fit the baseline too; keep the method only when it is better on held-out normals +
        /// synthetic defects.
        #[default]
        On => "on",
        /// Measure and record the gate's choice, but keep the method (research runs that
        /// report the method's own numbers).
        Report => "report",
        /// No baseline fit, no comparison: the method as asked.
        Off => "off",
    }
}

/// The SBM stage's settings (`--method sbm|ours`).
#[derive(Debug, Clone, Default)]
pub struct SbmStage {
    /// On which categories SBM trains the backbone.
    pub mode: SbmMode,
    /// Use this SBM output (tuned backbone, with PFAM for `ours`) instead of training one.
    pub weights: Option<PathBuf>,
    /// Use SBM weights even when their gate failed.
    pub force: bool,
    /// The SBM settings when it trains.
    pub config: SbmConfig,
    /// Texture images for SBM's synthetic defects.
    pub textures: Option<PathBuf>,
    /// PFAM's settings under `--pfam-train synth` (the seed is the fit's).
    pub segment: tessera_sbm::SegmentConfig,
}

/// Options of `fit`.
#[derive(Debug, Clone)]
pub struct FitOptions {
    pub data: PathBuf,
    pub weights: WeightsArgs,
    pub method: Method,
    /// The scorer and its hyper-parameters (its seed is replaced by `seed`).
    pub scorer: ScorerConfig,
    pub sbm: SbmStage,
    pub pfam_training: PfamTraining,
    /// Seed of every random choice.
    pub seed: u64,
    pub preprocess: Preprocess,
    pub device: DeviceSpec,
    pub batch_size: usize,
    pub out: PathBuf,
    /// How the thresholds are chosen.
    pub calibration: CalibrationOptions,
    /// `--method sbm|ours`: also fit the baseline and keep the method only when it is better
    /// on held-out normals + synthetic defects ([`MethodGate`]).
    pub method_gate: GateMode,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            data: PathBuf::new(),
            weights: WeightsArgs::default(),
            method: Method::Baseline,
            scorer: ScorerConfig::default(),
            sbm: SbmStage::default(),
            pfam_training: PfamTraining::Jigsaw,
            seed: 0,
            preprocess: Preprocess::auto(),
            device: DeviceSpec::Cpu,
            out: PathBuf::from("model.safetensors"),
            batch_size: 8,
            calibration: CalibrationOptions::default(),
            method_gate: GateMode::On,
        }
    }
}

impl FitOptions {
    /// PaDiM on a seeded random backbone at `preprocess` (no weights file, no download): the
    /// quick model of demos, examples and tests; every other option at its default.
    pub fn random_backbone(
        data: impl Into<PathBuf>,
        out: impl Into<PathBuf>,
        preprocess: Preprocess,
        seed: u64,
    ) -> Self {
        Self {
            data: data.into(),
            weights: WeightsArgs {
                random_weights: Some(seed),
                ..Default::default()
            },
            preprocess,
            out: out.into(),
            seed,
            ..Default::default()
        }
    }
}

/// What `fit` did.
#[derive(Debug, Clone, Serialize)]
pub struct FitSummary {
    pub model: PathBuf,
    /// The method the model uses (`baseline` when `--method sbm|ours` fell back).
    pub method: Method,
    /// Images the scorer was fitted on.
    pub images: usize,
    /// Normal images held out for calibration.
    pub calibration_images: usize,
    pub seconds: f64,
    /// The image threshold (anomalous above it).
    pub threshold: f32,
    /// The pixel threshold of masks.
    pub pixel_threshold: f32,
    /// The false-alarm rate the image threshold guarantees (conformal), when calibrated on
    /// held-out normals.
    pub guaranteed_fpr: Option<f64>,
    /// What the user should know about the calibration.
    pub notes: Vec<String>,
    /// The preprocessing the model runs with (whole-image sizes resolved).
    pub preprocess: Preprocess,
    pub backbone: String,
    pub weights: String,
    /// Scorer-specific fit facts (PatchCore: patches, bank size, feature and coreset seconds).
    pub scorer_report: serde_json::Value,
    /// Model file size in bytes.
    pub model_bytes: u64,
    /// SHA-256 of the model's tensors (stored in the file, verified at load).
    pub checksum: String,
    /// `--method sbm|ours`: the method gate's evidence and choice.
    pub gate: Option<MethodGate>,
}

/// Where `fit --method sbm` writes the tuned backbone: beside the model, `<out>.sbm.safetensors`.
pub fn sbm_output_path(out: &Path) -> PathBuf {
    beside(out, "sbm")
}

/// Where `fit --method ours --pfam-train synth` writes PFAM: `<out>.pfam.safetensors`.
pub fn pfam_output_path(out: &Path) -> PathBuf {
    beside(out, "pfam")
}

/// `<stem of out>.<tag>.safetensors` in `out`'s folder.
fn beside(out: &Path, tag: &str) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    out.with_file_name(format!("{stem}.{tag}.safetensors"))
}

/// What the SBM stage hands to the rest of the fit.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The backbone weights to fit on (SBM-tuned or the pretrained ones).
    pub source: WeightsSource,
    /// The file holding trained PFAM tensors, and their configuration (`--method ours`).
    pub pfam_from: Option<(PathBuf, PfamConfig)>,
    /// What SBM did, for the model file.
    pub sbm: Option<SbmMeta>,
    /// The method the model really uses: the one asked for, or `Baseline` when the jigsaw
    /// was not learned and `fit` fell back.
    pub method: Method,
}

impl FitOptions {
    fn validate(&self) -> Result<()> {
        if self.sbm.weights.is_some() && self.method == Method::Baseline {
            return Err(Error::Config(
                "--sbm-weights needs --method sbm or --method ours".into(),
            ));
        }
        if self.batch_size == 0 {
            return Err(Error::Config("--batch-size must be at least 1".into()));
        }
        self.calibration.validate()?;
        if self.preprocess.tiling.is_some() && self.method != Method::Baseline {
            return Err(Error::Config(
                "tiling works with --method baseline only: SBM and PFAM train on whole images \
                 (use a whole-image preprocessing instead of tiles with --method sbm|ours)"
                    .into(),
            ));
        }
        match (self.pfam_training, self.method, self.scorer.kind()) {
            (PfamTraining::Cfa, m, _) if m != Method::Ours => Err(Error::Config(
                "--pfam-train cfa needs --method ours (PFAM)".into(),
            )),
            (PfamTraining::Cfa, _, k) if k != crate::ScorerKind::Cfa => {
                Err(Error::Config("--pfam-train cfa needs --scorer cfa".into()))
            }
            (PfamTraining::Synth, m, _) if m != Method::Ours => Err(Error::Config(
                "--pfam-train synth needs --method ours (PFAM)".into(),
            )),
            _ => self.preprocess.validate(),
        }
    }

    /// Whether PFAM learns to segment synthetic defects (no jigsaw for PFAM).
    fn segments(&self) -> bool {
        self.method == Method::Ours && self.pfam_training == PfamTraining::Synth
    }

    /// Whether this fit will train SBM itself (so its output paths must be writable).
    fn trains_sbm(&self, ds: &Dataset) -> bool {
        self.method != Method::Baseline
            && self.sbm.weights.is_none()
            && (self.sbm.mode.applies(ds).0 || (self.method == Method::Ours && !self.segments()))
    }

    fn outputs(&self, ds: &Dataset) -> Result<()> {
        let mut outs = Outputs::default();
        outs.reads(&self.data, "--data");
        if let Some(w) = &self.weights.weights {
            outs.reads(w, "--weights");
        }
        if let Some(w) = &self.sbm.weights {
            outs.reads(w, "--sbm-weights");
        }
        if let Some(t) = &self.sbm.textures {
            outs.reads(t, "--textures");
        }
        outs.check_file(&self.out, "--out")?;
        if self.trains_sbm(ds) {
            let tuned = sbm_output_path(&self.out);
            outs.check_file(&tuned, "--out (the SBM-tuned backbone beside it)")?;
            outs.check_file(
                &checkpoint_path(&tuned),
                "--out (the SBM checkpoint beside it)",
            )?;
        }
        if self.segments() {
            outs.check_file(
                &pfam_output_path(&self.out),
                "--out (the trained PFAM beside it)",
            )?;
        }
        Ok(())
    }
}

/// The SBM stage of `fit --method sbm|ours`: use given SBM weights, train SBM (and PFAM), or
/// skip it, and say why.
pub fn sbm_stage(
    o: &FitOptions,
    ds: &Dataset,
    train: &[Sample],
    obs: &dyn Observer,
) -> Result<Prepared> {
    let mut source = o.weights.source()?;
    if o.method == Method::Baseline {
        return Ok(Prepared {
            source,
            pfam_from: None,
            sbm: None,
            method: Method::Baseline,
        });
    }
    let ours = o.method == Method::Ours;
    // PFAM learns from synthetic defects, after SBM (which then trains the backbone alone).
    let segments = o.segments();
    let (use_sbm, why) = o.sbm.mode.applies(ds);
    let mut pfam_from = None;
    let mut sbm = if let Some(p) = &o.sbm.weights {
        let report = check_sbm_weights(p, o.sbm.force)?;
        obs.note(&format!("sbm: using tuned weights {}", p.display()));
        if ours && !segments {
            let cfg = report.as_ref().and_then(|r| r.config.pfam.clone());
            let Some(cfg) = cfg else {
                return Err(Error::bad_model(
                    p,
                    "trained without PFAM, so it cannot serve --method ours (use --method sbm, \
                     or `tessera sbm train --pfam`)",
                ));
            };
            pfam_from = Some((p.clone(), cfg));
        }
        source = WeightsSource::File(p.clone());
        report.map(|r| SbmMeta::from_report(&r))
    } else if use_sbm || (ours && !segments) {
        let mut config = SbmConfig {
            seed: o.seed,
            ..o.sbm.config.clone()
        };
        if segments {
            config.pfam = None;
        } else if ours {
            config.pfam = Some(config.pfam.unwrap_or_default());
            if !use_sbm {
                // Texture classes: the backbone stays as ImageNet left it; PFAM alone learns
                // on the jigsaw task (the paper applies SBM to objects only).
                config.train_layers.clear();
            }
        }
        obs.note(&if use_sbm {
            format!("sbm: training the jigsaw first ({why})")
        } else {
            format!("sbm: backbone frozen ({why}); training PFAM on the jigsaw task")
        });
        let tuned = sbm_output_path(&o.out);
        let s = sbm_train_checked(
            &SbmOptions {
                data: o.data.clone(),
                textures: o.sbm.textures.clone(),
                weights: o.weights.clone(),
                out: tuned.clone(),
                config,
                foreground: None,
                no_synth: false,
                preprocess: o.preprocess.clone(),
                device: o.device,
                restart: false,
            },
            Some(train),
            obs,
        )?;
        let g = &s.report.gate;
        if !g.passed && !o.sbm.force {
            // A jigsaw that cannot be learned (a uniform texture, a featureless surface) says
            // nothing about the category: fit the baseline instead of failing, and say so.
            let why = format!(
                "the jigsaw was not learned (held-out accuracy {:.1}% < gate {:.1}%, chance \
                 {:.1}%{})",
                g.accuracy * 100.0,
                g.threshold * 100.0,
                g.chance * 100.0,
                if s.report.stopped_early {
                    format!(
                        "; stopped after {} of {} epochs at chance level",
                        s.report.history.len(),
                        s.report.config.epochs
                    )
                } else {
                    String::new()
                }
            );
            if segments {
                // PFAM does not need the jigsaw: it still trains, on the pretrained backbone.
                obs.warn(&format!(
                    "sbm: {why}; the pretrained backbone is kept, PFAM still trains on \
                     synthetic defects. The SBM output stays at {} for inspection.",
                    tuned.display()
                ));
                let meta = SbmMeta {
                    applied: false,
                    reason: Some(format!("{why}: the pretrained backbone is kept")),
                    ..SbmMeta::from_report(&s.report)
                };
                return segment_stage(o, ds, train, source, Some(meta), obs);
            }
            obs.warn(&format!(
                "--method {}: {why}; falling back to --method baseline (the pretrained \
                 backbone{}). The SBM output stays at {} for inspection; --sbm-force uses it \
                 anyway.",
                o.method,
                if ours { ", no PFAM" } else { "" },
                tuned.display()
            ));
            return Ok(Prepared {
                source: o.weights.source()?,
                pfam_from: None,
                sbm: Some(SbmMeta {
                    applied: false,
                    reason: Some(format!("{why}: fell back to the baseline")),
                    ..SbmMeta::from_report(&s.report)
                }),
                method: Method::Baseline,
            });
        }
        check_sbm_weights(&tuned, o.sbm.force)?;
        if let Some(cfg) = &s.report.config.pfam {
            pfam_from = Some((tuned.clone(), cfg.clone()));
        }
        source = WeightsSource::File(tuned);
        Some(SbmMeta::from_report(&s.report))
    } else {
        obs.note(&format!(
            "sbm: skipped, {why}; fitting on the pretrained backbone"
        ));
        Some(SbmMeta::skipped(why))
    };
    if segments {
        return segment_stage(o, ds, train, source, sbm.take(), obs);
    }
    Ok(Prepared {
        source,
        pfam_from,
        sbm,
        method: o.method,
    })
}

/// `--pfam-train synth`: train PFAM on the backbone `source` names to segment synthetic
/// defects of `train`, write it beside the model, and hand it to the fit.
fn segment_stage(
    o: &FitOptions,
    ds: &Dataset,
    train: &[Sample],
    source: WeightsSource,
    sbm: Option<SbmMeta>,
    obs: &dyn Observer,
) -> Result<Prepared> {
    let out = pfam_output_path(&o.out);
    let config = tessera_sbm::SegmentConfig {
        seed: o.seed,
        ..o.sbm.segment.clone()
    };
    let report = crate::sbm::pfam_segment_train(o, ds, &config, train, &source, &out, obs)?;
    // Always recorded; only `--sbm-weights` naming a file without an SBM report (forced)
    // arrives here without an SBM record.
    let sbm = Some(SbmMeta {
        pfam: Some(true),
        pfam_segment: Some(report),
        ..sbm.unwrap_or_else(|| SbmMeta {
            applied: true,
            ..SbmMeta::skipped("--sbm-weights without an SBM report")
        })
    });
    Ok(Prepared {
        source,
        pfam_from: Some((out, config.pfam)),
        sbm,
        method: Method::Ours,
    })
}

/// The `pfam.*` tensors of an SBM output file.
fn pfam_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let map = tessera_core::st::Mapped::open(path)?;
    map.load(
        device,
        |k| k.starts_with("pfam."),
        &tessera_core::st::LoadChecks {
            finite: true,
            expect_hash: None,
        },
    )
}

fn channels3(backbone: &Backbone) -> Result<[usize; 3]> {
    match backbone.channels()[..] {
        [a, b, c] => Ok([a, b, c]),
        _ => Err(Error::Config("PFAM needs backbone layers 1..3".into())),
    }
}

/// PFAM as trained by SBM, from its output file (plain tensors, for inference).
pub fn load_pfam(path: &Path, cfg: &PfamConfig, backbone: &Backbone) -> Result<Pfam> {
    let device = backbone.device();
    let t = pfam_tensors(path, device)?;
    Pfam::load(&t, "pfam", cfg.clone(), channels3(backbone)?, device).map_err(|e| e.in_file(path))
}

/// PFAM with trainable variables (initialised from an SBM output file), for CFA end to end.
pub struct TrainablePfam {
    pub pfam: Pfam,
    vars: Vec<candle_core::Var>,
}

impl tessera_cfa::FeatureTransform for TrainablePfam {
    fn forward(&self, f: &FeatureMaps) -> Result<FeatureMaps> {
        self.pfam.forward(f)
    }
    fn vars(&self) -> Vec<candle_core::Var> {
        self.vars.clone()
    }
}

/// [`load_pfam`] with every parameter a trainable variable.
pub fn trainable_pfam(path: &Path, cfg: &PfamConfig, backbone: &Backbone) -> Result<TrainablePfam> {
    let device = backbone.device();
    let t = pfam_tensors(path, device)?;
    let varmap = candle_nn::VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| Error::Config("poisoned variable map".into()))?;
        for (k, v) in t {
            data.insert(k, candle_core::Var::from_tensor(&v)?);
        }
    }
    // Variables already in the map are used as they are (the trained values).
    let vb =
        candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, device).pp("pfam");
    let pfam = Pfam::new(cfg.clone(), channels3(backbone)?, vb).map_err(|e| e.in_file(path))?;
    Ok(TrainablePfam {
        pfam,
        vars: varmap.all_vars(),
    })
}

/// Fit the scorer on the features of `train` (through `pfam` when given). With `e2e`, CFA
/// trains PFAM end to end and the trained PFAM is returned.
#[allow(clippy::too_many_arguments)]
pub fn fit_scorer(
    config: &ScorerConfig,
    backbone: &Backbone,
    pfam: Option<&Pfam>,
    e2e: Option<&TrainablePfam>,
    train: &[Sample],
    preprocess: &Preprocess,
    batch_size: usize,
    obs: &dyn Observer,
) -> Result<(Box<dyn Scorer>, Option<Pfam>)> {
    let device = backbone.device().clone();
    // With end-to-end training the scorer sees raw backbone features and applies PFAM itself.
    let features_pfam = if e2e.is_some() { None } else { pfam };
    let count = Counter::start(obs, stage::FEATURES, train.len() as u64);
    // Tiled: every image's tiles, at most TILE_CHUNK per backbone pass.
    let mut feats = batches(train, preprocess, batch_size, &device).flat_map(|b| {
        let prepared = b.and_then(|b| {
            let x = match preprocess.tiling {
                None => b.tensor,
                Some(t) => {
                    let (_, _, h, w) = b.tensor.dims4()?;
                    TileGrid::new(w as u32, h as u32, t)?.split(&b.tensor)?
                }
            };
            count.add(b.images.len() as u64);
            Ok(x)
        });
        let out: Vec<Result<FeatureMaps>> = match prepared {
            Err(e) => vec![Err(e)],
            Ok(x) => {
                let n = x.dims()[0];
                (0..n)
                    .step_by(TILE_CHUNK)
                    .map(|s| {
                        let part = x.narrow(0, s, TILE_CHUNK.min(n - s))?;
                        extract(backbone, features_pfam, &part)
                    })
                    .collect()
            }
        };
        out
    });
    let transform = e2e.map(|t| t as &dyn tessera_cfa::FeatureTransform);
    let scorer = config.fit(&mut feats, transform, obs)?;
    drop(feats);
    drop(count);
    let pfam = match e2e {
        Some(t) => Some(t.pfam.detached()),
        None => pfam.cloned(),
    };
    Ok((scorer, pfam))
}

/// How many training images are re-scored for an in-sample calibration
/// (`--calibration-fraction 0`).
pub const IN_SAMPLE_IMAGES: usize = 32;

/// Fit a detector on a dataset's normal training images and write the model file. Every
/// output is checked before the work starts.
pub fn fit(o: &FitOptions, obs: &dyn Observer) -> Result<FitSummary> {
    let start = Instant::now();
    o.validate()?;
    let ds = Dataset::open(&o.data)?;
    o.outputs(&ds)?;
    let device = o.device.open()?;
    let all = ds.train()?;
    // Every later stage (SBM's training included) sees the geometry fixed for the whole set:
    // resolving per image would give images of slightly different sizes different inputs.
    let resolved = FitOptions {
        preprocess: resolve_preprocess(&o.preprocess, &all, obs)?,
        ..o.clone()
    };
    let o = &resolved;
    let split_seed = o.calibration.split_seed();
    let (train, calib) = split_holdout(all, o.calibration.fraction, split_seed);
    if train.len() < 2 {
        return Err(Error::bad_input(
            &o.data,
            format!(
                "{} normal training images are too few to fit (need 2)",
                train.len()
            ),
        ));
    }
    // Memory bounds before any work: what the scorer will hold, against what is available.
    if let Some((w, h)) = o.preprocess.input_size() {
        let (size, per_image) = match o.preprocess.tiling {
            None => ((w, h), 1u64),
            Some(t) => ((t.tile, t.tile), TileGrid::new(w, h, t)?.count() as u64),
        };
        let est = estimate_fit(
            &o.scorer,
            o.weights.backbone,
            size,
            train.len() as u64 * per_image,
        );
        check_fit_memory(&est, available_bytes())?;
    }
    if !calib.is_empty() {
        obs.note(&format!(
            "calibration: {} of {} normal training images held out (seed {}), never fitted on",
            calib.len(),
            calib.len() + train.len(),
            split_seed
        ));
    }
    let mut scorer_cfg = o.scorer.clone();
    scorer_cfg.set_seed(o.seed);
    let mut prepared = sbm_stage(o, &ds, &train, obs)?;
    // Calibration (and the method gate) score these normals through the same path as `test`:
    // held-out normals, or (fraction 0) evenly spaced training images, said to be optimistic.
    let held_out = !calib.is_empty();
    let normals: Vec<Sample> = if held_out {
        calib.clone()
    } else {
        let step = train.len().div_ceil(IN_SAMPLE_IMAGES).max(1);
        train.iter().step_by(step).cloned().collect()
    };
    // Synthetic defects go on the object's foreground for object categories (named, or
    // inferred from the images).
    let foreground = matches!(
        ds.resolve_kind(),
        Ok((tessera_data::CategoryKind::Object, _))
    );
    let fitted = |prepared: &Prepared, backbone: Backbone| -> Result<Detector> {
        fit_detector(o, &scorer_cfg, prepared, backbone, &train, obs)
    };
    let mut det = fitted(
        &prepared,
        prepare_backbone(o.weights.backbone, &prepared.source, &device)?,
    )?;
    let mut gate = None;
    let base = Prepared {
        source: o.weights.source()?,
        pfam_from: None,
        sbm: None,
        method: Method::Baseline,
    };
    // The baseline needs the pretrained weights; with only `--sbm-weights` given they may be
    // out of reach (no network): then there is nothing to compare with, and the user is told.
    let base_backbone = if prepared.method != Method::Baseline && o.method_gate != GateMode::Off {
        match prepare_backbone(o.weights.backbone, &base.source, &device) {
            Ok(b) => Some(b),
            Err(e) => {
                obs.warn(&format!(
                    "method gate skipped: the baseline's backbone cannot be loaded ({e}); pass \
                     the pretrained weights with --weights to compare, or --method-gate off"
                ));
                None
            }
        }
    } else {
        None
    };
    if let Some(base_backbone) = base_backbone {
        obs.note(&format!(
            "method gate: fitting the baseline too, to compare with --method {} on {} normals + \
             synthetic defects",
            prepared.method,
            normals.len()
        ));
        let base_det = fitted(&base, base_backbone)?;
        let synth = tessera_synth::Synthesizer::new(
            tessera_synth::SynthConfig {
                foreground,
                ..Default::default()
            },
            o.calibration
                .textures
                .as_deref()
                .or(o.sbm.textures.as_deref()),
        )?;
        // Its own seed stream: not the calibration's synthetic images.
        let gseed = o.seed ^ 0x9a7e_0000_0000_0001;
        let m = gate_score(&det, &normals, &synth, gseed, o.batch_size, obs)?;
        let b = gate_score(&base_det, &normals, &synth, gseed, o.batch_size, obs)?;
        let margin = paired_margin(&b, &m, gseed);
        let mut g = MethodGate::decide(
            prepared.method,
            b.score,
            m.score,
            crate::gate::Evidence {
                margin,
                normals: normals.len(),
                synthetic: normals.len(),
                held_out,
                // A PFAM that learned to segment synthetic defects is judged on its own
                // training task by this evidence.
                independent: !o.segments(),
            },
        );
        if o.method_gate == GateMode::Report {
            g.kept = prepared.method;
            g.reason.push_str(&format!(
                " (--method-gate report: the model keeps --method {})",
                g.asked
            ));
        }
        if g.kept != Method::Baseline {
            obs.note(&format!("method gate: {}", g.reason));
        } else {
            // Keeping the baseline although the method was asked for is worth a warning.
            obs.warn(&format!("method gate: {}", g.reason));
            det = base_det;
            prepared.sbm = Some(SbmMeta {
                applied: false,
                reason: Some(format!("the method gate kept the baseline ({})", g.reason)),
                ..prepared.sbm.unwrap_or_else(|| SbmMeta::skipped(""))
            });
            prepared.method = Method::Baseline;
            prepared.pfam_from = None;
            prepared.source = base.source;
        }
        gate = Some(g);
    }
    det.meta.sbm = prepared.sbm.clone();
    det.meta.gate = gate.clone();
    let scorer_report = det.scorer.fit_report();
    let run = CalibrationRun {
        held_out,
        foreground,
        seed: o.seed,
        batch_size: o.batch_size,
    };
    let cal = calibrate(&det, &normals, &o.calibration, run, obs)?;
    for n in &cal.notes {
        obs.warn(n);
    }
    det.meta.threshold = cal.image_threshold;
    det.meta.heat_range = cal.pixel_normalizer().range();
    let guaranteed = (held_out && cal.synthetic.is_none()).then_some(cal.conformal.guaranteed_fpr);
    let (pixel_threshold, notes) = (cal.pixel_threshold, cal.notes.clone());
    det.meta.calibration = Some(cal);
    det.meta.fit.seconds = start.elapsed().as_secs_f64();
    det.meta.fit.created_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let checksum = det.save(&o.out)?;
    Ok(FitSummary {
        model: o.out.clone(),
        method: det.meta.method,
        images: train.len(),
        calibration_images: calib.len(),
        seconds: det.meta.fit.seconds,
        threshold: det.meta.threshold,
        pixel_threshold,
        guaranteed_fpr: guaranteed,
        notes,
        preprocess: o.preprocess.clone(),
        backbone: det.meta.backbone.arch.name().into(),
        weights: det.meta.backbone.source.clone(),
        scorer_report,
        model_bytes: std::fs::metadata(&o.out).map(|m| m.len()).unwrap_or(0),
        checksum,
        gate,
    })
}

/// With the backbone `prepared` names (and its PFAM), fit the scorer on `train` at `o`'s
/// (resolved) preprocessing: an uncalibrated detector (threshold 0 until [`calibrate`]).
fn fit_detector(
    o: &FitOptions,
    scorer_cfg: &ScorerConfig,
    prepared: &Prepared,
    backbone: Backbone,
    train: &[Sample],
    obs: &dyn Observer,
) -> Result<Detector> {
    let pfam = match &prepared.pfam_from {
        Some((p, cfg)) => Some(load_pfam(p, cfg, &backbone)?),
        None => None,
    };
    let e2e = match (&prepared.pfam_from, o.pfam_training) {
        (Some((p, cfg)), PfamTraining::Cfa) => Some(trainable_pfam(p, cfg, &backbone)?),
        _ => None,
    };
    obs.note(&format!(
        "fit: {} training images from {}, {} ({}), method {}, scorer {}, device {}",
        train.len(),
        o.data.display(),
        o.weights.backbone,
        prepared.source.describe(),
        prepared.method,
        scorer_cfg.kind(),
        o.device
    ));
    let (scorer, pfam) = fit_scorer(
        scorer_cfg,
        &backbone,
        pfam.as_ref(),
        e2e.as_ref(),
        train,
        &o.preprocess,
        o.batch_size,
        obs,
    )?;
    let fitted_cfg = ScorerConfig::of(&*scorer)?;
    Ok(Detector {
        backbone,
        pfam,
        scorer,
        meta: ModelMeta {
            format: FORMAT_VERSION,
            tessera_version: tessera_core::VERSION.into(),
            method: prepared.method,
            seed: o.seed,
            preprocess: o.preprocess.clone(),
            backbone: BackboneMeta {
                arch: o.weights.backbone,
                layers: scorer_cfg.levels().to_vec(),
                source: prepared.source.describe(),
            },
            scorer: fitted_cfg,
            fit: FitMeta {
                seconds: 0.0,
                images: train.len(),
                data: o.data.display().to_string(),
                created_unix: 0,
            },
            threshold: 0.0,
            heat_range: (0.0, 1.0),
            calibration: None,
            sbm: prepared.sbm.clone(),
            pfam: prepared.pfam_from.as_ref().map(|(_, c)| c.clone()),
            gate: None,
        },
    })
}

/// A geometry that depends on the images (short side, native size, auto) fixed from the first
/// training image, so every image of the model comes out at one size; the automatic choice is
/// said.
pub(crate) fn resolve_preprocess(
    pre: &Preprocess,
    train: &[Sample],
    obs: &dyn Observer,
) -> Result<Preprocess> {
    if pre.is_resolved() {
        pre.validate()?;
        return Ok(pre.clone());
    }
    let first = train
        .first()
        .ok_or_else(|| Error::Config("no training images".into()))?;
    let size = tessera_data::verify::image_size(&first.path)
        .map_err(|e| Error::bad_input(&first.path, format!("cannot read the image size: {e}")))?;
    let r = pre.resolve(size);
    r.validate()?;
    if pre.geometry == Geometry::Auto {
        let (w, h) = size;
        obs.note(&match r.geometry {
            Geometry::Exact { width, height } => format!(
                "preprocess auto: the training images are {w}×{h} (aspect {:.2} > {AUTO_ASPECT}): \
                 the whole image with its aspect ratio kept, {width}×{height} (--preprocess \
                 paper would squash it into a square and crop its ends)",
                w.max(h) as f64 / w.min(h).max(1) as f64
            ),
            _ => format!(
                "preprocess auto: the training images are {w}×{h} (nearly square): the paper's \
                 resize 256, center crop 224"
            ),
        });
    }
    Ok(r)
}
