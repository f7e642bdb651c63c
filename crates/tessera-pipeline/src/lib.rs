//! # tessera-pipeline
//!
//! Tessera's application layer as a library — what the `tessera` binary, `cargo xtask` and a
//! server call, so that none of them holds logic of its own:
//!
//! - [`Detector`]: backbone + PFAM + fitted scorer + metadata; [`Detector::load`] reads a
//!   model file (memory-mapped, checksum-verified), [`Detector::score`] is the one path from a
//!   preprocessed batch to anomaly maps.
//! - [`fit()`] and its stages: [`prepare_backbone`] → optional SBM ([`sbm_stage`]) → optional
//!   PFAM ([`load_pfam`]) → [`fit_scorer`] → the method gate ([`MethodGate`]: `--method
//!   sbm|ours` is kept only when it beats the baseline on held-out normals + synthetic
//!   defects) → [`calibrate`] → [`Detector::to_model_file`].
//! - [`test()`] (report + heatmaps) and [`predict()`] (heatmaps + `scores.csv`, one
//!   [`Prediction`] per image), [`sbm_train`] and [`synth`].
//! - [`ScorerConfig`]: the scorers this build knows, as one serde-tagged configuration; each
//!   scorer restores itself from its stored tensors ([`tessera_core::scorer::Restore`]).
//! - [`ModelMeta`]: the typed metadata of a model file.
//! - [`Observer`]: progress and notes, so the library never prints (the binary draws
//!   indicatif bars from it).
//!
//! Every command checks its outputs before it starts ([`tessera_core::io::Outputs`]): no
//! output replaces a link, a folder, a device or one of the command's inputs.
//!
//! ```no_run
//! use tessera_pipeline::{batches, Detector};
//! let device = candle_core::Device::Cpu;
//! let det = Detector::load("bottle.padim.safetensors".as_ref(), &device)?;
//! let images = tessera_data::Dataset::open("data/mvtec_ad/bottle".as_ref())?.test()?;
//! for batch in batches(&images, &det.meta.preprocess, 8, &device) {
//!     let (maps, _) = det.score(&batch?.tensor)?;
//!     for m in maps {
//!         println!("{:.3} {}", m.image_score(), m.image_score() >= det.meta.threshold);
//!     }
//! }
//! # Ok::<(), tessera_core::Error>(())
//! ```

mod batches;
mod calibrate;
mod data;
mod detector;
mod evaluate;
mod fit;
mod gallery;
mod gate;
pub mod memory;
mod meta;
mod names;
mod observer;
mod predict;
mod sbm;
mod scorer;
pub mod tiles;
mod weights;

pub use batches::batches;
pub use calibrate::{
    calibrate, split_holdout, Calibration, CalibrationMode, CalibrationOptions, CalibrationRun,
    ScoreSummary, SyntheticCalibration,
};
pub use data::{dataset_info, demo_category, DatasetInfo};
pub use detector::{extract, section, Detector, StageTimes, Verdict, TILE_CHUNK};
pub use evaluate::{test, TestOptions};
pub use fit::{
    fit, fit_scorer, load_pfam, sbm_output_path, sbm_stage, trainable_pfam, FitOptions, FitSummary,
    GateMode, PfamTraining, Prepared, SbmStage, TrainablePfam, IN_SAMPLE_IMAGES,
};
pub use gallery::gallery;
pub use gate::{gate_score, paired_margin, Evidence, GateSample, GateScore, MethodGate};
pub use meta::{BackboneMeta, FitMeta, Method, ModelMeta, SbmMeta};
pub use observer::{stage, Observer, Silent};
pub use predict::{expand_inputs, predict, Job, PredictOptions, PredictSummary, Prediction};
pub use sbm::{
    check_sbm_weights, checkpoint_path, sbm_train, synth, SbmMode, SbmOptions, SbmSummary,
    SynthOptions,
};
pub use scorer::{ScorerConfig, ScorerKind};
pub use tessera_backbone::{bf16_supported, Precision};
pub use weights::{prepare_backbone, WeightsArgs};
