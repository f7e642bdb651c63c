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

/// Current model format version: 2 added the tensor checksum; 3 stores PaDiM's inverse
/// covariances as packed upper triangles (`inv_cov_upper`; format-2 files still load).
pub const FORMAT_VERSION: u32 = 3;
/// The header key of the metadata JSON.
pub const META_KEY: &str = "tessera";
/// The header key of the content checksum (SHA-256, hex; [`crate::st::ContentHash`]).
pub const CHECKSUM_KEY: &str = "tessera.sha256";

/// How images are turned into network input: a geometry (resize, crop), ImageNet
/// normalisation, and optionally tiles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PreprocessRepr", into = "PreprocessRepr")]
pub struct Preprocess {
    pub geometry: Geometry,
    /// Per-channel normalisation mean (RGB).
    pub mean: [f32; 3],
    /// Per-channel normalisation std (RGB).
    pub std: [f32; 3],
    /// Score the (resized) image in overlapping tiles, stitched back into one map.
    pub tiling: Option<Tiling>,
}

/// The size an image is brought to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Geometry {
    /// Resize to `resize × resize` (aspect ratio not kept), then center-crop `crop × crop`: the
    /// paper (256 / 224) and anomalib (256 / 256). A border of `(resize − crop) / 2` is lost.
    Square { resize: u32, crop: u32 },
    /// Resize to exactly `width × height`, no crop: the whole image is scored.
    Exact { width: u32, height: u32 },
    /// Keep the aspect ratio with the short side at `size` (long side rounded to a multiple of
    /// 32): resolved to [`Geometry::Exact`] from the training images at fit time.
    ShortSide { size: u32 },
    /// The training images' own size: resolved to [`Geometry::Exact`] at fit time.
    Native,
    /// Chosen from the training images at fit time ([`Preprocess::resolve`]): the paper's
    /// square resize + crop for (nearly) square images, and for elongated ones (long side over
    /// [`AUTO_ASPECT`] times the short) the whole image with its aspect ratio kept, short side
    /// 224 — squashing such an image into a square distorts it, and the crop cuts defects off
    /// its ends.
    Auto,
}

/// Above this ratio of long to short side, [`Geometry::Auto`] keeps the aspect ratio (a 4:3
/// image does, a 5:4 one does not).
pub const AUTO_ASPECT: f64 = 1.25;

/// Overlapping square tiles over the resized image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tiling {
    /// Tile side in pixels.
    pub tile: u32,
    /// Minimum overlap of neighbouring tiles in pixels (tiles are spread evenly, the last one
    /// flush with the edge).
    pub overlap: u32,
}

/// The serialised form: the square geometry as `resize` / `crop` (as in format-1 files), the
/// exact one as `width` / `height`.
#[derive(Serialize, Deserialize)]
struct PreprocessRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resize: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crop: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    short_side: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    native: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    auto: bool,
    mean: [f32; 3],
    std: [f32; 3],
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tiling: Option<Tiling>,
}

impl TryFrom<PreprocessRepr> for Preprocess {
    type Error = String;
    fn try_from(r: PreprocessRepr) -> std::result::Result<Self, String> {
        let geometry =
            match (
                r.resize,
                r.crop,
                r.width,
                r.height,
                r.short_side,
                r.native,
                r.auto,
            ) {
                (Some(resize), crop, None, None, None, false, false) => Geometry::Square {
                    resize,
                    crop: crop.unwrap_or(resize),
                },
                (None, None, Some(width), Some(height), None, false, false) => {
                    Geometry::Exact { width, height }
                }
                (None, None, None, None, Some(size), false, false) => Geometry::ShortSide { size },
                (None, None, None, None, None, true, false) => Geometry::Native,
                (None, None, None, None, None, false, true) => Geometry::Auto,
                _ => return Err(
                    "preprocessing needs exactly one of resize/crop, width/height, short_side, \
                     native or auto"
                        .into(),
                ),
            };
        Ok(Preprocess {
            geometry,
            mean: r.mean,
            std: r.std,
            tiling: r.tiling,
        })
    }
}

