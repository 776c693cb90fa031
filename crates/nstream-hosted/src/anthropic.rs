//! Anthropic's Messages API: OpenAI-shaped chat requests in, `POST /v1/messages` bodies out, and
//! Messages answers (whole or as named SSE events) back into OpenAI chat completions.

use nstream_backend::chat::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatDelta, ContentPart, FinishReason, FunctionCall, MessageContent, Role, ToolCall,
};
use nstream_backend::{BackendError, Usage};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value, json};

use crate::error::{Error, ProviderError};
use crate::openai::malformed;

/// Where and how to call the Messages API.
#[derive(Debug, Clone)]
pub(crate) struct AnthropicWire {
    pub(crate) endpoint: String,
    pub(crate) model: String,
    pub(crate) version: String,
    pub(crate) default_max_tokens: u32,
}

/// `max_tokens` when neither the request nor the template sets one.
pub(crate) const DEFAULT_MAX_TOKENS: u32 = 4096;

impl AnthropicWire {
    pub(crate) fn messages_url(&self) -> String {
        format!("{}/v1/messages", self.endpoint)
    }

    pub(crate) fn model_url(&self) -> String {
        format!("{}/v1/models/{}", self.endpoint, self.model)
    }

    pub(crate) fn headers(&self, api_key: &str) -> Result<HeaderMap, Error> {
        let mut headers = HeaderMap::new();
        let mut key = HeaderValue::from_str(api_key).map_err(|_| Error::InvalidApiKey)?;
        key.set_sensitive(true);
        headers.insert(HeaderName::from_static("x-api-key"), key);
        let version = HeaderValue::from_str(&self.version).map_err(|_| Error::InvalidOption {
            option: "anthropicVersion",
            reason: "not a valid header value".into(),
        })?;
        headers.insert(HeaderName::from_static("anthropic-version"), version);
        Ok(headers)
    }

    /// The effective `max_tokens` of a request.
    pub(crate) fn max_tokens(&self, request: &ChatCompletionRequest) -> u32 {
        request.max_new_tokens().unwrap_or(self.default_max_tokens)
    }

