//! `/v1/embeddings`: request and response.
//!
//! The request rejects unknown fields (see the crate documentation for why). Base64 encoding of
//! the vectors and `dimensions` truncation are done by the server, so backends always return
//! full-length `f32` vectors in request order (a backend may honour `dimensions` itself, e.g. a
//! hosted provider forwarding it; the server's truncation is then a no-op).

use serde::{Deserialize, Serialize};

use crate::input::Input;
use crate::{BackendError, Result};

/// How the client wants vectors encoded on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncodingFormat {
    /// JSON arrays of numbers.
    #[default]
    Float,
    /// Base64 of the little-endian `f32` bytes (smaller and faster to parse; the official Python
    /// client asks for it by default).
    Base64,
}

/// A `/v1/embeddings` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingRequest {
    /// Which model to use; the server routes on it.
    pub model: String,
    /// The text(s) or token ids to embed; arrays must not be empty.
    pub input: Input,
    /// `float` (default) or `base64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<EncodingFormat>,
    /// Truncate vectors to this many dimensions (Matryoshka models); at least 1 and at most the
    /// model's dimension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
    /// End-user identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// nstream extension: cut inputs longer than the model's context (the default, as
    /// text-embeddings-inference does). When false an over-long input is a
    /// [`BackendError::ContextLengthExceeded`].
    #[serde(default = "default_truncate")]
    pub truncate: bool,
}

fn default_truncate() -> bool {
    true
}

impl EmbeddingRequest {
    /// A request with every option at its default.
    pub fn new(model: impl Into<String>, input: Input) -> Self {
        Self { model: model.into(), input, encoding_format: None, dimensions: None, user: None, truncate: true }
    }

    /// Rejects empty inputs and `dimensions: 0`. The model-dependent checks (dimension upper
    /// bound, input count limit) are the server's.
    pub fn validate(&self) -> Result<()> {
        self.input.reject_empty_items("input")?;
        if self.dimensions == Some(0) {
            return Err(BackendError::invalid_param("dimensions", "`dimensions` must be at least 1"));
        }
        Ok(())
    }
}

/// The object name of [`Embedding`].
pub const EMBEDDING_OBJECT: &str = "embedding";
/// The object name of list responses.
pub const LIST_OBJECT: &str = "list";

/// One vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    /// Always `"embedding"`.
    pub object: String,
    /// Position of the input this vector belongs to.
    pub index: u32,
    /// The vector.
    pub embedding: Vec<f32>,
}

impl Embedding {
    /// A vector for the input at `index`.
    pub fn new(index: u32, embedding: Vec<f32>) -> Self {
        Self { object: EMBEDDING_OBJECT.to_owned(), index, embedding }
    }
}

/// Token accounting of an embeddings request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingUsage {
    /// Tokens read (after truncation).
    pub prompt_tokens: u32,
    /// Same as `prompt_tokens`.
    pub total_tokens: u32,
}

impl EmbeddingUsage {
    /// Usage for this many input tokens.
    pub fn new(prompt_tokens: u32) -> Self {
        Self { prompt_tokens, total_tokens: prompt_tokens }
    }
}

/// A `/v1/embeddings` answer with `f32` vectors, in request order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingResponse {
    /// Always `"list"`.
    pub object: String,
    /// One vector per input, `index` ascending.
    pub data: Vec<Embedding>,
    /// The model that answered.
    pub model: String,
    /// Token accounting.
    pub usage: EmbeddingUsage,
}

impl EmbeddingResponse {
    /// A response from vectors in input order; indices are assigned 0, 1, 2...
    pub fn from_vectors(model: impl Into<String>, vectors: Vec<Vec<f32>>, usage: EmbeddingUsage) -> Self {
        let data = vectors.into_iter().zip(0u32..).map(|(vector, index)| Embedding::new(index, vector)).collect();
        Self { object: LIST_OBJECT.to_owned(), data, model: model.into(), usage }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: serde_json::Value) -> std::result::Result<EmbeddingRequest, String> {
        serde_json::from_value(json).map_err(|error| error.to_string())
    }

    #[test]
    fn parses_defaults() {
        let request = parse(serde_json::json!({"model": "bge", "input": "hello"})).expect("valid");
        assert_eq!(request.input, Input::Text("hello".into()));
        assert!(request.truncate);
        assert_eq!(request.encoding_format, None);
        assert!(request.validate().is_ok());
    }

    #[test]
    fn parses_every_option() {
        let request = parse(serde_json::json!({
            "model": "bge", "input": [[1, 2], [3]], "encoding_format": "base64",
            "dimensions": 256, "user": "u", "truncate": false
        }))
        .expect("valid");
        assert_eq!(request.input.len(), 2);
        assert_eq!(request.encoding_format, Some(EncodingFormat::Base64));
        assert_eq!(request.dimensions, Some(256));
        assert!(!request.truncate);
    }

    #[test]
    fn rejects_unknown_fields_naming_them() {
        let message = parse(serde_json::json!({"model": "bge", "input": "x", "dimension": 3})).unwrap_err();
        assert!(message.contains("unknown field `dimension`"), "{message}");
    }

    #[test]
    fn rejects_bad_encoding_and_empty_inputs() {
        assert!(parse(serde_json::json!({"model": "bge", "input": "x", "encoding_format": "int8"})).is_err());
        assert!(parse(serde_json::json!({"model": "bge", "input": []})).unwrap_err().contains("empty array"));
        let request = parse(serde_json::json!({"model": "bge", "input": ["a", ""]})).expect("parses");
        assert_eq!(request.validate().unwrap_err().param(), Some("input[1]"));
        let request = parse(serde_json::json!({"model": "bge", "input": "a", "dimensions": 0})).expect("parses");
        assert_eq!(request.validate().unwrap_err().param(), Some("dimensions"));
    }

    #[test]
    fn response_serialises_in_the_openai_shape() {
        let response = EmbeddingResponse::from_vectors("bge", vec![vec![0.5, 0.5]], EmbeddingUsage::new(3));
        assert_eq!(
            serde_json::to_value(&response).expect("serialises"),
            serde_json::json!({
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.5]}],
                "model": "bge",
                "usage": {"prompt_tokens": 3, "total_tokens": 3}
            })
        );
    }
}
