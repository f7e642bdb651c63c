//! The inspection page in a real headless browser (Debian's chromium): the page loads the model
//! list, and its self-test draws an image and sends it through the same function a dropped or
//! picked file goes through; the rendered page must show the decision, the scores, the
//! heatmap and a history row. Without chromium the test says so and does not run.

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tessera_core::model::Preprocess;
use tessera_data::{generate_category, SyntheticSpec};
use tessera_pipeline::{fit, FitOptions, Silent};
use tessera_serve::{ServeOptions, Service};

fn browser() -> Option<&'static str> {
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .into_iter()
    .find(|p| Path::new(p).is_file())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_inspects_an_image_in_a_real_browser() {
    let Some(chrome) = browser() else {
        eprintln!(
            "SKIPPED the_page_inspects_an_image_in_a_real_browser: no chromium installed \
             (Debian: apt-get install chromium); the inspection page was NOT tested"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ring");
    generate_category(
        &data,
        &SyntheticSpec {
            seed: 5,
            size: 96,
            train: 8,
            test_good: 1,
            test_defect: 1,
        },
    )
    .unwrap();
    let model = dir.path().join("m.safetensors");
    let o = FitOptions::random_backbone(data, &model, Preprocess::exact(96, 96), 0);
    fit(&o, &Silent).unwrap();
    let opts = ServeOptions {
        models: vec![("ring".into(), model)],
        ..Default::default()
    };
    let service = tokio::task::spawn_blocking(move || Service::new(opts))
        .await
        .unwrap()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/?selftest", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(service.run(listener, async move {
        let _ = rx.await;
    }));
    let profile = dir.path().join("profile");
    let chrome = chrome.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(chrome)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=20000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(&url)
            .output()
    });
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .expect("chromium finishes within 2 minutes")
        .unwrap()
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&out.stdout);
    let _ = tx.send(());
    server.await.unwrap().unwrap();
    assert!(
        dom.contains("data-done=\"1\""),
        "the self-test did not finish; page:\n{dom}\nchromium stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dom.contains("<option>ring</option>"), "model list: {dom}");
    assert!(
        dom.contains(">GOOD<") || dom.contains(">ANOMALOUS<"),
        "no decision shown: {dom}"
    );
    assert!(dom.contains("data:image/png;base64,"), "no heatmap shown");
    assert!(dom.contains("selftest.png"), "no history row");
}