    /// Maps an OpenAI chat request to a Messages request body.
    pub(crate) fn body(&self, request: &ChatCompletionRequest, stream: bool) -> Result<Value, BackendError> {
        if request.choice_count() > 1 {
            return Err(BackendError::invalid_param("n", "Anthropic returns one choice per request; `n` must be 1"));
        }
        if request.logprobs == Some(true) {
            return Err(BackendError::invalid_param("logprobs", "Anthropic does not return log probabilities"));
        }
        refuse_unhonoured(request)?;
        let mut system = Vec::new();
        let mut messages: Vec<(&'static str, Vec<Value>)> = Vec::new();
        for (position, message) in request.messages.iter().enumerate() {
            let (role, blocks) = match message.role {
                Role::System | Role::Developer => {
                    let text = message.text();
                    if !text.is_empty() {
                        system.push(text);
                    }
                    continue;
                }
                Role::User => ("user", content_blocks(message.content.as_ref(), position)?),
                Role::Assistant => {
                    let mut blocks = content_blocks(message.content.as_ref(), position)?;
                    for call in message.tool_calls.iter().flatten() {
                        let input: Value = serde_json::from_str(&call.function.arguments).unwrap_or_else(|_| json!({}));
                        let input = if input.is_object() { input } else { json!({}) };
                        blocks.push(
                            json!({"type": "tool_use", "id": call.id, "name": call.function.name, "input": input}),
                        );
                    }
                    ("assistant", blocks)
                }
                Role::Tool => {
                    let Some(tool_use_id) = &message.tool_call_id else {
                        return Err(BackendError::invalid_param(
                            format!("messages[{position}].tool_call_id"),
                            "a tool message needs `tool_call_id`",
                        ));
                    };
                    (
                        "user",
                        vec![json!({"type": "tool_result", "tool_use_id": tool_use_id, "content": message.text()})],
                    )
                }
            };
            if blocks.is_empty() {
                continue;
            }
            // The API wants user and assistant turns to alternate: merge neighbours of one role.
            match messages.last_mut() {
                Some((last_role, last_blocks)) if *last_role == role => last_blocks.extend(blocks),
                _ => messages.push((role, blocks)),
            }
        }
        if messages.is_empty() {
            return Err(BackendError::invalid_param(
                "messages",
                "Anthropic needs at least one user or assistant message",
            ));
        }
        let mut body = Map::new();
        body.insert("model".into(), json!(self.model));
        body.insert("max_tokens".into(), json!(self.max_tokens(request)));
        body.insert(
            "messages".into(),
            Value::Array(
                messages.into_iter().map(|(role, content)| json!({"role": role, "content": content})).collect(),
            ),
        );
        if !system.is_empty() {
            body.insert("system".into(), json!(system.join("\n\n")));
        }
        if let Some(temperature) = request.temperature {
            // OpenAI's range is 0-2, Anthropic's 0-1.
            body.insert("temperature".into(), json!(temperature.min(1.0)));
        }
        if let Some(top_p) = request.top_p {
            body.insert("top_p".into(), json!(top_p));
        }
        if let Some(top_k) = request.top_k {
            body.insert("top_k".into(), json!(top_k));
        }
        if let Some(stop) = &request.stop {
            body.insert("stop_sequences".into(), json!(stop.to_vec()));
        }
        if let Some(user) = &request.user {
            body.insert("metadata".into(), json!({"user_id": user}));
        }
        if let Some(tools) = &request.tools {
            body.insert("tools".into(), Value::Array(tools.iter().map(tool).collect::<Result<_, _>>()?));
        }
        if let Some(choice) = tool_choice(request.tool_choice.as_ref(), request.parallel_tool_calls)? {
            body.insert("tool_choice".into(), choice);
        }
        if stream {
            body.insert("stream".into(), json!(true));
        }
        Ok(Value::Object(body))
    }
}

/// Refuses, naming them, the fields the Messages API has no equivalent for (dropping them would
/// answer a different question than the one asked). `seed` is best effort at OpenAI too and is
/// ignored.
fn refuse_unhonoured(request: &ChatCompletionRequest) -> Result<(), BackendError> {
    let refused = |field: &str, why: &str| {
        Err(BackendError::invalid_param(field, format!("`{field}`: Anthropic cannot honour it ({why})")))
    };
    if request.logit_bias.as_ref().is_some_and(|bias| !bias.is_empty()) {
        return refused("logit_bias", "the Messages API has no token biases");
    }
    if request.presence_penalty.is_some_and(|penalty| penalty != 0.0) {
        return refused("presence_penalty", "the Messages API has no penalties");
    }
    if request.frequency_penalty.is_some_and(|penalty| penalty != 0.0) {
        return refused("frequency_penalty", "the Messages API has no penalties");
    }
    if request.top_logprobs.is_some_and(|count| count > 0) {
        return refused("top_logprobs", "the Messages API returns no log probabilities");
    }
    if request.response_format.as_ref().is_some_and(|format| format["type"] != "text") {
        return refused("response_format", "use a tool with an input schema instead");
    }
    if request.repetition_penalty.is_some() {
        return refused("repetition_penalty", "an nstream extension for self-hosted models");
    }
    if request.ignore_eos {
        return refused("ignore_eos", "an nstream extension for self-hosted models");
    }
    if let Some(field) = request.extra.keys().next() {
        let names: Vec<String> = request.extra.keys().map(|name| format!("`{name}`")).collect();
        return Err(BackendError::invalid_param(
            field.clone(),
            format!("Anthropic cannot honour the field(s) {}, which nstream does not translate", names.join(", ")),
        ));
    }
    Ok(())
}

fn content_blocks(content: Option<&MessageContent>, position: usize) -> Result<Vec<Value>, BackendError> {
    let text_block = |text: &str| json!({"type": "text", "text": text});
    match content {
        None => Ok(Vec::new()),
        Some(MessageContent::Text(text)) if text.is_empty() => Ok(Vec::new()),
        Some(MessageContent::Text(text)) => Ok(vec![text_block(text)]),
        Some(MessageContent::Parts(parts)) => parts
            .iter()
            .enumerate()
            .map(|(index, part)| match part {
                ContentPart::Text { text } => Ok(text_block(text)),
                ContentPart::Refusal { refusal } => Ok(text_block(refusal)),
                ContentPart::ImageUrl { image_url } => Ok(image_block(&image_url.url)),
                ContentPart::InputAudio { .. } | ContentPart::File { .. } => Err(BackendError::invalid_param(
                    format!("messages[{position}].content[{index}]"),
                    "Anthropic accepts text and image parts only",
                )),
            })
            .collect(),
    }
}

/// `data:image/png;base64,...` becomes a base64 source; anything else a URL source.
fn image_block(url: &str) -> Value {
    if let Some(rest) = url.strip_prefix("data:")
        && let Some((media_type, data)) = rest.split_once(";base64,")
    {
        return json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}});
    }
    json!({"type": "image", "source": {"type": "url", "url": url}})
}

