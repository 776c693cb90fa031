//! The OpenAI-shaped [`ModelBackend`] on top of admission and streaming, and how this crate's
//! errors become the server's.

use std::sync::atomic::Ordering;

use async_trait::async_trait;
use nstream_backend::chat::{AssistantMessage, ChatChoice, ChatChunkChoice, ChatDelta, FinishReason, Role};
use nstream_backend::completion::CompletionChoice;
use nstream_backend::{
    BackendError, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStream,
    CompletionRequest, CompletionResponse, CompletionStream, Health, ModelBackend, ModelDescription, Usage,
    unix_timestamp,
};

use super::LlmBackend;
use super::streaming::event_stream;
use super::structured::{self, ToolStream};
use crate::error::Error;
use crate::scheduler::SequenceEvent;

/// Completions name the `prompt`, not the chat `messages`, as the field at fault.
fn for_prompt(error: Error) -> BackendError {
    match BackendError::from(error) {
        BackendError::ContextLengthExceeded { max_tokens, requested_tokens, .. } => {
            BackendError::ContextLengthExceeded { max_tokens, requested_tokens, param: Some("prompt".into()) }
        }
        other => other,
    }
}

impl From<Error> for BackendError {
    fn from(error: Error) -> Self {
        let clamp = |value: usize| u32::try_from(value).unwrap_or(u32::MAX);
        match error {
            Error::InvalidRequest { message, param } => BackendError::InvalidRequest { message, param },
            Error::ContextLengthExceeded { max_tokens, requested_tokens, .. } => BackendError::ContextLengthExceeded {
                max_tokens: clamp(max_tokens),
                requested_tokens: clamp(requested_tokens),
                param: Some("messages".into()),
            },
            Error::Template(message) => {
                BackendError::invalid_param("messages", format!("the chat template rejected the messages: {message}"))
            }
            Error::Overloaded { retry_after } => BackendError::Overloaded { retry_after },
            Error::SchedulerStopped => BackendError::NotReady,
            other => BackendError::Internal(other.to_string()),
        }
    }
}

#[async_trait]
impl ModelBackend for LlmBackend {
    fn describe(&self) -> ModelDescription {
        let description = ModelDescription::chat(&self.name)
            .with_context_length(u32::try_from(self.info.context_length).unwrap_or(u32::MAX))
            .with_created(self.created);
        let description = match &self.root {
            Some(root) => description.with_root(root),
            None => description,
        };
        match &self.parent {
            Some(parent) => description.with_parent(parent),
            None => description,
        }
    }

    fn load_adapter(&self, name: &str, path: &str) -> nstream_backend::Result<std::sync::Arc<dyn ModelBackend>> {
        // Whatever is wrong with the adapter (missing file, another base, another rank) is the
        // client's `lora_path`, not a server fault.
        let backend: std::sync::Arc<dyn ModelBackend> =
            self.serve_adapter(name, path).map_err(|error| match error {
                Error::InvalidRequest { message, param } => BackendError::InvalidRequest { message, param },
                other => BackendError::invalid_param("lora_path", other.to_string()),
            })?;
        Ok(backend)
    }

    fn adapter_sequences(&self) -> Option<usize> {
        // Only an adapter served over a parent can be unloaded; a BaseModel whose hfModelId is an
        // adapter is a model of its own.
        self.parent.as_ref().map(|_| LlmBackend::adapter_sequences(self))
    }

