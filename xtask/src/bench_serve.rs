//! `cargo xtask bench serve`: `tessera serve` under load on loopback — images/s and p50/p99
//! latency at concurrency 1, 4 and 16, with and without dynamic batching, beside `tessera
//! predict` on the same images; then a 4× overload burst (503 rate, server memory). Bounded:
//! every run sends a fixed number of requests.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound, read, released).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// `GET path` over plain HTTP/1.1; the status code.
fn get_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    std::str::from_utf8(&buf[..n])
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(bin: &Path, model: &Path, extra: &[&str]) -> Result<Self> {
        let port = free_port()?;
        let child = Command::new(bin)
            .args(["--quiet", "serve", "--model"])
            .arg(format!("m={}", model.display()))
            .args(["--addr", &format!("127.0.0.1:{port}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting tessera serve")?;
        let t0 = Instant::now();
        while get_status(port, "/readyz") != Some(200) {
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("tessera serve did not become ready in 2 minutes");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Self { child, port })
    }

    /// Peak resident memory of the server so far (VmHWM), MiB.
    fn peak_rss_mib(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse::<f64>()
                    .ok()
            })
            .map_or(f64::NAN, |k| k / 1024.0)
    }

    /// SIGTERM, then wait: the server drains and exits.
    fn stop(mut self) -> Result<()> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait()?;
        if !st.success() {
            bail!("tessera serve exited with {st}");
        }
        Ok(())
    }
}

/// The loadgen example's executable, built in release.
fn loadgen() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "-p",
            "tessera-serve",
            "--example",
            "loadgen",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(crate::root())
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("building the loadgen example failed");
    }
    crate::built_executable(&String::from_utf8_lossy(&out.stdout), "loadgen")
        .context("cargo reported no loadgen executable")
}

