//! `tessera sbm train` and `tessera synth`, and the SBM step of `fit --method sbm`.

use crate::Progress;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tessera_backbone::{Arch, Backbone, HubSpec, WeightsSource};
use tessera_core::model::Preprocess;
use tessera_core::DeviceSpec;
use tessera_data::{CategoryKind, Dataset};
use tessera_sbm::{SbmConfig, SbmData, SbmEvent, SbmReport};
use tessera_synth::{SynthConfig, Synthesizer};

/// Where the starting backbone weights come from (shared by `fit` and `sbm train`).
#[derive(Debug, Clone, Default)]
pub struct WeightsArgs {
    pub backbone: Arch,
    /// Local `.safetensors` file.
    pub weights: Option<PathBuf>,
    /// Hub repository instead of the architecture's default.
    pub hub_repo: Option<String>,
    /// Seeded random backbone (demos and tests only).
    pub random_weights: Option<u64>,
}

impl WeightsArgs {
    /// The weights source these arguments name.
    pub fn source(&self) -> Result<WeightsSource> {
        Ok(match (&self.weights, self.random_weights) {
            (Some(_), Some(_)) => bail!("give either --weights or --random-weights, not both"),
            (Some(p), None) => WeightsSource::File(p.clone()),
            (None, Some(seed)) => WeightsSource::Random { seed },
            (None, None) => WeightsSource::Hub(HubSpec::new(
                self.hub_repo
                    .as_deref()
                    .unwrap_or(self.backbone.default_hub_repo()),
            )),
        })
    }
}

/// Whether SBM applies to a category (`--sbm auto|on|off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SbmMode {
    /// Object categories only (the paper), by the MVTec AD split or the folder spec.
    #[default]
    Auto,
    On,
    Off,
}

