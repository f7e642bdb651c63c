//! Nearest memory-bank centres, and the loss's contact with them as a CPU custom op.

use candle_core::{DType, Tensor, D};
use rayon::prelude::*;
use tessera_core::tensor::with_f32_slice;
use tessera_core::Result;

/// Query rows per block of the fused CPU search: a block's `ROWS × M` dot products (3.2 MB for
/// the 3,136 centres of a 224-px ResNet-18 grid) are scanned while still in the last-level
/// cache, and the packing of the centres, redone per block, is amortised over 256 rows.
pub(crate) const ROWS: usize = 256;

/// For each row of `phi` (`N × D`), the `n` nearest centres (`M × D`, squared norms given) by
/// squared distance, nearest first: (indices `N × n`, squared distances `N × n`). No gradient.
///
/// On the CPU (f32) the search is fused: per block of query rows, one single-threaded product
/// with the centres into a per-thread buffer, then the selection — blocks in parallel, the
/// `N × M` distance matrix never built (it was 315 MB for a batch of 8 at 224 px).
pub fn nearest_centres(
    phi: &Tensor,
    centres: &Tensor,
    centres_sq: &[f32],
    n: usize,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !f32_cpu(phi) || !f32_cpu(centres) {
        return nearest_centres_tensor_ops(phi, centres, centres_sq, n);
    }
    let (rows, d) = phi.dims2()?;
    let m = centres.dims()[0];
    if centres.dims() != [m, d] || centres_sq.len() != m {
        return Err(tessera_core::Error::Config(format!(
            "cfa search: descriptors {:?}, centres {:?} and {} centre norms do not fit",
            phi.dims(),
            centres.dims(),
            centres_sq.len()
        )));
    }
    let n = n.min(m);
    if rows == 0 || n == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let (phi, centres) = (phi.detach().contiguous()?, centres.contiguous()?);
    let (idx, dist, _) = with_f32_slice(&phi, |ps| {
        with_f32_slice(&centres, |cs| search_rows(ps, cs, centres_sq, n, None))
    })??;
    Ok((idx, dist))
}

/// The `n` nearest centres of every row of `ps` (`N × D`; `cs`: `M × D`), blocks of [`ROWS`]
/// rows in parallel, each scanned whole or, given a partition, searched with its bounds.
/// Returns (indices, squared distances, distances computed).
pub(crate) fn search_rows(
    ps: &[f32],
    cs: &[f32],
    centres_sq: &[f32],
    n: usize,
    part: Option<&crate::partition::Partition>,
) -> (Vec<u32>, Vec<f32>, usize) {
    let d = cs.len() / centres_sq.len().max(1);
    let rows = ps.len() / d.max(1);
    let mut idx = vec![0u32; rows * n];
    let mut dist = vec![0f32; rows * n];
    if rows == 0 || n == 0 {
        return (idx, dist, 0);
    }
    let scan = BlockSearch::new(cs, centres_sq, d);
    let pairs = idx
        .par_chunks_mut(ROWS * n)
        .zip(dist.par_chunks_mut(ROWS * n))
        .zip(ps.par_chunks(ROWS * d))
        .map(|((ix, ds), block)| search_block(part, &scan, block, ix, ds))
        .sum();
    (idx, dist, pairs)
}

/// One block's search: by the partition's bounds when there is one, else the whole scan.
/// Returns the distances computed.
pub(crate) fn search_block(
    part: Option<&crate::partition::Partition>,
    scan: &BlockSearch,
    block: &[f32],
    ix: &mut [u32],
    ds: &mut [f32],
) -> usize {
    match part {
        Some(p) => p.search(block, ix, ds, scan),
        None => {
            scan.run(block, ix, ds);
            block.len() / scan.d * scan.centres_sq.len()
        }
    }
}

/// `‖p‖²` summed in order: the one norm every search uses, so that the distances of a scan and
/// of a bounded search are formed from the same value.
#[inline]
pub(crate) fn sq_norm(p: &[f32]) -> f32 {
    p.iter().map(|v| v * v).sum()
}

thread_local! {
    /// Each thread's `ROWS × M` dot products (3.2 MB at 224 px), kept between blocks and calls:
    /// allocated per block they were fresh pages, faulted in and zeroed every time.
    static DOTS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The fused search of one block of query rows, shared by scoring ([`nearest_centres`]) and
/// training's fused step (`crate::step`).
pub(crate) struct BlockSearch<'a> {
    centres: faer::MatRef<'a, f32>,
    centres_sq: &'a [f32],
    d: usize,
}

impl<'a> BlockSearch<'a> {
    /// `centres`: `M × D`, row-major.
    pub(crate) fn new(centres: &'a [f32], centres_sq: &'a [f32], d: usize) -> Self {
        let m = centres_sq.len();
        Self {
            centres: faer::MatRef::from_row_major_slice(centres, m, d),
            centres_sq,
            d,
        }
    }

