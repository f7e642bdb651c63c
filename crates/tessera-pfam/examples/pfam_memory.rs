//! Peak memory (and time) of PFAM on ResNet-18 feature shapes at 224 px.
//!
//! ```text
//! cargo run -p tessera-pfam --example pfam_memory -- [--chunk N|none] [--batch B]
//!                                                    [--train] [--iters K]
//! ```
//!
//! Builds a seeded PFAM for channels [64, 128, 256], random X1 (B×64×56×56), X2 (B×128×28×28),
//! X3 (B×256×14×14), and runs it: inference with detached parameters (the default), or
//! `--train`: forward + backward of a scalar loss with the parameters as Vars. Reads the peak
//! resident set (VmHWM) from /proc/self/status; run one configuration per process.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::time::Instant;
use tessera_core::FeatureMaps;
use tessera_pfam::{Pfam, PfamConfig};

fn status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn main() -> tessera_core::Result<()> {
    let mut chunk = Some(512);
    let (mut batch, mut iters, mut train) = (1usize, 3usize, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--chunk" => {
                let v = args.next().unwrap_or_default();
                chunk = if v == "none" {
                    None
                } else {
                    Some(v.parse().expect("--chunk N|none"))
                };
            }
            "--batch" => batch = args.next().and_then(|v| v.parse().ok()).expect("--batch B"),
            "--iters" => iters = args.next().and_then(|v| v.parse().ok()).expect("--iters K"),
            "--train" => train = true,
            other => panic!("unknown argument {other}"),
        }
    }
    let dev = Device::Cpu;
    let mut cfg = PfamConfig::default();
    cfg.mfcsam.pam.chunk = chunk;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let trained = Pfam::new(cfg, [64, 128, 256], vb.pp("pfam"))?;
    let pfam = if train { trained } else { trained.detached() };
    let x = FeatureMaps::new(vec![
        Tensor::randn(0f32, 1., (batch, 64, 56, 56), &dev)?,
        Tensor::randn(0f32, 1., (batch, 128, 28, 28), &dev)?,
        Tensor::randn(0f32, 1., (batch, 256, 14, 14), &dev)?,
    ]);
    let rss0 = status_kib("VmRSS:").unwrap_or(0);
    let hwm0 = status_kib("VmHWM:").unwrap_or(0);
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        let y = pfam.forward(&x)?;
        if train {
            let loss = (y.levels[0].sqr()?.mean_all()? + y.levels[2].sqr()?.mean_all()?)?;
            let grads = loss.backward()?;
            drop(grads);
        } else {
            // Make sure the work is done (CPU ops are eager; this just reads one value).
            y.levels[0].flatten_all()?.get(0)?.to_scalar::<f32>()?;
        }
        times.push(t.elapsed().as_secs_f64() * 1e3 / batch as f64);
    }
    let hwm1 = status_kib("VmHWM:").unwrap_or(0);
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let chunk_s = chunk.map_or("none".to_string(), |c| c.to_string());
    let mode = if train {
        "forward+backward"
    } else {
        "inference"
    };
    println!(
        "pfam r18 224px batch {batch} chunk {chunk_s} {mode}: peak RSS {:.1} MiB \
         (before the run: RSS {:.1} MiB, peak {:.1} MiB) → peak increase over the resident \
         setup {:.1} MiB ({:.1} MiB/image); median {:.1} ms/image over {} runs",
        hwm1 as f64 / 1024.0,
        rss0 as f64 / 1024.0,
        hwm0 as f64 / 1024.0,
        hwm1.saturating_sub(rss0) as f64 / 1024.0,
        hwm1.saturating_sub(rss0) as f64 / 1024.0 / batch as f64,
        times[times.len() / 2],
        times.len()
    );
    Ok(())
}
