//! The router of nstream: one OpenAI endpoint for every model of a cluster.
//!
//! It watches MegaModels, BaseModels and EmbeddingModels and the EndpointSlices of their Services
//! ([`discovery`]), and forwards each request to a Ready pod of the model its body's `model`
//! names, straight to the pod's IP (no Service hop, so it can balance per pod).
//!
//! # Why its own binary
//!
//! `nstream-router` ships in the operator's image but runs as its own Deployment: it is on the
//! request path and scales with traffic (any number of replicas, no leader), while the operator
//! is leader-elected and must run once; a router crash or rollout never stops reconciles, and an
//! operator restart or lost Lease never drops requests. Its RBAC is also narrower (read models
//! and EndpointSlices, read API-key Secrets by name, patch the scale subresources).
//!
//! # Routes
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/...` (chat/completions, completions, embeddings, anything naming `model`) | forwarded to a Ready pod of that model; the answer (SSE included) streams back as the pod writes it |
//! | `GET /v1/models`, `GET /v1/models/{id}` | the models the caller's key may use that are Ready or scaled to zero (OpenAI's list shape) |
//! | `GET /health` | 200 while the process answers |
//! | `GET /ready` | 200 once every watch has listed its objects, 503 while draining |
//! | `GET /metrics` | OpenMetrics text ([`metrics::Metrics`]) |
//!
//! # Names
//!
//! A model answers to its resource's `metadata.name` (what its server answers to) and, for a
//! BaseModel's adapters, to each adapter's `name` (routed to the BaseModel's pods). The qualified
//! name `namespace/name` is always accepted and rewritten to the bare name upstream; the bare name
//! is accepted when exactly one namespace serves it (among those the caller's key may use), and
//! is otherwise refused with 400 `model_ambiguous` naming the qualified names. `/v1/models`
//! shows bare names, qualified ones where two namespaces share a name.
//!
//! # Keys
//!
//! Callers' keys are checked by [`nstream_server::KeyRing`] (the servers' keys file format); a
//! key's `models` may list bare or qualified names; a model it may not use answers 404
//! `model_not_found`, like a missing one, and is left out of `/v1/models`. `requestsPerMinute`
//! is enforced here; `tokensPerMinute` is not (the router does not count tokens). Upstream, each
//! request carries the key of its model's server, read from the Secret `<object>-api-key`
//! ([`cluster::UpstreamKeys`]).
//!
//! # Failures
//!
//! Errors are OpenAI-shaped. Unknown model: 404. No Ready endpoint: the request is held (see
//! below) and answered 503 with `Retry-After` when the wait runs out. A connect failure is retried
//! once on another endpoint (nothing was sent, so this is safe for streams too), then 502; an
//! upstream 401 makes the router read the key again and retry once (the key was rotated).
//!
//! # Scale to zero
//!
//! A request for a model with no Ready endpoint waits in a bounded per-model queue
//! ([`RouterSettings::hold_queue_size`]) for at most [`RouterSettings::hold_timeout`]; when the
//! model's scale is 0, the router patches it to 1 ([`cluster::Scaler`]), never otherwise, so it
//! does not fight the autoscaler. The request is forwarded as soon as an endpoint turns Ready.
//! Held counts are in `/metrics`.

pub mod balance;
pub mod cluster;
pub mod discovery;
pub mod hold;
pub mod metrics;
pub mod table;

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use nstream_server::{ApiError, KeyIdentity, KeyRing, Refusal};
use serde::Deserialize;
use tokio::sync::watch;

use crate::balance::Balancer;
use crate::cluster::{Scaler, UpstreamKeys};
use crate::hold::HoldQueues;
use crate::metrics::Metrics;
use crate::table::{InFlight, ModelRoute, RouteTable, Unresolved};

/// Why the router could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouterError {
    /// A `--static-route` is not `MODEL=http://HOST:PORT`.
    #[error("--static-route {route:?}: {problem}")]
    InvalidStaticRoute {
        /// The flag's value.
        route: String,
        /// What is wrong and what was expected.
        problem: String,
    },
    /// Serving the socket failed.
    #[error("serving: {cause}")]
    Serve {
        /// What the server said.
        cause: nstream_server::ServerError,
    },
}

/// How the router behaves; the binary's flags.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RouterSettings {
    /// The largest request body read (413 beyond); the servers' default.
    pub max_body_bytes: usize,
    /// How long a request waits for a model with no Ready endpoint.
    pub hold_timeout: Duration,
    /// How many requests wait per model (503 beyond; 0: none wait).
    pub hold_queue_size: usize,
    /// `Retry-After` of the 503s, in seconds.
    pub retry_after_seconds: u64,
    /// How long connecting to a pod may take before the attempt counts as failed.
    pub connect_timeout: Duration,
}

