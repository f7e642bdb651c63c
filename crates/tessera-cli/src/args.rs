//! The command line: every command and option, and how they become pipeline options.

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::str::FromStr;
use tessera_backbone::Arch;
use tessera_cfa::CfaConfig;
use tessera_core::model::{Geometry, Preprocess, Tiling};
use tessera_core::DeviceSpec;
use tessera_padim::{CovDtype, PadimConfig, Reduction};
use tessera_patchcore::{BankDtype, PatchcoreConfig, Search};
use tessera_pfam::{Branches, PfamConfig};
use tessera_pipeline::{
    CalibrationMode, CalibrationOptions, FitOptions, GateMode, Method, PfamTraining, Precision,
    SbmMode, SbmStage, ScorerConfig, ScorerKind, WeightsArgs,
};
use tessera_sbm::{Anchor, OptimizerKind, SbmConfig, SegmentConfig};

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Unsupervised visual anomaly detection on pretrained CNN features (PaDiM, PatchCore, CFA)"
)]
pub(crate) struct Cli {
    /// No progress bars or notes on stderr (warnings still show).
    #[arg(long, global = true)]
    pub(crate) quiet: bool,
    /// Print a JSON summary on stdout (implies --quiet).
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Keep freed memory of every size for the next batch instead of returning it
    /// (Linux/glibc; by default blocks under 32 MiB are reused and larger ones returned): fewer
    /// page faults for large buffers. Measured faster for PaDiM (Wide-ResNet-50-2 scoring
    /// 71–80 → 49–58 ms/image) and CFA, slower for PatchCore; resident memory stays at its
    /// peak (docs/performance.md). Allocator settings in the environment (MALLOC_*_,
    /// GLIBC_TUNABLES) replace both.
    #[arg(long, global = true)]
    pub(crate) retain_freed_memory: bool,
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Fit a detector on the normal training images of a dataset and write one model file.
    Fit(Box<FitArgs>),
    /// Score a dataset's test split with a model: AUROC report (JSON + Markdown), heatmaps.
    Test(TestArgs),
    /// Score images or folders of images with a model: heatmaps and scores.csv.
    Predict(PredictArgs),
    /// The shape-biased module: fine-tune a backbone on the jigsaw task.
    #[command(subcommand)]
    Sbm(SbmCmd),
    /// Write synthetic defect images + masks (MVTec layout) from a category's normal images.
    Synth(SynthArgs),
    /// Datasets on disk.
    #[command(subcommand)]
    Data(DataCmd),
    /// Serve models over HTTP for line software and cameras: predict, reload, metrics, an
    /// inspection page at `/`.
    Serve(ServeArgs),
    /// Compare runs image by image (Fig. 5 style): image | ground truth | heatmap and mask of
    /// each run, from the heatmap folders of `tessera test --heatmaps`.
    Gallery(GalleryArgs),
}

/// `NAME=FILE`.
fn model_arg(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((n, f)) if !n.is_empty() && !f.is_empty() => Ok((n.to_string(), PathBuf::from(f))),
        _ => Err(format!(
            "'{s}': expected NAME=FILE, e.g. bottle=bottle.padim.safetensors"
        )),
    }
}

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// A model to serve as NAME=FILE (repeat for several).
    #[arg(long = "model", required = true, value_parser = model_arg)]
    pub(crate) models: Vec<(String, PathBuf)>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) addr: std::net::SocketAddr,
    /// Most images per backbone batch (concurrent requests are gathered).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub(crate) max_batch: u64,
    /// Longest wait for more requests before a batch runs, milliseconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub(crate) max_wait_ms: u64,
    /// Requests that may wait per model; beyond it, 503 with Retry-After.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub(crate) queue: u64,
    /// Largest request body, MiB (413 beyond).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub(crate) body_limit_mib: u64,
    /// Longest wait for an answer, seconds (504 beyond).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) timeout_s: u64,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: DeviceSpec,
    /// The backbones' products (and PFAM's attention's): f32, or bf16 on CPUs with native
    /// bf16 dot products (AVX512-BF16); f32 elsewhere, with a warning.
    #[arg(long, default_value = "f32", value_parser = named::<Precision>(Precision::NAMES))]
    pub(crate) precision: Precision,
}

