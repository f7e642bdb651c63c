//! FcaNet's fixed 2-D DCT basis filters ("top16" frequencies on a 7×7 grid, scaled to the DCT
//! size) and the size rule for any feature map.

use serde::{Deserialize, Serialize};
use tessera_core::{Error, Result};

/// FcaNet's `get_freq_indices('top16')`: the 16 best single-frequency components of its
/// ImageNet study, as (vertical u, horizontal v) on a 7×7 grid, best first.
pub const TOP16: [(usize, usize); 16] = [
    (0, 0),
    (0, 1),
    (6, 0),
    (0, 5),
    (0, 2),
    (1, 0),
    (1, 2),
    (4, 0),
    (5, 0),
    (1, 6),
    (3, 0),
    (0, 4),
    (0, 6),
    (0, 3),
    (3, 5),
    (2, 2),
];

/// Number of frequency groups (channels are split into this many equal groups).
pub const NUM_FREQ: usize = TOP16.len();

/// Which grid the DCT bases are defined on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DctSize {
    /// The feature map's own size (default): no pooling, any `H × W`.
    #[default]
    Feature,
    /// A fixed `h × w` grid; features of another size are adaptive-average-pooled to it first
    /// (FcaNet's behaviour when the input differs from `dct_h × dct_w`).
    Fixed { h: usize, w: usize },
    /// The authors' table `c2wh = {64: 56, 128: 28, 256: 14, 512: 7}` keyed by the attended
    /// channel count (the JigsawBlock code; other channel counts are an error), pooled like
    /// `Fixed`.
    Channels,
}

impl DctSize {
    /// The DCT grid for `channels` attended channels on an `h × w` feature map.
    pub fn resolve(self, channels: usize, h: usize, w: usize) -> Result<(usize, usize)> {
        let (dh, dw) = match self {
            DctSize::Feature => (h, w),
            DctSize::Fixed { h, w } => (h, w),
            DctSize::Channels => {
                let s = match channels {
                    64 => 56,
                    128 => 28,
                    256 => 14,
                    512 => 7,
                    c => {
                        return Err(Error::Config(format!(
                            "dct size 'channels' (the authors' c2wh table) knows 64, 128, 256 \
                             and 512 attended channels, not {c}"
                        )))
                    }
                };
                (s, s)
            }
        };
        if dh == 0 || dw == 0 || h == 0 || w == 0 {
            return Err(Error::Config(format!(
                "FCA needs non-empty maps and DCT grids, got {h}×{w} and {dh}×{dw}"
            )));
        }
        Ok((dh, dw))
    }
}

/// The frequency scale on an `n`-long axis: FcaNet maps the 7×7 frequency grid to `n` with
/// `u · ⌊n/7⌋`; we clamp the factor to ≥ 1 so that grids smaller than 7 keep distinct
/// frequencies instead of collapsing all of them to DC.
pub fn freq_scale(n: usize) -> usize {
    (n / 7).max(1)
}

/// FcaNet's 1-D DCT-II basis value at position `pos` for frequency `freq` on an `n`-long axis
/// (orthonormal: 1/√n, times √2 for non-zero frequencies).
pub fn basis(pos: usize, freq: usize, n: usize) -> f64 {
    let v = (std::f64::consts::PI * freq as f64 * (pos as f64 + 0.5) / n as f64).cos()
        / (n as f64).sqrt();
    if freq == 0 {
        v
    } else {
        v * std::f64::consts::SQRT_2
    }
}

/// The 16 basis filters on a `dh × dw` grid, `16 × dh × dw` row-major: filter `g` is
/// `basis(i, u_g·⌊dh/7⌋, dh) · basis(j, v_g·⌊dw/7⌋, dw)` (factors clamped to ≥ 1).
pub fn dct_filters(dh: usize, dw: usize) -> Vec<f64> {
    let (sh, sw) = (freq_scale(dh), freq_scale(dw));
    let mut out = Vec::with_capacity(NUM_FREQ * dh * dw);
    for &(u, v) in &TOP16 {
        for i in 0..dh {
            let bi = basis(i, u * sh, dh);
            for j in 0..dw {
                out.push(bi * basis(j, v * sw, dw));
            }
        }
    }
    out
}

