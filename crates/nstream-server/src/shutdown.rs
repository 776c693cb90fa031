//! Serving connections ourselves (hyper's header-read timeout, which `axum::serve` does not
//! expose) and the shutdown sequence: `/ready` fails, the drain delay, in-flight requests finish
//! within the shutdown timeout, then what is still running is ended with an error.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt as _;

use crate::state::ServerError;

/// How long requests may take to end once told to (the error events are already queued), before
/// their connections are closed regardless.
const ABORT_GRACE: Duration = Duration::from_secs(2);

/// Where the server is in its shutdown, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    /// Normal operation.
    Serving,
    /// The shutdown signal came: `/ready` answers 503, requests are still served.
    Draining,
    /// The shutdown timeout passed: streams end with an error event, other requests get a 503.
    Aborting,
}

/// The shared [`Phase`]; cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Lifecycle {
    phase: Arc<watch::Sender<Phase>>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self { phase: Arc::new(watch::channel(Phase::Serving).0) }
    }
}

impl Lifecycle {
    /// Whether the shutdown began (then `/ready` fails).
    pub(crate) fn is_draining(&self) -> bool {
        *self.phase.borrow() >= Phase::Draining
    }

    /// Moves on to `phase`; never back.
    pub(crate) fn enter(&self, phase: Phase) {
        self.phase.send_if_modified(|current| {
            let later = *current < phase;
            if later {
                *current = phase;
            }
            later
        });
    }

    /// A receiver for [`until_aborted`].
    pub(crate) fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }
}

/// Completes once the phase is [`Phase::Aborting`]; never, if the lifecycle is gone.
pub(crate) async fn until_aborted(phase: &mut watch::Receiver<Phase>) {
    if phase.wait_for(|phase| *phase == Phase::Aborting).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// How the server was asked to stop; what the shutdown future given to [`crate::serve_with`]
/// returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Fail `/ready`, keep serving for [`crate::ServerConfig::drain_delay`], then stop accepting
    /// and let in-flight requests finish: what SIGTERM (Kubernetes) asks.
    Drain,
    /// As [`Shutdown::Drain`] without the drain delay: an interactive Ctrl-C, where no load
    /// balancer routes by readiness.
    Now,
}

/// The connection and shutdown settings of one server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionSettings {
    pub(crate) header_read_timeout: Option<Duration>,
    pub(crate) drain_delay: Duration,
    pub(crate) shutdown_timeout: Option<Duration>,
}

/// Accepts connections on `listener` until `shutdown` completes, then runs the shutdown sequence.
pub(crate) async fn run(
    listener: TcpListener,
    app: Router,
    lifecycle: Lifecycle,
    settings: ConnectionSettings,
    shutdown: impl Future<Output = Shutdown> + Send + 'static,
) -> Result<(), ServerError> {
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    let how = loop {
        tokio::select! {
            how = &mut shutdown => break how,
            accepted = listener.accept() => accept(accepted, &mut connections, &app, &settings, &stopping).await,
        }
    };
    lifecycle.enter(Phase::Draining);
    if how == Shutdown::Drain && !settings.drain_delay.is_zero() {
        tracing::info!(seconds = settings.drain_delay.as_secs_f64(), "draining: /ready fails, still serving");
        let mut delay = pin!(tokio::time::sleep(settings.drain_delay));
        loop {
            tokio::select! {
                () = &mut delay => break,
                accepted = listener.accept() => accept(accepted, &mut connections, &app, &settings, &stopping).await,
            }
        }
    }
    drop(listener);
    stop.send_replace(true);
    tracing::info!(connections = connections.len(), "stopped accepting; waiting for requests in flight");
    let all_closed = async { while connections.join_next().await.is_some() {} };
    let finished = match settings.shutdown_timeout {
        Some(timeout) => tokio::time::timeout(timeout, all_closed).await.is_ok(),
        None => {
            all_closed.await;
            true
        }
    };
    if !finished {
        tracing::warn!(
            connections = connections.len(),
            "shutdown timeout passed: ending the requests still in flight with an error"
        );
        lifecycle.enter(Phase::Aborting);
        let all_closed = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(ABORT_GRACE, all_closed).await.is_err() {
            tracing::warn!(connections = connections.len(), "closing connections that did not end");
            connections.shutdown().await;
        }
    }
    Ok(())
}

/// Serves one accepted connection in `connections`; an accept error (out of file descriptors)
/// is logged and waited out briefly rather than ending the server.
async fn accept(
    accepted: std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)>,
    connections: &mut JoinSet<()>,
    app: &Router,
    settings: &ConnectionSettings,
    stopping: &watch::Receiver<bool>,
) {
    // Reap finished connections so the set holds only live ones.
    while connections.try_join_next().is_some() {}
    let stream = match accepted {
        Ok((stream, _peer)) => stream,
        Err(error) => {
            tracing::warn!(%error, "accepting a connection failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            return;
        }
    };
    // Streamed tokens are small writes: send them at once.
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
    let service =
        TowerToHyperService::new(app.clone().map_request(|request: Request<Incoming>| request.map(Body::new)));
    let header_read_timeout = settings.header_read_timeout;
    let mut stopping = stopping.clone();
    connections.spawn(async move {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
        let mut connection = pin!(builder.serve_connection(TokioIo::new(stream), service));
        let mut asked_to_stop = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                    break;
                }
                () = async { let _ = stopping.wait_for(|stop| *stop).await; }, if !asked_to_stop => {
                    // Finishes the request in flight, then closes; idle connections close now.
                    asked_to_stop = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    });
}

/// Completes on SIGTERM (what Kubernetes sends: [`Shutdown::Drain`]) or SIGINT (Ctrl-C:
/// [`Shutdown::Now`]). If a handler cannot be installed, that signal is logged and ignored.
pub async fn termination_signal() -> Shutdown {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {
            tracing::info!("received Ctrl-C, shutting down");
            Shutdown::Now
        }
        () = terminate => {
            tracing::info!("received SIGTERM, draining then shutting down");
            Shutdown::Drain
        }
    }
}
