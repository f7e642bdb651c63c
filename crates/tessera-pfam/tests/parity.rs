//! The blocks against a PyTorch re-statement of the authors' code (`tools/golden/pfam.py`):
//! weights loaded by name, outputs within max|Δ| / max|ref| ≤ 1e-4.

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use tessera_core::test_util::max_rel_err as rel_err;
use tessera_core::FeatureMaps;
use tessera_pfam::{
    dct, DctSize, FcaConfig, FcaWeight, Fusion, Mfcsam, MfcsamConfig, PamConfig, Pfam, PfamConfig,
    PositionAttention, Residual, ScaleOrder,
};

const TOL: f32 = 1e-4;

fn golden() -> HashMap<String, Tensor> {
    let p =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/pfam.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn check(what: &str, ours: &Tensor, reference: &Tensor) {
    let e = rel_err(ours, reference);
    println!("{what}: max|Δ|/max|ref| = {e:.2e}");
    assert!(e <= TOL, "{what}: relative error {e:.3e} > {TOL:e}");
}

#[test]
fn dct_filters_match() {
    let g = golden();
    for (h, w) in [(14, 14), (10, 12), (7, 7), (5, 5)] {
        let ours = Tensor::from_vec(
            dct::dct_filters(h, w)
                .into_iter()
                .map(|v| v as f32)
                .collect::<Vec<_>>(),
            (16, h, w),
            &Device::Cpu,
        )
        .unwrap();
        let e = rel_err(&ours, &g[&format!("dct.{h}x{w}")]);
        assert!(e < 1e-6, "dct {h}x{w}: {e}");
    }
}

#[test]
fn fca_matches() {
    let g = golden();
    let dev = Device::Cpu;
    let fca = FcaWeight::load(&g, "fca", FcaConfig::default(), 32, &dev).unwrap();
    check(
        "fca 10x12",
        &fca.forward(&g["in.x1012"]).unwrap(),
        &g["out.fca.1012"],
    );
    let fixed = FcaConfig {
        dct: DctSize::Fixed { h: 7, w: 7 },
        ..FcaConfig::default()
    };
    let fca = FcaWeight::load(&g, "fca", fixed, 32, &dev).unwrap();
    check(
        "fca 10x12 pooled to 7x7",
        &fca.forward(&g["in.x1012"]).unwrap(),
        &g["out.fca.1012_fixed7"],
    );
    let by_channels = FcaConfig {
        dct: DctSize::Channels,
        ..FcaConfig::default()
    };
    let fca = FcaWeight::load(&g, "fca64", by_channels, 64, &dev).unwrap();
    check(
        "fca c2wh (7x9 → 56x56)",
        &fca.forward(&g["in.x64"]).unwrap(),
        &g["out.fca64.channels"],
    );
}

#[test]
fn position_attention_matches() {
    let g = golden();
    let dev = Device::Cpu;
    for chunk in [None, Some(512), Some(7)] {
        let cfg = PamConfig {
            chunk,
            ..PamConfig::default()
        };
        let pam = PositionAttention::load(&g, "pam", cfg, 32, &dev).unwrap();
        check(
            &format!("pam 14x14 chunk {chunk:?}"),
            &pam.forward(&g["in.x14"]).unwrap(),
            &g["out.pam.14"],
        );
        check(
            &format!("pam 10x12 chunk {chunk:?}"),
            &pam.forward(&g["in.x1012"]).unwrap(),
            &g["out.pam.1012"],
        );
    }
    // DANet's form: C/8 query/key channels, no leaky ReLU.
    let danet = PamConfig {
        qk_reduction: 8,
        leaky_slope: None,
        chunk: Some(5),
    };
    let pam = PositionAttention::load(&g, "pam8", danet, 32, &dev).unwrap();
    check(
        "pam C/8 no leaky 10x12",
        &pam.forward(&g["in.x1012"]).unwrap(),
        &g["out.pam8.1012"],
    );
}

#[test]
fn mfcsam_matches_both_fusions() {
    let g = golden();
    let dev = Device::Cpu;
    let variants = [
        ("mfcsam_softmax", MfcsamConfig::default(), true),
        (
            "mfcsam_concat",
            MfcsamConfig {
                fusion: Fusion::Concat,
                share_attention: false,
                order: ScaleOrder::Ascending,
                ..MfcsamConfig::default()
            },
            true,
        ),
        (
            "mfcsam_authors",
            MfcsamConfig {
                residual: Residual::Input,
                ..MfcsamConfig::default()
            },
            false,
        ),
    ];
    for (name, cfg, has_1012) in variants {
        let m = Mfcsam::load(&g, name, cfg, 32, &dev).unwrap();
        check(
            &format!("{name} 14x14"),
            &m.forward(&g["in.x14"]).unwrap(),
            &g[&format!("out.{name}.14")],
        );
        if has_1012 {
            check(
                &format!("{name} 10x12"),
                &m.forward(&g["in.x1012"]).unwrap(),
                &g[&format!("out.{name}.1012")],
            );
        }
    }
}

#[test]
fn pfam_matches_on_three_levels() {
    let g = golden();
    let dev = Device::Cpu;
    let pfam = Pfam::load(&g, "pfam", PfamConfig::default(), [32, 48, 64], &dev).unwrap();
    let x = FeatureMaps::new(vec![
        g["in.x14"].clone(),
        g["in.pfam2"].clone(),
        g["in.pfam3"].clone(),
    ]);
    let y = pfam.forward(&x).unwrap();
    check("pfam X1", &y.levels[0], &g["out.pfam.1"]);
    assert_eq!(
        rel_err(&y.levels[1], &g["in.pfam2"]),
        0.0,
        "X2 passes through"
    );
    check("pfam X3", &y.levels[2], &g["out.pfam.3"]);
    // The saved names round-trip: every golden weight under "pfam." is one of ours.
    let ours: Vec<String> = pfam.tensors().into_iter().map(|(n, _)| n).collect();
    let theirs = g.keys().filter(|k| k.starts_with("pfam.")).count();
    assert_eq!(ours.len(), theirs);
    assert!(ours.iter().all(|n| g.contains_key(n)));
}

/// The comparisons above can fail: with the attention scale zeroed or the residual switched,
/// the outputs move far beyond the tolerance.
#[test]
fn parity_checks_are_sensitive() {
    let mut g = golden();
    let dev = Device::Cpu;
    let m = Mfcsam::load(
        &g,
        "mfcsam_softmax",
        MfcsamConfig {
            residual: Residual::Input,
            ..MfcsamConfig::default()
        },
        32,
        &dev,
    )
    .unwrap();
    let e = rel_err(
        &m.forward(&g["in.x14"]).unwrap(),
        &g["out.mfcsam_softmax.14"],
    );
    assert!(
        e > 100.0 * TOL,
        "residual switch moved the output by only {e}"
    );
    g.insert(
        "pam.alpha".into(),
        Tensor::zeros(1, candle_core::DType::F32, &dev).unwrap(),
    );
    let pam = PositionAttention::load(&g, "pam", PamConfig::default(), 32, &dev).unwrap();
    let e = rel_err(&pam.forward(&g["in.x14"]).unwrap(), &g["out.pam.14"]);
    assert!(e > 100.0 * TOL, "α = 0 moved the PAM output by only {e}");
}
