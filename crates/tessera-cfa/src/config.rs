//! CFA's hyper-parameters.

use serde::{Deserialize, Serialize};
use tessera_core::{Error, Result};

/// CFA hyper-parameters (the reference's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CfaConfig {
    /// Backbone levels used (1-based); the first sets the grid.
    pub levels: Vec<usize>,
    /// Descriptor compression: output channels = input channels / γ_d.
    pub gamma_d: usize,
    /// Memory compression: centres = grid positions / γ_c (k-means when > 1).
    pub gamma_c: usize,
    /// Attraction neighbours.
    pub k: usize,
    /// Repulsion neighbours (the centres ranked J..K+J).
    pub j: usize,
    /// ν of the soft boundary (the loss is scaled by 1/ν).
    pub nu: f64,
    /// Repulsion margin α.
    pub alpha: f64,
    /// Initial hypersphere radius r.
    pub radius_init: f64,
    pub lr: f64,
    pub weight_decay: f64,
    pub epochs: usize,
    pub batch: usize,
    /// Stop when the mean training loss has not improved for this many epochs.
    pub patience: Option<usize>,
    pub seed: u64,
}

impl Default for CfaConfig {
    fn default() -> Self {
        Self {
            levels: vec![1, 2, 3],
            gamma_d: 1,
            gamma_c: 1,
            k: 3,
            j: 3,
            nu: 1e-3,
            alpha: 0.1,
            radius_init: 1e-5,
            lr: 1e-3,
            weight_decay: 5e-4,
            epochs: 30,
            batch: 4,
            patience: None,
            seed: 0,
        }
    }
}

impl CfaConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(format!("cfa: {m}")));
        if self.levels.is_empty() || self.levels.contains(&0) {
            return bad("levels must be non-empty and 1-based");
        }
        if self.gamma_d == 0 || self.gamma_c == 0 || self.k == 0 || self.batch == 0 {
            return bad("gamma_d, gamma_c, k and batch must be ≥ 1");
        }
        if self.j > self.k {
            return bad("j must not exceed k (repulsion uses the centres ranked j..k+j)");
        }
        if !(self.nu > 0.0 && self.lr > 0.0 && self.weight_decay >= 0.0) {
            return bad("nu and lr must be positive, weight decay non-negative");
        }
        if self.patience == Some(0) {
            return bad("patience must be ≥ 1");
        }
        Ok(())
    }
}
