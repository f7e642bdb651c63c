//! "Load a model file and score an image" with the pipeline alone.
//!
//! ```text
//! cargo run --release -p tessera-pipeline --example score_image -- MODEL.safetensors IMAGE...
//! cargo run --release -p tessera-pipeline --example score_image
//! ```
//!
//! Without arguments it first fits a small PaDiM model on the built-in synthetic category (seeded
//! random backbone, so no download), then scores that category's test images.

use std::path::PathBuf;
use tessera_core::model::Preprocess;
use tessera_core::Result;
use tessera_data::{generate_category, Sample, SyntheticSpec};
use tessera_pipeline::{batches, fit, Detector, FitOptions, Silent};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tmp = std::env::temp_dir().join(format!("tessera-score-image-{}", std::process::id()));
    let (model, images): (PathBuf, Vec<PathBuf>) = if args.len() >= 2 {
        (
            args[0].clone().into(),
            args[1..].iter().map(PathBuf::from).collect(),
        )
    } else {
        let data = tmp.join("ring");
        generate_category(
            &data,
            &SyntheticSpec {
                size: 128,
                train: 10,
                test_good: 2,
                test_defect: 2,
                ..Default::default()
            },
        )?;
        let model = tmp.join("model.safetensors");
        let o = FitOptions::random_backbone(&data, &model, Preprocess::paper(), 0);
        let s = fit(&o, &Silent)?;
        println!("fitted {} in {:.1} s", s.model.display(), s.seconds);
        let test = tessera_data::Dataset::open(&data)?.test()?;
        (model, test.into_iter().map(|s| s.path).collect())
    };
    let device = candle_core::Device::Cpu;
    let det = Detector::load(&model, &device)?;
    let samples: Vec<Sample> = images
        .iter()
        .map(|p| Sample {
            path: p.clone(),
            defect_type: "unknown".into(),
            mask: None,
            name: p.display().to_string(),
        })
        .collect();
    let mut at = 0;
    for b in batches(&samples, &det.meta.preprocess, 8, &device) {
        let (maps, _) = det.score(&b?.tensor)?;
        for m in maps {
            let s = m.image_score();
            let verdict = if s >= det.meta.threshold {
                "ANOMALOUS"
            } else {
                "normal"
            };
            println!("{:>9}  {s:.3}  {}", verdict, samples[at].path.display());
            at += 1;
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
