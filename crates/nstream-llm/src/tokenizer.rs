//! The model's tokenizer: a Hugging Face `tokenizer.json`, or built from GGUF metadata when only
//! a GGUF exists ([`LlmTokenizer`] holds either, with the special tokens that matter for serving).
//!
//! GGUF files from llama.cpp's converter carry the vocabulary (`tokenizer.ggml.tokens`), the BPE
//! merges, each token's type and the name of the pre-tokenizer (`tokenizer.ggml.pre`). candle's
//! `Tokenizer::from_gguf`-style construction ignores the pre-tokenizer name and so tokenizes
//! SmolLM2 (`smollm`) with a leading space on every word. Here the pre-tokenizer is rebuilt the way
//! the model's Hugging Face `tokenizer.json` has it: for `smollm` (and the StarCoder family it comes
//! from) `Digits(individual) + ByteLevel(no prefix space)`, for `gpt2` plain `ByteLevel`, for the
//! Llama 3 and Qwen 2 families their split regex followed by `ByteLevel` without its own regex.
//! Control tokens (type 3) become special added tokens and user-defined ones (type 4) plain added
//! tokens, so `<|im_start|>` in a rendered chat template stays one token.

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Token names that end a turn in the common chat formats; each one present in the vocabulary
/// stops generation (besides the file's own end-of-sequence and end-of-turn ids).
const END_OF_TURN_TOKENS: &[&str] =
    &["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>"];

/// A tokenizer with the model's special tokens: from a Hugging Face `tokenizer.json`
/// ([`LlmTokenizer::from_hf`]) or a byte-level BPE read from GGUF metadata
/// ([`LlmTokenizer::from_gguf`]).
#[derive(Clone)]
pub struct LlmTokenizer {
    inner: Tokenizer,
    tokens: Vec<String>,
    bos_token: Option<u32>,
    eos_token: Option<u32>,
    add_bos: bool,
    stop_tokens: Vec<u32>,
    pre_tokenizer: String,
}

/// The name this type had when only GGUF tokenizers existed.
pub type GgufTokenizer = LlmTokenizer;

impl std::fmt::Debug for LlmTokenizer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LlmTokenizer")
            .field("vocab_size", &self.tokens.len())
            .field("pre_tokenizer", &self.pre_tokenizer)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("stop_tokens", &self.stop_tokens)
            .finish_non_exhaustive()
    }
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidModel { file: "gguf".into(), message: message.into() }
}

fn string_array(content: &gguf_file::Content, key: &str) -> Result<Vec<String>> {
    let values = content
        .metadata
        .get(key)
        .ok_or_else(|| invalid(format!("metadata key `{key}` is missing")))?
        .to_vec()
        .map_err(|error| invalid(format!("`{key}`: {error}")))?;
    values
        .iter()
        .map(|value| value.to_string().cloned().map_err(|error| invalid(format!("`{key}`: {error}"))))
        .collect()
}

fn optional_u32(content: &gguf_file::Content, key: &str) -> Option<u32> {
    content.metadata.get(key).and_then(|value| value.to_u32().ok())
}

/// The pre-tokenizer of a `tokenizer.ggml.pre` name, as the Hugging Face tokenizers have it.
fn pre_tokenizer(name: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let regex = SplitPattern::Regex(pattern.to_owned());
        let split = Split::new(regex, SplitDelimiterBehavior::Isolated, false)
            .map_err(|error| Error::Tokenizer(format!("split regex: {error}")))?;
        Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![PreTokenizerWrapper::Split(split), byte_level(false)])))
    };
    match name {
        "smollm" | "starcoder" | "refact" | "codeshell" => Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level(true),
        ]))),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" | "pixtral" => split(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" | "megrez" => split(QWEN2_SPLIT),
        "gpt2" | "gpt-2" | "default" | "" => Ok(byte_level(true)),
        other => {
            tracing::warn!(pre_tokenizer = other, "unknown GGUF pre-tokenizer; using GPT-2 byte-level splitting");
            Ok(byte_level(true))
        }
    }
}