impl ServeArgs {
    pub(crate) fn options(&self) -> tessera_serve::ServeOptions {
        tessera_serve::ServeOptions {
            models: self.models.clone(),
            addr: self.addr,
            device: self.device,
            batch: tessera_serve::batcher::BatchConfig {
                max_batch: self.max_batch as usize,
                max_wait: std::time::Duration::from_millis(self.max_wait_ms),
                queue: self.queue as usize,
            },
            body_limit: (self.body_limit_mib as usize) << 20,
            timeout: std::time::Duration::from_secs(self.timeout_s),
            precision: self.precision,
        }
    }
}

#[derive(Args)]
pub(crate) struct GalleryArgs {
    /// A heatmap folder of `tessera test --heatmaps`; give one per run to compare.
    #[arg(long = "heatmaps", required = true)]
    pub(crate) heatmaps: Vec<PathBuf>,
    /// Defect images to show (one per defect type in turn).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub(crate) rows: u64,
    /// The gallery PNG to write.
    #[arg(long)]
    pub(crate) out: PathBuf,
}

#[derive(Subcommand)]
pub(crate) enum DataCmd {
    /// Check a dataset (a root of category folders, or one category folder) against a
    /// manifest: categories present, image counts per split, a mask for every defective image,
    /// mask sizes, unreadable or stray files. Exit status 1 when anything is wrong.
    Verify(DataVerifyArgs),
    /// Write the built-in synthetic demo category (MVTec layout, deterministic from the seed):
    /// a ring-shaped part with scratch, spot and crack defects and exact masks.
    Demo(DataDemoArgs),
    /// What Tessera makes of a dataset folder: layout, category, kind, image counts.
    Info(DataInfoArgs),
}

#[derive(Args)]
pub(crate) struct DataDemoArgs {
    /// Output folder (new or empty, unless --overwrite).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Replace a non-empty output folder as a whole.
    #[arg(long)]
    pub(crate) overwrite: bool,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Image side in pixels.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(32..=4096))]
    pub(crate) size: u32,
    /// Normal training images.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(2..=100_000))]
    pub(crate) train: u64,
    /// Normal test images.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub(crate) test_good: u64,
    /// Test images per defect type.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub(crate) test_defect: u64,
}

#[derive(Args)]
pub(crate) struct DataInfoArgs {
    /// A category folder (MVTec layout or tessera-dataset.json).
    pub(crate) root: PathBuf,
}

#[derive(Args)]
pub(crate) struct DataVerifyArgs {
    /// Dataset root holding category folders, or a single category folder.
    pub(crate) root: PathBuf,
    /// Manifest JSON file, or a built-in one by name: mvtec_ad (the default), mtl_ad.
    #[arg(long)]
    pub(crate) manifest: Option<PathBuf>,
    /// Check only these categories (comma-separated); other folders are then not looked at.
    /// For a single category folder: the manifest category it is.
    #[arg(long, value_delimiter = ',')]
    pub(crate) categories: Option<Vec<String>>,
    /// Read image headers only (fast; truncated files and mask values go unchecked). By
    /// default every image and mask is decoded.
    #[arg(long)]
    pub(crate) quick: bool,
}

#[derive(Subcommand)]
pub(crate) enum SbmCmd {
    /// Train SBM on a category's train/good images and write the tuned backbone (.safetensors,
    /// loadable with `fit --weights` or `fit --method sbm --sbm-weights`).
    Train(Box<SbmTrainArgs>),
}

/// A value parser for a library enum with fixed names (`NAMES` + `FromStr`): the names are
/// listed in `--help` and in errors.
pub(crate) fn named<T>(names: &'static [&'static str]) -> impl TypedValueParser<Value = T>
where
    T: FromStr + Clone + Send + Sync + 'static,
{
    PossibleValuesParser::new(names).map(|s| match s.parse::<T>() {
        Ok(v) => v,
        // PossibleValuesParser only lets the listed names through, and they all parse.
        Err(_) => unreachable!("listed name {s} parses"),
    })
}

