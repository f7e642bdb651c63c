//! The service over real loopback HTTP (127.0.0.1, an ephemeral port), with a real client:
//! scores equal `predict`'s bit for bit, concurrent clients all get their own answers, overload
//! gives 503s and the service stays up, malformed requests get JSON errors, reloads swap or
//! refuse, shutdown drains.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;
use tessera_core::model::Preprocess;
use tessera_data::{generate_category, SyntheticSpec};
use tessera_pipeline::{fit, FitOptions, PredictOptions, Silent};
use tessera_serve::batcher::BatchConfig;
use tessera_serve::{Outcome, ServeOptions, Service};

struct Fixture {
    _dir: tempfile::TempDir,
    data: PathBuf,
    model: PathBuf,
    other_model: PathBuf,
    /// Test images with their bytes.
    images: Vec<(PathBuf, Vec<u8>)>,
    /// `predict`'s scores (batch size 1), by image path.
    predicted: Vec<(PathBuf, f32)>,
}

fn fit_model(data: &Path, out: &Path, seed: u64) {
    let o = FitOptions::random_backbone(data, out, Preprocess::exact(96, 64), seed);
    fit(&o, &Silent).unwrap();
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("ring");
        generate_category(
            &data,
            &SyntheticSpec {
                seed: 2,
                size: 96,
                train: 10,
                test_good: 4,
                test_defect: 2,
            },
        )
        .unwrap();
        let model = dir.path().join("m.safetensors");
        fit_model(&data, &model, 1);
        let other_model = dir.path().join("other.safetensors");
        fit_model(&data, &other_model, 2);
        let test = tessera_data::Dataset::open(&data).unwrap().test().unwrap();
        let images: Vec<(PathBuf, Vec<u8>)> = test
            .iter()
            .map(|s| (s.path.clone(), std::fs::read(&s.path).unwrap()))
            .collect();
        let mut predicted = Vec::new();
        tessera_pipeline::predict(
            &PredictOptions {
                model: model.clone(),
                inputs: images.iter().map(|(p, _)| p.clone()).collect(),
                out: dir.path().join("pred"),
                overwrite: false,
                recursive: false,
                threshold: None,
                device: tessera_core::DeviceSpec::Cpu,
                batch_size: 1,
                precision: Default::default(),
            },
            &Silent,
            &mut |p| predicted.push((p.path.clone(), p.score)),
        )
        .unwrap();
        Fixture {
            _dir: dir,
            data,
            model,
            other_model,
            images,
            predicted,
        }
    })
}

fn opts(model: &Path, batch: BatchConfig) -> ServeOptions {
    ServeOptions {
        models: vec![("ring".into(), model.to_path_buf())],
        addr: "127.0.0.1:0".parse().unwrap(),
        batch,
        body_limit: 1 << 20,
        timeout: Duration::from_secs(60),
        ..Default::default()
    }
}

/// A running service on an ephemeral loopback port: its base URL, a shutdown trigger, and the
/// serving task (returns when drained).
struct Running {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<tessera_core::Result<()>>,
}

async fn start(o: ServeOptions) -> Running {
    let service = tokio::task::spawn_blocking(move || Service::new(o))
        .await
        .unwrap()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(service.run(listener, async move {
        let _ = rx.await;
    }));
    Running {
        base,
        stop: Some(tx),
        task,
    }
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the service stops within 30 s")
            .unwrap()
            .unwrap();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .no_proxy()
        .build()
        .unwrap()
}

fn sequential() -> BatchConfig {
    BatchConfig {
        max_batch: 1,
        max_wait: Duration::ZERO,
        queue: 64,
    }
}

