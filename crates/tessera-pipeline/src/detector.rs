//! The one path from an image batch to anomaly maps, and from a fitted detector to a model file
//! and back.

use crate::meta::ModelMeta;
use crate::scorer::ScorerConfig;
use crate::tiles::TileGrid;
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use tessera_backbone::{Backbone, Precision};
use tessera_core::model::Tiling;
use tessera_core::model::{ModelFile, FORMAT_VERSION};
use tessera_core::scorer::RawMaps;
use tessera_core::{postprocess, AnomalyMap, Error, FeatureMaps, Result, Scorer};
use tessera_eval::decision::Normalizer;
use tessera_pfam::Pfam;

/// A backbone, PFAM (for `--method ours`), a fitted scorer and the model metadata. `test`,
/// `predict` and the server score through [`Detector::score`] only, so a saved model never
/// scores differently from the one just fitted.
pub struct Detector {
    pub backbone: Backbone,
    pub pfam: Option<Pfam>,
    pub scorer: Box<dyn Scorer>,
    pub meta: ModelMeta,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detector")
            .field("backbone", &self.meta.backbone.arch)
            .field("pfam", &self.pfam.is_some())
            .field("scorer", &self.scorer.kind())
            .field("threshold", &self.meta.threshold)
            .finish()
    }
}

/// Time spent in each stage of scoring a batch, milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StageTimes {
    pub features_ms: f64,
    pub score_ms: f64,
}

/// Backbone features, through PFAM when there is one: what every scorer consumes.
pub fn extract(backbone: &Backbone, pfam: Option<&Pfam>, x: &Tensor) -> Result<FeatureMaps> {
    let f = backbone.forward(x)?;
    match pfam {
        Some(p) => p.forward(&f),
        None => Ok(f),
    }
}

/// The model-file sections.
pub mod section {
    /// The backbone checkpoint (torchvision names, not folded).
    pub const BACKBONE: &str = "backbone";
    /// PFAM's parameters (PFAM names them `pfam.*` itself).
    pub const PFAM: &str = "pfam";
    /// The fitted scorer's state.
    pub const SCORER: &str = "scorer";
}

