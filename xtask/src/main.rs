//! Project automation, run as `cargo xtask <task>` (alias in `.cargo/config.toml`).
//!
//! - `demo`: the main job end to end on a built-in default — a synthetic MVTec-layout category
//!   generated deterministically, fit, test, heatmaps and the report. No network, no dataset.
//! - `real-check`: CI's real-data gate on `../shared` (skipped, loudly, when absent).
//! - `bench`: the performance numbers of `docs/performance.md` — criterion ms/image for features
//!   and PaDiM scoring (batch 1 and 8), fit time, test ms/image and peak RSS on `../shared` bottle,
//!   and the same work in PyTorch when it is installed.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const USAGE: &str = "usage: cargo xtask <demo|bench|real-check> [options]

  demo  [--out DIR] [--weights FILE] [--seed N]
        Generate a synthetic category, fit PaDiM, test it, write heatmaps and the report.
        Uses --weights when given, else ImageNet ResNet-18 weights from the Hugging Face hub
        cache if present, else a seeded random backbone (and says so).
  bench [--shared DIR] [--skip-criterion] [--skip-torch]
        Criterion ms/image (features + PaDiM, batch 1 and 8), fit/test time and peak RSS on
        ../shared bottle, and PyTorch's time for the same work when torch is installed.
  real-check [--shared DIR]
        CI's real-data gate: PaDiM + ResNet-18 on ../shared bottle must reach image AUROC
        >= 0.990 and pixel AUROC >= 0.975. Says SKIPPED (exit 0) when ../shared is absent.";

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(task) = args.first() else {
        println!("{USAGE}");
        return Ok(());
    };
    let rest = &args[1..];
    match task.as_str() {
        "demo" => demo(rest),
        "bench" => bench(rest),
        "real-check" => real_check(rest),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown task '{other}'\n{USAGE}"),
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

/// Build the release `tessera` binary and return its path.
fn build_tessera() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "--release", "-p", "tessera-cli"])
        .current_dir(root())
        .status()
        .context("running cargo build")?;
    if !st.success() {
        bail!("cargo build --release -p tessera-cli failed");
    }
    Ok(root().join("target/release/tessera"))
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
    if data.exists() {
        std::fs::remove_dir_all(&data).with_context(|| format!("clearing {}", data.display()))?;
    }
    let spec = tessera_data::SyntheticSpec {
        seed,
        ..Default::default()
    };
    println!(
        "demo: generating a synthetic category in {} (seed {seed})",
        data.display()
    );
    tessera_data::generate_category(&data, &spec)?;
    let bin = build_tessera()?;
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
            .status()
            .context("running tessera fit")?;
        if probe.success() {
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
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
    println!("\ndemo done with {backbone_note}:");
    println!(
        "  image AUROC {:.4}, pixel AUROC {:.4}",
        r["image_auroc"].as_f64().unwrap_or(f64::NAN),
        r["pixel_auroc"].as_f64().unwrap_or(f64::NAN)
    );
    println!("  model     {}", model.display());
    println!("  report    {} (+ .md)", report.display());
    println!("  heatmaps  {}/<type>/<image>.png", heat.display());
    Ok(())
}

