//! Property tests: Tessera's convolution against candle's `conv2d` (forward) and against a
//! tap-by-tap convolution built from differentiable candle ops (backward: candle's own conv2d
//! backward ignores groups and breaks on some strides), over random shapes, strides, paddings,
//! dilations, groups and fused ReLU — for both the NCHW ops and the channels-last ones (inference
//! kernel with residual, trainable NHWC op). Tolerance: max abs error ≤ 1e-4 × (1 + max
//! |reference|).

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use tessera_conv::{
    add_relu, conv2d, conv2d_nhwc, max_pool, stock_conv2d, to_nchw, to_nhwc, ConvParams, Nhwc,
    PackedConv,
};
use tessera_core::test_util::assert_close;

/// `max |a − b| <= 1e-4 · (1 + max |b|)`.
fn close(a: &Tensor, b: &Tensor, what: &str) {
    assert_close(what, a, b, 1e-4);
}

/// A convolution written with basic differentiable candle ops (zero padding, index_select of the
/// strided/dilated taps, one matrix product per tap and group): the gradient reference, because
/// candle 0.11's own conv2d backward ignores `groups` and fails on some stride/size combinations.
fn reference_by_taps(x: &Tensor, w: &Tensor, b: &Tensor, p: ConvParams, relu: bool) -> Tensor {
    let (bs, cin, h, wd) = x.dims4().unwrap();
    let (cout, cg, kh, kw) = w.dims4().unwrap();
    let og = cout / p.groups;
    let ho = (h + 2 * p.padding - p.dilation * (kh - 1) - 1) / p.stride + 1;
    let wo = (wd + 2 * p.padding - p.dilation * (kw - 1) - 1) / p.stride + 1;
    let xp = x
        .pad_with_zeros(2, p.padding, p.padding)
        .unwrap()
        .pad_with_zeros(3, p.padding, p.padding)
        .unwrap();
    let dev = x.device();
    let mut outs = Vec::new();
    for g in 0..p.groups {
        let xg = xp.narrow(1, g * cg, cg).unwrap().contiguous().unwrap();
        let mut acc: Option<Tensor> = None;
        for ki in 0..kh {
            let rows: Vec<u32> = (0..ho)
                .map(|o| (o * p.stride + ki * p.dilation) as u32)
                .collect();
            let xr = xg
                .index_select(&Tensor::new(rows.as_slice(), dev).unwrap(), 2)
                .unwrap();
            for kj in 0..kw {
                let cols: Vec<u32> = (0..wo)
                    .map(|o| (o * p.stride + kj * p.dilation) as u32)
                    .collect();
                let tap = xr
                    .index_select(&Tensor::new(cols.as_slice(), dev).unwrap(), 3)
                    .unwrap(); // B×cg×ho×wo
                let wt = w
                    .narrow(0, g * og, og)
                    .unwrap()
                    .narrow(2, ki, 1)
                    .unwrap()
                    .narrow(3, kj, 1)
                    .unwrap();
                let wt = wt.reshape((og, cg)).unwrap();
                let t = wt
                    .broadcast_matmul(&tap.reshape((bs, cg, ho * wo)).unwrap())
                    .unwrap(); // B×og×hw
                acc = Some(match acc {
                    None => t,
                    Some(a) => (a + t).unwrap(),
                });
            }
        }
        outs.push(acc.unwrap().reshape((bs, og, ho, wo)).unwrap());
    }
    let _ = cin;
    let y = Tensor::cat(&outs, 1)
        .unwrap()
        .broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap())
        .unwrap();
    if relu {
        y.relu().unwrap()
    } else {
        y
    }
}

/// candle's conv2d per group, concatenated: the forward reference.
fn reference(x: &Tensor, w: &Tensor, b: &Tensor, p: ConvParams, relu: bool) -> Tensor {
    let (cin, cout) = (x.dims()[1], w.dims()[0]);
    let (cg, og) = (cin / p.groups, cout / p.groups);
    let outs: Vec<Tensor> = (0..p.groups)
        .map(|g| {
            let q = ConvParams { groups: 1, ..p };
            stock_conv2d(
                &x.narrow(1, g * cg, cg).unwrap(),
                &w.narrow(0, g * og, og).unwrap(),
                None,
                q,
                false,
            )
            .unwrap()
        })
        .collect();
    let y = Tensor::cat(&outs, 1)
        .unwrap()
        .broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap())
        .unwrap();
    if relu {
        y.relu().unwrap()
    } else {
        y
    }
}

