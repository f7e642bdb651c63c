//! One test per reliability defect found by the bad-input matrix (issue "Reliability"): no
//! command destroys a user's file, NaN never passes, checks come before work, and every error
//! names the file in plain words.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tessera_data::{generate_category, SyntheticSpec};

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .expect("run tessera")
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "tessera failed: {}", stderr(o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A failure with exit code `code` (1: an error, 2: a usage error), no panic; its stderr.
fn fails(o: &Output, code: i32) -> String {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(code), "exit code; stderr: {e}");
    assert!(!e.contains("panicked"), "a panic instead of an error: {e}");
    e
}

fn category(dir: &Path) -> PathBuf {
    let root = dir.join("cat");
    generate_category(
        &root,
        &SyntheticSpec {
            seed: 4,
            size: 64,
            train: 10,
            test_good: 2,
            test_defect: 1,
        },
    )
    .unwrap();
    root
}

/// A small PaDiM model of the category.
fn model(dir: &Path, data: &Path) -> PathBuf {
    let m = dir.join("m.safetensors");
    ok(&tessera(&[
        "--quiet",
        "fit",
        "--data",
        &s(data),
        "--random-weights",
        "1",
        "--preprocess",
        "64x64",
        "--out",
        &s(&m),
    ]));
    m
}

fn fit_args<'a>(data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "fit",
        "--data",
        data,
        "--random-weights",
        "1",
        "--preprocess",
        "64x64",
        "--out",
        out,
    ]
}

#[test]
fn d1_outputs_never_replace_devices_folders_or_links() {
    let tmp = tempfile::tempdir().unwrap();
    let data = category(tmp.path());
    let d = s(&data);
    let e = fails(&tessera(&fit_args(&d, "/dev/null")), 1);
    assert!(e.contains("/dev/null") && e.contains("a device"), "{e}");
    assert!(Path::new("/dev/null").exists());
    let target = tmp.path().join("keep.txt");
    std::fs::write(&target, b"keep").unwrap();
    let link = tmp.path().join("link.safetensors");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let e = fails(&tessera(&fit_args(&d, &s(&link))), 1);
    assert!(e.contains("symbolic link"), "{e}");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    let e = fails(&tessera(&fit_args(&d, &s(tmp.path()))), 1);
    assert!(e.contains("a folder"), "{e}");
}

#[test]
fn d2_outputs_never_overwrite_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = category(tmp.path());
    let m = model(tmp.path(), &data);
    let before = std::fs::read(&m).unwrap();
    // test --report pointing at the model.
    let e = fails(
        &tessera(&[
            "test",
            "--model",
            &s(&m),
            "--data",
            &s(&data),
            "--report",
            &s(&m),
        ]),
        1,
    );
    assert!(e.contains("also an input") && e.contains("--model"), "{e}");
    assert_eq!(std::fs::read(&m).unwrap(), before);
    // predict --out the input folder, or inside it.
    let input = data.join("test/good");
    let images: Vec<Vec<u8>> = std::fs::read_dir(&input)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    for out in [input.clone(), input.join("heat")] {
        let e = fails(
            &tessera(&[
                "predict",
                "--model",
                &s(&m),
                &s(&input),
                "--out",
                &s(&out),
                "--overwrite",
            ]),
            1,
        );
        assert!(e.contains("input"), "{e}");
    }
    let after: Vec<Vec<u8>> = std::fs::read_dir(&input)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(images, after, "input images untouched");
    // fit --out pointing at the --weights file.
    let w = tmp.path().join("w.safetensors");
    std::fs::write(&w, b"not really weights").unwrap();
    let e = fails(
        &tessera(&[
            "fit",
            "--data",
            &s(&data),
            "--weights",
            &s(&w),
            "--out",
            &s(&w),
        ]),
        1,
    );
    assert!(
        e.contains("also an input") && e.contains("--weights"),
        "{e}"
    );
    assert_eq!(std::fs::read(&w).unwrap(), b"not really weights");
}

