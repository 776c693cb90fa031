//! Training data: JSONL records rendered with the model's chat template and tokenised, with a
//! loss mask that selects the assistant's tokens only.
//!
//! Two record shapes are read, one per line:
//! - `{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}`: the
//!   OpenAI fine-tuning format, which `nstream generate` writes;
//! - `{"prompt": "...", "completion": "..."}`: rendered as a user turn and an assistant turn.
//!
//! Each assistant turn is found by rendering the conversation up to it twice: with the
//! generation prompt (where the answer starts) and with the turn (where it ends). The text between
//! is the target (the turn's end marker included, so the model learns to stop); the rest is
//! context. The template must render each conversation as an extension of its prefixes, as
//! ChatML, Llama and Mistral templates do; one that rewrites earlier turns is refused.

use std::path::Path;

use nstream_backend::chat::{ChatMessage, Role};
use nstream_llm::template::ChatTemplate;
use nstream_llm::tokenizer::LlmTokenizer;
use serde::Deserialize;

use crate::error::{Error, Result};

/// One tokenised training example.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// The token ids.
    pub tokens: Vec<u32>,
    /// For each token, whether it is a target (an assistant token).
    pub mask: Vec<bool>,
    /// `file:line` of the record.
    pub location: String,
}

impl Example {
    /// The number of target tokens.
    pub fn target_count(&self) -> usize {
        // The first token is never predicted.
        self.mask.iter().skip(1).filter(|&&target| target).count()
    }
}

/// How records become examples.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DataOptions {
    /// Longest example in tokens; longer ones are cut (or refused with `no_truncate`).
    pub max_seq_len: usize,
    /// Refuse examples over `max_seq_len` instead of cutting them.
    pub no_truncate: bool,
    /// The share of the records that goes to validation when no validation file is given.
    pub validation_split: f64,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self { max_seq_len: 1024, no_truncate: false, validation_split: 0.0 }
    }
}

/// The examples of a run.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    /// Training examples, in file order.
    pub train: Vec<Example>,
    /// Validation examples, in file order.
    pub validation: Vec<Example>,
    /// Examples cut at `max_seq_len`.
    pub truncated: usize,
    /// Examples left with no target token after the cut (dropped).
    pub dropped: usize,
}

/// A record as read: either shape.
#[derive(Deserialize)]
#[serde(untagged)]
enum Record {
    Messages { messages: Vec<ChatMessage> },
    PromptCompletion { prompt: String, completion: String },
}

/// FNV-1a, 64 bits: a stable hash (the standard library's is randomised per process).
fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, &byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

/// Whether a record goes to validation: a hash of its content, so the same record always lands
/// on the same side, on every run.
pub fn is_validation(record: &serde_json::Value, share: f64) -> bool {
    if share <= 0.0 {
        return false;
    }
    let text = serde_json::to_string(record).unwrap_or_default();
    let hash = stable_hash(text.as_bytes());
    ((hash >> 11) as f64 / (1u64 << 53) as f64) < share
}

/// Tokenises a conversation: context tokens unmasked, assistant turns masked in. `location`
/// names the record in errors.
pub fn tokenize_messages(
    messages: &[ChatMessage],
    template: &ChatTemplate,
    tokenizer: &LlmTokenizer,
    location: &str,
) -> Result<(Vec<u32>, Vec<bool>)> {
    let invalid = |message: String| Error::InvalidData { location: location.to_owned(), message };
    if !messages.iter().any(|message| message.role == Role::Assistant && !message.text().is_empty()) {
        return Err(invalid("no assistant turn with content: nothing to learn from this record".into()));
    }
    let render = |messages: &[ChatMessage], generation_prompt: bool| {
        template
            .render(messages, generation_prompt, None)
            .map_err(|error| invalid(format!("the chat template failed: {error}")))
    };
    let encode = |text: &str| tokenizer.encode(text, false).map_err(|error| invalid(error.to_string()));
    let (mut tokens, mut mask) = (Vec::new(), Vec::new());
    let mut rendered = String::new();
    for (index, message) in messages.iter().enumerate() {
        if message.role != Role::Assistant {
            continue;
        }
        let prompt = render(&messages[..index], true)?;
        let turn = render(&messages[..=index], false)?;
        let (Some(context), Some(answer)) =
            (prompt.strip_prefix(rendered.as_str()), turn.strip_prefix(prompt.as_str()))
        else {
            return Err(invalid(format!(
                "the chat template does not render turn {} as an extension of the earlier ones, so its tokens \
                 cannot be told apart",
                index + 1
            )));
        };
        let context_tokens = encode(context)?;
        mask.extend(std::iter::repeat_n(false, context_tokens.len()));
        tokens.extend(context_tokens);
        let answer_tokens = encode(answer)?;
        mask.extend(std::iter::repeat_n(true, answer_tokens.len()));
        tokens.extend(answer_tokens);
        rendered = turn;
    }
    Ok((tokens, mask))
}

