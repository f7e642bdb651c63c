//! Defect masks: thresholded, rotated Perlin noise (DRAEM), optionally restricted to the Otsu
//! foreground of object images (MemSeg).
//!
//! Masks are handled internally as one byte per pixel, 0 or 1, row-major.

use crate::config::SynthConfig;
use crate::rng::{Draw, STAGE_MASK};
use image::{GrayImage, RgbImage};

/// Perlin's quintic fade, 6t⁵ − 15t⁴ + 10t³ (C² continuous at cell borders).
#[inline]
fn fade(t: f32) -> f32 {
    t * t * t * (t * (t * 6.0 - 15.0) + 10.0)
}

/// One Perlin draw, thresholded into `out` (0/1) and ANDed with `allowed`; returns the count.
///
/// The noise is evaluated at each pixel centre's continuous, rotated lattice coordinate, so any
/// image size and any rotation work without resampling (DRAEM rotates a rendered noise image,
/// which leaves empty corners; this does not). The lattice only covers the coordinates used.
fn perlin_into(
    (w, h): (u32, u32),
    (res_x, res_y): (u32, u32),
    angle: f32,
    threshold: f32,
    draw: &mut Draw,
    allowed: Option<&[u8]>,
    out: &mut [u8],
) -> usize {
    let (wf, hf) = (w as f32, h as f32);
    let (sx, sy) = (res_x as f32 / wf, res_y as f32 / hf);
    let (sin, cos) = angle.sin_cos();
    // Pixel (px, py) relative to the centre → rotated → lattice units.
    let to_lattice = |px: f32, py: f32| {
        let (dx, dy) = (px - wf / 2.0, py - hf / 2.0);
        let (rx, ry) = (cos * dx - sin * dy, sin * dx + cos * dy);
        (rx * sx + res_x as f32 / 2.0, ry * sy + res_y as f32 / 2.0)
    };
    let corners = [(0.0, 0.0), (wf, 0.0), (0.0, hf), (wf, hf)].map(|(x, y)| to_lattice(x, y));
    let umin = corners.iter().map(|c| c.0).fold(f32::INFINITY, f32::min);
    let umax = corners
        .iter()
        .map(|c| c.0)
        .fold(f32::NEG_INFINITY, f32::max);
    let vmin = corners.iter().map(|c| c.1).fold(f32::INFINITY, f32::min);
    let vmax = corners
        .iter()
        .map(|c| c.1)
        .fold(f32::NEG_INFINITY, f32::max);
    let (gx0, gy0) = (umin.floor() as i32, vmin.floor() as i32);
    let nx = (umax.floor() as i32 - gx0 + 2) as usize;
    let ny = (vmax.floor() as i32 - gy0 + 2) as usize;
    // Unit gradients with uniform angles, as DRAEM's rand_perlin_2d.
    let grads: Vec<(f32, f32)> = (0..nx * ny)
        .map(|_| {
            let a = draw.unit() * std::f32::consts::TAU;
            (a.cos(), a.sin())
        })
        .collect();
    // Lattice coordinates are affine in x: per row, a start and a step.
    let (du, dv) = (cos * sx, sin * sy);
    let mut count = 0usize;
    for y in 0..h {
        let (u0, v0) = to_lattice(0.0, y as f32 + 0.5);
        for x in 0..w {
            let i = (y * w + x) as usize;
            if allowed.is_some_and(|a| a[i] == 0) {
                out[i] = 0;
                continue;
            }
            let xc = x as f32 + 0.5;
            let (u, v) = (u0 + xc * du, v0 + xc * dv);
            let (fu, fv) = (u.floor(), v.floor());
            let ci = ((fu as i32 - gx0).max(0) as usize).min(nx - 2);
            let cj = ((fv as i32 - gy0).max(0) as usize).min(ny - 2);
            let (tu, tv) = (u - fu, v - fv);
            let g = |di: usize, dj: usize| grads[(cj + dj) * nx + ci + di];
            let dot = |(gx, gy): (f32, f32), ox: f32, oy: f32| gx * ox + gy * oy;
            let n00 = dot(g(0, 0), tu, tv);
            let n10 = dot(g(1, 0), tu - 1.0, tv);
            let n01 = dot(g(0, 1), tu, tv - 1.0);
            let n11 = dot(g(1, 1), tu - 1.0, tv - 1.0);
            let (a, b) = (fade(tu), fade(tv));
            let n0 = n00 + a * (n10 - n00);
            let n1 = n01 + a * (n11 - n01);
            // √2 scales 2-D gradient noise to about [-1, 1], as DRAEM.
            let n = std::f32::consts::SQRT_2 * (n0 + b * (n1 - n0));
            let on = (n > threshold) as u8;
            out[i] = on;
            count += on as usize;
        }
    }
    count
}

