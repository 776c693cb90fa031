//! `/v1/chat/completions`: requests, responses and streaming chunks.
//!
//! Unknown request fields are ignored (not rejected) because many OpenAI-compatible clients send
//! their own extras; see the crate documentation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::usage::{StopSequences, StreamOptions, Usage};
use crate::{BackendError, Result};

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Instructions from the application (older models).
    System,
    /// Instructions from the application (OpenAI's newer name for `system`).
    Developer,
    /// The end user.
    User,
    /// The model.
    Assistant,
    /// The result of a tool call, answering `tool_call_id`.
    Tool,
}

/// A message's `content`: a plain string or an array of typed parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// `"content": "Hello"`.
    Text(String),
    /// `"content": [{"type": "text", "text": "Hello"}, ...]`.
    Parts(Vec<ContentPart>),
}

impl MessageContent {
    /// The text of the content: the string itself, or the text parts joined by newlines
    /// (non-text parts are skipped; a text-only model has nothing to do with them).
    pub fn text(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Parts(parts) => parts
                .iter()
                .filter_map(|part| match part {
                    ContentPart::Text { text } => Some(text.as_str()),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// One part of an array `content`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    /// `{"type": "text", "text": "..."}`.
    Text {
        /// The text.
        text: String,
    },
    /// `{"type": "image_url", "image_url": {"url": "...", "detail": "auto"}}`.
    ImageUrl {
        /// Where the image is (URL or `data:` URI).
        image_url: ImageUrl,
    },
    /// `{"type": "input_audio", "input_audio": {"data": "...", "format": "wav"}}`, kept opaque.
    InputAudio {
        /// Base64 audio and its format, passed through to providers that accept it.
        input_audio: serde_json::Value,
    },
    /// `{"type": "file", "file": {...}}`, kept opaque.
    File {
        /// The file reference, passed through to providers that accept it.
        file: serde_json::Value,
    },
    /// `{"type": "refusal", "refusal": "..."}` in assistant messages.
    Refusal {
        /// The refusal text.
        refusal: String,
    },
}

/// The image of an `image_url` part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageUrl {
    /// URL or `data:` URI.
    pub url: String,
    /// `auto`, `low` or `high`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A tool call made by the assistant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// Identifier that the `tool` message answering it repeats in `tool_call_id`.
    pub id: String,
    /// Always `"function"` today.
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    /// The function and its JSON arguments.
    pub function: FunctionCall,
}

fn function_type() -> String {
    "function".to_owned()
}

/// Name and arguments of a function call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// Its arguments as a JSON-encoded string (as OpenAI sends them).
    pub arguments: String,
}

/// One message of the conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who wrote it.
    pub role: Role,
    /// The content; may be absent (or null) on assistant messages that only call tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<MessageContent>,
    /// Optional participant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tool calls of an assistant message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// For `tool` messages: which call this answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// An assistant's refusal, when it refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
}

impl ChatMessage {
    /// A message with text content.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: Some(MessageContent::Text(content.into())),
            name: None,
            tool_calls: None,
            tool_call_id: None,
            refusal: None,
        }
    }

    /// The message's text (see [`MessageContent::text`]); empty when there is no content.
    pub fn text(&self) -> String {
        self.content.as_ref().map(MessageContent::text).unwrap_or_default()
    }
}

