//! Checking answers: `--format json` wants a JSON value, `--schema` one that a JSON schema
//! accepts. A failed check is retried (bounded) and then recorded as a failure.

use serde_json::Value;

use crate::error::{Error, Result};

/// What an answer must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnswerFormat {
    /// Any non-empty text.
    #[default]
    Text,
    /// A JSON value (a ```json fence around it is removed).
    Json,
}

/// Checks answers against the format and an optional schema.
pub struct AnswerCheck {
    format: AnswerFormat,
    schema: Option<jsonschema::Validator>,
}

impl std::fmt::Debug for AnswerCheck {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("AnswerCheck")
            .field("format", &self.format)
            .field("schema", &self.schema.is_some())
            .finish()
    }
}

impl AnswerCheck {
    /// A check for `format`; a schema implies [`AnswerFormat::Json`].
    pub fn new(format: AnswerFormat, schema: Option<&Value>) -> Result<Self> {
        let schema = schema
            .map(|schema| jsonschema::validator_for(schema).map_err(|error| Error::Schema(error.to_string())))
            .transpose()?;
        let format = if schema.is_some() { AnswerFormat::Json } else { format };
        Ok(Self { format, schema })
    }

    /// The effective format.
    pub fn format(&self) -> AnswerFormat {
        self.format
    }

    /// The answer text to store (JSON answers without a code fence), or why it is not acceptable.
    pub fn check(&self, answer: &str) -> std::result::Result<String, String> {
        if answer.trim().is_empty() {
            return Err("the answer is empty".to_owned());
        }
        if self.format == AnswerFormat::Text {
            return Ok(answer.to_owned());
        }
        let text = strip_fence(answer);
        let value: Value = serde_json::from_str(text).map_err(|error| format!("the answer is not JSON: {error}"))?;
        if let Some(schema) = &self.schema
            && let Err(error) = schema.validate(&value)
        {
            let path = error.instance_path().to_string();
            let at = if path.is_empty() { "the answer".to_owned() } else { format!("answer{path}") };
            return Err(format!("the answer does not match the schema: {at}: {error}"));
        }
        Ok(text.to_owned())
    }
}

/// The inside of a Markdown code fence (```json ... ```), or the text trimmed.
pub(crate) fn strip_fence(answer: &str) -> &str {
    let trimmed = answer.trim();
    let Some(rest) = trimmed.strip_prefix("```") else { return trimmed };
    let Some(body) = rest.strip_suffix("```") else { return trimmed };
    let body = body.strip_prefix("json").or_else(|| body.strip_prefix("JSON")).unwrap_or(body);
    body.trim()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn text_answers_need_only_content() {
        let check = AnswerCheck::new(AnswerFormat::Text, None).expect("check");
        assert_eq!(check.check(" hi ").as_deref(), Ok(" hi "));
        assert!(check.check("  \n").expect_err("empty").contains("empty"));
    }

    #[test]
    fn json_answers_must_parse_and_fences_are_removed() {
        let check = AnswerCheck::new(AnswerFormat::Json, None).expect("check");
        assert_eq!(check.check("```json\n{\"a\": 1}\n```").as_deref(), Ok("{\"a\": 1}"));
        assert!(check.check("{\"a\": ").expect_err("truncated").starts_with("the answer is not JSON"));
    }

    #[test]
    fn schemas_name_the_failing_place_and_bad_schemas_are_refused() {
        let schema = json!({"type": "object", "required": ["label"], "properties": {"label": {"enum": ["yes", "no"]}}});
        let check = AnswerCheck::new(AnswerFormat::Text, Some(&schema)).expect("check");
        assert_eq!(check.format(), AnswerFormat::Json);
        assert!(check.check("{\"label\": \"yes\"}").is_ok());
        let error = check.check("{\"label\": \"maybe\"}").expect_err("enum");
        assert!(error.contains("answer/label"), "{error}");
        assert!(check.check("{}").expect_err("required").contains("label"));
        let bad = AnswerCheck::new(AnswerFormat::Json, Some(&json!({"type": 12}))).expect_err("bad schema");
        assert!(bad.to_string().starts_with("answer schema:"), "{bad}");
    }
}
