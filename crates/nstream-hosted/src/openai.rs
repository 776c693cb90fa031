//! The OpenAI wire format, as OpenAI and Azure OpenAI speak it: URLs, headers, request bodies
//! (with Azure's api-version gating) and lenient reading of responses and stream chunks.

use nstream_backend::chat::{ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse};
use nstream_backend::embedding::{EmbeddingResponse, EmbeddingUsage};
use nstream_backend::{BackendError, EmbeddingRequest};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value, json};

use crate::error::Error;

/// Where and how to call an OpenAI-shaped API.
#[derive(Debug, Clone)]
pub(crate) enum OpenAiWire {
    /// OpenAI or an OpenAI-compatible endpoint: `{endpoint}/chat/completions`, bearer token.
    OpenAi { endpoint: String, model: String, organization: Option<String>, project: Option<String> },
    /// Azure OpenAI: deployment URLs with `?api-version=`, or the v1 API for `preview`/`latest`.
    Azure { endpoint: String, deployment: String, api_version: AzureApiVersion },
}

/// An Azure `api-version`, and what it lets a request carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AzureApiVersion {
    /// A dated data-plane version, `2023-10-01-preview` or `2024-10-21`.
    Dated(String),
    /// The v1 API (`/openai/v1/...`): `preview` (sent as `?api-version=preview`) or `latest` (none).
    V1 { preview: bool },
}

/// First dated api-versions that accept each gated request field (from Azure's inference
/// API reference; each `YYYY-MM-DD` compares as text).
const TOOLS_SINCE: &str = "2023-12-01";
const SEED_SINCE: &str = "2023-12-01";
const LOGPROBS_SINCE: &str = "2023-12-01";
const PARALLEL_TOOL_CALLS_SINCE: &str = "2024-08-01";
const STREAM_OPTIONS_SINCE: &str = "2024-09-01";
const MAX_COMPLETION_TOKENS_SINCE: &str = "2024-09-01";
const EMBEDDING_DIMENSIONS_SINCE: &str = "2024-03-01";

impl AzureApiVersion {
    pub(crate) fn parse(text: &str) -> Self {
        match text {
            "preview" => Self::V1 { preview: true },
            "latest" | "v1" => Self::V1 { preview: false },
            other => Self::Dated(other.to_owned()),
        }
    }

    /// Whether this version accepts a field introduced in the version dated `since`.
    fn supports(&self, since: &str) -> bool {
        match self {
            Self::V1 { .. } => true,
            Self::Dated(version) => version.get(..10).is_some_and(|date| date >= since),
        }
    }

    pub(crate) fn accepts_max_completion_tokens(&self) -> bool {
        self.supports(MAX_COMPLETION_TOKENS_SINCE)
    }

    fn as_str(&self) -> &str {
        match self {
            Self::Dated(version) => version,
            Self::V1 { preview: true } => "preview",
            Self::V1 { preview: false } => "latest",
        }
    }
}

impl OpenAiWire {
    pub(crate) fn url(&self, operation: &str) -> String {
        match self {
            Self::OpenAi { endpoint, .. } => format!("{endpoint}/{operation}"),
            Self::Azure { endpoint, deployment, api_version: AzureApiVersion::Dated(version) } => {
                format!("{endpoint}/openai/deployments/{deployment}/{operation}?api-version={version}")
            }
            Self::Azure { endpoint, api_version: AzureApiVersion::V1 { preview }, .. } => {
                let query = if *preview { "?api-version=preview" } else { "" };
                format!("{endpoint}/openai/v1/{operation}{query}")
            }
        }
    }

