//! The tokenizer of a GGUF file, built from its metadata (no `tokenizer.json` needed).
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

/// A byte-level BPE tokenizer read from GGUF metadata, with the model's special tokens.
#[derive(Clone)]
pub struct GgufTokenizer {
    inner: Tokenizer,
    tokens: Vec<String>,
    bos_token: Option<u32>,
    eos_token: Option<u32>,
    add_bos: bool,
    stop_tokens: Vec<u32>,
    pre_tokenizer: String,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("GgufTokenizer")
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

impl GgufTokenizer {
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
        let mut stop_tokens: Vec<u32> = [eos_token, optional_u32(content, "tokenizer.ggml.eot_token_id")]
            .into_iter()
            .flatten()
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
        Ok(Self { inner, tokens, bos_token, eos_token, add_bos, stop_tokens, pre_tokenizer: pre_name })
    }

    /// Tokenizes `text`; special tokens written in it (`<|im_start|>`) become their ids. With
    /// `add_bos`, the beginning-of-sequence token is prepended when the model wants one
    /// (`tokenizer.ggml.add_bos_token`) and the text does not start with it already.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|error| Error::Tokenizer(error.to_string()))?;
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
        self.inner.decode(ids, skip_special).map_err(|error| Error::Tokenizer(error.to_string()))
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

    /// The `tokenizer.ggml.pre` name the pre-tokenizer was chosen by.
    pub fn pre_tokenizer_name(&self) -> &str {
        &self.pre_tokenizer
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

impl IncrementalDecoder {
    /// Adds one id and returns the text it completes (possibly empty while a character is
    /// still incomplete).
    pub fn push(&mut self, tokenizer: &GgufTokenizer, id: u32) -> Result<String> {
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
    pub fn finish(&mut self, tokenizer: &GgufTokenizer) -> Result<String> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(text.get(prefix.len()..).unwrap_or_default().to_owned())
    }
}