/// Adaptive average pooling from `n` to `m` cells as an `m × n` matrix (PyTorch's windows:
/// cell `i` averages `⌊i·n/m⌋ .. ⌈(i+1)·n/m⌉`).
pub fn pooling_matrix(m: usize, n: usize) -> Vec<f64> {
    let mut p = vec![0.0; m * n];
    for i in 0..m {
        let a = i * n / m;
        let b = ((i + 1) * n).div_ceil(m);
        let inv = 1.0 / (b - a) as f64;
        for v in &mut p[i * n + a..i * n + b] {
            *v = inv;
        }
    }
    p
}

/// The filters applied to an `h × w` feature map, `16 × h × w` as f32. With a DCT grid of
/// another size, adaptive average pooling is folded into the filters: pooling is separable,
/// `pool(X) = P_h · X · P_wᵀ`, so `Σ pool(X) ∘ D = Σ X ∘ (P_hᵀ · D · P_w)` — exact, with no pooling
/// at run time.
pub fn effective_filters(h: usize, w: usize, dh: usize, dw: usize) -> Vec<f32> {
    let d = dct_filters(dh, dw);
    if (dh, dw) == (h, w) {
        return d.into_iter().map(|v| v as f32).collect();
    }
    let (ph, pw) = (pooling_matrix(dh, h), pooling_matrix(dw, w));
    let mut out = vec![0f32; NUM_FREQ * h * w];
    for g in 0..NUM_FREQ {
        let dg = &d[g * dh * dw..(g + 1) * dh * dw];
        // t = D · P_w  (dh × w)
        let mut t = vec![0.0f64; dh * w];
        for i in 0..dh {
            for j in 0..dw {
                let dij = dg[i * dw + j];
                if dij != 0.0 {
                    for (tv, &p) in t[i * w..(i + 1) * w]
                        .iter_mut()
                        .zip(&pw[j * w..(j + 1) * w])
                    {
                        *tv += dij * p;
                    }
                }
            }
        }
        // P_hᵀ · t  (h × w)
        let og = &mut out[g * h * w..(g + 1) * h * w];
        for r in 0..h {
            for i in 0..dh {
                let p = ph[i * h + r];
                if p != 0.0 {
                    for (o, &tv) in og[r * w..(r + 1) * w]
                        .iter_mut()
                        .zip(&t[i * w..(i + 1) * w])
                    {
                        *o += (p * tv) as f32;
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bases_are_orthonormal_on_7x7() {
        let f = dct_filters(7, 7);
        for a in 0..NUM_FREQ {
            for b in 0..NUM_FREQ {
                let dot: f64 = (0..49).map(|k| f[a * 49 + k] * f[b * 49 + k]).sum();
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-9, "{a} {b} {dot}");
            }
        }
    }

    #[test]
    fn pooling_rows_average() {
        // 10 → 7: windows of 2 or 3 cells, overlapping where PyTorch's do.
        let p = pooling_matrix(7, 10);
        for i in 0..7 {
            let s: f64 = p[i * 10..(i + 1) * 10].iter().sum();
            assert!((s - 1.0).abs() < 1e-12);
        }
        assert_eq!(p[0..3], [0.5, 0.5, 0.0]);
        assert_eq!(p[10..14], [0.0, 0.5, 0.5, 0.0]);
        // Upsampling (3 → 7) repeats cells.
        let p = pooling_matrix(7, 3);
        assert_eq!(p[0..3], [1.0, 0.0, 0.0]);
        assert_eq!(p[6 * 3..7 * 3], [0.0, 0.0, 1.0]);
    }

    #[test]
    fn same_size_needs_no_pooling() {
        let a = effective_filters(14, 14, 14, 14);
        let b: Vec<f32> = dct_filters(14, 14).iter().map(|&v| v as f32).collect();
        assert_eq!(a, b);
    }
}