    pub(crate) fn headers(&self, api_key: &str) -> Result<HeaderMap, Error> {
        let mut headers = HeaderMap::new();
        match self {
            Self::OpenAi { organization, project, .. } => {
                let mut bearer =
                    HeaderValue::from_str(&format!("Bearer {api_key}")).map_err(|_| Error::InvalidApiKey)?;
                bearer.set_sensitive(true);
                headers.insert(reqwest::header::AUTHORIZATION, bearer);
                for (name, value) in [("openai-organization", organization), ("openai-project", project)] {
                    if let Some(value) = value {
                        let value = HeaderValue::from_str(value).map_err(|_| Error::InvalidOption {
                            option: "organization/project",
                            reason: format!("{name} is not a valid header value"),
                        })?;
                        headers.insert(HeaderName::from_static(name), value);
                    }
                }
            }
            Self::Azure { .. } => {
                let mut key = HeaderValue::from_str(api_key).map_err(|_| Error::InvalidApiKey)?;
                key.set_sensitive(true);
                headers.insert(HeaderName::from_static("api-key"), key);
            }
        }
        Ok(headers)
    }

    /// The request body for `chat/completions`, and whether the provider will end a stream with a
    /// usage chunk by itself.
    pub(crate) fn chat_body(&self, request: &ChatCompletionRequest) -> Result<(Value, bool), BackendError> {
        let mut body = match serde_json::to_value(request) {
            Ok(Value::Object(body)) => body,
            _ => return Err(BackendError::Internal("chat request did not serialise to an object".into())),
        };
        let mut upstream_sends_usage = request.include_usage();
        match self {
            Self::OpenAi { model, .. } => {
                body.insert("model".into(), Value::String(model.clone()));
            }
            Self::Azure { deployment, api_version, .. } => {
                for (field, set) in [
                    ("top_k", request.top_k.is_some()),
                    ("repetition_penalty", request.repetition_penalty.is_some()),
                    ("ignore_eos", request.ignore_eos),
                ] {
                    if set {
                        return Err(BackendError::invalid_param(
                            field,
                            format!(
                                "`{field}` is an nstream extension for self-hosted models; Azure OpenAI does not accept it"
                            ),
                        ));
                    }
                }
                match api_version {
                    AzureApiVersion::V1 { .. } => {
                        body.insert("model".into(), Value::String(deployment.clone()));
                    }
                    AzureApiVersion::Dated(_) => {
                        // The deployment in the URL picks the model.
                        body.remove("model");
                    }
                }
                upstream_sends_usage &= gate_azure_chat_fields(&mut body, request, api_version)?;
            }
        }
        Ok((Value::Object(body), upstream_sends_usage))
    }

    pub(crate) fn embedding_body(&self, request: &EmbeddingRequest) -> Value {
        let mut body = Map::new();
        body.insert("input".into(), serde_json::to_value(&request.input).unwrap_or(Value::Null));
        // Always floats: base64 encoding for the client is the server's job.
        body.insert("encoding_format".into(), json!("float"));
        if let Some(user) = &request.user {
            body.insert("user".into(), json!(user));
        }
        let dimensions_supported = match self {
            Self::OpenAi { model, .. } => {
                body.insert("model".into(), json!(model));
                true
            }
            Self::Azure { deployment, api_version, .. } => {
                if matches!(api_version, AzureApiVersion::V1 { .. }) {
                    body.insert("model".into(), json!(deployment));
                }
                api_version.supports(EMBEDDING_DIMENSIONS_SINCE)
            }
        };
        // Without upstream support the server truncates and renormalises instead.
        if let Some(dimensions) = request.dimensions
            && dimensions_supported
        {
            body.insert("dimensions".into(), json!(dimensions));
        }
        Value::Object(body)
    }
}