    fn waiting_requests(&self) -> Option<u64> {
        // An adapter shares its parent's scheduler (and counters): the parent reports them.
        if self.parent.is_some() {
            return None;
        }
        let metrics = self.metrics();
        // Jobs not yet taken off the admission channel, plus sequences admitted but waiting for
        // room in the running batch.
        Some(
            metrics.queue_depth.load(std::sync::atomic::Ordering::Relaxed)
                + metrics.waiting_sequences.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    async fn health(&self) -> Health {
        if self.is_running() {
            Health::Ready
        } else {
            Health::Unhealthy { reason: "the generation scheduler thread has stopped".into() }
        }
    }

    async fn chat(&self, request: ChatCompletionRequest) -> nstream_backend::Result<ChatCompletionResponse> {
        let generation = self.chat_generation(&request).await?;
        let tools = generation.tools.clone();
        let bytes = generation.logprobs.map(|_| self.vocabulary_bytes());
        let (choices, usage) = Self::collect(self.submit(generation)?).await?;
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(index, choice)| {
                let (content, calls) = match &tools {
                    Some(plan) => plan.parse(&choice.text),
                    None => (Some(choice.text), Vec::new()),
                };
                let finish_reason = match choice.finish_reason {
                    Some(FinishReason::Stop) if !calls.is_empty() => Some(FinishReason::ToolCalls),
                    other => other,
                };
                ChatChoice {
                    index: index as u32,
                    message: AssistantMessage {
                        role: Role::Assistant,
                        content,
                        tool_calls: (!calls.is_empty()).then_some(calls),
                        refusal: None,
                    },
                    logprobs: bytes.as_ref().map(|bytes| structured::chat_logprobs(bytes, &choice.logprobs)),
                    finish_reason,
                }
            })
            .collect();
        Ok(ChatCompletionResponse::new(format!("chatcmpl-{}", response_id()), &self.name, choices, Some(usage)))
    }

    async fn chat_stream(&self, request: ChatCompletionRequest) -> nstream_backend::Result<ChatCompletionStream> {
        let generation = self.chat_generation(&request).await?;
        let tools = generation.tools.clone();
        let bytes = generation.logprobs.map(|_| self.vocabulary_bytes());
        let submitted = self.submit(generation)?;
        let tool_streams: std::sync::Mutex<Vec<ToolStream>> =
            std::sync::Mutex::new((0..submitted.sequences).map(|_| ToolStream::default()).collect());
        let id = format!("chatcmpl-{}", response_id());
        let created = unix_timestamp();
        let model = self.name.clone();
        let chunk = {
            let (id, model) = (id.clone(), model.clone());
            move |choices: Vec<ChatChunkChoice>| ChatCompletionChunk::new(id.clone(), created, model.clone(), choices)
        };
        let choice = |index: u32, delta: ChatDelta, finish_reason: Option<FinishReason>| ChatChunkChoice {
            index,
            delta,
            logprobs: None,
            finish_reason,
        };
        // The first chunk of each choice carries the role, as OpenAI's do.
        let first = (0..submitted.sequences as u32)
            .map(|index| {
                let delta =
                    ChatDelta { role: Some(Role::Assistant), content: Some(String::new()), ..ChatDelta::default() };
                chunk(vec![choice(index, delta, None)])
            })
            .collect();
        let to_chunk = {
            let chunk = chunk.clone();
            // Text (and calls parsed out of it when there are tools) of one event as chunks.
            let pieces = move |index: u32, text: &str, last: bool| -> (String, Vec<serde_json::Value>) {
                let Some(plan) = &tools else {
                    return (text.to_owned(), Vec::new());
                };
                let mut streams = tool_streams.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let Some(stream) = streams.get_mut(index as usize) else {
                    return (text.to_owned(), Vec::new());
                };
                let first = stream.calls;
                let output = stream.push(plan, text, last);
                let calls = output
                    .calls
                    .into_iter()
                    .enumerate()
                    .map(|(offset, call)| {
                        serde_json::json!({
                            "index": first + offset,
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.function.name, "arguments": call.function.arguments},
                        })
                    })
                    .collect();
                (output.text, calls)
            };
            let made_calls = std::sync::Mutex::new(vec![false; submitted.sequences]);
            move |event: &SequenceEvent| match event {
                SequenceEvent::Text { index, text, logprobs } => {
                    let (text, calls) = pieces(*index, text, false);
                    let logprobs = bytes
                        .as_ref()
                        .filter(|_| !logprobs.is_empty())
                        .map(|bytes| structured::chat_logprobs(bytes, logprobs));
                    let mut chunks = Vec::new();
                    if !text.is_empty() || logprobs.is_some() {
                        let delta = ChatDelta { content: Some(text), ..ChatDelta::default() };
                        chunks.push(chunk(vec![ChatChunkChoice { logprobs, ..choice(*index, delta, None) }]));
                    }
                    if !calls.is_empty() {
                        if let Some(flag) = made_calls
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .get_mut(*index as usize)
                        {
                            *flag = true;
                        }
                        let delta = ChatDelta { tool_calls: Some(calls), ..ChatDelta::default() };
                        chunks.push(chunk(vec![choice(*index, delta, None)]));
                    }
                    chunks
                }
                SequenceEvent::Finished { index, reason, .. } => {
                    let (text, calls) = pieces(*index, "", true);
                    let mut chunks = Vec::new();
                    if !text.is_empty() {
                        let delta = ChatDelta { content: Some(text), ..ChatDelta::default() };
                        chunks.push(chunk(vec![choice(*index, delta, None)]));
                    }
                    let mut called = made_calls
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .get(*index as usize)
                        .copied()
                        .unwrap_or(false);
                    if !calls.is_empty() {
                        called = true;
                        let delta = ChatDelta { tool_calls: Some(calls), ..ChatDelta::default() };
                        chunks.push(chunk(vec![choice(*index, delta, None)]));
                    }
                    let reason =
                        if called && *reason == FinishReason::Stop { FinishReason::ToolCalls } else { *reason };
                    chunks.push(chunk(vec![choice(*index, ChatDelta::default(), Some(reason))]));
                    chunks
                }
                SequenceEvent::PromptLogprobs { .. } | SequenceEvent::Failed { .. } => Vec::new(),
            }
        };
        let usage_chunk: Option<Box<dyn Fn(Usage) -> ChatCompletionChunk + Send>> = request
            .include_usage()
            .then(|| Box::new(move |usage| ChatCompletionChunk { usage: Some(usage), ..chunk(Vec::new()) }) as Box<_>);
        Ok(event_stream(submitted, first, to_chunk, usage_chunk))
    }