/// A `/v1/chat/completions` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    /// Which model to use; the server routes on it.
    pub model: String,
    /// The conversation so far; at least one message.
    pub messages: Vec<ChatMessage>,
    /// Sampling temperature, 0 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Deprecated by OpenAI in favour of `max_completion_tokens`; still sent by most clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Upper bound on generated tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    /// How many choices to generate (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Where to stop generating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopSequences>,
    /// Seed for reproducible sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Stream chunks as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming settings (`include_usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Penalty for tokens already present, -2 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    /// Penalty proportional to token frequency, -2 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string key, per OpenAI) to bias, -100 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<BTreeMap<String, f32>>,
    /// Return log probabilities of the output tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    /// How many most likely tokens to return per position, 0 to 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u32>,
    /// End-user identifier for abuse monitoring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Tool definitions, passed through opaquely to backends that support tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<serde_json::Value>>,
    /// `none`, `auto`, `required` or a specific tool, passed through opaquely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<serde_json::Value>,
    /// Whether the model may call several tools at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// `{"type": "text" | "json_object" | "json_schema", ...}`, passed through opaquely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<serde_json::Value>,
    /// nstream extension: sample only among the `top_k` most likely tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// nstream extension: multiplicative repetition penalty (1.0 = off), greater than 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    /// nstream extension: keep generating past end-of-sequence tokens (benchmarks).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_eos: bool,
    /// Every other field of the request, kept as sent: the gateway forwards them to OpenAI and
    /// Azure unchanged (new OpenAI fields need no release) and refuses them for providers that
    /// cannot honour them; self-hosted models ignore them.
    #[serde(flatten, default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ChatCompletionRequest {
    /// A request with the given messages and every option at its default.
    pub fn new(model: impl Into<String>, messages: Vec<ChatMessage>) -> Self {
        Self {
            model: model.into(),
            messages,
            temperature: None,
            top_p: None,
            max_tokens: None,
            max_completion_tokens: None,
            n: None,
            stop: None,
            seed: None,
            stream: false,
            stream_options: None,
            presence_penalty: None,
            frequency_penalty: None,
            logit_bias: None,
            logprobs: None,
            top_logprobs: None,
            user: None,
            tools: None,
            tool_choice: None,
            parallel_tool_calls: None,
            response_format: None,
            top_k: None,
            repetition_penalty: None,
            ignore_eos: false,
            extra: serde_json::Map::new(),
        }
    }

    /// The generation limit: `max_completion_tokens`, else the legacy `max_tokens`.
    pub fn max_new_tokens(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// How many choices to generate (`n`, default 1).
    pub fn choice_count(&self) -> u32 {
        self.n.unwrap_or(1)
    }

    /// Whether a streamed answer must end with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream && self.stream_options.is_some_and(|options| options.include_usage)
    }

    /// Checks the documented ranges so backends need not. Called by the server before routing.
    pub fn validate(&self) -> Result<()> {
        if self.messages.is_empty() {
            return Err(BackendError::invalid_param("messages", "`messages` must contain at least one message"));
        }
        SamplingRanges {
            temperature: self.temperature,
            top_p: self.top_p,
            n: self.n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.as_ref(),
            stop: self.stop.as_ref(),
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
        }
        .validate()?;
        for (name, value) in [("max_tokens", self.max_tokens), ("max_completion_tokens", self.max_completion_tokens)] {
            if value == Some(0) {
                return Err(BackendError::invalid_param(name, format!("`{name}` must be at least 1")));
            }
        }
        if self.top_logprobs.is_some_and(|count| count > 20) {
            return Err(BackendError::invalid_param("top_logprobs", "`top_logprobs` must be between 0 and 20"));
        }
        if self.stream_options.is_some() && !self.stream {
            return Err(BackendError::invalid_param(
                "stream_options",
                "`stream_options` is only allowed when `stream` is true",
            ));
        }
        Ok(())
    }
}

/// Range checks shared by chat and legacy completions.
pub(crate) struct SamplingRanges<'a> {
    pub(crate) temperature: Option<f32>,
    pub(crate) top_p: Option<f32>,
    pub(crate) n: Option<u32>,
    pub(crate) presence_penalty: Option<f32>,
    pub(crate) frequency_penalty: Option<f32>,
    pub(crate) logit_bias: Option<&'a BTreeMap<String, f32>>,
    pub(crate) stop: Option<&'a StopSequences>,
    pub(crate) top_k: Option<u32>,
    pub(crate) repetition_penalty: Option<f32>,
}

fn check_range(name: &str, value: Option<f32>, low: f32, high: f32) -> Result<()> {
    match value {
        // `contains` is false for NaN, so NaN is rejected too.
        Some(value) if !(low..=high).contains(&value) => {
            Err(BackendError::invalid_param(name, format!("`{name}` must be between {low} and {high}, got {value}")))
        }
        _ => Ok(()),
    }
}

impl SamplingRanges<'_> {
    pub(crate) fn validate(&self) -> Result<()> {
        check_range("temperature", self.temperature, 0.0, 2.0)?;
        check_range("top_p", self.top_p, 0.0, 1.0)?;
        check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        if let Some(n) = self.n
            && !(1..=128).contains(&n)
        {
            return Err(BackendError::invalid_param("n", format!("`n` must be between 1 and 128, got {n}")));
        }
        if self.top_k == Some(0) {
            return Err(BackendError::invalid_param("top_k", "`top_k` must be at least 1"));
        }
        if let Some(penalty) = self.repetition_penalty
            && !(penalty > 0.0 && penalty.is_finite())
        {
            return Err(BackendError::invalid_param(
                "repetition_penalty",
                format!("`repetition_penalty` must be a positive number, got {penalty}"),
            ));
        }
        if let Some(bias) = self.logit_bias {
            for (token, value) in bias {
                if token.parse::<u32>().is_err() {
                    return Err(BackendError::invalid_param(
                        "logit_bias",
                        format!("`logit_bias` keys must be token ids, got {token:?}"),
                    ));
                }
                check_range("logit_bias", Some(*value), -100.0, 100.0)?;
            }
        }
        if let Some(stop) = self.stop {
            stop.validate()?;
        }
        Ok(())
    }
}

