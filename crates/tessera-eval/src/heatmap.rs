//! Qualitative heatmap panels, like Fig. 1 of the PaDiM paper: image | heatmap overlay |
//! ground truth | predicted mask.

use image::{Rgb, RgbImage};
use std::path::Path;
use tessera_core::{io::write_atomic, AnomalyMap, Error, Result};

/// White gap between panel tiles, in pixels.
pub const GAP: u32 = 4;

const RED: Rgb<u8> = Rgb([255, 0, 0]);
const GREEN: Rgb<u8> = Rgb([0, 255, 0]);

/// The jet colormap (as in matplotlib): `0` → dark blue `(0, 0, 128)`, `0.5` → green-ish,
/// `1` → dark red `(128, 0, 0)`. `t` is clamped to `[0, 1]`; NaN maps to `0`.
pub fn jet(t: f32) -> [u8; 3] {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let ch = |c: f32| ((1.5 - (4.0 * t - c).abs()).clamp(0.0, 1.0) * 255.0).round() as u8;
    [ch(3.0), ch(2.0), ch(1.0)]
}

fn blend(a: Rgb<u8>, b: [u8; 3], wb: f32) -> Rgb<u8> {
    let mix = |x: u8, y: u8| (x as f32 * (1.0 - wb) + y as f32 * wb).round() as u8;
    Rgb([mix(a[0], b[0]), mix(a[1], b[1]), mix(a[2], b[2])])
}

/// Pixels of `region` (row-major `w × h`) with a 4-neighbour outside it (the image border counts
/// as outside).
fn contour(region: &[bool], w: usize, h: usize) -> Vec<bool> {
    let mut out = vec![false; region.len()];
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            if !region[i] {
                continue;
            }
            let outside = x == 0
                || y == 0
                || x + 1 == w
                || y + 1 == h
                || !region[i - 1]
                || !region[i + 1]
                || !region[i - w]
                || !region[i + w];
            out[i] = outside;
        }
    }
    out
}

fn size_error(msg: String) -> Error {
    Error::bad_input("heatmap panel", msg)
}

/// Render a four-tile panel, tiles side by side with [`GAP`]-pixel white gaps:
///
/// 1. the image;
/// 2. the map normalised by `range` (`(v - lo) / (hi - lo)`, clamped to `[0, 1]`), coloured with
///    [`jet`] and blended 50/50 over the image;
/// 3. the ground-truth mask, white on black (all black when `mask` is `None`);
/// 4. the image with the predicted region (`map >= threshold`) tinted red and its contour drawn
///    in solid red, plus the ground-truth contour in green when a mask is given.
///
/// Every tile is `map.width × map.height`; the panel is `4 w + 3 GAP` wide and `h` high.
///
/// # Errors
///
/// [`Error::BadInput`] when the image is not `map.width × map.height`, the map's data or the
/// mask has the wrong length.
pub fn render_panel(
    image: &RgbImage,
    map: &AnomalyMap,
    mask: Option<&[bool]>,
    threshold: f32,
    range: (f32, f32),
) -> Result<RgbImage> {
    let (w, h) = (map.width, map.height);
    let n = w * h;
    if map.data.len() != n {
        return Err(size_error(format!(
            "anomaly map has {} values but is {w}×{h}",
            map.data.len()
        )));
    }
    if (image.width() as usize, image.height() as usize) != (w, h) {
        return Err(size_error(format!(
            "image is {}×{} but the anomaly map is {w}×{h}; resize the image to the map first",
            image.width(),
            image.height()
        )));
    }
    if let Some(m) = mask {
        if m.len() != n {
            return Err(size_error(format!(
                "mask has {} pixels but the anomaly map is {w}×{h}",
                m.len()
            )));
        }
    }
    let (w32, h32) = (image.width(), image.height());
    let mut panel = RgbImage::from_pixel(4 * w32 + 3 * GAP, h32, Rgb([255, 255, 255]));
    let (lo, hi) = range;
    let norm = |v: f32| {
        if hi > lo {
            (v - lo) / (hi - lo)
        } else if v >= lo {
            1.0
        } else {
            0.0
        }
    };
    let pred: Vec<bool> = map.data.iter().map(|&v| v >= threshold).collect();
    let pred_edge = contour(&pred, w, h);
    let gt_edge = mask.map(|m| contour(m, w, h));
    let tile = |k: u32| k * (w32 + GAP);

    for y in 0..h32 {
        for x in 0..w32 {
            let i = y as usize * w + x as usize;
            let px = *image.get_pixel(x, y);
            panel.put_pixel(tile(0) + x, y, px);
            panel.put_pixel(tile(1) + x, y, blend(px, jet(norm(map.data[i])), 0.5));
            let g = if mask.is_some_and(|m| m[i]) { 255 } else { 0 };
            panel.put_pixel(tile(2) + x, y, Rgb([g, g, g]));
            let p = if gt_edge.as_ref().is_some_and(|e| e[i]) {
                GREEN
            } else if pred_edge[i] {
                RED
            } else if pred[i] {
                blend(px, RED.0, 0.4)
            } else {
                px
            };
            panel.put_pixel(tile(3) + x, y, p);
        }
    }
    Ok(panel)
}

