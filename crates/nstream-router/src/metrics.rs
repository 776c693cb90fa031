//! The router's Prometheus metrics (`GET /metrics`, OpenMetrics text like the servers').
//!
//! The `model` label is a route's qualified name (`namespace/name`), or empty for requests that
//! named no known model, so its values are bounded by the cluster's models.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Every metric of one router.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    upstream_errors: Family<Labels, Counter>,
    held: Family<Labels, Gauge>,
    hold_outcomes: Family<Labels, Counter>,
    scale_ups: Family<Labels, Counter>,
    ready_endpoints: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        registry.register("nstream_router_requests", "Requests answered, by model and HTTP status", requests.clone());
        let upstream_errors = Family::<Labels, Counter>::default();
        registry.register(
            "nstream_router_upstream_errors",
            "Failed attempts to reach a model server, by model and reason (connect, request)",
            upstream_errors.clone(),
        );
        let held = Family::<Labels, Gauge>::default();
        registry.register(
            "nstream_router_held_requests",
            "Requests held now for a model with no Ready endpoint",
            held.clone(),
        );
        let hold_outcomes = Family::<Labels, Counter>::default();
        registry.register(
            "nstream_router_hold_outcomes",
            "How held requests ended, by model and outcome (forwarded, timeout, queue_full)",
            hold_outcomes.clone(),
        );
        let scale_ups = Family::<Labels, Counter>::default();
        registry.register(
            "nstream_router_scale_from_zero",
            "Scale subresource patches from 0 to 1 replica, by model and result (patched, already_scaled, failed)",
            scale_ups.clone(),
        );
        let ready_endpoints = Family::<Labels, Gauge>::default();
        registry.register(
            "nstream_router_ready_endpoints",
            "Ready endpoints of each model in the routing table",
            ready_endpoints.clone(),
        );
        Self { registry, requests, upstream_errors, held, hold_outcomes, scale_ups, ready_endpoints }
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(key, value)| ((*key).to_owned(), (*value).to_owned())).collect()
}

impl Metrics {
    /// Counts an answered request.
    pub fn record_request(&self, model: &str, status: u16) {
        self.requests.get_or_create(&labels(&[("model", model), ("status", &status.to_string())])).inc();
    }

    /// Counts a failed attempt to reach a server.
    pub fn record_upstream_error(&self, model: &str, reason: &str) {
        self.upstream_errors.get_or_create(&labels(&[("model", model), ("reason", reason)])).inc();
    }

    /// Sets the number of requests held for `model`.
    pub fn set_held(&self, model: &str, held: usize) {
        self.held.get_or_create(&labels(&[("model", model)])).set(i64::try_from(held).unwrap_or(i64::MAX));
    }

    /// Counts how a held request ended.
    pub fn record_hold_outcome(&self, model: &str, outcome: &str) {
        self.hold_outcomes.get_or_create(&labels(&[("model", model), ("outcome", outcome)])).inc();
    }

    /// Counts a scale-from-zero attempt.
    pub fn record_scale_up(&self, model: &str, result: &str) {
        self.scale_ups.get_or_create(&labels(&[("model", model), ("result", result)])).inc();
    }

    /// Sets the Ready endpoints of every model (models gone from the table are removed).
    pub fn set_ready_endpoints(&self, counts: &[(String, usize)]) {
        self.ready_endpoints.clear();
        for (model, count) in counts {
            self.ready_endpoints
                .get_or_create(&labels(&[("model", model)]))
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            tracing::error!("encoding the metrics failed");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_requests_and_outcomes_are_exported_by_model() {
        let metrics = Metrics::default();
        metrics.set_held("a/minilm", 3);
        metrics.record_hold_outcome("a/minilm", "timeout");
        let text = metrics.render();
        assert!(text.contains(r#"nstream_router_held_requests{model="a/minilm"} 3"#), "{text}");
        assert!(text.contains(r#"nstream_router_hold_outcomes_total{model="a/minilm",outcome="timeout"} 1"#), "{text}");
    }
}