/// `{"type":"function","function":{"name","description","parameters"}}` -> `{"name","description","input_schema"}`.
fn tool(tool: &Value) -> Result<Value, BackendError> {
    let function = tool.get("function").unwrap_or(tool);
    let Some(name) = function.get("name").and_then(Value::as_str) else {
        return Err(BackendError::invalid_param("tools", "each tool needs `function.name`"));
    };
    let mut mapped = Map::new();
    mapped.insert("name".into(), json!(name));
    if let Some(description) = function.get("description") {
        mapped.insert("description".into(), description.clone());
    }
    let schema = function.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    mapped.insert("input_schema".into(), schema);
    Ok(Value::Object(mapped))
}

fn tool_choice(choice: Option<&Value>, parallel: Option<bool>) -> Result<Option<Value>, BackendError> {
    let mut mapped = match choice {
        None if parallel == Some(false) => json!({"type": "auto"}),
        None => return Ok(None),
        Some(Value::String(mode)) => match mode.as_str() {
            "auto" => json!({"type": "auto"}),
            "required" => json!({"type": "any"}),
            "none" => json!({"type": "none"}),
            other => return Err(BackendError::invalid_param("tool_choice", format!("unknown tool_choice {other:?}"))),
        },
        Some(object) => match object.pointer("/function/name").and_then(Value::as_str) {
            Some(name) => json!({"type": "tool", "name": name}),
            None => return Err(BackendError::invalid_param("tool_choice", "expected {\"function\": {\"name\": ...}}")),
        },
    };
    if parallel == Some(false)
        && mapped["type"] != "none"
        && let Some(object) = mapped.as_object_mut()
    {
        object.insert("disable_parallel_tool_use".into(), json!(true));
    }
    Ok(Some(mapped))
}

/// Anthropic's `stop_reason` as an OpenAI finish reason.
fn finish_reason(stop_reason: Option<&str>) -> Option<FinishReason> {
    Some(match stop_reason? {
        "max_tokens" | "model_context_window_exceeded" => FinishReason::Length,
        "tool_use" => FinishReason::ToolCalls,
        "refusal" => FinishReason::ContentFilter,
        _ => FinishReason::Stop,
    })
}

/// Anthropic's usage: prompt tokens include cache writes and reads.
fn usage(value: &Value) -> Usage {
    let count =
        |field: &str| value.get(field).and_then(Value::as_u64).map_or(0, |count| count.min(u64::from(u32::MAX)) as u32);
    let prompt = count("input_tokens")
        .saturating_add(count("cache_creation_input_tokens"))
        .saturating_add(count("cache_read_input_tokens"));
    Usage::new(prompt, count("output_tokens"))
}

