//! Dynamic batching: requests for one model wait in a bounded queue; one worker thread takes
//! the first, gathers more for up to `max_wait` (or until `max_batch`), preprocesses them in
//! parallel and scores them as one backbone batch through [`Detector::score`] — the same path
//! as `tessera test` and `predict`.

use crate::api::{ApiError, Outcome, Region};
use crate::metrics::Metrics;
use crate::state::ModelSlot;
use base64::Engine as _;
use candle_core::Tensor;
use rayon::prelude::*;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_core::AnomalyMap;
use tessera_pipeline::Detector;
use tokio::sync::oneshot;

/// What a request asks for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Want {
    pub threshold: Option<f32>,
    pub heatmap: bool,
    pub regions: bool,
}

/// One queued request: the undecoded image (decoding runs in the batch, on the scoring
/// threads, so that decoding and scoring never compete for more cores than the machine has).
pub struct Job {
    pub bytes: axum::body::Bytes,
    pub want: Want,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<Outcome, ApiError>>,
}

/// Batching settings.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    pub max_batch: usize,
    pub max_wait: Duration,
    pub queue: usize,
}

/// The sending side of a model's queue.
#[derive(Clone)]
pub struct Queue {
    tx: SyncSender<Job>,
}

impl Queue {
    /// Queue a job, or give it back when the queue is full (the caller answers 503).
    pub fn offer(&self, job: Job) -> Result<(), Job> {
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(j)) | Err(TrySendError::Disconnected(j)) => Err(j),
        }
    }
}

/// A bounded queue and its receiver.
pub fn queue(cfg: BatchConfig) -> (Queue, Receiver<Job>) {
    let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue.max(1));
    (Queue { tx }, rx)
}

/// Start the worker thread of `slot`; it ends when every sender is gone and the queue drained.
pub fn spawn_worker(
    slot: Arc<ModelSlot>,
    rx: Receiver<Job>,
    cfg: BatchConfig,
    metrics: Arc<Metrics>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(format!("tessera-batch-{}", slot.name))
        .spawn(move || worker(&slot, rx, cfg, &metrics))
        .expect("spawn a batching thread")
}