impl LlmTokenizer {
    /// Builds the tokenizer from a GGUF file's metadata. Only byte-level BPE vocabularies
    /// (`tokenizer.ggml.model = gpt2`) are supported.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let model = content
            .metadata
            .get("tokenizer.ggml.model")
            .and_then(|value| value.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if model != "gpt2" {
            return Err(Error::Unsupported(format!(
                "GGUF tokenizer model {model:?}: only byte-level BPE (`gpt2`) vocabularies are supported"
            )));
        }
        let tokens = string_array(content, "tokenizer.ggml.tokens")?;
        let merges = string_array(content, "tokenizer.ggml.merges")?;
        let token_types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
            Some(value) => value
                .to_vec()
                .map_err(|error| invalid(format!("token types: {error}")))?
                .iter()
                .map(|value| value.to_i32().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let pre_name = content
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|value| value.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(id, token)| (token.clone(), id as u32)).collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|merge| {
                merge
                    .split_once(' ')
                    .map(|(left, right)| (left.to_owned(), right.to_owned()))
                    .ok_or_else(|| invalid(format!("merge {merge:?} is not two tokens")))
            })
            .collect::<Result<_>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|error| Error::Tokenizer(format!("BPE model: {error}")))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer(&pre_name)?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let added = |wanted: i32, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&token_types)
                .filter(|(_, kind)| **kind == wanted)
                .map(|(token, _)| AddedToken::from(token.clone(), special).normalized(false))
                .collect()
        };
        // 3 = control (`<|im_start|>`), 4 = user-defined (`<think>`), as llama.cpp writes them.
        inner.add_special_tokens(&added(3, true));
        inner.add_tokens(&added(4, false));

        let bos_token = optional_u32(content, "tokenizer.ggml.bos_token_id");
        let eos_token = optional_u32(content, "tokenizer.ggml.eos_token_id");
        let add_bos = content
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|value| value.to_bool().ok())
            .unwrap_or(false);
        let stop_tokens = stop_tokens(
            [eos_token, optional_u32(content, "tokenizer.ggml.eot_token_id")].into_iter().flatten(),
            &tokens,
        );
        Ok(Self { inner, tokens, bos_token, eos_token, add_bos, stop_tokens, pre_tokenizer: pre_name })
    }

    /// Loads a Hugging Face `tokenizer.json` (any model the `tokenizers` crate reads: byte-level
    /// BPE, SentencePiece-style BPE with byte fallback...). `config` is the model's
    /// `tokenizer_config.json` (special-token names, `add_bos_token`); `eos_ids` the end ids of
    /// `generation_config.json`/`config.json`, which stop generation besides the end-of-sequence
    /// token and the chat-format closers. Without `add_bos_token` the beginning-of-sequence token
    /// is added when the tokenizer's post-processor adds it (Llama 2 and 3 do, SmolLM2 does not).
    pub fn from_hf(
        path: &std::path::Path,
        config: &HfTokenizerConfig,
        eos_ids: &[u32],
        bos_id: Option<u32>,
    ) -> Result<Self> {
        // The tokenizers crate checks little of a file when reading it and panics later on what
        // it missed (found by fuzzing: a template naming an undeclared special token): a panic
        // while loading and probing is this file's error, not the process's end.
        nstream_backend::catch_panic(|| Self::read_hf(path, config, eos_ids, bos_id)).unwrap_or_else(|panic| {
            Err(Error::InvalidModel {
                file: path.display().to_string(),
                message: format!("not a usable tokenizer.json: the tokenizers library failed on it ({panic})"),
            })
        })
    }

    fn read_hf(
        path: &std::path::Path,
        config: &HfTokenizerConfig,
        eos_ids: &[u32],
        bos_id: Option<u32>,
    ) -> Result<Self> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|cause| Error::Io { path: file.clone(), cause })?;
        let invalid = |error: &dyn std::fmt::Display| Error::InvalidModel {
            file: file.clone(),
            message: format!("not a tokenizer.json: {error}"),
        };
        // JSON syntax first: the tokenizers crate panics on a syntax error inside `decoder`
        // (tokenizers 0.22 `DecoderWrapper::deserialize` unwraps it).
        let json = serde_json::from_str::<serde_json::Value>(&text).map_err(|error| invalid(&error))?;
        if let Some(problem) = json.get("decoder").and_then(|decoder| unsafe_decoder(decoder, "decoder")) {
            return Err(invalid(&problem));
        }
        let inner = text.parse::<Tokenizer>().map_err(|error| invalid(&error))?;
        let size = inner.get_vocab_size(true);
        let tokens: Vec<String> = (0..size as u32).map(|id| inner.id_to_token(id).unwrap_or_default()).collect();
        let id_of = |name: &Option<String>| name.as_deref().and_then(|name| inner.token_to_id(name));
        let bos_token = id_of(&config.bos_token).or(bos_id);
        let eos_token = id_of(&config.eos_token).or(eos_ids.first().copied());
        let add_bos = match config.add_bos_token {
            Some(add) => add,
            None => match bos_token {
                Some(bos) => {
                    let with = inner.encode("a", true).map_err(|error| Error::Tokenizer(error.to_string()))?;
                    let without = inner.encode("a", false).map_err(|error| Error::Tokenizer(error.to_string()))?;
                    with.get_ids().first() == Some(&bos) && without.get_ids().first() != Some(&bos)
                }
                None => false,
            },
        };
        let stop_tokens = stop_tokens(eos_token.into_iter().chain(eos_ids.iter().copied()), &tokens);
        Ok(Self { inner, tokens, bos_token, eos_token, add_bos, stop_tokens, pre_tokenizer: "tokenizer.json".into() })
    }

    /// Tokenizes `text`; special tokens written in it (`<|im_start|>`) become their ids. With
    /// `add_bos`, the beginning-of-sequence token is prepended when the model wants one
    /// (`tokenizer.ggml.add_bos_token`) and the text does not start with it already.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let encoding = nstream_backend::catch_panic(|| self.inner.encode(text, false))
            .map_err(Error::Tokenizer)?
            .map_err(|error| Error::Tokenizer(error.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        if add_bos
            && self.add_bos
            && let Some(bos) = self.bos_token
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Turns ids back into text, leaving special tokens out when `skip_special` is set.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        nstream_backend::catch_panic(|| self.inner.decode(ids, skip_special))
            .map_err(Error::Tokenizer)?
            .map_err(|error| Error::Tokenizer(error.to_string()))
    }

    /// The number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The token's text as stored in the vocabulary (byte-level alphabet), if the id exists.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of a token written as in the vocabulary, if it exists.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The beginning-of-sequence token, if the file names one.
    pub fn bos_token(&self) -> Option<u32> {
        self.bos_token
    }

    /// The end-of-sequence token, if the file names one.
    pub fn eos_token(&self) -> Option<u32> {
        self.eos_token
    }

    /// Tokens that end generation: end-of-sequence, end-of-turn and the chat-format closers.
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }

    /// Whether [`LlmTokenizer::encode`] prepends the beginning-of-sequence token when asked to.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// The underlying Hugging Face tokenizer (for the constrained-decoding vocabulary).
    pub(crate) fn hf_tokenizer(&self) -> &Tokenizer {
        &self.inner
    }

    /// The `tokenizer.ggml.pre` name the pre-tokenizer was chosen by (`tokenizer.json` for a
    /// Hugging Face tokenizer, whose pre-tokenizer is its own).
    pub fn pre_tokenizer_name(&self) -> &str {
        &self.pre_tokenizer
    }
}

