//! The end of a run: the output files written from the journal, the summary and report.json.

use nstream_backend::Usage;
use serde_json::json;
use tokio::time::Instant;

use super::worker::Shared;
use super::{Stop, Summary};
use crate::error::Result;
use crate::input::InputFormat;
use crate::journal::JournalState;
use crate::output::{OutputPaths, write_outputs};
use crate::plan::Plan;
use crate::progress::{Counters, utc_now};

/// What the summary needs besides the shared counters.
pub(super) struct Finished<'a> {
    /// Why the run ended.
    pub(super) stop: Stop,
    /// When it started.
    pub(super) started: Instant,
    /// Items answered in earlier runs.
    pub(super) skipped_done: usize,
    /// The input's layout.
    pub(super) format: InputFormat,
    /// The plan the outputs follow.
    pub(super) plan: &'a Plan,
    /// The journal state after the run.
    pub(super) state: &'a JournalState,
}

/// Writes the output files from the journal state and report.json, and returns the summary.
pub(super) fn summarise(shared: &Shared, paths: &OutputPaths, finished: Finished<'_>) -> Result<Summary> {
    let (settings, model, price) = (&shared.settings, &shared.model, &shared.price);
    let written = write_outputs(paths, &finished.plan.lines, finished.state, model)?;
    let counters = &shared.counters;
    let elapsed = finished.started.elapsed().as_secs_f64();
    let requests = Counters::get(&counters.attempts);
    let cost_now = price.as_ref().map(|_| Counters::get(&counters.cost_nano_usd) as f64 / 1e9);
    let total_cost = price.as_ref().map(|_| written.total_cost);
    let summary = Summary {
        stop: finished.stop,
        inputs: finished.plan.lines.len(),
        unique_items: finished.plan.order.len(),
        answered: written.answered,
        failed: written.failed,
        pending: written.pending,
        skipped_done: finished.skipped_done,
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
            "input": settings.input, "input_format": finished.format.as_str(), "template_hash": shared.template_hash,
            "parameters": shared.parameters_value, "concurrency": settings.concurrency,
            "requests_per_minute": settings.requests_per_minute, "tokens_per_minute": settings.tokens_per_minute,
            "max_attempts": settings.max_attempts, "max_cost": settings.max_cost,
            "price": price.as_ref().map(|(name, price)| json!({"entry": name, "input_per_million": price.input, "output_per_million": price.output})),
        },
        "finished_at": utc_now(),
    });
    crate::output::write_atomically(&paths.report, serde_json::to_vec_pretty(&report).unwrap_or_default())?;
    Ok(summary)
}
