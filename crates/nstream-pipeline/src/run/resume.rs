//! Resuming: what the journal already holds decides which planned items are still to do.

use serde_json::json;

use super::Settings;
use super::prepare::Prepared;
use crate::error::Result;
use crate::journal::{Entry, Journal, JournalState};
use crate::model::ModelInfo;
use crate::plan::{Plan, Work};
use crate::progress::utc_now;

/// The items of the plan still to do, and what earlier runs did.
pub(super) struct Resumed {
    /// Items to attempt now, in plan order.
    pub(super) pending: Vec<Work>,
    /// Items answered in earlier runs.
    pub(super) skipped_done: usize,
    /// Dollars those answers cost.
    pub(super) spent_before: f64,
}

/// Takes the items still to do out of the plan: not answered yet, and not failed (unless
/// `retry_failed`, which gives them a fresh attempt budget); the others keep their attempts and
/// last error.
pub(super) fn resume(plan: &mut Plan, state: &mut JournalState, settings: &Settings) -> Resumed {
    let unused = state
        .keys
        .iter()
        .filter(|(key, key_state)| key_state.done.is_some() && !plan.work_by_key.contains_key(*key))
        .count();
    if unused > 0 {
        tracing::warn!(
            "the journal holds {unused} answers for other inputs or settings (model, template or parameters changed); they are not part of this output"
        );
    }
    let mut pending = Vec::new();
    let mut skipped_done = 0usize;
    let mut spent_before = 0.0f64;
    for key in &plan.order {
        let known = state.keys.get(key).copied().unwrap_or_default();
        if known.done.is_some() {
            skipped_done += 1;
            spent_before += state.costs.get(key).copied().unwrap_or(0.0);
            continue;
        }
        if known.failed.is_some() && !settings.retry_failed {
            continue;
        }
        if let Some(mut work) = plan.work_by_key.remove(key) {
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
    Resumed { pending, skipped_done, spent_before }
}

/// Journals the run's settings (what a later `--resume` and a reader of the journal see).
pub(super) async fn record_run(
    journal: &Journal,
    settings: &Settings,
    model: &ModelInfo,
    prepared: &Prepared,
) -> Result<()> {
    let parameters_value = &prepared.parameters_value;
    journal
        .append(&Entry::Run {
            at: utc_now(),
            settings: json!({
                "input": settings.input, "output": settings.output, "model": model, "template_hash": prepared.prompts.hash(),
                "parameters": parameters_value, "concurrency": settings.concurrency,
                "requests_per_minute": settings.requests_per_minute, "tokens_per_minute": settings.tokens_per_minute,
                "max_attempts": settings.max_attempts, "max_cost": settings.max_cost, "retry_failed": settings.retry_failed,
            }),
        })
        .await?;
    Ok(())
}
