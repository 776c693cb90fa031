//! `FakeBackend`: a deterministic in-process model for server tests and demos (feature `fake`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;

use crate::backend::{ChatCompletionStream, CompletionStream, ModelBackend};
use crate::chat::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatDelta, FinishReason, Role,
};
use crate::completion::{CompletionChoice, CompletionRequest, CompletionResponse};
use crate::embedding::{EmbeddingRequest, EmbeddingResponse, EmbeddingUsage};
use crate::input::InputItem;
use crate::model::{Capability, Health, ModelDescription};
use crate::usage::{Usage, unix_timestamp};
use crate::{BackendError, Result};

/// A model that answers instantly (or after a configured latency) with deterministic output.
///
/// - Embeddings: each whitespace-separated word (or token id) is hashed into a pseudo-random
///   vector; an input's embedding is the L2-normalised sum, so equal texts give equal vectors and
///   texts sharing words are similar.
/// - Chat and completions echo the last user message (or the prompt) word by word; streaming
///   yields one chunk per word. `max_tokens` cuts the echo and sets `finish_reason: "length"`.
/// - Token counts are word counts.
/// - Modes switchable at run time: [`FakeBackend::set_overloaded`] (queue full) and
///   [`FakeBackend::set_health`] (loading / unhealthy), plus call counters in
///   [`FakeBackend::stats`].
#[derive(Debug)]
pub struct FakeBackend {
    description: ModelDescription,
    latency: Duration,
    token_delay: Duration,
    mode: Mutex<Mode>,
    embed_calls: AtomicU64,
    embedded_inputs: AtomicU64,
    chat_calls: AtomicU64,
    completion_calls: AtomicU64,
}

#[derive(Debug, Clone)]
struct Mode {
    overloaded: Option<Duration>,
    health: Health,
}

/// How often each method of a [`FakeBackend`] was called (rejected calls included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FakeBackendStats {
    /// Calls to `embed`.
    pub embed_calls: u64,
    /// Inputs embedded successfully, summed over calls.
    pub embedded_inputs: u64,
    /// Calls to `chat` and `chat_stream`.
    pub chat_calls: u64,
    /// Calls to `complete` and `complete_stream`.
    pub completion_calls: u64,
}

impl FakeBackendStats {
    /// All calls together.
    pub fn total_calls(&self) -> u64 {
        self.embed_calls + self.chat_calls + self.completion_calls
    }
}

/// Context length of fake models unless set otherwise.
const DEFAULT_CONTEXT_LENGTH: u32 = 512;

impl FakeBackend {
    /// A fake backend serving the given description as is.
    pub fn new(description: ModelDescription) -> Self {
        Self {
            description,
            latency: Duration::ZERO,
            token_delay: Duration::ZERO,
            mode: Mutex::new(Mode { overloaded: None, health: Health::Ready }),
            embed_calls: AtomicU64::new(0),
            embedded_inputs: AtomicU64::new(0),
            chat_calls: AtomicU64::new(0),
            completion_calls: AtomicU64::new(0),
        }
    }

    /// A normalised embedding model of `dimension` floats with a 512-token context.
    pub fn embedding(id: impl Into<String>, dimension: u32) -> Self {
        Self::new(
            ModelDescription::embedding(id, dimension)
                .with_normalized_embeddings(true)
                .with_context_length(DEFAULT_CONTEXT_LENGTH),
        )
    }

    /// A chat model (chat and completions, streaming included) with a 512-token context.
    pub fn chat(id: impl Into<String>) -> Self {
        Self::new(ModelDescription::chat(id).with_context_length(DEFAULT_CONTEXT_LENGTH))
    }

    /// Waits this long before answering each call (and before a stream's first chunk).
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Waits this long between streamed chunks.
    pub fn with_token_delay(mut self, token_delay: Duration) -> Self {
        self.token_delay = token_delay;
        self
    }

    /// `Some(retry_after)`: every call fails with [`BackendError::Overloaded`], as a full queue
    /// would. `None`: back to normal.
    pub fn set_overloaded(&self, retry_after: Option<Duration>) {
        self.lock_mode().overloaded = retry_after;
    }

