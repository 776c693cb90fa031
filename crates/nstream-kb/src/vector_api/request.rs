//! Checking the fields of vector-store requests; every error names its field.

use nstream_backend::BackendError;
use nstream_backend::vector_store::SearchVectorStore;
use nstream_core::knowledge_base::MAX_NUM_RESULTS_LIMIT;
use serde_json::{Map, Value};

use crate::filter::Filter;
use crate::source::MAX_METADATA_KEYS;

type Result<T> = nstream_backend::Result<T>;

fn invalid(field: &str, reason: impl std::fmt::Display) -> BackendError {
    BackendError::invalid_param(field, format!("{field}: {reason}"))
}

/// An upload's name: its last path component, non-empty, without control characters.
pub(super) fn filename(raw: &str) -> Result<String> {
    let name = raw.rsplit(['/', '\\']).next().unwrap_or_default().trim();
    if name.is_empty() || name.chars().any(char::is_control) || name.len() > 512 {
        return Err(invalid("file", "expected a file name of 1 to 512 printable characters"));
    }
    Ok(name.to_string())
}

/// The shortest file expiry, in seconds (OpenAI's limit: one hour).
pub(super) const MIN_FILE_EXPIRY_SECONDS: u64 = 3_600;
/// The longest file expiry, in seconds (OpenAI's limit: 30 days).
pub(super) const MAX_FILE_EXPIRY_SECONDS: u64 = 2_592_000;

/// An upload's expiration policy (`expires_after[anchor]`, `expires_after[seconds]`), checked:
/// the seconds after its creation when the file expires, or `None` without a policy.
pub(super) fn file_expiry(anchor: Option<&str>, seconds: Option<&str>) -> Result<Option<u64>> {
    let (anchor_field, seconds_field) = ("expires_after[anchor]", "expires_after[seconds]");
    let range = format!(
        "expected a whole number of seconds from {MIN_FILE_EXPIRY_SECONDS} (1 hour) to {MAX_FILE_EXPIRY_SECONDS} (30 days)"
    );
    match (anchor, seconds) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(invalid(anchor_field, "missing; expected created_at (with expires_after[seconds])")),
        (Some(anchor), _) if anchor.trim() != "created_at" => {
            Err(invalid(anchor_field, format!("found {anchor:?}, expected created_at")))
        }
        (Some(_), None) => Err(invalid(seconds_field, format!("missing; {range}"))),
        (Some(_), Some(seconds)) => seconds
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|seconds| (MIN_FILE_EXPIRY_SECONDS..=MAX_FILE_EXPIRY_SECONDS).contains(seconds))
            .map(Some)
            .ok_or_else(|| invalid(seconds_field, format!("found {seconds:?}, {range}"))),
    }
}

/// A store's `metadata`: at most 16 pairs of strings.
pub(super) fn metadata(raw: Option<Map<String, Value>>) -> Result<Map<String, Value>> {
    let raw = raw.unwrap_or_default();
    if raw.len() > MAX_METADATA_KEYS {
        return Err(invalid("metadata", format!("found {} keys, expected at most {MAX_METADATA_KEYS}", raw.len())));
    }
    for (key, value) in &raw {
        if key.is_empty() || key.chars().count() > 64 {
            return Err(invalid("metadata", format!("key {key:?}: expected 1 to 64 characters")));
        }
        match value {
            Value::String(text) if text.chars().count() <= 512 => {}
            _ => return Err(invalid(&format!("metadata.{key}"), "expected a string of at most 512 characters")),
        }
    }
    Ok(raw)
}

/// A file's `attributes`: at most 16 pairs, values strings, numbers or booleans.
pub(super) fn attributes(raw: Option<Map<String, Value>>) -> Result<Map<String, Value>> {
    let raw = raw.unwrap_or_default();
    if raw.len() > MAX_METADATA_KEYS {
        return Err(invalid("attributes", format!("found {} keys, expected at most {MAX_METADATA_KEYS}", raw.len())));
    }
    for (key, value) in &raw {
        if key.is_empty() || key.chars().count() > 64 {
            return Err(invalid("attributes", format!("key {key:?}: expected 1 to 64 characters")));
        }
        let fits = match value {
            Value::String(text) => text.chars().count() <= 512,
            Value::Number(_) | Value::Bool(_) => true,
            _ => false,
        };
        if !fits {
            return Err(invalid(
                &format!("attributes.{key}"),
                "expected a string of at most 512 characters, a number or a boolean",
            ));
        }
    }
    Ok(raw)
}

