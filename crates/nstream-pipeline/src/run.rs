//! One generation run: plan (read, render, key), dispatch under the limits, journal every attempt
//! and outcome, then write the output files from the journal.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nstream_backend::chat::{ChatMessage, FinishReason};
use nstream_backend::{BackendError, ChatCompletionRequest, ModelBackend, StopSequences, Usage};
use nstream_hosted::limiter::RateLimiter;
use nstream_hosted::retry::{RetryPolicy, is_retryable_status};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::input::{InputFormat, InputItem, read_input};
use crate::journal::{Entry, Journal, OpenMode};
use crate::key::{hash_json, item_key};
use crate::limits::{AdaptiveGate, rate_limiter};
use crate::model::ModelInfo;
use crate::output::{OutputPaths, write_outputs};
use crate::price::{Price, PriceTable};
use crate::progress::{Counters, Progress, ProgressMode, utc_now};
use crate::template::PromptBuilder;
use crate::validate::{AnswerCheck, AnswerFormat};

/// Sampling parameters sent with every request; they are part of every item key.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Parameters {
    /// Sampling temperature.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Most tokens per answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Seed, for providers that honour it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Stop sequences.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

/// Everything a run needs besides the model.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The input file.
    pub input: PathBuf,
    /// Its layout; guessed from the extension when `None`.
    pub input_format: Option<InputFormat>,
    /// The fine-tuning file to write; the journal, provenance, failures and report sit next to it.
    pub output: PathBuf,
    /// Where report.json goes (default: next to the output).
    pub report: Option<PathBuf>,
    /// A minijinja template rendering the user message: (name for errors, source).
    pub template: Option<(String, String)>,
    /// A system message put first in every conversation.
    pub system: Option<String>,
    /// Sampling parameters.
    pub parameters: Parameters,
    /// What an answer must be.
    pub format: AnswerFormat,
    /// A JSON schema answers must match (implies JSON).
    pub schema: Option<Value>,
    /// Extra attempts when an answer fails the format or schema check.
    pub invalid_answer_retries: u32,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// Client-side requests per minute (every attempt counts).
    pub requests_per_minute: Option<u32>,
    /// Client-side tokens per minute (prompt estimate plus max_tokens).
    pub tokens_per_minute: Option<u32>,
    /// Most requests sent upstream for one item, over all runs (until `--retry-failed`).
    pub max_attempts: u32,
    /// First backoff after a retryable failure without a provider hint; doubles, with jitter.
    pub initial_backoff: Duration,
    /// Cap of one computed backoff.
    pub max_backoff: Duration,
    /// Limit of one request.
    pub request_timeout: Duration,
    /// Stop starting items once this many dollars are spent (answers of earlier runs count).
    pub max_cost: Option<f64>,
    /// Prices per model.
    pub prices: PriceTable,
    /// Record malformed input lines and records that do not render as failures and go on,
    /// instead of stopping before anything is sent.
    pub skip_bad_input: bool,
    /// What to do with an existing journal.
    pub mode: OpenMode,
    /// Give recorded failures a fresh attempt budget.
    pub retry_failed: bool,
    /// How progress is shown.
    pub progress: ProgressMode,
    /// Interval of plain progress lines.
    pub progress_interval: Duration,
}