fn load(gen: &Path, port: u16, images: &Path, conc: usize, n: usize) -> Result<serde_json::Value> {
    let out = Command::new(gen)
        .args([
            "--url",
            &format!("http://127.0.0.1:{port}/v1/models/m:predict"),
        ])
        .arg("--images")
        .arg(images)
        .args([
            "--concurrency",
            &conc.to_string(),
            "--requests",
            &n.to_string(),
        ])
        .output()?;
    if !out.status.success() {
        bail!("loadgen failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

pub fn bench_serve(args: &[String]) -> Result<()> {
    let requests: usize = crate::flag(args, "--requests").map_or(Ok(160), |v| v.parse())?;
    let real = crate::RealData::from_args(args);
    if let Some(why) = real.absent() {
        println!("bench serve: SKIPPED — {why}");
        return Ok(());
    }
    let crate::RealData { bottle, weights } = real;
    let bin = crate::build_tessera()?;
    let gen = loadgen()?;
    let tmp = std::env::temp_dir().join(format!("tessera-bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let model = tmp.join("bottle.padim.safetensors");
    let st = Command::new(&bin)
        .args(["--quiet", "fit", "--data"])
        .arg(&bottle)
        .arg("--weights")
        .arg(&weights)
        .arg("--out")
        .arg(&model)
        .status()?;
    if !st.success() {
        bail!("fit failed");
    }
    // The images: every bottle test image, one flat folder.
    let images = tmp.join("images");
    std::fs::create_dir_all(&images)?;
    let mut n_img = 0;
    for e in std::fs::read_dir(bottle.join("test"))? {
        let d = e?.path();
        for f in std::fs::read_dir(&d)? {
            let f = f?.path();
            let name = format!(
                "{}_{}",
                d.file_name().unwrap().to_string_lossy(),
                f.file_name().unwrap().to_string_lossy()
            );
            std::fs::copy(&f, images.join(name))?;
            n_img += 1;
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "bench serve: {n_img} bottle test images, {requests} requests per run, {threads} threads"
    );
    let mut rows = Vec::new();
    // tessera predict on the same images: the sequential rate, process start and model load
    // included (what a line pays per call today), and its scoring rate alone.
    let t0 = Instant::now();
    let st = Command::new(&bin)
        .args(["--quiet", "predict", "--model"])
        .arg(&model)
        .arg(&images)
        .arg("--out")
        .arg(tmp.join("pred"))
        .status()?;
    if !st.success() {
        bail!("predict failed");
    }
    let secs = t0.elapsed().as_secs_f64();
    rows.push(format!(
        "| `tessera predict` (one process, {n_img} images, batch 8) | {:.1} images/s | {:.1} s wall |",
        n_img as f64 / secs,
        secs
    ));
    // One process per image, as a line calls `predict` today: the model loads every time.
    let singles: Vec<PathBuf> = {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&images)?
            .flatten()
            .map(|e| e.path())
            .collect();
        v.sort();
        v.truncate(20);
        v
    };
    let t0 = Instant::now();
    for (k, img) in singles.iter().enumerate() {
        let st = Command::new(&bin)
            .args(["--quiet", "predict", "--model"])
            .arg(&model)
            .arg(img)
            .arg("--out")
            .arg(tmp.join(format!("single-{k}")))
            .status()?;
        if !st.success() {
            bail!("predict failed on {}", img.display());
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    rows.push(format!(
        "| `tessera predict` once per image (sequential, {} images) | {:.2} images/s | {:.0} ms per image |",
        singles.len(),
        singles.len() as f64 / secs,
        1e3 * secs / singles.len() as f64
    ));
    for (label, extra) in [
        (
            "batching (max batch 8, wait 5 ms)",
            vec!["--max-batch", "8", "--max-wait-ms", "5"],
        ),
        (
            "no batching (max batch 1)",
            vec!["--max-batch", "1", "--max-wait-ms", "0"],
        ),
    ] {
        let srv = Server::start(&bin, &model, &extra)?;
        // Warm the connection pool and caches.
        load(&gen, srv.port, &images, 4, 16)?;
        for conc in [1usize, 4, 16] {
            let r = load(&gen, srv.port, &images, conc, requests)?;
            rows.push(format!(
                "| serve, {label}, concurrency {conc} | {:.1} images/s | p50 {:.1} ms, p99 {:.1} ms ({} ok, {} 503) |",
                r["images_per_s"].as_f64().unwrap_or(f64::NAN),
                r["p50_ms"].as_f64().unwrap_or(f64::NAN),
                r["p99_ms"].as_f64().unwrap_or(f64::NAN),
                r["ok"],
                r["busy_503"]
            ));
            println!("bench serve row: {}", rows.last().unwrap());
        }
        rows.push(format!(
            "| serve, {label}: server peak RSS | {:.0} MiB | |",
            srv.peak_rss_mib()
        ));
        srv.stop()?;
    }
    // Overload: a queue of 16 and 4× as many clients as it holds.
    let srv = Server::start(&bin, &model, &["--max-batch", "8", "--queue", "16"])?;
    let r = load(&gen, srv.port, &images, 64, requests * 2)?;
    let total = r["requests"].as_f64().unwrap_or(f64::NAN);
    let busy = r["busy_503"].as_f64().unwrap_or(f64::NAN);
    rows.push(format!(
        "| overload: 64 clients, queue 16, {} requests | {:.1} % answered 503 | {:.1} images/s served, p99 {:.1} ms; server peak RSS {:.0} MiB; /healthz after: {} |",
        total,
        100.0 * busy / total,
        r["images_per_s"].as_f64().unwrap_or(f64::NAN),
        r["p99_ms"].as_f64().unwrap_or(f64::NAN),
        srv.peak_rss_mib(),
        get_status(srv.port, "/healthz").unwrap_or(0)
    ));
    srv.stop()?;
    let _ = std::fs::remove_dir_all(&tmp);
    println!("\n| run | throughput | latency |\n|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}