/// The end ids, plus the chat-format closers present in the vocabulary, sorted and deduplicated.
fn stop_tokens(ends: impl Iterator<Item = u32>, tokens: &[String]) -> Vec<u32> {
    let mut stop_tokens: Vec<u32> = ends
        .chain(
            END_OF_TURN_TOKENS
                .iter()
                .filter_map(|name| tokens.iter().position(|token| token == name))
                .map(|id| id as u32),
        )
        .filter(|&id| (id as usize) < tokens.len())
        .collect();
    stop_tokens.sort_unstable();
    stop_tokens.dedup();
    stop_tokens
}

/// What nstream reads from a Hugging Face `tokenizer_config.json` (and `chat_template.jinja`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HfTokenizerConfig {
    /// `bos_token`, as text.
    pub bos_token: Option<String>,
    /// `eos_token`, as text.
    pub eos_token: Option<String>,
    /// `add_bos_token`, when the file says.
    pub add_bos_token: Option<bool>,
    /// The chat template: `chat_template.jinja` when given, else `chat_template` (a string, or
    /// the `default` entry of a list of named templates).
    pub chat_template: Option<String>,
}

impl HfTokenizerConfig {
    /// Reads `tokenizer_config.json` and `chat_template.jinja`, each when present.
    pub fn read(config: Option<&std::path::Path>, chat_template: Option<&std::path::Path>) -> Result<Self> {
        let read = |path: &std::path::Path| {
            std::fs::read_to_string(path).map_err(|cause| Error::Io { path: path.display().to_string(), cause })
        };
        let mut parsed = Self::default();
        if let Some(path) = config {
            let file = path.display().to_string();
            let json: serde_json::Value = serde_json::from_str(&read(path)?).map_err(|error| Error::InvalidModel {
                file: file.clone(),
                message: format!("not valid JSON: {error}"),
            })?;
            // Special tokens are strings or AddedToken objects (`{"content": ...}`).
            let token = |key: &str| match json.get(key) {
                Some(serde_json::Value::String(text)) => Some(text.clone()),
                Some(value) => value.get("content").and_then(|content| content.as_str()).map(str::to_owned),
                None => None,
            };
            parsed.bos_token = token("bos_token");
            parsed.eos_token = token("eos_token");
            parsed.add_bos_token = json.get("add_bos_token").and_then(serde_json::Value::as_bool);
            parsed.chat_template = match json.get("chat_template") {
                Some(serde_json::Value::String(template)) => Some(template.clone()),
                Some(serde_json::Value::Array(named)) => named
                    .iter()
                    .find(|entry| entry.get("name").and_then(|name| name.as_str()) == Some("default"))
                    .and_then(|entry| entry.get("template")?.as_str().map(str::to_owned)),
                _ => None,
            };
        }
        if let Some(path) = chat_template {
            parsed.chat_template = Some(read(path)?);
        }
        Ok(parsed)
    }
}

