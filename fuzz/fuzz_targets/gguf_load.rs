//! A GGUF file as nstream loads it: candle's header reader, the model's hyper-parameters and
//! weights (on CPU, kept as stored), and the tokenizer built from its metadata.
#![no_main]

use std::io::Cursor;

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use nstream_llm::Requantize;
use nstream_llm::model::{LlamaModel, read_gguf};
use nstream_llm::tokenizer::LlmTokenizer;

fuzz_target!(|data: &[u8]| {
    let mut reader = Cursor::new(data);
    let Ok(content) = read_gguf(&mut reader, "fuzz.gguf") else { return };
    let _ = LlmTokenizer::from_gguf(&content);
    let _ = LlamaModel::from_gguf(&content, &mut reader, &Device::Cpu, Requantize::Keep);
});
