//! `tessera sbm train`, `fit --method sbm` and `tessera synth` end to end on a small synthetic
//! category (random backbone: these check behaviour, not accuracy).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tessera_data::{generate_category, SyntheticSpec};

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .expect("run tessera")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn category(dir: &Path) -> PathBuf {
    let root = dir.join("ring");
    let spec = SyntheticSpec {
        seed: 4,
        size: 96,
        train: 14,
        test_good: 2,
        test_defect: 1,
    };
    generate_category(&root, &spec).unwrap();
    root
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// SBM settings under which the jigsaw cannot be learned: head learning rate ~0 and a frozen
/// backbone.
const UNLEARNABLE: [&str; 10] = [
    "--sbm-epochs",
    "1",
    "--sbm-grid",
    "2",
    "--sbm-permutations",
    "5",
    "--sbm-lr",
    "0",
    "--sbm-head-lr",
    "1e-12",
];

/// `tessera HEAD… --data DATA --random-weights 1 EXTRA… --out OUT` with [`UNLEARNABLE`].
fn run_unlearnable(head: &[&str], data: &Path, extra: &[&str], out: &Path) -> Output {
    let (d, o) = (s(data), s(out));
    let mut args = head.to_vec();
    args.extend(["--data", &d, "--random-weights", "1"]);
    args.extend(extra);
    args.extend(["--out", &o]);
    args.extend(UNLEARNABLE);
    tessera(&args)
}

#[test]
fn a_run_that_did_not_learn_is_written_flagged_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = category(dir.path());
    let tuned = dir.path().join("tuned.safetensors");
    let out = run_unlearnable(
        &["--json", "sbm", "train"],
        &data,
        &["--preprocess", "anomalib"],
        &tuned,
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("did NOT learn"), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["report"]["gate"]["passed"], false);
    assert_eq!(summary["report"]["history"].as_array().unwrap().len(), 1);
    assert!(tuned.is_file(), "the tuned file is kept for inspection");
    assert!(
        !tessera_pipeline::checkpoint_path(&tuned).exists(),
        "checkpoint removed after success"
    );

    // fit refuses it, naming the file; --sbm-force accepts it; the model records the gate.
    let model = dir.path().join("m.safetensors");
    let fit = |force: bool| {
        let mut a = vec![
            "--quiet".to_string(),
            "fit".into(),
            "--data".into(),
            s(&data),
            "--preprocess".into(),
            "anomalib".into(),
            "--method".into(),
            "sbm".into(),
            "--sbm-weights".into(),
            s(&tuned),
            "--out".into(),
            s(&model),
        ];
        if force {
            a.push("--sbm-force".into());
        }
        tessera(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let refused = fit(false);
    assert_eq!(refused.status.code(), Some(1));
    let e = stderr(&refused);
    assert!(
        e.contains("tuned.safetensors") && e.contains("did not learn"),
        "{e}"
    );
    assert!(!model.exists());
    let forced = fit(true);
    assert!(forced.status.success(), "{}", stderr(&forced));
    // No pretrained weights to fit a baseline with (no network here): the gate is skipped, and
    // the user told so.
    assert!(
        stderr(&forced).contains("method gate skipped"),
        "{}",
        stderr(&forced)
    );
    let meta = tessera_core::model::ModelFile::read_meta(&model).unwrap();
    assert_eq!(meta["method"], "sbm");
    assert_eq!(meta["sbm"]["gate"]["passed"], false);
}

/// A category Tessera has no name for, made of seeded noise images (a texture: alike
/// everywhere in the frame), in MVTec layout.
fn noise_category(dir: &Path) -> PathBuf {
    noise_images(&dir.join("speckle"), |_| (64, 64))
}

/// Ten seeded grey-noise images under `root` in MVTec layout (8 training, 2 good test), image
/// `i` of size `size(i)` (width, height).
fn noise_images(root: &Path, size: impl Fn(u32) -> (u32, u32)) -> PathBuf {
    use rand::{Rng, SeedableRng};
    let good = root.join("train/good");
    std::fs::create_dir_all(&good).unwrap();
    let test = root.join("test/good");
    std::fs::create_dir_all(&test).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for i in 0..10 {
        let (w, h) = size(i);
        let img = image::RgbImage::from_fn(w, h, |_, _| {
            let v: u8 = rng.random_range(60..200);
            image::Rgb([v, v, v])
        });
        let dir = if i < 8 { &good } else { &test };
        img.save(dir.join(format!("{i:03}.png"))).unwrap();
    }
    root.to_path_buf()
}

/// `--sbm auto` on a category outside MVTec AD's name list decides texture or object from the
/// images and says why: the ring demo is an object, a noise surface a texture (SBM skipped).
#[test]
fn sbm_auto_decides_the_kind_from_the_images_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let data = category(dir.path());
    let info = |d: &Path| {
        let out = tessera(&["--json", "data", "info", &s(d)]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let ring = info(&data);
    assert_eq!(ring["kind"], "object", "{ring}");
    assert!(
        ring["kind_reason"].as_str().is_some_and(
            |r| r.contains("judged from its images: object") && r.contains("contrast spread")
        ),
        "{ring}"
    );
    let noise = noise_category(dir.path());
    let tex = info(&noise);
    assert_eq!(tex["kind"], "texture", "{tex}");
    let model = dir.path().join("m.safetensors");
    let out = tessera(&[
        "fit",
        "--data",
        &s(&noise),
        "--random-weights",
        "1",
        "--preprocess",
        "anomalib",
        "--method",
        "sbm",
        "--out",
        &s(&model),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("sbm: skipped") && e.contains("judged from its images: texture (8 images"),
        "{e}"
    );
    let meta = tessera_core::model::ModelFile::read_meta(&model).unwrap();
    assert_eq!(meta["sbm"]["applied"], false);
    // --sbm-weights without --method sbm is a usage error, not silently ignored.
    let bad = tessera(&[
        "fit",
        "--data",
        &s(&data),
        "--random-weights",
        "1",
        "--sbm-weights",
        "x.safetensors",
        "--out",
        &s(&model),
    ]);
    assert!(stderr(&bad).contains("--method sbm"), "{}", stderr(&bad));
}

#[test]
fn synth_writes_images_and_masks_in_mvtec_layout() {
    let dir = tempfile::tempdir().unwrap();
    let data = category(dir.path());
    let out_dir = dir.path().join("synth");
    let out = tessera(&[
        "--json",
        "synth",
        "--data",
        &s(&data),
        "--count",
        "5",
        "--out",
        &s(&out_dir),
        "--seed",
        "3",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["count"], 5);
    let images = std::fs::read_dir(out_dir.join("test/synthetic"))
        .unwrap()
        .count();
    let masks = std::fs::read_dir(out_dir.join("ground_truth/synthetic"))
        .unwrap()
        .count();
    assert_eq!((images, masks), (5, 5));
    // A missing category is an error naming it.
    let bad = tessera(&[
        "synth",
        "--data",
        &s(&dir.path().join("nope")),
        "--out",
        &s(&out_dir),
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("nope"), "{}", stderr(&bad));
}

/// An SBM + PFAM weights file made with the library at 64 px (fast; PFAM's weights do not
/// depend on the input size), for the CLI's `--method ours` path.
fn ours_weights(data: &Path, out: &Path) {
    use tessera_core::model::Preprocess;
    let pre = Preprocess::square(64, 64);
    let ds = tessera_data::Dataset::open(data).unwrap();
    let images = ds
        .train()
        .unwrap()
        .iter()
        .map(|s| tessera_data::load_image(&s.path, &pre).unwrap().display)
        .collect();
    let bb = tessera_backbone::Backbone::load(
        tessera_backbone::Arch::ResNet18,
        &tessera_backbone::WeightsSource::Random { seed: 1 },
        3,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let cfg = tessera_sbm::SbmConfig {
        grid: 2,
        permutations: 5,
        eval_perms: 5,
        epochs: 1,
        holdout: 0.2,
        train_layers: vec![],
        pfam: Some(Default::default()),
        ..Default::default()
    };
    let data = tessera_sbm::SbmData {
        images,
        preprocess: pre,
        synth: None,
        source: "random".into(),
    };
    let o = tessera_sbm::train(&cfg, &bb, &data, None, &|_| {}).unwrap();
    o.save(out).unwrap();
}

#[test]
fn method_ours_applies_pfam_from_the_model_and_cfa_can_train_it_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let data = category(dir.path());
    let w = dir.path().join("ours.safetensors");
    ours_weights(&data, &w);
    let fit = |scorer: &str, extra: &[&str], model: &Path| {
        let mut a = vec![
            "--quiet",
            "fit",
            "--data",
            &s(&data),
            "--preprocess",
            "anomalib",
            "--method",
            "ours",
            "--sbm-weights",
            &s(&w),
            "--sbm-force",
            "--scorer",
            scorer,
            "--out",
            &s(model),
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        a.extend(extra.iter().map(|x| x.to_string()));
        let out = tessera(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "{}", stderr(&out));
    };
    let load =
        |p: &Path| tessera_core::model::ModelFile::load(p, &candle_core::Device::Cpu).unwrap();
    // The method gate would keep whichever model scores better on synthetic defects: off here,
    // this test is about PFAM's path (the gate has its own test).
    let m1 = dir.path().join("padim.safetensors");
    fit("padim", &["--method-gate", "off"], &m1);
    let f1 = load(&m1);
    assert_eq!(f1.meta["method"], "ours");
    assert!(f1.meta["pfam"].is_object());
    let stored = candle_core::safetensors::load(&w, &candle_core::Device::Cpu).unwrap();
    let key = "pfam.x1_conv.weight";
    let same = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    assert!(
        same(&f1.tensors[key], &stored[key]),
        "PFAM stored as trained by SBM"
    );
    // test loads PFAM from the model file and scores through it.
    let report = dir.path().join("r.json");
    let out = tessera(&[
        "--quiet",
        "test",
        "--model",
        &s(&m1),
        "--data",
        &s(&data),
        "--report",
        &s(&report),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // CFA end to end: PFAM keeps training with CFA's loss and the model stores the new PFAM.
    let m2 = dir.path().join("cfa.safetensors");
    fit(
        "cfa",
        &[
            "--pfam-train",
            "cfa",
            "--epochs",
            "2",
            "--method-gate",
            "off",
        ],
        &m2,
    );
    let f2 = load(&m2);
    assert!(
        !same(&f2.tensors[key], &stored[key]),
        "PFAM trained further by CFA"
    );
    // --pfam-train cfa is refused with another scorer.
    let bad = tessera(&[
        "fit",
        "--data",
        &s(&data),
        "--preprocess",
        "anomalib",
        "--method",
        "ours",
        "--sbm-weights",
        &s(&w),
        "--sbm-force",
        "--pfam-train",
        "cfa",
        "--out",
        &s(&m2),
    ]);
    assert!(stderr(&bad).contains("--scorer cfa"), "{}", stderr(&bad));
}

/// `fit --method sbm|ours` whose jigsaw cannot be learned falls back to the baseline instead of
/// failing, says so, and records it; the explicit `--sbm-weights` path still refuses.
#[test]
fn fit_falls_back_to_the_baseline_when_the_jigsaw_is_not_learned() {
    let dir = tempfile::tempdir().unwrap();
    let data = category(dir.path());
    for method in ["sbm", "ours"] {
        let model = dir.path().join(format!("{method}.safetensors"));
        let out = run_unlearnable(
            &["--json", "fit"],
            &data,
            &[
                "--preprocess",
                "anomalib",
                "--method",
                method,
                "--sbm",
                "on",
            ],
            &model,
        );
        let e = stderr(&out);
        assert!(out.status.success(), "{method}: {e}");
        assert!(
            e.contains("the jigsaw was not learned") && e.contains("falling back"),
            "{method}: {e}"
        );
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(summary["method"], "baseline", "{summary}");
        let meta = tessera_core::model::ModelFile::read_meta(&model).unwrap();
        assert_eq!(meta["method"], "baseline");
        assert_eq!(meta["sbm"]["applied"], false);
        assert_eq!(meta["sbm"]["gate"]["passed"], false);
        assert!(meta["pfam"].is_null(), "no PFAM after the fallback: {meta}");
        assert!(meta["sbm"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("fell back")));
    }
}

/// `fit --method ours` fits the baseline too, scores both on the held-out normals + synthetic
/// defects, keeps the better one, and records both numbers; the model is the one kept.
#[test]
fn the_method_gate_keeps_the_better_model_and_records_both() {
    let dir = tempfile::tempdir().unwrap();
    let data = category(dir.path());
    let w = dir.path().join("ours.safetensors");
    ours_weights(&data, &w);
    let fit = |model: &Path, extra: &[&str]| {
        let (d, ws, m) = (s(&data), s(&w), s(model));
        let mut args = vec![
            "--json",
            "fit",
            "--data",
            &d,
            "--preprocess",
            "anomalib",
            "--method",
            "ours",
            "--sbm-weights",
            &ws,
            "--sbm-force",
            // The backbone the SBM file started from: the baseline the gate compares with.
            "--random-weights",
            "1",
            "--out",
            &m,
        ];
        args.extend(extra);
        let out = tessera(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (summary, stderr(&out))
    };
    let gated = dir.path().join("gated.safetensors");
    let (summary, err) = fit(&gated, &[]);
    let gate = &summary["gate"];
    assert!(gate.is_object(), "{summary}");
    let value = |g: &serde_json::Value| {
        let (i, p) = (
            g["image_auroc"].as_f64().unwrap(),
            g["pixel_auroc"].as_f64().unwrap(),
        );
        assert!((0.0..=1.0).contains(&i) && (0.0..=1.0).contains(&p), "{g}");
        (i + p) / 2.0
    };
    let (b, m) = (value(&gate["baseline"]), value(&gate["method"]));
    // The method must lead by more than the evidence's noise (a paired bootstrap margin).
    let margin = gate["margin"].as_f64().unwrap();
    assert!(margin.is_finite() && margin >= 0.0, "{gate}");
    let kept = if m - b > margin { "ours" } else { "baseline" };
    assert_eq!(gate["kept"], kept, "{gate}");
    assert_eq!(gate["choice"], kept);
    // Keeping the baseline against the request is a warning (shown even with --json).
    assert_eq!(err.contains("method gate:"), kept == "baseline", "{err}");
    assert!(gate["reason"].as_str().unwrap().contains("kept"), "{gate}");
    assert_eq!(summary["method"], kept);
    // 14 training images, 20 % held out: 3 normals and a synthetic defect on each.
    assert_eq!(
        (gate["normals"].as_u64(), gate["synthetic"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(gate["source"], "holdout");
    let meta = tessera_core::model::ModelFile::read_meta(&gated).unwrap();
    assert_eq!(meta["method"], kept);
    assert_eq!(meta["gate"], *gate);
    assert_eq!(meta["pfam"].is_object(), kept == "ours", "{meta}");
    // Without the gate the method's model is written as asked, with no gate record.
    let forced = dir.path().join("forced.safetensors");
    let (summary, _) = fit(&forced, &["--method-gate", "off"]);
    assert_eq!(summary["method"], "ours");
    assert!(summary["gate"].is_null(), "{summary}");
    // Report mode measures the same evidence and records the same choice, but keeps the method.
    let reported = dir.path().join("reported.safetensors");
    let (summary, _) = fit(&reported, &["--method-gate", "report"]);
    assert_eq!(summary["method"], "ours");
    let r = &summary["gate"];
    assert_eq!(r["kept"], "ours");
    assert_eq!(r["choice"], gate["choice"]);
    assert_eq!(
        (&r["baseline"], &r["method"]),
        (&gate["baseline"], &gate["method"])
    );
}

/// `--pfam-train synth` trains PFAM on synthetic defects of any category (here with SBM off:
/// no jigsaw at all), writes it beside the model with its report, and the model uses it.
#[test]
fn pfam_train_synth_learns_from_synthetic_defects_without_the_jigsaw() {
    let dir = tempfile::tempdir().unwrap();
    let data = category(dir.path());
    let model = dir.path().join("m.safetensors");
    let (d, m) = (s(&data), s(&model));
    // `fit --method ours --pfam-train synth --sbm off` into `out`, plus `extra`.
    let fit_synth = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "--json",
            "fit",
            "--data",
            &d,
            "--random-weights",
            "1",
            "--preprocess",
            "64x64",
            "--method",
            "ours",
            "--pfam-train",
            "synth",
            "--sbm",
            "off",
            "--out",
            out,
        ];
        args.extend_from_slice(extra);
        tessera(&args)
    };
    let out = fit_synth(&m, &["--pfam-epochs", "2", "--method-gate", "report"]);
    let e = stderr(&out);
    assert!(out.status.success(), "{e}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["method"], "ours", "{summary}");
    // PFAM learned from synthetic defects: the gate's synthetic evidence cannot vouch for it.
    assert_eq!(summary["gate"]["independent"], false, "{summary}");
    let meta = tessera_core::model::ModelFile::read_meta(&model).unwrap();
    assert_eq!(meta["method"], "ours");
    assert!(!meta["pfam"].is_null(), "{meta}");
    assert_eq!(meta["sbm"]["applied"], false);
    let seg = &meta["sbm"]["pfam_segment"];
    assert_eq!(seg["history"].as_array().map(Vec::len), Some(2), "{meta}");
    let auroc = seg["heldout_auroc"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&auroc), "{auroc}");
    // The PFAM file beside the model carries the same report.
    let pf = dir.path().join("m.pfam.safetensors");
    let r = tessera_sbm::read_segment_report(&pf).unwrap().unwrap();
    assert!((r.heldout_auroc - auroc).abs() < 1e-12);
    let rep = s(&dir.path().join("report.json"));
    let t = tessera(&[
        "--quiet", "test", "--model", &m, "--data", &d, "--report", &rep,
    ]);
    assert!(t.status.success(), "{}", stderr(&t));
    // With the gate on, such a method is never kept on the gate's word.
    let gated = s(&dir.path().join("gated.safetensors"));
    let out = fit_synth(&gated, &["--pfam-epochs", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["method"], "baseline", "{summary}");
    assert_eq!(summary["gate"]["kept"], "baseline", "{summary}");
    // Only --method ours has a PFAM to train.
    let x = s(&dir.path().join("x.safetensors"));
    let bad = tessera(&[
        "fit",
        "--data",
        &d,
        "--random-weights",
        "1",
        "--pfam-train",
        "synth",
        "--out",
        &x,
    ]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("--pfam-train synth needs --method ours"),
        "{}",
        stderr(&bad)
    );
}

/// Elongated parts whose sizes differ by a pixel or two (as scanned parts do): the default
/// `--preprocess auto` keeps them whole at one input size fixed from the first image, says so,
/// stores it — and SBM's training sees that same size (it used to resolve each image on its own
/// and refuse the set: "training images must share one size").
#[test]
fn auto_preprocessing_keeps_elongated_parts_whole_through_sbm_and_fit() {
    let dir = tempfile::tempdir().unwrap();
    let root = noise_images(&dir.path().join("strip"), |i| (40 + i % 2, 100 + i % 3));
    // Standalone SBM training: it runs (and, with nothing learnable, is flagged as such).
    let tuned = dir.path().join("tuned.safetensors");
    let out = run_unlearnable(&["--json", "sbm", "train"], &root, &[], &tuned);
    let e = stderr(&out);
    assert!(!e.contains("share one size"), "{e}");
    assert!(e.contains("did NOT learn"), "{e}");
    // fit with SBM on: the same geometry everywhere, chosen and said once.
    let model = dir.path().join("m.safetensors");
    let out = run_unlearnable(&["fit"], &root, &["--method", "sbm", "--sbm", "on"], &model);
    let e = stderr(&out);
    assert!(out.status.success(), "{e}");
    assert_eq!(e.matches("preprocess auto").count(), 1, "{e}");
    assert!(
        e.contains("40×100") && e.contains("whole image") && e.contains("224×576"),
        "{e}"
    );
    let meta = tessera_core::model::ModelFile::read_meta(&model).unwrap();
    let pre = &meta["preprocess"];
    assert_eq!(
        (pre["width"].as_u64(), pre["height"].as_u64()),
        (Some(224), Some(576)),
        "{meta}"
    );
}