impl Default for RouterSettings {
    fn default() -> Self {
        Self {
            max_body_bytes: nstream_server::ServerConfig::default().max_body_bytes,
            hold_timeout: Duration::from_secs(120),
            hold_queue_size: 100,
            retry_after_seconds: 5,
            connect_timeout: Duration::from_secs(3),
        }
    }
}

/// Everything a request needs; cheap to clone.
#[derive(Clone)]
pub struct RouterState {
    inner: Arc<Inner>,
}

struct Inner {
    settings: RouterSettings,
    table: watch::Receiver<Arc<RouteTable>>,
    synced: watch::Receiver<bool>,
    draining: AtomicBool,
    keys: Option<KeyRing>,
    upstream_keys: Option<UpstreamKeys>,
    scaler: Option<Scaler>,
    metrics: Arc<Metrics>,
    balancer: Balancer,
    holds: HoldQueues,
    client: HttpClient<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for RouterState {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RouterState")
            .field("settings", &self.inner.settings)
            .field("keys", &self.inner.keys)
            .finish_non_exhaustive()
    }
}

impl RouterState {
    /// A router over `table` (ready once `synced` is true), checking callers with `keys` (open
    /// when `None`), sending upstream the keys of `upstream_keys` and scaling from zero with
    /// `scaler` (both `None` for static routes).
    pub fn new(
        settings: RouterSettings,
        table: watch::Receiver<Arc<RouteTable>>,
        synced: watch::Receiver<bool>,
        keys: Option<KeyRing>,
        upstream_keys: Option<UpstreamKeys>,
        scaler: Option<Scaler>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.connect_timeout));
        let client =
            HttpClient::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(connector);
        let holds = HoldQueues::new(settings.hold_queue_size);
        Self {
            inner: Arc::new(Inner {
                settings,
                table,
                synced,
                draining: AtomicBool::new(false),
                keys,
                upstream_keys,
                scaler,
                metrics,
                balancer: Balancer::default(),
                holds,
                client,
            }),
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Makes `/ready` answer 503 (the shutdown began).
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
    }

    fn table(&self) -> Arc<RouteTable> {
        Arc::clone(&self.inner.table.borrow())
    }

    /// Who the request's key belongs to (`None` when the router is open).
    #[allow(clippy::result_large_err, reason = "the error is the answer to send, built only when refusing")]
    fn authenticate(&self, headers: &HeaderMap) -> Result<Option<KeyIdentity>, Response> {
        let Some(keys) = &self.inner.keys else { return Ok(None) };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .map(str::trim);
        keys.authenticate(presented).map(Some).map_err(refusal_response)
    }

    #[allow(clippy::result_large_err, reason = "the error is the answer to send, built only when refusing")]
    fn admit(&self, identity: Option<&KeyIdentity>) -> Result<(), Response> {
        match (&self.inner.keys, identity) {
            (Some(keys), Some(identity)) => keys.admit(identity, 0).map(drop).map_err(refusal_response),
            _ => Ok(()),
        }
    }
}

fn allowed(identity: Option<&KeyIdentity>) -> impl Fn(&ModelRoute) -> bool + '_ {
    move |route| match identity {
        Some(identity) if identity.is_restricted() => {
            RouteTable::names_of(route).iter().any(|name| identity.allows_model(name))
        }
        _ => true,
    }
}

fn refusal_response(refusal: Refusal) -> Response {
    match &refusal {
        Refusal::RateLimited { limit, retry_after, status, .. } => {
            let limit = match limit {
                nstream_server::auth::LimitKind::Requests => "requests",
                nstream_server::auth::LimitKind::Tokens => "tokens",
            };
            let mut response =
                ApiError::rate_limit_exceeded(limit, refusal.to_string(), retry_after.as_secs().max(1)).into_response();
            status.write_headers(response.headers_mut());
            response
        }
        Refusal::ModelNotAllowed { model } => ApiError::model_not_found(model).into_response(),
        _ => ApiError::unauthorized(refusal.to_string()).into_response(),
    }
}

/// An OpenAI-shaped error the servers have no constructor for (502, 503, an ambiguous name).
fn error_response(
    status: StatusCode,
    error_type: &str,
    code: &str,
    message: &str,
    param: Option<&str>,
    retry_after: Option<u64>,
) -> Response {
    let body = serde_json::json!({"error": {"message": message, "type": error_type, "param": param, "code": code}});
    let mut response = (status, axum::Json(body)).into_response();
    if let Some(seconds) = retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

fn unavailable(state: &RouterState, model: &str, why: &str) -> Response {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "model_unavailable",
        &format!("The model `{model}` has no Ready server {why}; retry later"),
        Some("model"),
        Some(state.inner.settings.retry_after_seconds),
    )
}

