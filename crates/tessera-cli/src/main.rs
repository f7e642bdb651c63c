//! `tessera`: fit, test and predict industrial anomaly detectors. Argument parsing and wiring
//! only; the work is in the library crates.

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use tessera_backbone::Arch;
use tessera_cli::{
    DataVerifyOptions, FitOptions, PredictOptions, Progress, SbmMode, SbmOptions, ScorerKind,
    SynthOptions, TestOptions, WeightsArgs,
};
use tessera_core::model::Preprocess;
use tessera_core::DeviceSpec;

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Unsupervised visual anomaly detection on pretrained CNN features (PaDiM, PatchCore, CFA)"
)]
struct Cli {
    /// No progress bars or notes on stderr.
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
    Fit(FitArgs),
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
}

#[derive(Subcommand)]
enum DataCmd {
    /// Check a dataset (a root of category folders, or one category folder) against a
    /// manifest: categories present, image counts per split, a mask for every defective image,
    /// mask sizes, unreadable or stray files. Exit status 1 when anything is wrong.
    Verify(DataVerifyArgs),
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
}

#[derive(Subcommand)]
enum SbmCmd {
    /// Train SBM on a category's train/good images and write the tuned backbone (.safetensors,
    /// loadable with `fit --weights` or `fit --method sbm --sbm-weights`).
    Train(SbmTrainArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum SbmModeArg {
    /// Object categories only (MVTec AD split, or the folder spec's "category").
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
enum PfamTrainArg {
    Jigsaw,
    Cfa,
}

#[derive(Clone, Copy, ValueEnum)]
enum AnchorArg {
    Features,
    L2sp,
    None,
}

#[derive(Clone, Copy, ValueEnum)]
enum OptimArg {
    Sgd,
    Adamw,
}

/// SBM training settings (defaults: the ablation's choice, docs/sbm.md).
#[derive(Args)]
struct SbmArgs {
    /// SBM epochs.
    #[arg(long)]
    sbm_epochs: Option<usize>,
    /// Backbone layers SBM trains, e.g. 3 or 2,3 or 1,2,3; `none` keeps the backbone frozen
    /// (with --pfam / --method ours: PFAM alone trains).
    #[arg(long, value_parser = parse_layers)]
    sbm_layers: Option<Layers>,
    /// Anchoring against forgetting ImageNet.
    #[arg(long, value_enum)]
    sbm_anchor: Option<AnchorArg>,
    /// Weight λ of the anchoring term.
    #[arg(long)]
    sbm_anchor_weight: Option<f64>,
    /// Backbone learning rate.
    #[arg(long)]
    sbm_lr: Option<f64>,
    /// Jigsaw head learning rate.
    #[arg(long)]
    sbm_head_lr: Option<f64>,
    #[arg(long, value_enum)]
    sbm_optimizer: Option<OptimArg>,
    /// Tiles per side of the jigsaw grid.
    #[arg(long)]
    sbm_grid: Option<usize>,
    /// Number of non-identity permutations.
    #[arg(long)]
    sbm_permutations: Option<usize>,
    /// Probability of showing the identity (default: uniform over all classes).
    #[arg(long)]
    sbm_identity_prob: Option<f64>,
    /// Probability that a training input carries a synthetic defect.
    #[arg(long)]
    sbm_synth_prob: Option<f64>,
    /// Images per SBM training step.
    #[arg(long)]
    sbm_batch_size: Option<usize>,
    /// Texture images (e.g. DTD) as anomaly sources for synthetic defects; without it, the
    /// structure source only.
    #[arg(long)]
    textures: Option<PathBuf>,
}

/// A list of backbone layers (`none` = empty).
#[derive(Clone, Debug)]
struct Layers(Vec<usize>);

fn parse_layers(s: &str) -> Result<Layers, String> {
    if s.trim().eq_ignore_ascii_case("none") || s.trim().is_empty() {
        return Ok(Layers(Vec::new()));
    }
    s.split(',')
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .map_err(|_| format!("'{p}' is not a layer number (1, 2 or 3)"))
        })
        .collect::<Result<_, _>>()
        .map(Layers)
}

impl SbmArgs {
    fn config(&self, seed: u64) -> tessera_sbm::SbmConfig {
        let d = tessera_sbm::SbmConfig::default();
        tessera_sbm::SbmConfig {
            epochs: self.sbm_epochs.unwrap_or(d.epochs),
            train_layers: self
                .sbm_layers
                .clone()
                .map(|l| l.0)
                .unwrap_or(d.train_layers.clone()),
            anchor: match self.sbm_anchor {
                None => d.anchor,
                Some(AnchorArg::Features) => tessera_sbm::Anchor::Features,
                Some(AnchorArg::L2sp) => tessera_sbm::Anchor::L2Sp,
                Some(AnchorArg::None) => tessera_sbm::Anchor::None,
            },
            anchor_weight: self.sbm_anchor_weight.unwrap_or(d.anchor_weight),
            lr_backbone: self.sbm_lr.unwrap_or(d.lr_backbone),
            lr_head: self.sbm_head_lr.unwrap_or(d.lr_head),
            optimizer: match self.sbm_optimizer {
                None => d.optimizer,
                Some(OptimArg::Sgd) => tessera_sbm::OptimizerKind::Sgd,
                Some(OptimArg::Adamw) => tessera_sbm::OptimizerKind::Adamw,
            },
            grid: self.sbm_grid.unwrap_or(d.grid),
            permutations: self.sbm_permutations.unwrap_or(d.permutations),
            identity_prob: self.sbm_identity_prob.or(d.identity_prob),
            synth_prob: self.sbm_synth_prob.unwrap_or(d.synth_prob),
            batch_size: self.sbm_batch_size.unwrap_or(d.batch_size),
            seed,
            ..d
        }
    }
}

#[derive(Args)]
struct SbmTrainArgs {
    /// Category folder (MVTec layout or tessera-dataset.json); its train/good images are used.
    #[arg(long)]
    data: PathBuf,
    /// resnet18, resnet34, resnet50 or wide_resnet50_2.
    #[arg(long, default_value = "resnet18")]
    backbone: Arch,
    /// Starting weights (local .safetensors); without it, the Hugging Face hub.
    #[arg(long)]
    weights: Option<PathBuf>,
    #[arg(long, conflicts_with = "weights")]
    hub_repo: Option<String>,
    #[arg(long, conflicts_with_all = ["weights", "hub_repo"])]
    random_weights: Option<u64>,
    /// Tuned backbone to write (a checkpoint `<out>.ckpt` is kept while training; a rerun
    /// resumes from it).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "paper")]
    preprocess: PreprocessArg,
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
    #[arg(long, default_value_t = 16)]
    count: usize,
    /// Output folder (test/synthetic/*.png, ground_truth/synthetic/*_mask.png).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Restrict defects to the Otsu foreground (default: MVTec object categories).
    #[arg(long)]
    foreground: Option<bool>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScorerArg {
    Padim,
    Patchcore,
    Cfa,
}

#[derive(Clone, Copy, ValueEnum)]
enum BankDtypeArg {
    F32,
    F16,
}

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    /// The scorer on plain ImageNet features.
    Baseline,
    /// SBM first (object categories, see --sbm), then the scorer on the tuned backbone.
    Sbm,
    /// The paper's "+ our method": SBM (object categories) + PFAM trained on the jigsaw task;
    /// the scorer reads PFAM's outputs.
    Ours,
}

#[derive(Clone, Copy, ValueEnum)]
enum PreprocessArg {
    /// Resize 256, center crop 224 (the paper).
    Paper,
    /// Resize 256, no crop (anomalib).
    Anomalib,
}

impl PreprocessArg {
    fn preprocess(self) -> Preprocess {
        match self {
            PreprocessArg::Paper => Preprocess::paper(),
            PreprocessArg::Anomalib => Preprocess::anomalib(),
        }
    }
}

#[derive(Args)]
struct Common {
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
}

#[derive(Args)]
struct FitArgs {
    /// Dataset root (MVTec layout, or a folder with tessera-dataset.json).
    #[arg(long)]
    data: PathBuf,
    #[arg(long, value_enum, default_value = "padim")]
    scorer: ScorerArg,
    /// resnet18, resnet34, resnet50 or wide_resnet50_2.
    #[arg(long, default_value = "resnet18")]
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
    #[arg(long, value_enum, default_value = "baseline")]
    method: MethodArg,
    /// Seed of every random choice (PaDiM's channel subset).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "paper")]
    preprocess: PreprocessArg,
    /// PaDiM: channels kept (default 100 for ResNet-18/34, 550 for wider backbones).
    #[arg(long)]
    padim_dims: Option<usize>,
    /// PatchCore: fraction of training patches kept in the memory bank (0 < r <= 1).
    #[arg(long, default_value_t = 0.1)]
    coreset_ratio: f64,
    /// PatchCore: reduce patch features to this many channels (adaptive average pooling).
    #[arg(long)]
    patchcore_dim: Option<usize>,
    /// PatchCore: memory bank storage type.
    #[arg(long, value_enum, default_value = "f32")]
    bank_dtype: BankDtypeArg,
    /// PatchCore: reweight image scores with K nearest neighbours (paper eq.; off by default).
    #[arg(long, value_name = "K")]
    patchcore_reweight: Option<usize>,
    /// CFA: training epochs.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// CFA: stop early when the training loss has not improved for N epochs.
    #[arg(long, value_name = "N")]
    patience: Option<usize>,
    /// CFA: descriptor compression γ_d (output channels = input / γ_d).
    #[arg(long, default_value_t = 1)]
    cfa_gamma_d: usize,
    /// CFA: memory compression γ_c (k-means to grid positions / γ_c centres).
    #[arg(long, default_value_t = 1)]
    cfa_gamma_c: usize,
    /// Model file to write (atomically).
    #[arg(long)]
    out: PathBuf,
    /// --method sbm|ours: on which categories SBM trains the backbone (with ours, PFAM trains
    /// everywhere; the backbone stays frozen where SBM does not apply).
    #[arg(long, value_enum, default_value = "auto")]
    sbm: SbmModeArg,
    /// --method sbm|ours: use this tuned backbone (from `tessera sbm train [--pfam]`) instead
    /// of training.
    #[arg(long)]
    sbm_weights: Option<PathBuf>,
    /// Use SBM weights even if their jigsaw gate failed.
    #[arg(long)]
    sbm_force: bool,
    /// --method ours with --scorer cfa: how PFAM trains. `jigsaw` (default): in the SBM
    /// stage only; `cfa`: then also end to end with CFA's loss (PFAM is stored as trained).
    #[arg(long, value_enum, default_value = "jigsaw")]
    pfam_train: PfamTrainArg,
    #[command(flatten)]
    sbm_args: SbmArgs,
    #[command(flatten)]
    common: Common,
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
    /// Write one heatmap panel per test image here.
    #[arg(long)]
    heatmaps: Option<PathBuf>,
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
    /// Output folder for heatmaps and scores.csv.
    #[arg(long)]
    out: PathBuf,
    /// Pixel threshold for masks and the anomalous flag (default: the model's, the highest
    /// score seen on training images).
    #[arg(long)]
    threshold: Option<f32>,
    #[command(flatten)]
    common: Common,
}

fn run(cli: Cli) -> Result<()> {
    let progress = Progress {
        quiet: cli.quiet || cli.json,
    };
    match cli.cmd {
        Cmd::Fit(a) => {
            let opts = FitOptions {
                data: a.data,
                scorer: match a.scorer {
                    ScorerArg::Padim => ScorerKind::Padim,
                    ScorerArg::Patchcore => ScorerKind::Patchcore,
                    ScorerArg::Cfa => ScorerKind::Cfa,
                },
                backbone: a.backbone,
                weights: a.weights,
                hub_repo: a.hub_repo,
                random_weights: a.random_weights,
                method: match a.method {
                    MethodArg::Baseline => "baseline".into(),
                    MethodArg::Sbm => "sbm".into(),
                    MethodArg::Ours => "ours".into(),
                },
                sbm: match a.sbm {
                    SbmModeArg::Auto => SbmMode::Auto,
                    SbmModeArg::On => SbmMode::On,
                    SbmModeArg::Off => SbmMode::Off,
                },
                sbm_weights: a.sbm_weights,
                sbm_force: a.sbm_force,
                sbm_config: a.sbm_args.config(a.seed),
                textures: a.sbm_args.textures.clone(),
                pfam_train_cfa: matches!(a.pfam_train, PfamTrainArg::Cfa),
                seed: a.seed,
                device: a.common.device,
                out: a.out,
                preprocess: a.preprocess.preprocess(),
                batch_size: a.common.batch_size,
                padim_dims: a.padim_dims,
                coreset_ratio: a.coreset_ratio,
                patchcore_dim: a.patchcore_dim,
                bank_dtype: match a.bank_dtype {
                    BankDtypeArg::F32 => tessera_patchcore::BankDtype::F32,
                    BankDtypeArg::F16 => tessera_patchcore::BankDtype::F16,
                },
                reweight_k: a.patchcore_reweight,
                epochs: a.epochs,
                patience: a.patience,
                cfa_gamma_d: a.cfa_gamma_d,
                cfa_gamma_c: a.cfa_gamma_c,
                progress,
            };
            let s = tessera_cli::fit(&opts)?;
            summary(cli.json, progress, &s, |s| {
                format!(
                    "wrote {} ({} images, {:.1} s, default pixel threshold {:.3})",
                    s.model.display(),
                    s.images,
                    s.seconds,
                    s.threshold
                )
            })?;
        }
        Cmd::Test(a) => {
            let opts = TestOptions {
                model: a.model,
                data: a.data,
                report: a.report,
                heatmaps: a.heatmaps,
                device: a.common.device,
                batch_size: a.common.batch_size,
                progress,
            };
            let r = tessera_cli::test(&opts)?;
            summary(cli.json, progress, &r, |r| {
                let pct = |v: Option<f64>| {
                    v.map(|v| format!("{:.2}%", v * 100.0))
                        .unwrap_or_else(|| "n/a".into())
                };
                format!(
                    "image AUROC {}  pixel AUROC {}  pixel AUPRO {}  ({} images, {:.1} ms/image) → {}",
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
                threshold: a.threshold,
                device: a.common.device,
                batch_size: a.common.batch_size,
                progress,
            };
            let s = tessera_cli::predict(&opts)?;
            summary(cli.json, progress, &s, |s| {
                format!(
                    "{} images, {} at or above threshold {:.3} → {}",
                    s.images,
                    s.anomalous,
                    s.threshold,
                    s.scores_csv.display()
                )
            })?;
        }
        Cmd::Sbm(SbmCmd::Train(a)) => {
            let opts = SbmOptions {
                data: a.data,
                textures: a.sbm.textures.clone(),
                weights: WeightsArgs {
                    backbone: a.backbone,
                    weights: a.weights,
                    hub_repo: a.hub_repo,
                    random_weights: a.random_weights,
                },
                out: a.out,
                config: {
                    let mut c = a.sbm.config(a.seed);
                    if a.pfam {
                        c.pfam = Some(Default::default());
                    }
                    c
                },
                foreground: a.foreground,
                no_synth: a.no_synth,
                preprocess: a.preprocess.preprocess(),
                device: a.device,
                restart: a.restart,
                progress,
            };
            let s = tessera_cli::sbm_train(&opts)?;
            summary(cli.json, progress, &s, |s| {
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
                count: a.count,
                out: a.out,
                seed: a.seed,
                foreground: a.foreground,
                progress,
            };
            let s = tessera_cli::synth(&opts)?;
            summary(cli.json, progress, &s, |s| {
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
        Cmd::Data(DataCmd::Verify(a)) => {
            let opts = DataVerifyOptions {
                root: a.root,
                manifest: a.manifest,
                categories: a.categories,
            };
            let r = tessera_cli::data_verify(&opts)?;
            if cli.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print!("{}", tessera_cli::verify_table(&r));
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
    progress: Progress,
    value: &T,
    human: impl FnOnce(&T) -> String,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(value)?);
    } else {
        progress.note(human(value));
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
