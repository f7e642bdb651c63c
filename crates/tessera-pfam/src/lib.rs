//! # tessera-pfam
//!
//! The paper's feature-level module (Yuan et al., §3.2): the **pretrained feature attentive
//! module** (PFAM) and its **multi-scale frequency channel self-attention module** (MFCSAM), as
//! trainable candle modules.
//!
//! - [`FcaWeight`]: FcaNet's multi-spectral channel attention — 16 fixed 2-D DCT bases (the
//!   "top16" frequencies of a 7×7 grid, scaled to the map) reduce 16 channel groups to a vector,
//!   `FC → ReLU → FC → sigmoid` rescales the channels.
//! - [`PositionAttention`]: DANet's position attention (`P`, `K`, `V` by 1×1 convolutions,
//!   `softmax(PᵀK)` over positions, leaky ReLU, `α·out + residual` with α learned from 0),
//!   computed in chunks of query positions ([`position_attention`]).
//! - [`Mfcsam`]: `S` grouped convolutions (default kernels 3, 5, groups 1, 4) → FCAWeight →
//!   position attention per scale → fusion (`scale-softmax`, the authors' code, or `concat`,
//!   paper eq. 7).
//! - [`Pfam`]: `X1 → conv1×1(X1) + MFCSAM(X1)`, `X2 → X2`, `X3 → MFCSAM(X3)`; channel counts are
//!   preserved, so any scorer reads PFAM output like backbone output.
//!
//! Parameters are candle `Var`s from a `VarBuilder` (so an optimiser can train them), named
//! under a prefix (`pfam.x1_conv.weight`, `pfam.mfcsam1.conv0.weight`,
//! `pfam.mfcsam1.fca.fc1.weight`, `pfam.mfcsam1.pam.query.weight`, `pfam.mfcsam1.pam.alpha`, …).
//! Every convolution is [`tessera_conv::conv2d`]. Choices against the paper and the authors'
//! code are listed in `docs/pfam.md`; the blocks are tested against a PyTorch re-statement of
//! the authors' code (`tools/golden/pfam.py`).
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use std::collections::HashMap;
//! use tessera_core::FeatureMaps;
//! use tessera_pfam::{Pfam, PfamConfig};
//!
//! let dev = Device::Cpu;
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! let cfg = PfamConfig::default();
//! let pfam = Pfam::new(cfg.clone(), [32, 48, 64], vb.pp("pfam"))?;
//! let x = FeatureMaps::new(vec![
//!     Tensor::randn(0f32, 1., (1, 32, 14, 14), &dev)?,
//!     Tensor::randn(0f32, 1., (1, 48, 7, 7), &dev)?,
//!     Tensor::randn(0f32, 1., (1, 64, 5, 6), &dev)?,
//! ]);
//! let y = pfam.forward(&x)?;
//! assert_eq!(y.channels(), vec![32, 48, 64]);
//! assert_eq!(y.levels[2].dims(), &[1, 64, 5, 6]);
//! // Every parameter is a trainable Var of the VarMap.
//! assert_eq!(varmap.all_vars().len(), pfam.tensors().len());
//! assert!(pfam.tensors().iter().any(|(n, _)| n == "pfam.mfcsam1.fca.fc1.weight"));
//! // Save and load (e.g. through tessera_core::ModelFile): same outputs.
//! let saved: HashMap<String, Tensor> = pfam.tensors().into_iter().collect();
//! let loaded = Pfam::load(&saved, "pfam", cfg, [32, 48, 64], &dev)?;
//! let z = loaded.forward(&x)?;
//! let d = (&z.levels[0] - &y.levels[0])?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(d < 1e-6);
//! # Ok::<(), tessera_core::Error>(())
//! ```

pub mod dct;
pub mod fca;
pub mod mfcsam;
pub mod pam;
mod params;
pub mod pfam;

pub use dct::DctSize;
pub use fca::{FcaConfig, FcaWeight};
pub use mfcsam::{Fusion, Mfcsam, MfcsamConfig, Residual, ScaleOrder};
pub use pam::{
    position_attention, position_attention_chunked, softmax_rows, PamConfig, PositionAttention,
};
pub use pfam::{Branches, Pfam, PfamConfig};

/// `prefix.name`, or the other one alone when either is empty.
pub(crate) fn join(prefix: &str, name: &str) -> String {
    match (prefix.is_empty(), name.is_empty()) {
        (true, _) => name.to_string(),
        (_, true) => prefix.to_string(),
        _ => format!("{prefix}.{name}"),
    }
}
