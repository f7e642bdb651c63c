//! Prometheus metrics (text exposition format on `GET /metrics`): requests by route and status,
//! latency and batch-size histograms, queue depth, images scored and images/s.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, linear_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Model {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reload {
    model: String,
    result: String,
}

/// The service's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    latency: Family<Route, Histogram>,
    batch: Histogram,
    queue: Family<Model, Gauge>,
    images: Family<Model, Counter>,
    rate: Gauge<f64, AtomicU64>,
    reloads: Family<Reload, Counter>,
    /// Batch completions in the last [`RATE_WINDOW`]: (when, images).
    recent: Mutex<VecDeque<(Instant, u64)>>,
}

/// The window of the images/s gauge.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

impl Metrics {
    pub fn new(max_batch: usize) -> Self {
        let mut registry = Registry::with_prefix("tessera");
        let requests = Family::<RouteStatus, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        let latency = Family::<Route, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 15))
        });
        registry.register(
            "http_request_duration_seconds",
            "Request latency by route",
            latency.clone(),
        );
        let batch = Histogram::new(linear_buckets(1.0, 1.0, max_batch.clamp(1, 256) as u16));
        registry.register("batch_size", "Images per backbone batch", batch.clone());
        let queue = Family::<Model, Gauge>::default();
        registry.register("queue_depth", "Requests waiting per model", queue.clone());
        let images = Family::<Model, Counter>::default();
        registry.register("images_scored", "Images scored per model", images.clone());
        let rate = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "images_per_second",
            "Images scored per second over the last 10 s",
            rate.clone(),
        );
        let reloads = Family::<Reload, Counter>::default();
        registry.register("model_reloads", "Model reloads by result", reloads.clone());
        Self {
            registry,
            requests,
            latency,
            batch,
            queue,
            images,
            rate,
            reloads,
            recent: Mutex::new(VecDeque::new()),
        }
    }

    pub fn observe_request(&self, route: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RouteStatus {
                route: route.into(),
                status: status.to_string(),
            })
            .inc();
        self.latency
            .get_or_create(&Route {
                route: route.into(),
            })
            .observe(seconds);
    }

    pub fn observe_batch(&self, n: usize) {
        self.batch.observe(n as f64);
    }

    pub fn set_queue_depth(&self, model: &str, n: usize) {
        self.queue
            .get_or_create(&Model {
                model: model.into(),
            })
            .set(n as i64);
    }

    pub fn add_images(&self, model: &str, n: u64) {
        self.images
            .get_or_create(&Model {
                model: model.into(),
            })
            .inc_by(n);
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        r.push_back((Instant::now(), n));
    }

    pub fn reloaded(&self, model: &str, ok: bool) {
        self.reloads
            .get_or_create(&Reload {
                model: model.into(),
                result: if ok { "ok" } else { "refused" }.into(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        {
            let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            while r.front().is_some_and(|(t, _)| now - *t > RATE_WINDOW) {
                r.pop_front();
            }
            let n: u64 = r.iter().map(|(_, n)| n).sum();
            self.rate.set(n as f64 / RATE_WINDOW.as_secs_f64());
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
