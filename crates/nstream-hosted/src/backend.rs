//! [`HostedBackend`]: one MegaModel behind the `ModelBackend` trait.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_core::stream::BoxStream;
use futures_util::StreamExt;
use nstream_backend::chat::{ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse};
use nstream_backend::{
    BackendError, Capability, ChatCompletionStream, EmbeddingRequest, EmbeddingResponse, Health, InputItem,
    ModelBackend, ModelDescription, ModelKind, Usage,
};
use nstream_core::{MegaModelProvider, MegaModelSpec, ProviderTemplate, SecretString};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::anthropic::{self, AnthropicWire, StreamTranslator, Translated};
use crate::check::{CheckProblem, CheckReport};
use crate::error::{Error, ProviderError, Result};
use crate::openai::{self, AzureApiVersion, OpenAiWire, StreamItem};
use crate::options::HostedOptions;
use crate::sse::SseParser;
use crate::transport::{
    Answer, Capped, MAX_ANSWER_BYTES, MAX_EMBEDDING_BYTES_PER_INPUT, PreparedRequest, Transport, describe_reqwest,
    read_capped, scrub_secret,
};

/// The wire format of the provider.
#[derive(Debug, Clone)]
enum Wire {
    OpenAi(OpenAiWire),
    Anthropic(AnthropicWire),
}

/// A MegaModel served through its provider's API: chat (streamed or not) for every provider,
/// embeddings for OpenAI and Azure OpenAI. Retries, rate limits and timeouts follow the
/// [`HostedOptions`]; `Debug` and every error leave the API key out.
pub struct HostedBackend {
    name: String,
    provider: MegaModelProvider,
    endpoint: String,
    wire: Wire,
    /// Provider headers with the key, marked sensitive (reqwest redacts them in `Debug`).
    headers: reqwest::header::HeaderMap,
    transport: Transport,
    api_key: SecretString,
    created: u64,
}