    /// What [`ModelBackend::health`] reports; calls fail with [`BackendError::NotReady`] unless
    /// it is [`Health::Ready`].
    pub fn set_health(&self, health: Health) {
        self.lock_mode().health = health;
    }

    /// Call counters so far.
    pub fn stats(&self) -> FakeBackendStats {
        FakeBackendStats {
            embed_calls: self.embed_calls.load(Ordering::Relaxed),
            embedded_inputs: self.embedded_inputs.load(Ordering::Relaxed),
            chat_calls: self.chat_calls.load(Ordering::Relaxed),
            completion_calls: self.completion_calls.load(Ordering::Relaxed),
        }
    }

    fn lock_mode(&self) -> std::sync::MutexGuard<'_, Mode> {
        // The mode is plain data; a panic elsewhere cannot leave it inconsistent.
        self.mode.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies the configured modes and latency, as a real backend's admission would.
    async fn admit(&self, capability: Capability) -> Result<()> {
        if !self.description.supports(capability) {
            return Err(BackendError::Unsupported { capability });
        }
        let mode = self.lock_mode().clone();
        if let Some(retry_after) = mode.overloaded {
            return Err(BackendError::Overloaded { retry_after });
        }
        if !mode.health.is_ready() {
            return Err(BackendError::NotReady);
        }
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        Ok(())
    }

    fn context_length(&self) -> u32 {
        self.description.context_length.unwrap_or(DEFAULT_CONTEXT_LENGTH)
    }
}

/// FNV-1a: stable across runs and platforms, unlike `DefaultHasher`.
fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}

/// Adds a pseudo-random vector seeded by `seed` (xorshift64*) to `vector`.
fn add_hashed_direction(vector: &mut [f32], seed: u64) {
    let mut state = seed | 1;
    for value in vector.iter_mut() {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let random = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        // Top 24 bits as a uniform value in [-1, 1).
        *value += (random >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
    }
}

fn item_tokens(item: InputItem<'_>) -> Vec<u64> {
    match item {
        InputItem::Text(text) => text.split_whitespace().map(|word| stable_hash(word.as_bytes())).collect(),
        InputItem::Tokens(tokens) => tokens.iter().map(|token| stable_hash(&token.to_le_bytes())).collect(),
    }
}

fn count_u32(count: usize) -> u32 {
    u32::try_from(count).unwrap_or(u32::MAX)
}

/// The words of a text, each but the first carrying its leading space, so that concatenating
/// streamed deltas reproduces the text.
fn words_with_spacing(text: &str) -> Vec<String> {
    text.split_whitespace()
        .enumerate()
        .map(|(index, word)| if index == 0 { word.to_owned() } else { format!(" {word}") })
        .collect()
}

/// The echoed words cut to `max_new_tokens`, and why generation ended.
fn generate(source: &str, max_new_tokens: Option<u32>) -> (Vec<String>, FinishReason) {
    let mut words = words_with_spacing(source);
    match max_new_tokens {
        Some(limit) if words.len() > limit as usize => {
            words.truncate(limit as usize);
            (words, FinishReason::Length)
        }
        _ => (words, FinishReason::Stop),
    }
}

fn prompt_text(item: InputItem<'_>) -> String {
    match item {
        InputItem::Text(text) => text.to_owned(),
        InputItem::Tokens(tokens) => tokens.iter().map(u32::to_string).collect::<Vec<_>>().join(" "),
    }
}

fn last_user_text(request: &ChatCompletionRequest) -> String {
    request
        .messages
        .iter()
        .rev()
        .find(|message| message.role == Role::User)
        .map(|message| message.text())
        .unwrap_or_default()
}

fn prompt_tokens_of_chat(request: &ChatCompletionRequest) -> u32 {
    count_u32(request.messages.iter().map(|message| message.text().split_whitespace().count()).sum())
}

impl FakeBackend {
    fn delayed<T: Send + 'static>(&self, items: Vec<T>) -> futures_util::stream::BoxStream<'static, Result<T>> {
        let delay = self.token_delay;
        futures_util::stream::iter(items)
            .then(move |item| async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Ok(item)
            })
            .boxed()
    }
}

#[async_trait]
impl ModelBackend for FakeBackend {
    fn describe(&self) -> ModelDescription {
        self.description.clone()
    }

