//! Prometheus metrics of the operator, and the HTTP endpoints `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of per-kind metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// MegaModel, BaseModel or EmbeddingModel.
    pub kind: String,
}

/// Labels of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// MegaModel, BaseModel or EmbeddingModel.
    pub kind: String,
    /// The error's label ([`crate::Error::label`]).
    pub error: String,
}

/// Labels of the write counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// MegaModel, BaseModel or EmbeddingModel.
    pub kind: String,
    /// What was written: Deployment, Service, ConfigMap, Secret, status, event.
    pub object: String,
}

/// The operator's metrics.
pub struct Metrics {
    /// Reconciles run.
    pub reconciles: Family<KindLabels, Counter>,
    /// Reconciles that failed, by error.
    pub errors: Family<ErrorLabels, Counter>,
    /// Reconcile durations.
    pub durations: Family<KindLabels, Histogram>,
    /// Writes that changed an object (server-side applies that moved its resourceVersion, status
    /// patches, events): after convergence this stays flat.
    pub writes: Family<WriteLabels, Counter>,
    /// 1 while this replica holds the leader Lease.
    pub leader: Gauge,
    registry: Registry,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("nstream_operator");
        let reconciles = Family::<KindLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let durations = Family::<KindLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.001, 2.0, 16))) as fn() -> Histogram,
        );
        let writes = Family::<WriteLabels, Counter>::default();
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register("reconcile_errors", "Reconciles that failed, by error", errors.clone());
        registry.register_with_unit(
            "reconcile_duration",
            "Reconcile durations",
            prometheus_client::registry::Unit::Seconds,
            durations.clone(),
        );
        registry.register("writes", "Writes that changed an object", writes.clone());
        registry.register("leader", "1 while this replica holds the leader Lease", leader.clone());
        Self { reconciles, errors, durations, writes, leader, registry, ready: AtomicBool::new(false) }
    }
}

impl Metrics {
    /// Counts one reconcile and its duration.
    pub fn reconciled(&self, kind: &str, duration: Duration) {
        let labels = KindLabels { kind: kind.to_string() };
        self.reconciles.get_or_create(&labels).inc();
        self.durations.get_or_create(&labels).observe(duration.as_secs_f64());
    }

    /// Counts one failed reconcile.
    pub fn failed(&self, kind: &str, error: &str) {
        self.errors.get_or_create(&ErrorLabels { kind: kind.to_string(), error: error.to_string() }).inc();
    }

    /// Counts one write that changed something.
    pub fn wrote(&self, kind: &str, object: &str) {
        self.writes.get_or_create(&WriteLabels { kind: kind.to_string(), object: object.to_string() }).inc();
    }

    /// Marks the operator ready (its controllers run, or it waits as a standby).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

async fn metrics(State(metrics): State<Arc<Metrics>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.encode())
        .into_response()
}

async fn healthz() -> Response {
    (StatusCode::OK, "ok").into_response()
}

async fn readyz(State(metrics): State<Arc<Metrics>>) -> Response {
    if metrics.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response()
    }
}

/// The HTTP routes: `/metrics`, `/healthz` (the process runs), `/readyz` (controllers or standby
/// started).
pub fn app(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(self::metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(metrics)
}

/// Serves [`app`] on `address` until `shutdown` resolves.
pub async fn serve(
    address: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(address = %listener.local_addr()?, "metrics and health endpoints listening");
    axum::serve(listener, app(metrics)).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    async fn get(metrics: &Arc<Metrics>, path: &str) -> (StatusCode, String) {
        let response = app(metrics.clone())
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = response.status();
        let body = response.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).to_string())
    }

    #[tokio::test]
    async fn health_is_always_up_and_ready_only_once_started() {
        let metrics = Arc::new(Metrics::default());
        assert_eq!(get(&metrics, "/healthz").await.0, StatusCode::OK);
        assert_eq!(get(&metrics, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        metrics.set_ready(true);
        assert_eq!(get(&metrics, "/readyz").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn metrics_count_reconciles_errors_and_writes_by_label() {
        let metrics = Arc::new(Metrics::default());
        metrics.reconciled("EmbeddingModel", Duration::from_millis(12));
        metrics.failed("EmbeddingModel", "api_409");
        metrics.wrote("EmbeddingModel", "Deployment");
        let (status, text) = get(&metrics, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains(r#"nstream_operator_reconciles_total{kind="EmbeddingModel"} 1"#), "{text}");
        assert!(
            text.contains(r#"nstream_operator_reconcile_errors_total{kind="EmbeddingModel",error="api_409"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"nstream_operator_writes_total{kind="EmbeddingModel",object="Deployment"} 1"#),
            "{text}"
        );
        assert!(text.contains("nstream_operator_reconcile_duration_seconds_count"), "{text}");
    }
}
