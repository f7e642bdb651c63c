//! CFA's loss and its gradient fused on the CPU (f32): per block of descriptor rows, the search
//! for the `K + J` nearest centres, the loss terms and `∂L/∂φ` in one pass, the blocks in
//! parallel — no autograd graph, no `N × (K+J) × D` gather, and no product for the gradient of
//! the descriptor's input, which candle's matmul backward computes even when nothing needs it.
//!
//! With `d_j = ‖φ‖² + ‖c_j‖² − 2 φ·c_j` the distances to the selected centres (ascending),
//! `L = (1/ν)·[Σ_{j<K} max(0, d_j − r²) / (N·K) + Σ_{j≥J} max(0, r² − d_j − α) / (N·(K+J−J'))]`,
//! so `∂L/∂d_j = g_j` is a constant per active term and `∂L/∂φ = 2 (Σ_j g_j) φ − 2 Σ_j g_j c_j`,
//! `∂L/∂r = 2r · ∂L/∂r²`. Active means the ReLU's argument is ≥ 0 (candle's ReLU gradient).

use crate::centres::{search_block, BlockSearch, ROWS};
use crate::partition::Partition;
use crate::CfaConfig;
use rayon::prelude::*;

/// The loss of one batch of descriptors and its gradient in `r` (`∂L/∂φ` goes to the caller's
/// buffer).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossGrad {
    pub loss: f32,
    /// `∂L/∂r`.
    pub dr: f32,
}

/// Per-block partial sums, added in block order (so the result does not depend on threads).
#[derive(Default, Clone, Copy)]
struct Partial {
    att: f64,
    rep: f64,
    att_active: u64,
    rep_active: u64,
}

/// [`crate::soft_boundary_loss`] and its gradient for descriptors `phi` (`N × D`, row-major)
/// against `centres` (`M × D`, squared norms `centres_sq`) at radius `r`; `∂L/∂φ` is written
/// into `dphi` (resized to `N × D`; a buffer kept across steps saves its page faults).
///
/// `None` when a term would average over nothing (fewer than `J + 1` centres): the tensor
/// form's mean of an empty set is NaN there, which training reports as divergence.
pub fn soft_boundary_grad(
    phi: &[f32],
    d: usize,
    centres: &[f32],
    centres_sq: &[f32],
    r: f32,
    cfg: &CfaConfig,
    dphi: &mut Vec<f32>,
) -> Option<LossGrad> {
    soft_boundary_grad_in(phi, d, centres, centres_sq, None, r, cfg, dphi)
}

/// [`soft_boundary_grad`], searching with the bank's partition when there is one.
#[allow(clippy::too_many_arguments)]
pub(crate) fn soft_boundary_grad_in(
    phi: &[f32],
    d: usize,
    centres: &[f32],
    centres_sq: &[f32],
    part: Option<&Partition>,
    r: f32,
    cfg: &CfaConfig,
    dphi: &mut Vec<f32>,
) -> Option<LossGrad> {
    let m = centres_sq.len();
    let kj = (cfg.k + cfg.j).min(m);
    let (k, rep_from) = (cfg.k.min(kj), cfg.j.min(kj));
    let n_rows = phi.len() / d;
    if d == 0 || n_rows == 0 || k == 0 || kj <= rep_from || centres.len() != m * d {
        return None;
    }
    let r2 = r * r;
    let alpha = cfg.alpha as f32;
    // The tensor form's factors: mean over N·K (N·(K+J−J')) terms, then · 1/ν.
    let inv_nu = (1.0 / cfg.nu) as f32;
    let g_att = inv_nu / (n_rows * k) as f32;
    let g_rep = inv_nu / (n_rows * (kj - rep_from)) as f32;
    let search = BlockSearch::new(centres, centres_sq, d);
    dphi.resize(phi.len(), 0.0);
    let partials: Vec<Partial> = dphi
        .par_chunks_mut(ROWS * d)
        .zip(phi.par_chunks(ROWS * d))
        .map_init(
            || (vec![0u32; ROWS * kj], vec![0f32; ROWS * kj], vec![0f32; kj]),
            |(ix, ds, gs), (grad, block)| {
                let nr = block.len() / d;
                let (ix, ds) = (&mut ix[..nr * kj], &mut ds[..nr * kj]);
                search_block(part, &search, block, ix, ds);
                let mut part = Partial::default();
                for ((g, p), (ix, ds)) in grad
                    .chunks_mut(d)
                    .zip(block.chunks(d))
                    .zip(ix.chunks(kj).zip(ds.chunks(kj)))
                {
                    // g_j per selected centre; the ReLU passes where its argument is ≥ 0.
                    let mut total = 0f32;
                    for (j, (gs, &dist)) in gs.iter_mut().zip(ds).enumerate() {
                        let mut gj = 0f32;
                        if j < k {
                            let a = dist - r2;
                            if a >= 0.0 {
                                part.att += a as f64;
                                part.att_active += 1;
                                gj += g_att;
                            }
                        }
                        if j >= rep_from {
                            let a = (r2 - dist) - alpha;
                            if a >= 0.0 {
                                part.rep += a as f64;
                                part.rep_active += 1;
                                gj -= g_rep;
                            }
                        }
                        total += gj;
                        *gs = gj;
                    }
                    // Written before it is read: a fresh page's first touch is then a write
                    // (reading first maps the shared zero page, and the write after copies it).
                    g.iter_mut().zip(p).for_each(|(v, &x)| *v = 2.0 * total * x);
                    for (&gj, &c) in gs.iter().zip(ix.iter()) {
                        if gj != 0.0 {
                            let c = &centres[c as usize * d..(c as usize + 1) * d];
                            g.iter_mut().zip(c).for_each(|(v, &y)| *v -= 2.0 * gj * y);
                        }
                    }
                }
                part
            },
        )
        .collect();
    let mut sum = Partial::default();
    for p in &partials {
        sum.att += p.att;
        sum.rep += p.rep;
        sum.att_active += p.att_active;
        sum.rep_active += p.rep_active;
    }
    let loss =
        (sum.att / (n_rows * k) as f64 + sum.rep / (n_rows * (kj - rep_from)) as f64) / cfg.nu;
    // ∂L/∂r² = −g_att per active attraction term + g_rep per active repulsion term.
    let dr2 = -(sum.att_active as f64) * g_att as f64 + sum.rep_active as f64 * g_rep as f64;
    Some(LossGrad {
        loss: loss as f32,
        dr: (2.0 * r as f64 * dr2) as f32,
    })
}

