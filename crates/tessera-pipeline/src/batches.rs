//! Decoded, preprocessed batches.

use candle_core::Device;
use tessera_core::model::Preprocess;
use tessera_core::Result;
use tessera_data::{load_batch, Batch, Sample};

/// The samples as batches of at most `batch_size`, decoded in order (each batch in parallel).
pub fn batches<'a>(
    samples: &'a [Sample],
    pre: &'a Preprocess,
    batch_size: usize,
    device: &'a Device,
) -> impl Iterator<Item = Result<Batch>> + 'a {
    samples
        .chunks(batch_size.max(1))
        .map(move |chunk| load_batch(chunk, pre, device))
}
