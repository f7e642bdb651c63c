//! `tessera`: fit, test and predict industrial anomaly detectors. Argument parsing and
//! printing only; the work is in `tessera-pipeline` and the crates below it.

mod progress;
mod verify_table;

use anyhow::Result;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use progress::Bars;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use tessera_backbone::Arch;
use tessera_cfa::CfaConfig;
use tessera_core::model::{Geometry, Preprocess, Tiling};
use tessera_core::DeviceSpec;
use tessera_padim::PadimConfig;
use tessera_patchcore::{BankDtype, PatchcoreConfig};
use tessera_pipeline::{
    CalibrationMode, CalibrationOptions, FitOptions, Method, PfamTraining, PredictOptions, SbmMode,
    SbmOptions, SbmStage, ScorerConfig, ScorerKind, SynthOptions, TestOptions, WeightsArgs,
};
use tessera_sbm::{Anchor, OptimizerKind, SbmConfig};

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Unsupervised visual anomaly detection on pretrained CNN features (PaDiM, PatchCore, CFA)"
)]
struct Cli {
    /// No progress bars or notes on stderr (warnings still show).
    #[arg(long, global = true)]
    quiet: bool,
    /// Print a JSON summary on stdout (implies --quiet).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
    /// Compare runs image by image (Fig. 5 style): image | ground truth | heatmap and mask of
    /// each run, from the heatmap folders of `tessera test --heatmaps`.
    Gallery(GalleryArgs),
}

#[derive(Args)]
struct GalleryArgs {
    /// A heatmap folder of `tessera test --heatmaps`; give one per run to compare.
    #[arg(long = "heatmaps", required = true)]
    heatmaps: Vec<PathBuf>,
    /// Defect images to show (one per defect type in turn).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1000))]
    rows: u64,
    /// The gallery PNG to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum DataCmd {
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
struct DataDemoArgs {
    /// Output folder (new or empty, unless --overwrite).
    #[arg(long)]
    out: PathBuf,
    /// Replace a non-empty output folder as a whole.
    #[arg(long)]
    overwrite: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image side in pixels.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(32..=4096))]
    size: u32,
    /// Normal training images.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(2..=100_000))]
    train: u64,
    /// Normal test images.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    test_good: u64,
    /// Test images per defect type.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    test_defect: u64,
}

#[derive(Args)]
struct DataInfoArgs {
    /// A category folder (MVTec layout or tessera-dataset.json).
    root: PathBuf,
}

#[derive(Args)]
struct DataVerifyArgs {
    /// Dataset root holding category folders, or a single category folder.
    root: PathBuf,
    /// Manifest JSON file, or a built-in one by name: mvtec_ad (the default), mtl_ad.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Check only these categories (comma-separated); other folders are then not looked at.
    /// For a single category folder: the manifest category it is.
    #[arg(long, value_delimiter = ',')]
    categories: Option<Vec<String>>,
    /// Read image headers only (fast; truncated files and mask values go unchecked). By
    /// default every image and mask is decoded.
    #[arg(long)]
    quick: bool,
}

#[derive(Subcommand)]
enum SbmCmd {
    /// Train SBM on a category's train/good images and write the tuned backbone (.safetensors,
    /// loadable with `fit --weights` or `fit --method sbm --sbm-weights`).
    Train(Box<SbmTrainArgs>),
}