impl fmt::Debug for HostedBackend {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("HostedBackend")
            .field("name", &self.name)
            .field("provider", &self.provider)
            .field("endpoint", &self.endpoint)
            .field("wire", &self.wire)
            .field("api_key", &self.api_key)
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

fn normalise_endpoint(endpoint: &str) -> Result<String> {
    let trimmed = endpoint.trim().trim_end_matches('/');
    let valid = (trimmed.starts_with("https://") || trimmed.starts_with("http://")) && trimmed.len() > "https://".len();
    if !valid || trimmed.contains("/openai/deployments/") || trimmed.contains(char::is_whitespace) {
        return Err(Error::InvalidEndpoint { endpoint: endpoint.to_owned() });
    }
    // Validation refuses these too; checked again here, on the URL as reqwest will read it, for
    // callers that skip validation.
    let url = reqwest::Url::parse(trimmed).map_err(|_| Error::InvalidEndpoint { endpoint: endpoint.to_owned() })?;
    if url.scheme() == "http" {
        // The parsed host: numeric hosts normalised to dotted IPv4, IPv6 in brackets.
        let allowed = url.host_str().is_some_and(|host| {
            let host = host.strip_prefix('[').and_then(|host| host.strip_suffix(']')).unwrap_or(host);
            nstream_core::validate::plain_http_host_allowed(host)
        });
        if !allowed || nstream_core::validate::plain_http_refused(trimmed) {
            return Err(Error::InsecureEndpoint { endpoint: endpoint.to_owned() });
        }
    }
    Ok(trimmed.to_owned())
}

impl HostedBackend {
    /// Builds the backend of the MegaModel `name` from its spec and the already-resolved API key
    /// (the caller reads `apikeySecretRef`). Makes no network call; see [`HostedBackend::check`].
    pub fn new(name: &str, spec: &MegaModelSpec, api_key: SecretString, options: HostedOptions) -> Result<Arc<Self>> {
        options.validate()?;
        if api_key.expose().trim().is_empty() {
            return Err(Error::InvalidApiKey);
        }
        let provider = spec.model_provider;
        let missing = || Error::MissingTemplate { provider: provider.as_str(), template: provider.template_field() };
        let (endpoint, wire) = match spec.provider_template().ok_or_else(missing)? {
            ProviderTemplate::AzureOpenAI(azure) => {
                let endpoint = normalise_endpoint(&azure.endpoint)?;
                let wire = OpenAiWire::Azure {
                    endpoint: endpoint.clone(),
                    deployment: azure.deployment.clone(),
                    api_version: AzureApiVersion::parse(&azure.api_version),
                };
                (endpoint, Wire::OpenAi(wire))
            }
            ProviderTemplate::OpenAI(open_ai) => {
                let endpoint = normalise_endpoint(open_ai.endpoint_or_default())?;
                let wire = OpenAiWire::OpenAi {
                    endpoint: endpoint.clone(),
                    model: open_ai.model.clone(),
                    organization: open_ai.organization.clone(),
                    project: open_ai.project.clone(),
                };
                (endpoint, Wire::OpenAi(wire))
            }
            ProviderTemplate::Anthropic(claude) => {
                let endpoint = normalise_endpoint(claude.endpoint_or_default())?;
                let wire = AnthropicWire {
                    endpoint: endpoint.clone(),
                    model: claude.model.clone(),
                    version: claude.version_or_default().to_owned(),
                    default_max_tokens: claude.max_tokens.unwrap_or(anthropic::DEFAULT_MAX_TOKENS),
                };
                (endpoint, Wire::Anthropic(wire))
            }
        };
        let headers = match &wire {
            Wire::OpenAi(wire) => wire.headers(api_key.expose())?,
            Wire::Anthropic(wire) => wire.headers(api_key.expose())?,
        };
        let provider_label = match provider {
            MegaModelProvider::AzureOpenAI => "Azure OpenAI",
            MegaModelProvider::OpenAI => "OpenAI",
            MegaModelProvider::Anthropic => "Anthropic",
        };
        let transport = Transport::new(provider_label, api_key.clone(), &options)?;
        Ok(Arc::new(Self {
            name: name.to_owned(),
            provider,
            endpoint,
            wire,
            headers,
            transport,
            api_key,
            created: nstream_backend::unix_timestamp(),
        }))
    }

    /// The MegaModel's name (what clients put in `model`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The provider.
    pub fn provider(&self) -> MegaModelProvider {
        self.provider
    }

    /// The endpoint requests go to (without trailing slash).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn prepare(&self, method: Method, url: String, body: Option<&Value>, estimated_tokens: u64) -> PreparedRequest {
        PreparedRequest {
            method,
            url,
            headers: self.headers.clone(),
            body: body.map(|body| Bytes::from(body.to_string())),
            estimated_tokens,
        }
    }

    /// Reads a 2xx answer of at most `cap` bytes (a longer one is refused, not buffered).
    async fn read_body(&self, answer: Answer, cap: usize) -> std::result::Result<Bytes, BackendError> {
        match tokio::time::timeout_at(answer.deadline, read_capped(answer.response, cap)).await {
            Ok(Ok(Capped { truncated: true, .. })) => Err(BackendError::Upstream {
                status: 502,
                message: format!("the provider's answer is longer than {} MiB; refused", cap >> 20),
                retry_after: None,
            }),
            Ok(Ok(capped)) => Ok(capped.body),
            Ok(Err(error)) => Err(BackendError::Upstream {
                status: 502,
                message: self.transport.scrub(&format!("reading the answer failed: {}", describe_reqwest(&error))),
                retry_after: None,
            }),
            Err(_) => Err(BackendError::Timeout),
        }
    }

    fn stream_state(&self, answer: Answer, decoder: Decoder) -> StreamState {
        StreamState {
            body: answer.response.bytes_stream().boxed(),
            parser: SseParser::default(),
            pending: VecDeque::new(),
            decoder,
            idle_timeout: self.transport.timeout,
            finished: false,
            api_key: self.api_key.clone(),
        }
    }

