//! Stopping `nstream distill` cleanly on Ctrl-C or SIGTERM (what Kubernetes sends a Job's pod
//! before killing it): the first signal stops the stage in progress at a safe point (generate and
//! eval let the teacher requests in flight finish and journal them; finetune saves a checkpoint
//! after its current step) and no later stage starts; the run then writes its termination message
//! and exits with 128 + the signal's number (130, 143). A second signal exits at once, after
//! writing the termination message (the journals and checkpoints are consistent at every moment,
//! so nothing acknowledged is lost either way).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use super::super::signals::{EXIT_INTERRUPTED, EXIT_TERMINATED, stop_signal};
use super::{RunSummary, write_termination_message};

/// The stop requested by a signal, shared by the watcher thread and the stages.
#[derive(Clone)]
pub(super) struct Stop {
    /// Set at the first signal; finetune polls it between steps.
    flag: Arc<AtomicBool>,
    /// The exit code of the signal that stopped the run (0 until one did).
    code: Arc<AtomicU8>,
    /// Turns `true` at the first signal; generate and eval wait on it.
    stopped: tokio::sync::watch::Receiver<bool>,
}

impl Stop {
    /// Watches for Ctrl-C and SIGTERM on a thread of its own (the stages run their own tokio
    /// runtimes). `termination_message` is written at a second signal, before exiting at once.
    pub(super) fn watch(termination_message: Option<PathBuf>) -> Self {
        let (sender, stopped) = tokio::sync::watch::channel(false);
        let stop = Self { flag: Arc::new(AtomicBool::new(false)), code: Arc::new(AtomicU8::new(0)), stopped };
        let watcher = stop.clone();
        let spawned = std::thread::Builder::new().name("distill-signals".into()).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => {
                    tracing::warn!(%error, "cannot watch for Ctrl-C and SIGTERM; they stop the run at once");
                    return;
                }
            };
            runtime.block_on(async move {
                let code = stop_signal().await;
                watcher.code.store(code, Ordering::SeqCst);
                watcher.flag.store(true, Ordering::SeqCst);
                // Receivers live as long as the run: sending fails only once it is over.
                let _ = sender.send(true);
                eprintln!(
                    "distill: {}: stopping at a safe point (again exits at once); running the same command again continues",
                    signal_name(code)
                );
                let again = stop_signal().await;
                eprintln!("distill: {} again: exiting now; running the same command again continues", signal_name(again));
                if let Some(path) = &termination_message {
                    let mut summary = RunSummary {
                        error: Some(format!("{} twice: stopped at once", signal_name(again))),
                        ..RunSummary::default()
                    };
                    write_termination_message(path, &mut summary);
                }
                std::process::exit(i32::from(again));
            });
        });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot watch for Ctrl-C and SIGTERM; they stop the run at once");
        }
        stop
    }

    /// The flag finetune polls.
    pub(super) fn flag(&self) -> &AtomicBool {
        &self.flag
    }

    /// The exit code of the signal that stopped the run (130 for Ctrl-C, 143 for SIGTERM), if one
    /// did.
    pub(super) fn exit_code(&self) -> Option<u8> {
        Some(self.code.load(Ordering::SeqCst)).filter(|code| *code != 0)
    }

    /// Completes at the first signal (never when the watcher could not start), for the
    /// interrupts of generate and eval.
    pub(super) fn interrupted(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stopped = self.stopped.clone();
        async move {
            if stopped.wait_for(|stopped| *stopped).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// An error when a signal asked the run to stop, before `stage` starts.
    pub(super) fn check(&self, stage: &str) -> anyhow::Result<()> {
        match self.exit_code() {
            Some(code) => {
                anyhow::bail!("{} before {stage}: stopped; running the same command again continues", signal_name(code))
            }
            None => Ok(()),
        }
    }
}

/// The signal an exit code stands for, in words.
pub(super) fn signal_name(code: u8) -> &'static str {
    match code {
        EXIT_INTERRUPTED => "interrupted (Ctrl-C)",
        EXIT_TERMINATED => "terminated (SIGTERM)",
        _ => "stopped by a signal",
    }
}