/// A value parser for a library enum with fixed names (`NAMES` + `FromStr`): the names are
/// listed in `--help` and in errors.
fn named<T>(names: &'static [&'static str]) -> impl TypedValueParser<Value = T>
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
fn float_in(lo: f64, hi: f64, lo_open: bool) -> impl Fn(&str) -> Result<f64, String> + Clone {
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

fn positive(s: &str) -> Result<f64, String> {
    float_in(0.0, f64::MAX, true)(s)
}

fn non_negative(s: &str) -> Result<f64, String> {
    float_in(0.0, f64::MAX, false)(s)
}

fn probability(s: &str) -> Result<f64, String> {
    float_in(0.0, 1.0, false)(s)
}

fn fraction(s: &str) -> Result<f64, String> {
    float_in(0.0, 1.0, true)(s)
}

fn finite_f32(s: &str) -> Result<f32, String> {
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
struct Layers(Vec<usize>);

fn parse_layers(s: &str) -> Result<Layers, String> {
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
struct SbmArgs {
    /// SBM epochs.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    sbm_epochs: Option<u64>,
    /// Backbone layers SBM trains, e.g. 3 or 2,3 or 1,2,3; `none` keeps the backbone frozen
    /// (with --pfam / --method ours: PFAM alone trains).
    #[arg(long, value_parser = parse_layers)]
    sbm_layers: Option<Layers>,
    /// Anchoring against forgetting ImageNet.
    #[arg(long, value_parser = named::<Anchor>(Anchor::NAMES))]
    sbm_anchor: Option<Anchor>,
    /// Weight λ of the anchoring term.
    #[arg(long, value_parser = non_negative)]
    sbm_anchor_weight: Option<f64>,
    /// Backbone learning rate.
    #[arg(long, value_parser = non_negative)]
    sbm_lr: Option<f64>,
    /// Jigsaw head learning rate.
    #[arg(long, value_parser = positive)]
    sbm_head_lr: Option<f64>,
    #[arg(long, value_parser = named::<OptimizerKind>(OptimizerKind::NAMES))]
    sbm_optimizer: Option<OptimizerKind>,
    /// Tiles per side of the jigsaw grid.
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..=8))]
    sbm_grid: Option<u64>,
    /// Number of non-identity permutations.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
    sbm_permutations: Option<u64>,
    /// Probability of showing the identity (default: uniform over all classes).
    #[arg(long, value_parser = probability)]
    sbm_identity_prob: Option<f64>,
    /// Probability that a training input carries a synthetic defect.
    #[arg(long, value_parser = probability)]
    sbm_synth_prob: Option<f64>,
    /// Images per SBM training step.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    sbm_batch_size: Option<u64>,
    /// Texture images (e.g. DTD) as anomaly sources for synthetic defects; without it, the
    /// structure source only.
    #[arg(long)]
    textures: Option<PathBuf>,
}

impl SbmArgs {
    fn config(&self, seed: u64) -> SbmConfig {
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
            optimizer: self.sbm_optimizer.unwrap_or(d.optimizer),
            grid: self.sbm_grid.map_or(d.grid, |v| v as usize),
            permutations: self.sbm_permutations.map_or(d.permutations, |v| v as usize),
            identity_prob: self.sbm_identity_prob.or(d.identity_prob),
            synth_prob: self.sbm_synth_prob.unwrap_or(d.synth_prob),
            batch_size: self.sbm_batch_size.map_or(d.batch_size, |v| v as usize),
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
struct BackboneArgs {
    /// resnet18, resnet34, resnet50 or wide_resnet50_2.
    #[arg(long, default_value = "resnet18", value_parser = named::<Arch>(Arch::NAMES))]
    backbone: Arch,
    /// Local .safetensors weights (torchvision/timm names). Without it, weights come from the
    /// Hugging Face hub (cache first; HF_HUB_OFFLINE honoured).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Hub repository instead of the architecture's default (timm/<arch>.tv_in1k).
    #[arg(long, conflicts_with = "weights")]
    hub_repo: Option<String>,
    /// Use a seeded random backbone (no ImageNet knowledge): demos and tests only.
    #[arg(long, conflicts_with_all = ["weights", "hub_repo"])]
    random_weights: Option<u64>,
}

impl BackboneArgs {
    fn weights(&self) -> WeightsArgs {
        WeightsArgs {
            backbone: self.backbone,
            weights: self.weights.clone(),
            hub_repo: self.hub_repo.clone(),
            random_weights: self.random_weights,
        }
    }
}

#[derive(Args)]
struct SbmTrainArgs {
    /// Category folder (MVTec layout or tessera-dataset.json); its train/good images are used.
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    backbone: BackboneArgs,
    /// Tuned backbone to write (a checkpoint `<out>.ckpt` is kept while training; a rerun
    /// resumes from it).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "paper", value_parser = preprocess_arg)]
    preprocess: Preprocess,
    /// Restrict synthetic defects to the object's foreground (default: object categories).
    #[arg(long)]
    foreground: Option<bool>,
    /// Train on normal images only (no synthetic defects).
    #[arg(long)]
    no_synth: bool,
    /// Also train PFAM (its outputs feed the jigsaw head): the output then serves
    /// `fit --method ours --sbm-weights FILE`. With --sbm-layers none the backbone stays frozen.
    #[arg(long)]
    pfam: bool,
    /// Ignore an existing checkpoint and start over.
    #[arg(long)]
    restart: bool,
    #[command(flatten)]
    sbm: SbmArgs,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

#[derive(Args)]
struct SynthArgs {
    /// Category folder; normal sources are its train/good images.
    #[arg(long)]
    data: PathBuf,
    /// Texture images as anomaly sources (optional).
    #[arg(long)]
    textures: Option<PathBuf>,
    /// Number of images to write.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    count: u64,
    /// Output folder (test/synthetic/*.png, ground_truth/synthetic/*_mask.png).
    #[arg(long)]
    out: PathBuf,
    /// Replace a non-empty output folder as a whole (when the run succeeds).
    #[arg(long)]
    overwrite: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Restrict defects to the Otsu foreground (default: MVTec object categories).
    #[arg(long)]
    foreground: Option<bool>,
}

/// `paper` (resize 256, center crop 224), `anomalib` (resize 256, no crop), `whole[:N]`
/// (the whole image, aspect ratio kept, short side N, default 256), `native` (the images' own
/// size) or `WxH` (exactly W × H).
fn preprocess_arg(s: &str) -> Result<Preprocess, String> {
    let k = s.trim().to_ascii_lowercase();
    let side = |v: &str| -> Result<u32, String> {
        v.parse::<u32>()
            .ok()
            .filter(|n| (16..=16_384).contains(n))
            .ok_or_else(|| format!("'{v}' is not a size in pixels (16..=16384)"))
    };
    let p = match k.as_str() {
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
                    "'{s}': expected paper, anomalib, whole, whole:N, native or WxH (e.g. 256x640)"
                ));
            }
        }
    };
    Ok(p)
}

