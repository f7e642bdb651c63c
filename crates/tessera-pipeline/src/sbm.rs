//! The shape-biased module as a pipeline stage (`sbm train`, and the SBM step of
//! `fit --method sbm|ours`), and `synth`.

use crate::names::named_enum;
use crate::observer::{stage, Counter, Observer};
use crate::weights::{prepare_backbone, WeightsArgs};
use rayon::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tessera_core::io::Outputs;
use tessera_core::model::Preprocess;
use tessera_core::{DeviceSpec, Error, Result};
use tessera_data::{CategoryKind, Dataset};
use tessera_sbm::{SbmConfig, SbmData, SbmEvent, SbmReport};
use tessera_synth::{SynthConfig, Synthesizer};

named_enum! {
    /// Whether SBM applies to a category (`--sbm auto|on|off`).
    #[derive(Default)]
    pub enum SbmMode {
        /// Object categories only (the paper), by the MVTec AD split or the folder spec.
        #[default]
        Auto => "auto",
        On => "on",
        Off => "off",
    }
}

impl SbmMode {
    /// Decide for a dataset; the string says why, for the log.
    pub fn applies(self, ds: &Dataset) -> (bool, String) {
        match self {
            SbmMode::On => (true, "--sbm on".into()),
            SbmMode::Off => (false, "--sbm off".into()),
            SbmMode::Auto => match ds.resolve_kind() {
                Ok((CategoryKind::Object, why)) => (true, why),
                Ok((CategoryKind::Texture, why)) => (
                    false,
                    format!("{why} (the paper applies SBM to objects only)"),
                ),
                Err(e) => (
                    false,
                    format!(
                        "the category's kind could not be decided ({e}); pass --sbm on to use SBM"
                    ),
                ),
            },
        }
    }
}

/// Options of `tessera sbm train`.
#[derive(Debug, Clone)]
pub struct SbmOptions {
    pub data: PathBuf,
    /// Texture images for synthetic defects (optional; without, the structure source only).
    pub textures: Option<PathBuf>,
    pub weights: WeightsArgs,
    pub out: PathBuf,
    pub config: SbmConfig,
    /// Restrict defects to the object (Otsu foreground); default: object categories.
    pub foreground: Option<bool>,
    /// No synthetic defects at all (jigsaw on normal images only).
    pub no_synth: bool,
    pub preprocess: Preprocess,
    pub device: DeviceSpec,
    /// Ignore an existing checkpoint and start over.
    pub restart: bool,
}

/// What `sbm train` did.
#[derive(Debug, Clone, Serialize)]
pub struct SbmSummary {
    pub out: PathBuf,
    pub seconds: f64,
    pub report: SbmReport,
}

/// The checkpoint kept beside an SBM output while it trains.
pub fn checkpoint_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".ckpt");
    PathBuf::from(s)
}

/// The inputs `sbm train` reads, for the output checks.
pub(crate) fn sbm_inputs(o: &SbmOptions, outs: &mut Outputs) {
    outs.reads(&o.data, "--data");
    if let Some(w) = &o.weights.weights {
        outs.reads(w, "--weights");
    }
    if let Some(t) = &o.textures {
        outs.reads(t, "--textures");
    }
}

/// Run SBM on a dataset's normal training images and write the tuned backbone to `o.out`
/// (written even when the gate fails — the file's report says so, and `fit` refuses it).
/// The output and its checkpoint are checked before training starts.
pub fn sbm_train(o: &SbmOptions, obs: &dyn Observer) -> Result<SbmSummary> {
    let mut outs = Outputs::default();
    sbm_inputs(o, &mut outs);
    outs.check_file(&o.out, "--out")?;
    outs.check_file(&checkpoint_path(&o.out), "--out (its checkpoint)")?;
    sbm_train_checked(o, None, obs)
}

