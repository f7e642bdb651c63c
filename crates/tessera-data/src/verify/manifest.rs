//! Manifests: what a dataset should hold (categories, counts per split, defect types).

use crate::layout::CategoryKind;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use tessera_core::{Error, Result};

/// The built-in MVTec AD manifest (`datasets/mvtec_ad.json`).
pub const MVTEC_AD_MANIFEST: &str = include_str!("../../manifests/mvtec_ad.json");
/// The built-in MTL AD manifest (`datasets/mtl_ad.json`; counts unknown).
pub const MTL_AD_MANIFEST: &str = include_str!("../../manifests/mtl_ad.json");

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

    /// The manifest a `--manifest` value names: a file, else a built-in name (`mvtec_ad`,
    /// `mtl_ad`); `None` is the built-in MVTec AD manifest.
    pub fn resolve(manifest: Option<&Path>) -> Result<Self> {
        let Some(p) = manifest else {
            return Ok(Self::mvtec_ad());
        };
        if p.is_file() {
            return Self::load(p);
        }
        if let Some(m) = p.to_str().and_then(Self::builtin) {
            return Ok(m);
        }
        Err(Error::bad_input(
            p,
            "manifest file does not exist (built-in manifests: mvtec_ad, mtl_ad)",
        ))
    }

    /// The manifest's entry for a category name, case-insensitively.
    pub fn category(&self, name: &str) -> Option<(&str, &CategorySpec)> {
        self.categories
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(k, v)| (k.as_str(), v))
    }
}
