//! PatchCore's nearest-neighbour search on a real model and dataset: brute force, the exact
//! pruned search and the approximate one, on the test split's own patches.
//!
//! ```text
//! cargo run --release -p tessera-pipeline --example patchcore_search -- MODEL DATA [CLUSTERS...]
//! ```
//!
//! For each search: time to build its partition, ms per image for the search alone (batches of
//! 8 images, as `tessera test`), the share of brute force's distance computations done, recall
//! (queries whose nearest row is brute force's, or as near to 1e-5) and the largest distance
//! error, relative to the mean nearest distance. CLUSTERS (default: the model's, about √bank) adds exact/approximate rows for
//! other partition sizes.

use std::time::Instant;
use tessera_core::{Error, Result};
use tessera_patchcore::{embed, patches, Patchcore, PatchcoreConfig, Search};
use tessera_pipeline::{batches, Detector, ScorerConfig};

/// Each query's (nearest distance, bank index), ms per image, share of brute force's work.
type Run = (Vec<(f32, u32)>, f64, f64);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        return Err(Error::Config(
            "usage: patchcore_search MODEL DATA [CLUSTERS...]".into(),
        ));
    }
    let device = candle_core::Device::Cpu;
    let det = Detector::load(args[0].as_ref(), &device)?;
    let ScorerConfig::Patchcore(cfg) = det.meta.scorer.clone() else {
        return Err(Error::Config("not a patchcore model".into()));
    };
    let tensors: std::collections::HashMap<_, _> = det.scorer.tensors()?.into_iter().collect();
    let test = tessera_data::Dataset::open(args[1].as_ref())?.test()?;
    let mut queries = Vec::new();
    for b in batches(&test, &det.meta.preprocess, 8, &device) {
        let f = det.features(&b?.tensor)?;
        queries.push(patches(&embed(&f, &cfg.levels, cfg.embed_dim)?)?);
    }
    let images = test.len() as f64;
    let model = |search: Search, clusters: Option<usize>| -> Result<(Patchcore, f64)> {
        let c = PatchcoreConfig {
            search,
            clusters,
            ..cfg.clone()
        };
        let t = Instant::now();
        let m = <Patchcore as tessera_core::scorer::Restore>::restore(c, tensors.clone())?;
        Ok((m, t.elapsed().as_secs_f64() * 1e3))
    };
    let run = |m: &Patchcore| -> Result<Run> {
        let mut out = Vec::new();
        let (mut pairs, mut brute) = (0u64, 0u64);
        let t = Instant::now();
        for q in &queries {
            let (d, i, s) = m.nearest(q)?;
            pairs += s.pairs;
            brute += s.brute_pairs;
            out.extend(d.into_iter().zip(i));
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / images;
        Ok((out, ms, pairs as f64 / brute.max(1) as f64))
    };
    let (brute, _) = model(Search::Brute, None)?;
    println!(
        "bank {} × {}, {} test images, {} query patches",
        brute.bank_len(),
        brute.bank().dims()[1],
        test.len(),
        queries.iter().map(|q| q.dims()[0]).sum::<usize>()
    );
    let (reference, ms, _) = run(&brute)?;
    let mean = reference.iter().map(|r| r.0 as f64).sum::<f64>() / reference.len().max(1) as f64;
    println!("| search | clusters | build ms | search ms/image | distances computed | recall | max distance error / mean distance |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!("| brute | – | – | {ms:.2} | 100 % | 1 | 0 |");
    let mut sizes: Vec<Option<usize>> = vec![None];
    sizes.extend(args[2..].iter().map(|a| a.parse().ok()));
    for clusters in sizes {
        let mut searches = vec![Search::Exact];
        searches.extend([1, 2, 4, 8].map(|probes| Search::Approximate { probes }));
        for search in searches {
            let (m, build_ms) = model(search, clusters)?;
            let (got, ms, frac) = run(&m)?;
            let (mut hits, mut err) = (0usize, 0f64);
            for (&(d, i), &(rd, ri)) in got.iter().zip(&reference) {
                if i == ri || (d - rd).abs() <= 1e-5 * rd.max(1e-6) {
                    hits += 1;
                }
                err = err.max((d - rd).abs() as f64 / mean);
            }
            println!(
                "| {search} | {} | {build_ms:.0} | {ms:.2} | {:.1} % | {:.4} | {err:.1e} |",
                m.partition().map_or(0, |p| p.clusters()),
                frac * 100.0,
                hits as f64 / reference.len() as f64
            );
        }
    }
    Ok(())
}
