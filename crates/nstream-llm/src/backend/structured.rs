//! Structured output: `response_format`, `tools` + `tool_choice` read from a chat request into
//! constraints and a tool plan, tool calls parsed out of answers (whole or streamed), and log
//! probabilities in OpenAI's shapes.

use nstream_backend::chat::{ContentPart, FunctionCall, MessageContent, ToolCall};
use nstream_backend::{ChatCompletionRequest, CompletionRequest};
use serde_json::{Value, json};

use crate::constrained::{Constraint, ConstraintEngine};
use crate::error::{Error, Result};
use crate::scheduler::TokenLogprob;
use crate::template::ToolSyntax;

/// A function the model may call.
#[derive(Clone, Debug)]
pub(super) struct Tool {
    pub(super) name: String,
    pub(super) parameters: Value,
}

/// What `tool_choice` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum ToolMode {
    /// The model decides; calls in its answer are parsed out.
    Auto,
    /// The answer is one call to one of the tools (constrained).
    Required,
    /// The answer is one call to this tool (constrained).
    Named(String),
}

/// The tools of a request and how the answer must use them.
#[derive(Clone, Debug)]
pub(super) struct ToolPlan {
    pub(super) tools: Vec<Tool>,
    pub(super) mode: ToolMode,
    pub(super) syntax: ToolSyntax,
}

