//! # tessera-data
//!
//! Datasets and preprocessing for Tessera.
//!
//! - **Layouts** ([`Dataset::open`]): the MVTec AD layout (`train/good`, `test/<type>`,
//!   `ground_truth/<type>/<name>_mask.png`; MTL AD uses the same), and a plain folder layout
//!   described by a small `tessera-dataset.json` ([`FolderSpec`]).
//! - **Preprocessing** ([`load_batch`]): PNG/JPEG/BMP/TIFF of any size, gray or RGB → resize
//!   (bilinear, antialiased) → center crop → ImageNet normalisation, decoded in parallel.
//!   Masks: nearest resize, same crop, > 0.5 is defect.
//! - **Verification** ([`verify::verify`]): check a dataset on disk against a manifest of its
//!   categories and counts (built in: MVTec AD, MTL AD; `datasets/*.json`): missing categories
//!   and folders, count mismatches, missing or orphan masks, mask/image size mismatches (from the
//!   headers), unreadable and unknown files.
//!
//! ```no_run
//! use tessera_core::model::Preprocess;
//! use tessera_data::{load_batch, Dataset};
//! let ds = Dataset::open("data/mvtec_ad/bottle".as_ref())?;
//! let train = ds.train()?;
//! let batch = load_batch(&train[..8], &Preprocess::paper(), &candle_core::Device::Cpu)?;
//! assert_eq!(batch.tensor.dims(), &[8, 3, 224, 224]);
//! # Ok::<(), tessera_core::Error>(())
//! ```

pub mod kind;
mod layout;
mod preprocess;
mod resize;
pub mod synthetic;
pub mod verify;

pub use kind::{infer_kind, KindEvidence};
pub use layout::{
    is_image_path, list_images, mvtec_category_kind, not_a_folder, read_folder, walk_images,
    CategoryKind, Dataset, FolderEntries, FolderSpec, Layout, Sample, FOLDER_SPEC_FILE, IMAGE_EXTS,
};
pub use preprocess::{
    decode_bytes, load_batch, load_image, load_mask, load_mask_checked, normalize,
    preprocess_image, Batch, LoadedImage, LoadedMask,
};
pub use synthetic::{generate_category, SyntheticSpec};
