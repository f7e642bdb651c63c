//! Decoded, preprocessed batches, read one batch ahead of the compute.

use candle_core::Device;
use std::sync::mpsc;
use tessera_core::model::Preprocess;
use tessera_core::Result;
use tessera_data::{load_batch, Batch, Sample};

/// The samples as batches of at most `batch_size`, in order (each batch decoded in parallel).
///
/// A reader thread decodes the next batch while the caller computes on the current one, so
/// wall time per batch approaches the slower of decoding and compute instead of their sum. At
/// most one decoded batch waits (bounded memory). Dropping the iterator stops the reader at
/// its next batch; an error is yielded in its place and reading goes on, as before.
pub fn batches(
    samples: &[Sample],
    pre: &Preprocess,
    batch_size: usize,
    device: &Device,
) -> impl Iterator<Item = Result<Batch>> + 'static {
    let chunks: Vec<Vec<Sample>> = samples
        .chunks(batch_size.max(1))
        .map(<[Sample]>::to_vec)
        .collect();
    let pre = pre.clone();
    let (tx, rx) = mpsc::sync_channel::<Result<Batch>>(1);
    // The reader makes CPU tensors; the move to an accelerator happens on the caller's thread,
    // where its context is current.
    let reader = std::thread::Builder::new()
        .name("tessera-reader".into())
        .spawn(move || {
            for chunk in chunks {
                if tx.send(load_batch(&chunk, &pre, &Device::Cpu)).is_err() {
                    return; // the consumer is gone
                }
            }
        });
    // No thread, no batches: say so once instead of yielding nothing.
    let failed = reader
        .err()
        .map(|e| tessera_core::Error::Config(format!("cannot start the image reader thread: {e}")));
    Prefetch {
        rx,
        failed,
        device: device.clone(),
    }
}

struct Prefetch {
    rx: mpsc::Receiver<Result<Batch>>,
    failed: Option<tessera_core::Error>,
    device: Device,
}

impl Iterator for Prefetch {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        match self.failed.take() {
            Some(e) => Some(Err(e)),
            None => {
                let b = self.rx.recv().ok()?;
                Some(b.and_then(|mut b| {
                    if !self.device.is_cpu() {
                        b.tensor = b.tensor.to_device(&self.device)?;
                    }
                    Ok(b)
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Batches come in order with their images; a broken file fails its own batch only, in
    /// its place; dropping the iterator early does not hang.
    #[test]
    fn read_ahead_keeps_order_and_errors_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let samples: Vec<Sample> = (0..5)
            .map(|i| {
                let p = dir.path().join(format!("{i}.png"));
                if i == 2 {
                    std::fs::write(&p, b"not a png").unwrap();
                } else {
                    image::RgbImage::from_pixel(16, 16, image::Rgb([i as u8 * 40, 0, 0]))
                        .save(&p)
                        .unwrap();
                }
                Sample {
                    path: p,
                    defect_type: "good".into(),
                    mask: None,
                    name: format!("good/{i}.png"),
                }
            })
            .collect();
        let pre = Preprocess::square(16, 16);
        let out: Vec<Result<Batch>> = batches(&samples, &pre, 2, &Device::Cpu).collect();
        assert_eq!(out.len(), 3);
        let red =
            |b: &Batch| -> Vec<u8> { b.images.iter().map(|i| i.get_pixel(0, 0)[0]).collect() };
        assert_eq!(red(out[0].as_ref().unwrap()), vec![0, 40]);
        let e = out[1].as_ref().unwrap_err().to_string();
        assert!(e.contains("2.png"), "{e}");
        assert_eq!(red(out[2].as_ref().unwrap()), vec![160]);
        let mut it = batches(&samples, &pre, 1, &Device::Cpu);
        assert!(it.next().unwrap().is_ok());
        drop(it);
        assert_eq!(batches(&[], &pre, 4, &Device::Cpu).count(), 0);
    }
}