/// The gradients of `Σ ours · r` and `Σ theirs · r` (one random `r`) agree for x, w and the
/// bias (`close`).
fn same_grads(ours: Tensor, theirs: Tensor, vars: [&Var; 3], what: &str) {
    let r = Tensor::randn(0f32, 1., ours.dims(), ours.device()).unwrap();
    let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (theirs * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (v, name) in vars.into_iter().zip(["dx", "dw", "db"]) {
        close(
            g1.get(v).unwrap(),
            g2.get(v).unwrap(),
            &format!("{what} {name}"),
        );
    }
}

#[test]
fn matches_candle_forward_and_backward_on_random_shapes() {
    let dev = Device::Cpu;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    for case in 0..60 {
        let groups = [1, 1, 2, 3][rng.random_range(0..4)];
        let cg = rng.random_range(1..5);
        let og = rng.random_range(1..5);
        let (kh, kw) = (rng.random_range(1..4), rng.random_range(1..4));
        let p = ConvParams {
            stride: rng.random_range(1..4),
            padding: rng.random_range(0..3),
            dilation: rng.random_range(1..3),
            groups,
        };
        let h = rng.random_range(((kh - 1) * p.dilation + 1).max(1)..12);
        let w_ = rng.random_range(((kw - 1) * p.dilation + 1).max(1)..12);
        let b = rng.random_range(1..4);
        let relu = rng.random_bool(0.5);
        let x = Var::randn(0f32, 1., (b, cg * groups, h, w_), &dev).unwrap();
        let w = Var::randn(0f32, 1., (og * groups, cg, kh, kw), &dev).unwrap();
        let bias = Var::randn(0f32, 1., og * groups, &dev).unwrap();
        let what = format!(
            "case {case}: b{b} c{} {h}x{w_} o{} k{kh}x{kw} {p:?} relu={relu}",
            cg * groups,
            og * groups
        );

        let ours = conv2d(
            x.as_tensor(),
            w.as_tensor(),
            Some(bias.as_tensor()),
            p,
            relu,
        )
        .unwrap();
        let theirs = reference(x.as_tensor(), w.as_tensor(), bias.as_tensor(), p, relu);
        close(&ours, &theirs, &format!("{what} forward"));

        let taps = reference_by_taps(x.as_tensor(), w.as_tensor(), bias.as_tensor(), p, relu);
        close(
            &taps,
            &theirs,
            &format!("{what} forward of the gradient reference"),
        );
        same_grads(ours, taps, [&x, &w, &bias], &what);
    }
}

#[test]
fn resnet_shapes_forward() {
    let dev = Device::Cpu;
    for (c, o, k, s, hw) in [
        (3, 64, 7, 2, 64),
        (64, 64, 3, 1, 28),
        (64, 128, 3, 2, 28),
        (64, 128, 1, 2, 28),
        (256, 64, 1, 1, 14),
    ] {
        let x = Tensor::randn(0f32, 1., (2, c, hw, hw), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.1, (o, c, k, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., o, &dev).unwrap();
        let p = ConvParams {
            stride: s,
            padding: k / 2,
            ..Default::default()
        };
        close(
            &conv2d(&x, &w, Some(&b), p, true).unwrap(),
            &stock_conv2d(&x, &w, Some(&b), p, true).unwrap(),
            &format!("resnet conv {c}->{o} k{k} s{s}"),
        );
    }
}

#[test]
fn bad_shapes_are_errors() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 4, 5, 5), candle_core::DType::F32, &dev).unwrap();
    let w = Tensor::zeros((2, 3, 3, 3), candle_core::DType::F32, &dev).unwrap();
    assert!(conv2d(&x, &w, None, ConvParams::default(), false).is_err());
    let w = Tensor::zeros((2, 4, 7, 7), candle_core::DType::F32, &dev).unwrap();
    assert!(conv2d(&x, &w, None, ConvParams::default(), false).is_err());
}

