//! `OpenAiJson`: the JSON body extractor whose every rejection is an OpenAI-shaped [`ApiError`].
//!
//! axum's own `Json` answers bad bodies in plain text; clients of an OpenAI-compatible API
//! expect `{"error": ...}` with the offending field in `param`, so bodies are read and parsed here.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::state::AppState;

/// A request body parsed as `T` from JSON.
#[derive(Debug)]
pub struct OpenAiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        check_content_type(&request)?;
        let limit = state.config().max_body_bytes;
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(limit)
            } else {
                ApiError::bad_request(format!("Could not read the request body: {}", rejection.body_text()), None)
            }
        })?;
        parse_json(&bytes).map(OpenAiJson)
    }
}

fn check_content_type(request: &Request) -> Result<(), ApiError> {
    let Some(value) = request.headers().get(header::CONTENT_TYPE) else {
        return Err(ApiError::unsupported_media_type(None));
    };
    let Ok(content_type) = value.to_str() else {
        return Err(ApiError::unsupported_media_type(Some("<not ASCII>")));
    };
    // `application/json; charset=utf-8` and `application/vnd.x+json` are JSON too.
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    let is_json = essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"));
    if is_json { Ok(()) } else { Err(ApiError::unsupported_media_type(Some(content_type))) }
}

/// Parses a body, turning serde's error into a 400 whose `param` is the path of the bad field
/// (`messages[0].role`, `input`, or the unknown field's name).
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if let Err(error) = std::str::from_utf8(bytes) {
        return Err(ApiError::bad_request(
            format!(
                "The request body is not valid UTF-8 (invalid byte at offset {}); JSON bodies must be UTF-8",
                error.valid_up_to()
            ),
            None,
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer)
        .map_err(|error| json_error(error.path().to_string(), error.into_inner()))?;
    deserializer.end().map_err(|error| json_error(".".to_owned(), error))?;
    Ok(value)
}

fn json_error(path: String, error: serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    let message = error.to_string();
    match error.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::bad_request(format!("We could not parse the JSON body of your request: {message}"), None)
        }
        Category::Data => {
            let parent = (path != ".").then_some(path);
            // A missing field is reported at its parent; name the field itself.
            let named_field =
                quoted_field(&message, "unknown field `").or_else(|| quoted_field(&message, "missing field `"));
            let param = match (parent, named_field) {
                // serde_path_to_error already ends the path with an unknown field's name.
                (Some(parent), Some(field)) if parent == field || parent.ends_with(&format!(".{field}")) => {
                    Some(parent)
                }
                (Some(parent), Some(field)) => Some(format!("{parent}.{field}")),
                (None, Some(field)) => Some(field.to_owned()),
                (parent, None) => parent,
            };
            let message = match &param {
                Some(param) => format!("Invalid value for `{param}`: {message}"),
                None => format!("Invalid request body: {message}"),
            };
            ApiError::bad_request(message, param)
        }
    }
}

/// The name between backticks after `prefix` in a serde message.
fn quoted_field<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let start = message.find(prefix)? + prefix.len();
    let length = message[start..].find('`')?;
    Some(&message[start..start + length])
}

#[cfg(test)]
mod tests {
    use nstream_backend::chat::ChatCompletionRequest;
    use nstream_backend::embedding::EmbeddingRequest;

    use super::*;

    #[test]
    fn names_the_field_of_a_type_error() {
        let error =
            parse_json::<ChatCompletionRequest>(br#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#)
                .unwrap_err();
        assert_eq!(error.param(), Some("messages[0].role"));
        let error = parse_json::<EmbeddingRequest>(br#"{"model":"m","input":"x","dimensions":"ten"}"#).unwrap_err();
        assert_eq!(error.param(), Some("dimensions"));
    }

    #[test]
    fn names_unknown_and_missing_fields() {
        let error = parse_json::<EmbeddingRequest>(br#"{"model":"m","input":"x","foo":1}"#).unwrap_err();
        assert_eq!(error.param(), Some("foo"));
        assert!(error.message().contains("unknown field `foo`"));
        let error = parse_json::<EmbeddingRequest>(br#"{"model":"m"}"#).unwrap_err();
        assert_eq!(error.param(), Some("input"));
    }

    #[test]
    fn syntax_errors_and_bad_utf8_are_400_without_param() {
        let error = parse_json::<EmbeddingRequest>(br#"{"model": "#).unwrap_err();
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
        assert_eq!(error.param(), None);
        let error = parse_json::<EmbeddingRequest>(b"{\"model\":\"\xff\"}").unwrap_err();
        assert!(error.message().contains("UTF-8"));
        let error = parse_json::<EmbeddingRequest>(br#"{"model":"m","input":"x"} trailing"#).unwrap_err();
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
    }
}
