//! SBM: permutation set, tiling, pooling, backward parity with PyTorch, training, gate, resume.

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use tessera_backbone::{Arch, ArchSpec, Backbone, BlockKind, WeightsSource};
use tessera_core::model::Preprocess;
use tessera_core::test_util::max_rel_err as max_rel;
use tessera_sbm::{
    adaptive_pool_matrix, permute_tiles, train, train_pfam_segment, Anchor, PermutationSet,
    SbmConfig, SbmData, SegmentConfig,
};

fn hamming(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

#[test]
fn permutation_set_is_valid_distinct_and_far_apart() {
    let p = PermutationSet::maximal_hamming(3, 30, 7).unwrap();
    assert_eq!(p.classes(), 31);
    assert_eq!(p.perm(0), &[0, 1, 2, 3, 4, 5, 6, 7, 8]);
    for (i, a) in p.perms().iter().enumerate() {
        let mut s = a.clone();
        s.sort_unstable();
        assert_eq!(
            s,
            (0..9).collect::<Vec<u8>>(),
            "class {i} is not a permutation"
        );
        for b in &p.perms()[i + 1..] {
            assert!(hamming(a, b) >= p.min_distance());
        }
    }
    // 30 permutations of 9 tiles can all differ from each other (and the identity) in ≥ 7 tiles.
    assert!(p.min_distance() >= 7, "min Hamming {}", p.min_distance());
    assert_eq!(p, PermutationSet::maximal_hamming(3, 30, 7).unwrap());
    assert_ne!(p, PermutationSet::maximal_hamming(3, 30, 8).unwrap());
    assert!(PermutationSet::maximal_hamming(2, 24, 0).is_err()); // only 23 exist
    assert!(PermutationSet::maximal_hamming(1, 1, 0).is_err());
}

#[test]
fn permutation_set_is_greedy_maximin() {
    // 2×2: check the greedy rule against every candidate at every step.
    let p = PermutationSet::maximal_hamming(2, 10, 3).unwrap();
    let mut all = Vec::new();
    for a in 0..4u8 {
        for b in 0..4u8 {
            for c in 0..4u8 {
                for d in 0..4u8 {
                    let v = vec![a, b, c, d];
                    let mut s = v.clone();
                    s.sort_unstable();
                    if s == [0, 1, 2, 3] && v != [0, 1, 2, 3] {
                        all.push(v);
                    }
                }
            }
        }
    }
    let min_to = |v: &[u8], set: &[Vec<u8>]| set.iter().map(|s| hamming(v, s)).min().unwrap();
    // The first pick is random; every later pick maximises the minimum distance.
    for k in 2..p.classes() {
        let chosen = &p.perms()[..k];
        let best = all
            .iter()
            .filter(|v| !chosen.contains(v))
            .map(|v| min_to(v, chosen))
            .max()
            .unwrap();
        assert_eq!(min_to(p.perm(k), chosen), best, "step {k}");
    }
    // 5×5 grids are sampled, not enumerated, and still valid.
    let big = PermutationSet::maximal_hamming(5, 12, 1).unwrap();
    assert_eq!(big.classes(), 13);
    assert!(big.min_distance() >= 20);
}

#[test]
fn tiles_move_whole_and_the_border_stays() {
    let (c, h, w) = (2, 7, 8); // 3×3 tiles of 2×2; one extra row, two extra columns
    let x: Vec<f32> = (0..c * h * w).map(|i| i as f32).collect();
    let id: Vec<u8> = (0..9).collect();
    assert_eq!(permute_tiles(&x, c, h, w, &id), x);
    let perm: Vec<u8> = vec![8, 7, 6, 5, 4, 3, 2, 1, 0];
    let y = permute_tiles(&x, c, h, w, &perm);
    for ch in 0..c {
        for r in 0..h {
            for col in 0..w {
                let i = ch * h * w + r * w + col;
                if r >= 6 || col >= 6 {
                    assert_eq!(y[i], x[i], "border moved at {r},{col}");
                } else {
                    let (t, dy, dx) = ((r / 2) * 3 + col / 2, r % 2, col % 2);
                    let s = perm[t] as usize;
                    let j = ch * h * w + ((s / 3) * 2 + dy) * w + (s % 3) * 2 + dx;
                    assert_eq!(y[i], x[j]);
                }
            }
        }
    }
    // Inverse permutation restores the image.
    let mut inv = vec![0u8; 9];
    for (d, &s) in perm.iter().enumerate() {
        inv[s as usize] = d as u8;
    }
    assert_eq!(permute_tiles(&y, c, h, w, &inv), x);
}

#[test]
fn pooling_matrix_matches_adaptive_avg_pool2d() {
    // PyTorch adaptive_avg_pool2d 14 → 3 uses rows [0,5), [4,10), [9,14).
    let m = adaptive_pool_matrix(14, 14, 3);
    let bins = [(0, 5), (4, 10), (9, 14)];
    for (by, &(y0, y1)) in bins.iter().enumerate() {
        for (bx, &(x0, x1)) in bins.iter().enumerate() {
            let want = 1.0 / ((y1 - y0) * (x1 - x0)) as f32;
            for y in 0..14 {
                for x in 0..14 {
                    let inside = (y0..y1).contains(&y) && (x0..x1).contains(&x);
                    let v = m[(y * 14 + x) * 9 + by * 3 + bx];
                    assert_eq!(v, if inside { want } else { 0.0 });
                }
            }
        }
    }
}

fn golden() -> HashMap<String, Tensor> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/backward.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

/// The trainer's backward pass (tessera-conv's gradients through residual blocks, downsample,
/// fused ReLU) equals PyTorch's on a small ResNet (`tools/golden/sbm_backward.py`).
#[test]
fn backward_through_resnet_blocks_matches_pytorch() {
    let g = golden();
    let spec = ArchSpec {
        block: BlockKind::Basic,
        blocks: [1, 2, 1],
        base: 8,
        width_per_group: 64,
    };
    let weights: HashMap<String, Tensor> = g
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("w.").map(|s| (s.to_string(), v.clone())))
        .collect();
    let mut net =
        Backbone::from_tensors("small", &spec, weights, 3, &Device::Cpu, "golden").unwrap();
    let vars = net.make_trainable(&[1, 2, 3]).unwrap();
    let f = net.forward(&g["x"]).unwrap();
    assert!(max_rel(&f.levels[2], &g["l3"]) < 1e-5);
    let loss = ((&f.levels[0] * &g["r1"]).unwrap().sum_all().unwrap()
        + (&f.levels[2] * &g["r3"]).unwrap().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let mut checked = 0;
    for (name, var) in &vars {
        let want = &g[&format!("grad.{name}")];
        let got = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let e = max_rel(got, want);
        assert!(e < 1e-4, "{name}: relative error {e}");
        checked += 1;
    }
    // 4 blocks × 2 convs + 2 downsamples, weight and bias each.
    assert_eq!(checked, 20);
}

#[test]
fn exported_checkpoint_reloads_to_the_same_network() {
    let dev = Device::Cpu;
    let net = Backbone::load(Arch::ResNet18, &WeightsSource::Random { seed: 5 }, 3, &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bb.safetensors");
    let t = net.export_checkpoint().unwrap();
    tessera_core::io::save_safetensors(&p, &t, HashMap::new()).unwrap();
    let back = Backbone::from_file("resnet18", &Arch::ResNet18.spec(), &p, 3, &dev).unwrap();
    let x = Tensor::randn(0f32, 1., (1, 3, 64, 64), &dev).unwrap();
    let (a, b) = (net.forward(&x).unwrap(), back.forward(&x).unwrap());
    for l in 0..3 {
        assert!(max_rel(&b.levels[l], &a.levels[l]) < 1e-5);
    }
}

/// Small structured images (the built-in synthetic category) at 64 px.
fn images(n: usize) -> (Vec<image::RgbImage>, Preprocess) {
    let dir = tempfile::tempdir().unwrap();
    tessera_data::generate_category(
        dir.path(),
        &tessera_data::SyntheticSpec {
            seed: 1,
            size: 64,
            train: n,
            test_good: 0,
            test_defect: 0,
        },
    )
    .unwrap();
    let pre = Preprocess::square(64, 64);
    let ds = tessera_data::Dataset::open(dir.path()).unwrap();
    let imgs = ds
        .train()
        .unwrap()
        .iter()
        .map(|s| tessera_data::load_image(&s.path, &pre).unwrap().display)
        .collect();
    (imgs, pre)
}

/// Normal images only (no synthesis), from a random-weights source.
fn plain_data(n: usize) -> SbmData<'static> {
    let (images, preprocess) = images(n);
    SbmData {
        images,
        preprocess,
        synth: None,
        source: "random".into(),
    }
}

fn small_config() -> SbmConfig {
    SbmConfig {
        grid: 2,
        permutations: 5,
        eval_perms: 5,
        epochs: 8,
        batch_size: 8,
        holdout: 0.2,
        // Adam: a random backbone's feature scale is far from ImageNet's.
        optimizer: tessera_sbm::OptimizerKind::Adamw,
        weight_decay: 0.0,
        lr_backbone: 1e-4,
        lr_head: 1e-3,
        train_layers: vec![3],
        anchor_weight: 10.0,
        seed: 11,
        ..Default::default()
    }
}

fn backbone() -> Backbone {
    Backbone::load(
        Arch::ResNet18,
        &WeightsSource::Random { seed: 2 },
        3,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn learns_the_jigsaw_passes_the_gate_and_saves_a_loadable_backbone() {
    let (imgs, pre) = images(40);
    let synth = tessera_synth::Synthesizer::new(Default::default(), None).unwrap();
    let data = SbmData {
        images: imgs,
        preprocess: pre,
        synth: Some(&synth),
        source: "random".into(),
    };
    let bb = backbone();
    let out = train(&small_config(), &bb, &data, None, &|_| {}).unwrap();
    let r = &out.report;
    let first = &r.history[0];
    let last = r.history.last().unwrap();
    assert!(last.cross_entropy < first.cross_entropy, "{:?}", r.history);
    assert!(r.gate.passed, "gate: {:?} history {:?}", r.gate, r.history);
    assert!(r.gate.accuracy > 3.0 * r.gate.chance);
    // Only layer3 trained: layer1 and layer2 features are untouched; layer3 moved.
    assert_eq!(r.drift[0], 0.0);
    assert_eq!(r.drift[1], 0.0);
    assert!(r.drift[2] > 0.0);

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tuned.safetensors");
    out.save(&p).unwrap();
    let back =
        Backbone::from_file("resnet18", &Arch::ResNet18.spec(), &p, 3, &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1., (2, 3, 64, 64), &Device::Cpu).unwrap();
    let (a, b) = (out.backbone.forward(&x).unwrap(), back.forward(&x).unwrap());
    assert!(max_rel(&b.levels[2], &a.levels[2]) < 1e-5);
    let rep = tessera_sbm::read_report(&p).unwrap().unwrap();
    assert_eq!((&rep.config, &rep.gate), (&r.config, &r.gate));
    assert_eq!(rep.history.len(), r.history.len());
    // A plain weights file has no report.
    let plain = dir.path().join("plain.safetensors");
    tessera_core::io::save_safetensors(&plain, &bb.export_checkpoint().unwrap(), HashMap::new())
        .unwrap();
    assert!(tessera_sbm::read_report(&plain).unwrap().is_none());
}

#[test]
fn an_untrained_head_fails_the_gate() {
    let data = plain_data(30);
    let cfg = SbmConfig {
        epochs: 1,
        lr_backbone: 0.0,
        lr_head: 1e-9,
        ..small_config()
    };
    let out = train(&cfg, &backbone(), &data, None, &|_| {}).unwrap();
    assert!(!out.report.gate.passed, "{:?}", out.report.gate);
    assert!(out.report.drift.iter().all(|d| *d == 0.0));
}

#[test]
fn anchoring_limits_feature_drift() {
    let data = plain_data(30);
    let run = |anchor, w| {
        let cfg = SbmConfig {
            epochs: 2,
            anchor,
            anchor_weight: w,
            // SGD: the anchor acts as a restoring force (Adam's steps are lr-sized regardless).
            optimizer: tessera_sbm::OptimizerKind::Sgd,
            lr_backbone: 3e-4,
            lr_head: 1e-3,
            train_layers: vec![2, 3],
            ..small_config()
        };
        train(&cfg, &backbone(), &data, None, &|_| {})
            .unwrap()
            .report
            .drift
    };
    let free = run(Anchor::None, 0.0);
    let anchored = run(Anchor::Features, 10.0);
    let l2sp = run(Anchor::L2Sp, 10.0);
    assert!(
        anchored[2] < 0.5 * free[2],
        "free {free:?} anchored {anchored:?}"
    );
    assert!(l2sp[2] < free[2], "free {free:?} l2sp {l2sp:?}");
}

#[test]
fn resumes_from_a_checkpoint_exactly() {
    let data = plain_data(30);
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("run.ckpt");
    let cfg = SbmConfig {
        epochs: 3,
        ..small_config()
    };
    let straight = train(&cfg, &backbone(), &data, None, &|_| {}).unwrap();
    // "Interrupted" after 2 epochs, then resumed to 3.
    let two = SbmConfig {
        epochs: 2,
        ..cfg.clone()
    };
    train(&two, &backbone(), &data, Some(&ck), &|_| {}).unwrap();
    let resumed_from = std::cell::Cell::new(None);
    let resumed = train(&cfg, &backbone(), &data, Some(&ck), &|e| {
        if let tessera_sbm::SbmEvent::Resumed { epochs_done } = e {
            resumed_from.set(Some(*epochs_done));
        }
    })
    .unwrap();
    assert_eq!(resumed_from.get(), Some(2));
    let (a, _) = straight.head.tensors();
    let (b, _) = resumed.head.tensors();
    assert!(max_rel(&b, &a) < 1e-6);
    assert_eq!(straight.report.history.len(), resumed.report.history.len());
    // A checkpoint from other settings is refused with a message naming it.
    let other = SbmConfig {
        lr_head: 0.5,
        ..cfg
    };
    let e = train(&other, &backbone(), &data, Some(&ck), &|_| {}).unwrap_err();
    assert!(e.to_string().contains("run.ckpt"), "{e}");
}

#[test]
fn bad_settings_are_refused() {
    let data = plain_data(12);
    for cfg in [
        SbmConfig {
            train_layers: vec![4],
            ..small_config()
        },
        SbmConfig {
            epochs: 0,
            ..small_config()
        },
        SbmConfig {
            holdout: 1.0,
            ..small_config()
        },
    ] {
        assert!(train(&cfg, &backbone(), &data, None, &|_| {}).is_err());
    }
    let few = SbmData {
        images: data.images[..4].to_vec(),
        ..data
    };
    let e = train(&small_config(), &backbone(), &few, None, &|_| {}).unwrap_err();
    assert!(e.to_string().contains("too few"), "{e}");
}

#[test]
fn pfam_trains_on_the_jigsaw_with_a_frozen_backbone_and_is_saved() {
    let data = plain_data(30);
    let cfg = SbmConfig {
        train_layers: vec![],
        pfam: Some(Default::default()),
        lr_pfam: 1e-3,
        epochs: 6,
        ..small_config()
    };
    let out = train(&cfg, &backbone(), &data, None, &|_| {}).unwrap();
    let r = &out.report;
    // The backbone is untouched; PFAM + head learn the task.
    assert!(r.drift.iter().all(|d| *d == 0.0), "{:?}", r.drift);
    assert!(r.gate.passed, "{:?} {:?}", r.gate, r.history);
    let pfam = out.pfam.as_ref().expect("pfam trained");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ours.safetensors");
    out.save(&p).unwrap();
    let t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    let saved: HashMap<String, Tensor> = t
        .into_iter()
        .filter(|(k, _)| k.starts_with("pfam."))
        .collect();
    assert_eq!(saved.len(), pfam.tensors().len());
    let back = tessera_pfam::Pfam::load(
        &saved,
        "pfam",
        Default::default(),
        [64, 128, 256],
        &Device::Cpu,
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1., (1, 3, 64, 64), &Device::Cpu).unwrap();
    let f = out.backbone.forward(&x).unwrap();
    let (a, b) = (pfam.forward(&f).unwrap(), back.forward(&f).unwrap());
    for l in 0..3 {
        assert!(max_rel(&b.levels[l], &a.levels[l]) < 1e-6);
    }
    assert!(tessera_sbm::read_report(&p)
        .unwrap()
        .unwrap()
        .config
        .pfam
        .is_some());
}

#[test]
fn pfam_learns_to_segment_synthetic_defects_reproducibly_and_is_saved() {
    let (imgs, pre) = images(30);
    // Vivid texture sources, so that a random backbone's features show the defects and the
    // test checks the training, not how hard the defects are.
    let tex = tempfile::tempdir().unwrap();
    for i in 0..4u8 {
        image::RgbImage::from_fn(32, 32, |x, y| {
            if (x / 4 + y / 4 + i as u32).is_multiple_of(2) {
                image::Rgb([255, 0, 40 * i])
            } else {
                image::Rgb([0, 255, 255])
            }
        })
        .save(tex.path().join(format!("t{i}.png")))
        .unwrap();
    }
    let synth = tessera_synth::Synthesizer::new(
        tessera_synth::SynthConfig {
            texture_probability: 1.0,
            beta_min: 0.8,
            ..Default::default()
        },
        Some(tex.path()),
    )
    .unwrap();
    let data = SbmData {
        images: imgs,
        preprocess: pre,
        synth: Some(&synth),
        source: "random".into(),
    };
    // Small batches: 96 optimiser steps in all.
    let cfg = SegmentConfig {
        epochs: 8,
        batch_size: 2,
        lr: 3e-3,
        holdout: 0.2,
        seed: 5,
        ..Default::default()
    };
    let bb = backbone();
    let a = train_pfam_segment(&cfg, &bb, &data, &|_| {}).unwrap();
    let r = &a.report;
    assert_eq!(
        (r.history.len(), r.heldout_images, r.train_images),
        (8, 6, 24)
    );
    let (first, last) = (&r.history[0], r.history.last().unwrap());
    assert!(last.loss < first.loss, "{:?}", r.history);
    // The head finds defects it never saw, on a random backbone's features (0.47 → 0.82
    // when written).
    assert!(
        r.heldout_auroc > 0.75 && r.heldout_auroc > first.heldout_auroc + 0.2,
        "{:?}",
        r.history
    );
    // Same seed, same run: a one-epoch rerun repeats the first epoch to the bit.
    let b = train_pfam_segment(
        &SegmentConfig {
            epochs: 1,
            ..cfg.clone()
        },
        &bb,
        &data,
        &|_| {},
    )
    .unwrap();
    assert_eq!(
        (b.report.history[0].loss, b.report.history[0].heldout_auroc),
        (first.loss, first.heldout_auroc)
    );
    // Saved: PFAM's tensors load back, the report reads back.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("seg.pfam.safetensors");
    a.save(&p).unwrap();
    let saved: HashMap<String, Tensor> = candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let back = tessera_pfam::Pfam::load(
        &saved,
        "pfam",
        Default::default(),
        [64, 128, 256],
        &Device::Cpu,
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1., (1, 3, 64, 64), &Device::Cpu).unwrap();
    let f = bb.forward(&x).unwrap();
    let (ya, yb) = (a.pfam.forward(&f).unwrap(), back.forward(&f).unwrap());
    for l in 0..3 {
        assert!(max_rel(&yb.levels[l], &ya.levels[l]) < 1e-6);
    }
    // (JSON keeps f64s to about the last digit: compare with a tolerance.)
    let back = tessera_sbm::read_segment_report(&p).unwrap().unwrap();
    assert_eq!(
        (&back.config, back.history.len()),
        (&r.config, r.history.len())
    );
    assert!((back.heldout_auroc - r.heldout_auroc).abs() < 1e-12);
    // No synthetic defects, nothing to learn from: a clear error.
    let plain = plain_data(10);
    let e = train_pfam_segment(&cfg, &bb, &plain, &|_| {}).unwrap_err();
    assert!(e.to_string().contains("synthetic defects"), "{e}");
}

/// With early stopping asked for, a jigsaw that is not being learned (a head that cannot move,
/// a frozen backbone) stops after two epochs at chance level and fails the gate as it would
/// have; by default every epoch runs.
#[test]
fn a_run_at_chance_stops_early_when_asked() {
    let data = plain_data(20);
    let cfg = SbmConfig {
        epochs: 4,
        lr_backbone: 0.0,
        lr_head: 1e-12,
        early_stop: true,
        ..small_config()
    };
    let out = train(&cfg, &backbone(), &data, None, &|_| {}).unwrap();
    let r = &out.report;
    assert!(r.stopped_early, "{:?}", r.history);
    assert_eq!(r.history.len(), 2, "{:?}", r.history);
    assert!(!r.gate.passed);
    assert!(!SbmConfig::default().early_stop);
    let full = train(
        &SbmConfig {
            early_stop: false,
            ..cfg.clone()
        },
        &backbone(),
        &data,
        None,
        &|_| {},
    )
    .unwrap();
    assert!(!full.report.stopped_early);
    assert_eq!(full.report.history.len(), 4);
    let acc =
        |h: &[tessera_sbm::EpochStats]| h.iter().map(|e| e.heldout_accuracy).collect::<Vec<_>>();
    assert_eq!(acc(&full.report.history[..2]), acc(&r.history));
}
