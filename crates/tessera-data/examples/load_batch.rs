//! Generate the deterministic synthetic demo category, open it as a dataset and load a
//! preprocessed batch with its masks.
//!
//! ```text
//! cargo run -p tessera-data --example load_batch
//! ```

use tessera_core::model::Preprocess;
use tessera_data::{generate_category, load_batch, Dataset, SyntheticSpec};

fn main() -> tessera_core::Result<()> {
    let root = std::env::temp_dir().join(format!("tessera-example-data-{}", std::process::id()));
    generate_category(
        &root,
        &SyntheticSpec {
            size: 96,
            train: 6,
            test_good: 2,
            test_defect: 2,
            ..Default::default()
        },
    )?;
    let ds = Dataset::open(&root)?;
    let (train, test) = (ds.train()?, ds.test()?);
    println!(
        "{}: {} training images, {} test images ({} anomalous)",
        ds.category(),
        train.len(),
        test.len(),
        test.iter().filter(|s| s.is_anomalous()).count()
    );
    let batch = load_batch(&test, &Preprocess::paper(), &candle_core::Device::Cpu)?;
    let defect_pixels: usize = batch
        .masks
        .iter()
        .flatten()
        .map(|m| m.iter().filter(|&&v| v).count())
        .sum();
    println!(
        "test batch {:?}, {} masks, {defect_pixels} defect pixels after preprocessing",
        batch.tensor.dims(),
        batch.masks.iter().flatten().count()
    );
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