/// A finite float within `[lo, hi]` (`lo_open`: excluding `lo`).
pub(crate) fn float_in(
    lo: f64,
    hi: f64,
    lo_open: bool,
) -> impl Fn(&str) -> Result<f64, String> + Clone {
    move |s: &str| {
        let v: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("'{s}' is not a number"))?;
        let low_ok = if lo_open { v > lo } else { v >= lo };
        if !v.is_finite() || !low_ok || v > hi {
            let open = if lo_open { "(" } else { "[" };
            let hi = if hi == f64::MAX {
                "∞)".to_string()
            } else {
                format!("{hi}]")
            };
            return Err(format!("{v} is not in {open}{lo}, {hi}"));
        }
        Ok(v)
    }
}

pub(crate) fn positive(s: &str) -> Result<f64, String> {
    float_in(0.0, f64::MAX, true)(s)
}

pub(crate) fn non_negative(s: &str) -> Result<f64, String> {
    float_in(0.0, f64::MAX, false)(s)
}

pub(crate) fn probability(s: &str) -> Result<f64, String> {
    float_in(0.0, 1.0, false)(s)
}

pub(crate) fn fraction(s: &str) -> Result<f64, String> {
    float_in(0.0, 1.0, true)(s)
}

pub(crate) fn finite_f32(s: &str) -> Result<f32, String> {
    let v: f32 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number"))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("{v} is not a finite number"))
    }
}

/// A list of backbone layers (`none` = empty).
#[derive(Clone, Debug)]
pub(crate) struct Layers(pub(crate) Vec<usize>);

pub(crate) fn parse_layers(s: &str) -> Result<Layers, String> {
    if s.trim().eq_ignore_ascii_case("none") || s.trim().is_empty() {
        return Ok(Layers(Vec::new()));
    }
    s.split(',')
        .map(|p| match p.trim().parse::<usize>() {
            Ok(l) if (1..=3).contains(&l) => Ok(l),
            _ => Err(format!("'{p}' is not a layer number (1, 2 or 3)")),
        })
        .collect::<Result<_, _>>()
        .map(Layers)
}

/// SBM training settings (defaults: the ablation's choice, docs/sbm.md).
#[derive(Args)]
pub(crate) struct SbmArgs {
    /// SBM epochs.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub(crate) sbm_epochs: Option<u64>,
    /// Stop after two epochs in a row with held-out jigsaw accuracy at chance level (the task
    /// is not being learned, e.g. a uniform texture). Off by default: small runs can sit at
    /// chance for a few epochs and then learn.
    #[arg(long)]
    pub(crate) sbm_early_stop: bool,
    /// Backbone layers SBM trains, e.g. 3 or 2,3 or 1,2,3; `none` keeps the backbone frozen
    /// (with --pfam / --method ours: PFAM alone trains).
    #[arg(long, value_parser = parse_layers)]
    pub(crate) sbm_layers: Option<Layers>,
    /// Anchoring against forgetting ImageNet.
    #[arg(long, value_parser = named::<Anchor>(Anchor::NAMES))]
    pub(crate) sbm_anchor: Option<Anchor>,
    /// Weight λ of the anchoring term.
    #[arg(long, value_parser = non_negative)]
    pub(crate) sbm_anchor_weight: Option<f64>,
    /// Backbone learning rate.
    #[arg(long, value_parser = non_negative)]
    pub(crate) sbm_lr: Option<f64>,
    /// Jigsaw head learning rate.
    #[arg(long, value_parser = positive)]
    pub(crate) sbm_head_lr: Option<f64>,
    /// PFAM learning rate (--pfam / --method ours); a tiny one (1e-12) keeps PFAM at its
    /// seeded initial values (the "untrained PFAM" of the ablation in docs/pfam.md).
    #[arg(long, value_parser = positive)]
    pub(crate) sbm_pfam_lr: Option<f64>,
    /// Which levels PFAM transforms (--pfam / --method ours): both (the paper), x1 or x3 (the
    /// other passes through; the ablation in docs/pfam.md).
    #[arg(long, value_parser = named::<Branches>(Branches::NAMES))]
    pub(crate) pfam_branches: Option<Branches>,
    #[arg(long, value_parser = named::<OptimizerKind>(OptimizerKind::NAMES))]
    pub(crate) sbm_optimizer: Option<OptimizerKind>,
    /// Tiles per side of the jigsaw grid.
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..=8))]
    pub(crate) sbm_grid: Option<u64>,
    /// Number of non-identity permutations.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub(crate) sbm_permutations: Option<u64>,
    /// Probability of showing the identity (default: uniform over all classes).
    #[arg(long, value_parser = probability)]
    pub(crate) sbm_identity_prob: Option<f64>,
    /// Probability that a training input carries a synthetic defect.
    #[arg(long, value_parser = probability)]
    pub(crate) sbm_synth_prob: Option<f64>,
    /// Images per SBM training step.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub(crate) sbm_batch_size: Option<u64>,
    /// Texture images (e.g. DTD) as anomaly sources for synthetic defects; without it, the
    /// structure source only.
    #[arg(long)]
    pub(crate) textures: Option<PathBuf>,
}

