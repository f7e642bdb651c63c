//! Parameter trajectories equal PyTorch's (`tools/golden/optim.py`).

use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer;
use tessera_optim::{AdamW, AdamWConfig, Sgd, SgdConfig};

fn golden() -> std::collections::HashMap<String, Tensor> {
    let p =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/optim.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn check<O: Optimizer>(name: &str, cfg: O::Config) {
    let g = golden();
    let w = Var::from_tensor(&g["w0"]).unwrap();
    let mut opt = O::new(vec![w.clone()], cfg).unwrap();
    for step in 0..5 {
        let t = w.as_tensor();
        let loss = ((t.powf(4.0).unwrap().sum_all().unwrap() / 4.0).unwrap()
            + (t.sin().unwrap() * &g["c"]).unwrap().sum_all().unwrap())
        .unwrap();
        opt.backward_step(&loss).unwrap();
        let want = g[name].get(step).unwrap();
        let err: f32 = (w.as_tensor() - &want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(err < 1e-5, "{name} step {}: max abs error {err}", step + 1);
    }
}

#[test]
fn adamw_amsgrad_matches_torch() {
    check::<AdamW>(
        "adamw_amsgrad",
        AdamWConfig {
            lr: 0.1,
            weight_decay: 5e-4,
            amsgrad: true,
            ..Default::default()
        },
    );
}

#[test]
fn adamw_matches_torch() {
    check::<AdamW>(
        "adamw",
        AdamWConfig {
            lr: 0.1,
            weight_decay: 5e-4,
            amsgrad: false,
            ..Default::default()
        },
    );
}

#[test]
fn sgd_nesterov_matches_torch() {
    check::<Sgd>(
        "sgd_nesterov",
        SgdConfig {
            lr: 1e-2,
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 5e-4,
            nesterov: true,
        },
    );
}

#[test]
fn sgd_momentum_dampening_matches_torch() {
    check::<Sgd>(
        "sgd_momentum",
        SgdConfig {
            lr: 1e-2,
            momentum: 0.9,
            dampening: 0.1,
            weight_decay: 0.0,
            nesterov: false,
        },
    );
}

#[test]
fn nesterov_needs_momentum() {
    let w = Var::new(&[1f32], &Device::Cpu).unwrap();
    assert!(Sgd::new(
        vec![w],
        SgdConfig {
            momentum: 0.0,
            nesterov: true,
            ..Default::default()
        }
    )
    .is_err());
}