/// The path grouped convolutions take off the CPU when training (one candle conv per group)
/// has the same values and gradients as ours (run here on the CPU).
#[test]
fn split_groups_path_matches_forward_and_backward() {
    let dev = Device::Cpu;
    for (cin, cout, k, groups, relu) in [
        (16, 8, 3, 4, false),
        (8, 8, 5, 2, true),
        (12, 6, 3, 3, false),
    ] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, cin, 9, 7), &dev).unwrap()).unwrap();
        let w =
            Var::from_tensor(&Tensor::randn(0f32, 0.3, (cout, cin / groups, k, k), &dev).unwrap())
                .unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.1, cout, &dev).unwrap()).unwrap();
        let p = ConvParams {
            padding: k / 2,
            groups,
            ..Default::default()
        };
        let r = Tensor::randn(0f32, 1., (2, cout, 9, 7), &dev).unwrap();
        let run = |f: fn(
            &Tensor,
            &Tensor,
            Option<&Tensor>,
            ConvParams,
            bool,
        ) -> candle_core::Result<Tensor>| {
            let y = f(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), p, relu).unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = [&x, &w, &b].map(|v| g.get(v).unwrap().clone());
            (y, gs)
        };
        let (ya, ga) = run(conv2d);
        let (yb, gb) = run(tessera_conv::split_groups_conv2d);
        close(&yb, &ya, "split forward");
        for (a, b) in ga.iter().zip(&gb) {
            close(b, a, "split gradient");
        }
    }
}

/// A random convolution case (shapes, parameters, relu) from `rng`.
fn random_case(
    rng: &mut rand_chacha::ChaCha8Rng,
    dev: &Device,
) -> (Var, Var, Var, ConvParams, bool) {
    let groups = [1, 1, 2, 3][rng.random_range(0..4)];
    let cg = rng.random_range(1..6);
    let og = rng.random_range(1..6);
    let (kh, kw) = (rng.random_range(1..4), rng.random_range(1..4));
    let p = ConvParams {
        stride: rng.random_range(1..4),
        padding: rng.random_range(0..3),
        dilation: rng.random_range(1..3),
        groups,
    };
    let h = rng.random_range(((kh - 1) * p.dilation + 1).max(1)..12);
    let w_ = rng.random_range(((kw - 1) * p.dilation + 1).max(1)..12);
    let b = rng.random_range(1..4);
    let relu = rng.random_bool(0.5);
    (
        Var::randn(0f32, 1., (b, cg * groups, h, w_), dev).unwrap(),
        Var::randn(0f32, 1., (og * groups, cg, kh, kw), dev).unwrap(),
        Var::randn(0f32, 1., og * groups, dev).unwrap(),
        p,
        relu,
    )
}

/// The packed inference kernel (with and without a residual) and the trainable NHWC op, forward
/// and backward, against the references on random shapes.
#[test]
fn channels_last_matches_on_random_shapes() {
    let dev = Device::Cpu;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for case in 0..60 {
        let (x, w, bias, p, relu) = random_case(&mut rng, &dev);
        let what = format!(
            "case {case}: x {:?} w {:?} {p:?} relu={relu}",
            x.dims(),
            w.dims()
        );
        let theirs = reference(x.as_tensor(), w.as_tensor(), bias.as_tensor(), p, relu);

        // Inference kernel, plain and with a residual added before the ReLU; general GEMM and
        // packed panels (with_panels, where the CPU has AVX-512F).
        let packed = PackedConv::from_tensors(w.as_tensor(), Some(bias.as_tensor()), p).unwrap();
        let xn = Nhwc::from_tensor(x.as_tensor()).unwrap();
        let res = Tensor::randn(0f32, 1., theirs.dims(), &dev).unwrap();
        let lin = reference(x.as_tensor(), w.as_tensor(), bias.as_tensor(), p, false);
        let want = (lin + &res).unwrap();
        let want = if relu { want.relu().unwrap() } else { want };
        for (packed, kind) in [(packed.clone(), "gemm"), (packed.with_panels(), "panels")] {
            let y = packed
                .forward(&xn, None, relu)
                .unwrap()
                .to_tensor(&dev)
                .unwrap();
            close(&y, &theirs, &format!("{what} packed ({kind})"));
            let y = packed
                .forward(&xn, Some(&Nhwc::from_tensor(&res).unwrap()), relu)
                .unwrap()
                .to_tensor(&dev)
                .unwrap();
            close(&y, &want, &format!("{what} packed ({kind}) + residual"));
        }

        // Trainable op: forward and the three gradients.
        let ours = to_nchw(
            &conv2d_nhwc(
                &to_nhwc(x.as_tensor()).unwrap(),
                w.as_tensor(),
                Some(bias.as_tensor()),
                p,
                relu,
            )
            .unwrap(),
        )
        .unwrap();
        close(&ours, &theirs, &format!("{what} nhwc forward"));
        let taps = reference_by_taps(x.as_tensor(), w.as_tensor(), bias.as_tensor(), p, relu);
        same_grads(ours, taps, [&x, &w, &bias], &format!("{what} nhwc"));
    }
}

