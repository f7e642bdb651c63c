//! Tiling: a large or elongated image scored as overlapping square tiles, their maps stitched
//! back into one map of the whole image.
//!
//! Tiles are spread evenly along each axis with at least the asked overlap, the first flush
//! with the top/left edge and the last with the bottom/right one. The scorer sees tiles as
//! images (PaDiM's statistics are per position *within* a tile, pooled over tiles); a pixel
//! covered by several tiles gets the mean of their upsampled maps, and the blur runs once on the
//! stitched map, so seams do not show.

use candle_core::Tensor;
use tessera_core::model::Tiling;
use tessera_core::{Error, Result};

/// Where the tiles of a `width × height` image sit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TileGrid {
    pub width: u32,
    pub height: u32,
    pub tile: u32,
    /// Left edges.
    pub xs: Vec<u32>,
    /// Top edges.
    pub ys: Vec<u32>,
}

/// Evenly spread starts of `tile`-long pieces covering `len` with at least `overlap` shared.
fn starts(len: u32, tile: u32, overlap: u32) -> Vec<u32> {
    if len <= tile {
        return vec![0];
    }
    let stride = (tile - overlap) as f64;
    let n = (((len - tile) as f64 / stride).ceil() as u32 + 1).max(2);
    let step = (len - tile) as f64 / (n - 1) as f64;
    (0..n).map(|i| (i as f64 * step).round() as u32).collect()
}

impl TileGrid {
    /// The grid for an image of `width × height`.
    pub fn new(width: u32, height: u32, t: Tiling) -> Result<Self> {
        if t.overlap >= t.tile || width < t.tile || height < t.tile {
            return Err(Error::Config(format!(
                "tiles of {} px (overlap {}) do not fit a {width}×{height} image",
                t.tile, t.overlap
            )));
        }
        Ok(Self {
            width,
            height,
            tile: t.tile,
            xs: starts(width, t.tile, t.overlap),
            ys: starts(height, t.tile, t.overlap),
        })
    }

    /// Tiles per image.
    pub fn count(&self) -> usize {
        self.xs.len() * self.ys.len()
    }

    /// `B × C × H × W` → `(B·T) × C × tile × tile`, image-major, tiles row by row.
    pub fn split(&self, batch: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = batch.dims4()?;
        if (w as u32, h as u32) != (self.width, self.height) {
            return Err(Error::Config(format!(
                "a {w}×{h} batch for a tile grid of {}×{} images",
                self.width, self.height
            )));
        }
        let t = self.tile as usize;
        let mut tiles = Vec::with_capacity(self.count());
        for &y in &self.ys {
            for &x in &self.xs {
                tiles.push(
                    batch
                        .narrow(2, y as usize, t)?
                        .narrow(3, x as usize, t)?
                        .contiguous()?,
                );
            }
        }
        // B × T × C × t × t → (B·T) × C × t × t.
        Ok(Tensor::stack(&tiles, 1)?.reshape((b * self.count(), c, t, t))?)
    }

    /// One image's tile maps (`count()` maps of `tile × tile`, in [`TileGrid::split`] order)
    /// stitched into a `width × height` map: the mean of every tile covering a pixel.
    pub fn stitch(&self, maps: &[Vec<f32>]) -> Vec<f32> {
        let (w, h, t) = (
            self.width as usize,
            self.height as usize,
            self.tile as usize,
        );
        let mut sum = vec![0f32; w * h];
        let mut cover = vec![0u16; w * h];
        let mut k = 0;
        for &y in &self.ys {
            for &x in &self.xs {
                let m = &maps[k];
                k += 1;
                for r in 0..t {
                    let row = (y as usize + r) * w + x as usize;
                    for (c, &v) in m[r * t..(r + 1) * t].iter().enumerate() {
                        sum[row + c] += v;
                        cover[row + c] += 1;
                    }
                }
            }
        }
        sum.iter()
            .zip(&cover)
            .map(|(s, &n)| s / n.max(1) as f32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_image_with_the_overlap() {
        let g = TileGrid::new(
            630,
            250,
            Tiling {
                tile: 224,
                overlap: 32,
            },
        )
        .unwrap();
        assert_eq!(g.xs, vec![0, 135, 271, 406]);
        assert_eq!(g.ys, vec![0, 26]);
        assert_eq!(*g.xs.last().unwrap() + 224, 630);
        for w in g.xs.windows(2) {
            assert!(w[0] + 224 >= w[1] + 32, "{:?}", g.xs);
        }
        // An image exactly one tile wide has one tile.
        let one = TileGrid::new(
            224,
            300,
            Tiling {
                tile: 224,
                overlap: 16,
            },
        )
        .unwrap();
        assert_eq!(one.xs, vec![0]);
        assert!(TileGrid::new(
            200,
            300,
            Tiling {
                tile: 224,
                overlap: 16
            }
        )
        .is_err());
    }

    #[test]
    fn split_then_stitch_is_the_identity() {
        let dev = candle_core::Device::Cpu;
        let (w, h) = (70usize, 50usize);
        let x = Tensor::arange(0f32, (2 * w * h) as f32, &dev)
            .unwrap()
            .reshape((2, 1, h, w))
            .unwrap();
        let g = TileGrid::new(
            w as u32,
            h as u32,
            Tiling {
                tile: 32,
                overlap: 8,
            },
        )
        .unwrap();
        let tiles = g.split(&x).unwrap();
        assert_eq!(tiles.dims(), &[2 * g.count(), 1, 32, 32]);
        let flat: Vec<f32> = tiles.flatten_all().unwrap().to_vec1().unwrap();
        let per: Vec<Vec<f32>> = flat.chunks(32 * 32).map(|c| c.to_vec()).collect();
        let want: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        for b in 0..2 {
            let n = g.count();
            let m = g.stitch(&per[b * n..(b + 1) * n]);
            assert_eq!(m, want[b * w * h..(b + 1) * w * h]);
        }
    }
}
