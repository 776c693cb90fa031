//! Input readers: JSONL (any fields), CSV (a header row, then one record per row) and plain text
//! (one item per line). Every record keeps its 1-based line number, so each output row and each
//! error points back at the line it came from.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// How the input file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    /// One JSON object (any fields) or JSON string per line; blank lines are skipped.
    Jsonl,
    /// Comma-separated values with a header row; every column becomes a string field.
    Csv,
    /// Plain text, one item per non-blank line, available to templates as `text`.
    Text,
}

impl InputFormat {
    /// The format an extension suggests: `.jsonl`/`.ndjson`/`.json` are JSONL, `.csv` is CSV,
    /// anything else is text.
    pub fn from_path(path: &Path) -> Self {
        match path.extension().and_then(|extension| extension.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("jsonl" | "ndjson" | "json") => Self::Jsonl,
            Some("csv") => Self::Csv,
            _ => Self::Text,
        }
    }
}

/// One input record.
#[derive(Debug, Clone, PartialEq)]
pub struct InputRecord {
    /// 1-based line of the record in the input file (for CSV, the line the row starts on).
    pub line: u64,
    /// The record's `id` field when it has a string or number one, else its line number.
    pub id: String,
    /// The record as a JSON object.
    pub value: Value,
}

/// A line that is not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// 1-based line number.
    pub line: u64,
    /// What is wrong with it.
    pub message: String,
}

/// What reading one line gave.
#[derive(Debug, Clone, PartialEq)]
pub enum InputItem {
    /// A record to generate for.
    Record(InputRecord),
    /// A malformed line.
    Bad(BadRecord),
}

impl InputItem {
    /// The line the item came from.
    pub fn line(&self) -> u64 {
        match self {
            Self::Record(record) => record.line,
            Self::Bad(bad) => bad.line,
        }
    }
}

/// Reads every item of `path`. Malformed lines come back as [`InputItem::Bad`] so the caller can
/// stop or go on; an unreadable file, or one without a single item, is an error.
pub fn read_input(path: &Path, format: InputFormat) -> Result<Vec<InputItem>> {
    let file = std::fs::File::open(path).map_err(|source| Error::io(path, source))?;
    let items = match format {
        InputFormat::Jsonl => read_lines(path, file, jsonl_record)?,
        InputFormat::Text => read_lines(path, file, text_record)?,
        InputFormat::Csv => read_csv(path, file)?,
    };
    if items.is_empty() {
        return Err(Error::EmptyInput { path: path.to_path_buf() });
    }
    Ok(items)
}

fn record_id(value: &Value, line: u64) -> String {
    match value.get("id") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        Some(Value::Number(id)) => id.to_string(),
        _ => line.to_string(),
    }
}

fn jsonl_record(line: u64, text: &str) -> Option<InputItem> {
    if text.trim().is_empty() {
        return None;
    }
    let bad = |message: String| Some(InputItem::Bad(BadRecord { line, message }));
    match serde_json::from_str::<Value>(text) {
        Ok(value @ Value::Object(_)) => {
            Some(InputItem::Record(InputRecord { line, id: record_id(&value, line), value }))
        }
        Ok(Value::String(text)) => {
            let mut object = Map::new();
            object.insert("text".to_owned(), Value::String(text));
            Some(InputItem::Record(InputRecord { line, id: line.to_string(), value: Value::Object(object) }))
        }
        Ok(other) => bad(format!("expected a JSON object or string, found {}", json_kind(&other))),
        Err(error) => bad(format!("not valid JSON: {error}")),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn text_record(line: u64, text: &str) -> Option<InputItem> {
    if text.trim().is_empty() {
        return None;
    }
    let mut object = Map::new();
    object.insert("text".to_owned(), Value::String(text.to_owned()));
    Some(InputItem::Record(InputRecord { line, id: line.to_string(), value: Value::Object(object) }))
}

/// Reads line by line as bytes, so one line that is not UTF-8 is reported instead of failing the
/// file; strips `\r\n` endings and a UTF-8 byte-order mark on the first line.
fn read_lines(
    path: &Path,
    file: std::fs::File,
    parse: impl Fn(u64, &str) -> Option<InputItem>,
) -> Result<Vec<InputItem>> {
    let mut reader = BufReader::new(file);
    let mut items = Vec::new();
    let mut buffer = Vec::new();
    let mut line = 0u64;
    loop {
        buffer.clear();
        let read = reader.read_until(b'\n', &mut buffer).map_err(|source| Error::io(path, source))?;
        if read == 0 {
            break;
        }
        line += 1;
        while matches!(buffer.last(), Some(b'\n' | b'\r')) {
            buffer.pop();
        }
        let bytes = if line == 1 { buffer.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&buffer) } else { &buffer };
        match std::str::from_utf8(bytes) {
            Ok(text) => items.extend(parse(line, text)),
            Err(error) => items.push(InputItem::Bad(BadRecord {
                line,
                message: format!("not UTF-8 text (invalid byte at column {})", error.valid_up_to() + 1),
            })),
        }
    }
    Ok(items)
}

fn read_csv(path: &Path, file: impl Read) -> Result<Vec<InputItem>> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(file);
    let headers = match reader.headers() {
        Ok(headers) => headers.clone(),
        Err(error) => return Err(csv_error(path, &error)),
    };
    if headers.is_empty() || (headers.len() == 1 && headers.get(0).is_some_and(str::is_empty)) {
        return Ok(Vec::new());
    }
    let mut seen = std::collections::HashSet::new();
    for name in &headers {
        if !seen.insert(name) {
            return Err(Error::BadInput {
                path: path.to_path_buf(),
                line: 1,
                message: format!("the header names column {name:?} twice"),
            });
        }
    }
    let mut items = Vec::new();
    for result in reader.records() {
        match result {
            Ok(row) => {
                let line = row.position().map_or(0, csv::Position::line);
                if row.iter().all(str::is_empty) {
                    continue;
                }
                let object: Map<String, Value> = headers
                    .iter()
                    .zip(row.iter())
                    .map(|(name, value)| (name.to_owned(), Value::String(value.to_owned())))
                    .collect();
                let value = Value::Object(object);
                items.push(InputItem::Record(InputRecord { line, id: record_id(&value, line), value }));
            }
            Err(error) => {
                let line = error.position().map_or(0, csv::Position::line);
                let message = match error.kind() {
                    csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
                        format!("expected {expected_len} fields as in the header, found {len}")
                    }
                    csv::ErrorKind::Utf8 { .. } => "not UTF-8 text".to_owned(),
                    _ => error.to_string(),
                };
                if matches!(error.kind(), csv::ErrorKind::Io(_)) {
                    return Err(csv_error(path, &error));
                }
                items.push(InputItem::Bad(BadRecord { line, message }));
            }
        }
    }
    Ok(items)
}

