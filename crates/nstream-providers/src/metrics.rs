//! Model metrics on the server's Prometheus registry: the embedding workers' and LLM schedulers'
//! counters and gauges read at scrape time, histograms of embedding batches fed after each
//! forward pass, and the LLMs' time to first token and inter-token latency fed per token.

use std::sync::{Arc, Mutex, PoisonError};

use std::sync::atomic::{AtomicU64, Ordering};

use nstream_embed::{BatchObserver, BatchStats, EmbedMetrics, MetricsSnapshot};
use nstream_llm::{LlmMetrics, TokenTiming};
use nstream_server::Metrics;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

type ModelLabels = [(&'static str, String); 1];

/// Reads each embedding model's counters when `/metrics` is scraped.
#[derive(Debug, Default)]
struct EmbedCollector {
    models: Mutex<Vec<(String, Arc<EmbedMetrics>)>>,
}

/// One exported counter or gauge: name, help, type, and how to read it from a snapshot.
type Series = (&'static str, &'static str, MetricType, fn(&MetricsSnapshot) -> u64);

/// Every exported counter or gauge.
const SERIES: [Series; 8] = [
    ("nstream_embed_queue_depth", "Requests waiting for or inside the model worker.", MetricType::Gauge, |s| {
        s.queue_depth
    }),
    ("nstream_embed_requests", "Requests accepted by the model worker.", MetricType::Counter, |s| s.requests_total),
    ("nstream_embed_overloaded", "Requests refused because the queue was full.", MetricType::Counter, |s| {
        s.overloaded_total
    }),
    ("nstream_embed_inputs", "Inputs embedded.", MetricType::Counter, |s| s.inputs_total),
    ("nstream_embed_truncated_inputs", "Inputs cut at the model's maximum length.", MetricType::Counter, |s| {
        s.truncated_total
    }),
    ("nstream_embed_batches", "Forward passes run.", MetricType::Counter, |s| s.batches_total),
    ("nstream_embed_tokens", "Real tokens embedded.", MetricType::Counter, |s| s.tokens_total),
    ("nstream_embed_padded_tokens", "Tokens computed including padding.", MetricType::Counter, |s| {
        s.padded_tokens_total
    }),
];

impl prometheus_client::collector::Collector for EmbedCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        let snapshots: Vec<(ModelLabels, MetricsSnapshot)> =
            models.iter().map(|(name, metrics)| ([("model", name.clone())], metrics.snapshot())).collect();
        for (name, help, metric_type, read) in SERIES {
            let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
            for (labels, snapshot) in &snapshots {
                let value = read(snapshot);
                let metric_encoder = family.encode_family(labels)?;
                match metric_type {
                    MetricType::Gauge => {
                        ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(metric_encoder)?
                    }
                    _ => ConstCounter::new(value).encode(metric_encoder)?,
                }
            }
        }
        Ok(())
    }
}

/// One exported LLM counter or gauge: name, help, type, and which scheduler counter it reads.
type LlmSeries = (&'static str, &'static str, MetricType, fn(&LlmMetrics) -> &AtomicU64);

/// Every exported LLM counter or gauge.
const LLM_SERIES: [LlmSeries; 12] = [
    ("nstream_llm_queue_depth", "Requests waiting for admission to the running batch.", MetricType::Gauge, |m| {
        &m.queue_depth
    }),
    ("nstream_llm_running_sequences", "Sequences in the running batch.", MetricType::Gauge, |m| &m.running_sequences),
    ("nstream_llm_requests", "Requests accepted by the scheduler.", MetricType::Counter, |m| &m.requests_total),
    ("nstream_llm_overloaded", "Requests refused because the queue was full.", MetricType::Counter, |m| {
        &m.overloaded_total
    }),
    ("nstream_llm_prompt_tokens", "Prompt tokens prefilled.", MetricType::Counter, |m| &m.prompt_tokens_total),
    ("nstream_llm_generated_tokens", "Tokens generated.", MetricType::Counter, |m| &m.generated_tokens_total),
    (
        "nstream_llm_cancelled_sequences",
        "Sequences stopped because their client went away.",
        MetricType::Counter,
        |m| &m.cancelled_total,
    ),
    ("nstream_llm_steps", "Forward steps run (prefill chunks and decode steps).", MetricType::Counter, |m| {
        &m.steps_total
    }),
    ("nstream_llm_kv_cache_tokens", "Tokens held in the K/V cache by running sequences.", MetricType::Gauge, |m| {
        &m.kv_cache_tokens
    }),
    (
        "nstream_llm_kv_cache_capacity_tokens",
        "Tokens the allocated K/V cache holds (slots times per-slot capacity).",
        MetricType::Gauge,
        |m| &m.kv_cache_capacity_tokens,
    ),
    ("nstream_llm_kv_cache_slots_used", "K/V cache slots held by running sequences.", MetricType::Gauge, |m| {
        &m.kv_cache_slots_used
    }),
    ("nstream_llm_kv_cache_slots", "K/V cache slots allocated.", MetricType::Gauge, |m| &m.kv_cache_slots),
];

