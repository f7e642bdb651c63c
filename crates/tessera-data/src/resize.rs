//! The preprocessing's triangle-filter resize of 8-bit RGB images, the same bits as
//! `image::imageops::resize(…, FilterType::Triangle)` and several times faster.
//!
//! The `image` crate resamples through a generic per-pixel path (each output pixel reads its
//! taps through `get_pixel`, with four channels) and was 8 % of `tessera test`'s profile. This
//! is its algorithm with the same `f32` operations in the same order — weights from the same
//! expressions, normalised by the same division, each output a sum over the taps in order, the
//! vertical pass first (kept in `f32`), then the horizontal pass, clamped and rounded — laid out
//! so that the vertical pass runs over contiguous rows (vectorised across a row) and the
//! weights are computed once per output row or column instead of once per output pixel.

use image::RgbImage;

/// The taps of one output coordinate: the first source index and the normalised weights.
struct Taps {
    first: usize,
    weights: Vec<f32>,
}

/// The taps of every output coordinate along one axis (`image`'s `vertical_sample` /
/// `horizontal_sample` weight computation, triangle kernel of support 1).
fn taps(src: u32, dst: u32) -> Vec<Taps> {
    let ratio = src as f32 / dst as f32;
    let sratio = if ratio < 1.0 { 1.0 } else { ratio };
    let support = sratio; // support 1.0 × sratio
    (0..dst)
        .map(|out| {
            let input = (out as f32 + 0.5) * ratio;
            let left = ((input - support).floor() as i64).clamp(0, src as i64 - 1);
            let right = ((input + support).ceil() as i64).clamp(left + 1, src as i64);
            let input = input - 0.5;
            let mut weights: Vec<f32> = (left..right)
                .map(|i| {
                    let x = (i as f32 - input) / sratio;
                    if x.abs() < 1.0 {
                        1.0 - x.abs()
                    } else {
                        0.0
                    }
                })
                .collect();
            let mut sum = 0.0f32;
            for &w in &weights {
                sum += w;
            }
            for w in weights.iter_mut() {
                *w /= sum;
            }
            Taps {
                first: left as usize,
                weights,
            }
        })
        .collect()
}

/// Resize with the triangle (bilinear, antialiased when shrinking) filter: equal to the bit to
/// `image::imageops::resize(img, width, height, FilterType::Triangle)` (tested).
pub(crate) fn resize_triangle_rgb8(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (sw, sh) = img.dimensions();
    if sw == 0 || sh == 0 {
        return RgbImage::new(width, height);
    }
    if (sw, sh) == (width, height) {
        return img.clone();
    }
    let src = img.as_raw();
    let row = sw as usize * 3;
    // Vertical pass: `height` rows of `sw` pixels, f32, unrounded.
    let mut mid = vec![0f32; height as usize * row];
    for (out, t) in mid.chunks_mut(row).zip(taps(sh, height)) {
        // Each output value sums its taps in order, as `image` does per pixel; written by the
        // first tap, then accumulated, so every element sees 0 + v₀w₀ + v₁w₁ + … .
        for (k, &w) in t.weights.iter().enumerate() {
            let line = &src[(t.first + k) * row..(t.first + k + 1) * row];
            if k == 0 {
                out.iter_mut()
                    .zip(line)
                    .for_each(|(o, &v)| *o = 0.0 + v as f32 * w);
            } else {
                out.iter_mut()
                    .zip(line)
                    .for_each(|(o, &v)| *o += v as f32 * w);
            }
        }
    }
    // Horizontal pass, clamped to [0, 255] and rounded half away from zero.
    let cols = taps(sw, width);
    let mut dst = vec![0u8; width as usize * height as usize * 3];
    for (out, line) in dst.chunks_mut(width as usize * 3).zip(mid.chunks(row)) {
        for (px, t) in out.chunks_mut(3).zip(&cols) {
            let mut acc = [0f32; 3];
            for (k, &w) in t.weights.iter().enumerate() {
                let p = &line[(t.first + k) * 3..(t.first + k) * 3 + 3];
                for c in 0..3 {
                    acc[c] += p[c] * w;
                }
            }
            for c in 0..3 {
                px[c] = acc[c].clamp(0.0, 255.0).round() as u8;
            }
        }
    }
    RgbImage::from_raw(width, height, dst).expect("width × height × 3 values")
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::imageops::{resize, FilterType};
    use tessera_core::test_util::Lcg;

    fn noise(w: u32, h: u32, seed: u64) -> RgbImage {
        let mut rng = Lcg(seed);
        RgbImage::from_fn(w, h, |_, _| {
            let mut px = [0u8; 3];
            for v in px.iter_mut() {
                *v = (rng.next_u64() >> 56) as u8;
            }
            image::Rgb(px)
        })
    }

    #[test]
    fn equals_the_image_crate_to_the_bit() {
        // Shrinking (the paper's 900 → 256 among them), enlarging, mixed, non-square (KolektorSDD
        // to 224 × 576), one-pixel sources and targets, and the identity.
        let cases = [
            ((900, 900), (256, 256)),
            ((250, 630), (224, 576)),
            ((37, 23), (224, 224)),
            ((64, 48), (20, 100)),
            ((1, 1), (5, 3)),
            ((7, 1), (1, 4)),
            ((5, 9), (5, 9)),
            ((3, 3), (3, 1)),
        ];
        for (i, ((sw, sh), (w, h))) in cases.into_iter().enumerate() {
            let mut img = noise(sw, sh, i as u64 + 1);
            // Saturated runs, where clamping and rounding matter.
            for x in 0..sw.min(4) {
                img.put_pixel(x, 0, image::Rgb([255, 0, 255]));
            }
            let want = resize(&img, w, h, FilterType::Triangle);
            let got = resize_triangle_rgb8(&img, w, h);
            assert_eq!(got.dimensions(), want.dimensions());
            assert!(
                got.as_raw() == want.as_raw(),
                "{sw}×{sh} → {w}×{h}: differs from image::imageops::resize"
            );
        }
    }
}