/// The whole HTTP application.
pub fn app(state: RouterState) -> axum::Router {
    axum::Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/v1/{*path}", post(proxy))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .fallback(|request: Request| async move {
            ApiError::route_not_found(request.method().as_str(), request.uri().path()).into_response()
        })
        .with_state(state)
}

async fn ready(State(state): State<RouterState>) -> Response {
    if state.inner.draining.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    if !*state.inner.synced.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "caches not synced yet").into_response();
    }
    (StatusCode::OK, "ready").into_response()
}

async fn metrics_text(State(state): State<RouterState>) -> Response {
    let mut response = state.inner.metrics.render().into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(nstream_server::OPENMETRICS_CONTENT_TYPE));
    response
}

/// Models worth listing: Ready now, or scaled to zero (a request wakes them).
fn listed(route: &ModelRoute) -> bool {
    route.is_ready() || route.replicas == Some(0)
}

fn model_object(table: &RouteTable, route: &ModelRoute) -> serde_json::Value {
    let mut object = serde_json::json!({
        "id": table.display_name(route),
        "object": "model",
        "created": 0,
        "owned_by": "nstream",
    });
    if let Some(parent) = &route.parent {
        object["parent"] = serde_json::Value::String(parent.clone());
    }
    object
}

async fn list_models(State(state): State<RouterState>, headers: HeaderMap) -> Response {
    let identity = match state.authenticate(&headers) {
        Ok(identity) => identity,
        Err(response) => return response,
    };
    let table = state.table();
    let allowed = allowed(identity.as_ref());
    let data: Vec<serde_json::Value> = table
        .routes()
        .filter(|route| listed(route) && allowed(route))
        .map(|route| model_object(&table, route))
        .collect();
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

async fn get_model(State(state): State<RouterState>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let identity = match state.authenticate(&headers) {
        Ok(identity) => identity,
        Err(response) => return response,
    };
    let table = state.table();
    match table.resolve(&id, allowed(identity.as_ref())) {
        Ok(route) if listed(&route) => axum::Json(model_object(&table, &route)).into_response(),
        Err(Unresolved::Ambiguous(names)) => ambiguous(&id, &names),
        _ => ApiError::model_not_found(&id).into_response(),
    }
}

fn ambiguous(model: &str, names: &[String]) -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "model_ambiguous",
        &format!("The model `{model}` is served in several namespaces; name one of {}", names.join(", ")),
        Some("model"),
        None,
    )
}

#[derive(Deserialize)]
struct ModelField<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
}

/// The body's `model`, or the 400 to answer.
#[allow(clippy::result_large_err, reason = "the error is the answer to send, built only when refusing")]
fn model_of(body: &[u8]) -> Result<String, Response> {
    let parsed: ModelField<'_> = serde_json::from_slice(body).map_err(|error| {
        ApiError::bad_request(
            format!("The request body is not a JSON object with a string `model`: {error}"),
            Some("model".into()),
        )
        .into_response()
    })?;
    match parsed.model {
        Some(model) if !model.is_empty() => Ok(model.into_owned()),
        _ => Err(ApiError::bad_request("you must provide a model parameter", Some("model".into())).into_response()),
    }
}

/// The body with `model` set to `served_name`, when the caller named it otherwise.
fn rewrite_model(body: Bytes, model: &str, served_name: &str) -> Bytes {
    if model == served_name {
        return body;
    }
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(mut value) => {
            value["model"] = serde_json::Value::String(served_name.to_owned());
            serde_json::to_vec(&value).map(Bytes::from).unwrap_or(body)
        }
        Err(_) => body,
    }
}

