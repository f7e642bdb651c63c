//! The one path from images to anomaly maps.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use tessera_backbone::{Arch, Backbone};
use tessera_cfa::Cfa;
use tessera_core::model::{ModelFile, ModelMeta};
use tessera_core::{postprocess, AnomalyMap, FeatureMaps, Scorer};
use tessera_padim::Padim;
use tessera_patchcore::Patchcore;
use tessera_pfam::{Pfam, PfamConfig};

/// Rebuild a fitted scorer from its configuration and tensors, naming the model file on error.
fn scorer_from<C: serde::de::DeserializeOwned, S: Scorer + 'static>(
    path: &Path,
    kind: &str,
    config: &serde_json::Value,
    tensors: HashMap<String, Tensor>,
    from_parts: fn(C, HashMap<String, Tensor>) -> tessera_core::Result<S>,
) -> Result<Box<dyn Scorer>> {
    let cfg: C = serde_json::from_value(config.clone())
        .with_context(|| format!("{}: bad {kind} configuration", path.display()))?;
    let scorer = from_parts(cfg, tensors).with_context(|| path.display().to_string())?;
    Ok(Box::new(scorer))
}

/// A backbone, PFAM (for `--method ours`), a fitted scorer and the model metadata.
pub struct Detector {
    pub backbone: Backbone,
    pub pfam: Option<Pfam>,
    pub scorer: Box<dyn Scorer>,
    pub meta: ModelMeta,
}

/// Backbone features, through PFAM when there is one: what every scorer consumes.
pub fn extract(backbone: &Backbone, pfam: Option<&Pfam>, x: &Tensor) -> Result<FeatureMaps> {
    let f = backbone.forward(x)?;
    Ok(match pfam {
        Some(p) => p.forward(&f)?,
        None => f,
    })
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
        let pfam = match &meta.pfam {
            None => None,
            Some(cfg) => {
                let cfg: PfamConfig = serde_json::from_value(cfg.clone())
                    .with_context(|| format!("{}: bad PFAM configuration", path.display()))?;
                let ch = backbone.channels();
                if ch.len() != 3 {
                    bail!("{}: PFAM needs backbone layers 1..3", path.display());
                }
                let pfam_tensors: HashMap<String, Tensor> = file
                    .tensors
                    .iter()
                    .filter(|(k, _)| k.starts_with("pfam."))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                Some(
                    Pfam::load(&pfam_tensors, "pfam", cfg, [ch[0], ch[1], ch[2]], device)
                        .with_context(|| path.display().to_string())?,
                )
            }
        };
        file.tensors.clear();
        let cfg = &meta.scorer.config;
        let scorer: Box<dyn Scorer> = match meta.scorer.kind.as_str() {
            "padim" => scorer_from(path, "padim", cfg, scorer_tensors, Padim::from_parts)?,
            "patchcore" => scorer_from(
                path,
                "patchcore",
                cfg,
                scorer_tensors,
                Patchcore::from_parts,
            )?,
            "cfa" => scorer_from(path, "cfa", cfg, scorer_tensors, Cfa::from_parts)?,
            other => bail!(
                "{}: unknown scorer '{other}' (this build knows: padim, patchcore, cfa)",
                path.display()
            ),
        };
        Ok(Self {
            backbone,
            pfam,
            scorer,
            meta,
        })
    }

    /// Model file tensors: the backbone checkpoint under `backbone.`, PFAM under `pfam.`, the
    /// scorer under `scorer.`.
    pub fn tensors(
        backbone: &Backbone,
        pfam: Option<&Pfam>,
        scorer: &dyn Scorer,
    ) -> Result<HashMap<String, Tensor>> {
        let mut t = HashMap::new();
        for (k, v) in backbone.checkpoint_tensors() {
            t.insert(format!("backbone.{k}"), v.clone());
        }
        if let Some(p) = pfam {
            // PFAM names its tensors with its own `pfam.` prefix.
            t.extend(p.tensors());
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
        let features = extract(&self.backbone, self.pfam.as_ref(), batch)?;
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