impl SbmArgs {
    /// PFAM's segmentation settings (`fit --pfam-train synth`): the SBM flags that apply to it
    /// (PFAM learning rate, batch size, synthetic-defect probability) and its own epochs.
    pub(crate) fn segment(&self, epochs: Option<u64>, seed: u64) -> SegmentConfig {
        let d = SegmentConfig::default();
        SegmentConfig {
            pfam: self.pfam_config(),
            epochs: epochs.map_or(d.epochs, |v| v as usize),
            lr: self.sbm_pfam_lr.unwrap_or(d.lr),
            batch_size: self.sbm_batch_size.map_or(d.batch_size, |v| v as usize),
            synth_prob: self.sbm_synth_prob.unwrap_or(d.synth_prob),
            seed,
            ..d
        }
    }

    /// PFAM's configuration: the defaults, with `--pfam-branches`.
    pub(crate) fn pfam_config(&self) -> PfamConfig {
        PfamConfig {
            branches: self.pfam_branches.unwrap_or_default(),
            ..Default::default()
        }
    }

    /// SBM's configuration; `pfam` is set when `--pfam-branches` is given (`sbm train` then
    /// needs `--pfam`; `fit --method ours` always trains PFAM).
    pub(crate) fn config(&self, seed: u64) -> SbmConfig {
        let d = SbmConfig::default();
        let mut c = SbmConfig {
            epochs: self.sbm_epochs.map_or(d.epochs, |v| v as usize),
            train_layers: self
                .sbm_layers
                .clone()
                .map_or(d.train_layers.clone(), |l| l.0),
            anchor: self.sbm_anchor.unwrap_or(d.anchor),
            anchor_weight: self.sbm_anchor_weight.unwrap_or(d.anchor_weight),
            lr_backbone: self.sbm_lr.unwrap_or(d.lr_backbone),
            lr_head: self.sbm_head_lr.unwrap_or(d.lr_head),
            lr_pfam: self.sbm_pfam_lr.unwrap_or(d.lr_pfam),
            optimizer: self.sbm_optimizer.unwrap_or(d.optimizer),
            grid: self.sbm_grid.map_or(d.grid, |v| v as usize),
            permutations: self.sbm_permutations.map_or(d.permutations, |v| v as usize),
            identity_prob: self.sbm_identity_prob.or(d.identity_prob),
            synth_prob: self.sbm_synth_prob.unwrap_or(d.synth_prob),
            batch_size: self.sbm_batch_size.map_or(d.batch_size, |v| v as usize),
            pfam: self.pfam_branches.map(|_| self.pfam_config()),
            early_stop: self.sbm_early_stop,
            seed,
            ..d
        };
        // Fewer permutations than the held-out gate evaluates per image: evaluate them all.
        c.eval_perms = c.eval_perms.min(c.permutations);
        c
    }
}

/// Where the backbone weights come from.
#[derive(Args)]
pub(crate) struct BackboneArgs {
    /// resnet18, resnet34, resnet50 or wide_resnet50_2.
    #[arg(long, default_value = "resnet18", value_parser = named::<Arch>(Arch::NAMES))]
    pub(crate) backbone: Arch,
    /// Local .safetensors weights (torchvision/timm names). Without it, weights come from the
    /// Hugging Face hub (cache first; HF_HUB_OFFLINE honoured).
    #[arg(long)]
    pub(crate) weights: Option<PathBuf>,
    /// Hub repository instead of the architecture's default (timm/<arch>.tv_in1k).
    #[arg(long, conflicts_with = "weights")]
    pub(crate) hub_repo: Option<String>,
    /// Use a seeded random backbone (no ImageNet knowledge): demos and tests only.
    #[arg(long, conflicts_with_all = ["weights", "hub_repo"])]
    pub(crate) random_weights: Option<u64>,
}

