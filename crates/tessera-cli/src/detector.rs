//! The one path from images to anomaly maps.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use tessera_backbone::{Arch, Backbone};
use tessera_cfa::{Cfa, CfaConfig};
use tessera_core::model::{ModelFile, ModelMeta};
use tessera_core::{postprocess, AnomalyMap, Scorer};
use tessera_padim::{Padim, PadimConfig};
use tessera_patchcore::{Patchcore, PatchcoreConfig};

/// A backbone, a fitted scorer and the model metadata.
pub struct Detector {
    pub backbone: Backbone,
    pub scorer: Box<dyn Scorer>,
    pub meta: ModelMeta,
}

/// Time spent in each stage of scoring a batch, milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimes {
    pub features_ms: f64,
    pub score_ms: f64,
}

impl Detector {
    /// Load a model file onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let mut file = ModelFile::load(path, device)?;
        let meta = file.meta.clone();
        let arch: Arch = meta.backbone.arch.parse()?;
        let depth = meta.backbone.layers.iter().copied().max().unwrap_or(3);
        let backbone = Backbone::from_tensors(
            arch.name(),
            &arch.spec(),
            file.with_prefix("backbone"),
            depth,
            device,
            &path.display().to_string(),
        )?;
        let scorer_tensors: HashMap<String, Tensor> = file.with_prefix("scorer");
        file.tensors.clear();
        let scorer: Box<dyn Scorer> = match meta.scorer.kind.as_str() {
            "padim" => {
                let cfg: PadimConfig = serde_json::from_value(meta.scorer.config.clone())
                    .with_context(|| format!("{}: bad padim configuration", path.display()))?;
                Box::new(
                    Padim::from_parts(cfg, scorer_tensors)
                        .with_context(|| path.display().to_string())?,
                )
            }
            "patchcore" => {
                let cfg: PatchcoreConfig = serde_json::from_value(meta.scorer.config.clone())
                    .with_context(|| format!("{}: bad patchcore configuration", path.display()))?;
                Box::new(
                    Patchcore::from_parts(cfg, scorer_tensors)
                        .with_context(|| path.display().to_string())?,
                )
            }
            "cfa" => {
                let cfg: CfaConfig = serde_json::from_value(meta.scorer.config.clone())
                    .with_context(|| format!("{}: bad cfa configuration", path.display()))?;
                Box::new(
                    Cfa::from_parts(cfg, scorer_tensors)
                        .with_context(|| path.display().to_string())?,
                )
            }
            other => bail!(
                "{}: unknown scorer '{other}' (this build knows: padim, patchcore, cfa)",
                path.display()
            ),
        };
        Ok(Self {
            backbone,
            scorer,
            meta,
        })
    }

    /// Model file tensors: the backbone checkpoint under `backbone.`, the scorer under `scorer.`.
    pub fn tensors(backbone: &Backbone, scorer: &dyn Scorer) -> Result<HashMap<String, Tensor>> {
        let mut t = HashMap::new();
        for (k, v) in backbone.checkpoint_tensors() {
            t.insert(format!("backbone.{k}"), v.clone());
        }
        for (k, v) in scorer.tensors()? {
            t.insert(format!("scorer.{k}"), v);
        }
        Ok(t)
    }

    /// Anomaly maps at the network's input resolution for a preprocessed `B × 3 × H × W` batch.
    pub fn score(&self, batch: &Tensor) -> Result<(Vec<AnomalyMap>, StageTimes)> {
        let (_, _, h, w) = batch.dims4()?;
        let t0 = Instant::now();
        let features = self.backbone.forward(batch)?;
        // Force the lazy device work to finish before timing the next stage.
        features
            .levels
            .last()
            .map(|t| t.device().synchronize())
            .transpose()?;
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
        let t2 = Instant::now();
        let times = StageTimes {
            features_ms: (t1 - t0).as_secs_f64() * 1e3,
            score_ms: (t2 - t1).as_secs_f64() * 1e3,
        };
        Ok((maps, times))
    }
}
