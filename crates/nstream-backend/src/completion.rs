//! Legacy `/v1/completions`: prompt in, text out (still used by benchmarks and older clients).
//!
//! Unknown request fields are ignored, as for chat; see the crate documentation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::chat::{FinishReason, SamplingRanges};
use crate::input::Input;
use crate::usage::{StopSequences, StreamOptions, Usage};
use crate::{BackendError, Result};

/// A legacy `/v1/completions` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    /// Which model to use; the server routes on it.
    pub model: String,
    /// The prompt(s): text or token ids, one or many (each yields its own choices).
    pub prompt: Input,
    /// Text appended after the completion (insert mode); rarely supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    /// Upper bound on generated tokens (OpenAI's default is 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature, 0 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// How many completions per prompt (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Stream chunks as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming settings (`include_usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Return log probabilities of the `logprobs` most likely tokens, 0 to 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
    /// Echo the prompt before the completion.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub echo: bool,
    /// Where to stop generating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopSequences>,
    /// Penalty for tokens already present, -2 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    /// Penalty proportional to token frequency, -2 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    /// Generate `best_of` candidates server-side and return the best `n`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_of: Option<u32>,
    /// Token id (string key) to bias, -100 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<BTreeMap<String, f32>>,
    /// Seed for reproducible sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// End-user identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// nstream extension: sample only among the `top_k` most likely tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// nstream extension: multiplicative repetition penalty (1.0 = off), greater than 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    /// nstream extension: keep generating past end-of-sequence tokens (benchmarks).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_eos: bool,
}

impl CompletionRequest {
    /// A request for one prompt with every option at its default.
    pub fn new(model: impl Into<String>, prompt: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            prompt: Input::Text(prompt.into()),
            suffix: None,
            max_tokens: None,
            temperature: None,
            top_p: None,
            n: None,
            stream: false,
            stream_options: None,
            logprobs: None,
            echo: false,
            stop: None,
            presence_penalty: None,
            frequency_penalty: None,
            best_of: None,
            logit_bias: None,
            seed: None,
            user: None,
            top_k: None,
            repetition_penalty: None,
            ignore_eos: false,
        }
    }

    /// Whether a streamed answer must end with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream && self.stream_options.is_some_and(|options| options.include_usage)
    }

    /// Checks the documented ranges so backends need not. Called by the server before routing.
    pub fn validate(&self) -> Result<()> {
        SamplingRanges {
            temperature: self.temperature,
            top_p: self.top_p,
            n: self.n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.as_ref(),
            stop: self.stop.as_ref(),
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
        }
        .validate()?;
        // `max_tokens: 0` with `echo` reads the prompt and generates nothing: how evaluation
        // harnesses score a text by its prompt log probabilities.
        if self.max_tokens == Some(0) && !self.echo {
            return Err(BackendError::invalid_param(
                "max_tokens",
                "`max_tokens` must be at least 1 (0 only with `echo`, to score the prompt)",
            ));
        }
        if self.logprobs.is_some_and(|count| count > 5) {
            return Err(BackendError::invalid_param("logprobs", "`logprobs` must be between 0 and 5"));
        }
        if let Some(best_of) = self.best_of
            && best_of < self.n.unwrap_or(1)
        {
            return Err(BackendError::invalid_param("best_of", "`best_of` must be greater than or equal to `n`"));
        }
        if self.stream_options.is_some() && !self.stream {
            return Err(BackendError::invalid_param(
                "stream_options",
                "`stream_options` is only allowed when `stream` is true",
            ));
        }
        Ok(())
    }
}

/// One choice of a completion (streamed chunks carry the new text only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    /// Position among all choices (prompt index × `n` + choice).
    pub index: u32,
    /// The generated text.
    pub text: String,
    /// Log probabilities, when requested (provider-shaped).
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    /// Why generation ended; null on intermediate chunks.
    pub finish_reason: Option<FinishReason>,
}

/// The object name of [`CompletionResponse`] (also used by its streamed chunks).
pub const TEXT_COMPLETION_OBJECT: &str = "text_completion";

/// A `/v1/completions` answer; also the shape of each streamed chunk, as in OpenAI's API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionResponse {
    /// Unique id, `cmpl-...`.
    pub id: String,
    /// Always `"text_completion"`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model that answered.
    pub model: String,
    /// The choices.
    pub choices: Vec<CompletionChoice>,
    /// Token accounting (on streams: only the final chunk, with `include_usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Backend configuration fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
}

/// A streamed completion chunk has the same shape as a full response.
pub type CompletionChunk = CompletionResponse;

impl CompletionResponse {
    /// A response with `object` set.
    pub fn new(
        id: impl Into<String>,
        created: u64,
        model: impl Into<String>,
        choices: Vec<CompletionChoice>,
        usage: Option<Usage>,
    ) -> Self {
        Self {
            id: id.into(),
            object: TEXT_COMPLETION_OBJECT.to_owned(),
            created,
            model: model.into(),
            choices,
            usage,
            system_fingerprint: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_prompt_shape() {
        for (prompt, count) in [
            (serde_json::json!("once upon"), 1),
            (serde_json::json!(["a", "b"]), 2),
            (serde_json::json!([1, 2, 3]), 1),
            (serde_json::json!([[1], [2, 3]]), 2),
        ] {
            let request: CompletionRequest =
                serde_json::from_value(serde_json::json!({"model": "m", "prompt": prompt})).expect("valid prompt");
            assert_eq!(request.prompt.len(), count);
            assert!(request.validate().is_ok());
        }
    }

    #[test]
    fn parses_options_and_rejects_bad_ranges() {
        let request: CompletionRequest = serde_json::from_value(serde_json::json!({
            "model": "m", "prompt": "x", "max_tokens": 5, "stop": "\n", "echo": true,
            "logprobs": 2, "best_of": 2, "n": 2, "stream": true,
            "stream_options": {"include_usage": true}
        }))
        .expect("valid request");
        assert!(request.include_usage());
        assert!(request.validate().is_ok());

        let bad = CompletionRequest { best_of: Some(1), n: Some(2), ..CompletionRequest::new("m", "x") };
        assert_eq!(bad.validate().unwrap_err().param(), Some("best_of"));
        let bad = CompletionRequest { logprobs: Some(6), ..CompletionRequest::new("m", "x") };
        assert_eq!(bad.validate().unwrap_err().param(), Some("logprobs"));
    }

    #[test]
    fn requires_a_prompt() {
        let missing = serde_json::from_value::<CompletionRequest>(serde_json::json!({"model": "m"}));
        assert!(missing.unwrap_err().to_string().contains("prompt"));
    }
}