/// Maps a Messages answer to a chat completion.
pub(crate) fn parse_response(body: &[u8], served_as: &str) -> Result<ChatCompletionResponse, BackendError> {
    let value: Value = serde_json::from_slice(body).map_err(|error| malformed("Messages answer", error))?;
    let Some(content) = value.get("content").and_then(Value::as_array) else {
        return Err(malformed("Messages answer", "no `content` array"));
    };
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for block in content {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or_default()),
            Some("tool_use") => tool_calls.push(ToolCall {
                id: block.get("id").and_then(Value::as_str).unwrap_or_default().to_owned(),
                kind: "function".to_owned(),
                function: FunctionCall {
                    name: block.get("name").and_then(Value::as_str).unwrap_or_default().to_owned(),
                    arguments: block.get("input").map_or_else(|| "{}".to_owned(), Value::to_string),
                },
            }),
            // Thinking, redacted thinking, server tool blocks: not part of an OpenAI answer.
            _ => {}
        }
    }
    let message = AssistantMessage {
        role: Role::Assistant,
        content: (!text.is_empty() || tool_calls.is_empty()).then_some(text),
        tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
        refusal: None,
    };
    let choice = ChatChoice {
        index: 0,
        message,
        logprobs: None,
        finish_reason: finish_reason(value.get("stop_reason").and_then(Value::as_str)).or(Some(FinishReason::Stop)),
    };
    let id = value.get("id").and_then(Value::as_str).unwrap_or("msg");
    let usage = value.get("usage").map(usage).unwrap_or_default();
    Ok(ChatCompletionResponse::new(format!("chatcmpl-{id}"), served_as, vec![choice], Some(usage)))
}

/// Turns the named SSE events of a streamed Messages answer into OpenAI chunks.
#[derive(Debug)]
pub(crate) struct StreamTranslator {
    id: String,
    created: u64,
    served_as: String,
    usage: Usage,
    /// Anthropic content-block index -> OpenAI tool-call index, for `tool_use` blocks.
    tool_blocks: Vec<(u64, u32)>,
    finished: bool,
}

/// What an event means for the client.
#[derive(Debug)]
pub(crate) enum Translated {
    /// Chunks to send (possibly none, for `ping` and block stops).
    Chunks(Vec<ChatCompletionChunk>),
    /// `message_stop`: the answer is complete after these last chunks.
    Stop(Vec<ChatCompletionChunk>),
}

impl StreamTranslator {
    pub(crate) fn new(served_as: &str) -> Self {
        Self {
            id: format!("chatcmpl-{:016x}", fastrand::u64(..)),
            created: nstream_backend::unix_timestamp(),
            served_as: served_as.to_owned(),
            usage: Usage::default(),
            tool_blocks: Vec::new(),
            finished: false,
        }
    }

    /// The usage chunk that ends a stream when the client asked for it.
    pub(crate) fn usage_chunk(&self) -> ChatCompletionChunk {
        let mut chunk = ChatCompletionChunk::new(&self.id, self.created, &self.served_as, Vec::new());
        chunk.usage = Some(self.usage);
        chunk
    }

    fn chunk(&self, delta: ChatDelta, finish_reason: Option<FinishReason>) -> ChatCompletionChunk {
        ChatCompletionChunk::new(
            &self.id,
            self.created,
            &self.served_as,
            vec![ChatChunkChoice { index: 0, delta, logprobs: None, finish_reason }],
        )
    }

