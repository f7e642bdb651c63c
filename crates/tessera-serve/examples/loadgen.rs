//! A bounded load generator for `tessera serve` (loopback only): `--requests` predict calls
//! from `--concurrency` clients, the images of `--images` (a folder) in turn. Prints one JSON
//! line: answers by status, images/s and latency percentiles.
//!
//! ```text
//! cargo run --release -p tessera-serve --example loadgen -- \
//!     --url http://127.0.0.1:8080/v1/models/bottle:predict --images DIR \
//!     --concurrency 16 --requests 320
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = flag(&args, "--url").expect("--url");
    assert!(
        url.starts_with("http://127.0.0.1") || url.starts_with("http://localhost"),
        "loadgen talks to loopback only"
    );
    let dir = PathBuf::from(flag(&args, "--images").expect("--images DIR"));
    let conc: usize = flag(&args, "--concurrency").map_or(1, |v| v.parse().unwrap());
    let total: usize = flag(&args, "--requests").map_or(100, |v| v.parse().unwrap());
    let images: Arc<Vec<Vec<u8>>> = Arc::new(
        tessera_data::list_images(&dir)
            .expect("list images")
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect(),
    );
    assert!(!images.is_empty(), "no images in {}", dir.display());
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(conc)
        .build()
        .unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (client, url, images, next) =
            (client.clone(), url.clone(), images.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= total {
                    break;
                }
                let body = images[k % images.len()].clone();
                let t = Instant::now();
                let status = match client.post(&url).body(body).send().await {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        let _ = r.bytes().await;
                        s
                    }
                    Err(_) => 0,
                };
                out.push((status, t.elapsed().as_secs_f64() * 1e3));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    let ok: Vec<f64> = all
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, ms)| *ms)
        .collect();
    let busy = all.iter().filter(|(s, _)| *s == 503).count();
    let other = all.len() - ok.len() - busy;
    let mut lat = ok.clone();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if lat.is_empty() {
            f64::NAN
        } else {
            lat[(((lat.len() as f64) * p).ceil() as usize).clamp(1, lat.len()) - 1]
        }
    };
    println!(
        "{}",
        serde_json::json!({
            "concurrency": conc, "requests": all.len(), "ok": ok.len(), "busy_503": busy,
            "other": other, "seconds": secs, "images_per_s": ok.len() as f64 / secs,
            "p50_ms": pct(0.5), "p99_ms": pct(0.99),
        })
    );
}
