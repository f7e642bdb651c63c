//! The scorers this build knows, as one typed configuration: fit one, or restore one from a
//! model file. Each scorer describes itself ([`Restore::KIND`], its `Config`, its levels), so
//! this is the only place that lists them.

use crate::names::named_enum;
use crate::observer::{stage, Observer};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tessera_cfa::{Cfa, CfaConfig, FeatureTransform, TrainProgress};
use tessera_core::scorer::{FitScorer, Restore, Scorer};
use tessera_core::{Error, FeatureMaps, Result};
use tessera_padim::{Padim, PadimConfig};
use tessera_patchcore::{Patchcore, PatchcoreConfig};

named_enum! {
    /// The scorers this build can fit and load.
    #[derive(Default)]
    pub enum ScorerKind {
        #[default]
        Padim => "padim",
        Patchcore => "patchcore",
        Cfa => "cfa",
    }
}

/// A scorer's kind and hyper-parameters; in model files as `{"kind": …, "config": {…}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "config", rename_all = "lowercase")]
pub enum ScorerConfig {
    Padim(PadimConfig),
    Patchcore(PatchcoreConfig),
    Cfa(CfaConfig),
}

impl Default for ScorerConfig {
    fn default() -> Self {
        ScorerConfig::Padim(PadimConfig::default())
    }
}

impl ScorerConfig {
    /// The reference defaults of a kind.
    pub fn defaults(kind: ScorerKind) -> Self {
        match kind {
            ScorerKind::Padim => ScorerConfig::Padim(Default::default()),
            ScorerKind::Patchcore => ScorerConfig::Patchcore(Default::default()),
            ScorerKind::Cfa => ScorerConfig::Cfa(Default::default()),
        }
    }

    /// The configuration a fitted scorer reports: what `fit` resolved (e.g. PaDiM's default
    /// tie for the channels it saw), so the model file restores what was fitted.
    pub fn of(fitted: &dyn Scorer) -> Result<Self> {
        serde_json::from_value(serde_json::json!({
            "kind": fitted.kind(),
            "config": fitted.config(),
        }))
        .map_err(|e| Error::Config(format!("{} configuration: {e}", fitted.kind())))
    }

    /// The kind.
    pub fn kind(&self) -> ScorerKind {
        match self {
            ScorerConfig::Padim(_) => ScorerKind::Padim,
            ScorerConfig::Patchcore(_) => ScorerKind::Patchcore,
            ScorerConfig::Cfa(_) => ScorerKind::Cfa,
        }
    }

    /// The backbone levels the scorer reads (1-based).
    pub fn levels(&self) -> &[usize] {
        match self {
            ScorerConfig::Padim(c) => &c.levels,
            ScorerConfig::Patchcore(c) => &c.levels,
            ScorerConfig::Cfa(c) => &c.levels,
        }
    }

    /// The seed of the scorer's random choices.
    pub fn seed(&self) -> u64 {
        match self {
            ScorerConfig::Padim(c) => c.seed,
            ScorerConfig::Patchcore(c) => c.seed,
            ScorerConfig::Cfa(c) => c.seed,
        }
    }

    /// Set the seed of the scorer's random choices.
    pub fn set_seed(&mut self, seed: u64) {
        match self {
            ScorerConfig::Padim(c) => c.seed = seed,
            ScorerConfig::Patchcore(c) => c.seed = seed,
            ScorerConfig::Cfa(c) => c.seed = seed,
        }
    }

    /// Fit on streamed training features, reporting progress. The feature stage (driven by
    /// the caller's iterator) is finished here when the scorer's own stage starts. With
    /// `transform` (CFA only) the transform trains end to end with the scorer.
    pub fn fit(
        &self,
        batches: &mut dyn Iterator<Item = Result<FeatureMaps>>,
        transform: Option<&dyn FeatureTransform>,
        obs: &dyn Observer,
    ) -> Result<Box<dyn Scorer>> {
        if transform.is_some() && !matches!(self, ScorerConfig::Cfa(_)) {
            return Err(Error::Config(
                "only CFA can train a feature transform end to end".into(),
            ));
        }
        let own_stage = std::sync::Once::new();
        let begin = |name: &str, total: u64| {
            own_stage.call_once(|| {
                obs.finish(stage::FEATURES);
                obs.start(name, total);
            })
        };
        Ok(match self {
            ScorerConfig::Padim(c) => Box::new(c.fit(batches)?),
            ScorerConfig::Patchcore(c) => {
                let progress = |done: usize, total: usize| {
                    begin(stage::CORESET, total as u64);
                    obs.progress(stage::CORESET, done as u64, None);
                };
                let fitted = c.fit_with_progress(batches, &progress)?;
                if own_stage.is_completed() {
                    obs.finish(stage::CORESET);
                }
                Box::new(fitted)
            }
            ScorerConfig::Cfa(c) => {
                let progress = |p: TrainProgress| {
                    begin(stage::TRAIN, (p.epochs * p.batches) as u64);
                    let msg = format!("epoch {}/{} loss {:.3}", p.epoch, p.epochs, p.loss);
                    obs.progress(
                        stage::TRAIN,
                        ((p.epoch - 1) * p.batches + p.batch) as u64,
                        Some(&msg),
                    );
                };
                let fitted = match transform {
                    None => c.fit_with_progress(batches, &progress)?,
                    Some(t) => c.fit_end_to_end(batches, t, &progress)?,
                };
                if own_stage.is_completed() {
                    obs.finish(stage::TRAIN);
                }
                if let Some(last) = fitted.history().last() {
                    obs.note(&format!(
                        "cfa: {} epochs, final training loss {:.4}, radius {:.4}",
                        fitted.history().len(),
                        last.loss,
                        last.radius
                    ));
                }
                Box::new(fitted)
            }
        })
    }

    /// Rebuild the fitted scorer from a model file's `scorer.*` tensors; errors name `path`.
    pub fn restore(
        &self,
        tensors: HashMap<String, Tensor>,
        path: &Path,
    ) -> Result<Box<dyn Scorer>> {
        fn one<S: Restore>(
            c: &S::Config,
            t: HashMap<String, Tensor>,
            path: &Path,
        ) -> Result<Box<dyn Scorer>> {
            let s = S::restore(c.clone(), t).map_err(|e| e.in_file(path))?;
            Ok(Box::new(s))
        }
        match self {
            ScorerConfig::Padim(c) => one::<Padim>(c, tensors, path),
            ScorerConfig::Patchcore(c) => one::<Patchcore>(c, tensors, path),
            ScorerConfig::Cfa(c) => one::<Cfa>(c, tensors, path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_match_the_scorers() {
        assert_eq!(ScorerKind::Padim.name(), <Padim as Restore>::KIND);
        assert_eq!(ScorerKind::Patchcore.name(), <Patchcore as Restore>::KIND);
        assert_eq!(ScorerKind::Cfa.name(), <Cfa as Restore>::KIND);
        for k in [ScorerKind::Padim, ScorerKind::Patchcore, ScorerKind::Cfa] {
            let c = ScorerConfig::defaults(k);
            assert_eq!(c.kind(), k);
            let v = serde_json::to_value(&c).unwrap();
            assert_eq!(v["kind"], k.name());
            assert_eq!(serde_json::from_value::<ScorerConfig>(v).unwrap(), c);
        }
    }
}
