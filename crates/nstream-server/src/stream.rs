//! Server-sent events for streamed chat and completions: `data: {chunk}` ... `data: [DONE]`.

use std::convert::Infallible;
use std::time::Instant;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use nstream_backend::chat::ChatCompletionChunk;
use nstream_backend::completion::CompletionResponse;
use nstream_backend::{BackendError, Usage};
use serde::Serialize;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::metrics::{Metrics, ShedReason, TokenKind};
use crate::shutdown::{Phase, until_aborted};

/// A streamed chunk type whose usage the server reads and may strip.
pub(crate) trait StreamedChunk: Serialize + Send + 'static {
    /// Removes and returns the usage, if the chunk carries one.
    fn take_usage(&mut self) -> Option<Usage>;
    /// Puts the usage back.
    fn set_usage(&mut self, usage: Usage);
    /// Whether the chunk has any choice (the final usage chunk has none).
    fn has_choices(&self) -> bool;
}

/// Chat and completion chunks both hold `usage` and `choices`.
macro_rules! streamed_chunk {
    ($($chunk:ty),*) => {$(
        impl StreamedChunk for $chunk {
            fn take_usage(&mut self) -> Option<Usage> {
                self.usage.take()
            }
            fn set_usage(&mut self, usage: Usage) {
                self.usage = Some(usage);
            }
            fn has_choices(&self) -> bool {
                !self.choices.is_empty()
            }
        }
    )*};
}
streamed_chunk!(ChatCompletionChunk, CompletionResponse);

/// Where a stream's metrics go: the registry, the labels, and when the request began.
pub(crate) struct StreamMetrics {
    /// The server's metrics.
    pub(crate) metrics: Metrics,
    /// The route label (`/v1/chat/completions`, `/v1/completions`).
    pub(crate) route: &'static str,
    /// The model label.
    pub(crate) model: String,
    /// When the handler began, for the stream's duration.
    pub(crate) started: Instant,
    /// Who asked, to settle the key's token estimate with the stream's usage.
    pub(crate) caller: Caller,
}

/// What ends a stream early, with an error event: its total deadline and the server's shutdown.
pub(crate) struct StreamEnds {
    /// When the stream must end, and the limit it was computed from (for the message).
    pub(crate) deadline: Option<(tokio::time::Instant, std::time::Duration)>,
    /// The server's shutdown phase; [`Phase::Aborting`] ends the stream.
    pub(crate) shutdown: tokio::sync::watch::Receiver<Phase>,
}

struct StreamState<T> {
    chunks: BoxStream<'static, Result<T, BackendError>>,
    client_wants_usage: bool,
    labels: StreamMetrics,
    ends: StreamEnds,
    phase: StreamPhase,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StreamPhase {
    Streaming,
    SendDone,
    Finished,
}

/// Turns a backend stream into an SSE response.
///
/// The first chunk is awaited before answering, so an error the backend reports at once (queue
/// full, not ready) still gets its proper status and JSON body instead of a 200 stream that
/// fails. Later errors are sent as a `data: {"error": ...}` event followed by `[DONE]`, as an
/// HTTP status can no longer change. So is the end of a stream cut by `ends` (its deadline, the
/// server's shutdown timeout): OpenAI's clients raise on such an event rather than take the
/// truncated answer as whole.
pub(crate) async fn sse_response<T: StreamedChunk>(
    mut chunks: BoxStream<'static, Result<T, BackendError>>,
    client_wants_usage: bool,
    labels: StreamMetrics,
    ends: StreamEnds,
) -> Result<Response, ApiError> {
    let first = match chunks.next().await {
        Some(Err(error)) => return Err(ApiError::from(error)),
        other => other,
    };
    let chunks = futures_util::stream::iter(first).chain(chunks).boxed();
    let state = StreamState { chunks, client_wants_usage, labels, ends, phase: StreamPhase::Streaming };
    let events = futures_util::stream::unfold(state, |mut state| async move {
        let event = next_event(&mut state).await?;
        Some((Ok::<Event, Infallible>(event), state))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

async fn next_event<T: StreamedChunk>(state: &mut StreamState<T>) -> Option<Event> {
    loop {
        match state.phase {
            StreamPhase::Finished => return None,
            StreamPhase::SendDone => {
                state.phase = StreamPhase::Finished;
                let StreamMetrics { metrics, route, model, started, .. } = &state.labels;
                metrics.record_stream(route, model, started.elapsed());
                return Some(Event::default().data("[DONE]"));
            }
            StreamPhase::Streaming => {}
        }
        let deadline = state.ends.deadline;
        let next = tokio::select! {
            next = state.chunks.next() => next,
            () = sleep_until(deadline) => {
                state.phase = StreamPhase::SendDone;
                state.labels.metrics.record_shed(ShedReason::StreamDeadline);
                let limit = deadline.map(|(_, limit)| limit).unwrap_or_default();
                return Some(error_event(&ApiError::stream_deadline_exceeded(limit)));
            }
            () = until_aborted(&mut state.ends.shutdown) => {
                state.phase = StreamPhase::SendDone;
                state.labels.metrics.record_shed(ShedReason::Shutdown);
                return Some(error_event(&ApiError::server_shutting_down()));
            }
        };
        match next {
            None => state.phase = StreamPhase::SendDone,
            Some(Ok(mut chunk)) => {
                if let Some(usage) = chunk.take_usage() {
                    let StreamMetrics { metrics, model, caller, .. } = &state.labels;
                    metrics.record_tokens(model, TokenKind::Prompt, usage.prompt_tokens);
                    metrics.record_tokens(model, TokenKind::Completion, usage.completion_tokens);
                    caller.settle_tokens(usage.total_tokens);
                    if state.client_wants_usage {
                        chunk.set_usage(usage);
                    } else if !chunk.has_choices() {
                        // The usage-only chunk the server asked for on its own behalf.
                        continue;
                    }
                }
                return Some(match serde_json::to_string(&chunk) {
                    Ok(json) => Event::default().data(json),
                    Err(error) => {
                        state.phase = StreamPhase::SendDone;
                        error_event(&ApiError::internal(format!("serialising a stream chunk failed: {error}")))
                    }
                });
            }
            Some(Err(error)) => {
                state.phase = StreamPhase::SendDone;
                return Some(error_event(&ApiError::from(error)));
            }
        }
    }
}

async fn sleep_until(deadline: Option<(tokio::time::Instant, std::time::Duration)>) {
    match deadline {
        Some((instant, _)) => tokio::time::sleep_until(instant).await,
        None => std::future::pending().await,
    }
}

fn error_event(error: &ApiError) -> Event {
    error.log();
    let body = serde_json::json!({ "error": error.fields() });
    Event::default().data(body.to_string())
}
