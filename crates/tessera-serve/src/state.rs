//! The models being served: each a slot holding the current detector (swapped atomically on
//! reload), its queue, and what `GET /v1/models` says about it.

use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use tessera_core::Result;
use tessera_pipeline::Detector;

/// A loaded model file.
pub struct Loaded {
    pub detector: Detector,
    /// SHA-256 of the model's tensors (stored in the file, verified at load).
    pub checksum: String,
    pub loaded_unix: u64,
}

impl Loaded {
    /// Load and check a model file, and run it once on a blank image (warm-up: weights packed,
    /// buffers allocated, before the first request); the backbone's products at `precision`.
    pub fn load(
        path: &Path,
        device: &candle_core::Device,
        precision: tessera_pipeline::Precision,
    ) -> Result<Self> {
        let (mut detector, checksum) = Detector::load_with_checksum(path, device)?;
        // Where bf16 is not supported the backbone stays f32 (`tessera serve` says so at start).
        detector.set_precision(precision, &tessera_pipeline::Silent);
        let checksum = checksum.unwrap_or_else(|| "none (format 1)".into());
        warm_up(&detector)?;
        Ok(Self {
            detector,
            checksum,
            loaded_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        })
    }
}

fn warm_up(det: &Detector) -> Result<()> {
    let (w, h) = det.meta.preprocess.input_size().unwrap_or((224, 224));
    let img = image::DynamicImage::new_rgb8(w, h);
    let l = tessera_data::preprocess_image(&img, &det.meta.preprocess, "warm-up image")?;
    let x = candle_core::Tensor::from_vec(
        l.chw,
        (1, 3, h as usize, w as usize),
        det.backbone.device(),
    )?;
    det.score(&x)?;
    Ok(())
}

/// One served model.
pub struct ModelSlot {
    pub name: String,
    pub path: PathBuf,
    current: RwLock<Arc<Loaded>>,
    /// Jobs waiting in the queue.
    pub queued: AtomicUsize,
    /// One reload at a time.
    pub reloading: tokio::sync::Mutex<()>,
}

impl ModelSlot {
    pub fn new(name: String, path: PathBuf, loaded: Loaded) -> Self {
        Self {
            name,
            path,
            current: RwLock::new(Arc::new(loaded)),
            queued: AtomicUsize::new(0),
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// The detector in use now.
    pub fn current(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Swap in a new detector; requests already batched finish on the old one.
    pub fn replace(&self, new: Loaded) -> Arc<Loaded> {
        let mut g = self.current.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *g, Arc::new(new))
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// What `GET /v1/models` lists.
    pub fn info(&self) -> ModelInfo {
        let l = self.current();
        let m = &l.detector.meta;
        let cal = m.calibration.as_ref();
        ModelInfo {
            name: self.name.clone(),
            path: self.path.clone(),
            scorer: m.scorer.kind().name().into(),
            backbone: m.backbone.arch.name().into(),
            method: m.method.name().into(),
            threshold: l.detector.image_threshold(),
            pixel_threshold: l.detector.pixel_threshold(),
            input_size: m.preprocess.input_size(),
            tile: m.preprocess.tiling.map(|t| t.tile),
            checksum: l.checksum.clone(),
            loaded_unix: l.loaded_unix,
            calibration_images: cal.map(|c| c.images),
            target_fpr: cal.map(|c| c.conformal.target_fpr),
            guaranteed_fpr: cal
                .filter(|c| c.source == "holdout" && c.synthetic.is_none())
                .map(|c| c.conformal.guaranteed_fpr),
            queued: self.queued(),
        }
    }
}

/// A served model, as `GET /v1/models` describes it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub path: PathBuf,
    pub scorer: String,
    pub backbone: String,
    pub method: String,
    pub threshold: f32,
    pub pixel_threshold: f32,
    /// Network input (width, height) of one image.
    pub input_size: Option<(u32, u32)>,
    pub tile: Option<u32>,
    pub checksum: String,
    pub loaded_unix: u64,
    pub calibration_images: Option<usize>,
    pub target_fpr: Option<f64>,
    pub guaranteed_fpr: Option<f64>,
    pub queued: usize,
}
