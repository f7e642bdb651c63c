//! What a check found: problems naming their files, per-split counts, per-category status.

use crate::layout::CategoryKind;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// What is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IssueKind {
    /// A category of the manifest has no folder.
    MissingCategory,
    /// A folder the layout needs does not exist (or is not a folder).
    MissingFolder,
    /// A split holds a different number of images than the manifest says.
    CountMismatch,
    /// A defective test image has no ground-truth mask.
    MissingMask,
    /// A mask with no test image of that name.
    OrphanMask,
    /// A mask whose width × height differs from its image's.
    MaskSizeMismatch,
    /// An image or mask that cannot be read or decoded.
    Unreadable,
    /// A mask whose values are not 0/255 (e.g. a 0/1 mask, or anti-aliased edges).
    MaskValues,
    /// A mask of a defective image that marks nothing.
    EmptyMask,
    /// A file that is not an image where images are expected.
    UnknownFile,
    /// A folder the layout does not have.
    UnexpectedFolder,
    /// A `test/<type>` folder the manifest does not list.
    UnexpectedDefectType,
    /// A folder in the dataset root that is not a category of the manifest.
    UnexpectedCategory,
    /// The checked category folder is not in the manifest.
    NotInManifest,
}

impl IssueKind {
    /// A short human label.
    pub fn label(self) -> &'static str {
        match self {
            Self::MissingCategory => "missing category",
            Self::MissingFolder => "missing folder",
            Self::CountMismatch => "count mismatch",
            Self::MissingMask => "missing mask",
            Self::OrphanMask => "mask without image",
            Self::MaskSizeMismatch => "mask size mismatch",
            Self::Unreadable => "unreadable",
            Self::MaskValues => "mask values",
            Self::EmptyMask => "empty mask",
            Self::UnknownFile => "unknown file",
            Self::UnexpectedFolder => "unexpected folder",
            Self::UnexpectedDefectType => "unexpected defect type",
            Self::UnexpectedCategory => "unexpected category",
            Self::NotInManifest => "not in manifest",
        }
    }
}

/// One problem, naming the file or folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issue {
    /// What kind of problem.
    pub kind: IssueKind,
    /// The file or folder concerned.
    pub path: PathBuf,
    /// What is wrong, in words.
    pub message: String,
}

impl Issue {
    pub(crate) fn new(
        kind: IssueKind,
        path: impl Into<PathBuf>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Expected vs found images of one split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitReport {
    /// `"train/good"`, `"test/good"` or `"test/<type>"`.
    pub split: String,
    /// Defect type (`None` for the normal splits).
    pub defect_type: Option<String>,
    /// The manifest's count (`None`: unknown).
    pub expected: Option<u64>,
    /// Images found (`None`: the folder is missing).
    pub found: Option<u64>,
    /// Defective splits: images that have a mask.
    pub masks: Option<u64>,
}

/// The state of one category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CategoryStatus {
    /// Present and every check passed.
    Ok,
    /// Present with problems.
    Failed,
    /// No folder.
    Missing,
}

/// The check of one category.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CategoryReport {
    /// The manifest's name of the category (or the folder's name when not in the manifest).
    pub name: String,
    /// Texture or object, from the manifest.
    pub kind: Option<CategoryKind>,
    /// The folder checked (`None` when missing).
    pub path: Option<PathBuf>,
    /// Ok / failed / missing.
    pub status: CategoryStatus,
    /// Whether the manifest gives counts for it (else only the layout was checked).
    pub counts_checked: bool,
    /// The manifest's note on it.
    pub note: Option<String>,
    /// Per split: expected vs found.
    pub splits: Vec<SplitReport>,
    /// Every problem found.
    pub issues: Vec<Issue>,
}

impl CategoryReport {
    /// Sum of found images over the defective splits.
    pub fn defective_found(&self) -> u64 {
        self.defect_splits().filter_map(|s| s.found).sum()
    }
    /// Sum of the expected defective counts, when all are known.
    pub fn defective_expected(&self) -> Option<u64> {
        self.defect_splits().map(|s| s.expected).sum()
    }
    /// Defective images with a mask.
    pub fn masks_found(&self) -> u64 {
        self.defect_splits().filter_map(|s| s.masks).sum()
    }
    /// The split named `split`.
    pub fn split(&self, split: &str) -> Option<&SplitReport> {
        self.splits.iter().find(|s| s.split == split)
    }
    fn defect_splits(&self) -> impl Iterator<Item = &SplitReport> {
        self.splits.iter().filter(|s| s.defect_type.is_some())
    }
}

/// The result of [`verify`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// The folder checked.
    pub root: PathBuf,
    /// The manifest's dataset name.
    pub manifest: String,
    /// Whether the root is a single category folder (else a dataset root).
    pub single_category: bool,
    /// The categories checked, in name order.
    pub categories: Vec<CategoryReport>,
    /// Problems outside any category (unexpected category folders).
    pub issues: Vec<Issue>,
    /// Whether everything passed.
    pub ok: bool,
}

impl VerifyReport {
    /// Every problem, root-level first.
    pub fn all_issues(&self) -> impl Iterator<Item = &Issue> {
        self.issues
            .iter()
            .chain(self.categories.iter().flat_map(|c| &c.issues))
    }
    /// Number of categories with the given status.
    pub fn count(&self, status: CategoryStatus) -> usize {
        self.categories
            .iter()
            .filter(|c| c.status == status)
            .count()
    }
}
