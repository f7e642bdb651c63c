//! # tessera-serve
//!
//! An inspection service a production line can call: HTTP/1.1 + JSON on tokio and axum,
//! scoring through the same model-file → [`tessera_pipeline::Detector::score`] path as
//! `tessera test` and `predict` (the same image gives the same score, to the last bit).
//!
//! - `POST /v1/models/{name}:predict` — the image as the body (PNG, JPEG, BMP, TIFF) or a
//!   multipart form (`image` field); `?threshold=`, `?heatmap=true` (base64 PNG panel),
//!   `?regions=true` (bounding boxes and areas of the predicted mask). Answers the raw,
//!   normalised and p-value scores, the decision at the model's calibrated threshold, timings.
//! - `POST /v1/models/{name}:reload` (and SIGHUP for all) — load the file again and swap it in
//!   atomically; a file that does not load is refused and the old model keeps serving.
//! - `GET /v1/models`, `GET /healthz`, `GET /readyz`, `GET /metrics` (Prometheus), `GET /`
//!   (an inspection page: drop an image, see the decision and the heatmap).
//! - **Dynamic batching** per model (`max_batch`, `max_wait`): concurrent requests share one
//!   backbone batch. **Backpressure**: a bounded queue answers 503 with `Retry-After` when
//!   full; bodies over the limit get 413, undecodable images 400 (JSON naming the problem),
//!   unknown models 404, slow requests 504. SIGTERM/SIGINT stop accepting and drain what is in
//!   flight.
//!
//! ```no_run
//! use tessera_serve::{serve, ServeOptions};
//! # async fn run() -> tessera_core::Result<()> {
//! let opts = ServeOptions {
//!     models: vec![("bottle".into(), "bottle.padim.safetensors".into())],
//!     addr: "127.0.0.1:8080".parse().unwrap(),
//!     ..Default::default()
//! };
//! serve(opts, tessera_serve::shutdown_signal()).await
//! # }
//! ```

pub mod api;
pub mod batcher;
pub mod metrics;
pub mod state;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use batcher::BatchConfig;
use state::{Loaded, ModelSlot};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tessera_core::{DeviceSpec, Error, Result};

pub use api::{ApiError, Outcome, Region, Reloaded};
pub use state::ModelInfo;

/// Settings of the service.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// (name, model file) pairs.
    pub models: Vec<(String, PathBuf)>,
    pub addr: SocketAddr,
    pub device: DeviceSpec,
    pub batch: BatchConfig,
    /// Largest request body, bytes.
    pub body_limit: usize,
    /// Longest wait for an answer.
    pub timeout: Duration,
    /// The backbones' products: f32, or bf16 where the CPU has native bf16 dot products
    /// (f32 elsewhere, with a warning at load).
    pub precision: tessera_pipeline::Precision,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            models: Vec::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            device: DeviceSpec::Cpu,
            batch: BatchConfig {
                max_batch: 8,
                max_wait: Duration::from_millis(5),
                queue: 64,
            },
            body_limit: 32 << 20,
            timeout: Duration::from_secs(30),
            precision: Default::default(),
        }
    }
}

/// The shared state of a running service.
pub struct App {
    pub opts: ServeOptions,
    pub models: BTreeMap<String, Arc<ModelSlot>>,
    /// Each model's queue (held here only: when the app goes, the batching threads drain and
    /// stop).
    pub queues: BTreeMap<String, batcher::Queue>,
    pub metrics: Arc<metrics::Metrics>,
    /// All models loaded and warmed up, and not shutting down.
    pub ready: AtomicBool,
    pub device: candle_core::Device,
}

/// A service ready to be served: its router, and the batching threads to join after shutdown.
pub struct Service {
    pub app: Arc<App>,
    pub router: Router,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Service {
    /// Load and warm up every model (errors name the file), start the batching threads, and
    /// build the router.
    pub fn new(opts: ServeOptions) -> Result<Self> {
        if opts.models.is_empty() {
            return Err(Error::Config(
                "nothing to serve: give at least one --model NAME=FILE".into(),
            ));
        }
        if opts.batch.max_batch == 0 || opts.batch.queue == 0 {
            return Err(Error::Config(
                "--max-batch and --queue must be at least 1".into(),
            ));
        }
        let device = opts.device.open()?;
        let metrics = Arc::new(metrics::Metrics::new(opts.batch.max_batch));
        let mut models = BTreeMap::new();
        let mut queues = BTreeMap::new();
        let mut workers = Vec::new();
        for (name, path) in &opts.models {
            // Names go into URLs, metric labels and the page: keep them plain.
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(Error::Config(format!(
                    "model name '{name}': use 1 to 64 letters, digits, '-', '_' or '.'"
                )));
            }
            if models.contains_key(name) {
                return Err(Error::Config(format!("model name '{name}' given twice")));
            }
            let loaded = Loaded::load(path, &device, opts.precision)?;
            let (q, rx) = batcher::queue(opts.batch);
            let slot = Arc::new(ModelSlot::new(name.clone(), path.clone(), loaded));
            queues.insert(name.clone(), q);
            metrics.set_queue_depth(name, 0);
            workers.push(batcher::spawn_worker(
                slot.clone(),
                rx,
                opts.batch,
                metrics.clone(),
            ));
            models.insert(name.clone(), slot);
        }
        let app = Arc::new(App {
            opts,
            models,
            queues,
            metrics,
            ready: AtomicBool::new(true),
            device,
        });
        let router = Router::new()
            .route("/", get(api::page))
            .route("/healthz", get(api::healthz))
            .route("/readyz", get(api::readyz))
            .route("/metrics", get(api::metrics))
            .route("/v1/models", get(api::models))
            .route("/v1/models/{target}", post(api::model_action))
            .fallback(api::not_found)
            .layer(DefaultBodyLimit::max(app.opts.body_limit))
            .layer(axum::middleware::from_fn_with_state(
                app.clone(),
                api::observe,
            ))
            .with_state(app.clone());
        Ok(Self {
            app,
            router,
            workers,
        })
    }

    /// Serve on `listener` until `shutdown` resolves, then drain: stop accepting, finish the
    /// requests in flight, let the batching threads empty their queues.
    pub async fn run(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let Service {
            app,
            router,
            workers,
        } = self;
        let addr = listener.local_addr().ok();
        let draining = app.clone();
        let hup = app.clone();
        let reloader = tokio::spawn(async move { reload_on_sighup(hup).await });
        let r = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                shutdown.await;
                draining.ready.store(false, Ordering::Relaxed);
            })
            .await;
        reloader.abort();
        let _ = reloader.await;
        // The slots (and their queue senders) go with the app; then the workers finish.
        drop(app);
        for w in workers {
            let _ = w.join();
        }
        r.map_err(|e| {
            Error::Unavailable(format!(
                "serving on {}: {e}",
                addr.map(|a| a.to_string()).unwrap_or_default()
            ))
        })
    }
}

/// SIGHUP reloads every model (a file that does not load is refused, the old one stays).
async fn reload_on_sighup(app: Arc<App>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut s) = signal(SignalKind::hangup()) else {
            return;
        };
        while s.recv().await.is_some() {
            for slot in app.models.values() {
                let _ = api::reload(&app, slot).await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = app;
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Load the models, bind `opts.addr` and serve until `shutdown`.
pub async fn serve(
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr = opts.addr;
    let service = tokio::task::spawn_blocking(move || Service::new(opts))
        .await
        .map_err(|e| Error::Config(e.to_string()))??;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Unavailable(format!("cannot listen on {addr}: {e}")))?;
    service.run(listener, shutdown).await
}