/// A name OpenAI accepts for a function.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Reads `tools` and `tool_choice`; each tool's parameters are compiled once to check them.
/// `None` when there are no tools or `tool_choice` is `none` (the tools are then not shown).
pub(super) fn tool_plan(
    request: &ChatCompletionRequest,
    engine: Option<&ConstraintEngine>,
    syntax: ToolSyntax,
) -> Result<Option<ToolPlan>> {
    let tools = request.tools.as_deref().unwrap_or_default();
    let mode = match &request.tool_choice {
        None => (!tools.is_empty()).then_some(ToolMode::Auto),
        Some(Value::String(choice)) => match choice.as_str() {
            "none" => None,
            "auto" => Some(ToolMode::Auto),
            "required" => Some(ToolMode::Required),
            other => {
                return Err(Error::invalid_param(
                    "tool_choice",
                    format!("`tool_choice` must be \"none\", \"auto\", \"required\" or a function, not {other:?}"),
                ));
            }
        },
        Some(choice @ Value::Object(_)) => match choice.pointer("/function/name").and_then(Value::as_str) {
            Some(name) if choice.get("type").and_then(Value::as_str) == Some("function") => {
                Some(ToolMode::Named(name.to_owned()))
            }
            _ => {
                return Err(Error::invalid_param(
                    "tool_choice",
                    "a named `tool_choice` is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                ));
            }
        },
        Some(_) => return Err(Error::invalid_param("tool_choice", "`tool_choice` must be a string or an object")),
    };
    let Some(mode) = mode else {
        return Ok(None);
    };
    if tools.is_empty() {
        return Err(Error::invalid_param("tool_choice", "`tool_choice` needs `tools`"));
    }
    let mut parsed: Vec<Tool> = Vec::with_capacity(tools.len());
    for (index, tool) in tools.iter().enumerate() {
        let param = |field: &str| format!("tools[{index}]{field}");
        if tool.get("type").and_then(Value::as_str) != Some("function") {
            return Err(Error::invalid_param(param(".type"), "only tools of type \"function\" are supported"));
        }
        let name = tool.pointer("/function/name").and_then(Value::as_str).unwrap_or_default();
        if !valid_name(name) {
            return Err(Error::invalid_param(
                param(".function.name"),
                format!("a function name is 1 to 64 letters, digits, `_` or `-`, not {name:?}"),
            ));
        }
        if parsed.iter().any(|other| other.name == name) {
            return Err(Error::invalid_param(
                param(".function.name"),
                format!("the function {name:?} is defined twice"),
            ));
        }
        let parameters = tool
            .pointer("/function/parameters")
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        if !parameters.is_object() {
            return Err(Error::invalid_param(
                param(".function.parameters"),
                "`parameters` must be a JSON Schema object",
            ));
        }
        if let Some(engine) = engine {
            // Compiling is the check: a malformed or unsupported schema is refused here.
            engine.json_schema(&parameters, &param(".function.parameters"))?;
        }
        parsed.push(Tool { name: name.to_owned(), parameters });
    }
    if let ToolMode::Named(name) = &mode
        && !parsed.iter().any(|tool| &tool.name == name)
    {
        return Err(Error::invalid_param(
            "tool_choice",
            format!("`tool_choice` names {name:?}, which is not in `tools`"),
        ));
    }
    Ok(Some(ToolPlan { tools: parsed, mode, syntax }))
}

/// Rewrites every local `$ref` of `schema` as if it were stored at `#/$defs/{key}`.
fn rebase_refs(schema: &mut Value, key: &str) {
    match schema {
        Value::Object(map) => {
            for (name, value) in map.iter_mut() {
                if name == "$ref"
                    && let Value::String(reference) = value
                    && let Some(rest) = reference.strip_prefix('#')
                {
                    *reference = format!("#/$defs/{key}{rest}");
                } else {
                    rebase_refs(value, key);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| rebase_refs(item, key)),
        _ => {}
    }
}

impl ToolPlan {
    /// The constraint of `required` or a named choice (one call), `None` for `auto`.
    pub(super) fn constraint(&self, engine: &ConstraintEngine) -> Result<Option<Constraint>> {
        let allowed: Vec<&Tool> = match &self.mode {
            ToolMode::Auto => return Ok(None),
            ToolMode::Required => self.tools.iter().collect(),
            ToolMode::Named(name) => self.tools.iter().filter(|tool| &tool.name == name).collect(),
        };
        let arguments_key = match self.syntax {
            ToolSyntax::Hermes => "arguments",
            ToolSyntax::Llama3Json => "parameters",
        };
        let mut definitions = serde_json::Map::new();
        let mut choices = Vec::new();
        for (index, tool) in allowed.iter().enumerate() {
            let key = format!("nstream_tool_{index}");
            let mut parameters = tool.parameters.clone();
            rebase_refs(&mut parameters, &key);
            definitions.insert(key.clone(), parameters);
            choices.push(json!({
                "type": "object",
                "properties": {"name": {"const": tool.name}, arguments_key: {"$ref": format!("#/$defs/{key}")}},
                "required": ["name", arguments_key],
                "additionalProperties": false,
            }));
        }
        let schema = json!({
            "anyOf": choices,
            "$defs": definitions,
            "x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "},
        });
        let grammar = match self.syntax {
            ToolSyntax::Hermes => format!("start: \"<tool_call>\\n\" %json {schema} \"\\n</tool_call>\""),
            ToolSyntax::Llama3Json => format!("start: %json {schema}"),
        };
        engine.lark(grammar, "tools").map(Some)
    }

    /// The system text that teaches a model whose template does not describe tools to call
    /// them (Qwen 2.5's wording, Hermes syntax).
    pub(super) fn system_prompt(&self, tools: &[Value]) -> String {
        let mut text = String::from(
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
             You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
        );
        for tool in tools {
            text.push('\n');
            text.push_str(&serde_json::to_string(tool).unwrap_or_default());
        }
        text.push_str(
            "\n</tools>\n\nFor each function call, return a json object with function name and arguments \
             within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \
             \"arguments\": <args-json-object>}\n</tool_call>",
        );
        text
    }

    /// Splits a whole answer into text and tool calls; an answer whose calls do not parse (or
    /// name no known tool) is all text, as vLLM's parsers do.
    pub(super) fn parse(&self, text: &str) -> (Option<String>, Vec<ToolCall>) {
        let known = |name: &str| self.tools.iter().any(|tool| tool.name == name);
        let parsed = match self.syntax {
            ToolSyntax::Hermes => parse_hermes(text, &known),
            ToolSyntax::Llama3Json => parse_llama3(text, &known),
        };
        match parsed {
            Some((content, calls)) if !calls.is_empty() => {
                let content = Some(content.trim().to_owned()).filter(|content| !content.is_empty());
                (content, calls)
            }
            _ => (Some(text.to_owned()), Vec::new()),
        }
    }
}

/// A fresh call id, `call_` and 24 hex digits as OpenAI's look.
pub(super) fn call_id() -> String {
    format!("call_{:016x}{:08x}", fastrand::u64(..), fastrand::u32(..))
}

/// One call's JSON (`{"name", "arguments" | "parameters"}`) as a [`ToolCall`].
fn call_from_json(value: &Value, known: &dyn Fn(&str) -> bool) -> Option<ToolCall> {
    let name = value.get("name")?.as_str()?;
    if !known(name) {
        return None;
    }
    let arguments = value.get("arguments").or_else(|| value.get("parameters")).cloned().unwrap_or(json!({}));
    let arguments = match arguments {
        // Some models write the arguments as a JSON string already.
        Value::String(text) => text,
        other => serde_json::to_string(&other).ok()?,
    };
    Some(ToolCall {
        id: call_id(),
        kind: "function".into(),
        function: FunctionCall { name: name.to_owned(), arguments },
    })
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";

/// `text <tool_call>{...}</tool_call> ...`: the text before the first call, and the calls.
fn parse_hermes(text: &str, known: &dyn Fn(&str) -> bool) -> Option<(String, Vec<ToolCall>)> {
    let start = text.find(HERMES_OPEN)?;
    let mut calls = Vec::new();
    let mut rest = &text[start..];
    while let Some(open) = rest.find(HERMES_OPEN) {
        let body_start = open + HERMES_OPEN.len();
        let (body, next) = match rest[body_start..].find(HERMES_CLOSE) {
            Some(close) => (&rest[body_start..body_start + close], &rest[body_start + close + HERMES_CLOSE.len()..]),
            None => (&rest[body_start..], ""),
        };
        let value: Value = serde_json::from_str(body.trim()).ok()?;
        calls.push(call_from_json(&value, known)?);
        rest = next;
    }
    Some((text[..start].to_owned(), calls))
}

/// `{"name": ..., "parameters": {...}}` (several joined by `;`), maybe after `<|python_tag|>`.
fn parse_llama3(text: &str, known: &dyn Fn(&str) -> bool) -> Option<(String, Vec<ToolCall>)> {
    let body = text.trim_start();
    let mut rest = body.strip_prefix("<|python_tag|>").unwrap_or(body).trim();
    if !rest.starts_with('{') {
        return None;
    }
    let mut calls = Vec::new();
    while !rest.is_empty() {
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let value = values.next()?.ok()?;
        calls.push(call_from_json(&value, known)?);
        rest = rest[values.byte_offset()..].trim_start();
        rest = rest.strip_prefix(';').unwrap_or(rest).trim_start();
    }
    Some((String::new(), calls))
}

/// The streamed form of tool-call parsing for one choice: text passes through until a call may
/// be starting; calls are sent whole once closed (or at the end).
#[derive(Debug, Default)]
pub(super) struct ToolStream {
    /// Text not yet sent: a possible start of a call, or a call being written.
    held: String,
    /// Inside a call (Hermes) or inside a JSON answer (Llama 3).
    in_call: bool,
    /// Whether any text has been seen (Llama 3 calls are the whole answer).
    started: bool,
    /// Calls sent so far.
    pub(super) calls: usize,
}

/// What a streamed piece turns into.
#[derive(Debug, Default)]
pub(super) struct ToolStreamOutput {
    pub(super) text: String,
    pub(super) calls: Vec<ToolCall>,
}

impl ToolStream {
    /// Takes new text; returns what can be sent now. `last` flushes everything.
    pub(super) fn push(&mut self, plan: &ToolPlan, piece: &str, last: bool) -> ToolStreamOutput {
        self.held.push_str(piece);
        let mut output = ToolStreamOutput::default();
        match plan.syntax {
            ToolSyntax::Llama3Json => {
                if !self.started {
                    let trimmed = self.held.trim_start();
                    if trimmed.is_empty() && !last {
                        return output;
                    }
                    self.started = true;
                    self.in_call = trimmed.starts_with('{') || trimmed.starts_with('<');
                }
                if !self.in_call {
                    output.text = std::mem::take(&mut self.held);
                } else if last {
                    let (content, calls) = plan.parse(&std::mem::take(&mut self.held));
                    output.text = content.unwrap_or_default();
                    output.calls = calls;
                }
            }
            ToolSyntax::Hermes => loop {
                if self.in_call {
                    let Some(close) = self.held.find(HERMES_CLOSE) else {
                        if last {
                            let block = std::mem::take(&mut self.held);
                            self.emit_block(plan, &block, &mut output);
                        }
                        break;
                    };
                    let end = close + HERMES_CLOSE.len();
                    let block: String = self.held.drain(..end).collect();
                    self.emit_block(plan, &block, &mut output);
                    self.in_call = false;
                    continue;
                }
                if let Some(open) = self.held.find(HERMES_OPEN) {
                    let before: String = self.held.drain(..open).collect();
                    // Text between calls (a newline) is not content.
                    if self.calls == 0 {
                        output.text.push_str(&before);
                    }
                    self.in_call = true;
                    continue;
                }
                // Hold back what may be the start of `<tool_call>`.
                let hold = if last {
                    0
                } else {
                    (1..HERMES_OPEN.len())
                        .rev()
                        .find(|&length| self.held.ends_with(&HERMES_OPEN[..length]))
                        .unwrap_or(0)
                };
                let cut = self.held.len() - hold;
                let text: String = self.held.drain(..cut).collect();
                if self.calls == 0 || !text.trim().is_empty() {
                    output.text.push_str(&text);
                }
                break;
            },
        }
        output
    }

    /// A whole `<tool_call>...</tool_call>` block: a call when it parses, else text.
    fn emit_block(&mut self, plan: &ToolPlan, block: &str, output: &mut ToolStreamOutput) {
        let (_, calls) = plan.parse(block);
        if calls.is_empty() {
            output.text.push_str(block);
        } else {
            self.calls += calls.len();
            output.calls.extend(calls);
        }
    }
}

/// The chat `logprobs` of some tokens: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
pub(super) fn chat_logprobs(bytes: &[Vec<u8>], tokens: &[TokenLogprob]) -> Value {
    let entry = |id: u32, logprob: f32| -> (String, Value, Value) {
        let token_bytes = bytes.get(id as usize).cloned().unwrap_or_default();
        let text = String::from_utf8_lossy(&token_bytes).into_owned();
        (text, json!(logprob_value(logprob)), json!(token_bytes))
    };
    let content: Vec<Value> = tokens
        .iter()
        .map(|token| {
            let (text, logprob, token_bytes) = entry(token.token, token.logprob);
            let top: Vec<Value> = token
                .top
                .iter()
                .map(|&(id, value)| {
                    let (text, logprob, token_bytes) = entry(id, value);
                    json!({"token": text, "logprob": logprob, "bytes": token_bytes})
                })
                .collect();
            json!({"token": text, "logprob": logprob, "bytes": token_bytes, "top_logprobs": top})
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// JSON has no infinity: OpenAI's floor for impossible tokens.
fn logprob_value(logprob: f32) -> f64 {
    if logprob.is_finite() { f64::from(logprob) } else { -9999.0 }
}

/// The legacy completions `logprobs` of some tokens, with text offsets from `offset`.
pub(super) fn completion_logprobs(bytes: &[Vec<u8>], tokens: &[TokenLogprob], offset: usize) -> Value {
    let text_of = |id: u32| String::from_utf8_lossy(bytes.get(id as usize).map_or(&[][..], Vec::as_slice)).into_owned();
    let mut position = offset;
    let mut offsets = Vec::with_capacity(tokens.len());
    for token in tokens {
        offsets.push(position);
        position += text_of(token.token).len();
    }
    json!({
        "tokens": tokens.iter().map(|token| text_of(token.token)).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|token| logprob_value(token.logprob)).collect::<Vec<_>>(),
        "top_logprobs": tokens
            .iter()
            .map(|token| {
                let map: serde_json::Map<String, Value> =
                    token.top.iter().map(|&(id, value)| (text_of(id), json!(logprob_value(value)))).collect();
                Value::Object(map)
            })
            .collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// Completions' `logprobs` with `echo`: the prompt's tokens first (the first has no log
/// probability, `null` as in OpenAI's answers), then the generated ones, whose offsets start at
/// `offset` (the echoed text's length).
pub(super) fn echo_logprobs(
    bytes: &[Vec<u8>],
    prompt: &[u32],
    prompt_logprobs: &[TokenLogprob],
    generated: &[TokenLogprob],
    offset: usize,
) -> Value {
    let Some(&first) = prompt.first() else {
        return completion_logprobs(bytes, generated, offset);
    };
    let first_length = bytes.get(first as usize).map_or(0, Vec::len);
    let first_text = String::from_utf8_lossy(bytes.get(first as usize).map_or(&[][..], Vec::as_slice)).into_owned();
    let mut whole =
        json!({"tokens": [first_text], "token_logprobs": [null], "top_logprobs": [null], "text_offset": [0]});
    for part in
        [completion_logprobs(bytes, prompt_logprobs, first_length), completion_logprobs(bytes, generated, offset)]
    {
        for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            if let (Some(list), Some(more)) = (whole[key].as_array_mut(), part[key].as_array()) {
                list.extend(more.iter().cloned());
            }
        }
    }
    whole
}

/// Refuses image, audio and file parts (this model reads text only), and the OpenAI fields it
/// cannot honour: audio output, legacy `functions`, web search.
pub(super) fn check_text_only(request: &ChatCompletionRequest) -> Result<()> {
    for (field, why) in [
        ("audio", "this model writes text only"),
        ("functions", "the legacy `functions` are not supported; use `tools`"),
        ("function_call", "the legacy `function_call` is not supported; use `tool_choice`"),
        ("web_search_options", "this model has no web search"),
    ] {
        if request.extra.get(field).is_some_and(|value| !value.is_null()) {
            return Err(Error::invalid_param(field, format!("`{field}`: {why}")));
        }
    }
    if let Some(modalities) = request.extra.get("modalities").and_then(Value::as_array)
        && modalities.iter().any(|modality| modality.as_str() != Some("text"))
    {
        return Err(Error::invalid_param("modalities", "this model writes text only: `modalities` must be [\"text\"]"));
    }
    for (index, message) in request.messages.iter().enumerate() {
        if let Some(MessageContent::Parts(parts)) = &message.content {
            for (part_index, part) in parts.iter().enumerate() {
                let kind = match part {
                    ContentPart::Text { .. } | ContentPart::Refusal { .. } => continue,
                    ContentPart::ImageUrl { .. } => "image_url",
                    ContentPart::InputAudio { .. } => "input_audio",
                    ContentPart::File { .. } => "file",
                };
                return Err(Error::invalid_param(
                    format!("messages[{index}].content[{part_index}]"),
                    format!("this model reads text only; `{kind}` content parts are not supported"),
                ));
            }
        }
    }
    Ok(())
}

/// The `response_format` constraint: `None` for text (or no field).
pub(super) fn response_constraint(
    format: Option<&Value>,
    engine: &dyn Fn() -> Result<std::sync::Arc<ConstraintEngine>>,
) -> Result<Option<Constraint>> {
    let Some(format) = format else {
        return Ok(None);
    };
    let kind = format.get("type").and_then(Value::as_str).unwrap_or_default();
    match kind {
        "text" => Ok(None),
        "json_object" => engine()?.json_object("response_format").map(Some),
        "json_schema" => {
            let schema = format.pointer("/json_schema/schema").ok_or_else(|| {
                Error::invalid_param("response_format.json_schema.schema", "`json_schema` needs a `schema`")
            })?;
            engine()?.json_schema(schema, "response_format.json_schema.schema").map(Some)
        }
        other => Err(Error::invalid_param(
            "response_format.type",
            format!("`response_format.type` must be \"text\", \"json_object\" or \"json_schema\", not {other:?}"),
        )),
    }
}

/// The log probabilities a chat request asks for: `Some(top)` when `logprobs` is true.
pub(super) fn chat_logprobs_count(request: &ChatCompletionRequest) -> Result<Option<usize>> {
    match (request.logprobs, request.top_logprobs) {
        (Some(true), top) => Ok(Some(top.unwrap_or(0) as usize)),
        (_, Some(top)) if top > 0 => {
            Err(Error::invalid_param("top_logprobs", "`top_logprobs` needs `logprobs` set to true"))
        }
        _ => Ok(None),
    }
}

/// The log probabilities a completion request asks for.
pub(super) fn completion_logprobs_count(request: &CompletionRequest) -> Option<usize> {
    request.logprobs.map(|count| count as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(syntax: ToolSyntax) -> ToolPlan {
        ToolPlan {
            tools: vec![Tool { name: "get_weather".into(), parameters: json!({"type": "object"}) }],
            mode: ToolMode::Auto,
            syntax,
        }
    }

    #[test]
    fn hermes_calls_are_parsed_and_unknown_ones_stay_text() {
        let plan = plan(ToolSyntax::Hermes);
        let (content, calls) = plan.parse(
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        );
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(calls[0].function.arguments, "{\"city\":\"Paris\"}");
        let text = "<tool_call>{\"name\": \"other\", \"arguments\": {}}</tool_call>";
        assert_eq!(plan.parse(text), (Some(text.to_owned()), Vec::new()));
        assert!(plan.parse("<tool_call>{not json</tool_call>").1.is_empty());
    }

    #[test]
    fn llama3_calls_are_parsed() {
        let plan = plan(ToolSyntax::Llama3Json);
        let (content, calls) = plan.parse(
            "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}; {\"name\": \"get_weather\", \"parameters\": {}}",
        );
        assert_eq!(content, None);
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].function.arguments, "{\"city\":\"Oslo\"}");
        assert!(plan.parse("The weather is fine.").1.is_empty());
    }

    #[test]
    fn streamed_hermes_calls_come_out_whole_and_text_passes_through() {
        let plan = plan(ToolSyntax::Hermes);
        let mut stream = ToolStream::default();
        let pieces =
            ["Sure", ". <tool", "_call>\n{\"name\": \"get_", "weather\", \"arguments\": {}}\n</tool_call>", ""];
        let mut text = String::new();
        let mut calls = Vec::new();
        for (index, piece) in pieces.iter().enumerate() {
            let output = stream.push(&plan, piece, index == pieces.len() - 1);
            text.push_str(&output.text);
            calls.extend(output.calls);
        }
        assert_eq!(text, "Sure. ");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].function.name, "get_weather");
    }

    #[test]
    fn refs_are_rebased_under_their_definition() {
        let mut schema = json!({"properties": {"a": {"$ref": "#/$defs/A"}, "b": {"$ref": "#"}}});
        rebase_refs(&mut schema, "tool");
        assert_eq!(schema["properties"]["a"]["$ref"], "#/$defs/tool/$defs/A");
        assert_eq!(schema["properties"]["b"]["$ref"], "#/$defs/tool");
    }

    #[test]
    fn log_softmax_and_top_entries() {
        let logits = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY];
        let result = crate::scheduler::token_logprob(&logits, 2, 2);
        let total: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        assert!((f64::from(result.logprob) - (2.0 - total.ln())).abs() < 1e-5);
        assert_eq!(result.top.iter().map(|&(id, _)| id).collect::<Vec<_>>(), [1, 2]);
    }
}
