//! Dataset layouts.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tessera_core::{Error, Result};

/// The file a plain folder dataset uses to describe itself.
pub const FOLDER_SPEC_FILE: &str = "tessera-dataset.json";

/// File extensions read as images (case-insensitive).
pub const IMAGE_EXTS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

/// Whether a path names an image by its extension and is not hidden (`.` files are skipped).
pub fn is_image_path(p: &Path) -> bool {
    let hidden = p
        .file_name()
        .map(|n| n.to_string_lossy().starts_with('.'))
        .unwrap_or(true);
    let ext_ok = p
        .extension()
        .map(|x| IMAGE_EXTS.contains(&x.to_string_lossy().to_ascii_lowercase().as_str()))
        .unwrap_or(false);
    !hidden && ext_ok
}

/// Texture-like or object-like category: drives `--sbm auto` (the paper applies SBM to objects).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CategoryKind {
    Texture,
    Object,
}

impl CategoryKind {
    /// `texture` or `object`, as in `tessera-dataset.json`.
    pub fn name(self) -> &'static str {
        match self {
            CategoryKind::Texture => "texture",
            CategoryKind::Object => "object",
        }
    }
}

/// The texture/object split of MVTec AD's categories, plus MTL AD's three leather classes
/// (textures, as the paper groups them); None for other names.
pub fn mvtec_category_kind(name: &str) -> Option<CategoryKind> {
    match name.to_ascii_lowercase().as_str() {
        "carpet" | "grid" | "leather" | "tile" | "wood" => Some(CategoryKind::Texture),
        "lychee" | "ostrich" | "pearlfish" => Some(CategoryKind::Texture),
        "bottle" | "cable" | "capsule" | "hazelnut" | "metal_nut" | "pill" | "screw"
        | "toothbrush" | "transistor" | "zipper" => Some(CategoryKind::Object),
        _ => None,
    }
}

/// One image of a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The image file.
    pub path: PathBuf,
    /// `good` for normal images, else the defect type (the folder name).
    pub defect_type: String,
    /// Ground-truth mask file, when the dataset has one for this image.
    pub mask: Option<PathBuf>,
    /// Display name, `<type>/<file name>`.
    pub name: String,
}

impl Sample {
    fn new(path: PathBuf, defect_type: &str, mask: Option<PathBuf>) -> Self {
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self {
            name: format!("{defect_type}/{file}"),
            path,
            defect_type: defect_type.into(),
            mask,
        }
    }
    /// Whether this is an anomalous (defect) image.
    pub fn is_anomalous(&self) -> bool {
        self.defect_type != "good"
    }
}

/// A plain folder dataset, described by `tessera-dataset.json` in its root.
/// Paths are relative to the root.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FolderSpec {
    /// Folder of normal training images.
    pub normal_train: PathBuf,
    /// Folder of normal test images. When absent, `normal_test_ratio` of `normal_train`
    /// (seeded) is held out for testing.
    #[serde(default)]
    pub normal_test: Option<PathBuf>,
    /// Folders of anomalous test images; each folder's name is its defect type.
    #[serde(default)]
    pub abnormal: Vec<PathBuf>,
    /// Folder of masks: `<mask>/<type>/<stem>[_mask].<ext>` or `<mask>/<stem>[_mask].<ext>`.
    #[serde(default)]
    pub mask: Option<PathBuf>,
    /// Fraction of normal images held out when `normal_test` is absent.
    #[serde(default = "default_ratio")]
    pub normal_test_ratio: f64,
    /// Seed of that hold-out split.
    #[serde(default)]
    pub split_seed: u64,
    /// Texture or object category.
    #[serde(default)]
    pub category: Option<CategoryKind>,
}

fn default_ratio() -> f64 {
    0.2
}

