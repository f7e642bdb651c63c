//! Anomaly sources S: texture photographs (DRAEM, MemSeg) or "structure" images — the normal
//! image itself, augmented and cut into shuffled cells (MemSeg) — so defects look like foreign
//! material or like the part's own pattern out of place.

use crate::rng::Draw;
use image::{imageops::FilterType, RgbImage};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tessera_core::{Error, Result};

pub(crate) use tessera_data::{is_image_path as is_image, IMAGE_EXTS};

/// Decode any supported image file to 8-bit RGB; errors name the file.
pub(crate) fn decode_rgb(path: &Path) -> Result<RgbImage> {
    let img = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .decode()
        .map_err(|e| Error::bad_input(path, format!("cannot decode image: {e}")))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::bad_input(path, "image is empty (0 pixels)"));
    }
    Ok(img.to_rgb8())
}

/// Image files under `dir`, recursively (DTD keeps one folder per class), sorted so that a
/// seed picks the same file on every machine.
fn list_recursive(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for e in rd {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        let hidden = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if p.is_dir() {
            list_recursive(&p, out)?;
        } else if is_image(&p) && p.is_file() {
            out.push(p);
        }
    }
    Ok(())
}

/// Default bound on decoded, resized textures kept in memory.
pub const DEFAULT_TEXTURE_CACHE_BYTES: usize = 256 << 20;

type Key = (usize, u32, u32);

#[derive(Default)]
struct Cache {
    map: HashMap<Key, Arc<RgbImage>>,
    order: VecDeque<Key>,
    bytes: usize,
}

/// The texture files, listed up front, decoded on first use and cached at the requested size
/// (first in, first out, bounded in bytes). Caching never changes results: an entry is a pure
/// function of (file, size).
pub(crate) struct Textures {
    pub(crate) root: PathBuf,
    pub(crate) files: Vec<PathBuf>,
    cache: Mutex<Cache>,
    pub(crate) limit: usize,
}

