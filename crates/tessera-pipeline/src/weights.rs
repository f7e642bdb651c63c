//! Where backbone weights come from.

use tessera_backbone::{Arch, Backbone, HubSpec, WeightsSource};
use tessera_core::{Error, Result};

/// The backbone and the source of its starting weights (shared by `fit` and `sbm train`).
#[derive(Debug, Clone, Default)]
pub struct WeightsArgs {
    pub backbone: Arch,
    /// Local `.safetensors` file.
    pub weights: Option<std::path::PathBuf>,
    /// Hub repository instead of the architecture's default.
    pub hub_repo: Option<String>,
    /// Seeded random backbone (demos and tests only).
    pub random_weights: Option<u64>,
}

impl WeightsArgs {
    /// The weights source these arguments name.
    pub fn source(&self) -> Result<WeightsSource> {
        Ok(match (&self.weights, self.random_weights, &self.hub_repo) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) | (None, Some(_), Some(_)) => {
                return Err(Error::Config(
                    "give one of --weights, --hub-repo and --random-weights".into(),
                ))
            }
            (Some(p), None, None) => WeightsSource::File(p.clone()),
            (None, Some(seed), None) => WeightsSource::Random { seed },
            (None, None, repo) => WeightsSource::Hub(HubSpec::new(
                repo.as_deref().unwrap_or(self.backbone.default_hub_repo()),
            )),
        })
    }
}

/// The first stage of every fit: the pretrained backbone, layers 1..=3, on `device`.
pub fn prepare_backbone(
    arch: Arch,
    source: &WeightsSource,
    device: &candle_core::Device,
) -> Result<Backbone> {
    Backbone::load(arch, source, 3, device)
}
