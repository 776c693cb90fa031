//! Hugging Face safetensors checkpoints (config.json + model.safetensors + tokenizer.json) against
//! transformers, on tiny random models made by scripts/llm-safetensors-reference.py
//! (tests/fixtures/llm/tiny-llama: a Llama in f32 with GQA, the same weights in bf16, a
//! tied-embedding f16 Llama with one KV head and rope_theta 500000, and a bf16 Qwen2 with q/k/v
//! biases). Each is laid out as a Hugging Face cache in a temporary folder and resolved through
//! nstream-hub offline, as the server does.

use std::path::{Path, PathBuf};

use candle_core::Device;
use nstream_backend::chat::{ChatMessage, Role};
use nstream_backend::{CompletionRequest, Input, ModelBackend};
use nstream_hub::{Hub, ModelSource, WeightFormat};
use nstream_llm::model::{LlamaModel, StepInput};
use nstream_llm::tokenizer::{HfTokenizerConfig, LlmTokenizer};
use nstream_llm::{LlmBackend, LlmOptions, SafetensorsFiles};
use serde::Deserialize;

const VARIANTS: &[&str] = &["f32", "bf16", "tied", "qwen2"];
const REVISION: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Deserialize)]
struct Reference {
    chat_messages: Vec<serde_json::Value>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    kind: String,
    text: String,
    ids: Vec<u32>,
    last_logits: Vec<f32>,
    greedy: Vec<u32>,
}

fn fixture(variant: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llm/tiny-llama").join(variant)
}