async fn proxy(State(state): State<RouterState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let identity = match state.authenticate(&parts.headers) {
        Ok(identity) => identity,
        Err(response) => {
            state.inner.metrics.record_request("", response.status().as_u16());
            return response;
        }
    };
    let body = match axum::body::to_bytes(body, state.inner.settings.max_body_bytes).await {
        Ok(body) => body,
        Err(_) => return ApiError::payload_too_large(state.inner.settings.max_body_bytes).into_response(),
    };
    let model = match model_of(&body) {
        Ok(model) => model,
        Err(response) => return response,
    };
    let route = match state.table().resolve(&model, allowed(identity.as_ref())) {
        Ok(route) => route,
        Err(Unresolved::NotFound) => {
            state.inner.metrics.record_request("", 404);
            return ApiError::model_not_found(&model).into_response();
        }
        Err(Unresolved::Ambiguous(names)) => return ambiguous(&model, &names),
    };
    let label = route.qualified_name();
    if let Err(response) = state.admit(identity.as_ref()) {
        state.inner.metrics.record_request(&label, response.status().as_u16());
        return response;
    }
    let body = rewrite_model(body, &model, &route.served_name);
    let route = if route.is_ready() {
        route
    } else {
        match hold(&state, route).await {
            Ok(route) => route,
            Err(response) => {
                state.inner.metrics.record_request(&label, response.status().as_u16());
                return response;
            }
        }
    };
    let response = forward(&state, &route, &parts, body).await;
    state.inner.metrics.record_request(&label, response.status().as_u16());
    response
}

fn wake(state: &RouterState, route: &ModelRoute) {
    let (Some(scaler), Some(resource)) = (&state.inner.scaler, &route.resource) else { return };
    if !route.wants_wake() {
        return;
    }
    let scaler = scaler.clone();
    let resource = resource.clone();
    let metrics = Arc::clone(&state.inner.metrics);
    let label = route.qualified_name();
    tokio::spawn(async move {
        let outcome = scaler.wake(&resource).await;
        if outcome != cluster::WakeOutcome::Skipped {
            metrics.record_scale_up(&label, outcome.as_str());
        }
    });
}

/// Waits for `route` to have a Ready endpoint, waking it from zero; the route as it is then, or
/// the answer to give.
async fn hold(state: &RouterState, route: Arc<ModelRoute>) -> Result<Arc<ModelRoute>, Response> {
    let label = route.qualified_name();
    let display = route.served_name.clone();
    wake(state, &route);
    let metrics = &state.inner.metrics;
    let Some(ticket) = state.inner.holds.enter(&label) else {
        metrics.record_hold_outcome(&label, "queue_full");
        let why = if state.inner.settings.hold_queue_size == 0 { "" } else { "and its wait queue is full" };
        return Err(unavailable(state, &display, why));
    };
    metrics.set_held(&label, state.inner.holds.held(&label));
    let mut table = state.inner.table.clone();
    let waited = tokio::time::timeout(state.inner.settings.hold_timeout, async {
        loop {
            let current = table.borrow_and_update().get(&label);
            match current {
                Some(current) if current.is_ready() => return Some(current),
                Some(current) => wake(state, &current),
                None => return None,
            }
            if table.changed().await.is_err() {
                return None;
            }
        }
    })
    .await;
    drop(ticket);
    metrics.set_held(&label, state.inner.holds.held(&label));
    match waited {
        Ok(Some(route)) => {
            metrics.record_hold_outcome(&label, "forwarded");
            Ok(route)
        }
        Ok(None) => Err(ApiError::model_not_found(&display).into_response()),
        Err(_) => {
            metrics.record_hold_outcome(&label, "timeout");
            let seconds = state.inner.settings.hold_timeout.as_secs_f64();
            Err(unavailable(state, &display, &format!("after waiting {seconds} s")))
        }
    }
}

/// Request headers not forwarded: hop-by-hop, and those the router sets itself.
const NOT_FORWARDED: [header::HeaderName; 10] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
    header::AUTHORIZATION,
    header::CONTENT_LENGTH,
];

