//! Project automation, run as `cargo xtask <task>` (alias in `.cargo/config.toml`).
//!
//! - `demo`: the main job end to end on a built-in default — a synthetic MVTec-layout category
//!   generated deterministically, fit, test, heatmaps and the report. No network, no dataset.
//! - `reproduce`: the paper's Table 1 and Table 2 (baseline vs + method), resumable.
//! - `cuda-build`: the `cuda` feature built without a GPU (CUDA 13.0 toolkit from PyPI wheels).
//! - `real-check`: CI's real-data gate on `../shared` (skipped, loudly, when absent).
//! - `bench`: the performance numbers of `docs/performance.md` — criterion ms/image for features
//!   and PaDiM scoring (batch 1 and 8), fit time, test ms/image and peak RSS on `../shared` bottle
//!   (PaDiM, PatchCore, CFA, Wide-ResNet-50-2 PaDiM), and the same work in PyTorch when it is
//!   installed; the backbone in OpenVINO when it is.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

mod bench_serve;
mod cuda;
mod reports;
mod reproduce;

const USAGE: &str = "usage: cargo xtask <demo|bench|real-check|reproduce|cuda-build> [options]

  demo  [--out DIR] [--weights FILE] [--seed N]
        Generate a synthetic category, fit PaDiM, test it, write heatmaps and the report.
        Uses --weights when given, else ImageNet ResNet-18 weights from the Hugging Face hub
        cache if present, else a seeded random backbone (and says so).
  bench serve [--shared DIR] [--requests N]
        tessera serve on loopback: images/s and p50/p99 latency at concurrency 1, 4, 16 with and
        without batching, beside tessera predict; a 4x overload burst (503 rate, memory).
  bench [--shared DIR] [--skip-criterion] [--skip-torch] [--skip-openvino] [--python PY]
        Criterion benches (features + PaDiM ms/image at batch 1 and 8, coreset, 1-NN, PFAM,
        convolutions, evaluation, preprocessing); fit/test time, peak RSS, model size and AUROC
        for PaDiM, PatchCore (10 %, 1 %, brute force, f16 bank), CFA (3 epochs) and
        Wide-ResNet-50-2 PaDiM (random weights: memory and time) on ../shared bottle; PyTorch's time for the same work when torch is installed, and
        OpenVINO's for the backbone (f32 and its default precision) when openvino is; PY
        (default python3) runs both.
  real-check [--shared DIR] [--profile release|dev]
        CI's real-data gate: PaDiM + ResNet-18 on ../shared bottle must reach image AUROC
        >= 0.990 and pixel AUROC >= 0.975. Says SKIPPED (exit 0) when ../shared is absent.
