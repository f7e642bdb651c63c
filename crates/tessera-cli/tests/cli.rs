//! The `tessera` binary end to end on a small synthetic category, and its error handling.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tessera_data::{generate_category, SyntheticSpec};

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .expect("run tessera")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "tessera failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(out: &Output) -> String {
    assert!(!out.status.success(), "expected failure, got success");
    assert_eq!(out.status.code(), Some(1), "error exit code");
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!e.contains("panicked"), "panic instead of an error: {e}");
    e
}

/// `tessera --json test` on a model and dataset; the printed report.
fn test_json(model: &Path, data: &Path, report: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&run_test(model, data, report, &[]))).unwrap()
}

/// `tessera --json test` with `extra` arguments.
fn run_test(model: &Path, data: &Path, report: &Path, extra: &[&str]) -> Output {
    let (m, d, r) = (
        model.display().to_string(),
        data.display().to_string(),
        report.display().to_string(),
    );
    let mut args = vec![
        "--json", "test", "--model", &m, "--data", &d, "--report", &r,
    ];
    args.extend(extra);
    tessera(&args)
}

fn category(dir: &Path) -> PathBuf {
    let root = dir.join("disk");
    let spec = SyntheticSpec {
        seed: 3,
        size: 128,
        train: 10,
        test_good: 4,
        test_defect: 2,
    };
    generate_category(&root, &spec).unwrap();
    root
}

