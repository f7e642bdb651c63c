//! The SBM training loop: jigsaw cross-entropy + feature anchoring, checkpoints, the gate.

use crate::{permute_tiles, JigsawHead, PermutationSet};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::Optimizer;
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use tessera_backbone::Backbone;
use tessera_core::model::Preprocess;
use tessera_core::{Error, Result};
use tessera_optim::{AdamW, AdamWConfig, Sgd, SgdConfig};
use tessera_pfam::{Pfam, PfamConfig};
use tessera_synth::Synthesizer;

/// Metadata key of the SBM report in a tuned backbone file.
pub const REPORT_KEY: &str = "tessera_sbm";
const CHECKPOINT_KEY: &str = "tessera_sbm_checkpoint";

/// How the fine-tuned network is kept close to the pretrained one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Anchor {
    /// No anchoring (the plain jigsaw fine-tune; forgets ImageNet quickly).
    None,
    /// `λ · Σ_l ‖f_l(x) − f⁰_l(x)‖² / ‖f⁰_l(x)‖²` over the trained layers' outputs, against the
    /// frozen pretrained copy, on the training inputs themselves.
    Features,
    /// L2-SP (Li et al., 2018): `λ/2 · Σ ‖w − w⁰‖²` over the trained tensors.
    L2Sp,
}

/// The optimiser for backbone and head (each with its own learning rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD, momentum, Nesterov, coupled weight decay (as `torch.optim.SGD`).
    Sgd,
    /// AdamW (decoupled weight decay).
    Adamw,
}

/// Every SBM setting. [`SbmConfig::default`] is the setting chosen by the ablation in
/// `docs/sbm.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SbmConfig {
    /// Tiles per side (n of the n×n jigsaw).
    pub grid: usize,
    /// Number of non-identity permutations P (classes = P + 1).
    pub permutations: usize,
    /// Probability of showing the identity; `None` = uniform over the P + 1 classes.
    pub identity_prob: Option<f64>,
    /// Probability that a training input carries a synthetic defect.
    pub synth_prob: f64,
    /// Which backbone layers train (1-based); the stem never does.
    pub train_layers: Vec<usize>,
    pub anchor: Anchor,
    /// λ of the anchoring term.
    pub anchor_weight: f64,
    pub optimizer: OptimizerKind,
    pub lr_backbone: f64,
    pub lr_head: f64,
    /// SGD momentum (Nesterov); ignored by AdamW.
    pub momentum: f64,
    pub weight_decay: f64,
    pub epochs: usize,
    pub batch_size: usize,
    /// Fraction of the normal images held out for the gate (never trained on).
    pub holdout: f64,
    /// Shuffled versions per held-out image in the gate.
    pub eval_perms: usize,
    /// The gate passes when held-out accuracy on shuffled images ≥ this × chance (and is
    /// significant at 5 σ).
    pub gate_factor: f64,
    pub seed: u64,
    /// Also train PFAM in this stage (the paper's "+ our method"): the head then reads PFAM's
    /// three outputs, each pooled to the grid. `None`: plain SBM.
    #[serde(default)]
    pub pfam: Option<PfamConfig>,
    /// PFAM's learning rate.
    #[serde(default = "default_lr_pfam")]
    pub lr_pfam: f64,
}

fn default_lr_pfam() -> f64 {
    1e-3
}

impl Default for SbmConfig {
    fn default() -> Self {
        Self {
            grid: 3,
            permutations: 30,
            identity_prob: None,
            synth_prob: 0.5,
            // The ablation (docs/sbm.md): layer3 only with λ = 100 learns the jigsaw (100 %
            // held-out) and leaves PaDiM and PatchCore exactly at the baseline on bottle.
            train_layers: vec![3],
            anchor: Anchor::Features,
            anchor_weight: 100.0,
            optimizer: OptimizerKind::Sgd,
            lr_backbone: 1e-4,
            lr_head: 1e-2,
            momentum: 0.9,
            weight_decay: 5e-4,
            epochs: 6,
            batch_size: 8,
            holdout: 0.1,
            eval_perms: 4,
            gate_factor: 4.0,
            seed: 0,
            pfam: None,
            lr_pfam: default_lr_pfam(),
        }
    }
}

