//! `tessera_data::verify` on small fixture datasets (good and broken) and, when present, on the
//! real MVTec AD folder in `../shared`.

use image::{GrayImage, Luma, Rgb, RgbImage};
use std::path::{Path, PathBuf};
use tessera_data::verify::{verify, CategoryStatus, IssueKind, Manifest, VerifyReport};

const MANIFEST: &str = r#"{
  "name": "Mini",
  "categories": {
    "widget": {"kind": "object", "train_good": 3, "test_good": 2,
               "defects": {"crack": 2, "dent": 1}},
    "plate": {"kind": "texture", "train_good": 2, "test_good": 1,
              "defects": {"scratch": 1}}
  }
}"#;

fn manifest() -> Manifest {
    Manifest::from_json(MANIFEST, Path::new("mini.json")).unwrap()
}

fn rgb(path: &Path, w: u32, h: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_fn(w, h, |x, y| Rgb([x as u8, y as u8, 7]))
        .save(path)
        .unwrap();
}

fn mask(path: &Path, w: u32, h: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    GrayImage::from_fn(w, h, |x, _| Luma([if x < 3 { 255 } else { 0 }]))
        .save(path)
        .unwrap();
}

/// A category folder matching the spec (images 16×12).
fn category(dir: &Path, train: usize, good: usize, defects: &[(&str, usize)]) {
    for i in 0..train {
        rgb(&dir.join(format!("train/good/{i:03}.png")), 16, 12);
    }
    for i in 0..good {
        rgb(&dir.join(format!("test/good/{i:03}.png")), 16, 12);
    }
    for (t, n) in defects {
        for i in 0..*n {
            rgb(&dir.join(format!("test/{t}/{i:03}.png")), 16, 12);
            mask(
                &dir.join(format!("ground_truth/{t}/{i:03}_mask.png")),
                16,
                12,
            );
        }
    }
    std::fs::write(dir.join("readme.txt"), "fine at the category root").unwrap();
}

/// A dataset root holding both categories of the manifest, all correct.
fn dataset() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("mini");
    category(&root.join("widget"), 3, 2, &[("crack", 2), ("dent", 1)]);
    category(&root.join("plate"), 2, 1, &[("scratch", 1)]);
    (tmp, root)
}

fn issues(r: &VerifyReport, kind: IssueKind) -> Vec<String> {
    r.all_issues()
        .filter(|i| i.kind == kind)
        .map(|i| format!("{}: {}", i.path.display(), i.message))
        .collect()
}

#[test]
fn a_good_dataset_passes() {
    let (_t, root) = dataset();
    let r = verify(&root, &manifest(), None).unwrap();
    assert!(r.ok, "{r:#?}");
    assert!(!r.single_category);
    assert_eq!(r.categories.len(), 2);
    let w = r.categories.iter().find(|c| c.name == "widget").unwrap();
    assert_eq!(w.status, CategoryStatus::Ok);
    assert!(w.counts_checked);
    assert_eq!(w.split("train/good").unwrap().found, Some(3));
    assert_eq!(w.split("test/good").unwrap().expected, Some(2));
    assert_eq!(w.split("test/crack").unwrap().masks, Some(2));
    assert_eq!((w.defective_found(), w.defective_expected()), (3, Some(3)));
    assert_eq!(w.masks_found(), 3);
    // JSON round trip of the report.
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["categories"][0]["status"], "ok");
    let back: VerifyReport = serde_json::from_value(v).unwrap();
    assert_eq!(back, r);
}

#[test]
fn a_single_category_folder_is_checked_as_itself() {
    let (_t, root) = dataset();
    let r = verify(&root.join("widget"), &manifest(), None).unwrap();
    assert!(r.ok && r.single_category, "{r:#?}");
    assert_eq!(r.categories.len(), 1);
    assert_eq!(r.categories[0].name, "widget");

    // Under another name: not in the manifest, unless --categories names it.
    std::fs::rename(root.join("widget"), root.join("my_widget")).unwrap();
    let r = verify(&root.join("my_widget"), &manifest(), None).unwrap();
    assert!(!r.ok);
    assert_eq!(issues(&r, IssueKind::NotInManifest).len(), 1);
    let only = ["widget".to_string()];
    let r = verify(&root.join("my_widget"), &manifest(), Some(&only)).unwrap();
    assert!(r.ok, "{r:#?}");
    // Category names match case-insensitively.
    std::fs::rename(root.join("my_widget"), root.join("Widget")).unwrap();
    assert!(verify(&root, &manifest(), None).unwrap().ok);
}