    /// One live call that tells whether the MegaModel can serve: the key is accepted, the
    /// deployment or model exists, the api-version is known; with the latency of the call and a
    /// hint for the usual failures. Not retried. OpenAI and Anthropic are asked for the model
    /// (`GET /models/{model}`, free); Azure is sent a one-token chat completion (or, for an
    /// embeddings deployment, a one-word embedding).
    pub async fn check(&self) -> CheckReport {
        let (target, request) = match &self.wire {
            Wire::OpenAi(wire @ OpenAiWire::OpenAi { model, .. }) => {
                (model.clone(), self.prepare(Method::GET, wire.url(&format!("models/{model}")), None, 0))
            }
            Wire::OpenAi(wire @ OpenAiWire::Azure { deployment, api_version, .. }) => {
                // Reasoning deployments accept only max_completion_tokens; versions before it only max_tokens.
                let limit =
                    if api_version.accepts_max_completion_tokens() { "max_completion_tokens" } else { "max_tokens" };
                let mut body = json!({"messages": [{"role": "user", "content": "ping"}], limit: 1});
                if matches!(api_version, AzureApiVersion::V1 { .. }) {
                    body["model"] = json!(deployment);
                }
                (deployment.clone(), self.prepare(Method::POST, wire.url("chat/completions"), Some(&body), 2))
            }
            Wire::Anthropic(wire) => (wire.model.clone(), self.prepare(Method::GET, wire.model_url(), None, 0)),
        };
        let mut report = CheckReport::new(&self.name, self.provider, &self.endpoint, &target);
        let started = Instant::now();
        let outcome = self.transport.send_once(&request).await;
        report.latency = Some(started.elapsed());
        let (status, body) = match outcome {
            Ok(answer) => answer,
            Err(BackendError::Timeout) => {
                report.problem = Some(CheckProblem::Timeout);
                report.detail = format!("no answer within {:?}", self.transport.timeout);
                return report;
            }
            Err(error) => {
                report.problem = Some(CheckProblem::Unreachable);
                report.detail = error.to_string();
                return report;
            }
        };
        report.status = Some(status.as_u16());
        if status.is_success() {
            report.detail = "reachable, key accepted".to_owned();
            return report;
        }
        let error = ProviderError::parse(&body);
        // An Azure embeddings deployment refuses chat with OperationNotSupported: try embeddings.
        if let Wire::OpenAi(wire @ OpenAiWire::Azure { deployment, api_version, .. }) = &self.wire
            && error.code.as_deref() == Some("OperationNotSupported")
        {
            let mut body = json!({"input": "ping"});
            if matches!(api_version, AzureApiVersion::V1 { .. }) {
                body["model"] = json!(deployment);
            }
            let request = self.prepare(Method::POST, wire.url("embeddings"), Some(&body), 1);
            if let Ok((status, _)) = self.transport.send_once(&request).await
                && status.is_success()
            {
                report.status = Some(status.as_u16());
                report.latency = Some(started.elapsed());
                report.detail = "reachable, key accepted (an embeddings deployment)".to_owned();
                return report;
            }
        }
        report.problem = Some(CheckProblem::classify(status.as_u16(), &error));
        report.detail = self.transport.scrub(&error.describe());
        report
    }
}

/// Rough token count of some text: the usual four characters per token.
fn estimate_tokens(characters: usize) -> u64 {
    (characters as u64).div_ceil(4)
}

fn estimate_prompt_tokens(request: &ChatCompletionRequest) -> u64 {
    request.messages.iter().map(|message| estimate_tokens(message.text().len()) + 4).sum()
}

/// What a chat request is charged against the TPM limit: the prompt once plus the completion
/// limit for each of its `n` choices, as providers count it.
fn estimate_chat_tokens(request: &ChatCompletionRequest, completion_limit: u32) -> u64 {
    let choices = u64::from(request.choice_count().max(1));
    estimate_prompt_tokens(request).saturating_add(u64::from(completion_limit).saturating_mul(choices))
}

