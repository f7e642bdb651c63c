//! Image and mask preprocessing.

use crate::Sample;
use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, RgbImage};
use rayon::prelude::*;
use std::path::Path;
use tessera_core::model::{Geometry, Preprocess};
use tessera_core::{Error, Result};

/// One preprocessed image.
#[derive(Debug, Clone)]
pub struct LoadedImage {
    /// Normalised CHW values, `3 × H × W` (the preprocessing's input size).
    pub chw: Vec<f32>,
    /// The resized and cropped RGB image (what the network sees, before normalisation), for
    /// heatmaps.
    pub display: RgbImage,
    /// Size of the file's image before preprocessing (width, height).
    pub original_size: (u32, u32),
}

/// A preprocessed batch.
#[derive(Debug)]
pub struct Batch {
    /// `B × 3 × H × W`.
    pub tensor: Tensor,
    /// Display images, one per sample.
    pub images: Vec<RgbImage>,
    /// Ground-truth masks (`H × W`, row-major), where the sample has one.
    pub masks: Vec<Option<Vec<bool>>>,
    /// Masks whose values were not 0/255 (e.g. 0/1), read as "> 0 is defect": (file, max
    /// value), so the caller can say so.
    pub odd_masks: Vec<(std::path::PathBuf, u8)>,
}

/// Decoding limits: images up to 32 768 px a side and 1 GiB of pixels; a "decompression bomb"
/// (a small file claiming a huge image) is refused before memory is allocated for it.
pub(crate) fn decode_limits() -> image::Limits {
    let mut l = image::Limits::default();
    l.max_image_width = Some(32_768);
    l.max_image_height = Some(32_768);
    l.max_alloc = Some(1 << 30);
    l
}

pub(crate) fn decode(path: &Path) -> Result<DynamicImage> {
    if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(Error::bad_input(path, "is a folder, not an image"));
    }
    let mut reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    reader.limits(decode_limits());
    reader
        .decode()
        .map_err(|e| Error::bad_input(path, format!("cannot decode image: {e}")))
}

/// Decode an image held in memory (a request body); `origin` names it in errors. The same
/// decoders and limits as for files, so an image scores the same from a file or from bytes.
pub fn decode_bytes(bytes: &[u8], origin: &str) -> Result<DynamicImage> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::bad_input(origin, format!("cannot read the image: {e}")))?;
    if reader.format().is_none() {
        return Err(Error::bad_input(
            origin,
            "not an image in a known format (PNG, JPEG, BMP or TIFF)",
        ));
    }
    reader.limits(decode_limits());
    reader
        .decode()
        .map_err(|e| Error::bad_input(origin, format!("cannot decode image: {e}")))
}

fn center_crop_offset(size: u32, crop: u32) -> u32 {
    // torchvision's CenterCrop: int(round((size - crop) / 2)).
    ((size - crop) as f64 / 2.0).round() as u32
}

/// Bring an image to the preprocessing's geometry: square resize + center crop, or an exact
/// resize (an unresolved geometry is resolved for this image alone).
fn geometry_of(pre: &Preprocess, size: (u32, u32)) -> Geometry {
    if pre.is_resolved() {
        pre.geometry
    } else {
        pre.resolve(size).geometry
    }
}

fn fit_geometry<P: image::Pixel + 'static>(
    img: &image::ImageBuffer<P, Vec<P::Subpixel>>,
    g: Geometry,
    resize: impl Fn(
        &image::ImageBuffer<P, Vec<P::Subpixel>>,
        u32,
        u32,
    ) -> image::ImageBuffer<P, Vec<P::Subpixel>>,
) -> image::ImageBuffer<P, Vec<P::Subpixel>> {
    match g {
        Geometry::Square { resize: side, crop } => {
            let resized = resize(img, side, side);
            let off = center_crop_offset(side, crop);
            image::imageops::crop_imm(&resized, off, off, crop, crop).to_image()
        }
        Geometry::Exact { width, height } => {
            if img.dimensions() == (width, height) {
                img.clone()
            } else {
                resize(img, width, height)
            }
        }
        Geometry::ShortSide { .. } | Geometry::Native | Geometry::Auto => {
            unreachable!("geometry_of resolves these")
        }
    }
}

/// Decode, resize, crop and normalise one image. Gray and 16-bit images become 8-bit RGB.
pub fn load_image(path: &Path, pre: &Preprocess) -> Result<LoadedImage> {
    preprocess_image(&decode(path)?, pre, path)
}

/// Resize, crop and normalise a decoded image (`origin` names it in errors).
pub fn preprocess_image(
    img: &DynamicImage,
    pre: &Preprocess,
    origin: impl AsRef<Path>,
) -> Result<LoadedImage> {
    let original_size = (img.width(), img.height());
    if original_size.0 == 0 || original_size.1 == 0 {
        return Err(Error::bad_input(origin, "image is empty (0 pixels)"));
    }
    let rgb = img.to_rgb8();
    let g = geometry_of(pre, original_size);
    // The triangle filter (`FilterType::Triangle`), by our faster copy of `image`'s resize.
    let display = fit_geometry(&rgb, g, crate::resize::resize_triangle_rgb8);
    let chw = normalize(&display, pre);
    Ok(LoadedImage {
        chw,
        display,
        original_size,
    })
}