";

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(task) = args.first() else {
        println!("{USAGE}{}\n{}", reproduce::USAGE, cuda::USAGE);
        return Ok(());
    };
    let rest = &args[1..];
    match task.as_str() {
        "demo" => demo(rest),
        "bench" => bench(rest),
        "real-check" => real_check(rest),
        "cuda-build" => cuda::cuda_build(&root(), rest),
        "reproduce" => reproduce::reproduce(rest),
        "-h" | "--help" | "help" => {
            println!("{USAGE}{}\n{}", reproduce::USAGE, cuda::USAGE);
            Ok(())
        }
        other => bail!(
            "unknown task '{other}'\n{USAGE}{}\n{}",
            reproduce::USAGE,
            cuda::USAGE
        ),
    }
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Build the release `tessera` binary and return its path, as cargo reports it (so a
/// `CARGO_TARGET_DIR` or `build.target-dir` elsewhere is honoured).
fn build_tessera() -> Result<PathBuf> {
    build_tessera_with(&[])
}

/// [`build_tessera`] with extra cargo arguments (e.g. features).
fn build_tessera_with(extra: &[&str]) -> Result<PathBuf> {
    build_tessera_profile("release", extra)
}

/// The `tessera` binary built with a cargo profile (`release`, or `dev`: what `cargo test`
/// already built, dependencies optimised).
fn build_tessera_profile(profile: &str, extra: &[&str]) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args([
            "build",
            "--profile",
            profile,
            "-p",
            "tessera-cli",
            "--bin",
            "tessera",
            "--message-format=json-render-diagnostics",
        ])
        .args(extra)
        .current_dir(root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {cargo} build"))?;
    if !out.status.success() {
        bail!("cargo build --profile {profile} -p tessera-cli failed");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let bin = built_executable(&stdout, "tessera").context(
        "cargo build succeeded but reported no `tessera` executable (its JSON messages name none)",
    )?;
    if !bin.is_file() {
        bail!(
            "cargo reported the tessera binary at {}, but there is no file there",
            bin.display()
        );
    }
    Ok(bin)
}

/// Cargo's target directory for this workspace (`cargo metadata`; honours
/// `CARGO_TARGET_DIR` and `build.target-dir`).
fn target_dir() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(root())
        .output()
        .with_context(|| format!("running {cargo} metadata"))?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata names no target_directory")
}

/// The executable of binary target `name` in cargo's `--message-format=json` output.
fn built_executable(messages: &str, name: &str) -> Option<PathBuf> {
    messages
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

/// Outcome of a child process: status, stdout, stderr, wall seconds, peak RSS (MiB).
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
    seconds: f64,
    peak_rss_mib: f64,
}

/// Run a command, measuring wall time and peak resident memory (wait4's ru_maxrss).
fn measured(cmd: &mut Command) -> Result<Run> {
    use std::io::Read;
    let start = Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: plain FFI call with valid pointers; the child is ours and not waited on elsewhere.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r != pid {
        bail!("wait4 failed for {cmd:?}");
    }
    let seconds = start.elapsed().as_secs_f64();
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    Ok(Run {
        ok,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
        seconds,
        peak_rss_mib: usage.ru_maxrss as f64 / 1024.0,
    })
}

fn demo(args: &[String]) -> Result<()> {
    let out = PathBuf::from(flag(args, "--out").unwrap_or_else(|| "demo-out".into()));
    let seed: u64 = flag(args, "--seed")
        .map(|s| s.parse())
        .transpose()
        .context("--seed")?
        .unwrap_or(0);
    let weights = flag(args, "--weights");
    let data = out.join("data/synthetic_ring");
    let bin = build_tessera()?;
    println!(
        "demo: generating a synthetic category in {} (seed {seed})",
        data.display()
    );
    let st = Command::new(&bin)
        .args([
            "--quiet",
            "data",
            "demo",
            "--overwrite",
            "--seed",
            &seed.to_string(),
            "--out",
        ])
        .arg(&data)
        .status()
        .context("running tessera data demo")?;
    if !st.success() {
        bail!("tessera data demo failed");
    }
    let model = out.join("model.safetensors");
    let s = |p: &Path| p.display().to_string();
    let mut fit_args = vec![
        "fit".to_string(),
        "--data".into(),
        s(&data),
        "--out".into(),
        s(&model),
    ];
    fit_args.extend(["--seed".into(), seed.to_string()]);
    let backbone_note;
    if let Some(w) = &weights {
        fit_args.extend(["--weights".into(), w.clone()]);
        backbone_note = format!("ImageNet weights from {w}");
    } else {
        // Try the hub cache only: the demo never needs a network.
        let probe = Command::new(&bin)
            .args(&fit_args)
            .env("HF_HUB_OFFLINE", "1")
            .stderr(std::process::Stdio::piped())
            .output()
            .context("running tessera fit")?;
        let probe_err = String::from_utf8_lossy(&probe.stderr);
        if !probe.status.success() && !probe_err.contains("hub cache") {
            // Not the expected "weights not cached": a real failure, show it.
            bail!("tessera fit failed:\n{probe_err}");
        }
        if probe.status.success() {
            backbone_note = "ImageNet ResNet-18 weights from the Hugging Face hub cache".into();
            fit_args.clear();
        } else {
            println!(
                "\ndemo: NOTE — no --weights given and no ResNet-18 weights in the Hugging Face hub \
                 cache, so the demo FALLS BACK TO A SEEDED RANDOM BACKBONE (no ImageNet knowledge).\n\
                 The pipeline is the real one; the numbers are not comparable to the paper's.\n"
            );
            fit_args.extend(["--random-weights".into(), seed.to_string()]);
            backbone_note = format!("a seeded random backbone (seed {seed})");
        }
    }
    if !fit_args.is_empty() {
        let st = Command::new(&bin)
            .args(&fit_args)
            .status()
            .context("running tessera fit")?;
        if !st.success() {
            bail!("tessera fit failed");
        }
    }
    let report = out.join("report.json");
    let heat = out.join("heatmaps");
    let st = Command::new(&bin)
        .args([
            "test",
            "--overwrite",
            "--model",
            &s(&model),
            "--data",
            &s(&data),
            "--report",
            &s(&report),
            "--heatmaps",
            &s(&heat),
        ])
        .status()
        .context("running tessera test")?;
    if !st.success() {
        bail!("tessera test failed");
    }
    let r: reports::TestReport = reports::read(&report)?;
    println!("\ndemo done with {backbone_note}:");
    println!(
        "  image AUROC {:.4}, pixel AUROC {:.4}",
        r.image_auroc.unwrap_or(f64::NAN),
        r.pixel_auroc.unwrap_or(f64::NAN)
    );
    println!("  model     {}", model.display());
    println!("  report    {} (+ .md)", report.display());
    println!("  heatmaps  {}/<type>/<image>.png", heat.display());
    Ok(())
}

/// The real data the gate and the benches run on: `../shared` (or `--shared DIR`) bottle and
/// the ResNet-18 ImageNet weights.
pub(crate) struct RealData {
    pub(crate) bottle: PathBuf,
    pub(crate) weights: PathBuf,
}

impl RealData {
    pub(crate) fn from_args(args: &[String]) -> Self {
        let shared = flag(args, "--shared")
            .map(PathBuf::from)
            .unwrap_or_else(|| root().join("../shared"));
        Self {
            bottle: shared.join("data/mvtec_ad/bottle"),
            weights: shared.join("weights/resnet18-imagenet1k-l3.safetensors"),
        }
    }

    /// Why the data cannot be used (naming both paths), or `None` when it is there.
    pub(crate) fn absent(&self) -> Option<String> {
        (!self.bottle.is_dir() || !self.weights.is_file()).then(|| {
            format!(
                "{} or {} is absent",
                self.bottle.display(),
                self.weights.display()
            )
        })
    }
}

fn bench(args: &[String]) -> Result<()> {
    if args.first().map(String::as_str) == Some("serve") {
        return bench_serve::bench_serve(&args[1..]);
    }
    let real = RealData::from_args(args);
    let skip_criterion = args.iter().any(|a| a == "--skip-criterion");
    let skip_torch = args.iter().any(|a| a == "--skip-torch");
    let skip_openvino = args.iter().any(|a| a == "--skip-openvino");
    let python = flag(args, "--python").unwrap_or_else(|| "python3".into());
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("bench: {threads} threads available");
    let mut lines = Rows::default();
    // criterion means (ms, per image for features) and PyTorch's, for the ratio rows.
    let mut measured_ms = std::collections::HashMap::<String, f64>::new();
    if !skip_criterion {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        for (pkg, bench) in [
            ("tessera-pipeline", "pipeline"),
            ("tessera-padim", "mahalanobis"),
            ("tessera-patchcore", "coreset"),
            ("tessera-pfam", "pfam"),
            ("tessera-conv", "conv"),
            ("tessera-backbone", "features"),
            ("tessera-eval", "evaluate"),
            ("tessera-data", "preprocess"),
        ] {
            let st = Command::new(&cargo)
                .args(["bench", "-p", pkg, "--bench", bench])
                .current_dir(root())
                .status()
                .context("running cargo bench")?;
            if !st.success() {
                bail!("cargo bench -p {pkg} failed");
            }
        }
        let mut entries: Vec<(String, String, f64)> = [
            ("r18_features_padim", "batch1", 1.0),
            ("r18_features_padim", "batch8", 8.0),
            ("padim_after_features", "batch1", 1.0),
            ("padim_after_features", "batch8", 8.0),
            ("padim_all_after_features", "batch1", 1.0),
            ("padim_all_after_features", "batch8", 8.0),
            ("mahalanobis", "f32_d100_p3136_b1", 1.0),
            ("mahalanobis", "f32_d100_p3136_b8", 1.0),
            ("mahalanobis", "f16_d100_p3136_b8", 1.0),
            ("mahalanobis", "read_f32_d100_p3136_b8", 1.0),
            ("mahalanobis", "f32_d550_p256_b8", 1.0),
            ("mahalanobis", "f16_d550_p256_b8", 1.0),
            ("mahalanobis", "f32_d448_p3136_tie4_b8", 1.0),
            ("mahalanobis", "f16_d448_p3136_tie4_b8", 1.0),
            ("coreset_20k_128d", "ratio_0.1", 1.0),
            ("coreset_20k_128d", "ratio_0.01", 1.0),
            ("nearest_784x16k_384d", "gemm_1024_square", 1.0),
            ("nearest_784x16k_384d", "gemm_784x384x16386", 1.0),
            ("nearest_784x16k_384d", "chunk4096", 1.0),
            ("nearest_784x16k_384d", "exact_noise", 1.0),
            ("nearest_784x16k_384d", "chunk4096_clustered", 1.0),
            ("nearest_784x16k_384d", "exact_clustered", 1.0),
            ("nearest_784x16k_384d", "approx4_clustered", 1.0),
            ("pfam_r18_224", "forward_batch1", 1.0),
            ("pfam_r18_224", "forward_batch8", 8.0),
            ("pfam_r18_224", "attention_x1_fused", 1.0),
            ("pfam_r18_224", "attention_x1_chunked512", 1.0),
            ("features_r18", "tessera_batch1", 1.0),
            ("features_r18", "tessera_batch8", 8.0),
            ("features_r18", "tessera_bf16_batch1", 1.0),
            ("features_r18", "tessera_bf16_batch8", 8.0),
            ("features_r18", "candle_batch1", 1.0),
            ("features_r18", "candle_batch8", 8.0),
            ("features_wrn50", "tessera_batch1", 1.0),
            ("features_wrn50", "tessera_batch8", 8.0),
            ("features_wrn50", "tessera_bf16_batch1", 1.0),
            ("features_wrn50", "tessera_bf16_batch8", 8.0),
            ("features_wrn50", "candle_batch8", 8.0),
            ("train_step_r18_b8", "tessera", 1.0),
            ("train_step_r18_b8", "tessera_nchw", 1.0),
            ("train_step_r18_b8", "candle", 1.0),
        ]
        .iter()
        .map(|(g, n, p)| (g.to_string(), n.to_string(), *p))
        .collect();
        for shape in [
            "3x224->64_k7s2",
            "64x56->64_k3s1",
            "64x56->128_k3s2",
            "128x28->128_k3s1",
            "64x56->128_k1s2",
            "128x28->256_k3s2",
            "256x14->256_k3s1",
        ] {
            for v in ["packed", "tessera", "candle"] {
                entries.push(("conv_r18_shapes_b8".into(), format!("{shape}/{v}"), 1.0));
            }
        }
        for (group, name, per) in entries {
            // criterion's folder names replace characters such as '/' and '>' by '_'.
            let dir: String = name
                .chars()
                .map(|c| if "?\"/\\*<>:|^".contains(c) { '_' } else { c })
                .collect();
            let est = target_dir()?.join(format!("criterion/{group}/{dir}/new/estimates.json"));
            if let Ok(text) = std::fs::read_to_string(&est) {
                let v: serde_json::Value = serde_json::from_str(&text)?;
                let ns = v["mean"]["point_estimate"].as_f64().unwrap_or(f64::NAN);
                let unit = if group.contains("features") || group.starts_with("pfam") {
                    "ms/image"
                } else {
                    "ms"
                };
                let ms = ns / 1e6 / per;
                measured_ms.insert(format!("{group}/{name}"), ms);
                lines.push(format!("| criterion {group}/{name} | {ms:.1} {unit} |"));
            }
        }
    }
    let absent = real.absent();
    if absent.is_none() {
        let (bottle, weights) = (real.bottle.clone(), real.weights.clone());
        let bin = build_tessera()?;
        let tmp = std::env::temp_dir().join(format!("tessera-bench-{}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        let s = |p: &Path| p.display().to_string();
        let runs: [(&str, &[&str]); 10] = [
            ("PaDiM", &["--scorer", "padim"]),
            (
                "PaDiM, Σ⁻¹ in f16",
                &["--scorer", "padim", "--padim-cov-dtype", "f16"],
            ),
            // The same run on candle's stock conv2d: the AUROC must not move.
            (
                "PaDiM, candle stock conv (TESSERA_CONV=stock)",
                &["--scorer", "padim"],
            ),
            (
                "PatchCore 10 %",
                &["--scorer", "patchcore", "--coreset-ratio", "0.1"],
            ),
            (
                "PatchCore 1 %",
                &["--scorer", "patchcore", "--coreset-ratio", "0.01"],
            ),
            (
                "PatchCore 10 %, brute-force search",
                &[
                    "--scorer",
                    "patchcore",
                    "--coreset-ratio",
                    "0.1",
                    "--patchcore-search",
                    "brute",
                ],
            ),
            (
                "PatchCore 10 % f16 bank",
                &[
                    "--scorer",
                    "patchcore",
                    "--coreset-ratio",
                    "0.1",
                    "--bank-dtype",
                    "f16",
                ],
            ),
            // Three epochs keep the bench bounded (the reference trains 30); s/epoch is reported.
            ("CFA, 3 epochs", &["--scorer", "cfa", "--epochs", "3"]),
            // The paper's own backbone (d = 550): memory and scoring time. There are no
            // ImageNet Wide-ResNet-50-2 weights here; neither depends on the weights' values,
            // so seeded random ones stand in (its AUROC is not a result).
            (
                "PaDiM Wide-ResNet-50-2 (random weights)",
                &[
                    "--scorer",
                    "padim",
                    "--backbone",
                    "wide_resnet50_2",
                    "--random-weights",
                    "0",
                ],
            ),
            (
                "PaDiM Wide-ResNet-50-2 (random weights), Σ⁻¹ in f16",
                &[
                    "--scorer",
                    "padim",
                    "--backbone",
                    "wide_resnet50_2",
                    "--random-weights",
                    "0",
                    "--padim-cov-dtype",
                    "f16",
                ],
            ),
        ];
        for (label, extra) in runs {
            let model = tmp.join("bottle.safetensors");
            let mut fit_args = vec!["--json", "fit"];
            fit_args.extend_from_slice(extra);
            let (b, w, m) = (s(&bottle), s(&weights), s(&model));
            fit_args.extend(["--data", &b, "--out", &m]);
            if !extra.contains(&"--random-weights") {
                fit_args.extend(["--weights", &w]);
            }
            let stock = label.contains("TESSERA_CONV=stock");
            let env = ("TESSERA_CONV", if stock { "stock" } else { "tessera" });
            let fit = measured(Command::new(&bin).args(&fit_args).env(env.0, env.1))?;
            if !fit.ok {
                bail!("{label}: fit failed: {}", fit.stderr);
            }
            let f: reports::FitSummary = serde_json::from_str(&fit.stdout)?;
            let report = tmp.join("report.json");
            let test = measured(Command::new(&bin).env(env.0, env.1).args([
                "--json",
                "test",
                "--model",
                &m,
                "--data",
                &b,
                "--report",
                &s(&report),
            ]))?;
            if !test.ok {
                bail!("{label}: test failed: {}", test.stderr);
            }
            let r: reports::TestReport = serde_json::from_str(&test.stdout)?;
            let num = |v: Option<f64>| v.unwrap_or(f64::NAN);
            let coreset = f.scorer_report["coreset_seconds"]
                .as_f64()
                .map(|c| format!(", coreset {c:.1} s"))
                .unwrap_or_default();
            lines.push(format!(
                "| {label}: fit on bottle (209 images, wall{coreset}) | {:.1} s |",
                fit.seconds
            ));
            lines.push(format!(
                "| {label}: peak RSS fit / test | {:.0} / {:.0} MiB |",
                fit.peak_rss_mib, test.peak_rss_mib
            ));
            let file_mib = f.model_bytes as f64 / 1048576.0;
            lines.push(format!(
                "| {label}: model file (fit peak / file) | {file_mib:.1} MiB ({:.2}×) |",
                fit.peak_rss_mib / file_mib
            ));
            lines.push(format!(
                "| {label}: test ms/image (batch 8; features {:.1} + scoring {:.1}) | {:.1} ms |",
                r.feature_ms_per_image, r.score_ms_per_image, r.ms_per_image
            ));
            // The whole command: decoding, model load, evaluation and report included.
            lines.push(format!(
                "| {label}: test wall clock ({} images) | {:.2} s, {:.1} images/s |",
                r.counts.images,
                test.seconds,
                r.counts.images as f64 / test.seconds
            ));
            if let Some(epochs) = f.scorer_report["epochs"].as_array() {
                let secs: Vec<f64> = epochs
                    .iter()
                    .filter_map(|e| e["seconds"].as_f64())
                    .collect();
                if !secs.is_empty() {
                    lines.push(format!(
                        "| {label}: training s/epoch (mean of {}) | {:.1} s |",
                        secs.len(),
                        secs.iter().sum::<f64>() / secs.len() as f64
                    ));
                }
            }
            lines.push(format!(
                "| {label}: bottle image / pixel AUROC | {:.4} / {:.4} |",
                num(r.image_auroc),
                num(r.pixel_auroc)
            ));
        }
        let _ = std::fs::remove_dir_all(&tmp);
        if !skip_torch {
            let scripts: [(&str, &[&str]); 4] = [
                ("torch_conv.py", &[]),
                ("torch_padim.py", &[]),
                ("torch_patchcore.py", &["--ratio", "0.01"]),
                ("torch_patchcore.py", &["--ratio", "0.1"]),
            ];
            for (script, extra) in scripts {
                let path = root().join("tools/bench").join(script);
                let mut cmd = Command::new(&python);
                cmd.arg(&path);
                if script != "torch_conv.py" {
                    cmd.args(["--weights", &s(&weights), "--data", &s(&bottle)]);
                }
                cmd.args(extra);
                let py = measured(&mut cmd)?;
                if py.ok {
                    lines.take_table(&py.stdout, &mut measured_ms, torch_conv_row);
                    lines.push(format!(
                        "| PyTorch {script} {} peak RSS | {:.0} MiB |",
                        extra.join(" "),
                        py.peak_rss_mib
                    ));
                } else {
                    println!(
                        "bench: PyTorch {script} skipped ({python} with torch not usable): {}",
                        py.stderr.lines().last().unwrap_or("")
                    );
                }
            }
        }
        if !skip_openvino {
            let path = root().join("tools/bench/openvino_backbone.py");
            let mut cmd = Command::new(&python);
            cmd.arg(&path)
                .args(["--weights", &s(&weights), "--threads"]);
            cmd.arg(threads.to_string());
            let py = measured(&mut cmd)?;
            if py.ok {
                lines.take_table(&py.stdout, &mut measured_ms, openvino_row);
            } else {
                println!(
                    "bench: OpenVINO skipped ({python} with openvino + numpy not usable): {}",
                    py.stderr.lines().last().unwrap_or("")
                );
            }
        }
    } else if let Some(why) = absent {
        println!("bench: {why}: real-data fit/test timings SKIPPED");
    }
    for (what, ours, theirs) in [
        (
            "ResNet-18 layer1..3, batch 1",
            "features_r18/tessera_batch1",
            "resnet18/1",
        ),
        (
            "ResNet-18 layer1..3, batch 8",
            "features_r18/tessera_batch8",
            "resnet18/8",
        ),
        (
            "Wide-ResNet-50-2 layer1..3, batch 1",
            "features_wrn50/tessera_batch1",
            "wide_resnet50_2/1",
        ),
        (
            "Wide-ResNet-50-2 layer1..3, batch 8",
            "features_wrn50/tessera_batch8",
            "wide_resnet50_2/8",
        ),
        (
            "training step R18, batch 8",
            "train_step_r18_b8/tessera",
            "train",
        ),
    ] {
        for (name, key) in [
            ("PyTorch", format!("torch/{theirs}")),
            ("OpenVINO f32", format!("openvino/{theirs}/f32")),
            (
                "OpenVINO default precision",
                format!("openvino/{theirs}/default"),
            ),
        ] {
            if let (Some(a), Some(b)) = (measured_ms.get(ours), measured_ms.get(&key)) {
                lines.push(format!(
                    "| Tessera / {name}, {what} | {a:.1} / {b:.1} ms = {:.2}× |",
                    a / b
                ));
            }
        }
    }
    // bf16 products against OpenVINO's default precision (bf16 on a CPU with AVX512-BF16).
    for (what, ours, theirs) in [
        (
            "ResNet-18, batch 1",
            "features_r18/tessera_bf16_batch1",
            "resnet18/1",
        ),
        (
            "ResNet-18, batch 8",
            "features_r18/tessera_bf16_batch8",
            "resnet18/8",
        ),
        (
            "Wide-ResNet-50-2, batch 1",
            "features_wrn50/tessera_bf16_batch1",
            "wide_resnet50_2/1",
        ),
        (
            "Wide-ResNet-50-2, batch 8",
            "features_wrn50/tessera_bf16_batch8",
            "wide_resnet50_2/8",
        ),
    ] {
        let key = format!("openvino/{theirs}/default");
        if let (Some(a), Some(b)) = (measured_ms.get(ours), measured_ms.get(&key)) {
            lines.push(format!(
                "| Tessera bf16 / OpenVINO default precision, {what} | {a:.1} / {b:.1} ms = {:.2}× |",
                a / b
            ));
        }
    }
    println!("\n| measurement | value |\n|---|---|");
    for l in lines.0 {
        println!("{l}");
    }
    Ok(())
}

/// `(label, ms)` of a table row printed by a `tools/bench` script: `| label | 12.3 ms… |`.
fn row_cells(line: &str) -> Option<(&str, f64)> {
    let mut cells = line.split('|').map(str::trim).skip(1);
    let (label, value) = (cells.next()?, cells.next()?);
    Some((label, value.split_whitespace().next()?.parse().ok()?))
}

/// The backbone and batch size a feature-extraction row's label names (`… resnet18 …, batch8 …`).
fn arch_batch(label: &str) -> Option<(&'static str, &str)> {
    let arch = ["wide_resnet50_2", "resnet18"]
        .into_iter()
        .find(|a| label.contains(&format!(" {a} ")))?;
    let batch = label.split("batch").nth(1)?.split_whitespace().next()?;
    Some((arch, batch))
}

/// `(key, ms)` from a row of `tools/bench/torch_conv.py`: `torch/<arch>/<batch>` for feature
/// extraction (ms/image), `torch/train` for the training step.
fn torch_conv_row(line: &str) -> Option<(String, f64)> {
    let (label, ms) = row_cells(line)?;
    if label.contains("training step") {
        return Some(("torch/train".into(), ms));
    }
    let (arch, batch) = arch_batch(label)?;
    Some((format!("torch/{arch}/{batch}"), ms))
}

/// `(key, ms)` from a row of `tools/bench/openvino_backbone.py`:
/// `openvino/<arch>/<batch>/<f32|default>` (ms/image).
fn openvino_row(line: &str) -> Option<(String, f64)> {
    let (label, ms) = row_cells(line)?;
    let (arch, batch) = arch_batch(label)?;
    let precision = label.split("threads, ").nth(1)?.split(':').next()?;
    Some((format!("openvino/{arch}/{batch}/{precision}"), ms))
}

/// Table rows, also echoed as they are measured (a long run that is interrupted still reports).
#[derive(Default)]
struct Rows(Vec<String>);

impl Rows {
    fn push(&mut self, row: String) {
        println!("bench row: {row}");
        self.0.push(row);
    }

    /// A script's table rows, kept as they are; the times `parse` recognises go to `ms`.
    fn take_table(
        &mut self,
        stdout: &str,
        ms: &mut std::collections::HashMap<String, f64>,
        parse: fn(&str) -> Option<(String, f64)>,
    ) {
        for l in stdout.lines().filter(|l| l.starts_with('|')) {
            self.push(l.to_string());
            if let Some((key, v)) = parse(l) {
                ms.insert(key, v);
            }
        }
    }
}

/// Image / pixel AUROC floors of the real-data gate (PyTorch with the same weights: 0.996 / 0.980).
const REAL_IMAGE_AUROC: f64 = 0.990;
const REAL_PIXEL_AUROC: f64 = 0.975;

fn real_check(args: &[String]) -> Result<()> {
    let real = RealData::from_args(args);
    if let Some(why) = real.absent() {
        println!("real-check: SKIPPED — {why}; the real-data gate did not run");
        return Ok(());
    }
    let RealData { bottle, weights } = real;
    // CI passes `--profile dev`: the binary its `cargo test` built, not a second (release)
    // build of everything. The numbers are the same; only the timings differ.
    let profile = flag(args, "--profile").unwrap_or_else(|| "release".into());
    let bin = build_tessera_profile(&profile, &[])?;
    let tmp = std::env::temp_dir().join(format!("tessera-real-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let model = tmp.join("bottle.safetensors");
    let report = tmp.join("report.json");
    let s = |p: &Path| p.display().to_string();
    let st = Command::new(&bin)
        .args([
            "--quiet",
            "fit",
            "--data",
            &s(&bottle),
            "--weights",
            &s(&weights),
            "--out",
            &s(&model),
            "--seed",
            "0",
        ])
        .status()?;
    if !st.success() {
        bail!("real-check: tessera fit failed");
    }
    let st = Command::new(&bin)
        .args([
            "--quiet",
            "test",
            "--model",
            &s(&model),
            "--data",
            &s(&bottle),
            "--report",
            &s(&report),
        ])
        .status()?;
    if !st.success() {
        bail!("real-check: tessera test failed");
    }
    let r: reports::TestReport = reports::read(&report)?;
    let _ = std::fs::remove_dir_all(&tmp);
    let (img, pix) = (r.image_auroc.unwrap_or(0.0), r.pixel_auroc.unwrap_or(0.0));
    println!(
        "real-check: PaDiM R18 on bottle: image AUROC {img:.4} (floor {REAL_IMAGE_AUROC}), pixel AUROC {pix:.4} (floor {REAL_PIXEL_AUROC}), fit {:.1} s, {:.1} ms/image ({profile} build)",
        r.fit_seconds, r.ms_per_image
    );
    if img < REAL_IMAGE_AUROC || pix < REAL_PIXEL_AUROC {
        bail!("real-check FAILED: below the floor");
    }
    println!("real-check: passed");
    Ok(())
}

#[cfg(test)]
mod binary_lookup {
    use super::built_executable;

    #[test]
    fn finds_the_executable_cargo_reports() {
        let msgs = r#"{"reason":"compiler-artifact","target":{"name":"tessera_core"},"executable":null}
not json at all
{"reason":"compiler-artifact","target":{"name":"tessera"},"executable":"/elsewhere/target/release/tessera"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            built_executable(msgs, "tessera"),
            Some("/elsewhere/target/release/tessera".into())
        );
        assert_eq!(built_executable(msgs, "other"), None);
    }
}

#[cfg(test)]
mod bench_rows {
    use super::torch_conv_row;

    #[test]
    fn parses_the_openvino_rows() {
        assert_eq!(
            super::openvino_row(
                "| OpenVINO 2026.4.1 resnet18 layer1..3, batch8 (2 threads, f32: f32, max rel. \
                 error vs f32 0.0e+00) | 18.39 ms/image |"
            ),
            Some(("openvino/resnet18/8/f32".into(), 18.39))
        );
        assert_eq!(
            super::openvino_row(
                "| OpenVINO 2026.4.1 wide_resnet50_2 layer1..3, batch1 (2 threads, default: bf16, \
                 max rel. error vs f32 2.1e-02) | 3.10 ms/image |"
            ),
            Some(("openvino/wide_resnet50_2/1/default".into(), 3.10))
        );
        assert_eq!(super::openvino_row("| OpenVINO resnet18 | n/a |"), None);
    }

    #[test]
    fn parses_the_pytorch_rows() {
        assert_eq!(
            torch_conv_row(
                "| PyTorch 2.15.0+cu132 resnet18 layer1..3, batch1 (2 threads) | 16.5 ms/image |"
            ),
            Some(("torch/resnet18/1".into(), 16.5))
        );
        assert_eq!(
            torch_conv_row(
                "| PyTorch 2.15.0 wide_resnet50_2 layer1..3, batch8 (2 threads) | 72.8 ms/image |"
            ),
            Some(("torch/wide_resnet50_2/8".into(), 72.8))
        );
        assert_eq!(
            torch_conv_row("| PyTorch training step R18 layer1..3, batch 8 (2 threads) | 231 ms |"),
            Some(("torch/train".into(), 231.0))
        );
        assert_eq!(torch_conv_row("| PyTorch PaDiM fit | 14.5 s |"), None);
    }
}