/// The EmbeddingModel of a new store: `metadata.embedding_model`, or the only one served.
pub(super) fn choose_model(metadata: &Map<String, Value>, served: &[String]) -> Result<String> {
    let field = "metadata.embedding_model";
    if let Some(wanted) = metadata.get("embedding_model").and_then(Value::as_str) {
        if served.iter().any(|name| name == wanted) {
            return Ok(wanted.to_string());
        }
        let names = if served.is_empty() { "none".to_string() } else { served.join(", ") };
        return Err(invalid(
            field,
            format!("found {wanted:?}, expected an EmbeddingModel this server serves: {names}"),
        ));
    }
    match served {
        [only] => Ok(only.clone()),
        [] => Err(invalid(field, "this server serves no EmbeddingModel, so it cannot embed a vector store")),
        several => Err(invalid(
            field,
            format!("several EmbeddingModels are served ({}); name the one to embed with", several.join(", ")),
        )),
    }
}

/// `chunking_strategy`: `None` for auto (or absent), else `(max tokens, overlap tokens)`.
pub(super) fn chunking_strategy(raw: Option<&Value>, field: &str) -> Result<Option<(u32, u32)>> {
    let Some(raw) = raw else { return Ok(None) };
    let kind = raw.get("type").and_then(Value::as_str);
    match kind {
        Some("auto") => Ok(None),
        Some("static") => {
            let settings = raw.get("static").and_then(Value::as_object).ok_or_else(|| {
                invalid(
                    &format!("{field}.static"),
                    "expected an object with max_chunk_size_tokens and chunk_overlap_tokens",
                )
            })?;
            let number = |name: &str| {
                settings
                    .get(name)
                    .and_then(Value::as_u64)
                    .ok_or_else(|| invalid(&format!("{field}.static.{name}"), "expected a whole number"))
            };
            let max = number("max_chunk_size_tokens")?;
            let overlap = number("chunk_overlap_tokens")?;
            if !(100..=4096).contains(&max) {
                return Err(invalid(
                    &format!("{field}.static.max_chunk_size_tokens"),
                    format!("found {max}, expected a number from 100 to 4096"),
                ));
            }
            if overlap > max / 2 {
                return Err(invalid(
                    &format!("{field}.static.chunk_overlap_tokens"),
                    format!("found {overlap}, expected at most half of max_chunk_size_tokens ({})", max / 2),
                ));
            }
            Ok(Some((max as u32, overlap as u32)))
        }
        _ => Err(invalid(&format!("{field}.type"), "expected auto or static")),
    }
}

/// The most days of an `expires_after` policy (OpenAI's limit).
pub(super) const MAX_EXPIRY_DAYS: u64 = 365;

/// `expires_after`: `None` for `null`, else `{"anchor": "last_active_at", "days": 1..365}` as
/// stored.
pub(super) fn expires_after(raw: &Value) -> Result<Option<Value>> {
    let field = "expires_after";
    let object = match raw {
        Value::Null => return Ok(None),
        Value::Object(object) => object,
        _ => return Err(invalid(field, "expected an object {\"anchor\": \"last_active_at\", \"days\": N} or null")),
    };
    if let Some(unknown) = object.keys().find(|key| !["anchor", "days"].contains(&key.as_str())) {
        return Err(invalid(&format!("{field}.{unknown}"), "unknown field; expected anchor and days"));
    }
    match object.get("anchor") {
        Some(Value::String(anchor)) if anchor == "last_active_at" => {}
        Some(other) => {
            return Err(invalid(&format!("{field}.anchor"), format!("found {other}, expected \"last_active_at\"")));
        }
        None => return Err(invalid(&format!("{field}.anchor"), "missing; expected \"last_active_at\"")),
    }
    let days = object.get("days").ok_or_else(|| {
        invalid(&format!("{field}.days"), format!("missing; expected a whole number from 1 to {MAX_EXPIRY_DAYS}"))
    })?;
    let days = days.as_u64().filter(|days| (1..=MAX_EXPIRY_DAYS).contains(days)).ok_or_else(|| {
        invalid(&format!("{field}.days"), format!("found {days}, expected a whole number from 1 to {MAX_EXPIRY_DAYS}"))
    })?;
    Ok(Some(serde_json::json!({"anchor": "last_active_at", "days": days})))
}

/// The most files of one batch (OpenAI's limit).
pub(super) const MAX_BATCH_FILES: usize = 2000;