#[test]
fn fit_test_predict_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let data = category(tmp.path());
    let model = tmp.path().join("m.safetensors");
    let s = |p: &Path| p.display().to_string();
    let out = ok(&tessera(&[
        "--json",
        "fit",
        "--data",
        &s(&data),
        "--random-weights",
        "1",
        "--seed",
        "5",
        "--out",
        &s(&model),
        "--batch-size",
        "4",
    ]));
    let fit: serde_json::Value = serde_json::from_str(&out).unwrap();
    // 20 % of the 10 training images are held out for calibration, never fitted on.
    assert_eq!(
        (fit["images"].as_u64(), fit["calibration_images"].as_u64()),
        (Some(8), Some(2))
    );
    assert!(model.is_file());
    // The default PaDiM on ResNet-18 features: every channel, shared covariances, and says so.
    let r = &fit["scorer_report"];
    assert_eq!(
        (
            r["channels"].as_u64(),
            r["dims"].as_u64(),
            r["tie"].as_u64()
        ),
        (Some(448), Some(448), Some(4))
    );
    assert_eq!(r["random_choice"], false);
    assert!(r["summary"].as_str().unwrap().contains("nothing random"));

    let report = tmp.path().join("r/report.json");
    let heat = tmp.path().join("heat");
    let out = ok(&tessera(&[
        "--json",
        "test",
        "--model",
        &s(&model),
        "--data",
        &s(&data),
        "--report",
        &s(&report),
        "--heatmaps",
        &s(&heat),
    ]));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r, serde_json::from_str::<serde_json::Value>(&out).unwrap());
    for k in ["image_auroc", "pixel_auroc"] {
        let v = r[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    // Even a random backbone separates these synthetic defects from normal images.
    assert!(
        r["pixel_auroc"].as_f64().unwrap() > 0.8,
        "pixel AUROC {}",
        r["pixel_auroc"]
    );
    assert_eq!(r["counts"]["images"], 10);
    assert!(r["fit_seconds"].as_f64().unwrap() > 0.0 && r["ms_per_image"].as_f64().unwrap() > 0.0);
    assert!(r["per_type"]["crack"]["image_auroc"].is_number());
    assert!(report.with_extension("md").is_file());
    assert!(heat.join("spot/001.png").is_file() && heat.join("good/000.png").is_file());
    // bf16 products: on a CPU with AVX512-BF16 the report says so and the ranking stays within
    // rounding; elsewhere the run is f32 and the user is told.
    let r16 = tmp.path().join("r16.json");
    let out = run_test(&model, &data, &r16, &["--precision", "bf16"]);
    ok(&out);
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&r16).unwrap()).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if tessera_pipeline::bf16_supported() {
        assert!(
            b["backbone"].as_str().unwrap().contains("bf16 products"),
            "{b}"
        );
        for k in ["image_auroc", "pixel_auroc"] {
            let (x, y) = (b[k].as_f64().unwrap(), r[k].as_f64().unwrap());
            assert!((x - y).abs() <= 5e-3, "{k}: bf16 {x} vs f32 {y}");
        }
    } else {
        assert!(stderr.contains("no native bf16"), "{stderr}");
        assert_eq!(b["image_auroc"], r["image_auroc"]);
    }
    // Σ⁻¹ stored in f16: a smaller file, the same ranking to within rounding.
    let m16 = tmp.path().join("m16.safetensors");
    ok(&tessera(&[
        "--quiet",
        "fit",
        "--data",
        &s(&data),
        "--random-weights",
        "1",
        "--seed",
        "5",
        "--out",
        &s(&m16),
        "--batch-size",
        "4",
        "--padim-cov-dtype",
        "f16",
    ]));
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert!(
        size(&m16) < size(&model) * 3 / 4,
        "{} vs {}",
        size(&m16),
        size(&model)
    );
    let r16 = test_json(&m16, &data, &tmp.path().join("r16.json"));
    for k in ["image_auroc", "pixel_auroc"] {
        let (a, b) = (r16[k].as_f64().unwrap(), r[k].as_f64().unwrap());
        assert!((a - b).abs() < 1e-3, "{k}: f16 {a} vs f32 {b}");
    }
    // A PatchCore search option on a PaDiM model is an error naming the model.
    let out = tessera(&[
        "test",
        "--model",
        &s(&model),
        "--data",
        &s(&data),
        "--report",
        &s(&tmp.path().join("r2.json")),
        "--patchcore-search",
        "brute",
    ]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("m.safetensors") && e.contains("padim"),
        "{e}"
    );
    // The operating point at the model's own threshold is reported, with every image's call.
    let op = &r["operating_point"]["image"];
    let counted = ["tp", "fp", "tn", "fn_"]
        .iter()
        .map(|k| op[*k].as_u64().unwrap())
        .sum::<u64>();
    assert_eq!(counted, 10);
    assert!(r["images"][0]["anomalous"].is_boolean() && r["images"][0]["p_value"].is_number());
    // A Fig.-5 gallery from two runs' heatmaps (here the same run twice): 6 tiles per row.
    let gal = tmp.path().join("gallery.png");
    ok(&tessera(&[
        "--quiet",
        "gallery",
        "--heatmaps",
        &s(&heat),
        "--heatmaps",
        &s(&heat),
        "--rows",
        "2",
        "--out",
        &s(&gal),
    ]));
    let g = image::open(&gal).unwrap();
    assert_eq!((g.width(), g.height()), (6 * 224 + 5 * 4, 2 * 224 + 4));

    // predict scores exactly like test: same model file, same code path.
    let pred = tmp.path().join("pred");
    ok(&tessera(&[
        "--quiet",
        "predict",
        "--model",
        &s(&model),
        &s(&data.join("test/spot")),
        "--out",
        &s(&pred),
    ]));
    let mut rd = csv::Reader::from_path(pred.join("scores.csv")).unwrap();
    let head = rd.headers().unwrap().clone();
    assert_eq!(
        head.iter().collect::<Vec<_>>(),
        [
            "path",
            "score",
            "normalized",
            "p_value",
            "anomalous",
            "heatmap"
        ]
    );
    let rows: Vec<csv::StringRecord> = rd.records().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), 2);
    for f in rows {
        let name = format!(
            "spot/{}",
            Path::new(&f[0]).file_name().unwrap().to_string_lossy()
        );
        let want = r["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name.as_str())
            .unwrap();
        let got: f64 = f[1].parse().unwrap();
        assert!(
            (got - want["score"].as_f64().unwrap()).abs() < 1e-6,
            "{name}: {got} vs {}",
            want["score"]
        );
        assert!(pred.join(&f[5]).is_file());
    }

    // The same seed gives the same model scores.
    let model2 = tmp.path().join("m2.safetensors");
    ok(&tessera(&[
        "--quiet",
        "fit",
        "--data",
        &s(&data),
        "--random-weights",
        "1",
        "--seed",
        "5",
        "--out",
        &s(&model2),
        "--batch-size",
        "3",
    ]));
    let report2 = tmp.path().join("r2.json");
    ok(&tessera(&[
        "--quiet",
        "test",
        "--model",
        &s(&model2),
        "--data",
        &s(&data),
        "--report",
        &s(&report2),
    ]));
    let r2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report2).unwrap()).unwrap();
    assert_eq!(r["image_auroc"], r2["image_auroc"]);
    assert_eq!(r["pixel_auroc"], r2["pixel_auroc"]);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let s = |p: &Path| p.display().to_string();
    let model = tmp.path().join("m.safetensors");

    let e = fails(&tessera(&[
        "fit",
        "--data",
        "/no/such/dataset",
        "--random-weights",
        "0",
        "--out",
        &s(&model),
    ]));
    assert!(
        e.contains("/no/such/dataset") && e.contains("does not exist"),
        "{e}"
    );

    let data = category(tmp.path());
    std::fs::write(data.join("train/good/004.png"), b"not a png").unwrap();
    let e = fails(&tessera(&[
        "fit",
        "--data",
        &s(&data),
        "--random-weights",
        "0",
        "--out",
        &s(&model),
    ]));
    assert!(
        e.contains("train/good/004.png") && e.contains("cannot decode"),
        "{e}"
    );
    assert!(
        !model.exists(),
        "no model may be written after a failed fit"
    );

    let bad_w = tmp.path().join("w.safetensors");
    let t = candle_core::Tensor::zeros((3, 3), candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("conv1.weight".to_string(), t)]),
        &bad_w,
    )
    .unwrap();
    let e = fails(&tessera(&[
        "fit",
        "--data",
        &s(&data),
        "--weights",
        &s(&bad_w),
        "--out",
        &s(&model),
    ]));
    assert!(
        e.contains("w.safetensors") && e.contains("conv1.weight") && e.contains("wrong shape"),
        "{e}"
    );

    let e = fails(&tessera(&[
        "test",
        "--model",
        &s(&bad_w),
        "--data",
        &s(&data),
        "--report",
        "/tmp/x.json",
    ]));
    assert!(
        e.contains("w.safetensors") && e.contains("not a Tessera model"),
        "{e}"
    );

    let e = fails(&tessera(&[
        "fit",
        "--data",
        &s(&data),
        "--random-weights",
        "0",
        "--out",
        &s(&model),
        "--device",
        "cuda:0",
    ]));
    assert!(e.contains("cuda:0"), "{e}");

    let e = fails(&tessera(&[
        "predict",
        "--model",
        &s(&model),
        "/no/image.png",
        "--out",
        &s(tmp.path()),
    ]));
    assert!(e.contains("m.safetensors"), "{e}");

    // A bad device name is a usage error (exit 2) from the argument parser.
    let out = tessera(&["fit", "--data", "x", "--out", "y", "--device", "tpu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown device 'tpu'"));
}

