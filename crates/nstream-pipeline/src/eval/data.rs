//! The held-out set: one record per line, a prompt and the reference answer.
//!
//! Two layouts, the ones `nstream generate` and fine-tuning use: `{"messages": [...]}` whose last
//! message is the assistant's reference answer (the teacher's, from `generate`), and
//! `{"prompt": "...", "completion": "..."}`. An optional `id` (string or number) names the item in
//! the reports; otherwise its line number does.

use std::io::BufRead;
use std::path::Path;

use serde_json::{Value, json};

use crate::error::{Error, Result};

/// One held-out item.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalItem {
    /// The line of the data file (1-based).
    pub line: u64,
    /// The record's `id`, or its line number.
    pub id: String,
    /// The conversation up to the answer: system and user turns (and earlier turns), as OpenAI
    /// chat messages.
    pub messages: Vec<Value>,
    /// The reference answer.
    pub reference: String,
}

impl EvalItem {
    /// The last user message's text: what the question was, for judges and reports.
    pub fn question(&self) -> String {
        self.messages
            .iter()
            .rev()
            .find(|message| message["role"] == "user")
            .map(|message| content_text(&message["content"]))
            .unwrap_or_default()
    }
}

/// A message's text: a string, or the text parts of a content list.
pub(crate) fn content_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => {
            parts.iter().filter_map(|part| part.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("")
        }
        _ => String::new(),
    }
}

fn invalid(path: &Path, line: u64, message: impl Into<String>) -> Error {
    Error::BadInput { path: path.to_path_buf(), line, message: message.into() }
}

/// Reads every item of a held-out file; the first bad line is an error naming file:line.
pub fn read_items(path: &Path) -> Result<Vec<EvalItem>> {
    let file = std::fs::File::open(path).map_err(|cause| Error::io(path, cause))?;
    let mut items = Vec::new();
    for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
        let number = index as u64 + 1;
        let line = line.map_err(|cause| Error::io(path, cause))?;
        if line.trim().is_empty() {
            continue;
        }
        let record: Value = serde_json::from_str(&line)
            .map_err(|error| invalid(path, number, format!("not a JSON object ({error})")))?;
        items.push(parse_record(&record).map_err(|message| invalid(path, number, message)).map(
            |(id, messages, reference)| EvalItem {
                line: number,
                id: id.unwrap_or_else(|| number.to_string()),
                messages,
                reference,
            },
        )?);
    }
    if items.is_empty() {
        return Err(Error::InvalidData {
            path: path.to_path_buf(),
            message: "the file holds no record (expected JSONL with `messages` or `prompt`/`completion`)".to_owned(),
        });
    }
    Ok(items)
}

type Parsed = (Option<String>, Vec<Value>, String);

fn parse_record(record: &Value) -> std::result::Result<Parsed, String> {
    let Some(object) = record.as_object() else { return Err("expected a JSON object".to_owned()) };
    let id = match object.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id.clone()),
        Some(Value::Number(id)) => Some(id.to_string()),
        Some(other) => return Err(format!("`id` must be a string or a number, found {other}")),
    };
    if let Some(messages) = object.get("messages") {
        let Some(messages) = messages.as_array() else { return Err("`messages` must be a list".to_owned()) };
        let Some((last, prompt)) = messages.split_last() else { return Err("`messages` is empty".to_owned()) };
        if last.get("role").and_then(Value::as_str) != Some("assistant") {
            return Err("the last message must be the assistant's reference answer (role `assistant`)".to_owned());
        }
        for (index, message) in messages.iter().enumerate() {
            let role = message.get("role").and_then(Value::as_str);
            if !matches!(role, Some("system" | "user" | "assistant" | "developer" | "tool")) {
                return Err(format!("messages[{index}].role must be system, user or assistant, found {role:?}"));
            }
        }
        if !prompt.iter().any(|message| message["role"] == "user") {
            return Err("`messages` has no user turn before the reference answer".to_owned());
        }
        let reference = content_text(&last["content"]);
        if reference.trim().is_empty() {
            return Err("the reference answer (the last message's content) is empty".to_owned());
        }
        return Ok((id, prompt.to_vec(), reference));
    }
    match (object.get("prompt"), object.get("completion")) {
        (Some(Value::String(prompt)), Some(Value::String(completion))) if !completion.trim().is_empty() => {
            Ok((id, vec![json!({"role": "user", "content": prompt})], completion.clone()))
        }
        (Some(_), Some(_)) => Err("`prompt` and `completion` must be strings, the completion non-empty".to_owned()),
        _ => Err("expected `messages` (ending with the assistant's reference) or `prompt` and `completion`".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(lines: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), lines).expect("write");
        file
    }

    #[test]
    fn reads_both_layouts_with_ids_and_line_numbers() {
        let file = write(concat!(
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}"#,
            "\n\n",
            r#"{"id": 7, "prompt": "Capital of France?", "completion": "Paris"}"#,
            "\n"
        ));
        let items = read_items(file.path()).expect("reads");
        assert_eq!(items.len(), 2);
        assert_eq!((items[0].id.as_str(), items[0].line, items[0].reference.as_str()), ("1", 1, "4"));
        assert_eq!(items[0].messages.len(), 2);
        assert_eq!(items[0].question(), "2+2?");
        assert_eq!((items[1].id.as_str(), items[1].line), ("7", 3));
        assert_eq!(items[1].messages, vec![json!({"role": "user", "content": "Capital of France?"})]);
    }

    #[test]
    fn bad_records_name_file_line_and_what_is_wrong() {
        for (text, expected) in [
            ("not json\n", "1: not a JSON object"),
            (r#"{"messages": [{"role": "user", "content": "hi"}]}"#, "the last message must be the assistant's"),
            (r#"{"messages": [{"role": "assistant", "content": "x"}]}"#, "no user turn"),
            (r#"{"prompt": "hi"}"#, "expected `messages`"),
            (r#"{"prompt": "hi", "completion": ""}"#, "the completion non-empty"),
            (r#"{"id": [1], "prompt": "a", "completion": "b"}"#, "`id` must be"),
            ("\n\n", "holds no record"),
        ] {
            let file = write(text);
            let message = read_items(file.path()).expect_err(text).to_string();
            assert!(message.contains(expected), "{text}: {message}");
            assert!(message.contains(&file.path().display().to_string()), "{message}");
        }
    }
}