#[test]
fn d3_d8_predict_mirrors_trees_writes_real_csv_and_never_mixes_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = category(tmp.path());
    let m = model(tmp.path(), &data);
    // A nested tree with names a hand-written CSV would break on, and a 251-byte name.
    let tree = tmp.path().join("line");
    let src = data.join("test/good/000.png");
    let long = format!("{}.png", "n".repeat(247));
    let names = [
        "a,b.png".to_string(),
        "say \"hi\".png".to_string(),
        "cam1/x.png".to_string(),
        "cam1/deep/y,z.png".to_string(),
        format!("cam2/{long}"),
    ];
    for n in &names {
        let p = tree.join(n);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::copy(&src, &p).unwrap();
    }
    let out = tmp.path().join("pred");
    let lines = ok(&tessera(&[
        "--json",
        "predict",
        "--recursive",
        "--model",
        &s(&m),
        &s(&tree),
        "--out",
        &s(&out),
    ]));
    // One JSON line per image, then the summary.
    let objs: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objs.len(), names.len() + 1);
    assert_eq!(objs.last().unwrap()["images"], names.len());
    let mut rd = csv::Reader::from_path(out.join("scores.csv")).unwrap();
    let mut seen = Vec::new();
    for r in rd.records() {
        let r = r.unwrap();
        assert_eq!(r.len(), 6, "{r:?}");
        let input = PathBuf::from(&r[0]);
        let rel = input.strip_prefix(&tree).unwrap().with_extension("png");
        // Heatmaps mirror the input tree.
        assert_eq!(Path::new(&r[5]), rel, "{r:?}");
        assert!(out.join(&r[5]).is_file());
        seen.push(rel);
    }
    seen.sort();
    let mut want: Vec<PathBuf> = names.iter().map(PathBuf::from).collect();
    want.sort();
    assert_eq!(seen, want);
    // A second run into the same folder refuses; with --overwrite it replaces it whole.
    let e = fails(
        &tessera(&["predict", "--model", &s(&m), &s(&src), "--out", &s(&out)]),
        1,
    );
    assert!(e.contains("not empty") && e.contains("--overwrite"), "{e}");
    ok(&tessera(&[
        "--quiet",
        "predict",
        "--model",
        &s(&m),
        &s(&src),
        "--out",
        &s(&out),
        "--overwrite",
    ]));
    let mut left: Vec<String> = walk(&out);
    left.sort();
    assert_eq!(left, vec!["000.png".to_string(), "scores.csv".to_string()]);
    let leftovers: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tsr-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn walk(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(
                walk(&p)
                    .into_iter()
                    .map(|x| format!("{}/{x}", p.file_name().unwrap().to_string_lossy())),
            );
        } else {
            v.push(p.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    v
}

/// Rewrite one tensor of a safetensors file with NaN in its first element.
fn poison(src: &Path, dst: &Path, tensor: &str) {
    let mut t = candle_core::safetensors::load(src, &candle_core::Device::Cpu).unwrap();
    let meta = tessera_core::io::safetensors_metadata(src).unwrap();
    let v = t.remove(tensor).unwrap();
    let mut data: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
    data[0] = f32::NAN;
    let v = candle_core::Tensor::from_vec(data, v.dims(), &candle_core::Device::Cpu).unwrap();
    t.insert(tensor.to_string(), v);
    let items: Vec<(String, candle_core::Tensor)> = t.into_iter().collect();
    tessera_core::io::save_safetensors(dst, &items, meta).unwrap();
}

#[test]
fn d4_nan_never_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = category(tmp.path());
    let m = model(tmp.path(), &data);
    let e = fails(
        &tessera(&[
            "predict",
            "--model",
            &s(&m),
            &s(&data),
            "--out",
            "x",
            "--threshold",
            "nan",
        ]),
        2,
    );
    assert!(e.contains("not a finite number"), "{e}");
    let e = fails(
        &tessera(&[
            "sbm",
            "train",
            "--data",
            &s(&data),
            "--random-weights",
            "0",
            "--out",
            "x",
            "--sbm-lr",
            "nan",
        ]),
        2,
    );
    assert!(e.contains("--sbm-lr"), "{e}");
    // NaN in a weights file: refused, naming the file and the tensor.
    let w = tmp.path().join("w.safetensors");
    let items: Vec<(String, candle_core::Tensor)> = tessera_backbone::random_weights(
        &tessera_backbone::Arch::ResNet18.spec(),
        3,
        0,
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .collect();
    tessera_core::io::save_safetensors(&w, &items, Default::default()).unwrap();
    let bad_w = tmp.path().join("nan-weights.safetensors");
    poison(&w, &bad_w, "layer2.0.conv1.weight");
    let out = s(&tmp.path().join("never.safetensors"));
    let e = fails(
        &tessera(&[
            "fit",
            "--data",
            &s(&data),
            "--weights",
            &s(&bad_w),
            "--out",
            &out,
        ]),
        1,
    );
    assert!(
        e.contains("nan-weights.safetensors")
            && e.contains("layer2.0.conv1.weight")
            && e.contains("non-finite"),
        "{e}"
    );
    // NaN inside a model's statistics: the checksum no longer matches, and the finite check
    // names the tensor even when the checksum is recomputed.
    let bad_m = tmp.path().join("nan-model.safetensors");
    poison(&m, &bad_m, "scorer.mean");
    let e = fails(
        &tessera(&[
            "test",
            "--model",
            &s(&bad_m),
            "--data",
            &s(&data),
            "--report",
            &s(&tmp.path().join("r.json")),
        ]),
        1,
    );
    assert!(
        e.contains("nan-model.safetensors") && e.contains("scorer.mean"),
        "{e}"
    );
}

#[test]
fn d5_outputs_are_checked_before_any_work_and_said_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = category(tmp.path());
    let ro = tmp.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let out = ro.join("m.safetensors");
    // A file where a folder should be: fails at once, before features are computed.
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let start = std::time::Instant::now();
    let e = fails(
        &tessera(&fit_args(&s(&data), &s(&blocker.join("m.safetensors")))),
        1,
    );
    assert!(e.contains("is a file, not a folder"), "{e}");
    assert_eq!(e.matches("m.safetensors").count(), 1, "said once: {e}");
    assert!(!e.contains("os error"), "{e}");
    assert!(start.elapsed().as_secs() < 20);
    // Read-only folder (where permission bits bite: not as root).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::write(ro.join("probe"), b"").is_err() {
        let e = fails(&tessera(&fit_args(&s(&data), &s(&out))), 1);
        assert!(e.contains("cannot be written"), "{e}");
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn d6_verify_decodes_images_and_checks_mask_values() {
    let tmp = tempfile::tempdir().unwrap();
    let data = category(tmp.path());
    // Truncate a training image after its header, and turn a mask into a 0/1 mask.
    let img = data.join("train/good/003.png");
    let bytes = std::fs::read(&img).unwrap();
    std::fs::write(&img, &bytes[..bytes.len() / 2]).unwrap();
    let mask = data.join("ground_truth/crack/000_mask.png");
    let m = image::open(&mask).unwrap().to_luma8();
    let m01 = image::GrayImage::from_fn(m.width(), m.height(), |x, y| {
        image::Luma([(m.get_pixel(x, y)[0] > 127) as u8])
    });
    m01.save(&mask).unwrap();
    let manifest = tmp.path().join("manifest.json");
    std::fs::write(
        &manifest,
        r#"{"name": "t", "categories": {"cat": {"kind": "object", "train_good": 10, "test_good": 2,
            "defects": {"crack": 1, "scratch": 1, "spot": 1}}}}"#,
    )
    .unwrap();
    let out = tessera(&["data", "verify", &s(&data), "--manifest", &s(&manifest)]);
    let text = String::from_utf8_lossy(&out.stdout);
    fails(&out, 1);
    assert!(
        text.contains("003.png") && text.contains("cannot decode"),
        "{text}"
    );
    assert!(
        text.contains("000_mask.png") && text.contains("0/1 mask"),
        "{text}"
    );
    // test says so too, and still reads the mask's defect (no silent "n/a").
    std::fs::write(&img, &bytes).unwrap();
    let m = model(tmp.path(), &data);
    let r = tmp.path().join("r.json");
    let out = tessera(&[
        "--json",
        "test",
        "--model",
        &s(&m),
        "--data",
        &s(&data),
        "--report",
        &s(&r),
    ]);
    let rep: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert!(stderr(&out).contains("not 0/255"), "{}", stderr(&out));
    assert!(rep["per_type"]["crack"]["pixel_auroc"].is_number(), "{rep}");
}

