//! Image and mask preprocessing.

use crate::Sample;
use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, RgbImage};
use rayon::prelude::*;
use std::path::Path;
use tessera_core::model::Preprocess;
use tessera_core::{Error, Result};

/// One preprocessed image.
#[derive(Debug, Clone)]
pub struct LoadedImage {
    /// Normalised CHW values, `3 × crop × crop`.
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
    /// `B × 3 × crop × crop`.
    pub tensor: Tensor,
    /// Display images, one per sample.
    pub images: Vec<RgbImage>,
    /// Ground-truth masks (`crop × crop`, row-major), where the sample has one.
    pub masks: Vec<Option<Vec<bool>>>,
}

fn decode(path: &Path) -> Result<DynamicImage> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    reader
        .decode()
        .map_err(|e| Error::bad_input(path, format!("cannot decode image: {e}")))
}

fn center_crop_offset(size: u32, crop: u32) -> u32 {
    // torchvision's CenterCrop: int(round((size - crop) / 2)).
    ((size - crop) as f64 / 2.0).round() as u32
}

/// Decode, resize, crop and normalise one image. Gray and 16-bit images become 8-bit RGB.
pub fn load_image(path: &Path, pre: &Preprocess) -> Result<LoadedImage> {
    let img = decode(path)?;
    let original_size = (img.width(), img.height());
    if original_size.0 == 0 || original_size.1 == 0 {
        return Err(Error::bad_input(path, "image is empty (0 pixels)"));
    }
    let rgb = img.to_rgb8();
    let resized = image::imageops::resize(&rgb, pre.resize, pre.resize, FilterType::Triangle);
    let off = center_crop_offset(pre.resize, pre.crop);
    let display = image::imageops::crop_imm(&resized, off, off, pre.crop, pre.crop).to_image();
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

/// Load a mask for an image of `image_size`: nearest resize, same crop, > 0.5 is defect.
pub fn load_mask(path: &Path, image_size: (u32, u32), pre: &Preprocess) -> Result<Vec<bool>> {
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
    let resized = image::imageops::resize(&m, pre.resize, pre.resize, FilterType::Nearest);
    let off = center_crop_offset(pre.resize, pre.crop);
    let crop = image::imageops::crop_imm(&resized, off, off, pre.crop, pre.crop).to_image();
    Ok(crop.pixels().map(|p| p[0] > 127).collect())
}

/// Load a batch of samples in parallel (images and their masks) into one tensor on `device`.
pub fn load_batch(samples: &[Sample], pre: &Preprocess, device: &Device) -> Result<Batch> {
    pre.validate()?;
    let loaded: Vec<(LoadedImage, Option<Vec<bool>>)> = samples
        .par_iter()
        .map(|s| {
            let img = load_image(&s.path, pre)?;
            let mask = match &s.mask {
                Some(m) => Some(load_mask(m, img.original_size, pre)?),
                None => None,
            };
            Ok((img, mask))
        })
        .collect::<Result<_>>()?;
    let c = pre.crop as usize;
    let mut data = Vec::with_capacity(loaded.len() * 3 * c * c);
    let mut images = Vec::with_capacity(loaded.len());
    let mut masks = Vec::with_capacity(loaded.len());
    for (img, mask) in loaded {
        data.extend_from_slice(&img.chw);
        images.push(img.display);
        masks.push(mask);
    }
    let tensor = Tensor::from_vec(data, (samples.len(), 3, c, c), device)?;
    Ok(Batch {
        tensor,
        images,
        masks,
    })
}