/// Tile `k` (0..4) of a panel made by [`render_panel`]: 0 image, 1 heatmap overlay, 2 ground
/// truth, 3 predicted mask.
pub fn panel_tile(panel: &RgbImage, k: u32) -> RgbImage {
    let tw = (panel.width().saturating_sub(3 * GAP)) / 4;
    image::imageops::crop_imm(panel, k * (tw + GAP), 0, tw, panel.height()).to_image()
}

/// A Fig.-5-style comparison: one row per image, `image | ground truth | heatmap A | mask A |
/// heatmap B | mask B …` from panels of the same image rendered by [`render_panel`] for each
/// compared run (`rows[i][j]`: image `i`, run `j`; all panels of a row the same size).
pub fn compose_gallery(rows: &[Vec<RgbImage>]) -> Result<RgbImage> {
    let first = rows
        .first()
        .and_then(|r| r.first())
        .ok_or_else(|| Error::Config("a gallery needs at least one panel".into()))?;
    let tw = (first.width().saturating_sub(3 * GAP)) / 4;
    let h = first.height();
    let runs = rows[0].len() as u32;
    let cols = 2 + 2 * runs;
    let width = cols * tw + (cols - 1) * GAP;
    let height = rows.len() as u32 * h + (rows.len() as u32 - 1) * GAP;
    let mut out = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    for (r, panels) in rows.iter().enumerate() {
        if panels.len() as u32 != runs
            || panels.iter().any(|p| p.dimensions() != first.dimensions())
        {
            return Err(Error::Config(format!(
                "gallery row {}: every run needs one panel of {}×{}",
                r + 1,
                first.width(),
                first.height()
            )));
        }
        let y = r as u32 * (h + GAP);
        let mut tiles = vec![panel_tile(&panels[0], 0), panel_tile(&panels[0], 2)];
        for p in panels {
            tiles.push(panel_tile(p, 1));
            tiles.push(panel_tile(p, 3));
        }
        for (k, t) in tiles.iter().enumerate() {
            image::imageops::replace(&mut out, t, (k as u32 * (tw + GAP)) as i64, y as i64);
        }
    }
    Ok(out)
}

