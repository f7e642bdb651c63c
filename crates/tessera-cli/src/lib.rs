//! # tessera-cli
//!
//! The `tessera` command-line tool and the thin pipeline behind it: a [`Detector`] is a backbone
//! plus a fitted scorer plus the model metadata, and it is the *only* path from an image to an
//! anomaly map — `fit` builds one and saves it, `test` and `predict` load one from the model
//! file and score through the same [`Detector::score`], so a saved model never scores
//! differently from the one just fitted.
//!
//! ```no_run
//! use tessera_cli::{fit, FitOptions};
//! let opts = FitOptions {
//!     data: "data/mvtec_ad/bottle".into(),
//!     weights: Some("resnet18.safetensors".into()),
//!     out: "bottle.tessera".into(),
//!     ..FitOptions::default()
//! };
//! let summary = fit(&opts)?;
//! println!("fitted in {:.1} s", summary.seconds);
//! # Ok::<(), anyhow::Error>(())
//! ```

mod commands;
mod data;
mod detector;
mod progress;
mod sbm;

pub use commands::sbm_output_path;
pub use commands::{
    fit, predict, test, FitOptions, FitSummary, PredictOptions, PredictSummary, ScorerKind,
    TestOptions,
};
pub use data::{data_verify, resolve_manifest, verify_table, DataVerifyOptions};
pub use detector::Detector;
pub use progress::Progress;
pub use sbm::{
    check_sbm_weights, checkpoint_path, sbm_train, synth, SbmMode, SbmOptions, SbmSummary,
    SynthOptions, WeightsArgs,
};
