//! The workers: each item attempted under the limits and the budget until an accepted answer, a
//! permanent error or its attempts are used up, every attempt and outcome journaled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nstream_backend::chat::{ChatMessage, FinishReason};
use nstream_backend::{BackendError, ChatCompletionRequest, ModelBackend, StopSequences};
use nstream_hosted::limiter::RateLimiter;
use nstream_hosted::retry::{RetryPolicy, is_retryable_status};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::Settings;
use crate::error::Result;
use crate::journal::{Entry, Journal};
use crate::limits::AdaptiveGate;
use crate::model::ModelInfo;
use crate::plan::Work;
use crate::price::Price;
use crate::progress::{Counters, utc_now};
use crate::validate::{AnswerCheck, AnswerFormat};

/// The dollars a run may still commit: spent, and reserved by the items in flight.
pub(super) struct Budget {
    pub(super) max: Option<f64>,
    pub(super) spent: f64,
    pub(super) reserved: f64,
}

/// What every worker of a run shares.
pub(super) struct Shared {
    pub(super) backend: Arc<dyn ModelBackend>,
    pub(super) model: ModelInfo,
    pub(super) journal: Journal,
    pub(super) limiter: Option<RateLimiter>,
    pub(super) gate: AdaptiveGate,
    pub(super) check: AnswerCheck,
    pub(super) settings: Settings,
    pub(super) template_hash: String,
    pub(super) parameters_value: Value,
    pub(super) price: Option<(String, Price)>,
    pub(super) counters: Counters,
    pub(super) budget: Mutex<Budget>,
    /// Set when the run stops (an error or an interrupt): workers send no further attempt.
    pub(super) stopping: AtomicBool,
}

/// What happened to one item in this run.
pub(super) enum ItemOutcome {
    /// Answered: its journal offset and cost.
    Done { key: String, offset: u64, cost: f64 },
    /// Failed for good: its journal offset.
    Failed { key: String, offset: u64 },
}

impl Budget {
    pub(super) fn try_reserve(&mut self, estimate: f64) -> bool {
        if let Some(max) = self.max
            && self.spent + self.reserved + estimate > max
        {
            return false;
        }
        self.reserved += estimate;
        true
    }

    fn settle(&mut self, estimate: f64, actual: f64) {
        self.reserved = (self.reserved - estimate).max(0.0);
        self.spent += actual;
    }
}

/// How an error is handled.
enum ErrorClass {
    RateLimited(Option<Duration>),
    Transient(Option<Duration>),
    Permanent,
}

fn classify(error: &BackendError) -> ErrorClass {
    match error {
        BackendError::Upstream { status: 429, message, retry_after } => {
            let text = message.to_ascii_lowercase();
            // Out of quota or over a spend limit: waiting does not help.
            if text.contains("insufficient_quota") || text.contains("exceeded your current quota") {
                ErrorClass::Permanent
            } else {
                ErrorClass::RateLimited(*retry_after)
            }
        }
        BackendError::Upstream { status, retry_after, .. } if is_retryable_status(*status) => {
            ErrorClass::Transient(*retry_after)
        }
        BackendError::Overloaded { retry_after } | BackendError::RateLimited { retry_after } => {
            ErrorClass::RateLimited(Some(*retry_after))
        }
        BackendError::Timeout | BackendError::NotReady | BackendError::Cancelled | BackendError::Internal(_) => {
            ErrorClass::Transient(None)
        }
        _ => ErrorClass::Permanent,
    }
}

fn error_kind(error: &BackendError) -> &'static str {
    match error {
        BackendError::Upstream { status: 429, .. } | BackendError::RateLimited { .. } => "rate_limited",
        BackendError::Upstream { status, .. } if *status >= 500 => "upstream_error",
        BackendError::Upstream { .. } => "rejected",
        BackendError::Timeout => "timeout",
        BackendError::InvalidRequest { .. } | BackendError::ContextLengthExceeded { .. } => "invalid_request",
        BackendError::Unsupported { .. } => "unsupported",
        _ => "backend_error",
    }
}

/// Rough prompt tokens: four characters per token plus a few per message (as the gateway counts).
pub(super) fn estimate_prompt_tokens(messages: &[ChatMessage]) -> u64 {
    messages.iter().map(|message| (message.text().len() as u64).div_ceil(4) + 4).sum()
}

impl Shared {
    pub(super) fn estimate_cost(&self, messages: &[ChatMessage]) -> f64 {
        let Some((_, price)) = &self.price else { return 0.0 };
        let completion = u64::from(self.settings.parameters.max_tokens.unwrap_or(1024));
        price.estimate(estimate_prompt_tokens(messages), completion)
    }

