//! The BERT encoder's CPU kernels (nstream-kernels' dense path) against its candle-ops path on
//! the same weights: a random tiny BERT (always) and all-MiniLM-L6-v2 from the offline cache
//! (skipped without it; CI runs scripts/offline-models.sh).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use nstream_embed::bert::BertEncoder;
use nstream_embed::config::BertConfig;
use nstream_hub::{Hub, ModelSource};

/// Per token row, the cosine of the two paths' states (padding rows excluded) and the largest
/// absolute difference.
fn compare(kernels: &Tensor, candle: &Tensor, lengths: &[usize]) -> (f64, f32) {
    let kernels: Vec<Vec<Vec<f32>>> = kernels.to_vec3().expect("f32 states");
    let candle: Vec<Vec<Vec<f32>>> = candle.to_vec3().expect("f32 states");
    let (mut worst_cosine, mut worst_difference) = (1.0f64, 0.0f32);
    for (sequence, &length) in lengths.iter().enumerate() {
        for position in 0..length {
            let (a, b) = (&kernels[sequence][position], &candle[sequence][position]);
            let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
            let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            worst_cosine = worst_cosine.min(dot / (norm(a) * norm(b)));
            for (x, y) in a.iter().zip(b) {
                worst_difference = worst_difference.max((x - y).abs());
            }
        }
    }
    (worst_cosine, worst_difference)
}

/// Right-padded ids (pad 0) of the given lengths, deterministic.
fn ids(lengths: &[usize], vocabulary: u32) -> Tensor {
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let mut values = Vec::new();
    for (sequence, &length) in lengths.iter().enumerate() {
        for position in 0..longest {
            values.push(if position < length {
                (sequence as u32 * 7919 + position as u32 * 104_729) % vocabulary
            } else {
                0
            });
        }
    }
    Tensor::from_vec(values, (lengths.len(), longest), &Device::Cpu).expect("ids")
}

fn tiny_weights(config: &BertConfig) -> HashMap<String, Tensor> {
    let device = Device::Cpu;
    let (hidden, intermediate) = (config.hidden_size, config.intermediate_size);
    let random = |shape: &[usize], scale: f64| Tensor::randn(0f32, scale as f32, shape, &device).expect("random");
    let mut tensors = HashMap::new();
    let mut put = |name: String, tensor: Tensor| {
        tensors.insert(name, tensor);
    };
    put("embeddings.word_embeddings.weight".into(), random(&[config.vocab_size, hidden], 1.0));
    put("embeddings.position_embeddings.weight".into(), random(&[config.max_position_embeddings, hidden], 0.5));
    put("embeddings.token_type_embeddings.weight".into(), random(&[config.type_vocab_size, hidden], 0.5));
    let norm = |name: String, put: &mut dyn FnMut(String, Tensor)| {
        put(format!("{name}.weight"), (random(&[hidden], 0.1) + 1.0).expect("weight"));
        put(format!("{name}.bias"), random(&[hidden], 0.1));
    };
    norm("embeddings.LayerNorm".into(), &mut put);
    for layer in 0..config.num_hidden_layers {
        let name = |part: &str| format!("encoder.layer.{layer}.{part}");
        for part in ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"] {
            put(name(&format!("{part}.weight")), random(&[hidden, hidden], 0.3));
            put(name(&format!("{part}.bias")), random(&[hidden], 0.1));
        }
        put(name("intermediate.dense.weight"), random(&[intermediate, hidden], 0.3));
        put(name("intermediate.dense.bias"), random(&[intermediate], 0.1));
        put(name("output.dense.weight"), random(&[hidden, intermediate], 0.3));
        put(name("output.dense.bias"), random(&[hidden], 0.1));
        norm(name("attention.output.LayerNorm"), &mut put);
        norm(name("output.LayerNorm"), &mut put);
    }
    tensors
}