/// Reads each causal LM's scheduler counters when `/metrics` is scraped.
#[derive(Debug, Default)]
struct LlmCollector {
    models: Mutex<Vec<(String, Arc<LlmMetrics>)>>,
}

impl prometheus_client::collector::Collector for LlmCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        for (name, help, metric_type, read) in LLM_SERIES {
            let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
            for (model, metrics) in models.iter() {
                let value = read(metrics).load(Ordering::Relaxed);
                let labels: ModelLabels = [("model", model.clone())];
                let metric_encoder = family.encode_family(&labels)?;
                match metric_type {
                    MetricType::Gauge => {
                        ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(metric_encoder)?
                    }
                    _ => ConstCounter::new(value).encode(metric_encoder)?,
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "nstream_llm_step_seconds",
            "Time spent in forward steps.",
            None,
            MetricType::Counter,
        )?;
        for (model, metrics) in models.iter() {
            let seconds = metrics.step_micros_total.load(Ordering::Relaxed) as f64 / 1e6;
            let labels: ModelLabels = [("model", model.clone())];
            ConstCounter::new(seconds).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Registers model metrics on a server's registry and hands out per-model embedding observers.
#[derive(Clone)]
pub struct ModelMetricsExporter {
    collector: Arc<EmbedCollector>,
    llm_collector: Arc<LlmCollector>,
    batch_sizes: Family<ModelLabels, Histogram>,
    batch_seconds: Family<ModelLabels, Histogram>,
    first_token_seconds: Family<ModelLabels, Histogram>,
    inter_token_seconds: Family<ModelLabels, Histogram>,
}

impl ModelMetricsExporter {
    /// Registers the collectors and histograms on `metrics`' registry.
    pub fn register(metrics: &Metrics) -> Self {
        let collector = Arc::new(EmbedCollector::default());
        let llm_collector = Arc::new(LlmCollector::default());
        let batch_sizes: Family<ModelLabels, Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(1.0, 2.0, 9)));
        let batch_seconds: Family<ModelLabels, Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 14)));
        // 1 ms to about 65 s: a queued request on a busy CPU waits seconds for its first token.
        let first_token_seconds: Family<ModelLabels, Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 17)));
        // 0.5 ms to about 4 s per token.
        let inter_token_seconds: Family<ModelLabels, Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 14)));
        metrics.with_registry(|registry| {
            registry.register_collector(Box::new(collector.clone()));
            registry.register_collector(Box::new(llm_collector.clone()));
            registry.register("nstream_embed_batch_size", "Inputs per forward pass.", batch_sizes.clone());
            registry.register(
                "nstream_embed_batch_duration_seconds",
                "Time of one forward pass.",
                batch_seconds.clone(),
            );
            registry.register(
                "nstream_llm_time_to_first_token_seconds",
                "Time from a request's admission queue to each of its sequences' first token.",
                first_token_seconds.clone(),
            );
            registry.register(
                "nstream_llm_inter_token_latency_seconds",
                "Time between consecutive tokens of a sequence.",
                inter_token_seconds.clone(),
            );
        });
        Self { collector, llm_collector, batch_sizes, batch_seconds, first_token_seconds, inter_token_seconds }
    }

    /// An observer for the worker of model `name`.
    pub fn observer(&self, name: &str) -> BatchObserver {
        let labels: ModelLabels = [("model", name.to_string())];
        let sizes = self.batch_sizes.get_or_create(&labels).clone();
        let seconds = self.batch_seconds.get_or_create(&labels).clone();
        Arc::new(move |stats: &BatchStats| {
            sizes.observe(stats.size as f64);
            seconds.observe(stats.duration.as_secs_f64());
        })
    }

    /// Exports the counters of a loaded embedding model.
    pub fn track(&self, name: &str, metrics: Arc<EmbedMetrics>) {
        self.collector.models.lock().unwrap_or_else(PoisonError::into_inner).push((name.to_string(), metrics));
    }

    /// Exports the scheduler counters and gauges of a loaded causal LM, and feeds its token
    /// timings into the time-to-first-token and inter-token latency histograms.
    pub fn track_llm(&self, name: &str, metrics: Arc<LlmMetrics>) {
        let labels: ModelLabels = [("model", name.to_string())];
        let first = self.first_token_seconds.get_or_create(&labels).clone();
        let next = self.inter_token_seconds.get_or_create(&labels).clone();
        let observed = metrics.set_token_observer(Arc::new(move |timing| match timing {
            TokenTiming::First(wait) => first.observe(wait.as_secs_f64()),
            TokenTiming::Next(gap) => next.observe(gap.as_secs_f64()),
        }));
        if !observed {
            tracing::warn!(model = name, "the model's token timings already feed another exporter");
        }
        self.llm_collector.models.lock().unwrap_or_else(PoisonError::into_inner).push((name.to_string(), metrics));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counters_and_batches_appear_with_the_model_label() {
        let metrics = Metrics::new();
        let exporter = ModelMetricsExporter::register(&metrics);
        let embed_metrics = Arc::new(EmbedMetrics::default());
        embed_metrics.queue_depth.store(3, Ordering::Relaxed);
        embed_metrics.inputs_total.store(42, Ordering::Relaxed);
        exporter.track("minilm", embed_metrics);
        (exporter.observer("minilm"))(&BatchStats {
            size: 8,
            tokens: 80,
            padded_tokens: 96,
            duration: Duration::from_millis(5),
        });
        let text = metrics.encode().unwrap();
        assert!(text.contains("nstream_embed_queue_depth{model=\"minilm\"} 3"), "{text}");
        assert!(text.contains("nstream_embed_inputs_total{model=\"minilm\"} 42"), "{text}");
        assert!(text.contains("nstream_embed_batch_size_count{model=\"minilm\"} 1"), "{text}");
    }

    #[test]
    fn llm_scheduler_counters_appear_with_the_model_label() {
        let metrics = Metrics::new();
        let exporter = ModelMetricsExporter::register(&metrics);
        let llm_metrics = Arc::new(LlmMetrics::default());
        llm_metrics.running_sequences.store(4, Ordering::Relaxed);
        llm_metrics.generated_tokens_total.store(1234, Ordering::Relaxed);
        llm_metrics.step_micros_total.store(2_500_000, Ordering::Relaxed);
        llm_metrics.kv_cache_tokens.store(300, Ordering::Relaxed);
        llm_metrics.kv_cache_capacity_tokens.store(1024, Ordering::Relaxed);
        exporter.track_llm("smollm2", llm_metrics);
        let text = metrics.encode().unwrap();
        assert!(text.contains("nstream_llm_running_sequences{model=\"smollm2\"} 4"), "{text}");
        assert!(text.contains("nstream_llm_generated_tokens_total{model=\"smollm2\"} 1234"), "{text}");
        assert!(text.contains("nstream_llm_step_seconds_total{model=\"smollm2\"} 2.5"), "{text}");
        assert!(text.contains("nstream_llm_kv_cache_tokens{model=\"smollm2\"} 300"), "{text}");
        assert!(text.contains("nstream_llm_kv_cache_capacity_tokens{model=\"smollm2\"} 1024"), "{text}");
        // Histograms exist from the moment the model is tracked (empty until tokens come).
        assert!(text.contains("nstream_llm_time_to_first_token_seconds_count{model=\"smollm2\"} 0"), "{text}");
        assert!(text.contains("nstream_llm_inter_token_latency_seconds_count{model=\"smollm2\"} 0"), "{text}");
    }
}