impl SbmConfig {
    /// Check the values make sense.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("sbm: {m}")));
        if self.epochs == 0 || self.batch_size == 0 {
            return bad("epochs and batch size must be ≥ 1".into());
        }
        if self.train_layers.iter().any(|l| !(1..=3).contains(l)) {
            return bad(format!(
                "train layers must be a subset of 1,2,3, got {:?}",
                self.train_layers
            ));
        }
        if self.train_layers.is_empty() && self.pfam.is_none() {
            return bad("nothing to train: no backbone layers and no PFAM".into());
        }
        if self.pfam.is_some() && self.lr_pfam <= 0.0 {
            return bad("the PFAM learning rate must be > 0".into());
        }
        if !(0.0..=1.0).contains(&self.synth_prob)
            || self
                .identity_prob
                .is_some_and(|p| !(0.0..=1.0).contains(&p))
        {
            return bad("probabilities must lie in [0, 1]".into());
        }
        if !(self.holdout > 0.0 && self.holdout < 1.0) {
            return bad(format!("holdout must lie in (0, 1), got {}", self.holdout));
        }
        if self.lr_backbone < 0.0 || self.lr_head <= 0.0 || self.anchor_weight < 0.0 {
            return bad("learning rates and the anchor weight must be ≥ 0".into());
        }
        if self.eval_perms == 0 || self.eval_perms > self.permutations {
            return bad(format!(
                "eval perms must be 1..={} (the permutations), got {}",
                self.permutations, self.eval_perms
            ));
        }
        Ok(())
    }

    /// The settings that must match for a checkpoint to be resumed (all but `epochs`).
    fn resume_key(&self) -> String {
        let mut c = self.clone();
        c.epochs = 0;
        serde_json::to_string(&c).unwrap_or_default()
    }
}

/// One epoch's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    pub epoch: usize,
    /// Mean total loss, cross-entropy and anchoring term over the epoch.
    pub loss: f64,
    pub cross_entropy: f64,
    pub anchor: f64,
    /// Training accuracy (all classes, identity included).
    pub train_accuracy: f64,
    /// Held-out accuracy on shuffled images only (identity excluded).
    pub heldout_accuracy: f64,
    /// Relative feature change per layer on held-out normal images, `‖f − f⁰‖ / ‖f⁰‖`.
    pub drift: Vec<f64>,
    pub seconds: f64,
}

/// The gate: did the network learn the jigsaw on images it never saw?
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    /// Accuracy on held-out shuffled images (identity excluded).
    pub accuracy: f64,
    /// Chance level, 1 / classes.
    pub chance: f64,
    /// Accuracy needed to pass.
    pub threshold: f64,
    pub passed: bool,
    /// Held-out images and shuffled inputs evaluated.
    pub images: usize,
    pub inputs: usize,
}

/// Everything a run measured; stored in the tuned backbone file under [`REPORT_KEY`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SbmReport {
    pub config: SbmConfig,
    pub arch: String,
    /// Where the starting weights came from.
    pub source: String,
    pub train_images: usize,
    pub heldout_images: usize,
    /// Minimum Hamming distance within the permutation set.
    pub min_hamming: usize,
    pub history: Vec<EpochStats>,
    pub gate: Gate,
    /// Final relative feature drift per layer (layer1..3) on held-out normal images.
    pub drift: Vec<f64>,
    pub seconds_per_epoch: f64,
    /// Whether synthetic defects were used (a synthesizer was given).
    pub synthesis: bool,
}

