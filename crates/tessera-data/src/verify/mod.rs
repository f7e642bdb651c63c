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

mod checks;
mod images;
mod listing;
mod manifest;
mod report;

pub use images::{image_size, Depth};
pub use manifest::{CategorySpec, Manifest, MTL_AD_MANIFEST, MVTEC_AD_MANIFEST};
pub use report::{CategoryReport, CategoryStatus, Issue, IssueKind, SplitReport, VerifyReport};

use checks::check_category;
use listing::subdirs;
use rayon::prelude::*;
use std::path::Path;
use tessera_core::{Error, Result};

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
    verify_with(root, manifest, only, Depth::Decode)
}

/// [`verify`] at a chosen depth ([`Depth::Headers`] reads only the image headers: fast, but
/// blind to truncated files and mask values).
pub fn verify_with(
    root: &Path,
    manifest: &Manifest,
    only: Option<&[String]>,
    depth: Depth,
) -> Result<VerifyReport> {
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
            Some((n, spec)) => check_category(n, spec, root, depth),
            None => {
                let mut c = check_category(&name, &CategorySpec::default(), root, depth);
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
                    Some(d) => check_category(name, spec, &root.join(d), depth),
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
