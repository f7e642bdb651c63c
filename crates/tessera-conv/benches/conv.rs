//! Single convolutions of every ResNet-18 layer1..3 shape (batch 8, 224 px input), and one
//! training step of ResNet-18 layer1..3 at batch 8 (frozen stem, loss = Σ layer3 · r, SGD with
//! Nesterov momentum) — Tessera's kernels against candle's stock conv2d.
//!
//! Variants: `packed` is the channels-last inference kernel the backbone runs (input already
//! NHWC, Winograd where eligible), `tessera` the NCHW custom op (PFAM, CFA), `candle` candle's
//! conv2d. Training: `tessera` runs channels-last (as the backbone trains), `tessera_nchw` the
//! NCHW custom op.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use criterion::{criterion_group, criterion_main, Criterion};
use tessera_conv::{
    add_relu, conv2d, conv2d_nhwc, stock_conv2d, to_nchw, to_nhwc, ConvParams, Nhwc, PackedConv,
};
use tessera_optim::{Sgd, SgdConfig};

type ConvFn =
    fn(&Tensor, &Tensor, Option<&Tensor>, ConvParams, bool) -> candle_core::Result<Tensor>;

struct Conv {
    w: Var,
    b: Var,
    p: ConvParams,
}

impl Conv {
    fn new(cin: usize, cout: usize, k: usize, stride: usize) -> Self {
        let dev = Device::Cpu;
        let std = (2.0 / (cin * k * k) as f64).sqrt();
        Self {
            w: Var::randn(0f32, std as f32, (cout, cin, k, k), &dev).unwrap(),
            b: Var::zeros(cout, DType::F32, &dev).unwrap(),
            p: ConvParams {
                stride,
                padding: k / 2,
                ..Default::default()
            },
        }
    }
    fn run(&self, f: ConvFn, x: &Tensor, relu: bool) -> Tensor {
        f(
            x,
            self.w.as_tensor(),
            Some(self.b.as_tensor()),
            self.p,
            relu,
        )
        .unwrap()
    }
}

/// ResNet-18 layer1..3 as (conv1, conv2, downsample) blocks.
fn r18() -> Vec<(Conv, Conv, Option<Conv>)> {
    let mut v = Vec::new();
    let mut cin = 64;
    for (planes, stride) in [(64, 1), (128, 2), (256, 2)] {
        for i in 0..2 {
            let s = if i == 0 { stride } else { 1 };
            let ds = (s != 1 || cin != planes).then(|| Conv::new(cin, planes, 1, s));
            v.push((
                Conv::new(cin, planes, 3, s),
                Conv::new(planes, planes, 3, 1),
                ds,
            ));
            cin = planes;
        }
    }
    v
}

fn forward(net: &[(Conv, Conv, Option<Conv>)], f: ConvFn, x: &Tensor) -> Tensor {
    let mut h = x.clone();
    for (c1, c2, ds) in net {
        let y = c2.run(f, &c1.run(f, &h, true), false);
        let skip = ds
            .as_ref()
            .map(|d| d.run(f, &h, false))
            .unwrap_or(h.clone());
        h = (y + skip).unwrap().relu().unwrap();
    }
    h
}

/// The same blocks channels-last (how the backbone trains on the CPU): one layout change in,
/// NHWC convolutions with the fused residual join, one layout change out.
fn forward_nhwc(net: &[(Conv, Conv, Option<Conv>)], x: &Tensor) -> Tensor {
    let conv = |c: &Conv, h: &Tensor, relu: bool| {
        conv2d_nhwc(h, c.w.as_tensor(), Some(c.b.as_tensor()), c.p, relu).unwrap()
    };
    let mut h = to_nhwc(x).unwrap();
    for (c1, c2, ds) in net {
        let y = conv(c2, &conv(c1, &h, true), false);
        let skip = ds.as_ref().map(|d| conv(d, &h, false)).unwrap_or(h.clone());
        h = add_relu(&y, &skip).unwrap();
    }
    to_nchw(&h).unwrap()
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut g = c.benchmark_group("conv_r18_shapes_b8");
    g.sample_size(10);
    for (cin, cout, k, s, hw) in [
        (3, 64, 7, 2, 224),
        (64, 64, 3, 1, 56),
        (64, 128, 3, 2, 56),
        (128, 128, 3, 1, 28),
        (64, 128, 1, 2, 56),
        (128, 256, 3, 2, 28),
        (256, 256, 3, 1, 14),
    ] {
        let conv = Conv::new(cin, cout, k, s);
        let x = Tensor::randn(0f32, 1., (8, cin, hw, hw), &dev).unwrap();
        let packed = PackedConv::from_tensors(conv.w.as_tensor(), Some(conv.b.as_tensor()), conv.p)
            .unwrap()
            .with_winograd();
        let xn = Nhwc::from_tensor(&x).unwrap();
        g.bench_function(format!("{cin}x{hw}->{cout}_k{k}s{s}/packed"), |b| {
            b.iter(|| packed.forward(&xn, None, true).unwrap())
        });
        for (name, f) in [
            ("tessera", conv2d as ConvFn),
            ("candle", stock_conv2d as ConvFn),
        ] {
            g.bench_function(format!("{cin}x{hw}->{cout}_k{k}s{s}/{name}"), |b| {
                b.iter(|| conv.run(f, &x, true))
            });
        }
    }
    g.finish();

    let net = r18();
    let vars: Vec<Var> = net
        .iter()
        .flat_map(|(a, b, d)| {
            let mut v = vec![a.w.clone(), a.b.clone(), b.w.clone(), b.b.clone()];
            if let Some(d) = d {
                v.extend([d.w.clone(), d.b.clone()]);
            }
            v
        })
        .collect();
    let stem = Tensor::randn(0f32, 1., (8, 64, 56, 56), &dev)
        .unwrap()
        .relu()
        .unwrap();
    let r = Tensor::randn(0f32, 1., (8, 256, 14, 14), &dev).unwrap();
    let mut g = c.benchmark_group("train_step_r18_b8");
    g.sample_size(10);
    for (name, f) in [
        ("tessera", None),
        ("tessera_nchw", Some(conv2d as ConvFn)),
        ("candle", Some(stock_conv2d as ConvFn)),
    ] {
        let mut opt = Sgd::new(
            vars.clone(),
            SgdConfig {
                lr: 1e-6,
                momentum: 0.9,
                nesterov: true,
                ..Default::default()
            },
        )
        .unwrap();
        g.bench_function(name, |b| {
            b.iter(|| {
                let out = match f {
                    Some(f) => forward(&net, f, &stem),
                    None => forward_nhwc(&net, &stem),
                };
                let loss = (out * &r).unwrap().sum_all().unwrap();
                opt.backward_step(&loss).unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
