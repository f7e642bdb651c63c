//! `tessera data verify` end to end: fixture datasets (good and broken), exit statuses, JSON,
//! and the real MVTec AD folder in `../shared` when it is there.

use image::{GrayImage, Luma, Rgb, RgbImage};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Run `tessera` from a scratch working directory, so nothing is read from the repository.
fn tessera(args: &[&str]) -> Output {
    let cwd = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .current_dir(cwd.path())
        .output()
        .expect("run tessera")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn passes(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(0),
        "expected success:\n{}\n{}",
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

fn fails(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected exit status 1:\n{}",
        stdout(o)
    );
    assert!(!stderr(o).contains("panicked"), "{}", stderr(o));
    stdout(o)
}

const MANIFEST: &str = r#"{
  "name": "Mini",
  "source": "fixtures",
  "categories": {
    "widget": {"kind": "object", "train_good": 2, "test_good": 1, "defects": {"crack": 2}},
    "plate": {"kind": "texture", "train_good": 1, "test_good": 1, "defects": {"scratch": 1}}
  }
}"#;

fn png(path: &Path, w: u32, h: u32, gray: bool) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    if gray {
        GrayImage::from_pixel(w, h, Luma([255])).save(path).unwrap();
    } else {
        RgbImage::from_pixel(w, h, Rgb([9, 9, 9]))
            .save(path)
            .unwrap();
    }
}

fn category(dir: &Path, train: usize, good: usize, defects: &[(&str, usize)]) {
    for i in 0..train {
        png(&dir.join(format!("train/good/{i:03}.png")), 12, 8, false);
    }
    for i in 0..good {
        png(&dir.join(format!("test/good/{i:03}.png")), 12, 8, false);
    }
    for (t, n) in defects {
        for i in 0..*n {
            png(&dir.join(format!("test/{t}/{i:03}.png")), 12, 8, false);
            png(
                &dir.join(format!("ground_truth/{t}/{i:03}_mask.png")),
                12,
                8,
                true,
            );
        }
    }
}

