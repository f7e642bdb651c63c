//! CFA against the reference code (`tools/golden/cfa.py`): features, loss, one AMSGrad step, score.

use candle_core::{Device, Tensor, Var, D};
use candle_nn::Optimizer;
use std::collections::HashMap;
use tessera_cfa::{
    coords, descriptor, embed, rows_with_coords, soft_boundary_loss, Cfa, CfaConfig,
};
use tessera_core::scorer::{FitScorer, Scorer};
use tessera_core::test_util::max_abs_diff as max_abs;
use tessera_core::FeatureMaps;
use tessera_optim::{AdamW, AdamWConfig};

fn golden() -> HashMap<String, Tensor> {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/cfa_small.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn features(g: &HashMap<String, Tensor>) -> FeatureMaps {
    FeatureMaps::new(vec![g["l1"].clone(), g["l2"].clone(), g["l3"].clone()])
}

/// One AMSGrad step (the reference's optimiser settings) on the descriptor's weight, bias and
/// radius, taken by `step`, then the three against the golden values after the step.
fn golden_step(vars: &[&Var; 3], g: &HashMap<String, Tensor>, step: impl FnOnce(&mut AdamW)) {
    let mut opt = AdamW::new(
        vars.iter().map(|&v| v.clone()).collect(),
        AdamWConfig {
            lr: 1e-3,
            weight_decay: 5e-4,
            amsgrad: true,
            ..Default::default()
        },
    )
    .unwrap();
    step(&mut opt);
    for (v, (name, what)) in vars
        .iter()
        .zip([("w1", "weight"), ("b1", "bias"), ("r1", "radius")])
    {
        assert!(
            max_abs(v.as_tensor(), &g[name]) < 1e-6,
            "{what} after one step"
        );
    }
}

#[test]
fn loss_and_one_amsgrad_step_match_reference() {
    let g = golden();
    let x = embed(&features(&g), &[1, 2, 3]).unwrap();
    assert!(max_abs(&x, &g["sample"]) < 1e-5);
    let rows = rows_with_coords(&x, &coords(8, 6, &Device::Cpu).unwrap()).unwrap();
    let w = Var::from_tensor(&g["w0"]).unwrap();
    let b = Var::from_tensor(&g["b0"]).unwrap();
    let r = Var::new(&[0.3f32], &Device::Cpu).unwrap();
    let centres = &g["centres"];
    let csq: Vec<f32> = centres
        .sqr()
        .unwrap()
        .sum(D::Minus1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let phi = descriptor(&rows, w.as_tensor(), b.as_tensor()).unwrap();
    let cfg = CfaConfig::default();
    let loss = soft_boundary_loss(&phi, centres, &csq, r.as_tensor(), &cfg).unwrap();
    let want: f32 = g["loss"].to_vec1::<f32>().unwrap()[0];
    let got: f32 = loss.to_scalar().unwrap();
    assert!(
        (got - want).abs() <= 1e-4 * want.abs(),
        "loss {got} vs {want}"
    );
    golden_step(&[&w, &b, &r], &g, |opt| opt.backward_step(&loss).unwrap());
}

#[test]
fn score_matches_reference() {
    let g = golden();
    let t: HashMap<String, Tensor> = [
        ("weight".to_string(), g["w0"].clone()),
        ("bias".to_string(), g["b0"].clone()),
        ("centres".to_string(), g["centres"].clone()),
        (
            "grid".to_string(),
            Tensor::new(&[8u32, 6], &Device::Cpu).unwrap(),
        ),
    ]
    .into();
    let m = <Cfa as tessera_core::scorer::Restore>::restore(CfaConfig::default(), t).unwrap();
    let raw = m.score(&features(&g)).unwrap();
    let want: Vec<f32> = g["score"].flatten_all().unwrap().to_vec1().unwrap();
    for (a, b) in raw.data.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
    }
}

/// The golden features as two one-image batches, as `fit` receives them.
fn one_image_batches(
    g: &HashMap<String, Tensor>,
) -> impl Iterator<Item = tessera_core::Result<FeatureMaps>> + '_ {
    (0..2).map(|i| -> tessera_core::Result<FeatureMaps> {
        Ok(FeatureMaps::new(vec![
            g["l1"].narrow(0, i, 1)?,
            g["l2"].narrow(0, i, 1)?,
            g["l3"].narrow(0, i, 1)?,
        ]))
    })
}

