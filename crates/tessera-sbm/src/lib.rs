//! # tessera-sbm
//!
//! The paper's shape-biased module (SBM, Yuan et al. §3.1): fine-tune an ImageNet ResNet on a
//! **jigsaw-permutation task** over normal and synthetic-defect images, so that its features
//! carry shape (where parts sit), not only texture — without forgetting what ImageNet taught it.
//!
//! - [`PermutationSet`]: class 0 is the identity, then P permutations of the n×n tiles chosen
//!   greedily for maximal Hamming distance (Noroozi & Favaro).
//! - [`JigsawHead`]: layer3 pooled to the n×n grid (one cell per tile), flattened, linear → P+1.
//!   A globally pooled head is nearly blind to where tiles sit and measurably fails to learn.
//! - [`train`]: cross-entropy plus an anchoring term that keeps the trained layers' features
//!   close to the frozen pretrained copy ([`Anchor::Features`]) or the weights close to their
//!   start ([`Anchor::L2Sp`]); SGD-Nesterov or AdamW with separate backbone/head learning rates;
//!   the stem and batch-norm statistics stay frozen; checkpoints every epoch and resumes.
//! - The **gate**: held-out accuracy on shuffled images (identity excluded) against chance,
//!   with per-layer feature drift. A run that did not learn says so ([`Gate::passed`]).
//! - [`SbmOutcome::save`] writes a torchvision-named backbone that loads like any weights file.
//! - [`train_pfam_segment`]: a second objective for PFAM alone — on a frozen backbone, learn to
//!   segment synthetic defects (any category, textures included; measured worse than the
//!   jigsaw on bottle and ksdd, see `docs/pfam.md`).
//!
//! ```no_run
//! use tessera_backbone::{Arch, Backbone, WeightsSource};
//! use tessera_core::model::Preprocess;
//! use tessera_sbm::{train, SbmConfig, SbmData};
//! # fn main() -> tessera_core::Result<()> {
//! let dev = candle_core::Device::Cpu;
//! let src = WeightsSource::File("resnet18.safetensors".into());
//! let backbone = Backbone::load(Arch::ResNet18, &src, 3, &dev)?;
//! let pre = Preprocess::paper();
//! let images = ["a.png", "b.png"] // … the category's train/good images
//!     .iter()
//!     .map(|p| Ok(tessera_data::load_image(p.as_ref(), &pre)?.display))
//!     .collect::<tessera_core::Result<Vec<_>>>()?;
//! let data = SbmData { images, preprocess: pre, synth: None, source: src.describe() };
//! let out = train(&SbmConfig::default(), &backbone, &data, None, &|_| {})?;
//! println!("held-out jigsaw accuracy {:.3} (chance {:.3})", out.report.gate.accuracy, out.report.gate.chance);
//! if out.report.gate.passed {
//!     out.save("bottle.sbm.safetensors".as_ref())?;
//! }
//! # Ok(()) }
//! ```

mod checkpoint;
mod config;
mod head;
mod jigsaw;
mod nets;
mod optim;
mod perms;
mod report;
mod segment;
mod train;

pub use config::{Anchor, OptimizerKind, SbmConfig};
pub use head::JigsawHead;
pub use jigsaw::{adaptive_pool_matrix, permute_tiles};
pub use perms::PermutationSet;
pub use report::{read_report, EpochStats, Gate, SbmEvent, SbmOutcome, SbmReport, REPORT_KEY};
pub use segment::{
    pool_mask, read_segment_report, train_pfam_segment, SegmentConfig, SegmentEpoch, SegmentEvent,
    SegmentOutcome, SegmentReport, SEGMENT_REPORT_KEY,
};
pub use train::{train, SbmData};