#[async_trait]
impl ModelBackend for HostedBackend {
    fn describe(&self) -> ModelDescription {
        let owned_by = match self.provider {
            MegaModelProvider::AzureOpenAI => "azure-openai",
            MegaModelProvider::OpenAI => "openai",
            MegaModelProvider::Anthropic => "anthropic",
        };
        let mut description = ModelDescription::new(&self.name, ModelKind::Hosted)
            .with_capability(Capability::Chat)
            .with_capability(Capability::ChatStream)
            .with_owned_by(owned_by)
            .with_created(self.created);
        if matches!(self.wire, Wire::OpenAi(_)) {
            // OpenAI-family embeddings are unit vectors.
            description = description.with_capability(Capability::Embedding).with_normalized_embeddings(true);
        }
        description
    }

    async fn health(&self) -> Health {
        Health::Ready
    }

    async fn chat(&self, request: ChatCompletionRequest) -> std::result::Result<ChatCompletionResponse, BackendError> {
        let request = ChatCompletionRequest { stream: false, stream_options: None, ..request };
        match &self.wire {
            Wire::OpenAi(wire) => {
                let (body, _) = wire.chat_body(&request)?;
                let tokens = estimate_chat_tokens(&request, request.max_new_tokens().unwrap_or(0));
                let prepared = self.prepare(Method::POST, wire.url("chat/completions"), Some(&body), tokens);
                let answer = self.transport.send(&prepared).await?;
                let body = self.read_body(answer, MAX_ANSWER_BYTES).await?;
                openai::parse_chat_response(&body, &request.model)
            }
            Wire::Anthropic(wire) => {
                let body = wire.body(&request, false)?;
                let tokens = estimate_chat_tokens(&request, wire.max_tokens(&request));
                let prepared = self.prepare(Method::POST, wire.messages_url(), Some(&body), tokens);
                let answer = self.transport.send(&prepared).await?;
                let body = self.read_body(answer, MAX_ANSWER_BYTES).await?;
                anthropic::parse_response(&body, &request.model)
            }
        }
    }

    async fn chat_stream(
        &self,
        request: ChatCompletionRequest,
    ) -> std::result::Result<ChatCompletionStream, BackendError> {
        let request = ChatCompletionRequest { stream: true, ..request };
        let include_usage = request.include_usage();
        let prompt_tokens = estimate_prompt_tokens(&request);
        let state = match &self.wire {
            Wire::OpenAi(wire) => {
                let (body, upstream_sends_usage) = wire.chat_body(&request)?;
                let tokens = estimate_chat_tokens(&request, request.max_new_tokens().unwrap_or(0));
                let prepared = self.prepare(Method::POST, wire.url("chat/completions"), Some(&body), tokens);
                let answer = self.transport.send(&prepared).await?;
                let decoder = Decoder::OpenAi {
                    served_as: request.model.clone(),
                    include_usage,
                    upstream_sends_usage,
                    saw_usage: false,
                    saw_finish: false,
                    last_id: String::new(),
                    created: nstream_backend::unix_timestamp(),
                    prompt_tokens,
                    completion_pieces: 0,
                };
                self.stream_state(answer, decoder)
            }
            Wire::Anthropic(wire) => {
                let body = wire.body(&request, true)?;
                let tokens = estimate_chat_tokens(&request, wire.max_tokens(&request));
                let prepared = self.prepare(Method::POST, wire.messages_url(), Some(&body), tokens);
                let answer = self.transport.send(&prepared).await?;
                let decoder = Decoder::Anthropic { translator: StreamTranslator::new(&request.model), include_usage };
                self.stream_state(answer, decoder)
            }
        };
        Ok(futures_util::stream::unfold(state, StreamState::next).boxed())
    }