#[test]
fn missing_mask_is_named() {
    let (_t, root) = dataset();
    let gone = root.join("widget/ground_truth/crack/001_mask.png");
    std::fs::remove_file(&gone).unwrap();
    let r = verify(&root, &manifest(), None).unwrap();
    assert!(!r.ok);
    let w = r.categories.iter().find(|c| c.name == "widget").unwrap();
    assert_eq!(w.status, CategoryStatus::Failed);
    let m = issues(&r, IssueKind::MissingMask);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(m[0].starts_with(&gone.display().to_string()), "{m:?}");
    assert!(m[0].contains("test/crack/001.png"), "{m:?}");
    assert_eq!(w.split("test/crack").unwrap().masks, Some(1));
    // The other category is unaffected.
    let p = r.categories.iter().find(|c| c.name == "plate").unwrap();
    assert_eq!(p.status, CategoryStatus::Ok);
}

#[test]
fn wrong_counts_are_reported_per_split() {
    let (_t, root) = dataset();
    rgb(&root.join("widget/train/good/100.png"), 16, 12);
    std::fs::remove_file(root.join("plate/test/scratch/000.png")).unwrap();
    let r = verify(&root, &manifest(), None).unwrap();
    assert!(!r.ok);
    let c = issues(&r, IssueKind::CountMismatch);
    assert_eq!(c.len(), 2, "{c:?}");
    assert!(c
        .iter()
        .any(|m| m.contains("widget/train/good") && m.contains("expected 3 images, found 4")));
    assert!(c
        .iter()
        .any(|m| m.contains("plate/test/scratch") && m.contains("expected 1 images, found 0")));
    // The scratch mask lost its image.
    let o = issues(&r, IssueKind::OrphanMask);
    assert_eq!(o.len(), 1);
    assert!(
        o[0].contains("plate/ground_truth/scratch/000_mask.png"),
        "{o:?}"
    );
}

#[test]
fn mask_of_another_size_is_reported() {
    let (_t, root) = dataset();
    let m = root.join("widget/ground_truth/dent/000_mask.png");
    mask(&m, 10, 10);
    let r = verify(&root, &manifest(), None).unwrap();
    assert!(!r.ok);
    let s = issues(&r, IssueKind::MaskSizeMismatch);
    assert_eq!(s.len(), 1, "{s:?}");
    assert!(s[0].starts_with(&m.display().to_string()), "{s:?}");
    assert!(
        s[0].contains("mask is 10×10") && s[0].contains("16×12"),
        "{s:?}"
    );
}

#[test]
fn missing_category_fails_unless_restricted() {
    let (_t, root) = dataset();
    std::fs::remove_dir_all(root.join("plate")).unwrap();
    let r = verify(&root, &manifest(), None).unwrap();
    assert!(!r.ok);
    let p = r.categories.iter().find(|c| c.name == "plate").unwrap();
    assert_eq!(p.status, CategoryStatus::Missing);
    assert!(p.path.is_none());
    assert_eq!(r.count(CategoryStatus::Missing), 1);
    assert_eq!(r.count(CategoryStatus::Ok), 1);
    let m = issues(&r, IssueKind::MissingCategory);
    assert!(m[0].contains("plate"), "{m:?}");
    let only = ["widget".to_string()];
    let r = verify(&root, &manifest(), Some(&only)).unwrap();
    assert!(r.ok, "{r:#?}");
    assert_eq!(r.categories.len(), 1);
}

#[test]
fn strays_unreadable_files_and_unknown_types() {
    let (_t, root) = dataset();
    // An extra category, a stray file among images, a defect type the manifest lacks (with
    // its masks), a truncated PNG, a ground-truth folder without test images, a missing
    // ground-truth folder, a folder inside train/.
    category(&root.join("extra"), 1, 1, &[]);
    std::fs::write(root.join("widget/test/good/notes.txt"), "x").unwrap();
    rgb(&root.join("widget/test/bend/000.png"), 16, 12);
    mask(&root.join("widget/ground_truth/bend/000_mask.png"), 16, 12);
    std::fs::write(
        root.join("widget/train/good/002.png"),
        b"\x89PNG\r\n\x1a\n\0\0",
    )
    .unwrap();
    std::fs::create_dir_all(root.join("widget/ground_truth/stain")).unwrap();
    std::fs::remove_dir_all(root.join("plate/ground_truth/scratch")).unwrap();
    std::fs::create_dir_all(root.join("plate/train/bad")).unwrap();
    // Hidden files are ignored.
    std::fs::write(root.join("widget/test/good/.DS_Store"), "x").unwrap();
    let r = verify(&root, &manifest(), None).unwrap();
    assert!(!r.ok);
    let one = |k: IssueKind, needle: &str| {
        let v = issues(&r, k);
        assert!(
            v.iter().any(|m| m.contains(needle)),
            "{k:?} {needle}: {v:?}"
        );
    };
    one(IssueKind::UnexpectedCategory, "mini/extra");
    one(IssueKind::UnknownFile, "widget/test/good/notes.txt");
    one(IssueKind::UnexpectedDefectType, "widget/test/bend");
    one(IssueKind::Unreadable, "widget/train/good/002.png");
    one(IssueKind::UnexpectedFolder, "widget/ground_truth/stain");
    one(IssueKind::MissingFolder, "plate/ground_truth/scratch");
    one(
        IssueKind::MissingMask,
        "plate/ground_truth/scratch/000_mask.png",
    );
    one(IssueKind::UnexpectedFolder, "plate/train/bad");
    assert!(
        issues(&r, IssueKind::UnknownFile).len() == 1,
        "hidden files are skipped"
    );
    // The unlisted type is still checked: counted, masks matched.
    let w = r.categories.iter().find(|c| c.name == "widget").unwrap();
    let b = w.split("test/bend").unwrap();
    assert_eq!((b.expected, b.found, b.masks), (None, Some(1), Some(1)));
    // With --categories the stray category is not looked at.
    let only = ["widget".to_string()];
    let r = verify(&root, &manifest(), Some(&only)).unwrap();
    assert!(issues(&r, IssueKind::UnexpectedCategory).is_empty());
}