/// Progress events for bars and logs.
#[derive(Debug, Clone)]
pub enum SbmEvent {
    /// Resumed from a checkpoint after `epochs_done` epochs.
    Resumed { epochs_done: usize },
    /// One optimisation step done; running means of the epoch so far.
    Step {
        epoch: usize,
        epochs: usize,
        batch: usize,
        batches: usize,
        loss: f64,
        accuracy: f64,
    },
    /// Held-out evaluation running.
    Evaluating { epoch: usize },
    /// One epoch finished.
    Epoch(EpochStats),
}

/// A finished SBM run.
#[derive(Debug)]
pub struct SbmOutcome {
    /// The fine-tuned backbone (frozen again).
    pub backbone: Backbone,
    /// The trained PFAM (detached, for inference), when the config asked for it.
    pub pfam: Option<Pfam>,
    pub head: JigsawHead,
    pub perms: PermutationSet,
    pub report: SbmReport,
}

impl SbmOutcome {
    /// Write the tuned backbone (torchvision names, batch norm folded into identity layers, so
    /// `tessera fit --weights FILE` loads it like any checkpoint) with the jigsaw head, the
    /// permutation set and the report in its metadata, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = self.backbone.export_checkpoint()?;
        if let Some(p) = &self.pfam {
            tensors.extend(p.tensors());
        }
        let (w, b) = self.head.tensors();
        tensors.push(("sbm.head.weight".into(), w));
        tensors.push(("sbm.head.bias".into(), b));
        tensors.push(("sbm.permutations".into(), perms_tensor(&self.perms)?));
        let json = serde_json::to_string(&self.report)
            .map_err(|e| Error::bad_model(path, format!("cannot serialise the report: {e}")))?;
        tessera_core::io::save_safetensors(
            path,
            &tensors,
            HashMap::from([(REPORT_KEY.into(), json)]),
        )
    }
}

/// The SBM report stored in a weights file, if it is an SBM output.
pub fn read_report(path: &Path) -> Result<Option<SbmReport>> {
    let meta = tessera_core::io::safetensors_metadata(path)?;
    match meta.get(REPORT_KEY) {
        None => Ok(None),
        Some(j) => serde_json::from_str(j)
            .map(Some)
            .map_err(|e| Error::bad_model(path, format!("unreadable SBM report: {e}"))),
    }
}

fn perms_tensor(p: &PermutationSet) -> Result<Tensor> {
    let flat: Vec<u8> = p.perms().iter().flatten().copied().collect();
    Ok(Tensor::from_vec(
        flat,
        (p.classes(), p.grid() * p.grid()),
        &Device::Cpu,
    )?)
}

/// Mix seed parts into one RNG seed (SplitMix64 steps), so streams never overlap.
fn mix(parts: &[u64]) -> u64 {
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

struct Optimizers {
    bb: Option<Box<dyn StatefulOpt>>,
    pfam: Option<Box<dyn StatefulOpt>>,
    head: Box<dyn StatefulOpt>,
}

trait StatefulOpt {
    fn step(&mut self, g: &candle_core::backprop::GradStore) -> candle_core::Result<()>;
    fn state(&self) -> Result<Vec<(String, Tensor)>>;
    fn load(&mut self, t: &HashMap<String, Tensor>) -> Result<()>;
}

impl StatefulOpt for Sgd {
    fn step(&mut self, g: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
        Optimizer::step(self, g)
    }
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.state_tensors())
    }
    fn load(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        Ok(self.load_state_tensors(t)?)
    }
}

impl StatefulOpt for AdamW {
    fn step(&mut self, g: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
        Optimizer::step(self, g)
    }
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.state_tensors()?)
    }
    fn load(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        Ok(self.load_state_tensors(t)?)
    }
}

