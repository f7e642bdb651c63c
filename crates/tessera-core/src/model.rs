//! The model file: one `.safetensors` file holding every tensor a fitted detector needs (backbone
//! weights included, so a model never depends on a weights file that may change) plus JSON
//! metadata under the `tessera` key of the safetensors header, and a SHA-256 of the tensors
//! under `tessera.sha256` (format 2 on), verified at every load.
//!
//! This module is the container; what the metadata says is typed by the crate that writes it
//! (`tessera-pipeline`'s `ModelMeta`). Tensors are grouped in sections by name prefix
//! (`backbone.`, `pfam.`, `scorer.`; [`ModelFile::section`]).
//!
//! Loading maps the file and copies each tensor once straight from the mapped pages (which are
//! released as it goes), so peak memory is the model, not the model twice; every float tensor
//! is checked for NaN and infinity, naming the tensor.

use crate::st::{LoadChecks, Mapped};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Current model format version: 2 added the tensor checksum.
pub const FORMAT_VERSION: u32 = 2;
/// The header key of the metadata JSON.
pub const META_KEY: &str = "tessera";
/// The header key of the content checksum (SHA-256, hex; [`crate::st::ContentHash`]).
pub const CHECKSUM_KEY: &str = "tessera.sha256";

/// How images are turned into network input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Resize to `resize × resize` (bilinear, antialiased).
    pub resize: u32,
    /// Then center-crop `crop × crop` (equal to `resize` for no crop).
    pub crop: u32,
    /// Per-channel normalisation mean (RGB).
    pub mean: [f32; 3],
    /// Per-channel normalisation std (RGB).
    pub std: [f32; 3],
}

impl Preprocess {
    /// The paper's convention: resize 256, center crop 224, ImageNet statistics.
    pub fn paper() -> Self {
        Self {
            resize: 256,
            crop: 224,
            ..Self::imagenet(256)
        }
    }
    /// anomalib's convention: resize 256, no crop.
    pub fn anomalib() -> Self {
        Self::imagenet(256)
    }
    fn imagenet(size: u32) -> Self {
        Self {
            resize: size,
            crop: size,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }
    /// Check the values make sense.
    pub fn validate(&self) -> Result<()> {
        if self.crop == 0 || self.crop > self.resize {
            return Err(Error::Config(format!(
                "crop {} must be between 1 and the resize size {}",
                self.crop, self.resize
            )));
        }
        if self.std.iter().any(|s| *s <= 0.0) {
            return Err(Error::Config("std must be positive".into()));
        }
        Ok(())
    }
}

/// The fields every model file's metadata has, whatever its version.
#[derive(Debug, Clone, Deserialize)]
struct Envelope {
    format: u32,
}

/// A model file in memory: metadata (JSON, typed by its writer) and tensors.
#[derive(Debug, Clone)]
pub struct ModelFile {
    /// The metadata object; it must hold `"format"`.
    pub meta: serde_json::Value,
    pub tensors: HashMap<String, Tensor>,
    /// The content checksum read from (or written to) the file; `None` for format-1 files.
    pub checksum: Option<String>,
}

impl ModelFile {
    /// A model file from typed metadata and tensors.
    pub fn new<M: Serialize>(meta: &M, tensors: HashMap<String, Tensor>) -> Result<Self> {
        let meta = serde_json::to_value(meta)
            .map_err(|e| Error::Config(format!("cannot serialise model metadata: {e}")))?;
        if meta.get("format").and_then(|f| f.as_u64()).is_none() {
            return Err(Error::Config(
                "model metadata must hold a \"format\" number".into(),
            ));
        }
        Ok(Self {
            meta,
            tensors,
            checksum: None,
        })
    }

    /// The metadata as `M`; errors name the file.
    pub fn meta<M: DeserializeOwned>(&self, path: &Path) -> Result<M> {
        serde_json::from_value(self.meta.clone())
            .map_err(|e| Error::bad_model(path, format!("bad Tessera metadata: {e}")))
    }

    /// Write the model atomically to `path`, with the checksum of its tensors in the header.
    /// Returns the checksum.
    pub fn save(&mut self, path: &Path) -> Result<String> {
        let json = serde_json::to_string(&self.meta)
            .map_err(|e| Error::bad_model(path, format!("cannot serialise metadata: {e}")))?;
        let mut info = HashMap::new();
        info.insert(META_KEY.to_string(), json);
        let items: Vec<(&str, &Tensor)> =
            self.tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let sum = crate::st::write(path, &items, info, Some(CHECKSUM_KEY))?
            .expect("a checksum was asked for");
        self.checksum = Some(sum.clone());
        Ok(sum)
    }