impl BackboneArgs {
    pub(crate) fn weights(&self) -> WeightsArgs {
        WeightsArgs {
            backbone: self.backbone,
            weights: self.weights.clone(),
            hub_repo: self.hub_repo.clone(),
            random_weights: self.random_weights,
        }
    }
}

#[derive(Args)]
pub(crate) struct SbmTrainArgs {
    /// Category folder (MVTec layout or tessera-dataset.json); its train/good images are used.
    #[arg(long)]
    pub(crate) data: PathBuf,
    #[command(flatten)]
    pub(crate) backbone: BackboneArgs,
    /// Tuned backbone to write (a checkpoint `<out>.ckpt` is kept while training; a rerun
    /// resumes from it).
    #[arg(long)]
    pub(crate) out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    #[arg(long, default_value = "auto", value_parser = preprocess_arg)]
    pub(crate) preprocess: Preprocess,
    /// Restrict synthetic defects to the object's foreground (default: object categories).
    #[arg(long)]
    pub(crate) foreground: Option<bool>,
    /// Train on normal images only (no synthetic defects).
    #[arg(long)]
    pub(crate) no_synth: bool,
    /// Also train PFAM (its outputs feed the jigsaw head): the output then serves
    /// `fit --method ours --sbm-weights FILE`. With --sbm-layers none the backbone stays frozen.
    #[arg(long)]
    pub(crate) pfam: bool,
    /// Ignore an existing checkpoint and start over.
    #[arg(long)]
    pub(crate) restart: bool,
    #[command(flatten)]
    pub(crate) sbm: SbmArgs,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: DeviceSpec,
}

#[derive(Args)]
pub(crate) struct SynthArgs {
    /// Category folder; normal sources are its train/good images.
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// Texture images as anomaly sources (optional).
    #[arg(long)]
    pub(crate) textures: Option<PathBuf>,
    /// Number of images to write.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) count: u64,
    /// Output folder (test/synthetic/*.png, ground_truth/synthetic/*_mask.png).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Replace a non-empty output folder as a whole (when the run succeeds).
    #[arg(long)]
    pub(crate) overwrite: bool,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Restrict defects to the Otsu foreground (default: MVTec object categories).
    #[arg(long)]
    pub(crate) foreground: Option<bool>,
}

/// `auto` (`paper` for square images, `whole:224` for elongated ones), `paper` (resize 256,
/// center crop 224), `anomalib` (resize 256, no crop), `whole[:N]` (the whole image, aspect
/// ratio kept, short side N, default 256), `native` (the images' own size) or `WxH` (exactly
/// W × H).
pub(crate) fn preprocess_arg(s: &str) -> Result<Preprocess, String> {
    let k = s.trim().to_ascii_lowercase();
    let side = |v: &str| -> Result<u32, String> {
        v.parse::<u32>()
            .ok()
            .filter(|n| (16..=16_384).contains(n))
            .ok_or_else(|| format!("'{v}' is not a size in pixels (16..=16384)"))
    };
    let p = match k.as_str() {
        "auto" => Preprocess::auto(),
        "paper" => Preprocess::paper(),
        "anomalib" => Preprocess::anomalib(),
        "whole" => Preprocess::with(Geometry::ShortSide { size: 256 }),
        "native" => Preprocess::with(Geometry::Native),
        _ => {
            if let Some(n) = k.strip_prefix("whole:") {
                Preprocess::with(Geometry::ShortSide { size: side(n)? })
            } else if let Some((w, h)) = k.split_once('x') {
                Preprocess::exact(side(w)?, side(h)?)
            } else {
                return Err(format!(
                    "'{s}': expected auto, paper, anomalib, whole, whole:N, native or WxH (e.g. 256x640)"
                ));
            }
        }
    };
    Ok(p)
}

/// `N` or `N:OVERLAP` (pixels; the overlap defaults to N/8).
pub(crate) fn tile_arg(s: &str) -> Result<Tiling, String> {
    let (t, o) = match s.split_once(':') {
        Some((t, o)) => (t, Some(o)),
        None => (s, None),
    };
    let tile: u32 = t
        .trim()
        .parse()
        .ok()
        .filter(|t| (32..=4096).contains(t))
        .ok_or_else(|| format!("'{t}': the tile side must be 32..=4096 pixels"))?;
    let overlap = match o {
        None => tile / 8,
        Some(o) => o
            .trim()
            .parse()
            .ok()
            .filter(|&o| o < tile)
            .ok_or_else(|| format!("'{o}': the overlap must be smaller than the tile"))?,
    };
    Ok(Tiling { tile, overlap })
}