#[test]
fn training_is_seeded_lowers_the_loss_and_round_trips() {
    let g = golden();
    let batches = || one_image_batches(&g);
    let cfg = CfaConfig {
        epochs: 8,
        batch: 1,
        lr: 1e-2,
        seed: 3,
        ..Default::default()
    };
    let a = cfg.fit(&mut batches()).unwrap();
    let b = cfg.fit(&mut batches()).unwrap();
    assert_eq!(a.history().len(), 8);
    let la: Vec<f64> = a.history().iter().map(|e| e.loss).collect();
    let lb: Vec<f64> = b.history().iter().map(|e| e.loss).collect();
    assert_eq!(la, lb, "same seed, same training");
    assert!(la.last().unwrap() < &la[0], "loss must go down: {la:?}");
    let f = features(&g);
    let raw = a.score(&f).unwrap();
    let back = <Cfa as tessera_core::scorer::Restore>::restore(
        serde_json::from_value(a.config()).unwrap(),
        a.tensors().unwrap().into_iter().collect(),
    )
    .unwrap();
    assert_eq!(back.score(&f).unwrap(), raw);
    // Early stopping on the training loss: a radius that already holds every patch and no
    // repulsion make the loss 0 from the start, so it stops after `patience` epochs.
    let p = CfaConfig {
        epochs: 50,
        patience: Some(2),
        radius_init: 1e3,
        alpha: 1e9,
        ..Default::default()
    };
    let h = p.fit(&mut batches()).unwrap().history().to_vec();
    assert_eq!(h.len(), 3, "{h:?}");
    assert!(h.iter().all(|e| e.loss == 0.0));
    // γ_c > 1: k-means centres.
    let c = CfaConfig {
        epochs: 1,
        gamma_c: 4,
        ..Default::default()
    };
    let m = c.fit(&mut batches()).unwrap();
    assert_eq!(m.tensors().unwrap()[2].1.dims(), &[12, 18]);
}

#[test]
fn bad_config() {
    for cfg in [
        CfaConfig {
            j: 4,
            ..Default::default()
        },
        CfaConfig {
            batch: 0,
            ..Default::default()
        },
    ] {
        assert!(cfg.fit(&mut std::iter::empty()).is_err());
    }
}

/// Per-level learned scales: the smallest transform that can train with CFA's loss.
struct Scales(Vec<candle_core::Var>);