/// A rotated ellipse around a random allowed pixel: the fallback that keeps masks non-empty.
fn ellipse_into(
    (w, h): (u32, u32),
    draw: &mut Draw,
    allowed: Option<&[u8]>,
    area: usize,
    out: &mut [u8],
) {
    let k = draw.below(area.max(1));
    let centre = match allowed {
        Some(a) => a
            .iter()
            .enumerate()
            .filter(|(_, &v)| v != 0)
            .nth(k)
            .map(|(i, _)| i)
            .unwrap_or(0),
        None => k,
    };
    let (cx, cy) = ((centre as u32 % w) as f32, (centre as u32 / w) as f32);
    let side = w.min(h) as f32;
    let r1 = (draw.range(0.05, 0.2) * side).max(1.5);
    let r2 = (draw.range(0.05, 0.2) * side).max(1.5);
    let (sin, cos) = (draw.unit() * std::f32::consts::PI).sin_cos();
    for y in 0..h {
        for x in 0..w {
            let i = (y * w + x) as usize;
            let (dx, dy) = (x as f32 - cx, y as f32 - cy);
            let (a, b) = ((cos * dx + sin * dy) / r1, (-sin * dx + cos * dy) / r2);
            let inside = a * a + b * b <= 1.0 && allowed.is_none_or(|m| m[i] != 0);
            out[i] = inside as u8;
        }
    }
    out[centre] = 1;
}

/// The defect mask (0/1 per pixel) for a `w × h` image: Perlin draws until one covers at least
/// `min_mask_fraction` of the allowed area, at most `max_attempts` times, then an ellipse.
pub(crate) fn defect_mask(
    (w, h): (u32, u32),
    cfg: &SynthConfig,
    allowed: Option<&[u8]>,
    seed: u64,
) -> Vec<u8> {
    let n = (w * h) as usize;
    let mut draw = Draw::new(seed, STAGE_MASK);
    let area = allowed.map_or(n, |a| a.iter().filter(|&&v| v != 0).count());
    let need = ((cfg.min_mask_fraction as f64 * area as f64).ceil() as usize).max(1);
    let mut out = vec![0u8; n];
    let exps = (cfg.perlin_max_exp - cfg.perlin_min_exp + 1) as usize;
    let max_angle = cfg.max_rotation_deg.to_radians();
    for _ in 0..cfg.max_attempts {
        let a = cfg.perlin_min_exp + draw.below(exps) as u32;
        let b = cfg.perlin_min_exp + draw.below(exps) as u32;
        let angle = draw.range(-max_angle, max_angle);
        let res = (1u32 << a, 1u32 << b);
        let count = perlin_into(
            (w, h),
            res,
            angle,
            cfg.perlin_threshold,
            &mut draw,
            allowed,
            &mut out,
        );
        if count >= need {
            return out;
        }
    }
    ellipse_into((w, h), &mut draw, allowed, area, &mut out);
    out
}

/// A 0/1 byte mask as a 0/255 gray image.
pub(crate) fn to_gray((w, h): (u32, u32), m: &[u8]) -> GrayImage {
    GrayImage::from_raw(
        w,
        h,
        m.iter().map(|&v| if v != 0 { 255 } else { 0 }).collect(),
    )
    .expect("mask length matches its size")
}

/// The Perlin defect mask that [`crate::Synthesizer::synthesize`] uses for a `width × height`
/// image and `seed` (0/255). `allowed`, when given, restricts it (nonzero = allowed); an all-zero
/// `allowed`, or one of another size, is treated as no restriction (as `synthesize` treats an
/// empty foreground).
pub fn perlin_mask(
    width: u32,
    height: u32,
    config: &SynthConfig,
    allowed: Option<&GrayImage>,
    seed: u64,
) -> GrayImage {
    let allowed: Option<Vec<u8>> = allowed
        .filter(|a| a.dimensions() == (width, height) && a.pixels().any(|p| p[0] != 0))
        .map(|a| a.as_raw().iter().map(|&v| (v != 0) as u8).collect());
    let m = defect_mask((width, height), config, allowed.as_deref(), seed);
    to_gray((width, height), &m)
}