#[derive(Args)]
pub(crate) struct Common {
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: DeviceSpec,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub(crate) batch_size: u64,
}

#[derive(Args)]
pub(crate) struct FitArgs {
    /// Dataset root (MVTec layout, or a folder with tessera-dataset.json).
    #[arg(long)]
    pub(crate) data: PathBuf,
    #[arg(long, default_value = "padim", value_parser = named::<ScorerKind>(ScorerKind::NAMES))]
    pub(crate) scorer: ScorerKind,
    #[command(flatten)]
    pub(crate) backbone: BackboneArgs,
    /// baseline: the scorer on plain ImageNet features; sbm: SBM first (object categories,
    /// see --sbm), then the scorer on the tuned backbone; ours: the paper's "+ our method",
    /// SBM (object categories) + PFAM trained on the jigsaw task, the scorer reads PFAM's
    /// outputs.
    #[arg(long, default_value = "baseline", value_parser = named::<Method>(Method::NAMES))]
    pub(crate) method: Method,
    /// Seed of every random choice (PaDiM's channel subset, PatchCore's projection, CFA's
    /// initialisation, SBM).
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// auto: paper for (nearly) square images, whole:224 for elongated ones (long side over 1.25×
    /// the short); paper: resize 256, center crop 224; anomalib: resize 256, no crop; whole[:N]:
    /// the whole image, aspect ratio kept, short side N (256); native: the images' own size;
    /// WxH: exactly that size. Sizes are fixed from the first training image and stored.
    #[arg(long, default_value = "auto", value_parser = preprocess_arg)]
    pub(crate) preprocess: Preprocess,
    /// Score in overlapping square tiles of N px (overlap N/8, or N:OVERLAP), stitched into one
    /// map of the whole (resized) image: for large or elongated images.
    #[arg(long, value_name = "N[:OVERLAP]", value_parser = tile_arg)]
    pub(crate) tile: Option<Tiling>,
    /// normal: thresholds from held-out normal images (conformal, --target-fpr); synthetic:
    /// F1-optimal thresholds on synthetic defects pasted onto them (--textures as sources).
    #[arg(long, default_value = "normal", value_parser = named::<CalibrationMode>(CalibrationMode::NAMES))]
    pub(crate) calibrate: CalibrationMode,
    /// Fraction of the normal training images held out for calibration, never fitted on (0:
    /// calibrate on training images, without a guarantee).
    #[arg(long, default_value_t = 0.2, value_parser = float_in(0.0, 0.9, false))]
    pub(crate) calibration_fraction: f64,
    /// The seed that draws the held-out calibration images (default 0, whatever --seed: the
    /// seed varies the method's random choices, not which images it is fitted on).
    #[arg(long, value_name = "SEED")]
    pub(crate) split_seed: Option<u64>,
    /// The false-alarm rate the image threshold must keep on normal parts.
    #[arg(long, default_value_t = 0.05, value_parser = float_in(0.0, 0.5, true))]
    pub(crate) target_fpr: f64,
    /// PaDiM: dimensions kept (default: every channel for ResNet-18/34, 448, so no random
    /// choice; 550 for wider backbones; the paper's ResNet-18 setting is 100).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub(crate) padim_dims: Option<u64>,
    /// PaDiM: how channels are reduced. orthogonal: a seeded semi-orthogonal projection of all
    /// channels (Kim et al. 2021; far less seed-dependent); subset: a seeded random channel
    /// subset (the paper's); pca / npca: the principal directions of largest / smallest
    /// variance of the training features (no random choice).
    #[arg(long, default_value = "orthogonal", value_parser = named::<Reduction>(Reduction::NAMES))]
    pub(crate) padim_reduction: Reduction,
    /// PaDiM: storage type of the inverse covariances (f16: half the model file and memory,
    /// distances still computed in f32).
    #[arg(long, default_value = "f32", value_parser = named::<CovDtype>(CovDtype::NAMES))]
    pub(crate) padim_cov_dtype: CovDtype,
    /// PaDiM: one covariance per N × N block of neighbouring positions (each keeps its own
    /// mean): N² times fewer inverse covariances, so every channel's full covariance fits
    /// (default: 4 when every channel is kept, else 1, the paper's per-position covariance).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=64))]
    pub(crate) padim_tie: Option<u64>,
    /// PatchCore: fraction of training patches kept in the memory bank (0 < r <= 1).
    #[arg(long, default_value_t = 0.1, value_parser = fraction)]
    pub(crate) coreset_ratio: f64,
    /// PatchCore: reduce patch features to this many channels (adaptive average pooling).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub(crate) patchcore_dim: Option<u64>,
    /// PatchCore: memory bank storage type.
    #[arg(long, default_value = "f32", value_parser = named::<BankDtype>(BankDtype::NAMES))]
    pub(crate) bank_dtype: BankDtype,
    /// PatchCore: reweight image scores with K nearest neighbours (paper eq.; off by default).
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub(crate) patchcore_reweight: Option<u64>,
    /// PatchCore: how test patches find their nearest bank row. exact: a partitioned bank with
    /// pruning (the brute-force answer, less work); brute: every row; approx:P: the P nearest
    /// clusters only (faster, not exact).
    #[arg(long, default_value = "exact", value_parser = patchcore_search)]
    pub(crate) patchcore_search: Search,
    /// PatchCore: clusters of the partitioned bank (default: about √bank size).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub(crate) patchcore_clusters: Option<u64>,
    /// CFA: training epochs.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub(crate) epochs: u64,
    /// CFA: stop early when the training loss has not improved for N epochs.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub(crate) patience: Option<u64>,
    /// CFA: descriptor compression γ_d (output channels = input / γ_d).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub(crate) cfa_gamma_d: u64,
    /// CFA: memory compression γ_c (k-means to grid positions / γ_c centres).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) cfa_gamma_c: u64,
    /// Model file to write (atomically).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// --method sbm|ours: on which categories SBM trains the backbone (with ours, PFAM trains
    /// everywhere; the backbone stays frozen where SBM does not apply).
    #[arg(long, default_value = "auto", value_parser = named::<SbmMode>(SbmMode::NAMES))]
    pub(crate) sbm: SbmMode,
    /// --method sbm|ours: use this tuned backbone (from `tessera sbm train [--pfam]`) instead
    /// of training.
    #[arg(long)]
    pub(crate) sbm_weights: Option<PathBuf>,
    /// Use SBM weights even if their jigsaw gate failed.
    #[arg(long)]
    pub(crate) sbm_force: bool,
    /// --method ours: how PFAM trains. `jigsaw` (default, the paper): in the SBM stage;
    /// `synth`: after SBM, on the frozen backbone, to segment synthetic defects (any category);
    /// `cfa` (--scorer cfa): jigsaw, then end to end with CFA's loss.
    #[arg(long, default_value = "jigsaw", value_parser = named::<PfamTraining>(PfamTraining::NAMES))]
    pub(crate) pfam_train: PfamTraining,
    /// --pfam-train synth: epochs of PFAM's segmentation training.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub(crate) pfam_epochs: Option<u64>,
    /// --method sbm|ours: on: fit the baseline too and keep the method only when it scores
    /// better on held-out normals + synthetic defects; report: measure and record that, but
    /// keep the method; off: the method as asked, no comparison.
    #[arg(long, default_value = "on", value_parser = named::<GateMode>(GateMode::NAMES))]
    pub(crate) method_gate: GateMode,
    #[command(flatten)]
    pub(crate) sbm_args: SbmArgs,
    #[command(flatten)]
    pub(crate) common: Common,
}

