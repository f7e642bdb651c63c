//! PaDiM against the numpy reference (`tools/golden/padim.py`).

use candle_core::{Device, Tensor};
use tessera_core::scorer::{FitScorer, Scorer};
use tessera_core::FeatureMaps;
use tessera_padim::{principal_directions, Padim, PadimConfig, Reduction};

fn golden() -> std::collections::HashMap<String, Tensor> {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/padim_small.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

#[test]
fn mahalanobis_matches_numpy() {
    let g = golden();
    // The reference selects channels (here all of them: the features have fewer than 100).
    let cfg = PadimConfig {
        dims: None,
        levels: vec![1, 2],
        reduction: Reduction::Subset,
        // The reference's covariance per position (every channel kept would share them).
        tie: Some(1),
        ..Default::default()
    };
    // Two training batches (6 + 6 images) to exercise streaming.
    let batches: Vec<tessera_core::Result<FeatureMaps>> = (0..2)
        .map(|i| {
            Ok(FeatureMaps::new(vec![
                g["train1"].narrow(0, i * 6, 6).unwrap(),
                g["train2"].narrow(0, i * 6, 6).unwrap(),
            ]))
        })
        .collect();
    let model = cfg.fit(&mut batches.into_iter()).unwrap();
    let test = FeatureMaps::new(vec![g["test1"].clone(), g["test2"].clone()]);
    let raw = model.score(&test).unwrap();
    assert_eq!((raw.batch, raw.height, raw.width), (3, 4, 6));
    let want: Vec<f32> = g["dist"].flatten_all().unwrap().to_vec1().unwrap();
    for (a, b) in raw.data.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
    }

    // Round trip through stored tensors scores identically.
    let t = model.tensors().unwrap().into_iter().collect();
    let back = <Padim as tessera_core::scorer::Restore>::restore(
        serde_json::from_value(model.config()).unwrap(),
        t,
    )
    .unwrap();
    assert_eq!(back.score(&test).unwrap(), raw);
}

#[test]
fn subset_is_seeded_and_default_dims_follow_backbone() {
    let a = tessera_padim::channel_subset(448, 100, 3);
    assert_eq!(a, tessera_padim::channel_subset(448, 100, 3));
    assert_ne!(a, tessera_padim::channel_subset(448, 100, 4));
    assert_eq!(a.len(), 100);
    assert!(a.windows(2).all(|w| w[0] < w[1]));
    // ResNet-18/34 (448 channels): every channel, covariances shared by 4 × 4 blocks; wider
    // backbones: the reference's 550 per position; an explicit reduction: per position.
    let cfg = PadimConfig::default();
    assert_eq!((cfg.dims_for(448), cfg.tie_for(448)), (448, 4));
    assert_eq!((cfg.dims_for(1792), cfg.tie_for(1792)), (550, 1));
    let paper = PadimConfig {
        dims: Some(100),
        ..Default::default()
    };
    assert_eq!((paper.dims_for(448), paper.tie_for(448)), (100, 1));
    assert_eq!(cfg.covariances((56, 56), 448), 196);
    assert_eq!(paper.covariances((56, 56), 448), 3136);
}

#[test]
fn rejects_bad_config_and_grid_changes() {
    let dev = Device::Cpu;
    let f = |h| {
        FeatureMaps::new(vec![Tensor::ones(
            (2, 3, h, h),
            candle_core::DType::F32,
            &dev,
        )
        .unwrap()])
    };
    let cfg = PadimConfig {
        levels: vec![1],
        ..Default::default()
    };
    let e = cfg
        .fit(&mut vec![Ok(f(4)), Ok(f(5))].into_iter())
        .unwrap_err()
        .to_string();
    assert!(e.contains("grid changed"), "{e}");
    let bad = PadimConfig {
        reg: 0.0,
        ..Default::default()
    };
    assert!(bad.fit(&mut vec![Ok(f(4))].into_iter()).is_err());
    let e = cfg.fit(&mut std::iter::empty()).unwrap_err().to_string();
    assert!(e.contains("no training images"), "{e}");
}

