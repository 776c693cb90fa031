//! Prometheus metrics of the server, and the registry backends add their own metrics to.
//!
//! # Design
//!
//! One [`prometheus_client::registry::Registry`] per process lives inside [`Metrics`]. The server
//! registers its request metrics there at construction; the binary then hands the same registry
//! to each backend while building it ([`Metrics::with_registry`]), so a backend crate such as
//! `nstream-embed` registers its queue-depth gauge or batch-size histogram without depending on
//! this crate or on axum: it only needs `prometheus-client` and a `&mut Registry`. `/metrics`
//! encodes the whole registry in the OpenMetrics text format, which Prometheus scrapes natively.
//!
//! ```
//! use prometheus_client::metrics::gauge::Gauge;
//! use nstream_server::Metrics;
//!
//! let metrics = Metrics::new();
//! let queue_depth = Gauge::<i64>::default();
//! metrics.with_registry(|registry| {
//!     registry.register("nstream_embed_queue_depth", "Requests waiting for the worker", queue_depth.clone());
//! });
//! queue_depth.set(3);
//! assert!(metrics.encode().unwrap().contains("nstream_embed_queue_depth 3"));
//! ```

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// The content type of [`Metrics::encode`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    model: String,
    /// The HTTP status code (`code`, as Prometheus' own `promhttp` and most exporters name it).
    code: String,
    /// The name of the caller's API key (never the key), [`NO_KEY`] without a valid one.
    key: String,
}

/// The `key` label of requests without a valid API key (or of a server without keys).
pub const NO_KEY: &str = "none";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShedLabels {
    reason: &'static str,
}

/// Why the server refused or cut short a request on its own (see [`Metrics::record_shed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShedReason {
    /// 429: [`crate::ServerConfig::max_concurrent_requests`] were being served.
    ConcurrencyLimit,
    /// 408: the body did not arrive within [`crate::ServerConfig::body_read_timeout`].
    BodyReadTimeout,
    /// 504: no answer within [`crate::ServerConfig::request_timeout`].
    RequestTimeout,
    /// A stream ended at [`crate::ServerConfig::stream_deadline`].
    StreamDeadline,
    /// Ended by the shutdown timeout ([`crate::ServerConfig::shutdown_timeout`]).
    Shutdown,
}

impl ShedReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::ConcurrencyLimit => "concurrency_limit",
            Self::BodyReadTimeout => "body_read_timeout",
            Self::RequestTimeout => "request_timeout",
            Self::StreamDeadline => "stream_deadline",
            Self::Shutdown => "shutdown",
        }
    }
}

/// Which tokens a count is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Tokens read: prompts and embedding inputs.
    Prompt,
    /// Tokens generated.
    Completion,
}

impl TokenKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Prompt => "prompt",
            Self::Completion => "completion",
        }
    }
}

fn duration_histogram() -> Histogram {
    // 1 ms to about 65 s: embeddings answer in milliseconds, long generations in tens of seconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// The server's metrics and the shared registry; cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<MetricsInner>,
}