impl tessera_cfa::FeatureTransform for Scales {
    fn forward(&self, f: &FeatureMaps) -> tessera_core::Result<FeatureMaps> {
        let levels = f
            .levels
            .iter()
            .zip(&self.0)
            .map(|(l, s)| l.broadcast_mul(s.as_tensor()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(FeatureMaps::new(levels))
    }
    fn vars(&self) -> Vec<candle_core::Var> {
        self.0.clone()
    }
}

#[test]
fn end_to_end_training_updates_the_transform_and_matches_plain_fit_when_frozen() {
    let g = golden();
    let batches = || one_image_batches(&g);
    let cfg = CfaConfig {
        epochs: 6,
        batch: 1,
        lr: 1e-2,
        seed: 3,
        ..Default::default()
    };
    let one = || candle_core::Var::new(&[1f32], &candle_core::Device::Cpu).unwrap();
    // A transform with no variables is the plain fit.
    struct Frozen;
    impl tessera_cfa::FeatureTransform for Frozen {
        fn forward(&self, f: &FeatureMaps) -> tessera_core::Result<FeatureMaps> {
            Ok(f.clone())
        }
        fn vars(&self) -> Vec<candle_core::Var> {
            Vec::new()
        }
    }
    let plain = cfg.fit(&mut batches()).unwrap();
    let frozen = cfg
        .fit_end_to_end(&mut batches(), &Frozen, &|_| {})
        .unwrap();
    let f = features(&g);
    assert_eq!(frozen.score(&f).unwrap(), plain.score(&f).unwrap());
    // Trainable scales move, and the loss goes down.
    let t = Scales(vec![one(), one(), one()]);
    let fitted = cfg.fit_end_to_end(&mut batches(), &t, &|_| {}).unwrap();
    let moved: Vec<f32> =
        t.0.iter()
            .map(|v| v.as_tensor().to_vec1::<f32>().unwrap()[0])
            .collect();
    assert!(moved.iter().any(|s| (s - 1.0).abs() > 1e-4), "{moved:?}");
    let h: Vec<f64> = fitted.history().iter().map(|e| e.loss).collect();
    assert!(h.last().unwrap() < &h[0], "{h:?}");
}

#[test]
fn device_path_nearest_centres_equals_the_cpu_path() {
    // Row counts below, at and across the fused search's 256-row blocks (with a remainder);
    // more neighbours asked for than there are centres.
    let dev = candle_core::Device::Cpu;
    for (rows, m, d, n) in [
        (50, 30, 8, 6),
        (256, 40, 16, 3),
        (600, 70, 33, 6),
        (5, 4, 8, 6),
    ] {
        let phi = Tensor::randn(0f32, 1., (rows, d), &dev).unwrap();
        let centres = Tensor::randn(0f32, 1., (m, d), &dev).unwrap();
        let sq: Vec<f32> = centres.sqr().unwrap().sum(1).unwrap().to_vec1().unwrap();
        let (ia, da) = tessera_cfa::nearest_centres(&phi, &centres, &sq, n).unwrap();
        let (ib, db) = tessera_cfa::nearest_centres_tensor_ops(&phi, &centres, &sq, n).unwrap();
        assert_eq!(ia.len(), rows * n.min(m));
        assert_eq!(ia, ib, "rows {rows}, centres {m}");
        for (a, b) in da.iter().zip(&db) {
            assert!((a - b).abs() < 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
        }
    }
    // Shapes that do not fit are an error, not a panic.
    let phi = Tensor::randn(0f32, 1., (4, 8), &dev).unwrap();
    let centres = Tensor::randn(0f32, 1., (3, 7), &dev).unwrap();
    assert!(tessera_cfa::nearest_centres(&phi, &centres, &[1.0; 3], 2).is_err());
}

#[test]
fn descriptor_rows_written_directly_equal_the_tensor_ops() {
    // Untracked CPU input takes the direct writer; the same values as a `Var` (tracked by
    // autograd) take candle's permute + cat. Grids whose size is and is not a multiple of the
    // writer's 64-position blocks, so that blocks straddle images.
    let dev = candle_core::Device::Cpu;
    for (b, c, h, w) in [(1, 3, 8, 8), (3, 5, 5, 7), (2, 130, 9, 11)] {
        let x = Tensor::randn(0f32, 1., (b, c, h, w), &dev).unwrap();
        let co = tessera_cfa::coords(h, w, &dev).unwrap();
        let direct = tessera_cfa::rows_with_coords(&x, &co).unwrap();
        let tracked = candle_core::Var::from_tensor(&x).unwrap();
        let ops = tessera_cfa::rows_with_coords(tracked.as_tensor(), &co).unwrap();
        assert_eq!(direct.dims(), [b * h * w, c + 2]);
        let (a, o): (Vec<f32>, Vec<f32>) = (
            direct.flatten_all().unwrap().to_vec1().unwrap(),
            ops.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(a, o, "{b}×{c}×{h}×{w}");
    }
}

#[test]
fn fused_loss_and_gradients_equal_autograd() {
    // Rows below, across and at the fused pass's 256-row blocks; radii where only attraction,
    // both terms, and only repulsion are active; a configuration where the terms overlap
    // (J < K) and one with fewer centres than K + J.
    let dev = Device::Cpu;
    // Points and centres uniform in ±0.17 (seeded): squared distances near 0.02·D, so r²
    // decides which terms are active (counted below: each kind must be met, and both in one
    // case).
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut uniform = |shape: (usize, usize)| {
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-0.17f32..0.17))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let overlap = CfaConfig {
        k: 4,
        j: 2,
        alpha: 0.05,
        ..Default::default()
    };
    let cases = [
        (50, 30, 8, 0.2f32, CfaConfig::default()),
        (600, 70, 33, 0.67, CfaConfig::default()),
        (256, 40, 16, 0.3, CfaConfig::default()),
        (300, 64, 12, 0.387, overlap),
        (40, 5, 6, 0.5, CfaConfig::default()),
    ];
    let mut seen = (false, false, false);
    let mut dphi = vec![f32::NAN; 7];
    for (n, m, d, radius, cfg) in cases {
        let phi = Var::from_tensor(&uniform((n, d))).unwrap();
        let centres = uniform((m, d));
        let sq: Vec<f32> = centres.sqr().unwrap().sum(1).unwrap().to_vec1().unwrap();
        let (_, dist) =
            tessera_cfa::nearest_centres(phi.as_tensor(), &centres, &sq, cfg.k + cfg.j).unwrap();
        let kj = dist.len() / n;
        let r2 = radius * radius;
        let att = dist
            .chunks(kj)
            .any(|ds| ds[..cfg.k.min(kj)].iter().any(|&v| v >= r2));
        let rep = dist.chunks(kj).any(|ds| {
            ds[cfg.j.min(kj)..]
                .iter()
                .any(|&v| r2 - v - cfg.alpha as f32 >= 0.0)
        });
        seen = (seen.0 || att, seen.1 || rep, seen.2 || (att && rep));
        let r = Var::new(&[radius], &dev).unwrap();
        let loss = soft_boundary_loss(phi.as_tensor(), &centres, &sq, r.as_tensor(), &cfg).unwrap();
        let grads = loss.backward().unwrap();
        let want_phi: Vec<f32> = grads
            .get(phi.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want_r = grads.get(r.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
        let ps: Vec<f32> = phi.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let cs: Vec<f32> = centres.flatten_all().unwrap().to_vec1().unwrap();
        // A reused buffer holding stale values from the previous case.
        let got =
            tessera_cfa::soft_boundary_grad(&ps, d, &cs, &sq, radius, &cfg, &mut dphi).unwrap();
        let want: f32 = loss.to_scalar().unwrap();
        let case = format!("n {n}, m {m}, d {d}, r {radius}");
        assert!(
            (got.loss - want).abs() <= 1e-4 * (1.0 + want.abs()),
            "{case}: loss {} vs {want}",
            got.loss
        );
        let scale = want_phi.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(scale > 0.0, "{case}: no gradient to compare");
        for (a, b) in dphi.iter().zip(&want_phi) {
            assert!((a - b).abs() <= 1e-4 * scale, "{case}: ∂φ {a} vs {b}");
        }
        assert!(
            (got.dr - want_r).abs() <= 1e-4 * (1.0 + want_r.abs()),
            "{case}: ∂r {} vs {want_r}",
            got.dr
        );
    }
    assert_eq!(
        seen,
        (true, true, true),
        "(attraction, repulsion, both) active"
    );
    // Too few centres for a repulsion term: no fused result (the tensor form is NaN there).
    let cfg = CfaConfig::default();
    assert!(tessera_cfa::soft_boundary_grad(
        &[0.0; 8], 4, &[0.0; 12], &[0.0; 3], 1.0, &cfg, &mut dphi
    )
    .is_none());
}

#[test]
fn fused_descriptor_step_matches_reference() {
    // The golden AMSGrad step of `loss_and_one_amsgrad_step_match_reference`, with the
    // descriptor's product, the loss and the parameter gradients computed by the fused pass.
    let g = golden();
    let x = embed(&features(&g), &[1, 2, 3]).unwrap();
    let rows = rows_with_coords(&x, &coords(8, 6, &Device::Cpu).unwrap()).unwrap();
    let (n, cin) = rows.dims2().unwrap();
    let xs: Vec<f32> = rows.flatten_all().unwrap().to_vec1().unwrap();
    let w = Var::from_tensor(&g["w0"]).unwrap();
    let b = Var::from_tensor(&g["b0"]).unwrap();
    let r = Var::new(&[0.3f32], &Device::Cpu).unwrap();
    let centres = &g["centres"];
    let csq: Vec<f32> = centres
        .sqr()
        .unwrap()
        .sum(D::Minus1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let wv: Vec<f32> = g["w0"].flatten_all().unwrap().to_vec1().unwrap();
    let bv: Vec<f32> = g["b0"].to_vec1().unwrap();
    let d = bv.len();
    let mut phi = Vec::new();
    tessera_cfa::descriptor_forward(&xs, cin, &wv, &bv, &mut phi);
    let want_phi: Vec<f32> = descriptor(&rows, w.as_tensor(), b.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (a, e) in phi.iter().zip(&want_phi) {
        assert!((a - e).abs() <= 1e-5 * (1.0 + e.abs()), "φ {a} vs {e}");
    }
    let cs: Vec<f32> = centres.flatten_all().unwrap().to_vec1().unwrap();
    let mut dphi = Vec::new();
    let lg =
        tessera_cfa::soft_boundary_grad(&phi, d, &cs, &csq, 0.3, &CfaConfig::default(), &mut dphi)
            .unwrap();
    let want: f32 = g["loss"].to_vec1::<f32>().unwrap()[0];
    assert!(
        (lg.loss - want).abs() <= 1e-4 * want.abs(),
        "loss {} vs {want}",
        lg.loss
    );
    let (dw, db) = tessera_cfa::descriptor_backward(&dphi, d, &xs, cin);
    assert_eq!((dw.len(), db.len(), n), (d * cin, d, 48 * 2));
    let mut grads = candle_core::backprop::GradStore::default();
    let dev = Device::Cpu;
    grads.insert(w.as_tensor(), Tensor::from_vec(dw, (d, cin), &dev).unwrap());
    grads.insert(b.as_tensor(), Tensor::from_vec(db, d, &dev).unwrap());
    grads.insert(
        r.as_tensor(),
        Tensor::from_vec(vec![lg.dr], 1, &dev).unwrap(),
    );
    golden_step(&[&w, &b, &r], &g, |opt| opt.step(&grads).unwrap());
}