#[test]
fn projection_is_seeded_and_semi_orthogonal() {
    let (c, d) = (448, 100);
    let w = tessera_padim::semi_orthogonal(c, d, 3);
    assert_eq!(w, tessera_padim::semi_orthogonal(c, d, 3));
    assert_ne!(w, tessera_padim::semi_orthogonal(c, d, 4));
    assert_eq!(w.len(), c * d);
    // WᵀW = I.
    for a in 0..d {
        for b in 0..d {
            let dot: f64 = (0..c)
                .map(|i| w[i * d + a] as f64 * w[i * d + b] as f64)
                .sum();
            let want = if a == b { 1.0 } else { 0.0 };
            assert!((dot - want).abs() < 1e-5, "({a}, {b}): {dot}");
        }
    }
}

/// The golden training features as two batches of 6 images.
fn train_batches(
    g: &std::collections::HashMap<String, Tensor>,
) -> Vec<tessera_core::Result<FeatureMaps>> {
    (0..2)
        .map(|i| {
            Ok(FeatureMaps::new(vec![
                g["train1"].narrow(0, i * 6, 6).unwrap(),
                g["train2"].narrow(0, i * 6, 6).unwrap(),
            ]))
        })
        .collect()
}

/// With every dimension kept, an orthogonal projection leaves Mahalanobis distances unchanged
/// (Σ + εI rotates with the data), so the projected model scores as the reference does; with
/// fewer dimensions it differs, is seeded, and survives a round trip through stored tensors.
#[test]
fn projected_model_matches_the_full_reference_and_round_trips() {
    let g = golden();
    let batches = || train_batches(&g);
    let test = FeatureMaps::new(vec![g["test1"].clone(), g["test2"].clone()]);
    let c = g["train1"].dims()[1] + g["train2"].dims()[1];
    let fit = |dims: usize, seed: u64| {
        PadimConfig {
            dims: Some(dims),
            levels: vec![1, 2],
            reduction: Reduction::Orthogonal,
            seed,
            // The reference's covariance per position.
            tie: Some(1),
            ..Default::default()
        }
        .fit(&mut batches().into_iter())
        .unwrap()
    };
    // Every channel kept: no rotation is applied (distances would not see it), so the model
    // keeps the channels as they are.
    let full = fit(c, 0);
    assert_eq!(full.reduction(), Reduction::Subset);
    let raw = full.score(&test).unwrap();
    let want: Vec<f32> = g["dist"].flatten_all().unwrap().to_vec1().unwrap();
    for (a, b) in raw.data.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-3 * b.abs().max(1.0), "{a} vs {b}");
    }
    let small = fit(c / 2, 5);
    assert_eq!(small.dims(), c / 2);
    let s = small.score(&test).unwrap();
    assert_ne!(s.data, raw.data);
    assert_eq!(fit(c / 2, 5).score(&test).unwrap(), s, "seeded");
    assert_ne!(fit(c / 2, 6).score(&test).unwrap(), s);
    let t: std::collections::HashMap<String, Tensor> =
        small.tensors().unwrap().into_iter().collect();
    assert!(t.contains_key("projection") && !t.contains_key("index"));
    // The stored tensor decides, whatever the configuration says (files written before the
    // projection existed have no `reduction` and default to it).
    let mut cfg: PadimConfig = serde_json::from_value(small.config()).unwrap();
    cfg.reduction = Reduction::Subset;
    let back = <Padim as tessera_core::scorer::Restore>::restore(cfg, t).unwrap();
    assert_eq!(back.reduction(), Reduction::Orthogonal);
    assert_eq!(back.score(&test).unwrap(), s);
    // A model fitted for other features is refused in words, not inside candle.
    let other = FeatureMaps::new(vec![g["test1"].clone()]);
    let e = small.score(&other).unwrap_err().to_string();
    assert!(
        e.contains("does not fit this backbone") || e.contains("level"),
        "{e}"
    );
}

#[test]
fn reduction_names_round_trip() {
    for (r, n) in Reduction::ALL.into_iter().zip(Reduction::NAMES) {
        assert_eq!(r.name(), *n);
        assert_eq!(n.parse::<Reduction>().unwrap(), r);
        assert_eq!(
            format!(" {} ", n.to_uppercase())
                .parse::<Reduction>()
                .unwrap(),
            r
        );
    }
    let e = "random".parse::<Reduction>().unwrap_err().to_string();
    assert!(e.contains("orthogonal, subset"), "{e}");
}

