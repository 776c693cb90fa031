//! Chat templates: the model's Jinja `tokenizer.chat_template` rendered with minijinja.
//!
//! Rendering follows transformers' `apply_chat_template`: `trim_blocks` and `lstrip_blocks` on,
//! the variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token` (and `tools` when
//! the request has them), a `raise_exception` function, and the Python string and dict methods
//! templates commonly call (`strip`, `startswith`, `items`...). A model without a template gets
//! ChatML, the format of SmolLM2, Qwen and many fine-tunes.

use minijinja::value::{Serde, Value, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind, State};
use nstream_backend::chat::{ChatMessage, Role};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::tokenizer::LlmTokenizer;

/// ChatML, used when the model file has no template.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat";

/// How a chat template's model writes a tool call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolSyntax {
    /// Hermes / Qwen 2.5: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one
    /// block per call. Also what a template without tool support is taught by nstream.
    Hermes,
    /// Llama 3.1 / 3.2: `{"name": ..., "parameters": {...}}` as the whole answer (JSON tool
    /// calling; `<|python_tag|>` may precede it).
    Llama3Json,
}

/// A compiled chat template.
pub struct ChatTemplate {
    environment: Environment<'static>,
    bos_token: String,
    eos_token: String,
    tool_syntax: ToolSyntax,
    renders_tools: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).finish_non_exhaustive()
    }
}

/// One message as templates see it: `content` is always a string.
#[derive(Serialize)]
struct TemplateMessage {
    role: &'static str,
    content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<String>,
}

fn role_name(role: Role) -> &'static str {
    match role {
        // Templates know `system`; OpenAI's newer `developer` role means the same.
        Role::System | Role::Developer => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

/// The Python methods chat templates call most, for values minijinja has no method for.
fn python_method(_state: &mut State, value: &Value, method: &str, args: &[Value]) -> Result<Value, JinjaError> {
    let text_arg = |index: usize| args.get(index).and_then(|arg| arg.as_str().map(str::to_owned));
    if let Some(text) = value.as_str() {
        let chars = text_arg(0);
        let trim_set = |c: char| chars.as_deref().map_or(c.is_whitespace(), |set| set.contains(c));
        return Ok(match method {
            "strip" => Value::from(text.trim_matches(trim_set)),
            "lstrip" => Value::from(text.trim_start_matches(trim_set)),
            "rstrip" => Value::from(text.trim_end_matches(trim_set)),
            "upper" => Value::from(text.to_uppercase()),
            "lower" => Value::from(text.to_lowercase()),
            "startswith" => Value::from(chars.is_some_and(|prefix| text.starts_with(&prefix))),
            "endswith" => Value::from(chars.is_some_and(|suffix| text.ends_with(&suffix))),
            "replace" => match (text_arg(0), text_arg(1)) {
                (Some(from), Some(to)) => Value::from(text.replace(&from, &to)),
                _ => return Err(JinjaError::new(ErrorKind::InvalidOperation, "replace needs two strings")),
            },
            "split" => match chars {
                Some(separator) if !separator.is_empty() => {
                    Value::from(text.split(separator.as_str()).map(Value::from).collect::<Vec<_>>())
                }
                _ => Value::from(text.split_whitespace().map(Value::from).collect::<Vec<_>>()),
            },
            _ => return Err(JinjaError::from(ErrorKind::UnknownMethod)),
        });
    }
    if value.kind() == ValueKind::Map {
        return match method {
            "items" => Ok(Value::from(
                value
                    .try_iter()?
                    .map(|key| {
                        let item = value.get_item(&key).unwrap_or_default();
                        Value::from(vec![key, item])
                    })
                    .collect::<Vec<_>>(),
            )),
            "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => Ok(Value::from(
                value.try_iter()?.map(|key| value.get_item(&key).unwrap_or_default()).collect::<Vec<_>>(),
            )),
            "get" => {
                let key = args.first().cloned().unwrap_or_default();
                let found = value.get_item(&key).unwrap_or_default();
                Ok(if found.is_undefined() { args.get(1).cloned().unwrap_or_default() } else { found })
            }
            _ => Err(JinjaError::from(ErrorKind::UnknownMethod)),
        };
    }
    Err(JinjaError::from(ErrorKind::UnknownMethod))
}