impl Settings {
    /// Settings with the defaults of `nstream generate`.
    pub fn new(input: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Self {
        Self {
            input: input.into(),
            input_format: None,
            output: output.into(),
            report: None,
            template: None,
            system: None,
            parameters: Parameters::default(),
            format: AnswerFormat::Text,
            schema: None,
            invalid_answer_retries: 2,
            concurrency: 8,
            requests_per_minute: None,
            tokens_per_minute: None,
            max_attempts: 6,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            request_timeout: Duration::from_secs(120),
            max_cost: None,
            prices: PriceTable::builtin(),
            skip_bad_input: false,
            mode: OpenMode::Fresh,
            retry_failed: false,
            progress: ProgressMode::Auto,
            progress_interval: Duration::from_secs(10),
        }
    }

    fn validate(&self) -> Result<()> {
        let invalid = |setting, reason: &str| Err(Error::InvalidSetting { setting, reason: reason.to_owned() });
        if self.concurrency == 0 {
            return invalid("concurrency", "must be at least 1");
        }
        if self.max_attempts == 0 {
            return invalid("max-attempts", "must be at least 1");
        }
        if self.requests_per_minute == Some(0) || self.tokens_per_minute == Some(0) {
            return invalid("rpm/tpm", "must be at least 1 (omit for no limit)");
        }
        if self.max_cost.is_some_and(|cost| !(cost.is_finite() && cost >= 0.0)) {
            return invalid("max-cost", "must be a number of dollars, zero or more");
        }
        if self.request_timeout.is_zero() {
            return invalid("timeout", "must be greater than zero");
        }
        if self.initial_backoff > self.max_backoff {
            return invalid("backoff", "the initial backoff is above the maximum");
        }
        if self.parameters.stop.len() > 4 {
            return invalid("stop", "at most 4 stop sequences");
        }
        Ok(())
    }
}

/// Why a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// Every input has a result or a recorded failure.
    Complete,
    /// The `--max-cost` budget was reached; pending items were not started.
    Budget,
    /// Interrupted (Ctrl-C): running requests finished, pending items were not started.
    Interrupted,
}

/// The outcome of a run, as in report.json.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Why the run ended.
    pub stop: Stop,
    /// Input records and bad lines read.
    pub inputs: usize,
    /// Distinct item keys among them.
    pub unique_items: usize,
    /// Input records with an answer (output rows).
    pub answered: usize,
    /// Input records with a recorded failure (bad input included).
    pub failed: usize,
    /// Input records still without either (budget stop).
    pub pending: usize,
    /// Items answered in earlier runs and skipped now.
    pub skipped_done: usize,
    /// Items generated in this run.
    pub generated_now: u64,
    /// Items that failed in this run.
    pub failed_now: u64,
    /// Requests sent upstream in this run.
    pub requests: u64,
    /// 429 answers in this run.
    pub rate_limited: u64,
    /// Retryable errors other than 429 in this run.
    pub transient_errors: u64,
    /// Answers that failed the format or schema check in this run.
    pub invalid_answers: u64,
    /// Times the concurrency was lowered after a 429.
    pub slowdowns: u64,
    /// Prompt and completion tokens of this run's answers.
    pub usage: Usage,
    /// Dollars spent in this run (null without a price).
    pub cost_usd: Option<f64>,
    /// Dollars spent for the whole output, earlier runs included.
    pub total_cost_usd: Option<f64>,
    /// Seconds the run took.
    pub elapsed_seconds: f64,
    /// Requests per minute sent upstream, over the run.
    pub requests_per_minute: f64,
    /// The files written.
    pub files: OutputPaths,
}

/// One input line in the plan.
#[derive(Debug, Clone)]
pub(crate) enum Planned {
    /// A record to answer.
    Item { line: u64, id: String, input_hash: String, key: String },
    /// A line that cannot be sent: it becomes a recorded failure.
    Invalid { line: u64, message: String },
}

struct Work {
    key: String,
    messages: Vec<ChatMessage>,
    first_line: u64,
    attempts_before: u32,
    last_error: Option<Value>,
}

struct Budget {
    max: Option<f64>,
    spent: f64,
    reserved: f64,
}

struct Shared {
    backend: Arc<dyn ModelBackend>,
    model: ModelInfo,
    journal: Journal,
    limiter: Option<RateLimiter>,
    gate: AdaptiveGate,
    check: AnswerCheck,
    settings: Settings,
    template_hash: String,
    parameters_value: Value,
    price: Option<(String, Price)>,
    counters: Counters,
    budget: Mutex<Budget>,
    /// Set when the run stops (an error or an interrupt): workers send no further attempt.
    stopping: AtomicBool,
}

/// What happened to one item in this run.
enum ItemOutcome {
    Done { key: String, offset: u64, cost: f64 },
    Failed { key: String, offset: u64 },
}

/// Runs generation over `settings.input` with `backend` and writes the output files.
///
/// Blocking callers wrap it in a runtime; it spawns tasks on the current one.
pub async fn generate(backend: Arc<dyn ModelBackend>, model: ModelInfo, settings: Settings) -> Result<Summary> {
    generate_until(backend, model, settings, std::future::pending()).await
}

