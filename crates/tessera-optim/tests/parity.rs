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

/// Steps 1..5 in one go equal steps 1..2, a state round trip into a fresh optimiser, then 3..5.
fn resumes<O: Optimizer>(
    cfg: O::Config,
    save: impl Fn(&O) -> Vec<(String, Tensor)>,
    load: impl Fn(&mut O, &std::collections::HashMap<String, Tensor>),
) where
    O::Config: Clone,
{
    let g = golden();
    let loss = |w: &Var| {
        let t = w.as_tensor();
        ((t.powf(4.0).unwrap().sum_all().unwrap() / 4.0).unwrap()
            + (t.sin().unwrap() * &g["c"]).unwrap().sum_all().unwrap())
        .unwrap()
    };
    let straight = Var::from_tensor(&g["w0"]).unwrap();
    let mut opt = O::new(vec![straight.clone()], cfg.clone()).unwrap();
    for _ in 0..5 {
        opt.backward_step(&loss(&straight)).unwrap();
    }
    let resumed = Var::from_tensor(&g["w0"]).unwrap();
    let mut first = O::new(vec![resumed.clone()], cfg.clone()).unwrap();
    for _ in 0..2 {
        first.backward_step(&loss(&resumed)).unwrap();
    }
    let state: std::collections::HashMap<_, _> = save(&first).into_iter().collect();
    drop(first);
    let mut second = O::new(vec![resumed.clone()], cfg).unwrap();
    load(&mut second, &state);
    for _ in 0..3 {
        second.backward_step(&loss(&resumed)).unwrap();
    }
    let a: Vec<f32> = straight
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = resumed
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a, b, "resumed trajectory differs");
}

#[test]
fn sgd_state_round_trip_resumes_exactly() {
    resumes::<Sgd>(
        SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
            ..Default::default()
        },
        |o| o.state_tensors(),
        |o, t| o.load_state_tensors(t).unwrap(),
    );
}

#[test]
fn adamw_state_round_trip_resumes_exactly() {
    resumes::<AdamW>(
        AdamWConfig {
            lr: 0.05,
            amsgrad: true,
            ..Default::default()
        },
        |o| o.state_tensors().unwrap(),
        |o, t| o.load_state_tensors(t).unwrap(),
    );
}
