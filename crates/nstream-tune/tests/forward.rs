//! The training forward against nstream-llm's serving forward on the committed tiny checkpoints,
//! gradients reaching every trainable tensor, and a finite-difference check of the gradient.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use nstream_llm::model::{LlamaConfig, LlamaModel, RopeScaling, StepInput};
use nstream_peft::Module;
use nstream_tune::BaseModel;
use nstream_tune::forward::{Batch, DropoutSeed, LoraSpec, TrainModel};

fn fixture(variant: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llm/tiny-llama").join(variant)
}

const TOKENS: [u32; 12] = [304, 328, 81, 223, 354, 327, 5, 17, 99, 250, 3, 120];

/// The serving forward's logits after each token, fed one token at a time through the KV cache.
fn serving_logits(variant: &str, tokens: &[u32]) -> Vec<Vec<f32>> {
    let dir = fixture(variant);
    let files = nstream_llm::SafetensorsFiles::from_dir(&dir).expect("files");
    let model = LlamaModel::from_safetensors(&files.config, &files.weights, &Device::Cpu).expect("model");
    let mut cache = model.new_cache(tokens.len(), tokens.len()).expect("cache");
    tokens
        .iter()
        .map(|token| {
            let mut inputs = [StepInput { tokens: std::slice::from_ref(token), cache: &mut cache }];
            model.forward(&mut inputs).expect("forward").squeeze(0).expect("squeeze").to_vec1::<f32>().expect("logits")
        })
        .collect()
}

fn lora(targets: &[Module]) -> LoraSpec {
    LoraSpec { rank: 4, alpha: 8.0, dropout: 0.0, rslora: false, targets: targets.to_vec() }
}