/// Why generation of a choice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A natural end or a stop sequence.
    Stop,
    /// The token limit was reached.
    Length,
    /// The model called tools.
    ToolCalls,
    /// Content was filtered (hosted providers).
    ContentFilter,
    /// Deprecated function calling.
    FunctionCall,
}

/// The assistant message of a non-streamed choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssistantMessage {
    /// Always [`Role::Assistant`].
    pub role: Role,
    /// The generated text; null when the model only called tools.
    pub content: Option<String>,
    /// Tool calls the model made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// A refusal, when the model refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
}

impl AssistantMessage {
    /// An assistant message with text content.
    pub fn text(content: impl Into<String>) -> Self {
        Self { role: Role::Assistant, content: Some(content.into()), tool_calls: None, refusal: None }
    }
}

/// One choice of a non-streamed response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    /// Position among the `n` choices.
    pub index: u32,
    /// The generated message.
    pub message: AssistantMessage,
    /// Log probabilities, when requested (provider-shaped, passed through).
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    /// Why generation ended.
    pub finish_reason: Option<FinishReason>,
}

/// The object name of [`ChatCompletionResponse`].
pub const CHAT_COMPLETION_OBJECT: &str = "chat.completion";
/// The object name of [`ChatCompletionChunk`].
pub const CHAT_COMPLETION_CHUNK_OBJECT: &str = "chat.completion.chunk";

/// A non-streamed `/v1/chat/completions` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionResponse {
    /// Unique id, `chatcmpl-...`.
    pub id: String,
    /// Always `"chat.completion"`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model that answered.
    pub model: String,
    /// The choices.
    pub choices: Vec<ChatChoice>,
    /// Token accounting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Backend configuration fingerprint, for reproducibility with `seed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
}

impl ChatCompletionResponse {
    /// A response with `object` and `created` filled in.
    pub fn new(
        id: impl Into<String>,
        model: impl Into<String>,
        choices: Vec<ChatChoice>,
        usage: Option<Usage>,
    ) -> Self {
        Self {
            id: id.into(),
            object: CHAT_COMPLETION_OBJECT.to_owned(),
            created: crate::usage::unix_timestamp(),
            model: model.into(),
            choices,
            usage,
            system_fingerprint: None,
        }
    }
}

/// The incremental part of a streamed choice.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatDelta {
    /// Set on the first chunk of a choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// New text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// New or continued tool calls (provider-shaped, passed through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// Refusal text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
}

/// One choice inside a streamed chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChunkChoice {
    /// Position among the `n` choices.
    pub index: u32,
    /// What is new.
    pub delta: ChatDelta,
    /// Log probabilities, when requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<serde_json::Value>,
    /// Set on the last chunk of the choice; null before.
    pub finish_reason: Option<FinishReason>,
}

/// One server-sent event of a streamed `/v1/chat/completions` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    /// Same id on every chunk of one response.
    pub id: String,
    /// Always `"chat.completion.chunk"`.
    pub object: String,
    /// Unix seconds, same on every chunk.
    pub created: u64,
    /// The model that answers.
    pub model: String,
    /// Usually one choice; empty on the final usage chunk.
    pub choices: Vec<ChatChunkChoice>,
    /// Only on the final chunk, and only when `stream_options.include_usage` was true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Backend configuration fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
}