fn reference(variant: &str) -> Reference {
    let text = std::fs::read_to_string(fixture(variant).join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference")
}

/// A temporary Hugging Face cache holding the variant as `nstream-test/tiny-llama-<variant>`.
struct Cache {
    root: PathBuf,
}

impl Cache {
    fn new(variant: &str) -> Self {
        let unique = format!(
            "nstream-llm-safetensors-{}-{variant}-{:?}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
        );
        let root = std::env::temp_dir().join(unique);
        let repo = root.join(format!("models--nstream-test--tiny-llama-{variant}"));
        let snapshot = repo.join("snapshots").join(REVISION);
        std::fs::create_dir_all(&snapshot).expect("snapshot dir");
        std::fs::create_dir_all(repo.join("refs")).expect("refs dir");
        std::fs::write(repo.join("refs/main"), REVISION).expect("ref");
        for entry in std::fs::read_dir(fixture(variant)).expect("fixture") {
            let path = entry.expect("entry").path();
            if path.file_name().is_some_and(|name| name != "reference.json") {
                std::fs::copy(&path, snapshot.join(path.file_name().expect("name"))).expect("copy");
            }
        }
        Self { root }
    }

    fn hub(&self) -> Hub {
        Hub::new(&self.root).with_offline(true)
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn source(variant: &str) -> ModelSource {
    ModelSource::new(format!("nstream-test/tiny-llama-{variant}"))
}

fn load_parts(variant: &str) -> (LlamaModel, LlmTokenizer) {
    let cache = Cache::new(variant);
    let resolved = cache.hub().resolve_model(&source(variant)).expect("resolve");
    assert!(matches!(resolved.format, WeightFormat::Safetensors { .. }), "{:?}", resolved.format);
    let files = SafetensorsFiles::from_resolved(&resolved).expect("files");
    let model = LlamaModel::from_safetensors(&files.config, &files.weights, &Device::Cpu).expect("model");
    let config = HfTokenizerConfig::read(files.tokenizer_config.as_deref(), files.chat_template.as_deref())
        .expect("tokenizer config");
    let tokenizer = LlmTokenizer::from_hf(&files.tokenizer, &config, &[2, 0], Some(0)).expect("tokenizer");
    (model, tokenizer)
}

fn max_abs_diff(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    ours.iter().zip(theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (index, value) in values.iter().enumerate() {
        if *value > values[best] {
            best = index;
        }
    }
    best as u32
}

/// Logits after each prompt (one prefill step) and the greedy continuation (one decode step per
/// token through the KV cache) equal transformers' in float32 on the stored weights.
fn agrees_with_transformers(variant: &str) {
    let (model, tokenizer) = load_parts(variant);
    assert_eq!(model.dtype(), candle_core::DType::F32, "CPU computes in f32");
    assert!(model.config().rope_is_neox);
    let reference = reference(variant);
    let mut worst: f32 = 0.0;
    for case in &reference.cases {
        let ids = tokenizer.encode(&case.text, true).expect("encode");
        assert_eq!(ids, case.ids, "{variant}: token ids of {:?}", case.text);
        let mut cache = model.new_cache(64, 64).expect("cache");
        let logits = model.forward(&mut [StepInput { tokens: &case.ids, cache: &mut cache }]).expect("prefill");
        let logits: Vec<f32> = logits.squeeze(0).expect("row").to_vec1().expect("logits");
        let diff = max_abs_diff(&logits, &case.last_logits);
        worst = worst.max(diff);
        assert!(diff < 1e-3, "{variant} {:?}: max |logit diff| {diff}", case.text);
        let mut greedy = vec![argmax(&logits)];
        while greedy.len() < case.greedy.len() {
            let last = [*greedy.last().expect("token")];
            let logits = model.forward(&mut [StepInput { tokens: &last, cache: &mut cache }]).expect("decode");
            greedy.push(argmax(&logits.squeeze(0).expect("row").to_vec1().expect("logits")));
        }
        assert_eq!(greedy, case.greedy, "{variant} {:?}: greedy tokens", case.text);
    }
    eprintln!("{variant}: max |logit diff| vs transformers over {} prompts: {worst:e}", reference.cases.len());
}

#[test]
fn f32_checkpoint_agrees_with_transformers() {
    agrees_with_transformers("f32");
}

#[test]
fn bf16_checkpoint_agrees_with_transformers() {
    agrees_with_transformers("bf16");
}

#[test]
fn tied_f16_checkpoint_with_one_kv_head_agrees_with_transformers() {
    agrees_with_transformers("tied");
}

#[test]
fn qwen2_checkpoint_with_attention_biases_agrees_with_transformers() {
    agrees_with_transformers("qwen2");
}

/// The whole server path: resolve through the hub, render the chat template, tokenize, batch and
/// decode greedily in the scheduler; every variant's chat prompt equals transformers'
/// `apply_chat_template` and the greedy completion equals transformers' tokens.
#[tokio::test(flavor = "multi_thread")]
async fn the_backend_serves_safetensors_checkpoints_like_transformers() {
    for variant in VARIANTS {
        let cache = Cache::new(variant);
        let backend =
            LlmBackend::load_with("tiny", &cache.hub(), &source(variant), LlmOptions::default()).expect("load");
        let info = backend.info();
        let architecture = if *variant == "qwen2" { "qwen2" } else { "llama" };
        assert_eq!((info.architecture.as_str(), info.weights.as_str()), (architecture, "f32"));
        assert!(info.has_chat_template);
        assert_eq!(info.context_length, 256);
        let reference = reference(variant);
        let messages: Vec<ChatMessage> = reference
            .chat_messages
            .iter()
            .map(|message| {
                let role = match message["role"].as_str() {
                    Some("system") => Role::System,
                    _ => Role::User,
                };
                ChatMessage::new(role, message["content"].as_str().unwrap_or_default())
            })
            .collect();
        let chat = reference.cases.iter().find(|case| case.kind == "chat").expect("chat case");
        assert_eq!(backend.render_chat(&messages, None).expect("render"), chat.text);
        // `<|im_end|>` (generation_config eos) and `<|endoftext|>` stop generation.
        assert_eq!(backend.tokenizer().stop_tokens(), &[0, 2]);

        // Several prompts at once go through continuous batching together.
        let requests = reference.cases.iter().map(|case| {
            let request = CompletionRequest {
                max_tokens: Some(case.greedy.len() as u32),
                temperature: Some(0.0),
                ignore_eos: true,
                prompt: Input::Tokens(case.ids.clone()),
                ..CompletionRequest::new("tiny", "")
            };
            backend.complete(request)
        });
        let responses = futures_util::future::join_all(requests).await;
        for (case, response) in reference.cases.iter().zip(responses) {
            let response = response.expect("complete");
            let expected = backend.tokenizer().decode(&case.greedy, true).expect("decode");
            assert_eq!(response.choices[0].text, expected, "{variant} {:?}", case.text);
            assert_eq!(response.usage.expect("usage").completion_tokens as usize, case.greedy.len());
        }
    }
}

#[test]
fn a_folder_loads_like_the_hub_and_bad_files_are_named() {
    let backend = LlmBackend::from_safetensors_dir("tiny", &fixture("f32"), LlmOptions::default()).expect("folder");
    assert_eq!(backend.info().vocab_size, 384);

    // A checkpoint missing a tensor: the error names the tensor and the file.
    let cache = Cache::new("f32");
    let resolved = cache.hub().resolve_model(&source("f32")).expect("resolve");
    let files = SafetensorsFiles::from_resolved(&resolved).expect("files");
    let tied_weights = fixture("tied").join("model.safetensors");
    let error = LlamaModel::from_safetensors(&files.config, &[tied_weights], &Device::Cpu).expect_err("wrong weights");
    let message = error.to_string();
    assert!(message.contains("k_proj.weight") && message.contains("model.safetensors"), "{message}");

    // Not a safetensors file at all.
    let error = LlamaModel::from_safetensors(&files.config, std::slice::from_ref(&files.tokenizer), &Device::Cpu)
        .expect_err("not safetensors");
    assert!(error.to_string().contains("tokenizer.json"), "{error}");

    // An architecture that is not the Llama layout.
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&files.config).expect("config")).expect("json");
    config["model_type"] = "gpt2".into();
    let error = nstream_llm::model::LlamaConfig::from_hf_config(&config, "config.json").expect_err("gpt2");
    assert!(error.to_string().contains("gpt2"), "{error}");
}

#[test]
fn hugging_face_rope_settings_are_read() {
    use nstream_llm::model::{LlamaConfig, RopeScaling};
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 10, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}
    });
    let parsed = LlamaConfig::from_hf_config(&config, "config.json").expect("llama 3.1");
    assert_eq!(parsed.rope_theta, 500000.0);
    assert_eq!(parsed.context_length, nstream_llm::model::MAX_CONTEXT);
    assert!(matches!(parsed.rope_scaling, RopeScaling::Llama3 { factor: 8.0, .. }));
    let mistral = serde_json::json!({
        "model_type": "mistral", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
        "vocab_size": 10, "sliding_window": 1024, "max_position_embeddings": 32768
    });
    assert_eq!(LlamaConfig::from_hf_config(&mistral, "config.json").expect("mistral").context_length, 1024);
    let yarn = serde_json::json!({
        "model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
        "vocab_size": 10, "rope_scaling": {"type": "yarn", "factor": 4.0}
    });
    assert!(LlamaConfig::from_hf_config(&yarn, "config.json").is_err());
}