/// Removes or rejects the fields an older Azure api-version does not know. Fields whose absence
/// changes what the model may answer (`tools`, `response_format`, `logprobs`) are rejected with a
/// message naming the version; the others are dropped or rewritten (`seed`,
/// `parallel_tool_calls`, `max_completion_tokens` -> `max_tokens`, `stream_options`). Returns
/// whether `stream_options` was kept.
fn gate_azure_chat_fields(
    body: &mut Map<String, Value>,
    request: &ChatCompletionRequest,
    api_version: &AzureApiVersion,
) -> Result<bool, BackendError> {
    let version = api_version.as_str();
    let unsupported = |field: &str, since: &str| {
        BackendError::invalid_param(
            field,
            format!("`{field}` needs Azure api-version {since} or later; this MegaModel uses {version}"),
        )
    };
    if !api_version.supports(TOOLS_SINCE) {
        if request.tools.is_some() || request.tool_choice.is_some() {
            let field = if request.tools.is_some() { "tools" } else { "tool_choice" };
            return Err(unsupported(field, "2023-12-01-preview"));
        }
        let plain_text = request.response_format.as_ref().is_some_and(|format| format["type"] == "text");
        if request.response_format.is_some() && !plain_text {
            return Err(unsupported("response_format", "2023-12-01-preview"));
        }
        body.remove("response_format");
    }
    if !api_version.supports(LOGPROBS_SINCE) {
        if request.logprobs == Some(true) {
            return Err(unsupported("logprobs", "2023-12-01-preview"));
        }
        body.remove("logprobs");
        body.remove("top_logprobs");
    }
    if !api_version.supports(SEED_SINCE) {
        body.remove("seed");
    }
    if !api_version.supports(PARALLEL_TOOL_CALLS_SINCE) {
        body.remove("parallel_tool_calls");
    }
    if !api_version.supports(MAX_COMPLETION_TOKENS_SINCE)
        && let Some(limit) = body.remove("max_completion_tokens")
    {
        body.insert("max_tokens".into(), limit);
    }
    if !api_version.supports(STREAM_OPTIONS_SINCE) {
        body.remove("stream_options");
        return Ok(false);
    }
    Ok(true)
}

/// A malformed answer from the provider (an HTTP 502 for our client).
pub(crate) fn malformed(what: &str, detail: impl std::fmt::Display) -> BackendError {
    BackendError::Upstream {
        status: 502,
        message: format!("the provider sent a malformed {what}: {detail}"),
        retry_after: None,
    }
}

/// Reads a `chat.completion`, tolerating missing `id`/`object`/`created`, Azure's
/// `prompt_filter_results`, unknown finish reasons and missing roles. `model` becomes `served_as`.
pub(crate) fn parse_chat_response(body: &[u8], served_as: &str) -> Result<ChatCompletionResponse, BackendError> {
    let mut value: Value = serde_json::from_slice(body).map_err(|error| malformed("chat completion", error))?;
    let object = value.as_object_mut().ok_or_else(|| malformed("chat completion", "not a JSON object"))?;
    fill_envelope(object, "chat.completion", served_as);
    if let Some(Value::Array(choices)) = object.get_mut("choices") {
        for (position, choice) in choices.iter_mut().enumerate() {
            let Some(choice) = choice.as_object_mut() else { continue };
            choice.entry("index").or_insert(json!(position));
            normalise_finish_reason(choice);
            let message = choice.entry("message").or_insert_with(|| json!({}));
            if let Some(message) = message.as_object_mut() {
                message.entry("role").or_insert(json!("assistant"));
                message.entry("content").or_insert(Value::Null);
            }
        }
    }
    serde_json::from_value(value).map_err(|error| malformed("chat completion", error))
}

/// What one stream event means.
#[derive(Debug)]
pub(crate) enum StreamItem {
    /// A chunk for the client.
    Chunk(Box<ChatCompletionChunk>),
    /// Nothing for the client (Azure's prompt-filter chunk, empty keep-alives).
    Skip,
    /// `data: [DONE]`.
    Done,
}