#[test]
fn d7_absurd_sizes_are_refused_up_front() {
    let tmp = tempfile::tempdir().unwrap();
    let data = category(tmp.path());
    let out = s(&tmp.path().join("m.safetensors"));
    let d = s(&data);
    let mut a = fit_args(&d, &out);
    a.extend(["--scorer", "patchcore", "--patchcore-dim", "100000"]);
    let e = fails(&tessera(&a), 1);
    assert!(e.contains("100000") && e.contains("384"), "{e}");
    let mut a = fit_args(&d, &out);
    a.extend(["--padim-dims", "100000"]);
    let e = fails(&tessera(&a), 1);
    assert!(e.contains("100000") && e.contains("448"), "{e}");
    // A memory estimate far above this machine: refused before any image is read.
    let e = fails(
        &tessera(&[
            "fit",
            "--data",
            &d,
            "--random-weights",
            "1",
            "--preprocess",
            "8192x8192",
            "--out",
            &out,
        ]),
        1,
    );
    assert!(e.contains("GiB") && e.contains("available"), "{e}");
    assert!(!Path::new(&out).exists());
}

#[test]
fn d9_messages_say_what_is_wrong_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = category(tmp.path());
    let file = data.join("train/good/000.png");
    // A file where a folder is expected.
    let e = fails(
        &tessera(&fit_args(&s(&file), &s(&tmp.path().join("m.safetensors")))),
        1,
    );
    assert!(e.contains("is a file, not a folder"), "{e}");
    // A missing file: the message once, no "(os error N)".
    let e = fails(
        &tessera(&[
            "test",
            "--model",
            &s(&tmp.path().join("nope.safetensors")),
            "--data",
            &s(&data),
            "--report",
            &s(&tmp.path().join("r.json")),
        ]),
        1,
    );
    assert!(!e.contains("os error"), "{e}");
    assert_eq!(e.matches("no such file").count(), 1, "{e}");
    // Bad model metadata names the model file.
    let m = model(tmp.path(), &data);
    let meta = tessera_core::io::safetensors_metadata(&m).unwrap();
    let t = candle_core::safetensors::load(&m, &candle_core::Device::Cpu).unwrap();
    let mut meta2 = meta.clone();
    let json = meta["tessera"].replace("\"padim\"", "\"nonsense\"");
    meta2.insert("tessera".into(), json);
    let bad = tmp.path().join("bad-meta.safetensors");
    let items: Vec<(String, candle_core::Tensor)> = t.into_iter().collect();
    tessera_core::io::save_safetensors(&bad, &items, meta2).unwrap();
    let e = fails(
        &tessera(&[
            "test",
            "--model",
            &s(&bad),
            "--data",
            &s(&data),
            "--report",
            &s(&tmp.path().join("r.json")),
        ]),
        1,
    );
    assert!(
        e.contains("bad-meta.safetensors") && e.contains("metadata"),
        "{e}"
    );
    // An SBM setting that cannot work is said in the option's words.
    let e = fails(
        &tessera(&[
            "sbm",
            "train",
            "--data",
            &s(&data),
            "--random-weights",
            "0",
            "--out",
            "x",
            "--sbm-permutations",
            "0",
        ]),
        2,
    );
    assert!(e.contains("--sbm-permutations"), "{e}");
}
