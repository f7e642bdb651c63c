//! PatchCore against PyTorch (`tools/golden/patchcore.py`) and against itself (chunking).

use candle_core::{DType, Device, Tensor};
use tessera_core::scorer::{FitScorer, Scorer};
use tessera_core::test_util::max_abs_diff as max_abs;
use tessera_core::FeatureMaps;
use tessera_patchcore::{embed, nn, BankDtype, Patchcore, PatchcoreConfig};

fn golden() -> std::collections::HashMap<String, Tensor> {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/patchcore_small.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn patches(x: &Tensor) -> Tensor {
    let (b, c, h, w) = x.dims4().unwrap();
    x.permute((0, 2, 3, 1))
        .unwrap()
        .reshape((b * h * w, c))
        .unwrap()
        .contiguous()
        .unwrap()
}

#[test]
fn embedding_matches_anomalib() {
    let g = golden();
    let f = FeatureMaps::new(vec![g["l1"].clone(), g["l2"].clone(), g["l3"].clone()]);
    let e = embed(&f, &[2, 3], None).unwrap();
    assert!(
        max_abs(&e, &g["embed"]) < 1e-5,
        "embed differs by {}",
        max_abs(&e, &g["embed"])
    );
    let r = embed(&f, &[2, 3], Some(10)).unwrap();
    assert!(max_abs(&r, &g["embed_reduced10"]) < 1e-5);
}

#[test]
fn nearest_matches_cdist_and_chunking_changes_nothing() {
    let g = golden();
    let q = patches(&g["embed"]);
    let bank = &g["bank"];
    let sq = nn::row_norms_sq(bank).unwrap();
    let want_d: Vec<f32> = g["nn_dist"].to_vec1().unwrap();
    let want_i: Vec<i64> = g["nn_idx"].to_vec1().unwrap();
    let (d_full, i_full) = nn::nearest(&q, bank, &sq, 50).unwrap();
    for (a, b) in d_full.iter().zip(&want_d) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    assert_eq!(i_full.iter().map(|&i| i as i64).collect::<Vec<_>>(), want_i);
    for chunk in [1, 7, 16, 49, 1000] {
        let (d, i) = nn::nearest(&q, bank, &sq, chunk).unwrap();
        assert_eq!(i, i_full, "chunk {chunk}");
        for (a, b) in d.iter().zip(&d_full) {
            assert!(
                (a - b).abs() <= 1e-6 * b.max(1.0),
                "chunk {chunk}: {a} vs {b}"
            );
        }
    }
    // The accelerator path (tensor ops only), run here on the CPU, agrees.
    for chunk in [7, 50, 1000] {
        let (d, i) = nn::nearest_tensor_ops(&q, bank, &sq, chunk).unwrap();
        assert_eq!(i, i_full, "device path, chunk {chunk}");
        for (a, b) in d.iter().zip(&d_full) {
            assert!(
                (a - b).abs() <= 1e-4 * b.max(1.0),
                "device path: {a} vs {b}"
            );
        }
    }
    // k nearest: the first is the 1-NN.
    let (kd, ki) = nn::k_nearest(&q.narrow(0, 3, 1).unwrap(), bank, &sq, 5, 7).unwrap();
    assert_eq!(ki[0], i_full[3]);
    assert!(kd.windows(2).all(|w| w[0] <= w[1]));
}

fn batches(
    g: &std::collections::HashMap<String, Tensor>,
) -> Vec<tessera_core::Result<FeatureMaps>> {
    (0..2)
        .map(|i| {
            Ok(FeatureMaps::new(vec![
                g["l1"].narrow(0, i, 1).unwrap(),
                g["l2"].narrow(0, i, 1).unwrap(),
                g["l3"].narrow(0, i, 1).unwrap(),
            ]))
        })
        .collect()
}

#[test]
fn fit_score_round_trip_ratios_and_f16() {
    let g = golden();
    let f = FeatureMaps::new(vec![g["l1"].clone(), g["l2"].clone(), g["l3"].clone()]);
    for ratio in [0.01, 0.1, 1.0] {
        let cfg = PatchcoreConfig {
            coreset_ratio: ratio,
            chunk: 13,
            ..Default::default()
        };
        let m = cfg.fit(&mut batches(&g).into_iter()).unwrap();
        assert_eq!(m.bank_len(), (128.0 * ratio).ceil() as usize);
        let raw = m.score(&f).unwrap();
        if ratio == 1.0 {
            // Every training patch is in the bank: training images score zero.
            assert!(raw.data.iter().all(|v| *v < 1e-2), "{:?}", &raw.data[..4]);
        }
        let back = <Patchcore as tessera_core::scorer::Restore>::restore(
            serde_json::from_value(m.config()).unwrap(),
            m.tensors().unwrap().into_iter().collect(),
        )
        .unwrap();
        assert_eq!(back.score(&f).unwrap(), raw);
    }
    let cfg = PatchcoreConfig {
        coreset_ratio: 0.5,
        bank_dtype: BankDtype::F16,
        reweight_k: Some(3),
        ..Default::default()
    };
    let m = cfg.fit(&mut batches(&g).into_iter()).unwrap();
    assert_eq!(m.bank().dtype(), DType::F16);
    let raw = m.score(&f).unwrap();
    let s = raw.image_scores.as_ref().unwrap();
    for (i, si) in s.iter().enumerate() {
        let max = raw.image(i).iter().copied().fold(0f32, f32::max);
        assert!(
            *si > 0.0 && *si <= max,
            "reweighted score {si} must lie in (0, max={max}]"
        );
    }
}

#[test]
fn bad_config_is_an_error() {
    let g = golden();
    for cfg in [
        PatchcoreConfig {
            coreset_ratio: 0.0,
            ..Default::default()
        },
        PatchcoreConfig {
            coreset_ratio: 1.5,
            ..Default::default()
        },
        PatchcoreConfig {
            levels: vec![2, 9],
            ..Default::default()
        },
    ] {
        let e = cfg
            .fit(&mut batches(&g).into_iter())
            .unwrap_err()
            .to_string();
        assert!(e.contains("patchcore"), "{e}");
    }
}

#[test]
fn every_search_scores_like_brute_force() {
    use tessera_patchcore::Search;
    let g = golden();
    let f = FeatureMaps::new(vec![g["l1"].clone(), g["l2"].clone(), g["l3"].clone()]);
    for (ratio, clusters) in [(0.5, None), (1.0, Some(5)), (0.1, Some(64))] {
        let cfg = PatchcoreConfig {
            coreset_ratio: ratio,
            clusters,
            search: Search::Brute,
            reweight_k: Some(3),
            ..Default::default()
        };
        let mut m = cfg.fit(&mut batches(&g).into_iter()).unwrap();
        assert!(m.partition().is_none());
        let brute = m.score(&f).unwrap();
        let all = (m.bank_len() as f64).sqrt().ceil() as usize + 64;
        for search in [Search::Exact, Search::Approximate { probes: all }] {
            m.set_search(search).unwrap();
            let p = m.partition().expect("partitioned on the CPU");
            assert_eq!(p.len(), m.bank_len());
            let raw = m.score(&f).unwrap();
            // Compared squared: a distance of 0 comes out as √(rounding) ≈ 5e-4 either way.
            for (a, b) in raw.data.iter().zip(&brute.data) {
                assert!(
                    (a * a - b * b).abs() <= 1e-4 * (b * b).max(1.0),
                    "{search}: {a} vs {b}"
                );
            }
            let (si, bi) = (
                raw.image_scores.unwrap(),
                brute.image_scores.clone().unwrap(),
            );
            for (a, b) in si.iter().zip(&bi) {
                assert!(
                    (a * a - b * b).abs() <= 1e-4 * (b * b).max(1.0),
                    "{search}: {a} vs {b}"
                );
            }
        }
    }
    assert!(PatchcoreConfig::default()
        .fit(&mut batches(&g).into_iter())
        .unwrap()
        .set_search(Search::Approximate { probes: 0 })
        .is_err());
    // Model files written before the search existed read as the exact search.
    let old: PatchcoreConfig = serde_json::from_str(r#"{"coreset_ratio": 0.1}"#).unwrap();
    assert_eq!(old.search, Search::Exact);
    assert_eq!(old.clusters, None);
}