#[derive(Deserialize)]
struct TokenizerCase {
    text: String,
    ids: Vec<u32>,
    ids_with_special: Vec<u32>,
    decoded: String,
}

#[derive(Deserialize)]
struct TokenizerExpected {
    cases: Vec<TokenizerCase>,
}

/// A Llama 2 / Mistral style tokenizer.json (byte fallback, `▁` spaces, a decoder that strips
/// the leading space, `<s>` added by the post-processor) encodes and decodes as `tokenizers` does
/// in Python, and streamed text keeps the space before the first generated word.
#[test]
fn sentencepiece_style_tokenizers_encode_and_stream_like_python() {
    use nstream_llm::tokenizer::IncrementalDecoder;
    let folder = fixture("sentencepiece");
    let config = HfTokenizerConfig {
        bos_token: Some("<s>".into()),
        eos_token: Some("</s>".into()),
        ..HfTokenizerConfig::default()
    };
    let tokenizer = LlmTokenizer::from_hf(&folder.join("tokenizer.json"), &config, &[], None).expect("tokenizer");
    assert!(tokenizer.adds_bos(), "the post-processor adds <s>");
    assert_eq!((tokenizer.bos_token(), tokenizer.eos_token()), (Some(1), Some(2)));
    let expected: TokenizerExpected =
        serde_json::from_str(&std::fs::read_to_string(folder.join("expected.json")).expect("expected")).expect("json");
    for case in &expected.cases {
        assert_eq!(tokenizer.encode(&case.text, false).expect("encode"), case.ids, "{:?}", case.text);
        assert_eq!(tokenizer.encode(&case.text, true).expect("encode"), case.ids_with_special, "{:?}", case.text);
        assert_eq!(tokenizer.decode(&case.ids, true).expect("decode"), case.decoded);
    }

    let ids = &expected.cases[1].ids; // "The capital of France is Paris."
    // Generation starts at the last word: its first token begins with `▁`.
    let split = ids.iter().rposition(|&id| tokenizer.token(id).is_some_and(|token| token.starts_with('▁')));
    let (prompt, generated) = ids.split_at(split.expect("a word start"));
    let whole = tokenizer.decode(ids, true).expect("decode");
    let before = tokenizer.decode(prompt, true).expect("decode");
    let mut decoder = IncrementalDecoder::after_prompt(&tokenizer, prompt);
    let mut streamed = String::new();
    for &id in generated {
        streamed.push_str(&decoder.push(&tokenizer, id).expect("push"));
    }
    streamed.push_str(&decoder.finish(&tokenizer).expect("finish"));
    assert_eq!(streamed, whole[before.len()..]);
    assert!(streamed.starts_with(' '), "{streamed:?}");
    // Without the prompt as context the decoder's strip would eat that space.
    let mut plain = IncrementalDecoder::default();
    let alone: String = generated.iter().map(|&id| plain.push(&tokenizer, id).expect("push")).collect();
    assert_eq!(format!(" {alone}"), streamed);

    // Byte-fallback pieces of one character are held back until the character is whole.
    let emoji = &expected.cases[2].ids; // "café 😀 naïve"
    let mut decoder = IncrementalDecoder::after_prompt(&tokenizer, &[]);
    let pieces: Vec<String> = emoji.iter().map(|&id| decoder.push(&tokenizer, id).expect("push")).collect();
    assert!(pieces.iter().all(|piece| !piece.contains('\u{FFFD}')), "{pieces:?}");
    assert_eq!(pieces.concat() + &decoder.finish(&tokenizer).expect("finish"), expected.cases[2].decoded);
}

