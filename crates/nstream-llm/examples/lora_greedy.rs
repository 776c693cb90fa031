//! Greedy decoding with a PEFT LoRA adapter applied at run time, for the parity check against
//! Python peft (tests/python/lora_parity.py, run by scripts/lora-parity.sh).
//!
//! Usage: `lora_greedy ADAPTER_DIR PROMPT_IDS STEPS` (ids comma-separated). The base is the local
//! safetensors checkpoint the adapter's `base_model_name_or_path` (or `base_model.json`) names.
//! Prints `{"tokens": [...], "logits": [[...], ...]}`: the greedy tokens and the logits before
//! each of them (STEPS + 1 rows).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use candle_core::Device;
use nstream_llm::AdapterSource;
use nstream_llm::model::{LlamaModel, LoraAdapter, StepInput};

fn main() -> anyhow::Result<()> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let [folder, prompt, steps] = arguments.as_slice() else {
        bail!("usage: lora_greedy ADAPTER_DIR PROMPT_IDS STEPS");
    };
    let prompt: Vec<u32> = prompt.split(',').map(str::parse).collect::<Result<_, _>>().context("PROMPT_IDS")?;
    let steps: usize = steps.parse().context("STEPS")?;
    let source = AdapterSource::from_folder(Path::new(folder))?;
    let base = Path::new(source.base_model().context("the adapter names no base")?).to_path_buf();
    let model =
        LlamaModel::from_safetensors(&base.join("config.json"), &[base.join("model.safetensors")], &Device::Cpu)?;
    let adapter = Arc::new(LoraAdapter::new("parity", &source.read()?, &model)?);
    let mut cache = model.new_cache(prompt.len() + steps + 1, prompt.len() + steps + 1)?;
    cache.set_adapter(Some(adapter))?;
    let mut tokens = Vec::new();
    let mut rows: Vec<Vec<f32>> = Vec::new();
    let mut input = prompt.clone();
    for _ in 0..=steps {
        let logits = model.forward(&mut [StepInput { tokens: &input, cache: &mut cache }])?;
        let row: Vec<f32> = logits.get(0)?.to_vec1()?;
        let next = nstream_llm::model::argmax(&logits.get(0)?)?;
        rows.push(row);
        tokens.push(next);
        input = vec![next];
    }
    println!("{}", serde_json::json!({ "tokens": tokens, "logits": rows }));
    Ok(())
}
