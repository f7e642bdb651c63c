//! The fitted CFA model: restoring it from a model file and scoring.

use crate::centres::search_rows;
use crate::partition::Partition;
use crate::{coords, descriptor, embed, nearest_centres, rows_with_coords, CfaConfig, EpochStats};
use candle_core::{DType, Tensor, D};
use std::collections::HashMap;
use tessera_core::scorer::{grid_tensor, RawMaps, Restore, Scorer, StoredTensors};
use tessera_core::tensor::with_f32_slice;
use tessera_core::{Error, FeatureMaps, Result};

/// A fitted CFA model.
#[derive(Debug, Clone)]
pub struct Cfa {
    pub(crate) config: CfaConfig,
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) centres: Tensor,
    pub(crate) centres_sq: Vec<f32>,
    pub(crate) height: usize,
    pub(crate) width: usize,
    pub(crate) history: Vec<EpochStats>,
    /// The bank grouped by position for the bounded search, built at the first score (shared
    /// by clones).
    pub(crate) partition: std::sync::Arc<std::sync::OnceLock<Option<Partition>>>,
}

impl Restore for Cfa {
    const KIND: &'static str = "cfa";
    type Config = CfaConfig;

    fn restore(config: CfaConfig, tensors: HashMap<String, Tensor>) -> Result<Self> {
        config.validate()?;
        let mut t = StoredTensors::new("cfa", tensors);
        let weight = t.take("weight")?;
        let bias = t.take("bias")?;
        let centres = t.take("centres")?;
        let (height, width) = t.take_grid()?;
        if weight.rank() != 2 {
            return Err(t.inconsistent());
        }
        let (d, _) = weight.dims2()?;
        if bias.dims() != [d]
            || centres.rank() != 2
            || centres.dims()[1] != d
            || centres.dims()[0] == 0
        {
            return Err(t.inconsistent());
        }
        let centres_sq = centres.sqr()?.sum(D::Minus1)?.to_vec1()?;
        Ok(Self {
            config,
            weight,
            bias,
            centres,
            centres_sq,
            height,
            width,
            history: Vec::new(),
            partition: Default::default(),
        })
    }
}

impl Cfa {
    /// The `k` nearest centres of each descriptor row: on the CPU with one centre per position
    /// (`γ_c = 1`), the bounded search over the bank grouped by position ([`Partition`]; the
    /// same neighbours as a full scan, distances up to the rounding of the products);
    /// otherwise [`nearest_centres`].
    fn nearest(&self, phi: &Tensor, k: usize) -> Result<(Vec<u32>, Vec<f32>)> {
        let cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        let m = self.centres_sq.len();
        if !(cpu(phi) && cpu(&self.centres)) || self.config.gamma_c != 1 || k == 0 {
            return nearest_centres(phi, &self.centres, &self.centres_sq, k);
        }
        let d = self.centres.dims()[1];
        if phi.dims() != [phi.dims()[0], d] {
            return nearest_centres(phi, &self.centres, &self.centres_sq, k);
        }
        let (phi, centres) = (phi.detach().contiguous()?, self.centres.contiguous()?);
        let found = with_f32_slice(&centres, |cs| {
            let part = self.partition.get_or_init(|| {
                Partition::by_position(cs, &self.centres_sq, d, (self.height, self.width))
            });
            with_f32_slice(&phi, |ps| {
                let (i, dist, _) = search_rows(ps, cs, &self.centres_sq, k.min(m), part.as_ref());
                (i, dist)
            })
        })??;
        Ok(found)
    }

    /// Per-epoch training record (empty for a model loaded from a file).
    pub fn history(&self) -> &[EpochStats] {
        &self.history
    }
}

impl Scorer for Cfa {
    fn kind(&self) -> &'static str {
        "cfa"
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("config serialises")
    }

    fn levels(&self) -> Vec<usize> {
        self.config.levels.clone()
    }

    fn fit_report(&self) -> serde_json::Value {
        serde_json::json!({ "epochs": self.history, "centres": self.centres.dims()[0] })
    }

    fn score(&self, features: &FeatureMaps) -> Result<RawMaps> {
        let x = embed(features, &self.config.levels)?;
        let (b, c, h, w) = x.dims4()?;
        if c + 2 != self.weight.dims()[1] {
            return Err(Error::Config(format!(
                "cfa model expects {} feature channels, got {c}: the model does not fit this backbone",
                self.weight.dims()[1] - 2
            )));
        }
        if (h, w) != (self.height, self.width) {
            return Err(Error::Config(format!(
                "cfa model was fitted on a {}×{} feature grid, got {h}×{w}: use the model's preprocessing",
                self.height, self.width
            )));
        }
        let x = x.to_device(self.weight.device())?;
        let rows = rows_with_coords(&x, &coords(h, w, x.device())?)?;
        let phi = descriptor(&rows, &self.weight, &self.bias)?;
        let k = self.config.k;
        let (_, dist) = self.nearest(&phi, k)?;
        let k = dist.len() / (b * h * w);
        // softmin(d)[0]·d[0], with d sorted ascending: 1 / Σ exp(−(dᵢ − d₀)) · d₀.
        let data = dist
            .chunks(k)
            .map(|d| {
                let z: f32 = d.iter().map(|v| (-(v - d[0])).exp()).sum();
                d[0] / z
            })
            .collect();
        Ok(RawMaps::new(b, h, w, data))
    }

    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let grid = grid_tensor(self.height, self.width)?;
        Ok(vec![
            ("weight".into(), self.weight.clone()),
            ("bias".into(), self.bias.clone()),
            ("centres".into(), self.centres.clone()),
            ("grid".into(), grid),
        ])
    }
}
