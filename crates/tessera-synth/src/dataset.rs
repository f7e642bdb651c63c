//! A synthetic test split in the MVTec layout, made from a category's normal training images.

use crate::rng::image_seed;
use crate::source::{decode_rgb, is_image};
use crate::synth::{SourceKind, Synthesizer};
use image::ImageEncoder;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use tessera_core::{Error, Result};

/// Defect type (folder name) of the written images.
pub const DEFECT_TYPE: &str = "synthetic";

/// Name of the JSON record written next to the images.
pub const MANIFEST_FILE: &str = "synthesis.json";

/// What [`write_dataset`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SynthSummary {
    /// Images written.
    pub count: usize,
    /// Normal images available in `train/good`.
    pub normals: usize,
    /// Images whose source was a texture.
    pub texture_sources: usize,
    /// Images whose source was the structure image.
    pub structure_sources: usize,
    /// Wall time, seconds.
    pub seconds: f64,
    /// `count / seconds`.
    pub images_per_second: f64,
    /// `out/test/synthetic`.
    pub images_dir: PathBuf,
    /// `out/ground_truth/synthetic`.
    pub masks_dir: PathBuf,
}

/// One written image, for the manifest.
#[derive(Debug, Clone, Serialize)]
struct Record {
    image: String,
    mask: String,
    normal: PathBuf,
    seed: u64,
    source: SourceKind,
    beta: f32,
}

#[derive(Serialize)]
struct Manifest<'a> {
    tessera_version: &'a str,
    category: &'a Path,
    seed: u64,
    count: usize,
    textures: Option<&'a Path>,
    config: &'a crate::SynthConfig,
    images: &'a [Record],
}

fn png_bytes(
    path: &Path,
    raw: &[u8],
    (w, h): (u32, u32),
    color: image::ExtendedColorType,
) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    image::codecs::png::PngEncoder::new(&mut buf)
        .write_image(raw, w, h, color)
        .map_err(|e| Error::bad_input(path, format!("cannot encode PNG: {e}")))?;
    Ok(buf)
}

fn list_normals(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::bad_input(
            dir,
            "folder of normal training images does not exist (expected CATEGORY/train/good)",
        ));
    }
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        if is_image(&p) && p.is_file() {
            v.push(p);
        }
    }
    if v.is_empty() {
        return Err(Error::bad_input(
            dir,
            "folder holds no images (png, jpg, bmp, tif)",
        ));
    }
    v.sort();
    Ok(v)
}

/// Refuse to mix with an earlier run: files this run would not overwrite would be taken for
/// part of this data set.
fn check_no_leftovers(dir: &Path, ours: &HashSet<String>) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let mut extra = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && !ours.contains(&name) {
            extra.push(name);
        }
    }
    extra.sort();
    match extra.first() {
        None => Ok(()),
        Some(first) => Err(Error::bad_input(
            dir,
            format!(
                "holds {} file(s) this run would not overwrite (first: {first}), left from \
                 another run?; use an empty output folder",
                extra.len()
            ),
        )),
    }
}

/// Write `count` synthetic anomalous images made from `category_dir/train/good` (PNG, JPEG,
/// BMP, TIFF; sorted by name, used round robin: image `i` is made from normal `i mod n` with
/// seed [`crate::image_seed`]`(seed, i)`) into the MVTec layout under `out`:
/// `out/test/synthetic/NNN.png` and `out/ground_truth/synthetic/NNN_mask.png`, plus
/// `out/synthesis.json` (configuration, seeds, sources, β per image). Files are written
/// atomically, in parallel; the bytes do not depend on the number of threads.
///
/// `progress` is called after each image with the number finished so far. Errors name the file
/// (an unreadable or too small normal image, an unreadable texture, a write failure).
pub fn write_dataset(
    category_dir: &Path,
    out: &Path,
    count: usize,
    seed: u64,
    synth: &Synthesizer,
    progress: impl Fn(usize) + Sync,
) -> Result<SynthSummary> {
    let start = Instant::now();
    let normals = list_normals(&category_dir.join("train").join("good"))?;
    let images_dir = out.join("test").join(DEFECT_TYPE);
    let masks_dir = out.join("ground_truth").join(DEFECT_TYPE);
    // Zero-padded to at least 3 digits, wide enough that names sort in index order.
    let width = count.saturating_sub(1).to_string().len().max(3);
    let name = |i: usize| format!("{i:0width$}");
    check_no_leftovers(
        &images_dir,
        &(0..count).map(|i| format!("{}.png", name(i))).collect(),
    )?;
    check_no_leftovers(
        &masks_dir,
        &(0..count)
            .map(|i| format!("{}_mask.png", name(i)))
            .collect(),
    )?;

    let done = AtomicUsize::new(0);
    let records = (0..count)
        .into_par_iter()
        .map(|i| -> Result<Record> {
            let normal = &normals[i % normals.len()];
            let img = decode_rgb(normal)?;
            let s = image_seed(seed, i as u64);
            let syn = synth.synthesize(&img, s).map_err(|e| match e {
                Error::Config(m) => Error::bad_input(normal, m),
                e => e,
            })?;
            let n = name(i);
            let ip = images_dir.join(format!("{n}.png"));
            let mp = masks_dir.join(format!("{n}_mask.png"));
            let dims = syn.image.dimensions();
            let ib = png_bytes(
                &ip,
                syn.image.as_raw(),
                dims,
                image::ExtendedColorType::Rgb8,
            )?;
            tessera_core::io::write_atomic(&ip, &ib)?;
            let mb = png_bytes(&mp, syn.mask.as_raw(), dims, image::ExtendedColorType::L8)?;
            tessera_core::io::write_atomic(&mp, &mb)?;
            progress(done.fetch_add(1, Ordering::Relaxed) + 1);
            Ok(Record {
                image: format!("test/{DEFECT_TYPE}/{n}.png"),
                mask: format!("ground_truth/{DEFECT_TYPE}/{n}_mask.png"),
                normal: normal.clone(),
                seed: s,
                source: syn.source,
                beta: syn.beta,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let textures = records
        .iter()
        .filter(|r| matches!(r.source, SourceKind::Texture(_)))
        .count();
    let manifest = Manifest {
        tessera_version: tessera_core::VERSION,
        category: category_dir,
        seed,
        count,
        textures: synth.texture_dir(),
        config: synth.config(),
        images: &records,
    };
    let mpath = out.join(MANIFEST_FILE);
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::bad_input(&mpath, format!("cannot encode JSON: {e}")))?;
    tessera_core::io::write_atomic(&mpath, &json)?;

    let seconds = start.elapsed().as_secs_f64();
    Ok(SynthSummary {
        count,
        normals: normals.len(),
        texture_sources: textures,
        structure_sources: count - textures,
        seconds,
        images_per_second: if seconds > 0.0 {
            count as f64 / seconds
        } else {
            0.0
        },
        images_dir,
        masks_dir,
    })
}
