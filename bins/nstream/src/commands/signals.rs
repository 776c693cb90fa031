//! The clean stop of the long-running commands (`generate`, `eval`): the first Ctrl-C or SIGTERM
//! (what Kubernetes, systemd and `kill` send) lets requests in flight finish and keeps what is
//! journalled; a second one exits at once (the journals are consistent at every moment, so
//! nothing is lost either way).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// Exit code after a Ctrl-C (SIGINT): 128 + 2, as shells report it.
pub(crate) const EXIT_INTERRUPTED: u8 = 130;
/// Exit code after a SIGTERM: 128 + 15.
pub(crate) const EXIT_TERMINATED: u8 = 143;

/// Waits for Ctrl-C or (on Unix) SIGTERM and returns the exit code that names it. A signal whose
/// handler cannot be installed is never reported (the default action stays).
pub(crate) async fn stop_signal() -> u8 {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => EXIT_INTERRUPTED,
        () = terminate => EXIT_TERMINATED,
    }
}

/// The interrupt of a run: completes at the first Ctrl-C or SIGTERM, storing its exit code in the
/// returned cell (130 until then), and from then on exits the process at the second one, saying
/// `resume` (how to continue).
pub(crate) fn first_stop(resume: &'static str) -> (Arc<AtomicU8>, impl Future<Output = ()> + Send + 'static) {
    let stopped_by = Arc::new(AtomicU8::new(EXIT_INTERRUPTED));
    let interrupt = {
        let stopped_by = Arc::clone(&stopped_by);
        async move {
            stopped_by.store(stop_signal().await, Ordering::Relaxed);
            tokio::spawn(async move {
                let code = stop_signal().await;
                eprintln!("interrupted again: exiting now; {resume}");
                std::process::exit(i32::from(code));
            });
        }
    };
    (stopped_by, interrupt)
}