    async fn embed(&self, request: EmbeddingRequest) -> std::result::Result<EmbeddingResponse, BackendError> {
        let Wire::OpenAi(wire) = &self.wire else {
            return Err(BackendError::Unsupported { capability: Capability::Embedding });
        };
        let tokens: u64 = request
            .input
            .items()
            .iter()
            .map(|item| match item {
                InputItem::Text(text) => estimate_tokens(text.len()),
                InputItem::Tokens(tokens) => tokens.len() as u64,
            })
            .sum();
        let body = wire.embedding_body(&request);
        let prepared = self.prepare(Method::POST, wire.url("embeddings"), Some(&body), tokens);
        let answer = self.transport.send(&prepared).await?;
        let cap = MAX_ANSWER_BYTES.saturating_add(request.input.len().saturating_mul(MAX_EMBEDDING_BYTES_PER_INPUT));
        let body = self.read_body(answer, cap).await?;
        openai::parse_embeddings(&body, &request.model, request.input.len())
    }
}

/// How the events of one stream become chunks.
enum Decoder {
    OpenAi {
        served_as: String,
        include_usage: bool,
        upstream_sends_usage: bool,
        saw_usage: bool,
        saw_finish: bool,
        last_id: String,
        created: u64,
        prompt_tokens: u64,
        completion_pieces: u64,
    },
    Anthropic {
        translator: StreamTranslator,
        include_usage: bool,
    },
}

/// A stream in progress.
struct StreamState {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    parser: SseParser,
    pending: VecDeque<std::result::Result<ChatCompletionChunk, BackendError>>,
    decoder: Decoder,
    idle_timeout: Duration,
    finished: bool,
    api_key: SecretString,
}

fn cut_stream(detail: &str) -> BackendError {
    BackendError::Upstream {
        status: 502,
        message: format!("the provider's stream ended before the answer was complete ({detail})"),
        retry_after: None,
    }
}

impl StreamState {
    async fn next(mut self) -> Option<(std::result::Result<ChatCompletionChunk, BackendError>, Self)> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some((item, self));
            }
            if self.finished {
                return None;
            }
            match tokio::time::timeout(self.idle_timeout, self.body.next()).await {
                Err(_) => self.fail(BackendError::Timeout),
                Ok(None) => self.end_of_body(),
                Ok(Some(Err(error))) => {
                    let detail = describe_reqwest(&error);
                    self.fail(cut_stream(&detail));
                }
                Ok(Some(Ok(bytes))) => {
                    for event in self.parser.push(&bytes) {
                        if self.finished {
                            break;
                        }
                        self.handle(&event.event, &event.data);
                    }
                    if self.parser.oversized_events() > 0 && !self.finished {
                        let limit = self.parser.max_event_bytes();
                        self.fail(BackendError::Upstream {
                            status: 502,
                            message: format!(
                                "the provider's stream sent an event longer than {limit} bytes; the stream is refused"
                            ),
                            retry_after: None,
                        });
                    }
                }
            }
        }
    }

    fn fail(&mut self, error: BackendError) {
        let error = match error {
            BackendError::Upstream { status, message, retry_after } => {
                BackendError::Upstream { status, message: scrub_secret(&message, self.api_key.expose()), retry_after }
            }
            other => other,
        };
        self.pending.push_back(Err(error));
        self.finished = true;
    }

    fn handle(&mut self, event: &str, data: &str) {
        match &mut self.decoder {
            Decoder::OpenAi { served_as, saw_usage, saw_finish, last_id, created, completion_pieces, .. } => {
                match openai::parse_chat_chunk(data, served_as) {
                    Ok(StreamItem::Chunk(chunk)) => {
                        *saw_usage |= chunk.usage.is_some();
                        *completion_pieces +=
                            chunk.choices.iter().filter(|choice| choice.delta.content.is_some()).count() as u64;
                        *saw_finish |= chunk.choices.iter().any(|choice| choice.finish_reason.is_some());
                        last_id.clone_from(&chunk.id);
                        *created = chunk.created;
                        self.pending.push_back(Ok(*chunk));
                    }
                    Ok(StreamItem::Skip) => {}
                    Ok(StreamItem::Done) => self.complete(),
                    Err(error) => self.fail(error),
                }
            }
            Decoder::Anthropic { translator, .. } => match translator.translate(event, data) {
                Ok(Translated::Chunks(chunks)) => self.pending.extend(chunks.into_iter().map(Ok)),
                Ok(Translated::Stop(chunks)) => {
                    self.pending.extend(chunks.into_iter().map(Ok));
                    self.complete();
                }
                Err(error) => self.fail(error),
            },
        }
    }

    /// The answer is complete: add the usage chunk the client asked for if the provider did not.
    fn complete(&mut self) {
        self.finished = true;
        match &self.decoder {
            Decoder::OpenAi {
                served_as,
                include_usage: true,
                saw_usage: false,
                last_id,
                created,
                prompt_tokens,
                completion_pieces,
                ..
            } => {
                // The provider could not send usage (an api-version without stream_options): an
                // estimate, from characters and content pieces, is better than none.
                let clamp = |count: u64| u32::try_from(count).unwrap_or(u32::MAX);
                let mut chunk = ChatCompletionChunk::new(last_id, *created, served_as, Vec::new());
                chunk.usage = Some(Usage::new(clamp(*prompt_tokens), clamp(*completion_pieces)));
                self.pending.push_back(Ok(chunk));
            }
            Decoder::Anthropic { translator, include_usage: true } => {
                self.pending.push_back(Ok(translator.usage_chunk()));
            }
            _ => {}
        }
    }

    fn end_of_body(&mut self) {
        let pending_bytes = self.parser.has_pending();
        match &self.decoder {
            // Some OpenAI-compatible servers close without `[DONE]` once every choice finished.
            Decoder::OpenAi { saw_finish: true, upstream_sends_usage, saw_usage, .. }
                if !pending_bytes && (!*upstream_sends_usage || *saw_usage) =>
            {
                self.complete()
            }
            _ => self.fail(cut_stream("connection closed")),
        }
    }
}

