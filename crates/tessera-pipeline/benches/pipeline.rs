//! ms/image of the inference path (ResNet-18 layer1..3 features + PaDiM Mahalanobis +
//! upsample/blur) at 224 px, batch 1 and 8, and of the part after the features alone — for
//! the paper's PaDiM (d = 100 per position, `padim_after_features`) and for the default (every
//! channel, covariances shared by 4 × 4 blocks, `padim_all_after_features`). Uses `../shared`
//! weights when present (the speed is the same with random weights, which are used otherwise).

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rayon::prelude::*;
use std::path::PathBuf;
use tessera_backbone::{Arch, Backbone, WeightsSource};
use tessera_core::model::*;
use tessera_core::scorer::FitScorer;
use tessera_core::FeatureMaps;
use tessera_padim::PadimConfig;
use tessera_pipeline::{BackboneMeta, Detector, FitMeta, Method, ModelMeta, ScorerConfig};

fn detector(config: PadimConfig) -> Detector {
    let dev = Device::Cpu;
    let w = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/weights/resnet18-imagenet1k-l3.safetensors");
    let src = if w.is_file() {
        WeightsSource::File(w)
    } else {
        WeightsSource::Random { seed: 0 }
    };
    let backbone = Backbone::load(Arch::ResNet18, &src, 3, &dev).unwrap();
    let mut batches = (0..4).map(|i| -> tessera_core::Result<FeatureMaps> {
        let x = Tensor::randn(0f32, 1., (8, 3, 224, 224), &dev)?.affine(1.0, i as f64 * 0.01)?;
        backbone.forward(&x)
    });
    let scorer = config.fit(&mut batches).unwrap();
    let meta = ModelMeta {
        format: FORMAT_VERSION,
        tessera_version: tessera_core::VERSION.into(),
        method: Method::Baseline,
        seed: 0,
        preprocess: Preprocess::paper(),
        backbone: BackboneMeta {
            arch: Arch::ResNet18,
            layers: vec![1, 2, 3],
            source: src.describe(),
        },
        scorer: ScorerConfig::Padim(config),
        fit: FitMeta {
            seconds: 0.0,
            images: 32,
            data: "bench".into(),
            created_unix: 0,
        },
        threshold: 0.0,
        heat_range: (0.0, 1.0),
        calibration: None,
        sbm: None,
        pfam: None,
        gate: None,
    };
    Detector {
        backbone,
        pfam: None,
        scorer: Box::new(scorer),
        meta,
    }
}

fn bench(c: &mut Criterion) {
    let paper = PadimConfig {
        dims: Some(100),
        ..Default::default()
    };
    let det = detector(paper);
    let mut g = c.benchmark_group("r18_features_padim");
    g.sample_size(10);
    for b in [1usize, 8] {
        let x = Tensor::zeros((b, 3, 224, 224), DType::F32, &Device::Cpu).unwrap();
        g.throughput(Throughput::Elements(b as u64));
        g.bench_function(format!("batch{b}"), |bench| {
            bench.iter(|| det.score(&x).unwrap())
        });
    }
    g.finish();
    after_features(c, &det, "padim_after_features");
    after_features(
        c,
        &detector(PadimConfig::default()),
        "padim_all_after_features",
    );
}

/// Everything after the features: PaDiM's reduction + Mahalanobis, upsampling to the input and
/// the blur (the part `Detector::score` adds to the backbone), per image.
fn after_features(c: &mut Criterion, det: &Detector, group: &str) {
    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    for b in [1usize, 8] {
        let x = Tensor::rand(0f32, 1., (b, 3, 224, 224), &Device::Cpu).unwrap();
        let f = det.features(&x).unwrap();
        g.throughput(Throughput::Elements(b as u64));
        g.bench_function(format!("batch{b}"), |bench| {
            bench.iter(|| {
                let raw = det.scorer.score(&f).unwrap();
                let maps: Vec<_> = (0..raw.batch)
                    .into_par_iter()
                    .map(|i| {
                        tessera_core::postprocess::finish_map(
                            raw.image(i),
                            raw.height,
                            raw.width,
                            224,
                            224,
                            det.scorer.blur_sigma(),
                        )
                    })
                    .collect();
                maps
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
