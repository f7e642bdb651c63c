//! The coupled-hypersphere (soft boundary) loss.

use crate::centres::{nearest_centres, SelectedCentres};
use crate::CfaConfig;
use candle_core::{DType, Tensor, D};
use tessera_core::Result;

/// The coupled-hypersphere loss of a batch of descriptors `phi` (`N × D`, differentiable)
/// against fixed `centres`: attraction to the K nearest, repulsion from those ranked J..K+J.
pub fn soft_boundary_loss(
    phi: &Tensor,
    centres: &Tensor,
    centres_sq: &[f32],
    r: &Tensor,
    cfg: &CfaConfig,
) -> Result<Tensor> {
    let (n, d) = phi.dims2()?;
    let (idx, _) = nearest_centres(phi, centres, centres_sq, cfg.k + cfg.j)?;
    let kj = idx.len() / n;
    let sel_sq: Vec<f32> = idx.iter().map(|&i| centres_sq[i as usize]).collect();
    let sel_sq = Tensor::from_vec(sel_sq, (n, kj), phi.device())?;
    let dot = if phi.device().is_cpu() && phi.dtype() == DType::F32 {
        let c: Vec<f32> = centres.flatten_all()?.to_vec1()?;
        let op = SelectedCentres {
            centres: std::sync::Arc::new(c),
            idx: std::sync::Arc::new(idx),
            kj,
            d,
            backward: false,
        };
        phi.contiguous()?.apply_op1(op)?
    } else {
        let ix = Tensor::from_vec(idx, n * kj, phi.device())?;
        let sel = centres.index_select(&ix, 0)?.reshape((n, kj, d))?;
        phi.unsqueeze(1)?.broadcast_mul(&sel)?.sum(D::Minus1)?
    };
    let f_sq = phi.sqr()?.sum_keepdim(D::Minus1)?; // n × 1
    let dist = (f_sq.broadcast_add(&sel_sq)? - (dot * 2.0)?)?;
    let r2 = r.sqr()?.reshape((1, 1))?;
    let att = dist
        .narrow(1, 0, cfg.k.min(kj))?
        .broadcast_sub(&r2)?
        .relu()?
        .mean_all()?;
    let rep_from = cfg.j.min(kj);
    let rep = (r2.broadcast_sub(&dist.narrow(1, rep_from, kj - rep_from)?)? - cfg.alpha)?
        .relu()?
        .mean_all()?;
    Ok(((att + rep)? / cfg.nu)?)
}