impl Detector {
    /// Load a model file onto `device`. Its checksum and every tensor are checked; every error
    /// names the file.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Ok(Self::load_with_checksum(path, device)?.0)
    }

    /// [`Detector::load`], also returning the tensor checksum the file was verified against
    /// (`None` for format-1 files): the one that describes the tensors actually loaded, even
    /// if the file is replaced right after.
    pub fn load_with_checksum(path: &Path, device: &Device) -> Result<(Self, Option<String>)> {
        let file = ModelFile::load(path, device)?;
        let meta: ModelMeta = file.meta(path)?;
        let arch = meta.backbone.arch;
        let depth = meta.backbone.layers.iter().copied().max().unwrap_or(3);
        if !(1..=3).contains(&depth) || meta.backbone.layers.contains(&0) {
            return Err(Error::bad_model(
                path,
                format!(
                    "backbone layers {:?} must lie in 1..=3",
                    meta.backbone.layers
                ),
            ));
        }
        if meta.scorer.levels() != meta.backbone.layers.as_slice() {
            return Err(Error::bad_model(
                path,
                format!(
                    "the scorer reads levels {:?}, the backbone section records {:?}",
                    meta.scorer.levels(),
                    meta.backbone.layers
                ),
            ));
        }
        meta.preprocess.validate().map_err(|e| e.in_file(path))?;
        let backbone = Backbone::from_tensors(
            arch.name(),
            &arch.spec(),
            file.section(section::BACKBONE),
            depth,
            device,
            &path.display().to_string(),
        )?;
        let pfam = match &meta.pfam {
            None => None,
            Some(cfg) => {
                let ch = backbone.channels();
                if ch.len() != 3 {
                    return Err(Error::bad_model(path, "PFAM needs backbone layers 1..3"));
                }
                // PFAM names its tensors with its own `pfam.` prefix.
                let t: HashMap<String, Tensor> = file
                    .tensors
                    .iter()
                    .filter(|(k, _)| k.starts_with("pfam."))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                Some(
                    Pfam::load(
                        &t,
                        section::PFAM,
                        cfg.clone(),
                        [ch[0], ch[1], ch[2]],
                        device,
                    )
                    .map_err(|e| e.in_file(path))?,
                )
            }
        };
        let scorer = meta.scorer.restore(file.section(section::SCORER), path)?;
        let det = Self {
            backbone,
            pfam,
            scorer,
            meta,
        };
        Ok((det, file.checksum))
    }

    /// The model file this detector is: backbone checkpoint, PFAM, scorer state, metadata.
    pub fn to_model_file(&self) -> Result<ModelFile> {
        let mut meta = self.meta.clone();
        meta.format = FORMAT_VERSION;
        let mut f = ModelFile::new(&meta, HashMap::new())?;
        f.add_section(
            section::BACKBONE,
            self.backbone
                .checkpoint_tensors()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        if let Some(p) = &self.pfam {
            f.tensors.extend(p.tensors());
        }
        f.add_section(section::SCORER, self.scorer.tensors()?);
        Ok(f)
    }

    /// Write the model file atomically; returns its checksum.
    pub fn save(&self, path: &Path) -> Result<String> {
        self.to_model_file()?.save(path)
    }

    /// Run the backbone's products at `precision` from now on; bf16 where the CPU has native
    /// bf16 dot products, else f32 with a warning (the model file does not change: a model fitted
    /// in f32 scores in bf16 within bf16's rounding of its features).
    pub fn set_precision(&mut self, precision: Precision, obs: &dyn crate::observer::Observer) {
        self.backbone.set_precision(precision);
        // PFAM's attention follows the backbone (its products in bf16 only where it runs so).
        let bf16 = self.backbone.precision() == Precision::Bf16;
        if let Some(p) = &mut self.pfam {
            p.set_bf16_products(bf16);
        }
        if precision == Precision::Bf16 && self.backbone.precision() != Precision::Bf16 {
            obs.warn(
                "--precision bf16: this CPU has no native bf16 dot products (AVX512-BF16) or the \
                 model does not run on the CPU; running in f32",
            );
        }
    }

    /// Search a PatchCore model's memory bank this way from now on (a model file records the
    /// search it was fitted with; exact and brute force give the same scores, an approximate
    /// search does not). An error for the other scorers.
    pub fn set_patchcore_search(&mut self, search: tessera_patchcore::Search) -> Result<()> {
        let ScorerConfig::Patchcore(c) = &mut self.meta.scorer else {
            return Err(Error::Config(format!(
                "--patchcore-search applies to patchcore models; this one is {}",
                self.meta.scorer.kind().name()
            )));
        };
        c.search = search;
        let tensors: HashMap<String, Tensor> = self.scorer.tensors()?.into_iter().collect();
        self.scorer = self
            .meta
            .scorer
            .restore(tensors, Path::new("(the loaded model)"))?;
        Ok(())
    }

    /// Backbone (and PFAM) features of a preprocessed batch.
    pub fn features(&self, batch: &Tensor) -> Result<FeatureMaps> {
        extract(&self.backbone, self.pfam.as_ref(), batch)
    }

    /// Anomaly maps at the network's input resolution for a preprocessed `B × 3 × H × W` batch
    /// (tiled when the model's preprocessing says so). A map holding NaN or infinity is an
    /// error: a score that cannot be ranked must never pass as "normal".
    pub fn score(&self, batch: &Tensor) -> Result<(Vec<AnomalyMap>, StageTimes)> {
        let (maps, times) = match self.meta.preprocess.tiling {
            None => self.score_whole(batch)?,
            Some(t) => self.score_tiled(batch, t)?,
        };
        if let Some(i) = maps
            .iter()
            .position(|m| !m.image_score().is_finite() || m.data.iter().any(|v| !v.is_finite()))
        {
            return Err(Error::Config(format!(
                "the scorer produced a non-finite anomaly score for image {} of the batch (NaN \
                 or infinity): the model or the image is broken",
                i + 1
            )));
        }
        Ok((maps, times))
    }

    /// Features, then raw scores: the two timed stages.
    fn raw_scores(&self, batch: &Tensor, times: &mut StageTimes) -> Result<RawMaps> {
        let t0 = Instant::now();
        let features = self.features(batch)?;
        // Force the lazy device work to finish before timing the next stage.
        if let Some(t) = features.levels.last() {
            t.device().synchronize()?;
        }
        let t1 = Instant::now();
        let raw = self.scorer.score(&features)?;
        times.features_ms += (t1 - t0).as_secs_f64() * 1e3;
        times.score_ms += t1.elapsed().as_secs_f64() * 1e3;
        Ok(raw)
    }

    fn score_whole(&self, batch: &Tensor) -> Result<(Vec<AnomalyMap>, StageTimes)> {
        let (_, _, h, w) = batch.dims4()?;
        let mut times = StageTimes::default();
        let raw = self.raw_scores(batch, &mut times)?;
        let t = Instant::now();
        let sigma = self.scorer.blur_sigma();
        let maps: Vec<AnomalyMap> = (0..raw.batch)
            .into_par_iter()
            .map(|i| {
                let mut m =
                    postprocess::finish_map(raw.image(i), raw.height, raw.width, h, w, sigma);
                m.score = raw.image_scores.as_ref().map(|s| s[i]);
                m
            })
            .collect();
        times.score_ms += t.elapsed().as_secs_f64() * 1e3;
        Ok((maps, times))
    }

    /// Tiles of every image through the backbone and scorer (at most [`TILE_CHUNK`] tiles per
    /// pass), each tile map upsampled to the tile, stitched, then blurred once.
    fn score_tiled(&self, batch: &Tensor, t: Tiling) -> Result<(Vec<AnomalyMap>, StageTimes)> {
        let (b, _, h, w) = batch.dims4()?;
        let grid = TileGrid::new(w as u32, h as u32, t)?;
        let n = grid.count();
        let tiles = grid.split(batch)?;
        let ts = t.tile as usize;
        let mut times = StageTimes::default();
        let mut tile_maps: Vec<Vec<f32>> = Vec::with_capacity(b * n);
        let mut tile_scores: Vec<Option<f32>> = Vec::with_capacity(b * n);
        let mut start = 0;
        while start < b * n {
            let len = TILE_CHUNK.min(b * n - start);
            let raw = self.raw_scores(&tiles.narrow(0, start, len)?, &mut times)?;
            let t0 = Instant::now();
            let up: Vec<Vec<f32>> = (0..raw.batch)
                .into_par_iter()
                .map(|i| {
                    postprocess::upsample_bilinear(raw.image(i), raw.height, raw.width, ts, ts)
                })
                .collect();
            tile_maps.extend(up);
            tile_scores.extend((0..raw.batch).map(|i| raw.image_scores.as_ref().map(|s| s[i])));
            times.score_ms += t0.elapsed().as_secs_f64() * 1e3;
            start += len;
        }
        let t0 = Instant::now();
        let sigma = self.scorer.blur_sigma();
        let maps = (0..b)
            .into_par_iter()
            .map(|i| {
                let mut data = grid.stitch(&tile_maps[i * n..(i + 1) * n]);
                postprocess::gaussian_blur(&mut data, h, w, sigma);
                let mut m = AnomalyMap::new(w, h, data);
                // A scorer's own image scores (PatchCore's reweighting): the worst tile's.
                m.score = tile_scores[i * n..(i + 1) * n]
                    .iter()
                    .copied()
                    .collect::<Option<Vec<f32>>>()
                    .map(|v| v.into_iter().fold(f32::NEG_INFINITY, f32::max));
                m
            })
            .collect();
        times.score_ms += t0.elapsed().as_secs_f64() * 1e3;
        Ok((maps, times))
    }

    /// The image threshold: anomalous when the image score is above it.
    pub fn image_threshold(&self) -> f32 {
        self.meta.threshold
    }

    /// The pixel threshold of predicted masks.
    pub fn pixel_threshold(&self) -> f32 {
        self.meta
            .calibration
            .as_ref()
            .map_or(self.meta.threshold, |c| c.pixel_threshold)
    }

    /// The pixel threshold masks are drawn at: `threshold` when the caller decides at its own
    /// image threshold (one number for both), else the model's [`Self::pixel_threshold`].
    pub fn pixel_threshold_at(&self, threshold: Option<f32>) -> f32 {
        threshold.unwrap_or_else(|| self.pixel_threshold())
    }

    /// The decision on an image score at the model's threshold, or at `threshold`.
    pub fn verdict(&self, score: f32, threshold: Option<f32>) -> Verdict {
        let thr = threshold.unwrap_or(self.meta.threshold);
        let (normalized, p_value) = match &self.meta.calibration {
            Some(c) => (
                Normalizer {
                    threshold: thr,
                    ..c.image_normalizer()
                }
                .normalize(score),
                Some(c.p_value(score)),
            ),
            // Models from before calibration: the heat range stands in for the score range.
            None => (
                Normalizer {
                    threshold: thr,
                    min: self.meta.heat_range.0,
                    max: self.meta.heat_range.1,
                }
                .normalize(score),
                None,
            ),
        };
        Verdict {
            score,
            anomalous: score > thr,
            normalized,
            p_value,
            threshold: thr,
        }
    }
}

/// Tiles per backbone pass (bounds memory for images with many tiles).
pub const TILE_CHUNK: usize = 32;

/// The decision on one image.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Verdict {
    /// The raw image score.
    pub score: f32,
    /// `score > threshold`.
    pub anomalous: bool,
    /// anomalib's normalised score: 0.5 at the threshold.
    pub normalized: f32,
    /// How many calibration normals score this high (conformal p-value); `None` for models
    /// fitted before calibration existed.
    pub p_value: Option<f64>,
    /// The threshold decided at.
    pub threshold: f32,
}
