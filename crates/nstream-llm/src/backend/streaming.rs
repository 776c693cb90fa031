//! Streaming: scheduler events turned into a stream of OpenAI chunks.

use std::collections::VecDeque;

use futures_util::StreamExt;
use nstream_backend::{BackendError, Usage};

use super::admission::{Submitted, usage};
use crate::scheduler::SequenceEvent;

/// The stream state shared by chat and completion streams: events in, chunks out.
struct StreamState<T> {
    submitted: Submitted,
    pending: VecDeque<nstream_backend::Result<T>>,
    remaining: usize,
    completion_tokens: usize,
    done: bool,
}

/// Turns scheduler events into a stream of chunks; `to_chunk` maps one event to chunks, and
/// `usage_chunk` builds the final usage chunk when asked for.
pub(super) fn event_stream<T: Send + 'static>(
    submitted: Submitted,
    first: Vec<T>,
    to_chunk: impl Fn(&SequenceEvent) -> Vec<T> + Send + 'static,
    usage_chunk: Option<Box<dyn Fn(Usage) -> T + Send>>,
) -> futures_core::stream::BoxStream<'static, nstream_backend::Result<T>> {
    let remaining = submitted.sequences;
    let state = StreamState {
        submitted,
        pending: first.into_iter().map(Ok).collect(),
        remaining,
        completion_tokens: 0,
        done: false,
    };
    futures_util::stream::unfold((state, to_chunk, usage_chunk), |(mut state, to_chunk, usage_chunk)| async move {
        loop {
            if let Some(item) = state.pending.pop_front() {
                return Some((item, (state, to_chunk, usage_chunk)));
            }
            if state.done {
                return None;
            }
            if state.remaining == 0 {
                state.done = true;
                if let Some(build) = &usage_chunk {
                    let usage = usage(state.submitted.prompt_tokens, state.completion_tokens);
                    state.pending.push_back(Ok(build(usage)));
                }
                continue;
            }
            match state.submitted.events.recv().await {
                Some(event) => {
                    match &event {
                        SequenceEvent::Finished { completion_tokens, .. } => {
                            state.remaining -= 1;
                            state.completion_tokens += completion_tokens;
                        }
                        SequenceEvent::Failed { message, .. } => {
                            state.done = true;
                            state.pending.push_back(Err(BackendError::Internal(message.clone())));
                            continue;
                        }
                        SequenceEvent::Text { .. } | SequenceEvent::PromptLogprobs { .. } => {}
                    }
                    state.pending.extend(to_chunk(&event).into_iter().map(Ok));
                }
                None => {
                    state.done = true;
                    state.pending.push_back(Err(BackendError::NotReady));
                }
            }
        }
    })
    .boxed()
}