#[test]
fn unknown_counts_check_the_layout_only() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("mtl");
    category(&root.join("Ostrich"), 2, 1, &[("scar", 2)]);
    let only = ["ostrich".to_string()];
    let r = verify(&root, &Manifest::mtl_ad(), Some(&only)).unwrap();
    assert!(r.ok, "{r:#?}");
    assert!(!r.categories[0].counts_checked);
    assert_eq!(r.categories[0].split("test/scar").unwrap().masks, Some(2));
    std::fs::remove_file(root.join("Ostrich/ground_truth/scar/001_mask.png")).unwrap();
    let r = verify(&root, &Manifest::mtl_ad(), Some(&only)).unwrap();
    assert!(!r.ok);
    assert_eq!(issues(&r, IssueKind::MissingMask).len(), 1);
}

#[test]
fn jpeg_and_bmp_headers_are_read() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("a.jpg");
    RgbImage::new(33, 21).save(&p).unwrap();
    assert_eq!(tessera_data::verify::image_size(&p), Ok((33, 21)));
    let p = tmp.path().join("a.bmp");
    RgbImage::new(5, 9).save(&p).unwrap();
    assert_eq!(tessera_data::verify::image_size(&p), Ok((5, 9)));
    let p = tmp.path().join("bad.png");
    std::fs::write(&p, "not an image").unwrap();
    assert!(tessera_data::verify::image_size(&p).is_err());
}

#[test]
fn errors_name_the_folder_or_category() {
    let tmp = tempfile::tempdir().unwrap();
    let nowhere = tmp.path().join("nowhere");
    let e = verify(&nowhere, &manifest(), None).unwrap_err().to_string();
    assert!(e.contains("nowhere") && e.contains("does not exist"), "{e}");
    let (_t, root) = dataset();
    let only = ["gizmo".to_string()];
    let e = verify(&root, &manifest(), Some(&only))
        .unwrap_err()
        .to_string();
    assert!(e.contains("gizmo") && e.contains("widget"), "{e}");
    let two = ["widget".to_string(), "plate".to_string()];
    let e = verify(&root.join("widget"), &manifest(), Some(&two))
        .unwrap_err()
        .to_string();
    assert!(e.contains("single category"), "{e}");
}

/// The real MVTec AD folder of this project (only bottle is there).
#[test]
fn real_mvtec_ad_bottle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/mvtec_ad");
    if !root.join("bottle").is_dir() {
        eprintln!("skipped: {} is not there", root.display());
        return;
    }
    let m = Manifest::mvtec_ad();
    let r = verify(&root, &m, None).unwrap();
    let b = r.categories.iter().find(|c| c.name == "bottle").unwrap();
    assert_eq!(b.status, CategoryStatus::Ok, "{:#?}", b.issues);
    assert_eq!(b.split("train/good").unwrap().found, Some(209));
    assert_eq!(b.split("test/good").unwrap().found, Some(20));
    assert_eq!(b.defective_found(), 63);
    assert_eq!(b.masks_found(), 63);
    assert_eq!(r.count(CategoryStatus::Missing), 14);
    assert!(!r.ok);
    let only = ["bottle".to_string()];
    assert!(verify(&root, &m, Some(&only)).unwrap().ok);
    assert!(verify(&root.join("bottle"), &m, None).unwrap().ok);
}
