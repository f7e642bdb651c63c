//! Check a dataset on disk against a manifest of what it should hold.
//!
//! A [`Manifest`] (JSON, see `datasets/mvtec_ad.json`) names the categories of a dataset in the
//! MVTec layout and, where known, how many images each split holds: `train/good`, `test/good`
//! and `test/<defect type>`, with one ground-truth mask per defective image
//! (`ground_truth/<type>/<name>_mask.png`). [`verify`] walks a dataset root (or one category
//! folder) and reports, per category: present or missing, expected vs found counts per split,
//! defective images without a mask, masks without an image, masks whose size differs from
//! their image, unreadable image headers, unknown files and unexpected folders, and unexpected
//! categories. Sizes come from the image headers only (a PNG's first 24 bytes), so a full
//! MVTec AD check takes a moment, not minutes.
//!
//! ```no_run
//! use tessera_data::verify::{verify, Manifest};
//! let report = verify("data/mvtec_ad".as_ref(), &Manifest::mvtec_ad(), None)?;
//! for c in &report.categories {
//!     println!("{}: {:?}, {} problem(s)", c.name, c.status, c.issues.len());
//! }
//! assert!(report.ok);
//! # Ok::<(), tessera_core::Error>(())
//! ```

use crate::layout::CategoryKind;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use tessera_core::{Error, Result};

const IMAGE_EXTS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

/// The built-in MVTec AD manifest (`datasets/mvtec_ad.json`).
pub const MVTEC_AD_MANIFEST: &str = include_str!("../manifests/mvtec_ad.json");
/// The built-in MTL AD manifest (`datasets/mtl_ad.json`; counts unknown).
pub const MTL_AD_MANIFEST: &str = include_str!("../manifests/mtl_ad.json");

/// What a dataset should hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Dataset name, e.g. `"MVTec AD"`.
    pub name: String,
    /// What the dataset is.
    #[serde(default)]
    pub description: Option<String>,
    /// Where to obtain it.
    #[serde(default)]
    pub source: Option<String>,
    /// Its licence.
    #[serde(default)]
    pub license: Option<String>,
    /// How to cite it.
    #[serde(default)]
    pub citation: Option<String>,
    /// The folder layout; only `"mvtec"` is known.
    #[serde(default = "mvtec_layout")]
    pub layout: String,
    /// Where the counts come from.
    #[serde(default)]
    pub counts_source: Option<String>,
    /// The categories by folder name (matched case-insensitively).
    pub categories: BTreeMap<String, CategorySpec>,
}

fn mvtec_layout() -> String {
    "mvtec".into()
}

/// What one category should hold; `None` counts are unknown and not checked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategorySpec {
    /// Texture or object.
    #[serde(default)]
    pub kind: Option<CategoryKind>,
    /// Images in `train/good`.
    #[serde(default)]
    pub train_good: Option<u64>,
    /// Images in `test/good`.
    #[serde(default)]
    pub test_good: Option<u64>,
    /// Defect types (`test/<type>`) and their image counts; `None` when the types are unknown
    /// (then any type folder is accepted).
    #[serde(default)]
    pub defects: Option<BTreeMap<String, Option<u64>>>,
    /// A remark, e.g. why counts are unknown.
    #[serde(default)]
    pub note: Option<String>,
}

impl CategorySpec {
    /// Whether any count is known.
    pub fn has_counts(&self) -> bool {
        self.train_good.is_some()
            || self.test_good.is_some()
            || self
                .defects
                .as_ref()
                .is_some_and(|d| d.values().any(Option::is_some))
    }
}

