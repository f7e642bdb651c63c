//! What an SBM run measured and hands on: per-epoch numbers, the gate, the report stored in the
//! tuned weights file, progress events, and the outcome.

use crate::{JigsawHead, PermutationSet, SbmConfig};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tessera_backbone::Backbone;
use tessera_core::{Error, Result};
use tessera_pfam::Pfam;

/// Metadata key of the SBM report in a tuned backbone file.
pub const REPORT_KEY: &str = "tessera_sbm";

/// One epoch's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    pub epoch: usize,
    /// Mean total loss, cross-entropy and anchoring term over the epoch.
    pub loss: f64,
    pub cross_entropy: f64,
    pub anchor: f64,
    /// Training accuracy (all classes, identity included).
    pub train_accuracy: f64,
    /// Held-out accuracy on shuffled images only (identity excluded).
    pub heldout_accuracy: f64,
    /// Relative feature change per layer on held-out normal images, `‖f − f⁰‖ / ‖f⁰‖`.
    pub drift: Vec<f64>,
    pub seconds: f64,
}

/// The gate: did the network learn the jigsaw on images it never saw?
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    /// Accuracy on held-out shuffled images (identity excluded).
    pub accuracy: f64,
    /// Chance level, 1 / classes.
    pub chance: f64,
    /// Accuracy needed to pass.
    pub threshold: f64,
    pub passed: bool,
    /// Held-out images and shuffled inputs evaluated.
    pub images: usize,
    pub inputs: usize,
}

impl Gate {
    /// Judge a run by its held-out accuracy on `inputs` shuffled versions of `images`
    /// held-out images: it passes at `gate_factor × chance`, and never below 5 σ above chance.
    pub fn judge(
        config: &SbmConfig,
        accuracy: f64,
        classes: usize,
        images: usize,
        inputs: usize,
    ) -> Self {
        let chance = 1.0 / classes as f64;
        let n_eval = inputs.max(1) as f64;
        let threshold = (config.gate_factor * chance)
            .max(chance + 5.0 * (chance * (1.0 - chance) / n_eval).sqrt())
            .min(1.0);
        Gate {
            accuracy,
            chance,
            threshold,
            passed: accuracy >= threshold,
            images,
            inputs,
        }
    }
}

/// Everything a run measured; stored in the tuned backbone file under [`REPORT_KEY`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SbmReport {
    pub config: SbmConfig,
    pub arch: String,
    /// Where the starting weights came from.
    pub source: String,
    pub train_images: usize,
    pub heldout_images: usize,
    /// Minimum Hamming distance within the permutation set.
    pub min_hamming: usize,
    pub history: Vec<EpochStats>,
    pub gate: Gate,
    /// Final relative feature drift per layer (layer1..3) on held-out normal images.
    pub drift: Vec<f64>,
    pub seconds_per_epoch: f64,
    /// Whether synthetic defects were used (a synthesizer was given).
    pub synthesis: bool,
    /// Training stopped before the last epoch: the held-out accuracy stayed at chance
    /// ([`SbmConfig::early_stop`]).
    #[serde(default)]
    pub stopped_early: bool,
}

/// Progress events for bars and logs.
#[derive(Debug, Clone)]
pub enum SbmEvent {
    /// Resumed from a checkpoint after `epochs_done` epochs.
    Resumed { epochs_done: usize },
    /// One optimisation step done; running means of the epoch so far.
    Step {
        epoch: usize,
        epochs: usize,
        batch: usize,
        batches: usize,
        loss: f64,
        accuracy: f64,
    },
    /// Held-out evaluation running.
    Evaluating { epoch: usize },
    /// One epoch finished.
    Epoch(EpochStats),
}

/// A finished SBM run.
#[derive(Debug)]
pub struct SbmOutcome {
    /// The fine-tuned backbone (frozen again).
    pub backbone: Backbone,
    /// The trained PFAM (detached, for inference), when the config asked for it.
    pub pfam: Option<Pfam>,
    pub head: JigsawHead,
    pub perms: PermutationSet,
    pub report: SbmReport,
}

impl SbmOutcome {
    /// Write the tuned backbone (torchvision names, batch norm folded into identity layers, so
    /// `tessera fit --weights FILE` loads it like any checkpoint) with the jigsaw head, the
    /// permutation set and the report in its metadata, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = self.backbone.export_checkpoint()?;
        if let Some(p) = &self.pfam {
            tensors.extend(p.tensors());
        }
        let (w, b) = self.head.tensors();
        tensors.push(("sbm.head.weight".into(), w));
        tensors.push(("sbm.head.bias".into(), b));
        tensors.push(("sbm.permutations".into(), perms_tensor(&self.perms)?));
        save_with_report(path, &tensors, REPORT_KEY, &self.report)
    }
}

/// Write `tensors` with `report` as JSON under the metadata `key`, atomically.
pub(crate) fn save_with_report<T: Serialize>(
    path: &Path,
    tensors: &[(String, Tensor)],
    key: &str,
    report: &T,
) -> Result<()> {
    let json = serde_json::to_string(report)
        .map_err(|e| Error::bad_model(path, format!("cannot serialise the report: {e}")))?;
    tessera_core::io::save_safetensors(path, tensors, HashMap::from([(key.into(), json)]))
}

/// The report stored under the metadata `key` of a file, if it has one (`what` names it in
/// the error).
pub(crate) fn read_stored_report<T: serde::de::DeserializeOwned>(
    path: &Path,
    key: &str,
    what: &str,
) -> Result<Option<T>> {
    let meta = tessera_core::io::safetensors_metadata(path)?;
    match meta.get(key) {
        None => Ok(None),
        Some(j) => serde_json::from_str(j)
            .map(Some)
            .map_err(|e| Error::bad_model(path, format!("unreadable {what} report: {e}"))),
    }
}

/// The SBM report stored in a weights file, if it is an SBM output.
pub fn read_report(path: &Path) -> Result<Option<SbmReport>> {
    read_stored_report(path, REPORT_KEY, "SBM")
}

pub(crate) fn perms_tensor(p: &PermutationSet) -> Result<Tensor> {
    let flat: Vec<u8> = p.perms().iter().flatten().copied().collect();
    Ok(Tensor::from_vec(
        flat,
        (p.classes(), p.grid() * p.grid()),
        &Device::Cpu,
    )?)
}