impl From<Preprocess> for PreprocessRepr {
    fn from(p: Preprocess) -> Self {
        let mut r = PreprocessRepr {
            resize: None,
            crop: None,
            width: None,
            height: None,
            short_side: None,
            native: false,
            auto: false,
            mean: p.mean,
            std: p.std,
            tiling: p.tiling,
        };
        match p.geometry {
            Geometry::Square { resize, crop } => {
                r.resize = Some(resize);
                r.crop = Some(crop);
            }
            Geometry::Exact { width, height } => {
                r.width = Some(width);
                r.height = Some(height);
            }
            Geometry::ShortSide { size } => r.short_side = Some(size),
            Geometry::Native => r.native = true,
            Geometry::Auto => r.auto = true,
        }
        r
    }
}

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl Preprocess {
    /// The paper's convention: resize 256, center crop 224, ImageNet statistics.
    pub fn paper() -> Self {
        Self::square(256, 224)
    }
    /// The default: the paper's for (nearly) square images, the whole image with its aspect
    /// ratio kept (short side 224) for elongated ones ([`Geometry::Auto`]).
    pub fn auto() -> Self {
        Self::with(Geometry::Auto)
    }
    /// anomalib's convention: resize 256, no crop.
    pub fn anomalib() -> Self {
        Self::square(256, 256)
    }
    /// Resize to `resize × resize`, center-crop `crop × crop`, ImageNet statistics.
    pub fn square(resize: u32, crop: u32) -> Self {
        Self::with(Geometry::Square { resize, crop })
    }
    /// Resize to `width × height` (the whole image), ImageNet statistics.
    pub fn exact(width: u32, height: u32) -> Self {
        Self::with(Geometry::Exact { width, height })
    }
    /// A geometry with ImageNet statistics and no tiling.
    pub fn with(geometry: Geometry) -> Self {
        Self {
            geometry,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            tiling: None,
        }
    }

    /// Whether the geometry still depends on the images ([`Geometry::ShortSide`],
    /// [`Geometry::Native`], [`Geometry::Auto`]).
    pub fn is_resolved(&self) -> bool {
        matches!(
            self.geometry,
            Geometry::Square { .. } | Geometry::Exact { .. }
        )
    }

    /// The fixed geometry for images of `size` (width, height): short-side and native
    /// geometries become exact, the automatic one square or exact; the others are returned as
    /// they are.
    pub fn resolve(&self, size: (u32, u32)) -> Self {
        let (w, h) = size;
        let geometry = match self.geometry {
            Geometry::ShortSide { size: s } => {
                let round32 = |v: f64| ((v / 32.0).round() as u32).max(1) * 32;
                if w <= h {
                    Geometry::Exact {
                        width: s,
                        height: round32(s as f64 * h as f64 / w.max(1) as f64),
                    }
                } else {
                    Geometry::Exact {
                        width: round32(s as f64 * w as f64 / h.max(1) as f64),
                        height: s,
                    }
                }
            }
            Geometry::Native => Geometry::Exact {
                width: w,
                height: h,
            },
            Geometry::Auto => {
                let (long, short) = (w.max(h) as f64, w.min(h).max(1) as f64);
                if long / short > AUTO_ASPECT {
                    Self::with(Geometry::ShortSide { size: 224 })
                        .resolve(size)
                        .geometry
                } else {
                    Self::paper().geometry
                }
            }
            g => g,
        };
        Self {
            geometry,
            ..self.clone()
        }
    }

    /// The network input size of one image (width, height), before tiling; `None` while the
    /// geometry is unresolved.
    pub fn input_size(&self) -> Option<(u32, u32)> {
        match self.geometry {
            Geometry::Square { crop, .. } => Some((crop, crop)),
            Geometry::Exact { width, height } => Some((width, height)),
            _ => None,
        }
    }

    /// Check the values make sense (an unresolved geometry is fine here; [`Self::resolve`]
    /// fixes it).
    pub fn validate(&self) -> Result<()> {
        const MAX_SIDE: u32 = 16_384;
        match self.geometry {
            Geometry::Square { resize, crop } => {
                if crop < 16 || crop > resize || resize > MAX_SIDE {
                    return Err(Error::Config(format!(
                        "crop {crop} must be between 16 and the resize size {resize} (at most {MAX_SIDE})"
                    )));
                }
            }
            Geometry::Exact { width, height } => {
                if width < 16 || height < 16 || width > MAX_SIDE || height > MAX_SIDE {
                    return Err(Error::Config(format!(
                        "image size {width}×{height}: each side must be 16..={MAX_SIDE} pixels"
                    )));
                }
            }
            Geometry::ShortSide { size } => {
                if !(16..=MAX_SIDE).contains(&size) {
                    return Err(Error::Config(format!(
                        "short side {size}: must be 16..={MAX_SIDE} pixels"
                    )));
                }
            }
            Geometry::Native | Geometry::Auto => {}
        }
        if self.std.iter().chain(&self.mean).any(|s| !s.is_finite())
            || self.std.iter().any(|s| *s <= 0.0)
        {
            return Err(Error::Config(
                "normalisation mean and std must be finite, std positive".into(),
            ));
        }
        if let Some(t) = self.tiling {
            if t.tile < 32 || t.overlap >= t.tile {
                return Err(Error::Config(format!(
                    "tiles of {} px with {} px overlap: tiles must be at least 32 px and the \
                     overlap smaller than a tile",
                    t.tile, t.overlap
                )));
            }
            if let Some((w, h)) = self.input_size() {
                if w < t.tile || h < t.tile {
                    return Err(Error::Config(format!(
                        "tiles of {} px do not fit the {w}×{h} image",
                        t.tile
                    )));
                }
            }
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

    /// The automatic geometry: the paper's for square and nearly square images, the whole
    /// image (aspect kept, short side 224) past the aspect threshold, in either orientation;
    /// it survives serialisation unresolved.
    #[test]
    fn auto_geometry_follows_the_aspect_ratio() {
        let g = |w, h| Preprocess::auto().resolve((w, h)).geometry;
        let paper = Preprocess::paper().geometry;
        assert_eq!(g(900, 900), paper);
        assert_eq!(g(1000, 800), paper); // 1.25: not above the threshold
        assert_eq!(
            g(800, 600),
            Geometry::Exact {
                width: 288,
                height: 224
            }
        );
        assert_eq!(
            g(250, 630),
            Geometry::Exact {
                width: 224,
                height: 576
            }
        );
        assert!(!Preprocess::auto().is_resolved());
        assert!(Preprocess::auto().resolve((250, 630)).is_resolved());
        let json = serde_json::to_string(&Preprocess::auto()).unwrap();
        assert!(json.contains("\"auto\":true"), "{json}");
        assert_eq!(
            serde_json::from_str::<Preprocess>(&json).unwrap(),
            Preprocess::auto()
        );
        let both = json.replace("\"auto\":true", "\"auto\":true,\"native\":true");
        assert!(serde_json::from_str::<Preprocess>(&both).is_err());
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