    /// Translates one event. `error` events become the provider's error.
    pub(crate) fn translate(&mut self, event: &str, data: &str) -> Result<Translated, BackendError> {
        let value: Value = match event {
            "ping" => return Ok(Translated::Chunks(Vec::new())),
            _ => serde_json::from_str(data).map_err(|error| malformed("stream event", error))?,
        };
        let kind = value.get("type").and_then(Value::as_str).unwrap_or(event);
        let chunks = match kind {
            "message_start" => {
                let message = value.get("message").unwrap_or(&Value::Null);
                if let Some(id) = message.get("id").and_then(Value::as_str) {
                    self.id = format!("chatcmpl-{id}");
                }
                if let Some(start_usage) = message.get("usage") {
                    self.usage = usage(start_usage);
                }
                vec![self.chunk(
                    ChatDelta { role: Some(Role::Assistant), content: Some(String::new()), ..ChatDelta::default() },
                    None,
                )]
            }
            "content_block_start" => {
                let block = value.get("content_block").unwrap_or(&Value::Null);
                let index = value.get("index").and_then(Value::as_u64).unwrap_or(0);
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        let tool_index = self.tool_blocks.len() as u32;
                        self.tool_blocks.push((index, tool_index));
                        let call = json!({
                            "index": tool_index, "id": block.get("id").cloned().unwrap_or(Value::Null), "type": "function",
                            "function": {"name": block.get("name").cloned().unwrap_or(Value::Null), "arguments": ""}
                        });
                        vec![self.chunk(ChatDelta { tool_calls: Some(vec![call]), ..ChatDelta::default() }, None)]
                    }
                    Some("text") => match block.get("text").and_then(Value::as_str) {
                        Some(text) if !text.is_empty() => {
                            vec![self.chunk(ChatDelta { content: Some(text.to_owned()), ..ChatDelta::default() }, None)]
                        }
                        _ => Vec::new(),
                    },
                    _ => Vec::new(),
                }
            }
            "content_block_delta" => {
                let delta = value.get("delta").unwrap_or(&Value::Null);
                let index = value.get("index").and_then(Value::as_u64).unwrap_or(0);
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        let text = delta.get("text").and_then(Value::as_str).unwrap_or_default();
                        vec![self.chunk(ChatDelta { content: Some(text.to_owned()), ..ChatDelta::default() }, None)]
                    }
                    Some("input_json_delta") => {
                        let tool_index =
                            self.tool_blocks.iter().find(|(block, _)| *block == index).map_or(0, |(_, tool)| *tool);
                        let partial = delta.get("partial_json").and_then(Value::as_str).unwrap_or_default();
                        let call = json!({"index": tool_index, "function": {"arguments": partial}});
                        vec![self.chunk(ChatDelta { tool_calls: Some(vec![call]), ..ChatDelta::default() }, None)]
                    }
                    // thinking_delta, signature_delta, citations: no OpenAI counterpart.
                    _ => Vec::new(),
                }
            }
            "message_delta" => {
                if let Some(delta_usage) = value.get("usage") {
                    let update = usage(delta_usage);
                    // message_delta carries cumulative output tokens (and, lately, input tokens too).
                    self.usage.completion_tokens = update.completion_tokens;
                    if update.prompt_tokens > 0 {
                        self.usage.prompt_tokens = update.prompt_tokens;
                    }
                    self.usage = Usage::new(self.usage.prompt_tokens, self.usage.completion_tokens);
                }
                let reason = finish_reason(value.pointer("/delta/stop_reason").and_then(Value::as_str));
                match reason {
                    Some(reason) => {
                        self.finished = true;
                        vec![self.chunk(ChatDelta::default(), Some(reason))]
                    }
                    None => Vec::new(),
                }
            }
            "message_stop" => {
                let mut last = Vec::new();
                if !self.finished {
                    self.finished = true;
                    last.push(self.chunk(ChatDelta::default(), Some(FinishReason::Stop)));
                }
                return Ok(Translated::Stop(last));
            }
            "error" => {
                let error = ProviderError::parse(data.as_bytes());
                let status = match error.error_type.as_deref() {
                    Some("overloaded_error") => 529,
                    Some("rate_limit_error") => 429,
                    Some("api_error") => 500,
                    Some("timeout_error") => 504,
                    Some("invalid_request_error") => 400,
                    Some("authentication_error") => 401,
                    Some("permission_error") => 403,
                    Some("not_found_error") => 404,
                    Some("request_too_large") => 413,
                    _ => 502,
                };
                return Err(BackendError::Upstream { status, message: error.describe(), retry_after: None });
            }
            // content_block_stop and event types added later.
            _ => Vec::new(),
        };
        Ok(Translated::Chunks(chunks))
    }
}

#[cfg(test)]
mod tests {
    use nstream_backend::chat::{ChatMessage, ImageUrl};

    use super::*;

    fn wire() -> AnthropicWire {
        AnthropicWire {
            endpoint: "https://api.anthropic.com".into(),
            model: "claude-sonnet-4-5".into(),
            version: "2023-06-01".into(),
            default_max_tokens: 1024,
        }
    }

