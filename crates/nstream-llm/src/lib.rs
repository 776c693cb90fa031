//! Causal language models on candle: GGUF Llama loading, tokenizer, chat template, sampling, batching.

pub mod model;
pub mod sampling;
pub mod template;
pub mod tokenizer;
mod error;

pub use error::{Error, Result};
