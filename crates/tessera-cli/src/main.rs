//! `tessera`: fit, test and predict industrial anomaly detectors. Argument parsing and wiring
//! only; the work is in the library crates.

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use tessera_backbone::Arch;
use tessera_cli::{FitOptions, PredictOptions, Progress, ScorerKind, TestOptions};
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
}

#[derive(Clone, Copy, ValueEnum)]
enum PreprocessArg {
    /// Resize 256, center crop 224 (the paper).
    Paper,
    /// Resize 256, no crop (anomalib).
    Anomalib,
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
                },
                seed: a.seed,
                device: a.common.device,
                out: a.out,
                preprocess: match a.preprocess {
                    PreprocessArg::Paper => Preprocess::paper(),
                    PreprocessArg::Anomalib => Preprocess::anomalib(),
                },
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
            if cli.json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                progress.note(format!(
                    "wrote {} ({} images, {:.1} s, default pixel threshold {:.3})",
                    s.model.display(),
                    s.images,
                    s.seconds,
                    s.threshold
                ));
            }
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
            if cli.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let pct = |v: Option<f64>| {
                    v.map(|v| format!("{:.2}%", v * 100.0))
                        .unwrap_or_else(|| "n/a".into())
                };
                progress.note(format!(
                    "image AUROC {}  pixel AUROC {}  ({} images, {:.1} ms/image) → {}",
                    pct(r.image_auroc),
                    pct(r.pixel_auroc),
                    r.counts.images,
                    r.ms_per_image,
                    opts.report.display()
                ));
            }
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
            if cli.json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                progress.note(format!(
                    "{} images, {} at or above threshold {:.3} → {}",
                    s.images,
                    s.anomalous,
                    s.threshold,
                    s.scores_csv.display()
                ));
            }
        }
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
