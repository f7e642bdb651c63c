//! Chunked nearest-neighbour search: peak memory is `queries × chunk` distances whatever the
//! bank size.

use candle_core::{DType, Tensor, D};
use tessera_core::Result;

/// Squared row norms of a `K × D` tensor, as f32 (`K`).
pub fn row_norms_sq(bank: &Tensor) -> Result<Tensor> {
    Ok(bank.to_dtype(DType::F32)?.sqr()?.sum(D::Minus1)?)
}

/// For each query row (`M × D`, f32), the distance to its nearest bank row and that row's index.
/// The bank (`K × D`, f32 or f16) is visited `chunk` rows at a time:
/// `‖q − b‖² = ‖q‖² + ‖b‖² − 2 q·b` (as `torch.cdist`), one matrix product per chunk followed by
/// one fused, parallel pass that keeps the running minimum — peak memory `M × chunk` floats.
pub fn nearest(
    queries: &Tensor,
    bank: &Tensor,
    bank_sq: &Tensor,
    chunk: usize,
) -> Result<(Vec<f32>, Vec<u32>)> {
    use rayon::prelude::*;
    if !queries.device().is_cpu() {
        return nearest_tensor_ops(queries, bank, bank_sq, chunk);
    }
    let (m, _) = queries.dims2()?;
    let k = bank.dims()[0];
    let q_sq: Vec<f32> = queries.sqr()?.sum(D::Minus1)?.to_vec1()?;
    let b_sq_all: Vec<f32> = bank_sq.to_vec1()?;
    let mut best = vec![f32::INFINITY; m];
    let mut idx = vec![0u32; m];
    let chunk = chunk.max(1);
    let mut start = 0;
    while start < k {
        let len = chunk.min(k - start);
        let b = bank.narrow(0, start, len)?.to_dtype(DType::F32)?;
        let qb = queries.matmul(&b.t()?)?; // M × len
        let b_sq = &b_sq_all[start..start + len];
        tessera_core::tensor::with_f32_slice(&qb, |qb| {
            best.par_iter_mut()
                .zip(idx.par_iter_mut())
                .zip(qb.par_chunks(len))
                .for_each(|((bv, bi), row)| {
                    // ‖q‖² is constant per row: add it after the minimum.
                    let (mut mv, mut mi) = (f32::INFINITY, 0usize);
                    for (j, (&dot, &bs)) in row.iter().zip(b_sq).enumerate() {
                        let v = bs - 2.0 * dot;
                        if v < mv {
                            mv = v;
                            mi = j;
                        }
                    }
                    if mv < *bv {
                        *bv = mv;
                        *bi = (start + mi) as u32;
                    }
                })
        })?;
        start += len;
    }
    let dist = best
        .iter()
        .zip(&q_sq)
        .map(|(v, q)| (v + q).max(0.0).sqrt())
        .collect();
    Ok((dist, idx))
}

/// [`nearest`] with tensor ops only, the path used on accelerators (any device works): distances, minimum and argmin stay on the device chunk by
/// chunk (the running minimum is merged there too); only the final `M` distances and indices
/// cross to the host, once.
pub fn nearest_tensor_ops(
    queries: &Tensor,
    bank: &Tensor,
    bank_sq: &Tensor,
    chunk: usize,
) -> Result<(Vec<f32>, Vec<u32>)> {
    let k = bank.dims()[0];
    let q_sq = queries.sqr()?.sum_keepdim(D::Minus1)?; // M × 1
    let mut best: Option<(Tensor, Tensor)> = None;
    let mut start = 0;
    while start < k {
        let len = chunk.max(1).min(k - start);
        let b = bank.narrow(0, start, len)?.to_dtype(DType::F32)?;
        let b_sq = bank_sq.narrow(0, start, len)?.unsqueeze(0)?;
        let d2 = (queries.matmul(&b.t()?)? * -2.0)?.broadcast_add(&b_sq)?; // M × len
        let v = d2.min_keepdim(D::Minus1)?;
        let i = (d2.argmin_keepdim(D::Minus1)?.to_dtype(DType::F32)? + start as f64)?;
        best = Some(match best {
            None => (v, i),
            Some((bv, bi)) => {
                // Strictly smaller wins: ties keep the earlier (lower) index, as the CPU path.
                let take = v.lt(&bv)?;
                (take.where_cond(&v, &bv)?, take.where_cond(&i, &bi)?)
            }
        });
        start += len;
    }
    let Some((v, i)) = best else {
        return Ok((Vec::new(), Vec::new()));
    };
    let dist: Vec<f32> = (v + q_sq)?
        .clamp(0f32, f32::MAX)?
        .sqrt()?
        .flatten_all()?
        .to_vec1()?;
    let idx: Vec<f32> = i.flatten_all()?.to_vec1()?;
    Ok((dist, idx.into_iter().map(|x| x as u32).collect()))
}

/// The `n` nearest bank rows to one query row (`1 × D`), nearest first: (distances, indices).
pub fn k_nearest(
    query: &Tensor,
    bank: &Tensor,
    bank_sq: &Tensor,
    n: usize,
    chunk: usize,
) -> Result<(Vec<f32>, Vec<u32>)> {
    let k = bank.dims()[0];
    let q_sq = query.sqr()?.sum_keepdim(D::Minus1)?;
    let mut all: Vec<(f32, u32)> = Vec::with_capacity(k);
    let mut start = 0;
    while start < k {
        let len = chunk.max(1).min(k - start);
        let b = bank.narrow(0, start, len)?.to_dtype(DType::F32)?;
        let b_sq = bank_sq.narrow(0, start, len)?.unsqueeze(0)?;
        let d2 = (query.matmul(&b.t()?)? * -2.0)?
            .broadcast_add(&q_sq)?
            .broadcast_add(&b_sq)?;
        let v: Vec<f32> = d2.squeeze(0)?.to_vec1()?;
        all.extend(
            v.into_iter()
                .enumerate()
                .map(|(i, d)| (d.max(0.0).sqrt(), (start + i) as u32)),
        );
        start += len;
    }
    let n = n.min(all.len());
    if n == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    all.select_nth_unstable_by(n - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    all.truncate(n);
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    Ok(all.into_iter().unzip())
}