/// [`sbm_train`] without the output checks (done by the caller), on `images` when given (the
/// fit's training images: calibration images must not be seen), else the dataset's.
pub(crate) fn sbm_train_checked(
    o: &SbmOptions,
    images: Option<&[tessera_data::Sample]>,
    obs: &dyn Observer,
) -> Result<SbmSummary> {
    let start = Instant::now();
    o.preprocess.validate()?;
    o.config.validate()?;
    let device = o.device.open()?;
    let ds = Dataset::open(&o.data)?;
    let train = match images {
        Some(i) => i.to_vec(),
        None => ds.train()?,
    };
    let source = o.weights.source()?;
    let backbone = prepare_backbone(o.weights.backbone, &source, &device)?;
    let synth = if o.no_synth {
        None
    } else {
        Some(synthesizer(&ds, o.foreground, o.textures.as_deref())?)
    };
    obs.note(&format!(
        "sbm: {} normal images from {}, {} ({}), synthetic defects: {}, layers {:?} train, \
         {} epochs",
        train.len(),
        o.data.display(),
        o.weights.backbone,
        source.describe(),
        match (&synth, &o.textures) {
            (None, _) => "off".to_string(),
            (Some(_), Some(t)) => format!("structure + textures from {}", t.display()),
            (Some(_), None) => "structure source only (no --textures)".to_string(),
        },
        o.config.train_layers,
        o.config.epochs,
    ));
    // One geometry for the whole set (whole-image and automatic geometries resolved from the
    // first image, as `fit` does), so images of slightly different sizes share one input size.
    let preprocess = crate::fit::resolve_preprocess(&o.preprocess, &train, obs)?;
    let data = SbmData {
        images: network_images(&train, &preprocess)?,
        preprocess,
        synth: synth.as_ref(),
        source: source.describe(),
    };
    let ck = checkpoint_path(&o.out);
    if o.restart && ck.exists() {
        std::fs::remove_file(&ck).map_err(|e| Error::io(&ck, e))?;
    }
    let started = std::sync::atomic::AtomicBool::new(false);
    let progress = |e: &SbmEvent| match e {
        SbmEvent::Resumed { epochs_done } => obs.note(&format!(
            "sbm: resuming from {} after epoch {epochs_done}",
            ck.display()
        )),
        SbmEvent::Step {
            epoch,
            epochs,
            batch,
            batches,
            loss,
            accuracy,
        } => {
            if !started.swap(true, std::sync::atomic::Ordering::Relaxed) {
                obs.start(stage::SBM, (*epochs * *batches) as u64);
            }
            let msg = format!(
                "epoch {epoch}/{epochs} loss {loss:.3} acc {:.0}%",
                accuracy * 100.0
            );
            obs.progress(
                stage::SBM,
                ((epoch - 1) * batches + batch) as u64,
                Some(&msg),
            );
        }
        SbmEvent::Evaluating { .. } => {}
        SbmEvent::Epoch(s) => obs.note(&format!(
            "sbm: epoch {}: loss {:.3} (ce {:.3}, anchor {:.4}), train acc {:.1}%, held-out \
             jigsaw acc {:.1}%, drift l1/l2/l3 {:.3}/{:.3}/{:.3}, {:.1} s",
            s.epoch,
            s.loss,
            s.cross_entropy,
            s.anchor,
            s.train_accuracy * 100.0,
            s.heldout_accuracy * 100.0,
            s.drift[0],
            s.drift[1],
            s.drift[2],
            s.seconds
        )),
    };
    let out = tessera_sbm::train(&o.config, &backbone, &data, Some(&ck), &progress)?;
    if started.load(std::sync::atomic::Ordering::Relaxed) {
        obs.finish(stage::SBM);
    }
    out.save(&o.out)?;
    let _ = std::fs::remove_file(&ck);
    let g = &out.report.gate;
    if g.passed {
        obs.note(&format!(
            "sbm: the jigsaw was learned: held-out accuracy on shuffled images {:.1}% \
             (chance {:.1}%, gate {:.1}%); wrote {}",
            g.accuracy * 100.0,
            g.chance * 100.0,
            g.threshold * 100.0,
            o.out.display()
        ));
    } else {
        // A tuned backbone that learned nothing must not pass unseen.
        obs.warn(&format!(
            "SBM did NOT learn the jigsaw: held-out accuracy on shuffled images {:.1}% is below \
             the gate {:.1}% (chance {:.1}%){}. {} was written for inspection, but `tessera fit \
             --sbm-weights` refuses it unless --sbm-force is given.",
            g.accuracy * 100.0,
            g.threshold * 100.0,
            g.chance * 100.0,
            if out.report.stopped_early {
                format!(
                    "; training stopped after {} of {} epochs at chance level \
                     (--sbm-early-stop)",
                    out.report.history.len(),
                    o.config.epochs
                )
            } else {
                String::new()
            },
            o.out.display()
        ));
    }
    Ok(SbmSummary {
        out: o.out.clone(),
        seconds: start.elapsed().as_secs_f64(),
        report: out.report,
    })
}

