//! Overload control on `/v1/*`: the concurrency limit (429 before any work), the body-read and
//! request timeouts, and answering what is still running when the shutdown timeout passes.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use hyper::body::{Frame, SizeHint};
use tokio::sync::OwnedSemaphorePermit;

use crate::error::ApiError;
use crate::metrics::{InFlight, ShedReason};
use crate::shutdown::until_aborted;
use crate::state::AppState;

/// Admits a `/v1/*` request under [`crate::ServerConfig::max_concurrent_requests`] and bounds
/// its time. Runs before the body is read, so a refused request costs no parsing.
pub(crate) async fn limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    // Counted from admission to the end of the answer's body (a stream's last event).
    let in_flight = state.metrics().start_request();
    let permit = match state.admission() {
        None => None,
        Some(permits) => match Arc::clone(permits).try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                state.metrics().record_shed(ShedReason::ConcurrencyLimit);
                return ApiError::server_overloaded(state.config().max_concurrent_requests).into_response();
            }
        },
    };
    let config = state.config();
    let body_timed_out = Arc::new(AtomicBool::new(false));
    let request = match config.body_read_timeout {
        Some(limit) => with_body_deadline(request, limit, Arc::clone(&body_timed_out)),
        None => request,
    };
    let mut phase = state.lifecycle().subscribe();
    let response = tokio::select! {
        response = next.run(request) => response,
        () = sleep_or_never(config.request_timeout) => {
            state.metrics().record_shed(ShedReason::RequestTimeout);
            ApiError::request_timeout(config.request_timeout.unwrap_or_default()).into_response()
        }
        () = until_aborted(&mut phase) => {
            state.metrics().record_shed(ShedReason::Shutdown);
            ApiError::server_shutting_down().into_response()
        }
    };
    let response = if body_timed_out.load(Ordering::Relaxed) {
        // The handler saw a broken body; say what broke it.
        state.metrics().record_shed(ShedReason::BodyReadTimeout);
        ApiError::body_read_timeout(config.body_read_timeout.unwrap_or_default()).into_response()
    } else {
        response
    };
    // A stream holds its permit (and stays in flight) until its last event is sent (or the
    // client leaves).
    response.map(|body| Body::new(HoldingPermit { inner: body, _permit: permit, _in_flight: in_flight }))
}

/// A response body that holds a concurrency permit and the in-flight count until it is dropped
/// and is otherwise the inner body, size hint included: a JSON answer keeps its
/// `Content-Length` instead of becoming chunked (which `map_frame` would do, having no size
/// hint).
struct HoldingPermit {
    inner: Body,
    _permit: Option<OwnedSemaphorePermit>,
    _in_flight: InFlight,
}

impl HttpBody for HoldingPermit {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(context)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn sleep_or_never(limit: Option<Duration>) {
    match limit {
        Some(limit) => tokio::time::sleep(limit).await,
        None => std::future::pending().await,
    }
}

/// Fails the body's read once `limit` has passed since now, and notes it in `timed_out`.
fn with_body_deadline(request: Request, limit: Duration, timed_out: Arc<AtomicBool>) -> Request {
    let deadline = tokio::time::Instant::now() + limit;
    request.map(|body| {
        let chunks = body.into_data_stream();
        let timed = futures_util::stream::unfold(Some(chunks), move |chunks| {
            let timed_out = Arc::clone(&timed_out);
            async move {
                let mut chunks = chunks?;
                match tokio::time::timeout_at(deadline, chunks.next()).await {
                    Ok(Some(chunk)) => Some((chunk, Some(chunks))),
                    Ok(None) => None,
                    Err(_) => {
                        timed_out.store(true, Ordering::Relaxed);
                        Some((Err(axum::Error::new("the request body was not received in time")), None))
                    }
                }
            }
        });
        Body::from_stream(timed)
    })
}