struct MetricsInner {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    stream_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    embedding_inputs: Family<ModelLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    shed: Family<ShedLabels, Counter>,
    in_flight: Gauge,
    waiting: Family<ModelLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Metrics { .. }")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with the server's metrics registered:
    ///
    /// - `nstream_server_requests_total{route,model,code,key}`: answered requests, by HTTP status
    ///   code and by the name of the caller's API key (never the key; [`NO_KEY`] without a valid
    ///   one). Key names come from the server's key files, so the label's values are bounded.
    /// - `nstream_server_request_duration_seconds{route,model}`: time to the response head
    ///   (for streams: to the first chunk, i.e. time to first token).
    /// - `nstream_server_stream_duration_seconds{route,model}`: time to the last chunk of a
    ///   streamed answer (`data: [DONE]` or the error event that ends it); streams the client
    ///   left early are not counted.
    /// - `nstream_server_embedding_inputs_total{model}`: inputs embedded.
    /// - `nstream_server_tokens_total{model,kind}`: prompt and completion tokens, from the
    ///   backends' usage.
    /// - `nstream_server_shed_requests_total{reason}`: requests the server refused or cut short
    ///   on its own ([`ShedReason`]: `concurrency_limit`, `body_read_timeout`,
    ///   `request_timeout`, `stream_deadline`, `shutdown`).
    /// - `nstream_server_requests_in_flight`: `/v1/*` requests admitted and not yet answered
    ///   (a stream until its last chunk is sent or its client leaves), waiting ones included.
    /// - `nstream_server_requests_waiting{model}`: of those, requests admitted but waiting for
    ///   the model (its queue, [`nstream_backend::ModelBackend::waiting_requests`]), read at
    ///   each scrape.
    ///
    /// The two gauges are what autoscalers scale on (the operator's, or an HPA/KEDA).
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(duration_histogram);
        let stream_duration =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(duration_histogram);
        let embedding_inputs = Family::<ModelLabels, Counter>::default();
        let tokens = Family::<TokenLabels, Counter>::default();
        let shed = Family::<ShedLabels, Counter>::default();
        let in_flight = Gauge::default();
        let waiting = Family::<ModelLabels, Gauge>::default();
        // prometheus-client appends `_total` to counters and the unit suffix to histograms.
        registry.register(
            "nstream_server_requests",
            "HTTP requests answered, by route, model, status code and API key name",
            requests.clone(),
        );
        registry.register_with_unit(
            "nstream_server_request_duration",
            "Time from request to response head, by route and model",
            Unit::Seconds,
            request_duration.clone(),
        );
        registry.register_with_unit(
            "nstream_server_stream_duration",
            "Time from request to the last chunk of a streamed answer, by route and model",
            Unit::Seconds,
            stream_duration.clone(),
        );
        registry.register("nstream_server_embedding_inputs", "Inputs embedded, by model", embedding_inputs.clone());
        registry.register(
            "nstream_server_tokens",
            "Tokens processed, by model and kind (prompt or completion)",
            tokens.clone(),
        );
        registry.register(
            "nstream_server_shed_requests",
            "Requests refused or cut short by the server's own limits, by reason",
            shed.clone(),
        );
        registry.register(
            "nstream_server_requests_in_flight",
            "API requests admitted and not yet answered (streams until they end), waiting ones included",
            in_flight.clone(),
        );
        registry.register(
            "nstream_server_requests_waiting",
            "API requests admitted but waiting for the model (its queue), by model",
            waiting.clone(),
        );
        Self {
            inner: Arc::new(MetricsInner {
                registry: Mutex::new(registry),
                requests,
                request_duration,
                stream_duration,
                embedding_inputs,
                tokens,
                shed,
                in_flight,
                waiting,
            }),
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // Registration cannot leave the registry half-changed, so a poisoned lock is still usable.
        self.inner.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `register` with the shared registry, for backends to add their own metrics (named
    /// `nstream_<component>_<name>_<unit>`). Do not call it from inside `register`.
    pub fn with_registry<R>(&self, register: impl FnOnce(&mut Registry) -> R) -> R {
        register(&mut self.registry())
    }

    /// The whole registry in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry())?;
        Ok(text)
    }

    /// Counts one answered request of the key named `key` ([`NO_KEY`] for none) and its duration.
    pub fn record_request(&self, route: &str, model: &str, key: &str, status: u16, duration: Duration) {
        self.inner
            .requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                model: model.to_owned(),
                code: status.to_string(),
                key: key.to_owned(),
            })
            .inc();
        self.inner
            .request_duration
            .get_or_create(&RouteLabels { route: route.to_owned(), model: model.to_owned() })
            .observe(duration.as_secs_f64());
    }

    /// Records how long a streamed answer took, from the request to its last chunk.
    pub fn record_stream(&self, route: &str, model: &str, duration: Duration) {
        self.inner
            .stream_duration
            .get_or_create(&RouteLabels { route: route.to_owned(), model: model.to_owned() })
            .observe(duration.as_secs_f64());
    }

    /// Counts embedded inputs.
    pub fn record_embedding_inputs(&self, model: &str, count: u64) {
        self.inner.embedding_inputs.get_or_create(&ModelLabels { model: model.to_owned() }).inc_by(count);
    }

    /// Counts one request refused or cut short by the server's own limits.
    pub fn record_shed(&self, reason: ShedReason) {
        self.inner.shed.get_or_create(&ShedLabels { reason: reason.as_str() }).inc();
    }

    /// Counts one request in flight until the returned guard is dropped.
    pub fn start_request(&self) -> InFlight {
        self.inner.in_flight.inc();
        InFlight { gauge: self.inner.in_flight.clone() }
    }

    /// Sets the waiting requests of each model, replacing the previous values (so a model no
    /// longer served stops being reported).
    pub fn set_waiting(&self, waiting: impl IntoIterator<Item = (String, u64)>) {
        self.inner.waiting.clear();
        for (model, count) in waiting {
            self.inner.waiting.get_or_create(&ModelLabels { model }).set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// Counts tokens.
    pub fn record_tokens(&self, model: &str, kind: TokenKind, count: u32) {
        if count == 0 {
            return;
        }
        self.inner
            .tokens
            .get_or_create(&TokenLabels { model: model.to_owned(), kind: kind.as_str().to_owned() })
            .inc_by(u64::from(count));
    }
}

/// A request counted in `nstream_server_requests_in_flight` until dropped
/// ([`Metrics::start_request`]).
#[derive(Debug)]
pub struct InFlight {
    gauge: Gauge,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_documented_names() {
        let metrics = Metrics::new();
        metrics.record_request("/v1/embeddings", "bge", "team-a", 200, Duration::from_millis(3));
        metrics.record_embedding_inputs("bge", 2);
        metrics.record_tokens("bge", TokenKind::Prompt, 7);
        metrics.record_stream("/v1/chat/completions", "llm", Duration::from_millis(40));
        let text = metrics.encode().expect("encodes");
        assert!(
            text.contains(
                r#"nstream_server_requests_total{route="/v1/embeddings",model="bge",code="200",key="team-a"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("nstream_server_request_duration_seconds_bucket"), "{text}");
        assert!(
            text.contains(
                r#"nstream_server_stream_duration_seconds_count{route="/v1/chat/completions",model="llm"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"nstream_server_embedding_inputs_total{model="bge"} 2"#));
        assert!(text.contains(r#"nstream_server_tokens_total{model="bge",kind="prompt"} 7"#));
        metrics.record_shed(ShedReason::ConcurrencyLimit);
        let text = metrics.encode().expect("encodes");
        assert!(text.contains(r#"nstream_server_shed_requests_total{reason="concurrency_limit"} 1"#), "{text}");
    }

    #[test]
    fn in_flight_follows_the_guards_and_waiting_is_replaced() {
        let metrics = Metrics::new();
        let first = metrics.start_request();
        let second = metrics.start_request();
        assert!(metrics.encode().unwrap().contains("nstream_server_requests_in_flight 2"));
        drop(first);
        assert!(metrics.encode().unwrap().contains("nstream_server_requests_in_flight 1"));
        drop(second);
        assert!(metrics.encode().unwrap().contains("nstream_server_requests_in_flight 0"));
        metrics.set_waiting([("llm".to_owned(), 3), ("gone".to_owned(), 1)]);
        metrics.set_waiting([("llm".to_owned(), 2)]);
        let text = metrics.encode().unwrap();
        assert!(text.contains(r#"nstream_server_requests_waiting{model="llm"} 2"#), "{text}");
        assert!(!text.contains("gone"), "{text}");
    }
}