/// ResNet-sized layers (tiling, channel splits at batch 1, 1×1 GEMM paths) against candle's
/// stock conv2d, forward and backward (even sizes: candle's backward breaks on some odd ones).
/// `skip`, moved so that no element of `conv + skip` lies within 1e-3 of 0 (to ±2e-3, its sign
/// kept). The two convolutions round differently (~1e-6), and a ReLU input that close to 0 can
/// fall on different sides of it in each: the gradient then passes in one and not the other, a
/// difference of a whole product `w·r` in `dx` that says nothing about the convolutions. With
/// ~10⁵ outputs per shape that happened in about 3 % of runs.
fn away_from_zero(conv: &Tensor, skip: Tensor) -> Tensor {
    let c: Vec<f32> = conv.flatten_all().unwrap().to_vec1().unwrap();
    let mut s: Vec<f32> = skip.flatten_all().unwrap().to_vec1().unwrap();
    for (v, &x) in s.iter_mut().zip(&c) {
        let pre = x + *v;
        if pre.abs() < 1e-3 {
            *v += if pre >= 0.0 { 2e-3 } else { -2e-3 };
        }
    }
    Tensor::from_vec(s, skip.dims(), skip.device()).unwrap()
}

#[test]
fn channels_last_resnet_shapes_forward_and_backward() {
    let dev = Device::Cpu;
    for (b, c, o, k, s, hw) in [
        (2, 3, 64, 7, 2, 40),
        (2, 64, 64, 3, 1, 28),
        (1, 256, 256, 3, 1, 14),
        (2, 64, 128, 3, 2, 28),
        (2, 64, 128, 1, 2, 28),
        (1, 256, 512, 1, 1, 14),
    ] {
        let x = Var::randn(0f32, 1., (b, c, hw, hw), &dev).unwrap();
        let w = Var::randn(0f32, 0.05, (o, c, k, k), &dev).unwrap();
        let bias = Var::randn(0f32, 1., o, &dev).unwrap();
        let p = ConvParams {
            stride: s,
            padding: k / 2,
            ..Default::default()
        };
        let what = format!("b{b} {c}->{o} k{k} s{s} {hw}px");
        let theirs = stock_conv2d(
            x.as_tensor(),
            w.as_tensor(),
            Some(bias.as_tensor()),
            p,
            false,
        )
        .unwrap();
        let skip = Tensor::randn(0f32, 1., theirs.dims(), &dev).unwrap();
        let skip = away_from_zero(&theirs, skip);
        let theirs = (theirs + &skip).unwrap().relu().unwrap();
        let ours = conv2d_nhwc(
            &to_nhwc(x.as_tensor()).unwrap(),
            w.as_tensor(),
            Some(bias.as_tensor()),
            p,
            false,
        )
        .unwrap();
        let ours = to_nchw(&add_relu(&ours, &to_nhwc(&skip).unwrap()).unwrap()).unwrap();
        close(&ours, &theirs, &format!("{what} forward"));
        same_grads(ours, theirs, [&x, &w, &bias], &what);
    }
}