impl SbmMode {
    /// Decide for a dataset; the string says why, for the log.
    pub fn applies(self, ds: &Dataset) -> (bool, String) {
        match (self, ds.category_kind()) {
            (SbmMode::On, _) => (true, "--sbm on".into()),
            (SbmMode::Off, _) => (false, "--sbm off".into()),
            (SbmMode::Auto, Some(CategoryKind::Object)) => {
                (true, format!("'{}' is an object category", ds.category()))
            }
            (SbmMode::Auto, Some(CategoryKind::Texture)) => (
                false,
                format!(
                    "'{}' is a texture category (the paper applies SBM to objects only)",
                    ds.category()
                ),
            ),
            (SbmMode::Auto, None) => (
                false,
                format!(
                    "'{}' is not a known MVTec AD category and its tessera-dataset.json names no \
                     \"category\" kind; pass --sbm on to use SBM",
                    ds.category()
                ),
            ),
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
    pub progress: Progress,
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

/// Run SBM on a dataset's normal training images and write the tuned backbone to `o.out`
/// (written even when the gate fails — the file's report says so, and `fit` refuses it).
pub fn sbm_train(o: &SbmOptions) -> Result<SbmSummary> {
    let start = Instant::now();
    o.preprocess.validate()?;
    let device = o.device.open()?;
    let ds = Dataset::open(&o.data)?;
    let train = ds.train()?;
    let source = o.weights.source()?;
    let backbone = Backbone::load(o.weights.backbone, &source, 3, &device)?;
    let foreground = o
        .foreground
        .unwrap_or(ds.category_kind() == Some(CategoryKind::Object));
    let synth = if o.no_synth {
        None
    } else {
        let cfg = SynthConfig {
            foreground,
            ..Default::default()
        };
        Some(Synthesizer::new(cfg, o.textures.as_deref())?)
    };
    o.progress.note(format!(
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
    let pre = o.preprocess.clone();
    let images = train
        .par_iter()
        .map(|s| Ok(tessera_data::load_image(&s.path, &pre)?.display))
        .collect::<tessera_core::Result<Vec<_>>>()?;
    let data = SbmData {
        images,
        preprocess: pre,
        synth: synth.as_ref(),
        source: source.describe(),
    };
    let ck = checkpoint_path(&o.out);
    if o.restart && ck.exists() {
        std::fs::remove_file(&ck).with_context(|| format!("removing {}", ck.display()))?;
    }
    let bar = std::sync::Mutex::new(None::<indicatif::ProgressBar>);
    let progress = |e: &SbmEvent| match e {
        SbmEvent::Resumed { epochs_done } => o.progress.note(format!(
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
            let mut b = bar.lock().unwrap_or_else(|p| p.into_inner());
            let b = b.get_or_insert_with(|| o.progress.bar((*epochs * *batches) as u64, "sbm"));
            b.set_position(((epoch - 1) * batches + batch) as u64);
            b.set_message(format!(
                "epoch {epoch}/{epochs} loss {loss:.3} acc {:.0}%",
                accuracy * 100.0
            ));
        }
        SbmEvent::Evaluating { .. } => {}
        SbmEvent::Epoch(s) => {
            if let Some(b) = bar.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                b.suspend(|| {
                    o.progress.note(format!(
                        "sbm: epoch {}: loss {:.3} (ce {:.3}, anchor {:.4}), train acc {:.1}%, \
                         held-out jigsaw acc {:.1}%, drift l1/l2/l3 {:.3}/{:.3}/{:.3}, {:.1} s",
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
                    ))
                });
            }
        }
    };
    let out = tessera_sbm::train(&o.config, &backbone, &data, Some(&ck), &progress)?;
    if let Some(b) = bar.lock().unwrap_or_else(|p| p.into_inner()).take() {
        b.finish_and_clear();
    }
    out.save(&o.out)?;
    let _ = std::fs::remove_file(&ck);
    let g = &out.report.gate;
    if g.passed {
        o.progress.note(format!(
            "sbm: the jigsaw was learned: held-out accuracy on shuffled images {:.1}% \
             (chance {:.1}%, gate {:.1}%); wrote {}",
            g.accuracy * 100.0,
            g.chance * 100.0,
            g.threshold * 100.0,
            o.out.display()
        ));
    } else {
        // Loud even with --quiet: a tuned backbone that learned nothing must not pass unseen.
        eprintln!(
            "WARNING: SBM did NOT learn the jigsaw: held-out accuracy on shuffled images {:.1}% \
             is below the gate {:.1}% (chance {:.1}%). {} was written for inspection, but \
             `tessera fit` refuses it unless --sbm-force is given.",
            g.accuracy * 100.0,
            g.threshold * 100.0,
            g.chance * 100.0,
            o.out.display()
        );
    }
    Ok(SbmSummary {
        out: o.out.clone(),
        seconds: start.elapsed().as_secs_f64(),
        report: out.report,
    })
}

/// Check an SBM-tuned weights file before fitting on it: its report must exist and its gate
/// must have passed (unless `force`).
pub fn check_sbm_weights(path: &Path, force: bool) -> Result<Option<SbmReport>> {
    let report = tessera_sbm::read_report(path)?;
    match &report {
        None if !force => bail!(
            "{}: not an SBM output (no SBM report in the file); pass it as --weights for a \
             baseline fit, or --sbm-force to use it as SBM weights anyway",
            path.display()
        ),
        Some(r) if !r.gate.passed && !force => bail!(
            "{}: SBM did not learn the jigsaw (held-out accuracy {:.1}% < gate {:.1}%); refusing \
             to use it (--sbm-force overrides)",
            path.display(),
            r.gate.accuracy * 100.0,
            r.gate.threshold * 100.0
        ),
        _ => {}
    }
    Ok(report)
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
    pub progress: Progress,
}

/// Write `count` synthetic defect images with masks in MVTec layout.
pub fn synth(o: &SynthOptions) -> Result<tessera_synth::SynthSummary> {
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
    let pb = o.progress.bar(o.count as u64, "synth");
    let s = tessera_synth::write_dataset(&o.data, &o.out, o.count, o.seed, &synth, |_| pb.inc(1))?;
    pb.finish_and_clear();
    Ok(s)
}