#[test]
fn a_random_bert_gives_the_same_states_on_the_kernels_as_on_candle_ops() {
    for activation in ["gelu", "gelu_new", "relu"] {
        let config = BertConfig::from_json(&format!(
            r#"{{"model_type": "bert", "vocab_size": 97, "hidden_size": 48, "num_hidden_layers": 2,
                "num_attention_heads": 4, "intermediate_size": 80, "hidden_act": "{activation}",
                "max_position_embeddings": 40, "layer_norm_eps": 1e-12}}"#
        ))
        .expect("config");
        let tensors = tiny_weights(&config);
        let kernels = BertEncoder::load(&tensors, &config, DType::F32, &Device::Cpu).expect("loads");
        let candle = BertEncoder::load_candle_ops(&tensors, &config, DType::F32, &Device::Cpu).expect("loads");
        assert!(kernels.uses_cpu_kernels() && !candle.uses_cpu_kernels());
        // One full sequence (no mask at all), a padded batch, and the longest the positions allow.
        for lengths in [vec![9], vec![17, 3, 1, 11, 17, 6, 8], vec![40, 23]] {
            let input = ids(&lengths, 97);
            let ours = kernels.forward(&input, &lengths).expect("kernels");
            let reference = candle.forward(&input, &lengths).expect("candle");
            assert_eq!(ours.dims(), reference.dims());
            let (cosine, difference) = compare(&ours, &reference, &lengths);
            assert!(
                cosine >= 0.999_999 && difference <= 1e-4,
                "{activation} {lengths:?}: cosine {cosine}, max difference {difference}"
            );
        }
        // Padding costs nothing on the kernels: each sequence of a mixed batch gets exactly the
        // states it gets alone (the products are row by row, the attention per sequence), and
        // the padding rows are zeros.
        let lengths = [17, 3, 1, 11];
        let input = ids(&lengths, 97);
        let batched = kernels.forward(&input, &lengths).expect("batch").to_vec3::<f32>().expect("values");
        for (index, &length) in lengths.iter().enumerate() {
            let alone_input = input.narrow(0, index, 1).and_then(|row| row.narrow(1, 0, length)).expect("row");
            let alone = kernels.forward(&alone_input, &[length]).expect("alone").to_vec3::<f32>().expect("values");
            assert_eq!(batched[index][..length], alone[0][..], "{activation}: sequence {index} differs in a batch");
            assert!(batched[index][length..].iter().flatten().all(|&value| value == 0.0), "{activation}: padding rows");
        }
        let too_long = ids(&[41], 97);
        let error = kernels.forward(&too_long, &[41]).expect_err("refused").to_string();
        assert!(error.contains("41 tokens exceeds the 40 positions"), "{error}");
        let error = kernels.forward(&ids(&[3], 97), &[4]).expect_err("refused").to_string();
        assert!(error.contains("do not fit"), "{error}");
        let outside = Tensor::from_vec(vec![3u32, 97], (1, 2), &Device::Cpu).expect("ids");
        let error = kernels.forward(&outside, &[2]).expect_err("refused").to_string();
        assert!(error.contains("token id 97 is outside the vocabulary of 97"), "{error}");
    }
}

#[test]
fn all_minilm_l6_v2_gives_the_same_states_on_the_kernels_as_on_candle_ops() {
    let hub = Hub::from_env().with_offline(true).with_progress(false);
    let source = ModelSource::new("sentence-transformers/all-MiniLM-L6-v2");
    let (Ok(config), Ok(weights)) =
        (hub.resolve_file(&source, "config.json"), hub.resolve_file(&source, "model.safetensors"))
    else {
        eprintln!("SKIPPED: all-MiniLM-L6-v2 is not in the hub cache; run scripts/offline-models.sh");
        return;
    };
    let config = BertConfig::from_json(&std::fs::read_to_string(config).expect("config")).expect("config");
    let tensors = candle_core::safetensors::load(weights, &Device::Cpu).expect("weights");
    let kernels = BertEncoder::load(&tensors, &config, DType::F32, &Device::Cpu).expect("loads");
    let candle = BertEncoder::load_candle_ops(&tensors, &config, DType::F32, &Device::Cpu).expect("loads");
    for lengths in [vec![15], vec![32, 7, 19, 2], vec![256]] {
        let input = ids(&lengths, config.vocab_size as u32);
        let ours = kernels.forward(&input, &lengths).expect("kernels");
        let reference = candle.forward(&input, &lengths).expect("candle");
        let (cosine, difference) = compare(&ours, &reference, &lengths);
        assert!(cosine >= 0.999_999 && difference <= 1e-3, "{lengths:?}: cosine {cosine}, max difference {difference}");
    }
}