/// `N` or `N:OVERLAP` (pixels; the overlap defaults to N/8).
fn tile_arg(s: &str) -> Result<Tiling, String> {
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
struct Common {
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=4096))]
    batch_size: u64,
}

#[derive(Args)]
struct FitArgs {
    /// Dataset root (MVTec layout, or a folder with tessera-dataset.json).
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value = "padim", value_parser = named::<ScorerKind>(ScorerKind::NAMES))]
    scorer: ScorerKind,
    #[command(flatten)]
    backbone: BackboneArgs,
    /// baseline: the scorer on plain ImageNet features; sbm: SBM first (object categories,
    /// see --sbm), then the scorer on the tuned backbone; ours: the paper's "+ our method",
    /// SBM (object categories) + PFAM trained on the jigsaw task, the scorer reads PFAM's
    /// outputs.
    #[arg(long, default_value = "baseline", value_parser = named::<Method>(Method::NAMES))]
    method: Method,
    /// Seed of every random choice (PaDiM's channel subset, PatchCore's projection, CFA's
    /// initialisation, SBM).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// paper: resize 256, center crop 224; anomalib: resize 256, no crop; whole[:N]: the whole
    /// image, aspect ratio kept, short side N (256); native: the images' own size; WxH: exactly
    /// that size. Whole-image sizes are fixed from the first training image and stored.
    #[arg(long, default_value = "paper", value_parser = preprocess_arg)]
    preprocess: Preprocess,
    /// Score in overlapping square tiles of N px (overlap N/8, or N:OVERLAP), stitched into one
    /// map of the whole (resized) image: for large or elongated images.
    #[arg(long, value_name = "N[:OVERLAP]", value_parser = tile_arg)]
    tile: Option<Tiling>,
    /// normal: thresholds from held-out normal images (conformal, --target-fpr); synthetic:
    /// F1-optimal thresholds on synthetic defects pasted onto them (--textures as sources).
    #[arg(long, default_value = "normal", value_parser = named::<CalibrationMode>(CalibrationMode::NAMES))]
    calibrate: CalibrationMode,
    /// Fraction of the normal training images held out for calibration, never fitted on (0:
    /// calibrate on training images, without a guarantee).
    #[arg(long, default_value_t = 0.2, value_parser = float_in(0.0, 0.9, false))]
    calibration_fraction: f64,
    /// The false-alarm rate the image threshold must keep on normal parts.
    #[arg(long, default_value_t = 0.05, value_parser = float_in(0.0, 0.5, true))]
    target_fpr: f64,
    /// PaDiM: channels kept (default 100 for ResNet-18/34, 550 for wider backbones).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    padim_dims: Option<u64>,
    /// PatchCore: fraction of training patches kept in the memory bank (0 < r <= 1).
    #[arg(long, default_value_t = 0.1, value_parser = fraction)]
    coreset_ratio: f64,
    /// PatchCore: reduce patch features to this many channels (adaptive average pooling).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    patchcore_dim: Option<u64>,
    /// PatchCore: memory bank storage type.
    #[arg(long, default_value = "f32", value_parser = named::<BankDtype>(BankDtype::NAMES))]
    bank_dtype: BankDtype,
    /// PatchCore: reweight image scores with K nearest neighbours (paper eq.; off by default).
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..=1000))]
    patchcore_reweight: Option<u64>,
    /// CFA: training epochs.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    epochs: u64,
    /// CFA: stop early when the training loss has not improved for N epochs.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000))]
    patience: Option<u64>,
    /// CFA: descriptor compression γ_d (output channels = input / γ_d).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    cfa_gamma_d: u64,
    /// CFA: memory compression γ_c (k-means to grid positions / γ_c centres).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    cfa_gamma_c: u64,
    /// Model file to write (atomically).
    #[arg(long)]
    out: PathBuf,
    /// --method sbm|ours: on which categories SBM trains the backbone (with ours, PFAM trains
    /// everywhere; the backbone stays frozen where SBM does not apply).
    #[arg(long, default_value = "auto", value_parser = named::<SbmMode>(SbmMode::NAMES))]
    sbm: SbmMode,
    /// --method sbm|ours: use this tuned backbone (from `tessera sbm train [--pfam]`) instead
    /// of training.
    #[arg(long)]
    sbm_weights: Option<PathBuf>,
    /// Use SBM weights even if their jigsaw gate failed.
    #[arg(long)]
    sbm_force: bool,
    /// --method ours with --scorer cfa: how PFAM trains. `jigsaw` (default): in the SBM
    /// stage only; `cfa`: then also end to end with CFA's loss (PFAM is stored as trained).
    #[arg(long, default_value = "jigsaw", value_parser = named::<PfamTraining>(PfamTraining::NAMES))]
    pfam_train: PfamTraining,
    #[command(flatten)]
    sbm_args: SbmArgs,
    #[command(flatten)]
    common: Common,
}