fn csv_error(path: &Path, error: &csv::Error) -> Error {
    Error::BadInput {
        path: PathBuf::from(path),
        line: error.position().map_or(1, csv::Position::line),
        message: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use serde_json::json;

    use super::*;

    fn file(contents: &[u8], extension: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new().suffix(extension).tempfile().expect("temp file");
        file.write_all(contents).expect("write");
        file
    }

    fn records(items: &[InputItem]) -> Vec<(u64, String, Value)> {
        items
            .iter()
            .filter_map(|item| match item {
                InputItem::Record(record) => Some((record.line, record.id.clone(), record.value.clone())),
                InputItem::Bad(_) => None,
            })
            .collect()
    }

    #[test]
    fn jsonl_keeps_line_numbers_ids_and_reports_bad_lines() {
        let input = file(
            b"\xef\xbb\xbf{\"id\": \"a\", \"q\": 1}\r\n\n{\"q\": 2}\n{bad\n[1]\n\"just text\"\n\xff\xfe\n",
            ".jsonl",
        );
        assert_eq!(InputFormat::from_path(input.path()), InputFormat::Jsonl);
        let items = read_input(input.path(), InputFormat::Jsonl).expect("read");
        assert_eq!(
            records(&items),
            [
                (1, "a".to_owned(), json!({"id": "a", "q": 1})),
                (3, "3".to_owned(), json!({"q": 2})),
                (6, "6".to_owned(), json!({"text": "just text"})),
            ]
        );
        let bad: Vec<(u64, String)> = items
            .iter()
            .filter_map(|item| match item {
                InputItem::Bad(bad) => Some((bad.line, bad.message.clone())),
                InputItem::Record(_) => None,
            })
            .collect();
        assert_eq!(bad.len(), 3);
        assert_eq!(bad[0].0, 4);
        assert!(bad[0].1.starts_with("not valid JSON"), "{}", bad[0].1);
        assert_eq!(bad[1], (5, "expected a JSON object or string, found an array".to_owned()));
        assert_eq!(bad[2].0, 7);
        assert!(bad[2].1.contains("UTF-8"));
    }

    #[test]
    fn text_is_one_item_per_non_blank_line() {
        let input = file(b"first\n\n  \nsecond\r\nthird", ".txt");
        assert_eq!(InputFormat::from_path(input.path()), InputFormat::Text);
        let items = read_input(input.path(), InputFormat::Text).expect("read");
        let got: Vec<(u64, Value)> = records(&items).into_iter().map(|(line, _, value)| (line, value)).collect();
        assert_eq!(got, [(1, json!({"text": "first"})), (4, json!({"text": "second"})), (5, json!({"text": "third"}))]);
    }

    #[test]
    fn csv_rows_become_string_fields_with_their_lines() {
        let input =
            file(b"id,question,notes\n7,\"What is 2+2?\",\"multi\nline\"\n8,Why?,\n9,too,many,fields\n", ".csv");
        let items = read_input(input.path(), InputFormat::Csv).expect("read");
        assert_eq!(
            records(&items),
            [
                (2, "7".to_owned(), json!({"id": "7", "question": "What is 2+2?", "notes": "multi\nline"})),
                (4, "8".to_owned(), json!({"id": "8", "question": "Why?", "notes": ""})),
            ]
        );
        assert!(
            matches!(&items[2], InputItem::Bad(BadRecord { line: 5, message }) if message.contains("expected 3 fields")),
            "{:?}",
            items[2]
        );
    }

    #[test]
    fn empty_inputs_are_errors_that_name_the_file() {
        for (contents, format) in [
            (&b""[..], InputFormat::Jsonl),
            (b"\n\n  \n", InputFormat::Jsonl),
            (b"", InputFormat::Text),
            (b"", InputFormat::Csv),
            (b"prompt\n", InputFormat::Csv),
        ] {
            let input = file(contents, ".in");
            let error = read_input(input.path(), format).expect_err("empty");
            assert!(matches!(error, Error::EmptyInput { .. }), "{error}");
            assert!(error.to_string().contains("the input is empty"));
        }
        let missing = read_input(Path::new("/nonexistent/input.jsonl"), InputFormat::Jsonl).expect_err("missing");
        assert!(missing.to_string().contains("/nonexistent/input.jsonl"));
    }

    #[test]
    fn csv_with_a_repeated_column_is_refused() {
        let input = file(b"a,a\n1,2\n", ".csv");
        let error = read_input(input.path(), InputFormat::Csv).expect_err("duplicate header");
        assert!(error.to_string().contains("column \"a\" twice"), "{error}");
    }
}
