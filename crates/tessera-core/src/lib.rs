//! # tessera-core
//!
//! The shared vocabulary of the Tessera workspace: every other crate speaks in these types, so
//! that data flows one way — image → preprocess → backbone features → scorer → anomaly map →
//! metrics — and no crate reaches back up that chain.
//!
//! - [`FeatureMaps`]: the multi-level backbone output (the paper's X1, X2, X3).
//! - [`AnomalyMap`]: one per-pixel score map plus its image score.
//! - [`Scorer`]: the trait PaDiM, PatchCore and CFA implement; a fitted scorer turns features into
//!   raw maps, and [`postprocess`] turns raw maps into input-resolution, blurred anomaly maps.
//! - [`DeviceSpec`]: `cpu` / `cuda:N` parsing with clear errors.
//! - [`model`]: the single-file model format (safetensors tensors + JSON metadata + a checksum),
//!   written atomically, memory-mapped and verified when read ([`st`]).
//! - [`io`]: the output policy every command follows — never write over a link, a folder, a
//!   device or one of the command's own inputs; check before work; atomic files and folders.
//! - [`Error`]: errors that name the file and the problem.
//! - [`alloc`]: the process's allocator policy (keep freed memory for reuse), which binaries
//!   set once at start.
//!
//! ```
//! use tessera_core::{postprocess, AnomalyMap};
//! // A raw 4×4 map with one hot cell, upsampled to 16×16 and blurred (σ = 4 px at 16 px input).
//! let mut raw = vec![0.0f32; 16];
//! raw[5] = 1.0;
//! let map: AnomalyMap = postprocess::finish_map(&raw, 4, 4, 16, 16, 4.0);
//! assert_eq!((map.width, map.height), (16, 16));
//! assert!(map.image_score() > 0.0);
//! ```

pub mod alloc;
pub mod device;
pub mod error;
pub mod io;
pub mod maps;
pub mod model;
pub mod postprocess;
pub mod scorer;
pub mod st;
pub mod tensor;
#[cfg(feature = "test-util")]
pub mod test_util;

pub use device::DeviceSpec;
pub use error::{Error, Result};
pub use maps::{AnomalyMap, FeatureMaps};
pub use model::ModelFile;
pub use scorer::Scorer;

/// The version of the Tessera crates, recorded in every model file.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
