//! Times all-MiniLM-L6-v2's forward pass on nstream-kernels' CPU kernels against candle ops, back
//! to back in one process, and prints one JSON line per shape.
//!
//! `cargo run --release -p nstream-embed --example bert_forward -- [rounds] [kernels|candle|both|bf16]`
//!
//! Shapes: one sentence of 15 tokens (a search box), 4 × 32, 16 × 32 and 16 × 128 (batched
//! ingest). Rounds alternate the two paths so that a change of load hits both. `kernels` or
//! `candle` alone runs one path (for a profiler); `bf16` times the kernels in f32 against the
//! kernels with bf16 products (`--dtype bf16`, CPUs with AVX-512 BF16). Needs the model in the offline cache
//! (`scripts/offline-models.sh`).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use nstream_embed::bert::BertEncoder;
use nstream_embed::config::BertConfig;
use nstream_hub::{Hub, ModelSource};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let rounds: usize = arguments.first().and_then(|value| value.parse().ok()).unwrap_or(50);
    let which = arguments.get(1).map_or("both", String::as_str);
    if !["both", "kernels", "candle", "bf16"].contains(&which) {
        return Err(format!("the second argument is kernels, candle, both or bf16, not {which:?}").into());
    }
    let hub = Hub::from_env().with_offline(true).with_progress(false);
    let source = ModelSource::new("sentence-transformers/all-MiniLM-L6-v2");
    let config = BertConfig::from_json(&std::fs::read_to_string(hub.resolve_file(&source, "config.json")?)?)?;
    let tensors = candle_core::safetensors::load(hub.resolve_file(&source, "model.safetensors")?, &Device::Cpu)?;
    let mut paths = Vec::new();
    if which != "candle" {
        paths.push(("kernels", BertEncoder::load(&tensors, &config, DType::F32, &Device::Cpu)?));
    }
    if which == "candle" || which == "both" {
        paths.push(("candle", BertEncoder::load_candle_ops(&tensors, &config, DType::F32, &Device::Cpu)?));
    }
    if which == "bf16" {
        if !nstream_kernels::dense_bf16::bf16_available() {
            return Err("this CPU has no AVX-512 BF16".into());
        }
        // First, so that "speedup" is f32's time over bf16's.
        paths.insert(0, ("bf16", BertEncoder::load(&tensors, &config, DType::BF16, &Device::Cpu)?));
    }
    drop(tensors);
    for (batch, sequence) in [(1, 15), (4, 32), (16, 32), (16, 128)] {
        let ids: Vec<u32> = (0..batch * sequence).map(|index| 1000 + (index as u32 * 7919) % 28_000).collect();
        let input = Tensor::from_vec(ids, (batch, sequence), &Device::Cpu)?;
        // Real lengths: the last sequence is padded to half (a mask, as in a sorted batch).
        let mut lengths = vec![sequence; batch];
        if batch > 1 {
            lengths[batch - 1] = sequence / 2;
        }
        let rounds = if batch * sequence >= 2048 { rounds.div_ceil(5) } else { rounds };
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
        for (_, encoder) in &paths {
            encoder.forward(&input, &lengths)?;
        }
        for _ in 0..rounds {
            for (index, (_, encoder)) in paths.iter().enumerate() {
                let started = Instant::now();
                encoder.forward(&input, &lengths)?;
                times[index].push(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        let mut line = format!("{{\"batch\":{batch},\"sequence\":{sequence},\"rounds\":{rounds}");
        let mut medians = Vec::new();
        for ((name, _), times) in paths.iter().zip(&mut times) {
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            medians.push(median);
            line += &format!(",\"{name}_median_ms\":{median:.3},\"{name}_min_ms\":{:.3}", times[0]);
        }
        // The first path's speed over the second's.
        if let [first, second] = medians[..] {
            line += &format!(",\"speedup\":{:.2}", second / first);
        }
        println!("{line}}}");
    }
    Ok(())
}