    /// Read a model file, placing tensors on `device`: the checksum is verified (format 2 on)
    /// and every float tensor checked for NaN and infinity.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let (meta, map) = Self::open_header(path)?;
        let checksum = map.metadata().get(CHECKSUM_KEY).cloned();
        if meta.get("format").and_then(|f| f.as_u64()).unwrap_or(0) >= 2 && checksum.is_none() {
            return Err(Error::bad_model(
                path,
                format!(
                    "the header has no {CHECKSUM_KEY} checksum; the file was edited or is damaged"
                ),
            ));
        }
        let checks = LoadChecks {
            finite: true,
            expect_hash: checksum.clone(),
        };
        let tensors = map.load(device, |_| true, &checks)?;
        Ok(Self {
            meta,
            tensors,
            checksum,
        })
    }

    /// The metadata of a model file without loading its tensors (for listings).
    pub fn read_meta(path: &Path) -> Result<serde_json::Value> {
        Ok(Self::open_header(path)?.0)
    }

    fn open_header(path: &Path) -> Result<(serde_json::Value, Mapped)> {
        let map = Mapped::open(path)?;
        let json = map.metadata().get(META_KEY).ok_or_else(|| {
            Error::bad_model(
                path,
                "no Tessera metadata: this is not a Tessera model file (weights files go to --weights)",
            )
        })?;
        let meta: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| Error::bad_model(path, format!("bad Tessera metadata: {e}")))?;
        let env: Envelope = serde_json::from_value(meta.clone())
            .map_err(|e| Error::bad_model(path, format!("bad Tessera metadata: {e}")))?;
        if env.format > FORMAT_VERSION {
            return Err(Error::bad_model(
                path,
                format!(
                    "model format {} is newer than this build understands ({FORMAT_VERSION}); upgrade tessera",
                    env.format
                ),
            ));
        }
        Ok((meta, map))
    }

    /// Take a tensor by name or fail naming the file.
    pub fn take(&mut self, name: &str, path: &Path) -> Result<Tensor> {
        self.tensors
            .remove(name)
            .ok_or_else(|| Error::bad_model(path, format!("missing tensor '{name}'")))
    }

    /// The tensors of a section: every tensor whose name starts with `prefix.`, with the prefix
    /// stripped (tensors share storage, nothing is copied).
    pub fn section(&self, prefix: &str) -> HashMap<String, Tensor> {
        let p = format!("{prefix}.");
        self.tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&p).map(|s| (s.to_string(), v.clone())))
            .collect()
    }

    /// Add a section: `tensors` stored as `prefix.name`.
    pub fn add_section(
        &mut self,
        prefix: &str,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
    ) {
        for (k, v) in tensors {
            self.tensors.insert(format!("{prefix}.{k}"), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Meta {
        format: u32,
        note: String,
    }

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tessera-model-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_with_checksum() {
        let dir = dir("rt");
        let path = dir.join("m.safetensors");
        let t = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let meta = Meta {
            format: FORMAT_VERSION,
            note: "x".into(),
        };
        let mut f = ModelFile::new(&meta, HashMap::new()).unwrap();
        f.add_section("backbone", [("w".to_string(), t.clone())]);
        f.add_section("scorer", [("mean".to_string(), t)]);
        let sum = f.save(&path).unwrap();
        let m = ModelFile::load(&path, &Device::Cpu).unwrap();
        assert_eq!(m.meta::<Meta>(&path).unwrap(), meta);
        assert_eq!(m.checksum.as_deref(), Some(sum.as_str()));
        assert_eq!(m.section("backbone").len(), 1);
        let v: Vec<Vec<f32>> = m.section("scorer")["mean"].to_vec2().unwrap();
        assert_eq!(v, vec![vec![0., 1., 2.], vec![3., 4., 5.]]);
        // One flipped byte in the data is caught by the checksum.
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let e = ModelFile::load(&path, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("checksum mismatch") && e.contains("m.safetensors"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_non_model() {
        let dir = dir("bad");
        let p = dir.join("junk.safetensors");
        std::fs::write(&p, b"not a model").unwrap();
        let e = ModelFile::load(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(
            e.contains("junk.safetensors") && e.contains("not a safetensors"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
