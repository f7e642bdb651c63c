//! The SBM training loop: jigsaw cross-entropy + feature anchoring, checkpoints, the gate.

use crate::checkpoint;
use crate::nets::{to_batch, Nets};
use crate::optim::Optimizers;
use crate::{
    permute_tiles, Anchor, EpochStats, Gate, JigsawHead, PermutationSet, SbmConfig, SbmEvent,
    SbmOutcome, SbmReport,
};
use candle_core::{Tensor, D};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use std::path::Path;
use std::time::Instant;
use tessera_backbone::Backbone;
use tessera_core::model::Preprocess;
use tessera_core::{Error, Result};
use tessera_synth::Synthesizer;

/// Mix seed parts into one RNG seed (SplitMix64 steps), so streams never overlap.
pub(crate) fn mix(parts: &[u64]) -> u64 {
    let mut h = 0x9E37_79B9_7F4A_7C15u64;
    for &p in parts {
        h ^= p.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_add(h << 6);
        h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h ^= h >> 31;
    }
    h
}

/// Inputs to the trainer.
pub struct SbmData<'a> {
    /// Normal training images, already resized/cropped to the network input (`display` images
    /// of `tessera_data::load_image`).
    pub images: Vec<RgbImage>,
    pub preprocess: Preprocess,
    /// Synthetic defects; `None` trains on normal images only.
    pub synth: Option<&'a Synthesizer>,
    /// Where the starting weights came from (for the report).
    pub source: String,
}

impl SbmData<'_> {
    /// The (width, height) every image shares (`who` prefixes the error when they differ).
    /// The caller has checked there is at least one image.
    pub(crate) fn common_size(&self, who: &str) -> Result<(usize, usize)> {
        let (w, h) = self.images[0].dimensions();
        if self.images.iter().any(|i| i.dimensions() != (w, h)) {
            return Err(Error::Config(format!(
                "{who}: training images must share one size"
            )));
        }
        Ok((w as usize, h as usize))
    }
}