/// Reads a JSONL file of records and tokenises each; a malformed line, an empty file or a record
/// without an assistant turn is an error naming `file:line`.
pub fn read_examples(
    path: &Path,
    template: &ChatTemplate,
    tokenizer: &LlmTokenizer,
    mut keep: impl FnMut(&serde_json::Value) -> bool,
) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|cause| Error::io(path, cause))?;
    let file = path.display().to_string();
    let mut examples = Vec::new();
    let mut records = 0;
    for (index, line) in text.lines().enumerate() {
        let location = format!("{file}:{}", index + 1);
        if line.trim().is_empty() {
            continue;
        }
        records += 1;
        let value: serde_json::Value = serde_json::from_str(line).map_err(|error| Error::InvalidData {
            location: location.clone(),
            message: format!("not a JSON object: {error}"),
        })?;
        let record: Record = serde_json::from_value(value.clone()).map_err(|error| Error::InvalidData {
            location: location.clone(),
            message: format!(
                "expected {{\"messages\": [{{\"role\", \"content\"}}, ...]}} or {{\"prompt\", \"completion\"}} ({error})"
            ),
        })?;
        if !keep(&value) {
            continue;
        }
        let messages = match record {
            Record::Messages { messages } => messages,
            Record::PromptCompletion { prompt, completion } => {
                vec![ChatMessage::new(Role::User, prompt), ChatMessage::new(Role::Assistant, completion)]
            }
        };
        let (tokens, mask) = tokenize_messages(&messages, template, tokenizer, &location)?;
        examples.push(Example { tokens, mask, location });
    }
    if records == 0 {
        return Err(Error::InvalidData {
            location: file,
            message: "the file holds no record (expected JSON lines)".into(),
        });
    }
    Ok(examples)
}

/// Cuts the examples at `options.max_seq_len` (or refuses them), counting what was cut and
/// dropping examples left without a target.
fn limit(examples: Vec<Example>, options: &DataOptions, dataset: &mut Dataset) -> Result<Vec<Example>> {
    let mut kept = Vec::with_capacity(examples.len());
    for mut example in examples {
        if example.tokens.len() > options.max_seq_len {
            if options.no_truncate {
                return Err(Error::InvalidData {
                    location: example.location,
                    message: format!(
                        "{} tokens, over --max-seq-len {} (--no-truncate refuses to cut)",
                        example.tokens.len(),
                        options.max_seq_len
                    ),
                });
            }
            example.tokens.truncate(options.max_seq_len);
            example.mask.truncate(options.max_seq_len);
            dataset.truncated += 1;
        }
        if example.target_count() == 0 {
            dataset.dropped += 1;
            continue;
        }
        kept.push(example);
    }
    Ok(kept)
}

/// Reads the training file, and the validation file or the hashed share of the training file.
pub fn load_dataset(
    train: &Path,
    validation: Option<&Path>,
    options: &DataOptions,
    template: &ChatTemplate,
    tokenizer: &LlmTokenizer,
) -> Result<Dataset> {
    if options.max_seq_len < 2 {
        return Err(Error::setting("max-seq-len", "must be at least 2 tokens"));
    }
    if !(0.0..1.0).contains(&options.validation_split) {
        return Err(Error::setting("validation-split", format!("{} is not in [0, 1)", options.validation_split)));
    }
    let mut dataset = Dataset::default();
    let (train_examples, validation_examples) = match validation {
        Some(path) => {
            (read_examples(train, template, tokenizer, |_| true)?, read_examples(path, template, tokenizer, |_| true)?)
        }
        None => {
            let share = options.validation_split;
            (
                read_examples(train, template, tokenizer, |record| !is_validation(record, share))?,
                if share > 0.0 {
                    read_examples(train, template, tokenizer, |record| is_validation(record, share))?
                } else {
                    Vec::new()
                },
            )
        }
    };
    dataset.train = limit(train_examples, options, &mut dataset)?;
    dataset.validation = limit(validation_examples, options, &mut dataset)?;
    if dataset.train.is_empty() {
        return Err(Error::InvalidData {
            location: train.display().to_string(),
            message: "no training example left (every record went to validation or had no target token)".into(),
        });
    }
    Ok(dataset)
}