    async fn health(&self) -> Health {
        self.lock_mode().health.clone()
    }

    async fn embed(&self, request: EmbeddingRequest) -> Result<EmbeddingResponse> {
        self.embed_calls.fetch_add(1, Ordering::Relaxed);
        self.admit(Capability::Embedding).await?;
        let dimension = self.description.embedding_dimension.unwrap_or(8) as usize;
        let context_length = self.context_length();
        let mut prompt_tokens = 0u32;
        let mut vectors = Vec::with_capacity(request.input.len());
        for item in request.input.items() {
            let mut tokens = item_tokens(item);
            if tokens.len() > context_length as usize {
                if !request.truncate {
                    return Err(BackendError::ContextLengthExceeded {
                        max_tokens: context_length,
                        requested_tokens: count_u32(tokens.len()),
                        param: Some("input".to_owned()),
                    });
                }
                tokens.truncate(context_length as usize);
            }
            prompt_tokens = prompt_tokens.saturating_add(count_u32(tokens.len()));
            let mut vector = vec![0.0f32; dimension];
            for token in &tokens {
                add_hashed_direction(&mut vector, *token);
            }
            if tokens.is_empty() {
                // Whitespace-only text: still a valid, deterministic unit vector.
                add_hashed_direction(&mut vector, 0);
            }
            let norm = vector.iter().map(|value| value * value).sum::<f32>().sqrt();
            if norm > 0.0 {
                vector.iter_mut().for_each(|value| *value /= norm);
            }
            vectors.push(vector);
        }
        self.embedded_inputs.fetch_add(vectors.len() as u64, Ordering::Relaxed);
        Ok(EmbeddingResponse::from_vectors(request.model, vectors, EmbeddingUsage::new(prompt_tokens)))
    }

    async fn chat(&self, request: ChatCompletionRequest) -> Result<ChatCompletionResponse> {
        self.chat_calls.fetch_add(1, Ordering::Relaxed);
        self.admit(Capability::Chat).await?;
        let (words, finish_reason) = generate(&last_user_text(&request), request.max_new_tokens());
        let completion_tokens = count_u32(words.len());
        let choices: Vec<ChatChoice> = (0..request.choice_count())
            .map(|index| ChatChoice {
                index,
                message: AssistantMessage::text(words.concat()),
                logprobs: None,
                finish_reason: Some(finish_reason),
            })
            .collect();
        let usage =
            Usage::new(prompt_tokens_of_chat(&request), completion_tokens.saturating_mul(request.choice_count()));
        Ok(ChatCompletionResponse::new(
            format!("chatcmpl-fake-{}", unix_timestamp()),
            request.model,
            choices,
            Some(usage),
        ))
    }

    async fn chat_stream(&self, request: ChatCompletionRequest) -> Result<ChatCompletionStream> {
        self.chat_calls.fetch_add(1, Ordering::Relaxed);
        self.admit(Capability::ChatStream).await?;
        let (words, finish_reason) = generate(&last_user_text(&request), request.max_new_tokens());
        let id = format!("chatcmpl-fake-{}", unix_timestamp());
        let created = unix_timestamp();
        let model = request.model.clone();
        let chunk = |delta: ChatDelta, finish_reason: Option<FinishReason>, index: u32| {
            ChatCompletionChunk::new(
                id.clone(),
                created,
                model.clone(),
                vec![ChatChunkChoice { index, delta, logprobs: None, finish_reason }],
            )
        };
        let mut chunks = Vec::new();
        for index in 0..request.choice_count() {
            chunks.push(chunk(
                ChatDelta { role: Some(Role::Assistant), content: Some(String::new()), ..ChatDelta::default() },
                None,
                index,
            ));
            for word in &words {
                chunks.push(chunk(ChatDelta { content: Some(word.clone()), ..ChatDelta::default() }, None, index));
            }
            chunks.push(chunk(ChatDelta::default(), Some(finish_reason), index));
        }
        if request.include_usage() {
            let mut usage_chunk = ChatCompletionChunk::new(id.clone(), created, model.clone(), vec![]);
            usage_chunk.usage = Some(Usage::new(
                prompt_tokens_of_chat(&request),
                count_u32(words.len()).saturating_mul(request.choice_count()),
            ));
            chunks.push(usage_chunk);
        }
        Ok(self.delayed(chunks))
    }