    /// For each of the rows in `block` (at most [`ROWS`], row-major `× D`), the `ix.len() /
    /// rows` nearest centres into `ix` / `ds` (nearest first).
    pub(crate) fn run(&self, block: &[f32], ix: &mut [u32], ds: &mut [f32]) {
        DOTS.with_borrow_mut(|buf| self.run_with(block, buf, ix, ds))
    }

    fn run_with(&self, block: &[f32], buf: &mut Vec<f32>, ix: &mut [u32], ds: &mut [f32]) {
        use faer::{linalg::matmul::matmul, Accum, MatMut, MatRef, Par};
        let (d, m) = (self.d, self.centres_sq.len());
        let nr = block.len() / d;
        let n = ix.len() / nr;
        if buf.len() < nr * m {
            buf.resize(nr * m, 0.0);
        }
        let dots = &mut buf[..nr * m];
        matmul(
            MatMut::from_row_major_slice_mut(dots, nr, m),
            Accum::Replace,
            MatRef::from_row_major_slice(block, nr, d),
            self.centres.transpose(),
            1.0f32,
            Par::Seq,
        );
        for (r, row) in dots.chunks(m).enumerate() {
            let f_sq = sq_norm(&block[r * d..(r + 1) * d]);
            select(
                row,
                f_sq,
                self.centres_sq,
                &mut ix[r * n..(r + 1) * n],
                &mut ds[r * n..(r + 1) * n],
            );
        }
    }
}

/// Candidates per screening step of [`select`]: 16 distances are formed and compared with the
/// current worst kept one in a loop the compiler vectorises; only a chunk with a candidate goes
/// through the scalar insertion.
const SCREEN: usize = 16;

/// The `ix.len()` smallest `‖f‖² + ‖c‖² − 2 f·c` of one query row, ascending (ties keep the
/// lower centre index first), by insertion into a short sorted list (`n` is K + J = 6).
///
/// Almost every centre is farther than the worst of the `n` kept, so chunks of [`SCREEN`]
/// distances are screened against it first; the same values are then inserted in the same
/// order as a plain scan would, so the result is the scan's to the bit.
fn select(dots: &[f32], f_sq: f32, centres_sq: &[f32], ix: &mut [u32], ds: &mut [f32]) {
    let n = ix.len();
    let mut len = 0;
    let mut cand = [0f32; SCREEN];
    for (chunk, (dc, cc)) in dots
        .chunks(SCREEN)
        .zip(centres_sq.chunks(SCREEN))
        .enumerate()
    {
        let cand = &mut cand[..dc.len()];
        for ((v, &dot), &cs) in cand.iter_mut().zip(dc).zip(cc) {
            *v = f_sq + cs - 2.0 * dot;
        }
        if len == n {
            let worst = ds[n - 1];
            let hits: u32 = cand.iter().map(|&v| (v < worst) as u32).sum();
            if hits == 0 {
                continue;
            }
        }
        for (i, &d) in cand.iter().enumerate() {
            if len < n || d < ds[len - 1] {
                let mut p = if len < n { len } else { n - 1 };
                while p > 0 && ds[p - 1] > d {
                    ds[p] = ds[p - 1];
                    ix[p] = ix[p - 1];
                    p -= 1;
                }
                ds[p] = d;
                ix[p] = (chunk * SCREEN + i) as u32;
                len = (len + 1).min(n);
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The scan `select` screens: every distance through the insertion.
    fn plain_scan(dots: &[f32], f_sq: f32, centres_sq: &[f32], n: usize) -> (Vec<u32>, Vec<f32>) {
        let (mut ix, mut ds) = (vec![0u32; n], vec![0f32; n]);
        let mut len = 0;
        for (c, (&dot, &cs)) in dots.iter().zip(centres_sq).enumerate() {
            let d = f_sq + cs - 2.0 * dot;
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
        (ix, ds)
    }

    #[test]
    fn screened_select_is_the_plain_scan_to_the_bit() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // Lengths around the screening chunk; values on a coarse grid (many ties), NaN and ∞
        // sprinkled in; a descending run so that every chunk has candidates.
        for m in [1, 5, 15, 16, 17, 33, 100, 3136] {
            for n in [1, 3, 6] {
                let mut dots: Vec<f32> = (0..m).map(|_| rng.random_range(0..20) as f32).collect();
                let sq: Vec<f32> = (0..m).map(|_| rng.random_range(0..40) as f32).collect();
                if m > 10 {
                    dots[3] = f32::NAN;
                    dots[m - 2] = f32::INFINITY;
                    dots[m / 2] = f32::NEG_INFINITY;
                }
                let desc: Vec<f32> = (0..m).map(|i| i as f32).collect();
                for dots in [dots, desc] {
                    let (mut ix, mut ds) = (vec![0u32; n.min(m)], vec![0f32; n.min(m)]);
                    select(&dots, 3.0, &sq, &mut ix, &mut ds);
                    let (wi, wd) = plain_scan(&dots, 3.0, &sq, n.min(m));
                    assert_eq!(ix, wi, "m {m}, n {n}");
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&ds), bits(&wd), "m {m}, n {n}");
                }
            }
        }
    }
}
