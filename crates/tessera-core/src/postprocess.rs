//! Shared post-processing: raw maps → input-resolution anomaly maps.
//!
//! Bilinear upsampling follows PyTorch's `F.interpolate(mode="bilinear", align_corners=False)`;
//! the Gaussian blur follows `scipy.ndimage.gaussian_filter` (truncate 4σ, `reflect` border), as
//! the PaDiM reference code does.

use crate::AnomalyMap;

/// Bilinear resize with PyTorch's `align_corners=False` sampling.
pub fn upsample_bilinear(src: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    assert_eq!(src.len(), h * w, "source length must be h*w");
    let ys = axis_weights(h, out_h);
    let xs = axis_weights(w, out_w);
    let mut out = Vec::with_capacity(out_h * out_w);
    for &(y0, y1, fy) in &ys {
        let r0 = &src[y0 * w..(y0 + 1) * w];
        let r1 = &src[y1 * w..(y1 + 1) * w];
        for &(x0, x1, fx) in &xs {
            let top = r0[x0] * (1.0 - fx) + r0[x1] * fx;
            let bot = r1[x0] * (1.0 - fx) + r1[x1] * fx;
            out.push(top * (1.0 - fy) + bot * fy);
        }
    }
    out
}

fn axis_weights(n_in: usize, n_out: usize) -> Vec<(usize, usize, f32)> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|o| {
            let s = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (s.floor() as usize).min(n_in - 1);
            let i1 = (i0 + 1).min(n_in - 1);
            (i0, i1, (s - i0 as f64) as f32)
        })
        .collect()
}

/// The normalised 1-D Gaussian kernel scipy uses: radius `int(4σ + 0.5)`.
pub fn gaussian_kernel(sigma: f32) -> Vec<f32> {
    let radius = (4.0 * sigma as f64 + 0.5) as i64;
    let mut k: Vec<f64> = (-radius..=radius)
        .map(|x| (-0.5 * (x as f64 / sigma as f64).powi(2)).exp())
        .collect();
    let s: f64 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    k.into_iter().map(|v| v as f32).collect()
}

/// scipy's `reflect` (half-sample symmetric) index: `d c b a | a b c d | d c b a`.
fn reflect(i: i64, n: i64) -> usize {
    let period = 2 * n;
    let mut m = i.rem_euclid(period);
    if m >= n {
        m = period - 1 - m;
    }
    m as usize
}

/// Separable Gaussian blur in place (σ in pixels). σ ≤ 0 leaves the map unchanged.
///
/// Both passes run over whole rows (`out += k_j · shifted row`), which the compiler vectorises
/// and which reads memory in order; the borders come from a reflected copy of each row and
/// from reflected row indices. Every output is still `Σ_j k_j · x_j` summed in `j` order from
/// zero, so the result is bit-identical to the direct loop.
pub fn gaussian_blur(data: &mut [f32], h: usize, w: usize, sigma: f32) {
    if sigma <= 0.0 || h == 0 || w == 0 {
        return;
    }
    let k = gaussian_kernel(sigma);
    let r = (k.len() / 2) as i64;
    let mut tmp = vec![0f32; h * w];
    let mut padded = vec![0f32; w + k.len() - 1];
    for y in 0..h {
        let row = &data[y * w..(y + 1) * w];
        for (i, p) in padded.iter_mut().enumerate() {
            *p = row[reflect(i as i64 - r, w as i64)];
        }
        let out = &mut tmp[y * w..(y + 1) * w];
        // The first tap is stored, not added to the zeroed buffer: a fresh allocation's first
        // access must be a write, else the kernel maps the shared zero page on the read and
        // copies it on the write (a second fault and a TLB flush on every core).
        for (o, &v) in out.iter_mut().zip(&padded[..w]) {
            *o = k[0] * v;
        }
        for (j, &kv) in k.iter().enumerate().skip(1) {
            for (o, &v) in out.iter_mut().zip(&padded[j..j + w]) {
                *o += kv * v;
            }
        }
    }
    for y in 0..h {
        let out = &mut data[y * w..(y + 1) * w];
        out.fill(0.0);
        for (j, &kv) in k.iter().enumerate() {
            let src = reflect(y as i64 + j as i64 - r, h as i64);
            for (o, &v) in out.iter_mut().zip(&tmp[src * w..(src + 1) * w]) {
                *o += kv * v;
            }
        }
    }
}

/// Upsample a raw `h × w` map to `out_h × out_w` and blur it: the final anomaly map.
pub fn finish_map(
    raw: &[f32],
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
    sigma: f32,
) -> AnomalyMap {
    let mut data = upsample_bilinear(raw, h, w, out_h, out_w);
    gaussian_blur(&mut data, out_h, out_w, sigma);
    AnomalyMap::new(out_w, out_h, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_matches_torch() {
        // torch: F.interpolate(torch.tensor([[[[0.,1.],[2.,3.]]]]), size=(4,4), mode="bilinear")
        let out = upsample_bilinear(&[0., 1., 2., 3.], 2, 2, 4, 4);
        let want = [
            0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75, 3.0,
        ];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn blur_equals_the_direct_loop_bit_for_bit() {
        let (h, w) = (13, 37);
        let src: Vec<f32> = (0..h * w)
            .map(|i| ((i * 7919) % 101) as f32 / 7.0)
            .collect();
        let k = gaussian_kernel(4.0);
        let r = (k.len() / 2) as i64;
        let mut tmp = vec![0f32; h * w];
        for y in 0..h {
            for x in 0..w {
                let mut acc = 0f32;
                for (j, kv) in k.iter().enumerate() {
                    acc += kv * src[y * w + reflect(x as i64 + j as i64 - r, w as i64)];
                }
                tmp[y * w + x] = acc;
            }
        }
        let mut want = vec![0f32; h * w];
        for x in 0..w {
            for y in 0..h {
                let mut acc = 0f32;
                for (j, kv) in k.iter().enumerate() {
                    acc += kv * tmp[reflect(y as i64 + j as i64 - r, h as i64) * w + x];
                }
                want[y * w + x] = acc;
            }
        }
        let mut got = src.clone();
        gaussian_blur(&mut got, h, w, 4.0);
        assert_eq!(got, want);
    }

    #[test]
    fn blur_keeps_constant_and_mass() {
        let mut d = vec![2.0f32; 20 * 30];
        gaussian_blur(&mut d, 20, 30, 4.0);
        assert!(d.iter().all(|v| (v - 2.0).abs() < 1e-5));
        let k = gaussian_kernel(4.0);
        assert_eq!(k.len(), 33);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn blur_matches_scipy() {
        // scipy.ndimage.gaussian_filter(np.array([[1.,0,0,0,0]]), sigma=1) (a 1×5 impulse,
        // reflect borders; with one row the y-pass is the identity).
        let mut d = vec![1.0f32, 0., 0., 0., 0.];
        gaussian_blur(&mut d, 1, 5, 1.0);
        let want = [0.6409149f32, 0.29596257, 0.05842299, 0.00456569, 0.00013383];
        for (a, b) in d.iter().zip(want) {
            assert!((a - b).abs() < 2e-5, "{d:?}");
        }
    }

    #[test]
    fn reflect_indices() {
        let got: Vec<usize> = (-3..7).map(|i| reflect(i, 4)).collect();
        assert_eq!(got, vec![2, 1, 0, 0, 1, 2, 3, 3, 2, 1]);
    }
}