    async fn complete(&self, request: CompletionRequest) -> Result<CompletionResponse> {
        self.completion_calls.fetch_add(1, Ordering::Relaxed);
        self.admit(Capability::Completion).await?;
        let (choices, usage) = completion_choices(&request);
        Ok(CompletionResponse::new(
            format!("cmpl-fake-{}", unix_timestamp()),
            unix_timestamp(),
            request.model,
            choices,
            Some(usage),
        ))
    }

    async fn complete_stream(&self, request: CompletionRequest) -> Result<CompletionStream> {
        self.completion_calls.fetch_add(1, Ordering::Relaxed);
        self.admit(Capability::CompletionStream).await?;
        let id = format!("cmpl-fake-{}", unix_timestamp());
        let created = unix_timestamp();
        let choice_count = request.n.unwrap_or(1);
        let mut chunks = Vec::new();
        let mut usage = Usage::default();
        for (prompt_index, item) in request.prompt.items().into_iter().enumerate() {
            let prompt = prompt_text(item);
            let (words, finish_reason) = generate(&prompt, request.max_tokens);
            usage = Usage::new(
                usage.prompt_tokens.saturating_add(count_u32(prompt.split_whitespace().count())),
                usage.completion_tokens.saturating_add(count_u32(words.len()).saturating_mul(choice_count)),
            );
            for choice in 0..choice_count {
                let index = count_u32(prompt_index).saturating_mul(choice_count).saturating_add(choice);
                let last = words.len().saturating_sub(1);
                for (position, word) in words.iter().enumerate() {
                    chunks.push(CompletionResponse::new(
                        id.clone(),
                        created,
                        request.model.clone(),
                        vec![CompletionChoice {
                            index,
                            text: word.clone(),
                            logprobs: None,
                            finish_reason: (position == last).then_some(finish_reason),
                        }],
                        None,
                    ));
                }
                if words.is_empty() {
                    chunks.push(CompletionResponse::new(
                        id.clone(),
                        created,
                        request.model.clone(),
                        vec![CompletionChoice {
                            index,
                            text: String::new(),
                            logprobs: None,
                            finish_reason: Some(finish_reason),
                        }],
                        None,
                    ));
                }
            }
        }
        if request.include_usage() {
            chunks.push(CompletionResponse::new(id, created, request.model.clone(), vec![], Some(usage)));
        }
        Ok(self.delayed(chunks))
    }
}