impl ChatTemplate {
    /// Compiles `source` (a Jinja chat template); `bos_token`/`eos_token` are the texts the
    /// template may refer to.
    pub fn new(source: &str, bos_token: impl Into<String>, eos_token: impl Into<String>) -> Result<Self> {
        let mut environment = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|error| Error::Template(error.to_string()))?;
        environment.set_syntax(syntax);
        environment.set_unknown_method_callback(python_method);
        environment.add_function("raise_exception", |message: String| -> Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, message))
        });
        // A template is data from a model file: bound its work so a hostile one cannot hang us.
        environment.set_fuel(Some(5_000_000));
        environment
            .add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|error| Error::Template(error.to_string()))?;
        // The call syntax is the one the template teaches the model (its own examples).
        let tool_syntax = if source.contains("<tool_call>") {
            ToolSyntax::Hermes
        } else if source.contains("<|python_tag|>") || (source.contains("ipython") && source.contains("parameters")) {
            ToolSyntax::Llama3Json
        } else {
            ToolSyntax::Hermes
        };
        let renders_tools = source.contains("tools");
        Ok(Self { environment, bos_token: bos_token.into(), eos_token: eos_token.into(), tool_syntax, renders_tools })
    }

    /// The syntax the model writes tool calls in.
    pub fn tool_syntax(&self) -> ToolSyntax {
        self.tool_syntax
    }

    /// Whether the template itself describes `tools` to the model (else nstream does, in a
    /// system message in the Hermes style).
    pub fn renders_tools(&self) -> bool {
        self.renders_tools
    }

    /// ChatML ([`CHATML_TEMPLATE`]).
    pub fn chatml() -> Result<Self> {
        Self::new(CHATML_TEMPLATE, "", "<|im_end|>")
    }

    /// A model's template: its own `source` (from `tokenizer_config.json`, `chat_template.jinja`
    /// or GGUF metadata), with the bos/eos texts its config names or else those of `tokenizer`'s
    /// special tokens; ChatML when the model has none. The one rule for serving and fine-tuning,
    /// so both render a conversation alike.
    pub fn for_model(
        source: Option<&str>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        tokenizer: &LlmTokenizer,
    ) -> Result<Self> {
        let token_text = |id: Option<u32>| id.and_then(|id| tokenizer.token(id)).unwrap_or_default().to_owned();
        match source {
            Some(source) => Self::new(
                source,
                bos_token.unwrap_or_else(|| token_text(tokenizer.bos_token())),
                eos_token.unwrap_or_else(|| token_text(tokenizer.eos_token())),
            ),
            None => Self::chatml(),
        }
    }

    /// Renders the conversation; with `add_generation_prompt` the text ends where the
    /// assistant's answer starts. `tools` are passed through for templates that describe them.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: Option<&[serde_json::Value]>,
    ) -> Result<String> {
        let messages: Vec<TemplateMessage> = messages
            .iter()
            .map(|message| TemplateMessage {
                role: role_name(message.role),
                content: message.text(),
                name: message.name.clone(),
                tool_calls: message.tool_calls.as_ref().and_then(|calls| serde_json::to_value(calls).ok()),
                tool_call_id: message.tool_call_id.clone(),
            })
            .collect();
        let template =
            self.environment.get_template(TEMPLATE_NAME).map_err(|error| Error::Template(error.to_string()))?;
        template
            .render(minijinja::context! {
                messages => Value::from(Serde(&messages)),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
                tools => tools.map(|tools| Value::from(Serde(tools))),
            })
            .map_err(|error| Error::Template(error.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_smollm2_with_its_default_system_prompt() {
        let template = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let text = template.render(&[ChatMessage::new(Role::User, "Hi")], true, None).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let messages = [
            ChatMessage::new(Role::Developer, "Be brief."),
            ChatMessage::new(Role::User, "Hi"),
            ChatMessage::new(Role::Assistant, "Hello!"),
            ChatMessage::new(Role::User, "Bye"),
        ];
        let text = template.render(&messages, false, None).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        );
    }

    #[test]
    fn python_methods_exceptions_and_block_trimming_work() {
        let source = "{% for message in messages %}\n  {% if message.role == 'system' %}{{ raise_exception('no system') }}{% endif %}\n{{ message.content.strip().upper() }}|{{ message.content.startswith(' a') }}\n{% endfor %}";
        let template = ChatTemplate::new(source, "", "").unwrap();
        assert_eq!(template.render(&[ChatMessage::new(Role::User, " abc ")], false, None).unwrap(), "ABC|True\n");
        let error = template.render(&[ChatMessage::new(Role::System, "x")], false, None).unwrap_err();
        assert!(error.to_string().contains("no system"), "{error}");
    }

    #[test]
    fn bad_or_runaway_templates_are_errors_not_panics() {
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
        let endless = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert!(endless.render(&[], false, None).is_err());
        assert!(
            ChatTemplate::chatml()
                .unwrap()
                .render(&[ChatMessage::new(Role::User, "q")], true, None)
                .unwrap()
                .ends_with("<|im_start|>assistant\n")
        );
    }
}