fn make_opt(c: &SbmConfig, vars: Vec<Var>, lr: f64) -> Result<Box<dyn StatefulOpt>> {
    Ok(match c.optimizer {
        OptimizerKind::Sgd => Box::new(Sgd::new(
            vars,
            SgdConfig {
                lr,
                momentum: c.momentum,
                dampening: 0.0,
                weight_decay: c.weight_decay,
                nesterov: c.momentum > 0.0,
            },
        )?),
        OptimizerKind::Adamw => Box::new(AdamW::new(
            vars,
            AdamWConfig {
                lr,
                weight_decay: c.weight_decay,
                ..Default::default()
            },
        )?),
    })
}

fn prefixed(p: &str, v: Vec<(String, Tensor)>) -> impl Iterator<Item = (String, Tensor)> + '_ {
    v.into_iter().map(move |(k, t)| (format!("{p}.{k}"), t))
}

fn strip(p: &str, t: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let p = format!("{p}.");
    t.iter()
        .filter_map(|(k, v)| k.strip_prefix(&p).map(|s| (s.to_string(), v.clone())))
        .collect()
}

#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    resume_key: String,
    epochs_done: usize,
    history: Vec<EpochStats>,
    train_images: usize,
}

/// The network being trained plus its frozen reference.
struct Nets {
    net: Backbone,
    reference: Backbone,
    head: JigsawHead,
    pfam: Option<Pfam>,
    /// (name, var) of PFAM's parameters.
    pfam_vars: Vec<(String, Var)>,
    /// (name, var) of the trained backbone tensors.
    vars: Vec<(String, Var)>,
    /// Their starting values (L2-SP).
    start: Vec<Tensor>,
    first: usize,
}

impl Nets {
    /// Training forward: trained features of layers ≥ first, the reference's (anchoring), and
    /// the logits. Layers before the first trained one are shared, computed once.
    fn forward(&self, x: &Tensor, with_ref: bool) -> Result<(Vec<Tensor>, Vec<Tensor>, Tensor)> {
        let mut h = self.net.stem(x)?;
        let mut feats = Vec::new();
        let mut refs = Vec::new();
        let mut levels = Vec::new();
        let mut r: Option<Tensor> = None;
        for l in 0..3 {
            if l + 1 == self.first && with_ref {
                r = Some(h.clone());
            }
            h = self.net.layer(l, &h)?;
            if let Some(rr) = r.take() {
                let nr = self.reference.layer(l, &rr)?;
                refs.push(nr.clone());
                r = Some(nr);
            }
            if l + 1 >= self.first {
                feats.push(h.clone());
            }
            levels.push(h.clone());
        }
        let logits = match &self.pfam {
            Some(p) => {
                let out = p.forward(&tessera_core::FeatureMaps::new(levels))?;
                self.head.forward_levels(&out.levels)?
            }
            None => self.head.forward(&h)?,
        };
        Ok((feats, refs, logits))
    }
}

fn rel_sq(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let num = (a - b)?.sqr()?.sum_all()?;
    let den = b.sqr()?.sum_all()?.detach();
    Ok(num.broadcast_div(&(den + 1e-12)?)?)
}

