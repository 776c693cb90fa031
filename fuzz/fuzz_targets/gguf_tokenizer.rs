//! The tokenizer built from GGUF metadata (`tokenizer.ggml.*`), then used on text: the bytes
//! after the header are encoded and the ids decoded again.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use nstream_llm::model::read_gguf;
use nstream_llm::tokenizer::{IncrementalDecoder, LlmTokenizer};

fuzz_target!(|data: &[u8]| {
    let mut reader = Cursor::new(data);
    let Ok(content) = read_gguf(&mut reader, "fuzz.gguf") else { return };
    let Ok(tokenizer) = LlmTokenizer::from_gguf(&content) else { return };
    let text = String::from_utf8_lossy(&data[data.len().min(content.tensor_data_offset as usize)..]);
    if let Ok(ids) = tokenizer.encode(&text, true) {
        let _ = tokenizer.decode(&ids, false);
        let mut decoder = IncrementalDecoder::after_prompt(&tokenizer, &ids[..ids.len() / 2]);
        for &id in &ids[ids.len() / 2..] {
            let _ = decoder.push(&tokenizer, id);
        }
        let _ = decoder.finish(&tokenizer);
    }
    for id in [0, 1, u32::MAX] {
        let _ = tokenizer.decode(&[id], true);
        let _ = tokenizer.token(id);
    }
});