/// [`generate`] that stops early when `interrupt` completes (a Ctrl-C): no new item or attempt
/// starts, requests in flight finish and are journaled, and the output files are written from
/// what is done. A later `--resume` continues.
pub async fn generate_until(
    backend: Arc<dyn ModelBackend>,
    model: ModelInfo,
    settings: Settings,
    interrupt: impl std::future::Future<Output = ()>,
) -> Result<Summary> {
    settings.validate()?;
    let started = Instant::now();
    let paths = OutputPaths::for_output(&settings.output, settings.report.as_deref());
    if let Some(parent) = settings.output.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|error| Error::io(parent, error))?;
    }
    let check = AnswerCheck::new(settings.format, settings.schema.as_ref())?;
    let template = settings.template.as_ref().map(|(name, source)| (name.as_str(), source.as_str()));
    let prompts = PromptBuilder::new(template, settings.system.as_deref())?;
    let mut parameters_value = serde_json::to_value(&settings.parameters).unwrap_or_default();
    if let Value::Object(map) = &mut parameters_value {
        map.insert("format".into(), json!(check.format()));
        if let Some(schema) = &settings.schema {
            map.insert("schema_hash".into(), json!(hash_json(schema)));
        }
    }
    let parameters_hash = hash_json(&parameters_value);
    let price = if model.is_local() {
        Some(("local".to_owned(), Price { input: 0.0, output: 0.0 }))
    } else {
        settings.prices.lookup(&model.price_names())
    };
    if price.is_none() {
        let names = model.price_names().join(", ");
        if settings.max_cost.is_some() {
            return Err(Error::Prices(format!(
                "--max-cost needs the price of {} but the table has none of: {names}; add one with --prices FILE",
                model.name
            )));
        }
        tracing::warn!("no price for {names}: costs are not computed (add one with --prices FILE)");
    }

    // Plan: read, render and key every record before anything is sent.
    let format = settings.input_format.unwrap_or_else(|| InputFormat::from_path(&settings.input));
    let items = read_input(&settings.input, format)?;
    let fingerprint = model.fingerprint();
    let mut plan = Vec::with_capacity(items.len());
    let mut work_by_key: HashMap<String, Work> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    for item in items {
        match item {
            InputItem::Bad(bad) => {
                if !settings.skip_bad_input {
                    return Err(Error::BadInput { path: settings.input.clone(), line: bad.line, message: bad.message });
                }
                tracing::warn!("{}:{}: {} (recorded as a failure)", settings.input.display(), bad.line, bad.message);
                plan.push(Planned::Invalid { line: bad.line, message: bad.message });
            }
            InputItem::Record(record) => match prompts.render(&record) {
                Err(message) => {
                    if !settings.skip_bad_input {
                        return Err(Error::BadInput { path: settings.input.clone(), line: record.line, message });
                    }
                    tracing::warn!("{}:{}: {message} (recorded as a failure)", settings.input.display(), record.line);
                    plan.push(Planned::Invalid { line: record.line, message });
                }
                Ok(messages) => {
                    let input_hash = hash_json(&record.value);
                    let key = item_key(&fingerprint, prompts.hash(), &parameters_hash, &input_hash);
                    if !work_by_key.contains_key(&key) {
                        order.push(key.clone());
                        work_by_key.insert(
                            key.clone(),
                            Work {
                                key: key.clone(),
                                messages,
                                first_line: record.line,
                                attempts_before: 0,
                                last_error: None,
                            },
                        );
                    }
                    plan.push(Planned::Item { line: record.line, id: record.id, input_hash, key });
                }
            },
        }
    }

    let (journal, mut state) = Journal::open(&paths.journal, settings.mode)?;
    let unused = state
        .keys
        .iter()
        .filter(|(key, key_state)| key_state.done.is_some() && !work_by_key.contains_key(*key))
        .count();
    if unused > 0 {
        tracing::warn!(
            "the journal holds {unused} answers for other inputs or settings (model, template or parameters changed); they are not part of this output"
        );
    }
    let mut pending = Vec::new();
    let mut skipped_done = 0usize;
    let mut spent_before = 0.0f64;
    for key in &order {
        let known = state.keys.get(key).copied().unwrap_or_default();
        if known.done.is_some() {
            skipped_done += 1;
            spent_before += state.costs.get(key).copied().unwrap_or(0.0);
            continue;
        }
        if known.failed.is_some() && !settings.retry_failed {
            continue;
        }
        if let Some(mut work) = work_by_key.remove(key) {
            work.attempts_before = if known.failed.is_some() { 0 } else { known.attempts };
            if known.failed.is_none() {
                work.last_error = state.last_errors.get(key).cloned();
            }
            pending.push(work);
        }
    }
    if settings.retry_failed {
        // A fresh budget: forget attempts counted before the failures being retried.
        for work in &pending {
            if let Some(key_state) = state.keys.get_mut(&work.key)
                && key_state.failed.is_some()
            {
                key_state.attempts = 0;
            }
        }
    }
    journal
        .append(&Entry::Run {
            at: utc_now(),
            settings: json!({
                "input": settings.input, "output": settings.output, "model": model, "template_hash": prompts.hash(),
                "parameters": parameters_value, "concurrency": settings.concurrency,
                "requests_per_minute": settings.requests_per_minute, "tokens_per_minute": settings.tokens_per_minute,
                "max_attempts": settings.max_attempts, "max_cost": settings.max_cost, "retry_failed": settings.retry_failed,
            }),
        })
        .await?;
    tracing::info!(
        "{} input lines, {} distinct items: {} answered before, {} to do now",
        plan.len(),
        order.len(),
        skipped_done,
        pending.len()
    );

    let largest_request = pending
        .iter()
        .map(|work| estimate_prompt_tokens(&work.messages) + u64::from(settings.parameters.max_tokens.unwrap_or(0)))
        .max()
        .unwrap_or(1);
    let progress =
        Progress::new(settings.progress, pending.len() as u64, skipped_done as u64, settings.progress_interval);
    let shared = Arc::new(Shared {
        backend,
        model: model.clone(),
        journal,
        limiter: rate_limiter(settings.requests_per_minute, settings.tokens_per_minute, largest_request),
        gate: AdaptiveGate::new(settings.concurrency),
        check,
        template_hash: prompts.hash().to_owned(),
        parameters_value: parameters_value.clone(),
        price: price.clone(),
        counters: Counters::default(),
        budget: Mutex::new(Budget { max: settings.max_cost, spent: spent_before, reserved: 0.0 }),
        stopping: AtomicBool::new(false),
        settings: settings.clone(),
    });

    let mut stop = Stop::Complete;
    let interrupt = std::pin::pin!(interrupt);
    let mut interrupt = interrupt;
    let mut tasks: JoinSet<Result<Option<ItemOutcome>>> = JoinSet::new();
    let mut fatal: Option<Error> = None;
    let mut queue = pending.into_iter();
    loop {
        while tasks.len() < settings.concurrency && stop == Stop::Complete && fatal.is_none() {
            let Some(work) = queue.next() else { break };
            let estimate = shared.estimate_cost(&work.messages);
            let admitted = shared.budget.lock().map(|mut budget| budget.try_reserve(estimate)).unwrap_or(false);
            if !admitted {
                stop = Stop::Budget;
                progress.println(&format!(
                    "budget reached: --max-cost {:.4} would be crossed; not starting more items",
                    settings.max_cost.unwrap_or_default()
                ));
                break;
            }
            let shared = Arc::clone(&shared);
            tasks.spawn(async move { shared.process(work, estimate).await });
        }
        let joined = tokio::select! {
            joined = tasks.join_next() => joined,
            () = &mut interrupt, if stop == Stop::Complete => {
                stop = Stop::Interrupted;
                shared.stopping.store(true, Ordering::Relaxed);
                progress.println("interrupted: finishing the requests in flight, then writing the output (--resume continues)");
                continue;
            }
        };
        let Some(joined) = joined else { break };
        match joined {
            Ok(Ok(Some(outcome))) => {
                match outcome {
                    ItemOutcome::Done { key, offset, cost } => {
                        let entry = state.keys.entry(key.clone()).or_default();
                        entry.done = Some(offset);
                        entry.failed = None;
                        state.costs.insert(key, cost);
                    }
                    ItemOutcome::Failed { key, offset } => {
                        state.keys.entry(key).or_default().failed = Some(offset);
                    }
                }
                progress.update(&shared.counters);
            }
            Ok(Ok(None)) => {}
            Ok(Err(error)) => {
                shared.stopping.store(true, Ordering::Relaxed);
                fatal.get_or_insert(error);
            }
            Err(join_error) => {
                shared.stopping.store(true, Ordering::Relaxed);
                fatal.get_or_insert(Error::Journal {
                    path: paths.journal.clone(),
                    message: format!("a worker stopped unexpectedly: {join_error}"),
                });
            }
        }
    }
    progress.finish();
    if let Some(error) = fatal {
        return Err(error);
    }

    let written = write_outputs(&paths, &plan, &state, &model)?;
    let counters = &shared.counters;
    let elapsed = started.elapsed().as_secs_f64();
    let requests = Counters::get(&counters.attempts);
    let cost_now = price.as_ref().map(|_| Counters::get(&counters.cost_nano_usd) as f64 / 1e9);
    let total_cost = price.as_ref().map(|_| written.total_cost);
    let summary = Summary {
        stop,
        inputs: plan.len(),
        unique_items: order.len(),
        answered: written.answered,
        failed: written.failed,
        pending: written.pending,
        skipped_done,
        generated_now: Counters::get(&counters.done),
        failed_now: Counters::get(&counters.failed),
        requests,
        rate_limited: Counters::get(&counters.rate_limited),
        transient_errors: Counters::get(&counters.transient_errors),
        invalid_answers: Counters::get(&counters.invalid_answers),
        slowdowns: shared.gate.decreases(),
        usage: Usage::new(
            u32::try_from(Counters::get(&counters.prompt_tokens)).unwrap_or(u32::MAX),
            u32::try_from(Counters::get(&counters.completion_tokens)).unwrap_or(u32::MAX),
        ),
        cost_usd: cost_now,
        total_cost_usd: total_cost,
        elapsed_seconds: elapsed,
        requests_per_minute: if elapsed > 0.0 { requests as f64 / elapsed * 60.0 } else { 0.0 },
        files: paths.clone(),
    };
    let report = json!({
        "summary": summary,
        "model": model,
        "settings": {
            "input": settings.input, "input_format": format.as_str(), "template_hash": shared.template_hash,
            "parameters": parameters_value, "concurrency": settings.concurrency,
            "requests_per_minute": settings.requests_per_minute, "tokens_per_minute": settings.tokens_per_minute,
            "max_attempts": settings.max_attempts, "max_cost": settings.max_cost,
            "price": price.map(|(name, price)| json!({"entry": name, "input_per_million": price.input, "output_per_million": price.output})),
        },
        "finished_at": utc_now(),
    });
    crate::output::write_atomically(&paths.report, serde_json::to_vec_pretty(&report).unwrap_or_default())?;
    Ok(summary)
}