/// Runs a prompt through a fresh cache alone, one prefill then one token at a time, and returns
/// the logits after every step.
fn alone(model: &LlamaModel, prompt: &[u32], decoded: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache(4, prompt.len() + decoded.len()).expect("cache");
    let mut steps = vec![model.forward(&mut [StepInput { tokens: prompt, cache: &mut cache }]).expect("prefill")];
    for token in decoded {
        steps.push(model.forward(&mut [StepInput { tokens: &[*token], cache: &mut cache }]).expect("decode"));
    }
    steps.into_iter().map(|logits| logits.squeeze(0).expect("row").to_vec1::<f32>().expect("logits")).collect()
}

/// Decoding sequences attend together in one batched product over the K/V pool, padded to the
/// longest and masked; prefill chunks attend one by one. A step mixing both, with slots out of
/// step order and the pool growing underneath, gives each sequence the logits it gets alone (f32
/// weights, so only summation order differs).
#[test]
fn a_mixed_batch_step_equals_each_sequence_alone() {
    let (model, _) = load_parts("f32");
    mixed_batch_step(&model);
    // The batched tensor path that CUDA runs, on the CPU.
    mixed_batch_step(&load_parts("f32").0.with_batched_decode_attention());
}

fn mixed_batch_step(model: &LlamaModel) {
    let long: Vec<u32> = (0..200).map(|index| 3 + (index * 37) % 380).collect();
    let short: Vec<u32> = vec![5, 6, 7, 8, 9];
    let chunk: Vec<u32> = (0..17).map(|index| 20 + index * 11).collect();
    let next = [42u32, 242];
    let expected_long = alone(model, &long, &next);
    let expected_short = alone(model, &short, &next);
    let expected_chunk = alone(model, &chunk, &[]);

    // A freed slot in front, so slots are not the step order, and the pool grows (slots and
    // capacity) while the sequences run.
    let placeholder = model.new_cache(4, 8).expect("cache");
    let mut short_cache = model.new_cache(4, 64).expect("cache");
    let mut long_cache = model.new_cache(4, 250).expect("cache");
    drop(placeholder);
    let mut chunk_cache = model.new_cache(4, 64).expect("cache");
    model.forward(&mut [StepInput { tokens: &long, cache: &mut long_cache }]).expect("prefill long");
    model.forward(&mut [StepInput { tokens: &short, cache: &mut short_cache }]).expect("prefill short");
    let rows: Vec<Vec<f32>> = model
        .forward(&mut [
            StepInput { tokens: &next[..1], cache: &mut short_cache },
            StepInput { tokens: &chunk, cache: &mut chunk_cache },
            StepInput { tokens: &next[..1], cache: &mut long_cache },
        ])
        .expect("mixed step")
        .to_vec2()
        .expect("rows");
    let close = |ours: &[f32], theirs: &[f32], what: &str| {
        let difference = max_abs_diff(ours, theirs);
        assert!(difference < 1e-4, "{what}: logits differ by {difference}");
    };
    close(&rows[0], &expected_short[1], "short decode");
    close(&rows[1], &expected_chunk[0], "prefill chunk");
    close(&rows[2], &expected_long[1], "long decode");
    let rows: Vec<Vec<f32>> = model
        .forward(&mut [
            StepInput { tokens: &next[1..], cache: &mut long_cache },
            StepInput { tokens: &next[1..], cache: &mut short_cache },
        ])
        .expect("decode step")
        .to_vec2()
        .expect("rows");
    close(&rows[0], &expected_long[2], "long second decode");
    close(&rows[1], &expected_short[2], "short second decode");
}

/// A cache from one model cannot be fed to another, and a dropped cache's slot is reused.
#[test]
fn caches_belong_to_their_model() {
    let (model, _) = load_parts("f32");
    let (other, _) = load_parts("f32");
    let mut foreign = other.new_cache(4, 8).expect("cache");
    let error = model.forward(&mut [StepInput { tokens: &[1], cache: &mut foreign }]).expect_err("foreign cache");
    assert!(error.to_string().contains("another model"), "{error}");
    let first = model.new_cache(4, 8).expect("cache");
    let description = format!("{first:?}");
    drop(first);
    assert_eq!(format!("{:?}", model.new_cache(4, 8).expect("cache")), description, "the freed slot is reused");
}
