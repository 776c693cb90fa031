//! Small types shared by chat, completions and embeddings.

use serde::{Deserialize, Serialize};

/// Token accounting of a completion (OpenAI `usage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// `prompt_tokens + completion_tokens`.
    pub total_tokens: u32,
}

impl Usage {
    /// Usage with `total_tokens` computed (saturating, so huge counts cannot overflow).
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens.saturating_add(completion_tokens) }
    }
}

/// `stop`: up to four sequences where generation stops, sent as one string or an array.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StopSequences {
    /// `"stop": "\n"`.
    One(String),
    /// `"stop": ["\n", "###"]`.
    Many(Vec<String>),
}

impl StopSequences {
    /// The sequences as a slice-like list, whichever form was sent.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Self::One(sequence) => vec![sequence.clone()],
            Self::Many(sequences) => sequences.clone(),
        }
    }

    /// OpenAI accepts at most four stop sequences.
    pub(crate) fn validate(&self) -> crate::Result<()> {
        let sequences = self.to_vec();
        if sequences.len() > 4 {
            return Err(crate::BackendError::invalid_param(
                "stop",
                format!("at most 4 stop sequences are allowed, got {}", sequences.len()),
            ));
        }
        Ok(())
    }
}

/// `stream_options`: settings that apply only when `stream` is true.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// When true, the stream ends with one extra chunk whose `choices` is empty and whose
    /// `usage` covers the whole request. Backends must emit that chunk themselves.
    #[serde(default)]
    pub include_usage: bool,
}

/// Seconds since the Unix epoch, for the OpenAI `created` fields (0 if the clock is before 1970).
pub fn unix_timestamp() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|elapsed| elapsed.as_secs()).unwrap_or(0)
}
