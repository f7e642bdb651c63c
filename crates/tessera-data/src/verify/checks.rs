//! The per-split and per-category checks.

use super::images::{inspect, Depth};
use super::listing::{list, list_expecting, stem, subdirs};
use super::manifest::CategorySpec;
use super::report::{CategoryReport, CategoryStatus, Issue, IssueKind, SplitReport};
use crate::layout::FolderEntries as Listing;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn unknown_and_dirs(l: &Listing, issues: &mut Vec<Issue>, what: &str) {
    for f in &l.other {
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
    depth: Depth,
    issues: &mut Vec<Issue>,
) -> SplitReport {
    let found = list_expecting(dir, expected, issues).map(|l| {
        unknown_and_dirs(&l, issues, "images");
        inspect(&l.images, depth, false, issues);
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
    depth: Depth,
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
    let img_sizes = inspect(&l.images, depth, false, issues);

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
        other: Vec::new(),
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
    let mask_sizes = inspect(&mask_paths, depth, true, issues);
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
pub(crate) fn check_category(
    name: &str,
    spec: &CategorySpec,
    dir: &Path,
    depth: Depth,
) -> CategoryReport {
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
        depth,
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
            depth,
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
            splits.push(check_defect(dir, t, *expected, depth, &mut issues));
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