impl FitArgs {
    pub(crate) fn scorer(&self) -> ScorerConfig {
        match self.scorer {
            ScorerKind::Padim => ScorerConfig::Padim(PadimConfig {
                dims: self.padim_dims.map(|d| d as usize),
                reduction: self.padim_reduction,
                inv_cov_dtype: self.padim_cov_dtype,
                tie: self.padim_tie.map(|t| t as usize),
                ..Default::default()
            }),
            ScorerKind::Patchcore => ScorerConfig::Patchcore(PatchcoreConfig {
                coreset_ratio: self.coreset_ratio,
                embed_dim: self.patchcore_dim.map(|d| d as usize),
                reweight_k: self.patchcore_reweight.map(|k| k as usize),
                bank_dtype: self.bank_dtype,
                search: self.patchcore_search,
                clusters: self.patchcore_clusters.map(|c| c as usize),
                ..Default::default()
            }),
            ScorerKind::Cfa => ScorerConfig::Cfa(CfaConfig {
                epochs: self.epochs as usize,
                patience: self.patience.map(|p| p as usize),
                gamma_d: self.cfa_gamma_d as usize,
                gamma_c: self.cfa_gamma_c as usize,
                ..Default::default()
            }),
        }
    }

    pub(crate) fn options(&self) -> FitOptions {
        FitOptions {
            data: self.data.clone(),
            weights: self.backbone.weights(),
            method: self.method,
            scorer: self.scorer(),
            sbm: SbmStage {
                mode: self.sbm,
                weights: self.sbm_weights.clone(),
                force: self.sbm_force,
                config: self.sbm_args.config(self.seed),
                textures: self.sbm_args.textures.clone(),
                segment: self.sbm_args.segment(self.pfam_epochs, self.seed),
            },
            pfam_training: self.pfam_train,
            seed: self.seed,
            preprocess: Preprocess {
                tiling: self.tile,
                ..self.preprocess.clone()
            },
            device: self.common.device,
            batch_size: self.common.batch_size as usize,
            out: self.out.clone(),
            calibration: CalibrationOptions {
                mode: self.calibrate,
                fraction: self.calibration_fraction,
                target_fpr: self.target_fpr,
                textures: self.sbm_args.textures.clone(),
                split_seed: self.split_seed,
            },
            method_gate: self.method_gate,
        }
    }
}