impl ChatCompletionChunk {
    /// A chunk with `object` set, for the given response id and creation time.
    pub fn new(id: impl Into<String>, created: u64, model: impl Into<String>, choices: Vec<ChatChunkChoice>) -> Self {
        Self {
            id: id.into(),
            object: CHAT_COMPLETION_CHUNK_OBJECT.to_owned(),
            created,
            model: model.into(),
            choices,
            usage: None,
            system_fingerprint: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: serde_json::Value) -> ChatCompletionRequest {
        serde_json::from_value(json).expect("valid chat request")
    }

    #[test]
    fn parses_a_minimal_request() {
        let request = parse(serde_json::json!({
            "model": "llama",
            "messages": [{"role": "user", "content": "hi"}]
        }));
        assert_eq!(request.messages[0].role, Role::User);
        assert_eq!(request.messages[0].text(), "hi");
        assert!(!request.stream);
        assert_eq!(request.choice_count(), 1);
        assert!(request.validate().is_ok());
    }

    #[test]
    fn parses_every_role_and_content_parts() {
        let request = parse(serde_json::json!({
            "model": "llama",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "developer", "content": "really"},
                {"role": "user", "content": [
                    {"type": "text", "text": "what is"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA==", "detail": "low"}},
                    {"type": "text", "text": "this?"}
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{}"}}
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "a cat"}
            ]
        }));
        let roles: Vec<Role> = request.messages.iter().map(|message| message.role).collect();
        assert_eq!(roles, [Role::System, Role::Developer, Role::User, Role::Assistant, Role::Tool]);
        assert_eq!(request.messages[2].text(), "what is\nthis?");
        assert_eq!(request.messages[3].content, None);
        assert_eq!(request.messages[3].tool_calls.as_ref().map(Vec::len), Some(1));
        assert_eq!(request.messages[4].tool_call_id.as_deref(), Some("call_1"));
    }

    #[test]
    fn parses_sampling_options_and_extensions() {
        let request = parse(serde_json::json!({
            "model": "llama",
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.7, "top_p": 0.9, "max_tokens": 10, "max_completion_tokens": 20,
            "n": 2, "stop": ["\n", "###"], "seed": 42, "stream": true,
            "stream_options": {"include_usage": true},
            "presence_penalty": 0.5, "frequency_penalty": -0.5, "logit_bias": {"50256": -100},
            "user": "u-1", "top_k": 40, "repetition_penalty": 1.1, "ignore_eos": true,
            "some_client_extra": {"ignored": true}
        }));
        assert_eq!(request.max_new_tokens(), Some(20));
        assert_eq!(request.stop, Some(StopSequences::Many(vec!["\n".into(), "###".into()])));
        assert!(request.include_usage());
        assert_eq!(request.top_k, Some(40));
        assert!(request.ignore_eos);
        assert_eq!(request.extra.get("some_client_extra"), Some(&serde_json::json!({"ignored": true})));
        let round_trip = serde_json::to_value(&request).expect("serialises");
        assert_eq!(round_trip["some_client_extra"], serde_json::json!({"ignored": true}));
        assert!(request.validate().is_ok());
    }

    #[test]
    fn stop_accepts_a_single_string() {
        let request = parse(serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": "x"}], "stop": "END"
        }));
        assert_eq!(request.stop, Some(StopSequences::One("END".into())));
    }

    #[test]
    fn rejects_unknown_roles_and_part_types() {
        let bad_role = serde_json::json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]});
        assert!(serde_json::from_value::<ChatCompletionRequest>(bad_role).is_err());
        let bad_part =
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "video"}]}]});
        assert!(serde_json::from_value::<ChatCompletionRequest>(bad_part).is_err());
    }

    #[test]
    fn validation_names_the_parameter() {
        let base = || ChatCompletionRequest::new("m", vec![ChatMessage::new(Role::User, "x")]);
        let cases: Vec<(ChatCompletionRequest, &str)> = vec![
            (ChatCompletionRequest::new("m", vec![]), "messages"),
            (ChatCompletionRequest { temperature: Some(3.0), ..base() }, "temperature"),
            (ChatCompletionRequest { top_p: Some(f32::NAN), ..base() }, "top_p"),
            (ChatCompletionRequest { n: Some(0), ..base() }, "n"),
            (ChatCompletionRequest { max_tokens: Some(0), ..base() }, "max_tokens"),
            (ChatCompletionRequest { stop: Some(StopSequences::Many(vec!["a".into(); 5])), ..base() }, "stop"),
            (
                ChatCompletionRequest { logit_bias: Some(BTreeMap::from([("abc".to_owned(), 1.0)])), ..base() },
                "logit_bias",
            ),
            (
                ChatCompletionRequest { stream_options: Some(StreamOptions { include_usage: true }), ..base() },
                "stream_options",
            ),
        ];
        for (request, param) in cases {
            let error = request.validate().expect_err(param);
            assert_eq!(error.param(), Some(param), "{error}");
            assert_eq!(error.status_code(), 400);
        }
    }

    #[test]
    fn chunks_serialise_in_the_openai_shape() {
        let chunk = ChatCompletionChunk::new(
            "chatcmpl-1",
            7,
            "m",
            vec![ChatChunkChoice {
                index: 0,
                delta: ChatDelta { role: Some(Role::Assistant), content: Some("Hi".into()), ..ChatDelta::default() },
                logprobs: None,
                finish_reason: None,
            }],
        );
        let json = serde_json::to_value(&chunk).expect("serialises");
        assert_eq!(
            json,
            serde_json::json!({
                "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": null}]
            })
        );
    }

    #[test]
    fn responses_serialise_with_usage_and_finish_reason() {
        let response = ChatCompletionResponse::new(
            "chatcmpl-1",
            "m",
            vec![ChatChoice {
                index: 0,
                message: AssistantMessage::text("Hello"),
                logprobs: None,
                finish_reason: Some(FinishReason::Stop),
            }],
            Some(Usage::new(3, 1)),
        );
        let json = serde_json::to_value(&response).expect("serialises");
        assert_eq!(json["object"], "chat.completion");
        assert_eq!(json["choices"][0]["finish_reason"], "stop");
        assert_eq!(json["choices"][0]["message"]["role"], "assistant");
        assert_eq!(json["usage"]["total_tokens"], 4);
    }
}
