//! The HTTP API: routes, request parsing, JSON answers and errors.

use crate::batcher::{Job, Want};
use crate::state::{Loaded, ModelInfo, ModelSlot};
use crate::App;
use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// An error answer: a status and a JSON body `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_image(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_image", m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
            },
        });
        let mut r = (self.status, body).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// A region of the predicted mask, in network-input pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Region {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    /// Pixels.
    pub area: u64,
    pub max_score: f32,
}

/// Where a request's time went, milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub decode_ms: f64,
    pub queue_ms: f64,
    /// Preprocessing and scoring of the whole batch.
    pub batch_ms: f64,
    /// Images in that batch.
    pub batch_size: usize,
    pub total_ms: f64,
}

/// The answer to `POST /v1/models/{name}:predict`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub model: String,
    /// The model's tensor checksum (which model file answered).
    pub checksum: String,
    /// The raw image score.
    pub score: f32,
    /// 0.5 at the threshold.
    pub normalized: f32,
    /// How many calibration normals score this high.
    pub p_value: Option<f64>,
    /// `score > threshold`.
    pub anomalous: bool,
    pub threshold: f32,
    pub pixel_threshold: f32,
    /// The network-input size the map and regions refer to (width, height).
    pub input_size: (u32, u32),
    /// The uploaded image's size.
    pub original_size: (u32, u32),
    /// The heatmap panel (image | heatmap | — | predicted mask) as base64 PNG, when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heatmap_png_base64: Option<String>,
    /// Regions of the predicted mask, largest first, when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions: Option<Vec<Region>>,
    pub timings: Timings,
}

/// Query parameters of predict.
#[derive(Debug, Default, Deserialize)]
pub struct PredictQuery {
    pub threshold: Option<String>,
    #[serde(default)]
    pub heatmap: Option<String>,
    #[serde(default)]
    pub regions: Option<String>,
}

fn flag(v: &Option<String>, name: &str) -> Result<bool, ApiError> {
    match v.as_deref() {
        None => Ok(false),
        Some("" | "1" | "true" | "yes") => Ok(true),
        Some("0" | "false" | "no") => Ok(false),
        Some(other) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            format!("{name}={other}: expected true or false"),
        )),
    }
}

impl PredictQuery {
    fn want(&self) -> Result<Want, ApiError> {
        let threshold = match &self.threshold {
            None => None,
            Some(t) => match t.parse::<f32>() {
                Ok(v) if v.is_finite() => Some(v),
                _ => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "bad_query",
                        format!("threshold={t}: expected a finite number"),
                    ))
                }
            },
        };
        Ok(Want {
            threshold,
            heatmap: flag(&self.heatmap, "heatmap")?,
            regions: flag(&self.regions, "regions")?,
        })
    }
}

fn slot(app: &App, name: &str) -> Result<Arc<ModelSlot>, ApiError> {
    app.models.get(name).cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_model",
            format!(
                "no model named '{name}' (served: {})",
                app.models.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        )
    })
}

/// The image bytes of a request: the body itself, or the `image` part (else the first file
/// part) of a multipart form.
async fn image_bytes(req: Request, app: &App) -> Result<Bytes, ApiError> {
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let too_large = |status: StatusCode, e: &dyn std::fmt::Display| {
        let m = e.to_string();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "the request body exceeds the {} byte limit",
                    app.opts.body_limit
                ),
            )
        } else {
            ApiError::bad_image(format!("cannot read the request body: {m}"))
        }
    };
    if !multipart {
        return Bytes::from_request(req, &())
            .await
            .map_err(|e| too_large(e.status(), &e));
    }
    let mut mp = Multipart::from_request(req, &())
        .await
        .map_err(|e| ApiError::bad_image(format!("bad multipart form: {e}")))?;
    let mut fallback = None;
    while let Some(field) = mp
        .next_field()
        .await
        .map_err(|e| too_large(e.status(), &e))?
    {
        let is_image = field.name() == Some("image");
        let is_file = field.file_name().is_some();
        if is_image || (is_file && fallback.is_none()) {
            let b = field.bytes().await.map_err(|e| too_large(e.status(), &e))?;
            if is_image {
                return Ok(b);
            }
            fallback = Some(b);
        }
    }
    fallback
        .ok_or_else(|| ApiError::bad_image("the multipart form has no 'image' field and no file"))
}