/// Turns a growing list of generated ids into text pieces, never splitting a UTF-8 character
/// that spans several byte-level tokens (text-generation-inference's prefix/read offsets).
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

/// Prompt tokens an [`IncrementalDecoder`] keeps as context.
const DECODER_CONTEXT: usize = 4;

impl IncrementalDecoder {
    /// A decoder that continues `prompt`: its last few ids are decoded along with the first
    /// generated ones and their text left out, so tokenizers whose decoder strips a leading space
    /// (SentencePiece-style: Llama 2, Mistral) keep the space of the first generated word. Falls
    /// back to no context when the prompt's tail does not decode to whole characters.
    pub fn after_prompt(tokenizer: &LlmTokenizer, prompt: &[u32]) -> Self {
        let tail = &prompt[prompt.len().saturating_sub(DECODER_CONTEXT)..];
        match tokenizer.decode(tail, true) {
            Ok(text) if !text.contains('\u{FFFD}') => {
                Self { ids: tail.to_vec(), prefix_offset: 0, read_offset: tail.len() }
            }
            _ => Self::default(),
        }
    }

    /// Adds one id and returns the text it completes (possibly empty while a character is
    /// still incomplete).
    pub fn push(&mut self, tokenizer: &LlmTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') {
            let new_text = text.get(prefix.len()..).unwrap_or_default().to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(new_text)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (an incomplete character at the very end), flushed as is.
    pub fn finish(&mut self, tokenizer: &LlmTokenizer) -> Result<String> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(text.get(prefix.len()..).unwrap_or_default().to_owned())
    }
}

