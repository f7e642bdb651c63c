//! Parity with torchvision: goldens made by `tools/golden/backbone.py`.
//!
//! Relative error is `max|ours − torch| / max|torch|` per layer, required ≤ 1e-4.

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use tessera_backbone::{Arch, ArchSpec, Backbone, BlockKind, WeightsSource};

fn golden(name: &str) -> HashMap<String, Tensor> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    candle_core::safetensors::load(&p, &Device::Cpu).unwrap()
}

/// `../shared` beside the repository root (or `TESSERA_SHARED`), if present.
fn shared() -> Option<PathBuf> {
    let p = std::env::var_os("TESSERA_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    p.join("weights/resnet18-imagenet1k-l3.safetensors")
        .is_file()
        .then_some(p)
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()
}

#[test]
fn resnet18_real_weights_match_torchvision() {
    let Some(shared) = shared() else {
        eprintln!("SKIPPED: ../shared weights absent; real-weight parity not checked");
        return;
    };
    let g = golden("resnet18_real.safetensors");
    let w = shared.join("weights/resnet18-imagenet1k-l3.safetensors");
    let net = Backbone::load(
        Arch::ResNet18,
        &WeightsSource::File(w.clone()),
        3,
        &Device::Cpu,
    )
    .unwrap();
    let f = net.forward(&g["input"]).unwrap();
    for i in 0..3 {
        let e = rel_err(&f.levels[i], &g[&format!("layer{}", i + 1)]);
        eprintln!("resnet18 real layer{}: rel err {e:.2e}", i + 1);
        assert!(e <= 1e-4, "layer{} rel err {e}", i + 1);
    }
    // Same convolutions with non-trivial batch-norm statistics: checks folding.
    let mut t = candle_core::safetensors::load(&w, &Device::Cpu).unwrap();
    for (k, v) in &g {
        if let Some(name) = k.strip_prefix("bnstat.") {
            t.insert(name.to_string(), v.clone());
        }
    }
    let net = Backbone::from_tensors(
        "resnet18",
        &Arch::ResNet18.spec(),
        t,
        3,
        &Device::Cpu,
        "golden",
    )
    .unwrap();
    let f = net.forward(&g["input"]).unwrap();
    for i in 0..3 {
        let e = rel_err(&f.levels[i], &g[&format!("bn_layer{}", i + 1)]);
        eprintln!("resnet18 real + random BN layer{}: rel err {e:.2e}", i + 1);
        assert!(e <= 1e-4, "bn layer{} rel err {e}", i + 1);
    }
}

#[test]
fn small_bottleneck_matches_torchvision() {
    let g = golden("bottleneck_small.safetensors");
    let model: HashMap<String, Tensor> = g
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("model.").map(|n| (n.to_string(), v.clone())))
        .collect();
    let spec = ArchSpec {
        block: BlockKind::Bottleneck,
        blocks: [1, 1, 1],
        base: 64,
        width_per_group: 16,
    };
    let net = Backbone::from_tensors("small", &spec, model, 2, &Device::Cpu, "golden").unwrap();
    let f = net.forward(&g["input"]).unwrap();
    assert_eq!(f.channels(), vec![256, 512]);
    for i in 0..2 {
        let e = rel_err(&f.levels[i], &g[&format!("layer{}", i + 1)]);
        eprintln!("bottleneck layer{}: rel err {e:.2e}", i + 1);
        assert!(e <= 1e-4, "layer{} rel err {e}", i + 1);
    }
}