/// The descriptor's 1×1 convolution on the CPU: `φ = rows · Wᵀ + b` (`rows`: `N × C'`,
/// `weight`: `D × C'`) into `phi` (resized to `N × D`), blocks of rows in parallel, each a
/// single-threaded product (the same bits whatever the thread count).
pub fn descriptor_forward(
    rows: &[f32],
    cin: usize,
    weight: &[f32],
    bias: &[f32],
    phi: &mut Vec<f32>,
) {
    use faer::{linalg::matmul::matmul, Accum, MatMut, MatRef, Par};
    let d = bias.len();
    let n = rows.len() / cin;
    let wt = MatRef::from_row_major_slice(weight, d, cin).transpose();
    phi.resize(n * d, 0.0);
    phi.par_chunks_mut(ROWS * d)
        .zip(rows.par_chunks(ROWS * cin))
        .for_each(|(out, x)| {
            let nr = x.len() / cin;
            matmul(
                MatMut::from_row_major_slice_mut(out, nr, d),
                Accum::Replace,
                MatRef::from_row_major_slice(x, nr, cin),
                wt,
                1.0f32,
                Par::Seq,
            );
            for row in out.chunks_mut(d) {
                row.iter_mut().zip(bias).for_each(|(v, &b)| *v += b);
            }
        });
}

/// Output rows of `∂L/∂W` per parallel task of [`descriptor_backward`].
const GRAD_ROWS: usize = 32;

/// The descriptor's parameter gradients from `∂L/∂φ`: `∂L/∂W = (∂L/∂φ)ᵀ · rows` (`D × C'`) and
/// `∂L/∂b = Σ_n ∂L/∂φ_n`. Tasks own disjoint rows of the result, so the sums run in one order.
pub fn descriptor_backward(
    dphi: &[f32],
    d: usize,
    rows: &[f32],
    cin: usize,
) -> (Vec<f32>, Vec<f32>) {
    use faer::{linalg::matmul::matmul, Accum, MatMut, MatRef, Par};
    let n = rows.len() / cin;
    let g = MatRef::from_row_major_slice(dphi, n, d);
    let x = MatRef::from_row_major_slice(rows, n, cin);
    let mut dw = vec![0f32; d * cin];
    dw.par_chunks_mut(GRAD_ROWS * cin)
        .enumerate()
        .for_each(|(t, out)| {
            let (i0, nr) = (t * GRAD_ROWS, out.len() / cin);
            matmul(
                MatMut::from_row_major_slice_mut(out, nr, cin),
                Accum::Replace,
                g.subcols(i0, nr).transpose(),
                x,
                1.0f32,
                Par::Seq,
            );
        });
    let mut db = vec![0f64; d];
    for row in dphi.chunks(d) {
        db.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
    }
    (dw, db.into_iter().map(|v| v as f32).collect())
}
