//! Cutting a document into chunks of at most `max_tokens` tokens of the EmbeddingModel's
//! tokenizer, with `overlap_tokens` repeated between neighbours. With structure-aware splitting,
//! chunks end where paragraphs, headings and code blocks end, so a chunk seldom starts
//! mid-sentence; a block longer than a chunk is cut into windows.

use std::sync::Arc;

use nstream_core::{Chunking, Splitting};

use crate::error::{Error, Result};
use crate::source::Format;

/// Byte offsets of the tokens of a text, in order, without special tokens.
pub trait TokenOffsets: Send + Sync {
    /// The `(start, end)` byte offsets of each token of `text`.
    fn token_offsets(&self, text: &str) -> Result<Vec<(usize, usize)>>;
}

impl TokenOffsets for tokenizers::Tokenizer {
    fn token_offsets(&self, text: &str) -> Result<Vec<(usize, usize)>> {
        let encoding = self.encode(text, false).map_err(|error| Error::Tokenizer(error.to_string()))?;
        Ok(encoding.get_offsets().iter().copied().filter(|(start, end)| end > start).collect())
    }
}

/// Loads a `tokenizer.json` without padding or truncation, for chunking.
pub fn load_tokenizer(path: &std::path::Path) -> Result<tokenizers::Tokenizer> {
    let invalid = |message: String| Error::Tokenizer(format!("{}: {message}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|error| invalid(error.to_string()))?;
    // JSON syntax first: the tokenizers crate (0.22) panics on a syntax error inside `decoder`.
    serde_json::from_str::<serde::de::IgnoredAny>(&text)
        .map_err(|error| invalid(format!("not a tokenizer.json: {error}")))?;
    let mut tokenizer =
        text.parse::<tokenizers::Tokenizer>().map_err(|error| invalid(format!("not a tokenizer.json: {error}")))?;
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).map_err(|error| Error::Tokenizer(error.to_string()))?;
    Ok(tokenizer)
}

/// Tokens as runs of non-whitespace: for tests and tools without a model tokenizer.
#[derive(Clone, Copy, Debug, Default)]
pub struct WhitespaceTokens;

impl TokenOffsets for WhitespaceTokens {
    fn token_offsets(&self, text: &str) -> Result<Vec<(usize, usize)>> {
        let mut offsets = Vec::new();
        let mut start = None;
        for (index, character) in text.char_indices() {
            match (character.is_whitespace(), start) {
                (true, Some(begin)) => {
                    offsets.push((begin, index));
                    start = None;
                }
                (false, None) => start = Some(index),
                _ => {}
            }
        }
        if let Some(begin) = start {
            offsets.push((begin, text.len()));
        }
        Ok(offsets)
    }
}

/// One chunk of a document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextChunk {
    /// Position in the document, from 0.
    pub index: u32,
    /// The text.
    pub text: String,
    /// Byte offset of the chunk in the document's text.
    pub start: usize,
    /// Byte offset of its end.
    pub end: usize,
    /// Tokens in it.
    pub tokens: usize,
}

/// Cuts documents into chunks.
#[derive(Clone)]
pub struct Chunker {
    tokens: Arc<dyn TokenOffsets>,
    max_tokens: usize,
    overlap_tokens: usize,
    splitting: Splitting,
}

impl std::fmt::Debug for Chunker {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Chunker")
            .field("max_tokens", &self.max_tokens)
            .field("overlap_tokens", &self.overlap_tokens)
            .field("splitting", &self.splitting)
            .finish()
    }
}

impl Chunker {
    /// A chunker for a KnowledgeBase's `chunking` (validated: overlap below max).
    pub fn new(tokens: Arc<dyn TokenOffsets>, chunking: &Chunking) -> Self {
        let max_tokens = (chunking.max_tokens as usize).max(1);
        let overlap_tokens = (chunking.overlap_tokens as usize).min(max_tokens - 1);
        Self { tokens, max_tokens, overlap_tokens, splitting: chunking.splitting }
    }

    /// A fingerprint of the settings: part of each document's content hash, so changing the
    /// chunking re-indexes every document.
    pub fn fingerprint(&self) -> String {
        format!("max={};overlap={};splitting={:?}", self.max_tokens, self.overlap_tokens, self.splitting)
    }