/// The principal directions of data with a known covariance: axis-aligned variances 9, 4, 1
/// and 0.25 on four channels give the axes in that order (largest first) or reversed (smallest
/// first), orthonormal, sign fixed; a PCA model restores as PCA and scores identically.
#[test]
fn principal_directions_find_the_known_axes_and_pca_models_restore() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let sd = [3.0f32, 2.0, 1.0, 0.5];
    let n = 4000;
    let mut x = Vec::with_capacity(n * 4);
    for _ in 0..n {
        for s in sd {
            // Uniform on [-√3, √3]·s has variance s².
            x.push(s * 3f32.sqrt() * (2.0 * rng.random::<f32>() - 1.0));
        }
    }
    let top = principal_directions(&x, n, 4, 2, true).unwrap();
    let low = principal_directions(&x, n, 4, 2, false).unwrap();
    // Row-major 4 × 2: column j is direction j.
    let col = |w: &[f32], j: usize| (0..4).map(|i| w[i * 2 + j]).collect::<Vec<_>>();
    let near = |v: Vec<f32>, axis: usize| {
        v.iter()
            .enumerate()
            .all(|(i, &a)| (a - if i == axis { 1.0 } else { 0.0 }).abs() < 0.05)
    };
    assert!(near(col(&top, 0), 0) && near(col(&top, 1), 1), "{top:?}");
    assert!(near(col(&low, 0), 3) && near(col(&low, 1), 2), "{low:?}");
    assert!(principal_directions(&x[..4], 1, 4, 2, true).is_err());

    let dev = candle_core::Device::Cpu;
    let feats = |seed: u64| {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..3 * 6 * 4 * 4).map(|_| r.random::<f32>()).collect();
        FeatureMaps::new(vec![Tensor::from_vec(v, (3, 6, 4, 4), &dev).unwrap()])
    };
    let cfg = PadimConfig {
        dims: Some(3),
        levels: vec![1],
        reduction: Reduction::Pca,
        ..Default::default()
    };
    let m = cfg.fit(&mut (0..3).map(|s| Ok(feats(s)))).unwrap();
    assert_eq!(m.reduction(), Reduction::Pca);
    let s = m.score(&feats(9)).unwrap();
    // No random choice: another seed gives the same model.
    let other = PadimConfig {
        seed: 7,
        ..cfg.clone()
    }
    .fit(&mut (0..3).map(|s| Ok(feats(s))))
    .unwrap();
    assert_eq!(other.score(&feats(9)).unwrap(), s);
    let t: std::collections::HashMap<String, Tensor> = m.tensors().unwrap().into_iter().collect();
    let conf: PadimConfig = serde_json::from_value(m.config()).unwrap();
    let back = <Padim as tessera_core::scorer::Restore>::restore(conf, t).unwrap();
    assert_eq!(back.reduction(), Reduction::Pca);
    assert_eq!(back.score(&feats(9)).unwrap(), s);
}

#[test]
fn f16_inverse_covariances_score_like_f32_and_round_trip() {
    use tessera_padim::CovDtype;
    let g = golden();
    let batches = || train_batches(&g);
    let test = FeatureMaps::new(vec![g["test1"].clone(), g["test2"].clone()]);
    let fit = |dt: CovDtype| {
        PadimConfig {
            dims: Some(4),
            levels: vec![1, 2],
            inv_cov_dtype: dt,
            ..Default::default()
        }
        .fit(&mut batches().into_iter())
        .unwrap()
    };
    let (full, half) = (fit(CovDtype::F32), fit(CovDtype::F16));
    let (a, b) = (full.score(&test).unwrap(), half.score(&test).unwrap());
    assert_ne!(a.data, b.data, "the f16 rounding shows");
    for (x, y) in a.data.iter().zip(&b.data) {
        assert!((x - y).abs() <= 2e-3 * x.abs().max(1.0), "{x} vs {y}");
    }
    let t: std::collections::HashMap<String, Tensor> =
        half.tensors().unwrap().into_iter().collect();
    assert_eq!(t["inv_cov_upper"].dtype(), candle_core::DType::F16);
    let cfg: PadimConfig = serde_json::from_value(half.config()).unwrap();
    assert_eq!(cfg.inv_cov_dtype, CovDtype::F16);
    let back = <Padim as tessera_core::scorer::Restore>::restore(cfg, t).unwrap();
    assert_eq!(back.score(&test).unwrap(), b);
    // Files written before the option read as f32.
    let old: PadimConfig = serde_json::from_str(r#"{"dims": 8}"#).unwrap();
    assert_eq!(old.inv_cov_dtype, CovDtype::F32);
    assert_eq!("F16".parse::<CovDtype>().unwrap(), CovDtype::F16);
    assert!("f8".parse::<CovDtype>().is_err());
}
