//! ms/image of PFAM's forward pass on ResNet-18 feature shapes at 224 px (X1 64×56×56,
//! X2 128×28×28, X3 256×14×14), inference (detached parameters: the fused attention), batch 1
//! and 8, and batch 1 with the attention's products in bf16 (CPUs with AVX512-BF16 only);
//! MFCSAM on X1 alone; and one X1-sized position attention (32 channels, 3,136 positions) by
//! the fused kernel and by the chunked candle-op path (chunk 512, the inference path before
//! the fused kernel).

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tessera_core::FeatureMaps;
use tessera_pfam::{position_attention, position_attention_chunked, Pfam, PfamConfig};

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let mut pfam = Pfam::new(PfamConfig::default(), [64, 128, 256], vb.pp("pfam"))
        .unwrap()
        .detached();
    let x = FeatureMaps::new(vec![
        Tensor::randn(0f32, 1., (1, 64, 56, 56), &dev).unwrap(),
        Tensor::randn(0f32, 1., (1, 128, 28, 28), &dev).unwrap(),
        Tensor::randn(0f32, 1., (1, 256, 14, 14), &dev).unwrap(),
    ]);
    let mut g = c.benchmark_group("pfam_r18_224");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1));
    g.bench_function("forward_batch1", |b| b.iter(|| pfam.forward(&x).unwrap()));
    if tessera_conv::bf16::supported() {
        // `--precision bf16`: the attention's products in bf16.
        let mut pb = pfam.clone();
        pb.set_bf16_products(true);
        g.bench_function("forward_batch1_bf16", |b| {
            b.iter(|| pb.forward(&x).unwrap())
        });
    }
    let x8 = FeatureMaps::new(
        x.levels
            .iter()
            .map(|l| Tensor::cat(&[l; 8], 0).unwrap())
            .collect(),
    );
    g.throughput(Throughput::Elements(8));
    g.bench_function("forward_batch8", |b| b.iter(|| pfam.forward(&x8).unwrap()));
    g.throughput(Throughput::Elements(1));
    pfam.set_chunk(Some(512)).unwrap();
    let x1 = x.levels[0].clone();
    g.bench_function("mfcsam_x1_only_batch1", |b| {
        b.iter(|| pfam.mfcsam1().forward(&x1).unwrap())
    });
    let q = Tensor::randn(0f32, 1., (1, 32, 3136), &dev).unwrap();
    let k = Tensor::randn(0f32, 1., (1, 32, 3136), &dev).unwrap();
    let v = Tensor::randn(0f32, 1., (1, 32, 3136), &dev).unwrap();
    g.bench_function("attention_x1_fused", |b| {
        b.iter(|| position_attention(&q, &k, &v, None).unwrap())
    });
    g.bench_function("attention_x1_chunked512", |b| {
        b.iter(|| position_attention_chunked(&q, &k, &v, Some(512)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
