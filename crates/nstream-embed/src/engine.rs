//! The synchronous engine: tokenizer + encoder + pooling, one batch at a time.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use nstream_hub::{Hub, ModelSource};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::architecture::{Architecture, Encoder};
use crate::config::{SentenceFiles, SentenceLayout, read_text};
use crate::error::{Error, Result};
use crate::pooling::{normalize, pool};

/// One input of an embeddings request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EmbedInput {
    /// Text, tokenized with the model's tokenizer (special tokens added).
    Text(String),
    /// Token ids, used as given (OpenAI allows token arrays).
    Tokens(Vec<u32>),
}

/// An input ready for the encoder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedInput {
    /// The token ids the model sees (after truncation).
    pub ids: Vec<u32>,
    /// Whether the input was cut at the model's maximum length.
    pub truncated: bool,
}

/// What the engine knows of its model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelInfo {
    /// The embedding dimension.
    pub dimension: usize,
    /// The longest input in tokens (special tokens included).
    pub max_seq_length: usize,
    /// The layout read from the sentence-transformers files.
    pub layout: SentenceLayout,
    /// The vocabulary size (token ids must be below it).
    pub vocab_size: usize,
    /// The encoder architecture, from `config.json`.
    pub architecture: Architecture,
}

/// Tokenizer + encoder (BERT, XLM-RoBERTa, ModernBERT or NomicBert) + pooling. Not thread-aware: [`crate::EmbeddingBackend`] owns one on
/// its worker thread.
pub struct Embedder {
    /// Shared with every [`InputEncoder`]: cloning a `Tokenizer` copies its whole vocabulary.
    tokenizer: Arc<Tokenizer>,
    truncating_tokenizer: Arc<Tokenizer>,
    encoder: Encoder,
    device: Device,
    info: ModelInfo,
    pad_id: u32,
}

impl Embedder {
    /// Loads a sentence-transformers model through `hub` (cache first; see nstream-hub). The
    /// architecture is read from `config.json` ([`Architecture::detect`]).
    pub fn load(hub: &Hub, source: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        let config = hub.resolve_file(source, "config.json")?;
        let tokenizer = hub.resolve_file(source, "tokenizer.json")?;
        let weights = hub.resolve_file(source, "model.safetensors")?;
        let optional_text = |file: &str| -> Result<Option<String>> {
            hub.resolve_optional(source, file)?.map(|path| read_text(&path)).transpose()
        };
        let modules = optional_text("modules.json")?;
        let pooling = match SentenceLayout::pooling_path(modules.as_deref())? {
            Some(folder) if !folder.is_empty() => optional_text(&format!("{folder}/config.json"))?,
            _ => optional_text("1_Pooling/config.json")?,
        };
        let sentence_bert = optional_text("sentence_bert_config.json")?;
        let tokenizer_config = optional_text("tokenizer_config.json")?;
        let files = SentenceFiles {
            modules: modules.as_deref(),
            pooling: pooling.as_deref(),
            sentence_bert: sentence_bert.as_deref(),
            tokenizer_config: tokenizer_config.as_deref(),
        };
        Self::from_parts(&read_text(&config)?, &tokenizer, &weights, &files, device, dtype)
    }

