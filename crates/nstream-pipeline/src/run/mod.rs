//! One generation run, in stages: prepare (settings, answer check, prompts, keyed parameters,
//! price), plan (read, render, key every record: [`crate::plan`]), resume (what the journal
//! already holds), dispatch (the items under the limits, each journaled by a worker), and
//! summarise (the output files from the journal, report.json).

mod dispatch;
mod prepare;
mod resume;
mod summary;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nstream_backend::{ModelBackend, Usage};
use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::input::InputFormat;
use crate::journal::{Journal, OpenMode};
use crate::limits::{AdaptiveGate, rate_limiter};
use crate::model::ModelInfo;
use crate::output::OutputPaths;
use crate::plan::Planner;
use crate::price::PriceTable;
use crate::progress::{Counters, Progress, ProgressMode};
use crate::validate::AnswerFormat;
use prepare::Prepared;
use summary::Finished;
use worker::{Budget, Shared, estimate_prompt_tokens};

/// Sampling parameters sent with every request; they are part of every item key.
///
/// `#[non_exhaustive]`: start from [`Parameters::default`] (the provider's defaults) and use the
/// `with_*` methods.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[non_exhaustive]
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

impl Parameters {
    /// Sets the sampling temperature.
    pub fn with_temperature(mut self, temperature: f32) -> Self {
        self.temperature = Some(temperature);
        self
    }

    /// Sets the nucleus sampling mass.
    pub fn with_top_p(mut self, top_p: f32) -> Self {
        self.top_p = Some(top_p);
        self
    }

    /// Sets the most tokens per answer.
    pub fn with_max_tokens(mut self, max_tokens: u32) -> Self {
        self.max_tokens = Some(max_tokens);
        self
    }

    /// Sets the seed, for providers that honour it.
    pub fn with_seed(mut self, seed: i64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Sets the stop sequences.
    pub fn with_stop(mut self, stop: Vec<String>) -> Self {
        self.stop = stop;
        self
    }
}

/// Everything a run needs besides the model.
///
/// `#[non_exhaustive]`: start from [`Settings::new`] and set the fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
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
    let started = Instant::now();
    let prepared = Prepared::new(&settings, &model)?;
    let format = settings.input_format.unwrap_or_else(|| InputFormat::from_path(&settings.input));
    let planner = Planner {
        prompts: &prepared.prompts,
        fingerprint: &model.fingerprint(),
        parameters_hash: &prepared.parameters_hash,
        skip_bad_input: settings.skip_bad_input,
    };
    let mut plan = planner.plan(&settings.input, format)?;

    let (journal, mut state) = Journal::open(&prepared.paths.journal, settings.mode)?;
    let resumed = resume::resume(&mut plan, &mut state, &settings);
    resume::record_run(&journal, &settings, &model, &prepared).await?;
    tracing::info!(
        "{} input lines, {} distinct items: {} answered before, {} to do now",
        plan.lines.len(),
        plan.order.len(),
        resumed.skipped_done,
        resumed.pending.len()
    );

    let progress = Progress::new(
        settings.progress,
        resumed.pending.len() as u64,
        resumed.skipped_done as u64,
        settings.progress_interval,
    );
    let paths = prepared.paths.clone();
    let shared = Arc::new(shared(backend, model, journal, &settings, prepared, &resumed));
    let stop = dispatch::dispatch(&shared, resumed.pending, &mut state, &progress, interrupt, &paths.journal).await?;
    let finished = Finished { stop, started, skipped_done: resumed.skipped_done, format, plan: &plan, state: &state };
    summary::summarise(&shared, &paths, finished)
}

/// What the workers share: the backend, the journal, the limits sized for the largest request,
/// and the budget with what earlier runs spent.
fn shared(
    backend: Arc<dyn ModelBackend>,
    model: ModelInfo,
    journal: Journal,
    settings: &Settings,
    prepared: Prepared,
    resumed: &resume::Resumed,
) -> Shared {
    let largest_request = resumed
        .pending
        .iter()
        .map(|work| estimate_prompt_tokens(&work.messages) + u64::from(settings.parameters.max_tokens.unwrap_or(0)))
        .max()
        .unwrap_or(1);
    Shared {
        backend,
        model,
        journal,
        limiter: rate_limiter(settings.requests_per_minute, settings.tokens_per_minute, largest_request),
        gate: AdaptiveGate::new(settings.concurrency),
        template_hash: prepared.prompts.hash().to_owned(),
        check: prepared.check,
        parameters_value: prepared.parameters_value,
        price: prepared.price,
        counters: Counters::default(),
        budget: Mutex::new(Budget { max: settings.max_cost, spent: resumed.spent_before, reserved: 0.0 }),
        stopping: AtomicBool::new(false),
        settings: settings.clone(),
    }
}
