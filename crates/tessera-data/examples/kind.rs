//! Print the texture/object evidence of image folders: `cargo run --release -p tessera-data
//! --example kind -- FOLDER...` (a category root uses its `train/good`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for arg in std::env::args().skip(1) {
        let dir = std::path::PathBuf::from(&arg);
        let good = dir.join("train").join("good");
        let dir = if good.is_dir() { good } else { dir };
        let paths = tessera_data::list_images(&dir)?;
        let e = tessera_data::infer_kind(&paths)?;
        println!("{arg}: {}", e.describe());
    }
    Ok(())
}
