//! Write a model file with two sections and read it back: the checksum is stored and verified,
//! and a damaged copy is refused with a message naming the file.
//!
//! ```text
//! cargo run -p tessera-core --example model_file
//! ```

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use tessera_core::model::{ModelFile, FORMAT_VERSION};

fn main() -> tessera_core::Result<()> {
    let dir = std::env::temp_dir().join(format!("tessera-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| tessera_core::Error::io(&dir, e))?;
    let path = dir.join("model.safetensors");
    let meta = serde_json::json!({ "format": FORMAT_VERSION, "note": "example" });
    let mut file = ModelFile::new(&meta, HashMap::new())?;
    let w = Tensor::randn(0f32, 1., (4, 3), &Device::Cpu)?;
    file.add_section("backbone", [("w".to_string(), w)]);
    file.add_section(
        "scorer",
        [(
            "mean".to_string(),
            Tensor::ones(3, candle_core::DType::F32, &Device::Cpu)?,
        )],
    );
    let checksum = file.save(&path)?;
    println!(
        "wrote {} (sha256 of the tensors {checksum})",
        path.display()
    );

    let back = ModelFile::load(&path, &Device::Cpu)?;
    println!(
        "read it back: sections backbone {} tensor(s), scorer {} tensor(s), note {}",
        back.section("backbone").len(),
        back.section("scorer").len(),
        back.meta["note"]
    );

    // Flip one byte of tensor data: the load refuses it.
    let mut bytes = std::fs::read(&path).map_err(|e| tessera_core::Error::io(&path, e))?;
    let n = bytes.len();
    bytes[n - 2] ^= 1;
    std::fs::write(&path, &bytes).map_err(|e| tessera_core::Error::io(&path, e))?;
    match ModelFile::load(&path, &Device::Cpu) {
        Err(e) => println!("a damaged copy is refused: {e}"),
        Ok(_) => println!("UNEXPECTED: the damaged copy loaded"),
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