/// Reads one `data:` payload of a chat stream. Azure content-filter chunks without `delta` get an
/// empty one; chunks with neither choices nor usage are skipped; `{"error": ...}` mid-stream is
/// the provider's error.
pub(crate) fn parse_chat_chunk(data: &str, served_as: &str) -> Result<StreamItem, BackendError> {
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(StreamItem::Done);
    }
    if data.is_empty() {
        return Ok(StreamItem::Skip);
    }
    let mut value: Value = serde_json::from_str(data).map_err(|error| malformed("stream chunk", error))?;
    let object = value.as_object_mut().ok_or_else(|| malformed("stream chunk", "not a JSON object"))?;
    if object.contains_key("error") {
        let error = crate::error::ProviderError::parse(data.as_bytes());
        return Err(BackendError::Upstream { status: 502, message: error.describe(), retry_after: None });
    }
    let has_usage = object.get("usage").is_some_and(|usage| !usage.is_null());
    let choices = match object.get_mut("choices") {
        Some(Value::Array(choices)) => choices,
        _ => {
            if !has_usage {
                return Ok(StreamItem::Skip);
            }
            object.insert("choices".into(), json!([]));
            match object.get_mut("choices") {
                Some(Value::Array(choices)) => choices,
                _ => return Ok(StreamItem::Skip),
            }
        }
    };
    for (position, choice) in choices.iter_mut().enumerate() {
        let Some(choice) = choice.as_object_mut() else { continue };
        choice.entry("index").or_insert(json!(position));
        let delta = choice.entry("delta").or_insert_with(|| json!({}));
        if delta.is_null() {
            *delta = json!({});
        }
        normalise_finish_reason(choice);
    }
    if choices.is_empty() && !has_usage {
        return Ok(StreamItem::Skip);
    }
    fill_envelope(object, "chat.completion.chunk", served_as);
    if !has_usage {
        object.remove("usage");
    }
    serde_json::from_value(value)
        .map(|chunk| StreamItem::Chunk(Box::new(chunk)))
        .map_err(|error| malformed("stream chunk", error))
}

/// Reads an embeddings answer into vectors in input order.
pub(crate) fn parse_embeddings(
    body: &[u8],
    served_as: &str,
    expected: usize,
) -> Result<EmbeddingResponse, BackendError> {
    #[derive(serde::Deserialize)]
    struct Item {
        #[serde(default)]
        index: Option<usize>,
        embedding: Vec<f32>,
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        data: Vec<Item>,
        #[serde(default)]
        usage: Option<EmbeddingUsage>,
    }
    let answer: Answer = serde_json::from_slice(body).map_err(|error| malformed("embeddings answer", error))?;
    if answer.data.len() != expected {
        return Err(malformed("embeddings answer", format!("{} vectors for {expected} inputs", answer.data.len())));
    }
    let mut vectors: Vec<Option<Vec<f32>>> = vec![None; expected];
    for (position, item) in answer.data.into_iter().enumerate() {
        let index = item.index.unwrap_or(position);
        match vectors.get_mut(index) {
            Some(slot @ None) => *slot = Some(item.embedding),
            _ => return Err(malformed("embeddings answer", format!("duplicate or out-of-range index {index}"))),
        }
    }
    let vectors = vectors.into_iter().flatten().collect();
    Ok(EmbeddingResponse::from_vectors(served_as, vectors, answer.usage.unwrap_or_default()))
}

fn fill_envelope(object: &mut Map<String, Value>, kind: &str, served_as: &str) {
    if !object.get("id").is_some_and(Value::is_string) {
        object.insert("id".into(), json!(format!("chatcmpl-{:016x}", fastrand::u64(..))));
    }
    object.insert("object".into(), json!(kind));
    if !object.get("created").is_some_and(Value::is_u64) {
        object.insert("created".into(), json!(nstream_backend::unix_timestamp()));
    }
    object.insert("model".into(), json!(served_as));
    if object.get("system_fingerprint").is_some_and(|value| !value.is_string()) {
        object.remove("system_fingerprint");
    }
    if object.get("usage").is_some_and(|usage| usage.is_null()) {
        object.remove("usage");
    }
}

/// Finish reasons outside OpenAI's list (vLLM's `abort`, a gateway's `eos`) read as `stop`.
fn normalise_finish_reason(choice: &mut Map<String, Value>) {
    const KNOWN: [&str; 5] = ["stop", "length", "tool_calls", "content_filter", "function_call"];
    match choice.get("finish_reason") {
        None => {
            choice.insert("finish_reason".into(), Value::Null);
        }
        Some(Value::String(reason)) if !KNOWN.contains(&reason.as_str()) => {
            choice.insert("finish_reason".into(), json!("stop"));
        }
        Some(Value::String(_) | Value::Null) => {}
        Some(_) => {
            choice.insert("finish_reason".into(), Value::Null);
        }
    }
}

