//! Chunked attention, gradients, initialisation, configuration and error behaviour.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use std::collections::HashMap;
use tessera_core::{Error, FeatureMaps};
use tessera_pfam::{
    position_attention, position_attention_chunked, softmax_rows, Branches, DctSize, FcaConfig,
    Fusion, Mfcsam, MfcsamConfig, Pfam, PfamConfig,
};

fn max_abs(a: &Tensor) -> f32 {
    a.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

fn rel(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap()) / max_abs(b)
}

fn randn(shape: &[usize], seed: f32) -> Tensor {
    // Deterministic pseudo-random values without a global RNG.
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as f32 * 12.9898 + seed * 78.233).sin() * 43758.547).fract() * 2.0 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn features(c: [usize; 3]) -> FeatureMaps {
    FeatureMaps::new(vec![
        randn(&[2, c[0], 10, 12], 1.0),
        randn(&[2, c[1], 5, 6], 2.0),
        randn(&[2, c[2], 5, 7], 3.0),
    ])
}

fn trainable(cfg: PfamConfig, c: [usize; 3]) -> (VarMap, Pfam) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let p = Pfam::new(cfg, c, vb.pp("pfam")).unwrap();
    (vm, p)
}

#[test]
fn chunked_attention_equals_unchunked() {
    let (b, cq, c, n) = (2, 5, 6, 120);
    let q = randn(&[b, cq, n], 1.0);
    let k = randn(&[b, cq, n], 2.0);
    let v = randn(&[b, c, n], 3.0);
    let full = position_attention_chunked(&q, &k, &v, None).unwrap();
    // Reference by plain tensor ops on the whole matrix.
    let s = candle_nn::ops::softmax(&q.transpose(1, 2).unwrap().matmul(&k).unwrap(), 2).unwrap();
    let want = v.matmul(&s.transpose(1, 2).unwrap()).unwrap();
    assert!(rel(&full, &want) < 1e-6);
    for chunk in [1, 7, n, n + 5] {
        let got = position_attention_chunked(&q, &k, &v, Some(chunk)).unwrap();
        let e = rel(&got, &full);
        assert!(e < 1e-6, "chunk {chunk}: {e}");
    }
    assert!(position_attention(&q, &k, &v, Some(0)).is_err());
    assert!(position_attention_chunked(&q, &k, &v, Some(0)).is_err());
    assert!(position_attention(&q, &k, &randn(&[b, c, n + 1], 3.0), None).is_err());
}

