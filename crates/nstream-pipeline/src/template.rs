//! From an input record to the chat messages sent upstream: a minijinja template that renders the
//! user message, or, without one, the record's `messages`, `prompt` or `text` field.
//!
//! Templates are strict: a variable the record lacks is an error naming the missing fields, not
//! an empty string silently sent to a paid model. Rendering is bounded by minijinja's fuel, so a
//! template cannot loop forever.

use std::collections::BTreeSet;

use minijinja::{Environment, UndefinedBehavior};
use nstream_backend::chat::{ChatMessage, Role};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::input::InputRecord;
use crate::key::sha256_hex;

/// Instructions of minijinja fuel one rendering may burn: generous for any real prompt.
const TEMPLATE_FUEL: u64 = 5_000_000;
const TEMPLATE_NAME: &str = "prompt";

/// Turns records into the messages of a chat request.
pub struct PromptBuilder {
    environment: Option<Environment<'static>>,
    template_name: String,
    variables: BTreeSet<String>,
    system: Option<String>,
    hash: String,
}

impl std::fmt::Debug for PromptBuilder {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PromptBuilder")
            .field("template", &self.template_name)
            .field("system", &self.system.is_some())
            .field("hash", &self.hash)
            .finish()
    }
}

impl PromptBuilder {
    /// A builder over an optional template (`name` is shown in errors, usually the file name) and
    /// an optional system message.
    pub fn new(template: Option<(&str, &str)>, system: Option<&str>) -> Result<Self> {
        let system = system.map(str::to_owned);
        let hash = sha256_hex(format!(
            "template:{}\nsystem:{}",
            template.map_or("<field>", |(_, source)| source),
            system.as_deref().unwrap_or("<none>")
        ));
        let Some((name, source)) = template else {
            return Ok(Self {
                environment: None,
                template_name: "(none)".to_owned(),
                variables: BTreeSet::new(),
                system,
                hash,
            });
        };
        let mut environment = Environment::new();
        environment.set_undefined_behavior(UndefinedBehavior::Strict);
        environment.set_fuel(Some(TEMPLATE_FUEL));
        environment
            .add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|error| Error::Template { name: name.to_owned(), message: describe(&error) })?;
        let variables = environment
            .get_template(TEMPLATE_NAME)
            .map(|template| template.undeclared_variables(false).into_iter().collect())
            .unwrap_or_default();
        Ok(Self { environment: Some(environment), template_name: name.to_owned(), variables, system, hash })
    }

    /// A hash of the template text and the system message: part of every item key.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The messages for one record, or why the record cannot be rendered.
    pub fn render(&self, record: &InputRecord) -> std::result::Result<Vec<ChatMessage>, String> {
        let mut messages = Vec::new();
        if let Some(system) = &self.system {
            messages.push(ChatMessage::new(Role::System, system.clone()));
        }
        match &self.environment {
            Some(environment) => {
                let user = self.render_template(environment, record)?;
                if user.trim().is_empty() {
                    return Err(format!("template {} rendered an empty prompt", self.template_name));
                }
                messages.push(ChatMessage::new(Role::User, user));
            }
            None => messages = fields_to_messages(record, messages)?,
        }
        Ok(messages)
    }

    fn render_template(
        &self,
        environment: &Environment<'static>,
        record: &InputRecord,
    ) -> std::result::Result<String, String> {
        let mut context = match &record.value {
            Value::Object(map) => map.clone(),
            _ => serde_json::Map::new(),
        };
        context.entry("record").or_insert_with(|| record.value.clone());
        context.entry("line").or_insert_with(|| Value::from(record.line));
        context.entry("id").or_insert_with(|| Value::String(record.id.clone()));
        let template = environment
            .get_template(TEMPLATE_NAME)
            .map_err(|error| format!("template {}: {}", self.template_name, describe(&error)))?;
        template.render(minijinja::value::Serde(Value::Object(context.clone()))).map_err(|error| {
            if error.kind() == minijinja::ErrorKind::UndefinedError {
                let missing: Vec<&str> =
                    self.variables.iter().filter(|name| !context.contains_key(*name)).map(String::as_str).collect();
                if !missing.is_empty() {
                    return format!(
                        "template {} uses {} that the record does not have (it has: {})",
                        self.template_name,
                        missing.iter().map(|name| format!("`{name}`")).collect::<Vec<_>>().join(", "),
                        field_names(&record.value)
                    );
                }
            }
            format!("template {}: {}", self.template_name, describe(&error))
        })
    }
}

fn field_names(value: &Value) -> String {
    match value {
        Value::Object(map) if !map.is_empty() => {
            // Sorted: the record's order depends on serde_json's features, a message should not.
            let mut names: Vec<&str> = map.keys().map(String::as_str).collect();
            names.sort_unstable();
            names.join(", ")
        }
        _ => "no fields".to_owned(),
    }
}

/// minijinja's message with the template line, without the multi-line source excerpt.
fn describe(error: &minijinja::Error) -> String {
    let detail = error.detail().map(|detail| format!(": {detail}")).unwrap_or_default();
    match error.line() {
        Some(line) => format!("line {line}: {}{detail}", error.kind()),
        None => format!("{}{detail}", error.kind()),
    }
}