/// A decoder the tokenizers crate would panic on while decoding, found in `decoder` (or in a
/// `Sequence` inside it): `Strip` with `stop` above 0 indexes before the start of a token made
/// only of its `content` character and shorter than `stop` (tokenizers 0.22, found by fuzzing).
/// Real tokenizers strip at the start only (`stop: 0`).
fn unsafe_decoder(decoder: &serde_json::Value, path: &str) -> Option<String> {
    match decoder.get("type").and_then(serde_json::Value::as_str) {
        Some("Strip") => {
            let stop = decoder.get("stop").and_then(serde_json::Value::as_u64).unwrap_or(0);
            (stop > 0).then(|| {
                format!(
                    "{path}.stop is {stop}: a Strip decoder that strips the end of tokens is not supported (expected 0)"
                )
            })
        }
        Some("Sequence") => decoder.get("decoders").and_then(serde_json::Value::as_array).and_then(|decoders| {
            decoders
                .iter()
                .enumerate()
                .find_map(|(index, inner)| unsafe_decoder(inner, &format!("{path}.decoders[{index}]")))
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_syntax_error_in_the_decoder_is_an_error_not_a_panic() {
        // Found by fuzz/fuzz_targets/tokenizer_json.rs: tokenizers 0.22 panicked on it.
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("tokenizer.json");
        std::fs::write(&path, br#"{"version": "1.0", "decoder": x}"#).unwrap();
        let error = LlmTokenizer::from_hf(&path, &HfTokenizerConfig::default(), &[], None).unwrap_err().to_string();
        assert!(error.contains("tokenizer.json") && error.contains("not a tokenizer.json"), "{error}");
        assert!(error.contains("line 1 column 31"), "{error}");
    }

    #[test]
    fn a_strip_decoder_that_strips_the_end_is_refused_not_a_panic_when_decoding() {
        // Found by fuzz/fuzz_targets/tokenizer_json.rs (10-minute run): tokenizers 0.22's Strip
        // decoder indexes before the start of a token shorter than `stop` made of `content`.
        let json = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [{"type": "Strip", "content": " ", "start": 0, "stop": 2}]},
            "model": {"type": "WordLevel", "vocab": {" ": 0, "a": 1}, "unk_token": "a"}}"#;
        let upstream = json.parse::<Tokenizer>().expect("tokenizers reads it");
        let decoded = std::panic::catch_unwind(|| upstream.decode(&[0], false));
        assert!(decoded.is_err(), "tokenizers no longer panics here: the check may go");
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("tokenizer.json");
        std::fs::write(&path, json).unwrap();
        let error = LlmTokenizer::from_hf(&path, &HfTokenizerConfig::default(), &[], None).unwrap_err().to_string();
        assert!(error.contains("decoder.decoders[0].stop is 2") && error.contains("expected 0"), "{error}");
    }

    #[test]
    fn a_template_naming_an_undeclared_special_token_is_an_error_not_a_panic() {
        // Found by fuzz/fuzz_targets/tokenizer_json.rs (10-minute run): tokenizers 0.22 reads it,
        // then panics adding the template's special tokens.
        let json = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "decoder": null,
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<t>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
            "model": {"type": "WordLevel", "vocab": {"a": 0, "<s>": 1}, "unk_token": "a"}}"#;
        let upstream = json.parse::<Tokenizer>().expect("tokenizers reads it");
        let encoded = std::panic::catch_unwind(|| upstream.encode("a", true));
        assert!(encoded.is_err(), "tokenizers no longer panics here");
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("tokenizer.json");
        std::fs::write(&path, json).unwrap();
        let config = HfTokenizerConfig { bos_token: Some("<s>".into()), ..HfTokenizerConfig::default() };
        let error = LlmTokenizer::from_hf(&path, &config, &[], None).unwrap_err().to_string();
        assert!(error.contains("the tokenizers library failed on it"), "{error}");
    }
}