    /// Loads from local files: `config.json` text, `tokenizer.json` and safetensors paths, and the
    /// optional sentence-transformers texts.
    pub fn from_parts(
        config_json: &str,
        tokenizer_path: &Path,
        weights_path: &Path,
        files: &SentenceFiles<'_>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        // The architecture first, so an unsupported one is reported before anything is read.
        Architecture::detect(config_json)?;
        let tensors = candle_core::safetensors::load(weights_path, &Device::Cpu)
            .map_err(|error| Error::InvalidModel { file: "model.safetensors".into(), message: error.to_string() })?;
        let loaded = Encoder::load(config_json, tensors, dtype, device)?;
        let layout = SentenceLayout::from_files(files, loaded.info.max_positions)?;

        let mut tokenizer = read_tokenizer(tokenizer_path)?;
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|error| Error::Tokenizer(error.to_string()))?;
        let mut truncating_tokenizer = tokenizer.clone();
        truncating_tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: layout.max_seq_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|error| Error::Tokenizer(error.to_string()))?;
        let pad_id = loaded.info.pad_token_id.unwrap_or_else(|| tokenizer.token_to_id("[PAD]").unwrap_or(0));
        let info = ModelInfo {
            dimension: loaded.info.hidden_size,
            max_seq_length: layout.max_seq_length,
            layout,
            vocab_size: loaded.info.vocab_size,
            architecture: loaded.info.architecture,
        };
        tracing::info!(?info, ?dtype, device = ?device, "embedding model loaded");
        Ok(Self {
            tokenizer: Arc::new(tokenizer),
            truncating_tokenizer: Arc::new(truncating_tokenizer),
            encoder: loaded.encoder,
            device: loaded.device,
            info,
            pad_id,
        })
    }

    /// What the model is.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Tokenizes (or checks) one input. Longer inputs are cut at the maximum length when `truncate`
    /// is set, and rejected otherwise. `index` is the input's position, for error messages.
    pub fn encode(&self, input: &EmbedInput, truncate: bool, index: usize) -> Result<EncodedInput> {
        encode_input(&self.tokenizer, &self.truncating_tokenizer, &self.info, input, truncate, index)
    }

    /// What tokenization needs, for use off the worker thread (shares the tokenizers: cheap).
    pub fn input_encoder(&self) -> InputEncoder {
        InputEncoder {
            tokenizer: Arc::clone(&self.tokenizer),
            truncating_tokenizer: Arc::clone(&self.truncating_tokenizer),
            info: self.info.clone(),
        }
    }

    /// Whether a batch costs only its real tokens (the encoder packs sequences without padding:
    /// BERT on nstream's CPU kernels), so batching inputs of different lengths wastes nothing.
    pub fn is_padding_free(&self) -> bool {
        self.encoder.is_padding_free()
    }

    /// Embeds a batch in one forward pass: pads to the batch's longest input, pools, normalises
    /// when the model says so. Inputs must be non-empty and within the maximum length.
    pub fn embed_batch(&self, inputs: &[&EncodedInput]) -> Result<Vec<Vec<f32>>> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let lengths: Vec<usize> = inputs.iter().map(|input| input.ids.len()).collect();
        let longest = lengths.iter().copied().max().unwrap_or(0);
        if lengths.contains(&0) || longest > self.info.max_seq_length {
            return Err(Error::Inference(format!(
                "batch lengths {lengths:?} outside 1..={}",
                self.info.max_seq_length
            )));
        }
        let mut ids = Vec::with_capacity(inputs.len() * longest);
        for input in inputs {
            ids.extend_from_slice(&input.ids);
            ids.extend(std::iter::repeat_n(self.pad_id, longest - input.ids.len()));
        }
        let ids = Tensor::from_vec(ids, (inputs.len(), longest), &self.device)?;
        let hidden = self.encoder.forward(&ids, &lengths)?;
        let mut pooled = pool(&hidden, &lengths, self.info.layout.pooling)?;
        if self.info.layout.normalize {
            pooled = normalize(&pooled)?;
        }
        Ok(pooled.to_device(&Device::Cpu)?.to_vec2::<f32>()?)
    }
}

/// Tokenization without the model, so callers can tokenize on their own threads. Cloning it is
/// cheap (the tokenizers are shared), so a clone per request costs nothing.
#[derive(Clone)]
pub struct InputEncoder {
    tokenizer: Arc<Tokenizer>,
    truncating_tokenizer: Arc<Tokenizer>,
    info: ModelInfo,
}

impl InputEncoder {
    /// As [`Embedder::encode`].
    pub fn encode(&self, input: &EmbedInput, truncate: bool, index: usize) -> Result<EncodedInput> {
        encode_input(&self.tokenizer, &self.truncating_tokenizer, &self.info, input, truncate, index)
    }

    /// What the model is.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }
}

