//! Whole-run evaluation (image and pixel AUROC, F1, AUPRO, per defect type) of a bottle-sized
//! test set: `cargo bench -p tessera-eval --bench evaluate`.

use criterion::{criterion_group, criterion_main, Criterion};
use tessera_core::test_util::Lcg;
use tessera_core::AnomalyMap;
use tessera_eval::{evaluate, EvalSample, RunInfo, Timings};

/// A test split in shape: `types` of (name, images), `w × h` maps, one rectangular region per
/// defective image.
fn test_set(types: &[(&str, usize)], w: usize, h: usize) -> Vec<EvalSample> {
    let mut rng = Lcg(12345);
    let mut next = move || rng.unit();
    let mut samples = Vec::new();
    for &(t, n) in types {
        for i in 0..n {
            let data: Vec<f32> = (0..w * h).map(|_| next() * 50.0).collect();
            let mask = (t != "good").then(|| {
                (0..w * h)
                    .map(|p| {
                        let (y, x) = ((p / w) as i64, (p % w) as i64);
                        (y - h as i64 / 2).abs() < 20 + i as i64 % 10
                            && (x - w as i64 / 3).abs() < 30
                    })
                    .collect()
            });
            samples.push(EvalSample {
                name: format!("{t}/{i:03}.png"),
                defect_type: t.to_string(),
                map: AnomalyMap::new(w, h, data),
                mask,
            });
        }
    }
    samples
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("evaluate");
    g.sample_size(10);
    // MVTec bottle's test split (three defect types) and KolektorSDD's (one), at the sizes
    // their maps have with the default preprocessing.
    let bottle = [
        ("good", 20),
        ("broken_large", 20),
        ("broken_small", 22),
        ("contamination", 21),
    ];
    for (name, types, w, h) in [
        ("bottle_83x224x224", &bottle[..], 224, 224),
        (
            "ksdd_139x224x576",
            &[("good", 87), ("defect", 52)][..],
            224,
            576,
        ),
    ] {
        let samples = test_set(types, w, h);
        g.bench_function(name, |b| {
            b.iter(|| evaluate(&samples, Timings::default(), RunInfo::default()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
