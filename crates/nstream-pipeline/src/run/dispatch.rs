//! The loop of a run: start items while the concurrency, the budget and the interrupt allow,
//! and record each finished item in the journal state.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::task::JoinSet;

use super::Stop;
use super::worker::{ItemOutcome, Shared};
use crate::error::{Error, Result};
use crate::journal::JournalState;
use crate::plan::Work;
use crate::progress::Progress;

/// Runs every pending item (at most `concurrency` at once) until all are done, the budget stops
/// new ones, or `interrupt` completes; the first fatal error stops the run once the items in
/// flight are done, and is returned. `journal` names the journal in errors.
pub(super) async fn dispatch(
    shared: &Arc<Shared>,
    pending: Vec<Work>,
    state: &mut JournalState,
    progress: &Progress,
    interrupt: impl std::future::Future<Output = ()>,
    journal: &Path,
) -> Result<Stop> {
    let concurrency = shared.settings.concurrency;
    let mut stop = Stop::Complete;
    let mut interrupt = std::pin::pin!(interrupt);
    let mut tasks: JoinSet<Result<Option<ItemOutcome>>> = JoinSet::new();
    let mut fatal: Option<Error> = None;
    let mut queue = pending.into_iter();
    loop {
        while tasks.len() < concurrency && stop == Stop::Complete && fatal.is_none() {
            let Some(work) = queue.next() else { break };
            let estimate = shared.estimate_cost(&work.messages);
            let admitted = shared.budget.lock().map(|mut budget| budget.try_reserve(estimate)).unwrap_or(false);
            if !admitted {
                stop = Stop::Budget;
                progress.println(&format!(
                    "budget reached: --max-cost {:.4} would be crossed; not starting more items",
                    shared.settings.max_cost.unwrap_or_default()
                ));
                break;
            }
            let shared = Arc::clone(shared);
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
                record_outcome(state, outcome);
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
                    path: journal.to_path_buf(),
                    message: format!("a worker stopped unexpectedly: {join_error}"),
                });
            }
        }
    }
    progress.finish();
    match fatal {
        Some(error) => Err(error),
        None => Ok(stop),
    }
}

/// Marks an item done (with its cost) or failed in the journal state the outputs are written
/// from.
fn record_outcome(state: &mut JournalState, outcome: ItemOutcome) {
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
}
