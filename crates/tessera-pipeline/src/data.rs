//! Small dataset commands: the built-in demo category, and what Tessera makes of a dataset
//! folder.

use serde::Serialize;
use std::path::{Path, PathBuf};
use tessera_core::io::Outputs;
use tessera_core::Result;
use tessera_data::{CategoryKind, Dataset, SyntheticSpec};

/// Write the deterministic synthetic demo category (MVTec layout) into `out` (new or empty, or
/// replaced as a whole with `overwrite`).
pub fn demo_category(out: &Path, spec: &SyntheticSpec, overwrite: bool) -> Result<PathBuf> {
    let mut dir = Outputs::default().check_dir(out, "--out", overwrite)?;
    tessera_data::generate_category(dir.path()?, spec)?;
    dir.commit()
}

/// What Tessera sees in a dataset folder.
#[derive(Debug, Clone, Serialize)]
pub struct DatasetInfo {
    pub root: PathBuf,
    pub category: String,
    /// `object` or `texture`: from the folder spec, the MVTec AD name list, or inferred from
    /// the training images (`None` when they cannot be read).
    pub kind: Option<CategoryKind>,
    /// Where the kind comes from, with the evidence when inferred.
    pub kind_reason: String,
    /// MVTec layout or a `tessera-dataset.json` folder.
    pub layout: &'static str,
    pub train_images: usize,
    pub test_images: usize,
    pub test_anomalous: usize,
}

/// Open a dataset and count what it holds.
pub fn dataset_info(root: &Path) -> Result<DatasetInfo> {
    let ds = Dataset::open(root)?;
    let train = ds.train()?;
    let test = ds.test()?;
    let (kind, kind_reason) = match ds.resolve_kind() {
        Ok((k, why)) => (Some(k), why),
        Err(e) => (None, format!("undecided: {e}")),
    };
    Ok(DatasetInfo {
        root: root.to_path_buf(),
        category: ds.category(),
        kind,
        kind_reason,
        layout: match ds.layout {
            tessera_data::Layout::MvTec => "mvtec",
            tessera_data::Layout::Folder(_) => "folder",
        },
        train_images: train.len(),
        test_images: test.len(),
        test_anomalous: test.iter().filter(|s| s.is_anomalous()).count(),
    })
}