/// Otsu's threshold of a 256-bin histogram: the `t` that maximises the between-class variance
/// of `{v ≤ t}` and `{v > t}` (the first such `t` on ties). 0 for an empty or one-valued
/// histogram.
pub fn otsu_threshold(hist: &[u64; 256]) -> u8 {
    let total: u64 = hist.iter().sum();
    let sum_all: f64 = hist
        .iter()
        .enumerate()
        .map(|(v, &c)| v as f64 * c as f64)
        .sum();
    let (mut w0, mut sum0) = (0u64, 0f64);
    let (mut best, mut best_t) = (-1f64, 0u8);
    for (t, &c) in hist.iter().enumerate() {
        w0 += c;
        sum0 += t as f64 * c as f64;
        if w0 == 0 {
            continue;
        }
        let w1 = total - w0;
        if w1 == 0 {
            break;
        }
        let (m0, m1) = (sum0 / w0 as f64, (sum_all - sum0) / w1 as f64);
        let var = w0 as f64 * w1 as f64 * (m0 - m1) * (m0 - m1);
        if var > best {
            best = var;
            best_t = t as u8;
        }
    }
    best_t
}

/// Luma (ITU-R BT.601 weights, rounded) of every pixel.
fn gray(img: &RgbImage) -> Vec<u8> {
    img.pixels()
        .map(|p| ((299 * p[0] as u32 + 587 * p[1] as u32 + 114 * p[2] as u32 + 500) / 1000) as u8)
        .collect()
}

/// Binary dilation by a (2r+1)² square, separably: a pixel is set when a set pixel lies within
/// `r` along the row, then along the column. Linear time (distance to the nearest set pixel).
fn dilate((w, h): (usize, usize), m: &mut [u8], r: usize) {
    if r == 0 {
        return;
    }
    let mut line = vec![0u8; w.max(h)];
    let mut near = vec![false; w.max(h)];
    let mut pass = |m: &mut [u8], len: usize, start: usize, stride: usize| {
        for k in 0..len {
            line[k] = m[start + k * stride];
        }
        let mut last = usize::MAX; // distance since the last set pixel, saturating
        for k in 0..len {
            last = if line[k] != 0 {
                0
            } else {
                last.saturating_add(1)
            };
            near[k] = last <= r;
        }
        last = usize::MAX;
        for k in (0..len).rev() {
            last = if line[k] != 0 {
                0
            } else {
                last.saturating_add(1)
            };
            m[start + k * stride] = (near[k] || last <= r) as u8;
        }
    };
    for y in 0..h {
        pass(m, w, y * w, 1);
    }
    for x in 0..w {
        pass(m, h, x, w);
    }
}

/// The object's pixels (0/1): Otsu on the gray image; of the two classes the one that covers
/// less of the image border is the object; dilated by `dilation` × the shorter side (≥ 1 px).
pub(crate) fn foreground(img: &RgbImage, dilation: f32) -> Vec<u8> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let g = gray(img);
    let mut hist = [0u64; 256];
    for &v in &g {
        hist[v as usize] += 1;
    }
    let t = otsu_threshold(&hist);
    let (mut border, mut bright_border) = (0usize, 0usize);
    for y in 0..h {
        for x in 0..w {
            if x == 0 || y == 0 || x + 1 == w || y + 1 == h {
                border += 1;
                bright_border += (g[y * w + x] > t) as usize;
            }
        }
    }
    // Products are photographed on a background that frames them: the border is background.
    let object_is_bright = 2 * bright_border <= border;
    let mut m: Vec<u8> = g
        .iter()
        .map(|&v| ((v > t) == object_is_bright) as u8)
        .collect();
    let r = if dilation > 0.0 {
        ((dilation * w.min(h) as f32).round() as usize).max(1)
    } else {
        0
    };
    dilate((w, h), &mut m, r);
    m
}

