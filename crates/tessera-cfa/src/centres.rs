//! Nearest memory-bank centres, and the loss's contact with them as a CPU custom op.

use candle_core::{Tensor, D};
use rayon::prelude::*;
use tessera_core::tensor::with_f32_slice;
use tessera_core::Result;

/// For each row of `phi` (`N × D`), the `n` nearest centres (`M × D`, squared norms given) by
/// squared distance, nearest first: (indices `N × n`, squared distances `N × n`). No gradient.
pub fn nearest_centres(
    phi: &Tensor,
    centres: &Tensor,
    centres_sq: &[f32],
    n: usize,
) -> Result<(Vec<u32>, Vec<f32>)> {
    if !phi.device().is_cpu() {
        return nearest_centres_tensor_ops(phi, centres, centres_sq, n);
    }
    let (rows, _) = phi.dims2()?;
    let m = centres.dims()[0];
    let n = n.min(m);
    let f_sq: Vec<f32> = phi.sqr()?.sum(D::Minus1)?.to_vec1()?;
    let fc = phi.detach().matmul(&centres.t()?)?.contiguous()?;
    let mut idx = vec![0u32; rows * n];
    let mut dist = vec![0f32; rows * n];
    with_f32_slice(&fc, |fc| {
        idx.par_chunks_mut(n)
            .zip(dist.par_chunks_mut(n))
            .zip(fc.par_chunks(m))
            .enumerate()
            .for_each(|(r, ((ix, ds), row))| {
                // Insertion into a short sorted list: n is K + J = 6.
                let mut len = 0;
                for (c, (&dot, &cs)) in row.iter().zip(centres_sq).enumerate() {
                    let d = f_sq[r] + cs - 2.0 * dot;
                    if len < n || d < ds[len - 1] {
                        let mut p = if len < n { len } else { n - 1 };
                        while p > 0 && ds[p - 1] > d {
                            ds[p] = ds[p - 1];
                            ix[p] = ix[p - 1];
                            p -= 1;
                        }
                        ds[p] = d;
                        ix[p] = c as u32;
                        len = (len + 1).min(n);
                    }
                }
            })
    })?;
    Ok((idx, dist))
}

/// [`nearest_centres`] with tensor ops only — the accelerator path (any device works): the
/// distance matrix is built and sorted on the device (`arg_sort`), and only the `N × n`
/// selected indices and distances cross to the host.
pub fn nearest_centres_tensor_ops(
    phi: &Tensor,
    centres: &Tensor,
    centres_sq: &[f32],
    n: usize,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let m = centres.dims()[0];
    let n = n.min(m);
    let phi = phi.detach();
    let cs = Tensor::from_slice(centres_sq, (1, m), phi.device())?;
    let d = (phi.matmul(&centres.t()?)? * -2.0)?
        .broadcast_add(&phi.sqr()?.sum_keepdim(D::Minus1)?)?
        .broadcast_add(&cs)?
        .contiguous()?;
    let order = d.arg_sort_last_dim(true)?.narrow(1, 0, n)?.contiguous()?;
    let dist = d.gather(&order, 1)?;
    Ok((
        order.flatten_all()?.to_vec1::<u32>()?,
        dist.flatten_all()?.to_vec1::<f32>()?,
    ))
}

/// The loss's contact with the selected centres, as a custom op on CPU:
/// forward `out[n, j] = phi[n] · centres[idx[n, j]]` (differentiable in `phi`), and its
/// backward `dphi[n] = Σ_j g[n, j] · centres[idx[n, j]]` — without materialising the
/// `N × (K+J) × D` gathered centres.
#[derive(Clone)]
pub(crate) struct SelectedCentres {
    pub(crate) centres: std::sync::Arc<Vec<f32>>,
    pub(crate) idx: std::sync::Arc<Vec<u32>>,
    pub(crate) kj: usize,
    pub(crate) d: usize,
    /// false: the dot products (N × D → N × kj); true: their gradient (N × kj → N × D).
    pub(crate) backward: bool,
}

impl candle_core::CustomOp1 for SelectedCentres {
    fn name(&self) -> &'static str {
        if self.backward {
            "cfa-combine-centres"
        } else {
            "cfa-selected-dots"
        }
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("cfa: operand must be contiguous".into()))?;
        let x = &s.as_slice::<f32>()?[a..b];
        let (d, kj) = (self.d, self.kj);
        let centre = |c: u32| &self.centres[c as usize * d..(c as usize + 1) * d];
        let (n, out) = if self.backward {
            let n = x.len() / kj;
            let mut out = vec![0f32; n * d];
            out.par_chunks_mut(d)
                .zip(x.par_chunks(kj))
                .zip(self.idx.par_chunks(kj))
                .for_each(|((o, g), ix)| {
                    for (&gv, &c) in g.iter().zip(ix) {
                        o.iter_mut().zip(centre(c)).for_each(|(v, y)| *v += gv * y);
                    }
                });
            (n, out)
        } else {
            let n = x.len() / d;
            let mut out = vec![0f32; n * kj];
            out.par_chunks_mut(kj)
                .zip(x.par_chunks(d))
                .zip(self.idx.par_chunks(kj))
                .for_each(|((o, p), ix)| {
                    for (v, &c) in o.iter_mut().zip(ix) {
                        *v = p.iter().zip(centre(c)).map(|(x, y)| x * y).sum();
                    }
                });
            (n, out)
        };
        let cols = if self.backward { d } else { kj };
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from((n, cols)),
        ))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if self.backward {
            return Ok(None);
        }
        let op = Self {
            backward: true,
            ..self.clone()
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}