fn to_batch(items: Vec<Vec<f32>>, c: usize, h: usize, w: usize, dev: &Device) -> Result<Tensor> {
    let b = items.len();
    Ok(Tensor::from_vec(
        items.into_iter().flatten().collect::<Vec<_>>(),
        (b, c, h, w),
        dev,
    )?)
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
    let (w, h) = data.images[0].dimensions();
    if data.images.iter().any(|i| i.dimensions() != (w, h)) {
        return Err(Error::Config(
            "sbm: training images must share one size".into(),
        ));
    }
    let (w, h) = (w as usize, h as usize);
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

    let mut net = backbone.clone();
    let vars = net.make_trainable(&config.train_layers)?;
    // 4 = no backbone layer trains (PFAM alone, e.g. texture classes).
    let first = config.train_layers.iter().min().copied().unwrap_or(4);
    let ch = backbone.channels();
    let (pfam, pfam_vars) = match &config.pfam {
        Some(pc) => {
            let varmap = candle_nn::VarMap::new();
            let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp("pfam");
            let p = Pfam::new(pc.clone(), [ch[0], ch[1], ch[2]], vb)?;
            let mut v: Vec<(String, Var)> = varmap
                .data()
                .lock()
                .map_err(|_| Error::Config("pfam: poisoned variable map".into()))?
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            (Some(p), v)
        }
        None => (None, Vec::new()),
    };
    let head_channels = if pfam.is_some() {
        ch.iter().sum()
    } else {
        ch[2]
    };
    let head = JigsawHead::new(
        head_channels,
        config.grid,
        classes,
        mix(&[config.seed, 2]),
        &dev,
    )?;
    let start: Vec<Tensor> = vars
        .iter()
        .map(|(_, v)| v.as_tensor().detach().copy())
        .collect::<candle_core::Result<_>>()?;
    let nets = Nets {
        net,
        reference: backbone.clone(),
        head,
        pfam,
        pfam_vars,
        vars,
        start,
        first,
    };
    let mut opts = Optimizers {
        pfam: if nets.pfam_vars.is_empty() {
            None
        } else {
            Some(make_opt(
                config,
                nets.pfam_vars.iter().map(|(_, v)| v.clone()).collect(),
                config.lr_pfam,
            )?)
        },
        bb: if config.lr_backbone > 0.0 && !nets.vars.is_empty() {
            Some(make_opt(
                config,
                nets.vars.iter().map(|(_, v)| v.clone()).collect(),
                config.lr_backbone,
            )?)
        } else {
            None
        },
        head: make_opt(config, nets.head.vars(), config.lr_head)?,
    };

    // Resume.
    let mut history: Vec<EpochStats> = Vec::new();
    if let Some(ck) = checkpoint.filter(|p| p.is_file()) {
        let meta = tessera_core::io::safetensors_metadata(ck)?;
        let m: CheckpointMeta = meta
            .get(CHECKPOINT_KEY)
            .and_then(|j| serde_json::from_str(j).ok())
            .ok_or_else(|| Error::bad_model(ck, "not an SBM checkpoint"))?;
        if m.resume_key != config.resume_key() || m.train_images != n_img {
            return Err(Error::bad_model(
                ck,
                "this checkpoint was made with other settings or images; delete it (or pass --restart) to start over",
            ));
        }
        let t = candle_core::safetensors::load(ck, &dev)
            .map_err(|e| Error::bad_model(ck, format!("unreadable checkpoint: {e}")))?;
        let get = |k: &str| {
            t.get(k)
                .ok_or_else(|| Error::bad_model(ck, format!("checkpoint lacks '{k}'")))
        };
        for (name, v) in &nets.vars {
            v.set(get(&format!("bb.{name}"))?)?;
        }
        for (k, v) in ["weight", "bias"].iter().zip(nets.head.vars()) {
            v.set(get(&format!("head.{k}"))?)?;
        }
        for (name, v) in &nets.pfam_vars {
            v.set(get(&format!("pfam_vars.{name}"))?)?;
        }
        if let Some(o) = opts.bb.as_mut() {
            o.load(&strip("opt_bb", &t))?;
        }
        if let Some(o) = opts.pfam.as_mut() {
            o.load(&strip("opt_pfam", &t))?;
        }
        opts.head.load(&strip("opt_head", &t))?;
        history = m.history;
        progress(&SbmEvent::Resumed {
            epochs_done: history.len(),
        });
    }

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

    let id_prob = config.identity_prob;
    let sample_class = |rng: &mut rand_chacha::ChaCha8Rng| -> usize {
        match id_prob {
            None => rng.random_range(0..classes),
            Some(p) if rng.random::<f64>() < p => 0,
            Some(_) => rng.random_range(1..classes),
        }
    };

    let batches = train_idx.len().div_ceil(config.batch_size);
    let start_epoch = history.len();
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
            let made: Vec<(Vec<f32>, u32)> = chunk
                .par_iter()
                .enumerate()
                .map(|(k, &i)| {
                    let pos = (bi * config.batch_size + k) as u64;
                    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(mix(&[
                        config.seed,
                        5,
                        epoch as u64,
                        pos,
                    ]));
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
                .collect::<Result<_>>()?;
            let (inputs, labels): (Vec<_>, Vec<_>) = made.into_iter().unzip();
            let b = labels.len();
            let x = to_batch(inputs, 3, h, w, &dev)?;
            let y = Tensor::new(labels.as_slice(), &dev)?;
            let with_ref =
                config.anchor == Anchor::Features && config.anchor_weight > 0.0 && first <= 3;
            let (feats, refs, logits) = nets.forward(&x, with_ref)?;
            let ce = candle_nn::loss::cross_entropy(&logits, &y)?;
            let anchor = match config.anchor {
                Anchor::Features if with_ref => {
                    let mut a = Tensor::zeros((), DType::F32, &dev)?;
                    for (f, r) in feats.iter().zip(&refs) {
                        a = (a + rel_sq(f, r)?)?;
                    }
                    Some(a)
                }
                Anchor::L2Sp if config.anchor_weight > 0.0 => {
                    let mut a = Tensor::zeros((), DType::F32, &dev)?;
                    for ((_, v), w0) in nets.vars.iter().zip(&nets.start) {
                        a = (a + (v.as_tensor() - w0)?.sqr()?.sum_all()?)?;
                    }
                    Some((a * 0.5)?)
                }
                _ => None,
            };
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
            let grads = loss.backward()?;
            if let Some(o) = opts.bb.as_mut() {
                o.step(&grads)?;
            }
            if let Some(o) = opts.pfam.as_mut() {
                o.step(&grads)?;
            }
            opts.head.step(&grads)?;
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
            save_checkpoint(ck, config, &nets, &opts, &history, n_img)?;
        }
    }

    let last = history
        .last()
        .cloned()
        .ok_or_else(|| Error::Config("sbm: no epoch ran".into()))?;
    let chance = 1.0 / classes as f64;
    let n_eval = eval_set.len() as f64;
    let threshold = (config.gate_factor * chance)
        .max(chance + 5.0 * (chance * (1.0 - chance) / n_eval).sqrt())
        .min(1.0);
    let gate = Gate {
        accuracy: last.heldout_accuracy,
        chance,
        threshold,
        passed: last.heldout_accuracy >= threshold,
        images: hold_idx.len(),
        inputs: eval_set.len(),
    };
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

fn save_checkpoint(
    path: &Path,
    config: &SbmConfig,
    nets: &Nets,
    opts: &Optimizers,
    history: &[EpochStats],
    train_images: usize,
) -> Result<()> {
    let mut t: Vec<(String, Tensor)> = nets
        .vars
        .iter()
        .map(|(k, v)| (format!("bb.{k}"), v.as_tensor().detach()))
        .collect();
    let (hw, hb) = nets.head.tensors();
    t.push(("head.weight".into(), hw.detach()));
    t.push(("head.bias".into(), hb.detach()));
    if let Some(o) = &opts.bb {
        t.extend(prefixed("opt_bb", o.state()?));
    }
    if let Some(o) = &opts.pfam {
        t.extend(prefixed("opt_pfam", o.state()?));
    }
    t.extend(
        nets.pfam_vars
            .iter()
            .map(|(k, v)| (format!("pfam_vars.{k}"), v.as_tensor().detach())),
    );
    t.extend(prefixed("opt_head", opts.head.state()?));
    let meta = CheckpointMeta {
        resume_key: config.resume_key(),
        epochs_done: history.len(),
        history: history.to_vec(),
        train_images,
    };
    let json = serde_json::to_string(&meta)
        .map_err(|e| Error::bad_model(path, format!("cannot serialise checkpoint: {e}")))?;
    tessera_core::io::save_safetensors(path, &t, HashMap::from([(CHECKPOINT_KEY.into(), json)]))
}