/// `POST /v1/models/{name}:predict` and `POST /v1/models/{name}:reload`.
pub async fn model_action(
    State(app): State<Arc<App>>,
    Path(target): Path<String>,
    Query(q): Query<PredictQuery>,
    req: Request,
) -> Result<Response, ApiError> {
    let Some((name, action)) = target.rsplit_once(':') else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_action",
            format!("'{target}': use /v1/models/<name>:predict or :reload"),
        ));
    };
    let slot = slot(&app, name)?;
    match action {
        "predict" => predict(app, slot, q, req)
            .await
            .map(|o| Json(o).into_response()),
        "reload" => reload(&app, &slot).await.map(|r| Json(r).into_response()),
        other => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_action",
            format!("'{other}': the actions are predict and reload"),
        )),
    }
}

async fn predict(
    app: Arc<App>,
    slot: Arc<ModelSlot>,
    q: PredictQuery,
    req: Request,
) -> Result<Outcome, ApiError> {
    let want = q.want()?;
    let bytes = image_bytes(req, &app).await?;
    if bytes.is_empty() {
        return Err(ApiError::bad_image(
            "the request body is empty: send an image",
        ));
    }
    // Refuse what is not an image at once; the full decode runs with the batch.
    if image::guess_format(&bytes).is_err() {
        return Err(ApiError::bad_image(
            "request body: not an image in a known format (PNG, JPEG, BMP or TIFF)",
        ));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = Job {
        bytes,
        want,
        enqueued: Instant::now(),
        reply: tx,
    };
    let Some(queue) = app.queues.get(&slot.name) else {
        return Err(ApiError::internal("the model has no queue"));
    };
    slot.queued.fetch_add(1, Ordering::Relaxed);
    if queue.offer(job).is_err() {
        slot.queued.fetch_sub(1, Ordering::Relaxed);
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "model '{}' has {} requests waiting (the queue is full); retry shortly",
                slot.name, app.opts.batch.queue
            ),
        ));
    }
    app.metrics.set_queue_depth(&slot.name, slot.queued());
    match tokio::time::timeout(app.opts.timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(ApiError::internal("the scoring worker stopped")),
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("no answer within {:.1} s", app.opts.timeout.as_secs_f64()),
        )),
    }
}

/// The answer to a reload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reloaded {
    pub model: String,
    pub previous_checksum: String,
    pub checksum: String,
}

/// Load the slot's file again and swap it in; a file that does not load is refused and the
/// old model keeps serving.
pub async fn reload(app: &App, slot: &Arc<ModelSlot>) -> Result<Reloaded, ApiError> {
    let _one = slot.reloading.lock().await;
    let path = slot.path.clone();
    let (device, precision) = (app.device.clone(), app.opts.precision);
    let loaded = tokio::task::spawn_blocking(move || Loaded::load(&path, &device, precision))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    match loaded {
        Ok(l) => {
            let checksum = l.checksum.clone();
            let old = slot.replace(l);
            app.metrics.reloaded(&slot.name, true);
            Ok(Reloaded {
                model: slot.name.clone(),
                previous_checksum: old.checksum.clone(),
                checksum,
            })
        }
        Err(e) => {
            app.metrics.reloaded(&slot.name, false);
            Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "reload_refused",
                format!("{e}; the previous model keeps serving"),
            ))
        }
    }
}

/// `GET /v1/models`.
pub async fn models(State(app): State<Arc<App>>) -> Json<Vec<ModelInfo>> {
    Json(app.models.values().map(|s| s.info()).collect())
}

/// `GET /healthz`: the process is alive.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "alive" }))
}

/// `GET /readyz`: every model loaded and warmed up, and not shutting down.
pub async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.ready.load(Ordering::Relaxed) {
        Json(serde_json::json!({ "status": "ready", "models": app.models.len() })).into_response()
    } else {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "not ready").into_response()
    }
}

/// `GET /metrics`.
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    (h, app.metrics.encode()).into_response()
}

/// `GET /`: the inspection page.
pub async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

/// The route label of a path, for metrics.
fn route_of(path: &str) -> &'static str {
    match path {
        "/" => "page",
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        "/metrics" => "metrics",
        "/v1/models" => "models",
        p if p.starts_with("/v1/models/") && p.ends_with(":predict") => "predict",
        p if p.starts_with("/v1/models/") && p.ends_with(":reload") => "reload",
        _ => "other",
    }
}

/// Count every request by route and status, and time it.
pub async fn observe(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let route = route_of(req.uri().path());
    let t0 = Instant::now();
    let r = next.run(req).await;
    app.metrics
        .observe_request(route, r.status().as_u16(), t0.elapsed().as_secs_f64());
    r
}

/// Unknown routes: a JSON 404.
pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route (see GET /v1/models, POST /v1/models/<name>:predict)",
    )
}