#[cfg(test)]
mod tests {
    use nstream_backend::chat::{ChatMessage, Role};

    use super::*;

    fn azure(version: &str) -> OpenAiWire {
        OpenAiWire::Azure {
            endpoint: "https://r.openai.azure.com".into(),
            deployment: "gpt4o".into(),
            api_version: AzureApiVersion::parse(version),
        }
    }

    fn request() -> ChatCompletionRequest {
        ChatCompletionRequest::new("served", vec![ChatMessage::new(Role::User, "hi")])
    }

    #[test]
    fn urls_follow_each_flavour() {
        assert_eq!(
            azure("2024-10-21").url("chat/completions"),
            "https://r.openai.azure.com/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            azure("preview").url("embeddings"),
            "https://r.openai.azure.com/openai/v1/embeddings?api-version=preview"
        );
        assert_eq!(azure("latest").url("chat/completions"), "https://r.openai.azure.com/openai/v1/chat/completions");
    }

    #[test]
    fn old_azure_versions_reject_tools_and_drop_seed() {
        let old = azure("2023-10-01-preview");
        let with_tools = ChatCompletionRequest { tools: Some(vec![json!({"type": "function"})]), ..request() };
        let error = old.chat_body(&with_tools).unwrap_err();
        assert_eq!(error.param(), Some("tools"));
        assert!(error.to_string().contains("2023-10-01-preview"), "{error}");
        let json_mode = ChatCompletionRequest { response_format: Some(json!({"type": "json_object"})), ..request() };
        assert_eq!(old.chat_body(&json_mode).unwrap_err().param(), Some("response_format"));
        let seeded = ChatCompletionRequest { seed: Some(7), max_completion_tokens: Some(5), ..request() };
        let (body, _) = old.chat_body(&seeded).expect("seed is dropped, not rejected");
        assert!(body.get("seed").is_none() && body.get("model").is_none());
        assert_eq!(body["max_tokens"], 5);
        let (body, _) = azure("2024-10-21").chat_body(&seeded).expect("supported");
        assert_eq!(body["seed"], 7);
        assert_eq!(body["max_completion_tokens"], 5);
    }

    #[test]
    fn unknown_fields_are_forwarded_unchanged() {
        let request: ChatCompletionRequest = serde_json::from_value(json!({
            "model": "served",
            "messages": [{"role": "user", "content": "hi"}],
            "service_tier": "flex",
            "prediction": {"type": "content", "content": "x"}
        }))
        .expect("request");
        for flavour in [azure("2024-10-21"), azure("latest")] {
            let (body, _) = flavour.chat_body(&request).expect("body");
            assert_eq!(body["service_tier"], "flex");
            assert_eq!(body["prediction"], json!({"type": "content", "content": "x"}));
        }
    }

    #[test]
    fn content_filter_chunks_without_delta_are_tolerated() {
        let prompt_filter = r#"{"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}]}"#;
        assert!(matches!(parse_chat_chunk(prompt_filter, "m"), Ok(StreamItem::Skip)));
        let final_filter = r#"{"choices":[{"index":0,"finish_reason":null,"content_filter_offsets":{},"content_filter_results":{"hate":{"filtered":false}}}],"created":1,"id":"c","model":"gpt-4o","object":"chat.completion.chunk"}"#;
        let StreamItem::Chunk(chunk) = parse_chat_chunk(final_filter, "m").expect("tolerated") else {
            panic!("expected a chunk")
        };
        assert_eq!(chunk.choices[0].delta.content, None);
        assert_eq!(chunk.model, "m");
        assert!(matches!(parse_chat_chunk("[DONE]", "m"), Ok(StreamItem::Done)));
        assert!(parse_chat_chunk("{not json", "m").is_err());
    }
}
