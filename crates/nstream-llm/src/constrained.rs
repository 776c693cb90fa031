//! Constrained decoding: a token mask each step from a JSON schema or a grammar, so an answer
//! can only be text the constraint accepts.
//!
//! The engine is [llguidance](https://github.com/guidance-ai/llguidance), the one llama.cpp and
//! vLLM use: an Earley parser over a lexer of derivative-based regexes, walked over a trie of the
//! vocabulary's bytes. [`ConstraintEngine`] is built once per model from its tokenizer (the trie);
//! each constrained sequence owns a [`Constraint`] (its parser state), so sequences of a
//! continuous batch advance independently.
//!
//! JSON answers are written compactly with Python's separators (`", "` and `": "`) and no other
//! whitespace: flexible whitespace would let a sampled answer run on in newlines until
//! `max_tokens`. A schema keyword the engine does not implement (`not`, `if`, `uniqueItems`...)
//! is an error naming it, never an unconstrained answer.

use std::sync::Arc;

use llguidance::api::{GrammarWithLexer, ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{self, InferenceCapabilities, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use tokenizers::{DecoderWrapper, Tokenizer};

use crate::error::{Error, Result};
use crate::tokenizer::LlmTokenizer;

/// The JSON layout constrained answers are written in (see the module documentation).
fn json_layout() -> serde_json::Value {
    serde_json::json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    })
}

/// The vocabulary as llguidance sees it: each token's bytes in a trie, with the model's
/// tokenizer for the rare re-tokenisations the engine asks for.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<toktrie::TokenId> {
        self.trie.tokenize_with_greedy_fallback(bytes, |text| {
            self.tokenizer.encode(text, false).map(|encoding| encoding.get_ids().to_vec()).unwrap_or_default()
        })
    }
}

/// GPT-2's byte-level alphabet: the character each byte is written as in a byte-level BPE
/// vocabulary, reversed.
fn byte_level_alphabet() -> std::collections::HashMap<char, u8> {
    let mut map = std::collections::HashMap::new();
    let mut next = 0x100u32;
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let character = if printable {
            char::from(byte)
        } else {
            let character = char::from_u32(next).unwrap_or('\u{FFFD}');
            next += 1;
            character
        };
        map.insert(character, byte);
    }
    map
}

/// How the vocabulary writes bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    /// GPT-2 byte-level BPE (SmolLM2, Llama 3, Qwen 2).
    ByteLevel,
    /// SentencePiece style: `▁` for spaces, `<0xAB>` for raw bytes (Llama 2, Mistral).
    ByteFallback,
}

fn encoding_of(decoder: Option<&DecoderWrapper>) -> Option<Encoding> {
    match decoder? {
        DecoderWrapper::ByteLevel(_) => Some(Encoding::ByteLevel),
        DecoderWrapper::ByteFallback(_) => Some(Encoding::ByteFallback),
        DecoderWrapper::Sequence(sequence) => {
            sequence.get_decoders().iter().find_map(|decoder| encoding_of(Some(decoder)))
        }
        _ => None,
    }
}

/// Each token's bytes as it writes them into the text (special tokens as their name), for the
/// `bytes` of log probabilities.
pub fn vocabulary_bytes(tokenizer: &LlmTokenizer) -> Result<Vec<Vec<u8>>> {
    let mut words = token_bytes(tokenizer)?;
    for word in &mut words {
        if word.first() == Some(&TokTrie::SPECIAL_TOKEN_MARKER) {
            word.remove(0);
        }
    }
    Ok(words)
}

/// Each token's bytes; special tokens get llguidance's marker byte so text never matches them.
fn token_bytes(tokenizer: &LlmTokenizer) -> Result<Vec<Vec<u8>>> {
    let hf = tokenizer.hf_tokenizer();
    let encoding = encoding_of(hf.get_decoder()).ok_or_else(|| {
        Error::Unsupported("constrained decoding needs a byte-level or byte-fallback tokenizer".into())
    })?;
    let added = hf.get_added_tokens_decoder();
    let alphabet = byte_level_alphabet();
    let mut words = Vec::with_capacity(tokenizer.vocab_size());
    for id in 0..tokenizer.vocab_size() as u32 {
        let name = tokenizer.token(id).unwrap_or_default();
        let bytes = match added.get(&id) {
            Some(token) if token.special => {
                let mut bytes = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                bytes.extend_from_slice(token.content.as_bytes());
                bytes
            }
            // Added plain tokens (`<tool_call>` in Qwen 2.5) are stored as their text.
            Some(token) => token.content.as_bytes().to_vec(),
            None => match encoding {
                Encoding::ByteLevel => {
                    match name.chars().map(|c| alphabet.get(&c).copied()).collect::<Option<Vec<u8>>>() {
                        Some(bytes) => bytes,
                        // Not in the byte alphabet: unreachable by text, so never allowed.
                        None => {
                            let mut bytes = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                            bytes.extend_from_slice(name.as_bytes());
                            bytes
                        }
                    }
                }
                Encoding::ByteFallback => {
                    let hex = name.strip_prefix("<0x").and_then(|rest| rest.strip_suffix('>'));
                    match hex.and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
                        Some(byte) if name.len() == 6 => vec![byte],
                        _ => name.replace('\u{2581}', " ").into_bytes(),
                    }
                }
            },
        };
        words.push(bytes);
    }
    Ok(words)
}