/// Which layout a dataset uses.
#[derive(Debug, Clone, PartialEq)]
pub enum Layout {
    /// `train/good`, `test/<type>`, `ground_truth/<type>/<name>_mask.png`.
    MvTec,
    /// A plain folder dataset.
    Folder(FolderSpec),
}

/// A dataset on disk. Listing is lazy: `fit` needs only [`Dataset::train`], `test` only
/// [`Dataset::test`], and each checks what it needs.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub root: PathBuf,
    pub layout: Layout,
    /// [`Dataset::resolve_kind`]'s answer once found (it may read training images).
    kind: std::sync::OnceLock<(CategoryKind, String)>,
}

impl Dataset {
    /// Open a dataset root: MVTec layout when `train/` or `test/` exists, else a folder dataset
    /// with `tessera-dataset.json`.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(match not_a_folder(root) {
                Error::BadInput { msg, .. } if msg == "folder does not exist" => {
                    Error::bad_input(root, "dataset folder does not exist")
                }
                e => e,
            });
        }
        let spec_path = root.join(FOLDER_SPEC_FILE);
        if spec_path.is_file() {
            let text = std::fs::read_to_string(&spec_path).map_err(|e| Error::io(&spec_path, e))?;
            let spec: FolderSpec = serde_json::from_str(&text).map_err(|e| {
                Error::bad_input(&spec_path, format!("invalid dataset description: {e}"))
            })?;
            if !(0.0..1.0).contains(&spec.normal_test_ratio) {
                return Err(Error::bad_input(
                    &spec_path,
                    "normal_test_ratio must be in [0, 1)",
                ));
            }
            return Ok(Self {
                root: root.to_path_buf(),
                layout: Layout::Folder(spec),
                kind: Default::default(),
            });
        }
        if root.join("train").is_dir() || root.join("test").is_dir() {
            return Ok(Self {
                root: root.to_path_buf(),
                layout: Layout::MvTec,
                kind: Default::default(),
            });
        }
        Err(Error::bad_input(
            root,
            format!(
                "not a dataset: expected the MVTec layout (train/good, test/<type>, ground_truth/) \
                 or a {FOLDER_SPEC_FILE} describing a folder dataset"
            ),
        ))
    }

    /// Category name (the root folder's name).
    pub fn category(&self) -> String {
        self.root
            .canonicalize()
            .unwrap_or_else(|_| self.root.clone())
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Texture or object: from the folder spec, else MVTec's split by category name.
    pub fn category_kind(&self) -> Option<CategoryKind> {
        match &self.layout {
            Layout::Folder(spec) => spec
                .category
                .or_else(|| mvtec_category_kind(&self.category())),
            Layout::MvTec => mvtec_category_kind(&self.category()),
        }
    }

    /// Texture or object, and why: `tessera-dataset.json`'s `category`, else MVTec AD's name
    /// list, else inferred from (a few of) the training images ([`crate::infer_kind`]).
    /// Found once per `Dataset` (an error is not kept, so a later call tries again).
    pub fn resolve_kind(&self) -> Result<(CategoryKind, String)> {
        if let Some(k) = self.kind.get() {
            return Ok(k.clone());
        }
        let found = self.find_kind()?;
        Ok(self.kind.get_or_init(|| found).clone())
    }

    fn find_kind(&self) -> Result<(CategoryKind, String)> {
        let name = self.category();
        if let Layout::Folder(FolderSpec {
            category: Some(k), ..
        }) = &self.layout
        {
            return Ok((
                *k,
                format!(
                    "{FOLDER_SPEC_FILE} says '{name}' is a {} category",
                    k.name()
                ),
            ));
        }
        if let Some(k) = mvtec_category_kind(&name) {
            return Ok((k, format!("'{name}' is an MVTec AD {} category", k.name())));
        }
        let paths: Vec<PathBuf> = self.train()?.into_iter().map(|s| s.path).collect();
        let e = crate::infer_kind(&paths)?;
        Ok((
            e.kind,
            format!(
                "'{name}' is not a known category; judged from its images: {}",
                e.describe()
            ),
        ))
    }

    /// Normal training images (error when the folder is missing or holds no image).
    pub fn train(&self) -> Result<Vec<Sample>> {
        match &self.layout {
            Layout::MvTec => {
                let dir = self.root.join("train").join("good");
                let files = list_images(&dir)?;
                if files.is_empty() {
                    return Err(Error::bad_input(
                        &dir,
                        "training folder holds no image (png/jpg/bmp/tif)",
                    ));
                }
                Ok(files
                    .into_iter()
                    .map(|p| Sample::new(p, "good", None))
                    .collect())
            }
            Layout::Folder(spec) => Ok(self.folder_normals(spec)?.0),
        }
    }

    /// Test images, normal first then each defect type in name order, with their masks.
    /// Anomalous images of an MVTec dataset must have a mask.
    pub fn test(&self) -> Result<Vec<Sample>> {
        match &self.layout {
            Layout::MvTec => self.mvtec_test(),
            Layout::Folder(spec) => self.folder_test(spec),
        }
    }

    fn mvtec_test(&self) -> Result<Vec<Sample>> {
        let test = self.root.join("test");
        if !test.is_dir() {
            return Err(Error::bad_input(&test, "test folder does not exist"));
        }
        let mut types = subdirs(&test)?;
        types.sort_by_key(|t| (t != "good", t.clone()));
        if types.is_empty() {
            return Err(Error::bad_input(
                &test,
                "test folder has no <type> sub-folders",
            ));
        }
        let mut out = Vec::new();
        for t in types {
            for img in list_images(&test.join(&t))? {
                let mask = if t == "good" {
                    None
                } else {
                    let stem = stem(&img);
                    let gt_dir = self.root.join("ground_truth").join(&t);
                    let m = find_mask(&gt_dir, &stem).ok_or_else(|| {
                        Error::bad_input(
                            &img,
                            format!(
                                "no ground-truth mask: expected {}",
                                gt_dir.join(format!("{stem}_mask.png")).display()
                            ),
                        )
                    })?;
                    Some(m)
                };
                out.push(Sample::new(img, &t, mask));
            }
        }
        if out.is_empty() {
            return Err(Error::bad_input(&test, "test folders hold no image"));
        }
        Ok(out)
    }

    /// (train, held-out test) normal images of a folder dataset.
    fn folder_normals(&self, spec: &FolderSpec) -> Result<(Vec<Sample>, Vec<Sample>)> {
        let dir = self.root.join(&spec.normal_train);
        let files = list_images(&dir)?;
        if files.is_empty() {
            return Err(Error::bad_input(
                &dir,
                "normal folder holds no image (png/jpg/bmp/tif)",
            ));
        }
        let mut train: Vec<Sample> = files
            .into_iter()
            .map(|p| Sample::new(p, "good", None))
            .collect();
        if spec.normal_test.is_some() || spec.normal_test_ratio == 0.0 {
            return Ok((train, Vec::new()));
        }
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let mut idx: Vec<usize> = (0..train.len()).collect();
        idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(spec.split_seed));
        let n_test = ((train.len() as f64) * spec.normal_test_ratio).round() as usize;
        let n_test = n_test.min(train.len().saturating_sub(1));
        let mut held: Vec<usize> = idx[..n_test].to_vec();
        held.sort_unstable();
        let test: Vec<Sample> = held.iter().map(|&i| train[i].clone()).collect();
        let mut k = 0;
        train.retain(|_| {
            k += 1;
            held.binary_search(&(k - 1)).is_err()
        });
        Ok((train, test))
    }

    fn folder_test(&self, spec: &FolderSpec) -> Result<Vec<Sample>> {
        let mut out = match &spec.normal_test {
            Some(d) => {
                let dir = self.root.join(d);
                list_images(&dir)?
                    .into_iter()
                    .map(|p| Sample::new(p, "good", None))
                    .collect()
            }
            None => self.folder_normals(spec)?.1,
        };
        for d in &spec.abnormal {
            let dir = self.root.join(d);
            let t = d
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "abnormal".into());
            for img in list_images(&dir)? {
                let mask = match &spec.mask {
                    None => None,
                    Some(m) => {
                        let mdir = self.root.join(m);
                        let s = stem(&img);
                        let found = find_mask(&mdir.join(&t), &s).or_else(|| find_mask(&mdir, &s));
                        Some(found.ok_or_else(|| {
                            Error::bad_input(
                                &img,
                                format!("no mask for this image in {}", mdir.display()),
                            )
                        })?)
                    }
                };
                out.push(Sample::new(img, &t, mask));
            }
        }
        if out.is_empty() {
            return Err(Error::bad_input(
                &self.root,
                "the dataset has no test image",
            ));
        }
        Ok(out)
    }
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn find_mask(dir: &Path, stem: &str) -> Option<PathBuf> {
    for name in [format!("{stem}_mask"), stem.to_string()] {
        for ext in IMAGE_EXTS {
            let p = dir.join(format!("{name}.{ext}"));
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

fn subdirs(dir: &Path) -> Result<Vec<String>> {
    let entries = read_folder(dir).map_err(|e| Error::io(dir, e))?;
    Ok(entries
        .dirs
        .iter()
        .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect())
}

/// One folder's entries, each list sorted; hidden names (`.` first) are skipped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FolderEntries {
    /// Files with an image extension ([`IMAGE_EXTS`]).
    pub images: Vec<PathBuf>,
    /// Every other non-folder entry.
    pub other: Vec<PathBuf>,
    /// Sub-folders (links to folders included).
    pub dirs: Vec<PathBuf>,
}

/// List one folder: the walker every listing in this crate goes through.
pub fn read_folder(dir: &Path) -> std::io::Result<FolderEntries> {
    let mut out = FolderEntries::default();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let hidden = p
            .file_name()
            .map(|n| n.to_string_lossy().starts_with('.'))
            .unwrap_or(true);
        if hidden {
            continue;
        }
        if p.is_dir() {
            out.dirs.push(p);
        } else if is_image_path(&p) {
            out.images.push(p);
        } else {
            out.other.push(p);
        }
    }
    out.images.sort();
    out.other.sort();
    out.dirs.sort();
    Ok(out)
}

/// The error for a folder argument that is not a folder: missing, or a file.
pub fn not_a_folder(dir: &Path) -> Error {
    if dir.is_file() {
        Error::bad_input(dir, "is a file, not a folder")
    } else if std::fs::symlink_metadata(dir).is_ok() {
        Error::bad_input(dir, "is not a folder")
    } else {
        Error::bad_input(dir, "folder does not exist")
    }
}

/// Image files under `dir`, sorted by path: directly in it, or (with `recursive`) in every
/// sub-folder too. Hidden files and folders (`.` names) are skipped; links to folders are not
/// followed (no cycles). A missing folder is an error naming it.
pub fn walk_images(dir: &Path, recursive: bool) -> Result<Vec<PathBuf>> {
    let mut out = list_images(dir)?;
    if recursive {
        for sub in subdirs(dir)? {
            let p = dir.join(&sub);
            let is_link = std::fs::symlink_metadata(&p)
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(true);
            if !is_link {
                out.extend(walk_images(&p, true)?);
            }
        }
        out.sort();
    }
    Ok(out)
}

/// Image files (png/jpg/jpeg/bmp/tif/tiff, any case) directly in `dir`, sorted by name.
/// A missing folder is an error naming it.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(not_a_folder(dir));
    }
    let entries = read_folder(dir).map_err(|e| Error::io(dir, e))?;
    Ok(entries.images.into_iter().filter(|p| p.is_file()).collect())
}