/// (tempdir, dataset root, manifest file)
fn fixture() -> (tempfile::TempDir, PathBuf, String) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("mini");
    category(&root.join("widget"), 2, 1, &[("crack", 2)]);
    category(&root.join("plate"), 1, 1, &[("scratch", 1)]);
    let m = tmp.path().join("mini.json");
    std::fs::write(&m, MANIFEST).unwrap();
    (tmp, root, m.display().to_string())
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn good_fixture_passes_with_a_table() {
    let (_t, root, m) = fixture();
    let out = passes(&tessera(&["data", "verify", &s(&root), "--manifest", &m]));
    assert!(out.contains("checked against the Mini manifest"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("widget") && l.contains("ok") && l.contains("2/2")),
        "{out}"
    );
    assert!(
        out.contains("2 ok, 0 failed, 0 missing of 2 categories: OK"),
        "{out}"
    );
    // --json: the report, parseable.
    let out = passes(&tessera(&[
        "data",
        "verify",
        &s(&root),
        "--manifest",
        &m,
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["categories"][1]["name"], "widget");
    assert_eq!(v["categories"][1]["splits"][2]["masks"], 2);
    // One category folder.
    passes(&tessera(&[
        "data",
        "verify",
        &s(&root.join("plate")),
        "--manifest",
        &m,
    ]));
}

#[test]
fn broken_fixtures_fail_and_name_the_file() {
    let (_t, root, m) = fixture();
    let gone = root.join("widget/ground_truth/crack/001_mask.png");
    std::fs::remove_file(&gone).unwrap();
    png(
        &root.join("plate/ground_truth/scratch/000_mask.png"),
        5,
        5,
        true,
    );
    png(&root.join("plate/train/good/009.png"), 12, 8, false);
    let o = tessera(&["data", "verify", &s(&root), "--manifest", &m]);
    let out = fails(&o);
    assert!(out.contains("FAILED"), "{out}");
    assert!(
        out.contains("missing mask") && out.contains("widget/ground_truth/crack/001_mask.png"),
        "{out}"
    );
    assert!(
        out.contains("mask size mismatch")
            && out.contains("plate/ground_truth/scratch/000_mask.png")
            && out.contains("5×5"),
        "{out}"
    );
    assert!(
        out.contains("count mismatch") && out.contains("expected 1 images, found 2"),
        "{out}"
    );
    assert!(
        stderr(&o).contains("does not match the Mini manifest"),
        "{}",
        stderr(&o)
    );
    // JSON: the same, machine-readable, and still exit status 1.
    let o = tessera(&["data", "verify", &s(&root), "--manifest", &m, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&fails(&o)).unwrap();
    assert_eq!(v["ok"], false);
    let kinds: Vec<&str> = v["categories"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["issues"].as_array().unwrap())
        .map(|i| i["kind"].as_str().unwrap())
        .collect();
    for k in ["missing_mask", "mask_size_mismatch", "count_mismatch"] {
        assert!(kinds.contains(&k), "{kinds:?}");
    }
}

#[test]
fn missing_category_fails_unless_restricted() {
    let (_t, root, m) = fixture();
    std::fs::remove_dir_all(root.join("plate")).unwrap();
    let out = fails(&tessera(&["data", "verify", &s(&root), "--manifest", &m]));
    assert!(
        out.lines()
            .any(|l| l.starts_with("plate") && l.contains("MISSING")),
        "{out}"
    );
    passes(&tessera(&[
        "data",
        "verify",
        &s(&root),
        "--manifest",
        &m,
        "--categories",
        "widget",
    ]));
}

#[test]
fn bad_arguments_are_clear_errors() {
    let (_t, root, m) = fixture();
    let o = tessera(&[
        "data",
        "verify",
        &s(&root.join("nowhere")),
        "--manifest",
        &m,
    ]);
    fails(&o);
    assert!(stderr(&o).contains("nowhere"), "{}", stderr(&o));
    let o = tessera(&["data", "verify", &s(&root), "--manifest", "no-such.json"]);
    fails(&o);
    assert!(
        stderr(&o).contains("no-such.json") && stderr(&o).contains("mvtec_ad"),
        "{}",
        stderr(&o)
    );
    let o = tessera(&[
        "data",
        "verify",
        &s(&root),
        "--manifest",
        &m,
        "--categories",
        "gizmo",
    ]);
    fails(&o);
    assert!(stderr(&o).contains("gizmo"), "{}", stderr(&o));
    let bad = root.join("bad.json");
    std::fs::write(&bad, "{ not json").unwrap();
    let o = tessera(&["data", "verify", &s(&root), "--manifest", &s(&bad)]);
    fails(&o);
    assert!(stderr(&o).contains("bad.json"), "{}", stderr(&o));
}

#[test]
fn builtin_mtl_manifest_checks_layout_only() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("mtl");
    category(&root.join("Lychee"), 2, 1, &[("scar", 1)]);
    let out = passes(&tessera(&[
        "data",
        "verify",
        &s(&root),
        "--manifest",
        "mtl_ad",
        "--categories",
        "lychee",
    ]));
    assert!(out.contains("ok (layout)") && out.contains("2/?"), "{out}");
}

/// The real MVTec AD folder of this project holds only bottle: bottle ok, the other 14
/// categories missing → exit status 1, unless --categories bottle restricts the check. Uses the
/// built-in manifest from a scratch working directory.
#[test]
fn real_mvtec_ad() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/mvtec_ad");
    if !root.join("bottle").is_dir() {
        eprintln!("skipped: {} is not there", root.display());
        return;
    }
    let root = root.canonicalize().unwrap();
    let out = fails(&tessera(&["data", "verify", &s(&root)]));
    assert!(out.contains("MVTec AD manifest"), "{out}");
    let bottle = out.lines().find(|l| l.starts_with("bottle")).unwrap();
    for cell in ["ok", "209/209", "20/20", "63/63"] {
        assert!(bottle.contains(cell), "{bottle}");
    }
    assert_eq!(
        out.lines().filter(|l| l.contains("MISSING")).count(),
        14,
        "{out}"
    );
    assert!(
        out.contains("1 ok, 0 failed, 14 missing of 15 categories: FAILED"),
        "{out}"
    );

    let o = tessera(&["data", "verify", &s(&root), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&fails(&o)).unwrap();
    let cats = v["categories"].as_array().unwrap();
    assert_eq!(cats.len(), 15);
    for c in cats {
        let want = if c["name"] == "bottle" {
            "ok"
        } else {
            "missing"
        };
        assert_eq!(c["status"], want, "{}", c["name"]);
    }

    let out = passes(&tessera(&[
        "data",
        "verify",
        &s(&root),
        "--categories",
        "bottle",
    ]));
    assert!(
        out.contains("1 ok, 0 failed, 0 missing of 1 category: OK"),
        "{out}"
    );
    passes(&tessera(&["data", "verify", &s(&root.join("bottle"))]));
}
