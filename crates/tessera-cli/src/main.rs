//! `tessera`: fit, test and predict industrial anomaly detectors. Argument parsing and
//! printing only; the work is in `tessera-pipeline` and the crates below it.

mod args;
mod progress;
mod verify_table;

use anyhow::Result;
use args::*;
use clap::Parser;
use progress::Bars;
use std::process::ExitCode;
use tessera_pipeline::{Observer, PredictOptions, SbmOptions, SynthOptions, TestOptions};

fn run(cli: Cli) -> Result<()> {
    let quiet = cli.quiet || cli.json;
    let bars = Bars::new(quiet);
    // Before any work starts a thread. Environment settings of glibc's allocator (MALLOC_*_,
    // GLIBC_TUNABLES) win over the flag and the default.
    if cli.retain_freed_memory {
        if !tessera_core::alloc::retain_freed_memory() {
            bars.note(
                "--retain-freed-memory not applied (not Linux/glibc, or allocator settings in \
                 the environment)",
            );
        }
    } else {
        tessera_core::alloc::reuse_batch_buffers();
    }
    match cli.cmd {
        Cmd::Fit(a) => {
            let s = tessera_pipeline::fit(&a.options(), &bars)?;
            summary(cli.json, &bars, &s, |s| {
                let guarantee = match s.guaranteed_fpr {
                    Some(g) => format!(", false alarms on normal parts ≤ {:.1} %", g * 100.0),
                    None => String::new(),
                };
                let gate = match &s.gate {
                    Some(g) => format!("\n  method gate: {}", g.reason),
                    None => String::new(),
                };
                // What the scorer chose, when it says (PaDiM: dimensions, covariances).
                let gate = match s.scorer_report.get("summary").and_then(|v| v.as_str()) {
                    Some(line) => format!("{gate}\n  {line}"),
                    None => gate,
                };
                format!(
                    "wrote {} (method {}, {} images fitted, {} held out for calibration, {:.1} \
                     s); image threshold {:.4}{guarantee}, pixel threshold {:.4}{gate}",
                    s.model.display(),
                    s.method,
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
                patchcore_search: a.patchcore_search,
                precision: a.precision,
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
                precision: a.precision,
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
                config.pfam = Some(a.sbm.pfam_config());
            } else if config.pfam.is_some() {
                anyhow::bail!("--pfam-branches needs --pfam (PFAM trains only with it)");
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
        Cmd::Serve(a) => {
            let opts = a.options();
            if opts.precision == tessera_pipeline::Precision::Bf16
                && !tessera_pipeline::bf16_supported()
            {
                tessera_pipeline::Observer::warn(
                    &bars,
                    "--precision bf16: this CPU has no native bf16 dot products (AVX512-BF16); \
                     serving in f32",
                );
            }
            bars.say(&format!(
                "serving {} model(s) on http://{} (max batch {}, queue {}); SIGTERM or Ctrl-C \
                 drains and stops, SIGHUP reloads",
                opts.models.len(),
                opts.addr,
                opts.batch.max_batch,
                opts.batch.queue
            ));
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(tessera_serve::serve(opts, tessera_serve::shutdown_signal()))?;
            bars.say("stopped: every request in flight was answered");
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
                    "{}: category {} ({}), {} layout, {} training images, {} test images ({} anomalous)\n  kind: {}",
                    i.root.display(),
                    i.category,
                    i.kind.map_or("kind unknown", |k| k.name()),
                    i.layout,
                    i.train_images,
                    i.test_images,
                    i.test_anomalous,
                    i.kind_reason
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
