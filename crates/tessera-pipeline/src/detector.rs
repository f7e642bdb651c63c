//! The one path from an image batch to anomaly maps, and from a fitted detector to a model file
//! and back.

use crate::meta::ModelMeta;
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use tessera_backbone::Backbone;
use tessera_core::model::{ModelFile, FORMAT_VERSION};
use tessera_core::{postprocess, AnomalyMap, Error, FeatureMaps, Result, Scorer};
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
        Ok(Self {
            backbone,
            pfam,
            scorer,
            meta,
        })
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

    /// Backbone (and PFAM) features of a preprocessed batch.
    pub fn features(&self, batch: &Tensor) -> Result<FeatureMaps> {
        extract(&self.backbone, self.pfam.as_ref(), batch)
    }

    /// Anomaly maps at the network's input resolution for a preprocessed `B × 3 × H × W` batch.
    /// A map holding NaN or infinity is an error: a score that cannot be ranked must never
    /// pass as "normal".
    pub fn score(&self, batch: &Tensor) -> Result<(Vec<AnomalyMap>, StageTimes)> {
        let (_, _, h, w) = batch.dims4()?;
        let t0 = Instant::now();
        let features = self.features(batch)?;
        // Force the lazy device work to finish before timing the next stage.
        if let Some(t) = features.levels.last() {
            t.device().synchronize()?;
        }
        let t1 = Instant::now();
        let raw = self.scorer.score(&features)?;
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
        let t2 = Instant::now();
        let times = StageTimes {
            features_ms: (t1 - t0).as_secs_f64() * 1e3,
            score_ms: (t2 - t1).as_secs_f64() * 1e3,
        };
        Ok((maps, times))
    }
}