#[test]
fn patchcore_fit_test_predict_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let data = category(tmp.path());
    let s = |p: &Path| p.display().to_string();
    let model = tmp.path().join("pc.safetensors");
    let out = ok(&tessera(&[
        "--json",
        "fit",
        "--scorer",
        "patchcore",
        "--coreset-ratio",
        "0.05",
        "--bank-dtype",
        "f16",
        "--data",
        &s(&data),
        "--random-weights",
        "2",
        "--out",
        &s(&model),
    ]));
    let fit: serde_json::Value = serde_json::from_str(&out).unwrap();
    // 8 images (2 of 10 held out for calibration) × 28 × 28 patches at 224 px, 5 % kept.
    assert_eq!(fit["scorer_report"]["patches"], 6272);
    assert_eq!(fit["scorer_report"]["bank"], 314);
    let report = tmp.path().join("pc.json");
    let r = test_json(&model, &data, &report);
    assert!(
        r["pixel_auroc"].as_f64().unwrap() > 0.8,
        "pixel AUROC {}",
        r["pixel_auroc"]
    );
    let pred = tmp.path().join("pred");
    ok(&tessera(&[
        "--quiet",
        "predict",
        "--model",
        &s(&model),
        &s(&data.join("test/crack/000.png")),
        "--out",
        &s(&pred),
    ]));
    let csv = std::fs::read_to_string(pred.join("scores.csv")).unwrap();
    let score: f64 = csv
        .lines()
        .nth(1)
        .unwrap()
        .split(',')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let want = r["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "crack/000.png")
        .unwrap();
    assert!((score - want["score"].as_f64().unwrap()).abs() < 1e-6);

    // The model searched its bank exactly (the default); brute force scores the same, the
    // approximate search with every cluster too, a bad search is a usage error.
    assert_eq!(fit["scorer_report"]["search"], "exact");
    assert_eq!(fit["scorer_report"]["clusters"], 18); // ≈ √314
    for search in ["brute", "approx:18", "approx:1"] {
        let rep = tmp.path().join(format!("pc-{search}.json"));
        let out = ok(&tessera(&[
            "--json",
            "test",
            "--model",
            &s(&model),
            "--data",
            &s(&data),
            "--report",
            &s(&rep),
            "--patchcore-search",
            search,
        ]));
        let o: serde_json::Value = serde_json::from_str(&out).unwrap();
        let (a, b) = (
            o["pixel_auroc"].as_f64().unwrap(),
            r["pixel_auroc"].as_f64().unwrap(),
        );
        if search == "approx:1" {
            assert!((a - b).abs() < 0.05, "{search}: {a} vs {b}");
        } else {
            assert!((a - b).abs() < 1e-6, "{search}: {a} vs {b}");
        }
    }
    let out = tessera(&[
        "test",
        "--model",
        &s(&model),
        "--data",
        &s(&data),
        "--report",
        &s(&report),
        "--patchcore-search",
        "approx:0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("approx:P"));

    // An impossible option value is a usage error (exit 2), caught before any work.
    let out = tessera(&[
        "fit",
        "--scorer",
        "patchcore",
        "--coreset-ratio",
        "0",
        "--data",
        &s(&data),
        "--random-weights",
        "2",
        "--out",
        &s(&model),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("--coreset-ratio") && e.contains("not in (0, 1]"),
        "{e}"
    );
}

#[test]
fn cfa_trains_and_scores_through_the_model_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = category(tmp.path());
    let s = |p: &Path| p.display().to_string();
    let model = tmp.path().join("cfa.safetensors");
    let out = ok(&tessera(&[
        "--json",
        "fit",
        "--scorer",
        "cfa",
        "--epochs",
        "3",
        "--data",
        &s(&data),
        "--random-weights",
        "4",
        "--seed",
        "9",
        "--out",
        &s(&model),
    ]));
    let fit: serde_json::Value = serde_json::from_str(&out).unwrap();
    let epochs = fit["scorer_report"]["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 3);
    assert!(epochs
        .iter()
        .all(|e| e["loss"].as_f64().unwrap().is_finite()));
    let report = tmp.path().join("cfa.json");
    let r = test_json(&model, &data, &report);
    assert!(
        r["pixel_auroc"].as_f64().unwrap() > 0.8,
        "pixel AUROC {}",
        r["pixel_auroc"]
    );
    assert_eq!(r["scorer"], "cfa");
}

/// The calibration hold-out is drawn by `--split-seed` (default 0), not by `--seed`; and the
/// default PaDiM (every channel, shared covariances) has no random choice: two fit seeds
/// then give the same model and calibrate on the same scores, and only another split seed
/// holds out other images.
#[test]
fn split_seed_fixes_the_calibration_images() {
    let tmp = tempfile::tempdir().unwrap();
    let data = category(tmp.path());
    let s = |p: &Path| p.display().to_string();
    let fit = |seed: &str, split: Option<&str>| {
        let model = tmp
            .path()
            .join(format!("m{seed}{}.safetensors", split.unwrap_or("")));
        let mut args = vec![
            "--quiet".to_string(),
            "fit".into(),
            "--data".into(),
            s(&data),
            "--random-weights".into(),
            "1".into(),
            "--seed".into(),
            seed.into(),
            "--out".into(),
            s(&model),
        ];
        if let Some(v) = split {
            args.extend(["--split-seed".to_string(), v.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&tessera(&args));
        tessera_core::model::ModelFile::read_meta(&model).unwrap()["calibration"].clone()
    };
    let (a, b) = (fit("5", None), fit("6", None));
    assert_eq!(a["scores"], b["scores"]);
    assert_eq!(
        (a["seed"].as_u64(), a["split_seed"].as_u64()),
        (Some(5), Some(0))
    );
    let c = fit("5", Some("2"));
    assert_ne!(a["scores"], c["scores"]);
    assert_eq!(c["split_seed"].as_u64(), Some(2));
    // Recorded only when it differs from the fit's seed.
    assert!(fit("0", None)["split_seed"].is_null());
}