/// An RGB image as normalised CHW values (`(x/255 − mean)/std` per channel), the network's
/// input layout.
pub fn normalize(img: &RgbImage, pre: &Preprocess) -> Vec<f32> {
    let n = (img.width() * img.height()) as usize;
    let mut chw = vec![0f32; 3 * n];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            chw[c * n + i] = (px[c] as f32 / 255.0 - pre.mean[c]) / pre.std[c];
        }
    }
    chw
}

/// A loaded ground-truth mask.
#[derive(Debug, Clone)]
pub struct LoadedMask {
    /// `H × W` at the preprocessing's input size, row-major; true = defect.
    pub pixels: Vec<bool>,
    /// The largest value in the file (255 for a 0/255 mask).
    pub max_value: u8,
}

impl LoadedMask {
    /// Whether the file was not a 0/255 mask: its defect pixels were read as "> 0".
    pub fn is_odd(&self) -> bool {
        self.max_value > 0 && self.max_value <= 127
    }
}

/// Load a mask for an image of `image_size`: nearest resize, same crop. A 0/255 mask is read
/// as `> 127`; a mask whose values never exceed 127 (e.g. a 0/1 mask) as `> 0`, so that it is
/// not silently read as empty ([`LoadedMask::is_odd`] says so).
pub fn load_mask_checked(
    path: &Path,
    image_size: (u32, u32),
    pre: &Preprocess,
) -> Result<LoadedMask> {
    let m: GrayImage = decode(path)?.to_luma8();
    if m.dimensions() != image_size {
        return Err(Error::bad_input(
            path,
            format!(
                "mask is {}×{} but its image is {}×{}",
                m.width(),
                m.height(),
                image_size.0,
                image_size.1
            ),
        ));
    }
    let max_value = m.pixels().map(|p| p[0]).max().unwrap_or(0);
    let cut = if max_value > 127 { 127 } else { 0 };
    let g = geometry_of(pre, image_size);
    let fitted = fit_geometry(&m, g, |m, w, h| {
        image::imageops::resize(m, w, h, FilterType::Nearest)
    });
    Ok(LoadedMask {
        pixels: fitted.pixels().map(|p| p[0] > cut).collect(),
        max_value,
    })
}

/// [`load_mask_checked`], the pixels only.
pub fn load_mask(path: &Path, image_size: (u32, u32), pre: &Preprocess) -> Result<Vec<bool>> {
    Ok(load_mask_checked(path, image_size, pre)?.pixels)
}

/// Load a batch of samples in parallel (images and their masks) into one tensor on `device`.
/// Every image must come out at the same size (a resolved geometry guarantees it).
pub fn load_batch(samples: &[Sample], pre: &Preprocess, device: &Device) -> Result<Batch> {
    pre.validate()?;
    let loaded: Vec<(LoadedImage, Option<LoadedMask>)> = samples
        .par_iter()
        .map(|s| {
            let img = load_image(&s.path, pre)?;
            let mask = match &s.mask {
                Some(m) => Some(load_mask_checked(m, img.original_size, pre)?),
                None => None,
            };
            Ok((img, mask))
        })
        .collect::<Result<_>>()?;
    let Some(first) = loaded.first() else {
        return Err(Error::Config("an empty batch".into()));
    };
    let (w, h) = first.0.display.dimensions();
    let mut data = Vec::with_capacity(loaded.len() * 3 * (w * h) as usize);
    let mut images = Vec::with_capacity(loaded.len());
    let mut masks = Vec::with_capacity(loaded.len());
    let mut odd_masks = Vec::new();
    for ((img, mask), s) in loaded.into_iter().zip(samples) {
        if img.display.dimensions() != (w, h) {
            return Err(Error::bad_input(
                &s.path,
                format!(
                    "comes out at {}×{} but the batch is {w}×{h}: fix the preprocessing size \
                     (a whole-image geometry is resolved once, from the training images)",
                    img.display.width(),
                    img.display.height()
                ),
            ));
        }
        data.extend_from_slice(&img.chw);
        images.push(img.display);
        if let (Some(m), Some(p)) = (&mask, &s.mask) {
            if m.is_odd() {
                odd_masks.push((p.clone(), m.max_value));
            }
        }
        masks.push(mask.map(|m| m.pixels));
    }
    let tensor = Tensor::from_vec(data, (samples.len(), 3, h as usize, w as usize), device)?;
    Ok(Batch {
        tensor,
        images,
        masks,
        odd_masks,
    })
}