fn upstream_request(
    parts: &axum::http::request::Parts,
    authority: &str,
    body: &Bytes,
    key: Option<&str>,
    keep_caller_key: bool,
) -> Result<hyper::Request<Full<Bytes>>, axum::http::Error> {
    let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
    let mut builder = hyper::Request::builder().method(parts.method.clone()).uri(format!("http://{authority}{path}"));
    if let Some(headers) = builder.headers_mut() {
        for (name, value) in &parts.headers {
            let forwarded = !NOT_FORWARDED.contains(name) && name.as_str() != "keep-alive";
            if forwarded || (keep_caller_key && name == header::AUTHORIZATION) {
                headers.append(name, value.clone());
            }
        }
        if let Some(key) = key
            && let Ok(mut value) = HeaderValue::from_str(&format!("Bearer {key}"))
        {
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
    }
    builder.body(Full::new(body.clone()))
}

async fn forward(state: &RouterState, route: &ModelRoute, parts: &axum::http::request::Parts, body: Bytes) -> Response {
    let label = route.qualified_name();
    let metrics = &state.inner.metrics;
    let mut failed: Option<Arc<table::Endpoint>> = None;
    let mut retried_connect = false;
    let mut reread_key = false;
    loop {
        let Some(endpoint) = state.inner.balancer.pick(&route.endpoints, failed.as_deref()) else {
            return unavailable(state, &route.served_name, "");
        };
        let guard = endpoint.start();
        let key = match (&route.upstream_key, &state.inner.upstream_keys) {
            (Some(location), Some(keys)) => keys.get(location).await,
            _ => None,
        };
        // A static route of an open router passes the caller's key through (single-host use).
        let keep_caller_key = route.upstream_key.is_none() && state.inner.keys.is_none();
        let key = key.as_ref().map(|key| key.expose());
        let request = match upstream_request(parts, endpoint.authority(), &body, key, keep_caller_key) {
            Ok(request) => request,
            Err(error) => return ApiError::internal(format!("building the upstream request: {error}")).into_response(),
        };
        match state.inner.client.request(request).await {
            Ok(response) if response.status() == StatusCode::UNAUTHORIZED && !reread_key => {
                // The server refused its own key: it was rotated. Read it again, once.
                match (&route.upstream_key, &state.inner.upstream_keys) {
                    (Some(location), Some(keys)) => {
                        keys.forget(location);
                        reread_key = true;
                    }
                    _ => return stream_back(response, guard),
                }
            }
            Ok(response) => return stream_back(response, guard),
            Err(error) if error.is_connect() && !retried_connect => {
                metrics.record_upstream_error(&label, "connect");
                tracing::warn!(model = %label, endpoint = endpoint.authority(), %error, "connecting to a server failed; retrying on another");
                retried_connect = true;
                failed = Some(endpoint);
            }
            Err(error) => {
                let reason = if error.is_connect() { "connect" } else { "request" };
                metrics.record_upstream_error(&label, reason);
                tracing::warn!(model = %label, endpoint = endpoint.authority(), %error, "the server could not be reached");
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    "server_error",
                    "upstream_unreachable",
                    &format!("The server of model `{}` could not be reached; retry", route.served_name),
                    None,
                    None,
                );
            }
        }
    }
}

/// The server's answer, its body streamed as the server writes it (the in-flight count ends when
/// the body does).
fn stream_back(response: hyper::Response<Incoming>, guard: InFlight) -> Response {
    let (mut parts, body) = response.into_parts();
    for name in [header::CONNECTION, header::TRANSFER_ENCODING, header::TRAILER, header::UPGRADE] {
        parts.headers.remove(name);
    }
    parts.headers.remove("keep-alive");
    Response::from_parts(parts, Body::new(Tracked { body, _guard: guard }))
}

/// A server's body that holds its endpoint's in-flight count until it ends or is dropped.
struct Tracked {
    body: Incoming,
    _guard: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.body).poll_frame(context)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Serves `app` on `listener` until `signal` completes; then `/ready` fails, requests are still
/// accepted for `drain_delay` (so load balancers stop sending), the listener closes and requests
/// in flight, streams included, finish before this returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: RouterState,
    signal: impl Future<Output = ()> + Send + 'static,
    drain_delay: Duration,
) -> Result<(), RouterError> {
    let app = app(state.clone());
    let shutdown = async move {
        signal.await;
        state.start_draining();
        tracing::info!(seconds = drain_delay.as_secs_f64(), "draining: /ready fails, still serving");
        tokio::time::sleep(drain_delay).await;
    };
    nstream_server::serve(listener, app, shutdown).await.map_err(|cause| RouterError::Serve { cause })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_is_read_without_the_rest_of_the_body() {
        assert_eq!(model_of(br#"{"input":["a"],"model":"minilm"}"#).expect("model"), "minilm");
        assert_eq!(model_of(br#"{"model":"a\/b"}"#).expect("escaped"), "a/b");
        assert_eq!(model_of(br#"{"input":"x"}"#).expect_err("missing").status(), StatusCode::BAD_REQUEST);
        assert_eq!(model_of(br#"{"model":3}"#).expect_err("not a string").status(), StatusCode::BAD_REQUEST);
        assert_eq!(model_of(b"[1]").expect_err("not an object").status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn a_qualified_name_is_rewritten_for_the_server() {
        let body = Bytes::from_static(br#"{"model":"team/minilm","input":"x"}"#);
        let rewritten = rewrite_model(body.clone(), "team/minilm", "minilm");
        let value: serde_json::Value = serde_json::from_slice(&rewritten).expect("JSON");
        assert_eq!(value, serde_json::json!({"model": "minilm", "input": "x"}));
        assert_eq!(rewrite_model(body.clone(), "minilm", "minilm"), body, "untouched when already bare");
    }
}
