//! The model file: one `.safetensors` file holding every tensor a fitted detector needs (backbone
//! weights included, so a model never depends on a weights file that may change) plus JSON
//! metadata under the `tessera` key of the safetensors header.
//!
//! `test` and `predict` both load a model through [`ModelFile::load`] and score through the same
//! code, so a saved model scores exactly like the one just fitted.

use crate::{Error, Result};
use candle_core::safetensors::Load;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Current model format version.
pub const FORMAT_VERSION: u32 = 1;
const META_KEY: &str = "tessera";

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

/// Which backbone produced the features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackboneMeta {
    /// Architecture name, e.g. `resnet18`.
    pub arch: String,
    /// Which stages feed the scorer (1-based: 1 = layer1).
    pub layers: Vec<usize>,
    /// Where the weights came from (file path or hub repo), for the record.
    pub source: String,
}

/// The scorer and its configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScorerMeta {
    /// `padim`, `patchcore`, `cfa`.
    pub kind: String,
    /// Scorer-specific configuration, as the scorer serialises it.
    pub config: serde_json::Value,
}

/// Facts about the fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitMeta {
    /// Wall time of the whole fit (features + scorer), seconds.
    pub seconds: f64,
    /// Number of training images.
    pub images: usize,
    /// The data the model was fitted on (path as given).
    pub data: String,
    /// Seconds since the Unix epoch when the fit finished.
    pub created_unix: u64,
}

/// Everything in a model file besides tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    pub format: u32,
    pub tessera_version: String,
    /// `baseline`, `sbm` (the scorer on an SBM-tuned backbone) or `ours` (SBM + PFAM).
    pub method: String,
    pub seed: u64,
    pub preprocess: Preprocess,
    pub backbone: BackboneMeta,
    pub scorer: ScorerMeta,
    pub fit: FitMeta,
    /// Default pixel threshold for predicted masks (`predict`), from the training images.
    pub threshold: f32,
    /// Score range used to colour heatmaps consistently across runs: (low, high).
    pub heat_range: (f32, f32),
    /// For `--method sbm`: the SBM run's gate and drift (from the tuned weights' report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sbm: Option<serde_json::Value>,
    /// For `--method ours`: the PFAM configuration (its tensors are stored under `pfam.`);
    /// features pass through PFAM before the scorer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pfam: Option<serde_json::Value>,
}

/// A model file in memory.
#[derive(Debug)]
pub struct ModelFile {
    pub meta: ModelMeta,
    pub tensors: HashMap<String, Tensor>,
}

impl ModelFile {
    /// Write the model atomically to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string(&self.meta)
            .map_err(|e| Error::bad_model(path, format!("cannot serialise metadata: {e}")))?;
        let mut info = HashMap::new();
        info.insert(META_KEY.to_string(), json);
        let mut items: Vec<(&String, &Tensor)> = self.tensors.iter().collect();
        items.sort_by(|a, b| a.0.cmp(b.0));
        crate::io::replace_atomic(path, |tmp| {
            safetensors::serialize_to_file(
                items.iter().map(|(k, v)| (k.as_str(), *v)),
                Some(info),
                tmp,
            )
            .map_err(std::io::Error::other)
        })
    }

    /// Read a model file, placing tensors on `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::bad_model(path, format!("not a safetensors file ({e})")))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::bad_model(path, format!("unreadable header ({e})")))?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| {
                Error::bad_model(
                    path,
                    "no Tessera metadata: this is not a Tessera model file (weights files go to --weights)",
                )
            })?;
        let meta: ModelMeta = serde_json::from_str(json)
            .map_err(|e| Error::bad_model(path, format!("bad Tessera metadata: {e}")))?;
        if meta.format > FORMAT_VERSION {
            return Err(Error::bad_model(
                path,
                format!(
                    "model format {} is newer than this build understands ({FORMAT_VERSION}); upgrade tessera",
                    meta.format
                ),
            ));
        }
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let t = view
                .load(device)
                .map_err(|e| Error::bad_model(path, format!("tensor {name}: {e}")))?;
            tensors.insert(name, t);
        }
        Ok(Self { meta, tensors })
    }

    /// Take a tensor by name or fail naming the file.
    pub fn take(&mut self, name: &str, path: &Path) -> Result<Tensor> {
        self.tensors
            .remove(name)
            .ok_or_else(|| Error::bad_model(path, format!("missing tensor '{name}'")))
    }

    /// All tensors whose name starts with `prefix.`, with the prefix stripped.
    pub fn with_prefix(&self, prefix: &str) -> HashMap<String, Tensor> {
        let p = format!("{prefix}.");
        self.tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&p).map(|s| (s.to_string(), v.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ModelMeta {
        ModelMeta {
            format: FORMAT_VERSION,
            tessera_version: crate::VERSION.into(),
            method: "baseline".into(),
            seed: 7,
            preprocess: Preprocess::paper(),
            backbone: BackboneMeta {
                arch: "resnet18".into(),
                layers: vec![1, 2, 3],
                source: "x".into(),
            },
            scorer: ScorerMeta {
                kind: "padim".into(),
                config: serde_json::json!({"d": 3}),
            },
            fit: FitMeta {
                seconds: 1.5,
                images: 3,
                data: "d".into(),
                created_unix: 0,
            },
            threshold: 0.5,
            heat_range: (0.0, 1.0),
            sbm: None,
            pfam: None,
        }
    }

    #[test]
    fn round_trip() {
        let dir = std::env::temp_dir().join(format!("tessera-model-{}", std::process::id()));
        let path = dir.join("m.safetensors");
        let t = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let mut tensors = HashMap::new();
        tensors.insert("backbone.w".to_string(), t.clone());
        tensors.insert("scorer.mean".to_string(), t);
        ModelFile {
            meta: meta(),
            tensors,
        }
        .save(&path)
        .unwrap();
        let m = ModelFile::load(&path, &Device::Cpu).unwrap();
        assert_eq!(m.meta, meta());
        assert_eq!(m.with_prefix("backbone").len(), 1);
        let v: Vec<Vec<f32>> = m.tensors["scorer.mean"].to_vec2().unwrap();
        assert_eq!(v, vec![vec![0., 1., 2.], vec![3., 4., 5.]]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_non_model() {
        let dir = std::env::temp_dir().join(format!("tessera-model-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
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