fn worker(slot: &ModelSlot, rx: Receiver<Job>, cfg: BatchConfig, metrics: &Metrics) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let deadline = Instant::now() + cfg.max_wait;
        while jobs.len() < cfg.max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(j) => jobs.push(j),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        slot.queued
            .fetch_sub(jobs.len(), std::sync::atomic::Ordering::Relaxed);
        metrics.set_queue_depth(&slot.name, slot.queued());
        // Requests whose client gave up (timeout, disconnect) are not scored.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        let det = slot.current();
        let started = Instant::now();
        // Decode and preprocess every image of the batch in parallel; a bad image is answered
        // on its own, the others are scored.
        let pre = &det.detector.meta.preprocess;
        let decoded: Vec<Result<(tessera_data::LoadedImage, f64), ApiError>> = jobs
            .par_iter()
            .map(|j| {
                let t = Instant::now();
                let img = tessera_data::decode_bytes(&j.bytes, "request body")
                    .map_err(|e| ApiError::bad_image(e.to_string()))?;
                let l = tessera_data::preprocess_image(&img, pre, "request body")
                    .map_err(|e| ApiError::bad_image(e.to_string()))?;
                Ok((l, t.elapsed().as_secs_f64() * 1e3))
            })
            .collect();
        let mut good = Vec::new();
        for (job, d) in jobs.into_iter().zip(decoded) {
            match d {
                Ok((l, ms)) => good.push((job, l, ms)),
                Err(e) => {
                    let _ = job.reply.send(Err(e));
                }
            }
        }
        if good.is_empty() {
            continue;
        }
        metrics.observe_batch(good.len());
        let (jobs, loaded): (Vec<(Job, f64)>, Vec<tessera_data::LoadedImage>) =
            good.into_iter().map(|(j, l, ms)| ((j, ms), l)).unzip();
        match score_batch(&det.detector, &jobs, &loaded) {
            Ok(outs) => {
                let batch_ms = started.elapsed().as_secs_f64() * 1e3;
                let n = jobs.len();
                metrics.add_images(&slot.name, n as u64);
                for ((job, decode_ms), mut out) in jobs.into_iter().zip(outs) {
                    out.model = slot.name.clone();
                    out.checksum = det.checksum.clone();
                    out.timings.decode_ms = decode_ms;
                    out.timings.queue_ms = (started - job.enqueued).as_secs_f64() * 1e3;
                    out.timings.batch_ms = batch_ms;
                    out.timings.batch_size = n;
                    out.timings.total_ms = job.enqueued.elapsed().as_secs_f64() * 1e3;
                    let _ = job.reply.send(Ok(out));
                }
            }
            Err(e) => {
                for (job, _) in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Score preprocessed images as one batch.
fn score_batch(
    det: &Detector,
    jobs: &[(Job, f64)],
    loaded: &[tessera_data::LoadedImage],
) -> Result<Vec<Outcome>, ApiError> {
    let (w, h) = loaded[0].display.dimensions();
    let mut data = Vec::with_capacity(loaded.len() * 3 * (w * h) as usize);
    for l in loaded {
        data.extend_from_slice(&l.chw);
    }
    let device = det.backbone.device().clone();
    let x = Tensor::from_vec(data, (loaded.len(), 3, h as usize, w as usize), &device)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let (maps, _) = det
        .score(&x)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    maps.into_par_iter()
        .zip(loaded.par_iter())
        .zip(jobs.par_iter())
        .map(|((map, img), (job, _))| outcome(det, &map, &img.display, job.want, img.original_size))
        .collect()
}

/// The answer for one image.
fn outcome(
    det: &Detector,
    map: &AnomalyMap,
    display: &image::RgbImage,
    want: Want,
    original: (u32, u32),
) -> Result<Outcome, ApiError> {
    let v = det.verdict(map.image_score(), want.threshold);
    let pixel_thr = det.pixel_threshold_at(want.threshold);
    let heatmap = if want.heatmap {
        let panel = tessera_eval::render_panel(display, map, None, pixel_thr, det.meta.heat_range)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let mut buf = std::io::Cursor::new(Vec::new());
        panel
            .write_to(&mut buf, image::ImageFormat::Png)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Some(base64::engine::general_purpose::STANDARD.encode(buf.into_inner()))
    } else {
        None
    };
    let regions = want.regions.then(|| regions(map, pixel_thr));
    Ok(Outcome {
        model: String::new(),
        checksum: String::new(),
        score: v.score,
        normalized: v.normalized,
        p_value: v.p_value,
        anomalous: v.anomalous,
        threshold: v.threshold,
        pixel_threshold: pixel_thr,
        input_size: (map.width as u32, map.height as u32),
        original_size: original,
        heatmap_png_base64: heatmap,
        regions,
        timings: Default::default(),
    })
}

/// Connected regions of the predicted mask (`map > threshold`, 8-connected), largest first, in
/// the network-input pixel grid (`input_size` of the answer).
fn regions(map: &AnomalyMap, thr: f32) -> Vec<Region> {
    let (w, h) = (map.width, map.height);
    let mask: Vec<bool> = map.data.iter().map(|&v| v > thr).collect();
    let comps = tessera_eval::connected_components(&mask, w, h);
    let n = comps.count();
    let (mut x0, mut y0) = (vec![u32::MAX; n], vec![u32::MAX; n]);
    let (mut x1, mut y1) = (vec![0u32; n], vec![0u32; n]);
    let mut peak = vec![f32::NEG_INFINITY; n];
    for (i, &lab) in comps.labels.iter().enumerate() {
        if lab == 0 {
            continue;
        }
        let c = lab as usize - 1;
        let (x, y) = ((i % w) as u32, (i / w) as u32);
        x0[c] = x0[c].min(x);
        y0[c] = y0[c].min(y);
        x1[c] = x1[c].max(x);
        y1[c] = y1[c].max(y);
        peak[c] = peak[c].max(map.data[i]);
    }
    let mut out: Vec<Region> = (0..n)
        .map(|c| Region {
            x: x0[c],
            y: y0[c],
            width: x1[c] + 1 - x0[c],
            height: y1[c] + 1 - y0[c],
            area: comps.sizes[c],
            max_score: peak[c],
        })
        .collect();
    out.sort_by(|a, b| b.area.cmp(&a.area).then(a.y.cmp(&b.y)).then(a.x.cmp(&b.x)));
    out
}