/// Sets every LoRA B to small random values (B starts at zero, which would make A's gradient
/// zero and the adapter a no-op).
fn randomise_b(model: &TrainModel, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    for pair in model.lora().values() {
        let values: Vec<f32> = (0..pair.b.elem_count()).map(|_| (rng.f32() - 0.5) * 0.2).collect();
        let tensor = Tensor::from_vec(values, pair.b.dims(), &Device::Cpu).unwrap().to_dtype(pair.b.dtype()).unwrap();
        pair.b.set(&tensor).unwrap();
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn training_logits_equal_the_serving_forward_on_the_tiny_checkpoints() {
    // The serving forward on f32 CPU weights uses fused kernels; the training forward plain
    // operations in another order: they agree to float rounding, within 1e-4 absolute (logits
    // are of order 1-10).
    for variant in ["f32", "tied", "qwen2"] {
        let base = BaseModel::from_safetensors_dir(&fixture(variant), &Device::Cpu, DType::F32).expect("base");
        let model = TrainModel::new(base.config.clone(), base.weights, Some(lora(&Module::ALL)), 1).expect("model");
        let batch = Batch::new(&[(&TOKENS, &[false; 12])]);
        let logits = model.logits(&batch).expect("logits").squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        let serving = serving_logits(variant, &TOKENS);
        for (position, (ours, theirs)) in logits.iter().zip(&serving).enumerate() {
            let difference = max_abs_diff(ours, theirs);
            assert!(difference < 1e-4, "{variant} position {position}: max |difference| {difference}");
        }
    }
}

#[test]
fn a_padded_batch_gives_each_row_its_own_logits() {
    let base = BaseModel::from_safetensors_dir(&fixture("f32"), &Device::Cpu, DType::F32).expect("base");
    let model = TrainModel::new(base.config.clone(), base.weights, None, 1).expect("model");
    let short = &TOKENS[..5];
    let batch = Batch::new(&[(&TOKENS, &[false; 12]), (short, &[false; 5])]);
    let logits = model.logits(&batch).unwrap();
    let alone = model.logits(&Batch::new(&[(short, &[false; 5])])).unwrap();
    let row = logits.get(1).unwrap().narrow(0, 0, 5).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let expected = alone.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(max_abs_diff(&row, &expected) < 1e-5);
}

#[test]
fn a_lora_model_equals_the_full_model_on_its_merged_weights() {
    let base = BaseModel::from_safetensors_dir(&fixture("qwen2"), &Device::Cpu, DType::F32).expect("base");
    let config = base.config.clone();
    let model = TrainModel::new(config.clone(), base.weights, Some(lora(&Module::ALL)), 7).expect("model");
    randomise_b(&model, 3);
    let merged: HashMap<String, Tensor> = model
        .merged_weights()
        .unwrap()
        .into_iter()
        .map(|(name, tensor)| (name, Tensor::from_vec(tensor.data, tensor.shape, &Device::Cpu).unwrap()))
        .collect();
    let full = TrainModel::new(config, merged, None, 7).unwrap();
    let batch = Batch::new(&[(&TOKENS, &[false; 12])]);
    let ours = model.logits(&batch).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let theirs = full.logits(&batch).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let difference = max_abs_diff(&ours, &theirs);
    assert!(difference < 1e-4, "{difference}");
    // The adapter changes the output (B is not zero): the test can fail.
    let base = BaseModel::from_safetensors_dir(&fixture("qwen2"), &Device::Cpu, DType::F32).unwrap();
    let plain = TrainModel::new(base.config.clone(), base.weights, None, 7).unwrap();
    let plain = plain.logits(&batch).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(max_abs_diff(&ours, &plain) > 1e-3);
}

fn mask_after(count: usize, from: usize) -> Vec<bool> {
    (0..count).map(|index| index >= from).collect()
}

#[test]
fn every_trainable_tensor_gets_a_non_zero_gradient() {
    let batch_mask = mask_after(12, 4);
    let short_mask = mask_after(7, 2);
    let batch = Batch::new(&[(&TOKENS, &batch_mask), (&TOKENS[..7], &short_mask)]);
    for (variant, lora_spec) in
        [("qwen2", Some(lora(&Module::ALL))), ("tied", Some(lora(&Module::ALL))), ("f32", None), ("qwen2", None)]
    {
        let base = BaseModel::from_safetensors_dir(&fixture(variant), &Device::Cpu, DType::F32).expect("base");
        let is_lora = lora_spec.is_some();
        let model = TrainModel::new(base.config.clone(), base.weights, lora_spec, 5).expect("model");
        if is_lora {
            randomise_b(&model, 11);
        }
        let loss = model.summed_loss(&batch, Some(DropoutSeed(1))).unwrap();
        let gradients = model.backward(&loss).unwrap_or_else(|error| panic!("{variant}: {error}"));
        assert!(!model.trainable().is_empty());
        assert_eq!(gradients.len(), model.trainable().len());
        for (name, gradient) in model.trainable().keys().zip(&gradients) {
            let norm = gradient.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
            assert!(norm > 0.0 && norm.is_finite(), "{variant}: gradient of {name} has norm {norm}");
        }
        let expected = if is_lora { base.config.layers * 7 * 2 } else { model.weights().len() };
        assert_eq!(model.trainable().len(), expected, "{variant}");
    }
}

/// A random Llama with biases, in f64, small enough for finite differences.
fn tiny_random_model(lora_spec: Option<LoraSpec>) -> TrainModel {
    let config = LlamaConfig {
        architecture: "qwen2".into(),
        vocab_size: 13,
        hidden_size: 8,
        layers: 2,
        heads: 2,
        kv_heads: 1,
        head_dim: 4,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-6,
        context_length: 32,
        rope_is_neox: true,
        rope_scaling: RopeScaling::None,
    };
    let mut rng = fastrand::Rng::with_seed(99);
    let mut random = |shape: &[usize]| {
        let count: usize = shape.iter().product();
        let values: Vec<f64> = (0..count).map(|_| rng.f64() - 0.5).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    };
    let mut weights = HashMap::new();
    weights.insert("model.embed_tokens.weight".to_owned(), random(&[13, 8]));
    weights.insert("model.norm.weight".to_owned(), (random(&[8]) + 1.0).unwrap());
    weights.insert("lm_head.weight".to_owned(), random(&[13, 8]));
    for layer in 0..2 {
        let name = |part: &str| format!("model.layers.{layer}.{part}");
        weights.insert(name("self_attn.q_proj.weight"), random(&[8, 8]));
        weights.insert(name("self_attn.q_proj.bias"), random(&[8]));
        weights.insert(name("self_attn.k_proj.weight"), random(&[4, 8]));
        weights.insert(name("self_attn.k_proj.bias"), random(&[4]));
        weights.insert(name("self_attn.v_proj.weight"), random(&[4, 8]));
        weights.insert(name("self_attn.o_proj.weight"), random(&[8, 8]));
        weights.insert(name("mlp.gate_proj.weight"), random(&[12, 8]));
        weights.insert(name("mlp.up_proj.weight"), random(&[12, 8]));
        weights.insert(name("mlp.down_proj.weight"), random(&[8, 12]));
        weights.insert(name("input_layernorm.weight"), (random(&[8]) + 1.0).unwrap());
        weights.insert(name("post_attention_layernorm.weight"), (random(&[8]) + 1.0).unwrap());
    }
    TrainModel::new(config, weights, lora_spec, 3).unwrap()
}

fn loss_value(model: &TrainModel, batch: &Batch) -> f64 {
    model.summed_loss(batch, None).unwrap().to_scalar::<f64>().unwrap()
}

fn set_entry(var: &Var, index: usize, value: f64) {
    let mut values = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    values[index] = value;
    var.set(&Tensor::from_vec(values, var.dims(), &Device::Cpu).unwrap()).unwrap();
}

fn check_finite_differences(model: &TrainModel, batch: &Batch) -> usize {
    let gradients = model.backward(&model.summed_loss(batch, None).unwrap()).unwrap();
    let mut rng = fastrand::Rng::with_seed(5);
    let mut checked = 0;
    for ((name, var), gradient) in model.trainable().iter().zip(&gradients) {
        let analytic = gradient.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let values = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for _ in 0..3 {
            let index = rng.usize(..values.len());
            let step = 1e-5;
            set_entry(var, index, values[index] + step);
            let plus = loss_value(model, batch);
            set_entry(var, index, values[index] - step);
            let minus = loss_value(model, batch);
            set_entry(var, index, values[index]);
            let numeric = (plus - minus) / (2.0 * step);
            let error = (numeric - analytic[index]).abs() / numeric.abs().max(analytic[index].abs()).max(1e-3);
            assert!(error < 1e-5, "{name}[{index}]: numeric {numeric} vs analytic {}", analytic[index]);
            checked += 1;
        }
    }
    checked
}

#[test]
fn gradients_match_finite_differences_on_a_tiny_random_model() {
    let tokens = [1u32, 5, 9, 2, 12, 7, 3];
    let mask = [false, false, true, true, false, true, true];
    let batch = Batch::new(&[(&tokens, &mask), (&tokens[..4], &mask[..4])]);
    // Full fine-tuning: every weight, the embedding, norms and biases included.
    let checked = check_finite_differences(&tiny_random_model(None), &batch);
    assert!(checked >= 3 * 25, "{checked}");
    // LoRA on every module, with B moved off zero so A's gradient is not trivially zero.
    let model = tiny_random_model(Some(LoraSpec {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        rslora: true,
        targets: Module::ALL.to_vec(),
    }));
    let mut rng = fastrand::Rng::with_seed(8);
    for pair in model.lora().values() {
        let values: Vec<f64> = (0..pair.b.elem_count()).map(|_| rng.f64() - 0.5).collect();
        pair.b.set(&Tensor::from_vec(values, pair.b.dims(), &Device::Cpu).unwrap()).unwrap();
    }
    assert_eq!(check_finite_differences(&model, &batch), 3 * 2 * 7 * 2);
}

#[test]
fn lora_starts_as_peft_does() {
    let base = BaseModel::from_safetensors_dir(&fixture("f32"), &Device::Cpu, DType::F32).expect("base");
    let model =
        TrainModel::new(base.config.clone(), base.weights, Some(lora(&[Module::QProj, Module::DownProj])), 1).unwrap();
    for (&(_, module), pair) in model.lora() {
        let a = pair.a.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let fan_in = pair.a.dims()[1] as f32;
        let bound = 1.0 / fan_in.sqrt();
        assert!(a.iter().all(|value| value.abs() <= bound), "{module:?}");
        // Kaiming-uniform's spread: the values fill the range, not a corner of it.
        assert!(a.iter().cloned().fold(0.0f32, f32::max) > bound * 0.8);
        assert!(pair.b.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|&value| value == 0.0));
    }
}

/// The loss and every trainable tensor's gradient.
fn loss_and_gradients(model: &TrainModel, batch: &Batch) -> (f64, Vec<(String, Vec<f64>)>) {
    let loss = model.summed_loss(batch, Some(DropoutSeed(4))).unwrap();
    let gradients = model.backward(&loss).unwrap();
    let named = model
        .trainable()
        .keys()
        .zip(&gradients)
        .map(|(name, gradient)| {
            (name.clone(), gradient.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap())
        })
        .collect();
    (loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(), named)
}

/// Compares the fused CPU kernels with the composite forward of candle operations (the
/// reference) on `make()`'s model: loss and gradients within `tolerance`, relative to the
/// largest entry of each gradient.
fn check_fused_against_composite(make: &dyn Fn() -> TrainModel, batch: &Batch, tolerance: f64) {
    let fused = make();
    let composite = make().with_fused_kernels(false).unwrap();
    let (fused_loss, fused_gradients) = loss_and_gradients(&fused, batch);
    let (composite_loss, composite_gradients) = loss_and_gradients(&composite, batch);
    assert!(
        (fused_loss - composite_loss).abs() <= tolerance * composite_loss.abs(),
        "loss {fused_loss} vs {composite_loss}"
    );
    for ((name, ours), (_, reference)) in fused_gradients.iter().zip(&composite_gradients) {
        let scale = reference.iter().fold(0.0f64, |max, value| max.max(value.abs()));
        assert!(scale > 0.0, "{name}: a zero reference gradient");
        let error = ours.iter().zip(reference).fold(0.0f64, |max, (a, b)| max.max((a - b).abs())) / scale;
        assert!(error <= tolerance, "{name}: fused gradient differs by {error} of its largest entry");
    }
}

#[test]
fn the_fused_kernels_compute_the_composite_forward_and_its_gradients() {
    let tokens = [1u32, 5, 9, 2, 12, 7, 3, 4, 8];
    let mask = [false, false, true, true, false, true, true, true, true];
    let batch = Batch::new(&[(&tokens, &mask), (&tokens[..5], &mask[..5]), (&tokens[2..], &mask[2..])]);
    // f64, full fine-tuning (norm weights, embeddings and biases trainable) and LoRA everywhere.
    check_fused_against_composite(&|| tiny_random_model(None), &batch, 1e-12);
    let lora_model = || {
        let model = tiny_random_model(Some(LoraSpec {
            rank: 2,
            alpha: 4.0,
            dropout: 0.1,
            rslora: false,
            targets: Module::ALL.to_vec(),
        }));
        let mut rng = fastrand::Rng::with_seed(8);
        for pair in model.lora().values() {
            let values: Vec<f64> = (0..pair.b.elem_count()).map(|_| rng.f64() - 0.5).collect();
            pair.b.set(&Tensor::from_vec(values, pair.b.dims(), &Device::Cpu).unwrap()).unwrap();
        }
        model
    };
    check_fused_against_composite(&lora_model, &batch, 1e-12);
    // f32 on the committed checkpoints (grouped-query attention in qwen2, tied embeddings).
    let batch_mask = mask_after(12, 4);
    let short_mask = mask_after(7, 2);
    let batch = Batch::new(&[(&TOKENS, &batch_mask), (&TOKENS[..7], &short_mask)]);
    for (variant, lora_spec) in [("qwen2", Some(lora(&Module::ALL))), ("tied", None), ("f32", None)] {
        let make = || {
            let base = BaseModel::from_safetensors_dir(&fixture(variant), &Device::Cpu, DType::F32).expect("base");
            let model = TrainModel::new(base.config.clone(), base.weights, lora_spec.clone(), 5).expect("model");
            randomise_b(&model, 11);
            model
        };
        check_fused_against_composite(&make, &batch, 1e-4);
    }
}