    #[test]
    fn maps_system_tools_images_and_alternation() {
        let mut assistant = ChatMessage::new(Role::Assistant, "let me look");
        assistant.tool_calls = Some(vec![ToolCall {
            id: "call_1".into(),
            kind: "function".into(),
            function: FunctionCall { name: "weather".into(), arguments: r#"{"city":"Paris"}"#.into() },
        }]);
        let mut tool_answer = ChatMessage::new(Role::Tool, "sunny");
        tool_answer.tool_call_id = Some("call_1".into());
        let mut picture = ChatMessage::new(Role::User, "");
        picture.content = Some(MessageContent::Parts(vec![
            ContentPart::Text { text: "and this?".into() },
            ContentPart::ImageUrl { image_url: ImageUrl { url: "data:image/png;base64,AAAA".into(), detail: None } },
        ]));
        let request = ChatCompletionRequest {
            temperature: Some(1.5),
            tools: Some(vec![
                json!({"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}),
            ]),
            tool_choice: Some(json!("required")),
            parallel_tool_calls: Some(false),
            ..ChatCompletionRequest::new(
                "served",
                vec![
                    ChatMessage::new(Role::System, "be brief"),
                    ChatMessage::new(Role::User, "weather?"),
                    assistant,
                    tool_answer,
                    picture,
                ],
            )
        };
        let body = wire().body(&request, true).expect("maps");
        assert_eq!(body["system"], "be brief");
        assert_eq!(body["max_tokens"], 1024);
        assert_eq!(body["temperature"], 1.0);
        assert_eq!(body["stream"], true);
        assert_eq!(body["tool_choice"], json!({"type": "any", "disable_parallel_tool_use": true}));
        assert_eq!(body["tools"][0], json!({"name": "weather", "input_schema": {"type": "object"}}));
        let messages = body["messages"].as_array().expect("array");
        assert_eq!(messages.len(), 3, "tool result and next user turn merge: {messages:?}");
        assert_eq!(
            messages[1]["content"][1],
            json!({"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}})
        );
        assert_eq!(
            messages[2]["content"][0],
            json!({"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"})
        );
        assert_eq!(
            messages[2]["content"][2]["source"],
            json!({"type": "base64", "media_type": "image/png", "data": "AAAA"})
        );
    }

    #[test]
    fn rejects_what_anthropic_cannot_do() {
        let request = ChatCompletionRequest {
            n: Some(2),
            ..ChatCompletionRequest::new("m", vec![ChatMessage::new(Role::User, "x")])
        };
        assert_eq!(wire().body(&request, false).unwrap_err().param(), Some("n"));
        let only_system = ChatCompletionRequest::new("m", vec![ChatMessage::new(Role::System, "x")]);
        assert_eq!(wire().body(&only_system, false).unwrap_err().param(), Some("messages"));
        let base = || ChatCompletionRequest::new("m", vec![ChatMessage::new(Role::User, "x")]);
        let biased = ChatCompletionRequest { logit_bias: Some([("50".to_owned(), 5.0)].into()), ..base() };
        let error = wire().body(&biased, false).unwrap_err();
        assert_eq!(error.param(), Some("logit_bias"));
        assert!(error.to_string().contains("Anthropic cannot honour"), "{error}");
        let json_mode = ChatCompletionRequest { response_format: Some(json!({"type": "json_object"})), ..base() };
        assert_eq!(wire().body(&json_mode, false).unwrap_err().param(), Some("response_format"));
        let mut unknown = base();
        unknown.extra.insert("service_tier".into(), json!("flex"));
        let error = wire().body(&unknown, false).unwrap_err();
        assert_eq!(error.param(), Some("service_tier"));
        assert!(error.to_string().contains("`service_tier`"), "{error}");
    }

    #[test]
    fn responses_become_chat_completions_with_usage() {
        let body = br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude","content":[{"type":"text","text":"Hi"},{"type":"tool_use","id":"toolu_1","name":"f","input":{"a":1}}],"stop_reason":"tool_use","stop_sequence":null,"usage":{"input_tokens":10,"cache_read_input_tokens":5,"output_tokens":3}}"#;
        let response = parse_response(body, "served").expect("parses");
        assert_eq!(response.model, "served");
        assert_eq!(response.choices[0].finish_reason, Some(FinishReason::ToolCalls));
        assert_eq!(response.choices[0].message.content.as_deref(), Some("Hi"));
        assert_eq!(response.choices[0].message.tool_calls.as_ref().expect("calls")[0].function.arguments, r#"{"a":1}"#);
        assert_eq!(response.usage, Some(Usage::new(15, 3)));
        assert!(parse_response(b"{}", "m").is_err());
    }
}
