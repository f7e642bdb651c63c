//! The service as a library: fit a small PaDiM model on the built-in synthetic category (seeded
//! random backbone, no download), serve it on an ephemeral loopback port, send one test image
//! over HTTP, print the answer, and shut down (the drain answers everything in flight).
//!
//! ```text
//! cargo run --release -p tessera-serve --example serve_once
//! ```

use std::time::Duration;
use tessera_core::model::Preprocess;
use tessera_data::{generate_category, SyntheticSpec};
use tessera_pipeline::{fit, FitOptions, Silent};
use tessera_serve::{Outcome, ServeOptions, Service};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tmp = std::env::temp_dir().join(format!("tessera-serve-once-{}", std::process::id()));
    let data = tmp.join("ring");
    generate_category(
        &data,
        &SyntheticSpec {
            size: 96,
            // 20 % of these are held out to calibrate the threshold.
            train: 40,
            test_good: 2,
            test_defect: 1,
            ..Default::default()
        },
    )?;
    let model = tmp.join("ring.padim.safetensors");
    let o = FitOptions::random_backbone(&data, &model, Preprocess::exact(96, 96), 0);
    fit(&o, &Silent)?;

    let opts = ServeOptions {
        models: vec![("ring".into(), model)],
        ..Default::default()
    };
    // Loading warms the model up (a blocking call: off the async threads).
    let service = tokio::task::spawn_blocking(move || Service::new(opts)).await??;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(service.run(listener, async move {
        let _ = stopped.await;
    }));
    println!("serving on {base}");

    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()?;
    for sample in tessera_data::Dataset::open(&data)?.test()? {
        let body = std::fs::read(&sample.path)?;
        let r = client
            .post(format!("{base}/v1/models/ring:predict?regions=true"))
            .body(body)
            .send()
            .await?;
        let status = r.status();
        let o: Outcome = r.json().await?;
        println!(
            "{status} {:<12} score {:.3} (threshold {:.3}, normalised {:.2}, p {:.3}) → {}, {} region(s)",
            sample.defect_type,
            o.score,
            o.threshold,
            o.normalized,
            o.p_value.unwrap_or(f64::NAN),
            if o.anomalous { "ANOMALOUS" } else { "good" },
            o.regions.map_or(0, |r| r.len())
        );
    }
    let _ = stop.send(());
    server.await??;
    println!("stopped");
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
