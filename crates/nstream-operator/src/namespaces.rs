//! The per-namespace fan-out that every controller of the operator shares: one controller over
//! the whole cluster, or one per watched namespace, all stopped by the same shutdown.

use std::future::Future;

use futures_util::FutureExt;
use futures_util::future::Shared;

/// Runs `run_in(None, shutdown)` (one controller over the whole cluster) when `namespaces` is
/// empty, else `run_in(Some(namespace), shutdown)` for each namespace, concurrently; returns when
/// every one has stopped. All of them are given the same `shutdown`, shared.
pub(crate) async fn per_namespace<'names, Shutdown, RunIn, Running>(
    namespaces: &'names [String],
    shutdown: Shutdown,
    run_in: RunIn,
) where
    Shutdown: Future<Output = ()> + Send + Sync + 'static,
    RunIn: Fn(Option<&'names str>, Shared<Shutdown>) -> Running,
    Running: Future<Output = ()>,
{
    let shutdown = shutdown.shared();
    if namespaces.is_empty() {
        run_in(None, shutdown).await;
        return;
    }
    futures_util::future::join_all(
        namespaces.iter().map(|namespace| run_in(Some(namespace.as_str()), shutdown.clone())),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::per_namespace;

    /// Records which scopes ran, and checks that every one stops at the shared shutdown.
    async fn scopes(namespaces: &[String]) -> Vec<Option<String>> {
        let started = Mutex::new(Vec::new());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let run = per_namespace(namespaces, shutdown, |namespace, shutdown| {
            started.lock().unwrap().push(namespace.map(str::to_string));
            shutdown
        });
        let stopper = async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            stop.send(()).unwrap();
        };
        tokio::time::timeout(Duration::from_secs(10), futures_util::future::join(run, stopper))
            .await
            .expect("every controller stops at the shared shutdown");
        started.into_inner().unwrap()
    }

    #[tokio::test]
    async fn one_controller_for_the_cluster_or_one_per_namespace() {
        assert_eq!(scopes(&[]).await, [None]);
        let namespaces = ["a".to_string(), "b".to_string()];
        assert_eq!(scopes(&namespaces).await, [Some("a".to_string()), Some("b".to_string())]);
    }
}