    /// The chunks of a text; none for a text without tokens.
    pub fn chunk(&self, text: &str, format: Format) -> Result<Vec<TextChunk>> {
        let offsets = self.tokens.token_offsets(text)?;
        if offsets.is_empty() {
            return Ok(Vec::new());
        }
        let ranges = match self.splitting {
            Splitting::Tokens => windows(0, offsets.len(), self.max_tokens, self.overlap_tokens),
            Splitting::Auto => {
                let boundaries = block_starts(text, format.is_structured());
                self.pack(&offsets, &boundaries)
            }
        };
        Ok(ranges
            .into_iter()
            .enumerate()
            .map(|(index, (first, last))| {
                let start = offsets[first].0;
                let end = offsets[last - 1].1;
                TextChunk {
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                    text: text[start..end].to_string(),
                    start,
                    end,
                    tokens: last - first,
                }
            })
            .collect())
    }

    /// Packs whole blocks (token ranges between boundaries) into chunks; a block longer than a
    /// chunk becomes windows of its own. Each chunk after the first starts `overlap` tokens
    /// before the previous one ended.
    fn pack(&self, offsets: &[(usize, usize)], boundaries: &[Boundary]) -> Vec<(usize, usize)> {
        // Token index where each block starts; headings are remembered as section starts.
        let mut blocks: Vec<(usize, bool)> = Vec::new();
        let mut token = 0;
        for boundary in boundaries {
            while token < offsets.len() && offsets[token].0 < boundary.offset {
                token += 1;
            }
            if token < offsets.len() && blocks.last().is_none_or(|(start, _)| *start < token) {
                blocks.push((token, boundary.heading));
            }
        }
        if blocks.first().is_none_or(|(start, _)| *start > 0) {
            blocks.insert(0, (0, false));
        }
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        let mut current: Option<(usize, usize)> = None;
        let flush = |current: &mut Option<(usize, usize)>, ranges: &mut Vec<(usize, usize)>| {
            if let Some(range) = current.take() {
                ranges.push(range);
            }
        };
        for (position, (block_start, heading)) in blocks.iter().enumerate() {
            let block_end = blocks.get(position + 1).map_or(offsets.len(), |(next, _)| *next);
            let length = block_end - block_start;
            if length > self.max_tokens {
                flush(&mut current, &mut ranges);
                let from = self.overlapped_start(&ranges, *block_start);
                ranges.extend(windows(from, block_end, self.max_tokens, self.overlap_tokens));
                continue;
            }
            match current {
                // A heading starts a new section once the current chunk holds a fair amount.
                Some((start, end))
                    if block_end - start <= self.max_tokens && !(*heading && end - start >= self.max_tokens / 4) =>
                {
                    current = Some((start, block_end));
                }
                Some(_) => {
                    flush(&mut current, &mut ranges);
                    let from = self.overlapped_start(&ranges, *block_start);
                    let from = if block_end - from > self.max_tokens { *block_start } else { from };
                    current = Some((from, block_end));
                }
                None => {
                    let from = self.overlapped_start(&ranges, *block_start);
                    let from = if block_end - from > self.max_tokens { *block_start } else { from };
                    current = Some((from, block_end));
                }
            }
        }
        flush(&mut current, &mut ranges);
        ranges
    }

    /// Where a chunk beginning at `start` begins once it repeats the overlap of the previous one.
    fn overlapped_start(&self, ranges: &[(usize, usize)], start: usize) -> usize {
        match ranges.last() {
            Some((previous_start, previous_end)) if *previous_end == start => {
                start.saturating_sub(self.overlap_tokens).max(previous_start + 1)
            }
            _ => start,
        }
    }
}

/// Windows of `size` tokens over `[from, to)`, each starting `size - overlap` after the last.
fn windows(from: usize, to: usize, size: usize, overlap: usize) -> Vec<(usize, usize)> {
    let stride = size.saturating_sub(overlap).max(1);
    let mut ranges = Vec::new();
    let mut start = from;
    while start < to {
        let end = (start + size).min(to);
        ranges.push((start, end));
        if end == to {
            break;
        }
        start += stride;
    }
    ranges
}

/// Where a block of text starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Boundary {
    offset: usize,
    heading: bool,
}