/// Builds [`Constraint`]s for one model: its vocabulary trie and llguidance's parser factory.
pub struct ConstraintEngine {
    factory: Arc<ParserFactory>,
}

impl std::fmt::Debug for ConstraintEngine {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("ConstraintEngine").finish_non_exhaustive()
    }
}

impl ConstraintEngine {
    /// The engine for `tokenizer`'s vocabulary; its stop tokens end a constrained answer.
    pub fn new(tokenizer: &LlmTokenizer) -> Result<Self> {
        let words = token_bytes(tokenizer)?;
        let stops = tokenizer.stop_tokens();
        let eos = tokenizer
            .eos_token()
            .or_else(|| stops.first().copied())
            .ok_or_else(|| Error::Unsupported("constrained decoding needs an end-of-sequence token".into()))?;
        let info = TokRxInfo::new(words.len() as u32, eos);
        let mut trie = TokTrie::from(&info, &words);
        let mut ends: Vec<u32> = vec![eos];
        ends.extend(stops.iter().copied().filter(|&stop| stop != eos));
        trie = trie.with_eos_tokens(&ends);
        let vocabulary = Vocabulary { trie, tokenizer: tokenizer.hf_tokenizer().clone() };
        let environment: TokEnv = Arc::new(vocabulary);
        let mut factory = ParserFactory::new(&environment, InferenceCapabilities::default(), &[])
            .map_err(|error| Error::Unsupported(format!("constrained decoding: {error}")))?;
        factory.quiet();
        // Bound what one hostile schema may cost per token (llguidance's defaults, made explicit).
        *factory.limits_mut() = ParserLimits::default();
        Ok(Self { factory: Arc::new(factory) })
    }

    /// A constraint to JSON that validates against `schema`; `param` names the request field in
    /// errors (an unsupported keyword, a malformed schema).
    pub fn json_schema(&self, schema: &serde_json::Value, param: &str) -> Result<Constraint> {
        let mut schema = schema.clone();
        match &mut schema {
            serde_json::Value::Object(map) => {
                if map.contains_key("x-guidance") {
                    return Err(Error::invalid_param(param, "the schema keyword `x-guidance` is not accepted"));
                }
                map.insert("x-guidance".into(), json_layout());
            }
            serde_json::Value::Bool(_) => {}
            _ => return Err(Error::invalid_param(param, "a JSON schema must be an object or a boolean")),
        }
        self.grammar(TopLevelGrammar::from_grammar(GrammarWithLexer::from_json_schema(schema)), param)
    }

    /// A constraint to any JSON object (`response_format: {"type": "json_object"}`).
    pub fn json_object(&self, param: &str) -> Result<Constraint> {
        self.json_schema(&serde_json::json!({"type": "object"}), param)
    }

    /// A constraint to a Lark grammar (llguidance's dialect, which embeds schemas as
    /// `%json {...}`); used for tool calls.
    pub fn lark(&self, grammar: String, param: &str) -> Result<Constraint> {
        self.grammar(TopLevelGrammar::from_lark(grammar), param)
    }

    fn grammar(&self, grammar: TopLevelGrammar, param: &str) -> Result<Constraint> {
        let parser = self.factory.create_parser(grammar).map_err(|error| {
            Error::invalid_param(
                param,
                format!("the schema cannot be used for constrained decoding: {}", clean(&error)),
            )
        })?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(Error::invalid_param(
                param,
                format!("the schema cannot be used for constrained decoding: {error}"),
            ));
        }
        Ok(Constraint { matcher })
    }
}

/// llguidance's error text, with its wording for keywords it lacks made plain.
fn clean(error: &impl std::fmt::Display) -> String {
    error.to_string().replace("Unimplemented keys", "unsupported schema keywords")
}

/// One sequence's constraint: where its parser is, which tokens it allows next.
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Constraint").field("stopped", &self.matcher.is_stopped()).finish_non_exhaustive()
    }
}

impl Constraint {
    /// An independent copy at the same point (each choice of a request gets its own).
    pub fn fresh_copy(&self) -> Self {
        Self { matcher: self.matcher.deep_clone() }
    }

    /// Sets every logit the constraint forbids next to minus infinity (logits past the
    /// vocabulary too). Errors when the parser failed or allows nothing.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let mask: SimpleVob = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|error| Error::Inference(format!("constrained decoding: {error}")))?;
        if mask.is_zero() {
            return Err(Error::Inference("constrained decoding: no token is allowed next".into()));
        }
        let size = mask.len();
        for (token, logit) in logits.iter_mut().enumerate() {
            if token >= size || !mask.is_allowed(token as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances the parser past `token` (a token [`Constraint::mask`] allowed).
    pub fn accept(&mut self, token: u32) -> Result<()> {
        self.matcher.consume_token(token).map_err(|error| Error::Inference(format!("constrained decoding: {error}")))
    }

    /// Whether the constrained text is complete and nothing but the end may follow.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_level_alphabet_maps_every_byte_once() {
        let alphabet = byte_level_alphabet();
        assert_eq!(alphabet.len(), 256);
        assert_eq!(alphabet.get(&'\u{120}'), Some(&b' '));
        assert_eq!(alphabet.get(&'a'), Some(&b'a'));
        assert_eq!(alphabet.get(&'\u{10A}'), Some(&b'\n'));
    }
}