fn fields_to_messages(
    record: &InputRecord,
    mut messages: Vec<ChatMessage>,
) -> std::result::Result<Vec<ChatMessage>, String> {
    let value = &record.value;
    if let Some(list) = value.get("messages") {
        let parsed: Vec<ChatMessage> = serde_json::from_value(list.clone())
            .map_err(|error| format!("field `messages` is not a list of chat messages: {error}"))?;
        if parsed.is_empty() {
            return Err("field `messages` is empty".to_owned());
        }
        let has_system = parsed.iter().any(|message| matches!(message.role, Role::System | Role::Developer));
        if has_system {
            messages.clear();
        }
        messages.extend(parsed.into_iter().map(|message| ChatMessage::new(message.role, message.text())));
        return Ok(messages);
    }
    for field in ["prompt", "text"] {
        match value.get(field) {
            Some(Value::String(text)) if !text.trim().is_empty() => {
                messages.push(ChatMessage::new(Role::User, text.clone()));
                return Ok(messages);
            }
            Some(Value::String(_)) => return Err(format!("field `{field}` is empty")),
            Some(_) => return Err(format!("field `{field}` is not a string")),
            None => {}
        }
    }
    Err(format!(
        "no template was given and the record has no `prompt`, `messages` or `text` field (it has: {})",
        field_names(value)
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn record(value: Value) -> InputRecord {
        InputRecord { line: 3, id: "3".into(), value }
    }

    fn texts(messages: &[ChatMessage]) -> Vec<(Role, String)> {
        messages.iter().map(|message| (message.role, message.text())).collect()
    }

    #[test]
    fn a_template_renders_record_fields_and_the_system_message_comes_first() {
        let builder = PromptBuilder::new(
            Some(("q.j2", "Q{{ line }}: {{ question | upper }}{% if hint %} ({{ hint }}){% endif %}")),
            Some("Be brief."),
        )
        .expect("compiles");
        let messages = builder.render(&record(json!({"question": "why?", "hint": "sky"}))).expect("renders");
        assert_eq!(texts(&messages), [(Role::System, "Be brief.".into()), (Role::User, "Q3: WHY? (sky)".into())]);
    }

    #[test]
    fn a_missing_variable_names_the_field_and_what_the_record_has() {
        let builder = PromptBuilder::new(Some(("q.j2", "Answer: {{ question }}")), None).expect("compiles");
        let error = builder.render(&record(json!({"prompt": "x", "other": 1}))).expect_err("missing");
        assert!(error.contains("`question`"), "{error}");
        assert!(error.contains("it has: other, prompt"), "{error}");
    }

    #[test]
    fn a_template_syntax_error_names_the_file_and_line() {
        let error = PromptBuilder::new(Some(("bad.j2", "line one\n{{ question ")), None).expect_err("syntax");
        let message = error.to_string();
        assert!(message.starts_with("template bad.j2: line 2"), "{message}");
        let error = PromptBuilder::new(Some(("bad.j2", "{% for x in %}")), None).expect_err("syntax");
        assert!(error.to_string().contains("syntax error"), "{error}");
    }

    #[test]
    fn an_endless_template_runs_out_of_fuel_instead_of_hanging() {
        let source = "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}";
        let builder = PromptBuilder::new(Some(("loop.j2", source)), None).expect("compiles");
        let error = builder.render(&record(json!({}))).expect_err("fuel");
        assert!(error.contains("fuel"), "{error}");
    }

    #[test]
    fn without_a_template_messages_prompt_or_text_is_used() {
        let builder = PromptBuilder::new(None, Some("sys")).expect("builder");
        let from_prompt = builder.render(&record(json!({"prompt": "hello"}))).expect("prompt");
        assert_eq!(texts(&from_prompt), [(Role::System, "sys".into()), (Role::User, "hello".into())]);
        let from_text = builder.render(&record(json!({"text": "line"}))).expect("text");
        assert_eq!(from_text.len(), 2);
        let own_system = builder
            .render(&record(
                json!({"messages": [{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}]}),
            ))
            .expect("messages");
        assert_eq!(texts(&own_system), [(Role::System, "mine".into()), (Role::User, "q".into())]);
        let error = builder.render(&record(json!({"question": "q"}))).expect_err("no field");
        assert!(error.contains("no `prompt`, `messages` or `text` field (it has: question)"), "{error}");
        assert!(builder.render(&record(json!({"prompt": 3}))).expect_err("type").contains("not a string"));
        assert!(builder.render(&record(json!({"messages": []}))).expect_err("empty").contains("empty"));
    }

    #[test]
    fn the_hash_follows_template_and_system() {
        let hash = |template: Option<(&str, &str)>, system| {
            PromptBuilder::new(template, system).expect("ok").hash().to_owned()
        };
        assert_eq!(hash(Some(("a", "x")), None), hash(Some(("b", "x")), None));
        assert_ne!(hash(Some(("a", "x")), None), hash(Some(("a", "y")), None));
        assert_ne!(hash(None, None), hash(None, Some("s")));
    }
}