    async fn complete(&self, request: CompletionRequest) -> nstream_backend::Result<CompletionResponse> {
        let (generation, texts) = self.completion_generation(&request).await?;
        let choices_per_prompt = generation.choices as usize;
        let bytes = generation.logprobs.map(|_| self.vocabulary_bytes());
        let prompts = if generation.prompt_logprobs.is_some() { generation.prompts.clone() } else { Vec::new() };
        let (choices, usage) = Self::collect(self.submit(generation).map_err(for_prompt)?).await?;
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(index, choice)| {
                let prefix = if request.echo { texts[index / choices_per_prompt].as_str() } else { "" };
                CompletionChoice {
                    index: index as u32,
                    text: format!("{prefix}{}", choice.text),
                    logprobs: bytes.as_ref().map(|bytes| match prompts.get(index / choices_per_prompt) {
                        Some(prompt) => structured::echo_logprobs(
                            bytes,
                            prompt,
                            &choice.prompt_logprobs,
                            &choice.logprobs,
                            prefix.len(),
                        ),
                        None => structured::completion_logprobs(bytes, &choice.logprobs, prefix.len()),
                    }),
                    finish_reason: choice.finish_reason,
                }
            })
            .collect();
        Ok(CompletionResponse::new(
            format!("cmpl-{}", response_id()),
            unix_timestamp(),
            &self.name,
            choices,
            Some(usage),
        ))
    }

    async fn complete_stream(&self, request: CompletionRequest) -> nstream_backend::Result<CompletionStream> {
        let (generation, texts) = self.completion_generation(&request).await?;
        let choices_per_prompt = generation.choices as usize;
        let bytes = generation.logprobs.map(|_| self.vocabulary_bytes());
        let prompts = if generation.prompt_logprobs.is_some() { generation.prompts.clone() } else { Vec::new() };
        let submitted = self.submit(generation).map_err(for_prompt)?;
        // Each choice's text so far: the generated tokens' offsets follow the echoed prompt.
        let offsets = std::sync::Mutex::new(
            (0..submitted.sequences)
                .map(|index| if request.echo { texts[index / choices_per_prompt].len() } else { 0 })
                .collect::<Vec<usize>>(),
        );
        let id = format!("cmpl-{}", response_id());
        let created = unix_timestamp();
        let model = self.name.clone();
        let chunk = move |index: u32, text: String, finish_reason: Option<FinishReason>| {
            let choice = CompletionChoice { index, text, logprobs: None, finish_reason };
            CompletionResponse::new(id.clone(), created, model.clone(), vec![choice], None)
        };
        // With prompt log probabilities the echo waits for them (one chunk with both).
        let first = if request.echo && prompts.is_empty() {
            (0..submitted.sequences)
                .map(|index| chunk(index as u32, texts[index / choices_per_prompt].clone(), None))
                .collect()
        } else {
            Vec::new()
        };
        let to_chunk = {
            let chunk = chunk.clone();
            move |event: &SequenceEvent| match event {
                SequenceEvent::Text { index, text, logprobs } => {
                    let mut response = chunk(*index, text.clone(), None);
                    if let Some(bytes) = &bytes {
                        let mut offsets = offsets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        let offset = offsets.get(*index as usize).copied().unwrap_or(0);
                        if let Some(choice) = response.choices.first_mut() {
                            choice.logprobs = Some(structured::completion_logprobs(bytes, logprobs, offset));
                        }
                        if let Some(slot) = offsets.get_mut(*index as usize) {
                            *slot += text.len();
                        }
                    }
                    vec![response]
                }
                SequenceEvent::PromptLogprobs { index, logprobs } => {
                    let prompt_index = *index as usize / choices_per_prompt;
                    let mut response = chunk(*index, texts[prompt_index].clone(), None);
                    if let (Some(bytes), Some(prompt), Some(choice)) =
                        (&bytes, prompts.get(prompt_index), response.choices.first_mut())
                    {
                        choice.logprobs = Some(structured::echo_logprobs(bytes, prompt, logprobs, &[], 0));
                    }
                    vec![response]
                }
                SequenceEvent::Finished { index, reason, .. } => vec![chunk(*index, String::new(), Some(*reason))],
                SequenceEvent::Failed { .. } => Vec::new(),
            }
        };
        let usage_chunk: Option<Box<dyn Fn(Usage) -> CompletionResponse + Send>> = request.include_usage().then(|| {
            Box::new(move |usage| {
                let mut last = chunk(0, String::new(), None);
                last.choices.clear();
                last.usage = Some(usage);
                last
            }) as Box<_>
        });
        Ok(event_stream(submitted, first, to_chunk, usage_chunk))
    }
}

/// A unique-enough response id: time and a process-wide counter, in hex.
fn response_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    format!("{nanos:x}{count:04x}")
}