async fn predict(c: &reqwest::Client, base: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    let r = c
        .post(format!("{base}/v1/models/ring:predict"))
        .header("content-type", "image/png")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_equal_predicts_to_the_last_bit() {
    let f = fixture();
    let s = start(opts(&f.model, sequential())).await;
    let c = client();
    for ((path, bytes), (ppath, want)) in f.images.iter().zip(&f.predicted) {
        assert_eq!(path, ppath);
        let (status, j) = predict(&c, &s.base, bytes.clone()).await;
        assert_eq!(status, 200, "{j}");
        let o: Outcome = serde_json::from_value(j).unwrap();
        assert_eq!(
            o.score.to_bits(),
            want.to_bits(),
            "{}: served {} vs predict {want}",
            path.display(),
            o.score
        );
        assert_eq!(o.anomalous, o.score > o.threshold);
        assert!(o.p_value.is_some() && (0.0..=1.0).contains(&o.normalized));
    }
    // Multipart upload, heatmap and regions.
    let form = reqwest::multipart::Form::new().part(
        "image",
        reqwest::multipart::Part::bytes(f.images.last().unwrap().1.clone()).file_name("x.png"),
    );
    let r = c
        .post(format!(
            "{}/v1/models/ring:predict?heatmap=true&regions=1",
            s.base
        ))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let o: Outcome = r.json().await.unwrap();
    assert_eq!(o.score.to_bits(), f.predicted.last().unwrap().1.to_bits());
    assert!(o
        .heatmap_png_base64
        .as_deref()
        .is_some_and(|h| h.len() > 100));
    assert!(o.regions.is_some());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_clients_times_32_requests_all_answered_with_their_own_scores() {
    let f = fixture();
    let s = start(opts(
        &f.model,
        BatchConfig {
            max_batch: 8,
            max_wait: Duration::from_millis(5),
            queue: 256,
        },
    ))
    .await;
    let c = client();
    let mut tasks = Vec::new();
    for client_id in 0..8usize {
        let (c, base) = (c.clone(), s.base.clone());
        tasks.push(tokio::spawn(async move {
            let f = fixture();
            let mut got = Vec::new();
            for k in 0..32usize {
                let i = (client_id * 7 + k) % f.images.len();
                let (status, j) = predict(&c, &base, f.images[i].1.clone()).await;
                assert_eq!(status, 200, "{j}");
                let o: Outcome = serde_json::from_value(j).unwrap();
                got.push((i, o.score, o.timings.batch_size));
            }
            got
        }));
    }
    let mut answered = 0;
    let mut batched = 0;
    for t in tasks {
        for (i, score, bs) in t.await.unwrap() {
            answered += 1;
            batched += (bs > 1) as usize;
            // Each answer is its own image's score (a batch never mixes answers up); batching
            // may move the last bits, so compare to a tight tolerance.
            let want = f.predicted[i].1;
            assert!(
                (score - want).abs() <= 1e-4 * want.abs().max(1.0),
                "image {i}: {score} vs {want}"
            );
        }
    }
    assert_eq!(answered, 256);
    assert!(batched > 0, "concurrent requests were batched");
    let m = client()
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("tessera_http_requests_total{route=\"predict\",status=\"200\"} 256"),
        "{m}"
    );
    assert!(m.contains("tessera_batch_size_bucket") && m.contains("tessera_images_scored_total"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_gives_503_and_the_service_stays_up() {
    let f = fixture();
    let s = start(opts(
        &f.model,
        BatchConfig {
            max_batch: 1,
            max_wait: Duration::ZERO,
            queue: 2,
        },
    ))
    .await;
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..48usize {
        let (c, base) = (c.clone(), s.base.clone());
        let body = f.images[i % f.images.len()].1.clone();
        tasks.push(tokio::spawn(async move {
            let r = c
                .post(format!("{base}/v1/models/ring:predict"))
                .body(body)
                .send()
                .await
                .unwrap();
            let retry = r.headers().get("retry-after").cloned();
            (r.status().as_u16(), retry)
        }));
    }
    let (mut ok, mut busy) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            (200, _) => ok += 1,
            (503, Some(_)) => busy += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(ok >= 1 && busy >= 1, "{ok} answered, {busy} refused");
    assert_eq!(ok + busy, 48);
    // Still up and answering.
    let (status, _) = predict(&c, &s.base, f.images[0].1.clone()).await;
    assert_eq!(status, 200);
    let h = c.get(format!("{}/healthz", s.base)).send().await.unwrap();
    assert_eq!(h.status(), 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_json_errors() {
    let f = fixture();
    let s = start(opts(&f.model, sequential())).await;
    let c = client();
    let err = |j: &serde_json::Value| j["error"]["message"].as_str().unwrap_or("").to_string();
    let (st, j) = predict(&c, &s.base, Vec::new()).await;
    assert_eq!(st, 400, "{j}");
    assert!(err(&j).contains("empty"), "{j}");
    let (st, j) = predict(&c, &s.base, b"certainly not a PNG".to_vec()).await;
    assert_eq!(st, 400, "{j}");
    assert!(err(&j).contains("not an image"), "{j}");
    let mut cut = f.images[0].1.clone();
    cut.truncate(cut.len() / 3);
    let (st, j) = predict(&c, &s.base, cut).await;
    assert_eq!(
        (st, j["error"]["code"].as_str()),
        (400, Some("bad_image")),
        "{j}"
    );
    // The server answers 413 before reading the whole body and closes that connection; a
    // client of its own, so no later request is sent on the closed connection from the pool.
    let (st, j) = predict(&client(), &s.base, vec![0u8; 2 << 20]).await;
    assert_eq!(st, 413, "{j}");
    let r = c
        .post(format!("{}/v1/models/nope:predict", s.base))
        .body(f.images[0].1.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let j: serde_json::Value = r.json().await.unwrap();
    assert!(err(&j).contains("ring"), "lists the served models: {j}");
    let r = c
        .post(format!("{}/v1/models/ring:predict?threshold=nan", s.base))
        .body(f.images[0].1.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c
        .get(format!("{}/v1/nothing", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // The models listing, readiness and the page.
    let m: Vec<tessera_serve::ModelInfo> = c
        .get(format!("{}/v1/models", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(
        (m[0].name.as_str(), m[0].scorer.as_str()),
        ("ring", "padim")
    );
    assert_eq!(m[0].input_size, Some((96, 64)));
    assert_eq!(m[0].checksum.len(), 64);
    assert_eq!(
        c.get(format!("{}/readyz", s.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let page = c.get(&s.base).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("Tessera inspection") && page.contains(":predict"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_a_good_file_and_refuses_a_bad_one() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served.safetensors");
    std::fs::copy(&f.model, &served).unwrap();
    let s = start(opts(&served, sequential())).await;
    let c = client();
    let reload = || async {
        c.post(format!("{}/v1/models/ring:reload", s.base))
            .send()
            .await
            .unwrap()
    };
    let (_, before) = predict(&c, &s.base, f.images[0].1.clone()).await;
    // A damaged file: refused, the old model keeps serving.
    std::fs::write(&served, b"half a model").unwrap();
    let r = reload().await;
    assert_eq!(r.status(), 422);
    let (st, again) = predict(&c, &s.base, f.images[0].1.clone()).await;
    assert_eq!(st, 200);
    assert_eq!(before["score"], again["score"]);
    // Another model: swapped in.
    std::fs::copy(&f.other_model, &served).unwrap();
    let r = reload().await;
    assert_eq!(r.status(), 200);
    let j: tessera_serve::Reloaded = r.json().await.unwrap();
    assert_ne!(j.checksum, j.previous_checksum);
    let (_, after) = predict(&c, &s.base, f.images[0].1.clone()).await;
    assert_eq!(after["checksum"].as_str(), Some(j.checksum.as_str()));
    assert_ne!(before["score"], after["score"]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_requests_in_flight() {
    let f = fixture();
    // A long batching wait keeps requests in flight when the shutdown comes.
    let s = start(opts(
        &f.model,
        BatchConfig {
            max_batch: 64,
            max_wait: Duration::from_millis(400),
            queue: 64,
        },
    ))
    .await;
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..6usize {
        let (c, base) = (c.clone(), s.base.clone());
        let body = f.images[i % f.images.len()].1.clone();
        tasks.push(tokio::spawn(
            async move { predict(&c, &base, body).await.0 },
        ));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let base = s.base.clone();
    s.stop().await;
    for t in tasks {
        assert_eq!(
            t.await.unwrap(),
            200,
            "every request in flight was answered"
        );
    }
    // And nothing listens any more.
    assert!(client()
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_err());
    let _ = &f.data;
}

#[test]
fn model_names_are_refused_unless_plain() {
    let long = "x".repeat(65);
    for bad in ["", "a:b", "a/b", "<b>x</b>", "a b", long.as_str()] {
        let e = Service::new(ServeOptions {
            models: vec![(bad.to_string(), "/nonexistent.safetensors".into())],
            ..Default::default()
        })
        .err()
        .expect("refused")
        .to_string();
        assert!(e.contains("model name"), "{bad:?}: {e}");
    }
    // A plain name gets past the check and fails on the missing file, naming it.
    let e = Service::new(ServeOptions {
        models: vec![("line-3.cam_1".into(), "/nonexistent.safetensors".into())],
        ..Default::default()
    })
    .err()
    .expect("refused")
    .to_string();
    assert!(e.contains("/nonexistent.safetensors"), "{e}");
}