    fn request(&self, messages: &[ChatMessage]) -> ChatCompletionRequest {
        let parameters = &self.settings.parameters;
        let mut request = ChatCompletionRequest::new(&self.model.name, messages.to_vec());
        request.temperature = parameters.temperature;
        request.top_p = parameters.top_p;
        request.max_tokens = parameters.max_tokens;
        request.seed = parameters.seed;
        if !parameters.stop.is_empty() {
            request.stop = Some(StopSequences::Many(parameters.stop.clone()));
        }
        request.response_format = match (&self.settings.schema, self.check.format()) {
            (Some(schema), _) => {
                Some(json!({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}))
            }
            (None, AnswerFormat::Json) => Some(json!({"type": "json_object"})),
            (None, AnswerFormat::Text) => None,
        };
        request
    }

    fn backoff(&self, retry: u32, hint: Option<Duration>) -> Duration {
        if let Some(hint) = hint {
            return hint.min(Duration::from_secs(300));
        }
        let policy = RetryPolicy {
            max_retries: u32::MAX,
            initial_backoff: self.settings.initial_backoff,
            max_backoff: self.settings.max_backoff,
            max_total_wait: Duration::MAX,
        };
        policy.backoff(retry)
    }

    /// Answers one item: attempts until an accepted answer, a permanent error, or the budget of
    /// attempts (counted over every run) is used up. Returns `None` when the run is stopping.
    pub(super) async fn process(self: Arc<Self>, work: Work, estimate: f64) -> Result<Option<ItemOutcome>> {
        let outcome = self.attempts(&work, estimate).await;
        if outcome.is_err()
            && let Ok(mut budget) = self.budget.lock()
        {
            budget.settle(estimate, 0.0);
        }
        outcome
    }

    async fn attempts(&self, work: &Work, estimate: f64) -> Result<Option<ItemOutcome>> {
        let max_attempts = self.settings.max_attempts;
        let mut attempt = work.attempts_before;
        let mut retries_now = 0u32;
        let mut invalid_answers = 0u32;
        let mut last_error: Option<Value> = work.last_error.clone();
        let request = self.request(&work.messages);
        // Backends trust their callers to validate (ModelBackend's contract): an item whose request
        // can never be valid fails at once, without an attempt.
        if let Err(error) = request.validate() {
            let described =
                json!({"kind": error_kind(&error), "status": error.status_code(), "message": error.to_string()});
            return self.record_failure(work, described, attempt, estimate).await.map(Some);
        }
        let tokens =
            estimate_prompt_tokens(&work.messages) + u64::from(self.settings.parameters.max_tokens.unwrap_or(0));
        loop {
            if self.stopping.load(Ordering::Relaxed) {
                return Ok(None);
            }
            if attempt >= max_attempts {
                let error = last_error.unwrap_or_else(|| {
                    json!({"kind": "attempts_exhausted", "message": format!(
                        "all {max_attempts} attempts were used by earlier, interrupted runs"
                    )})
                });
                return self.record_failure(work, error, attempt, estimate).await.map(Some);
            }
            let permit = self.gate.enter().await;
            if let Some(limiter) = &self.limiter {
                limiter.acquire(tokens).await;
            }
            attempt += 1;
            // Durable before the request leaves: a crash now still counts this attempt.
            self.journal.append(&Entry::Attempt { key: work.key.clone(), n: attempt, at: utc_now() }).await?;
            Counters::add(&self.counters.attempts, 1);
            let sent = Instant::now();
            let answer = tokio::time::timeout(self.settings.request_timeout, self.backend.chat(request.clone()))
                .await
                .unwrap_or(Err(BackendError::Timeout));
            let latency = sent.elapsed();
            drop(permit);
            let response = match answer {
                Ok(response) => response,
                Err(error) => {
                    let class = classify(&error);
                    let described = json!({
                        "kind": error_kind(&error), "status": error.status_code(), "message": error.to_string(),
                    });
                    self.journal
                        .append(&Entry::AttemptFailed { key: work.key.clone(), n: attempt, error: described.clone() })
                        .await?;
                    last_error = Some(described);
                    let hint = match class {
                        ErrorClass::Permanent => {
                            return self
                                .record_failure(work, last_error.unwrap_or_default(), attempt, estimate)
                                .await
                                .map(Some);
                        }
                        ErrorClass::RateLimited(hint) => {
                            Counters::add(&self.counters.rate_limited, 1);
                            self.gate.on_rate_limited(hint);
                            hint
                        }
                        ErrorClass::Transient(hint) => {
                            Counters::add(&self.counters.transient_errors, 1);
                            hint
                        }
                    };
                    tracing::debug!(line = work.first_line, attempt, %error, "retryable failure");
                    if attempt < max_attempts {
                        tokio::time::sleep(self.backoff(retries_now, hint)).await;
                        retries_now += 1;
                    }
                    continue;
                }
            };
            self.gate.on_success();
            let choice = response.choices.first();
            let content = choice.and_then(|choice| choice.message.content.clone()).unwrap_or_default();
            let finish_reason = choice.and_then(|choice| choice.finish_reason);
            match self.check.check(&content) {
                Ok(answer) => {
                    return self
                        .record_answer(work, &response, answer, finish_reason, latency, attempt, estimate)
                        .await
                        .map(Some);
                }
                Err(reason) => {
                    Counters::add(&self.counters.invalid_answers, 1);
                    let described = json!({"kind": "invalid_answer", "message": reason, "answer": content});
                    self.journal
                        .append(&Entry::AttemptFailed { key: work.key.clone(), n: attempt, error: described.clone() })
                        .await?;
                    last_error = Some(described);
                    invalid_answers += 1;
                    if invalid_answers > self.settings.invalid_answer_retries {
                        return self
                            .record_failure(work, last_error.unwrap_or_default(), attempt, estimate)
                            .await
                            .map(Some);
                    }
                }
            }
        }
    }