/// One file of a batch, checked: its id, attributes and chunking (`None`: the store's).
pub(super) struct BatchFile {
    pub file_id: String,
    /// The parameter that named it (`file_ids[3]`, `files[3].file_id`).
    pub field: String,
    pub attributes: Map<String, Value>,
    pub chunking: Option<(u32, u32)>,
}

/// A file batch's files: exactly one of `file_ids` (with the shared `attributes` and
/// `chunking_strategy`) and `files` (each with its own), 1 to 2000 distinct ids.
pub(super) fn file_batch(request: nstream_backend::vector_store::CreateVectorStoreFileBatch) -> Result<Vec<BatchFile>> {
    let (list, files) = match (request.file_ids, request.files) {
        (Some(_), Some(_)) => {
            return Err(invalid("files", "give either file_ids or files, not both"));
        }
        (None, None) => return Err(invalid("file_ids", "expected a list of file ids (or files)")),
        (Some(file_ids), None) => {
            let attributes = attributes(request.attributes)?;
            let chunking = chunking_strategy(request.chunking_strategy.as_ref(), "chunking_strategy")?;
            let files = file_ids
                .into_iter()
                .enumerate()
                .map(|(index, file_id)| BatchFile {
                    file_id,
                    field: format!("file_ids[{index}]"),
                    attributes: attributes.clone(),
                    chunking,
                })
                .collect::<Vec<_>>();
            ("file_ids", files)
        }
        (None, Some(entries)) => {
            for (field, given) in [
                ("attributes", request.attributes.is_some()),
                ("chunking_strategy", request.chunking_strategy.is_some()),
            ] {
                if given {
                    return Err(invalid(field, "with files, give it in each entry of files instead"));
                }
            }
            let files = entries
                .into_iter()
                .enumerate()
                .map(|(index, entry)| {
                    let attributes = attributes(entry.attributes).map_err(|error| prefixed(error, index))?;
                    let field = format!("files[{index}].chunking_strategy");
                    let chunking = chunking_strategy(entry.chunking_strategy.as_ref(), &field)?;
                    Ok(BatchFile {
                        file_id: entry.file_id,
                        field: format!("files[{index}].file_id"),
                        attributes,
                        chunking,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            ("files", files)
        }
    };
    if files.is_empty() || files.len() > MAX_BATCH_FILES {
        return Err(invalid(list, format!("found {} files, expected 1 to {MAX_BATCH_FILES}", files.len())));
    }
    let mut seen = std::collections::HashSet::new();
    for file in &files {
        if file.file_id.trim().is_empty() {
            return Err(invalid(&file.field, "expected a file id"));
        }
        if !seen.insert(file.file_id.as_str()) {
            return Err(invalid(&file.field, format!("{} is in the batch twice", file.file_id)));
        }
    }
    Ok(files)
}

/// An attribute error of `files[index]`, its field prefixed.
fn prefixed(error: BackendError, index: usize) -> BackendError {
    let field = error.param().unwrap_or("attributes").to_string();
    let message = error.to_string();
    let reason = message.strip_prefix(&format!("{field}: ")).unwrap_or(&message).to_string();
    invalid(&format!("files[{index}].{field}"), reason)
}

/// A search, checked.
pub(super) struct ParsedSearch {
    pub queries: Vec<String>,
    pub max_results: u32,
    pub filter: Option<Filter>,
    pub score_threshold: Option<f32>,
}

pub(super) fn search(request: SearchVectorStore) -> Result<ParsedSearch> {
    let queries = match request.query {
        Value::String(text) => vec![text],
        Value::Array(items) if !items.is_empty() => items
            .into_iter()
            .enumerate()
            .map(|(index, item)| match item {
                Value::String(text) => Ok(text),
                _ => Err(invalid(&format!("query[{index}]"), "expected a string")),
            })
            .collect::<Result<Vec<_>>>()?,
        _ => return Err(invalid("query", "expected a non-empty string or list of strings")),
    };
    if queries.iter().all(|query| query.trim().is_empty()) {
        return Err(invalid("query", "expected a non-empty query"));
    }
    let requested = request.max_num_results.unwrap_or(10);
    let max_results =
        u32::try_from(requested).ok().filter(|count| (1..=MAX_NUM_RESULTS_LIMIT).contains(count)).ok_or_else(|| {
            invalid(
                "max_num_results",
                format!("found {requested}, expected a number from 1 to {MAX_NUM_RESULTS_LIMIT}"),
            )
        })?;
    let filter = match &request.filters {
        None | Some(Value::Null) => None,
        Some(value) => Some(Filter::parse(value, "filters").map_err(|error| match error {
            crate::Error::InvalidRequest { field, reason } => invalid(&field, reason),
            other => BackendError::invalid_param("filters", other.to_string()),
        })?),
    };
    let score_threshold = match request.ranking_options.and_then(|options| options.score_threshold) {
        None => None,
        Some(threshold) if (0.0..=1.0).contains(&threshold) => Some(threshold as f32),
        Some(threshold) => {
            return Err(invalid(
                "ranking_options.score_threshold",
                format!("found {threshold}, expected a number from 0 to 1"),
            ));
        }
    };
    Ok(ParsedSearch { queries, max_results, filter, score_threshold })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn search_with(body: Value) -> Result<ParsedSearch> {
        search(serde_json::from_value(body).unwrap())
    }

    #[test]
    fn bad_searches_name_the_field() {
        for (body, field) in [
            (json!({"query": ""}), "query"),
            (json!({"query": 3}), "query"),
            (json!({"query": ["a", 1]}), "query[1]"),
            (json!({"query": "a", "max_num_results": 0}), "max_num_results"),
            (json!({"query": "a", "max_num_results": 10000}), "max_num_results"),
            (json!({"query": "a", "ranking_options": {"score_threshold": 2}}), "ranking_options.score_threshold"),
            (json!({"query": "a", "filters": {"type": "eq", "key": "k"}}), "filters.value"),
        ] {
            let error = search_with(body.clone()).err().unwrap();
            assert_eq!(error.param(), Some(field), "{body}: {error}");
            assert!(error.to_string().starts_with(field), "{error}");
        }
        let parsed = search_with(json!({"query": ["a", "b"], "max_num_results": 3})).unwrap();
        assert_eq!(parsed.queries, ["a", "b"]);
        assert_eq!(parsed.max_results, 3);
    }

    #[test]
    fn chunking_strategies_and_models() {
        assert_eq!(chunking_strategy(None, "c").unwrap(), None);
        assert_eq!(chunking_strategy(Some(&json!({"type": "auto"})), "c").unwrap(), None);
        let ok = json!({"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 20}});
        assert_eq!(chunking_strategy(Some(&ok), "c").unwrap(), Some((200, 20)));
        let bad = json!({"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 150}});
        assert_eq!(chunking_strategy(Some(&bad), "c").unwrap_err().param(), Some("c.static.chunk_overlap_tokens"));
        let served = vec!["a".to_string(), "b".to_string()];
        let error = choose_model(&Map::new(), &served).unwrap_err();
        assert!(error.to_string().contains("several EmbeddingModels are served (a, b)"), "{error}");
        let mut metadata = Map::new();
        metadata.insert("embedding_model".to_string(), json!("b"));
        assert_eq!(choose_model(&metadata, &served).unwrap(), "b");
        assert_eq!(choose_model(&Map::new(), &served[..1]).unwrap(), "a");
        assert!(metadata_check(json!({"k": 1})).is_err());
        assert!(attributes(Some(json!({"k": [1]}).as_object().cloned().unwrap())).is_err());
    }

    #[test]
    fn file_expiry_policies_are_checked() {
        assert_eq!(file_expiry(None, None).unwrap(), None);
        assert_eq!(file_expiry(Some("created_at"), Some("3600")).unwrap(), Some(3_600));
        assert_eq!(file_expiry(Some("created_at"), Some("2592000")).unwrap(), Some(2_592_000));
        for (anchor, seconds, field) in [
            (None, Some("3600"), "expires_after[anchor]"),
            (Some("last_active_at"), Some("3600"), "expires_after[anchor]"),
            (Some("created_at"), None, "expires_after[seconds]"),
            (Some("created_at"), Some("3599"), "expires_after[seconds]"),
            (Some("created_at"), Some("2592001"), "expires_after[seconds]"),
            (Some("created_at"), Some("-5"), "expires_after[seconds]"),
            (Some("created_at"), Some("1.5"), "expires_after[seconds]"),
            (Some("created_at"), Some("an hour"), "expires_after[seconds]"),
        ] {
            let error = file_expiry(anchor, seconds).unwrap_err();
            assert_eq!((error.status_code(), error.param()), (400, Some(field)), "{anchor:?} {seconds:?}: {error}");
            assert!(error.to_string().starts_with(field), "{error}");
        }
        let message = file_expiry(Some("created_at"), Some("60")).unwrap_err().to_string();
        assert!(message.contains("3600 (1 hour) to 2592000 (30 days)"), "{message}");
    }

    #[test]
    fn expiry_policies_are_checked() {
        assert_eq!(expires_after(&Value::Null).unwrap(), None);
        let kept = expires_after(&json!({"anchor": "last_active_at", "days": 7})).unwrap().unwrap();
        assert_eq!(kept, json!({"anchor": "last_active_at", "days": 7}));
        for (raw, field) in [
            (json!("7 days"), "expires_after"),
            (json!({"anchor": "created_at", "days": 7}), "expires_after.anchor"),
            (json!({"days": 7}), "expires_after.anchor"),
            (json!({"anchor": "last_active_at"}), "expires_after.days"),
            (json!({"anchor": "last_active_at", "days": 0}), "expires_after.days"),
            (json!({"anchor": "last_active_at", "days": 366}), "expires_after.days"),
            (json!({"anchor": "last_active_at", "days": 1.5}), "expires_after.days"),
            (json!({"anchor": "last_active_at", "days": 1, "hours": 2}), "expires_after.hours"),
        ] {
            let error = expires_after(&raw).unwrap_err();
            assert_eq!((error.status_code(), error.param()), (400, Some(field)), "{raw}: {error}");
            assert!(error.to_string().starts_with(field), "{error}");
        }
    }

    fn batch(body: Value) -> Result<Vec<BatchFile>> {
        file_batch(serde_json::from_value(body).unwrap())
    }

    #[test]
    fn file_batches_are_checked() {
        let shared = batch(json!({
            "file_ids": ["file-a", "file-b"],
            "attributes": {"team": "docs"},
            "chunking_strategy": {"type": "static", "static": {"max_chunk_size_tokens": 300, "chunk_overlap_tokens": 30}}
        }))
        .unwrap();
        assert_eq!(shared.len(), 2);
        assert!(shared.iter().all(|file| file.attributes["team"] == "docs" && file.chunking == Some((300, 30))));
        assert_eq!(shared[1].field, "file_ids[1]");
        let each = batch(json!({"files": [
            {"file_id": "file-a", "attributes": {"n": 1}},
            {"file_id": "file-b", "chunking_strategy": {"type": "auto"}}
        ]}))
        .unwrap();
        assert_eq!(each[0].attributes["n"], 1);
        assert!(each[1].attributes.is_empty() && each[1].chunking.is_none());
        assert_eq!(each[1].field, "files[1].file_id");

        let too_many: Vec<String> = (0..=MAX_BATCH_FILES).map(|index| format!("file-{index}")).collect();
        for (body, field) in [
            (json!({}), "file_ids"),
            (json!({"file_ids": []}), "file_ids"),
            (json!({"file_ids": too_many}), "file_ids"),
            (json!({"file_ids": ["file-a"], "files": [{"file_id": "file-b"}]}), "files"),
            (json!({"file_ids": ["file-a", "file-a"]}), "file_ids[1]"),
            (json!({"file_ids": [""]}), "file_ids[0]"),
            (json!({"file_ids": ["file-a"], "attributes": {"k": [1]}}), "attributes.k"),
            (
                json!({"file_ids": ["file-a"], "chunking_strategy": {"type": "static", "static": {"max_chunk_size_tokens": 50, "chunk_overlap_tokens": 0}}}),
                "chunking_strategy.static.max_chunk_size_tokens",
            ),
            (json!({"files": [{"file_id": "file-a"}], "attributes": {"k": "v"}}), "attributes"),
            (json!({"files": [{"file_id": "file-a"}], "chunking_strategy": {"type": "auto"}}), "chunking_strategy"),
            (json!({"files": [{"file_id": "file-a", "attributes": {"k": {}}}]}), "files[0].attributes.k"),
            (
                json!({"files": [{"file_id": "file-a"}, {"file_id": "file-b", "chunking_strategy": {"type": "big"}}]}),
                "files[1].chunking_strategy.type",
            ),
        ] {
            let error = batch(body.clone()).err().unwrap();
            assert_eq!((error.status_code(), error.param()), (400, Some(field)), "{body}: {error}");
            assert!(error.to_string().starts_with(field), "{body}: {error}");
        }
    }

    fn metadata_check(value: Value) -> Result<Map<String, Value>> {
        metadata(value.as_object().cloned())
    }
}