#[test]
fn fused_inference_attention_equals_the_chunked_path() {
    // Untracked CPU inputs take the fused kernel (blocks of 64 rows): sizes below, at and
    // across block edges, and large logits (the softmax must stay finite and exact).
    for (b, cq, c, n, scale) in [
        (1, 3, 4, 5, 1.0),
        (2, 5, 6, 64, 1.0),
        (2, 8, 32, 200, 1.0),
        (1, 4, 3, 130, 30.0),
    ] {
        let q = (randn(&[b, cq, n], 1.0) * scale).unwrap();
        let k = randn(&[b, cq, n], 2.0);
        let v = randn(&[b, c, n], 3.0);
        assert!(!q.track_op());
        let fused = position_attention(&q, &k, &v, Some(7)).unwrap();
        assert_eq!(fused.dims(), &[b, c, n]);
        let chunked = position_attention_chunked(&q, &k, &v, Some(7)).unwrap();
        let e = rel(&fused, &chunked);
        assert!(e < 1e-5, "{b}×{cq}×{c}×{n} ×{scale}: {e}");
        let finite: Vec<f32> = fused.flatten_all().unwrap().to_vec1().unwrap();
        assert!(finite.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn chunked_gradients_equal_unchunked() {
    let (b, cq, c, n) = (1, 4, 3, 30);
    let grads = |chunk: Option<usize>| {
        let q = Var::from_tensor(&randn(&[b, cq, n], 4.0)).unwrap();
        let k = Var::from_tensor(&randn(&[b, cq, n], 5.0)).unwrap();
        let v = Var::from_tensor(&randn(&[b, c, n], 6.0)).unwrap();
        let w = randn(&[b, c, n], 7.0);
        let out = position_attention(&q, &k, &v, chunk).unwrap();
        let g = (out * &w).unwrap().sum_all().unwrap().backward().unwrap();
        [&q, &k, &v].map(|x| g.get(x).unwrap().clone())
    };
    let full = grads(None);
    for chunk in [1, 7] {
        let part = grads(Some(chunk));
        for (a, b) in part.iter().zip(&full) {
            assert!(rel(a, b) < 1e-5, "chunk {chunk}");
        }
    }
}

#[test]
fn fused_softmax_and_its_gradient_match_candle() {
    let x = Var::from_tensor(&(randn(&[3, 4, 17], 8.0) * 5.0).unwrap()).unwrap();
    let w = randn(&[3, 4, 17], 9.0);
    let ours = softmax_rows(&x).unwrap();
    let theirs = candle_nn::ops::softmax(&x, 2).unwrap();
    assert!(rel(&ours, &theirs) < 1e-6);
    let ga = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (theirs * &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(rel(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-5);
}

#[test]
fn pfam_output_does_not_depend_on_chunk() {
    let (_vm, mut p) = trainable(PfamConfig::default(), [32, 16, 32]);
    let x = features([32, 16, 32]);
    p.set_chunk(None).unwrap();
    let a = p.forward(&x).unwrap();
    p.set_chunk(Some(7)).unwrap();
    let b = p.forward(&x).unwrap();
    for (u, v) in a.levels.iter().zip(&b.levels) {
        assert!(rel(v, u) < 1e-6);
    }
    assert!(p.set_chunk(Some(0)).is_err());
}

#[test]
fn gradients_reach_every_parameter() {
    let c = [32, 16, 32];
    for fusion in [Fusion::ScaleSoftmax, Fusion::Concat] {
        let mut cfg = PfamConfig {
            x1_conv_bias: true,
            ..PfamConfig::default()
        };
        cfg.mfcsam.fusion = fusion;
        cfg.mfcsam.share_attention = fusion == Fusion::Concat;
        let (vm, p) = trainable(cfg, c);
        let vars: HashMap<String, Var> = vm.data().lock().unwrap().clone();
        assert_eq!(vars.len(), p.tensors().len());
        let x = features(c);
        let loss = |p: &Pfam| {
            let y = p.forward(&x).unwrap();
            (y.levels[0].sqr().unwrap().mean_all().unwrap()
                + y.levels[2].sqr().unwrap().mean_all().unwrap())
            .unwrap()
        };
        // α = 0 (the initial value): every Var gets a gradient, α's is non-zero.
        let g = loss(&p).backward().unwrap();
        for (name, v) in &vars {
            let gv = g
                .get(v)
                .unwrap_or_else(|| panic!("{fusion:?}: no gradient for {name}"));
            if name.ends_with("alpha") {
                assert_eq!(v.to_vec1::<f32>().unwrap(), vec![0.0]);
                assert!(
                    max_abs(gv) > 0.0,
                    "{fusion:?}: zero gradient for {name} at α = 0"
                );
            }
        }
        // α ≠ 0: every gradient is non-zero (the attention path is live).
        for (name, v) in &vars {
            if name.ends_with("alpha") {
                v.set(&Tensor::new(&[0.5f32], &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        let g = loss(&p).backward().unwrap();
        for (name, v) in &vars {
            assert!(
                max_abs(g.get(v).unwrap()) > 0.0,
                "{fusion:?}: zero gradient for {name} with α = 0.5"
            );
        }
    }
}

#[test]
fn an_optimiser_lowers_a_loss() {
    let c = [32, 16, 32];
    let (vm, p) = trainable(PfamConfig::default(), c);
    let x = features(c);
    let target = randn(&[2, 32, 10, 12], 11.0);
    let loss = || {
        let y = p.forward(&x).unwrap();
        (&y.levels[0] - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let mut opt = candle_nn::AdamW::new_lr(vm.all_vars(), 1e-2).unwrap();
    let first = loss().to_scalar::<f32>().unwrap();
    for _ in 0..5 {
        opt.backward_step(&loss()).unwrap();
    }
    let last = loss().to_scalar::<f32>().unwrap();
    assert!(last < first, "{first} → {last}");
    // tensors() sees the trained values (shared storage with the Vars).
    let saved: HashMap<String, Tensor> = p.tensors().into_iter().collect();
    let loaded = Pfam::load(&saved, "pfam", PfamConfig::default(), c, &Device::Cpu).unwrap();
    let a = loaded.forward(&x).unwrap();
    let b = p.detached().forward(&x).unwrap();
    assert!(rel(&a.levels[0], &b.levels[0]) < 1e-6);
    assert!(rel(&a.levels[2], &b.levels[2]) < 1e-6);
}

/// A loaded model packs its convolutions' weights once (first call) and reuses them: the same
/// bits as the per-call packing of the model it was saved from, on every call; a trained
/// model's inference copy packs per call, so it sees every optimiser step.
#[test]
fn loaded_models_pack_once_and_trained_ones_see_every_step() {
    let c = [32, 16, 64];
    let (vm, p) = trainable(PfamConfig::default(), c);
    let x = features(c);
    let saved: HashMap<String, Tensor> = p.tensors().into_iter().collect();
    let loaded = Pfam::load(&saved, "pfam", PfamConfig::default(), c, &Device::Cpu).unwrap();
    let want = p.detached().forward(&x).unwrap();
    for call in 0..2 {
        let got = loaded.forward(&x).unwrap();
        for l in [0, 2] {
            assert_eq!(
                max_abs(&(&got.levels[l] - &want.levels[l]).unwrap()),
                0.0,
                "call {call}"
            );
        }
    }
    // A 3×3 convolution at X3's size (Winograd) went through the packed path: a clone shares
    // the packing and still agrees.
    let again = loaded.clone().forward(&x).unwrap();
    assert_eq!(max_abs(&(&again.levels[2] - &want.levels[2]).unwrap()), 0.0);

    let before = p.detached().forward(&x).unwrap();
    let loss = p.forward(&x).unwrap().levels[2]
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let mut opt = candle_nn::AdamW::new_lr(vm.all_vars(), 1e-2).unwrap();
    opt.backward_step(&loss).unwrap();
    let after = p.detached().forward(&x).unwrap();
    assert!(
        max_abs(&(&after.levels[2] - &before.levels[2]).unwrap()) > 0.0,
        "a Var-backed model's inference copy did not see the update"
    );
}

#[test]
fn initialisation_is_seeded_and_pytorch_like() {
    let c = [32, 16, 64];
    let (_, a) = trainable(PfamConfig::default(), c);
    let (_, b) = trainable(PfamConfig::default(), c);
    let (_, d) = trainable(
        PfamConfig {
            seed: 7,
            ..PfamConfig::default()
        },
        c,
    );
    let (ta, tb, td) = (a.tensors(), b.tensors(), d.tensors());
    for ((x, y), z) in ta.iter().zip(&tb).zip(&td) {
        assert_eq!(x.0, y.0);
        assert_eq!(max_abs(&(&x.1 - &y.1).unwrap()), 0.0, "{} differs", x.0);
        if x.0.ends_with("alpha") {
            assert_eq!(max_abs(&x.1), 0.0);
        } else {
            assert!(
                max_abs(&(&x.1 - &z.1).unwrap()) > 0.0,
                "{} ignores the seed",
                x.0
            );
        }
    }
    let get = |n: &str| ta.iter().find(|(k, _)| k == n).unwrap().1.clone();
    // conv0 of MFCSAM(64): 32 × 64 × 3 × 3, fan_in 576 → bound 1/24.
    let w = get("pfam.mfcsam3.conv0.weight");
    assert_eq!(w.dims(), &[32, 64, 3, 3]);
    let m = max_abs(&w);
    assert!(m <= 1.0 / 24.0 && m > 0.9 / 24.0, "{m}");
    // conv1 (groups 4, kernel 5): 32 × 16 × 5 × 5, fan_in 400 → bound 1/20.
    let m = max_abs(&get("pfam.mfcsam3.conv1.weight"));
    assert!(m <= 0.05 && m > 0.045, "{m}");
    // FCA of 32 channels, reduction 16: 2 × 32 then 32 × 2.
    assert_eq!(get("pfam.mfcsam3.fca.fc1.weight").dims(), &[2, 32]);
    assert_eq!(get("pfam.mfcsam3.fca.fc2.weight").dims(), &[32, 2]);
    assert_eq!(get("pfam.mfcsam3.pam.query.weight").dims(), &[32, 32, 1, 1]);
    assert_eq!(get("pfam.x1_conv.weight").dims(), &[32, 32, 1, 1]);
    assert!(!ta.iter().any(|(k, _)| k == "pfam.x1_conv.bias"));
}

#[test]
fn resnet18_parameter_count() {
    let (_, p) = trainable(PfamConfig::default(), [64, 128, 256]);
    let n: usize = p.tensors().iter().map(|(_, t)| t.elem_count()).sum();
    assert_eq!(n, 589_922);
}

#[test]
fn existing_vars_are_kept() {
    let c = [32, 16, 32];
    let vm = VarMap::new();
    let dev = Device::Cpu;
    let mine = Tensor::full(0.25f32, (32, 32, 1, 1), &dev).unwrap();
    vm.data().lock().unwrap().insert(
        "pfam.x1_conv.weight".into(),
        Var::from_tensor(&mine).unwrap(),
    );
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let p = Pfam::new(PfamConfig::default(), c, vb.pp("pfam")).unwrap();
    let w = &p.tensors()[0];
    assert_eq!(w.0, "pfam.x1_conv.weight");
    assert_eq!(max_abs(&(&w.1 - &mine).unwrap()), 0.0);
    // The rest were created, and equal those of a fresh seed-0 PFAM (draws do not shift).
    let (_, fresh) = trainable(PfamConfig::default(), c);
    for (a, b) in p.tensors().iter().zip(fresh.tensors()).skip(1) {
        assert_eq!(max_abs(&(&a.1 - &b.1).unwrap()), 0.0, "{}", a.0);
    }
}

#[test]
fn config_serde_round_trips_with_defaults() {
    let cfg = PfamConfig::default();
    let json = serde_json::to_string(&cfg).unwrap();
    assert!(json.contains("\"scale-softmax\""), "{json}");
    let back: PfamConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cfg);
    let partial: PfamConfig = serde_json::from_str(
        r#"{"mfcsam": {"fusion": "concat", "fca": {"dct": {"fixed": {"h": 7, "w": 7}}},
            "pam": {"chunk": null}}}"#,
    )
    .unwrap();
    assert_eq!(partial.mfcsam.fusion, Fusion::Concat);
    assert_eq!(partial.mfcsam.fca.dct, DctSize::Fixed { h: 7, w: 7 });
    assert_eq!(partial.mfcsam.fca.reduction, 16);
    assert_eq!(partial.mfcsam.pam.chunk, None);
    assert_eq!(partial.mfcsam.kernels, vec![3, 5]);
    assert_eq!(partial.mfcsam.groups, vec![1, 4]);
}

fn config_error(r: tessera_core::Result<impl std::fmt::Debug>, needle: &str) {
    match r {
        Err(Error::Config(m)) => assert!(m.contains(needle), "message {m:?} lacks {needle:?}"),
        other => panic!("expected a configuration error about {needle:?}, got {other:?}"),
    }
}

#[test]
fn bad_configurations_and_shapes_are_clear_errors() {
    let dev = Device::Cpu;
    let new = |cfg: PfamConfig, c: [usize; 3]| {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        Pfam::new(cfg, c, vb.pp("pfam")).map(|_| ())
    };
    // 40 channels / 2 scales = 20: not a multiple of the 16 frequency groups.
    config_error(new(PfamConfig::default(), [40, 16, 64]), "multiple of 16");
    config_error(new(PfamConfig::default(), [32, 16, 48]), "multiple of 16");
    let mut cfg = PfamConfig::default();
    cfg.mfcsam.groups = vec![1, 5];
    config_error(new(cfg, [32, 16, 32]), "groups 5");
    let mut cfg = PfamConfig::default();
    cfg.mfcsam.kernels = vec![3, 4];
    config_error(new(cfg, [32, 16, 32]), "odd");
    let mut cfg = PfamConfig::default();
    cfg.mfcsam.kernels = vec![3];
    config_error(new(cfg, [32, 16, 32]), "group counts");
    let mut cfg = PfamConfig::default();
    cfg.mfcsam.pam.chunk = Some(0);
    config_error(new(cfg, [32, 16, 32]), "chunk");
    // WRN50's channel counts are fine (256/2 = 128, 1024/2 = 512).
    new(PfamConfig::default(), [256, 512, 1024]).unwrap();
    // The paper's S = 4 scales (kernels 3, 5, 7, 9; groups 1, 4, 8, 16) on 64 channels.
    let cfg = PfamConfig {
        mfcsam: MfcsamConfig::paper_scales(4),
        ..PfamConfig::default()
    };
    assert_eq!(cfg.mfcsam.kernels, vec![3, 5, 7, 9]);
    assert_eq!(cfg.mfcsam.groups, vec![1, 4, 8, 16]);
    new(cfg, [64, 16, 64]).unwrap();

    let (_, p) = trainable(PfamConfig::default(), [32, 16, 32]);
    let x = features([32, 16, 32]);
    config_error(
        p.forward(&FeatureMaps::new(x.levels[..2].to_vec())),
        "exactly 3",
    );
    let wrong = FeatureMaps::new(vec![
        x.levels[0].clone(),
        x.levels[1].clone(),
        randn(&[2, 48, 5, 7], 1.0),
    ]);
    config_error(p.forward(&wrong), "level X3");
    // The authors' c2wh DCT table has no entry for 16 attended channels.
    let fca = FcaConfig {
        dct: DctSize::Channels,
        ..FcaConfig::default()
    };
    let cfg = MfcsamConfig {
        fca,
        ..MfcsamConfig::default()
    };
    let vm = VarMap::new();
    let m = Mfcsam::new(cfg, 32, VarBuilder::from_varmap(&vm, DType::F32, &dev), 0).unwrap();
    config_error(m.forward(&randn(&[1, 32, 6, 6], 1.0)), "c2wh");
}

fn bad_model(r: tessera_core::Result<Pfam>, needles: &[&str]) {
    match r {
        Err(e @ Error::BadModel { .. }) => {
            let m = e.to_string();
            for n in needles {
                assert!(m.contains(n), "message {m:?} lacks {n:?}");
            }
        }
        other => panic!("expected a model error about {needles:?}, got {other:?}"),
    }
}

#[test]
fn loading_names_the_bad_tensor() {
    let dev = Device::Cpu;
    let c = [32, 16, 32];
    let (_, p) = trainable(PfamConfig::default(), c);
    let saved: HashMap<String, Tensor> = p.tensors().into_iter().collect();
    let load = |t: &HashMap<String, Tensor>, cfg: PfamConfig| Pfam::load(t, "pfam", cfg, c, &dev);
    load(&saved, PfamConfig::default()).unwrap();

    let mut missing = saved.clone();
    missing.remove("pfam.mfcsam3.pam.key.bias");
    bad_model(
        load(&missing, PfamConfig::default()),
        &["pfam.mfcsam3.pam.key.bias", "missing"],
    );

    let mut wrong = saved.clone();
    wrong.insert(
        "pfam.mfcsam1.conv1.weight".into(),
        Tensor::zeros((16, 8, 3, 3), DType::F32, &dev).unwrap(),
    );
    bad_model(
        load(&wrong, PfamConfig::default()),
        &[
            "pfam.mfcsam1.conv1.weight",
            "[16, 8, 3, 3]",
            "[16, 8, 5, 5]",
        ],
    );

    // Saved with shared attention, loaded as per-scale: names differ.
    let mut per_scale = PfamConfig::default();
    per_scale.mfcsam.share_attention = false;
    bad_model(load(&saved, per_scale), &["pfam.mfcsam1.fca0.fc1.weight"]);

    // A tensor this configuration does not use (saved with a bias, loaded without).
    let mut extra = saved.clone();
    extra.insert(
        "pfam.x1_conv.bias".into(),
        Tensor::zeros(32, DType::F32, &dev).unwrap(),
    );
    bad_model(
        load(&extra, PfamConfig::default()),
        &["unexpected", "pfam.x1_conv.bias"],
    );
    // Another prefix is not ours to judge.
    let mut other = saved.clone();
    other.insert(
        "cfa.weight".into(),
        Tensor::zeros(3, DType::F32, &dev).unwrap(),
    );
    load(&other, PfamConfig::default()).unwrap();
}

#[test]
fn a_branch_left_out_passes_its_level_through() {
    let c = [32, 16, 32];
    let x = features(c);
    let (_vm, both) = trainable(PfamConfig::default(), c);
    let y = both.forward(&x).unwrap();
    for (branches, same, changed) in [(Branches::X1, 2, 0), (Branches::X3, 0, 2)] {
        let (_vm, p) = trainable(
            PfamConfig {
                branches,
                ..PfamConfig::default()
            },
            c,
        );
        // Same parameters either way (a file always holds the full set).
        assert_eq!(p.tensors().len(), both.tensors().len());
        let z = p.forward(&x).unwrap();
        assert_eq!(max_abs(&(&z.levels[same] - &x.levels[same]).unwrap()), 0.0);
        assert_eq!(max_abs(&(&z.levels[1] - &x.levels[1]).unwrap()), 0.0);
        // The kept branch is the full PFAM's, and it does transform its level.
        assert!(rel(&z.levels[changed], &y.levels[changed]) < 1e-6);
        assert!(max_abs(&(&z.levels[changed] - &x.levels[changed]).unwrap()) > 1e-3);
    }
    // Older configurations (no field) mean both; names parse.
    let cfg: PfamConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg.branches, Branches::Both);
    assert_eq!("X3".parse::<Branches>().unwrap(), Branches::X3);
    assert!("x2".parse::<Branches>().is_err());
}