fn encode_input(
    tokenizer: &Tokenizer,
    truncating_tokenizer: &Tokenizer,
    info: &ModelInfo,
    input: &EmbedInput,
    truncate: bool,
    index: usize,
) -> Result<EncodedInput> {
    let max_tokens = info.max_seq_length;
    match input {
        EmbedInput::Text(text) => {
            let tokenizer_error = |error: tokenizers::Error| Error::Tokenizer(format!("input {index}: {error}"));
            // The tokenizers crate panics on some malformed files instead of returning an error:
            // that is this input's error, not the worker's end.
            let encode = |tokenizer: &Tokenizer| {
                nstream_backend::catch_panic(|| tokenizer.encode(text.as_str(), true))
                    .map_err(|panic| Error::Tokenizer(format!("input {index}: the tokenizer failed ({panic})")))?
                    .map_err(tokenizer_error)
            };
            let encoding = encode(truncating_tokenizer)?;
            let truncated = !encoding.get_overflowing().is_empty();
            if truncated && !truncate {
                let tokens = encode(tokenizer)?.len();
                return Err(Error::InputTooLong { index, tokens, max_tokens });
            }
            let ids = encoding.get_ids().to_vec();
            if ids.is_empty() {
                return Err(Error::InvalidInput { index, message: "the text has no tokens".into() });
            }
            Ok(EncodedInput { ids, truncated })
        }
        EmbedInput::Tokens(ids) => {
            if ids.is_empty() {
                return Err(Error::InvalidInput { index, message: "the token array is empty".into() });
            }
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= info.vocab_size) {
                return Err(Error::InvalidInput {
                    index,
                    message: format!("token id {bad} is outside the vocabulary of {} tokens", info.vocab_size),
                });
            }
            if ids.len() > max_tokens && !truncate {
                return Err(Error::InputTooLong { index, tokens: ids.len(), max_tokens });
            }
            let truncated = ids.len() > max_tokens;
            Ok(EncodedInput { ids: ids[..ids.len().min(max_tokens)].to_vec(), truncated })
        }
    }
}

/// Reads a `tokenizer.json`, checking its JSON syntax first: the tokenizers crate (0.22) panics on
/// a syntax error inside `decoder` (found by fuzz/fuzz_targets/tokenizer_json.rs).
fn read_tokenizer(path: &Path) -> Result<Tokenizer> {
    let invalid = |message: String| Error::Tokenizer(format!("{}: {message}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|error| invalid(error.to_string()))?;
    serde_json::from_str::<serde::de::IgnoredAny>(&text)
        .map_err(|error| invalid(format!("not a tokenizer.json: {error}")))?;
    let tokenizer = text.parse::<Tokenizer>().map_err(|error| invalid(format!("not a tokenizer.json: {error}")))?;
    // The crate checks little when reading and panics later on what it missed (a template naming
    // an undeclared special token panics on every encode): one encode now makes that a load error.
    match nstream_backend::catch_panic(|| tokenizer.encode("a", true)) {
        Ok(_) => Ok(tokenizer),
        Err(panic) => {
            Err(invalid(format!("not a usable tokenizer.json: the tokenizers library failed on it ({panic})")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_syntax_error_in_the_decoder_is_an_error_not_a_panic() {
        // Found by fuzz/fuzz_targets/tokenizer_json.rs: tokenizers 0.22 panicked on it.
        let folder = tempfile::tempdir().expect("dir");
        let path = folder.path().join("tokenizer.json");
        std::fs::write(&path, br#"{"version": "1.0", "decoder": x}"#).expect("write");
        let error = read_tokenizer(&path).expect_err("refused").to_string();
        assert!(error.contains("not a tokenizer.json") && error.contains("line 1 column 31"), "{error}");
    }

    #[test]
    fn a_template_naming_an_undeclared_special_token_is_a_load_error_not_a_panic_per_request() {
        // tokenizers 0.22 reads this file, then panics on every encode with special tokens
        // (found by fuzz/fuzz_targets/tokenizer_json.rs on nstream-llm's loader).
        let folder = tempfile::tempdir().expect("folder");
        let path = folder.path().join("tokenizer.json");
        let json = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "decoder": null,
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {}},
            "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}"#;
        std::fs::write(&path, json).expect("write");
        let error = read_tokenizer(&path).expect_err("refused").to_string();
        assert!(error.contains("the tokenizers library failed on it"), "{error}");
    }
}