impl FitArgs {
    fn scorer(&self) -> ScorerConfig {
        match self.scorer {
            ScorerKind::Padim => ScorerConfig::Padim(PadimConfig {
                dims: self.padim_dims.map(|d| d as usize),
                ..Default::default()
            }),
            ScorerKind::Patchcore => ScorerConfig::Patchcore(PatchcoreConfig {
                coreset_ratio: self.coreset_ratio,
                embed_dim: self.patchcore_dim.map(|d| d as usize),
                reweight_k: self.patchcore_reweight.map(|k| k as usize),
                bank_dtype: self.bank_dtype,
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

    fn options(&self) -> FitOptions {
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
            },
        }
    }
}

#[derive(Args)]
struct TestArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    data: PathBuf,
    /// Report JSON path; a Markdown report is written beside it (.md).
    #[arg(long)]
    report: PathBuf,
    /// Write one heatmap panel per test image into this folder.
    #[arg(long)]
    heatmaps: Option<PathBuf>,
    /// Replace a non-empty --heatmaps folder as a whole (when the run succeeds).
    #[arg(long)]
    overwrite: bool,
    /// Decide at this image threshold (and draw masks at it) instead of the model's.
    #[arg(long, value_parser = finite_f32)]
    threshold: Option<f32>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct PredictArgs {
    #[arg(long)]
    model: PathBuf,
    /// Image files and/or folders of images.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output folder for heatmaps (mirroring the inputs' paths) and scores.csv; it must be new
    /// or empty unless --overwrite.
    #[arg(long)]
    out: PathBuf,
    /// Replace a non-empty output folder as a whole (when the run succeeds).
    #[arg(long)]
    overwrite: bool,
    /// Also score the images in sub-folders of folder inputs.
    #[arg(long, short = 'r')]
    recursive: bool,
    /// Threshold for the anomalous flag and the predicted mask (default: the model's).
    #[arg(long, value_parser = finite_f32)]
    threshold: Option<f32>,
    #[command(flatten)]
    common: Common,
}

fn run(cli: Cli) -> Result<()> {
    let quiet = cli.quiet || cli.json;
    let bars = Bars::new(quiet);
    match cli.cmd {
        Cmd::Fit(a) => {
            let s = tessera_pipeline::fit(&a.options(), &bars)?;
            summary(cli.json, &bars, &s, |s| {
                let guarantee = match s.guaranteed_fpr {
                    Some(g) => format!(", false alarms on normal parts ≤ {:.1} %", g * 100.0),
                    None => String::new(),
                };
                format!(
                    "wrote {} ({} images fitted, {} held out for calibration, {:.1} s); image \
                     threshold {:.4}{guarantee}, pixel threshold {:.4}",
                    s.model.display(),
                    s.images,
                    s.calibration_images,
                    s.seconds,
                    s.threshold,
                    s.pixel_threshold
                )
            })?;
        }
        Cmd::Test(a) => {
            let opts = TestOptions {
                model: a.model,
                data: a.data,
                report: a.report,
                heatmaps: a.heatmaps,
                overwrite: a.overwrite,
                threshold: a.threshold,
                device: a.common.device,
                batch_size: a.common.batch_size as usize,
            };
            let r = tessera_pipeline::test(&opts, &bars)?;
            summary(cli.json, &bars, &r, |r| {
                let pct = |v: Option<f64>| {
                    v.map(|v| format!("{:.2}%", v * 100.0))
                        .unwrap_or_else(|| "n/a".into())
                };
                let at = r
                    .operating_point
                    .as_ref()
                    .map(|op| {
                        format!(
                            "\n  at the model's threshold {:.4}: false alarms {}/{} ({}), recall {}, precision {}",
                            op.image.threshold,
                            op.image.fp,
                            op.image.fp + op.image.tn,
                            pct(op.image.false_alarm_rate),
                            pct(op.image.recall),
                            pct(op.image.precision)
                        )
                    })
                    .unwrap_or_default();
                format!(
                    "image AUROC {}  pixel AUROC {}  pixel AUPRO {}  ({} images, {:.1} ms/image) → {}{at}",
                    pct(r.image_auroc),
                    pct(r.pixel_auroc),
                    pct(r.pixel_aupro),
                    r.counts.images,
                    r.ms_per_image,
                    opts.report.display()
                )
            })?;
        }
        Cmd::Predict(a) => {
            let opts = PredictOptions {
                model: a.model,
                inputs: a.inputs,
                out: a.out,
                overwrite: a.overwrite,
                recursive: a.recursive,
                threshold: a.threshold,
                device: a.common.device,
                batch_size: a.common.batch_size as usize,
            };
            // --json: one JSON line per image as it is scored, then the summary line.
            let mut each = |p: &tessera_pipeline::Prediction| {
                if cli.json {
                    if let Ok(line) = serde_json::to_string(p) {
                        println!("{line}");
                    }
                }
            };
            let s = tessera_pipeline::predict(&opts, &bars, &mut each)?;
            summary(cli.json, &bars, &s, |s| {
                format!(
                    "{} images, {} above the threshold {:.4} → {}",
                    s.images,
                    s.anomalous,
                    s.threshold,
                    s.scores_csv.display()
                )
            })?;
        }
        Cmd::Sbm(SbmCmd::Train(a)) => {
            let mut config = a.sbm.config(a.seed);
            if a.pfam {
                config.pfam = Some(Default::default());
            }
            let opts = SbmOptions {
                data: a.data,
                textures: a.sbm.textures.clone(),
                weights: a.backbone.weights(),
                out: a.out,
                config,
                foreground: a.foreground,
                no_synth: a.no_synth,
                preprocess: a.preprocess,
                device: a.device,
                restart: a.restart,
            };
            let s = tessera_pipeline::sbm_train(&opts, &bars)?;
            summary(cli.json, &bars, &s, |s| {
                format!(
                    "sbm: {:.1} s ({:.1} s/epoch); final drift l1/l2/l3 {:.3}/{:.3}/{:.3} → {}",
                    s.seconds,
                    s.report.seconds_per_epoch,
                    s.report.drift[0],
                    s.report.drift[1],
                    s.report.drift[2],
                    s.out.display()
                )
            })?;
            if !s.report.gate.passed {
                anyhow::bail!("SBM did not pass the jigsaw gate (see the warning above)");
            }
        }
        Cmd::Synth(a) => {
            let opts = SynthOptions {
                data: a.data,
                textures: a.textures,
                count: a.count as usize,
                out: a.out,
                seed: a.seed,
                foreground: a.foreground,
                overwrite: a.overwrite,
            };
            let s = tessera_pipeline::synth(&opts, &bars)?;
            summary(cli.json, &bars, &s, |s| {
                format!(
                    "wrote {} synthetic images ({} texture, {} structure sources) in {:.1} s \
                     ({:.1} images/s) → {}",
                    s.count,
                    s.texture_sources,
                    s.structure_sources,
                    s.seconds,
                    s.images_per_second,
                    opts.out.display()
                )
            })?;
        }
        Cmd::Gallery(a) => {
            let picked = tessera_pipeline::gallery(&a.heatmaps, a.rows as usize, &a.out)?;
            summary(cli.json, &bars, &picked, |p| {
                format!("{} images compared → {}", p.len(), a.out.display())
            })?;
        }
        Cmd::Data(DataCmd::Demo(a)) => {
            let spec = tessera_data::SyntheticSpec {
                seed: a.seed,
                size: a.size,
                train: a.train as usize,
                test_good: a.test_good as usize,
                test_defect: a.test_defect as usize,
            };
            let out = tessera_pipeline::demo_category(&a.out, &spec, a.overwrite)?;
            let info = tessera_pipeline::dataset_info(&out)?;
            summary(cli.json, &bars, &info, |i| {
                format!(
                    "wrote the synthetic category {} ({} training, {} test images, {} with defects)",
                    out.display(),
                    i.train_images,
                    i.test_images,
                    i.test_anomalous
                )
            })?;
        }
        Cmd::Data(DataCmd::Info(a)) => {
            let i = tessera_pipeline::dataset_info(&a.root)?;
            if cli.json {
                println!("{}", serde_json::to_string(&i)?);
            } else {
                println!(
                    "{}: category {} ({}), {} layout, {} training images, {} test images ({} anomalous)",
                    i.root.display(),
                    i.category,
                    i.kind.map_or("kind unknown".to_string(), |k| format!("{k:?}").to_lowercase()),
                    i.layout,
                    i.train_images,
                    i.test_images,
                    i.test_anomalous
                );
            }
        }
        Cmd::Data(DataCmd::Verify(a)) => {
            let manifest = tessera_data::verify::Manifest::resolve(a.manifest.as_deref())?;
            let depth = if a.quick {
                tessera_data::verify::Depth::Headers
            } else {
                tessera_data::verify::Depth::Decode
            };
            let r = tessera_data::verify::verify_with(
                &a.root,
                &manifest,
                a.categories.as_deref(),
                depth,
            )?;
            if cli.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print!("{}", verify_table::verify_table(&r));
            }
            if !r.ok {
                use tessera_data::verify::CategoryStatus as S;
                anyhow::bail!(
                    "{} does not match the {} manifest ({} of {} categories failed, {} missing; \
                     {} problems in all)",
                    r.root.display(),
                    r.manifest,
                    r.count(S::Failed),
                    r.categories.len(),
                    r.count(S::Missing),
                    r.all_issues().count()
                );
            }
        }
    }
    Ok(())
}

/// A command's result: the JSON summary on stdout with `--json`, else the human line on stderr
/// (unless quiet).
fn summary<T: serde::Serialize>(
    json: bool,
    bars: &Bars,
    value: &T,
    human: impl FnOnce(&T) -> String,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(value)?);
    } else {
        bars.say(&human(value));
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
