//! ms/image of PFAM's forward pass on ResNet-18 feature shapes at 224 px (X1 64×56×56,
//! X2 128×28×28, X3 256×14×14), batch 1, inference (detached parameters): the attention chunked
//! by 512 query rows (the default) and unchunked; plus MFCSAM on X1 alone.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tessera_core::FeatureMaps;
use tessera_pfam::{Pfam, PfamConfig};

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
    for (name, chunk) in [("chunk512_batch1", Some(512)), ("unchunked_batch1", None)] {
        pfam.set_chunk(chunk).unwrap();
        g.bench_function(name, |b| b.iter(|| pfam.forward(&x).unwrap()));
    }
    pfam.set_chunk(Some(512)).unwrap();
    let x1 = x.levels[0].clone();
    g.bench_function("mfcsam_x1_only_batch1", |b| {
        b.iter(|| pfam.mfcsam1().forward(&x1).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