/// Train the jigsaw task on `data` starting from `backbone` (which must have layers 1..3).
/// `checkpoint`: written after every epoch and resumed from when it exists with the same
/// settings (more epochs may be asked for on resume). Deterministic from `config.seed`.
pub fn train(
    config: &SbmConfig,
    backbone: &Backbone,
    data: &SbmData,
    checkpoint: Option<&Path>,
    progress: &dyn Fn(&SbmEvent),
) -> Result<SbmOutcome> {
    config.validate()?;
    if backbone.depth() < 3 {
        return Err(Error::Config(
            "sbm: the backbone must keep layers 1..3 (the head reads layer3)".into(),
        ));
    }
    let n_img = data.images.len();
    let n_hold = ((n_img as f64 * config.holdout).round() as usize).max(2);
    if n_img < n_hold + 4 {
        return Err(Error::Config(format!(
            "sbm: {n_img} normal images are too few (need ≥ {} to train and hold out {n_hold})",
            n_hold + 4
        )));
    }
    let (w, h) = data.common_size("sbm")?;
    let dev = backbone.device().clone();
    let perms = PermutationSet::maximal_hamming(config.grid, config.permutations, config.seed)?;
    let classes = perms.classes();

    // Seeded split: held-out images are never trained on.
    let mut order: Vec<usize> = (0..n_img).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(mix(&[
        config.seed,
        1,
    ])));
    let (hold_idx, train_idx) = order.split_at(n_hold);
    let (hold_idx, train_idx) = (hold_idx.to_vec(), train_idx.to_vec());

    let nets = Nets::build(config, backbone, classes)?;
    let first = nets.first;
    let mut opts = Optimizers::new(config, &nets)?;
    let mut history = checkpoint::resume(checkpoint, config, &nets, &mut opts, n_img, progress)?;
    // Fixed held-out inputs: each held-out image under `eval_perms` distinct shuffles.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(mix(&[config.seed, 3]));
    let mut eval_set: Vec<(usize, usize)> = Vec::new();
    for i in 0..hold_idx.len() {
        let mut cls: Vec<usize> = (1..classes).collect();
        cls.shuffle(&mut rng);
        eval_set.extend(cls[..config.eval_perms].iter().map(|&c| (i, c)));
    }
    let hold_norm: Vec<Vec<f32>> = hold_idx
        .par_iter()
        .map(|&i| tessera_data::normalize(&data.images[i], &data.preprocess))
        .collect();

    let batches = train_idx.len().div_ceil(config.batch_size);
    let start_epoch = history.len();
    let mut stopped_early = false;
    for epoch in start_epoch..config.epochs {
        let t0 = Instant::now();
        let mut ep_order = train_idx.clone();
        ep_order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(mix(&[
            config.seed,
            4,
            epoch as u64,
        ])));
        let (mut s_loss, mut s_ce, mut s_anchor, mut correct, mut seen) = (0.0, 0.0, 0.0, 0, 0);
        for (bi, chunk) in ep_order.chunks(config.batch_size).enumerate() {
            let made = jigsaw_inputs(config, data, &perms, chunk, (epoch, bi), (h, w))?;
            let (inputs, labels): (Vec<_>, Vec<_>) = made.into_iter().unzip();
            let b = labels.len();
            let x = to_batch(inputs, 3, h, w, &dev)?;
            let y = Tensor::new(labels.as_slice(), &dev)?;
            let with_ref =
                config.anchor == Anchor::Features && config.anchor_weight > 0.0 && first <= 3;
            let (feats, refs, logits) = nets.forward(&x, with_ref)?;
            let ce = candle_nn::loss::cross_entropy(&logits, &y)?;
            let anchor = nets.anchor_term(config, &feats, &refs, with_ref)?;
            let loss = match &anchor {
                Some(a) => (&ce + (a * config.anchor_weight)?)?,
                None => ce.clone(),
            };
            let lv = loss.to_scalar::<f32>()? as f64;
            if !lv.is_finite() {
                return Err(Error::Config(format!(
                    "sbm: training diverged at epoch {} (loss {lv}); lower the learning rates",
                    epoch + 1
                )));
            }
            opts.step(&loss.backward()?)?;
            let pred: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
            correct += pred.iter().zip(&labels).filter(|(a, b)| a == b).count();
            seen += b;
            s_loss += lv * b as f64;
            s_ce += ce.to_scalar::<f32>()? as f64 * b as f64;
            if let Some(a) = &anchor {
                s_anchor += a.to_scalar::<f32>()? as f64 * b as f64;
            }
            progress(&SbmEvent::Step {
                epoch: epoch + 1,
                epochs: config.epochs,
                batch: bi + 1,
                batches,
                loss: s_loss / seen as f64,
                accuracy: correct as f64 / seen as f64,
            });
        }
        progress(&SbmEvent::Evaluating { epoch: epoch + 1 });
        let (acc, drift) = evaluate(
            &nets,
            &perms,
            &eval_set,
            &hold_norm,
            (h, w),
            config.batch_size,
        )?;
        let stats = EpochStats {
            epoch: epoch + 1,
            loss: s_loss / seen as f64,
            cross_entropy: s_ce / seen as f64,
            anchor: s_anchor / seen as f64,
            train_accuracy: correct as f64 / seen as f64,
            heldout_accuracy: acc,
            drift,
            seconds: t0.elapsed().as_secs_f64(),
        };
        history.push(stats.clone());
        progress(&SbmEvent::Epoch(stats));
        if let Some(ck) = checkpoint {
            checkpoint::save(ck, config, &nets, &opts, &history, n_img)?;
        }
        if config.early_stop
            && epoch + 1 < config.epochs
            && not_learning(&history, classes, eval_set.len())
        {
            stopped_early = true;
            break;
        }
    }

    let last = history
        .last()
        .cloned()
        .ok_or_else(|| Error::Config("sbm: no epoch ran".into()))?;
    let gate = Gate::judge(
        config,
        last.heldout_accuracy,
        classes,
        hold_idx.len(),
        eval_set.len(),
    );
    let ran: Vec<f64> = history[start_epoch..].iter().map(|e| e.seconds).collect();
    let seconds_per_epoch = if ran.is_empty() {
        history.iter().map(|e| e.seconds).sum::<f64>() / history.len() as f64
    } else {
        ran.iter().sum::<f64>() / ran.len() as f64
    };
    let report = SbmReport {
        config: config.clone(),
        arch: backbone.arch_name().to_string(),
        source: data.source.clone(),
        train_images: train_idx.len(),
        heldout_images: hold_idx.len(),
        min_hamming: perms.min_distance(),
        drift: last.drift.clone(),
        history,
        gate,
        seconds_per_epoch,
        synthesis: data.synth.is_some(),
        stopped_early,
    };
    let Nets {
        mut net,
        head,
        pfam,
        ..
    } = nets;
    net.freeze()?;
    Ok(SbmOutcome {
        backbone: net,
        pfam: pfam.map(|p| p.detached()),
        head,
        perms,
        report,
    })
}

