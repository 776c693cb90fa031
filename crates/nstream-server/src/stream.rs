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

use crate::error::ApiError;
use crate::metrics::{Metrics, TokenKind};

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
}

struct StreamState<T> {
    chunks: BoxStream<'static, Result<T, BackendError>>,
    client_wants_usage: bool,
    labels: StreamMetrics,
    phase: Phase,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Streaming,
    SendDone,
    Finished,
}

/// Turns a backend stream into an SSE response.
///
/// The first chunk is awaited before answering, so an error the backend reports at once (queue
/// full, not ready) still gets its proper status and JSON body instead of a 200 stream that
/// fails. Later errors are sent as a `data: {"error": ...}` event followed by `[DONE]`, as an
/// HTTP status can no longer change.
pub(crate) async fn sse_response<T: StreamedChunk>(
    mut chunks: BoxStream<'static, Result<T, BackendError>>,
    client_wants_usage: bool,
    labels: StreamMetrics,
) -> Result<Response, ApiError> {
    let first = match chunks.next().await {
        Some(Err(error)) => return Err(ApiError::from(error)),
        other => other,
    };
    let chunks = futures_util::stream::iter(first).chain(chunks).boxed();
    let state = StreamState { chunks, client_wants_usage, labels, phase: Phase::Streaming };
    let events = futures_util::stream::unfold(state, |mut state| async move {
        let event = next_event(&mut state).await?;
        Some((Ok::<Event, Infallible>(event), state))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

async fn next_event<T: StreamedChunk>(state: &mut StreamState<T>) -> Option<Event> {
    loop {
        match state.phase {
            Phase::Finished => return None,
            Phase::SendDone => {
                state.phase = Phase::Finished;
                let StreamMetrics { metrics, route, model, started } = &state.labels;
                metrics.record_stream(route, model, started.elapsed());
                return Some(Event::default().data("[DONE]"));
            }
            Phase::Streaming => {}
        }
        match state.chunks.next().await {
            None => state.phase = Phase::SendDone,
            Some(Ok(mut chunk)) => {
                if let Some(usage) = chunk.take_usage() {
                    let StreamMetrics { metrics, model, .. } = &state.labels;
                    metrics.record_tokens(model, TokenKind::Prompt, usage.prompt_tokens);
                    metrics.record_tokens(model, TokenKind::Completion, usage.completion_tokens);
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
                        state.phase = Phase::SendDone;
                        error_event(&ApiError::internal(format!("serialising a stream chunk failed: {error}")))
                    }
                });
            }
            Some(Err(error)) => {
                state.phase = Phase::SendDone;
                return Some(error_event(&ApiError::from(error)));
            }
        }
    }
}

fn error_event(error: &ApiError) -> Event {
    error.log();
    let body = serde_json::json!({ "error": error.fields() });
    Event::default().data(body.to_string())
}