impl Budget {
    fn try_reserve(&mut self, estimate: f64) -> bool {
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
        BackendError::Overloaded { retry_after } => ErrorClass::RateLimited(Some(*retry_after)),
        BackendError::Timeout | BackendError::NotReady | BackendError::Cancelled | BackendError::Internal(_) => {
            ErrorClass::Transient(None)
        }
        _ => ErrorClass::Permanent,
    }
}

fn error_kind(error: &BackendError) -> &'static str {
    match error {
        BackendError::Upstream { status: 429, .. } => "rate_limited",
        BackendError::Upstream { status, .. } if *status >= 500 => "upstream_error",
        BackendError::Upstream { .. } => "rejected",
        BackendError::Timeout => "timeout",
        BackendError::InvalidRequest { .. } | BackendError::ContextLengthExceeded { .. } => "invalid_request",
        BackendError::Unsupported { .. } => "unsupported",
        _ => "backend_error",
    }
}

/// Rough prompt tokens: four characters per token plus a few per message (as the gateway counts).
fn estimate_prompt_tokens(messages: &[ChatMessage]) -> u64 {
    messages.iter().map(|message| (message.text().len() as u64).div_ceil(4) + 4).sum()
}

impl Shared {
    fn estimate_cost(&self, messages: &[ChatMessage]) -> f64 {
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
    async fn process(self: Arc<Self>, work: Work, estimate: f64) -> Result<Option<ItemOutcome>> {
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