    #[expect(clippy::too_many_arguments, reason = "one private call site; a struct would only rename them")]
    async fn record_answer(
        &self,
        work: &Work,
        response: &nstream_backend::ChatCompletionResponse,
        answer: String,
        finish_reason: Option<FinishReason>,
        latency: Duration,
        attempts: u32,
        estimate: f64,
    ) -> Result<ItemOutcome> {
        let usage = response.usage.unwrap_or_default();
        let cost = self.price.as_ref().map(|(_, price)| price.cost(&usage));
        let mut messages: Vec<Value> =
            work.messages.iter().map(|message| json!({"role": message.role, "content": message.text()})).collect();
        messages.push(json!({"role": "assistant", "content": answer}));
        let record = json!({
            "row": {"messages": messages},
            "provenance": {
                "key": work.key,
                "model": self.model,
                "response_model": response.model,
                "template_hash": self.template_hash,
                "parameters": self.parameters_value,
                "usage": usage,
                "cost_usd": cost,
                "price_entry": self.price.as_ref().map(|(name, _)| name),
                "finish_reason": finish_reason,
                "provider_request_id": response.id,
                "system_fingerprint": response.system_fingerprint,
                "latency_ms": latency.as_millis() as u64,
                "attempts": attempts,
                "generated_at": utc_now(),
            },
        });
        let offset = self.journal.append(&Entry::Done { key: work.key.clone(), record }).await?;
        let cost = cost.unwrap_or(0.0);
        if let Ok(mut budget) = self.budget.lock() {
            budget.settle(estimate, cost);
        }
        Counters::add(&self.counters.done, 1);
        Counters::add(&self.counters.prompt_tokens, u64::from(usage.prompt_tokens));
        Counters::add(&self.counters.completion_tokens, u64::from(usage.completion_tokens));
        Counters::add(&self.counters.cost_nano_usd, (cost * 1e9).round() as u64);
        Ok(ItemOutcome::Done { key: work.key.clone(), offset, cost })
    }

    async fn record_failure(&self, work: &Work, error: Value, attempts: u32, estimate: f64) -> Result<ItemOutcome> {
        tracing::warn!(
            line = work.first_line,
            attempts,
            "item failed: {}",
            error.get("message").and_then(serde_json::Value::as_str).unwrap_or("unknown error")
        );
        let record = json!({
            "error": error,
            "provenance": {
                "key": work.key,
                "model": self.model,
                "template_hash": self.template_hash,
                "parameters": self.parameters_value,
                "attempts": attempts,
                "failed_at": utc_now(),
            },
        });
        let offset = self.journal.append(&Entry::Failed { key: work.key.clone(), record }).await?;
        if let Ok(mut budget) = self.budget.lock() {
            budget.settle(estimate, 0.0);
        }
        Counters::add(&self.counters.failed, 1);
        Ok(ItemOutcome::Failed { key: work.key.clone(), offset })
    }
}