impl Textures {
    pub(crate) fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::bad_input(root, "texture folder does not exist"));
        }
        let mut files = Vec::new();
        list_recursive(root, &mut files)?;
        if files.is_empty() {
            return Err(Error::bad_input(
                root,
                format!(
                    "texture folder holds no images ({}), in it or its subfolders",
                    IMAGE_EXTS.join(", ")
                ),
            ));
        }
        files.sort();
        Ok(Self {
            root: root.to_path_buf(),
            files,
            cache: Mutex::new(Cache::default()),
            limit: DEFAULT_TEXTURE_CACHE_BYTES,
        })
    }

    /// Texture `idx` scaled to cover `w × h` (aspect kept) and centre-cropped.
    pub(crate) fn get(&self, idx: usize, w: u32, h: u32) -> Result<Arc<RgbImage>> {
        let key = (idx, w, h);
        if let Some(t) = self.lock().map.get(&key) {
            return Ok(t.clone());
        }
        // Decode outside the lock: other threads keep going (at worst two decode the same file).
        let t = Arc::new(cover(&decode_rgb(&self.files[idx])?, w, h));
        let size = t.as_raw().len();
        if size <= self.limit {
            let mut c = self.lock();
            if !c.map.contains_key(&key) {
                while c.bytes + size > self.limit {
                    let Some(old) = c.order.pop_front() else {
                        break;
                    };
                    if let Some(o) = c.map.remove(&old) {
                        c.bytes -= o.as_raw().len();
                    }
                }
                c.map.insert(key, t.clone());
                c.order.push_back(key);
                c.bytes += size;
            }
        }
        Ok(t)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic elsewhere cannot leave the cache inconsistent in a way that matters.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Scale `img` to cover `w × h` keeping its aspect ratio, then centre-crop.
fn cover(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    if img.dimensions() == (w, h) {
        return img.clone();
    }
    let (tw, th) = (img.width() as f64, img.height() as f64);
    let s = (w as f64 / tw).max(h as f64 / th);
    let nw = ((tw * s).round() as u32).max(w);
    let nh = ((th * s).round() as u32).max(h);
    let r = image::imageops::resize(img, nw, nh, FilterType::Triangle);
    image::imageops::crop_imm(&r, (nw - w) / 2, (nh - h) / 2, w, h).to_image()
}

#[inline]
fn to_u8(v: f32) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

#[inline]
fn luma(r: f32, g: f32, b: f32) -> f32 {
    0.299 * r + 0.587 * g + 0.114 * b
}

/// Light colour jitter of a texture: brightness, contrast (about the mean luma) and saturation
/// factors uniform in `1 ± j`. Sources stay recognisably the same material.
pub(crate) fn jitter(img: &mut RgbImage, j: f32, draw: &mut Draw) {
    if j <= 0.0 {
        return;
    }
    let bright = draw.range(1.0 - j, 1.0 + j);
    let contrast = draw.range(1.0 - j, 1.0 + j);
    let sat = draw.range(1.0 - j, 1.0 + j);
    let n = (img.width() * img.height()).max(1) as f64;
    let mean = (img
        .pixels()
        .map(|p| luma(p[0] as f32, p[1] as f32, p[2] as f32) as f64)
        .sum::<f64>()
        / n) as f32
        * bright;
    for p in img.pixels_mut() {
        let c = p.0.map(|v| mean + contrast * (v as f32 * bright - mean));
        let l = luma(c[0], c[1], c[2]);
        p.0 = c.map(|v| to_u8(l + sat * (v - l)));
    }
}

/// Number of structure augmentations to choose from.
pub(crate) const STRUCTURE_OPS: usize = 9;

fn apply_lut(img: &mut RgbImage, lut: &[[u8; 256]; 3]) {
    for p in img.pixels_mut() {
        for c in 0..3 {
            p[c] = lut[c][p[c] as usize];
        }
    }
}

fn same_lut(f: impl Fn(u8) -> u8) -> [[u8; 256]; 3] {
    let l: [u8; 256] = std::array::from_fn(|v| f(v as u8));
    [l; 3]
}

/// Augmentation `op` (0..STRUCTURE_OPS) with random strength, as DRAEM's pool of imgaug
/// augmenters (gamma, brightness, saturation, hue, solarize, posterize, invert, autocontrast,
/// equalize).
fn augment(img: &mut RgbImage, op: usize, draw: &mut Draw) {
    match op {
        0 => {
            let g = draw.range(0.5f32.ln(), 2.0f32.ln()).exp();
            apply_lut(
                img,
                &same_lut(|v| to_u8(255.0 * (v as f32 / 255.0).powf(g))),
            );
        }
        1 => {
            let (mul, add) = (draw.range(0.7, 1.3), draw.range(-30.0, 30.0));
            apply_lut(img, &same_lut(|v| to_u8(v as f32 * mul + add)));
        }
        2 => {
            let s = draw.range(0.3, 1.7);
            for p in img.pixels_mut() {
                let c = p.0.map(|v| v as f32);
                let l = luma(c[0], c[1], c[2]);
                p.0 = c.map(|v| to_u8(l + s * (v - l)));
            }
        }
        3 => {
            // Hue rotation about the gray axis (the SVG/CSS hue-rotate matrix).
            let (s, c) = draw.range(-60f32, 60.0).to_radians().sin_cos();
            let m = [
                [
                    0.213 + c * 0.787 - s * 0.213,
                    0.715 - c * 0.715 - s * 0.715,
                    0.072 - c * 0.072 + s * 0.928,
                ],
                [
                    0.213 - c * 0.213 + s * 0.143,
                    0.715 + c * 0.285 + s * 0.140,
                    0.072 - c * 0.072 - s * 0.283,
                ],
                [
                    0.213 - c * 0.213 - s * 0.787,
                    0.715 - c * 0.715 + s * 0.715,
                    0.072 + c * 0.928 + s * 0.072,
                ],
            ];
            for p in img.pixels_mut() {
                let v = p.0.map(|v| v as f32);
                p.0 = m.map(|r| to_u8(r[0] * v[0] + r[1] * v[1] + r[2] * v[2]));
            }
        }
        4 => {
            let t = 32 + draw.below(97) as u8; // 32..=128, as imgaug's Solarize
            apply_lut(img, &same_lut(|v| if v >= t { 255 - v } else { v }));
        }
        5 => {
            let bits = 3 + draw.below(4) as u32; // keep 3..=6 bits
            let keep = 0xFFu8 << (8 - bits);
            apply_lut(img, &same_lut(|v| v & keep));
        }
        6 => apply_lut(img, &same_lut(|v| 255 - v)),
        7 => {
            // Autocontrast: stretch each channel's range to 0..255.
            let mut lo = [255u8; 3];
            let mut hi = [0u8; 3];
            for p in img.pixels() {
                for c in 0..3 {
                    lo[c] = lo[c].min(p[c]);
                    hi[c] = hi[c].max(p[c]);
                }
            }
            let lut = std::array::from_fn(|c| {
                std::array::from_fn(|v| {
                    if hi[c] <= lo[c] {
                        v as u8
                    } else {
                        let t = (v as f32 - lo[c] as f32) / (hi[c] - lo[c]) as f32;
                        to_u8(255.0 * t)
                    }
                })
            });
            apply_lut(img, &lut);
        }
        _ => {
            // Equalize each channel's histogram.
            let mut hist = [[0u32; 256]; 3];
            for p in img.pixels() {
                for c in 0..3 {
                    hist[c][p[c] as usize] += 1;
                }
            }
            let n = img.width() * img.height();
            let lut = std::array::from_fn(|c| {
                let mut cdf = [0u32; 256];
                let mut acc = 0;
                for v in 0..256 {
                    acc += hist[c][v];
                    cdf[v] = acc;
                }
                let first = cdf.iter().copied().find(|&x| x > 0).unwrap_or(0);
                std::array::from_fn(|v| {
                    if n <= first {
                        v as u8
                    } else {
                        to_u8(255.0 * (cdf[v].saturating_sub(first)) as f32 / (n - first) as f32)
                    }
                })
            });
            apply_lut(img, &lut);
        }
    }
}

/// Apply `k` distinct random augmentations, in random order.
pub(crate) fn augment_structure(img: &mut RgbImage, k: usize, draw: &mut Draw) {
    for op in draw.pick_distinct(STRUCTURE_OPS, k) {
        augment(img, op, draw);
    }
}

/// Cell `i` of `n` along a side of `len` pixels: `[i·len/n, (i+1)·len/n)`, so any size works.
#[inline]
fn edge(i: u32, n: u32, len: u32) -> u32 {
    (i as u64 * len as u64 / n as u64) as u32
}

/// Cut `img` into `grid × grid` cells and move cell `perm[d]` to cell `d` (row-major). Cells of
/// different sizes (sides not divisible by `grid`) are mapped by nearest-neighbour scaling;
/// equal-sized cells are copied exactly. Returns the shuffled image and the permutation.
pub(crate) fn shuffle_cells(img: &RgbImage, grid: u32, draw: &mut Draw) -> (RgbImage, Vec<usize>) {
    let (w, h) = img.dimensions();
    let g = grid.min(w).min(h).max(1);
    let perm = draw.permutation((g * g) as usize);
    let mut out = RgbImage::new(w, h);
    for (d, &s) in perm.iter().enumerate() {
        let (dx, dy, sx, sy) = (d as u32 % g, d as u32 / g, s as u32 % g, s as u32 / g);
        let (dx0, dx1, dy0, dy1) = (
            edge(dx, g, w),
            edge(dx + 1, g, w),
            edge(dy, g, h),
            edge(dy + 1, g, h),
        );
        let (sx0, sx1, sy0, sy1) = (
            edge(sx, g, w),
            edge(sx + 1, g, w),
            edge(sy, g, h),
            edge(sy + 1, g, h),
        );
        let (dw, dh, sw, sh) = (dx1 - dx0, dy1 - dy0, sx1 - sx0, sy1 - sy0);
        let (src, dst) = (img.as_raw(), out.as_mut());
        let at = |x: u32, y: u32| ((y * w + x) * 3) as usize;
        for y in 0..dh {
            let ys = sy0 + y * sh / dh;
            if sw == dw {
                // Equal widths (always when `grid` divides the width): copy the row.
                let (s0, d0) = (at(sx0, ys), at(dx0, dy0 + y));
                dst[d0..d0 + 3 * dw as usize].copy_from_slice(&src[s0..s0 + 3 * sw as usize]);
            } else {
                for x in 0..dw {
                    let (s0, d0) = (at(sx0 + x * sw / dw, ys), at(dx0 + x, dy0 + y));
                    dst[d0..d0 + 3].copy_from_slice(&src[s0..s0 + 3]);
                }
            }
        }
    }
    (out, perm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::STAGE_SOURCE;

    /// Distinct content in every pixel, so cells cannot be confused.
    fn pattern(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 7 % 256) as u8,
                (y * 5 % 256) as u8,
                ((x * y) % 253) as u8,
            ])
        })
    }

    #[test]
    fn structure_source_is_a_permutation_of_augmented_cells() {
        let (w, h, g) = (48u32, 32u32, 8u32);
        let img = pattern(w, h);
        let mut draw = Draw::new(3, STAGE_SOURCE);
        let mut aug = img.clone();
        augment_structure(&mut aug, 3, &mut draw);
        let (shuf, perm) = shuffle_cells(&aug, g, &mut draw);
        let (cw, ch) = (w / g, h / g);
        let cell = |im: &RgbImage, c: u32| -> Vec<u8> {
            let (x0, y0) = ((c % g) * cw, (c / g) * ch);
            let mut v = Vec::new();
            for y in 0..ch {
                for x in 0..cw {
                    v.extend_from_slice(&im.get_pixel(x0 + x, y0 + y).0);
                }
            }
            v
        };
        // Every output cell equals a distinct cell of the augmented image (found by content,
        // not by trusting `perm`), and the pixel multiset is unchanged.
        let mut used = vec![false; (g * g) as usize];
        for d in 0..g * g {
            let out = cell(&shuf, d);
            let src = (0..g * g)
                .find(|&s| !used[s as usize] && cell(&aug, s) == out)
                .unwrap_or_else(|| panic!("output cell {d} is no cell of the augmented image"));
            used[src as usize] = true;
            assert_eq!(src as usize, perm[d as usize]);
        }
        assert!(
            perm.iter().enumerate().any(|(d, &s)| d != s),
            "nothing moved"
        );
        let mut a: Vec<u8> = aug.as_raw().clone();
        let mut b: Vec<u8> = shuf.as_raw().clone();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
    }

    #[test]
    fn uneven_sizes_and_every_augmentation_work() {
        let img = pattern(37, 23);
        for op in 0..STRUCTURE_OPS {
            let mut a = img.clone();
            augment(&mut a, op, &mut Draw::new(op as u64, 9));
            assert_eq!(a.dimensions(), img.dimensions());
        }
        let (s, p) = shuffle_cells(&img, 8, &mut Draw::new(1, 1));
        assert_eq!(s.dimensions(), (37, 23));
        assert_eq!(p.len(), 64);
        // Invert is its own inverse: a sanity check of the LUT plumbing.
        let mut a = img.clone();
        augment(&mut a, 6, &mut Draw::new(0, 0));
        augment(&mut a, 6, &mut Draw::new(0, 0));
        assert_eq!(a, img);
    }

    #[test]
    fn cover_keeps_aspect_and_size() {
        let img = pattern(60, 30);
        let c = cover(&img, 20, 20);
        assert_eq!(c.dimensions(), (20, 20));
        let same = cover(&img, 60, 30);
        assert_eq!(same, img);
    }
}