/// Save an RGB image as PNG, atomically (encoded in memory, then written via temp file + rename).
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| Error::io(path, std::io::Error::other(e)))?;
    write_atomic(path, &buf.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(w: usize, h: usize, f: impl Fn(usize, usize) -> f32) -> AnomalyMap {
        let mut data = Vec::with_capacity(w * h);
        for y in 0..h {
            for x in 0..w {
                data.push(f(x, y));
            }
        }
        AnomalyMap::new(w, h, data)
    }

    #[test]
    fn jet_endpoints() {
        assert_eq!(jet(0.0), [0, 0, 128]);
        assert_eq!(jet(1.0), [128, 0, 0]);
        assert_eq!(jet(-5.0), [0, 0, 128]);
        assert_eq!(jet(7.0), [128, 0, 0]);
        assert_eq!(jet(f32::NAN), [0, 0, 128]);
        let mid = jet(0.5);
        assert!(mid[1] == 255 && mid[0] < 200 && mid[2] < 200, "{mid:?}");
    }

    #[test]
    fn panel_size_and_tiles() {
        let (w, h) = (20usize, 12usize);
        let img = RgbImage::from_pixel(w as u32, h as u32, Rgb([100, 100, 100]));
        let m = map(w, h, |x, _| x as f32 / (w - 1) as f32);
        let p = render_panel(&img, &m, None, 2.0, (0.0, 1.0)).unwrap();
        assert_eq!(p.dimensions(), (4 * 20 + 3 * GAP, 12));
        // Tile 1 is the image, gaps are white, tile 3 is black without a mask.
        assert_eq!(*p.get_pixel(0, 0), Rgb([100, 100, 100]));
        assert_eq!(*p.get_pixel(20, 0), Rgb([255, 255, 255]));
        assert_eq!(*p.get_pixel(2 * (20 + GAP) + 5, 5), Rgb([0, 0, 0]));
        // Tile 2: left edge is image blended with dark blue, right edge with dark red.
        let t1 = 20 + GAP;
        assert_eq!(*p.get_pixel(t1, 3), Rgb([50, 50, 114]));
        assert_eq!(*p.get_pixel(t1 + 19, 3), Rgb([114, 50, 50]));
        // Tile 4: nothing predicted at threshold 2 → plain image.
        assert_eq!(*p.get_pixel(3 * t1 + 10, 6), Rgb([100, 100, 100]));
    }

    #[test]
    fn square_region_contours() {
        let (w, h) = (16usize, 16usize);
        let img = RgbImage::from_pixel(16, 16, Rgb([0, 0, 0]));
        // Predicted square: 4..12 × 4..12. GT square: 6..10 × 6..10.
        let m = map(w, h, |x, y| {
            if (4..12).contains(&x) && (4..12).contains(&y) {
                1.0
            } else {
                0.0
            }
        });
        let mask: Vec<bool> = (0..w * h)
            .map(|i| (6..10).contains(&(i % w)) && (6..10).contains(&(i / w)))
            .collect();
        let p = render_panel(&img, &m, Some(&mask), 0.5, (0.0, 1.0)).unwrap();
        let t3 = 3 * (16 + GAP);
        let at = |x: u32, y: u32| *p.get_pixel(t3 + x, y);
        // Prediction contour: corners and edges of the square in solid red.
        for (x, y) in [(4, 4), (11, 4), (4, 11), (11, 11), (7, 4), (4, 8)] {
            assert_eq!(at(x, y), RED, "({x},{y})");
        }
        // Interior of the prediction (outside GT) tinted, not solid red.
        let inner = at(5, 5);
        assert!(inner[0] > 0 && inner[0] < 255 && inner[1] == 0, "{inner:?}");
        // Outside untouched.
        assert_eq!(at(2, 2), Rgb([0, 0, 0]));
        // GT contour in green, GT interior tinted.
        assert_eq!(at(6, 6), GREEN);
        assert_eq!(at(9, 7), GREEN);
        assert_ne!(at(7, 7), GREEN);
        // Tile 3 shows the mask.
        let t2 = 2 * (16 + GAP);
        assert_eq!(*p.get_pixel(t2 + 7, 7), Rgb([255, 255, 255]));
        assert_eq!(*p.get_pixel(t2 + 2, 2), Rgb([0, 0, 0]));
        let reds = (0..16)
            .flat_map(|y| (0..16).map(move |x| (x, y)))
            .filter(|&(x, y)| at(x, y) == RED)
            .count();
        assert_eq!(reds, 28); // perimeter of an 8×8 square
    }

    #[test]
    fn region_at_border_has_contour() {
        let img = RgbImage::new(8, 8);
        let m = map(8, 8, |_, _| 1.0);
        let p = render_panel(&img, &m, None, 0.5, (0.0, 0.0)).unwrap();
        let t3 = 3 * (8 + GAP);
        assert_eq!(*p.get_pixel(t3, 0), RED);
        assert_eq!(*p.get_pixel(t3 + 7, 7), RED);
        assert_ne!(*p.get_pixel(t3 + 3, 3), RED);
    }

    #[test]
    fn size_mismatch_is_an_error() {
        let img = RgbImage::new(10, 10);
        let m = map(12, 10, |_, _| 0.0);
        let e = render_panel(&img, &m, None, 0.5, (0.0, 1.0)).unwrap_err();
        assert!(e.to_string().contains("10×10"), "{e}");
        let m = map(10, 10, |_, _| 0.0);
        assert!(render_panel(&img, &m, Some(&[true; 5]), 0.5, (0.0, 1.0)).is_err());
        let bad = AnomalyMap::new(10, 10, vec![0.0; 3]);
        assert!(render_panel(&img, &bad, None, 0.5, (0.0, 1.0)).is_err());
    }

    #[test]
    fn png_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out/panel.png");
        let mut img = RgbImage::new(5, 3);
        img.put_pixel(1, 2, Rgb([9, 8, 7]));
        save_png(&img, &path).unwrap();
        let back = image::open(&path).unwrap().to_rgb8();
        assert_eq!(back, img);
    }
}