/// Max-pooling with −∞ padding against a direct loop; the layout round trip is exact.
#[test]
fn max_pool_and_relayout() {
    let dev = Device::Cpu;
    let (n, c, h, w) = (2, 5, 9, 8);
    let x = Tensor::randn(0f32, 1., (n, c, h, w), &dev).unwrap();
    let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (k, s, pad) in [(3, 2, 1), (2, 2, 0), (3, 1, 1), (3, 3, 0)] {
        let ho = (h + 2 * pad - k) / s + 1;
        let wo = (w + 2 * pad - k) / s + 1;
        let mut want = vec![f32::NEG_INFINITY; n * c * ho * wo];
        for i in 0..n * c {
            for oy in 0..ho {
                for ox in 0..wo {
                    for dy in 0..k {
                        for dx in 0..k {
                            let (yy, xx) = (
                                (oy * s + dy) as isize - pad as isize,
                                (ox * s + dx) as isize - pad as isize,
                            );
                            if yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < w {
                                let o = &mut want[(i * ho + oy) * wo + ox];
                                *o = o.max(v[(i * h + yy as usize) * w + xx as usize]);
                            }
                        }
                    }
                }
            }
        }
        let got = max_pool(&Nhwc::from_tensor(&x).unwrap(), k, s, pad)
            .unwrap()
            .to_nchw();
        assert_eq!(got, want, "max-pool k{k} s{s} p{pad}");
    }
    let back = to_nchw(&to_nhwc(&x).unwrap()).unwrap();
    assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), v);
    assert_eq!(Nhwc::from_tensor(&x).unwrap().to_nchw(), v);
    assert!(max_pool(&Nhwc::from_tensor(&x).unwrap(), 0, 1, 0).is_err());
}

/// The residual join and the layout changes: exact, forward and backward.
#[test]
fn add_relu_and_relayout_gradients() {
    let dev = Device::Cpu;
    let a = Var::randn(0f32, 1., (2, 64, 28, 28), &dev).unwrap();
    let skip = Tensor::randn(0f32, 1., (2, 64, 28, 28), &dev).unwrap();
    let r = Tensor::randn(0f32, 1., (2, 64, 28, 28), &dev).unwrap();
    let ours =
        to_nchw(&add_relu(&to_nhwc(a.as_tensor()).unwrap(), &to_nhwc(&skip).unwrap()).unwrap())
            .unwrap();
    let theirs = (a.as_tensor() + &skip).unwrap().relu().unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(flat(&ours), flat(&theirs));
    let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (theirs * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(flat(g1.get(&a).unwrap()), flat(g2.get(&a).unwrap()));
    let round = to_nchw(&to_nhwc(a.as_tensor()).unwrap()).unwrap();
    let g = (round * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(flat(g.get(&a).unwrap()), flat(&r));
}

/// Winograd F(2×2, 3×3) against candle: odd and even sizes, paddings 0–2, batch 1–2, residual
/// and ReLU, ResNet-sized channel counts, a `U` too large for the fused per-block path; general
/// GEMM and packed panels; on 1 and 8 threads (8 split the output channels of small layers).
#[test]
fn winograd_matches() {
    for threads in [1, 8] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            winograd_cases(false);
            winograd_cases(true);
        });
    }
}

fn winograd_cases(panels: bool) {
    let dev = Device::Cpu;
    for (b, c, o, hw, pad, relu) in [
        (1, 3, 5, 5, 1, false),
        (2, 4, 6, 7, 0, true),
        (1, 5, 3, 6, 2, false),
        (2, 16, 32, 9, 1, true),
        (1, 64, 64, 14, 1, true),
        (2, 128, 64, 11, 1, false),
        (1, 128, 128, 12, 1, true),
        (1, 512, 256, 12, 1, true),
    ] {
        let x = Tensor::randn(0f32, 1., (b, c, hw, hw + 1), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.2, (o, c, 3, 3), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1., o, &dev).unwrap();
        let p = ConvParams {
            padding: pad,
            ..Default::default()
        };
        let packed = PackedConv::from_tensors(&w, Some(&bias), p).unwrap();
        assert!(packed.winograd_eligible());
        let packed = packed.with_winograd();
        let packed = if panels { packed.with_panels() } else { packed };
        let lin = reference(&x, &w, &bias, p, false);
        let res = Tensor::randn(0f32, 1., lin.dims(), &dev).unwrap();
        let want = (&lin + &res).unwrap();
        let want = if relu { want.relu().unwrap() } else { want };
        let xn = Nhwc::from_tensor(&x).unwrap();
        let got = packed
            .forward(&xn, Some(&Nhwc::from_tensor(&res).unwrap()), relu)
            .unwrap()
            .to_tensor(&dev)
            .unwrap();
        close(
            &got,
            &want,
            &format!("winograd b{b} {c}->{o} {hw}px pad {pad} panels={panels}"),
        );
        let plain = packed
            .forward(&xn, None, false)
            .unwrap()
            .to_tensor(&dev)
            .unwrap();
        close(
            &plain,
            &lin,
            &format!("winograd b{b} {c}->{o} {hw}px pad {pad} panels={panels}, plain"),
        );
    }
    // Not eligible: stride 2 stays on im2col (and is still right).
    let p = ConvParams {
        stride: 2,
        padding: 1,
        ..Default::default()
    };
    let w = Tensor::randn(0f32, 0.2, (4, 3, 3, 3), &dev).unwrap();
    assert!(!PackedConv::from_tensors(&w, None, p)
        .unwrap()
        .winograd_eligible());
}