/// The synthetic-defect maker of a dataset: on the object (Otsu foreground) for object
/// categories unless `foreground` says otherwise.
fn synthesizer(
    ds: &Dataset,
    foreground: Option<bool>,
    textures: Option<&Path>,
) -> Result<Synthesizer> {
    let foreground =
        foreground.unwrap_or(matches!(ds.resolve_kind(), Ok((CategoryKind::Object, _))));
    Synthesizer::new(
        SynthConfig {
            foreground,
            ..Default::default()
        },
        textures,
    )
}

/// The images at the network's input size (`display` images), decoded in parallel.
fn network_images(
    samples: &[tessera_data::Sample],
    pre: &Preprocess,
) -> Result<Vec<image::RgbImage>> {
    samples
        .par_iter()
        .map(|s| Ok(tessera_data::load_image(&s.path, pre)?.display))
        .collect()
}

/// `fit --method ours --pfam-train synth`: train PFAM on the frozen backbone `source` names to
/// segment synthetic defects of `train` (the fit's training images), write it to `out`, and
/// return the report.
pub(crate) fn pfam_segment_train(
    o: &crate::FitOptions,
    ds: &Dataset,
    config: &tessera_sbm::SegmentConfig,
    train: &[tessera_data::Sample],
    source: &tessera_backbone::WeightsSource,
    out: &Path,
    obs: &dyn Observer,
) -> Result<tessera_sbm::SegmentReport> {
    let device = o.device.open()?;
    let backbone = prepare_backbone(o.weights.backbone, source, &device)?;
    // The fit's dataset: its category kind (decided from the images once) places the defects.
    let synth = synthesizer(ds, None, o.sbm.textures.as_deref())?;
    obs.note(&format!(
        "pfam: learning to segment synthetic defects on {} images, backbone {} frozen, {} \
         epochs",
        train.len(),
        source.describe(),
        config.epochs
    ));
    let data = SbmData {
        images: network_images(train, &o.preprocess)?,
        preprocess: o.preprocess.clone(),
        synth: Some(&synth),
        source: source.describe(),
    };
    let started = std::sync::atomic::AtomicBool::new(false);
    let progress = |e: &tessera_sbm::SegmentEvent| match e {
        tessera_sbm::SegmentEvent::Step {
            epoch,
            epochs,
            batch,
            batches,
            loss,
        } => {
            if !started.swap(true, std::sync::atomic::Ordering::Relaxed) {
                obs.start(stage::PFAM, (*epochs * *batches) as u64);
            }
            obs.progress(
                stage::PFAM,
                ((epoch - 1) * batches + batch) as u64,
                Some(&format!("epoch {epoch}/{epochs} loss {loss:.3}")),
            );
        }
        tessera_sbm::SegmentEvent::Epoch(s) => obs.note(&format!(
            "pfam: epoch {}: loss {:.3}, held-out defect AUROC {:.3}, {:.1} s",
            s.epoch, s.loss, s.heldout_auroc, s.seconds
        )),
    };
    let outcome = tessera_sbm::train_pfam_segment(config, &backbone, &data, &progress)?;
    if started.load(std::sync::atomic::Ordering::Relaxed) {
        obs.finish(stage::PFAM);
    }
    outcome.save(out)?;
    let auroc = outcome.report.heldout_auroc;
    let msg = format!(
        "pfam: held-out synthetic-defect AUROC {auroc:.3} (0.5 = chance); wrote {}",
        out.display()
    );
    if auroc < 0.6 {
        obs.warn(&format!(
            "{msg}: PFAM barely learned the defects (the method gate decides whether it helps)"
        ));
    } else {
        obs.note(&msg);
    }
    Ok(outcome.report)
}