#[derive(Args)]
pub(crate) struct TestArgs {
    #[arg(long)]
    pub(crate) model: PathBuf,
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// Report JSON path; a Markdown report is written beside it (.md).
    #[arg(long)]
    pub(crate) report: PathBuf,
    /// Write one heatmap panel per test image into this folder.
    #[arg(long)]
    pub(crate) heatmaps: Option<PathBuf>,
    /// Replace a non-empty --heatmaps folder as a whole (when the run succeeds).
    #[arg(long)]
    pub(crate) overwrite: bool,
    /// Decide at this image threshold (and draw masks at it) instead of the model's.
    #[arg(long, value_parser = finite_f32)]
    pub(crate) threshold: Option<f32>,
    /// PatchCore models: search the memory bank this way instead of the model's own setting
    /// (brute, exact or approx:P).
    #[arg(long, value_parser = patchcore_search)]
    pub(crate) patchcore_search: Option<Search>,
    /// The backbone's products (and PFAM's attention's): f32, or bf16 (weights and activations
    /// rounded to bf16, sums in f32) on CPUs with native bf16 dot products (AVX512-BF16); f32
    /// elsewhere, with a warning.
    #[arg(long, default_value = "f32", value_parser = named::<Precision>(Precision::NAMES))]
    pub(crate) precision: Precision,
    #[command(flatten)]
    pub(crate) common: Common,
}

fn patchcore_search(s: &str) -> Result<Search, String> {
    s.parse().map_err(|e: tessera_core::Error| e.to_string())
}

#[derive(Args)]
pub(crate) struct PredictArgs {
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Image files and/or folders of images.
    #[arg(required = true)]
    pub(crate) inputs: Vec<PathBuf>,
    /// Output folder for heatmaps (mirroring the inputs' paths) and scores.csv; it must be new
    /// or empty unless --overwrite.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Replace a non-empty output folder as a whole (when the run succeeds).
    #[arg(long)]
    pub(crate) overwrite: bool,
    /// Also score the images in sub-folders of folder inputs.
    #[arg(long, short = 'r')]
    pub(crate) recursive: bool,
    /// Threshold for the anomalous flag and the predicted mask (default: the model's).
    #[arg(long, value_parser = finite_f32)]
    pub(crate) threshold: Option<f32>,
    /// The backbone's products (and PFAM's attention's): f32, or bf16 on CPUs with native bf16
    /// dot products (AVX512-BF16); f32 elsewhere, with a warning.
    #[arg(long, default_value = "f32", value_parser = named::<Precision>(Precision::NAMES))]
    pub(crate) precision: Precision,
    #[command(flatten)]
    pub(crate) common: Common,
}