/// Whether the last two epochs' held-out accuracy stayed at chance level (within 2 σ of it,
/// for `inputs` held-out inputs and `classes` classes).
fn not_learning(history: &[EpochStats], classes: usize, inputs: usize) -> bool {
    let chance = 1.0 / classes as f64;
    let sigma = (chance * (1.0 - chance) / inputs.max(1) as f64).sqrt();
    history.len() >= 2
        && history[history.len() - 2..]
            .iter()
            .all(|e| e.heldout_accuracy <= chance + 2.0 * sigma)
}

/// The training inputs of one batch (`chunk`: image indices; `at`: epoch and batch number),
/// each a seeded draw: a synthetic defect with probability `synth_prob`, then a class
/// (identity with `identity_prob`, else uniform) and its tile permutation. CHW values and the
/// class, in `chunk` order.
fn jigsaw_inputs(
    config: &SbmConfig,
    data: &SbmData,
    perms: &PermutationSet,
    chunk: &[usize],
    (epoch, bi): (usize, usize),
    (h, w): (usize, usize),
) -> Result<Vec<(Vec<f32>, u32)>> {
    let classes = perms.classes();
    let sample_class = |rng: &mut rand_chacha::ChaCha8Rng| -> usize {
        match config.identity_prob {
            None => rng.random_range(0..classes),
            Some(p) if rng.random::<f64>() < p => 0,
            Some(_) => rng.random_range(1..classes),
        }
    };
    chunk
        .par_iter()
        .enumerate()
        .map(|(k, &i)| {
            let pos = (bi * config.batch_size + k) as u64;
            let mut r =
                rand_chacha::ChaCha8Rng::seed_from_u64(mix(&[config.seed, 5, epoch as u64, pos]));
            let synth = match data.synth {
                Some(s) if r.random::<f64>() < config.synth_prob => {
                    Some(s.synthesize(&data.images[i], r.random())?.image)
                }
                _ => None,
            };
            let img = synth.as_ref().unwrap_or(&data.images[i]);
            let c = sample_class(&mut r);
            let chw = tessera_data::normalize(img, &data.preprocess);
            Ok((permute_tiles(&chw, 3, h, w, perms.perm(c)), c as u32))
        })
        .collect()
}

/// Held-out accuracy on shuffled images and per-layer drift on the unshuffled ones, with frozen
/// copies (no autograd graph). `eval_set` holds (held-out position, class) pairs.
fn evaluate(
    nets: &Nets,
    perms: &PermutationSet,
    eval_set: &[(usize, usize)],
    norm: &[Vec<f32>],
    (h, w): (usize, usize),
    batch: usize,
) -> Result<(f64, Vec<f64>)> {
    let mut net = nets.net.clone();
    net.freeze()?;
    let (hw, hb) = nets.head.tensors();
    let head = JigsawHead::from_tensors(perms.grid(), &hw.detach(), &hb.detach())?;
    let pfam = nets.pfam.as_ref().map(|p| p.detached());
    let dev = net.device().clone();
    let mut correct = 0usize;
    for chunk in eval_set.chunks(batch) {
        let inputs: Vec<Vec<f32>> = chunk
            .par_iter()
            .map(|&(i, c)| permute_tiles(&norm[i], 3, h, w, perms.perm(c)))
            .collect();
        let x = to_batch(inputs, 3, h, w, &dev)?;
        let f = net.forward(&x)?;
        let logits = match &pfam {
            Some(p) => head.forward_levels(&p.forward(&f)?.levels)?,
            None => head.forward(&f.levels[2])?,
        };
        let pred: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        correct += pred
            .iter()
            .zip(chunk)
            .filter(|(p, (_, c))| **p as usize == *c)
            .count();
    }
    let mut num = [0f64; 3];
    let mut den = [0f64; 3];
    for chunk in norm.chunks(batch) {
        let x = to_batch(chunk.to_vec(), 3, h, w, &dev)?;
        let f = net.forward(&x)?;
        let r = nets.reference.forward(&x)?;
        for l in 0..3 {
            num[l] += (&f.levels[l] - &r.levels[l])?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()? as f64;
            den[l] += r.levels[l].sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let drift = (0..3)
        .map(|l| (num[l] / den[l].max(1e-30)).sqrt())
        .collect();
    Ok((correct as f64 / eval_set.len().max(1) as f64, drift))
}