/// The starts of paragraphs (after blank lines), and with markdown structure of headings and
/// fenced code blocks (kept whole).
fn block_starts(text: &str, markdown: bool) -> Vec<Boundary> {
    let mut boundaries = Vec::new();
    let mut offset = 0;
    let mut previous_blank = true;
    let mut in_fence = false;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim();
        let fence = markdown && (trimmed.starts_with("```") || trimmed.starts_with("~~~"));
        if in_fence {
            if fence {
                in_fence = false;
            }
        } else if !trimmed.is_empty() {
            let heading = markdown && trimmed.starts_with('#') && trimmed.trim_start_matches('#').starts_with(' ');
            if previous_blank || heading || fence {
                boundaries.push(Boundary { offset, heading });
            }
            in_fence = fence;
        }
        previous_blank = trimmed.is_empty() && !in_fence;
        offset += line.len();
    }
    boundaries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunker(max: u32, overlap: u32, splitting: Splitting) -> Chunker {
        let chunking = Chunking { max_tokens: max, overlap_tokens: overlap, splitting };
        Chunker::new(Arc::new(WhitespaceTokens), &chunking)
    }

    fn words(range: std::ops::Range<usize>) -> String {
        range.map(|index| format!("w{index}")).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn token_windows_overlap_and_cover_everything() {
        let text = words(0..25);
        let chunks = chunker(10, 3, Splitting::Tokens).chunk(&text, Format::Text).unwrap();
        let firsts: Vec<&str> = chunks.iter().map(|chunk| chunk.text.split(' ').next().unwrap()).collect();
        assert_eq!(firsts, ["w0", "w7", "w14", "w21"]);
        assert!(chunks.iter().all(|chunk| chunk.tokens <= 10));
        assert!(chunks.last().unwrap().text.ends_with("w24"));
        assert_eq!(&text[chunks[1].start..chunks[1].end], chunks[1].text);
    }

    #[test]
    fn paragraphs_are_packed_whole_and_headings_start_sections() {
        let text = format!("# One\n\n{}\n\n{}\n\n# Two\n\n{}\n", words(0..6), words(6..12), words(12..20));
        let chunks = chunker(20, 0, Splitting::Auto).chunk(&text, Format::Markdown).unwrap();
        assert_eq!(chunks.len(), 2, "{chunks:#?}");
        assert!(chunks[0].text.starts_with("# One") && chunks[0].text.ends_with("w11"));
        assert!(chunks[1].text.starts_with("# Two") && chunks[1].text.ends_with("w19"));
    }

    #[test]
    fn long_blocks_become_windows_and_nothing_exceeds_the_limit() {
        let text = format!("{}\n\n{}\n\n{}", words(0..5), words(5..40), words(40..44));
        let chunks = chunker(12, 2, Splitting::Auto).chunk(&text, Format::Text).unwrap();
        assert!(chunks.iter().all(|chunk| chunk.tokens <= 12), "{chunks:#?}");
        let all: String = chunks.iter().map(|chunk| chunk.text.clone()).collect::<Vec<_>>().join(" ");
        for index in 0..44 {
            assert!(all.split_whitespace().any(|word| word == format!("w{index}")), "w{index} lost: {chunks:#?}");
        }
    }

    #[test]
    fn fenced_code_is_not_split_on_blank_lines() {
        let text = "intro words\n\n```\ncode a\n\ncode b\n```\n\nafter";
        let boundaries = block_starts(text, true);
        assert_eq!(boundaries.len(), 3, "{boundaries:?}");
    }

    #[test]
    fn empty_text_has_no_chunks() {
        assert!(chunker(10, 2, Splitting::Auto).chunk("  \n\n ", Format::Text).unwrap().is_empty());
    }

    #[test]
    fn a_json_syntax_error_in_the_decoder_is_an_error_not_a_panic() {
        // Found by fuzz/fuzz_targets/tokenizer_json.rs: tokenizers 0.22 panicked on it.
        let folder = tempfile::tempdir().expect("dir");
        let path = folder.path().join("tokenizer.json");
        std::fs::write(&path, br#"{"version": "1.0", "decoder": x}"#).expect("write");
        let error = load_tokenizer(&path).expect_err("refused").to_string();
        assert!(error.contains("not a tokenizer.json") && error.contains("line 1 column 31"), "{error}");
    }
}