#[cfg(test)]
mod tests {
    use nstream_core::{AzureOpenAiTemplate, ModelTemplate};

    use super::*;

    fn azure_spec(endpoint: &str) -> MegaModelSpec {
        MegaModelSpec {
            model_provider: MegaModelProvider::AzureOpenAI,
            model_template: ModelTemplate {
                azure_open_ai: Some(AzureOpenAiTemplate {
                    api_version: "2024-10-21".into(),
                    apikey: None,
                    apikey_secret_ref: None,
                    deployment: "gpt4o".into(),
                    endpoint: endpoint.into(),
                }),
                ..ModelTemplate::default()
            },
            limits: None,
        }
    }

    #[test]
    fn construction_checks_template_endpoint_and_key() {
        let key = || SecretString::new("azure-key-0123456789abcdef");
        let backend =
            HostedBackend::new("m", &azure_spec("https://r.openai.azure.com/"), key(), HostedOptions::default())
                .expect("valid");
        assert_eq!(backend.endpoint(), "https://r.openai.azure.com");
        let debug = format!("{backend:?}");
        assert!(!debug.contains("azure-key"), "{debug}");
        assert!(matches!(
            HostedBackend::new("m", &azure_spec("ftp://x"), key(), HostedOptions::default()),
            Err(Error::InvalidEndpoint { .. })
        ));
        assert!(matches!(
            HostedBackend::new(
                "m",
                &azure_spec("https://r.openai.azure.com"),
                SecretString::new(" "),
                HostedOptions::default()
            ),
            Err(Error::InvalidApiKey)
        ));
        assert!(matches!(
            HostedBackend::new("m", &azure_spec("https://r"), SecretString::new("bad\nkey"), HostedOptions::default()),
            Err(Error::InvalidApiKey)
        ));
        let mut wrong = azure_spec("https://r");
        wrong.model_provider = MegaModelProvider::Anthropic;
        let error = HostedBackend::new("m", &wrong, key(), HostedOptions::default()).unwrap_err();
        assert_eq!(error.to_string(), "modelProvider is Anthropic but modelTemplate.anthropic is missing");
    }
}
