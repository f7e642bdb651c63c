//! PaDiM against the numpy reference (`tools/golden/padim.py`).

use candle_core::{Device, Tensor};
use tessera_core::scorer::{FitScorer, Scorer};
use tessera_core::FeatureMaps;
use tessera_padim::{Padim, PadimConfig};

fn golden() -> std::collections::HashMap<String, Tensor> {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/padim_small.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

#[test]
fn mahalanobis_matches_numpy() {
    let g = golden();
    let cfg = PadimConfig {
        dims: None,
        levels: vec![1, 2],
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