fn completion_choices(request: &CompletionRequest) -> (Vec<CompletionChoice>, Usage) {
    let choice_count = request.n.unwrap_or(1);
    let mut choices = Vec::new();
    let mut usage = Usage::default();
    for (prompt_index, item) in request.prompt.items().into_iter().enumerate() {
        let prompt = prompt_text(item);
        let (words, finish_reason) = generate(&prompt, request.max_tokens);
        let mut text = words.concat();
        if request.echo {
            text = format!("{prompt}{text}");
        }
        usage = Usage::new(
            usage.prompt_tokens.saturating_add(count_u32(prompt.split_whitespace().count())),
            usage.completion_tokens.saturating_add(count_u32(words.len()).saturating_mul(choice_count)),
        );
        for choice in 0..choice_count {
            choices.push(CompletionChoice {
                index: count_u32(prompt_index).saturating_mul(choice_count).saturating_add(choice),
                text: text.clone(),
                logprobs: None,
                finish_reason: Some(finish_reason),
            });
        }
    }
    (choices, usage)
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;
    use crate::chat::ChatMessage;
    use crate::input::Input;
    use crate::usage::StreamOptions;

    fn texts(texts: &[&str]) -> Input {
        Input::TextBatch(texts.iter().map(|text| (*text).to_owned()).collect())
    }

    fn dot(left: &[f32], right: &[f32]) -> f32 {
        left.iter().zip(right).map(|(a, b)| a * b).sum()
    }

    #[tokio::test]
    async fn embeddings_are_deterministic_unit_vectors() {
        let backend = FakeBackend::embedding("e", 32);
        let request = EmbeddingRequest::new("e", texts(&["the cat sat", "the cat sat", "dogs run"]));
        let response = backend.embed(request.clone()).await.expect("embeds");
        assert_eq!(response.data.len(), 3);
        assert_eq!(response.usage.prompt_tokens, 8);
        let first = &response.data[0].embedding;
        assert_eq!(first.len(), 32);
        assert!((dot(first, first) - 1.0).abs() < 1e-5);
        assert_eq!(first, &response.data[1].embedding);
        assert_ne!(first, &response.data[2].embedding);
        let again = backend.embed(request).await.expect("embeds");
        assert_eq!(again.data, response.data);
        assert_eq!(backend.stats().embed_calls, 2);
        assert_eq!(backend.stats().embedded_inputs, 6);
    }

    #[tokio::test]
    async fn over_long_inputs_truncate_or_fail() {
        let backend = FakeBackend::new(ModelDescription::embedding("e", 4).with_context_length(2));
        let mut request = EmbeddingRequest::new("e", Input::Text("a b c".into()));
        let response = backend.embed(request.clone()).await.expect("truncates");
        assert_eq!(response.usage.prompt_tokens, 2);
        request.truncate = false;
        let error = backend.embed(request).await.unwrap_err();
        assert_eq!(error.code(), Some("context_length_exceeded"));
    }

    #[tokio::test]
    async fn modes_reject_calls() {
        let backend = FakeBackend::embedding("e", 4);
        let request = EmbeddingRequest::new("e", Input::Text("a".into()));
        backend.set_overloaded(Some(Duration::from_secs(2)));
        assert_eq!(
            backend.embed(request.clone()).await.unwrap_err(),
            BackendError::Overloaded { retry_after: Duration::from_secs(2) }
        );
        backend.set_overloaded(None);
        backend.set_health(Health::Loading);
        assert_eq!(backend.health().await, Health::Loading);
        assert_eq!(backend.embed(request.clone()).await.unwrap_err(), BackendError::NotReady);
        backend.set_health(Health::Ready);
        assert!(backend.embed(request).await.is_ok());
        assert!(backend.chat(ChatCompletionRequest::new("e", vec![])).await.is_err());
    }

    #[tokio::test]
    async fn chat_echoes_and_streams_with_usage() {
        let backend = FakeBackend::chat("c");
        let mut request = ChatCompletionRequest::new("c", vec![ChatMessage::new(Role::User, "hello there world")]);
        let response = backend.chat(request.clone()).await.expect("chats");
        assert_eq!(response.choices[0].message.content.as_deref(), Some("hello there world"));
        request.max_tokens = Some(2);
        request.stream = true;
        request.stream_options = Some(StreamOptions { include_usage: true });
        let chunks: Vec<ChatCompletionChunk> =
            backend.chat_stream(request).await.expect("streams").map(|chunk| chunk.expect("chunk")).collect().await;
        let text: String =
            chunks.iter().flat_map(|chunk| &chunk.choices).filter_map(|choice| choice.delta.content.clone()).collect();
        assert_eq!(text, "hello there");
        let finish = chunks.iter().flat_map(|chunk| &chunk.choices).find_map(|choice| choice.finish_reason);
        assert_eq!(finish, Some(FinishReason::Length));
        let last = chunks.last().expect("usage chunk");
        assert!(last.choices.is_empty());
        assert_eq!(last.usage, Some(Usage::new(3, 2)));
        assert_eq!(backend.stats().chat_calls, 2);
    }

    #[tokio::test]
    async fn completions_echo_each_prompt() {
        let backend = FakeBackend::chat("c");
        let mut request = CompletionRequest::new("c", "x");
        request.prompt = texts(&["one two", "three"]);
        request.n = Some(2);
        let response = backend.complete(request.clone()).await.expect("completes");
        assert_eq!(response.choices.len(), 4);
        assert_eq!(response.choices[3].index, 3);
        assert_eq!(response.choices[3].text, "three");
        request.stream = true;
        let chunks: Vec<_> = backend.complete_stream(request).await.expect("streams").collect().await;
        assert!(chunks.iter().all(Result::is_ok));
        assert_eq!(backend.stats().completion_calls, 2);
    }
}
