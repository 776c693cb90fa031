//! The OpenAI-compatible HTTP server of nstream: routes, errors, auth, limits, metrics, shutdown.
//!
//! [`app`] builds the whole router from an [`AppState`] (models, settings, metrics) and is tested
//! without a socket; [`serve`] runs it on a listener with graceful shutdown; the binaries add
//! flags and logging around them.
//!
//! # Routes
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/embeddings` | float or base64 vectors; `dimensions` truncates (and renormalises normalised models) |
//! | `POST /v1/chat/completions` | JSON, or SSE when `stream` is true (`data: {chunk}` ... `data: [DONE]`) |
//! | `POST /v1/completions` | legacy completions, same streaming |
//! | `GET /v1/models`, `GET /v1/models/{id}` | OpenAI's list shape, plus an `nstream` object per model |
//! | `/v1/files`, `/v1/vector_stores[/{id}[/files[/{file}[/content]]\|/file_batches[/{batch}[/cancel\|/files]]\|/search]]` | OpenAI's files and vector-stores API, answered by [`AppState::with_vector_stores`]'s backend |
//! | `GET /health` | 200 while the process answers (liveness) |
//! | `GET /ready` | 200 when every model reports ready, else 503 with each model's state (readiness) |
//! | `GET /metrics` | Prometheus/OpenMetrics text (see [`Metrics`]); needs a key with [`ServerConfig::metrics_require_key`] |
//!
//! # Errors
//!
//! Every failure, including bad JSON, unknown routes, 405, 413 and 415, is answered as
//! `{"error":{"message","type","param","code"}}` by [`ApiError`]; backend errors map through
//! [`nstream_backend::BackendError::status_code`]. A backend reporting `Overloaded` yields 503
//! with `Retry-After`. Internal details are logged, never returned.
//!
//! # Cross-cutting layers
//!
//! - `x-request-id`: kept from the request or generated (UUID v4), echoed on the response and
//!   recorded on the request's tracing span.
//! - Bearer auth on `/v1/*` when any key source is set ([`ServerConfig::api_key`],
//!   [`ServerConfig::api_key_file`], [`ServerConfig::api_keys_file`]; see [`auth`]): named keys,
//!   re-read when their files change, each optionally limited to some models (others answer 404
//!   `model_not_found` and are left out of `/v1/models`) and to requests and tokens per minute
//!   (429 `rate_limit_exceeded` with `Retry-After` and OpenAI's `x-ratelimit-*` headers). The
//!   key's name is recorded on the request span. `/health` and `/ready` stay open; `/metrics`
//!   too unless [`ServerConfig::metrics_require_key`].
//! - Body limit [`ServerConfig::max_body_bytes`] (413; uploads to `/v1/files`
//!   [`ServerConfig::max_upload_bytes`]), at most
//!   [`ServerConfig::max_embedding_inputs`] inputs per embeddings request (400).
//! - Overload control on `/v1/*`, before the key check and before the body is read: at most
//!   [`ServerConfig::max_concurrent_requests`] at once (429 `server_overloaded`, `Retry-After`);
//!   [`ServerConfig::body_read_timeout`] (408), [`ServerConfig::request_timeout`] (504) and
//!   [`ServerConfig::stream_deadline`] (an error event ends the stream). [`serve_with`] adds the
//!   header-read timeout and the drain sequence. Refusals are counted by reason ([`ShedReason`]).
//! - A panic in a handler becomes a 500 JSON error rather than a dropped connection.
//! - No CORS layer: browsers cannot call the API cross-origin unless a proxy in front allows it.

mod adapters;
pub mod auth;
mod config;
mod error;
mod extract;
mod metrics;
mod overload;
mod routes;
mod shutdown;
mod state;
mod stream;
mod vector_stores;

use std::future::Future;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub use auth::{KeyIdentity, KeyRing, KeySources, Refusal};
pub use config::{ApiKey, ServerConfig};
pub use error::ApiError;
pub use extract::OpenAiJson;
pub use metrics::{InFlight, Metrics, NO_KEY, OPENMETRICS_CONTENT_TYPE, ShedReason, TokenKind};
pub use shutdown::{Shutdown, termination_signal};
pub use state::{AppState, ModelRegistry, ServerError};

/// The whole HTTP application for `state`.
pub fn app(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/embeddings", post(routes::embeddings))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/models", get(routes::list_models))
        .route("/v1/load_lora_adapter", post(adapters::load))
        .route("/v1/unload_lora_adapter", post(adapters::unload))
        .route("/v1/models/{*id}", get(routes::get_model))
        .merge(vector_stores::routes(state.config().max_upload_bytes))
        // `route_layer`: only matched routes need a key, so unknown paths still answer 404.
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_key))
        // Outside the key check: overload is shed before any other work.
        .route_layer(middleware::from_fn_with_state(state.clone(), overload::limit));
    let operations = Router::new().route("/health", get(routes::health)).route("/ready", get(routes::ready));
    let mut metrics = Router::new().route("/metrics", get(routes::metrics));
    if state.config().metrics_require_key {
        metrics = metrics.route_layer(middleware::from_fn_with_state(state.clone(), auth::require_any_key));
    }

    let request_id_header = header::HeaderName::from_static("x-request-id");
    Router::new()
        .merge(api)
        .merge(operations)
        .merge(metrics)
        .fallback(routes::route_not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config().max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), refuse_declared_oversize))
        // Inside the routes, so `MatchedPath` is known when the request is counted.
        .layer(middleware::from_fn_with_state(state.clone(), record_metrics))
        .layer(
            // Outermost first: the id is set before the span is made and copied to the response.
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(request_id_header.clone(), MakeRequestUuid))
                .layer(PropagateRequestIdLayer::new(request_id_header))
                .layer(TraceLayer::new_for_http().make_span_with(request_span))
                .layer(CatchPanicLayer::custom(panic_response)),
        )
        .with_state(state)
}

fn request_span(request: &Request) -> tracing::Span {
    let request_id = request.headers().get("x-request-id").and_then(|value| value.to_str().ok()).unwrap_or_default();
    // The path only: query strings can carry secrets.
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = request.uri().path(),
        request_id,
        // The key's name (never the key), recorded by the auth middleware.
        key = tracing::field::Empty,
    )
}

fn panic_response(payload: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic payload");
    ApiError::internal(format!("handler panicked: {detail}")).into_response()
}

/// How much of an oversized body is read and discarded before the 413 is sent. A client that
/// writes its whole body before reading (most HTTP libraries) would otherwise see the connection
/// reset ("broken pipe") instead of the answer; beyond this the connection is simply closed.
const OVERSIZE_DRAIN_BYTES: usize = 64 * 1024 * 1024;

/// Answers 413 from `Content-Length` alone, before any handler reads the body, then drains a
/// bounded amount of it so the client gets to read the answer. Bodies without a length are
/// limited while they are read ([`DefaultBodyLimit`]).
async fn refuse_declared_oversize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let upload = vector_stores::is_upload(&request);
    let limit = if upload { state.config().max_upload_bytes } else { state.config().max_body_bytes };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    let Some(declared) = declared.filter(|length| *length > limit as u64) else {
        return next.run(request).await;
    };
    if declared <= OVERSIZE_DRAIN_BYTES as u64 {
        let mut body = request.into_body().into_data_stream();
        let mut drained = 0_usize;
        while let Some(Ok(chunk)) = futures_util::StreamExt::next(&mut body).await {
            drained += chunk.len();
            if drained > OVERSIZE_DRAIN_BYTES {
                break;
            }
        }
    }
    if upload { ApiError::upload_too_large(limit) } else { ApiError::payload_too_large(limit) }.into_response()
}

async fn record_metrics(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(request).await;
    let model = response.extensions().get::<routes::ModelLabel>().map_or("", |label| label.0.as_str());
    let key = response.extensions().get::<auth::KeyLabel>().map_or(metrics::NO_KEY, |label| &*label.0);
    state.metrics().record_request(&route, model, key, response.status().as_u16(), started.elapsed());
    response
}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting connections and
/// waits for in-flight requests (streams included) to finish before returning. Headers must
/// arrive within [`ServerConfig::default`]'s `header_read_timeout`; [`serve_with`] applies the
/// app's own settings and the whole drain sequence.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let settings = shutdown::ConnectionSettings {
        header_read_timeout: ServerConfig::default().header_read_timeout,
        drain_delay: std::time::Duration::ZERO,
        shutdown_timeout: None,
    };
    let shutdown = async move {
        shutdown.await;
        Shutdown::Now
    };
    shutdown::run(listener, app, shutdown::Lifecycle::default(), settings, shutdown).await
}

/// Serves `app`, built from `state` (possibly with more layers), on `listener` with `state`'s
/// connection and shutdown settings. When `shutdown` completes:
///
/// 1. `/ready` answers 503 at once;
/// 2. for [`Shutdown::Drain`], requests are still accepted for [`ServerConfig::drain_delay`];
/// 3. the listener closes and in-flight requests may finish within
///    [`ServerConfig::shutdown_timeout`];
/// 4. then streams still running end with an error event (`code: "server_shutting_down"`) and
///    `data: [DONE]`, other requests are answered 503, and the function returns.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    app: Router,
    state: &AppState,
    shutdown: impl Future<Output = Shutdown> + Send + 'static,
) -> Result<(), ServerError> {
    let config = state.config();
    let settings = shutdown::ConnectionSettings {
        header_read_timeout: config.header_read_timeout,
        drain_delay: config.drain_delay,
        shutdown_timeout: config.shutdown_timeout,
    };
    shutdown::run(listener, app, state.lifecycle().clone(), settings, shutdown).await
}

/// Completes on SIGINT (Ctrl-C) or, on Unix, SIGTERM (what Kubernetes sends). Pass it to
/// [`serve`]; [`termination_signal`] also says which came, for [`serve_with`]. If a handler
/// cannot be installed, that signal is logged and ignored.
pub async fn shutdown_signal() {
    termination_signal().await;
}