/// Check an SBM-tuned weights file before fitting on it: its report must exist and its gate
/// must have passed (unless `force`).
pub fn check_sbm_weights(path: &Path, force: bool) -> Result<Option<SbmReport>> {
    let report = tessera_sbm::read_report(path)?;
    match &report {
        None if !force => Err(Error::bad_model(
            path,
            "not an SBM output (no SBM report in the file); pass it as --weights for a \
             baseline fit, or --sbm-force to use it as SBM weights anyway",
        )),
        Some(r) if !r.gate.passed && !force => Err(Error::bad_model(
            path,
            format!(
                "SBM did not learn the jigsaw (held-out accuracy {:.1}% < gate {:.1}%); \
                 refusing to use it (--sbm-force overrides)",
                r.gate.accuracy * 100.0,
                r.gate.threshold * 100.0
            ),
        )),
        _ => Ok(report),
    }
}

/// Options of `tessera synth`.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// A category folder (normal sources: `train/good`).
    pub data: PathBuf,
    pub textures: Option<PathBuf>,
    pub count: usize,
    pub out: PathBuf,
    pub seed: u64,
    /// Restrict defects to the Otsu foreground; default: object categories.
    pub foreground: Option<bool>,
    /// Replace a non-empty output folder as a whole.
    pub overwrite: bool,
}

/// Write `count` synthetic defect images with masks in MVTec layout (the output folder is
/// replaced as a whole when the run succeeds).
pub fn synth(o: &SynthOptions, obs: &dyn Observer) -> Result<tessera_synth::SynthSummary> {
    if !o.data.is_dir() {
        return Err(tessera_data::not_a_folder(&o.data));
    }
    let mut outs = Outputs::default();
    outs.reads(&o.data, "--data");
    if let Some(t) = &o.textures {
        outs.reads(t, "--textures");
    }
    let mut dir = outs.check_dir(&o.out, "--out", o.overwrite)?;
    if o.count == 0 {
        return Err(Error::Config("--count must be at least 1".into()));
    }
    let kind = o
        .data
        .file_name()
        .and_then(|n| tessera_data::mvtec_category_kind(&n.to_string_lossy()));
    let foreground = o.foreground.unwrap_or(kind == Some(CategoryKind::Object));
    let synth = Synthesizer::new(
        SynthConfig {
            foreground,
            ..Default::default()
        },
        o.textures.as_deref(),
    )?;
    let staging = dir.path()?.to_path_buf();
    let mut s = {
        let count = Counter::start(obs, stage::SYNTH, o.count as u64);
        tessera_synth::write_dataset(&o.data, &staging, o.count, o.seed, &synth, |_| count.add(1))?
    };
    let target = dir.commit()?;
    // The summary names where the files are now, not the staging folder.
    for p in [&mut s.images_dir, &mut s.masks_dir] {
        if let Ok(rel) = p.strip_prefix(&staging) {
            *p = target.join(rel);
        }
    }
    Ok(s)
}
