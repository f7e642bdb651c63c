//! The local deformation: inside the mask, resample the blended image through a smooth random
//! displacement field plus a small affine map about the mask's centroid. The defect's pattern
//! bends, and neighbouring normal structure is dragged into the mask, so defects differ from
//! normal images in shape as well as in colour and texture. Pixels outside the mask are never
//! written.

use crate::config::DeformConfig;
use crate::rng::{Draw, STAGE_DEFORM};
use image::RgbImage;

/// Catmull–Rom weights for the 4 control points around fractional position `t` in [0, 1).
#[inline]
fn catmull_rom(t: f32) -> [f32; 4] {
    let (t2, t3) = (t * t, t * t * t);
    [
        0.5 * (-t3 + 2.0 * t2 - t),
        0.5 * (3.0 * t3 - 5.0 * t2 + 2.0),
        0.5 * (-3.0 * t3 + 4.0 * t2 + t),
        0.5 * (t3 - t2),
    ]
}

/// Per pixel coordinate along one axis: the 4 control indices (clamped) and their weights.
fn axis_taps(len: u32, grid: u32) -> Vec<([usize; 4], [f32; 4])> {
    let g = grid as usize;
    (0..len)
        .map(|p| {
            let t = if len > 1 {
                p as f32 / (len - 1) as f32 * (g - 1) as f32
            } else {
                0.0
            };
            let i = (t.floor() as usize).min(g - 2);
            let idx = [i as isize - 1, i as isize, i as isize + 1, i as isize + 2]
                .map(|k| k.clamp(0, g as isize - 1) as usize);
            (idx, catmull_rom(t - i as f32))
        })
        .collect()
}

/// Bilinear sample of `img` at (x, y), clamped to the image.
#[inline]
fn sample(img: &RgbImage, x: f32, y: f32) -> [u8; 3] {
    let (w, h) = img.dimensions();
    let x = x.clamp(0.0, (w - 1) as f32);
    let y = y.clamp(0.0, (h - 1) as f32);
    let (x0, y0) = (x.floor() as u32, y.floor() as u32);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let raw = img.as_raw();
    let at = |x: u32, y: u32, c: usize| raw[((y * w + x) * 3) as usize + c] as f32;
    std::array::from_fn(|c| {
        let top = at(x0, y0, c) + fx * (at(x1, y0, c) - at(x0, y0, c));
        let bot = at(x0, y1, c) + fx * (at(x1, y1, c) - at(x0, y1, c));
        (top + fy * (bot - top)).round().clamp(0.0, 255.0) as u8
    })
}

/// Overwrite the mask pixels of `out` with `src` warped; `src` and `out` have the same size.
pub(crate) fn deform_into(
    src: &RgbImage,
    mask: &[u8],
    cfg: &DeformConfig,
    seed: u64,
    out: &mut RgbImage,
) {
    let (w, h) = src.dimensions();
    let mut draw = Draw::new(seed, STAGE_DEFORM);
    let g = cfg.grid as usize;
    let amp = cfg.strength * w.min(h) as f32;
    let field: Vec<(f32, f32)> = (0..g * g)
        .map(|_| (draw.range(-amp, amp), draw.range(-amp, amp)))
        .collect();
    let angle = draw
        .range(-cfg.max_rotation_deg, cfg.max_rotation_deg)
        .to_radians();
    let scale = 1.0 + draw.range(-cfg.max_scale, cfg.max_scale);
    let (sin, cos) = angle.sin_cos();

    // The affine map turns about the mask's centroid, so the defect stays where the mask is.
    let (mut sx, mut sy, mut n) = (0f64, 0f64, 0f64);
    let (mut x0, mut x1, mut y0, mut y1) = (w, 0, h, 0);
    for (i, &m) in mask.iter().enumerate() {
        if m != 0 {
            let (x, y) = (i as u32 % w, i as u32 / w);
            sx += x as f64;
            sy += y as f64;
            n += 1.0;
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
    }
    if n == 0.0 {
        return;
    }
    let (cx, cy) = ((sx / n) as f32, (sy / n) as f32);
    let tx = axis_taps(w, cfg.grid);
    let ty = axis_taps(h, cfg.grid);
    // Separable interpolation: first along x for every control row (g × w values), then 4 taps
    // along y per pixel instead of 16.
    let (xa, xb) = (x0 as usize, x1 as usize + 1);
    let mut rows = vec![(0f32, 0f32); g * (xb - xa)];
    for j in 0..g {
        for x in xa..xb {
            let (ix, wx) = &tx[x];
            let mut d = (0f32, 0f32);
            for (&i, &k) in ix.iter().zip(wx) {
                let (fx, fy) = field[j * g + i];
                d = (d.0 + k * fx, d.1 + k * fy);
            }
            rows[j * (xb - xa) + x - xa] = d;
        }
    }
    let raw = out.as_mut();
    for y in y0..=y1 {
        let (iy, wy) = &ty[y as usize];
        for x in x0..=x1 {
            let i = (y * w + x) as usize;
            if mask[i] == 0 {
                continue;
            }
            let (mut dx, mut dy) = (0f32, 0f32);
            for (&j, &k) in iy.iter().zip(wy) {
                let (fx, fy) = rows[j * (xb - xa) + x as usize - xa];
                dx += k * fx;
                dy += k * fy;
            }
            let (px, py) = (x as f32 - cx, y as f32 - cy);
            let qx = cx + scale * (cos * px - sin * py) + dx;
            let qy = cy + scale * (sin * px + cos * py) + dy;
            raw[i * 3..i * 3 + 3].copy_from_slice(&sample(src, qx, qy));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_identity_without_motion() {
        for k in 0..10 {
            let s: f32 = catmull_rom(k as f32 / 10.0).iter().sum();
            assert!((s - 1.0).abs() < 1e-6);
        }
        // Zero strength, rotation and scale: the warp is the identity.
        let img = RgbImage::from_fn(20, 20, |x, y| image::Rgb([x as u8 * 9, y as u8 * 11, 7]));
        let cfg = DeformConfig {
            strength: 0.0,
            max_rotation_deg: 0.0,
            max_scale: 0.0,
            ..Default::default()
        };
        let mask = vec![1u8; 400];
        let mut out = img.clone();
        deform_into(&img, &mask, &cfg, 1, &mut out);
        assert_eq!(out, img);
        // With motion, mask pixels change, others do not.
        let mut mask = vec![0u8; 400];
        for y in 5..15 {
            for x in 5..15 {
                mask[y * 20 + x] = 1;
            }
        }
        let mut out = img.clone();
        deform_into(&img, &mask, &DeformConfig::default(), 1, &mut out);
        assert_ne!(out, img);
        for (i, (a, b)) in out.pixels().zip(img.pixels()).enumerate() {
            if mask[i] == 0 {
                assert_eq!(a, b);
            }
        }
    }
}