impl Manifest {
    /// Parse a manifest; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &Path) -> Result<Self> {
        let m: Manifest = serde_json::from_str(text)
            .map_err(|e| Error::bad_input(origin, format!("invalid dataset manifest: {e}")))?;
        if m.layout != "mvtec" {
            return Err(Error::bad_input(
                origin,
                format!(
                    "unknown layout {:?} (only \"mvtec\" is supported)",
                    m.layout
                ),
            ));
        }
        if m.categories.is_empty() {
            return Err(Error::bad_input(origin, "the manifest lists no category"));
        }
        let mut seen = BTreeSet::new();
        for name in m.categories.keys() {
            if !seen.insert(name.to_lowercase()) {
                return Err(Error::bad_input(
                    origin,
                    format!("category {name:?} is listed twice (names are case-insensitive)"),
                ));
            }
            if let Some(d) = &m.categories[name].defects {
                if d.contains_key("good") {
                    return Err(Error::bad_input(
                        origin,
                        format!("category {name:?}: \"good\" is not a defect type (use test_good)"),
                    ));
                }
            }
        }
        Ok(m)
    }

    /// Read a manifest file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// The built-in MVTec AD manifest.
    pub fn mvtec_ad() -> Self {
        Self::from_json(MVTEC_AD_MANIFEST, Path::new("<built-in mvtec_ad.json>"))
            .expect("the built-in MVTec AD manifest parses")
    }

    /// The built-in MTL AD manifest (counts unknown: layout checks only).
    pub fn mtl_ad() -> Self {
        Self::from_json(MTL_AD_MANIFEST, Path::new("<built-in mtl_ad.json>"))
            .expect("the built-in MTL AD manifest parses")
    }

    /// A built-in manifest by name (`mvtec_ad`, `mtl_ad`).
    pub fn builtin(name: &str) -> Option<Self> {
        match name {
            "mvtec_ad" => Some(Self::mvtec_ad()),
            "mtl_ad" => Some(Self::mtl_ad()),
            _ => None,
        }
    }

    /// The manifest's entry for a category name, case-insensitively.
    pub fn category(&self, name: &str) -> Option<(&str, &CategorySpec)> {
        self.categories
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(k, v)| (k.as_str(), v))
    }
}

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
    /// An image or mask whose header cannot be read.
    Unreadable,
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
    fn new(kind: IssueKind, path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
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

/// Check `root` against `manifest`.
///
/// `root` is either a dataset root holding category folders or a single category folder (it
/// has `train/`, `test/` or `ground_truth/`). A dataset root is checked for every category of
/// the manifest, or only for `only` when given (then other folders are not looked at);
/// folders that are not categories of the manifest are reported when `only` is `None`. A
/// category folder is checked as the manifest category of its name, or of the one name in
/// `only`.
///
/// Errors (rather than a failed report) only when `root` is not a folder or `only` names a
/// category the manifest does not have.
pub fn verify(root: &Path, manifest: &Manifest, only: Option<&[String]>) -> Result<VerifyReport> {
    if !root.is_dir() {
        return Err(Error::bad_input(root, "dataset folder does not exist"));
    }
    if let Some(names) = only {
        if names.is_empty() {
            return Err(Error::Config("--categories names no category".into()));
        }
        for n in names {
            if manifest.category(n).is_none() {
                return Err(Error::Config(format!(
                    "category {n:?} is not in the {} manifest (it has: {})",
                    manifest.name,
                    manifest
                        .categories
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
    }
    let single = ["train", "test", "ground_truth"]
        .iter()
        .any(|d| root.join(d).is_dir());
    let mut issues = Vec::new();
    let mut categories = Vec::new();
    if single {
        let folder = root
            .canonicalize()
            .unwrap_or_else(|_| root.to_path_buf())
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = match only {
            Some([n]) => n.clone(),
            Some(_) => {
                return Err(Error::bad_input(
                    root,
                    "this is a single category folder: --categories can name only one category",
                ))
            }
            None => folder.clone(),
        };
        categories.push(match manifest.category(&name) {
            Some((n, spec)) => check_category(n, spec, root),
            None => {
                let mut c = check_category(&name, &CategorySpec::default(), root);
                c.issues.insert(
                    0,
                    Issue::new(
                        IssueKind::NotInManifest,
                        root,
                        format!(
                            "{name:?} is not a category of the {} manifest: only the layout was \
                             checked (name the category with --categories)",
                            manifest.name
                        ),
                    ),
                );
                c.status = CategoryStatus::Failed;
                c
            }
        });
    } else {
        let dirs = subdirs(root, &mut issues);
        let wanted: Vec<(&str, &CategorySpec)> = match only {
            Some(names) => {
                let mut v: Vec<_> = names.iter().filter_map(|n| manifest.category(n)).collect();
                v.sort_by_key(|(n, _)| *n);
                v.dedup_by_key(|(n, _)| *n);
                v
            }
            None => manifest
                .categories
                .iter()
                .map(|(k, v)| (k.as_str(), v))
                .collect(),
        };
        categories = wanted
            .par_iter()
            .map(
                |&(name, spec)| match dirs.iter().find(|d| d.eq_ignore_ascii_case(name)) {
                    Some(d) => check_category(name, spec, &root.join(d)),
                    None => CategoryReport {
                        name: name.into(),
                        kind: spec.kind,
                        path: None,
                        status: CategoryStatus::Missing,
                        counts_checked: spec.has_counts(),
                        note: spec.note.clone(),
                        splits: Vec::new(),
                        issues: vec![Issue::new(
                            IssueKind::MissingCategory,
                            root.join(name),
                            format!("category folder {name} does not exist"),
                        )],
                    },
                },
            )
            .collect();
        if only.is_none() {
            for d in &dirs {
                if manifest.category(d).is_none() {
                    issues.push(Issue::new(
                        IssueKind::UnexpectedCategory,
                        root.join(d),
                        format!("{d} is not a category of the {} manifest", manifest.name),
                    ));
                }
            }
        }
    }
    let ok = issues.is_empty() && categories.iter().all(|c| c.status == CategoryStatus::Ok);
    Ok(VerifyReport {
        root: root.to_path_buf(),
        manifest: manifest.name.clone(),
        single_category: single,
        categories,
        issues,
        ok,
    })
}

/// The files of one folder, sorted: images (by stem) and everything else.
struct Listing {
    images: Vec<PathBuf>,
    unknown: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .map(|n| n.to_string_lossy().starts_with('.'))
        .unwrap_or(true)
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .map(|x| IMAGE_EXTS.contains(&x.to_string_lossy().to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// List a folder; `None` (and an issue) when it is missing or unreadable. `expected`: the
/// images it should hold, for the message.
fn list_expecting(dir: &Path, expected: Option<u64>, issues: &mut Vec<Issue>) -> Option<Listing> {
    if !dir.is_dir() {
        issues.push(Issue::new(
            IssueKind::MissingFolder,
            dir,
            match expected {
                Some(e) => format!("folder does not exist (expected {e} images)"),
                None => "folder does not exist".into(),
            },
        ));
        return None;
    }
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            issues.push(Issue::new(
                IssueKind::Unreadable,
                dir,
                format!("cannot list folder: {e}"),
            ));
            return None;
        }
    };
    let mut l = Listing {
        images: Vec::new(),
        unknown: Vec::new(),
        dirs: Vec::new(),
    };
    for e in rd {
        let p = match e {
            Ok(e) => e.path(),
            Err(e) => {
                issues.push(Issue::new(
                    IssueKind::Unreadable,
                    dir,
                    format!("cannot list folder: {e}"),
                ));
                continue;
            }
        };
        if is_hidden(&p) {
            continue;
        }
        if p.is_dir() {
            l.dirs.push(p);
        } else if is_image(&p) {
            l.images.push(p);
        } else {
            l.unknown.push(p);
        }
    }
    l.images.sort();
    l.unknown.sort();
    l.dirs.sort();
    Some(l)
}

fn list(dir: &Path, issues: &mut Vec<Issue>) -> Option<Listing> {
    list_expecting(dir, None, issues)
}

/// Names of the non-hidden sub-folders of `dir`, sorted.
fn subdirs(dir: &Path, issues: &mut Vec<Issue>) -> Vec<String> {
    let mut scratch = Vec::new();
    let names = list(dir, &mut scratch)
        .map(|l| {
            l.dirs
                .iter()
                .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    issues.extend(scratch);
    names
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Width and height from an image's header: the PNG IHDR directly (24 bytes), other formats
/// through `image`'s header-only reader.
pub fn image_size(path: &Path) -> std::result::Result<(u32, u32), String> {
    let mut head = [0u8; 24];
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let n = read_up_to(&mut f, &mut head).map_err(|e| e.to_string())?;
    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";
    if n >= 8 && &head[..8] == PNG {
        if n < 24 || &head[12..16] != b"IHDR" {
            return Err("truncated or malformed PNG header".into());
        }
        let w = u32::from_be_bytes(head[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(head[20..24].try_into().unwrap());
        if w == 0 || h == 0 {
            return Err(format!("PNG header gives an empty image ({w}×{h})"));
        }
        return Ok((w, h));
    }
    image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| e.to_string())?
        .into_dimensions()
        .map_err(|e| e.to_string())
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Check the headers of `images` in parallel; their sizes (`None`: unreadable, with an issue).
fn sizes(images: &[PathBuf], issues: &mut Vec<Issue>) -> Vec<Option<(u32, u32)>> {
    let r: Vec<std::result::Result<(u32, u32), String>> =
        images.par_iter().map(|p| image_size(p)).collect();
    r.into_iter()
        .zip(images)
        .map(|(r, p)| match r {
            Ok(s) => Some(s),
            Err(e) => {
                issues.push(Issue::new(
                    IssueKind::Unreadable,
                    p,
                    format!("cannot read the image header: {e}"),
                ));
                None
            }
        })
        .collect()
}

fn unknown_and_dirs(l: &Listing, issues: &mut Vec<Issue>, what: &str) {
    for f in &l.unknown {
        issues.push(Issue::new(
            IssueKind::UnknownFile,
            f,
            format!("not an image (png/jpg/jpeg/bmp/tif/tiff) in a folder of {what}"),
        ));
    }
    for d in &l.dirs {
        issues.push(Issue::new(
            IssueKind::UnexpectedFolder,
            d,
            format!("unexpected folder inside a folder of {what}"),
        ));
    }
}

fn count_issue(issues: &mut Vec<Issue>, dir: &Path, expected: Option<u64>, found: u64) {
    if let Some(e) = expected {
        if e != found {
            issues.push(Issue::new(
                IssueKind::CountMismatch,
                dir,
                format!("expected {e} images, found {found}"),
            ));
        }
    }
}

/// A normal split (`train/good`, `test/good`).
fn check_normal(
    dir: &Path,
    split: &str,
    expected: Option<u64>,
    issues: &mut Vec<Issue>,
) -> SplitReport {
    let found = list_expecting(dir, expected, issues).map(|l| {
        unknown_and_dirs(&l, issues, "images");
        sizes(&l.images, issues);
        let n = l.images.len() as u64;
        count_issue(issues, dir, expected, n);
        n
    });
    SplitReport {
        split: split.into(),
        defect_type: None,
        expected,
        found,
        masks: None,
    }
}

/// A defective split `test/<t>` with its masks in `ground_truth/<t>`.
fn check_defect(
    cat: &Path,
    t: &str,
    expected: Option<u64>,
    issues: &mut Vec<Issue>,
) -> SplitReport {
    let dir = cat.join("test").join(t);
    let gt_dir = cat.join("ground_truth").join(t);
    let mut report = SplitReport {
        split: format!("test/{t}"),
        defect_type: Some(t.into()),
        expected,
        found: None,
        masks: None,
    };
    let Some(l) = list_expecting(&dir, expected, issues) else {
        return report;
    };
    unknown_and_dirs(&l, issues, "images");
    let n = l.images.len() as u64;
    report.found = Some(n);
    count_issue(issues, &dir, expected, n);
    let img_sizes = sizes(&l.images, issues);

    let mut gt_issues = Vec::new();
    let masks = if gt_dir.is_dir() {
        list(&gt_dir, &mut gt_issues)
    } else {
        None
    };
    if masks.is_none() && !l.images.is_empty() && !gt_dir.is_dir() {
        issues.push(Issue::new(
            IssueKind::MissingFolder,
            &gt_dir,
            format!("ground-truth folder does not exist ({n} images of test/{t} need masks)"),
        ));
    }
    issues.extend(gt_issues);
    let masks = masks.unwrap_or(Listing {
        images: Vec::new(),
        unknown: Vec::new(),
        dirs: Vec::new(),
    });
    unknown_and_dirs(&masks, issues, "masks");
    // Masks by the image stem they belong to: `<stem>_mask.<ext>` or `<stem>.<ext>`.
    let mut by_stem: BTreeMap<String, &PathBuf> = BTreeMap::new();
    for m in &masks.images {
        let s = stem(m);
        let key = s.strip_suffix("_mask").unwrap_or(&s).to_string();
        // Prefer `<stem>_mask` when both forms exist.
        if s.ends_with("_mask") || !by_stem.contains_key(&key) {
            by_stem.insert(key, m);
        }
    }
    let mut used = BTreeSet::new();
    let mut pairs = Vec::new();
    for (img, size) in l.images.iter().zip(&img_sizes) {
        let s = stem(img);
        match by_stem.get(&s) {
            Some(m) => {
                used.insert((*m).clone());
                pairs.push((img, *m, *size));
            }
            None => issues.push(Issue::new(
                IssueKind::MissingMask,
                gt_dir.join(format!("{s}_mask.png")),
                format!("no ground-truth mask for {}", img.display()),
            )),
        }
    }
    report.masks = Some(pairs.len() as u64);
    let mask_paths: Vec<PathBuf> = pairs.iter().map(|(_, m, _)| (*m).clone()).collect();
    let mask_sizes = sizes(&mask_paths, issues);
    for ((img, m, isz), msz) in pairs.iter().zip(mask_sizes) {
        if let (Some(a), Some(b)) = (isz, msz) {
            if *a != b {
                issues.push(Issue::new(
                    IssueKind::MaskSizeMismatch,
                    *m,
                    format!(
                        "mask is {}×{} but its image {} is {}×{}",
                        b.0,
                        b.1,
                        img.display(),
                        a.0,
                        a.1
                    ),
                ));
            }
        }
    }
    for m in &masks.images {
        if !used.contains(m) {
            issues.push(Issue::new(
                IssueKind::OrphanMask,
                m,
                format!("no test image test/{t}/{}.*", {
                    let s = stem(m);
                    s.strip_suffix("_mask").unwrap_or(&s).to_string()
                }),
            ));
        }
    }
    report
}

/// Check one present category folder against its spec.
fn check_category(name: &str, spec: &CategorySpec, dir: &Path) -> CategoryReport {
    let mut issues = Vec::new();
    let mut splits = Vec::new();
    // Top level: train, test, ground_truth (files such as readme.txt/license.txt are fine).
    for d in subdirs(dir, &mut issues) {
        if !["train", "test", "ground_truth"].contains(&d.as_str()) {
            issues.push(Issue::new(
                IssueKind::UnexpectedFolder,
                dir.join(&d),
                "the MVTec layout has only train/, test/ and ground_truth/ here",
            ));
        }
    }
    // train: good only.
    let train = dir.join("train");
    if train.is_dir() {
        for d in subdirs(&train, &mut issues) {
            if d != "good" {
                issues.push(Issue::new(
                    IssueKind::UnexpectedFolder,
                    train.join(&d),
                    "train/ holds only good/ (training images are defect-free)",
                ));
            }
        }
    }
    splits.push(check_normal(
        &train.join("good"),
        "train/good",
        spec.train_good,
        &mut issues,
    ));
    // test: good and the defect types.
    let test = dir.join("test");
    let present: Vec<String> = if test.is_dir() {
        subdirs(&test, &mut issues)
    } else {
        issues.push(Issue::new(
            IssueKind::MissingFolder,
            &test,
            "folder does not exist",
        ));
        Vec::new()
    };
    if test.is_dir() {
        splits.push(check_normal(
            &test.join("good"),
            "test/good",
            spec.test_good,
            &mut issues,
        ));
    } else {
        splits.push(SplitReport {
            split: "test/good".into(),
            defect_type: None,
            expected: spec.test_good,
            found: None,
            masks: None,
        });
    }
    let mut types: BTreeMap<String, Option<u64>> = BTreeMap::new();
    if let Some(d) = &spec.defects {
        types.extend(d.iter().map(|(k, v)| (k.clone(), *v)));
    }
    for t in present.iter().filter(|t| *t != "good") {
        if spec.defects.as_ref().is_some_and(|d| !d.contains_key(t)) {
            issues.push(Issue::new(
                IssueKind::UnexpectedDefectType,
                test.join(t),
                format!(
                    "defect type {t} is not in the manifest (expected: {})",
                    types.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        types.entry(t.clone()).or_insert(None);
    }
    if test.is_dir() {
        for (t, expected) in &types {
            splits.push(check_defect(dir, t, *expected, &mut issues));
        }
    } else {
        for (t, expected) in &types {
            splits.push(SplitReport {
                split: format!("test/{t}"),
                defect_type: Some(t.clone()),
                expected: *expected,
                found: None,
                masks: None,
            });
        }
    }
    // ground_truth: one folder per defect type present in test/.
    let gt = dir.join("ground_truth");
    if gt.is_dir() {
        for d in subdirs(&gt, &mut issues) {
            if !present.contains(&d) || d == "good" {
                issues.push(Issue::new(
                    IssueKind::UnexpectedFolder,
                    gt.join(&d),
                    format!("ground_truth/{d} has no matching test/{d} of defective images"),
                ));
            }
        }
    }
    CategoryReport {
        name: name.into(),
        kind: spec.kind,
        path: Some(dir.to_path_buf()),
        status: if issues.is_empty() {
            CategoryStatus::Ok
        } else {
            CategoryStatus::Failed
        },
        counts_checked: spec.has_counts(),
        note: spec.note.clone(),
        splits,
        issues,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::mvtec_category_kind;

    #[test]
    fn builtin_mvtec_manifest_is_consistent() {
        let m = Manifest::mvtec_ad();
        assert_eq!(m.categories.len(), 15);
        let (mut train, mut test) = (0, 0);
        for (name, c) in &m.categories {
            // The texture/object split agrees with the layout module's.
            assert_eq!(c.kind, mvtec_category_kind(name), "{name}");
            train += c.train_good.unwrap();
            test += c.test_good.unwrap();
            let d = c.defects.as_ref().unwrap();
            assert!(!d.is_empty(), "{name}");
            test += d.values().map(|v| v.unwrap()).sum::<u64>();
        }
        // Bergmann et al.: 3629 training and 1725 test images.
        assert_eq!((train, test), (3629, 1725));
        let b = &m.categories["bottle"];
        assert_eq!((b.train_good, b.test_good), (Some(209), Some(20)));
        assert_eq!(b.defects.as_ref().unwrap()["broken_small"], Some(22));
        assert!(m
            .source
            .as_deref()
            .unwrap()
            .starts_with("https://www.mvtec.com/"));
        assert!(m.license.as_deref().unwrap().contains("CC BY-NC-SA 4.0"));
    }

    #[test]
    fn builtin_mtl_manifest_has_no_counts() {
        let m = Manifest::mtl_ad();
        assert_eq!(
            m.categories.keys().collect::<Vec<_>>(),
            ["lychee", "ostrich", "pearlfish"]
        );
        assert!(m
            .categories
            .values()
            .all(|c| !c.has_counts() && c.note.is_some()));
        assert!(m.category("Ostrich").is_some());
        assert!(Manifest::builtin("mtl_ad").is_some() && Manifest::builtin("x").is_none());
    }

    #[test]
    fn manifest_errors_name_the_problem() {
        let p = Path::new("m.json");
        let e = Manifest::from_json("{\"name\": \"x\", \"categories\": {}}", p).unwrap_err();
        assert!(e.to_string().contains("no category"), "{e}");
        let e = Manifest::from_json("{\"name\": \"x\", \"categorie\": {}}", p).unwrap_err();
        assert!(e.to_string().contains("m.json"), "{e}");
        let e = Manifest::from_json(r#"{"name": "x", "categories": {"a": {}, "A": {}}}"#, p)
            .unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = Manifest::from_json(
            r#"{"name": "x", "categories": {"a": {"defects": {"good": 3}}}}"#,
            p,
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a defect type"), "{e}");
        let e = Manifest::from_json(
            r#"{"name": "x", "layout": "folder", "categories": {"a": {}}}"#,
            p,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown layout"), "{e}");
    }
}