fn bench(args: &[String]) -> Result<()> {
    let shared = PathBuf::from(
        flag(args, "--shared").unwrap_or_else(|| root().join("../shared").display().to_string()),
    );
    let skip_criterion = args.iter().any(|a| a == "--skip-criterion");
    let skip_torch = args.iter().any(|a| a == "--skip-torch");
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("bench: {threads} threads available");
    let mut lines = Vec::new();
    if !skip_criterion {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["bench", "-p", "tessera-cli", "--bench", "pipeline"])
            .current_dir(root())
            .status()
            .context("running cargo bench")?;
        if !st.success() {
            bail!("cargo bench failed");
        }
        for (name, batch) in [("batch1", 1.0), ("batch8", 8.0)] {
            let est = root().join(format!(
                "target/criterion/r18_features_padim/{name}/new/estimates.json"
            ));
            if let Ok(text) = std::fs::read_to_string(&est) {
                let v: serde_json::Value = serde_json::from_str(&text)?;
                let ns = v["mean"]["point_estimate"].as_f64().unwrap_or(f64::NAN);
                lines.push(format!(
                    "| R18 features + PaDiM, {name} | {:.1} ms/image |",
                    ns / 1e6 / batch
                ));
            }
        }
    }
    let bottle = shared.join("data/mvtec_ad/bottle");
    let weights = shared.join("weights/resnet18-imagenet1k-l3.safetensors");
    if bottle.is_dir() && weights.is_file() {
        let bin = build_tessera()?;
        let tmp = std::env::temp_dir().join(format!("tessera-bench-{}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        let model = tmp.join("bottle.safetensors");
        let s = |p: &Path| p.display().to_string();
        let fit = measured(Command::new(&bin).args([
            "--json",
            "fit",
            "--data",
            &s(&bottle),
            "--weights",
            &s(&weights),
            "--out",
            &s(&model),
        ]))?;
        if !fit.ok {
            bail!("fit failed: {}", fit.stderr);
        }
        let report = tmp.join("report.json");
        let test = measured(Command::new(&bin).args([
            "--json",
            "test",
            "--model",
            &s(&model),
            "--data",
            &s(&bottle),
            "--report",
            &s(&report),
        ]))?;
        if !test.ok {
            bail!("test failed: {}", test.stderr);
        }
        let r: serde_json::Value = serde_json::from_str(&test.stdout)?;
        lines.push(format!(
            "| fit on bottle (209 images, wall) | {:.1} s |",
            fit.seconds
        ));
        lines.push(format!("| peak RSS, fit | {:.0} MiB |", fit.peak_rss_mib));
        lines.push(format!(
            "| test on bottle: ms/image (features + PaDiM + upsample/blur) | {:.1} ms |",
            r["ms_per_image"].as_f64().unwrap_or(f64::NAN)
        ));
        lines.push(format!(
            "| test on bottle (83 images, wall incl. decode + AUROC) | {:.1} s |",
            test.seconds
        ));
        lines.push(format!("| peak RSS, test | {:.0} MiB |", test.peak_rss_mib));
        lines.push(format!(
            "| bottle image / pixel AUROC | {:.4} / {:.4} |",
            r["image_auroc"].as_f64().unwrap_or(f64::NAN),
            r["pixel_auroc"].as_f64().unwrap_or(f64::NAN)
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        if !skip_torch {
            let script = root().join("tools/bench/torch_padim.py");
            let py = measured(Command::new("python3").args([
                s(&script),
                "--weights".into(),
                s(&weights),
                "--data".into(),
                s(&bottle),
            ]))?;
            if py.ok {
                for l in py.stdout.lines().filter(|l| l.starts_with('|')) {
                    lines.push(l.to_string());
                }
                lines.push(format!(
                    "| peak RSS, PyTorch script (fit + test) | {:.0} MiB |",
                    py.peak_rss_mib
                ));
            } else {
                println!(
                    "bench: PyTorch comparison skipped (python3 with torch not usable):\n{}",
                    py.stderr.lines().last().unwrap_or("")
                );
            }
        }
    } else {
        println!(
            "bench: ../shared not found at {}: real-data fit/test timings SKIPPED",
            shared.display()
        );
    }
    println!("\n| measurement | value |\n|---|---|");
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

/// Image / pixel AUROC floors of the real-data gate (PyTorch with the same weights: 0.996 / 0.980).
const REAL_IMAGE_AUROC: f64 = 0.990;
const REAL_PIXEL_AUROC: f64 = 0.975;

fn real_check(args: &[String]) -> Result<()> {
    let shared = PathBuf::from(
        flag(args, "--shared").unwrap_or_else(|| root().join("../shared").display().to_string()),
    );
    let bottle = shared.join("data/mvtec_ad/bottle");
    let weights = shared.join("weights/resnet18-imagenet1k-l3.safetensors");
    if !bottle.is_dir() || !weights.is_file() {
        println!(
            "real-check: SKIPPED — {} or {} is absent; the real-data gate did not run",
            bottle.display(),
            weights.display()
        );
        return Ok(());
    }
    let bin = build_tessera()?;
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
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
    let _ = std::fs::remove_dir_all(&tmp);
    let (img, pix) = (
        r["image_auroc"].as_f64().unwrap_or(0.0),
        r["pixel_auroc"].as_f64().unwrap_or(0.0),
    );
    println!(
        "real-check: PaDiM R18 on bottle: image AUROC {img:.4} (floor {REAL_IMAGE_AUROC}), pixel AUROC {pix:.4} (floor {REAL_PIXEL_AUROC}), fit {:.1} s, {:.1} ms/image",
        r["fit_seconds"].as_f64().unwrap_or(f64::NAN),
        r["ms_per_image"].as_f64().unwrap_or(f64::NAN)
    );
    if img < REAL_IMAGE_AUROC || pix < REAL_PIXEL_AUROC {
        bail!("real-check FAILED: below the floor");
    }
    println!("real-check: passed");
    Ok(())
}