/// bf16 products (on CPUs with AVX512-BF16): random shapes and ResNet-sized layers (Winograd,
/// strided im2col, 1×1, channel splits at batch 1, groups) against the f32 reference, within
/// bf16 rounding: each product of two operands rounded to 2⁻⁸ is off by at most ~2⁻⁷ of its
/// size, so every output by at most ~2⁻⁷ · Σ |x| |w| (Winograd's transforms widen the operands
/// a few times): max abs error ≤ 2 % × max Σ |x| |w| (the convolution of |x| and |w|). A
/// relative bound on the outputs themselves is not one — an output that cancels to near zero
/// keeps its terms' rounding — and failed on such cases. A wrong index is off by the values
/// themselves.
#[test]
fn bf16_products_match_within_rounding() {
    if !tessera_conv::bf16::supported() {
        eprintln!("SKIPPED: this CPU has no AVX512-BF16 (with_bf16 keeps f32 here)");
        let w = Tensor::ones((2, 2, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
        let p = PackedConv::from_tensors(&w, None, ConvParams::default()).unwrap();
        assert!(!p.with_bf16().is_bf16());
        return;
    }
    let dev = Device::Cpu;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut cases: Vec<(Tensor, Tensor, Tensor, ConvParams, bool)> = (0..30)
        .map(|_| {
            let (x, w, b, p, relu) = random_case(&mut rng, &dev);
            (
                x.as_tensor().clone(),
                w.as_tensor().clone(),
                b.as_tensor().clone(),
                p,
                relu,
            )
        })
        .collect();
    for (b, c, o, k, s, hw) in [
        (2, 3, 64, 7, 2, 40),
        (2, 64, 64, 3, 1, 28),
        (1, 256, 256, 3, 1, 14),
        (2, 64, 128, 3, 2, 28),
        (1, 256, 512, 1, 1, 14),
        (1, 100, 70, 3, 1, 9),
        (1, 128, 128, 3, 1, 12),
        (1, 512, 256, 3, 1, 12),
    ] {
        let p = ConvParams {
            stride: s,
            padding: k / 2,
            ..Default::default()
        };
        cases.push((
            Tensor::randn(0f32, 1., (b, c, hw, hw), &dev).unwrap(),
            Tensor::randn(0f32, 0.05, (o, c, k, k), &dev).unwrap(),
            Tensor::randn(0f32, 1., o, &dev).unwrap(),
            p,
            true,
        ));
    }
    // On 8 threads as well: small Winograd layers then split their output channels.
    for threads in [2, 8] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            for (i, (x, w, bias, p, relu)) in cases.iter().enumerate() {
                let what = format!("case {i}: x {:?} w {:?} {p:?}", x.dims(), w.dims());
                let theirs = reference(x, w, bias, *p, *relu);
                let packed = PackedConv::from_tensors(w, Some(bias), *p)
                    .unwrap()
                    .with_winograd()
                    .with_bf16();
                assert!(packed.is_bf16(), "{what}");
                let y = packed
                    .forward(&Nhwc::from_tensor(x).unwrap(), None, *relu)
                    .unwrap()
                    .to_tensor(&dev)
                    .unwrap();
                let magnitude = reference(
                    &x.abs().unwrap(),
                    &w.abs().unwrap(),
                    &bias.zeros_like().unwrap(),
                    *p,
                    false,
                );
                let scale = magnitude.max_all().unwrap().to_scalar::<f32>().unwrap();
                let err = (&y - &theirs)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                eprintln!(
                    "{what}: error {err:.3e} = {:.2e} of max Σ|x||w| {scale:.3}",
                    err / scale
                );
                assert!(
                    err <= 2e-2 * scale,
                    "{what}: max abs error {err} > 2 % of {scale}"
                );
            }
        });
    }
}
