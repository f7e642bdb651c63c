//! Image and pixel metrics of a small run, and its Markdown report.
//!
//! ```text
//! cargo run -p tessera-eval --example metrics
//! ```

use tessera_core::AnomalyMap;
use tessera_eval::{auroc, evaluate, f1_max, EvalSample, RunInfo, Timings};

fn main() {
    // Eight 8×8 maps: four normal ones, four with a bright defect where the mask says.
    let mut samples = Vec::new();
    for i in 0..8 {
        let anomalous = i >= 4;
        let mut data = vec![0.1 + 0.01 * i as f32; 64];
        let mut mask = vec![false; 64];
        if anomalous {
            for p in [27, 28, 35, 36] {
                data[p] = 0.5 + 0.1 * i as f32;
                mask[p] = true;
            }
        }
        samples.push(EvalSample {
            name: format!("{}/{i:03}.png", if anomalous { "crack" } else { "good" }),
            defect_type: if anomalous { "crack" } else { "good" }.into(),
            map: AnomalyMap::new(8, 8, data),
            mask: anomalous.then_some(mask),
        });
    }
    let scores: Vec<f32> = samples.iter().map(|s| s.map.image_score()).collect();
    let labels: Vec<bool> = samples.iter().map(|s| s.is_anomalous()).collect();
    println!(
        "image AUROC {:?}, F1-max {:?}",
        auroc(&scores, &labels),
        f1_max(&scores, &labels)
    );
    let report = evaluate(&samples, Timings::default(), RunInfo::default());
    println!("{}", report.to_markdown());
}