/// The Otsu foreground of `image` (0/255) as used with `foreground = true`: Otsu threshold of
/// the gray image, the class covering less of the border is the object, dilated by
/// `dilation` × the shorter side (at least 1 px; 0 = none). May be all zero (a constant image);
/// synthesis then ignores it.
pub fn foreground_mask(image: &RgbImage, dilation: f32) -> GrayImage {
    to_gray(image.dimensions(), &foreground(image, dilation))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otsu_three_values_exact() {
        // {0:50, 100:10, 200:40}. Split after 0: w0·w1·(m0−m1)² = 50·50·180² = 81.0e6;
        // split after 100: 60·40·(16.67−200)² = 80.67e6. The first wins: t = 0 (and any t in
        // 0..100 gives the same classes; the first is returned).
        let mut h = [0u64; 256];
        h[0] = 50;
        h[100] = 10;
        h[200] = 40;
        assert_eq!(otsu_threshold(&h), 0);
        // Move weight to the middle: {0:40, 100:10, 200:50} mirrors it → t = 100.
        h[0] = 40;
        h[200] = 50;
        assert_eq!(otsu_threshold(&h), 100);
    }

    #[test]
    fn otsu_bimodal_between_modes() {
        // Two equal, overlapping triangular modes at 70 and 190 (half-width 60): by symmetry the
        // best split is at the midpoint, 130 (t = 129 or 130 puts 130 on either side).
        let mut h = [0u64; 256];
        for d in -60i32..=60 {
            let c = (61 - d.abs()) as u64 * 10;
            h[(70 + d) as usize] += c;
            h[(190 + d) as usize] += c;
        }
        let t = otsu_threshold(&h);
        assert!((129..=130).contains(&t), "t = {t}");
        // Separated modes at 60 and 180 (±20): every t in 80..160 splits them; the first, 80.
        let mut h = [0u64; 256];
        for d in -20i32..=20 {
            let c = (21 - d.abs()) as u64 * 10;
            h[(60 + d) as usize] += c;
            h[(180 + d) as usize] += c;
        }
        assert_eq!(otsu_threshold(&h), 80);
        // Degenerate histograms do not panic.
        assert_eq!(otsu_threshold(&[0; 256]), 0);
        let mut one = [0u64; 256];
        one[7] = 9;
        assert_eq!(otsu_threshold(&one), 0);
    }

    #[test]
    fn dilation_is_square() {
        let (w, h) = (9, 7);
        let mut m = vec![0u8; w * h];
        m[3 * w + 4] = 1;
        dilate((w, h), &mut m, 2);
        for y in 0..h {
            for x in 0..w {
                let inside = (2..=6).contains(&x) && (1..=5).contains(&y);
                assert_eq!(m[y * w + x] != 0, inside, "({x},{y})");
            }
        }
    }

    #[test]
    fn perlin_masks_nonempty_for_many_sizes() {
        let cfg = SynthConfig::default();
        for (w, h) in [(8, 8), (31, 17), (64, 64), (100, 37)] {
            for seed in 0..20 {
                let m = defect_mask((w, h), &cfg, None, seed);
                let c = m.iter().filter(|&&v| v != 0).count();
                assert!(c >= 1, "{w}x{h} seed {seed}");
                assert!(m.iter().all(|&v| v <= 1));
            }
        }
    }

    #[test]
    fn ellipse_fallback_when_threshold_unreachable() {
        // Noise never exceeds 1: every Perlin draw is empty, so the ellipse must be used.
        let cfg = SynthConfig {
            perlin_threshold: 1.0,
            max_attempts: 3,
            ..Default::default()
        };
        let m = defect_mask((40, 30), &cfg, None, 5);
        assert!(m.iter().filter(|&&v| v != 0).count() >= 9);
        // Restricted to a 3×3 patch, it stays inside it.
        let mut allowed = vec![0u8; 40 * 30];
        for y in 10..13 {
            for x in 20..23 {
                allowed[y * 40 + x] = 1;
            }
        }
        let m = defect_mask((40, 30), &cfg, Some(&allowed), 5);
        assert!(m.iter().any(|&v| v != 0));
        assert!(m.iter().zip(&allowed).all(|(&a, &b)| a <= b));
    }
}
